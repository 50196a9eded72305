//! Staging: the buffers guest memory is copied into while still protected, before compression
//! and I/O. Two bounded pools, so that faults never wait for the scan's buffers: scan staging
//! (a fixed budget) and fault staging (a share of guest memory), both allocated as used and
//! reused, never freed during a save. [`Staging`] faults buffers in before the freeze.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::{lock, SaveOptions, Shared, PAGE_SIZE, POLL};

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
/// Fault staging faulted in ahead by [`Staging::prepare`], in bytes.
const FAULT_WARM: usize = 16 << 20;

/// Staging memory faulted in ahead of a save, so the first copies after the thaw (the fault
/// thread's above all) do not fault in fresh pages one by one while a vCPU waits: first-touch
/// memory is zeroed by the kernel at about 1 GB/s, so a fresh 2 MiB fault buffer costs
/// milliseconds, and a guest writing a small hot set hits its first faults right after the thaw
/// (figures in `docs/PERFORMANCE.md`, "Staging"). Prepare it before pausing the guest: it costs
/// the caller that time (tens of ms), not the guest. Clones share the buffers; the first save
/// takes them.
#[derive(Clone, Default)]
pub struct Staging(Arc<Mutex<(usize, Vec<Vec<u8>>)>>);

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = lock(&self.0);
        write!(f, "Staging({} × {} bytes)", g.1.len(), g.0)
    }
}

impl Staging {
    /// Fault in the scan pool and 16 MiB of fault buffers for a save with `opts`
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

/// Fault staging budget of a save with `opts` for `guest_bytes` of guest memory.
pub(super) fn fault_staging(opts: &SaveOptions, guest_bytes: usize) -> usize {
    opts.fault_staging
        .unwrap_or((guest_bytes / FAULT_STAGING_SHARE).clamp(FAULT_STAGING_MIN, FAULT_STAGING_MAX))
}

/// The scan pool and the fault pool (of `fault_block`-sized buffers) of a save with `opts`.
/// Prepared buffers go to the scan pool first, the rest to the fault pool if its unit fits.
pub(super) fn pools(opts: &SaveOptions, fault_block: usize, guest_bytes: usize) -> (Pool, Pool) {
    let mut prepared = opts.staging.take(opts.block_size);
    let scan_pool = Pool::with_buffers(scan_pool_len(opts), opts.block_size, &mut prepared);
    if fault_block != opts.block_size {
        prepared.clear();
    }
    let fault_pool = Pool::with_buffers(
        (fault_staging(opts, guest_bytes) / fault_block).max(min_pool(opts)),
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
}

#[derive(Debug, Default)]
pub(super) struct PoolState {
    pub(super) free: Vec<Vec<u8>>,
    pub(super) allocated: usize,
    /// Acquisitions that had to wait for a buffer, and the longest wait (µs).
    pub(super) waits: u64,
    pub(super) wait_max_us: u64,
}

impl Pool {
    /// A pool that starts with up to `cap` of the `ready` buffers (taken from its end).
    pub(super) fn with_buffers(cap: usize, size: usize, ready: &mut Vec<Vec<u8>>) -> Self {
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
    pub(super) fn in_use(&self) -> usize {
        let g = lock(&self.state);
        g.allocated - g.free.len()
    }

    /// A buffer if one is free or may still be allocated, without waiting.
    pub(super) fn try_acquire(&self) -> Option<Vec<u8>> {
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

impl Shared<'_> {
    fn pool(&self, fault: bool) -> &Pool {
        if fault {
            &self.fault_pool
        } else {
            &self.scan_pool
        }
    }

    pub(super) fn acquire_buffer(&self, fault: bool) -> Option<Vec<u8>> {
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

    pub(super) fn release_buffer(&self, b: Vec<u8>, fault: bool) {
        let pool = self.pool(fault);
        lock(&pool.state).free.push(b);
        // One waiter per pool at most (the fault thread, or the scanner), and the scanner may
        // wait for the fault pool to drain.
        pool.cv.notify_all();
    }
}
