//! [`PageHashes`]: a 128-bit content hash of every 4 KiB guest page, as of the last save's freeze
//! instant, so that an incremental save stores only the pages of a written unit whose content
//! changed (`docs/INCREMENTAL.md`, "Precision: 4 KiB inside huge units, by content").
//!
//! The hash is xxh3-128 of the page's bytes; a zero page has [`ZERO_HASH`] (the xxh3-128 of a
//! zero page, so a zero page hashed byte by byte agrees), and a page whose content is not known
//! has the *unknown* value 0, which equals no page's hash (a page whose hash happened to be 0 is
//! only ever stored again, never wrongly inherited). A false match would silently inherit a
//! changed page, hence 128 bits: 16 bytes per page, 4 MiB per GiB of guest RAM.
//!
//! Slots are atomics so that the save's compression workers (each page is handled by exactly
//! one) and the parallel fill after a restore write them without a lock; what one save wrote is
//! seen by the next through the joins of the threads in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use xxhash_rust::xxh3::xxh3_128;

use crate::format::MemRegion;
use crate::writer::is_zero;

/// Bytes per hashed page.
pub const HASH_PAGE: usize = 4096;

/// The hash of a zero page: xxh3-128 of 4096 zero bytes.
pub fn zero_hash() -> u128 {
    static ZERO: OnceLock<u128> = OnceLock::new();
    *ZERO.get_or_init(|| xxh3_128(&[0u8; HASH_PAGE]))
}

/// The hash [`PageHashes`] keeps for `page` (4096 bytes): [`zero_hash`] for a zero page
/// (checked first: cheaper than hashing), else its xxh3-128.
pub fn page_hash(page: &[u8]) -> u128 {
    if is_zero(page) {
        zero_hash()
    } else {
        xxh3_128(page)
    }
}

/// The value of a slot whose page content is unknown: equal to no page's hash.
const UNKNOWN: u128 = 0;

/// One 128-bit hash per 4 KiB page of a set of guest memory regions. See the module docs.
pub struct PageHashes {
    /// Per region: (first guest page, pages, first slot).
    regions: Vec<(u64, u64, usize)>,
    /// Two words per page (low, high).
    slots: Vec<AtomicU64>,
}

impl std::fmt::Debug for PageHashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageHashes")
            .field("pages", &self.pages())
            .field("regions", &self.regions.len())
            .finish()
    }
}

impl PageHashes {
    /// A table for `regions` (page-aligned), every page unknown.
    pub fn new(regions: &[MemRegion]) -> Self {
        let mut next = 0usize;
        let regions: Vec<_> = regions
            .iter()
            .map(|r| {
                let pages = r.size / HASH_PAGE as u64;
                let at = (r.gpa / HASH_PAGE as u64, pages, next);
                next += pages as usize;
                at
            })
            .collect();
        let slots = (0..next * 2).map(|_| AtomicU64::new(0)).collect();
        PageHashes { regions, slots }
    }

    /// A table for the regions of `mem`, every page unknown.
    pub fn for_memory(mem: &GuestMemoryMmap) -> Self {
        Self::new(&regions_of(mem))
    }

    /// True if the table covers exactly `regions`.
    pub fn matches(&self, regions: &[MemRegion]) -> bool {
        self.regions.len() == regions.len()
            && self.regions.iter().zip(regions).all(|(&(p, n, _), r)| {
                p * HASH_PAGE as u64 == r.gpa && n * HASH_PAGE as u64 == r.size
            })
    }

    /// Pages covered.
    pub fn pages(&self) -> usize {
        self.slots.len() / 2
    }

    /// The slot of guest page `page`, if the table covers it.
    pub fn slot(&self, page: u64) -> Option<usize> {
        self.regions
            .iter()
            .find(|&&(p, n, _)| page >= p && page < p + n)
            .map(|&(p, _, at)| at + (page - p) as usize)
    }

    /// The hash in `slot` (0: unknown).
    pub fn get(&self, slot: usize) -> u128 {
        let lo = self.slots[slot * 2].load(Ordering::Relaxed);
        let hi = self.slots[slot * 2 + 1].load(Ordering::Relaxed);
        u128::from(lo) | (u128::from(hi) << 64)
    }

    /// Set the hash in `slot`.
    pub fn set(&self, slot: usize, hash: u128) {
        self.slots[slot * 2].store(hash as u64, Ordering::Relaxed);
        self.slots[slot * 2 + 1].store((hash >> 64) as u64, Ordering::Relaxed);
    }

