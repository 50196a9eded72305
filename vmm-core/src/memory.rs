//! Guest memory: creation with the chosen backend, host ranges, and typed access to the control page.
//!
//! RAM is one region at GPA 0 up to 3 GiB ([`layout::LOW_RAM_END`]); anything beyond goes into a
//! second region at 4 GiB ([`layout::HIGH_RAM_START`]) so the 3-4 GiB hole stays free for the
//! LAPIC/IOAPIC MMIO windows, as on real PCs.
//!
//! Backends:
//! - [`MemBackend::Anon`]: private anonymous memory, `MADV_HUGEPAGE` so the host backs it with
//!   transparent huge pages where it can (the default; best supported by userfaultfd-wp).
//! - [`MemBackend::Memfd`]: a shared memfd (shmem), each region mapped at its own file offset.
//! - [`MemBackend::Hugetlbfs`]: a memfd created with `MFD_HUGETLB` (2 MiB pages); the free huge
//!   page count is checked up front because a short pool would otherwise surface as SIGBUS later.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::AtomicU64;

use serde::{Deserialize, Serialize};
use uffd_sys::host::Advice;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::layout;
use crate::VmError;

/// Where guest RAM comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum MemBackend {
    /// Private anonymous memory with transparent huge pages (`MADV_HUGEPAGE`).
    #[default]
    Anon,
    /// A shared memfd.
    Memfd,
    /// A memfd on hugetlbfs (`MFD_HUGETLB`, 2 MiB pages).
    Hugetlbfs,
}

