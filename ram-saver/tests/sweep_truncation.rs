//! Truncated files, files with bytes appended, and files that are not snapshots at all (see
//! `common/sweep/mod.rs`). A truncated or extended snapshot has no valid footer where the
//! reader looks for it: `Incomplete` (files shorter than the magic may also be `NotASnapshot`);
//! a foreign file is `NotASnapshot`; none may panic, hang or allocate by a length it read.

#![forbid(unsafe_code)]

#[path = "common/sweep/mod.rs"]
mod sweep;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use ram_saver::format::{FOOTER_LEN, RECORD_HEADER_LEN};
use ram_saver::ErrorKind;
use sweep::check::{ex, try_load, try_verify, Stats, INCOMPLETE, NOT_A_SNAPSHOT, SHORT};
use sweep::guest::{Rng, THIN};
use sweep::run::{finish, process_setup, run_sweep, with_deadline, Base, Case, Mutation, Setup};

/// Truncations every 4099 bytes plus edge cases (0, 1, 7, 8, 16, section and record boundaries,
/// `len - 1`).
fn truncation_cases(k: usize, b: &Base, counts: &mut BTreeMap<&'static str, usize>) -> Vec<Case> {
    let s = &b.spans;
    let len = s.len;
    let mut cases = Vec::new();

    // Truncations.
    let mut cuts = BTreeSet::new();
    cuts.extend((0..len).step_by((4099 * THIN) as usize));
    cuts.extend([0, 1, 7, 8, 15, 16, 17, 55, 56]);
    cuts.extend([s.header_len - 1, s.header_len, s.header_len + 16]);
    cuts.extend([s.records_start, s.records_start + 1]);
    let n = s.recs.len();
    for &(off, rlen) in s.recs.iter().take(5).chain(s.recs.iter().skip(n - 5)) {
        cuts.extend([off + 1, off + RECORD_HEADER_LEN as u64, off + rlen - 1]);
    }
    cuts.extend([s.trailer_at, s.trailer_at + 1, s.footer_at - 1, s.footer_at]);
    cuts.extend([len - 33, len - 32, len - 31, len - 8, len - 1]);
    for &at in &cuts {
        cases.push(Case {
            base: k,
            what: format!("{}: truncated to {at} bytes", b.name),
            m: Mutation::Truncate(at),
            expect: ex(if at < 8 { SHORT } else { INCOMPLETE }),
        });
    }
    *counts.entry("truncations").or_default() += cuts.len();
    cases
}

/// Bytes appended after the footer: a byte, zeros, a second footer, the end magic.
fn append_cases(k: usize, b: &Base, counts: &mut BTreeMap<&'static str, usize>) -> Vec<Case> {
    let s = &b.spans;
    let len = s.len;
    let mut cases = Vec::new();

    // Appended bytes.
    let last_footer = b.bytes[(len - FOOTER_LEN as u64) as usize..].to_vec();
    let appends: [(&str, Vec<u8>); 4] = [
        ("one zero byte", vec![0]),
        ("4 KiB of zeros", vec![0; 4096]),
        ("a copy of the footer", last_footer),
        ("the end magic", b"SNAPEND\0".to_vec()),
    ];
    for (what, bytes) in appends {
        cases.push(Case {
            base: k,
            what: format!("{}: appended {what}", b.name),
            m: Mutation::Append(bytes),
            expect: ex(INCOMPLETE),
        });
        *counts.entry("appends").or_default() += 1;
    }
    cases
}

/// Files that are not snapshots, or too short to say: empty, text, noise, the magic alone, an
/// ELF header; and a file that does not exist.
fn foreign_files(dir: &Path, stats: &mut Stats) {
    let path = dir.join("foreign.snap");
    let mut noise = vec![0u8; 1 << 20];
    Rng(42).fill(&mut noise);
    let cases: [(&str, Vec<u8>, &'static [ErrorKind]); 6] = [
        ("empty file", Vec::new(), SHORT),
        (
            "text file",
            b"hello, this is not a snapshot\n".to_vec(),
            NOT_A_SNAPSHOT,
        ),
        ("1 MiB of noise", noise, NOT_A_SNAPSHOT),
        ("the magic alone", b"SNAPCTL\0".to_vec(), INCOMPLETE),
        ("7 bytes of magic", b"SNAPCTL".to_vec(), SHORT),
        (
            "an ELF header",
            b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".repeat(8),
            NOT_A_SNAPSHOT,
        ),
    ];
    for (what, bytes, kinds) in cases {
        fs::write(&path, &bytes).expect("write");
        stats.files += 1;
        let what = format!("foreign: {what}");
        let o = try_verify(&path);
        stats.check(&what, "verify", &o, &ex(kinds));
        let o = try_load(&path, None);
        stats.check(&what, "load_into", &o, &ex(kinds));
    }
    let o = try_verify(&dir.join("does-not-exist.snap"));
    stats.check("missing file", "verify", &o, &ex(&[ErrorKind::Unreadable]));
    let _ = fs::remove_file(&path);
}

#[test]
fn truncated_and_extended_files_are_incomplete() {
    with_deadline(Duration::from_secs(300), || {
        let t0 = Instant::now();
        let setup = Setup::new("sweep-truncation");
        let mut counts = BTreeMap::new();
        let mut cases = Vec::new();
        for (k, b) in setup.bases.iter().enumerate() {
            cases.extend(truncation_cases(k, b, &mut counts));
            cases.extend(append_cases(k, b, &mut counts));
        }
        let stats = run_sweep(&setup.bases, &cases, &setup.dir);
        finish("truncations and appends", &counts, stats, t0);
    });
}

#[test]
fn foreign_and_tiny_files_are_refused() {
    with_deadline(Duration::from_secs(60), || {
        let t0 = Instant::now();
        process_setup();
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("sweep-foreign-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let mut stats = Stats::default();
        foreign_files(&dir, &mut stats);
        let _ = fs::remove_dir_all(&dir);
        let counts = BTreeMap::from([("foreign files", stats.files)]);
        finish("foreign and tiny files", &counts, stats, t0);
    });
}
