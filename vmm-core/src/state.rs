//! Machine state captured at a pause: vCPUs, irqchip, PIT, kvmclock, serial and the guest's
//! parameters. A plain serde value (no pointers, no fds).
//!
//! # vCPU save order (and why)
//! 1. MP_STATE first: KVM_GET_MP_STATE processes pending INIT/SIPI events, which can change the
//!    other registers.
//! 2. REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS, CPUID.
//! 3. VCPU_EVENTS last: reading the other state may queue or complete events; the last read sees
//!    the final pending exception/interrupt/NMI state.
//!
//! # vCPU restore order (and why)
//! CPUID → MP_STATE → REGS → SREGS → XSAVE → XCRS → DEBUGREGS → LAPIC → MSRS → VCPU_EVENTS.
//! CPUID first because KVM validates later state (XSAVE features, MSRs) against it; SREGS before
//! XSAVE/XCRS because CR4.OSXSAVE gates XCR0; LAPIC before MSRS because MSRs such as
//! TSC_DEADLINE and APIC_BASE interact with the LAPIC mode; VCPU_EVENTS last so nothing after it
//! clears the pending events it injects.
//!
//! VM-wide state is restored after the vCPUs exist: PIC master, PIC slave, IOAPIC, PIT, then the
//! kvmclock (last, so the guest clock resumes from the captured value as close to the restart as
//! possible; the flags are cleared because KVM only accepts a subset of what it reports).
//!
//! MSRs: the list KVM reports via KVM_GET_MSR_INDEX_LIST, filtered at boot to those that can be
//! read and written back (see [`crate::arch::msr`]). FPU state travels in the XSAVE area
//! (KVM_GET_XSAVE, 4096 bytes; a larger XSAVE2 area is refused with `VmError::XsaveTooLarge`).
//!
//! # Decoding is exact
//! kvm-bindings' serde for its structs zero-fills a short byte array and accepts it, so a damaged
//! state (`sregs` of 7 bytes) would restore as zeros and run. [`MachineState::from_bytes`]
//! therefore decodes every KVM struct from its bytes itself: each must be exactly
//! `size_of` the struct, and [`MachineState::validate`] checks counts and ids (one state per
//! configured vCPU, ids `0..vcpus` in order, CPUID non-empty and at most
//! `KVM_MAX_CPUID_ENTRIES`, at most [`MAX_STATE_MSRS`] MSRs, XCR count, irqchip ids, serial
//! FIFO, guest slots). A refusal is a [`VmError::StateComponent`] naming the component, before
//! any VM or vCPU exists.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_XCRS,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::serial::SerialSnapshot;
use crate::{VmConfig, VmError};

/// Version of the [`MachineState`] encoding.
pub const STATE_FORMAT_VERSION: u32 = 1;

/// Most MSRs one vCPU state may carry (KVM's save list has a few hundred at most).
pub const MAX_STATE_MSRS: usize = 1024;

/// Bytes of the UART receive FIFO (vm-superio's `FIFO_SIZE`, which it does not export).
const SERIAL_FIFO_BYTES: usize = 64;

