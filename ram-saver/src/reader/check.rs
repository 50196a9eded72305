//! The checks every record passes, whoever reads it: bounds, header fields and lengths, its index
//! entry, decompression to exactly its pages, the piece table and piece crcs of a record in
//! pieces; and the coverage bitmap that proves every guest page appears exactly once.

use super::corrupt;
use crate::format::{
    max_codec, Compression, FormatError, IndexEntry, PieceTable, RecordHeader, RecordKind,
    SnapshotHeader, Trailer, CODEC_RAW, CODEC_RAW_PIECES, CODEC_ZSTD_PIECES, MAX_RECORD_RAW,
    PIECE_ENTRY_LEN, PIECE_TABLE_HEAD_LEN, RECORD_HEADER_LEN,
};

/// The record checks that need only the file's layout and index.
#[derive(Debug)]
pub(super) struct Checker<'a> {
    pub(super) index: &'a [IndexEntry],
    pub(super) records_start: u64,
    pub(super) trailer_offset: u64,
    pub(super) ps: u64,
    pub(super) zstd: bool,
    /// The highest codec the file's version allows.
    max_codec: u8,
}

impl<'a> Checker<'a> {
    pub(super) fn new(
        header: &SnapshotHeader,
        trailer: &'a Trailer,
        records_start: u64,
        trailer_offset: u64,
        version: u32,
    ) -> Self {
        Checker {
            index: &trailer.index,
            records_start,
            trailer_offset,
            ps: u64::from(header.page_size),
            zstd: matches!(header.compression, Compression::Zstd { .. }),
            max_codec: max_codec(version),
        }
    }

