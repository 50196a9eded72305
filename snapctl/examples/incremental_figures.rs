//! Figures of incremental saves with the built-in guest (real KVM, real userfaultfd, real files):
//! the guest's rate with write tracking off (before any save) and on (after one), and the freeze
//! and total time of incremental saves after the guest wrote a hot set of ~1 % and ~6 % of RAM,
//! or all of it. With `--random`: a guest writing random pages over all of its RAM (~1 % and
//! ~6 % of the pages between saves), full and incremental saves with page hashes and without
//! (`--no-page-hashes`: whole written units).
//!
//! `cargo build --release -p snapctl && cargo run --release -p snapctl --example
//! incremental_figures [-- --mem 1G --dir /tmp --backend anon|memfd --random]` (uses the `snapctl` binary
//! beside the example).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn snapctl() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("snapctl"))
        .expect("target directory")
}

fn ctl(sock: &Path, args: &[&str]) -> Value {
    let out = Command::new(snapctl())
        .args(args)
        .arg("--api-sock")
        .arg(sock)
        .output()
        .expect("running snapctl");
    assert!(
        out.status.success(),
        "snapctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn steps(sock: &Path) -> u64 {
    ctl(sock, &["status", "--json"])["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

/// Guest steps per second over `secs`.
fn rate(sock: &Path, secs: f64) -> f64 {
    let (s0, t0) = (steps(sock), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    (steps(sock) - s0) as f64 / t0.elapsed().as_secs_f64()
}

struct Vmm(Child);
impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scenario(dir: &Path, mem: &str, backend: &str, name: &str, guest: &[&str]) {
    let sock = dir.join("incr-fig.sock");
    let _ = std::fs::remove_file(&sock);
    let _vmm = Vmm(Command::new(snapctl())
        .args(["boot", "--mem", mem, "--mem-backend", backend])
        .args(guest)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join("incr-fig.serial"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("boot"));
    let t0 = Instant::now();
    loop {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok()
            && ctl(&sock, &["status", "--json"])["fill_done"] == true
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "boot");
        std::thread::sleep(Duration::from_millis(50));
    }
    let off = rate(&sock, 3.0);
    let mut parent = dir.join("incr-fig-0.snap");
    let _ = std::fs::remove_file(&parent);
    let p = parent.to_str().unwrap().to_string();
    let base = ctl(&sock, &["save", "--out", &p, "--json"]);
    // The first window after a save includes the first write to every unit (one fault each).
    let on_first = rate(&sock, 1.0);
    let on = rate(&sock, 3.0);
    println!(
        "{name}: guest rate tracked / untracked: {:.1} % (first second after the save {:.1} %); \
         full save {:.0} ms, downtime {:.2} ms",
        on / off * 100.0,
        on_first / off * 100.0,
        base["duration_s"].as_f64().unwrap() * 1e3,
        base["downtime_ms"].as_f64().unwrap()
    );
    for i in 1..=3 {
        std::thread::sleep(Duration::from_millis(1000));
        let dirty = ctl(&sock, &["status", "--json"])["dirty_bytes"]
            .as_u64()
            .unwrap_or(0);
        let child = dir.join(format!("incr-fig-{i}.snap"));
        let _ = std::fs::remove_file(&child);
        let s = ctl(
            &sock,
            &[
                "save",
                "--parent",
                parent.to_str().unwrap(),
                "--out",
                child.to_str().unwrap(),
                "--json",
            ],
        );
        assert_eq!(s["parent"], parent.to_str().unwrap(), "{s}");
        let f = &s["freeze_ms"];
        println!(
            "  child {i}: dirty before {:.1} MiB ({:.1} % of RAM); stored {:.1} MiB, file {:.1} MiB; \
             downtime {:.2} ms (pause {:.2}, capture {:.2}, harvest+protect {:.2}, resume {:.2}); \
             total {:.0} ms; faults {}",
            dirty as f64 / (1u64 << 20) as f64,
            dirty as f64 / s["guest_bytes"].as_f64().unwrap() * 100.0,
            s["stored_bytes"].as_f64().unwrap() / (1u64 << 20) as f64,
            s["file_bytes"].as_f64().unwrap() / (1u64 << 20) as f64,
            s["downtime_ms"].as_f64().unwrap(),
            f["pause"].as_f64().unwrap(),
            f["capture"].as_f64().unwrap(),
            f["protect"].as_f64().unwrap(),
            f["resume"].as_f64().unwrap(),
            s["duration_s"].as_f64().unwrap() * 1e3,
            s["faults_served"]
        );
        let _ = std::fs::remove_file(&parent);
        parent = child;
    }
    let _ = std::fs::remove_file(&parent);
    let _ = ctl(&sock, &["shutdown"]);
}

/// `save ARGS --out OUT --json` (after removing OUT).
fn save_to(sock: &Path, out: &Path, args: &[&str]) -> Value {
    let _ = std::fs::remove_file(out);
    let mut a = vec!["save", "--out", out.to_str().unwrap(), "--json"];
    a.extend(args);
    ctl(sock, &a)
}

fn mib(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64
}

/// A guest writing random pages over all of its RAM at `rate` pages/s per vCPU: full saves with
/// and without page hashes, and incremental saves 1 s apart with them (pages of written units
/// compared, only changed ones stored) and without (`--no-page-hashes`: whole written units).
fn random_scenario(dir: &Path, mem: &str, backend: &str, name: &str, rate: u64) {
    let sock = dir.join("incr-fig.sock");
    let _ = std::fs::remove_file(&sock);
    let r = rate.to_string();
    let _vmm = Vmm(Command::new(snapctl())
        .args([
            "boot",
            "--mem",
            mem,
            "--mem-backend",
            backend,
            "--write-rate",
            &r,
        ])
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join("incr-fig.serial"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("boot"));
    let t0 = Instant::now();
    loop {
        if std::os::unix::net::UnixStream::connect(&sock).is_ok()
            && ctl(&sock, &["status", "--json"])["fill_done"] == true
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "boot");
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("{name} ({rate} pages/s per vCPU, random over all RAM):");
    let full = |hashes: bool, i: usize| {
        let out = dir.join(format!("incr-fig-full{i}.snap"));
        let args: &[&str] = if hashes { &[] } else { &["--no-page-hashes"] };
        let s = save_to(&sock, &out, args);
        println!(
            "  full save {} page hashes: {:.0} ms, {:.1} MiB/s of guest RAM",
            if hashes { "with" } else { "without" },
            s["duration_s"].as_f64().unwrap() * 1e3,
            mib(&s, "guest_bytes") / s["duration_s"].as_f64().unwrap()
        );
        out
    };
    for (round, hashes) in [(0, true), (1, false), (2, true)] {
        let mut parent = full(hashes, round);
        if round == 2 {
            let _ = std::fs::remove_file(&parent);
            break;
        }
        for i in 1..=2 {
            std::thread::sleep(Duration::from_millis(1000));
            let dirty = ctl(&sock, &["status", "--json"])["dirty_bytes"]
                .as_u64()
                .unwrap_or(0);
            let child = dir.join(format!("incr-fig-{round}-{i}.snap"));
            let p = parent.to_str().unwrap().to_string();
            let mut args = vec!["--parent", p.as_str()];
            if !hashes {
                args.push("--no-page-hashes");
            }
            let s = save_to(&sock, &child, &args);
            assert_eq!(s["parent"], p.as_str(), "{s}");
            let pages = s["pages_saved"].as_f64().unwrap();
            let stored = s["data_pages"].as_f64().unwrap() + s["zero_pages"].as_f64().unwrap();
            println!(
                "  child {i} {}: written units {:.0} MiB ({:.0} % of RAM); compared {} pages, \
                 {} unchanged; stored {:.1} MiB ({:.2} % of pages), file {:.1} MiB; total {:.0} ms, \
                 downtime {:.2} ms",
                if hashes { "with hashes   " } else { "whole units   " },
                dirty as f64 / (1u64 << 20) as f64,
                dirty as f64 / s["guest_bytes"].as_f64().unwrap() * 100.0,
                s["pages_compared"],
                s["pages_unchanged"],
                mib(&s, "stored_bytes"),
                stored / pages * 100.0,
                mib(&s, "file_bytes"),
                s["duration_s"].as_f64().unwrap() * 1e3,
                s["downtime_ms"].as_f64().unwrap()
            );
            let _ = std::fs::remove_file(&parent);
            parent = child;
        }
        let _ = std::fs::remove_file(&parent);
    }
    let _ = ctl(&sock, &["shutdown"]);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |k: &str, d: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| d.to_string())
    };
    let mem = opt("--mem", "1G");
    let dir = PathBuf::from(opt("--dir", "/tmp"));
    let backend = opt("--backend", "anon");
    let mib: u64 = match mem.strip_suffix('G') {
        Some(g) => g.parse::<u64>().unwrap() << 10,
        None => mem.trim_end_matches('M').parse().unwrap(),
    };
    // Two vCPUs, each rewriting its own hot set: ~1 % and ~6 % of RAM in all.
    let one = format!("{}K", (mib << 10) / 100 / 2);
    let six = format!("{}K", (mib << 10) * 6 / 100 / 2);
    println!("{mem} guest, {backend} memory");
    if args.iter().any(|a| a == "--random") {
        // Two vCPUs writing random pages; ~1 % and ~6 % of the pages per interval of about 1.5 s
        // (1 s, then the save).
        let pages = mib << 8;
        random_scenario(&dir, &mem, &backend, "random ~1 %", pages / 100 / 3);
        random_scenario(&dir, &mem, &backend, "random ~6 %", pages * 6 / 100 / 3);
        return;
    }
    scenario(
        &dir,
        &mem,
        &backend,
        "hot set ~1 %",
        &["--working-set", &one],
    );
    scenario(
        &dir,
        &mem,
        &backend,
        "hot set ~6 %",
        &["--working-set", &six],
    );
    scenario(
        &dir,
        &mem,
        &backend,
        "all of RAM (full rate)",
        &["--write-rate", "full"],
    );
}
