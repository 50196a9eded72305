//! The live save engine: a linear scan and a fault thread race for blocks of write-protected
//! guest RAM; each block is copied exactly once while still protected, released in one call,
//! then compressed and written elsewhere.
//!
//! Threads (all scoped, borrowing guest memory and the tracker):
//! - fault thread (`fault`), with a helper for the faults of a batch it has not reached: reads
//!   write faults, claims the faulting sub-block, copies it to staging, unprotects it (waking the
//!   vCPU) and queues it ahead of scan output. No compression, no I/O. `fault` also holds the
//!   whole fault-priority policy: what a fault copies, when the scanner yields to faults, and
//!   how fault data goes first to the output.
//! - scanner (`scan`): walks units ([`SaveOptions::block_size`], 2 MiB) in address order, claims
//!   every sub-block still protected, skips the copy for units the kernel says hold no page,
//!   copies, releases each run of claimed sub-blocks in one call, queues; throttled by
//!   `max_bandwidth`. While the guest writes it stages in growable fault staging (`staging`).
//! - compression workers (`encode`): turn staged runs into zero runs and (compressed) data
//!   records; fault work always goes first.
//! - the calling thread (`output`): writes encoded batches, fault batches first, reports
//!   progress, finishes the file; huge pages that faults split are collapsed back meanwhile
//!   (`huge`).
//!
//! Sub-block states (`blocks`) only move forward: PROTECTED → CLAIMED (one thread copies) →
//! RELEASED. Staging buffers (`staging`) are reused; fault staging grows while the guest writes,
//! up to a cap. Whatever goes wrong, the release guard and `abort` (`threads`) unprotect every
//! range.
//!
//! # Saves that leave saved memory protected, and incremental saves
//! With [`SaveOptions::keep_protected`] (write tracking goes on after the save) the scanner leaves
//! what it saved write-protected and only the guest's writes release memory (`blocks` has the
//! states); the fault thread serves until the file is committed and then stops reading, so
//! whoever tracks writes next takes over the queued faults; the summary lists what was released
//! ([`SaveSummary::released`]). With [`SaveOptions::increment`] as well, only sub-blocks touching
//! the increment are stored; every other sub-block is the parent's (a Parent run in address
//! order, emitted by the scanner), and a fault on one only releases it. With
//! [`SaveOptions::page_hashes`] the compression workers hash every page they encode; in an
//! incremental save a page whose hash equals the table's (unchanged since the parent's freeze,
//! or rewritten with equal content) becomes a Parent run instead of data, merged with the
//! equal pages around it in its staged run.
//!
//! Why each number is what it is (unit sizes, pools, priorities, workers) is measured in
//! `docs/PERFORMANCE.md`, with the commands that measure it.
//!
//! # Cancel and failures never wait for the output
//! Once fault staging is at its cap, every guest write waits for the writer, and the writer may wait
//! for a disk that does not answer (a hung NFS or FUSE mount, a dying disk): a write stuck in
//! the kernel cannot be interrupted. So nothing that frees the guest runs on the writer: a
//! watcher thread polls `cancel` every few milliseconds and aborts, and `abort` (from whichever
//! thread fails) unprotects all guest RAM at once, then abandons the output
//! ([`SnapshotSink::abandon_flag`]): the writer stops waiting for the I/O thread, every saver
//! thread sees the stop within [`POLL`], and a file sink leaves its stuck write and the removal
//! of its temporary to detached threads after a bounded wait (200 ms each). The guest is free
//! within milliseconds of the cancel; `live_save` returns `Cancelled` within about half a
//! second even while the disk hangs. Sinks without an abandon flag (streams) still free the
//! guest at once, but `live_save` returns only when their blocked write does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wp_tracker::{WpError, WpTracker};

use crate::format::{FormatError, Identity, MemRegion, SnapshotHeader};
use crate::hashes::PageHashes;
use crate::writer::{EncodedBatch, SnapshotSink, SnapshotWriter};

mod blocks;
mod encode;
mod fault;
mod huge;
mod options;
mod output;
mod scan;
mod staging;
mod threads;