    /// The `i`-th record may start at `pos`: it is listed and its header lies in the record area.
    pub(super) fn bounds(&self, pos: u64, i: u64) -> Result<(), FormatError> {
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
    pub(super) fn header(
        &self,
        hb: &[u8; RECORD_HEADER_LEN],
        pos: u64,
        i: u64,
    ) -> Result<RecordHeader, FormatError> {
        let h = RecordHeader::decode(hb, self.max_codec)
            .ok_or_else(|| corrupt("bad record header", Some(i), pos))?;
        if u64::from(h.stored_len) > self.trailer_offset - pos - RECORD_HEADER_LEN as u64 {
            return Err(corrupt("record payload runs into trailer", Some(i), pos));
        }
        let raw = u64::from(h.page_count) * self.ps;
        let stored = u64::from(h.stored_len);
        let bad_len = match h.kind {
            RecordKind::ZeroRun | RecordKind::Parent => stored != 0,
            RecordKind::Data => {
                raw > MAX_RECORD_RAW
                    || stored == 0
                    || match h.codec {
                        CODEC_RAW => stored != raw,
                        // Written only when smaller than the pages (bounds the read buffer).
                        CODEC_ZSTD_PIECES => stored >= raw,
                        // The pages and a table of at most one piece per page.
                        CODEC_RAW_PIECES => {
                            stored <= raw
                                || stored - raw
                                    > (PIECE_TABLE_HEAD_LEN + 4) as u64
                                        + PIECE_ENTRY_LEN as u64 * u64::from(h.page_count)
                        }
                        // No zstd frame of `raw` bytes is longer (bounds the read buffer).
                        _ => stored > zstd::zstd_safe::compress_bound(raw as usize) as u64,
                    }
            }
        };
        if h.page_count == 0 || bad_len {
            return Err(corrupt("record length fields invalid", Some(i), pos));
        }
        Ok(h)
    }

    /// The record agrees with its (listed) index entry.
    pub(super) fn against_index(
        &self,
        h: &RecordHeader,
        pos: u64,
        i: u64,
    ) -> Result<(), FormatError> {
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
    pub(super) fn next_offset(&self, i: usize) -> u64 {
        self.index
            .get(i + 1)
            .map_or(self.trailer_offset, |e| e.offset)
    }
}

/// Decode the (checked) compressed payload of the `i`-th record, at `pos`, into `out`: exactly
/// its pages. A record in pieces has its table and every piece checked too.
pub(super) fn decompress(
    dec: &mut zstd::bulk::Decompressor<'static>,
    h: &RecordHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
    ps: u64,
    i: u64,
    pos: u64,
) -> Result<(), FormatError> {
    let raw = (u64::from(h.page_count) * ps) as usize;
    if h.codec == CODEC_ZSTD_PIECES {
        // Every byte is written by a piece (or the record fails).
        out.resize(raw, 0);
        return decompress_pieces(dec, h, payload, out, ps, i, pos);
    }
    out.clear();
    out.reserve(raw);
    // The capacity bounds the output: a lying frame cannot make us allocate more.
    decoded(dec.decompress_to_buffer(payload, out), raw, i, pos)
}

/// Decompress the checked payload of the `i`-th record `h`, at `pos`, into `out`, which holds
/// exactly its pages (the length bounds the output). A record in pieces has its table and
/// every piece checked too.
pub(super) fn decompress_into(
    dec: &mut zstd::bulk::Decompressor<'static>,
    h: &RecordHeader,
    payload: &[u8],
    out: &mut [u8],
    ps: u64,
    i: u64,
    pos: u64,
) -> Result<(), FormatError> {
    if h.codec == CODEC_ZSTD_PIECES {
        return decompress_pieces(dec, h, payload, out, ps, i, pos);
    }
    decoded(dec.decompress_to_buffer(payload, out), out.len(), i, pos)
}

/// A decompression must produce exactly `raw` bytes.
fn decoded(r: std::io::Result<usize>, raw: usize, i: u64, pos: u64) -> Result<(), FormatError> {
    match r {
        Ok(n) if n == raw => Ok(()),
        Ok(n) => Err(corrupt(
            format!("record decompresses to {n} bytes, expected {raw}"),
            Some(i),
            pos,
        )),
        Err(_) => Err(corrupt("record does not decompress", Some(i), pos)),
    }
}

/// The piece table of record `h` at the start of `payload` (all of it, or at least the table):
/// decoded and checked.
pub(super) fn piece_table<'p>(
    h: &RecordHeader,
    payload: &'p [u8],
    ps: u64,
    i: u64,
    pos: u64,
) -> Result<PieceTable<'p>, FormatError> {
    let bad = |what: &str| corrupt(format!("record {what}"), Some(i), pos);
    let mut head = [0u8; PIECE_TABLE_HEAD_LEN];
    head.copy_from_slice(
        payload
            .get(..PIECE_TABLE_HEAD_LEN)
            .ok_or_else(|| bad("piece table invalid"))?,
    );
    let layout = PieceTable::layout(h, &head, ps).ok_or_else(|| bad("piece table invalid"))?;
    let table = payload
        .get(..layout.table_len())
        .ok_or_else(|| bad("piece table invalid"))?;
    PieceTable::decode(h, layout, table, ps).map_err(bad)
}

/// Check piece `k` (`frame`, whose crc must be `crc`) of the `i`-th record, at `pos`, and decode
/// it into `out`, which it must fill exactly.
pub(super) fn decode_piece(
    dec: &mut zstd::bulk::Decompressor<'static>,
    frame: &[u8],
    crc: u32,
    k: usize,
    out: &mut [u8],
    i: u64,
    pos: u64,
) -> Result<(), FormatError> {
    if crc32fast::hash(frame) != crc {
        return Err(corrupt(
            format!("record piece {k} checksum mismatch"),
            Some(i),
            pos,
        ));
    }
    match dec.decompress_to_buffer(frame, out) {
        Ok(n) if n == out.len() => Ok(()),
        Ok(n) => Err(corrupt(
            format!(
                "record piece {k} decompresses to {n} bytes, expected {}",
                out.len()
            ),
            Some(i),
            pos,
        )),
        Err(_) => Err(corrupt(
            format!("record piece {k} does not decompress"),
            Some(i),
            pos,
        )),
    }
}

