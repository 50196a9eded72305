//! The calling thread's part: encoded batches to the file as they arrive (fault batches first,
//! see `fault`), progress reports, and the end of a save: the checks that every block was saved,
//! trailer and commit while split huge pages are collapsed back, and the summary.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::fault::OUT_FAULT_CAP;
use super::staging::{Nice, YIELD_NICE};
use super::threads::watch_cancel;
use super::{
    blocks::{RELEASED, SAVED},
    lock, InjectPoint, SaveError, SaveOptions, SaveProgress, SaveSummary, Shared, PAGE_SIZE, POLL,
};
use crate::format::{FormatError, Identity, Totals};
use crate::writer::{SnapshotSink, SnapshotWriter};

/// How often the writer reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Report the save's progress as `w` has written it.
pub(super) fn report<S: SnapshotSink>(
    shared: &Shared<'_>,
    w: &SnapshotWriter<S>,
    total_pages: u64,
    progress: &(dyn Fn(&SaveProgress) + Sync),
) {
    let t = w.totals();
    progress(&SaveProgress {
        bytes_scanned: shared.bytes_scanned.load(Ordering::Relaxed),
        pages_saved: t.pages,
        zero_pages: t.zero_pages,
        faults_served: shared.faults_served.load(Ordering::Relaxed),
        bytes_written: w.bytes_written(),
        total_pages,
    })
}

/// The writer: records in arrival order (fault batches first), progress every
/// [`PROGRESS_EVERY`], until every worker is done or the save stops.
pub(super) fn write_batches<S: SnapshotSink>(
    shared: &Shared<'_>,
    writer: &mut SnapshotWriter<S>,
    workers: usize,
    total_pages: u64,
    progress: &(dyn Fn(&SaveProgress) + Sync),
) {
    let mut last = Instant::now();
    let mut batches: u64 = 0;
    let mut nice = Nice::new();
    loop {
        nice.set_if(shared.copy_first(), Some(YIELD_NICE));
        if shared.stopped() {
            break;
        }
        match shared.recv_batch(POLL) {
            Ok(Some(batch)) => {
                if let Some(InjectPoint::WriteError { after_batches }) = shared.inject {
                    if batches >= after_batches {
                        let e = io::Error::other("injected write error");
                        shared.abort(SaveError::Write(FormatError::Unwritable(e)));
                        break;
                    }
                }
                if let Err(e) = writer.write_batch(&batch) {
                    shared.abort(SaveError::Write(e));
                    break;
                }
                batches += 1;
                let mut spare = lock(&shared.spare_batches);
                // Keep every batch ever made (a bounded number): dropping and regrowing
                // 2 MiB buffers means munmap/mremap, which take the mmap lock that fault
                // handling and release need.
                if spare.len() < OUT_FAULT_CAP + shared.scan_queue_cap + workers {
                    spare.push(batch);
                }
            }
            Err(()) => {}
            Ok(None) => break,
        }
        if last.elapsed() >= PROGRESS_EVERY {
            report(shared, writer, total_pages, progress);
            last = Instant::now();
        }
    }
}