/// Checks that `mem_bytes` is a usable guest memory size.
pub fn validate_mem_size(mem_bytes: u64) -> Result<(), VmError> {
    if !(layout::MIN_MEM_BYTES..=layout::MAX_MEM_BYTES).contains(&mem_bytes) {
        return Err(VmError::InvalidConfig(format!(
            "memory size {mem_bytes} bytes is outside {}..={} bytes",
            layout::MIN_MEM_BYTES,
            layout::MAX_MEM_BYTES
        )));
    }
    if !mem_bytes.is_multiple_of(layout::HUGE_PAGE_SIZE) {
        return Err(VmError::InvalidConfig(format!(
            "memory size {mem_bytes} bytes is not a multiple of 2 MiB"
        )));
    }
    Ok(())
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmError {
    move |source| VmError::MemoryCreate { what, source }
}

fn memfd(flags: libc::c_uint, size: u64) -> Result<File, VmError> {
    let name = c"snapctl-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid memfd flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(io_err("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(io_err("ftruncate memfd"))?;
    Ok(file)
}

fn free_hugepages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Creates guest RAM of `mem_bytes` bytes with `backend` (see the module docs for the layout).
pub fn create_guest_memory(
    mem_bytes: u64,
    backend: MemBackend,
) -> Result<GuestMemoryMmap, VmError> {
    validate_mem_size(mem_bytes)?;
    let regions = layout::ram_regions(mem_bytes);
    let file = match backend {
        MemBackend::Anon => None,
        MemBackend::Memfd => Some(memfd(0, mem_bytes)?),
        MemBackend::Hugetlbfs => {
            let needed = mem_bytes / layout::HUGE_PAGE_SIZE;
            let free = free_hugepages();
            if free < needed {
                return Err(VmError::NotEnoughHugepages { needed, free });
            }
            Some(memfd(libc::MFD_HUGETLB, mem_bytes)?)
        }
    };
    let mut out = Vec::with_capacity(regions.len());
    let mut file_off = 0u64;
    for (gpa, len) in regions {
        let len_usize = usize::try_from(len)
            .map_err(|_| VmError::InvalidConfig("memory region too large".into()))?;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let builder = MmapRegionBuilder::new(len_usize).with_mmap_prot(prot);
        let builder = match &file {
            None => builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
            Some(f) => {
                let f = f.try_clone().map_err(io_err("dup memfd"))?;
                builder
                    .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                    .with_file_offset(FileOffset::new(f, file_off))
                    .with_hugetlbfs(backend == MemBackend::Hugetlbfs)
            }
        };
        let region = builder
            .build()
            .map_err(|e| VmError::MemoryMap(format!("mmap of {len} bytes at GPA {gpa:#x}: {e}")))?;
        if backend != MemBackend::Hugetlbfs {
            uffd_sys::host::advise(region.as_ptr() as usize, len_usize, Advice::HugePage)
                .map_err(io_err("madvise(MADV_HUGEPAGE)"))?;
        }
        let region = GuestRegionMmap::new(region, GuestAddress(gpa))
            .ok_or_else(|| VmError::MemoryMap(format!("region at {gpa:#x} overflows")))?;
        out.push(region);
        file_off += len;
    }
    GuestMemoryMmap::from_regions(out).map_err(|e| VmError::MemoryMap(e.to_string()))
}

/// Host ranges of all guest RAM regions: `(gpa, host address, length)`, for userfaultfd registration.
pub fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(u64, usize, usize)> {
    mem.iter()
        .map(|r| {
            (
                r.start_addr().0,
                r.as_ptr() as usize,
                usize::try_from(r.len()).unwrap_or(usize::MAX),
            )
        })
        .collect()
}

/// Total RAM bytes in `mem`.
pub fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Checks that `mem` has exactly the regions [`layout::ram_regions`] gives for `mem_bytes`.
pub fn check_layout(mem: &GuestMemoryMmap, mem_bytes: u64) -> Result<(), VmError> {
    let have: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    let want = layout::ram_regions(mem_bytes);
    if have != want {
        return Err(VmError::MemoryMismatch(format!(
            "regions {have:x?}, expected {want:x?} for {mem_bytes} bytes"
        )));
    }
    Ok(())
}

/// Host pointer to the aligned u64 at `gpa`, valid while `mem` is borrowed.
pub(crate) fn guest_u64(mem: &GuestMemoryMmap, gpa: u64) -> Result<&AtomicU64, VmError> {
    if !gpa.is_multiple_of(8) {
        return Err(VmError::MemoryMismatch(format!(
            "unaligned u64 at {gpa:#x}"
        )));
    }
    let ptr = mem
        .get_host_address(GuestAddress(gpa))
        .map_err(VmError::GuestMemory)?;
    // The region must hold all 8 bytes (regions are page-multiples, so an aligned u64 never straddles).
    // SAFETY: `ptr` points into a live mapping owned by `mem` (the returned reference borrows `mem`),
    // is 8-byte aligned (GPA aligned and regions page-aligned), and AtomicU64 has the layout of u64.
    // The guest accesses these words with aligned 8-byte accesses, which are atomic on x86.
    Ok(unsafe { &*(ptr as *const AtomicU64) })
}

/// Reads one guest page (4 KiB at `gpa`) as 512 qwords.
pub(crate) fn read_page(
    mem: &GuestMemoryMmap,
    gpa: u64,
    out: &mut [u64; 512],
) -> Result<(), VmError> {
    let ptr = mem
        .get_host_address(GuestAddress(gpa))
        .map_err(VmError::GuestMemory)?;
    let region = mem
        .find_region(GuestAddress(gpa))
        .ok_or(VmError::GuestMemory(
            vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa)),
        ))?;
    if !gpa.is_multiple_of(layout::PAGE_SIZE)
        || gpa + layout::PAGE_SIZE > region.start_addr().0 + region.len()
    {
        return Err(VmError::MemoryMismatch(format!(
            "page {gpa:#x} not inside one region"
        )));
    }
    let p = ptr as *const u64;
    for (i, w) in out.iter_mut().enumerate() {
        // SAFETY: the page lies inside one live, page-aligned mapping owned by `mem` (checked above);
        // volatile reads because the guest may write concurrently.
        *w = unsafe { std::ptr::read_volatile(p.add(i)) };
    }
    Ok(())
}

/// Writes one guest page (4 KiB at `gpa`) from 512 qwords (used by tests to plant pages).
pub fn write_page(mem: &GuestMemoryMmap, gpa: u64, words: &[u64; 512]) -> Result<(), VmError> {
    use vm_memory::Bytes;
    let mut bytes = [0u8; 4096];
    for (i, w) in words.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(gpa))
        .map_err(VmError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anon_memory_has_layout_and_ranges() {
        let mem = create_guest_memory(64 << 20, MemBackend::Anon).unwrap();
        check_layout(&mem, 64 << 20).unwrap();
        let r = host_ranges(&mem);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, 0);
        assert_eq!(r[0].2, 64 << 20);
    }

    #[test]
    fn memfd_memory_works() {
        let mem = create_guest_memory(8 << 20, MemBackend::Memfd).unwrap();
        let w = [7u64; 512];
        write_page(&mem, 0x30_0000, &w).unwrap();
        let mut r = [0u64; 512];
        read_page(&mem, 0x30_0000, &mut r).unwrap();
        assert_eq!(r, w);
        guest_u64(&mem, 0x30_0008).unwrap();
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(validate_mem_size(3 << 20).is_err());
        assert!(validate_mem_size((64 << 20) + 4096).is_err());
    }
}
