//! Where a busy guest's time goes around a save, seen through KVM's own counters. The built-in
//! guest writes random pages over all of its RAM at full speed; the VMM runs under `perf stat -I
//! 250`, which counts KVM's shadow-MMU tracepoints (mappings installed, guest page-table walks,
//! shadow pages zapped, MMU-notifier invalidations, async page faults) and the process's host page
//! faults; every 250 ms the example also samples the guest's step counter and the VM's gauges
//! `pages_4k`/`pages_2m` (`/sys/kernel/debug/kvm/<pid>-<vmfd>/`, read only). It covers ~4 s before
//! a save, the save and ~8 s after, and prints per phase the guest's rate (share of before), the
//! counters per second and the vCPU time lost per mapping installed. The boot line is the guest's
//! first touch of all its memory (fresh mappings, 4 KiB or 2 MiB).
//!
//! `cargo build --release -p snapctl && cargo run --release -p snapctl --example kvm_counters
//! [-- --mem 1G --dir /tmp --cases anon:1:on,memfd:1:on,memfd:1:off --trace]` (uses the `snapctl`
//! binary beside the example; a case is `BACKEND:VCPUS:TRACK-WRITES`, BACKEND one of `anon`,
//! `memfd`, `hugetlbfs`; `--trace` prints every 250 ms sample; `--save-args "--max-staging 16M"` passes arguments to
//! every save). Needs root and `perf`; skips with a
//! message when debugfs is not mounted or perf cannot count KVM's tracepoints. Results:
//! `docs/PERFORMANCE.md`, "Where a busy guest's time goes under PVM".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

const KVM_DEBUGFS: &str = "/sys/kernel/debug/kvm";
/// Gauges read from the VM's debugfs directory each sample (the cumulative counters there, such
/// as `pf_fixed` or `exits`, are not readable on every host: they are counted with perf instead).
const GAUGES: &[&str] = &["pages_4k", "pages_2m", "nx_lpage_splits", "mmu_unsync"];
/// Events counted with `perf stat` over the VMM process and all its threads: KVM's shadow-MMU
/// tracepoints (they fire under PVM, whose own exit path has no `kvm_exit`/`kvm_page_fault`), host
/// page faults and context switches.
const EVENTS: &[(&str, &str)] = &[
    ("kvmmmu:kvm_mmu_pagetable_walk", "walk"),
    ("kvmmmu:kvm_mmu_spte_requested", "spte_req"),
    ("kvmmmu:kvm_mmu_set_spte", "set_spte"),
    ("kvmmmu:kvm_mmu_get_page", "get_page"),
    ("kvmmmu:kvm_mmu_prepare_zap_page", "zap"),
    ("kvm:kvm_unmap_hva_range", "unmap_hva"),
    ("kvm:kvm_try_async_get_page", "async_pf"),
    ("kvm:kvm_emulate_insn", "emulate"),
    ("kvm:kvm_userspace_exit", "user_exit"),
    ("page-faults", "host_pf"),
    ("context-switches", "cs"),
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
    Some(
        s["steps"]
            .as_array()?
            .iter()
            .filter_map(Value::as_u64)
            .sum(),
    )
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

fn read_gauges(dir: &Path) -> BTreeMap<&'static str, u64> {
    GAUGES
        .iter()
        .filter_map(|&c| {
            let v = std::fs::read_to_string(dir.join(c)).ok()?;
            Some((c, v.trim().parse().ok()?))
        })
        .collect()
}

/// A sample of the guest's step counter and the VM's gauges, `t` seconds after the VMM started.
#[derive(Clone)]
struct Sample {
    t: f64,
    steps: u64,
    gauges: BTreeMap<&'static str, u64>,
}

impl Sample {
    fn g(&self, k: &str) -> u64 {
        self.gauges.get(k).copied().unwrap_or(0)
    }
}

/// `perf stat -I` intervals: end time (s after start) and each event's count in the interval.
type Intervals = Vec<(f64, BTreeMap<&'static str, u64>)>;

fn parse_perf(text: &str) -> Intervals {
    let mut out: Intervals = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split(',').collect();
        let (Some(t), Some(count), Some(ev)) = (f.first(), f.get(1), f.get(3)) else {
            continue;
        };
        let (Ok(t), Some(&(_, key))) = (
            t.trim().parse::<f64>(),
            EVENTS.iter().find(|(e, _)| e == ev),
        ) else {
            continue;
        };
        let n = count.parse().unwrap_or(0);
        match out.last_mut() {
            Some((lt, m)) if (*lt - t).abs() < 1e-6 => {
                m.insert(key, n);
            }
            _ => out.push((t, BTreeMap::from([(key, n)]))),
        }
    }
    out
}

/// Sum of `key` over the intervals ending in `(a, b]`.
fn sum(iv: &Intervals, key: &str, a: f64, b: f64) -> f64 {
    iv.iter()
        .filter(|(t, _)| *t > a && *t <= b)
        .map(|(_, m)| m.get(key).copied().unwrap_or(0) as f64)
        .sum()
}

