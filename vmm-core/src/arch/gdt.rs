//! GDT, TSS and IDT contents, and the matching `kvm_segment`s for KVM_SET_SREGS.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::PORT_DEVICES;
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
/// Size of a 64-bit TSS without I/O bitmap; every TSS written here has its I/O permission bitmap
/// right after it (I/O map base = `TSS_SIZE`).
pub const TSS_SIZE: u64 = 104;
/// Built-in guest: ports covered by its I/O permission bitmap (all allowed); ports above are
/// denied.
pub const IO_BITMAP_PORTS: u64 = 0x800;
/// Built-in guest: bytes of TSS including the I/O bitmap and its terminating 0xFF byte.
pub const TSS_TOTAL: u64 = TSS_SIZE + IO_BITMAP_PORTS / 8 + 1;

/// KVM's in-kernel PIC and PIT ports (inclusive ranges). KVM answers them itself, so they are on
/// no VMM bus, but a kernel may use them from ring 3 like the VMM's ports.
const IN_KERNEL_PORTS: [(u16, u16); 5] = [
    (0x20, 0x21),   // PIC master
    (0x40, 0x43),   // PIT
    (0x61, 0x61),   // PIT channel 2 gate / speaker
    (0xA0, 0xA1),   // PIC slave
    (0x4D0, 0x4D1), // PIC edge/level control
];

/// Kernel VMs: the ports ring 3 may use through the boot TSS (inclusive ranges): KVM's in-kernel
/// PIC and PIT, then every port device on a kernel VM's port bus
/// (`crate::devices::PORT_DEVICES`; see the device policy in [`crate::vcpu`]). A kernel that
/// keeps the boot TSS and does port I/O from ring 3 needs this bitmap on PVM hosts, which ignore
/// IOPL and check only the bitmap. Any other port faults (#GP) from ring 3.
pub const BOOT_IO_PORTS: &[(u16, u16)] = &boot_io_ports();

const BOOT_IO_PORT_RANGES: usize = IN_KERNEL_PORTS.len() + PORT_DEVICES.len();

const fn boot_io_ports() -> [(u16, u16); BOOT_IO_PORT_RANGES] {
    let mut out = [(0, 0); BOOT_IO_PORT_RANGES];
    let mut i = 0;
    while i < IN_KERNEL_PORTS.len() {
        out[i] = IN_KERNEL_PORTS[i];
        i += 1;
    }
    let mut d = 0;
    while d < PORT_DEVICES.len() {
        let dev = &PORT_DEVICES[d];
        out[i + d] = (dev.base, dev.base + (dev.len - 1));
        d += 1;
    }
    out
}

/// Kernel VMs: ports covered by the boot TSS's I/O permission bitmap (the highest in
/// [`BOOT_IO_PORTS`], rounded up to whole bitmap bytes); ports above are denied.
pub const BOOT_IO_BITMAP_PORTS: u64 = {
    let mut top = 0;
    let mut i = 0;
    while i < BOOT_IO_PORTS.len() {
        if BOOT_IO_PORTS[i].1 > top {
            top = BOOT_IO_PORTS[i].1;
        }
        i += 1;
    }
    (top as u64 / 8 + 1) * 8
};
/// Kernel VMs: bytes of the boot TSS including its I/O bitmap and the terminating 0xFF byte.
pub const BOOT_TSS_TOTAL: u64 = TSS_SIZE + BOOT_IO_BITMAP_PORTS / 8 + 1;
// A port device high enough to outgrow the reserved area stops the build.
const _: () = assert!(BOOT_TSS_TOTAL <= layout::BOOT_TSS_MAX_SIZE);

/// An I/O permission bitmap covering ports `0..ports` (a multiple of 8) that allows exactly the
/// inclusive port ranges `allowed` (bit clear) and denies the rest, followed by the terminating
/// 0xFF byte the CPU needs (it reads two bytes per check).
pub fn io_bitmap(ports: u64, allowed: &[(u16, u16)]) -> Vec<u8> {
    let mut map = vec![0xFFu8; (ports / 8) as usize + 1];
    for &(first, last) in allowed {
        for p in first..=last {
            assert!(u64::from(p) < ports, "port {p:#x} outside the I/O bitmap");
            map[usize::from(p / 8)] &= !(1 << (p % 8));
        }
    }
    map
}

