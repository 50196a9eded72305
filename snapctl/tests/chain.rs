//! Incremental snapshots through the CLI: a real built-in guest is saved twice (`snapctl boot` +
//! `save`, a moment apart); the second save is written again with ram-saver's writer as a child
//! of the first (the pages that differ stored, the others left to the parent: records of both
//! layers cut anywhere), and that child is then verified, shown, checked by the oracle against
//! the second save's freeze instant, merged, and restored eagerly and lazily: the guest's
//! self-check passes and every vCPU runs on. A child whose parent is gone is refused by name.

mod common;

use common::*;
use ram_saver::{AtomicFileSink, ParentRef, RecordKind, SnapshotReader, SnapshotWriter};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const T: Duration = Duration::from_secs(120);

/// Writes at `child` the incremental form of `full` against `parent` (two saves of one guest):
/// `full`'s header and machine state, the pages where `full` differs from `parent` stored, the
/// others left to the parent. Its content is exactly `full`'s. Returns (pages stored, pages left
/// to the parent).
fn write_child(parent: &Path, full: &Path, child: &Path) -> (u64, u64) {
    let load = |p: &Path| {
        let mut rd = SnapshotReader::open(p).unwrap();
        let ranges: Vec<(GuestAddress, usize)> = rd
            .header()
            .regions
            .iter()
            .map(|r| (GuestAddress(r.gpa), r.size as usize))
            .collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        rd.load_into(&mem, &mut |_| {}).unwrap();
        (rd, mem)
    };
    let (prd, pmem) = load(parent);
    let (frd, fmem) = load(full);
    assert_eq!(prd.header().regions, frd.header().regions);
    let mut h = frd.header().clone();
    h.parent = Some(ParentRef::of(&prd, parent, child));
    h.snapshot_id = ram_saver::format::random_snapshot_id();
    let mut w = SnapshotWriter::new(
        AtomicFileSink::create(child).unwrap(),
        &h,
        frd.machine_state(),
    )
    .unwrap();
    let ps = u64::from(h.page_size);
    let (mut stored, mut left) = (0, 0);
    let (mut a, mut b) = (vec![0u8; ps as usize], vec![0u8; ps as usize]);
    for r in &h.regions {
        let (first, end) = (r.gpa / ps, (r.gpa + r.size) / ps);
        let mut p = first;
        while p < end {
            let differs = |q: u64, a: &mut Vec<u8>, b: &mut Vec<u8>| {
                pmem.read_slice(a, GuestAddress(q * ps)).unwrap();
                fmem.read_slice(b, GuestAddress(q * ps)).unwrap();
                a != b
            };
            let d = differs(p, &mut a, &mut b);
            let mut q = p + 1;
            while q < end && q - p < 512 && differs(q, &mut a, &mut b) == d {
                q += 1;
            }
            if d {
                let mut data = vec![0u8; ((q - p) * ps) as usize];
                fmem.read_slice(&mut data, GuestAddress(p * ps)).unwrap();
                w.write_pages(p, &data).unwrap();
                stored += q - p;
            } else {
                w.write_parent_run(p, q - p).unwrap();
                left += q - p;
            }
            p = q;
        }
    }
    w.finish().unwrap();
    (stored, left)
}

