//! Consistency under fire: a real KVM guest (the built-in guest, 2 vCPUs writing at full speed) is snapshotted
//! live; the image read back with ram-saver's reader must be exactly the memory at the freeze instant, judged by
//! the guest's oracle against the control slots captured at the freeze instant. After every save (success,
//! failure, cancel) no guest page remains write-protected and the guest keeps running.

use ram_saver::{Compression, InjectPoint, SaveOptions, SnapshotReader, StreamSink};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use vmm_core::{GuestParams, MemBackend, Vm, VmConfig, WriteRate};
use wp_tracker::WpTracker;

/// Held by every test here: guests booted at once would share the 2 cores, and their THP-advised
/// RAM mappings may be merged by the kernel into one VMA, which would blur the AnonHugePages check.
static ONE_VM_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_vm_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_VM_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn boot(mem_mib: u64) -> Vm {
    let cfg = VmConfig {
        mem_bytes: mem_mib << 20,
        vcpus: 2,
        backend: MemBackend::Anon,
        guest: GuestParams {
            write_rate: WriteRate::Full,
            working_set_pages: None,
            seed: 7,
        },
        kernel: None,
    };
    let vm = Vm::boot(cfg, Box::new(std::io::sink())).expect("boot the built-in guest");
    wait_progress(&vm, &[0, 0]);
    vm
}

