//! Opening a snapshot: magic and version, footer, trailer totals, header, machine state and
//! the trailer's index, each length bounded (by the format, then by the file) before it sizes a
//! buffer; then the trailer's totals must follow from its index.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use super::check::Checker;
use super::source::{Seq, Source};
use super::{corrupt, unreadable, SnapshotReader};
use crate::direct_io::Pread;
use crate::format::{
    decode_footer, state_corrupt, u32_at, FormatError, MachineStateHead, RecordKind,
    SnapshotHeader, Totals, Trailer, FOOTER_LEN, FORMAT_VERSION, HEADER_LEN_AT, HEADER_PREFIX_LEN,
    INDEX_ENTRY_LEN, MAGIC, MAX_HEADER_LEN, MIN_HEADER_LEN, OLDEST_FORMAT_VERSION,
    RECORD_HEADER_LEN, STATE_HEAD_LEN, TRAILER_FIXED_LEN, TRAILER_HEAD_LEN, TRAILER_RECORDS_AT,
    VERSION_AT,
};

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
    version: u32,
) -> Result<(Trailer, u32), FormatError> {
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
            index.push(Trailer::decode_entry(e, index.len() as u64, at, version)?);
        }
        pos += chunk.len() as u64;
    }
    let mut c = [0u8; 4];
    src.read_exact_at(&mut c, pos)?;
    let trailer_crc = u32::from_le_bytes(c);
    if crc.finalize() != trailer_crc {
        return Err(corrupt("trailer: checksum mismatch", None, pos));
    }
    Ok((Trailer { totals, index }, trailer_crc))
}

/// Read the machine state section at `at` (right after the header), whose blob must end by
/// `trailer_offset`: framing first, then the blob it sizes, then its crc.
fn read_machine_state(
    src: &mut dyn Source,
    at: u64,
    trailer_offset: u64,
) -> Result<Vec<u8>, FormatError> {
    if at + STATE_HEAD_LEN as u64 > trailer_offset {
        return Err(state_corrupt("missing", at));
    }
    let mut b = [0u8; STATE_HEAD_LEN];
    src.read_exact_at(&mut b, at)?;
    let head = MachineStateHead::decode(&b, at, trailer_offset)?;
    let mut blob = vec![0u8; head.len as usize];
    src.read_exact_at(&mut blob, at + STATE_HEAD_LEN as u64)?;
    head.check(&blob, at)?;
    Ok(blob)
}

impl<R: Read + Seek> SnapshotReader<R> {
    /// Read and check everything but the records (see the crate docs of
    /// [`format`](crate::format) for the bounds enforced).
    pub(super) fn check(mut r: R, file: Option<File>) -> Result<Self, FormatError> {
        let file_len = r.seek(SeekFrom::End(0)).map_err(unreadable)?;
        let mut cur = None;
        let mut src = Seq {
            r: &mut r,
            cur: &mut cur,
        };
        // Magic and version first, so that a foreign file is named as such.
        let mut fixed = [0u8; HEADER_PREFIX_LEN];
        let n = (file_len.min(HEADER_PREFIX_LEN as u64)) as usize;
        src.read_exact_at(&mut fixed[..n], 0)?;
        if n < MAGIC.len() {
            return if fixed[..n] == MAGIC[..n] {
                Err(FormatError::Incomplete {
                    reason: format!("file is only {file_len} bytes"),
                })
            } else {
                Err(FormatError::NotASnapshot)
            };
        }
        if fixed[..MAGIC.len()] != MAGIC {
            return Err(FormatError::NotASnapshot);
        }
        if n < HEADER_PREFIX_LEN {
            return Err(FormatError::Incomplete {
                reason: format!("file is only {file_len} bytes"),
            });
        }
        let version = u32_at(&fixed, VERSION_AT);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        // Footer and trailer next: a file that never finished is refused before anything else.
        if file_len < (HEADER_PREFIX_LEN + FOOTER_LEN + TRAILER_FIXED_LEN) as u64 {
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

        let header_len = u32_at(&fixed, HEADER_LEN_AT);
        let in_range = (MIN_HEADER_LEN..=MAX_HEADER_LEN).contains(&header_len);
        if !in_range || u64::from(header_len) > trailer_offset {
            let at = HEADER_LEN_AT as u64;
            return Err(corrupt("header: length out of range", None, at));
        }
        let mut hbuf = vec![0u8; header_len as usize];
        src.read_exact_at(&mut hbuf, 0)?;
        let header = SnapshotHeader::decode(&hbuf)?;
        drop(hbuf);

        let st_at = u64::from(header_len);
        let machine_state = read_machine_state(&mut src, st_at, trailer_offset)?;
        let records_start = st_at + STATE_HEAD_LEN as u64 + machine_state.len() as u64;
        let room = trailer_offset - records_start;
        if totals.records > header.total_pages() || totals.records > room / RECORD_HEADER_LEN as u64
        {
            return Err(corrupt(
                "trailer: record count out of range",
                None,
                trailer_offset + TRAILER_RECORDS_AT,
            ));
        }
        let (trailer, trailer_crc) = read_index(&mut src, &thead, totals, trailer_offset, version)?;
        let mut rd = SnapshotReader {
            r,
            cur,
            file,
            direct: None,
            file_len,
            version,
            header,
            machine_state,
            records_start,
            trailer_offset,
            trailer,
            trailer_crc,
        };
        // The totals are what `load_into` returns and what tools print: they must follow from
        // the (checksummed) index, or the trailer is not a valid trailer.
        if rd.index_totals() != Some(rd.trailer.totals) {
            return Err(rd.diagnose_totals());
        }
        if rd.header.parent.is_none() && rd.trailer.totals.parent_pages > 0 {
            let i = rd
                .trailer
                .index
                .iter()
                .position(|e| e.kind == RecordKind::Parent);
            let at = i.map_or(trailer_offset, |i| rd.trailer.index[i].offset);
            return Err(corrupt(
                "parent record in a file without a parent reference",
                i.map(|i| i as u64),
                at,
            ));
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
                RecordKind::Parent => t.parent_pages += n,
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
            self.version,
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
}
