//! Demand filling of guest RAM with userfaultfd MISSING mode, for lazy restore.
//!
//! A [`MissingTracker`] owns one userfaultfd (kernel-mode faults included: KVM reads and writes
//! guest RAM from the kernel) and registers fresh guest memory in MISSING mode. Every first
//! touch of a page that was never filled blocks the toucher (a thread, or a vCPU inside
//! KVM_RUN) and is reported as a [`MissingFault`]; the owner fills the page with
//! [`MissingTracker::fill`] (`UFFDIO_COPY`) or [`MissingTracker::fill_zero`]
//! (`UFFDIO_ZEROPAGE`), which wakes the toucher. On anonymous memory a whole 2 MiB block can be
//! moved in instead ([`MissingTracker::move_in`], `UFFDIO_MOVE`, Linux 6.8+): its bytes are
//! assembled in a [`HugeBlock`] (a private huge page of staging memory) and the page itself
//! changes hands, so the guest block is one huge page at once and nothing is copied again.
//!
//! Why filling is safe to offer as a safe method:
//! - Only memory registered through [`MissingTracker::register_memory`] can be filled: guest
//!   memory that the tracker keeps a handle on (so it stays mapped), and that Rust code only
//!   reaches through raw pointers and volatile accesses (vm-memory), never through references.
//! - The kernel fills a page only where none is mapped yet: a page that is already there (filled
//!   earlier, by anyone) answers `EEXIST` and is left untouched, so a fill never changes bytes
//!   someone could have seen. [`MissingTracker::fill`] treats `EEXIST` as "already done" and
//!   goes on with the next page, so two threads may race to fill the same range.
//! - A move takes pages out of a [`HugeBlock`] the caller holds exclusively (`&mut`) and maps
//!   them only where no page is mapped yet (`EEXIST` otherwise, reported as
//!   [`MissingError::DestinationNotMissing`] with what did arrive), with the same guarantees.
//!
//! What the owner must know: pages still missing when the registration ends (unregister, or the
//! tracker dropped) are ordinary fresh memory again and read as zeros. Unregister only once every
//! page is filled, or once nothing will read the memory any more.
//!
//! Anonymous and memfd (shmem) memory are supported; hugetlbfs registers too, but its fills must
//! then cover whole huge pages (the kernel refuses anything else).

use std::io;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uffd_sys::host::{advise, page_size, Advice};
use uffd_sys::{
    uffd_msg, Features, OpenError, OpenPath, Userfaultfd, _UFFDIO_COPY, _UFFDIO_MOVE, _UFFDIO_WAKE,
    _UFFDIO_ZEROPAGE, UFFDIO_REGISTER_MODE_MISSING, UFFD_EVENT_PAGEFAULT,
    UFFD_FEATURE_MISSING_HUGETLBFS, UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_MOVE,
    UFFD_PAGEFAULT_FLAG_WRITE,
};

use crate::{is_mapped, HostRange};

/// One missing fault: a first touch of a page that was never filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingFault {
    /// Faulting host address (page aligned).
    pub addr: usize,
    /// True if the toucher writes (false: it reads).
    pub write: bool,
}

