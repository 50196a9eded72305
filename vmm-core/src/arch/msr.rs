//! Which MSRs a machine state carries, and the MSRs a kernel VM boots with.
//!
//! Start from KVM_GET_MSR_INDEX_LIST and keep each MSR that can be read (KVM_GET_MSRS) and then
//! written back with the value read (KVM_SET_MSRS) on a fresh vCPU. MSRs KVM lists but cannot read
//! or set (e.g. ones for features the host or PVM lacks) are dropped; the dropped indices are
//! recorded in the VM's quirk notes so nothing disappears silently.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::VmError;

/// Result of probing the MSR list.
#[derive(Debug, Clone, Default)]
pub struct MsrProbe {
    /// MSRs that can be saved and restored.
    pub usable: Vec<u32>,
    /// MSRs listed by KVM but not readable or not writable back.
    pub dropped: Vec<u32>,
}

fn one(index: u32, data: u64) -> Result<Msrs, VmError> {
    Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .map_err(|e| VmError::FamStruct(format!("MSR list: {e:?}")))
}

/// Probes KVM's MSR index list on `fd` (a vCPU that has not run yet).
pub fn probe(kvm: &Kvm, fd: &VcpuFd) -> Result<MsrProbe, VmError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(VmError::kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut p = MsrProbe::default();
    for &index in list.as_slice() {
        let mut m = one(index, 0)?;
        let ok = match fd.get_msrs(&mut m) {
            Ok(1) => matches!(fd.set_msrs(&m), Ok(1)),
            _ => false,
        };
        if ok {
            p.usable.push(index);
        } else {
            p.dropped.push(index);
        }
    }
    Ok(p)
}

/// Reads `indices` from `fd`; every one must succeed.
pub fn read(fd: &VcpuFd, vcpu: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VmError> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut out = Vec::with_capacity(entries.len());
    // Chunks keep each request below the FAM wrapper's limit.
    for chunk in entries.chunks(200) {
        let mut m = Msrs::from_entries(chunk)
            .map_err(|e| VmError::FamStruct(format!("MSR list: {e:?}")))?;
        let n = fd
            .get_msrs(&mut m)
            .map_err(VmError::vcpu("KVM_GET_MSRS", vcpu))?;
        if n != chunk.len() {
            return Err(VmError::MsrsPartial {
                op: "KVM_GET_MSRS",
                vcpu,
                done: n,
                total: chunk.len(),
                first_failed: chunk[n].index,
            });
        }
        out.extend_from_slice(m.as_slice());
    }
    Ok(out)
}

/// Writes `entries` to `fd`; every one must succeed.
pub fn write(fd: &VcpuFd, vcpu: u8, entries: &[kvm_msr_entry]) -> Result<(), VmError> {
    for chunk in entries.chunks(200) {
        let m = Msrs::from_entries(chunk)
            .map_err(|e| VmError::FamStruct(format!("MSR list: {e:?}")))?;
        let n = fd
            .set_msrs(&m)
            .map_err(VmError::vcpu("KVM_SET_MSRS", vcpu))?;
        if n != chunk.len() {
            return Err(VmError::MsrsPartial {
                op: "KVM_SET_MSRS",
                vcpu,
                done: n,
                total: chunk.len(),
                first_failed: chunk[n].index,
            });
        }
    }
    Ok(())
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xC000_0081;
const MSR_LSTAR: u32 = 0xC000_0082;
const MSR_CSTAR: u32 = 0xC000_0083;
const MSR_SYSCALL_MASK: u32 = 0xC000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xC000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1A0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2FF;
/// IA32_MISC_ENABLE: fast string operations enabled.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled (bit 11), default memory type write-back (6).
const MTRR_DEF_ENABLED_WB: u64 = (1 << 11) | 6;

/// Kernel VMs: the MSR values a vCPU starts with (what firmware would leave): syscall/sysenter
/// MSRs cleared, TSC 0 on every vCPU (so they start in sync), fast strings on, MTRRs enabled
/// with write-back as the default type (otherwise a kernel treats all RAM as uncached).
pub fn boot_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_ENABLED_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Kernel VMs: sets [`boot_entries`] on `fd` one by one; returns the indices KVM refused (the
/// caller records them as quirks: a host without a feature must not stop the boot).
pub fn set_boot(fd: &VcpuFd) -> Result<Vec<u32>, VmError> {
    let mut refused = Vec::new();
    for e in boot_entries() {
        if !matches!(fd.set_msrs(&one(e.index, e.data)?), Ok(1)) {
            refused.push(e.index);
        }
    }
    Ok(refused)
}
