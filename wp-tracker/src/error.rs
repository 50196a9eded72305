//! The tracker's errors: one variant per failure, saying what to do where the user can act.

use std::io;

use uffd_sys::{Features, OpenError};

use crate::HostRange;

/// Errors of the tracker.
#[derive(Debug, thiserror::Error)]
pub enum WpError {
    /// The kernel has no userfaultfd at all.
    #[error("this kernel has no userfaultfd: use a kernel built with CONFIG_USERFAULTFD")]
    NoUserfaultfd,
    /// Not allowed to create a userfaultfd that handles kernel-mode faults (message says what to do).
    #[error("{0}")]
    PermissionDenied(#[source] OpenError),
    /// Creating the userfaultfd or its API handshake failed for another reason.
    #[error("cannot set up a userfaultfd")]
    Open(#[source] OpenError),
    /// The kernel's userfaultfd lacks write-protect support.
    #[error(
        "this kernel's userfaultfd has no write-protect support (needs Linux 5.7+ with \
         CONFIG_HAVE_ARCH_USERFAULTFD_WP; kernel offers {available})"
    )]
    NoWriteProtect {
        /// The features the kernel does offer.
        available: Features,
    },
    /// A range is empty, overflows, or is not aligned to the base page size.
    #[error("range {range} is empty or not aligned to the {page_size}-byte page size")]
    NotAligned {
        /// The offending range.
        range: HostRange,
        /// The page size it must be aligned to.
        page_size: usize,
    },
    /// The range is not entirely mapped (ENOMEM from UFFDIO_REGISTER).
    #[error("range {range} is not entirely mapped: map the memory before registering it")]
    NotMapped {
        /// The offending range.
        range: HostRange,
    },
    /// The kernel refused this memory for write-protect (EINVAL from UFFDIO_REGISTER).
    #[error(
        "range {range} cannot be registered for write-protect: use anonymous, memfd/shmem or \
         hugetlbfs memory (shmem and hugetlbfs need UFFD_FEATURE_WP_HUGETLBFS_SHMEM, Linux 5.19+: \
         {shmem_wp}), aligned to its huge page size"
    )]
    UnsupportedMemory {
        /// The offending range.
        range: HostRange,
        /// Whether WP_HUGETLBFS_SHMEM is in use.
        shmem_wp: &'static str,
    },
    /// The registration succeeded but the kernel offers no UFFDIO_WRITEPROTECT on the range.
    #[error(
        "range {range} registered, but the kernel offers no UFFDIO_WRITEPROTECT on it \
         (ioctls {ioctls:#x}): this memory type has no write-protect support on this kernel"
    )]
    NoWriteProtectOnRange {
        /// The offending range.
        range: HostRange,
        /// The ioctls the kernel does offer (`1 << _UFFDIO_*`).
        ioctls: u64,
    },
    /// The range overlaps a range this tracker already registered.
    #[error("range {range} overlaps the already registered range {existing}")]
    AlreadyRegistered {
        /// The new range.
        range: HostRange,
        /// The registered range it overlaps.
        existing: HostRange,
    },
    /// The range is registered with another userfaultfd (EBUSY).
    #[error(
        "range {range} is already registered with another userfaultfd: release it there first"
    )]
    RegisteredElsewhere {
        /// The offending range.
        range: HostRange,
    },
    /// The range is not covered by registered ranges (or the kernel no longer tracks it: ENOENT).
    #[error("range {range} is not inside ranges registered with this tracker: register it first")]
    NotRegistered {
        /// The offending range.
        range: HostRange,
    },
    /// The kernel rejected the range for protect/unprotect (EINVAL), typically hugetlbfs memory
    /// not aligned to its huge page size.
    #[error(
        "range {range} rejected by UFFDIO_WRITEPROTECT: align it to the memory's (huge) page size"
    )]
    Misaligned {
        /// The offending range.
        range: HostRange,
    },
    /// The process's address space is going away (ESRCH).
    #[error("the address space is exiting; nothing left to protect")]
    ProcessExiting,
    /// Populating never-touched pages read-only before protecting them failed.
    #[error(
        "cannot populate {range} read-only before protecting it (needed without \
         UFFD_FEATURE_WP_UNPOPULATED; MADV_POPULATE_READ needs Linux 5.14+)"
    )]
    Populate {
        /// The range being populated.
        range: HostRange,
        /// The madvise error.
        #[source]
        source: io::Error,
    },
    /// Another userfaultfd ioctl failed.
    #[error("{op} on {range} failed")]
    Ioctl {
        /// Which ioctl.
        op: &'static str,
        /// On which range.
        range: HostRange,
        /// The ioctl error.
        #[source]
        source: io::Error,
    },
    /// A copy destination does not have the length of the range copied.
    #[error("cannot copy {range} into a buffer of {len} bytes")]
    LengthMismatch {
        /// The range to copy.
        range: HostRange,
        /// The buffer length.
        len: usize,
    },
    /// MADV_HUGEPAGE or MADV_NOHUGEPAGE was refused (typically EINVAL: the kernel has no
    /// transparent huge page support).
    #[error("cannot advise {range} to {} huge pages", if *.huge { "use" } else { "avoid" })]
    HugePageAdvice {
        /// The range.
        range: HostRange,
        /// True for MADV_HUGEPAGE, false for MADV_NOHUGEPAGE.
        huge: bool,
        /// The madvise error.
        #[source]
        source: io::Error,
    },
    /// MADV_COLLAPSE refused to back a range with huge pages again.
    #[error("cannot collapse {range} into huge pages")]
    Collapse {
        /// The range.
        range: HostRange,
        /// The madvise error.
        #[source]
        source: io::Error,
    },
    /// Reading fault events from the userfaultfd failed.
    #[error("reading userfaultfd events failed")]
    Read(#[source] io::Error),
    /// Waiting for fault events failed.
    #[error("waiting for userfaultfd events failed")]
    Poll(#[source] io::Error),
    /// An event other than a page fault arrived (never enabled here; faults read before it in
    /// the same batch were still appended).
    #[error("unexpected userfaultfd event {event:#x} (only page faults are enabled)")]
    UnexpectedEvent {
        /// The UFFD_EVENT_* code.
        event: u8,
    },
    /// The thread that serves faults while armed could not be started; nothing was protected.
    #[error("cannot start the thread that serves faults while armed")]
    Thread(#[source] io::Error),
    /// Serving faults while armed failed; everything was unprotected again.
    #[error("serving write faults while armed failed; everything was unprotected again")]
    Armed(#[source] Box<WpError>),
    /// The armed protection was already sealed or given up.
    #[error("the armed write-protection is no longer active (already sealed or given up)")]
    ArmClosed,
}