/// Errors of the [`MissingTracker`].
#[derive(Debug, thiserror::Error)]
pub enum MissingError {
    /// The kernel has no userfaultfd at all.
    #[error("this kernel has no userfaultfd: use a kernel built with CONFIG_USERFAULTFD")]
    NoUserfaultfd,
    /// Not allowed to create a userfaultfd that handles kernel-mode faults (message says what to do).
    #[error("{0}")]
    PermissionDenied(#[source] OpenError),
    /// Creating the userfaultfd or its API handshake failed for another reason.
    #[error("cannot set up a userfaultfd")]
    Open(#[source] OpenError),
    /// A range is empty, overflows, or is not aligned to the page size.
    #[error("range {range} is empty or not aligned to the {page_size}-byte page size")]
    NotAligned {
        /// The offending range.
        range: HostRange,
        /// The page size it must be aligned to.
        page_size: usize,
    },
    /// The range is not entirely mapped (ENOMEM, or EINVAL on a hole, from UFFDIO_REGISTER).
    #[error("range {range} is not entirely mapped: map the memory before registering it")]
    NotMapped {
        /// The offending range.
        range: HostRange,
    },
    /// The kernel refused this memory for MISSING mode (EINVAL from UFFDIO_REGISTER).
    #[error(
        "range {range} cannot be registered for missing-page faults: use anonymous, memfd/shmem \
         or hugetlbfs memory (kernel offers {available})"
    )]
    UnsupportedMemory {
        /// The offending range.
        range: HostRange,
        /// The features the kernel offers.
        available: Features,
    },
    /// The registration succeeded but the kernel offers no UFFDIO_COPY or UFFDIO_WAKE on it.
    #[error(
        "range {range} registered, but the kernel offers no UFFDIO_COPY/UFFDIO_WAKE on it \
         (ioctls {ioctls:#x})"
    )]
    NoCopyOnRange {
        /// The offending range.
        range: HostRange,
        /// The ioctls the kernel does offer (`1 << _UFFDIO_*`).
        ioctls: u64,
    },
    /// The range is registered with another userfaultfd (EBUSY).
    #[error(
        "range {range} is already registered with another userfaultfd: release it there first"
    )]
    RegisteredElsewhere {
        /// The offending range.
        range: HostRange,
    },
    /// The range is not inside memory registered with this tracker.
    #[error("range {range} is not inside memory registered with this tracker")]
    NotRegistered {
        /// The offending range.
        range: HostRange,
    },
    /// A fill source does not have the length of the range filled.
    #[error("cannot fill {range} from a buffer of {len} bytes")]
    LengthMismatch {
        /// The range to fill.
        range: HostRange,
        /// The buffer length.
        len: usize,
    },
    /// A move found a page of its destination already there (EEXIST): `moved` bytes from the
    /// start of `range` arrived (their waiters woken), the rest stayed in the [`HugeBlock`].
    #[error("{range} is not wholly missing: {moved} bytes moved before a page that exists")]
    DestinationNotMissing {
        /// The destination of the move.
        range: HostRange,
        /// Bytes moved from the start of the range.
        moved: usize,
    },
    /// Moves are not possible into this range: the kernel has no UFFDIO_MOVE, the memory is not
    /// private anonymous memory, or the range is not one whole huge page, aligned.
    #[error("cannot move pages into {range} (UFFDIO_MOVE needs {why})")]
    MoveUnsupported {
        /// The destination.
        range: HostRange,
        /// What is missing.
        why: &'static str,
    },
    /// Staging memory for moves could not be mapped.
    #[error("cannot map {len} bytes of staging memory")]
    Staging {
        /// The length asked for.
        len: usize,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
    /// The process's address space is going away (ESRCH).
    #[error("the address space is exiting; nothing left to fill")]
    ProcessExiting,
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
    /// MADV_COLLAPSE refused to back a range with huge pages.
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
}

/// A region registered in MISSING mode.
#[derive(Debug, Clone, Copy)]
struct Registered {
    range: HostRange,
    /// UFFDIO_ZEROPAGE is offered on it (not on hugetlbfs).
    zeropage: bool,
    /// UFFDIO_MOVE works on it: private anonymous memory, and the feature enabled.
    movable: bool,
}

/// Demand filler of guest memory (MISSING mode). `Send + Sync`: one thread can read faults while
/// others fill.
#[derive(Debug)]
pub struct MissingTracker {
    /// Guest memory registered through [`MissingTracker::register_memory`], held so that its
    /// mappings outlive the registration and every fill (`Drop` unregisters first).
    kept: Mutex<Vec<vm_memory::GuestMemoryMmap>>,
    uffd: Userfaultfd,
    /// Registered regions, sorted by start, non-overlapping.
    ranges: Mutex<Vec<Registered>>,
    /// Every region ever registered (still mapped: `kept`), for [`MissingTracker::collapse_huge`].
    known: Mutex<Vec<HostRange>>,
    page_size: usize,
}

/// How many events one read() fetches.
const READ_BATCH: usize = 128;
/// A page of zeros, the source of zero fills where UFFDIO_ZEROPAGE is not offered.
const ZEROS_LEN: usize = 64 << 10;

impl MissingTracker {
    /// Open a userfaultfd able to handle kernel-mode faults, for MISSING mode on anonymous,
    /// shmem and (where the kernel offers it) hugetlbfs memory.
    pub fn new() -> Result<Self, MissingError> {
        let info = Userfaultfd::probe().map_err(open_error)?;
        let want =
            (UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MISSING_HUGETLBFS | UFFD_FEATURE_MOVE)
                & info.available.0;
        let uffd = Userfaultfd::open(want).map_err(open_error)?;
        Ok(MissingTracker {
            kept: Mutex::new(Vec::new()),
            uffd,
            ranges: Mutex::new(Vec::new()),
            known: Mutex::new(Vec::new()),
            page_size: page_size(),
        })
    }

    /// The userfaultfd features in use.
    pub fn features(&self) -> Features {
        self.uffd.features()
    }
    /// How the userfaultfd was obtained.
    pub fn opened_via(&self) -> OpenPath {
        self.uffd.opened_via()
    }
    /// The base page size ranges must be aligned to.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// The ranges registered now, sorted by address.
    pub fn registered(&self) -> Vec<HostRange> {
        lock(&self.ranges).iter().map(|r| r.range).collect()
    }

