//! Pages never touched before protection are caught too, with UFFD_FEATURE_WP_UNPOPULATED and
//! with the MADV_POPULATE_READ fallback.

mod common;

use std::time::Duration;

use common::{expect_fault, Mapping, Writer, PAGE};
use wp_tracker::{HostRange, WpConfig, WpTracker};

fn never_touched_page_faults(config: WpConfig) {
    let m = Mapping::anon(64 * PAGE);
    let t = WpTracker::with_config(config).unwrap();
    assert_eq!(
        t.is_wp_unpopulated(),
        config.use_wp_unpopulated,
        "features {}",
        t.features()
    );
    // SAFETY: `m` is declared before `t` and outlives it.
    unsafe { t.register(m.range()) }.unwrap();
    m.write(0, 9); // one populated page, the rest never touched
    t.protect_all().unwrap();

    // Every page of the range is now marked, populated or not.
    let prot = uffd_sys::pagemap::wp_protected_regions(m.addr, m.len).unwrap();
    let covered: usize = prot.iter().map(|r| r.len()).sum();
    assert_eq!(
        covered, m.len,
        "not every page is write-protected: {prot:x?}"
    );

    // Reading a never-touched page does not fault.
    assert_eq!(m.read(40 * PAGE), 0);
    let mut none = Vec::new();
    assert_eq!(t.read_faults(&mut none).unwrap(), 0);

    let w = Writer::spawn(m.page(41) + 8, 0x5A);
    expect_fault(&t, m.page(41), PAGE);
    w.assert_blocked_for(Duration::from_millis(150));
    assert_eq!(m.read(41 * PAGE + 8), 0);
    t.unprotect(HostRange::new(m.page(41), PAGE), true).unwrap();
    w.finish();
    assert_eq!(m.read(41 * PAGE + 8), 0x5A);
}

#[test]
fn never_touched_page_faults_with_wp_unpopulated() {
    let avail = WpTracker::new().unwrap().available_features();
    assert!(
        avail.contains(uffd_sys::UFFD_FEATURE_WP_UNPOPULATED),
        "this machine's kernel is expected to offer WP_UNPOPULATED (offers {avail})"
    );
    never_touched_page_faults(WpConfig {
        use_wp_unpopulated: true,
        ..WpConfig::default()
    });
}

#[test]
fn never_touched_page_faults_with_populate_read_fallback() {
    never_touched_page_faults(WpConfig {
        use_wp_unpopulated: false,
        ..WpConfig::default()
    });
}
