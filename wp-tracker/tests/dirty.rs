//! `DirtyTracker` on real memory and a real userfaultfd: a harvest returns exactly the units
//! written since the last one, no write is lost across harvests made while writers run, kernel
//! writes count, and huge pages stay huge at `Precision::Backing`.

mod common;

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{run_with_timeout, write_at, Mapping, HUGE, PAGE};
use uffd_sys::pagemap::{huge_regions, wp_protected_regions};
use wp_tracker::{DirtyError, DirtySet, DirtyTracker, HostRange, Precision, WpTracker};

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// `units` (start addresses of `unit`-byte units) as merged runs, the shape a harvest returns.
fn as_runs(units: &BTreeSet<usize>, unit: usize) -> Vec<HostRange> {
    let mut out: Vec<HostRange> = Vec::new();
    for &a in units {
        match out.last_mut() {
            Some(last) if last.end() == a => last.len += unit,
            _ => out.push(HostRange::new(a, unit)),
        }
    }
    out
}

/// Write `v` to one byte of each page in `pages` from another thread (as a vCPU would).
fn write_from_thread(pages: Vec<usize>, v: u8) {
    run_with_timeout("writer", std::time::Duration::from_secs(60), move || {
        for a in pages {
            write_at(a + 17, v);
        }
    });
}

fn exact_pages(precision: Precision) {
    const PAGES: usize = 4096;
    let m = Mapping::anon(PAGES * PAGE);
    for i in 0..PAGES {
        m.write(i * PAGE, 1);
    }
    let wp = Arc::new(WpTracker::new().unwrap());
    // SAFETY: `m` is declared before `wp` and the tracker, so it outlives the registration.
    unsafe { wp.register(m.range()) }.unwrap();
    let t = DirtyTracker::start(wp.clone(), precision).unwrap();
    assert_eq!(
        t.harvest().unwrap(),
        DirtySet::default(),
        "nothing written yet"
    );

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for round in 0..3u8 {
        // Some pages twice, some neighbours (merged runs), never the same set twice.
        let mut written = BTreeSet::new();
        let mut order = Vec::new();
        for _ in 0..300 {
            let p = m.page(rng.below(PAGES));
            written.insert(p);
            order.push(p);
            order.push(p);
        }
        let run = m.page(rng.below(PAGES - 8));
        for i in 0..8 {
            written.insert(run + i * PAGE);
            order.push(run + i * PAGE);
        }
        write_from_thread(order, round + 2);
        assert_eq!(t.dirty_bytes(), written.len() * PAGE, "round {round}");
        let set = t.harvest().unwrap();
        assert_eq!(set.ranges, as_runs(&written, PAGE), "round {round}");
        for &p in &written {
            assert_eq!(m.read(p - m.addr + 17), round + 2, "the write happened");
        }
        assert_eq!(t.dirty_bytes(), 0);
    }
    assert_eq!(t.harvest().unwrap(), DirtySet::default(), "no writes since");
    assert_eq!(t.finish().unwrap(), DirtySet::default());
    assert!(wp_protected_regions(m.addr, m.len).unwrap().is_empty());
}

#[test]
fn page_precision_harvests_exactly_the_written_pages() {
    exact_pages(Precision::Page);
}

#[test]
fn backing_precision_is_exact_on_4k_memory() {
    exact_pages(Precision::Backing);
}

