//! [`RecordEncoder`]: guest pages into zero runs and (compressed) data records, each
//! checksummed, appended to an [`EncodedBatch`].

use std::io;

use crate::format::{
    encode_piece_table, Compression, IndexEntry, PieceLayout, RecordHeader, RecordKind, Totals,
    CODEC_RAW, CODEC_RAW_PIECES, CODEC_ZSTD, CODEC_ZSTD_PIECES, MAX_RECORD_RAW, PIECE_RAW,
    RECORD_HEADER_LEN,
};

/// Encoded records of one piece of guest memory, ready to be appended to a file.
#[derive(Debug, Default)]
pub struct EncodedBatch {
    /// Record headers and payloads, back to back.
    pub bytes: Vec<u8>,
    /// Index entries with `offset` relative to the start of `bytes`.
    pub entries: Vec<IndexEntry>,
    /// Totals of these records (`raw_bytes` is left to the writer, which knows the page size).
    pub totals: Totals,
}

impl EncodedBatch {
    /// Empty the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.entries.clear();
        self.totals = Totals::default();
    }
}

/// Splits page data into zero runs and data records, compressing and checksumming.
pub struct RecordEncoder {
    page_size: usize,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Bytes per piece of data records (zstd or raw in pieces), or `None`: one zstd frame or
    /// one raw payload per record.
    piece_raw: Option<u32>,
    /// Per piece: stored length and crc.
    pieces: Vec<(u32, u32)>,
    scratch: Vec<u8>,
    /// Marks the records it encodes hot.
    hot: bool,
}

impl std::fmt::Debug for RecordEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordEncoder")
            .field("page_size", &self.page_size)
            .field("zstd", &self.compressor.is_some())
            .finish()
    }
}

impl RecordEncoder {
    /// An encoder for `page_size` pages with `compression`.
    pub fn new(page_size: usize, compression: Compression) -> io::Result<Self> {
        let compressor = match compression {
            Compression::None => None,
            Compression::Zstd { level } => Some(zstd::bulk::Compressor::new(level)?),
        };
        Ok(RecordEncoder {
            page_size,
            compressor,
            piece_raw: Some(PIECE_RAW),
            pieces: Vec::new(),
            scratch: Vec::new(),
            hot: false,
        })
    }

