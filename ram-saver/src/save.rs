//! The live save engine: a linear scan and a fault thread race for blocks of write-protected
//! guest RAM; each block is copied exactly once while still protected, released in one call,
//! then compressed and written elsewhere.
//!
//! Threads (all scoped, borrowing guest memory and the tracker):
//! - fault thread: reads write faults, claims the faulting sub-block, copies it to staging,
//!   unprotects it (waking the vCPU) and queues it ahead of scan output. No compression, no I/O.
//!   A batch of faults read together is served first (copy + release each), bookkeeping after.
//!   It is the first thread started: vCPUs already run and block on their first write.
//! - scanner: walks units ([`SaveOptions::block_size`], 2 MiB) in address order, claims every
//!   sub-block still protected, skips the copy for units the kernel says hold no page, copies,
//!   releases each run of claimed sub-blocks in one call, queues; throttled by `max_bandwidth`.
//! - compression workers: turn staged runs into zero runs and (compressed) data records; all
//!   queued fault pieces (up to 1 MiB) become one batch; fault work always goes first.
//! - the calling thread: writes encoded batches, fault batches first, reports progress,
//!   finishes the file; huge pages that faults split are collapsed back meanwhile (see below).
//!
//! Sub-block states only move forward: PROTECTED → CLAIMED (one thread copies) → RELEASED.
//! Whatever goes wrong, [`ReleaseGuard`] and `abort` unprotect every range.
//!
//! # Cancel and failures never wait for the output
//! Once fault staging is full, every guest write waits for the writer, and the writer may wait
//! for a disk that does not answer (a hung NFS or FUSE mount, a dying disk): a write stuck in
//! the kernel cannot be interrupted. So nothing that frees the guest runs on the writer: a
//! watcher thread polls `cancel` every [`CANCEL_POLL`] and aborts, and `abort` (from whichever
//! thread fails) unprotects all guest RAM at once, then abandons the output
//! ([`SnapshotSink::abandon_flag`]): the writer stops waiting for the I/O thread, every saver
//! thread sees the stop within [`POLL`], and a file sink leaves its stuck write and the removal
//! of its temporary to detached threads after a bounded wait (200 ms each). The guest is free
//! within milliseconds of the cancel; `live_save` returns `Cancelled` within about half a
//! second even while the disk hangs. Sinks without an abandon flag (streams) still free the
//! guest at once, but `live_save` returns only when their blocked write does.
//!
//! # Performance choices, measured
//! `cargo run --release -p ram-saver --example save_bench`: 1 GiB anonymous memory, one writer
//! thread writing random pages at full speed (it blocks on faults like a vCPU), output to
//! `io::sink`, 2-core VM shared with other builds (numbers are ranges over runs; noisy).
//!
//! | lever | before | after |
//! |---|---|---|
//! | staging copy, 2 MiB pieces | vm-memory volatile `read_slice` 1.8–6.4 GB/s | [`WpTracker::copy_protected`] memcpy 5.0–7.4 GB/s |
//! | fault unit on THP memory (host threads; see below for a KVM guest) | 2 MiB: p50 0.3–1.0 ms, p99 3–37 ms | 4 KiB: p50 3–29 µs, p99 63–180 µs |
//! | fault unit on 4 KiB-page memory | 2 MiB: p50 0.32 ms, p99 3–12 ms | 4 KiB: p50 3–22 µs, p99 48–210 µs |
//! | THP after save, 4 KiB fault unit | no restore: 1024 → 36 MiB | MADV_COLLAPSE afterwards: 1024 → 1024 MiB, +0.3 s |
//! | busy-polling fault thread | blocking poll: p50 3–10 µs | spin: p50 6–21 µs, p99 up to 0.9 ms |
//!
//! - The fault unit ([`SaveOptions::fault_block_size`]) depends on the backing. On memory mostly
//!   mapped by transparent huge pages (≥ half, one PAGEMAP_SCAN at the start) it is the whole
//!   unit (2 MiB): a fault copies and releases the whole huge page, which stays huge, so nothing
//!   is split and nothing needs collapsing. On 4 KiB-page memory it is 4 KiB (a fault copies and
//!   releases one page; 64 KiB measured p50 14–42 µs, 2 MiB 0.3–1 ms). On hugetlbfs memory (which
//!   cannot release less than a huge page) it is the whole block. Why not 4 KiB on THP (the
//!   first choice, from the host-thread table above): with a real KVM guest under PVM (shadow
//!   paging) every change to the host mapping of guest RAM invalidates KVM's shadow MMU for that
//!   range. 4 KiB releases split the huge page, so the guest re-faults its shadow entries 4 KiB at
//!   a time until the MADV_COLLAPSE after the save (and again then). Measured with the built-in
//!   guest (`snapctl boot --mem 1G --write-rate full`, 2 vCPUs, 2 cores, `snapctl save` with the
//!   hidden `--fault-block`/`--scan-block`/`--no-huge-restore` flags; guest rate during the save
//!   as a share of before, worst vCPU stall; ranges over runs):
//!
//!   | fault unit (THP guest) | runs | guest rate during/before | worst stall ms | fault p50 / p99 |
//!   |---|---|---|---|---|
//!   | 4 KiB (old default) | 9 raw + 2 zstd | 11–29 % (mean 19 %) | 13–531 (median ~110) | 15–45 µs / 0.2–0.9 ms |
//!   | 64 KiB | 6 raw + 2 zstd | 11–41 % (mean 24 %) | 30–369 | 36–108 µs / 0.3–2.8 ms |
//!   | 2 MiB (new default) | 9 raw + 2 zstd | 27–69 % (mean 49 %) | 14–600 (median ~20) | 0.7–5.8 ms / 6–17 ms |
//!   | 4 KiB, no collapse after | 3 raw | 11–50 % | 868–1376 | 20–89 µs / 0.3–0.6 ms |
//!   | 4 KiB, 512 KiB scan units | 3 raw | 25–27 % | 771–1424 | 20–26 µs / 0.2–0.3 ms |
//!
//!   Faults drop from 9–20 K to ~500 per 1 GiB save; each takes milliseconds, but the guest loses
//!   far less, and the save ends sooner (1.6–4.3 s vs 2.7–5.4 s raw). The price: fault staging
//!   fills in 2 MiB buffers, extra RSS 185–187 MiB instead of 43–47 MiB (`cargo xtask bench
//!   --quick`, 1 GiB; bounded by the fault staging budget). On 4 KiB-page memory (`--mem-backend memfd`) the guest keeps only ~2 % of its rate
//!   whatever the fault unit (nothing to keep huge; every write-protected page costs a shadow
//!   re-fault), so 4 KiB stays there. The worst stalls (hundreds of ms) do not come from fault
//!   service (fault max 5–21 ms): vCPUs go without progress that long, most likely CPU
//!   contention with the saver threads on 2 cores plus shadow-MMU rebuilds; not fixed here.
//!   With 4 KiB units on THP memory, units that were huge when the save started and got split
//!   are collapsed back with MADV_COLLAPSE once nothing is protected any more
//!   ([`SaveOptions::restore_huge_pages`]; adjacent units in one call: about 0.6 ms per huge page,
//!   0.3 s for a fully split 1 GiB). Collapsing inline in the scanner instead made faults wait
//!   behind the mmap lock (max 13 ms) and tripled the save.
//! - The scanner releases a 2 MiB unit in one call (one TLB flush per 2 MiB; whole huge pages
//!   stay huge).
//! - The fault thread blocks in poll by default: with 2 cores a spinning thread takes the CPU
//!   the vCPU and the workers need, and p99 got worse. [`SaveOptions::fault_spin`] turns it on
//!   for hosts with cores to spare.
//! - Fault and scan staging are separate pools (scan: 32 MiB; fault: see below), so faults
//!   never wait for the scan's buffers. Staging stays bounded independent of guest size.
//! - Larger scan units release more per call: on 4 KiB-page memory 32 MiB units saved 1 GiB in
//!   0.36–0.45 s instead of 0.6–1.2 s, but a vCPU faulting inside a claimed unit waits for its
//!   whole copy (~5 ms for 32 MiB), so the default stays 2 MiB.
//!
//! ## Stalls, staging, compression, threads (2-core VM, disk 0.26–0.33 GB/s)
//! `save_bench --mem thp --out file --writers 2 [--zstd 1]`: two writer threads rewriting whole
//! random pages with random data (~0.9–1.1 M pages/s together, like the built-in guest), output
//! to `target/` (same disk as the product's snapshots; page-cache writes are throttled to disk
//! speed, so the save is disk-bound). Ranges over runs; the VM is noisy.
//!
//! | lever | before | after |
//! |---|---|---|
//! | start-up before the fault thread serves | 69–133 ms (= the worst stall, right after the thaw) | 1–8 ms |
//! | worst stall, raw | 42–83 ms | 20–63 ms (rare outliers ~100+ ms) |
//! | adaptive zstd, random data: save | 9.9–11.4 s (0.09–0.11 GB/s) | 4.2–5.4 s (0.20–0.26 GB/s), like raw |
//! | adaptive zstd, random data: worst stall | 66–79 ms, pool waits 983 ms in total | 20–23 ms typical, no pool waits |
//! | raw save duration | 5.4–7.2 s | 3.6–5.4 s (fsync overlaps the huge-page collapse) |
//!
//! - Where the stalls came from: (1) the 30–90 ms of zeroing 8192 fault buffers and 7–40 ms of
//!   building a 262 K-entry block table before the fault thread existed, while the vCPUs were
//!   already blocked on their first writes; fixed by lazy pools and sub-blocks computed from their
//!   unit. (2) With zstd on incompressible data the fault pool (32 MiB) ran dry and faults
//!   waited for compression (160 waits > 1 ms per save); fixed by adaptive compression. (3) What
//!   is left is CPU contention: 2 vCPUs + saver threads on 2 cores; the scanner, once it has
//!   claimed a unit, can be preempted for up to 40–100 ms while a vCPU waits on that unit, and a
//!   single unprotect call was seen taking 8–38 ms. Thread priorities would need `unsafe`
//!   (setpriority) outside this crate.
//! - Guest rate during the save stays at 20–30 % of before, raw or zstd: a full-speed guest on
//!   a 2-core host loses a core's worth to the saver's copies, and every first write to a page
//!   costs a fault (20–130 K per save). Not fixed here.
//! - Fault staging: guest / 8 within 4–128 MiB ([`SaveOptions::fault_staging`]), allocated
//!   as used. With adaptive compression the pool never ran dry in these runs (0 waits), so the
//!   larger reserve costs nothing unless needed; peak extra RSS 54–108 MiB (before: 40–100).
//!   [`SaveSummary::fault_buffer_waits`] reports whether it did. While more than half of the
//!   fault pool is in use, the scanner pauses (claiming nothing) until it drains below a
//!   quarter, so workers and the writer serve fault data only.
//! - Writer priority: encoded fault batches go to the writer before scan batches (separate
//!   bounded queues). Batches are kept for reuse, never dropped and regrown: freeing and
//!   growing 2 MiB vectors is munmap/mremap, which takes the mmap lock fault handling needs.
//! - Adaptive compression: a batch that zstd leaves above 97 % of its size makes the workers
//!   store the next 64 MiB raw without trying, then probe again; separately for fault data and
//!   scan data. Compressible memory (`--fill text`, no writers) still compresses (ratio 0.43).
//! - Workers default to cores − 1 (at least 1): raw and incompressible data need little CPU
//!   there, and on 2 cores workers take CPU from the vCPUs. The cost: compressible memory
//!   saves at 0.13 GB/s with 1 worker vs 0.19 GB/s with 2 (zstd-1 through `RecordEncoder`
//!   runs far below the `zstd` CLI's 0.5 GB/s per core on the same data; not investigated).
//! - Output (session 2): files are written with `O_DIRECT` from aligned 8 MiB buffers by an
//!   I/O thread ([`AtomicFileSink`](crate::AtomicFileSink)); streams keep a 4 MiB `BufWriter`.
//!   Before, through the page cache, `perf record -a` during a 4 GiB full-speed save put 49 % of
//!   all samples (both cores) in the kernel's copy into page-cache pages
//!   (`copy_folio_from_iter_atomic`): the writer ran at ~0.5 GB/s and took a core from the
//!   guest. `snapctl boot --mem 4G --write-rate full` + `snapctl save` (1 vCPU): 8.5 s → 2.3 s
//!   (0.5 → 1.9 GB/s); guest time lost (duration × (1 − rate during/before)) 7.3 s → 2.2 s.
//!   1 GiB, 2 vCPUs: 1.8–2.2 s → 0.65–0.9 s. The disk takes `O_DIRECT` writes at 1.6–2.8 GB/s
//!   here vs 0.36–1.5 GB/s buffered + fsync (`cargo xtask bench` measures both).
//! - Priorities (session 2; `SaveOptions::fault_nice`, `SaveOptions::bulk_nice`): the fault
//!   thread runs at nice −10 where the VMM may raise priority, so a fault does not queue behind
//!   the copies of the scanner and the workers. 1 GiB guest, 1 vCPU writing a 32 MiB hot set
//!   at full speed, 3 saves each: worst stall 8–22 ms → 5–9 ms, guest time lost 0.30–0.33 s →
//!   0.20–0.28 s (fault −15, scan/compression +10). With 2 busy vCPUs on 2 cores every CPU the
//!   saver takes is the guest's loss: scan/compression at nice 10 (`snapctl save --background`)
//!   raise the guest's rate during the save from 32–48 % to 61–71 %, but the save takes 2–3×
//!   longer (0.8 → 1.7–2.5 s) and the guest loses a little more in total (0.5 → 0.63–0.78 s);
//!   nice 19 gives 84 % during a 16–22 s save. So the default keeps scan and compression at
//!   normal priority and `--background` is the user's choice.
//! - Where a hot-set guest's time goes (session 2, 1 GiB, 1 vCPU writing 32 MiB at full
//!   speed, 3 saves each): with the vCPU thread pinned alone to one core and every other thread
//!   of the VMM to the other, the guest still keeps only 66–67 % of its rate during the save, so
//!   CPU sharing is not the whole story; a memcpy hog at 8 GB/s on the other core costs it
//!   nothing, so neither is memory bandwidth. 32 MiB scan units (16× fewer claims, pagemap scans
//!   and unprotect calls) lift it to 77–91 % but a vCPU faulting into a unit being copied waits
//!   for all 32 MiB (stalls 13–19 ms). Batching only the unprotect calls (scanner releases
//!   copied 2 MiB units in 32 MiB runs, a fault on a copied-but-protected unit releases it at
//!   once) did not help (69–74 %) and slowed full-RAM saves (guest time lost 0.55 → 0.75 s), so it
//!   was dropped. Left: find which per-unit host operation costs the running PVM guest.
//! - Record payloads are checksummed and copied in one pass, 64 KiB at a time
//!   ([`RecordEncoder`]); a 2 MiB payload fell out of the cache between the two passes.
//! - Tried and dropped in session 2 (1 GiB, 2 vCPUs, full speed, 3 saves each; no change
//!   beyond run-to-run noise in guest time lost, 0.55–0.65 s per save): nice −10 for the fault
//!   thread (and +5 for scanner and workers) with this full-RAM writer (the hot-set case
//!   above is where priorities pay); fault staging 256 MiB–1 GiB instead of 128 MiB
//!   (buffer waits went to 0, guest rate did not move); a prefault thread keeping staging
//!   faulted in with MADV_POPULATE_WRITE (copy 0.45 → 0.37 ms per 2 MiB fault, lost nothing
//!   else); a second fault-serving thread taking every other fault of a batch. Timing inside
//!   a 2 MiB fault (1 GiB, 2 vCPUs): waiting for a staging buffer 0.3–0.9 ms, copy 0.3–0.5 ms,
//!   release 0.2–0.5 ms (the unprotect of a huge page: TLB shootdown plus PVM's shadow-MMU
//!   invalidation). With this guest (uniform random page writes over all of RAM) nearly every
//!   2 MiB unit is hit within milliseconds of the thaw, so the guest is gated by how fast
//!   units are saved whatever the fault path does: the save's length, not fault tricks,
//!   decides what the guest loses.
//! - Never-touched memory is neither read nor copied on any backing: the scanner asks
//!   [`WpTracker::may_hold_data`] (page cache for memfd and hugetlbfs, pagemap with the marker's
//!   swap type for anonymous memory) and stores empty units as zero runs.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
/// Staging memory budget of the scanner (bounded independent of guest size).
const SCAN_STAGING: usize = 32 << 20;
/// Staging memory budget of the fault thread, separate so that a burst of faults right after
/// the freeze instant finds buffers without waiting for the scan's compression and I/O:
/// guest size / [`FAULT_STAGING_SHARE`] within [`FAULT_STAGING_MIN`]..=[`FAULT_STAGING_MAX`],
/// allocated as faults need it.
const FAULT_STAGING_SHARE: usize = 8;
const FAULT_STAGING_MIN: usize = 4 << 20;
const FAULT_STAGING_MAX: usize = 128 << 20;
/// At most this many scan staging buffers (tiny blocks).
const MAX_BUFFERS: usize = 1024;
/// Fault items a worker encodes into one batch, at most (bytes).
const FAULT_BATCH_BYTES: usize = 1 << 20;
/// Encoded fault batches waiting for the writer, at most.
const OUT_FAULT_CAP: usize = 16;
/// The scanner pauses while more than this share of the fault pool is in use …
const SCAN_PAUSE_AT: (usize, usize) = (1, 2);
/// … until less than this share is.
const SCAN_RESUME_AT: (usize, usize) = (1, 4);
/// Adaptive compression: a zstd batch stored at more than this share of its input …
const RAW_RATIO: f64 = 0.97;
/// … makes the next this many bytes go raw without trying zstd.
const RAW_SKIP: u64 = 64 << 20;
/// Transparent huge page size (x86-64 PMD).
const HUGE_PAGE: usize = 2 << 20;
/// Huge pages collapsed per MADV_COLLAPSE call at most.
const COLLAPSE_BATCH: usize = 32;
/// Default unit of the fault thread on 4 KiB-page memory (see the crate docs; THP-backed memory
/// uses the whole unit).
const DEFAULT_FAULT_BLOCK: usize = 4096;
/// Fault staging faulted in ahead by [`Staging::prepare`], in bytes.
const FAULT_WARM: usize = 16 << 20;
/// Default of [`SaveOptions::fault_nice`].
const DEFAULT_FAULT_NICE: i32 = -10;
/// Default of [`SaveOptions::fault_spin`].
const DEFAULT_SPIN: bool = false;
/// A spinning fault thread yields its core between polls after this long without faults.
const SPIN_IDLE: Duration = Duration::from_millis(1);
/// How often blocked loops look at the stop flag, and how long the fault thread waits.
const POLL: Duration = Duration::from_millis(10);
/// How often the watcher looks at the caller's cancel flag: a cancel frees the guest within
/// this, plus one unprotect call.
const CANCEL_POLL: Duration = Duration::from_millis(5);
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
    /// Compression threads (default: the number of cores minus one, at least one).
    pub workers: usize,
    /// Unit the fault thread copies and releases; `None` chooses from the memory's backing: the
    /// whole unit on hugetlbfs and mostly-THP memory, else 4 KiB (see the crate docs).
    pub fault_block_size: Option<usize>,
    /// Busy-poll the userfaultfd while a save runs (default: false, see the crate docs).
    pub fault_spin: Option<bool>,
    /// After the save, collapse huge pages that 4 KiB releases split back into huge pages
    /// (MADV_COLLAPSE; default true).
    pub restore_huge_pages: bool,
    /// Fault staging budget in bytes; `None`: guest size / 8 within 4..=128 MiB.
    pub fault_staging: Option<usize>,
    /// Nice value of the fault thread (default −10: a fault preempts the bulk threads and the
    /// vCPUs; applied where permitted, i.e. with CAP_SYS_NICE). `None` leaves it alone.
    pub fault_nice: Option<i32>,
    /// Nice value of the scanner and compression threads (default: unchanged). A positive value
    /// (`snapctl save --background` uses 10) leaves more CPU to a busy guest; the save takes
    /// longer, and memory the guest writes meanwhile still goes first through the fault thread.
    pub bulk_nice: Option<i32>,
    /// Staging buffers faulted in before the freeze ([`Staging::prepare`]); the save takes
    /// them. Without, every staging buffer is faulted in on first use, inside the copy.
    pub staging: Staging,
    /// Test-only failure injection.
    #[doc(hidden)]
    pub inject_failure: Option<InjectPoint>,
}

