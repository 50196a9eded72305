//! Write-protect works on memfd (shmem), hugetlbfs and THP-backed anonymous memory, and the
//! tracker tells which protected pages may hold data without reading (allocating) holes.

mod common;

use std::time::Duration;

use common::{
    allocated_bytes, expect_fault, file_memory, write_at, HugePagePool, Mapping, Writer, HUGE, PAGE,
};
use uffd_sys::pagemap::{present_regions, wp_protected_regions};
use uffd_sys::PAGE_IS_HUGE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
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

/// Huge pages come from a pool this test sizes itself: without them it fails, never passes.
#[test]
fn hugetlbfs_memory_is_tracked_in_huge_pages() {
    const PAGES: usize = 4;
    let _pool = HugePagePool::reserve(PAGES);
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
}

fn host(mem: &GuestMemoryMmap, off: usize) -> usize {
    mem.get_host_address(GuestAddress(off as u64)).unwrap() as usize
}

/// memfd memory: the page cache decides, also for pages this process does not map (pagemap
/// shows those as markers, like holes), and copying skips holes instead of allocating them.
#[test]
fn memfd_holes_are_told_from_data_and_never_read() {
    const LEN: usize = 16 << 20;
    let (mem, file) = file_memory(LEN, false);
    mem.write_obj(0x1111u64, GuestAddress(3 * PAGE as u64))
        .unwrap();
    mem.write_obj(0x2222u64, GuestAddress((HUGE + 300 * PAGE) as u64))
        .unwrap();
    // Written through another mapping: in the page cache, not in this mapping's page tables.
    {
        let other = Mapping::of_file(&file, LEN).unwrap();
        other.write(3 * HUGE + 5 * PAGE, 0x33);
    }
    let t = WpTracker::new().unwrap();
    t.register_memory(&mem).unwrap();
    t.protect_all().unwrap();
    let unit = |i: usize| HostRange::new(host(&mem, i * HUGE), HUGE);
    assert_eq!(t.may_hold_data(unit(0)), Some(true));
    assert_eq!(t.may_hold_data(unit(1)), Some(true));
    assert_eq!(t.may_hold_data(unit(2)), Some(false));
    assert_eq!(
        t.may_hold_data(unit(3)),
        Some(true),
        "a page cached but not mapped here counts as data"
    );
    assert_eq!(t.may_hold_data(unit(7)), Some(false));

    let before = allocated_bytes(&file);
    let mut buf = vec![0xAAu8; LEN];
    t.copy_protected(HostRange::new(host(&mem, 0), LEN), &mut buf)
        .unwrap();
    assert_eq!(allocated_bytes(&file), before, "the copy allocated holes");
    let mut want = vec![0u8; LEN];
    want[3 * PAGE..3 * PAGE + 8].copy_from_slice(&0x1111u64.to_le_bytes());
    want[HUGE + 300 * PAGE..HUGE + 300 * PAGE + 8].copy_from_slice(&0x2222u64.to_le_bytes());
    want[3 * HUGE + 5 * PAGE] = 0x33;
    assert!(buf == want, "copy differs from the memory");
    t.unregister_all().unwrap();
}

