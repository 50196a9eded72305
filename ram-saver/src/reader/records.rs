//! Sequential reading: [`Records`] iterates the records in file order, each checked and
//! decompressed.

use std::io::{Read, Seek};

use super::check::{decompress, Checker};
use super::source::{Seq, Source};
use super::{corrupt, unreadable, SnapshotReader};
use crate::format::{FormatError, RecordHeader, RecordKind, CODEC_RAW, RECORD_HEADER_LEN};

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
