//! A snapshot back into a VM: open and check the file (footer, trailer, header, machine state)
//! and, for an incremental snapshot, every parent it names (a [`Chain`]), decode the machine
//! state exactly, fill fresh guest memory from the records (layer by layer from the base), build
//! the VM. A bad file or chain is refused before any vCPU exists.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::chain;
use ram_saver::{Chain, FormatError, Identity, ParentRef, ReadProgress, SnapshotReader};
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

/// The snapshot a VM was restored from: its memory is exactly this file's content (for an
/// incremental snapshot, its chain's), as of its freeze instant. An incremental save of the
/// restored VM names this file as its parent ([`RestoredFrom::parent_ref_for`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoredFrom {
    /// The file named to restore (the top of its chain).
    pub path: PathBuf,
    /// Its identity.
    pub identity: Identity,
    /// Layers of its chain (1: a standalone file).
    pub layers: usize,
}

impl RestoredFrom {
    /// What `chain` restores.
    pub fn of(chain: &Chain) -> Self {
        RestoredFrom {
            path: chain.layers()[0].path.clone(),
            identity: chain.identity(),
            layers: chain.layers().len(),
        }
    }

    /// The parent reference a child written at `child_path` stores for this file.
    pub fn parent_ref_for(&self, child_path: &Path) -> ParentRef {
        ParentRef::new(self.identity, &self.path, child_path)
    }
}

/// Opens `file` and the parents it names, checks them, and loads the chain's memory into fresh
/// guest memory (on `backend`, or the one recorded): the machine state and the memory, as of
/// the freeze instant of `file`.
pub fn load(
    file: &Path,
    backend: Option<MemBackend>,
    progress: &mut dyn FnMut(&ReadProgress),
) -> Result<(MachineState, GuestMemoryMmap), RestoreError> {
    load_chain(file, backend, progress).map(|(state, mem, _)| (state, mem))
}

/// [`load`], also saying what was loaded.
pub fn load_chain(
    file: &Path,
    backend: Option<MemBackend>,
    progress: &mut dyn FnMut(&ReadProgress),
) -> Result<(MachineState, GuestMemoryMmap, RestoredFrom), RestoreError> {
    let mut c = Chain::open(file)?;
    let state = machine_state(c.top())?;
    let cfg = state.config();
    let mem = vmm_core::create_guest_memory(cfg.mem_bytes, backend.unwrap_or(cfg.backend))
        .map_err(RestoreError::Memory)?;
    c.load_into(&mem, progress)?;
    Ok((state, mem, RestoredFrom::of(&c)))
}

/// Restores `file` (and the parents it names) into a new VM (running, or parked with
/// `params.paused`).
pub fn restore(
    file: &Path,
    params: RestoreParams,
    progress: &mut dyn FnMut(&ReadProgress),
) -> Result<Vm, RestoreError> {
    restore_chain(file, params, progress).map(|(vm, _)| vm)
}

/// [`restore`], also saying what the VM was restored from (the identity an incremental save of
/// it names as its parent).
pub fn restore_chain(
    file: &Path,
    params: RestoreParams,
    progress: &mut dyn FnMut(&ReadProgress),
) -> Result<(Vm, RestoredFrom), RestoreError> {
    let (state, mem, from) = load_chain(file, params.backend, progress)?;
    let vm = Vm::restore(&state, mem, params.serial, params.paused).map_err(RestoreError::Vm)?;
    Ok((vm, from))
}
