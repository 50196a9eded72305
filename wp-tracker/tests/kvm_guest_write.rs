//! A KVM guest write to write-protected RAM is caught: the vCPU blocks inside KVM_RUN, the tracker
//! reads a WP fault at the right host address, and after unprotect the guest completes.
//!
//! Guest mode: 16-bit real mode, CS base 0, code at guest physical 0x1000. Checked on this project's
//! PVM-based /dev/kvm (Linux 6.18): real mode runs there (guest ring-0 code is emulated, which is
//! fine for a handful of instructions). The write then reaches guest RAM either through the
//! shadow/EPT fault path (get_user_pages with FOLL_WRITE on the host mapping) or through the
//! instruction emulator (copy_to_user): both are kernel-mode faults, which is why the tracker's
//! userfaultfd must not be UFFD_USER_MODE_ONLY. If real mode ever stops working here, the test
//! fails loudly (it never skips): the snapshot path rests on this behaviour.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{Mapping, PAGE};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use wp_tracker::{HostRange, WpFault, WpTracker};

/// Guest RAM size (guest physical 0..1 MiB).
const RAM_SIZE: usize = 1 << 20;
/// Where the guest code lives (guest physical).
const CODE_GPA: usize = 0x1000;
/// The byte the guest writes (guest physical).
const TARGET_GPA: usize = 0x2000;
/// The port the guest reports on.
const PORT: u16 = 0x10;
const VALUE: u8 = 0x42;

/// `mov byte [0x2000], 0x42; mov al, 0x42; out 0x10, al; hlt` in 16-bit real mode.
const GUEST_CODE: [u8; 10] = [
    0xC6, 0x06, 0x00, 0x20, VALUE, // mov byte [0x2000], 0x42
    0xB0, VALUE, // mov al, 0x42
    0xE6, PORT as u8, // out 0x10, al
    0xF4,       // hlt
];

/// What the vCPU thread saw.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// `out` to the port with data, then HLT.
    IoThenHlt(u16, Vec<u8>),
    /// Anything else, described.
    Other(String),
}

#[test]
fn guest_write_to_protected_ram_blocks_the_vcpu_until_unprotected() {
    let kvm = Kvm::new().expect("open /dev/kvm (this test must run, not skip)");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");

    let ram = Mapping::anon(RAM_SIZE);
    for (i, b) in GUEST_CODE.iter().enumerate() {
        ram.write(CODE_GPA + i, *b);
    }

    let tracker = Arc::new(WpTracker::new().expect("tracker"));
    // SAFETY: `ram` is unregistered by `tracker.unregister_all()` at the end, before it is
    // dropped; on panic the Arc'd tracker may outlive `ram` only in a leaked vCPU thread, and the
    // kernel drops registrations of unmapped memory by itself.
    unsafe { tracker.register(ram.range()) }.expect("register guest RAM");

    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: RAM_SIZE as u64,
        userspace_addr: ram.addr as u64,
        flags: 0,
    };
    // SAFETY: the host mapping outlives the VM (the VM is dropped at the end of this test, before
    // `ram`: the vCPU thread is joined first).
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");

    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut sregs = vcpu.get_sregs().expect("get sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).expect("set sregs");
    let mut regs = vcpu.get_regs().expect("get regs");
    regs.rip = CODE_GPA as u64;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("set regs");

    tracker.protect_all().expect("protect guest RAM");

    let exited = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let vcpu_exited = exited.clone();
    let vcpu_thread = std::thread::spawn(move || {
        let mut io = None;
        let outcome = loop {
            let exit = vcpu.run();
            vcpu_exited.store(true, Ordering::SeqCst);
            match exit {
                Ok(VcpuExit::IoOut(port, data)) if io.is_none() => io = Some((port, data.to_vec())),
                Ok(VcpuExit::Hlt) => match io.take() {
                    Some((p, d)) => break Outcome::IoThenHlt(p, d),
                    None => break Outcome::Other("HLT before the port write".into()),
                },
                Ok(other) => break Outcome::Other(format!("unexpected exit {other:?}")),
                Err(e) => break Outcome::Other(format!("KVM_RUN failed: {e}")),
            }
        };
        let _ = tx.send(outcome);
        vcpu
    });

    let target_host = ram.addr + TARGET_GPA;
    let mut faults: Vec<WpFault> = Vec::new();
    let mut others = Vec::new();
    let mut target_fault = None;
    // Serve faults until the target page faulted; any other page a fault names is released too
    // (and reported below), so that the test fails on assertions rather than hanging.
    while target_fault.is_none() {
        let start = faults.len();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while tracker
            .wait_faults(Duration::from_millis(50), &mut faults)
            .expect("wait")
            == 0
        {
            assert!(
                !exited.load(Ordering::SeqCst),
                "vCPU left KVM_RUN without a write-protect fault: {:?}",
                rx.try_recv()
            );
            assert!(
                std::time::Instant::now() < deadline,
                "no write-protect fault within 20 s"
            );
        }
        for f in faults[start..].iter().copied() {
            let page = f.addr & !(PAGE - 1);
            if page == target_host {
                target_fault = Some(f);
            } else {
                others.push(f);
                tracker
                    .unprotect(HostRange::new(page, PAGE), true)
                    .expect("release other page");
            }
        }
    }
    let fault = target_fault.expect("target fault");
    assert!(fault.wp, "fault is not a write-protect fault: {fault:?}");
    assert!(ram.range().contains(fault.addr));

    // The vCPU must really be blocked: no exit, byte not written, for a while.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !exited.load(Ordering::SeqCst),
        "vCPU left KVM_RUN while its page was protected"
    );
    assert_eq!(
        ram.read(TARGET_GPA),
        0,
        "guest write landed while the page was protected"
    );

    tracker
        .unprotect(HostRange::new(target_host, PAGE), true)
        .expect("release target page");

    let outcome = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("guest did not finish after unprotect");
    assert_eq!(
        outcome,
        Outcome::IoThenHlt(PORT, vec![VALUE]),
        "faults {faults:x?}"
    );
    assert_eq!(ram.read(TARGET_GPA), VALUE, "guest byte not in host memory");
    assert!(
        others.is_empty(),
        "unexpected faults on other pages: {others:x?}"
    );

    let vcpu = vcpu_thread.join().expect("vCPU thread");
    drop(vcpu);
    drop(vm);
    tracker.unregister_all().expect("unregister");
    let left = uffd_sys::pagemap::wp_protected_regions(ram.addr, ram.len).expect("PAGEMAP_SCAN");
    assert!(left.is_empty(), "pages still write-protected: {left:x?}");
    let wp_bits = uffd_sys::pagemap::pagemap_entries(ram.addr, ram.len).expect("pagemap");
    assert!(
        wp_bits.iter().all(|e| !e.uffd_wp()),
        "uffd-wp bit left in pagemap"
    );
}
