//! The source of a migration: authenticate, attach the demand connection, freeze, send the state
//! and map, stream every piece once on the bulk connection while a second thread serves the
//! destination's requests on the demand connection, wait for `Done`.

use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_core::Vm;
use wp_tracker::{HostRange, WpTracker};

use super::wire::{expect_frame, read_frame, write_frame, Encoding, Kind, DATA_HEAD};
use super::{
    lock, ms, source_handshake, Conn, DestFigures, Endpoint, MigrateError, Regions, Token,
    HANDSHAKE_TIMEOUT, PIECE, SESSION_LEN, UNIT,
};

/// Most bytes in one streamed data frame (a request for a piece the stream has claimed waits for
/// at most this frame).
const FRAME_MAX: usize = 256 << 10;
/// How long the destination may take to build the VM and start it.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a write to the destination may block (a destination that stops reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination may take, after `End`, to say `Done`.
const DONE_TIMEOUT: Duration = Duration::from_secs(120);
/// zstd level of `--zstd`.
const ZSTD_LEVEL: i32 = 1;
/// Socket send buffer asked for on the demand connection (the kernel doubles it): it only ever
/// holds requested pieces.
pub(super) const DEMAND_SEND_BUFFER: usize = 256 << 10;

/// A migration as a client asks for it (the control protocol's `migrate` request).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MigrateParams {
    /// `HOST:PORT` or `unix:PATH` of the destination (`snapctl restore --listen`).
    pub to: String,
    /// File holding the shared secret (absolute path; mode 0600).
    pub token_file: PathBuf,
    /// Compress data frames with zstd (for slow links).
    #[serde(default)]
    pub zstd: bool,
    /// Reconnect a migration whose connections were lost after the destination ran (`to` and
    /// `token_file` may then be empty: the interrupted migration's are taken).
    #[serde(default)]
    pub resume: bool,
}

/// Progress of a migration.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateProgress {
    /// `connecting`, `freezing`, `streaming`, `finishing`.
    pub phase: &'static str,
    /// Guest bytes sent so far (zero pieces included).
    pub done_bytes: u64,
    /// Guest bytes in all.
    pub total_bytes: u64,
    /// Bytes on the wire so far (frames, both kinds of data, headers).
    pub wire_bytes: u64,
    /// Pieces the destination asked for so far.
    pub demand_requests: u64,
}

/// What a migration did (the control protocol's `migrate` summary).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MigrateReport {
    /// Where it went.
    pub to: String,
    /// Guest RAM bytes.
    pub guest_bytes: u64,
    /// From the pause to the destination's `Running`, ms: the longest the guest could have been
    /// held (it includes half a round trip).
    pub downtime_ms: f64,
    /// Parking the vCPUs, ms.
    pub pause_ms: f64,
    /// Capturing the machine state, ms.
    pub capture_ms: f64,
    /// From the pause to `Done`, seconds.
    pub duration_s: f64,
    /// Bytes written to the connection (frames, headers, handshake).
    pub wire_bytes: u64,
    /// Guest bytes sent as data (pieces that are not all zeros).
    pub data_bytes: u64,
    /// Guest bytes sent as zero frames (no data crosses the wire).
    pub zero_bytes: u64,
    /// `wire_bytes / data_bytes`.
    pub wire_ratio: f64,
    /// Requests the destination sent (pieces its vCPUs faulted on).
    pub demand_requests: u64,
    /// Of those, pieces sent ahead of the stream (the others were already on their way).
    pub demand_sent: u64,
    /// Data frames were zstd-compressed.
    pub zstd: bool,
    /// Times the connections were lost and `--resume` reconnected them (pieces in flight then
    /// were sent again: they count in the bytes).
    #[serde(default)]
    pub reconnects: u64,
    /// What the destination measured.
    pub dest: DestFigures,
}

/// A failed migration and what became of the source's guest.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct MigrateFailure {
    /// What went wrong.
    #[source]
    pub error: MigrateError,
    /// The destination had started its vCPUs: the source keeps its VM frozen (never resumed by
    /// itself). False: the source's guest runs on (or stays paused if a client had paused it).
    pub dest_running: bool,
    /// With `dest_running`: what [`migrate_resume`] needs to reconnect and finish.
    pub interrupted: Option<Box<Interrupted>>,
}

