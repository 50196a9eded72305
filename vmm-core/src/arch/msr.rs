//! Which MSRs a machine state carries.
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
