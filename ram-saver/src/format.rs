//! The snapshot file format: layout, constants, header/record/trailer encoding and errors.
//!
//! All integers are little endian. Offsets are from the start of the file. A file is, in order:
//!
//! ```text
//! HEADER (variable length, header_len bytes)
//!   0  magic            [u8; 8]  b"SNAPCTL\0"
//!   8  version          u32      FORMAT_VERSION (= 3; readers also read 1 and 2, see "Versions")
//!  12  header_len       u32      total header bytes, magic..=header_crc (<= MAX_HEADER_LEN)
//!  16  flags            u32      bit 0: parent reference present; other bits must be 0
//!  20  page_size        u32      guest page size in bytes (4096)
//!  24  arch             u32      1 = x86_64
//!  28  compression      u32      0 = none, 1 = zstd (records may still be stored raw, see codec)
//!  32  compress_level   i32      zstd level (0 when none)
//!  36  vcpu_count       u32
//!  40  created_unix     u64      creation time, seconds since the Unix epoch
//!  48  region_count     u32      (<= MAX_REGIONS)
//!  52  regions          region_count x { gpa: u64, size: u64 }  sorted, page aligned, disjoint
//!   .  config_len       u32, then config_len bytes   opaque VMM configuration (the CLI stores JSON)
//!   .  parent_len       u32, then parent_len bytes   parent reference (empty: none; else a
//!                                PARENT REFERENCE, below, and flags bit 0 set)
//!   .  snapshot_id      [u8; 16] (version 3) random, drawn by the writer of this file
//!   .  header_crc       u32      crc32 of every header byte before it
//!
//! MACHINE STATE (at header_len; STATE_HEAD_LEN = 16 bytes, then the blob)
//!   0  tag              [u8; 4]  b"MSTA"
//!   4  len              u64      blob bytes (<= MAX_MACHINE_STATE_LEN; writers refuse more)
//!  12  crc32            u32      crc32 of the blob
//!  16  blob             [len bytes]  opaque, from the VMM
//!
//! RAM RECORDS (any page order), each:
//!   0  tag              [u8; 4]  b"RREC"
//!   4  kind             u8       0 = ZeroRun (no payload), 1 = Data, 2 = Parent (version 3,
//!                                no payload: the pages are the parent's; only in a file with a
//!                                parent reference)
//!   5  codec            u8       0 = raw, 1 = zstd (one frame), 2 = zstd in pieces, 3 = raw in
//!                                pieces (2 and 3: version 2, see "Records in pieces");
//!                                ZeroRun and Parent: 0
//!   6  reserved         u16      0
//!   8  first_page       u64      guest page number = gpa / page_size
//!  16  page_count       u32      >= 1; Data: page_count * page_size <= MAX_RECORD_RAW
//!  20  stored_len       u32      payload bytes (ZeroRun, Parent: 0; raw Data: page_count * page_size;
//!                                zstd Data: at most ZSTD_compressBound(page_count * page_size);
//!                                zstd in pieces: less than page_count * page_size;
//!                                raw in pieces: page_count * page_size + its piece table)
//!  24  crc32            u32      crc32 of bytes 0..24 of this header followed by the payload
//!  28  payload          [stored_len bytes]
//!
//! TRAILER (at trailer_offset, trailer_len bytes)
//!   tag b"TRLR"
//!   totals: pages u64, zero_pages u64, data_pages u64, records u64, raw_bytes u64 (uncompressed
//!           bytes of data pages), stored_bytes u64 (sum of record payload lengths)
//!   index:  `records` x { offset u64, first_page u64, page_count u32, kind u8, flags u8,
//!           pad [u8; 2] = 0 } in file order. flags bit 0 = HOT: the save wrote this record out
//!           of order because the guest wrote its pages during the save (the save's fault
//!           path copied them); other bits must be 0. Hot records lie in the file in about the
//!           order the guest wrote them.
//!   trailer_crc u32  crc32 of every trailer byte before it
//!   (the totals follow from the index: page counts by kind, `records` entries, raw_bytes =
//!   data_pages * page_size, stored_bytes = trailer_offset - records start - 28 * records;
//!   the pages of Parent records are pages - zero_pages - data_pages (0 in a file without a
//!   parent reference, and in versions 1 and 2); readers refuse a trailer whose totals disagree)
//!
//! FOOTER (last FOOTER_LEN = 32 bytes)
//!   trailer_offset u64, trailer_len u64, footer_crc u32 (of the two u64), reserved u32 = 0,
//!   end magic [u8; 8] b"SNAPEND\0"
//! ```
//!
//! # Records in pieces (codecs 2 and 3)
//! A data record whose pages are readable and checkable in independent pieces, so that a reader
//! serving one page (lazy restore) reads, checks and decodes only the piece holding it. Piece
//! boundaries lie at guest page numbers that are multiples of `piece_pages = piece_raw /
//! page_size`: piece 0 runs from `first_page` to the first such boundary after it, the last one
//! ends with the record. The payload is a piece table followed by the pieces:
//!
//! ```text
//!   0  piece_raw        u32      bytes of a whole piece: a power of two, page_size..=MAX_RECORD_RAW
//!                                (writers: PIECE_RAW)
//!   4  piece_count      u32      pieces the record's pages fall into (as above; exactly that)
//!   8  pieces           piece_count x { stored_len u32 (>= 1), crc32 u32 (of the stored piece) }
//!   .  table_crc        u32      crc32 of bytes 0..24 of the record header, then table bytes 0..
//!                                before table_crc
//!   .  pieces           piece_count stored pieces back to back, in page order:
//!                                zstd in pieces (codec 2): independent zstd frames, frame k
//!                                decodes to exactly its piece's pages;
//!                                raw in pieces (codec 3): the pages themselves, piece k's
//!                                stored_len exactly its pages' bytes
//! ```
//!
//! The table is `8 + 8 * piece_count + 4` bytes; it and the pieces fill `stored_len` exactly.
//! The record crc still covers the whole payload (a full read checks it as for any record, and
//! also the table and every piece's crc); a reader of one piece checks the table crc (which
//! also covers the record header fields) and that piece's crc before using it.
//!
//! Writers store a raw data record of two or more pieces as raw in pieces (codec 3), and one
//! of a single piece as plain raw (codec 0): its one piece is the whole record. Zstd records
//! go in pieces too (codec 2) unless compression does not make them smaller: raw then, by the
//! same rule.
//!
//! # Incremental snapshots: parent reference, Parent records, identity
//! A *child* file stores only the pages written since its parent's freeze instant; every other
//! page lies in a Parent record ("these pages are the parent's": whatever the parent's chain
//! holds there). A child is still a complete description of guest memory: every page of the
//! header's regions lies in exactly one record of every file, so a child alone proves its
//! coverage, and a chain (child, parent, grandparent, … down to a file without a parent) gives
//! each page from the newest layer whose record for it is not a Parent record. A parent and its
//! child have the same page size and regions.
//!
//! ```text
//! PARENT REFERENCE (the header's parent bytes, version 3)
//!   0  snapshot_id      [u8; 16] the parent's header snapshot_id (zeros: a version 1 or 2 parent)
//!  16  trailer_crc      u32      the parent's trailer crc (last 4 bytes of its trailer)
//!  20  file_len         u64      the parent's file size in bytes
//!  28  path_len         u32      1..=MAX_PARENT_PATH_LEN
//!  32  path             [path_len bytes]  where the parent was: relative to the child's
//!                                directory when both were in the same directory, else absolute
//!                                (Unix path bytes); a hint only, the identity decides
//! ```
//!
//! The parent's *identity* is (snapshot_id, trailer_crc, file_len): a reader opening the file
//! the path names computes it from the open file (header, trailer and length, which opening reads
//! anyway; no record is read) and refuses a file whose identity differs. The snapshot id is 128
//! random bits each writer draws, so every file written (a re-save to the same name, a merge)
//! has an identity of its own even with equal content; the trailer crc (which covers the
//! index: every record's offset, pages and kind) and the length make a file that was rewritten
//! in place or copied over from another save differ too. Damage to a record's payload leaves
//! the identity alone and is what record crcs (`verify`) are for.
//!
//! # Versions
//! Writers write version 3. Version 2 files read as before: no snapshot id (their identity has
//! a zero id), no Parent records, and a parent reference is refused (`Unsupported`: no writer
//! wrote one). Version 1 files also read: their index entries' flags byte is a pad byte (must
//! be 0: no record is hot) and codecs 2 and 3 do not exist there. Everything else is laid out
//! the same in all three.
//!
//! Records lie between the end of the machine state and `trailer_offset`, back to back. Every
//! guest page (of the header's regions) appears in exactly one record. A file whose footer or
//! trailer is missing or invalid is incomplete and is never restored.
//!
//! # Bounds a reader enforces before allocating
//! A length field is never trusted just because the file is long enough to hold it (a sparse
//! file of 1 TiB costs 4 KiB of disk). Tags and fixed parts are checked first, then:
//! - header: `header_len <= MAX_HEADER_LEN`;
//! - machine state: `len <= MAX_MACHINE_STATE_LEN`;
//! - trailer: `trailer_len == TRAILER_FIXED_LEN + records * INDEX_ENTRY_LEN`, `records` at most
//!   the header's guest pages (every record carries at least one page, each page once) and
//!   `records * RECORD_HEADER_LEN` at most the bytes between machine state and trailer; the
//!   index is then read and checked entry by entry in bounded chunks, so a hole in a sparse
//!   file stops it at its first (all-zero, invalid) entry, before the trailer crc is known;
//! - a record in zstd pieces: `stored_len` below its pages' bytes; raw in pieces: `stored_len`
//!   above its pages' bytes by at most the table of one piece per page; either way its piece
//!   table's length follows from `piece_raw` (checked first) and the record's pages and must
//!   fit in `stored_len` before the table is read; a zstd piece is at most zstd's bound for its
//!   pages and decodes into a buffer of exactly its pages, a raw piece is exactly its pages.