    /// Data records in pieces of `bytes` of guest memory (a power of two, at least a page, at
    /// most [`MAX_RECORD_RAW`]): zstd in pieces, or raw in pieces for a raw record of two or
    /// more pieces; or no pieces (`None`): one zstd frame or one raw payload per record.
    /// Writers use [`PIECE_RAW`] unless told otherwise.
    pub fn with_piece_raw(mut self, bytes: Option<u32>) -> io::Result<Self> {
        if let Some(b) = bytes {
            if PieceLayout::new(0, 1, b, self.page_size as u64).is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("piece size {b} is not a power of two from a page to MAX_RECORD_RAW"),
                ));
            }
        }
        self.piece_raw = bytes;
        Ok(self)
    }

    /// Mark the records encoded from now on hot (or not): written out of order because the
    /// guest wrote their pages during the save.
    pub fn set_hot(&mut self, hot: bool) {
        self.hot = hot;
    }

    /// Append a zero run record of `count` pages starting at `first_page`.
    pub fn zero_run(&mut self, first_page: u64, count: u64, out: &mut EncodedBatch) {
        self.run_without_payload(RecordKind::ZeroRun, first_page, count, out);
    }

    /// Append a Parent record of `count` pages starting at `first_page`: pages whose content is
    /// the parent snapshot's (only a writer whose header has a parent reference accepts it).
    pub fn parent_run(&mut self, first_page: u64, count: u64, out: &mut EncodedBatch) {
        self.run_without_payload(RecordKind::Parent, first_page, count, out);
    }

    /// Records of `kind` without payload for `count` pages from `first_page`, as many as the
    /// page count field needs.
    fn run_without_payload(
        &mut self,
        kind: RecordKind,
        first_page: u64,
        count: u64,
        out: &mut EncodedBatch,
    ) {
        let mut first = first_page;
        let mut left = count;
        while left > 0 {
            let n = u32::try_from(left).unwrap_or(u32::MAX);
            let h = RecordHeader {
                kind,
                codec: CODEC_RAW,
                first_page: first,
                page_count: n,
                stored_len: 0,
                crc: 0,
            };
            push_record(h, &[], self.hot, out);
            first += u64::from(n);
            left -= u64::from(n);
        }
    }

    /// Append records for `data` (whole pages) starting at guest page `first_page`.
    pub fn encode(
        &mut self,
        first_page: u64,
        data: &[u8],
        out: &mut EncodedBatch,
    ) -> io::Result<()> {
        let ps = self.page_size;
        if !data.len().is_multiple_of(ps) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "data is not whole pages",
            ));
        }
        let max_pages = (MAX_RECORD_RAW as usize) / ps;
        let npages = data.len() / ps;
        let mut i = 0;
        while i < npages {
            let zero = is_zero(&data[i * ps..(i + 1) * ps]);
            let mut j = i + 1;
            while j < npages
                && (zero || j - i < max_pages)
                && is_zero(&data[j * ps..(j + 1) * ps]) == zero
            {
                j += 1;
            }
            let first = first_page + i as u64;
            if zero {
                self.zero_run(first, (j - i) as u64, out);
            } else {
                self.data_record(first, &data[i * ps..j * ps], out)?;
            }
            i = j;
        }
        Ok(())
    }

    fn data_record(&mut self, first: u64, raw: &[u8], out: &mut EncodedBatch) -> io::Result<()> {
        let page_count = (raw.len() / self.page_size) as u32;
        let mut h = RecordHeader {
            kind: RecordKind::Data,
            codec: CODEC_RAW,
            first_page: first,
            page_count,
            stored_len: 0,
            crc: 0,
        };
        if let Some(c) = &mut self.compressor {
            self.scratch.clear();
            match self.piece_raw {
                None => {
                    self.scratch
                        .reserve(zstd::zstd_safe::compress_bound(raw.len()));
                    c.compress_to_buffer(raw, &mut self.scratch)?;
                    h.codec = CODEC_ZSTD;
                }
                Some(piece_raw) => {
                    let ps = self.page_size as u64;
                    let (pieces, out) = (&mut self.pieces, &mut self.scratch);
                    compress_pieces(c, &mut h, piece_raw, raw, ps, pieces, out)?;
                }
            }
            if self.scratch.len() >= raw.len() {
                h.codec = CODEC_RAW;
            }
        }
        if h.codec == CODEC_RAW {
            if let Some(layout) = self.piece_raw.and_then(|p| {
                PieceLayout::new(first, page_count, p, self.page_size as u64)
                    .filter(|l| l.count >= 2)
                    .map(|l| (p, l))
            }) {
                let pieces = &mut self.pieces;
                push_raw_pieces(h, layout, raw, self.page_size as u64, pieces, self.hot, out);
                return Ok(());
            }
        }
        let payload: &[u8] = if h.codec == CODEC_RAW {
            raw
        } else {
            &self.scratch
        };
        h.stored_len = payload.len() as u32;
        push_record(h, payload, self.hot, out);
        Ok(())
    }
}

/// Append record `h` of `raw` (its pages) as raw in pieces of `layout`: the piece table, then
/// the pages. Every piece's crc is computed as it is copied, and the record crc combined from
/// them, so the pages are read once.
fn push_raw_pieces(
    mut h: RecordHeader,
    (piece_raw, layout): (u32, PieceLayout),
    raw: &[u8],
    ps: u64,
    pieces: &mut Vec<(u32, u32)>,
    hot: bool,
    out: &mut EncodedBatch,
) {
    let table = layout.table_len();
    h.codec = CODEC_RAW_PIECES;
    h.stored_len = (table + raw.len()) as u32;
    let at = out.bytes.len();
    out.bytes.extend_from_slice(&h.encode());
    out.bytes.resize(at + RECORD_HEADER_LEN + table, 0);
    out.bytes.reserve(raw.len());
    pieces.clear();
    let mut all = crc32fast::Hasher::new();
    for k in 0..layout.count {
        let (a, b) = layout.span(k);
        let src = &raw[(a * ps) as usize..(b * ps) as usize];
        let mut crc = crc32fast::Hasher::new();
        for chunk in src.chunks(CRC_COPY_CHUNK) {
            crc.update(chunk);
            out.bytes.extend_from_slice(chunk);
        }
        pieces.push((src.len() as u32, crc.clone().finalize()));
        all.combine(&crc);
    }
    let t = at + RECORD_HEADER_LEN;
    encode_piece_table(&h, &layout, piece_raw, pieces, &mut out.bytes[t..t + table]);
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h.prefix());
    crc.update(&out.bytes[t..t + table]);
    crc.combine(&all);
    h.crc = crc.finalize();
    debug_assert_eq!(h.crc, h.compute_crc(&out.bytes[t..]));
    out.bytes[at..at + RECORD_HEADER_LEN].copy_from_slice(&h.encode());
    account(&h, hot, at, out);
}

