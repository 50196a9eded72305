//! Live migration between two real VMMs (`snapctl migrate` → `snapctl restore --listen`), over
//! loopback TCP and a Unix socket: a full-speed built-in guest migrates, the source VMM ends, the
//! destination's guest keeps progressing, passes its self-check, and a save of it passes the
//! oracle (every migrated page is the guest's own); a wrong secret is refused before any state
//! (the source's guest runs on, the destination listens on and then takes the right source); a
//! destination killed mid-transfer leaves the source frozen until a forced resume; a corrupt
//! frame ends the destination with an error, never a VM on wrong pages; connections cut
//! mid-transfer (or a link gone silent) leave the destination waiting (refusing a peer that does
//! not name its session) until `migrate --resume` finishes the migration, or
//! until its `--resume-timeout` ends it (the source staying frozen). A TCP proxy in the test
//! damages the stream at a chosen offset. Figures are printed, never asserted
//! beyond generous liveness bounds.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

/// Writes a token file (mode 0600) holding `secret`.
fn token(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A free loopback TCP port (bound and released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `snapctl restore --listen ADDR --token-file TOKEN` with its control socket and serial log in
/// `dir` (not waited for: the control socket answers once a VM arrived).
fn listen(dir: &Path, addr: &str, token: &Path) -> Vmm {
    listen_with(dir, addr, token, &[])
}

/// [`listen`] with more arguments.
fn listen_with(dir: &Path, addr: &str, token: &Path, extra: &[&str]) -> Vmm {
    let sock = dir.join("dst.sock");
    let mut cmd = Command::new(bin());
    cmd.args(["restore", "--listen", addr, "--token-file"])
        .arg(token)
        .args(extra)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join("dst.serial"));
    let vmm = Vmm {
        proc: Proc::spawn_cmd(&mut cmd, true),
        sock,
        mem_bytes: 0,
    };
    // Listening once the address accepts (a TCP probe is refused by the handshake and logged;
    // the destination listens on).
    let t0 = Instant::now();
    loop {
        let up = match addr.strip_prefix("unix:") {
            Some(p) => Path::new(p).exists(),
            None => TcpStream::connect(addr).is_ok(),
        };
        if up {
            return vmm;
        }
        assert!(t0.elapsed() < T, "restore --listen {addr}: not listening");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `snapctl migrate --to ADDR --token-file TOKEN --json EXTRA` on `src`.
fn migrate(src: &Vmm, to: &str, token: &Path, extra: &[&str]) -> Output {
    let mut a = vec![
        "migrate",
        "--to",
        to,
        "--token-file",
        token.to_str().unwrap(),
        "--json",
    ];
    a.extend(extra);
    src.ctl(&a, T)
}

/// Waits until the destination's `status` shows every page resident; returns that status.
fn wait_resident(dst: &mut Vmm) -> Value {
    let t0 = Instant::now();
    loop {
        assert!(dst.proc.running(), "the destination VMM exited");
        if std::os::unix::net::UnixStream::connect(&dst.sock).is_ok() {
            let st = dst.status();
            if st["migration"]["resident"] == true {
                dst.mem_bytes = st["mem_bytes"].as_u64().unwrap();
                return st;
            }
        }
        assert!(t0.elapsed() < T, "the destination never got all its memory");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The checks a migrated guest must pass: progress on every vCPU, its self-check, and a save of
/// it that passes the oracle.
fn check_migrated(dst: &Vmm, dir: &Path) {
    dst.assert_progress(Duration::from_secs(30));
    let out = dst.ctl(&["self-check", "--json"], T);
    assert_eq!(
        out.code(),
        Some(0),
        "self-check on the destination: {}",
        out.stderr
    );
    let file = dir.join("after.snap");
    dst.save_and_verify(&file, &[]);
    let out = run(&["oracle", file.to_str().unwrap()], T);
    assert_eq!(
        out.code(),
        Some(0),
        "oracle of the migrated guest: {}",
        out.stderr
    );
    dst.assert_progress(Duration::from_secs(30));
}

fn shutdown(vmm: Vmm) {
    let _ = vmm.ctl(&["shutdown"], T);
    vmm.proc.wait(T, "VMM shutdown");
}

/// A full migration of a full-speed guest to `to` (a destination listening there); the source
/// VMM must end, the destination must pass [`check_migrated`].
fn full_migration(src: Vmm, mut dst: Vmm, to: &str, tok: &Path, extra: &[&str], dir: &Path) {
    let out = migrate(&src, to, tok, extra);
    assert_eq!(out.code(), Some(0), "migrate failed: {}", out.stderr);
    let r: Value = serde_json::from_slice(&out.stdout).expect("migrate --json prints JSON");
    eprintln!(
        "migration to {to}{extra:?}: downtime {:.3} ms, {:.3} s, wire {} B for {} B of data ({} \
         zero), {} requests, fault wait p50 {} µs p99 {} µs",
        r["downtime_ms"].as_f64().unwrap(),
        r["duration_s"].as_f64().unwrap(),
        r["wire_bytes"],
        r["data_bytes"],
        r["zero_bytes"],
        r["demand_requests"],
        r["dest"]["fault_wait_p50_us"],
        r["dest"]["fault_wait_p99_us"]
    );
    let data = r["data_bytes"].as_u64().unwrap();
    let zero = r["zero_bytes"].as_u64().unwrap();
    assert_eq!(
        data + zero,
        src.mem_bytes,
        "every guest byte is sent once: {r}"
    );
    assert!(
        data > src.mem_bytes / 2,
        "a full-speed guest's memory is mostly data: {r}"
    );
    if extra.is_empty() {
        // Raw: the wire carries the data and a few bytes per frame.
        assert!(r["wire_ratio"].as_f64().unwrap() <= 1.01, "{r}");
    }
    // The source VMM ends once the destination has everything.
    let s = src.proc.wait(T, "the source VMM after the migration");
    assert_eq!(s.code(), Some(0), "source VMM: {}", s.stderr);
    let st = wait_resident(&mut dst);
    assert_eq!(st["migration"]["resident_bytes"], st["mem_bytes"]);
    check_migrated(&dst, dir);
    shutdown(dst);
}

#[test]
fn a_full_speed_guest_migrates_over_tcp() {
    let _g = serial();
    let dir = TempDir::new("mig-tcp");
    let tok = token(dir.path(), "tok", "tcp-secret-0123456789abcdef");
    let src_dir = TempDir::new("mig-tcp-src");
    let src = Vmm::boot(src_dir.path(), &["--mem", "256M", "--write-rate", "full"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let dst = listen(dir.path(), &addr, &tok);
    full_migration(src, dst, &addr, &tok, &[], dir.path());
}

#[test]
fn a_full_speed_guest_migrates_over_a_unix_socket_with_zstd() {
    let _g = serial();
    let dir = TempDir::new("mig-unix");
    let tok = token(dir.path(), "tok", "unix-secret-0123456789abcdef");
    let src_dir = TempDir::new("mig-unix-src");
    let src = Vmm::boot(src_dir.path(), &["--mem", "256M", "--write-rate", "full"]);
    let addr = format!("unix:{}", dir.join("mig.sock").display());
    let dst = listen(dir.path(), &addr, &tok);
    full_migration(src, dst, &addr, &tok, &["--zstd"], dir.path());
}

#[test]
fn a_wrong_secret_is_refused_before_any_state_and_the_right_one_then_migrates() {
    let _g = serial();
    let dir = TempDir::new("mig-auth");
    let good = token(dir.path(), "good", "the-right-secret-0123456789");
    let bad = token(dir.path(), "bad", "a-wrong-secret-0123456789ab");
    let src_dir = TempDir::new("mig-auth-src");
    let src = Vmm::boot(src_dir.path(), &["--mem", "128M", "--write-rate", "full"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut dst = listen(dir.path(), &addr, &good);
    let out = migrate(&src, &addr, &bad, &[]);
    assert_eq!(
        out.code(),
        Some(1),
        "migrate with a wrong secret: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("authentication failed"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("runs on here"), "{}", out.stderr);
    // The source's guest runs on, not frozen; the destination received nothing and listens on.
    assert_eq!(src.status()["state"], "running");
    src.assert_progress(Duration::from_secs(30));
    assert!(
        dst.proc.running(),
        "the destination gave up after a refused peer"
    );
    // A token file others can read is refused by the client before anything is sent.
    let open = token(dir.path(), "open", "the-right-secret-0123456789");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = migrate(&src, &addr, &open, &[]);
    assert_ne!(out.code(), Some(0));
    assert!(out.stderr.contains("chmod 600"), "{}", out.stderr);
    // The right secret then migrates.
    full_migration(src, dst, &addr, &good, &[], dir.path());
}

/// What the proxy does to the source → destination stream at byte `at`.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Flip one bit of byte `at`.
    Flip(u64),
    /// Stop forwarding at `at` and close the destination's side (a cut stream).
    Cut(u64),
    /// Stop forwarding at `at`, both ways, keeping every connection open (a half-open link).
    Stall(u64),
    /// SIGKILL the destination VMM (pid) once `at` bytes went through.
    Kill(u64, i32),
    /// Flip one bit inside the payload of the first frame of this kind (frames parsed on the fly:
    /// 12-byte header, kind in byte 0, payload length in bytes 4..8).
    FlipFrame(u8),
}

/// Follows the frames of a stream to find the first payload byte of a frame of one kind.
#[derive(Default)]
struct Frames {
    head: Vec<u8>,
    left: u64,
    hit: bool,
    done: bool,
}

impl Frames {
    /// Flips a bit of the payload of the first frame of kind `kind` in `chunk`, if it is there.
    fn flip(&mut self, chunk: &mut [u8], kind: u8) {
        for b in chunk.iter_mut() {
            if self.done {
                return;
            }
            if self.left == 0 {
                self.head.push(*b);
                if self.head.len() == 12 {
                    self.left = u64::from(u32::from_le_bytes(self.head[4..8].try_into().unwrap()));
                    self.hit = self.head[0] == kind && self.left > 0;
                    self.head.clear();
                }
            } else {
                if self.hit {
                    *b ^= 0x10;
                    self.done = true;
                }
                self.left -= 1;
            }
        }
    }
}

/// A TCP proxy from a fresh loopback port to `to`: forwards every connection it accepts (the
/// migration's bulk connection first, then its demand connection, then those of a `--resume`),
/// damaging the source → destination direction of the first as told; a cut cuts every connection
/// open at that moment, both ways. Returns the port and the bytes of the first forwarded so far.
fn proxy(to: String, damage: Damage) -> (u16, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(AtomicU64::new(0));
    let count = seen.clone();
    let open: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
    std::thread::spawn(move || {
        for (i, src) in l.incoming().enumerate() {
            let Ok(src) = src else { return };
            let Ok(dst) = TcpStream::connect(&to) else {
                continue;
            };
            {
                let mut o = open.lock().unwrap();
                o.push(src.try_clone().unwrap());
                o.push(dst.try_clone().unwrap());
            }
            let damage = (i == 0).then_some(damage);
            let count = (i == 0).then(|| count.clone());
            let open = open.clone();
            std::thread::spawn(move || forward(src, dst, damage, count, open));
        }
    });
    (port, seen)
}

/// One proxied connection (see [`proxy`]).
fn forward(
    src: TcpStream,
    dst: TcpStream,
    damage: Option<Damage>,
    count: Option<Arc<AtomicU64>>,
    open: Arc<std::sync::Mutex<Vec<TcpStream>>>,
) {
    let (mut s_r, mut d_w) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
    let (mut d_r, mut s_w) = (dst, src);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = d_r.read(&mut buf) {
            if n == 0 || s_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_w.shutdown(Shutdown::Both);
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0u64;
    let mut frames = Frames::default();
    let store = |n| {
        if let Some(c) = &count {
            c.store(n, Ordering::SeqCst);
        }
    };
    loop {
        let n = match s_r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let end = off + n as u64;
        match damage {
            Some(Damage::Flip(at)) if (off..end).contains(&at) => {
                chunk[(at - off) as usize] ^= 0x10
            }
            Some(Damage::FlipFrame(kind)) => frames.flip(chunk, kind),
            Some(Damage::Cut(at)) if end > at => {
                let _ = d_w.write_all(&chunk[..(at - off) as usize]);
                store(at);
                // The connections are lost, both ways: the destination reads the end inside a
                // frame, the source sees its connections closed.
                for c in open.lock().unwrap().drain(..) {
                    let _ = c.shutdown(Shutdown::Both);
                }
                return;
            }
            Some(Damage::Stall(at)) if end > at => {
                let _ = d_w.write_all(&chunk[..(at - off) as usize]);
                store(at);
                // Holds the connections open, forwarding nothing more.
                std::thread::sleep(Duration::from_secs(600));
                return;
            }
            Some(Damage::Kill(at, pid)) if end > at && off <= at => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            _ => {}
        }
        if d_w.write_all(chunk).is_err() {
            break;
        }
        off = end;
        store(off);
    }
    let _ = d_w.shutdown(Shutdown::Both);
}

/// After a migration failed once the destination ran: the source stays frozen (a plain resume is
/// refused, no vCPU steps), and a forced resume runs the guest on from its freeze instant with
/// its memory intact.
fn check_frozen_then_force_resume(src: &Vmm) {
    let st = src.status();
    assert_eq!(st["state"], "paused", "{st}");
    assert_eq!(st["migration"]["state"], "frozen_after_migration", "{st}");
    let s0 = vcpu_steps(&st);
    let out = src.ctl(&["resume"], T);
    assert_ne!(out.code(), Some(0), "a plain resume must be refused");
    assert!(
        out.stderr.contains("--force-after-failed-migration"),
        "{}",
        out.stderr
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vcpu_steps(&src.status()), s0, "the frozen source ran");
    let out = src.ctl(&["resume", "--force-after-failed-migration"], T);
    assert_eq!(out.code(), Some(0), "forced resume: {}", out.stderr);
    src.assert_progress(Duration::from_secs(30));
    let out = src.ctl(&["self-check", "--json"], T);
    assert_eq!(
        out.code(),
        Some(0),
        "self-check after the forced resume: {}",
        out.stderr
    );
}

#[test]
fn a_destination_killed_mid_transfer_leaves_the_source_frozen_until_forced() {
    let _g = serial();
    let dir = TempDir::new("mig-kill");
    let tok = token(dir.path(), "tok", "kill-secret-0123456789abcdef");
    let src_dir = TempDir::new("mig-kill-src");
    let src = Vmm::boot(src_dir.path(), &["--mem", "256M", "--write-rate", "full"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let dst = listen(dir.path(), &addr, &tok);
    let (port, seen) = proxy(addr, Damage::Kill(32 << 20, dst.pid()));
    let out = migrate(&src, &format!("127.0.0.1:{port}"), &tok, &[]);
    eprintln!("proxy forwarded {} bytes", seen.load(Ordering::SeqCst));
    assert_eq!(
        out.code(),
        Some(2),
        "migrate to a killed destination: {}",
        out.stderr
    );
    assert!(out.stderr.contains("stays frozen"), "{}", out.stderr);
    let d = dst.proc.wait(T, "the killed destination");
    assert!(d.code().is_none(), "the destination was killed: {d:?}");
    check_frozen_then_force_resume(&src);
    shutdown(src);
}

#[test]
fn corrupt_or_cut_streams_are_refused_by_the_destination() {
    let _g = serial();
    let tok_dir = TempDir::new("mig-bad");
    let tok = token(tok_dir.path(), "tok", "bad-stream-secret-0123456789");
    let src_dir = TempDir::new("mig-bad-src");
    let src = Vmm::boot(src_dir.path(), &["--mem", "256M", "--write-rate", "full"]);
    // Source → destination before any state: Hello (12 + 53 bytes), Auth (12 + 32), then the
    // Prepare frame from byte 109. A bit flipped in it: refused before the source freezes, its
    // guest runs on. A bit flipped in the State frame (kind 4, sent once the source froze):
    // refused before the destination runs, the source resumes its guest.
    let cases = [
        (Damage::Flip(109 + 40), false),
        (Damage::FlipFrame(4), false),
        (Damage::Flip(24 << 20), true),
    ];
    for (damage, after_running) in cases {
        let dir = TempDir::new("mig-bad-dst");
        let addr = format!("127.0.0.1:{}", free_port());
        let dst = listen(dir.path(), &addr, &tok);
        let (port, _) = proxy(addr, damage);
        let out = migrate(&src, &format!("127.0.0.1:{port}"), &tok, &[]);
        let d = dst.proc.wait(T, "the destination of a damaged stream");
        eprintln!(
            "{damage:?}: migrate exit {:?}, destination exit {:?}: {}",
            out.code(),
            d.code(),
            d.stderr.lines().last().unwrap_or("")
        );
        assert!(
            matches!(d.code(), Some(c) if c != 0),
            "the destination must end with an error: {d:?}"
        );
        let said = d.stderr.to_lowercase();
        assert!(
            said.contains("corrupt") || said.contains("truncated") || said.contains("crc"),
            "{}",
            d.stderr
        );
        if after_running {
            assert_eq!(out.code(), Some(2), "{}", out.stderr);
            check_frozen_then_force_resume(&src);
        } else {
            assert_eq!(out.code(), Some(1), "{}", out.stderr);
            assert_eq!(src.status()["state"], "running");
            src.assert_progress(Duration::from_secs(30));
        }
    }
    shutdown(src);
}

/// Migrates through a proxy that cuts (or stalls) the migration's connections; the source
/// reports the loss and stays frozen. Returns the proxy's address.
fn cut_migration(src: &Vmm, addr: &str, tok: &Path, damage: Damage) -> String {
    let (port, seen) = proxy(addr.to_string(), damage);
    let via = format!("127.0.0.1:{port}");
    let out = migrate(src, &via, tok, &[]);
    eprintln!("proxy cut after {} bytes", seen.load(Ordering::SeqCst));
    assert_eq!(out.code(), Some(2), "migrate, cut: {}", out.stderr);
    assert!(out.stderr.contains("stays frozen"), "{}", out.stderr);
    assert!(out.stderr.contains("--resume"), "{}", out.stderr);
    via
}

#[test]
fn a_migration_cut_mid_transfer_waits_and_resume_finishes_it() {
    lost_then_resumed(Damage::Cut(48 << 20));
}

/// A link that stops carrying bytes without closing (half-open): 30 s of silence count as lost on
/// both sides, and `--resume` finishes the migration.
#[test]
fn a_stalled_link_counts_as_lost_and_resume_finishes_the_migration() {
    lost_then_resumed(Damage::Stall(48 << 20));
}

/// The migration's connections fail as `damage` says after the destination ran: the destination
/// waits, refuses a peer that does not name the session, and `migrate --resume` finishes it.
fn lost_then_resumed(damage: Damage) {
    let _g = serial();
    let dir = TempDir::new("mig-resume");
    let tok = token(dir.path(), "tok", "resume-secret-0123456789abcdef");
    let src_dir = TempDir::new("mig-resume-src");
    let src = Vmm::boot(src_dir.path(), &["--mem", "256M", "--write-rate", "full"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let mut dst = listen(dir.path(), &addr, &tok);
    cut_migration(&src, &addr, &tok, damage);
    // The destination keeps its VM and says it waits for the source.
    let t0 = Instant::now();
    let st = loop {
        assert!(
            dst.proc.running(),
            "the destination ended after a lost connection"
        );
        let st = dst.status();
        if st["migration"]["waiting_for_source"] == true {
            break st;
        }
        assert!(
            t0.elapsed() < T,
            "the destination never noticed the loss: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("destination while waiting: {}", st["migration"]);
    assert_eq!(st["migration"]["resident"], false, "{st}");
    assert!(st["migration"]["lost"].is_string(), "{st}");
    // The source stays frozen meanwhile, and says it can resume.
    let sst = src.status();
    assert_eq!(sst["migration"]["resumable"], true, "{sst}");
    let s0 = vcpu_steps(&sst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vcpu_steps(&src.status()), s0, "the frozen source ran");
    // A peer that holds the secret but not the session is refused; the destination waits on.
    {
        use vm_snapshot::migrate::{source_handshake, wire, Token};
        let c = TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        let (mut r, mut w) = (c.try_clone().unwrap(), c);
        source_handshake(&mut r, &mut w, &Token::read(&tok).unwrap()).unwrap();
        wire::write_frame(&mut w, wire::Kind::Resume, &[&[7u8; 32]]).unwrap();
        let mut buf = Vec::new();
        let got = wire::read_frame(&mut r, &mut buf, 0);
        assert!(
            matches!(got, Ok(wire::Kind::Error)),
            "a resume naming another session: {got:?}"
        );
        let st = dst.status();
        assert_eq!(st["migration"]["waiting_for_source"], true, "{st}");
    }
    // `--resume` (address and secret remembered) finishes it.
    let out = src.ctl(&["migrate", "--resume", "--json"], T);
    assert_eq!(out.code(), Some(0), "migrate --resume: {}", out.stderr);
    let r: Value = serde_json::from_slice(&out.stdout).expect("migrate --json prints JSON");
    eprintln!(
        "resumed: {:.3} s from the freeze, wire {} B for {} B of data ({} zero), {} requests",
        r["duration_s"].as_f64().unwrap(),
        r["wire_bytes"],
        r["data_bytes"],
        r["zero_bytes"],
        r["demand_requests"]
    );
    assert_eq!(r["reconnects"], 1, "{r}");
    let sent = r["data_bytes"].as_u64().unwrap() + r["zero_bytes"].as_u64().unwrap();
    // Every byte at least once; what was in flight when the connections broke (socket buffers,
    // the proxy's), once more; what the destination held, not again.
    assert!(sent >= src.mem_bytes, "{r}");
    assert!(sent <= src.mem_bytes + src.mem_bytes / 8, "{r}");
    let s = src
        .proc
        .wait(T, "the source VMM after the resumed migration");
    assert_eq!(s.code(), Some(0), "source VMM: {}", s.stderr);
    let st = wait_resident(&mut dst);
    assert_eq!(st["migration"]["reconnects"], 1, "{st}");
    assert_eq!(st["migration"]["waiting_for_source"], false, "{st}");
    check_migrated(&dst, dir.path());
    shutdown(dst);
}

#[test]
fn a_destination_whose_source_does_not_reconnect_stops_after_its_timeout() {
    let _g = serial();
    let dir = TempDir::new("mig-timeout");
    let tok = token(dir.path(), "tok", "timeout-secret-0123456789abcdef");
    let src_dir = TempDir::new("mig-timeout-src");
    let src = Vmm::boot(src_dir.path(), &["--mem", "256M", "--write-rate", "full"]);
    let addr = format!("127.0.0.1:{}", free_port());
    let dst = listen_with(dir.path(), &addr, &tok, &["--resume-timeout", "2"]);
    cut_migration(&src, &addr, &tok, Damage::Cut(48 << 20));
    let d = dst
        .proc
        .wait(T, "the destination whose source did not reconnect");
    assert_eq!(d.code(), Some(8), "documented exit code 8: {d:?}");
    assert!(d.stderr.contains("did not reconnect"), "{}", d.stderr);
    // The source stays frozen; a forced resume runs it on.
    check_frozen_then_force_resume(&src);
    shutdown(src);
}
