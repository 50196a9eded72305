//! Raw kernel ABI: `include/uapi/linux/userfaultfd.h` and the PAGEMAP_SCAN part of
//! `include/uapi/linux/fs.h`, written by hand (x86-64 and other LP64 Linux targets).
//!
//! Names follow the kernel headers so they can be grepped against them. Layout tests at the end of
//! this file pin every size, offset and ioctl number.

#![allow(non_camel_case_types)]

/// Build an ioctl request number like the kernel's `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    // Sizes here are all < 2^14, as `_IOC` requires; checked at compile time by the tests.
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | nr
}
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;
const fn io(ty: u32, nr: u32) -> u32 {
    ioc(IOC_NONE, ty, nr, 0)
}
const fn ior<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ, ty, nr, core::mem::size_of::<T>())
}
const fn iowr<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, core::mem::size_of::<T>())
}

// ---------------------------------------------------------------------------------------------
// userfaultfd.h
// ---------------------------------------------------------------------------------------------

/// ioctl type of `/dev/userfaultfd`.
pub const USERFAULTFD_IOC: u32 = 0xAA;
/// `/dev/userfaultfd` ioctl: create a new userfaultfd; the argument is the open flags.
pub const USERFAULTFD_IOC_NEW: u32 = io(USERFAULTFD_IOC, 0x00);

/// The only userfaultfd API version.
pub const UFFD_API: u64 = 0xAA;

/// ioctl type of a userfaultfd.
pub const UFFDIO: u32 = 0xAA;
/// ioctl number (bit index in the `ioctls` masks) of UFFDIO_REGISTER.
pub const _UFFDIO_REGISTER: u32 = 0x00;
/// ioctl number of UFFDIO_UNREGISTER.
pub const _UFFDIO_UNREGISTER: u32 = 0x01;
/// ioctl number of UFFDIO_WAKE.
pub const _UFFDIO_WAKE: u32 = 0x02;
/// ioctl number of UFFDIO_COPY.
pub const _UFFDIO_COPY: u32 = 0x03;
/// ioctl number of UFFDIO_ZEROPAGE.
pub const _UFFDIO_ZEROPAGE: u32 = 0x04;
/// ioctl number of UFFDIO_MOVE.
pub const _UFFDIO_MOVE: u32 = 0x05;
/// ioctl number of UFFDIO_WRITEPROTECT.
pub const _UFFDIO_WRITEPROTECT: u32 = 0x06;
/// ioctl number of UFFDIO_CONTINUE.
pub const _UFFDIO_CONTINUE: u32 = 0x07;
/// ioctl number of UFFDIO_POISON.
pub const _UFFDIO_POISON: u32 = 0x08;
/// ioctl number of UFFDIO_API.
pub const _UFFDIO_API: u32 = 0x3F;

/// Handshake: negotiate API version and features.
pub const UFFDIO_API: u32 = iowr::<uffdio_api>(UFFDIO, _UFFDIO_API);
/// Register a range for missing / write-protect / minor faults.
pub const UFFDIO_REGISTER: u32 = iowr::<uffdio_register>(UFFDIO, _UFFDIO_REGISTER);
/// Unregister a range (`_IOR` by historical accident, see the header).
pub const UFFDIO_UNREGISTER: u32 = ior::<uffdio_range>(UFFDIO, _UFFDIO_UNREGISTER);
/// Wake threads blocked on a range.
pub const UFFDIO_WAKE: u32 = ior::<uffdio_range>(UFFDIO, _UFFDIO_WAKE);
/// Atomically copy a page into a missing range.
pub const UFFDIO_COPY: u32 = iowr::<uffdio_copy>(UFFDIO, _UFFDIO_COPY);
/// Atomically map zero pages into a missing range.
pub const UFFDIO_ZEROPAGE: u32 = iowr::<uffdio_zeropage>(UFFDIO, _UFFDIO_ZEROPAGE);
/// Move pages from one range to another (Linux 6.8+).
pub const UFFDIO_MOVE: u32 = iowr::<uffdio_move>(UFFDIO, _UFFDIO_MOVE);
/// Set or clear write protection on a range.
pub const UFFDIO_WRITEPROTECT: u32 = iowr::<uffdio_writeprotect>(UFFDIO, _UFFDIO_WRITEPROTECT);
/// Resolve minor faults by mapping the existing page-cache page.
pub const UFFDIO_CONTINUE: u32 = iowr::<uffdio_continue>(UFFDIO, _UFFDIO_CONTINUE);
/// Mark a range as poisoned (Linux 6.6+).
pub const UFFDIO_POISON: u32 = iowr::<uffdio_poison>(UFFDIO, _UFFDIO_POISON);

