//! The destination of a migration: listen, accept one authenticated source, build the VM from its
//! state on memory registered in MISSING mode, run it, and fill memory from the connection: a
//! fault thread requests what the vCPUs touch, a receive thread fills whatever arrives.

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
use crate::{chain, RestoreParams};

/// How long the source may take to send the state and map after the handshake.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the fault thread waits for events before it looks at the stop flag.
const FAULT_POLL: Duration = Duration::from_millis(20);
/// Real-time priority of the fault thread where permitted (as lazy restore's).
const FAULT_RT_PRIORITY: i32 = 1;
/// Nice value of the fault thread otherwise.
const FAULT_NICE: i32 = -10;
/// Most fault waits kept for the percentiles.
const MAX_WAIT_SAMPLES: usize = 1 << 17;
/// Socket receive buffer asked for (the kernel doubles it).
const RECV_BUFFER: usize = 256 << 10;
/// Nice value of the receive thread: it fills what the vCPUs wait for, ahead of them.
const RECV_NICE: i32 = -10;
/// Adjacent units collapsed by one call at most.
const COLLAPSE_BATCH: usize = 32;

/// A listening destination (`snapctl restore --listen`).
#[derive(Debug)]
pub struct Listener {
    inner: Inner,
    token: Token,
    address: String,
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
}

