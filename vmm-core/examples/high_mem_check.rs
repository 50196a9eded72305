//! Boots a guest with memory beyond 3 GiB (so part of the data area lives above 4 GiB), lets it
//! write, then checks it with the oracle and the guest's self-check.
//!
//! `cargo run --release -p vmm-core --example high_mem_check -- [MEM_MIB]` (default 3584).

use std::time::{Duration, Instant};

use vmm_core::{oracle, GuestParams, MemBackend, Vm, VmConfig, WriteRate};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mem_mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3584);
    let cfg = VmConfig {
        mem_bytes: mem_mib << 20,
        vcpus: 2,
        backend: MemBackend::Anon,
        guest: GuestParams {
            write_rate: WriteRate::Full,
            working_set_pages: None,
            seed: 9,
        },
        kernel: None,
    };
    let vm = Vm::boot(cfg.clone(), Box::new(std::io::sink()))?;
    let t = Instant::now();
    while !vm.progress().fill_done || vm.progress().steps.iter().any(|&s| s < 1_000_000) {
        if let Some(s) = vm.exit_status() {
            return Err(format!("VM ended: {s}").into());
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err("no progress".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    vm.pause()?;
    let slots = vmm_core::guest::read_slots(vm.memory(), cfg.vcpus)?;
    let to = Instant::now();
    let r = oracle::check(vm.memory(), &cfg, Some(&slots))?;
    println!(
        "oracle OK: {} pages, slots {slots:?}, {:?}",
        r.pages_checked,
        to.elapsed()
    );
    println!(
        "last page of vCPU 1: {:#x}",
        vm.guest_layout()
            .page_gpa(1, vm.guest_layout().slice_pages - 1)
    );
    vm.request_self_check()?;
    vm.resume()?;
    let t = Instant::now();
    loop {
        if let Some(v) = vm.self_check_result() {
            println!("guest self-check: {v:?} after {:?}", t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
