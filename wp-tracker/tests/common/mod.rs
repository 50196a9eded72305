//! Helpers shared by the integration tests: real mappings and bounded waits.
#![allow(dead_code)]

use std::os::fd::AsRawFd;
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

    /// A second shared mapping of `len` bytes of `file` from offset 0.
    pub fn of_file(file: &std::fs::File, len: usize) -> std::io::Result<Mapping> {
        let raw = Self::mmap(len, libc::MAP_SHARED, file.as_raw_fd())?;
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

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const HUGEPAGES_DIR: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";
/// Lock file held while a test owns the huge page pool. ram-saver's tests use the same path:
/// tests of several crates (and engineers running them at once) change vm.nr_hugepages.
const POOL_LOCK: &str = "snapctl-test-hugepages.lock";

fn read_count(path: &str) -> usize {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    s.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}: {s:?}"))
}

/// The 2 MiB huge page pool, sized so that exactly `available` pages are free for this test
/// (free and not reserved by other mappings), held exclusively across processes; the old
/// vm.nr_hugepages comes back on drop. Panics with the reason when it cannot be had: tests
/// that need huge pages fail rather than pass without them.
#[derive(Debug)]
pub struct HugePagePool {
    old: usize,
    _lock: std::fs::File,
}

impl HugePagePool {
    pub fn reserve(available: usize) -> HugePagePool {
        let path = std::env::temp_dir().join(POOL_LOCK);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // SAFETY: flock on our own open fd; blocks until no other test holds the pool.
        let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            r,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        let old = read_count(NR_HUGEPAGES);
        let pool = HugePagePool { old, _lock: lock };
        let free = read_count(&format!("{HUGEPAGES_DIR}/free_hugepages"));
        let resv = read_count(&format!("{HUGEPAGES_DIR}/resv_hugepages"));
        let want = old.saturating_sub(free - resv) + available;
        if let Err(e) = std::fs::write(NR_HUGEPAGES, want.to_string()) {
            panic!("cannot set vm.nr_hugepages to {want} (needs root): {e}");
        }
        let free = read_count(&format!("{HUGEPAGES_DIR}/free_hugepages"));
        let resv = read_count(&format!("{HUGEPAGES_DIR}/resv_hugepages"));
        assert_eq!(
            free - resv,
            available,
            "vm.nr_hugepages set to {want}, but {free} huge pages are free and {resv} reserved, \
             not {available} available (memory too fragmented?)"
        );
        pool
    }

    /// Huge pages free now (reserved ones included).
    pub fn free() -> usize {
        read_count(&format!("{HUGEPAGES_DIR}/free_hugepages"))
    }
}

impl Drop for HugePagePool {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.old.to_string());
    }
}

/// Guest memory of `len` bytes at GPA 0 on a new memfd (`hugetlb`: on hugetlbfs), mapped
/// shared the way vmm-core maps it, and the memfd.
pub fn file_memory(len: usize, hugetlb: bool) -> (vm_memory::GuestMemoryMmap, std::fs::File) {
    use std::os::fd::FromRawFd;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};
    let flags = libc::MFD_CLOEXEC | if hugetlb { libc::MFD_HUGETLB } else { 0 };
    // SAFETY: the name is a NUL-terminated literal.
    let fd = unsafe { libc::memfd_create(c"wp-tracker-test".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len as u64).expect("ftruncate memfd");
    let region = MmapRegionBuilder::new(len)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
        .with_file_offset(FileOffset::new(file.try_clone().unwrap(), 0))
        .with_hugetlbfs(hugetlb)
        .build()
        .expect("mmap memfd");
    let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
    (
        vm_memory::GuestMemoryMmap::from_regions(vec![region]).unwrap(),
        file,
    )
}

/// Bytes the file system has allocated for `file` (shmem, hugetlbfs: pages in its page cache).
pub fn allocated_bytes(file: &std::fs::File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().unwrap().blocks() * 512
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
