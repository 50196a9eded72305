//! The built-in guest: a small ring-0/ring-3 program that fills its memory deterministically and
//! then keeps writing pages in a deterministic sequence (see [`pattern`]), reporting progress
//! through the control page ([`ctrl`]) and I/O ports ([`ctrl::port`]).

pub mod ctrl;
pub mod pattern;
pub mod program;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;
use crate::memory::guest_u64;
use crate::VmError;

/// How fast each vCPU writes pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum WriteRate {
    /// No writes after the generation-0 fill.
    Idle,
    /// About this many pages per second per vCPU (paced by the guest's timer ticks).
    PagesPerSec(u64),
    /// As fast as the vCPU can.
    #[default]
    Full,
}

/// Parameters of the built-in guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestParams {
    /// Write rate per vCPU.
    pub write_rate: WriteRate,
    /// Pages per vCPU the write sequence covers (default and maximum: the vCPU's whole slice).
    pub working_set_pages: Option<u64>,
    /// Seed of the write sequence.
    pub seed: u64,
}

impl Default for GuestParams {
    fn default() -> Self {
        GuestParams {
            write_rate: WriteRate::Full,
            working_set_pages: None,
            seed: 1,
        }
    }
}

/// Where each vCPU's data lives, derived from memory size, vCPU count and parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLayout {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Data pages per vCPU (its slice); data page indices `v * slice .. (v + 1) * slice`.
    pub slice_pages: u64,
    /// Pages of the slice the write sequence covers (the first `ws_pages` of it).
    pub ws_pages: u64,
    /// Seed.
    pub seed: u64,
}

impl GuestLayout {
    /// Computes the layout; fails if a vCPU would get no data page.
    pub fn new(mem_bytes: u64, vcpus: u8, params: &GuestParams) -> Result<Self, VmError> {
        if vcpus == 0 || vcpus > layout::MAX_VCPUS {
            return Err(VmError::InvalidConfig(format!(
                "{vcpus} vCPUs (must be 1..={})",
                layout::MAX_VCPUS
            )));
        }
        let slice_pages = layout::data_pages(mem_bytes) / u64::from(vcpus);
        if slice_pages == 0 {
            return Err(VmError::InvalidConfig("no data pages per vCPU".into()));
        }
        let ws_pages = params
            .working_set_pages
            .unwrap_or(slice_pages)
            .min(slice_pages);
        if ws_pages == 0 {
            return Err(VmError::InvalidConfig("working set of 0 pages".into()));
        }
        Ok(GuestLayout {
            vcpus,
            slice_pages,
            ws_pages,
            seed: params.seed,
        })
    }

    /// GPA of page `i` of `vcpu`'s slice.
    pub fn page_gpa(&self, vcpu: u8, i: u64) -> u64 {
        layout::data_page_gpa(u64::from(vcpu) * self.slice_pages + i)
    }

    /// GPA of the page step `s` of `vcpu` writes.
    pub fn step_gpa(&self, vcpu: u8, s: u64) -> u64 {
        let key = pattern::vcpu_key(self.seed, vcpu);
        self.page_gpa(vcpu, pattern::step_page(key, s, self.ws_pages))
    }
}