/// State of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (= APIC id).
    pub id: u8,
    /// CPUID table set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// XSAVE area (FPU, SSE, AVX ...).
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        // kvm_xsave ends in a flexible array member and is not Clone; the fixed region is all
        // KVM_GET_XSAVE fills.
        let mut xsave = kvm_xsave::default();
        xsave.region = self.xsave.region;
        VcpuState {
            id: self.id,
            cpuid: self.cpuid.clone(),
            mp_state: self.mp_state,
            regs: self.regs,
            sregs: self.sregs,
            xsave,
            xcrs: self.xcrs,
            debugregs: self.debugregs,
            lapic: self.lapic,
            msrs: self.msrs.clone(),
            events: self.events,
        }
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .field("cpuid_entries", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

/// Everything needed to rebuild the machine around its memory.
#[derive(Clone, Serialize, Deserialize)]
pub struct MachineState {
    /// Encoding version ([`STATE_FORMAT_VERSION`]).
    pub version: u32,
    /// The VM configuration (memory size, vCPUs, backend, built-in guest parameters).
    pub config: VmConfig,
    /// Per-vCPU state, by index.
    pub vcpus: Vec<VcpuState>,
    /// Master PIC.
    pub pic_master: kvm_irqchip,
    /// Slave PIC.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT (KVM_GET_PIT2).
    pub pit: kvm_pit_state2,
    /// kvmclock (KVM_GET_CLOCK).
    pub clock: kvm_clock_data,
    /// COM1 UART.
    pub serial: SerialSnapshot,
    /// The built-in guest's control slots at capture (steps done per vCPU).
    pub slots: Vec<u64>,
    /// The built-in guest's tick counter at capture.
    pub ticks: u64,
    /// Host quirks noted when the state was captured (e.g. dropped MSRs).
    pub notes: Vec<String>,
}

impl std::fmt::Debug for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineState")
            .field("version", &self.version)
            .field("config", &self.config)
            .field("vcpus", &self.vcpus)
            .field("slots", &self.slots)
            .field("ticks", &self.ticks)
            .field("notes", &self.notes)
            .finish_non_exhaustive()
    }
}

impl MachineState {
    /// Serialises to bytes (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses bytes produced by [`MachineState::to_bytes`]: every KVM struct must have exactly
    /// its size, and the result must pass [`MachineState::validate`].
    pub fn from_bytes(b: &[u8]) -> Result<Self, VmError> {
        let raw: RawState = serde_json::from_slice(b).map_err(VmError::StateDecode)?;
        if raw.version != STATE_FORMAT_VERSION {
            return Err(VmError::StateVersion {
                found: raw.version,
                expected: STATE_FORMAT_VERSION,
            });
        }
        let s = raw.decode()?;
        s.validate()?;
        Ok(s)
    }

    /// The configuration of the VM the state came from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The built-in guest's control slots read at capture.
    pub fn guest_slots(&self) -> Vec<u64> {
        self.slots.clone()
    }

