//! Boot register state of a vCPU: long mode, ring 0, at the guest's kernel entry — the built-in
//! guest's ([`setup`]) or a kernel's 64-bit boot protocol entry ([`setup_kernel_entry`]).

use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;

use super::gdt;
use crate::layout;
use crate::VmError;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Sets sregs (segments, descriptor tables, paging, long mode), regs and FPU for `vcpu`.
pub fn setup(fd: &VcpuFd, vcpu: u8, vcpus: u8, kernel_entry: u64) -> Result<(), VmError> {
    let mut sregs: kvm_sregs = fd
        .get_sregs()
        .map_err(VmError::vcpu("KVM_GET_SREGS", vcpu))?;
    let data = gdt::kernel_data_segment();
    sregs.cs = gdt::kernel_code_segment();
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::tss_segment(vcpu);
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = gdt::gdt_limit(vcpus);
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = (layout::IDT_ENTRIES * 16 - 1) as u16;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = layout::PML4_START;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs)
        .map_err(VmError::vcpu("KVM_SET_SREGS", vcpu))?;

    let regs = kvm_regs {
        rip: kernel_entry,
        rsp: layout::kernel_stack_top(vcpu),
        rflags: 0x2,
        rdi: u64::from(vcpu),
        rsi: layout::user_stack_top(vcpu),
        ..Default::default()
    };
    fd.set_regs(&regs)
        .map_err(VmError::vcpu("KVM_SET_REGS", vcpu))?;

    let fpu = kvm_fpu {
        fcw: 0x37F,
        mxcsr: 0x1F80,
        ..Default::default()
    };
    fd.set_fpu(&fpu)
        .map_err(VmError::vcpu("KVM_SET_FPU", vcpu))?;
    // With the in-kernel irqchip, application processors start waiting for INIT/SIPI; the
    // built-in guest starts every vCPU directly.
    let mp = kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    };
    fd.set_mp_state(mp)
        .map_err(VmError::vcpu("KVM_SET_MP_STATE", vcpu))?;
    Ok(())
}

/// Kernel VMs: puts the bootstrap vCPU at a kernel's 64-bit entry as the Linux boot protocol
/// asks: long mode with paging (identity map), CS = __BOOT_CS, DS/ES/SS = __BOOT_DS (flat),
/// interrupts disabled, RSI = the zero page. Application processors are left alone: with the
/// in-kernel irqchip they wait for INIT/SIPI, which is how the kernel starts them.
pub fn setup_kernel_entry(fd: &VcpuFd, entry: u64) -> Result<(), VmError> {
    let mut sregs: kvm_sregs = fd.get_sregs().map_err(VmError::vcpu("KVM_GET_SREGS", 0))?;
    let (cs, ds, tr) = gdt::boot_segments();
    sregs.cs = cs;
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = tr;
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = gdt::BOOT_GDT_LIMIT;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = gdt::BOOT_IDT_LIMIT;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = layout::PML4_START;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs)
        .map_err(VmError::vcpu("KVM_SET_SREGS", 0))?;
    let regs = kvm_regs {
        rip: entry,
        rsp: layout::BOOT_STACK_TOP,
        rbp: layout::BOOT_STACK_TOP,
        rsi: layout::ZERO_PAGE_START,
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs)
        .map_err(VmError::vcpu("KVM_SET_REGS", 0))?;
    let fpu = kvm_fpu {
        fcw: 0x37F,
        mxcsr: 0x1F80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(VmError::vcpu("KVM_SET_FPU", 0))
}
