//! `cargo xtask bench --only migrate [--quick] [--mem MIB,…]`: live migration of the built-in guest
//! over loopback TCP, idle and full speed, beside a raw save of the same guest to a file: downtime
//! (pause → the destination runs), bytes on the wire against the data (pieces that are not all
//! zeros), total time against the raw save, the destination's demand-fault wait p50/p99, and the
//! guest's rate on the destination while its memory arrives and in the seconds after. Guests: idle,
//! hot (full speed over a 32 MiB working set per vCPU) and full (full speed over all of RAM). Written to
//! `target/bench/migrate.md`.

use super::*;

/// The hot guest's working set per vCPU (as the save bench's hot cases).
const HOT_SET: &str = "32M";

/// One migration's figures.
struct Row {
    mem_mib: u64,
    mode: &'static str,
    zstd: bool,
    save_s: f64,
    report: Value,
    rate_before: f64,
    rate_after: f64,
    /// The destination's rate while its memory arrived (too short a transfer: none).
    rate_during: Option<f64>,
}

pub fn run(quick: bool, mems: Option<Vec<u64>>) -> anyhow::Result<()> {
    let bin = build_snapctl()?;
    let dir = root().join("target/bench/migrate");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let token = dir.join("token");
    std::fs::write(&token, "bench-migration-secret-0123456789\n")?;
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let mems = mems.unwrap_or(if quick { vec![256] } else { vec![1024, 4096] });
    let mut rows = Vec::new();
    for &mem in &mems {
        for mode in ["idle", "hot", "full"] {
            for zstd in [false, true] {
                if zstd && quick {
                    continue;
                }
                let row = one(&bin, &dir, &token, mem, mode, zstd).with_context(|| {
                    format!("{mem} MiB {mode}{}", if zstd { " zstd" } else { "" })
                })?;
                rows.push(row);
            }
        }
    }
    let mut md = String::from(
        "| RAM | guest | zstd | downtime ms | dest state load ms | wire / data | data MiB | time s | raw save s | time / save | requests | fault wait p50 / p99 µs | guest rate during / before | after / before |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        let f = |k: &str| r.report[k].as_f64().unwrap_or(0.0);
        let u = |k: &str| r.report[k].as_u64().unwrap_or(0);
        md.push_str(&format!(
            "| {} MiB | {} | {} | {:.2} | {:.1} | {:.4} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} / {} | {} | {} |\n",
            r.mem_mib,
            r.mode,
            if r.zstd { "yes" } else { "no" },
            f("downtime_ms"),
            r.report["dest_start_ms"].as_f64().unwrap_or(0.0),
            f("wire_bytes") / f("data_bytes").max(1.0),
            u("data_bytes") as f64 / 1048576.0,
            f("duration_s"),
            r.save_s,
            f("duration_s") / r.save_s.max(1e-9),
            u("demand_requests"),
            r.report["dest"]["fault_wait_p50_us"],
            r.report["dest"]["fault_wait_p99_us"],
            match r.rate_during {
                Some(d) if r.rate_before > 0.0 => format!("{:.2}", d / r.rate_before),
                _ => "–".into(),
            },
            if r.rate_before > 0.0 {
                format!("{:.2}", r.rate_after / r.rate_before)
            } else {
                "–".into()
            }
        ));
    }
    println!("{md}");
    std::fs::write(root().join("target/bench/migrate.md"), &md)?;
    println!("written to target/bench/migrate.md");
    Ok(())
}

fn total_rate(v: &Value) -> f64 {
    v["steps_per_s"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).sum())
        .unwrap_or(0.0)
}

fn one(
    bin: &Path,
    dir: &Path,
    token: &Path,
    mem: u64,
    mode: &'static str,
    zstd: bool,
) -> anyhow::Result<Row> {
    let m = format!("{mem}M");
    let mut boot = vec!["boot", "--mem", &m, "--vcpus", "2"];
    match mode {
        "hot" => boot.extend(["--write-rate", "full", "--working-set", HOT_SET]),
        m => boot.extend(["--write-rate", m]),
    }
    let src = VmmProc::start(bin, &boot, &dir.join("src.sock"), &dir.join("src.serial"))?;
    // Let a full-speed guest fill its memory and settle.
    let t0 = Instant::now();
    while src.status()?["fill_done"] != true {
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the guest did not fill its memory");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let snap = dir.join("raw.snap");
    let save: Value = serde_json::from_str(
        src.ctl(&[
            "save",
            "--out",
            snap.to_str().context("path")?,
            "--force",
            "--json",
        ])?
        .trim(),
    )?;
    let _ = std::fs::remove_file(&snap);
    std::thread::sleep(Duration::from_secs(2));
    let rate_before = total_rate(&src.status()?);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let sock = dir.join("dst.sock");
    let child = Command::new(bin)
        .args(["restore", "--listen", &addr, "--token-file"])
        .arg(token)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join("dst.serial"))
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let dst = VmmProc {
        child,
        sock,
        bin: bin.to_path_buf(),
    };
    while std::net::TcpStream::connect(&addr).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut args = vec![
        "migrate",
        "--to",
        &addr,
        "--token-file",
        token.to_str().context("path")?,
        "--json",
    ];
    if zstd {
        args.push("--zstd");
    }
    // The destination's guest progress while its memory arrives: steps sampled from the first
    // status it answers until every page is resident.
    let sampler = {
        let bin = bin.to_path_buf();
        let sock = dst.sock.clone();
        std::thread::spawn(move || {
            let sock = sock.to_string_lossy().into_owned();
            let status = || -> Option<Value> {
                let (code, out, _) =
                    snapctl(&bin, &["status", "--json", "--api-sock", &sock]).ok()?;
                (code == 0).then(|| serde_json::from_str(out.trim()).ok())?
            };
            let mut first: Option<(Instant, u64)> = None;
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(120) {
                if let Some(st) = status() {
                    let steps: u64 = st["steps"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_u64).sum())
                        .unwrap_or(0);
                    let now = (Instant::now(), steps);
                    let f = *first.get_or_insert(now);
                    if st["migration"]["resident"] == true {
                        let dt = now.0.duration_since(f.0).as_secs_f64();
                        return (dt > 0.05).then(|| (now.1 - f.1) as f64 / dt);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })
    };
    let mut report: Value = serde_json::from_str(src.ctl(&args)?.trim())?;
    drop(src);
    let rate_during = sampler.join().unwrap_or(None);
    // The destination's rate over the seconds after all memory arrived (its 1-s samples).
    std::thread::sleep(Duration::from_secs(3));
    let st = dst.status()?;
    report["dest_start_ms"] = st["migration"]["start_phases_ms"]["vm"].clone();
    let rate_after = total_rate(&st);
    dst.shutdown()?;
    Ok(Row {
        rate_during,
        mem_mib: mem,
        mode,
        zstd,
        save_s: save["duration_s"].as_f64().unwrap_or(0.0),
        report,
        rate_before,
        rate_after,
    })
}
