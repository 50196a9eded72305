//! Live save with real userfaultfd write protection and real memory (no KVM): writer threads
//! play the vCPUs and are blocked by the kernel exactly like vCPUs would be.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::Cursor;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ram_saver::{
    live_save, AtomicFileSink, Compression, InjectPoint, RecordKind, SaveError, SaveOptions,
    SaveSummary, SnapshotHeader, SnapshotReader,
};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};
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
    let filled: Vec<u64> = pages(mem)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 4 != 3)
        .map(|(_, gpa)| gpa)
        .collect();
    fill_pages(mem, &filled);
}

/// Write recognisable data (version 0) to the pages at `gpas`.
fn fill_pages(mem: &GuestMemoryMmap, gpas: &[u64]) {
    let mut page = vec![0u8; PS];
    for &gpa in gpas {
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

    /// Writer `id` of `n`: writes pseudo-random pages of its share of `targets` with rising
    /// versions.
    fn run(&self, mem: &GuestMemoryMmap, targets: &[u64], id: usize, n: usize) {
        let mine: Vec<u64> = targets.iter().copied().skip(id).step_by(n).collect();
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
    assert_released_on(mem, tracker, &pages(mem));
}

/// Nothing is write-protected any more (pagemap), and a write to each of `gpas` completes.
fn assert_released_on(mem: &GuestMemoryMmap, tracker: &WpTracker, gpas: &[u64]) {
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
            for &gpa in gpas {
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

/// Guest memory at the freeze instant.
struct Oracle {
    /// Guest pages.
    pages: usize,
    /// Contents of the pages that are not all zeros, by page number.
    data: HashMap<u64, Vec<u8>>,
}

/// How the oracle reads guest memory.
#[derive(Clone, Copy)]
enum OracleSource<'a> {
    /// Every page through the mapping.
    Mapping,
    /// Through the mapping, only pages the page tables have: a page never faulted in reads as
    /// zeros (reading it would map the shared zero page there).
    PopulatedPages,
    /// Through this memfd holding all of guest memory, with `pread`, which reads holes as
    /// zeros without allocating them (unlike reading them through a shared mapping).
    File(&'a File),
}

impl Oracle {
    fn read(mem: &GuestMemoryMmap, source: OracleSource<'_>) -> Oracle {
        let populated: Vec<(usize, usize)> = match source {
            OracleSource::PopulatedPages => host_ranges(mem)
                .iter()
                .flat_map(|r| uffd_sys::pagemap::present_regions(r.start, r.len).unwrap())
                .map(|r| (r.start, r.end))
                .collect(),
            _ => Vec::new(),
        };
        let mut data = HashMap::new();
        let mut p = vec![0u8; PS];
        let all = pages(mem);
        for &gpa in &all {
            match source {
                OracleSource::Mapping => mem.read_slice(&mut p, GuestAddress(gpa)).unwrap(),
                OracleSource::File(f) => f.read_exact_at(&mut p, file_offset(mem, gpa)).unwrap(),
                OracleSource::PopulatedPages => {
                    let host = mem.get_host_address(GuestAddress(gpa)).unwrap() as usize;
                    if !populated.iter().any(|&(s, e)| (s..e).contains(&host)) {
                        continue;
                    }
                    mem.read_slice(&mut p, GuestAddress(gpa)).unwrap()
                }
            }
            if p.iter().any(|&b| b != 0) {
                data.insert(gpa / PS as u64, p.clone());
            }
        }
        Oracle {
            pages: all.len(),
            data,
        }
    }

    fn zero_pages(&self) -> u64 {
        (self.pages - self.data.len()) as u64
    }
}

/// Offset of `gpa` in the file backing its region.
fn file_offset(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
    let r = mem.find_region(GuestAddress(gpa)).unwrap();
    r.file_offset().unwrap().start() + (gpa - r.start_addr().0)
}

struct Outcome {
    result: Result<SaveSummary, SaveError>,
    oracle: Oracle,
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
    save_with_writers_on(
        mem,
        tracker,
        sink,
        opts,
        cancel_after,
        &pages(mem),
        OracleSource::Mapping,
    )
}

/// [`save_with_writers`] with writers on `targets` only and the oracle read from `source`.
fn save_with_writers_on(
    mem: &GuestMemoryMmap,
    tracker: &WpTracker,
    sink: impl ram_saver::SnapshotSink,
    opts: &SaveOptions,
    cancel_after: Option<Duration>,
    targets: &[u64],
    source: OracleSource<'_>,
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
                    move || w.run(mem, targets, id, N)
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(50));
        // Freeze instant.
        w.freeze(N);
        let oracle = Oracle::read(mem, source);
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
fn check_snapshot(bytes: &[u8], oracle: &Oracle) {
    let mut rd = SnapshotReader::from_reader(Cursor::new(bytes)).unwrap();
    assert_eq!(rd.machine_state(), b"state");
    let rep = rd.verify(&mut |_| {}).unwrap();
    assert_eq!(rep.totals.pages, oracle.pages as u64);
    let zero = vec![0u8; PS];
    let mut seen = HashMap::new();
    for r in rd.records() {
        let r = r.unwrap();
        for k in 0..r.page_count as usize {
            let page = r.first_page + k as u64;
            let got: &[u8] = match r.kind {
                RecordKind::ZeroRun => &zero,
                RecordKind::Data => &r.data[k * PS..(k + 1) * PS],
                RecordKind::Parent => panic!("parent record in a save without a parent"),
            };
            let want = oracle.data.get(&page).map_or(&zero[..], |d| &d[..]);
            assert!(
                got == want,
                "page {page:#x} differs from the freeze instant"
            );
            assert!(
                seen.insert(page, ()).is_none(),
                "page {page:#x} saved twice"
            );
        }
    }
    assert_eq!(seen.len(), oracle.pages);
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
    assert_eq!(summary.pages_saved, out.oracle.pages as u64);
    assert_eq!(summary.zero_pages, out.oracle.zero_pages());
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

/// Fault staging prepared in any amount before the freeze goes to the fault pool, is reported,
/// and the image still matches the oracle.
#[test]
fn live_save_with_prepared_fault_staging_reports_it() {
    let opts = SaveOptions {
        max_bandwidth: Some(48 * MIB as u64),
        // Fault unit = scan unit: prepared buffers fit the fault pool whatever backs the memory.
        fault_block_size: Some(2 * MIB),
        max_staging: Some(32 * MIB),
        ..Default::default()
    };
    let staging = ram_saver::Staging::prepare_fault(&opts, 24 * MIB);
    assert_eq!(staging.fault_bytes(), 24 * MIB as u64);
    // More than the usual 16 MiB: fault buffers only (the scan pool allocates on demand, so what
    // is prepared stays within the cap); the usual preparation has the scan pool's too.
    assert_eq!(staging.buffers(), 12);
    assert!(ram_saver::Staging::prepare(&opts).buffers() > 8);
    // Less than the 16 MiB every save prepares is rounded up to it.
    assert_eq!(
        ram_saver::Staging::prepare_fault(&opts, 0).fault_bytes(),
        16 * MIB as u64
    );
    let s = run_ok(SaveOptions {
        staging,
        ..opts.clone()
    });
    assert_eq!(s.staging.prepared_bytes, 24 * MIB as u64);
    assert!(s.staging.prepare_ms > 0.0);
    assert!(s.staging.peak_bytes >= 24 * MIB as u64, "{:?}", s.staging);
    // More than the cap (32 MiB of the 64 MiB guest): the pool keeps only what its cap allows.
    let s = run_ok(SaveOptions {
        staging: ram_saver::Staging::prepare_fault(&opts, 48 * MIB),
        ..opts
    });
    assert_eq!(s.staging.prepared_bytes, 32 * MIB as u64);
    assert_eq!(s.staging.probe_units, 0, "no probe was asked for");
}

/// Staging asked to be sized by a probe grows to what the probe reports (the usual preparation's
/// scan buffers counted as fault staging), only once, and the save reports the probe.
#[test]
fn staging_grown_after_a_probe_is_used_and_reported() {
    let opts = SaveOptions {
        max_bandwidth: Some(48 * MIB as u64),
        fault_block_size: Some(2 * MIB),
        max_staging: Some(32 * MIB),
        ..Default::default()
    };
    let staging = ram_saver::Staging::prepare(&opts).size_by_probe(32 * MIB);
    assert_eq!(staging.probe_cap(), Some(32 * MIB));
    // A probe that saw few units leaves the usual preparation as it is.
    let few = ram_saver::Staging::prepare(&opts).size_by_probe(32 * MIB);
    let n = few.buffers();
    few.grow_fault(&opts, 4 * MIB, 2, Duration::from_millis(50));
    assert_eq!((few.buffers(), few.fault_bytes()), (n, 16 * MIB as u64));
    assert_eq!(few.probe_cap(), None, "a probe was recorded");

    staging.grow_fault(&opts, 28 * MIB, 14, Duration::from_millis(7));
    assert_eq!(staging.fault_bytes(), 28 * MIB as u64);
    assert_eq!(staging.buffers(), 14);
    assert_eq!(staging.probe_cap(), None);
    let s = run_ok(SaveOptions {
        staging,
        ..opts.clone()
    });
    assert_eq!(s.staging.prepared_bytes, 28 * MIB as u64);
    assert_eq!(s.staging.probe_units, 14);
    assert!((s.staging.probe_ms - 7.0).abs() < 1e-6, "{:?}", s.staging);
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

/// The records the fault path wrote, and only those, are hot in the index: writers dirty one
/// page in each of eight fault blocks at the end of guest memory, which a throttled scan reaches
/// long after the first write to each (so every one of those blocks faults, and nothing else is
/// written). Raw and zstd (records in pieces).
#[test]
fn hot_records_are_exactly_those_the_fault_path_wrote() {
    for compression in [Compression::None, Compression::Zstd { level: 1 }] {
        let mem = setup();
        let tracker = tracker_for(&mem);
        let region2 = 1u64 << 32;
        let targets: Vec<u64> = (0..8u64)
            .map(|k| region2 + k * 2 * MIB as u64 + (k + 1) * PS as u64)
            .collect();
        let opts = SaveOptions {
            max_bandwidth: Some(64 * MIB as u64),
            compression,
            ..Default::default()
        };
        let mut file = Vec::new();
        let out = save_with_writers_on(
            &mem,
            &tracker,
            &mut file,
            &opts,
            None,
            &targets,
            OracleSource::Mapping,
        );
        let summary = out.result.expect("save failed");
        assert_released(&mem, &tracker);
        check_snapshot(&file, &out.oracle);
        let block = summary.fault_block_size as u64;
        let mut want: Vec<u64> = targets.iter().map(|g| g / block * block).collect();
        want.dedup();
        assert_eq!(summary.faults_served, want.len() as u64, "{summary:?}");
        let rd = SnapshotReader::from_reader(Cursor::new(&file)).unwrap();
        // Every hot record lies in one of those blocks; together they cover each exactly.
        let mut hot_pages: HashMap<u64, u64> = HashMap::new();
        for e in rd.trailer().index.iter() {
            let gpa = e.first_page * PS as u64;
            let end = gpa + u64::from(e.page_count) * PS as u64;
            let b = gpa / block * block;
            let in_target_block = want.contains(&b) && end <= b + block;
            assert_eq!(
                e.hot, in_target_block,
                "{compression:?}: record at {gpa:#x}..{end:#x} (hot {}), blocks {want:x?}",
                e.hot
            );
            if e.hot {
                *hot_pages.entry(b).or_default() += u64::from(e.page_count);
            }
        }
        assert_eq!(hot_pages.len(), want.len(), "{compression:?}");
        assert!(hot_pages.values().all(|&n| n == block / PS as u64));
        let hot = rd.hot_totals();
        assert_eq!(hot.pages, want.len() as u64 * block / PS as u64);
        eprintln!(
            "{compression:?}: fault block {} KiB, {} hot records ({} pages, {} stored bytes) of {}",
            block >> 10,
            hot.records,
            hot.pages,
            hot.stored_bytes,
            rd.trailer().totals.records
        );
    }
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
    let zero = vec![0u8; PS];
    for gpa in pages(&fresh) {
        fresh.read_slice(&mut p, GuestAddress(gpa)).unwrap();
        let want = out.oracle.data.get(&(gpa / PS as u64)).unwrap_or(&zero);
        assert!(&p == want, "page {gpa:#x} not restored");
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

/// Pages a sparse guest touched: all of every `every`-th 2 MiB unit, and one page of each unit
/// three after those.
fn sparse_pages(mem: &GuestMemoryMmap, every: usize) -> Vec<u64> {
    let unit_pages = 2 * MIB / PS;
    pages(mem)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| {
            let u = i / unit_pages;
            u.is_multiple_of(every) || (u % every == 3 && i % unit_pages == 17)
        })
        .map(|(_, gpa)| gpa)
        .collect()
}

/// Guest RAM on a new memfd (`hugetlb`: on hugetlbfs), each region mapped shared at its own
/// file offset, as vmm-core's memfd and hugetlbfs backends do; and the memfd.
fn file_memory(layout: &[(GuestAddress, usize)], hugetlb: bool) -> (GuestMemoryMmap, File) {
    use nix::libc;
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let mut flags = MFdFlags::MFD_CLOEXEC;
    if hugetlb {
        flags |= MFdFlags::MFD_HUGETLB;
    }
    let file = File::from(memfd_create(c"ram-saver-test", flags).expect("memfd_create"));
    file.set_len(layout.iter().map(|r| r.1 as u64).sum())
        .unwrap();
    let mut off = 0;
    let regions = layout
        .iter()
        .map(|&(gpa, len)| {
            let region = MmapRegionBuilder::new(len)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .with_file_offset(FileOffset::new(file.try_clone().unwrap(), off))
                .with_hugetlbfs(hugetlb)
                .build()
                .expect("mmap memfd");
            off += len as u64;
            GuestRegionMmap::new(region, gpa).unwrap()
        })
        .collect();
    (GuestMemoryMmap::from_regions(regions).unwrap(), file)
}

/// Bytes allocated to `file` (shmem and hugetlbfs: its page cache).
fn allocated_bytes(file: &File) -> u64 {
    file.metadata().unwrap().blocks() * 512
}

/// RssShmem of this process in bytes (/proc/self/status).
fn rss_shmem() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .expect("RssShmem in /proc/self/status");
    kb.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap()
        << 10
}

/// memfd guest RAM, mostly never touched, saved while writers rewrite the touched pages: the
/// image is the freeze instant, and the save allocates no page of the memfd (reading a hole
/// through a shared mapping would: before, the memfd grew to the whole guest). With the default
/// 4 KiB fault unit, and with whole 2 MiB units, where a fault copies the holes around the
/// written page too.
#[test]
fn live_save_memfd_matches_freeze_instant_without_allocating_holes() {
    let layout = [
        (GuestAddress(0), 192 * MIB),
        (GuestAddress(1 << 32), 64 * MIB),
    ];
    let guest: usize = layout.iter().map(|r| r.1).sum();
    for fault_block in [None, Some(2 * MIB)] {
        let (mem, file) = file_memory(&layout, false);
        let touched = sparse_pages(&mem, 8);
        fill_pages(&mem, &touched);
        let tracker = tracker_for(&mem);
        let (before, rss_before) = (allocated_bytes(&file), rss_shmem());
        let mut image = Vec::new();
        let opts = SaveOptions {
            max_bandwidth: Some(48 * MIB as u64),
            fault_block_size: fault_block,
            ..Default::default()
        };
        let out = save_with_writers_on(
            &mem,
            &tracker,
            &mut image,
            &opts,
            None,
            &touched,
            OracleSource::File(&file),
        );
        let s = out.result.expect("save failed");
        let (after, rss_after) = (allocated_bytes(&file), rss_shmem());
        eprintln!(
            "memfd {} MiB guest, {} pages touched, fault unit {} KiB: memfd allocated {} -> {} \
             KiB, process RssShmem {} -> {} KiB; {s:?}",
            guest / MIB,
            touched.len(),
            s.fault_block_size >> 10,
            before >> 10,
            after >> 10,
            rss_before >> 10,
            rss_after >> 10
        );
        check_snapshot(&image, &out.oracle);
        assert_eq!(s.zero_pages, out.oracle.zero_pages());
        assert!(s.faults_served > 0, "no fault served");
        assert_eq!(
            after,
            before,
            "the save allocated {} KiB of never-touched memfd pages (guest {} KiB, fault unit \
             {} KiB)",
            (after - before) >> 10,
            guest >> 10,
            s.fault_block_size >> 10
        );
        assert_released_on(&mem, &tracker, &touched);
    }
}

/// Fully populated guest RAM saved with writers on every page, checked against the freeze
/// instant; the save's duration in seconds.
fn populated_save(mem: &GuestMemoryMmap, source: OracleSource<'_>) -> f64 {
    let all = pages(mem);
    fill_pages(mem, &all);
    let tracker = tracker_for(mem);
    let mut image = Vec::new();
    let opts = SaveOptions::default();
    let out = save_with_writers_on(mem, &tracker, &mut image, &opts, None, &all, source);
    let s = out.result.expect("save failed");
    check_snapshot(&image, &out.oracle);
    assert_released(mem, &tracker);
    s.duration_secs
}

/// Fully populated memfd guest RAM saves about as fast as anonymous memory: looking for holes
/// costs next to nothing (asking SEEK_HOLE per unit walked the page cache to the end of the
/// file under the inode lock: with writers faulting, 512 MiB took 40 s instead of 0.3 s).
#[test]
fn live_save_populated_memfd_is_not_slowed_by_hole_checks() {
    const SIZE: usize = 256 * MIB;
    let anon: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), SIZE)]).unwrap();
    let anon_secs = populated_save(&anon, OracleSource::Mapping);
    drop(anon);
    let (mem, file) = file_memory(&[(GuestAddress(0), SIZE)], false);
    let memfd_secs = populated_save(&mem, OracleSource::File(&file));
    eprintln!("populated 256 MiB: anon {anon_secs:.3} s, memfd {memfd_secs:.3} s");
    assert!(
        memfd_secs < anon_secs * 5.0 + 3.0,
        "saving populated memfd memory took {memfd_secs:.1} s, anonymous {anon_secs:.1} s"
    );
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const HUGEPAGES_DIR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

fn read_count(path: &str) -> usize {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    s.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}: {s:?}"))
}

/// The 2 MiB huge page pool, sized so that exactly `available` pages are free for this test
/// (free and not reserved by other mappings), held exclusively across processes (wp-tracker's
/// tests lock the same file); the old vm.nr_hugepages comes back on drop. Panics with the
/// reason when that cannot be had: the test fails rather than pass without huge pages.
struct HugePagePool {
    old: usize,
    _lock: nix::fcntl::Flock<File>,
}

impl HugePagePool {
    fn reserve(available: usize) -> HugePagePool {
        let path = std::env::temp_dir().join("snapctl-test-hugepages.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("flock {}: {e}", path.display()));
        let old = read_count(NR_HUGEPAGES);
        let pool = HugePagePool { old, _lock: lock };
        let free = read_count(&format!("{HUGEPAGES_DIR}/free_hugepages"));
        let resv = read_count(&format!("{HUGEPAGES_DIR}/resv_hugepages"));
        let want = old.saturating_sub(free - resv) + available;
        if let Err(e) = std::fs::write(NR_HUGEPAGES, want.to_string()) {
            panic!("cannot set vm.nr_hugepages to {want} (needs root): {e}");
        }
        assert_eq!(
            Self::available(),
            available,
            "vm.nr_hugepages set to {want}, but not {available} huge pages available \
             (memory too fragmented?)"
        );
        pool
    }

    /// Free huge pages not reserved by any mapping.
    fn available() -> usize {
        read_count(&format!("{HUGEPAGES_DIR}/free_hugepages"))
            - read_count(&format!("{HUGEPAGES_DIR}/resv_hugepages"))
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.old.to_string());
    }
}

/// hugetlbfs guest RAM, mostly never touched, with a huge page pool that holds the touched
/// pages and only a few more: reading the never-touched pages would need huge pages the pool
/// does not have (SIGBUS; before, the save died of it). The save succeeds, matches the freeze
/// instant, and takes no huge page from the pool.
#[test]
fn live_save_hugetlbfs_matches_freeze_instant_with_a_small_pool() {
    const SPARE: usize = 3;
    let layout = [
        (GuestAddress(0), 48 * MIB),
        (GuestAddress(1 << 32), 16 * MIB),
    ];
    // Huge pages 0, 8, 16 (low RAM) and 24 (high RAM) whole, 3, 11, 19 and 27 one page each.
    let units: std::collections::HashSet<usize> = [0, 3, 8, 11, 16, 19, 24, 27].into();
    let _pool = HugePagePool::reserve(units.len() + SPARE);
    let (mem, file) = file_memory(&layout, true);
    let touched = sparse_pages(&mem, 8);
    assert!(touched
        .iter()
        .all(|gpa| units.contains(&((file_offset(&mem, *gpa) >> 21) as usize))));
    fill_pages(&mem, &touched);
    assert_eq!(HugePagePool::available(), SPARE);
    let tracker = tracker_for(&mem);
    let mut image = Vec::new();
    let opts = SaveOptions {
        max_bandwidth: Some(32 * MIB as u64),
        ..Default::default()
    };
    let out = save_with_writers_on(
        &mem,
        &tracker,
        &mut image,
        &opts,
        None,
        &touched,
        OracleSource::File(&file),
    );
    let s = out.result.expect("save failed");
    let left = HugePagePool::available();
    eprintln!(
        "hugetlbfs 64 MiB guest, {} huge pages touched, {SPARE} spare, {left} left after the \
         save; {s:?}",
        units.len()
    );
    check_snapshot(&image, &out.oracle);
    assert_eq!(s.zero_pages, out.oracle.zero_pages());
    assert_eq!(s.fault_block_size, 2 * MIB);
    assert!(s.faults_served > 0, "no fault served");
    assert_eq!(left, SPARE, "the save took huge pages from the pool");
    assert_released_on(&mem, &tracker, &touched);
}

/// Anonymous guest RAM: 2 MiB units never touched are stored as zero runs without being read.
/// Protection puts uffd-wp markers there, which pagemap shows as swapped; before, the scanner
/// copied those units, mapping the shared zero page all over them.
#[test]
fn live_save_does_not_read_never_touched_anonymous_units() {
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&layout()).unwrap();
    let touched = sparse_pages(&mem, 4);
    fill_pages(&mem, &touched);
    let tracker = tracker_for(&mem);
    assert!(tracker.is_wp_unpopulated(), "{}", tracker.features());
    let mut image = Vec::new();
    let opts = SaveOptions {
        max_bandwidth: Some(48 * MIB as u64),
        ..Default::default()
    };
    let out = save_with_writers_on(
        &mem,
        &tracker,
        &mut image,
        &opts,
        None,
        &touched,
        OracleSource::PopulatedPages,
    );
    let s = out.result.expect("save failed");
    check_snapshot(&image, &out.oracle);
    assert!(s.faults_served > 0, "no fault served");
    // Units with data are copied whole; only never-touched units must stay unread.
    let unit_of = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as usize >> 21;
    let touched_units: std::collections::HashSet<usize> =
        touched.iter().map(|&g| unit_of(g)).collect();
    let q = uffd_sys::pagemap::ScanQuery {
        required: uffd_sys::PAGE_IS_PFNZERO,
        return_mask: uffd_sys::PAGE_IS_PFNZERO,
        ..Default::default()
    };
    let zero_mapped: usize = host_ranges(&mem)
        .iter()
        .flat_map(|r| uffd_sys::pagemap::scan(r.start, r.len, q).unwrap())
        .flat_map(|r| (r.start..r.end).step_by(PS))
        .filter(|&host| !touched_units.contains(&(host >> 21)))
        .count();
    assert_eq!(
        zero_mapped, 0,
        "the save read {zero_mapped} pages of never-touched units (now mapped to the zero page)"
    );
    assert_released(&mem, &tracker);
}

/// A fault staging cap far below what the writers dirty, with slow compression behind it: faults
/// reach the cap and wait for the workers, and the image is still exactly the freeze instant.
#[test]
fn small_staging_cap_is_reached_and_the_image_is_exact() {
    let s = run_ok(SaveOptions {
        // Below the smallest pool: the pool's floor (a few buffers) is the cap.
        max_staging: Some(PS),
        compression: Compression::Zstd { level: 19 },
        max_bandwidth: Some(16 * MIB as u64),
        workers: 1,
        ..Default::default()
    });
    assert!(s.faults_served > 0, "no fault served");
    assert!(s.staging.cap_reached, "{:?}", s.staging);
    assert!(s.staging.waits > 0, "{:?}", s.staging);
    assert_eq!(s.staging.waits, s.fault_buffer_waits);
    assert!(
        s.staging.cap_bytes < MIB as u64,
        "cap {} for a {PS}-byte max_staging",
        s.staging.cap_bytes
    );
    assert_eq!(s.fault_phases.faults, s.faults_served);
}

/// The default cap (half of the host's available memory, at most guest RAM) holds every page the
/// writers dirty here: no fault waits for staging, and the figures say so.
#[test]
fn default_staging_cap_fits_the_written_set_without_waits() {
    let guest: u64 = layout().iter().map(|&(_, len)| len as u64).sum();
    let avail = ram_saver::host_available_memory().expect("MemAvailable in /proc/meminfo");
    assert!(
        avail / 2 > guest,
        "the host has too little memory for this test"
    );
    assert_eq!(
        ram_saver::default_max_staging(guest as usize),
        guest as usize
    );
    let s = run_ok(SaveOptions {
        max_bandwidth: Some(32 * MIB as u64),
        ..Default::default()
    });
    assert!(s.faults_served > 0, "no fault served");
    assert_eq!(s.staging.cap_bytes, guest, "{:?}", s.staging);
    assert!(!s.staging.cap_reached, "{:?}", s.staging);
    assert_eq!(s.staging.waits, 0);
    assert_eq!(s.staging.wait_total_us, 0);
    assert!(s.staging.peak_bytes > 0);
    // Every served fault went through each measured phase.
    let p = s.fault_phases;
    assert_eq!(p.faults, s.faults_served);
    assert!(p.batches > 0 && p.batches <= p.faults, "{p:?}");
    assert!(s.fault_latency_total_us >= s.fault_latency_max_us);
}

/// Zero is refused before anything is touched.
#[test]
fn zero_staging_cap_is_refused() {
    let mem = setup();
    let tracker = tracker_for(&mem);
    let header = SnapshotHeader::new(Vec::new(), 1, b"{}".to_vec());
    tracker.protect_all().unwrap();
    let e = live_save(
        &mem,
        &tracker,
        &mut Vec::<u8>::new(),
        header,
        b"state",
        &SaveOptions {
            max_staging: Some(0),
            ..Default::default()
        },
        &|_| {},
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(matches!(e, SaveError::InvalidOptions(_)), "{e}");
    assert_released(&mem, &tracker);
}

/// On THP memory (fault unit = scan unit) the scanner stages in fault staging while the writers
/// fault, copying and releasing without waiting for the workers: the image is still exactly the
/// freeze instant, each page once. The writers write the upper half only, so the scanner finds the
/// lower half still protected while they fault (a race it wins within a few saves at most: up to
/// 20 run until one shows it; every one is exact).
#[test]
fn scanner_staging_beside_faults_keeps_the_image_exact() {
    let Some((_lock, mem, _host, _before)) = filled_thp_memory(32 * MIB) else {
        return;
    };
    let tracker = tracker_for(&mem);
    let all = pages(&mem);
    let upper = &all[all.len() / 2..];
    let mut staged = Vec::new();
    for _ in 0..20 {
        let mut file = Vec::new();
        let out = save_with_writers_on(
            &mem,
            &tracker,
            &mut file,
            &SaveOptions::default(),
            None,
            upper,
            OracleSource::Mapping,
        );
        let s = out.result.expect("save failed");
        assert_released(&mem, &tracker);
        check_snapshot(&file, &out.oracle);
        assert_eq!(s.fault_block_size, 2 * MIB);
        assert!(s.staging.peak_bytes <= s.staging.cap_bytes + 32 * MIB as u64);
        // Units the scanner stages beside the faults are not hot: only what the fault path
        // copied is (every page of this memory holds data, so a served unit is a whole one).
        let hot = SnapshotReader::from_reader(Cursor::new(&file))
            .unwrap()
            .hot_totals();
        assert_eq!(
            hot.pages,
            s.faults_served * (2 * MIB / PS) as u64,
            "hot pages against faults served ({} units staged by the scanner)",
            s.staging.scan_units_staged
        );
        staged.push(s.staging.scan_units_staged);
        if s.staging.scan_units_staged > 0 {
            break;
        }
    }
    eprintln!("units the scanner staged, save by save: {staged:?}");
    assert!(
        staged.iter().any(|&n| n > 0),
        "the scanner never staged beside the faults: {staged:?}"
    );
}
