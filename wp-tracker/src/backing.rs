//! Which write-protected ranges may hold data, asked per backing of the registered memory:
//! private anonymous memory asks pagemap (a uffd-wp marker is told from a swapped-out page by its
//! swap type), memfd/shmem asks the page cache (`mincore`, `SEEK_DATA`), hugetlbfs asks `mincore`
//! once the file is shown to hold no page the registered regions do not map. See
//! [`WpTracker::may_hold_data`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use uffd_sys::pagemap::PagemapEntry;
use vm_memory::FileOffset;

use crate::{lock, HostRange, WpTracker};

/// What backs a region registered with [`WpTracker::register_memory`].
#[derive(Debug, Clone)]
pub(crate) enum Backing {
    /// Private anonymous memory: the page tables are the whole truth.
    Anonymous,
    /// A shared mapping of a tmpfs/memfd file: the mapping shows the file's page cache (and
    /// swap), mapped into this process or not.
    Shmem(FileOffset),
    /// A shared mapping of a hugetlbfs file; `id` (device, inode) finds every region of it.
    Hugetlbfs { file: FileOffset, id: (u64, u64) },
    /// Anything else: nothing known beyond the page tables.
    Unknown,
}

/// See [`WpTracker::may_hold_data`].
#[derive(Debug, Default)]
pub(crate) struct HugetlbProofs {
    proven: Vec<(u64, u64)>,
    /// Failed attempts since the last protect.
    failed: usize,
}

/// Failed attempts to show that a hugetlbfs file holds no unmapped page before giving up until
/// the next protect (each counts the whole file's mapped pages).
pub(crate) const HUGETLB_PROOF_ATTEMPTS: usize = 16;

impl HugetlbProofs {
    pub(crate) fn reset(&mut self) {
        *self = HugetlbProofs::default();
    }
}

impl WpTracker {
    /// Whether any page of `range` (inside one region registered with
    /// [`WpTracker::register_memory`]) may hold data; false means every byte reads as zero.
    /// `None` when the backing is unknown (ranges registered with [`WpTracker::register`],
    /// shared anonymous or private file mappings): ask the page tables then.
    ///
    /// Authoritative while the range is write-protected and no one writes the memory other than
    /// through the registered mappings (the tracker's premise): a page holding data never
    /// answers false. Per backing:
    /// - private anonymous: a present page other than the shared zero page, or a swap entry
    ///   that is not a uffd-wp marker (pagemap; markers are recognised by their swap type, which
    ///   the kernel shows to CAP_SYS_ADMIN only: without it every swap entry counts as data).
    /// - memfd/shmem: the file has data there: `mincore` (mapped here, or uptodate in the page
    ///   cache), and `SEEK_DATA` where mincore finds nothing (it also sees pages swapped out).
    ///   Pages only allocated by fallocate read as zeros and count as holes.
    /// - hugetlbfs: `mincore` of the mapping (a mapped or migrating page). hugetlbfs has no
    ///   `SEEK_DATA` and its `mincore` does not look at the page cache, so a page cached but not
    ///   mapped here (written through another mapping, or unmapped by an unshare of page tables)
    ///   would be missed; hence the answer is only "no data" once the file's page cache is shown
    ///   to hold exactly as many bytes as the registered regions map of it (st_blocks against
    ///   mincore; mapped counted first, so a page added in between makes them differ, never
    ///   match wrongly). Pages are only added (through these mappings, which map them at once)
    ///   and never unmapped while a save runs, so the proof holds until the next protect; until
    ///   it succeeds every hugetlbfs range counts as data.
    pub fn may_hold_data(&self, range: HostRange) -> Option<bool> {
        let (region, backing) = self.backing(range)?;
        let off = (range.start - region.start) as u64;
        Some(match backing {
            Backing::Anonymous => anon_may_hold_data(range).unwrap_or(true),
            Backing::Shmem(f) => shmem_data_pages(f.file(), f.start() + off, range, self.page_size)
                .map_or(true, |v| v.contains(&true)),
            Backing::Hugetlbfs { id, .. } => {
                match uffd_sys::pagemap::mincore(range.start, range.len) {
                    Ok(v) if v.iter().all(|b| b & 1 == 0) => !self.hugetlb_fully_mapped(id),
                    _ => true,
                }
            }
            Backing::Unknown => return None,
        })
    }

