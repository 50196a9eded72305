//! Reading snapshot files: open (footer and trailer first), iterate records, verify, load.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::format::{
    decode_footer, u32_at, u64_at, FormatError, RecordHeader, RecordKind, SnapshotHeader, Totals,
    Trailer, CODEC_RAW, FOOTER_LEN, FORMAT_VERSION, MAGIC, MAX_HEADER_LEN, MAX_RECORD_RAW,
    RECORD_HEADER_LEN, STATE_TAG, TRAILER_FIXED_LEN,
};
use crate::pagemap::Pagemap;
use crate::writer::is_zero;

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

/// A snapshot file opened for reading. Opening checks magic, version, footer, trailer, header
/// and machine state; records are checked as they are read.
#[derive(Debug)]
pub struct SnapshotReader<R> {
    r: R,
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

impl SnapshotReader<BufReader<File>> {
    /// Open and check the snapshot file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FormatError> {
        let f = File::open(path).map_err(unreadable)?;
        Self::from_reader(BufReader::with_capacity(1 << 20, f))
    }
}

impl<R: Read + Seek> SnapshotReader<R> {
    /// Check a snapshot readable from `r` (any `Read + Seek`).
    pub fn from_reader(mut r: R) -> Result<Self, FormatError> {
        let file_len = r.seek(SeekFrom::End(0)).map_err(unreadable)?;
        // Magic and version first, so that a foreign file is named as such.
        let mut fixed = [0u8; 16];
        let n = (file_len.min(16)) as usize;
        read_at(&mut r, 0, &mut fixed[..n])?;
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
        read_at(&mut r, file_len - FOOTER_LEN as u64, &mut footer)?;
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
        let mut tbuf = vec![0u8; trailer_len as usize];
        read_at(&mut r, trailer_offset, &mut tbuf)?;
        let trailer = Trailer::decode(&tbuf, trailer_offset)?;
        drop(tbuf);

        let header_len = u32_at(&fixed, 12);
        if !(56..=MAX_HEADER_LEN).contains(&header_len) || u64::from(header_len) > trailer_offset {
            return Err(corrupt("header: length out of range", None, 12));
        }
        let mut hbuf = vec![0u8; header_len as usize];
        read_at(&mut r, 0, &mut hbuf)?;
        let header = SnapshotHeader::decode(&hbuf)?;

        let st_at = u64::from(header_len);
        let mut st = [0u8; 16];
        if st_at + 16 > trailer_offset {
            return Err(corrupt("machine state: missing", None, st_at));
        }
        read_at(&mut r, st_at, &mut st)?;
        if st[0..4] != STATE_TAG {
            return Err(corrupt("machine state: bad tag", None, st_at));
        }
        let st_len = u64_at(&st, 4);
        if st_len > trailer_offset - st_at - 16 {
            return Err(corrupt(
                "machine state: length out of range",
                None,
                st_at + 4,
            ));
        }
        let mut machine_state = vec![0u8; st_len as usize];
        read_at(&mut r, st_at + 16, &mut machine_state)?;
        if crc32fast::hash(&machine_state) != u32_at(&st, 12) {
            return Err(corrupt(
                "machine state: checksum mismatch",
                None,
                st_at + 12,
            ));
        }
        let records_start = st_at + 16 + st_len;
        r.seek(SeekFrom::Start(records_start)).map_err(unreadable)?;
        Ok(SnapshotReader {
            r,
            file_len,
            header,
            machine_state,
            records_start,
            trailer_offset,
            trailer,
        })
    }