    /// Register every region of `mem` in MISSING mode. `mem` should be fresh: pages already
    /// populated stay as they are and are never reported. The tracker keeps a handle on the
    /// regions, so they stay mapped while registered and while fills may run. On error, the
    /// regions registered by this call are unregistered again.
    pub fn register_memory(&self, mem: &vm_memory::GuestMemoryMmap) -> Result<(), MissingError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut done: Vec<Registered> = Vec::new();
        let undo = |done: &[Registered]| {
            for r in done {
                let _ = self.uffd.unregister(r.range.start, r.range.len);
            }
        };
        let mut ranges = lock(&self.ranges);
        for region in mem.iter() {
            let range = HostRange {
                start: region.as_ptr() as usize,
                // usize is 64-bit on every host snapctl supports.
                len: region.len() as usize,
            };
            if let Err(e) = self.check_aligned(range) {
                undo(&done);
                return Err(e);
            }
            let ioctls =
                match self
                    .uffd
                    .register(range.start, range.len, UFFDIO_REGISTER_MODE_MISSING)
                {
                    Ok(i) => i,
                    Err(e) => {
                        undo(&done);
                        return Err(self.register_error(range, e));
                    }
                };
            let needed = (1 << _UFFDIO_COPY) | (1 << _UFFDIO_WAKE);
            if ioctls & needed != needed {
                let _ = self.uffd.unregister(range.start, range.len);
                undo(&done);
                return Err(MissingError::NoCopyOnRange { range, ioctls });
            }
            done.push(Registered {
                range,
                zeropage: ioctls & (1 << _UFFDIO_ZEROPAGE) != 0,
                // Moves need private anonymous memory on both sides; a region with a file
                // behind it (memfd, hugetlbfs) is shared.
                movable: ioctls & (1 << _UFFDIO_MOVE) != 0
                    && self.uffd.features().contains(UFFD_FEATURE_MOVE)
                    && region.file_offset().is_none(),
            });
        }
        lock(&self.kept).push(mem.clone());
        lock(&self.known).extend(done.iter().map(|r| r.range));
        ranges.extend(done);
        ranges.sort_by_key(|r| r.range.start);
        Ok(())
    }

    /// Fill the missing pages of `range` (inside registered memory) with `src` (`UFFDIO_COPY`,
    /// waking whoever waits on them); pages already there are left as they are. Returns the
    /// bytes this call filled.
    pub fn fill(&self, range: HostRange, src: &[u8]) -> Result<usize, MissingError> {
        self.check_covered(range)?;
        if src.len() != range.len {
            return Err(MissingError::LengthMismatch {
                range,
                len: src.len(),
            });
        }
        self.fill_loop(range, "UFFDIO_COPY", |off, len| {
            // SAFETY: `src[off..off + len]` is readable (a borrowed slice, `off + len <= src.len()`
            // by the loop). The destination lies in registered guest memory (checked above) that
            // `kept` holds mapped, reached by Rust code only through raw pointers and volatile
            // accesses, never references; and UFFDIO_COPY writes only pages not mapped yet
            // (EEXIST otherwise), whose bytes nobody could have read.
            unsafe {
                self.uffd
                    .copy_partial(range.start + off, src[off..].as_ptr() as usize, len, 0)
            }
        })
    }

    /// Fill the missing pages of `range` (inside registered memory) with zeros (UFFDIO_ZEROPAGE
    /// where offered: the shared zero page on anonymous memory; else a copy of zeros), waking
    /// whoever waits on them. Returns the bytes this call filled.
    pub fn fill_zero(&self, range: HostRange) -> Result<usize, MissingError> {
        let zeropage = self.check_covered(range)?;
        if zeropage {
            return self.fill_loop(range, "UFFDIO_ZEROPAGE", |off, len| {
                // SAFETY: as in `fill`: registered, kept-mapped memory, and only pages not
                // mapped yet are filled.
                unsafe { self.uffd.zeropage_partial(range.start + off, len, 0) }
            });
        }
        let zeros = vec![0u8; ZEROS_LEN.min(range.len)];
        let mut filled = 0;
        let mut off = 0;
        while off < range.len {
            let len = zeros.len().min(range.len - off);
            filled += self.fill(HostRange::new(range.start + off, len), &zeros[..len])?;
            off += len;
        }
        Ok(filled)
    }

    /// True if [`MissingTracker::move_in`] can work on `range` (registered private anonymous
    /// memory, a kernel with UFFDIO_MOVE); it still needs a 2 MiB-aligned huge page there.
    pub fn can_move(&self, range: HostRange) -> bool {
        matches!(self.covered(range), Ok((_, true)))
    }

    /// Moves the pages of `src` into `dst` (one whole [`HUGE_BLOCK`], aligned, inside
    /// registered private anonymous memory whose pages are all still missing), waking whoever
    /// waits on it. A source that is one huge page arrives as one huge page (the kernel moves
    /// the page table entry: no copy, no new allocation). `src` is empty afterwards (reads as
    /// zeros; the next write allocates fresh memory).
    ///
    /// If a page of `dst` is already there (a fill raced this move),
    /// [`MissingError::DestinationNotMissing`] says how much arrived; the rest is still in
    /// `src`, unchanged: fill the remaining missing pages from it with
    /// [`MissingTracker::fill`] (pages that exist are skipped). Any other error leaves the same
    /// state (what moved is in `dst`, the rest in `src`).
    pub fn move_in(&self, dst: HostRange, src: &mut HugeBlock) -> Result<(), MissingError> {
        let (_, movable) = self.covered(dst)?;
        if !movable {
            return Err(MissingError::MoveUnsupported {
                range: dst,
                why: "private anonymous memory and a kernel offering it (Linux 6.8+)",
            });
        }
        if dst.len != HUGE_BLOCK || !dst.start.is_multiple_of(HUGE_BLOCK) {
            return Err(MissingError::MoveUnsupported {
                range: dst,
                why: "one whole 2 MiB-aligned block",
            });
        }
        let mut off = 0;
        while off < dst.len {
            // SAFETY: `src` is a private anonymous mapping that only the exclusively borrowed
            // `HugeBlock` reaches (no reference into it lives: `as_mut_slice` borrows it), so its
            // pages may leave; the destination lies in registered guest memory (checked above)
            // that `kept` holds mapped, reached by Rust code only through raw pointers and
            // volatile accesses; and UFFDIO_MOVE maps only where no page is mapped yet (EEXIST
            // otherwise), pages whose bytes nobody could have read.
            let r = unsafe {
                self.uffd
                    .move_partial(dst.start + off, src.start + off, dst.len - off, 0)
            };
            match r {
                Ok(n) => off += n,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EEXIST) => {
                        return Err(MissingError::DestinationNotMissing {
                            range: dst,
                            moved: off,
                        })
                    }
                    Some(libc::EAGAIN | libc::EINTR) => std::thread::yield_now(),
                    _ => {
                        let at = HostRange::new(dst.start + off, dst.len - off);
                        return Err(self.ioctl_error("UFFDIO_MOVE", at, e));
                    }
                },
            }
        }
        Ok(())
    }

    /// Wake threads blocked on `range` (e.g. a fault reported after someone else filled its page).
    pub fn wake(&self, range: HostRange) -> Result<(), MissingError> {
        self.check_covered(range)?;
        self.uffd
            .wake(range.start, range.len)
            .map_err(|e| self.ioctl_error("UFFDIO_WAKE", range, e))
    }

    /// Unregister every range (waking anyone blocked: their pages read as zeros if still
    /// missing, see the module docs); tries all, returns the first error.
    pub fn unregister_all(&self) -> Result<(), MissingError> {
        let mut ranges = lock(&self.ranges);
        let mut first_err = None;
        let mut kept = Vec::new();
        for r in ranges.drain(..) {
            if let Err(e) = self.uffd.unregister(r.range.start, r.range.len) {
                kept.push(r);
                first_err.get_or_insert(self.ioctl_error("UFFDIO_UNREGISTER", r.range, e));
            }
        }
        *ranges = kept;
        first_err.map_or(Ok(()), Err)
    }

    /// Ask the kernel to back `range` (2 MiB aligned, inside memory ever registered here) with
    /// transparent huge pages (MADV_COLLAPSE, Linux 6.1+). Contents do not change. Meant for
    /// after [`MissingTracker::unregister_all`]: the kernel does not collapse over missing pages
    /// of a registered range. Fails when the pages are not THP-eligible.
    pub fn collapse_huge(&self, range: HostRange) -> Result<(), MissingError> {
        self.check_aligned(range)?;
        if !lock(&self.known)
            .iter()
            .any(|r| r.contains(range.start) && range.end() <= r.end())
        {
            return Err(MissingError::NotRegistered { range });
        }
        advise(range.start, range.len, Advice::Collapse)
            .map_err(|source| MissingError::Collapse { range, source })
    }

    /// Read pending fault events without blocking; appends to `out`, returns how many.
    pub fn read_faults(&self, out: &mut Vec<MissingFault>) -> Result<usize, MissingError> {
        let mut buf = [uffd_msg::default(); READ_BATCH];
        let mut total = 0;
        loop {
            let n = self
                .uffd
                .read_events(&mut buf)
                .map_err(MissingError::Read)?;
            for msg in &buf[..n] {
                if msg.event != UFFD_EVENT_PAGEFAULT {
                    return Err(MissingError::UnexpectedEvent { event: msg.event });
                }
                // SAFETY: the kernel filled a PAGEFAULT event, so `pagefault` is the active
                // variant (and all variants are plain integers anyway).
                let pf = unsafe { msg.arg.pagefault };
                out.push(MissingFault {
                    addr: pf.address as usize & !(self.page_size - 1),
                    write: pf.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
                });
                total += 1;
            }
            if n < buf.len() {
                return Ok(total);
            }
        }
    }

    /// Wait up to `timeout` for fault events; appends to `out`, returns how many (0 on timeout).
    pub fn wait_faults(
        &self,
        timeout: Duration,
        out: &mut Vec<MissingFault>,
    ) -> Result<usize, MissingError> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.read_faults(out)?;
            if n > 0 {
                return Ok(n);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(0);
            }
            // Another reader may consume the events between poll and read: loop until deadline.
            if !self
                .uffd
                .wait_readable(Some(left))
                .map_err(MissingError::Poll)?
            {
                return Ok(0);
            }
        }
    }

    /// Runs `op(offset, len)` (a COPY or ZEROPAGE of `range` from `offset`) until the whole
    /// range is filled: a partial fill goes on after what was filled, a page that exists
    /// (EEXIST) is skipped, EAGAIN/EINTR retry.
    fn fill_loop(
        &self,
        range: HostRange,
        op_name: &'static str,
        mut op: impl FnMut(usize, usize) -> io::Result<usize>,
    ) -> Result<usize, MissingError> {
        let mut off = 0;
        let mut filled = 0;
        while off < range.len {
            match op(off, range.len - off) {
                Ok(n) => {
                    off += n;
                    filled += n;
                }
                Err(e) => match e.raw_os_error() {
                    // Filled before (by anyone): already what it must be; nobody waits on it.
                    Some(libc::EEXIST) => off += self.page_size,
                    Some(libc::EAGAIN | libc::EINTR) => std::thread::yield_now(),
                    _ => {
                        let at = HostRange::new(range.start + off, range.len - off);
                        return Err(self.ioctl_error(op_name, at, e));
                    }
                },
            }
        }
        Ok(filled)
    }

    fn check_aligned(&self, range: HostRange) -> Result<(), MissingError> {
        let mask = self.page_size - 1;
        if range.len == 0
            || range.start & mask != 0
            || range.len & mask != 0
            || range.start.checked_add(range.len).is_none()
        {
            return Err(MissingError::NotAligned {
                range,
                page_size: self.page_size,
            });
        }
        Ok(())
    }

    /// The range must be aligned and covered by the union of registered ranges; returns whether
    /// UFFDIO_ZEROPAGE is offered on all of it.
    fn check_covered(&self, range: HostRange) -> Result<bool, MissingError> {
        self.covered(range).map(|(zeropage, _)| zeropage)
    }

    /// As [`MissingTracker::check_covered`]; returns whether UFFDIO_ZEROPAGE is offered on all
    /// of it, and whether UFFDIO_MOVE works on all of it.
    fn covered(&self, range: HostRange) -> Result<(bool, bool), MissingError> {
        self.check_aligned(range)?;
        let ranges = lock(&self.ranges);
        let mut cursor = range.start;
        let (mut zeropage, mut movable) = (true, true);
        for r in ranges.iter() {
            if r.range.contains(cursor) {
                zeropage &= r.zeropage;
                movable &= r.movable;
                cursor = r.range.end();
                if cursor >= range.end() {
                    return Ok((zeropage, movable));
                }
            }
        }
        Err(MissingError::NotRegistered { range })
    }

    fn register_error(&self, range: HostRange, e: io::Error) -> MissingError {
        match e.raw_os_error() {
            Some(libc::ENOMEM) => MissingError::NotMapped { range },
            Some(libc::EINVAL) if !is_mapped(range) => MissingError::NotMapped { range },
            Some(libc::EINVAL) => MissingError::UnsupportedMemory {
                range,
                available: self.uffd.api_info().available,
            },
            Some(libc::EBUSY) => MissingError::RegisteredElsewhere { range },
            Some(libc::ESRCH) => MissingError::ProcessExiting,
            _ => MissingError::Ioctl {
                op: "UFFDIO_REGISTER",
                range,
                source: e,
            },
        }
    }

    fn ioctl_error(&self, op: &'static str, range: HostRange, e: io::Error) -> MissingError {
        match e.raw_os_error() {
            Some(libc::ENOENT) => MissingError::NotRegistered { range },
            Some(libc::ESRCH) => MissingError::ProcessExiting,
            _ => MissingError::Ioctl {
                op,
                range,
                source: e,
            },
        }
    }
}

