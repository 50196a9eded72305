//! A save for a client: one at a time, the client's connection watched (leaving cancels), progress
//! forwarded without ever blocking the save, the protocol run by `vm_snapshot::save`.

use super::conn::error;
use super::*;

impl Vmm {
    /// A save of a VM still restoring lazily first waits until every page is resident: pages
    /// not yet resident are in the file, not in memory, and the write-protect tracking a save
    /// needs takes over guest memory only once the restore's userfaultfd lets go of it. The
    /// collapse into huge pages that follows waits while the save runs (the returned hold): a
    /// block the save write-protects could not be collapsed.
    fn wait_lazy(&self, cancel: &AtomicBool) -> anyhow::Result<Option<vm_snapshot::CollapseHold>> {
        let Some(lazy) = &self.lazy else {
            return Ok(None);
        };
        let mut logged = false;
        loop {
            match lazy.wait_resident(Duration::from_millis(50)) {
                Some(Ok(())) => return Ok(Some(lazy.hold_collapse())),
                Some(Err(f)) => bail!("the lazy restore of this VM failed: {f}"),
                None => {}
            }
            if cancel.load(Ordering::SeqCst) {
                bail!("cancelled while waiting for the lazy restore to finish");
            }
            if !logged {
                let s = lazy.status();
                info!(
                    "save waits for the lazy restore to fill guest memory ({} of {} resident)",
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
    pub(super) fn save(
        self: &Arc<Self>,
        req: SaveParams,
        conn: UnixStream,
        w: &UnixStream,
    ) -> Reply {
        if let Err(msg) = req.options() {
            debug!("save refused: {msg}");
            return error("bad_request", msg);
        }
        let _collapse_hold = match self.save_gate() {
            Ok(h) => h,
            Err(r) => return r,
        };
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
        let res = self.wait_lazy(&cancel).and_then(|_hold| {
            let t = self.tracker()?;
            if !self.track_writes {
                return save_untracked(&self.vm, &t, &req, &moving, &cancel, &progress);
            }
            let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
            vm_snapshot::save_tracked(&self.vm, &t, &mut record, &req, &moving, &cancel, &progress)
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

/// Why a `parent` save of a VMM without write tracking stores all memory.
pub(super) const TRACKING_OFF: &str = "write tracking is off in this VMM (--track-writes off)";

/// A save of a VMM started with `--track-writes off`: no write record, so the save releases all
/// memory at its end and a `parent` save stores all memory, saying why.
fn save_untracked(
    vm: &Arc<Vm>,
    t: &WpTracker,
    req: &SaveParams,
    moving: &[bool],
    cancel: &AtomicBool,
    progress: &(dyn Fn(&ram_saver::SaveProgress) + Sync),
) -> anyhow::Result<vm_snapshot::SaveReport> {
    let mut params = req.clone();
    let parent = params.parent.take();
    let mut report = vm_snapshot::save(vm, t, &params, moving, cancel, progress)?;
    if let Some(p) = parent {
        report.full_reason = Some(format!(
            "no record of writes since {p}'s freeze: saved all memory ({TRACKING_OFF})"
        ));
    }
    Ok(report)
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
    if let Some(m) = req.max_staging {
        s.push_str(&format!(", staging at most {}", fmt_bytes(m)));
    }
    match req.prepare_staging {
        Some(vm_snapshot::PrepareStaging::Bytes(b)) => {
            s.push_str(&format!(", preparing {} of staging", fmt_bytes(b)))
        }
        Some(vm_snapshot::PrepareStaging::Auto) | None => {}
    }
    if req.force {
        s.push_str(", replacing");
    }
    if let Some(p) = &req.parent {
        s.push_str(&format!(", parent {p}"));
    }
    s
}

/// A finished save's key figures at info, the finer ones at debug.
fn log_report(r: &vm_snapshot::SaveReport) {
    info!(
        "save finished: {} of guest RAM to {} in {:.3} s; downtime {:.3} ms; {} faults served (p99 {} µs); \
         file {} (image size ratio {:.4}); staging peak {} of {}",
        fmt_bytes(r.guest_bytes),
        r.path,
        r.duration_s,
        r.downtime_ms,
        r.faults_served,
        r.fault_latency_p99_us,
        fmt_bytes(r.file_bytes),
        r.image_size_ratio,
        fmt_bytes(r.staging.peak_bytes),
        fmt_bytes(r.staging.cap_bytes)
    );
    if let Some(p) = &r.parent {
        info!(
            "incremental save: {} stored, {} inherited from {p} ({} pages of written units \
             compared, {} unchanged)",
            fmt_bytes(r.stored_bytes),
            fmt_bytes(r.inherited_bytes),
            r.pages_compared,
            r.pages_unchanged
        );
    }
    if let Some(why) = &r.full_reason {
        info!("{why}");
    }
    if r.staging.cap_reached {
        info!(
            "save reached its staging cap ({}): {} guest writes waited {:.1} ms in total for the output",
            fmt_bytes(r.staging.cap_bytes),
            r.staging.waits,
            r.staging.wait_total_us as f64 / 1e3
        );
    }
    let compression = match r.compression {
        ram_saver::Compression::None => "raw".to_string(),
        ram_saver::Compression::Zstd { level } => format!("zstd level {level}"),
    };
    let f = &r.freeze_ms;
    debug!(
        "save details: armed in {:.3} ms; freeze {:.3}/{:.3}/{:.3}/{:.3} ms (pause/capture/protect/resume), vCPUs held \
         {:.3} ms; {} pages ({} zero, \
         {} data) in {} {compression} records; fault latency p50 {} µs, max {} µs; {} faults waited for a \
         buffer; {} huge pages restored{}",
        f.arm,
        f.pause,
        f.capture,
        f.protect,
        f.resume,
        f.guest_held,
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
