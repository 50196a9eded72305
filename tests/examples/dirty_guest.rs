//! Dirty tracking on a running built-in guest: the guest's rate with `DirtyTracker` on vs off,
//! harvest costs, bytes per harvest, and the guest's huge pages.
//!
//! `cargo run --release -p tests --example dirty_guest [-- --mib 1024 --precision backing|page|unit
//! --hot PAGES]`
//!
//! Boots the built-in guest (2 vCPUs, full write rate, THP-backed anonymous memory, writing over
//! all its RAM or a hot set of `--hot` pages), waits for its first fill, then alternates twice:
//! 3 s untracked, 3 s tracked with a harvest every 0.5 s; then asks the guest to check itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_core::{GuestParams, MemBackend, Vm, VmConfig, WriteRate};
use wp_tracker::{DirtyTracker, Precision, WpTracker};

fn steps(vm: &Vm) -> u64 {
    vm.progress().steps.iter().sum()
}

/// Guest steps per second over `dur`, calling `between` every 0.5 s.
fn rate(vm: &Vm, dur: Duration, mut between: impl FnMut()) -> f64 {
    let (s0, t0) = (steps(vm), Instant::now());
    while t0.elapsed() < dur {
        std::thread::sleep(Duration::from_millis(500));
        between();
    }
    (steps(vm) - s0) as f64 / t0.elapsed().as_secs_f64()
}

fn huge_mib(vm: &Vm) -> usize {
    vmm_core::host_ranges(vm.memory())
        .into_iter()
        .flat_map(|(_, host, len)| uffd_sys::pagemap::huge_regions(host, len))
        .map(|(s, e)| e - s)
        .sum::<usize>()
        >> 20
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let mib: u64 = arg("--mib").map_or(1024, |v| v.parse().expect("--mib"));
    let precision = match arg("--precision").as_deref() {
        None | Some("backing") => Precision::Backing,
        Some("page") => Precision::Page,
        Some("unit") => Precision::Unit,
        Some(other) => panic!("--precision {other}: backing, page or unit"),
    };
    let vm = Vm::boot(
        VmConfig {
            mem_bytes: mib << 20,
            vcpus: 2,
            backend: MemBackend::Anon,
            guest: GuestParams {
                write_rate: WriteRate::Full,
                working_set_pages: arg("--hot").map(|v| v.parse().expect("--hot")),
                seed: 5,
            },
            kernel: None,
        },
        Box::new(std::io::sink()),
    )
    .expect("boot the built-in guest");
    let t0 = Instant::now();
    while !vm.progress().fill_done {
        assert!(t0.elapsed() < Duration::from_secs(300), "guest fill");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "guest {mib} MiB, filled in {:.1?}, huge MiB {}",
        t0.elapsed(),
        huge_mib(&vm)
    );
    let wp = Arc::new(WpTracker::new().expect("userfaultfd"));
    wp.register_memory(vm.memory()).expect("register guest RAM");
    for cycle in 0..2 {
        let off = rate(&vm, Duration::from_secs(3), || {});
        let t0 = Instant::now();
        let tracker = DirtyTracker::start(wp.clone(), precision).expect("start tracking");
        let arm = t0.elapsed();
        let mut harvests = Vec::new();
        let on = rate(&vm, Duration::from_secs(3), || {
            let t0 = Instant::now();
            let bytes = tracker.harvest().expect("harvest").bytes();
            harvests.push((t0.elapsed(), bytes >> 20));
        });
        let faults = tracker.faults();
        let huge_tracked = huge_mib(&vm);
        drop(tracker);
        println!(
            "cycle {cycle} {precision:?}: steps/s off {off:.0}, tracked {on:.0} ({:.0} %); \
             arm {arm:.2?}, {faults} faults in 3 s; huge MiB while tracked {huge_tracked}",
            100.0 * on / off
        );
        println!("  harvests every 0.5 s (time, MiB): {harvests:.2?}");
    }
    drop(wp);
    println!("huge MiB after {}", huge_mib(&vm));

    vm.request_self_check().expect("self-check request");
    let t0 = Instant::now();
    let verdict = loop {
        if let Some(v) = vm.self_check_result() {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "self-check answer");
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("self-check: {verdict:?}");
    vm.shutdown();
}