/// The VMM under `perf stat`: killed (by PID) if still running when dropped.
struct Vmm {
    perf: Child,
    pid: u32,
}
impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
        let _ = self.perf.wait();
    }
}

/// One row: the phase between samples `a` and `b`, against the guest's rate before (`before`).
fn row(name: &str, iv: &Intervals, a: &Sample, b: &Sample, before: f64, vcpus: f64) -> String {
    let dt = (b.t - a.t).max(1e-9);
    let rate = (b.steps - a.steps) as f64 / dt;
    let share = if before > 0.0 { rate / before } else { 1.0 };
    let n = |k: &str| sum(iv, k, a.t, b.t);
    let set = n("set_spte");
    // vCPU time the guest lost against its rate before, per shadow-MMU mapping installed.
    let lost = (1.0 - share).max(0.0) * dt * vcpus;
    let cost = if set > 0.0 && share < 0.95 {
        format!("{:.0}", lost / set * 1e6)
    } else {
        "–".into()
    };
    format!(
        "| {name} | {dt:.2} | {:.2} M/s ({:.0} %) | {:.0} / {:.0} / {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {cost} | {} → {} / {} → {} |",
        rate / 1e6,
        share * 100.0,
        n("walk") / dt,
        n("spte_req") / dt,
        set / dt,
        n("zap"),
        n("unmap_hva"),
        n("async_pf") / dt,
        n("host_pf") / dt,
        n("cs") / dt,
        n("emulate") / dt,
        a.g("pages_4k"),
        b.g("pages_4k"),
        a.g("pages_2m"),
        b.g("pages_2m"),
    )
}

const HEADER: &str = "| phase | s | guest rate (of before) | shadow walks / spte requested / set per s | shadow pages zapped | MMU-notifier unmaps | async PF/s | host PF/s | ctx sw/s | insn emulated/s | µs vCPU lost per spte set | pages_4k / pages_2m |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