pub use crate::error::{ErrorKind, FormatError};

/// Version of the layout above that writers write; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 3;
/// Oldest version readers still read.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// File magic at offset 0.
pub const MAGIC: [u8; 8] = *b"SNAPCTL\0";
/// Magic at the very end of a complete file.
pub const END_MAGIC: [u8; 8] = *b"SNAPEND\0";
/// Tag of the machine state section.
pub const STATE_TAG: [u8; 4] = *b"MSTA";
/// Tag of every RAM record.
pub const RECORD_TAG: [u8; 4] = *b"RREC";
/// Tag of the trailer.
pub const TRAILER_TAG: [u8; 4] = *b"TRLR";
/// Bytes at the start of every file that say what it is: magic, version, header_len.
pub const HEADER_PREFIX_LEN: usize = 16;
/// Offset of `version` in the header.
pub(crate) const VERSION_AT: usize = 8;
/// Offset of `header_len` in the header.
pub(crate) const HEADER_LEN_AT: usize = 12;
/// Shortest `header_len` a reader reads at all (anything shorter is refused unread).
pub const MIN_HEADER_LEN: u32 = 56;
/// Size of the machine state section before its blob (tag, length, crc).
pub const STATE_HEAD_LEN: usize = 16;
/// Size of a record header (payload follows).
pub const RECORD_HEADER_LEN: usize = 28;
/// Size of the footer.
pub const FOOTER_LEN: usize = 32;
/// Size of one trailer index entry.
pub const INDEX_ENTRY_LEN: usize = 24;
/// Size of the trailer without its index.
pub const TRAILER_FIXED_LEN: usize = TRAILER_HEAD_LEN + 4;
/// Offset of the record count (`totals.records`) in the trailer.
pub(crate) const TRAILER_RECORDS_AT: u64 = 4 + 3 * 8;
/// Size of the trailer's tag and totals (what precedes the index).
pub const TRAILER_HEAD_LEN: usize = 4 + 6 * 8;
/// Largest header accepted (bounds the allocation when reading).
pub const MAX_HEADER_LEN: u32 = 16 << 20;
/// Largest machine state blob accepted (bounds the allocation when reading; writers refuse a
/// larger one). A real one is tens of KiB per vCPU (JSON), about 2 MiB for the 32 vCPUs
/// vmm-core allows.
pub const MAX_MACHINE_STATE_LEN: u64 = 16 << 20;
/// Largest number of memory regions accepted.
pub const MAX_REGIONS: u32 = 1024;
/// Largest uncompressed payload of one Data record.
pub const MAX_RECORD_RAW: u64 = 64 << 20;
/// Largest guest memory accepted (bounds the coverage bitmap: 1 TiB = 32 MiB of bitmap at 4 KiB).
pub const MAX_GUEST_BYTES: u64 = 1 << 40;
/// Index entry flag: the record is hot (see the layout above).
pub const ENTRY_FLAG_HOT: u8 = 1;
/// Bytes of guest memory per piece of a record in pieces (zstd or raw), as writers write them
/// (`docs/PERFORMANCE.md`, "Zstd in pieces": fault decode time against ratio and save speed;
/// "Raw in pieces").
pub const PIECE_RAW: u32 = 64 << 10;
/// Size of a piece table before its entries (`piece_raw`, `piece_count`).
pub const PIECE_TABLE_HEAD_LEN: usize = 8;
/// Size of one piece table entry.
pub const PIECE_ENTRY_LEN: usize = 8;
/// Header flag: a parent snapshot reference is present.
pub const FLAG_HAS_PARENT: u32 = 1;
/// Bytes of a snapshot id (header, version 3).
pub const SNAPSHOT_ID_LEN: usize = 16;
/// Bytes of a parent reference before its path.
pub const PARENT_REF_FIXED_LEN: usize = SNAPSHOT_ID_LEN + 4 + 8 + 4;
/// Longest path hint of a parent reference (Linux `PATH_MAX`).
pub const MAX_PARENT_PATH_LEN: u32 = 4096;

