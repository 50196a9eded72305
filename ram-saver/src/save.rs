//! The live save engine: a linear scan and a fault thread race for blocks of write-protected
//! guest RAM; each block is copied exactly once while still protected, released in one call,
//! then compressed and written elsewhere.
//!
//! Threads (all scoped, borrowing guest memory and the tracker):
//! - fault thread: reads write faults, claims the faulting block, copies it to staging,
//!   unprotects it (waking the vCPU) and queues it ahead of scan output. No compression, no I/O.
//! - scanner: walks blocks in address order, claims those still protected, skips the copy for
//!   blocks the kernel says hold no page, copies, unprotects, queues; throttled by
//!   `max_bandwidth`.
//! - compression workers: turn staged blocks into zero runs and (compressed) data records.
//! - the calling thread: writes records in arrival order, reports progress, finishes the file.
//!
//! Block states only move forward: PROTECTED → CLAIMED (one thread copies) → RELEASED.
//! Whatever goes wrong, [`ReleaseGuard`] and `abort` unprotect every range.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wp_tracker::{HostRange, WpError, WpTracker};

use crate::format::{Compression, FormatError, MemRegion, SnapshotHeader};
use crate::pagemap::Pagemap;
use crate::writer::{EncodedBatch, RecordEncoder, SnapshotSink, SnapshotWriter};

/// Guest page size used by the saver.
const PAGE_SIZE: usize = 4096;
const PROTECTED: u8 = 0;
const CLAIMED: u8 = 1;
const RELEASED: u8 = 2;
/// Staging memory budget (bounded independent of guest size): a burst of faults right after
/// the freeze instant should find buffers without waiting for compression.
const STAGING_BYTES: usize = 64 << 20;
/// At most this many staging buffers (tiny blocks).
const MAX_BUFFERS: usize = 1024;
/// How often blocked loops look at the stop flag, and how long the fault thread waits.
const POLL: Duration = Duration::from_millis(10);
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Options of [`live_save`].
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Record compression.
    pub compression: Compression,
    /// Limit of the scan in bytes copied per second (faulted blocks are never throttled).
    pub max_bandwidth: Option<u64>,
    /// Unit of copy and release in bytes, a multiple of 4 KiB (default 2 MiB).
    pub block_size: usize,
    /// Compression threads (default: the number of cores).
    pub workers: usize,
    /// Test-only failure injection.
    #[doc(hidden)]
    pub inject_failure: Option<InjectPoint>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            compression: Compression::None,
            max_bandwidth: None,
            block_size: 2 << 20,
            workers: thread::available_parallelism().map_or(1, |n| n.get()),
            inject_failure: None,
        }
    }
}

/// Where a test makes the saver fail.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectPoint {
    /// The scanner panics after this many blocks.
    ScannerPanic {
        /// Blocks scanned first.
        after_blocks: usize,
    },
    /// The fault thread panics when it serves its first fault.
    FaultPanic,
    /// A compression worker panics on its first block.
    WorkerPanic,
    /// The writer fails with an I/O error after this many batches.
    WriteError {
        /// Batches written first.
        after_batches: u64,
    },
}

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
    /// Blocks copied by the fault thread.
    pub faults_served: u64,
    /// Fault service latency (fault read → release), median, µs.
    pub fault_latency_p50_us: u64,
    /// Fault service latency, 99th percentile, µs.
    pub fault_latency_p99_us: u64,
    /// Fault service latency, maximum, µs.
    pub fault_latency_max_us: u64,
    /// Size of the snapshot file.
    pub file_bytes: u64,
    /// Bytes of non-zero guest pages.
    pub raw_nonzero_bytes: u64,
    /// File bytes / non-zero guest RAM bytes.
    pub image_size_ratio: f64,
    /// RAM records written.
    pub records: u64,
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

/// One block of guest memory: the unit of copy and release.
#[derive(Debug, Clone, Copy)]
struct Block {
    gpa: u64,
    host: usize,
    len: usize,
}