    /// The byte runs `(offset, len)` of `range` that may hold data, for memory of known
    /// backing (see [`WpTracker::may_hold_data`]); `None`: treat all of it as data. Single pages
    /// are not looked at: the page a fault copies was just allocated by the kernel, and the
    /// scanner asked [`WpTracker::may_hold_data`] before.
    pub(crate) fn data_runs(&self, range: HostRange) -> Option<Vec<(usize, usize)>> {
        if range.len <= self.page_size {
            return None;
        }
        let (region, backing) = self.backing(range)?;
        let off = (range.start - region.start) as u64;
        let ps = self.page_size;
        match backing {
            Backing::Shmem(f) => {
                let v = shmem_data_pages(f.file(), f.start() + off, range, ps).ok()?;
                (!v.iter().all(|&d| d)).then(|| page_runs(v.into_iter(), ps))
            }
            Backing::Hugetlbfs { id, .. } => {
                let v = uffd_sys::pagemap::mincore(range.start, range.len).ok()?;
                if v.iter().all(|b| b & 1 != 0) || !self.hugetlb_fully_mapped(id) {
                    return None;
                }
                Some(page_runs(v.iter().map(|b| b & 1 != 0), ps))
            }
            // Reading a marker maps the zero page: no allocation, but a fault per page.
            Backing::Anonymous => {
                let e = anon_entries_if_markers(range).ok()??;
                Some(page_runs(e.iter().map(|e| !e.is_marker()), ps))
            }
            Backing::Unknown => None,
        }
    }

    /// The registered region holding all of `range`, and its backing.
    pub(crate) fn backing(&self, range: HostRange) -> Option<(HostRange, Backing)> {
        lock(&self.backings)
            .iter()
            .find(|(r, _)| r.contains(range.start) && range.end() <= r.end())
            .cloned()
    }

    /// True once the page cache of hugetlbfs file `id` is shown to hold no page that the
    /// registered regions do not map (see [`WpTracker::may_hold_data`]).
    pub(crate) fn hugetlb_fully_mapped(&self, id: (u64, u64)) -> bool {
        let mut proofs = lock(&self.hugetlb_mapped);
        if proofs.proven.contains(&id) {
            return true;
        }
        if proofs.failed >= HUGETLB_PROOF_ATTEMPTS {
            return false;
        }
        let regions: Vec<(HostRange, FileOffset)> = lock(&self.backings)
            .iter()
            .filter_map(|(r, b)| match b {
                Backing::Hugetlbfs { file, id: i } if *i == id => Some((*r, file.clone())),
                _ => None,
            })
            .collect();
        // A file page mapped by two regions would be counted twice.
        let mut spans: Vec<(u64, u64)> = regions
            .iter()
            .map(|(r, f)| (f.start(), f.start() + r.len as u64))
            .collect();
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            proofs.failed = HUGETLB_PROOF_ATTEMPTS;
            return false;
        }
        let Some((_, file)) = regions.first() else {
            return false;
        };
        // A guest touching a new page between the two counts makes them differ: try again.
        for _ in 0..4 {
            let mapped: Option<u64> = regions
                .iter()
                .map(|(r, _)| mapped_bytes(*r, self.page_size))
                .sum();
            let cached = file.file().metadata().ok().map(|m| m.blocks() * 512);
            if mapped.is_some() && mapped == cached {
                proofs.proven.push(id);
                return true;
            }
            std::thread::yield_now();
        }
        proofs.failed += 1;
        false
    }
}

pub(crate) fn backing_of(region: &vm_memory::GuestRegionMmap) -> Backing {
    use vm_memory::GuestMemoryRegion;
    let flags = region.flags();
    let Some(file) = region.file_offset() else {
        return if flags & (libc::MAP_SHARED | libc::MAP_HUGETLB) == 0 {
            Backing::Anonymous
        } else {
            Backing::Unknown
        };
    };
    // A private file mapping shows anonymous copies of what was written.
    if flags & libc::MAP_SHARED == 0 {
        return Backing::Unknown;
    }
    let (Ok(magic), Ok(meta)) = (fs_magic(file.file()), file.file().metadata()) else {
        return Backing::Unknown;
    };
    match magic {
        libc::TMPFS_MAGIC => Backing::Shmem(file.clone()),
        libc::HUGETLBFS_MAGIC => Backing::Hugetlbfs {
            file: file.clone(),
            id: (meta.dev(), meta.ino()),
        },
        _ => Backing::Unknown,
    }
}

/// The file system type (`f_type` of fstatfs) of `file`.
pub(crate) fn fs_magic(file: &File) -> io::Result<libc::__fsword_t> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `file` is an open fd and `st` has room for one statfs, which fstatfs fills on
    // success (and only then is it read).
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() }.f_type)
}

