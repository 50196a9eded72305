//! The sweep harness: the base files, the in-place mutations run on worker threads, lies run one
//! by one, the watchdog, and the bounds every sweep asserts (no panic, no acceptance, typed
//! errors, bounded memory, no slow file).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::panic;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, Once};
use std::time::{Duration, Instant};

use ram_saver::{Compression, SnapshotReader};
use vm_memory::GuestMemoryMmap;

use super::check::{try_load, try_records, try_verify, Expect, Outcome, Stats};
use super::guest::{
    fill_guest, guest_pages, machine_state_blob, new_mem, same_memory, write_snapshot, THIN,
};
use super::layout::{Model, Rec, Spans};

/// Address-space limit for a sweep process. Every allocation the reader could be tricked into
/// (a length field of 2^32 pages or 2^64 bytes) is far above it, so such an allocation fails and
/// aborts the test run loudly ("memory allocation of N bytes failed"), instead of being measured
/// by a counting allocator (which would need `unsafe`).
pub const ADDRESS_SPACE_LIMIT: u64 = 3 << 30;

/// Peak RSS bound for a sweep process.
pub const MAX_HWM_KIB: u64 = 1 << 20;

fn limit_address_space() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_AS).expect("getrlimit");
    setrlimit(Resource::RLIMIT_AS, ADDRESS_SPACE_LIMIT.min(hard), hard).expect("setrlimit");
}

pub fn vm_hwm_kib() -> u64 {
    let s = fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Once per process: the address-space limit, and a panic hook that keeps the first few panic
/// reports (with location) and silences the rest.
pub fn process_setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        limit_address_space();
        let reported = AtomicUsize::new(0);
        let default_hook = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if reported.fetch_add(1, Ordering::Relaxed) < 5 {
                default_hook(info);
            }
        }));
    });
}

pub enum Mutation {
    /// Overwrite bytes at an offset.
    Patch { at: u64, bytes: Vec<u8> },
    /// Cut the file to this length.
    Truncate(u64),
    /// Add bytes after the footer.
    Append(Vec<u8>),
}

pub struct Case {
    pub base: usize,
    pub what: String,
    pub m: Mutation,
    pub expect: Expect,
}

pub struct Base {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    pub model: Model,
    pub spans: Spans,
}

pub const FLIP_MASKS: [u8; 9] = [0x01, 0x80, 0xff, 0x10, 0x04, 0x40, 0x20, 0x02, 0x08];

/// The guest memory, a scratch directory and the two base files (raw; zstd with a parent
/// reference), each checked: the test's encoder reproduces it byte for byte, the reader agrees
/// with the test's view of it, it verifies and loads back to the same memory.
pub struct Setup {
    pub dir: PathBuf,
    pub source: GuestMemoryMmap,
    pub bases: Vec<Base>,
}

