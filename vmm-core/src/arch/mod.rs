//! x86-64 boot setup, split by concern (Firecracker-style): descriptor tables, page tables,
//! registers, CPUID, MSRs, the local APIC and (kernel VMs) the MP table and ACPI MADT.

pub mod acpi;
pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
