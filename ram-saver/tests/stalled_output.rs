//! A save whose disk stops answering: a real FUSE file system (served by this process) whose
//! write(2) hangs in the kernel, real guest-like memory write-protected with a real
//! userfaultfd, and writer threads that block on write faults like vCPUs. Cancel and failures
//! must free the guest at once and let the save return, however long the disk hangs.
//!
//! Needs root (mount) and /dev/fuse.

#![forbid(unsafe_code)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::fuse::FuseMount;
use nix::errno::Errno;
use ram_saver::{
    live_save, AtomicFileSink, InjectPoint, SaveError, SaveOptions, SaveSummary, SnapshotHeader,
};
use uffd_sys::pagemap::wp_protected_regions;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wp_tracker::WpTracker;

const PS: usize = 4096;
const MIB: usize = 1 << 20;
const GUEST: usize = 64 * MIB;

/// The tests measure how fast the guest gets free: one at a time, on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn mount(name: &str) -> FuseMount {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("ram-saver-fuse-{name}-{}-{n}", std::process::id()));
    FuseMount::new(&dir).expect("mounting a FUSE file system (needs root and /dev/fuse)")
}

/// Guest memory, every page non-zero (so every page is data to write), registered with a
/// userfaultfd.
fn guest() -> (GuestMemoryMmap, WpTracker) {
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST)]).unwrap();
    let mut page = vec![0u8; PS];
    for p in 0..(GUEST / PS) as u64 {
        for (k, c) in page.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&(p << 20 | k as u64 | 1).to_le_bytes());
        }
        mem.write_slice(&page, GuestAddress(p * PS as u64)).unwrap();
    }
    let tracker = WpTracker::new().expect("userfaultfd with write-protect");
    tracker.register_memory(&mem).unwrap();
    (mem, tracker)
}

/// Bytes of guest memory still write-protected (pagemap's uffd-wp bits).
fn protected(mem: &GuestMemoryMmap) -> usize {
    mem.iter()
        .flat_map(|r| {
            let host = mem.get_host_address(r.start_addr()).unwrap() as usize;
            wp_protected_regions(host, r.len() as usize).unwrap()
        })
        .map(|p| p.len())
        .sum()
}

/// Time from `t0` until nothing in guest memory is write-protected, if within `timeout`.
fn wait_unprotected(mem: &GuestMemoryMmap, t0: Instant, timeout: Duration) -> Option<Duration> {
    while t0.elapsed() < timeout {
        if protected(mem) == 0 {
            return Some(t0.elapsed());
        }
        thread::sleep(Duration::from_micros(200));
    }
    None
}

/// Threads writing random guest pages: a write to a protected page blocks in the kernel until
/// the saver releases it, as a vCPU's would.
#[derive(Default)]
struct Writers {
    quit: AtomicBool,
    steps: AtomicU64,
}

