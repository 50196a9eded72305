//! The freeze instant is atomic against other clients, a client's pause survives a save, a kernel
//! guest whose configuration is not UTF-8 is saved and keeps running, figures only the built-in
//! guest gives are absent for kernel guests, and the default socket directory must be the user's own.

mod common;

#[path = "../../vmm-core/tests/common/testkernel.rs"]
#[allow(dead_code)]
mod testkernel;

use common::*;
use serde_json::Value;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

/// `snapctl oracle FILE` must pass: the image is exactly the memory at its freeze instant.
fn oracle(path: &Path) {
    let out = run(&["oracle", path.to_str().unwrap()], T);
    assert_eq!(
        out.code(),
        Some(0),
        "oracle {} failed: {}",
        path.display(),
        out.stderr
    );
}

/// Sends `req` over and over from another client until `stop`; counts the requests answered ok.
fn hammer(sock: &Path, reqs: &[&str], stop: &AtomicBool, ok: &AtomicU64) {
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let r = request(sock, reqs[i % reqs.len()]);
        if r["reply"] == "ok" {
            ok.fetch_add(1, Ordering::Relaxed);
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn saves_stay_exact_while_other_clients_pause_and_resume() {
    let _s = serial();
    let dir = TempDir::new("freeze-atomic");
    let vmm = Vmm::boot(dir.path(), &["--mem", "256M", "--vcpus", "2"]);
    let loops: [(&str, &[&str]); 2] = [
        ("resume loop", &[r#"{"cmd":"resume"}"#]),
        (
            "pause/resume loop",
            &[r#"{"cmd":"pause"}"#, r#"{"cmd":"resume"}"#],
        ),
    ];
    for (what, reqs) in loops {
        let stop = AtomicBool::new(false);
        let ok = AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| hammer(&vmm.sock, reqs, &stop, &ok));
            for i in 0..6 {
                let path = dir.join(&format!("{}-{i}.snap", what.replace([' ', '/'], "-")));
                let out = vmm.ctl(&["save", "--out", path.to_str().unwrap(), "--json"], T);
                assert_eq!(
                    out.code(),
                    Some(0),
                    "{what}: save {i} failed: {}",
                    out.stderr
                );
                verify(&path);
                oracle(&path);
                std::fs::remove_file(&path).unwrap();
            }
            stop.store(true, Ordering::SeqCst);
        });
        assert!(
            ok.load(Ordering::Relaxed) > 10,
            "{what}: the other client got few answers"
        );
        // Whatever the loop left, the guest runs on once resumed.
        let r = request(&vmm.sock, r#"{"cmd":"resume"}"#);
        assert_eq!(r["reply"], "ok", "{r}");
        vmm.assert_progress(Duration::from_secs(5));
    }
}

#[test]
fn a_paused_vm_stays_paused_across_a_save() {
    let _s = serial();
    let dir = TempDir::new("freeze-paused");
    let vmm = Vmm::boot(dir.path(), &["--mem", "128M", "--vcpus", "2"]);
    let r = request(&vmm.sock, r#"{"cmd":"pause"}"#);
    assert_eq!(r["reply"], "ok", "{r}");
    let path = dir.join("paused.snap");
    let summary = vmm.save_and_verify(&path, &[]);
    assert_eq!(summary["stayed_paused"], true, "{summary}");
    oracle(&path);
    let st = vmm.status();
    assert_eq!(st["state"], "paused", "the save resumed a paused VM: {st}");
    let before = vcpu_steps(&st);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        vcpu_steps(&vmm.status()),
        before,
        "a paused guest made progress"
    );
    let r = request(&vmm.sock, r#"{"cmd":"resume"}"#);
    assert_eq!(r["reply"], "ok", "{r}");
    vmm.assert_progress(Duration::from_secs(5));
}

#[test]
fn a_kernel_guest_from_a_non_utf8_path_is_saved_and_keeps_running() {
    let _s = serial();
    let k = testkernel::build();
    let dir = TempDir::new("freeze-kernel");
    // A path Linux allows and UTF-8 does not.
    let kpath = dir
        .path()
        .join(std::ffi::OsStr::from_bytes(b"kernel-\xff\xfe.elf"));
    std::fs::copy(&k.elf, &kpath).unwrap();
    let sock = dir.join("ctl.sock");
    let log = dir.join("serial.log");
    let mut cmd = Command::new(bin());
    cmd.args(["boot", "--mem", "64M", "--vcpus", "1", "--kernel"])
        .arg(&kpath)
        .args(["--cmdline", "console=ttyS0 tk.marker=nonutf8"])
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(&log);
    let mut vmm = Proc::spawn_cmd(&mut cmd, true);
    let before = wait_kernel_steps(&log, 0, "boot");
    assert!(vmm.running());
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the serial log is readable by others");

    // Progress figures only the built-in guest has are absent, not zeros.
    let st = request(&sock, r#"{"cmd":"status"}"#);
    assert_eq!(st["reply"], "ok", "{st}");
    for k in ["ticks", "steps", "fill_done", "steps_per_s"] {
        assert!(
            st.get(k).is_none(),
            "status of a kernel guest has {k}: {st}"
        );
    }
    let snap = dir.join("k.snap");
    let out = run(
        &[
            "save",
            "--out",
            snap.to_str().unwrap(),
            "--json",
            "--api-sock",
            sock.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), Some(0), "save failed: {}", out.stderr);
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "guest_max_stall_ms",
        "guest_steps_per_s_during",
        "freeze_steps",
    ] {
        assert!(
            summary.get(k).is_none(),
            "save summary of a kernel guest has {k}: {summary}"
        );
    }
    // The freeze's phases, the arming before it, and the downtime as the guest saw it (a vCPU is
    // parked only within the freeze).
    let f = &summary["freeze_ms"];
    for k in ["arm", "pause", "capture", "protect", "resume", "guest_held"] {
        assert!(f[k].as_f64().is_some(), "freeze_ms without {k}: {summary}");
    }
    assert!(
        f["guest_held"].as_f64().unwrap() <= summary["downtime_ms"].as_f64().unwrap(),
        "{summary}"
    );
    verify(&snap);
    // The guest runs on after the save: no page stayed write-protected.
    wait_kernel_steps(&log, before, "after the save");
    let info = run(&["info", snap.to_str().unwrap(), "--json"], T);
    assert_eq!(info.code(), Some(0), "{}", info.stderr);
    let _ = request(&sock, r#"{"cmd":"shutdown"}"#);
    vmm.wait(Duration::from_secs(30), "snapctl boot");
}

/// `snapctl status` with the default socket path, under `XDG_RUNTIME_DIR=runtime`.
fn status_in(runtime: &Path) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["status", "--name", "t"])
        .env("XDG_RUNTIME_DIR", runtime);
    Proc::spawn_cmd(&mut cmd, true).wait(Duration::from_secs(30), "snapctl status")
}

#[test]
fn the_default_socket_directory_must_be_the_users_own() {
    let _s = serial();
    let dir = TempDir::new("sockdir");
    let sockdir = dir.join("snapctl");
    let refused = |what: &str, needle: &str| {
        let out = status_in(dir.path());
        assert_ne!(out.code(), Some(0), "{what}: status was not refused");
        assert!(
            out.stderr.contains(needle),
            "{what}: unclear error: {}",
            out.stderr
        );
        let mut cmd = Command::new(bin());
        cmd.args([
            "boot",
            "--mem",
            "64M",
            "--name",
            "t",
            "--write-rate",
            "idle",
        ])
        .env("XDG_RUNTIME_DIR", dir.path());
        let out = Proc::spawn_cmd(&mut cmd, true).wait(Duration::from_secs(30), "snapctl boot");
        assert_ne!(out.code(), Some(0), "{what}: boot was not refused");
        assert!(
            out.stderr.contains(needle),
            "{what}: unclear error: {}",
            out.stderr
        );
    };
    // Open to others.
    std::fs::create_dir(&sockdir).unwrap();
    std::fs::set_permissions(&sockdir, std::fs::Permissions::from_mode(0o755)).unwrap();
    refused("mode 0755", "open to other users");
    // Another user's.
    std::fs::set_permissions(&sockdir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&sockdir, Some(65534), Some(65534)).unwrap();
    refused("owned by uid 65534", "belongs to uid 65534");
    std::fs::remove_dir(&sockdir).unwrap();
    // A symbolic link to a directory of ours.
    let real = dir.join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&real, &sockdir).unwrap();
    refused("a symlink", "symbolic link");
    std::fs::remove_file(&sockdir).unwrap();

    // Missing: the VMM makes it, private.
    let mut cmd = Command::new(bin());
    cmd.args([
        "boot",
        "--mem",
        "64M",
        "--name",
        "t",
        "--write-rate",
        "idle",
    ])
    .env("XDG_RUNTIME_DIR", dir.path());
    let mut vmm = Proc::spawn_cmd(&mut cmd, true);
    let t0 = Instant::now();
    while status_in(dir.path()).code() != Some(0) {
        assert!(vmm.running(), "snapctl boot exited");
        assert!(t0.elapsed() < Duration::from_secs(60), "VMM never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = std::fs::symlink_metadata(&sockdir).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.permissions().mode() & 0o777, 0o700);
    let _ = request(&sockdir.join("t.sock"), r#"{"cmd":"shutdown"}"#);
    vmm.wait(Duration::from_secs(30), "snapctl boot");
}