#[test]
fn no_write_is_lost_across_harvests_while_writers_run() {
    const PAGES: usize = 2048;
    const PASSES: usize = 3;
    let m = Mapping::anon(PAGES * PAGE);
    for i in 0..PAGES {
        m.write(i * PAGE, 1);
    }
    let wp = Arc::new(WpTracker::new().unwrap());
    // SAFETY: `m` outlives the registration (declared before the tracker).
    unsafe { wp.register(m.range()) }.unwrap();
    let t = DirtyTracker::start(wp.clone(), Precision::Page).unwrap();

    // The oracle: a clock ticks after each harvest returns. A writer reads the clock just
    // before each store; the page's last store must be in a harvest whose tick is at least
    // that reading (a harvest that ended after the store began).
    let clock = Arc::new(AtomicU64::new(0));
    let mut all: Vec<usize> = (0..PAGES).map(|i| m.page(i)).collect();
    let mut rng = Rng(7);
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i + 1));
    }
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = all
        .chunks(PAGES / 2)
        .enumerate()
        .map(|(w, half)| {
            let half = half.to_vec();
            let clock = clock.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(100 + w as u64);
                let mut last = Vec::new();
                for pass in 0..PASSES {
                    let mut order = half.clone();
                    for i in (1..order.len()).rev() {
                        order.swap(i, rng.below(i + 1));
                    }
                    for a in order {
                        let before = clock.load(Ordering::SeqCst);
                        write_at(a, 10 + pass as u8);
                        if pass == PASSES - 1 {
                            last.push((a, before));
                        }
                    }
                }
                last
            })
        })
        .collect();
    let waiter = {
        let done = done.clone();
        std::thread::spawn(move || {
            let last: Vec<(usize, u64)> = writers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect();
            done.store(true, Ordering::SeqCst);
            last
        })
    };

    let mut harvests: Vec<(u64, DirtySet)> = Vec::new();
    while !done.load(Ordering::SeqCst) {
        let set = t.harvest().unwrap();
        harvests.push((clock.fetch_add(1, Ordering::SeqCst), set));
        std::thread::yield_now();
    }
    let last = waiter.join().unwrap();
    let set = t.harvest().unwrap();
    harvests.push((clock.fetch_add(1, Ordering::SeqCst), set));

    assert_eq!(last.len(), PAGES);
    let lost: Vec<usize> = last
        .iter()
        .filter(|(a, before)| {
            !harvests
                .iter()
                .any(|(tick, set)| tick >= before && set.contains(*a))
        })
        .map(|(a, _)| (a - m.addr) / PAGE)
        .collect();
    assert!(
        lost.is_empty(),
        "over {} harvests the last writes to pages {lost:?} were lost",
        harvests.len()
    );
    assert_eq!(
        t.harvest().unwrap(),
        DirtySet::default(),
        "nothing after the end"
    );
    for i in 0..PAGES {
        assert_eq!(m.read(i * PAGE), 10 + PASSES as u8 - 1);
    }
}

#[test]
fn kernel_writes_into_guest_memory_are_tracked() {
    let m = Mapping::anon(64 * PAGE);
    m.write(0, 1);
    let wp = Arc::new(WpTracker::new().unwrap());
    // SAFETY: `m` outlives the registration (declared before the tracker).
    unsafe { wp.register(m.range()) }.unwrap();
    let t = DirtyTracker::start(wp.clone(), Precision::Page).unwrap();

    let (mut rx, mut tx) = (0, 0);
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    std::mem::swap(&mut rx, &mut fds[0]);
    std::mem::swap(&mut tx, &mut fds[1]);
    let rx = std::fs::File::from(unsafe {
        // SAFETY: a fresh descriptor from pipe(2), owned from here on.
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(rx)
    });
    let tx = std::fs::File::from(unsafe {
        // SAFETY: as above.
        <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(tx)
    });
    std::io::Write::write_all(&mut &tx, &[0x5A; 100]).unwrap();
    let dst = m.page(40) + 8;
    let fd = rx.as_raw_fd();
    let n = run_with_timeout("read(2)", std::time::Duration::from_secs(60), move || {
        // SAFETY: `dst..dst+100` lies inside `m`, which outlives this call.
        unsafe { libc::read(fd, dst as *mut libc::c_void, 100) }
    });
    assert_eq!(n, 100);
    assert_eq!(m.read(40 * PAGE + 8), 0x5A);
    let set = t.harvest().unwrap();
    assert_eq!(set.ranges, vec![HostRange::new(m.page(40), PAGE)]);
}

