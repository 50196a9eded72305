//! Staging: the buffers guest memory is copied into while still protected, before compression
//! and I/O. Two pools, so that faults never wait for the scan's buffers: scan staging (a fixed
//! budget, reused at the pace of the output) and fault staging, which grows on demand up to a cap
//! ([`SaveOptions::max_staging`], by default half of the host's available memory and never more
//! than guest RAM: [`default_max_staging`]). Both are allocated as used and reused, never freed
//! during a save, and freed when it ends. [`Staging`] faults buffers in before the freeze.
//!
//! While the guest writes all over its memory ([`Shared::guest_busy`]), the scanner too copies
//! into fault staging, up to half of its cap (all of it when the cap holds every sub-block), so
//! that protected memory is staged at memory speed rather than at the output's: the guest stops
//! faulting once everything is released, and the output drains the staged data afterwards. The
//! save of an idle guest, or of one writing a few units, does not grow staging. Only past
//! the cap does a fault wait, and then for the next buffer the workers give back (they take
//! staged data oldest first).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{lock, SaveOptions, Shared, PAGE_SIZE, POLL};

/// Staging memory budget of the scanner (bounded independent of guest size).
const SCAN_STAGING: usize = 32 << 20;
/// Fault staging cap when the host's available memory cannot be read: guest size /
/// [`FALLBACK_SHARE`] within [`MIN_STAGING`]..=[`FALLBACK_MAX`].
const FALLBACK_SHARE: usize = 8;
const FALLBACK_MAX: usize = 128 << 20;
/// Smallest default fault staging cap.
const MIN_STAGING: usize = 4 << 20;
/// The default cap takes this share (1/n) of the host's available memory.
const AVAILABLE_SHARE: u64 = 2;
/// At most this many scan staging buffers (tiny blocks).
const MAX_BUFFERS: usize = 1024;
/// Fault staging faulted in ahead by [`Staging::prepare`], in bytes.
const FAULT_WARM: usize = 16 << 20;
/// Nice value of the workers and the writer while copy and release come first
/// ([`Shared::copy_first`]).
pub(super) const YIELD_NICE: i32 = 10;
/// Fewest faults served before the guest counts as busy ([`Shared::guest_busy`]) …
const BUSY_FAULTS: usize = 16;
/// … and one fault for every this many units the scanner has passed (and of a small guest's
/// units).
const BUSY_SHARE: usize = 8;
/// The guest counts as writing (the scanner may grow fault staging) this long after a fault.
pub(super) const BUSY_AFTER_FAULT: Duration = Duration::from_millis(100);
/// While the guest writes, the scanner keeps this many fault buffers faulted in ahead, so that a
/// fault that grows staging does not pay for zeroing fresh memory (~1 ms per 2 MiB here).
const READY_AHEAD: usize = 8;

/// Figures of a save's staging memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StagingFigures {
    /// Cap of fault staging, bytes (the scan's fixed staging comes on top).
    pub cap_bytes: u64,
    /// Most staging memory held at once (fault and scan staging), bytes.
    pub peak_bytes: u64,
    /// Fault staging reached its cap: a fault found it full and waited.
    pub cap_reached: bool,
    /// Faults that waited for staging (only past the cap).
    pub waits: u64,
    /// Their total wait, µs.
    pub wait_total_us: u64,
    /// Their longest wait, µs.
    pub wait_max_us: u64,
    /// Units the scanner staged in fault staging while the guest wrote.
    pub scan_units_staged: u64,
    /// Fault staging prepared before the freeze ([`Staging::prepare_fault`]), bytes.
    #[serde(default)]
    pub prepared_bytes: u64,
    /// Time preparing staging took before the freeze, ms (not guest time: it still ran).
    #[serde(default)]
    pub prepare_ms: f64,
    /// Staging was sized by a probe ([`Staging::size_by_probe`]): the 2 MiB units the guest wrote
    /// during it (0: no probe), and how long it watched, ms.
    #[serde(default)]
    pub probe_units: u64,
    /// See `probe_units`.
    #[serde(default)]
    pub probe_ms: f64,
}

