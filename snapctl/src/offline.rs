//! Work on snapshot files: `verify`, `info`, `oracle`, loading for `restore`, and the VMM side of `save`.

use crate::api::SaveRequest;
use crate::units::fmt_bytes;
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use ram_saver::{
    AtomicFileSink, Compression, ErrorKind, FormatError, SaveOptions, SnapshotHeader,
    SnapshotReader, StreamSink,
};
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vmm_core::{MachineState, MemBackend, Vm};
use wp_tracker::WpTracker;

/// Exit codes of `verify`, `info`, `oracle` and `restore` for bad files (documented in README.md).
pub mod exit {
    /// The file is damaged (a checksum, structure or page-coverage error).
    pub const CORRUPT: u8 = 3;
    /// The file has no valid trailer: the save never finished.
    pub const INCOMPLETE: u8 = 4;
    /// The file cannot be read (missing, permissions, I/O error) or is not a snapshot.
    pub const UNREADABLE: u8 = 5;
    /// A format version, architecture or feature this build does not support.
    pub const UNSUPPORTED: u8 = 6;
    /// The built-in guest's memory in the file is not the memory at the freeze instant.
    pub const INCONSISTENT: u8 = 7;
}

fn exit_code(e: &FormatError) -> u8 {
    match e.kind() {
        ErrorKind::Corrupt | ErrorKind::Mismatch => exit::CORRUPT,
        ErrorKind::Incomplete => exit::INCOMPLETE,
        ErrorKind::Unreadable | ErrorKind::Unwritable | ErrorKind::NotASnapshot => exit::UNREADABLE,
        ErrorKind::Unsupported => exit::UNSUPPORTED,
    }
}

fn kind_word(e: &FormatError) -> &'static str {
    match e.kind() {
        ErrorKind::Corrupt | ErrorKind::Mismatch => "corrupt",
        ErrorKind::Incomplete => "incomplete",
        ErrorKind::Unreadable | ErrorKind::Unwritable => "unreadable",
        ErrorKind::NotASnapshot => "not a snapshot",
        ErrorKind::Unsupported => "unsupported",
    }
}

fn report_bad(file: &Path, e: &FormatError, json: bool) -> ExitCode {
    let msg = format!("{}", ErrorChain(e));
    if json {
        println!(
            "{}",
            json!({"ok": false, "kind": kind_word(e), "error": msg, "record": e.record()})
        );
    }
    eprintln!(
        "snapctl: {}: {} snapshot: {msg}",
        file.display(),
        kind_word(e)
    );
    ExitCode::from(exit_code(e))
}

/// Prints an error with its sources, once each.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut s = self.0.source();
        while let Some(e) = s {
            write!(f, ": {e}")?;
            s = e.source();
        }
        Ok(())
    }
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{elapsed_precise}}] [{{wide_bar}}] {{pos}}/{{len}} pages ETA {{eta}}"
        ))
        .expect("static template")
        .progress_chars("=> "),
    );
    b
}