/// Register modes a kernel with every mode supports.
pub const UFFD_API_REGISTER_MODES: u64 =
    UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MINOR;

/// Event: a page fault.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Event: the process forked (needs UFFD_FEATURE_EVENT_FORK).
pub const UFFD_EVENT_FORK: u8 = 0x13;
/// Event: mremap moved a registered range (needs UFFD_FEATURE_EVENT_REMAP).
pub const UFFD_EVENT_REMAP: u8 = 0x14;
/// Event: MADV_DONTNEED/REMOVE dropped pages (needs UFFD_FEATURE_EVENT_REMOVE).
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
/// Event: munmap of a registered range (needs UFFD_FEATURE_EVENT_UNMAP).
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

/// Page fault flag: the access was a write.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// Page fault flag: a write-protect fault.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// Page fault flag: a minor fault.
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// Feature: write-protect faults are supported (reported as available when WP exists).
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Feature: fork events.
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
/// Feature: mremap events.
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// Feature: remove (MADV_DONTNEED/REMOVE) events.
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Feature: missing faults on hugetlbfs.
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// Feature: missing faults on shmem.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// Feature: munmap events.
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// Feature: raise SIGBUS instead of queueing fault events.
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
/// Feature: report the faulting thread id.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// Feature: minor faults on hugetlbfs.
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// Feature: minor faults on shmem.
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// Feature: report the exact faulting address instead of the page-aligned one.
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
/// Feature: write-protect on hugetlbfs and shmem (Linux 5.19+).
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Feature: write-protect also marks never-populated anonymous pages (Linux 6.4+).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Feature: UFFDIO_POISON.
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
/// Feature: asynchronous write-protect (kernel resolves faults itself; used with PAGEMAP_SCAN).
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// Feature: UFFDIO_MOVE.
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