impl Setup {
    pub fn new(name: &str) -> Setup {
        process_setup();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        let source = new_mem();
        fill_guest(&source);
        let parent = ram_saver::ParentRef {
            identity: ram_saver::Identity {
                snapshot_id: [0x5a; 16],
                trailer_crc: 0x1234_5678,
                file_len: 1 << 20,
            },
            path: "parent.snap".into(),
        }
        .encode();
        let mut bases: Vec<Base> = [
            ("raw", Compression::None, &b""[..]),
            ("zstd", Compression::Zstd { level: 3 }, &parent[..]),
        ]
        .into_iter()
        .map(|(name, compression, parent)| base(&dir, &source, name, compression, parent))
        .collect();
        let pieces = bases[1].model.recs.iter().filter(|r| r.codec == 2).count();
        assert!(pieces > 0, "the zstd base has no record in zstd pieces");
        let raw_pieces = bases[0].model.recs.iter().filter(|r| r.codec == 3).count();
        assert!(raw_pieces > 0, "the raw base has no record raw in pieces");
        // The zstd file as format version 1 wrote it (one zstd frame per record).
        let v1 = bases[1].model.to_format_1();
        bases.push(checked_base(&dir, &source, "zstd-format-1", v1.assemble()));
        Setup { dir, source, bases }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn base(
    dir: &Path,
    source: &GuestMemoryMmap,
    name: &'static str,
    compression: Compression,
    parent: &[u8],
) -> Base {
    let path = dir.join(format!("{name}.snap"));
    let bytes = write_snapshot(source, &path, compression, parent);
    checked_base(dir, source, name, bytes)
}

/// A base file `bytes`, checked: the test's encoder reproduces it, the reader agrees with the
/// test's view of it, it verifies and loads back to `source`.
fn checked_base(dir: &Path, source: &GuestMemoryMmap, name: &'static str, bytes: Vec<u8>) -> Base {
    let path = dir.join(format!("{name}.snap"));
    fs::write(&path, &bytes).expect("write base");
    let (model, spans) = Model::parse(&bytes);
    assert!(
        model.assemble() == bytes,
        "{name}: the test's encoder does not reproduce the writer's file"
    );
    // The reader agrees with the test's view of the file.
    let mut r = SnapshotReader::open(&path).expect("open good file");
    let offsets: Vec<u64> = r.trailer().index.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, spans.recs.iter().map(|x| x.0).collect::<Vec<_>>());
    assert_eq!(r.machine_state(), &machine_state_blob()[..]);
    let report = r.verify(&mut |_| {}).expect("verify good file");
    assert_eq!(report.guest_pages, guest_pages());
    let mem = new_mem();
    SnapshotReader::open(&path)
        .expect("open")
        .load_into(&mem, &mut |_| {})
        .expect("load good file");
    assert!(same_memory(source, &mem), "{name}: loaded memory differs");
    let zstd_records = model.recs.iter().filter(|r| r.codec == 1).count();
    let piece_records = model.recs.iter().filter(|r| r.codec == 2).count();
    let raw_piece_records = model.recs.iter().filter(|r| r.codec == 3).count();
    let zero_runs = model.recs.iter().filter(|r| r.kind == 0).count();
    eprintln!(
        "base {name}: format {}, {} bytes, header {} B, machine state {} B, {} records \
         ({} zero runs, {} zstd, {} zstd in pieces, {} raw in pieces), trailer {} B",
        model.hdr.version,
        bytes.len(),
        spans.header_len,
        model.state.len(),
        model.recs.len(),
        zero_runs,
        zstd_records,
        piece_records,
        raw_piece_records,
        spans.footer_at - spans.trailer_at
    );
    Base {
        name,
        bytes,
        model,
        spans,
    }
}

/// Apply `m` to the worker's copy of the base file, run both attempts, undo `m`.
pub fn run_case(
    c: &Case,
    f: &fs::File,
    path: &Path,
    base: &[u8],
    stats: &mut Stats,
) -> std::io::Result<()> {
    let len = base.len() as u64;
    match &c.m {
        Mutation::Patch { at, bytes } => f.write_all_at(bytes, *at)?,
        Mutation::Truncate(at) => f.set_len(*at)?,
        Mutation::Append(bytes) => f.write_all_at(bytes, len)?,
    }
    let t0 = Instant::now();
    let o = try_verify(path);
    stats.check(&c.what, "verify", &o, &c.expect);
    let o = try_load(path, None);
    stats.check(&c.what, "load_into", &o, &c.expect);
    stats.timed(&c.what, t0);
    stats.files += 1;
    match &c.m {
        Mutation::Patch { at, bytes } => {
            let at = *at as usize;
            f.write_all_at(&base[at..at + bytes.len()], at as u64)?;
        }
        Mutation::Truncate(at) => f.write_all_at(&base[*at as usize..], *at)?,
        Mutation::Append(_) => f.set_len(len)?,
    }
    Ok(())
}

/// What each sweep worker is doing, for the watchdog's message.
pub static CURRENT: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub fn run_sweep(bases: &[Base], cases: &[Case], dir: &Path) -> Stats {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    CURRENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .resize(workers, String::new());
    let next = AtomicUsize::new(0);
    let results: Vec<Stats> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let next = &next;
                sc.spawn(move || {
                    let mut stats = Stats::default();
                    let files: Vec<(PathBuf, fs::File)> = bases
                        .iter()
                        .enumerate()
                        .map(|(k, b)| {
                            let p = dir.join(format!("sweep-w{w}-{k}.snap"));
                            fs::write(&p, &b.bytes).expect("write worker copy");
                            let f = OpenOptions::new().write(true).open(&p).expect("open copy");
                            (p, f)
                        })
                        .collect();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(c) = cases.get(i) else { break };
                        CURRENT.lock().unwrap_or_else(|p| p.into_inner())[w] = c.what.clone();
                        let (p, f) = &files[c.base];
                        run_case(c, f, p, &bases[c.base].bytes, &mut stats)
                            .expect("apply/undo mutation");
                    }
                    for (p, _) in &files {
                        let _ = fs::remove_file(p);
                    }
                    stats
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sweep worker"))
            .collect()
    });
    let mut all = Stats::default();
    for s in results {
        all.merge(s);
    }
    all
}

