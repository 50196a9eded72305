//! Incremental saves of a running built-in guest (`save --parent`): real KVM, real userfaultfd,
//! real files. Every child is checked with the oracle against the guest's deterministic writes at
//! its freeze instant, through its chain flattened into a standalone file (`flatten`: the layers'
//! records applied from the base up, written with the format's writer).

mod common;

use common::*;
use ram_saver::{RecordKind, SnapshotReader, SnapshotWriter};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// `save --json ARGS`; the summary.
fn save(vmm: &Vmm, out: &Path, extra: &[&str]) -> Value {
    let mut a = vec!["save", "--out", out.to_str().unwrap(), "--json"];
    a.extend(extra);
    let o = vmm.ctl(&a, T);
    assert_eq!(
        o.code(),
        Some(0),
        "save {out:?} {extra:?} failed: {}",
        o.stderr
    );
    serde_json::from_slice(&o.stdout).expect("save --json prints JSON")
}

/// `save --parent PARENT --out OUT --json`; the summary.
fn save_child(vmm: &Vmm, parent: &Path, out: &Path) -> Value {
    save(vmm, out, &["--parent", parent.to_str().unwrap()])
}

/// The chain from `top` down to its base: the files, top first.
fn layers(top: &Path) -> Vec<PathBuf> {
    let mut out = vec![top.to_path_buf()];
    loop {
        let cur = out.last().unwrap().clone();
        let r = SnapshotReader::open(&cur).expect("opening a layer");
        let Some(p) = r.header().parent.clone() else {
            return out;
        };
        let parent = p.resolve(&cur);
        let pr = SnapshotReader::open(&parent).expect("opening a parent");
        assert_eq!(
            pr.identity(),
            p.identity,
            "{parent:?} is the parent {cur:?} names"
        );
        out.push(parent);
        assert!(out.len() <= 64, "chain too deep");
    }
}

/// The guest memory the chain ending in `top` holds, indexed by guest physical address (holes
/// between regions zero), and its page size: the base's pages, then each child's data and zero
/// records over them (Parent records keep what is below).
fn image(top: &Path) -> (Vec<u8>, usize) {
    let chain = layers(top);
    let top_r = SnapshotReader::open(top).unwrap();
    let ps = top_r.header().page_size as usize;
    let pages: u64 = top_r
        .header()
        .regions
        .iter()
        .map(|r| (r.gpa + r.size) / ps as u64)
        .max()
        .unwrap();
    let mut image = vec![0u8; pages as usize * ps];
    let mut known = vec![false; pages as usize];
    for (depth, layer) in chain.iter().rev().enumerate() {
        let mut r = SnapshotReader::open(layer).unwrap();
        assert_eq!(
            r.header().parent.is_none(),
            depth == 0,
            "only the base is standalone"
        );
        for rec in r.records() {
            let rec = rec.expect("a layer's record");
            let (first, n) = (rec.first_page as usize, rec.page_count as usize);
            let dst = &mut image[first * ps..(first + n) * ps];
            match rec.kind {
                RecordKind::Parent => {
                    assert!(
                        known[first..first + n].iter().all(|&k| k),
                        "parent pages known"
                    );
                    continue;
                }
                RecordKind::ZeroRun => dst.fill(0),
                _ => dst.copy_from_slice(&rec.data),
            }
            known[first..first + n].fill(true);
        }
    }
    for reg in &top_r.header().regions {
        let (start, end) = (reg.gpa / ps as u64, (reg.gpa + reg.size) / ps as u64);
        assert!(known[start as usize..end as usize].iter().all(|&k| k));
    }
    (image, ps)
}

