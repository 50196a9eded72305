//! Reading snapshot files: open (footer and trailer totals first, every length bounded before
//! it sizes a buffer), iterate records, verify, load.
//!
//! [`SnapshotReader::verify`] and [`SnapshotReader::load_into`] work on all cores. The trailer
//! index splits the records into *units* of consecutive records (a few MiB of file each);
//! workers claim units in file order and read each with positioned reads (`pread`) into a
//! reusable window, checking every record header, bound, index entry and checksum on the way.
//! The index is not trusted for anything but scheduling: a worker starts a unit at its first
//! entry's offset, follows the chain of record lengths from there, and checks that the unit ends
//! exactly where the next one starts (or at the trailer), so the units together prove the same
//! back-to-back chain a sequential read would. Errors are reported for the lowest record index
//! (every unit below a failing one was claimed before it and is finished), so the error is the
//! one a sequential read would have stopped at. Readers built with
//! [`SnapshotReader::from_reader`] (no file to `pread`) run the same code on the calling thread.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::format::{
    decode_footer, u32_at, u64_at, Compression, FormatError, IndexEntry, RecordHeader, RecordKind,
    SnapshotHeader, Totals, Trailer, CODEC_RAW, FOOTER_LEN, FORMAT_VERSION, INDEX_ENTRY_LEN, MAGIC,
    MAX_HEADER_LEN, MAX_MACHINE_STATE_LEN, MAX_RECORD_RAW, RECORD_HEADER_LEN, STATE_TAG,
    TRAILER_FIXED_LEN, TRAILER_HEAD_LEN,
};
use crate::pagemap::Pagemap;
use crate::writer::{is_zero, AlignedBuf, DIRECT_ALIGN};

/// Bytes read ahead per positioned read when streaming records (fits in L2 with room to spare).
const WINDOW: usize = 1 << 20;
/// Target file bytes of one unit of work.
const UNIT_BYTES: u64 = 4 << 20;
/// How many units ahead of the one just claimed the reader asks the kernel to read.
const PREFETCH_UNITS: usize = 6;
/// Most records in one unit.
const UNIT_RECORDS: usize = 4096;
/// Pages compared per read when clearing a zero run in memory that may hold data.
const ZERO_CHUNK_PAGES: u64 = 64;

/// One RAM record as read from the file, payload decompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position of the record in the file (0-based).
    pub index: u64,
    /// File offset of the record header.
    pub offset: u64,
    /// Zero run or data.
    pub kind: RecordKind,
    /// First guest page number.
    pub first_page: u64,
    /// Number of pages.
    pub page_count: u32,
    /// Page contents (`page_count * page_size` bytes); empty for zero runs.
    pub data: Vec<u8>,
}

/// Progress of [`SnapshotReader::verify`] and [`SnapshotReader::load_into`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ReadProgress {
    /// Records checked so far.
    pub records: u64,
    /// Records in the file.
    pub total_records: u64,
    /// Pages checked so far.
    pub pages: u64,
    /// Pages in the file.
    pub total_pages: u64,
}

/// What `verify` proved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Totals recomputed from the records (equal to the trailer's).
    pub totals: Totals,
    /// Guest pages in the header's layout (every one covered exactly once).
    pub guest_pages: u64,
    /// File size in bytes.
    pub file_bytes: u64,
    /// Machine state blob size in bytes.
    pub machine_state_bytes: u64,
}

/// A snapshot file opened for reading. Opening checks magic, version, footer, trailer (and that
/// its totals agree with its index), header and machine state; records are checked as they are
/// read.
#[derive(Debug)]
pub struct SnapshotReader<R> {
    r: R,
    /// Position of `r` when known (after our own read), to skip needless seeks.
    cur: Option<u64>,
    /// The same file for positioned reads from worker threads (files opened by path).
    file: Option<File>,
    /// The same file opened with `O_DIRECT` for the bulk reads of `verify` and `load_into`,
    /// where the file system allows it.
    direct: Option<File>,
    file_len: u64,
    header: SnapshotHeader,
    machine_state: Vec<u8>,
    records_start: u64,
    trailer_offset: u64,
    trailer: Trailer,
}

fn unreadable(e: io::Error) -> FormatError {
    FormatError::Unreadable(e)
}

fn corrupt(what: impl Into<String>, record: Option<u64>, offset: u64) -> FormatError {
    FormatError::Corrupt {
        what: what.into(),
        record,
        offset,
    }
}

/// A read error at `pos`: running out of file means the file is incomplete.
fn read_error(e: io::Error, pos: u64, len: usize) -> FormatError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FormatError::Incomplete {
            reason: format!("file ends before offset {}", pos + len as u64),
        }
    } else {
        unreadable(e)
    }
}

/// Index entries read per chunk when reading the trailer.
const INDEX_CHUNK_ENTRIES: usize = 4096;

