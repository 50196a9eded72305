//! Every guest-physical address the VMM and the built-in guest agree on, in one place.
//!
//! ```text
//! GPA                      what
//! 0x0000_0000              unused (null page)
//! 0x0000_1000  GDT_START   GDT: null, kernel code/data, user data/code, one 16-byte TSS descriptor per vCPU
//! 0x0000_2000  IDT_START   IDT: 256 interrupt gates (16 bytes each)
//! 0x0000_3000  TSS_START   one 512-byte TSS slot per vCPU (RSP0 = kernel stack top, I/O bitmap)
//! 0x0000_8000  CONTROL     control page shared by VMM and guest (params, ticks, per-vCPU slots)
//! 0x0001_0000  CODE_START  built-in guest code (ring-0 entry + handlers, ring-3 program), <= 64 KiB
//! 0x0002_0000  PML4_START  PML4, then PDPT at +0x1000, then one PD per GiB of guest-physical space
//! 0x0010_0000  STACKS      per vCPU: 8 KiB kernel stack, then 16 KiB user stack
//! 0x0020_0000  DATA_START  data area (written by the guest's write sequence) up to the end of RAM
//! 0xC000_0000  LOW_RAM_END RAM below 4 GiB ends here (3 GiB); 3-4 GiB stays a hole (LAPIC/IOAPIC MMIO)
//! 0x1_0000_0000 HIGH_RAM_START  RAM beyond 3 GiB continues here
//! ```
//! All guest RAM is identity mapped (virtual = physical) with 2 MiB pages marked user-accessible,
//! so ring-3 guest code can reach its data and the control page directly.
//!
//! A VM that boots a kernel ([`crate::KernelConfig`], Linux x86 64-bit boot protocol) uses the
//! same RAM regions and identity map but its own low-memory layout:
//!
//! ```text
//! GPA                        what (kernel VMs)
//! 0x0000_1000  BOOT_GDT_START   boot GDT: null, null, __BOOT_CS (0x10), __BOOT_DS (0x18), TSS (0x20)
//! 0x0000_2000  BOOT_IDT_START   boot IDT: one null gate (interrupts are off at entry)
//! 0x0000_7000  ZERO_PAGE_START  struct boot_params ("zero page"); RSI at entry; boot stack below it
//! 0x0002_0000  PML4_START       identity map, as for the built-in guest
//! 0x0008_0000  CMDLINE_START    kernel command line (NUL-terminated, < CMDLINE_MAX_SIZE)
//! 0x0009_FC00  EBDA_START       MP table (floating pointer + configuration table); e820 reserves
//!                               EBDA_START..HIMEM_START (EBDA, VGA hole, BIOS area)
//! 0x000E_0000  ACPI_RSDP_START  ACPI RSDP, then XSDT (+0x40) and MADT (+0x100), in the BIOS area
//! 0x000F_0000  BOOT_TSS_START   the TSS the boot TR points at, with an I/O permission bitmap for
//!                               the ports the VMM emulates (ring-3 port I/O on PVM hosts needs
//!                               it); e820-reserved, so the kernel never reuses it unknowingly
//! 0x0010_0000  HIMEM_START      kernel load address (bzImage code32_start; ELF: its own p_paddr)
//! top of low RAM               initrd, page-aligned, as high as the image's initrd_addr_max allows
//! ```

