//! Armed write-protection (`WpTracker::protect_all_armed`): writer threads (standing in for
//! vCPUs and the VMM's own threads) write pages, never-touched ones included, while all memory
//! is protected and their faults are served by the arming's handler; the writers are then
//! stopped and the protection sealed. At the seal every page must be protected, and the memory
//! must be exactly what the writers had written when they stopped, even after they run on
//! (their writes must block). An arming that ends without a seal, by an error or a panic, must
//! leave nothing protected and every writer running.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{HugePagePool, Mapping, HUGE, PAGE};
use wp_tracker::WpTracker;

/// Writer threads that each stamp their own pages (spread over every 2 MiB unit) with a growing
/// counter, and can be parked between two writes like vCPUs at a freeze.
struct Writers {
    stop: Arc<AtomicBool>,
    park: Arc<AtomicBool>,
    parked: Arc<AtomicUsize>,
    /// Last stamp written per page (0: never written).
    last: Arc<Vec<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Writes done, all writers.
    writes: Arc<AtomicU64>,
}

const WRITERS: usize = 3;

impl Writers {
    fn start(m: &Mapping) -> Writers {
        let pages = m.len / PAGE;
        let mut w = Writers {
            stop: Arc::default(),
            park: Arc::default(),
            parked: Arc::default(),
            last: Arc::new((0..pages).map(|_| AtomicU64::new(0)).collect()),
            threads: Vec::new(),
            writes: Arc::default(),
        };
        for id in 0..WRITERS {
            let (stop, park, parked, last, writes) = (
                w.stop.clone(),
                w.park.clone(),
                w.parked.clone(),
                w.last.clone(),
                w.writes.clone(),
            );
            let base = m.addr;
            w.threads.push(std::thread::spawn(move || {
                let mut s: u64 = 0;
                while !stop.load(Ordering::SeqCst) {
                    if park.load(Ordering::SeqCst) {
                        parked.fetch_add(1, Ordering::SeqCst);
                        while park.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        parked.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    s += 1;
                    // Pages of this writer: id, id + WRITERS, ...; a fixed odd stride walks them
                    // all, so fresh (never-touched) pages keep being written.
                    let mine = pages / WRITERS;
                    let p = id + WRITERS * ((s as usize * 7919) % mine);
                    let stamp = (s << 8) | id as u64;
                    let addr = base + p * PAGE;
                    // SAFETY: inside the mapping, which outlives the writers (joined in `end`).
                    unsafe {
                        std::ptr::write_volatile(addr as *mut u64, stamp);
                        std::ptr::write_volatile((addr + PAGE - 8) as *mut u64, stamp);
                    }
                    last[p].store(stamp, Ordering::SeqCst);
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        w
    }

    /// Parks every writer between two writes and waits until all are parked.
    fn park(&self) {
        self.park.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        while self.parked.load(Ordering::SeqCst) < WRITERS {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "writers did not park"
            );
            std::thread::yield_now();
        }
    }

    fn unpark(&self) {
        self.park.store(false, Ordering::SeqCst);
    }

    /// Waits until the writers did `n` more writes than `from`.
    fn wait_writes(&self, from: u64, n: u64, what: &str) {
        let t0 = Instant::now();
        while self.writes.load(Ordering::SeqCst) < from + n {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{what}: writers are stuck at {} writes",
                self.writes.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn end(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

/// Stamps every page should hold: what the writers last wrote.
fn expected(w: &Writers) -> Vec<u64> {
    w.last.iter().map(|a| a.load(Ordering::SeqCst)).collect()
}

fn protected_bytes(m: &Mapping) -> usize {
    uffd_sys::pagemap::wp_protected_regions(m.addr, m.len)
        .expect("PAGEMAP_SCAN")
        .iter()
        .map(|r| r.len())
        .sum()
}

/// Arms, lets the writers fault while armed, parks them, seals, lets them run on (blocked), then
/// checks protection and the memory against the stamps at the seal.
fn sealed_memory_is_exact(m: &Mapping, what: &str) {
    // Some pages populated before arming, the rest never touched.
    for i in (0..m.len / PAGE).step_by(5) {
        m.write(i * PAGE + 100, 1);
    }
    let t = WpTracker::new().unwrap();
    // SAFETY: `m` outlives `t` (dropped at the end of this function, after `t`).
    unsafe { t.register(m.range()) }.unwrap();
    let w = Writers::start(m);
    let stats = t
        .protect_all_armed(|armed| {
            // The writers run (and fault) while armed.
            let from = w.writes.load(Ordering::SeqCst);
            w.wait_writes(from, 200, what);
            assert!(armed.touched_units() > 0, "{what}: no fault while armed");
            armed.converge().unwrap();
            w.wait_writes(w.writes.load(Ordering::SeqCst), 50, what);
            w.park();
            armed.seal().unwrap()
        })
        .unwrap();
    assert!(stats.faults > 0, "{what}: {stats:?}");
    let want = expected(&w);
    // Every page is protected at the seal, never-touched ones included.
    assert_eq!(
        protected_bytes(m),
        m.len,
        "{what}: not all protected at the seal"
    );
    // The writers run on and must block: their faults stay queued, nobody serves them.
    w.unpark();
    std::thread::sleep(Duration::from_millis(50));
    let mut image = vec![0u8; m.len];
    t.copy_protected(m.range(), &mut image).unwrap();
    for (p, &stamp) in want.iter().enumerate() {
        let at = |o: usize| {
            u64::from_ne_bytes(image[p * PAGE + o..p * PAGE + o + 8].try_into().unwrap())
        };
        assert_eq!(
            (at(0), at(PAGE - 8)),
            (stamp, stamp),
            "{what}: page {p} is not what was written at the seal"
        );
    }
    let mut faults = Vec::new();
    t.read_faults(&mut faults).unwrap();
    assert!(
        !faults.is_empty(),
        "{what}: writers ran on without faulting"
    );
    let writes = w.writes.load(Ordering::SeqCst);
    t.unprotect_all().unwrap();
    w.wait_writes(writes, 100, what);
    w.end();
    drop(t);
}

#[test]
fn sealed_anonymous_thp_memory_is_exact() {
    let m = Mapping::anon_thp(16 * HUGE);
    sealed_memory_is_exact(&m, "anon THP");
}

#[test]
fn sealed_memfd_memory_is_exact() {
    let m = Mapping::memfd(16 * HUGE, false).unwrap();
    sealed_memory_is_exact(&m, "memfd");
}

#[test]
fn sealed_hugetlbfs_memory_is_exact() {
    let _pool = HugePagePool::reserve(8);
    let m = Mapping::memfd(8 * HUGE, true).unwrap();
    sealed_memory_is_exact(&m, "hugetlbfs");
}

/// Ends an arming without a seal through `end` while writers fault; nothing may stay protected
/// and the writers must run on.
fn unsealed_arming_releases_everything(end: impl FnOnce(&wp_tracker::Armed<'_>), what: &str) {
    // More units than the writers touch before the end: some are still protected then.
    let m = Mapping::anon_thp(64 * HUGE);
    let t = WpTracker::new().unwrap();
    // SAFETY: `m` outlives `t`.
    unsafe { t.register(m.range()) }.unwrap();
    let w = Writers::start(&m);
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        t.protect_all_armed(|armed| {
            w.wait_writes(w.writes.load(Ordering::SeqCst), 10, what);
            // Parked, so that no fault after the end unprotects what the end left protected.
            w.park();
            end(armed)
        })
    }));
    assert_eq!(protected_bytes(&m), 0, "{what}: pages left protected");
    w.unpark();
    w.wait_writes(w.writes.load(Ordering::SeqCst), 1000, what);
    w.end();
    drop(res);
}

#[test]
fn an_arming_ended_without_a_seal_releases_everything() {
    unsealed_arming_releases_everything(|_| {}, "returned without sealing");
}

#[test]
fn an_arming_ended_by_a_panic_releases_everything() {
    unsealed_arming_releases_everything(|_| panic!("injected"), "panicked");
}

#[test]
fn an_arming_whose_writers_never_stop_and_is_given_up_releases_everything() {
    // The freeze fails to stop the writers (they keep running): the closure gives up after a
    // converge pass, as a failed pause would.
    unsealed_arming_releases_everything(
        |armed| {
            armed.converge().unwrap();
        },
        "converged, not sealed",
    );
}

#[test]
fn a_sealed_arming_cannot_be_sealed_again() {
    let m = Mapping::anon(4 * HUGE);
    let t = WpTracker::new().unwrap();
    // SAFETY: `m` outlives `t`.
    unsafe { t.register(m.range()) }.unwrap();
    t.protect_all_armed(|armed| {
        armed.seal().unwrap();
        assert!(matches!(armed.seal(), Err(wp_tracker::WpError::ArmClosed)));
        assert!(matches!(
            armed.converge(),
            Err(wp_tracker::WpError::ArmClosed)
        ));
    })
    .unwrap();
    // Sealed: the caller owns the protection.
    assert_eq!(protected_bytes(&m), m.len);
    t.unprotect_all().unwrap();
    assert_eq!(protected_bytes(&m), 0);
}
