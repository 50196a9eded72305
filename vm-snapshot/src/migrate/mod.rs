//! Live migration: a running VM moves to another VMM with a downtime that does not depend on how
//! fast the guest writes, and every page crosses the wire once.
//!
//! It is a lazy restore ([`crate::restore_lazy`]) whose page source is a connection:
//!
//! - **Source** ([`migrate_out`]): connects, authenticates, has the destination prepare the VM
//!   from its configuration, opens the demand connection, then freezes the VM (every vCPU parked,
//!   machine state captured). From then on its guest never runs again unless the migration fails
//!   before the destination runs, so its RAM is static and is served from the source's own
//!   memory: no write protection, no userfaultfd. It sends the state and the memory map, waits
//!   for `Running`, then streams every 2 MiB unit in address order on the bulk connection (units
//!   the save's scanner would skip as holding no data, and 64 KiB pieces that read as zeros, as
//!   zero frames of a few bytes), while a second thread answers each `Request` on the demand
//!   connection at once. Each piece is sent once: a sent bit per piece, claimed atomically by
//!   whichever sender takes it first (a piece the stream claimed is not sent on demand, and
//!   the stream skips a piece sent on demand). On `Done` the source's VM is stopped for good.
//! - **Destination** ([`Listener`]): accepts one authenticated connection, builds fresh guest
//!   memory registered in userfaultfd MISSING mode, accepts the demand connection, starts the
//!   vCPUs from the state and answers `Running`. A fault thread asks the source for the faulting
//!   64 KiB piece (`Request`, on the demand connection); a receive thread per connection fills
//!   whatever arrives (`UFFDIO_COPY`, which wakes the faulting vCPU; a piece that arrives twice
//!   is refused as corrupt, never filled again). Once every piece is resident it unregisters,
//!   sends `Done` with its figures, and collapses the units that hold data back into huge pages
//!   (best effort). A frame that fails its checks stops the destination VMM: its vCPUs never run
//!   on a wrong or zero page (the registration is kept until the process ends). A connection
//!   lost before every page arrived makes it wait for the source to reconnect (below).
//!
//! # Wire protocol (version 2)
//!
//! Two streams (TCP or Unix sockets) to the same endpoint: the **bulk** connection carries the
//! handshake, the VM and the stream; the **demand** connection carries only `Request`s and the
//! pieces that answer them, so a requested piece never queues behind bulk data in the socket
//! buffers. Frames in both directions. A frame is a 12-byte header
//! (`kind` u8, three zero bytes, payload length u32 LE, crc32 u32 LE of the first 8 header
//! bytes and the payload) and the payload. The reader checks the kind, the zero bytes and the
//! length against the kind's bound before it allocates, and the crc before it looks at the
//! payload; anything else is a typed error ([`MigrateError::Corrupt`], [`MigrateError::Truncated`]).
//!
//! | kind | dir | payload |
//! |---|---|---|
//! | 1 `Hello` | both | magic `snapctl-migrate\0`, version u32, role u8 (1 source, 2 destination), 32-byte nonce |
//! | 2 `Auth` | both | HMAC-SHA256(secret, magic ‖ version ‖ role ‖ source nonce ‖ destination nonce) |
//! | 3 `AuthOk` | d→s | empty: the source's proof checks |
//! | 4 `State` | s→d | the machine state (`vmm_core::MachineState::to_bytes`, ≤ 16 MiB) |
//! | 5 `Map` | s→d | page size u32, region count u32, then per region guest address u64 and size u64 |
//! | 6 `Running` | d→s | empty: the destination's vCPUs run |
//! | 7 `Data` | s→d | guest address u64, length u32 (64 KiB pieces inside one 2 MiB unit), encoding u8 (0 raw, 1 zstd, 2 zero), 3 zero bytes, then the bytes |
//! | 8 `Request` | d→s | guest address u64 of a 64 KiB piece to send first |
//! | 9 `End` | s→d | empty: every piece was sent |
//! | 10 `Done` | d→s | the destination's figures, JSON ([`DestFigures`]) |
//! | 11 `Error` | both | why the sender gives up, UTF-8 |
//! | 12 `Prepare` | s→d | the VM's configuration (`vmm_core::VmConfig`, JSON), before the freeze |
//! | 13 `Prepared` | d→s | the 32-byte session id: memory is registered and the KVM VM and vCPUs exist |
//! | 14 `Attach` | s→d | the session id, first on the demand connection after its handshake |
//! | 15 `Attached` | d→s | empty: the demand connection is bound to the session |
//! | 16 `Resume` | s→d | the session id, first on a reconnection's bulk connection after its handshake |
//! | 17 `Have` | d→s | one bit per piece (LSB first, pieces numbered across the regions): resident |
//!
//! Bulk connection: `Hello` s→d; `Hello`, `Auth` d→s; `Auth` s→d; `AuthOk` d→s (or `Error` and
//! close); then `Prepare`; `Prepared` with a fresh random session id (the guest still runs at the
//! source: the destination's VM is built outside the downtime). Demand connection, to the same
//! endpoint: the same handshake, then `Attach` with the session id; `Attached` (a peer naming
//! another session is refused with `Error`, and the destination waits on for the right one).
//! Then, on the bulk connection: the freeze, `State`, `Map`; `Running`; the stream's `Data`…,
//! `End`; `Done`. On the demand connection: `Request`s d→s, the `Data` answering them s→d, and
//! an `End` after the stream ended (every piece sent on it precedes it). After both `End`s every
//! piece must be resident. The state's configuration must be the prepared one.
//!
//! A **reconnection** (`migrate --resume`) opens a bulk connection with the handshake, then
//! `Resume` with the session id; `Have` d→s; a demand connection as above; the destination asks
//! again for every piece its vCPUs wait on; the source sends every piece not in `Have` (each
//! once), `End` on both, and `Done` follows.
//!
//! **Authentication** (`auth.rs`): both sides read a shared secret from a token file (mode 0600
//! or stricter, refused otherwise) and prove they hold it with fresh nonces; no state is sent
//! before the destination accepted the source's proof, and the destination accepts no state
//! from an unauthenticated peer (it keeps listening for the right one). Pages are **not
//! encrypted** and frames after the handshake are not authenticated: migrate over a Unix socket
//! or a trusted network (as QEMU's plain migration), or tunnel the TCP connection.
//!
//! # Failure
//!
//! - Lost (or refused) before the source read `Running`: the source resumes its guest as if
//!   nothing happened (the destination had not received a single page, so its vCPUs could not
//!   have run a single instruction) and reports the error.
//! - Lost after: the source keeps the VM frozen (never resumed by itself: never two running
//!   copies) and reports it ([`MigrateFailure::dest_running`], with [`MigrateFailure::interrupted`]
//!   to reconnect). The destination keeps its VM: both connections are shut, vCPUs that touch a
//!   missing page block, `status` says it waits for the source, and it accepts a reconnection
//!   (authenticated, naming its session) on the same address for the resume timeout
//!   ([`Listener::with_resume_timeout`], default 60 s). 30 s without a byte on the bulk
//!   connection count as lost (a half-open connection, a stalled source), as 30 s blocked writing
//!   do at the source. [`migrate_resume`] on the source
//!   reconnects; the pieces lost in flight are sent again (the destination never had them). If
//!   no source reconnects in time the destination stops ([`IncomingFailure::resume_timed_out`]).
//! - Corrupt (a frame that fails its checks, a piece sent twice, an `Error` frame): the
//!   destination stops at once; the source stays frozen as above.
//! - The source can then be resumed from its freeze instant by an explicit, forced request
//!   (`snapctl resume --force-after-failed-migration`): whatever the destination's guest did after
//!   the freeze is lost, and the destination must have been stopped first.
//!
//! Not supported: hugetlbfs guest memory on the destination.