/// Bytes of a [`HugeBlock`]: one x86-64 huge page.
pub const HUGE_BLOCK: usize = 2 << 20;

/// One 2 MiB-aligned block of private anonymous staging memory that prefers a transparent huge
/// page (MADV_HUGEPAGE): the source of [`MissingTracker::move_in`]. Written through
/// [`HugeBlock::as_mut_slice`] (the first write allocates the huge page, zeroed by the kernel);
/// a move takes its pages, leaving it empty (reading zeros) for the next block. Unmapped on drop.
#[derive(Debug)]
pub struct HugeBlock {
    /// Start of the block (2 MiB aligned); `HUGE_BLOCK` bytes, mapped while `self` lives.
    start: usize,
}

impl HugeBlock {
    /// Maps a fresh, empty block.
    pub fn new() -> Result<Self, MissingError> {
        let len = 2 * HUGE_BLOCK;
        // SAFETY: a fresh anonymous private mapping at a kernel-chosen address; no existing
        // memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(MissingError::Staging {
                len,
                source: io::Error::last_os_error(),
            });
        }
        let base = p as usize;
        let start = base.next_multiple_of(HUGE_BLOCK);
        // Keep the aligned 2 MiB only.
        for (at, n) in [
            (base, start - base),
            (start + HUGE_BLOCK, base + len - start - HUGE_BLOCK),
        ] {
            if n > 0 {
                // SAFETY: unmapping parts of the mapping made above, outside the kept block;
                // nothing references them.
                unsafe { libc::munmap(at as *mut libc::c_void, n) };
            }
        }
        let block = HugeBlock { start };
        // Only how the block is backed changes; failure (no THP) leaves small pages.
        let _ = advise(start, HUGE_BLOCK, Advice::HugePage);
        Ok(block)
    }

    /// The block's bytes (pages moved out read as zeros).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `start..start + HUGE_BLOCK` is mapped read/write for as long as `self` lives
        // and only this object reaches it; the exclusive borrow of `self` makes the slice the
        // only way in while it lives. Holes read as zeros.
        unsafe { std::slice::from_raw_parts_mut(self.start as *mut u8, HUGE_BLOCK) }
    }

    /// The block's host range.
    pub fn range(&self) -> HostRange {
        HostRange::new(self.start, HUGE_BLOCK)
    }

    /// True if the block is one huge page now.
    pub fn is_huge(&self) -> bool {
        let huge = uffd_sys::pagemap::huge_regions(self.start, HUGE_BLOCK);
        huge.iter().map(|(a, b)| b - a).sum::<usize>() == HUGE_BLOCK
    }

    /// Allocates the block's memory now (MADV_POPULATE_WRITE: one huge page where THP allows,
    /// zeroed by the kernel) rather than on its first write; contents do not change.
    pub fn populate(&mut self) -> Result<(), MissingError> {
        // SAFETY: the block is ours; populating for write maps zeroed pages where there are none
        // and leaves existing pages as they are, so no byte changes.
        let r = unsafe {
            libc::madvise(
                self.start as *mut libc::c_void,
                HUGE_BLOCK,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(MissingError::Staging {
                len: HUGE_BLOCK,
                source: io::Error::last_os_error(),
            })
        }
    }

    /// Empties the block (MADV_DONTNEED: every page goes, reads as zeros), e.g. after a move
    /// that stopped half way left small pages behind.
    pub fn clear(&mut self) {
        // SAFETY: the block is ours and exclusively borrowed; dropping its pages only makes it
        // read zeros, which every byte value allows.
        unsafe {
            libc::madvise(
                self.start as *mut libc::c_void,
                HUGE_BLOCK,
                libc::MADV_DONTNEED,
            )
        };
    }
}