/// Read the trailer's index after its fixed part `head` (already decoded into `totals`, whose
/// record count was bounded), entry by entry in bounded chunks, then check the trailer crc.
/// Memory grows only with entries that were read and looked valid.
fn read_index(
    src: &mut dyn Source,
    head: &[u8; TRAILER_HEAD_LEN],
    totals: Totals,
    trailer_offset: u64,
) -> Result<Trailer, FormatError> {
    let n = totals.records as usize;
    let mut crc = crc32fast::Hasher::new();
    crc.update(head);
    let mut index = Vec::with_capacity(n.min(INDEX_CHUNK_ENTRIES));
    let mut buf = vec![0u8; n.min(INDEX_CHUNK_ENTRIES) * INDEX_ENTRY_LEN];
    let mut pos = trailer_offset + TRAILER_HEAD_LEN as u64;
    while index.len() < n {
        let k = (n - index.len()).min(INDEX_CHUNK_ENTRIES);
        let chunk = &mut buf[..k * INDEX_ENTRY_LEN];
        src.read_exact_at(chunk, pos)?;
        crc.update(chunk);
        for (j, e) in chunk.chunks_exact(INDEX_ENTRY_LEN).enumerate() {
            let at = pos + (j * INDEX_ENTRY_LEN) as u64;
            index.push(Trailer::decode_entry(e, index.len() as u64, at)?);
        }
        pos += chunk.len() as u64;
    }
    let mut c = [0u8; 4];
    src.read_exact_at(&mut c, pos)?;
    if crc.finalize() != u32::from_le_bytes(c) {
        return Err(corrupt("trailer: checksum mismatch", None, pos));
    }
    Ok(Trailer { totals, index })
}

/// Something to read exact byte ranges from.
trait Source {
    fn read_exact_at(&mut self, buf: &mut [u8], pos: u64) -> Result<(), FormatError>;
    /// Hint that `len` bytes at `pos` will be read soon (best effort).
    fn prefetch(&mut self, _pos: u64, _len: u64) {}
}

/// Positioned reads on a file (any number of threads at once): through `direct`, the same file
/// opened with `O_DIRECT`, when there is one, else through the page cache with readahead hints.
///
/// Direct reads fetch whole aligned blocks into an aligned bounce buffer and copy out. A cold
/// 1 GiB file read at 0.4 GB/s through the page cache with the default readahead (1.2–1.4 GB/s
/// with `POSIX_FADV_WILLNEED` ahead), 1.8 GB/s with direct reads (`dd iflag=direct`); the bounce
/// copy costs ~0.1 s per GiB and keeps the file out of the page cache, which a host restoring
/// many VMs wants. If the file system refuses a direct read, reads go through `f` from then on.
struct Pread<'a> {
    f: &'a File,
    direct: Option<&'a File>,
    bounce: AlignedBuf,
}

impl<'a> Pread<'a> {
    fn new(f: &'a File, direct: Option<&'a File>) -> Self {
        Pread {
            f,
            direct,
            bounce: AlignedBuf::default(),
        }
    }

    /// Direct read of `buf.len()` bytes at `pos` from `d`; `Ok(false)` if the file system
    /// refused it.
    fn read_direct(&mut self, d: &File, buf: &mut [u8], pos: u64) -> Result<bool, FormatError> {
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
                Ok(0) => {
                    let e = io::Error::from(io::ErrorKind::UnexpectedEof);
                    return Err(read_error(e, pos, buf.len()));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) && got == 0 => {
                    return Ok(false);
                }
                Err(e) => return Err(read_error(e, pos, buf.len())),
            }
        }
        let from = (pos - a) as usize;
        buf.copy_from_slice(&dst[from..from + buf.len()]);
        Ok(true)
    }
}

impl Source for Pread<'_> {
    fn read_exact_at(&mut self, buf: &mut [u8], pos: u64) -> Result<(), FormatError> {
        if let Some(d) = self.direct {
            if self.read_direct(d, buf, pos)? {
                return Ok(());
            }
            self.direct = None;
        }
        self.f
            .read_exact_at(buf, pos)
            .map_err(|e| read_error(e, pos, buf.len()))
    }
    fn prefetch(&mut self, pos: u64, len: u64) {
        if self.direct.is_none() {
            // Starts reading the range into the page cache in the background, so the disk
            // works ahead of the workers.
            let _ = posix_fadvise(
                self.f,
                pos as i64,
                len as i64,
                PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
    }
}

/// Seek + read on any reader, skipping the seek when already there (keeps a `BufReader`'s
/// buffer across back-to-back reads).
struct Seq<'a, R> {
    r: &'a mut R,
    cur: &'a mut Option<u64>,
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

impl SnapshotReader<BufReader<File>> {
    /// Open and check the snapshot file at `path`.
    ///
    /// The path is opened once; every later read goes to that same file, even if the path is
    /// replaced meanwhile (`save --force` to the same name, rsync): the worker handle is a
    /// duplicate of the open file, and the `O_DIRECT` handle reopens it through
    /// `/proc/self/fd`, which names the open inode, not the path.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FormatError> {
        let f = File::open(path.as_ref()).map_err(unreadable)?;
        // Without a second handle everything still works, on one thread.
        let file = f.try_clone().ok();
        let direct = reopen_direct(&f);
        let mut r = Self::check(BufReader::with_capacity(1 << 20, f), file)?;
        r.direct = direct;
        Ok(r)
    }
}

/// The file open as `f`, opened again with `O_DIRECT`; `None` where that is refused (no
/// `/proc`, a file system without direct I/O) or does not yield the same inode.
fn reopen_direct(f: &File) -> Option<File> {
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .ok()?;
    let (a, b) = (f.metadata().ok()?, d.metadata().ok()?);
    (a.dev() == b.dev() && a.ino() == b.ino()).then_some(d)
}

impl<R: Read + Seek> SnapshotReader<R> {
    /// Check a snapshot readable from `r` (any `Read + Seek`).
    pub fn from_reader(r: R) -> Result<Self, FormatError> {
        Self::check(r, None)
    }

