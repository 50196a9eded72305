//! Intel MultiProcessor Specification 1.4 table for kernel VMs, so a guest kernel learns how many
//! CPUs there are and where the IOAPIC is without ACPI.
//!
//! Layout at [`layout::MPTABLE_START`] (inside the EBDA, where Linux looks for it): the 16-byte
//! floating pointer ("_MP_"), then the configuration table ("PCMP") with one processor entry per
//! vCPU (APIC id = vCPU index, vCPU 0 the bootstrap processor), one ISA bus, the IOAPIC (id =
//! vCPU count), one I/O interrupt entry per IOAPIC pin (ISA IRQ n → pin n, as KVM's default GSI
//! routing wires them), and the local interrupts (ExtINT → LINT0, NMI → LINT1). Every structure's
//! bytes sum to zero.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;
use crate::VmError;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_PINS: u8 = 24;
/// CPU signature in processor entries (family 6), as other VMMs announce it.
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags in processor entries: FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)))
}

/// The MP table bytes for `vcpus` CPUs, to be placed at [`layout::MPTABLE_START`].
pub fn build(vcpus: u8) -> Result<Vec<u8>, VmError> {
    let table_addr = layout::MPTABLE_START + 16;
    let ioapic_id = vcpus;
    // Configuration table entries.
    let mut entries = Vec::new();
    for v in 0..vcpus {
        entries.extend_from_slice(&[ENTRY_PROCESSOR, v, APIC_VERSION]);
        // CPU flags: enabled, plus bootstrap processor for vCPU 0.
        entries.push(if v == 0 { 0b11 } else { 0b01 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_BASE as u32).to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // Type, interrupt type, flags (conforming polarity/trigger), source bus, source IRQ,
        // destination IOAPIC, destination pin.
        entries.extend_from_slice(&[ENTRY_IOINT, INT_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
    }
    // ExtINT on LINT0 of the bootstrap processor, NMI on LINT1 of every CPU (0xFF = all).
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINT, INT_TYPE_NMI, 0, 0, 0, 0, 0xFF, 1]);
    let entry_count = u16::from(vcpus) + 2 + u16::from(IOAPIC_PINS) + 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    let len = u16::try_from(44 + entries.len())
        .map_err(|_| VmError::InvalidConfig("MP table too large".into()))?;
    table.extend_from_slice(&len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"SNAPCTL ");
    table.extend_from_slice(b"KVM-VM      ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(layout::LAPIC_BASE as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4); // spec revision 1.4
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    if out.len() as u64 > layout::MPTABLE_MAX_SIZE {
        return Err(VmError::InvalidConfig(format!(
            "MP table for {vcpus} vCPUs needs {} bytes, more than the {} reserved",
            out.len(),
            layout::MPTABLE_MAX_SIZE
        )));
    }
    Ok(out)
}

/// Writes the MP table for `vcpus` CPUs to guest memory.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), VmError> {
    let t = build(vcpus)?;
    mem.write_slice(&t, GuestAddress(layout::MPTABLE_START))
        .map_err(VmError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn checksums_and_cpu_entries() {
        let t = build(layout::MAX_VCPUS).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        let off = (ptr - layout::MPTABLE_START) as usize;
        assert_eq!(&t[off..off + 4], b"PCMP");
        let len = u16::from_le_bytes([t[off + 4], t[off + 5]]) as usize;
        assert_eq!(off + len, t.len());
        assert_eq!(sum(&t[off..off + len]), 0);
        let cpus = (0..)
            .map(|i| off + 44 + 20 * i)
            .take_while(|&p| t[p] == ENTRY_PROCESSOR)
            .count();
        assert_eq!(cpus, usize::from(layout::MAX_VCPUS));
        assert_eq!(t[off + 44 + 3], 0b11, "vCPU 0 is the BSP");
    }
}
