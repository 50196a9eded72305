//! Sequential reading: [`Records`] iterates the records in file order, each checked and
//! decompressed. Random access: [`SnapshotReader::read_record_at`] reads one record by its index
//! entry, from any thread.

use std::cell::RefCell;
use std::io::{Read, Seek};

use super::check::{
    check_raw_pieces, decode_piece, decompress, decompress_into, piece_table, Checker, PieceCrcs,
};
use super::source::{Seq, Source};
use super::{corrupt, unreadable, SnapshotReader};
use crate::direct_io::Pread;
use crate::format::{
    in_pieces, FormatError, IndexEntry, PieceLayout, PieceTable, RecordHeader, RecordKind,
    CODEC_RAW, CODEC_RAW_PIECES, PIECE_TABLE_HEAD_LEN, RECORD_HEADER_LEN,
};

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
            (RecordKind::ZeroRun | RecordKind::Parent, _) => Vec::new(),
            (RecordKind::Data, CODEC_RAW) => payload,
            (RecordKind::Data, CODEC_RAW_PIECES) => {
                let mut pc = PieceCrcs::default();
                let n = check_raw_pieces(&mut pc, &h, &payload, ps, i, pos)?;
                let mut pages = payload;
                pages.drain(..n);
                pages
            }
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

impl<R: Read + Seek> SnapshotReader<R> {
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
            self.version,
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
}

impl<R> SnapshotReader<R> {
    /// Read records `first..first + count` of the index (consecutive in the file) as they are
    /// stored, headers and payloads back to back, into `out` (its buffer reused): for copying
    /// them verbatim into another file (`Chain::merge`). One positioned read; then each record
    /// is checked as every read checks it (bounds, header fields and lengths, agreement with its
    /// index entry, the crc over its whole payload) and must end where the next one starts. Its
    /// payload is not decoded. Readers built with `from_reader`: `Unsupported`.
    pub fn read_stored_records(
        &self,
        first: usize,
        count: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let (f, e) = self.by_index(first)?;
        if count == 0 || first + count > self.trailer.index.len() {
            return Err(corrupt(
                "record not listed in trailer index",
                Some((first + count) as u64),
                0,
            ));
        }
        let chk = self.checker();
        let start = e.offset;
        let end = chk.next_offset(first + count - 1);
        chk.bounds(start, first as u64)?;
        if end <= start || end > self.trailer_offset {
            return Err(corrupt(
                "record disagrees with trailer index",
                Some(first as u64),
                start,
            ));
        }
        out.clear();
        out.resize((end - start) as usize, 0);
        Pread::new(f, None).read_exact_at(out, start)?;
        let mut at = 0usize;
        for i in first..first + count {
            let pos = start + at as u64;
            let ri = i as u64;
            chk.bounds(pos, ri)?;
            if out.len() - at < RECORD_HEADER_LEN {
                return Err(corrupt("record header runs into trailer", Some(ri), pos));
            }
            let mut hb = [0u8; RECORD_HEADER_LEN];
            hb.copy_from_slice(&out[at..at + RECORD_HEADER_LEN]);
            let h = chk.header(&hb, pos, ri)?;
            chk.against_index(&h, pos, ri)?;
            let p = at + RECORD_HEADER_LEN;
            let q = p + h.stored_len as usize;
            if q > out.len() || (i + 1 < first + count && chk.next_offset(i) != start + q as u64) {
                return Err(corrupt(
                    "record disagrees with trailer index",
                    Some(ri),
                    pos,
                ));
            }
            if h.compute_crc(&out[p..q]) != h.crc {
                return Err(corrupt("record checksum mismatch", Some(ri), pos));
            }
            at = q;
        }
        if at != out.len() {
            let ri = (first + count - 1) as u64;
            return Err(corrupt(
                "record disagrees with trailer index",
                Some(ri),
                start,
            ));
        }
        Ok(())
    }
}