/// Staging memory faulted in ahead of a save, so the first copies after the thaw (the fault
/// thread's above all) do not fault in fresh pages one by one while a vCPU waits.
///
/// Measured with `cargo xtask bench` (session 2): on this machine first-touch memory is
/// zeroed at about 1 GB/s (`perf`: `clear_page_erms` dominates a restore), so a fresh 2 MiB
/// fault buffer cost ~2 ms; a guest writing a small hot set hits its 10–30 faults right after
/// the thaw, all on fresh buffers (fault p50 2–3 ms, vs 0.4–0.9 ms for the reused buffers of a
/// full-RAM writer). Prepare it before pausing the guest: it costs the caller that time (tens of
/// ms), not the guest. Clones share the buffers; the first save takes them.
#[derive(Clone, Default)]
pub struct Staging(Arc<Mutex<(usize, Vec<Vec<u8>>)>>);

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = lock(&self.0);
        write!(f, "Staging({} × {} bytes)", g.1.len(), g.0)
    }
}

impl Staging {
    /// Fault in the scan pool and [`FAULT_WARM`] bytes of fault buffers for a save with `opts`
    /// (buffers of `opts.block_size`; the fault pool uses them when its unit is the whole
    /// block, as on THP- and hugetlbfs-backed memory).
    pub fn prepare(opts: &SaveOptions) -> Self {
        let size = opts.block_size.max(PAGE_SIZE);
        let n = scan_pool_len(opts) + FAULT_WARM.div_ceil(size);
        // Written, not just allocated: `vec![0; n]` would map untouched pages.
        let bufs = (0..n).map(|_| vec![0xa5u8; size]).collect();
        Staging(Arc::new(Mutex::new((size, bufs))))
    }