/// Size of a guest page as used by the built-in guest and the oracle.
pub const PAGE_SIZE: u64 = 4096;
/// Size of the huge pages used by the identity map (and the required memory-size granule).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Global descriptor table.
pub const GDT_START: u64 = 0x1000;
/// Interrupt descriptor table.
pub const IDT_START: u64 = 0x2000;
/// Number of IDT entries (all 256 vectors get a handler).
pub const IDT_ENTRIES: u64 = 256;
/// Array of per-vCPU task state segments.
pub const TSS_START: u64 = 0x3000;
/// Stride between per-vCPU TSS slots (104-byte TSS + I/O permission bitmap).
pub const TSS_STRIDE: u64 = 0x200;
/// Control page shared by the VMM and the built-in guest (see [`crate::guest::ctrl`]).
pub const CONTROL_PAGE: u64 = 0x8000;
/// Start of the built-in guest's code.
pub const CODE_START: u64 = 0x1_0000;
/// Maximum size of the built-in guest's code.
pub const CODE_MAX_SIZE: u64 = 0x1_0000;
/// Top-level page table.
pub const PML4_START: u64 = 0x2_0000;
/// Page-directory-pointer table (one, covering 512 GiB).
pub const PDPT_START: u64 = 0x2_1000;
/// First page directory; PD `i` (covering GiB `i`) is at `PD_START + i * 0x1000`.
pub const PD_START: u64 = 0x2_2000;
/// Number of page directories reserved, i.e. GiB of guest-physical space that can be mapped.
pub const PD_COUNT: u64 = 64;
/// Start of the per-vCPU stacks.
pub const STACKS_START: u64 = 0x10_0000;
/// Kernel (ring-0) stack size per vCPU.
pub const KERNEL_STACK_SIZE: u64 = 0x2000;
/// User (ring-3) stack size per vCPU.
pub const USER_STACK_SIZE: u64 = 0x4000;
/// Maximum number of vCPUs the layout has room for (TSS slots, stacks, control slots).
pub const MAX_VCPUS: u8 = 32;
/// Start of the data area (first 2 MiB are system area).
pub const DATA_START: u64 = 0x20_0000;
/// End of RAM below 4 GiB; the region at GPA 0 is at most this long.
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// Start of the RAM region that holds memory beyond `LOW_RAM_END`.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Smallest guest memory accepted (system area + at least one data huge page).
pub const MIN_MEM_BYTES: u64 = 4 << 20;
/// Largest guest memory accepted: whatever the reserved page directories can map.
pub const MAX_MEM_BYTES: u64 = PD_COUNT * (1 << 30) - (HIGH_RAM_START - LOW_RAM_END);

/// Kernel VMs: boot GDT (Linux wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18, flat 4 GiB).
pub const BOOT_GDT_START: u64 = 0x1000;
/// Kernel VMs: boot IDT (a single null gate; the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x2000;
/// Kernel VMs: TSS referenced by the boot TR, followed by its I/O permission bitmap (see
/// [`crate::arch::gdt::write_boot_tables`]). Inside the e820-reserved legacy area, above the ACPI
/// tables; no signature a kernel scans this area for (`_MP_`, `_SM_`, `RSD PTR `) can appear in it.
pub const BOOT_TSS_START: u64 = 0xF_0000;
/// Kernel VMs: room for the boot TSS and its I/O bitmap.
pub const BOOT_TSS_MAX_SIZE: u64 = 0x1000;
/// Kernel VMs: boot stack top (RSP at entry; the boot protocol requires none, it is a courtesy).
pub const BOOT_STACK_TOP: u64 = 0x7000;
/// Kernel VMs: `struct boot_params` (4 KiB), passed in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Kernel VMs: kernel command line.
pub const CMDLINE_START: u64 = 0x8_0000;
/// Kernel VMs: room for the command line including its NUL (the image's `cmdline_size` may be lower).
pub const CMDLINE_MAX_SIZE: u64 = 0x1_0000;
/// Kernel VMs: start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9_FC00;
/// Kernel VMs: the MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// Kernel VMs: room for the MP table (the EBDA's first KiB).
pub const MPTABLE_MAX_SIZE: u64 = 0x400;
/// Kernel VMs: ACPI RSDP (16-byte aligned, inside the 0xE0000-0xFFFFF range scanned for it).
pub const ACPI_RSDP_START: u64 = 0xE_0000;
/// Kernel VMs: ACPI XSDT.
pub const ACPI_XSDT_START: u64 = 0xE_0040;
/// Kernel VMs: ACPI MADT.
pub const ACPI_MADT_START: u64 = 0xE_0100;
/// Kernel VMs: end of the ACPI table area.
pub const ACPI_END: u64 = 0xF_0000;
/// Kernel VMs: first byte above the legacy hole; bzImage kernels are loaded here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Kernel VMs: entry offset of the 64-bit boot protocol inside a bzImage's protected-mode code.
pub const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// Local APIC MMIO base (what the MP table announces).
pub const LAPIC_BASE: u64 = 0xFEE0_0000;
/// IOAPIC MMIO base (what the MP table announces; KVM's in-kernel IOAPIC default).
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// Kernel VMs: the e820 map for `mem_bytes` of RAM, `(addr, size, type)`.
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut v = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (gpa, len) in ram_regions(mem_bytes) {
        let start = gpa.max(HIMEM_START);
        if gpa + len > start {
            v.push((start, gpa + len - start, E820_RAM));
        }
    }
    v
}

