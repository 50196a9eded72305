//! The VMM process side: runs a VM (`boot` or `restore`) and serves the control socket.
//!
//! The VMM owns guest memory and the userfaultfd, so it does the saving; the `save` client only asks, shows
//! progress and can cancel. One save at a time; a second one gets a `busy` error.
//!
//! What the VMM does is logged through `log` (set up by `main` for `boot` and `restore`, filtered by
//! `RUST_LOG`): the VM's life and each save at info, control requests and connection trouble at debug,
//! anything odd that the VMM works around at warn.

use crate::api::{self, Reply, Request, SaveParams};
use crate::{units::fmt_bytes, VmmArgs};
use anyhow::{bail, Context};
use log::{debug, error, info, warn};
use serde_json::{json, Value};
use std::io::{BufReader, ErrorKind, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_core::{GuestParams, KernelConfig, MemBackend, Vm, VmConfig, VmExitStatus, WriteRate};
use wp_tracker::WpTracker;

/// Builds the VM configuration of `snapctl boot` from its flags.
pub fn boot_config(
    mem: u64,
    vcpus: u8,
    write_rate: &str,
    working_set: Option<u64>,
    seed: u64,
    kernel: Option<KernelConfig>,
    vmm: &VmmArgs,
) -> anyhow::Result<VmConfig> {
    let write_rate = match write_rate {
        "full" => WriteRate::Full,
        "idle" => WriteRate::Idle,
        n => WriteRate::PagesPerSec(n.parse().map_err(|_| {
            anyhow::anyhow!("--write-rate must be `full`, `idle` or pages per second, not `{n}`")
        })?),
    };
    if mem < 64 << 20 || !mem.is_multiple_of(2 << 20) {
        bail!("--mem must be a multiple of 2 MiB and at least 64 MiB");
    }
    Ok(VmConfig {
        mem_bytes: mem,
        vcpus,
        backend: backend(vmm)?,
        guest: GuestParams {
            write_rate,
            working_set_pages: working_set.map(|b| b / 4096),
            seed,
        },
        kernel,
    })
}

fn backend(vmm: &VmmArgs) -> anyhow::Result<MemBackend> {
    Ok(match vmm.mem_backend.as_deref() {
        None | Some("anon") => MemBackend::Anon,
        Some("memfd") => MemBackend::Memfd,
        Some("hugetlbfs") => MemBackend::Hugetlbfs,
        Some(other) => bail!("unknown memory backend `{other}`"),
    })
}

fn serial_out(vmm: &VmmArgs) -> anyhow::Result<Box<dyn Write + Send>> {
    Ok(match &vmm.serial_log {
        // The console may show secrets: readable by the owner only (an existing file too).
        Some(p) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("creating {}", p.display()))?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} private", p.display()))?;
            Box::new(f)
        }
        None => Box::new(std::io::stdout()),
    })
}

/// `snapctl boot`.
pub fn run_boot(cfg: VmConfig, vmm: &VmmArgs, sock: &Path) -> anyhow::Result<ExitCode> {
    let listener = bind_socket(sock)?;
    let what = match &cfg.kernel {
        Some(k) => format!("kernel {}", k.kernel.display()),
        None => "the built-in guest".to_string(),
    };
    let vm = Vm::boot(cfg.clone(), serial_out(vmm)?)
        .with_context(|| format!("booting {what}"))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(sock);
        })?;
    info!(
        "{what} running: {}, {} vCPUs; control socket {}",
        fmt_bytes(cfg.mem_bytes),
        cfg.vcpus,
        sock.display()
    );
    forward_stdin(&vm);
    serve(vm, None, listener, sock)
}

/// A kernel's serial console works in both directions: standard input goes to the guest's COM1.
/// (The built-in guest does not read its serial port.)
fn forward_stdin(vm: &Vm) {
    if vm.config().is_builtin_guest() {
        return;
    }
    let mut input = vm.serial_input();
    let spawned = std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            if let Err(e) = std::io::copy(&mut std::io::stdin().lock(), &mut input) {
                warn!("standard input no longer reaches the guest's serial console: {e}");
            }
        });
    if let Err(e) = spawned {
        warn!("cannot start the thread that forwards standard input to the serial console: {e}");
    }
}

