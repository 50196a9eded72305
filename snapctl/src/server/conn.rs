//! Control connections: one thread per client (bounded), peer credentials checked, one request
//! line read with a timeout, one reply (saves stream progress first, see `save.rs`).

use super::*;

/// Most control connections served at once; more get a `busy` error.
pub(super) const MAX_CONNECTIONS: usize = 64;
/// How long the VMM waits for a client's request line before closing the connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long writing a (small, final) reply may block on a client that does not read.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A counted place among the [`MAX_CONNECTIONS`]; released on drop.
pub(super) struct ConnSlot(Arc<AtomicUsize>);

impl ConnSlot {
    pub(super) fn take(active: &Arc<AtomicUsize>) -> Option<Self> {
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

pub(super) fn error(kind: &str, message: impl Into<String>) -> Reply {
    Reply::Error {
        kind: kind.into(),
        message: message.into(),
    }
}

impl Vmm {
    pub(super) fn handle_conn(self: &Arc<Self>, conn: UnixStream) {
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
                    "malformed request: {e} (commands: status, save, migrate, cancel, pause, resume, self_check, shutdown; \
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
            Request::Resume {
                force_after_failed_migration,
            } => self.resume_checked(force_after_failed_migration),
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
            Request::Migrate(req) => {
                let _ = r.get_ref().set_read_timeout(None);
                // Writes its own final reply (the VMM ends after a successful one).
                return self.migrate(req, r.into_inner(), &w);
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
        // The record is held by a running save: its figures come after it.
        let tracking = match self.record.try_lock() {
            _ if !self.track_writes => {
                json!({"state": "off", "reason": super::save::TRACKING_OFF, "faults": 0})
            }
            Ok(r) => serde_json::to_value(r.status()).unwrap_or(Value::Null),
            Err(_) => json!({"state": "saving"}),
        };
        v["track_writes"] = json!(self.track_writes);
        if let Some(d) = tracking.get("dirty_bytes") {
            v["dirty_bytes"] = d.clone();
        }
        v["tracking"] = tracking;
        if let Some(m) = super::migrate::status_of(self) {
            v["migration"] = m;
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
}
