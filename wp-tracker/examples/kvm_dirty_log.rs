//! Does KVM's dirty log work on this host, and what does it see? A probe, not a tracker.
//!
//! `cargo run --release -p wp-tracker --example kvm_dirty_log [-- --mib 1024]`
//!
//! A real-mode guest writes one byte to guest pages 2 and 5, then `out` and `hlt`; the VMM
//! writes page 7 itself. The memory slot has `KVM_MEM_LOG_DIRTY_PAGES`; `KVM_GET_DIRTY_LOG`
//! then shows which pages KVM saw written (pages 2 and 5 expected; page 7, a VMM write, is not
//! KVM's to see). Also times `KVM_GET_DIRTY_LOG` on a slot of `--mib` MiB.

use std::time::Instant;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit};

const PAGE: usize = 4096;
const CODE_GPA: usize = 0x1000;
const GUEST_CODE: [u8; 15] = [
    0xC6, 0x06, 0x00, 0x20, 0x42, // mov byte [0x2000], 0x42
    0xC6, 0x06, 0x00, 0x50, 0x42, // mov byte [0x5000], 0x42
    0xB0, 0x42, // mov al, 0x42
    0xE6, 0x10, // out 0x10, al
    0xF4, // hlt
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .map_or(1024, |v| v.parse().expect("--mib"));
    let len = mib << 20;
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    // SAFETY: a fresh private anonymous mapping at a kernel-chosen address; leaked (the process
    // ends right after).
    let ram = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(ram, libc::MAP_FAILED);
    let ram = ram as usize;
    for (i, b) in GUEST_CODE.iter().enumerate() {
        // SAFETY: inside the mapping above.
        unsafe { std::ptr::write_volatile((ram + CODE_GPA + i) as *mut u8, *b) };
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: len as u64,
        userspace_addr: ram as u64,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
    };
    // SAFETY: the mapping outlives the VM (it is never unmapped).
    unsafe { vm.set_user_memory_region(region) }
        .expect("KVM_SET_USER_MEMORY_REGION with dirty log");
    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("sregs");
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rip = CODE_GPA as u64;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("regs");

    // Clear what loading the code may have logged.
    let _ = vm.get_dirty_log(0, len).expect("KVM_GET_DIRTY_LOG");
    let t0 = Instant::now();
    let mut saw_out = false;
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x10, _) => saw_out = true,
            VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    println!("guest ran in {:.2?} (out seen: {saw_out})", t0.elapsed());
    // SAFETY: inside the mapping; the vCPU is halted.
    unsafe { std::ptr::write_volatile((ram + 7 * PAGE) as *mut u8, 1) };

    let t0 = Instant::now();
    let log = vm.get_dirty_log(0, len).expect("KVM_GET_DIRTY_LOG");
    let took = t0.elapsed();
    let dirty: Vec<usize> = log
        .iter()
        .enumerate()
        .flat_map(|(w, bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
        .collect();
    println!("dirty pages per KVM: {dirty:?} (guest wrote 2 and 5; the VMM wrote 7)");
    let t1 = Instant::now();
    let again = vm.get_dirty_log(0, len).expect("KVM_GET_DIRTY_LOG");
    println!(
        "KVM_GET_DIRTY_LOG on {mib} MiB: {took:.2?} (with the pages above), {:.2?} again ({} dirty)",
        t1.elapsed(),
        again.iter().map(|w| w.count_ones()).sum::<u32>()
    );
}
