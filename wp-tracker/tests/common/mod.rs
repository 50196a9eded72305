//! Helpers shared by the integration tests: real mappings and bounded waits.
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Duration;

use wp_tracker::HostRange;

/// Base page size.
pub const PAGE: usize = 4096;
/// Transparent / hugetlb huge page size on x86-64.
pub const HUGE: usize = 2 << 20;

/// An owned mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    pub addr: usize,
    pub len: usize,
    /// The whole mmap (may be larger than `addr..addr+len` when aligned).
    raw: (usize, usize),
}

impl Mapping {
    fn mmap(len: usize, flags: libc::c_int, fd: libc::c_int) -> std::io::Result<(usize, usize)> {
        // SAFETY: new mapping at a kernel-chosen address; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok((p as usize, len))
    }

    /// Anonymous private memory.
    pub fn anon(len: usize) -> Mapping {
        let raw = Self::mmap(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1).expect("mmap");
        Mapping {
            addr: raw.0,
            len,
            raw,
        }
    }

    /// Anonymous private memory aligned to 2 MiB with MADV_HUGEPAGE (THP).
    pub fn anon_thp(len: usize) -> Mapping {
        let raw =
            Self::mmap(len + HUGE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1).expect("mmap");
        let addr = (raw.0 + HUGE - 1) & !(HUGE - 1);
        // SAFETY: advice on our own mapping; no contents change.
        let r = unsafe { libc::madvise(addr as *mut _, len, libc::MADV_HUGEPAGE) };
        assert_eq!(r, 0, "MADV_HUGEPAGE: {}", std::io::Error::last_os_error());
        Mapping { addr, len, raw }
    }

    /// Shared memory from a memfd (shmem).
    pub fn memfd(len: usize, hugetlb: bool) -> std::io::Result<Mapping> {
        let flags = libc::MFD_CLOEXEC | if hugetlb { libc::MFD_HUGETLB } else { 0 };
        // SAFETY: the name is a NUL-terminated literal.
        let fd = unsafe { libc::memfd_create(c"wp-tracker-test".as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is ours; closed below after mapping (the mapping keeps the file alive).
        let res = if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Self::mmap(len, libc::MAP_SHARED, fd)
        };
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
        let raw = res?;
        Ok(Mapping {
            addr: raw.0,
            len,
            raw,
        })
    }

    /// hugetlbfs-backed anonymous memory (MAP_HUGETLB), 2 MiB pages.
    pub fn hugetlb(len: usize) -> std::io::Result<Mapping> {
        let raw = Self::mmap(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
            -1,
        )?;
        Ok(Mapping {
            addr: raw.0,
            len,
            raw,
        })
    }

    pub fn range(&self) -> HostRange {
        HostRange::new(self.addr, self.len)
    }

    pub fn page(&self, i: usize) -> usize {
        assert!(i * PAGE < self.len);
        self.addr + i * PAGE
    }

    /// Write one byte (volatile, so it really happens).
    pub fn write(&self, off: usize, v: u8) {
        assert!(off < self.len);
        // SAFETY: in bounds of our own writable mapping.
        unsafe { std::ptr::write_volatile((self.addr + off) as *mut u8, v) }
    }

    /// Read one byte.
    pub fn read(&self, off: usize) -> u8 {
        assert!(off < self.len);
        // SAFETY: in bounds of our own readable mapping.
        unsafe { std::ptr::read_volatile((self.addr + off) as *const u8) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // On a failed assertion, writer threads woken by the tracker's drop may still be about
        // to write: leak the mapping so they finish instead of crashing the test binary (which
        // would hide the assertion message).
        if std::thread::panicking() {
            return;
        }
        // SAFETY: our own mapping; nothing references it any more.
        unsafe { libc::munmap(self.raw.0 as *mut _, self.raw.1) };
    }
}

/// Write one byte at an absolute address from a thread that may block (used across threads).
pub fn write_at(addr: usize, v: u8) {
    // SAFETY: callers pass addresses inside mappings that outlive the write.
    unsafe { std::ptr::write_volatile(addr as *mut u8, v) }
}

/// Run `f` on a new thread; panic if it does not finish within `timeout` (instead of hanging).
pub fn run_with_timeout<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(timeout) {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within {timeout:?} (blocked?)"),
    }
}

/// Make sure at least `pages` 2 MiB huge pages are free, raising vm.nr_hugepages if needed.
/// Returns the previous nr_hugepages to restore, or an explanation why huge pages are unavailable.
pub fn reserve_huge_pages(pages: usize) -> Result<Option<usize>, String> {
    let read = |p: &str| -> Result<usize, String> {
        std::fs::read_to_string(p)
            .map_err(|e| format!("{p}: {e}"))?
            .trim()
            .parse()
            .map_err(|e| format!("{p}: {e}"))
    };
    let base = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let free = read(&format!("{base}/free_hugepages"))?;
    if free >= pages {
        return Ok(None);
    }
    let total = read("/proc/sys/vm/nr_hugepages")?;
    let want = total + pages - free;
    std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string())
        .map_err(|e| format!("cannot raise vm.nr_hugepages to {want} (need root): {e}"))?;
    let free = read(&format!("{base}/free_hugepages"))?;
    if free < pages {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", total.to_string());
        return Err(format!(
            "asked for {want} huge pages but only {free} are free (memory too fragmented?)"
        ));
    }
    Ok(Some(total))
}

/// Restore vm.nr_hugepages after [`reserve_huge_pages`].
pub fn restore_huge_pages(prev: Option<usize>) {
    if let Some(n) = prev {
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", n.to_string());
    }
}

/// A thread performing one write, with a flag set once the write completed.
#[derive(Debug)]
pub struct Writer {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Writer {
    /// Start a thread writing `v` at `addr`.
    pub fn spawn(addr: usize, v: u8) -> Writer {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let handle = std::thread::spawn(move || {
            write_at(addr, v);
            d.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Writer { done, handle }
    }
    /// True once the write completed.
    pub fn is_done(&self) -> bool {
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Assert the writer stays blocked for `dur`.
    pub fn assert_blocked_for(&self, dur: Duration) {
        std::thread::sleep(dur);
        assert!(
            !self.is_done(),
            "writer was not blocked by write protection"
        );
    }
    /// Wait (20 s max) for the write to complete.
    pub fn finish(self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !self.is_done() {
            assert!(
                std::time::Instant::now() < deadline,
                "writer still blocked after 20 s"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        self.handle.join().expect("writer thread");
    }
}

/// Wait (20 s max) for exactly one write-protect fault and check it names the page at `page`
/// (of size `page_size`).
pub fn expect_fault(
    t: &wp_tracker::WpTracker,
    page: usize,
    page_size: usize,
) -> wp_tracker::WpFault {
    let mut out = Vec::new();
    let n = t
        .wait_faults(Duration::from_secs(20), &mut out)
        .expect("wait_faults");
    assert_eq!(n, 1, "expected exactly one fault, got {out:x?}");
    let f = out[0];
    assert!(f.wp, "not a write-protect fault: {f:x?}");
    assert_eq!(
        f.addr & !(page_size - 1),
        page,
        "fault names the wrong page: {f:x?}"
    );
    f
}
