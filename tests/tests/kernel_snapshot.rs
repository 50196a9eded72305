//! A kernel-booted VM (the project's freestanding test kernel, loaded as an ELF) is snapshotted live like the
//! built-in guest: freeze, write-protect, save while its ring-3 loop writes memory, then restore the file into a
//! fresh VM. The test kernel checks the previous content of every page it rewrites, so after the restore any
//! page the snapshot got wrong shows up in its `bad_pages` counter.

#[path = "../../vmm-core/tests/common/testkernel.rs"]
#[allow(dead_code)]
mod testkernel;

use ram_saver::{Compression, SaveOptions, SnapshotReader};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use vmm_core::{KernelConfig, MemBackend, SharedBuffer, Vm, VmConfig};
use wp_tracker::WpTracker;

const MEM: u64 = 64 << 20;

fn wait_status(vm: &Vm, con: &SharedBuffer, what: &str, ok: impl Fn(&testkernel::Status) -> bool) {
    let t0 = Instant::now();
    loop {
        let s = testkernel::status(vm.memory());
        if ok(&s) {
            return;
        }
        if let Some(e) = vm.exit_status() {
            panic!(
                "VM ended ({e}) waiting for {what}; console:\n{}",
                con.text()
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no {what} within 60 s: {s:?}; console:\n{}",
            con.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kernel_vm_live_save_and_restore_from_the_file() {
    let k = testkernel::build();
    let dir = std::env::temp_dir().join(format!("snapctl-ksnap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rd: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, &rd).unwrap();
    let cfg = VmConfig {
        mem_bytes: MEM,
        vcpus: 1,
        backend: MemBackend::Anon,
        guest: Default::default(),
        kernel: Some(KernelConfig {
            kernel: k.elf.clone(),
            initrd: Some(initrd),
            cmdline: format!(
                "console=ttyS0 tk.marker=ksnap tk.mem={MEM} tk.initrd_size={} tk.initrd_fnv={:#x} tk.cpus=1",
                rd.len(),
                testkernel::fnv1a(&rd)
            ),
        }),
    };
    let con = SharedBuffer::new();
    let vm = Vm::boot(cfg, Box::new(con.clone())).expect("boot the test kernel");
    wait_status(&vm, &con, "the write loop", |s| {
        s.phase == 2 && s.steps > 10_000
    });
    assert_eq!(
        testkernel::status(vm.memory()).failures,
        0,
        "{}",
        con.text()
    );

    // Live save to a file, through the library's protocol, while the kernel's ring-3 loop keeps
    // writing.
    let t = WpTracker::new().expect("userfaultfd");
    t.register_memory(vm.memory()).unwrap();
    let out = std::env::temp_dir().join(format!("snapctl-ksnap-out-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join("k.snap");
    let opts = SaveOptions {
        compression: Compression::Zstd { level: 1 },
        max_bandwidth: Some(16 << 20),
        ..SaveOptions::default()
    };
    let sink = ram_saver::AtomicFileSink::create_new(&file).unwrap();
    let saved = vm_snapshot::save_into(&vm, &t, sink, &opts, &AtomicBool::new(false), &|_| {})
        .expect("live save of a kernel VM");
    eprintln!("kernel VM save: {:?}", saved.summary);
    // The kernel file is not needed any more.
    std::fs::remove_dir_all(&dir).unwrap();
    SnapshotReader::open(&file)
        .unwrap()
        .verify(&mut |_| {})
        .expect("verify");
    let con2 = SharedBuffer::new();
    let params = vm_snapshot::RestoreParams {
        paused: true,
        backend: None,
        serial: Box::new(con2.clone()),
    };
    let restored = vm_snapshot::restore(&file, params, &mut |_| {}).expect("restore");
    // The freeze instant, as the restored memory holds it: the guest had been running.
    let at = testkernel::status(restored.memory());
    assert!(at.phase == 2 && at.steps > 10_000, "{at:?}");
    // The original guest ran on during and after the save.
    wait_status(&vm, &con, "progress after the save", |s| {
        s.steps > at.steps + 10_000
    });
    vm.shutdown();
    drop(vm);
    let vm = restored;
    vm.resume().unwrap();
    // Enough steps that the loop rewrites (and so checks) pages the snapshot carried.
    wait_status(&vm, &con2, "progress after the restore", |s| {
        s.steps > at.steps + 50_000 && s.ticks > at.ticks + 10
    });
    let now = testkernel::status(vm.memory());
    assert_eq!(
        now.bad_pages,
        0,
        "pages differ from the freeze instant; console:\n{}",
        con2.text()
    );
    vm.shutdown();
    std::fs::remove_dir_all(&out).unwrap();
}
