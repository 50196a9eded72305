//! The options of a live save.

use std::sync::Arc;
use std::thread;

use super::fault::DEFAULT_FAULT_NICE;
use super::Staging;
use crate::format::Compression;
use crate::hashes::PageHashes;

/// Options of [`live_save`](super::live_save).
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Record compression.
    pub compression: Compression,
    /// Limit of the scan in bytes copied per second (faulted blocks are never throttled).
    pub max_bandwidth: Option<u64>,
    /// Unit of copy and release in bytes, a multiple of 4 KiB (default 2 MiB: larger units
    /// release more per call, but a vCPU faulting inside a claimed unit waits for its whole
    /// copy; `docs/PERFORMANCE.md`, "Scan unit").
    pub block_size: usize,
    /// Compression threads (default: the number of cores minus one, at least one).
    pub workers: usize,
    /// Unit the fault thread copies and releases; `None` chooses from the memory's backing: the
    /// whole unit on hugetlbfs and mostly-THP memory, else 64 KiB (why: `docs/PERFORMANCE.md`,
    /// "Fault unit").
    pub fault_block_size: Option<usize>,
    /// Busy-poll the userfaultfd while a save runs (default: false: on small hosts a spinning
    /// thread takes the CPU the vCPUs need; `docs/PERFORMANCE.md`, "Fault thread").
    pub fault_spin: Option<bool>,
    /// After the save, collapse huge pages that 4 KiB releases split back into huge pages
    /// (MADV_COLLAPSE; default true).
    pub restore_huge_pages: bool,
    /// Cap of fault staging in bytes: staging grows on demand up to it while the guest writes,
    /// and only past it does a fault wait (for the workers to give a buffer back). `None`: half
    /// of the host's available memory, never more than guest RAM
    /// ([`default_max_staging`](super::default_max_staging)). Never more than guest RAM is used;
    /// the scan's fixed 32 MiB comes on top. 0 is refused.
    pub max_staging: Option<usize>,
    /// Nice value of the fault thread (default −10: a fault preempts the bulk threads and the
    /// vCPUs; applied where permitted, i.e. with CAP_SYS_NICE). `None` leaves it alone.
    pub fault_nice: Option<i32>,
    /// Nice value of the scanner and compression threads (default: unchanged). A positive value
    /// (`snapctl save --background` uses 10) leaves more CPU to a busy guest; the save takes
    /// longer, and memory the guest writes meanwhile still goes first through the fault thread.
    pub bulk_nice: Option<i32>,
    /// Staging buffers faulted in before the freeze ([`Staging::prepare`]); the save takes
    /// them. Without, every staging buffer is faulted in on first use, inside the copy.
    pub staging: Staging,
    /// Leave what the scanner saved write-protected instead of releasing it, and release only
    /// what the guest writes (for write tracking that goes on after the save: the units still
    /// protected at the end are exactly those nobody wrote since the freeze). The summary's
    /// [`released`](super::SaveSummary::released) lists the others. On success the caller owns
    /// the protection and must serve the faults that follow (e.g. with
    /// `wp_tracker::DirtyTracker::resume`); on any error everything is released, as always.
    pub keep_protected: bool,
    /// An incremental save: store only the sub-blocks touching these host ranges (written since
    /// the parent's freeze) and Parent runs for all the rest. Needs `keep_protected` and a
    /// header with a parent reference. `None`: store everything.
    pub increment: Option<Vec<wp_tracker::HostRange>>,
    /// A content hash per guest page ([`PageHashes`]): the compression workers hash every page
    /// the save stores into it (zero runs as zero pages; pages left to the parent keep theirs).
    /// With `increment` as well, a page of a written sub-block whose hash equals the table's
    /// (its content is the parent's: the table must describe the parent's freeze instant) is
    /// not stored but a Parent run; unknown pages are stored. The table must cover the
    /// memory's regions (else `InvalidOptions`). On error it is left partly updated: the
    /// caller must [`forget`](PageHashes::forget) it or stop trusting it.
    pub page_hashes: Option<Arc<PageHashes>>,
    /// Test-only failure injection.
    #[doc(hidden)]
    pub inject_failure: Option<InjectPoint>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            compression: Compression::None,
            max_bandwidth: None,
            block_size: 2 << 20,
            // One core is left to the vCPUs and the fault thread (`docs/PERFORMANCE.md`,
            // "Compression workers").
            workers: thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1).max(1)),
            fault_block_size: None,
            fault_spin: None,
            restore_huge_pages: true,
            max_staging: None,
            staging: Staging::default(),
            fault_nice: Some(DEFAULT_FAULT_NICE),
            bulk_nice: None,
            keep_protected: false,
            increment: None,
            page_hashes: None,
            inject_failure: None,
        }
    }
}

/// Where a test makes the saver fail.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectPoint {
    /// The scanner panics after this many blocks.
    ScannerPanic {
        /// Blocks scanned first.
        after_blocks: usize,
    },
    /// The fault thread panics when it serves its first fault.
    FaultPanic,
    /// A compression worker panics on its first block.
    WorkerPanic,
    /// The writer fails with an I/O error after this many batches.
    WriteError {
        /// Batches written first.
        after_batches: u64,
    },
}
