//! Snapshot file format: round trips, corruption, truncation, coverage and bounds.

#![forbid(unsafe_code)]

use std::io::Cursor;

use ram_saver::{
    AtomicFileSink, Compression, ErrorKind, FormatError, MemRegion, RecordKind, SnapshotHeader,
    SnapshotReader, SnapshotWriter,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PS: usize = 4096;

/// xorshift64*: deterministic test data without extra dependencies.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn regions() -> Vec<MemRegion> {
    vec![
        MemRegion {
            gpa: 0,
            size: 96 * PS as u64,
        },
        MemRegion {
            gpa: 1 << 32,
            size: 32 * PS as u64,
        },
    ]
}

/// Guest page numbers of all pages of `regions()`.
fn all_pages() -> Vec<u64> {
    regions()
        .iter()
        .flat_map(|r| {
            let f = r.gpa / PS as u64;
            f..f + r.size / PS as u64
        })
        .collect()
}

/// Page contents: a mix of zero, random and compressible pages.
fn page_data(rng: &mut Rng, page: u64) -> Vec<u8> {
    let mut p = vec![0u8; PS];
    match page % 4 {
        0 => {}
        1 => p.iter_mut().for_each(|b| *b = rng.next() as u8),
        _ => {
            p[..8].copy_from_slice(&page.to_le_bytes());
            p[PS - 1] = 0xab;
        }
    }
    p
}

/// Build a snapshot: pages in shuffled runs of varied length; returns bytes and the oracle.
fn build(compression: Compression, seed: u64) -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
    let mut rng = Rng(seed);
    let mut header = SnapshotHeader::new(regions(), 2, br#"{"mem_mib":1}"#.to_vec());
    header.compression = compression;
    let mut file = Vec::new();
    let mut w = SnapshotWriter::new(&mut file, &header, b"machine-state-bytes").unwrap();
    let pages = all_pages();
    let oracle: Vec<(u64, Vec<u8>)> = pages.iter().map(|&p| (p, page_data(&mut rng, p))).collect();
    // Runs of consecutive pages within a region, written in a shuffled order.
    let mut runs = Vec::new();
    let mut i = 0;
    while i < oracle.len() {
        let mut n = 1 + rng.below(9) as usize;
        n = n.min(oracle.len() - i);
        // Do not cross a region boundary.
        while oracle[i + n - 1].0 - oracle[i].0 != (n - 1) as u64 {
            n -= 1;
        }
        runs.push((i, n));
        i += n;
    }
    for k in (1..runs.len()).rev() {
        runs.swap(k, rng.below(k as u64 + 1) as usize);
    }
    for (i, n) in runs {
        if n >= 3
            && oracle[i..i + n]
                .iter()
                .all(|(_, d)| d.iter().all(|&b| b == 0))
        {
            w.write_zero_run(oracle[i].0, n as u64).unwrap();
        } else {
            let data: Vec<u8> = oracle[i..i + n]
                .iter()
                .flat_map(|(_, d)| d.clone())
                .collect();
            w.write_pages(oracle[i].0, &data).unwrap();
        }
    }
    let size = w.finish().unwrap();
    assert_eq!(size, file.len() as u64);
    (file, oracle)
}

fn open(bytes: &[u8]) -> Result<SnapshotReader<Cursor<&[u8]>>, FormatError> {
    SnapshotReader::from_reader(Cursor::new(bytes))
}

fn verify(bytes: &[u8]) -> Result<ram_saver::VerifyReport, FormatError> {
    open(bytes)?.verify(&mut |_| {})
}

/// Rebuild guest pages from the records and compare with the oracle.
fn check_contents(bytes: &[u8], oracle: &[(u64, Vec<u8>)]) {
    let mut rd = open(bytes).unwrap();
    let mut got = std::collections::HashMap::new();
    for r in rd.records() {
        let r = r.unwrap();
        for k in 0..u64::from(r.page_count) {
            let page = match r.kind {
                RecordKind::ZeroRun => vec![0u8; PS],
                RecordKind::Data => r.data[k as usize * PS..(k as usize + 1) * PS].to_vec(),
                RecordKind::Parent => panic!("parent record in a standalone file"),
            };
            assert!(got.insert(r.first_page + k, page).is_none());
        }
    }
    assert_eq!(got.len(), oracle.len());
    for (p, d) in oracle {
        assert_eq!(&got[p], d, "page {p}");
    }
}