use blocks::BlockMap;
pub use fault::FaultPhases;
pub use options::{InjectPoint, SaveOptions};
use staging::Pool;
pub use staging::{
    default_max_staging, host_available_memory, host_total_memory, Staging, StagingFigures,
};
use threads::ReleaseGuard;

/// Guest page size used by the saver.
const PAGE_SIZE: usize = 4096;
/// How often blocked loops look at the stop flag, and how long the fault thread waits.
const POLL: Duration = Duration::from_millis(10);

/// Progress of a live save, reported about every 100 ms.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct SaveProgress {
    /// Guest bytes processed by scan or fault (copied or known empty).
    pub bytes_scanned: u64,
    /// Pages written to the file.
    pub pages_saved: u64,
    /// Of which zero pages.
    pub zero_pages: u64,
    /// Faults served by the fault thread (blocks it copied).
    pub faults_served: u64,
    /// Bytes written to the output.
    pub bytes_written: u64,
    /// Guest pages in total.
    pub total_pages: u64,
}

/// Outcome of a successful live save.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SaveSummary {
    /// Wall time of the save in seconds.
    pub duration_secs: f64,
    /// Pages saved (all guest pages).
    pub pages_saved: u64,
    /// Pages stored as zero runs.
    pub zero_pages: u64,
    /// Pages stored as data.
    pub data_pages: u64,
    /// Pages left to the parent (Parent records; 0 without a parent reference).
    pub parent_pages: u64,
    /// With [`SaveOptions::page_hashes`] and `increment`: pages of written sub-blocks whose
    /// hash was compared with the table's.
    pub pages_compared: u64,
    /// Of those, pages found unchanged (equal hash): left to the parent, not stored.
    pub pages_unchanged: u64,
    /// The written file's identity: what a child of it names it by.
    pub identity: Identity,
    /// Blocks copied by the fault thread.
    pub faults_served: u64,
    /// Fault service latency (fault read → release), median, µs.
    pub fault_latency_p50_us: u64,
    /// Fault service latency, 99th percentile, µs.
    pub fault_latency_p99_us: u64,
    /// Fault service latency, maximum, µs.
    pub fault_latency_max_us: u64,
    /// Fault service latency summed over every fault, µs.
    pub fault_latency_total_us: u64,
    /// Where the fault thread's time went, phase by phase.
    pub fault_phases: FaultPhases,
    /// Staging memory: cap, peak, waits.
    pub staging: StagingFigures,
    /// Size of the snapshot file.
    pub file_bytes: u64,
    /// Bytes of non-zero guest pages.
    pub raw_nonzero_bytes: u64,
    /// File bytes / non-zero guest RAM bytes.
    pub image_size_ratio: f64,
    /// RAM records written.
    pub records: u64,
    /// Unit of the fault thread's copy and release, in bytes.
    pub fault_block_size: usize,
    /// Huge pages split by 4 KiB releases and collapsed back (MADV_COLLAPSE) after saving.
    pub huge_pages_restored: u64,
    /// Wall time of restoring huge pages, in seconds (overlaps the final flush and fsync).
    pub huge_restore_secs: f64,
    /// Faults that had to wait for a fault staging buffer (staging was at its cap); also in
    /// `staging`.
    pub fault_buffer_waits: u64,
    /// Longest such wait, µs.
    pub fault_buffer_wait_max_us: u64,
    /// With [`SaveOptions::keep_protected`]: the host ranges released because they were written
    /// since the freeze (everything else is still write-protected), merged, in address order.
    #[serde(skip)]
    pub released: Vec<wp_tracker::HostRange>,
}

