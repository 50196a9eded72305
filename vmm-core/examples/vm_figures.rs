//! Measures guest write throughput and pause/capture/resume latency.
//!
//! `cargo run --release -p vmm-core --example vm_figures -- [MEM_MIB] [VCPUS]` (default 512 MiB, 2).

use std::time::{Duration, Instant};

use vmm_core::{oracle, GuestParams, MemBackend, Vm, VmConfig, WriteRate};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mem_mib = args.first().copied().unwrap_or(512);
    let vcpus = args.get(1).copied().unwrap_or(2) as u8;
    let cfg = VmConfig {
        mem_bytes: mem_mib << 20,
        vcpus,
        backend: MemBackend::Anon,
        guest: GuestParams {
            write_rate: WriteRate::Full,
            working_set_pages: None,
            seed: 7,
        },
        kernel: None,
    };
    let t = Instant::now();
    let vm = Vm::boot(cfg.clone(), Box::new(std::io::sink()))?;
    println!("boot: {:?}; quirks: {:?}", t.elapsed(), vm.quirks());
    while !vm.progress().fill_done {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("fill of {mem_mib} MiB done after {:?}", t.elapsed());

    let p0 = vm.progress();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let p1 = vm.progress();
    let dt = t0.elapsed().as_secs_f64();
    for (v, (a, b)) in p1.steps.iter().zip(&p0.steps).enumerate() {
        println!(
            "vCPU {v}: {:.0} pages/s at full speed (working set = whole slice)",
            (a - b) as f64 / dt
        );
    }

    let mut rows = Vec::new();
    let mut state_len = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(50));
        let pause = vm.pause()?;
        let tc = Instant::now();
        let st = vm.capture_state()?;
        let capture = tc.elapsed();
        let resume = vm.resume()?;
        state_len = st.to_bytes()?.len();
        rows.push((pause, capture, resume));
    }
    let stat = |f: &dyn Fn(&(Duration, Duration, Duration)) -> Duration| {
        let mut v: Vec<Duration> = rows.iter().map(f).collect();
        v.sort();
        (v[v.len() / 2], v[v.len() - 1])
    };
    let (pm, px) = stat(&|r| r.0);
    let (cm, cx) = stat(&|r| r.1);
    let (rm, rx) = stat(&|r| r.2);
    let (tm, tx) = stat(&|r| r.0 + r.1 + r.2);
    println!("pause   median {pm:?} max {px:?}");
    println!("capture median {cm:?} max {cx:?} (state {state_len} bytes encoded)");
    println!("resume  median {rm:?} max {rx:?}");
    println!(
        "pause+capture+resume median {tm:?} max {tx:?}  (n={})",
        rows.len()
    );

    vm.pause()?;
    let st = vm.capture_state()?;
    let slots = st.guest_slots();
    let to = Instant::now();
    let rep = oracle::check(vm.memory(), &cfg, Some(&slots))?;
    println!(
        "oracle: {} pages, {} steps replayed, {:?}",
        rep.pages_checked,
        slots.iter().sum::<u64>(),
        to.elapsed()
    );
    let mem = vm.memory().clone();
    vm.shutdown();
    drop(vm);
    let tr = Instant::now();
    let vm = Vm::restore(&st, mem, Box::new(std::io::sink()), false)?;
    println!("restore into a fresh VM: {:?}", tr.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let p = vm.progress();
    println!("after restore: steps {:?} (captured {:?})", p.steps, slots);
    Ok(())
}