#[test]
fn round_trip_raw_and_zstd() {
    for (seed, c) in [
        (1, Compression::None),
        (2, Compression::Zstd { level: 1 }),
        (3, Compression::Zstd { level: 9 }),
    ] {
        let (bytes, oracle) = build(c, seed);
        let rd = open(&bytes).unwrap();
        assert_eq!(rd.machine_state(), b"machine-state-bytes");
        assert_eq!(rd.header().regions, regions());
        assert_eq!(rd.header().compression, c);
        assert_eq!(rd.header().vmm_config, br#"{"mem_mib":1}"#);
        let rep = verify(&bytes).unwrap();
        assert_eq!(rep.totals.pages, oracle.len() as u64);
        assert_eq!(rep.guest_pages, oracle.len() as u64);
        assert_eq!(
            rep.totals.zero_pages + rep.totals.data_pages,
            rep.totals.pages
        );
        if c != Compression::None {
            assert!(rep.totals.stored_bytes < rep.totals.raw_bytes);
        }
        check_contents(&bytes, &oracle);
    }
}

#[test]
fn flipping_any_record_byte_names_the_record() {
    for c in [Compression::None, Compression::Zstd { level: 3 }] {
        let (bytes, _) = build(c, 7);
        let index = open(&bytes).unwrap().trailer().index.clone();
        let trailer_at = bytes.len() as u64 - 32 - {
            let f = &bytes[bytes.len() - 32..];
            u64::from_le_bytes(f[8..16].try_into().unwrap())
        };
        let mut rng = Rng(99);
        for (i, e) in index.iter().enumerate() {
            let end = index.get(i + 1).map_or(trailer_at, |n| n.offset);
            let len = (end - e.offset) as usize;
            // Every header byte, the payload edges, and a sample of the payload.
            let mut offs: Vec<usize> = (0..28.min(len)).collect();
            if len > 28 {
                offs.extend([28, len - 1]);
                offs.extend((0..12).map(|_| 28 + rng.below((len - 28) as u64) as usize));
            }
            for o in offs {
                let mut b = bytes.clone();
                b[e.offset as usize + o] ^= 1 << rng.below(8);
                let err = verify(&b).expect_err("corruption not detected");
                assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
                assert_eq!(
                    err.record(),
                    Some(i as u64),
                    "byte {o} of record {i}: {err}"
                );
                if let FormatError::Corrupt { offset, .. } = err {
                    assert_eq!(offset, e.offset);
                }
            }
        }
    }
}

#[test]
fn truncation_is_incomplete_never_a_panic() {
    let (bytes, _) = build(Compression::Zstd { level: 1 }, 11);
    for len in 0..bytes.len() {
        let err = verify(&bytes[..len]).expect_err("truncated file accepted");
        assert!(
            matches!(err.kind(), ErrorKind::Incomplete | ErrorKind::Corrupt),
            "len {len}: {err}"
        );
    }
    // Trailing garbage after the footer also hides the end marker.
    let mut b = bytes.clone();
    b.extend_from_slice(&[0u8; 5]);
    assert_eq!(verify(&b).unwrap_err().kind(), ErrorKind::Incomplete);
}

#[test]
fn header_state_trailer_footer_corruption_detected() {
    let (bytes, _) = build(Compression::None, 5);
    let rd = open(&bytes).unwrap();
    let first_record = rd.trailer().index[0].offset as usize;
    drop(rd);
    let n = bytes.len();
    let trailer_at = {
        let f = &bytes[n - 32..];
        u64::from_le_bytes(f[0..8].try_into().unwrap()) as usize
    };
    // Header and machine state: everything before the first record.
    for o in 0..first_record {
        let mut b = bytes.clone();
        b[o] ^= 0x10;
        let err = verify(&b).expect_err("header/state corruption not detected");
        assert_ne!(err.kind(), ErrorKind::Unreadable, "offset {o}: {err}");
    }
    // Trailer and footer.
    for o in trailer_at..n {
        let mut b = bytes.clone();
        b[o] ^= 0x04;
        let err = verify(&b).expect_err("trailer/footer corruption not detected");
        assert!(
            matches!(err.kind(), ErrorKind::Corrupt | ErrorKind::Incomplete),
            "offset {o}: {err}"
        );
    }
    let mut b = bytes.clone();
    b[0] = b'X';
    assert_eq!(verify(&b).unwrap_err().kind(), ErrorKind::NotASnapshot);
    let mut b = bytes.clone();
    b[8] = 99;
    assert!(matches!(
        verify(&b).unwrap_err(),
        FormatError::UnsupportedVersion { found: 99, .. }
    ));
}

fn small_header() -> SnapshotHeader {
    SnapshotHeader::new(
        vec![MemRegion {
            gpa: 0x10_0000,
            size: 8 * PS as u64,
        }],
        1,
        Vec::new(),
    )
}

#[test]
fn coverage_duplicate_missing_outside() {
    let base = 0x10_0000 / PS as u64;
    let page = vec![7u8; PS];
    // Page written twice.
    let mut f = Vec::new();
    let mut w = SnapshotWriter::new(&mut f, &small_header(), b"").unwrap();
    w.write_zero_run(base, 8).unwrap();
    w.write_pages(base + 3, &page).unwrap();
    w.finish().unwrap();
    let err = verify(&f).unwrap_err();
    assert!(
        matches!(err, FormatError::Coverage { page, record: Some(1), .. } if page == base + 3),
        "{err}"
    );
    // Page missing.
    let mut f = Vec::new();
    let mut w = SnapshotWriter::new(&mut f, &small_header(), b"").unwrap();
    w.write_zero_run(base, 5).unwrap();
    w.write_pages(base + 6, &[page.clone(), page.clone()].concat())
        .unwrap();
    w.finish().unwrap();
    let err = verify(&f).unwrap_err();
    assert!(
        matches!(err, FormatError::Coverage { page, what: "is missing", .. } if page == base + 5),
        "{err}"
    );
    // Page outside guest memory.
    let mut f = Vec::new();
    let mut w = SnapshotWriter::new(&mut f, &small_header(), b"").unwrap();
    w.write_zero_run(base, 8).unwrap();
    w.write_pages(base + 8, &page).unwrap();
    w.finish().unwrap();
    let err = verify(&f).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::Coverage {
                record: Some(1),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Corrupt);
}

#[test]
fn huge_length_fields_do_not_allocate() {
    let (bytes, _) = build(Compression::None, 21);
    let rd = open(&bytes).unwrap();
    let first = rd.trailer().index[0];
    let st_at = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    drop(rd);
    // Record stored_len and page_count near their maximum.
    for field in [16usize, 20] {
        let mut b = bytes.clone();
        let at = first.offset as usize + field;
        b[at..at + 4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        let err = verify(&b).unwrap_err();
        assert_eq!(err.record(), Some(0), "{err}");
    }
    // Machine state length.
    let mut b = bytes.clone();
    b[st_at + 4..st_at + 12].copy_from_slice(&(u64::MAX - 7).to_le_bytes());
    assert_eq!(verify(&b).unwrap_err().kind(), ErrorKind::Corrupt);
    // Header length.
    let mut b = bytes.clone();
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(verify(&b).unwrap_err().kind(), ErrorKind::Corrupt);
    // Trailer length in the footer (footer crc recomputed so it looks valid).
    let mut b = bytes.clone();
    let n = b.len();
    b[n - 24..n - 16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let crc = crc32fast::hash(&b[n - 32..n - 16]);
    b[n - 16..n - 12].copy_from_slice(&crc.to_le_bytes());
    assert!(verify(&b).is_err());
    // A header claiming an absurd amount of guest memory (valid crc).
    let h = SnapshotHeader::new(
        vec![MemRegion {
            gpa: 0,
            size: 1 << 60,
        }],
        1,
        Vec::new(),
    );
    assert_eq!(
        SnapshotHeader::decode(&h.encode()).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    // A zstd frame that claims a huge decompressed size.
    let mut f = Vec::new();
    let mut hdr = small_header();
    hdr.compression = Compression::Zstd { level: 1 };
    let mut w = SnapshotWriter::new(&mut f, &hdr, b"").unwrap();
    w.write_pages(0x100, &vec![1u8; 8 * PS]).unwrap();
    w.finish().unwrap();
    assert!(verify(&f).is_ok());
}

#[test]
fn load_into_restores_and_refuses_bad_files() {
    for c in [Compression::None, Compression::Zstd { level: 3 }] {
        let (bytes, oracle) = build(c, 31);
        let ranges: Vec<(GuestAddress, usize)> = regions()
            .iter()
            .map(|r| (GuestAddress(r.gpa), r.size as usize))
            .collect();
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        // Dirty a page that the snapshot says is zero: load must clear it.
        let zero_page = oracle
            .iter()
            .find(|(_, d)| d.iter().all(|&b| b == 0))
            .unwrap()
            .0;
        mem.write_slice(&[0xffu8; 16], GuestAddress(zero_page * PS as u64))
            .unwrap();
        let totals = open(&bytes).unwrap().load_into(&mem, &mut |_| {}).unwrap();
        assert_eq!(totals.pages, oracle.len() as u64);
        let mut buf = vec![0u8; PS];
        for (p, d) in &oracle {
            mem.read_slice(&mut buf, GuestAddress(p * PS as u64))
                .unwrap();
            assert_eq!(&buf, d, "page {p}");
        }
        // Wrong layout.
        let other: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 128 * PS)]).unwrap();
        let err = open(&bytes)
            .unwrap()
            .load_into(&other, &mut |_| {})
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Mismatch);
        // A corrupt record is reported by load too.
        let mut b = bytes.clone();
        let e = open(&bytes).unwrap().trailer().index[3];
        b[e.offset as usize + 30] ^= 1;
        let err = open(&b).unwrap().load_into(&mem, &mut |_| {}).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
    }
}

