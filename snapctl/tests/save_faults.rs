//! Faults during a save. For each one: the guest keeps making progress (it never stops for more than
//! [`MAX_STALL`]), no page stays write-protected (no uffd-wp bit in /proc/PID/pagemap over guest RAM), no file
//! is left under the target name (nor its temporary), the client gets a clear error, and the VM can be saved
//! again successfully right after.
//!
//! Runs as root (mounts tmpfs) on a machine with /dev/kvm and /dev/userfaultfd.

mod common;

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A small guest that keeps writing at a modest rate (so that saves can be slowed down and faults still
/// happen), with a working set of its own.
const GUEST: &[&str] = &[
    "--mem",
    "128M",
    "--write-rate",
    "500",
    "--working-set",
    "8M",
];
/// Scan limit that makes a save of [`GUEST`] last ~30 s: time to act on it.
const SLOW: &str = "4M";
const T: Duration = Duration::from_secs(10);

/// Everything the issue asks after a faulty save.
fn assert_recovered(
    vmm: &Vmm,
    target_dir: &Path,
    name: &str,
    watch: ProgressWatch,
    spare: &TempDir,
) {
    vmm.wait_save(false, T);
    vmm.assert_no_orphan_protection("after the save ended");
    let left = leftovers(target_dir, name);
    assert!(
        left.is_empty(),
        "files left under the target name: {left:?}"
    );
    vmm.assert_progress(Duration::from_secs(2));
    let stall = watch.finish();
    eprintln!("worst guest stall: {stall:?}");
    assert!(
        stall < MAX_STALL,
        "the guest made no progress for {stall:?}"
    );
    // The VM can be saved again right away.
    let again = spare.join("again.snap");
    vmm.save_and_verify(&again, &[]);
    std::fs::remove_file(&again).unwrap();
    vmm.assert_no_orphan_protection("after a successful save");
}

/// Starts a slow save to `target` and waits until it runs (its temporary file exists, pages are protected).
fn start_slow_save(vmm: &Vmm, target: &Path) -> Proc {
    let client = vmm.spawn_save(&["--out", target.to_str().unwrap(), "--max-bandwidth", SLOW]);
    vmm.wait_save(true, T);
    let dir = target.parent().unwrap();
    let name = target.file_name().unwrap().to_str().unwrap();
    let t0 = Instant::now();
    while leftovers(dir, name).is_empty() {
        assert!(
            t0.elapsed() < T,
            "no temporary file appeared for {}",
            target.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Positive control for the pagemap check: during a save, most of guest RAM is protected.
    // The temporary file is created before the freeze, so wait for the protection to show.
    let t0 = Instant::now();
    loop {
        let wp = vmm.wp_pages();
        if wp > 1000 {
            break;
        }
        assert!(
            t0.elapsed() < T,
            "mid-save, only {wp} pages carry the uffd-wp bit: the check would prove nothing"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    client
}

#[test]
fn disk_full_fails_cleanly() {
    let _s = serial();
    let dir = TempDir::new("full");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let full = dir.join("full");
    let _m = Mount::tmpfs(&full, "size=32M");
    let target = full.join("vm.snap");
    let out = vmm.ctl(
        &["save", "--out", target.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("No space left on device"),
        "unclear error: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("no space left"),
        "no hint: {}",
        out.stderr
    );
    // Nothing at all is left on the full file system.
    let entries: Vec<_> = std::fs::read_dir(&full).unwrap().collect();
    assert!(entries.is_empty(), "left on the tmpfs: {entries:?}");
    assert_recovered(&vmm, &full, "vm.snap", watch, &dir);
}

#[test]
fn unwritable_directory_fails_cleanly() {
    let _s = serial();
    let dir = TempDir::new("ro");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let ro = dir.join("ro");
    let _m = Mount::tmpfs(&ro, "ro,size=8M");
    let target = ro.join("vm.snap");
    let out = vmm.ctl(&["save", "--out", target.to_str().unwrap()], T);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("Read-only file system"),
        "unclear error: {}",
        out.stderr
    );
    assert!(out.stderr.contains("[save_failed]"), "{}", out.stderr);
    // A directory that does not exist.
    let missing = dir.join("no/such/dir/vm.snap");
    let out = vmm.ctl(&["save", "--out", missing.to_str().unwrap()], T);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("does the directory exist"),
        "unclear error: {}",
        out.stderr
    );
    assert_recovered(&vmm, &ro, "vm.snap", watch, &dir);
}

#[test]
fn existing_target_is_refused_unless_force() {
    let _s = serial();
    let dir = TempDir::new("exists");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let target = dir.join("vm.snap");
    std::fs::write(&target, b"precious").unwrap();
    let out = vmm.ctl(&["save", "--out", target.to_str().unwrap()], T);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("already exists") && out.stderr.contains("--force"),
        "unclear error: {}",
        out.stderr
    );
    // The VMM refuses too (a client that skips its own check).
    let req = format!(r#"{{"cmd":"save","path":"{}"}}"#, target.display());
    let r = request(&vmm.sock, &req);
    assert_eq!(r["reply"], "error", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("already exists"),
        "{r}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    let tmp = leftovers(dir.path(), "vm.snap");
    assert_eq!(tmp, vec!["vm.snap".to_string()], "temporary files left");
    vmm.assert_no_orphan_protection("after the save");
    // With --force the file is replaced by a complete snapshot.
    vmm.save_and_verify(&target, &["--force"]);
    std::fs::remove_file(&target).unwrap();
    assert_recovered(&vmm, dir.path(), "vm.snap", watch, &dir);
}

#[test]
fn closed_stdout_pipe_cancels_the_save() {
    let _s = serial();
    let dir = TempDir::new("pipe");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let mut cmd = Command::new(bin());
    cmd.args([
        "save",
        "--out",
        "-",
        "--max-bandwidth",
        SLOW,
        "--api-sock",
        vmm.sock_arg(),
    ]);
    let mut client = Proc::spawn_cmd(&mut cmd, false);
    // Like `| head -c 1000`: read a little, then close the pipe.
    let mut stdout = client.child.stdout.take().unwrap();
    let mut first = [0u8; 1000];
    stdout
        .read_exact(&mut first)
        .expect("reading the start of the stream");
    vmm.wait_save(true, T);
    drop(stdout);
    let fifo_dir = std::env::temp_dir().join(format!("snapctl-out-{}", client.pid()));
    let out = client.wait(T, "save --out - with a closed pipe");
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("standard output") && out.stderr.contains("Broken pipe"),
        "unclear error: {}",
        out.stderr
    );
    assert!(
        !fifo_dir.exists(),
        "the client's FIFO directory was left behind"
    );
    assert_recovered(&vmm, dir.path(), "nothing", watch, &dir);
}

#[test]
fn killed_client_cancels_the_save() {
    let _s = serial();
    let dir = TempDir::new("kill");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let target = dir.join("vm.snap");
    let client = start_slow_save(&vmm, &target);
    client.signal(Signal::SIGKILL);
    let _ = client.wait(T, "killed client");
    // The VMM noticed the closed connection and cancelled (documented in PROTOCOL.md).
    assert_recovered(&vmm, dir.path(), "vm.snap", watch, &dir);
}

#[test]
fn sigint_cancels_the_save() {
    let _s = serial();
    let dir = TempDir::new("sigint");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let target = dir.join("vm.snap");
    let client = start_slow_save(&vmm, &target);
    client.signal(Signal::SIGINT);
    let out = client.wait(T, "client after SIGINT");
    assert_eq!(out.code(), Some(130), "{}", out.stderr);
    assert!(
        out.stderr.contains("save cancelled"),
        "unclear message: {}",
        out.stderr
    );
    assert_recovered(&vmm, dir.path(), "vm.snap", watch, &dir);
}

#[test]
fn sigint_cancels_a_stream_save() {
    let _s = serial();
    let dir = TempDir::new("sigint-stream");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let client = vmm.spawn_save(&["--out", "-", "--max-bandwidth", SLOW]);
    vmm.wait_save(true, T);
    std::thread::sleep(Duration::from_millis(300));
    client.signal(Signal::SIGINT);
    let out = client.wait(T, "stream client after SIGINT");
    assert_eq!(out.code(), Some(130), "{}", out.stderr);
    assert!(
        out.stderr.contains("save cancelled"),
        "unclear message: {}",
        out.stderr
    );
    assert_recovered(&vmm, dir.path(), "nothing", watch, &dir);
}

#[test]
fn snapctl_cancel_cancels_the_save() {
    let _s = serial();
    let dir = TempDir::new("cancel");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let target = dir.join("vm.snap");
    let client = start_slow_save(&vmm, &target);
    let c = vmm.ctl(&["cancel"], T);
    assert_eq!(c.code(), Some(0), "{}", c.stderr);
    let out = client.wait(T, "client after `snapctl cancel`");
    assert_eq!(out.code(), Some(130), "{}", out.stderr);
    assert!(
        out.stderr.contains("save cancelled"),
        "unclear message: {}",
        out.stderr
    );
    // Nothing to cancel any more.
    let c = vmm.ctl(&["cancel"], T);
    assert_eq!(c.code(), Some(1), "{}", c.stderr);
    assert!(c.stderr.contains("no save is in progress"), "{}", c.stderr);
    assert_recovered(&vmm, dir.path(), "vm.snap", watch, &dir);
}

#[test]
fn second_save_gets_busy() {
    let _s = serial();
    let dir = TempDir::new("busy");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let first = dir.join("first.snap");
    // ~8 s: long enough to try the others, short enough to wait for.
    let client = vmm.spawn_save(&[
        "--out",
        first.to_str().unwrap(),
        "--max-bandwidth",
        "16M",
        "--json",
    ]);
    vmm.wait_save(true, T);
    let second = dir.join("second.snap");
    let out = vmm.ctl(&["save", "--out", second.to_str().unwrap()], T);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("[busy]") && out.stderr.contains("already in progress"),
        "{}",
        out.stderr
    );
    // A streaming client must not hang waiting for a stream that never comes.
    let out = vmm.ctl(&["save", "--out", "-"], T);
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("[busy]"), "{}", out.stderr);
    let r = request(
        &vmm.sock,
        &format!(r#"{{"cmd":"save","path":"{}"}}"#, second.display()),
    );
    assert_eq!(r["kind"], "busy", "{r}");
    assert!(leftovers(dir.path(), "second.snap").is_empty());
    // The busy client's leaving did not cancel the first save: it completes and verifies.
    let out = client.wait(Duration::from_secs(60), "first save");
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["guest_bytes"], vmm.mem_bytes);
    verify(&first);
    std::fs::remove_file(&first).unwrap();
    assert_recovered(&vmm, dir.path(), "second.snap", watch, &dir);
}

#[test]
fn stream_save_to_stdout_is_complete() {
    let _s = serial();
    let dir = TempDir::new("stream");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let file = std::fs::File::create(dir.join("streamed.snap")).unwrap();
    let mut child = Command::new(bin())
        .args([
            "save",
            "--out",
            "-",
            "--zstd",
            "--json",
            "--api-sock",
            vmm.sock_arg(),
        ])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("stream save did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(st.success(), "{err}");
    // --json with --out -: the summary goes to stderr, stdout carries only the snapshot.
    assert!(err.contains("\"guest_bytes\""), "{err}");
    verify(&dir.join("streamed.snap"));
    assert_recovered(&vmm, dir.path(), "nothing", watch, &dir);
}

/// A client that asks for a save and then never reads: progress lines pile up in the socket, which must
/// not slow the save (nor the guest) down. The save completes, and the client gets its reply when it reads.
#[test]
fn save_client_that_never_reads_does_not_block_the_save() {
    let _s = serial();
    let dir = TempDir::new("noread");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let target = dir.join("vm.snap");
    let s = std::os::unix::net::UnixStream::connect(&vmm.sock).unwrap();
    let req = format!(
        "{{\"cmd\":\"save\",\"path\":\"{}\",\"max_bandwidth\":{}}}\n",
        target.display(),
        4 << 20
    );
    std::io::Write::write_all(&mut &s, req.as_bytes()).unwrap();
    vmm.wait_save(true, T);
    // The save takes ~30 s at 4 MiB/s, long enough for ~300 progress lines to fill the socket buffer.
    let t0 = Instant::now();
    while vmm.status()["save"] == true {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the save never finished while its client did not read"
        );
        let t = Instant::now();
        let _ = vmm.status();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "status took {:?} during the save",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("save with a non-reading client took {:?}", t0.elapsed());
    let replies = read_replies(s, T);
    let last = replies.last().unwrap();
    assert_eq!(last["reply"], "ok", "{last}");
    verify(&target);
    std::fs::remove_file(&target).unwrap();
    assert_recovered(&vmm, dir.path(), "vm.snap", watch, &dir);
}

#[test]
fn killed_stream_client_cancels_the_save() {
    let _s = serial();
    let dir = TempDir::new("kill-stream");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let watch = ProgressWatch::start(&vmm.sock);
    let client = vmm.spawn_save(&["--out", "-", "--max-bandwidth", SLOW]);
    vmm.wait_save(true, T);
    std::thread::sleep(Duration::from_millis(300));
    let fifo_dir = std::env::temp_dir().join(format!("snapctl-out-{}", client.pid()));
    client.signal(Signal::SIGKILL);
    let _ = client.wait(T, "killed stream client");
    assert_recovered(&vmm, dir.path(), "nothing", watch, &dir);
    assert!(!fifo_dir.exists(), "a killed client left its FIFO behind");
}

/// `--max-staging`: the client refuses what is not a size or is below 4M; the VMM refuses the same below its
/// floor and a cap above the host's memory (a mistake, never a wish it could honour). Nothing is saved,
/// nothing stays protected.
#[test]
fn max_staging_nonsense_is_refused() {
    let _s = serial();
    let dir = TempDir::new("maxstaging");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let target = dir.join("vm.snap");
    let t = target.to_str().unwrap();
    for (bad, needle) in [
        ("0", "too small"),
        ("1M", "too small"),
        ("lots", "not a size"),
    ] {
        let out = vmm.ctl(&["save", "--out", t, "--max-staging", bad], T);
        assert_eq!(out.code(), Some(2), "--max-staging {bad}: {}", out.stderr);
        assert!(
            out.stderr.contains(needle),
            "--max-staging {bad}: {}",
            out.stderr
        );
    }
    for (bytes, needle) in [
        (0u64, "at least"),
        (u64::MAX, "more than the host's memory"),
    ] {
        let r = request(
            &vmm.sock,
            &format!(r#"{{"cmd":"save","path":"{t}","max_staging":{bytes}}}"#),
        );
        assert_eq!(r["kind"], "bad_request", "{r}");
        assert!(r["message"].as_str().unwrap().contains(needle), "{r}");
    }
    assert!(leftovers(dir.path(), "vm.snap").is_empty());
    vmm.assert_no_orphan_protection("after the save");
    assert_eq!(vmm.status()["save"], false);
}

/// A full-speed guest saved with a tiny staging cap: its writes reach the cap and wait for the output, the
/// summary says so (JSON and text), and the image is still exactly the freeze instant (oracle). The same guest
/// saved with the default cap (its RAM fits) never waits for staging, and the VMM gives the staging back.
#[test]
fn small_staging_cap_under_a_busy_guest_is_exact_and_reported() {
    let _s = serial();
    let dir = TempDir::new("smallcap");
    let vmm = Vmm::boot(dir.path(), &["--mem", "256M", "--write-rate", "full"]);
    let path = dir.join("vm.snap");
    // zstd level 19 slows the first batches down (adaptive compression stores the rest raw), so staging
    // fills even on a fast disk.
    let s = vmm.save_and_verify(&path, &["--max-staging", "4M", "--zstd-level", "19"]);
    let st = &s["staging"];
    assert_eq!(st["cap_reached"], true, "{s}");
    assert!(st["waits"].as_u64().unwrap() > 0, "{s}");
    assert!(st["wait_total_us"].as_u64().unwrap() > 0, "{s}");
    assert!(st["peak_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["faults_served"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(
        s["fault_phases_us"]["faults"], s["faults_served"],
        "phases of every fault: {s}"
    );
    let out = run(&["oracle", path.to_str().unwrap()], T);
    assert_eq!(out.code(), Some(0), "oracle failed: {}", out.stderr);
    std::fs::remove_file(&path).unwrap();

    let out = vmm.ctl(
        &[
            "save",
            "--out",
            path.to_str().unwrap(),
            "--max-staging",
            "4M",
            "--zstd-level",
            "19",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("staging cap reached"),
        "no cap line in the summary: {}",
        out.stderr
    );
    std::fs::remove_file(&path).unwrap();

    // Staging is given back when the save ends.
    let rss_before = vmm.rss_kib();
    let s = vmm.save_and_verify(&path, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let rss_after = vmm.rss_kib();
    let st = &s["staging"];
    eprintln!(
        "default cap: staging peak {} MiB; VmRSS {rss_before} KiB before the save, {rss_after} KiB after",
        st["peak_bytes"].as_u64().unwrap() >> 20
    );
    assert!(
        rss_after <= rss_before + (32 << 10),
        "the VMM kept staging: VmRSS {rss_before} KiB -> {rss_after} KiB (peak staging {})",
        st["peak_bytes"]
    );
    assert_eq!(st["cap_bytes"], vmm.mem_bytes, "default cap: {s}");
    assert_eq!(st["cap_reached"], false, "{s}");
    assert_eq!(st["waits"], 0, "{s}");
    let out = run(&["oracle", path.to_str().unwrap()], T);
    assert_eq!(out.code(), Some(0), "oracle failed: {}", out.stderr);
    vmm.assert_no_orphan_protection("after the save");
}

/// `--prepare-staging`: a size is prepared before the freeze and reported (JSON and text) and the image is
/// exact; by default (`auto`) a save prepares what the guest wrote since the VM's last save, and the first
/// save (no record yet) what the guest writes while watched before the freeze — all over its RAM for a
/// full-speed writer either way; nonsense is refused.
#[test]
fn prepared_staging_follows_the_guest_and_is_reported() {
    let _s = serial();
    let dir = TempDir::new("prepstaging");
    let vmm = Vmm::boot(dir.path(), &["--mem", "256M", "--write-rate", "full"]);
    let path = dir.join("vm.snap");
    let p = path.to_str().unwrap();
    let out = vmm.ctl(&["save", "--out", p, "--prepare-staging", "lots"], T);
    assert_eq!(out.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("auto"), "{}", out.stderr);

    // The first save has no record of writes: auto watches the guest write (nearly) all of its 128
    // units, and prepares that.
    let s = vmm.save_and_verify(&path, &[]);
    let st = &s["staging"];
    let units = st["probe_units"].as_u64().unwrap();
    assert!(units >= 64, "the probe saw {units} units written: {s}");
    assert!(st["probe_ms"].as_f64().unwrap() > 0.0, "{s}");
    let prepared = st["prepared_bytes"].as_u64().unwrap();
    assert!(prepared >= 128 << 20, "auto prepared {prepared} bytes: {s}");
    assert!(prepared <= vmm.mem_bytes, "{s}");
    let out = run(&["oracle", p], T);
    assert_eq!(out.code(), Some(0), "oracle failed: {}", out.stderr);
    std::fs::remove_file(&path).unwrap();

    let s = vmm.save_and_verify(&path, &["--prepare-staging", "64M"]);
    let st = &s["staging"];
    assert_eq!(st["prepared_bytes"], 64 << 20, "{s}");
    assert_eq!(st["probe_units"], 0, "a size was asked for: no probe: {s}");
    assert!(st["prepare_ms"].as_f64().unwrap() > 0.0, "{s}");
    let out = run(&["oracle", p], T);
    assert_eq!(out.code(), Some(0), "oracle failed: {}", out.stderr);
    std::fs::remove_file(&path).unwrap();

    // The guest rewrote all of its RAM since: auto prepares (nearly) all of it.
    std::thread::sleep(Duration::from_millis(500));
    let s = vmm.save_and_verify(&path, &[]);
    let prepared = s["staging"]["prepared_bytes"].as_u64().unwrap();
    assert!(prepared >= 128 << 20, "auto prepared {prepared} bytes: {s}");
    assert!(prepared <= vmm.mem_bytes, "{s}");
    let out = run(&["oracle", p], T);
    assert_eq!(out.code(), Some(0), "oracle failed: {}", out.stderr);
    std::fs::remove_file(&path).unwrap();

    let out = vmm.ctl(&["save", "--out", p, "--prepare-staging", "32M"], T);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("staging prepared before the freeze: 32.00 MiB"),
        "{}",
        out.stderr
    );
    vmm.assert_no_orphan_protection("after the saves");
}

/// An idle guest's save (its timer ticks still write a page now and then) does not grow staging: the
/// scanner stages beside the faults only while the guest writes all over its memory.
#[test]
fn an_idle_guests_save_does_not_grow_staging() {
    let _s = serial();
    let dir = TempDir::new("idlestaging");
    let vmm = Vmm::boot(dir.path(), &["--mem", "256M", "--write-rate", "idle"]);
    let path = dir.join("vm.snap");
    for i in 0..3 {
        let s = vmm.save_and_verify(&path, &[]);
        let st = &s["staging"];
        assert_eq!(st["scan_units_staged"], 0, "{s}");
        // The first save's probe sees a few units written by the ticks: the usual 16 MiB.
        assert_eq!(st["prepared_bytes"], 16 << 20, "{s}");
        if i == 0 {
            assert!(st["probe_ms"].as_f64().unwrap() > 0.0, "{s}");
            assert!(st["probe_units"].as_u64().unwrap() <= 8, "{s}");
        }
        // The scan's 32 MiB, the 16 MiB prepared, and the units the ticks wrote.
        assert!(st["peak_bytes"].as_u64().unwrap() <= 64 << 20, "{s}");
        std::fs::remove_file(&path).unwrap();
    }
}
