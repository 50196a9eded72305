//! The control socket: mode 0600, only the VMM's own user (or root) served (peer credentials), malformed,
//! oversized and unknown requests answered with an error, no client can block the VMM or other clients,
//! one VMM per socket, stale sockets replaced.

mod common;

use common::*;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

const GUEST: &[&str] = &["--mem", "64M", "--write-rate", "500"];
const T: Duration = Duration::from_secs(10);

/// Status answers quickly.
fn assert_responsive(vmm: &Vmm) {
    let t = Instant::now();
    let st = vmm.status();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "status took {:?}",
        t.elapsed()
    );
    assert_eq!(st["state"], "running");
}

#[test]
fn socket_is_0600_and_other_users_are_refused() {
    let _s = serial();
    let dir = TempDir::new("perm");
    // Let `nobody` reach the socket's directory (the socket's own mode is what is tested).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let vmm = Vmm::boot(dir.path(), GUEST);
    let meta = std::fs::metadata(&vmm.sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");

    // Run the snapctl client as `nobody` (uid 65534).
    let as_nobody = || {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                bin(),
                "status",
                "--api-sock",
            ])
            .arg(&vmm.sock)
            .output()
            .expect("running setpriv (util-linux)");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // With mode 0600, the connect itself fails.
    let (code, err) = as_nobody();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("Permission denied") && err.contains("another user"),
        "{err}"
    );
    // Even when the socket is opened up, the VMM checks the peer's credentials and refuses.
    std::fs::set_permissions(&vmm.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, err) = as_nobody();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("[denied]") && err.contains("user 65534"),
        "{err}"
    );
    assert_responsive(&vmm);
}

