//! Writers block on protected pages until the handler releases them; every fault is reported once.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{run_with_timeout, write_at, Mapping, PAGE};
use wp_tracker::{HostRange, WpFault, WpTracker};

/// Wait for exactly one fault (20 s max).
fn one_fault(t: &WpTracker) -> WpFault {
    let mut out = Vec::new();
    let n = t
        .wait_faults(Duration::from_secs(20), &mut out)
        .expect("wait");
    assert_eq!(n, 1, "expected one fault, got {out:x?}");
    out[0]
}

/// Wait until `flag` is set (20 s max).
fn wait_flag(flag: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !flag.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "writer still blocked 20 s after release"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn writer_blocks_until_the_page_is_unprotected() {
    // Mapping first: on a failed assertion the tracker drops before it and wakes the writer.
    let m = Mapping::anon(16 * PAGE);
    let t = Arc::new(WpTracker::new().unwrap());
    for i in 0..16 {
        m.write(i * PAGE, 1);
    }
    // SAFETY: `m` is declared before `t`, so it outlives every registration.
    unsafe { t.register(m.range()) }.unwrap();
    t.protect_all().unwrap();

    // Reads never fault.
    assert_eq!(m.read(7 * PAGE), 1);

    let target = m.page(7) + 123;
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let writer = std::thread::spawn(move || {
        write_at(target, 0xAB);
        d.store(true, Ordering::SeqCst);
    });

    let f = one_fault(&t);
    assert!(f.wp, "{f:?}");
    assert_eq!(
        f.addr & !(PAGE - 1),
        m.page(7),
        "fault names the wrong page: {f:x?}"
    );
    if t.features().contains(uffd_sys::UFFD_FEATURE_EXACT_ADDRESS) {
        assert_eq!(f.addr, target, "EXACT_ADDRESS in use but address not exact");
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !done.load(Ordering::SeqCst),
        "writer was not blocked by write protection"
    );
    assert_eq!(m.read(7 * PAGE + 123), 0, "write landed while protected");

    // Release without waking: the writer stays asleep until an explicit wake.
    t.unprotect(HostRange::new(m.page(7), PAGE), false).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!done.load(Ordering::SeqCst), "DONTWAKE woke the writer");
    t.wake(HostRange::new(m.page(7), PAGE)).unwrap();
    wait_flag(&done);
    writer.join().unwrap();
    assert_eq!(m.read(7 * PAGE + 123), 0xAB);

    // The released page no longer faults; its neighbours still do.
    run_with_timeout(
        "write to released page",
        Duration::from_secs(10),
        move || write_at(target, 0xCD),
    );
    let mut out = Vec::new();
    assert_eq!(t.read_faults(&mut out).unwrap(), 0);

    let next = m.page(8);
    let done2 = Arc::new(AtomicBool::new(false));
    let d2 = done2.clone();
    let w2 = std::thread::spawn(move || {
        write_at(next, 2);
        d2.store(true, Ordering::SeqCst);
    });
    assert_eq!(one_fault(&t).addr & !(PAGE - 1), next);
    assert!(!done2.load(Ordering::SeqCst));
    t.unprotect(HostRange::new(next, PAGE), true).unwrap();
    wait_flag(&done2);
    w2.join().unwrap();
    t.unregister_all().unwrap();
}

#[test]
fn many_writers_on_many_pages_fault_exactly_once_each() {
    const THREADS: usize = 8;
    const PAGES_PER_THREAD: usize = 500;
    const PAGES: usize = THREADS * PAGES_PER_THREAD;

    let m = Mapping::anon(PAGES * PAGE);
    let t = Arc::new(WpTracker::new().unwrap());
    // Populate half the pages; the other half is never touched before protection.
    for i in (0..PAGES).step_by(2) {
        m.write(i * PAGE, 0xEE);
    }
    // SAFETY: `m` is declared before `t`, so it outlives every registration.
    unsafe { t.register(m.range()) }.unwrap();
    t.protect_all().unwrap();

    let counts: Arc<Vec<AtomicU32>> = Arc::new((0..PAGES).map(|_| AtomicU32::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (t, counts, stop, base) = (t.clone(), counts.clone(), stop.clone(), m.addr);
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut stray = Vec::new();
            let mut handled = 0usize;
            while handled < PAGES && !stop.load(Ordering::SeqCst) {
                out.clear();
                t.wait_faults(Duration::from_millis(100), &mut out)
                    .expect("wait");
                for f in &out {
                    if !f.wp || f.addr < base || f.addr >= base + PAGES * PAGE {
                        stray.push(*f);
                        continue;
                    }
                    let idx = (f.addr - base) / PAGE;
                    counts[idx].fetch_add(1, Ordering::SeqCst);
                    handled += 1;
                    t.unprotect(HostRange::new(base + idx * PAGE, PAGE), true)
                        .expect("release");
                }
            }
            (handled, stray)
        })
    };

    let base = m.addr;
    let writers: Vec<_> = (0..THREADS)
        .map(|tid| {
            std::thread::spawn(move || {
                for p in tid * PAGES_PER_THREAD..(tid + 1) * PAGES_PER_THREAD {
                    write_at(base + p * PAGE + tid, tid as u8 + 1);
                }
            })
        })
        .collect();
    run_with_timeout("writers", Duration::from_secs(60), move || {
        for w in writers {
            w.join().unwrap();
        }
    });
    stop.store(true, Ordering::SeqCst);
    let (handled, stray) = handler.join().unwrap();

    assert!(stray.is_empty(), "stray faults: {stray:x?}");
    let wrong: Vec<_> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| c.load(Ordering::SeqCst) != 1)
        .map(|(i, c)| (i, c.load(Ordering::SeqCst)))
        .collect();
    assert!(
        wrong.is_empty(),
        "pages not faulting exactly once (page, count): {wrong:?}"
    );
    assert_eq!(handled, PAGES);
    for tid in 0..THREADS {
        for p in tid * PAGES_PER_THREAD..(tid + 1) * PAGES_PER_THREAD {
            assert_eq!(m.read(p * PAGE + tid), tid as u8 + 1);
        }
    }
    let left = uffd_sys::pagemap::wp_protected_regions(m.addr, m.len).unwrap();
    assert!(left.is_empty(), "{} regions still protected", left.len());
    t.unregister_all().unwrap();
}