/// `snapctl restore`.
pub fn run_restore(
    file: &Path,
    paused: bool,
    lazy: bool,
    vmm: &VmmArgs,
    sock: &Path,
) -> anyhow::Result<ExitCode> {
    if lazy {
        return run_restore_lazy(file, paused, vmm, sock);
    }
    let listener = bind_socket(sock)?;
    let t0 = Instant::now();
    let restored = (|| {
        let params = vm_snapshot::RestoreParams {
            paused,
            backend: backend_override(vmm)?,
            serial: serial_out(vmm)?,
        };
        crate::offline::restore_vm(file, params)
    })();
    if !matches!(restored, Ok(Ok(_))) {
        // Refused or failed: no VM will serve this socket, so nothing is left behind.
        let _ = std::fs::remove_file(sock);
    }
    let vm = match restored? {
        Ok(vm) => vm,
        Err(code) => return Ok(code),
    };
    info!(
        "restored {} in {:.3} s{}; control socket {}",
        file.display(),
        t0.elapsed().as_secs_f64(),
        if paused {
            " (paused: `snapctl resume` to run)"
        } else {
            ""
        },
        sock.display()
    );
    forward_stdin(&vm);
    serve(vm, None, listener, sock)
}

/// `snapctl restore --lazy`: the vCPUs start at once, memory follows (see `vm_snapshot::restore_lazy`).
fn run_restore_lazy(
    file: &Path,
    paused: bool,
    vmm: &VmmArgs,
    sock: &Path,
) -> anyhow::Result<ExitCode> {
    let listener = bind_socket(sock)?;
    let restored = (|| {
        let params = vm_snapshot::RestoreParams {
            paused,
            backend: backend_override(vmm)?,
            serial: serial_out(vmm)?,
        };
        Ok::<_, anyhow::Error>(vm_snapshot::restore_lazy(file, params))
    })();
    if !matches!(restored, Ok(Ok(_))) {
        // Refused or failed: no VM will serve this socket, so nothing is left behind.
        let _ = std::fs::remove_file(sock);
    }
    let (vm, lazy) = match restored? {
        Ok(x) => x,
        Err(vm_snapshot::LazyError::File(e)) => {
            // Reported as eager restore reports a bad file, with the file's exit code.
            let (word, code) = file_error_kind(&e);
            eprintln!(
                "snapctl: {}: {word} snapshot: {}",
                file.display(),
                error_chain(&e)
            );
            eprintln!("snapctl: not restoring {}", file.display());
            return Ok(ExitCode::from(code));
        }
        Err(e) => return Err(e.into()),
    };
    let st = lazy.status();
    info!(
        "restoring {} lazily: vCPUs {} after {:.1} ms ({} of guest RAM follows on demand and in the \
         background); control socket {}",
        file.display(),
        if paused {
            "parked (paused: `snapctl resume` to run)"
        } else {
            "running"
        },
        st.start_ms,
        fmt_bytes(st.total_bytes),
        sock.display()
    );
    forward_stdin(&vm);
    serve(vm, Some(lazy), listener, sock)
}

/// Watches a lazy restore: logs its end, and ends the VMM when it fails (a record that fails its
/// checks): the guest must never run on memory that is not the snapshot's, and a vCPU (or a
/// control thread) that touched a page of the bad record stays blocked for good, so the process
/// exits at once, with the corrupt-file exit code.
fn watch_lazy(vmm: Arc<Vmm>, sock: std::path::PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("lazy-watch".into())
        .spawn(move || {
            let Some(lazy) = vmm.lazy.as_ref() else {
                return;
            };
            loop {
                match lazy.wait(Duration::from_millis(500)) {
                    Some(Ok(())) => {
                        log_lazy(&lazy.status());
                        return;
                    }
                    Some(Err(f)) => {
                        error!(
                            "lazy restore failed: {f}; stopping the VM so that it never runs on \
                             wrong memory"
                        );
                        let _ = std::fs::remove_file(&sock);
                        let code = match f {
                            vm_snapshot::LazyFailure::Record(_) => crate::offline::exit::CORRUPT,
                            vm_snapshot::LazyFailure::Fill(_) => 1,
                        };
                        std::process::exit(i32::from(code));
                    }
                    None if vmm.stop.load(Ordering::SeqCst) => return,
                    None => {}
                }
            }
        });
    if let Err(e) = spawned {
        // Without the watcher a failed restore would leave the VM blocked, not wrong: say so.
        warn!("cannot start the thread that watches the lazy restore ({e}); a failure will not end the VMM");
    }
}