#[test]
fn atomic_file_sink_round_trip() {
    let dir = std::env::temp_dir().join(format!("ram-saver-fmt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("vm.snap");
    let sink = AtomicFileSink::create(&target).unwrap();
    let tmp = sink.temp_path().to_path_buf();
    let mut w = SnapshotWriter::new(sink, &small_header(), b"state").unwrap();
    w.write_zero_run(0x100, 8).unwrap();
    assert!(tmp.exists() && !target.exists());
    w.finish().unwrap();
    assert!(!tmp.exists());
    let mut rd = SnapshotReader::open(&target).unwrap();
    rd.verify(&mut |_| {}).unwrap();
    // Dropped without finish: nothing under the user's name, no temp left.
    let target2 = dir.join("never.snap");
    let sink = AtomicFileSink::create(&target2).unwrap();
    let tmp2 = sink.temp_path().to_path_buf();
    let w = SnapshotWriter::new(sink, &small_header(), b"state").unwrap();
    drop(w);
    assert!(!tmp2.exists() && !target2.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Re-seal the trailer of `bytes` after `f` changed it (recompute its crc).
fn reseal_trailer(bytes: &mut [u8], f: impl FnOnce(&mut [u8], usize)) {
    let n = bytes.len();
    let at = u64::from_le_bytes(bytes[n - 32..n - 24].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(bytes[n - 24..n - 16].try_into().unwrap()) as usize;
    f(bytes, at);
    let crc = crc32fast::hash(&bytes[at..at + len - 4]);
    bytes[at + len - 4..at + len].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn lying_trailer_totals_are_refused_before_load() {
    let dir = std::env::temp_dir().join(format!("ram-saver-totals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ranges: Vec<(GuestAddress, usize)> = regions()
        .iter()
        .map(|r| (GuestAddress(r.gpa), r.size as usize))
        .collect();
    for c in [Compression::None, Compression::Zstd { level: 3 }] {
        let (good, oracle) = build(c, 5);
        // The good file loads through both paths (file: all cores; cursor: calling thread).
        let path = dir.join("good.snap");
        std::fs::write(&path, &good).unwrap();
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        let totals = SnapshotReader::open(&path)
            .unwrap()
            .load_into(&mem, &mut |_| {})
            .unwrap();
        assert_eq!(totals, open(&good).unwrap().trailer().totals);
        let mut buf = vec![0u8; PS];
        for (p, d) in &oracle {
            mem.read_slice(&mut buf, GuestAddress(p * PS as u64))
                .unwrap();
            assert_eq!(&buf, d, "page {p}");
        }
        let rep = SnapshotReader::open(&path)
            .unwrap()
            .verify(&mut |_| {})
            .unwrap();
        assert_eq!(rep.totals, totals);

        // Each total + 1 (records excluded: the index length must match it), crc recomputed.
        for field in [0usize, 1, 2, 4, 5] {
            let mut b = good.clone();
            reseal_trailer(&mut b, |b, at| {
                let o = at + 4 + 8 * field;
                let v = u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) + 1;
                b[o..o + 8].copy_from_slice(&v.to_le_bytes());
            });
            let err = open(&b).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt, "field {field}: {err}");
            assert!(err.to_string().contains("totals"), "field {field}: {err}");
            std::fs::write(&path, &b).unwrap();
            let err = SnapshotReader::open(&path).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt, "field {field}: {err}");
        }

        // An index entry whose kind disagrees with its record: named by record.
        let e = open(&good).unwrap().trailer().index.clone();
        let k = e.iter().position(|e| e.kind == RecordKind::Data).unwrap();
        let mut b = good.clone();
        reseal_trailer(&mut b, |b, at| b[at + 4 + 48 + 24 * k + 20] ^= 1);
        let err = open(&b).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert_eq!(err.record(), Some(k as u64), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn create_new_sink_never_replaces_a_file_that_appeared_meanwhile() {
    use ram_saver::{AtomicFileSink, SnapshotSink};
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("ram-saver-noreplace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("vm.snap");
    let _ = std::fs::remove_file(&target);
    let mut sink = AtomicFileSink::create_new(&target).unwrap();
    sink.write_all(b"new contents").unwrap();
    std::fs::write(&target, b"user's file").unwrap();
    let err = sink
        .finish()
        .expect_err("finish replaced a file created meanwhile");
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&target).unwrap(), b"user's file");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary file left behind: {leftovers:?}"
    );
    // Without a competing file it commits.
    std::fs::remove_file(&target).unwrap();
    let mut sink = AtomicFileSink::create_new(&target).unwrap();
    sink.write_all(b"new contents").unwrap();
    sink.finish().unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"new contents");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A raw snapshot of 256 pages at 1 MiB in 8 records, every page filled with `fill`, whose
/// machine state is 16 bytes of `fill`: two of these differ in content, never in layout.
fn uniform_snapshot(fill: u8) -> Vec<u8> {
    let header = SnapshotHeader::new(
        vec![MemRegion {
            gpa: 0x10_0000,
            size: 256 * PS as u64,
        }],
        1,
        Vec::new(),
    );
    let mut f = Vec::new();
    let mut w = SnapshotWriter::new(&mut f, &header, &[fill; 16]).unwrap();
    for k in 0..8u64 {
        w.write_pages(0x100 + 32 * k, &vec![fill; 32 * PS]).unwrap();
    }
    w.finish().unwrap();
    f
}

/// Replace `path` atomically with (a new link to) `src`.
fn replace_with(src: &std::path::Path, path: &std::path::Path) {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::fs::hard_link(src, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Load the file behind `rd` into fresh memory; `Ok(None)` when every byte is the fill its
/// machine state names, else the first stray byte.
fn load_is_own_content(
    rd: &mut SnapshotReader<std::io::BufReader<std::fs::File>>,
) -> Result<Option<u8>, FormatError> {
    let fill = rd.machine_state()[0];
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 256 * PS)]).unwrap();
    rd.load_into(&mem, &mut |_| {})?;
    let mut buf = vec![0u8; 256 * PS];
    mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
    Ok(buf.iter().copied().find(|&b| b != fill))
}

#[test]
fn reader_reads_one_file_even_if_its_path_is_replaced() {
    // On a file system with direct I/O, so that the O_DIRECT handle is really used.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ram-saver-replace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.snap"), dir.join("b.snap"));
    std::fs::write(&a, uniform_snapshot(0xa1)).unwrap();
    std::fs::write(&b, uniform_snapshot(0xb2)).unwrap();
    let path = dir.join("vm.snap");

    // Replaced after open: verify and load still read A, all of it.
    replace_with(&a, &path);
    let mut rd = SnapshotReader::open(&path).unwrap();
    replace_with(&b, &path);
    assert_eq!(rd.machine_state(), &[0xa1; 16]);
    rd.verify(&mut |_| {}).unwrap();
    assert_eq!(load_is_own_content(&mut rd).unwrap(), None);

    // Replaced while open runs: another thread swaps A and B under the path as fast as it can,
    // so some opens straddle a swap. Whatever file an open got, it must read only that file.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (mut mixed, mut opens, mut flips) = (Vec::new(), 0, 0u64);
    std::thread::scope(|s| {
        let flipper = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                replace_with(if n.is_multiple_of(2) { &a } else { &b }, &path);
                n += 1;
            }
            n
        });
        let t0 = std::time::Instant::now();
        while opens < 400 && t0.elapsed() < std::time::Duration::from_secs(20) {
            let mut rd = SnapshotReader::open(&path).unwrap();
            opens += 1;
            let fill = rd.machine_state()[0];
            if let Err(e) = rd.verify(&mut |_| {}) {
                mixed.push(format!("open {opens} ({fill:#x}): verify: {e}"));
                continue;
            }
            match load_is_own_content(&mut rd) {
                Ok(None) => {}
                Ok(Some(stray)) => mixed.push(format!("open {opens} ({fill:#x}): read {stray:#x}")),
                Err(e) => mixed.push(format!("open {opens} ({fill:#x}): load: {e}")),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flips = flipper.join().unwrap();
    });
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!(
        "{opens} opens during {flips} path swaps, {} mixed",
        mixed.len()
    );
    assert!(flips > 0);
    assert!(
        mixed.is_empty(),
        "{} of {opens} opens read two files: {mixed:#?}",
        mixed.len()
    );
}

/// Peak resident set size of this process, in KiB.
fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Pieces of a file: (offset, bytes).
type Parts = Vec<(u64, Vec<u8>)>;

/// A 1 TiB sparse file holding only `parts`.
fn sparse_file(path: &std::path::Path, parts: &Parts) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(1 << 40).unwrap();
    for (at, b) in parts {
        f.write_all_at(b, *at).unwrap();
    }
}

fn footer_bytes(trailer_offset: u64, trailer_len: u64) -> Vec<u8> {
    let mut b = [trailer_offset.to_le_bytes(), trailer_len.to_le_bytes()].concat();
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(b"SNAPEND\0");
    b
}

fn state_section(len: u64, blob: &[u8]) -> Vec<u8> {
    let mut b = b"MSTA".to_vec();
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&crc32fast::hash(blob).to_le_bytes());
    b.extend_from_slice(blob);
    b
}

/// Trailer tag and totals claiming `records` records (other totals 0).
fn trailer_head(records: u64) -> Vec<u8> {
    let mut b = b"TRLR".to_vec();
    for v in [0, 0, 0, records, 0, 0] {
        b.extend_from_slice(&u64::to_le_bytes(v));
    }
    b
}

#[test]
fn sparse_files_with_huge_lengths_are_refused_fast_and_small() {
    const T: u64 = 1 << 40;
    let footer_at = T - 32;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ram-saver-sparse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let small = small_header().encode();
    let mut huge_guest = small_header();
    huge_guest.regions = vec![MemRegion {
        gpa: 0,
        size: ram_saver::format::MAX_GUEST_BYTES,
    }];
    let huge_guest = huge_guest.encode();
    let st = state_section(5, b"state");
    let after = |h: &[u8]| (h.len() + st.len()) as u64;
    // An index of 2^28 entries (one per page of a 1 TiB guest): 6 GiB, ending at the footer.
    let big_n = ram_saver::format::MAX_GUEST_BYTES / PS as u64;
    let big_len = 56 + 24 * big_n;
    // Index entries that look valid, for the first 1000 records.
    let valid_entries: Vec<u8> = (0..1000u64)
        .flat_map(|i| {
            let mut e = (0x1000 + 28 * i).to_le_bytes().to_vec();
            e.extend_from_slice(&i.to_le_bytes());
            e.extend_from_slice(&1u32.to_le_bytes());
            e.extend_from_slice(&[0, 0, 0, 0]);
            e
        })
        .collect();
    let half_n = T / 2 / 24;
    let half_len = 56 + 24 * half_n;
    let cases: Vec<(&str, Parts)> = vec![
        (
            "footer: trailer of nearly 1 TiB in a hole (no trailer tag)",
            vec![
                (0, small.clone()),
                (small.len() as u64, st.clone()),
                (
                    footer_at,
                    footer_bytes(after(&small), footer_at - after(&small)),
                ),
            ],
        ),
        (
            "trailer: 1/2 TiB of index, record count consistent with it",
            vec![
                (0, small.clone()),
                (small.len() as u64, st.clone()),
                (footer_at - half_len, trailer_head(half_n)),
                (footer_at, footer_bytes(footer_at - half_len, half_len)),
            ],
        ),
        (
            "trailer: 2^28 records for a 1 TiB guest, index in a hole",
            vec![
                (0, huge_guest.clone()),
                (huge_guest.len() as u64, st.clone()),
                (footer_at - big_len, trailer_head(big_n)),
                (footer_at, footer_bytes(footer_at - big_len, big_len)),
            ],
        ),
        (
            "trailer: 2^28 records for a 1 TiB guest, 1000 valid entries then a hole",
            vec![
                (0, huge_guest.clone()),
                (huge_guest.len() as u64, st.clone()),
                (footer_at - big_len, trailer_head(big_n)),
                (footer_at - big_len + 52, valid_entries),
                (footer_at, footer_bytes(footer_at - big_len, big_len)),
            ],
        ),
        (
            "machine state: 1/2 TiB long",
            vec![
                (0, small.clone()),
                (small.len() as u64, state_section(T / 2, b"")),
                (footer_at - 56, trailer_head(0)),
                (footer_at, footer_bytes(footer_at - 56, 56)),
            ],
        ),
        (
            "machine state: one byte over MAX_MACHINE_STATE_LEN",
            vec![
                (0, small.clone()),
                (
                    small.len() as u64,
                    state_section(ram_saver::format::MAX_MACHINE_STATE_LEN + 1, b""),
                ),
                (footer_at - 56, trailer_head(0)),
                (footer_at, footer_bytes(footer_at - 56, 56)),
            ],
        ),
        (
            "header: header_len MAX_HEADER_LEN (zeros)",
            vec![
                (0, {
                    let mut h = small.clone();
                    h[12..16].copy_from_slice(&ram_saver::format::MAX_HEADER_LEN.to_le_bytes());
                    h
                }),
                (footer_at - 56, trailer_head(0)),
                (footer_at, footer_bytes(footer_at - 56, 56)),
            ],
        ),
    ];
    let path = dir.join("sparse.snap");
    let hwm0 = vm_hwm_kib();
    let mut report = Vec::new();
    for (what, parts) in &cases {
        sparse_file(&path, parts);
        let t0 = std::time::Instant::now();
        let res = SnapshotReader::open(&path).and_then(|mut r| r.verify(&mut |_| {}));
        let took = t0.elapsed();
        let grew = vm_hwm_kib().saturating_sub(hwm0);
        report.push(format!("{what}: {took:.2?}, VmHWM +{grew} KiB: {res:?}"));
        let err = res.expect_err(what);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
        assert!(
            took < std::time::Duration::from_millis(500),
            "{what}: {took:?}"
        );
        assert!(grew < 64 << 10, "{what}: peak RSS grew by {grew} KiB");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!("{}", report.join("\n"));
}
