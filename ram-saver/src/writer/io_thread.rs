//! The I/O thread behind [`AtomicFileSink`](super::AtomicFileSink): aligned 8 MiB buffers
//! written in order (with `O_DIRECT` where enabled), bounded in number, abandoned without waiting.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use crate::direct_io::{direct_write_all, AlignedBuf, DIRECT_ALIGN};

/// How long an abandoned sink waits for its I/O thread, and for the removal of its temporary,
/// before leaving them to a detached thread: long enough for a healthy disk to finish an
/// 8 MiB write, short enough that a cancelled save returns within a second on a dead one.
pub(super) const ABANDON_WAIT: Duration = Duration::from_millis(200);

/// How often waits for the I/O thread look at the abandon flag.
const IO_POLL: Duration = Duration::from_millis(10);

/// Not `Interrupted`: `write_all` would retry that forever.
pub(super) fn abandoned() -> io::Error {
    io::Error::other("snapshot output abandoned")
}

/// Size of one direct write.
const DIRECT_CHUNK: usize = 8 << 20;
/// Buffers in flight or being filled (one filling, the rest queued for or in the I/O thread).
const DIRECT_BUFFERS: usize = 3;

/// What the I/O thread is asked to do.
enum IoMsg {
    /// Append the buffer's data.
    Write(AlignedBuf),
    /// Cut the file to this length, sync it and hand it back.
    Finish(u64),
}

/// The file output of [`AtomicFileSink`](super::AtomicFileSink): the writing thread copies
/// records into aligned 8 MiB buffers; a separate I/O thread writes full buffers (with
/// `O_DIRECT` where enabled) while the next one fills (up to [`DIRECT_BUFFERS`] allocated, so
/// memory stays bounded and a slow disk pushes back), and finally cuts and syncs the file.
///
/// Why direct I/O: through the page cache the kernel's copy into page-cache pages takes a core
/// the guest and the fault thread need, and the disk takes large direct writes faster than
/// buffered writes plus fsync (figures in `docs/PERFORMANCE.md`, "Output").
///
/// Why a thread also for buffered output: the caller never enters a write(2) or fsync(2)
/// itself, so every wait on the file can give up once the output is abandoned (see
/// [`AtomicFileSink`](super::AtomicFileSink)); a write stuck in the kernel cannot be
/// interrupted, only left behind.
///
/// The end of the file is padded to a block for the last write and cut back with `ftruncate`.
/// Should the file system refuse a direct write (`EINVAL`), the I/O thread clears `O_DIRECT`
/// and goes on with buffered writes (offsets so far are all aligned, so nothing is lost).
pub(super) struct FileWriter {
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
    pub(super) fn new(file: File, abandon: Arc<AtomicBool>) -> io::Result<Self> {
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
    pub(super) fn finish(mut self) -> io::Result<File> {
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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::writer::{test_dir, AtomicFileSink, SnapshotSink};

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
}