/// Kernel VMs: page-aligned start of an initrd of `size` bytes placed as high as possible in low
/// RAM with its last byte at or below `addr_max` (the image's `initrd_addr_max`); None if it
/// cannot sit at or above `lowest`.
pub fn initrd_start(mem_bytes: u64, size: u64, addr_max: u64, lowest: u64) -> Option<u64> {
    let top = mem_bytes.min(LOW_RAM_END).min(addr_max.saturating_add(1));
    let start = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= lowest).then_some(start)
}

/// GDT selectors.
pub mod selector {
    /// Ring-0 64-bit code.
    pub const KERNEL_CODE: u16 = 0x08;
    /// Ring-0 data.
    pub const KERNEL_DATA: u16 = 0x10;
    /// Ring-3 data (RPL 3 added when loaded).
    pub const USER_DATA: u16 = 0x18;
    /// Ring-3 64-bit code (RPL 3 added when loaded).
    pub const USER_CODE: u16 = 0x20;
    /// TSS descriptor of vCPU 0; vCPU `i` uses `TSS_BASE + 16 * i`.
    pub const TSS_BASE: u16 = 0x28;
}

/// Kernel VMs: boot GDT selectors (the values the Linux boot protocol names).
pub mod boot_selector {
    /// __BOOT_CS: flat 64-bit ring-0 code.
    pub const CODE: u16 = 0x10;
    /// __BOOT_DS: flat ring-0 data.
    pub const DATA: u16 = 0x18;
    /// The boot TSS.
    pub const TSS: u16 = 0x20;
}

/// Kernel stack top of `vcpu` (RSP at entry, and RSP0 in its TSS).
pub fn kernel_stack_top(vcpu: u8) -> u64 {
    STACKS_START + u64::from(vcpu) * (KERNEL_STACK_SIZE + USER_STACK_SIZE) + KERNEL_STACK_SIZE
}

/// User stack top of `vcpu`.
pub fn user_stack_top(vcpu: u8) -> u64 {
    kernel_stack_top(vcpu) + USER_STACK_SIZE
}

/// TSS address of `vcpu`.
pub fn tss_addr(vcpu: u8) -> u64 {
    TSS_START + u64::from(vcpu) * TSS_STRIDE
}

/// TSS selector of `vcpu`.
pub fn tss_selector(vcpu: u8) -> u16 {
    selector::TSS_BASE + 16 * u16::from(vcpu)
}

/// Guest RAM regions for `mem_bytes` of RAM: `(gpa, len)`; one below 3 GiB, the rest above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(LOW_RAM_END);
    let mut v = vec![(0, low)];
    if mem_bytes > low {
        v.push((HIGH_RAM_START, mem_bytes - low));
    }
    v
}

/// One past the highest guest-physical RAM address.
pub fn ram_end(mem_bytes: u64) -> u64 {
    ram_regions(mem_bytes)
        .last()
        .map(|&(gpa, len)| gpa + len)
        .unwrap_or(0)
}

