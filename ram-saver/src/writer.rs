//! Writing snapshot files: output sinks (atomic file, stream) and the record writer.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

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

    /// A flag that abandons the output once set: writes waiting for output that does not move
    /// (a hung disk or network file system) fail instead of waiting, and dropping the sink does
    /// not wait for them either. [`live_save`](crate::live_save) sets it when a save is
    /// cancelled or fails, so that it returns while the output is stuck.
    ///
    /// `None` (the default): the sink cannot be abandoned; a write blocks as long as its output.
    fn abandon_flag(&self) -> Option<Arc<AtomicBool>> {
        None
    }
}

/// A file written under a temporary name beside the target and renamed on `finish`.
///
/// The temporary is created private (mode 0600 whatever the umask: it holds guest RAM) and
/// new (`O_CREAT | O_EXCL | O_NOFOLLOW`, so nothing planted at its path, a symlink above all, is
/// ever followed or reused), under an unguessable name `.<name>.tmp-<16 random hex digits>`. It
/// is removed on drop unless `finish` succeeded. The committed file keeps mode 0600.
///
/// Data goes out from an I/O thread with direct I/O (`O_DIRECT`) where the
/// file system takes it; elsewhere (tmpfs on older kernels, some network file systems) and with
/// [`create_buffered`](Self::create_buffered) through the page cache.
///
/// Abandoning ([`SnapshotSink::abandon_flag`], or dropping the sink unfinished): the I/O thread
/// writes nothing more, and drop waits at most 200 ms each for the write in progress
/// and for the removal of the temporary. What does not finish in time (the file system hangs)
/// goes on in a detached thread: the write ends in a file that no longer has a name, the
/// removal whenever the file system answers. Dropping thus never hangs on a dead mount, at the
/// price of a temporary that may outlive the drop by as long as the file system is stuck.
#[derive(Debug)]
pub struct AtomicFileSink {
    out: Option<FileWriter>,
    direct: bool,
    tmp: PathBuf,
    target: PathBuf,
    replace: bool,
    abandon: Arc<AtomicBool>,
}

/// How long an abandoned sink waits for its I/O thread, and for the removal of its temporary,
/// before leaving them to a detached thread: long enough for a healthy disk to finish an
/// 8 MiB write, short enough that a cancelled save returns within a second on a dead one.
const ABANDON_WAIT: Duration = Duration::from_millis(200);

/// How often waits for the I/O thread look at the abandon flag.
const IO_POLL: Duration = Duration::from_millis(10);

/// Attempts at a free temporary name (a clash of 64 random bits means someone else made it).
const TEMP_ATTEMPTS: usize = 16;

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
        let (tmp, file) = create_temp(&target, name)?;
        let mut sink = AtomicFileSink {
            out: None,
            direct: false,
            tmp,
            target,
            replace: true,
            abandon: Arc::new(AtomicBool::new(false)),
        };
        // From here on, dropping `sink` on an error removes the temporary.
        sink.direct = direct && enable_direct(&file)?;
        sink.out = Some(FileWriter::new(file, sink.abandon.clone())?);
        Ok(sink)
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Whether data goes out with direct I/O (false: through the page cache).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn out(&mut self) -> io::Result<&mut FileWriter> {
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::other("sink already finished"))
    }
}

/// Create `.<name>.tmp-<random>` beside `target` with [`create_private`].
fn create_temp(target: &Path, name: &OsStr) -> io::Result<(PathBuf, File)> {
    for _ in 0..TEMP_ATTEMPTS {
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp-{:016x}", random_u64()));
        let tmp = target.with_file_name(tmp_name);
        match create_private(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free temporary name beside {}", target.display()),
    ))
}