/// Compress `raw` (the pages of record `h`) into `out` as a piece table and one zstd frame per
/// piece of `piece_raw` bytes (see [`format`](crate::format)); sets `h.stored_len`. The table
/// is left out when the result is not smaller than `raw` (the record goes raw then).
fn compress_pieces(
    c: &mut zstd::bulk::Compressor<'static>,
    h: &mut RecordHeader,
    piece_raw: u32,
    raw: &[u8],
    ps: u64,
    pieces: &mut Vec<(u32, u32)>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let layout = PieceLayout::new(h.first_page, h.page_count, piece_raw, ps)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad piece size"))?;
    let table = layout.table_len();
    out.resize(table, 0);
    pieces.clear();
    for k in 0..layout.count {
        let (a, b) = layout.span(k);
        let src = &raw[(a * ps) as usize..(b * ps) as usize];
        let at = out.len();
        // Into the slice after what is there (a `Vec` buffer would be written from its start).
        out.resize(at + zstd::zstd_safe::compress_bound(src.len()), 0);
        let n = c.compress_to_buffer(src, &mut out[at..])?;
        out.truncate(at + n);
        let frame = &out[at..];
        pieces.push((frame.len() as u32, crc32fast::hash(frame)));
        if out.len() >= raw.len() {
            return Ok(());
        }
    }
    h.stored_len = out.len() as u32;
    h.codec = CODEC_ZSTD_PIECES;
    let (head, _) = out.split_at_mut(table);
    encode_piece_table(h, &layout, piece_raw, pieces, head);
    Ok(())
}

/// Bytes checksummed and then copied together, so the copy reads them from cache.
const CRC_COPY_CHUNK: usize = 64 << 10;

fn push_record(mut h: RecordHeader, payload: &[u8], hot: bool, out: &mut EncodedBatch) {
    let at = out.bytes.len();
    // One pass over the payload instead of two (checksum all, then copy all): a 2 MiB payload
    // no longer fits the cache by the time the copy would start.
    out.bytes.extend_from_slice(&h.encode());
    out.bytes.reserve(payload.len());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h.prefix());
    for chunk in payload.chunks(CRC_COPY_CHUNK) {
        crc.update(chunk);
        out.bytes.extend_from_slice(chunk);
    }
    h.crc = crc.finalize();
    debug_assert_eq!(h.crc, h.compute_crc(payload));
    out.bytes[at..at + RECORD_HEADER_LEN].copy_from_slice(&h.encode());
    account(&h, hot, at, out);
}

/// List record `h`, appended at `at` of the batch, in its index entries and totals.
fn account(h: &RecordHeader, hot: bool, at: usize, out: &mut EncodedBatch) {
    out.entries.push(IndexEntry {
        offset: at as u64,
        first_page: h.first_page,
        page_count: h.page_count,
        kind: h.kind,
        hot,
    });
    let t = &mut out.totals;
    let n = u64::from(h.page_count);
    t.pages += n;
    t.records += 1;
    t.stored_bytes += u64::from(h.stored_len);
    match h.kind {
        RecordKind::ZeroRun => t.zero_pages += n,
        RecordKind::Data => t.data_pages += n,
        RecordKind::Parent => t.parent_pages += n,
    }
}

/// True if every byte of `p` is zero.
pub(crate) fn is_zero(p: &[u8]) -> bool {
    let mut chunks = p.chunks_exact(64);
    // OR-folding fixed-size chunks vectorises; the early exit is per chunk.
    let all = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0);
    all && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
        assert!(is_zero(&[0u8; 7]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 1]));
    }

    #[test]
    fn encoder_splits_runs() {
        let mut e = RecordEncoder::new(4096, Compression::None).unwrap();
        let mut data = vec![0u8; 4096 * 5];
        data[4096 * 2] = 7; // pages: Z Z D Z Z
        let mut b = EncodedBatch::default();
        e.encode(10, &data, &mut b).unwrap();
        let kinds: Vec<_> = b
            .entries
            .iter()
            .map(|x| (x.kind, x.first_page, x.page_count))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (RecordKind::ZeroRun, 10, 2),
                (RecordKind::Data, 12, 1),
                (RecordKind::ZeroRun, 13, 2)
            ]
        );
        assert_eq!(b.totals.zero_pages, 4);
        assert_eq!(b.totals.data_pages, 1);
    }
}
