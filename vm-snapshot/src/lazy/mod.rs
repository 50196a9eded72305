//! Lazy restore: the VM runs at once, its memory follows on demand.
//!
//! [`restore_lazy`] opens and checks the file as [`restore`](crate::restore) does (footer,
//! trailer, header, machine state decoded exactly; for an incremental snapshot every parent it
//! names, as a [`Chain`]) and proves from the (checksummed) indexes that every guest page is in
//! exactly one record of each layer; the chain's flattened index says which layer's record holds
//! each page. It then creates fresh guest memory, registers it
//! with userfaultfd in MISSING mode ([`MissingTracker`]), starts the fault thread, builds the VM
//! and starts its vCPUs: no page of RAM is read before they run. Then:
//!
//! - **Chunks.** Every span of the flattened index (a record's pages, or of a record cut by a
//!   newer layer, the pages that layer left to it) is cut at 2 MiB guest boundaries into chunks
//!   (pages of one record of one layer inside one huge page), the unit that is filled and
//!   counted; every read of a chunk's pages goes to its layer's file. A chunk's state only moves
//!   forward: missing → filling (the fill thread has it) → resident, or missing → resident when
//!   a fault fills all of it; it turns resident only once all its pages are filled.
//! - **Fault thread** (first; real-time priority where permitted): a fault on a missing page
//!   finds its chunk (binary search by first page) and fills the piece around the faulting page (`UFFDIO_COPY`, which
//!   wakes the vCPU; `pieces`). A record stored in pieces (zstd or raw in pieces, 64 KiB each
//!   as written) is read one piece at a time: its header, piece table and the piece holding the
//!   page, by positioned reads, the table's and the piece's crc checked before the piece is
//!   decoded or filled, nothing else read or decoded. Any other record is read whole through the trailer
//!   index (positioned read, crc check, decompression; the last few records stay decoded) and
//!   the 64 KiB around the page is filled. A zero chunk is one `UFFDIO_ZEROPAGE` for all of it. The rest of the chunk goes to the front of the fill
//!   thread's queue: the fault thread never copies more than a vCPU waits for. A fault on a
//!   resident chunk only wakes (its event was read after someone else filled the page). The
//!   wait of each fault is measured from the moment its event is read until its piece is
//!   filled (time before the read, a poll wake-up, is not seen).
//! - **Fill thread**: fills whole chunks (reading and checking whole records), those the guest
//!   touched first (the most recent first: their records are still in the page cache, and the
//!   guest is likely to touch them again), then those of hot records (the guest wrote them
//!   during the save: its working set; in file order, about the order it wrote them), then
//!   every other one in file order (the disk reads forward). It yields while the
//!   fault thread serves. Two threads filling the same pages is harmless: the kernel fills only
//!   missing pages (one that exists answers EEXIST and is skipped), with the same bytes from the
//!   same checked record.
//! - **Whole huge pages**: on anonymous memory (and a kernel with `UFFDIO_MOVE`, Linux 6.8+) a
//!   2 MiB block that holds data and that no fault touched is filled in one piece: the fill
//!   claims all its chunks (MISSING → FILLING), reads its record straight into a staging huge
//!   page (or, for a block made of several records or zero runs, copies their decoded pages
//!   there; zero runs need nothing, the staging page starts empty), and moves that page into the
//!   guest ([`MissingTracker::move_in`]): one huge page, no copy into the guest, waiters woken.
//!   If a fault fills a piece of the block meanwhile, the move stops there and the rest is
//!   copied from the staging page (pages that exist are skipped); a block a fault touched
//!   first is copied chunk by chunk as above. The fill thread populates its one staging page
//!   itself before each block (the kernel allocates and zeroes a fresh huge page: 0.2–0.4 s
//!   per GiB here, far more on memory the host has not backed yet). No ring populated ahead by
//!   a low-priority thread: it gains only where a core is idle (none was, in measurements on a
//!   busy 2-core host), and such a thread holds the mmap lock while it is preempted. memfd
//!   memory cannot take moves (shared memory): it is filled by copies.
//! - **End**: once every chunk is resident the memory is unregistered (the VM runs without
//!   userfaultfd from then on), and every 2 MiB block that holds data but is not a huge page
//!   (those filled piecewise: touched by faults, or not movable) is collapsed back into a huge
//!   page (`MADV_COLLAPSE`, best effort), up to 32 adjacent blocks per call, at low priority
//!   (nice 10), and not while a [`CollapseHold`] lives (a save: a block it write-protects
//!   cannot be collapsed). Blocks that are all zeros stay on the shared zero page (collapsing
//!   them would allocate 2 MiB of zeros each).
//! - **Failure**: a record that fails its checks (crc, header against index, decompression) or a
//!   fill the kernel refuses stops both threads and is reported ([`LazyRestore::failure`],
//!   [`LazyRestore::wait`]). The registration is kept: a page that was never filled is never
//!   handed out as zeros, and whoever touches one stays blocked. The owner must stop the VM
//!   (the snapctl VMM exits). Dropping a [`LazyRestore`] that did not finish keeps the
//!   registration until the process ends for the same reason.
//!
//! Not supported yet: hugetlbfs guest memory (its fills must be whole 2 MiB pages assembled from
//! several records), huge pages for memfd memory without a collapse (`UFFDIO_CONTINUE` in MINOR
//! mode). A fault on a record stored raw, or as one zstd frame (files of format 1), reads (and
//! decodes) all of it.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ram_saver::{Chain, FormatError, IndexEntry, RecordKind, SnapshotHeader, SnapshotReader, Span};
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_core::{MemBackend, Vm, VmError};
use wp_tracker::{HostRange, HugeBlock, MissingError, MissingFault, MissingTracker};