/// The host's available memory (MemAvailable of /proc/meminfo), bytes.
pub fn host_available_memory() -> Option<u64> {
    meminfo("MemAvailable:")
}

/// The host's memory (MemTotal of /proc/meminfo), bytes.
pub fn host_total_memory() -> Option<u64> {
    meminfo("MemTotal:")
}

fn meminfo(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Default fault staging cap for `guest_bytes` of guest RAM: half of the host's available memory
/// (what the host can spare now without swapping or reclaiming much), never more than guest RAM
/// (a save stages each page at most once), at least 4 MiB. Where the available memory cannot be
/// read, guest size / 8 within 4..=128 MiB.
pub fn default_max_staging(guest_bytes: usize) -> usize {
    match host_available_memory() {
        Some(avail) => usize::try_from(avail / AVAILABLE_SHARE)
            .unwrap_or(usize::MAX)
            .min(guest_bytes)
            .max(MIN_STAGING),
        None => (guest_bytes / FALLBACK_SHARE).clamp(MIN_STAGING, FALLBACK_MAX),
    }
}

/// Staging memory faulted in ahead of a save, so the first copies after the thaw (the fault
/// thread's above all) do not fault in fresh pages one by one while a vCPU waits: first-touch
/// memory is zeroed by the kernel at about 1 GB/s, so a fresh 2 MiB fault buffer costs
/// milliseconds, and a guest writing a small hot set hits its first faults right after the thaw
/// (figures in `docs/PERFORMANCE.md`, "Staging"). Prepare it before pausing the guest: it costs
/// the caller that time (tens of ms), not the guest. Clones share the buffers; the first save
/// takes them.
#[derive(Clone, Default)]
pub struct Staging(Arc<Mutex<Prepared>>);

#[derive(Default)]
struct Prepared {
    /// Bytes of each buffer.
    size: usize,
    bufs: Vec<Buf>,
    /// How many of `bufs` (at their end) are for the scan pool.
    scan: usize,
    /// Fault staging prepared (bytes), and how long preparing everything took.
    fault_bytes: u64,
    took: Duration,
    /// Grow fault staging to what a probe sees the guest write, up to this many bytes.
    probe_cap: Option<usize>,
    /// What the probe saw: units written, and how long it watched.
    probe_units: u64,
    probe_ms: f64,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = lock(&self.0);
        write!(f, "Staging({} × {} bytes)", g.bufs.len(), g.size)
    }
}

impl Staging {
    /// Fault in the scan pool and 16 MiB of fault buffers for a save with `opts`
    /// (buffers of `opts.block_size`; the fault pool uses them when its unit is the whole
    /// block, as on THP- and hugetlbfs-backed memory).
    pub fn prepare(opts: &SaveOptions) -> Self {
        Self::prepare_fault(opts, FAULT_WARM)
    }

    /// [`prepare`](Self::prepare) with `fault_bytes` of fault buffers (at least 16 MiB; the save
    /// uses no more than its cap of them). Memory the process has not used before is slow to
    /// come by on some hosts (in a cloud VM, first-touched memory costs 1–3 ms per 2 MiB here,
    /// against 0.3 ms for a copy into memory already in use: `docs/PERFORMANCE.md`, "Fresh
    /// memory"); prepared before the freeze, a guest that writes all over its memory then never
    /// waits for it. Costs that time before the save, and the memory until the save ends.
    pub fn prepare_fault(opts: &SaveOptions, fault_bytes: usize) -> Self {
        let t = Instant::now();
        let size = opts.block_size.max(PAGE_SIZE);
        let fault = fault_bytes.max(FAULT_WARM).div_ceil(size);
        // More than the usual: the guest is expected to write all over its memory, and the
        // scanner then stages in fault staging. Its own pool is left to allocate on demand, so
        // that what is prepared stays within the cap rather than the cap plus the scan pool.
        let scan = if fault > FAULT_WARM.div_ceil(size) {
            0
        } else {
            scan_pool_len(opts)
        };
        let bufs = (0..scan + fault).map(|_| faulted_in(size)).collect();
        Staging(Arc::new(Mutex::new(Prepared {
            size,
            bufs,
            scan,
            fault_bytes: (fault * size) as u64,
            took: t.elapsed(),
            ..Prepared::default()
        })))
    }