mod auth;
mod dest;
mod source;
pub mod wire;

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// The same type as [`crate::CollapseHold`], returned by [`Incoming::hold_collapse`].
pub use crate::fill_end::CollapseHold as IncomingCollapseHold;
pub use auth::{dest_handshake, source_handshake, Token};
pub use dest::{
    DestFigures, Incoming, IncomingFailure, IncomingStatus, Listener, StartPhases,
    DEFAULT_RESUME_TIMEOUT,
};
pub use source::{
    migrate_out, migrate_resume, Interrupted, MigrateFailure, MigrateParams, MigrateProgress,
    MigrateReport,
};

/// Bytes of a unit (an x86-64 huge page): the stream's order and the destination's collapse.
pub const UNIT: u64 = 2 << 20;
/// Bytes of a piece: what a demand request asks for, and what is tracked as sent or resident.
pub const PIECE: u64 = 64 << 10;
/// Bytes of a session id (binds the demand connection to the first).
pub const SESSION_LEN: usize = 32;
/// How long connecting and each handshake step may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a migration (either side) failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The token file is unusable.
    #[error("token file {path}: {why}")]
    Token {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// The address is not `HOST:PORT` or `unix:PATH`.
    #[error("bad address `{0}`: use HOST:PORT or unix:PATH")]
    Address(String),
    /// An I/O error on the connection or while listening.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] io::Error),
    /// The peer closed the connection between frames.
    #[error("the peer closed the connection")]
    Closed,
    /// The stream ended inside a frame.
    #[error("the stream ended inside a frame (truncated)")]
    Truncated,
    /// A frame failed its checks (kind, length bound, crc) or broke the protocol.
    #[error("corrupt stream: {0}")]
    Corrupt(String),
    /// The peer speaks another protocol version.
    #[error("the peer speaks migration protocol version {0}, this build speaks 2")]
    Version(u32),
    /// The mutual authentication failed.
    #[error("authentication failed: {0}")]
    AuthFailed(&'static str),
    /// The peer gave up and said why.
    #[error("the peer gave up: {0}")]
    Peer(String),
    /// The machine state does not decode, or the memory map does not fit it.
    #[error("the incoming VM is unusable: {0}")]
    BadVm(String),
    /// This side cannot run the VM (memory, userfaultfd, KVM).
    #[error("{0}")]
    Local(String),
    /// The VM was not running or could not be paused or resumed.
    #[error("{0}")]
    Vm(String),
    /// Cancelled before the destination ran.
    #[error("cancelled")]
    Cancelled,
}

/// Where a migration goes: `HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP.
    Tcp(String),
    /// A Unix stream socket.
    Unix(PathBuf),
}

