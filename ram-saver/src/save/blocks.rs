//! Guest memory as blocks, and the one state machine every sub-block goes through:
//! PROTECTED → CLAIMED (exactly one thread copies it, still write-protected) → RELEASED
//! (unprotected, its writer woken). States only move forward, so neither the scanner nor the
//! fault thread copies a sub-block the other released, and nothing is released before it is
//! copied.
//!
//! A save that keeps what it saved protected ([`SaveOptions::keep_protected`], for write
//! tracking after the save) has two more states: the scanner moves a sub-block it saved from
//! CLAIMED to SAVED (saved, still protected; so do sub-blocks an incremental save inherits from
//! the parent, from the start), and a fault on a CLAIMED sub-block moves it to WANTED (a writer
//! waits), which makes the scanner release it instead. A fault on a SAVED sub-block only
//! releases it (SAVED → RELEASED): its content is in the file already. So at the end RELEASED
//! means "written since the freeze" and SAVED "unchanged since the freeze, still protected".
//!
//! [`SaveOptions::keep_protected`]: super::SaveOptions::keep_protected

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wp_tracker::HostRange;

use super::{SaveError, Shared, PAGE_SIZE};

pub(super) const PROTECTED: u8 = 0;
pub(super) const CLAIMED: u8 = 1;
pub(super) const RELEASED: u8 = 2;
/// Claimed, and a fault on it waits: the claimer releases it (keep-protected saves only).
pub(super) const WANTED: u8 = 3;
/// Saved (or inherited from the parent) and still write-protected (keep-protected saves only).
pub(super) const SAVED: u8 = 4;

/// One sub-block of guest memory: the unit of state, and of the fault thread's copy and release.
#[derive(Debug, Clone, Copy)]
pub(super) struct Block {
    pub(super) gpa: u64,
    pub(super) host: usize,
    pub(super) len: usize,
}

/// A scan unit: consecutive sub-blocks the scanner copies together and releases in one call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Unit {
    pub(super) first: usize,
    pub(super) count: usize,
    pub(super) host: usize,
    pub(super) gpa: u64,
    pub(super) len: usize,
}

/// All sub-blocks, their states, scan units, and host address lookup. Sub-blocks are computed
/// from their unit rather than stored: building the map is on the critical path of the first
/// faults (vCPUs already run), and a table of every 4 KiB sub-block costs tens of ms there
/// (`docs/PERFORMANCE.md`, "Start-up").
#[derive(Debug)]
pub(super) struct BlockMap {
    pub(super) state: Vec<AtomicU8>,
    pub(super) units: Vec<Unit>,
    /// Unit was backed by a transparent huge page when the save started.
    pub(super) huge: Vec<bool>,
    /// A fault released part of a huge unit: the kernel split its huge page.
    pub(super) split: Vec<AtomicBool>,
    /// (host start, host len, first sub-block, first unit), sorted by host start.
    pub(super) by_host: Vec<(usize, usize, usize, usize)>,
    pub(super) fault_block: usize,
    pub(super) unit_size: usize,
    /// Sub-block is the parent's (an incremental save stores a Parent run for it); empty when
    /// the save stores everything.
    pub(super) inherited: Vec<bool>,
}