    /// True if `slot` holds `hash` (never for an unknown slot).
    pub fn equals(&self, slot: usize, hash: u128) -> bool {
        hash != UNKNOWN && self.get(slot) == hash
    }

    /// Mark `count` pages from guest page `first` as zero pages.
    pub fn set_zero(&self, first: u64, count: u64) {
        let z = zero_hash();
        self.for_pages(first, count, |slot| self.set(slot, z));
    }

    /// Mark every page unknown (the table no longer describes any save).
    pub fn forget(&self) {
        for s in &self.slots {
            s.store(0, Ordering::Relaxed);
        }
    }

    /// Pages whose hash is known.
    pub fn known(&self) -> usize {
        (0..self.pages())
            .filter(|&i| self.get(i) != UNKNOWN)
            .count()
    }

    /// Hash every page of `mem` (whose regions the table covers) with `threads` threads: the
    /// table then describes `mem`'s content now (e.g. just restored, before any vCPU runs).
    pub fn fill_from(&self, mem: &GuestMemoryMmap, threads: usize) -> Result<(), String> {
        if !self.matches(&regions_of(mem)) {
            return Err("the page-hash table does not cover this memory's regions".into());
        }
        const CHUNK: usize = 64 << 10;
        let spans: Vec<(u64, usize)> = mem
            .iter()
            .flat_map(|r| {
                let (gpa, len) = (r.start_addr().0, r.len() as usize);
                (0..len.div_ceil(CHUNK))
                    .map(move |k| (gpa + (k * CHUNK) as u64, CHUNK.min(len - k * CHUNK)))
            })
            .collect();
        let threads = threads.max(1);
        let per = spans.len().div_ceil(threads).max(1);
        thread::scope(|s| {
            let hs: Vec<_> = spans
                .chunks(per)
                .map(|part| {
                    s.spawn(move || {
                        let mut buf = vec![0u8; CHUNK];
                        for &(gpa, len) in part {
                            let b = &mut buf[..len];
                            mem.read_slice(b, GuestAddress(gpa))
                                .map_err(|e| format!("guest memory at {gpa:#x}: {e}"))?;
                            let first = gpa / HASH_PAGE as u64;
                            for (k, page) in b.chunks_exact(HASH_PAGE).enumerate() {
                                if let Some(slot) = self.slot(first + k as u64) {
                                    self.set(slot, page_hash(page));
                                }
                            }
                        }
                        Ok::<_, String>(())
                    })
                })
                .collect();
            hs.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a hashing thread panicked".into()))
            })
        })
    }

    /// Call `f` with the slot of each of `count` pages from guest page `first` the table covers.
    fn for_pages(&self, first: u64, count: u64, mut f: impl FnMut(usize)) {
        let mut page = first;
        let end = first + count;
        while page < end {
            let Some(&(p, n, at)) = self
                .regions
                .iter()
                .find(|&&(p, n, _)| page >= p && page < p + n)
            else {
                page += 1;
                continue;
            };
            let stop = end.min(p + n);
            for q in page..stop {
                f(at + (q - p) as usize);
            }
            page = stop;
        }
    }
}

/// The regions of `mem`.
fn regions_of(mem: &GuestMemoryMmap) -> Vec<MemRegion> {
    mem.iter()
        .map(|r| MemRegion {
            gpa: r.start_addr().0,
            size: r.len(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_hash_alike_and_unknown_matches_nothing() {
        let zero = [0u8; HASH_PAGE];
        assert_eq!(page_hash(&zero), xxh3_128(&zero));
        let t = PageHashes::new(&[
            MemRegion {
                gpa: 0,
                size: 16 * 4096,
            },
            MemRegion {
                gpa: 1 << 32,
                size: 8 * 4096,
            },
        ]);
        assert_eq!(t.pages(), 24);
        let s = t.slot((1 << 32) / 4096 + 3).unwrap();
        assert_eq!(s, 19);
        assert!(t.slot(16).is_none());
        assert!(!t.equals(s, zero_hash()));
        t.set_zero(0, 17);
        assert!(t.equals(0, zero_hash()) && t.equals(15, zero_hash()));
        assert_eq!(t.known(), 16);
        let mut page = [0u8; HASH_PAGE];
        page[4095] = 1;
        t.set(s, page_hash(&page));
        assert!(t.equals(s, page_hash(&page)));
        assert!(!t.equals(s, zero_hash()));
        t.forget();
        assert_eq!(t.known(), 0);
    }
}