/// Writes the boot image: descriptor tables, page tables, code and the control page parameters.
pub fn write_boot_image(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    gl: &GuestLayout,
    params: &GuestParams,
    prog: &program::GuestProgram,
) -> Result<(), VmError> {
    crate::arch::gdt::write_tables(mem, gl.vcpus, &prog.vectors)?;
    crate::arch::paging::write_identity_map(mem, mem_bytes)?;
    mem.write_slice(&prog.code, GuestAddress(layout::CODE_START))
        .map_err(VmError::GuestMemory)?;
    mem.write_slice(&[0u8; 4096], GuestAddress(layout::CONTROL_PAGE))
        .map_err(VmError::GuestMemory)?;
    let (mode, rate) = match params.write_rate {
        WriteRate::Idle => (ctrl::MODE_IDLE, 0),
        WriteRate::PagesPerSec(r) => (ctrl::MODE_RATE, r),
        WriteRate::Full => (ctrl::MODE_FULL, 0),
    };
    let w = |gpa: u64, v: u64| {
        mem.write_obj(v, GuestAddress(gpa))
            .map_err(VmError::GuestMemory)
    };
    w(ctrl::global(ctrl::P_SEED), gl.seed)?;
    w(ctrl::global(ctrl::P_VCPUS), u64::from(gl.vcpus))?;
    w(ctrl::global(ctrl::P_SLICE), gl.slice_pages)?;
    w(ctrl::global(ctrl::P_WS), gl.ws_pages)?;
    w(ctrl::global(ctrl::P_MODE), mode)?;
    w(ctrl::global(ctrl::P_RATE), rate)?;
    w(ctrl::global(ctrl::P_HZ), program::TIMER_HZ)?;
    for v in 0..gl.vcpus {
        w(ctrl::vcpu(v, ctrl::V_KEY), pattern::vcpu_key(gl.seed, v))?;
    }
    w(ctrl::global(ctrl::MAGIC), ctrl::MAGIC_VALUE)?;
    Ok(())
}

/// Progress of the built-in guest, read from the control page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GuestProgress {
    /// Steps done per vCPU (the control slots).
    pub steps: Vec<u64>,
    /// Generation-0 pages filled per vCPU.
    pub fill_pages: Vec<u64>,
    /// True once every vCPU finished its generation-0 fill.
    pub fill_done: bool,
    /// Timer ticks counted by the guest.
    pub ticks: u64,
    /// Guest clock in seconds (ticks / timer rate).
    pub guest_seconds: f64,
    /// Progress reports (port writes every 4096 steps) received per vCPU by this VMM instance.
    pub reports: Vec<u64>,
}

/// Reads the control slots of all vCPUs.
pub fn read_slots(mem: &GuestMemoryMmap, vcpus: u8) -> Result<Vec<u64>, VmError> {
    (0..vcpus)
        .map(|v| {
            Ok(guest_u64(mem, ctrl::vcpu(v, ctrl::V_SLOT))?
                .load(std::sync::atomic::Ordering::Acquire))
        })
        .collect()
}

/// Reads progress (without the VMM-side `reports`).
pub fn read_progress(mem: &GuestMemoryMmap, gl: &GuestLayout) -> Result<GuestProgress, VmError> {
    use std::sync::atomic::Ordering::Acquire;
    let steps = read_slots(mem, gl.vcpus)?;
    let fill_pages = (0..gl.vcpus)
        .map(|v| Ok(guest_u64(mem, ctrl::vcpu(v, ctrl::V_FILL))?.load(Acquire)))
        .collect::<Result<Vec<_>, VmError>>()?;
    let ticks = guest_u64(mem, ctrl::global(ctrl::TICKS))?.load(Acquire);
    Ok(GuestProgress {
        fill_done: fill_pages.iter().all(|&f| f >= gl.slice_pages),
        steps,
        fill_pages,
        ticks,
        guest_seconds: ticks as f64 / program::TIMER_HZ as f64,
        reports: Vec::new(),
    })
}

/// Result of the guest's own self-check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfCheckVerdict {
    /// Per-vCPU verdicts.
    pub vcpus: Vec<VcpuVerdict>,
}

impl SelfCheckVerdict {
    /// True if every vCPU passed.
    pub fn passed(&self) -> bool {
        self.vcpus.iter().all(|v| v.passed)
    }
}

/// One vCPU's self-check verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuVerdict {
    /// vCPU index.
    pub vcpu: u8,
    /// True if its slice matched the sequence.
    pub passed: bool,
    /// Raw verdict code (`ctrl::CHECK_*`).
    pub code: u64,
    /// First bad page, if any.
    pub first_bad_gpa: Option<u64>,
}
