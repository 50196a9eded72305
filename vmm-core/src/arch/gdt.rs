//! GDT, TSS and IDT contents, and the matching `kvm_segment`s for KVM_SET_SREGS.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, boot_selector, selector};
use crate::VmError;

/// 64-bit ring-0 code: present, DPL 0, code exec/read, L=1, G=1.
const KERNEL_CODE: u64 = 0x00AF_9B00_0000_FFFF;
/// Ring-0 data: present, DPL 0, data read/write, D/B=1, G=1.
const KERNEL_DATA: u64 = 0x00CF_9300_0000_FFFF;
/// Ring-3 data: as kernel data with DPL 3.
const USER_DATA: u64 = 0x00CF_F300_0000_FFFF;
/// 64-bit ring-3 code: as kernel code with DPL 3.
const USER_CODE: u64 = 0x00AF_FB00_0000_FFFF;
/// Size of a 64-bit TSS without I/O bitmap.
pub const TSS_SIZE: u64 = 104;
/// Ports covered by the I/O permission bitmap (all allowed); ports above are denied.
pub const IO_BITMAP_PORTS: u64 = 0x800;
/// Bytes of TSS including the I/O bitmap and its terminating 0xFF byte.
pub const TSS_TOTAL: u64 = TSS_SIZE + IO_BITMAP_PORTS / 8 + 1;

/// The 16-byte descriptor of an available 64-bit TSS at `base`.
fn tss_descriptor(base: u64) -> [u64; 2] {
    descriptor_of_tss(base, TSS_TOTAL - 1)
}

/// The 16-byte descriptor of an available 64-bit TSS at `base` with `limit`.
fn descriptor_of_tss(base: u64, limit: u64) -> [u64; 2] {
    let low = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40) // present, type 9 (available 64-bit TSS)
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    [low, base >> 32]
}

/// Total GDT size in bytes for `vcpus` TSS descriptors.
pub fn gdt_limit(vcpus: u8) -> u16 {
    selector::TSS_BASE + 16 * u16::from(vcpus) - 1
}

/// Writes the GDT, one TSS per vCPU (RSP0 = its kernel stack, no I/O bitmap) and the IDT.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u8, vectors: &[u64]) -> Result<(), VmError> {
    let w = |gpa: u64, v: u64| {
        mem.write_obj(v, GuestAddress(gpa))
            .map_err(VmError::GuestMemory)
    };
    for (i, d) in [0, KERNEL_CODE, KERNEL_DATA, USER_DATA, USER_CODE]
        .iter()
        .enumerate()
    {
        w(layout::GDT_START + 8 * i as u64, *d)?;
    }
    for v in 0..vcpus {
        let tss = layout::tss_addr(v);
        let [lo, hi] = tss_descriptor(tss);
        let at = layout::GDT_START + u64::from(layout::tss_selector(v));
        w(at, lo)?;
        w(at + 8, hi)?;
        let mut image = [0u8; TSS_TOTAL as usize];
        image[TSS_TOTAL as usize - 1] = 0xFF;
        mem.write_slice(&image, GuestAddress(tss))
            .map_err(VmError::GuestMemory)?;
        // RSP0 at offset 4 (unaligned u64 inside the TSS).
        mem.write_obj(layout::kernel_stack_top(v), GuestAddress(tss + 4))
            .map_err(VmError::GuestMemory)?;
        // I/O permission bitmap right after the TSS, allowing ports 0..IO_BITMAP_PORTS from
        // ring 3. IOPL 3 would do on hardware, but PVM reloads RFLAGS from the real (IOPL 0)
        // flags on every exit, so its emulator falls back to this bitmap.
        mem.write_obj(TSS_SIZE as u16, GuestAddress(tss + 102))
            .map_err(VmError::GuestMemory)?;
    }
    for (v, &handler) in vectors.iter().enumerate() {
        // 64-bit interrupt gate, present, DPL 0, IST 0, kernel code selector.
        let lo = (handler & 0xFFFF)
            | (u64::from(selector::KERNEL_CODE) << 16)
            | (0x8E << 40)
            | (((handler >> 16) & 0xFFFF) << 48);
        let at = layout::IDT_START + 16 * v as u64;
        w(at, lo)?;
        w(at + 8, handler >> 32)?;
    }
    Ok(())
}

