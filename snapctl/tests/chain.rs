//! Incremental snapshots through the CLI: a real built-in guest is saved (`snapctl boot` +
//! `save`), a child of that file is written with ram-saver's writer (every third record of the
//! parent copied into it, cut in two: half stored in the child, half left to the parent; every
//! other record left to the parent, so its content is the parent's), and the child is then
//! verified, shown, checked by the oracle, merged, and restored eagerly and lazily: the guest's
//! self-check passes and every vCPU runs on. A child whose parent is gone is refused by name.

mod common;

use common::*;
use ram_saver::{AtomicFileSink, ParentRef, RecordKind, SnapshotReader, SnapshotWriter};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

/// Writes at `child` a child of `parent` whose content is the parent's.
fn write_child(parent: &Path, child: &Path) -> (u64, u64) {
    let rd = SnapshotReader::open(parent).unwrap();
    let mut h = rd.header().clone();
    h.parent = Some(ParentRef::of(&rd, parent, child));
    h.snapshot_id = ram_saver::format::random_snapshot_id();
    let mut w = SnapshotWriter::new(
        AtomicFileSink::create(child).unwrap(),
        &h,
        rd.machine_state(),
    )
    .unwrap();
    let index = &rd.trailer().index;
    let mut order: Vec<usize> = (0..index.len()).collect();
    order.sort_by_key(|&i| index[i].first_page);
    let ps = u64::from(h.page_size) as usize;
    let mut out = Vec::new();
    let (mut stored, mut left) = (0, 0);
    for (n, &i) in order.iter().enumerate() {
        let e = index[i];
        let pages = u64::from(e.page_count);
        if n % 3 != 0 {
            w.write_parent_run(e.first_page, pages).unwrap();
            left += pages;
            continue;
        }
        let half = pages.div_ceil(2);
        match e.kind {
            RecordKind::ZeroRun => w.write_zero_run(e.first_page, half).unwrap(),
            _ => {
                rd.read_record_at(i, &mut out).unwrap();
                w.write_pages(e.first_page, &out[..half as usize * ps])
                    .unwrap();
            }
        }
        stored += half;
        if pages > half {
            w.write_parent_run(e.first_page + half, pages - half)
                .unwrap();
            left += pages - half;
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
        &["--mem", "128M", "--vcpus", "2", "--write-rate", "full"],
    );
    let base = dir.join("base.snap");
    vmm.save_and_verify(&base, &["--zstd"]);
    let out = vmm.ctl(&["shutdown"], T);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    drop(vmm);

    let child = dir.join("child.snap");
    let (stored, left) = write_child(&base, &child);
    assert!(stored > 0 && left > 0, "{stored} {left}");
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
