//! Chains of incremental snapshots written with the real writer: a base of known content and
//! children that change some pages (data, zeros, records cut anywhere) and leave the rest to
//! their parent. Checked against an oracle of the memory at each layer, page by page: the
//! flattened index, eager loads, merges; and every way a chain can be broken, named by layer.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use ram_saver::{
    AtomicFileSink, Chain, Compression, ErrorKind, FormatError, MemRegion, ParentRef, RecordKind,
    SnapshotHeader, SnapshotReader, SnapshotWriter, MAX_CHAIN_LAYERS,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PS: u64 = 4096;
/// Guest memory: 1024 pages then 300 pages at 4 GiB.
const REGIONS: [(u64, u64); 2] = [(0, 1024 * PS), (1 << 32, 300 * PS)];

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Every guest page number of `regions`.
fn pages_of(regions: &[(u64, u64)]) -> Vec<u64> {
    regions
        .iter()
        .flat_map(|&(gpa, size)| gpa / PS..(gpa + size) / PS)
        .collect()
}

/// Contents of page `p` written by layer `gen`: compressible, random or zero.
fn content(gen: u64, p: u64) -> Vec<u8> {
    let mut b = vec![0u8; PS as usize];
    match splitmix(gen * 1_000_003 + p) % 7 {
        0 => {}
        1 | 2 => {
            for (i, c) in b.chunks_mut(8).enumerate() {
                c.copy_from_slice(&splitmix(gen << 40 ^ p << 12 ^ i as u64).to_le_bytes());
            }
        }
        _ => {
            for (i, x) in b.iter_mut().enumerate() {
                *x = (p as u8).wrapping_mul(31) ^ (gen as u8).wrapping_mul(7) ^ (i / 64) as u8;
            }
        }
    }
    b
}

/// The memory of one layer: page number → contents.
type Memory = std::collections::BTreeMap<u64, Vec<u8>>;

fn temp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("chain-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn header(regions: &[(u64, u64)], compression: Compression) -> SnapshotHeader {
    let r = regions
        .iter()
        .map(|&(gpa, size)| MemRegion { gpa, size })
        .collect();
    let mut h = SnapshotHeader::new(r, 1, b"{\"test\":\"chain\"}".to_vec());
    h.compression = compression;
    h
}

/// Writes `mem` at `path`: `changed` pages as data (or zero runs) and the rest as Parent
/// records (when `parent` is given), in blocks of 32 pages in a shuffled order. Returns the
/// machine state written (it names the layer).
fn write_layer(
    path: &Path,
    regions: &[(u64, u64)],
    mem: &Memory,
    changed: &dyn Fn(u64) -> bool,
    parent: Option<&Path>,
    gen: u64,
) {
    let compression = if gen.is_multiple_of(2) {
        Compression::Zstd { level: 1 }
    } else {
        Compression::None
    };
    let mut h = header(regions, compression);
    if let Some(pp) = parent {
        let rd = SnapshotReader::open(pp).unwrap();
        h.parent = Some(ParentRef::of(&rd, pp, path));
    }
    let ms = format!("layer {gen}");
    let mut w =
        SnapshotWriter::new(AtomicFileSink::create(path).unwrap(), &h, ms.as_bytes()).unwrap();
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    for &(gpa, size) in regions {
        let (a, b) = (gpa / PS, (gpa + size) / PS);
        let mut p = a;
        while p < b {
            let n = 32.min(b - p);
            blocks.push((p, n));
            p += n;
        }
    }
    for k in (1..blocks.len()).rev() {
        let j = (splitmix(gen * 77 + k as u64) % (k as u64 + 1)) as usize;
        blocks.swap(k, j);
    }
    for (first, n) in blocks {
        let mut p = first;
        while p < first + n {
            let c = parent.is_none() || changed(p);
            let mut q = p + 1;
            while q < first + n && (parent.is_none() || changed(q)) == c {
                q += 1;
            }
            if c {
                let data: Vec<u8> = (p..q).flat_map(|x| mem[&x].clone()).collect();
                w.write_pages(p, &data).unwrap();
            } else {
                w.write_parent_run(p, q - p).unwrap();
            }
            p = q;
        }
    }
    w.finish().unwrap();
}

/// Which pages layer `gen` (≥ 1) changes: scattered pages, one long run, and a few pages at the
/// region edges.
fn changes(gen: u64) -> impl Fn(u64) -> bool {
    move |p: u64| {
        let run_start = (gen * 97) % 900;
        splitmix(gen * 31 + p).is_multiple_of(9)
            || (run_start..run_start + 70).contains(&p)
            || p == (1 << 20) + 299
            || (gen.is_multiple_of(3) && p < 3)
    }
}

