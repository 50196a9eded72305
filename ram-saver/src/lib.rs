//! What to save when: linear scan, fault priority, zero pages, throttling, and the snapshot file format.
//!
//! - [`format`](mod@format): the on-disk layout (documented there, versioned by [`FORMAT_VERSION`]).
//! - [`SnapshotWriter`] with an [`AtomicFileSink`] or [`StreamSink`]; [`SnapshotReader`] to
//!   open, iterate, [`verify`](SnapshotReader::verify) and [`load_into`](SnapshotReader::load_into).
//! - [`Chain`]: an incremental snapshot and its parents read as one (flattened index,
//!   [`verify`](Chain::verify), [`load_into`](Chain::load_into), [`merge`](Chain::merge)).
//! - [`PageHashes`]: a content hash of every guest page as of the last save, so that an
//!   incremental save stores only the pages that changed.
//! - [`live_save`]: saves the RAM of a running guest whose memory was write-protected at the
//!   freeze instant, racing a linear scan against write faults, one block at a time.
#![forbid(unsafe_code)]

mod chain;
mod direct_io;
mod error;
pub mod format;
mod hashes;
pub mod pagemap;
mod reader;
mod save;
mod writer;

pub use chain::{
    Chain, ChainVerifyReport, FileReader, Layer, LayerFigures, MergeProgress, MergeSummary, Span,
    MAX_CHAIN_LAYERS,
};
pub use format::{
    Compression, ErrorKind, FormatError, Identity, IndexEntry, MemRegion, ParentRef, RecordKind,
    SnapshotHeader, Totals, Trailer, FORMAT_VERSION, OLDEST_FORMAT_VERSION, PIECE_RAW,
};
pub use hashes::{page_hash, zero_hash, PageHashes, HASH_PAGE};
pub use reader::{HotTotals, Piece, ReadProgress, Record, Records, SnapshotReader, VerifyReport};
#[doc(hidden)]
pub use save::InjectPoint;
pub use save::{
    default_max_staging, host_available_memory, host_total_memory, live_save, FaultPhases,
    SaveError, SaveOptions, SaveProgress, SaveSummary, Staging, StagingFigures,
};
pub use writer::{
    AtomicFileSink, EncodedBatch, RecordEncoder, SnapshotSink, SnapshotWriter, StreamSink,
};