    /// Prepared buffers not taken by a save yet.
    pub fn buffers(&self) -> usize {
        lock(&self.0).1.len()
    }

    /// The buffers, if they have `size` bytes (empty otherwise, and afterwards).
    fn take(&self, size: usize) -> Vec<Vec<u8>> {
        let mut g = lock(&self.0);
        if g.0 == size {
            std::mem::take(&mut g.1)
        } else {
            Vec::new()
        }
    }
}

/// Fewest buffers in a staging pool: enough for every worker to hold two and the producers some.
fn min_pool(opts: &SaveOptions) -> usize {
    opts.workers.max(1) * 2 + 4
}

/// Scan staging buffers of a save with `opts`.
fn scan_pool_len(opts: &SaveOptions) -> usize {
    let min_pool = min_pool(opts);
    (SCAN_STAGING / opts.block_size.max(PAGE_SIZE)).clamp(min_pool, MAX_BUFFERS.max(min_pool))
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            compression: Compression::None,
            max_bandwidth: None,
            block_size: 2 << 20,
            // One core is left to the vCPUs and the fault thread (see the module docs).
            workers: thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1).max(1)),
            fault_block_size: None,
            fault_spin: None,
            restore_huge_pages: true,
            fault_staging: None,
            staging: Staging::default(),
            fault_nice: Some(DEFAULT_FAULT_NICE),
            bulk_nice: None,
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
    /// Unit of the fault thread's copy and release, in bytes.
    pub fault_block_size: usize,
    /// Huge pages split by 4 KiB releases and collapsed back (MADV_COLLAPSE) after saving.
    pub huge_pages_restored: u64,
    /// Wall time of restoring huge pages, in seconds (overlaps the final flush and fsync).
    pub huge_restore_secs: f64,
    /// Faults that had to wait for a fault staging buffer (the pool was exhausted).
    pub fault_buffer_waits: u64,
    /// Longest such wait, µs.
    pub fault_buffer_wait_max_us: u64,
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