/// Writes a 64-bit TSS at `base` — RSP0 = `rsp0`, everything else zero, I/O map base =
/// [`TSS_SIZE`] — followed by `bitmap` (from [`io_bitmap`]). Its limit is
/// `TSS_SIZE + bitmap.len() - 1`.
fn write_tss(mem: &GuestMemoryMmap, base: u64, rsp0: u64, bitmap: &[u8]) -> Result<(), VmError> {
    let mut image = vec![0u8; TSS_SIZE as usize];
    // RSP0 at offset 4 (unaligned u64 inside the TSS), the I/O map base at offset 102.
    image[4..12].copy_from_slice(&rsp0.to_le_bytes());
    image[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    image.extend_from_slice(bitmap);
    mem.write_slice(&image, GuestAddress(base))
        .map_err(VmError::GuestMemory)
}

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

/// Writes the GDT, one TSS per vCPU (RSP0 = its kernel stack, I/O bitmap allowing ports
/// `0..IO_BITMAP_PORTS`) and the IDT.
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
    let guest_bitmap = io_bitmap(IO_BITMAP_PORTS, &[(0, IO_BITMAP_PORTS as u16 - 1)]);
    for v in 0..vcpus {
        let tss = layout::tss_addr(v);
        let [lo, hi] = tss_descriptor(tss);
        let at = layout::GDT_START + u64::from(layout::tss_selector(v));
        w(at, lo)?;
        w(at + 8, hi)?;
        // I/O permission bitmap allowing ports 0..IO_BITMAP_PORTS from ring 3. IOPL 3 would do
        // on hardware, but PVM reloads RFLAGS from the real (IOPL 0) flags on every exit, so its
        // emulator falls back to this bitmap.
        write_tss(mem, tss, layout::kernel_stack_top(v), &guest_bitmap)?;
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

/// Kernel VMs: writes the boot GDT (null, null, __BOOT_CS, __BOOT_DS, TSS), the boot TSS and a
/// boot IDT holding one null gate.
///
/// The boot TSS (at [`layout::BOOT_TSS_START`], in the legacy area the e820 map reserves, so a
/// kernel never takes it for free RAM) is what TR holds at entry. Linux loads its own; a small
/// kernel may keep it, so it carries an I/O permission bitmap allowing [`BOOT_IO_PORTS`] from
/// ring 3. Its RSP0 and ISTs are 0: the boot protocol gives no stack for entering ring 0, so a
/// kernel that takes interrupts or exceptions from ring 3 on this TSS must set RSP0 itself.
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
    let [lo, hi] = descriptor_of_tss(layout::BOOT_TSS_START, BOOT_TSS_TOTAL - 1);
    w(layout::BOOT_GDT_START + u64::from(boot_selector::TSS), lo)?;
    w(
        layout::BOOT_GDT_START + u64::from(boot_selector::TSS) + 8,
        hi,
    )?;
    write_tss(
        mem,
        layout::BOOT_TSS_START,
        0,
        &io_bitmap(BOOT_IO_BITMAP_PORTS, BOOT_IO_PORTS),
    )?;
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
        limit: (BOOT_TSS_TOTAL - 1) as u32,
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

    fn allowed(map: &[u8], port: u16) -> bool {
        map.get(usize::from(port / 8))
            .is_some_and(|b| b & (1 << (port % 8)) == 0)
    }

    #[test]
    fn io_bitmaps_allow_exactly_their_ports() {
        let g = io_bitmap(IO_BITMAP_PORTS, &[(0, IO_BITMAP_PORTS as u16 - 1)]);
        assert_eq!(g.len() as u64, TSS_TOTAL - TSS_SIZE);
        assert!(g[..g.len() - 1].iter().all(|&b| b == 0));
        assert_eq!(g.last(), Some(&0xFF));

        let b = io_bitmap(BOOT_IO_BITMAP_PORTS, BOOT_IO_PORTS);
        assert_eq!(b.len() as u64, BOOT_TSS_TOTAL - TSS_SIZE);
        assert_eq!(b.last(), Some(&0xFF));
        const { assert!(BOOT_TSS_TOTAL <= crate::layout::BOOT_TSS_MAX_SIZE) };
        let want = |p: u16| BOOT_IO_PORTS.iter().any(|&(a, z)| (a..=z).contains(&p));
        for p in 0..=u16::MAX {
            assert_eq!(allowed(&b, p), want(p), "port {p:#x}");
        }
        for p in (0x3f8..0x400).chain([0x20, 0x21, 0x40, 0x43, 0x61, 0x64, 0x80, 0xA1, 0xCF9]) {
            assert!(allowed(&b, p), "port {p:#x}");
        }
        for p in [0x2f8, 0x60, 0x70, 0x500, 0xCF8, 0xCFC] {
            assert!(!allowed(&b, p), "port {p:#x}");
        }
        // The bitmap is as short as it can be.
        let top = BOOT_IO_PORTS.iter().map(|&(_, z)| z).max().unwrap();
        assert_eq!(BOOT_IO_BITMAP_PORTS, (u64::from(top) / 8 + 1) * 8);
    }

    #[test]
    fn boot_tss_is_written_with_its_bitmap() {
        let mem = crate::create_guest_memory(16 << 20, crate::MemBackend::Anon).unwrap();
        write_boot_tables(&mem).unwrap();
        let base = layout::BOOT_TSS_START;
        let rd16 = |a: u64| mem.read_obj::<u16>(GuestAddress(a)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(base + 4)).unwrap(), 0);
        assert_eq!(u64::from(rd16(base + 102)), TSS_SIZE);
        let mut map = vec![0u8; (BOOT_TSS_TOTAL - TSS_SIZE) as usize];
        mem.read_slice(&mut map, GuestAddress(base + TSS_SIZE))
            .unwrap();
        assert_eq!(map, io_bitmap(BOOT_IO_BITMAP_PORTS, BOOT_IO_PORTS));
        // It sits where kernels scan for firmware tables: it must not look like one.
        let mut image = vec![0u8; BOOT_TSS_TOTAL as usize];
        mem.read_slice(&mut image, GuestAddress(base)).unwrap();
        for sig in [&b"_MP_"[..], b"_SM_", b"_DMI_", b"RSD PTR ", b"_32_"] {
            assert!(!image.windows(sig.len()).any(|w| w == sig), "{sig:?}");
        }
        let at = layout::BOOT_GDT_START + u64::from(boot_selector::TSS);
        let lo = mem.read_obj::<u64>(GuestAddress(at)).unwrap();
        let hi = mem.read_obj::<u64>(GuestAddress(at + 8)).unwrap();
        assert_eq!([lo, hi], descriptor_of_tss(base, BOOT_TSS_TOTAL - 1));
        let (_, _, tr) = boot_segments();
        assert_eq!((tr.base, u64::from(tr.limit)), (base, BOOT_TSS_TOTAL - 1));
        assert_eq!(tr.selector, boot_selector::TSS);
    }
}
