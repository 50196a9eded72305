//! The crate's error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in vmm-core.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened (missing module, or no permission: run as root or join group kvm).
    #[error("cannot open /dev/kvm (is KVM available and accessible to this user?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed; `op` names it.
    #[error("KVM operation {op} failed")]
    Kvm {
        /// The ioctl or step that failed.
        op: &'static str,
        /// The errno returned by the kernel.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A per-vCPU KVM ioctl failed; `op` names it.
    #[error("KVM operation {op} failed on vCPU {vcpu}")]
    VcpuKvm {
        /// The ioctl that failed.
        op: &'static str,
        /// Index of the vCPU.
        vcpu: u8,
        /// The errno returned by the kernel.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The host does not offer a KVM capability the VMM needs.
    #[error("KVM capability {0} is not available on this host")]
    MissingCapability(&'static str),
    /// The VM configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// Creating or mapping guest memory failed.
    #[error("cannot create guest memory ({what})")]
    MemoryCreate {
        /// Which step failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Not enough free huge pages for a hugetlbfs backend.
    #[error(
        "hugetlbfs backend needs {needed} free 2 MiB huge pages but only {free} are free \
         (raise /proc/sys/vm/nr_hugepages)"
    )]
    NotEnoughHugepages {
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
    },
    /// vm-memory refused the regions.
    #[error("cannot build guest memory map: {0}")]
    MemoryMap(String),
    /// The supplied memory does not match the configured layout.
    #[error("guest memory does not match the configuration: {0}")]
    MemoryMismatch(String),
    /// Reading or writing guest memory failed.
    #[error("guest memory access failed")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// Assembling the built-in guest failed (a bug in the guest program generator).
    #[error("cannot assemble the built-in guest: {0}")]
    GuestAssembly(String),
    /// Installing the vCPU kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// Creating the serial interrupt eventfd failed.
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] io::Error),
    /// Spawning a vCPU thread failed.
    #[error("cannot spawn vCPU thread")]
    ThreadSpawn(#[source] io::Error),
    /// The operation requires all vCPUs to be paused.
    #[error("the VM is not paused")]
    NotPaused,
    /// The VM has ended (shutdown, reset or error); see `Vm::exit_status`.
    #[error("the VM is not running any more")]
    NotRunning,
    /// Not every vCPU parked within the deadline (a vCPU may be blocked in the kernel, e.g. in
    /// a serial write to a pipe nobody reads). The VM runs on.
    #[error(
        "vCPU(s) {stuck:?} of {total} did not stop within {} ms (blocked in the host?); the VM runs on",
        waited.as_millis()
    )]
    PauseTimeout {
        /// The vCPUs that did not park.
        stuck: Vec<u8>,
        /// vCPUs in the VM.
        total: usize,
        /// How long the pause waited.
        waited: std::time::Duration,
    },
    /// KVM accepted only part of an MSR list.
    #[error("vCPU {vcpu}: KVM {op} handled {done} of {total} MSRs (first failing index {first_failed:#x})")]
    MsrsPartial {
        /// KVM_GET_MSRS or KVM_SET_MSRS.
        op: &'static str,
        /// Index of the vCPU.
        vcpu: u8,
        /// MSRs handled.
        done: usize,
        /// MSRs requested.
        total: usize,
        /// Index of the first MSR not handled.
        first_failed: u32,
    },
    /// The host's XSAVE area is larger than `KVM_GET_XSAVE` can carry.
    #[error("XSAVE area of {0} bytes does not fit KVM_GET_XSAVE's 4096 bytes")]
    XsaveTooLarge(i32),
    /// A KVM structure did not fit its fixed-size container.
    #[error("{0}")]
    FamStruct(String),
    /// A saved machine state, or one of its components, has a version this build does not
    /// read (typically written by a newer build). Restore reports it as an unsupported file.
    #[error(
        "machine state{}: version {found} is not supported (this build reads {})",
        .component.map(|c| format!(" component {c}")).unwrap_or_else(|| " format".into()),
        versions(*.oldest, *.newest)
    )]
    StateVersion {
        /// The component, or `None` for the container's format version.
        component: Option<&'static str>,
        /// Version found.
        found: u32,
        /// Oldest version this build reads.
        oldest: u32,
        /// Newest version this build reads (the one it writes).
        newest: u32,
    },
    /// A saved machine state holds a component this build does not know (written by a newer
    /// build, which added a device).
    #[error("machine state: unknown component {name:?} (written by a newer build?)")]
    StateUnknownComponent {
        /// Its name, as found.
        name: String,
    },
    /// A saved machine state lacks a component it must have.
    #[error("machine state: required component {component} is missing")]
    StateMissingComponent {
        /// The component's name (or the alternatives).
        component: &'static str,
    },
    /// A saved machine state's container (magic, section count, section framing) is damaged.
    #[error("machine state: bad framing at byte {at}: {reason}")]
    StateFraming {
        /// Offset in the machine state.
        at: usize,
        /// What is wrong.
        reason: String,
    },
    /// A saved machine state is inconsistent with itself or with the memory given.
    #[error("machine state is inconsistent: {0}")]
    StateInvalid(String),
    /// A component of a saved machine state has the wrong size, count or id.
    #[error(
        "machine state: {component}{}: {reason}",
        .vcpu.map(|v| format!(" of vCPU state {v}")).unwrap_or_default()
    )]
    StateComponent {
        /// The component ("machine", "vcpu", "pit", ...) or its field ("sregs", "cpuid", "id",
        /// "pic_master", "slots", ...).
        component: &'static str,
        /// Position of the vCPU state it belongs to, for per-vCPU components.
        vcpu: Option<usize>,
        /// What is wrong.
        reason: String,
    },
    /// A kernel or initrd file could not be opened or read.
    #[error("cannot read the {what} file {}", path.display())]
    KernelFile {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel file is not an image vmm-core can boot (not a 64-bit ELF, not a bzImage with
    /// boot protocol >= 2.12 and a 64-bit entry).
    #[error("{} is not a bootable kernel: {reason}", path.display())]
    KernelFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// linux-loader failed to load the kernel image into guest memory.
    #[error("cannot load the kernel {}", path.display())]
    KernelLoad {
        /// The file.
        path: PathBuf,
        /// linux-loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Kernel, initrd and command line do not fit the VM (memory too small, command line too long).
    #[error("cannot lay out the kernel boot: {0}")]
    KernelPlacement(String),
    /// Queuing serial input failed (the UART's interrupt could not be raised).
    #[error("cannot queue serial input: {0}")]
    SerialInput(String),
    /// The operation only exists for the built-in guest, and this VM boots a kernel.
    #[error("this VM runs a kernel, not the built-in guest")]
    NotBuiltinGuest,
}

/// "1" or "1..=3".
fn versions(oldest: u32, newest: u32) -> String {
    if oldest == newest {
        format!("version {newest}")
    } else {
        format!("versions {oldest}..={newest}")
    }
}

impl VmError {
    /// True for a machine state this build cannot read because a newer build wrote it (a newer
    /// format or component version, an unknown component), as opposed to a damaged one.
    pub fn is_unsupported_state(&self) -> bool {
        matches!(
            self,
            VmError::StateVersion { .. } | VmError::StateUnknownComponent { .. }
        )
    }

    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        move |source| VmError::Kvm { op, source }
    }

    pub(crate) fn vcpu(op: &'static str, vcpu: u8) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        move |source| VmError::VcpuKvm { op, vcpu, source }
    }
}
