//! KVM guest execution: guest memory, vCPUs, serial, the built-in guest, pause/resume, machine state.
//!
//! vmm-core runs a small KVM VM whose purpose is live memory snapshots: it creates guest memory
//! ([`create_guest_memory`], [`host_ranges`] for userfaultfd registration), boots the built-in guest
//! ([`Vm::boot`]) on N vCPU threads with an in-kernel irqchip, PIT and a 16550 console, pauses and
//! resumes all vCPUs ([`Vm::pause`]), captures the complete machine state ([`Vm::capture_state`])
//! and rebuilds a VM from it around existing memory ([`Vm::restore`]). The [`oracle`] checks that
//! memory holds exactly what the built-in guest's deterministic write sequence says.
//!
//! Instead of the built-in guest a VM can boot a kernel ([`VmConfig::kernel`], [`KernelConfig`]):
//! an ELF or bzImage with the Linux x86 64-bit boot protocol ([`kernel`]), with an MP table for
//! its vCPUs and COM1 in both directions ([`Vm::send_serial_input`], [`Vm::serial_input`]).
//! Kernel VMs follow a lenient device policy (see [`vcpu`]); their snapshots work exactly like
//! the built-in guest's, minus the guest-specific progress, self-check and oracle.
//!
//! Guest addresses are all in [`layout`]. Under PVM (KVM without VMX/SVM), ring-0 guest code is
//! emulated instruction by instruction, so the built-in guest runs its hot loops in ring 3.

pub mod arch;
pub mod devices;
mod error;
pub mod guest;
pub mod kernel;
pub mod layout;
pub mod memory;
pub mod oracle;
pub mod serial;
pub mod state;
pub mod vcpu;
mod vm;

pub use error::VmError;
pub use guest::{GuestParams, GuestProgress, SelfCheckVerdict, VcpuVerdict, WriteRate};
pub use kernel::{KernelConfig, KernelFormat, LoadedKernel};
pub use memory::{create_guest_memory, host_ranges, MemBackend};
pub use oracle::{OracleMismatch, OracleReport};
pub use serial::SharedBuffer;
pub use state::MachineState;
pub use vcpu::{CpuReport, UnhandledAccesses, VmExitStatus};
pub use vm::{FreezeError, FreezeTimes, Frozen, PreparedVm, SerialInput, Vm};

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
    /// Built-in guest parameters (ignored when `kernel` is set).
    pub guest: GuestParams,
    /// A kernel to boot instead of the built-in guest. Absent in configurations and machine
    /// states written before kernel boot existed, which keeps them readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelConfig>,
}

impl VmConfig {
    /// True if this VM runs the built-in guest (no kernel configured).
    pub fn is_builtin_guest(&self) -> bool {
        self.kernel.is_none()
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_bytes: 512 << 20,
            vcpus: 2,
            backend: MemBackend::Anon,
            guest: GuestParams::default(),
            kernel: None,
        }
    }
}

/// Paths in configurations and machine states, kept exactly: as a string when they are UTF-8,
/// else as their bytes (Linux paths are bytes; a save must never fail on a path's spelling).
pub(crate) mod exact_path {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Bytes(Vec<u8>),
    }

    fn repr(p: &Path) -> Repr {
        match p.to_str() {
            Some(s) => Repr::Text(s.to_owned()),
            None => Repr::Bytes(p.as_os_str().as_bytes().to_vec()),
        }
    }

    fn path(r: Repr) -> PathBuf {
        match r {
            Repr::Text(s) => PathBuf::from(s),
            Repr::Bytes(b) => PathBuf::from(OsString::from_vec(b)),
        }
    }

    pub fn serialize<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        repr(p).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Repr::deserialize(d).map(path)
    }

    /// The same for optional paths.
    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
            p.as_deref().map(repr).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
            Ok(Option::<Repr>::deserialize(d)?.map(path))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn configs_without_a_kernel_field_still_parse() {
        let mut v = serde_json::to_value(VmConfig::default()).unwrap();
        assert!(
            v.get("kernel").is_none(),
            "no kernel, no field: old readers stay happy"
        );
        v.as_object_mut().unwrap().remove("kernel");
        let c: VmConfig = serde_json::from_value(v).unwrap();
        assert_eq!(c, VmConfig::default());
        let k = VmConfig {
            kernel: Some(KernelConfig {
                kernel: "/k".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
            }),
            ..Default::default()
        };
        let back: VmConfig = serde_json::from_slice(&serde_json::to_vec(&k).unwrap()).unwrap();
        assert_eq!(back, k);
        assert!(!back.is_builtin_guest());
    }

    #[test]
    fn vm_is_send_and_sync() {
        assert_send_sync::<Vm>();
    }
}

#[cfg(test)]
mod path_tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;

    #[test]
    fn kernel_paths_survive_serialisation_exactly() {
        for (kernel, initrd) in [
            (&b"/boot/vmlinuz"[..], Some(&b"/boot/initrd.img"[..])),
            (&b"/k/\xff\xfe-not-utf8"[..], Some(&b"/k/\x80rd"[..])),
            (&b"/k/plain"[..], None),
        ] {
            let path = |b: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(b));
            let cfg = VmConfig {
                kernel: Some(KernelConfig {
                    kernel: path(kernel),
                    initrd: initrd.map(path),
                    cmdline: "console=ttyS0".into(),
                }),
                ..VmConfig::default()
            };
            let bytes = serde_json::to_vec(&cfg).expect("a config always serialises");
            let back: VmConfig = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(back, cfg);
        }
        // Configurations written before, with plain string paths and no initrd field, still read.
        let old = r#"{"mem_bytes":67108864,"vcpus":1,"backend":"Anon","guest":{"write_rate":"Idle","working_set_pages":null,"seed":1},"kernel":{"kernel":"/k","cmdline":""}}"#;
        let cfg: VmConfig = serde_json::from_str(old).unwrap();
        assert_eq!(cfg.kernel.unwrap().kernel, PathBuf::from("/k"));
    }
}
