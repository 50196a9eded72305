//! The destination of a migration: listen, accept one authenticated source and its demand
//! connection, build the VM from its state on memory registered in MISSING mode, run it, and fill
//! memory from the connections: a fault thread requests what the vCPUs touch, a receive thread
//! per connection fills whatever arrives; after lost connections, wait for the source to
//! reconnect.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_core::{MachineState, MemBackend, Vm};
use wp_tracker::{HostRange, MissingFault, MissingTracker};

use super::wire::{expect_frame, read_frame, write_frame, Encoding, Kind, DATA_HEAD};
use super::{
    dest_handshake, lock, ms, Conn, Endpoint, MigrateError, Regions, Token, HANDSHAKE_TIMEOUT,
    PIECE, UNIT,
};
use crate::fill_end::{wait_end, CollapseGate, CollapseHold, WaitSamples};
use crate::{chain, RestoreParams};

/// How long the source may take to send the state and map after the handshake.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the fault thread waits for events before it looks at the stop flag.
const FAULT_POLL: Duration = Duration::from_millis(20);
/// Real-time priority of the fault thread where permitted (as lazy restore's).
const FAULT_RT_PRIORITY: i32 = 1;
/// Nice value of the fault thread otherwise.
const FAULT_NICE: i32 = -10;
/// Socket receive buffer asked for (the kernel doubles it).
const RECV_BUFFER: usize = 256 << 10;
/// Nice value of the demand connection's receive thread where `SCHED_FIFO` is not permitted: it
/// fills what the vCPUs wait for, ahead of them.
const RECV_NICE: i32 = -10;
/// Nice value of the bulk connection's receive thread (at nice 0, the vCPUs' equal, the transfer
/// took 1.6 times as long for no better guest rate during it: docs/PERFORMANCE.md).
const BULK_NICE: i32 = -10;
/// Adjacent units collapsed by one call at most.
const COLLAPSE_BATCH: usize = 32;
/// Silence on the bulk connection (no byte) that counts as a lost connection: a half-open
/// connection or a stalled source (the source streams without pause until the end).
const BULK_SILENCE: Duration = Duration::from_secs(30);
/// How long a destination whose connection was lost waits for the source to reconnect.
pub const DEFAULT_RESUME_TIMEOUT: Duration = Duration::from_secs(60);

/// A listening destination (`snapctl restore --listen`).
#[derive(Debug)]
pub struct Listener {
    inner: Inner,
    token: Token,
    address: String,
    resume_timeout: Duration,
}

#[derive(Debug)]
enum Inner {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// What the destination measured, sent to the source in `Done`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DestFigures {
    /// Missing-page faults read (several vCPUs may fault on one piece).
    pub faults: u64,
    /// Pieces requested from the source.
    pub requests: u64,
    /// Fault wait (event read → piece filled, requests and pieces the source had sent already
    /// alike) p50, µs.
    pub fault_wait_p50_us: u64,
    /// … p99, µs.
    pub fault_wait_p99_us: u64,
    /// … longest, µs.
    pub fault_wait_max_us: u64,
    /// From the vCPUs' start until every page was resident, seconds.
    pub resident_s: f64,
    /// Bytes read from the connection.
    pub received_bytes: u64,
}

/// Progress of an incoming migration, for `status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IncomingStatus {
    /// Where it comes from.
    pub peer: String,
    /// Guest bytes resident so far.
    pub resident_bytes: u64,
    /// Guest bytes in all.
    pub total_bytes: u64,
    /// Every page resident and the memory unregistered.
    pub resident: bool,
    /// Resident and collapsed into huge pages: the migration is over.
    pub done: bool,
    /// Why it failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// The connection to the source was lost: the VM waits (vCPUs that touch a missing page
    /// block) for `snapctl migrate --resume` on the source.
    pub waiting_for_source: bool,
    /// Why the connection was lost, while waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
    /// Seconds left before it gives up waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_deadline_s: Option<f64>,
    /// Times the source reconnected.
    pub reconnects: u64,
    /// From accepting the connection (handshake included) to the vCPUs' start, ms.
    pub start_ms: f64,
    /// Of that: receiving and decoding the state and map, creating and registering guest memory,
    /// and building the VM, ms.
    pub start_phases_ms: StartPhases,
    /// The figures so far.
    pub figures: DestFigures,
    /// The collapse into huge pages, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collapse_ms: Option<f64>,
    /// Units the kernel did not collapse.
    pub collapse_failures: u64,
}

/// Where the destination's start went, ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StartPhases {
    /// Before the freeze: guest memory created and registered, the KVM VM and vCPUs created.
    pub prepare: f64,
    /// `Prepared` sent → state and map received and decoded (the source's freeze included).
    pub receive: f64,
    /// The regions checked and the fault thread started.
    pub memory: f64,
    /// The state loaded into the prepared VM and its vCPUs started.
    pub vm: f64,
}

/// Why an incoming migration stopped before every page was resident. The VM must not run on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct IncomingFailure {
    /// What happened.
    pub message: String,
    /// The stream was corrupt (a frame failed its checks), rather than lost.
    pub corrupt: bool,
    /// The connection was lost and the source did not reconnect in time.
    pub resume_timed_out: bool,
}

