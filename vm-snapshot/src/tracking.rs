//! Knowing, for a VM's whole life, which guest memory was written since its last save, so that a
//! save can name that save as its parent and store only what changed (`docs/INCREMENTAL.md`).
//!
//! A [`WriteRecord`] belongs to one VMM process. After every successful save of the VM (through
//! [`save_tracked`]) it tracks writes with a [`DirtyTracker`] on the same userfaultfd context the
//! save used, starting at that save's freeze instant:
//! - The live save keeps what its scanner saved write-protected and releases only what the guest
//!   writes ([`SaveOptions::keep_protected`](ram_saver::SaveOptions::keep_protected)); the units
//!   it released are the tracker's first dirty set, everything else is still protected. The
//!   save's fault thread stops reading the userfaultfd before the tracker's handler starts
//!   (faults in between wait in the queue): one reader at any time.
//! - A save that names a parent whose [`Identity`] (the file's content, not its path) is that
//!   last save suspends the tracker inside the freeze: its harvest protects again
//!   what was written, so all RAM is protected (the live save's precondition), and the harvest is
//!   the increment: the live save stores those units and Parent runs for the rest.
//! - Any other save with a running tracker suspends it the same way and stores everything.
//! - The record keeps a 128-bit hash of every guest page as of the last save ([`PageHashes`]):
//!   every save hashes the pages it stores into it (in its compression workers), and an
//!   incremental save stores only the pages of written units whose hash changed. After an eager
//!   restore it is made from the loaded pages ([`WriteRecord::start_at_restore`]). A save that
//!   fails after the freeze forgets it (every page unknown: stored, never inherited), as does a
//!   save asked not to hash (`SaveParams::no_page_hashes`).
//!
//! Whenever the record cannot be trusted it is *broken*, and a save naming a parent stores all
//! memory and says why: the tracker's handler failed, a save failed after the tracker was
//! suspended (the live save's abort released all memory), or tracking could not go on after a
//! save. A VMM that never saved has no record. A failed save never leaves memory protected with
//! nobody serving its faults: the live save's abort, the freeze's guard or the tracker's drop
//! release everything.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ram_saver::{Identity, PageHashes, ParentRef, SaveOptions, SaveProgress, SnapshotSink};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;
use vmm_core::Vm;
use wp_tracker::{DirtyTracker, Precision, WpTracker};

use crate::save::{header_of, FreezeRun, SaveError, Saved};

/// What a write records and releases: the whole 2 MiB unit where a huge page maps it (the huge
/// page stays huge), else the 64 KiB block around the written page (the live save's fault block
/// on such memory): a guest that writes all of its memory after a save faults once per 64 KiB,
/// not once per 4 KiB page (`docs/INCREMENTAL.md`, "Incremental saves, measured").
const PRECISION: Precision = Precision::BackingBlock(64 << 10);

/// The file of the last save (or restore) that tracking started at.
#[derive(Debug)]
struct Since {
    path: PathBuf,
    identity: Identity,
}

#[derive(Debug)]
enum State {
    /// No save since the VMM started.
    Off,
    /// Writes since `since`'s freeze are tracked (`since` is None after a stream save, which
    /// cannot be named as a parent).
    Tracking {
        tracker: DirtyTracker,
        since: Option<Since>,
    },
    /// Tracking stopped: why.
    Broken(String),
}

/// A VM's record of guest writes since its last save. See the module docs.
#[derive(Debug)]
pub struct WriteRecord {
    state: State,
    /// A hash of every guest page as of the last save's freeze instant (or the restored
    /// content), made with the first save; pages not known are unknown in it.
    hashes: Option<Arc<PageHashes>>,
}

impl Default for WriteRecord {
    fn default() -> Self {
        Self::new()
    }
}

/// The tracking state, for `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrackingStatus {
    /// `off` (no save yet), `tracking`, or `broken` (the next save naming a parent saves all
    /// memory).
    pub state: String,
    /// Bytes written since the last save: what the next incremental save would store at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
    /// The file writes are tracked since (the parent a save may name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Why tracking is off or broken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Write faults the tracker served since the last save.
    #[serde(default)]
    pub faults: u64,
}