/// Architecture code of x86_64.
pub const ARCH_X86_64: u32 = 1;

/// How RAM records are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    /// Data records are stored raw.
    #[default]
    None,
    /// Data records are zstd-compressed at this level (stored raw when that is not smaller).
    Zstd {
        /// zstd compression level.
        level: i32,
    },
}

/// One guest memory region as recorded in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemRegion {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The snapshot header (see the module docs for its encoding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Guest page size in bytes.
    pub page_size: u32,
    /// Guest memory layout, sorted by `gpa`.
    pub regions: Vec<MemRegion>,
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Compression of RAM records.
    pub compression: Compression,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_secs: u64,
    /// Opaque VMM configuration needed to restore (JSON from the CLI).
    pub vmm_config: Vec<u8>,
    /// The parent of an incremental snapshot (a child); `None`: a standalone file.
    pub parent: Option<ParentRef>,
    /// Random id drawn by the writer ([`SnapshotHeader::new`]); all zeros in version 1 and 2
    /// files. Part of the file's [`Identity`].
    pub snapshot_id: [u8; SNAPSHOT_ID_LEN],
}

/// What identifies one snapshot file's content: a child's parent reference names its parent by
/// it (see "Incremental snapshots" above).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Identity {
    /// The file's header snapshot id (zeros for version 1 and 2 files).
    pub snapshot_id: [u8; SNAPSHOT_ID_LEN],
    /// The crc of the file's trailer.
    pub trailer_crc: u32,
    /// The file's size in bytes.
    pub file_len: u64,
}

impl std::fmt::Display for Identity {
    /// `id-hex/trailer-crc-hex/length`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.snapshot_id {
            write!(f, "{b:02x}")?;
        }
        write!(f, "/{:08x}/{}", self.trailer_crc, self.file_len)
    }
}

/// A child's reference to its parent (the header's parent bytes, see "Incremental snapshots").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// The parent's identity, checked when the parent is opened.
    pub identity: Identity,
    /// Where the parent was when the child was written: relative to the child's directory, or
    /// absolute (a hint; [`ParentRef::resolve`]).
    pub path: std::path::PathBuf,
}

impl ParentRef {
    /// A reference to the file at `parent_path` of identity `identity` from a child to be
    /// written at `child_path`: the path hint is the parent's file name when both lie in the
    /// same directory, else the parent's absolute path (made absolute from the current
    /// directory when relative).
    pub fn new(
        identity: Identity,
        parent_path: &std::path::Path,
        child_path: &std::path::Path,
    ) -> Self {
        let abs = |p: &std::path::Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                std::env::current_dir()
                    .map(|d| d.join(p))
                    .unwrap_or_else(|_| p.to_path_buf())
            }
        };
        let (pa, ca) = (abs(parent_path), abs(child_path));
        let same_dir = pa.parent().is_some() && pa.parent() == ca.parent();
        let path = match pa.file_name() {
            Some(name) if same_dir => std::path::PathBuf::from(name),
            _ => pa,
        };
        ParentRef { identity, path }
    }

    /// The path of the parent for a child at `child_path`: the hint itself when absolute, else
    /// the hint in the child's directory.
    pub fn resolve(&self, child_path: &std::path::Path) -> std::path::PathBuf {
        if self.path.is_absolute() {
            return self.path.clone();
        }
        match child_path.parent() {
            Some(d) => d.join(&self.path),
            None => self.path.clone(),
        }
    }

    /// The parent reference bytes.
    pub fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let path = self.path.as_os_str().as_bytes();
        let mut b = Vec::with_capacity(PARENT_REF_FIXED_LEN + path.len());
        b.extend_from_slice(&self.identity.snapshot_id);
        put_u32(&mut b, self.identity.trailer_crc);
        put_u64(&mut b, self.identity.file_len);
        put_u32(&mut b, len_u32(path.len()));
        b.extend_from_slice(path);
        b
    }

    /// Decode parent reference bytes; `Err` says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Self, &'static str> {
        use std::os::unix::ffi::OsStrExt;
        if b.len() < PARENT_REF_FIXED_LEN {
            return Err("parent reference too short");
        }
        let mut snapshot_id = [0u8; SNAPSHOT_ID_LEN];
        snapshot_id.copy_from_slice(&b[..SNAPSHOT_ID_LEN]);
        let n = u32_at(b, PARENT_REF_FIXED_LEN - 4);
        if n == 0 || n > MAX_PARENT_PATH_LEN || b.len() - PARENT_REF_FIXED_LEN != n as usize {
            return Err("parent path length invalid");
        }
        let path = &b[PARENT_REF_FIXED_LEN..];
        if path.contains(&0) {
            return Err("parent path holds a NUL byte");
        }
        Ok(ParentRef {
            identity: Identity {
                snapshot_id,
                trailer_crc: u32_at(b, SNAPSHOT_ID_LEN),
                file_len: u64_at(b, SNAPSHOT_ID_LEN + 4),
            },
            path: std::path::PathBuf::from(std::ffi::OsStr::from_bytes(path)),
        })
    }
}

/// 128 random bits for a snapshot id: from the kernel (`/dev/urandom`), or, where that cannot
/// be read, from the standard library's randomly keyed hasher mixed with the time and process.
pub fn random_snapshot_id() -> [u8; SNAPSHOT_ID_LEN] {
    use std::io::Read;
    let mut id = [0u8; SNAPSHOT_ID_LEN];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .is_ok()
    {
        return id;
    }
    use std::hash::{BuildHasher, Hasher};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    for (k, half) in id.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(now);
        h.write_u32(std::process::id());
        h.write_usize(k);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    id
}

impl SnapshotHeader {
    /// A header for `regions` with 4 KiB pages, created now, no compression, no parent.
    pub fn new(regions: Vec<MemRegion>, vcpu_count: u32, vmm_config: Vec<u8>) -> Self {
        let created_unix_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        SnapshotHeader {
            page_size: 4096,
            regions,
            vcpu_count,
            compression: Compression::None,
            created_unix_secs,
            vmm_config,
            parent: None,
            snapshot_id: random_snapshot_id(),
        }
    }