    fn check(mut r: R, file: Option<File>) -> Result<Self, FormatError> {
        let file_len = r.seek(SeekFrom::End(0)).map_err(unreadable)?;
        let mut cur = None;
        let mut src = Seq {
            r: &mut r,
            cur: &mut cur,
        };
        // Magic and version first, so that a foreign file is named as such.
        let mut fixed = [0u8; 16];
        let n = (file_len.min(16)) as usize;
        src.read_exact_at(&mut fixed[..n], 0)?;
        if n < 8 {
            return if fixed[..n] == MAGIC[..n] {
                Err(FormatError::Incomplete {
                    reason: format!("file is only {file_len} bytes"),
                })
            } else {
                Err(FormatError::NotASnapshot)
            };
        }
        if fixed[..8] != MAGIC {
            return Err(FormatError::NotASnapshot);
        }
        if n < 16 {
            return Err(FormatError::Incomplete {
                reason: format!("file is only {file_len} bytes"),
            });
        }
        let version = u32_at(&fixed, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        // Footer and trailer next: a file that never finished is refused before anything else.
        if file_len < (16 + FOOTER_LEN + TRAILER_FIXED_LEN) as u64 {
            return Err(FormatError::Incomplete {
                reason: "no trailer".into(),
            });
        }
        let mut footer = [0u8; FOOTER_LEN];
        src.read_exact_at(&mut footer, file_len - FOOTER_LEN as u64)?;
        let (trailer_offset, trailer_len) =
            decode_footer(&footer).ok_or_else(|| FormatError::Incomplete {
                reason: "no valid end marker (truncated or unfinished save)".into(),
            })?;
        let footer_at = file_len - FOOTER_LEN as u64;
        if trailer_len < TRAILER_FIXED_LEN as u64
            || trailer_offset.checked_add(trailer_len) != Some(footer_at)
        {
            return Err(FormatError::Incomplete {
                reason: "footer does not point at a trailer ending before it".into(),
            });
        }
        // Only the trailer's fixed part now: its record count is bounded (further down, once
        // the header says how many guest pages there are) before anything is sized by it.
        let mut thead = [0u8; TRAILER_HEAD_LEN];
        src.read_exact_at(&mut thead, trailer_offset)?;
        let totals = Trailer::decode_head(&thead, trailer_len, trailer_offset)?;

        let header_len = u32_at(&fixed, 12);
        if !(56..=MAX_HEADER_LEN).contains(&header_len) || u64::from(header_len) > trailer_offset {
            return Err(corrupt("header: length out of range", None, 12));
        }
        let mut hbuf = vec![0u8; header_len as usize];
        src.read_exact_at(&mut hbuf, 0)?;
        let header = SnapshotHeader::decode(&hbuf)?;
        drop(hbuf);

        let st_at = u64::from(header_len);
        let mut st = [0u8; 16];
        if st_at + 16 > trailer_offset {
            return Err(corrupt("machine state: missing", None, st_at));
        }
        src.read_exact_at(&mut st, st_at)?;
        if st[0..4] != STATE_TAG {
            return Err(corrupt("machine state: bad tag", None, st_at));
        }
        let st_len = u64_at(&st, 4);
        if st_len > MAX_MACHINE_STATE_LEN || st_len > trailer_offset - st_at - 16 {
            return Err(corrupt(
                "machine state: length out of range",
                None,
                st_at + 4,
            ));
        }
        let mut machine_state = vec![0u8; st_len as usize];
        src.read_exact_at(&mut machine_state, st_at + 16)?;
        if crc32fast::hash(&machine_state) != u32_at(&st, 12) {
            return Err(corrupt(
                "machine state: checksum mismatch",
                None,
                st_at + 12,
            ));
        }
        let records_start = st_at + 16 + st_len;
        let room = trailer_offset - records_start;
        if totals.records > header.total_pages() || totals.records > room / RECORD_HEADER_LEN as u64
        {
            return Err(corrupt(
                "trailer: record count out of range",
                None,
                trailer_offset + 4 + 3 * 8,
            ));
        }
        let trailer = read_index(&mut src, &thead, totals, trailer_offset)?;
        let mut rd = SnapshotReader {
            r,
            cur,
            file,
            direct: None,
            file_len,
            header,
            machine_state,
            records_start,
            trailer_offset,
            trailer,
        };
        // The totals are what `load_into` returns and what tools print: they must follow from
        // the (checksummed) index, or the trailer is not a valid trailer.
        if rd.index_totals() != Some(rd.trailer.totals) {
            return Err(rd.diagnose_totals());
        }
        Ok(rd)
    }

    /// The totals the index implies: page counts by kind, records, raw bytes, and the stored
    /// bytes of records lying back to back from `records_start` to the trailer. `None` when
    /// they cannot be (records do not fit, overflow).
    fn index_totals(&self) -> Option<Totals> {
        let ps = u64::from(self.header.page_size);
        let mut t = Totals {
            records: self.trailer.index.len() as u64,
            ..Totals::default()
        };
        for e in &self.trailer.index {
            let n = u64::from(e.page_count);
            t.pages = t.pages.checked_add(n)?;
            match e.kind {
                RecordKind::ZeroRun => t.zero_pages += n,
                RecordKind::Data => t.data_pages += n,
            }
        }
        t.raw_bytes = t.data_pages.checked_mul(ps)?;
        let headers = t.records.checked_mul(RECORD_HEADER_LEN as u64)?;
        t.stored_bytes = (self.trailer_offset - self.records_start).checked_sub(headers)?;
        Some(t)
    }

    /// The trailer's totals disagree with its index: name the first record whose header
    /// disagrees with the index (reading record headers only), or else the totals.
    fn diagnose_totals(&mut self) -> FormatError {
        let chk = Checker::new(
            &self.header,
            &self.trailer,
            self.records_start,
            self.trailer_offset,
        );
        let mut cur = self.cur;
        let mut seq = Seq {
            r: &mut self.r,
            cur: &mut cur,
        };
        let mut pread;
        let src: &mut dyn Source = match &self.file {
            Some(f) => {
                pread = Pread::new(f, None);
                &mut pread
            }
            None => &mut seq,
        };
        let mut pos = self.records_start;
        let mut i = 0;
        while pos < self.trailer_offset {
            let r = chk.bounds(pos, i).and_then(|()| {
                let mut hb = [0u8; RECORD_HEADER_LEN];
                src.read_exact_at(&mut hb, pos)?;
                let h = chk.header(&hb, pos, i)?;
                chk.against_index(&h, pos, i)?;
                Ok(h)
            });
            match r {
                Ok(h) => pos += RECORD_HEADER_LEN as u64 + u64::from(h.stored_len),
                Err(e) => return e,
            }
            i += 1;
        }
        corrupt(
            "trailer totals disagree with records",
            None,
            self.trailer_offset,
        )
    }

    /// The header.
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// The machine state blob captured at the freeze instant (checksum already verified).
    pub fn machine_state(&self) -> &[u8] {
        &self.machine_state
    }

    /// File offset of the machine state blob (for naming where a bad one lies).
    pub fn machine_state_offset(&self) -> u64 {
        self.records_start - self.machine_state.len() as u64
    }

    /// The trailer: totals and the index of every record.
    pub fn trailer(&self) -> &Trailer {
        &self.trailer
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Iterate the records in file order, each checked (crc, bounds, index) and decompressed.
    /// The iterator ends after the first error.
    pub fn records(&mut self) -> Records<'_, R> {
        Records {
            pos: self.records_start,
            next: 0,
            failed: false,
            dec: None,
            rd: self,
        }
    }

    /// Read the raw record at `pos` (the `i`-th), check its header, bounds, index entry and crc.
    /// Leaves its stored payload in `payload`.
    fn read_raw(
        &mut self,
        pos: u64,
        i: u64,
        payload: &mut Vec<u8>,
    ) -> Result<RecordHeader, FormatError> {
        let chk = Checker::new(
            &self.header,
            &self.trailer,
            self.records_start,
            self.trailer_offset,
        );
        let mut src = Seq {
            r: &mut self.r,
            cur: &mut self.cur,
        };
        chk.bounds(pos, i)?;
        let mut hb = [0u8; RECORD_HEADER_LEN];
        src.read_exact_at(&mut hb, pos)?;
        let h = chk.header(&hb, pos, i)?;
        chk.against_index(&h, pos, i)?;
        payload.clear();
        payload.resize(h.stored_len as usize, 0);
        src.read_exact_at(payload, pos + RECORD_HEADER_LEN as u64)?;
        if h.compute_crc(payload) != h.crc {
            return Err(corrupt("record checksum mismatch", Some(i), pos));
        }
        Ok(h)
    }

    /// Check everything: structure, every checksum (decompressing), that every guest page
    /// appears exactly once, and that the trailer's index and totals agree with the records.
    /// Runs on all cores.
    pub fn verify(
        &mut self,
        progress: &mut dyn FnMut(&ReadProgress),
    ) -> Result<VerifyReport, FormatError> {
        // Coverage from the index; a record that disagrees with its entry is named by the
        // record pass, which runs up to (not beyond) the first coverage error.
        let mut cover = Coverage::new(&self.header);
        let mut cover_err = None;
        for (i, e) in self.trailer.index.iter().enumerate() {
            if let Err(err) = cover.mark(e.first_page, u64::from(e.page_count), Some(i as u64)) {
                cover_err = Some((i as u64, err));
                break;
            }
        }
        let totals = self.run(Mode::Verify, cover_err, progress)?;
        cover.complete()?;
        drop(cover);
        if totals != self.trailer.totals {
            return Err(corrupt(
                "trailer totals disagree with records",
                None,
                self.trailer_offset,
            ));
        }
        Ok(VerifyReport {
            totals,
            guest_pages: self.header.total_pages(),
            file_bytes: self.file_len,
            machine_state_bytes: self.machine_state.len() as u64,
        })
    }

    /// Restore RAM into `mem` eagerly, verifying checksums on the way, on all cores. The layout
    /// must match the header. Coverage is proved from the (checksummed) index, whose totals
    /// `open` checked, before memory is touched, and a record is written only to the pages its
    /// index entry names; incomplete files were already refused by `open`. Zero runs are
    /// skipped when the guest memory held no data to begin with (fresh memory stays
    /// unpopulated), else only pages that are not zero are cleared. On error the contents of
    /// `mem` are unspecified.
    pub fn load_into(
        &mut self,
        mem: &GuestMemoryMmap,
        progress: &mut dyn FnMut(&ReadProgress),
    ) -> Result<Totals, FormatError> {
        self.check_layout(mem)?;
        let mut cover = Coverage::new(&self.header);
        for e in &self.trailer.index {
            cover.mark(e.first_page, u64::from(e.page_count), None)?;
        }
        cover.complete()?;
        drop(cover);

        let pagemap = Pagemap::open();
        let mut fresh = true;
        for r in mem.iter() {
            let host =
                mem.get_host_address(r.start_addr())
                    .map_err(|e| FormatError::LayoutMismatch {
                        what: format!("region at {:#x}: {e}", r.start_addr().0),
                    })?;
            if pagemap.may_have_data(host as usize, r.len() as usize) {
                fresh = false;
                break;
            }
        }
        let mode = Mode::Load {
            mem,
            pagemap: &pagemap,
            fresh,
        };
        self.run(mode, None, progress)?;
        Ok(self.trailer.totals)
    }

    /// Check (and in load mode place) every record on all cores; returns the totals recomputed
    /// from the records. `pre` is an error already known for a record (coverage).
    fn run(
        &mut self,
        mode: Mode<'_>,
        pre: Option<(u64, FormatError)>,
        progress: &mut dyn FnMut(&ReadProgress),
    ) -> Result<Totals, FormatError> {
        let chk = Checker::new(
            &self.header,
            &self.trailer,
            self.records_start,
            self.trailer_offset,
        );
        let index = &self.trailer.index;
        if index.is_empty() && self.records_start != self.trailer_offset {
            return Err(corrupt(
                "record not listed in trailer index",
                Some(0),
                self.records_start,
            ));
        }
        let units = plan_units(index);
        let shared = Shared {
            next: AtomicUsize::new(0),
            stop_at: AtomicU64::new(pre.as_ref().map_or(u64::MAX, |p| p.0)),
            err: Mutex::new(pre),
            records: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            totals: Mutex::new(Totals::default()),
        };
        let mut prog = ReadProgress {
            total_records: self.trailer.totals.records,
            total_pages: self.trailer.totals.pages,
            ..Default::default()
        };
        let mut report = |shared: &Shared| {
            prog.records = shared.records.load(Ordering::Relaxed);
            prog.pages = shared.pages.load(Ordering::Relaxed);
            progress(&prog);
        };
        let threads = match &self.file {
            Some(_) => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(units.len()),
            None => 1,
        };
        let job = Job {
            chk: &chk,
            units: &units,
            shared: &shared,
            mode,
        };
        let direct = self.direct.as_ref();
        match &self.file {
            Some(f) if threads > 1 => std::thread::scope(|s| {
                for _ in 1..threads {
                    let job = &job;
                    s.spawn(move || job.work(&mut Pread::new(f, direct), &mut |_| {}));
                }
                job.work(&mut Pread::new(f, direct), &mut report);
            }),
            Some(f) => job.work(&mut Pread::new(f, direct), &mut report),
            None => {
                let mut src = Seq {
                    r: &mut self.r,
                    cur: &mut self.cur,
                };
                job.work(&mut src, &mut report);
            }
        }
        report(&shared);
        if let Some((_, e)) = shared.err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        Ok(shared
            .totals
            .into_inner()
            .unwrap_or_else(|p| p.into_inner()))
    }

    fn check_layout(&self, mem: &GuestMemoryMmap) -> Result<(), FormatError> {
        let ours: Vec<(u64, u64)> = self
            .header
            .regions
            .iter()
            .map(|r| (r.gpa, r.size))
            .collect();
        let theirs: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        if ours != theirs {
            return Err(FormatError::LayoutMismatch {
                what: format!("snapshot regions {ours:x?}, guest regions {theirs:x?}"),
            });
        }
        Ok(())
    }
}

/// The record checks that need only the file's layout and index.
#[derive(Debug)]
struct Checker<'a> {
    index: &'a [IndexEntry],
    records_start: u64,
    trailer_offset: u64,
    ps: u64,
    zstd: bool,
}

