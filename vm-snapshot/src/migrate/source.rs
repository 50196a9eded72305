//! The source of a migration: authenticate, freeze, send the state and map, stream every piece
//! once with requested pieces first, wait for `Done`.

use std::io::{BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_core::Vm;
use wp_tracker::{HostRange, WpTracker};

use super::wire::{expect_frame, read_frame, write_frame, Encoding, Kind, DATA_HEAD};
use super::{
    ms, source_handshake, DestFigures, Endpoint, MigrateError, Regions, Token, HANDSHAKE_TIMEOUT,
    PIECE, UNIT,
};

/// Most bytes in one streamed data frame: a request waits at most this long behind the stream
/// (in this process; the socket's buffer comes on top).
const FRAME_MAX: usize = 256 << 10;
/// How long the destination may take to build the VM and start it.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a write to the destination may block (a destination that stops reading).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the destination may take, after `End`, to say `Done`.
const DONE_TIMEOUT: Duration = Duration::from_secs(120);
/// zstd level of `--zstd`.
const ZSTD_LEVEL: i32 = 1;
/// Socket send buffer asked for (the kernel doubles it): with the destination's receive buffer,
/// what a requested piece can be queued behind.
pub(super) const SEND_BUFFER: usize = 256 << 10;

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
}

enum Event {
    Request(u64),
    Done(DestFigures),
    Lost(MigrateError),
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
    let _ = match &conn {
        super::Conn::Tcp(s) => {
            nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &SEND_BUFFER)
        }
        super::Conn::Unix(s) => {
            nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::SndBuf, &SEND_BUFFER)
        }
    };
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
    let prepared = (|| {
        wire += write_frame(&mut w, Kind::Prepare, &[&cfg])
            .map_err(|e| MigrateError::Io("sending the configuration", e))?;
        w.flush()
            .map_err(|e| MigrateError::Io("sending the configuration", e))?;
        let _ = conn.set_read_timeout(Some(RUNNING_TIMEOUT));
        expect_frame(&mut r, &mut Vec::new(), Kind::Prepared)
    })();
    prepared.map_err(before)?;
    if cancel.load(Ordering::SeqCst) {
        return Err(before(MigrateError::Cancelled));
    }
    // The freeze: from here on the guest runs again only if the destination never ran.
    p.phase = "freezing";
    progress(&p);
    let user_paused = vm.is_paused();
    let t0 = Instant::now();
    let pause = vm
        .pause()
        .map_err(|e| before(MigrateError::Vm(format!("pausing the vCPUs: {e}"))))?;
    let resume = |error: MigrateError| {
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
    let after = |error| MigrateFailure {
        error,
        dest_running: true,
    };
    // Requests and the end come from the destination on their own thread.
    let _ = conn.set_read_timeout(None);
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::Builder::new()
        .name("migrate-recv".into())
        .spawn(move || {
            let mut buf = Vec::new();
            loop {
                let ev = match read_frame(&mut r, &mut buf, 0) {
                    Ok(Kind::Request) if buf.len() == 8 => {
                        Event::Request(u64::from_le_bytes(buf[..8].try_into().expect("8")))
                    }
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
                let last = !matches!(ev, Event::Request(_));
                if tx.send(ev).is_err() || last {
                    return;
                }
            }
        })
        .map_err(|e| after(MigrateError::Io("starting the receive thread", e)))?;
    let mut s = Streamer {
        vm,
        tracker,
        regions: &regions,
        w: &mut w,
        rx: &rx,
        sent: vec![false; (total / PIECE) as usize],
        buf: vec![0u8; UNIT as usize],
        one: vec![0u8; PIECE as usize],
        zbuf: Vec::new(),
        zstd: params.zstd,
        wire,
        data_bytes: 0,
        zero_bytes: 0,
        requests: 0,
        demand_sent: 0,
        done: None,
    };
    let streamed = s.stream(&mut p, progress);
    let res = streamed.and_then(|()| {
        p.phase = "finishing";
        progress(&p);
        s.finish()
    });
    conn.shutdown();
    let _ = reader.join();
    let dest = res.map_err(after)?;
    let duration = t0.elapsed();
    Ok(MigrateReport {
        to: params.to.clone(),
        guest_bytes: total,
        downtime_ms: ms(downtime),
        pause_ms: ms(pause),
        capture_ms: ms(capture),
        duration_s: duration.as_secs_f64(),
        wire_bytes: s.wire,
        data_bytes: s.data_bytes,
        zero_bytes: s.zero_bytes,
        wire_ratio: s.wire as f64 / (s.data_bytes.max(1)) as f64,
        demand_requests: s.requests,
        demand_sent: s.demand_sent,
        zstd: params.zstd,
        dest,
    })
}

struct Streamer<'a, W: Write> {
    vm: &'a Vm,
    tracker: Option<&'a WpTracker>,
    regions: &'a Regions,
    w: &'a mut W,
    rx: &'a Receiver<Event>,
    /// Per piece: sent.
    sent: Vec<bool>,
    buf: Vec<u8>,
    /// One piece, for requests (served while `buf` holds a run).
    one: Vec<u8>,
    zbuf: Vec<u8>,
    zstd: bool,
    wire: u64,
    data_bytes: u64,
    zero_bytes: u64,
    requests: u64,
    demand_sent: u64,
    done: Option<DestFigures>,
}

