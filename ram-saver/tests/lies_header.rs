//! Lies in the header, re-encoded with a valid header crc (see `common/sweep/mod.rs`): region
//! counts and regions, length fields, version, architecture, page size, codec, flags. Every one
//! must be refused with a typed error (`Unsupported` for what this build does not know,
//! `Corrupt` for what cannot be), never a panic or an absurd allocation.

#![forbid(unsafe_code)]

#[path = "common/sweep/mod.rs"]
mod sweep;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ram_saver::format::{MAX_GUEST_BYTES, MAX_HEADER_LEN, MAX_REGIONS};
use ram_saver::{ErrorKind, FORMAT_VERSION};
use sweep::check::{ex, ex_msg, CORRUPT, CORRUPT_OR_MISMATCH, UNSUPPORTED};
use sweep::layout::Hdr;
use sweep::run::{finish, run_lies, with_deadline, LieSection, Lies, Setup};

/// The region count and the regions themselves: counts over the limit or the bytes, memory
/// over the format's maximum, overflowing, unsorted, overlapping, empty, unaligned regions.
fn header_regions(l: &mut Lies<'_>) {
    let m0 = l.m0;
    let hdr = |f: &dyn Fn(&mut Hdr)| {
        let mut m = m0.clone();
        f(&mut m.hdr);
        m.assemble()
    };
    for (n, label) in [
        (u32::MAX, "u32::MAX"),
        (MAX_REGIONS + 1, "MAX_REGIONS + 1"),
        (MAX_REGIONS, "MAX_REGIONS (more than the bytes)"),
        (1000, "1000"),
        (3, "3"),
        (1, "1 (fewer than encoded)"),
        (0, "0"),
    ] {
        l.add(
            &format!("header region count {label} (crc recomputed)"),
            hdr(&|h| h.region_count = Some(n)),
            ex(CORRUPT),
            ex(CORRUPT),
        );
    }
    l.add(
        "header: 1024 regions of 1 GiB (1 TiB, the maximum; bitmap bounded)",
        hdr(&|h| h.regions = (0..1024u64).map(|i| (i << 30, 1 << 30)).collect()),
        ex_msg(CORRUPT, "missing"),
        ex(CORRUPT_OR_MISMATCH),
    );
    l.add(
        "header: one region of 1 TiB",
        hdr(&|h| h.regions = vec![(0, MAX_GUEST_BYTES)]),
        ex_msg(CORRUPT, "missing"),
        ex(CORRUPT_OR_MISMATCH),
    );
    l.add(
        "header: regions totalling 2 TiB",
        hdr(&|h| h.regions = vec![(0, 1 << 40), (1 << 41, 1 << 40)]),
        ex(UNSUPPORTED),
        ex(UNSUPPORTED),
    );
    l.add(
        "header: region size 2^64 - 4096",
        hdr(&|h| h.regions = vec![(0, !4095)]),
        ex(&[ErrorKind::Unsupported, ErrorKind::Corrupt]),
        ex(&[ErrorKind::Unsupported, ErrorKind::Corrupt]),
    );
    l.add(
        "header: region end overflows",
        hdr(&|h| h.regions[1] = (!4095, 8192)),
        ex(CORRUPT),
        ex(CORRUPT),
    );
    l.add(
        "header: regions unsorted",
        hdr(&|h| h.regions.swap(0, 1)),
        ex(CORRUPT),
        ex(CORRUPT),
    );
    l.add(
        "header: regions overlap",
        hdr(&|h| h.regions[1].0 = 4096),
        ex(CORRUPT),
        ex(CORRUPT),
    );
    l.add(
        "header: region of size 0",
        hdr(&|h| h.regions[1].1 = 0),
        ex(CORRUPT),
        ex(CORRUPT),
    );
    l.add(
        "header: region size not page aligned",
        hdr(&|h| h.regions[1].1 += 1),
        ex(CORRUPT),
        ex(CORRUPT),
    );
    l.add(
        "header: region 1 smaller (records past its end)",
        hdr(&|h| h.regions[1].1 -= 1 << 20),
        ex(CORRUPT),
        ex(CORRUPT_OR_MISMATCH),
    );
}

