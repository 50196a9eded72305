//! `snapctl restore --lazy`: the vCPUs run before guest memory is loaded, memory follows on demand
//! and from a background fill. Raw and zstd images of a full-speed guest restore lazily, every
//! vCPU runs on, the guest's self-check passes and `status` shows the fill completing; a record
//! whose checksum fails ends the VM with an error instead of serving wrong bytes, and so does a
//! damaged piece or piece table of a zstd record (faults read one piece); a save of a VM
//! still filling waits for the fill and its image passes the oracle; pause and resume work
//! while it fills. Figures (time to first instruction, fault waits, fill rate, huge pages) are
//! printed, never asserted.

mod common;

#[path = "../../vmm-core/tests/common/testkernel.rs"]
#[allow(dead_code)]
mod testkernel;

use common::*;
use serde_json::Value;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);

/// A `snapctl restore --lazy` process; what it took until its socket answered and until every
/// vCPU moved past its freeze instant.
struct Lazy {
    vmm: Vmm,
    socket_after: Duration,
    running_after: Duration,
}

/// Starts `snapctl restore --lazy FILE EXTRA` with its socket and serial log in `dir`; waits until
/// the socket answers (and, unless `paused`, every vCPU stepped past `freeze`).
fn restore_lazy(dir: &Path, tag: &str, file: &Path, freeze: &[u64], extra: &[&str]) -> Lazy {
    let sock = dir.join(format!("{tag}.sock"));
    let mut cmd = Command::new(bin());
    cmd.arg("restore")
        .arg(file)
        .arg("--lazy")
        .args(extra)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join(format!("{tag}.serial")));
    let t0 = Instant::now();
    let mut vmm = Vmm {
        proc: Proc::spawn_cmd(&mut cmd, true),
        sock,
        mem_bytes: 0,
    };
    while UnixStream::connect(&vmm.sock).is_err() {
        assert!(vmm.proc.running(), "restore --lazy {tag} exited early");
        assert!(t0.elapsed() < T, "restore --lazy {tag}: no socket");
        std::thread::sleep(Duration::from_millis(1));
    }
    let socket_after = t0.elapsed();
    let st = vmm.status();
    vmm.mem_bytes = st["mem_bytes"].as_u64().unwrap();
    assert!(st["restore"].is_object(), "status has no restore: {st}");
    if extra.contains(&"--paused") {
        return Lazy {
            vmm,
            socket_after,
            running_after: Duration::ZERO,
        };
    }
    // The guest continues from its freeze instant: no vCPU is before it, and each one moves on.
    let first = vcpu_steps(&st);
    assert!(
        first.iter().zip(freeze).all(|(a, b)| a >= b),
        "{tag}: restored guest is behind its freeze instant: {first:?} < {freeze:?}"
    );
    loop {
        let s = vcpu_steps(&vmm.status());
        if s.iter().zip(freeze).all(|(a, b)| a > b) {
            break;
        }
        assert!(t0.elapsed() < T, "{tag}: vCPUs did not run on: {s:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    Lazy {
        vmm,
        socket_after,
        running_after: t0.elapsed(),
    }
}

