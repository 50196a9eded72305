//! Page table queries on this process: PAGEMAP_SCAN (Linux 6.7+), classic `/proc/self/pagemap`
//! and `mincore(2)`.
//!
//! Used to skip never-touched memory cheaply and to prove that nothing stays write-protected.
//! Categories: a present page without the uffd-wp bit is `PAGE_IS_WRITTEN`; a protected page is
//! present (or a non-present uffd-wp marker, reported as `PAGE_IS_SWAPPED`) without it. A page
//! table entry that is empty has no category at all.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::abi::*;

/// A run of pages `[start, end)` sharing `categories` (PAGE_IS_* bits, masked by the query's
/// `return_mask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// Start address.
    pub start: usize,
    /// End address (exclusive).
    pub end: usize,
    /// PAGE_IS_* bits.
    pub categories: u64,
}

impl PageRegion {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    /// True if the region is empty (never returned by the kernel).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Which pages a [`scan`] reports (fields as in `struct pm_scan_arg`).
///
/// A page matches when, after XOR with `inverted`, it has every bit of `required` and (if
/// `anyof` is non-zero) at least one bit of `anyof`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScanQuery {
    /// Categories to invert before matching.
    pub inverted: u64,
    /// Categories that must all be set.
    pub required: u64,
    /// At least one of these must be set (0: no constraint).
    pub anyof: u64,
    /// Categories reported back (adjacent pages with equal reported bits merge).
    pub return_mask: u64,
}

const ALL_CATEGORIES: u64 = PAGE_IS_WPALLOWED
    | PAGE_IS_WRITTEN
    | PAGE_IS_FILE
    | PAGE_IS_PRESENT
    | PAGE_IS_SWAPPED
    | PAGE_IS_PFNZERO
    | PAGE_IS_HUGE
    | PAGE_IS_SOFT_DIRTY;

use crate::host::page_size;

fn open_pagemap() -> io::Result<File> {
    File::open("/proc/self/pagemap")
}

/// Open `/proc/self/pagemap` once for repeated [`scan_in`] calls.
pub fn open_self() -> io::Result<File> {
    open_pagemap()
}

/// Run PAGEMAP_SCAN over `[start, start+len)` (start page aligned); returns the matching runs in
/// address order, merged across batches. Unmapped holes are skipped, not errors.
pub fn scan(start: usize, len: usize, query: ScanQuery) -> io::Result<Vec<PageRegion>> {
    scan_in(&open_pagemap()?, start, len, query)
}