    /// Total guest pages over all regions.
    pub fn total_pages(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.size / u64::from(self.page_size))
            .sum()
    }

    /// Encode the header, crc included.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.regions.len() * 16 + self.vmm_config.len());
        b.extend_from_slice(&MAGIC);
        put_u32(&mut b, FORMAT_VERSION);
        put_u32(&mut b, 0); // header_len, patched below
        let parent = self
            .parent
            .as_ref()
            .map(ParentRef::encode)
            .unwrap_or_default();
        let flags = if parent.is_empty() {
            0
        } else {
            FLAG_HAS_PARENT
        };
        put_u32(&mut b, flags);
        put_u32(&mut b, self.page_size);
        put_u32(&mut b, ARCH_X86_64);
        let (codec, level) = match self.compression {
            Compression::None => (0, 0),
            Compression::Zstd { level } => (1, level),
        };
        put_u32(&mut b, codec);
        b.extend_from_slice(&level.to_le_bytes());
        put_u32(&mut b, self.vcpu_count);
        put_u64(&mut b, self.created_unix_secs);
        put_u32(&mut b, len_u32(self.regions.len()));
        for r in &self.regions {
            put_u64(&mut b, r.gpa);
            put_u64(&mut b, r.size);
        }
        put_u32(&mut b, len_u32(self.vmm_config.len()));
        b.extend_from_slice(&self.vmm_config);
        put_u32(&mut b, len_u32(parent.len()));
        b.extend_from_slice(&parent);
        b.extend_from_slice(&self.snapshot_id);
        let total = len_u32(b.len() + 4);
        b[HEADER_LEN_AT..HEADER_LEN_AT + 4].copy_from_slice(&total.to_le_bytes());
        let crc = crc32fast::hash(&b);
        put_u32(&mut b, crc);
        b
    }

    /// Decode a header from `buf` (exactly `header_len` bytes; its version one readers read),
    /// checking crc and every field.
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let corrupt = |what: &str, offset: usize| FormatError::Corrupt {
            what: format!("header: {what}"),
            record: None,
            offset: offset as u64,
        };
        if buf.len() < MIN_HEADER_LEN as usize {
            return Err(corrupt("too short", 0));
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(corrupt("checksum mismatch", buf.len() - 4));
        }
        let mut c = Cursor::new(body);
        c.skip(HEADER_PREFIX_LEN); // magic, version, header_len: checked by the caller
        let flags = c.u32().ok_or_else(|| corrupt("truncated", c.pos))?;
        if flags & !FLAG_HAS_PARENT != 0 {
            return Err(FormatError::Unsupported {
                what: format!("header flags {flags:#x}"),
            });
        }
        let page_size = c.u32().ok_or_else(|| corrupt("truncated", c.pos))?;
        if !page_size.is_power_of_two() || !(4096..=(1 << 21)).contains(&page_size) {
            return Err(FormatError::Unsupported {
                what: format!("page size {page_size}"),
            });
        }
        let arch = c.u32().ok_or_else(|| corrupt("truncated", c.pos))?;
        if arch != ARCH_X86_64 {
            return Err(FormatError::WrongArchitecture { found: arch });
        }
        let codec = c.u32().ok_or_else(|| corrupt("truncated", c.pos))?;
        let level = c.u32().ok_or_else(|| corrupt("truncated", c.pos))? as i32;
        let compression = match codec {
            0 => Compression::None,
            1 => Compression::Zstd { level },
            other => {
                return Err(FormatError::Unsupported {
                    what: format!("compression {other}"),
                })
            }
        };
        let vcpu_count = c.u32().ok_or_else(|| corrupt("truncated", c.pos))?;
        let created_unix_secs = c.u64().ok_or_else(|| corrupt("truncated", c.pos))?;
        let nregions = c.u32().ok_or_else(|| corrupt("truncated", c.pos))?;
        if nregions > MAX_REGIONS || (nregions as usize) * 16 > c.remaining() {
            return Err(corrupt("region count out of range", c.pos - 4));
        }
        let mut regions = Vec::with_capacity(nregions as usize);
        let mut total: u64 = 0;
        let mut end_prev: u64 = 0;
        for i in 0..nregions {
            let at = c.pos;
            let gpa = c.u64().ok_or_else(|| corrupt("truncated", c.pos))?;
            let size = c.u64().ok_or_else(|| corrupt("truncated", c.pos))?;
            let ps = u64::from(page_size);
            let end = gpa.checked_add(size);
            if size == 0 || gpa % ps != 0 || size % ps != 0 || end.is_none() {
                return Err(corrupt(&format!("region {i} invalid"), at));
            }
            if i > 0 && gpa < end_prev {
                return Err(corrupt(&format!("region {i} overlaps or is unsorted"), at));
            }
            end_prev = end.unwrap_or(u64::MAX);
            total = total.saturating_add(size);
            regions.push(MemRegion { gpa, size });
        }
        if total > MAX_GUEST_BYTES {
            return Err(FormatError::Unsupported {
                what: format!("guest memory of {total} bytes"),
            });
        }
        let vmm_config = c
            .blob()
            .ok_or_else(|| corrupt("bad config length", c.pos))?;
        let parent_at = c.pos;
        let parent = c
            .blob()
            .ok_or_else(|| corrupt("bad parent length", c.pos))?;
        let version = u32_at(buf, VERSION_AT);
        let mut snapshot_id = [0u8; SNAPSHOT_ID_LEN];
        if version >= 3 {
            let id = c
                .take(SNAPSHOT_ID_LEN)
                .ok_or_else(|| corrupt("truncated", c.pos))?;
            snapshot_id.copy_from_slice(id);
        }
        if c.remaining() != 0 {
            return Err(corrupt("trailing bytes", c.pos));
        }
        if (flags & FLAG_HAS_PARENT != 0) == parent.is_empty() {
            return Err(corrupt("parent flag disagrees with parent reference", 16));
        }
        let parent = if parent.is_empty() {
            None
        } else if version < 3 {
            return Err(FormatError::Unsupported {
                what: format!("a parent reference in a version {version} file"),
            });
        } else {
            Some(ParentRef::decode(&parent).map_err(|what| corrupt(what, parent_at + 4))?)
        };
        Ok(SnapshotHeader {
            page_size,
            regions,
            vcpu_count,
            compression,
            created_unix_secs,
            vmm_config,
            parent,
            snapshot_id,
        })
    }
}

/// The framing of the machine state section: the blob's length and crc32 (the blob itself is
/// opaque here; the VMM encodes and decodes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MachineStateHead {
    /// Blob bytes.
    pub len: u64,
    /// crc32 of the blob.
    pub crc: u32,
}