    /// Asks whoever freezes the guest to size fault staging by watching it first (up to `cap`
    /// bytes): where no record says what the guest writes (a VM's first save), the units it
    /// writes in a short window while all RAM is write-protected ahead of the freeze
    /// (`vm-snapshot`'s armed freeze) are what it will fault on during the save.
    pub fn size_by_probe(self, cap: usize) -> Self {
        lock(&self.0).probe_cap = Some(cap);
        self
    }

    /// The cap of a probe asked for with [`size_by_probe`](Self::size_by_probe), until one has
    /// been recorded ([`grow_fault`](Self::grow_fault)).
    pub fn probe_cap(&self) -> Option<usize> {
        lock(&self.0).probe_cap
    }

    /// Grows prepared fault staging to `fault_bytes` (as if prepared with
    /// [`prepare_fault`](Self::prepare_fault) with that size: beyond the usual 16 MiB the
    /// buffers prepared for the scan pool become fault staging, and the scan pool allocates on
    /// demand) and records the probe that
    /// asked for it: `units` written in `window`. Buffers are faulted in without holding the
    /// lock. Nothing grows once a save took the buffers.
    pub fn grow_fault(&self, opts: &SaveOptions, fault_bytes: usize, units: u64, window: Duration) {
        let t = Instant::now();
        let size = opts.block_size.max(PAGE_SIZE);
        let want = fault_bytes.max(FAULT_WARM).div_ceil(size);
        let have = {
            let mut g = lock(&self.0);
            g.probe_cap = None;
            g.probe_units = units;
            g.probe_ms = window.as_secs_f64() * 1e3;
            if g.size != size || g.bufs.is_empty() || want <= FAULT_WARM.div_ceil(size) {
                return;
            }
            g.bufs.len()
        };
        let more: Vec<Buf> = (have..want).map(|_| faulted_in(size)).collect();
        let mut g = lock(&self.0);
        if g.bufs.is_empty() {
            return;
        }
        g.bufs.extend(more);
        g.bufs.truncate(want);
        g.scan = 0;
        g.fault_bytes = (g.bufs.len() * size) as u64;
        g.took += t.elapsed();
    }

    /// What the probe saw: units written and ms watched (`(0, 0.0)`: no probe).
    pub(super) fn probe(&self) -> (u64, f64) {
        let g = lock(&self.0);
        (g.probe_units, g.probe_ms)
    }

    /// Prepared buffers not taken by a save yet.
    pub fn buffers(&self) -> usize {
        lock(&self.0).bufs.len()
    }

    /// The buffers, if they have `size` bytes (empty otherwise, and afterwards): those for the
    /// scan pool, and those for the fault pool.
    fn take(&self, size: usize) -> (Vec<Buf>, Vec<Buf>) {
        let mut g = lock(&self.0);
        if g.size != size {
            return (Vec::new(), Vec::new());
        }
        let mut fault = std::mem::take(&mut g.bufs);
        let scan = fault.split_off(fault.len() - g.scan.min(fault.len()));
        (scan, fault)
    }

    /// Fault staging prepared, bytes.
    pub fn fault_bytes(&self) -> u64 {
        lock(&self.0).fault_bytes
    }

