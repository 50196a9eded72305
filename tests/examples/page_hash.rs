//! What hashing every 4 KiB page of dirty memory costs: the price of recovering 4 KiB precision
//! inside 2 MiB units by content (docs/INCREMENTAL.md).
//!
//! `cargo run --release -p tests --example page_hash [-- --mib 1024]`
//!
//! Fills `--mib` MiB with pseudo-random bytes, then hashes it page by page on one thread, three
//! times each: crc32fast (32 bits, the reference) and xxh3-128 (`ram_saver::page_hash`, what
//! incremental saves use: the zero check first, then xxh3-128), and prints the throughput; then
//! `PageHashes::fill_from` over the same bytes as guest memory on all cores (what an eager restore
//! adds before the vCPUs run).

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .map_or(1024, |v| v.parse().expect("--mib"));
    let mut mem = vec![0u64; (mib << 20) / 8];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for w in mem.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    let bytes: Vec<u8> = mem.iter().flat_map(|w| w.to_le_bytes()).collect();
    drop(mem);
    for run in 0..3 {
        let t0 = Instant::now();
        let mut hashes = Vec::with_capacity(bytes.len() / 4096);
        for page in bytes.chunks_exact(4096) {
            hashes.push(crc32fast::hash(page));
        }
        let dt = t0.elapsed();
        println!(
            "crc32fast run {run}: {mib} MiB in {dt:.2?}, {:.2} GB/s ({} pages, checksum {:x})",
            bytes.len() as f64 / dt.as_secs_f64() / 1e9,
            hashes.len(),
            hashes.iter().fold(0u32, |a, h| a ^ h)
        );
    }
    for run in 0..3 {
        let t0 = Instant::now();
        let mut hashes = Vec::with_capacity(bytes.len() / 4096);
        for page in bytes.chunks_exact(4096) {
            hashes.push(ram_saver::page_hash(page));
        }
        let dt = t0.elapsed();
        println!(
            "xxh3-128 run {run}: {mib} MiB in {dt:.2?}, {:.2} GB/s ({} pages, checksum {:x})",
            bytes.len() as f64 / dt.as_secs_f64() / 1e9,
            hashes.len(),
            hashes.iter().fold(0u128, |a, h| a ^ h)
        );
    }
    // The table of a restored guest: every page of guest memory hashed on all cores.
    let mem =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), bytes.len())])
            .expect("guest memory");
    vm_memory::Bytes::write_slice(&mem, &bytes, vm_memory::GuestAddress(0)).expect("fill");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let table = ram_saver::PageHashes::for_memory(&mem);
    for run in 0..3 {
        let t0 = Instant::now();
        table.fill_from(&mem, threads).expect("fill_from");
        let dt = t0.elapsed();
        println!(
            "PageHashes::fill_from run {run} ({threads} threads): {mib} MiB in {dt:.2?}, {:.2} GB/s",
            bytes.len() as f64 / dt.as_secs_f64() / 1e9
        );
    }
}
