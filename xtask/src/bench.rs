//! `cargo xtask bench [--quick] [--mem MIB,…] [--save-args ARGS] [--only TEXT] [uffd]`: performance figures on the built-in guest
//! and the test kernel (guests/testkernel), in one run, written as Markdown and JSON under `target/bench/`.
//!
//! Guest modes per case: idle, full (random page writes over all of RAM at full speed) and hot
//! (full speed over a small working set per vCPU); see [`Mode`]. Busy cases also run on
//! `--mem-backend memfd`, side by side with anonymous memory, and the test kernel runs its
//! `tk.full` mode (random page writes over all of its RAM from ring 3); its progress is read from
//! its status block in the VMM's memory (`/proc/PID/mem`) every millisecond.
//! The incremental saves' cases (`incremental …`, `--only incremental`) are in `bench_incremental.rs`.
//!
//! Every figure is also given as a fraction of the machine's own limit measured in the same run (memcpy
//! bandwidth, sequential file write with fsync, zstd level 1 on the guest's data), so runs on different or busy
//! machines stay comparable. Nothing here asserts a wall-clock limit; it reports.

use crate::{build_snapctl, root, VmmProc};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "bench_incremental.rs"]
mod incremental;

/// Entry point of `cargo xtask bench`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    if args.iter().any(|a| a == "uffd") {
        return uffd();
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `--mem 512,2048` (MiB) replaces the matrix's memory sizes, e.g. for a figure at other sizes.
    let mems = match args.iter().position(|a| a == "--mem") {
        Some(i) => Some(
            args.get(i + 1)
                .context("--mem needs a list of MiB, e.g. --mem 512,2048")?
                .split(',')
                .map(|m| m.trim().parse::<u64>().context("--mem takes MiB numbers"))
                .collect::<anyhow::Result<Vec<u64>>>()?,
        ),
        None => None,
    };
    // `--save-args '--fault-block 2M --no-huge-restore'`: extra arguments for every `snapctl save` of the
    // matrix (the hidden tuning flags), to compare settings on the real guest.
    let save_args: Vec<String> = match args.iter().position(|a| a == "--save-args") {
        Some(i) => args
            .get(i + 1)
            .context("--save-args needs a quoted list of snapctl save arguments")?
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        None => Vec::new(),
    };
    // `--only memfd`: only the cases whose name contains the text, e.g. to measure one figure again.
    let only = match args.iter().position(|a| a == "--only") {
        Some(i) => Some(
            args.get(i + 1)
                .context("--only needs a text that case names contain, e.g. --only kernel")?
                .clone(),
        ),
        None => None,
    };
    if only.as_deref() == Some("migrate") {
        return crate::bench_migrate::run(quick, mems);
    }
    matrix(quick, mems, &save_args, only.as_deref())
}

/// userfaultfd figures: fault service latency, write-protect time for 1 and 4 GiB.
fn uffd() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(root())
        .args([
            "run",
            "--release",
            "-p",
            "wp-tracker",
            "--example",
            "wp_bench",
        ])
        .status()
        .context("running wp_bench")?;
    if !st.success() {
        bail!("wp_bench failed");
    }
    Ok(())
}

/// One case of the matrix.
#[derive(Debug, Clone)]
struct Case {
    mem_mib: u64,
    /// The guest writes at full speed (else it idles).
    full: bool,
    /// Full speed over a hot working set of [`HOT_SET`] per vCPU instead of the vCPU's whole
    /// slice of RAM.
    hot: bool,
    vcpus: u8,
    zstd: bool,
    /// Guest memory on `--mem-backend memfd` (else anonymous memory).
    memfd: bool,
    /// The test kernel in `tk.full` mode instead of the built-in guest.
    kernel: bool,
    /// The measured save is the VMM's second (one save first, discarded): the steady state of a VM
    /// checkpointed often, where the VM's record of writes sizes the staging prepared before the
    /// freeze (`--prepare-staging auto`).
    repeat: bool,
}

/// What the guest does during a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Timer ticks only.
    Idle,
    /// Rewrites random pages of all its RAM at full speed: every 2 MiB unit is hit within
    /// milliseconds of the thaw (the worst case for a live snapshot).
    Full,
    /// Rewrites random pages of a [`HOT_SET`] working set per vCPU at full speed; the rest of
    /// RAM holds data but stays cold (closer to a real workload).
    Hot,
}

/// Working set per vCPU in [`Mode::Hot`].
const HOT_SET: &str = "32M";

impl Case {
    fn name(&self) -> String {
        format!(
            "{}{} {} {}vcpu {}{}",
            if self.kernel { "kernel " } else { "" },
            if self.mem_mib >= 1024 {
                format!("{}G", self.mem_mib / 1024)
            } else {
                format!("{}M", self.mem_mib)
            },
            match (self.full, self.hot) {
                (_, true) => "hot",
                (true, false) => "full",
                (false, false) => "idle",
            },
            self.vcpus,
            if self.zstd { "zstd" } else { "raw" },
            if self.memfd { " memfd" } else { "" }
        ) + if self.repeat { " repeat" } else { "" }
    }
}

/// The machine's own limits, measured in this run.
#[derive(Debug, Clone, Copy)]
struct Limits {
    memcpy_gbps: f64,
    /// Sequential write + fsync through the page cache.
    buffered_write_gbps: f64,
    /// Sequential 8 MiB `O_DIRECT` writes + fsync (how the saver writes files), before the cases.
    direct_write_gbps: f64,
    /// The same after the cases.
    direct_write_end_gbps: f64,
    /// The better of the two: the file write limit.
    file_write_gbps: f64,
    zstd1_gbps: f64,
    /// Compressed / raw size of the guest's data at zstd level 1.
    zstd1_ratio: f64,
}

impl Limits {
    /// What a compressed save can reach at best: zstd's own speed, or the disk's speed for the
    /// compressed bytes, whichever is lower (on incompressible data the disk decides).
    fn zstd_pipeline_gbps(&self) -> f64 {
        self.zstd1_gbps
            .min(self.file_write_gbps / self.zstd1_ratio.max(1e-3))
    }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9
}

fn memcpy_limit() -> f64 {
    let n = 512usize << 20;
    let src: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
    let mut dst = vec![0u8; n];
    dst.copy_from_slice(&src); // fault the pages in first
    let t0 = Instant::now();
    for _ in 0..4 {
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
    }
    gbps(4 * n as u64, t0.elapsed())
}

