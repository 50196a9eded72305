//! Writing snapshot files: output sinks (atomic file, stream) and the record writer.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::format::{
    encode_footer, put_u32, put_u64, Compression, FormatError, IndexEntry, RecordHeader,
    RecordKind, SnapshotHeader, Totals, Trailer, CODEC_RAW, CODEC_ZSTD, MAX_RECORD_RAW, STATE_TAG,
};

/// Large writes: records arrive in block-sized pieces anyway.
const WRITE_BUFFER: usize = 4 << 20;

/// Where a snapshot goes. Bytes are written in order; `finish` makes them durable and visible.
///
/// Dropping a sink without `finish` must leave nothing under the user's name.
pub trait SnapshotSink: Write {
    /// Flush and commit the output (fsync + rename for files).
    fn finish(self) -> io::Result<()>;
}

/// A file written under a temporary name beside the target and renamed on `finish`.
///
/// The temporary `.<name>.tmp-<pid>` is removed on drop unless `finish` succeeded.
#[derive(Debug)]
pub struct AtomicFileSink {
    file: Option<BufWriter<File>>,
    tmp: PathBuf,
    target: PathBuf,
    replace: bool,
}

impl AtomicFileSink {
    /// Create the temporary file beside `target`; `finish` refuses to replace a file that appeared
    /// at `target` meanwhile (the commit is a hard link, which fails with `AlreadyExists`).
    pub fn create_new(target: impl AsRef<Path>) -> io::Result<Self> {
        let mut s = Self::create(target)?;
        s.replace = false;
        Ok(s)
    }

    /// Create the temporary file beside `target`; `finish` replaces `target` if it exists.
    pub fn create(target: impl AsRef<Path>) -> io::Result<Self> {
        let target = target.as_ref().to_path_buf();
        let name = target.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "target has no file name")
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = target.with_file_name(tmp_name);
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        Ok(AtomicFileSink {
            file: Some(BufWriter::with_capacity(WRITE_BUFFER, file)),
            tmp,
            target,
            replace: true,
        })
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }
}