/// A chain of `depth` layers in `dir`: `layer0.snap` (the base) … `layer{depth-1}.snap`, with
/// the memory of each layer.
fn build_chain(dir: &Path, depth: u64) -> (Vec<PathBuf>, Vec<Memory>) {
    let pages = pages_of(&REGIONS);
    let mut mem: Memory = pages.iter().map(|&p| (p, content(0, p))).collect();
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut mems = Vec::new();
    for gen in 0..depth {
        let path = dir.join(format!("layer{gen}.snap"));
        let ch = changes(gen);
        if gen > 0 {
            for &p in &pages {
                if ch(p) {
                    mem.insert(p, content(gen, p));
                }
            }
        }
        write_layer(
            &path,
            &REGIONS,
            &mem,
            &ch,
            paths.last().map(PathBuf::as_path),
            gen,
        );
        paths.push(path);
        mems.push(mem.clone());
    }
    (paths, mems)
}

fn new_mem(regions: &[(u64, u64)]) -> GuestMemoryMmap {
    let r: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(gpa, size)| (GuestAddress(gpa), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&r).unwrap()
}

/// `mem` holds exactly `want`, page by page.
fn assert_memory(mem: &GuestMemoryMmap, want: &Memory, what: &str) {
    let mut buf = vec![0u8; PS as usize];
    for (&p, d) in want {
        mem.read_slice(&mut buf, GuestAddress(p * PS)).unwrap();
        assert!(buf == *d, "{what}: page {p}");
    }
}

/// The flattened index gives exactly `want`: every page in one span, read from its record.
fn assert_flattened(chain: &Chain, want: &Memory, what: &str) {
    let mut pages = 0;
    let mut out = Vec::new();
    let mut last_end = None;
    for s in chain.spans() {
        if let Some(e) = last_end {
            assert!(s.first_page >= e, "{what}: spans overlap or are unsorted");
        }
        last_end = Some(s.first_page + s.pages);
        let e = chain.entry(s);
        assert_ne!(e.kind, RecordKind::Parent, "{what}");
        assert!(e.first_page <= s.first_page);
        assert!(s.first_page + s.pages <= e.first_page + u64::from(e.page_count));
        chain
            .reader(s.layer)
            .read_record_at(s.record as usize, &mut out)
            .unwrap();
        for p in s.first_page..s.first_page + s.pages {
            let got = if e.kind == RecordKind::ZeroRun {
                vec![0u8; PS as usize]
            } else {
                let at = ((p - e.first_page) * PS) as usize;
                out[at..at + PS as usize].to_vec()
            };
            assert!(got == want[&p], "{what}: page {p} (layer {})", s.layer);
            assert_eq!(chain.span_of(p), Some(s), "{what}: span of {p}");
        }
        pages += s.pages;
    }
    assert_eq!(pages, want.len() as u64, "{what}");
    assert_eq!(chain.span_of(1024), None);
}

#[test]
fn chains_of_1_to_16_layers_hold_the_memory_of_their_top() {
    let dir = temp("deep");
    let (paths, mems) = build_chain(&dir, 16);
    // Memory that already holds the previous chain's content: every page is written again or
    // cleared.
    let mut used = new_mem(&REGIONS);
    for (k, path) in paths.iter().enumerate() {
        let what = format!("chain of {}", k + 1);
        let mut chain = Chain::open(path).unwrap();
        assert_eq!(chain.layers().len(), k + 1, "{what}");
        assert_eq!(chain.machine_state(), format!("layer {k}").as_bytes());
        // Paths were hinted relative to the child's directory.
        if k > 0 {
            let pref = chain.header().parent.clone().unwrap();
            assert_eq!(pref.path, Path::new(&format!("layer{}.snap", k - 1)));
        }
        assert_flattened(&chain, &mems[k], &what);
        let mem = new_mem(&REGIONS);
        let mut last = ram_saver::ReadProgress::default();
        chain.load_into(&mem, &mut |p| last = *p).unwrap();
        assert_memory(&mem, &mems[k], &what);
        assert_eq!(last.pages, mems[k].len() as u64);
        chain.load_into(&used, &mut |_| {}).unwrap();
        assert_memory(
            &used,
            &mems[k],
            &format!("{what}, loaded over the previous one"),
        );
        if k == 0 {
            // Then memory with garbage in every page.
            used = new_mem(&REGIONS);
            for &p in mems[0].keys() {
                used.write_slice(&[0xee; PS as usize], GuestAddress(p * PS))
                    .unwrap();
            }
        }
        let rep = chain.verify(&mut |_, _| {}).unwrap();
        assert_eq!(rep.layers.len(), k + 1);
        let figures = chain.figures();
        let pages_used: u64 = figures.iter().map(|f| f.pages_used).sum();
        assert_eq!(pages_used, mems[k].len() as u64);
        assert!(figures[0].pages_used > 0);
    }
    // Moved together to another directory, the chain still opens (relative hints).
    let moved = dir.with_extension("moved");
    let _ = std::fs::remove_dir_all(&moved);
    std::fs::rename(&dir, &moved).unwrap();
    let chain = Chain::open(moved.join("layer15.snap")).unwrap();
    assert_eq!(chain.layers().len(), 16);
    assert_flattened(&chain, &mems[15], "moved chain");
    std::fs::remove_dir_all(&moved).unwrap();
}