impl Writers {
    fn run(&self, mem: &GuestMemoryMmap, id: u64) {
        let pages = (GUEST / PS) as u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ id;
        while !self.quit.load(Ordering::Acquire) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            mem.write_obj(x, GuestAddress(x % pages * PS as u64))
                .unwrap();
            if self
                .steps
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(64)
            {
                // Leave the saver threads some CPU on a small machine.
                thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Wait until no writer made a step for `quiet`; false if that does not happen in `timeout`.
    fn wait_blocked(&self, quiet: Duration, timeout: Duration) -> bool {
        let t = Instant::now();
        let mut last = self.steps.load(Ordering::Relaxed);
        let mut since = Instant::now();
        while t.elapsed() < timeout {
            thread::sleep(Duration::from_millis(5));
            let now = self.steps.load(Ordering::Relaxed);
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() >= quiet {
                return true;
            }
        }
        false
    }

    /// Time from `t0` until a writer makes a step again, if it does within `timeout`.
    fn wait_progress(&self, t0: Instant, timeout: Duration) -> Option<Duration> {
        let before = self.steps.load(Ordering::Relaxed);
        while t0.elapsed() < timeout {
            if self.steps.load(Ordering::Relaxed) != before {
                return Some(t0.elapsed());
            }
            thread::sleep(Duration::from_micros(100));
        }
        None
    }
}

type SaveResult = Result<SaveSummary, SaveError>;

fn run_save(
    mem: &GuestMemoryMmap,
    tracker: &WpTracker,
    sink: AtomicFileSink,
    opts: &SaveOptions,
    cancel: &AtomicBool,
) -> SaveResult {
    let header = SnapshotHeader::new(Vec::new(), 2, b"{}".to_vec());
    live_save(mem, tracker, sink, header, b"state", opts, &|_| {}, cancel)
}

/// Options under which guest writes soon wait for the output: a tiny fault staging cap, a 4 KiB
/// fault unit, and a slow scan, so most memory stays protected and faults fill the pipeline.
fn staging_starved() -> SaveOptions {
    SaveOptions {
        max_bandwidth: Some(2 * MIB as u64),
        fault_block_size: Some(PS),
        max_staging: Some(256 << 10),
        workers: 1,
        ..Default::default()
    }
}

#[derive(Debug)]
struct CancelReport {
    output_stalled: bool,
    /// WRITE requests and their bytes when the output hung.
    writes_at_stall: (u64, u64),
    guest_blocked: bool,
    protected_before_cancel: usize,
    released_after: Option<Duration>,
    /// When pagemap showed nothing write-protected any more.
    unprotected_after: Option<Duration>,
    returned_after: Option<Duration>,
    result: Option<SaveResult>,
}

/// The output hangs in write(2), fault staging is full, guest writes wait; cancel must free the
/// guest within 100 ms (asserted with slack for a loaded CI machine: 1 s; waiting on the
/// output it never happens) and `live_save` must return `Cancelled` soon after, with the
/// disk still hung. Once the disk answers again, the temporary file goes away.
#[test]
fn cancel_frees_the_guest_while_the_output_hangs() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let fuse = mount("cancel");
    fuse.stall_writes();
    let (mem, tracker) = guest();
    let w = Writers::default();
    let cancel = AtomicBool::new(false);
    let opts = staging_starved();
    let sink = AtomicFileSink::create(fuse.dir().join("vm.snap")).unwrap();
    let report = thread::scope(|s| {
        for id in 0..2 {
            let (w, mem) = (&w, &mem);
            s.spawn(move || w.run(mem, id));
        }
        thread::sleep(Duration::from_millis(20));
        tracker.protect_all().unwrap();
        let (tx, rx) = mpsc::channel();
        let (mem, tracker, opts, cancel) = (&mem, &tracker, &opts, &cancel);
        s.spawn(move || {
            let r = run_save(mem, tracker, sink, opts, cancel);
            let _ = tx.send((r, Instant::now()));
        });

        let output_stalled = fuse.wait_stalled(Duration::from_secs(30));
        let writes_at_stall = fuse.writes();
        let guest_blocked =
            output_stalled && w.wait_blocked(Duration::from_millis(300), Duration::from_secs(30));
        let protected_before_cancel = protected(mem);
        let t0 = Instant::now();
        cancel.store(true, Ordering::Release);
        let released_after = w.wait_progress(t0, Duration::from_secs(2));
        // The unprotect call may still be under way when the first writer wakes.
        let unprotected_after = wait_unprotected(mem, t0, Duration::from_secs(2));
        let first = rx.recv_timeout(Duration::from_secs(5));

        // Whatever happened, let everything end: free the guest, let the disk answer.
        if released_after.is_none() || unprotected_after.is_none() {
            let _ = tracker.unprotect_all();
        }
        fuse.resume();
        let (result, returned_after) = match first {
            Ok((r, at)) => (Some(r), Some(at - t0)),
            Err(_) => (rx.recv().ok().map(|(r, _)| r), None),
        };
        w.quit.store(true, Ordering::Release);
        CancelReport {
            output_stalled,
            writes_at_stall,
            guest_blocked,
            protected_before_cancel,
            released_after,
            unprotected_after,
            returned_after,
            result,
        }
    });
    eprintln!(
        "output hung at write request {} ({} bytes sent); {} bytes protected at cancel; guest \
         writes again {:?} after cancel, nothing protected {:?} after cancel, live_save \
         returned {:?} after cancel",
        report.writes_at_stall.0,
        report.writes_at_stall.1,
        report.protected_before_cancel,
        report.released_after,
        report.unprotected_after,
        report.returned_after
    );
    assert!(report.output_stalled, "the output never hung: {report:?}");
    assert!(
        report.guest_blocked,
        "guest writes never waited for the output: {report:?}"
    );
    assert!(
        report.protected_before_cancel > 0,
        "nothing protected while the guest waited: {report:?}"
    );
    let released = report
        .released_after
        .unwrap_or_else(|| panic!("cancel did not free the guest within 2 s: {report:?}"));
    assert!(
        released < Duration::from_secs(1),
        "guest released only {released:?} after cancel"
    );
    let unprotected = report
        .unprotected_after
        .unwrap_or_else(|| panic!("still write-protected 2 s after cancel: {report:?}"));
    assert!(
        unprotected < Duration::from_secs(1),
        "guest memory unprotected only {unprotected:?} after cancel"
    );
    let returned = report
        .returned_after
        .unwrap_or_else(|| panic!("live_save did not return within 5 s of cancel: {report:?}"));
    assert!(
        returned < Duration::from_secs(2),
        "live_save returned {returned:?} after cancel"
    );
    assert!(
        matches!(report.result, Some(Err(SaveError::Cancelled))),
        "{:?}",
        report.result
    );
    assert!(
        fuse.wait_files(Duration::from_secs(10), |f| f.is_empty()),
        "files left once the disk answered: {:?}",
        fuse.files()
    );
}

/// A failure while the output hangs (here an injected write error once the I/O thread is
/// stuck in write(2) with the first 8 MiB) releases the guest and returns without waiting for
/// the disk.
#[test]
fn failure_returns_while_the_output_hangs() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let fuse = mount("fail");
    fuse.stall_writes();
    let (mem, tracker) = guest();
    let cancel = AtomicBool::new(false);
    // Scan batches are 2 MiB: the first 8 MiB go to the I/O thread after 4, the error comes
    // at the 11th.
    let opts = SaveOptions {
        inject_failure: Some(InjectPoint::WriteError { after_batches: 11 }),
        workers: 1,
        ..Default::default()
    };
    let sink = AtomicFileSink::create(fuse.dir().join("vm.snap")).unwrap();
    tracker.protect_all().unwrap();
    let (result, took, stalled, left) = thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let t0 = Instant::now();
        let (mem, tracker, opts, cancel) = (&mem, &tracker, &opts, &cancel);
        s.spawn(move || {
            let _ = tx.send(run_save(mem, tracker, sink, opts, cancel));
        });
        let first = rx.recv_timeout(Duration::from_secs(5));
        let took = first.is_ok().then(|| t0.elapsed());
        let stalled = fuse.wait_stalled(Duration::ZERO);
        let left = protected(mem);
        let _ = tracker.unprotect_all();
        fuse.resume();
        let result = first.ok().or_else(|| rx.recv().ok());
        (result, took, stalled, left)
    });
    eprintln!("live_save returned after {took:?}; output was hung: {stalled}");
    assert_eq!(left, 0, "bytes still write-protected");
    let took = took.expect("live_save did not return within 5 s while the output hung");
    assert!(took < Duration::from_secs(3), "live_save took {took:?}");
    assert!(
        matches!(result, Some(Err(SaveError::Write(_)))),
        "{result:?}"
    );
    assert!(
        fuse.wait_files(Duration::from_secs(10), |f| f.is_empty()),
        "files left once the disk answered: {:?}",
        fuse.files()
    );
}