/// One sub-block of guest memory: the unit of state, and of the fault thread's copy and release.
#[derive(Debug, Clone, Copy)]
struct Block {
    gpa: u64,
    host: usize,
    len: usize,
}

/// A scan unit: consecutive sub-blocks the scanner copies together and releases in one call.
#[derive(Debug, Clone, Copy)]
struct Unit {
    first: usize,
    count: usize,
    host: usize,
    gpa: u64,
    len: usize,
}

/// All sub-blocks, their states, scan units, and host address lookup. Sub-blocks are computed
/// from their unit rather than stored: building the map is on the critical path of the first
/// faults (vCPUs already run), and a 262 K-entry table took 7–40 ms.
#[derive(Debug)]
struct BlockMap {
    state: Vec<AtomicU8>,
    units: Vec<Unit>,
    /// Unit was backed by a transparent huge page when the save started.
    huge: Vec<bool>,
    /// A fault released part of a huge unit: the kernel split its huge page.
    split: Vec<AtomicBool>,
    /// (host start, host len, first sub-block, first unit), sorted by host start.
    by_host: Vec<(usize, usize, usize, usize)>,
    fault_block: usize,
    unit_size: usize,
}

impl BlockMap {
    fn new(mem: &GuestMemoryMmap, unit_size: usize, fault_block: usize) -> Result<Self, SaveError> {
        let mut nblocks = 0;
        let mut units = Vec::new();
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
            by_host.push((host, len, nblocks, units.len()));
            let mut off = 0;
            while off < len {
                let n = unit_size.min(len - off);
                let count = n.div_ceil(fault_block);
                units.push(Unit {
                    first: nblocks,
                    count,
                    host: host + off,
                    gpa: gpa + off as u64,
                    len: n,
                });
                nblocks += count;
                off += n;
            }
        }
        by_host.sort_unstable();
        let state = (0..nblocks).map(|_| AtomicU8::new(PROTECTED)).collect();
        let split = units.iter().map(|_| AtomicBool::new(false)).collect();
        Ok(BlockMap {
            huge: vec![false; units.len()],
            state,
            units,
            split,
            by_host,
            fault_block,
            unit_size,
        })
    }

    fn n_blocks(&self) -> usize {
        self.state.len()
    }

    /// Sub-block `i`.
    fn block(&self, i: usize) -> Block {
        let u = self.units.partition_point(|x| x.first <= i) - 1;
        let unit = self.units[u];
        let off = (i - unit.first) * self.fault_block;
        Block {
            gpa: unit.gpa + off as u64,
            host: unit.host + off,
            len: self.fault_block.min(unit.len - off),
        }
    }

    /// Sub-block and unit holding host address `addr`.
    fn find(&self, addr: usize) -> Option<(usize, usize)> {
        let i = self
            .by_host
            .partition_point(|r| r.0 <= addr)
            .checked_sub(1)?;
        let (start, len, first, first_unit) = self.by_host[i];
        (addr < start + len).then(|| {
            (
                first + (addr - start) / self.fault_block,
                first_unit + (addr - start) / self.unit_size,
            )
        })
    }

    fn claim(&self, b: usize) -> Result<(), u8> {
        self.state[b]
            .compare_exchange(PROTECTED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
    }

    /// Mark the units inside the THP-backed `huge` ranges (from [`huge_ranges`]).
    fn find_huge(&mut self, huge: &[(usize, usize)]) {
        for &(host, len, _, first_unit) in &self.by_host {
            for &(start, end) in huge.iter().filter(|(s, _)| (host..host + len).contains(s)) {
                let first = first_unit + (start - host) / self.unit_size;
                let last = first_unit + (end - 1 - host) / self.unit_size;
                for u in first..=last {
                    let unit = self.units[u];
                    // Only units entirely inside a huge run and aligned to 2 MiB count.
                    self.huge[u] = unit.host >= start
                        && unit.host + unit.len <= end
                        && unit.host.is_multiple_of(HUGE_PAGE)
                        && unit.len.is_multiple_of(HUGE_PAGE);
                }
            }
        }
    }
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
        buf: Vec<u8>,
        runs: Vec<Run>,
        /// The buffer belongs to the fault pool.
        fault: bool,
    },
    Zero {
        first_page: u64,
        pages: u64,
    },
}

