//! `verify` and `load_into` on all cores: the trailer index splits the records into units of
//! consecutive records; workers claim units in file order, read each through a reusable window,
//! check (and load) every record, and report the lowest failing record (see the reader docs).

use std::io::{Read, Seek};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::check::{decompress, piece_table, Checker, PieceCrcs};
use super::source::{Seq, Source};
use super::{corrupt, unreadable, ReadProgress, SnapshotReader};
use crate::direct_io::Pread;
use crate::format::{
    FormatError, IndexEntry, PieceTable, RecordHeader, RecordKind, Totals, CODEC_RAW,
    CODEC_RAW_PIECES, MAX_RECORD_RAW, PIECE_TABLE_HEAD_LEN, RECORD_HEADER_LEN,
};
use crate::pagemap;
use crate::writer::is_zero;

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

impl<R: Read + Seek> SnapshotReader<R> {
    /// Check (and in load mode place) every record on all cores; returns the totals recomputed
    /// from the records. `pre` is an error already known for a record (coverage).
    pub(super) fn run(
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
            self.version,
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
pub(super) enum Mode<'m> {
    /// Check only.
    Verify,
    /// Check and write into `mem`; zero runs are skipped when the memory was `fresh`.
    Load {
        mem: &'m GuestMemoryMmap,
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
            crcs: PieceCrcs::default(),
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
        t.parent_pages += w.parent_pages;
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
    crcs: PieceCrcs,
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
            (RecordKind::Parent, _) => {
                // The pages are the parent's: nothing here to load.
                if h.compute_crc(&[]) != h.crc {
                    return Err(corrupt("record checksum mismatch", Some(ri), pos));
                }
            }
            (RecordKind::ZeroRun, _) => {
                if h.compute_crc(&[]) != h.crc {
                    return Err(corrupt("record checksum mismatch", Some(ri), pos));
                }
                if let Mode::Load { mem, fresh: false } = mode {
                    clear_pages(mem, gpa, n * ps, ps, &mut self.out).map_err(mem_err)?;
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
            (RecordKind::Data, CODEC_RAW_PIECES) => {
                // The table (checked), then the pages streamed as raw pages are, each piece's
                // crc checked as it ends and the record crc combined from them.
                let mut head = [0u8; PIECE_TABLE_HEAD_LEN];
                head.copy_from_slice(self.win.get(src, at, PIECE_TABLE_HEAD_LEN, WINDOW, limit)?);
                let layout = PieceTable::layout(&h, &head, ps)
                    .ok_or_else(|| corrupt("record piece table invalid", Some(ri), pos))?;
                let tl = layout.table_len();
                let table = self.win.get(src, at, tl, WINDOW, limit)?;
                let t = piece_table(&h, table, ps, ri, pos)?;
                self.crcs.start(&h, &t, table);
                let mut off = tl;
                while off < stored {
                    let p = at + off as u64;
                    let s = self.win.get_some(src, p, stored - off, limit)?;
                    self.crcs.update(s, ri, pos)?;
                    if let Mode::Load { mem, .. } = mode {
                        let g = gpa + (off - tl) as u64;
                        mem.write_slice(s, GuestAddress(g)).map_err(mem_err)?;
                    }
                    off += s.len();
                }
                self.crcs.finish(&h, ri, pos)?;
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
            RecordKind::Parent => t.parent_pages += n,
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
pub(crate) fn clear_pages(
    mem: &GuestMemoryMmap,
    gpa: u64,
    len: u64,
    ps: u64,
    buf: &mut Vec<u8>,
) -> Result<(), vm_memory::GuestMemoryError> {
    let host = mem.get_host_address(GuestAddress(gpa))? as usize;
    if !pagemap::may_have_data(host, len as usize) {
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