/// Length fields (`header_len`, config, parent), version, architecture, page size, codec and
/// flags, each with a recomputed crc.
fn header_fields(l: &mut Lies<'_>) {
    let (m0, s) = (l.m0, l.s);
    let hdr = |f: &dyn Fn(&mut Hdr)| {
        let mut m = m0.clone();
        f(&mut m.hdr);
        m.assemble()
    };
    for (n, label) in [
        (u32::MAX, "u32::MAX"),
        (MAX_HEADER_LEN + 1, "MAX_HEADER_LEN + 1"),
        (55, "55"),
        (0, "0"),
        ((s.header_len + 4) as u32, "+4"),
        ((s.header_len - 4) as u32, "-4"),
    ] {
        l.add(
            &format!("header_len {label} (crc recomputed)"),
            hdr(&|h| h.header_len = Some(n)),
            ex(CORRUPT),
            ex(CORRUPT),
        );
    }
    for (n, label) in [(u32::MAX, "u32::MAX"), (1 << 24, "2^24"), (0, "0")] {
        if n as usize != m0.hdr.config.len() {
            l.add(
                &format!("config length {label} (crc recomputed)"),
                hdr(&|h| h.config_len = Some(n)),
                ex(CORRUPT),
                ex(CORRUPT),
            );
        }
        if n as usize != m0.hdr.parent.len() {
            l.add(
                &format!("parent length {label} (crc recomputed)"),
                hdr(&|h| h.parent_len = Some(n)),
                ex(CORRUPT),
                ex(CORRUPT),
            );
        }
    }
    for (ver, label) in [
        (FORMAT_VERSION + 1, "newer format version"),
        (u32::MAX, "format version u32::MAX"),
        (0, "format version 0"),
    ] {
        l.add(
            &format!("{label} (crc recomputed)"),
            hdr(&|h| h.version = ver),
            ex_msg(UNSUPPORTED, "version"),
            ex_msg(UNSUPPORTED, "version"),
        );
    }
    for arch in [2, 0, 0xaa64] {
        l.add(
            &format!("architecture code {arch} (crc recomputed)"),
            hdr(&|h| h.arch = arch),
            ex_msg(UNSUPPORTED, "architecture"),
            ex_msg(UNSUPPORTED, "architecture"),
        );
    }
    for (ps, kinds) in [
        (0, UNSUPPORTED),
        (4095, UNSUPPORTED),
        (4 << 20, UNSUPPORTED),
        (8192, CORRUPT),
        (2 << 20, CORRUPT),
    ] {
        l.add(
            &format!("page size {ps} (crc recomputed)"),
            hdr(&|h| h.page_size = ps),
            ex(kinds),
            ex(kinds),
        );
    }
    l.add(
        "compression code 7",
        hdr(&|h| h.codec = 7),
        ex(UNSUPPORTED),
        ex(UNSUPPORTED),
    );
    l.add(
        "unknown header flag",
        hdr(&|h| h.flags |= 2),
        ex(UNSUPPORTED),
        ex(UNSUPPORTED),
    );
    l.add(
        "parent flag disagrees with parent reference",
        hdr(&|h| h.flags ^= 1),
        ex(CORRUPT),
        ex(CORRUPT),
    );
}

#[test]
fn header_lies_are_refused() {
    with_deadline(Duration::from_secs(300), || {
        let t0 = Instant::now();
        let setup = Setup::new("header_lies_are_refused");
        let mut stats = Default::default();
        let sections: [LieSection; 2] = [header_regions, header_fields];
        let n = run_lies(&setup, &sections, &mut stats);
        let mut counts = BTreeMap::new();
        counts.insert("crafted lies", n);
        finish("header lies", &counts, stats, t0);
    });
}
