//! Live save benchmark with writer threads standing in for vCPUs.
//!
//! `cargo run --release -p ram-saver --example save_bench [-- OPTIONS]`
//!
//! Maps anonymous guest memory (THP: MADV_HUGEPAGE, and/or 4 KiB pages: MADV_NOHUGEPAGE), fills
//! it, registers it with a [`WpTracker`], runs writer threads at full speed writing random pages
//! (they block on write-protect faults exactly like vCPUs), freezes them, protects everything,
//! thaws them and runs [`live_save`]. Prints duration, GB/s, fault latency, faults served, writer
//! throughput before / during / after the save, writer stalls, and AnonHugePages of the mapping
//! before and after.
//!
//! Each writer step rewrites one whole random page of its share, like the built-in guest's
//! write sequence (`--word-writes`: one u64 per step instead; "writes/s" counts steps).
//!
//! Options: `--size-mib N` (1024), `--mem thp|4k|both` (both), `--writers N` (1),
//! `--block-kib K` (save default), `--fault-block-kib K` (save default), `--spin` /
//! `--no-spin`, `--no-collapse`, `--out file|null|both` (both), `--zstd LEVEL` (raw), `--repeat N` (1),
//! `--fill random|pattern|text` (random: incompressible like the built-in guest; text: compresses
//! about 3:1), `--workers N` (save default), `--path FILE` (target/save_bench.snap; same disk as
//! the product's snapshots, not tmpfs).
//!
//! Also prints the guest rate during the save relative to before, and the extra RSS of the
//! process during the save (peak minus before, sampled every 5 ms: staging, queues, buffers).

#![forbid(unsafe_code)]

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ram_saver::{
    live_save, AtomicFileSink, Compression, SaveOptions, SaveSummary, SnapshotHeader, StreamSink,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};
use wp_tracker::WpTracker;

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;

#[derive(Debug, Clone)]
struct Args {
    size: usize,
    mems: Vec<bool>,
    writers: usize,
    block: Option<usize>,
    fault_block: Option<usize>,
    spin: Option<bool>,
    outs: Vec<bool>,
    compression: Compression,
    repeat: usize,
    collapse: bool,
    fill: Fill,
    word_writes: bool,
    limits: bool,
    workers: Option<usize>,
    fault_staging: Option<usize>,
    path: std::path::PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Random,
    Pattern,
    Text,
}

fn parse_args() -> Args {
    let mut a = Args {
        size: 1024 << 20,
        mems: vec![true, false],
        writers: 1,
        block: None,
        fault_block: None,
        spin: None,
        outs: vec![false, true],
        compression: Compression::None,
        repeat: 1,
        collapse: true,
        fill: Fill::Random,
        word_writes: false,
        limits: false,
        workers: None,
        fault_staging: None,
        path: std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/save_bench.snap"
        )),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--size-mib" => a.size = val().parse::<usize>().unwrap() << 20,
            "--mem" => {
                a.mems = match val().as_str() {
                    "thp" => vec![true],
                    "4k" => vec![false],
                    _ => vec![true, false],
                }
            }
            "--writers" => a.writers = val().parse().unwrap(),
            "--block-kib" => a.block = Some(val().parse::<usize>().unwrap() << 10),
            "--fault-block-kib" => a.fault_block = Some(val().parse::<usize>().unwrap() << 10),
            "--spin" => a.spin = Some(true),
            "--no-collapse" => a.collapse = false,
            "--no-spin" => a.spin = Some(false),
            "--out" => {
                a.outs = match val().as_str() {
                    "file" => vec![true],
                    "null" => vec![false],
                    _ => vec![false, true],
                }
            }
            "--zstd" => {
                a.compression = Compression::Zstd {
                    level: val().parse().unwrap(),
                }
            }
            "--repeat" => a.repeat = val().parse().unwrap(),
            "--limits" => a.limits = true,
            "--word-writes" => a.word_writes = true,
            "--workers" => a.workers = Some(val().parse().unwrap()),
            "--fault-staging-mib" => a.fault_staging = Some(val().parse::<usize>().unwrap() << 20),
            "--path" => a.path = val().into(),
            "--fill" => {
                a.fill = match val().as_str() {
                    "pattern" => Fill::Pattern,
                    "text" => Fill::Text,
                    _ => Fill::Random,
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => {
                eprintln!("save_bench: unknown option {other}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    a
}

const USAGE: &str = "usage: save_bench [--size-mib N] [--mem thp|4k|both] [--writers N] [--block-kib K] \
[--fault-block-kib K] [--spin|--no-spin] [--no-collapse] [--out file|null|both] [--zstd LEVEL] [--repeat N] \
[--fill random|pattern|text] [--workers N] [--fault-staging-mib N] [--word-writes] [--limits] [--path FILE]";

/// AnonHugePages (bytes) of the mapping containing `addr`, from /proc/self/smaps.
fn anon_huge_bytes(addr: usize) -> u64 {
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap_or_default();
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
                let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                return kb << 10;
            }
        }
    }
    0
}

