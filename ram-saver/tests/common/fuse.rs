//! A minimal FUSE file system served from a thread of the test process, whose writes can be
//! made to hang: a real file system (the kernel's FUSE client, real write(2) calls that block in
//! the kernel) for testing what a save does when its disk stops answering.
//!
//! One flat directory; files keep their name, mode and size, the data is discarded. The server
//! speaks protocol 7.31 (`include/uapi/linux/fuse.h`) and answers INIT, LOOKUP, FORGET,
//! GETATTR, SETATTR, UNLINK, RENAME, LINK, OPEN, WRITE, STATFS, RELEASE, FSYNC, FLUSH, OPENDIR,
//! RELEASEDIR, FSYNCDIR and CREATE; everything else gets ENOSYS, which the kernel takes as "not
//! supported" for optional operations (xattrs, access, statx).
//!
//! [`FuseMount::stall_writes`]: the next WRITE parks the server thread before it replies, so it
//! stops reading `/dev/fuse` and every request of the mount (the parked write, later writes,
//! unlink, close) hangs until [`FuseMount::resume`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

const ROOT: u64 = 1;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFMT: u32 = 0o170000;

const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const UNLINK: u32 = 10;
const RENAME: u32 = 12;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const RELEASEDIR: u32 = 29;
const FSYNCDIR: u32 = 30;
const CREATE: u32 = 35;
const INTERRUPT: u32 = 36;
const DESTROY: u32 = 38;
const BATCH_FORGET: u32 = 42;

const FUSE_BIG_WRITES: u32 = 1 << 5;
const FUSE_MAX_PAGES: u32 = 1 << 22;
const FATTR_MODE: u32 = 1 << 0;
const FATTR_SIZE: u32 = 1 << 3;
const O_EXCL: u32 = 0o200;
const O_TRUNC: u32 = 0o1000;

/// Largest WRITE payload we accept (with FUSE_MAX_PAGES: 256 pages).
const MAX_WRITE: usize = 1 << 20;
/// The kernel wants room for a whole WRITE request in every read.
const READ_BUFFER: usize = MAX_WRITE + 8192;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;

/// What the test steers and observes.
#[derive(Debug, Default)]
struct Control {
    /// The next WRITE parks the server until this is cleared.
    stall_writes: bool,
    /// The server is parked on a WRITE now.
    stalled: bool,
    /// Reply this errno to every WRITE.
    fail_writes: Option<Errno>,
    writes: u64,
    bytes_written: u64,
}

#[derive(Debug)]
struct Node {
    mode: u32,
    size: u64,
    nlink: u32,
}

#[derive(Debug)]
struct Fs {
    names: HashMap<Vec<u8>, u64>,
    nodes: HashMap<u64, Node>,
    next_ino: u64,
}

#[derive(Debug)]
struct Shared {
    ctl: Mutex<Control>,
    cv: Condvar,
    fs: Mutex<Fs>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A FUSE mount served by a thread of this process; unmounted (lazily) on drop.
#[derive(Debug)]
pub struct FuseMount {
    dir: PathBuf,
    shared: Arc<Shared>,
    server: Option<(thread::JoinHandle<()>, mpsc::Receiver<()>)>,
    /// Connection number under /sys/fs/fuse/connections (the mount's device minor).
    conn: u64,
}

/// A file of the mounted file system: name, permission bits, size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub name: String,
    pub mode: u32,
    pub size: u64,
}