/// All blocks, their states, and host address lookup.
#[derive(Debug)]
struct BlockMap {
    blocks: Vec<Block>,
    state: Vec<AtomicU8>,
    /// (host start, host len, first block), sorted by host start.
    by_host: Vec<(usize, usize, usize)>,
    block_size: usize,
}

impl BlockMap {
    fn new(mem: &GuestMemoryMmap, block_size: usize) -> Result<Self, SaveError> {
        let mut blocks = Vec::new();
        let mut by_host = Vec::new();
        for r in mem.iter() {
            let gpa = r.start_addr().0;
            let len = usize::try_from(r.len())
                .map_err(|_| SaveError::InvalidOptions("region too large".into()))?;
            let host = mem
                .get_host_address(GuestAddress(gpa))
                .map_err(|e| SaveError::Memory {
                    gpa,
                    what: e.to_string(),
                })? as usize;
            if len % PAGE_SIZE != 0 || gpa % PAGE_SIZE as u64 != 0 {
                return Err(SaveError::InvalidOptions(format!(
                    "region at {gpa:#x} is not page aligned"
                )));
            }
            by_host.push((host, len, blocks.len()));
            let mut off = 0;
            while off < len {
                let n = block_size.min(len - off);
                blocks.push(Block {
                    gpa: gpa + off as u64,
                    host: host + off,
                    len: n,
                });
                off += n;
            }
        }
        by_host.sort_unstable();
        let state = blocks.iter().map(|_| AtomicU8::new(PROTECTED)).collect();
        Ok(BlockMap {
            blocks,
            state,
            by_host,
            block_size,
        })
    }

    fn find(&self, addr: usize) -> Option<usize> {
        let i = self
            .by_host
            .partition_point(|r| r.0 <= addr)
            .checked_sub(1)?;
        let (start, len, first) = self.by_host[i];
        (addr < start + len).then(|| first + (addr - start) / self.block_size)
    }

    fn claim(&self, b: usize) -> Result<(), u8> {
        self.state[b]
            .compare_exchange(PROTECTED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
    }
}

/// A staged block or a known-empty block on its way to a compression worker.
#[derive(Debug)]
enum Work {
    Data {
        first_page: u64,
        buf: Vec<u8>,
        len: usize,
    },
    Zero {
        first_page: u64,
        pages: u64,
    },
}

#[derive(Debug, Default)]
struct Queues {
    fault: VecDeque<Work>,
    scan: VecDeque<Work>,
    producers_done: usize,
}

/// Everything the saver threads share.
struct Shared<'a> {
    mem: &'a GuestMemoryMmap,
    tracker: &'a WpTracker,
    blocks: BlockMap,
    cancel: &'a AtomicBool,
    stop: AtomicBool,
    error: Mutex<Option<SaveError>>,
    pool: Mutex<Vec<Vec<u8>>>,
    pool_cv: Condvar,
    queues: Mutex<Queues>,
    queues_cv: Condvar,
    scan_queue_cap: usize,
    fault_reserve: usize,
    spare_batches: Mutex<Vec<EncodedBatch>>,
    scan_done: AtomicBool,
    released: AtomicUsize,
    bytes_scanned: AtomicU64,
    faults_served: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    inject: Option<InjectPoint>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking saver thread aborts the save anyway; the data stays usable for cleanup.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Record the first error, stop every thread, and release the guest right away.
    fn abort(&self, e: SaveError) {
        {
            let mut g = lock(&self.error);
            if g.is_none() {
                *g = Some(e);
            }
        }
        self.stop.store(true, Ordering::Release);
        let _ = self.tracker.unprotect_all();
        self.pool_cv.notify_all();
        self.queues_cv.notify_all();
    }