/// Writer threads: each rewrites a random page (or one u64 of it) of its share, as fast as it
/// can, through vm-memory's volatile accessors.
struct Writers<'a> {
    mem: &'a GuestMemoryMmap,
    size: usize,
    pause: AtomicBool,
    parked: AtomicUsize,
    quit: AtomicBool,
    /// Each step writes a whole page (default) instead of one u64.
    whole_pages: bool,
    writes: AtomicU64,
    /// Recording stalls (only during the save).
    record: AtomicBool,
    max_gap_ns: AtomicU64,
    /// End of the worst gap, µs after `t0` (the thaw).
    worst_at_us: AtomicU64,
    t0: Instant,
    /// Histogram of gaps between consecutive writes: bucket k counts gaps in [2^k, 2^(k+1)) µs
    /// (bucket 0: < 2 µs).
    hist: [AtomicU64; 24],
}

impl Writers<'_> {
    fn run(&self, id: usize, n: usize) {
        // The whole (single-region) guest memory as one array of u64 with volatile, bounds-checked
        // element stores (vm-memory's safe stand-in for `ptr::write_volatile`).
        let ram = self.mem.get_slice(GuestAddress(0), self.size).unwrap();
        let words = ram.get_array_ref::<u64>(0, self.size / 8).unwrap();
        let pages = self.size / PAGE;
        let share = pages / n;
        let first = id * share;
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1).wrapping_mul(0xdead_beef);
        let mut prev = Instant::now();
        let mut local = 0u64;
        while !self.quit.load(Ordering::Relaxed) {
            if self.pause.load(Ordering::Acquire) {
                self.writes.fetch_add(local, Ordering::Relaxed);
                local = 0;
                self.parked.fetch_add(1, Ordering::AcqRel);
                while self.pause.load(Ordering::Acquire) && !self.quit.load(Ordering::Relaxed) {
                    thread::yield_now();
                }
                self.parked.fetch_sub(1, Ordering::AcqRel);
                prev = Instant::now();
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let page = first + (x % share as u64) as usize;
            if self.whole_pages {
                // Like the built-in guest: every step rewrites one whole page.
                let mut v = x | 1;
                for k in 0..PAGE / 8 {
                    // Pseudo-random content (incompressible, like the built-in guest's).
                    v ^= v << 13;
                    v ^= v >> 7;
                    v ^= v << 17;
                    // Volatile u64 store; the first one into a protected page blocks (in the
                    // kernel) until the page is released.
                    words.store(page * (PAGE / 8) + k, v);
                }
            } else {
                let off = ((x >> 40) as usize % (PAGE / 8)) * 8;
                words.store((page * PAGE + off) / 8, x);
            }
            local += 1;
            if local & 0xff == 0 {
                self.writes.fetch_add(local, Ordering::Relaxed);
                local = 0;
            }
            if self.record.load(Ordering::Relaxed) {
                let now = Instant::now();
                let gap = now.duration_since(prev);
                prev = now;
                let ns = gap.as_nanos() as u64;
                if self.max_gap_ns.fetch_max(ns, Ordering::Relaxed) < ns {
                    let at = now.duration_since(self.t0).as_micros() as u64;
                    self.worst_at_us.store(at, Ordering::Relaxed);
                }
                let us = (ns / 1000).max(1);
                let k = (63 - us.leading_zeros() as usize).min(self.hist.len() - 1);
                self.hist[k].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.writes.fetch_add(local, Ordering::Relaxed);
    }

    fn freeze(&self, n: usize) {
        self.pause.store(true, Ordering::Release);
        while self.parked.load(Ordering::Acquire) != n {
            thread::yield_now();
        }
    }

    fn rate(&self, d: Duration) -> f64 {
        let w0 = self.writes.load(Ordering::Relaxed);
        let t = Instant::now();
        thread::sleep(d);
        (self.writes.load(Ordering::Relaxed) - w0) as f64 / t.elapsed().as_secs_f64()
    }

    fn hist_line(&self) -> String {
        let mut s = String::new();
        for (k, b) in self.hist.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            if n > 0 && k >= 4 {
                s.push_str(&format!(" ≥{}µs:{n}", 1u64 << k));
            }
        }
        s
    }
}