/// `total` bytes written sequentially in 8 MiB pieces, then fsync; through the page cache or
/// with `O_DIRECT` (from a 4 KiB-aligned buffer).
fn file_write_limit(dir: &Path, direct: bool, total: u64) -> anyhow::Result<f64> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("write-limit.tmp");
    let chunk = 8usize << 20;
    let mut raw = vec![0u8; chunk + 4096];
    let start = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[start..start + chunk];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 7 % 253) as u8;
    }
    let flags = if direct {
        nix::fcntl::OFlag::O_DIRECT.bits()
    } else {
        0
    };
    let t0 = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(flags)
        .open(&p)?;
    let mut done = 0;
    while done < total {
        f.write_all(buf)?;
        done += buf.len() as u64;
    }
    f.sync_all()?;
    let d = t0.elapsed();
    drop(f);
    std::fs::remove_file(&p)?;
    Ok(gbps(total, d))
}

/// The median of three measurements.
fn median3(mut f: impl FnMut() -> f64) -> f64 {
    let mut v = [f(), f(), f()];
    v.sort_by(f64::total_cmp);
    v[1]
}

/// zstd level 1 on all cores over `data` in 2 MiB chunks (as the saver compresses): speed in
/// GB/s and compressed / raw size.
fn zstd_limit(data: &[u8]) -> anyhow::Result<(f64, f64)> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunks: Vec<&[u8]> = data.chunks(2 << 20).collect();
    let next = AtomicU64::new(0);
    let out_bytes = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..cores {
            s.spawn(|| {
                let mut c = zstd::bulk::Compressor::new(1).expect("zstd");
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(ch) = chunks.get(i) else { break };
                    let z = c.compress(ch).expect("compress");
                    out_bytes.fetch_add(z.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    let speed = gbps(data.len() as u64, t0.elapsed());
    let ratio = out_bytes.load(Ordering::Relaxed) as f64 / data.len().max(1) as f64;
    Ok((speed, ratio))
}

/// VmRSS of a process, bytes.
fn rss(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:") * 1024
}

fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// AnonHugePages of the largest mapping of a process (the guest RAM), bytes.
fn guest_thp(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut best_size, mut best_thp, mut size, mut thp) = (0u64, 0u64, 0u64, 0u64);
    for l in smaps.lines() {
        let mut it = l.split_whitespace();
        match it.next() {
            Some("Size:") => size = it.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            Some("AnonHugePages:") => {
                thp = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                if size > best_size {
                    best_size = size;
                    best_thp = thp;
                }
            }
            _ => {}
        }
    }
    let _ = thp;
    best_thp * 1024
}

/// Guest steps per second over `window`.
fn rate(vm: &VmmProc, window: Duration) -> anyhow::Result<f64> {
    let a: u64 = vm.steps()?.iter().sum();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let b: u64 = vm.steps()?.iter().sum();
    Ok(b.saturating_sub(a) as f64 / t0.elapsed().as_secs_f64())
}

fn wait_fill(vm: &VmmProc) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        if vm.status()?["fill_done"] == Value::Bool(true) {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("guest fill not done after 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where the test kernel's status block is (guests/testkernel: entry.S, `struct status`).
const TK_STATUS_GPA: u64 = 0x10_0100;
/// Offsets in it: phase, steps.
const TK_PHASE: u64 = 8;
const TK_STEPS: u64 = 24;
/// The phase of its `tk.full` loop.
const TK_PHASE_FULL: u64 = 4;

/// The test kernel's compiler flags (guests/testkernel/cflags, one per line; the tests build it
/// with the same file).
fn cflags(src: &Path) -> anyhow::Result<Vec<String>> {
    let f = src.join("cflags");
    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    Ok(text.split_whitespace().map(str::to_owned).collect())
}

/// Builds the test kernel's ELF with the system C compiler into `dir`.
fn build_testkernel(dir: &Path) -> anyhow::Result<PathBuf> {
    let src = root().join("guests/testkernel");
    let out = dir.join("testkernel.elf");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .args(cflags(&src)?)
        .arg(format!("-Wl,-T,{}", src.join("testkernel.ld").display()))
        .arg("-o")
        .arg(&out)
        .arg(src.join("entry.S"))
        .arg(src.join("testkernel.c"))
        .status()
        .with_context(|| format!("running {cc} (the test kernel needs a C compiler)"))?;
    if !st.success() {
        bail!("building the test kernel with {cc} failed");
    }
    Ok(out)
}

/// The test kernel's status block, read from the VMM's memory through `/proc/PID/mem`.
struct KernelProbe {
    mem: std::fs::File,
    /// Host address of the status block.
    status: u64,
}

impl KernelProbe {
    /// Finds the mapping that holds guest RAM from GPA 0 (the one of `low_bytes` bytes) in the VMM
    /// process `pid` and checks the status block's magic there.
    fn open(pid: u32, low_bytes: u64) -> anyhow::Result<Self> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        let mut found = Vec::new();
        for l in maps.lines() {
            let range = l.split_whitespace().next().unwrap_or("");
            let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap_or(0),
                u64::from_str_radix(b, 16).unwrap_or(0),
            );
            if b.saturating_sub(a) == low_bytes {
                found.push(a);
            }
        }
        let [base] = found[..] else {
            bail!(
                "VMM {pid}: {} mappings of {low_bytes} bytes, expected exactly one (guest RAM)",
                found.len()
            );
        };
        let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
        let p = KernelProbe {
            mem,
            status: base + TK_STATUS_GPA,
        };
        let mut magic = [0u8; 8];
        p.mem.read_exact_at(&mut magic, p.status)?;
        if &magic != b"TKSTAT01" {
            bail!("VMM {pid}: no test kernel status block at GPA {TK_STATUS_GPA:#x}");
        }
        Ok(p)
    }

    fn word(&self, off: u64) -> anyhow::Result<u64> {
        let mut b = [0u8; 8];
        self.mem.read_exact_at(&mut b, self.status + off)?;
        Ok(u64::from_le_bytes(b))
    }

    fn steps(&self) -> anyhow::Result<u64> {
        self.word(TK_STEPS)
    }

    /// Steps per second over `window`.
    fn rate(&self, window: Duration) -> anyhow::Result<f64> {
        let a = self.steps()?;
        let t0 = Instant::now();
        std::thread::sleep(window);
        let b = self.steps()?;
        Ok(b.saturating_sub(a) as f64 / t0.elapsed().as_secs_f64())
    }

    /// Waits until the kernel runs its `tk.full` loop.
    fn wait_full(&self) -> anyhow::Result<()> {
        let t0 = Instant::now();
        while self.word(TK_PHASE)? != TK_PHASE_FULL {
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("test kernel not in its tk.full loop after 120 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits until the steps go past `min`.
    fn wait_beyond(&self, min: u64, timeout: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        while self.steps()? <= min {
            if t0.elapsed() > timeout {
                bail!("test kernel made no progress past step {min} in {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

/// The guest's step counter while `stop` is false, sampled every [`PROBE_EVERY`] (the first at once,
/// the last at the stop).
fn watch_kernel(p: &KernelProbe, stop: &AtomicBool) -> anyhow::Result<Vec<(Instant, u64)>> {
    let mut samples = vec![(Instant::now(), p.steps()?)];
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(PROBE_EVERY);
        samples.push((Instant::now(), p.steps()?));
    }
    samples.push((Instant::now(), p.steps()?));
    Ok(samples)
}

/// From `samples`, as the save's own monitor does for the built-in guest over the same window (the
/// freeze to the end of the save: from the last sample at or before `from`): steps per second, and
/// the longest time the counter did not move (up to the end if it did not move again).
fn kernel_during(samples: &[(Instant, u64)], from: Instant) -> (f64, f64) {
    let base = samples.iter().rposition(|(t, _)| *t <= from).unwrap_or(0);
    let Some(((t0, first), rest)) = samples[base..].split_first() else {
        return (0.0, 0.0);
    };
    let (mut last, mut last_change, mut max_gap, mut end) = (*first, *t0, Duration::ZERO, *t0);
    for (now, s) in rest {
        end = *now;
        if *s != last {
            max_gap = max_gap.max(now.duration_since(last_change));
            last_change = *now;
            last = *s;
        }
    }
    max_gap = max_gap.max(end.duration_since(last_change));
    (
        last.saturating_sub(*first) as f64 / end.duration_since(*t0).as_secs_f64().max(1e-9),
        max_gap.as_secs_f64() * 1e3,
    )
}

/// How often [`watch_kernel`] reads the step counter.
const PROBE_EVERY: Duration = Duration::from_millis(1);

/// Guest RAM from GPA 0: all of it below the 3 GiB hole.
fn low_ram_bytes(mem_mib: u64) -> u64 {
    (mem_mib << 20).min(3 << 30)
}

fn run_case(
    bin: &Path,
    kernel: &Path,
    dir: &Path,
    c: &Case,
    quick: bool,
    save_args: &[String],
) -> anyhow::Result<Value> {
    let sock = dir.join("bench.sock");
    let snap = dir.join("bench.snap");
    let _ = std::fs::remove_file(&snap);
    let mem = format!("{}M", c.mem_mib);
    let vcpus = c.vcpus.to_string();
    let kernel_s = kernel.to_str().context("path")?;
    let mut boot = vec!["boot", "--mem", &mem, "--vcpus", &vcpus];
    if c.kernel {
        boot.extend(["--kernel", kernel_s, "--cmdline", "console=ttyS0 tk.full"]);
    } else {
        boot.extend(["--write-rate", if c.full { "full" } else { "idle" }]);
    }
    if c.hot {
        boot.extend(["--working-set", HOT_SET]);
    }
    let backend: &[&str] = if c.memfd {
        &["--mem-backend", "memfd"]
    } else {
        &[]
    };
    boot.extend(backend);
    let vm = VmmProc::start(bin, &boot, &sock, &dir.join("bench.serial"))?;
    let pid = vm.child.id();
    let window = if quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(5)
    };
    let probe = if c.kernel {
        let p = KernelProbe::open(pid, low_ram_bytes(c.mem_mib))?;
        p.wait_full()?;
        // Random pages: every page is written within a second or so.
        std::thread::sleep(Duration::from_secs(1));
        Some(p)
    } else {
        wait_fill(&vm)?;
        None
    };
    if c.repeat {
        let first = dir.join("bench-first.snap");
        let first_s = first.to_str().context("path")?;
        vm.ctl(&["save", "--out", first_s, "--json", "--force"])
            .context("the first save of a repeat case")?;
        let _ = std::fs::remove_file(&first);
        // The guest writes all over its memory again before the measured save.
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_millis(500));
    let thp_before = guest_thp(pid);
    let rate_before = match &probe {
        Some(p) => p.rate(window)?,
        None if c.full => rate(&vm, window)?,
        None => 0.0,
    };
    let rss_before = rss(pid);
    let peak = Arc::new(AtomicU64::new(rss_before));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let snap_s = snap.to_str().context("path")?;
    let mut args = vec!["save", "--out", snap_s, "--json", "--force"];
    if c.zstd {
        args.push("--zstd");
        args.push("--zstd-level");
        args.push("1");
    }
    args.extend(save_args.iter().map(String::as_str));
    let steps_before_save = match &probe {
        Some(p) => p.steps()?,
        None => 0,
    };
    let kstop = AtomicBool::new(false);
    let (saved, kernel_samples, replied) = std::thread::scope(|s| {
        let watcher = probe.as_ref().map(|p| s.spawn(|| watch_kernel(p, &kstop)));
        let saved = vm.ctl(&args);
        let replied = Instant::now();
        kstop.store(true, Ordering::Relaxed);
        let during = watcher.map(|w| w.join().expect("kernel watcher"));
        (saved, during, replied)
    });
    let summary: Value = serde_json::from_str(saved?.trim()).context("save summary")?;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    // The save's window as the guest sees it: the freeze and the live save (`duration_s`, the
    // downtime included), which end just before the reply; not what the VMM did before the freeze
    // (preparing staging, arming).
    let freeze_to_end = Duration::from_secs_f64(summary["duration_s"].as_f64().unwrap_or(0.0));
    let from = replied.checked_sub(freeze_to_end).unwrap_or(replied);
    let (rate_during, max_stall_ms) = match kernel_samples.transpose()? {
        Some(samples) => {
            let (r, g) = kernel_during(&samples, from);
            (Value::from(r), Value::from(g))
        }
        None => (
            summary["guest_steps_per_s_during"].clone(),
            summary["guest_max_stall_ms"].clone(),
        ),
    };
    let extra_rss = peak.load(Ordering::Relaxed).saturating_sub(rss_before);
    let recovery_s = if c.full {
        let steps = || match &probe {
            Some(p) => p.steps(),
            None => Ok(vm.steps()?.iter().sum()),
        };
        recovery(steps, rate_before)?.map_or(Value::Null, Value::from)
    } else {
        std::thread::sleep(Duration::from_secs(2));
        Value::Null
    };
    let rate_after = match &probe {
        Some(p) => p.rate(window)?,
        None if c.full => rate(&vm, window)?,
        None => 0.0,
    };
    let thp_after = guest_thp(pid);
    drop(probe);
    vm.shutdown()?;

    // Restore: time from process start to the guest's first progress past its freeze instant.
    let freeze: Vec<u64> = summary["freeze_steps"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0)).collect())
        .unwrap_or_default();
    let t0 = Instant::now();
    let mut restore = vec!["restore", snap_s];
    restore.extend(backend);
    let rvm = VmmProc::start(bin, &restore, &sock, &dir.join("restore.serial"))?;
    let restore_s = if c.kernel {
        // The restored kernel starts from its freeze instant, past `steps_before_save`.
        KernelProbe::open(rvm.child.id(), low_ram_bytes(c.mem_mib))?
            .wait_beyond(steps_before_save, Duration::from_secs(120))?;
        t0.elapsed().as_secs_f64()
    } else if c.full {
        rvm.wait_steps_beyond(&freeze, Duration::from_secs(120))?;
        t0.elapsed().as_secs_f64()
    } else {
        let t = rvm.status()?["ticks"].as_u64().unwrap_or(0);
        loop {
            if rvm.status()?["ticks"].as_u64().unwrap_or(0) > t {
                break t0.elapsed().as_secs_f64();
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("restored guest shows no timer ticks");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    rvm.shutdown()?;
    // The same file restored lazily, in a new VMM process of its own; its failure is the row's
    // `lazy.error`, not the case's.
    let lazy = if c.kernel {
        json!({"skipped": "kernel guest (its progress is read from guest memory)"})
    } else {
        lazy_restore(bin, dir, c, snap_s, &freeze, rate_before, window)
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}))
    };
    let file_bytes = summary["file_bytes"].as_u64().unwrap_or(0);
    let _ = std::fs::remove_file(&snap);
    let guest_bytes = c.mem_mib << 20;
    let dur = summary["duration_s"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "case": c.name(), "mem_mib": c.mem_mib, "full": c.full, "hot": c.hot, "vcpus": c.vcpus, "zstd": c.zstd,
        "memfd": c.memfd, "kernel": c.kernel,
        "downtime_ms": summary["downtime_ms"], "freeze_ms": summary["freeze_ms"], "duration_s": dur,
        "save_gbps": guest_bytes as f64 / dur.max(1e-9) / 1e9,
        "image_size_ratio": summary["image_size_ratio"], "file_bytes": file_bytes,
        "rate_before": rate_before, "rate_during": rate_during,
        "rate_after": rate_after, "recovery_s": recovery_s, "max_stall_ms": max_stall_ms,
        "faults": summary["faults_served"], "p50_us": summary["fault_latency_p50_us"],
        "p99_us": summary["fault_latency_p99_us"], "max_us": summary["fault_latency_max_us"],
        "fault_wait_total_ms": summary["fault_wait_total_ms"],
        "fault_phases_us": summary["fault_phases_us"], "staging": summary["staging"],
        "extra_rss_mib": extra_rss as f64 / (1 << 20) as f64,
        "restore_s": restore_s, "restore_gbps": guest_bytes as f64 / restore_s / 1e9,
        "thp_before_mib": thp_before >> 20, "thp_after_mib": thp_after >> 20,
        "lazy": lazy,
    }))
}

/// A busy guest's rate counts as recovered after a save at this share of its rate before.
const RECOVERED: f64 = 0.8;
/// How long [`recovery`] watches.
const RECOVERY_MAX: Duration = Duration::from_secs(15);

/// Seconds from the end of a save to the end of the first 100 ms interval in which the guest's
/// rate is back to [`RECOVERED`] of `before` (so at least 0.1 s), or `None` if not within
/// [`RECOVERY_MAX`]. A save can leave the guest slow after it ends (e.g. pages to map again);
/// the save's own rate during does not show that.
fn recovery(steps: impl Fn() -> anyhow::Result<u64>, before: f64) -> anyhow::Result<Option<f64>> {
    let t0 = Instant::now();
    let (mut prev, mut at) = (steps()?, Instant::now());
    while t0.elapsed() < RECOVERY_MAX {
        std::thread::sleep(Duration::from_millis(100));
        let (s, now) = (steps()?, Instant::now());
        let r = s.saturating_sub(prev) as f64 / now.duration_since(at).as_secs_f64().max(1e-9);
        if r >= RECOVERED * before {
            return Ok(Some(now.duration_since(t0).as_secs_f64()));
        }
        (prev, at) = (s, now);
    }
    Ok(None)
}

/// How long [`lazy_restore`] waits for `restore.done`.
const LAZY_DONE_TIMEOUT: Duration = Duration::from_secs(120);

/// `snapctl restore --lazy` of `snap`: time from process start to the guest running (first progress
/// past its freeze instant, polled every few ms), the VMM's own `restore` figures once `restore.done`,
/// and for busy guests the rate while the fill runs and after it, against `rate_before`.
fn lazy_restore(
    bin: &Path,
    dir: &Path,
    c: &Case,
    snap: &str,
    freeze: &[u64],
    rate_before: f64,
    window: Duration,
) -> anyhow::Result<Value> {
    let sock = dir.join("lazy.sock");
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    // Started here rather than with `VmmProc::start`, whose 100 ms socket poll would blur the
    // time to the first guest progress.
    let child = Command::new(bin)
        .args(["restore", "--lazy", snap])
        .args(if c.memfd {
            &["--mem-backend", "memfd"][..]
        } else {
            &[]
        })
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join("lazy.serial"))
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("starting snapctl restore --lazy")?;
    let mut vm = VmmProc {
        child,
        sock: sock.clone(),
        bin: bin.to_path_buf(),
    };
    let sum = |s: &Value| -> u64 {
        s["steps"]
            .as_array()
            .map_or(0, |a| a.iter().map(|v| v.as_u64().unwrap_or(0)).sum())
    };
    // Running: every vCPU past its freeze steps (busy guests), or a timer tick past the first
    // one seen (idle guests).
    let mut first_ticks = None;
    let (running_s, first) = loop {
        if let Some(st) = vm.child.try_wait()? {
            bail!("snapctl restore --lazy exited early: {st}");
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("lazily restored guest not running after 120 s");
        }
        let Ok(s) = vm.status() else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let running = if c.full {
            let steps: Vec<u64> = s["steps"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0)).collect())
                .unwrap_or_default();
            steps.len() == freeze.len() && steps.iter().zip(freeze).all(|(a, b)| a > b)
        } else {
            let t = s["ticks"].as_u64().unwrap_or(0);
            *first_ticks.get_or_insert(t) < t
        };
        if running {
            break (t0.elapsed().as_secs_f64(), s);
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // The guest's rate while the fill runs: steps between the first progress and the last status
    // that still shows the memory not resident.
    let (t_first, steps_first) = (Instant::now(), sum(&first));
    let mut filling: Option<(Duration, u64)> = None;
    let rs = loop {
        let s = vm.status()?;
        let r = &s["restore"];
        if let Some(e) = r.get("failed") {
            bail!("lazy restore failed: {e}");
        }
        if r["resident"] != Value::Bool(true) {
            filling = Some((t_first.elapsed(), sum(&s).saturating_sub(steps_first)));
        }
        if r["done"] == Value::Bool(true) {
            break r.clone();
        }
        if t_first.elapsed() > LAZY_DONE_TIMEOUT {
            bail!("lazy restore not done after {LAZY_DONE_TIMEOUT:?}: {r}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let rate_filling = match filling {
        Some((d, n)) if c.full && d > Duration::from_millis(50) => {
            Value::from(n as f64 / d.as_secs_f64())
        }
        _ => Value::Null,
    };
    let rate_done = if c.full { rate(&vm, window)? } else { 0.0 };
    vm.shutdown()?;
    let _ = std::fs::remove_file(&sock);
    let mib = |k: &str| rs[k].as_u64().map_or(Value::Null, |b| Value::from(b >> 20));
    Ok(json!({
        "running_ms": running_s * 1e3,
        "start_ms": rs["start_ms"], "first_fault_ms": rs["first_fault_ms"],
        "faults": rs["faults"], "fault_wait_p50_us": rs["fault_wait_p50_us"],
        "fault_wait_p99_us": rs["fault_wait_p99_us"], "fault_wait_max_us": rs["fault_wait_max_us"],
        "fault_filled_mib": rs["fault_filled_bytes"].as_u64().unwrap_or(0) >> 20,
        "resident_s": rs["resident_s"], "fill_gb_s": rs["fill_gb_s"],
        "thp_before_mib": mib("thp_before_bytes"), "thp_after_mib": mib("thp_after_bytes"),
        "collapse_ms": rs["collapse_ms"], "collapse_failures": rs["collapse_failures"],
        "rate_before": rate_before, "rate_filling": rate_filling, "rate_done": rate_done,
    }))
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn matrix(
    quick: bool,
    mems: Option<Vec<u64>>,
    save_args: &[String],
    only: Option<&str>,
) -> anyhow::Result<()> {
    let stem = match (&mems, quick) {
        _ if !save_args.is_empty() || only.is_some() => "results-custom",
        (Some(_), _) => "results-custom",
        (None, true) => "results-quick",
        (None, false) => "results",
    };
    let bin = build_snapctl()?;
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let kernel_elf = build_testkernel(&dir)?;
    let mut cases = Vec::new();
    let case = |mem_mib, mode, vcpus, zstd| Case {
        mem_mib,
        full: mode != Mode::Idle,
        hot: mode == Mode::Hot,
        vcpus,
        zstd,
        memfd: false,
        kernel: false,
        repeat: false,
    };
    let repeat = |c: Case| Case { repeat: true, ..c };
    let memfd = |c: Case| Case { memfd: true, ..c };
    let kernel = |mem_mib| Case {
        kernel: true,
        ..case(mem_mib, Mode::Full, 1, false)
    };
    if let Some(mems) = mems {
        for mem_mib in mems {
            for mode in [Mode::Idle, Mode::Full, Mode::Hot] {
                for zstd in [false, true] {
                    cases.push(case(mem_mib, mode, 2, zstd));
                }
            }
        }
    } else if quick {
        for zstd in [false, true] {
            cases.push(case(1024, Mode::Full, 2, zstd));
        }
        cases.push(memfd(case(1024, Mode::Full, 2, false)));
        cases.push(case(1024, Mode::Hot, 2, false));
        cases.push(memfd(case(1024, Mode::Hot, 2, false)));
        cases.push(case(256, Mode::Idle, 1, false));
        cases.push(kernel(1024));
        cases.push(repeat(case(1024, Mode::Full, 2, false)));
        cases.push(repeat(kernel(1024)));
    } else {
        for mem_mib in [256, 1024, 4096] {
            for mode in [Mode::Idle, Mode::Full, Mode::Hot] {
                for vcpus in [1, 2] {
                    for zstd in [false, true] {
                        cases.push(case(mem_mib, mode, vcpus, zstd));
                    }
                }
            }
        }
        // The busy 1 GiB cases again on memfd, for the side-by-side table.
        for (mode, vcpus) in [
            (Mode::Full, 1),
            (Mode::Full, 2),
            (Mode::Hot, 1),
            (Mode::Hot, 2),
        ] {
            cases.push(memfd(case(1024, mode, vcpus, false)));
        }
        for mem_mib in [1024, 2048] {
            cases.push(kernel(mem_mib));
        }
        // A VM's second save, staging prepared from its record of writes.
        for vcpus in [1, 2] {
            cases.push(repeat(case(1024, Mode::Full, vcpus, false)));
        }
        cases.push(repeat(kernel(1024)));
    }

    if let Some(only) = only {
        cases.retain(|c| c.name().contains(only));
        if cases.is_empty() && incremental::selected(quick, Some(only)).is_empty() {
            bail!("no bench case name contains {only:?}");
        }
    }

    eprintln!("bench: measuring the machine's limits");
    let memcpy_gbps = memcpy_limit();
    let buffered_write_gbps = file_write_limit(&dir, false, 2 << 30)?;
    // The virtual disk's speed drifts (1.4–2.9 GB/s seen in one hour): the median of three
    // direct writes as large as the largest guest, before the cases and again after them.
    let direct_bytes: u64 = if quick { 1 << 30 } else { 4 << 30 };
    let direct_limit = || median3(|| file_write_limit(&dir, true, direct_bytes).unwrap_or(0.0));
    let direct_write_gbps = direct_limit();
    let file_write_gbps = buffered_write_gbps.max(direct_write_gbps);
    // zstd on the guest's own data: a raw snapshot of a filled guest.
    let sample = {
        let vm = VmmProc::start(
            &bin,
            &["boot", "--mem", "256M", "--write-rate", "full"],
            &dir.join("bench.sock"),
            &dir.join("bench.serial"),
        )?;
        wait_fill(&vm)?;
        let p = dir.join("sample.snap");
        vm.ctl(&[
            "save",
            "--out",
            p.to_str().context("path")?,
            "--force",
            "--json",
        ])?;
        vm.shutdown()?;
        let mut data = Vec::new();
        std::fs::File::open(&p)?.read_to_end(&mut data)?;
        let _ = std::fs::remove_file(&p);
        data
    };
    let (zstd1_gbps, zstd1_ratio) = zstd_limit(&sample)?;
    let limits = Limits {
        memcpy_gbps,
        buffered_write_gbps,
        direct_write_gbps,
        direct_write_end_gbps: 0.0,
        file_write_gbps,
        zstd1_gbps,
        zstd1_ratio,
    };
    eprintln!("bench: limits {limits:?}");

    let mut limits = limits;
    let mut rows = Vec::new();
    for c in &cases {
        eprintln!("bench: {}", c.name());
        match run_case(&bin, &kernel_elf, &dir, c, quick, save_args) {
            Ok(r) => {
                eprintln!("bench:   {r}");
                rows.push(r);
            }
            Err(e) => {
                eprintln!("bench:   FAILED: {e:#}");
                rows.push(json!({"case": c.name(), "error": format!("{e:#}")}));
            }
        }
    }
    let incremental = incremental::run(&bin, &dir, quick, only, &limits);
    limits.direct_write_end_gbps = direct_limit();
    limits.file_write_gbps = limits.file_write_gbps.max(limits.direct_write_end_gbps);
    let out = json!({
        "limits": {"direct_write_end_gbps": limits.direct_write_end_gbps,"memcpy_gbps": limits.memcpy_gbps, "file_write_gbps": limits.file_write_gbps,
                   "buffered_write_gbps": limits.buffered_write_gbps,
                   "direct_write_gbps": limits.direct_write_gbps,
                   "zstd1_gbps": limits.zstd1_gbps, "zstd1_ratio": limits.zstd1_ratio,
                   "zstd_pipeline_gbps": limits.zstd_pipeline_gbps()},
        "cases": rows,
        "incremental": incremental,
    });
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&out)?,
    )?;
    let md = markdown(&limits, &rows, save_args) + &incremental::markdown(&incremental);
    std::fs::write(dir.join(format!("{stem}.md")), &md)?;
    println!("{md}");
    println!("bench: wrote {}", dir.join(format!("{stem}.md")).display());
    if rows
        .iter()
        .any(|r| r.get("error").is_some() || r["lazy"].get("error").is_some())
        || incremental.iter().any(|r| r.get("error").is_some())
    {
        bail!("some bench cases failed");
    }
    Ok(())
}

fn markdown(l: &Limits, rows: &[Value], save_args: &[String]) -> String {
    let mut s = String::new();
    s += "# snapctl bench\n\n";
    if !save_args.is_empty() {
        s += &format!("Save arguments: `{}`\n\n", save_args.join(" "));
    }
    s += &format!(
        "Machine limits (same run): memcpy {:.2} GB/s; file write+fsync {:.2} GB/s (buffered {:.2}; O_DIRECT {:.2} before the cases, {:.2} after, each the median of 3); \
         zstd-1 on guest data (all cores) {:.2} GB/s at ratio {:.3}, so a zstd save can reach at most {:.2} GB/s \
         (the lower of zstd's speed and file write ÷ ratio).\n\n",
        l.memcpy_gbps,
        l.file_write_gbps,
        l.buffered_write_gbps,
        l.direct_write_gbps,
        l.direct_write_end_gbps,
        l.zstd1_gbps,
        l.zstd1_ratio,
        l.zstd_pipeline_gbps()
    );
    if rows.is_empty() {
        // Only other tables follow (e.g. `--only incremental`).
        return s;
    }
    s += &format!(
        "Guest modes: idle (timer ticks only); full (each vCPU rewrites random pages of its whole slice of RAM at \
         full speed: every 2 MiB unit is hit within milliseconds of the thaw, the worst case for a live snapshot); \
         hot (full speed over a {HOT_SET} working set per vCPU, the rest of RAM filled but cold). `kernel` cases: \
         the test kernel (guests/testkernel) in its `tk.full` mode, writing random pages over all of its RAM from \
         ring 3; its rate and longest gap come from its step counter, read from the VMM's memory every \
         {} ms, the built-in guest's from the save's own monitor; both over the freeze and the live save \
         (`duration_s`), not the preparation before the freeze. `memfd` cases: guest memory on \
         `--mem-backend memfd` (save, eager and lazy restore).\n\n",
        PROBE_EVERY.as_millis()
    );
    s += "Save GB/s is guest RAM over save duration, as a share of the file write limit (raw) or of the zstd limit (zstd; \
          then also of what zstd + disk can reach). Guest time lost = save duration × (1 − rate during/before): \
          seconds of guest work the save cost.\n\n";
    s += "| case | downtime ms | save s | save GB/s (of limit) | ratio | guest rate during/before | guest time lost s | worst stall ms | faults | fault p50/p99/max µs | extra RSS MiB | restore s (GB/s) | THP MiB before→after | rate after/before |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        if let Some(e) = r.get("error") {
            s += &format!(
                "| {} | FAILED: {} |\n",
                r["case"].as_str().unwrap_or("?"),
                e
            );
            continue;
        }
        let zstd = r["zstd"] == Value::Bool(true);
        let limit = if zstd {
            l.zstd1_gbps
        } else {
            l.file_write_gbps
        };
        let of_limit = if zstd {
            format!(
                "{:.0} %; {:.0} % of zstd+disk",
                100.0 * f(r, "save_gbps") / limit.max(1e-9),
                100.0 * f(r, "save_gbps") / l.zstd_pipeline_gbps().max(1e-9)
            )
        } else {
            format!("{:.0} %", 100.0 * f(r, "save_gbps") / limit.max(1e-9))
        };
        let full = r["full"] == Value::Bool(true);
        let frac = |a: f64, b: f64| {
            if full && b > 0.0 {
                format!("{:.0} %", 100.0 * a / b)
            } else {
                "–".into()
            }
        };
        let lost = if full && f(r, "rate_before") > 0.0 {
            format!(
                "{:.2}",
                f(r, "duration_s") * (1.0 - f(r, "rate_during") / f(r, "rate_before")).max(0.0)
            )
        } else {
            "–".into()
        };
        s += &format!(
            "| {} | {:.2} | {:.2} | {:.2} ({}) | {:.4} | {} | {} | {:.1} | {} | {}/{}/{} | {:.0} | {:.2} ({:.2}) | {}→{} | {} |\n",
            r["case"].as_str().unwrap_or("?"),
            f(r, "downtime_ms"),
            f(r, "duration_s"),
            f(r, "save_gbps"),
            of_limit,
            f(r, "image_size_ratio"),
            frac(f(r, "rate_during"), f(r, "rate_before")),
            lost,
            f(r, "max_stall_ms"),
            r["faults"],
            r["p50_us"],
            r["p99_us"],
            r["max_us"],
            f(r, "extra_rss_mib"),
            f(r, "restore_s"),
            f(r, "restore_gbps"),
            r["thp_before_mib"],
            r["thp_after_mib"],
            frac(f(r, "rate_after"), f(r, "rate_before")),
        );
    }
    s + &busy_markdown(rows)
        + &memfd_markdown(rows)
        + &phases_markdown(rows)
        + &fault_markdown(rows)
        + &lazy_markdown(rows)
}

/// A number of `v` with `digits`, or "–".
fn num(v: &Value, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "–".into(),
    }
}

/// Guest rate during the save as a share of its rate before, if both are known.
fn kept(r: &Value) -> Option<f64> {
    let before = f(r, "rate_before");
    match r["rate_during"].as_f64() {
        Some(d) if r["full"] == Value::Bool(true) && before > 0.0 => Some(d / before),
        _ => None,
    }
}

/// The busy cases' figures that show whether the guest noticed the save.
fn busy_markdown(rows: &[Value]) -> String {
    let mut s = String::new();
    s += "\n## Busy guests during the save\n\n";
    s += "Rate kept: guest steps/s during the save over its rate before. Longest gap: the longest time a vCPU's step \
          counter did not move during the save (the freeze included). Faults that waited: faults that found fault \
          staging at its cap. Downtime: the VMM's figure; guest held: the longest a vCPU was kept out of the guest. \
          Recovery: seconds from the end of the save to the end of the first 100 ms interval the guest ran at \
          ≥ 80 % of its rate before (at least 0.1; “> 15” if not within 15 s; the memfd table counts that as 15).\n\n";
    s += "| case | rate before steps/s | rate kept | longest gap ms | faults | faults that waited | peak staging MiB | downtime ms | guest held ms | recovery s |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        if r.get("error").is_some() || r["full"] != Value::Bool(true) {
            continue;
        }
        let st = &r["staging"];
        s += &format!(
            "| {} | {:.2e} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["case"].as_str().unwrap_or("?"),
            f(r, "rate_before"),
            kept(r).map_or("–".into(), |k| format!("{:.0} %", 100.0 * k)),
            num(&r["max_stall_ms"], 1),
            r["faults"],
            st["waits"],
            st["peak_bytes"]
                .as_u64()
                .map_or("–".into(), |b| (b >> 20).to_string()),
            num(&r["downtime_ms"], 2),
            num(&r["freeze_ms"]["guest_held"], 2),
            recovered(r),
        );
    }
    s
}

