//! What the kernel says about our own pages, read from `/proc/self/pagemap`.
//!
//! Asks PAGEMAP_SCAN (via `uffd-sys`, Linux 6.7+) first; falls back to the classic file: one
//! 8-byte entry per page, read with `pread`. Bit 63 = present, bit 62 = swapped (also set for
//! uffd-wp markers on never-touched pages, so those count as "may have data": conservative,
//! never wrong), bit 57 = uffd write-protected.
//!
//! Page tables are not the whole truth for shared file memory (memfd, hugetlbfs): its page cache
//! may hold pages this process does not map, and write-protected empty entries look swapped.
//! For guest memory registered with a [`WpTracker`], which knows what backs each region,
//! [`Pagemap::may_hold_data`] asks the tracker first.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use uffd_sys::pagemap::ScanQuery;
use uffd_sys::{PAGE_IS_HUGE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED};
use wp_tracker::{HostRange, WpTracker};

const PAGE: usize = 4096;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_UFFD_WP: u64 = 1 << 57;
/// Entries read per `pread` (32 KiB of entries = 16 MiB of address space).
const CHUNK: usize = 4096;

/// A handle on `/proc/self/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    file: Option<File>,
    no_scan: AtomicBool,
}

impl Pagemap {
    /// Open `/proc/self/pagemap`; when it cannot be opened every query answers conservatively.
    pub fn open() -> Self {
        Pagemap {
            file: File::open("/proc/self/pagemap").ok(),
            no_scan: AtomicBool::new(false),
        }
    }

    fn scan(&self, start: usize, len: usize, mut f: impl FnMut(u64) -> bool) -> io::Result<()> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("pagemap unavailable"))?;
        let first = start / PAGE;
        let pages = len.div_ceil(PAGE);
        let mut buf = vec![0u8; CHUNK.min(pages.max(1)) * 8];
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(CHUNK);
            let b = &mut buf[..n * 8];
            file.read_exact_at(b, ((first + done) * 8) as u64)?;
            for e in b.chunks_exact(8) {
                let mut a = [0u8; 8];
                a.copy_from_slice(e);
                if !f(u64::from_le_bytes(a)) {
                    return Ok(());
                }
            }
            done += n;
        }
        Ok(())
    }

    /// False only if the kernel says no page of the range is present or swapped out, i.e. the
    /// whole range reads as zeros. Any doubt (I/O error) answers true.
    pub fn may_have_data(&self, start: usize, len: usize) -> bool {
        if !self.no_scan.load(Ordering::Relaxed) {
            // Present or swapped, but not the shared zero page.
            let q = ScanQuery {
                inverted: PAGE_IS_PFNZERO,
                required: PAGE_IS_PFNZERO,
                anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask: PAGE_IS_PRESENT,
            };
            match uffd_sys::pagemap::scan(start, len, q) {
                Ok(r) => return !r.is_empty(),
                Err(_) => self.no_scan.store(true, Ordering::Relaxed),
            }
        }
        let mut any = false;
        let r = self.scan(start, len, |e| {
            any = e & (PM_PRESENT | PM_SWAP) != 0;
            !any
        });
        r.is_err() || any
    }

    /// False only if no page of `range`, guest memory registered with `tracker`, can hold data:
    /// the tracker's answer where it knows the backing ([`WpTracker::may_hold_data`]: page
    /// cache for memfd and hugetlbfs, uffd-wp markers told apart from swap on anonymous
    /// memory), else [`Pagemap::may_have_data`]. Authoritative while the range is protected.
    pub fn may_hold_data(&self, tracker: &WpTracker, range: HostRange) -> bool {
        tracker
            .may_hold_data(range)
            .unwrap_or_else(|| self.may_have_data(range.start, range.len))
    }

    /// Runs `(start, end)` of the range mapped by huge pages (THP or hugetlb); empty if the
    /// kernel cannot tell (no PAGEMAP_SCAN).
    pub fn huge_ranges(&self, start: usize, len: usize) -> Vec<(usize, usize)> {
        let q = ScanQuery {
            inverted: 0,
            required: PAGE_IS_HUGE | PAGE_IS_PRESENT,
            anyof: 0,
            return_mask: PAGE_IS_HUGE,
        };
        uffd_sys::pagemap::scan(start, len, q)
            .map(|v| v.into_iter().map(|r| (r.start, r.end)).collect())
            .unwrap_or_default()
    }

    /// Number of pages of the range that are still uffd write-protected.
    pub fn protected_pages(&self, start: usize, len: usize) -> io::Result<usize> {
        let mut n = 0;
        self.scan(start, len, |e| {
            if e & PM_UFFD_WP != 0 {
                n += 1;
            }
            true
        })?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_heap_memory_has_no_data() {
        // A large zeroed allocation is a fresh anonymous mapping: nothing present yet.
        let mut v = vec![0u8; 8 << 20];
        let base = (v.as_ptr() as usize + PAGE * 2) & !(PAGE - 1);
        let pm = Pagemap::open();
        assert!(!pm.may_have_data(base, 1 << 20));
        let off = base - v.as_ptr() as usize;
        v[off + 5 * PAGE] = 1;
        assert!(pm.may_have_data(base, 1 << 20));
        assert!(!pm.may_have_data(base + 6 * PAGE, 16 * PAGE));
        assert_eq!(pm.protected_pages(base, 1 << 20).unwrap(), 0);
    }
}