impl Write for AtomicFileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(buf),
            None => Err(io::Error::other("sink already finished")),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.write_all(buf),
            None => Err(io::Error::other("sink already finished")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl SnapshotSink for AtomicFileSink {
    fn finish(mut self) -> io::Result<()> {
        let writer = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("sink already finished"))?;
        let file = writer.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        if self.replace {
            fs::rename(&self.tmp, &self.target)?;
        } else {
            // link(2) never replaces: a file created at the target during the save is kept.
            match fs::hard_link(&self.tmp, &self.target) {
                Ok(()) => fs::remove_file(&self.tmp)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
                // File systems without hard links: check, then rename (a small window remains).
                Err(_) if !self.target.exists() => fs::rename(&self.tmp, &self.target)?,
                Err(e) => return Err(e),
            }
        }
        // The rename is durable only once the directory is synced.
        let dir = match self.target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(dir)?.sync_all()?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

impl Drop for AtomicFileSink {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            drop(self.file.take());
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A stream sink (stdout, a pipe, a socket, a `Vec<u8>`); `finish` only flushes.
#[derive(Debug)]
pub struct StreamSink<W: Write>(pub BufWriter<W>);

impl<W: Write> StreamSink<W> {
    /// Wrap `w` with a large write buffer.
    pub fn new(w: W) -> Self {
        StreamSink(BufWriter::with_capacity(WRITE_BUFFER, w))
    }
}

impl<W: Write> Write for StreamSink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> SnapshotSink for StreamSink<W> {
    fn finish(mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// In-memory output, mostly for tests.
impl SnapshotSink for &mut Vec<u8> {
    fn finish(self) -> io::Result<()> {
        Ok(())
    }
}

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
    scratch: Vec<u8>,
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
            scratch: Vec::new(),
        })
    }

    /// Append a zero run record of `count` pages starting at `first_page`.
    pub fn zero_run(&mut self, first_page: u64, count: u64, out: &mut EncodedBatch) {
        let mut first = first_page;
        let mut left = count;
        while left > 0 {
            let n = u32::try_from(left).unwrap_or(u32::MAX);
            let h = RecordHeader {
                kind: RecordKind::ZeroRun,
                codec: CODEC_RAW,
                first_page: first,
                page_count: n,
                stored_len: 0,
                crc: 0,
            };
            push_record(h, &[], out);
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
        let mut codec = CODEC_RAW;
        if let Some(c) = &mut self.compressor {
            self.scratch.clear();
            self.scratch
                .reserve(zstd::zstd_safe::compress_bound(raw.len()));
            c.compress_to_buffer(raw, &mut self.scratch)?;
            if self.scratch.len() < raw.len() {
                codec = CODEC_ZSTD;
            }
        }
        let payload: &[u8] = if codec == CODEC_ZSTD {
            &self.scratch
        } else {
            raw
        };
        let h = RecordHeader {
            kind: RecordKind::Data,
            codec,
            first_page: first,
            page_count,
            stored_len: payload.len() as u32,
            crc: 0,
        };
        push_record(h, payload, out);
        Ok(())
    }
}

fn push_record(mut h: RecordHeader, payload: &[u8], out: &mut EncodedBatch) {
    h.crc = h.compute_crc(payload);
    out.entries.push(IndexEntry {
        offset: out.bytes.len() as u64,
        first_page: h.first_page,
        page_count: h.page_count,
        kind: h.kind,
    });
    out.bytes.extend_from_slice(&h.encode());
    out.bytes.extend_from_slice(payload);
    let t = &mut out.totals;
    let n = u64::from(h.page_count);
    t.pages += n;
    t.records += 1;
    t.stored_bytes += payload.len() as u64;
    match h.kind {
        RecordKind::ZeroRun => t.zero_pages += n,
        RecordKind::Data => t.data_pages += n,
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

/// Writes a snapshot file: header and machine state first, then records, then trailer + footer.
#[derive(Debug)]
pub struct SnapshotWriter<S: SnapshotSink> {
    sink: S,
    pos: u64,
    page_size: u64,
    index: Vec<IndexEntry>,
    totals: Totals,
    encoder: RecordEncoder,
    batch: EncodedBatch,
}

impl<S: SnapshotSink> SnapshotWriter<S> {
    /// Write the header and the machine state to `sink`.
    pub fn new(
        mut sink: S,
        header: &SnapshotHeader,
        machine_state: &[u8],
    ) -> Result<Self, FormatError> {
        let h = header.encode();
        let mut st = Vec::with_capacity(16);
        st.extend_from_slice(&STATE_TAG);
        put_u64(&mut st, machine_state.len() as u64);
        put_u32(&mut st, crc32fast::hash(machine_state));
        sink.write_all(&h).map_err(FormatError::Unwritable)?;
        sink.write_all(&st).map_err(FormatError::Unwritable)?;
        sink.write_all(machine_state)
            .map_err(FormatError::Unwritable)?;
        let encoder = RecordEncoder::new(header.page_size as usize, header.compression)
            .map_err(FormatError::Unwritable)?;
        Ok(SnapshotWriter {
            sink,
            pos: (h.len() + st.len() + machine_state.len()) as u64,
            page_size: u64::from(header.page_size),
            index: Vec::new(),
            totals: Totals::default(),
            encoder,
            batch: EncodedBatch::default(),
        })
    }

    /// Append records already encoded by a [`RecordEncoder`].
    pub fn write_batch(&mut self, batch: &EncodedBatch) -> Result<(), FormatError> {
        self.sink
            .write_all(&batch.bytes)
            .map_err(FormatError::Unwritable)?;
        for e in &batch.entries {
            self.index.push(IndexEntry {
                offset: self.pos + e.offset,
                ..*e
            });
        }
        self.pos += batch.bytes.len() as u64;
        let (t, b) = (&mut self.totals, &batch.totals);
        t.pages += b.pages;
        t.zero_pages += b.zero_pages;
        t.data_pages += b.data_pages;
        t.records += b.records;
        t.stored_bytes += b.stored_bytes;
        t.raw_bytes += b.data_pages * self.page_size;
        Ok(())
    }

    /// Encode and append `data` (whole pages) at guest page `first_page`.
    pub fn write_pages(&mut self, first_page: u64, data: &[u8]) -> Result<(), FormatError> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        self.encoder
            .encode(first_page, data, &mut batch)
            .map_err(FormatError::Unwritable)?;
        let r = self.write_batch(&batch);
        self.batch = batch;
        r
    }

    /// Append a zero run of `count` pages at `first_page`.
    pub fn write_zero_run(&mut self, first_page: u64, count: u64) -> Result<(), FormatError> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        self.encoder.zero_run(first_page, count, &mut batch);
        let r = self.write_batch(&batch);
        self.batch = batch;
        r
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.pos
    }

    /// Totals of the records written so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Write trailer and footer, then commit the sink. Returns the file size.
    pub fn finish(mut self) -> Result<u64, FormatError> {
        let trailer = Trailer {
            totals: self.totals,
            index: std::mem::take(&mut self.index),
        }
        .encode();
        let footer = encode_footer(self.pos, trailer.len() as u64);
        self.sink
            .write_all(&trailer)
            .map_err(FormatError::Unwritable)?;
        self.sink
            .write_all(&footer)
            .map_err(FormatError::Unwritable)?;
        self.sink.finish().map_err(FormatError::Unwritable)?;
        Ok(self.pos + (trailer.len() + footer.len()) as u64)
    }
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

    #[test]
    fn atomic_sink_removes_temp_on_drop() {
        let dir = std::env::temp_dir().join(format!("ram-saver-sink-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("x.snap");
        let mut s = AtomicFileSink::create(&target).unwrap();
        s.write_all(b"partial").unwrap();
        let tmp = s.temp_path().to_path_buf();
        assert!(tmp.exists());
        drop(s);
        assert!(!tmp.exists());
        assert!(!target.exists());
        let mut s = AtomicFileSink::create(&target).unwrap();
        s.write_all(b"whole").unwrap();
        s.finish().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"whole");
        fs::remove_dir_all(&dir).unwrap();
    }
}
