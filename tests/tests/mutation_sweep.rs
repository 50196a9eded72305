//! Bad snapshot files: a real snapshot written by ram-saver's writer (8 MiB of guest memory in
//! two regions: zero pages, random pages, repetitive pages and sparse pages, saved in shuffled
//! block order, once raw and once with zstd, with the real machine state of a booted built-in
//! guest, captured by vmm-core) is damaged in every way we can think of. For every damaged file, `SnapshotReader::open` + `verify` and,
//! separately, `open` + `load_into` (into fresh guest memory) must return a typed
//! [`FormatError`]: never `Ok`, never a panic (every attempt runs under `catch_unwind`), never a
//! hang (a watchdog bounds the whole test, and every attempt is timed), never an absurd
//! allocation (the process's address space is limited with RLIMIT_AS, so an allocation driven
//! by an unchecked length aborts the run, and `VmHWM` bounds the peak RSS).
//!
//! The sweep:
//! - **Byte flips**: a stride over the whole file, every byte of the first and last 512 bytes,
//!   every byte of every record header, the first, middle and last payload byte of every
//!   record, a stride through the machine state, every byte of the trailer's fixed part and a
//!   stride through its index.
//! - **Truncations** every 4099 bytes plus edge cases (0, 1, 7, 8, 16, section and record
//!   boundaries, `len - 1`), and **appended garbage** (bytes, zeros, a second footer).
//! - **Zeroed 4 KiB windows** at a stride and at section boundaries.
//! - **Lies** in length, count, page and offset fields, re-encoded with valid checksums (this
//!   file carries its own encoder of the documented layout, checked to reproduce the writer's
//!   output byte for byte) so that only the lie itself can give the file away; plus a newer
//!   format version and another architecture code, and a few valid re-encodings (records
//!   reordered, a zero run split in two) as controls that must be accepted.
//! - **Machine states that only decoding can catch**: the real state with a KVM struct of the
//!   wrong size (`regs`, `sregs`, `xsave`, `xcrs`, `lapic`, `events`, `debugregs`, `mp_state`,
//!   irqchips, PIT, clock), CPUID empty or too long, too many MSRs, duplicate or out-of-range
//!   vCPU ids, a vCPU count that disagrees with the config, …, stored with a valid crc: the
//!   file opens and verifies, restore's decoding (`vm_snapshot::machine_state`) refuses it as
//!   `Corrupt` naming the component, and `MachineState::from_bytes` with a
//!   `VmError::StateComponent` naming the component and vCPU state. Byte flips through the
//!   state (crc recomputed) must never make the decoding panic.
//!
//! Expected error for damage, by the first section the reader checks (it checks in this order;
//! of the trailer it checks the tag and totals first, its index and crc after the machine
//! state, still before any record):
//!
//! | damaged bytes                                | kind           | record      |
//! |----------------------------------------------|----------------|-------------|
//! | magic (0..8)                                 | `NotASnapshot` | -           |
//! | format version (8..12)                       | `Unsupported`  | -           |
//! | footer (last 32 bytes), truncation, appended | `Incomplete`   | -           |
//! | trailer (totals, index, crc)                 | `Corrupt`      | -           |
//! | rest of the header (incl. `header_len`)      | `Corrupt`      | -           |
//! | machine state (tag, length, crc, blob)       | `Corrupt`      | -           |
//! | record `i` (header or payload)               | `Corrupt`      | `Some(i)`   |
//!
//! Files shorter than the magic may also be called `NotASnapshot`.
//!
//! Lies: length/count/offset/page lies and coverage errors (overlap, outside guest memory,
//! missing pages) are `Corrupt` (naming the record where the reader can know it); a footer that
//! does not point at a trailer ending before it is `Incomplete`; version, architecture, page
//! size, codec and flags this build does not know are `Unsupported` (the message names the
//! version / architecture); a header layout that differs from the target memory may also be
//! `Mismatch` for `load_into`. Trailer totals that disagree with the records are `Corrupt` for
//! `load_into` too: a trailer that lies is not a valid trailer, and the totals are what
//! `load_into` returns.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ram_saver::format::{
    FOOTER_LEN, MAX_GUEST_BYTES, MAX_HEADER_LEN, MAX_RECORD_RAW, MAX_REGIONS, RECORD_HEADER_LEN,
    TRAILER_FIXED_LEN,
};
use ram_saver::{
    AtomicFileSink, Compression, ErrorKind, FormatError, MemRegion, SnapshotHeader, SnapshotReader,
    SnapshotWriter, FORMAT_VERSION,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_core::{
    GuestParams, MachineState, MemBackend, SharedBuffer, Vm, VmConfig, VmError, WriteRate,
};

// ---------------------------------------------------------------------------------------------
// Allocation accounting
// ---------------------------------------------------------------------------------------------

/// Address-space limit for this test process. Every allocation the reader could be tricked into
/// (a length field of 2^32 pages or 2^64 bytes) is far above it, so such an allocation fails and
/// aborts the test run loudly ("memory allocation of N bytes failed"), instead of being measured by
/// a counting allocator (which would need `unsafe` outside the crates allowed to have it).
const ADDRESS_SPACE_LIMIT: u64 = 3 << 30;

fn limit_address_space() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_AS).expect("getrlimit");
    setrlimit(Resource::RLIMIT_AS, ADDRESS_SPACE_LIMIT.min(hard), hard).expect("setrlimit");
}

/// Peak RSS bound for the whole test.
const MAX_HWM_KIB: u64 = 1 << 20;

fn vm_hwm_kib() -> u64 {
    let s = fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The guest and the snapshot under test
// ---------------------------------------------------------------------------------------------

const PS: u64 = 4096;
/// Two regions with a gap, so that "page in the gap" and "record straddling a region" are
/// meaningful lies. 8 MiB in total.
const REGIONS: [(u64, u64); 2] = [(0, 6 << 20), (4 << 30, 2 << 20)];
/// Pages per `write_pages` call (blocks are written in shuffled order).
const BLOCK_PAGES: u64 = 64;
/// In debug builds the sweep is thinned (strides multiplied) to keep the runtime sane.
const THIN: u64 = if cfg!(debug_assertions) { 8 } else { 1 };

/// splitmix64: small, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

fn new_mem() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(gpa, size)| (GuestAddress(gpa), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

fn guest_pages() -> u64 {
    REGIONS.iter().map(|r| r.1 / PS).sum()
}

/// Runs of 1..=40 pages: zero, random, repetitive (compressible) or sparse.
fn fill_guest(mem: &GuestMemoryMmap) {
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
/// captured once: booted, paused, `capture_state`, `to_bytes`. The sweep's files carry it, so
/// what `restore` decodes from them is a real state.
fn machine_state_blob() -> Vec<u8> {
    static STATE: OnceLock<Vec<u8>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let cfg = VmConfig {
                mem_bytes: 32 << 20,
                vcpus: 2,
                backend: MemBackend::Anon,
                guest: GuestParams {
                    write_rate: WriteRate::Full,
                    working_set_pages: None,
                    seed: 11,
                },
                kernel: None,
            };
            let vm = Vm::boot(cfg, Box::new(SharedBuffer::new())).expect("boot built-in guest");
            let t0 = Instant::now();
            while !vm.progress().steps.iter().all(|&s| s > 1000) {
                assert!(
                    vm.exit_status().is_none(),
                    "guest ended: {:?}",
                    vm.exit_status()
                );
                assert!(t0.elapsed() < Duration::from_secs(60), "no guest progress");
                std::thread::sleep(Duration::from_millis(10));
            }
            vm.pause().expect("pause");
            let st = vm.capture_state().expect("capture state");
            vm.shutdown();
            st.to_bytes()
        })
        .clone()
}

/// The VM configuration inside [`machine_state_blob`], as the header's config stores it.
fn vm_config_json() -> Vec<u8> {
    let st = MachineState::from_bytes(&machine_state_blob()).expect("captured state decodes");
    serde_json::to_vec(st.config()).expect("config json")
}

/// Save `mem` with ram-saver's writer through an atomic file sink and return the bytes.
fn write_snapshot(
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
    header.parent = parent.to_vec();
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

fn same_memory(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
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

// ---------------------------------------------------------------------------------------------
// An independent encoder/parser of the documented layout (ram-saver's `format` module docs)
// ---------------------------------------------------------------------------------------------

fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Header fields, with optional raw overrides of length/count fields (lies).
#[derive(Clone, Debug)]
struct Hdr {
    version: u32,
    flags: u32,
    page_size: u32,
    arch: u32,
    codec: u32,
    level: i32,
    vcpus: u32,
    created: u64,
    regions: Vec<(u64, u64)>,
    config: Vec<u8>,
    parent: Vec<u8>,
    region_count: Option<u32>,
    config_len: Option<u32>,
    parent_len: Option<u32>,
    header_len: Option<u32>,
}

impl Hdr {
    /// Encode, with a crc that is correct for the bytes written (whatever they say).
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"SNAPCTL\0");
        put32(&mut b, self.version);
        put32(&mut b, 0);
        put32(&mut b, self.flags);
        put32(&mut b, self.page_size);
        put32(&mut b, self.arch);
        put32(&mut b, self.codec);
        b.extend_from_slice(&self.level.to_le_bytes());
        put32(&mut b, self.vcpus);
        put64(&mut b, self.created);
        put32(
            &mut b,
            self.region_count.unwrap_or(self.regions.len() as u32),
        );
        for &(gpa, size) in &self.regions {
            put64(&mut b, gpa);
            put64(&mut b, size);
        }
        put32(&mut b, self.config_len.unwrap_or(self.config.len() as u32));
        b.extend_from_slice(&self.config);
        put32(&mut b, self.parent_len.unwrap_or(self.parent.len() as u32));
        b.extend_from_slice(&self.parent);
        let len = self.header_len.unwrap_or(b.len() as u32 + 4);
        b[12..16].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&b);
        put32(&mut b, crc);
        b
    }

    /// Parse a known-good header (panics on anything unexpected: that would be a test bug).
    fn parse(b: &[u8]) -> Hdr {
        assert_eq!(&b[0..8], b"SNAPCTL\0");
        assert_eq!(get32(b, 12) as usize, b.len());
        let n = get32(b, 48) as usize;
        let regions = (0..n)
            .map(|i| (get64(b, 52 + 16 * i), get64(b, 60 + 16 * i)))
            .collect();
        let mut at = 52 + 16 * n;
        let clen = get32(b, at) as usize;
        let config = b[at + 4..at + 4 + clen].to_vec();
        at += 4 + clen;
        let plen = get32(b, at) as usize;
        let parent = b[at + 4..at + 4 + plen].to_vec();
        at += 4 + plen;
        assert_eq!(at + 4, b.len());
        assert_eq!(crc32fast::hash(&b[..at]), get32(b, at));
        Hdr {
            version: get32(b, 8),
            flags: get32(b, 16),
            page_size: get32(b, 20),
            arch: get32(b, 24),
            codec: get32(b, 28),
            level: get32(b, 32) as i32,
            vcpus: get32(b, 36),
            created: get64(b, 40),
            regions,
            config,
            parent,
            region_count: None,
            config_len: None,
            parent_len: None,
            header_len: None,
        }
    }
}

