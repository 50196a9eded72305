//! Live save with real userfaultfd write protection and real memory (no KVM): writer threads
//! play the vCPUs and are blocked by the kernel exactly like vCPUs would be.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ram_saver::{
    live_save, AtomicFileSink, Compression, InjectPoint, RecordKind, SaveError, SaveOptions,
    SaveSummary, SnapshotHeader, SnapshotReader,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wp_tracker::{HostRange, WpTracker};

const PS: usize = 4096;
const MIB: usize = 1 << 20;

/// Guest layout: two regions, like low RAM and RAM above 4 GiB.
fn layout() -> Vec<(GuestAddress, usize)> {
    vec![
        (GuestAddress(0), 48 * MIB),
        (GuestAddress(1 << 32), 16 * MIB),
    ]
}

/// Guest page addresses, in order.
fn pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    mem.iter()
        .flat_map(|r| (0..r.len() / PS as u64).map(move |p| r.start_addr().0 + p * PS as u64))
        .collect()
}

/// Fill 3 of every 4 pages with recognisable data (version 0); the rest stay untouched.
fn fill(mem: &GuestMemoryMmap) {
    let mut page = vec![0u8; PS];
    for (i, gpa) in pages(mem).into_iter().enumerate() {
        if i % 4 == 3 {
            continue;
        }
        for (k, c) in page.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&(gpa ^ (k as u64) << 48).to_le_bytes());
        }
        mem.write_slice(&page, GuestAddress(gpa)).unwrap();
    }
}

/// Writer threads standing in for vCPUs, with a freeze point.
struct Writers {
    pause: AtomicBool,
    parked: AtomicUsize,
    quit: AtomicBool,
    steps: AtomicU64,
}

impl Writers {
    fn new() -> Self {
        Writers {
            pause: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            quit: AtomicBool::new(false),
            steps: AtomicU64::new(0),
        }
    }