/// Fill the first `size` bytes of guest memory (one u64 stream, generated 2 MiB at a time).
fn fill(mem: &GuestMemoryMmap, size: usize, kind: Fill) {
    let mut chunk = vec![0u64; HUGE / 8];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for start in (0..size).step_by(HUGE) {
        let len = HUGE.min(size - start);
        let words = &mut chunk[..len / 8];
        let first = start / 8;
        for (j, w) in words.iter_mut().enumerate() {
            *w = next_fill_word(kind, first + j, &mut x);
        }
        mem.get_slice(GuestAddress(start as u64), len)
            .unwrap()
            .copy_from(words);
    }
}

/// Word `i` of the fill; `x` is the generator state carried from word to word.
fn next_fill_word(kind: Fill, i: usize, x: &mut u64) -> u64 {
    match kind {
        Fill::Pattern => (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        Fill::Random => {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            *x
        }
        Fill::Text => {
            // Eight "letters" out of 16 per word, with a repeated word now and then.
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            if x.is_multiple_of(4) {
                0x2065_6874_2061_6d20
            } else {
                (*x & 0x0f0f_0f0f_0f0f_0f0f) | 0x6060_6060_6060_6060
            }
        }
    }
}

/// Resident set size of this process in bytes.
fn rss_bytes() -> u64 {
    let s = fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * PAGE as u64
}

fn one(args: &Args, thp: bool, to_file: bool, mem: &GuestMemoryMmap, tracker: &WpTracker) {
    let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    let n = args.writers;
    let w = Writers {
        mem,
        size: args.size,
        pause: AtomicBool::new(false),
        parked: AtomicUsize::new(0),
        quit: AtomicBool::new(false),
        whole_pages: !args.word_writes,
        writes: AtomicU64::new(0),
        record: AtomicBool::new(false),
        max_gap_ns: AtomicU64::new(0),
        worst_at_us: AtomicU64::new(0),
        t0: Instant::now(),
        hist: Default::default(),
    };
    let huge_before = anon_huge_bytes(base);
    let mut opts = SaveOptions {
        compression: args.compression,
        ..SaveOptions::default()
    };
    if let Some(b) = args.block {
        opts.block_size = b;
    }
    if let Some(b) = args.fault_block {
        opts.fault_block_size = Some(b);
    }
    opts.restore_huge_pages = args.collapse;
    if let Some(s) = args.spin {
        opts.fault_spin = Some(s);
    }
    if let Some(k) = args.workers {
        opts.workers = k;
    }
    opts.max_staging = args.fault_staging;
    let rss_before = rss_bytes();
    let rss_peak = AtomicU64::new(rss_before);
    let sampling = AtomicBool::new(true);
    let thaw_us = AtomicU64::new(0);
    let (summary, rate_before, rate_during, rate_after): (SaveSummary, f64, f64, f64) =
        thread::scope(|s| {
            for id in 0..n {
                let w = &w;
                s.spawn(move || w.run(id, n));
            }
            let (rss_peak, sampling) = (&rss_peak, &sampling);
            s.spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    rss_peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(5));
                }
            });
            thread::sleep(Duration::from_millis(200));
            let rate_before = w.rate(Duration::from_secs(1));
            if n > 0 {
                w.freeze(n);
            }
            tracker.protect_all().unwrap();
            let w0 = w.writes.load(Ordering::Relaxed);
            w.record.store(true, Ordering::Relaxed);
            thaw_us.store(w.t0.elapsed().as_micros() as u64, Ordering::Relaxed);
            w.pause.store(false, Ordering::Release);
            let header = SnapshotHeader::new(Vec::new(), n as u32, Vec::new());
            let cancel = AtomicBool::new(false);
            let t = Instant::now();
            let summary = if to_file {
                let path = args.path.as_path();
                let sink = AtomicFileSink::create(path).unwrap();
                let r = live_save(mem, tracker, sink, header, b"", &opts, &|_| {}, &cancel);
                let _ = fs::remove_file(path);
                r
            } else {
                let sink = StreamSink::new(std::io::sink());
                live_save(mem, tracker, sink, header, b"", &opts, &|_| {}, &cancel)
            };
            let el = t.elapsed().as_secs_f64();
            w.record.store(false, Ordering::Relaxed);
            let rate_during = (w.writes.load(Ordering::Relaxed) - w0) as f64 / el;
            sampling.store(false, Ordering::Relaxed);
            let summary = summary.expect("save failed");
            thread::sleep(Duration::from_millis(100));
            let rate_after = w.rate(Duration::from_secs(1));
            w.quit.store(true, Ordering::Relaxed);
            (summary, rate_before, rate_during, rate_after)
        });
    let huge_after = anon_huge_bytes(base);
    println!(
        "{:>3} {:>4} {:>5}: {:>6.3} s {:>5.2} GB/s | fault p50 {:>5} µs p99 {:>6} µs max {:>6} µs, \
         {:>6} faults | writes/s {:>5.2}M before, {:>5.2}M during, {:>5.2}M after | worst stall \
         {:>7.2} ms | AnonHuge {:>4} → {:>4} MiB",
        if thp { "thp" } else { "4k" },
        if to_file { "file" } else { "null" },
        format!("w{n}"),
        summary.duration_secs,
        args.size as f64 / summary.duration_secs / 1e9,
        summary.fault_latency_p50_us,
        summary.fault_latency_p99_us,
        summary.fault_latency_max_us,
        summary.faults_served,
        rate_before / 1e6,
        rate_during / 1e6,
        rate_after / 1e6,
        w.max_gap_ns.load(Ordering::Relaxed) as f64 / 1e6,
        huge_before >> 20,
        huge_after >> 20,
    );
    println!(
        "      guest rate during/before {:.0} %, extra RSS {} MiB, file {} MiB, ratio {:.3}, \
         worst stall ended {:.1} ms after the thaw",
        rate_during / rate_before.max(1.0) * 100.0,
        rss_peak.load(Ordering::Relaxed).saturating_sub(rss_before) >> 20,
        summary.file_bytes >> 20,
        summary.image_size_ratio,
        (w.worst_at_us.load(Ordering::Relaxed) as f64 - thaw_us.load(Ordering::Relaxed) as f64)
            / 1e3,
    );
    println!(
        "      fault block {} KiB, huge pages restored {} in {:.3} s; stalls:{}",
        summary.fault_block_size >> 10,
        summary.huge_pages_restored,
        summary.huge_restore_secs,
        w.hist_line()
    );
}

