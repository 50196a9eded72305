//! Page coverage: every guest page exactly once. Records re-encoded with valid checksums
//! (see `common/sweep/mod.rs`) that overlap, lie outside guest memory or leave pages missing
//! must be refused as `Corrupt`; valid re-encodings (records reordered, a zero run split in
//! two) are controls that must be accepted and load the same memory.

#![forbid(unsafe_code)]

#[path = "common/sweep/mod.rs"]
mod sweep;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sweep::check::{ex, ex_msg, CORRUPT};
use sweep::guest::{PS, REGIONS};
use sweep::run::{finish, run_lies, with_deadline, LieSection, Lies, Setup};
use sweep::run::{run_controls, Base};

/// Records that overlap, lie outside guest memory (past it, in the gap between regions,
/// wrapping around), straddle a region's end, or leave pages missing (index consistent).
fn coverage(l: &mut Lies<'_>) {
    let m0 = l.m0;
    let (dr, zr) = (l.dr, l.zr);
    let region0_end = REGIONS[0].1 / PS;
    let guest_end = (REGIONS[1].0 + REGIONS[1].1) / PS;
    {
        let mut m = m0.clone();
        let copy = m.recs[dr].clone();
        m.recs.push(copy);
        l.add(
            &format!("record {dr} duplicated at the end (same pages twice)"),
            m.assemble(),
            ex_msg(CORRUPT, "more than once"),
            ex_msg(CORRUPT, "more than once"),
        );
    }
    {
        // Two records start at the same page; the page range of the other is left missing.
        let mut m = m0.clone();
        let other = (zr + 1..m.recs.len())
            .chain(0..zr)
            .find(|&j| m.recs[j].kind == 0)
            .expect("a second zero run");
        m.recs[other].first_page = m.recs[zr].first_page;
        l.add(
            &format!("zero run {other} moved onto zero run {zr}'s first page"),
            m.assemble(),
            ex(CORRUPT),
            ex(CORRUPT),
        );
    }
    {
        let k = (1..m0.recs.len())
            .find(|&j| m0.recs[j].first_page > 0)
            .expect("record");
        let mut m = m0.clone();
        m.recs[k].first_page -= 1;
        l.add(
            &format!("record {k} shifted down one page (overlap + a missing page)"),
            m.assemble(),
            ex(CORRUPT),
            ex(CORRUPT),
        );
    }
    for (fp, label) in [
        (guest_end, "just past guest memory"),
        (region0_end, "in the gap between the regions"),
        (REGIONS[1].0 / PS - 1, "just below region 1"),
        (u64::MAX, "u64::MAX"),
        (u64::MAX - 1, "u64::MAX - 1"),
        (1 << 52, "2^52 (gpa wraps to 0)"),
        ((1 << 52) + 7, "2^52 + 7 (gpa wraps into region 0)"),
        (region0_end - 1, "straddling the end of region 0"),
        (guest_end - 1, "straddling the end of guest memory"),
    ] {
        for (k, kind) in [(zr, "zero run"), (dr, "data record")] {
            let mut m = m0.clone();
            m.recs[k].first_page = fp;
            if fp == region0_end - 1 || fp == guest_end - 1 {
                // Make sure it straddles: at least 2 pages (zero runs are >= 2).
                if m.recs[k].page_count < 2 {
                    continue;
                }
            }
            l.add(
                &format!("{kind} {k} first_page {label} (consistent)"),
                m.assemble(),
                ex(CORRUPT),
                ex(CORRUPT),
            );
        }
    }
    {
        let mut m = m0.clone();
        m.recs.remove(dr);
        l.add(
            &format!("record {dr} removed (pages missing, index consistent)"),
            m.assemble(),
            ex_msg(CORRUPT, "missing"),
            ex_msg(CORRUPT, "missing"),
        );
        let mut m = m0.clone();
        m.recs[zr].page_count -= 1;
        l.add(
            &format!("zero run {zr} one page short (consistent)"),
            m.assemble(),
            ex_msg(CORRUPT, "missing"),
            ex_msg(CORRUPT, "missing"),
        );
    }
}

fn controls(b: &Base) -> Vec<(String, Vec<u8>)> {
    let m0 = &b.model;
    let mut v = Vec::new();
    let mut m = m0.clone();
    let n = m.recs.len();
    m.recs.swap(0, n - 1);
    m.recs.swap(1, n / 2);
    v.push((format!("{}: records reordered", b.name), m.assemble()));
    let mut m = m0.clone();
    let zr = m
        .recs
        .iter()
        .position(|r| r.kind == 0 && r.page_count >= 2)
        .expect("zero run");
    let mut second = m.recs[zr].clone();
    m.recs[zr].page_count = 1;
    second.first_page += 1;
    second.page_count -= 1;
    m.recs.push(second);
    v.push((format!("{}: a zero run split in two", b.name), m.assemble()));
    v
}

#[test]
fn coverage_lies_are_refused_and_valid_reencodings_accepted() {
    with_deadline(Duration::from_secs(300), || {
        let t0 = Instant::now();
        let setup = Setup::new("coverage_lies_are_refused_and_valid_reencodings_accepted");
        let mut stats = Default::default();
        let sections: [LieSection; 1] = [coverage];
        let n = run_lies(&setup, &sections, &mut stats);
        let controls = run_controls(&setup, controls);
        let mut counts = BTreeMap::new();
        counts.insert("crafted lies", n);
        counts.insert("controls", controls);
        finish("coverage lies", &counts, stats, t0);
    });
}