    /// The time preparing took, ms.
    pub(super) fn prepare_ms(&self) -> f64 {
        lock(&self.0).took.as_secs_f64() * 1e3
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

/// Fault staging cap of a save with `opts` for `guest_bytes` of guest memory: the caller's, else
/// [`default_max_staging`]; never more than guest RAM.
pub(super) fn max_staging(opts: &SaveOptions, guest_bytes: usize) -> usize {
    opts.max_staging
        .unwrap_or_else(|| default_max_staging(guest_bytes))
        .min(guest_bytes.max(PAGE_SIZE))
}

/// The scan pool and the fault pool (of `fault_block`-sized buffers) of a save with `opts`.
/// Prepared buffers go to the scan pool first, the rest to the fault pool if its unit fits.
pub(super) fn pools(opts: &SaveOptions, fault_block: usize, guest_bytes: usize) -> (Pool, Pool) {
    let (mut scan, mut prepared) = opts.staging.take(opts.block_size);
    let scan_pool = Pool::with_buffers(scan_pool_len(opts), opts.block_size, &mut scan);
    prepared.append(&mut scan);
    if fault_block != opts.block_size {
        prepared.clear();
    }
    let fault_pool = Pool::with_buffers(
        (max_staging(opts, guest_bytes) / fault_block).max(min_pool(opts)),
        fault_block,
        &mut prepared,
    );
    (scan_pool, fault_pool)
}

/// A bounded set of equally sized staging buffers, allocated on first use: allocating and
/// zeroing a whole pool up front would hold up the first faults by tens of milliseconds
/// (`docs/PERFORMANCE.md`, "Start-up").
#[derive(Debug)]
pub(super) struct Pool {
    pub(super) state: Mutex<PoolState>,
    pub(super) cv: Condvar,
    pub(super) cap: usize,
    pub(super) size: usize,
    /// Buffers it started with (prepared before the freeze).
    prepared: usize,
}

#[derive(Debug, Default)]
pub(super) struct PoolState {
    pub(super) free: Vec<Buf>,
    pub(super) allocated: usize,
    /// Acquisitions that had to wait for a buffer, their total and their longest wait (µs).
    pub(super) waits: u64,
    pub(super) wait_total_us: u64,
    pub(super) wait_max_us: u64,
    /// A taker found the pool at its cap with nothing free.
    pub(super) exhausted: bool,
}

/// A staging buffer: a mapping of its own, so that the memory goes back to the host when the save
/// ends (heap memory of this size would stay with the allocator's per-thread arenas).
pub(super) type Buf = uffd_sys::host::PageBuf;

/// A new buffer of `size` bytes (not faulted in yet). Failing to map it is the out-of-memory
/// condition a heap allocation would abort the process on; here it ends the save's thread (the
/// save fails and releases the guest) with the reason.
fn new_buf(size: usize) -> Buf {
    Buf::new(size).unwrap_or_else(|e| panic!("cannot map {size} bytes of staging memory: {e}"))
}

/// A fresh buffer of `size` bytes, each page written once so that a copy into it does not
/// fault pages in (a new mapping maps nothing yet).
fn faulted_in(size: usize) -> Buf {
    let mut b = new_buf(size);
    for i in (0..size).step_by(PAGE_SIZE) {
        b[i] = 0xa5;
    }
    b
}

impl Pool {
    /// A pool that starts with up to `cap` of the `ready` buffers (taken from its end).
    pub(super) fn with_buffers(cap: usize, size: usize, ready: &mut Vec<Buf>) -> Self {
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
            prepared: n,
        }
    }

    /// Buffers handed out and not yet returned.
    pub(super) fn in_use(&self) -> usize {
        let g = lock(&self.state);
        g.allocated - g.free.len()
    }

    /// A buffer if one is free or may still be allocated, without waiting.
    pub(super) fn try_acquire(&self) -> Option<Buf> {
        self.try_acquire_below(self.cap)
    }

    /// A buffer if one is free, or may be allocated while fewer than `limit` are in use.
    fn try_acquire_below(&self, limit: usize) -> Option<Buf> {
        let mut g = lock(&self.state);
        if g.allocated - g.free.len() >= limit.min(self.cap) {
            return None;
        }
        if let Some(b) = g.free.pop() {
            return Some(b);
        }
        if g.allocated < self.cap {
            g.allocated += 1;
            drop(g);
            return Some(new_buf(self.size));
        }
        None
    }

    /// A free buffer while more than [`READY_AHEAD`] are free (prepared and not needed by faults
    /// yet), never a new one.
    fn try_take_spare(&self) -> Option<Buf> {
        let mut g = lock(&self.state);
        if g.free.len() > READY_AHEAD {
            g.free.pop()
        } else {
            None
        }
    }

    /// Fault in free buffers until [`READY_AHEAD`] are free or the pool is at its cap, at most
    /// [`READY_AHEAD`] per call: while faults take them as fast as they come, the scanner would
    /// otherwise do nothing but fault in buffers.
    fn keep_ready(&self) {
        for _ in 0..READY_AHEAD {
            {
                let mut g = lock(&self.state);
                if g.free.len() >= READY_AHEAD || g.allocated >= self.cap {
                    return;
                }
                g.allocated += 1;
            }
            let b = faulted_in(self.size);
            lock(&self.state).free.push(b);
            self.cv.notify_all();
        }
    }

    /// Staging memory held, bytes.
    fn bytes(&self) -> u64 {
        (lock(&self.state).allocated * self.size) as u64
    }
}

impl Shared<'_> {
    fn pool(&self, fault: bool) -> &Pool {
        if fault {
            &self.fault_pool
        } else {
            &self.scan_pool
        }
    }