pub struct Lie {
    pub what: String,
    pub bytes: Vec<u8>,
    pub verify: Expect,
    pub load: Expect,
}

/// A zstd frame of `n` zero bytes, made without holding `n` bytes (content size recorded).
pub fn zstd_zeros(n: u64) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), 1).expect("zstd encoder");
    e.set_pledged_src_size(Some(n)).expect("pledge");
    e.include_contentsize(true).expect("content size");
    let chunk = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        e.write_all(&chunk[..k]).expect("compress");
        left -= k as u64;
    }
    e.finish().expect("finish frame")
}

/// One section's lies: crafted into [`Lies::add`].
pub type LieSection = fn(&mut Lies<'_>);

/// What a section needs to craft its lies about one base file.
pub struct Lies<'a> {
    pub b: &'a Base,
    pub m0: &'a Model,
    pub s: &'a Spans,
    /// A raw data record.
    pub dr: usize,
    /// A zero run of at least 2 pages.
    pub zr: usize,
    /// The last record.
    pub last: usize,
    /// Page size.
    pub ps: u64,
    sink: &'a mut dyn FnMut(Lie),
}

impl<'a> Lies<'a> {
    fn new(b: &'a Base, sink: &'a mut dyn FnMut(Lie)) -> Self {
        let m0 = &b.model;
        let find = |f: &dyn Fn(&Rec) -> bool| m0.recs.iter().position(f).expect("such a record");
        Lies {
            b,
            m0,
            s: &b.spans,
            dr: find(&|r| r.kind == 1 && r.codec == 0),
            zr: find(&|r| r.kind == 0 && r.page_count >= 2),
            last: m0.recs.len() - 1,
            ps: u64::from(m0.hdr.page_size),
            sink,
        }
    }

    /// Hand over one lie (a whole file) as soon as it is made: holding them all at once would
    /// dominate the heap.
    pub fn add(&mut self, what: &str, bytes: Vec<u8>, verify: Expect, load: Expect) {
        (self.sink)(Lie {
            what: format!("{}: {what}", self.b.name),
            bytes,
            verify,
            load,
        })
    }
}

/// Craft every lie of `sections` for every base and check both attempts on each; `records()`
/// must not panic either. Returns the number of lies.
pub fn run_lies(setup: &Setup, sections: &[LieSection], stats: &mut Stats) -> usize {
    let (bases, dir) = (&setup.bases, &setup.dir);
    let path = dir.join("lie.snap");
    let mut n = 0;
    for b in bases {
        let mut check = |lie: Lie| {
            n += 1;
            stats.files += 1;
            fs::write(&path, &lie.bytes).expect("write lie");
            *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = vec![lie.what.clone()];
            let t0 = Instant::now();
            for (label, expect) in [("verify", &lie.verify), ("load_into", &lie.load)] {
                let o = if label == "verify" {
                    try_verify(&path)
                } else {
                    try_load(&path, None)
                };
                stats.check(&lie.what, label, &o, expect);
            }
            if let Outcome::Panic(m) = try_records(&path) {
                stats.panics += 1;
                stats
                    .failures
                    .push(format!("{} [records]: PANIC: {m}", lie.what));
            }
            stats.timed(&lie.what, t0);
        };
        for section in sections {
            section(&mut Lies::new(b, &mut check));
        }
    }
    let _ = fs::remove_file(&path);
    n
}

