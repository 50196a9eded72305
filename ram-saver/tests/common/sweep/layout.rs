//! An independent encoder and parser of the documented file layout (ram-saver's `format`
//! module docs), checked to reproduce the writer's files byte for byte: lies are re-encoded with
//! valid checksums so that only the lie itself can give a file away.

use ram_saver::format::{FOOTER_LEN, RECORD_HEADER_LEN};

pub fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

pub fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

pub fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Header fields, with optional raw overrides of length/count fields (lies).
#[derive(Clone, Debug)]
pub struct Hdr {
    pub version: u32,
    pub flags: u32,
    pub page_size: u32,
    pub arch: u32,
    pub codec: u32,
    pub level: i32,
    pub vcpus: u32,
    pub created: u64,
    pub regions: Vec<(u64, u64)>,
    pub config: Vec<u8>,
    pub parent: Vec<u8>,
    /// Version 3 and later: the snapshot id before the crc.
    pub snapshot_id: Vec<u8>,
    pub region_count: Option<u32>,
    pub config_len: Option<u32>,
    pub parent_len: Option<u32>,
    pub header_len: Option<u32>,
}

impl Hdr {
    /// Encode, with a crc that is correct for the bytes written (whatever they say).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"SNAPCTL\0");
        put32(&mut b, self.version);
        put32(&mut b, 0);
        put32(&mut b, self.flags);
        put32(&mut b, self.page_size);
        put32(&mut b, self.arch);
        put32(&mut b, self.codec);
        b.extend_from_slice(&self.level.to_le_bytes());
        put32(&mut b, self.vcpus);
        put64(&mut b, self.created);
        put32(
            &mut b,
            self.region_count.unwrap_or(self.regions.len() as u32),
        );
        for &(gpa, size) in &self.regions {
            put64(&mut b, gpa);
            put64(&mut b, size);
        }
        put32(&mut b, self.config_len.unwrap_or(self.config.len() as u32));
        b.extend_from_slice(&self.config);
        put32(&mut b, self.parent_len.unwrap_or(self.parent.len() as u32));
        b.extend_from_slice(&self.parent);
        b.extend_from_slice(&self.snapshot_id);
        let len = self.header_len.unwrap_or(b.len() as u32 + 4);
        b[12..16].copy_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&b);
        put32(&mut b, crc);
        b
    }

    /// Parse a known-good header (panics on anything unexpected: that would be a test bug).
    pub fn parse(b: &[u8]) -> Hdr {
        assert_eq!(&b[0..8], b"SNAPCTL\0");
        assert_eq!(get32(b, 12) as usize, b.len());
        let n = get32(b, 48) as usize;
        let regions = (0..n)
            .map(|i| (get64(b, 52 + 16 * i), get64(b, 60 + 16 * i)))
            .collect();
        let mut at = 52 + 16 * n;
        let clen = get32(b, at) as usize;
        let config = b[at + 4..at + 4 + clen].to_vec();
        at += 4 + clen;
        let plen = get32(b, at) as usize;
        let parent = b[at + 4..at + 4 + plen].to_vec();
        at += 4 + plen;
        let id_len = if get32(b, 8) >= 3 { 16 } else { 0 };
        let snapshot_id = b[at..at + id_len].to_vec();
        at += id_len;
        assert_eq!(at + 4, b.len());
        assert_eq!(crc32fast::hash(&b[..at]), get32(b, at));
        Hdr {
            version: get32(b, 8),
            flags: get32(b, 16),
            page_size: get32(b, 20),
            arch: get32(b, 24),
            codec: get32(b, 28),
            level: get32(b, 32) as i32,
            vcpus: get32(b, 36),
            created: get64(b, 40),
            regions,
            config,
            parent,
            snapshot_id,
            region_count: None,
            config_len: None,
            parent_len: None,
            header_len: None,
        }
    }
}

/// A RAM record, with optional raw overrides of `stored_len` and the crc (lies).
#[derive(Clone, Debug)]
pub struct Rec {
    pub kind: u8,
    pub codec: u8,
    pub reserved: u16,
    pub first_page: u64,
    pub page_count: u32,
    pub payload: Vec<u8>,
    pub stored_len: Option<u32>,
    pub crc: Option<u32>,
}

impl Rec {
    pub fn prefix(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(b"RREC");
        b[4] = self.kind;
        b[5] = self.codec;
        b[6..8].copy_from_slice(&self.reserved.to_le_bytes());
        b[8..16].copy_from_slice(&self.first_page.to_le_bytes());
        b[16..20].copy_from_slice(&self.page_count.to_le_bytes());
        let stored = self.stored_len.unwrap_or(self.payload.len() as u32);
        b[20..24].copy_from_slice(&stored.to_le_bytes());
        b
    }

    /// The crc the reader computes: header prefix, then the payload it reads.
    pub fn honest_crc(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.prefix());
        h.update(&self.payload);
        h.finalize()
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prefix());
        put32(out, self.crc.unwrap_or_else(|| self.honest_crc()));
        out.extend_from_slice(&self.payload);
    }
}

