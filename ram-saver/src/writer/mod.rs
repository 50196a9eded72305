//! Writing snapshot files: [`SnapshotWriter`] lays out header, machine state, records, trailer
//! and footer (as [`format`](crate::format) encodes them) into a [`SnapshotSink`]: an
//! [`AtomicFileSink`] (`file_sink`, with its I/O thread in `io_thread`), a [`StreamSink`], or a
//! `Vec<u8>`. Records come from a [`RecordEncoder`] (`encoder`).

use std::io::{self, BufWriter, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::format::{
    encode_footer, FormatError, IndexEntry, MachineStateHead, SnapshotHeader, Totals, Trailer,
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
        })
    }

    /// Append records already encoded by a [`RecordEncoder`].
    pub fn write_batch(&mut self, batch: &EncodedBatch) -> Result<(), FormatError> {
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

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.pos
    }

    /// Totals of the records written so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Write trailer and footer, then commit the sink. Returns the file size.
    pub fn finish(mut self) -> Result<u64, FormatError> {
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
        Ok(self.pos + (trailer.len() + footer.len()) as u64)
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
}
