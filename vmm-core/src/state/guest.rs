//! The guest's components, exactly one per state: `builtin_guest` (the built-in guest's
//! parameters and where its vCPUs were in their write sequences) or `kernel` (the kernel a VM
//! booted; restore does not load it again, its memory holds it).

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use vm_memory::GuestMemoryMmap;

use super::codec::{BodyReader, BodyWriter};
use super::{bad, Component};
use crate::guest::{self, ctrl};
use crate::memory::guest_u64;
use crate::{GuestParams, KernelConfig, VmError, WriteRate};

/// The built-in guest: its parameters, and its control slots and tick counter at capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltinGuestState {
    /// Parameters it was booted with.
    pub params: GuestParams,
    /// Steps done per vCPU (the control slots).
    pub slots: Vec<u64>,
    /// Timer ticks it had counted.
    pub ticks: u64,
}

impl BuiltinGuestState {
    /// Reads the control slots and the tick counter of a paused built-in guest.
    pub(crate) fn capture_run(
        mem: &GuestMemoryMmap,
        vcpus: u8,
    ) -> Result<(Vec<u64>, u64), VmError> {
        Ok((
            guest::read_slots(mem, vcpus)?,
            guest_u64(mem, ctrl::global(ctrl::TICKS))?.load(Ordering::Acquire),
        ))
    }
}

/// Write-rate codes in the `builtin_guest` body.
const IDLE: u8 = 0;
const PAGES_PER_SEC: u8 = 1;
const FULL: u8 = 2;

/// Body, version 1: `write_rate` u8 (0 idle; 1 pages per second, then the rate as u64; 2 full),
/// `working_set_pages` optional u64, `seed` u64, `slots` list of u64, `ticks` u64.
impl Component for BuiltinGuestState {
    const NAME: &'static str = "builtin_guest";
    const VERSION: u32 = 1;

    fn encode(&self, w: &mut BodyWriter) {
        match self.params.write_rate {
            WriteRate::Idle => w.u8(IDLE),
            WriteRate::PagesPerSec(r) => {
                w.u8(PAGES_PER_SEC);
                w.u64(r);
            }
            WriteRate::Full => w.u8(FULL),
        }
        w.opt(self.params.working_set_pages.as_ref(), |w, p| w.u64(*p));
        w.u64(self.params.seed);
        w.list("slots", &self.slots, |w, s| w.u64(*s));
        w.u64(self.ticks);
    }

    fn decode(r: &mut BodyReader<'_>, _version: u32) -> Result<Self, VmError> {
        let write_rate = match r.u8("write_rate")? {
            IDLE => WriteRate::Idle,
            PAGES_PER_SEC => WriteRate::PagesPerSec(r.u64("write_rate")?),
            FULL => WriteRate::Full,
            c => {
                return Err(bad(
                    "write_rate",
                    None,
                    format!("code {c}, expected {IDLE}, {PAGES_PER_SEC} or {FULL}"),
                ))
            }
        };
        let working_set_pages = if r.present("working_set_pages")? {
            Some(r.u64("working_set_pages")?)
        } else {
            None
        };
        let seed = r.u64("seed")?;
        let n = r.count("slots", usize::from(crate::layout::MAX_VCPUS))?;
        let slots = (0..n).map(|_| r.u64("slots")).collect::<Result<_, _>>()?;
        let ticks = r.u64("ticks")?;
        Ok(BuiltinGuestState {
            params: GuestParams {
                write_rate,
                working_set_pages,
                seed,
            },
            slots,
            ticks,
        })
    }
}

/// Body, version 1: `kernel` path blob (its bytes: Linux paths need not be UTF-8), `initrd`
/// optional path blob, `cmdline` UTF-8 blob.
impl Component for KernelConfig {
    const NAME: &'static str = "kernel";
    const VERSION: u32 = 1;

    fn encode(&self, w: &mut BodyWriter) {
        w.blob("kernel", self.kernel.as_os_str().as_bytes());
        w.opt(self.initrd.as_ref(), |w, p| {
            w.blob("initrd", p.as_os_str().as_bytes())
        });
        w.blob("cmdline", self.cmdline.as_bytes());
    }

    fn decode(r: &mut BodyReader<'_>, _version: u32) -> Result<Self, VmError> {
        let path = |b: &[u8]| PathBuf::from(OsString::from_vec(b.to_vec()));
        let kernel = path(r.blob("kernel")?);
        let initrd = if r.present("initrd")? {
            Some(path(r.blob("initrd")?))
        } else {
            None
        };
        Ok(KernelConfig {
            kernel,
            initrd,
            cmdline: r.text("cmdline")?,
        })
    }
}
