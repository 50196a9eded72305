//! What the kernel says about our own pages, as the saver and the reader ask it: whether a range
//! may hold data, and which parts are huge pages. The one pagemap reader is `uffd_sys::pagemap`
//! (PAGEMAP_SCAN, falling back to the classic `/proc/self/pagemap`); for guest memory registered
//! with a [`WpTracker`], which knows what backs each region, the tracker answers first.

use wp_tracker::{HostRange, WpTracker};

/// False only if no page of the range is present (other than the zero page) or swapped out,
/// i.e. the whole range reads as zeros. Any doubt answers true.
pub fn may_have_data(start: usize, len: usize) -> bool {
    uffd_sys::pagemap::may_have_data(start, len)
}

/// False only if no page of `range`, guest memory registered with `tracker`, can hold data:
/// the tracker's answer where it knows the backing ([`WpTracker::may_hold_data`]: page
/// cache for memfd and hugetlbfs, uffd-wp markers told apart from swap on anonymous
/// memory), else [`may_have_data`]. Authoritative while the range is protected.
pub fn may_hold_data(tracker: &WpTracker, range: HostRange) -> bool {
    tracker
        .may_hold_data(range)
        .unwrap_or_else(|| may_have_data(range.start, range.len))
}

/// Runs `(start, end)` of the range mapped by huge pages (THP or hugetlb); empty if the
/// kernel cannot tell (no PAGEMAP_SCAN).
pub fn huge_ranges(start: usize, len: usize) -> Vec<(usize, usize)> {
    uffd_sys::pagemap::huge_regions(start, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    #[test]
    fn untouched_heap_memory_has_no_data() {
        // A large zeroed allocation is a fresh anonymous mapping: nothing present yet.
        let mut v = vec![0u8; 8 << 20];
        let base = (v.as_ptr() as usize + PAGE * 2) & !(PAGE - 1);
        assert!(!may_have_data(base, 1 << 20));
        let off = base - v.as_ptr() as usize;
        v[off + 5 * PAGE] = 1;
        assert!(may_have_data(base, 1 << 20));
        assert!(!may_have_data(base + 6 * PAGE, 16 * PAGE));
    }
}