#[test]
fn huge_pages_stay_huge_at_backing_precision() {
    const LEN: usize = 32 * HUGE;
    let m = Mapping::anon_thp(LEN);
    for i in 0..LEN / PAGE {
        m.write(i * PAGE, 1);
    }
    let huge_bytes =
        |m: &Mapping| -> usize { huge_regions(m.addr, m.len).iter().map(|(s, e)| e - s).sum() };
    assert_eq!(
        huge_bytes(&m),
        LEN,
        "THP backs the whole mapping before tracking"
    );
    let wp = Arc::new(WpTracker::new().unwrap());
    // SAFETY: `m` outlives the registration (declared before the tracker).
    unsafe { wp.register(m.range()) }.unwrap();
    let t = DirtyTracker::start(wp.clone(), Precision::Backing).unwrap();

    let mut rng = Rng(42);
    for round in 0..10 {
        let mut units = BTreeSet::new();
        let mut order = Vec::new();
        for _ in 0..40 {
            let p = m.page(rng.below(LEN / PAGE));
            units.insert(p & !(HUGE - 1));
            order.push(p);
        }
        write_from_thread(order, 3);
        let set = t.harvest().unwrap();
        assert_eq!(set.ranges, as_runs(&units, HUGE), "round {round}");
        assert_eq!(
            huge_bytes(&m),
            LEN,
            "round {round}: every unit is still huge"
        );
    }
    drop(t);
    assert!(wp_protected_regions(m.addr, m.len).unwrap().is_empty());
    assert_eq!(huge_bytes(&m), LEN);
}

#[test]
fn nothing_registered_is_a_typed_error() {
    let wp = Arc::new(WpTracker::new().unwrap());
    assert!(matches!(
        DirtyTracker::start(wp, Precision::Unit),
        Err(DirtyError::NothingRegistered)
    ));
}

#[test]
fn drop_releases_everything_and_writers_run() {
    let m = Mapping::anon(32 * PAGE);
    let wp = Arc::new(WpTracker::new().unwrap());
    // SAFETY: `m` outlives the registration (declared before the tracker).
    unsafe { wp.register(m.range()) }.unwrap();
    let t = DirtyTracker::start(wp.clone(), Precision::Unit).unwrap();
    let written = m.page(3);
    write_from_thread(vec![written], 4);
    // The 2 MiB unit of the written page, clipped to the range (which may cross a unit border).
    let unit = written & !(HUGE - 1);
    let (start, end) = (unit.max(m.addr), (unit + HUGE).min(m.addr + m.len));
    assert_eq!(
        t.dirty_bytes(),
        end - start,
        "the unit clipped to the range"
    );
    let pending = t.finish().unwrap();
    assert_eq!(pending.ranges, vec![HostRange::new(start, end - start)]);
    assert!(wp_protected_regions(m.addr, m.len).unwrap().is_empty());
    m.write(5 * PAGE, 6); // would block forever if still protected
    assert_eq!(m.read(5 * PAGE), 6);
}

/// The kernel fact that rules out switching a range between an async and a synchronous
/// userfaultfd context at each freeze: `UFFDIO_UNREGISTER` itself clears the uffd-wp bits (raw
/// ioctls here: `WpTracker::unregister` releases first), so the record of what was not written
/// is gone with the registration.
#[test]
fn unregistering_drops_the_write_protect_record() {
    let m = Mapping::anon(64 * PAGE);
    for i in 0..64 {
        m.write(i * PAGE, 1);
    }
    let uffd = uffd_sys::Userfaultfd::open(0).unwrap();
    uffd.register(m.addr, m.len, uffd_sys::UFFDIO_REGISTER_MODE_WP)
        .unwrap();
    uffd.writeprotect(m.addr, m.len, uffd_sys::UFFDIO_WRITEPROTECT_MODE_WP)
        .unwrap();
    let protected: usize = wp_protected_regions(m.addr, m.len)
        .unwrap()
        .iter()
        .map(|r| r.len())
        .sum();
    assert_eq!(protected, m.len);
    uffd.unregister(m.addr, m.len).unwrap();
    assert!(wp_protected_regions(m.addr, m.len).unwrap().is_empty());
}

