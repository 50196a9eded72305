//! The VMM process side: runs a VM (`boot` or `restore`) and serves the control socket.
//!
//! The VMM owns guest memory and the userfaultfd, so it does the saving; the `save` client only asks, shows
//! progress and can cancel. One save at a time; a second one gets a `busy` error.
//!
//! What the VMM does is logged through `log` (set up by `main` for `boot` and `restore`, filtered by
//! `RUST_LOG`): the VM's life and each save at info, control requests and connection trouble at debug,
//! anything odd that the VMM works around at warn.

mod conn;
mod migrate;
mod save;

pub use migrate::run_restore_listen;

use crate::api::{self, Reply, Request, SaveParams};
use crate::{units::fmt_bytes, VmmArgs};
use anyhow::{bail, Context};
use conn::{error, ConnSlot, MAX_CONNECTIONS};
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
    serve(vm, None, None, vmm.tracks_writes(), listener, sock)
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
            // Parked until write tracking protects the restored memory (below).
            paused: true,
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
    // Writes are tracked from the restored content on, with the restored file as the last save:
    // `save --parent FILE` stores only what the guest writes from now on.
    // With `--track-writes off`, nothing is protected: every save stores all memory.
    let tracking = vmm
        .tracks_writes()
        .then(|| track_restored(&vm, file))
        .flatten();
    if !paused {
        vm.resume().context("starting the restored vCPUs")?;
    }
    forward_stdin(&vm);
    serve(vm, None, tracking, vmm.tracks_writes(), listener, sock)
}

/// Write tracking of a VM just restored from `file`, its vCPUs parked: all memory protected, the
/// file as the last save. Without it (logged) the VM runs untracked and its first `save --parent`
/// saves all memory.
fn track_restored(vm: &Vm, file: &Path) -> Option<(Arc<WpTracker>, vm_snapshot::WriteRecord)> {
    let tracker = (|| {
        let t = WpTracker::new().context("opening userfaultfd")?;
        t.register_memory(vm.memory())
            .context("registering guest memory with userfaultfd")?;
        anyhow::Ok(Arc::new(t))
    })();
    let tracker = match tracker {
        Ok(t) => t,
        Err(e) => {
            warn!("writes are not tracked after the restore: {e:#}");
            return None;
        }
    };
    let mut record = vm_snapshot::WriteRecord::new();
    let file = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let t0 = std::time::Instant::now();
    match record.start_at_restore(tracker.clone(), vm.memory(), &file) {
        Ok(()) => info!(
            "tracking writes from the restored content (page hashes of {} in {:.0} ms)",
            fmt_bytes(vm.config().mem_bytes),
            t0.elapsed().as_secs_f64() * 1e3
        ),
        Err(e) => warn!("writes are not tracked after the restore: {e}"),
    }
    Some((tracker, record))
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
        // Reported as eager restore reports a bad file, with the file's exit code.
        Err(vm_snapshot::LazyError::File(e)) => {
            return Ok(crate::offline::refuse_restore(file, &e))
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
    serve(vm, Some(lazy), None, vmm.tracks_writes(), listener, sock)
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

/// A finished lazy restore's figures.
fn log_lazy(s: &vm_snapshot::LazyStatus) {
    info!(
        "lazy restore finished: {} resident after {:.3} s ({:.2} GB/s from the vCPUs' start), \
         {} faults served (wait p50 {} µs, p99 {} µs, max {} µs; {} filled by faults, {} by the \
         fill, {} of it moved in as huge pages); huge pages {} before, {} after collapsing \
         ({:.0} ms, {} blocks not collapsed)",
        fmt_bytes(s.resident_bytes),
        s.resident_s.unwrap_or(0.0),
        s.fill_gb_s.unwrap_or(0.0),
        s.faults,
        s.fault_wait_p50_us,
        s.fault_wait_p99_us,
        s.fault_wait_max_us,
        fmt_bytes(s.fault_filled_bytes),
        fmt_bytes(s.fill_filled_bytes),
        fmt_bytes(s.fill_moved_bytes),
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
    /// The migration that brings this VM's memory (`restore --listen`), kept while the VM runs.
    incoming: Option<vm_snapshot::migrate::Incoming>,
    /// Where this VM stands as the source of a migration.
    migration: Mutex<migrate::Migration>,
    /// The migration whose connections were lost after the destination ran, for `--resume`.
    interrupted: Mutex<Option<migrate::Resumable>>,
    tracker: Mutex<Option<Arc<WpTracker>>>,
    /// What the guest wrote since the last save (held by a save while it runs).
    record: Mutex<vm_snapshot::WriteRecord>,
    /// `--track-writes`: false keeps no record (saves release all memory; `parent` saves store
    /// everything).
    track_writes: bool,
    save: Mutex<Option<Arc<AtomicBool>>>,
    started: Instant,
    stop: AtomicBool,
    rates: Mutex<Vec<f64>>,
}

fn serve(
    vm: Vm,
    lazy: Option<vm_snapshot::LazyRestore>,
    tracking: Option<(Arc<WpTracker>, vm_snapshot::WriteRecord)>,
    track_writes: bool,
    listener: UnixListener,
    sock: &Path,
) -> anyhow::Result<ExitCode> {
    serve_with(vm, lazy, None, tracking, track_writes, listener, sock)
}

fn serve_with(
    vm: Vm,
    lazy: Option<vm_snapshot::LazyRestore>,
    incoming: Option<vm_snapshot::migrate::Incoming>,
    tracking: Option<(Arc<WpTracker>, vm_snapshot::WriteRecord)>,
    track_writes: bool,
    listener: UnixListener,
    sock: &Path,
) -> anyhow::Result<ExitCode> {
    let (tracker, record) = match tracking {
        Some((t, r)) => (Some(t), r),
        None => (None, vm_snapshot::WriteRecord::new()),
    };
    let vmm = Arc::new(Vmm {
        vm: Arc::new(vm),
        lazy,
        incoming,
        migration: Mutex::default(),
        interrupted: Mutex::default(),
        tracker: Mutex::new(tracker),
        record: Mutex::new(record),
        track_writes,
        save: Mutex::new(None),
        started: Instant::now(),
        stop: AtomicBool::new(false),
        rates: Mutex::new(Vec::new()),
    });
    if vmm.lazy.is_some() {
        watch_lazy(vmm.clone(), sock.to_path_buf());
    }
    if vmm.incoming.is_some() {
        migrate::watch_incoming(vmm.clone(), sock.to_path_buf());
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