impl MachineStateHead {
    /// The framing of `blob`; refused when no reader would accept it (over
    /// [`MAX_MACHINE_STATE_LEN`]).
    pub fn of(blob: &[u8]) -> Result<Self, FormatError> {
        let len = blob.len() as u64;
        if len > MAX_MACHINE_STATE_LEN {
            return Err(FormatError::Unsupported {
                what: format!(
                    "machine state of {len} bytes (the format holds at most {})",
                    MAX_MACHINE_STATE_LEN
                ),
            });
        }
        Ok(MachineStateHead {
            len,
            crc: crc32fast::hash(blob),
        })
    }

    /// Tag, length and crc.
    pub fn encode(&self) -> [u8; STATE_HEAD_LEN] {
        let mut b = [0u8; STATE_HEAD_LEN];
        b[0..4].copy_from_slice(&STATE_TAG);
        b[4..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decode the framing read at file offset `at`, checking the tag and that the length is
    /// within [`MAX_MACHINE_STATE_LEN`] and leaves the blob ending by `end` (the trailer).
    pub fn decode(b: &[u8; STATE_HEAD_LEN], at: u64, end: u64) -> Result<Self, FormatError> {
        if b[0..4] != STATE_TAG {
            return Err(state_corrupt("bad tag", at));
        }
        let len = u64_at(b, 4);
        let room = end.saturating_sub(at + STATE_HEAD_LEN as u64);
        if len > MAX_MACHINE_STATE_LEN || len > room {
            return Err(state_corrupt("length out of range", at + 4));
        }
        Ok(MachineStateHead {
            len,
            crc: u32_at(b, 12),
        })
    }

    /// Check the crc of `blob`, read after the framing at file offset `at`.
    pub fn check(&self, blob: &[u8], at: u64) -> Result<(), FormatError> {
        if crc32fast::hash(blob) != self.crc {
            return Err(state_corrupt("checksum mismatch", at + 12));
        }
        Ok(())
    }
}

/// A corrupt machine state section; `what` is completed with the section's name.
pub(crate) fn state_corrupt(what: &str, offset: u64) -> FormatError {
    FormatError::Corrupt {
        what: format!("machine state: {what}"),
        record: None,
        offset,
    }
}

/// Kind of a RAM record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RecordKind {
    /// A run of all-zero pages, no payload.
    ZeroRun,
    /// A run of pages with data.
    Data,
    /// A run of pages the parent holds (version 3, in a file with a parent reference), no
    /// payload.
    Parent,
}

impl RecordKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            RecordKind::ZeroRun => 0,
            RecordKind::Data => 1,
            RecordKind::Parent => 2,
        }
    }
    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(RecordKind::ZeroRun),
            1 => Some(RecordKind::Data),
            2 => Some(RecordKind::Parent),
            _ => None,
        }
    }
}

/// Payload encoding of a record: the pages as they are.
pub(crate) const CODEC_RAW: u8 = 0;
/// One zstd frame of all the pages.
pub(crate) const CODEC_ZSTD: u8 = 1;
/// A piece table and one zstd frame per piece (version 2).
pub(crate) const CODEC_ZSTD_PIECES: u8 = 2;
/// A piece table and the pages, each piece checksummed (version 2).
pub(crate) const CODEC_RAW_PIECES: u8 = 3;

/// True for the codecs whose payload is a piece table and pieces.
pub(crate) fn in_pieces(codec: u8) -> bool {
    codec == CODEC_ZSTD_PIECES || codec == CODEC_RAW_PIECES
}

/// The highest codec a file of `version` may use.
pub(crate) fn max_codec(version: u32) -> u8 {
    if version >= 2 {
        CODEC_RAW_PIECES
    } else {
        CODEC_ZSTD
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub kind: RecordKind,
    pub codec: u8,
    pub first_page: u64,
    pub page_count: u32,
    pub stored_len: u32,
    pub crc: u32,
}

impl RecordHeader {
    /// The 24 bytes the crc covers (everything but the crc itself).
    pub fn prefix(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&RECORD_TAG);
        b[4] = self.kind.code();
        b[5] = self.codec;
        b[8..16].copy_from_slice(&self.first_page.to_le_bytes());
        b[16..20].copy_from_slice(&self.page_count.to_le_bytes());
        b[20..24].copy_from_slice(&self.stored_len.to_le_bytes());
        b
    }

    /// Crc of the header prefix followed by `payload`.
    pub fn compute_crc(&self, payload: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.prefix());
        h.update(payload);
        h.finalize()
    }

    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[..24].copy_from_slice(&self.prefix());
        b[24..28].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decode raw fields; `None` when the tag, kind, codec (`max_codec` at most) or reserved
    /// bytes are invalid.
    pub fn decode(b: &[u8; RECORD_HEADER_LEN], max_codec: u8) -> Option<Self> {
        if b[0..4] != RECORD_TAG || b[6] != 0 || b[7] != 0 {
            return None;
        }
        let kind = RecordKind::from_code(b[4])?;
        let codec = b[5];
        if codec > max_codec || (kind != RecordKind::Data && codec != CODEC_RAW) {
            return None;
        }
        Some(RecordHeader {
            kind,
            codec,
            first_page: u64_at(b, 8),
            page_count: u32_at(b, 16),
            stored_len: u32_at(b, 20),
            crc: u32_at(b, 24),
        })
    }
}

/// The pieces of a record in pieces: `count` pieces of `piece_pages` pages at most,
/// aligned in guest memory (see the layout above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PieceLayout {
    pub first_page: u64,
    pub page_count: u64,
    pub piece_pages: u64,
    pub count: usize,
}

impl PieceLayout {
    /// The pieces of `page_count` pages from `first_page` in pieces of `piece_raw` bytes, when
    /// `piece_raw` is valid for pages of `page_size` bytes.
    pub fn new(first_page: u64, page_count: u32, piece_raw: u32, page_size: u64) -> Option<Self> {
        let raw = u64::from(piece_raw);
        if !raw.is_power_of_two() || raw < page_size || raw > MAX_RECORD_RAW || page_count == 0 {
            return None;
        }
        let piece_pages = raw / page_size;
        let last = first_page.checked_add(u64::from(page_count) - 1)?;
        // Every piece boundary `span` computes is a page number that exists.
        (last / piece_pages + 1).checked_mul(piece_pages)?;
        let count = (last / piece_pages - first_page / piece_pages + 1) as usize;
        Some(PieceLayout {
            first_page,
            page_count: u64::from(page_count),
            piece_pages,
            count,
        })
    }

    /// Pages `[from, to)` of piece `k`, relative to the record's first page.
    pub fn span(&self, k: usize) -> (u64, u64) {
        let base = self.first_page / self.piece_pages * self.piece_pages;
        let a = (base + k as u64 * self.piece_pages).max(self.first_page) - self.first_page;
        let b = (base + (k as u64 + 1) * self.piece_pages - self.first_page).min(self.page_count);
        (a, b)
    }