thread_local! {
    /// Per thread: a compressed payload and a zstd context, reused by `read_record_at`.
    static SCRATCH: RefCell<(Vec<u8>, Option<zstd::bulk::Decompressor<'static>>)> =
        const { RefCell::new((Vec::new(), None)) };
    /// Per thread: the piece crcs of a record raw in pieces read by `read_record_at`.
    static PIECE_CRCS: RefCell<PieceCrcs> = RefCell::new(PieceCrcs::default());
}

/// Read the head of the piece table of record `h` (the `i`-th, at `pos`; its payload at `at`)
/// and return its layout, checked to fit in the payload before anything else is read.
fn read_layout(
    src: &mut Pread<'_>,
    h: &RecordHeader,
    at: u64,
    ps: u64,
    i: u64,
    pos: u64,
) -> Result<PieceLayout, FormatError> {
    // The table's length follows from its head; both lie inside the payload (bounded by the
    // header check), the head first.
    let mut head = [0u8; PIECE_TABLE_HEAD_LEN];
    if h.stored_len as usize >= PIECE_TABLE_HEAD_LEN {
        src.read_exact_at(&mut head, at)?;
    }
    PieceTable::layout(h, &head, ps)
        .ok_or_else(|| corrupt("record piece table invalid", Some(i), pos))
}

impl<R> SnapshotReader<R> {
    /// Read the `i`-th record of the index by positioned reads through the page cache, from any
    /// number of threads at once (lazy restore: a fault thread and a fill thread). Checks what
    /// every record read checks: bounds, header fields and lengths, agreement with its index
    /// entry, the crc, that a compressed payload decompresses to exactly its pages, and of a
    /// record in pieces its piece table and every piece's crc. `out` receives the pages
    /// (`page_count * page_size` bytes; empty for a zero run); its buffer is reused. The back-to-back chain of records is not followed (that is `verify`'s): only this
    /// record is read. Readers built with `from_reader` have no file to read at positions:
    /// `Unsupported`.
    pub fn read_record_at(&self, i: usize, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let e = self
            .trailer
            .index
            .get(i)
            .ok_or_else(|| corrupt("record not listed in trailer index", Some(i as u64), 0))?;
        let len = match e.kind {
            RecordKind::ZeroRun => 0,
            RecordKind::Parent => {
                return Err(FormatError::InParent {
                    record: Some(i as u64),
                })
            }
            RecordKind::Data => {
                (u64::from(e.page_count) * u64::from(self.header.page_size)) as usize
            }
        };
        // A buffer of the same length is reused as is (no clearing).
        out.resize(len, 0);
        self.read_record_into(i, out)
    }

    /// Read the `i`-th record of the index as [`SnapshotReader::read_record_at`] does (the same
    /// checks), straight into `out`, which must hold exactly its pages (`page_count *
    /// page_size` bytes; a zero run also takes an empty buffer, and fills a full one with
    /// zeros): e.g. a staging huge page, without an intermediate buffer. A buffer of another
    /// length is refused (`LayoutMismatch`) before anything is read.
    pub fn read_record_into(&self, i: usize, out: &mut [u8]) -> Result<(), FormatError> {
        let (f, e) = self.by_index(i)?;
        let ri = i as u64;
        let pos = e.offset;
        let raw = (u64::from(e.page_count) * u64::from(self.header.page_size)) as usize;
        if e.kind == RecordKind::Parent {
            return Err(FormatError::InParent { record: Some(ri) });
        }
        if out.len() != raw && !(e.kind == RecordKind::ZeroRun && out.is_empty()) {
            return Err(FormatError::LayoutMismatch {
                what: format!(
                    "record {i} holds {raw} bytes, the buffer for it {}",
                    out.len()
                ),
            });
        }
        let chk = self.checker();
        let mut src = Pread::new(f, None);
        let h = record_header_at(&chk, &mut src, pos, ri)?;
        let at = pos + RECORD_HEADER_LEN as u64;
        let crc_err = || corrupt("record checksum mismatch", Some(ri), pos);
        match (h.kind, h.codec) {
            (RecordKind::Parent, _) => return Err(FormatError::InParent { record: Some(ri) }),
            (RecordKind::ZeroRun, _) => {
                if h.compute_crc(&[]) != h.crc {
                    return Err(crc_err());
                }
                out.fill(0);
            }
            (RecordKind::Data, CODEC_RAW) => {
                // The header check proved stored_len == page_count * page_size == out.len().
                src.read_exact_at(out, at)?;
                if h.compute_crc(out) != h.crc {
                    return Err(crc_err());
                }
            }
            (RecordKind::Data, CODEC_RAW_PIECES) => SCRATCH.with(|s| {
                let (table, _) = &mut *s.borrow_mut();
                let ps = chk.ps;
                let layout = read_layout(&mut src, &h, at, ps, ri, pos)?;
                table.resize(layout.table_len(), 0);
                src.read_exact_at(table, at)?;
                let t = piece_table(&h, table, ps, ri, pos)?;
                // The header check bounds stored_len, the table check makes the rest exactly
                // the pages: out.len().
                src.read_exact_at(out, at + table.len() as u64)?;
                PIECE_CRCS.with(|pc| {
                    let pc = &mut *pc.borrow_mut();
                    pc.start(&h, &t, table);
                    pc.update(out, ri, pos)?;
                    pc.finish(&h, ri, pos)
                })
            })?,
            (RecordKind::Data, _) => SCRATCH.with(|s| {
                let (payload, dec) = &mut *s.borrow_mut();
                payload.resize(h.stored_len as usize, 0);
                src.read_exact_at(payload, at)?;
                if h.compute_crc(payload) != h.crc {
                    return Err(crc_err());
                }
                if dec.is_none() {
                    *dec = Some(zstd::bulk::Decompressor::new().map_err(unreadable)?);
                }
                match dec {
                    Some(d) => decompress_into(d, &h, payload, out, chk.ps, ri, pos),
                    None => Ok(()),
                }
            })?,
        }
        Ok(())
    }
}

impl<R> SnapshotReader<R> {
    /// The file and the `i`-th index entry, for reading a record by index (positioned reads):
    /// readers built with `from_reader` cannot.
    fn by_index(&self, i: usize) -> Result<(&std::fs::File, IndexEntry), FormatError> {
        let Some(f) = &self.file else {
            return Err(FormatError::Unsupported {
                what: "reading records by index needs a snapshot opened by path".into(),
            });
        };
        let e = self
            .trailer
            .index
            .get(i)
            .ok_or_else(|| corrupt("record not listed in trailer index", Some(i as u64), 0))?;
        Ok((f, *e))
    }

    fn checker(&self) -> Checker<'_> {
        Checker::new(
            &self.header,
            &self.trailer,
            self.records_start,
            self.trailer_offset,
            self.version,
        )
    }
}

