//! Load: back-to-back saves of a running full-speed guest, alternating raw and zstd. Every file verifies, the
//! guest's self-check passes at the end, and the VMM's open file descriptors and RSS do not grow.
//!
//! The quick variant runs by default; the long one (50 saves of 512 MiB) is `#[ignore]`d:
//! `cargo test --release -p snapctl --test load -- --ignored --nocapture`.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// RSS the VMM may gain over the whole run. What a save allocates (staging up to guest RAM, output
/// batches, compression contexts) goes back to the host when it ends, so this is small against
/// what one save uses (a 128 MiB full-speed guest stages most of its RAM).
const RSS_SLACK_KIB: u64 = 16 << 10;

fn back_to_back(mem: &str, saves: usize) {
    let _s = serial();
    let dir = TempDir::new("load");
    let vmm = Vmm::boot(dir.path(), &["--mem", mem, "--write-rate", "full"]);
    let fresh = (vmm.fds(), vmm.rss_kib());
    // The first save creates what lives as long as the VMM (the userfaultfd tracker): measure after it.
    let warm = dir.join("warmup.snap");
    vmm.save_and_verify(&warm, &[]);
    std::fs::remove_file(&warm).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = (vmm.fds(), vmm.rss_kib(), vmm.threads());
    let t0 = Instant::now();
    let mut faults = 0;
    for i in 0..saves {
        let path = dir.join(&format!("s{i}.snap"));
        let zstd = i % 2 == 1;
        let s = vmm.save_and_verify(&path, if zstd { &["--zstd"] } else { &[] });
        faults += s["faults_served"].as_u64().unwrap_or(0);
        vmm.assert_no_orphan_protection(&format!("save {i}"));
        std::fs::remove_file(&path).unwrap();
    }
    let elapsed = t0.elapsed();
    // Connection threads of the last requests end a moment after their reply.
    let settle = Instant::now();
    while vmm.threads() > before.2 && settle.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = (vmm.fds(), vmm.rss_kib(), vmm.threads());
    let check = vmm.ctl(&["self-check", "--json"], Duration::from_secs(180));
    eprintln!(
        "load {mem} x{saves} (raw/zstd alternating) in {:.1} s, {faults} faults served: fds fresh {} / before {} / \
         after {}; VmRSS fresh {} KiB / before {} KiB / after {} KiB; threads before {} / after {}",
        elapsed.as_secs_f64(),
        fresh.0,
        before.0,
        after.0,
        fresh.1,
        before.1,
        after.1,
        before.2,
        after.2
    );
    assert_eq!(
        check.code(),
        Some(0),
        "guest self-check failed: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    assert_eq!(after.0, before.0, "open file descriptors grew");
    assert!(
        after.1 <= before.1 + RSS_SLACK_KIB,
        "RSS grew from {} KiB to {} KiB",
        before.1,
        after.1
    );
    assert_eq!(after.2, before.2, "threads grew");
    assert!(faults > 0, "a full-speed guest should fault during saves");
}

#[test]
fn back_to_back_saves_do_not_leak_quick() {
    back_to_back("128M", 10);
}

#[test]
#[ignore = "several minutes: 50 saves of a 512 MiB guest; run with --ignored (release build recommended)"]
fn back_to_back_saves_do_not_leak_512m_x50() {
    back_to_back("512M", 50);
}
