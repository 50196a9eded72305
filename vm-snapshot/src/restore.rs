//! A snapshot back into a VM: open and check the file (footer, trailer, header, machine state),
//! decode the machine state exactly, fill fresh guest memory from the records, build the VM. A bad
//! file is refused before any vCPU exists.

use std::io::Write;
use std::path::Path;

use crate::chain;
use ram_saver::{FormatError, ReadProgress, SnapshotReader};
use vm_memory::GuestMemoryMmap;
use vmm_core::{MachineState, MemBackend, Vm, VmError};

/// Why a restore (or a load) failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The file is bad (damaged, incomplete, not a snapshot, unsupported), or its machine state
    /// does not decode exactly: refused before any vCPU runs.
    #[error(transparent)]
    File(#[from] FormatError),
    /// Guest memory could not be created (e.g. hugetlbfs pages not reserved).
    #[error("creating guest memory")]
    Memory(#[source] VmError),
    /// The VM could not be built from a good file.
    #[error("restoring the VM")]
    Vm(#[source] VmError),
}

/// How to restore.
pub struct RestoreParams {
    /// Build the VM with its vCPUs parked (`Vm::resume` runs them).
    pub paused: bool,
    /// Guest memory backing; `None` takes the one recorded in the snapshot.
    pub backend: Option<MemBackend>,
    /// Where the guest's serial console goes.
    pub serial: Box<dyn Write + Send>,
}

impl std::fmt::Debug for RestoreParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreParams")
            .field("paused", &self.paused)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

/// The machine state of an opened snapshot, decoded exactly. Its crc only proves it is the state
/// that was written: one that does not decode (or disagrees with the header) is a damaged file.
pub fn machine_state<R: std::io::Read + std::io::Seek>(
    r: &SnapshotReader<R>,
) -> Result<MachineState, FormatError> {
    let at = r.machine_state_offset();
    let corrupt = |what: String| FormatError::Corrupt {
        what,
        record: None,
        offset: at,
    };
    let state = MachineState::from_bytes(r.machine_state()).map_err(|e| match e {
        e if e.is_unsupported_state() => FormatError::Unsupported {
            what: e.to_string(),
        },
        _ => corrupt(chain(&e)),
    })?;
    if r.header().vcpu_count != u32::from(state.config().vcpus) {
        return Err(corrupt(format!(
            "machine state: {} vCPUs, the header says {}",
            state.config().vcpus,
            r.header().vcpu_count
        )));
    }
    Ok(state)
}

/// Opens `file`, checks it, and loads it into fresh guest memory (on `backend`, or the one
/// recorded): the machine state and the memory, as of the freeze instant.
pub fn load(
    file: &Path,
    backend: Option<MemBackend>,
    progress: &mut dyn FnMut(&ReadProgress),
) -> Result<(MachineState, GuestMemoryMmap), RestoreError> {
    let mut r = SnapshotReader::open(file)?;
    let state = machine_state(&r)?;
    let cfg = state.config();
    let mem = vmm_core::create_guest_memory(cfg.mem_bytes, backend.unwrap_or(cfg.backend))
        .map_err(RestoreError::Memory)?;
    r.load_into(&mem, progress)?;
    Ok((state, mem))
}

/// Restores `file` into a new VM (running, or parked with `params.paused`).
pub fn restore(
    file: &Path,
    params: RestoreParams,
    progress: &mut dyn FnMut(&ReadProgress),
) -> Result<Vm, RestoreError> {
    let (state, mem) = load(file, params.backend, progress)?;
    Vm::restore(&state, mem, params.serial, params.paused).map_err(RestoreError::Vm)
}
