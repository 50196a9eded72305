//! Format version 2: zstd and raw records in independent pieces (every piece size, pieces read
//! one at a time by `read_piece_at`, damaged pieces and piece tables named), the hot flag of index
//! entries, and files of format version 1 (written by the format-1 writer, `tests/data`) still
//! read.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use ram_saver::{
    Compression, EncodedBatch, ErrorKind, FormatError, MemRegion, RecordEncoder, RecordKind,
    SnapshotHeader, SnapshotReader, SnapshotWriter, FORMAT_VERSION, PIECE_RAW,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PS: u64 = 4096;
/// Guest memory: 1024 pages (4 MiB) then a second region of 300 pages.
const REGIONS: [(u64, u64); 2] = [(0, 1024 * PS), (1 << 32, 300 * PS)];

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Page `p`'s contents: compressible patterns, some random pages, a few zero pages (which cut
/// records).
fn page(p: u64) -> Vec<u8> {
    let mut b = vec![0u8; PS as usize];
    if p % 11 == 3 {
        for (i, c) in b.chunks_mut(8).enumerate() {
            c.copy_from_slice(&splitmix(p * 4096 + i as u64).to_le_bytes());
        }
    } else if !(100..110).contains(&p) && p != (1 << 20) + 150 {
        for (i, x) in b.iter_mut().enumerate() {
            *x = (p as u8).wrapping_mul(13) ^ (i / 32) as u8;
        }
    }
    b
}

fn temp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("pieces-{name}-{}", std::process::id()))
}

/// Runs written as records (first page, pages): a whole huge page, runs starting off any piece
/// boundary and crossing several, single pages, the second region.
fn runs() -> Vec<(u64, u64)> {
    vec![
        (512, 512),
        (0, 37),
        (37, 300),
        (337, 175),
        (1 << 20, 1),
        ((1 << 20) + 1, 299),
    ]
}

/// A zstd file with every run of [`runs`] encoded by an encoder with pieces of `piece_raw`
/// bytes (`None`: one zstd frame per record); runs with an odd number of pages are hot.
fn write_file(path: &Path, piece_raw: Option<u32>) {
    write_file_with(path, Compression::Zstd { level: 3 }, piece_raw);
}

/// [`write_file`] with `compression` (`None`: raw, in pieces of `piece_raw` bytes or not).
fn write_file_with(path: &Path, compression: Compression, piece_raw: Option<u32>) {
    let regions = REGIONS
        .iter()
        .map(|&(gpa, size)| MemRegion { gpa, size })
        .collect();
    let mut h = SnapshotHeader::new(regions, 1, Vec::new());
    h.compression = compression;
    let mut enc = RecordEncoder::new(PS as usize, h.compression)
        .unwrap()
        .with_piece_raw(piece_raw)
        .unwrap();
    let mut out = Vec::new();
    let mut w = SnapshotWriter::new(&mut out, &h, b"state").unwrap();
    let mut batch = EncodedBatch::default();
    for (first, n) in runs() {
        let data: Vec<u8> = (first..first + n).flat_map(page).collect();
        batch.clear();
        enc.set_hot(n % 2 == 1);
        enc.encode(first, &data, &mut batch).unwrap();
        w.write_batch(&batch).unwrap();
    }
    w.finish().unwrap();
    std::fs::write(path, &out).unwrap();
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// (record number, offset) of the data records stored with `codec`.
fn records_with_codec(path: &Path, codec: u8) -> Vec<(usize, usize)> {
    let b = std::fs::read(path).unwrap();
    let rd = SnapshotReader::open(path).unwrap();
    rd.trailer()
        .index
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == RecordKind::Data && b[e.offset as usize + 5] == codec)
        .map(|(i, e)| (i, e.offset as usize))
        .collect()
}