/// Every feature bit this crate knows, with its name (for reports).
pub const UFFD_FEATURE_NAMES: [(u64, &str); 17] = [
    (UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
    (UFFD_FEATURE_EVENT_FORK, "EVENT_FORK"),
    (UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP"),
    (UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE"),
    (UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
    (UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
    (UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
    (UFFD_FEATURE_SIGBUS, "SIGBUS"),
    (UFFD_FEATURE_THREAD_ID, "THREAD_ID"),
    (UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
    (UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
    (UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
    (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    (UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"),
    (UFFD_FEATURE_POISON, "POISON"),
    (UFFD_FEATURE_WP_ASYNC, "WP_ASYNC"),
    (UFFD_FEATURE_MOVE, "MOVE"),
];

/// Register mode: missing faults.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Register mode: write-protect faults.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// Register mode: minor faults.
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

/// UFFDIO_COPY mode: do not wake the faulting threads.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
/// UFFDIO_COPY mode: map the copied page write-protected.
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
/// UFFDIO_ZEROPAGE mode: do not wake.
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
/// UFFDIO_WRITEPROTECT mode: set protection (clear when absent).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// UFFDIO_WRITEPROTECT mode: do not wake when clearing protection.
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// UFFDIO_CONTINUE mode: do not wake.
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
/// UFFDIO_CONTINUE mode: map write-protected.
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
/// UFFDIO_POISON mode: do not wake.
pub const UFFDIO_POISON_MODE_DONTWAKE: u64 = 1 << 0;
/// UFFDIO_MOVE mode: do not wake.
pub const UFFDIO_MOVE_MODE_DONTWAKE: u64 = 1 << 0;
/// UFFDIO_MOVE mode: tolerate holes in the source.
pub const UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES: u64 = 1 << 1;

/// Flag of userfaultfd(2) / USERFAULTFD_IOC_NEW: handle user-mode faults only.
///
/// Never use it here: KVM writes guest RAM from kernel mode.
pub const UFFD_USER_MODE_ONLY: i32 = 1;

/// `uffd_msg.arg.pagefault.feat`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union uffd_pagefault_feat {
    /// Faulting thread id (with UFFD_FEATURE_THREAD_ID).
    pub ptid: u32,
}

/// `uffd_msg.arg.pagefault`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct uffd_msg_pagefault {
    /// UFFD_PAGEFAULT_FLAG_*.
    pub flags: u64,
    /// Faulting address (page aligned unless UFFD_FEATURE_EXACT_ADDRESS).
    pub address: u64,
    /// Feature-dependent extra data.
    pub feat: uffd_pagefault_feat,
}

/// `uffd_msg.arg.fork`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct uffd_msg_fork {
    /// The child's userfaultfd.
    pub ufd: u32,
}

/// `uffd_msg.arg.remap`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct uffd_msg_remap {
    /// Old start.
    pub from: u64,
    /// New start.
    pub to: u64,
    /// Length.
    pub len: u64,
}

/// `uffd_msg.arg.remove` (also used by UNMAP events).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct uffd_msg_remove {
    /// Start.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
}

/// `uffd_msg.arg.reserved`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct uffd_msg_reserved {
    /// Reserved.
    pub reserved1: u64,
    /// Reserved.
    pub reserved2: u64,
    /// Reserved.
    pub reserved3: u64,
}

/// `uffd_msg.arg`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union uffd_msg_arg {
    /// UFFD_EVENT_PAGEFAULT.
    pub pagefault: uffd_msg_pagefault,
    /// UFFD_EVENT_FORK.
    pub fork: uffd_msg_fork,
    /// UFFD_EVENT_REMAP.
    pub remap: uffd_msg_remap,
    /// UFFD_EVENT_REMOVE and UFFD_EVENT_UNMAP.
    pub remove: uffd_msg_remove,
    /// Raw view.
    pub reserved: uffd_msg_reserved,
}

/// One event read from a userfaultfd (32 bytes).
///
/// The kernel declares it `__packed`; every field sits at its natural alignment anyway, so the
/// layout is identical and this type is simply 8-byte aligned (which only makes it stricter).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct uffd_msg {
    /// UFFD_EVENT_*.
    pub event: u8,
    /// Reserved.
    pub reserved1: u8,
    /// Reserved.
    pub reserved2: u16,
    /// Reserved.
    pub reserved3: u32,
    /// Event-specific data.
    pub arg: uffd_msg_arg,
}

impl core::fmt::Debug for uffd_pagefault_feat {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // SAFETY: the only variant is a u32, valid for any bit pattern.
        let ptid = unsafe { self.ptid };
        f.debug_struct("feat").field("ptid", &ptid).finish()
    }
}

impl core::fmt::Debug for uffd_msg_pagefault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("pagefault")
            .field("flags", &format_args!("{:#x}", self.flags))
            .field("address", &format_args!("{:#x}", self.address))
            .field("feat", &self.feat)
            .finish()
    }
}

impl core::fmt::Debug for uffd_msg_arg {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // SAFETY: `reserved` covers the whole union and is plain integers, valid for any bits.
        let raw = unsafe { self.reserved };
        raw.fmt(f)
    }
}

impl Default for uffd_msg {
    fn default() -> Self {
        uffd_msg {
            event: 0,
            reserved1: 0,
            reserved2: 0,
            reserved3: 0,
            arg: uffd_msg_arg {
                reserved: uffd_msg_reserved {
                    reserved1: 0,
                    reserved2: 0,
                    reserved3: 0,
                },
            },
        }
    }
}

impl core::fmt::Debug for uffd_msg {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("uffd_msg")
            .field("event", &format_args!("{:#x}", self.event))
            .field("arg", &self.arg)
            .finish()
    }
}