/// What a tracked save adds to its report.
#[derive(Debug)]
pub(crate) struct TrackedSave {
    pub(crate) saved: Saved,
    /// The parent of an incremental save.
    pub(crate) parent: Option<String>,
    /// Why a save that named a parent stored everything.
    pub(crate) full_reason: Option<String>,
    /// Tracking goes on after the save.
    pub(crate) tracking: bool,
}

impl WriteRecord {
    /// No record yet (a VMM that has not saved).
    pub fn new() -> Self {
        WriteRecord {
            state: State::Off,
            hashes: None,
        }
    }

    /// The tracking state and the bytes written since the last save.
    pub fn status(&self) -> TrackingStatus {
        match &self.state {
            State::Off => TrackingStatus {
                state: "off".into(),
                dirty_bytes: None,
                since: None,
                reason: Some("no save of this VM yet".into()),
                faults: 0,
            },
            State::Tracking { tracker, since } => TrackingStatus {
                state: "tracking".into(),
                dirty_bytes: Some(tracker.dirty_bytes() as u64),
                since: since.as_ref().map(|s| s.path.display().to_string()),
                reason: None,
                faults: tracker.faults(),
            },
            State::Broken(why) => TrackingStatus {
                state: "broken".into(),
                dirty_bytes: None,
                since: None,
                reason: Some(why.clone()),
                faults: 0,
            },
        }
    }

    /// True if the record of writes since the last save is unbroken.
    pub fn is_tracking(&self) -> bool {
        matches!(self.state, State::Tracking { .. })
    }

    /// Start tracking on memory `mem` whose content is the snapshot `file` (just restored, vCPUs
    /// not yet running): every page is hashed (on all cores), everything is protected and the
    /// restored file is the last save, so a save may name it as parent and store only the pages
    /// that change. On error nothing stays protected and the record says why; a hashing failure
    /// only leaves the pages unknown (the first incremental save stores whole written units).
    pub fn start_at_restore(
        &mut self,
        wp: Arc<WpTracker>,
        mem: &GuestMemoryMmap,
        file: &Path,
    ) -> Result<(), String> {
        let table = Arc::new(PageHashes::for_memory(mem));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if table.fill_from(mem, threads).is_err() {
            // Unknown pages are stored whole by the first incremental save: larger, never wrong.
            table.forget();
        }
        self.hashes = Some(table);
        let identity = identity_of(file);
        match DirtyTracker::start(wp, PRECISION) {
            Ok(tracker) => {
                let since = identity.ok().map(|identity| Since {
                    path: file.to_path_buf(),
                    identity,
                });
                self.state = State::Tracking { tracker, since };
                Ok(())
            }
            Err(e) => {
                let why = format!("cannot track writes: {e}");
                self.state = State::Broken(why.clone());
                Err(why)
            }
        }
    }