    /// The piece holding page `rel` (relative to the record's first page).
    pub fn piece_of(&self, rel: u64) -> usize {
        ((self.first_page + rel) / self.piece_pages - self.first_page / self.piece_pages) as usize
    }

    /// Bytes of the piece table.
    pub fn table_len(&self) -> usize {
        PIECE_TABLE_HEAD_LEN + PIECE_ENTRY_LEN * self.count + 4
    }
}

/// A checked piece table (see the layout above) over the table bytes of one record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PieceTable<'a> {
    pub layout: PieceLayout,
    entries: &'a [u8],
}

impl<'a> PieceTable<'a> {
    /// Decode the table head (`piece_raw`, `piece_count`) of record `h`: the layout, when the
    /// piece size is valid, the count is the one the record's pages need and the table fits in
    /// the payload.
    pub fn layout(
        h: &RecordHeader,
        head: &[u8; PIECE_TABLE_HEAD_LEN],
        page_size: u64,
    ) -> Option<PieceLayout> {
        let l = PieceLayout::new(h.first_page, h.page_count, u32_at(head, 0), page_size)?;
        let fits = l.table_len() as u64 + l.count as u64 <= u64::from(h.stored_len);
        (u32_at(head, 4) as usize == l.count && fits).then_some(l)
    }

    /// Check a whole table (`layout.table_len()` bytes) of record `h`: its crc (over the
    /// record header's first 24 bytes and the table), and that the pieces fill the payload
    /// exactly, each at least one byte and at most zstd's bound for its pages (zstd in pieces)
    /// or exactly its pages' bytes (raw in pieces). `Err` names what is wrong.
    pub fn decode(
        h: &RecordHeader,
        layout: PieceLayout,
        table: &'a [u8],
        page_size: u64,
    ) -> Result<Self, &'static str> {
        let n = layout.table_len();
        if table.len() != n {
            return Err("piece table length");
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h.prefix());
        crc.update(&table[..n - 4]);
        if crc.finalize() != u32_at(table, n - 4) {
            return Err("piece table checksum mismatch");
        }
        let t = PieceTable {
            layout,
            entries: &table[PIECE_TABLE_HEAD_LEN..n - 4],
        };
        let mut total = n as u64;
        for k in 0..layout.count {
            let (len, _) = t.entry(k);
            let (a, b) = layout.span(k);
            let raw = ((b - a) * page_size) as usize;
            let bad = if h.codec == CODEC_RAW_PIECES {
                len as usize != raw
            } else {
                len == 0 || len as usize > zstd::zstd_safe::compress_bound(raw)
            };
            if bad {
                return Err("piece length out of range");
            }
            total += u64::from(len);
        }
        if total != u64::from(h.stored_len) {
            return Err("pieces do not fill the record");
        }
        Ok(t)
    }

    /// Stored length and crc of piece `k`.
    pub fn entry(&self, k: usize) -> (u32, u32) {
        let at = k * PIECE_ENTRY_LEN;
        (u32_at(self.entries, at), u32_at(self.entries, at + 4))
    }

    /// Payload offset, stored length and crc of piece `k`.
    pub fn piece(&self, k: usize) -> (usize, usize, u32) {
        let before: usize = (0..k).map(|j| self.entry(j).0 as usize).sum();
        let (len, crc) = self.entry(k);
        (self.layout.table_len() + before, len as usize, crc)
    }
}

/// Encode the piece table for record `h` (its stored length final) into `table`
/// (`layout.table_len()` bytes) from the pieces' (stored length, crc).
pub(crate) fn encode_piece_table(
    h: &RecordHeader,
    layout: &PieceLayout,
    piece_raw: u32,
    pieces: &[(u32, u32)],
    table: &mut [u8],
) {
    table[0..4].copy_from_slice(&piece_raw.to_le_bytes());
    table[4..8].copy_from_slice(&(layout.count as u32).to_le_bytes());
    for (k, (len, crc)) in pieces.iter().enumerate() {
        let at = PIECE_TABLE_HEAD_LEN + k * PIECE_ENTRY_LEN;
        table[at..at + 4].copy_from_slice(&len.to_le_bytes());
        table[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    }
    let n = layout.table_len();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h.prefix());
    crc.update(&table[..n - 4]);
    let c = crc.finalize();
    table[n - 4..n].copy_from_slice(&c.to_le_bytes());
}

/// One trailer index entry: where a record is and which pages it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IndexEntry {
    /// File offset of the record header.
    pub offset: u64,
    /// First guest page number.
    pub first_page: u64,
    /// Number of pages.
    pub page_count: u32,
    /// Record kind.
    pub kind: RecordKind,
    /// Hot: the save wrote the record out of order because the guest wrote its pages meanwhile
    /// (always false in version 1 files).
    pub hot: bool,
}

/// Totals stored in the trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Totals {
    /// Pages covered by all records.
    pub pages: u64,
    /// Pages in zero runs.
    pub zero_pages: u64,
    /// Pages in data records.
    pub data_pages: u64,
    /// Pages in Parent records (not stored: `pages - zero_pages - data_pages`).
    pub parent_pages: u64,
    /// Number of records.
    pub records: u64,
    /// Uncompressed bytes of data pages.
    pub raw_bytes: u64,
    /// Sum of record payload lengths as stored.
    pub stored_bytes: u64,
}

/// The decoded trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    /// Totals over all records.
    pub totals: Totals,
    /// One entry per record, in file order.
    pub index: Vec<IndexEntry>,
}

