//! The control page at [`crate::layout::CONTROL_PAGE`]: how VMM and built-in guest talk through memory.
//!
//! All fields are little-endian u64 at fixed offsets. Global fields first, then one 64-byte block
//! per vCPU (a cache line each, so vCPUs do not false-share their slots).

/// "SNAPGST1": set by the VMM when it writes the parameters.
pub const MAGIC_VALUE: u64 = u64::from_le_bytes(*b"SNAPGST1");
/// Offset of the magic value.
pub const MAGIC: u64 = 0x000;
/// Timer ticks counted by the boot vCPU's interrupt handler.
pub const TICKS: u64 = 0x008;
/// Self-check request number; the VMM increments it, each vCPU acknowledges it after checking.
pub const CHECK_REQ: u64 = 0x010;
/// Spin lock serialising serial output between vCPUs (0 free, 1 held).
pub const SERIAL_LOCK: u64 = 0x018;
/// Non-zero asks the guest to power off (it writes the power-off port).
pub const POWEROFF_REQ: u64 = 0x020;
/// Tick at which the boot vCPU printed its last status line.
pub const LAST_PRINT: u64 = 0x028;
/// Parameter: seed.
pub const P_SEED: u64 = 0x040;
/// Parameter: number of vCPUs.
pub const P_VCPUS: u64 = 0x048;
/// Parameter: data pages per vCPU slice.
pub const P_SLICE: u64 = 0x050;
/// Parameter: working-set pages per vCPU.
pub const P_WS: u64 = 0x058;
/// Parameter: write mode (see `MODE_*`).
pub const P_MODE: u64 = 0x060;
/// Parameter: pages per second per vCPU (rate-limited mode).
pub const P_RATE: u64 = 0x068;
/// Parameter: timer ticks per second.
pub const P_HZ: u64 = 0x070;
/// First per-vCPU block.
pub const VCPU_BASE: u64 = 0x100;
/// Size of a per-vCPU block.
pub const VCPU_STRIDE: u64 = 0x40;
/// Per-vCPU: steps completed (the "control slot").
pub const V_SLOT: u64 = 0x00;
/// Per-vCPU: pages of its slice filled with generation-0 content.
pub const V_FILL: u64 = 0x08;
/// Per-vCPU: last self-check request handled.
pub const V_CHECK_ACK: u64 = 0x10;
/// Per-vCPU: verdict of the last self-check (see `CHECK_*`).
pub const V_CHECK_STATUS: u64 = 0x18;
/// Per-vCPU: GPA of the first bad page found by the last self-check.
pub const V_CHECK_BAD: u64 = 0x20;
/// Per-vCPU: sequence key (`pattern::vcpu_key`).
pub const V_KEY: u64 = 0x28;
/// Per-vCPU: tick at which rate limiting started.
pub const V_RATE_T0: u64 = 0x30;
/// Per-vCPU: steps done when rate limiting started.
pub const V_RATE_S0: u64 = 0x38;

/// Write mode: no writes.
pub const MODE_IDLE: u64 = 0;
/// Write mode: rate-limited.
pub const MODE_RATE: u64 = 1;
/// Write mode: as fast as possible.
pub const MODE_FULL: u64 = 2;

/// Self-check verdict: pass.
pub const CHECK_PASS: u64 = 1;
/// Self-check verdict: a page is older than a step that wrote it (stale).
pub const CHECK_STALE: u64 = 2;
/// Self-check verdict: a page carries a stamp newer than the slot.
pub const CHECK_NEWER: u64 = 3;
/// Self-check verdict: a page's content matches no write of the sequence.
pub const CHECK_GARBAGE: u64 = 4;

/// GPA of a global control field.
pub fn global(off: u64) -> u64 {
    crate::layout::CONTROL_PAGE + off
}

/// GPA of a per-vCPU control field.
pub fn vcpu(vcpu: u8, off: u64) -> u64 {
    crate::layout::CONTROL_PAGE + VCPU_BASE + u64::from(vcpu) * VCPU_STRIDE + off
}

/// I/O ports the built-in guest uses to talk to the VMM.
pub mod port {
    /// Write: power off the VM.
    pub const POWEROFF: u16 = 0x500;
    /// Write (u32): low 32 bits of the steps done; sent every 4096 steps.
    pub const PROGRESS: u16 = 0x501;
    /// Write: nothing to do right now (idle or rate-limited); the VMM sleeps briefly.
    pub const IDLE: u16 = 0x502;
    /// Write (u32): self-check verdict (see `CHECK_*`), details in the control block.
    pub const CHECK: u16 = 0x503;
    /// Write (u32): unexpected exception or interrupt vector; the stack holds the frame.
    pub const PANIC: u16 = 0x504;
    /// Write (u32): generation-0 fill of this vCPU's slice finished.
    pub const FILL_DONE: u16 = 0x505;
}