impl BlockMap {
    pub(super) fn new(
        mem: &GuestMemoryMmap,
        unit_size: usize,
        fault_block: usize,
    ) -> Result<Self, SaveError> {
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
            inherited: Vec::new(),
        })
    }

    /// Marks every sub-block that no range of `increment` (host ranges) touches as inherited
    /// from the parent: SAVED from the start, never copied. Returns how many.
    pub(super) fn inherit_outside(&mut self, increment: &[HostRange]) -> usize {
        let mut ranges = increment.to_vec();
        ranges.sort_unstable_by_key(|r| r.start);
        let mut inherited = vec![false; self.n_blocks()];
        let mut n = 0;
        for (i, flag) in inherited.iter_mut().enumerate() {
            let b = self.block(i);
            let end = b.host + b.len;
            let k = ranges.partition_point(|r| r.end() <= b.host);
            let touched = ranges.get(k).is_some_and(|r| r.start < end);
            if !touched {
                *flag = true;
                self.state[i].store(SAVED, Ordering::Relaxed);
                n += 1;
            }
        }
        self.inherited = inherited;
        n
    }

    /// True if sub-block `i` is the parent's.
    pub(super) fn is_inherited(&self, i: usize) -> bool {
        self.inherited.get(i).copied().unwrap_or(false)
    }

    pub(super) fn n_blocks(&self) -> usize {
        self.state.len()
    }

    /// Sub-block `i`.
    pub(super) fn block(&self, i: usize) -> Block {
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
    pub(super) fn find(&self, addr: usize) -> Option<(usize, usize)> {
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

    pub(super) fn claim(&self, b: usize) -> Result<(), u8> {
        self.state[b]
            .compare_exchange(PROTECTED, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
    }
}

impl Shared<'_> {
    /// Host range of `n` sub-blocks from `first` (consecutive in one region).
    pub(super) fn range_of(&self, first: usize, n: usize) -> HostRange {
        let (b, last) = (self.blocks.block(first), self.blocks.block(first + n - 1));
        HostRange {
            start: b.host,
            len: last.host + last.len - b.host,
        }
    }

    /// Copy claimed, still protected sub-blocks: a plain memcpy is sound because every writer
    /// blocks on the write-protect fault until we release them.
    pub(super) fn copy_claimed(&self, range: HostRange, buf: &mut [u8]) -> Result<(), SaveError> {
        self.tracker
            .copy_protected(range, buf)
            .map_err(SaveError::Tracker)
    }

    /// Release `n` claimed sub-blocks from `first` in one call, waking their writers.
    pub(super) fn release_run(&self, first: usize, n: usize) -> Result<(), SaveError> {
        self.tracker
            .unprotect(self.range_of(first, n), true)
            .map_err(SaveError::Tracker)?;
        for s in &self.blocks.state[first..first + n] {
            s.store(RELEASED, Ordering::Release);
        }
        self.released.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    /// The scanner is done with `n` claimed sub-blocks from `first`: release them, or with
    /// [`SaveOptions::keep_protected`](super::SaveOptions::keep_protected) leave them protected
    /// (SAVED), releasing only those a fault waits for (WANTED) — unless `release`: while the
    /// guest writes all over its memory ([`Shared::copy_first`]) it would fault on each of them
    /// right after, so they are released now and count as written since the freeze (a larger
    /// record of writes for the next incremental save, never a smaller one).
    pub(super) fn finish_run(
        &self,
        first: usize,
        n: usize,
        release: bool,
    ) -> Result<(), SaveError> {
        if !self.keep_protected || release {
            return self.release_run(first, n);
        }
        for i in first..first + n {
            let r = self.blocks.state[i].compare_exchange(
                CLAIMED,
                SAVED,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if r.is_err() {
                // WANTED: a writer waits for it.
                self.release_run(i, 1)?;
            } else {
                self.released.fetch_add(1, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    /// A write fault on a sub-block that is SAVED (keep-protected saves): its content is in the
    /// file (or the parent's), so only release it; it counts as written since the freeze.
    /// False if it was not SAVED.
    pub(super) fn release_saved(&self, i: usize) -> Result<bool, SaveError> {
        if self.blocks.state[i]
            .compare_exchange(SAVED, RELEASED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Ok(false);
        }
        self.tracker
            .unprotect(self.range_of(i, 1), true)
            .map_err(SaveError::Tracker)?;
        Ok(true)
    }

    /// Host ranges of the sub-blocks released (written since the freeze), merged.
    pub(super) fn released_ranges(&self) -> Vec<HostRange> {
        let mut out: Vec<HostRange> = Vec::new();
        for i in 0..self.blocks.n_blocks() {
            if self.blocks.state[i].load(Ordering::Acquire) != RELEASED {
                continue;
            }
            let r = self.range_of(i, 1);
            match out.last_mut() {
                Some(last) if last.end() == r.start => last.len += r.len,
                _ => out.push(r),
            }
        }
        out
    }

    pub(super) fn all_released(&self) -> bool {
        self.released.load(Ordering::Acquire) == self.blocks.n_blocks()
    }
}