impl Rec {
    /// The piece table of a record in pieces (zstd or raw): (piece_raw, [(stored_len, crc)]), and the
    /// table's length.
    pub fn piece_table(&self) -> (u32, Vec<(u32, u32)>, usize) {
        let p = &self.payload;
        let count = get32(p, 4) as usize;
        let pieces = (0..count)
            .map(|k| (get32(p, 8 + 8 * k), get32(p, 12 + 8 * k)))
            .collect();
        (get32(p, 0), pieces, 8 + 8 * count + 4)
    }

    /// Replace the piece table (keeping its length) by one saying `piece_raw`, `count` and
    /// `pieces`, with the table crc the reader computes (over the header prefix as encoded).
    pub fn set_piece_table(&mut self, piece_raw: u32, count: u32, pieces: &[(u32, u32)]) {
        let (_, _, n) = self.piece_table();
        let mut t = Vec::new();
        put32(&mut t, piece_raw);
        put32(&mut t, count);
        for &(len, crc) in pieces {
            put32(&mut t, len);
            put32(&mut t, crc);
        }
        t.resize(n - 4, 0);
        let mut h = crc32fast::Hasher::new();
        h.update(&self.prefix());
        h.update(&t);
        put32(&mut t, h.finalize());
        self.payload[..n].copy_from_slice(&t);
    }

    /// The pages of a (good) record in zstd pieces.
    pub fn pieces_decoded(&self, page_size: u64) -> Vec<u8> {
        let (_, pieces, mut at) = self.piece_table();
        let mut raw = Vec::new();
        for (len, _) in pieces {
            let frame = &self.payload[at..at + len as usize];
            let cap = (u64::from(self.page_count) * page_size) as usize;
            raw.extend(zstd::bulk::decompress(frame, cap).expect("decompress piece"));
            at += len as usize;
        }
        assert_eq!(raw.len() as u64, u64::from(self.page_count) * page_size);
        raw
    }
}

/// One trailer index entry; `tail` is `kind`, the flags byte and 2 pad bytes.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub offset: u64,
    pub first_page: u64,
    pub page_count: u32,
    pub tail: [u8; 4],
}

/// Trailer contents before encoding: index and totals
/// (pages, zero_pages, data_pages, records, raw_bytes, stored_bytes).
pub struct Tail {
    pub index: Vec<Entry>,
    pub totals: [u64; 6],
}

#[derive(Clone, Debug)]
pub struct Model {
    pub hdr: Hdr,
    pub state: Vec<u8>,
    pub state_len: Option<u64>,
    /// Bytes between the machine state and the first record (normally none).
    pub gap: Vec<u8>,
    pub recs: Vec<Rec>,
}

/// Where the sections of a (good) file are.
#[derive(Clone, Debug)]
pub struct Spans {
    pub len: u64,
    pub header_len: u64,
    pub records_start: u64,
    /// (offset, total length) of every record, in file order.
    pub recs: Vec<(u64, u64)>,
    pub trailer_at: u64,
    pub footer_at: u64,
}

/// The section an offset belongs to, ordered as the reader checks them (derived `Ord`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Sec {
    Magic,
    Version,
    Footer,
    Trailer,
    Header,
    State,
    Record(u64),
}

impl Spans {
    pub fn sec(&self, off: u64) -> Sec {
        if off < 8 {
            Sec::Magic
        } else if off < 12 {
            Sec::Version
        } else if off < self.header_len {
            Sec::Header
        } else if off < self.records_start {
            Sec::State
        } else if off >= self.footer_at {
            Sec::Footer
        } else if off >= self.trailer_at {
            Sec::Trailer
        } else {
            Sec::Record(self.recs.partition_point(|&(o, _)| o <= off) as u64 - 1)
        }
    }
}

