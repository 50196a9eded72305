//! KVM guest execution: guest memory, vCPUs, serial, the built-in guest, pause/resume, machine state.
//!
//! vmm-core runs a small KVM VM whose purpose is live memory snapshots: it creates guest memory
//! ([`create_guest_memory`], [`host_ranges`] for userfaultfd registration), boots the built-in guest
//! ([`Vm::boot`]) on N vCPU threads with an in-kernel irqchip, PIT and a 16550 console, pauses and
//! resumes all vCPUs ([`Vm::pause`]), captures the complete machine state ([`Vm::capture_state`])
//! and rebuilds a VM from it around existing memory ([`Vm::restore`]). The [`oracle`] checks that
//! memory holds exactly what the built-in guest's deterministic write sequence says.
//!
//! Guest addresses are all in [`layout`]. Under PVM (KVM without VMX/SVM), ring-0 guest code is
//! emulated instruction by instruction, so the built-in guest runs its hot loops in ring 3.

pub mod arch;
mod error;
pub mod guest;
pub mod layout;
pub mod memory;
pub mod oracle;
pub mod serial;
pub mod state;
pub mod vcpu;
mod vm;

pub use error::VmError;
pub use guest::{GuestParams, GuestProgress, SelfCheckVerdict, VcpuVerdict, WriteRate};
pub use memory::{create_guest_memory, host_ranges, MemBackend};
pub use oracle::{OracleMismatch, OracleReport};
pub use serial::SharedBuffer;
pub use state::MachineState;
pub use vcpu::{CpuReport, VmExitStatus};
pub use vm::Vm;

use serde::{Deserialize, Serialize};

/// What VM to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest RAM in bytes (multiple of 2 MiB).
    pub mem_bytes: u64,
    /// Number of vCPUs (1..=32).
    pub vcpus: u8,
    /// Where guest RAM comes from.
    pub backend: MemBackend,
    /// Built-in guest parameters.
    pub guest: GuestParams,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_bytes: 512 << 20,
            vcpus: 2,
            backend: MemBackend::Anon,
            guest: GuestParams::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn vm_is_send_and_sync() {
        assert_send_sync::<Vm>();
    }
}