/// `struct uffdio_api`: handshake argument and result.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uffdio_api {
    /// Must be UFFD_API.
    pub api: u64,
    /// In: features requested. Out: every feature the kernel supports.
    pub features: u64,
    /// Out: bit mask of ioctls available on the fd (bit = `_UFFDIO_*`).
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uffdio_range {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uffdio_register {
    /// Range to register.
    pub range: uffdio_range,
    /// UFFDIO_REGISTER_MODE_*.
    pub mode: u64,
    /// Out: ioctls available on the range.
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uffdio_copy {
    /// Destination.
    pub dst: u64,
    /// Source.
    pub src: u64,
    /// Length.
    pub len: u64,
    /// UFFDIO_COPY_MODE_*.
    pub mode: u64,
    /// Out: bytes copied or negative errno.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uffdio_zeropage {
    /// Range.
    pub range: uffdio_range,
    /// UFFDIO_ZEROPAGE_MODE_*.
    pub mode: u64,
    /// Out: bytes mapped or negative errno.
    pub zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uffdio_writeprotect {
    /// Range.
    pub range: uffdio_range,
    /// UFFDIO_WRITEPROTECT_MODE_*.
    pub mode: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uffdio_continue {
    /// Range.
    pub range: uffdio_range,
    /// UFFDIO_CONTINUE_MODE_*.
    pub mode: u64,
    /// Out: bytes mapped or negative errno.
    pub mapped: i64,
}

/// `struct uffdio_poison`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uffdio_poison {
    /// Range.
    pub range: uffdio_range,
    /// UFFDIO_POISON_MODE_*.
    pub mode: u64,
    /// Out: bytes poisoned or negative errno.
    pub updated: i64,
}

/// `struct uffdio_move`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct uffdio_move {
    /// Destination.
    pub dst: u64,
    /// Source.
    pub src: u64,
    /// Length.
    pub len: u64,
    /// UFFDIO_MOVE_MODE_*.
    pub mode: u64,
    /// Out: bytes moved or negative errno.
    pub move_: i64,
}

// ---------------------------------------------------------------------------------------------
// fs.h: PAGEMAP_SCAN (Linux 6.7+) on /proc/<pid>/pagemap
// ---------------------------------------------------------------------------------------------

/// ioctl type of /proc/pid/pagemap.
pub const PAGEMAP_IOCTL: u32 = b'f' as u32;
/// Scan page table categories of a range (and optionally write-protect, with WP_ASYNC).
pub const PAGEMAP_SCAN: u32 = iowr::<pm_scan_arg>(PAGEMAP_IOCTL, 16);

/// Category: the range is registered with async write-protect.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// Category: the page has no uffd-wp bit (written since protected, or never protected).
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// Category: file backed.
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// Category: present in memory.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// Category: swapped out (also: non-present entries such as uffd-wp markers).
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Category: mapped to the shared zero page.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// Category: THP or hugetlb.
pub const PAGE_IS_HUGE: u64 = 1 << 6;
/// Category: soft-dirty.
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;
/// Category: guard region (MADV_GUARD_INSTALL, Linux 6.14+).
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// PAGEMAP_SCAN flag: write-protect the matched pages (needs WP_ASYNC ranges).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// PAGEMAP_SCAN flag: fail with EPERM on ranges without async write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: one run of pages with the same categories.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct page_region {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// PAGE_IS_* bits (masked by `return_mask`).
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct pm_scan_arg {
    /// `size_of::<pm_scan_arg>()`.
    pub size: u64,
    /// PM_SCAN_*.
    pub flags: u64,
    /// Start address (page aligned).
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Out: where the walk stopped.
    pub walk_end: u64,
    /// Address of a `page_region` array.
    pub vec: u64,
    /// Length of that array.
    pub vec_len: u64,
    /// Stop after this many pages (0 = no limit).
    pub max_pages: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// Categories that must all be set (after inversion).
    pub category_mask: u64,
    /// At least one of these must be set (0 = no constraint).
    pub category_anyof_mask: u64,
    /// Categories reported in `page_region.categories`.
    pub return_mask: u64,
}

/// `/proc/pid/pagemap` entry bit: soft-dirty.
pub const PM_SOFT_DIRTY: u64 = 1 << 55;
/// `/proc/pid/pagemap` entry bit: page exclusively mapped.
pub const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;
/// `/proc/pid/pagemap` entry bit: uffd-wp set (Linux 5.19+).
pub const PM_UFFD_WP: u64 = 1 << 57;
/// `/proc/pid/pagemap` entry bit: file page or shared anon.
pub const PM_FILE: u64 = 1 << 61;
/// `/proc/pid/pagemap` entry bit: swapped.
pub const PM_SWAP: u64 = 1 << 62;
/// `/proc/pid/pagemap` entry bit: present.
pub const PM_PRESENT: u64 = 1 << 63;
/// `/proc/pid/pagemap` swapped entry: swap type in bits 0-4 (only shown to CAP_SYS_ADMIN; 0 to
/// others).
pub const PM_SWAP_TYPE_MASK: u64 = 0x1f;
/// Swap type of pte markers (`SWP_PTE_MARKER`, the highest 5-bit type): never-populated entries
/// carrying the uffd-wp bit, or poison and guard markers. Real swap devices use the lowest
/// types, migration, device and hwpoison entries the ones between.
pub const SWP_PTE_MARKER: u64 = 31;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn struct_sizes_match_the_kernel() {
        assert_eq!(size_of::<uffd_msg>(), 32);
        assert_eq!(size_of::<uffd_msg_arg>(), 24);
        assert_eq!(size_of::<uffd_msg_pagefault>(), 24);
        assert_eq!(size_of::<uffdio_api>(), 24);
        assert_eq!(size_of::<uffdio_range>(), 16);
        assert_eq!(size_of::<uffdio_register>(), 32);
        assert_eq!(size_of::<uffdio_copy>(), 40);
        assert_eq!(size_of::<uffdio_zeropage>(), 32);
        assert_eq!(size_of::<uffdio_writeprotect>(), 24);
        assert_eq!(size_of::<uffdio_continue>(), 32);
        assert_eq!(size_of::<uffdio_poison>(), 32);
        assert_eq!(size_of::<uffdio_move>(), 40);
        assert_eq!(size_of::<page_region>(), 24);
        assert_eq!(size_of::<pm_scan_arg>(), 96);
    }

    #[test]
    fn field_offsets_match_the_kernel() {
        assert_eq!(offset_of!(uffd_msg, event), 0);
        assert_eq!(offset_of!(uffd_msg, reserved1), 1);
        assert_eq!(offset_of!(uffd_msg, reserved2), 2);
        assert_eq!(offset_of!(uffd_msg, reserved3), 4);
        assert_eq!(offset_of!(uffd_msg, arg), 8);
        assert_eq!(offset_of!(uffd_msg_pagefault, flags), 0);
        assert_eq!(offset_of!(uffd_msg_pagefault, address), 8);
        assert_eq!(offset_of!(uffd_msg_pagefault, feat), 16);
        assert_eq!(offset_of!(uffd_msg_remap, to), 8);
        assert_eq!(offset_of!(uffd_msg_remap, len), 16);
        assert_eq!(offset_of!(uffd_msg_remove, end), 8);
        assert_eq!(offset_of!(uffdio_api, features), 8);
        assert_eq!(offset_of!(uffdio_api, ioctls), 16);
        assert_eq!(offset_of!(uffdio_register, mode), 16);
        assert_eq!(offset_of!(uffdio_register, ioctls), 24);
        assert_eq!(offset_of!(uffdio_copy, mode), 24);
        assert_eq!(offset_of!(uffdio_copy, copy), 32);
        assert_eq!(offset_of!(uffdio_zeropage, zeropage), 24);
        assert_eq!(offset_of!(uffdio_writeprotect, mode), 16);
        assert_eq!(offset_of!(uffdio_continue, mapped), 24);
        assert_eq!(offset_of!(uffdio_poison, updated), 24);
        assert_eq!(offset_of!(uffdio_move, move_), 32);
        assert_eq!(offset_of!(page_region, categories), 16);
        assert_eq!(offset_of!(pm_scan_arg, walk_end), 32);
        assert_eq!(offset_of!(pm_scan_arg, vec), 40);
        assert_eq!(offset_of!(pm_scan_arg, category_inverted), 64);
        assert_eq!(offset_of!(pm_scan_arg, return_mask), 88);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel() {
        // Values as computed by the C macros on x86-64.
        assert_eq!(USERFAULTFD_IOC_NEW, 0xAA00);
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xC020_AA04);
        assert_eq!(UFFDIO_MOVE, 0xC028_AA05);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(UFFDIO_CONTINUE, 0xC020_AA07);
        assert_eq!(UFFDIO_POISON, 0xC020_AA08);
        assert_eq!(PAGEMAP_SCAN, 0xC060_6610);
    }

    #[test]
    fn feature_names_cover_distinct_bits() {
        let mut all = 0u64;
        for (bit, _) in UFFD_FEATURE_NAMES {
            assert_eq!(bit.count_ones(), 1);
            assert_eq!(all & bit, 0, "duplicate bit {bit:#x}");
            all |= bit;
        }
        assert_eq!(all, (1 << 17) - 1);
    }
}
