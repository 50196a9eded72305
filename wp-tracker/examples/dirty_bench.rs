//! Dirty tracking costs: what a first write costs under `DirtyTracker`, what a harvest costs,
//! and how many huge pages survive rounds of tracking.
//!
//! `cargo run --release -p wp-tracker --example dirty_bench [-- --mib 1024 --rounds 10]`
//!
//! For 4 KiB memory (MADV_NOHUGEPAGE) and THP memory (MADV_HUGEPAGE), populated, one writer thread
//! writes one byte into 1 % of the pages (random, distinct) per round:
//! - `write`: the writer's time per first write, untracked and tracked (the writer blocks on each
//!   fault until the handler thread has recorded and released the unit);
//! - `harvest`: one `harvest()` (swap the set, protect the taken units again);
//! - `huge`: MiB still mapped by huge pages after the rounds;
//! - a last round writes every page once, then harvests (100 % dirty).

use std::sync::Arc;
use std::time::{Duration, Instant};

use uffd_sys::pagemap::huge_regions;
use wp_tracker::{DirtyTracker, HostRange, Precision, WpTracker};

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;

struct Mapping {
    raw: usize,
    raw_len: usize,
    addr: usize,
    len: usize,
}

impl Mapping {
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
        let m = Mapping {
            raw: p as usize,
            raw_len,
            addr,
            len,
        };
        for off in (0..len).step_by(PAGE) {
            // SAFETY: in bounds of our writable mapping.
            unsafe { std::ptr::write_volatile((addr + off) as *mut u8, 1) };
        }
        m
    }
    fn huge_mib(&self) -> usize {
        huge_regions(self.addr, self.len)
            .iter()
            .map(|(s, e)| e - s)
            .sum::<usize>()
            >> 20
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, nothing references it any more.
        unsafe { libc::munmap(self.raw as *mut _, self.raw_len) };
    }
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Distinct random page addresses, `share` of all pages.
fn pick(m: &Mapping, share: f64, rng: &mut Rng) -> Vec<usize> {
    let pages = m.len / PAGE;
    let n = ((pages as f64 * share) as usize).max(1);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let p = rng.below(pages);
        if seen.insert(p) {
            out.push(m.addr + p * PAGE);
        }
    }
    out
}

/// Time per write of one byte at each address, from another thread (as a vCPU).
fn write_all(addrs: Vec<usize>, v: u8) -> Duration {
    let n = addrs.len() as u32;
    std::thread::spawn(move || {
        let t0 = Instant::now();
        for a in addrs {
            // SAFETY: addresses inside a mapping that outlives this thread (joined below).
            unsafe { std::ptr::write_volatile(a as *mut u8, v) };
        }
        t0.elapsed() / n
    })
    .join()
    .expect("writer")
}

fn run(mib: usize, rounds: usize, thp: bool, precision: Option<Precision>) {
    let m = Mapping::new(mib << 20, thp);
    let label = format!(
        "{} {:?}",
        if thp { "THP " } else { "4KiB" },
        precision.map_or("untracked".to_string(), |p| format!("{p:?}"))
    );
    let huge_before = m.huge_mib();
    let wp = Arc::new(WpTracker::new().expect("tracker"));
    // SAFETY: `m` is declared before `wp` and the dirty tracker, so it outlives the registration.
    unsafe { wp.register(HostRange::new(m.addr, m.len)) }.expect("register");
    let t0 = Instant::now();
    let tracker = precision.map(|p| DirtyTracker::start(wp.clone(), p).expect("start"));
    let arm = t0.elapsed();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (mut writes, mut harvests, mut dirty) = (Vec::new(), Vec::new(), 0);
    for round in 0..rounds {
        writes.push(write_all(pick(&m, 0.01, &mut rng), round as u8 + 2));
        if let Some(t) = &tracker {
            let t0 = Instant::now();
            dirty = t.harvest().expect("harvest").bytes();
            harvests.push(t0.elapsed());
        }
    }
    let huge_after = m.huge_mib();
    let all: Vec<usize> = (0..m.len / PAGE).map(|i| m.addr + i * PAGE).collect();
    let full_write = write_all(all, 0x7F);
    let full_harvest = tracker.as_ref().map(|t| {
        let t0 = Instant::now();
        t.harvest().expect("harvest");
        t0.elapsed()
    });
    writes.sort_unstable();
    harvests.sort_unstable();
    let mid = |v: &[Duration]| v.get(v.len() / 2).copied().unwrap_or_default();
    println!(
        "{label:<20} arm {arm:>9.2?} | 1% rounds: write p50 {:>8.2?} [{:.2?}..{:.2?}], \
         harvest p50 {:>9.2?} (last {} MiB) | 100%: write {:>8.2?}, harvest {:>9.2?} | \
         huge MiB {huge_before} -> {huge_after} after {rounds} rounds",
        mid(&writes),
        writes[0],
        writes[writes.len() - 1],
        mid(&harvests),
        dirty >> 20,
        full_write,
        full_harvest.unwrap_or_default(),
    );
    drop(tracker);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("number"))
    };
    let mib = arg("--mib", 1024);
    let rounds = arg("--rounds", 10);
    println!("dirty tracking, {mib} MiB, {rounds} rounds of 1 % random first writes");
    for thp in [false, true] {
        run(mib, rounds, thp, None);
        run(mib, rounds, thp, Some(Precision::Page));
        run(mib, rounds, thp, Some(Precision::Backing));
    }
}