use crate::fill_end::{wait_end, CollapseGate, CollapseHold, WaitSamples};
use crate::{chain, machine_state, RestoreParams, RestoredFrom};

mod fill;
mod pieces;

use fill::{fault_thread, fill_thread, DecodeCache};
use pieces::fill_order;

/// The snapshot, opened by path (positioned reads from any thread).
type Reader = SnapshotReader<BufReader<File>>;

/// Guest bytes per chunk at most, and the alignment chunks never cross (an x86-64 huge page).
const BLOCK: u64 = 2 << 20;
/// Bytes a fault fills around the faulting page (the rest of its chunk is the fill thread's).
const FAULT_PIECE: u64 = 64 << 10;
/// How long the fault thread waits for events before it looks at the stop flag.
const FAULT_POLL: Duration = Duration::from_millis(20);
/// Real-time (SCHED_FIFO) priority of the fault thread: it preempts the vCPUs and the fill the
/// moment a fault arrives. A vCPU waits for every fault it raises, so the thread runs only while
/// some vCPU is stopped; on a host where all cores run busy vCPUs, a high nice value alone left
/// the fault thread waiting for a CPU for milliseconds (`docs/PERFORMANCE.md`, "Lazy restore").
/// Needs CAP_SYS_NICE.
const FAULT_RT_PRIORITY: i32 = 1;
/// Nice value of the fault thread where real-time priority is not permitted.
const FAULT_NICE: i32 = -10;
/// Collapse calls tried before the collapse gives up on memory where every one fails.
const COLLAPSE_PROBE: usize = 8;
/// Blocks left small after the first collapse pass that are tried once more, at most.
const COLLAPSE_RETRY_MAX: u64 = 4096;
/// Adjacent 2 MiB blocks collapsed by one MADV_COLLAPSE call at most (as the save does).
const COLLAPSE_BATCH: u64 = 32;

