//! Guest memory as blocks, and the one state machine every sub-block goes through:
//! PROTECTED → CLAIMED (exactly one thread copies it, still write-protected) → RELEASED
//! (unprotected, its writer woken). States only move forward, so neither the scanner nor the
//! fault thread copies a sub-block the other released, and nothing is released before it is
//! copied.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wp_tracker::HostRange;

use super::{SaveError, Shared, PAGE_SIZE};

pub(super) const PROTECTED: u8 = 0;
pub(super) const CLAIMED: u8 = 1;
pub(super) const RELEASED: u8 = 2;

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
        })
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

    pub(super) fn all_released(&self) -> bool {
        self.released.load(Ordering::Acquire) == self.blocks.n_blocks()
    }
}
