//! Direct I/O (`O_DIRECT`) shared by the writer and the reader: aligned buffers, turning direct
//! I/O on for a file, and reads and writes that fall back to the page cache where the file
//! system refuses direct I/O (`EINVAL`: some tmpfs and network file systems).
//!
//! Why direct I/O at all (figures in `docs/PERFORMANCE.md`): a save through the page cache spends
//! a core on the kernel's copy into page-cache pages and fills the cache with a file nobody reads
//! soon; a restore reads a cold file faster with aligned direct reads than through readahead, and
//! leaves the page cache to the guests.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

use nix::errno::Errno;
use nix::fcntl::{fcntl, posix_fadvise, FcntlArg, OFlag, PosixFadviseAdvice};

/// Alignment of direct I/O buffers, file offsets and lengths (covers 512 and 4096-byte sectors).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// A buffer of `cap` bytes starting at a [`DIRECT_ALIGN`]-aligned address (for `O_DIRECT`
/// reads and writes), of which the first `len` are in use.
#[derive(Default)]
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    cap: usize,
    pub(crate) len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(cap: usize) -> Self {
        let raw = vec![0u8; cap + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf {
            raw,
            start,
            cap,
            len: 0,
        }
    }
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }
    /// The whole aligned buffer.
    pub(crate) fn all_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.cap]
    }
    /// The bytes in use.
    pub(crate) fn data(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
    /// The bytes after those in use.
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        &mut self.raw[self.start + self.len..self.start + self.cap]
    }
}

/// Turn on `O_DIRECT` for `file`; false if its file system refuses (`EINVAL`). Set after the
/// file exists rather than at `open`: an `O_CREAT | O_EXCL` open refused for `O_DIRECT` has
/// already created the file, and a second exclusive open would then fail.
pub(crate) fn enable_direct(file: &File) -> io::Result<bool> {
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL)?);
    match fcntl(file, FcntlArg::F_SETFL(flags | OFlag::O_DIRECT)) {
        Ok(_) => Ok(true),
        Err(Errno::EINVAL) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// `write_all` for a file opened with `O_DIRECT`, falling back to buffered writes if the file
/// system refuses direct I/O after all.
pub(crate) fn direct_write_all(file: &mut File, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match file.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                let flags = OFlag::from_bits_truncate(fcntl(&*file, FcntlArg::F_GETFL)?);
                if !flags.contains(OFlag::O_DIRECT) {
                    return Err(e);
                }
                fcntl(&*file, FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The file open as `f`, opened again with `O_DIRECT`; `None` where that is refused (no
/// `/proc`, a file system without direct I/O) or does not yield the same inode. Through
/// `/proc/self/fd`, which names the open inode, not the path it was opened by.
pub(crate) fn reopen_direct(f: &File) -> Option<File> {
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_DIRECT.bits())
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .ok()?;
    let (a, b) = (f.metadata().ok()?, d.metadata().ok()?);
    (a.dev() == b.dev() && a.ino() == b.ino()).then_some(d)
}

/// Positioned reads on a file (any number of threads at once): through `direct`, the same file
/// opened with `O_DIRECT`, when there is one, else through the page cache with readahead hints.
///
/// Direct reads fetch whole aligned blocks into an aligned bounce buffer and copy out: the
/// bounce copy costs ~0.1 s per GiB and keeps the file out of the page cache, which a host
/// restoring many VMs wants (cold-file read speeds in `docs/PERFORMANCE.md`). If the file
/// system refuses a direct read, reads go through `f` from then on.
pub(crate) struct Pread<'a> {
    f: &'a File,
    direct: Option<&'a File>,
    bounce: AlignedBuf,
}

impl<'a> Pread<'a> {
    pub(crate) fn new(f: &'a File, direct: Option<&'a File>) -> Self {
        Pread {
            f,
            direct,
            bounce: AlignedBuf::default(),
        }
    }

    /// Exactly `buf.len()` bytes at `pos`; a file that ends first gives `UnexpectedEof`.
    pub(crate) fn pread_exact(&mut self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        if let Some(d) = self.direct {
            if self.read_direct(d, buf, pos)? {
                return Ok(());
            }
            self.direct = None;
        }
        self.f.read_exact_at(buf, pos)
    }

    /// Hint that `len` bytes at `pos` will be read soon (best effort; only without direct I/O).
    pub(crate) fn prefetch(&mut self, pos: u64, len: u64) {
        if self.direct.is_none() {
            // Starts reading the range into the page cache in the background, so the disk
            // works ahead of the readers.
            let _ = posix_fadvise(
                self.f,
                pos as i64,
                len as i64,
                PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
    }

    /// Direct read of `buf.len()` bytes at `pos` from `d`; `Ok(false)` if the file system
    /// refused it.
    fn read_direct(&mut self, d: &File, buf: &mut [u8], pos: u64) -> io::Result<bool> {
        let a = pos & !(DIRECT_ALIGN as u64 - 1);
        let end = pos + buf.len() as u64;
        let span = (end.next_multiple_of(DIRECT_ALIGN as u64) - a) as usize;
        if self.bounce.cap() < span {
            self.bounce = AlignedBuf::new(span);
        }
        let dst = &mut self.bounce.all_mut()[..span];
        let need = (end - a) as usize;
        let mut got = 0;
        while got < need {
            match d.read_at(&mut dst[got..], a + got as u64) {
                // End of file: the file is shorter than what the caller expects.
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) && got == 0 => {
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        let from = (pos - a) as usize;
        buf.copy_from_slice(&dst[from..from + buf.len()]);
        Ok(true)
    }
}