impl FuseMount {
    /// Mount a fresh, empty file system at `dir` (created if missing). Needs root.
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")?;
        let opts = format!("fd={},rootmode=40000,user_id=0,group_id=0", dev.as_raw_fd());
        mount(
            Some("snapctl-test"),
            dir,
            Some("fuse"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )?;
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                mode: S_IFDIR | 0o755,
                size: 0,
                nlink: 2,
            },
        );
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Control::default()),
            cv: Condvar::new(),
            fs: Mutex::new(Fs {
                names: HashMap::new(),
                nodes,
                next_ino: ROOT + 1,
            }),
        });
        let (tx, rx) = mpsc::channel();
        let s = shared.clone();
        let handle = thread::Builder::new()
            .name("fuse-server".into())
            .spawn(move || {
                serve(dev, &s);
                let _ = tx.send(());
            })?;
        // The first access waits for INIT, which the server thread answers.
        let conn = nix::sys::stat::minor(nix::sys::stat::stat(dir)?.st_dev);
        Ok(FuseMount {
            dir: dir.to_path_buf(),
            shared,
            server: Some((handle, rx)),
            conn,
        })
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Make the next WRITE hang (the server stops answering anything) until [`resume`].
    ///
    /// [`resume`]: Self::resume
    pub fn stall_writes(&self) {
        lock(&self.shared.ctl).stall_writes = true;
    }

    /// Answer again (a parked write completes, or fails with the [`fail_writes`] errno).
    ///
    /// [`fail_writes`]: Self::fail_writes
    pub fn resume(&self) {
        lock(&self.shared.ctl).stall_writes = false;
        self.shared.cv.notify_all();
    }

    /// Fail every write from now on with `errno`.
    pub fn fail_writes(&self, errno: Errno) {
        lock(&self.shared.ctl).fail_writes = Some(errno);
    }

    /// Wait until the server is parked on a write; false on timeout.
    pub fn wait_stalled(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.shared.ctl);
        while !g.stalled {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .shared
                .cv
                .wait_timeout(g, deadline - now)
                .map_or_else(|p| p.into_inner().0, |r| r.0);
        }
        true
    }

    /// WRITE requests received (answered or not) and bytes in them.
    pub fn writes(&self) -> (u64, u64) {
        let g = lock(&self.shared.ctl);
        (g.writes, g.bytes_written)
    }

    /// The files in the directory, by name.
    pub fn files(&self) -> Vec<FileInfo> {
        let fs = lock(&self.shared.fs);
        let mut v: Vec<_> = fs
            .names
            .iter()
            .map(|(name, ino)| {
                let n = &fs.nodes[ino];
                FileInfo {
                    name: String::from_utf8_lossy(name).into_owned(),
                    mode: n.mode & 0o7777,
                    size: n.size,
                }
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Wait until `f(files)` holds; false on timeout.
    pub fn wait_files(&self, timeout: Duration, f: impl Fn(&[FileInfo]) -> bool) -> bool {
        let t = Instant::now();
        loop {
            if f(&self.files()) {
                return true;
            }
            if t.elapsed() > timeout {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        self.resume();
        // Lazy: files still open (a write left behind by a save) keep the file system alive
        // until they are closed; the server answers them meanwhile.
        let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
        if let Some((handle, done)) = self.server.take() {
            // The server reads ENODEV once the last user of the mount is gone.
            if done.recv_timeout(Duration::from_secs(10)).is_err() {
                // Someone still holds a file open: cut the connection instead.
                let abort = format!("/sys/fs/fuse/connections/{}/abort", self.conn);
                let _ = std::fs::write(abort, "1");
                if done.recv_timeout(Duration::from_secs(5)).is_err() {
                    eprintln!("fuse server thread did not stop; leaving it");
                    return;
                }
            }
            let _ = handle.join();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A parsed request.
struct Req<'a> {
    opcode: u32,
    unique: u64,
    nodeid: u64,
    body: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The NUL-terminated name at the start of `b`, and what follows it.
fn name_at(b: &[u8]) -> (&[u8], &[u8]) {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    (&b[..end], b.get(end + 1..).unwrap_or(&[]))
}

/// The server loop: read a request, answer it, until the connection ends.
fn serve(dev: File, shared: &Shared) {
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        let n = match (&dev).read(&mut buf) {
            Ok(n) => n,
            Err(e) => match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
                // Interrupted, or a request gone before we read it.
                Errno::EINTR | Errno::EAGAIN | Errno::ENOENT => continue,
                // Unmounted or aborted.
                _ => return,
            },
        };
        if n < IN_HEADER {
            continue;
        }
        let b = &buf[..n];
        let req = Req {
            opcode: u32_at(b, 4),
            unique: u64_at(b, 8),
            nodeid: u64_at(b, 16),
            body: &b[IN_HEADER..n.min(u32_at(b, 0) as usize)],
        };
        if req.opcode == DESTROY {
            let _ = reply(&dev, req.unique, Ok(&[]));
            return;
        }
        if let Some(r) = handle(shared, &req) {
            let _ = reply(&dev, req.unique, r.as_deref().map_err(|e| *e));
        }
    }
}

/// Write the answer to request `unique`: a payload or an errno.
fn reply(dev: &File, unique: u64, r: Result<&[u8], Errno>) -> io::Result<()> {
    let (err, payload) = match r {
        Ok(p) => (0, p),
        Err(e) => (-(e as i32), &[][..]),
    };
    let mut out = Vec::with_capacity(OUT_HEADER + payload.len());
    out.extend_from_slice(&((OUT_HEADER + payload.len()) as u32).to_le_bytes());
    out.extend_from_slice(&err.to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(payload);
    // One write per answer, as the device requires. ENOENT: the request was interrupted.
    let n = (&*dev).write(&out)?;
    if n != out.len() {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(())
}

/// struct fuse_attr (88 bytes).
fn attr(ino: u64, n: &Node) -> Vec<u8> {
    let mut v = Vec::with_capacity(88);
    v.extend_from_slice(&ino.to_le_bytes());
    v.extend_from_slice(&n.size.to_le_bytes());
    v.extend_from_slice(&n.size.div_ceil(512).to_le_bytes());
    v.extend_from_slice(&[0u8; 24]); // atime, mtime, ctime
    v.extend_from_slice(&[0u8; 12]); // their nanoseconds
    for x in [n.mode, n.nlink, 0, 0, 0, 4096, 0] {
        // mode, nlink, uid, gid, rdev, blksize, flags
        v.extend_from_slice(&x.to_le_bytes());
    }
    debug_assert_eq!(v.len(), 88);
    v
}

/// struct fuse_entry_out (128 bytes): no caching, so every access asks again.
fn entry(ino: u64, n: &Node) -> Vec<u8> {
    let mut v = Vec::with_capacity(128);
    v.extend_from_slice(&ino.to_le_bytes());
    v.extend_from_slice(&[0u8; 8 + 8 + 8 + 4 + 4]); // generation, valid times
    v.extend_from_slice(&attr(ino, n));
    v
}

/// struct fuse_attr_out (104 bytes).
fn attr_out(ino: u64, n: &Node) -> Vec<u8> {
    let mut v = vec![0u8; 16];
    v.extend_from_slice(&attr(ino, n));
    v
}

/// struct fuse_open_out (16 bytes): file handle 0, no flags.
fn open_out() -> Vec<u8> {
    vec![0u8; 16]
}

type Answer = Result<Vec<u8>, Errno>;

/// Answer one request; `None` for requests that get no answer.
fn handle(shared: &Shared, req: &Req<'_>) -> Option<Answer> {
    let b = req.body;
    Some(match req.opcode {
        INIT => {
            let (major, max_readahead, flags) = (u32_at(b, 0), u32_at(b, 8), u32_at(b, 12));
            if major != 7 {
                return Some(Err(Errno::EPROTO));
            }
            let mut v = Vec::with_capacity(64);
            for x in [
                7,
                31,
                max_readahead,
                flags & (FUSE_BIG_WRITES | FUSE_MAX_PAGES),
            ] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            v.extend_from_slice(&16u16.to_le_bytes()); // max_background
            v.extend_from_slice(&12u16.to_le_bytes()); // congestion_threshold
            v.extend_from_slice(&(MAX_WRITE as u32).to_le_bytes());
            v.extend_from_slice(&1u32.to_le_bytes()); // time_gran
            v.extend_from_slice(&((MAX_WRITE / 4096) as u16).to_le_bytes()); // max_pages
            v.extend_from_slice(&0u16.to_le_bytes()); // map_alignment
            v.extend_from_slice(&[0u8; 4 + 28]); // flags2, unused
            debug_assert_eq!(v.len(), 64);
            Ok(v)
        }
        FORGET | BATCH_FORGET | INTERRUPT => return None,
        WRITE => write(shared, req),
        STATFS => {
            let mut v = Vec::with_capacity(80);
            for x in [1u64 << 24, 1 << 24, 1 << 24, 1 << 20, 1 << 20] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            for x in [4096u32, 255, 4096, 0] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            v.extend_from_slice(&[0u8; 24]);
            Ok(v)
        }
        OPEN | OPENDIR => Ok(open_out()),
        RELEASE | RELEASEDIR | FLUSH | FSYNC | FSYNCDIR => Ok(Vec::new()),
        _ => {
            let mut fs = lock(&shared.fs);
            namespace(&mut fs, req)
        }
    })
}

/// WRITE: count it, park first if the test stalled writes, then answer.
fn write(shared: &Shared, req: &Req<'_>) -> Answer {
    let b = req.body;
    let (offset, size) = (u64_at(b, 8), u32_at(b, 16));
    let mut g = lock(&shared.ctl);
    g.writes += 1;
    g.bytes_written += u64::from(size);
    if g.stall_writes {
        g.stalled = true;
        shared.cv.notify_all();
        while g.stall_writes {
            g = shared.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.stalled = false;
    }
    if let Some(e) = g.fail_writes {
        return Err(e);
    }
    drop(g);
    let mut fs = lock(&shared.fs);
    let n = fs.nodes.get_mut(&req.nodeid).ok_or(Errno::ENOENT)?;
    n.size = n.size.max(offset + u64::from(size));
    let mut v = size.to_le_bytes().to_vec();
    v.extend_from_slice(&[0u8; 4]);
    Ok(v)
}

/// Requests on names and attributes.
fn namespace(fs: &mut Fs, req: &Req<'_>) -> Answer {
    let b = req.body;
    let in_root = |nodeid: u64| {
        if nodeid == ROOT {
            Ok(())
        } else {
            Err(Errno::ENOTDIR)
        }
    };
    match req.opcode {
        LOOKUP => {
            in_root(req.nodeid)?;
            let (name, _) = name_at(b);
            let ino = *fs.names.get(name).ok_or(Errno::ENOENT)?;
            Ok(entry(ino, &fs.nodes[&ino]))
        }
        GETATTR => {
            let n = fs.nodes.get(&req.nodeid).ok_or(Errno::ENOENT)?;
            Ok(attr_out(req.nodeid, n))
        }
        SETATTR => {
            let (valid, size, mode) = (u32_at(b, 0), u64_at(b, 16), u32_at(b, 68));
            let n = fs.nodes.get_mut(&req.nodeid).ok_or(Errno::ENOENT)?;
            if valid & FATTR_SIZE != 0 {
                n.size = size;
            }
            if valid & FATTR_MODE != 0 {
                n.mode = (n.mode & S_IFMT) | (mode & 0o7777);
            }
            Ok(attr_out(req.nodeid, n))
        }
        CREATE => {
            in_root(req.nodeid)?;
            let (flags, mode) = (u32_at(b, 0), u32_at(b, 4));
            let (name, _) = name_at(&b[16..]);
            let ino = match fs.names.get(name) {
                Some(_) if flags & O_EXCL != 0 => return Err(Errno::EEXIST),
                Some(&ino) => {
                    if flags & O_TRUNC != 0 {
                        fs.nodes.get_mut(&ino).unwrap().size = 0;
                    }
                    ino
                }
                None => {
                    let ino = fs.next_ino;
                    fs.next_ino += 1;
                    // The kernel applied the umask already.
                    let node = Node {
                        mode: S_IFREG | (mode & 0o7777),
                        size: 0,
                        nlink: 1,
                    };
                    fs.nodes.insert(ino, node);
                    fs.names.insert(name.to_vec(), ino);
                    ino
                }
            };
            let mut v = entry(ino, &fs.nodes[&ino]);
            v.extend_from_slice(&open_out());
            Ok(v)
        }
        UNLINK => {
            in_root(req.nodeid)?;
            let (name, _) = name_at(b);
            let ino = fs.names.remove(name).ok_or(Errno::ENOENT)?;
            if let Some(n) = fs.nodes.get_mut(&ino) {
                n.nlink = n.nlink.saturating_sub(1);
            }
            Ok(Vec::new())
        }
        RENAME => {
            in_root(req.nodeid)?;
            in_root(u64_at(b, 0))?;
            let (old, rest) = name_at(&b[8..]);
            let (new, _) = name_at(rest);
            let ino = fs.names.remove(old).ok_or(Errno::ENOENT)?;
            if let Some(replaced) = fs.names.insert(new.to_vec(), ino) {
                if let Some(n) = fs.nodes.get_mut(&replaced) {
                    n.nlink = n.nlink.saturating_sub(1);
                }
            }
            Ok(Vec::new())
        }
        LINK => {
            in_root(req.nodeid)?;
            let ino = u64_at(b, 0);
            let (name, _) = name_at(&b[8..]);
            if fs.names.contains_key(name) {
                return Err(Errno::EEXIST);
            }
            let n = fs.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
            n.nlink += 1;
            fs.names.insert(name.to_vec(), ino);
            Ok(entry(ino, &fs.nodes[&ino]))
        }
        _ => Err(Errno::ENOSYS),
    }
}