/// A RAM record, with optional raw overrides of `stored_len` and the crc (lies).
#[derive(Clone, Debug)]
struct Rec {
    kind: u8,
    codec: u8,
    reserved: u16,
    first_page: u64,
    page_count: u32,
    payload: Vec<u8>,
    stored_len: Option<u32>,
    crc: Option<u32>,
}

impl Rec {
    fn prefix(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(b"RREC");
        b[4] = self.kind;
        b[5] = self.codec;
        b[6..8].copy_from_slice(&self.reserved.to_le_bytes());
        b[8..16].copy_from_slice(&self.first_page.to_le_bytes());
        b[16..20].copy_from_slice(&self.page_count.to_le_bytes());
        let stored = self.stored_len.unwrap_or(self.payload.len() as u32);
        b[20..24].copy_from_slice(&stored.to_le_bytes());
        b
    }

    /// The crc the reader computes: header prefix, then the payload it reads.
    fn honest_crc(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.prefix());
        h.update(&self.payload);
        h.finalize()
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prefix());
        put32(out, self.crc.unwrap_or_else(|| self.honest_crc()));
        out.extend_from_slice(&self.payload);
    }
}

/// One trailer index entry; `tail` is `kind` and the 3 pad bytes.
#[derive(Clone, Copy, Debug)]
struct Entry {
    offset: u64,
    first_page: u64,
    page_count: u32,
    tail: [u8; 4],
}

/// Trailer contents before encoding: index and totals
/// (pages, zero_pages, data_pages, records, raw_bytes, stored_bytes).
struct Tail {
    index: Vec<Entry>,
    totals: [u64; 6],
}

#[derive(Clone, Debug)]
struct Model {
    hdr: Hdr,
    state: Vec<u8>,
    state_len: Option<u64>,
    /// Bytes between the machine state and the first record (normally none).
    gap: Vec<u8>,
    recs: Vec<Rec>,
}

/// Where the sections of a (good) file are.
#[derive(Clone, Debug)]
struct Spans {
    len: u64,
    header_len: u64,
    records_start: u64,
    /// (offset, total length) of every record, in file order.
    recs: Vec<(u64, u64)>,
    trailer_at: u64,
    footer_at: u64,
}

/// The section an offset belongs to, ordered as the reader checks them (derived `Ord`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Sec {
    Magic,
    Version,
    Footer,
    Trailer,
    Header,
    State,
    Record(u64),
}

impl Spans {
    fn sec(&self, off: u64) -> Sec {
        if off < 8 {
            Sec::Magic
        } else if off < 12 {
            Sec::Version
        } else if off < self.header_len {
            Sec::Header
        } else if off < self.records_start {
            Sec::State
        } else if off >= self.footer_at {
            Sec::Footer
        } else if off >= self.trailer_at {
            Sec::Trailer
        } else {
            Sec::Record(self.recs.partition_point(|&(o, _)| o <= off) as u64 - 1)
        }
    }
}

