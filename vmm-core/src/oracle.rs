//! The host-side oracle: does guest memory hold exactly what the built-in guest's write sequence
//! says, given each vCPU's control slot?
//!
//! For every vCPU with slot `S`, the sequence is replayed for steps `1..=S` to find the last stamp
//! of every working-set page (pages never written keep the generation-0 fill, stamp 0). Every page
//! of the slice must then hold exactly that stamp's content. Exactly one write may be in flight per
//! vCPU: page `f(S + 1)` may hold the old content, the new one (stamp `S + 1`) or a per-qword mix.
//! If the generation-0 fill was still running, pages before the fill cursor must be filled, the
//! page at the cursor may be in flight, and later pages are not checked.
//!
//! The memory must not change during the check (pause the VM, or check a restored image).

use std::fmt;

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::guest::pattern::{self, WORDS};
use crate::guest::{ctrl, GuestLayout};
use crate::memory::{guest_u64, read_page};
use crate::{VmConfig, VmError};

/// Summary of a passing check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OracleReport {
    /// Per-vCPU details.
    pub vcpus: Vec<VcpuOracle>,
    /// Pages verified in total.
    pub pages_checked: u64,
}

/// What the oracle found for one vCPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuOracle {
    /// vCPU index.
    pub vcpu: u8,
    /// Its control slot (steps done).
    pub slot: u64,
    /// Generation-0 pages filled.
    pub fill_pages: u64,
    /// Pages verified.
    pub pages_checked: u64,
    /// Distinct pages written by steps `1..=slot`.
    pub pages_written: u64,
    /// State of the one page allowed to be in flight.
    pub in_flight: InFlight,
}

/// State of the page a vCPU may have been writing at the freeze instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InFlight {
    /// The page still held its previous content.
    Old,
    /// The page already held the next step's content.
    New,
    /// The page held a mix of both.
    Mixed,
}

/// Why a page is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MismatchKind {
    /// Consistent content with a stamp newer than the vCPU's slot: saved after the guest changed it.
    Newer,
    /// Consistent content with a stamp older than the page's last write: stale.
    Stale,
    /// Content that no write of the sequence produces (torn, zero, or foreign).
    Garbage,
    /// The control slot in memory differs from the expected one.
    SlotMismatch,
    /// The control page does not carry this configuration's parameters.
    ControlPage,
}

/// The first inconsistency found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OracleMismatch {
    /// Classification.
    pub kind: MismatchKind,
    /// vCPU whose slice holds the page (or whose slot differs).
    pub vcpu: u8,
    /// GPA of the bad page (0 for slot or control-page mismatches).
    pub gpa: u64,
    /// Stamp the page should carry (for `SlotMismatch`: the expected slot).
    pub expected_stamp: u64,
    /// First qword found in the page (for `SlotMismatch`: the slot in memory).
    pub found_stamp: u64,
    /// The vCPU's slot.
    pub slot: u64,
    /// Free-form detail.
    pub detail: String,
}

impl fmt::Display for OracleMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}: vCPU {} page {:#x}: expected stamp {}, found {} (slot {}){}{}",
            self.kind,
            self.vcpu,
            self.gpa,
            self.expected_stamp,
            self.found_stamp,
            self.slot,
            if self.detail.is_empty() { "" } else { ": " },
            self.detail
        )
    }
}

impl std::error::Error for OracleMismatch {}

impl From<VmError> for OracleMismatch {
    fn from(e: VmError) -> Self {
        OracleMismatch {
            kind: MismatchKind::ControlPage,
            vcpu: 0,
            gpa: 0,
            expected_stamp: 0,
            found_stamp: 0,
            slot: 0,
            detail: format!("memory access failed: {e}"),
        }
    }
}

fn load(mem: &GuestMemoryMmap, gpa: u64) -> Result<u64, OracleMismatch> {
    Ok(guest_u64(mem, gpa)?.load(std::sync::atomic::Ordering::Acquire))
}

fn check_control_page(mem: &GuestMemoryMmap, gl: &GuestLayout) -> Result<(), OracleMismatch> {
    let want = [
        (ctrl::MAGIC, ctrl::MAGIC_VALUE, "magic"),
        (ctrl::P_SEED, gl.seed, "seed"),
        (ctrl::P_VCPUS, u64::from(gl.vcpus), "vcpus"),
        (ctrl::P_SLICE, gl.slice_pages, "slice pages"),
        (ctrl::P_WS, gl.ws_pages, "working-set pages"),
    ];
    for (off, v, what) in want {
        let got = load(mem, ctrl::global(off))?;
        if got != v {
            return Err(OracleMismatch {
                kind: MismatchKind::ControlPage,
                vcpu: 0,
                gpa: ctrl::global(off),
                expected_stamp: v,
                found_stamp: got,
                slot: 0,
                detail: format!("control page {what} is {got:#x}, configuration says {v:#x}"),
            });
        }
    }
    Ok(())
}