/// [`scan`] through an open `/proc/self/pagemap` ([`open_self`]), for callers that scan often.
pub fn scan_in(
    file: &File,
    start: usize,
    len: usize,
    query: ScanQuery,
) -> io::Result<Vec<PageRegion>> {
    let end = start
        .checked_add(len)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = vec![page_region::default(); 512];
    let mut out: Vec<PageRegion> = Vec::new();
    let mut cursor = start;
    while cursor < end {
        let mut arg = pm_scan_arg {
            size: std::mem::size_of::<pm_scan_arg>() as u64,
            flags: 0,
            start: cursor as u64,
            end: end as u64,
            walk_end: 0,
            vec: buf.as_mut_ptr() as u64,
            vec_len: buf.len() as u64,
            max_pages: 0,
            category_inverted: query.inverted,
            category_mask: query.required,
            category_anyof_mask: query.anyof,
            return_mask: query.return_mask,
        };
        // SAFETY: `arg` is a valid pm_scan_arg; `vec` points to `buf`, which has room for
        // `vec_len` page_region entries and outlives the call. No WP flags: read only.
        let n = unsafe { libc::ioctl(file.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for r in &buf[..n as usize] {
            let r = PageRegion {
                start: r.start as usize,
                end: r.end as usize,
                categories: r.categories,
            };
            match out.last_mut() {
                Some(last) if last.end == r.start && last.categories == r.categories => {
                    last.end = r.end
                }
                _ => out.push(r),
            }
        }
        let walk_end = arg.walk_end as usize;
        if walk_end <= cursor {
            break; // no progress: defensive, the kernel always advances
        }
        cursor = walk_end;
    }
    Ok(out)
}

/// True if this kernel supports PAGEMAP_SCAN.
pub fn scan_supported() -> bool {
    let ps = page_size();
    let probe = ScanQuery {
        return_mask: PAGE_IS_PRESENT,
        ..Default::default()
    };
    // Scan one page of the stack: any mapped address works.
    let local = 0u8;
    let addr = (&local as *const u8 as usize) & !(ps - 1);
    scan(addr, ps, probe).is_ok()
}

/// Runs of pages that are present in memory or swapped out (i.e. were ever populated), with
/// all categories reported.
pub fn present_regions(start: usize, len: usize) -> io::Result<Vec<PageRegion>> {
    scan(
        start,
        len,
        ScanQuery {
            anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: ALL_CATEGORIES,
            ..Default::default()
        },
    )
}

/// Runs of pages that still carry the uffd-wp bit: present or marker entries without
/// `PAGE_IS_WRITTEN`. An empty result proves nothing in the range is write-protected.
pub fn wp_protected_regions(start: usize, len: usize) -> io::Result<Vec<PageRegion>> {
    scan(
        start,
        len,
        ScanQuery {
            inverted: PAGE_IS_WRITTEN,
            required: PAGE_IS_WRITTEN,
            anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_HUGE,
        },
    )
}

/// PAGEMAP_SCAN refused once (kernel older than 6.7): every later query reads the classic file.
static NO_SCAN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Classic entries read per `pread` (32 KiB of entries = 16 MiB of address space).
const CLASSIC_CHUNK: usize = 4096;

/// False only if the kernel says no page of `[start, start+len)` is present (other than the
/// shared zero page) or swapped out, i.e. the whole range reads as zeros. PAGEMAP_SCAN where the
/// kernel has it, else the classic file; any doubt (an I/O error) answers true. A uffd-wp marker
/// on a never-touched page looks swapped, so it counts as data: conservative, never wrong.
pub fn may_have_data(start: usize, len: usize) -> bool {
    use std::sync::atomic::Ordering;
    if !NO_SCAN.load(Ordering::Relaxed) {
        let q = ScanQuery {
            inverted: PAGE_IS_PFNZERO,
            required: PAGE_IS_PFNZERO,
            anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT,
        };
        match scan(start, len, q) {
            Ok(r) => return !r.is_empty(),
            Err(_) => NO_SCAN.store(true, Ordering::Relaxed),
        }
    }
    let ps = page_size();
    let end = start + len;
    let mut at = start;
    while at < end {
        let n = (end - at).min(CLASSIC_CHUNK * ps);
        match pagemap_entries(at, n) {
            Ok(v) if v.iter().any(|e| e.present() || e.swapped()) => return true,
            Ok(_) => at += n,
            Err(_) => return true,
        }
    }
    false
}

/// Runs `(start, end)` of `[start, start+len)` mapped by huge pages (THP or hugetlb); empty if
/// the kernel cannot tell (no PAGEMAP_SCAN).
pub fn huge_regions(start: usize, len: usize) -> Vec<(usize, usize)> {
    let q = ScanQuery {
        inverted: 0,
        required: PAGE_IS_HUGE | PAGE_IS_PRESENT,
        anyof: 0,
        return_mask: PAGE_IS_HUGE,
    };
    scan(start, len, q)
        .map(|v| v.into_iter().map(|r| (r.start, r.end)).collect())
        .unwrap_or_default()
}

/// One decoded `/proc/self/pagemap` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    /// Page present in memory (bit 63).
    pub fn present(self) -> bool {
        self.0 & PM_PRESENT != 0
    }
    /// Swapped out or a non-present marker (bit 62).
    pub fn swapped(self) -> bool {
        self.0 & PM_SWAP != 0
    }
    /// uffd-wp bit set (bit 57).
    pub fn uffd_wp(self) -> bool {
        self.0 & PM_UFFD_WP != 0
    }
    /// File page or shared anonymous (bit 61).
    pub fn file(self) -> bool {
        self.0 & PM_FILE != 0
    }
    /// Swap type of a swapped entry; the kernel shows it only to CAP_SYS_ADMIN (0 otherwise).
    pub fn swap_type(self) -> u64 {
        self.0 & PM_SWAP_TYPE_MASK
    }
    /// A pte marker: no page behind the entry (on anonymous memory: never touched, reads as
    /// zeros). Only recognisable with CAP_SYS_ADMIN; without it a marker looks like swap type 0
    /// and this answers false.
    pub fn is_marker(self) -> bool {
        self.swapped() && self.swap_type() == SWP_PTE_MARKER
    }
}

/// Read the classic pagemap entry of the page holding `addr` (fallback without PAGEMAP_SCAN).
pub fn pagemap_entry(addr: usize) -> io::Result<PagemapEntry> {
    let file = open_pagemap()?;
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, (addr / page_size()) as u64 * 8)?;
    Ok(PagemapEntry(u64::from_ne_bytes(b)))
}

/// Pagemap entries of every page of `[start, start+len)` in one read.
pub fn pagemap_entries(start: usize, len: usize) -> io::Result<Vec<PagemapEntry>> {
    let ps = page_size();
    let file = open_pagemap()?;
    let pages = len.div_ceil(ps);
    let mut b = vec![0u8; pages * 8];
    file.read_exact_at(&mut b, (start / ps) as u64 * 8)?;
    Ok(b.chunks_exact(8)
        .map(|c| PagemapEntry(u64::from_ne_bytes(c.try_into().expect("8 bytes"))))
        .collect())
}

