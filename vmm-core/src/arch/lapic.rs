//! Local APIC boot configuration: APIC software-enabled, LINT0 = ExtINT on the boot vCPU only
//! (so every legacy PIC interrupt, i.e. the PIT tick, goes to vCPU 0), LINT0 masked elsewhere,
//! LINT1 = NMI.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use crate::VmError;

const APIC_SPIV: usize = 0xF0;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const MODE_EXTINT: u32 = 0x7 << 8;
const MODE_NMI: u32 = 0x4 << 8;
const MASKED: u32 = 1 << 16;

fn get(l: &kvm_lapic_state, off: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| l.regs[off + i] as u8);
    u32::from_le_bytes(b)
}

fn set(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *b as i8;
    }
}

/// Applies the boot configuration described in the module docs to `vcpu`.
pub fn setup(fd: &VcpuFd, vcpu: u8) -> Result<(), VmError> {
    let mut l = fd
        .get_lapic()
        .map_err(VmError::vcpu("KVM_GET_LAPIC", vcpu))?;
    let spiv = get(&l, APIC_SPIV) | 0x1FF;
    set(&mut l, APIC_SPIV, spiv);
    let lvt0 = if vcpu == 0 {
        MODE_EXTINT
    } else {
        MODE_EXTINT | MASKED
    };
    set(&mut l, APIC_LVT0, lvt0);
    set(&mut l, APIC_LVT1, MODE_NMI);
    fd.set_lapic(&l)
        .map_err(VmError::vcpu("KVM_SET_LAPIC", vcpu))
}
