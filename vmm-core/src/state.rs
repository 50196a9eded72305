//! Machine state captured at a pause: vCPUs, irqchip, PIT, kvmclock, serial and the guest's
//! parameters. A plain serde value (no pointers, no fds).
//!
//! # vCPU save order (and why)
//! 1. MP_STATE first: KVM_GET_MP_STATE processes pending INIT/SIPI events, which can change the
//!    other registers.
//! 2. REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS, CPUID.
//! 3. VCPU_EVENTS last: reading the other state may queue or complete events; the last read sees
//!    the final pending exception/interrupt/NMI state.
//!
//! # vCPU restore order (and why)
//! CPUID → MP_STATE → REGS → SREGS → XSAVE → XCRS → DEBUGREGS → LAPIC → MSRS → VCPU_EVENTS.
//! CPUID first because KVM validates later state (XSAVE features, MSRs) against it; SREGS before
//! XSAVE/XCRS because CR4.OSXSAVE gates XCR0; LAPIC before MSRS because MSRs such as
//! TSC_DEADLINE and APIC_BASE interact with the LAPIC mode; VCPU_EVENTS last so nothing after it
//! clears the pending events it injects.
//!
//! VM-wide state is restored after the vCPUs exist: PIC master, PIC slave, IOAPIC, PIT, then the
//! kvmclock (last, so the guest clock resumes from the captured value as close to the restart as
//! possible; the flags are cleared because KVM only accepts a subset of what it reports).
//!
//! MSRs: the list KVM reports via KVM_GET_MSR_INDEX_LIST, filtered at boot to those that can be
//! read and written back (see [`crate::arch::msr`]). FPU state travels in the XSAVE area
//! (KVM_GET_XSAVE, 4096 bytes; a larger XSAVE2 area is refused with `VmError::XsaveTooLarge`).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::serial::SerialSnapshot;
use crate::{VmConfig, VmError};

/// Version of the [`MachineState`] encoding.
pub const STATE_FORMAT_VERSION: u32 = 1;

/// State of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (= APIC id).
    pub id: u8,
    /// CPUID table set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// XSAVE area (FPU, SSE, AVX ...).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        // kvm_xsave ends in a flexible array member and is not Clone; the fixed region is all
        // KVM_GET_XSAVE fills.
        let mut xsave = kvm_xsave::default();
        xsave.region = self.xsave.region;
        VcpuState {
            id: self.id,
            cpuid: self.cpuid.clone(),
            mp_state: self.mp_state,
            regs: self.regs,
            sregs: self.sregs,
            xsave,
            xcrs: self.xcrs,
            debugregs: self.debugregs,
            lapic: self.lapic,
            msrs: self.msrs.clone(),
            events: self.events,
        }
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .field("cpuid_entries", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

/// Everything needed to rebuild the machine around its memory.
#[derive(Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// Encoding version ([`STATE_FORMAT_VERSION`]).
    pub version: u32,
    /// The VM configuration (memory size, vCPUs, backend, built-in guest parameters).
    pub config: VmConfig,
    /// Per-vCPU state, by index.
    pub vcpus: Vec<VcpuState>,
    /// Master PIC.
    pub pic_master: kvm_irqchip,
    /// Slave PIC.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT (KVM_GET_PIT2).
    pub pit: kvm_pit_state2,
    /// kvmclock (KVM_GET_CLOCK).
    pub clock: kvm_clock_data,
    /// COM1 UART.
    pub serial: SerialSnapshot,
    /// The built-in guest's control slots at capture (steps done per vCPU).
    pub slots: Vec<u64>,
    /// The built-in guest's tick counter at capture.
    pub ticks: u64,
    /// Host quirks noted when the state was captured (e.g. dropped MSRs).
    pub notes: Vec<String>,
}

impl std::fmt::Debug for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineState")
            .field("version", &self.version)
            .field("config", &self.config)
            .field("vcpus", &self.vcpus)
            .field("slots", &self.slots)
            .field("ticks", &self.ticks)
            .field("notes", &self.notes)
            .finish_non_exhaustive()
    }
}

impl MachineState {
    /// Serialises to bytes (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses bytes produced by [`MachineState::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<Self, VmError> {
        let s: MachineState = serde_json::from_slice(b).map_err(VmError::StateDecode)?;
        if s.version != STATE_FORMAT_VERSION {
            return Err(VmError::StateVersion {
                found: s.version,
                expected: STATE_FORMAT_VERSION,
            });
        }
        s.validate()?;
        Ok(s)
    }

    /// The configuration of the VM the state came from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The built-in guest's control slots read at capture.
    pub fn guest_slots(&self) -> Vec<u64> {
        self.slots.clone()
    }

    /// Checks internal consistency.
    pub fn validate(&self) -> Result<(), VmError> {
        if self.vcpus.len() != usize::from(self.config.vcpus) {
            return Err(VmError::StateInvalid(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.config.vcpus
            )));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.id) != i {
                return Err(VmError::StateInvalid(format!(
                    "vCPU state {i} has id {}",
                    v.id
                )));
            }
        }
        Ok(())
    }
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(VmError::kvm("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// VM-wide part of the state.
pub(crate) struct VmWide {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// Captures irqchip, PIT and clock.
pub(crate) fn capture_vm(vm: &VmFd) -> Result<VmWide, VmError> {
    Ok(VmWide {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(VmError::kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(VmError::kvm("KVM_GET_CLOCK"))?,
    })
}

/// Restores irqchip and PIT (clock separately, see [`restore_clock`]).
pub(crate) fn restore_vm(vm: &VmFd, s: &MachineState) -> Result<(), VmError> {
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(c).map_err(VmError::kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(VmError::kvm("KVM_SET_PIT2"))?;
    Ok(())
}

/// Restores kvmclock.
pub(crate) fn restore_clock(vm: &VmFd, clock: &kvm_clock_data) -> Result<(), VmError> {
    let c = kvm_clock_data {
        clock: clock.clock,
        ..Default::default()
    };
    vm.set_clock(&c).map_err(VmError::kvm("KVM_SET_CLOCK"))
}

/// Captures one vCPU in the documented order.
pub(crate) fn capture_vcpu(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, VmError> {
    let e = |op| VmError::vcpu(op, id);
    let mp_state = fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    let msrs = crate::arch::msr::read(fd, id, msr_indices)?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(e("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let events = fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// Restores one vCPU in the documented order. `xsave_ok` says KVM_SET_XSAVE's 4 KiB is enough.
pub(crate) fn restore_vcpu(fd: &VcpuFd, s: &VcpuState, xsave_ok: bool) -> Result<(), VmError> {
    let id = s.id;
    let e = |op| VmError::vcpu(op, id);
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|err| VmError::FamStruct(format!("CPUID: {err:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(e("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(e("KVM_SET_SREGS"))?;
    if !xsave_ok {
        return Err(VmError::StateInvalid(
            "XSAVE area larger than 4096 bytes".into(),
        ));
    }
    // SAFETY: `xsave_ok` means KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reported at most 4096 bytes
    // (this process never enables dynamic XSTATE features), so KVM reads only the 4096-byte
    // `kvm_xsave` we pass.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(e("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(e("KVM_SET_LAPIC"))?;
    crate::arch::msr::write(fd, id, &s.msrs)?;
    fd.set_vcpu_events(&s.events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
