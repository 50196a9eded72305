//! x86-64 boot setup, split by concern (Firecracker-style): descriptor tables, page tables,
//! registers, CPUID, MSRs and the local APIC.

pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod msr;
pub mod paging;
pub mod regs;