impl<W: Write> Streamer<'_, W> {
    /// Every unit in address order, requested pieces first.
    fn stream(
        &mut self,
        p: &mut MigrateProgress,
        progress: &(dyn Fn(&MigrateProgress) + Sync),
    ) -> Result<(), MigrateError> {
        p.phase = "streaming";
        let per_unit = (UNIT / PIECE) as usize;
        let mut last = Instant::now();
        for u in 0..self.sent.len() / per_unit {
            self.serve_requests()?;
            let first = u * per_unit;
            let gpa = self.regions.gpa_of(first);
            let data = self.may_hold_data(gpa);
            let mut i = first;
            while i < first + per_unit {
                if self.sent[i] {
                    i += 1;
                    continue;
                }
                let mut end = i + 1;
                while end < first + per_unit && !self.sent[end] {
                    end += 1;
                }
                if data {
                    self.send_run(i, end)?;
                } else {
                    self.send_zero(i, end)?;
                }
                i = end;
            }
            if last.elapsed() >= Duration::from_millis(50) {
                last = Instant::now();
                p.done_bytes = (u + 1) as u64 * UNIT;
                p.wire_bytes = self.wire;
                p.demand_requests = self.requests;
                progress(p);
            }
        }
        p.done_bytes = p.total_bytes;
        p.wire_bytes = self.wire;
        progress(p);
        self.wire += write_frame(self.w, Kind::End, &[])
            .map_err(|e| MigrateError::Io("sending to the destination", e))?;
        self.w
            .flush()
            .map_err(|e| MigrateError::Io("sending to the destination", e))
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

    /// Waits for `Done` after `End` (requests that still arrive were for pieces already sent).
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
            Event::Request(gpa) => {
                self.requests += 1;
                let piece = self
                    .regions
                    .piece_of(gpa)
                    .filter(|_| gpa % PIECE == 0)
                    .ok_or_else(|| {
                        MigrateError::Corrupt(format!(
                            "the destination asked for {gpa:#x}, not a piece of guest RAM"
                        ))
                    })?;
                if !self.sent[piece] {
                    self.demand_sent += 1;
                    if self.may_hold_data(gpa & !(UNIT - 1)) {
                        let mut one = std::mem::take(&mut self.one);
                        let r = self.read_and_send(gpa, piece, piece + 1, &mut one, PIECE as usize);
                        self.one = one;
                        r?;
                    } else {
                        self.send_zero(piece, piece + 1)?;
                    }
                    self.w
                        .flush()
                        .map_err(|e| MigrateError::Io("sending to the destination", e))?;
                }
                Ok(())
            }
            Event::Done(d) => {
                self.done = Some(d);
                Ok(())
            }
            Event::Lost(e) => Err(e),
        }
    }

    fn serve_requests(&mut self) -> Result<(), MigrateError> {
        loop {
            match self.rx.try_recv() {
                Ok(ev) => self.event(ev)?,
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => return Err(MigrateError::Closed),
            }
        }
    }

    /// Pieces `[from, to)` (inside one unit, none sent) as zero frames.
    fn send_zero(&mut self, from: usize, to: usize) -> Result<(), MigrateError> {
        let len = (to - from) as u64 * PIECE;
        self.frame(from, len, Encoding::Zero, None)?;
        self.zero_bytes += len;
        Ok(())
    }

    /// Pieces `[from, to)` (inside one unit, none sent): read, zero pieces as zero frames, data
    /// in frames of at most [`FRAME_MAX`], requests served between frames (a piece a request
    /// sent meanwhile is skipped: each piece is sent once).
    fn send_run(&mut self, from: usize, to: usize) -> Result<(), MigrateError> {
        let gpa = self.regions.gpa_of(from);
        let ps = PIECE as usize;
        let len = (to - from) * ps;
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.read_and_send(gpa, from, to, &mut buf[..len], ps);
        self.buf = buf;
        r
    }

    fn read_and_send(
        &mut self,
        gpa: u64,
        from: usize,
        to: usize,
        buf: &mut [u8],
        ps: usize,
    ) -> Result<(), MigrateError> {
        self.vm
            .memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| MigrateError::Local(format!("reading guest memory at {gpa:#x}: {e}")))?;
        let zero: Vec<bool> = buf
            .chunks_exact(ps)
            .map(|c| c.iter().all(|&b| b == 0))
            .collect();
        let mut i = 0;
        while i < zero.len() {
            if self.sent[from + i] {
                i += 1;
                continue;
            }
            let z = zero[i];
            let mut end = i + 1;
            while end < zero.len()
                && zero[end] == z
                && !self.sent[from + end]
                && (z || (end - i) * ps < FRAME_MAX)
            {
                end += 1;
            }
            if z {
                self.send_zero(from + i, from + end)?;
            } else {
                self.send_data(from + i, &buf[i * ps..end * ps])?;
                // Between frames: what the vCPUs wait for first.
                if from + end < to {
                    self.serve_requests()?;
                }
            }
            i = end;
        }
        Ok(())
    }

    fn send_data(&mut self, piece: usize, bytes: &[u8]) -> Result<(), MigrateError> {
        let len = bytes.len() as u64;
        self.data_bytes += len;
        if self.zstd {
            let mut z = std::mem::take(&mut self.zbuf);
            z.resize(zstd::zstd_safe::compress_bound(bytes.len()), 0);
            let n = zstd::bulk::compress_to_buffer(bytes, &mut z, ZSTD_LEVEL)
                .map_err(|e| MigrateError::Local(format!("zstd: {e}")))?;
            let r = if n < bytes.len() {
                self.frame(piece, len, Encoding::Zstd, Some(&z[..n]))
            } else {
                self.frame(piece, len, Encoding::Raw, Some(bytes))
            };
            self.zbuf = z;
            return r;
        }
        self.frame(piece, len, Encoding::Raw, Some(bytes))
    }

    fn frame(
        &mut self,
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
        let n = write_frame(self.w, Kind::Data, &[&head, bytes.unwrap_or(&[])])
            .map_err(|e| MigrateError::Io("sending to the destination", e))?;
        self.wire += n;
        let pieces = (len / PIECE) as usize;
        self.sent[piece..piece + pieces].fill(true);
        Ok(())
    }
}