/// Why a lazy restore could not start.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The file is bad (damaged, incomplete, not a snapshot, unsupported), or its machine state
    /// does not decode exactly, or its index does not cover guest memory exactly once: refused
    /// before any vCPU runs.
    #[error(transparent)]
    File(#[from] FormatError),
    /// Lazy restore does not support this guest memory backing yet.
    #[error(
        "lazy restore does not support {} guest memory yet (use `--mem-backend anon` or \
         `memfd`, or an eager restore)",
        backend_name(*.0)
    )]
    Backend(MemBackend),
    /// Guest memory could not be created.
    #[error("creating guest memory")]
    Memory(#[source] VmError),
    /// Guest memory could not be registered with userfaultfd in MISSING mode.
    #[error("registering guest memory for missing-page faults")]
    Userfaultfd(#[source] MissingError),
    /// A thread of the lazy restore could not be started.
    #[error("starting the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// The VM could not be built from a good file.
    #[error("restoring the VM")]
    Vm(#[source] VmError),
}

/// Why a lazy restore stopped before all memory was resident. The VM must not run on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LazyFailure {
    /// A record failed its checks when it was read (opening checks no record: a file damaged
    /// before or after it was opened fails here).
    #[error("{0}")]
    Record(String),
    /// The kernel refused a fill or the fault events could not be read.
    #[error("{0}")]
    Fill(String),
}

/// Figures of a lazy restore, for `status` and the log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LazyStatus {
    /// Guest bytes resident (filled) so far.
    pub resident_bytes: u64,
    /// Guest bytes in all.
    pub total_bytes: u64,
    /// Missing-page faults served (events read; several vCPUs may fault on one chunk).
    pub faults: u64,
    /// Everything resident and the memory unregistered: the VM runs without userfaultfd.
    pub resident: bool,
    /// Resident, and huge pages collapsed: the restore is over.
    pub done: bool,
    /// Why the restore stopped, if it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// Restore work until the vCPUs were started (open, checks, memory, userfaultfd, VM), ms.
    pub start_ms: f64,
    /// When the first fault was read (≈ the first guest instruction fetch), ms from the start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_fault_ms: Option<f64>,
    /// Fault wait (event read → page filled) p50, µs.
    pub fault_wait_p50_us: u64,
    /// Fault wait p99, µs.
    pub fault_wait_p99_us: u64,
    /// Longest fault wait, µs.
    pub fault_wait_max_us: u64,
    /// Guest bytes the fault thread filled.
    pub fault_filled_bytes: u64,
    /// Guest bytes the fill thread filled.
    pub fill_filled_bytes: u64,
    /// Of those, bytes moved in as whole huge pages (`UFFDIO_MOVE`).
    pub fill_moved_bytes: u64,
    /// Blocks whose move stopped at a piece a fault filled meanwhile (the rest was copied).
    pub fill_move_races: u64,
    /// Where the fill thread's time went so far, ms: reading records (positioned read, crc,
    /// decompression).
    pub fill_read_ms: f64,
    /// … copying decoded pages into the staging huge page (its first write includes the
    /// kernel's zeroing of a fresh huge page).
    pub fill_stage_ms: f64,
    /// … the fill ioctls (move, copy, zero page).
    pub fill_map_ms: f64,
    /// When everything was resident, seconds from the start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident_s: Option<f64>,
    /// File-to-memory rate of the whole restore: guest bytes / (everything resident − vCPUs started), GB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fill_gb_s: Option<f64>,
    /// Guest bytes on huge pages once everything was resident, before the collapse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thp_before_bytes: Option<u64>,
    /// Guest bytes on huge pages after the collapse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thp_after_bytes: Option<u64>,
    /// Time the collapse calls took, ms (not counting waits for saves).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collapse_ms: Option<f64>,
    /// 2 MiB blocks the kernel did not collapse.
    pub collapse_failures: u64,
}

/// A lazy restore in progress (or finished). Keep it as long as the VM runs; see the module docs
/// for what dropping it before the end means.
#[derive(Debug)]
pub struct LazyRestore {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    from: RestoredFrom,
}

/// Pages of one record of one layer inside one 2 MiB guest block.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    first_page: u64,
    pages: u32,
    /// The record (index entry of its layer) it comes from.
    record: u32,
    /// The layer of the chain (0: the file named).
    layer: u16,
    zero: bool,
}

/// Chunk states, which only move forward: MISSING → FILLING → RESIDENT (or MISSING → RESIDENT
/// when a fault fills all of it).
const MISSING: u8 = 0;
/// The fill thread is filling it.
const FILLING: u8 = 1;
/// Every page is filled.
const RESIDENT: u8 = 2;

/// A 2 MiB guest block that the fill can move in whole: it holds data, lies inside one region at
/// a 2 MiB-aligned host address, and its memory takes moves.
#[derive(Debug, Clone, Copy)]
struct Block {
    first_page: u64,
    /// Its chunks: `by_page[chunks.0..chunks.1]`.
    chunks: (u32, u32),
}

/// `Shared::block_of` of a chunk whose block is not moved whole.
const NO_BLOCK: u32 = u32::MAX;

/// A region of guest memory: guest pages `[first_page, first_page + pages)` at `host`.
#[derive(Debug, Clone, Copy)]
struct Region {
    first_page: u64,
    pages: u64,
    host: usize,
}

