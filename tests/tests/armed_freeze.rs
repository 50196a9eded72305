//! The armed freeze on a real KVM guest: all RAM is write-protected while the guest runs, and the
//! freeze protects again only what the guest wrote since. Saves taken while the built-in guest is
//! still filling its memory (so it writes never-populated pages while armed and during the save)
//! must be exactly the memory at the freeze instant, judged by the guest's oracle, on anonymous
//! and memfd memory; a freeze that fails while armed leaves no page protected and the guest runs
//! on.

use ram_saver::{SaveOptions, SnapshotReader, StreamSink};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use vmm_core::{GuestParams, MemBackend, Vm, VmConfig, WriteRate};
use wp_tracker::WpTracker;

/// Held by every test here: guests booted at once would share the 2 cores.
static ONE_VM_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_vm_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_VM_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn boot(mem_mib: u64, backend: MemBackend) -> Vm {
    let cfg = VmConfig {
        mem_bytes: mem_mib << 20,
        vcpus: 2,
        backend,
        guest: GuestParams {
            write_rate: WriteRate::Full,
            working_set_pages: None,
            seed: 11,
        },
        kernel: None,
    };
    Vm::boot(cfg, Box::new(std::io::sink())).expect("boot the built-in guest")
}

fn tracker(vm: &Vm) -> WpTracker {
    let t = WpTracker::new().expect("userfaultfd");
    t.register_memory(vm.memory()).expect("register guest RAM");
    t
}

/// Pages of guest RAM still write-protected, from the kernel's page tables (PAGEMAP_SCAN).
fn protected_pages(vm: &Vm) -> usize {
    vmm_core::host_ranges(vm.memory())
        .into_iter()
        .map(|(_, host, len)| {
            uffd_sys::pagemap::wp_protected_regions(host, len)
                .expect("PAGEMAP_SCAN")
                .iter()
                .map(|r| r.len() / 4096)
                .sum::<usize>()
        })
        .sum()
}

/// Generation-0 pages filled so far, all vCPUs.
fn filled(vm: &Vm) -> u64 {
    vm.progress().fill_pages.iter().sum()
}

/// Waits until the guest has filled more than `than` pages.
fn wait_fill_past(vm: &Vm, than: u64, what: &str) {
    let t0 = Instant::now();
    while filled(vm) <= than {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what}: the guest filled no page past {than}"
        );
        assert!(vm.exit_status().is_none(), "{what}: {:?}", vm.exit_status());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Saves into memory and checks the image with the guest's oracle against the control slots of
/// the freeze instant. Returns the faults served while armed and the image's zero pages.
fn save_and_check(vm: &Vm, t: &WpTracker, what: &str) -> (u64, u64) {
    let mut image = Vec::new();
    let saved = vm_snapshot::save_into(
        vm,
        t,
        StreamSink::new(&mut image),
        &SaveOptions::default(),
        &AtomicBool::new(false),
        &|_| {},
    )
    .unwrap_or_else(|e| panic!("{what}: save failed: {e}"));
    assert_eq!(protected_pages(vm), 0, "{what}: pages left protected");
    let slots = saved.state.guest_slots();
    let mut r = SnapshotReader::from_reader(std::io::Cursor::new(&image)).expect("open image");
    r.verify(&mut |_| {}).expect("verify");
    let state = vm_snapshot::machine_state(&r).expect("state");
    let mem = vmm_core::create_guest_memory(vm.config().mem_bytes, MemBackend::Anon).unwrap();
    r.load_into(&mem, &mut |_| {}).expect("load");
    let rep = vmm_core::oracle::check(&mem, state.config(), Some(&slots));
    assert!(
        rep.is_ok(),
        "{what}: image is not the memory at the freeze instant: {}",
        rep.unwrap_err()
    );
    (saved.seal.faults, saved.summary.zero_pages)
}