impl<'a> Checker<'a> {
    fn new(
        header: &SnapshotHeader,
        trailer: &'a Trailer,
        records_start: u64,
        trailer_offset: u64,
    ) -> Self {
        Checker {
            index: &trailer.index,
            records_start,
            trailer_offset,
            ps: u64::from(header.page_size),
            zstd: matches!(header.compression, Compression::Zstd { .. }),
        }
    }

    /// The `i`-th record may start at `pos`: it is listed and its header lies in the record area.
    fn bounds(&self, pos: u64, i: u64) -> Result<(), FormatError> {
        if i >= self.index.len() as u64 {
            return Err(corrupt("record not listed in trailer index", Some(i), pos));
        }
        if pos < self.records_start {
            return Err(corrupt(
                "record offset lies before the records",
                Some(i),
                pos,
            ));
        }
        if pos > self.trailer_offset || self.trailer_offset - pos < RECORD_HEADER_LEN as u64 {
            return Err(corrupt("record header runs into trailer", Some(i), pos));
        }
        Ok(())
    }

    /// Decode and check a record header read at `pos` (within bounds): fields, lengths, and that
    /// the payload ends before the trailer.
    fn header(
        &self,
        hb: &[u8; RECORD_HEADER_LEN],
        pos: u64,
        i: u64,
    ) -> Result<RecordHeader, FormatError> {
        let h =
            RecordHeader::decode(hb).ok_or_else(|| corrupt("bad record header", Some(i), pos))?;
        if u64::from(h.stored_len) > self.trailer_offset - pos - RECORD_HEADER_LEN as u64 {
            return Err(corrupt("record payload runs into trailer", Some(i), pos));
        }
        let raw = u64::from(h.page_count) * self.ps;
        let stored = u64::from(h.stored_len);
        let bad_len = match h.kind {
            RecordKind::ZeroRun => stored != 0,
            RecordKind::Data => {
                raw > MAX_RECORD_RAW
                    || stored == 0
                    || if h.codec == CODEC_RAW {
                        stored != raw
                    } else {
                        // No zstd frame of `raw` bytes is longer (bounds the read buffer).
                        stored > zstd::zstd_safe::compress_bound(raw as usize) as u64
                    }
            }
        };
        if h.page_count == 0 || bad_len {
            return Err(corrupt("record length fields invalid", Some(i), pos));
        }
        Ok(h)
    }