/// A migrated VM's memory arriving (or arrived). Keep it as long as the VM runs.
#[derive(Debug)]
pub struct Incoming {
    shared: Arc<Shared>,
}

struct Shared {
    tracker: Arc<MissingTracker>,
    mem: GuestMemoryMmap,
    regions: Regions,
    /// Host address of each region.
    hosts: Vec<usize>,
    /// Per piece: resident.
    resident_piece: Vec<AtomicBool>,
    /// Per unit: some data (not zeros) filled: collapsed at the end.
    unit_data: Vec<AtomicBool>,
    /// Pieces requested and not filled yet, with when their first fault was read.
    requested: Mutex<HashMap<usize, Instant>>,
    /// The bulk connection (`Running`, `Done`).
    writer: Mutex<Conn>,
    /// The demand connection (`Request`s).
    demand: Mutex<Conn>,
    /// `End` frames read (one per connection).
    ends: AtomicU64,
    /// Binds the demand connection and a reconnecting source to this migration.
    session: [u8; super::SESSION_LEN],
    /// Kept for a source that reconnects.
    listener: Mutex<Option<Listener>>,
    resume_timeout: Duration,
    /// Generation of the connections in `writer` and `demand` (one more per reconnect): a
    /// thread of an older one reports no loss.
    gen: AtomicU64,
    /// The connections were lost: why, and since when (the VM waits for the source).
    waiting: Mutex<Option<(String, Instant)>>,
    /// Receive threads running.
    receivers: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    peer: String,
    resident: AtomicU64,
    total: u64,
    faults: AtomicU64,
    requests: AtomicU64,
    received: AtomicU64,
    waits: Mutex<WaitSamples>,
    stop: AtomicBool,
    /// `Running` was sent: requests may follow it (never before: the vCPUs start, and fault,
    /// before it is sent).
    running_sent: AtomicBool,
    /// The [`Incoming`] was dropped.
    quit: AtomicBool,
    finishing: AtomicBool,
    t0: Instant,
    start: Mutex<Duration>,
    phases: Mutex<StartPhases>,
    /// The [`CollapseHold`]s and the collapse call in flight.
    collapse: Arc<CollapseGate>,
    end: Mutex<End>,
    end_cv: Condvar,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("peer", &self.peer)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct End {
    failed: Option<IncomingFailure>,
    resident_at: Option<Duration>,
    done: bool,
    collapse: Option<Duration>,
    collapse_failures: u64,
}

impl Listener {
    /// Listens on `address` (`HOST:PORT`, port 0 picks one, or `unix:PATH`, created mode 0600,
    /// removed on drop) for a source holding the secret in `token_file`.
    pub fn bind(address: &str, token_file: &Path) -> Result<Listener, MigrateError> {
        let token = Token::read(token_file)?;
        let io = |e| MigrateError::Io("listening for the migration", e);
        let (inner, address) = match Endpoint::parse(address)? {
            Endpoint::Tcp(a) => {
                let l = TcpListener::bind(&a).map_err(io)?;
                // Inherited by the accepted connections (bulk and demand).
                let _ = nix::sys::socket::setsockopt(
                    &l,
                    nix::sys::socket::sockopt::RcvBuf,
                    &RECV_BUFFER,
                );
                let local = l.local_addr().map_err(io)?.to_string();
                (Inner::Tcp(l), local)
            }
            Endpoint::Unix(p) => {
                if std::fs::symlink_metadata(&p).is_ok() {
                    return Err(MigrateError::Local(format!(
                        "{} exists; remove it or listen elsewhere",
                        p.display()
                    )));
                }
                let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
                let l = UnixListener::bind(&p);
                nix::sys::stat::umask(old);
                let a = format!("unix:{}", p.display());
                (Inner::Unix(l.map_err(io)?, p), a)
            }
        };
        Ok(Listener {
            inner,
            token,
            address,
            resume_timeout: DEFAULT_RESUME_TIMEOUT,
        })
    }

    /// How long the VM waits for the source to reconnect (`snapctl migrate --resume`) after a
    /// connection was lost once it ran (default [`DEFAULT_RESUME_TIMEOUT`]).
    pub fn with_resume_timeout(mut self, t: Duration) -> Listener {
        self.resume_timeout = t;
        self
    }