#[derive(Debug, Default)]
struct OutQueues {
    fault: VecDeque<EncodedBatch>,
    scan: VecDeque<EncodedBatch>,
    workers_left: usize,
    writer_gone: bool,
}

#[derive(Debug, Default)]
struct Queues {
    fault: VecDeque<Work>,
    scan: VecDeque<Work>,
    producers_done: usize,
}

/// A bounded set of equally sized staging buffers, allocated on first use: allocating (and
/// zeroing) 32 MiB of fault buffers up front kept the first faults waiting 30–90 ms.
#[derive(Debug)]
struct Pool {
    state: Mutex<PoolState>,
    cv: Condvar,
    cap: usize,
    size: usize,
}

#[derive(Debug, Default)]
struct PoolState {
    free: Vec<Vec<u8>>,
    allocated: usize,
    /// Acquisitions that had to wait for a buffer, and the longest wait (µs).
    waits: u64,
    wait_max_us: u64,
}

impl Pool {
    /// A pool that starts with up to `cap` of the `ready` buffers (taken from its end).
    fn with_buffers(cap: usize, size: usize, ready: &mut Vec<Vec<u8>>) -> Self {
        let n = ready.len().min(cap);
        let free = ready.split_off(ready.len() - n);
        Pool {
            state: Mutex::new(PoolState {
                allocated: free.len(),
                free,
                ..PoolState::default()
            }),
            cv: Condvar::new(),
            cap,
            size,
        }
    }

    /// Buffers handed out and not yet returned.
    fn in_use(&self) -> usize {
        let g = lock(&self.state);
        g.allocated - g.free.len()
    }

    /// A buffer if one is free or may still be allocated, without waiting.
    fn try_acquire(&self) -> Option<Vec<u8>> {
        let mut g = lock(&self.state);
        if let Some(b) = g.free.pop() {
            return Some(b);
        }
        if g.allocated < self.cap {
            g.allocated += 1;
            drop(g);
            return Some(vec![0u8; self.size]);
        }
        None
    }
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
    spin: bool,
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

    fn pool(&self, fault: bool) -> &Pool {
        if fault {
            &self.fault_pool
        } else {
            &self.scan_pool
        }
    }

