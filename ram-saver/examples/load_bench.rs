//! Restore benchmark: `open` + `load_into` of a large snapshot into fresh guest memory.
//!
//! `cargo run --release -p ram-saver --example load_bench [-- OPTIONS]`
//!
//! Writes a snapshot of random-ish, mostly non-zero guest memory (half the pages random, a
//! quarter compressible patterns, an eighth sparse, an eighth zero) with the writer to /tmp, once
//! raw and once with zstd, then times `open` + `load_into` into a fresh `GuestMemoryMmap`, and
//! `verify`, and prints GB/s (of guest memory). As a yardstick it also times a plain sequential
//! `read` of the file into a 1 MiB buffer (`cat file > /dev/null`). The page cache is warm (the
//! file was just written), as it usually is right after a save.
//!
//! Options: `--size-mib N` (1024), `--block-kib K` (2048: pages per `write_pages` call, which
//! bounds record size), `--repeat N` (3), `--zstd LEVEL` (3), `--only raw|zstd`, `--keep`
//! (reuse existing files in /tmp instead of rewriting them).

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ram_saver::SnapshotWriter;
use ram_saver::{AtomicFileSink, Compression, MemRegion, SnapshotHeader, SnapshotReader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: usize = 4096;

struct Args {
    size: usize,
    block: usize,
    repeat: usize,
    level: i32,
    only: Option<String>,
    keep: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        size: 1 << 30,
        block: 2 << 20,
        repeat: 3,
        level: 3,
        only: None,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--size-mib" => a.size = val().parse::<usize>().expect("number") << 20,
            "--block-kib" => a.block = val().parse::<usize>().expect("number") << 10,
            "--repeat" => a.repeat = val().parse().expect("number"),
            "--zstd" => a.level = val().parse().expect("number"),
            "--only" => a.only = Some(val()),
            "--keep" => a.keep = true,
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    a
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn fill_page(rng: &mut Rng, pn: u64, p: &mut [u8]) {
    match rng.next() % 8 {
        0..=3 => {
            for c in p.chunks_exact_mut(8) {
                c.copy_from_slice(&rng.next().to_le_bytes());
            }
        }
        4 | 5 => {
            let pat = (pn as u32).wrapping_mul(2_654_435_761).to_le_bytes();
            for (i, b) in p.iter_mut().enumerate() {
                *b = pat[i % 4] ^ (i / 512) as u8;
            }
        }
        6 => {
            p.fill(0);
            p[(pn as usize * 8) % PAGE..][..8].copy_from_slice(&(pn | 1).to_le_bytes());
        }
        _ => p.fill(0),
    }
}

fn write_snapshot(path: &Path, a: &Args, compression: Compression) -> f64 {
    let mut header = SnapshotHeader::new(
        vec![MemRegion {
            gpa: 0,
            size: a.size as u64,
        }],
        1,
        b"{}".to_vec(),
    );
    header.compression = compression;
    let t = Instant::now();
    let sink = AtomicFileSink::create(path).expect("create");
    let mut w = SnapshotWriter::new(sink, &header, b"machine state").expect("writer");
    let mut rng = Rng(0x10ad_bec4);
    let mut buf = vec![0u8; a.block];
    let mut at = 0usize;
    while at < a.size {
        let n = a.block.min(a.size - at);
        for (k, p) in buf[..n].chunks_exact_mut(PAGE).enumerate() {
            fill_page(&mut rng, (at / PAGE + k) as u64, p);
        }
        w.write_pages((at / PAGE) as u64, &buf[..n])
            .expect("write pages");
        at += n;
    }
    w.finish().expect("finish");
    t.elapsed().as_secs_f64()
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn cat(path: &Path) -> (u64, f64) {
    let t = Instant::now();
    let mut f = File::open(path).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).expect("read");
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    (n, t.elapsed().as_secs_f64())
}

fn main() {
    let a = parse_args();
    let mut runs: Vec<(&str, Compression)> = vec![
        ("raw", Compression::None),
        ("zstd", Compression::Zstd { level: a.level }),
    ];
    if let Some(o) = &a.only {
        runs.retain(|(n, _)| n == o);
    }
    println!(
        "load_bench: {} MiB guest, {} KiB blocks, {} cpus",
        a.size >> 20,
        a.block >> 10,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for (name, compression) in runs {
        let path = PathBuf::from(format!("/tmp/load_bench-{name}-{}m.snap", a.size >> 20));
        if !(a.keep && path.exists()) {
            let s = write_snapshot(&path, &a, compression);
            println!("{name}: wrote {} in {s:.2} s", path.display());
        }
        let file_len = std::fs::metadata(&path).expect("stat").len();
        println!(
            "{name}: file {} MiB ({:.2} of guest)",
            file_len >> 20,
            file_len as f64 / a.size as f64
        );
        for rep in 0..a.repeat {
            let (n, s) = cat(&path);
            let t = Instant::now();
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), a.size)])
                .expect("guest memory");
            let mut r = SnapshotReader::open(&path).expect("open");
            let t_open = t.elapsed().as_secs_f64();
            let totals = r.load_into(&mem, &mut |_| {}).expect("load");
            let t_load = t.elapsed().as_secs_f64();
            assert_eq!(totals.pages as usize, a.size / PAGE);
            // Spot check a few pages against the generator.
            if rep == 0 {
                spot_check(&mem, &a);
            }
            drop(mem);
            let t = Instant::now();
            let mut r = SnapshotReader::open(&path).expect("open");
            r.verify(&mut |_| {}).expect("verify");
            let t_verify = t.elapsed().as_secs_f64();
            println!(
                "{name} #{rep}: cat {:.2} GB/s | open {:.1} ms, open+load_into {:.3} s = {:.2} GB/s | verify {:.3} s = {:.2} GB/s",
                gbps(n, s),
                t_open * 1e3,
                t_load,
                gbps(a.size as u64, t_load),
                t_verify,
                gbps(a.size as u64, t_verify),
            );
        }
    }
}

fn spot_check(mem: &GuestMemoryMmap, a: &Args) {
    let mut rng = Rng(0x10ad_bec4);
    let mut want = vec![0u8; a.block];
    let mut got = vec![0u8; a.block];
    let mut at = 0usize;
    let mut k = 0usize;
    while at < a.size {
        let n = a.block.min(a.size - at);
        for (j, p) in want[..n].chunks_exact_mut(PAGE).enumerate() {
            fill_page(&mut rng, (at / PAGE + j) as u64, p);
        }
        if k.is_multiple_of(61) || at + n == a.size {
            mem.read_slice(&mut got[..n], GuestAddress(at as u64))
                .expect("read");
            assert!(got[..n] == want[..n], "memory differs in block at {at:#x}");
        }
        at += n;
        k += 1;
    }
}