impl Trailer {
    /// Encode the trailer, crc included.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(TRAILER_FIXED_LEN + self.index.len() * INDEX_ENTRY_LEN);
        b.extend_from_slice(&TRAILER_TAG);
        let t = &self.totals;
        for v in [
            t.pages,
            t.zero_pages,
            t.data_pages,
            t.records,
            t.raw_bytes,
            t.stored_bytes,
        ] {
            put_u64(&mut b, v);
        }
        for e in &self.index {
            put_u64(&mut b, e.offset);
            put_u64(&mut b, e.first_page);
            put_u32(&mut b, e.page_count);
            let flags = if e.hot { ENTRY_FLAG_HOT } else { 0 };
            b.extend_from_slice(&[e.kind.code(), flags, 0, 0]);
        }
        let crc = crc32fast::hash(&b);
        put_u32(&mut b, crc);
        b
    }

    /// Decode a trailer of a file of format `version` from `buf` (exactly trailer_len bytes at
    /// `offset`).
    pub fn decode(buf: &[u8], offset: u64, version: u32) -> Result<Self, FormatError> {
        if buf.len() < TRAILER_FIXED_LEN {
            return Err(trailer_corrupt("bad tag", offset));
        }
        let mut head = [0u8; TRAILER_HEAD_LEN];
        head.copy_from_slice(&buf[..TRAILER_HEAD_LEN]);
        let totals = Self::decode_head(&head, buf.len() as u64, offset)?;
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32fast::hash(body) != u32_at(crc, 0) {
            return Err(trailer_corrupt(
                "checksum mismatch",
                offset + body.len() as u64,
            ));
        }
        let index = body[TRAILER_HEAD_LEN..]
            .chunks_exact(INDEX_ENTRY_LEN)
            .enumerate()
            .map(|(i, e)| {
                let at = offset + (TRAILER_HEAD_LEN + i * INDEX_ENTRY_LEN) as u64;
                Self::decode_entry(e, i as u64, at, version)
            })
            .collect::<Result<_, _>>()?;
        Ok(Trailer { totals, index })
    }

    /// Decode the tag and totals of a trailer of `trailer_len` bytes at `offset`, and check
    /// that its length is exactly what `totals.records` index entries need. Readers call this
    /// before sizing anything by the record count.
    pub fn decode_head(
        head: &[u8; TRAILER_HEAD_LEN],
        trailer_len: u64,
        offset: u64,
    ) -> Result<Totals, FormatError> {
        if head[0..4] != TRAILER_TAG {
            return Err(trailer_corrupt("bad tag", offset));
        }
        let v = |k: usize| u64_at(head, 4 + 8 * k);
        let totals = Totals {
            pages: v(0),
            zero_pages: v(1),
            data_pages: v(2),
            // A trailer claiming fewer pages than zero and data pages disagrees with any
            // index (no index has that many parent pages).
            parent_pages: v(0).wrapping_sub(v(1)).wrapping_sub(v(2)),
            records: v(3),
            raw_bytes: v(4),
            stored_bytes: v(5),
        };
        let want = totals
            .records
            .checked_mul(INDEX_ENTRY_LEN as u64)
            .and_then(|n| n.checked_add(TRAILER_FIXED_LEN as u64));
        if want != Some(trailer_len) {
            return Err(trailer_corrupt(
                "index length disagrees with record count",
                offset + TRAILER_RECORDS_AT,
            ));
        }
        Ok(totals)
    }

    /// Decode the `i`-th index entry (`INDEX_ENTRY_LEN` bytes at file offset `at`) of a file of
    /// format `version`.
    pub fn decode_entry(
        b: &[u8],
        i: u64,
        at: u64,
        version: u32,
    ) -> Result<IndexEntry, FormatError> {
        let known_flags = if version >= 2 { ENTRY_FLAG_HOT } else { 0 };
        let kind = (b.len() == INDEX_ENTRY_LEN)
            .then(|| RecordKind::from_code(b[20]))
            .flatten()
            .filter(|k| *k != RecordKind::Parent || version >= 3)
            .filter(|_| b[21] & !known_flags == 0 && b[22..24] == [0, 0] && u32_at(b, 16) > 0)
            .ok_or_else(|| trailer_corrupt(&format!("index entry {i} invalid"), at))?;
        Ok(IndexEntry {
            offset: u64_at(b, 0),
            first_page: u64_at(b, 8),
            page_count: u32_at(b, 16),
            kind,
            hot: b[21] & ENTRY_FLAG_HOT != 0,
        })
    }
}

fn trailer_corrupt(what: &str, offset: u64) -> FormatError {
    FormatError::Corrupt {
        what: format!("trailer: {what}"),
        record: None,
        offset,
    }
}