/// Everything the threads share.
struct Shared {
    /// The snapshot's layers (one for a standalone file).
    chain: Chain,
    tracker: Mutex<Option<Arc<MissingTracker>>>,
    /// Keeps the mappings of `regions` alive for as long as the threads use their addresses.
    _mem: GuestMemoryMmap,
    regions: Vec<Region>,
    page_size: u64,
    /// In file order (record order, then ascending pages).
    chunks: Vec<Chunk>,
    /// Chunk numbers sorted by first page.
    by_page: Vec<u32>,
    /// Chunk numbers in the fill thread's order (hot records first, see `fill_order`).
    fill_order: Vec<u32>,
    state: Vec<AtomicU8>,
    /// Blocks the fill moves in whole.
    blocks: Vec<Block>,
    /// Per chunk: its number in `blocks`, or [`NO_BLOCK`].
    block_of: Vec<u32>,
    /// Per block: a fault filled a piece of it (it is filled piecewise, then collapsed).
    touched: Vec<AtomicBool>,
    /// A move failed for another reason than a racing fault: the fill copies from then on.
    no_move: AtomicBool,
    /// The fault thread is serving: the fill yields.
    fault_busy: AtomicBool,
    /// Chunks a fault filled a piece of, for the fill thread to complete first (most recent
    /// last).
    hot: Mutex<Vec<u32>>,
    stop: AtomicBool,
    /// The owner lets go ([`LazyRestore`] dropped): the collapse stops too.
    quit: AtomicBool,
    /// The [`CollapseHold`]s and the collapse call in flight.
    collapse: Arc<CollapseGate>,
    /// Everything is resident and the registration ends: errors of the fault thread no longer
    /// matter.
    finishing: AtomicBool,
    t0: Instant,
    resident: AtomicU64,
    total: u64,
    faults: AtomicU64,
    fault_filled: AtomicU64,
    fill_filled: AtomicU64,
    fill_moved: AtomicU64,
    move_races: AtomicU64,
    /// Fill thread time in read / stage / map, ns.
    fill_ns: [AtomicU64; 3],
    waits: Mutex<Waits>,
    end: Mutex<End>,
    end_cv: Condvar,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("chunks", &self.chunks.len())
            .field("resident", &self.resident)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

/// Fault waits, and when the first fault arrived.
#[derive(Debug, Default)]
struct Waits {
    samples: WaitSamples,
    first_fault: Option<Duration>,
}

/// How the restore ended, and the figures known only then.
#[derive(Debug, Default)]
struct End {
    failed: Option<LazyFailure>,
    done: bool,
    start: Duration,
    resident_at: Option<Duration>,
    thp_before: Option<u64>,
    thp_after: Option<u64>,
    collapse: Option<Duration>,
    collapse_failures: u64,
}

/// Restores `file` into a new VM whose memory is filled on demand (running, or parked with
/// `params.paused`; the fill runs either way). A bad file is refused before any vCPU runs.
pub fn restore_lazy(file: &Path, params: RestoreParams) -> Result<(Vm, LazyRestore), LazyError> {
    let t0 = Instant::now();
    let chain = Chain::open(file)?;
    let from = RestoredFrom::of(&chain);
    let reader = chain.top();
    let state = machine_state(reader)?;
    let cfg = state.config();
    let backend = params.backend.unwrap_or(cfg.backend);
    if backend == MemBackend::Hugetlbfs {
        return Err(LazyError::Backend(backend));
    }
    let page_size = u64::from(reader.header().page_size);
    prove_coverage(reader.header(), &reader.trailer().index)?;
    let (chunks, by_page) = plan_chunks(chain.spans(), |s| chain.entry(s).kind, page_size);
    let fill_order = fill_order(&chunks, |c| {
        chain.reader(c.layer).trailer().index[c.record as usize].hot
    });
    let mem = vmm_core::create_guest_memory(cfg.mem_bytes, backend).map_err(LazyError::Memory)?;
    let regions = regions_of(reader, &mem)?;
    let tracker = MissingTracker::new().map_err(LazyError::Userfaultfd)?;
    tracker
        .register_memory(&mem)
        .map_err(LazyError::Userfaultfd)?;
    let total = reader.header().total_pages() * page_size;
    let (blocks, block_of) = plan_blocks(&chunks, &by_page, &regions, page_size, &tracker);
    let shared = Arc::new(Shared {
        chain,
        tracker: Mutex::new(Some(Arc::new(tracker))),
        _mem: mem.clone(),
        regions,
        page_size,
        state: chunks.iter().map(|_| AtomicU8::new(MISSING)).collect(),
        touched: blocks.iter().map(|_| AtomicBool::new(false)).collect(),
        blocks,
        block_of,
        no_move: AtomicBool::new(false),
        chunks,
        by_page,
        fill_order,
        fault_busy: AtomicBool::new(false),
        hot: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        quit: AtomicBool::new(false),
        collapse: Arc::default(),
        finishing: AtomicBool::new(false),
        t0,
        resident: AtomicU64::new(0),
        total,
        faults: AtomicU64::new(0),
        fault_filled: AtomicU64::new(0),
        fill_filled: AtomicU64::new(0),
        fill_moved: AtomicU64::new(0),
        move_races: AtomicU64::new(0),
        fill_ns: Default::default(),
        waits: Mutex::new(Waits::default()),
        end: Mutex::new(End::default()),
        end_cv: Condvar::new(),
    });
    let lazy = LazyRestore {
        shared: shared.clone(),
        threads: Mutex::new(Vec::new()),
        from,
    };
    // The fault thread serves before anything can touch guest memory.
    lazy.spawn("lazy-fault", move || {
        // Real-time where permitted (it sleeps until a vCPU waits on it), else a high nice.
        if uffd_sys::host::set_thread_fifo(FAULT_RT_PRIORITY).is_err() {
            let _ = uffd_sys::host::set_thread_nice(FAULT_NICE);
        }
        fault_thread(&shared)
    })?;
    let vm = Vm::restore(&state, mem, params.serial, params.paused).map_err(LazyError::Vm)?;
    lock(&lazy.shared.end).start = t0.elapsed();
    let shared = lazy.shared.clone();
    lazy.spawn("lazy-fill", move || fill_thread(&shared))?;
    Ok((vm, lazy))
}

impl LazyRestore {
    fn spawn(
        &self,
        name: &'static str,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), LazyError> {
        let h = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|e| LazyError::Thread(name, e))?;
        lock(&self.threads).push(h);
        Ok(())
    }

