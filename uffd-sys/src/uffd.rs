//! An owned userfaultfd with one thin wrapper per ioctl.

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::abi::*;

/// A set of `UFFD_FEATURE_*` bits; prints as names.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Features(pub u64);

impl Features {
    /// True if every bit of `bits` is set.
    pub fn contains(self, bits: u64) -> bool {
        self.0 & bits == bits
    }
    /// Names of the known bits that are set.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        UFFD_FEATURE_NAMES
            .into_iter()
            .filter(move |(b, _)| self.0 & b != 0)
            .map(|(_, n)| n)
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for n in self.names() {
            if !first {
                f.write_str("|")?;
            }
            f.write_str(n)?;
            first = false;
        }
        let known = UFFD_FEATURE_NAMES.iter().fold(0, |a, (b, _)| a | b);
        let unknown = self.0 & !known;
        if unknown != 0 {
            write!(f, "{}{unknown:#x}", if first { "" } else { "|" })?;
        } else if first {
            f.write_str("(none)")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Features({self})")
    }
}

/// What the UFFDIO_API handshake reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiInfo {
    /// Every feature the kernel supports (not only the requested ones).
    pub available: Features,
    /// Bit mask of ioctls usable on the fd itself (`1 << _UFFDIO_*`).
    pub ioctls: u64,
}

/// How the userfaultfd was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenPath {
    /// `/dev/userfaultfd` + USERFAULTFD_IOC_NEW (Linux 6.1+), governed by the device's file mode.
    Device,
    /// The userfaultfd(2) syscall, governed by `vm.unprivileged_userfaultfd` / CAP_SYS_PTRACE.
    Syscall,
}

/// Failure to obtain a userfaultfd or to complete its handshake.
#[derive(Debug)]
pub enum OpenError {
    /// Neither `/dev/userfaultfd` nor the syscall gave a userfaultfd able to handle kernel faults.
    Unavailable {
        /// Why `/dev/userfaultfd` failed.
        device: io::Error,
        /// Why the syscall failed.
        syscall: io::Error,
        /// Value of `vm.unprivileged_userfaultfd`, if readable.
        unprivileged_sysctl: Option<u32>,
    },
    /// UFFDIO_API refused the requested features (EINVAL: a feature is unsupported; EPERM:
    /// a feature needs a capability).
    Api {
        /// The features that were requested.
        requested: Features,
        /// The ioctl error.
        source: io::Error,
    },
}

impl OpenError {
    /// True if the failure is about permissions (not about kernel support).
    pub fn is_permission_denied(&self) -> bool {
        let perm = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES));
        match self {
            OpenError::Unavailable {
                device, syscall, ..
            } => perm(device) || perm(syscall),
            OpenError::Api { source, .. } => perm(source),
        }
    }
    /// True if the kernel has no userfaultfd at all.
    pub fn is_unsupported(&self) -> bool {
        match self {
            OpenError::Unavailable {
                device, syscall, ..
            } => {
                matches!(
                    device.raw_os_error(),
                    Some(libc::ENOENT | libc::ENODEV | libc::ENOTTY)
                ) && syscall.raw_os_error() == Some(libc::ENOSYS)
            }
            OpenError::Api { .. } => false,
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Unavailable {
                device,
                syscall,
                unprivileged_sysctl,
            } => {
                if self.is_unsupported() {
                    return write!(
                        f,
                        "this kernel has no userfaultfd (no /dev/userfaultfd, syscall returns \
                         ENOSYS): use a kernel built with CONFIG_USERFAULTFD"
                    );
                }
                let sysctl = match unprivileged_sysctl {
                    Some(v) => format!("vm.unprivileged_userfaultfd={v}"),
                    None => "vm.unprivileged_userfaultfd unknown".to_string(),
                };
                if self.is_permission_denied() {
                    write!(
                        f,
                        "/dev/userfaultfd not accessible ({device}) and the userfaultfd syscall \
                         refuses kernel-mode faults ({syscall}; {sysctl}): run as root, grant this \
                         user read-write access to /dev/userfaultfd, or give the process \
                         CAP_SYS_PTRACE"
                    )
                } else {
                    write!(
                        f,
                        "cannot create a userfaultfd: /dev/userfaultfd: {device}; userfaultfd \
                         syscall: {syscall} ({sysctl})"
                    )
                }
            }
            OpenError::Api { requested, source } => {
                if source.raw_os_error() == Some(libc::EPERM) {
                    write!(
                        f,
                        "userfaultfd handshake: features {requested} need more privileges"
                    )
                } else {
                    write!(f, "userfaultfd handshake refused features {requested}")
                }
            }
        }
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Both causes are already part of the message.
            OpenError::Unavailable { .. } => None,
            OpenError::Api { source, .. } => Some(source),
        }
    }
}

