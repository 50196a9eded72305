//! The guest memory and the snapshot files the sweeps damage: 8 MiB in two regions (zero,
//! random, repetitive and sparse pages), written by ram-saver's writer in shuffled block order.

use std::fs;
use std::path::Path;

use ram_saver::{
    AtomicFileSink, Compression, MemRegion, ParentRef, SnapshotHeader, SnapshotWriter,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const PS: u64 = 4096;
/// Two regions with a gap, so that "page in the gap" and "record straddling a region" are
/// meaningful lies. 8 MiB in total.
pub const REGIONS: [(u64, u64); 2] = [(0, 6 << 20), (4 << 30, 2 << 20)];
/// Pages per `write_pages` call (blocks are written in shuffled order).
pub const BLOCK_PAGES: u64 = 64;
/// In debug builds the sweep is thinned (strides multiplied) to keep the runtime sane.
pub const THIN: u64 = if cfg!(debug_assertions) { 8 } else { 1 };

/// splitmix64: small, deterministic.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

pub fn new_mem() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(gpa, size)| (GuestAddress(gpa), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

pub fn guest_pages() -> u64 {
    REGIONS.iter().map(|r| r.1 / PS).sum()
}

/// Runs of 1..=40 pages: zero, random, repetitive (compressible) or sparse.
pub fn fill_guest(mem: &GuestMemoryMmap) {
    let mut rng = Rng(0x5eed_cafe);
    let mut page = vec![0u8; PS as usize];
    for &(gpa, size) in &REGIONS {
        let pages = size / PS;
        let mut p = 0;
        while p < pages {
            let run = (1 + rng.below(40)).min(pages - p);
            let kind = rng.below(100);
            for q in p..p + run {
                let pn = gpa / PS + q;
                match kind {
                    0..=34 => continue, // zero page: fresh memory reads as zeros
                    35..=64 => rng.fill(&mut page),
                    65..=94 => {
                        let pat = (pn as u32).wrapping_mul(2_654_435_761).to_le_bytes();
                        for (i, b) in page.iter_mut().enumerate() {
                            *b = pat[i % 4] ^ (i / 512) as u8;
                        }
                    }
                    _ => {
                        page.fill(0);
                        let at = (rng.below(PS / 8) * 8) as usize;
                        page[at..at + 8].copy_from_slice(&pn.to_le_bytes());
                        page[at] |= 1;
                    }
                }
                mem.write_slice(&page, GuestAddress(gpa + q * PS))
                    .expect("fill guest");
            }
            p += run;
        }
    }
}

/// The machine state of a real built-in guest (2 vCPUs, 32 MiB, writing at full speed),
/// captured once by vmm-core (see `tests/data/README.md`). The sweep's files carry it, so what a
/// restore would decode from them is a real state; ram-saver itself treats it as opaque bytes.
pub fn machine_state_blob() -> Vec<u8> {
    include_bytes!("../../data/machine-state.bin").to_vec()
}

/// The VM configuration of [`machine_state_blob`], as the header's config stores it.
pub fn vm_config_json() -> Vec<u8> {
    include_bytes!("../../data/vm-config.json").to_vec()
}

/// Save `mem` with ram-saver's writer through an atomic file sink and return the bytes.
pub fn write_snapshot(
    mem: &GuestMemoryMmap,
    path: &Path,
    compression: Compression,
    parent: &[u8],
) -> Vec<u8> {
    let regions = REGIONS
        .iter()
        .map(|&(gpa, size)| MemRegion { gpa, size })
        .collect();
    let config = vm_config_json();
    let mut header = SnapshotHeader::new(regions, 2, config);
    header.compression = compression;
    header.parent =
        (!parent.is_empty()).then(|| ParentRef::decode(parent).expect("parent reference"));
    let sink = AtomicFileSink::create(path).expect("create snapshot");
    let mut w = SnapshotWriter::new(sink, &header, &machine_state_blob()).expect("writer");
    let mut blocks = Vec::new();
    for &(gpa, size) in &REGIONS {
        let pages = size / PS;
        let mut p = 0;
        while p < pages {
            let n = BLOCK_PAGES.min(pages - p);
            blocks.push((gpa / PS + p, n));
            p += n;
        }
    }
    let mut rng = Rng(0x0dd_b10c);
    for i in (1..blocks.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        blocks.swap(i, j);
    }
    let mut buf = Vec::new();
    for (first, n) in blocks {
        buf.resize((n * PS) as usize, 0);
        mem.read_slice(&mut buf, GuestAddress(first * PS))
            .expect("read guest");
        w.write_pages(first, &buf).expect("write pages");
    }
    let len = w.finish().expect("finish");
    let bytes = fs::read(path).expect("read snapshot back");
    assert_eq!(bytes.len() as u64, len);
    bytes
}

pub fn same_memory(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    REGIONS.iter().all(|&(gpa, size)| {
        (0..size).step_by(x.len()).all(|off| {
            a.read_slice(&mut x, GuestAddress(gpa + off)).expect("read");
            b.read_slice(&mut y, GuestAddress(gpa + off)).expect("read");
            x == y
        })
    })
}
