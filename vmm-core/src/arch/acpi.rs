//! Minimal ACPI tables for kernel VMs: RSDP → XSDT → MADT, describing one local APIC per vCPU
//! (APIC id = vCPU index), the IOAPIC, and NMI on LINT1. Kernels built without MP-table parsing
//! (e.g. Debian's cloud kernel: "Boot CPU (id 0) not listed by BIOS" with only the MP table)
//! find their CPUs here. There is no FADT/DSDT: no ACPI devices, power buttons or sleep states.
//!
//! The RSDP sits in the BIOS area the ACPI spec says to scan ([`layout::ACPI_RSDP_START`]) and
//! is also announced in `boot_params.acpi_rsdp_addr`. Each table's bytes sum to zero.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;
use crate::VmError;

const OEM_ID: &[u8; 6] = b"SNAPCT";
const OEM_TABLE_ID: &[u8; 8] = b"SNAPCTL ";
const CREATOR_ID: &[u8; 4] = b"SNAP";
const MADT_PCAT_COMPAT: u32 = 1;
const LAPIC_ENABLED: u32 = 1;

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)))
}

/// A system description table: 36-byte header with `sig` and `revision`, then `body`.
fn sdt(sig: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(sig);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// The MADT for `vcpus` CPUs.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(layout::LAPIC_BASE as u32).to_le_bytes());
    b.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for v in 0..vcpus {
        // Processor local APIC: type 0, length 8, ACPI processor id, APIC id, flags.
        b.extend_from_slice(&[0, 8, v, v]);
        b.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base 0.
    b.extend_from_slice(&[1, 12, vcpus, 0]);
    b.extend_from_slice(&(layout::IOAPIC_BASE as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    // Local APIC NMI: type 4, length 6, all processors, flags 0, LINT1.
    b.extend_from_slice(&[4, 6, 0xFF, 0, 0, 1]);
    sdt(b"APIC", 4, &b)
}

/// Writes RSDP, XSDT and MADT for `vcpus` CPUs at their [`layout`] addresses.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), VmError> {
    let madt = madt(vcpus);
    let xsdt = sdt(b"XSDT", 1, &layout::ACPI_MADT_START.to_le_bytes());
    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes, below
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+, XSDT
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&layout::ACPI_XSDT_START.to_le_bytes());
    rsdp.push(0); // extended checksum, below
    rsdp.extend_from_slice(&[0; 3]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    if layout::ACPI_XSDT_START + xsdt.len() as u64 > layout::ACPI_MADT_START
        || layout::ACPI_MADT_START + madt.len() as u64 > layout::ACPI_END
    {
        return Err(VmError::InvalidConfig(
            "ACPI tables overflow their area".into(),
        ));
    }
    for (at, t) in [
        (layout::ACPI_RSDP_START, &rsdp),
        (layout::ACPI_XSDT_START, &xsdt),
        (layout::ACPI_MADT_START, &madt),
    ] {
        mem.write_slice(t, GuestAddress(at))
            .map_err(VmError::GuestMemory)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn madt_checksums_and_lists_every_cpu() {
        let m = madt(layout::MAX_VCPUS);
        assert_eq!(&m[..4], b"APIC");
        assert_eq!(
            u32::from_le_bytes(m[4..8].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(m.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        let cpus = (0..usize::from(layout::MAX_VCPUS))
            .filter(|i| m[44 + 8 * i] == 0 && m[44 + 8 * i + 3] as usize == *i)
            .count();
        assert_eq!(cpus, usize::from(layout::MAX_VCPUS));
        assert!(layout::ACPI_MADT_START + m.len() as u64 <= layout::ACPI_END);
    }
}