    /// Checks counts and ids against the configuration and KVM's limits (see the module docs).
    pub fn validate(&self) -> Result<(), VmError> {
        let c = &self.config;
        if !(1..=crate::layout::MAX_VCPUS).contains(&c.vcpus) {
            return Err(bad(
                "config",
                None,
                format!(
                    "{} vCPUs, expected 1..={}",
                    c.vcpus,
                    crate::layout::MAX_VCPUS
                ),
            ));
        }
        crate::memory::validate_mem_size(c.mem_bytes)
            .map_err(|e| bad("config", None, e.to_string()))?;
        if self.vcpus.len() != usize::from(c.vcpus) {
            return Err(bad(
                "vcpus",
                None,
                format!("{} vCPU states for {} vCPUs", self.vcpus.len(), c.vcpus),
            ));
        }
        let mut seen = [false; 256];
        for (i, v) in self.vcpus.iter().enumerate() {
            check_id(i, u64::from(v.id), c.vcpus, &mut seen)?;
            if v.cpuid.is_empty() || v.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
                return Err(bad(
                    "cpuid",
                    Some(i),
                    format!(
                        "{} entries, expected 1..={KVM_MAX_CPUID_ENTRIES}",
                        v.cpuid.len()
                    ),
                ));
            }
            if v.msrs.len() > MAX_STATE_MSRS {
                return Err(bad(
                    "msrs",
                    Some(i),
                    format!("{} entries, at most {MAX_STATE_MSRS}", v.msrs.len()),
                ));
            }
            if v.xcrs.nr_xcrs > KVM_MAX_XCRS {
                return Err(bad(
                    "xcrs",
                    Some(i),
                    format!("{} registers, at most {KVM_MAX_XCRS}", v.xcrs.nr_xcrs),
                ));
            }
        }
        for (name, chip, id) in [
            ("pic_master", &self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            ("pic_slave", &self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            ("ioapic", &self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            // KVM_SET_IRQCHIP sets the chip the struct names: a wrong id restores another chip.
            if chip.chip_id != id {
                return Err(bad(
                    name,
                    None,
                    format!("chip id {}, expected {id}", chip.chip_id),
                ));
            }
        }
        if self.serial.in_buffer.len() > SERIAL_FIFO_BYTES {
            return Err(bad(
                "serial",
                None,
                format!(
                    "{} bytes in the receive FIFO, at most {SERIAL_FIFO_BYTES}",
                    self.serial.in_buffer.len()
                ),
            ));
        }
        let slots = if c.is_builtin_guest() { c.vcpus } else { 0 };
        if self.slots.len() != usize::from(slots) {
            return Err(bad(
                "slots",
                None,
                format!("{} guest control slots, expected {slots}", self.slots.len()),
            ));
        }
        Ok(())
    }
}

fn bad(component: &'static str, vcpu: Option<usize>, reason: String) -> VmError {
    VmError::StateComponent {
        component,
        vcpu,
        reason,
    }
}

/// The `i`-th vCPU state has id `id`: in range, not seen before, and equal to its position
/// (vCPU threads, guest slots and the oracle index vCPUs by position).
fn check_id(i: usize, id: u64, vcpus: u8, seen: &mut [bool; 256]) -> Result<(), VmError> {
    let reason = if id >= u64::from(vcpus) {
        format!("id {id} out of range 0..{vcpus}")
    } else if seen[id as usize] {
        format!("duplicate id {id}")
    } else if id != i as u64 {
        format!("id {id} at position {i}")
    } else {
        seen[id as usize] = true;
        return Ok(());
    };
    Err(bad("id", Some(i), reason))
}

/// A KVM struct from exactly `size_of::<T>()` bytes.
fn exact<T: for<'de> Deserialize<'de>>(
    b: &[u8],
    component: &'static str,
    vcpu: Option<usize>,
) -> Result<T, VmError> {
    let want = std::mem::size_of::<T>();
    if b.len() != want {
        return Err(bad(
            component,
            vcpu,
            format!("{} bytes, expected {want}", b.len()),
        ));
    }
    // kvm-bindings deserializes its structs from bytes; with the length checked it is a copy.
    T::deserialize(serde::de::value::BytesDeserializer::<serde::de::value::Error>::new(b))
        .map_err(|e| bad(component, vcpu, e.to_string()))
}

/// [`MachineState`] as serialized, with every KVM struct as its bytes (how kvm-bindings
/// serializes them), so that sizes can be checked before anything is built from them.
#[derive(Deserialize)]
struct RawState {
    version: u32,
    config: VmConfig,
    vcpus: Vec<RawVcpu>,
    pic_master: Vec<u8>,
    pic_slave: Vec<u8>,
    ioapic: Vec<u8>,
    pit: Vec<u8>,
    clock: Vec<u8>,
    serial: SerialSnapshot,
    slots: Vec<u64>,
    ticks: u64,
    notes: Vec<String>,
}

/// [`VcpuState`] as serialized; `id` wide, so that an id out of range is named as such.
#[derive(Deserialize)]
struct RawVcpu {
    id: u64,
    cpuid: Vec<Vec<u8>>,
    mp_state: Vec<u8>,
    regs: Vec<u8>,
    sregs: Vec<u8>,
    xsave: Vec<u8>,
    xcrs: Vec<u8>,
    debugregs: Vec<u8>,
    lapic: Vec<u8>,
    msrs: Vec<Vec<u8>>,
    events: Vec<u8>,
}

impl RawState {
    fn decode(self) -> Result<MachineState, VmError> {
        let n = self.config.vcpus;
        if self.vcpus.len() != usize::from(n) {
            return Err(bad(
                "vcpus",
                None,
                format!("{} vCPU states for {n} vCPUs", self.vcpus.len()),
            ));
        }
        let mut seen = [false; 256];
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (i, v) in self.vcpus.into_iter().enumerate() {
            check_id(i, v.id, n, &mut seen)?;
            vcpus.push(v.decode(i)?);
        }
        Ok(MachineState {
            version: self.version,
            config: self.config,
            vcpus,
            pic_master: exact(&self.pic_master, "pic_master", None)?,
            pic_slave: exact(&self.pic_slave, "pic_slave", None)?,
            ioapic: exact(&self.ioapic, "ioapic", None)?,
            pit: exact(&self.pit, "pit", None)?,
            clock: exact(&self.clock, "clock", None)?,
            serial: self.serial,
            slots: self.slots,
            ticks: self.ticks,
            notes: self.notes,
        })
    }
}

impl RawVcpu {
    /// The `i`-th vCPU state; its id was checked.
    fn decode(self, i: usize) -> Result<VcpuState, VmError> {
        let v = Some(i);
        // Counts first: no struct is built from an oversized list.
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(bad(
                "cpuid",
                v,
                format!(
                    "{} entries, expected 1..={KVM_MAX_CPUID_ENTRIES}",
                    self.cpuid.len()
                ),
            ));
        }
        if self.msrs.len() > MAX_STATE_MSRS {
            return Err(bad(
                "msrs",
                v,
                format!("{} entries, at most {MAX_STATE_MSRS}", self.msrs.len()),
            ));
        }
        Ok(VcpuState {
            id: self.id as u8,
            cpuid: self
                .cpuid
                .iter()
                .map(|e| exact(e, "cpuid", v))
                .collect::<Result<_, _>>()?,
            mp_state: exact(&self.mp_state, "mp_state", v)?,
            regs: exact(&self.regs, "regs", v)?,
            sregs: exact(&self.sregs, "sregs", v)?,
            xsave: exact(&self.xsave, "xsave", v)?,
            xcrs: exact(&self.xcrs, "xcrs", v)?,
            debugregs: exact(&self.debugregs, "debugregs", v)?,
            lapic: exact(&self.lapic, "lapic", v)?,
            msrs: self
                .msrs
                .iter()
                .map(|e| exact(e, "msrs", v))
                .collect::<Result<_, _>>()?,
            events: exact(&self.events, "events", v)?,
        })
    }
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(VmError::kvm("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// VM-wide part of the state.
pub(crate) struct VmWide {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// Captures irqchip, PIT and clock.
pub(crate) fn capture_vm(vm: &VmFd) -> Result<VmWide, VmError> {
    Ok(VmWide {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(VmError::kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(VmError::kvm("KVM_GET_CLOCK"))?,
    })
}

/// Restores irqchip and PIT (clock separately, see [`restore_clock`]).
pub(crate) fn restore_vm(vm: &VmFd, s: &MachineState) -> Result<(), VmError> {
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(c).map_err(VmError::kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(VmError::kvm("KVM_SET_PIT2"))?;
    Ok(())
}

/// Restores kvmclock.
pub(crate) fn restore_clock(vm: &VmFd, clock: &kvm_clock_data) -> Result<(), VmError> {
    let c = kvm_clock_data {
        clock: clock.clock,
        ..Default::default()
    };
    vm.set_clock(&c).map_err(VmError::kvm("KVM_SET_CLOCK"))
}

/// Captures one vCPU in the documented order.
pub(crate) fn capture_vcpu(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, VmError> {
    let e = |op| VmError::vcpu(op, id);
    let mp_state = fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    let msrs = crate::arch::msr::read(fd, id, msr_indices)?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(e("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let events = fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// Restores one vCPU in the documented order. `xsave_ok` says KVM_SET_XSAVE's 4 KiB is enough.
pub(crate) fn restore_vcpu(fd: &VcpuFd, s: &VcpuState, xsave_ok: bool) -> Result<(), VmError> {
    let id = s.id;
    let e = |op| VmError::vcpu(op, id);
    let cpuid = CpuId::from_entries(&s.cpuid)
        .map_err(|err| VmError::FamStruct(format!("CPUID: {err:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(e("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(e("KVM_SET_SREGS"))?;
    if !xsave_ok {
        return Err(VmError::StateInvalid(
            "XSAVE area larger than 4096 bytes".into(),
        ));
    }
    // SAFETY: `xsave_ok` means KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reported at most 4096 bytes
    // (this process never enables dynamic XSTATE features), so KVM reads only the 4096-byte
    // `kvm_xsave` we pass.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(e("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(e("KVM_SET_LAPIC"))?;
    crate::arch::msr::write(fd, id, &s.msrs)?;
    fd.set_vcpu_events(&s.events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};

    use super::*;
    use crate::{GuestParams, MemBackend, SharedBuffer, Vm, WriteRate};

    /// The state of a real built-in guest (2 vCPUs, 64 MiB) captured once it is writing, as
    /// JSON bytes.
    fn captured() -> &'static [u8] {
        static STATE: OnceLock<Vec<u8>> = OnceLock::new();
        STATE.get_or_init(|| {
            let cfg = VmConfig {
                mem_bytes: 64 << 20,
                vcpus: 2,
                backend: MemBackend::Anon,
                guest: GuestParams {
                    write_rate: WriteRate::Full,
                    working_set_pages: None,
                    seed: 7,
                },
                kernel: None,
            };
            let vm = Vm::boot(cfg, Box::new(SharedBuffer::new())).expect("boot");
            let t0 = Instant::now();
            while !vm.progress().steps.iter().all(|&s| s > 1000) {
                assert!(vm.exit_status().is_none(), "VM ended");
                assert!(t0.elapsed() < Duration::from_secs(60), "no guest progress");
                std::thread::sleep(Duration::from_millis(10));
            }
            vm.pause().expect("pause");
            let st = vm.capture_state().expect("capture");
            vm.shutdown();
            st.to_bytes()
        })
    }

    /// `from_bytes` of the captured state after `edit` changed its JSON.
    fn decode_edited(edit: impl FnOnce(&mut Value)) -> Result<MachineState, VmError> {
        let mut v: Value = serde_json::from_slice(captured()).unwrap();
        edit(&mut v);
        MachineState::from_bytes(&serde_json::to_vec(&v).unwrap())
    }

    /// The edit must be refused as a bad `component` (of vCPU state `vcpu`).
    fn refused(what: &str, component: &str, vcpu: Option<usize>, edit: impl FnOnce(&mut Value)) {
        match decode_edited(edit) {
            Err(VmError::StateComponent {
                component: c,
                vcpu: n,
                reason,
            }) => {
                assert_eq!((c, n), (component, vcpu), "{what}: {reason}");
                let msg = VmError::StateComponent {
                    component: c,
                    vcpu: n,
                    reason,
                }
                .to_string();
                assert!(msg.contains(component), "{what}: {msg}");
            }
            Err(e) => panic!("{what}: refused, but not as a bad {component}: {e}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }

    fn truncate(v: &mut Value, n: usize) {
        v.as_array_mut().unwrap().truncate(n);
    }

    #[test]
    fn captured_state_round_trips_exactly() {
        let b = captured();
        let st = MachineState::from_bytes(b).unwrap();
        assert_eq!(st.vcpus.len(), 2);
        assert!(st.vcpus.iter().all(|v| !v.cpuid.is_empty()));
        assert_eq!(st.to_bytes(), b);
    }

    #[test]
    fn every_kvm_struct_must_have_its_exact_size() {
        let per_vcpu = [
            "regs",
            "sregs",
            "xsave",
            "xcrs",
            "debugregs",
            "lapic",
            "mp_state",
            "events",
        ];
        for c in per_vcpu {
            // 7 bytes, or one byte short for the 4-byte mp_state.
            refused(&format!("{c} cut short"), c, Some(1), |v| {
                let a = &mut v["vcpus"][1][c];
                let n = a.as_array().unwrap().len();
                truncate(a, 7.min(n - 1))
            });
            refused(&format!("{c} one byte long"), c, Some(0), |v| {
                v["vcpus"][0][c].as_array_mut().unwrap().push(json!(0))
            });
            refused(&format!("{c} empty"), c, Some(0), |v| {
                truncate(&mut v["vcpus"][0][c], 0)
            });
        }
        for c in ["pic_master", "pic_slave", "ioapic", "pit", "clock"] {
            refused(&format!("{c} cut to 7 bytes"), c, None, |v| {
                truncate(&mut v[c], 7)
            });
            refused(&format!("{c} one byte long"), c, None, |v| {
                v[c].as_array_mut().unwrap().push(json!(0))
            });
        }
        refused("a cpuid entry cut to 39 bytes", "cpuid", Some(0), |v| {
            truncate(&mut v["vcpus"][0]["cpuid"][3], 39)
        });
        refused("an MSR entry cut to 8 bytes", "msrs", Some(1), |v| {
            truncate(&mut v["vcpus"][1]["msrs"][0], 8)
        });
    }

    #[test]
    fn lists_and_counts_are_bounded() {
        refused("cpuid empty", "cpuid", Some(0), |v| {
            truncate(&mut v["vcpus"][0]["cpuid"], 0)
        });
        refused("cpuid over KVM's maximum", "cpuid", Some(1), |v| {
            let e = v["vcpus"][1]["cpuid"][0].clone();
            let list = v["vcpus"][1]["cpuid"].as_array_mut().unwrap();
            list.resize(KVM_MAX_CPUID_ENTRIES + 1, e);
        });
        refused("more MSRs than MAX_STATE_MSRS", "msrs", Some(0), |v| {
            let e = v["vcpus"][0]["msrs"][0].clone();
            let list = v["vcpus"][0]["msrs"].as_array_mut().unwrap();
            list.resize(MAX_STATE_MSRS + 1, e);
        });
        refused("nr_xcrs 17", "xcrs", Some(0), |v| {
            v["vcpus"][0]["xcrs"][0] = json!(17)
        });
        refused("one vCPU state missing", "vcpus", None, |v| {
            truncate(&mut v["vcpus"], 1)
        });
        refused("a third vCPU state", "vcpus", None, |v| {
            let c = v["vcpus"][1].clone();
            v["vcpus"].as_array_mut().unwrap().push(c);
        });
        refused("config with 3 vCPUs for 2 states", "vcpus", None, |v| {
            v["config"]["vcpus"] = json!(3)
        });
        refused("config with 0 vCPUs and no states", "config", None, |v| {
            v["config"]["vcpus"] = json!(0);
            truncate(&mut v["vcpus"], 0);
        });
        refused("config memory of 1 MiB", "config", None, |v| {
            v["config"]["mem_bytes"] = json!(1 << 20)
        });
        refused("one guest slot for 2 vCPUs", "slots", None, |v| {
            truncate(&mut v["slots"], 1)
        });
        refused("serial FIFO of 65 bytes", "serial", None, |v| {
            v["serial"]["in_buffer"] = json!(vec![0u8; 65])
        });
    }

    #[test]
    fn vcpu_and_irqchip_ids_are_checked() {
        refused("duplicate vCPU id", "id", Some(1), |v| {
            v["vcpus"][1]["id"] = json!(0)
        });
        refused("vCPU id out of range", "id", Some(1), |v| {
            v["vcpus"][1]["id"] = json!(2)
        });
        refused("vCPU id beyond u8", "id", Some(0), |v| {
            v["vcpus"][0]["id"] = json!(300)
        });
        refused("vCPU states swapped", "id", Some(0), |v| {
            v["vcpus"].as_array_mut().unwrap().swap(0, 1)
        });
        refused("PIC master with the slave's id", "pic_master", None, |v| {
            v["pic_master"][0] = json!(KVM_IRQCHIP_PIC_SLAVE)
        });
        refused("IOAPIC with id 0", "ioapic", None, |v| {
            v["ioapic"][0] = json!(0)
        });
    }

    #[test]
    fn validate_refuses_a_built_state_with_bad_counts() {
        let mut st = MachineState::from_bytes(captured()).unwrap();
        st.vcpus[1].cpuid.clear();
        assert!(matches!(
            st.validate(),
            Err(VmError::StateComponent {
                component: "cpuid",
                vcpu: Some(1),
                ..
            })
        ));
        let mut st = MachineState::from_bytes(captured()).unwrap();
        st.vcpus[1].id = 0;
        assert!(matches!(
            st.validate(),
            Err(VmError::StateComponent {
                component: "id",
                ..
            })
        ));
    }
}