/// A migration whose connections were lost after the destination ran: the session to name when
/// reconnecting ([`migrate_resume`]) and the figures so far.
#[derive(Debug, Clone)]
pub struct Interrupted {
    session: Vec<u8>,
    t0: Instant,
    downtime: Duration,
    pause: Duration,
    capture: Duration,
    wire: u64,
    data_bytes: u64,
    zero_bytes: u64,
    requests: u64,
    demand_sent: u64,
    reconnects: u64,
}

enum Event {
    Done(DestFigures),
    Lost(MigrateError),
}

/// Sets the socket send buffer of `c` (best effort).
fn send_buffer(c: &Conn, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt::SndBuf};
    let _ = match c {
        Conn::Tcp(s) => setsockopt(s, SndBuf, &bytes),
        Conn::Unix(s) => setsockopt(s, SndBuf, &bytes),
    };
}

/// Migrates `vm` to `params.to`. `tracker`, if any, has all guest memory registered and tells
/// units that hold no data (sent as zero frames without reading them). See the module docs for
/// what becomes of the guest on failure.
pub fn migrate_out(
    vm: &Vm,
    tracker: Option<&WpTracker>,
    params: &MigrateParams,
    cancel: &AtomicBool,
    progress: &(dyn Fn(&MigrateProgress) + Sync),
) -> Result<MigrateReport, MigrateFailure> {
    let before = |error| MigrateFailure {
        error,
        dest_running: false,
        interrupted: None,
    };
    let token = Token::read(&params.token_file).map_err(before)?;
    let ep = Endpoint::parse(&params.to).map_err(before)?;
    let total = vm.config().mem_bytes;
    let mut p = MigrateProgress {
        phase: "connecting",
        done_bytes: 0,
        total_bytes: total,
        wire_bytes: 0,
        demand_requests: 0,
    };
    progress(&p);
    let conn = ep.connect().map_err(before)?;
    let io = |what| move |e| MigrateError::Io(what, e);
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut r = BufReader::new(
        conn.try_clone()
            .map_err(io("duplicating the connection"))
            .map_err(before)?,
    );
    let mut w = BufWriter::with_capacity(
        64 << 10,
        conn.try_clone()
            .map_err(io("duplicating the connection"))
            .map_err(before)?,
    );
    source_handshake(&mut r, &mut w, &token).map_err(before)?;
    // The destination builds memory and the KVM VM while the guest still runs.
    let mut wire = 0u64;
    let cfg = serde_json::to_vec(vm.config())
        .map_err(|e| before(MigrateError::Local(format!("the VM configuration: {e}"))))?;
    let mut session = Vec::new();
    let prepared = (|| {
        wire += write_frame(&mut w, Kind::Prepare, &[&cfg])
            .map_err(|e| MigrateError::Io("sending the configuration", e))?;
        w.flush()
            .map_err(|e| MigrateError::Io("sending the configuration", e))?;
        let _ = conn.set_read_timeout(Some(RUNNING_TIMEOUT));
        expect_frame(&mut r, &mut session, Kind::Prepared)?;
        if session.len() != SESSION_LEN {
            return Err(MigrateError::Corrupt(format!(
                "a session id of {} bytes",
                session.len()
            )));
        }
        Ok(())
    })();
    prepared.map_err(before)?;
    // The demand connection: authenticated as the first, bound to it by the session id.
    let (demand, demand_wire) = attach(&ep, &token, &session).map_err(before)?;
    wire += demand_wire;
    if cancel.load(Ordering::SeqCst) {
        demand.shutdown();
        return Err(before(MigrateError::Cancelled));
    }
    // The freeze: from here on the guest runs again only if the destination never ran.
    p.phase = "freezing";
    progress(&p);
    let user_paused = vm.is_paused();
    let t0 = Instant::now();
    let pause = vm.pause().map_err(|e| {
        demand.shutdown();
        before(MigrateError::Vm(format!("pausing the vCPUs: {e}")))
    })?;
    let resume = |error: MigrateError| {
        demand.shutdown();
        if !user_paused {
            if let Err(e) = vm.resume() {
                log::error!("resuming the guest after a failed migration: {e}");
            }
        }
        before(error)
    };
    let t = Instant::now();
    let state = vm.capture_state().and_then(|s| s.to_bytes()).map_err(|e| {
        resume(MigrateError::Vm(format!(
            "capturing the machine state: {e}"
        )))
    })?;
    let capture = t.elapsed();
    let regions = Regions::of(vm.memory());
    let start = (|| {
        let e = io("sending the state");
        wire += write_frame(&mut w, Kind::State, &[&state]).map_err(e)?;
        wire += write_frame(&mut w, Kind::Map, &[&regions.encode(4096)]).map_err(e)?;
        w.flush().map_err(e)?;
        let _ = conn.set_read_timeout(Some(RUNNING_TIMEOUT));
        let mut buf = Vec::new();
        expect_frame(&mut r, &mut buf, Kind::Running)
    })();
    if let Err(e) = start {
        return Err(resume(e));
    }
    let downtime = t0.elapsed();
    log::info!(
        "migration: the destination runs {:.3} ms after the pause; streaming {} of guest RAM",
        ms(downtime),
        total
    );
    let base = Interrupted {
        session,
        t0,
        downtime,
        pause,
        capture,
        wire,
        data_bytes: 0,
        zero_bytes: 0,
        requests: 0,
        demand_sent: 0,
        reconnects: 0,
    };
    let streams = Streams {
        vm,
        tracker,
        params,
        conn,
        r,
        w,
        demand,
    };
    streams.run(None, base, &mut p, progress)
}