fn case(
    dir: &Path,
    mem: &str,
    (backend, vcpus, track): (&str, u8, &str),
    save_args: &[&str],
    trace: bool,
) {
    let tag = std::process::id();
    let sock = dir.join(format!("kvmcnt-{tag}.sock"));
    let snap = dir.join(format!("kvmcnt-{tag}.snap"));
    let perf_out = dir.join(format!("kvmcnt-{tag}.perf"));
    let err_out = dir.join(format!("kvmcnt-{tag}.err"));
    let serial = dir.join(format!("kvmcnt-{tag}.serial"));
    let cleanup = || {
        for f in [&sock, &snap, &perf_out, &err_out, &serial] {
            let _ = std::fs::remove_file(f);
        }
    };
    let _ = std::fs::remove_file(&sock);
    let v = vcpus.to_string();
    let events: Vec<&str> = EVENTS.iter().map(|(e, _)| *e).collect();
    // The VMM's own output (its errors among it).
    let out_file = std::fs::File::create(&err_out).expect("output file");
    let t_boot = Instant::now();
    let perf = Command::new("perf")
        .args(["stat", "-I", "250", "-x", ",", "-o"])
        .arg(&perf_out)
        .args(["-e", &events.join(","), "--"])
        .arg(snapctl())
        .args([
            "boot",
            "--mem",
            mem,
            "--mem-backend",
            backend,
            "--vcpus",
            &v,
        ])
        .args(["--write-rate", "full", "--track-writes", track])
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(&serial)
        .stdout(out_file.try_clone().expect("output file"))
        .stderr(out_file)
        .spawn()
        .expect("perf stat -- snapctl boot");
    let perf_pid = perf.id();
    let children = format!("/proc/{perf_pid}/task/{perf_pid}/children");
    let pid = loop {
        let c = std::fs::read_to_string(&children).unwrap_or_default();
        if let Some(p) = c.split_whitespace().next().and_then(|p| p.parse().ok()) {
            break p;
        }
        assert!(
            t_boot.elapsed() < Duration::from_secs(10),
            "snapctl not started under perf"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut vmm = Vmm { perf, pid };
    // The VMM ended before its guest ran (e.g. no hugetlbfs pages reserved): say why.
    let ended = |vmm: &mut Vmm| {
        if let Ok(Some(_)) = vmm.perf.try_wait() {
            let err = std::fs::read_to_string(&err_out).unwrap_or_default();
            let err: Vec<&str> = err.lines().filter(|l| l.starts_with("snapctl")).collect();
            println!(
                "snapctl boot ended before its guest ran: {}",
                err.join("; ")
            );
            cleanup();
            return true;
        }
        false
    };
    println!(
        "\n### {mem}, {backend}, {vcpus} vCPU, --track-writes {track}, save {}\n",
        save_args.join(" ")
    );
    let kvm = loop {
        if let Some(d) = vm_dir(pid) {
            break d;
        }
        if ended(&mut vmm) {
            return;
        }
        assert!(
            t_boot.elapsed() < Duration::from_secs(30),
            "no KVM debugfs dir for pid {pid}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // Boot: the guest's fill touches all of its memory once (fresh mappings).
    loop {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok()
            && ctl(&sock, &["status", "--json"]).is_some_and(|s| s["fill_done"] == true)
        {
            break;
        }
        if ended(&mut vmm) {
            return;
        }
        assert!(t_boot.elapsed() < Duration::from_secs(120), "boot");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fill_done = t_boot.elapsed().as_secs_f64();
    let boot_gauges = read_gauges(&kvm);

    // Sampler: every 250 ms, the guest's steps and the VM's gauges.
    let stop = AtomicBool::new(false);
    let (samples, save, save_at) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut out = Vec::new();
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let gauges = read_gauges(&kvm);
                if let Some(st) = steps(&sock) {
                    out.push(Sample {
                        t: t_boot.elapsed().as_secs_f64(),
                        steps: st,
                        gauges,
                    });
                }
                next += SAMPLE;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            out
        });
        std::thread::sleep(Duration::from_secs(4));
        let _ = std::fs::remove_file(&snap);
        let start = t_boot.elapsed().as_secs_f64();
        let mut a = vec!["save", "--out", snap.to_str().unwrap(), "--json"];
        a.extend(save_args);
        let save = ctl(&sock, &a);
        let end = t_boot.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(8));
        stop.store(true, Ordering::Relaxed);
        (sampler.join().expect("sampler"), save, (start, end))
    });
    let _ = std::fs::remove_file(&snap);
    let _ = ctl(&sock, &["shutdown"]);
    drop(vmm);
    let iv = parse_perf(&std::fs::read_to_string(&perf_out).unwrap_or_default());
    cleanup();
    let set = sum(&iv, "set_spte", 0.0, fill_done);
    println!(
        "boot to fill done (first touch of all RAM): {fill_done:.2} s; shadow walks {:.0}, sptes set \
         {set:.0}, host page faults {:.0}; pages_4k {}, pages_2m {}; {:.0} µs of vCPU time per spte set",
        sum(&iv, "walk", 0.0, fill_done),
        sum(&iv, "host_pf", 0.0, fill_done),
        boot_gauges.get("pages_4k").copied().unwrap_or(0),
        boot_gauges.get("pages_2m").copied().unwrap_or(0),
        fill_done * vcpus as f64 / set.max(1.0) * 1e6
    );
    let (start, end) = save_at;
    let save = save.unwrap_or(Value::Null);
    println!(
        "save: {:.2} s, downtime {:.2} ms, userfaultfd faults served {}, guest rate during (VMM's figure) {:.2} M/s",
        save["duration_s"].as_f64().unwrap_or(f64::NAN),
        save["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        save["faults_served"],
        save["guest_steps_per_s_during"].as_f64().unwrap_or(f64::NAN) / 1e6
    );
    if samples.len() < 4 || iv.is_empty() {
        println!(
            "too few samples ({}, {} perf intervals)",
            samples.len(),
            iv.len()
        );
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
    println!("{}", row("before", &iv, &first, &s_start, before, vc));
    println!("{}", row("save", &iv, &s_start, &s_end, before, vc));
    for (a, b) in [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0), (6.0, 8.0)] {
        let (x, y) = (at(end + a), at(end + b));
        if y.t > x.t {
            println!(
                "{}",
                row(&format!("after +{a:.0}–{b:.0} s"), &iv, &x, &y, before, vc)
            );
        }
    }
    if trace {
        println!("\nt s (0 = save start) | rate M/s | walks/s | sptes set/s | zapped | unmaps | host PF/s | pages_4k | pages_2m");
        for w in samples.windows(2) {
            let dt = w[1].t - w[0].t;
            let n = |k: &str| sum(&iv, k, w[0].t, w[1].t);
            println!(
                "{:+.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {}",
                w[1].t - start,
                (w[1].steps - w[0].steps) as f64 / dt / 1e6,
                n("walk") / dt,
                n("set_spte") / dt,
                n("zap"),
                n("unmap_hva"),
                n("host_pf") / dt,
                w[1].g("pages_4k"),
                w[1].g("pages_2m"),
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
    let perf_ok = Command::new("perf")
        .args([
            "stat",
            "-x",
            ",",
            "-e",
            "kvmmmu:kvm_mmu_set_spte",
            "--",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !perf_ok {
        println!(
            "`perf stat -e kvmmmu:kvm_mmu_set_spte` does not run here: install perf (linux-tools) \
             and run as root to count KVM's shadow-MMU events; skipping"
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
    // Extra arguments of every `snapctl save` (e.g. `--save-args "--max-staging 16M"`).
    let save_args = opt("--save-args", "");
    let save_args: Vec<&str> = save_args.split_whitespace().collect();
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
        case(&dir, &mem, (backend, vcpus, track), &save_args, trace);
    }
}
