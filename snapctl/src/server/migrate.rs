//! Live migration in the VMM: the source side of a `migrate` request (one at a time, in the save
//! slot so that no save or second migration interleaves), the destination VMM (`restore
//! --listen`), and the state that keeps a source frozen after a migration that failed once the
//! destination ran.

use super::conn::error;
use super::*;
use vm_snapshot::migrate::{Interrupted, Listener, MigrateParams};

/// What `migrate --resume` needs: the interrupted migration's request and session.
pub(super) type Resumable = (MigrateParams, Interrupted);

/// Where the source VM stands with respect to migrations.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Migration {
    /// No migration.
    #[default]
    Idle,
    /// A migration runs: the guest is frozen; `resume` is refused.
    Running,
    /// A migration failed after the destination ran: the guest stays frozen until a forced
    /// resume (`--force-after-failed-migration`).
    FrozenAfterFailure,
    /// The VM moved to the destination: this copy never runs again (the VMM ends).
    Migrated,
}

impl Vmm {
    /// A save of a VM whose memory is still arriving is refused (its pages are at the source);
    /// once it has arrived, the save holds the collapse into huge pages off while it runs.
    pub(super) fn save_gate(
        &self,
    ) -> Result<Option<vm_snapshot::migrate::IncomingCollapseHold>, Reply> {
        let Some(i) = &self.incoming else {
            return Ok(None);
        };
        if i.wait_resident(Duration::ZERO).is_none() {
            return Err(error(
                "busy",
                "this VM's memory is still arriving from a migration; save once `status` shows \
                 it resident",
            ));
        }
        Ok(Some(i.hold_collapse()))
    }

    /// The VMM's userfaultfd tracker (as a save creates it), for telling units without data.
    fn data_tracker(&self) -> Option<Arc<WpTracker>> {
        let mut g = self.tracker.lock().expect("tracker lock");
        if g.is_none() {
            let t = WpTracker::new().ok()?;
            t.register_memory(self.vm.memory()).ok()?;
            *g = Some(Arc::new(t));
        }
        g.clone()
    }

    /// `resume`: refused while a migration runs, and after one that failed once the destination
    /// ran unless forced.
    pub(super) fn resume_checked(&self, force: bool) -> Reply {
        let mut m = self.migration.lock().expect("migration lock");
        match (*m, force) {
            (Migration::Running | Migration::Migrated, _) => {
                return error(
                    "busy",
                    "a migration is in progress: its guest must stay frozen; wait for it",
                )
            }
            (Migration::FrozenAfterFailure, false) => {
                return error(
                    "frozen_after_migration",
                    "a migration of this VM failed after the destination started running it: \
                     resuming here could make two running copies. Stop the destination first, \
                     then `snapctl resume --force-after-failed-migration` (what the destination's \
                     guest did after the freeze is lost)",
                )
            }
            (Migration::FrozenAfterFailure, true) => {
                warn!(
                    "resuming the guest from its freeze instant after a failed migration (forced)"
                );
                *self.interrupted.lock().expect("interrupted lock") = None;
            }
            (Migration::Idle, _) => {}
        }
        match self.vm.resume() {
            Ok(d) => {
                *m = Migration::Idle;
                info!("vCPUs resumed in {} µs", d.as_micros());
                Reply::Ok(json!({"resume_us": d.as_micros() as u64}))
            }
            Err(e) => {
                warn!("resuming the vCPUs failed: {e:#}");
                error("vm", format!("{e:#}"))
            }
        }
    }

