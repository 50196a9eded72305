//! Guest CPUID: what KVM supports, with the per-vCPU APIC ids filled in.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::VmError;

/// The host-supported CPUID table (fetched once per VM).
pub fn supported(kvm: &Kvm) -> Result<CpuId, VmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::kvm("KVM_GET_SUPPORTED_CPUID"))
}

/// `base` adjusted for `vcpu`: initial APIC id in leaf 1 and x2APIC id in leaves 0xB/0x1F, and the
/// hypervisor bit set.
pub fn for_vcpu(base: &CpuId, vcpu: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00FF_FFFF) | (u32::from(vcpu) << 24);
                e.ecx |= 1 << 31;
            }
            0xB | 0x1F => e.edx = u32::from(vcpu),
            _ => {}
        }
    }
    c
}
