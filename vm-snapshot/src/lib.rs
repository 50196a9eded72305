//! The snapshot protocol, between a VMM ([`vmm_core::Vm`]) and the save engine ([`ram_saver`]):
//! how a running VM is saved and how a snapshot becomes a running VM again. Library code, so that
//! the CLI, the tests and any other front end run the same protocol.
//!
//! - Save ([`save`] for a client's [`SaveParams`], [`save_into`] for any sink): prepare everything
//!   that can fail, then the freeze instant ([`Vm::freeze`](vmm_core::Vm::freeze): pause, capture
//!   machine state, write-protect all RAM, resume, atomically), then the live save. From the
//!   instant RAM is protected a guard, and then ram-saver, releases it whatever fails.
//! - Restore ([`restore`]): open and check the file, decode the machine state, fill fresh guest
//!   memory, build the VM; a bad file is refused before any vCPU runs.
//! - Lazy restore ([`restore_lazy`]): the same checks, then the vCPUs run at once and memory is
//!   filled on demand (userfaultfd MISSING mode) and by a paced background fill.
//! - Live migration ([`migrate`]): lazy restore whose page source is a connection to the
//!   frozen source VM, authenticated by a shared secret.
#![forbid(unsafe_code)]

mod fill_end;
mod lazy;
pub mod migrate;
mod monitor;
mod params;
mod restore;
mod save;
mod tracking;

pub use fill_end::CollapseHold;
pub use lazy::{restore_lazy, LazyError, LazyFailure, LazyRestore, LazyStatus};
pub use monitor::GuestDuringSave;
pub use params::{
    PrepareStaging, SaveParams, DEFAULT_ZSTD_LEVEL, MAX_TUNING_BLOCK, MIN_BANDWIDTH,
    MIN_MAX_STAGING,
};
pub use restore::{
    load, load_chain, machine_state, restore, restore_chain, RestoreError, RestoreParams,
    RestoredFrom,
};
pub use save::{save, save_into, FreezeMs, SaveError, SaveReport, Saved, STREAM_OPEN_TIMEOUT};
pub use tracking::{save_tracked, TrackingStatus, WriteRecord};

/// An error and its sources, once each.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