/// Decode a whole record in zstd pieces into `out` (exactly its pages): table, then every
/// piece, each checked.
fn decompress_pieces(
    dec: &mut zstd::bulk::Decompressor<'static>,
    h: &RecordHeader,
    payload: &[u8],
    out: &mut [u8],
    ps: u64,
    i: u64,
    pos: u64,
) -> Result<(), FormatError> {
    let t = piece_table(h, payload, ps, i, pos)?;
    let mut at = t.layout.table_len();
    for k in 0..t.layout.count {
        let (len, crc) = t.entry(k);
        let (a, b) = t.layout.span(k);
        let frame = &payload[at..at + len as usize];
        let dst = &mut out[(a * ps) as usize..(b * ps) as usize];
        decode_piece(dec, frame, crc, k, dst, i, pos)?;
        at += len as usize;
    }
    Ok(())
}

/// The crc checks of a record raw in pieces, fed its pages in slices of any size as they are
/// read: every piece's crc when its last byte arrives, and at the end the record crc, combined
/// from the pieces' (the pages are read once for both).
#[derive(Debug, Default)]
pub(super) struct PieceCrcs {
    /// Per piece: stored length and crc, from the table.
    entries: Vec<(u32, u32)>,
    /// The piece being fed, and its bytes so far.
    k: usize,
    done: usize,
    piece: crc32fast::Hasher,
    /// The record header's first 24 bytes, the table and the pieces completed.
    record: crc32fast::Hasher,
}

impl PieceCrcs {
    /// Start on the pages of record `h`, whose checked table `t` has the bytes `table`.
    pub(super) fn start(&mut self, h: &RecordHeader, t: &PieceTable<'_>, table: &[u8]) {
        self.entries.clear();
        self.entries.extend((0..t.layout.count).map(|k| t.entry(k)));
        self.k = 0;
        self.done = 0;
        self.piece = crc32fast::Hasher::new();
        self.record = crc32fast::Hasher::new();
        self.record.update(&h.prefix());
        self.record.update(table);
    }

    /// The next bytes of the pages of the `i`-th record, at `pos`.
    pub(super) fn update(&mut self, mut s: &[u8], i: u64, pos: u64) -> Result<(), FormatError> {
        while !s.is_empty() {
            let Some(&(len, crc)) = self.entries.get(self.k) else {
                return Err(corrupt("record pieces overrun", Some(i), pos));
            };
            let n = (len as usize - self.done).min(s.len());
            self.piece.update(&s[..n]);
            self.done += n;
            s = &s[n..];
            if self.done == len as usize {
                let piece = std::mem::take(&mut self.piece);
                if piece.clone().finalize() != crc {
                    let what = format!("record piece {} checksum mismatch", self.k);
                    return Err(corrupt(what, Some(i), pos));
                }
                self.record.combine(&piece);
                self.k += 1;
                self.done = 0;
            }
        }
        Ok(())
    }

    /// All pages fed: the record crc of the `i`-th record `h`, at `pos`.
    pub(super) fn finish(&self, h: &RecordHeader, i: u64, pos: u64) -> Result<(), FormatError> {
        if self.k != self.entries.len() || self.record.clone().finalize() != h.crc {
            return Err(corrupt("record checksum mismatch", Some(i), pos));
        }
        Ok(())
    }
}

/// Check the pages of the `i`-th record, at `pos`, raw in pieces: `payload` is all of it
/// (table, then pages). Returns the table's length (the pages follow it).
pub(super) fn check_raw_pieces(
    pc: &mut PieceCrcs,
    h: &RecordHeader,
    payload: &[u8],
    ps: u64,
    i: u64,
    pos: u64,
) -> Result<usize, FormatError> {
    let t = piece_table(h, payload, ps, i, pos)?;
    let n = t.layout.table_len();
    pc.start(h, &t, &payload[..n]);
    pc.update(&payload[n..], i, pos)?;
    pc.finish(h, i, pos)?;
    Ok(n)
}

/// A bitmap over every guest page of the header's layout: proves "exactly once".
#[derive(Debug)]
pub(super) struct Coverage {
    /// (first page, page count, first bit) per region.
    regions: Vec<(u64, u64, u64)>,
    bits: Vec<u64>,
    total: u64,
}

impl Coverage {
    pub(super) fn new(h: &SnapshotHeader) -> Self {
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

    pub(super) fn mark(
        &mut self,
        first: u64,
        count: u64,
        record: Option<u64>,
    ) -> Result<(), FormatError> {
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

    pub(super) fn complete(&self) -> Result<(), FormatError> {
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