/// Reconnects a migration whose connections were lost after the destination ran (`snapctl
/// migrate --resume`): authenticates, names the session (`Resume`), learns which pieces the
/// destination holds (`Have`), binds a new demand connection and sends the rest. The guest stays
/// frozen whatever happens; a failure can be resumed again.
pub fn migrate_resume(
    vm: &Vm,
    tracker: Option<&WpTracker>,
    params: &MigrateParams,
    prev: &Interrupted,
    progress: &(dyn Fn(&MigrateProgress) + Sync),
) -> Result<MigrateReport, MigrateFailure> {
    let fail = |error| MigrateFailure {
        error,
        dest_running: true,
        interrupted: Some(Box::new(prev.clone())),
    };
    let total = vm.config().mem_bytes;
    let mut p = MigrateProgress {
        phase: "reconnecting",
        done_bytes: 0,
        total_bytes: total,
        wire_bytes: prev.wire,
        demand_requests: prev.requests,
    };
    progress(&p);
    let token = Token::read(&params.token_file).map_err(fail)?;
    let ep = Endpoint::parse(&params.to).map_err(fail)?;
    let conn = ep.connect().map_err(fail)?;
    let io = |what| move |e| MigrateError::Io(what, e);
    let _ = conn.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
    let dup = || {
        conn.try_clone()
            .map_err(io("duplicating the connection"))
            .map_err(fail)
    };
    let mut r = BufReader::new(dup()?);
    let mut w = BufWriter::with_capacity(64 << 10, dup()?);
    let pieces = (total / PIECE) as usize;
    let mut have = Vec::new();
    let mut wire = 0;
    let res = (|| {
        source_handshake(&mut r, &mut w, &token)?;
        wire += write_frame(&mut w, Kind::Resume, &[&prev.session])
            .map_err(io("naming the session"))?;
        w.flush().map_err(io("naming the session"))?;
        expect_frame(&mut r, &mut have, Kind::Have)?;
        if have.len() != pieces.div_ceil(8) {
            return Err(MigrateError::Corrupt(format!(
                "a bitmap of {} bytes for {pieces} pieces",
                have.len()
            )));
        }
        attach(&ep, &token, &prev.session)
    })();
    let (demand, n) = res.map_err(fail)?;
    let here = (0..pieces)
        .filter(|&i| have[i / 8] & (1 << (i % 8)) != 0)
        .count() as u64;
    log::info!(
        "migration: reconnected to {}; it holds {} of {} bytes, sending the rest",
        params.to,
        here * PIECE,
        total
    );
    let mut base = prev.clone();
    base.wire += wire + n;
    base.reconnects += 1;
    let streams = Streams {
        vm,
        tracker,
        params,
        conn,
        r,
        w,
        demand,
    };
    streams.run(Some(&have), base, &mut p, progress)
}

/// The connections of a migration whose destination runs.
struct Streams<'a> {
    vm: &'a Vm,
    tracker: Option<&'a WpTracker>,
    params: &'a MigrateParams,
    conn: Conn,
    r: BufReader<Conn>,
    w: BufWriter<Conn>,
    demand: Conn,
}