    /// Save with `run` into `sink` (the file at `path`, or a stream if `path` is None), naming
    /// `parent` if given; tracking goes on after a successful save. With `hash_pages` the save
    /// hashes what it stores and an incremental one stores only pages whose hash changed;
    /// without, the page hashes are forgotten. See the module docs.
    pub(crate) fn save<S: SnapshotSink>(
        &mut self,
        run: &FreezeRun<'_>,
        wp: &Arc<WpTracker>,
        sink: S,
        path: Option<&Path>,
        parent: Option<&str>,
        hash_pages: bool,
    ) -> Result<TrackedSave, SaveError> {
        let mut header = header_of(run.vm)?;
        let mut full_reason = None;
        let mut incremental = false;
        if let Some(p) = parent {
            let id = identity_of(Path::new(p)).map_err(|e| {
                SaveError::Params(format!(
                    "cannot use {p} as the parent: {e}; name this VM's last snapshot, or save \
                     without --parent"
                ))
            })?;
            let why = match &self.state {
                State::Tracking { since: Some(s), .. } if s.identity == id => None,
                State::Tracking { since: Some(s), .. } => Some(format!(
                    "{p} is not this VM's last save ({})",
                    s.path.display()
                )),
                State::Tracking { since: None, .. } => {
                    Some("this VM's last save was a stream, not a file".to_string())
                }
                State::Off => {
                    Some("this VM has not been saved or restored since it started".into())
                }
                State::Broken(why) => Some(why.clone()),
            };
            match why {
                None => {
                    let child = path.ok_or_else(|| {
                        SaveError::Params("an incremental save needs a file target".into())
                    })?;
                    header.parent = Some(ParentRef::new(id, Path::new(p), child));
                    incremental = true;
                }
                Some(why) => {
                    full_reason = Some(format!(
                        "no record of writes since {p}'s freeze: saved all memory ({why})"
                    ))
                }
            }
        }
        let (mut running, old_since) = match std::mem::replace(&mut self.state, State::Off) {
            State::Tracking { tracker, since } => (Some(tracker), since),
            other => {
                self.state = other;
                (None, None)
            }
        };
        let was_tracking = running.is_some();
        let hashes = self.hashes_for(run.vm.memory());
        if !hash_pages {
            hashes.forget();
        }
        let opts = SaveOptions {
            page_hashes: hash_pages.then(|| hashes.clone()),
            ..run.opts.clone()
        };
        let run = FreezeRun {
            opts: &opts,
            ..*run
        };
        let res = run.save(sink, header, &mut running, incremental);
        let saved = match res {
            Ok((saved, _)) => saved,
            Err(e) => {
                if running.is_none() {
                    // The live save may have hashed part of this save's pages into the table:
                    // it no longer describes the last good save.
                    hashes.forget();
                }
                if let Some(tracker) = running {
                    // Never suspended (the freeze failed first): tracking is intact.
                    self.state = State::Tracking {
                        tracker,
                        since: old_since,
                    };
                } else if was_tracking {
                    self.state = State::Broken(
                        "a save failed after tracking was handed to it (all memory was \
                         released)"
                            .into(),
                    );
                }
                return Err(e);
            }
        };
        let since = path.map(|p| Since {
            path: p.to_path_buf(),
            identity: saved.summary.identity,
        });
        let tracking = match DirtyTracker::resume(wp.clone(), PRECISION, &saved.summary.released) {
            Ok(tracker) => {
                self.state = State::Tracking { tracker, since };
                true
            }
            Err(e) => {
                // `resume` released all memory.
                self.state = State::Broken(format!("cannot track writes after a save: {e}"));
                false
            }
        };
        Ok(TrackedSave {
            saved,
            parent: incremental.then(|| parent.unwrap_or_default().to_string()),
            full_reason,
            tracking,
        })
    }
}

impl WriteRecord {
    /// The page-hash table for `mem`, made on first use (every page unknown).
    fn hashes_for(&mut self, mem: &GuestMemoryMmap) -> Arc<PageHashes> {
        match &self.hashes {
            Some(h) => h.clone(),
            None => {
                let h = Arc::new(PageHashes::for_memory(mem));
                self.hashes = Some(h.clone());
                h
            }
        }
    }
}

/// The identity of the snapshot file at `path`.
fn identity_of(path: &Path) -> Result<Identity, String> {
    let r = ram_saver::SnapshotReader::open(path).map_err(|e| crate::chain(&e))?;
    Ok(r.identity())
}

/// A save as [`crate::save`] with the VM's write record: see [`WriteRecord`].
pub fn save_tracked(
    vm: &Arc<Vm>,
    tracker: &Arc<WpTracker>,
    record: &mut WriteRecord,
    params: &crate::SaveParams,
    guest_moving: &[bool],
    cancel: &AtomicBool,
    progress: &(dyn Fn(&SaveProgress) + Sync),
) -> Result<crate::SaveReport, SaveError> {
    crate::save::save_with_record(
        vm,
        tracker,
        Some(record),
        params,
        guest_moving,
        cancel,
        progress,
    )
}
