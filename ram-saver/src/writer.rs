//! Writing snapshot files: output sinks (atomic file, stream) and the record writer.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::format::{
    encode_footer, put_u32, put_u64, Compression, FormatError, IndexEntry, RecordHeader,
    RecordKind, SnapshotHeader, Totals, Trailer, CODEC_RAW, CODEC_ZSTD, MAX_RECORD_RAW,
    RECORD_HEADER_LEN, STATE_TAG,
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
///
/// Data goes to the disk with direct I/O (`O_DIRECT`) where the file system takes it: see
/// [`DirectWriter`]. Elsewhere (tmpfs on older kernels, some network file systems) it falls back
/// to buffered writes through the page cache.
#[derive(Debug)]
pub struct AtomicFileSink {
    out: Option<FileOut>,
    tmp: PathBuf,
    target: PathBuf,
    replace: bool,
}

#[derive(Debug)]
enum FileOut {
    Direct(DirectWriter),
    Buffered(BufWriter<File>),
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
        Self::create_with(target, true)
    }

    /// Like [`create`](Self::create), but always through the page cache (no direct I/O).
    pub fn create_buffered(target: impl AsRef<Path>) -> io::Result<Self> {
        Self::create_with(target, false)
    }

    fn create_with(target: impl AsRef<Path>, direct: bool) -> io::Result<Self> {
        let target = target.as_ref().to_path_buf();
        let name = target.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "target has no file name")
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = target.with_file_name(tmp_name);
        let open = |flags: i32| {
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(flags)
                .open(&tmp)
        };
        let out = if direct {
            match open(OFlag::O_DIRECT.bits()) {
                Ok(f) => FileOut::Direct(DirectWriter::new(f)?),
                // EINVAL: this file system does not do O_DIRECT.
                Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                    FileOut::Buffered(BufWriter::with_capacity(WRITE_BUFFER, open(0)?))
                }
                Err(e) => return Err(e),
            }
        } else {
            FileOut::Buffered(BufWriter::with_capacity(WRITE_BUFFER, open(0)?))
        };
        Ok(AtomicFileSink {
            out: Some(out),
            tmp,
            target,
            replace: true,
        })
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Whether data goes out with direct I/O (false: through the page cache).
    pub fn is_direct(&self) -> bool {
        matches!(self.out, Some(FileOut::Direct(_)))
    }

    fn out(&mut self) -> io::Result<&mut dyn Write> {
        match &mut self.out {
            Some(FileOut::Direct(d)) => Ok(d),
            Some(FileOut::Buffered(b)) => Ok(b),
            None => Err(io::Error::other("sink already finished")),
        }
    }
}

impl Write for AtomicFileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out()?.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out()?.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(FileOut::Buffered(b)) => b.flush(),
            // Direct output is flushed (padded to a block) only by `finish`.
            _ => Ok(()),
        }
    }
}

impl SnapshotSink for AtomicFileSink {
    fn finish(mut self) -> io::Result<()> {
        let file = match self.out.take() {
            Some(FileOut::Direct(d)) => d.finish()?,
            Some(FileOut::Buffered(b)) => b.into_inner().map_err(|e| e.into_error())?,
            None => return Err(io::Error::other("sink already finished")),
        };
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
            // Dropping a DirectWriter joins its I/O thread: nothing writes once the file is gone.
            drop(self.out.take());
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Alignment of direct I/O buffers, file offsets and lengths (covers 512 and 4096-byte sectors).
pub(crate) const DIRECT_ALIGN: usize = 4096;
/// Size of one direct write.
const DIRECT_CHUNK: usize = 8 << 20;
/// Buffers in flight or being filled (one filling, the rest queued for or in the I/O thread).
const DIRECT_BUFFERS: usize = 3;

/// A buffer of `cap` bytes starting at a [`DIRECT_ALIGN`]-aligned address (for `O_DIRECT`
/// reads and writes), of which the first `len` are in use.
#[derive(Default)]
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    cap: usize,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(cap: usize) -> Self {
        let raw = vec![0u8; cap + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf {
            raw,
            start,
            cap,
            len: 0,
        }
    }
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }
    /// The whole aligned buffer.
    pub(crate) fn all_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.cap]
    }
    fn data(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
    fn spare(&mut self) -> &mut [u8] {
        &mut self.raw[self.start + self.len..self.start + self.cap]
    }
}