impl Streams<'_> {
    /// Sends every piece not in `have` (one bit per piece, set: the destination holds it), then
    /// waits for `Done`.
    fn run(
        self,
        have: Option<&[u8]>,
        base: Interrupted,
        p: &mut MigrateProgress,
        progress: &(dyn Fn(&MigrateProgress) + Sync),
    ) -> Result<MigrateReport, MigrateFailure> {
        let Streams {
            vm,
            tracker,
            params,
            conn,
            r,
            mut w,
            demand,
        } = self;
        let total = vm.config().mem_bytes;
        let regions = Regions::of(vm.memory());
        let out = Out {
            vm,
            tracker,
            regions: &regions,
            zstd: params.zstd,
            sent: (0..(total / PIECE) as usize)
                .map(|i| AtomicBool::new(have.is_some_and(|h| h[i / 8] & (1 << (i % 8)) != 0)))
                .collect(),
            wire: AtomicU64::new(base.wire),
            data_bytes: AtomicU64::new(base.data_bytes),
            zero_bytes: AtomicU64::new(base.zero_bytes),
            requests: AtomicU64::new(base.requests),
            demand_sent: AtomicU64::new(base.demand_sent),
            ending: AtomicBool::new(false),
        };
        let res = run_streams(&out, conn.try_clone(), r, &mut w, demand, p, progress);
        conn.shutdown();
        let wire = out.wire.load(Ordering::SeqCst);
        let data_bytes = out.data_bytes.load(Ordering::SeqCst);
        let dest = res.map_err(|error| MigrateFailure {
            error,
            dest_running: true,
            interrupted: Some(Box::new(Interrupted {
                wire,
                data_bytes,
                zero_bytes: out.zero_bytes.load(Ordering::SeqCst),
                requests: out.requests.load(Ordering::SeqCst),
                demand_sent: out.demand_sent.load(Ordering::SeqCst),
                ..base.clone()
            })),
        })?;
        Ok(MigrateReport {
            to: params.to.clone(),
            guest_bytes: total,
            downtime_ms: ms(base.downtime),
            pause_ms: ms(base.pause),
            capture_ms: ms(base.capture),
            duration_s: base.t0.elapsed().as_secs_f64(),
            wire_bytes: wire,
            data_bytes,
            zero_bytes: out.zero_bytes.load(Ordering::SeqCst),
            wire_ratio: wire as f64 / (data_bytes.max(1)) as f64,
            demand_requests: out.requests.load(Ordering::SeqCst),
            demand_sent: out.demand_sent.load(Ordering::SeqCst),
            zstd: params.zstd,
            reconnects: base.reconnects,
            dest,
        })
    }
}

/// Opens the demand connection: connect, authenticate, `Attach` with the session id, wait for
/// `Attached`. Returns it and the bytes of the `Attach` frame.
fn attach(ep: &Endpoint, token: &Token, session: &[u8]) -> Result<(Conn, u64), MigrateError> {
    let c = ep.connect()?;
    let _ = c.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = c.set_write_timeout(Some(WRITE_TIMEOUT));
    send_buffer(&c, DEMAND_SEND_BUFFER);
    let mut r = c
        .try_clone()
        .map_err(|e| MigrateError::Io("duplicating the demand connection", e))?;
    let mut w = c
        .try_clone()
        .map_err(|e| MigrateError::Io("duplicating the demand connection", e))?;
    source_handshake(&mut r, &mut w, token)?;
    let n = write_frame(&mut w, Kind::Attach, &[session])
        .map_err(|e| MigrateError::Io("attaching the demand connection", e))?;
    expect_frame(&mut r, &mut Vec::new(), Kind::Attached)?;
    Ok((c, n))
}