    /// The record agrees with its (listed) index entry.
    fn against_index(&self, h: &RecordHeader, pos: u64, i: u64) -> Result<(), FormatError> {
        let e = &self.index[i as usize];
        if e.offset != pos
            || e.first_page != h.first_page
            || e.page_count != h.page_count
            || e.kind != h.kind
        {
            return Err(corrupt("record disagrees with trailer index", Some(i), pos));
        }
        Ok(())
    }

    /// Where the index says the record after the `i`-th starts (the trailer after the last).
    fn next_offset(&self, i: usize) -> u64 {
        self.index
            .get(i + 1)
            .map_or(self.trailer_offset, |e| e.offset)
    }
}

/// Split the index into runs of consecutive records of about `UNIT_BYTES` of file each. Only
/// scheduling depends on this: the offsets are checked as the units are read.
fn plan_units(index: &[IndexEntry]) -> Vec<(usize, usize)> {
    let mut units = Vec::new();
    let mut a = 0;
    for i in 1..=index.len() {
        let full = i == index.len()
            || i - a >= UNIT_RECORDS
            || index[i].offset.saturating_sub(index[a].offset) >= UNIT_BYTES;
        if full {
            units.push((a, i));
            a = i;
        }
    }
    units
}

#[derive(Clone, Copy)]
enum Mode<'m> {
    /// Check only.
    Verify,
    /// Check and write into `mem`; zero runs are skipped when the memory was `fresh`.
    Load {
        mem: &'m GuestMemoryMmap,
        pagemap: &'m Pagemap,
        fresh: bool,
    },
}