/// Writes the content of the chain ending in `top` as one standalone file at `out` ([`image`]).
fn flatten(top: &Path, out: &Path) {
    let (image, ps) = image(top);
    let top_r = SnapshotReader::open(top).unwrap();
    let mut header = top_r.header().clone();
    header.parent = None;
    header.compression = ram_saver::Compression::None;
    let sink = ram_saver::AtomicFileSink::create(out).unwrap();
    let mut w = SnapshotWriter::new(sink, &header, top_r.machine_state()).unwrap();
    for reg in &header.regions {
        let (start, end) = (reg.gpa / ps as u64, (reg.gpa + reg.size) / ps as u64);
        let mut p = start;
        while p < end {
            let n = (end - p).min(512);
            let data = &image[p as usize * ps..(p + n) as usize * ps];
            if data.iter().all(|&b| b == 0) {
                w.write_zero_run(p, n).unwrap();
            } else {
                w.write_pages(p, data).unwrap();
            }
            p += n;
        }
    }
    w.finish().unwrap();
}

/// The oracle on the chain ending in `top` (read as a chain by `snapctl oracle`): its content is
/// the guest memory at the top's freeze instant.
fn oracle_chain(top: &Path) {
    let o = run(&["oracle", top.to_str().unwrap()], T);
    assert_eq!(
        o.code(),
        Some(0),
        "oracle of {top:?}'s chain failed: {}",
        o.stderr
    );
}

