//! The migration step of `cargo xtask e2e`: the running full-speed guest moves live to a second VMM
//! over loopback TCP; the source VMM ends, the destination's guest runs on past its freeze
//! instant, gets all its memory, passes its self-check, and a save of it passes the oracle.

use super::*;

/// Migrates `src` (which ends) to a fresh `restore --listen` VMM; checks it as above.
pub fn migrate_and_check(bin: &Path, src: VmmProc, dir: &Path) -> anyhow::Result<String> {
    let token = dir.join("migrate.token");
    std::fs::write(&token, "e2e-migration-secret-0123456789\n")?;
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let sock = dir.join("vm6.sock");
    let child = Command::new(bin)
        .args(["restore", "--listen", &addr, "--token-file"])
        .arg(&token)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join("vm6.serial"))
        .stdin(Stdio::null())
        .spawn()?;
    let mut dst = VmmProc {
        child,
        sock,
        bin: bin.to_path_buf(),
    };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        if dst.child.try_wait()?.is_some() {
            bail!("restore --listen exited early");
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("restore --listen is not listening after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = src.steps()?;
    let out = src.ctl(&[
        "migrate",
        "--to",
        &addr,
        "--token-file",
        token.to_str().context("path")?,
        "--json",
    ])?;
    let r: Value = serde_json::from_str(out.trim()).context("migrate --json printed no JSON")?;
    let mut src = src;
    let t0 = Instant::now();
    while src.child.try_wait()?.is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the source VMM still runs 60 s after the migration");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = dst.wait_steps_beyond(&before, Duration::from_secs(60))?;
    let m = loop {
        let m = dst.status()?["migration"].clone();
        if m["resident"] == true {
            break m;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the destination is not resident after 120 s: {m}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let v: Value = serde_json::from_str(dst.ctl(&["self-check", "--json"])?.trim())?;
    if v["pass"] != Value::Bool(true) {
        bail!("guest self-check after the migration failed: {v}");
    }
    let s = save_verify_oracle(&dst, &dir.join("e.snap"), &[])?;
    dst.shutdown()?;
    Ok(format!(
        "[downtime {:.2} ms, {:.2} s, {} B on the wire for {} B of data, {} demand requests, \
         fault wait p50 {} µs p99 {} µs; steps {after:?}; resident after {:.2} s] then saved {}",
        r["downtime_ms"].as_f64().unwrap_or(0.0),
        r["duration_s"].as_f64().unwrap_or(0.0),
        r["wire_bytes"],
        r["data_bytes"],
        r["demand_requests"],
        r["dest"]["fault_wait_p50_us"],
        r["dest"]["fault_wait_p99_us"],
        m["figures"]["resident_s"].as_f64().unwrap_or(0.0),
        fmt_summary(&s)
    ))
}
