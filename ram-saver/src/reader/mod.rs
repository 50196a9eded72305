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
//!
//! Here: `open` (the checks of opening), `check` (what every record must pass, and coverage),
//! `parallel` (the workers of `verify` and `load_into`), `records` (sequential iteration),
//! `source` (where the bytes come from; direct reads are in `direct_io`).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::path::Path;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::direct_io::reopen_direct;
use crate::format::{
    FormatError, Identity, ParentRef, SnapshotHeader, Totals, Trailer, RECORD_HEADER_LEN,
};
use crate::pagemap;

mod check;
mod open;
pub(crate) mod parallel;
mod records;
mod source;

use check::Coverage;
use parallel::Mode;
pub use records::{Piece, Record, Records};

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

/// The hot records of a file ([`SnapshotReader::hot_totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct HotTotals {
    /// Hot records.
    pub records: u64,
    /// Guest pages in them.
    pub pages: u64,
    /// Their payload bytes as stored.
    pub stored_bytes: u64,
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
    /// Format version of the file.
    version: u32,
    header: SnapshotHeader,
    machine_state: Vec<u8>,
    records_start: u64,
    trailer_offset: u64,
    trailer: Trailer,
    /// The trailer's crc (part of the file's identity).
    trailer_crc: u32,
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

impl ParentRef {
    /// The reference a child to be written at `child_path` stores for the parent `rd`, opened
    /// from `parent_path` (see [`ParentRef::new`] for the path hint).
    pub fn of<R: Read + Seek>(
        rd: &SnapshotReader<R>,
        parent_path: &Path,
        child_path: &Path,
    ) -> Self {
        ParentRef::new(rd.identity(), parent_path, child_path)
    }
}

impl<R: Read + Seek> SnapshotReader<R> {
    /// Check a snapshot readable from `r` (any `Read + Seek`).
    pub fn from_reader(r: R) -> Result<Self, FormatError> {
        Self::check(r, None)
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

    /// The file's identity (snapshot id, trailer crc, length), what a child's parent reference
    /// names it by.
    pub fn identity(&self) -> Identity {
        Identity {
            snapshot_id: self.header.snapshot_id,
            trailer_crc: self.trailer_crc,
            file_len: self.file_len,
        }
    }

    /// Format version of the file ([`OLDEST_FORMAT_VERSION`](crate::format::OLDEST_FORMAT_VERSION)
    /// ..= [`FORMAT_VERSION`](crate::format::FORMAT_VERSION)).
    pub fn format_version(&self) -> u32 {
        self.version
    }

    /// The records the save wrote first because the guest wrote them during the save (hot in
    /// the index): how many, their pages and stored payload bytes.
    pub fn hot_totals(&self) -> HotTotals {
        let index = &self.trailer.index;
        let mut t = HotTotals::default();
        for (i, e) in index.iter().enumerate().filter(|(_, e)| e.hot) {
            let next = index.get(i + 1).map_or(self.trailer_offset, |n| n.offset);
            t.records += 1;
            t.pages += u64::from(e.page_count);
            t.stored_bytes += next.saturating_sub(e.offset + RECORD_HEADER_LEN as u64);
        }
        t
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
    /// `mem` are unspecified. A child (with Parent records) is refused
    /// ([`FormatError::InParent`]): load it as a [`Chain`](crate::Chain).
    pub fn load_into(
        &mut self,
        mem: &GuestMemoryMmap,
        progress: &mut dyn FnMut(&ReadProgress),
    ) -> Result<Totals, FormatError> {
        if self.trailer.totals.parent_pages > 0 {
            return Err(FormatError::InParent { record: None });
        }
        self.check_layout(mem)?;
        let mut cover = Coverage::new(&self.header);
        for e in &self.trailer.index {
            cover.mark(e.first_page, u64::from(e.page_count), None)?;
        }
        cover.complete()?;
        drop(cover);

        let mut fresh = true;
        for r in mem.iter() {
            let host =
                mem.get_host_address(r.start_addr())
                    .map_err(|e| FormatError::LayoutMismatch {
                        what: format!("region at {:#x}: {e}", r.start_addr().0),
                    })?;
            if pagemap::may_have_data(host as usize, r.len() as usize) {
                fresh = false;
                break;
            }
        }
        let mode = Mode::Load { mem, fresh };
        self.run(mode, None, progress)?;
        Ok(self.trailer.totals)
    }

    /// The header's memory layout is `mem`'s.
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