/// Guest-physical address of data-area page `index` (indices skip the 3-4 GiB hole).
pub fn data_page_gpa(index: u64) -> u64 {
    let gpa = DATA_START + index * PAGE_SIZE;
    if gpa >= LOW_RAM_END {
        gpa + (HIGH_RAM_START - LOW_RAM_END)
    } else {
        gpa
    }
}

/// Number of data-area pages for `mem_bytes` of RAM.
pub fn data_pages(mem_bytes: u64) -> u64 {
    mem_bytes.saturating_sub(DATA_START) / PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_area_fits_below_data() {
        assert!(kernel_stack_top(MAX_VCPUS - 1) + USER_STACK_SIZE <= DATA_START);
        assert!(tss_addr(MAX_VCPUS) <= CONTROL_PAGE);
        assert!(u64::from(tss_selector(MAX_VCPUS)) <= 0x1000);
        const { assert!(CODE_START + CODE_MAX_SIZE <= PML4_START) };
        const { assert!(PD_START + PD_COUNT * 0x1000 <= STACKS_START) };
    }

    #[test]
    fn kernel_layout_fits_below_the_ebda() {
        const { assert!(BOOT_IDT_START + 0x1000 <= BOOT_STACK_TOP - 0x1000) };
        const { assert!(ZERO_PAGE_START + 0x1000 <= PML4_START) };
        const { assert!(PD_START + PD_COUNT * 0x1000 <= CMDLINE_START) };
        const { assert!(CMDLINE_START + CMDLINE_MAX_SIZE <= EBDA_START) };
        const { assert!(MPTABLE_START + MPTABLE_MAX_SIZE <= 0xA_0000) };
        const { assert!(ACPI_RSDP_START + 36 <= ACPI_XSDT_START) };
        const { assert!(ACPI_XSDT_START < ACPI_MADT_START && ACPI_END <= BOOT_TSS_START) };
        const { assert!(BOOT_TSS_START + BOOT_TSS_MAX_SIZE <= HIMEM_START) };
        let m = e820_map(64 << 20);
        assert_eq!(
            m,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM),
            ]
        );
        // The boot TSS lies in reserved memory, whatever the RAM size.
        for mem in [MIN_MEM_BYTES, 64 << 20, 4 << 30] {
            assert!(
                e820_map(mem).iter().any(|&(a, s, t)| t == E820_RESERVED
                    && a <= BOOT_TSS_START
                    && BOOT_TSS_START + BOOT_TSS_MAX_SIZE <= a + s),
                "{mem}"
            );
        }
        assert_eq!(
            e820_map(4 << 30).last(),
            Some(&(4 << 30, 1 << 30, E820_RAM))
        );
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let mem = 64 << 20;
        assert_eq!(initrd_start(mem, 0x1800, u64::MAX, 0), Some(mem - 0x2000));
        assert_eq!(initrd_start(mem, 0x1000, 0x1FF_FFFF, 0), Some(0x1FF_F000));
        assert_eq!(initrd_start(mem, mem, u64::MAX, HIMEM_START), None);
        assert_eq!(
            initrd_start(8 << 30, 4096, 0x7FFF_FFFF, 0),
            Some(0x7FFF_F000)
        );
    }

    #[test]
    fn data_pages_skip_the_hole() {
        let last_low = (LOW_RAM_END - DATA_START) / PAGE_SIZE - 1;
        assert_eq!(data_page_gpa(last_low), LOW_RAM_END - PAGE_SIZE);
        assert_eq!(data_page_gpa(last_low + 1), HIGH_RAM_START);
        assert_eq!(ram_regions(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(ram_end(4 << 30), 5 << 30);
        assert_eq!(data_pages(4 << 30), ((4 << 30) - DATA_START) / PAGE_SIZE);
    }
}