    /// The header.
    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// The machine state blob captured at the freeze instant (checksum already verified).
    pub fn machine_state(&self) -> &[u8] {
        &self.machine_state
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
        let end = self.trailer_offset;
        let entry = *self
            .trailer
            .index
            .get(i as usize)
            .ok_or_else(|| corrupt("record not listed in trailer index", Some(i), pos))?;
        if pos + RECORD_HEADER_LEN as u64 > end {
            return Err(corrupt("record header runs into trailer", Some(i), pos));
        }
        let mut hb = [0u8; RECORD_HEADER_LEN];
        read_at(&mut self.r, pos, &mut hb)?;
        let h =
            RecordHeader::decode(&hb).ok_or_else(|| corrupt("bad record header", Some(i), pos))?;
        if u64::from(h.stored_len) > end - pos - RECORD_HEADER_LEN as u64 {
            return Err(corrupt("record payload runs into trailer", Some(i), pos));
        }
        let ps = u64::from(self.header.page_size);
        let raw = u64::from(h.page_count) * ps;
        let bad_len = match h.kind {
            RecordKind::ZeroRun => h.stored_len != 0,
            RecordKind::Data => {
                raw > MAX_RECORD_RAW
                    || (h.codec == CODEC_RAW && u64::from(h.stored_len) != raw)
                    || h.stored_len == 0
            }
        };
        if h.page_count == 0 || bad_len {
            return Err(corrupt("record length fields invalid", Some(i), pos));
        }
        payload.clear();
        payload.resize(h.stored_len as usize, 0);
        self.r.read_exact(payload).map_err(unreadable)?;
        if h.compute_crc(payload) != h.crc {
            return Err(corrupt("record checksum mismatch", Some(i), pos));
        }
        if entry.offset != pos
            || entry.first_page != h.first_page
            || entry.page_count != h.page_count
            || entry.kind != h.kind
        {
            return Err(corrupt("record disagrees with trailer index", Some(i), pos));
        }
        Ok(h)
    }

    /// Check everything: structure, every checksum (decompressing), that every guest page
    /// appears exactly once, and that the trailer's index and totals agree with the records.
    pub fn verify(
        &mut self,
        progress: &mut dyn FnMut(&ReadProgress),
    ) -> Result<VerifyReport, FormatError> {
        let mut cover = Coverage::new(&self.header);
        let mut totals = Totals::default();
        let mut prog = ReadProgress {
            total_records: self.trailer.totals.records,
            total_pages: self.trailer.totals.pages,
            ..Default::default()
        };
        let mut pos = self.records_start;
        let mut i: u64 = 0;
        let mut payload = Vec::new();
        let mut out = Vec::new();
        let mut dec = zstd::bulk::Decompressor::new().map_err(unreadable)?;
        let ps = u64::from(self.header.page_size);
        while pos < self.trailer_offset {
            let h = self.read_raw(pos, i, &mut payload)?;
            if h.kind == RecordKind::Data && h.codec != CODEC_RAW {
                decompress(&mut dec, &h, &payload, &mut out, ps, i, pos)?;
            }
            cover.mark(h.first_page, u64::from(h.page_count), Some(i))?;
            let n = u64::from(h.page_count);
            totals.pages += n;
            totals.records += 1;
            totals.stored_bytes += u64::from(h.stored_len);
            match h.kind {
                RecordKind::ZeroRun => totals.zero_pages += n,
                RecordKind::Data => {
                    totals.data_pages += n;
                    totals.raw_bytes += n * ps;
                }
            }
            pos += (RECORD_HEADER_LEN as u64) + u64::from(h.stored_len);
            i += 1;
            prog.records = i;
            prog.pages = totals.pages;
            if i.is_multiple_of(256) {
                progress(&prog);
            }
        }
        if i != self.trailer.index.len() as u64 {
            return Err(corrupt(
                format!(
                    "trailer index lists {} records, file holds {i}",
                    self.trailer.index.len()
                ),
                None,
                self.trailer_offset,
            ));
        }
        if totals != self.trailer.totals {
            return Err(corrupt(
                "trailer totals disagree with records",
                None,
                self.trailer_offset,
            ));
        }
        cover.complete()?;
        progress(&prog);
        Ok(VerifyReport {
            totals,
            guest_pages: self.header.total_pages(),
            file_bytes: self.file_len,
            machine_state_bytes: self.machine_state.len() as u64,
        })
    }

    /// Restore RAM into `mem` eagerly, verifying checksums on the way, decompressing on all
    /// cores. The layout must match the header. Coverage is proved from the (checksummed)
    /// index before memory is touched; incomplete files were already refused by `open`.
    /// Zero runs only write pages that are not already zero (fresh memory stays unpopulated).
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

