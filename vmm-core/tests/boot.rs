//! Boot, progress, serial, idle and rate-limited modes, guest power-off (real KVM).

mod common;

use std::time::Duration;

use common::*;
use vmm_core::{VmExitStatus, WriteRate};

#[test]
fn two_vcpus_progress_ticks_and_serial() {
    let (vm, buf) = boot(small_cfg(WriteRate::Full));
    wait_steps(&vm, 10_000);
    let p0 = vm.progress();
    wait_until(Duration::from_secs(30), "more steps and ticks", || {
        let p = vm.progress();
        p.ticks > p0.ticks && p.steps.iter().zip(&p0.steps).all(|(a, b)| a > b)
    });
    wait_until(Duration::from_secs(30), "a status line", || {
        buf.text().contains("snapguest: t=")
    });
    wait_until(Duration::from_secs(30), "progress reports", || {
        vm.progress().reports.iter().all(|&r| r > 0)
    });
    assert!(vm.exit_status().is_none());
    vm.shutdown();
    assert_eq!(vm.exit_status(), Some(VmExitStatus::Stopped));
}

#[test]
fn idle_guest_does_not_step() {
    let (vm, _buf) = boot(small_cfg(WriteRate::Idle));
    wait_until(Duration::from_secs(30), "fill", || vm.progress().fill_done);
    let t0 = vm.progress().ticks;
    std::thread::sleep(Duration::from_millis(700));
    let p = vm.progress();
    assert!(p.steps.iter().all(|&s| s == 0), "idle guest stepped: {p:?}");
    assert!(p.ticks > t0, "ticks must advance while idle: {p:?}");
}

#[test]
fn rate_limited_guest_roughly_keeps_its_rate() {
    let rate = 2_000;
    let (vm, _buf) = boot(small_cfg(WriteRate::PagesPerSec(rate)));
    wait_until(Duration::from_secs(30), "fill", || vm.progress().fill_done);
    let p0 = vm.progress();
    wait_until(Duration::from_secs(30), "2 s of guest time", || {
        vm.progress().ticks >= p0.ticks + 200
    });
    let p1 = vm.progress();
    let secs = (p1.ticks - p0.ticks) as f64 / 100.0;
    for (a, b) in p1.steps.iter().zip(&p0.steps) {
        let r = (a - b) as f64 / secs;
        assert!(
            r > rate as f64 * 0.3 && r < rate as f64 * 3.0,
            "rate {r:.0} pages/s far from {rate}"
        );
    }
}

#[test]
fn guest_poweroff_ends_the_vm() {
    let (vm, _buf) = boot(small_cfg(WriteRate::Idle));
    wait_until(Duration::from_secs(30), "fill", || vm.progress().fill_done);
    vm.request_guest_poweroff().unwrap();
    let s = vm.wait(Duration::from_secs(30)).expect("VM should end");
    assert!(matches!(s, VmExitStatus::PowerOff { .. }), "{s}");
    assert!(vm.pause().is_err());
}

#[test]
fn pause_resume_and_capture_requires_pause() {
    let (vm, _buf) = boot(small_cfg(WriteRate::Full));
    wait_steps(&vm, 1000);
    assert!(matches!(
        vm.capture_state(),
        Err(vmm_core::VmError::NotPaused)
    ));
    for _ in 0..5 {
        vm.pause().unwrap();
        assert!(vm.is_paused());
        let a = vm.progress().steps;
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(a, vm.progress().steps, "steps moved while paused");
        vm.resume().unwrap();
        assert!(!vm.is_paused());
    }
    wait_until(Duration::from_secs(30), "steps after resume", || {
        let p = vm.progress();
        p.steps.iter().all(|&s| s > 1000)
    });
}

#[test]
fn memfd_backend_boots() {
    let mut cfg = small_cfg(WriteRate::Full);
    cfg.backend = vmm_core::MemBackend::Memfd;
    let (vm, _buf) = boot(cfg);
    wait_steps(&vm, 1000);
}

#[test]
fn hugetlbfs_backend_boots_or_explains() {
    let mut cfg = small_cfg(WriteRate::Full);
    cfg.backend = vmm_core::MemBackend::Hugetlbfs;
    match vmm_core::Vm::boot(cfg, Box::new(std::io::sink())) {
        Ok(vm) => wait_steps(&vm, 1000),
        Err(vmm_core::VmError::NotEnoughHugepages { needed, .. }) => assert_eq!(needed, 32),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn overwrite(vm: &vmm_core::Vm, gpa: u64, bytes: &[u8]) {
    use vm_memory::{Bytes, GuestAddress};
    vm.memory().write_slice(bytes, GuestAddress(gpa)).unwrap();
}

#[test]
fn guest_exception_is_reported_as_panic() {
    let (vm, _buf) = boot(small_cfg(WriteRate::Full));
    wait_steps(&vm, 100);
    vm.pause().unwrap();
    let prog = vmm_core::guest::program::assemble().unwrap();
    let end = vmm_core::layout::CODE_START + prog.code.len() as u64;
    // int3 is one byte, so the vCPU hits it whatever instruction boundary it resumes at.
    overwrite(
        &vm,
        prog.user_start,
        &vec![0xCC; (end - prog.user_start) as usize],
    );
    vm.resume().unwrap();
    let s = vm.wait(Duration::from_secs(30)).expect("VM should end");
    match s {
        VmExitStatus::GuestPanic(r) => assert!(r.reason.contains("vector 3"), "{r}"),
        other => panic!("expected a guest panic, got {other}"),
    }
}

#[test]
fn triple_fault_is_reported() {
    let (vm, _buf) = boot(small_cfg(WriteRate::Full));
    wait_steps(&vm, 100);
    vm.pause().unwrap();
    let prog = vmm_core::guest::program::assemble().unwrap();
    let end = vmm_core::layout::CODE_START + prog.code.len() as u64;
    // No IDT gate is present any more and ring-3 code is int3: #BP -> #NP -> #DF -> shutdown.
    overwrite(&vm, vmm_core::layout::IDT_START, &[0u8; 4096]);
    overwrite(
        &vm,
        prog.user_start,
        &vec![0xCC; (end - prog.user_start) as usize],
    );
    vm.resume().unwrap();
    let s = vm.wait(Duration::from_secs(30)).expect("VM should end");
    assert!(matches!(s, VmExitStatus::TripleFault(_)), "{s}");
}