/// The recovery figure of a busy row.
fn recovered(r: &Value) -> String {
    match r["recovery_s"].as_f64() {
        Some(x) => format!("{x:.1}"),
        None => format!("> {}", RECOVERY_MAX.as_secs()),
    }
}

/// memfd cases against the same case on anonymous memory, with how many times worse memfd is.
fn memfd_markdown(rows: &[Value]) -> String {
    let mut s = String::new();
    s += "\n## memfd against anonymous memory\n\n";
    s += "Each memfd case next to the same case on anonymous memory (anon → memfd), and ×: how many times worse memfd \
          is (memfd ÷ anon for costs; anon ÷ memfd for the rate kept). Within 2× on every figure is the target.\n\n";
    s += "| case | downtime ms | × | save s | × | rate kept | × | longest gap ms | × | recovery s | × | fault waits ms | × | peak staging MiB | × | extra RSS MiB | × |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    let ok = |r: &&Value| r.get("error").is_none();
    for m in rows
        .iter()
        .filter(ok)
        .filter(|r| r["memfd"] == Value::Bool(true))
    {
        let name = m["case"].as_str().unwrap_or("?");
        let anon_name = name.trim_end_matches(" memfd");
        let Some(a) = rows
            .iter()
            .filter(ok)
            .find(|r| r["case"].as_str() == Some(anon_name))
        else {
            s += &format!("| {name} | no anonymous-memory case to compare |\n");
            continue;
        };
        let pair = |x: Option<f64>, y: Option<f64>, digits: usize, inverse: bool| {
            let show = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.digits$}"));
            let ratio = match (x, y) {
                (Some(x), Some(y)) if inverse && y > 0.0 => format!("{:.2}", x / y),
                (Some(x), Some(y)) if !inverse && x > 0.0 => format!("{:.2}", y / x),
                _ => "–".into(),
            };
            format!("{} → {} | {}", show(x), show(y), ratio)
        };
        let get = |r: &Value, k: &str| r[k].as_f64();
        // Not recovered within the watch: counted as the watch's length (a lower bound).
        let recovery_or_max = |r: &Value| {
            Some(
                r["recovery_s"]
                    .as_f64()
                    .unwrap_or(RECOVERY_MAX.as_secs_f64()),
            )
        };
        let peak = |r: &Value| {
            r["staging"]["peak_bytes"]
                .as_u64()
                .map(|b| (b >> 20) as f64)
        };
        s += &format!(
            "| {anon_name} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            pair(get(a, "downtime_ms"), get(m, "downtime_ms"), 2, false),
            pair(get(a, "duration_s"), get(m, "duration_s"), 2, false),
            pair(
                kept(a).map(|k| 100.0 * k),
                kept(m).map(|k| 100.0 * k),
                0,
                true
            ),
            pair(get(a, "max_stall_ms"), get(m, "max_stall_ms"), 1, false),
            pair(recovery_or_max(a), recovery_or_max(m), 1, false),
            pair(
                get(a, "fault_wait_total_ms"),
                get(m, "fault_wait_total_ms"),
                1,
                false
            ),
            pair(peak(a), peak(m), 0, false),
            pair(get(a, "extra_rss_mib"), get(m, "extra_rss_mib"), 0, false),
        );
    }
    s
}