    /// What the VM is restored from: the file named (the top of its chain) and its identity,
    /// which an incremental save of this VM names as its parent.
    pub fn restored_from(&self) -> &RestoredFrom {
        &self.from
    }

    /// Progress and figures so far.
    pub fn status(&self) -> LazyStatus {
        let s = &self.shared;
        let (p50, p99, max, first) = {
            let w = lock(&s.waits);
            let (p50, p99) = w.samples.p50_p99();
            (p50, p99, w.samples.max, w.first_fault)
        };
        let end = lock(&s.end);
        let resident = s.resident.load(Ordering::Relaxed);
        LazyStatus {
            resident_bytes: resident,
            total_bytes: s.total,
            faults: s.faults.load(Ordering::Relaxed),
            resident: end.resident_at.is_some(),
            done: end.done,
            failed: end.failed.as_ref().map(|f| f.to_string()),
            start_ms: ms(end.start),
            first_fault_ms: first.map(ms),
            fault_wait_p50_us: p50,
            fault_wait_p99_us: p99,
            fault_wait_max_us: max,
            fault_filled_bytes: s.fault_filled.load(Ordering::Relaxed),
            fill_filled_bytes: s.fill_filled.load(Ordering::Relaxed),
            fill_moved_bytes: s.fill_moved.load(Ordering::Relaxed),
            fill_move_races: s.move_races.load(Ordering::Relaxed),
            fill_read_ms: s.fill_ns[0].load(Ordering::Relaxed) as f64 / 1e6,
            fill_stage_ms: s.fill_ns[1].load(Ordering::Relaxed) as f64 / 1e6,
            fill_map_ms: s.fill_ns[2].load(Ordering::Relaxed) as f64 / 1e6,
            resident_s: end.resident_at.map(|d| d.as_secs_f64()),
            fill_gb_s: end.resident_at.map(|d| {
                s.total as f64 / (d.saturating_sub(end.start)).as_secs_f64().max(1e-9) / 1e9
            }),
            thp_before_bytes: end.thp_before,
            thp_after_bytes: end.thp_after,
            collapse_ms: end.collapse.map(ms),
            collapse_failures: end.collapse_failures,
        }
    }

    /// Holds the collapse into huge pages off until the returned guard is dropped (for a save:
    /// a block the save write-protects cannot be collapsed and would stay in small pages). Waits
    /// for a collapse call in flight to end.
    pub fn hold_collapse(&self) -> CollapseHold {
        self.shared.collapse.hold()
    }

    /// True once the restore is over (everything resident, unregistered, collapsed).
    pub fn is_done(&self) -> bool {
        lock(&self.shared.end).done
    }

    /// Why the restore failed, if it did.
    pub fn failure(&self) -> Option<LazyFailure> {
        lock(&self.shared.end).failed.clone()
    }

    /// Waits up to `timeout` for the restore to end: `Some(Ok)` done, `Some(Err)` failed, `None`
    /// still filling or collapsing.
    pub fn wait(&self, timeout: Duration) -> Option<Result<(), LazyFailure>> {
        self.wait_for(timeout, |end| end.done)
    }

    /// Waits up to `timeout` until every page is resident and the memory unregistered (the
    /// collapse into huge pages may still run): `Some(Ok)` resident, `Some(Err)` failed, `None`
    /// still filling.
    pub fn wait_resident(&self, timeout: Duration) -> Option<Result<(), LazyFailure>> {
        self.wait_for(timeout, |end| end.resident_at.is_some())
    }

    fn wait_for(
        &self,
        timeout: Duration,
        reached: impl Fn(&End) -> bool,
    ) -> Option<Result<(), LazyFailure>> {
        let s = &self.shared;
        wait_end(&s.end, &s.end_cv, timeout, |e| e.failed.as_ref(), reached)
    }
}

impl Drop for LazyRestore {
    fn drop(&mut self) {
        let s = &self.shared;
        s.quit.store(true, Ordering::SeqCst);
        s.stop.store(true, Ordering::SeqCst);
        for h in lock(&self.threads).drain(..) {
            let _ = h.join();
        }
        if s.resident.load(Ordering::SeqCst) < s.total {
            // Pages never filled must not turn into zeros for whoever still holds the memory:
            // keep them registered (blocking) until the process ends.
            if let Some(t) = lock(&s.tracker).take() {
                std::mem::forget(t);
            }
        }
    }
}