#[test]
fn suspend_hands_over_all_protected_and_resume_loses_no_fault() {
    const PAGES: usize = 512;
    let m = Mapping::anon(PAGES * PAGE);
    for i in 0..PAGES {
        m.write(i * PAGE, 1);
    }
    let wp = Arc::new(WpTracker::new().unwrap());
    // SAFETY: `m` outlives the registration (declared before the tracker).
    unsafe { wp.register(m.range()) }.unwrap();
    let t = DirtyTracker::start(wp.clone(), Precision::Page).unwrap();
    write_from_thread(vec![m.page(3), m.page(4), m.page(100)], 5);
    let set = t.suspend().unwrap();
    assert_eq!(
        set.ranges,
        vec![
            HostRange::new(m.page(3), 2 * PAGE),
            HostRange::new(m.page(100), PAGE)
        ]
    );
    // Everything is protected again and nobody reads the faults: a writer blocks, its fault
    // queued.
    let prot: usize = wp_protected_regions(m.addr, m.len)
        .unwrap()
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    assert_eq!(prot, m.len, "all protected after the suspend");
    let blocked = m.page(200);
    let writer = std::thread::spawn(move || write_at(blocked + 17, 9));
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(!writer.is_finished(), "the write waits for a fault reader");
    // Someone else (a save) released a range written meanwhile; tracking resumes with it.
    let released = HostRange::new(m.page(10), 3 * PAGE);
    wp.unprotect(released, true).unwrap();
    let t = DirtyTracker::resume(wp.clone(), Precision::Page, &[released]).unwrap();
    writer.join().unwrap();
    assert_eq!(m.read(200 * PAGE + 17), 9);
    assert_eq!(
        t.harvest().unwrap().ranges,
        vec![released, HostRange::new(m.page(200), PAGE)],
        "the initial set and the queued fault"
    );
    // A harvest whose save did not happen is put back: the next harvest has it again.
    write_from_thread(vec![m.page(300)], 3);
    let early = t.harvest().unwrap();
    t.put_back(&early);
    write_from_thread(vec![m.page(301), m.page(50)], 3);
    let both = t.harvest().unwrap();
    assert_eq!(
        both.ranges,
        vec![
            HostRange::new(m.page(50), PAGE),
            HostRange::new(m.page(300), 2 * PAGE)
        ]
    );
    let a = DirtySet {
        ranges: vec![
            HostRange::new(m.page(1), PAGE),
            HostRange::new(m.page(5), 2 * PAGE),
        ],
    };
    let b = DirtySet {
        ranges: vec![
            HostRange::new(m.page(2), PAGE),
            HostRange::new(m.page(6), 3 * PAGE),
        ],
    };
    assert_eq!(
        a.union(&b).ranges,
        vec![
            HostRange::new(m.page(1), 2 * PAGE),
            HostRange::new(m.page(5), 4 * PAGE)
        ]
    );
    assert_eq!(t.finish().unwrap(), DirtySet::default());
    assert!(wp_protected_regions(m.addr, m.len).unwrap().is_empty());
}

#[test]
fn backing_block_precision_records_aligned_blocks_on_4k_memory() {
    const PAGES: usize = 256;
    let m = Mapping::anon(PAGES * PAGE);
    for i in 0..PAGES {
        m.write(i * PAGE, 1);
    }
    let wp = Arc::new(WpTracker::new().unwrap());
    // SAFETY: `m` outlives the registration (declared before the tracker).
    unsafe { wp.register(m.range()) }.unwrap();
    let t = DirtyTracker::start(wp.clone(), Precision::BackingBlock(64 << 10)).unwrap();
    write_from_thread(vec![m.page(3), m.page(4), m.page(40), m.page(100)], 7);
    let block = 16 * PAGE;
    let first = m.addr & !(block - 1);
    let expect: BTreeSet<usize> = [3, 40, 100]
        .iter()
        .map(|&p| (m.page(p) - first) / block * block + first)
        .collect();
    let want: Vec<HostRange> = as_runs(&expect, block)
        .into_iter()
        .map(|r| {
            let s = r.start.max(m.addr);
            HostRange::new(s, r.end().min(m.addr + m.len) - s)
        })
        .collect();
    assert_eq!(t.harvest().unwrap().ranges, want);
    assert_eq!(m.read(100 * PAGE + 17), 7);
    assert_eq!(t.faults(), 3, "one fault per block");
    assert_eq!(t.finish().unwrap(), DirtySet::default());
}