/// The oracle on the chain ending in `top` flattened by this test itself (independent of the
/// chain reader): the layers' records applied from the base up.
fn oracle_flattened(top: &Path) {
    let flat = top.with_extension("flat");
    flatten(top, &flat);
    let o = run(&["oracle", flat.to_str().unwrap()], T);
    assert_eq!(
        o.code(),
        Some(0),
        "oracle of {top:?} flattened failed: {}",
        o.stderr
    );
    std::fs::remove_file(&flat).unwrap();
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

/// A chain of incremental saves while the guest writes (all of its memory, or a hot set), each
/// child checked with the oracle, and the child of a hot-set guest much smaller than a full save.
fn chain_while_writing(boot: &[&str], hot: bool) {
    let _g = serial();
    let dir = TempDir::new("incr-chain");
    let vmm = Vmm::boot(dir.path(), boot);
    let base = dir.join("base.snap");
    let full = save(&vmm, &base, &[]);
    assert!(full["tracking"] == true, "tracking after a save: {full}");
    assert!(full.get("parent").is_none());
    oracle_chain(&base);
    let mut parent = base.clone();
    for i in 1..=3 {
        std::thread::sleep(Duration::from_millis(300));
        let st = vmm.status();
        assert_eq!(st["tracking"]["state"], "tracking", "{st}");
        assert!(
            u(&st, "dirty_bytes") > 0,
            "the guest wrote since the save: {st}"
        );
        let child = dir.join(&format!("child{i}.snap"));
        let s = save_child(&vmm, &parent, &child);
        assert_eq!(
            s["parent"],
            parent.to_str().unwrap(),
            "an incremental save: {s}"
        );
        assert!(s.get("full_reason").is_none(), "{s}");
        assert_eq!(
            u(&s, "stored_bytes") + u(&s, "inherited_bytes"),
            vmm.mem_bytes,
            "{s}"
        );
        if hot {
            assert!(
                u(&s, "file_bytes") * 8 < u(&full, "file_bytes"),
                "a hot-set child is much smaller than the full save: {} vs {}",
                u(&s, "file_bytes"),
                u(&full, "file_bytes")
            );
        }
        verify(&child);
        oracle_chain(&child);
        oracle_flattened(&child);
        parent = child;
    }
    vmm.assert_progress(Duration::from_secs(10));
    let o = vmm.ctl(&["self-check"], T);
    assert_eq!(o.code(), Some(0), "self-check: {}", o.stderr);
    drop(vmm);
    // The chain's top restores (each page from the layer holding it) into a guest that passes its
    // self-check, and saves incrementally against that top.
    let restored = restore(dir.path(), &parent);
    restored.assert_progress(Duration::from_secs(10));
    let o = restored.ctl(&["self-check"], T);
    assert_eq!(
        o.code(),
        Some(0),
        "self-check after restoring the chain: {}",
        o.stderr
    );
    let next = dir.join("after-restore.snap");
    let s = save_child(&restored, &parent, &next);
    assert_eq!(s["parent"], parent.to_str().unwrap(), "{s}");
    oracle_chain(&next);
}

#[test]
fn chain_of_incremental_saves_at_full_write_rate() {
    chain_while_writing(&["--mem", "256M", "--write-rate", "full"], false);
}

#[test]
fn chain_of_incremental_saves_with_a_hot_set() {
    chain_while_writing(&["--mem", "256M", "--working-set", "2M"], true);
}

#[test]
fn chain_of_incremental_saves_on_4k_page_memory() {
    // memfd: 4 KiB pages, 64 KiB fault blocks, writes tracked per 4 KiB page.
    chain_while_writing(
        &[
            "--mem",
            "256M",
            "--mem-backend",
            "memfd",
            "--working-set",
            "2M",
        ],
        true,
    );
}

#[test]
fn an_unchanged_guests_child_stores_no_page_data() {
    let _g = serial();
    let dir = TempDir::new("incr-idle");
    let vmm = Vmm::boot(dir.path(), &["--mem", "128M", "--write-rate", "idle"]);
    let base = dir.join("base.snap");
    save(&vmm, &base, &[]);
    std::thread::sleep(Duration::from_millis(300));
    // An idle guest still takes timer interrupts: its handler writes the tick count (control
    // page) and an interrupt frame (kernel stacks), both in the first 2 MiB unit. Nothing else;
    // and of that unit only the pages whose content changed are stored (the tick count's).
    let child = dir.join("child.snap");
    let s = save_child(&vmm, &base, &child);
    assert_eq!(u(&s, "pages_compared"), 512, "the first unit only: {s}");
    let stored = u(&s, "stored_bytes");
    assert!((4096..=8 * 4096).contains(&stored), "a few pages: {s}");
    assert_eq!(u(&s, "inherited_bytes") + stored, vmm.mem_bytes, "{s}");
    let r = SnapshotReader::open(&child).unwrap();
    for e in &r.trailer().index {
        assert!(
            e.kind == RecordKind::Parent || e.first_page + u64::from(e.page_count) <= 512,
            "only the first unit is stored: {e:?}"
        );
    }
    oracle_chain(&child);
    // A paused guest writes nothing at all: its child is Parent records only.
    let o = vmm.ctl(&["pause"], T);
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    let paused = dir.join("paused.snap");
    save_child(&vmm, &child, &paused);
    std::thread::sleep(Duration::from_millis(300));
    let unchanged = dir.join("unchanged.snap");
    let s = save_child(&vmm, &paused, &unchanged);
    assert_eq!(u(&s, "data_pages"), 0, "no data records: {s}");
    assert_eq!(u(&s, "zero_pages"), 0, "no zero runs either: {s}");
    assert_eq!(u(&s, "inherited_bytes"), vmm.mem_bytes, "{s}");
    let r = SnapshotReader::open(&unchanged).unwrap();
    assert!(r
        .trailer()
        .index
        .iter()
        .all(|e| e.kind == RecordKind::Parent));
    oracle_chain(&unchanged);
    let o = vmm.ctl(&["resume"], T);
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    assert_eq!(vmm.status()["state"], "running");
}

#[test]
fn a_parent_that_is_not_the_last_save_gives_a_full_save_and_says_why() {
    let _g = serial();
    let dir = TempDir::new("incr-fallback");
    let vmm = Vmm::boot(dir.path(), &["--mem", "128M", "--working-set", "1M"]);
    let (a, b) = (dir.join("a.snap"), dir.join("b.snap"));
    save(&vmm, &a, &[]);
    save(&vmm, &b, &[]);
    // `a` is not the last save.
    let c = dir.join("c.snap");
    let s = save_child(&vmm, &a, &c);
    let why = s["full_reason"].as_str().expect("full_reason");
    assert!(
        why.starts_with(&format!(
            "no record of writes since {}'s freeze: saved all memory",
            a.display()
        )),
        "{why}"
    );
    assert!(s.get("parent").is_none(), "{s}");
    assert_eq!(u(&s, "inherited_bytes"), 0);
    assert!(SnapshotReader::open(&c).unwrap().header().parent.is_none());
    oracle_chain(&c);
    // The human summary says it in one line.
    let d = dir.join("d.snap");
    let o = vmm.ctl(
        &[
            "save",
            "--parent",
            a.to_str().unwrap(),
            "--out",
            d.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    assert!(
        o.stderr.contains("no record of writes since"),
        "{}",
        o.stderr
    );

    // A parent replaced by another file (same path, other content): its identity differs, so
    // it is not the last save: a full save, never a child of the wrong parent.
    std::fs::copy(&c, &d).unwrap();
    let e = dir.join("e.snap");
    let s = save_child(&vmm, &d, &e);
    assert!(s["full_reason"].is_string(), "{s}");
    oracle_chain(&e);

    // A parent that is no snapshot at all is refused before the guest is touched.
    let junk = dir.join("junk.snap");
    std::fs::write(&junk, b"not a snapshot").unwrap();
    let f = dir.join("f.snap");
    let o = vmm.ctl(
        &[
            "save",
            "--parent",
            junk.to_str().unwrap(),
            "--out",
            f.to_str().unwrap(),
        ],
        T,
    );
    assert_ne!(o.code(), Some(0));
    assert!(o.stderr.contains("cannot use"), "{}", o.stderr);
    assert!(!f.exists());
    // Tracking is intact: the last save (e) is a good parent.
    let g = dir.join("g.snap");
    let s = save_child(&vmm, &e, &g);
    assert_eq!(s["parent"], e.to_str().unwrap(), "{s}");
    oracle_chain(&g);
}

#[test]
fn a_cancelled_incremental_save_leaves_the_guest_free_and_the_next_save_right() {
    let _g = serial();
    let dir = TempDir::new("incr-cancel");
    let vmm = Vmm::boot(dir.path(), &["--mem", "256M", "--write-rate", "full"]);
    let base = dir.join("base.snap");
    save(&vmm, &base, &[]);
    std::thread::sleep(Duration::from_millis(500));
    // Slow enough to be cancelled midway: the guest rewrote all of its memory.
    let child = dir.join("child.snap");
    let p = vmm.spawn_save(&[
        "--parent",
        base.to_str().unwrap(),
        "--out",
        child.to_str().unwrap(),
        "--max-bandwidth",
        "4M",
    ]);
    vmm.wait_save(true, T);
    std::thread::sleep(Duration::from_millis(500));
    p.signal(nix::sys::signal::Signal::SIGINT);
    let o = p.wait(T, "cancelled save");
    assert_eq!(o.code(), Some(130), "{}", o.stderr);
    assert!(!child.exists());
    vmm.wait_save(false, T);
    // Nothing protected with nobody serving it, and the guest runs.
    assert_eq!(vmm.wp_pages(), 0, "no page stays write-protected");
    vmm.assert_progress(Duration::from_secs(10));
    let st = vmm.status();
    assert_eq!(st["tracking"]["state"], "broken", "{st}");
    // The next save naming the parent is right: a full save that says why …
    let next = dir.join("next.snap");
    let s = save_child(&vmm, &base, &next);
    assert!(s["full_reason"].is_string(), "{s}");
    oracle_chain(&next);
    // … and tracking is back: the one after is incremental.
    std::thread::sleep(Duration::from_millis(200));
    let after = dir.join("after.snap");
    let s = save_child(&vmm, &next, &after);
    assert_eq!(s["parent"], next.to_str().unwrap(), "{s}");
    oracle_chain(&after);
}

/// `snapctl restore FILE` (eager) on its own socket in `dir`, once it answers.
fn restore(dir: &Path, file: &Path) -> Vmm {
    restore_as(dir, file, "restored", &[])
}

/// `snapctl restore FILE ARGS` on socket `TAG.sock` in `dir`, once it answers.
fn restore_as(dir: &Path, file: &Path, tag: &str, args: &[&str]) -> Vmm {
    let sock = dir.join(format!("{tag}.sock"));
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("restore")
        .arg(file)
        .args(args)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join(format!("{tag}.serial")));
    let mut vmm = Vmm {
        proc: Proc::spawn_cmd(&mut cmd, true),
        sock,
        mem_bytes: 0,
    };
    let t0 = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&vmm.sock).is_err() {
        assert!(vmm.proc.running(), "restore exited early");
        assert!(t0.elapsed() < T, "restore: no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    vmm.mem_bytes = u(&vmm.status(), "mem_bytes");
    vmm
}

#[test]
fn a_restored_vm_saves_incrementally_against_the_restored_file() {
    let _g = serial();
    let dir = TempDir::new("incr-restore");
    let base = dir.join("base.snap");
    {
        let vmm = Vmm::boot(dir.path(), &["--mem", "256M", "--working-set", "2M"]);
        save(&vmm, &base, &[]);
    }
    let vmm = restore(dir.path(), &base);
    let st = vmm.status();
    assert_eq!(st["tracking"]["state"], "tracking", "{st}");
    assert_eq!(st["tracking"]["since"], base.to_str().unwrap(), "{st}");
    vmm.assert_progress(Duration::from_secs(10));
    let child = dir.join("child.snap");
    let s = save_child(&vmm, &base, &child);
    assert_eq!(s["parent"], base.to_str().unwrap(), "{s}");
    assert!(
        u(&s, "stored_bytes") * 8 < vmm.mem_bytes,
        "a hot set only: {s}"
    );
    oracle_chain(&child);
    let grandchild = dir.join("grandchild.snap");
    let s = save_child(&vmm, &child, &grandchild);
    assert_eq!(s["parent"], child.to_str().unwrap(), "{s}");
    oracle_chain(&grandchild);
    let o = vmm.ctl(&["self-check"], T);
    assert_eq!(o.code(), Some(0), "self-check: {}", o.stderr);
}

/// Pages whose content differs between the memory of the chains ending in `a` and `b`.
fn changed_pages(a: &Path, b: &Path) -> u64 {
    let ((x, ps), (y, _)) = (image(a), image(b));
    assert_eq!(x.len(), y.len());
    x.chunks(ps)
        .zip(y.chunks(ps))
        .filter(|(p, q)| p != q)
        .count() as u64
}

/// The child `child` of `parent` (its save summary `s`) stores the pages whose content changed
/// between their freeze instants (the oracle: both chains' memory compared page by page), at
/// most 5 % more, and says so: every stored page is one it compared and found changed. Returns
/// the pages it compared.
fn assert_stores_changed_pages(parent: &Path, child: &Path, s: &Value) -> u64 {
    let changed = changed_pages(parent, child);
    let stored = u(s, "data_pages") + u(s, "zero_pages");
    assert!(changed > 0, "the guest wrote between the saves");
    assert!(stored >= changed, "{stored} stored, {changed} changed: {s}");
    assert!(
        stored * 100 <= changed * 105,
        "{stored} pages stored for {changed} changed: {s}"
    );
    let compared = u(s, "pages_compared");
    assert_eq!(compared - u(s, "pages_unchanged"), stored, "{s}");
    compared
}

/// A guest writing random 4 KiB pages at a low rate over all of its memory (THP) writes into
/// nearly every 2 MiB unit between two saves; each child stores only the pages whose content
/// changed (page hashes compared with the parent's), and so does the first child after an eager
/// restore (the hashes rebuilt from the loaded pages).
#[test]
fn a_child_stores_only_the_pages_whose_content_changed() {
    let _g = serial();
    let dir = TempDir::new("incr-pages");
    let vmm = Vmm::boot(dir.path(), &["--mem", "256M", "--write-rate", "200"]);
    let base = dir.join("base.snap");
    save(&vmm, &base, &[]);
    let mut parent = base;
    for i in 1..=2 {
        std::thread::sleep(Duration::from_millis(400));
        let child = dir.join(&format!("child{i}.snap"));
        let s = save_child(&vmm, &parent, &child);
        assert_eq!(s["parent"], parent.to_str().unwrap(), "{s}");
        let compared = assert_stores_changed_pages(&parent, &child, &s);
        let stored = u(&s, "data_pages") + u(&s, "zero_pages");
        assert!(
            compared >= 4 * stored,
            "random writes dirty whole units, of which few pages changed: {s}"
        );
        oracle_chain(&child);
        oracle_flattened(&child);
        parent = child;
    }
    let o = vmm.ctl(&["self-check"], T);
    assert_eq!(o.code(), Some(0), "self-check: {}", o.stderr);
    drop(vmm);
    let restored = restore(dir.path(), &parent);
    restored.assert_progress(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(400));
    let next = dir.join("after-restore.snap");
    let s = save_child(&restored, &parent, &next);
    assert_eq!(s["parent"], parent.to_str().unwrap(), "{s}");
    assert_stores_changed_pages(&parent, &next, &s);
    oracle_chain(&next);
    let o = restored.ctl(&["self-check"], T);
    assert_eq!(o.code(), Some(0), "self-check after restore: {}", o.stderr);
    drop(restored);
    // A lazy restore reads the chain's units cut into data and Parent records page by page.
    let lazy = restore_as(dir.path(), &next, "lazy", &["--lazy"]);
    let t0 = std::time::Instant::now();
    loop {
        let r = lazy.status()["restore"].clone();
        assert!(r["failed"].is_null(), "lazy restore failed: {r}");
        if r["done"] == true {
            break;
        }
        assert!(t0.elapsed() < T, "fill not done: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    lazy.assert_progress(Duration::from_secs(10));
    let o = lazy.ctl(&["self-check"], T);
    assert_eq!(
        o.code(),
        Some(0),
        "self-check after a lazy restore: {}",
        o.stderr
    );
}

/// A save that fails after its live save hashed every page (its directory vanishes before the
/// file is committed) leaves no wrong record: the next save naming the parent stores all memory
/// and says why, and the children after it store only changed pages, right by the oracle.
#[test]
fn a_save_failing_after_hashing_leaves_the_next_children_right() {
    let _g = serial();
    let dir = TempDir::new("incr-vanish");
    let vmm = Vmm::boot(dir.path(), &["--mem", "256M", "--write-rate", "200"]);
    let base = dir.join("base.snap");
    save(&vmm, &base, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let gone = dir.join("gone");
    std::fs::create_dir(&gone).unwrap();
    let child = gone.join("child.snap");
    // Slow enough to remove the directory while it runs.
    let p = vmm.spawn_save(&[
        "--parent",
        base.to_str().unwrap(),
        "--out",
        child.to_str().unwrap(),
        "--max-bandwidth",
        "64M",
    ]);
    // Its temporary file exists: the output is open, the live save about to run or running.
    let t0 = std::time::Instant::now();
    while std::fs::read_dir(&gone).unwrap().next().is_none() {
        assert!(t0.elapsed() < T, "no temporary file in {gone:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::remove_dir_all(&gone).unwrap();
    let o = p.wait(T, "save into a vanished directory");
    assert_ne!(o.code(), Some(0), "the save cannot commit: {}", o.stderr);
    vmm.wait_save(false, T);
    // The live save released all memory: the record of writes is broken, nothing is protected.
    let st = vmm.status();
    assert_eq!(st["tracking"]["state"], "broken", "{}: {st}", o.stderr);
    assert_eq!(vmm.wp_pages(), 0, "no page stays write-protected");
    vmm.assert_progress(Duration::from_secs(10));
    let next = dir.join("next.snap");
    let s = save_child(&vmm, &base, &next);
    assert!(s["full_reason"].is_string(), "{s}");
    oracle_chain(&next);
    let mut parent = next;
    for i in 1..=2 {
        std::thread::sleep(Duration::from_millis(300));
        let after = dir.join(&format!("after{i}.snap"));
        let s = save_child(&vmm, &parent, &after);
        assert_eq!(s["parent"], parent.to_str().unwrap(), "{s}");
        assert_stores_changed_pages(&parent, &after, &s);
        oracle_chain(&after);
        parent = after;
    }
    // A save without page hashes stores whole written units and leaves no hash to trust: the
    // child after it stores its written units whole too (nothing compared equal), and is right.
    std::thread::sleep(Duration::from_millis(300));
    let whole = dir.join("whole.snap");
    let s = save(
        &vmm,
        &whole,
        &["--parent", parent.to_str().unwrap(), "--no-page-hashes"],
    );
    assert_eq!(u(&s, "pages_compared"), 0, "{s}");
    let changed = changed_pages(&parent, &whole);
    assert!(
        u(&s, "data_pages") + u(&s, "zero_pages") >= 4 * changed,
        "whole written units, not the {changed} changed pages: {s}"
    );
    oracle_chain(&whole);
    std::thread::sleep(Duration::from_millis(300));
    let next = dir.join("after-whole.snap");
    let s = save_child(&vmm, &whole, &next);
    assert_eq!(u(&s, "pages_unchanged"), 0, "no hash is known: {s}");
    assert_eq!(
        u(&s, "inherited_bytes") + u(&s, "stored_bytes"),
        vmm.mem_bytes
    );
    oracle_chain(&next);
}

#[test]
fn with_write_tracking_off_saves_leave_nothing_protected_and_parent_saves_store_everything() {
    let _g = serial();
    let dir = TempDir::new("incr-track-off");
    let vmm = Vmm::boot(
        dir.path(),
        &[
            "--mem",
            "128M",
            "--working-set",
            "1M",
            "--track-writes",
            "off",
        ],
    );
    let st = vmm.status();
    assert_eq!(st["track_writes"], false, "{st}");
    assert_eq!(st["tracking"]["state"], "off", "{st}");
    assert!(
        st["tracking"]["reason"]
            .as_str()
            .unwrap()
            .contains("write tracking is off in this VMM"),
        "{st}"
    );
    let a = dir.join("a.snap");
    let s = save(&vmm, &a, &[]);
    assert_eq!(s["tracking"], false, "{s}");
    // The save released everything and nobody protects memory between saves.
    assert_eq!(
        vmm.wp_pages(),
        0,
        "pages write-protected after a save with tracking off"
    );
    vmm.assert_progress(Duration::from_secs(10));
    let st = vmm.status();
    assert_eq!(st["tracking"]["state"], "off", "{st}");
    assert!(st.get("dirty_bytes").is_none(), "{st}");

    // `--parent` of the last save: a standalone full save, saying why.
    let b = dir.join("b.snap");
    let s = save_child(&vmm, &a, &b);
    let why = s["full_reason"].as_str().expect("full_reason");
    assert!(
        why.starts_with(&format!(
            "no record of writes since {}'s freeze: saved all memory",
            a.display()
        )) && why.contains("write tracking is off in this VMM"),
        "{why}"
    );
    assert!(s.get("parent").is_none(), "{s}");
    assert_eq!(u(&s, "inherited_bytes"), 0, "{s}");
    assert_eq!(u(&s, "stored_bytes"), vmm.mem_bytes, "{s}");
    assert!(SnapshotReader::open(&b).unwrap().header().parent.is_none());
    oracle_chain(&b);
    assert_eq!(
        vmm.wp_pages(),
        0,
        "pages write-protected after a parent save with tracking off"
    );
    let c = dir.join("c.snap");
    let o = vmm.ctl(
        &[
            "save",
            "--parent",
            b.to_str().unwrap(),
            "--out",
            c.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(o.code(), Some(0), "{}", o.stderr);
    assert!(
        o.stderr.contains("write tracking is off in this VMM"),
        "{}",
        o.stderr
    );
    drop(vmm);

    // A restore with tracking off protects nothing; with tracking on (the default) it protects
    // all memory, so the check above can fail.
    let off = restore_as(dir.path(), &a, "off", &["--track-writes", "off"]);
    let st = off.status();
    assert_eq!(st["track_writes"], false, "{st}");
    assert_eq!(st["tracking"]["state"], "off", "{st}");
    assert_eq!(
        off.wp_pages(),
        0,
        "pages write-protected after a restore with tracking off"
    );
    off.assert_progress(Duration::from_secs(10));
    let d = dir.join("d.snap");
    let s = save_child(&off, &a, &d);
    assert!(s["full_reason"].is_string(), "{s}");
    assert_eq!(off.wp_pages(), 0);
    drop(off);
    let on = restore_as(dir.path(), &a, "on", &[]);
    let st = on.status();
    assert_eq!(st["track_writes"], true, "{st}");
    assert_eq!(st["tracking"]["state"], "tracking", "{st}");
    assert!(
        on.wp_pages() > 0,
        "a restore with tracking on protects memory"
    );
}