/// Kernel VMs: writes the boot GDT (null, null, __BOOT_CS, __BOOT_DS, TSS), a zeroed boot TSS
/// and a boot IDT holding one null gate.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), VmError> {
    let w = |gpa: u64, v: u64| {
        mem.write_obj(v, GuestAddress(gpa))
            .map_err(VmError::GuestMemory)
    };
    w(layout::BOOT_GDT_START, 0)?;
    w(layout::BOOT_GDT_START + 8, 0)?;
    w(
        layout::BOOT_GDT_START + u64::from(boot_selector::CODE),
        KERNEL_CODE,
    )?;
    w(
        layout::BOOT_GDT_START + u64::from(boot_selector::DATA),
        KERNEL_DATA,
    )?;
    let [lo, hi] = descriptor_of_tss(layout::BOOT_TSS_START, TSS_SIZE - 1);
    w(layout::BOOT_GDT_START + u64::from(boot_selector::TSS), lo)?;
    w(
        layout::BOOT_GDT_START + u64::from(boot_selector::TSS) + 8,
        hi,
    )?;
    mem.write_slice(
        &[0u8; TSS_SIZE as usize],
        GuestAddress(layout::BOOT_TSS_START),
    )
    .map_err(VmError::GuestMemory)?;
    w(layout::BOOT_IDT_START, 0)?;
    w(layout::BOOT_IDT_START + 8, 0)
}

/// Kernel VMs: limit of the boot GDT.
pub const BOOT_GDT_LIMIT: u16 = boot_selector::TSS + 16 - 1;
/// Kernel VMs: limit of the boot IDT (one 16-byte gate).
pub const BOOT_IDT_LIMIT: u16 = 15;

/// Kernel VMs: the boot code, data and TSS segments for KVM_SET_SREGS.
pub fn boot_segments() -> (kvm_segment, kvm_segment, kvm_segment) {
    let mut cs = kernel_code_segment();
    cs.selector = boot_selector::CODE;
    let mut ds = kernel_data_segment();
    ds.selector = boot_selector::DATA;
    let tr = kvm_segment {
        base: layout::BOOT_TSS_START,
        limit: (TSS_SIZE - 1) as u32,
        selector: boot_selector::TSS,
        ..tss_segment(0)
    };
    (cs, ds, tr)
}

/// Flat 64-bit ring-0 code segment.
pub fn kernel_code_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector: selector::KERNEL_CODE,
        type_: 0xB,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Flat ring-0 data segment.
pub fn kernel_data_segment() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector: selector::KERNEL_DATA,
        type_: 0x3,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The (busy) TSS segment of `vcpu`.
pub fn tss_segment(vcpu: u8) -> kvm_segment {
    kvm_segment {
        base: layout::tss_addr(vcpu),
        limit: (TSS_TOTAL - 1) as u32,
        selector: layout::tss_selector(vcpu),
        type_: 0xB,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let [lo, hi] = tss_descriptor(0x1234_5678_9ABC_DEF0);
        assert_eq!(lo & 0xFFFF, TSS_TOTAL - 1);
        const { assert!(TSS_TOTAL <= crate::layout::TSS_STRIDE) };
        assert_eq!((lo >> 16) & 0xFF_FFFF, 0xBC_DEF0);
        assert_eq!((lo >> 56) & 0xFF, 0x9A);
        assert_eq!(hi, 0x1234_5678);
        assert_eq!((lo >> 40) & 0xFF, 0x89);
    }
}