/// After the saver threads are joined: the save's error if any, else check that every block
/// was released and every page written, and commit the file (trailer, footer, sync) while the
/// huge pages faults split are collapsed back. Returns the totals, the file's identity and the
/// seconds the collapse took.
pub(super) fn finish<S: SnapshotSink>(
    shared: &Shared<'_>,
    writer: SnapshotWriter<S>,
    opts: &SaveOptions,
    total_pages: u64,
    cancel: &AtomicBool,
) -> Result<(Totals, Identity, f64), SaveError> {
    // Nothing is protected any more (every block released, or `abort` released everything).
    // Huge pages are collapsed back while the file is flushed and synced (CPU vs. I/O).
    let restore = |shared: &Shared<'_>| {
        let t = Instant::now();
        if opts.restore_huge_pages {
            shared.restore_huge_pages();
        }
        t.elapsed().as_secs_f64()
    };
    let failed = lock(&shared.error).is_some() || cancel.load(Ordering::Relaxed);
    if failed {
        restore(shared);
    }
    if let Some(e) = lock(&shared.error).take() {
        return Err(e);
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(SaveError::Cancelled);
    }
    let done = |st: u8| st == RELEASED || (shared.keep_protected && st == SAVED);
    if let Some(i) = (0..shared.blocks.n_blocks())
        .find(|&i| !done(shared.blocks.state[i].load(Ordering::Acquire)))
    {
        return Err(SaveError::Internal(format!(
            "block at {:#x} was never released",
            shared.blocks.block(i).gpa
        )));
    }
    let totals = writer.totals();
    if totals.pages != total_pages {
        return Err(SaveError::Internal(format!(
            "{} pages written, guest has {total_pages}",
            totals.pages
        )));
    }
    // The guest is free by now; a cancel during the final writes and sync only has to stop
    // waiting for the output.
    let finish_done = AtomicBool::new(false);
    let (finished, huge_restore_secs) = thread::scope(|s| {
        let watcher = shared.abandon.as_ref().and_then(|flag| {
            thread::Builder::new()
                .name("saver-cancel".into())
                .spawn_scoped(s, || {
                    watch_cancel(
                        cancel,
                        || finish_done.load(Ordering::Acquire),
                        || flag.store(true, Ordering::Release),
                    )
                })
                .ok()
        });
        let h = thread::Builder::new()
            .name("saver-collapse".into())
            .spawn_scoped(s, || restore(shared));
        let f = writer.finish_identity();
        finish_done.store(true, Ordering::Release);
        if let Some(w) = &watcher {
            w.thread().unpark();
        }
        let secs = match h {
            Ok(h) => h.join().unwrap_or(0.0),
            Err(_) => restore(shared),
        };
        (f, secs)
    });
    let identity = finished.map_err(|e| {
        if cancel.load(Ordering::Acquire) {
            SaveError::Cancelled
        } else {
            SaveError::Write(e)
        }
    })?;
    Ok((totals, identity, huge_restore_secs))
}

/// The summary of a successful save.
pub(super) fn summary(
    shared: &Shared<'_>,
    started: Instant,
    totals: Totals,
    identity: Identity,
    huge_restore_secs: f64,
) -> SaveSummary {
    let file_bytes = identity.file_len;
    let fp = {
        let g = lock(&shared.fault_pool.state);
        (g.waits, g.wait_max_us)
    };

    let mut lat = std::mem::take(&mut *lock(&shared.latencies_us));
    lat.sort_unstable();
    let pct = |p: usize| {
        if lat.is_empty() {
            0
        } else {
            lat[(lat.len() * p / 100).min(lat.len() - 1)]
        }
    };
    let raw_nonzero_bytes = totals.data_pages * PAGE_SIZE as u64;
    SaveSummary {
        duration_secs: started.elapsed().as_secs_f64(),
        pages_saved: totals.pages,
        zero_pages: totals.zero_pages,
        data_pages: totals.data_pages,
        parent_pages: totals.parent_pages,
        pages_compared: shared.pages_compared.load(Ordering::Relaxed),
        pages_unchanged: shared.pages_unchanged.load(Ordering::Relaxed),
        identity,
        faults_served: shared.faults_served.load(Ordering::Relaxed),
        fault_latency_p50_us: pct(50),
        fault_latency_p99_us: pct(99),
        fault_latency_max_us: lat.last().copied().unwrap_or(0),
        fault_latency_total_us: lat.iter().sum(),
        fault_phases: *lock(&shared.phases),
        staging: shared.staging_figures(),
        file_bytes,
        raw_nonzero_bytes,
        image_size_ratio: file_bytes as f64 / raw_nonzero_bytes.max(1) as f64,
        records: totals.records,
        fault_block_size: shared.blocks.fault_block,
        huge_pages_restored: shared.huge_restored.load(Ordering::Relaxed),
        huge_restore_secs,
        fault_buffer_waits: fp.0,
        fault_buffer_wait_max_us: fp.1,
        released: if shared.keep_protected {
            shared.released_ranges()
        } else {
            Vec::new()
        },
    }
}
