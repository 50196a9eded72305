//! [`AtomicFileSink`]: a private temporary beside the target, committed by rename (or link),
//! removed when dropped unfinished, and abandoned without waiting when its file system hangs.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use nix::fcntl::OFlag;

use super::io_thread::{abandoned, FileWriter, ABANDON_WAIT};
use super::SnapshotSink;
use crate::direct_io::enable_direct;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::test_dir;

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
