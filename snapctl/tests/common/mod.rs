//! Shared helpers of the snapctl integration tests: VMM processes (killed on drop), clients with timeouts,
//! raw control-socket requests, guest progress watching and the /proc/PID/pagemap uffd-wp check.
//!
//! Every VMM runs on its own `--api-sock` in a private temporary directory, with `--serial-log` to a file.
//! Every wait is bounded. Tests that run VMMs take [`serial`] so that they do not compete for the CPUs.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The snapctl binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_snapctl")
}

/// One VMM-running test at a time (the machines have 2 cores).
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A private directory under /tmp, removed (with everything in it) on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "snapctl-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a temporary directory");
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tmpfs mounted by the test (root only), unmounted on drop.
#[derive(Debug)]
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn tmpfs(dir: &Path, options: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(
            st.success(),
            "mount -t tmpfs -o {options} failed (tests must run as root)"
        );
        Self(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    out: Option<JoinHandle<Vec<u8>>>,
    err: Option<JoinHandle<Vec<u8>>>,
}

/// What a finished client printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

fn drain(r: Option<impl Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    r.map(|mut r| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    })
}

impl Proc {
    /// Starts `snapctl ARGS` with stdout and stderr collected (stdin null).
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_cmd(Command::new(bin()).args(args), true)
    }

    /// Starts a prepared command; with `collect_stdout` false, the caller takes `child.stdout` itself.
    pub fn spawn_cmd(cmd: &mut Command, collect_stdout: bool) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting snapctl");
        let out = if collect_stdout {
            drain(child.stdout.take())
        } else {
            None
        };
        let err = drain(child.stderr.take());
        Self { child, out, err }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// Waits at most `timeout` for the process to end; panics (after killing it) if it does not.
    pub fn wait(mut self, timeout: Duration, what: &str) -> Output {
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            if t0.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let err = self
                    .err
                    .take()
                    .and_then(|h| h.join().ok())
                    .unwrap_or_default();
                panic!(
                    "{what}: still running after {timeout:?} (killed); stderr: {}",
                    String::from_utf8_lossy(&err)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = self
            .out
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let stderr = self
            .err
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Output {
            status,
            stdout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `snapctl ARGS` to completion within `timeout`.
pub fn run(args: &[&str], timeout: Duration) -> Output {
    Proc::spawn(args).wait(timeout, &format!("snapctl {}", args.join(" ")))
}

/// Sends raw bytes as a request and reads reply lines until a final one (or EOF / `timeout`).
pub fn raw_request(sock: &Path, bytes: &[u8], timeout: Duration) -> Vec<Value> {
    let s = UnixStream::connect(sock).expect("connecting to the control socket");
    s.set_read_timeout(Some(timeout)).unwrap();
    s.set_write_timeout(Some(timeout)).unwrap();
    // The VMM may stop reading (oversized request) and close: write from a thread, ignore its errors.
    let mut w = s.try_clone().unwrap();
    let data = bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&data);
    });
    let replies = read_replies(s, timeout);
    let _ = writer.join();
    replies
}

/// Reads reply lines until a final (`ok`/`error`) one, EOF, or `timeout` overall.
pub fn read_replies(s: UnixStream, timeout: Duration) -> Vec<Value> {
    let t0 = Instant::now();
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    loop {
        assert!(
            t0.elapsed() < timeout,
            "no final reply within {timeout:?}: {out:?}"
        );
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return out,
            Ok(_) => {
                let v: Value = serde_json::from_str(line.trim_end())
                    .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line:?}"));
                let fin = v["reply"] != "progress";
                out.push(v);
                if fin {
                    return out;
                }
            }
            Err(e) => panic!(
                "reading replies: {e} (after {:?}; got {out:?})",
                t0.elapsed()
            ),
        }
    }
}

/// One request line (JSON) and its final reply.
pub fn request(sock: &Path, req: &str) -> Value {
    let mut line = req.to_string();
    line.push('\n');
    raw_request(sock, line.as_bytes(), Duration::from_secs(10))
        .pop()
        .unwrap_or_else(|| panic!("no reply to {req}"))
}

