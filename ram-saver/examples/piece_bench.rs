//! Zstd in pieces: what a piece size costs and buys. For one whole-record zstd frame per record
//! (format 1's way) and pieces of 32, 64 and 128 KiB, it encodes the same 2 MiB records on one
//! thread (compression speed, stored size), writes them to a snapshot in /tmp, and times what a
//! lazy-restore fault pays to get the pages it serves out of the file (page cache warm): a whole
//! record (`read_record_at`: positioned read, crc, decode of 2 MiB) against one piece
//! (`read_piece_at`: header, piece table and one piece read, checked, decoded).
//!
//! `cargo run --release -p ram-saver --example piece_bench [-- OPTIONS]`
//!
//! Data: the regular files under `--dir DIR` (default `/usr/lib/x86_64-linux-gnu`: program code
//! and data, compressible the way a guest's memory of programs is), read in file-name order up to
//! `--mib N` (256) MiB and cut into 2 MiB records (records that zstd does not shrink are stored
//! raw, as the writer does, and left out of the fault timings). `--snapshot FILE` takes the data
//! records of a snapshot instead. `--level L` (3, `snapctl save --zstd`'s), `--faults N` (2000
//! timed reads per case: random record, random page), `--rewrite OUT --piece-kib K|0` copies
//! `--snapshot` with its records re-encoded (pieces of K KiB; 0: one frame per record), keeping
//! the record order and hot flags; with `--replace-from-mib M` the data records from guest
//! address M MiB on carry `--dir`'s bytes instead of their own (a compressible image of a guest
//! that only writes there, such as the built-in guest above its program and page tables, for
//! timing lazy-restore faults on compressed records); `--clear-hot` writes no hot flags (to time
//! a lazy restore's fill without hot records first).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use ram_saver::{
    Compression, EncodedBatch, MemRegion, RecordEncoder, RecordKind, SnapshotHeader,
    SnapshotReader, SnapshotWriter,
};

const PAGE: usize = 4096;
const RECORD: usize = 2 << 20;

struct Args {
    dir: PathBuf,
    mib: usize,
    snapshot: Option<PathBuf>,
    level: i32,
    faults: usize,
    rewrite: Option<PathBuf>,
    piece_kib: u32,
    replace_from_mib: Option<u64>,
    clear_hot: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        dir: PathBuf::from("/usr/lib/x86_64-linux-gnu"),
        mib: 256,
        snapshot: None,
        level: 3,
        faults: 2000,
        rewrite: None,
        piece_kib: 64,
        replace_from_mib: None,
        clear_hot: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--dir" => a.dir = PathBuf::from(val()),
            "--mib" => a.mib = val().parse().expect("number"),
            "--snapshot" => a.snapshot = Some(PathBuf::from(val())),
            "--level" => a.level = val().parse().expect("number"),
            "--faults" => a.faults = val().parse().expect("number"),
            "--rewrite" => a.rewrite = Some(PathBuf::from(val())),
            "--piece-kib" => a.piece_kib = val().parse().expect("number"),
            "--replace-from-mib" => a.replace_from_mib = Some(val().parse().expect("number")),
            "--clear-hot" => a.clear_hot = true,
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    a
}

/// Regular files under `dir` (sorted, recursively), concatenated up to `max` bytes, in whole
/// records.
fn corpus(dir: &Path, max: usize) -> Vec<u8> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        let mut es: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        es.sort();
        for p in es {
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                walk(&p, out);
            } else if m.is_file() {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    let mut data = Vec::with_capacity(max);
    for f in files {
        if data.len() >= max {
            break;
        }
        if let Ok(b) = std::fs::read(&f) {
            data.extend_from_slice(&b[..b.len().min(max - data.len())]);
        }
    }
    data.truncate(data.len() / RECORD * RECORD);
    data
}

