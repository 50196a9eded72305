//! Transparent huge pages: which units were huge when the save started, and collapsing back,
//! once nothing is protected any more, the huge pages that 4 KiB fault releases split.

use std::sync::atomic::Ordering;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wp_tracker::HostRange;

use super::blocks::BlockMap;
use super::Shared;
use crate::pagemap;

/// Transparent huge page size (x86-64 PMD).
pub(super) const HUGE_PAGE: usize = 2 << 20;
/// Huge pages collapsed per MADV_COLLAPSE call at most.
const COLLAPSE_BATCH: usize = 32;

/// The host ranges of guest memory mapped by transparent huge pages now (one PAGEMAP_SCAN per
/// region); read once per save, for the fault unit and for [`BlockMap::find_huge`].
pub(super) fn huge_ranges(mem: &GuestMemoryMmap) -> Vec<(usize, usize)> {
    mem.iter()
        .filter_map(|r| {
            let len = usize::try_from(r.len()).ok()?;
            let host = mem.get_host_address(r.start_addr()).ok()? as usize;
            Some(pagemap::huge_ranges(host, len))
        })
        .flatten()
        .collect()
}

/// At least half of guest memory lies in the `huge` ranges.
pub(super) fn mostly_thp(mem: &GuestMemoryMmap, huge: &[(usize, usize)]) -> bool {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let huge: usize = huge.iter().map(|(s, e)| e - s).sum();
    total > 0 && huge as u64 * 2 >= total
}

impl BlockMap {
    /// Mark the units inside the THP-backed `huge` ranges (from [`huge_ranges`]).
    pub(super) fn find_huge(&mut self, huge: &[(usize, usize)]) {
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

impl Shared<'_> {
    /// Back every huge unit split by faults with a huge page again (MADV_COLLAPSE). Runs once
    /// nothing is protected any more, so the collapse never delays a write fault. Adjacent
    /// units go in one call (each call drains every CPU's LRU cache first, ~0.5 ms). Best
    /// effort: a failed collapse costs speed, never correctness.
    pub(super) fn restore_huge_pages(&self) {
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
}