/// `snapctl ARGS` must succeed; returns its standard output.
fn ok(args: &[&str]) -> String {
    let out = run(args, T);
    assert_eq!(out.code(), Some(0), "{args:?}: {}", out.stderr);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Restores `file` (lazily with `lazy`) on its own socket, waits until the guest runs on (and a
/// lazy restore is done), runs the guest's self-check, and shuts the VM down.
fn restore_and_check(dir: &Path, tag: &str, file: &Path, lazy: bool) {
    let sock = dir.join(format!("{tag}.sock"));
    let mut cmd = Command::new(bin());
    cmd.arg("restore").arg(file);
    if lazy {
        cmd.arg("--lazy");
    }
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join(format!("{tag}.serial")));
    let mut vmm = Vmm {
        proc: Proc::spawn_cmd(&mut cmd, true),
        sock,
        mem_bytes: 0,
    };
    let t0 = Instant::now();
    while UnixStream::connect(&vmm.sock).is_err() {
        assert!(vmm.proc.running(), "{tag}: restore exited early");
        assert!(t0.elapsed() < T, "{tag}: no socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    if lazy {
        loop {
            let st = vmm.status();
            let r = &st["restore"];
            assert!(r["failed"].is_null(), "{tag}: lazy restore failed: {r}");
            if r["done"] == true {
                assert_eq!(r["resident_bytes"], r["total_bytes"], "{tag}: {r}");
                break;
            }
            assert!(t0.elapsed() < T, "{tag}: fill not done: {r}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    vmm.assert_progress(Duration::from_secs(20));
    let out = vmm.ctl(&["self-check", "--json"], T);
    assert_eq!(
        out.code(),
        Some(0),
        "{tag}: self-check failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        out.stderr
    );
    let out = vmm.ctl(&["shutdown"], T);
    assert_eq!(out.code(), Some(0), "{tag}: shutdown: {}", out.stderr);
    let Vmm { proc, .. } = vmm;
    let out = proc.wait(T, tag);
    assert_eq!(out.code(), Some(0), "{tag}: VMM exit: {}", out.stderr);
}

#[test]
fn a_child_of_a_real_save_verifies_merges_and_restores_eagerly_and_lazily() {
    let _s = serial();
    let dir = TempDir::new("chain");
    let vmm = Vmm::boot(
        dir.path(),
        &[
            "--mem",
            "128M",
            "--vcpus",
            "2",
            "--write-rate",
            "full",
            "--working-set",
            "8M",
        ],
    );
    let base = dir.join("base.snap");
    vmm.save_and_verify(&base, &["--zstd"]);
    std::thread::sleep(Duration::from_millis(300));
    let full = dir.join("full.snap");
    vmm.save_and_verify(&full, &[]);
    let out = vmm.ctl(&["shutdown"], T);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    drop(vmm);

    let child = dir.join("child.snap");
    let (stored, left) = write_child(&base, &full, &child);
    assert!(stored > 0 && left > 0, "{stored} {left}");
    eprintln!("child: {stored} pages stored, {left} left to the parent");
    let v = ok(&["verify", child.to_str().unwrap()]);
    assert!(v.contains("a chain of 2 layers"), "{v}");
    let info = ok(&["info", child.to_str().unwrap()]);
    assert!(info.contains("chain:        2 layers"), "{info}");
    assert!(info.contains("parent:       base.snap"), "{info}");
    let o = ok(&["oracle", child.to_str().unwrap()]);
    assert!(o.contains("oracle PASS"), "{o}");

    let merged = dir.join("merged.snap");
    let m = ok(&[
        "merge",
        child.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(m.contains("merged 2 layer(s)"), "{m}");
    verify(&merged);
    assert!(ok(&["oracle", merged.to_str().unwrap()]).contains("oracle PASS"));
    assert_eq!(SnapshotReader::open(&merged).unwrap().header().parent, None);
    // Without --force an existing output is left alone.
    let again = run(
        &[
            "merge",
            child.to_str().unwrap(),
            "--out",
            merged.to_str().unwrap(),
        ],
        T,
    );
    assert_ne!(again.code(), Some(0));
    assert!(again.stderr.contains("--force"), "{}", again.stderr);

    restore_and_check(dir.path(), "eager", &child, false);
    restore_and_check(dir.path(), "lazy", &child, true);

    // Every data record of the parent damaged in place (its identity unchanged: no record is
    // read to compute it): verify and both restores fail with the corrupt-file code, naming
    // layer 2; the lazy VM ends instead of running on wrong bytes.
    let good = std::fs::read(&base).unwrap();
    let mut bad = good.clone();
    {
        let rd = SnapshotReader::open(&base).unwrap();
        for e in rd
            .trailer()
            .index
            .iter()
            .filter(|e| e.kind == RecordKind::Data)
        {
            bad[e.offset as usize + 28] ^= 0x5a;
        }
    }
    std::fs::write(&base, &bad).unwrap();
    let out = run(&["verify", child.to_str().unwrap()], T);
    assert_eq!(out.code(), Some(3), "verify: {}", out.stderr);
    assert!(out.stderr.contains("layer 2 ("), "verify: {}", out.stderr);
    for (tag, lazy) in [("bad-eager", false), ("bad-lazy", true)] {
        let sock = dir.join(&format!("{tag}.sock"));
        let mut args = vec![
            "restore",
            child.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ];
        if lazy {
            args.push("--lazy");
        }
        let out = run(&args, T);
        assert_eq!(out.code(), Some(3), "{tag}: {}", out.stderr);
        assert!(
            out.stderr.contains("layer 2 (") && out.stderr.contains("snapshot is corrupt"),
            "{tag}: {}",
            out.stderr
        );
        assert!(!sock.exists(), "{tag}: the socket is left behind");
    }
    std::fs::write(&base, &good).unwrap();

    // The parent gone: the child is refused, naming the missing layer.
    std::fs::remove_file(&base).unwrap();
    for cmd in ["verify", "oracle"] {
        let out = run(&[cmd, child.to_str().unwrap()], T);
        assert_eq!(out.code(), Some(5), "{cmd}: {}", out.stderr);
        assert!(
            out.stderr.contains("layer 2") && out.stderr.contains("parent not found"),
            "{cmd}: {}",
            out.stderr
        );
    }
    // The merged file stands alone.
    restore_and_check(dir.path(), "merged", &merged, true);
}