/// Checks `mem` against the write sequence of `cfg`'s built-in guest; see the module docs.
pub fn check(
    mem: &GuestMemoryMmap,
    cfg: &VmConfig,
    expected_slots: Option<&[u64]>,
) -> Result<OracleReport, OracleMismatch> {
    if !cfg.is_builtin_guest() {
        return Err(OracleMismatch::from(VmError::NotBuiltinGuest));
    }
    let gl = GuestLayout::new(cfg.mem_bytes, cfg.vcpus, &cfg.guest)?;
    check_control_page(mem, &gl)?;
    let results: Vec<Result<VcpuOracle, OracleMismatch>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..gl.vcpus)
            .map(|v| {
                let exp = expected_slots.and_then(|e| e.get(usize::from(v)).copied());
                let gl = &gl;
                sc.spawn(move || check_vcpu(mem, gl, v, exp))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(OracleMismatch::from(VmError::StateInvalid(
                        "oracle thread panicked".into(),
                    )))
                })
            })
            .collect()
    });
    let mut vcpus = Vec::new();
    for r in results {
        vcpus.push(r?);
    }
    Ok(OracleReport {
        pages_checked: vcpus.iter().map(|v| v.pages_checked).sum(),
        vcpus,
    })
}

fn check_vcpu(
    mem: &GuestMemoryMmap,
    gl: &GuestLayout,
    v: u8,
    expected_slot: Option<u64>,
) -> Result<VcpuOracle, OracleMismatch> {
    let slot = load(mem, ctrl::vcpu(v, ctrl::V_SLOT))?;
    let fill = load(mem, ctrl::vcpu(v, ctrl::V_FILL))?.min(gl.slice_pages);
    let mism = |kind, gpa, expected_stamp, found_stamp, detail: String| OracleMismatch {
        kind,
        vcpu: v,
        gpa,
        expected_stamp,
        found_stamp,
        slot,
        detail,
    };
    if let Some(e) = expected_slot {
        if e != slot {
            return Err(mism(
                MismatchKind::SlotMismatch,
                0,
                e,
                slot,
                "control slot in memory differs from the expected one".into(),
            ));
        }
    }
    let fill_done = fill >= gl.slice_pages;
    if !fill_done && slot != 0 {
        return Err(mism(
            MismatchKind::Garbage,
            0,
            0,
            slot,
            format!("slot is {slot} but the fill stopped at page {fill}"),
        ));
    }
    // Last stamp of every working-set page after steps 1..=slot.
    let key = pattern::vcpu_key(gl.seed, v);
    let mut last = vec![0u64; usize::try_from(gl.ws_pages).unwrap_or(usize::MAX)];
    for s in 1..=slot {
        last[pattern::step_page(key, s, gl.ws_pages) as usize] = s;
    }
    let pages_written = last.iter().filter(|&&s| s != 0).count() as u64;
    let in_flight_idx = if fill_done {
        pattern::step_page(key, slot + 1, gl.ws_pages)
    } else {
        fill
    };
    let in_flight_stamp = if fill_done { slot + 1 } else { 0 };
    let mut in_flight = InFlight::Old;
    let checked_pages = if fill_done { gl.slice_pages } else { fill + 1 }.min(gl.slice_pages);
    let mut page = [0u64; WORDS];
    let mut expect = [0u64; WORDS];
    for i in 0..checked_pages {
        let gpa = gl.page_gpa(v, i);
        read_page(mem, gpa, &mut page)?;
        let exp = if i < gl.ws_pages { last[i as usize] } else { 0 };
        let is_in_flight = i == in_flight_idx;
        if is_in_flight && !fill_done {
            // The fill cursor page: previous content is unknown (zero for fresh memory), so it may
            // hold anything except a wrong *stamped* page; accept it as in flight.
            in_flight = if pattern::page_matches(0, gpa, &page) {
                InFlight::New
            } else {
                InFlight::Mixed
            };
            continue;
        }
        if pattern::page_matches(exp, gpa, &page) {
            continue;
        }
        if is_in_flight {
            if pattern::page_matches(in_flight_stamp, gpa, &page) {
                in_flight = InFlight::New;
                continue;
            }
            pattern::page_content(exp, gpa, &mut expect);
            let mut new = [0u64; WORDS];
            pattern::page_content(in_flight_stamp, gpa, &mut new);
            if page
                .iter()
                .zip(expect.iter().zip(new.iter()))
                .all(|(p, (o, n))| p == o || p == n)
            {
                in_flight = InFlight::Mixed;
                continue;
            }
        }
        let t = page[0];
        let consistent = pattern::page_matches(t, gpa, &page);
        let (kind, why) = if consistent && t > slot {
            (
                MismatchKind::Newer,
                "stamp newer than the slot: saved after the guest changed it",
            )
        } else if consistent && t < exp {
            (
                MismatchKind::Stale,
                "stamp older than the page's last write: stale",
            )
        } else if consistent {
            (
                MismatchKind::Garbage,
                "stamp of a step that did not write this page as its last write",
            )
        } else {
            (
                MismatchKind::Garbage,
                "content matches no write of the sequence",
            )
        };
        return Err(mism(kind, gpa, exp, t, why.into()));
    }
    Ok(VcpuOracle {
        vcpu: v,
        slot,
        fill_pages: fill,
        pages_checked: checked_pages,
        pages_written,
        in_flight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::program;
    use crate::memory::{create_guest_memory, write_page};
    use crate::{GuestParams, MemBackend, WriteRate};
    use vm_memory::{Bytes, GuestAddress};

    /// Plays the guest on the host: boot image, fill, `steps[v]` steps per vCPU.
    fn simulate(cfg: &VmConfig, steps: &[u64]) -> GuestMemoryMmap {
        let mem = create_guest_memory(cfg.mem_bytes, MemBackend::Anon).unwrap();
        let gl = GuestLayout::new(cfg.mem_bytes, cfg.vcpus, &cfg.guest).unwrap();
        let prog = program::assemble().unwrap();
        crate::guest::write_boot_image(&mem, cfg.mem_bytes, &gl, &cfg.guest, &prog).unwrap();
        let mut p = [0u64; WORDS];
        for v in 0..cfg.vcpus {
            for i in 0..gl.slice_pages {
                pattern::page_content(0, gl.page_gpa(v, i), &mut p);
                write_page(&mem, gl.page_gpa(v, i), &p).unwrap();
            }
            for s in 1..=steps[usize::from(v)] {
                let gpa = gl.step_gpa(v, s);
                pattern::page_content(s, gpa, &mut p);
                write_page(&mem, gpa, &p).unwrap();
            }
            let w = |off, val: u64| {
                mem.write_obj(val, GuestAddress(ctrl::vcpu(v, off)))
                    .unwrap()
            };
            w(ctrl::V_FILL, gl.slice_pages);
            w(ctrl::V_SLOT, steps[usize::from(v)]);
        }
        mem
    }

    fn cfg() -> VmConfig {
        VmConfig {
            mem_bytes: 8 << 20,
            vcpus: 2,
            backend: MemBackend::Anon,
            guest: GuestParams {
                write_rate: WriteRate::Full,
                working_set_pages: Some(100),
                seed: 3,
            },
            kernel: None,
        }
    }

    #[test]
    fn passes_on_a_faithful_replay_and_allows_one_write_in_flight() {
        let cfg = cfg();
        let mem = simulate(&cfg, &[500, 77]);
        let r = check(&mem, &cfg, Some(&[500, 77])).unwrap();
        assert_eq!(r.vcpus[0].slot, 500);
        // Half of step 501 done: the in-flight page is mixed.
        let gl = GuestLayout::new(cfg.mem_bytes, 2, &cfg.guest).unwrap();
        let gpa = gl.step_gpa(0, 501);
        let mut new = [0u64; WORDS];
        pattern::page_content(501, gpa, &mut new);
        let mut page = [0u64; WORDS];
        read_page(&mem, gpa, &mut page).unwrap();
        page[..256].copy_from_slice(&new[..256]);
        write_page(&mem, gpa, &page).unwrap();
        let r = check(&mem, &cfg, None).unwrap();
        assert_eq!(r.vcpus[0].in_flight, InFlight::Mixed);
    }

    #[test]
    fn names_newer_stale_and_garbage_pages() {
        let cfg = cfg();
        let gl = GuestLayout::new(cfg.mem_bytes, 2, &cfg.guest).unwrap();
        let mem = simulate(&cfg, &[500, 77]);
        let in_flight = gl.step_gpa(1, 78);
        let s = (1..=77)
            .rev()
            .find(|&s| gl.step_gpa(1, s) != in_flight)
            .unwrap();
        let gpa = gl.step_gpa(1, s);
        let mut p = [0u64; WORDS];
        pattern::page_content(90, gpa, &mut p);
        write_page(&mem, gpa, &p).unwrap();
        let e = check(&mem, &cfg, None).unwrap_err();
        assert_eq!(
            (e.kind, e.vcpu, e.gpa, e.found_stamp),
            (MismatchKind::Newer, 1, gpa, 90)
        );
        pattern::page_content(0, gpa, &mut p);
        write_page(&mem, gpa, &p).unwrap();
        assert_eq!(
            check(&mem, &cfg, None).unwrap_err().kind,
            MismatchKind::Stale
        );
        write_page(&mem, gpa, &[0u64; WORDS]).unwrap();
        assert_eq!(
            check(&mem, &cfg, None).unwrap_err().kind,
            MismatchKind::Garbage
        );
    }
}
