//! Where a busy guest's time goes around a save, seen through KVM's own counters (debugfs,
//! `/sys/kernel/debug/kvm/<pid>-<vmfd>/`, read only). The built-in guest writes random pages over
//! all of its RAM at full speed; every 250 ms the example samples its step counter and the VM's
//! KVM statistics: ~4 s before a save, during it and ~8 s after. Per phase it prints the guest's
//! rate (share of before), shadow-MMU page faults taken/fixed per second, shadow pages zapped,
//! exits per second, and the implied cost of a fault (vCPU time lost ÷ faults fixed). It also
//! reports the boot: the guest's first touch of all its memory (fresh mappings, 4 KiB or 2 MiB).
//!
//! `cargo build --release -p snapctl && cargo run --release -p snapctl --example kvm_counters
//! [-- --mem 1G --dir /tmp --cases anon:1:on,memfd:1:on,memfd:1:off --trace]` (uses the `snapctl`
//! binary beside the example; a case is `BACKEND:VCPUS:TRACK-WRITES`). Skips with a message when
//! debugfs is not mounted or not readable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

const KVM_DEBUGFS: &str = "/sys/kernel/debug/kvm";
/// Counters read each sample (those the running kernel does not have are left out).
const COUNTERS: &[&str] = &[
    "pf_taken",
    "pf_fixed",
    "pf_guest",
    "pf_spurious",
    "pf_fast",
    "pf_emulate",
    "mmu_shadow_zapped",
    "mmu_pte_write",
    "mmu_cache_miss",
    "mmu_recycled",
    "exits",
    "insn_emulation",
    "tlb_flush",
    "remote_tlb_flush",
    "invlpg",
    "nx_lpage_splits",
    "pages_4k",
    "pages_2m",
    "halt_exits",
    "signal_exits",
];
const SAMPLE: Duration = Duration::from_millis(250);

fn snapctl() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("snapctl"))
        .expect("target directory")
}

fn ctl(sock: &Path, args: &[&str]) -> Option<Value> {
    let out = Command::new(snapctl())
        .args(args)
        .arg("--api-sock")
        .arg(sock)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "snapctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn steps(sock: &Path) -> Option<u64> {
    let s = ctl(sock, &["status", "--json"])?;
    Some(s["steps"].as_array()?.iter().filter_map(Value::as_u64).sum())
}

/// The VM's debugfs directory (`<pid>-<vmfd>`), once KVM created it.
fn vm_dir(pid: u32) -> Option<PathBuf> {
    std::fs::read_dir(KVM_DEBUGFS)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&format!("{pid}-")))
        })
        .map(|e| e.path())
}

fn read_counters(dir: &Path) -> BTreeMap<&'static str, u64> {
    COUNTERS
        .iter()
        .filter_map(|&c| {
            let v = std::fs::read_to_string(dir.join(c)).ok()?;
            Some((c, v.trim().parse().ok()?))
        })
        .collect()
}

#[derive(Clone)]
struct Sample {
    t: f64,
    steps: u64,
    kvm: BTreeMap<&'static str, u64>,
}

struct Vmm(Child);
impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn delta(a: &Sample, b: &Sample, k: &str) -> f64 {
    b.kvm.get(k).copied().unwrap_or(0) as f64 - a.kvm.get(k).copied().unwrap_or(0) as f64
}