    /// Writer `id` of `n`: writes pseudo-random pages of its share with rising versions.
    fn run(&self, mem: &GuestMemoryMmap, id: usize, n: usize) {
        let all = pages(mem);
        let mine: Vec<u64> = all.into_iter().skip(id).step_by(n).collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ id as u64;
        let mut version = 1u64;
        while !self.quit.load(Ordering::Acquire) {
            if self.pause.load(Ordering::Acquire) {
                self.parked.fetch_add(1, Ordering::AcqRel);
                while self.pause.load(Ordering::Acquire) && !self.quit.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                self.parked.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let gpa = mine[(x % mine.len() as u64) as usize];
            // A write to a protected page blocks here, in the kernel, until it is released.
            mem.write_obj(version, GuestAddress(gpa + 8)).unwrap();
            mem.write_obj(version, GuestAddress(gpa + PS as u64 - 8))
                .unwrap();
            version += 1;
            self.steps.fetch_add(1, Ordering::Relaxed);
            if version.is_multiple_of(64) {
                thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Stop every writer at a step boundary.
    fn freeze(&self, n: usize) {
        self.pause.store(true, Ordering::Release);
        while self.parked.load(Ordering::Acquire) != n {
            thread::yield_now();
        }
    }

    fn thaw(&self) {
        self.pause.store(false, Ordering::Release);
    }
}

fn host_ranges(mem: &GuestMemoryMmap) -> Vec<HostRange> {
    mem.iter()
        .map(|r| HostRange {
            start: mem.get_host_address(r.start_addr()).unwrap() as usize,
            len: r.len() as usize,
        })
        .collect()
}

fn tracker_for(mem: &GuestMemoryMmap) -> WpTracker {
    let t = WpTracker::new().expect("userfaultfd with write-protect is needed for these tests");
    // The tracker keeps a handle on `mem`, so the ranges stay mapped while registered.
    t.register_memory(mem).unwrap();
    t
}

/// Nothing is write-protected any more (pagemap), and a write to every page completes.
fn assert_released(mem: &GuestMemoryMmap, tracker: &WpTracker) {
    for r in host_ranges(mem) {
        let left = uffd_sys::pagemap::wp_protected_regions(r.start, r.len).unwrap();
        if !left.is_empty() {
            let _ = tracker.unprotect_all();
            panic!("pages still write-protected: {left:x?}");
        }
    }
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            for gpa in pages(mem) {
                let v: u64 = mem.read_obj(GuestAddress(gpa)).unwrap();
                mem.write_obj(v, GuestAddress(gpa)).unwrap();
            }
            let _ = tx.send(());
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = tracker.unprotect_all();
            panic!("a write blocked after the save");
        }
    });
}

struct Outcome {
    result: Result<SaveSummary, SaveError>,
    oracle: Vec<(u64, Vec<u8>)>,
    progress_calls: usize,
    writer_steps_during_save: u64,
}

/// Freeze, copy the oracle, protect, thaw, save with writers running, stop writers.
fn save_with_writers(
    mem: &GuestMemoryMmap,
    tracker: &WpTracker,
    sink: impl ram_saver::SnapshotSink,
    opts: &SaveOptions,
    cancel_after: Option<Duration>,
) -> Outcome {
    const N: usize = 2;
    let w = Writers::new();
    let cancel = AtomicBool::new(false);
    let progress_calls = AtomicUsize::new(0);
    thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|id| {
                s.spawn({
                    let w = &w;
                    move || w.run(mem, id, N)
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(50));
        // Freeze instant.
        w.freeze(N);
        let mut oracle = Vec::new();
        for gpa in pages(mem) {
            let mut p = vec![0u8; PS];
            mem.read_slice(&mut p, GuestAddress(gpa)).unwrap();
            oracle.push((gpa / PS as u64, p));
        }
        tracker.protect_all().unwrap();
        let steps_before = w.steps.load(Ordering::Relaxed);
        w.thaw();
        let cancel_thread = cancel_after.map(|d| {
            let c = &cancel;
            s.spawn(move || {
                thread::sleep(d);
                c.store(true, Ordering::Release);
            })
        });
        let header = SnapshotHeader::new(Vec::new(), N as u32, b"{}".to_vec());
        let result = live_save(
            mem,
            tracker,
            sink,
            header,
            b"state",
            opts,
            &|_p| {
                progress_calls.fetch_add(1, Ordering::Relaxed);
            },
            &cancel,
        );
        let writer_steps_during_save = w.steps.load(Ordering::Relaxed) - steps_before;
        if let Some(c) = cancel_thread {
            c.join().unwrap();
        }
        // Writers must still be running (not stuck behind a protected page).
        let before = w.steps.load(Ordering::Relaxed);
        let t = Instant::now();
        while w.steps.load(Ordering::Relaxed) == before && t.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(1));
        }
        let progressed = w.steps.load(Ordering::Relaxed) > before;
        if !progressed {
            let _ = tracker.unprotect_all();
        }
        w.quit.store(true, Ordering::Release);
        for h in handles {
            h.join().unwrap();
        }
        assert!(progressed, "writers stuck after the save");
        Outcome {
            result,
            oracle,
            progress_calls: progress_calls.load(Ordering::Relaxed),
            writer_steps_during_save,
        }
    })
}

/// Read a snapshot back and compare every page with the oracle.
fn check_snapshot(bytes: &[u8], oracle: &[(u64, Vec<u8>)]) {
    let mut rd = SnapshotReader::from_reader(Cursor::new(bytes)).unwrap();
    assert_eq!(rd.machine_state(), b"state");
    let rep = rd.verify(&mut |_| {}).unwrap();
    assert_eq!(rep.totals.pages, oracle.len() as u64);
    let want: HashMap<u64, &Vec<u8>> = oracle.iter().map(|(p, d)| (*p, d)).collect();
    let zero = vec![0u8; PS];
    let mut seen = 0;
    for r in rd.records() {
        let r = r.unwrap();
        for k in 0..r.page_count as usize {
            let page = r.first_page + k as u64;
            let got: &[u8] = match r.kind {
                RecordKind::ZeroRun => &zero,
                RecordKind::Data => &r.data[k * PS..(k + 1) * PS],
            };
            assert!(
                got == &want[&page][..],
                "page {page:#x} differs from the freeze instant"
            );
            seen += 1;
        }
    }
    assert_eq!(seen, oracle.len());
}

fn setup() -> GuestMemoryMmap {
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&layout()).unwrap();
    fill(&mem);
    mem
}

