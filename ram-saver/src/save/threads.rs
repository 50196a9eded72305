//! Saver threads: starting them, and the guards that turn any failure or panic into an abort
//! that frees the guest at once.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use wp_tracker::WpTracker;

use super::{output, SaveError, SaveOptions, SaveProgress, Shared};
use crate::writer::{SnapshotSink, SnapshotWriter};

/// How often the watcher looks at the caller's cancel flag: a cancel frees the guest within
/// this, plus one unprotect call.
const CANCEL_POLL: Duration = Duration::from_millis(5);

/// Unprotects every range when dropped armed: the guest must never stay write-protected.
pub(super) struct ReleaseGuard<'a> {
    tracker: &'a WpTracker,
    armed: bool,
}

impl<'a> ReleaseGuard<'a> {
    /// Armed from the start: RAM is already protected when a save begins.
    pub(super) fn new(tracker: &'a WpTracker) -> Self {
        ReleaseGuard {
            tracker,
            armed: true,
        }
    }

    /// The save succeeded: every block was released one by one.
    pub(super) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ReleaseGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tracker.unprotect_all();
        }
    }
}

/// Turns a panic of the thread holding it into an abort of the whole save.
struct PanicAbort<'s, 'a> {
    shared: &'s Shared<'a>,
    name: &'static str,
}

impl Drop for PanicAbort<'_, '_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.shared.abort(SaveError::ThreadPanicked(self.name));
        }
    }
}

/// Marks a compression worker finished when dropped, also on panic, so the writer never waits
/// forever.
struct WorkerDone<'s, 'a>(&'s Shared<'a>);

impl Drop for WorkerDone<'_, '_> {
    fn drop(&mut self) {
        self.0.worker_done();
    }
}

/// Marks a producer finished when dropped, also on panic, so workers never wait forever.
struct ProducerDone<'s, 'a>(&'s Shared<'a>);

impl Drop for ProducerDone<'_, '_> {
    fn drop(&mut self) {
        self.0.producer_done();
    }
}

/// Until `done()`: as soon as `cancel` is set, call `on_cancel` (once). The caller unparks the
/// thread after `done()` turns true, so it ends without waiting out its poll.
pub(super) fn watch_cancel(cancel: &AtomicBool, done: impl Fn() -> bool, on_cancel: impl FnOnce()) {
    while !done() {
        if cancel.load(Ordering::Acquire) {
            on_cancel();
            return;
        }
        thread::park_timeout(CANCEL_POLL);
    }
}

/// Start a named saver thread, at nice value `nice` if given, whose error or panic aborts the
/// save.
fn spawn_saver<'scope, 'env, F>(
    s: &'scope thread::Scope<'scope, 'env>,
    shared: &'env Shared<'env>,
    name: &'static str,
    nice: Option<i32>,
    f: F,
) -> io::Result<thread::ScopedJoinHandle<'scope, ()>>
where
    F: FnOnce() -> Result<(), SaveError> + Send + 'scope,
{
    thread::Builder::new()
        .name(format!("saver-{name}"))
        .spawn_scoped(s, move || {
            if let Some(n) = nice {
                // Best effort: raising priority needs CAP_SYS_NICE; the save works without.
                let _ = uffd_sys::host::set_thread_nice(n);
            }
            let _p = PanicAbort { shared, name };
            if let Err(e) = f() {
                shared.abort(e);
            }
        })
}

/// Run the save's threads: the cancel watcher, the fault thread, the scanner and the
/// compression workers, while the calling thread writes their output to `writer`, then finish
/// the file ([`output::finish`]); returns once every thread is joined (the save is complete,
/// failed or cancelled). With [`SaveOptions::keep_protected`] the fault thread serves until the
/// file is finished and reads nothing after that.
pub(super) fn run<S: SnapshotSink>(
    shared: &Shared<'_>,
    mut writer: SnapshotWriter<S>,
    opts: &SaveOptions,
    total_pages: u64,
    progress: &(dyn Fn(&SaveProgress) + Sync),
    cancel: &AtomicBool,
) -> Result<(crate::format::Totals, crate::format::Identity, f64), SaveError> {
    let workers = opts.workers.max(1);
    let writer_done = AtomicBool::new(false);
    let writer_done = &writer_done;
    thread::scope(|s| {
        let _main_panic = PanicAbort {
            shared,
            name: "writer",
        };
        let mut handles = Vec::new();
        let mut fault_handle = None;
        let mut spawn_err = None;
        let bw = opts.max_bandwidth;
        let c = opts.compression;
        // Not on the writer: it may be stuck on the output while guest writes wait for it.
        let watcher = spawn_saver(s, shared, "cancel", None, move || {
            watch_cancel(
                cancel,
                || writer_done.load(Ordering::Acquire) || shared.stopped(),
                || shared.abort(SaveError::Cancelled),
            );
            Ok(())
        });
        let watcher_thread = watcher.as_ref().ok().map(|h| h.thread().clone());
        match spawn_saver(s, shared, "fault", opts.fault_nice, move || {
            {
                let _d = ProducerDone(shared);
                shared.fault_loop(opts.fault_nice)?;
            }
            // Every sub-block is saved; saved memory stays protected: serve its writes (release
            // only) until the file is committed.
            if shared.keep_protected {
                shared.serve_releases()?;
            }
            Ok(())
        }) {
            Ok(h) => fault_handle = Some(h),
            Err(e) => spawn_err = Some(e),
        }
        let started_threads = [
            watcher,
            spawn_saver(s, shared, "scanner", opts.bulk_nice, move || {
                let _d = ProducerDone(shared);
                shared.scan_loop(bw)
            }),
        ];
        for r in started_threads {
            match r {
                Ok(h) => handles.push(h),
                Err(e) => spawn_err = Some(e),
            }
        }
        for _ in 0..workers {
            match spawn_saver(s, shared, "compression", opts.bulk_nice, move || {
                let _d = WorkerDone(shared);
                shared.worker_loop(c)
            }) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shared.worker_done();
                    spawn_err = Some(e)
                }
            }
        }
        if let Some(e) = spawn_err {
            shared.abort(SaveError::Internal(format!(
                "cannot start saver thread: {e}"
            )));
        }

        output::write_batches(shared, &mut writer, workers, total_pages, progress);
        shared.writer_gone();
        writer_done.store(true, Ordering::Release);
        if let Some(t) = watcher_thread {
            t.unpark();
        }
        for h in handles {
            // Panics were turned into aborts by PanicAbort; the payload adds nothing.
            let _ = h.join();
        }
        output::report(shared, &writer, total_pages, progress);
        if !shared.keep_protected {
            if let Some(h) = fault_handle.take() {
                let _ = h.join();
            }
        }
        let r = output::finish(shared, writer, opts, total_pages, cancel);
        shared.serve_until.store(true, Ordering::Release);
        if let Some(h) = fault_handle {
            let _ = h.join();
        }
        r
    })
}