impl Endpoint {
    /// Parses `HOST:PORT` or `unix:PATH`.
    pub fn parse(s: &str) -> Result<Endpoint, MigrateError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(MigrateError::Address(s.into()));
            }
            return Ok(Endpoint::Unix(p.into()));
        }
        match s.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                Ok(Endpoint::Tcp(s.into()))
            }
            _ => Err(MigrateError::Address(s.into())),
        }
    }

    /// Connects (at most [`HANDSHAKE_TIMEOUT`] per address for TCP).
    pub fn connect(&self) -> Result<Conn, MigrateError> {
        match self {
            Endpoint::Unix(p) => UnixStream::connect(p)
                .map(Conn::Unix)
                .map_err(|e| MigrateError::Io("connecting to the destination", e)),
            Endpoint::Tcp(a) => {
                let addrs = a
                    .to_socket_addrs()
                    .map_err(|e| MigrateError::Io("resolving the destination", e))?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return Ok(Conn::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(MigrateError::Io("connecting to the destination", last))
            }
        }
    }
}

/// A migration connection.
#[derive(Debug)]
pub enum Conn {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix stream socket.
    Unix(UnixStream),
}

impl Conn {
    /// A second handle on the same connection (one thread reads, another writes).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    /// Read timeout (`None`: block).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(t),
            Conn::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Write timeout (`None`: block).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_write_timeout(t),
            Conn::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Shuts both directions down (wakes a thread blocked reading it).
    pub fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Guest RAM regions `(guest address, bytes)`, each a whole number of units, as the `Map` frame
/// carries them; pieces are numbered across the regions in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Regions(pub Vec<(u64, u64)>);

impl Regions {
    pub(crate) fn of(mem: &vm_memory::GuestMemoryMmap) -> Regions {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        Regions(mem.iter().map(|r| (r.start_addr().0, r.len())).collect())
    }