/// The freeze's phases per case (`freeze_ms` of `snapctl save --json`), then p50 and max over the cases.
fn phases_markdown(rows: &[Value]) -> String {
    const PHASES: [&str; 6] = ["arm", "pause", "capture", "protect", "resume", "guest_held"];
    let mut s = String::new();
    s += "\n## Downtime phases\n\n";
    s += "The freeze's phases in ms (`freeze_ms` of `snapctl save --json`): arm (write-protect all RAM while the \
          guest still runs; on a VM's first save also the probe and preparing staging to its size; not downtime), pause (park every vCPU), capture (machine state), protect (write-protect \
          again what the guest wrote since the arming), resume, guest held (the longest a vCPU was out of the \
          guest: the downtime as the guest sees it). Last rows: p50 and max over the cases above.\n\n";
    s += "| case | downtime | arm | pause | capture | protect | resume | guest held |\n";
    s += "|---|---|---|---|---|---|---|---|\n";
    let mut cols: Vec<Vec<f64>> = vec![Vec::new(); PHASES.len() + 1];
    for r in rows {
        if r.get("error").is_some() {
            continue;
        }
        let mut line = format!(
            "| {} | {}",
            r["case"].as_str().unwrap_or("?"),
            num(&r["downtime_ms"], 2)
        );
        if let Some(d) = r["downtime_ms"].as_f64() {
            cols[0].push(d);
        }
        for (i, p) in PHASES.iter().enumerate() {
            let v = &r["freeze_ms"][p];
            line += &format!(" | {}", num(v, 2));
            if let Some(x) = v.as_f64() {
                cols[i + 1].push(x);
            }
        }
        s += &line;
        s += " |\n";
    }
    for (label, pick) in [("p50", 0.5), ("max", 1.0)] {
        s += &format!("| **{label}** |");
        for c in &mut cols {
            c.sort_by(f64::total_cmp);
            s += &match c.len() {
                0 => " – |".to_string(),
                n => format!(" {:.2} |", c[((n - 1) as f64 * pick).round() as usize]),
            };
        }
        s += "\n";
    }
    s
}