/// One row: counters between samples `a` and `b`, against the guest's rate before (`before`).
fn row(name: &str, a: &Sample, b: &Sample, before: f64, vcpus: f64) -> String {
    let dt = (b.t - a.t).max(1e-9);
    let rate = (b.steps - a.steps) as f64 / dt;
    let share = if before > 0.0 { rate / before } else { 1.0 };
    let fixed = delta(a, b, "pf_fixed");
    // vCPU time the guest lost against its rate before, per shadow-MMU fault fixed.
    let lost = (1.0 - share).max(0.0) * dt * vcpus;
    let cost = if fixed > 0.0 && share < 0.98 {
        format!("{:.1}", lost / fixed * 1e6)
    } else {
        "–".into()
    };
    format!(
        "| {name} | {dt:.2} | {:.2} M/s ({:.0} %) | {:.0} / {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} → {} / {} → {} |",
        rate / 1e6,
        share * 100.0,
        delta(a, b, "pf_taken") / dt,
        fixed / dt,
        delta(a, b, "pf_spurious") / dt,
        delta(a, b, "mmu_shadow_zapped"),
        delta(a, b, "exits") / dt,
        delta(a, b, "tlb_flush") / dt + delta(a, b, "remote_tlb_flush") / dt,
        delta(a, b, "insn_emulation") / dt,
        cost,
        a.kvm.get("pages_4k").copied().unwrap_or(0),
        b.kvm.get("pages_4k").copied().unwrap_or(0),
        a.kvm.get("pages_2m").copied().unwrap_or(0),
        b.kvm.get("pages_2m").copied().unwrap_or(0),
    )
}

const HEADER: &str = "| phase | s | guest rate (of before) | pf taken / fixed per s | pf spurious/s | shadow pages zapped | exits/s | TLB flushes/s | insn emulated/s | µs vCPU lost per fault fixed | pages_4k / pages_2m (start → end) |\n|---|---|---|---|---|---|---|---|---|---|---|";