/// Errors of [`live_save`]. Whatever the error, guest RAM is left unprotected.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The save was cancelled.
    #[error("save cancelled")]
    Cancelled,
    /// The options are unusable.
    #[error("invalid save options: {0}")]
    InvalidOptions(String),
    /// Writing the snapshot failed.
    #[error("writing the snapshot failed")]
    Write(#[source] FormatError),
    /// The write-protect tracker failed.
    #[error("write-protect tracking failed")]
    Tracker(#[source] WpError),
    /// Guest memory could not be read.
    #[error("guest memory at {gpa:#x} could not be read: {what}")]
    Memory {
        /// Guest physical address.
        gpa: u64,
        /// The underlying error.
        what: String,
    },
    /// A saver thread panicked.
    #[error("the {0} thread panicked")]
    ThreadPanicked(&'static str),
    /// An internal invariant did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A run of claimed sub-blocks staged at `off` in a buffer.
#[derive(Debug, Clone, Copy)]
struct Run {
    first_page: u64,
    off: usize,
    len: usize,
}

/// Staged runs or a known-empty run on their way to a compression worker.
#[derive(Debug)]
enum Work {
    Data {
        buf: staging::Buf,
        runs: Vec<Run>,
        /// The buffer belongs to the fault pool.
        fault: bool,
        /// The guest wrote these pages during the save (the fault path copied them): hot in the
        /// index. Units the scanner stages in the fault pool are not.
        hot: bool,
    },
    Zero {
        first_page: u64,
        pages: u64,
    },
    /// Pages the parent holds (an incremental save).
    Parent {
        first_page: u64,
        pages: u64,
    },
}

/// Encoded batches waiting for the writer, by kind (see `fault` for the priority).
#[derive(Debug, Default)]
struct OutQueues {
    fault: VecDeque<EncodedBatch>,
    scan: VecDeque<EncodedBatch>,
    workers_left: usize,
    writer_gone: bool,
}

/// Work waiting for the compression workers, by kind (see `fault` for the priority).
#[derive(Debug, Default)]
struct Queues {
    fault: VecDeque<Work>,
    scan: VecDeque<Work>,
    producers_done: usize,
}

/// Everything the saver threads share.
struct Shared<'a> {
    tracker: &'a WpTracker,
    blocks: BlockMap,
    stop: AtomicBool,
    /// The sink's [`SnapshotSink::abandon_flag`], set by `abort` after the guest is released.
    abandon: Option<Arc<AtomicBool>>,
    error: Mutex<Option<SaveError>>,
    scan_pool: Pool,
    fault_pool: Pool,
    queues: Mutex<Queues>,
    /// Workers wait here for work.
    work_cv: Condvar,
    /// The scanner waits here for room in its queue (or for the fault pool to drain).
    space_cv: Condvar,
    /// Encoded batches on their way to the writer, fault batches first.
    out: Mutex<OutQueues>,
    out_cv: Condvar,
    /// Bytes left to store raw without trying zstd (adaptive compression), for scan data and
    /// for fault data (what the guest writes now may compress differently from the rest).
    raw_skip: [AtomicU64; 2],
    scan_queue_cap: usize,
    spare_batches: Mutex<Vec<EncodedBatch>>,
    scan_done: AtomicBool,
    released: AtomicUsize,
    bytes_scanned: AtomicU64,
    faults_served: AtomicU64,
    huge_restored: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    /// Phase times of the fault thread.
    phases: Mutex<FaultPhases>,
    /// Faults the fault thread hands to its helper.
    handoff: fault::Handoff,
    /// When the save started, and the last fault (µs after it; 0: none yet).
    started: Instant,
    last_fault_us: AtomicU64,
    /// Units the scanner staged in fault staging.
    scan_units_staged: AtomicU64,
    /// Units the scanner has reached.
    scan_pos: AtomicUsize,
    spin: bool,
    /// The fault thread's nice value (`None`: unchanged); the scanner's while copy and release
    /// come first.
    fault_nice: Option<i32>,
    /// How long preparing staging took before the freeze, ms.
    prepare_ms: f64,
    /// The staging probe's units written and ms watched ([`Staging::probe`]).
    probe: (u64, f64),
    /// Leave saved sub-blocks protected ([`SaveOptions::keep_protected`]).
    keep_protected: bool,
    /// With `keep_protected`: the fault thread serves until this is set (after the file is
    /// committed), so guest writes never wait for the final flush.
    serve_until: AtomicBool,
    /// [`SaveOptions::page_hashes`].
    hashes: Option<Arc<PageHashes>>,
    /// Compare stored pages with `hashes` (an incremental save) and inherit equal ones.
    compare: bool,
    pages_compared: AtomicU64,
    pages_unchanged: AtomicU64,
    inject: Option<InjectPoint>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking saver thread aborts the save anyway; the data stays usable for cleanup.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<'a> Shared<'a> {
    /// The state of a save with `opts` and `workers` compression workers.
    fn new(
        tracker: &'a WpTracker,
        blocks: BlockMap,
        abandon: Option<Arc<AtomicBool>>,
        (scan_pool, fault_pool): (Pool, Pool),
        workers: usize,
        opts: &SaveOptions,
    ) -> Self {
        Shared {
            tracker,
            blocks,
            stop: AtomicBool::new(false),
            abandon,
            error: Mutex::new(None),
            scan_pool,
            fault_pool,
            queues: Mutex::new(Queues::default()),
            work_cv: Condvar::new(),
            space_cv: Condvar::new(),
            out: Mutex::new(OutQueues {
                workers_left: workers,
                ..OutQueues::default()
            }),
            out_cv: Condvar::new(),
            raw_skip: [AtomicU64::new(0), AtomicU64::new(0)],
            scan_queue_cap: workers * 2 + 2,
            spare_batches: Mutex::new(Vec::new()),
            scan_done: AtomicBool::new(false),
            released: AtomicUsize::new(0),
            bytes_scanned: AtomicU64::new(0),
            faults_served: AtomicU64::new(0),
            huge_restored: AtomicU64::new(0),
            latencies_us: Mutex::new(Vec::new()),
            phases: Mutex::new(FaultPhases::default()),
            handoff: fault::Handoff::default(),
            started: Instant::now(),
            last_fault_us: AtomicU64::new(0),
            scan_units_staged: AtomicU64::new(0),
            scan_pos: AtomicUsize::new(0),
            spin: opts.fault_spin.unwrap_or(fault::DEFAULT_SPIN),
            fault_nice: opts.fault_nice,
            prepare_ms: opts.staging.prepare_ms(),
            probe: opts.staging.probe(),
            keep_protected: opts.keep_protected,
            serve_until: AtomicBool::new(false),
            hashes: opts.page_hashes.clone(),
            compare: opts.increment.is_some(),
            pages_compared: AtomicU64::new(0),
            pages_unchanged: AtomicU64::new(0),
            inject: opts.inject_failure,
        }
    }
}

impl Shared<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Record the first error, stop every thread, release the guest right away, then abandon
    /// the output so that a writer stuck on it gives up.
    fn abort(&self, e: SaveError) {
        {
            let mut g = lock(&self.error);
            if g.is_none() {
                *g = Some(e);
            }
        }
        self.stop.store(true, Ordering::Release);
        let _ = self.tracker.unprotect_all();
        if let Some(a) = &self.abandon {
            a.store(true, Ordering::Release);
        }
        for p in [&self.scan_pool, &self.fault_pool] {
            p.cv.notify_all();
        }
        self.work_cv.notify_all();
        self.space_cv.notify_all();
        self.out_cv.notify_all();
    }

    /// Queue scan work, waiting while the scan queue is full.
    fn push_scan_work(&self, w: Work) {
        let mut q = lock(&self.queues);
        while q.scan.len() >= self.scan_queue_cap && !self.stopped() {
            if self.copy_first() {
                // The output yields to copying now: the scan queue would hold the scanner up
                // for as long as faults come. The fault queue never makes it wait (what is in
                // flight is bounded by staging).
                q.fault.push_back(w);
                drop(q);
                self.work_cv.notify_one();
                return;
            }
            q = self
                .space_cv
                .wait_timeout(q, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
        q.scan.push_back(w);
        drop(q);
        self.work_cv.notify_one();
    }

    fn producer_done(&self) {
        lock(&self.queues).producers_done += 1;
        self.work_cv.notify_all();
    }

    fn worker_done(&self) {
        lock(&self.out).workers_left -= 1;
        self.out_cv.notify_all();
    }

    /// The writer stopped taking batches: workers waiting to send give up.
    fn writer_gone(&self) {
        lock(&self.out).writer_gone = true;
        self.out_cv.notify_all();
    }
}

/// Save the RAM of a running guest to `sink`.
///
/// Precondition: vCPUs were paused, the machine state captured (`machine_state`), all guest RAM
/// (registered with `tracker`) write-protected with `protect_all`, and vCPUs resumed. The
/// header's `page_size`, `regions` and `compression` are set from `mem` and `opts`.
///
/// On success every block was copied once and released (with [`SaveOptions::keep_protected`]:
/// every block the guest did not write since the freeze is still protected, and the caller must
/// serve its faults), and the file is complete. On any
/// error, cancel (`cancel` set) or panic in a saver thread, all guest RAM is unprotected at once
/// (a cancel within a few ms), whatever the output is doing, and the sink is abandoned and
/// dropped unfinished (a file sink removes its temporary file); see the module docs for how
/// long the return takes while the output hangs. A cancel that comes after the file was
/// committed is too late: the save succeeds.
#[allow(clippy::too_many_arguments)]
pub fn live_save<S: SnapshotSink>(
    mem: &GuestMemoryMmap,
    tracker: &WpTracker,
    sink: S,
    mut header: SnapshotHeader,
    machine_state: &[u8],
    opts: &SaveOptions,
    progress: &(dyn Fn(&SaveProgress) + Sync),
    cancel: &AtomicBool,
) -> Result<SaveSummary, SaveError> {
    let mut guard = ReleaseGuard::new(tracker);
    let started = Instant::now();
    check_options(opts)?;
    let workers = opts.workers.max(1);
    header.page_size = PAGE_SIZE as u32;
    header.compression = opts.compression;
    header.regions = mem
        .iter()
        .map(|r| MemRegion {
            gpa: r.start_addr().0,
            size: r.len(),
        })
        .collect();
    let total_pages = header.total_pages();
    if let Some(h) = &opts.page_hashes {
        if !h.matches(&header.regions) {
            return Err(SaveError::InvalidOptions(
                "the page-hash table does not cover the guest memory's regions".into(),
            ));
        }
    }
    let huge = huge::huge_ranges(mem);
    let fault_block = fault::fault_block_size(mem, opts, &huge)?;
    let mut blocks = BlockMap::new(mem, opts.block_size, fault_block)?;
    if fault_block < opts.block_size {
        blocks.find_huge(&huge);
    }
    let inherited = match &opts.increment {
        Some(inc) => blocks.inherit_outside(inc),
        None => 0,
    };
    let abandon = sink.abandon_flag();
    let writer = SnapshotWriter::new(sink, &header, machine_state).map_err(SaveError::Write)?;
    let pools = staging::pools(opts, fault_block, total_pages as usize * PAGE_SIZE);
    let shared = Shared::new(tracker, blocks, abandon, pools, workers, opts);
    shared.released.store(inherited, Ordering::Release);

    let (totals, identity, huge_restore_secs) =
        threads::run(&shared, writer, opts, total_pages, progress, cancel)?;
    guard.disarm();
    Ok(output::summary(
        &shared,
        started,
        totals,
        identity,
        huge_restore_secs,
    ))
}

/// Refuse options that cannot save.
fn check_options(opts: &SaveOptions) -> Result<(), SaveError> {
    if opts.max_bandwidth == Some(0) {
        return Err(SaveError::InvalidOptions(
            "max_bandwidth 0 would never finish the scan (and keep pages protected)".into(),
        ));
    }
    if opts.max_staging == Some(0) {
        return Err(SaveError::InvalidOptions(
            "max_staging 0 leaves no memory to copy a faulting page into".into(),
        ));
    }
    if opts.increment.is_some() && !opts.keep_protected {
        return Err(SaveError::InvalidOptions(
            "an incremental save (increment) needs keep_protected".into(),
        ));
    }
    if opts.block_size == 0 || !opts.block_size.is_multiple_of(PAGE_SIZE) {
        return Err(SaveError::InvalidOptions(format!(
            "block size {} is not a multiple of {PAGE_SIZE}",
            opts.block_size
        )));
    }
    Ok(())
}