/// The data records of a snapshot, as (first page, pages).
fn snapshot_records(path: &Path) -> Vec<(u64, Vec<u8>)> {
    let mut rd = SnapshotReader::open(path).expect("open snapshot");
    rd.records()
        .map(|r| r.expect("record"))
        .filter(|r| r.kind == RecordKind::Data)
        .map(|r| (r.first_page, r.data))
        .collect()
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn pct(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get((v.len() * p / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

/// The piece sizes compared (`None`: one frame per record).
const CASES: [Option<u32>; 4] = [None, Some(32 << 10), Some(64 << 10), Some(128 << 10)];

/// Every case, interleaved record by record and fault by fault so that a busy machine slows
/// them alike: encode every record with each (one thread), write a file per case, then time
/// fault reads (the same random record and page in each file, in turn).
fn compare(a: &Args, records: &[(u64, Vec<u8>)]) {
    let pages: u64 = records.iter().map(|r| r.1.len() as u64 / PAGE as u64).sum();
    let last = records
        .iter()
        .map(|r| r.0 + r.1.len() as u64 / PAGE as u64)
        .max()
        .unwrap_or(0);
    let compression = Compression::Zstd { level: a.level };
    let mut encs: Vec<RecordEncoder> = CASES
        .iter()
        .map(|&p| {
            RecordEncoder::new(PAGE, compression)
                .expect("encoder")
                .with_piece_raw(p)
                .expect("piece size")
        })
        .collect();
    let mut batches: Vec<Vec<EncodedBatch>> = CASES.iter().map(|_| Vec::new()).collect();
    let mut enc_s = [0f64; CASES.len()];
    for (first, data) in records {
        for (k, enc) in encs.iter_mut().enumerate() {
            let mut b = EncodedBatch::default();
            let t = Instant::now();
            enc.encode(*first, data, &mut b).expect("encode");
            enc_s[k] += t.elapsed().as_secs_f64();
            batches[k].push(b);
        }
    }
    let raw_bytes = pages * PAGE as u64;
    let mut h = SnapshotHeader::new(
        vec![MemRegion {
            gpa: 0,
            size: last * PAGE as u64,
        }],
        1,
        Vec::new(),
    );
    h.compression = compression;
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&r| records[r].0);
    let mut readers = Vec::new();
    let mut paths = Vec::new();
    for (k, bs) in batches.iter().enumerate() {
        let path =
            std::env::temp_dir().join(format!("piece-bench-{k}-{}.snap", std::process::id()));
        let mut out = Vec::new();
        let mut w = SnapshotWriter::new(&mut out, &h, b"state").expect("writer");
        let mut next = 0;
        for &r in &order {
            let (first, data) = &records[r];
            if *first > next {
                w.write_zero_run(next, first - next).expect("zero run");
            }
            w.write_batch(&bs[r]).expect("write");
            next = first + data.len() as u64 / PAGE as u64;
        }
        w.finish().expect("finish");
        std::fs::write(&path, &out).expect("write file");
        readers.push(SnapshotReader::open(&path).expect("open"));
        paths.push(path);
    }
    // Compressed 2 MiB records (in the whole-frame file: codec 1), by guest page: what a fault
    // decodes.
    let file = std::fs::read(&paths[0]).expect("read back");
    let full: Vec<(usize, u64)> = readers[0]
        .trailer()
        .index
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            e.kind == RecordKind::Data
                && file[e.offset as usize + 5] == 1
                && e.page_count as usize == RECORD / PAGE
        })
        .map(|(i, e)| (i, e.first_page))
        .collect();
    drop(file);
    let n = CASES.len();
    let (mut whole, mut one) = (vec![Vec::new(); n], vec![Vec::new(); n]);
    let mut buf = Vec::new();
    let mut x = 0x5eed;
    // No compressed 2 MiB record (incompressible data): encoding figures only.
    let faults = if full.is_empty() { 0 } else { a.faults };
    for _ in 0..faults {
        let (_, first) = full[(splitmix(&mut x) % full.len() as u64) as usize];
        let page = first + splitmix(&mut x) % (RECORD / PAGE) as u64;
        for (k, rd) in readers.iter().enumerate() {
            let i = rd
                .trailer()
                .index
                .iter()
                .position(|e| e.first_page == first)
                .expect("same records");
            let t = Instant::now();
            rd.read_record_at(i, &mut buf).expect("record");
            whole[k].push(t.elapsed().as_secs_f64() * 1e6);
            if CASES[k].is_some() {
                let t = Instant::now();
                let p = rd.read_piece_at(i, page, &mut buf).expect("piece");
                one[k].push(t.elapsed().as_secs_f64() * 1e6);
                assert!(p.is_some(), "record {i} not in pieces");
            }
        }
    }
    println!(
        "{} MiB in {} records, {} compressed 2 MiB records, {} timed faults; zstd level {}",
        raw_bytes >> 20,
        records.len(),
        full.len(),
        faults,
        a.level
    );
    println!("| records | ratio | encode MB/s (1 thread) | read whole record p50 / p99 µs | read one piece p50 / p99 µs |");
    println!("|---|---|---|---|---|");
    for (k, p) in CASES.iter().enumerate() {
        let stored: u64 = batches[k].iter().map(|b| b.totals.stored_bytes).sum();
        let name = p.map_or("one zstd frame".to_string(), |p| {
            format!("pieces of {} KiB", p >> 10)
        });
        let piece = if p.is_some() {
            format!("{:.0} / {:.0}", pct(&mut one[k], 50), pct(&mut one[k], 99))
        } else {
            "-".to_string()
        };
        println!(
            "| {name} | {:.4} | {:.0} | {:.0} / {:.0} | {piece} |",
            stored as f64 / raw_bytes as f64,
            raw_bytes as f64 / enc_s[k] / 1e6,
            pct(&mut whole[k], 50),
            pct(&mut whole[k], 99),
        );
    }
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

/// Copy `src` to `dst` with its records re-encoded (`piece`: pieces, or one frame), keeping the
/// order and the hot flags.
fn rewrite(
    src: &Path,
    dst: &Path,
    piece: Option<u32>,
    replace: Option<(u64, &[u8])>,
    keep_hot: bool,
) {
    let mut rd = SnapshotReader::open(src).expect("open snapshot");
    let header = rd.header().clone();
    let state = rd.machine_state().to_vec();
    let hot: Vec<bool> = rd.trailer().index.iter().map(|e| e.hot).collect();
    let mut enc = RecordEncoder::new(header.page_size as usize, header.compression)
        .expect("encoder")
        .with_piece_raw(piece)
        .expect("piece size");
    let sink = ram_saver::AtomicFileSink::create(dst).expect("create");
    let mut w = SnapshotWriter::new(sink, &header, &state).expect("writer");
    let mut b = EncodedBatch::default();
    let recs: Vec<_> = rd.records().map(|r| r.expect("record")).collect();
    for r in recs {
        b.clear();
        enc.set_hot(keep_hot && hot[r.index as usize]);
        match r.kind {
            RecordKind::ZeroRun => enc.zero_run(r.first_page, u64::from(r.page_count), &mut b),
            RecordKind::Parent => enc.parent_run(r.first_page, u64::from(r.page_count), &mut b),
            RecordKind::Data => {
                let mut data = r.data;
                if let Some((from, corpus)) = replace {
                    let gpa = r.first_page * u64::from(header.page_size);
                    if gpa >= from && !corpus.is_empty() {
                        let at = (gpa as usize) % corpus.len();
                        for (k, byte) in data.iter_mut().enumerate() {
                            *byte = corpus[(at + k) % corpus.len()];
                        }
                    }
                }
                enc.encode(r.first_page, &data, &mut b).expect("encode")
            }
        }
        w.write_batch(&b).expect("write");
    }
    w.finish().expect("finish");
}

fn main() {
    let a = parse_args();
    if let (Some(src), Some(dst)) = (&a.snapshot, &a.rewrite) {
        let piece = (a.piece_kib > 0).then_some(a.piece_kib << 10);
        let corpus = a.replace_from_mib.map(|_| corpus(&a.dir, a.mib << 20));
        let replace = a
            .replace_from_mib
            .map(|m| (m << 20, corpus.as_deref().unwrap_or(&[])));
        rewrite(src, dst, piece, replace, !a.clear_hot);
        println!("{} → {} ({:?} pieces)", src.display(), dst.display(), piece);
        return;
    }
    let records: Vec<(u64, Vec<u8>)> = match &a.snapshot {
        Some(p) => snapshot_records(p),
        None => corpus(&a.dir, a.mib << 20)
            .chunks(RECORD)
            .enumerate()
            .map(|(k, c)| ((k * RECORD / PAGE) as u64, c.to_vec()))
            .collect(),
    };
    compare(&a, &records);
}
