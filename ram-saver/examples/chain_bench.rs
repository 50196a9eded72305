//! Chain benchmark: merging a chain of incremental snapshots, and restoring it eagerly against
//! restoring the merged file.
//!
//! `cargo run --release -p ram-saver --example chain_bench [-- OPTIONS]`
//!
//! Writes with the writer, in a directory under /tmp (on disk): a base of `--size-mib` MiB of
//! guest memory (half the pages random, a quarter compressible patterns, a quarter zero; records
//! of 2 MiB), then `--layers - 1` children, each changing `--change-pct` % of the pages (in runs
//! of 16 pages at random places: a child's records cut its parents' records) and leaving the rest
//! to its parent. Then, `--repeat` times each (best kept): `Chain::merge` of the top into a
//! standalone file (MB/s of the merged file, with its fsync; the share copied as stored; the
//! bytes decoded and encoded again) and into /dev/null (the merge without the disk), the chain's eager `Chain::load_into` into fresh guest memory, and the merged
//! file's `SnapshotReader::load_into`; and prints the ratios. The page cache is warm (the files
//! were just written), as right after saves. Figures are noisy on a shared machine: ranges over
//! runs, never asserted.
//!
//! Options: `--size-mib N` (1024), `--layers N` (16), `--change-pct P` (2), `--zstd LEVEL` (3;
//! 0: raw), `--repeat N` (3), `--keep` (leave the files).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use ram_saver::{
    AtomicFileSink, Chain, Compression, MemRegion, ParentRef, SnapshotHeader, SnapshotReader,
    SnapshotWriter, StreamSink,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const PAGE: u64 = 4096;
/// Pages per run a child changes.
const RUN: u64 = 16;