/// Waits until `status` says the lazy restore is done; returns its `restore` figures.
fn wait_done(vmm: &Vmm, what: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let st = vmm.status();
        let r = &st["restore"];
        assert!(r["failed"].is_null(), "{what}: lazy restore failed: {r}");
        if r["done"] == true {
            assert_eq!(r["resident_bytes"], r["total_bytes"], "{what}: {r}");
            assert_eq!(
                r["total_bytes"].as_u64(),
                Some(vmm.mem_bytes),
                "{what}: {r}"
            );
            return r.clone();
        }
        assert!(t0.elapsed() < T, "{what}: fill not done after {T:?}: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn self_check(vmm: &Vmm, what: &str) {
    let out = vmm.ctl(&["self-check", "--json"], T);
    assert_eq!(
        out.code(),
        Some(0),
        "{what}: self-check failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        out.stderr
    );
}

fn shutdown(l: Lazy, what: &str) -> Output {
    let out = l.vmm.ctl(&["shutdown"], T);
    assert_eq!(out.code(), Some(0), "{what}: shutdown: {}", out.stderr);
    let Lazy { vmm, .. } = l;
    let out = vmm.proc.wait(T, what);
    assert_eq!(out.code(), Some(0), "{what}: VMM exit: {}", out.stderr);
    out
}

fn freeze_steps(summary: &Value) -> Vec<u64> {
    summary["freeze_steps"]
        .as_array()
        .expect("save summary has freeze_steps")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

fn oracle(path: &Path) {
    let out = run(&["oracle", path.to_str().unwrap()], T);
    assert_eq!(
        out.code(),
        Some(0),
        "oracle {}: {}",
        path.display(),
        out.stderr
    );
}

fn print_figures(what: &str, l: &Lazy, r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let mib = |k: &str| r[k].as_u64().unwrap_or(0) >> 20;
    eprintln!(
        "{what}: socket after {:.1} ms, every vCPU past its freeze instant after {:.1} ms (process \
         start); in the VMM: vCPUs started {:.2} ms after the restore began, first fault at {:.2} ms; \
         {} faults, wait p50 {} µs / p99 {} µs / max {} µs; all resident after {:.3} s ({:.2} GB/s \
         from the vCPUs' start; {} MiB by faults, {} MiB by the fill, {} MiB of it moved in whole, {} moves raced by faults); fill time read {:.0} ms, \
         stage {:.0} ms, map {:.0} ms; huge pages {} MiB before, \
         {} MiB after the collapse ({:.0} ms, {} blocks not collapsed)",
        l.socket_after.as_secs_f64() * 1e3,
        l.running_after.as_secs_f64() * 1e3,
        f("start_ms"),
        f("first_fault_ms"),
        r["faults"],
        r["fault_wait_p50_us"],
        r["fault_wait_p99_us"],
        r["fault_wait_max_us"],
        f("resident_s"),
        f("fill_gb_s"),
        mib("fault_filled_bytes"),
        mib("fill_filled_bytes"),
        mib("fill_moved_bytes"),
        r["fill_move_races"],
        f("fill_read_ms"),
        f("fill_stage_ms"),
        f("fill_map_ms"),
        mib("thp_before_bytes"),
        mib("thp_after_bytes"),
        f("collapse_ms"),
        r["collapse_failures"]
    );
}

/// Saves the booted guest (writing at full speed) raw and zstd; returns the files and their
/// freeze steps.
fn images(dir: &TempDir, mem: &str) -> Vec<(PathBuf, Vec<u64>)> {
    images_at(dir, mem, "full")
}

/// Saves the booted guest writing at `rate` raw and zstd; returns the files and their freeze
/// steps.
fn images_at(dir: &TempDir, mem: &str, rate: &str) -> Vec<(PathBuf, Vec<u64>)> {
    let vmm = Vmm::boot(
        dir.path(),
        &["--mem", mem, "--vcpus", "2", "--write-rate", rate],
    );
    let mut out = Vec::new();
    for (name, extra) in [("raw.snap", &[][..]), ("zstd.snap", &["--zstd"][..])] {
        let path = dir.join(name);
        let s = vmm.save_and_verify(&path, extra);
        out.push((path, freeze_steps(&s)));
    }
    let res = vmm.ctl(&["shutdown"], T);
    assert_eq!(res.code(), Some(0), "{}", res.stderr);
    drop(vmm);
    out
}

#[test]
fn raw_and_zstd_images_restore_lazily_and_pass_the_self_check() {
    let _s = serial();
    let dir = TempDir::new("lazy");
    for (path, freeze) in images(&dir, "256M") {
        let what = format!(
            "lazy restore of {} (256 MiB)",
            path.file_name().unwrap().to_string_lossy()
        );
        let l = restore_lazy(dir.path(), "r", &path, &freeze, &[]);
        let r = wait_done(&l.vmm, &what);
        assert!(r["faults"].as_u64().unwrap() > 0, "{what}: no fault: {r}");
        l.vmm.assert_progress(Duration::from_secs(10));
        self_check(&l.vmm, &what);
        print_figures(&what, &l, &r);
        let out = shutdown(l, &what);
        assert!(
            out.stderr.contains("lazy restore finished"),
            "{what}: {}",
            out.stderr
        );
    }
}

/// Guest bytes on transparent huge pages in process `pid` (AnonHugePages of its smaps).
fn anon_huge_bytes(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("AnonHugePages in smaps_rollup")
        << 10
}

/// A guest on transparent huge pages that keeps rewriting a small hot set at full speed is
/// restored lazily: the fill moves every block the guest did not touch in as a whole huge page
/// while the vCPUs fault and run (so at least 90 % of RAM is huge before any collapse), the
/// touched blocks are collapsed afterwards, and the guest passes its self-check. Into memfd
/// memory the same image is filled by copies only.
#[test]
fn a_hot_set_guest_restored_lazily_has_its_memory_on_huge_pages_before_any_collapse() {
    let _s = serial();
    let dir = TempDir::new("lazy-huge");
    let vmm = Vmm::boot(
        dir.path(),
        &[
            "--mem",
            "256M",
            "--vcpus",
            "2",
            "--write-rate",
            "full",
            "--working-set",
            "2M",
        ],
    );
    let mut images = Vec::new();
    for (name, extra) in [("raw.snap", &[][..]), ("zstd.snap", &["--zstd"][..])] {
        let path = dir.join(name);
        let s = vmm.save_and_verify(&path, extra);
        images.push((path, freeze_steps(&s)));
    }
    let res = vmm.ctl(&["shutdown"], T);
    assert_eq!(res.code(), Some(0), "{}", res.stderr);
    drop(vmm);
    for (path, freeze) in &images {
        let what = format!(
            "lazy restore of hot-set {}",
            path.file_name().unwrap().to_string_lossy()
        );
        let l = restore_lazy(dir.path(), "h", path, freeze, &[]);
        let r = wait_done(&l.vmm, &what);
        print_figures(&what, &l, &r);
        let mem = l.vmm.mem_bytes;
        let get = |k: &str| {
            r[k].as_u64()
                .unwrap_or_else(|| panic!("{what}: no {k}: {r}"))
        };
        assert!(
            get("thp_before_bytes") >= mem / 10 * 9,
            "{what}: less than 90 % on huge pages before the collapse: {r}"
        );
        assert!(
            get("fill_moved_bytes") >= mem / 10 * 8,
            "{what}: the fill moved less than 80 % in as huge pages: {r}"
        );
        let huge = anon_huge_bytes(l.vmm.pid());
        assert!(
            huge >= mem / 10 * 9,
            "{what}: AnonHugePages {} MiB of {} MiB",
            huge >> 20,
            mem >> 20
        );
        l.vmm.assert_progress(Duration::from_secs(10));
        self_check(&l.vmm, &what);
        shutdown(l, &what);
    }
    // memfd memory is shared: nothing can be moved into it, every page is copied.
    let (path, freeze) = &images[0];
    let what = "lazy restore of hot-set raw.snap into memfd memory";
    let l = restore_lazy(dir.path(), "m", path, freeze, &["--mem-backend", "memfd"]);
    let r = wait_done(&l.vmm, what);
    print_figures(what, &l, &r);
    assert_eq!(r["fill_moved_bytes"], 0, "{what}: {r}");
    self_check(&l.vmm, what);
    shutdown(l, what);
}

/// File offsets of the payloads of data records, from the trailer index.
fn data_payloads(path: &Path) -> Vec<u64> {
    data_payloads_of(&std::fs::read(path).unwrap())
}

/// File offsets of the payloads of data records of the file `b`, from its trailer index.
fn data_payloads_of(b: &[u8]) -> Vec<u64> {
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let footer = b.len() - 32;
    let (t_off, t_len) = (u64_at(footer) as usize, u64_at(footer + 8) as usize);
    assert_eq!(&b[t_off..t_off + 4], b"TRLR");
    let index = &b[t_off + 4 + 6 * 8..t_off + t_len - 4];
    index
        .chunks_exact(24)
        .filter(|e| e[20] == 1)
        .map(|e| u64::from_le_bytes(e[0..8].try_into().unwrap()) + 28)
        .collect()
}

/// Runs `snapctl restore --lazy` of the damaged `bytes` (as `tag`.snap) and checks that the VMM
/// ends with the corrupt-file exit code, its stderr naming `want`.
fn restore_fails(dir: &TempDir, tag: &str, bytes: &[u8], want: &str) {
    let bad = dir.join(&format!("{tag}.snap"));
    std::fs::write(&bad, bytes).unwrap();
    let sock = dir.join(&format!("{tag}.sock"));
    let t0 = Instant::now();
    let p = Proc::spawn(&[
        "restore",
        bad.to_str().unwrap(),
        "--lazy",
        "--api-sock",
        sock.to_str().unwrap(),
        "--serial-log",
        dir.join(&format!("{tag}.serial")).to_str().unwrap(),
    ]);
    let out = p.wait(T, "restore --lazy of a damaged file");
    eprintln!(
        "{tag}: the VMM ended after {:.0} ms with {:?}; stderr: {}",
        t0.elapsed().as_secs_f64() * 1e3,
        out.code(),
        out.stderr.trim()
    );
    assert_eq!(out.code(), Some(3), "{tag}: not the corrupt-file exit code");
    assert!(
        out.stderr.contains(want) && out.stderr.contains("lazy restore failed"),
        "{tag}: {}",
        out.stderr
    );
    assert!(
        !sock.exists(),
        "{tag}: the failed VMM left its socket behind"
    );
}

/// (record offset, payload length, piece table length) of every record stored in pieces with
/// `codec` (2: zstd, 3: raw).
fn piece_records(b: &[u8], codec: u8) -> Vec<(usize, usize, usize)> {
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    data_payloads_of(b)
        .into_iter()
        .map(|p| p as usize - 28)
        .filter(|&at| b[at + 5] == codec)
        .map(|at| (at, u32_at(at + 20), 8 + 8 * u32_at(at + 28 + 4) + 4))
        .collect()
}

/// Flips a byte of every record in pieces with `codec` at `rel(table_len)` bytes into its
/// payload and reseals the record's crc: only the piece table's or a piece's own crc can tell.
fn damage_pieces(b: &[u8], codec: u8, rel: impl Fn(usize) -> usize) -> Vec<u8> {
    let mut b = b.to_vec();
    let recs = piece_records(&b, codec);
    assert!(!recs.is_empty(), "no record in pieces with codec {codec}");
    for (at, stored, table) in recs {
        b[at + 28 + rel(table)] ^= 0x5a;
        let mut h = crc32fast::Hasher::new();
        h.update(&b[at..at + 24]);
        h.update(&b[at + 28..at + 28 + stored]);
        let crc = h.finalize();
        b[at + 24..at + 28].copy_from_slice(&crc.to_le_bytes());
    }
    b
}

#[test]
fn a_record_that_fails_its_checksum_ends_the_vm_with_an_error() {
    let _s = serial();
    let dir = TempDir::new("lazy-bad");
    // An idle guest: its generation-0 fill does not compress, its low memory (program, page
    // tables) does, and without write faults the save compresses it (records in pieces) for sure
    // (adaptive compression stores records raw for a while after data that did not compress).
    let images = images_at(&dir, "64M", "idle");
    // Damage the payload of every data record: the first one the guest or the fill reads fails.
    // (Opening checks the footer, trailer, header and machine state, no record.)
    let mut b = std::fs::read(&images[0].0).unwrap();
    let payloads = data_payloads(&images[0].0);
    assert!(!payloads.is_empty());
    for at in &payloads {
        b[*at as usize + 100] ^= 0x5a;
    }
    restore_fails(&dir, "bad-raw", &b, "checksum mismatch");
    // A zstd image, whose records a fault reads one piece at a time: a damaged piece or piece
    // table whose record crc was made to match is still never served (the fault thread checks
    // the table's and the piece's own crc; so does the fill thread's whole read).
    // The same for a raw image, whose records of several pieces are raw in pieces.
    let z = std::fs::read(&images[1].0).unwrap();
    let r = std::fs::read(&images[0].0).unwrap();
    for (tag, b, codec) in [("zstd", &z, 2), ("raw", &r, 3)] {
        let bad_piece = damage_pieces(b, codec, |table| table + 1);
        let t = format!("bad-piece-{tag}");
        restore_fails(&dir, &t, &bad_piece, "piece 0 checksum mismatch");
        let bad_table = damage_pieces(b, codec, |_| 8 + 4);
        let t = format!("bad-table-{tag}");
        restore_fails(&dir, &t, &bad_table, "piece table checksum mismatch");
    }
}

#[test]
fn a_vm_still_filling_pauses_resumes_and_its_save_waits_for_the_fill() {
    let _s = serial();
    let dir = TempDir::new("lazy-save");
    let (path, freeze) = images(&dir, "1G").swap_remove(1);
    let l = restore_lazy(dir.path(), "s", &path, &freeze, &[]);
    let early = l.vmm.status()["restore"].clone();
    // Pause and resume while the memory still fills.
    let r = request(&l.vmm.sock, r#"{"cmd":"pause"}"#);
    assert_eq!(r["reply"], "ok", "{r}");
    assert_eq!(l.vmm.status()["state"], "paused");
    let r = request(&l.vmm.sock, r#"{"cmd":"resume"}"#);
    assert_eq!(r["reply"], "ok", "{r}");
    // A save now waits for the fill (its image must hold every page of its freeze instant).
    let snap = dir.join("during-fill.snap");
    let summary = l.vmm.save_and_verify(&snap, &[]);
    let r = l.vmm.status()["restore"].clone();
    assert_eq!(
        r["resident"], true,
        "a save ran before the fill finished: {r}"
    );
    assert_eq!(r["resident_bytes"], r["total_bytes"], "{r}");
    let r = wait_done(&l.vmm, "1 GiB lazy restore, after a save");
    oracle(&snap);
    l.vmm.assert_progress(Duration::from_secs(10));
    self_check(&l.vmm, "after a save during the fill");
    eprintln!(
        "save requested with {} of {} MiB resident; saved in {:.2} s after waiting",
        early["resident_bytes"].as_u64().unwrap_or(0) >> 20,
        early["total_bytes"].as_u64().unwrap_or(0) >> 20,
        summary["duration_s"].as_f64().unwrap_or(0.0)
    );
    print_figures("lazy restore of zstd.snap (1 GiB)", &l, &r);
    shutdown(l, "1 GiB lazy restore");

    // A VM restored paused fills too, and runs once resumed.
    let l = restore_lazy(dir.path(), "p", &path, &freeze, &["--paused"]);
    assert_eq!(l.vmm.status()["state"], "paused");
    wait_done(&l.vmm, "paused lazy restore");
    let r = request(&l.vmm.sock, r#"{"cmd":"resume"}"#);
    assert_eq!(r["reply"], "ok", "{r}");
    l.vmm.assert_progress(Duration::from_secs(10));
    self_check(&l.vmm, "paused lazy restore, resumed");
    shutdown(l, "paused lazy restore");
}

#[test]
fn a_kernel_guest_restores_lazily_and_runs_on() {
    let _s = serial();
    let k = testkernel::build();
    let dir = TempDir::new("lazy-kernel");
    let sock = dir.join("boot.sock");
    let log = dir.join("boot.serial");
    let mut cmd = Command::new(bin());
    cmd.args(["boot", "--mem", "128M", "--vcpus", "2", "--kernel"])
        .arg(&k.elf)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(&log);
    let vmm = Proc::spawn_cmd(&mut cmd, true);
    wait_kernel_steps(&log, 0, "boot");
    let snap = dir.join("k.snap");
    let out = run(
        &[
            "save",
            "--out",
            snap.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
        T,
    );
    assert_eq!(out.code(), Some(0), "save: {}", out.stderr);
    let _ = request(&sock, r#"{"cmd":"shutdown"}"#);
    vmm.wait(T, "snapctl boot --kernel");
    let at_save = kernel_steps(&log).unwrap_or(0);
    assert!(at_save > 0);

    // The restored kernel prints on a fresh console: steps beyond those before the save.
    let rsock = dir.join("r.sock");
    let rlog = dir.join("r.serial");
    let mut cmd = Command::new(bin());
    cmd.arg("restore")
        .arg(&snap)
        .arg("--lazy")
        .arg("--api-sock")
        .arg(&rsock)
        .arg("--serial-log")
        .arg(&rlog);
    let r = Vmm {
        proc: Proc::spawn_cmd(&mut cmd, true),
        sock: rsock,
        mem_bytes: 128 << 20,
    };
    // It continues from its freeze instant: its step counter goes on from there, not from 0.
    let first = wait_kernel_steps(&rlog, 0, "lazy restore of a kernel guest");
    assert!(
        first > at_save / 4,
        "restored kernel restarted? {first} steps, {at_save} before; console before:\n{}\nafter:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        std::fs::read_to_string(&rlog).unwrap_or_default()
    );
    let done = wait_done(&r, "lazy restore of a kernel guest");
    wait_kernel_steps(&rlog, first, "after the fill");
    // The kernel checks the stamps of the pages it wrote: none may be wrong after a lazy restore.
    let console = std::fs::read_to_string(&rlog).unwrap();
    assert!(
        !console.contains(" expected ")
            && console
                .lines()
                .all(|l| !l.contains("bad=") || l.ends_with("bad=0")),
        "the restored kernel found pages it did not write:\n{console}"
    );
    eprintln!(
        "kernel guest (128 MiB): {} faults, wait p50 {} µs / p99 {} µs, resident after {:.3} s",
        done["faults"], done["fault_wait_p50_us"], done["fault_wait_p99_us"], done["resident_s"]
    );
    let out = r.ctl(&["shutdown"], T);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let out = r.proc.wait(T, "restore --lazy of a kernel guest");
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
}
