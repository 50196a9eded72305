//! Live saves of a full-speed built-in guest on shared memory backends (memfd, hugetlbfs with a
//! pool just big enough), checked against the oracle, and a snapshot whose machine state does not decode
//! refused by `restore` with exit code 3 before any vCPU runs.

mod common;

use common::*;
use ram_saver::{RecordKind, SnapshotReader, SnapshotWriter};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

fn oracle(path: &Path) {
    let out = run(&["oracle", path.to_str().unwrap()], T);
    assert_eq!(out.code(), Some(0), "oracle failed: {}", out.stderr);
}

/// Boots a full-speed built-in guest on `backend`, saves it twice (raw, zstd) and checks each
/// image against the oracle; returns the VMM's peak RSS in KiB.
fn save_on(backend: &str, mem: &str) -> u64 {
    let dir = TempDir::new(&format!("backend-{backend}"));
    let vmm = Vmm::boot(
        dir.path(),
        &["--mem", mem, "--vcpus", "2", "--mem-backend", backend],
    );
    for extra in [&[][..], &["--zstd"][..]] {
        let path = dir.join("b.snap");
        vmm.save_and_verify(&path, extra);
        oracle(&path);
        std::fs::remove_file(&path).unwrap();
        vmm.assert_progress(Duration::from_secs(5));
        vmm.assert_no_orphan_protection("after a save");
    }
    proc_status_kib(vmm.pid(), "VmHWM:")
}

#[test]
fn memfd_guests_save_exactly() {
    let _s = serial();
    let hwm = save_on("memfd", "256M");
    eprintln!("memfd guest: VMM peak RSS {} MiB", hwm / 1024);
}

/// Huge pages reserved for a test and given back on drop, one holder at a time across processes
/// (the lock file is shared with the other crates' hugetlbfs tests).
struct HugePages {
    old: String,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePages {
    fn reserve(n: usize) -> Self {
        let path = std::env::temp_dir().join("snapctl-test-hugepages.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap();
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("flock {}: {e}", path.display()));
        let old = std::fs::read_to_string(NR_HUGEPAGES).unwrap();
        std::fs::write(NR_HUGEPAGES, n.to_string())
            .unwrap_or_else(|e| panic!("cannot set vm.nr_hugepages to {n} (needs root): {e}"));
        let got: usize = std::fs::read_to_string(NR_HUGEPAGES)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(got, n, "only {got} of {n} huge pages could be reserved");
        HugePages { old, _lock: lock }
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.old.trim());
    }
}

#[test]
fn hugetlbfs_guests_save_exactly_with_a_pool_just_big_enough() {
    let _s = serial();
    // 128 MiB of guest RAM in 64 huge pages and nothing to spare: the save, the verify and the
    // oracle must all do without a single extra huge page. (The built-in guest fills all of its
    // RAM; saves of never-touched hugetlbfs memory are proven in ram-saver's live_save tests.)
    let _pool = HugePages::reserve(64);
    save_on("hugetlbfs", "128M");
}

#[test]
fn a_machine_state_that_does_not_decode_is_refused_before_any_vcpu_runs() {
    let _s = serial();
    let dir = TempDir::new("bad-state");
    let vmm = Vmm::boot(dir.path(), &["--mem", "64M", "--vcpus", "1"]);
    let good = dir.join("good.snap");
    vmm.save_and_verify(&good, &[]);
    drop(vmm);
    // The same file with its machine state cut short, written properly (valid checksums): only
    // decoding the state can tell.
    let bad = dir.join("bad.snap");
    {
        let mut r = SnapshotReader::open(&good).unwrap();
        let header = r.header().clone();
        let state = r.machine_state().to_vec();
        let cut = &state[..state.len() - 40];
        let sink = ram_saver::AtomicFileSink::create_new(&bad).unwrap();
        let mut w = SnapshotWriter::new(sink, &header, cut).unwrap();
        for rec in r.records() {
            let rec = rec.unwrap();
            match rec.kind {
                RecordKind::ZeroRun => w
                    .write_zero_run(rec.first_page, u64::from(rec.page_count))
                    .unwrap(),
                _ => w.write_pages(rec.first_page, &rec.data).unwrap(),
            }
        }
        w.finish().unwrap();
    }
    verify(&bad);
    let sock = dir.join("r.sock");
    let out = run(
        &[
            "restore",
            bad.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(
        out.code(),
        Some(3),
        "restore of a bad machine state: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("machine state") || out.stderr.contains("state"),
        "the error does not say what is wrong: {}",
        out.stderr
    );
    assert!(!sock.exists(), "a refused restore left its socket");
}
