//! Helpers shared by this crate's unit tests.

use crate::host::PageBuf;

/// An anonymous private read/write mapping at a kernel-chosen address: `(start, len)`, unmapped
/// on drop (it is a [`PageBuf`]).
pub(crate) struct Map(pub(crate) usize, pub(crate) usize, PageBuf);

impl Map {
    pub(crate) fn new(len: usize) -> Self {
        let b = PageBuf::new(len).expect("anonymous mapping");
        Map(b.as_ptr() as usize, len, b)
    }

    /// Write `v` to the first byte of 4 KiB page `page`.
    pub(crate) fn write(&self, page: usize, v: u8) {
        assert!(page * 4096 < self.2.len());
        // SAFETY: in bounds of our own mapping (checked above); volatile so the write really
        // happens.
        unsafe { std::ptr::write_volatile((self.0 + page * 4096) as *mut u8, v) }
    }
}
