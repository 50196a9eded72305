//! Chains of incremental snapshots: a child file, its parent, the parent's parent, … down to a
//! file without a parent (the base), read as one snapshot (see "Incremental snapshots" in
//! [`format`](crate::format)).
//!
//! [`Chain::open`] opens the file named (layer 1), then, while a layer has a parent reference,
//! the file its path hint names (layer 2, 3, …, at most [`MAX_CHAIN_LAYERS`]): each is opened
//! and checked as any snapshot is, must have the identity its child names
//! ([`FormatError::ParentChanged`] otherwise, [`FormatError::ParentNotFound`] when it cannot be
//! opened) and the same page size and regions, and its index must cover guest memory exactly
//! once. In a chain of several layers, errors name the layer ([`FormatError::InLayer`]); a
//! standalone file's are the file's, as [`SnapshotReader`] gives them.
//!
//! It then builds one **flattened index**: the guest pages in order, cut into [`Span`]s, each
//! naming the layer and the record (of that layer's index) that holds its pages. Going up from
//! the base, a layer's Data and ZeroRun records replace what is below, its Parent records keep
//! the spans below (cut to their pages). Built in one merge-like pass per layer over its index
//! sorted by page (`O(n log n)` in the records of the layer, linear in the spans); looking a page
//! up is a binary search ([`Chain::span_of`]).
//!
//! A file without a parent is a chain of one layer: everything here works on it as on a chain.
//!
//! - [`Chain::verify`]: every layer verified as a file (every crc, coverage, trailer), errors
//!   naming the layer.
//! - [`Chain::load_into`]: eager restore on all cores, span by span of the flattened index: each
//!   guest page written once, from the record of the layer that holds it.
//! - [`Chain::merge`]: one standalone file with the chain's content (records used whole are
//!   copied as stored, only records cut by a newer layer are decoded and encoded again).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::format::{
    random_snapshot_id, Compression, FormatError, Identity, IndexEntry, ParentRef, RecordKind,
    SnapshotHeader, Totals,
};
use crate::reader::{ReadProgress, SnapshotReader, VerifyReport};
use crate::writer::{EncodedBatch, SnapshotSink, SnapshotWriter};

/// Most layers a chain may have (the file named and its ancestors).
pub const MAX_CHAIN_LAYERS: usize = 64;

/// Guest pages of one unit of work of [`Chain::load_into`] (about; whole spans).
pub const LOAD_UNIT_PAGES: u64 = 1024;

/// Bytes of stored records [`Chain::merge`] copies with one read at most.
const COPY_CHUNK: u64 = 16 << 20;

/// A snapshot file opened by path.
pub type FileReader = SnapshotReader<BufReader<File>>;

/// One file of a chain.
#[derive(Debug)]
pub struct Layer {
    /// Where it was opened from.
    pub path: PathBuf,
    /// The open file (checked).
    pub reader: FileReader,
}

impl Layer {
    /// Its identity.
    pub fn identity(&self) -> Identity {
        self.reader.identity()
    }
}

/// Guest pages `[first_page, first_page + pages)` of a chain and where they are: record
/// `record` of layer `layer`'s index (0: the top). Never a Parent record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Span {
    /// First guest page.
    pub first_page: u64,
    /// Pages.
    pub pages: u64,
    /// The layer (index into [`Chain::layers`], 0 = the file named).
    pub layer: u16,
    /// The record of that layer's index holding the pages.
    pub record: u32,
}

/// What each layer gives a chain.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LayerFigures {
    /// The layer's file.
    pub path: PathBuf,
    /// Its identity (`snapshot id/trailer crc/length`).
    pub identity: String,
    /// Its file size.
    pub file_bytes: u64,
    /// Its totals (pages stored: data and zero; parent pages: left to the layers below).
    pub totals: Totals,
    /// Guest pages of the chain's content that come from this layer.
    pub pages_used: u64,
}

/// What [`Chain::verify`] proved, layer by layer (top first).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChainVerifyReport {
    /// Each layer's own verification.
    pub layers: Vec<VerifyReport>,
    /// Guest pages (the same in every layer).
    pub guest_pages: u64,
}