/// State shared by the workers of one `run`.
struct Shared {
    /// Next unit to claim.
    next: AtomicUsize,
    /// Lowest failing record index so far (`u64::MAX`: none); work at or past it is skipped.
    stop_at: AtomicU64,
    /// The error of the lowest failing record.
    err: Mutex<Option<(u64, FormatError)>>,
    records: AtomicU64,
    pages: AtomicU64,
    totals: Mutex<Totals>,
}

impl Shared {
    fn fail(&self, i: u64, e: FormatError) {
        let mut g = self.err.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_none_or(|(j, _)| i < *j) {
            *g = Some((i, e));
            self.stop_at.fetch_min(i, Ordering::Relaxed);
        }
    }
}

struct Job<'a, 'm> {
    chk: &'a Checker<'a>,
    units: &'a [(usize, usize)],
    shared: &'a Shared,
    mode: Mode<'m>,
}

impl Job<'_, '_> {
    /// Claim and process units until none are left (or a lower record failed).
    fn work(&self, src: &mut dyn Source, tick: &mut dyn FnMut(&Shared)) {
        let mut w = Worker {
            win: Window::default(),
            dec: None,
            out: Vec::new(),
            totals: Totals::default(),
        };
        let sh = self.shared;
        loop {
            let u = sh.next.fetch_add(1, Ordering::Relaxed);
            let Some(&(a, b)) = self.units.get(u) else {
                break;
            };
            if a as u64 >= sh.stop_at.load(Ordering::Relaxed) {
                break;
            }
            // Keep the disk busy up to PREFETCH_UNITS units past the one just claimed.
            if let Some(&(pa, _)) = self.units.get(u + 1) {
                let end = self
                    .units
                    .get(u + PREFETCH_UNITS + 1)
                    .map_or(self.chk.trailer_offset, |&(na, _)| {
                        self.chk.index[na].offset
                    });
                let start = self.chk.index[pa].offset;
                src.prefetch(start, end.saturating_sub(start));
            }
            let (records, pages) = (w.totals.records, w.totals.pages);
            if let Err((i, e)) = self.unit(&mut w, src, a, b) {
                sh.fail(i, e);
            }
            sh.records
                .fetch_add(w.totals.records - records, Ordering::Relaxed);
            sh.pages
                .fetch_add(w.totals.pages - pages, Ordering::Relaxed);
            tick(sh);
        }
        let mut t = sh.totals.lock().unwrap_or_else(|p| p.into_inner());
        let w = w.totals;
        t.pages += w.pages;
        t.zero_pages += w.zero_pages;
        t.data_pages += w.data_pages;
        t.records += w.records;
        t.raw_bytes += w.raw_bytes;
        t.stored_bytes += w.stored_bytes;
    }

    /// Records `a..b`: the first at its index offset (at the start of the records for record
    /// 0), each next one where the previous ends; the last must end where record `b` starts.
    fn unit(
        &self,
        w: &mut Worker,
        src: &mut dyn Source,
        a: usize,
        b: usize,
    ) -> Result<(), (u64, FormatError)> {
        let chk = self.chk;
        let mut pos = if a == 0 {
            chk.records_start
        } else {
            chk.index[a].offset
        };
        // Read-ahead stops at the claimed end of the unit.
        let limit = chk.next_offset(b - 1).min(chk.trailer_offset);
        for i in a..b {
            if i as u64 >= self.shared.stop_at.load(Ordering::Relaxed) {
                return Ok(());
            }
            let h = w
                .record(chk, self.mode, src, pos, i, limit)
                .map_err(|e| (i as u64, e))?;
            pos += RECORD_HEADER_LEN as u64 + u64::from(h.stored_len);
        }
        let next = chk.next_offset(b - 1);
        if pos != next {
            let what = if b == chk.index.len() {
                "record not listed in trailer index"
            } else {
                "record disagrees with trailer index"
            };
            return Err((b as u64, corrupt(what, Some(b as u64), pos)));
        }
        Ok(())
    }
}

/// Per-thread buffers.
struct Worker {
    win: Window,
    dec: Option<zstd::bulk::Decompressor<'static>>,
    out: Vec<u8>,
    totals: Totals,
}

