//! Helpers shared by the KVM integration tests.
#![allow(dead_code)]

pub mod testkernel;

use std::time::{Duration, Instant};

use vmm_core::{GuestParams, MemBackend, SharedBuffer, Vm, VmConfig, WriteRate};

/// Polls `cond` every 10 ms until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A small config: 64 MiB, 2 vCPUs.
pub fn small_cfg(rate: WriteRate) -> VmConfig {
    VmConfig {
        mem_bytes: 64 << 20,
        vcpus: 2,
        backend: MemBackend::Anon,
        guest: GuestParams {
            write_rate: rate,
            working_set_pages: None,
            seed: 42,
        },
        kernel: None,
    }
}

/// Boots `cfg` with the console captured.
pub fn boot(cfg: VmConfig) -> (Vm, SharedBuffer) {
    let buf = SharedBuffer::new();
    let vm = Vm::boot(cfg, Box::new(buf.clone())).expect("boot");
    (vm, buf)
}

/// Waits until the fill is done and every vCPU did at least `steps` steps.
pub fn wait_steps(vm: &Vm, steps: u64) {
    wait_until(Duration::from_secs(60), "guest progress", || {
        if let Some(s) = vm.exit_status() {
            panic!("VM ended: {s}");
        }
        let p = vm.progress();
        p.fill_done && p.steps.iter().all(|&s| s >= steps)
    });
}
