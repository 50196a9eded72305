//! Damage in place, every section of real snapshot files (see `common/sweep/mod.rs`): byte
//! flips and zeroed 4 KiB windows. For every damaged file, `open` + `verify` and, separately,
//! `open` + `load_into` must return the typed error of the first damaged section the reader
//! checks (naming the record for a record), never `Ok`, a panic, a hang or an absurd allocation.

#![forbid(unsafe_code)]

#[path = "common/sweep/mod.rs"]
mod sweep;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ram_saver::format::{RECORD_HEADER_LEN, TRAILER_FIXED_LEN};
use sweep::check::expect_for;
use sweep::guest::THIN;
use sweep::run::{finish, run_sweep, with_deadline, Base, Case, Mutation, Setup, FLIP_MASKS};

/// Byte flips: a stride over the whole file, every byte of the first and last 512 bytes, every
/// byte of every record header, the first, middle and last payload byte of every record, a
/// stride through the machine state, every byte of the trailer's fixed part and a stride through
/// its index.
fn flip_cases(k: usize, b: &Base, counts: &mut BTreeMap<&'static str, usize>) -> Vec<Case> {
    let s = &b.spans;
    let len = s.len;
    let mut cases = Vec::new();

    // Byte flips.
    let mut flips = BTreeSet::new();
    flips.extend((0..len).step_by((4093 * THIN) as usize));
    flips.extend(0..512.min(len));
    flips.extend(len.saturating_sub(512)..len);
    for (i, &(off, rlen)) in s.recs.iter().enumerate() {
        if (i as u64).is_multiple_of(THIN) {
            flips.extend(off..off + RECORD_HEADER_LEN as u64);
        }
        let p = off + RECORD_HEADER_LEN as u64;
        let plen = rlen - RECORD_HEADER_LEN as u64;
        if plen > 0 {
            flips.extend([p, p + plen / 2, p + plen - 1]);
        }
    }
    // About 128 through the machine state: here only its crc is tested (its decoding has its
    // own section).
    let state_step = ((s.records_start - s.header_len) / 128).max(61) * THIN;
    flips.extend((s.header_len..s.records_start).step_by(state_step as usize));
    flips.extend(s.trailer_at..s.trailer_at + TRAILER_FIXED_LEN as u64);
    flips.extend((s.trailer_at..s.footer_at).step_by((5 * THIN) as usize));
    for (n, &at) in flips.iter().enumerate() {
        let mask = FLIP_MASKS[n % FLIP_MASKS.len()];
        let sec = s.sec(at);
        cases.push(Case {
            base: k,
            what: format!("{}: flip byte {at} ({sec:?}) ^ {mask:#04x}", b.name),
            m: Mutation::Patch {
                at,
                bytes: vec![b.bytes[at as usize] ^ mask],
            },
            expect: expect_for(sec),
        });
    }
    *counts.entry("byte flips").or_default() += flips.len();
    cases
}

/// Zeroed 4 KiB windows at a stride and at section boundaries; the first section the reader
/// checks among the damaged ones decides the expected error.
fn window_cases(k: usize, b: &Base, counts: &mut BTreeMap<&'static str, usize>) -> Vec<Case> {
    let s = &b.spans;
    let len = s.len;
    let mut cases = Vec::new();
    let n = s.recs.len();

    // Zeroed 4 KiB windows.
    let mut starts = BTreeSet::new();
    starts.extend((0..len).step_by((65_521 * THIN) as usize));
    starts.extend([
        s.header_len.saturating_sub(100),
        s.records_start.saturating_sub(16),
        s.recs[n / 2].0,
        s.trailer_at.saturating_sub(2048),
        s.trailer_at,
        len.saturating_sub(4096),
    ]);
    for &at in &starts {
        let end = (at + 4096).min(len);
        let window = &b.bytes[at as usize..end as usize];
        let first = window
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != 0)
            .map(|(i, _)| s.sec(at + i as u64))
            .min();
        let Some(sec) = first else { continue };
        cases.push(Case {
            base: k,
            what: format!("{}: zeroed {at}..{end} (first checked: {sec:?})", b.name),
            m: Mutation::Patch {
                at,
                bytes: vec![0; (end - at) as usize],
            },
            expect: expect_for(sec),
        });
        *counts.entry("zeroed windows").or_default() += 1;
    }
    cases
}

#[test]
fn byte_flips_and_zeroed_windows_are_refused_with_typed_errors() {
    with_deadline(Duration::from_secs(300), || {
        let t0 = Instant::now();
        let setup = Setup::new("sweep-flips");
        let mut counts = BTreeMap::new();
        let mut cases = Vec::new();
        for (k, b) in setup.bases.iter().enumerate() {
            cases.extend(flip_cases(k, b, &mut counts));
            cases.extend(window_cases(k, b, &mut counts));
        }
        let stats = run_sweep(&setup.bases, &cases, &setup.dir);
        finish("byte flips and zeroed windows", &counts, stats, t0);
    });
}