/// Valid re-encodings of a base file: (what, bytes).
pub type Controls = fn(&Base) -> Vec<(String, Vec<u8>)>;

/// Valid re-encodings that must be accepted, with the memory they load equal to the source
/// (the lies fail because of the lie, not because of the re-encoding).
pub fn run_controls(setup: &Setup, controls: Controls) -> usize {
    let path = setup.dir.join("control.snap");
    let mut n = 0;
    for b in &setup.bases {
        for (what, bytes) in controls(b) {
            n += 1;
            fs::write(&path, &bytes).expect("write control");
            let o = try_verify(&path);
            assert!(
                matches!(o, Outcome::Accepted),
                "control {what}: verify {o:?}"
            );
            let mut loaded = None;
            let o = try_load(&path, Some(&mut loaded));
            assert!(matches!(o, Outcome::Accepted), "control {what}: load {o:?}");
            let mem = loaded.expect("loaded memory");
            assert!(
                same_memory(&setup.source, &mem),
                "control {what}: memory differs"
            );
        }
    }
    let _ = fs::remove_file(&path);
    n
}

/// Run `f` on its own thread; fail (naming what was running) if it takes longer than `limit`.
pub fn with_deadline(limit: Duration, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => h.join().expect("sweep thread"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = h.join() {
                panic::resume_unwind(p);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let now = CURRENT.lock().unwrap_or_else(|p| p.into_inner()).clone();
            panic!("mutation sweep hung (> {limit:?}); running: {now:#?}");
        }
    }
}

/// Print what a sweep did (`counts`: cases by kind) and assert its bounds: no panic, nothing
/// accepted, every error typed as expected, peak RSS, no slow file.
pub fn finish(title: &str, counts: &BTreeMap<&'static str, usize>, stats: Stats, t0: Instant) {
    let hwm = vm_hwm_kib();
    let thin = if THIN > 1 {
        "thinned, debug build"
    } else {
        "full"
    };
    eprintln!("{title} ({thin}):");
    for (k, v) in counts {
        eprintln!("  {k:>16}: {v}");
    }
    eprintln!(
        "  files mutated {}, attempts {} (verify + load_into each), panics {}, accepted {}",
        stats.files, stats.attempts, stats.panics, stats.accepted
    );
    eprintln!("  errors by kind: {:?}", stats.by_kind);
    eprintln!("  errors by stage: {:?}", stats.by_stage);
    eprintln!(
        "  time {:.1?}; slowest file {:.1?} ({})",
        t0.elapsed(),
        stats.slowest.0,
        stats.slowest.1
    );
    eprintln!(
        "  memory: VmHWM {} MiB (address space limited to {} MiB)",
        hwm >> 10,
        ADDRESS_SPACE_LIMIT >> 20
    );
    for f in stats.failures.iter().take(40) {
        eprintln!("  FAIL {f}");
    }
    if stats.failures.len() > 40 {
        eprintln!("  ... and {} more", stats.failures.len() - 40);
    }
    assert_eq!(stats.panics, 0, "the reader panicked");
    assert!(
        stats.failures.is_empty(),
        "{} damaged files were not refused as expected (first: {})",
        stats.failures.len(),
        stats.failures[0]
    );
    assert!(hwm <= MAX_HWM_KIB, "peak RSS {hwm} KiB");
    assert!(
        stats.slowest.0 < Duration::from_secs(10),
        "one damaged file took {:?}: {}",
        stats.slowest.0,
        stats.slowest.1
    );
}