pub fn footer(trailer_offset: u64, trailer_len: u64) -> [u8; FOOTER_LEN] {
    let mut b = [0u8; FOOTER_LEN];
    b[0..8].copy_from_slice(&trailer_offset.to_le_bytes());
    b[8..16].copy_from_slice(&trailer_len.to_le_bytes());
    let crc = crc32fast::hash(&b[0..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b[24..32].copy_from_slice(b"SNAPEND\0");
    b
}

/// Replace the footer of `b` with a valid one (correct crc) saying what we want.
pub fn set_footer(b: &mut [u8], trailer_offset: u64, trailer_len: u64) {
    let n = b.len();
    b[n - FOOTER_LEN..].copy_from_slice(&footer(trailer_offset, trailer_len));
}

impl Model {
    pub fn parse(b: &[u8]) -> (Model, Spans) {
        let len = b.len() as u64;
        let footer_at = len - FOOTER_LEN as u64;
        let f = &b[footer_at as usize..];
        assert_eq!(&f[24..32], b"SNAPEND\0");
        assert_eq!(crc32fast::hash(&f[0..16]), get32(f, 16));
        let (trailer_at, trailer_len) = (get64(f, 0), get64(f, 8));
        assert_eq!(trailer_at + trailer_len, footer_at);
        let header_len = get32(b, 12) as usize;
        let hdr = Hdr::parse(&b[..header_len]);
        let st = &b[header_len..];
        assert_eq!(&st[0..4], b"MSTA");
        let st_len = get64(st, 4) as usize;
        let state = st[16..16 + st_len].to_vec();
        assert_eq!(crc32fast::hash(&state), get32(st, 12));
        let records_start = (header_len + 16 + st_len) as u64;
        let mut recs = Vec::new();
        let mut spans = Vec::new();
        let mut pos = records_start as usize;
        while (pos as u64) < trailer_at {
            let h = &b[pos..pos + RECORD_HEADER_LEN];
            assert_eq!(&h[0..4], b"RREC");
            let stored = get32(h, 20) as usize;
            let r = Rec {
                kind: h[4],
                codec: h[5],
                reserved: u16::from_le_bytes([h[6], h[7]]),
                first_page: get64(h, 8),
                page_count: get32(h, 16),
                payload: b[pos + RECORD_HEADER_LEN..pos + RECORD_HEADER_LEN + stored].to_vec(),
                stored_len: None,
                crc: None,
            };
            assert_eq!(r.honest_crc(), get32(h, 24));
            spans.push((pos as u64, (RECORD_HEADER_LEN + stored) as u64));
            recs.push(r);
            pos += RECORD_HEADER_LEN + stored;
        }
        assert_eq!(pos as u64, trailer_at);
        let t = &b[trailer_at as usize..footer_at as usize];
        assert_eq!(&t[0..4], b"TRLR");
        assert_eq!(get64(t, 4 + 3 * 8), recs.len() as u64);
        let model = Model {
            hdr,
            state,
            state_len: None,
            gap: Vec::new(),
            recs,
        };
        let spans = Spans {
            len,
            header_len: header_len as u64,
            records_start,
            recs: spans,
            trailer_at,
            footer_at,
        };
        (model, spans)
    }

    /// The same file in format version 1: records in zstd pieces (codec 2) become one zstd frame
    /// each (codec 1), records raw in pieces (codec 3) plain raw ones (codec 0), as the
    /// format-1 writer wrote them.
    pub fn to_format_1(&self) -> Model {
        let mut m = self.clone();
        m.hdr.version = 1;
        // Version 1 has no snapshot id and no parent references.
        m.hdr.snapshot_id.clear();
        m.hdr.parent.clear();
        m.hdr.flags = 0;
        for r in m.recs.iter_mut().filter(|r| r.kind == 1 && r.codec == 2) {
            let raw = r.pieces_decoded(u64::from(self.hdr.page_size));
            r.codec = 1;
            r.payload = zstd::bulk::compress(&raw, 3).expect("compress");
        }
        for r in m.recs.iter_mut().filter(|r| r.kind == 1 && r.codec == 3) {
            let (_, _, table) = r.piece_table();
            r.codec = 0;
            r.payload.drain(..table);
        }
        m
    }

    pub fn assemble(&self) -> Vec<u8> {
        self.assemble_with(|_| {})
    }

    /// Encode the whole file with correct checksums everywhere; the index and totals are derived
    /// from the records, then `edit` may change them before the trailer is encoded.
    pub fn assemble_with(&self, edit: impl FnOnce(&mut Tail)) -> Vec<u8> {
        let mut out = self.hdr.encode();
        out.extend_from_slice(b"MSTA");
        put64(&mut out, self.state_len.unwrap_or(self.state.len() as u64));
        put32(&mut out, crc32fast::hash(&self.state));
        out.extend_from_slice(&self.state);
        out.extend_from_slice(&self.gap);
        let ps = u64::from(self.hdr.page_size);
        let mut tail = Tail {
            index: Vec::new(),
            totals: [0; 6],
        };
        for r in &self.recs {
            tail.index.push(Entry {
                offset: out.len() as u64,
                first_page: r.first_page,
                page_count: r.page_count,
                tail: [r.kind, 0, 0, 0],
            });
            r.encode_into(&mut out);
            let n = u64::from(r.page_count);
            let t = &mut tail.totals;
            t[0] = t[0].wrapping_add(n);
            if r.kind == 0 {
                t[1] = t[1].wrapping_add(n);
            } else {
                t[2] = t[2].wrapping_add(n);
                t[4] = t[4].wrapping_add(n.wrapping_mul(ps));
            }
            t[3] += 1;
            t[5] += r.payload.len() as u64;
        }
        edit(&mut tail);
        let trailer_at = out.len() as u64;
        let mut t = Vec::new();
        t.extend_from_slice(b"TRLR");
        for v in tail.totals {
            put64(&mut t, v);
        }
        for e in &tail.index {
            put64(&mut t, e.offset);
            put64(&mut t, e.first_page);
            put32(&mut t, e.page_count);
            t.extend_from_slice(&e.tail);
        }
        let crc = crc32fast::hash(&t);
        put32(&mut t, crc);
        out.extend_from_slice(&t);
        out.extend_from_slice(&footer(trailer_at, t.len() as u64));
        out
    }
}