impl Worker {
    /// Check the `i`-th record at `pos` and (load) place it; returns its header.
    fn record(
        &mut self,
        chk: &Checker<'_>,
        mode: Mode<'_>,
        src: &mut dyn Source,
        pos: u64,
        i: usize,
        limit: u64,
    ) -> Result<RecordHeader, FormatError> {
        let ri = i as u64;
        chk.bounds(pos, ri)?;
        // With zstd a record's payload is needed whole: read the record as the index sizes it
        // in one go (when that is sane; the header decides what is used).
        let hint = chk.next_offset(i).saturating_sub(pos);
        let want = if chk.zstd && hint <= MAX_RECORD_RAW + (1 << 20) {
            WINDOW.max(hint as usize)
        } else {
            WINDOW
        };
        let mut hb = [0u8; RECORD_HEADER_LEN];
        hb.copy_from_slice(self.win.get(src, pos, RECORD_HEADER_LEN, want, limit)?);
        let h = chk.header(&hb, pos, ri)?;
        // Before any payload is used: the record is the one the index (whose coverage was
        // proved) lists here, so it writes only pages it owns.
        chk.against_index(&h, pos, ri)?;
        let ps = chk.ps;
        let n = u64::from(h.page_count);
        let stored = h.stored_len as usize;
        let at = pos + RECORD_HEADER_LEN as u64;
        let gpa = h.first_page * ps;
        let mem_err = |e: vm_memory::GuestMemoryError| FormatError::LayoutMismatch {
            what: format!("record {i} at {gpa:#x}: {e}"),
        };
        match (h.kind, h.codec) {
            (RecordKind::ZeroRun, _) => {
                if h.compute_crc(&[]) != h.crc {
                    return Err(corrupt("record checksum mismatch", Some(ri), pos));
                }
                if let Mode::Load {
                    mem,
                    pagemap,
                    fresh: false,
                } = mode
                {
                    clear_pages(mem, pagemap, gpa, n * ps, ps, &mut self.out).map_err(mem_err)?;
                }
            }
            (RecordKind::Data, CODEC_RAW) => {
                // Streamed through the window: checksummed and (load) copied piece by piece;
                // a mismatch fails the load after the pages were written.
                let mut crc = crc32fast::Hasher::new();
                crc.update(&h.prefix());
                let mut off = 0;
                while off < stored {
                    let p = at + off as u64;
                    let s = self.win.get_some(src, p, stored - off, limit)?;
                    crc.update(s);
                    if let Mode::Load { mem, .. } = mode {
                        mem.write_slice(s, GuestAddress(gpa + off as u64))
                            .map_err(mem_err)?;
                    }
                    off += s.len();
                }
                if crc.finalize() != h.crc {
                    return Err(corrupt("record checksum mismatch", Some(ri), pos));
                }
            }
            (RecordKind::Data, _) => {
                let payload = self.win.get(src, at, stored, stored, limit)?;
                if h.compute_crc(payload) != h.crc {
                    return Err(corrupt("record checksum mismatch", Some(ri), pos));
                }
                if self.dec.is_none() {
                    self.dec = Some(zstd::bulk::Decompressor::new().map_err(unreadable)?);
                }
                if let Some(dec) = &mut self.dec {
                    decompress(dec, &h, payload, &mut self.out, ps, ri, pos)?;
                }
                if let Mode::Load { mem, .. } = mode {
                    mem.write_slice(&self.out, GuestAddress(gpa))
                        .map_err(mem_err)?;
                }
            }
        }
        let t = &mut self.totals;
        t.pages += n;
        t.records += 1;
        t.stored_bytes += stored as u64;
        match h.kind {
            RecordKind::ZeroRun => t.zero_pages += n,
            RecordKind::Data => {
                t.data_pages += n;
                t.raw_bytes += n * ps;
            }
        }
        Ok(h)
    }
}

/// Zero the pages of `[gpa, gpa + len)` that are not zero, leaving untouched memory (which
/// reads as zeros) unpopulated.
fn clear_pages(
    mem: &GuestMemoryMmap,
    pagemap: &Pagemap,
    gpa: u64,
    len: u64,
    ps: u64,
    buf: &mut Vec<u8>,
) -> Result<(), vm_memory::GuestMemoryError> {
    let host = mem.get_host_address(GuestAddress(gpa))? as usize;
    if !pagemap.may_have_data(host, len as usize) {
        return Ok(());
    }
    let mut off = 0;
    while off < len {
        let n = (len - off).min(ZERO_CHUNK_PAGES * ps);
        buf.clear();
        buf.resize(n as usize, 0);
        mem.read_slice(buf, GuestAddress(gpa + off))?;
        for (k, page) in buf.chunks_exact_mut(ps as usize).enumerate() {
            if !is_zero(page) {
                page.fill(0);
                mem.write_slice(page, GuestAddress(gpa + off + k as u64 * ps))?;
            }
        }
        off += n;
    }
    Ok(())
}

/// A reusable read-ahead buffer over `[start, start + len)` of the file.
#[derive(Default)]
struct Window {
    buf: Vec<u8>,
    start: u64,
    len: usize,
}

impl Window {
    /// Bytes of the window from `pos` on (0 when `pos` is outside it).
    fn avail(&self, pos: u64) -> usize {
        if pos >= self.start && pos - self.start < self.len as u64 {
            self.len - (pos - self.start) as usize
        } else {
            0
        }
    }

    /// Exactly `need` bytes at `pos`. When they are not in the window, refill it from `pos`
    /// with `want` bytes (at least `need`, not past `limit` unless `need` is).
    fn get(
        &mut self,
        src: &mut dyn Source,
        pos: u64,
        need: usize,
        want: usize,
        limit: u64,
    ) -> Result<&[u8], FormatError> {
        if self.avail(pos) < need {
            let room = usize::try_from(limit.saturating_sub(pos)).unwrap_or(usize::MAX);
            let n = want.min(room).max(need);
            if self.buf.len() < n {
                self.buf.clear();
                self.buf.reserve_exact(n);
                self.buf.resize(n, 0);
            }
            self.len = 0;
            src.read_exact_at(&mut self.buf[..n], pos)?;
            self.start = pos;
            self.len = n;
        }
        let off = (pos - self.start) as usize;
        Ok(&self.buf[off..off + need])
    }