/// Progress of [`Chain::merge`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct MergeProgress {
    /// Guest pages written.
    pub pages: u64,
    /// Guest pages in all.
    pub total_pages: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

/// Outcome of [`Chain::merge`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct MergeSummary {
    /// Records copied as stored.
    pub records_copied: u64,
    /// Their bytes (headers and payloads).
    pub bytes_copied: u64,
    /// Guest pages of records cut by a newer layer, decoded and encoded again.
    pub pages_reencoded: u64,
    /// Totals of the merged file.
    pub totals: Totals,
    /// The merged file's identity.
    pub identity: Identity,
    /// Size of the merged file.
    pub file_bytes: u64,
    /// Wall time, seconds.
    pub secs: f64,
}

/// A chain of snapshot files read as one snapshot (see the module docs).
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Layer>,
    spans: Vec<Span>,
}

/// `e` of layer `k` (0-based) at `path` of a chain of `n` layers: named by its layer
/// ([`FormatError::InLayer`]) when there are several, as it is for a standalone file.
fn wrap(n: usize, k: usize, path: &Path, e: FormatError) -> FormatError {
    if n == 1 {
        e
    } else {
        in_layer(k, path, e)
    }
}

/// Wrap `e` as an error of layer `k` (0-based) at `path`.
fn in_layer(k: usize, path: &Path, e: FormatError) -> FormatError {
    FormatError::InLayer {
        layer: k + 1,
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

impl Chain {
    /// Open the snapshot at `path` and every parent it names (see the module docs).
    pub fn open(path: impl AsRef<Path>) -> Result<Chain, FormatError> {
        let path = path.as_ref().to_path_buf();
        // The file named: its errors are the file's (no layer to name yet).
        let top = SnapshotReader::open(&path)?;
        let mut layers = vec![Layer { path, reader: top }];
        loop {
            let k = layers.len();
            let child = &layers[k - 1];
            let Some(pref) = child.reader.header().parent.clone() else {
                break;
            };
            if k >= MAX_CHAIN_LAYERS {
                return Err(FormatError::ChainTooDeep {
                    max: MAX_CHAIN_LAYERS,
                });
            }
            let ppath = pref.resolve(&child.path);
            let reader = match SnapshotReader::open(&ppath) {
                Ok(r) => r,
                Err(FormatError::Unreadable(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(FormatError::ParentNotFound {
                        layer: k + 1,
                        path: ppath,
                        source: e,
                    })
                }
                Err(e) => return Err(in_layer(k, &ppath, e)),
            };
            let found = reader.identity();
            if found != pref.identity {
                return Err(FormatError::ParentChanged {
                    layer: k + 1,
                    path: ppath,
                    expected: pref.identity,
                    found,
                });
            }
            let (a, b) = (child.reader.header(), reader.header());
            if a.page_size != b.page_size || a.regions != b.regions {
                return Err(FormatError::ParentLayoutDiffers {
                    layer: k + 1,
                    path: ppath,
                });
            }
            layers.push(Layer {
                path: ppath,
                reader,
            });
        }
        let spans = flatten(&layers)?;
        Ok(Chain { layers, spans })
    }

    /// The layers, the file named first, the base last.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The file named (the newest layer).
    pub fn top(&self) -> &FileReader {
        &self.layers[0].reader
    }

    /// The header of the file named (its regions are every layer's).
    pub fn header(&self) -> &SnapshotHeader {
        self.top().header()
    }

    /// The machine state of the file named: the VM's state at the chain's freeze instant.
    pub fn machine_state(&self) -> &[u8] {
        self.top().machine_state()
    }

    /// The identity of the file named: what a child of this chain's content names as its parent
    /// (a VM restored from the chain holds the content of exactly this file's freeze instant).
    pub fn identity(&self) -> Identity {
        self.top().identity()
    }

    /// The parent reference a child written at `child_path` stores for the file named.
    pub fn parent_ref_for(&self, child_path: &Path) -> ParentRef {
        ParentRef::new(self.identity(), &self.layers[0].path, child_path)
    }

    /// The flattened index: every guest page in exactly one span, in page order.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// The span holding guest page `page` (binary search), if it is guest memory.
    pub fn span_of(&self, page: u64) -> Option<&Span> {
        let at = self.spans.partition_point(|s| s.first_page <= page);
        let s = self.spans.get(at.checked_sub(1)?)?;
        (page < s.first_page + s.pages).then_some(s)
    }

    /// The index entry of span `s`'s record.
    pub fn entry(&self, s: &Span) -> &IndexEntry {
        &self.layers[s.layer as usize].reader.trailer().index[s.record as usize]
    }

    /// The reader of layer `layer`.
    pub fn reader(&self, layer: u16) -> &FileReader {
        &self.layers[layer as usize].reader
    }

    /// Each layer's figures, top first.
    pub fn figures(&self) -> Vec<LayerFigures> {
        let mut used = vec![0u64; self.layers.len()];
        for s in &self.spans {
            used[s.layer as usize] += s.pages;
        }
        self.layers
            .iter()
            .zip(used)
            .map(|(l, pages_used)| LayerFigures {
                path: l.path.clone(),
                identity: l.identity().to_string(),
                file_bytes: l.reader.file_len(),
                totals: l.reader.trailer().totals,
                pages_used,
            })
            .collect()
    }

    /// Verify every layer as a file (structure, every crc, page coverage, trailer), top first;
    /// the links were checked by [`Chain::open`]. `progress` gets the layer (0-based) and its
    /// progress.
    pub fn verify(
        &mut self,
        progress: &mut dyn FnMut(usize, &ReadProgress),
    ) -> Result<ChainVerifyReport, FormatError> {
        let n = self.layers.len();
        let mut layers = Vec::with_capacity(n);
        for (k, l) in self.layers.iter_mut().enumerate() {
            let rep = l
                .reader
                .verify(&mut |p| progress(k, p))
                .map_err(|e| wrap(n, k, &l.path, e))?;
            layers.push(rep);
        }
        Ok(ChainVerifyReport {
            layers,
            guest_pages: self.header().total_pages(),
        })
    }

    /// Restore the chain's memory into `mem` eagerly (its layout must be the header's), on all
    /// cores: the flattened index is cut into units of about [`LOAD_UNIT_PAGES`] pages that
    /// workers claim in page order; each span's record is read from its layer (positioned
    /// reads, every check of [`SnapshotReader::read_record_at`], the last record decoded kept
    /// for the next span of it) and only the span's pages are written, so each guest page is
    /// written once, from the newest layer that holds it. Zero spans are skipped in fresh memory
    /// (it reads as zeros), else cleared. `progress` counts pages. On error the contents of
    /// `mem` are unspecified; the error names the layer (the first failing span in page order
    /// among those read).
    pub fn load_into(
        &mut self,
        mem: &GuestMemoryMmap,
        progress: &mut dyn FnMut(&ReadProgress),
    ) -> Result<(), FormatError> {
        let top = &self.layers[0].reader;
        check_layout(top.header(), mem)?;
        let mut fresh = true;
        for r in mem.iter() {
            let host =
                mem.get_host_address(r.start_addr())
                    .map_err(|e| FormatError::LayoutMismatch {
                        what: format!("region at {:#x}: {e}", r.start_addr().0),
                    })?;
            if crate::pagemap::may_have_data(host as usize, r.len() as usize) {
                fresh = false;
                break;
            }
        }
        let ps = u64::from(top.header().page_size);
        // Units: runs of spans of about LOAD_UNIT_PAGES pages.
        let mut units: Vec<(usize, usize)> = Vec::new();
        let mut at = 0;
        while at < self.spans.len() {
            let mut end = at;
            let mut pages = 0;
            while end < self.spans.len() && (end == at || pages < LOAD_UNIT_PAGES) {
                pages += self.spans[end].pages;
                end += 1;
            }
            units.push((at, end));
            at = end;
        }
        let total_pages: u64 = self.spans.iter().map(|s| s.pages).sum();
        let next = AtomicUsize::new(0);
        let done_pages = AtomicU64::new(0);
        let running = AtomicUsize::new(0);
        let failed: Mutex<Option<(usize, FormatError)>> = Mutex::new(None);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(units.len())
            .max(1);
        let this = &*self;
        let work = || {
            let mut buf = Vec::new();
            let mut cached: Option<(u16, u32)> = None;
            let mut zeros = Vec::new();
            loop {
                let u = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(a, b)) = units.get(u) else {
                    break;
                };
                if lock(&failed).as_ref().is_some_and(|(f, _)| *f < a) {
                    break;
                }
                for k in a..b {
                    let s = this.spans[k];
                    let r = this.load_span(mem, &s, fresh, ps, &mut buf, &mut cached, &mut zeros);
                    if let Err(e) = r {
                        let mut f = lock(&failed);
                        if f.as_ref().is_none_or(|(at, _)| k < *at) {
                            *f = Some((k, e));
                        }
                        break;
                    }
                    done_pages.fetch_add(s.pages, Ordering::Relaxed);
                }
            }
            running.fetch_sub(1, Ordering::SeqCst);
        };
        let mut prog = ReadProgress {
            total_pages,
            total_records: self.spans.len() as u64,
            ..ReadProgress::default()
        };
        std::thread::scope(|sc| {
            running.store(threads, Ordering::SeqCst);
            for _ in 0..threads {
                sc.spawn(work);
            }
            // This thread reports progress.
            while running.load(Ordering::SeqCst) > 0 {
                prog.pages = done_pages.load(Ordering::Relaxed);
                progress(&prog);
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        if let Some((_, e)) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        prog.pages = total_pages;
        prog.records = prog.total_records;
        progress(&prog);
        Ok(())
    }

    /// Write span `s`'s pages into `mem` (see [`Chain::load_into`]).
    #[allow(clippy::too_many_arguments)]
    fn load_span(
        &self,
        mem: &GuestMemoryMmap,
        s: &Span,
        fresh: bool,
        ps: u64,
        buf: &mut Vec<u8>,
        cached: &mut Option<(u16, u32)>,
        zeros: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let layer = &self.layers[s.layer as usize];
        let e = self.entry(s);
        let gpa = s.first_page * ps;
        let mem_err = |err: vm_memory::GuestMemoryError| FormatError::LayoutMismatch {
            what: format!("pages at {gpa:#x}: {err}"),
        };
        if e.kind == RecordKind::ZeroRun {
            if !fresh {
                crate::reader::parallel::clear_pages(mem, gpa, s.pages * ps, ps, zeros)
                    .map_err(mem_err)?;
            }
            return Ok(());
        }
        if *cached != Some((s.layer, s.record)) {
            *cached = None;
            layer
                .reader
                .read_record_at(s.record as usize, buf)
                .map_err(|err| wrap(self.layers.len(), s.layer as usize, &layer.path, err))?;
            *cached = Some((s.layer, s.record));
        }
        let off = ((s.first_page - e.first_page) * ps) as usize;
        let len = (s.pages * ps) as usize;
        mem.write_slice(&buf[off..off + len], GuestAddress(gpa))
            .map_err(mem_err)
    }

    /// Write the chain's content as one standalone file (no parent) to `sink`: the header of
    /// the file named (a new snapshot id, no parent reference; zstd if any layer is), its
    /// machine state, and for every span its pages: a record used whole is copied as stored
    /// (its crc checked, nothing decoded; runs of consecutive records of one layer in one
    /// read), a record cut by a newer layer is decoded (checked) and its pages of the span
    /// encoded again (zero runs are cut without reading). Records go in page order; a copied
    /// record keeps its hot flag.
    pub fn merge<S: SnapshotSink>(
        &self,
        sink: S,
        progress: &mut dyn FnMut(&MergeProgress),
    ) -> Result<MergeSummary, FormatError> {
        let t0 = Instant::now();
        let mut header = self.header().clone();
        header.parent = None;
        header.snapshot_id = random_snapshot_id();
        if let Some(z) = self
            .layers
            .iter()
            .map(|l| l.reader.header().compression)
            .find(|c| matches!(c, Compression::Zstd { .. }))
        {
            header.compression = z;
        }
        let ps = u64::from(header.page_size);
        let mut w = SnapshotWriter::new(sink, &header, self.machine_state())?;
        let mut p = MergeProgress {
            total_pages: header.total_pages(),
            ..MergeProgress::default()
        };
        let mut copied = (0u64, 0u64);
        let mut reencoded = 0u64;
        let mut buf = Vec::new();
        let mut decoded: Option<(u16, u32, Vec<u8>)> = None;
        let mut batch = EncodedBatch::default();
        let mut i = 0;
        let mut last_report = Instant::now();
        while i < self.spans.len() {
            let s = self.spans[i];
            let layer = &self.layers[s.layer as usize];
            let e = self.entry(&s);
            let whole = e.first_page == s.first_page && u64::from(e.page_count) == s.pages;
            if whole {
                // A run of spans that are whole records, consecutive in this layer's file.
                let index = &layer.reader.trailer().index;
                let mut j = i + 1;
                while j < self.spans.len() {
                    let n = &self.spans[j];
                    let prev = &self.spans[j - 1];
                    let ne = self.entry(n);
                    let next_off = index
                        .get(prev.record as usize + 1)
                        .map_or(u64::MAX, |x| x.offset);
                    let bytes = next_off.saturating_sub(e.offset);
                    if n.layer != s.layer
                        || n.record != prev.record + 1
                        || ne.first_page != n.first_page
                        || u64::from(ne.page_count) != n.pages
                        || bytes >= COPY_CHUNK
                    {
                        break;
                    }
                    j += 1;
                }
                let count = j - i;
                layer
                    .reader
                    .read_stored_records(s.record as usize, count, &mut buf)
                    .map_err(|e| wrap(self.layers.len(), s.layer as usize, &layer.path, e))?;
                batch.clear();
                let base = e.offset;
                for k in 0..count {
                    let ek = &index[s.record as usize + k];
                    let n = u64::from(ek.page_count);
                    batch.entries.push(IndexEntry {
                        offset: ek.offset - base,
                        ..*ek
                    });
                    let t = &mut batch.totals;
                    t.pages += n;
                    t.records += 1;
                    match ek.kind {
                        RecordKind::ZeroRun => t.zero_pages += n,
                        RecordKind::Data => t.data_pages += n,
                        RecordKind::Parent => t.parent_pages += n,
                    }
                    p.pages += n;
                }
                batch.totals.stored_bytes =
                    buf.len() as u64 - count as u64 * crate::format::RECORD_HEADER_LEN as u64;
                std::mem::swap(&mut batch.bytes, &mut buf);
                w.write_batch(&batch)?;
                std::mem::swap(&mut batch.bytes, &mut buf);
                copied.0 += count as u64;
                copied.1 += buf.len() as u64;
                i = j;
            } else {
                match e.kind {
                    RecordKind::ZeroRun => w.write_zero_run(s.first_page, s.pages)?,
                    _ => {
                        let hit =
                            matches!(&decoded, Some((l, r, _)) if *l == s.layer && *r == s.record);
                        if !hit {
                            let mut out = decoded.take().map(|d| d.2).unwrap_or_default();
                            layer
                                .reader
                                .read_record_at(s.record as usize, &mut out)
                                .map_err(|e| {
                                    wrap(self.layers.len(), s.layer as usize, &layer.path, e)
                                })?;
                            decoded = Some((s.layer, s.record, out));
                        }
                        let data = &decoded.as_ref().map_or(&[][..], |d| &d.2[..]);
                        let off = ((s.first_page - e.first_page) * ps) as usize;
                        w.write_pages(s.first_page, &data[off..off + (s.pages * ps) as usize])?;
                        reencoded += s.pages;
                    }
                }
                p.pages += s.pages;
                i += 1;
            }
            if last_report.elapsed().as_millis() >= 100 {
                p.bytes_written = w.bytes_written();
                progress(&p);
                last_report = Instant::now();
            }
        }
        let totals = w.totals();
        let identity = w.finish_identity()?;
        p.bytes_written = identity.file_len;
        progress(&p);
        Ok(MergeSummary {
            records_copied: copied.0,
            bytes_copied: copied.1,
            pages_reencoded: reencoded,
            totals,
            identity,
            file_bytes: identity.file_len,
            secs: t0.elapsed().as_secs_f64(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The header's memory layout is `mem`'s.
fn check_layout(h: &SnapshotHeader, mem: &GuestMemoryMmap) -> Result<(), FormatError> {
    let ours: Vec<(u64, u64)> = h.regions.iter().map(|r| (r.gpa, r.size)).collect();
    let theirs: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    if ours != theirs {
        return Err(FormatError::LayoutMismatch {
            what: format!("snapshot regions {ours:x?}, guest regions {theirs:x?}"),
        });
    }
    Ok(())
}

/// Layer `k`'s index (of `n` layers) sorted by first page, checked to cover the header's regions
/// exactly once (from the index alone).
fn sorted_index(l: &Layer, k: usize, n: usize) -> Result<Vec<u32>, FormatError> {
    let h = l.reader.header();
    let index = &l.reader.trailer().index;
    let mut order: Vec<u32> = (0..index.len() as u32).collect();
    order.sort_unstable_by_key(|&i| index[i as usize].first_page);
    let ps = u64::from(h.page_size);
    let mut regions = h
        .regions
        .iter()
        .map(|m| (m.gpa / ps, (m.gpa + m.size) / ps));
    let mut cur = regions.next();
    let cov = |what: &'static str, page: u64, record: Option<u64>| {
        wrap(n, k, &l.path, FormatError::Coverage { what, page, record })
    };
    for &i in &order {
        let e = &index[i as usize];
        let record = Some(u64::from(i));
        let Some((next, end)) = cur else {
            return Err(cov("outside guest memory", e.first_page, record));
        };
        if e.first_page < next {
            return Err(cov("appears twice", e.first_page, record));
        }
        if e.first_page > next {
            return Err(if next < end {
                cov("missing", next, record)
            } else {
                cov("outside guest memory", e.first_page, record)
            });
        }
        let after = e.first_page + u64::from(e.page_count);
        if after > end {
            return Err(cov("outside guest memory", end, record));
        }
        cur = if after == end {
            regions.next()
        } else {
            Some((after, end))
        };
    }
    if let Some((next, _)) = cur {
        return Err(cov("missing", next, None));
    }
    Ok(order)
}

/// The flattened index of `layers` (top first), see the module docs.
fn flatten(layers: &[Layer]) -> Result<Vec<Span>, FormatError> {
    let mut below: Vec<Span> = Vec::new();
    for k in (0..layers.len()).rev() {
        let order = sorted_index(&layers[k], k, layers.len())?;
        let index = &layers[k].reader.trailer().index;
        let mut out: Vec<Span> = Vec::with_capacity(order.len() + below.len() / 4);
        let mut c = 0;
        for &i in &order {
            let e = &index[i as usize];
            let (a, b) = (e.first_page, e.first_page + u64::from(e.page_count));
            if e.kind != RecordKind::Parent {
                push(
                    &mut out,
                    Span {
                        first_page: a,
                        pages: b - a,
                        layer: k as u16,
                        record: i,
                    },
                );
                continue;
            }
            // The spans below within [a, b), cut to it (coverage of both layers proved: they
            // tile the same pages).
            while c < below.len() && below[c].first_page + below[c].pages <= a {
                c += 1;
            }
            let mut cc = c;
            while cc < below.len() && below[cc].first_page < b {
                let s = below[cc];
                let from = s.first_page.max(a);
                let to = (s.first_page + s.pages).min(b);
                push(
                    &mut out,
                    Span {
                        first_page: from,
                        pages: to - from,
                        ..s
                    },
                );
                if s.first_page + s.pages > b {
                    break;
                }
                cc += 1;
            }
            c = cc;
        }
        below = out;
    }
    Ok(below)
}

/// Append `s`, joined to the last span when it continues the same record.
fn push(out: &mut Vec<Span>, s: Span) {
    if let Some(l) = out.last_mut() {
        if l.layer == s.layer && l.record == s.record && l.first_page + l.pages == s.first_page {
            l.pages += s.pages;
            return;
        }
    }
    out.push(s);
}