    /// Runs a migration for the client on `conn` and writes its final reply itself: after a
    /// successful one the VMM ends (the guest lives on at the destination). The client leaving
    /// cancels only before the destination runs.
    pub(super) fn migrate(self: &Arc<Self>, req: MigrateParams, conn: UnixStream, w: &UnixStream) {
        let mut w = match w.try_clone() {
            Ok(w) => w,
            Err(e) => {
                warn!("migration refused: cannot duplicate the client's socket: {e}");
                return;
            }
        };
        let reply = self.migrate_inner(req, conn, &w);
        let ok = matches!(reply, Reply::Ok(_));
        if let Err(e) = api::write_line(&mut w, &reply) {
            debug!("control connection: the reply was not delivered: {e}");
        }
        if ok {
            info!("the VM now runs at the destination; stopping this VMM");
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    fn migrate_inner(
        self: &Arc<Self>,
        mut req: MigrateParams,
        conn: UnixStream,
        w: &UnixStream,
    ) -> Reply {
        if self
            .incoming
            .as_ref()
            .is_some_and(|i| i.wait_resident(Duration::ZERO).is_none())
        {
            return error(
                "busy",
                "this VM is still arriving from a migration; migrate it once all its memory is here",
            );
        }
        if let Some(lazy) = &self.lazy {
            if lazy.wait_resident(Duration::ZERO).is_none() {
                return error(
                    "busy",
                    "this VM is still restoring lazily; migrate it once all its memory is here",
                );
            }
        }
        let mut resume_from = None;
        {
            let m = self.migration.lock().expect("migration lock");
            let interrupted = self.interrupted.lock().expect("interrupted lock");
            match (*m, req.resume, interrupted.as_ref()) {
                (Migration::FrozenAfterFailure, true, Some((prev, i))) => {
                    if req.to.is_empty() {
                        req.to = prev.to.clone();
                    }
                    if req.token_file.as_os_str().is_empty() {
                        req.token_file = prev.token_file.clone();
                    }
                    req.zstd |= prev.zstd;
                    resume_from = Some(i.clone());
                }
                (_, true, _) => {
                    return error(
                        "no_migration_to_resume",
                        "no migration of this VM lost its connection after the destination ran: \
                         nothing to resume",
                    )
                }
                (Migration::FrozenAfterFailure | Migration::Migrated, false, _) => {
                    return error(
                        "frozen_after_migration",
                        "an earlier migration of this VM failed after the destination ran; its \
                         guest is frozen: `snapctl migrate --resume` reconnects to a destination \
                         that waits, `snapctl resume --force-after-failed-migration` runs it on \
                         here if the destination is gone",
                    );
                }
                _ => {}
            }
        }
        let cancel = Arc::new(AtomicBool::new(false));
        {
            let mut g = self.save.lock().expect("save lock");
            if g.is_some() {
                return error(
                    "busy",
                    "a save or migration is already in progress; wait for it or `snapctl cancel` it",
                );
            }
            *g = Some(cancel.clone());
        }
        let frozen_before = *self.migration.lock().expect("migration lock");
        *self.migration.lock().expect("migration lock") = Migration::Running;
        struct Clear<'a>(&'a Mutex<Option<Arc<AtomicBool>>>);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        let clear = Clear(&self.save);
        info!(
            "migration to {} {}{}",
            req.to,
            if resume_from.is_some() {
                "resumed"
            } else {
                "started"
            },
            if req.zstd { " (zstd)" } else { "" }
        );
        // The client leaving cancels (before the destination runs; afterwards nothing can).
        {
            let cancel = cancel.clone();
            let mut conn = conn;
            let _ = std::thread::Builder::new()
                .name("migrate-watch".into())
                .spawn(move || {
                    let mut buf = [0u8; 256];
                    while let Ok(n) = std::io::Read::read(&mut conn, &mut buf) {
                        if n == 0 {
                            break;
                        }
                    }
                    cancel.store(true, Ordering::SeqCst);
                });
        }
        let (ptx, prx) = std::sync::mpsc::sync_channel::<Value>(1);
        let forwarder = w.try_clone().ok().and_then(|mut w| {
            std::thread::Builder::new()
                .name("migrate-progress".into())
                .spawn(move || {
                    for p in prx {
                        if api::write_line(&mut w, &Reply::Progress(p)).is_err() {
                            break;
                        }
                    }
                })
                .ok()
        });
        let ptx = Mutex::new(ptx);
        let progress = |p: &vm_snapshot::migrate::MigrateProgress| {
            let v = serde_json::to_value(p).unwrap_or(Value::Null);
            let _ = ptx.lock().expect("progress lock").try_send(v);
        };
        // Tells units without data (no need to read them); registering does not protect anything.
        let tracker = self.data_tracker();
        let res = match &resume_from {
            Some(prev) => vm_snapshot::migrate::migrate_resume(
                &self.vm,
                tracker.as_deref(),
                &req,
                prev,
                &progress,
            ),
            None => vm_snapshot::migrate::migrate_out(
                &self.vm,
                tracker.as_deref(),
                &req,
                &cancel,
                &progress,
            ),
        };
        drop(ptx);
        drop(clear);
        if let Some(f) = forwarder {
            let _ = f.join();
        }
        let mut m = self.migration.lock().expect("migration lock");
        match res {
            Ok(report) => {
                info!(
                    "migration finished: {} to {} in {:.3} s; downtime {:.3} ms; {} on the wire for {} of \
                     data ({} zero); {} demand requests (destination fault wait p50 {} µs, p99 {} µs)",
                    fmt_bytes(report.guest_bytes),
                    report.to,
                    report.duration_s,
                    report.downtime_ms,
                    fmt_bytes(report.wire_bytes),
                    fmt_bytes(report.data_bytes),
                    fmt_bytes(report.zero_bytes),
                    report.demand_requests,
                    report.dest.fault_wait_p50_us,
                    report.dest.fault_wait_p99_us
                );
                // The guest lives at the destination: this copy never runs again.
                *m = Migration::Migrated;
                *self.interrupted.lock().expect("interrupted lock") = None;
                Reply::Ok(serde_json::to_value(&report).unwrap_or(Value::Null))
            }
            Err(f) if f.dest_running => {
                *m = Migration::FrozenAfterFailure;
                *self.interrupted.lock().expect("interrupted lock") =
                    f.interrupted.clone().map(|i| (req.clone(), *i));
                error!(
                    "migration failed after the destination started the VM: {f}; this guest stays \
                     frozen (never two running copies)"
                );
                error(
                    "migration_failed_frozen",
                    format!(
                        "{f}. The destination had started the VM, so this copy stays frozen. If the \
                         destination waits for the rest of its memory (its `status` says \
                         `waiting_for_source`), `snapctl migrate --resume` reconnects and finishes; \
                         if it is gone, `snapctl resume --force-after-failed-migration` runs this \
                         guest on from its freeze instant (what the destination's guest did is lost; \
                         make sure the destination is stopped first)"
                    ),
                )
            }
            Err(f) => {
                *m = frozen_before;
                warn!("migration failed before the destination ran: {f}; the guest runs on here");
                let kind = if matches!(f.error, vm_snapshot::migrate::MigrateError::Cancelled) {
                    "cancelled"
                } else {
                    "migration_failed"
                };
                error(
                    kind,
                    format!("{f}; the guest was not moved and runs on here"),
                )
            }
        }
    }
}

/// `snapctl restore --listen ADDR --token-file FILE`: waits for one authenticated source, runs
/// the VM it sends, and serves the control socket as any VMM.
pub fn run_restore_listen(
    listen: &str,
    token_file: &Path,
    resume_timeout: Duration,
    paused: bool,
    vmm: &VmmArgs,
    sock: &Path,
) -> anyhow::Result<ExitCode> {
    let listener = bind_socket(sock)?;
    let arrived = (|| {
        let l = Listener::bind(listen, token_file)?.with_resume_timeout(resume_timeout);
        info!("waiting for a migration on {}", l.address());
        let params = vm_snapshot::RestoreParams {
            paused,
            backend: backend_override(vmm)?,
            serial: serial_out(vmm)?,
        };
        Ok::<_, anyhow::Error>(l.accept(params)?)
    })();
    let (vm, incoming) = match arrived {
        Ok(x) => x,
        Err(e) => {
            let _ = std::fs::remove_file(sock);
            return Err(e);
        }
    };
    let st = incoming.status();
    info!(
        "migrated VM from {} running after {:.1} ms ({} of guest RAM follows); control socket {}",
        st.peer,
        st.start_ms,
        fmt_bytes(st.total_bytes),
        sock.display()
    );
    forward_stdin(&vm);
    serve_with(
        vm,
        None,
        Some(incoming),
        None,
        vmm.tracks_writes(),
        listener,
        sock,
    )
}

/// Watches an incoming migration: logs its end, and ends the VMM when it fails (a corrupt
/// stream, or lost connections the source did not resume in time): the guest must never run on
/// memory that did not arrive, and a vCPU that touched a missing page stays blocked for good.
pub(super) fn watch_incoming(vmm: Arc<Vmm>, sock: std::path::PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("migrate-watch".into())
        .spawn(move || {
            let Some(inc) = vmm.incoming.as_ref() else {
                return;
            };
            loop {
                match inc.wait(Duration::from_millis(500)) {
                    Some(Ok(())) => {
                        let s = inc.status();
                        info!(
                            "migration arrived: {} resident after {:.3} s; {} faults, {} requests \
                             (wait p50 {} µs, p99 {} µs, max {} µs); collapsed in {:.0} ms ({} units \
                             not collapsed)",
                            fmt_bytes(s.resident_bytes),
                            s.figures.resident_s,
                            s.figures.faults,
                            s.figures.requests,
                            s.figures.fault_wait_p50_us,
                            s.figures.fault_wait_p99_us,
                            s.figures.fault_wait_max_us,
                            s.collapse_ms.unwrap_or(0.0),
                            s.collapse_failures
                        );
                        return;
                    }
                    Some(Err(f)) => {
                        error!(
                            "incoming migration failed: {f}; stopping the VM so that it never runs \
                             on memory that did not arrive"
                        );
                        let _ = std::fs::remove_file(&sock);
                        let code = if f.corrupt {
                            crate::offline::exit::CORRUPT
                        } else if f.resume_timed_out {
                            EXIT_SOURCE_GONE
                        } else {
                            1
                        };
                        std::process::exit(i32::from(code));
                    }
                    None if vmm.stop.load(Ordering::SeqCst) => return,
                    None => {}
                }
            }
        });
    if let Err(e) = spawned {
        warn!("cannot start the thread that watches the migration ({e}); a failure will not end the VMM");
    }
}

/// Exit code of a destination VMM whose connection was lost and whose source did not reconnect
/// within `--resume-timeout`.
pub const EXIT_SOURCE_GONE: u8 = 8;

/// The `migration` part of `status`.
pub(super) fn status_of(vmm: &Vmm) -> Option<Value> {
    if let Some(i) = &vmm.incoming {
        return serde_json::to_value(i.status()).ok();
    }
    match *vmm.migration.lock().expect("migration lock") {
        Migration::Idle => None,
        Migration::Running => Some(json!({"state": "migrating"})),
        Migration::FrozenAfterFailure => Some(json!({
            "state": "frozen_after_migration",
            "resumable": vmm.interrupted.lock().expect("interrupted lock").is_some(),
        })),
        Migration::Migrated => Some(json!({"state": "migrated"})),
    }
}