/// Copy 1 GiB of protected memory in 2 MiB pieces: vm-memory volatile copy vs plain memcpy.
fn copy_speed(thp: bool, mem: &GuestMemoryMmap, tracker: &WpTracker, size: usize) {
    use vm_memory::{Bytes, GuestMemoryBackend};
    tracker.protect_all().unwrap();
    let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    let mut buf = vec![1u8; HUGE];
    for pass in 0..2 {
        let t = Instant::now();
        for off in (0..size).step_by(HUGE) {
            mem.read_slice(&mut buf, GuestAddress(off as u64)).unwrap();
        }
        let vol = size as f64 / t.elapsed().as_secs_f64() / 1e9;
        let t = Instant::now();
        for off in (0..size).step_by(HUGE) {
            let r = wp_tracker::HostRange::new(base + off, HUGE);
            tracker.copy_protected(r, &mut buf).unwrap();
        }
        let plain = size as f64 / t.elapsed().as_secs_f64() / 1e9;
        if pass == 1 {
            println!(
                "{:>3} copy 2 MiB pieces: vm-memory read_slice {vol:.2} GB/s, copy_protected \
                 {plain:.2} GB/s",
                if thp { "thp" } else { "4k" }
            );
        }
    }
    let _ = mem.get_host_address(GuestAddress(0));
    tracker.unprotect_all().unwrap();
}

/// Machine limits: file write + fsync bandwidth in 4 MiB writes, zstd-1 on all cores.
fn limits(args: &Args) {
    use std::io::Write;
    let chunk = vec![0x5au8; 4 << 20];
    let path = args.path.with_extension("probe");
    let t = Instant::now();
    let mut f = fs::File::create(&path).unwrap();
    for _ in 0..256 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    let disk = (1u64 << 30) as f64 / t.elapsed().as_secs_f64() / 1e9;
    drop(f);
    let _ = fs::remove_file(&path);
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let mut data = vec![0u8; 2 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    let t = Instant::now();
    let total: usize = thread::scope(|s| {
        let hs: Vec<_> = (0..cores)
            .map(|_| {
                let data = &data;
                s.spawn(move || {
                    let mut c = zstd::bulk::Compressor::new(1).unwrap();
                    let mut out = Vec::with_capacity(3 << 20);
                    let mut n = 0;
                    for _ in 0..128 {
                        out.clear();
                        c.compress_to_buffer(data, &mut out).unwrap();
                        n += data.len();
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let z = total as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!(
        "limits: file write+fsync {disk:.2} GB/s, zstd-1 random data {z:.2} GB/s on {cores} cores"
    );
}

fn main() {
    let args = parse_args();
    println!("{args:?}");
    if args.limits {
        limits(&args);
    }
    for &thp in &args.mems {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), args.size)]).unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        if !base.is_multiple_of(HUGE) {
            println!("warning: mapping at {base:#x} is not 2 MiB aligned");
        }
        wp_tracker::advise_huge_pages(&mem, thp).expect("madvise");
        fill(&mem, args.size, args.fill);
        let tracker = WpTracker::new().expect("tracker");
        tracker.register_memory(&mem).expect("register");
        copy_speed(thp, &mem, &tracker, args.size);
        for _ in 0..args.repeat {
            for &f in &args.outs {
                one(&args, thp, f, &mem, &tracker);
            }
        }
    }
}