fn footer(trailer_offset: u64, trailer_len: u64) -> [u8; FOOTER_LEN] {
    let mut b = [0u8; FOOTER_LEN];
    b[0..8].copy_from_slice(&trailer_offset.to_le_bytes());
    b[8..16].copy_from_slice(&trailer_len.to_le_bytes());
    let crc = crc32fast::hash(&b[0..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b[24..32].copy_from_slice(b"SNAPEND\0");
    b
}

/// Replace the footer of `b` with a valid one (correct crc) saying what we want.
fn set_footer(b: &mut [u8], trailer_offset: u64, trailer_len: u64) {
    let n = b.len();
    b[n - FOOTER_LEN..].copy_from_slice(&footer(trailer_offset, trailer_len));
}

impl Model {
    fn parse(b: &[u8]) -> (Model, Spans) {
        let len = b.len() as u64;
        let footer_at = len - FOOTER_LEN as u64;
        let f = &b[footer_at as usize..];
        assert_eq!(&f[24..32], b"SNAPEND\0");
        assert_eq!(crc32fast::hash(&f[0..16]), get32(f, 16));
        let (trailer_at, trailer_len) = (get64(f, 0), get64(f, 8));
        assert_eq!(trailer_at + trailer_len, footer_at);
        let header_len = get32(b, 12) as usize;
        let hdr = Hdr::parse(&b[..header_len]);
        let st = &b[header_len..];
        assert_eq!(&st[0..4], b"MSTA");
        let st_len = get64(st, 4) as usize;
        let state = st[16..16 + st_len].to_vec();
        assert_eq!(crc32fast::hash(&state), get32(st, 12));
        let records_start = (header_len + 16 + st_len) as u64;
        let mut recs = Vec::new();
        let mut spans = Vec::new();
        let mut pos = records_start as usize;
        while (pos as u64) < trailer_at {
            let h = &b[pos..pos + RECORD_HEADER_LEN];
            assert_eq!(&h[0..4], b"RREC");
            let stored = get32(h, 20) as usize;
            let r = Rec {
                kind: h[4],
                codec: h[5],
                reserved: u16::from_le_bytes([h[6], h[7]]),
                first_page: get64(h, 8),
                page_count: get32(h, 16),
                payload: b[pos + RECORD_HEADER_LEN..pos + RECORD_HEADER_LEN + stored].to_vec(),
                stored_len: None,
                crc: None,
            };
            assert_eq!(r.honest_crc(), get32(h, 24));
            spans.push((pos as u64, (RECORD_HEADER_LEN + stored) as u64));
            recs.push(r);
            pos += RECORD_HEADER_LEN + stored;
        }
        assert_eq!(pos as u64, trailer_at);
        let t = &b[trailer_at as usize..footer_at as usize];
        assert_eq!(&t[0..4], b"TRLR");
        assert_eq!(get64(t, 4 + 3 * 8), recs.len() as u64);
        let model = Model {
            hdr,
            state,
            state_len: None,
            gap: Vec::new(),
            recs,
        };
        let spans = Spans {
            len,
            header_len: header_len as u64,
            records_start,
            recs: spans,
            trailer_at,
            footer_at,
        };
        (model, spans)
    }

    fn assemble(&self) -> Vec<u8> {
        self.assemble_with(|_| {})
    }

    /// Encode the whole file with correct checksums everywhere; the index and totals are derived
    /// from the records, then `edit` may change them before the trailer is encoded.
    fn assemble_with(&self, edit: impl FnOnce(&mut Tail)) -> Vec<u8> {
        let mut out = self.hdr.encode();
        out.extend_from_slice(b"MSTA");
        put64(&mut out, self.state_len.unwrap_or(self.state.len() as u64));
        put32(&mut out, crc32fast::hash(&self.state));
        out.extend_from_slice(&self.state);
        out.extend_from_slice(&self.gap);
        let ps = u64::from(self.hdr.page_size);
        let mut tail = Tail {
            index: Vec::new(),
            totals: [0; 6],
        };
        for r in &self.recs {
            tail.index.push(Entry {
                offset: out.len() as u64,
                first_page: r.first_page,
                page_count: r.page_count,
                tail: [r.kind, 0, 0, 0],
            });
            r.encode_into(&mut out);
            let n = u64::from(r.page_count);
            let t = &mut tail.totals;
            t[0] = t[0].wrapping_add(n);
            if r.kind == 0 {
                t[1] = t[1].wrapping_add(n);
            } else {
                t[2] = t[2].wrapping_add(n);
                t[4] = t[4].wrapping_add(n.wrapping_mul(ps));
            }
            t[3] += 1;
            t[5] += r.payload.len() as u64;
        }
        edit(&mut tail);
        let trailer_at = out.len() as u64;
        let mut t = Vec::new();
        t.extend_from_slice(b"TRLR");
        for v in tail.totals {
            put64(&mut t, v);
        }
        for e in &tail.index {
            put64(&mut t, e.offset);
            put64(&mut t, e.first_page);
            put32(&mut t, e.page_count);
            t.extend_from_slice(&e.tail);
        }
        let crc = crc32fast::hash(&t);
        put32(&mut t, crc);
        out.extend_from_slice(&t);
        out.extend_from_slice(&footer(trailer_at, t.len() as u64));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Attempts and expectations
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Outcome {
    Accepted,
    Err {
        kind: ErrorKind,
        record: Option<u64>,
        msg: String,
        stage: &'static str,
    },
    Panic(String),
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic>".into())
}

/// Run `f` under `catch_unwind`; `stage` says where an error came from.
fn guarded(f: impl FnOnce(&mut &'static str) -> Result<(), FormatError>) -> Outcome {
    let mut stage = "open";
    let r = panic::catch_unwind(AssertUnwindSafe(|| f(&mut stage)));
    match r {
        Ok(Ok(())) => Outcome::Accepted,
        Ok(Err(e)) => Outcome::Err {
            kind: e.kind(),
            record: e.record(),
            msg: e.to_string(),
            stage,
        },
        Err(p) => Outcome::Panic(panic_text(&*p)),
    }
}

fn try_verify(path: &Path) -> Outcome {
    guarded(|stage| {
        let mut r = SnapshotReader::open(path)?;
        *stage = "verify";
        r.verify(&mut |_| {})?;
        Ok(())
    })
}

fn try_load(path: &Path, loaded: Option<&mut Option<GuestMemoryMmap>>) -> Outcome {
    let mut mem_out = None;
    let o = guarded(|stage| {
        let mut r = SnapshotReader::open(path)?;
        *stage = "load_into";
        let mem = new_mem();
        r.load_into(&mem, &mut |_| {})?;
        mem_out = Some(mem);
        Ok(())
    });
    if let Some(l) = loaded {
        *l = mem_out;
    }
    o
}

/// Drain `records()` (no expectation: it does not check coverage); it must not panic.
fn try_records(path: &Path) -> Outcome {
    guarded(|stage| {
        let mut r = SnapshotReader::open(path)?;
        *stage = "records";
        for rec in r.records() {
            rec?;
        }
        Ok(())
    })
}

#[derive(Clone, Debug)]
struct Expect {
    kinds: &'static [ErrorKind],
    /// The error must name this record.
    record: Option<u64>,
    /// The (lowercased) message must contain this.
    msg: Option<&'static str>,
}

const CORRUPT: &[ErrorKind] = &[ErrorKind::Corrupt];
const INCOMPLETE: &[ErrorKind] = &[ErrorKind::Incomplete];
const UNSUPPORTED: &[ErrorKind] = &[ErrorKind::Unsupported];
const NOT_A_SNAPSHOT: &[ErrorKind] = &[ErrorKind::NotASnapshot];
const SHORT: &[ErrorKind] = &[ErrorKind::Incomplete, ErrorKind::NotASnapshot];
const INCOMPLETE_OR_CORRUPT: &[ErrorKind] = &[ErrorKind::Incomplete, ErrorKind::Corrupt];
const CORRUPT_OR_MISMATCH: &[ErrorKind] = &[ErrorKind::Corrupt, ErrorKind::Mismatch];

fn ex(kinds: &'static [ErrorKind]) -> Expect {
    Expect {
        kinds,
        record: None,
        msg: None,
    }
}

fn ex_rec(kinds: &'static [ErrorKind], record: usize) -> Expect {
    Expect {
        record: Some(record as u64),
        ..ex(kinds)
    }
}

fn ex_msg(kinds: &'static [ErrorKind], msg: &'static str) -> Expect {
    Expect {
        msg: Some(msg),
        ..ex(kinds)
    }
}

/// What damage to the first-checked damaged section must produce (see the module docs).
fn expect_for(sec: Sec) -> Expect {
    match sec {
        Sec::Magic => ex(NOT_A_SNAPSHOT),
        Sec::Version => ex_msg(UNSUPPORTED, "version"),
        Sec::Footer => ex(INCOMPLETE),
        Sec::Trailer | Sec::Header | Sec::State => ex(CORRUPT),
        Sec::Record(i) => ex_rec(CORRUPT, i as usize),
    }
}

#[derive(Default)]
struct Stats {
    files: usize,
    attempts: usize,
    panics: usize,
    accepted: usize,
    by_kind: BTreeMap<String, usize>,
    by_stage: BTreeMap<String, usize>,
    failures: Vec<String>,
    slowest: (Duration, String),
}

impl Stats {
    fn merge(&mut self, o: Stats) {
        self.files += o.files;
        self.attempts += o.attempts;
        self.panics += o.panics;
        self.accepted += o.accepted;
        for (k, v) in o.by_kind {
            *self.by_kind.entry(k).or_default() += v;
        }
        for (k, v) in o.by_stage {
            *self.by_stage.entry(k).or_default() += v;
        }
        self.failures.extend(o.failures);
        if o.slowest.0 > self.slowest.0 {
            self.slowest = o.slowest;
        }
    }

    fn timed(&mut self, what: &str, t0: Instant) {
        let d = t0.elapsed();
        if d > self.slowest.0 {
            self.slowest = (d, what.to_string());
        }
    }

    fn check(&mut self, what: &str, path: &str, o: &Outcome, e: &Expect) {
        self.attempts += 1;
        match o {
            Outcome::Panic(m) => {
                self.panics += 1;
                self.failures.push(format!("{what} [{path}]: PANIC: {m}"));
            }
            Outcome::Accepted => {
                self.accepted += 1;
                self.failures.push(format!(
                    "{what} [{path}]: accepted (expected {:?})",
                    e.kinds
                ));
            }
            Outcome::Err {
                kind,
                record,
                msg,
                stage,
            } => {
                *self.by_kind.entry(format!("{kind:?}")).or_default() += 1;
                *self.by_stage.entry(format!("{path}@{stage}")).or_default() += 1;
                let mut bad = Vec::new();
                if !e.kinds.contains(kind) {
                    bad.push(format!("kind {kind:?}, expected {:?}", e.kinds));
                }
                if e.record.is_some() && *record != e.record {
                    bad.push(format!("record {record:?}, expected {:?}", e.record));
                }
                if let Some(m) = e.msg {
                    if !msg.to_lowercase().contains(m) {
                        bad.push(format!("message lacks {m:?}"));
                    }
                }
                if !bad.is_empty() {
                    self.failures.push(format!(
                        "{what} [{path}]: {} (at {stage}: {msg})",
                        bad.join("; ")
                    ));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The in-place sweep (flips, truncations, appends, zeroed windows)
// ---------------------------------------------------------------------------------------------

enum Mutation {
    /// Overwrite bytes at an offset.
    Patch { at: u64, bytes: Vec<u8> },
    /// Cut the file to this length.
    Truncate(u64),
    /// Add bytes after the footer.
    Append(Vec<u8>),
}

struct Case {
    base: usize,
    what: String,
    m: Mutation,
    expect: Expect,
}

struct Base {
    name: &'static str,
    bytes: Vec<u8>,
    model: Model,
    spans: Spans,
}

const FLIP_MASKS: [u8; 9] = [0x01, 0x80, 0xff, 0x10, 0x04, 0x40, 0x20, 0x02, 0x08];

fn sweep_cases(k: usize, b: &Base, counts: &mut BTreeMap<&'static str, usize>) -> Vec<Case> {
    let s = &b.spans;
    let len = s.len;
    let mut cases = Vec::new();

    // Byte flips.
    let mut flips = BTreeSet::new();
    flips.extend((0..len).step_by((4093 * THIN) as usize));
    flips.extend(0..512.min(len));
    flips.extend(len.saturating_sub(512)..len);
    for (i, &(off, rlen)) in s.recs.iter().enumerate() {
        if (i as u64).is_multiple_of(THIN) {
            flips.extend(off..off + RECORD_HEADER_LEN as u64);
        }
        let p = off + RECORD_HEADER_LEN as u64;
        let plen = rlen - RECORD_HEADER_LEN as u64;
        if plen > 0 {
            flips.extend([p, p + plen / 2, p + plen - 1]);
        }
    }
    // About 128 through the machine state: here only its crc is tested (its decoding has its
    // own section).
    let state_step = ((s.records_start - s.header_len) / 128).max(61) * THIN;
    flips.extend((s.header_len..s.records_start).step_by(state_step as usize));
    flips.extend(s.trailer_at..s.trailer_at + TRAILER_FIXED_LEN as u64);
    flips.extend((s.trailer_at..s.footer_at).step_by((5 * THIN) as usize));
    for (n, &at) in flips.iter().enumerate() {
        let mask = FLIP_MASKS[n % FLIP_MASKS.len()];
        let sec = s.sec(at);
        cases.push(Case {
            base: k,
            what: format!("{}: flip byte {at} ({sec:?}) ^ {mask:#04x}", b.name),
            m: Mutation::Patch {
                at,
                bytes: vec![b.bytes[at as usize] ^ mask],
            },
            expect: expect_for(sec),
        });
    }
    *counts.entry("byte flips").or_default() += flips.len();

    // Truncations.
    let mut cuts = BTreeSet::new();
    cuts.extend((0..len).step_by((4099 * THIN) as usize));
    cuts.extend([0, 1, 7, 8, 15, 16, 17, 55, 56]);
    cuts.extend([s.header_len - 1, s.header_len, s.header_len + 16]);
    cuts.extend([s.records_start, s.records_start + 1]);
    let n = s.recs.len();
    for &(off, rlen) in s.recs.iter().take(5).chain(s.recs.iter().skip(n - 5)) {
        cuts.extend([off + 1, off + RECORD_HEADER_LEN as u64, off + rlen - 1]);
    }
    cuts.extend([s.trailer_at, s.trailer_at + 1, s.footer_at - 1, s.footer_at]);
    cuts.extend([len - 33, len - 32, len - 31, len - 8, len - 1]);
    for &at in &cuts {
        cases.push(Case {
            base: k,
            what: format!("{}: truncated to {at} bytes", b.name),
            m: Mutation::Truncate(at),
            expect: ex(if at < 8 { SHORT } else { INCOMPLETE }),
        });
    }
    *counts.entry("truncations").or_default() += cuts.len();

    // Appended bytes.
    let last_footer = b.bytes[(len - FOOTER_LEN as u64) as usize..].to_vec();
    let appends: [(&str, Vec<u8>); 4] = [
        ("one zero byte", vec![0]),
        ("4 KiB of zeros", vec![0; 4096]),
        ("a copy of the footer", last_footer),
        ("the end magic", b"SNAPEND\0".to_vec()),
    ];
    for (what, bytes) in appends {
        cases.push(Case {
            base: k,
            what: format!("{}: appended {what}", b.name),
            m: Mutation::Append(bytes),
            expect: ex(INCOMPLETE),
        });
        *counts.entry("appends").or_default() += 1;
    }

    // Zeroed 4 KiB windows.
    let mut starts = BTreeSet::new();
    starts.extend((0..len).step_by((65_521 * THIN) as usize));
    starts.extend([
        s.header_len.saturating_sub(100),
        s.records_start.saturating_sub(16),
        s.recs[n / 2].0,
        s.trailer_at.saturating_sub(2048),
        s.trailer_at,
        len.saturating_sub(4096),
    ]);
    for &at in &starts {
        let end = (at + 4096).min(len);
        let window = &b.bytes[at as usize..end as usize];
        let first = window
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != 0)
            .map(|(i, _)| s.sec(at + i as u64))
            .min();
        let Some(sec) = first else { continue };
        cases.push(Case {
            base: k,
            what: format!("{}: zeroed {at}..{end} (first checked: {sec:?})", b.name),
            m: Mutation::Patch {
                at,
                bytes: vec![0; (end - at) as usize],
            },
            expect: expect_for(sec),
        });
        *counts.entry("zeroed windows").or_default() += 1;
    }
    cases
}

/// Apply `m` to the worker's copy of the base file, run both attempts, undo `m`.
fn run_case(
    c: &Case,
    f: &fs::File,
    path: &Path,
    base: &[u8],
    stats: &mut Stats,
) -> std::io::Result<()> {
    let len = base.len() as u64;
    match &c.m {
        Mutation::Patch { at, bytes } => f.write_all_at(bytes, *at)?,
        Mutation::Truncate(at) => f.set_len(*at)?,
        Mutation::Append(bytes) => f.write_all_at(bytes, len)?,
    }
    let t0 = Instant::now();
    let o = try_verify(path);
    stats.check(&c.what, "verify", &o, &c.expect);
    let o = try_load(path, None);
    stats.check(&c.what, "load_into", &o, &c.expect);
    stats.timed(&c.what, t0);
    stats.files += 1;
    match &c.m {
        Mutation::Patch { at, bytes } => {
            let at = *at as usize;
            f.write_all_at(&base[at..at + bytes.len()], at as u64)?;
        }
        Mutation::Truncate(at) => f.write_all_at(&base[*at as usize..], *at)?,
        Mutation::Append(_) => f.set_len(len)?,
    }
    Ok(())
}

/// What each sweep worker is doing, for the watchdog's message.
static CURRENT: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn run_sweep(bases: &[Base], cases: &[Case], dir: &Path) -> Stats {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4));
    CURRENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .resize(workers, String::new());
    let next = AtomicUsize::new(0);
    let results: Vec<Stats> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let next = &next;
                sc.spawn(move || {
                    let mut stats = Stats::default();
                    let files: Vec<(PathBuf, fs::File)> = bases
                        .iter()
                        .enumerate()
                        .map(|(k, b)| {
                            let p = dir.join(format!("sweep-w{w}-{k}.snap"));
                            fs::write(&p, &b.bytes).expect("write worker copy");
                            let f = OpenOptions::new().write(true).open(&p).expect("open copy");
                            (p, f)
                        })
                        .collect();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(c) = cases.get(i) else { break };
                        CURRENT.lock().unwrap_or_else(|p| p.into_inner())[w] = c.what.clone();
                        let (p, f) = &files[c.base];
                        run_case(c, f, p, &bases[c.base].bytes, &mut stats)
                            .expect("apply/undo mutation");
                    }
                    for (p, _) in &files {
                        let _ = fs::remove_file(p);
                    }
                    stats
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sweep worker"))
            .collect()
    });
    let mut all = Stats::default();
    for s in results {
        all.merge(s);
    }
    all
}

// ---------------------------------------------------------------------------------------------
// Lies with valid checksums
// ---------------------------------------------------------------------------------------------

struct Lie {
    what: String,
    bytes: Vec<u8>,
    verify: Expect,
    load: Expect,
}

/// A zstd frame of `n` zero bytes, made without holding `n` bytes (content size recorded).
fn zstd_zeros(n: u64) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), 1).expect("zstd encoder");
    e.set_pledged_src_size(Some(n)).expect("pledge");
    e.include_contentsize(true).expect("content size");
    let chunk = vec![0u8; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        e.write_all(&chunk[..k]).expect("compress");
        left -= k as u64;
    }
    e.finish().expect("finish frame")
}

/// Craft every lie for base `b`, handing each to `sink` as soon as it is made (they are whole
/// files: holding them all at once would dominate the heap).
fn lies(b: &Base, sink: &mut dyn FnMut(Lie)) {
    let m0 = &b.model;
    let s = &b.spans;
    let name = b.name;
    let mut add = |what: &str, bytes: Vec<u8>, verify: Expect, load: Expect| {
        sink(Lie {
            what: format!("{name}: {what}"),
            bytes,
            verify,
            load,
        })
    };
    let find = |f: &dyn Fn(&Rec) -> bool| m0.recs.iter().position(f).expect("such a record");
    let dr = find(&|r| r.kind == 1 && r.codec == 0);
    let zr = find(&|r| r.kind == 0 && r.page_count >= 2);
    let last = m0.recs.len() - 1;
    let region0_end = REGIONS[0].1 / PS;
    let guest_end = (REGIONS[1].0 + REGIONS[1].1) / PS;
    let ps = u64::from(m0.hdr.page_size);
    let footer_at = s.footer_at;

    // --- Record page counts ---------------------------------------------------------------
    for (pc, label) in [
        (u32::MAX, "u32::MAX"),
        ((MAX_RECORD_RAW / ps) as u32 + 1, "MAX_RECORD_RAW/ps + 1"),
        ((MAX_RECORD_RAW / ps) as u32, "MAX_RECORD_RAW/ps"),
        (m0.recs[dr].page_count + 1, "+1"),
    ] {
        let mut m = m0.clone();
        m.recs[dr].page_count = pc;
        add(
            &format!("raw data record {dr} page_count {label} (index, totals, crc consistent)"),
            m.assemble(),
            ex_rec(CORRUPT, dr),
            ex(CORRUPT),
        );
    }
    {
        let mut m = m0.clone();
        m.recs[dr].page_count = u32::MAX;
        let bytes = m.assemble_with(|t| t.index[dr].page_count = m0.recs[dr].page_count);
        add(
            &format!("raw data record {dr} page_count u32::MAX, index unchanged"),
            bytes,
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
    }
    for (pc, label) in [(u32::MAX, "u32::MAX"), (1 << 24, "2^24")] {
        let mut m = m0.clone();
        m.recs[zr].page_count = pc;
        add(
            &format!("zero run {zr} page_count {label} (consistent)"),
            m.assemble(),
            ex_rec(CORRUPT, zr),
            ex(CORRUPT),
        );
    }
    {
        // Index claims a huge count for a record that itself is fine.
        let bytes = m0.assemble_with(|t| t.index[zr].page_count = u32::MAX);
        add(
            &format!("index entry {zr} page_count u32::MAX"),
            bytes,
            ex_rec(CORRUPT, zr),
            ex(CORRUPT),
        );
        let bytes = m0.assemble_with(|t| t.index[zr].page_count = 0);
        add(
            &format!("index entry {zr} page_count 0"),
            bytes,
            ex(CORRUPT),
            ex(CORRUPT),
        );
    }

    // --- Coverage: overlaps, pages outside guest memory, missing pages ----------------------
    {
        let mut m = m0.clone();
        let copy = m.recs[dr].clone();
        m.recs.push(copy);
        add(
            &format!("record {dr} duplicated at the end (same pages twice)"),
            m.assemble(),
            ex_msg(CORRUPT, "more than once"),
            ex_msg(CORRUPT, "more than once"),
        );
    }
    {
        // Two records start at the same page; the page range of the other is left missing.
        let mut m = m0.clone();
        let other = (zr + 1..m.recs.len())
            .chain(0..zr)
            .find(|&j| m.recs[j].kind == 0)
            .expect("a second zero run");
        m.recs[other].first_page = m.recs[zr].first_page;
        add(
            &format!("zero run {other} moved onto zero run {zr}'s first page"),
            m.assemble(),
            ex(CORRUPT),
            ex(CORRUPT),
        );
    }
    {
        let k = (1..m0.recs.len())
            .find(|&j| m0.recs[j].first_page > 0)
            .expect("record");
        let mut m = m0.clone();
        m.recs[k].first_page -= 1;
        add(
            &format!("record {k} shifted down one page (overlap + a missing page)"),
            m.assemble(),
            ex(CORRUPT),
            ex(CORRUPT),
        );
    }
    for (fp, label) in [
        (guest_end, "just past guest memory"),
        (region0_end, "in the gap between the regions"),
        (REGIONS[1].0 / PS - 1, "just below region 1"),
        (u64::MAX, "u64::MAX"),
        (u64::MAX - 1, "u64::MAX - 1"),
        (1 << 52, "2^52 (gpa wraps to 0)"),
        ((1 << 52) + 7, "2^52 + 7 (gpa wraps into region 0)"),
        (region0_end - 1, "straddling the end of region 0"),
        (guest_end - 1, "straddling the end of guest memory"),
    ] {
        for (k, kind) in [(zr, "zero run"), (dr, "data record")] {
            let mut m = m0.clone();
            m.recs[k].first_page = fp;
            if fp == region0_end - 1 || fp == guest_end - 1 {
                // Make sure it straddles: at least 2 pages (zero runs are >= 2).
                if m.recs[k].page_count < 2 {
                    continue;
                }
            }
            add(
                &format!("{kind} {k} first_page {label} (consistent)"),
                m.assemble(),
                ex(CORRUPT),
                ex(CORRUPT),
            );
        }
    }
    {
        let mut m = m0.clone();
        m.recs.remove(dr);
        add(
            &format!("record {dr} removed (pages missing, index consistent)"),
            m.assemble(),
            ex_msg(CORRUPT, "missing"),
            ex_msg(CORRUPT, "missing"),
        );
        let mut m = m0.clone();
        m.recs[zr].page_count -= 1;
        add(
            &format!("zero run {zr} one page short (consistent)"),
            m.assemble(),
            ex_msg(CORRUPT, "missing"),
            ex_msg(CORRUPT, "missing"),
        );
    }

    // --- Trailer index and totals ---------------------------------------------------------
    for (off, label) in [
        (u64::MAX, "u64::MAX"),
        (s.len + 4096, "past the end of the file"),
        (s.trailer_at, "at the trailer"),
        (0, "at offset 0"),
    ] {
        let bytes = m0.assemble_with(|t| t.index[dr].offset = off);
        add(
            &format!("index entry {dr} offset {label}"),
            bytes,
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
    }
    {
        let bytes = m0.assemble_with(|t| {
            let mut e = t.index[last];
            e.offset = u64::MAX / 2;
            e.first_page = guest_end + 10;
            t.index.push(e);
            t.totals[3] += 1;
        });
        add(
            "extra index entry pointing past the end (count consistent)",
            bytes,
            ex(CORRUPT),
            ex(CORRUPT),
        );
        let bytes = m0.assemble_with(|t| {
            t.index.pop();
            t.totals[3] -= 1;
        });
        add(
            "last index entry missing (count consistent)",
            bytes,
            ex_rec(CORRUPT, last),
            ex(CORRUPT),
        );
        for (n, label) in [(u64::MAX, "u64::MAX"), (1 << 40, "2^40")] {
            let bytes = m0.assemble_with(|t| t.totals[3] = n);
            add(
                &format!("trailer record count {label}"),
                bytes,
                ex(CORRUPT),
                ex(CORRUPT),
            );
        }
        let bytes = m0.assemble_with(|t| t.index[dr].tail = [7, 0, 0, 0]);
        add("index entry kind 7", bytes, ex(CORRUPT), ex(CORRUPT));
        let bytes = m0.assemble_with(|t| t.index[dr].tail[3] = 1);
        add("index entry pad byte set", bytes, ex(CORRUPT), ex(CORRUPT));
        let bytes = m0.assemble_with(|t| t.index[dr].tail[0] ^= 1);
        add(
            &format!("index entry {dr} kind disagrees with record"),
            bytes,
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
        let bytes = m0.assemble_with(|t| t.index.swap(dr, zr));
        add(
            &format!("index entries {dr} and {zr} swapped"),
            bytes,
            ex(CORRUPT),
            ex(CORRUPT),
        );
        for (i, label) in [
            (0, "pages"),
            (1, "zero_pages"),
            (2, "data_pages"),
            (4, "raw_bytes"),
            (5, "stored_bytes"),
        ] {
            // `load_into` returns these totals: it must not hand back numbers it never checked
            // (pages..raw_bytes follow from the index; stored_bytes from the records read).
            let bytes = m0.assemble_with(|t| t.totals[i] += 1);
            add(
                &format!("trailer totals: {label} + 1"),
                bytes,
                ex_msg(CORRUPT, "totals"),
                ex(CORRUPT),
            );
        }
    }

    // --- Footer -----------------------------------------------------------------------------
    {
        let tlen = footer_at - s.trailer_at;
        for (off, len, label, kinds) in [
            (u64::MAX, tlen, "trailer_offset u64::MAX", INCOMPLETE),
            (s.trailer_at, u64::MAX, "trailer_len u64::MAX", INCOMPLETE),
            (s.len + 10, tlen, "trailer past the end", INCOMPLETE),
            (
                s.trailer_at,
                TRAILER_FIXED_LEN as u64 - 1,
                "trailer_len below minimum",
                INCOMPLETE,
            ),
            (0, footer_at, "trailer = whole file from 0", CORRUPT),
            (
                s.records_start,
                footer_at - s.records_start,
                "trailer starts at record 0",
                CORRUPT,
            ),
            (
                s.trailer_at + 4,
                tlen - 4,
                "trailer starts 4 bytes late",
                CORRUPT,
            ),
            (
                s.header_len - 8,
                footer_at - s.header_len + 8,
                "trailer inside the header",
                CORRUPT,
            ),
        ] {
            let mut bytes = b.bytes.clone();
            set_footer(&mut bytes, off, len);
            add(
                &format!("footer (valid crc): {label}"),
                bytes,
                ex(kinds),
                ex(kinds),
            );
        }
        let mut two = b.bytes.clone();
        two.extend_from_slice(&b.bytes);
        add(
            "two snapshots concatenated",
            two,
            ex(INCOMPLETE_OR_CORRUPT),
            ex(INCOMPLETE_OR_CORRUPT),
        );
    }

    // --- Machine state ----------------------------------------------------------------------
    {
        let room = s.trailer_at - s.header_len - 16;
        for (len, label) in [
            (u64::MAX, "u64::MAX"),
            (u64::MAX - 15, "u64::MAX - 15"),
            (1 << 62, "2^62"),
            (room + 1, "one past the trailer"),
        ] {
            let mut m = m0.clone();
            m.state_len = Some(len);
            add(
                &format!("machine state length {label}"),
                m.assemble(),
                ex(CORRUPT),
                ex(CORRUPT),
            );
        }
        // Shrink the blob (crc recomputed over the shorter blob); the rest becomes junk where
        // record 0 should start.
        let mut m = m0.clone();
        let cut = m.state.len() - 100;
        m.gap = m.state.split_off(cut);
        add(
            "machine state 100 bytes shorter (crc recomputed), junk before record 0",
            m.assemble(),
            ex_rec(CORRUPT, 0),
            ex_rec(CORRUPT, 0),
        );
        // Grow the blob over record 0 (crc recomputed); the index still lists record 0.
        let mut m = m0.clone();
        let r0 = m.recs[0].clone();
        let mut swallowed = Vec::new();
        r0.encode_into(&mut swallowed);
        let r0_entry = Entry {
            offset: 0, // patched below
            first_page: r0.first_page,
            page_count: r0.page_count,
            tail: [r0.kind, 0, 0, 0],
        };
        m.state.extend_from_slice(&swallowed);
        m.recs.remove(0);
        let at = s.recs[0].0;
        let bytes = m.assemble_with(|t| {
            t.index.insert(
                0,
                Entry {
                    offset: at,
                    ..r0_entry
                },
            );
            t.totals[3] += 1;
        });
        add(
            "machine state swallows record 0 (crc recomputed, index still lists it)",
            bytes,
            ex_rec(CORRUPT, 0),
            ex_rec(CORRUPT, 0),
        );
    }

    // --- Header -----------------------------------------------------------------------------
    {
        let hdr = |f: &dyn Fn(&mut Hdr)| {
            let mut m = m0.clone();
            f(&mut m.hdr);
            m.assemble()
        };
        for (n, label) in [
            (u32::MAX, "u32::MAX"),
            (MAX_REGIONS + 1, "MAX_REGIONS + 1"),
            (MAX_REGIONS, "MAX_REGIONS (more than the bytes)"),
            (1000, "1000"),
            (3, "3"),
            (1, "1 (fewer than encoded)"),
            (0, "0"),
        ] {
            add(
                &format!("header region count {label} (crc recomputed)"),
                hdr(&|h| h.region_count = Some(n)),
                ex(CORRUPT),
                ex(CORRUPT),
            );
        }
        add(
            "header: 1024 regions of 1 GiB (1 TiB, the maximum; bitmap bounded)",
            hdr(&|h| h.regions = (0..1024u64).map(|i| (i << 30, 1 << 30)).collect()),
            ex_msg(CORRUPT, "missing"),
            ex(CORRUPT_OR_MISMATCH),
        );
        add(
            "header: one region of 1 TiB",
            hdr(&|h| h.regions = vec![(0, MAX_GUEST_BYTES)]),
            ex_msg(CORRUPT, "missing"),
            ex(CORRUPT_OR_MISMATCH),
        );
        add(
            "header: regions totalling 2 TiB",
            hdr(&|h| h.regions = vec![(0, 1 << 40), (1 << 41, 1 << 40)]),
            ex(UNSUPPORTED),
            ex(UNSUPPORTED),
        );
        add(
            "header: region size 2^64 - 4096",
            hdr(&|h| h.regions = vec![(0, !4095)]),
            ex(&[ErrorKind::Unsupported, ErrorKind::Corrupt]),
            ex(&[ErrorKind::Unsupported, ErrorKind::Corrupt]),
        );
        add(
            "header: region end overflows",
            hdr(&|h| h.regions[1] = (!4095, 8192)),
            ex(CORRUPT),
            ex(CORRUPT),
        );
        add(
            "header: regions unsorted",
            hdr(&|h| h.regions.swap(0, 1)),
            ex(CORRUPT),
            ex(CORRUPT),
        );
        add(
            "header: regions overlap",
            hdr(&|h| h.regions[1].0 = 4096),
            ex(CORRUPT),
            ex(CORRUPT),
        );
        add(
            "header: region of size 0",
            hdr(&|h| h.regions[1].1 = 0),
            ex(CORRUPT),
            ex(CORRUPT),
        );
        add(
            "header: region size not page aligned",
            hdr(&|h| h.regions[1].1 += 1),
            ex(CORRUPT),
            ex(CORRUPT),
        );
        add(
            "header: region 1 smaller (records past its end)",
            hdr(&|h| h.regions[1].1 -= 1 << 20),
            ex(CORRUPT),
            ex(CORRUPT_OR_MISMATCH),
        );
        for (n, label) in [
            (u32::MAX, "u32::MAX"),
            (MAX_HEADER_LEN + 1, "MAX_HEADER_LEN + 1"),
            (55, "55"),
            (0, "0"),
            ((s.header_len + 4) as u32, "+4"),
            ((s.header_len - 4) as u32, "-4"),
        ] {
            add(
                &format!("header_len {label} (crc recomputed)"),
                hdr(&|h| h.header_len = Some(n)),
                ex(CORRUPT),
                ex(CORRUPT),
            );
        }
        for (n, label) in [(u32::MAX, "u32::MAX"), (1 << 24, "2^24"), (0, "0")] {
            if n as usize != m0.hdr.config.len() {
                add(
                    &format!("config length {label} (crc recomputed)"),
                    hdr(&|h| h.config_len = Some(n)),
                    ex(CORRUPT),
                    ex(CORRUPT),
                );
            }
            if n as usize != m0.hdr.parent.len() {
                add(
                    &format!("parent length {label} (crc recomputed)"),
                    hdr(&|h| h.parent_len = Some(n)),
                    ex(CORRUPT),
                    ex(CORRUPT),
                );
            }
        }
        for (ver, label) in [
            (FORMAT_VERSION + 1, "newer format version"),
            (u32::MAX, "format version u32::MAX"),
            (0, "format version 0"),
        ] {
            add(
                &format!("{label} (crc recomputed)"),
                hdr(&|h| h.version = ver),
                ex_msg(UNSUPPORTED, "version"),
                ex_msg(UNSUPPORTED, "version"),
            );
        }
        for arch in [2, 0, 0xaa64] {
            add(
                &format!("architecture code {arch} (crc recomputed)"),
                hdr(&|h| h.arch = arch),
                ex_msg(UNSUPPORTED, "architecture"),
                ex_msg(UNSUPPORTED, "architecture"),
            );
        }
        for (ps, kinds) in [
            (0, UNSUPPORTED),
            (4095, UNSUPPORTED),
            (4 << 20, UNSUPPORTED),
            (8192, CORRUPT),
            (2 << 20, CORRUPT),
        ] {
            add(
                &format!("page size {ps} (crc recomputed)"),
                hdr(&|h| h.page_size = ps),
                ex(kinds),
                ex(kinds),
            );
        }
        add(
            "compression code 7",
            hdr(&|h| h.codec = 7),
            ex(UNSUPPORTED),
            ex(UNSUPPORTED),
        );
        add(
            "unknown header flag",
            hdr(&|h| h.flags |= 2),
            ex(UNSUPPORTED),
            ex(UNSUPPORTED),
        );
        add(
            "parent flag disagrees with parent reference",
            hdr(&|h| h.flags ^= 1),
            ex(CORRUPT),
            ex(CORRUPT),
        );
    }

    // --- Record headers and payloads (crc recomputed) ---------------------------------------
    {
        let rec = |k: usize, f: &dyn Fn(&mut Rec)| {
            let mut m = m0.clone();
            f(&mut m.recs[k]);
            m.assemble()
        };
        add(
            "record reserved field 1",
            rec(dr, &|r| r.reserved = 1),
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
        let mut m = m0.clone();
        m.recs[dr].kind = 2;
        add(
            "record kind 2 (index still says data)",
            m.assemble_with(|t| t.index[dr].tail[0] = 1),
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
        add(
            "record kind 2 (index says kind 2 too)",
            m.assemble(),
            ex(CORRUPT),
            ex(CORRUPT),
        );
        add(
            "record codec 2",
            rec(dr, &|r| r.codec = 2),
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
        add(
            "zero run with codec zstd",
            rec(zr, &|r| r.codec = 1),
            ex_rec(CORRUPT, zr),
            ex_rec(CORRUPT, zr),
        );
        add(
            "zero run carrying a 4 KiB payload",
            rec(zr, &|r| r.payload = vec![0; 4096]),
            ex_rec(CORRUPT, zr),
            ex_rec(CORRUPT, zr),
        );
        add(
            "raw data record one byte short",
            rec(dr, &|r| {
                r.payload.pop();
            }),
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
        add(
            "raw data record with an empty payload",
            rec(dr, &|r| r.payload.clear()),
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
        add(
            "raw data record relabelled zstd (not a frame)",
            rec(dr, &|r| r.codec = 1),
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
        add(
            "data record relabelled zero run (payload kept)",
            rec(dr, &|r| r.kind = 0),
            ex_rec(CORRUPT, dr),
            ex(CORRUPT),
        );
        for (n, label) in [
            (u32::MAX, "u32::MAX"),
            (
                (s.trailer_at - s.recs[dr].0) as u32,
                "runs into the trailer",
            ),
        ] {
            add(
                &format!("record stored_len {label} (crc over header + real payload)"),
                rec(dr, &|r| r.stored_len = Some(n)),
                ex_rec(CORRUPT, dr),
                ex_rec(CORRUPT, dr),
            );
        }
        // stored_len one shorter with the crc the reader will compute: the payload reads fine,
        // then the next record starts one byte early.
        add(
            "record stored_len - 1 with matching crc",
            rec(dr, &|r| {
                let last = r.payload.pop().expect("payload");
                r.crc = Some(r.honest_crc());
                r.stored_len = Some(r.payload.len() as u32);
                r.payload.push(last);
            }),
            ex(CORRUPT),
            ex(CORRUPT),
        );
        // zstd frames that decompress to the wrong size.
        let bomb = zstd_zeros(256 << 20);
        add(
            "zstd bomb: 256 MiB of zeros in a 1-page record",
            rec(dr, &|r| {
                r.codec = 1;
                r.payload = bomb.clone();
                r.page_count = 1;
            }),
            ex_rec(CORRUPT, dr),
            ex(CORRUPT),
        );
        let maxed = zstd_zeros(MAX_RECORD_RAW);
        add(
            "zstd record of MAX_RECORD_RAW zeros (decompresses, overlaps)",
            rec(dr, &|r| {
                r.codec = 1;
                r.payload = maxed.clone();
                r.page_count = (MAX_RECORD_RAW / ps) as u32;
            }),
            ex_rec(CORRUPT, dr),
            ex(CORRUPT),
        );
        let raw_len = (u64::from(m0.recs[dr].page_count) * ps) as usize;
        let short = zstd::bulk::compress(&vec![0x5a; raw_len.saturating_sub(4096).max(1)], 3)
            .expect("compress");
        add(
            "zstd frame one page short",
            rec(dr, &|r| {
                r.codec = 1;
                r.payload = short.clone();
            }),
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
        let long = zstd::bulk::compress(&vec![0x5a; raw_len + 1], 3).expect("compress");
        add(
            "zstd frame one byte long",
            rec(dr, &|r| {
                r.codec = 1;
                r.payload = long.clone();
            }),
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
        if let Some(dz) = m0.recs.iter().position(|r| r.kind == 1 && r.codec == 1) {
            add(
                &format!("zstd record {dz} truncated frame (crc recomputed)"),
                rec(dz, &|r| {
                    r.payload.truncate(r.payload.len() / 2);
                }),
                ex_rec(CORRUPT, dz),
                ex_rec(CORRUPT, dz),
            );
            add(
                &format!("zstd record {dz} page_count + 1 (consistent)"),
                rec(dz, &|r| r.page_count += 1),
                ex(CORRUPT),
                ex(CORRUPT),
            );
            add(
                &format!("zstd record {dz} relabelled raw"),
                rec(dz, &|r| r.codec = 0),
                ex_rec(CORRUPT, dz),
                ex_rec(CORRUPT, dz),
            );
        }
    }
}

/// Valid re-encodings that must be accepted (the lies above fail because of the lie).
fn controls(b: &Base) -> Vec<(String, Vec<u8>)> {
    let m0 = &b.model;
    let mut v = Vec::new();
    let mut m = m0.clone();
    let n = m.recs.len();
    m.recs.swap(0, n - 1);
    m.recs.swap(1, n / 2);
    v.push((format!("{}: records reordered", b.name), m.assemble()));
    let mut m = m0.clone();
    let zr = m
        .recs
        .iter()
        .position(|r| r.kind == 0 && r.page_count >= 2)
        .expect("zero run");
    let mut second = m.recs[zr].clone();
    m.recs[zr].page_count = 1;
    second.first_page += 1;
    second.page_count -= 1;
    m.recs.push(second);
    v.push((format!("{}: a zero run split in two", b.name), m.assemble()));
    v
}

fn run_lies(bases: &[Base], source: &GuestMemoryMmap, dir: &Path, stats: &mut Stats) -> usize {
    let path = dir.join("lie.snap");
    let mut n = 0;
    for b in bases {
        for (what, bytes) in controls(b) {
            fs::write(&path, &bytes).expect("write control");
            let o = try_verify(&path);
            assert!(
                matches!(o, Outcome::Accepted),
                "control {what}: verify {o:?}"
            );
            let mut loaded = None;
            let o = try_load(&path, Some(&mut loaded));
            assert!(matches!(o, Outcome::Accepted), "control {what}: load {o:?}");
            let mem = loaded.expect("loaded memory");
            assert!(same_memory(source, &mem), "control {what}: memory differs");
        }
        lies(b, &mut |lie| {
            n += 1;
            stats.files += 1;
            fs::write(&path, &lie.bytes).expect("write lie");
            *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = vec![lie.what.clone()];
            let t0 = Instant::now();
            for (label, expect) in [("verify", &lie.verify), ("load_into", &lie.load)] {
                let o = if label == "verify" {
                    try_verify(&path)
                } else {
                    try_load(&path, None)
                };
                stats.check(&lie.what, label, &o, expect);
            }
            if let Outcome::Panic(m) = try_records(&path) {
                stats.panics += 1;
                stats
                    .failures
                    .push(format!("{} [records]: PANIC: {m}", lie.what));
            }
            stats.timed(&lie.what, t0);
        });
    }
    let _ = fs::remove_file(&path);
    n
}

// ---------------------------------------------------------------------------------------------
// Machine states that pass the crc but not restore's decoding
// ---------------------------------------------------------------------------------------------

/// A damaged (real) machine state, stored with a valid crc: the component (and vCPU state)
/// that restore's decoding must name when it refuses it.
struct StateLie {
    what: &'static str,
    component: &'static str,
    vcpu: Option<usize>,
    edit: fn(&mut serde_json::Value),
}

fn cut(v: &mut serde_json::Value, n: usize) {
    v.as_array_mut().expect("array").truncate(n);
}

/// Grow a list to `n` entries, repeating its first.
fn grow(v: &mut serde_json::Value, n: usize) {
    let a = v.as_array_mut().expect("array");
    let first = a[0].clone();
    a.resize(n, first);
}

fn state_lies() -> Vec<StateLie> {
    let l = |what, component, vcpu, edit| StateLie {
        what,
        component,
        vcpu,
        edit,
    };
    vec![
        l("regs cut to 7 bytes", "regs", Some(1), |v| {
            cut(&mut v["vcpus"][1]["regs"], 7)
        }),
        l("sregs cut to 7 bytes", "sregs", Some(1), |v| {
            cut(&mut v["vcpus"][1]["sregs"], 7)
        }),
        l("xsave cut to 7 bytes", "xsave", Some(0), |v| {
            cut(&mut v["vcpus"][0]["xsave"], 7)
        }),
        l("xcrs cut to 7 bytes", "xcrs", Some(0), |v| {
            cut(&mut v["vcpus"][0]["xcrs"], 7)
        }),
        l("lapic cut to 7 bytes", "lapic", Some(1), |v| {
            cut(&mut v["vcpus"][1]["lapic"], 7)
        }),
        l("events cut to 7 bytes", "events", Some(0), |v| {
            cut(&mut v["vcpus"][0]["events"], 7)
        }),
        l("debugregs cut to 7 bytes", "debugregs", Some(1), |v| {
            cut(&mut v["vcpus"][1]["debugregs"], 7)
        }),
        l(
            "mp_state cut to 3 of its 4 bytes",
            "mp_state",
            Some(0),
            |v| cut(&mut v["vcpus"][0]["mp_state"], 3),
        ),
        l("mp_state of 7 bytes", "mp_state", Some(1), |v| {
            grow(&mut v["vcpus"][1]["mp_state"], 7)
        }),
        l("regs one byte too long", "regs", Some(0), |v| {
            v["vcpus"][0]["regs"]
                .as_array_mut()
                .expect("array")
                .push(0.into())
        }),
        l("cpuid empty", "cpuid", Some(1), |v| {
            cut(&mut v["vcpus"][1]["cpuid"], 0)
        }),
        l("cpuid entry cut to 39 bytes", "cpuid", Some(0), |v| {
            cut(&mut v["vcpus"][0]["cpuid"][0], 39)
        }),
        l("cpuid of 257 entries", "cpuid", Some(0), |v| {
            grow(&mut v["vcpus"][0]["cpuid"], 257)
        }),
        l("MSR list of 1025 entries", "msrs", Some(1), |v| {
            grow(&mut v["vcpus"][1]["msrs"], 1025)
        }),
        l("MSR entry cut to 7 bytes", "msrs", Some(0), |v| {
            cut(&mut v["vcpus"][0]["msrs"][0], 7)
        }),
        l("nr_xcrs 17", "xcrs", Some(1), |v| {
            v["vcpus"][1]["xcrs"][0] = 17.into()
        }),
        l("duplicate vCPU id", "id", Some(1), |v| {
            v["vcpus"][1]["id"] = 0.into()
        }),
        l("vCPU id out of range", "id", Some(1), |v| {
            v["vcpus"][1]["id"] = 2.into()
        }),
        l("vCPU id 300", "id", Some(0), |v| {
            v["vcpus"][0]["id"] = 300.into()
        }),
        l("vCPU states swapped", "id", Some(0), |v| {
            v["vcpus"].as_array_mut().expect("array").swap(0, 1)
        }),
        l("one vCPU state missing", "vcpus", None, |v| {
            cut(&mut v["vcpus"], 1)
        }),
        l("config says 3 vCPUs", "vcpus", None, |v| {
            v["config"]["vcpus"] = 3.into()
        }),
        l("config says 0 vCPUs, no states", "config", None, |v| {
            v["config"]["vcpus"] = 0.into();
            cut(&mut v["vcpus"], 0);
        }),
        l("pic_master cut to 7 bytes", "pic_master", None, |v| {
            cut(&mut v["pic_master"], 7)
        }),
        l(
            "ioapic with the PIC master's chip id",
            "ioapic",
            None,
            |v| v["ioapic"][0] = 0.into(),
        ),
        l("pit cut to 7 bytes", "pit", None, |v| cut(&mut v["pit"], 7)),
        l("clock cut to 7 bytes", "clock", None, |v| {
            cut(&mut v["clock"], 7)
        }),
        l("one guest slot for 2 vCPUs", "slots", None, |v| {
            cut(&mut v["slots"], 1)
        }),
        l("serial FIFO of 65 bytes", "serial", None, |v| {
            v["serial"]["in_buffer"] = vec![0u8; 65].into()
        }),
    ]
}

/// How the machine state of the file at `path` decodes: through restore's path
/// (`vm_snapshot::machine_state` on the opened reader: a refusal is a `FormatError`) and
/// through `MachineState::from_bytes` directly (the typed error restore's message comes from).
/// Panics are caught and reported.
type StateDecoding = (Result<(), FormatError>, Result<(), VmError>);

fn try_decode_state(path: &Path) -> Result<Result<StateDecoding, FormatError>, String> {
    panic::catch_unwind(|| {
        let r = SnapshotReader::open(path)?;
        Ok((
            vm_snapshot::machine_state(&r).map(drop),
            MachineState::from_bytes(r.machine_state()).map(drop),
        ))
    })
    .map_err(|p| panic_text(&*p))
}

/// Every [`state_lies`] file is sound as a file (open and verify accept it) and refused by the
/// state decoding with the component named; byte flips of the state (crc recomputed) never
/// make the decoding panic. Returns (lies, flips).
fn run_state_lies(b: &Base, dir: &Path, stats: &mut Stats) -> (usize, usize) {
    let path = dir.join("state-lie.snap");
    let good: serde_json::Value = serde_json::from_slice(&b.model.state).expect("state json");
    let lies = state_lies();
    for lie in &lies {
        let what = format!("{}: machine state {}", b.name, lie.what);
        *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = vec![what.clone()];
        let mut v = good.clone();
        (lie.edit)(&mut v);
        let mut m = b.model.clone();
        m.state = serde_json::to_vec(&v).expect("json");
        fs::write(&path, m.assemble()).expect("write state lie");
        stats.files += 1;
        stats.attempts += 1;
        if let o @ (Outcome::Err { .. } | Outcome::Panic(_)) = try_verify(&path) {
            stats
                .failures
                .push(format!("{what}: the file itself was refused: {o:?}"));
            continue;
        }
        match try_decode_state(&path) {
            Err(p) => {
                stats.panics += 1;
                stats.failures.push(format!("{what}: PANIC: {p}"));
            }
            Ok(Err(e)) => stats.failures.push(format!("{what}: open failed: {e}")),
            Ok(Ok((restore, typed))) => {
                *stats.by_kind.entry("StateComponent".into()).or_default() += 1;
                match restore {
                    Ok(()) => {
                        stats.accepted += 1;
                        stats
                            .failures
                            .push(format!("{what}: restore's decoding accepted it"));
                    }
                    Err(e)
                        if e.kind() != ErrorKind::Corrupt
                            || !e.to_string().contains(lie.component) =>
                    {
                        stats.failures.push(format!(
                            "{what}: restore refused it as {e:?}, expected Corrupt naming {}",
                            lie.component
                        ));
                    }
                    Err(_) => {}
                }
                let named = matches!(&typed, Err(VmError::StateComponent { component, vcpu, .. })
                    if *component == lie.component && *vcpu == lie.vcpu);
                if !named {
                    stats.failures.push(format!(
                        "{what}: from_bytes gave {typed:?}, expected component {} of {:?}",
                        lie.component, lie.vcpu
                    ));
                }
            }
        }
    }
    let _ = fs::remove_file(&path);
    // Flips through the whole blob, decoded as restore would get them (crc recomputed: the
    // reader hands over exactly these bytes).
    let blob = &b.model.state;
    let step = (blob.len() / (2000 / THIN as usize)).max(1);
    let mut flips = 0;
    for (n, at) in (0..blob.len()).step_by(step).enumerate() {
        let mut bad = blob.clone();
        bad[at] ^= FLIP_MASKS[n % FLIP_MASKS.len()];
        flips += 1;
        if let Err(p) = panic::catch_unwind(|| MachineState::from_bytes(&bad).map(drop)) {
            stats.panics += 1;
            stats.failures.push(format!(
                "{}: machine state byte {at} flipped: decoding PANIC: {}",
                b.name,
                panic_text(&*p)
            ));
        }
    }
    (lies.len(), flips)
}

// ---------------------------------------------------------------------------------------------
// Foreign and tiny files
// ---------------------------------------------------------------------------------------------

fn foreign_files(dir: &Path, stats: &mut Stats) {
    let path = dir.join("foreign.snap");
    let mut noise = vec![0u8; 1 << 20];
    Rng(42).fill(&mut noise);
    let cases: [(&str, Vec<u8>, &'static [ErrorKind]); 6] = [
        ("empty file", Vec::new(), SHORT),
        (
            "text file",
            b"hello, this is not a snapshot\n".to_vec(),
            NOT_A_SNAPSHOT,
        ),
        ("1 MiB of noise", noise, NOT_A_SNAPSHOT),
        ("the magic alone", b"SNAPCTL\0".to_vec(), INCOMPLETE),
        ("7 bytes of magic", b"SNAPCTL".to_vec(), SHORT),
        (
            "an ELF header",
            b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".repeat(8),
            NOT_A_SNAPSHOT,
        ),
    ];
    for (what, bytes, kinds) in cases {
        fs::write(&path, &bytes).expect("write");
        stats.files += 1;
        let what = format!("foreign: {what}");
        let o = try_verify(&path);
        stats.check(&what, "verify", &o, &ex(kinds));
        let o = try_load(&path, None);
        stats.check(&what, "load_into", &o, &ex(kinds));
    }
    let o = try_verify(&dir.join("does-not-exist.snap"));
    stats.check("missing file", "verify", &o, &ex(&[ErrorKind::Unreadable]));
    let _ = fs::remove_file(&path);
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// Run `f` on its own thread; fail (naming what was running) if it takes longer than `limit`.
fn with_deadline(limit: Duration, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => h.join().expect("sweep thread"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = h.join() {
                panic::resume_unwind(p);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let now = CURRENT.lock().unwrap_or_else(|p| p.into_inner()).clone();
            panic!("mutation sweep hung (> {limit:?}); running: {now:#?}");
        }
    }
}

#[test]
fn bad_snapshot_files_are_refused_with_typed_errors() {
    with_deadline(Duration::from_secs(300), sweep);
}

fn sweep() {
    // A real VM first, outside the address-space limit (guest memory, vCPU threads).
    let state = machine_state_blob();
    assert!(MachineState::from_bytes(&state).is_ok(), "captured state");
    limit_address_space();
    let t_start = Instant::now();
    // Keep the first few panic reports (with location) and silence the rest.
    let reported = AtomicUsize::new(0);
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if reported.fetch_add(1, Ordering::Relaxed) < 5 {
            default_hook(info);
        }
    }));

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("mutation-sweep-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp dir");

    let source = new_mem();
    fill_guest(&source);
    let mut bases = Vec::new();
    for (name, compression, parent) in [
        ("raw", Compression::None, &b""[..]),
        ("zstd", Compression::Zstd { level: 3 }, &b"parent.snap"[..]),
    ] {
        let bytes = write_snapshot(
            &source,
            &dir.join(format!("{name}.snap")),
            compression,
            parent,
        );
        let (model, spans) = Model::parse(&bytes);
        assert!(
            model.assemble() == bytes,
            "{name}: the test's encoder does not reproduce the writer's file"
        );
        // The reader agrees with the test's view of the file.
        let path = dir.join(format!("{name}.snap"));
        let mut r = SnapshotReader::open(&path).expect("open good file");
        let offsets: Vec<u64> = r.trailer().index.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, spans.recs.iter().map(|x| x.0).collect::<Vec<_>>());
        assert_eq!(r.machine_state(), &machine_state_blob()[..]);
        let report = r.verify(&mut |_| {}).expect("verify good file");
        assert_eq!(report.guest_pages, guest_pages());
        let mem = new_mem();
        SnapshotReader::open(&path)
            .expect("open")
            .load_into(&mem, &mut |_| {})
            .expect("load good file");
        assert!(same_memory(&source, &mem), "{name}: loaded memory differs");
        let zstd_records = model.recs.iter().filter(|r| r.codec == 1).count();
        let zero_runs = model.recs.iter().filter(|r| r.kind == 0).count();
        eprintln!(
            "base {name}: {} bytes, header {} B, machine state {} B, {} records ({} zero runs, {} zstd), trailer {} B",
            bytes.len(),
            spans.header_len,
            model.state.len(),
            model.recs.len(),
            zero_runs,
            zstd_records,
            spans.footer_at - spans.trailer_at
        );
        bases.push(Base {
            name,
            bytes,
            model,
            spans,
        });
    }
    let setup = t_start.elapsed();

    let mut counts = BTreeMap::new();
    let cases: Vec<Case> = bases
        .iter()
        .enumerate()
        .flat_map(|(k, b)| sweep_cases(k, b, &mut counts))
        .collect();
    let t_sweep = Instant::now();
    let mut stats = run_sweep(&bases, &cases, &dir);
    let sweep_time = t_sweep.elapsed();

    let t_lies = Instant::now();
    let nlies = run_lies(&bases, &source, &dir, &mut stats);
    foreign_files(&dir, &mut stats);
    let lies_time = t_lies.elapsed();
    let t_state = Instant::now();
    let (state_lies, state_flips) = run_state_lies(&bases[0], &dir, &mut stats);
    let state_time = t_state.elapsed();
    let _ = fs::remove_dir_all(&dir);

    let hwm = vm_hwm_kib();
    eprintln!(
        "mutation sweep ({}):",
        if THIN > 1 {
            "thinned, debug build"
        } else {
            "full"
        }
    );
    for (k, v) in &counts {
        eprintln!("  {k:>16}: {v}");
    }
    eprintln!("  {:>16}: {nlies}", "crafted lies");
    eprintln!(
        "  {:>16}: {state_lies} refused by name, {state_flips} byte flips decoded ({state_time:.1?})",
        "state decoding"
    );
    eprintln!(
        "  files mutated {}, attempts {} (verify + load_into each), panics {}, accepted {}",
        stats.files, stats.attempts, stats.panics, stats.accepted
    );
    eprintln!("  errors by kind: {:?}", stats.by_kind);
    eprintln!("  errors by stage: {:?}", stats.by_stage);
    eprintln!(
        "  time: setup {setup:.1?}, sweep {sweep_time:.1?} ({} cases), lies {lies_time:.1?}; slowest file {:.1?} ({})",
        cases.len(),
        stats.slowest.0,
        stats.slowest.1
    );
    eprintln!(
        "  memory: VmHWM {} MiB (address space limited to {} MiB)",
        hwm >> 10,
        ADDRESS_SPACE_LIMIT >> 20
    );
    for f in stats.failures.iter().take(40) {
        eprintln!("  FAIL {f}");
    }
    if stats.failures.len() > 40 {
        eprintln!("  ... and {} more", stats.failures.len() - 40);
    }

    assert_eq!(stats.panics, 0, "the reader panicked");
    assert!(
        stats.failures.is_empty(),
        "{} damaged files were not refused as expected (first: {})",
        stats.failures.len(),
        stats.failures[0]
    );
    assert!(hwm <= MAX_HWM_KIB, "peak RSS {hwm} KiB");
    assert!(
        stats.slowest.0 < Duration::from_secs(10),
        "one damaged file took {:?}: {}",
        stats.slowest.0,
        stats.slowest.1
    );
}