    pub(crate) fn total(&self) -> u64 {
        self.0.iter().map(|r| r.1).sum()
    }

    /// The piece number of guest address `gpa`, if it is guest RAM.
    pub(crate) fn piece_of(&self, gpa: u64) -> Option<usize> {
        let mut before = 0;
        for &(a, n) in &self.0 {
            if gpa >= a && gpa - a < n {
                return Some(((before + gpa - a) / PIECE) as usize);
            }
            before += n;
        }
        None
    }

    /// The guest address of piece `p`.
    pub(crate) fn gpa_of(&self, p: usize) -> u64 {
        let mut off = p as u64 * PIECE;
        for &(a, n) in &self.0 {
            if off < n {
                return a + off;
            }
            off -= n;
        }
        unreachable!("piece {p} beyond guest RAM")
    }

    pub(crate) fn encode(&self, page_size: u32) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + 16 * self.0.len());
        v.extend_from_slice(&page_size.to_le_bytes());
        v.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        for &(a, n) in &self.0 {
            v.extend_from_slice(&a.to_le_bytes());
            v.extend_from_slice(&n.to_le_bytes());
        }
        v
    }

    pub(crate) fn decode(b: &[u8]) -> Result<(u32, Regions), MigrateError> {
        let bad = |w: &str| MigrateError::Corrupt(format!("memory map: {w}"));
        if b.len() < 8 {
            return Err(bad("too short"));
        }
        let ps = u32::from_le_bytes(b[..4].try_into().expect("4"));
        let n = u32::from_le_bytes(b[4..8].try_into().expect("4")) as usize;
        if b.len() != 8 + 16 * n {
            return Err(bad("length does not match its region count"));
        }
        let v = b[8..]
            .chunks_exact(16)
            .map(|c| {
                (
                    u64::from_le_bytes(c[..8].try_into().expect("8")),
                    u64::from_le_bytes(c[8..].try_into().expect("8")),
                )
            })
            .collect();
        Ok((ps, Regions(v)))
    }

    /// Each region a non-empty whole number of units.
    pub(crate) fn check(&self) -> Result<(), MigrateError> {
        if self.0.is_empty()
            || self
                .0
                .iter()
                .any(|&(a, n)| n == 0 || a % UNIT != 0 || n % UNIT != 0)
        {
            return Err(MigrateError::BadVm(format!(
                "guest RAM regions {:x?} are not whole 2 MiB units",
                self.0
            )));
        }
        Ok(())
    }
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_regions() {
        assert_eq!(
            Endpoint::parse("unix:/tmp/x").unwrap(),
            Endpoint::Unix("/tmp/x".into())
        );
        assert!(Endpoint::parse("127.0.0.1:4444").is_ok());
        assert!(Endpoint::parse("[::1]:4444").is_ok());
        for bad in ["unix:", "host", "host:port", ":12"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
        let r = Regions(vec![(0, 4 * UNIT), (1 << 32, 2 * UNIT)]);
        r.check().unwrap();
        let per_unit = (UNIT / PIECE) as usize;
        assert_eq!(r.piece_of(1 << 32), Some(4 * per_unit));
        assert_eq!(r.gpa_of(4 * per_unit + 1), (1 << 32) + PIECE);
        assert_eq!(r.piece_of(4 * UNIT), None);
        let (ps, back) = Regions::decode(&r.encode(4096)).unwrap();
        assert_eq!((ps, back), (4096, r));
        assert!(Regions::decode(&[0; 9]).is_err());
        assert!(Regions(vec![(0, UNIT + 4096)]).check().is_err());
    }
}