/// The fault table: where a fault's service time goes, and staging memory.
fn fault_markdown(rows: &[Value]) -> String {
    let mut s = String::new();
    s += "\n## Fault service and staging\n\n";
    s += "The save's own figures. Fault waits: fault service latency (fault read → release) summed over the save. \
          Staging: the most staging memory held (fault and scan staging) and the cap of fault staging; waits: faults \
          that found fault staging at its cap, and their total wait; scan units: units the scanner staged in fault \
          staging while the guest wrote; prepared: fault staging allocated before the freeze (`--prepare-staging`, by \
          default what the guest wrote since the VM's last save; on a VM's first save what it wrote while watched for up \
          to 50 ms before the freeze) and how long that took. \
          Per fault, the fault thread's mean µs: waiting in its batch behind earlier \
          faults (queue), claim, getting a buffer (staging), copy, release (unprotect + wake); per batch of events \
          read: the read itself and the bookkeeping after the batch.\n\n";
    s += "| case | faults | fault waits ms | staging peak / cap MiB | cap reached | staging waits (ms) | scan units staged | prepared MiB (ms) | queue / claim / staging / copy / release µs | read / bookkeeping µs per batch |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        if r.get("error").is_some() {
            continue;
        }
        let st = &r["staging"];
        let ph = &r["fault_phases_us"];
        let u = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
        let n = u(ph, "faults").max(1) as f64;
        let b = u(ph, "batches").max(1) as f64;
        let per = |k: &str, d: f64| u(ph, k) as f64 / d;
        s += &format!(
            "| {} | {} | {:.1} | {} / {} | {} | {} ({:.1}) | {} | {} ({:.0}) | {:.0} / {:.1} / {:.0} / {:.0} / {:.0} | {:.0} / {:.0} |\n",
            r["case"].as_str().unwrap_or("?"),
            r["faults"],
            f(r, "fault_wait_total_ms"),
            u(st, "peak_bytes") >> 20,
            u(st, "cap_bytes") >> 20,
            if st["cap_reached"] == Value::Bool(true) { "yes" } else { "no" },
            u(st, "waits"),
            u(st, "wait_total_us") as f64 / 1e3,
            u(st, "scan_units_staged"),
            u(st, "prepared_bytes") >> 20,
            st["prepare_ms"].as_f64().unwrap_or(0.0),
            per("queue_us", n),
            per("claim_us", n),
            per("staging_us", n),
            per("copy_us", n),
            per("release_us", n),
            per("read_us", b),
            per("bookkeeping_us", b),
        );
    }
    s
}