    /// The address it listens on (a TCP port 0 resolved).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Waits for a source that authenticates (others are refused and logged; the listener
    /// waits on), receives the state and map, builds the VM on fresh memory registered for
    /// missing-page faults, starts it and tells the source. A bad state or map is refused
    /// before any vCPU exists.
    pub fn accept(self, params: RestoreParams) -> Result<(Vm, Incoming), MigrateError> {
        let (conn, mut r, mut w, peer, t0) = self.authenticated(None, None)?;
        log::info!("migration: {peer} authenticated; receiving the VM");
        let started = (|| -> Result<(Vm, Incoming), MigrateError> {
            let _ = conn.set_read_timeout(Some(STATE_TIMEOUT));
            // Before the source freezes: memory, its registration, the KVM VM and vCPUs.
            let mut buf = Vec::new();
            expect_frame(&mut r, &mut buf, Kind::Prepare)?;
            let cfg: vmm_core::VmConfig = serde_json::from_slice(&buf)
                .map_err(|e| MigrateError::BadVm(format!("configuration: {e}")))?;
            let t = Instant::now();
            let prepared = prepare(&cfg, params.backend)?;
            let prepare_ms = ms(t.elapsed());
            let session = super::auth::nonce()?;
            write_frame(&mut w, Kind::Prepared, &[&session])
                .map_err(|e| MigrateError::Io("telling the source the VM is prepared", e))?;
            let demand = self.attach(&session, Instant::now() + STATE_TIMEOUT, None)?;
            let t_auth = Instant::now();
            let mut state = Vec::new();
            expect_frame(&mut r, &mut state, Kind::State)?;
            let mut map = Vec::new();
            expect_frame(&mut r, &mut map, Kind::Map)?;
            let state = MachineState::from_bytes(&state)
                .map_err(|e| MigrateError::BadVm(format!("machine state: {}", chain(&e))))?;
            let (_, regions) = Regions::decode(&map)?;
            let receive = ms(t_auth.elapsed());
            let built = build(
                state,
                regions,
                prepared,
                params,
                conn.try_clone(),
                demand,
                session,
                self.resume_timeout,
                peer.clone(),
                t0,
            )?;
            {
                let mut ph = lock(&built.1.shared.phases);
                ph.receive = receive;
                ph.prepare = prepare_ms;
            }
            Ok(built)
        })();
        let (vm, incoming) = match started {
            Ok(x) => x,
            Err(e) => {
                let _ = write_frame(&mut w, Kind::Error, &[e.to_string().as_bytes()]);
                conn.shutdown();
                return Err(e);
            }
        };
        let _ = conn.set_read_timeout(None);
        let _ = conn.set_write_timeout(None);
        write_frame(&mut *lock(&incoming.shared.writer), Kind::Running, &[])
            .map_err(|e| MigrateError::Io("telling the source the VM runs", e))?;
        incoming.shared.running_sent.store(true, Ordering::SeqCst);
        start_receivers(&incoming.shared, r, 0)?;
        // Kept for a source that reconnects after a lost connection.
        *lock(&incoming.shared.listener) = Some(self);
        Ok((vm, incoming))
    }

    /// The next connection (until `deadline`, if any) whose peer authenticates; others are
    /// refused and logged.
    #[allow(clippy::type_complexity)]
    fn authenticated(
        &self,
        deadline: Option<Instant>,
        quit: Option<&AtomicBool>,
    ) -> Result<(Conn, BufReader<Conn>, Conn, String, Instant), MigrateError> {
        loop {
            let (conn, peer) = self.accept_one(deadline, quit)?;
            let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
            let _ = conn.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
            let res = conn.try_clone().and_then(|r| Ok((r, conn.try_clone()?)));
            let Ok((r, mut w)) = res else { continue };
            let mut r = BufReader::with_capacity(UNIT as usize + 64 * 1024, r);
            let t0 = Instant::now();
            match dest_handshake(&mut r, &mut w, &self.token) {
                Ok(()) => return Ok((conn, r, w, peer, t0)),
                Err(e) => {
                    log::warn!("migration: refused a connection from {peer}: {e}; listening on");
                    conn.shutdown();
                }
            }
        }
    }