impl Drop for HugeBlock {
    fn drop(&mut self) {
        // SAFETY: our own mapping; nothing references it any more.
        unsafe { libc::munmap(self.start as *mut libc::c_void, HUGE_BLOCK) };
    }
}

impl Drop for MissingTracker {
    fn drop(&mut self) {
        // Best effort: nothing to report to from a destructor. The fd's close would unregister
        // too; doing it first keeps the order "unregister, then drop the mappings" explicit.
        let _ = self.unregister_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update of the tracker's lists is a single step: still consistent after a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn open_error(e: OpenError) -> MissingError {
    if e.is_unsupported() {
        MissingError::NoUserfaultfd
    } else if e.is_permission_denied() {
        MissingError::PermissionDenied(e)
    } else {
        MissingError::Open(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    const PS: usize = 4096;

    fn mem(pages: usize) -> (GuestMemoryMmap, HostRange) {
        let m: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), pages * PS)]).unwrap();
        let host = m.get_host_address(GuestAddress(0)).unwrap() as usize;
        (m, HostRange::new(host, pages * PS))
    }

    #[test]
    fn tracker_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<MissingTracker>();
    }

    #[test]
    fn a_reader_waits_for_its_page_and_sees_exactly_the_fill() {
        let (m, r) = mem(16);
        let t = Arc::new(MissingTracker::new().unwrap());
        t.register_memory(&m).unwrap();
        let reader = {
            let m = m.clone();
            std::thread::spawn(move || {
                let mut b = [0u8; 8];
                m.read_slice(&mut b, GuestAddress(5 * PS as u64 + 8))
                    .unwrap();
                b
            })
        };
        let mut faults = Vec::new();
        assert_eq!(
            t.wait_faults(Duration::from_secs(10), &mut faults).unwrap(),
            1
        );
        assert_eq!(
            faults[0],
            MissingFault {
                addr: r.start + 5 * PS,
                write: false
            }
        );
        let page: Vec<u8> = (0..PS).map(|i| (i % 251) as u8).collect();
        let filled = t.fill(HostRange::new(r.start + 5 * PS, PS), &page).unwrap();
        assert_eq!(filled, PS);
        assert_eq!(reader.join().unwrap(), page[8..16]);
        // A second fill of the same page changes nothing and reports nothing filled.
        let other = vec![0xeeu8; 2 * PS];
        let filled = t
            .fill(HostRange::new(r.start + 4 * PS, 2 * PS), &other)
            .unwrap();
        assert_eq!(filled, PS, "only the missing page 4 was filled");
        let mut b = [0u8; 4];
        m.read_slice(&mut b, GuestAddress(5 * PS as u64 + 8))
            .unwrap();
        assert_eq!(b, page[8..12], "an existing page was overwritten");
        m.read_slice(&mut b, GuestAddress(4 * PS as u64)).unwrap();
        assert_eq!(b, [0xee; 4]);
    }

    #[test]
    fn zero_fill_over_partly_filled_memory_keeps_the_data() {
        let (m, r) = mem(32);
        let t = MissingTracker::new().unwrap();
        t.register_memory(&m).unwrap();
        let data = vec![7u8; 2 * PS];
        t.fill(HostRange::new(r.start + 10 * PS, 2 * PS), &data)
            .unwrap();
        assert_eq!(t.fill_zero(r).unwrap(), 30 * PS);
        let mut all = vec![1u8; 32 * PS];
        m.read_slice(&mut all, GuestAddress(0)).unwrap();
        for (i, p) in all.chunks(PS).enumerate() {
            let want = if (10..12).contains(&i) { 7 } else { 0 };
            assert!(p.iter().all(|&b| b == want), "page {i}");
        }
        // Everything is there: a writer does not fault any more.
        t.unregister_all().unwrap();
        assert!(t.registered().is_empty());
    }

    #[test]
    fn a_blocked_writer_is_woken_by_a_fill_of_its_page() {
        let (m, r) = mem(8);
        let t = Arc::new(MissingTracker::new().unwrap());
        t.register_memory(&m).unwrap();
        let writer = {
            let m = m.clone();
            std::thread::spawn(move || m.write_slice(&[9u8; 4], GuestAddress(3 * PS as u64)))
        };
        let mut faults = Vec::new();
        t.wait_faults(Duration::from_secs(10), &mut faults).unwrap();
        assert_eq!(faults[0].addr, r.start + 3 * PS);
        assert!(faults[0].write);
        t.fill_zero(HostRange::new(faults[0].addr, PS)).unwrap();
        writer.join().unwrap().unwrap();
        let mut b = [0u8; 8];
        m.read_slice(&mut b, GuestAddress(3 * PS as u64)).unwrap();
        assert_eq!(b, [9, 9, 9, 9, 0, 0, 0, 0]);
    }

    #[test]
    fn fills_outside_registered_memory_or_of_the_wrong_length_are_refused() {
        let (m, r) = mem(8);
        let (_other, o) = mem(8);
        let t = MissingTracker::new().unwrap();
        t.register_memory(&m).unwrap();
        assert!(matches!(
            t.fill(o, &vec![0; o.len]),
            Err(MissingError::NotRegistered { .. })
        ));
        assert!(matches!(
            t.fill_zero(HostRange::new(r.start + 4 * PS, 8 * PS)),
            Err(MissingError::NotRegistered { .. })
        ));
        assert!(matches!(
            t.fill(HostRange::new(r.start, PS), &[0; 10]),
            Err(MissingError::LengthMismatch { .. })
        ));
        assert!(matches!(
            t.fill(HostRange::new(r.start + 1, PS), &[0; PS]),
            Err(MissingError::NotAligned { .. })
        ));
        assert_eq!(t.read_faults(&mut Vec::new()).unwrap(), 0);
    }

    #[test]
    fn memory_registered_elsewhere_is_busy() {
        let (m, _) = mem(8);
        let a = MissingTracker::new().unwrap();
        let b = MissingTracker::new().unwrap();
        a.register_memory(&m).unwrap();
        assert!(matches!(
            b.register_memory(&m),
            Err(MissingError::RegisteredElsewhere { .. })
        ));
        assert!(b.registered().is_empty());
    }

    fn thp_enabled() -> bool {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| !s.contains("[never]"))
    }

    fn huge_bytes(r: HostRange) -> usize {
        uffd_sys::pagemap::huge_regions(r.start, r.len)
            .iter()
            .map(|(a, b)| b - a)
            .sum()
    }

    #[test]
    fn a_huge_block_moves_in_whole_and_wakes_its_waiter_and_a_filled_destination_is_refused() {
        const HUGE: usize = HUGE_BLOCK;
        // Four huge pages of room so that three aligned ones lie inside.
        let (m, r) = mem(4 * HUGE / PS);
        advise(r.start, r.len, Advice::HugePage).unwrap();
        let t = Arc::new(MissingTracker::new().unwrap());
        t.register_memory(&m).unwrap();
        let a = HostRange::new(r.start.next_multiple_of(HUGE), HUGE);
        let (b, c) = (
            HostRange::new(a.end(), HUGE),
            HostRange::new(a.end() + HUGE, HUGE),
        );
        assert!(c.end() <= r.end());
        let has_move = Userfaultfd::probe()
            .unwrap()
            .available
            .contains(UFFD_FEATURE_MOVE);
        assert_eq!(t.can_move(a), has_move);
        let mut blk = HugeBlock::new().unwrap();
        assert_eq!(blk.range().start % HUGE, 0);
        if !has_move {
            assert!(matches!(
                t.move_in(a, &mut blk),
                Err(MissingError::MoveUnsupported { .. })
            ));
            return;
        }
        let pattern = |k: u8| -> Vec<u8> { (0..HUGE).map(|i| (i / PS) as u8 ^ k).collect() };
        let guest = |at: HostRange| -> Vec<u8> {
            let mut v = vec![0u8; at.len];
            m.read_slice(&mut v, GuestAddress((at.start - r.start) as u64))
                .unwrap();
            v
        };

        // A whole block: its bytes arrive, as one huge page, and the staging block is empty.
        blk.as_mut_slice().copy_from_slice(&pattern(1));
        if thp_enabled() {
            assert!(blk.is_huge(), "the staging block is not a huge page");
        }
        t.move_in(a, &mut blk).unwrap();
        if thp_enabled() {
            assert_eq!(huge_bytes(a), HUGE, "the moved block is not a huge page");
        }
        assert!(blk.as_mut_slice().iter().all(|&x| x == 0));
        assert!(guest(a) == pattern(1), "moved bytes differ");

        // A reader blocked on a missing page is woken by the move that brings it.
        let reader = {
            let m = m.clone();
            let at = (b.start - r.start + 7 * PS + 3) as u64;
            std::thread::spawn(move || {
                let mut x = [0u8; 1];
                m.read_slice(&mut x, GuestAddress(at)).unwrap();
                x[0]
            })
        };
        let mut faults = Vec::new();
        t.wait_faults(Duration::from_secs(10), &mut faults).unwrap();
        assert_eq!(faults[0].addr, b.start + 7 * PS);
        blk.as_mut_slice().copy_from_slice(&pattern(2));
        t.move_in(b, &mut blk).unwrap();
        assert_eq!(reader.join().unwrap(), 7 ^ 2);

        // A destination with one page there already: a typed error, nothing overwritten, and a
        // fill from the block completes it.
        t.fill(HostRange::new(c.start + 5 * PS, PS), &[0xee; PS])
            .unwrap();
        blk.as_mut_slice().copy_from_slice(&pattern(3));
        match t.move_in(c, &mut blk) {
            Err(MissingError::DestinationNotMissing { range, moved }) => {
                assert_eq!(range, c);
                assert!(moved <= 5 * PS, "moved {moved} bytes past the filled page");
            }
            other => panic!("{other:?}"),
        }
        t.fill(c, blk.as_mut_slice()).unwrap();
        let mut want = pattern(3);
        want[5 * PS..6 * PS].fill(0xee);
        assert!(
            guest(c) == want,
            "a partly filled block holds the wrong bytes"
        );

        // Not a whole aligned block.
        assert!(matches!(
            t.move_in(HostRange::new(a.start + PS, HUGE), &mut blk),
            Err(MissingError::MoveUnsupported { .. })
        ));
    }

    #[test]
    fn filled_memory_collapses_into_a_huge_page_once_unregistered() {
        const HUGE: usize = 2 << 20;
        // Two huge pages of room so that one aligned huge page lies inside.
        let (m, r) = mem(2 * HUGE / PS);
        let aligned = HostRange::new(r.start.next_multiple_of(HUGE), HUGE);
        if aligned.end() > r.end() {
            return;
        }
        // SAFETY: MADV_HUGEPAGE only changes how our own fresh mapping is backed.
        let rc = unsafe { libc::madvise(r.start as *mut _, r.len, libc::MADV_HUGEPAGE) };
        assert_eq!(rc, 0);
        let t = MissingTracker::new().unwrap();
        t.register_memory(&m).unwrap();
        let data: Vec<u8> = (0..HUGE).map(|i| (i / PS) as u8).collect();
        t.fill(aligned, &data).unwrap();
        t.unregister_all().unwrap();
        match t.collapse_huge(aligned) {
            Ok(()) => {
                let q = uffd_sys::pagemap::ScanQuery {
                    required: uffd_sys::PAGE_IS_HUGE | uffd_sys::PAGE_IS_PRESENT,
                    return_mask: uffd_sys::PAGE_IS_HUGE,
                    ..Default::default()
                };
                if let Ok(huge) = uffd_sys::pagemap::scan(aligned.start, aligned.len, q) {
                    let bytes: usize = huge.iter().map(|r| r.len()).sum();
                    assert_eq!(bytes, HUGE, "not a huge page after the collapse");
                }
            }
            // No THP on this host: nothing to check.
            Err(MissingError::Collapse { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => panic!("{e}"),
        }
        let off = (aligned.start - r.start) as u64;
        let mut back = vec![0u8; HUGE];
        m.read_slice(&mut back, GuestAddress(off)).unwrap();
        assert!(back == data, "collapse changed the contents");
        assert!(matches!(
            t.collapse_huge(HostRange::new(0x1000_0000_0000 & !(HUGE - 1), HUGE)),
            Err(MissingError::NotRegistered { .. })
        ));
    }
}