    /// A buffer of the fault pool (`fault`) or the scan pool, waiting while it is at its cap;
    /// `None` once the save stops.
    pub(super) fn acquire_buffer(&self, fault: bool) -> Option<Buf> {
        let pool = self.pool(fault);
        if let Some(b) = pool.try_acquire() {
            return Some(b);
        }
        let t = Instant::now();
        let mut g = lock(&pool.state);
        g.exhausted = true;
        loop {
            if let Some(b) = g.free.pop() {
                let us = t.elapsed().as_micros() as u64;
                g.waits += 1;
                g.wait_total_us += us;
                g.wait_max_us = g.wait_max_us.max(us);
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

    pub(super) fn release_buffer(&self, b: Buf, fault: bool) {
        let pool = self.pool(fault);
        lock(&pool.state).free.push(b);
        // One waiter per pool at most (the fault thread, or the scanner), and the scanner may
        // wait for the fault pool to drain.
        pool.cv.notify_all();
    }

    /// The guest wrote to protected memory within [`BUSY_AFTER_FAULT`].
    pub(super) fn guest_writing(&self) -> bool {
        let last = self.last_fault_us.load(Ordering::Relaxed);
        last != 0
            && self.started.elapsed().as_micros() as u64
                <= last + BUSY_AFTER_FAULT.as_micros() as u64
    }

    /// A staging buffer for the scanner (`true`: of fault staging). While the guest is busy, fault
    /// staging first (up to half of its cap, so faults keep the other half; all of it when it
    /// holds every sub-block, since then no fault can wait for it), keeping buffers
    /// faulted in ahead for the fault thread: the scanner then copies and releases at memory
    /// speed instead of waiting for the workers and the output. Else a prepared fault buffer
    /// beyond those kept ready for faults, or its own pool, waiting for it; `None` once the save
    /// stops.
    pub(super) fn scan_buffer(&self) -> Option<(Buf, bool)> {
        let growable = self.fault_pool.size == self.scan_pool.size;
        let limit = if self.staging_holds_everything() {
            self.fault_pool.cap
        } else {
            self.fault_pool.cap / 2
        };
        loop {
            if growable && self.guest_busy() {
                if let Some(b) = self.fault_pool.try_acquire_below(limit) {
                    self.fault_pool.keep_ready();
                    return Some((b, true));
                }
            } else if growable {
                // Fault staging prepared beyond what faults keep ready (a busy guest was
                // expected): memory already paid for, rather than more for the scan pool.
                if let Some(b) = self.fault_pool.try_take_spare() {
                    return Some((b, true));
                }
            }
            if let Some(b) = self.scan_pool.try_acquire() {
                return Some((b, false));
            }
            if self.stopped() {
                return None;
            }
            let g = lock(&self.scan_pool.state);
            if g.free.is_empty() {
                let _ = self.scan_pool.cv.wait_timeout(g, POLL);
            }
        }
    }

    /// The guest writes all over protected memory: a fault within [`BUSY_AFTER_FAULT`], at
    /// least [`BUSY_FAULTS`] faults in this save (one per [`BUSY_SHARE`] units of a smaller
    /// guest), and one for every [`BUSY_SHARE`] units the scanner has passed. A guest writing a few units (timer ticks, a small hot set) does not
    /// qualify: staging the rest at memory speed would not spare it a fault, only cost memory.
    pub(super) fn guest_busy(&self) -> bool {
        if !self.guest_writing() {
            return false;
        }
        let faults = self.faults_served.load(Ordering::Relaxed) as usize;
        let least = BUSY_FAULTS.min(self.blocks.units.len() / BUSY_SHARE).max(1);
        faults >= least && faults * BUSY_SHARE >= self.scan_pos.load(Ordering::Relaxed)
    }

    /// Copy and release come first: the guest is busy ([`guest_busy`](Self::guest_busy)), fault
    /// staging can hold every sub-block and the scan is not done. The scanner then runs at the
    /// fault thread's priority and releases what it saves, and the workers and the writer run at
    /// [`YIELD_NICE`], so the guest stops faulting as soon as memory allows; the output drains
    /// the staged data afterwards.
    pub(super) fn copy_first(&self) -> bool {
        self.guest_busy()
            && self.staging_holds_everything()
            && !self.scan_done.load(Ordering::Acquire)
    }

    /// Fault staging has a buffer for every sub-block: each is staged at most once, so neither
    /// faults nor the scanner can ever find it full.
    pub(super) fn staging_holds_everything(&self) -> bool {
        self.fault_pool.cap >= self.blocks.n_blocks()
    }

    /// The figures of this save's staging.
    pub(super) fn staging_figures(&self) -> StagingFigures {
        let g = lock(&self.fault_pool.state);
        StagingFigures {
            cap_bytes: (self.fault_pool.cap * self.fault_pool.size) as u64,
            peak_bytes: (g.allocated * self.fault_pool.size) as u64 + self.scan_pool.bytes(),
            cap_reached: g.exhausted,
            waits: g.waits,
            wait_total_us: g.wait_total_us,
            wait_max_us: g.wait_max_us,
            scan_units_staged: self.scan_units_staged.load(Ordering::Relaxed),
            prepared_bytes: (self.fault_pool.prepared * self.fault_pool.size) as u64,
            prepare_ms: self.prepare_ms,
            probe_units: self.probe.0,
            probe_ms: self.probe.1,
        }
    }
}

/// A saver thread's nice value, changed only when it differs from the last one set; the value
/// the thread had when this was made is its base, restored when dropped (the writer runs on the
/// caller's thread).
pub(super) struct Nice {
    base: i32,
    now: i32,
}

impl Nice {
    /// The calling thread's nice value now is the base.
    pub(super) fn new() -> Self {
        let n = uffd_sys::host::thread_nice().unwrap_or(0);
        Nice { base: n, now: n }
    }

    /// `n` while `cond` (if given), else the base value.
    pub(super) fn set_if(&mut self, cond: bool, n: Option<i32>) {
        let want = match n {
            Some(n) if cond => n,
            _ => self.base,
        };
        if want != self.now {
            // Best effort: raising priority needs CAP_SYS_NICE; the save works without.
            let _ = uffd_sys::host::set_thread_nice(want);
            self.now = want;
        }
    }
}

impl Drop for Nice {
    fn drop(&mut self) {
        self.set_if(false, None);
    }
}
