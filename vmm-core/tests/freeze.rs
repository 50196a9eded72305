//! The freeze instant ([`Vm::freeze`]) and pause with real KVM: a pause or freeze that cannot
//! park every vCPU lets the VM run on and names the stuck vCPU; a freeze holds the vCPUs against
//! concurrent resumes; a client's pause survives a freeze.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use vmm_core::{FreezeError, KernelConfig, MemBackend, Vm, VmConfig, VmError, WriteRate};

/// The system call the thread named `name` of this process is blocked in (first field of
/// /proc/self/task/TID/syscall), if it is blocked in one.
fn thread_syscall(name: &str) -> Option<i64> {
    for t in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = t.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let sc = std::fs::read_to_string(dir.join("syscall")).ok()?;
            return sc.split_whitespace().next()?.parse().ok();
        }
    }
    None
}

#[test]
fn a_pause_that_times_out_lets_the_vm_run_on_and_names_the_stuck_vcpu() {
    let k = common::testkernel::build();
    // The console goes to a small pipe nobody reads yet: the vCPU that prints blocks in write(2).
    let (mut rx, tx) = std::io::pipe().expect("pipe");
    // SAFETY: F_SETPIPE_SZ on a pipe fd we own; no memory is passed.
    let r = unsafe { libc::fcntl(tx.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(r >= 4096, "F_SETPIPE_SZ failed");
    let cfg = VmConfig {
        mem_bytes: 64 << 20,
        vcpus: 1,
        backend: MemBackend::Anon,
        guest: Default::default(),
        kernel: Some(KernelConfig {
            kernel: k.elf.clone(),
            initrd: None,
            cmdline: "console=ttyS0 tk.marker=pause-timeout".into(),
        }),
    };
    let vm = Vm::boot(cfg, Box::new(tx)).expect("boot the test kernel");
    // Lines typed on COM1 are echoed: keep typing until the vCPU sits in write(2).
    let mut input = vm.serial_input();
    let typist = std::thread::spawn(move || {
        use std::io::Write;
        for _ in 0..2000 {
            if input
                .write_all(b"the quick brown fox jumps over the lazy dog\n")
                .is_err()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    wait_until(
        Duration::from_secs(60),
        "vCPU 0 blocked in write(2)",
        || thread_syscall("vcpu0") == Some(libc::SYS_write),
    );
    // Still blocked a moment later (not just passing through a write).
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(thread_syscall("vcpu0"), Some(libc::SYS_write));

    vm.set_pause_timeout(Duration::from_millis(300));
    match vm.pause() {
        Err(VmError::PauseTimeout { stuck, total, .. }) => {
            assert_eq!((stuck, total), (vec![0], 1))
        }
        other => panic!("pause of a blocked vCPU: {other:?}"),
    }
    assert!(!vm.is_paused());
    let t0 = Instant::now();
    let r = vm.freeze(|_| -> Result<(), std::io::Error> {
        panic!("a freeze that could not pause must not run its hold")
    });
    match r {
        Err(FreezeError::Pause(VmError::PauseTimeout { stuck, .. })) => {
            assert_eq!(stuck, vec![0]);
            let msg = VmError::PauseTimeout {
                stuck,
                total: 1,
                waited: Duration::from_millis(300),
            }
            .to_string();
            assert!(msg.contains("[0]"), "{msg}");
        }
        other => panic!("freeze of a blocked vCPU: {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5));

    // Someone reads the console: the vCPU must run on, not park on a pause request left behind.
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while rx.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let at = common::testkernel::status(vm.memory()).steps;
    wait_until(
        Duration::from_secs(30),
        "guest progress after the failed pause",
        || common::testkernel::status(vm.memory()).steps > at + 10_000,
    );
    assert!(!vm.is_paused());
    // And a pause works again.
    vm.set_pause_timeout(Duration::from_secs(10));
    vm.pause().expect("pause once the console drains");
    vm.resume().unwrap();
    vm.shutdown();
    drop(vm);
    typist.join().unwrap();
    reader.join().unwrap();
}

#[test]
fn a_freeze_holds_the_vcpus_against_concurrent_resumes() {
    let (vm, _con) = boot(small_cfg(WriteRate::Full));
    wait_until(Duration::from_secs(60), "guest progress", || {
        vm.progress().steps.iter().all(|&s| s > 100)
    });
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = vm.resume();
            }
        });
        for _ in 0..20 {
            let f = vm
                .freeze(|st| -> Result<Vec<u64>, std::io::Error> {
                    // While frozen, nothing moves, whatever the other thread asks.
                    let at = vm.progress().steps;
                    std::thread::sleep(Duration::from_millis(20));
                    assert_eq!(vm.progress().steps, at, "a vCPU ran during the freeze");
                    assert_eq!(st.guest_slots(), at);
                    Ok(at)
                })
                .expect("freeze");
            assert!(!f.stayed_paused);
            assert!(f.times.total() >= Duration::from_millis(20));
            // Every vCPU was parked through the hold, and only within the freeze.
            assert!(
                f.times.guest_held >= Duration::from_millis(20),
                "{:?}",
                f.times
            );
            assert!(f.times.guest_held <= f.times.total(), "{:?}", f.times);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    vm.shutdown();
}

#[test]
fn a_clients_pause_survives_a_freeze() {
    let (vm, _con) = boot(small_cfg(WriteRate::Full));
    wait_until(Duration::from_secs(60), "guest progress", || {
        vm.progress().steps.iter().all(|&s| s > 100)
    });
    vm.pause().unwrap();
    let f = vm.freeze(|_| Ok::<(), std::io::Error>(())).expect("freeze");
    assert!(f.stayed_paused);
    assert_eq!(f.times.pause, Duration::ZERO);
    assert_eq!(f.times.guest_held, Duration::ZERO);
    assert!(vm.is_paused(), "the freeze resumed a paused VM");
    let at = vm.progress().steps;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(vm.progress().steps, at);
    vm.resume().unwrap();
    wait_until(Duration::from_secs(10), "progress after resume", || {
        vm.progress().steps.iter().zip(&at).all(|(a, b)| a > b)
    });
    // A failed hold leaves the VM as it was: running.
    let r = vm.freeze(|_| Err::<(), _>(std::io::Error::other("injected")));
    assert!(matches!(r, Err(FreezeError::Hold(_))));
    assert!(!vm.is_paused());
    let at = vm.progress().steps;
    wait_until(
        Duration::from_secs(10),
        "progress after a failed hold",
        || vm.progress().steps.iter().zip(&at).all(|(a, b)| a > b),
    );
    vm.shutdown();
}