/// After `Running`: the bulk stream on this thread, the destination's `Done` (or its error) read
/// by one thread, its requests served by another on the demand connection.
fn run_streams(
    out: &Out<'_>,
    bulk: std::io::Result<Conn>,
    mut r: BufReader<Conn>,
    w: &mut BufWriter<Conn>,
    demand: Conn,
    p: &mut MigrateProgress,
    progress: &(dyn Fn(&MigrateProgress) + Sync),
) -> Result<DestFigures, MigrateError> {
    let bulk = bulk.map_err(|e| MigrateError::Io("duplicating the connection", e))?;
    let _ = bulk.set_read_timeout(None);
    let _ = demand.set_read_timeout(None);
    let mut dr = BufReader::new(
        demand
            .try_clone()
            .map_err(|e| MigrateError::Io("duplicating the demand connection", e))?,
    );
    let dw = Mutex::new(BufWriter::with_capacity(
        PIECE as usize + 1024,
        demand
            .try_clone()
            .map_err(|e| MigrateError::Io("duplicating the demand connection", e))?,
    ));
    let (tx, rx) = mpsc::channel();
    let bulk_ref = &bulk;
    std::thread::scope(|sc| {
        let tx2 = tx.clone();
        let reader = std::thread::Builder::new()
            .name("migrate-recv".into())
            .spawn_scoped(sc, move || {
                let mut buf = Vec::new();
                let ev = match read_frame(&mut r, &mut buf, 0) {
                    Ok(Kind::Done) => match serde_json::from_slice(&buf) {
                        Ok(f) => Event::Done(f),
                        Err(e) => Event::Lost(MigrateError::Corrupt(format!(
                            "the destination's figures: {e}"
                        ))),
                    },
                    Ok(Kind::Error) => {
                        Event::Lost(MigrateError::Peer(String::from_utf8_lossy(&buf).into()))
                    }
                    Ok(k) => Event::Lost(MigrateError::Corrupt(format!(
                        "unexpected {k:?} frame from the destination"
                    ))),
                    Err(e) => Event::Lost(e),
                };
                if matches!(ev, Event::Lost(_)) && !out.ending.load(Ordering::SeqCst) {
                    // Unblocks the stream at once.
                    bulk_ref.shutdown();
                }
                let _ = tx2.send(ev);
            });
        let dwr = &dw;
        let server = std::thread::Builder::new()
            .name("migrate-demand".into())
            .spawn_scoped(sc, move || {
                // A vCPU at the destination waits for each answer; short work per request.
                if uffd_sys::host::set_thread_fifo(1).is_err() {
                    let _ = uffd_sys::host::set_thread_nice(-10);
                }
                serve_demand(out, &mut dr, dwr, &tx, bulk_ref)
            });
        let res = match (reader, server) {
            (Ok(_), Ok(_)) => {
                let mut s = Streamer {
                    out,
                    w,
                    rx: &rx,
                    buf: vec![0u8; UNIT as usize],
                    zbuf: Vec::new(),
                    done: None,
                };
                s.stream(p, progress)
                    .and_then(|()| {
                        // Every piece is claimed: the demand thread sends none after this End.
                        out.ending.store(true, Ordering::SeqCst);
                        let mut dw = lock(&dw);
                        out.add_wire(
                            write_frame(&mut *dw, Kind::End, &[])
                                .and_then(|n| dw.flush().map(|()| n))
                                .map_err(|e| MigrateError::Io("sending to the destination", e))?,
                        );
                        Ok(())
                    })
                    .and_then(|()| {
                        p.phase = "finishing";
                        progress(p);
                        s.finish()
                    })
            }
            (Err(e), _) | (_, Err(e)) => Err(MigrateError::Io("starting a migration thread", e)),
        };
        out.ending.store(true, Ordering::SeqCst);
        bulk.shutdown();
        demand.shutdown();
        // What the other threads saw first says more than the stream's broken write.
        res.map_err(|e| match rx.try_recv() {
            Ok(Event::Lost(first)) if matches!(e, MigrateError::Io(..)) => first,
            _ => e,
        })
    })
}

/// The demand thread: each requested piece not sent yet is claimed and sent at once on the
/// demand connection (under its writer's lock: the `End` written there after the stream follows
/// every piece sent on it).
fn serve_demand(
    out: &Out<'_>,
    r: &mut BufReader<Conn>,
    w: &Mutex<BufWriter<Conn>>,
    tx: &Sender<Event>,
    bulk: &Conn,
) {
    let mut buf = Vec::new();
    let mut one = vec![0u8; PIECE as usize];
    let mut zbuf = Vec::new();
    loop {
        let res = match read_frame(r, &mut buf, 0) {
            Ok(Kind::Request) if buf.len() == 8 => {
                let gpa = u64::from_le_bytes(buf[..8].try_into().expect("8"));
                out.requests.fetch_add(1, Ordering::Relaxed);
                let mut w = lock(w);
                out.demand(gpa, &mut *w, &mut one, &mut zbuf)
            }
            Ok(Kind::Error) => Err(MigrateError::Peer(String::from_utf8_lossy(&buf).into())),
            Ok(k) => Err(MigrateError::Corrupt(format!(
                "unexpected {k:?} frame on the demand connection"
            ))),
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            if !out.ending.load(Ordering::SeqCst) {
                let _ = tx.send(Event::Lost(e));
                // The stream may be blocked writing: it ends at once.
                bulk.shutdown();
            }
            return;
        }
    }
}

