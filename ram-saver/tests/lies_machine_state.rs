//! Lies in the machine state section's framing (tag, length, crc), re-encoded with a valid crc
//! over the blob (see `common/sweep/mod.rs`). The blob is a real state (`tests/data/`), opaque
//! to the reader; what only decoding it can catch is tested where vmm-core is
//! (`tests/tests/machine_state_sweep.rs`).

#![forbid(unsafe_code)]

#[path = "common/sweep/mod.rs"]
mod sweep;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sweep::check::{ex, ex_rec, CORRUPT};
use sweep::layout::Entry;
use sweep::run::{finish, run_lies, with_deadline, LieSection, Lies, Setup};

/// The machine state section's framing: lengths past every bound, a blob that shrinks (junk
/// before record 0) or swallows record 0, crc recomputed each time.
fn machine_state_framing(l: &mut Lies<'_>) {
    let (m0, s) = (l.m0, l.s);
    let room = s.trailer_at - s.header_len - 16;
    for (len, label) in [
        (u64::MAX, "u64::MAX"),
        (u64::MAX - 15, "u64::MAX - 15"),
        (1 << 62, "2^62"),
        (room + 1, "one past the trailer"),
    ] {
        let mut m = m0.clone();
        m.state_len = Some(len);
        l.add(
            &format!("machine state length {label}"),
            m.assemble(),
            ex(CORRUPT),
            ex(CORRUPT),
        );
    }
    // Shrink the blob (crc recomputed over the shorter blob); the rest becomes junk where
    // record 0 should start.
    let mut m = m0.clone();
    let cut = m.state.len() - 100;
    m.gap = m.state.split_off(cut);
    l.add(
        "machine state 100 bytes shorter (crc recomputed), junk before record 0",
        m.assemble(),
        ex_rec(CORRUPT, 0),
        ex_rec(CORRUPT, 0),
    );
    // Grow the blob over record 0 (crc recomputed); the index still lists record 0.
    let mut m = m0.clone();
    let r0 = m.recs[0].clone();
    let mut swallowed = Vec::new();
    r0.encode_into(&mut swallowed);
    let r0_entry = Entry {
        offset: 0, // patched below
        first_page: r0.first_page,
        page_count: r0.page_count,
        tail: [r0.kind, 0, 0, 0],
    };
    m.state.extend_from_slice(&swallowed);
    m.recs.remove(0);
    let at = s.recs[0].0;
    let bytes = m.assemble_with(|t| {
        t.index.insert(
            0,
            Entry {
                offset: at,
                ..r0_entry
            },
        );
        t.totals[3] += 1;
    });
    l.add(
        "machine state swallows record 0 (crc recomputed, index still lists it)",
        bytes,
        ex_rec(CORRUPT, 0),
        ex_rec(CORRUPT, 0),
    );
}

#[test]
fn machine_state_framing_lies_are_refused() {
    with_deadline(Duration::from_secs(300), || {
        let t0 = Instant::now();
        let setup = Setup::new("machine_state_framing_lies_are_refused");
        let mut stats = Default::default();
        let sections: [LieSection; 1] = [machine_state_framing];
        let n = run_lies(&setup, &sections, &mut stats);
        let mut counts = BTreeMap::new();
        counts.insert("crafted lies", n);
        finish("machine state framing lies", &counts, stats, t0);
    });
}