fn run_ok(opts: SaveOptions) -> SaveSummary {
    let mem = setup();
    let tracker = tracker_for(&mem);
    let mut file = Vec::new();
    let out = save_with_writers(&mem, &tracker, &mut file, &opts, None);
    let summary = out.result.expect("save failed");
    assert_released(&mem, &tracker);
    check_snapshot(&file, &out.oracle);
    assert_eq!(summary.file_bytes, file.len() as u64);
    assert_eq!(summary.pages_saved, out.oracle.len() as u64);
    let zero_oracle = out
        .oracle
        .iter()
        .filter(|(_, d)| d.iter().all(|&b| b == 0))
        .count();
    assert_eq!(summary.zero_pages, zero_oracle as u64);
    assert!(out.progress_calls >= 1);
    eprintln!(
        "{opts:?}: {summary:?} (writer steps during save: {})",
        out.writer_steps_during_save
    );
    summary
}

#[test]
fn live_save_raw_matches_freeze_instant() {
    run_ok(SaveOptions::default());
}

#[test]
fn live_save_zstd_matches_freeze_instant() {
    let s = run_ok(SaveOptions {
        compression: Compression::Zstd { level: 1 },
        ..Default::default()
    });
    assert!(s.image_size_ratio < 1.0, "ratio {}", s.image_size_ratio);
}

/// Staging prepared before the freeze is what the save uses (and it still matches the oracle);
/// prepared buffers of another size are left alone.
#[test]
fn live_save_with_prepared_staging() {
    let opts = SaveOptions {
        max_bandwidth: Some(48 * MIB as u64),
        ..Default::default()
    };
    let staging = ram_saver::Staging::prepare(&opts);
    let n0 = staging.buffers();
    assert!(n0 > 0);
    let s = run_ok(SaveOptions {
        staging: staging.clone(),
        ..opts.clone()
    });
    assert!(s.faults_served > 0, "no fault served");
    // The scan pool takes its share; the fault pool the rest when its unit is the whole block
    // (THP memory), else those stay unused.
    assert!(
        staging.buffers() < n0,
        "the save did not take the prepared buffers"
    );

    let other = ram_saver::Staging::prepare(&SaveOptions {
        block_size: 64 * 1024,
        ..opts.clone()
    });
    let n = other.buffers();
    run_ok(SaveOptions {
        staging: other.clone(),
        ..opts
    });
    assert_eq!(other.buffers(), n, "buffers of the wrong size were used");
}

#[test]
fn live_save_throttled_serves_faults() {
    let s = run_ok(SaveOptions {
        max_bandwidth: Some(48 * MIB as u64),
        ..Default::default()
    });
    assert!(s.faults_served > 0, "no fault served");
    assert!(s.fault_latency_max_us > 0);
}

#[test]
fn live_save_small_blocks_throttled() {
    let s = run_ok(SaveOptions {
        block_size: 64 * 1024,
        max_bandwidth: Some(64 * MIB as u64),
        compression: Compression::Zstd { level: 3 },
        workers: 3,
        ..Default::default()
    });
    assert!(s.faults_served > 0, "no fault served");
}

#[test]
fn live_save_single_page_blocks() {
    run_ok(SaveOptions {
        block_size: PS,
        max_bandwidth: Some(128 * MIB as u64),
        workers: 1,
        ..Default::default()
    });
}