    fn acquire_buffer(&self, fault: bool) -> Option<Vec<u8>> {
        // The scanner leaves the fault reserve alone, so a fault rarely waits for a buffer.
        let keep = if fault { 0 } else { self.fault_reserve };
        let mut g = lock(&self.pool);
        loop {
            if g.len() > keep {
                return g.pop();
            }
            if self.stopped() {
                return None;
            }
            g = self
                .pool_cv
                .wait_timeout(g, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    fn release_buffer(&self, b: Vec<u8>) {
        lock(&self.pool).push(b);
        self.pool_cv.notify_all();
    }

    fn push_work(&self, w: Work, fault: bool) {
        let mut q = lock(&self.queues);
        if fault {
            q.fault.push_back(w);
        } else {
            while q.scan.len() >= self.scan_queue_cap && !self.stopped() {
                q = self
                    .queues_cv
                    .wait_timeout(q, POLL)
                    .map_or_else(|p| p.into_inner().0, |r| r.0);
            }
            q.scan.push_back(w);
        }
        drop(q);
        self.queues_cv.notify_all();
    }

    fn producer_done(&self) {
        lock(&self.queues).producers_done += 1;
        self.queues_cv.notify_all();
    }

    /// Next work item, faults first; `None` when both producers are done and queues are empty.
    fn pop_work(&self) -> Option<Work> {
        let mut q = lock(&self.queues);
        loop {
            if self.stopped() {
                return None;
            }
            if let Some(w) = q.fault.pop_front().or_else(|| q.scan.pop_front()) {
                drop(q);
                self.queues_cv.notify_all();
                return Some(w);
            }
            if q.producers_done == 2 {
                return None;
            }
            q = self
                .queues_cv
                .wait_timeout(q, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    fn copy_block(&self, b: &Block, buf: &mut [u8]) -> Result<(), SaveError> {
        let mem_err = |e: vm_memory::GuestMemoryError| SaveError::Memory {
            gpa: b.gpa,
            what: e.to_string(),
        };
        let slice = self
            .mem
            .get_slice(GuestAddress(b.gpa), b.len)
            .map_err(mem_err)?;
        let n = slice.copy_to(&mut buf[..b.len]);
        if n != b.len {
            return Err(SaveError::Memory {
                gpa: b.gpa,
                what: format!("short copy of {n} bytes"),
            });
        }
        Ok(())
    }

    fn release_block(&self, i: usize) -> Result<(), SaveError> {
        let b = &self.blocks.blocks[i];
        self.tracker
            .unprotect(
                HostRange {
                    start: b.host,
                    len: b.len,
                },
                true,
            )
            .map_err(SaveError::Tracker)?;
        self.blocks.state[i].store(RELEASED, Ordering::Release);
        self.released.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn all_released(&self) -> bool {
        self.released.load(Ordering::Acquire) == self.blocks.blocks.len()
    }

    /// Fault thread: serve faults until every block is released (or the save stops).
    fn fault_loop(&self) -> Result<(), SaveError> {
        let mut faults = Vec::with_capacity(256);
        loop {
            if self.stopped() {
                return Ok(());
            }
            if self.scan_done.load(Ordering::Acquire) && self.all_released() {
                // Stale events: their threads were woken by the release; wake again anyway.
                faults.clear();
                self.tracker
                    .read_faults(&mut faults)
                    .map_err(SaveError::Tracker)?;
                for f in &faults {
                    self.wake_page(f.addr)?;
                }
                return Ok(());
            }
            faults.clear();
            self.tracker
                .wait_faults(POLL, &mut faults)
                .map_err(SaveError::Tracker)?;
            let read_at = Instant::now();
            for f in &faults {
                self.serve_fault(f.addr, read_at)?;
            }
        }
    }

    fn wake_page(&self, addr: usize) -> Result<(), SaveError> {
        if self.blocks.find(addr).is_none() {
            return Ok(());
        }
        let start = addr & !(PAGE_SIZE - 1);
        self.tracker
            .wake(HostRange {
                start,
                len: PAGE_SIZE,
            })
            .map_err(SaveError::Tracker)
    }

    fn serve_fault(&self, addr: usize, read_at: Instant) -> Result<(), SaveError> {
        let Some(i) = self.blocks.find(addr) else {
            return Ok(());
        };
        match self.blocks.claim(i) {
            Ok(()) => {
                if self.inject == Some(InjectPoint::FaultPanic) {
                    panic!("injected fault thread failure");
                }
                let Some(mut buf) = self.acquire_buffer(true) else {
                    return Ok(());
                };
                let b = self.blocks.blocks[i];
                self.copy_block(&b, &mut buf)?;
                self.release_block(i)?;
                let us = read_at.elapsed().as_micros() as u64;
                lock(&self.latencies_us).push(us);
                self.faults_served.fetch_add(1, Ordering::Relaxed);
                self.bytes_scanned
                    .fetch_add(b.len as u64, Ordering::Relaxed);
                let work = Work::Data {
                    first_page: b.gpa / PAGE_SIZE as u64,
                    buf,
                    len: b.len,
                };
                self.push_work(work, true);
                Ok(())
            }
            // The scanner holds it: its release wakes the faulting thread.
            Err(CLAIMED) => Ok(()),
            // Already released: the event is stale, but make sure nobody sleeps.
            Err(_) => self.wake_page(addr),
        }
    }

    /// Scanner: claim and save every block still protected, in address order.
    fn scan_loop(&self, max_bandwidth: Option<u64>) -> Result<(), SaveError> {
        let pagemap = Pagemap::open();
        let start = Instant::now();
        let mut copied: u64 = 0;
        for i in 0..self.blocks.blocks.len() {
            if self.stopped() {
                return Ok(());
            }
            if let Some(InjectPoint::ScannerPanic { after_blocks }) = self.inject {
                if i >= after_blocks {
                    panic!("injected scanner failure");
                }
            }
            if self.blocks.state[i].load(Ordering::Acquire) != PROTECTED {
                continue;
            }
            let b = self.blocks.blocks[i];
            // Throttle before claiming: a claimed block must never wait on the throttle.
            let likely_data = has_data(&pagemap, b.host, b.len);
            if let (Some(rate), true) = (max_bandwidth, likely_data) {
                let burst = self.blocks.block_size as u64;
                loop {
                    let allowed = (start.elapsed().as_secs_f64() * rate as f64) as u64 + burst;
                    if copied + b.len as u64 <= allowed || self.stopped() {
                        break;
                    }
                    let wait = (copied + b.len as u64 - allowed) as f64 / rate.max(1) as f64;
                    thread::sleep(Duration::from_secs_f64(wait).min(POLL));
                }
            }
            let Some(mut buf) = self.acquire_buffer(false) else {
                return Ok(());
            };
            if self.blocks.claim(i).is_err() {
                self.release_buffer(buf);
                continue;
            }
            let first_page = b.gpa / PAGE_SIZE as u64;
            // Authoritative check while claimed and protected: nothing can appear unseen.
            if !has_data(&pagemap, b.host, b.len) {
                self.release_buffer(buf);
                self.release_block(i)?;
                self.bytes_scanned
                    .fetch_add(b.len as u64, Ordering::Relaxed);
                let pages = (b.len / PAGE_SIZE) as u64;
                self.push_work(Work::Zero { first_page, pages }, false);
                continue;
            }
            self.copy_block(&b, &mut buf)?;
            self.release_block(i)?;
            copied += b.len as u64;
            self.bytes_scanned
                .fetch_add(b.len as u64, Ordering::Relaxed);
            self.push_work(
                Work::Data {
                    first_page,
                    buf,
                    len: b.len,
                },
                false,
            );
        }
        self.scan_done.store(true, Ordering::Release);
        Ok(())
    }

    /// Compression worker: staged blocks → encoded batches for the writer.
    fn worker_loop(
        &self,
        compression: Compression,
        tx: std::sync::mpsc::SyncSender<EncodedBatch>,
    ) -> Result<(), SaveError> {
        let mut enc = RecordEncoder::new(PAGE_SIZE, compression)
            .map_err(|e| SaveError::Write(FormatError::Unwritable(e)))?;
        while let Some(work) = self.pop_work() {
            if self.inject == Some(InjectPoint::WorkerPanic) {
                panic!("injected worker failure");
            }
            let mut batch = lock(&self.spare_batches).pop().unwrap_or_default();
            batch.clear();
            match work {
                Work::Data {
                    first_page,
                    buf,
                    len,
                } => {
                    let r = enc.encode(first_page, &buf[..len], &mut batch);
                    self.release_buffer(buf);
                    r.map_err(|e| SaveError::Write(FormatError::Unwritable(e)))?;
                }
                Work::Zero { first_page, pages } => enc.zero_run(first_page, pages, &mut batch),
            }
            if tx.send(batch).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Uses the uffd-sys pagemap scan when available; the fallback reads /proc/self/pagemap.
fn has_data(pagemap: &Pagemap, host: usize, len: usize) -> bool {
    pagemap.may_have_data(host, len)
}

/// Unprotects every range when dropped armed: the guest must never stay write-protected.
struct ReleaseGuard<'a> {
    tracker: &'a WpTracker,
    armed: bool,
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

/// Marks a producer finished when dropped, also on panic, so workers never wait forever.
struct ProducerDone<'s, 'a>(&'s Shared<'a>);

impl Drop for ProducerDone<'_, '_> {
    fn drop(&mut self) {
        self.0.producer_done();
    }
}

/// Start a named saver thread whose error or panic aborts the save.
fn spawn_saver<'scope, 'env, F>(
    s: &'scope thread::Scope<'scope, 'env>,
    shared: &'env Shared<'env>,
    name: &'static str,
    f: F,
) -> io::Result<thread::ScopedJoinHandle<'scope, ()>>
where
    F: FnOnce() -> Result<(), SaveError> + Send + 'scope,
{
    thread::Builder::new()
        .name(format!("saver-{name}"))
        .spawn_scoped(s, move || {
            let _p = PanicAbort { shared, name };
            if let Err(e) = f() {
                shared.abort(e);
            }
        })
}

/// Save the RAM of a running guest to `sink`.
///
/// Precondition: vCPUs were paused, the machine state captured (`machine_state`), all guest RAM
/// (registered with `tracker`) write-protected with `protect_all`, and vCPUs resumed. The
/// header's `page_size`, `regions` and `compression` are set from `mem` and `opts`.
///
/// On success every block was copied once and released, and the file is complete. On any
/// error, cancel (`cancel` set) or panic in a saver thread, all guest RAM is unprotected and the
/// sink is dropped unfinished (a file sink removes its temporary file).
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
    let mut guard = ReleaseGuard {
        tracker,
        armed: true,
    };
    let started = Instant::now();
    if opts.block_size == 0 || !opts.block_size.is_multiple_of(PAGE_SIZE) {
        return Err(SaveError::InvalidOptions(format!(
            "block size {} is not a multiple of {PAGE_SIZE}",
            opts.block_size
        )));
    }
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
    let blocks = BlockMap::new(mem, opts.block_size)?;
    let mut writer = SnapshotWriter::new(sink, &header, machine_state).map_err(SaveError::Write)?;

    let min_pool = workers * 2 + 4;
    let pool_size = (STAGING_BYTES / opts.block_size).clamp(min_pool, MAX_BUFFERS.max(min_pool));
    let shared = Shared {
        mem,
        tracker,
        blocks,
        cancel,
        stop: AtomicBool::new(false),
        error: Mutex::new(None),
        pool: Mutex::new((0..pool_size).map(|_| vec![0u8; opts.block_size]).collect()),
        pool_cv: Condvar::new(),
        queues: Mutex::new(Queues::default()),
        queues_cv: Condvar::new(),
        scan_queue_cap: workers * 2 + 2,
        fault_reserve: pool_size / 2,
        spare_batches: Mutex::new(Vec::new()),
        scan_done: AtomicBool::new(false),
        released: AtomicUsize::new(0),
        bytes_scanned: AtomicU64::new(0),
        faults_served: AtomicU64::new(0),
        latencies_us: Mutex::new(Vec::new()),
        inject: opts.inject_failure,
    };
    let shared = &shared;
    let (tx, rx) = sync_channel::<EncodedBatch>(workers * 2);

    thread::scope(|s| {
        let _main_panic = PanicAbort {
            shared,
            name: "writer",
        };
        let mut handles = Vec::new();
        let mut spawn_err = None;
        let bw = opts.max_bandwidth;
        let c = opts.compression;
        let started_threads = [
            spawn_saver(s, shared, "fault", move || {
                let _d = ProducerDone(shared);
                shared.fault_loop()
            }),
            spawn_saver(s, shared, "scanner", move || {
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
            let tx = tx.clone();
            match spawn_saver(s, shared, "compression", move || shared.worker_loop(c, tx)) {
                Ok(h) => handles.push(h),
                Err(e) => spawn_err = Some(e),
            }
        }
        drop(tx);
        if let Some(e) = spawn_err {
            shared.abort(SaveError::Internal(format!(
                "cannot start saver thread: {e}"
            )));
        }

        // The writer: records in arrival order, progress every 100 ms.
        let mut last = Instant::now();
        let mut batches: u64 = 0;
        let report = |w: &SnapshotWriter<S>| {
            let t = w.totals();
            progress(&SaveProgress {
                bytes_scanned: shared.bytes_scanned.load(Ordering::Relaxed),
                pages_saved: t.pages,
                zero_pages: t.zero_pages,
                faults_served: shared.faults_served.load(Ordering::Relaxed),
                bytes_written: w.bytes_written(),
                total_pages,
            })
        };
        loop {
            if shared.cancel.load(Ordering::Relaxed) {
                shared.abort(SaveError::Cancelled);
            }
            if shared.stopped() {
                break;
            }
            match rx.recv_timeout(POLL) {
                Ok(batch) => {
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
                    if spare.len() < workers * 2 + 2 {
                        spare.push(batch);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if last.elapsed() >= PROGRESS_EVERY {
                report(&writer);
                last = Instant::now();
            }
        }
        drop(rx);
        for h in handles {
            // Panics were turned into aborts by PanicAbort; the payload adds nothing.
            let _ = h.join();
        }
        report(&writer);
    });

    if let Some(e) = lock(&shared.error).take() {
        return Err(e);
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(SaveError::Cancelled);
    }
    if let Some(i) = (0..shared.blocks.blocks.len())
        .find(|&i| shared.blocks.state[i].load(Ordering::Acquire) != RELEASED)
    {
        return Err(SaveError::Internal(format!(
            "block at {:#x} was never released",
            shared.blocks.blocks[i].gpa
        )));
    }
    let totals = writer.totals();
    if totals.pages != total_pages {
        return Err(SaveError::Internal(format!(
            "{} pages written, guest has {total_pages}",
            totals.pages
        )));
    }
    let file_bytes = writer.finish().map_err(SaveError::Write)?;
    guard.armed = false;

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
    Ok(SaveSummary {
        duration_secs: started.elapsed().as_secs_f64(),
        pages_saved: totals.pages,
        zero_pages: totals.zero_pages,
        data_pages: totals.data_pages,
        faults_served: shared.faults_served.load(Ordering::Relaxed),
        fault_latency_p50_us: pct(50),
        fault_latency_p99_us: pct(99),
        fault_latency_max_us: lat.last().copied().unwrap_or(0),
        file_bytes,
        raw_nonzero_bytes,
        image_size_ratio: file_bytes as f64 / raw_nonzero_bytes.max(1) as f64,
        records: totals.records,
    })
}