/// How a bad file is named and which exit code it gets (README: 3 corrupt, 4 incomplete, 5
/// unreadable or not a snapshot, 6 unsupported), as `verify` and eager `restore` do.
fn file_error_kind(e: &ram_saver::FormatError) -> (&'static str, u8) {
    use crate::offline::exit;
    use ram_saver::ErrorKind as K;
    match e.kind() {
        K::Corrupt | K::Mismatch => ("corrupt", exit::CORRUPT),
        K::Incomplete => ("incomplete", exit::INCOMPLETE),
        K::Unreadable | K::Unwritable => ("unreadable", exit::UNREADABLE),
        K::NotASnapshot => ("not a snapshot", exit::UNREADABLE),
        K::Unsupported => ("unsupported", exit::UNSUPPORTED),
    }
}

/// An error and its sources, once each.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A finished lazy restore's figures.
fn log_lazy(s: &vm_snapshot::LazyStatus) {
    info!(
        "lazy restore finished: {} resident after {:.3} s ({:.2} GB/s from the vCPUs' start), \
         {} faults served (wait p50 {} µs, p99 {} µs, max {} µs; {} filled by faults, {} by the \
         fill); huge pages {} before, {} after collapsing ({:.0} ms, {} blocks not collapsed)",
        fmt_bytes(s.resident_bytes),
        s.resident_s.unwrap_or(0.0),
        s.fill_gb_s.unwrap_or(0.0),
        s.faults,
        s.fault_wait_p50_us,
        s.fault_wait_p99_us,
        s.fault_wait_max_us,
        fmt_bytes(s.fault_filled_bytes),
        fmt_bytes(s.fill_filled_bytes),
        fmt_bytes(s.thp_before_bytes.unwrap_or(0)),
        fmt_bytes(s.thp_after_bytes.unwrap_or(0)),
        s.collapse_ms.unwrap_or(0.0),
        s.collapse_failures
    );
}

fn backend_override(vmm: &VmmArgs) -> anyhow::Result<Option<MemBackend>> {
    vmm.mem_backend.as_ref().map(|_| backend(vmm)).transpose()
}

/// Binds the control socket: refuses when another VMM serves it, replaces a stale one, mode 0600.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; not replacing it (choose another --api-sock)",
                path.display()
            );
        }
        match UnixStream::connect(path) {
            Ok(_) => bail!(
                "another VM is already serving {} (stop it with `snapctl shutdown`, or use --name/--api-sock)",
                path.display()
            ),
            Err(_) => {
                // Nobody listens: a stale socket left by a VMM that died.
                std::fs::remove_file(path)
                    .with_context(|| format!("removing stale socket {}", path.display()))?;
            }
        }
    }
    // Create the socket with mode 0600 from the start (no window where others could connect).
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let res = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    res.with_context(|| format!("binding control socket {}", path.display()))
}

/// State shared by the control threads.
struct Vmm {
    vm: Arc<Vm>,
    /// The lazy restore that fills this VM's memory (`restore --lazy`), kept while the VM runs.
    lazy: Option<vm_snapshot::LazyRestore>,
    tracker: Mutex<Option<Arc<WpTracker>>>,
    save: Mutex<Option<Arc<AtomicBool>>>,
    started: Instant,
    stop: AtomicBool,
    rates: Mutex<Vec<f64>>,
}