/// Every page of the file, read whole (`verify`, `records`, `load_into`, `read_record_at`),
/// is [`page`]'s.
fn check_whole(path: &Path) {
    let mut rd = SnapshotReader::open(path).unwrap();
    rd.verify(&mut |_| {}).unwrap();
    for r in rd.records() {
        let r = r.unwrap();
        for k in 0..u64::from(r.page_count) {
            let want = page(r.first_page + k);
            let got = match r.kind {
                RecordKind::ZeroRun => vec![0u8; PS as usize],
                RecordKind::Data => r.data[(k * PS) as usize..((k + 1) * PS) as usize].to_vec(),
                RecordKind::Parent => panic!("a parent record in a file without a parent"),
            };
            assert!(got == want, "page {}", r.first_page + k);
        }
    }
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(gpa, size)| (GuestAddress(gpa), size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    rd.load_into(&mem, &mut |_| {}).unwrap();
    let mut buf = vec![0u8; PS as usize];
    for &(gpa, size) in &REGIONS {
        for p in gpa / PS..(gpa + size) / PS {
            mem.read_slice(&mut buf, GuestAddress(p * PS)).unwrap();
            assert!(buf == page(p), "loaded page {p}");
        }
    }
    let mut out = Vec::new();
    for (i, e) in rd.trailer().index.iter().enumerate() {
        rd.read_record_at(i, &mut out).unwrap();
        if e.kind == RecordKind::Data {
            assert_eq!(out.len() as u64, u64::from(e.page_count) * PS);
        }
    }
}

#[test]
fn records_in_pieces_of_every_size_round_trip_and_read_one_piece_at_a_time() {
    for piece_raw in [4096, 32 << 10, PIECE_RAW, 128 << 10, 2 << 20, 4 << 20] {
        let path = temp(&format!("round-{piece_raw}"));
        write_file(&path, Some(piece_raw));
        check_whole(&path);
        let rd = SnapshotReader::open(&path).unwrap();
        assert_eq!(rd.format_version(), FORMAT_VERSION);
        let pieced = records_with_codec(&path, 2);
        assert!(!pieced.is_empty(), "{piece_raw}: no record in pieces");
        assert!(records_with_codec(&path, 1).is_empty());
        check_pieces(&rd, &pieced, piece_raw);
        std::fs::remove_file(&path).unwrap();
    }
    // One zstd frame per record (as format 1 writes them) is still a valid version-2 record.
    let path = temp("whole");
    write_file(&path, None);
    check_whole(&path);
    assert!(records_with_codec(&path, 2).is_empty());
    assert!(!records_with_codec(&path, 1).is_empty());
    let rd = SnapshotReader::open(&path).unwrap();
    let mut out = Vec::new();
    for (i, _) in records_with_codec(&path, 1) {
        let first = rd.trailer().index[i].first_page;
        assert!(rd.read_piece_at(i, first, &mut out).unwrap().is_none());
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn raw_records_in_pieces_of_every_size_round_trip_and_read_one_piece_at_a_time() {
    for piece_raw in [4096, 32 << 10, PIECE_RAW, 128 << 10, 2 << 20, 4 << 20] {
        let path = temp(&format!("raw-round-{piece_raw}"));
        write_file_with(&path, Compression::None, Some(piece_raw));
        check_whole(&path);
        let rd = SnapshotReader::open(&path).unwrap();
        let pieced = records_with_codec(&path, 3);
        // (Pieces of 2 MiB and more hold every run of [`runs`] whole.)
        if piece_raw < 2 << 20 {
            assert!(!pieced.is_empty(), "{piece_raw}: no record raw in pieces");
        }
        assert!(records_with_codec(&path, 1).is_empty() && records_with_codec(&path, 2).is_empty());
        // Every data record of two or more pieces is in pieces, the others plain raw.
        let piece_pages = u64::from(piece_raw) / PS;
        for (i, e) in rd.trailer().index.iter().enumerate() {
            if e.kind != RecordKind::Data {
                continue;
            }
            let last = e.first_page + u64::from(e.page_count) - 1;
            let several = last / piece_pages != e.first_page / piece_pages;
            let in_pieces = pieced.iter().any(|&(j, _)| j == i);
            assert_eq!(several, in_pieces, "{piece_raw}: record {i} {e:?}");
        }
        check_pieces(&rd, &pieced, piece_raw);
        std::fs::remove_file(&path).unwrap();
    }
    // Without pieces: every data record plain raw, read whole.
    let path = temp("raw-whole");
    write_file_with(&path, Compression::None, None);
    check_whole(&path);
    assert!(records_with_codec(&path, 3).is_empty());
    let rd = SnapshotReader::open(&path).unwrap();
    let mut out = Vec::new();
    for (i, _) in records_with_codec(&path, 0) {
        let first = rd.trailer().index[i].first_page;
        assert!(rd.read_piece_at(i, first, &mut out).unwrap().is_none());
    }
    std::fs::remove_file(&path).unwrap();
}

/// Every page of every record of `rd` read by `read_piece_at`: a piece (of `piece_raw` bytes,
/// holding the page, with [`page`]'s contents) exactly for the records `pieced`.
fn check_pieces<R: std::io::Read + std::io::Seek>(
    rd: &SnapshotReader<R>,
    pieced: &[(usize, usize)],
    piece_raw: u32,
) {
    {
        let piece_pages = u64::from(piece_raw) / PS;
        let mut out = Vec::new();
        for (i, e) in rd.trailer().index.iter().enumerate() {
            let in_pieces = pieced.iter().any(|&(j, _)| j == i);
            for p in e.first_page..e.first_page + u64::from(e.page_count) {
                let got = rd.read_piece_at(i, p, &mut out).unwrap();
                let Some(piece) = got else {
                    assert!(!in_pieces, "{piece_raw}: record {i} page {p}: no piece");
                    continue;
                };
                assert!(in_pieces, "{piece_raw}: record {i} read in pieces");
                let (a, n) = (piece.first_page, u64::from(piece.page_count));
                // The piece holds the page, lies in the record, and is cut at multiples of
                // the piece size in guest pages (or at the record's ends).
                assert!(a <= p && p < a + n, "{piece_raw}: {piece:?} lacks page {p}");
                assert!(a >= e.first_page && a + n <= e.first_page + u64::from(e.page_count));
                assert!(a == e.first_page || a % piece_pages == 0, "{piece:?}");
                let end = a + n;
                assert!(
                    end == e.first_page + u64::from(e.page_count) || end % piece_pages == 0,
                    "{piece:?}"
                );
                assert_eq!(
                    piece.index as u64,
                    a / piece_pages - e.first_page / piece_pages
                );
                assert_eq!(out.len() as u64, n * PS);
                for k in 0..n {
                    let got = &out[(k * PS) as usize..((k + 1) * PS) as usize];
                    assert!(got == page(a + k).as_slice(), "{piece_raw}: page {}", a + k);
                }
            }
        }
        // A page outside the record, or a record not in pieces: nothing to read in pieces.
        if let Some(&(i, _)) = pieced.first() {
            let e = rd.trailer().index[i];
            assert!(rd
                .read_piece_at(i, e.first_page + u64::from(e.page_count), &mut out)
                .unwrap()
                .is_none());
        }
    }
}

#[test]
fn piece_sizes_no_reader_accepts_are_refused_by_the_encoder() {
    for bad in [0, 2048, 4096 + 4096 * 2, 3 << 20, 128 << 20] {
        let e = RecordEncoder::new(PS as usize, Compression::Zstd { level: 1 }).unwrap();
        assert!(e.with_piece_raw(Some(bad)).is_err(), "{bad}");
    }
}

#[test]
fn hot_flags_round_trip_and_are_counted() {
    let path = temp("hot");
    write_file(&path, Some(PIECE_RAW));
    let rd = SnapshotReader::open(&path).unwrap();
    let index = &rd.trailer().index;
    // Runs with an odd number of pages were written hot (each run's records, zero runs too).
    let mut want = ram_saver::HotTotals::default();
    for (first, n) in runs() {
        let recs: Vec<_> = index
            .iter()
            .enumerate()
            .filter(|(_, e)| e.first_page >= first && e.first_page < first + n)
            .collect();
        assert!(!recs.is_empty());
        for (i, e) in recs {
            assert_eq!(e.hot, n % 2 == 1, "record {i} of run {first}+{n}");
            if e.hot {
                want.records += 1;
                want.pages += u64::from(e.page_count);
            }
        }
    }
    let got = rd.hot_totals();
    assert_eq!((got.records, got.pages), (want.records, want.pages));
    assert!(got.stored_bytes > 0 && got.stored_bytes < got.pages * PS);
    std::fs::remove_file(&path).unwrap();
}

/// Flips a byte of the payload of the record at `at` (`rel` bytes into it) and, when `reseal`,
/// makes the record's crc match again.
fn damage(b: &mut [u8], at: usize, rel: usize, reseal: bool) {
    b[at + 28 + rel] ^= 0x21;
    if reseal {
        let stored = u32_at(b, at + 20) as usize;
        let mut h = crc32fast::Hasher::new();
        h.update(&b[at..at + 24]);
        h.update(&b[at + 28..at + 28 + stored]);
        let crc = h.finalize();
        b[at + 24..at + 28].copy_from_slice(&crc.to_le_bytes());
    }
}

fn corrupt_record(e: &FormatError) -> Option<u64> {
    match e {
        FormatError::Corrupt { record, .. } => *record,
        _ => None,
    }
}

#[test]
fn a_damaged_piece_or_piece_table_is_named_and_other_pieces_still_read() {
    damaged_pieces(Compression::Zstd { level: 3 }, 2);
}

#[test]
fn a_damaged_raw_piece_or_its_piece_table_is_named_and_other_pieces_still_read() {
    damaged_pieces(Compression::None, 3);
}

/// Damage the huge-page record of a file of `compression` (stored with `codec`) in its pieces
/// and its table: a full read names the record, a read of one piece the piece (or the table).
fn damaged_pieces(compression: Compression, codec: u8) {
    let raw = codec == 3;
    let path = temp(&format!("damage-{codec}"));
    write_file_with(&path, compression, Some(PIECE_RAW));
    let clean = std::fs::read(&path).unwrap();
    // The huge-page record (pages 512..1024) has 32 pieces of 16 pages.
    let rd = SnapshotReader::open(&path).unwrap();
    let (i, at) = records_with_codec(&path, codec)
        .into_iter()
        .find(|&(i, _)| {
            rd.trailer().index[i].first_page == 512 && rd.trailer().index[i].page_count == 512
        })
        .expect("the huge-page record is in pieces");
    drop(rd);
    let count = u32_at(&clean, at + 28 + 4) as usize;
    assert_eq!(count, 32);
    let table = 8 + 8 * count + 4;
    // Piece 3: after the table and pieces 0..3.
    let before: usize = (0..3)
        .map(|k| u32_at(&clean, at + 28 + 8 + 8 * k) as usize)
        .sum();
    if raw {
        assert_eq!(before, 3 * 16 * PS as usize);
    }
    let piece3 = table + before + 5;
    let bad_path = temp(&format!("damaged-{codec}"));
    let mut out = Vec::new();
    // A full read of a raw record checks each piece as it streams by, and its table before
    // its pages; one of zstd pieces checks the record crc first.
    let (stale_piece, stale_table) = if raw {
        ("piece 3 checksum mismatch", "piece table checksum mismatch")
    } else {
        ("record checksum mismatch", "record checksum mismatch")
    };
    for (what, rel, reseal, whole_err, piece_err) in [
        (
            "piece 3",
            piece3,
            true,
            "piece 3 checksum mismatch",
            Some("piece 3 checksum mismatch"),
        ),
        (
            "piece 3, record crc stale",
            piece3,
            false,
            stale_piece,
            Some("piece 3 checksum mismatch"),
        ),
        (
            "a table entry",
            8 + 8 * 5,
            true,
            "piece table checksum mismatch",
            None,
        ),
        ("the table head", 1, true, "piece table invalid", None),
        ("the table crc", table - 2, false, stale_table, None),
    ] {
        let mut b = clean.clone();
        damage(&mut b, at, rel, reseal);
        std::fs::write(&bad_path, &b).unwrap();
        let mut rd = SnapshotReader::open(&bad_path).unwrap();
        // Reading all of it (verify, records, load, read_record_at) names the record.
        let err = rd.verify(&mut |_| {}).unwrap_err();
        assert_eq!(corrupt_record(&err), Some(i as u64), "{what}: {err}");
        assert!(err.to_string().contains(whole_err), "{what}: {err}");
        let err = rd.records().find_map(Result::err).expect("a bad record");
        assert_eq!(corrupt_record(&err), Some(i as u64), "{what}: {err}");
        let mem = GuestMemoryMmap::from_ranges(
            &REGIONS
                .iter()
                .map(|&(gpa, size)| (GuestAddress(gpa), size as usize))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let err = rd.load_into(&mem, &mut |_| {}).unwrap_err();
        assert_eq!(corrupt_record(&err), Some(i as u64), "{what}: {err}");
        let err = rd.read_record_at(i, &mut out).unwrap_err();
        assert_eq!(corrupt_record(&err), Some(i as u64), "{what}: {err}");
        // One piece at a time: the damaged piece (or any, for a damaged table) is refused;
        // with the table intact, the other pieces still read (they are independent).
        for k in 0..32u64 {
            let p = 512 + k * 16 + 7;
            let r = rd.read_piece_at(i, p, &mut out);
            let fails = piece_err.is_none_or(|_| k == 3);
            if fails {
                let err = r.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err}");
                assert_eq!(corrupt_record(&err), Some(i as u64), "{what}: {err}");
                let want = piece_err.unwrap_or("piece table");
                assert!(err.to_string().contains(want), "{what}, piece {k}: {err}");
            } else {
                let piece = r.unwrap().expect("a piece");
                assert_eq!(piece.index as u64, k);
                let got = &out[(7 * PS) as usize..(8 * PS) as usize];
                assert!(got == page(p).as_slice(), "{what}: piece {k}");
            }
        }
    }
    std::fs::remove_file(&bad_path).unwrap();
    std::fs::remove_file(&path).unwrap();
}

/// The format-1 fixture's page contents (as `tests/data/README.md` describes).
fn fixture_page(p: u64) -> Vec<u8> {
    let mut b = vec![0u8; PS as usize];
    let random = (64..72).contains(&p) || p % 13 == 1;
    if random {
        for (i, c) in b.chunks_mut(8).enumerate() {
            c.copy_from_slice(&splitmix(p * 4096 + i as u64).to_le_bytes());
        }
    } else if !p.is_multiple_of(5) {
        for (i, x) in b.iter_mut().enumerate() {
            *x = (p as u8).wrapping_mul(31) ^ (i / 64) as u8;
        }
    }
    b
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/format-1-zstd.snap")
}

#[test]
fn a_format_1_file_still_reads() {
    let path = fixture();
    let rd = SnapshotReader::open(&path).unwrap();
    assert!(rd.trailer().index.iter().all(|e| !e.hot));
    assert_eq!(rd.hot_totals(), ram_saver::HotTotals::default());
    fixture_reads(&path, 1);
}

/// The format-2 fixture (`tests/data/README.md`): hot records, zstd and raw in pieces, no
/// snapshot id (its identity has a zero id).
#[test]
fn a_format_2_file_still_reads() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/format-2-zstd.snap");
    let rd = SnapshotReader::open(&path).unwrap();
    assert_eq!(rd.header().snapshot_id, [0; 16]);
    assert_eq!(rd.header().parent, None);
    assert_eq!(rd.identity().snapshot_id, [0; 16]);
    assert_eq!(
        rd.identity().file_len,
        std::fs::metadata(&path).unwrap().len()
    );
    assert!(rd.hot_totals().records > 0, "{:?}", rd.hot_totals());
    fixture_reads(&path, 2);
}

/// A fixture of format `version` reads, verifies and loads page by page.
fn fixture_reads(path: &Path, version: u32) {
    let mut rd = SnapshotReader::open(path).unwrap();
    assert_eq!(rd.format_version(), version);
    let ms = format!("format-{version} machine state");
    assert_eq!(rd.machine_state(), ms.as_bytes());
    assert_eq!(rd.header().compression, Compression::Zstd { level: 3 });
    assert_eq!(rd.trailer().totals.parent_pages, 0);
    rd.verify(&mut |_| {}).unwrap();
    let b = std::fs::read(path).unwrap();
    let codecs: Vec<u8> = rd
        .trailer()
        .index
        .iter()
        .filter(|e| e.kind == RecordKind::Data)
        .map(|e| b[e.offset as usize + 5])
        .collect();
    let want = if version == 1 { 1 } else { 2 };
    assert!(codecs.contains(&want), "{codecs:?}");
    let regions: Vec<(u64, u64)> = rd
        .header()
        .regions
        .iter()
        .map(|r| (r.gpa, r.size))
        .collect();
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(gpa, size)| (GuestAddress(gpa), size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    rd.load_into(&mem, &mut |_| {}).unwrap();
    let mut buf = vec![0u8; PS as usize];
    for &(gpa, size) in &regions {
        for p in gpa / PS..(gpa + size) / PS {
            mem.read_slice(&mut buf, GuestAddress(p * PS)).unwrap();
            assert!(buf == fixture_page(p), "page {p}");
        }
    }
    let mut out = Vec::new();
    for (i, e) in rd.trailer().index.iter().enumerate() {
        // Version 1 has no records in pieces.
        let piece = rd.read_piece_at(i, e.first_page, &mut out).unwrap();
        if let Some(piece) = piece {
            assert!(version >= 2);
            let at = ((e.first_page - piece.first_page) * PS) as usize;
            assert!(out[at..at + PS as usize] == fixture_page(e.first_page)[..]);
        }
        rd.read_record_at(i, &mut out).unwrap();
        for k in 0..u64::from(e.page_count) {
            if e.kind == RecordKind::Data {
                let got = &out[(k * PS) as usize..((k + 1) * PS) as usize];
                assert!(got == fixture_page(e.first_page + k).as_slice());
            }
        }
    }
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
fn what_format_1_lacks_is_refused_in_a_format_1_file() {
    let clean = std::fs::read(fixture()).unwrap();
    let path = temp("v1-lies");
    // A hot flag in the index (the trailer crc made to match): a pad byte in format 1.
    let mut b = clean.clone();
    reseal_trailer(&mut b, |b, at| b[at + 52 + 21] = 1);
    std::fs::write(&path, &b).unwrap();
    let err = SnapshotReader::open(&path).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("index entry 0 invalid"), "{err}");
    // The same flag in a format-2 file is valid.
    b[8] = 2;
    let hlen = u32_at(&b, 12) as usize;
    let crc = crc32fast::hash(&b[..hlen - 4]);
    b[hlen - 4..hlen].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    let mut rd = SnapshotReader::open(&path).unwrap();
    assert!(rd.trailer().index[0].hot);
    rd.verify(&mut |_| {}).unwrap();
    // Codec 2 in a format-1 record (its crc made to match): not a format-1 codec.
    let rd = SnapshotReader::open(fixture()).unwrap();
    let (i, e) = rd
        .trailer()
        .index
        .iter()
        .enumerate()
        .find(|(_, e)| e.kind == RecordKind::Data && clean[e.offset as usize + 5] == 1)
        .map(|(i, e)| (i, *e))
        .unwrap();
    let mut b = clean.clone();
    let at = e.offset as usize;
    b[at + 5] = 2;
    damage(&mut b, at, 0, true);
    damage(&mut b, at, 0, true); // flipped back; the crc now covers codec 2
    std::fs::write(&path, &b).unwrap();
    let mut rd = SnapshotReader::open(&path).unwrap();
    let err = rd.verify(&mut |_| {}).unwrap_err();
    assert_eq!(corrupt_record(&err), Some(i as u64), "{err}");
    assert!(err.to_string().contains("bad record header"), "{err}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn zstd_records_that_do_not_compress_go_raw_in_pieces() {
    // Random pages: zstd does not shrink them, the encoder stores them raw, in pieces when the
    // record spans two or more, plain raw when it lies in one.
    let random = |p: u64| -> Vec<u8> {
        (0..PS / 8)
            .flat_map(|i| splitmix(p * 4096 + i).to_le_bytes())
            .collect()
    };
    let regions = vec![MemRegion {
        gpa: 0,
        size: 1024 * PS,
    }];
    let mut h = SnapshotHeader::new(regions, 1, Vec::new());
    h.compression = Compression::Zstd { level: 3 };
    let mut out = Vec::new();
    let mut w = SnapshotWriter::new(&mut out, &h, b"state").unwrap();
    for (first, n) in [(0, 8), (8, 504), (512, 512)] {
        let data: Vec<u8> = (first..first + n).flat_map(random).collect();
        w.write_pages(first, &data).unwrap();
    }
    w.finish().unwrap();
    let path = temp("zstd-fallback");
    std::fs::write(&path, &out).unwrap();
    let b = std::fs::read(&path).unwrap();
    let mut rd = SnapshotReader::open(&path).unwrap();
    rd.verify(&mut |_| {}).unwrap();
    let codecs: Vec<(u64, u8)> = rd
        .trailer()
        .index
        .iter()
        .map(|e| (e.first_page, b[e.offset as usize + 5]))
        .collect();
    assert_eq!(codecs, [(0, 0), (8, 3), (512, 3)]);
    let mut buf = Vec::new();
    for (i, &(first, codec)) in codecs.iter().enumerate() {
        let piece = rd.read_piece_at(i, first + 3, &mut buf).unwrap();
        assert_eq!(piece.is_some(), codec == 3, "record {i}");
        if let Some(p) = piece {
            for k in 0..u64::from(p.page_count) {
                let got = &buf[(k * PS) as usize..((k + 1) * PS) as usize];
                assert!(
                    got == random(p.first_page + k).as_slice(),
                    "page {}",
                    p.first_page + k
                );
            }
        }
    }
    std::fs::remove_file(&path).unwrap();
}