/// `mincore(2)` over `[start, start+len)` (page aligned, mapped): one byte per base page, bit 0
/// set if the page is resident. What that means depends on the mapping: on anonymous memory a
/// present page, swap cache page or migration entry; on shmem a page table entry or, where there
/// is none (or a uffd-wp marker), a page in the file's page cache (shmem swapped out counts as
/// not resident); on hugetlbfs only a page table entry of this mapping (present or migrating),
/// never the page cache. Fails with ENOMEM on unmapped holes.
pub fn mincore(start: usize, len: usize) -> io::Result<Vec<u8>> {
    let mut vec = vec![0u8; len.div_ceil(page_size())];
    // SAFETY: mincore only reads page tables and the page cache of the range and writes one byte
    // per page into `vec`, which has exactly that many; it never touches the range's memory and
    // rejects unmapped or misaligned ranges with an error.
    let r = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Map;
    use crate::Userfaultfd;

    #[test]
    fn present_regions_show_touched_pages_only() {
        let m = Map::new(64 * 4096);
        m.write(3, 1);
        m.write(4, 1);
        m.write(40, 1);
        let r = present_regions(m.0, m.1).unwrap();
        let spans: Vec<_> = r
            .iter()
            .map(|r| ((r.start - m.0) / 4096, r.len() / 4096))
            .collect();
        assert_eq!(spans, vec![(3, 2), (40, 1)], "{r:?}");
        assert!(r.iter().all(|r| r.categories & PAGE_IS_PRESENT != 0));
    }

    #[test]
    fn classic_pagemap_sees_present_bit() {
        let m = Map::new(4 * 4096);
        m.write(1, 7);
        assert!(!pagemap_entry(m.0).unwrap().present());
        assert!(pagemap_entry(m.0 + 4096).unwrap().present());
        let all = pagemap_entries(m.0, m.1).unwrap();
        assert_eq!(
            all.iter().map(|e| e.present()).collect::<Vec<_>>(),
            [false, true, false, false]
        );
    }

    #[test]
    fn wp_protected_regions_follow_writeprotect() {
        let avail = Userfaultfd::probe().unwrap().available;
        let uffd = Userfaultfd::open(avail.0 & UFFD_FEATURE_WP_UNPOPULATED).unwrap();
        let m = Map::new(32 * 4096);
        for p in 0..8 {
            m.write(p, 1);
        }
        uffd.register(m.0, m.1, UFFDIO_REGISTER_MODE_WP).unwrap();
        assert!(wp_protected_regions(m.0, m.1).unwrap().is_empty());
        uffd.writeprotect(m.0, 8 * 4096, UFFDIO_WRITEPROTECT_MODE_WP)
            .unwrap();
        let r = wp_protected_regions(m.0, m.1).unwrap();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!((r[0].start, r[0].end), (m.0, m.0 + 8 * 4096));
        assert!(pagemap_entry(m.0).unwrap().uffd_wp());
        uffd.writeprotect(m.0, 4096, 0).unwrap();
        assert!(!pagemap_entry(m.0).unwrap().uffd_wp());
        assert_eq!(wp_protected_regions(m.0, m.1).unwrap()[0].start, m.0 + 4096);
        uffd.writeprotect(m.0, m.1, 0).unwrap();
        assert!(wp_protected_regions(m.0, m.1).unwrap().is_empty());
        uffd.unregister(m.0, m.1).unwrap();
    }

    #[test]
    fn scan_merges_many_batches() {
        // 2000 alternating present / absent pages need several 512-entry batches.
        let pages = 2000;
        let m = Map::new(pages * 4096);
        for p in (0..pages).step_by(2) {
            m.write(p, 1);
        }
        let r = present_regions(m.0, m.1).unwrap();
        assert_eq!(r.len(), pages / 2);
        assert!(r
            .iter()
            .enumerate()
            .all(|(i, r)| r.start == m.0 + 2 * i * 4096 && r.len() == 4096));
    }

    #[test]
    fn mincore_sees_touched_pages() {
        let m = Map::new(8 * 4096);
        m.write(2, 1);
        let v = mincore(m.0, m.1).unwrap();
        assert_eq!(
            v.iter().map(|b| b & 1).collect::<Vec<_>>(),
            [0, 0, 1, 0, 0, 0, 0, 0]
        );
        assert!(mincore(m.0 + 1, 4096).is_err());
    }

    #[test]
    fn never_touched_protected_pages_are_markers() {
        let avail = Userfaultfd::probe().unwrap().available;
        assert!(avail.contains(UFFD_FEATURE_WP_UNPOPULATED), "{avail}");
        let uffd = Userfaultfd::open(UFFD_FEATURE_WP_UNPOPULATED).unwrap();
        let m = Map::new(4 * 4096);
        m.write(0, 1);
        uffd.register(m.0, m.1, UFFDIO_REGISTER_MODE_WP).unwrap();
        uffd.writeprotect(m.0, m.1, UFFDIO_WRITEPROTECT_MODE_WP)
            .unwrap();
        let e = pagemap_entries(m.0, m.1).unwrap();
        uffd.writeprotect(m.0, m.1, 0).unwrap();
        uffd.unregister(m.0, m.1).unwrap();
        assert!(e[0].present() && !e[0].is_marker(), "{e:x?}");
        // The swap type is shown to CAP_SYS_ADMIN only; these tests run as root.
        assert!(
            e[1..].iter().all(|e| e.is_marker() && e.uffd_wp()),
            "{e:x?}"
        );
    }

    #[test]
    fn scan_supported_here() {
        assert!(scan_supported());
    }
}