/// Create a new file at `path`, mode 0600 (before the umask, which can only narrow it), for
/// writing. `O_EXCL` fails on any existing entry, a dangling symlink included; `O_NOFOLLOW`
/// says the same for readers of the code.
fn create_private(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// 64 unpredictable bits for temporary names: from `/dev/urandom`, else from the standard
/// library's randomly keyed SipHash (keys from the kernel's `getrandom`) over a counter.
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    // Every `RandomState` has fresh secret keys: the input needs no entropy of its own.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// Turn on `O_DIRECT` for `file`; false if its file system refuses (`EINVAL`). Set after the
/// file exists rather than at `open`: an `O_CREAT | O_EXCL` open refused for `O_DIRECT` has
/// already created the file, and a second exclusive open would then fail.
fn enable_direct(file: &File) -> io::Result<bool> {
    let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL)?);
    match fcntl(file, FcntlArg::F_SETFL(flags | OFlag::O_DIRECT)) {
        Ok(_) => Ok(true),
        Err(Errno::EINVAL) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Write for AtomicFileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out()?.write(buf)
    }
    /// Does nothing: data goes out in 8 MiB pieces, the rest with `finish`.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SnapshotSink for AtomicFileSink {
    fn finish(mut self) -> io::Result<()> {
        // The I/O thread wrote, cut and synced the file.
        let file = match self.out.take() {
            Some(w) => w.finish()?,
            None => return Err(io::Error::other("sink already finished")),
        };
        drop(file);
        if self.abandon.load(Ordering::Acquire) {
            return Err(abandoned());
        }
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
        self.tmp = PathBuf::new();
        // The rename is durable only once the directory is synced.
        let dir = match self.target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(dir)?.sync_all()
    }

    fn abandon_flag(&self) -> Option<Arc<AtomicBool>> {
        Some(self.abandon.clone())
    }
}

impl Drop for AtomicFileSink {
    fn drop(&mut self) {
        if self.tmp.as_os_str().is_empty() {
            return;
        }
        self.abandon.store(true, Ordering::Release);
        // Waits at most ABANDON_WAIT for the I/O thread.
        drop(self.out.take());
        let path = std::mem::take(&mut self.tmp);
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        let remover = thread::Builder::new()
            .name("saver-cleanup".into())
            .spawn(move || {
                let _ = fs::remove_file(&p);
                let _ = tx.send(());
            });
        if remover.is_ok() {
            // On timeout the thread is left to remove the file when the file system answers.
            let _ = rx.recv_timeout(ABANDON_WAIT);
        } else {
            // No thread to spare: remove inline (blocks while the file system hangs).
            let _ = fs::remove_file(&path);
        }
    }
}

/// Not `Interrupted`: `write_all` would retry that forever.
fn abandoned() -> io::Error {
    io::Error::other("snapshot output abandoned")
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

/// What the I/O thread is asked to do.
enum IoMsg {
    /// Append the buffer's data.
    Write(AlignedBuf),
    /// Cut the file to this length, sync it and hand it back.
    Finish(u64),
}

/// The file output of [`AtomicFileSink`]: the writing thread copies records into aligned
/// 8 MiB buffers; a separate I/O thread writes full buffers (with `O_DIRECT` where enabled)
/// while the next one fills (up to [`DIRECT_BUFFERS`] allocated, so memory stays bounded and a
/// slow disk pushes back), and finally cuts and syncs the file.
///
/// Why direct I/O: through the page cache, the kernel's copy into page-cache pages took about
/// half of a 2-core machine during a 4 GiB save (`perf record -a`: 49 % of all samples in
/// `copy_folio_from_iter_atomic`, 0.5 GB/s), CPU the guest and the fault thread need. Direct
/// writes skip that copy and the page cache; the disk takes 8 MiB `O_DIRECT` writes at
/// 1.6–1.9 GB/s here (`dd oflag=direct`), more than buffered write + fsync (1.5 GB/s at best,
/// 0.4 GB/s at worst).
///
/// Why a thread also for buffered output: the caller never enters a write(2) or fsync(2)
/// itself, so every wait on the file can give up once the output is abandoned (see
/// [`AtomicFileSink`]); a write stuck in the kernel cannot be interrupted, only left behind.
///
/// The end of the file is padded to a block for the last write and cut back with `ftruncate`.
/// Should the file system refuse a direct write (`EINVAL`), the I/O thread clears `O_DIRECT`
/// and goes on with buffered writes (offsets so far are all aligned, so nothing is lost).
struct FileWriter {
    cur: AlignedBuf,
    /// Bytes accepted so far (the file's final length).
    total: u64,
    /// Never blocks: it holds every buffer there is plus one `Finish`.
    to_io: Option<mpsc::SyncSender<IoMsg>>,
    from_io: mpsc::Receiver<AlignedBuf>,
    allocated: usize,
    io: Option<IoThread>,
    abandon: Arc<AtomicBool>,
}

struct IoThread {
    handle: thread::JoinHandle<()>,
    /// The file after `Finish`, or why the thread stopped.
    result: mpsc::Receiver<io::Result<File>>,
}

impl std::fmt::Debug for FileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileWriter")
            .field("total", &self.total)
            .field("allocated", &self.allocated)
            .finish_non_exhaustive()
    }
}