/// Read and check the header of the `i`-th record at `pos`: within the records, its fields, and
/// in agreement with its index entry.
fn record_header_at(
    chk: &Checker<'_>,
    src: &mut Pread<'_>,
    pos: u64,
    i: u64,
) -> Result<RecordHeader, FormatError> {
    chk.bounds(pos, i)?;
    let mut hb = [0u8; RECORD_HEADER_LEN];
    src.read_exact_at(&mut hb, pos)?;
    let h = chk.header(&hb, pos, i)?;
    chk.against_index(&h, pos, i)?;
    Ok(h)
}

/// One piece of a record read by [`SnapshotReader::read_piece_at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Its number in the record.
    pub index: usize,
    /// First guest page it holds.
    pub first_page: u64,
    /// Pages it holds.
    pub page_count: u32,
}

impl<R> SnapshotReader<R> {
    /// Read only the piece of the `i`-th record that holds guest page `page`, when the record is
    /// stored in pieces (zstd or raw in pieces, see [`format`](crate::format)): by positioned
    /// reads of its header, piece table and that piece, nothing else. Checks the header's
    /// bounds and fields and its agreement with the index entry, the piece table's crc (which
    /// covers the header fields too) and lengths, the piece's crc, and that it decodes to
    /// exactly its pages; the record crc, which covers the whole payload, is not (that needs all of it:
    /// [`read_record_at`](Self::read_record_at)). `out` receives the piece's pages.
    ///
    /// `Ok(None)` (nothing read into `out`) when the record is not stored in pieces or does not
    /// hold `page`: read it whole. Readers built with `from_reader`: `Unsupported`.
    pub fn read_piece_at(
        &self,
        i: usize,
        page: u64,
        out: &mut Vec<u8>,
    ) -> Result<Option<Piece>, FormatError> {
        let (f, e) = self.by_index(i)?;
        let ri = i as u64;
        if page < e.first_page || page - e.first_page >= u64::from(e.page_count) {
            return Ok(None);
        }
        let pos = e.offset;
        let chk = self.checker();
        let mut src = Pread::new(f, None);
        let h = record_header_at(&chk, &mut src, pos, ri)?;
        if h.kind != RecordKind::Data || !in_pieces(h.codec) {
            return Ok(None);
        }
        let at = pos + RECORD_HEADER_LEN as u64;
        let ps = chk.ps;
        SCRATCH.with(|s| {
            let (buf, dec) = &mut *s.borrow_mut();
            let layout = read_layout(&mut src, &h, at, ps, ri, pos)?;
            buf.resize(layout.table_len(), 0);
            src.read_exact_at(buf, at)?;
            let t = piece_table(&h, buf, ps, ri, pos)?;
            let k = t.layout.piece_of(page - e.first_page);
            let (off, len, crc) = t.piece(k);
            let (a, b) = t.layout.span(k);
            let piece = Piece {
                index: k,
                first_page: e.first_page + a,
                page_count: (b - a) as u32,
            };
            if h.codec == CODEC_RAW_PIECES {
                // The table check made the piece exactly its pages: read straight into `out`.
                out.resize(len, 0);
                src.read_exact_at(out, at + off as u64)?;
                if crc32fast::hash(out) != crc {
                    let what = format!("record piece {k} checksum mismatch");
                    return Err(corrupt(what, Some(ri), pos));
                }
                return Ok(Some(piece));
            }
            buf.resize(len, 0);
            src.read_exact_at(buf, at + off as u64)?;
            if dec.is_none() {
                *dec = Some(zstd::bulk::Decompressor::new().map_err(unreadable)?);
            }
            out.resize(((b - a) * ps) as usize, 0);
            if let Some(d) = dec {
                decode_piece(d, buf, crc, k, out, ri, pos)?;
            }
            Ok(Some(piece))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{Compression, FormatError, MemRegion, RecordKind, SnapshotHeader};
    use crate::{SnapshotReader, SnapshotWriter};

    const PS: usize = 4096;

    /// A snapshot of 64 pages in records of 1..=5 pages (every fourth a zero run), written
    /// out of order; returns the file and each page's bytes.
    fn snapshot(compression: Compression) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut h = SnapshotHeader::new(
            vec![MemRegion {
                gpa: 0,
                size: 64 * PS as u64,
            }],
            1,
            Vec::new(),
        );
        h.compression = compression;
        let mut pages = vec![vec![0u8; PS]; 64];
        let mut runs = Vec::new();
        let (mut p, mut k) = (0, 0);
        while p < 64 {
            let n = (1 + k % 5).min(64 - p);
            runs.push((p, n, k % 4 == 3));
            p += n;
            k += 1;
        }
        runs.reverse();
        let mut f = Vec::new();
        let mut w = SnapshotWriter::new(&mut f, &h, b"state").unwrap();
        for &(p, n, zero) in &runs {
            if zero {
                w.write_zero_run(p as u64, n as u64).unwrap();
                continue;
            }
            let mut data = Vec::new();
            for (q, page) in pages.iter_mut().enumerate().skip(p).take(n) {
                *page = (0..PS).map(|b| ((q * 7 + b / 64) % 251) as u8).collect();
                data.extend_from_slice(page);
            }
            w.write_pages(p as u64, &data).unwrap();
        }
        w.finish().unwrap();
        (f, pages)
    }

    fn temp_file(tag: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p =
            std::env::temp_dir().join(format!("ram-saver-read-at-{tag}-{}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn records_read_by_index_from_two_threads_hold_their_pages() {
        for (tag, c) in [
            ("raw", Compression::None),
            ("zstd", Compression::Zstd { level: 3 }),
        ] {
            let (bytes, pages) = snapshot(c);
            let path = temp_file(tag, &bytes);
            let rd = SnapshotReader::open(&path).unwrap();
            let n = rd.trailer().index.len();
            std::thread::scope(|s| {
                for t in 0..2 {
                    let (rd, pages) = (&rd, &pages);
                    s.spawn(move || {
                        let mut out = Vec::new();
                        // Both threads read every record, in opposite orders.
                        for k in 0..n {
                            let i = if t == 0 { k } else { n - 1 - k };
                            let e = rd.trailer().index[i];
                            rd.read_record_at(i, &mut out).unwrap();
                            if e.kind == RecordKind::ZeroRun {
                                assert!(out.is_empty());
                                continue;
                            }
                            assert_eq!(out.len(), e.page_count as usize * PS);
                            for (j, page) in out.chunks(PS).enumerate() {
                                let q = e.first_page as usize + j;
                                assert!(page == pages[q].as_slice(), "{tag}: page {q}");
                            }
                        }
                    });
                }
            });
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn records_read_into_a_buffer_of_their_size_hold_their_pages_and_other_sizes_are_refused() {
        for (tag, c) in [
            ("raw-into", Compression::None),
            ("zstd-into", Compression::Zstd { level: 3 }),
        ] {
            let (bytes, pages) = snapshot(c);
            let path = temp_file(tag, &bytes);
            let rd = SnapshotReader::open(&path).unwrap();
            for (i, e) in rd.trailer().index.iter().enumerate() {
                let mut out = vec![0xa5u8; e.page_count as usize * PS];
                rd.read_record_into(i, &mut out).unwrap();
                for (j, page) in out.chunks(PS).enumerate() {
                    let q = e.first_page as usize + j;
                    assert!(page == pages[q].as_slice(), "{tag}: page {q}");
                }
                let mut short = vec![0u8; (e.page_count as usize - 1) * PS + 1];
                let err = rd.read_record_into(i, &mut short).unwrap_err();
                assert!(
                    matches!(err, FormatError::LayoutMismatch { .. }),
                    "{tag}: {err}"
                );
                if e.kind == RecordKind::ZeroRun {
                    rd.read_record_into(i, &mut []).unwrap();
                }
            }
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn a_damaged_record_read_by_index_is_named_and_others_still_read() {
        let (mut bytes, _) = snapshot(Compression::Zstd { level: 3 });
        let clean = temp_file("clean", &bytes);
        let rd = SnapshotReader::open(&clean).unwrap();
        let (i, e) = rd
            .trailer()
            .index
            .iter()
            .enumerate()
            .find(|(_, e)| e.kind == RecordKind::Data)
            .map(|(i, e)| (i, *e))
            .unwrap();
        bytes[e.offset as usize + 28 + 3] ^= 0x40;
        let path = temp_file("bad", &bytes);
        let rd = SnapshotReader::open(&path).unwrap();
        let mut out = Vec::new();
        let err = rd.read_record_at(i, &mut out).unwrap_err();
        assert!(
            matches!(&err, FormatError::Corrupt { record: Some(r), .. } if *r == i as u64),
            "{err}"
        );
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        let other = (0..rd.trailer().index.len()).find(|&k| k != i).unwrap();
        rd.read_record_at(other, &mut out).unwrap();
        assert!(rd.read_record_at(usize::MAX, &mut out).is_err());
        // Without a file there is nothing to read at positions.
        let mem = SnapshotReader::from_reader(std::io::Cursor::new(&bytes[..])).unwrap();
        assert!(matches!(
            mem.read_record_at(0, &mut out),
            Err(FormatError::Unsupported { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&clean).unwrap();
    }
}
