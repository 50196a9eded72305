//! Lies in RAM records, re-encoded with valid checksums (see `common/sweep/mod.rs`): page
//! counts (record and index), header fields, payload lengths, zstd frames that decompress to the
//! wrong size, piece tables and pieces of records in zstd pieces. Every one must be refused with a typed error naming the record where the reader
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
        "record codec 4",
        rec(dr, &|r| r.codec = 4),
        ex_rec(CORRUPT, dr),
        ex_rec(CORRUPT, dr),
    );
    l.add(
        "raw data record relabelled raw in pieces (no table)",
        rec(dr, &|r| r.codec = 3),
        ex_rec(CORRUPT, dr),
        ex_rec(CORRUPT, dr),
    );
    l.add(
        "raw data record relabelled zstd in pieces (no table)",
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

/// Records in pieces (format 2), zstd and raw: lies in the piece table and the pieces, each
/// with a record crc that matches (and a table crc that matches, where the lie is in the
/// table), so that only the lie can give the record away.
fn record_pieces(l: &mut Lies<'_>) {
    record_pieces_of(l, 2);
    record_pieces_of(l, 3);
}

/// The lies of [`record_pieces`] in a record of `codec` (2: zstd, 3: raw in pieces).
fn record_pieces_of(l: &mut Lies<'_>, codec: u8) {
    let m0 = l.m0;
    let ps = l.ps;
    // A record of several pieces.
    let Some(dp) = m0
        .recs
        .iter()
        .position(|r| r.codec == codec && r.piece_table().1.len() >= 3)
    else {
        return;
    };
    let (piece_raw, pieces, table) = m0.recs[dp].piece_table();
    let count = pieces.len() as u32;
    let rec = |f: &dyn Fn(&mut Rec)| {
        let mut m = m0.clone();
        f(&mut m.recs[dp]);
        m.assemble()
    };
    let both = |l: &mut Lies<'_>, what: &str, bytes: Vec<u8>| {
        l.add(
            &format!("record {dp} in pieces: {what}"),
            bytes,
            ex_rec(CORRUPT, dp),
            ex_rec(CORRUPT, dp),
        );
    };
    both(
        l,
        "a table entry flipped (table crc stale)",
        rec(&|r| r.payload[8 + 8 + 2] ^= 0x10),
    );
    both(
        l,
        "a byte of piece 1 flipped (its crc stale)",
        rec(&|r| {
            let at = table + pieces[0].0 as usize + 3;
            r.payload[at] ^= 0x10;
        }),
    );
    for (raw, label) in [
        (0, "0"),
        (3 * ps as u32, "3 pages"),
        (ps as u32 / 2, "half a page"),
        (1 << 31, "2^31"),
        ((MAX_RECORD_RAW * 2) as u32, "2 x MAX_RECORD_RAW"),
        (piece_raw * 2, "twice the real one"),
    ] {
        both(
            l,
            &format!("piece_raw {label} (table crc matching)"),
            rec(&|r| r.set_piece_table(raw, count, &pieces)),
        );
    }
    for (n, label) in [
        (count + 1, "+1"),
        (count - 1, "-1"),
        (u32::MAX, "u32::MAX"),
        (0, "0"),
    ] {
        both(
            l,
            &format!("piece_count {label} (table crc matching)"),
            rec(&|r| r.set_piece_table(piece_raw, n, &pieces)),
        );
    }
    let with = |k: usize, len: u32| {
        let mut p = pieces.clone();
        p[k].0 = len;
        p
    };
    for (k, len, label) in [
        (0, u32::MAX, "piece 0 length u32::MAX"),
        (1, 0, "piece 1 length 0"),
        (
            count as usize - 1,
            pieces[count as usize - 1].0 + 1,
            "last piece one byte long",
        ),
        (
            count as usize - 1,
            pieces[count as usize - 1].0 - 1,
            "last piece one byte short",
        ),
    ] {
        both(
            l,
            &format!("{label} (table crc matching)"),
            rec(&|r| r.set_piece_table(piece_raw, count, &with(k, len))),
        );
    }
    {
        // Piece 0 one byte longer, piece 1 one shorter: the sum still fills the record.
        let mut p = pieces.clone();
        p[0].0 += 1;
        p[1].0 -= 1;
        both(
            l,
            "a byte moved from piece 1 to piece 0 (lengths sum right, table crc matching)",
            rec(&|r| r.set_piece_table(piece_raw, count, &p)),
        );
    }
    if codec == 3 {
        // Raw in pieces: the pages of a zstd piece in a raw piece's place.
        let (a, b) = (pieces[0].0 as usize, pieces[1].0 as usize);
        let frame = zstd::bulk::compress(&vec![0x5a; b], 3).expect("compress");
        let mut p = pieces.clone();
        p[1] = (frame.len() as u32, crc32fast::hash(&frame));
        both(
            l,
            "piece 1 a zstd frame of its pages (crcs matching)",
            rec(&|r| {
                r.payload
                    .splice(table + a..table + a + b, frame.iter().copied());
                r.set_piece_table(piece_raw, count, &p);
            }),
        );
        return;
    }
    // Piece 1 replaced by a frame of the wrong size, or a bomb (its crc and length in the
    // table, the table crc, the record crc all matching).
    let (a, b) = (pieces[0].0 as usize, pieces[1].0 as usize);
    let piece_bytes = (u64::from(piece_raw)) as usize;
    let bomb = zstd_zeros(256 << 20);
    for (frame, label) in [
        (
            zstd::bulk::compress(&vec![0x5a; piece_bytes - ps as usize], 3).expect("compress"),
            "one page short",
        ),
        (
            zstd::bulk::compress(&vec![0x5a; piece_bytes + 1], 3).expect("compress"),
            "one byte long",
        ),
        (bomb, "a bomb of 256 MiB of zeros"),
        (vec![0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3], "not a frame"),
    ] {
        let mut p = pieces.clone();
        p[1] = (frame.len() as u32, crc32fast::hash(&frame));
        both(
            l,
            &format!("piece 1 {label} (crcs matching)"),
            rec(&|r| {
                r.payload
                    .splice(table + a..table + a + b, frame.iter().copied());
                r.set_piece_table(piece_raw, count, &p);
            }),
        );
    }
}

#[test]
fn record_lies_are_refused() {
    with_deadline(Duration::from_secs(300), || {
        let t0 = Instant::now();
        let setup = Setup::new("record_lies_are_refused");
        let mut stats = Default::default();
        let sections: [LieSection; 4] =
            [page_counts, record_fields, record_payloads, record_pieces];
        let n = run_lies(&setup, &sections, &mut stats);
        let mut counts = BTreeMap::new();
        counts.insert("crafted lies", n);
        finish("record lies", &counts, stats, t0);
    });
}