fn tmp_dir(name: &str) -> std::path::PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("ram-saver-{name}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn live_save_to_file_atomically() {
    let mem = setup();
    let tracker = tracker_for(&mem);
    let dir = tmp_dir("file");
    let target = dir.join("vm.snap");
    let sink = AtomicFileSink::create(&target).unwrap();
    let opts = SaveOptions {
        compression: Compression::Zstd { level: 1 },
        ..Default::default()
    };
    let out = save_with_writers(&mem, &tracker, sink, &opts, None);
    out.result.unwrap();
    assert_released(&mem, &tracker);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("vm.snap")]);
    check_snapshot(&std::fs::read(&target).unwrap(), &out.oracle);
    // And load it back into fresh memory.
    let fresh: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&layout()).unwrap();
    SnapshotReader::open(&target)
        .unwrap()
        .load_into(&fresh, &mut |_| {})
        .unwrap();
    let mut p = vec![0u8; PS];
    for (page, d) in &out.oracle {
        fresh
            .read_slice(&mut p, GuestAddress(page * PS as u64))
            .unwrap();
        assert!(&p == d, "page {page:#x} not restored");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn run_failing(opts: SaveOptions, cancel_after: Option<Duration>) -> SaveError {
    let mem = setup();
    let tracker = tracker_for(&mem);
    let dir = tmp_dir("fail");
    let target = dir.join("vm.snap");
    let sink = AtomicFileSink::create(&target).unwrap();
    let t = Instant::now();
    let out = save_with_writers(&mem, &tracker, sink, &opts, cancel_after);
    let err = out.result.expect_err("save should fail");
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_released(&mem, &tracker);
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
    err
}

#[test]
fn injected_failures_release_everything() {
    let slow = Some(64 * MIB as u64);
    for (point, bw) in [
        (InjectPoint::ScannerPanic { after_blocks: 5 }, slow),
        (InjectPoint::FaultPanic, slow),
        (InjectPoint::WorkerPanic, None),
        (InjectPoint::WriteError { after_batches: 3 }, None),
    ] {
        let err = run_failing(
            SaveOptions {
                max_bandwidth: bw,
                inject_failure: Some(point),
                ..Default::default()
            },
            None,
        );
        match point {
            InjectPoint::WriteError { .. } => assert!(matches!(err, SaveError::Write(_)), "{err}"),
            _ => assert!(
                matches!(err, SaveError::ThreadPanicked(_)),
                "{point:?}: {err}"
            ),
        }
    }
}

#[test]
fn cancel_is_prompt_and_releases_everything() {
    let t = Instant::now();
    let err = run_failing(
        SaveOptions {
            max_bandwidth: Some(8 * MIB as u64),
            ..Default::default()
        },
        Some(Duration::from_millis(200)),
    );
    assert!(matches!(err, SaveError::Cancelled), "{err}");
    // 64 MiB at 8 MiB/s would take 8 s; cancel must cut it short.
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "cancel took {:?}",
        t.elapsed()
    );
}

/// Throughput of a 1 GiB save with no guest writes (run with `--release -- --ignored`).
#[test]
#[ignore = "benchmark"]
fn bench_save_1gib() {
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1024 * MIB)]).unwrap();
    fill(&mem);
    let tracker = tracker_for(&mem);
    for c in [
        Compression::None,
        Compression::Zstd { level: 1 },
        Compression::Zstd { level: 3 },
    ] {
        tracker.protect_all().unwrap();
        let opts = SaveOptions {
            compression: c,
            ..Default::default()
        };
        let header = SnapshotHeader::new(Vec::new(), 1, Vec::new());
        let sink = ram_saver::StreamSink::new(std::io::sink());
        let s = live_save(
            &mem,
            &tracker,
            sink,
            header,
            b"",
            &opts,
            &|_| {},
            &AtomicBool::new(false),
        )
        .unwrap();
        eprintln!(
            "{c:?}: {:.2} GB/s guest RAM, {:.3} s, image size ratio {:.3}",
            1.0 / s.duration_secs * (1u64 << 30) as f64 / 1e9,
            s.duration_secs,
            s.image_size_ratio
        );
    }
}

#[test]
fn live_save_whole_block_fault_unit() {
    let s = run_ok(SaveOptions {
        fault_block_size: Some(2 * MIB),
        max_bandwidth: Some(48 * MIB as u64),
        ..Default::default()
    });
    assert_eq!(s.fault_block_size, 2 * MIB);
    assert!(s.faults_served > 0, "no fault served");
}

#[test]
fn invalid_fault_block_is_refused() {
    let mem = setup();
    let tracker = tracker_for(&mem);
    tracker.protect_all().unwrap();
    for fb in [0, 3000, 3 * PS] {
        let opts = SaveOptions {
            fault_block_size: Some(fb),
            ..Default::default()
        };
        let header = SnapshotHeader::new(Vec::new(), 1, Vec::new());
        let r = live_save(
            &mem,
            &tracker,
            &mut Vec::new(),
            header,
            b"",
            &opts,
            &|_| {},
            &AtomicBool::new(false),
        );
        assert!(matches!(r, Err(SaveError::InvalidOptions(_))), "{fb}");
    }
    assert_released(&mem, &tracker);
}