    /// Between 1 and `max` bytes at `pos` (`max` > 0, `pos + max` <= `limit`).
    fn get_some(
        &mut self,
        src: &mut dyn Source,
        pos: u64,
        max: usize,
        limit: u64,
    ) -> Result<&[u8], FormatError> {
        let n = match self.avail(pos) {
            0 => max.min(WINDOW),
            a => a.min(max),
        };
        self.get(src, pos, n, WINDOW, limit)
    }
}

fn decompress(
    dec: &mut zstd::bulk::Decompressor<'static>,
    h: &RecordHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
    ps: u64,
    i: u64,
    pos: u64,
) -> Result<(), FormatError> {
    let raw = (u64::from(h.page_count) * ps) as usize;
    out.clear();
    out.reserve(raw);
    // The capacity bounds the output: a lying frame cannot make us allocate more.
    match dec.decompress_to_buffer(payload, out) {
        Ok(n) if n == raw => Ok(()),
        Ok(n) => Err(corrupt(
            format!("record decompresses to {n} bytes, expected {raw}"),
            Some(i),
            pos,
        )),
        Err(_) => Err(corrupt("record does not decompress", Some(i), pos)),
    }
}

/// Sequential iterator over records; see [`SnapshotReader::records`].
pub struct Records<'a, R> {
    rd: &'a mut SnapshotReader<R>,
    pos: u64,
    next: u64,
    failed: bool,
    dec: Option<zstd::bulk::Decompressor<'static>>,
}

impl<R> std::fmt::Debug for Records<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("pos", &self.pos)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl<R: Read + Seek> Iterator for Records<'_, R> {
    type Item = Result<Record, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.rd.trailer_offset {
            return None;
        }
        let r = self.read_one();
        self.failed = r.is_err();
        Some(r)
    }
}

impl<R: Read + Seek> Records<'_, R> {
    fn read_one(&mut self) -> Result<Record, FormatError> {
        let (i, pos) = (self.next, self.pos);
        let mut payload = Vec::new();
        let h = self.rd.read_raw(pos, i, &mut payload)?;
        let ps = u64::from(self.rd.header.page_size);
        let data = match (h.kind, h.codec) {
            (RecordKind::ZeroRun, _) => Vec::new(),
            (RecordKind::Data, CODEC_RAW) => payload,
            (RecordKind::Data, _) => {
                if self.dec.is_none() {
                    self.dec = Some(zstd::bulk::Decompressor::new().map_err(unreadable)?);
                }
                let mut out = Vec::new();
                if let Some(dec) = &mut self.dec {
                    decompress(dec, &h, &payload, &mut out, ps, i, pos)?;
                }
                out
            }
        };
        self.pos = pos + RECORD_HEADER_LEN as u64 + u64::from(h.stored_len);
        self.next += 1;
        Ok(Record {
            index: i,
            offset: pos,
            kind: h.kind,
            first_page: h.first_page,
            page_count: h.page_count,
            data,
        })
    }
}

/// A bitmap over every guest page of the header's layout: proves "exactly once".
#[derive(Debug)]
struct Coverage {
    /// (first page, page count, first bit) per region.
    regions: Vec<(u64, u64, u64)>,
    bits: Vec<u64>,
    total: u64,
}

impl Coverage {
    fn new(h: &SnapshotHeader) -> Self {
        let ps = u64::from(h.page_size);
        let mut regions = Vec::with_capacity(h.regions.len());
        let mut total = 0;
        for r in &h.regions {
            regions.push((r.gpa / ps, r.size / ps, total));
            total += r.size / ps;
        }
        // The header decoder bounds total guest memory (MAX_GUEST_BYTES), so this is bounded.
        Coverage {
            regions,
            bits: vec![0; total.div_ceil(64) as usize],
            total,
        }
    }

    fn mark(&mut self, first: u64, count: u64, record: Option<u64>) -> Result<(), FormatError> {
        let outside = FormatError::Coverage {
            what: "lies outside guest memory",
            page: first,
            record,
        };
        let Some(&(rfirst, rcount, base)) = self
            .regions
            .iter()
            .find(|(f, c, _)| first >= *f && first < f + c)
        else {
            return Err(outside);
        };
        if count > rcount - (first - rfirst) {
            return Err(outside);
        }
        let start = base + (first - rfirst);
        for b in start..start + count {
            let (w, m) = ((b / 64) as usize, 1u64 << (b % 64));
            if self.bits[w] & m != 0 {
                return Err(FormatError::Coverage {
                    what: "appears more than once",
                    page: first + (b - start),
                    record,
                });
            }
            self.bits[w] |= m;
        }
        Ok(())
    }

    fn complete(&self) -> Result<(), FormatError> {
        for (w, &word) in self.bits.iter().enumerate() {
            if word != u64::MAX {
                for bit in 0..64 {
                    let b = w as u64 * 64 + bit;
                    if b < self.total && word & (1 << bit) == 0 {
                        return Err(FormatError::Coverage {
                            what: "is missing",
                            page: self.page_of_bit(b),
                            record: None,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn page_of_bit(&self, b: u64) -> u64 {
        self.regions
            .iter()
            .find(|(_, c, base)| b >= *base && b < base + c)
            .map_or(b, |(f, _, base)| f + (b - base))
    }
}