/// The disk fails the write the save waits on (EIO after hanging): the error reaches the
/// writer, the guest is released and nothing is left on the file system.
#[test]
fn write_error_from_the_disk_frees_the_guest() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let fuse = mount("eio");
    fuse.stall_writes();
    let (mem, tracker) = guest();
    let w = Writers::default();
    let cancel = AtomicBool::new(false);
    let opts = staging_starved();
    let sink = AtomicFileSink::create(fuse.dir().join("vm.snap")).unwrap();
    let (result, blocked, released, unprotected) = thread::scope(|s| {
        for id in 0..2 {
            let (w, mem) = (&w, &mem);
            s.spawn(move || w.run(mem, id));
        }
        thread::sleep(Duration::from_millis(20));
        tracker.protect_all().unwrap();
        let (tx, rx) = mpsc::channel();
        let (mem, tracker, opts, cancel) = (&mem, &tracker, &opts, &cancel);
        s.spawn(move || {
            let _ = tx.send(run_save(mem, tracker, sink, opts, cancel));
        });
        let blocked = fuse.wait_stalled(Duration::from_secs(30))
            && w.wait_blocked(Duration::from_millis(300), Duration::from_secs(30));
        fuse.fail_writes(Errno::EIO);
        let t0 = Instant::now();
        fuse.resume();
        let released = w.wait_progress(t0, Duration::from_secs(5));
        let unprotected = wait_unprotected(mem, t0, Duration::from_secs(5));
        if released.is_none() || unprotected.is_none() {
            let _ = tracker.unprotect_all();
        }
        let result = rx.recv().ok();
        w.quit.store(true, Ordering::Release);
        (result, blocked, released, unprotected)
    });
    eprintln!(
        "guest writes again {released:?}, nothing protected {unprotected:?} after the disk \
         failed the write"
    );
    assert!(blocked, "guest writes never waited for the output");
    assert!(
        released.is_some(),
        "guest not released after the write error"
    );
    assert!(
        unprotected.is_some(),
        "still write-protected after the write error"
    );
    assert!(
        matches!(result, Some(Err(SaveError::Write(_)))),
        "{result:?}"
    );
    assert!(
        fuse.wait_files(Duration::from_secs(10), |f| f.is_empty()),
        "files left: {:?}",
        fuse.files()
    );
}

/// The FUSE file system is a working save target when it answers: the save completes and the
/// snapshot is committed under its name, private (0600), at its full size.
#[test]
fn save_to_fuse_completes_when_the_disk_answers() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let fuse = mount("ok");
    let (mem, tracker) = guest();
    let cancel = AtomicBool::new(false);
    let target = fuse.dir().join("vm.snap");
    let sink = AtomicFileSink::create(&target).unwrap();
    tracker.protect_all().unwrap();
    let summary = run_save(&mem, &tracker, sink, &SaveOptions::default(), &cancel).unwrap();
    assert_eq!(protected(&mem), 0);
    let files = fuse.files();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].name, "vm.snap");
    assert_eq!(files[0].mode, 0o600, "{files:?}");
    assert_eq!(files[0].size, summary.file_bytes);
    assert_eq!(summary.pages_saved, (GUEST / PS) as u64);
    // The bytes went out (and were discarded): the file system only keeps sizes.
    assert!(fuse.writes().1 >= summary.file_bytes);
}