    /// One connection, waiting until `deadline` at most (`None`: for ever) or until `quit` is set.
    fn accept_one(
        &self,
        deadline: Option<Instant>,
        quit: Option<&AtomicBool>,
    ) -> Result<(Conn, String), MigrateError> {
        let io = |e| MigrateError::Io("accepting the migration", e);
        let nonblocking = deadline.is_some();
        match &self.inner {
            Inner::Tcp(l) => l.set_nonblocking(nonblocking),
            Inner::Unix(l, _) => l.set_nonblocking(nonblocking),
        }
        .map_err(io)?;
        loop {
            let got = match &self.inner {
                Inner::Tcp(l) => l.accept().map(|(s, a)| {
                    let _ = s.set_nodelay(true);
                    (
                        s.set_nonblocking(false).map(|()| Conn::Tcp(s)),
                        a.to_string(),
                    )
                }),
                Inner::Unix(l, p) => l.accept().map(|(s, _)| {
                    (
                        s.set_nonblocking(false).map(|()| Conn::Unix(s)),
                        format!("unix:{}", p.display()),
                    )
                }),
            };
            match got {
                Ok((c, peer)) => return Ok((c.map_err(io)?, peer)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if quit.is_some_and(|q| q.load(Ordering::SeqCst)) {
                        return Err(MigrateError::Cancelled);
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(MigrateError::Io(
                            "waiting for the source to connect",
                            std::io::ErrorKind::TimedOut.into(),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
    }

    /// The source's demand connection: authenticated, and bound to this migration by its session id (`Attach`)
    /// (a peer that names another session is refused; the listener waits on until `deadline`).
    fn attach(
        &self,
        session: &[u8],
        deadline: Instant,
        quit: Option<&AtomicBool>,
    ) -> Result<Conn, MigrateError> {
        loop {
            let (conn, mut r, mut w, peer, _) = self.authenticated(Some(deadline), quit)?;
            let mut buf = Vec::new();
            let ok = expect_frame(&mut r, &mut buf, Kind::Attach)
                .and_then(|()| same_session(&buf, session));
            match ok.and_then(|()| {
                write_frame(&mut w, Kind::Attached, &[])
                    .map_err(|e| MigrateError::Io("binding the demand connection", e))
            }) {
                Ok(_) => {
                    let _ = conn.set_read_timeout(None);
                    let _ = conn.set_write_timeout(None);
                    return Ok(conn);
                }
                Err(e) => {
                    log::warn!("migration: refused a demand connection from {peer}: {e}");
                    let _ = write_frame(&mut w, Kind::Error, &[b"not this migration's session"]);
                    conn.shutdown();
                }
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Inner::Unix(_, p) = &self.inner {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Whether `got` is the session id `want` (compared in constant time: the id is a secret of the
/// session).
fn same_session(got: &[u8], want: &[u8]) -> Result<(), MigrateError> {
    if got.len() == want.len() && got.iter().zip(want).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0 {
        Ok(())
    } else {
        Err(MigrateError::Corrupt("another session's id".into()))
    }
}

/// Starts the receive threads of connection generation `gen`: the bulk connection read by `r`,
/// the demand connection as installed in `s`.
fn start_receivers(s: &Arc<Shared>, mut r: BufReader<Conn>, gen: u64) -> Result<(), MigrateError> {
    let _ = r.get_ref().set_read_timeout(Some(BULK_SILENCE));
    let mut dr = BufReader::with_capacity(
        PIECE as usize + 1024,
        lock(&s.demand)
            .try_clone()
            .map_err(|e| MigrateError::Io("duplicating the demand connection", e))?,
    );
    let s1 = s.clone();
    s.receivers.fetch_add(1, Ordering::SeqCst);
    if let Err(e) = spawn(s, "migrate-recv", move || {
        let _ = uffd_sys::host::set_thread_nice(BULK_NICE);
        receive(&s1, &mut r, gen);
        s1.receivers.fetch_sub(1, Ordering::SeqCst);
    }) {
        s.receivers.fetch_sub(1, Ordering::SeqCst);
        return Err(e);
    }
    let s2 = s.clone();
    s.receivers.fetch_add(1, Ordering::SeqCst);
    if let Err(e) = spawn(s, "migrate-demand", move || {
        // What a vCPU waits for, and short work: as the fault thread.
        if uffd_sys::host::set_thread_fifo(FAULT_RT_PRIORITY).is_err() {
            let _ = uffd_sys::host::set_thread_nice(RECV_NICE);
        }
        receive(&s2, &mut dr, gen);
        s2.receivers.fetch_sub(1, Ordering::SeqCst);
    }) {
        s.receivers.fetch_sub(1, Ordering::SeqCst);
        return Err(e);
    }
    Ok(())
}

fn spawn(
    s: &Shared,
    name: &'static str,
    f: impl FnOnce() + Send + 'static,
) -> Result<(), MigrateError> {
    let h = std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| MigrateError::Io("starting a migration thread", e))?;
    lock(&s.threads).push(h);
    Ok(())
}

/// Guest memory registered for missing-page faults and the KVM VM built for `cfg`.
struct Prepared {
    mem: GuestMemoryMmap,
    tracker: MissingTracker,
    vm: vmm_core::PreparedVm,
}

fn prepare(
    cfg: &vmm_core::VmConfig,
    backend: Option<MemBackend>,
) -> Result<Prepared, MigrateError> {
    let backend = backend.unwrap_or(cfg.backend);
    if backend == MemBackend::Hugetlbfs {
        return Err(MigrateError::Local(
            "an incoming migration cannot use hugetlbfs guest memory yet (use \
             `--mem-backend anon` or `memfd`)"
                .into(),
        ));
    }
    let mem = vmm_core::create_guest_memory(cfg.mem_bytes, backend)
        .map_err(|e| MigrateError::Local(format!("creating guest memory: {}", chain(&e))))?;
    let tracker = MissingTracker::new()
        .and_then(|t| t.register_memory(&mem).map(|()| t))
        .map_err(|e| {
            MigrateError::Local(format!(
                "registering guest memory for missing-page faults: {}",
                chain(&e)
            ))
        })?;
    let vm = Vm::prepare(cfg, mem.clone())
        .map_err(|e| MigrateError::Local(format!("creating the VM: {}", chain(&e))))?;
    Ok(Prepared { mem, tracker, vm })
}

#[allow(clippy::too_many_arguments)]
fn build(
    state: MachineState,
    regions: Regions,
    prepared: Prepared,
    params: RestoreParams,
    writer: std::io::Result<Conn>,
    demand: Conn,
    session: [u8; super::SESSION_LEN],
    resume_timeout: Duration,
    peer: String,
    t0: Instant,
) -> Result<(Vm, Incoming), MigrateError> {
    let writer = writer.map_err(|e| MigrateError::Io("duplicating the connection", e))?;
    let t = Instant::now();
    let Prepared { mem, tracker, vm } = prepared;
    let ours = Regions::of(&mem);
    if ours != regions {
        return Err(MigrateError::BadVm(format!(
            "the source's RAM regions {:x?} differ from this VM's {:x?}",
            regions.0, ours.0
        )));
    }
    regions.check()?;
    let memory = ms(t.elapsed());
    let hosts = mem.iter().map(|r| r.as_ptr() as usize).collect();
    let total = regions.total();
    let pieces = (total / PIECE) as usize;
    let shared = Arc::new(Shared {
        tracker: Arc::new(tracker),
        mem: mem.clone(),
        hosts,
        resident_piece: (0..pieces).map(|_| AtomicBool::new(false)).collect(),
        unit_data: (0..(total / UNIT) as usize)
            .map(|_| AtomicBool::new(false))
            .collect(),
        regions,
        requested: Mutex::new(HashMap::new()),
        writer: Mutex::new(writer),
        demand: Mutex::new(demand),
        ends: AtomicU64::new(0),
        session,
        listener: Mutex::new(None),
        resume_timeout,
        gen: AtomicU64::new(0),
        waiting: Mutex::new(None),
        receivers: AtomicU64::new(0),
        threads: Mutex::new(Vec::new()),
        peer,
        resident: AtomicU64::new(0),
        total,
        faults: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        received: AtomicU64::new(0),
        waits: Mutex::default(),
        stop: AtomicBool::new(false),
        running_sent: AtomicBool::new(false),
        quit: AtomicBool::new(false),
        finishing: AtomicBool::new(false),
        t0: Instant::now(),
        start: Mutex::new(Duration::ZERO),
        phases: Mutex::new(StartPhases {
            memory,
            ..StartPhases::default()
        }),
        collapse: Arc::default(),
        end: Mutex::new(End::default()),
        end_cv: Condvar::new(),
    });
    let incoming = Incoming {
        shared: shared.clone(),
    };
    // The fault thread serves before anything can touch guest memory.
    spawn(&incoming.shared, "migrate-fault", move || {
        if uffd_sys::host::set_thread_fifo(FAULT_RT_PRIORITY).is_err() {
            let _ = uffd_sys::host::set_thread_nice(FAULT_NICE);
        }
        fault_thread(&shared)
    })?;
    let t = Instant::now();
    let vm = vm
        .restore(&state, params.serial, params.paused)
        .map_err(|e| MigrateError::BadVm(format!("loading the state: {}", chain(&e))))?;
    lock(&incoming.shared.phases).vm = ms(t.elapsed());
    *lock(&incoming.shared.start) = t0.elapsed();
    Ok((vm, incoming))
}

impl Shared {
    /// The piece of host address `addr`, if it is guest RAM.
    fn piece_of_host(&self, addr: usize) -> Option<usize> {
        let mut before = 0u64;
        for (&(_, n), &h) in self.regions.0.iter().zip(&self.hosts) {
            if addr >= h && ((addr - h) as u64) < n {
                return Some(((before + (addr - h) as u64) / PIECE) as usize);
            }
            before += n;
        }
        None
    }

    fn host(&self, gpa: u64, len: u64) -> Result<HostRange, MigrateError> {
        let h = self
            .mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|e| MigrateError::Corrupt(format!("guest address {gpa:#x}: {e}")))?;
        Ok(HostRange::new(h as usize, len as usize))
    }

    /// A connection of generation `gen` was lost: unless it is an older one or the memory is all
    /// here, the VM waits for the source to reconnect (for [`Shared::resume_timeout`]).
    fn lost(self: &Arc<Self>, gen: u64, e: MigrateError) {
        if self.finishing.load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut w = lock(&self.waiting);
            if w.is_some() || gen != self.gen.load(Ordering::SeqCst) {
                return;
            }
            *w = Some((e.to_string(), Instant::now()));
        }
        log::warn!(
            "migration: the connection to the source was lost ({e}) with {} of {} bytes here; \
             vCPUs that touch a missing page wait; waiting {:.0} s for `snapctl migrate --resume` \
             on the source",
            self.resident.load(Ordering::SeqCst),
            self.total,
            self.resume_timeout.as_secs_f64()
        );
        lock(&self.writer).shutdown();
        lock(&self.demand).shutdown();
        let s = self.clone();
        if let Err(e) = spawn(self, "migrate-reconnect", move || s.reconnect()) {
            self.fail(e);
        }
    }

    /// Waits for the source to reconnect: authenticated, naming this migration's session id (`Resume`); tells
    /// it which pieces are here (`Have`), binds a new demand connection, asks again for what the
    /// vCPUs wait on, and receives the rest. Gives up (the VMM ends) after the timeout.
    fn reconnect(self: &Arc<Self>) {
        let deadline = Instant::now() + self.resume_timeout;
        // The bitmap must not change once sent: the old receive threads end first (their
        // connections are shut down).
        while self.receivers.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let listener = lock(&self.listener);
        let Some(l) = listener.as_ref() else {
            return self.fail(MigrateError::Local(
                "no listener to wait for the source".into(),
            ));
        };
        loop {
            let (conn, mut r, mut w, peer, _) =
                match l.authenticated(Some(deadline), Some(&self.quit)) {
                    Ok(x) => x,
                    Err(MigrateError::Cancelled) => return,
                    Err(e) => {
                        return self.fail_resume(format!(
                        "the connection to the source was lost and it did not reconnect within \
                         {:.0} s ({e}); stopping the VM, which cannot run on without its memory. \
                         The source keeps its guest frozen: `snapctl resume \
                         --force-after-failed-migration` there runs it on from its freeze instant",
                        self.resume_timeout.as_secs_f64()
                    ))
                    }
                };
            let mut buf = Vec::new();
            let res = expect_frame(&mut r, &mut buf, Kind::Resume)
                .and_then(|()| same_session(&buf, &self.session))
                .and_then(|()| {
                    write_frame(&mut w, Kind::Have, &[&self.bitmap()])
                        .map_err(|e| MigrateError::Io("telling the source what is here", e))
                })
                .and_then(|_| {
                    l.attach(
                        &self.session,
                        (Instant::now() + HANDSHAKE_TIMEOUT).min(deadline),
                        Some(&self.quit),
                    )
                });
            let demand = match res {
                Ok(d) => d,
                Err(e) => {
                    log::warn!("migration: refused a reconnection from {peer}: {e}; waiting on");
                    let _ = write_frame(&mut w, Kind::Error, &[e.to_string().as_bytes()]);
                    conn.shutdown();
                    continue;
                }
            };
            let _ = conn.set_read_timeout(None);
            let _ = conn.set_write_timeout(None);
            let gen = {
                let mut d = lock(&self.demand);
                let mut wr = lock(&self.writer);
                *d = demand;
                *wr = w;
                self.ends.store(0, Ordering::SeqCst);
                let gen = self.gen.fetch_add(1, Ordering::SeqCst) + 1;
                // What the vCPUs wait on, asked again (the old requests may have been lost).
                let pending: Vec<usize> = lock(&self.requested).keys().copied().collect();
                for p in pending {
                    let gpa = self.regions.gpa_of(p);
                    if write_frame(&mut *d, Kind::Request, &[&gpa.to_le_bytes()]).is_err() {
                        break;
                    }
                }
                gen
            };
            *lock(&self.waiting) = None;
            log::info!(
                "migration: {peer} reconnected; receiving the {} bytes still missing",
                self.total - self.resident.load(Ordering::SeqCst)
            );
            if let Err(e) = start_receivers(self, r, gen) {
                self.fail(e);
            }
            return;
        }
    }

    /// One bit per piece, set if it is resident (LSB first).
    fn bitmap(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.resident_piece.len().div_ceil(8)];
        for (i, b) in self.resident_piece.iter().enumerate() {
            if b.load(Ordering::Acquire) {
                v[i / 8] |= 1 << (i % 8);
            }
        }
        v
    }

    fn fail_resume(&self, message: String) {
        self.stop.store(true, Ordering::SeqCst);
        let mut end = lock(&self.end);
        if end.failed.is_none() {
            end.failed = Some(IncomingFailure {
                message,
                corrupt: false,
                resume_timed_out: true,
            });
        }
        self.end_cv.notify_all();
    }

    fn fail(&self, e: MigrateError) {
        if self.finishing.load(Ordering::SeqCst) {
            return;
        }
        self.stop.store(true, Ordering::SeqCst);
        let corrupt = matches!(e, MigrateError::Corrupt(_) | MigrateError::Truncated);
        let mut end = lock(&self.end);
        if end.failed.is_none() && end.resident_at.is_none() {
            end.failed = Some(IncomingFailure {
                message: e.to_string(),
                corrupt,
                resume_timed_out: false,
            });
        }
        self.end_cv.notify_all();
    }

    fn figures(&self) -> DestFigures {
        let ((p50, p99), max) = {
            let w = lock(&self.waits);
            (w.p50_p99(), w.max)
        };
        DestFigures {
            faults: self.faults.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            fault_wait_p50_us: p50,
            fault_wait_p99_us: p99,
            fault_wait_max_us: max,
            resident_s: lock(&self.end).resident_at.map_or(0.0, |d| d.as_secs_f64()),
            received_bytes: self.received.load(Ordering::Relaxed),
        }
    }

    fn wait_sample(&self, since: Instant) {
        lock(&self.waits).add(since.elapsed());
    }

    /// One data frame: checked, decoded, filled, counted.
    fn data(&self, b: &[u8], dbuf: &mut [u8]) -> Result<(), MigrateError> {
        let bad = |w: String| MigrateError::Corrupt(format!("data frame: {w}"));
        if b.len() < DATA_HEAD || b[13..16] != [0, 0, 0] {
            return Err(bad("bad head".into()));
        }
        let gpa = u64::from_le_bytes(b[..8].try_into().expect("8"));
        let len = u64::from(u32::from_le_bytes(b[8..12].try_into().expect("4")));
        let enc = Encoding::from_u8(b[12]).ok_or_else(|| bad(format!("encoding {}", b[12])))?;
        let payload = &b[DATA_HEAD..];
        if len == 0 || len % PIECE != 0 || gpa % PIECE != 0 || gpa % UNIT + len > UNIT {
            return Err(bad(format!(
                "{len} bytes at {gpa:#x} are not whole pieces of one unit"
            )));
        }
        let first = self
            .regions
            .piece_of(gpa)
            .ok_or_else(|| bad(format!("{gpa:#x} is not guest RAM")))?;
        let pieces = first..first + (len / PIECE) as usize;
        if pieces
            .clone()
            .any(|p| self.resident_piece[p].load(Ordering::Acquire))
        {
            return Err(bad(format!("{gpa:#x}: a piece sent twice")));
        }
        let range = self.host(gpa, len)?;
        let out = &mut dbuf[..len as usize];
        let fill = |e: wp_tracker::MissingError| MigrateError::Local(chain(&e));
        match enc {
            Encoding::Zero => {
                if !payload.is_empty() {
                    return Err(bad("a zero run with bytes".into()));
                }
                self.tracker.fill_zero(range).map_err(fill)?;
            }
            Encoding::Raw => {
                if payload.len() as u64 != len {
                    return Err(bad(format!("{} bytes for {len}", payload.len())));
                }
                self.tracker.fill(range, payload).map_err(fill)?;
            }
            Encoding::Zstd => {
                let n = zstd::bulk::decompress_to_buffer(payload, out)
                    .map_err(|e| bad(format!("zstd: {e}")))?;
                if n as u64 != len {
                    return Err(bad(format!("zstd decoded to {n} bytes, not {len}")));
                }
                self.tracker.fill(range, out).map_err(fill)?;
            }
        }
        if enc != Encoding::Zero {
            self.unit_data[first / (UNIT / PIECE) as usize].store(true, Ordering::Relaxed);
        }
        let mut req = lock(&self.requested);
        for p in pieces {
            if !self.resident_piece[p].swap(true, Ordering::AcqRel) {
                self.resident.fetch_add(PIECE, Ordering::AcqRel);
            }
            if let Some(t) = req.remove(&p) {
                self.wait_sample(t);
            }
        }
        Ok(())
    }

    /// Every page resident: unregister, tell the source, collapse into huge pages.
    fn finish(&self) {
        self.finishing.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        // No reconnection any more: the address is free again.
        if let Ok(mut l) = self.listener.try_lock() {
            *l = None;
        }
        if let Err(e) = self.tracker.unregister_all() {
            log::warn!("migration: unregistering guest memory: {}", chain(&e));
        }
        lock(&self.end).resident_at = Some(self.t0.elapsed());
        self.end_cv.notify_all();
        let figures = self.figures();
        let json = serde_json::to_vec(&figures).unwrap_or_default();
        if let Err(e) = write_frame(&mut *lock(&self.writer), Kind::Done, &[&json]) {
            log::warn!(
                "migration: every page arrived, but the source was not told ({e}): it keeps its \
                 copy frozen; this VM runs on"
            );
        }
        let _ = uffd_sys::host::set_thread_nice(10);
        let t = Instant::now();
        let mut failures = 0;
        let per = self.unit_data.len();
        let mut u = 0;
        while u < per {
            if !self.unit_data[u].load(Ordering::Relaxed) {
                u += 1;
                continue;
            }
            let mut end = u + 1;
            // Adjacent in guest RAM and in the same region (host addresses contiguous).
            while end < per
                && end - u < COLLAPSE_BATCH
                && self.unit_data[end].load(Ordering::Relaxed)
                && self.regions.gpa_of(end * (UNIT / PIECE) as usize)
                    == self.regions.gpa_of(u * (UNIT / PIECE) as usize) + (end - u) as u64 * UNIT
            {
                end += 1;
            }
            let gpa = self.regions.gpa_of(u * (UNIT / PIECE) as usize);
            // Not while a save runs (a block it write-protects cannot be collapsed, and the
            // collapse would hold up its freeze).
            let Some(_turn) = self.collapse.turn(&self.quit) else {
                break;
            };
            match self.host(gpa, (end - u) as u64 * UNIT) {
                Ok(r) if self.tracker.collapse_huge(r).is_ok() => {}
                _ => failures += (end - u) as u64,
            }
            u = end;
        }
        let mut end = lock(&self.end);
        end.collapse = Some(t.elapsed());
        end.collapse_failures = failures;
        end.done = true;
        self.end_cv.notify_all();
    }
}

fn fault_thread(s: &Arc<Shared>) {
    let mut faults: Vec<MissingFault> = Vec::new();
    let ps = 4096usize;
    while !s.stop.load(Ordering::SeqCst) {
        faults.clear();
        if let Err(e) = s.tracker.wait_faults(FAULT_POLL, &mut faults) {
            if !s.finishing.load(Ordering::SeqCst) {
                s.fail(MigrateError::Local(format!(
                    "reading fault events: {}",
                    chain(&e)
                )));
            }
            return;
        }
        let now = Instant::now();
        for f in &faults {
            s.faults.fetch_add(1, Ordering::Relaxed);
            let Some(p) = s.piece_of_host(f.addr) else {
                continue;
            };
            if s.resident_piece[p].load(Ordering::Acquire) {
                let _ = s.tracker.wake(HostRange::new(f.addr & !(ps - 1), ps));
                continue;
            }
            let fresh = {
                let mut req = lock(&s.requested);
                let fresh = !req.contains_key(&p);
                if fresh {
                    req.insert(p, now);
                }
                fresh
            };
            if fresh {
                while !s.running_sent.load(Ordering::SeqCst) {
                    if s.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_micros(20));
                }
                s.requests.fetch_add(1, Ordering::Relaxed);
                let gpa = s.regions.gpa_of(p);
                let (gen, sent) = {
                    let mut d = lock(&s.demand);
                    let gen = s.gen.load(Ordering::SeqCst);
                    (
                        gen,
                        write_frame(&mut *d, Kind::Request, &[&gpa.to_le_bytes()]),
                    )
                };
                if let Err(e) = sent {
                    // Asked again once the source reconnects.
                    s.lost(gen, MigrateError::Io("asking the source for a page", e));
                }
            }
            // Filled between the check and the request: the fill woke the toucher.
            if s.resident_piece[p].load(Ordering::Acquire) {
                if let Some(t) = lock(&s.requested).remove(&p) {
                    s.wait_sample(t);
                }
            }
        }
    }
}

fn receive(s: &Arc<Shared>, r: &mut impl Read, gen: u64) {
    let mut buf = Vec::new();
    let mut dbuf = vec![0u8; UNIT as usize];
    loop {
        let kind = match read_frame(r, &mut buf, UNIT as usize) {
            Ok(k) => k,
            Err(_) if s.finishing.load(Ordering::SeqCst) => return,
            Err(MigrateError::Io(_, e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return s.lost(
                    gen,
                    MigrateError::Io("no byte from the source for 30 s (a silent link)", e),
                )
            }
            Err(e @ (MigrateError::Closed | MigrateError::Truncated | MigrateError::Io(..))) => {
                return s.lost(gen, e)
            }
            Err(e) => return s.fail(e),
        };
        s.received.fetch_add(
            (buf.len() + super::wire::HEADER_LEN) as u64,
            Ordering::Relaxed,
        );
        let res = match kind {
            Kind::Data => s.data(&buf, &mut dbuf),
            // One `End` per connection, each after every piece sent on it: after both, every
            // piece must be here.
            Kind::End
                if s.ends.fetch_add(1, Ordering::SeqCst) + 1 >= 2
                    && s.resident.load(Ordering::Acquire) < s.total =>
            {
                Err(MigrateError::Corrupt(format!(
                    "the source ended with {} bytes never sent",
                    s.total - s.resident.load(Ordering::Acquire)
                )))
            }
            Kind::End => Ok(()),
            Kind::Error => Err(MigrateError::Peer(String::from_utf8_lossy(&buf).into())),
            k => Err(MigrateError::Corrupt(format!(
                "unexpected {k:?} frame from the source"
            ))),
        };
        if let Err(e) = res {
            return s.fail(e);
        }
        if kind == Kind::Data
            && s.resident.load(Ordering::Acquire) == s.total
            && !s.finishing.swap(true, Ordering::SeqCst)
        {
            s.finish();
        }
    }
}

impl Incoming {
    /// Progress and figures so far.
    pub fn status(&self) -> IncomingStatus {
        let s = &self.shared;
        let figures = s.figures();
        let waiting = lock(&s.waiting).clone();
        let end = lock(&s.end);
        IncomingStatus {
            peer: s.peer.clone(),
            resident_bytes: s.resident.load(Ordering::Relaxed),
            total_bytes: s.total,
            resident: end.resident_at.is_some(),
            done: end.done,
            failed: end.failed.as_ref().map(|f| f.message.clone()),
            waiting_for_source: waiting.is_some(),
            lost: waiting.as_ref().map(|w| w.0.clone()),
            resume_deadline_s: waiting
                .as_ref()
                .map(|w| (s.resume_timeout.as_secs_f64() - w.1.elapsed().as_secs_f64()).max(0.0)),
            reconnects: s.gen.load(Ordering::Relaxed),
            start_ms: ms(*lock(&s.start)),
            start_phases_ms: *lock(&s.phases),
            figures,
            collapse_ms: end.collapse.map(ms),
            collapse_failures: end.collapse_failures,
        }
    }

    /// Holds the collapse into huge pages off until the returned guard is dropped (for a save:
    /// its freeze and write protection do not wait for collapse calls). Waits for a collapse
    /// call in flight to end.
    pub fn hold_collapse(&self) -> CollapseHold {
        self.shared.collapse.hold()
    }

    /// Why it failed, if it did.
    pub fn failure(&self) -> Option<IncomingFailure> {
        lock(&self.shared.end).failed.clone()
    }

    /// Waits up to `timeout` for the end: `Some(Ok)` done (resident and collapsed),
    /// `Some(Err)` failed, `None` still arriving.
    pub fn wait(&self, timeout: Duration) -> Option<Result<(), IncomingFailure>> {
        self.wait_for(timeout, |e| e.done)
    }

    /// Waits up to `timeout` until every page is resident (the collapse may still run).
    pub fn wait_resident(&self, timeout: Duration) -> Option<Result<(), IncomingFailure>> {
        self.wait_for(timeout, |e| e.resident_at.is_some())
    }

    fn wait_for(
        &self,
        timeout: Duration,
        reached: impl Fn(&End) -> bool,
    ) -> Option<Result<(), IncomingFailure>> {
        let s = &self.shared;
        wait_end(&s.end, &s.end_cv, timeout, |e| e.failed.as_ref(), reached)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::SeqCst);
        s.quit.store(true, Ordering::SeqCst);
        lock(&s.writer).shutdown();
        lock(&s.demand).shutdown();
        loop {
            let hs: Vec<_> = lock(&s.threads).drain(..).collect();
            if hs.is_empty() {
                break;
            }
            for h in hs {
                let _ = h.join();
            }
        }
        *lock(&s.listener) = None;
        if lock(&s.end).resident_at.is_none() {
            // Pages never filled must not turn into zeros for whoever still holds the memory:
            // keep them registered (blocking) until the process ends.
            std::mem::forget(s.tracker.clone());
        }
    }
}