/// A `snapctl boot` process on its own socket; killed on drop.
#[derive(Debug)]
pub struct Vmm {
    pub proc: Proc,
    pub sock: PathBuf,
    pub mem_bytes: u64,
}

impl Vmm {
    /// Boots the built-in guest (`boot ARGS`) with its socket and serial log in `dir`, and waits until it
    /// answers and the guest has filled its memory.
    pub fn boot(dir: &Path, args: &[&str]) -> Self {
        let sock = dir.join("ctl.sock");
        let serial = dir.join("serial.log");
        let mut cmd = Command::new(bin());
        cmd.arg("boot")
            .args(args)
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial-log")
            .arg(&serial);
        let mut vmm = Self {
            proc: Proc::spawn_cmd(&mut cmd, true),
            sock,
            mem_bytes: 0,
        };
        let t0 = Instant::now();
        loop {
            assert!(vmm.proc.running(), "snapctl boot {args:?} exited early");
            if UnixStream::connect(&vmm.sock).is_ok() {
                let st = vmm.status();
                if st["fill_done"] == true {
                    vmm.mem_bytes = st["mem_bytes"].as_u64().unwrap();
                    return vmm;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "VMM not ready within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    pub fn sock_arg(&self) -> &str {
        self.sock.to_str().unwrap()
    }

    /// `{"cmd":"status"}` payload.
    pub fn status(&self) -> Value {
        let r = request(&self.sock, r#"{"cmd":"status"}"#);
        assert_eq!(r["reply"], "ok", "status failed: {r}");
        r
    }

    /// Runs `snapctl SUBCMD ARGS --api-sock SOCK`.
    pub fn ctl(&self, args: &[&str], timeout: Duration) -> Output {
        let mut a = args.to_vec();
        a.extend(["--api-sock", self.sock_arg()]);
        run(&a, timeout)
    }

    /// Starts `snapctl save ARGS --api-sock SOCK` without waiting.
    pub fn spawn_save(&self, args: &[&str]) -> Proc {
        let mut a = vec!["save"];
        a.extend(args);
        a.extend(["--api-sock", self.sock_arg()]);
        Proc::spawn(&a)
    }

    /// Waits until `status` says a save is (`true`) or is not (`false`) running.
    pub fn wait_save(&self, running: bool, timeout: Duration) {
        let t0 = Instant::now();
        while self.status()["save"] != running {
            assert!(
                t0.elapsed() < timeout,
                "status still says save={} after {timeout:?}",
                !running
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Guest RAM pages whose page-table entry carries the uffd-wp bit (bit 57 of /proc/PID/pagemap), present
    /// or not (a never-touched page protected with WP_UNPOPULATED is a non-present pte marker).
    pub fn wp_pages(&self) -> usize {
        let st = self.status();
        let pm =
            std::fs::File::open(format!("/proc/{}/pagemap", self.pid())).expect("opening pagemap");
        let ranges = st["memory_map"].as_array().expect("status has memory_map");
        assert!(!ranges.is_empty());
        let mut n = 0;
        let mut buf = vec![0u8; 1 << 20];
        for r in ranges {
            let host = r["host"].as_u64().unwrap();
            let len = r["len"].as_u64().unwrap();
            let mut page = host / 4096;
            let end = (host + len) / 4096;
            while page < end {
                let count = ((end - page) as usize).min(buf.len() / 8);
                let b = &mut buf[..count * 8];
                pm.read_exact_at(b, page * 8).expect("reading pagemap");
                n += b
                    .chunks_exact(8)
                    .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) & (1 << 57) != 0)
                    .count();
                page += count as u64;
            }
        }
        n
    }

    /// No page is write-protected without someone serving its faults: with write tracking on
    /// (after a successful save), protected pages are the tracker's (the guest must still make
    /// progress, and the tracker must say it runs); otherwise none may be protected.
    pub fn assert_no_orphan_protection(&self, what: &str) {
        let st = self.status();
        if st["tracking"]["state"] == "tracking" {
            if st["guest"] == "builtin" && st["state"] == "running" {
                self.assert_progress(Duration::from_secs(10));
            }
            return;
        }
        assert_eq!(
            self.wp_pages(),
            0,
            "{what}: pages left write-protected ({st})"
        );
    }

    /// Open file descriptors of the VMM process.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("reading /proc/PID/fd")
            .count()
    }

    /// VmRSS of the VMM process in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// Threads of the VMM process.
    pub fn threads(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    /// Checks that every vCPU of the guest makes progress within `within` (one stuck vCPU fails it).
    pub fn assert_progress(&self, within: Duration) {
        let s0 = vcpu_steps(&self.status());
        let t0 = Instant::now();
        loop {
            let s = vcpu_steps(&self.status());
            let stuck: Vec<usize> = (0..s0.len()).filter(|&i| s[i] == s0[i]).collect();
            if stuck.is_empty() {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "vCPU(s) {stuck:?} made no progress for {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Saves to `path` (fast, no limit) and checks the file with `snapctl verify`.
    pub fn save_and_verify(&self, path: &Path, extra: &[&str]) -> Value {
        let mut a = vec!["save", "--out", path.to_str().unwrap(), "--json"];
        a.extend(extra);
        let out = self.ctl(&a, Duration::from_secs(120));
        assert_eq!(out.code(), Some(0), "save failed: {}", out.stderr);
        let summary: Value = serde_json::from_slice(&out.stdout).expect("save --json prints JSON");
        verify(path);
        summary
    }
}

/// `snapctl verify FILE` must pass.
pub fn verify(path: &Path) {
    let out = run(
        &["verify", path.to_str().unwrap()],
        Duration::from_secs(120),
    );
    assert_eq!(
        out.code(),
        Some(0),
        "verify {} failed: {}",
        path.display(),
        out.stderr
    );
}

/// Guest steps of each vCPU.
pub fn vcpu_steps(status: &Value) -> Vec<u64> {
    status["steps"]
        .as_array()
        .expect("status has steps")
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect()
}

pub fn proc_status_kib(pid: i32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} not in /proc/{pid}/status"))
}

/// Watches guest progress through `status` on a thread; `finish` returns the longest interval in which some
/// vCPU made no step (a vCPU stuck until the end counts up to the end), as seen by a 20 ms poll.
#[derive(Debug)]
pub struct ProgressWatch {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Duration>>,
}

impl ProgressWatch {
    pub fn start(sock: &Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (sock, stop2) = (sock.to_path_buf(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut last = vcpu_steps(&request(&sock, r#"{"cmd":"status"}"#));
            let mut last_change = vec![Instant::now(); last.len()];
            let mut worst = Duration::ZERO;
            while !stop2.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                let s = vcpu_steps(&request(&sock, r#"{"cmd":"status"}"#));
                let now = Instant::now();
                for i in 0..last.len() {
                    if s[i] != last[i] {
                        last[i] = s[i];
                        last_change[i] = now;
                    }
                    worst = worst.max(now.duration_since(last_change[i]));
                }
            }
            worst
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops watching; returns the worst stall.
    pub fn finish(mut self) -> Duration {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .unwrap()
            .join()
            .expect("progress watcher panicked")
    }
}

impl Drop for ProgressWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The longest the guest may make no progress at all during and after a faulty save ("a moment").
pub const MAX_STALL: Duration = Duration::from_secs(1);

/// Names in `dir` that belong to the target `name`: the file itself or its temporary `.NAME.tmp-PID`.
pub fn leftovers(dir: &Path, name: &str) -> Vec<String> {
    let tmp = format!(".{name}.tmp-");
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n == name || n.starts_with(&tmp))
                .collect()
        })
        .unwrap_or_default()
}

/// The last `steps=N` the test kernel printed on its console.
pub fn kernel_steps(serial_log: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(serial_log).ok()?;
    text.lines()
        .filter_map(|l| l.split_once("steps=")?.1.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .next_back()
}

/// Waits (60 s at most) until the test kernel prints more than `beyond` steps; returns them.
pub fn wait_kernel_steps(serial_log: &Path, beyond: u64, what: &str) -> u64 {
    let t0 = Instant::now();
    loop {
        if let Some(s) = kernel_steps(serial_log).filter(|&s| s > beyond) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what}: the kernel printed no steps beyond {beyond}; console:\n{}",
            std::fs::read_to_string(serial_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
