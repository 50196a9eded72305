//! Identity page tables over guest-physical space with 2 MiB pages, user-accessible.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;
use crate::VmError;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;

/// GiB of guest-physical space mapped for `mem_bytes` of RAM (always the first 4 GiB, so the
/// 3-4 GiB MMIO window is reachable, plus whatever RAM lies above).
pub fn mapped_gib(mem_bytes: u64) -> u64 {
    layout::ram_end(mem_bytes)
        .max(layout::HIGH_RAM_START)
        .div_ceil(1 << 30)
}

/// Writes PML4, PDPT and page directories mapping VA == PA.
pub fn write_identity_map(mem: &GuestMemoryMmap, mem_bytes: u64) -> Result<(), VmError> {
    let gib = mapped_gib(mem_bytes);
    if gib > layout::PD_COUNT {
        return Err(VmError::InvalidConfig(format!(
            "{gib} GiB of guest-physical space exceed the {} page directories reserved",
            layout::PD_COUNT
        )));
    }
    let w = |gpa: u64, v: u64| {
        mem.write_obj(v, GuestAddress(gpa))
            .map_err(VmError::GuestMemory)
    };
    w(
        layout::PML4_START,
        layout::PDPT_START | PRESENT | WRITABLE | USER,
    )?;
    for g in 0..gib {
        let pd = layout::PD_START + g * 0x1000;
        w(layout::PDPT_START + g * 8, pd | PRESENT | WRITABLE | USER)?;
        for e in 0..512u64 {
            let pa = (g << 30) | (e << 21);
            w(pd + e * 8, pa | PRESENT | WRITABLE | USER | HUGE)?;
        }
    }
    Ok(())
}
