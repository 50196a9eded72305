//! Lies in RAM records, re-encoded with valid checksums (see `common/sweep/mod.rs`): page
//! counts (record and index), header fields, payload lengths, zstd frames that decompress to the
//! wrong size. Every one must be refused with a typed error naming the record where the reader
//! can know it, never a panic or an absurd allocation.

#![forbid(unsafe_code)]

#[path = "common/sweep/mod.rs"]
mod sweep;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ram_saver::format::MAX_RECORD_RAW;
use sweep::check::{ex, ex_rec, CORRUPT};
use sweep::layout::Rec;
use sweep::run::zstd_zeros;
use sweep::run::{finish, run_lies, with_deadline, LieSection, Lies, Setup};

/// Page counts of records and index entries: huge, one over the limit, one more than the
/// pages the record carries.
fn page_counts(l: &mut Lies<'_>) {
    let m0 = l.m0;
    let (dr, zr, ps) = (l.dr, l.zr, l.ps);
    for (pc, label) in [
        (u32::MAX, "u32::MAX"),
        ((MAX_RECORD_RAW / ps) as u32 + 1, "MAX_RECORD_RAW/ps + 1"),
        ((MAX_RECORD_RAW / ps) as u32, "MAX_RECORD_RAW/ps"),
        (m0.recs[dr].page_count + 1, "+1"),
    ] {
        let mut m = m0.clone();
        m.recs[dr].page_count = pc;
        l.add(
            &format!("raw data record {dr} page_count {label} (index, totals, crc consistent)"),
            m.assemble(),
            ex_rec(CORRUPT, dr),
            ex(CORRUPT),
        );
    }
    {
        let mut m = m0.clone();
        m.recs[dr].page_count = u32::MAX;
        let bytes = m.assemble_with(|t| t.index[dr].page_count = m0.recs[dr].page_count);
        l.add(
            &format!("raw data record {dr} page_count u32::MAX, index unchanged"),
            bytes,
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
    }
    for (pc, label) in [(u32::MAX, "u32::MAX"), (1 << 24, "2^24")] {
        let mut m = m0.clone();
        m.recs[zr].page_count = pc;
        l.add(
            &format!("zero run {zr} page_count {label} (consistent)"),
            m.assemble(),
            ex_rec(CORRUPT, zr),
            ex(CORRUPT),
        );
    }
    {
        // Index claims a huge count for a record that itself is fine.
        let bytes = m0.assemble_with(|t| t.index[zr].page_count = u32::MAX);
        l.add(
            &format!("index entry {zr} page_count u32::MAX"),
            bytes,
            ex_rec(CORRUPT, zr),
            ex(CORRUPT),
        );
        let bytes = m0.assemble_with(|t| t.index[zr].page_count = 0);
        l.add(
            &format!("index entry {zr} page_count 0"),
            bytes,
            ex(CORRUPT),
            ex(CORRUPT),
        );
    }
}

/// Record header fields (crc recomputed): reserved bits, kinds, codecs, payload lengths.
fn record_fields(l: &mut Lies<'_>) {
    let (m0, s) = (l.m0, l.s);
    let (dr, zr) = (l.dr, l.zr);
    let rec = |k: usize, f: &dyn Fn(&mut Rec)| {
        let mut m = m0.clone();
        f(&mut m.recs[k]);
        m.assemble()
    };
    l.add(
        "record reserved field 1",
        rec(dr, &|r| r.reserved = 1),
        ex_rec(CORRUPT, dr),
        ex_rec(CORRUPT, dr),
    );
    let mut m = m0.clone();
    m.recs[dr].kind = 2;
    l.add(
        "record kind 2 (index still says data)",
        m.assemble_with(|t| t.index[dr].tail[0] = 1),
        ex_rec(CORRUPT, dr),
        ex_rec(CORRUPT, dr),
    );
    l.add(
        "record kind 2 (index says kind 2 too)",
        m.assemble(),
        ex(CORRUPT),
        ex(CORRUPT),
    );
    l.add(
        "record codec 2",
        rec(dr, &|r| r.codec = 2),
        ex_rec(CORRUPT, dr),
        ex_rec(CORRUPT, dr),
    );
    l.add(
        "zero run with codec zstd",
        rec(zr, &|r| r.codec = 1),
        ex_rec(CORRUPT, zr),
        ex_rec(CORRUPT, zr),
    );
    l.add(
        "zero run carrying a 4 KiB payload",
        rec(zr, &|r| r.payload = vec![0; 4096]),
        ex_rec(CORRUPT, zr),
        ex_rec(CORRUPT, zr),
    );
    l.add(
        "raw data record one byte short",
        rec(dr, &|r| {
            r.payload.pop();
        }),
        ex_rec(CORRUPT, dr),
        ex_rec(CORRUPT, dr),
    );
    l.add(
        "raw data record with an empty payload",
        rec(dr, &|r| r.payload.clear()),
        ex_rec(CORRUPT, dr),
        ex_rec(CORRUPT, dr),
    );
    l.add(
        "raw data record relabelled zstd (not a frame)",
        rec(dr, &|r| r.codec = 1),
        ex_rec(CORRUPT, dr),
        ex_rec(CORRUPT, dr),
    );
    l.add(
        "data record relabelled zero run (payload kept)",
        rec(dr, &|r| r.kind = 0),
        ex_rec(CORRUPT, dr),
        ex(CORRUPT),
    );
    for (n, label) in [
        (u32::MAX, "u32::MAX"),
        (
            (s.trailer_at - s.recs[dr].0) as u32,
            "runs into the trailer",
        ),
    ] {
        l.add(
            &format!("record stored_len {label} (crc over header + real payload)"),
            rec(dr, &|r| r.stored_len = Some(n)),
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
    }
    // stored_len one shorter with the crc the reader will compute: the payload reads fine,
    // then the next record starts one byte early.
    l.add(
        "record stored_len - 1 with matching crc",
        rec(dr, &|r| {
            let last = r.payload.pop().expect("payload");
            r.crc = Some(r.honest_crc());
            r.stored_len = Some(r.payload.len() as u32);
            r.payload.push(last);
        }),
        ex(CORRUPT),
        ex(CORRUPT),
    );
}

/// zstd payloads that decompress to the wrong size (bombs included), truncated frames,
/// relabelled codecs (crc recomputed).
fn record_payloads(l: &mut Lies<'_>) {
    let m0 = l.m0;
    let (dr, ps) = (l.dr, l.ps);
    let rec = |k: usize, f: &dyn Fn(&mut Rec)| {
        let mut m = m0.clone();
        f(&mut m.recs[k]);
        m.assemble()
    };
    // zstd frames that decompress to the wrong size.
    let bomb = zstd_zeros(256 << 20);
    l.add(
        "zstd bomb: 256 MiB of zeros in a 1-page record",
        rec(dr, &|r| {
            r.codec = 1;
            r.payload = bomb.clone();
            r.page_count = 1;
        }),
        ex_rec(CORRUPT, dr),
        ex(CORRUPT),
    );
    let maxed = zstd_zeros(MAX_RECORD_RAW);
    l.add(
        "zstd record of MAX_RECORD_RAW zeros (decompresses, overlaps)",
        rec(dr, &|r| {
            r.codec = 1;
            r.payload = maxed.clone();
            r.page_count = (MAX_RECORD_RAW / ps) as u32;
        }),
        ex_rec(CORRUPT, dr),
        ex(CORRUPT),
    );
    let raw_len = (u64::from(m0.recs[dr].page_count) * ps) as usize;
    let short = zstd::bulk::compress(&vec![0x5a; raw_len.saturating_sub(4096).max(1)], 3)
        .expect("compress");
    l.add(
        "zstd frame one page short",
        rec(dr, &|r| {
            r.codec = 1;
            r.payload = short.clone();
        }),
        ex_rec(CORRUPT, dr),
        ex_rec(CORRUPT, dr),
    );
    let long = zstd::bulk::compress(&vec![0x5a; raw_len + 1], 3).expect("compress");
    l.add(
        "zstd frame one byte long",
        rec(dr, &|r| {
            r.codec = 1;
            r.payload = long.clone();
        }),
        ex_rec(CORRUPT, dr),
        ex_rec(CORRUPT, dr),
    );
    if let Some(dz) = m0.recs.iter().position(|r| r.kind == 1 && r.codec == 1) {
        l.add(
            &format!("zstd record {dz} truncated frame (crc recomputed)"),
            rec(dz, &|r| {
                r.payload.truncate(r.payload.len() / 2);
            }),
            ex_rec(CORRUPT, dz),
            ex_rec(CORRUPT, dz),
        );
        l.add(
            &format!("zstd record {dz} page_count + 1 (consistent)"),
            rec(dz, &|r| r.page_count += 1),
            ex(CORRUPT),
            ex(CORRUPT),
        );
        l.add(
            &format!("zstd record {dz} relabelled raw"),
            rec(dz, &|r| r.codec = 0),
            ex_rec(CORRUPT, dz),
            ex_rec(CORRUPT, dz),
        );
    }
}

#[test]
fn record_lies_are_refused() {
    with_deadline(Duration::from_secs(300), || {
        let t0 = Instant::now();
        let setup = Setup::new("record_lies_are_refused");
        let mut stats = Default::default();
        let sections: [LieSection; 3] = [page_counts, record_fields, record_payloads];
        let n = run_lies(&setup, &sections, &mut stats);
        let mut counts = BTreeMap::new();
        counts.insert("crafted lies", n);
        finish("record lies", &counts, stats, t0);
    });
}