/// Direct-I/O output: the writing thread copies records into aligned 8 MiB buffers; a separate
/// I/O thread writes full buffers with `O_DIRECT` while the next one fills (up to
/// [`DIRECT_BUFFERS`] allocated, so memory stays bounded and a slow disk pushes back).
///
/// Why: through the page cache, the kernel's copy into page-cache pages took about half of a
/// 2-core machine during a 4 GiB save (`perf record -a`: 49 % of all samples in
/// `copy_folio_from_iter_atomic`, 0.5 GB/s), CPU the guest and the fault thread need. Direct writes
/// skip that copy and the page cache; the disk takes 8 MiB `O_DIRECT` writes at 1.6–1.9 GB/s
/// here (`dd oflag=direct`), more than buffered write + fsync (1.5 GB/s at best, 0.4 GB/s at
/// worst).
///
/// The end of the file is padded to a block for the last direct write and cut back with
/// `ftruncate`. Should the file system refuse a direct write (`EINVAL`), the I/O thread clears
/// `O_DIRECT` and goes on with buffered writes (offsets so far are all aligned, so nothing is lost).
struct DirectWriter {
    cur: AlignedBuf,
    /// Bytes accepted so far (the file's final length).
    total: u64,
    to_io: Option<mpsc::SyncSender<AlignedBuf>>,
    from_io: mpsc::Receiver<AlignedBuf>,
    allocated: usize,
    io: Option<thread::JoinHandle<io::Result<File>>>,
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectWriter")
            .field("total", &self.total)
            .field("allocated", &self.allocated)
            .finish_non_exhaustive()
    }
}

impl DirectWriter {
    fn new(file: File) -> io::Result<Self> {
        let (to_io, rx) = mpsc::sync_channel::<AlignedBuf>(DIRECT_BUFFERS);
        let (back, from_io) = mpsc::sync_channel::<AlignedBuf>(DIRECT_BUFFERS);
        let io = thread::Builder::new()
            .name("saver-io".into())
            .spawn(move || {
                let mut file = file;
                for mut buf in rx {
                    direct_write_all(&mut file, buf.data())?;
                    buf.len = 0;
                    // The writer may be gone (drop): then the buffer is just freed.
                    let _ = back.send(buf);
                }
                Ok(file)
            })?;
        Ok(DirectWriter {
            cur: AlignedBuf::new(DIRECT_CHUNK),
            total: 0,
            to_io: Some(to_io),
            from_io,
            allocated: 1,
            io: Some(io),
        })
    }

    /// Let the I/O thread finish what it was given and take back the file (or its error).
    fn join_io(&mut self) -> io::Result<File> {
        self.to_io = None;
        match self.io.take().map(|h| h.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("snapshot I/O thread panicked")),
            None => Err(io::Error::other("snapshot I/O thread already stopped")),
        }
    }

    /// Why the I/O thread stopped early (it only does on an error).
    fn stopped_error(&mut self) -> io::Error {
        match self.join_io() {
            Ok(_) => io::Error::other("snapshot I/O thread stopped"),
            Err(e) => e,
        }
    }

    /// Hand the current buffer to the I/O thread.
    fn send_current(&mut self) -> io::Result<()> {
        let full = std::mem::take(&mut self.cur);
        if self.to_io.as_ref().is_some_and(|tx| tx.send(full).is_ok()) {
            Ok(())
        } else {
            Err(self.stopped_error())
        }
    }

    /// Hand the current buffer to the I/O thread and take an empty one: a returned one, a new
    /// one while fewer than [`DIRECT_BUFFERS`] exist, else wait for the I/O thread.
    fn submit(&mut self) -> io::Result<()> {
        self.send_current()?;
        self.cur = match self.from_io.try_recv() {
            Ok(b) => b,
            Err(_) if self.allocated < DIRECT_BUFFERS => {
                self.allocated += 1;
                AlignedBuf::new(DIRECT_CHUNK)
            }
            Err(_) => self.from_io.recv().map_err(|_| self.stopped_error())?,
        };
        Ok(())
    }

    /// Write what is left (padded to a block), wait for the I/O thread, cut the padding off.
    fn finish(mut self) -> io::Result<File> {
        let tail = self.cur.len;
        if tail > 0 {
            let padded = tail.next_multiple_of(DIRECT_ALIGN);
            self.cur.spare()[..padded - tail].fill(0);
            self.cur.len = padded;
            self.send_current()?;
        }
        let file = self.join_io()?;
        file.set_len(self.total)?;
        Ok(file)
    }
}

