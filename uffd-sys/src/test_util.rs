//! Helpers shared by this crate's unit tests.

/// An anonymous private read/write mapping at a kernel-chosen address: `(start, len)`, unmapped
/// on drop.
pub(crate) struct Map(pub(crate) usize, pub(crate) usize);

impl Map {
    pub(crate) fn new(len: usize) -> Self {
        // SAFETY: fresh anonymous mapping at a kernel-chosen address; no existing memory touched.
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
        assert_ne!(p, libc::MAP_FAILED);
        Map(p as usize, len)
    }

    /// Write `v` to the first byte of 4 KiB page `page`.
    pub(crate) fn write(&self, page: usize, v: u8) {
        assert!(page * 4096 < self.1);
        // SAFETY: in bounds of our own mapping (checked above); volatile so the write really
        // happens.
        unsafe { std::ptr::write_volatile((self.0 + page * 4096) as *mut u8, v) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping, nothing references it any more.
        unsafe { libc::munmap(self.0 as *mut _, self.1) };
    }
}