#[test]
fn a_merged_chain_is_standalone_and_holds_the_same_content() {
    let dir = temp("merge");
    let (paths, mems) = build_chain(&dir, 16);
    let chain = Chain::open(&paths[15]).unwrap();
    let merged = dir.join("merged.snap");
    let sum = chain
        .merge(AtomicFileSink::create(&merged).unwrap(), &mut |_| {})
        .unwrap();
    assert!(sum.records_copied > 0 && sum.pages_reencoded > 0, "{sum:?}");
    assert_eq!(sum.totals.pages, mems[15].len() as u64);
    assert_eq!(sum.totals.parent_pages, 0);
    let mut rd = SnapshotReader::open(&merged).unwrap();
    assert_eq!(rd.header().parent, None);
    assert_ne!(rd.header().snapshot_id, chain.header().snapshot_id);
    assert_eq!(rd.identity(), sum.identity);
    assert_eq!(rd.machine_state(), chain.machine_state());
    assert_eq!(rd.header().regions, chain.header().regions);
    rd.verify(&mut |_| {}).unwrap();
    let m1 = new_mem(&REGIONS);
    rd.load_into(&m1, &mut |_| {}).unwrap();
    assert_memory(&m1, &mems[15], "merged file");
    // The 16-deep chain's eager load equals the merged file's, byte for byte.
    let m2 = new_mem(&REGIONS);
    Chain::open(&paths[15])
        .unwrap()
        .load_into(&m2, &mut |_| {})
        .unwrap();
    for &(gpa, size) in &REGIONS {
        let mut a = vec![0u8; size as usize];
        let mut b = vec![0u8; size as usize];
        m1.read_slice(&mut a, GuestAddress(gpa)).unwrap();
        m2.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        assert!(a == b, "region {gpa:#x}");
    }
    // A merged file is a chain of one layer; a child of it is a chain of two.
    let chain = Chain::open(&merged).unwrap();
    assert_eq!(chain.layers().len(), 1);
    assert_flattened(&chain, &mems[15], "merged as a chain");
    let child = dir.join("child-of-merged.snap");
    let mut mem = mems[15].clone();
    let ch = changes(40);
    for (&p, d) in mem.iter_mut() {
        if ch(p) {
            *d = content(40, p);
        }
    }
    write_layer(&child, &REGIONS, &mem, &ch, Some(&merged), 40);
    assert_flattened(&Chain::open(&child).unwrap(), &mem, "child of merged");
    // Merging a standalone file copies every record as it is.
    let again = dir.join("again.snap");
    let sum = Chain::open(&merged)
        .unwrap()
        .merge(AtomicFileSink::create(&again).unwrap(), &mut |_| {})
        .unwrap();
    assert_eq!(sum.pages_reencoded, 0);
    assert_eq!(
        sum.records_copied,
        SnapshotReader::open(&merged)
            .unwrap()
            .trailer()
            .totals
            .records
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The error of `r`, which must be a `FormatError::InLayer` of `layer`; returns its source.
fn in_layer<T: std::fmt::Debug>(r: Result<T, FormatError>, layer: usize) -> FormatError {
    match r {
        Err(FormatError::InLayer {
            layer: l, source, ..
        }) if l == layer => *source,
        other => panic!("expected an error of layer {layer}: {other:?}"),
    }
}

#[test]
fn a_damaged_layer_is_named() {
    let dir = temp("damaged");
    let (paths, _) = build_chain(&dir, 3);
    // A payload byte of a data record in layer 2 (the middle file).
    let rd = SnapshotReader::open(&paths[1]).unwrap();
    let (i, e) = rd
        .trailer()
        .index
        .iter()
        .enumerate()
        .find(|(_, e)| e.kind == RecordKind::Data)
        .map(|(i, e)| (i, *e))
        .unwrap();
    drop(rd);
    let mut b = std::fs::read(&paths[1]).unwrap();
    b[e.offset as usize + 28 + 5] ^= 0x10;
    std::fs::write(&paths[1], &b).unwrap();
    // Opening reads no record: the chain opens (the identity is the same), then every reading
    // of the record names layer 2 and the record.
    let mut chain = Chain::open(&paths[2]).unwrap();
    let err = in_layer(chain.verify(&mut |_, _| {}), 2);
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_eq!(err.record(), Some(i as u64), "{err}");
    // A load reads only the records the flattened index uses.
    let used = chain
        .spans()
        .iter()
        .any(|s| s.layer == 1 && s.record == i as u32);
    let r = chain.load_into(&new_mem(&REGIONS), &mut |_| {});
    if used {
        let err = in_layer(r, 2);
        assert_eq!(err.record(), Some(i as u64), "{err}");
    } else {
        r.unwrap();
    }
    let full = chain.verify(&mut |_, _| {}).unwrap_err();
    assert_eq!(full.kind(), ErrorKind::Corrupt);
    assert_eq!(full.record(), Some(i as u64));
    assert!(full.to_string().starts_with("layer 2 ("), "{full}");
    // A merge that copies or decodes it fails the same way and leaves nothing behind.
    let out = dir.join("merged.snap");
    let r = chain.merge(AtomicFileSink::create(&out).unwrap(), &mut |_| {});
    if used {
        let err = in_layer(r, 2);
        assert_eq!(err.record(), Some(i as u64), "{err}");
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_replaced_truncated_or_missing_parent_is_refused() {
    let dir = temp("links");
    let (paths, mems) = build_chain(&dir, 3);
    // The parent saved again, the same content: another file (a new snapshot id).
    let saved = std::fs::read(&paths[1]).unwrap();
    write_layer(
        &paths[1],
        &REGIONS,
        &mems[1],
        &changes(1),
        Some(&paths[0]),
        1,
    );
    match Chain::open(&paths[2]) {
        Err(FormatError::ParentChanged {
            layer,
            path,
            expected,
            found,
        }) => {
            assert_eq!(layer, 2);
            assert_eq!(path, paths[1]);
            assert_ne!(expected, found);
        }
        other => panic!("{other:?}"),
    }
    let err = Chain::open(&paths[2]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Mismatch);
    assert!(err
        .to_string()
        .contains("parent changed since the child was written"));
    // The same bytes back: the chain is whole again.
    std::fs::write(&paths[1], &saved).unwrap();
    Chain::open(&paths[2]).unwrap();
    // The grandparent cut short: incomplete, named as layer 3.
    let base = std::fs::read(&paths[0]).unwrap();
    std::fs::write(&paths[0], &base[..base.len() - 10]).unwrap();
    let err = in_layer(Chain::open(&paths[2]), 3);
    assert_eq!(err.kind(), ErrorKind::Incomplete, "{err}");
    // The grandparent with one more byte: the identity differs (its length).
    let mut longer = base.clone();
    longer.push(0);
    std::fs::write(&paths[0], &longer).unwrap();
    assert!(Chain::open(&paths[2]).is_err());
    // Gone.
    std::fs::remove_file(&paths[0]).unwrap();
    match Chain::open(&paths[2]) {
        Err(e @ FormatError::ParentNotFound { layer: 3, .. }) => {
            assert_eq!(e.kind(), ErrorKind::Unreadable);
            assert!(e.to_string().contains("parent not found"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // Alone, a child cannot be loaded; its parent pages are refused by name.
    let mut rd = SnapshotReader::open(&paths[2]).unwrap();
    let err = rd.load_into(&new_mem(&REGIONS), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, FormatError::InParent { record: None }),
        "{err}"
    );
    rd.verify(&mut |_| {}).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_parent_of_another_layout_and_chains_too_deep_are_refused() {
    let dir = temp("layout");
    let small = [(0u64, 16 * PS)];
    let mem: Memory = pages_of(&small)
        .iter()
        .map(|&p| (p, content(0, p)))
        .collect();
    let base = dir.join("base.snap");
    write_layer(&base, &small, &mem, &|_| true, None, 0);
    // A child of other regions naming that base.
    let other = [(0u64, 32 * PS)];
    let omem: Memory = pages_of(&other)
        .iter()
        .map(|&p| (p, content(1, p)))
        .collect();
    let child = dir.join("other.snap");
    write_layer(&child, &other, &omem, &|p| p % 2 == 0, Some(&base), 1);
    match Chain::open(&child) {
        Err(FormatError::ParentLayoutDiffers { layer: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
    // MAX_CHAIN_LAYERS layers open; one more is refused.
    let mut parent = base.clone();
    let mut mem = mem;
    for gen in 1..=MAX_CHAIN_LAYERS as u64 {
        let path = dir.join(format!("c{gen}.snap"));
        let p = gen % 16;
        mem.insert(p, content(gen, p));
        write_layer(&path, &small, &mem, &|q| q == p, Some(&parent), gen);
        parent = path;
    }
    let top = dir.join(format!("c{}.snap", MAX_CHAIN_LAYERS - 1));
    let chain = Chain::open(&top).unwrap();
    assert_eq!(chain.layers().len(), MAX_CHAIN_LAYERS);
    match Chain::open(&parent) {
        Err(FormatError::ChainTooDeep { max }) => assert_eq!(max, MAX_CHAIN_LAYERS),
        other => panic!("{other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