/// Proves from the index alone (no record read) that every guest page of the header's regions
/// is in exactly one record, as eager restore does before it writes memory.
fn prove_coverage(h: &SnapshotHeader, index: &[IndexEntry]) -> Result<(), FormatError> {
    let ps = u64::from(h.page_size);
    let mut order: Vec<u32> = (0..index.len() as u32).collect();
    order.sort_unstable_by_key(|&i| index[i as usize].first_page);
    let mut regions = h
        .regions
        .iter()
        .map(|m| (m.gpa / ps, (m.gpa + m.size) / ps));
    let mut cur = regions.next();
    for &i in &order {
        let e = &index[i as usize];
        let record = Some(u64::from(i));
        let Some((next, end)) = cur else {
            return Err(FormatError::Coverage {
                what: "lies outside guest memory",
                page: e.first_page,
                record,
            });
        };
        if e.first_page < next {
            return Err(FormatError::Coverage {
                what: "appears more than once",
                page: e.first_page,
                record,
            });
        }
        if e.first_page > next {
            let what = if next < end {
                "is missing"
            } else {
                "lies outside guest memory"
            };
            let page = if next < end { next } else { e.first_page };
            return Err(FormatError::Coverage { what, page, record });
        }
        let after = e.first_page + u64::from(e.page_count);
        if after > end {
            return Err(FormatError::Coverage {
                what: "lies outside guest memory",
                page: end,
                record,
            });
        }
        cur = if after == end {
            regions.next()
        } else {
            Some((after, end))
        };
    }
    if let Some((next, _)) = cur {
        return Err(FormatError::Coverage {
            what: "is missing",
            page: next,
            record: None,
        });
    }
    Ok(())
}

/// Cuts every span of the flattened index (`kind`: its record's kind) at 2 MiB guest
/// boundaries: the chunks in file order (the newest layer first, then each layer's records in
/// file order), and their numbers sorted by first page.
fn plan_chunks(
    spans: &[Span],
    kind: impl Fn(&Span) -> RecordKind,
    page_size: u64,
) -> (Vec<Chunk>, Vec<u32>) {
    let block_pages = (BLOCK / page_size).max(1);
    let mut order: Vec<&Span> = spans.iter().collect();
    order.sort_by_key(|s| (s.layer, s.record, s.first_page));
    let mut chunks = Vec::with_capacity(spans.len());
    for s in order {
        let mut p = s.first_page;
        let end = s.first_page + s.pages;
        let zero = kind(s) == RecordKind::ZeroRun;
        while p < end {
            let next = ((p / block_pages) + 1) * block_pages;
            let n = next.min(end) - p;
            chunks.push(Chunk {
                first_page: p,
                pages: n as u32,
                record: s.record,
                layer: s.layer,
                zero,
            });
            p += n;
        }
    }
    let mut by_page: Vec<u32> = (0..chunks.len() as u32).collect();
    by_page.sort_unstable_by_key(|&c| chunks[c as usize].first_page);
    (chunks, by_page)
}

/// The 2 MiB blocks the fill can move in whole (see [`Block`]), and each chunk's block.
fn plan_blocks(
    chunks: &[Chunk],
    by_page: &[u32],
    regions: &[Region],
    page_size: u64,
    tracker: &MissingTracker,
) -> (Vec<Block>, Vec<u32>) {
    let block_pages = (BLOCK / page_size).max(1);
    let mut blocks = Vec::new();
    let mut block_of = vec![NO_BLOCK; chunks.len()];
    let mut at = 0;
    while at < by_page.len() {
        let first = chunks[by_page[at] as usize].first_page / block_pages * block_pages;
        let end = by_page[at..]
            .iter()
            .position(|&c| chunks[c as usize].first_page >= first + block_pages)
            .map_or(by_page.len(), |n| at + n);
        let members = &by_page[at..end];
        let data = members.iter().any(|&c| !chunks[c as usize].zero);
        let host = regions
            .iter()
            .find(|r| first >= r.first_page && first + block_pages <= r.first_page + r.pages)
            .map(|r| {
                HostRange::new(
                    r.host + ((first - r.first_page) * page_size) as usize,
                    BLOCK as usize,
                )
            });
        let movable =
            host.is_some_and(|h| h.start.is_multiple_of(BLOCK as usize) && tracker.can_move(h));
        if data && movable {
            for &c in members {
                block_of[c as usize] = blocks.len() as u32;
            }
            blocks.push(Block {
                first_page: first,
                chunks: (at as u32, end as u32),
            });
        }
        at = end;
    }
    (blocks, block_of)
}