impl FileWriter {
    fn new(file: File, abandon: Arc<AtomicBool>) -> io::Result<Self> {
        let (to_io, rx) = mpsc::sync_channel::<IoMsg>(DIRECT_BUFFERS + 1);
        let (back, from_io) = mpsc::sync_channel::<AlignedBuf>(DIRECT_BUFFERS);
        let (done, result) = mpsc::sync_channel(1);
        let stop = abandon.clone();
        let handle = thread::Builder::new()
            .name("saver-io".into())
            .spawn(move || {
                let r = io_loop(file, &rx, &back, &stop);
                // Unblocks a writer waiting for a buffer before the result is there.
                drop(back);
                let _ = done.send(r);
            })?;
        Ok(FileWriter {
            cur: AlignedBuf::new(DIRECT_CHUNK),
            total: 0,
            to_io: Some(to_io),
            from_io,
            allocated: 1,
            io: Some(IoThread { handle, result }),
            abandon,
        })
    }

    fn abandoned(&self) -> bool {
        self.abandon.load(Ordering::Acquire)
    }

    /// Wait for the I/O thread's result (after `Finish`, or after it stopped on an error).
    /// Once the output is abandoned, waits at most `patience` longer, then leaves the thread
    /// to finish on its own (it owns the file, and drops it when its write returns).
    fn wait_io(&mut self, patience: Duration) -> io::Result<File> {
        let Some(io) = self.io.take() else {
            return Err(io::Error::other("snapshot I/O thread already stopped"));
        };
        let mut give_up_at = None;
        loop {
            match io.result.recv_timeout(IO_POLL) {
                Ok(r) => {
                    // It has sent its last word and is about to return.
                    let _ = io.handle.join();
                    return r;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(match io.handle.join() {
                        Ok(()) => io::Error::other("snapshot I/O thread stopped"),
                        Err(_) => io::Error::other("snapshot I/O thread panicked"),
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) if self.abandoned() => {
                    let at = *give_up_at.get_or_insert_with(|| Instant::now() + patience);
                    if Instant::now() >= at {
                        return Err(abandoned());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Why the I/O thread stopped early (it only does on an error or when abandoned).
    fn stopped_error(&mut self) -> io::Error {
        if self.abandoned() {
            return abandoned();
        }
        match self.wait_io(Duration::ZERO) {
            Ok(_) => io::Error::other("snapshot I/O thread stopped"),
            Err(e) => e,
        }
    }

    fn send(&mut self, msg: IoMsg) -> io::Result<()> {
        if self.abandoned() {
            return Err(abandoned());
        }
        if self.to_io.as_ref().is_some_and(|tx| tx.send(msg).is_ok()) {
            Ok(())
        } else {
            Err(self.stopped_error())
        }
    }

    /// Hand the current buffer to the I/O thread and take an empty one: a returned one, a new
    /// one while fewer than [`DIRECT_BUFFERS`] exist, else wait for the I/O thread (as long as
    /// the output is not abandoned).
    fn submit(&mut self) -> io::Result<()> {
        let full = std::mem::take(&mut self.cur);
        self.send(IoMsg::Write(full))?;
        if let Ok(b) = self.from_io.try_recv() {
            self.cur = b;
            return Ok(());
        }
        if self.allocated < DIRECT_BUFFERS {
            self.allocated += 1;
            self.cur = AlignedBuf::new(DIRECT_CHUNK);
            return Ok(());
        }
        loop {
            match self.from_io.recv_timeout(IO_POLL) {
                Ok(b) => {
                    self.cur = b;
                    return Ok(());
                }
                Err(mpsc::RecvTimeoutError::Timeout) if !self.abandoned() => {}
                Err(_) => return Err(self.stopped_error()),
            }
        }
    }

    /// Write what is left (padded to a block); the I/O thread cuts the padding off and syncs.
    fn finish(mut self) -> io::Result<File> {
        let tail = self.cur.len;
        if tail > 0 {
            let padded = tail.next_multiple_of(DIRECT_ALIGN);
            self.cur.spare()[..padded - tail].fill(0);
            self.cur.len = padded;
            let last = std::mem::take(&mut self.cur);
            self.send(IoMsg::Write(last))?;
        }
        self.send(IoMsg::Finish(self.total))?;
        self.to_io = None;
        self.wait_io(Duration::ZERO)
    }
}

/// The I/O thread: write buffers in order and return them, until `Finish` (or the writer is
/// gone, or the output abandoned: then nothing more is written).
fn io_loop(
    mut file: File,
    rx: &mpsc::Receiver<IoMsg>,
    back: &mpsc::SyncSender<AlignedBuf>,
    abandon: &AtomicBool,
) -> io::Result<File> {
    for msg in rx {
        if abandon.load(Ordering::Acquire) {
            return Err(abandoned());
        }
        match msg {
            IoMsg::Write(mut buf) => {
                direct_write_all(&mut file, buf.data())?;
                buf.len = 0;
                // The writer may be gone (drop): then the buffer is just freed.
                let _ = back.send(buf);
            }
            IoMsg::Finish(len) => {
                file.set_len(len)?;
                file.sync_all()?;
                return Ok(file);
            }
        }
    }
    Err(abandoned())
}

impl Write for FileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.abandoned() {
            return Err(abandoned());
        }
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

impl Drop for FileWriter {
    fn drop(&mut self) {
        if self.io.is_some() {
            // Unfinished: write nothing more; wait a little for a write in progress.
            self.abandon.store(true, Ordering::Release);
            self.to_io = None;
            let _ = self.wait_io(ABANDON_WAIT);
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

    /// Permission bits of `p` (not following a symlink).
    fn mode_of(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// Guest RAM is for the owner only: temporary and committed file are 0600 under the usual
    /// umask 022, for every way of creating a sink.
    #[test]
    fn snapshot_files_are_private() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let dir = test_dir("ram-saver-private");
        let makers: [fn(&Path) -> io::Result<AtomicFileSink>; 3] = [
            |t| AtomicFileSink::create(t),
            |t| AtomicFileSink::create_new(t),
            |t| AtomicFileSink::create_buffered(t),
        ];
        for (i, make) in makers.iter().enumerate() {
            let target = dir.join(format!("{i}.snap"));
            let mut s = make(&target).unwrap();
            assert_eq!(mode_of(s.temp_path()), 0o600, "temporary of sink {i}");
            s.write_all(b"guest ram").unwrap();
            s.finish().unwrap();
            assert_eq!(mode_of(&target), 0o600, "file of sink {i}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A symlink planted where a temporary could be created is never followed: not at the
    /// guessable name `.<name>.tmp-<pid>`, and not at any name the exclusive create is given,
    /// dangling or not.
    #[test]
    fn planted_symlinks_are_never_followed() {
        use std::os::unix::fs::symlink;
        let dir = test_dir("ram-saver-symlink");
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let target = dir.join("vm.snap");
        let guessable = dir.join(format!(".vm.snap.tmp-{}", std::process::id()));
        symlink(&victim, &guessable).unwrap();
        let mut s = AtomicFileSink::create(&target).unwrap();
        s.write_all(b"guest ram").unwrap();
        drop(s);
        let mut s = AtomicFileSink::create(&target).unwrap();
        s.write_all(b"guest ram").unwrap();
        s.finish().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"guest ram");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(fs::symlink_metadata(&guessable)
            .unwrap()
            .file_type()
            .is_symlink());

        let err = create_private(&guessable).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        let nowhere = dir.join("nowhere");
        let dangling = dir.join("dangling");
        symlink(&nowhere, &dangling).unwrap();
        let err = create_private(&dangling).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(!nowhere.exists(), "a dangling symlink was followed");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Two sinks for one target in one process get different temporaries, named with 16 random
    /// hex digits (not the process id), and both clean up.
    #[test]
    fn temporary_names_are_unique_and_random() {
        let dir = test_dir("ram-saver-names");
        let target = dir.join("vm.snap");
        let a = AtomicFileSink::create(&target).unwrap();
        let b = AtomicFileSink::create(&target).unwrap();
        assert_ne!(a.temp_path(), b.temp_path());
        for s in [&a, &b] {
            let name = s.temp_path().file_name().unwrap().to_str().unwrap();
            let suffix = name.strip_prefix(".vm.snap.tmp-").expect(name);
            assert_eq!(suffix.len(), 16, "{name}");
            assert!(suffix.bytes().all(|c| c.is_ascii_hexdigit()), "{name}");
            assert_ne!(suffix, format!("{:016x}", std::process::id()));
            assert!(s.temp_path().exists());
        }
        drop((a, b));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Once abandoned, a sink refuses writes instead of queueing them, refuses to commit, and
    /// still removes its temporary.
    #[test]
    fn abandoned_sink_fails_fast_and_cleans_up() {
        let dir = test_dir("ram-saver-abandon");
        let target = dir.join("vm.snap");
        let mut s = AtomicFileSink::create(&target).unwrap();
        s.write_all(&vec![7u8; DIRECT_CHUNK + 1]).unwrap();
        let tmp = s.temp_path().to_path_buf();
        s.abandon_flag().unwrap().store(true, Ordering::Release);
        assert!(s.write_all(b"more").is_err());
        assert!(s.finish().is_err());
        assert!(!tmp.exists() && !target.exists());
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
