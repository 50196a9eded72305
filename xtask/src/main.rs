//! Project tasks: `cargo xtask e2e` (the whole chain, end to end, on the built-in guest) and `cargo xtask bench`.
//!
//! Few dependencies on purpose: it drives the release `snapctl` binary like a user would.

use anyhow::{bail, Context};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod bench;
mod bench_migrate;
mod e2e_chain;
mod e2e_migrate;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("e2e") => e2e(),
        Some("test") => test(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <test | e2e | bench [--quick] [--mem MIB,MIB…] [uffd]>");
            std::process::exit(2);
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// `cargo xtask test`: fetches what the tests need (Debian's stock kernel, cached) and runs every test of the
/// workspace in release mode. Extra arguments go to `cargo test`.
fn test(extra: &[String]) -> anyhow::Result<()> {
    if std::env::var_os("SNAPCTL_SKIP_DEBIAN_KERNEL").is_none() {
        let st = Command::new("bash")
            .arg(root().join("scripts/fetch-debian-kernel.sh"))
            .status()
            .context("running scripts/fetch-debian-kernel.sh")?;
        if !st.success() {
            bail!("fetching the Debian kernel for the kernel-boot test failed (see above)");
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(root())
        .args(["test", "--workspace", "--release"])
        .args(extra)
        .status()
        .context("running cargo test")?;
    if !st.success() {
        bail!("tests failed");
    }
    Ok(())
}

/// Builds the release `snapctl` binary and returns its path.
pub fn build_snapctl() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(root())
        .args(["build", "--release", "-p", "snapctl"])
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!("cargo build --release -p snapctl failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    Ok(target.join("release/snapctl"))
}

/// A VMM process started by a task; killed on drop.
#[derive(Debug)]
pub struct VmmProc {
    pub child: Child,
    pub sock: PathBuf,
    pub bin: PathBuf,
}

impl VmmProc {
    /// Starts `snapctl <args> --api-sock SOCK` and waits until its socket answers.
    pub fn start(bin: &Path, args: &[&str], sock: &Path, serial: &Path) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(bin)
            .args(args)
            .arg("--api-sock")
            .arg(sock)
            .arg("--serial-log")
            .arg(serial)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut p = VmmProc {
            child,
            sock: sock.to_path_buf(),
            bin: bin.to_path_buf(),
        };
        let t0 = Instant::now();
        loop {
            if let Some(st) = p.child.try_wait()? {
                bail!("snapctl {} exited early: {st}", args.join(" "));
            }
            if p.ctl(&["status", "--json"]).is_ok() {
                return Ok(p);
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!(
                    "snapctl {} did not open its socket in 120 s",
                    args.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a client command against this VMM; returns stdout on success.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--api-sock")
            .arg(&self.sock)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "snapctl {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `status --json` as a value.
    pub fn status(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.ctl(&["status", "--json"])?)?)
    }

    /// Total guest steps over all vCPUs.
    pub fn steps(&self) -> anyhow::Result<Vec<u64>> {
        let s = self.status()?;
        Ok(s["steps"]
            .as_array()
            .context("status without steps")?
            .iter()
            .map(|v| v.as_u64().unwrap_or(0))
            .collect())
    }

    /// Waits until every vCPU has gone past `min` steps.
    pub fn wait_steps_beyond(&self, min: &[u64], timeout: Duration) -> anyhow::Result<Vec<u64>> {
        let t0 = Instant::now();
        loop {
            let s = self.steps()?;
            if s.len() == min.len() && s.iter().zip(min).all(|(a, b)| a > b) {
                return Ok(s);
            }
            if t0.elapsed() > timeout {
                bail!("guest made no progress past {min:?} in {timeout:?} (now {s:?})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Asks the VMM to shut down and waits for the process.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.ctl(&["shutdown"])?;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("VMM did not exit within 30 s of shutdown")
    }
}

impl Drop for VmmProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a snapctl command, returning (exit code, stdout, stderr).
pub fn snapctl(bin: &Path, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(bin).args(args).stdin(Stdio::null()).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[derive(Debug)]
struct Steps {
    passed: usize,
    failed: usize,
}

impl Steps {
    fn run(&mut self, name: &str, f: impl FnOnce() -> anyhow::Result<String>) -> bool {
        let t0 = Instant::now();
        match f() {
            Ok(detail) => {
                self.passed += 1;
                println!("PASS {name} ({:.1} s) {detail}", t0.elapsed().as_secs_f64());
                true
            }
            Err(e) => {
                self.failed += 1;
                println!("FAIL {name} ({:.1} s): {e:#}", t0.elapsed().as_secs_f64());
                false
            }
        }
    }
}

/// Saves from `vm` into `out` and checks: summary sane, `verify` passes, the oracle passes against the freeze
/// instant.
fn save_verify_oracle(vm: &VmmProc, out: &Path, extra: &[&str]) -> anyhow::Result<Value> {
    let out_s = out.to_str().context("path")?;
    let mut args = vec!["save", "--out", out_s, "--json"];
    args.extend_from_slice(extra);
    let summary: Value = serde_json::from_str(vm.ctl(&args)?.trim())
        .context("save --json printed no JSON summary")?;
    let (code, _, err) = snapctl(&vm.bin, &["verify", out_s])?;
    if code != 0 {
        bail!("verify {out_s} failed ({code}): {}", err.trim());
    }
    let (code, so, err) = snapctl(&vm.bin, &["oracle", out_s])?;
    if code != 0 {
        bail!(
            "oracle {out_s} failed ({code}): {} {}",
            so.trim(),
            err.trim()
        );
    }
    Ok(summary)
}

fn restore_and_check(
    bin: &Path,
    snap: &Path,
    sock: &Path,
    serial: &Path,
    summary: &Value,
) -> anyhow::Result<VmmProc> {
    let vm = VmmProc::start(
        bin,
        &["restore", snap.to_str().context("path")?],
        sock,
        serial,
    )?;
    let freeze: Vec<u64> = summary["freeze_steps"]
        .as_array()
        .context("summary without freeze_steps")?
        .iter()
        .map(|v| v.as_u64().unwrap_or(0))
        .collect();
    // The guest continues from its freeze instant: at first no vCPU may be far before it.
    let first = vm.steps()?;
    if first.iter().zip(&freeze).any(|(a, b)| a < b) {
        bail!("restored guest is behind its freeze instant: {first:?} < {freeze:?}");
    }
    vm.wait_steps_beyond(&freeze, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(3));
    let v = vm.ctl(&["self-check", "--json"])?;
    let v: Value = serde_json::from_str(v.trim())?;
    if v["pass"] != Value::Bool(true) {
        bail!("guest self-check after restore failed: {v}");
    }
    Ok(vm)
}

fn fmt_summary(s: &Value) -> String {
    format!(
        "[{:.2} s, downtime {:.2} ms, {} faults, file {} B, ratio {:.3}]",
        s["duration_s"].as_f64().unwrap_or(0.0),
        s["downtime_ms"].as_f64().unwrap_or(0.0),
        s["faults_served"],
        s["file_bytes"],
        s["image_size_ratio"].as_f64().unwrap_or(0.0)
    )
}

fn e2e() -> anyhow::Result<()> {
    let bin = build_snapctl()?;
    let dir = root().join("target/e2e");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let p = |n: &str| dir.join(n);
    let mut st = Steps {
        passed: 0,
        failed: 0,
    };

    let mut vm1 = None;
    st.run("1 boot built-in guest (2 vCPUs, 1 GiB, full speed)", || {
        let vm = VmmProc::start(
            &bin,
            &[
                "boot",
                "--mem",
                "1G",
                "--vcpus",
                "2",
                "--write-rate",
                "full",
            ],
            &p("vm1.sock"),
            &p("vm1.serial"),
        )?;
        let s = vm.wait_steps_beyond(&[0, 0], Duration::from_secs(60))?;
        vm1 = Some(vm);
        Ok(format!("steps {s:?}"))
    });
    let Some(vm1) = vm1 else {
        return finish(st);
    };

    let mut sum_a = None;
    st.run("2+3 live save --zstd while writing, verify, oracle", || {
        let s = save_verify_oracle(&vm1, &p("a.snap"), &["--zstd"])?;
        let d = fmt_summary(&s);
        sum_a = Some(s);
        Ok(d)
    });

    let mut vm2 = None;
    if sum_a.is_none() {
        st.run("4 restore into a new process, runs on, self-check", || {
            bail!("not run: step 2 produced no snapshot")
        });
    }
    if let Some(sum) = &sum_a {
        st.run("4 restore into a new process, runs on, self-check", || {
            let vm = restore_and_check(&bin, &p("a.snap"), &p("vm2.sock"), &p("vm2.serial"), sum)?;
            let s = vm.steps()?;
            vm2 = Some(vm);
            Ok(format!("steps {s:?}"))
        });
    }
    if let Some(vm2) = vm2 {
        st.run(
            "5 save the restored VM raw, verify, restore, self-check",
            || {
                let s = save_verify_oracle(&vm2, &p("b.snap"), &[])?;
                let vm3 =
                    restore_and_check(&bin, &p("b.snap"), &p("vm3.sock"), &p("vm3.serial"), &s)?;
                vm3.shutdown()?;
                Ok(fmt_summary(&s))
            },
        );
        let _ = vm2.shutdown();
    } else {
        st.run(
            "5 save the restored VM raw, verify, restore, self-check",
            || bail!("not run: step 4 did not restore a VM"),
        );
    }

    st.run(
        "6 tight --max-bandwidth save (many faults) round-trips",
        || {
            let s = save_verify_oracle(&vm1, &p("c.snap"), &["--max-bandwidth", "64M"])?;
            if s["faults_served"].as_u64().unwrap_or(0) == 0 {
                bail!("a throttled save of a full-speed guest served no faults: {s}");
            }
            let vm4 = restore_and_check(&bin, &p("c.snap"), &p("vm4.sock"), &p("vm4.serial"), &s)?;
            vm4.shutdown()?;
            Ok(fmt_summary(&s))
        },
    );

    st.run(
        "7 a corrupted copy is refused by verify and restore",
        || {
            let src = if p("a.snap").exists() {
                p("a.snap")
            } else {
                p("c.snap")
            };
            let mut data = std::fs::read(&src)?;
            let mid = data.len() / 2;
            data[mid] ^= 0x5a;
            std::fs::write(p("bad.snap"), &data)?;
            let bad = p("bad.snap");
            let bad_s = bad.to_str().context("path")?;
            let (code, _, err) = snapctl(&bin, &["verify", bad_s])?;
            if code == 0 {
                bail!("verify accepted a corrupted file");
            }
            let (rcode, _, rerr) = snapctl(
                &bin,
                &[
                    "restore",
                    bad_s,
                    "--api-sock",
                    p("bad.sock").to_str().context("path")?,
                    "--serial-log",
                    p("bad.serial").to_str().context("path")?,
                ],
            )?;
            if rcode != 3 {
                bail!("restore of a corrupted file exited {rcode}, not 3 (corrupt)");
            }
            if p("bad.sock").exists() {
                bail!("a refused restore left its control socket behind");
            }
            Ok(format!(
                "verify exit {code}: {} / restore exit {rcode}: {}",
                err.lines().last().unwrap_or("").trim(),
                rerr.lines().last().unwrap_or("").trim()
            ))
        },
    );

    st.run(
        "8 restore lazily (memory on demand), runs on, fill completes, self-check, save, oracle",
        || {
            let (snap, sum) = match &sum_a {
                Some(s) => (p("a.snap"), s),
                None => bail!("not run: step 2 produced no snapshot"),
            };
            lazy_restore_and_check(
                &bin,
                &snap,
                &p("vm5.sock"),
                &p("vm5.serial"),
                sum,
                &p("d.snap"),
            )
        },
    );
    st.run(
        "9 migrate live over loopback TCP, runs on, all memory arrives, self-check, save, oracle",
        || e2e_migrate::migrate_and_check(&bin, vm1, &dir),
    );
    e2e_chain::chain_round_trip(&bin, &dir, 10, &mut st);
    finish(st)
}

/// Restores `snap` with `restore --lazy`: the guest continues from its freeze instant while its
/// memory is still filling, the fill completes (`status`), the guest's self-check passes, and a
/// save of the restored VM (`out`) passes verify and the oracle.
fn lazy_restore_and_check(
    bin: &Path,
    snap: &Path,
    sock: &Path,
    serial: &Path,
    summary: &Value,
    out: &Path,
) -> anyhow::Result<String> {
    let t0 = Instant::now();
    let vm = VmmProc::start(
        bin,
        &["restore", "--lazy", snap.to_str().context("path")?],
        sock,
        serial,
    )?;
    let freeze: Vec<u64> = summary["freeze_steps"]
        .as_array()
        .context("summary without freeze_steps")?
        .iter()
        .map(|v| v.as_u64().unwrap_or(0))
        .collect();
    let first = vm.steps()?;
    if first.iter().zip(&freeze).any(|(a, b)| a < b) {
        bail!("lazily restored guest is behind its freeze instant: {first:?} < {freeze:?}");
    }
    vm.wait_steps_beyond(&freeze, Duration::from_secs(60))?;
    let running = t0.elapsed();
    let restore = loop {
        let r = vm.status()?["restore"].clone();
        if !r["failed"].is_null() {
            bail!("lazy restore failed: {r}");
        }
        if r["done"] == true {
            break r;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("lazy restore not done after 120 s: {r}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if restore["resident_bytes"] != restore["total_bytes"] {
        bail!("lazy restore done but not all resident: {restore}");
    }
    let v: Value = serde_json::from_str(vm.ctl(&["self-check", "--json"])?.trim())?;
    if v["pass"] != Value::Bool(true) {
        bail!("guest self-check after a lazy restore failed: {v}");
    }
    let s = save_verify_oracle(&vm, out, &[])?;
    vm.shutdown()?;
    Ok(format!(
        "[guest ran on {:.0} ms after the process started; vCPUs started {:.1} ms into the restore; \
         {} faults, wait p50 {} µs p99 {} µs; resident after {:.2} s; huge pages {} MiB after \
         collapse ({:.0} ms)] then saved {}",
        running.as_secs_f64() * 1e3,
        restore["start_ms"].as_f64().unwrap_or(0.0),
        restore["faults"],
        restore["fault_wait_p50_us"],
        restore["fault_wait_p99_us"],
        restore["resident_s"].as_f64().unwrap_or(0.0),
        restore["thp_after_bytes"].as_u64().unwrap_or(0) >> 20,
        restore["collapse_ms"].as_f64().unwrap_or(0.0),
        fmt_summary(&s)
    ))
}

fn finish(st: Steps) -> anyhow::Result<()> {
    println!("e2e: {} passed, {} failed", st.passed, st.failed);
    if st.failed > 0 || st.passed == 0 {
        bail!("e2e failed");
    }
    Ok(())
}
