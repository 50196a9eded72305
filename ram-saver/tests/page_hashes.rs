//! Page hashes in real live saves (real memory, real userfaultfd write protection, writer
//! threads in place of vCPUs): a full save fills the table, write tracking goes on between saves
//! (`wp_tracker::DirtyTracker`), and an incremental save stores exactly the pages whose content
//! changed since the parent — a unit rewritten with equal bytes, before or during the save, is
//! not stored — and the chain holds the memory of the child's freeze instant, page by page.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread;

use ram_saver::{
    live_save, page_hash, AtomicFileSink, Chain, Compression, MemRegion, PageHashes, ParentRef,
    SaveOptions, SaveSummary, SnapshotHeader, HASH_PAGE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wp_tracker::{DirtyTracker, Precision, WpTracker};

const PS: usize = 4096;
const MIB: usize = 1 << 20;
/// 16 MiB at 0 and 4 MiB at 4 GiB: eight and two 2 MiB units.
const LAYOUT: [(u64, usize); 2] = [(0, 16 * MIB), (1 << 32, 4 * MIB)];

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Page contents for generation `gen`: every fourth page zero, the others distinct.
fn content(gen: u64, gpa: u64) -> Vec<u8> {
    let mut b = vec![0u8; PS];
    if !(gpa / PS as u64).is_multiple_of(4) {
        for (i, c) in b.chunks_mut(8).enumerate() {
            c.copy_from_slice(&splitmix(gen << 48 ^ gpa ^ i as u64).to_le_bytes());
        }
    }
    b
}

fn all_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    mem.iter()
        .flat_map(|r| {
            let a = r.start_addr().0;
            (0..r.len() / PS as u64).map(move |k| a + k * PS as u64)
        })
        .collect()
}

fn snapshot_of(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    all_pages(mem)
        .into_iter()
        .map(|gpa| {
            let mut b = vec![0u8; PS];
            mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
            b
        })
        .collect()
}

fn header(mem: &GuestMemoryMmap) -> SnapshotHeader {
    let regions = mem
        .iter()
        .map(|r| MemRegion {
            gpa: r.start_addr().0,
            size: r.len(),
        })
        .collect();
    SnapshotHeader::new(regions, 1, b"{\"test\":\"page-hashes\"}".to_vec())
}

