//! The `vcpu` component: one vCPU's registers, LAPIC, MSRs, CPUID and pending events, captured
//! and restored in the order the module docs of [`crate::state`] give.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MAX_XCRS,
};
use kvm_ioctls::VcpuFd;

use super::codec::{exact, BodyReader, BodyWriter};
use super::{bad, Component, MAX_STATE_MSRS};
use crate::VmError;

/// State of one vCPU.
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

/// Body, version 1: `id` u32, `cpuid` list of blobs, `mp_state`, `regs`, `sregs`, `xsave`,
/// `xcrs`, `debugregs`, `lapic` blobs, `msrs` list of blobs, `events` blob (restore order).
impl Component for VcpuState {
    const NAME: &'static str = "vcpu";
    const VERSION: u32 = 1;

    fn encode(&self, w: &mut BodyWriter) {
        w.u32(u32::from(self.id));
        w.list("cpuid", &self.cpuid, |w, e| w.kvm("cpuid", e));
        w.kvm("mp_state", &self.mp_state);
        w.kvm("regs", &self.regs);
        w.kvm("sregs", &self.sregs);
        w.kvm("xsave", &self.xsave);
        w.kvm("xcrs", &self.xcrs);
        w.kvm("debugregs", &self.debugregs);
        w.kvm("lapic", &self.lapic);
        w.list("msrs", &self.msrs, |w, e| w.kvm("msrs", e));
        w.kvm("events", &self.events);
    }

    fn decode(r: &mut BodyReader<'_>, _version: u32) -> Result<Self, VmError> {
        let id = r.u32("id")?;
        let id = u8::try_from(id)
            .map_err(|_| bad("id", None, format!("id {id} out of range 0..=255")))?;
        // Counts first: no struct is built from an oversized list.
        let n = r.count("cpuid", KVM_MAX_CPUID_ENTRIES)?;
        if n == 0 {
            return Err(cpuid_count(0));
        }
        let cpuid = (0..n)
            .map(|_| exact(r.blob("cpuid")?, "cpuid"))
            .collect::<Result<_, _>>()?;
        let mp_state = exact(r.blob("mp_state")?, "mp_state")?;
        let regs = exact(r.blob("regs")?, "regs")?;
        let sregs = exact(r.blob("sregs")?, "sregs")?;
        let xsave = exact(r.blob("xsave")?, "xsave")?;
        let xcrs = exact(r.blob("xcrs")?, "xcrs")?;
        let debugregs = exact(r.blob("debugregs")?, "debugregs")?;
        let lapic = exact(r.blob("lapic")?, "lapic")?;
        let n = r.count("msrs", MAX_STATE_MSRS)?;
        let msrs = (0..n)
            .map(|_| exact(r.blob("msrs")?, "msrs"))
            .collect::<Result<_, _>>()?;
        let events = exact(r.blob("events")?, "events")?;
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

    /// CPUID non-empty and at most `KVM_MAX_CPUID_ENTRIES`, at most [`MAX_STATE_MSRS`] MSRs, at
    /// most `KVM_MAX_XCRS` XCRs. The id is checked against the machine's vCPUs by
    /// [`super::MachineState::validate`].
    fn check(&self) -> Result<(), VmError> {
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(cpuid_count(self.cpuid.len()));
        }
        if self.msrs.len() > MAX_STATE_MSRS {
            return Err(bad(
                "msrs",
                None,
                format!("{} entries, at most {MAX_STATE_MSRS}", self.msrs.len()),
            ));
        }
        if self.xcrs.nr_xcrs > KVM_MAX_XCRS {
            return Err(bad(
                "xcrs",
                None,
                format!("{} registers, at most {KVM_MAX_XCRS}", self.xcrs.nr_xcrs),
            ));
        }
        Ok(())
    }
}

fn cpuid_count(n: usize) -> VmError {
    bad(
        "cpuid",
        None,
        format!("{n} entries, expected 1..={KVM_MAX_CPUID_ENTRIES}"),
    )
}

impl VcpuState {
    /// Captures vCPU `id` in the documented order.
    pub(crate) fn capture(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<Self, VmError> {
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

    /// Restores the vCPU in the documented order. `xsave_ok` says KVM_SET_XSAVE's 4 KiB is
    /// enough.
    pub(crate) fn restore(&self, fd: &VcpuFd, xsave_ok: bool) -> Result<(), VmError> {
        let id = self.id;
        let e = |op| VmError::vcpu(op, id);
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|err| VmError::FamStruct(format!("CPUID: {err:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(e("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(e("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(e("KVM_SET_SREGS"))?;
        if !xsave_ok {
            return Err(VmError::StateInvalid(
                "XSAVE area larger than 4096 bytes".into(),
            ));
        }
        // SAFETY: `xsave_ok` means KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reported at most 4096
        // bytes (this process never enables dynamic XSTATE features), so KVM reads only the
        // 4096-byte `kvm_xsave` we pass.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(e("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(e("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(e("KVM_SET_LAPIC"))?;
        crate::arch::msr::write(fd, id, &self.msrs)?;
        fd.set_vcpu_events(&self.events)
            .map_err(e("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