/// Guest memory's regions, which must be the header's.
fn regions_of(r: &Reader, mem: &GuestMemoryMmap) -> Result<Vec<Region>, LazyError> {
    let ps = u64::from(r.header().page_size);
    let ours: Vec<(u64, u64)> = r.header().regions.iter().map(|m| (m.gpa, m.size)).collect();
    let theirs: Vec<(u64, u64)> = mem.iter().map(|m| (m.start_addr().0, m.len())).collect();
    if ours != theirs {
        return Err(FormatError::LayoutMismatch {
            what: format!("snapshot regions {ours:x?}, guest regions {theirs:x?}"),
        }
        .into());
    }
    Ok(mem
        .iter()
        .map(|m| Region {
            first_page: m.start_addr().0 / ps,
            pages: m.len() / ps,
            host: m.as_ptr() as usize,
        })
        .collect())
}

impl Shared {
    fn tracker(&self) -> Option<Arc<MissingTracker>> {
        lock(&self.tracker).clone()
    }

    /// The file holding chunk `ch`'s pages.
    fn reader(&self, ch: &Chunk) -> &Reader {
        self.chain.reader(ch.layer)
    }

    /// The index entry (of its layer) of chunk `ch`'s record.
    fn entry(&self, ch: &Chunk) -> &IndexEntry {
        &self.reader(ch).trailer().index[ch.record as usize]
    }

    /// The host range of guest pages `[first, first + n)` (inside one region).
    fn host(&self, first: u64, n: u64) -> HostRange {
        let r = self
            .regions
            .iter()
            .find(|r| first >= r.first_page && first + n <= r.first_page + r.pages)
            .expect("chunks lie inside one region (coverage was proved)");
        let ps = self.page_size;
        HostRange::new(
            r.host + ((first - r.first_page) * ps) as usize,
            (n * ps) as usize,
        )
    }

    /// The guest page at host address `addr`, if it is guest memory.
    fn page_of(&self, addr: usize) -> Option<u64> {
        let ps = self.page_size as usize;
        self.regions.iter().find_map(|r| {
            let len = r.pages as usize * ps;
            (addr >= r.host && addr - r.host < len)
                .then(|| r.first_page + ((addr - r.host) / ps) as u64)
        })
    }

    /// The chunk holding guest page `page`.
    fn chunk_of(&self, page: u64) -> Option<usize> {
        let at = self
            .by_page
            .partition_point(|&c| self.chunks[c as usize].first_page <= page);
        let c = *self.by_page.get(at.checked_sub(1)?)? as usize;
        let ch = &self.chunks[c];
        (page < ch.first_page + u64::from(ch.pages)).then_some(c)
    }

    fn state(&self, c: usize) -> u8 {
        self.state[c].load(Ordering::Acquire)
    }