    fn acquire_buffer(&self, fault: bool) -> Option<Vec<u8>> {
        let pool = self.pool(fault);
        if let Some(b) = pool.try_acquire() {
            return Some(b);
        }
        let t = Instant::now();
        let mut g = lock(&pool.state);
        loop {
            if let Some(b) = g.free.pop() {
                g.waits += 1;
                g.wait_max_us = g.wait_max_us.max(t.elapsed().as_micros() as u64);
                return Some(b);
            }
            if self.stopped() {
                return None;
            }
            g = pool
                .cv
                .wait_timeout(g, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    fn release_buffer(&self, b: Vec<u8>, fault: bool) {
        let pool = self.pool(fault);
        lock(&pool.state).free.push(b);
        // One waiter per pool at most (the fault thread, or the scanner), and the scanner may
        // wait for the fault pool to drain.
        pool.cv.notify_all();
    }

    /// Queue fault work (never waits: fault staging is bounded by its pool).
    fn push_fault_work(&self, w: &mut Vec<Work>) {
        if w.is_empty() {
            return;
        }
        let n = w.len();
        lock(&self.queues).fault.extend(w.drain(..));
        if n == 1 {
            self.work_cv.notify_one();
        } else {
            self.work_cv.notify_all();
        }
    }

    /// Queue scan work, waiting while the scan queue is full.
    fn push_scan_work(&self, w: Work) {
        let mut q = lock(&self.queues);
        while q.scan.len() >= self.scan_queue_cap && !self.stopped() {
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

    /// Next work into `out`: every queued fault item up to [`FAULT_BATCH_BYTES`] (they are
    /// encoded into one batch), else one scan item. False when both producers are done and
    /// the queues are empty, or the save stops.
    fn pop_work(&self, out: &mut Vec<Work>) -> bool {
        let mut q = lock(&self.queues);
        loop {
            if self.stopped() {
                return false;
            }
            if !q.fault.is_empty() {
                let mut bytes = 0;
                while let Some(w) = q.fault.pop_front() {
                    if let Work::Data { runs, .. } = &w {
                        bytes += runs.iter().map(|r| r.len).sum::<usize>();
                    }
                    out.push(w);
                    if bytes >= FAULT_BATCH_BYTES {
                        break;
                    }
                }
                return true;
            }
            if let Some(w) = q.scan.pop_front() {
                drop(q);
                self.space_cv.notify_one();
                out.push(w);
                return true;
            }
            if q.producers_done == 2 {
                return false;
            }
            q = self
                .work_cv
                .wait_timeout(q, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    /// Hand an encoded batch to the writer; waits while that kind's output queue is full.
    fn send_batch(&self, b: EncodedBatch, fault: bool) -> bool {
        let mut q = lock(&self.out);
        loop {
            if self.stopped() || q.writer_gone {
                return false;
            }
            let (len, cap) = if fault {
                (q.fault.len(), OUT_FAULT_CAP)
            } else {
                (q.scan.len(), self.scan_queue_cap)
            };
            if len < cap {
                break;
            }
            q = self
                .out_cv
                .wait_timeout(q, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
        if fault {
            q.fault.push_back(b);
        } else {
            q.scan.push_back(b);
        }
        drop(q);
        self.out_cv.notify_all();
        true
    }

    /// Next encoded batch for the writer, fault batches first; `Ok(None)` when all workers are
    /// done and nothing is left; `Err(())` on timeout.
    fn recv_batch(&self, timeout: Duration) -> Result<Option<EncodedBatch>, ()> {
        let mut q = lock(&self.out);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(b) = q.fault.pop_front().or_else(|| q.scan.pop_front()) {
                drop(q);
                self.out_cv.notify_all();
                return Ok(Some(b));
            }
            if q.workers_left == 0 {
                return Ok(None);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(());
            }
            q = self
                .out_cv
                .wait_timeout(q, deadline - now)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    fn worker_done(&self) {
        lock(&self.out).workers_left -= 1;
        self.out_cv.notify_all();
    }

    /// Host range of `n` sub-blocks from `first` (consecutive in one region).
    fn range_of(&self, first: usize, n: usize) -> HostRange {
        let (b, last) = (self.blocks.block(first), self.blocks.block(first + n - 1));
        HostRange {
            start: b.host,
            len: last.host + last.len - b.host,
        }
    }

    /// Copy claimed, still protected sub-blocks: a plain memcpy is sound because every writer
    /// blocks on the write-protect fault until we release them.
    fn copy_claimed(&self, range: HostRange, buf: &mut [u8]) -> Result<(), SaveError> {
        self.tracker
            .copy_protected(range, buf)
            .map_err(SaveError::Tracker)
    }

    /// Release `n` claimed sub-blocks from `first` in one call, waking their writers.
    fn release_run(&self, first: usize, n: usize) -> Result<(), SaveError> {
        self.tracker
            .unprotect(self.range_of(first, n), true)
            .map_err(SaveError::Tracker)?;
        for s in &self.blocks.state[first..first + n] {
            s.store(RELEASED, Ordering::Release);
        }
        self.released.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    fn all_released(&self) -> bool {
        self.released.load(Ordering::Acquire) == self.blocks.n_blocks()
    }

    /// Fault thread: serve faults until every block is released (or the save stops).
    fn fault_loop(&self) -> Result<(), SaveError> {
        let mut faults = Vec::with_capacity(256);
        let mut pending = Vec::with_capacity(256);
        let mut lat = Vec::with_capacity(256);
        let mut idle_since = Instant::now();
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
            if self.spin {
                // Busy-poll: no wakeup latency, at the price of a core while the save runs.
                let n = self
                    .tracker
                    .read_faults(&mut faults)
                    .map_err(SaveError::Tracker)?;
                if n == 0 {
                    if idle_since.elapsed() > SPIN_IDLE {
                        // Let others run now and then; keeps a stuck save from hogging a core.
                        thread::yield_now();
                    }
                    std::hint::spin_loop();
                    continue;
                }
                idle_since = Instant::now();
            } else {
                self.tracker
                    .wait_faults(POLL, &mut faults)
                    .map_err(SaveError::Tracker)?;
            }
            let read_at = Instant::now();
            for f in &faults {
                self.serve_fault(f.addr, read_at, &mut pending, &mut lat)?;
            }
            // Bookkeeping once per batch, after every vCPU of the batch was released.
            self.push_fault_work(&mut pending);
            if !lat.is_empty() {
                self.faults_served
                    .fetch_add(lat.len() as u64, Ordering::Relaxed);
                lock(&self.latencies_us).append(&mut lat);
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

    /// Claim, copy and release the sub-block at `addr`; its work goes to `pending` and its
    /// service latency to `lat` (both handed on once per batch of faults).
    fn serve_fault(
        &self,
        addr: usize,
        read_at: Instant,
        pending: &mut Vec<Work>,
        lat: &mut Vec<u64>,
    ) -> Result<(), SaveError> {
        let Some((i, u)) = self.blocks.find(addr) else {
            return Ok(());
        };
        match self.blocks.claim(i) {
            Ok(()) => {
                if self.inject == Some(InjectPoint::FaultPanic) {
                    panic!("injected fault thread failure");
                }
                let buf = match self.fault_pool.try_acquire() {
                    Some(b) => Some(b),
                    None => {
                        // The pool is dry: what we hold back must reach the workers first,
                        // or nothing would ever come back.
                        self.push_fault_work(pending);
                        self.acquire_buffer(true)
                    }
                };
                let Some(mut buf) = buf else {
                    return Ok(());
                };
                let b = self.blocks.block(i);
                self.copy_claimed(self.range_of(i, 1), &mut buf[..b.len])?;
                if self.blocks.huge[u] && b.len < self.blocks.units[u].len {
                    // Set before the release, so whoever sees RELEASED also sees the split.
                    self.blocks.split[u].store(true, Ordering::Release);
                }
                self.release_run(i, 1)?;
                lat.push(read_at.elapsed().as_micros() as u64);
                self.bytes_scanned
                    .fetch_add(b.len as u64, Ordering::Relaxed);
                pending.push(Work::Data {
                    buf,
                    runs: vec![Run {
                        first_page: b.gpa / PAGE_SIZE as u64,
                        off: 0,
                        len: b.len,
                    }],
                    fault: true,
                });
                Ok(())
            }
            // The scanner holds it: its release wakes the faulting thread.
            Err(CLAIMED) => Ok(()),
            // Already released: the event is stale, but make sure nobody sleeps.
            Err(_) => self.wake_page(addr),
        }
    }

    /// Back every huge unit split by faults with a huge page again (MADV_COLLAPSE). Runs once
    /// nothing is protected any more, so the collapse never delays a write fault. Adjacent
    /// units go in one call (each call drains every CPU's LRU cache first, ~0.5 ms). Best
    /// effort: a failed collapse costs speed, never correctness.
    fn restore_huge_pages(&self) {
        let units = &self.blocks.units;
        let mut run: Option<(usize, usize)> = None;
        let flush = |run: &mut Option<(usize, usize)>| {
            if let Some((first, n)) = run.take() {
                let start = units[first].host;
                let last = units[first + n - 1];
                let r = HostRange::new(start, last.host + last.len - start);
                if self.tracker.collapse_huge(r).is_ok() {
                    self.huge_restored.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        };
        for (u, split) in self.blocks.split.iter().enumerate() {
            if !split.swap(false, Ordering::AcqRel) {
                flush(&mut run);
                continue;
            }
            match &mut run {
                Some((first, n))
                    if units[*first + *n - 1].host + units[*first + *n - 1].len
                        == units[u].host
                        && *n < COLLAPSE_BATCH =>
                {
                    *n += 1
                }
                _ => {
                    flush(&mut run);
                    run = Some((u, 1));
                }
            }
        }
        flush(&mut run);
    }

    /// Scanner: claim and save every sub-block still protected, one unit at a time in address
    /// order, releasing each run of claimed sub-blocks in one call.
    fn scan_loop(&self, max_bandwidth: Option<u64>) -> Result<(), SaveError> {
        let pagemap = Pagemap::open();
        let start = Instant::now();
        let mut copied: u64 = 0;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for u in 0..self.blocks.units.len() {
            if self.stopped() {
                return Ok(());
            }
            if let Some(InjectPoint::ScannerPanic { after_blocks }) = self.inject {
                if u >= after_blocks {
                    panic!("injected scanner failure");
                }
            }
            let unit = self.blocks.units[u];
            let protected = (unit.first..unit.first + unit.count)
                .any(|i| self.blocks.state[i].load(Ordering::Acquire) == PROTECTED);
            if protected {
                copied += self.scan_unit(u, &pagemap, &mut runs, start, copied, max_bandwidth)?;
            }
        }
        self.scan_done.store(true, Ordering::Release);
        Ok(())
    }

    /// While the fault pool is more than [`SCAN_PAUSE_AT`] in use, the scanner waits (holding
    /// nothing claimed) until it drains below [`SCAN_RESUME_AT`]: the workers and the writer
    /// then serve fault data only, so the guest gets its buffers back before the scan's.
    fn yield_to_faults(&self) {
        let pool = &self.fault_pool;
        let (pause, resume) = (
            pool.cap * SCAN_PAUSE_AT.0 / SCAN_PAUSE_AT.1,
            pool.cap * SCAN_RESUME_AT.0 / SCAN_RESUME_AT.1,
        );
        if pool.in_use() <= pause {
            return;
        }
        let mut g = lock(&pool.state);
        while g.allocated - g.free.len() > resume && !self.stopped() {
            g = pool
                .cv
                .wait_timeout(g, POLL)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
    }

    /// Save what is still protected of unit `u`; returns the bytes copied.
    fn scan_unit(
        &self,
        u: usize,
        pagemap: &Pagemap,
        runs: &mut Vec<(usize, usize)>,
        start: Instant,
        copied: u64,
        max_bandwidth: Option<u64>,
    ) -> Result<u64, SaveError> {
        let unit = self.blocks.units[u];
        // Throttle before claiming: a claimed block must never wait on the throttle.
        let range = HostRange::new(unit.host, unit.len);
        let likely_data = pagemap.may_hold_data(self.tracker, range);
        if let (Some(rate), true) = (max_bandwidth, likely_data) {
            let burst = self.blocks.unit_size as u64;
            loop {
                let allowed = (start.elapsed().as_secs_f64() * rate as f64) as u64 + burst;
                if copied + unit.len as u64 <= allowed || self.stopped() {
                    break;
                }
                let wait = (copied + unit.len as u64 - allowed) as f64 / rate.max(1) as f64;
                thread::sleep(Duration::from_secs_f64(wait).min(POLL));
            }
        }
        if likely_data {
            self.yield_to_faults();
        }
        let Some(mut buf) = self.acquire_buffer(false) else {
            return Ok(0);
        };
        // Claim every sub-block still protected, as runs of consecutive sub-blocks.
        runs.clear();
        for i in unit.first..unit.first + unit.count {
            if self.blocks.claim(i).is_ok() {
                match runs.last_mut() {
                    Some((f, n)) if *f + *n == i => *n += 1,
                    _ => runs.push((i, 1)),
                }
            }
        }
        if runs.is_empty() {
            self.release_buffer(buf, false);
            return Ok(0);
        }
        // Authoritative check while claimed and protected: nothing can appear unseen.
        if !pagemap.may_hold_data(self.tracker, range) {
            self.release_buffer(buf, false);
            for &(first, n) in runs.iter() {
                self.release_run(first, n)?;
                let r = self.range_of(first, n);
                self.bytes_scanned
                    .fetch_add(r.len as u64, Ordering::Relaxed);
                let first_page = self.blocks.block(first).gpa / PAGE_SIZE as u64;
                let pages = (r.len / PAGE_SIZE) as u64;
                self.push_scan_work(Work::Zero { first_page, pages });
            }
            return Ok(0);
        }
        let mut staged = Vec::with_capacity(runs.len());
        let mut bytes = 0;
        for &(first, n) in runs.iter() {
            let r = self.range_of(first, n);
            let off = r.start - unit.host;
            self.copy_claimed(r, &mut buf[off..off + r.len])?;
            staged.push(Run {
                first_page: self.blocks.block(first).gpa / PAGE_SIZE as u64,
                off,
                len: r.len,
            });
            bytes += r.len;
        }
        for &(first, n) in runs.iter() {
            self.release_run(first, n)?;
        }
        self.bytes_scanned
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.push_scan_work(Work::Data {
            buf,
            runs: staged,
            fault: false,
        });
        Ok(bytes as u64)
    }

    /// Compression worker: staged blocks → encoded batches for the writer.
    ///
    /// Adaptive compression: a batch that zstd does not shrink below [`RAW_RATIO`] makes the
    /// workers store the next [`RAW_SKIP`] bytes raw without trying (records stored raw under
    /// zstd are part of the format), then probe again.
    fn worker_loop(&self, compression: Compression) -> Result<(), SaveError> {
        let mut zstd = RecordEncoder::new(PAGE_SIZE, compression)
            .map_err(|e| SaveError::Write(FormatError::Unwritable(e)))?;
        let mut raw = RecordEncoder::new(PAGE_SIZE, Compression::None)
            .map_err(|e| SaveError::Write(FormatError::Unwritable(e)))?;
        let compressing = !matches!(compression, Compression::None);
        let mut work = Vec::new();
        while self.pop_work(&mut work) {
            if self.inject == Some(InjectPoint::WorkerPanic) {
                panic!("injected worker failure");
            }
            let mut batch = lock(&self.spare_batches).pop().unwrap_or_default();
            batch.clear();
            let data_bytes: usize = work
                .iter()
                .map(|w| match w {
                    Work::Data { runs, .. } => runs.iter().map(|r| r.len).sum(),
                    Work::Zero { .. } => 0,
                })
                .sum();
            let kind = usize::from(matches!(work.first(), Some(Work::Data { fault: true, .. })));
            let skip = compressing && self.take_raw_skip(kind, data_bytes as u64);
            let enc = if skip { &mut raw } else { &mut zstd };
            let mut fault_batch = false;
            let mut r = Ok(());
            for w in work.drain(..) {
                match w {
                    Work::Data { buf, runs, fault } => {
                        fault_batch |= fault;
                        for run in &runs {
                            if r.is_ok() {
                                r = enc.encode(
                                    run.first_page,
                                    &buf[run.off..run.off + run.len],
                                    &mut batch,
                                );
                            }
                        }
                        self.release_buffer(buf, fault);
                    }
                    Work::Zero { first_page, pages } => enc.zero_run(first_page, pages, &mut batch),
                }
            }
            r.map_err(|e| SaveError::Write(FormatError::Unwritable(e)))?;
            if compressing && !skip && batch.totals.data_pages > 0 {
                let input = batch.totals.data_pages * PAGE_SIZE as u64;
                if batch.totals.stored_bytes as f64 > input as f64 * RAW_RATIO {
                    self.raw_skip[kind].store(RAW_SKIP, Ordering::Relaxed);
                }
            }
            if !self.send_batch(batch, fault_batch) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// True if the next `bytes` are to be stored raw without trying zstd.
    fn take_raw_skip(&self, kind: usize, bytes: u64) -> bool {
        self.raw_skip[kind]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                (left > 0).then(|| left.saturating_sub(bytes.max(1)))
            })
            .is_ok()
    }
}

/// The fault thread's unit: the caller's choice, else the whole unit on hugetlbfs (which cannot
/// release less than a huge page) and on memory mostly backed by transparent huge pages (see the
/// crate docs: splitting them costs the guest far more than the longer copy), else
/// [`DEFAULT_FAULT_BLOCK`].
fn fault_block_size(
    mem: &GuestMemoryMmap,
    opts: &SaveOptions,
    huge: &[(usize, usize)],
) -> Result<usize, SaveError> {
    let hugetlb = mem.iter().any(|r| r.is_hugetlbfs() == Some(true));
    let fb = match opts.fault_block_size {
        Some(fb) => fb,
        None if hugetlb => opts.block_size,
        None if opts.block_size.is_multiple_of(HUGE_PAGE) && mostly_thp(mem, huge) => {
            opts.block_size
        }
        None => DEFAULT_FAULT_BLOCK.min(opts.block_size),
    };
    if fb == 0 || !fb.is_multiple_of(PAGE_SIZE) || !opts.block_size.is_multiple_of(fb) {
        return Err(SaveError::InvalidOptions(format!(
            "fault block size {fb} is not a multiple of {PAGE_SIZE} dividing the block size {}",
            opts.block_size
        )));
    }
    Ok(fb)
}

/// The host ranges of guest memory mapped by transparent huge pages now (one PAGEMAP_SCAN per
/// region); read once per save, for the fault unit and for [`BlockMap::find_huge`].
fn huge_ranges(mem: &GuestMemoryMmap, pagemap: &Pagemap) -> Vec<(usize, usize)> {
    mem.iter()
        .filter_map(|r| {
            let len = usize::try_from(r.len()).ok()?;
            let host = mem.get_host_address(r.start_addr()).ok()? as usize;
            Some(pagemap.huge_ranges(host, len))
        })
        .flatten()
        .collect()
}

/// At least half of guest memory lies in the `huge` ranges.
fn mostly_thp(mem: &GuestMemoryMmap, huge: &[(usize, usize)]) -> bool {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let huge: usize = huge.iter().map(|(s, e)| e - s).sum();
    total > 0 && huge as u64 * 2 >= total
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
fn watch_cancel(cancel: &AtomicBool, done: impl Fn() -> bool, on_cancel: impl FnOnce()) {
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
                let _ = wp_tracker::set_thread_nice(n);
            }
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
    let mut guard = ReleaseGuard {
        tracker,
        armed: true,
    };
    let started = Instant::now();
    if opts.max_bandwidth == Some(0) {
        return Err(SaveError::InvalidOptions(
            "max_bandwidth 0 would never finish the scan (and keep pages protected)".into(),
        ));
    }
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
    let huge = huge_ranges(mem, &Pagemap::open());
    let fault_block = fault_block_size(mem, opts, &huge)?;
    let mut blocks = BlockMap::new(mem, opts.block_size, fault_block)?;
    if fault_block < opts.block_size {
        blocks.find_huge(&huge);
    }
    let abandon = sink.abandon_flag();
    let mut writer = SnapshotWriter::new(sink, &header, machine_state).map_err(SaveError::Write)?;

    let guest_bytes = total_pages as usize * PAGE_SIZE;
    let fault_staging = opts
        .fault_staging
        .unwrap_or((guest_bytes / FAULT_STAGING_SHARE).clamp(FAULT_STAGING_MIN, FAULT_STAGING_MAX));
    // Prepared buffers go to the scan pool first, the rest to the fault pool if its unit fits.
    let mut prepared = opts.staging.take(opts.block_size);
    let scan_pool = Pool::with_buffers(scan_pool_len(opts), opts.block_size, &mut prepared);
    if fault_block != opts.block_size {
        prepared.clear();
    }
    let fault_pool = Pool::with_buffers(
        (fault_staging / fault_block).max(min_pool(opts)),
        fault_block,
        &mut prepared,
    );
    let shared = Shared {
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
        spin: opts.fault_spin.unwrap_or(DEFAULT_SPIN),
        inject: opts.inject_failure,
    };
    let shared = &shared;
    let writer_done = AtomicBool::new(false);
    let writer_done = &writer_done;

    thread::scope(|s| {
        let _main_panic = PanicAbort {
            shared,
            name: "writer",
        };
        let mut handles = Vec::new();
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
        let started_threads = [
            watcher,
            spawn_saver(s, shared, "fault", opts.fault_nice, move || {
                let _d = ProducerDone(shared);
                shared.fault_loop()
            }),
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
                report(&writer);
                last = Instant::now();
            }
        }
        lock(&shared.out).writer_gone = true;
        shared.out_cv.notify_all();
        writer_done.store(true, Ordering::Release);
        if let Some(t) = watcher_thread {
            t.unpark();
        }
        for h in handles {
            // Panics were turned into aborts by PanicAbort; the payload adds nothing.
            let _ = h.join();
        }
        report(&writer);
    });

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
    if let Some(i) = (0..shared.blocks.n_blocks())
        .find(|&i| shared.blocks.state[i].load(Ordering::Acquire) != RELEASED)
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
        let f = writer.finish();
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
    let file_bytes = finished.map_err(|e| {
        if cancel.load(Ordering::Acquire) {
            SaveError::Cancelled
        } else {
            SaveError::Write(e)
        }
    })?;
    guard.armed = false;
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
        fault_block_size: fault_block,
        huge_pages_restored: shared.huge_restored.load(Ordering::Relaxed),
        huge_restore_secs,
        fault_buffer_waits: fp.0,
        fault_buffer_wait_max_us: fp.1,
    })
}