#[test]
fn bad_requests_get_error_replies() {
    let _s = serial();
    let dir = TempDir::new("bad");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let nested = format!("{}\n", "[".repeat(30_000));
    let big_line = format!(
        "{{\"cmd\":\"status\",\"x\":\"{}\"}}\n",
        "a".repeat(100 << 10)
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not JSON", b"this is not json\n".to_vec(), "bad_request"),
        ("empty line", b"\n".to_vec(), "bad_request"),
        ("JSON array", b"[1,2,3]\n".to_vec(), "bad_request"),
        ("no cmd", b"{\"foo\":1}\n".to_vec(), "bad_request"),
        (
            "unknown cmd",
            b"{\"cmd\":\"explode\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "cmd not a string",
            b"{\"cmd\":42}\n".to_vec(),
            "bad_request",
        ),
        (
            "unknown field",
            b"{\"cmd\":\"save\",\"path\":\"/tmp/x\",\"bogus\":1}\n".to_vec(),
            "bad_request",
        ),
        (
            "save without path",
            b"{\"cmd\":\"save\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "relative path",
            b"{\"cmd\":\"save\",\"path\":\"rel.snap\"}\n".to_vec(),
            "bad_request",
        ),
        (
            "zstd level",
            b"{\"cmd\":\"save\",\"path\":\"/tmp/x\",\"zstd\":true,\"level\":99}\n".to_vec(),
            "bad_request",
        ),
        (
            "zero bandwidth",
            b"{\"cmd\":\"save\",\"path\":\"/tmp/x\",\"max_bandwidth\":0}\n".to_vec(),
            "bad_request",
        ),
        (
            "negative bandwidth",
            b"{\"cmd\":\"save\",\"path\":\"/tmp/x\",\"max_bandwidth\":-1}\n".to_vec(),
            "bad_request",
        ),
        (
            "invalid UTF-8",
            b"{\"cmd\":\"\xff\xfe\"}\n".to_vec(),
            "bad_request",
        ),
        ("NUL bytes", b"\0\0\0\0\n".to_vec(), "bad_request"),
        ("deep nesting", nested.into_bytes(), "bad_request"),
        ("oversized line", big_line.into_bytes(), "bad_request"),
        // No newline at all: the VMM must answer once the limit is passed, not wait for the end of the line.
        (
            "oversized, no newline",
            vec![b' '; 200 << 10],
            "bad_request",
        ),
    ];
    for (what, bytes, kind) in cases {
        let t = Instant::now();
        let replies = raw_request(&vmm.sock, &bytes, T);
        let r = replies.last().unwrap_or_else(|| panic!("{what}: no reply"));
        assert_eq!(r["reply"], "error", "{what}: {r}");
        assert_eq!(r["kind"], kind, "{what}: {r}");
        assert!(!r["message"].as_str().unwrap().is_empty(), "{what}: {r}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{what}: reply took {:?}",
            t.elapsed()
        );
        assert_responsive(&vmm);
    }
    // A 10 MiB line that is never finished.
    let s = UnixStream::connect(&vmm.sock).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..10 {
            if w.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let r = read_replies(s, T);
    assert_eq!(r.last().unwrap()["kind"], "bad_request");
    writer.join().unwrap();
    assert_responsive(&vmm);
    assert!(vmm.proc.child.id() > 0);
}

#[test]
fn silent_and_slow_clients_do_not_block_the_vmm() {
    let _s = serial();
    let dir = TempDir::new("silent");
    let vmm = Vmm::boot(dir.path(), GUEST);
    // Clients that connect and say nothing, or half a line.
    let silent: Vec<UnixStream> = (0..10)
        .map(|_| UnixStream::connect(&vmm.sock).unwrap())
        .collect();
    let mut partial = UnixStream::connect(&vmm.sock).unwrap();
    partial.write_all(b"{\"cmd\":\"sta").unwrap();
    let t0 = Instant::now();
    for _ in 0..5 {
        assert_responsive(&vmm);
    }
    // A save (and its verification) works meanwhile, also at background priority.
    vmm.save_and_verify(&dir.join("vm.snap"), &[]);
    vmm.save_and_verify(&dir.join("bg.snap"), &["--background"]);
    assert_responsive(&vmm);
    // The silent ones are told and closed after 30 s; the VMM still answers.
    partial
        .set_read_timeout(Some(Duration::from_secs(45)))
        .unwrap();
    let r = read_replies(partial, Duration::from_secs(45));
    assert_eq!(r.last().unwrap()["kind"], "timeout", "{r:?}");
    let waited = t0.elapsed();
    assert!(
        waited > Duration::from_secs(25) && waited < Duration::from_secs(40),
        "closed after {waited:?}"
    );
    for s in silent {
        s.set_read_timeout(Some(T)).unwrap();
        let r = read_replies(s, T);
        assert_eq!(r.last().unwrap()["kind"], "timeout", "{r:?}");
    }
    assert_responsive(&vmm);
}

#[test]
fn connection_flood_is_bounded() {
    let _s = serial();
    let dir = TempDir::new("flood");
    let vmm = Vmm::boot(dir.path(), GUEST);
    let threads0 = vmm.threads();
    let conns: Vec<UnixStream> = (0..200)
        .filter_map(|_| UnixStream::connect(&vmm.sock).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let threads = vmm.threads();
    assert!(
        threads < threads0 + 80,
        "{threads} threads for 200 idle connections (was {threads0})"
    );
    drop(conns);
    // Once they are gone, everything is served again.
    let t0 = Instant::now();
    loop {
        let r = request(&vmm.sock, r#"{"cmd":"status"}"#);
        if r["reply"] == "ok" {
            break;
        }
        assert_eq!(r["kind"], "busy", "{r}");
        assert!(t0.elapsed() < T, "still busy after the flood ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_responsive(&vmm);
}

#[test]
fn one_vmm_per_socket_and_stale_sockets_are_replaced() {
    let _s = serial();
    let dir = TempDir::new("sock");
    let first = Vmm::boot(dir.path(), GUEST);
    // A second VMM on the same socket fails clearly and leaves the first alone.
    let second = run(
        &[
            "boot",
            "--mem",
            "64M",
            "--api-sock",
            first.sock_arg(),
            "--serial-log",
            dir.join("s2.log").to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(second.code(), Some(1), "{}", second.stderr);
    assert!(
        second.stderr.contains("another VM is already serving"),
        "{}",
        second.stderr
    );
    assert_responsive(&first);
    // A VMM killed outright leaves its socket file; the next boot replaces it.
    let sock = first.sock.clone();
    first.proc.signal(nix::sys::signal::Signal::SIGKILL);
    drop(first);
    assert!(sock.exists(), "a SIGKILLed VMM cannot remove its socket");
    let again = Vmm::boot(dir.path(), GUEST);
    assert_responsive(&again);
    // Shutdown removes the socket.
    let out = again.ctl(&["shutdown"], T);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let t0 = Instant::now();
    while sock.exists() {
        assert!(t0.elapsed() < T, "socket not removed after shutdown");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(again);
    // Something that is not a socket is never deleted to make room.
    std::fs::write(&sock, b"not a socket").unwrap();
    let out = run(
        &[
            "boot",
            "--mem",
            "64M",
            "--api-sock",
            sock.to_str().unwrap(),
            "--serial-log",
            dir.join("s3.log").to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("not a socket"), "{}", out.stderr);
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
}