/// What both senders share: the guest, the sent bit of each piece, the counters.
struct Out<'a> {
    vm: &'a Vm,
    tracker: Option<&'a WpTracker>,
    regions: &'a Regions,
    zstd: bool,
    /// Per piece: claimed by one sender, which sends it (each piece crosses the wire once).
    sent: Vec<AtomicBool>,
    wire: AtomicU64,
    data_bytes: AtomicU64,
    zero_bytes: AtomicU64,
    requests: AtomicU64,
    demand_sent: AtomicU64,
    /// The stream ended (or failed): a lost demand connection is no news.
    ending: AtomicBool,
}

impl Out<'_> {
    /// Claims piece `p` for the caller: true if nobody sent it yet.
    fn claim(&self, p: usize) -> bool {
        !self.sent[p].swap(true, Ordering::AcqRel)
    }

    fn add_wire(&self, n: u64) {
        self.wire.fetch_add(n, Ordering::Relaxed);
    }

    /// False when the unit at `gpa` holds no data for sure (the save's scanner test).
    fn may_hold_data(&self, gpa: u64) -> bool {
        let (Some(t), Ok(host)) = (
            self.tracker,
            self.vm.memory().get_host_address(GuestAddress(gpa)),
        ) else {
            return true;
        };
        t.may_hold_data(HostRange::new(host as usize, UNIT as usize))
            .unwrap_or(true)
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MigrateError> {
        self.vm
            .memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| MigrateError::Local(format!("reading guest memory at {gpa:#x}: {e}")))
    }

    /// A requested piece: sent now unless a sender claimed it already.
    fn demand(
        &self,
        gpa: u64,
        w: &mut impl Write,
        one: &mut [u8],
        zbuf: &mut Vec<u8>,
    ) -> Result<(), MigrateError> {
        let piece = self
            .regions
            .piece_of(gpa)
            .filter(|_| gpa.is_multiple_of(PIECE))
            .ok_or_else(|| {
                MigrateError::Corrupt(format!(
                    "the destination asked for {gpa:#x}, not a piece of guest RAM"
                ))
            })?;
        if !self.claim(piece) {
            return Ok(());
        }
        self.demand_sent.fetch_add(1, Ordering::Relaxed);
        let zero = if self.may_hold_data(gpa & !(UNIT - 1)) {
            self.read(gpa, one)?;
            one.iter().all(|&b| b == 0)
        } else {
            true
        };
        if zero {
            self.send_zero(w, piece, 1)?;
        } else {
            self.send_data(w, piece, one, zbuf)?;
        }
        w.flush()
            .map_err(|e| MigrateError::Io("sending to the destination", e))
    }

    /// `n` claimed pieces from `piece` (inside one unit) as one zero frame.
    fn send_zero(&self, w: &mut impl Write, piece: usize, n: usize) -> Result<(), MigrateError> {
        let len = n as u64 * PIECE;
        self.frame(w, piece, len, Encoding::Zero, None)?;
        self.zero_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Claimed pieces from `piece` holding `bytes` (inside one unit) as one data frame.
    fn send_data(
        &self,
        w: &mut impl Write,
        piece: usize,
        bytes: &[u8],
        zbuf: &mut Vec<u8>,
    ) -> Result<(), MigrateError> {
        let len = bytes.len() as u64;
        self.data_bytes.fetch_add(len, Ordering::Relaxed);
        if self.zstd {
            zbuf.resize(zstd::zstd_safe::compress_bound(bytes.len()), 0);
            let n = zstd::bulk::compress_to_buffer(bytes, zbuf, ZSTD_LEVEL)
                .map_err(|e| MigrateError::Local(format!("zstd: {e}")))?;
            if n < bytes.len() {
                return self.frame(w, piece, len, Encoding::Zstd, Some(&zbuf[..n]));
            }
        }
        self.frame(w, piece, len, Encoding::Raw, Some(bytes))
    }

    fn frame(
        &self,
        w: &mut impl Write,
        piece: usize,
        len: u64,
        enc: Encoding,
        bytes: Option<&[u8]>,
    ) -> Result<(), MigrateError> {
        let gpa = self.regions.gpa_of(piece);
        let mut head = [0u8; DATA_HEAD];
        head[..8].copy_from_slice(&gpa.to_le_bytes());
        head[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        head[12] = enc as u8;
        let n = write_frame(w, Kind::Data, &[&head, bytes.unwrap_or(&[])])
            .map_err(|e| MigrateError::Io("sending to the destination", e))?;
        self.add_wire(n);
        Ok(())
    }
}

struct Streamer<'a, 'o, W: Write> {
    out: &'a Out<'o>,
    w: &'a mut W,
    rx: &'a Receiver<Event>,
    buf: Vec<u8>,
    zbuf: Vec<u8>,
    done: Option<DestFigures>,
}

impl<W: Write> Streamer<'_, '_, W> {
    /// Every unit in address order, each piece that no request claimed first.
    fn stream(
        &mut self,
        p: &mut MigrateProgress,
        progress: &(dyn Fn(&MigrateProgress) + Sync),
    ) -> Result<(), MigrateError> {
        p.phase = "streaming";
        let out = self.out;
        let per_unit = (UNIT / PIECE) as usize;
        let ps = PIECE as usize;
        let mut last = Instant::now();
        let mut zero = vec![false; per_unit];
        for u in 0..out.sent.len() / per_unit {
            self.events()?;
            let first = u * per_unit;
            let todo = (first..first + per_unit).filter(|&i| !out.sent[i].load(Ordering::Acquire));
            let (Some(lo), Some(hi)) = (todo.clone().min(), todo.max()) else {
                continue;
            };
            let gpa = out.regions.gpa_of(first);
            if out.may_hold_data(gpa) {
                let (a, b) = ((lo - first) * ps, (hi + 1 - first) * ps);
                out.read(gpa + a as u64, &mut self.buf[a..b])?;
                for (i, z) in zero.iter_mut().enumerate() {
                    *z = i >= lo - first
                        && i <= hi - first
                        && self.buf[i * ps..(i + 1) * ps].iter().all(|&b| b == 0);
                }
            } else {
                zero.fill(true);
            }
            let mut i = lo - first;
            while i < per_unit {
                if !out.claim(first + i) {
                    i += 1;
                    continue;
                }
                let z = zero[i];
                let mut end = i + 1;
                while end < per_unit
                    && zero[end] == z
                    && (z || (end - i) * ps < FRAME_MAX)
                    && out.claim(first + end)
                {
                    end += 1;
                }
                if z {
                    out.send_zero(self.w, first + i, end - i)?;
                } else {
                    out.send_data(
                        self.w,
                        first + i,
                        &self.buf[i * ps..end * ps],
                        &mut self.zbuf,
                    )?;
                }
                i = end;
            }
            if last.elapsed() >= Duration::from_millis(50) {
                last = Instant::now();
                p.done_bytes = (u + 1) as u64 * UNIT;
                p.wire_bytes = out.wire.load(Ordering::Relaxed);
                p.demand_requests = out.requests.load(Ordering::Relaxed);
                progress(p);
            }
        }
        p.done_bytes = p.total_bytes;
        p.wire_bytes = out.wire.load(Ordering::Relaxed);
        progress(p);
        out.add_wire(
            write_frame(self.w, Kind::End, &[])
                .map_err(|e| MigrateError::Io("sending to the destination", e))?,
        );
        self.w
            .flush()
            .map_err(|e| MigrateError::Io("sending to the destination", e))
    }

    /// Waits for `Done` after `End`.
    fn finish(&mut self) -> Result<DestFigures, MigrateError> {
        let deadline = Instant::now() + DONE_TIMEOUT;
        loop {
            if let Some(d) = self.done.take() {
                return Ok(d);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(ev) => self.event(ev)?,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(MigrateError::Io(
                        "waiting for the destination to confirm",
                        std::io::ErrorKind::TimedOut.into(),
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(MigrateError::Closed),
            }
        }
    }

    fn event(&mut self, ev: Event) -> Result<(), MigrateError> {
        match ev {
            Event::Done(d) => {
                self.done = Some(d);
                Ok(())
            }
            Event::Lost(e) => Err(e),
        }
    }

    /// A failure reported by the other threads ends the stream.
    fn events(&mut self) -> Result<(), MigrateError> {
        loop {
            match self.rx.try_recv() {
                Ok(ev) => self.event(ev)?,
                Err(_) => return Ok(()),
            }
        }
    }
}