    /// Moves chunk `c` from MISSING to `to`; false if it was not MISSING any more.
    fn claim(&self, c: usize, to: u8) -> bool {
        self.state[c]
            .compare_exchange(MISSING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Notes that a fault fills a piece of chunk `c`: its block is not moved in whole.
    fn touch(&self, c: usize) {
        if let Some(t) = self.touched.get(self.block_of[c] as usize) {
            t.store(true, Ordering::SeqCst);
        }
    }

    /// Adds the time since `t` to fill phase `phase` (read, stage, map).
    fn fill_time(&self, phase: usize, t: Instant) {
        let ns = t.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        self.fill_ns[phase].fetch_add(ns, Ordering::Relaxed);
    }

    /// Marks chunk `c` resident (all of it is filled); counted once, whoever marks it.
    fn mark_resident(&self, c: usize) {
        if self.state[c].swap(RESIDENT, Ordering::AcqRel) != RESIDENT {
            let bytes = u64::from(self.chunks[c].pages) * self.page_size;
            self.resident.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Fills pages `[from, to)` of chunk `c` (relative to its first page) from its record, or
    /// with zeros for a zero chunk; returns the bytes this call filled (pages already there are
    /// skipped by the kernel).
    fn fill_pages(
        &self,
        tracker: &MissingTracker,
        cache: &mut DecodeCache,
        c: usize,
        from: u64,
        to: u64,
    ) -> Result<u64, LazyFailure> {
        let ch = self.chunks[c];
        let ps = self.page_size;
        let range = self.host(ch.first_page + from, to - from);
        let fill_err = |e: MissingError| LazyFailure::Fill(chain(&e));
        if ch.zero {
            return tracker.fill_zero(range).map(|n| n as u64).map_err(fill_err);
        }
        let data = cache.get(self, &ch)?;
        let entry = self.entry(&ch);
        let off = ((ch.first_page - entry.first_page + from) * ps) as usize;
        let src = &data[off..off + range.len];
        tracker.fill(range, src).map(|n| n as u64).map_err(fill_err)
    }

    /// Records the failure (the first one wins) and stops both threads.
    fn fail(&self, f: LazyFailure) {
        self.stop.store(true, Ordering::SeqCst);
        let mut end = lock(&self.end);
        if end.failed.is_none() && !end.done {
            end.failed = Some(f);
        }
        self.end_cv.notify_all();
    }
}

fn backend_name(b: MemBackend) -> &'static str {
    match b {
        MemBackend::Anon => "anonymous",
        MemBackend::Memfd => "memfd",
        MemBackend::Hugetlbfs => "hugetlbfs",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ram_saver::MemRegion;

    const PS: u64 = 4096;

    fn header() -> SnapshotHeader {
        // Two regions: pages 0..1024 and 4096..4608.
        SnapshotHeader::new(
            vec![
                MemRegion {
                    gpa: 0,
                    size: 1024 * PS,
                },
                MemRegion {
                    gpa: 4096 * PS,
                    size: 512 * PS,
                },
            ],
            1,
            Vec::new(),
        )
    }

    fn entry(first_page: u64, page_count: u32, zero: bool) -> IndexEntry {
        IndexEntry {
            offset: 0,
            first_page,
            page_count,
            kind: if zero {
                RecordKind::ZeroRun
            } else {
                RecordKind::Data
            },
            hot: false,
        }
    }

    /// The flattened index of a standalone file of `index`: each record whole, in page order.
    fn plan(index: &[IndexEntry]) -> (Vec<Chunk>, Vec<u32>) {
        let mut spans: Vec<Span> = index
            .iter()
            .enumerate()
            .map(|(i, e)| Span {
                first_page: e.first_page,
                pages: u64::from(e.page_count),
                layer: 0,
                record: i as u32,
            })
            .collect();
        spans.sort_by_key(|s| s.first_page);
        plan_chunks(&spans, |s| index[s.record as usize].kind, PS)
    }

    #[test]
    fn coverage_is_proved_from_the_index_in_any_order() {
        let h = header();
        let good = [
            entry(4096, 512, true),
            entry(10, 1014, false),
            entry(0, 10, false),
        ];
        prove_coverage(&h, &good).unwrap();
        let cases: [(&[IndexEntry], &str, u64); 4] = [
            (
                &[
                    entry(0, 1024, true),
                    entry(4096, 100, false),
                    entry(4190, 418, false),
                ],
                "appears more than once",
                4190,
            ),
            (
                &[entry(0, 1000, true), entry(4096, 512, false)],
                "is missing",
                1000,
            ),
            (
                &[entry(0, 1025, true), entry(4096, 512, false)],
                "lies outside guest memory",
                1024,
            ),
            (&[entry(0, 1024, true)], "is missing", 4096),
        ];
        for (index, want, at) in cases {
            match prove_coverage(&h, index) {
                Err(FormatError::Coverage { what, page, .. }) => {
                    assert_eq!((what, page), (want, at), "{index:?}")
                }
                other => panic!("{index:?}: {other:?}"),
            }
        }
        let outside = [
            entry(0, 1024, true),
            entry(4096, 512, false),
            entry(9000, 1, false),
        ];
        assert!(matches!(
            prove_coverage(&h, &outside),
            Err(FormatError::Coverage {
                what: "lies outside guest memory",
                ..
            })
        ));
    }

    #[test]
    fn the_fill_takes_hot_records_first_then_file_order() {
        let mut index = [
            entry(0, 600, false),
            entry(600, 10, false),
            entry(610, 414, true),
            entry(4096, 512, false),
        ];
        index[0].hot = true;
        index[3].hot = true;
        let (chunks, _) = plan(&index);
        // Chunks: record 0 → 0 (pages 0..512), 1 (512..600); record 1 → 2; record 2 → 3;
        // record 3 → 4.
        assert_eq!(chunks.len(), 5);
        let hot = |c: &Chunk| index[c.record as usize].hot;
        assert_eq!(fill_order(&chunks, hot), [0, 1, 4, 2, 3]);
    }

    #[test]
    fn chunks_are_records_cut_at_huge_page_boundaries() {
        let index = [
            entry(4096, 512, true),
            entry(500, 524, false),
            entry(0, 500, false),
        ];
        let (chunks, by_page) = plan(&index);
        let got: Vec<(u64, u32, u32, bool)> = chunks
            .iter()
            .map(|c| (c.first_page, c.pages, c.record, c.zero))
            .collect();
        assert_eq!(
            got,
            [
                (4096, 512, 0, true),
                (500, 12, 1, false),
                (512, 512, 1, false),
                (0, 500, 2, false)
            ]
        );
        let firsts: Vec<u64> = by_page
            .iter()
            .map(|&c| chunks[c as usize].first_page)
            .collect();
        assert_eq!(firsts, [0, 500, 512, 4096]);
    }
}
