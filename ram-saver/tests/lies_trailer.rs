//! Lies in the trailer (index entries, totals) and the footer, re-encoded with valid checksums
//! (see `common/sweep/mod.rs`). A footer that does not point at a trailer ending before it is
//! `Incomplete`; a trailer that lies is `Corrupt`, for `load_into` too (the totals are what it
//! returns).

#![forbid(unsafe_code)]

#[path = "common/sweep/mod.rs"]
mod sweep;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ram_saver::format::TRAILER_FIXED_LEN;
use sweep::check::{ex, ex_msg, ex_rec, CORRUPT, INCOMPLETE, INCOMPLETE_OR_CORRUPT};
use sweep::guest::{PS, REGIONS};
use sweep::layout::set_footer;
use sweep::run::{finish, run_lies, with_deadline, LieSection, Lies, Setup};

/// Index entries (offsets, an extra or a missing entry, kinds, pad bytes, swapped entries)
/// and totals that disagree with the index (trailer crc recomputed).
fn trailer_index_and_totals(l: &mut Lies<'_>) {
    let (m0, s) = (l.m0, l.s);
    let (dr, zr, last) = (l.dr, l.zr, l.last);
    let guest_end = (REGIONS[1].0 + REGIONS[1].1) / PS;
    for (off, label) in [
        (u64::MAX, "u64::MAX"),
        (s.len + 4096, "past the end of the file"),
        (s.trailer_at, "at the trailer"),
        (0, "at offset 0"),
    ] {
        let bytes = m0.assemble_with(|t| t.index[dr].offset = off);
        l.add(
            &format!("index entry {dr} offset {label}"),
            bytes,
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
    }
    {
        let bytes = m0.assemble_with(|t| {
            let mut e = t.index[last];
            e.offset = u64::MAX / 2;
            e.first_page = guest_end + 10;
            t.index.push(e);
            t.totals[3] += 1;
        });
        l.add(
            "extra index entry pointing past the end (count consistent)",
            bytes,
            ex(CORRUPT),
            ex(CORRUPT),
        );
        let bytes = m0.assemble_with(|t| {
            t.index.pop();
            t.totals[3] -= 1;
        });
        l.add(
            "last index entry missing (count consistent)",
            bytes,
            ex_rec(CORRUPT, last),
            ex(CORRUPT),
        );
        for (n, label) in [(u64::MAX, "u64::MAX"), (1 << 40, "2^40")] {
            let bytes = m0.assemble_with(|t| t.totals[3] = n);
            l.add(
                &format!("trailer record count {label}"),
                bytes,
                ex(CORRUPT),
                ex(CORRUPT),
            );
        }
        let bytes = m0.assemble_with(|t| t.index[dr].tail = [7, 0, 0, 0]);
        l.add("index entry kind 7", bytes, ex(CORRUPT), ex(CORRUPT));
        let bytes = m0.assemble_with(|t| t.index[dr].tail[3] = 1);
        l.add("index entry pad byte set", bytes, ex(CORRUPT), ex(CORRUPT));
        let bytes = m0.assemble_with(|t| t.index[dr].tail[0] ^= 1);
        l.add(
            &format!("index entry {dr} kind disagrees with record"),
            bytes,
            ex_rec(CORRUPT, dr),
            ex_rec(CORRUPT, dr),
        );
        let bytes = m0.assemble_with(|t| t.index.swap(dr, zr));
        l.add(
            &format!("index entries {dr} and {zr} swapped"),
            bytes,
            ex(CORRUPT),
            ex(CORRUPT),
        );
        for (i, label) in [
            (0, "pages"),
            (1, "zero_pages"),
            (2, "data_pages"),
            (4, "raw_bytes"),
            (5, "stored_bytes"),
        ] {
            // `load_into` returns these totals: it must not hand back numbers it never checked
            // (pages..raw_bytes follow from the index; stored_bytes from the records read).
            let bytes = m0.assemble_with(|t| t.totals[i] += 1);
            l.add(
                &format!("trailer totals: {label} + 1"),
                bytes,
                ex_msg(CORRUPT, "totals"),
                ex(CORRUPT),
            );
        }
    }
}

/// Footers with a valid crc that point anywhere but at a trailer ending before them, and two
/// snapshots concatenated.
fn footer(l: &mut Lies<'_>) {
    let (b, s) = (l.b, l.s);
    let footer_at = s.footer_at;
    let tlen = footer_at - s.trailer_at;
    for (off, len, label, kinds) in [
        (u64::MAX, tlen, "trailer_offset u64::MAX", INCOMPLETE),
        (s.trailer_at, u64::MAX, "trailer_len u64::MAX", INCOMPLETE),
        (s.len + 10, tlen, "trailer past the end", INCOMPLETE),
        (
            s.trailer_at,
            TRAILER_FIXED_LEN as u64 - 1,
            "trailer_len below minimum",
            INCOMPLETE,
        ),
        (0, footer_at, "trailer = whole file from 0", CORRUPT),
        (
            s.records_start,
            footer_at - s.records_start,
            "trailer starts at record 0",
            CORRUPT,
        ),
        (
            s.trailer_at + 4,
            tlen - 4,
            "trailer starts 4 bytes late",
            CORRUPT,
        ),
        (
            s.header_len - 8,
            footer_at - s.header_len + 8,
            "trailer inside the header",
            CORRUPT,
        ),
    ] {
        let mut bytes = b.bytes.clone();
        set_footer(&mut bytes, off, len);
        l.add(
            &format!("footer (valid crc): {label}"),
            bytes,
            ex(kinds),
            ex(kinds),
        );
    }
    let mut two = b.bytes.clone();
    two.extend_from_slice(&b.bytes);
    l.add(
        "two snapshots concatenated",
        two,
        ex(INCOMPLETE_OR_CORRUPT),
        ex(INCOMPLETE_OR_CORRUPT),
    );
}

#[test]
fn trailer_and_footer_lies_are_refused() {
    with_deadline(Duration::from_secs(300), || {
        let t0 = Instant::now();
        let setup = Setup::new("trailer_and_footer_lies_are_refused");
        let mut stats = Default::default();
        let sections: [LieSection; 2] = [trailer_index_and_totals, footer];
        let n = run_lies(&setup, &sections, &mut stats);
        let mut counts = BTreeMap::new();
        counts.insert("crafted lies", n);
        finish("trailer and footer lies", &counts, stats, t0);
    });
}