fn serve(
    vm: Vm,
    lazy: Option<vm_snapshot::LazyRestore>,
    listener: UnixListener,
    sock: &Path,
) -> anyhow::Result<ExitCode> {
    let vmm = Arc::new(Vmm {
        vm: Arc::new(vm),
        lazy,
        tracker: Mutex::new(None),
        save: Mutex::new(None),
        started: Instant::now(),
        stop: AtomicBool::new(false),
        rates: Mutex::new(Vec::new()),
    });
    if vmm.lazy.is_some() {
        watch_lazy(vmm.clone(), sock.to_path_buf());
    }
    {
        let vmm = vmm.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                let active = Arc::new(AtomicUsize::new(0));
                // Logged once per run of failures, not 50 times a second.
                let mut accept_failing = false;
                for conn in listener.incoming() {
                    let conn = match conn {
                        Ok(c) => {
                            accept_failing = false;
                            c
                        }
                        Err(e) => {
                            if !accept_failing {
                                warn!("control socket: accepting a connection failed: {e}; retrying");
                                accept_failing = true;
                            }
                            // E.g. out of file descriptors: do not spin; clients retry.
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    };
                    // One thread per connection, so that no client can block another; bounded, so that a
                    // flood of connections cannot exhaust the VMM.
                    let slot = ConnSlot::take(&active);
                    let Some(slot) = slot else {
                        debug!("control socket: {MAX_CONNECTIONS} connections already served; refusing one as busy");
                        let mut conn = conn;
                        let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
                        let _ = api::write_line(
                            &mut conn,
                            &error("busy", "too many control connections at once; try again"),
                        );
                        continue;
                    };
                    let vmm = vmm.clone();
                    let spawned = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || {
                            let _slot = slot;
                            vmm.handle_conn(conn);
                        });
                    if let Err(e) = spawned {
                        warn!("control socket: cannot start a thread for a connection (dropped): {e}");
                    }
                }
            })?;
    }
    // Sample guest progress once a second for steps/s in `status`.
    let mut last = (Instant::now(), vmm.vm.progress().steps.clone());
    let exit = loop {
        if let Some(status) = vmm.vm.wait(Duration::from_millis(1000)) {
            break Some(status);
        }
        if vmm.stop.load(Ordering::SeqCst) {
            break None;
        }
        let now = (Instant::now(), vmm.vm.progress().steps.clone());
        let dt = now.0.duration_since(last.0).as_secs_f64();
        *vmm.rates.lock().expect("rates lock") = now
            .1
            .iter()
            .zip(&last.1)
            .map(|(a, b)| a.saturating_sub(*b) as f64 / dt)
            .collect();
        last = now;
    };
    if let Some(c) = vmm.save.lock().expect("save lock").as_ref() {
        c.store(true, Ordering::SeqCst);
    }
    vmm.vm.shutdown();
    let _ = std::fs::remove_file(sock);
    match exit {
        Some(status) => {
            let clean = matches!(
                status,
                VmExitStatus::PowerOff { .. } | VmExitStatus::Reset { .. } | VmExitStatus::Stopped
            );
            Ok(if clean {
                info!("VM ended: {status}");
                ExitCode::SUCCESS
            } else {
                error!("VM ended: {status}");
                ExitCode::from(1)
            })
        }
        None => {
            info!("VM shut down on request");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Most control connections served at once; more get a `busy` error.
const MAX_CONNECTIONS: usize = 64;
/// How long the VMM waits for a client's request line before closing the connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long writing a (small, final) reply may block on a client that does not read.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A counted place among the [`MAX_CONNECTIONS`]; released on drop.
struct ConnSlot(Arc<AtomicUsize>);

impl ConnSlot {
    fn take(active: &Arc<AtomicUsize>) -> Option<Self> {
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Self(active.clone()))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn error(kind: &str, message: impl Into<String>) -> Reply {
    Reply::Error {
        kind: kind.into(),
        message: message.into(),
    }
}

impl Vmm {
    fn handle_conn(self: &Arc<Self>, conn: UnixStream) {
        // Replies are small; a client that does not read them must not pin this thread for long. (Save
        // progress goes through its own thread and is dropped rather than waited for; see `save`.)
        let _ = conn.set_write_timeout(Some(REPLY_TIMEOUT));
        let mut w = match conn.try_clone() {
            Ok(w) => w,
            Err(e) => {
                warn!("control connection dropped: cannot duplicate its socket: {e}");
                return;
            }
        };
        // Only the VMM's own user (or root) may control it.
        let me = nix::unistd::getuid().as_raw();
        match nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(c) if c.uid() == me || c.uid() == 0 => {}
            Ok(c) => {
                let msg = format!(
                    "user {} may not control this VM: only its owner (uid {me}) or root may",
                    c.uid()
                );
                warn!("control connection denied (pid {}): {msg}", c.pid());
                let _ = api::write_line(&mut w, &error("denied", msg));
                return;
            }
            Err(e) => {
                let msg = format!("cannot check the peer's credentials: {e}");
                warn!("control connection denied: {msg}");
                let _ = api::write_line(&mut w, &error("denied", msg));
                return;
            }
        }
        // A client that connects and never sends anything must not pin a thread forever.
        let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
        let mut r = BufReader::new(conn);
        let line = match api::read_line_bounded(&mut r, api::MAX_REQUEST_LINE) {
            Ok(Some(l)) => l,
            Ok(None) => {
                debug!("control connection closed without a request");
                return;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let msg = format!(
                    "no request within {} s; closing the connection",
                    REQUEST_TIMEOUT.as_secs()
                );
                debug!("control connection: {msg}");
                let _ = api::write_line(&mut w, &error("timeout", msg));
                return;
            }
            Err(e) => {
                let msg = format!(
                    "{e}: a request is one JSON object on one line of at most {} KiB",
                    api::MAX_REQUEST_LINE / 1024
                );
                debug!("control connection: bad request: {msg}");
                let _ = api::write_line(&mut w, &error("bad_request", msg));
                return;
            }
        };
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                let msg = format!(
                    "malformed request: {e} (commands: status, save, cancel, pause, resume, self_check, shutdown; \
                     see PROTOCOL.md)"
                );
                debug!("control connection: {msg}");
                let _ = api::write_line(&mut w, &error("bad_request", msg));
                return;
            }
        };
        debug!("control request: {req:?}");
        let reply = match req {
            Request::Status => Reply::Ok(self.status()),
            Request::Pause => match self.vm.pause() {
                Ok(d) => {
                    info!("vCPUs paused in {} µs", d.as_micros());
                    Reply::Ok(json!({"pause_us": d.as_micros() as u64}))
                }
                Err(e) => {
                    warn!("pausing the vCPUs failed: {e:#}");
                    error("vm", format!("{e:#}"))
                }
            },
            Request::Resume => match self.vm.resume() {
                Ok(d) => {
                    info!("vCPUs resumed in {} µs", d.as_micros());
                    Reply::Ok(json!({"resume_us": d.as_micros() as u64}))
                }
                Err(e) => {
                    warn!("resuming the vCPUs failed: {e:#}");
                    error("vm", format!("{e:#}"))
                }
            },
            Request::Cancel => match self.save.lock().expect("save lock").as_ref() {
                Some(c) => {
                    info!("save cancel requested");
                    c.store(true, Ordering::SeqCst);
                    Reply::Ok(json!({}))
                }
                None => error("not_running", "no save is in progress"),
            },
            Request::SelfCheck => self.self_check(),
            Request::Shutdown => {
                info!("shutdown requested");
                self.stop.store(true, Ordering::SeqCst);
                Reply::Ok(json!({}))
            }
            Request::Save(req) => {
                let _ = r.get_ref().set_read_timeout(None);
                self.save(req, r.into_inner(), &w)
            }
        };
        if let Err(e) = api::write_line(&mut w, &reply) {
            debug!("control connection: the reply was not delivered: {e}");
        }
    }

    fn status(&self) -> Value {
        let cfg = self.vm.config();
        let mut v = json!({
            "state": if self.vm.is_paused() { "paused" } else { "running" },
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "mem_bytes": cfg.mem_bytes,
            "vcpus": cfg.vcpus,
            "guest": if cfg.is_builtin_guest() { "builtin" } else { "kernel" },
            "save": self.save.lock().expect("save lock").is_some(),
            // For diagnostics and tests (e.g. reading /proc/PID/pagemap): where guest RAM is in this process.
            "memory_map": vmm_core::host_ranges(self.vm.memory())
                .into_iter()
                .map(|(gpa, host, len)| json!({"gpa": gpa, "host": host, "len": len}))
                .collect::<Vec<_>>(),
        });
        if let Some(lazy) = &self.lazy {
            v["restore"] = serde_json::to_value(lazy.status()).unwrap_or(Value::Null);
        }
        // Progress figures only the built-in guest reports: absent for kernel guests, never zeros.
        if cfg.is_builtin_guest() {
            let p = self.vm.progress();
            v["ticks"] = json!(p.ticks);
            v["fill_done"] = json!(p.fill_done);
            v["steps"] = json!(p.steps);
            v["steps_per_s"] = json!(*self.rates.lock().expect("rates lock"));
        }
        v
    }

    fn self_check(&self) -> Reply {
        if let Err(e) = self.vm.request_self_check() {
            return error("vm", format!("{e:#}"));
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(120) {
            if let Some(v) = self.vm.self_check_result() {
                let mut out = serde_json::to_value(&v).unwrap_or(Value::Null);
                out["pass"] = Value::Bool(v.passed());
                if v.passed() {
                    info!("guest self-check passed: {out}");
                } else {
                    warn!("guest self-check FAILED: {out}");
                }
                return Reply::Ok(out);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        warn!("the guest did not answer the self-check within 120 s");
        error(
            "timeout",
            "the guest did not answer the self-check within 120 s",
        )
    }

    /// A save of a VM still restoring lazily first waits for the restore to finish: pages not
    /// yet resident are in the file, not in memory, and the write-protect tracking a save needs
    /// takes over guest memory only once the restore's userfaultfd lets go of it. It also waits
    /// for the collapse into huge pages that follows the fill: a block the save protects cannot
    /// be collapsed, and would stay in small pages.
    fn wait_lazy(&self, cancel: &AtomicBool) -> anyhow::Result<()> {
        let Some(lazy) = &self.lazy else {
            return Ok(());
        };
        let mut logged = false;
        loop {
            match lazy.wait(Duration::from_millis(50)) {
                Some(Ok(())) => return Ok(()),
                Some(Err(f)) => bail!("the lazy restore of this VM failed: {f}"),
                None => {}
            }
            if cancel.load(Ordering::SeqCst) {
                bail!("cancelled while waiting for the lazy restore to finish");
            }
            if !logged {
                let s = lazy.status();
                info!(
                    "save waits for the lazy restore to finish ({} of {} resident)",
                    fmt_bytes(s.resident_bytes),
                    fmt_bytes(s.total_bytes)
                );
                logged = true;
            }
        }
    }

    /// The userfaultfd tracker over all guest RAM, created at the first save and kept.
    fn tracker(&self) -> anyhow::Result<Arc<WpTracker>> {
        let mut g = self.tracker.lock().expect("tracker lock");
        if let Some(t) = g.as_ref() {
            return Ok(t.clone());
        }
        let t = WpTracker::new().context("opening userfaultfd")?;
        t.register_memory(self.vm.memory())
            .context("registering guest memory with userfaultfd")?;
        let t = Arc::new(t);
        *g = Some(t.clone());
        Ok(t)
    }

    /// Runs a save for the client on `conn`. The client's connection is watched: if it closes (the client was
    /// killed, or shut down its sending side on Ctrl-C), the save is cancelled. Progress lines go through a
    /// separate thread and are dropped while the client does not read them: a slow or stopped client never
    /// slows the save, and so never stalls the guest.
    fn save(self: &Arc<Self>, req: SaveParams, conn: UnixStream, w: &UnixStream) -> Reply {
        if let Err(msg) = req.options() {
            debug!("save refused: {msg}");
            return error("bad_request", msg);
        }
        let cancel = Arc::new(AtomicBool::new(false));
        {
            let mut g = self.save.lock().expect("save lock");
            if g.is_some() {
                debug!("save refused: another save is in progress");
                return error(
                    "busy",
                    "a save is already in progress; wait for it or `snapctl cancel` it",
                );
            }
            *g = Some(cancel.clone());
        }
        // Whatever happens below, the next save may start.
        struct Clear<'a>(&'a Mutex<Option<Arc<AtomicBool>>>);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        let clear = Clear(&self.save);
        info!("save started: {}", describe_save(&req));

        // A client that goes away cancels the save (documented in PROTOCOL.md).
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let cancel = cancel.clone();
            let done = done.clone();
            let mut conn = conn;
            std::thread::Builder::new()
                .name("save-watch".into())
                .spawn(move || {
                    let mut buf = [0u8; 256];
                    loop {
                        match std::io::Read::read(&mut conn, &mut buf) {
                            Ok(0) => break,
                            Ok(_) => {}
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                    if !done.load(Ordering::SeqCst) {
                        cancel.store(true, Ordering::SeqCst);
                    }
                })
        };
        if let Err(e) = watcher {
            warn!("save failed: cannot start a thread to watch the client: {e}");
            return error("save_failed", "cannot start a thread to watch the client");
        }
        // Progress: the saver only ever `try_send`s; the forwarder may block on the client, nothing else does.
        let (ptx, prx) = std::sync::mpsc::sync_channel::<Value>(1);
        let forwarder = w.try_clone().ok().and_then(|mut w| {
            let _ = w.set_write_timeout(None);
            let cancel = cancel.clone();
            std::thread::Builder::new()
                .name("save-progress".into())
                .spawn(move || {
                    for p in prx {
                        if let Err(e) = api::write_line(&mut w, &Reply::Progress(p)) {
                            if matches!(
                                e.kind(),
                                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
                            ) {
                                cancel.store(true, Ordering::SeqCst);
                            }
                            break;
                        }
                    }
                })
                .inspect_err(|e| {
                    warn!(
                        "save: cannot start the progress thread ({e}); the client gets no progress"
                    )
                })
                .ok()
        });
        // Which vCPUs were making progress before the save (last one-second sample).
        let moving: Vec<bool> = self
            .rates
            .lock()
            .expect("rates lock")
            .iter()
            .map(|&r| r > 0.0)
            .collect();
        let total_bytes = self.vm.config().mem_bytes;
        let ptx = Mutex::new(ptx);
        let progress = |p: &ram_saver::SaveProgress| {
            let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
            v["total_bytes"] = json!(total_bytes);
            let _ = ptx.lock().expect("progress lock").try_send(v);
        };
        let res = self
            .wait_lazy(&cancel)
            .and_then(|()| self.tracker())
            .and_then(|t| {
                vm_snapshot::save(&self.vm, &t, &req, &moving, &cancel, &progress)
                    .map_err(anyhow::Error::from)
            });
        drop(ptx);
        // Decide before stopping the watcher (whose end would otherwise look like a client leaving).
        let cancelled = cancel.load(Ordering::SeqCst);
        done.store(true, Ordering::SeqCst);
        let _ = w.shutdown(std::net::Shutdown::Read);
        drop(clear);
        if let Some(f) = forwarder {
            // Ends after its current line; only this connection's thread waits for a client that reads slowly.
            let _ = f.join();
        }
        match res {
            Ok(report) => {
                log_report(&report);
                Reply::Ok(serde_json::to_value(&report).unwrap_or(Value::Null))
            }
            Err(e) if cancelled => {
                info!("save cancelled: {e:#}");
                error("cancelled", format!("{e:#}"))
            }
            Err(e) => {
                warn!("save failed: {e:#}");
                error("save_failed", format!("{e:#}"))
            }
        }
    }
}

/// A save request in a few words, for the log.
fn describe_save(req: &SaveParams) -> String {
    let mut s = req.path.clone();
    if req.stream {
        s.push_str(" (stream)");
    }
    match (req.zstd, req.level) {
        (_, Some(level)) => s.push_str(&format!(", zstd level {level}")),
        (true, None) => s.push_str(", zstd"),
        (false, None) => {}
    }
    if let Some(b) = req.max_bandwidth {
        s.push_str(&format!(", scan limited to {}/s", fmt_bytes(b)));
    }
    if req.background {
        s.push_str(", background");
    }
    if req.force {
        s.push_str(", replacing");
    }
    s
}

/// A finished save's key figures at info, the finer ones at debug.
fn log_report(r: &vm_snapshot::SaveReport) {
    info!(
        "save finished: {} of guest RAM to {} in {:.3} s; downtime {:.3} ms; {} faults served (p99 {} µs); \
         file {} (image size ratio {:.4})",
        fmt_bytes(r.guest_bytes),
        r.path,
        r.duration_s,
        r.downtime_ms,
        r.faults_served,
        r.fault_latency_p99_us,
        fmt_bytes(r.file_bytes),
        r.image_size_ratio
    );
    let compression = match r.compression {
        ram_saver::Compression::None => "raw".to_string(),
        ram_saver::Compression::Zstd { level } => format!("zstd level {level}"),
    };
    let f = &r.freeze_ms;
    debug!(
        "save details: freeze {:.3}/{:.3}/{:.3}/{:.3} ms (pause/capture/protect/resume); {} pages ({} zero, \
         {} data) in {} {compression} records; fault latency p50 {} µs, max {} µs; {} faults waited for a \
         buffer; {} huge pages restored{}",
        f.pause,
        f.capture,
        f.protect,
        f.resume,
        r.pages_saved,
        r.zero_pages,
        r.data_pages,
        r.records,
        r.fault_latency_p50_us,
        r.fault_latency_max_us,
        r.fault_buffer_waits,
        r.huge_pages_restored,
        if r.stayed_paused {
            "; the VM stays paused"
        } else {
            ""
        }
    );
}
