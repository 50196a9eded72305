//! The client side of the control socket: `save`, `status`, `pause`, … talk to a running VMM process.

use crate::api::{self, Reply, Request, SaveParams};
use crate::units::fmt_bytes;
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use serde_json::Value;
use std::io::{BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Exit code when the VMM refused or failed the request.
const EXIT_FAILED: u8 = 1;
/// Exit code when the save was cancelled (Ctrl-C or `snapctl cancel`).
const EXIT_CANCELLED: u8 = 130;
/// How long a cancelled `save` waits for the VMM's confirmation before exiting anyway.
const CANCEL_CONFIRM_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends one request and returns the final reply, passing progress lines to `on_progress`.
fn request(sock: &Path, req: &Request, on_progress: impl FnMut(&Value)) -> anyhow::Result<Reply> {
    exchange(api::connect(sock)?, req, on_progress)
}

/// [`request`] on an open connection.
pub(crate) fn exchange(
    stream: UnixStream,
    req: &Request,
    mut on_progress: impl FnMut(&Value),
) -> anyhow::Result<Reply> {
    let mut w = stream.try_clone()?;
    // The VMM may refuse a connection (`denied`, too many connections) with a reply before reading anything:
    // if sending fails, that reply is still the best answer.
    let sent = api::write_line(&mut w, req);
    let mut r = BufReader::new(stream);
    loop {
        let line = match api::read_line_bounded(&mut r, 16 << 20) {
            Ok(Some(line)) => line,
            Ok(None) | Err(_) if sent.is_err() => {
                return Err(sent.expect_err("checked")).context("sending the request");
            }
            Ok(None) => bail!("the VMM closed the connection without a reply"),
            Err(e) => return Err(e).context("reading the VMM's reply"),
        };
        let reply: Reply = serde_json::from_str(&line)
            .with_context(|| format!("malformed reply from the VMM: {line}"))?;
        match reply {
            Reply::Progress(v) => on_progress(&v),
            other => return Ok(other),
        }
    }
}

fn expect_ok(reply: Reply) -> anyhow::Result<Value> {
    match reply {
        Reply::Ok(v) => Ok(v),
        Reply::Error { kind, message } => bail!("{message} [{kind}]"),
        Reply::Progress(_) => unreachable!("progress is handled by request()"),
    }
}

/// Requests without a payload: pause, resume, cancel, shutdown.
pub fn simple(sock: &Path, req: Request, done: &str) -> anyhow::Result<ExitCode> {
    expect_ok(request(sock, &req, |_| {})?)?;
    eprintln!("{done}");
    Ok(ExitCode::SUCCESS)
}

/// `snapctl status`.
pub fn status(sock: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let v = expect_ok(request(sock, &Request::Status, |_| {})?)?;
    if json {
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    let g = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    println!("state:        {}", g("state").as_str().unwrap_or("?"));
    println!(
        "uptime:       {:.1} s",
        g("uptime_s").as_f64().unwrap_or(0.0)
    );
    println!(
        "memory:       {} ({} vCPUs)",
        fmt_bytes(g("mem_bytes").as_u64().unwrap_or(0)),
        g("vcpus")
    );
    if let Some(t) = v.get("ticks") {
        println!("guest ticks:  {t}");
    }
    if let (Some(steps), Some(rates)) = (g("steps").as_array(), g("steps_per_s").as_array()) {
        for (i, (s, r)) in steps.iter().zip(rates).enumerate() {
            println!(
                "vcpu {i}:       {s} steps, {:.0} steps/s",
                r.as_f64().unwrap_or(0.0)
            );
        }
    }
    if v.get("save").and_then(Value::as_bool) == Some(true) {
        println!("save:         in progress");
    }
    Ok(ExitCode::SUCCESS)
}

/// `snapctl self-check`.
pub fn self_check(sock: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let v = expect_ok(request(sock, &Request::SelfCheck, |_| {})?)?;
    let pass = v.get("pass").and_then(Value::as_bool).unwrap_or(false);
    if json {
        println!("{v}");
    } else if pass {
        println!("guest self-check: PASS ({v})");
    } else {
        println!("guest self-check: FAIL ({v})");
    }
    Ok(if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// A FIFO in a private temporary directory, removed on drop.
struct StreamFifo {
    dir: PathBuf,
    path: PathBuf,
}

impl StreamFifo {
    fn dir_of_this_process() -> PathBuf {
        std::env::temp_dir().join(format!("snapctl-out-{}", std::process::id()))
    }

    /// Removes this process's FIFO, if any (before exiting without unwinding).
    fn remove_mine() {
        let dir = Self::dir_of_this_process();
        let _ = std::fs::remove_file(dir.join("stream"));
        let _ = std::fs::remove_dir(dir);
    }

    fn new() -> anyhow::Result<Self> {
        let dir = Self::dir_of_this_process();
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("stream");
        nix::unistd::mkfifo(
            &path,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .with_context(|| format!("creating FIFO {}", path.display()))?;
        Ok(Self { dir, path })
    }
}

impl Drop for StreamFifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Memory and CPU knobs of `snapctl save`, and the hidden tuning ones (see `SaveParams`).
#[derive(Debug, Clone, Default)]
pub struct SaveTuning {
    /// Cap of staging memory, bytes.
    pub max_staging: Option<u64>,
    /// Staging to prepare before the freeze.
    pub prepare_staging: Option<vm_snapshot::PrepareStaging>,
    /// Bytes per write fault.
    pub fault_block: Option<usize>,
    /// Bytes per scan unit.
    pub scan_block: Option<usize>,
    /// Leave split huge pages split.
    pub no_huge_restore: bool,
    /// Neither hash pages nor compare them with the parent's.
    pub no_page_hashes: bool,
    /// Low CPU priority for the bulk saver threads.
    pub background: bool,
    /// The parent of an incremental save.
    pub parent: Option<PathBuf>,
}

/// `snapctl save`: asks the VMM for a live snapshot, shows progress, prints the summary.
///
/// Cancelling (documented in PROTOCOL.md): Ctrl-C (SIGINT) or SIGTERM shuts down the sending side of this
/// client's own connection; the VMM takes that as "the client is leaving", cancels *this* save (never another
/// client's), releases every page, removes the partial file and replies `cancelled`; the client exits with 130.
/// If this client is killed outright, the VMM notices the closed connection and cancels the same way: a save
/// nobody waits for is not finished behind the user's back. With `--out -`, a standard output that fails
/// (e.g. the reader of a pipe exits) cancels the save the same way, and the client exits with 1.
#[allow(clippy::too_many_arguments)]
pub fn save(
    sock: &Path,
    out: &Path,
    zstd: bool,
    level: Option<i32>,
    max_bandwidth: Option<u64>,
    force: bool,
    json: bool,
    tuning: SaveTuning,
) -> anyhow::Result<ExitCode> {
    // Block SIGINT/SIGTERM before any thread starts, so that every thread inherits the mask and a signalfd
    // thread turns Ctrl-C into a clean cancel.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block().context("blocking SIGINT")?;
    let sfd = SignalFd::new(&mask).context("signalfd")?;
    // The save connection, once there is one: cancelling shuts down its sending side.
    let conn_slot: Arc<Mutex<Option<UnixStream>>> = Arc::default();
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let conn_slot = conn_slot.clone();
        let interrupted = interrupted.clone();
        std::thread::spawn(move || {
            if let Ok(Some(_)) = sfd.read_signal() {
                interrupted.store(true, Ordering::SeqCst);
                eprintln!("\nsnapctl: cancelling the save…");
                match conn_slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    Some(c) => {
                        let _ = c.shutdown(Shutdown::Write);
                    }
                    None => {
                        eprintln!("snapctl: save cancelled before it started");
                        StreamFifo::remove_mine();
                        std::process::exit(i32::from(EXIT_CANCELLED));
                    }
                }
                // The VMM confirms within milliseconds; do not hang if it cannot.
                std::thread::sleep(CANCEL_CONFIRM_TIMEOUT);
                eprintln!("snapctl: the VMM did not confirm the cancel; giving up");
                StreamFifo::remove_mine();
                std::process::exit(i32::from(EXIT_CANCELLED));
            }
        });
    }

    let streaming = out == Path::new("-");
    let fifo = if streaming {
        Some(StreamFifo::new()?)
    } else {
        None
    };
    let path = match &fifo {
        Some(f) => f.path.clone(),
        None => std::path::absolute(out).with_context(|| format!("resolving {}", out.display()))?,
    };
    if !streaming && path.exists() && !force {
        bail!(
            "{} already exists; pass --force to replace it",
            path.display()
        );
    }
    let parent = match &tuning.parent {
        Some(p) if streaming => {
            bail!(
                "--parent needs a file for --out, not standard output ({} cannot be referred to)",
                p.display()
            )
        }
        Some(p) => Some(
            std::path::absolute(p)
                .with_context(|| format!("resolving {}", p.display()))?
                .to_string_lossy()
                .into_owned(),
        ),
        None => None,
    };
    let stream = api::connect(sock)?;
    *conn_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream.try_clone()?);

    // `--out -`: the VMM writes into a private FIFO, copied here to standard output. If standard output
    // fails, the save is cancelled (see above) and the error kept for the final message.
    let stdout_error: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
    let copier = match &fifo {
        Some(f) => {
            let p = f.path.clone();
            let conn = stream.try_clone()?;
            let stdout_error = stdout_error.clone();
            Some(std::thread::spawn(move || -> std::io::Result<u64> {
                let mut src = std::fs::File::open(&p)?;
                // Both ends are open now: the name is no longer needed, and nothing is left behind even if
                // this process is killed.
                StreamFifo::remove_mine();
                let stdout = std::io::stdout();
                let mut lock = stdout.lock();
                let res = std::io::copy(&mut src, &mut lock).and_then(|n| lock.flush().map(|()| n));
                if let Err(e) = &res {
                    *stdout_error.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(std::io::Error::new(e.kind(), e.to_string()));
                    let _ = conn.shutdown(Shutdown::Write);
                }
                res
            }))
        }
        None => None,
    };

    let req = Request::Save(SaveParams {
        path: path.to_string_lossy().into_owned(),
        stream: streaming,
        zstd,
        level,
        max_bandwidth,
        force,
        max_staging: tuning.max_staging,
        prepare_staging: tuning.prepare_staging,
        fault_block: tuning.fault_block,
        scan_block: tuning.scan_block,
        no_huge_restore: tuning.no_huge_restore,
        no_page_hashes: tuning.no_page_hashes,
        background: tuning.background,
        parent,
    });
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let reply = exchange(stream, &req, |p| {
        let get = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
        bar.set_length(get("total_bytes"));
        bar.set_position(get("bytes_scanned"));
        bar.set_message(format!(
            "{} pages, {} zero, {} faults, {} written",
            get("pages_saved"),
            get("zero_pages"),
            get("faults_served"),
            fmt_bytes(get("bytes_written"))
        ));
    });
    bar.finish_and_clear();
    let cancelled_by_user = interrupted.load(Ordering::SeqCst);
    let reply = match reply {
        Ok(r) => r,
        Err(_) if cancelled_by_user => {
            eprintln!("snapctl: save cancelled");
            return Ok(ExitCode::from(EXIT_CANCELLED));
        }
        // The VMM vanished mid-save. (The FIFO reader may block forever: it is not waited for.)
        Err(e) => return Err(e),
    };
    // The copier ends by itself once the VMM closed the stream after a complete save; otherwise it may be
    // blocked opening a FIFO the VMM never opened, and is not waited for.
    let copied = match (copier, &reply) {
        (Some(c), Reply::Ok(_)) => Some(
            c.join()
                .map_err(|_| anyhow::anyhow!("stdout copier panicked"))?,
        ),
        _ => None,
    };
    if let Some(e) = stdout_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    {
        eprintln!(
            "snapctl: save failed: writing the snapshot to standard output failed: {e}; the save was cancelled"
        );
        return Ok(ExitCode::from(EXIT_FAILED));
    }
    if let Some(Err(e)) = copied {
        eprintln!("snapctl: save failed: reading the snapshot stream failed: {e}");
        return Ok(ExitCode::from(EXIT_FAILED));
    }
    match reply {
        Reply::Ok(summary) => {
            if json && !streaming {
                println!("{summary}");
            } else if json {
                // Standard output carries the snapshot itself.
                eprintln!("{summary}");
            } else {
                print_summary(&summary, if streaming { None } else { Some(&path) });
            }
            Ok(ExitCode::SUCCESS)
        }
        Reply::Error { kind, message } if kind == "cancelled" => {
            eprintln!("snapctl: save cancelled: {message}");
            Ok(ExitCode::from(EXIT_CANCELLED))
        }
        Reply::Error { kind, message } => {
            eprintln!("snapctl: save failed: {message} [{kind}]");
            Ok(ExitCode::from(EXIT_FAILED))
        }
        Reply::Progress(_) => unreachable!(),
    }
}

fn print_summary(s: &Value, path: Option<&Path>) {
    let u = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
    let f = |k: &str| s.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let mut e = std::io::stderr().lock();
    let _ = writeln!(
        e,
        "saved {}{} in {:.3} s",
        fmt_bytes(u("guest_bytes")),
        path.map(|p| format!(" to {}", p.display()))
            .unwrap_or_default(),
        f("duration_s")
    );
    if let Some(why) = s.get("full_reason").and_then(Value::as_str) {
        let _ = writeln!(e, "  {why}");
    }
    if let Some(p) = s.get("parent").and_then(Value::as_str) {
        let _ = writeln!(
            e,
            "  incremental:     {} stored, {} inherited from {p}",
            fmt_bytes(u("stored_bytes")),
            fmt_bytes(u("inherited_bytes"))
        );
        let _ = writeln!(
            e,
            "  compared:        {} pages of written units, {} unchanged (not stored)",
            u("pages_compared"),
            u("pages_unchanged")
        );
    }
    let _ = writeln!(e, "  downtime:        {:.3} ms", f("downtime_ms"));
    let _ = writeln!(
        e,
        "  pages:           {} saved, {} zero",
        u("pages_saved"),
        u("zero_pages")
    );
    let _ = writeln!(
        e,
        "  faults served:   {} (latency p50 {} µs, p99 {} µs, max {} µs)",
        u("faults_served"),
        u("fault_latency_p50_us"),
        u("fault_latency_p99_us"),
        u("fault_latency_max_us")
    );
    let _ = writeln!(
        e,
        "  fault waits:     {:.1} ms in total",
        f("fault_wait_total_ms")
    );
    let st = &s["staging"];
    let su = |k: &str| st.get(k).and_then(Value::as_u64).unwrap_or(0);
    let _ = writeln!(
        e,
        "  staging:         peak {} (cap {}); {} faults waited for staging",
        fmt_bytes(su("peak_bytes")),
        fmt_bytes(su("cap_bytes")),
        su("waits")
    );
    if su("prepared_bytes") > 0 {
        let probe_ms = st.get("probe_ms").and_then(Value::as_f64).unwrap_or(0.0);
        let probe = if probe_ms > 0.0 {
            format!(
                " (the guest wrote {} units of 2 MiB in a {:.0} ms look before it)",
                su("probe_units"),
                probe_ms
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            e,
            "  staging prepared before the freeze: {} in {:.0} ms{probe}",
            fmt_bytes(su("prepared_bytes")),
            st.get("prepare_ms").and_then(Value::as_f64).unwrap_or(0.0)
        );
    }
    if st.get("cap_reached").and_then(Value::as_bool) == Some(true) {
        let _ = writeln!(
            e,
            "  staging cap reached: faults waited {:.1} ms in total (longest {:.1} ms) for the output; \
             a larger --max-staging spares the guest that",
            su("wait_total_us") as f64 / 1e3,
            su("wait_max_us") as f64 / 1e3
        );
    }
    let ph = &s["fault_phases_us"];
    let n = ph.get("faults").and_then(Value::as_u64).unwrap_or(0);
    if n > 0 {
        let per = |k: &str| ph.get(k).and_then(Value::as_u64).unwrap_or(0) as f64 / n as f64;
        let _ = writeln!(
            e,
            "  per fault (µs):  queue {:.0}, claim {:.1}, staging {:.0}, copy {:.0}, release {:.0}; \
             per batch read {:.0}, bookkeeping {:.0}",
            per("queue_us"),
            per("claim_us"),
            per("staging_us"),
            per("copy_us"),
            per("release_us"),
            per("read_us") * n as f64 / ph["batches"].as_u64().unwrap_or(1).max(1) as f64,
            per("bookkeeping_us") * n as f64 / ph["batches"].as_u64().unwrap_or(1).max(1) as f64,
        );
    }
    let _ = writeln!(
        e,
        "  file:            {} (image size ratio {:.4})",
        fmt_bytes(u("file_bytes")),
        f("image_size_ratio")
    );
}
