//! `host::PageBuf` owns a mapping of its own and unmaps it when dropped. A test binary of its own:
//! no other test thread maps memory between the checks.

use uffd_sys::host::{page_size, PageBuf};

/// Whether any mapping of this process overlaps `[start, start + len)`.
fn overlaps_a_mapping(start: usize, len: usize) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|l| {
        let range = l.split_whitespace().next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap(),
            usize::from_str_radix(b, 16).unwrap(),
        );
        a < start + len && start < b
    })
}

#[test]
fn a_page_buf_is_zeroed_aligned_writable_and_unmapped_when_dropped() {
    let len = 3 << 20;
    let mut b = PageBuf::new(len).unwrap();
    let addr = b.as_ptr() as usize;
    assert_eq!(addr % page_size(), 0);
    assert_eq!(b.len(), len);
    assert!(b.iter().all(|&x| x == 0));
    b[0] = 9;
    b[len - 1] = 7;
    assert_eq!((b[0], b[len - 1]), (9, 7));
    assert!(overlaps_a_mapping(addr, len));
    drop(b);
    assert!(
        !overlaps_a_mapping(addr, len),
        "a dropped buffer should be unmapped"
    );
    assert!(PageBuf::new(0).is_err());
}