/// `snapctl verify FILE`.
pub fn verify(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let mut r = match SnapshotReader::open(file) {
        Ok(r) => r,
        Err(e) => return Ok(report_bad(file, &e, json)),
    };
    let b = bar(r.header().total_pages(), "verify");
    let res = r.verify(&mut |p| b.set_position(p.pages));
    b.finish_and_clear();
    match res {
        Ok(rep) => {
            if json {
                println!("{}", json!({"ok": true, "report": rep}));
            } else {
                println!(
                    "{}: OK — {} records, {} guest pages each stored once ({} data, {} zero), every checksum valid, trailer valid",
                    file.display(),
                    rep.totals.records,
                    rep.guest_pages,
                    rep.totals.data_pages,
                    rep.totals.zero_pages
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(report_bad(file, &e, json)),
    }
}

/// `snapctl info FILE`.
pub fn info(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let r = match SnapshotReader::open(file) {
        Ok(r) => r,
        Err(e) => return Ok(report_bad(file, &e, json)),
    };
    let h = r.header();
    let t = &r.trailer().totals;
    let guest_bytes = h.total_pages() * u64::from(h.page_size);
    let nonzero = t.data_pages * u64::from(h.page_size);
    let ratio = if nonzero > 0 {
        r.file_len() as f64 / nonzero as f64
    } else {
        0.0
    };
    let cfg: Value = serde_json::from_slice(&h.vmm_config).unwrap_or(Value::Null);
    if json {
        println!(
            "{}",
            json!({
                "guest_bytes": guest_bytes, "regions": h.regions, "vcpus": h.vcpu_count,
                "page_size": h.page_size, "compression": h.compression,
                "created_unix_secs": h.created_unix_secs, "totals": t,
                "file_bytes": r.file_len(), "image_size_ratio": ratio, "vmm_config": cfg,
                "machine_state_bytes": r.machine_state().len(),
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "file:         {} ({})",
        file.display(),
        fmt_bytes(r.file_len())
    );
    println!(
        "guest memory: {} in {} region(s)",
        fmt_bytes(guest_bytes),
        h.regions.len()
    );
    for reg in &h.regions {
        println!("              {:#x}..{:#x}", reg.gpa, reg.gpa + reg.size);
    }
    println!("vCPUs:        {}", h.vcpu_count);
    println!("created:      {} (unix seconds)", h.created_unix_secs);
    println!(
        "compression:  {}",
        match h.compression {
            Compression::None => "none (raw)".to_string(),
            Compression::Zstd { level } => format!("zstd level {level}"),
        }
    );
    println!(
        "pages:        {} ({} data, {} zero) in {} records",
        t.pages, t.data_pages, t.zero_pages, t.records
    );
    println!("size ratio:   {ratio:.4} (file bytes / non-zero guest RAM)");
    if !cfg.is_null() {
        println!("VM config:    {cfg}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens and loads a snapshot into fresh guest memory; returns the machine state and the memory.
fn load(
    file: &Path,
    backend: Option<MemBackend>,
) -> Result<(MachineState, vm_memory::GuestMemoryMmap), LoadError> {
    let mut r = SnapshotReader::open(file).map_err(LoadError::Format)?;
    let state = MachineState::from_bytes(r.machine_state())
        .map_err(|e| LoadError::Other(anyhow::anyhow!("machine state unusable: {e}")))?;
    let cfg = state.config().clone();
    let backend = backend.unwrap_or(cfg.backend);
    let mem = vmm_core::create_guest_memory(cfg.mem_bytes, backend)
        .map_err(|e| LoadError::Other(anyhow::anyhow!("creating guest memory: {e}")))?;
    let b = bar(r.header().total_pages(), "load");
    let res = r.load_into(&mem, &mut |p| b.set_position(p.pages));
    b.finish_and_clear();
    res.map_err(LoadError::Format)?;
    Ok((state, mem))
}

enum LoadError {
    Format(FormatError),
    Other(anyhow::Error),
}

/// Builds a VM from a snapshot. A bad file is refused before any vCPU runs: `Ok(Err(code))`, with
/// the problem already reported and `code` the file's exit code (3 corrupt, 4 incomplete, …).
pub fn restore_vm(
    file: &Path,
    paused: bool,
    backend: Option<MemBackend>,
    serial: Box<dyn Write + Send>,
) -> anyhow::Result<Result<Vm, ExitCode>> {
    match load(file, backend) {
        Ok((state, mem)) => Ok(Ok(
            Vm::restore(&state, mem, serial, paused).context("restoring the VM")?
        )),
        Err(LoadError::Format(e)) => {
            report_bad(file, &e, false);
            eprintln!("snapctl: not restoring {}", file.display());
            Ok(Err(ExitCode::from(exit_code(&e))))
        }
        Err(LoadError::Other(e)) => Err(e),
    }
}

/// `snapctl oracle FILE`: loads the RAM of a built-in-guest snapshot and checks that every page holds exactly
/// what the guest's write sequence says at the control slots captured at the freeze instant.
pub fn oracle(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let (state, mem) = match load(file, None) {
        Ok(x) => x,
        Err(LoadError::Format(e)) => return Ok(report_bad(file, &e, json)),
        Err(LoadError::Other(e)) => return Err(e),
    };
    let slots = state.guest_slots();
    match vmm_core::oracle::check(&mem, state.config(), Some(&slots)) {
        Ok(rep) => {
            if json {
                println!(
                    "{}",
                    json!({"ok": true, "slots": slots, "report": format!("{rep:?}")})
                );
            } else {
                println!(
                    "{}: oracle PASS — guest memory is exactly the memory at the freeze instant (steps {slots:?})",
                    file.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(m) => {
            if json {
                println!(
                    "{}",
                    json!({"ok": false, "slots": slots, "mismatch": m.to_string()})
                );
            }
            eprintln!("snapctl: {}: oracle FAIL — {m}", file.display());
            Ok(ExitCode::from(exit::INCONSISTENT))
        }
    }
}

/// Nice value of the scan and compression threads for `save --background`.
const BACKGROUND_NICE: i32 = 10;

/// The VMM side of `save`: open the output, freeze (pause, capture, write-protect, resume), then the live save.
///
/// The output is opened before the freeze, so that a target that cannot be written (read-only or missing
/// directory, existing file without `force`, nobody reading the stream) fails without touching the guest.
/// Whatever fails later, ram-saver releases every protected page and the file sink removes its temporary file.
pub fn live_save(
    vm: &std::sync::Arc<Vm>,
    tracker: &WpTracker,
    req: &SaveRequest,
    moving: &[bool],
    cancel: &AtomicBool,
    progress: &mut (dyn FnMut(Value) + Send),
) -> anyhow::Result<Value> {
    let target = Path::new(&req.path);
    if !target.is_absolute() {
        bail!("the save path must be absolute: {}", req.path);
    }
    let compression = if req.zstd {
        Compression::Zstd {
            level: req.level.unwrap_or(3),
        }
    } else {
        Compression::None
    };
    let opts = SaveOptions {
        compression,
        max_bandwidth: req.max_bandwidth,
        fault_block_size: req.fault_block,
        bulk_nice: req.background.then_some(BACKGROUND_NICE),
        ..SaveOptions::default()
    };
    let opts = SaveOptions {
        block_size: req.scan_block.unwrap_or(opts.block_size),
        restore_huge_pages: opts.restore_huge_pages && !req.no_huge_restore,
        ..opts
    };
    // Staging faulted in now, while the guest still runs, not by the first copies after the thaw.
    let opts = SaveOptions {
        staging: ram_saver::Staging::prepare(&opts),
        ..opts
    };
    if req.stream {
        let f = open_stream(target, cancel)?;
        save_into(
            vm,
            tracker,
            StreamSink::new(CancellableWriter { f, cancel }),
            req,
            &opts,
            moving,
            cancel,
            progress,
        )
    } else {
        match std::fs::metadata(target) {
            Ok(m) if m.is_dir() => bail!(
                "{} is a directory; name a file to save to",
                target.display()
            ),
            Ok(_) if !req.force => {
                bail!(
                    "{} already exists; pass --force to replace it",
                    target.display()
                )
            }
            _ => {}
        }
        let sink = if req.force {
            AtomicFileSink::create(target)
        } else {
            AtomicFileSink::create_new(target)
        };
        let sink = sink.map_err(|e| {
            anyhow::anyhow!(
                "cannot create a file beside {}: {e}{}",
                target.display(),
                io_hint(&e)
            )
        })?;
        save_into(vm, tracker, sink, req, &opts, moving, cancel, progress)
    }
}

/// Opens a stream target (a FIFO the client reads) for writing without ever blocking on it: the open waits at
/// most [`STREAM_OPEN_TIMEOUT`] for a reader, and writes go through [`CancellableWriter`].
fn open_stream(target: &Path, cancel: &AtomicBool) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let meta =
        std::fs::metadata(target).with_context(|| format!("stream target {}", target.display()))?;
    let ft = meta.file_type();
    if !(ft.is_fifo() || ft.is_socket() || ft.is_char_device()) {
        bail!(
            "stream target {} is not a FIFO, socket or character device",
            target.display()
        );
    }
    let deadline = Instant::now() + STREAM_OPEN_TIMEOUT;
    loop {
        let res = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(target);
        match res {
            Ok(f) => return Ok(f),
            // A FIFO without a reader (yet).
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if cancel.load(Ordering::SeqCst) {
                    bail!("cancelled before the stream was opened");
                }
                if Instant::now() >= deadline {
                    bail!(
                        "nobody opened the stream {} for reading within {} s",
                        target.display(),
                        STREAM_OPEN_TIMEOUT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => bail!("opening stream {}: {e}", target.display()),
        }
    }
}

/// How long the VMM waits for the reader of a stream target to open it.
const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A non-blocking stream output whose writes wait for room in bounded slices and give up when the save is
/// cancelled: a reader that stops reading can stall the save (back pressure), but never keeps it from being
/// cancelled.
struct CancellableWriter<'a> {
    f: std::fs::File,
    cancel: &'a AtomicBool,
}

impl Write for CancellableWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::os::fd::AsFd;
        loop {
            match self.f.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.cancel.load(Ordering::SeqCst) {
                        return Err(std::io::Error::other("save cancelled"));
                    }
                    let mut fds = [nix::poll::PollFd::new(
                        self.f.as_fd(),
                        nix::poll::PollFlags::POLLOUT,
                    )];
                    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16)) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A plain-words hint for common I/O failures while writing a snapshot.
fn io_hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => {
            " (no space left on the target's file system: free some, or save elsewhere)"
        }
        Some(libc::EDQUOT) => " (disk quota exceeded: free some space, or save elsewhere)",
        Some(libc::EROFS) => " (the target's file system is read-only: save elsewhere)",
        Some(libc::EACCES) | Some(libc::EPERM) => " (is the directory writable?)",
        Some(libc::ENOENT) => " (does the directory exist?)",
        Some(libc::EPIPE) => " (the reader of the stream went away)",
        _ => "",
    }
}

/// The first I/O error in an error's chain, for [`io_hint`].
fn find_io_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = c.source();
    }
    None
}

/// Write-protection of all guest RAM, released on drop unless handed over to the live save (which
/// releases it itself, whatever happens): held from the instant RAM is protected, so no error
/// between the freeze and the save can leave the guest write-protected with nobody serving its
/// faults.
struct Protected<'a> {
    tracker: &'a WpTracker,
    armed: bool,
}

impl<'a> Protected<'a> {
    /// Write-protects every registered range (all of it or, on failure, none of it).
    fn all(tracker: &'a WpTracker) -> Result<Self, wp_tracker::WpError> {
        let guard = Protected {
            tracker,
            armed: true,
        };
        tracker.protect_all()?;
        Ok(guard)
    }

    /// The live save owns the protection from here on.
    fn hand_over(mut self) {
        self.armed = false;
    }
}

impl Drop for Protected<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tracker.unprotect_all();
        }
    }
}

/// Freeze, save into `sink`, and build the summary.
#[allow(clippy::too_many_arguments)]
fn save_into<S: ram_saver::SnapshotSink>(
    vm: &std::sync::Arc<Vm>,
    tracker: &WpTracker,
    sink: S,
    req: &SaveRequest,
    opts: &SaveOptions,
    moving: &[bool],
    cancel: &AtomicBool,
    progress: &mut (dyn FnMut(Value) + Send),
) -> anyhow::Result<Value> {
    // Everything that can fail is built before the freeze.
    let cfg = vm.config().clone();
    let header = SnapshotHeader::new(
        Vec::new(),
        u32::from(cfg.vcpus),
        serde_json::to_vec(&cfg).context("encoding the VM configuration")?,
    );
    let monitor = cfg
        .is_builtin_guest()
        .then(|| crate::monitor::ProgressMonitor::start(vm, moving.to_vec()));
    // The freeze instant: vCPUs parked, machine state captured, all RAM write-protected, vCPUs
    // resumed, atomically against other clients' pause and resume.
    let frozen = vm
        .freeze(|_| Protected::all(tracker))
        .context("freezing the VM")?;
    let protected = frozen.held;
    let state = frozen.state;
    let downtime = frozen.times.total();
    let state_bytes = state.to_bytes();
    let total_bytes = cfg.mem_bytes;
    let progress = Mutex::new(progress);
    let report = |p: &ram_saver::SaveProgress| {
        let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
        v["total_bytes"] = json!(total_bytes);
        if let Ok(mut f) = progress.lock() {
            (*f)(v);
        }
    };
    // ram-saver releases every page whatever happens from here on.
    protected.hand_over();
    let res = ram_saver::live_save(
        vm.memory(),
        tracker,
        sink,
        header,
        &state_bytes,
        opts,
        &report,
        cancel,
    );
    let guest = monitor.map(|m| m.finish());
    let summary = match res {
        Ok(s) => s,
        Err(ram_saver::SaveError::Cancelled) => bail!("cancelled; no file was written"),
        Err(e) => {
            let hint = find_io_error(&e).map_or("", io_hint);
            if cancel.load(Ordering::SeqCst) {
                bail!("cancelled: {}", ErrorChain(&e));
            }
            bail!("{}{hint}", ErrorChain(&e));
        }
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut out = json!({
        "path": req.path,
        "guest_bytes": total_bytes,
        "duration_s": summary.duration_secs + downtime.as_secs_f64(),
        "downtime_ms": ms(downtime),
        "freeze_ms": {
            "pause": ms(frozen.times.pause),
            "capture": ms(frozen.times.capture),
            "protect": ms(frozen.times.hold),
            "resume": ms(frozen.times.resume),
        },
        "stayed_paused": frozen.stayed_paused,
        "pages_saved": summary.pages_saved,
        "zero_pages": summary.zero_pages,
        "data_pages": summary.data_pages,
        "faults_served": summary.faults_served,
        "fault_latency_p50_us": summary.fault_latency_p50_us,
        "fault_latency_p99_us": summary.fault_latency_p99_us,
        "fault_latency_max_us": summary.fault_latency_max_us,
        "file_bytes": summary.file_bytes,
        "image_size_ratio": summary.image_size_ratio,
        "records": summary.records,
        "compression": opts.compression,
        "fault_buffer_waits": summary.fault_buffer_waits,
        "huge_pages_restored": summary.huge_pages_restored,
    });
    // Figures only the built-in guest can give are absent for kernel guests, never a zero that
    // reads as "no stall".
    if let Some(g) = guest {
        out["freeze_steps"] = json!(state.guest_slots());
        out["guest_steps_per_s_during"] = json!(g.steps_per_s);
        out["guest_max_stall_ms"] = json!(g.max_stall_ms);
    }
    Ok(out)
}