fn saves_during_the_fill_are_exact(backend: MemBackend) {
    let _serial = one_vm_at_a_time();
    let vm = boot(1024, backend);
    let t = tracker(&vm);
    wait_fill_past(&vm, 0, "boot");
    let mut saves = 0;
    let mut armed_faults = 0;
    while !vm.progress().fill_done && saves < 4 {
        let before = filled(&vm);
        let what = format!("{backend:?} save {saves} at {before} filled pages");
        let (faults, zero_pages) = save_and_check(&vm, &t, &what);
        armed_faults += faults;
        saves += 1;
        // Not filled yet at the freeze instant: never-populated memory was armed and saved.
        if !vm.progress().fill_done {
            assert!(zero_pages > 0, "{what}: no never-touched page in the image");
        }
        // The guest runs on, writing never-populated pages.
        wait_fill_past(&vm, filled(&vm), &what);
    }
    eprintln!("{backend:?}: {saves} saves during the fill, {armed_faults} faults served armed");
    assert!(
        saves > 0,
        "{backend:?}: the fill ended before the first save"
    );
    vm.shutdown();
}

#[test]
fn saves_during_the_fill_are_exact_on_anonymous_memory() {
    saves_during_the_fill_are_exact(MemBackend::Anon);
}

#[test]
fn saves_during_the_fill_are_exact_on_memfd_memory() {
    saves_during_the_fill_are_exact(MemBackend::Memfd);
}

/// A freeze that cannot park the vCPUs (a pause timeout of zero) fails after RAM was armed:
/// nothing stays protected, the guest runs on, and the next save is exact.
fn a_freeze_failing_while_armed_releases_everything(backend: MemBackend) {
    let _serial = one_vm_at_a_time();
    let vm = boot(256, backend);
    let t = tracker(&vm);
    wait_fill_past(&vm, 0, "boot");
    vm.set_pause_timeout(Duration::ZERO);
    for i in 0..3 {
        let mut image = Vec::new();
        let res = vm_snapshot::save_into(
            &vm,
            &t,
            StreamSink::new(&mut image),
            &SaveOptions::default(),
            &AtomicBool::new(false),
            &|_| {},
        );
        assert!(
            matches!(
                res,
                Err(vm_snapshot::SaveError::Freeze(
                    vmm_core::FreezeError::Pause(_)
                ))
            ),
            "{backend:?} {i}: {:?}",
            res.err()
        );
        assert_eq!(
            protected_pages(&vm),
            0,
            "{backend:?} {i}: pages left protected"
        );
        assert!(
            !vm.is_paused(),
            "{backend:?} {i}: the failed freeze left the VM paused"
        );
        let now = filled(&vm) + vm.progress().steps.iter().sum::<u64>();
        let t0 = Instant::now();
        while filled(&vm) + vm.progress().steps.iter().sum::<u64>() <= now {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{backend:?} {i}: the guest stopped after a failed freeze"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    vm.set_pause_timeout(Duration::from_secs(10));
    // Cancelled before the freeze: armed, then released, never frozen.
    let res = vm_snapshot::save_into(
        &vm,
        &t,
        StreamSink::new(Vec::new()),
        &SaveOptions::default(),
        &AtomicBool::new(true),
        &|_| {},
    );
    assert!(
        matches!(res, Err(vm_snapshot::SaveError::Cancelled)),
        "{backend:?} cancelled: {:?}",
        res.err()
    );
    assert_eq!(
        protected_pages(&vm),
        0,
        "{backend:?} cancelled: pages left protected"
    );
    save_and_check(&vm, &t, &format!("{backend:?} after failed freezes"));
    vm.shutdown();
}

#[test]
fn a_freeze_failing_while_armed_releases_everything_on_anonymous_memory() {
    a_freeze_failing_while_armed_releases_everything(MemBackend::Anon);
}

#[test]
fn a_freeze_failing_while_armed_releases_everything_on_memfd_memory() {
    a_freeze_failing_while_armed_releases_everything(MemBackend::Memfd);
}
