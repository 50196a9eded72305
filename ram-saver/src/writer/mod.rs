//! Writing snapshot files: [`SnapshotWriter`] lays out header, machine state, records, trailer
//! and footer (as [`format`](crate::format) encodes them) into a [`SnapshotSink`]: an
//! [`AtomicFileSink`] (`file_sink`, with its I/O thread in `io_thread`), a [`StreamSink`], or a
//! `Vec<u8>`. Records come from a [`RecordEncoder`] (`encoder`).

use std::io::{self, BufWriter, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::format::{
    encode_footer, FormatError, Identity, IndexEntry, MachineStateHead, SnapshotHeader, Totals,
    Trailer, SNAPSHOT_ID_LEN,
};

mod encoder;
mod file_sink;
mod io_thread;

pub(crate) use encoder::is_zero;
pub use encoder::{EncodedBatch, RecordEncoder};
pub use file_sink::AtomicFileSink;

/// Large writes: records arrive in block-sized pieces anyway.
const WRITE_BUFFER: usize = 4 << 20;

/// Where a snapshot goes. Bytes are written in order; `finish` makes them durable and visible.
///
/// Dropping a sink without `finish` must leave nothing under the user's name.
pub trait SnapshotSink: Write {
    /// Flush and commit the output (fsync + rename for files).
    fn finish(self) -> io::Result<()>;

    /// A flag that abandons the output once set: writes waiting for output that does not move
    /// (a hung disk or network file system) fail instead of waiting, and dropping the sink does
    /// not wait for them either. [`live_save`](crate::live_save) sets it when a save is
    /// cancelled or fails, so that it returns while the output is stuck.
    ///
    /// `None` (the default): the sink cannot be abandoned; a write blocks as long as its output.
    fn abandon_flag(&self) -> Option<Arc<AtomicBool>> {
        None
    }
}

/// A stream sink (stdout, a pipe, a socket, a `Vec<u8>`); `finish` only flushes.
#[derive(Debug)]
pub struct StreamSink<W: Write>(pub BufWriter<W>);

impl<W: Write> StreamSink<W> {
    /// Wrap `w` with a large write buffer.
    pub fn new(w: W) -> Self {
        StreamSink(BufWriter::with_capacity(WRITE_BUFFER, w))
    }
}

impl<W: Write> Write for StreamSink<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> SnapshotSink for StreamSink<W> {
    fn finish(mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// In-memory output, mostly for tests.
impl SnapshotSink for &mut Vec<u8> {
    fn finish(self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes a snapshot file: header and machine state first, then records, then trailer + footer.
#[derive(Debug)]
pub struct SnapshotWriter<S: SnapshotSink> {
    sink: S,
    pos: u64,
    page_size: u64,
    index: Vec<IndexEntry>,
    totals: Totals,
    encoder: RecordEncoder,
    batch: EncodedBatch,
    /// The header has a parent reference: Parent records are allowed.
    has_parent: bool,
    snapshot_id: [u8; SNAPSHOT_ID_LEN],
}

impl<S: SnapshotSink> SnapshotWriter<S> {
    /// Write the header and the machine state to `sink`. A machine state larger than
    /// [`MAX_MACHINE_STATE_LEN`](crate::format::MAX_MACHINE_STATE_LEN), which no reader would
    /// accept, is refused before anything is written.
    pub fn new(
        mut sink: S,
        header: &SnapshotHeader,
        machine_state: &[u8],
    ) -> Result<Self, FormatError> {
        let st = MachineStateHead::of(machine_state)?.encode();
        let h = header.encode();
        sink.write_all(&h).map_err(FormatError::Unwritable)?;
        sink.write_all(&st).map_err(FormatError::Unwritable)?;
        sink.write_all(machine_state)
            .map_err(FormatError::Unwritable)?;
        let encoder = RecordEncoder::new(header.page_size as usize, header.compression)
            .map_err(FormatError::Unwritable)?;
        Ok(SnapshotWriter {
            sink,
            pos: (h.len() + st.len() + machine_state.len()) as u64,
            page_size: u64::from(header.page_size),
            index: Vec::new(),
            totals: Totals::default(),
            encoder,
            batch: EncodedBatch::default(),
            has_parent: header.parent.is_some(),
            snapshot_id: header.snapshot_id,
        })
    }

    /// Append records already encoded by a [`RecordEncoder`]. Parent records are refused
    /// ([`FormatError::ParentRunWithoutParent`], nothing written) unless the header has a parent
    /// reference.
    pub fn write_batch(&mut self, batch: &EncodedBatch) -> Result<(), FormatError> {
        if batch.totals.parent_pages > 0 && !self.has_parent {
            return Err(FormatError::ParentRunWithoutParent);
        }
        self.sink
            .write_all(&batch.bytes)
            .map_err(FormatError::Unwritable)?;
        for e in &batch.entries {
            self.index.push(IndexEntry {
                offset: self.pos + e.offset,
                ..*e
            });
        }
        self.pos += batch.bytes.len() as u64;
        let (t, b) = (&mut self.totals, &batch.totals);
        t.pages += b.pages;
        t.zero_pages += b.zero_pages;
        t.data_pages += b.data_pages;
        t.parent_pages += b.parent_pages;
        t.records += b.records;
        t.stored_bytes += b.stored_bytes;
        t.raw_bytes += b.data_pages * self.page_size;
        Ok(())
    }

    /// Encode and append `data` (whole pages) at guest page `first_page`.
    pub fn write_pages(&mut self, first_page: u64, data: &[u8]) -> Result<(), FormatError> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        self.encoder
            .encode(first_page, data, &mut batch)
            .map_err(FormatError::Unwritable)?;
        let r = self.write_batch(&batch);
        self.batch = batch;
        r
    }

    /// Append a zero run of `count` pages at `first_page`.
    pub fn write_zero_run(&mut self, first_page: u64, count: u64) -> Result<(), FormatError> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        self.encoder.zero_run(first_page, count, &mut batch);
        let r = self.write_batch(&batch);
        self.batch = batch;
        r
    }

    /// Append Parent records for `count` pages at `first_page`: pages whose content is the
    /// parent's. Refused without a parent reference in the header.
    pub fn write_parent_run(&mut self, first_page: u64, count: u64) -> Result<(), FormatError> {
        let mut batch = std::mem::take(&mut self.batch);
        batch.clear();
        self.encoder.parent_run(first_page, count, &mut batch);
        let r = self.write_batch(&batch);
        self.batch = batch;
        r
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.pos
    }

    /// Totals of the records written so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Write trailer and footer, then commit the sink. Returns the file size.
    pub fn finish(self) -> Result<u64, FormatError> {
        self.finish_identity().map(|id| id.file_len)
    }

    /// [`SnapshotWriter::finish`], returning the written file's [`Identity`] (what a child of
    /// it names it by, as [`SnapshotReader::identity`](crate::SnapshotReader::identity) would
    /// compute it).
    pub fn finish_identity(mut self) -> Result<Identity, FormatError> {
        let trailer = Trailer {
            totals: self.totals,
            index: std::mem::take(&mut self.index),
        }
        .encode();
        let footer = encode_footer(self.pos, trailer.len() as u64);
        self.sink
            .write_all(&trailer)
            .map_err(FormatError::Unwritable)?;
        self.sink
            .write_all(&footer)
            .map_err(FormatError::Unwritable)?;
        self.sink.finish().map_err(FormatError::Unwritable)?;
        let n = trailer.len();
        Ok(Identity {
            snapshot_id: self.snapshot_id,
            trailer_crc: u32::from_le_bytes([
                trailer[n - 4],
                trailer[n - 3],
                trailer[n - 2],
                trailer[n - 1],
            ]),
            file_len: self.pos + (n + footer.len()) as u64,
        })
    }
}

/// A fresh directory under the temporary directory (on disk here, not tmpfs).
#[cfg(test)]
fn test_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{ErrorKind, MemRegion, MAX_MACHINE_STATE_LEN};
    use crate::SnapshotReader;

    fn header() -> SnapshotHeader {
        SnapshotHeader::new(vec![MemRegion { gpa: 0, size: 4096 }], 1, Vec::new())
    }

    /// The writer refuses what the reader would refuse: a machine state over
    /// `MAX_MACHINE_STATE_LEN`, before writing a byte; one of exactly that size is written and
    /// read back.
    #[test]
    fn machine_state_over_the_limit_is_refused() {
        let max = MAX_MACHINE_STATE_LEN as usize;
        let mut out = Vec::new();
        let err = SnapshotWriter::new(&mut out, &header(), &vec![7u8; max + 1]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
        assert!(err.to_string().contains("machine state"), "{err}");
        assert!(out.is_empty(), "{} bytes written", out.len());

        let mut w = SnapshotWriter::new(&mut out, &header(), &vec![7u8; max]).unwrap();
        w.write_pages(0, &[1u8; 4096]).unwrap();
        w.finish().unwrap();
        let r = SnapshotReader::from_reader(std::io::Cursor::new(&out)).unwrap();
        assert_eq!(r.machine_state().len(), max);
    }

    fn child_header() -> SnapshotHeader {
        let mut h = SnapshotHeader::new(
            vec![MemRegion {
                gpa: 0,
                size: 16 * 4096,
            }],
            1,
            Vec::new(),
        );
        h.parent = Some(crate::ParentRef {
            identity: crate::Identity {
                snapshot_id: [7; 16],
                trailer_crc: 0xdead_beef,
                file_len: 12345,
            },
            path: "base.snap".into(),
        });
        h
    }

    /// A child: data, zero and Parent records; the header's parent reference, the totals (parent
    /// pages counted apart) and the identity the writer returns are what a reader sees.
    #[test]
    fn child_round_trip() {
        let dir = test_dir("child-round-trip");
        let path = dir.join("child.snap");
        let h = child_header();
        let mut w = SnapshotWriter::new(AtomicFileSink::create(&path).unwrap(), &h, b"ms").unwrap();
        w.write_parent_run(0, 5).unwrap();
        w.write_pages(5, &[3u8; 2 * 4096]).unwrap();
        w.write_zero_run(7, 1).unwrap();
        w.write_parent_run(8, 8).unwrap();
        let id = w.finish_identity().unwrap();
        let mut rd = SnapshotReader::open(&path).unwrap();
        assert_eq!(rd.format_version(), crate::FORMAT_VERSION);
        assert_eq!(rd.header(), &h);
        assert_eq!(rd.identity(), id);
        assert_eq!(id.file_len, std::fs::metadata(&path).unwrap().len());
        let t = rd.trailer().totals;
        assert_eq!(
            (t.pages, t.parent_pages, t.data_pages, t.zero_pages),
            (16, 13, 2, 1)
        );
        let kinds: Vec<_> = rd.trailer().index.iter().map(|e| e.kind).collect();
        use crate::RecordKind::*;
        assert_eq!(kinds, [Parent, Data, ZeroRun, Parent]);
        let report = rd.verify(&mut |_| {}).unwrap();
        assert_eq!(report.totals, t);
        // Alone, a child cannot give its parent's pages.
        let mut out = Vec::new();
        let err = rd.read_record_at(0, &mut out).unwrap_err();
        assert!(
            matches!(err, FormatError::InParent { record: Some(0) }),
            "{err}"
        );
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(
            vm_memory::GuestAddress(0),
            16 * 4096,
        )])
        .unwrap();
        let err = rd.load_into(&mem, &mut |_| {}).unwrap_err();
        assert!(
            matches!(err, FormatError::InParent { record: None }),
            "{err}"
        );
        // A new file of the same content has an identity of its own.
        let mut h2 = h.clone();
        h2.snapshot_id = crate::format::random_snapshot_id();
        assert_ne!(h2.snapshot_id, h.snapshot_id);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Parent records need a parent reference: the writer refuses them, and a reader refuses a
    /// file that has them anyway (its crcs all valid).
    #[test]
    fn parent_records_without_a_parent_are_refused() {
        let mut out = Vec::new();
        let h = SnapshotHeader::new(
            vec![MemRegion {
                gpa: 0,
                size: 2 * 4096,
            }],
            1,
            Vec::new(),
        );
        let mut w = SnapshotWriter::new(&mut out, &h, b"").unwrap();
        let err = w.write_parent_run(0, 1).unwrap_err();
        assert!(matches!(err, FormatError::ParentRunWithoutParent), "{err}");
        assert_eq!(w.totals(), Totals::default());

        // The same file written with a parent, then its header replaced by one without.
        let mut child = Vec::new();
        let mut hc = h.clone();
        hc.parent = child_header().parent;
        let mut w = SnapshotWriter::new(&mut child, &hc, b"").unwrap();
        w.write_pages(0, &[1u8; 4096]).unwrap();
        w.write_parent_run(1, 1).unwrap();
        w.finish().unwrap();
        let old = hc.encode();
        let new = h.encode();
        let mut forged = new.clone();
        forged.extend_from_slice(&child[old.len()..]);
        // Footer offsets moved by the header's length difference: re-encode them.
        let delta = old.len() as i64 - new.len() as i64;
        let n = forged.len();
        let t_off = u64::from_le_bytes(forged[n - 32..n - 24].try_into().unwrap());
        let t_len = u64::from_le_bytes(forged[n - 24..n - 16].try_into().unwrap());
        let footer = crate::format::encode_footer((t_off as i64 - delta) as u64, t_len);
        forged[n - 32..].copy_from_slice(&footer);
        // The index offsets move too.
        let t_at = (t_off as i64 - delta) as usize;
        let entries = (t_len as usize - crate::format::TRAILER_FIXED_LEN) / 24;
        for k in 0..entries {
            let at = t_at + crate::format::TRAILER_HEAD_LEN + 24 * k;
            let o = u64::from_le_bytes(forged[at..at + 8].try_into().unwrap());
            forged[at..at + 8].copy_from_slice(&((o as i64 - delta) as u64).to_le_bytes());
        }
        let tl = t_len as usize;
        let crc = crc32fast::hash(&forged[t_at..t_at + tl - 4]);
        forged[t_at + tl - 4..t_at + tl].copy_from_slice(&crc.to_le_bytes());
        let err = SnapshotReader::from_reader(std::io::Cursor::new(&forged)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert!(
            err.to_string()
                .contains("parent record in a file without a parent"),
            "{err}"
        );
        assert_eq!(err.record(), Some(1), "{err}");
        // Unforged, it reads.
        SnapshotReader::from_reader(std::io::Cursor::new(&child)).unwrap();
    }

    /// Trailer totals that do not add up (parent pages are what the others leave) are refused.
    #[test]
    fn totals_are_checked() {
        let mut child = Vec::new();
        let mut h = SnapshotHeader::new(
            vec![MemRegion {
                gpa: 0,
                size: 3 * 4096,
            }],
            1,
            Vec::new(),
        );
        h.parent = child_header().parent;
        let mut w = SnapshotWriter::new(&mut child, &h, b"").unwrap();
        w.write_parent_run(0, 2).unwrap();
        w.write_pages(2, &[1u8; 4096]).unwrap();
        w.finish().unwrap();
        let n = child.len();
        let t_at = u64::from_le_bytes(child[n - 32..n - 24].try_into().unwrap()) as usize;
        let t_len = u64::from_le_bytes(child[n - 24..n - 16].try_into().unwrap()) as usize;
        // totals: pages, zero, data at t_at + 4, + 12, + 20.
        for (field, value) in [(0usize, 2u64), (1, 1), (2, 3), (0, 4)] {
            let mut b = child.clone();
            let at = t_at + 4 + 8 * field;
            b[at..at + 8].copy_from_slice(&value.to_le_bytes());
            let crc = crc32fast::hash(&b[t_at..t_at + t_len - 4]);
            b[t_at + t_len - 4..t_at + t_len].copy_from_slice(&crc.to_le_bytes());
            let err = SnapshotReader::from_reader(std::io::Cursor::new(&b)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt, "field {field}: {err}");
        }
        let rd = SnapshotReader::from_reader(std::io::Cursor::new(&child)).unwrap();
        assert_eq!(rd.trailer().totals.parent_pages, 2);
    }
}