struct Args {
    size: u64,
    layers: u64,
    change_pct: f64,
    level: i32,
    repeat: usize,
    keep: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        size: 1 << 30,
        layers: 16,
        change_pct: 2.0,
        level: 3,
        repeat: 3,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--size-mib" => a.size = val().parse::<u64>().expect("number") << 20,
            "--layers" => a.layers = val().parse().expect("number"),
            "--change-pct" => a.change_pct = val().parse().expect("number"),
            "--zstd" => a.level = val().parse().expect("number"),
            "--repeat" => a.repeat = val().parse().expect("number"),
            "--keep" => a.keep = true,
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    assert!(a.layers >= 1 && a.size >= 4 << 20);
    a
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Page `p` as layer `gen` writes it into `out`.
fn fill_page(gen: u64, p: u64, out: &mut [u8]) {
    match splitmix(p ^ gen << 48) % 4 {
        0 | 1 => {
            for (i, c) in out.chunks_mut(8).enumerate() {
                c.copy_from_slice(&splitmix(gen << 56 ^ p << 12 ^ i as u64).to_le_bytes());
            }
        }
        2 => {
            for (i, x) in out.iter_mut().enumerate() {
                *x = (p as u8).wrapping_mul(31) ^ (gen as u8) ^ (i / 64) as u8;
            }
        }
        _ => out.fill(0),
    }
}

fn header(size: u64, level: i32, parent: Option<ParentRef>) -> SnapshotHeader {
    let mut h = SnapshotHeader::new(vec![MemRegion { gpa: 0, size }], 2, b"{}".to_vec());
    h.compression = if level > 0 {
        Compression::Zstd { level }
    } else {
        Compression::None
    };
    h.parent = parent;
    h
}

/// Writes the chain; returns its files, base first.
fn write_chain(dir: &Path, a: &Args) -> Vec<PathBuf> {
    let pages = a.size / PAGE;
    let mut paths: Vec<PathBuf> = Vec::new();
    let block = 512u64;
    let mut buf = vec![0u8; (block * PAGE) as usize];
    for gen in 0..a.layers {
        let path = dir.join(format!("layer{gen}.snap"));
        let parent = paths.last().map(|pp| {
            let rd = SnapshotReader::open(pp).expect("open parent");
            ParentRef::of(&rd, pp, &path)
        });
        let h = header(a.size, a.level, parent);
        let sink = AtomicFileSink::create(&path).expect("create");
        let mut w = SnapshotWriter::new(sink, &h, b"bench").expect("writer");
        if gen == 0 {
            let mut p = 0;
            while p < pages {
                let n = block.min(pages - p);
                for k in 0..n {
                    let at = (k * PAGE) as usize;
                    fill_page(0, p + k, &mut buf[at..at + PAGE as usize]);
                }
                w.write_pages(p, &buf[..(n * PAGE) as usize])
                    .expect("write");
                p += n;
            }
        } else {
            let runs = pages / RUN;
            let pick = (a.change_pct / 100.0 * runs as f64).round().max(1.0) as u64;
            let mut chosen: Vec<u64> = (0..pick).map(|k| splitmix(gen << 32 ^ k) % runs).collect();
            chosen.sort_unstable();
            chosen.dedup();
            let mut p = 0;
            for r in chosen {
                let first = r * RUN;
                if first > p {
                    w.write_parent_run(p, first - p).expect("write");
                }
                let n = RUN.min(pages - first);
                for k in 0..n {
                    let at = (k * PAGE) as usize;
                    fill_page(gen, first + k, &mut buf[at..at + PAGE as usize]);
                }
                w.write_pages(first, &buf[..(n * PAGE) as usize])
                    .expect("write");
                p = first + n;
            }
            if p < pages {
                w.write_parent_run(p, pages - p).expect("write");
            }
        }
        w.finish().expect("finish");
        paths.push(path);
    }
    paths
}

fn mem(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).expect("memory")
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn range(v: &[f64]) -> String {
    let max = v.iter().copied().fold(0.0, f64::max);
    format!("{:.3}–{:.3}", best(v), max)
}

fn main() {
    let a = parse_args();
    let dir = std::env::temp_dir().join(format!("chain-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let t = Instant::now();
    let paths = write_chain(&dir, &a);
    let top = paths.last().expect("a layer").clone();
    let chain_bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    println!(
        "chain: {} layers, {} MiB of guest memory, {} % of pages changed per child, zstd {}; {:.1} MiB of files, written in {:.1} s",
        a.layers,
        a.size >> 20,
        a.change_pct,
        a.level,
        chain_bytes as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    let merged = dir.join("merged.snap");
    let (mut merge_s, mut chain_s, mut merged_s) = (Vec::new(), Vec::new(), Vec::new());
    let mut null_s = Vec::new();
    let mut last = None;
    for _ in 0..a.repeat {
        // The merge's own work, without the disk: to /dev/null.
        let t = Instant::now();
        let c = Chain::open(&top).expect("open chain");
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .expect("/dev/null");
        c.merge(StreamSink::new(null), &mut |_| {}).expect("merge");
        null_s.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        let c = Chain::open(&top).expect("open chain");
        let s = c
            .merge(
                AtomicFileSink::create(&merged).expect("create"),
                &mut |_| {},
            )
            .expect("merge");
        merge_s.push(t.elapsed().as_secs_f64());
        last = Some(s);

        let m = mem(a.size);
        let t = Instant::now();
        let mut c = Chain::open(&top).expect("open chain");
        c.load_into(&m, &mut |_| {}).expect("chain load");
        chain_s.push(t.elapsed().as_secs_f64());
        drop(m);

        let m = mem(a.size);
        let t = Instant::now();
        let mut r = SnapshotReader::open(&merged).expect("open merged");
        r.load_into(&m, &mut |_| {}).expect("merged load");
        merged_s.push(t.elapsed().as_secs_f64());
    }
    let s = last.expect("a run");
    let mb = |bytes: u64, secs: f64| bytes as f64 / secs / 1e6;
    println!(
        "merge: {} MiB merged file in {} s: {:.0} MB/s (best run); {} records copied as stored ({:.1} MiB, {:.0} % of the file), {} pages decoded and encoded again",
        s.file_bytes >> 20,
        range(&merge_s),
        mb(s.file_bytes, best(&merge_s)),
        s.records_copied,
        s.bytes_copied as f64 / (1 << 20) as f64,
        100.0 * s.bytes_copied as f64 / s.file_bytes as f64,
        s.pages_reencoded
    );
    println!(
        "merge to /dev/null (no disk): {} s: {:.0} MB/s (best run)",
        range(&null_s),
        mb(s.file_bytes, best(&null_s))
    );
    println!(
        "eager load: chain of {} layers {} s ({:.2} GB/s of guest memory), merged file {} s ({:.2} GB/s); chain / merged = {:.2} (best runs)",
        a.layers,
        range(&chain_s),
        a.size as f64 / best(&chain_s) / 1e9,
        range(&merged_s),
        a.size as f64 / best(&merged_s) / 1e9,
        best(&chain_s) / best(&merged_s)
    );
    if a.keep {
        println!("files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
}