/// A migrated VM's memory arriving (or arrived). Keep it as long as the VM runs.
#[derive(Debug)]
pub struct Incoming {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
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
    writer: Mutex<Conn>,
    peer: String,
    resident: AtomicU64,
    total: u64,
    faults: AtomicU64,
    requests: AtomicU64,
    received: AtomicU64,
    waits: Mutex<(Vec<u32>, u64)>,
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
    /// Holders of [`CollapseHold`]s: the collapse waits while there are any.
    holds: AtomicU64,
    /// Held during each collapse call.
    collapsing: Mutex<()>,
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
                // Inherited by the accepted connection: what a requested piece can be queued
                // behind on this side.
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
        })
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
        let (conn, peer, t0) = loop {
            let (conn, peer) = match &self.inner {
                Inner::Tcp(l) => l.accept().map(|(s, a)| {
                    let _ = s.set_nodelay(true);
                    (Conn::Tcp(s), a.to_string())
                }),
                Inner::Unix(l, p) => l
                    .accept()
                    .map(|(s, _)| (Conn::Unix(s), format!("unix:{}", p.display()))),
            }
            .map_err(|e| MigrateError::Io("accepting the migration", e))?;
            let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
            let _ = conn.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
            let res = conn.try_clone().and_then(|r| Ok((r, conn.try_clone()?)));
            let Ok((r, mut w)) = res else { continue };
            let mut r = BufReader::with_capacity(UNIT as usize + 64 * 1024, r);
            let t0 = Instant::now();
            match dest_handshake(&mut r, &mut w, &self.token) {
                Ok(()) => break ((conn, r, w), peer, t0),
                Err(e) => {
                    log::warn!("migration: refused a connection from {peer}: {e}; listening on");
                    conn.shutdown();
                }
            }
        };
        let (conn, mut r, mut w) = conn;
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
            write_frame(&mut w, Kind::Prepared, &[])
                .map_err(|e| MigrateError::Io("telling the source the VM is prepared", e))?;
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
        let s = incoming.shared.clone();
        incoming.spawn("migrate-recv", move || {
            let _ = uffd_sys::host::set_thread_nice(RECV_NICE);
            receive(&s, &mut r)
        })?;
        Ok((vm, incoming))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Inner::Unix(_, p) = &self.inner {
            let _ = std::fs::remove_file(p);
        }
    }
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
        peer,
        resident: AtomicU64::new(0),
        total,
        faults: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        received: AtomicU64::new(0),
        waits: Mutex::new((Vec::new(), 0)),
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
        holds: AtomicU64::new(0),
        collapsing: Mutex::new(()),
        end: Mutex::new(End::default()),
        end_cv: Condvar::new(),
    });
    let incoming = Incoming {
        shared: shared.clone(),
        threads: Mutex::new(Vec::new()),
    };
    // The fault thread serves before anything can touch guest memory.
    incoming.spawn("migrate-fault", move || {
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

    fn fail(&self, e: MigrateError) {
        self.stop.store(true, Ordering::SeqCst);
        let corrupt = matches!(e, MigrateError::Corrupt(_) | MigrateError::Truncated);
        let mut end = lock(&self.end);
        if end.failed.is_none() && end.resident_at.is_none() {
            end.failed = Some(IncomingFailure {
                message: e.to_string(),
                corrupt,
            });
        }
        self.end_cv.notify_all();
    }

    fn figures(&self) -> DestFigures {
        let (p50, p99, max) = {
            let w = lock(&self.waits);
            let mut v = w.0.clone();
            v.sort_unstable();
            let pct = |p: usize| {
                v.get((v.len() * p / 100).min(v.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0)
            };
            (pct(50), pct(99), w.1)
        };
        DestFigures {
            faults: self.faults.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            fault_wait_p50_us: u64::from(p50),
            fault_wait_p99_us: u64::from(p99),
            fault_wait_max_us: max,
            resident_s: lock(&self.end).resident_at.map_or(0.0, |d| d.as_secs_f64()),
            received_bytes: self.received.load(Ordering::Relaxed),
        }
    }

    fn wait_sample(&self, since: Instant) {
        let us = since.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        let mut w = lock(&self.waits);
        w.1 = w.1.max(u64::from(us));
        if w.0.len() < MAX_WAIT_SAMPLES {
            w.0.push(us);
        }
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
        for p in first..first + (len / PIECE) as usize {
            if !self.resident_piece[p].swap(true, Ordering::AcqRel) {
                self.resident.fetch_add(PIECE, Ordering::AcqRel);
            }
            if let Some(t) = req.remove(&p) {
                self.wait_sample(t);
            }
        }
        Ok(())
    }

    /// The owner let go of the [`Incoming`]: the collapse stops.
    fn stop_collapse(&self) -> bool {
        self.quit.load(Ordering::SeqCst)
    }

    /// Every page resident: unregister, tell the source, collapse into huge pages.
    fn finish(&self) {
        self.finishing.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
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
            let turn = loop {
                while self.holds.load(Ordering::SeqCst) > 0 && !self.stop_collapse() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if self.stop_collapse() {
                    break None;
                }
                let g = lock(&self.collapsing);
                if self.holds.load(Ordering::SeqCst) == 0 {
                    break Some(g);
                }
            };
            let Some(_turn) = turn else { break };
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

fn fault_thread(s: &Shared) {
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
                let sent = write_frame(&mut *lock(&s.writer), Kind::Request, &[&gpa.to_le_bytes()]);
                if let Err(e) = sent {
                    if !s.finishing.load(Ordering::SeqCst) {
                        s.fail(MigrateError::Io("asking the source for a page", e));
                    }
                    return;
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

fn receive(s: &Shared, r: &mut impl Read) {
    let mut buf = Vec::new();
    let mut dbuf = vec![0u8; UNIT as usize];
    loop {
        let kind = match read_frame(r, &mut buf, UNIT as usize) {
            Ok(k) => k,
            Err(_) if lock(&s.end).resident_at.is_some() => return,
            Err(e) => return s.fail(e),
        };
        s.received.fetch_add(
            (buf.len() + super::wire::HEADER_LEN) as u64,
            Ordering::Relaxed,
        );
        let res = match kind {
            Kind::Data => s.data(&buf, &mut dbuf),
            Kind::End if s.resident.load(Ordering::Acquire) < s.total => {
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
            && lock(&s.end).resident_at.is_none()
        {
            s.finish();
        }
    }
}

impl Incoming {
    fn spawn(
        &self,
        name: &'static str,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<(), MigrateError> {
        let h = std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map_err(|e| MigrateError::Io("starting a migration thread", e))?;
        lock(&self.threads).push(h);
        Ok(())
    }

    /// Progress and figures so far.
    pub fn status(&self) -> IncomingStatus {
        let s = &self.shared;
        let figures = s.figures();
        let end = lock(&s.end);
        IncomingStatus {
            peer: s.peer.clone(),
            resident_bytes: s.resident.load(Ordering::Relaxed),
            total_bytes: s.total,
            resident: end.resident_at.is_some(),
            done: end.done,
            failed: end.failed.as_ref().map(|f| f.message.clone()),
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
        self.shared.holds.fetch_add(1, Ordering::SeqCst);
        drop(lock(&self.shared.collapsing));
        CollapseHold {
            shared: self.shared.clone(),
        }
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
        let deadline = Instant::now() + timeout;
        let mut end = lock(&self.shared.end);
        loop {
            if let Some(f) = &end.failed {
                return Some(Err(f.clone()));
            }
            if reached(&end) {
                return Some(Ok(()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            end = self
                .shared
                .end_cv
                .wait_timeout(end, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::SeqCst);
        s.quit.store(true, Ordering::SeqCst);
        lock(&s.writer).shutdown();
        for h in lock(&self.threads).drain(..) {
            let _ = h.join();
        }
        if lock(&s.end).resident_at.is_none() {
            // Pages never filled must not turn into zeros for whoever still holds the memory:
            // keep them registered (blocking) until the process ends.
            std::mem::forget(s.tracker.clone());
        }
    }
}

/// Keeps the collapse into huge pages waiting while it lives ([`Incoming::hold_collapse`]).
#[derive(Debug)]
pub struct CollapseHold {
    shared: Arc<Shared>,
}

impl Drop for CollapseHold {
    fn drop(&mut self) {
        self.shared.holds.fetch_sub(1, Ordering::SeqCst);
    }
}
