//! The few other host calls the VMM and the save engine need, next to the userfaultfd ABI so that
//! every `unsafe` system call has one home: memory advice (`madvise` that changes how a range is
//! backed, never what it holds), the calling thread's priority, buffers of their own mapping,
//! returning freed heap to the kernel, and the page size.

use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// How a range should be backed; none of these changes the range's contents or its mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// MADV_POPULATE_READ: fault every page in for reading.
    PopulateRead,
    /// MADV_COLLAPSE (Linux 6.1+): back the range with transparent huge pages again.
    Collapse,
    /// MADV_HUGEPAGE: allow (and prefer) transparent huge pages.
    HugePage,
    /// MADV_NOHUGEPAGE: never use transparent huge pages.
    NoHugePage,
}

/// One `madvise(start, len, advice)` call (no retry). On a range that is not mapped the kernel
/// just fails (ENOMEM).
pub fn advise(start: usize, len: usize, advice: Advice) -> io::Result<()> {
    let advice = match advice {
        Advice::PopulateRead => libc::MADV_POPULATE_READ,
        Advice::Collapse => libc::MADV_COLLAPSE,
        Advice::HugePage => libc::MADV_HUGEPAGE,
        Advice::NoHugePage => libc::MADV_NOHUGEPAGE,
    };
    // SAFETY: every advice above only changes how the range is backed (fault pages in for reading,
    // collapse them into huge pages, set or clear the huge-page preference), never its contents or
    // its mapping, so no memory Rust can see changes; an unmapped range makes madvise fail.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, len, advice) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the scheduling priority (nice value, −20 highest … 19 lowest) of the calling thread
/// only (on Linux the nice value is per thread). Raising it (a negative value) needs
/// CAP_SYS_NICE or a matching RLIMIT_NICE; the error is returned and the caller decides whether
/// it matters.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority(PRIO_PROCESS, tid, n) changes the nice value of thread `tid` (the
    // calling thread) and touches no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's nice value (field 19 of `/proc/thread-self/stat`).
pub fn thread_nice() -> io::Result<i32> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..))
        .ok_or_else(|| io::Error::other("unexpected /proc/thread-self/stat"))?;
    rest.split_whitespace()
        .nth(16)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("unexpected /proc/thread-self/stat"))
}

/// Runs the calling thread under the real-time FIFO policy at `priority` (1 lowest … 99): it
/// then preempts every ordinary thread the moment it wakes. Meant for a thread that sleeps until
/// a short, latency-critical job arrives (a vCPU blocked on a page fault): a FIFO thread that
/// spins holds its CPU, up to the kernel's real-time throttling. Needs CAP_SYS_NICE (or
/// RLIMIT_RTPRIO); the error is returned and the caller decides whether it matters.
pub fn set_thread_fifo(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: sched_setscheduler(0, …) changes the policy of the calling thread only and reads
    // `param`, which lives across the call.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes every thread allocate from the process's main heap (glibc `M_ARENA_MAX` = 1); call it
/// first thing, before other threads exist. A long-running VMM starts saver threads for each save,
/// and glibc gives such threads heaps of their own (arenas) whose free top the allocator keeps for
/// good: [`trim_heap`] returns the main heap's top only. With the main heap alone, what a save frees
/// goes back to the kernel when it ends (`docs/PERFORMANCE.md`, "Memory between saves"). False if
/// the allocator refused the setting.
pub fn single_heap_arena() -> bool {
    // SAFETY: mallopt only changes an allocator parameter; no allocation moves or changes.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
}

/// Gives memory that the allocator holds free back to the kernel (glibc `malloc_trim`). A save
/// allocates tens of MiB of staging and I/O buffers on threads that come and go, and glibc keeps
/// freed chunks in those threads' arenas; trimming after each save keeps a long-running VMM's RSS
/// where it was. Costs milliseconds; harmless when there is nothing to return.
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory owned by the allocator; no live allocation
    // moves or changes.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Zero-filled, page-aligned anonymous memory in a mapping of its own, unmapped when dropped.
/// Unlike heap memory it goes back to the kernel the moment it is dropped, whatever the allocator
/// would keep: a save's staging (up to guest RAM) must not stay in a long-running VMM's RSS.
/// Pages are mapped on first touch.
pub struct PageBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a PageBuf owns its mapping exclusively (like a `Box<[u8]>`); nothing else refers to it.
unsafe impl Send for PageBuf {}
// SAFETY: shared access only reads through `&[u8]`.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    /// A new mapping of `len` bytes (`len` > 0). Fails (ENOMEM) when the host cannot map it.
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a new private anonymous mapping at an address the kernel picks; it overlaps
        // nothing Rust owns.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        Ok(PageBuf { ptr, len })
    }
}

impl Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live readable mapping of `len` bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live writable mapping of `len` bytes owned exclusively by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length and no reference into it
        // outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

impl std::fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBuf({} bytes)", self.len)
    }
}

/// The host's base page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory side effects.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps > 0 {
        ps as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_of_this_thread() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Field 19 (nice), counted after the closing parenthesis of the command name.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn nice_changes_only_the_calling_thread() {
        let main_before = nice_of_this_thread();
        let seen = std::thread::spawn(|| {
            set_thread_nice(7).unwrap();
            assert_eq!(thread_nice().unwrap(), 7);
            nice_of_this_thread()
        })
        .join()
        .unwrap();
        assert_eq!(seen, 7);
        assert_eq!(nice_of_this_thread(), main_before);
    }

    #[test]
    fn advice_on_an_unmapped_range_fails_and_on_a_mapping_succeeds() {
        let v = vec![1u8; 4 << 20];
        let ps = page_size();
        let start = (v.as_ptr() as usize).next_multiple_of(ps);
        advise(start, ps, Advice::PopulateRead).unwrap();
        assert!(advise(ps, ps, Advice::PopulateRead).is_err());
        trim_heap();
        assert_eq!(v[0], 1);
    }
}