fn read_unprivileged_sysctl() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// An owned userfaultfd (O_CLOEXEC | O_NONBLOCK, kernel-mode faults allowed) after its handshake.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    path: OpenPath,
    features: Features,
    info: ApiInfo,
}

const OPEN_FLAGS: libc::c_int = libc::O_CLOEXEC | libc::O_NONBLOCK;

impl Userfaultfd {
    /// Obtain a userfaultfd without handshake: `/dev/userfaultfd` first, then the syscall.
    ///
    /// Never sets UFFD_USER_MODE_ONLY: KVM writes guest memory from kernel mode and those faults
    /// must be caught too.
    pub fn open_raw() -> Result<(OwnedFd, OpenPath), OpenError> {
        let device = match open_via_device() {
            Ok(fd) => return Ok((fd, OpenPath::Device)),
            Err(e) => e,
        };
        // SAFETY: the userfaultfd syscall takes one integer flags argument and touches no memory.
        let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, OPEN_FLAGS) };
        if ret >= 0 {
            // SAFETY: the syscall returned a new file descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(ret as RawFd) };
            return Ok((fd, OpenPath::Syscall));
        }
        Err(OpenError::Unavailable {
            device,
            syscall: io::Error::last_os_error(),
            unprivileged_sysctl: read_unprivileged_sysctl(),
        })
    }

    /// Ask the kernel which features it supports, using a throwaway fd (UFFDIO_API can only be
    /// issued once per fd, so probing and enabling need two fds).
    pub fn probe() -> Result<ApiInfo, OpenError> {
        let (fd, _) = Self::open_raw()?;
        api(fd.as_fd(), 0)
    }

    /// Open a userfaultfd and enable exactly `features` (each must be supported, see [`probe`]).
    ///
    /// [`probe`]: Userfaultfd::probe
    pub fn open(features: u64) -> Result<Self, OpenError> {
        let (fd, path) = Self::open_raw()?;
        let info = api(fd.as_fd(), features)?;
        Ok(Userfaultfd {
            fd,
            path,
            features: Features(features),
            info,
        })
    }

    /// The features enabled on this fd.
    pub fn features(&self) -> Features {
        self.features
    }
    /// What the handshake reported (all supported features, fd ioctls).
    pub fn api_info(&self) -> ApiInfo {
        self.info
    }
    /// How the fd was obtained.
    pub fn opened_via(&self) -> OpenPath {
        self.path
    }

    /// UFFDIO_REGISTER `[start, start+len)` with `mode` (UFFDIO_REGISTER_MODE_*); returns the
    /// ioctls available on the range (`1 << _UFFDIO_*`).
    ///
    /// Safe: registering only makes faults on the range wait for this fd; it cannot corrupt memory.
    pub fn register(&self, start: usize, len: usize, mode: u64) -> io::Result<u64> {
        let mut arg = uffdio_register {
            range: uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: `arg` is a valid uffdio_register that outlives the call; the kernel writes only
        // inside it.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut arg) })?;
        Ok(arg.ioctls)
    }

    /// UFFDIO_UNREGISTER `[start, start+len)` (also wakes threads waiting on it).
    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let arg = uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: `arg` is a valid uffdio_range that outlives the call; the kernel only reads it.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &arg) })?;
        Ok(())
    }

    /// UFFDIO_WRITEPROTECT `[start, start+len)` with `mode` (UFFDIO_WRITEPROTECT_MODE_*).
    pub fn writeprotect(&self, start: usize, len: usize, mode: u64) -> io::Result<()> {
        let mut arg = uffdio_writeprotect {
            range: uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
        };
        // SAFETY: `arg` is a valid uffdio_writeprotect that outlives the call. Changing protection
        // never changes memory contents.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut arg) })?;
        Ok(())
    }

    /// UFFDIO_WAKE `[start, start+len)`.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let arg = uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: `arg` is a valid uffdio_range that outlives the call; the kernel only reads it.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &arg) })?;
        Ok(())
    }

    /// UFFDIO_COPY; returns the bytes copied.
    ///
    /// # Safety
    /// `src..src+len` must be readable, and writing `dst..dst+len` must not break any Rust
    /// aliasing or validity invariant (no live references into it).
    pub unsafe fn copy(&self, dst: usize, src: usize, len: usize, mode: u64) -> io::Result<i64> {
        let mut arg = uffdio_copy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode,
            copy: 0,
        };
        // SAFETY: the caller guarantees both ranges are fine to read / write; `arg` is valid.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut arg) })?;
        Ok(arg.copy)
    }

    /// UFFDIO_COPY that reports partial progress: `Ok(n)` when the kernel copied `n > 0` bytes
    /// from the start of the range (all of `len`, or fewer when it stopped early, e.g. at a page
    /// that exists: the ioctl then fails with EAGAIN but the bytes before were copied and their
    /// waiters woken); `Err` when it copied nothing (EEXIST: the first page exists).
    ///
    /// # Safety
    /// As for [`Userfaultfd::copy`].
    pub unsafe fn copy_partial(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        mode: u64,
    ) -> io::Result<usize> {
        let mut arg = uffdio_copy {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode,
            copy: 0,
        };
        // SAFETY: the caller guarantees both ranges are fine to read / write; `arg` is valid.
        let r = cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut arg) });
        partial(r, arg.copy)
    }

    /// UFFDIO_ZEROPAGE that reports partial progress, like [`Userfaultfd::copy_partial`].
    ///
    /// # Safety
    /// As for [`Userfaultfd::zeropage`].
    pub unsafe fn zeropage_partial(
        &self,
        start: usize,
        len: usize,
        mode: u64,
    ) -> io::Result<usize> {
        let mut arg = uffdio_zeropage {
            range: uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
            zeropage: 0,
        };
        // SAFETY: the caller guarantees zero-filling the range is sound; `arg` is valid.
        let r = cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut arg) });
        partial(r, arg.zeropage)
    }

    /// UFFDIO_ZEROPAGE; returns the bytes mapped.
    ///
    /// # Safety
    /// Mapping zeros at `start..start+len` must not break any Rust invariant there.
    pub unsafe fn zeropage(&self, start: usize, len: usize, mode: u64) -> io::Result<i64> {
        let mut arg = uffdio_zeropage {
            range: uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
            zeropage: 0,
        };
        // SAFETY: the caller guarantees zero-filling the range is sound; `arg` is valid.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut arg) })?;
        Ok(arg.zeropage)
    }

    /// UFFDIO_CONTINUE; returns the bytes mapped.
    ///
    /// # Safety
    /// Exposing the page-cache contents at `start..start+len` must not break any Rust invariant.
    pub unsafe fn continue_(&self, start: usize, len: usize, mode: u64) -> io::Result<i64> {
        let mut arg = uffdio_continue {
            range: uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
            mapped: 0,
        };
        // SAFETY: the caller guarantees mapping the existing pages is sound; `arg` is valid.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_CONTINUE as _, &mut arg) })?;
        Ok(arg.mapped)
    }

    /// UFFDIO_MOVE; returns the bytes moved.
    ///
    /// # Safety
    /// Both ranges lose / gain contents: nothing may reference `src` afterwards, and writing
    /// `dst` must not break any Rust invariant.
    pub unsafe fn move_(&self, dst: usize, src: usize, len: usize, mode: u64) -> io::Result<i64> {
        let mut arg = uffdio_move {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode,
            move_: 0,
        };
        // SAFETY: the caller guarantees moving the pages is sound; `arg` is valid.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_MOVE as _, &mut arg) })?;
        Ok(arg.move_)
    }

    /// UFFDIO_MOVE that reports partial progress, like [`Userfaultfd::copy_partial`]: `Ok(n)`
    /// when the kernel moved `n > 0` bytes from the start of the range (all of `len`, or fewer
    /// when it stopped early, e.g. at a destination page that exists; those `n` bytes' waiters
    /// are woken unless `UFFDIO_MOVE_MODE_DONTWAKE`); `Err` when it moved nothing (EEXIST: the
    /// first destination page exists; ENOENT: a source hole without
    /// `UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES`; EBUSY: a source page is shared or pinned). A
    /// PMD-aligned move of a source mapped by a huge page into a destination without a page
    /// table stays a huge page.
    ///
    /// # Safety
    /// As for [`Userfaultfd::move_`].
    pub unsafe fn move_partial(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        mode: u64,
    ) -> io::Result<usize> {
        let mut arg = uffdio_move {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode,
            move_: 0,
        };
        // SAFETY: the caller guarantees moving the pages is sound; `arg` is valid.
        let r = cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_MOVE as _, &mut arg) });
        partial(r, arg.move_)
    }

    /// UFFDIO_POISON; returns the bytes poisoned.
    ///
    /// # Safety
    /// Accesses to the range will raise SIGBUS afterwards: nothing may rely on reading it.
    pub unsafe fn poison(&self, start: usize, len: usize, mode: u64) -> io::Result<i64> {
        let mut arg = uffdio_poison {
            range: uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode,
            updated: 0,
        };
        // SAFETY: the caller guarantees poisoning the range is sound; `arg` is valid.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_POISON as _, &mut arg) })?;
        Ok(arg.updated)
    }

    /// Read as many pending events as fit in `buf` without blocking; returns how many (0 if none).
    pub fn read_events(&self, buf: &mut [uffd_msg]) -> io::Result<usize> {
        let size = std::mem::size_of::<uffd_msg>();
        loop {
            // SAFETY: `buf` is a valid writable buffer of `buf.len() * size` bytes and uffd_msg
            // is plain data valid for any bit pattern.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    std::mem::size_of_val(buf),
                )
            };
            if n >= 0 {
                return Ok(n as usize / size);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    /// Wait until events are readable or `timeout` passes (`None`: forever); true if readable.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> io::Result<bool> {
        poll_in(self.fd.as_fd(), timeout)
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Wait for POLLIN on `fd` up to `timeout`, retrying on EINTR with the remaining time.
pub(crate) fn poll_in(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let deadline = timeout.map(|t| std::time::Instant::now() + t);
    loop {
        let ms: libc::c_int = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(std::time::Instant::now());
                // Round up so that a sub-millisecond remainder still waits.
                left.as_micros()
                    .div_ceil(1000)
                    .min(libc::c_int::MAX as u128) as libc::c_int
            }
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd that outlives the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return Ok(true);
        }
        if r == 0 {
            return Ok(false);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn open_via_device() -> io::Result<OwnedFd> {
    const PATH: &CStr = c"/dev/userfaultfd";
    // SAFETY: PATH is a NUL-terminated string; open touches nothing else.
    let dev = unsafe { libc::open(PATH.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dev` is a new descriptor owned by nobody else.
    let dev = unsafe { OwnedFd::from_raw_fd(dev) };
    // SAFETY: USERFAULTFD_IOC_NEW takes the open flags by value and returns a new fd.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, OPEN_FLAGS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl returned a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn api(fd: BorrowedFd<'_>, features: u64) -> Result<ApiInfo, OpenError> {
    let mut arg = uffdio_api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: `arg` is a valid uffdio_api that outlives the call; the kernel writes only inside it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut arg) };
    if r < 0 {
        return Err(OpenError::Api {
            requested: Features(features),
            source: io::Error::last_os_error(),
        });
    }
    Ok(ApiInfo {
        available: Features(arg.features),
        ioctls: arg.ioctls,
    })
}

/// The outcome of a fill ioctl whose count field is `done`: bytes filled when positive (the
/// ioctl then fails with EAGAIN if it stopped early), else the ioctl's error.
fn partial(r: io::Result<libc::c_int>, done: i64) -> io::Result<usize> {
    match r {
        _ if done > 0 => Ok(done as usize),
        Ok(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        Err(e) => Err(e),
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Map;

    #[test]
    fn probe_reports_write_protect_support() {
        let info = Userfaultfd::probe().expect("probe");
        assert!(
            info.available.contains(UFFD_FEATURE_PAGEFAULT_FLAG_WP),
            "{:?}",
            info.available
        );
        assert_ne!(info.ioctls & (1 << _UFFDIO_REGISTER), 0);
        assert_ne!(info.ioctls & (1 << _UFFDIO_API), 0);
    }

    #[test]
    fn open_enables_requested_features_and_register_grants_writeprotect() {
        let avail = Userfaultfd::probe().unwrap().available;
        let want = UFFD_FEATURE_WP_UNPOPULATED & avail.0;
        let uffd = Userfaultfd::open(want).unwrap();
        assert_eq!(uffd.features().0, want);
        let m = Map::new(16 * 4096);
        let (p, len) = (m.0, m.1);
        let ioctls = uffd.register(p, len, UFFDIO_REGISTER_MODE_WP).unwrap();
        assert_ne!(
            ioctls & (1 << _UFFDIO_WRITEPROTECT),
            0,
            "ioctls {ioctls:#x}"
        );
        uffd.writeprotect(p, len, UFFDIO_WRITEPROTECT_MODE_WP)
            .unwrap();
        uffd.writeprotect(p, len, 0).unwrap();
        uffd.wake(p, len).unwrap();
        uffd.unregister(p, len).unwrap();
        let mut buf = [uffd_msg::default(); 4];
        assert_eq!(uffd.read_events(&mut buf).unwrap(), 0);
        assert!(!uffd.wait_readable(Some(Duration::from_millis(10))).unwrap());
    }

    #[test]
    fn partial_fills_report_what_they_filled_and_stop_at_an_existing_page() {
        let uffd = Userfaultfd::open(0).unwrap();
        let m = Map::new(4 * 4096);
        let (p, len) = (m.0, m.1);
        let ioctls = uffd.register(p, len, UFFDIO_REGISTER_MODE_MISSING).unwrap();
        assert_ne!(ioctls & (1 << _UFFDIO_COPY), 0, "ioctls {ioctls:#x}");
        let src = vec![0x5au8; 4 * 4096];
        // SAFETY: `m` is our own fresh mapping, referenced by nothing; `src` is readable.
        let n = unsafe { uffd.copy_partial(p + 2 * 4096, src.as_ptr() as usize, 4096, 0) };
        assert_eq!(n.unwrap(), 4096);
        // Pages 0 and 1 are filled, then the existing page 2 stops the copy.
        // SAFETY: as above.
        let n = unsafe { uffd.copy_partial(p, src.as_ptr() as usize, len, 0) };
        assert_eq!(n.unwrap(), 2 * 4096);
        // Starting at an existing page copies nothing: EEXIST.
        // SAFETY: as above.
        let e = unsafe { uffd.zeropage_partial(p + 2 * 4096, 2 * 4096, 0) }.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");
        // SAFETY: as above.
        let n = unsafe { uffd.zeropage_partial(p + 3 * 4096, 4096, 0) };
        assert_eq!(n.unwrap(), 4096);
        uffd.unregister(p, len).unwrap();
        // SAFETY: every page is filled and the mapping is ours.
        let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
        assert!(bytes[..3 * 4096].iter().all(|&b| b == 0x5a));
        assert!(bytes[3 * 4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_move_takes_the_source_pages_and_stops_at_an_existing_destination_page() {
        let avail = Userfaultfd::probe().unwrap().available;
        if !avail.contains(UFFD_FEATURE_MOVE) {
            return;
        }
        let uffd = Userfaultfd::open(UFFD_FEATURE_MOVE).unwrap();
        let dst = Map::new(4 * 4096);
        let src = Map::new(4 * 4096);
        let ioctls = uffd
            .register(dst.0, dst.1, UFFDIO_REGISTER_MODE_MISSING)
            .unwrap();
        assert_ne!(ioctls & (1 << _UFFDIO_MOVE), 0, "ioctls {ioctls:#x}");
        for page in 0..4 {
            src.write(page, 0x10 + page as u8);
        }
        let zeros = [0u8; 4096];
        // SAFETY: `dst` is our own fresh mapping, referenced by nothing; `zeros` is readable.
        let n = unsafe { uffd.copy_partial(dst.0 + 2 * 4096, zeros.as_ptr() as usize, 4096, 0) };
        assert_eq!(n.unwrap(), 4096);
        // Pages 0 and 1 move, then the existing destination page 2 stops the move.
        // SAFETY: both mappings are ours and referenced by nothing.
        let n = unsafe { uffd.move_partial(dst.0, src.0, dst.1, 0) };
        assert_eq!(n.unwrap(), 2 * 4096);
        // SAFETY: as above.
        let e = unsafe { uffd.move_partial(dst.0 + 2 * 4096, src.0 + 2 * 4096, 4096, 0) };
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EEXIST));
        // A source hole: ENOENT without ALLOW_SRC_HOLES.
        // SAFETY: as above.
        let e = unsafe { uffd.move_partial(dst.0 + 3 * 4096, src.0, 4096, 0) };
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::ENOENT));
        uffd.unregister(dst.0, dst.1).unwrap();
        // SAFETY: the mappings are ours; reading a hole reads zeros.
        let (d, s) = unsafe {
            (
                std::slice::from_raw_parts(dst.0 as *const u8, dst.1),
                std::slice::from_raw_parts(src.0 as *const u8, src.1),
            )
        };
        assert_eq!([d[0], d[4096], d[2 * 4096]], [0x10, 0x11, 0]);
        assert_eq!(
            [s[0], s[4096], s[2 * 4096]],
            [0, 0, 0x12],
            "moved pages leave holes"
        );
    }

    #[test]
    fn unsupported_feature_is_refused_by_the_handshake() {
        let err = Userfaultfd::open(1 << 63).unwrap_err();
        assert!(matches!(err, OpenError::Api { .. }), "{err}");
    }

    #[test]
    fn writeprotect_on_unregistered_memory_fails() {
        let uffd = Userfaultfd::open(0).unwrap();
        let m = Map::new(4096);
        let p = m.0;
        let err = uffd
            .writeprotect(p, 4096, UFFDIO_WRITEPROTECT_MODE_WP)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
    }

    #[test]
    fn permission_message_is_plain() {
        let e = OpenError::Unavailable {
            device: io::Error::from_raw_os_error(libc::EACCES),
            syscall: io::Error::from_raw_os_error(libc::EPERM),
            unprivileged_sysctl: Some(0),
        };
        assert!(e.is_permission_denied());
        let msg = e.to_string();
        assert!(msg.contains("/dev/userfaultfd not accessible"), "{msg}");
        assert!(msg.contains("vm.unprivileged_userfaultfd=0"), "{msg}");
        assert!(msg.contains("run as root"), "{msg}");
    }

    #[test]
    fn features_print_as_names() {
        let f = Features(UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_MOVE | (1 << 40));
        assert_eq!(f.to_string(), "WP_UNPOPULATED|MOVE|0x10000000000");
        assert_eq!(Features(0).to_string(), "(none)");
    }
}
