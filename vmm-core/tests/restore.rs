//! Pause → capture → new VM from the state and the same memory → the guest continues (real KVM),
//! and the oracle catches planted inconsistencies.

mod common;

use std::time::Duration;

use common::*;
use vmm_core::guest::pattern;
use vmm_core::memory::write_page;
use vmm_core::oracle::{self, MismatchKind};
use vmm_core::{MachineState, SharedBuffer, Vm, WriteRate};

#[test]
fn restored_vm_continues_where_it_stopped() {
    let cfg = small_cfg(WriteRate::Full);
    let (vm, _buf) = boot(cfg.clone());
    wait_steps(&vm, 50_000);
    vm.pause().unwrap();
    let st = vm.capture_state().unwrap();
    let slots = st.guest_slots();
    let report = oracle::check(vm.memory(), &cfg, Some(&slots)).expect("oracle at capture");
    assert_eq!(report.vcpus.len(), 2);
    let mem = vm.memory().clone();
    vm.shutdown();
    drop(vm);

    let st = MachineState::from_bytes(&st.to_bytes().unwrap()).unwrap();
    assert_eq!(st.config(), &cfg);
    let buf = SharedBuffer::new();
    let vm = Vm::restore(&st, mem, Box::new(buf.clone()), true).unwrap();
    assert!(vm.is_paused());
    assert_eq!(
        vm.progress().steps,
        slots,
        "restored paused VM must sit at the captured slots"
    );
    vm.resume().unwrap();
    wait_until(
        Duration::from_secs(60),
        "steps beyond the captured slots",
        || {
            if let Some(s) = vm.exit_status() {
                panic!("restored VM ended: {s}");
            }
            let p = vm.progress();
            p.steps.iter().zip(&slots).all(|(a, b)| *a > b + 1000) && p.ticks > st.ticks
        },
    );
    vm.request_self_check().unwrap();
    let mut verdict = None;
    wait_until(Duration::from_secs(60), "self-check verdict", || {
        verdict = vm.self_check_result();
        verdict.is_some()
    });
    let verdict = verdict.unwrap();
    assert!(verdict.passed(), "self-check failed: {verdict:?}");
    wait_until(Duration::from_secs(10), "self-check line", || {
        buf.text().contains("self-check PASS")
    });
    vm.pause().unwrap();
    let slots2 = vmm_core::guest::read_slots(vm.memory(), cfg.vcpus).unwrap();
    oracle::check(vm.memory(), &cfg, Some(&slots2)).expect("oracle after restore");
}

#[test]
fn oracle_and_self_check_catch_planted_pages() {
    let cfg = small_cfg(WriteRate::Full);
    let (vm, _buf) = boot(cfg.clone());
    wait_steps(&vm, 20_000);
    vm.pause().unwrap();
    let slots = vmm_core::guest::read_slots(vm.memory(), cfg.vcpus).unwrap();
    oracle::check(vm.memory(), &cfg, Some(&slots)).unwrap();
    let gl = *vm.guest_layout();
    let in_flight = gl.step_gpa(0, slots[0] + 1);
    // A page vCPU 0 wrote recently, not the in-flight one.
    let s = (1..=slots[0])
        .rev()
        .find(|&s| gl.step_gpa(0, s) != in_flight)
        .unwrap();
    let gpa = gl.step_gpa(0, s);
    let mut orig = [0u64; 512];
    pattern::page_content(s, gpa, &mut orig);

    // Newer: a stamp beyond the slot, as if saved after the guest changed it.
    let mut p = [0u64; 512];
    pattern::page_content(slots[0] + 1000, gpa, &mut p);
    write_page(vm.memory(), gpa, &p).unwrap();
    let e = oracle::check(vm.memory(), &cfg, Some(&slots)).unwrap_err();
    assert_eq!(
        (e.kind, e.gpa, e.vcpu),
        (MismatchKind::Newer, gpa, 0),
        "{e}"
    );

    // Stale: the generation-0 content of a page that was written since.
    pattern::page_content(0, gpa, &mut p);
    write_page(vm.memory(), gpa, &p).unwrap();
    let e = oracle::check(vm.memory(), &cfg, Some(&slots)).unwrap_err();
    assert_eq!((e.kind, e.gpa), (MismatchKind::Stale, gpa), "{e}");

    // Garbage: one flipped qword.
    let mut g = orig;
    g[100] ^= 1;
    write_page(vm.memory(), gpa, &g).unwrap();
    let e = oracle::check(vm.memory(), &cfg, Some(&slots)).unwrap_err();
    assert_eq!((e.kind, e.gpa), (MismatchKind::Garbage, gpa), "{e}");

    // Wrong expected slot.
    let mut wrong = slots.clone();
    wrong[1] += 1;
    write_page(vm.memory(), gpa, &orig).unwrap();
    let e = oracle::check(vm.memory(), &cfg, Some(&wrong)).unwrap_err();
    assert_eq!(e.kind, MismatchKind::SlotMismatch);
    oracle::check(vm.memory(), &cfg, Some(&slots)).unwrap();

    // The guest's own check sees a newer page too.
    pattern::page_content(slots[0] + 1000, gpa, &mut p);
    write_page(vm.memory(), gpa, &p).unwrap();
    vm.request_self_check().unwrap();
    vm.resume().unwrap();
    let mut verdict = None;
    wait_until(Duration::from_secs(60), "self-check verdict", || {
        verdict = vm.self_check_result();
        verdict.is_some()
    });
    let v = verdict.unwrap();
    assert!(!v.vcpus[0].passed, "{v:?}");
    assert_eq!(v.vcpus[0].code, vmm_core::guest::ctrl::CHECK_NEWER);
    assert_eq!(v.vcpus[0].first_bad_gpa, Some(gpa));
    assert!(v.vcpus[1].passed, "{v:?}");
}

#[test]
fn small_working_set_stays_consistent() {
    let mut cfg = small_cfg(WriteRate::Full);
    cfg.guest.working_set_pages = Some(64);
    let (vm, _buf) = boot(cfg.clone());
    wait_steps(&vm, 20_000);
    vm.pause().unwrap();
    let slots = vmm_core::guest::read_slots(vm.memory(), cfg.vcpus).unwrap();
    let r = oracle::check(vm.memory(), &cfg, Some(&slots)).unwrap();
    assert!(r.vcpus.iter().all(|v| v.pages_written <= 64));
    vm.request_self_check().unwrap();
    vm.resume().unwrap();
    let mut verdict = None;
    wait_until(Duration::from_secs(60), "self-check verdict", || {
        verdict = vm.self_check_result();
        verdict.is_some()
    });
    assert!(verdict.unwrap().passed());
}