        let ps = u64::from(self.header.page_size);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let failed = AtomicBool::new(false);
        let first_err: Mutex<Option<(u64, FormatError)>> = Mutex::new(None);
        let pages_done = AtomicU64::new(0);
        let fail = |i: u64, e: FormatError| {
            failed.store(true, Ordering::Relaxed);
            let mut g = first_err.lock().unwrap_or_else(|p| p.into_inner());
            if g.as_ref().is_none_or(|(j, _)| i < *j) {
                *g = Some((i, e));
            }
        };
        let (tx, rx) = sync_channel::<(u64, u64, RecordHeader, Vec<u8>)>(workers * 2);
        let rx = Arc::new(Mutex::new(rx));
        let pagemap = Pagemap::open();
        let mut prog = ReadProgress {
            total_records: self.trailer.totals.records,
            total_pages: self.trailer.totals.pages,
            ..Default::default()
        };
        std::thread::scope(|s| {
            for _ in 0..workers {
                let rx = Arc::clone(&rx);
                let (fail, pages_done, pagemap) = (&fail, &pages_done, &pagemap);
                s.spawn(move || {
                    let mut dec = match zstd::bulk::Decompressor::new() {
                        Ok(d) => d,
                        Err(e) => return fail(0, unreadable(e)),
                    };
                    let mut out = Vec::new();
                    loop {
                        let msg = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((i, pos, h, payload)) = msg else {
                            return;
                        };
                        let r = place_record(
                            mem, pagemap, &mut dec, &h, &payload, &mut out, ps, i, pos,
                        );
                        match r {
                            Ok(()) => {
                                pages_done.fetch_add(u64::from(h.page_count), Ordering::Relaxed);
                            }
                            Err(e) => fail(i, e),
                        }
                    }
                });
            }
            let mut pos = self.records_start;
            let mut i = 0u64;
            while pos < self.trailer_offset && !failed.load(Ordering::Relaxed) {
                let mut payload = Vec::new();
                match self.read_raw(pos, i, &mut payload) {
                    Ok(h) => {
                        let next = pos + RECORD_HEADER_LEN as u64 + u64::from(h.stored_len);
                        if tx.send((i, pos, h, payload)).is_err() {
                            break;
                        }
                        pos = next;
                        i += 1;
                    }
                    Err(e) => {
                        fail(i, e);
                        break;
                    }
                }
                if i.is_multiple_of(256) {
                    prog.records = i;
                    prog.pages = pages_done.load(Ordering::Relaxed);
                    progress(&prog);
                }
            }
            drop(tx);
            if !failed.load(Ordering::Relaxed) && i != self.trailer.index.len() as u64 {
                fail(
                    i,
                    corrupt(
                        "trailer index lists more records than the file holds",
                        None,
                        pos,
                    ),
                );
            }
            prog.records = i;
        });
        if let Some((_, e)) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        prog.pages = pages_done.load(Ordering::Relaxed);
        progress(&prog);
        Ok(self.trailer.totals)
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

#[allow(clippy::too_many_arguments)]
fn place_record(
    mem: &GuestMemoryMmap,
    pagemap: &Pagemap,
    dec: &mut zstd::bulk::Decompressor<'static>,
    h: &RecordHeader,
    payload: &[u8],
    out: &mut Vec<u8>,
    ps: u64,
    i: u64,
    pos: u64,
) -> Result<(), FormatError> {
    let gpa = GuestAddress(h.first_page * ps);
    let mem_err = |e: vm_memory::GuestMemoryError| FormatError::LayoutMismatch {
        what: format!("record {i} at {:#x}: {e}", gpa.0),
    };
    match h.kind {
        RecordKind::Data => {
            let data: &[u8] = if h.codec == CODEC_RAW {
                payload
            } else {
                decompress(dec, h, payload, out, ps, i, pos)?;
                out
            };
            mem.write_slice(data, gpa).map_err(mem_err)?;
        }
        RecordKind::ZeroRun => {
            let len = u64::from(h.page_count) * ps;
            let host = mem.get_host_address(gpa).map_err(mem_err)? as usize;
            if !pagemap.may_have_data(host, len as usize) {
                return Ok(());
            }
            let mut page = vec![0u8; ps as usize];
            for p in 0..u64::from(h.page_count) {
                let at = GuestAddress(gpa.0 + p * ps);
                mem.read_slice(&mut page, at).map_err(mem_err)?;
                if !is_zero(&page) {
                    page.fill(0);
                    mem.write_slice(&page, at).map_err(mem_err)?;
                }
            }
        }
    }
    Ok(())
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

fn read_at<R: Read + Seek>(r: &mut R, pos: u64, buf: &mut [u8]) -> Result<(), FormatError> {
    r.seek(SeekFrom::Start(pos)).map_err(unreadable)?;
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FormatError::Incomplete {
                reason: format!("file ends before offset {}", pos + buf.len() as u64),
            }
        } else {
            unreadable(e)
        }
    })
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