/// The second table: the same files restored with `snapctl restore --lazy`.
fn lazy_markdown(rows: &[Value]) -> String {
    let mut s = String::new();
    s += "\n## Lazy restore\n\n";
    s += "Each case's file again, restored with `snapctl restore --lazy` in a new VMM process. Running: from process start \
          to the guest's first progress past its freeze instant (busy) or a timer tick (idle), seen in `status` \
          (polled every few ms; the eager restore column above, for comparison). Start and first fault: the VMM's \
          `restore.start_ms` (work until the vCPUs start) and `restore.first_fault_ms`, from the restore's start. \
          Resident: seconds from the start until every page is filled; fill GB/s: guest RAM over that time after \
          the vCPUs started. THP: guest MiB on huge pages once resident → after the collapse. Rates: the guest's \
          steps/s while the fill runs and after `restore.done`, against its rate before the save.\n\n";
    s += "| case | running ms (eager) | start ms | first fault ms | faults | fault wait p50/p99/max µs | resident s | fill GB/s | THP MiB before→after (collapse ms) | rate filling/before | rate done/before |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    let opt = |v: &Value, digits: usize| match v.as_f64() {
        Some(x) => format!("{x:.digits$}"),
        None => "–".into(),
    };
    for r in rows {
        let case = r["case"].as_str().unwrap_or("?");
        let z = &r["lazy"];
        if let Some(e) = r.get("error").or_else(|| z.get("error")) {
            s += &format!("| {case} | FAILED: {e} |\n");
            continue;
        }
        if let Some(why) = z["skipped"].as_str() {
            s += &format!("| {case} | not measured: {why} |\n");
            continue;
        }
        let full = r["full"] == Value::Bool(true);
        let before = f(r, "rate_before");
        let frac = |v: &Value| match v.as_f64() {
            Some(a) if full && before > 0.0 => format!("{:.0} %", 100.0 * a / before),
            _ => "–".into(),
        };
        s += &format!(
            "| {case} | {} ({:.0}) | {} | {} | {} | {}/{}/{} | {} | {} | {}→{} ({}) | {} | {} |\n",
            opt(&z["running_ms"], 0),
            f(r, "restore_s") * 1e3,
            opt(&z["start_ms"], 1),
            opt(&z["first_fault_ms"], 1),
            z["faults"],
            z["fault_wait_p50_us"],
            z["fault_wait_p99_us"],
            z["fault_wait_max_us"],
            opt(&z["resident_s"], 2),
            opt(&z["fill_gb_s"], 2),
            z["thp_before_mib"],
            z["thp_after_mib"],
            opt(&z["collapse_ms"], 0),
            frac(&z["rate_filling"]),
            frac(&z["rate_done"]),
        );
    }
    s
}