/// hugetlbfs memory: a huge page in the file but not mapped here (invisible to mincore and
/// pagemap) must not make the tracker call anything empty; once every cached page is mapped,
/// never-touched huge pages are empty and copies do not allocate them.
#[test]
fn hugetlbfs_holes_are_told_from_data_and_never_read() {
    const PAGES: usize = 4;
    let _pool = HugePagePool::reserve(PAGES);
    let (mem, file) = file_memory(PAGES * HUGE, true);
    mem.write_obj(0x1111u64, GuestAddress(8)).unwrap();
    {
        let other = Mapping::of_file(&file, PAGES * HUGE).unwrap();
        other.write(2 * HUGE + 16, 0x22);
    }
    let t = WpTracker::new().unwrap();
    t.register_memory(&mem).unwrap();
    t.protect_all().unwrap();
    let unit = |i: usize| HostRange::new(host(&mem, i * HUGE), HUGE);
    assert_eq!(t.may_hold_data(unit(0)), Some(true));
    for i in 1..PAGES {
        assert_eq!(
            t.may_hold_data(unit(i)),
            Some(true),
            "huge page {i}: the file holds a page not mapped here, so nothing is known empty"
        );
    }
    // Reading maps the cached page here; now every cached page is mapped.
    let v: u8 = mem.read_obj(GuestAddress(2 * HUGE as u64 + 16)).unwrap();
    assert_eq!(v, 0x22);
    assert_eq!(t.may_hold_data(unit(2)), Some(true));
    assert_eq!(t.may_hold_data(unit(1)), Some(false));
    assert_eq!(t.may_hold_data(unit(3)), Some(false));

    let free = HugePagePool::free();
    let mut buf = vec![0xAAu8; PAGES * HUGE];
    t.copy_protected(HostRange::new(host(&mem, 0), PAGES * HUGE), &mut buf)
        .unwrap();
    assert_eq!(HugePagePool::free(), free, "the copy allocated huge pages");
    let mut want = vec![0u8; PAGES * HUGE];
    want[8..16].copy_from_slice(&0x1111u64.to_le_bytes());
    want[2 * HUGE + 16] = 0x22;
    assert!(buf == want, "copy differs from the memory");
    t.unregister_all().unwrap();
}

/// Private anonymous memory: never-touched protected pages (uffd-wp markers, which pagemap
/// shows as swapped) and zero-page mappings hold no data; written pages do.
#[test]
fn anonymous_markers_are_not_data() {
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 * HUGE)]).unwrap();
    mem.write_obj(7u64, GuestAddress((HUGE + 9 * PAGE) as u64))
        .unwrap();
    let _: u64 = mem.read_obj(GuestAddress(2 * HUGE as u64)).unwrap();
    let t = WpTracker::new().unwrap();
    assert!(t.is_wp_unpopulated(), "{}", t.features());
    t.register_memory(&mem).unwrap();
    t.protect_all().unwrap();
    let unit = |i: usize| HostRange::new(host(&mem, i * HUGE), HUGE);
    let markers = uffd_sys::pagemap::pagemap_entries(unit(0).start, HUGE).unwrap();
    assert!(
        markers.iter().all(|e| e.swapped()),
        "not markers: {:x?}",
        &markers[..4]
    );
    assert_eq!(t.may_hold_data(unit(0)), Some(false));
    assert_eq!(t.may_hold_data(unit(1)), Some(true));
    assert_eq!(t.may_hold_data(unit(2)), Some(false), "zero page");
    // Reading a marker maps the zero page, still no data.
    let _: u64 = mem.read_obj(GuestAddress(3 * HUGE as u64)).unwrap();
    assert_eq!(t.may_hold_data(unit(3)), Some(false));
    // A copy reads the data page only: the markers around it stay markers.
    let mut buf = vec![0xAAu8; HUGE];
    t.copy_protected(unit(1), &mut buf).unwrap();
    let mut want = vec![0u8; HUGE];
    want[9 * PAGE..9 * PAGE + 8].copy_from_slice(&7u64.to_le_bytes());
    assert!(buf == want, "copy differs from the memory");
    let after = uffd_sys::pagemap::pagemap_entries(unit(1).start, HUGE).unwrap();
    assert_eq!(
        after.iter().filter(|e| e.is_marker()).count(),
        HUGE / PAGE - 1,
        "the copy read never-touched pages"
    );
    t.unprotect_all().unwrap();
    write_at(unit(4).start + 8, 1);
    assert_eq!(t.may_hold_data(unit(4)), Some(true));
    t.unregister_all().unwrap();
}

/// Ranges registered without their memory (`register`) have no known backing.
#[test]
fn raw_ranges_have_no_known_backing() {
    let m = Mapping::anon(4 * PAGE);
    let t = WpTracker::new().unwrap();
    // SAFETY: `m` is declared before `t` and outlives it.
    unsafe { t.register(m.range()) }.unwrap();
    assert_eq!(t.may_hold_data(m.range()), None);
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