fn tmp_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("page-hashes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every page of `mem` at `gpa..gpa+len` rewritten with `f(gpa)` by a thread (its writes fault
/// and wait for whoever serves the userfaultfd).
fn write_pages(mem: &GuestMemoryMmap, gpas: Vec<u64>, f: impl Fn(u64) -> Vec<u8> + Send + Sync) {
    thread::scope(|s| {
        s.spawn(|| {
            for gpa in gpas {
                mem.write_slice(&f(gpa), GuestAddress(gpa)).unwrap();
            }
        });
    });
}

fn save(
    mem: &GuestMemoryMmap,
    wp: &WpTracker,
    path: &std::path::Path,
    header: SnapshotHeader,
    opts: &SaveOptions,
) -> SaveSummary {
    let sink = AtomicFileSink::create(path).unwrap();
    live_save(
        mem,
        wp,
        sink,
        header,
        b"state",
        opts,
        &|_| {},
        &AtomicBool::new(false),
    )
    .expect("live save")
}

#[test]
fn an_incremental_save_stores_only_pages_whose_content_changed() {
    let ranges: Vec<_> = LAYOUT.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    for gpa in all_pages(&mem) {
        mem.write_slice(&content(0, gpa), GuestAddress(gpa))
            .unwrap();
    }
    let wp = Arc::new(WpTracker::new().expect("userfaultfd with write-protect"));
    wp.register_memory(&mem).unwrap();
    let dir = tmp_dir();
    let table = Arc::new(PageHashes::for_memory(&mem));
    let base_opts = SaveOptions {
        compression: Compression::Zstd { level: 1 },
        keep_protected: true,
        page_hashes: Some(table.clone()),
        ..Default::default()
    };

    // Full save: every page hashed.
    wp.protect_all().unwrap();
    let parent_path = dir.join("parent.snap");
    let full = save(&mem, &wp, &parent_path, header(&mem), &base_opts);
    assert_eq!(full.pages_compared, 0, "a full save compares nothing");
    assert_eq!(full.parent_pages, 0);
    let at_parent = snapshot_of(&mem);
    let pages = all_pages(&mem);
    for (k, p) in at_parent.iter().enumerate() {
        let slot = table.slot(pages[k] / PS as u64).unwrap();
        assert_eq!(table.get(slot), page_hash(p), "page {:#x}", pages[k]);
    }

    // Between saves, tracked in whole 2 MiB units (as on huge pages): unit 0 rewritten whole
    // with equal bytes; units 2 and 9 (the second region) with 5 and 3 pages changed; unit 4:
    // a page changed and written back.
    let tracker = DirtyTracker::resume(wp.clone(), Precision::Unit, &full.released).unwrap();
    let unit = |u: u64, k: u64| {
        if u < 8 {
            u * 2 * MIB as u64 + k * PS as u64
        } else {
            (1 << 32) + (u - 8) * 2 * MIB as u64 + k * PS as u64
        }
    };
    write_pages(&mem, (0..512).map(|k| unit(0, k)).collect(), |g| {
        content(0, g)
    });
    let changed: Vec<u64> = [3, 77, 78, 301, 511]
        .iter()
        .map(|&k| unit(2, k))
        .chain([1, 2, 201].iter().map(|&k| unit(9, k)))
        .collect();
    write_pages(&mem, changed.clone(), |g| content(1, g));
    write_pages(&mem, vec![unit(4, 9)], |g| content(7, g));
    write_pages(&mem, vec![unit(4, 9)], |g| content(0, g));
    // Unit 6: page 12 (a zero page) changed; unit 7: page 5 becomes zero.
    write_pages(&mem, vec![unit(6, 12)], |g| content(1, g | 4096));
    write_pages(&mem, vec![unit(7, 5)], |_| vec![0u8; PS]);
    let set = tracker.suspend().unwrap();
    assert_eq!(set.bytes(), 6 * 2 * MIB, "the writes dirtied 6 units");
    let at_child = snapshot_of(&mem);
    let really_changed = at_parent
        .iter()
        .zip(&at_child)
        .filter(|(a, b)| a != b)
        .count() as u64;
    assert_eq!(really_changed, 10);
    let zero_now = at_parent
        .iter()
        .zip(&at_child)
        .filter(|(a, b)| a != b && b.iter().all(|&x| x == 0))
        .count() as u64;

    // Incremental save; meanwhile a thread rewrites unit 0 again (with new bytes, after the
    // freeze: the save must store its content at the freeze, the parent's, i.e. nothing).
    let child_path = dir.join("child.snap");
    let mut h = header(&mem);
    let parent_id = ram_saver::SnapshotReader::open(&parent_path)
        .unwrap()
        .identity();
    h.parent = Some(ParentRef::new(parent_id, &parent_path, &child_path));
    let opts = SaveOptions {
        increment: Some(set.ranges.clone()),
        ..base_opts.clone()
    };
    let child = thread::scope(|s| {
        let w = s.spawn(|| {
            for k in 0..512 {
                mem.write_slice(&content(5, unit(0, k)), GuestAddress(unit(0, k)))
                    .unwrap();
            }
        });
        let c = save(&mem, &wp, &child_path, h, &opts);
        // Faults after the save's commit are the tracker's to serve.
        let t = DirtyTracker::resume(wp.clone(), Precision::Unit, &c.released).unwrap();
        w.join().unwrap();
        drop(t);
        c
    });
    assert_eq!(
        child.data_pages + child.zero_pages,
        really_changed,
        "stored pages are exactly the changed ones: {child:?}"
    );
    assert_eq!(child.zero_pages, zero_now);
    assert_eq!(child.pages_compared, set.bytes() as u64 / PS as u64);
    assert_eq!(
        child.pages_unchanged,
        child.pages_compared - really_changed,
        "every dirty page compared, the equal ones inherited"
    );
    assert_eq!(child.pages_saved, pages.len() as u64);

    // The chain holds the child's freeze instant; the table describes it.
    let mut chain = Chain::open(&child_path).unwrap();
    chain.verify(&mut |_, _| {}).unwrap();
    let fresh: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    chain.load_into(&fresh, &mut |_| {}).unwrap();
    let loaded = snapshot_of(&fresh);
    for (k, want) in at_child.iter().enumerate() {
        assert!(loaded[k] == *want, "page {:#x} restored wrong", pages[k]);
        let slot = table.slot(pages[k] / PS as u64).unwrap();
        assert_eq!(table.get(slot), page_hash(want), "hash of {:#x}", pages[k]);
    }
    // Hashing the restored memory gives the same table.
    let again = PageHashes::for_memory(&fresh);
    again.fill_from(&fresh, 3).unwrap();
    for k in 0..pages.len() {
        assert_eq!(again.get(k), table.get(k));
    }
    assert_eq!(again.known(), pages.len());
    assert_eq!(HASH_PAGE, PS);
    std::fs::remove_dir_all(&dir).unwrap();
}
