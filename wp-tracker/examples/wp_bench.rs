//! Write-protect benchmark: fault service latency and protect / unprotect throughput.
//!
//! `cargo run --release -p wp-tracker --example wp_bench [-- --faults N --sizes-gib 1,4]`
//!
//! - Fault service latency: writer threads write one byte to each page of a protected, populated
//!   range; a handler thread reads faults in batches and releases each page (UFFDIO_WRITEPROTECT
//!   clear + wake). Latency = fault event read → page released. The writer-side blocked time of
//!   each write (fault → resume) is reported too.
//! - Protect 1 GiB / 4 GiB of populated memory with 4 KiB pages (MADV_NOHUGEPAGE) and with THP
//!   (MADV_HUGEPAGE), then unprotect in one call and in 2 MiB chunks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wp_tracker::{HostRange, WpTracker};

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;

struct Mapping {
    raw: usize,
    raw_len: usize,
    addr: usize,
    len: usize,
}

impl Mapping {
    /// Anonymous memory aligned to 2 MiB with the given THP advice.
    fn new(len: usize, thp: bool) -> Mapping {
        let raw_len = len + HUGE;
        // SAFETY: a fresh private anonymous mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                raw_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap {raw_len} bytes");
        let addr = (p as usize + HUGE - 1) & !(HUGE - 1);
        let advice = if thp {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice on our own mapping; contents unchanged.
        unsafe { libc::madvise(addr as *mut _, len, advice) };
        Mapping {
            raw: p as usize,
            raw_len,
            addr,
            len,
        }
    }
    /// Write one byte in every 4 KiB page.
    fn populate(&self) {
        for off in (0..self.len).step_by(PAGE) {
            // SAFETY: in bounds of our writable mapping.
            unsafe { std::ptr::write_volatile((self.addr + off) as *mut u8, 1) };
        }
    }
    fn range(&self) -> HostRange {
        HostRange::new(self.addr, self.len)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, nothing references it any more.
        unsafe { libc::munmap(self.raw as *mut _, self.raw_len) };
    }
}

fn percentiles(name: &str, v: &mut [Duration]) {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    println!(
        "  {name:<34} n={:<7} p50={:>9.2?} p99={:>9.2?} max={:>9.2?}",
        v.len(),
        at(0.50),
        at(0.99),
        v[v.len() - 1]
    );
}

fn fault_latency(faults: usize, writers: usize) {
    println!("fault service latency ({faults} faults, {writers} writer threads, 1 handler):");
    let m = Mapping::new(faults * PAGE, false);
    m.populate();
    let t = Arc::new(WpTracker::new().expect("tracker"));
    // SAFETY: `m` outlives `t` (t is dropped at the end of this function, before `m`).
    unsafe { t.register(m.range()) }.expect("register");
    t.protect_all().expect("protect");

    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (t, stop) = (t.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut lat = Vec::with_capacity(faults);
            let mut out = Vec::with_capacity(256);
            while lat.len() < faults && !stop.load(Ordering::Relaxed) {
                out.clear();
                t.wait_faults(Duration::from_millis(100), &mut out)
                    .expect("wait");
                let read_at = Instant::now();
                for f in &out {
                    let page = f.addr & !(PAGE - 1);
                    t.unprotect(HostRange::new(page, PAGE), true)
                        .expect("release");
                    lat.push(read_at.elapsed());
                }
            }
            lat
        })
    };
    let per = faults / writers;
    let base = m.addr;
    let started = Instant::now();
    let ws: Vec<_> = (0..writers)
        .map(|w| {
            std::thread::spawn(move || {
                let mut blocked = Vec::with_capacity(per);
                for p in w * per..(w + 1) * per {
                    let t0 = Instant::now();
                    // SAFETY: inside the mapping, which outlives the writers (joined below).
                    unsafe { std::ptr::write_volatile((base + p * PAGE) as *mut u8, 2) };
                    blocked.push(t0.elapsed());
                }
                blocked
            })
        })
        .collect();
    let mut blocked: Vec<Duration> = ws.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut lat = handler.join().unwrap();
    percentiles("fault read -> page released", &mut lat);
    percentiles("writer blocked (fault -> resume)", &mut blocked);
    println!(
        "  throughput: {:.0} faults/s ({:.2?} total)",
        blocked.len() as f64 / elapsed.as_secs_f64(),
        elapsed
    );
}

fn protect_timing(gib: usize, thp: bool) {
    let len = gib << 30;
    let m = Mapping::new(len, thp);
    let t0 = Instant::now();
    m.populate();
    let populate = t0.elapsed();
    let huge: usize = uffd_sys::pagemap::present_regions(m.addr, m.len)
        .map(|r| {
            r.iter()
                .filter(|r| r.categories & uffd_sys::PAGE_IS_HUGE != 0)
                .map(|r| r.len())
                .sum()
        })
        .unwrap_or(0);
    let t = WpTracker::new().expect("tracker");
    // SAFETY: `m` outlives `t` (dropped first, below).
    unsafe { t.register(m.range()) }.expect("register");

    let time = |f: &dyn Fn()| {
        let s = Instant::now();
        f();
        s.elapsed()
    };
    let protect = time(&|| t.protect_all().expect("protect"));
    let unprotect_one = time(&|| t.unprotect(m.range(), true).expect("unprotect"));
    t.protect_all().expect("protect");
    let unprotect_chunks = time(&|| {
        for off in (0..len).step_by(HUGE) {
            t.unprotect(HostRange::new(m.addr + off, HUGE), true)
                .expect("unprotect chunk");
        }
    });
    let left = uffd_sys::pagemap::wp_protected_regions(m.addr, m.len)
        .map(|r| r.len())
        .unwrap_or(0);
    println!(
        "  {gib} GiB {:<9} protect {:>9.2?} | unprotect 1 call {:>9.2?} | unprotect 2 MiB chunks \
         {:>9.2?} | (populate {:.2?}, THP-backed {}%, regions left protected: {left})",
        if thp { "THP" } else { "4 KiB" },
        protect,
        unprotect_one,
        unprotect_chunks,
        populate,
        huge * 100 / len,
    );
    drop(t);
}

fn main() {
    let mut faults = 100_000usize;
    let mut sizes = vec![1usize, 4];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--faults" => {
                faults = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--faults N")
            }
            "--sizes-gib" => {
                sizes = args
                    .next()
                    .expect("--sizes-gib 1,4")
                    .split(',')
                    .map(|s| s.parse().expect("size in GiB"))
                    .collect()
            }
            other => panic!("unknown argument {other} (use --faults N, --sizes-gib 1,4)"),
        }
    }
    let t = WpTracker::new().expect("tracker");
    println!(
        "userfaultfd via {:?}, features in use: {}",
        t.opened_via(),
        t.features()
    );
    drop(t);
    let writers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .max(2);
    fault_latency(faults, writers);
    println!("write-protect populated memory:");
    for &gib in &sizes {
        for thp in [false, true] {
            protect_timing(gib, thp);
        }
    }
}