impl Write for DirectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let spare = self.cur.spare();
        let n = spare.len().min(buf.len());
        spare[..n].copy_from_slice(&buf[..n]);
        self.cur.len += n;
        self.total += n as u64;
        if self.cur.len == self.cur.cap() {
            self.submit()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        if self.io.is_some() {
            let _ = self.join_io();
        }
    }
}

/// `write_all` for a file opened with `O_DIRECT`, falling back to buffered writes if the file
/// system refuses direct I/O after all.
fn direct_write_all(file: &mut File, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match file.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                let flags = OFlag::from_bits_truncate(fcntl(&*file, FcntlArg::F_GETFL)?);
                if !flags.contains(OFlag::O_DIRECT) {
                    return Err(e);
                }
                fcntl(&*file, FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// Bytes checksummed and then copied together, so the copy reads them from cache.
const CRC_COPY_CHUNK: usize = 64 << 10;

fn push_record(mut h: RecordHeader, payload: &[u8], out: &mut EncodedBatch) {
    let at = out.bytes.len();
    out.entries.push(IndexEntry {
        offset: at as u64,
        first_page: h.first_page,
        page_count: h.page_count,
        kind: h.kind,
    });
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

    /// A fresh directory under the temporary directory (on disk here, not tmpfs).
    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn atomic_sink_removes_temp_on_drop() {
        let dir = test_dir("ram-saver-sink");
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

    /// Bytes of every length class go out unchanged through direct I/O: whole chunks, more chunks
    /// than buffers (the writer waits for the I/O thread), and a tail that is not a block multiple
    /// (padded for the last write, then cut off). Both sinks must produce identical files.
    #[test]
    fn direct_sink_round_trips() {
        let dir = test_dir("ram-saver-direct");
        let len = DIRECT_CHUNK * (DIRECT_BUFFERS + 2) + 12_345;
        let mut data = vec![0u8; len];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for direct in [true, false] {
            let target = dir.join(format!("d-{direct}.snap"));
            let mut s = if direct {
                AtomicFileSink::create(&target).unwrap()
            } else {
                AtomicFileSink::create_buffered(&target).unwrap()
            };
            if !direct {
                assert!(!s.is_direct());
            }
            // Odd-sized pieces, as records arrive.
            for piece in data.chunks(1_000_003) {
                s.write_all(piece).unwrap();
            }
            s.finish().unwrap();
            let back = fs::read(&target).unwrap();
            assert_eq!(back.len(), len);
            assert!(
                back == data,
                "direct={direct}: file differs from what was written"
            );
        }
        // Tiny files (shorter than one block) too.
        let target = dir.join("tiny.snap");
        let mut s = AtomicFileSink::create(&target).unwrap();
        s.write_all(b"abc").unwrap();
        s.finish().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"abc");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The temporary directory of this machine (ext4 here) takes direct I/O; if this fails on a
    /// machine whose /tmp refuses O_DIRECT, the fallback is what runs there.
    #[test]
    fn direct_sink_is_used_on_disk() {
        let dir = test_dir("ram-saver-isdirect");
        let s = AtomicFileSink::create(dir.join("x.snap")).unwrap();
        let direct = s.is_direct();
        drop(s);
        fs::remove_dir_all(&dir).unwrap();
        assert!(
            direct,
            "O_DIRECT refused by the file system of {}",
            dir.display()
        );
    }
}