/// AnonHugePages of the mapping holding `addr` (bytes), from /proc/self/smaps.
fn anon_huge_bytes(addr: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((s, e)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                inside = s <= addr && addr < e;
                continue;
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                return v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
                    << 10;
            }
        }
    }
    panic!("no mapping holds {addr:#x}");
}

/// Held by the THP tests: two THP-advised mappings made at once may be merged by the kernel into
/// one VMA, and AnonHugePages of "the" mapping would then count both.
static THP_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// 64 MiB of filled guest RAM advised for THP, with its host address and AnonHugePages, and the
/// THP test lock; `None` (the test says why) when the kernel backs less than `need` bytes with
/// huge pages.
fn filled_thp_memory(
    need: usize,
) -> Option<(
    std::sync::MutexGuard<'static, ()>,
    GuestMemoryMmap,
    usize,
    u64,
)> {
    let lock = THP_TESTS.lock().unwrap_or_else(|p| p.into_inner());
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * MIB)]).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    wp_tracker::advise_huge_pages(&mem, true).expect("madvise(MADV_HUGEPAGE)");
    fill(&mem);
    let before = anon_huge_bytes(host);
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        eprintln!(
            "skipped: transparent huge pages are off on this machine ({})",
            thp.trim()
        );
        return None;
    }
    // THP is on (always or madvise, and the mapping was advised): missing backing is a failure,
    // not a reason to skip.
    assert!(
        before >= need as u64,
        "only {before} bytes of THP backing for a MADV_HUGEPAGE mapping (THP: {})",
        thp.trim()
    );
    Some((lock, mem, host, before))
}

/// THP-backed guest RAM, written by faulting writers during the save, is still backed by huge
/// pages afterwards: with 4 KiB fault pieces (not the default on THP memory) faults split huge
/// pages, and the saver collapses them back.
#[test]
fn live_save_keeps_thp_memory_huge() {
    let Some((_lock, mem, host, before)) = filled_thp_memory(32 * MIB) else {
        return;
    };
    let tracker = tracker_for(&mem);
    let mut file = Vec::new();
    let opts = SaveOptions {
        max_bandwidth: Some(32 * MIB as u64),
        fault_block_size: Some(PS),
        ..Default::default()
    };
    let out = save_with_writers(&mem, &tracker, &mut file, &opts, None);
    let s = out.result.expect("save failed");
    assert_released(&mem, &tracker);
    check_snapshot(&file, &out.oracle);
    assert!(s.faults_served > 0, "no fault served");
    assert_eq!(s.fault_block_size, PS);
    let after = anon_huge_bytes(host);
    eprintln!(
        "AnonHugePages {before} -> {after}, {} faults, {} huge pages restored in {:.3} s",
        s.faults_served, s.huge_pages_restored, s.huge_restore_secs
    );
    assert!(
        after * 10 >= before * 9,
        "huge pages collapsed: AnonHugePages {before} -> {after}"
    );
}

/// On THP-backed guest RAM the default fault unit is the whole 2 MiB unit: faults copy and
/// release whole huge pages, nothing is split, nothing needs collapsing.
#[test]
fn live_save_default_fault_unit_on_thp_is_the_huge_page() {
    let Some((_lock, mem, host, before)) = filled_thp_memory(48 * MIB) else {
        return;
    };
    let tracker = tracker_for(&mem);
    let mut file = Vec::new();
    let opts = SaveOptions {
        max_bandwidth: Some(32 * MIB as u64),
        ..Default::default()
    };
    let out = save_with_writers(&mem, &tracker, &mut file, &opts, None);
    let s = out.result.expect("save failed");
    assert_released(&mem, &tracker);
    check_snapshot(&file, &out.oracle);
    assert!(s.faults_served > 0, "no fault served");
    assert_eq!(s.fault_block_size, 2 * MIB);
    assert_eq!(s.huge_pages_restored, 0);
    let after = anon_huge_bytes(host);
    assert!(
        after * 10 >= before * 9,
        "huge pages split: AnonHugePages {before} -> {after}"
    );
}