/// Encode the footer for a trailer at `offset` of `len` bytes.
pub(crate) fn encode_footer(offset: u64, len: u64) -> [u8; FOOTER_LEN] {
    let mut b = [0u8; FOOTER_LEN];
    b[0..8].copy_from_slice(&offset.to_le_bytes());
    b[8..16].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&b[0..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b[24..32].copy_from_slice(&END_MAGIC);
    b
}

/// Decode the footer; `None` when it is not a valid footer (incomplete file).
pub(crate) fn decode_footer(b: &[u8; FOOTER_LEN]) -> Option<(u64, u64)> {
    if b[24..32] != END_MAGIC || b[20..24] != [0; 4] {
        return None;
    }
    if crc32fast::hash(&b[0..16]) != u32_at(b, 16) {
        return None;
    }
    Some((u64_at(b, 0), u64_at(b, 8)))
}

pub(crate) fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A bounds-checked little-endian reader over a byte slice.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cursor { b, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn skip(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.b.len());
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.remaining() < n {
            return None;
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32_at(s, 0))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| u64_at(s, 0))
    }
    fn blob(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        self.take(n).map(<[u8]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SnapshotHeader {
        let mut h = SnapshotHeader::new(
            vec![
                MemRegion {
                    gpa: 0,
                    size: 1 << 20,
                },
                MemRegion {
                    gpa: 1 << 32,
                    size: 2 << 20,
                },
            ],
            2,
            b"{\"mem\":3}".to_vec(),
        );
        h.compression = Compression::Zstd { level: 3 };
        h
    }

    #[test]
    fn header_round_trip() {
        let h = header();
        let b = h.encode();
        assert_eq!(u32_at(&b, 12) as usize, b.len());
        assert_eq!(SnapshotHeader::decode(&b).unwrap(), h);
    }

    /// A child's header: the parent reference round trips, its path hint is the file name in
    /// the same directory and absolute elsewhere, and a bad reference is refused.
    #[test]
    fn parent_reference_round_trip_and_path_hint() {
        use std::path::Path;
        let identity = Identity {
            snapshot_id: [9; SNAPSHOT_ID_LEN],
            trailer_crc: 0x0102_0304,
            file_len: 1 << 33,
        };
        let same = ParentRef::new(
            identity,
            Path::new("/s/a/base.snap"),
            Path::new("/s/a/c.snap"),
        );
        assert_eq!(same.path, Path::new("base.snap"));
        assert_eq!(
            same.resolve(Path::new("/t/c.snap")),
            Path::new("/t/base.snap")
        );
        let other = ParentRef::new(
            identity,
            Path::new("/s/b/base.snap"),
            Path::new("/s/a/c.snap"),
        );
        assert_eq!(other.path, Path::new("/s/b/base.snap"));
        assert_eq!(
            other.resolve(Path::new("/t/c.snap")),
            Path::new("/s/b/base.snap")
        );
        let mut h = header();
        h.parent = Some(other.clone());
        let b = h.encode();
        assert_eq!(u32_at(&b, 16), FLAG_HAS_PARENT);
        assert_eq!(SnapshotHeader::decode(&b).unwrap(), h);
        assert_eq!(ParentRef::decode(&other.encode()).unwrap(), other);
        let enc = other.encode();
        assert!(ParentRef::decode(&enc[..enc.len() - 1]).is_err());
        let mut nul = enc.clone();
        nul[PARENT_REF_FIXED_LEN] = 0;
        assert!(ParentRef::decode(&nul).is_err());
        let mut empty = enc[..PARENT_REF_FIXED_LEN].to_vec();
        empty[PARENT_REF_FIXED_LEN - 4..].copy_from_slice(&0u32.to_le_bytes());
        assert!(ParentRef::decode(&empty).is_err());
        let id = identity.to_string();
        assert!(
            id.starts_with("0909") && id.ends_with("/01020304/8589934592"),
            "{id}"
        );
    }

    /// Parent records exist from version 3 on, with no payload and codec 0 only.
    #[test]
    fn parent_records_are_version_3_and_carry_nothing() {
        let e = IndexEntry {
            offset: 100,
            first_page: 4,
            page_count: 3,
            kind: RecordKind::Parent,
            hot: false,
        };
        let t = Trailer {
            totals: Totals {
                pages: 3,
                parent_pages: 3,
                records: 1,
                ..Totals::default()
            },
            index: vec![e],
        };
        let b = t.encode();
        let got = Trailer::decode(&b, 0, 3).unwrap();
        assert_eq!(got, t);
        assert_eq!(got.totals.parent_pages, 3);
        assert!(Trailer::decode(&b, 0, 2).is_err());
        assert!(Trailer::decode(&b, 0, 1).is_err());
        let mut h = RecordHeader {
            kind: RecordKind::Parent,
            codec: CODEC_RAW,
            first_page: 4,
            page_count: 3,
            stored_len: 0,
            crc: 0,
        };
        h.crc = h.compute_crc(&[]);
        assert_eq!(RecordHeader::decode(&h.encode(), max_codec(3)), Some(h));
        for codec in [CODEC_ZSTD, CODEC_ZSTD_PIECES, CODEC_RAW_PIECES] {
            let mut b = h.encode();
            b[5] = codec;
            assert_eq!(
                RecordHeader::decode(&b, max_codec(3)),
                None,
                "codec {codec}"
            );
        }
    }

    /// A version-2 header has no snapshot id (it decodes as zeros) and no parent reference.
    #[test]
    fn version_2_headers_have_no_snapshot_id() {
        let mut h = header();
        let mut b = h.encode();
        // Drop the id and re-seal as version 2.
        let n = b.len();
        b.drain(n - 4 - SNAPSHOT_ID_LEN..n - 4);
        b[VERSION_AT..VERSION_AT + 4].copy_from_slice(&2u32.to_le_bytes());
        let n = b.len();
        b[HEADER_LEN_AT..HEADER_LEN_AT + 4].copy_from_slice(&(n as u32).to_le_bytes());
        let crc = crc32fast::hash(&b[..n - 4]);
        b[n - 4..].copy_from_slice(&crc.to_le_bytes());
        h.snapshot_id = [0; SNAPSHOT_ID_LEN];
        assert_eq!(SnapshotHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn header_any_flip_detected() {
        let b = header().encode();
        for i in 16..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(
                SnapshotHeader::decode(&c).is_err(),
                "flip at {i} undetected"
            );
        }
    }

    #[test]
    fn machine_state_head_round_trip_and_bounds() {
        let blob = b"machine state";
        let h = MachineStateHead::of(blob).unwrap();
        let b = h.encode();
        assert_eq!(&b[0..4], &STATE_TAG);
        let end = 100 + (STATE_HEAD_LEN + blob.len()) as u64;
        assert_eq!(MachineStateHead::decode(&b, 100, end).unwrap(), h);
        h.check(blob, 100).unwrap();
        assert!(h.check(b"machine statf", 100).is_err());
        // The blob must end by `end`, and never exceed the format's limit.
        assert!(MachineStateHead::decode(&b, 100, end - 1).is_err());
        let mut big = b;
        big[4..12].copy_from_slice(&(MAX_MACHINE_STATE_LEN + 1).to_le_bytes());
        assert!(MachineStateHead::decode(&big, 0, u64::MAX).is_err());
        let mut bad_tag = b;
        bad_tag[0] ^= 1;
        assert!(MachineStateHead::decode(&bad_tag, 100, end).is_err());
    }

    #[test]
    fn pieces_are_aligned_in_guest_pages() {
        // 64 KiB pieces (16 pages) of pages 10..60: 10..16, 16..32, 32..48, 48..60.
        let l = PieceLayout::new(10, 50, 64 << 10, 4096).unwrap();
        assert_eq!(l.count, 4);
        let spans: Vec<_> = (0..l.count).map(|k| l.span(k)).collect();
        assert_eq!(spans, [(0, 6), (6, 22), (22, 38), (38, 50)]);
        for rel in 0..50 {
            let (a, b) = l.span(l.piece_of(rel));
            assert!(a <= rel && rel < b);
        }
        assert_eq!(l.table_len(), 8 + 4 * 8 + 4);
        // One piece when the record lies inside one.
        assert_eq!(PieceLayout::new(16, 16, 64 << 10, 4096).unwrap().count, 1);
        // Piece sizes no reader accepts, and pages at the end of the page numbers.
        for bad in [0, 2048, 12288, (MAX_RECORD_RAW * 2) as u32] {
            assert!(PieceLayout::new(0, 1, bad, 4096).is_none(), "{bad}");
        }
        assert!(PieceLayout::new(u64::MAX - 4, 2, 64 << 10, 4096).is_none());
        assert!(PieceLayout::new(u64::MAX, 2, 4096, 4096).is_none());
        assert!(PieceLayout::new(0, 0, 4096, 4096).is_none());
    }

    #[test]
    fn trailer_round_trip() {
        let t = Trailer {
            totals: Totals {
                pages: 3,
                zero_pages: 1,
                data_pages: 2,
                parent_pages: 0,
                records: 2,
                raw_bytes: 8192,
                stored_bytes: 100,
            },
            index: vec![
                IndexEntry {
                    offset: 100,
                    first_page: 0,
                    page_count: 2,
                    kind: RecordKind::Data,
                    hot: true,
                },
                IndexEntry {
                    offset: 228,
                    first_page: 2,
                    page_count: 1,
                    kind: RecordKind::ZeroRun,
                    hot: false,
                },
            ],
        };
        let b = t.encode();
        assert_eq!(Trailer::decode(&b, 0, FORMAT_VERSION).unwrap(), t);
        // Version 1 knows no flags: a hot entry is invalid there.
        assert!(Trailer::decode(&b, 0, 1).is_err());
        let f = encode_footer(5, b.len() as u64);
        assert_eq!(decode_footer(&f), Some((5, b.len() as u64)));
    }
}