fn case(dir: &Path, mem: &str, backend: &str, vcpus: u8, track: &str, trace: bool) {
    let tag = std::process::id();
    let sock = dir.join(format!("kvmcnt-{tag}.sock"));
    let snap = dir.join(format!("kvmcnt-{tag}.snap"));
    let _ = std::fs::remove_file(&sock);
    let v = vcpus.to_string();
    let t_boot = Instant::now();
    let child = Command::new(snapctl())
        .args(["boot", "--mem", mem, "--mem-backend", backend, "--vcpus", &v])
        .args(["--write-rate", "full", "--track-writes", track])
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join(format!("kvmcnt-{tag}.serial")))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("boot");
    let pid = child.id();
    let _vmm = Vmm(child);
    println!("\n### {mem}, {backend}, {vcpus} vCPU, --track-writes {track}\n");
    // Boot: the guest's fill touches all of its memory once (fresh mappings).
    let kvm = loop {
        if let Some(d) = vm_dir(pid) {
            break d;
        }
        assert!(t_boot.elapsed() < Duration::from_secs(30), "no KVM debugfs dir for pid {pid}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let boot0 = Sample {
        t: 0.0,
        steps: 0,
        kvm: read_counters(&kvm),
    };
    loop {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok()
            && ctl(&sock, &["status", "--json"]).is_some_and(|s| s["fill_done"] == true)
        {
            break;
        }
        assert!(t_boot.elapsed() < Duration::from_secs(120), "boot");
        std::thread::sleep(Duration::from_millis(20));
    }
    let boot1 = Sample {
        t: t_boot.elapsed().as_secs_f64(),
        steps: 0,
        kvm: read_counters(&kvm),
    };
    let fixed = delta(&boot0, &boot1, "pf_fixed");
    println!(
        "boot to fill done (first touch of all RAM): {:.2} s; pf taken {:.0}, fixed {:.0}; pages_4k {}, \
         pages_2m {}; exits {:.0}; {:.1} µs of boot per fault fixed",
        boot1.t,
        delta(&boot0, &boot1, "pf_taken"),
        fixed,
        boot1.kvm.get("pages_4k").copied().unwrap_or(0),
        boot1.kvm.get("pages_2m").copied().unwrap_or(0),
        delta(&boot0, &boot1, "exits"),
        boot1.t * vcpus as f64 / fixed.max(1.0) * 1e6
    );

    // Sampler: every 250 ms, steps and counters.
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let (samples, save, save_at) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut out = Vec::new();
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let kvm_c = read_counters(&kvm);
                if let Some(st) = steps(&sock) {
                    out.push(Sample {
                        t: t0.elapsed().as_secs_f64(),
                        steps: st,
                        kvm: kvm_c,
                    });
                }
                next += SAMPLE;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            out
        });
        std::thread::sleep(Duration::from_secs(4));
        let _ = std::fs::remove_file(&snap);
        let start = t0.elapsed().as_secs_f64();
        let save = ctl(&sock, &["save", "--out", snap.to_str().unwrap(), "--json"]);
        let end = t0.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(8));
        stop.store(true, Ordering::Relaxed);
        (sampler.join().expect("sampler"), save, (start, end))
    });
    let _ = std::fs::remove_file(&snap);
    let _ = ctl(&sock, &["shutdown"]);
    let (start, end) = save_at;
    let save = save.unwrap_or(Value::Null);
    println!(
        "save: {:.2} s, downtime {:.2} ms, uffd faults served {}, guest rate during (VMM's figure) {:.2} M/s",
        save["duration_s"].as_f64().unwrap_or(f64::NAN),
        save["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        save["faults_served"],
        save["guest_steps_per_s_during"].as_f64().unwrap_or(f64::NAN) / 1e6
    );
    if samples.len() < 4 {
        println!("too few samples ({})", samples.len());
        return;
    }
    // Phase boundaries: the samples nearest to them.
    let at = |t: f64| {
        samples
            .iter()
            .min_by(|a, b| (a.t - t).abs().total_cmp(&(b.t - t).abs()))
            .unwrap()
            .clone()
    };
    let first = samples.first().unwrap().clone();
    let (s_start, s_end) = (at(start), at(end));
    let before = (s_start.steps - first.steps) as f64 / (s_start.t - first.t).max(1e-9);
    let vc = vcpus as f64;
    println!("{HEADER}");
    println!("{}", row("before", &first, &s_start, before, vc));
    println!("{}", row("save", &s_start, &s_end, before, vc));
    for (a, b) in [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0), (6.0, 8.0)] {
        let (x, y) = (at(end + a), at(end + b));
        if y.t > x.t {
            println!(
                "{}",
                row(&format!("after +{a:.0}–{b:.0} s"), &x, &y, before, vc)
            );
        }
    }
    if trace {
        println!("\nt s (0 = save start) | rate M/s | pf_fixed/s | zapped | exits/s | pages_4k | pages_2m");
        for w in samples.windows(2) {
            let dt = w[1].t - w[0].t;
            println!(
                "{:+.2} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {}",
                w[1].t - start,
                (w[1].steps - w[0].steps) as f64 / dt / 1e6,
                delta(&w[0], &w[1], "pf_fixed") / dt,
                delta(&w[0], &w[1], "mmu_shadow_zapped"),
                delta(&w[0], &w[1], "exits") / dt,
                w[1].kvm.get("pages_4k").copied().unwrap_or(0),
                w[1].kvm.get("pages_2m").copied().unwrap_or(0),
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |k: &str, d: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| d.to_string())
    };
    let readable = std::fs::read_dir(KVM_DEBUGFS).is_ok_and(|mut d| d.next().is_some());
    if !readable {
        println!(
            "{KVM_DEBUGFS} is not there or not readable: mount debugfs \
             (`mount -t debugfs none /sys/kernel/debug`, as root) to see KVM's counters; skipping"
        );
        return;
    }
    let mem = opt("--mem", "1G");
    let dir = PathBuf::from(opt("--dir", "/tmp"));
    let cases = opt(
        "--cases",
        "anon:1:on,anon:2:on,memfd:1:on,memfd:2:on,anon:1:off,memfd:1:off",
    );
    let trace = args.iter().any(|a| a == "--trace");
    println!(
        "host: shmem_enabled {}, THP enabled {}",
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
            .unwrap_or_default()
            .trim(),
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default()
            .trim()
    );
    for c in cases.split(',') {
        let p: Vec<&str> = c.split(':').collect();
        let (backend, vcpus, track) = (
            p.first().copied().unwrap_or("anon"),
            p.get(1).and_then(|v| v.parse().ok()).unwrap_or(1),
            p.get(2).copied().unwrap_or("on"),
        );
        case(&dir, &mem, backend, vcpus, track, trace);
    }
}