/// `lseek(SEEK_DATA)` from `off`: the first data offset at or after it (page cache or swap),
/// `None` if there is none up to the end of the file.
pub(crate) fn seek_data(file: &File, off: u64) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek touches no memory; it only moves the position of the open file
    // description, and guest memory files are accessed through mappings, never through it.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Which pages of shmem memory `range`, mapping `file` from offset `start`, may hold data:
/// those mincore finds (mapped here, or uptodate in the page cache), and from the first page
/// `SEEK_DATA` finds (swapped out) in each run of the others to that run's end. Not
/// `SEEK_HOLE`: it walks the page cache up to the next hole, all of a populated file (ms).
pub(crate) fn shmem_data_pages(
    file: &File,
    start: u64,
    range: HostRange,
    page_size: usize,
) -> io::Result<Vec<bool>> {
    let mut data: Vec<bool> = uffd_sys::pagemap::mincore(range.start, range.len)?
        .iter()
        .map(|b| b & 1 != 0)
        .collect();
    let mut i = 0;
    while i < data.len() {
        if data[i] {
            i += 1;
            continue;
        }
        let end = (i..data.len()).find(|&k| data[k]).unwrap_or(data.len());
        if let Some(d) = seek_data(file, start + (i * page_size) as u64)? {
            let first = ((d - start) / page_size as u64) as usize;
            data[first.clamp(i, end)..end].fill(true);
        }
        i = end;
    }
    Ok(data)
}

/// Bytes of `range` that mincore reports mapped (hugetlbfs: mapped or migrating pages).
pub(crate) fn mapped_bytes(range: HostRange, page_size: usize) -> Option<u64> {
    const CHUNK: usize = 1 << 30;
    let mut n = 0u64;
    let mut off = 0;
    while off < range.len {
        let len = CHUNK.min(range.len - off);
        let v = uffd_sys::pagemap::mincore(range.start + off, len).ok()?;
        n += v.iter().filter(|b| *b & 1 != 0).count() as u64 * page_size as u64;
        off += len;
    }
    Some(n)
}

/// Runs `(offset, len)` of the pages whose flag is true.
pub(crate) fn page_runs(
    flags: impl Iterator<Item = bool>,
    page_size: usize,
) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, _) in flags.enumerate().filter(|(_, f)| *f) {
        let at = i * page_size;
        match runs.last_mut() {
            Some((o, l)) if *o + *l == at => *l += page_size,
            _ => runs.push((at, page_size)),
        }
    }
    runs
}

/// The pagemap entries of anonymous `range` if some of them may be pte markers.
pub(crate) fn anon_entries_if_markers(range: HostRange) -> io::Result<Option<Vec<PagemapEntry>>> {
    let query = uffd_sys::pagemap::ScanQuery {
        required: uffd_sys::PAGE_IS_SWAPPED,
        return_mask: uffd_sys::PAGE_IS_SWAPPED,
        ..Default::default()
    };
    if uffd_sys::pagemap::scan(range.start, range.len, query)?.is_empty() {
        return Ok(None);
    }
    uffd_sys::pagemap::pagemap_entries(range.start, range.len).map(Some)
}

/// Whether private anonymous memory in `range` may hold data: a present page other than the
/// shared zero page, or a swap entry that is not a pte marker.
pub(crate) fn anon_may_hold_data(range: HostRange) -> io::Result<bool> {
    use uffd_sys::pagemap::{pagemap_entries, scan, ScanQuery};
    use uffd_sys::{PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED};
    let query = ScanQuery {
        inverted: PAGE_IS_PFNZERO,
        required: PAGE_IS_PFNZERO,
        anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        return_mask: PAGE_IS_PRESENT,
    };
    // PAGEMAP_SCAN cannot tell markers from swap: the swapped runs go to the classic file.
    let swapped = match scan(range.start, range.len, query) {
        Ok(runs) if runs.iter().any(|r| r.categories & PAGE_IS_PRESENT != 0) => return Ok(true),
        Ok(runs) => runs
            .iter()
            .map(|r| HostRange::new(r.start, r.len()))
            .collect(),
        // No PAGEMAP_SCAN (Linux < 6.7): every entry from the classic file.
        Err(_) => vec![range],
    };
    for r in swapped {
        let entries = pagemap_entries(r.start, r.len)?;
        if entries
            .iter()
            .any(|e| e.present() || (e.swapped() && !e.is_marker()))
        {
            return Ok(true);
        }
    }
    Ok(false)
}