/// Waits until every vCPU is past `min` steps (and the initial fill is done, so writes hit data pages).
fn wait_progress(vm: &Vm, min: &[u64]) -> Vec<u64> {
    let t0 = Instant::now();
    loop {
        let p = vm.progress();
        if p.steps.iter().zip(min).all(|(a, b)| a > b) {
            return p.steps.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "guest made no progress past {min:?}: {:?}",
            p.steps
        );
        assert!(
            vm.exit_status().is_none(),
            "VM ended: {:?}",
            vm.exit_status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tracker(vm: &Vm) -> WpTracker {
    let t = WpTracker::new().expect("userfaultfd");
    t.register_memory(vm.memory()).expect("register guest RAM");
    t
}

/// Pages of guest RAM still write-protected, from the kernel's page table (pagemap).
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

struct Saved {
    image: Vec<u8>,
    summary: ram_saver::SaveSummary,
    slots: Vec<u64>,
}

/// Freeze, save into memory (the library's protocol), and return the image with the
/// freeze-instant slots.
fn save(
    vm: &Vm,
    t: &WpTracker,
    opts: &SaveOptions,
    cancel: &AtomicBool,
) -> Result<Saved, vm_snapshot::SaveError> {
    let mut image = Vec::new();
    let saved = vm_snapshot::save_into(vm, t, StreamSink::new(&mut image), opts, cancel, &|_| {})?;
    Ok(Saved {
        image,
        slots: saved.state.guest_slots(),
        summary: saved.summary,
    })
}

fn check_image(vm: &Vm, saved: &Saved) {
    let mut r =
        SnapshotReader::from_reader(std::io::Cursor::new(&saved.image)).expect("open image");
    r.verify(&mut |_| {}).expect("verify");
    let state = vm_snapshot::machine_state(&r).expect("state");
    assert_eq!(state.guest_slots(), saved.slots);
    let mem = vmm_core::create_guest_memory(vm.config().mem_bytes, MemBackend::Anon).unwrap();
    r.load_into(&mem, &mut |_| {}).expect("load");
    let rep = vmm_core::oracle::check(&mem, state.config(), Some(&saved.slots));
    assert!(
        rep.is_ok(),
        "image is not the memory at the freeze instant: {}",
        rep.unwrap_err()
    );
}

#[test]
fn live_saves_are_exact_under_full_speed_writes() {
    let _serial = one_vm_at_a_time();
    let vm = boot(256);
    let t = tracker(&vm);
    let cases = [
        ("raw", Compression::None, None, None),
        ("zstd", Compression::Zstd { level: 1 }, None, None),
        (
            "raw, 32 MiB/s scan",
            Compression::None,
            Some(32 << 20),
            None,
        ),
        (
            "zstd, 32 MiB/s scan",
            Compression::Zstd { level: 3 },
            Some(32 << 20),
            None,
        ),
        // `snapctl save --background`: scan and compression threads at nice 10.
        ("raw, background", Compression::None, None, Some(10)),
    ];
    for (name, compression, bw, bulk_nice) in cases {
        let before = wait_progress(&vm, &[0, 0]);
        let opts = SaveOptions {
            compression,
            max_bandwidth: bw,
            bulk_nice,
            ..SaveOptions::default()
        };
        let saved = save(&vm, &t, &opts, &AtomicBool::new(false)).expect(name);
        assert_eq!(protected_pages(&vm), 0, "{name}: pages left protected");
        // The guest ran through the save.
        let after = wait_progress(&vm, &saved.slots);
        assert!(saved.slots.iter().zip(&before).all(|(s, b)| s >= b));
        if bw.is_some() {
            assert!(
                saved.summary.faults_served > 0,
                "{name}: a throttled save of a full-speed guest served no faults"
            );
        }
        check_image(&vm, &saved);
        eprintln!(
            "{name}: {:?} steps {:?} -> {:?}",
            saved.summary, saved.slots, after
        );
    }
    vm.shutdown();
}

#[test]
fn failed_and_cancelled_saves_release_everything() {
    let _serial = one_vm_at_a_time();
    let vm = boot(128);
    let t = tracker(&vm);
    let cases = [
        InjectPoint::ScannerPanic { after_blocks: 3 },
        InjectPoint::WorkerPanic,
        InjectPoint::WriteError { after_batches: 2 },
    ];
    for inject in cases {
        // 4 KiB fault pieces: a full-speed guest then cannot finish the save through faults alone
        // (whole 2 MiB units would, before the throttled scanner reaches its injected failure).
        let opts = SaveOptions {
            max_bandwidth: Some(16 << 20),
            fault_block_size: Some(4096),
            inject_failure: Some(inject),
            ..SaveOptions::default()
        };
        let res = save(&vm, &t, &opts, &AtomicBool::new(false));
        assert!(res.is_err(), "{inject:?} did not fail the save");
        assert_eq!(protected_pages(&vm), 0, "{inject:?}: pages left protected");
        let now = vm.progress().steps.clone();
        wait_progress(&vm, &now);
    }
    // Cancel from another thread mid-save.
    let cancel = AtomicBool::new(false);
    let opts = SaveOptions {
        max_bandwidth: Some(8 << 20),
        fault_block_size: Some(4096),
        ..SaveOptions::default()
    };
    let res = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            cancel.store(true, Ordering::SeqCst);
        });
        save(&vm, &t, &opts, &cancel)
    });
    assert!(
        matches!(res, Err(vm_snapshot::SaveError::Cancelled)),
        "{:?}",
        res.err()
    );
    assert_eq!(protected_pages(&vm), 0, "cancel: pages left protected");
    let now = vm.progress().steps.clone();
    wait_progress(&vm, &now);
    // And a save right after works.
    let saved = save(&vm, &t, &SaveOptions::default(), &AtomicBool::new(false))
        .expect("save after failures");
    check_image(&vm, &saved);
    vm.shutdown();
}

/// AnonHugePages (bytes) of the mapping of this process that contains `addr`.
fn anon_huge_bytes_at(addr: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= addr && addr < b;
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                return kb * 1024;
            }
        }
    }
    0
}

#[test]
fn a_save_keeps_thp_backed_guest_ram_huge() {
    let _serial = one_vm_at_a_time();
    let vm = boot(256);
    let t0 = Instant::now();
    while !vm.progress().fill_done {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "guest fill not done"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let host = vmm_core::host_ranges(vm.memory())[0].1;
    let before = anon_huge_bytes_at(host);
    assert!(
        before >= 128 << 20,
        "guest RAM is not THP-backed before the save ({before} bytes): is THP enabled (madvise)?"
    );
    let t = tracker(&vm);
    let saved = save(&vm, &t, &SaveOptions::default(), &AtomicBool::new(false)).expect("save");
    wait_progress(&vm, &saved.slots);
    let after = anon_huge_bytes_at(host);
    eprintln!(
        "AnonHugePages of guest RAM: {} MiB before, {} MiB after the save",
        before >> 20,
        after >> 20
    );
    assert!(
        after * 100 >= before * 95,
        "huge-page backing collapsed: {} MiB before, {} MiB after",
        before >> 20,
        after >> 20
    );
    vm.shutdown();
}
