//! Where the reader's bytes come from: positioned reads on a file (any number of threads) or
//! seek + read on any reader (one thread).

use std::io::{Read, Seek, SeekFrom};

use super::{read_error, unreadable};
use crate::direct_io::Pread;
use crate::format::FormatError;

/// Something to read exact byte ranges from.
pub(super) trait Source {
    fn read_exact_at(&mut self, buf: &mut [u8], pos: u64) -> Result<(), FormatError>;
    /// Hint that `len` bytes at `pos` will be read soon (best effort).
    fn prefetch(&mut self, _pos: u64, _len: u64) {}
}

impl Source for Pread<'_> {
    fn read_exact_at(&mut self, buf: &mut [u8], pos: u64) -> Result<(), FormatError> {
        self.pread_exact(buf, pos)
            .map_err(|e| read_error(e, pos, buf.len()))
    }
    fn prefetch(&mut self, pos: u64, len: u64) {
        Pread::prefetch(self, pos, len);
    }
}

/// Seek + read on any reader, skipping the seek when already there (keeps a `BufReader`'s
/// buffer across back-to-back reads).
pub(super) struct Seq<'a, R> {
    pub(super) r: &'a mut R,
    pub(super) cur: &'a mut Option<u64>,
}

impl<R: Read + Seek> Source for Seq<'_, R> {
    fn read_exact_at(&mut self, buf: &mut [u8], pos: u64) -> Result<(), FormatError> {
        if *self.cur != Some(pos) {
            *self.cur = None;
            self.r.seek(SeekFrom::Start(pos)).map_err(unreadable)?;
        }
        *self.cur = None;
        self.r
            .read_exact(buf)
            .map_err(|e| read_error(e, pos, buf.len()))?;
        *self.cur = Some(pos + buf.len() as u64);
        Ok(())
    }
}
