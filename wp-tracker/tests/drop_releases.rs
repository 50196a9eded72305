//! Dropping the tracker releases everything: blocked writers wake, later writes do not block,
//! and no page keeps its uffd-wp bit.

mod common;

use std::time::Duration;

use common::{expect_fault, run_with_timeout, write_at, Mapping, Writer, PAGE};
use uffd_sys::pagemap::{pagemap_entries, wp_protected_regions};
use wp_tracker::WpTracker;

#[test]
fn drop_unprotects_wakes_and_unregisters() {
    let a = Mapping::anon(256 * PAGE);
    let b = Mapping::anon(64 * PAGE);
    for i in (0..256).step_by(3) {
        a.write(i * PAGE, 1);
    }
    let t = WpTracker::new().unwrap();
    // SAFETY: both mappings are declared before `t` and outlive it.
    unsafe { t.register(a.range()) }.unwrap();
    // SAFETY: as above.
    unsafe { t.register(b.range()) }.unwrap();
    t.protect_all().unwrap();
    assert!(!wp_protected_regions(a.addr, a.len).unwrap().is_empty());
    assert!(pagemap_entries(a.addr, a.len).unwrap()[0].uffd_wp());

    // A writer blocked at drop time is woken by the drop.
    let w = Writer::spawn(a.page(3) + 1, 7);
    expect_fault(&t, a.page(3), PAGE);
    w.assert_blocked_for(Duration::from_millis(100));
    drop(t);
    w.finish();

    for m in [&a, &b] {
        let (addr, len) = (m.addr, m.len);
        run_with_timeout("writes after drop", Duration::from_secs(10), move || {
            for i in 0..len / PAGE {
                write_at(addr + i * PAGE + 2, 3);
            }
        });
        let left = wp_protected_regions(m.addr, m.len).unwrap();
        assert!(left.is_empty(), "still protected after drop: {left:x?}");
        let wp: Vec<_> = pagemap_entries(m.addr, m.len)
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, e)| e.uffd_wp())
            .map(|(i, _)| i)
            .collect();
        assert!(wp.is_empty(), "pagemap uffd-wp bit set on pages {wp:?}");
    }

    // Unregistered too: a new tracker can take the same memory.
    let t2 = WpTracker::new().unwrap();
    // SAFETY: `a` outlives `t2`, which unregisters on drop.
    unsafe { t2.register(a.range()) }.expect("range still registered after drop");
}

#[test]
fn unprotect_all_releases_but_keeps_registration() {
    let m = Mapping::anon(32 * PAGE);
    let t = WpTracker::new().unwrap();
    // SAFETY: `m` is declared before `t` and outlives it.
    unsafe { t.register(m.range()) }.unwrap();
    t.protect_all().unwrap();
    let w = Writer::spawn(m.page(5), 1);
    expect_fault(&t, m.page(5), PAGE);
    t.unprotect_all().unwrap();
    w.finish();
    assert!(wp_protected_regions(m.addr, m.len).unwrap().is_empty());
    assert_eq!(t.registered(), vec![m.range()]);
    // Still registered: protect again and fault again.
    t.protect_all().unwrap();
    let w = Writer::spawn(m.page(6), 1);
    expect_fault(&t, m.page(6), PAGE);
    t.unregister(m.range()).unwrap();
    w.finish();
    assert!(t.registered().is_empty());
}
