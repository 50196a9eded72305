//! `DirtyTracker` on a running built-in guest: at each cut (vCPUs paused), every page whose
//! content changed since the previous cut is in the harvested set, huge pages stay huge, and
//! the guest's self-check passes afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_core::{GuestParams, MemBackend, Vm, VmConfig, WriteRate};
use wp_tracker::{DirtySet, DirtyTracker, Precision, WpTracker};

const PAGE: usize = 4096;

/// Guest RAM as (host address of each page, contents), read through vm-memory.
fn snapshot(vm: &Vm) -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    for (gpa, host, len) in vmm_core::host_ranges(vm.memory()) {
        let mut buf = vec![0u8; len];
        vm.memory()
            .read_slice(&mut buf, GuestAddress(gpa))
            .expect("read guest RAM");
        out.push((host, buf));
    }
    out
}

fn huge_bytes(vm: &Vm) -> usize {
    vmm_core::host_ranges(vm.memory())
        .into_iter()
        .flat_map(|(_, host, len)| uffd_sys::pagemap::huge_regions(host, len))
        .map(|(s, e)| e - s)
        .sum()
}

/// Pause, harvest, copy RAM, resume: one cut.
fn cut(vm: &Vm, t: &DirtyTracker) -> (DirtySet, Vec<(usize, Vec<u8>)>) {
    vm.pause().expect("pause");
    let set = t.harvest().expect("harvest");
    let mem = snapshot(vm);
    vm.resume().expect("resume");
    (set, mem)
}

fn run(precision: Precision, hot_pages: Option<u64>) {
    let vm = Vm::boot(
        VmConfig {
            mem_bytes: 64 << 20,
            vcpus: 2,
            backend: MemBackend::Anon,
            guest: GuestParams {
                write_rate: WriteRate::Full,
                working_set_pages: hot_pages,
                seed: 23,
            },
            kernel: None,
        },
        Box::new(std::io::sink()),
    )
    .expect("boot the built-in guest");
    let t0 = Instant::now();
    while !vm.progress().fill_done {
        assert!(t0.elapsed() < Duration::from_secs(120), "guest fill");
        std::thread::sleep(Duration::from_millis(10));
    }
    let huge_before = huge_bytes(&vm);
    let wp = Arc::new(WpTracker::new().expect("userfaultfd"));
    wp.register_memory(vm.memory()).expect("register guest RAM");
    let t = DirtyTracker::start(wp.clone(), precision).expect("start tracking");

    let (_, mut before) = cut(&vm, &t);
    for round in 0..4 {
        let steps0: u64 = vm.progress().steps.iter().sum();
        while vm.progress().steps.iter().sum::<u64>() < steps0 + 20_000 {
            assert!(vm.exit_status().is_none(), "{:?}", vm.exit_status());
            std::thread::sleep(Duration::from_millis(5));
        }
        let (set, after) = cut(&vm, &t);
        let mut changed = 0;
        for ((host, a), (_, b)) in before.iter().zip(&after) {
            for (i, (pa, pb)) in a.chunks(PAGE).zip(b.chunks(PAGE)).enumerate() {
                if pa != pb {
                    changed += 1;
                    let addr = host + i * PAGE;
                    assert!(
                        set.contains(addr),
                        "{precision:?} round {round}: page at {addr:#x} changed but is not in the \
                         harvested set ({} bytes)",
                        set.bytes()
                    );
                }
            }
        }
        assert!(changed > 0, "round {round}: the guest wrote nothing");
        if hot_pages.is_some() {
            assert!(
                set.bytes() < 64 << 20,
                "round {round}: a hot-set guest dirtied all of RAM ({} bytes)",
                set.bytes()
            );
        }
        before = after;
    }
    if precision == Precision::Backing {
        assert_eq!(huge_bytes(&vm), huge_before, "huge pages stay huge");
    }
    drop(t);
    for (_, host, len) in vmm_core::host_ranges(vm.memory()) {
        assert!(uffd_sys::pagemap::wp_protected_regions(host, len)
            .expect("PAGEMAP_SCAN")
            .is_empty());
    }
    vm.request_self_check().expect("self-check");
    let t0 = Instant::now();
    let verdict = loop {
        if let Some(v) = vm.self_check_result() {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "self-check answer");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        verdict.vcpus.iter().all(|v| v.passed),
        "self-check: {verdict:?}"
    );
    vm.shutdown();
}

#[test]
fn every_changed_page_is_harvested_backing_hot_set() {
    run(Precision::Backing, Some(1024));
}

#[test]
fn every_changed_page_is_harvested_page_precision() {
    run(Precision::Page, Some(1024));
}

#[test]
fn every_changed_page_is_harvested_whole_ram() {
    run(Precision::Backing, None);
}
