//! Compression workers: staged runs become zero runs and (compressed) data records, fault work
//! first (see `fault`) and marked hot in the index, with adaptive compression so that
//! incompressible memory does not cost zstd's time.

use std::sync::atomic::Ordering;

use super::staging::{Nice, YIELD_NICE};
use super::{lock, InjectPoint, SaveError, Shared, Work, PAGE_SIZE};
use crate::format::{Compression, FormatError};
use crate::hashes::{page_hash, PageHashes};
use crate::writer::{EncodedBatch, RecordEncoder};

/// Adaptive compression: a zstd batch stored at more than this share of its input …
const RAW_RATIO: f64 = 0.97;
/// … makes the next this many bytes go raw without trying zstd.
const RAW_SKIP: u64 = 64 << 20;

impl Shared<'_> {
    /// Compression worker: staged blocks → encoded batches for the writer.
    ///
    /// Adaptive compression: a batch that zstd does not shrink below [`RAW_RATIO`] makes the
    /// workers store the next [`RAW_SKIP`] bytes raw without trying (records stored raw under
    /// zstd are part of the format), then probe again: zstd on incompressible memory halves the
    /// save's speed and lets the fault pool run dry, while compressible memory still compresses
    /// (`docs/PERFORMANCE.md`, "Adaptive compression").
    pub(super) fn worker_loop(&self, compression: Compression) -> Result<(), SaveError> {
        let mut zstd = RecordEncoder::new(PAGE_SIZE, compression)
            .map_err(|e| SaveError::Write(FormatError::Unwritable(e)))?;
        let mut raw = RecordEncoder::new(PAGE_SIZE, Compression::None)
            .map_err(|e| SaveError::Write(FormatError::Unwritable(e)))?;
        let compressing = !matches!(compression, Compression::None);
        let mut work = Vec::new();
        let mut same = Vec::new();
        let mut nice = Nice::new();
        while self.pop_work(&mut work) {
            nice.set_if(self.copy_first(), Some(YIELD_NICE));
            if self.inject == Some(InjectPoint::WorkerPanic) {
                panic!("injected worker failure");
            }
            let mut batch = lock(&self.spare_batches).pop().unwrap_or_default();
            batch.clear();
            let data_bytes: usize = work
                .iter()
                .map(|w| match w {
                    Work::Data { runs, .. } => runs.iter().map(|r| r.len).sum(),
                    Work::Zero { .. } | Work::Parent { .. } => 0,
                })
                .sum();
            let kind = usize::from(matches!(work.first(), Some(Work::Data { fault: true, .. })));
            let skip = compressing && self.take_raw_skip(kind, data_bytes as u64);
            let enc = if skip { &mut raw } else { &mut zstd };
            let mut fault_batch = false;
            let mut r = Ok(());
            for w in work.drain(..) {
                match w {
                    Work::Data {
                        buf,
                        runs,
                        fault,
                        hot,
                    } => {
                        fault_batch |= fault;
                        // What the fault path copied is hot in the index.
                        enc.set_hot(hot);
                        for run in &runs {
                            if r.is_ok() {
                                let data = &buf[run.off..run.off + run.len];
                                r = match &self.hashes {
                                    Some(h) => self.encode_hashed(
                                        enc,
                                        h,
                                        run.first_page,
                                        data,
                                        hot,
                                        &mut batch,
                                        &mut same,
                                    ),
                                    None => enc.encode(run.first_page, data, &mut batch),
                                };
                            }
                        }
                        self.release_buffer(buf, fault);
                    }
                    Work::Zero { first_page, pages } => {
                        if let Some(h) = &self.hashes {
                            h.set_zero(first_page, pages);
                        }
                        enc.set_hot(false);
                        enc.zero_run(first_page, pages, &mut batch)
                    }
                    Work::Parent { first_page, pages } => {
                        enc.set_hot(false);
                        enc.parent_run(first_page, pages, &mut batch)
                    }
                }
            }
            r.map_err(|e| SaveError::Write(FormatError::Unwritable(e)))?;
            if compressing && !skip && batch.totals.data_pages > 0 {
                let input = batch.totals.data_pages * PAGE_SIZE as u64;
                if batch.totals.stored_bytes as f64 > input as f64 * RAW_RATIO {
                    self.raw_skip[kind].store(RAW_SKIP, Ordering::Relaxed);
                }
            }
            if !self.send_batch(batch, fault_batch) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Encode `data` (whole pages from guest page `first_page`) as [`RecordEncoder::encode`]
    /// does, hashing every page into `hashes`; in an incremental save, pages whose hash equals
    /// the table's go as Parent runs (not hot) instead, and keep their hash. `same` is scratch.
    #[allow(clippy::too_many_arguments)]
    fn encode_hashed(
        &self,
        enc: &mut RecordEncoder,
        hashes: &PageHashes,
        first_page: u64,
        data: &[u8],
        hot: bool,
        batch: &mut EncodedBatch,
        same: &mut Vec<bool>,
    ) -> std::io::Result<()> {
        same.clear();
        for (k, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let hash = page_hash(page);
            let slot = hashes.slot(first_page + k as u64);
            let equal = self.compare && slot.is_some_and(|s| hashes.equals(s, hash));
            if !equal {
                if let Some(s) = slot {
                    hashes.set(s, hash);
                }
            }
            same.push(equal);
        }
        if self.compare {
            let unchanged = same.iter().filter(|&&e| e).count() as u64;
            self.pages_compared
                .fetch_add(same.len() as u64, Ordering::Relaxed);
            self.pages_unchanged.fetch_add(unchanged, Ordering::Relaxed);
            if unchanged == 0 {
                return enc.encode(first_page, data, batch);
            }
        } else {
            return enc.encode(first_page, data, batch);
        }
        // Runs of equal flags: stored pages encoded, unchanged ones one Parent run each.
        let mut i = 0;
        while i < same.len() {
            let mut j = i + 1;
            while j < same.len() && same[j] == same[i] {
                j += 1;
            }
            let first = first_page + i as u64;
            if same[i] {
                enc.set_hot(false);
                enc.parent_run(first, (j - i) as u64, batch);
                enc.set_hot(hot);
            } else {
                enc.encode(first, &data[i * PAGE_SIZE..j * PAGE_SIZE], batch)?;
            }
            i = j;
        }
        Ok(())
    }

    /// True if the next `bytes` are to be stored raw without trying zstd.
    fn take_raw_skip(&self, kind: usize, bytes: u64) -> bool {
        self.raw_skip[kind]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                (left > 0).then(|| left.saturating_sub(bytes.max(1)))
            })
            .is_ok()
    }
}
