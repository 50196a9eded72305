//! Write-protect works on memfd (shmem), hugetlbfs and THP-backed anonymous memory.

mod common;

use std::time::Duration;

use common::{expect_fault, reserve_huge_pages, restore_huge_pages, Mapping, Writer, HUGE, PAGE};
use uffd_sys::pagemap::{present_regions, wp_protected_regions};
use uffd_sys::PAGE_IS_HUGE;
use wp_tracker::{HostRange, WpError, WpTracker};

#[test]
fn memfd_shared_memory_is_tracked() {
    let m = Mapping::memfd(64 * PAGE, false).expect("memfd");
    let t = WpTracker::new().unwrap();
    assert!(
        t.is_wp_hugetlbfs_shmem(),
        "kernel lacks WP_HUGETLBFS_SHMEM: {}",
        t.features()
    );
    m.write(0, 1);
    m.write(10 * PAGE, 1);
    // SAFETY: `m` is declared before `t` and outlives it.
    unsafe { t.register(m.range()) }.unwrap();
    t.protect_all().unwrap();

    // A populated page and a never-touched page both fault.
    for (page, v) in [(10, 0x11u8), (33, 0x22)] {
        let w = Writer::spawn(m.page(page) + 5, v);
        expect_fault(&t, m.page(page), PAGE);
        w.assert_blocked_for(Duration::from_millis(100));
        t.unprotect(HostRange::new(m.page(page), PAGE), true)
            .unwrap();
        w.finish();
        assert_eq!(m.read(page * PAGE + 5), v);
    }
    drop(t);
    assert!(wp_protected_regions(m.addr, m.len).unwrap().is_empty());
}

#[test]
fn hugetlbfs_memory_is_tracked_in_huge_pages() {
    const PAGES: usize = 4;
    let prev = match reserve_huge_pages(PAGES) {
        Ok(prev) => prev,
        Err(why) => {
            println!("SKIP hugetlbfs test: cannot reserve {PAGES} huge pages: {why}");
            return;
        }
    };
    let result = std::panic::catch_unwind(|| {
        let m = Mapping::hugetlb(PAGES * HUGE).expect("mmap MAP_HUGETLB after reserving");
        let t = WpTracker::new().unwrap();
        m.write(0, 1); // huge page 0 populated, 1..3 never touched
                       // SAFETY: `m` is declared before `t` and outlives it.
        unsafe { t.register(m.range()) }.unwrap();
        t.protect_all().unwrap();

        // Protection works in huge pages only.
        let e = t.unprotect(HostRange::new(m.addr, PAGE), true).unwrap_err();
        assert!(matches!(e, WpError::Misaligned { .. }), "{e}");

        for (hp, v) in [(0usize, 0x33u8), (2, 0x44)] {
            let page = m.addr + hp * HUGE;
            let w = Writer::spawn(page + 3 * PAGE + 1, v);
            expect_fault(&t, page, HUGE);
            w.assert_blocked_for(Duration::from_millis(100));
            t.unprotect(HostRange::new(page, HUGE), true).unwrap();
            w.finish();
            assert_eq!(m.read(hp * HUGE + 3 * PAGE + 1), v);
        }
        drop(t);
        assert!(wp_protected_regions(m.addr, m.len).unwrap().is_empty());
    });
    restore_huge_pages(prev);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn thp_ranges_are_protected_and_released_whole() {
    const CHUNKS: usize = 4;
    let m = Mapping::anon_thp(CHUNKS * HUGE);
    for i in 0..CHUNKS * HUGE / PAGE {
        m.write(i * PAGE, 1);
    }
    let huge_bytes = |r: &[uffd_sys::pagemap::PageRegion]| -> usize {
        r.iter()
            .filter(|r| r.categories & PAGE_IS_HUGE != 0)
            .map(|r| r.len())
            .sum()
    };
    let present = present_regions(m.addr, m.len).unwrap();
    assert_eq!(
        huge_bytes(&present),
        m.len,
        "MADV_HUGEPAGE memory is not THP-backed (check /sys/kernel/mm/transparent_hugepage): \
         {present:x?}"
    );

    let t = WpTracker::new().unwrap();
    // SAFETY: `m` is declared before `t` and outlives it.
    unsafe { t.register(m.range()) }.unwrap();
    t.protect_all().unwrap();
    let prot = wp_protected_regions(m.addr, m.len).unwrap();
    assert_eq!(
        huge_bytes(&prot),
        m.len,
        "protection split huge pages: {prot:x?}"
    );

    let chunk = HostRange::new(m.addr + HUGE, HUGE);
    let w = Writer::spawn(chunk.start + 77 * PAGE, 9);
    let f = expect_fault(&t, chunk.start + 77 * PAGE, PAGE);
    assert!(chunk.contains(f.addr));
    w.assert_blocked_for(Duration::from_millis(100));
    t.unprotect(chunk, true).unwrap();
    w.finish();

    // The released chunk is writable and still huge; the others stay protected and huge.
    let present = present_regions(m.addr, m.len).unwrap();
    assert_eq!(
        huge_bytes(&present),
        m.len,
        "release split huge pages: {present:x?}"
    );
    let prot = wp_protected_regions(m.addr, m.len).unwrap();
    assert_eq!(huge_bytes(&prot), m.len - HUGE, "{prot:x?}");
    assert!(
        prot.iter()
            .all(|r| r.end <= chunk.start || r.start >= chunk.end()),
        "{prot:x?}"
    );

    for i in 0..CHUNKS {
        t.unprotect(HostRange::new(m.addr + i * HUGE, HUGE), true)
            .unwrap();
    }
    assert!(wp_protected_regions(m.addr, m.len).unwrap().is_empty());
    t.protect_all().unwrap();
    t.unprotect_all().unwrap();
    assert!(wp_protected_regions(m.addr, m.len).unwrap().is_empty());
    assert_eq!(huge_bytes(&present_regions(m.addr, m.len).unwrap()), m.len);
}
