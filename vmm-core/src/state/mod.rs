//! Machine state captured at a pause, as independent components: the machine's shape, one state
//! per vCPU, the in-kernel irqchip, PIT and kvmclock, COM1, and the guest (the built-in guest's
//! parameters and control slots, or the kernel it booted). A plain value (no pointers, no fds);
//! [`MachineState::to_bytes`] writes each component as a named, versioned section, and
//! [`MachineState::from_bytes`] reads them back exactly.
//!
//! # Components
//! Each component is a type implementing [`Component`]: a section name, the version of its body
//! this build writes (and the oldest it still reads), an encoder and a decoder of its body that
//! know nothing of the other components, and the checks it can make on its own. Like
//! Firecracker's `Persist` and Cloud Hypervisor's `Snapshottable`, it lets a device be added,
//! or its state change, without touching the others:
//! - a new device: a type for its state implementing [`Component`] at version 1, captured in
//!   `Vm::capture_locked`, restored in `Vm::restore`, written and read in [`MachineState`]'s
//!   `to_bytes` and `from_bytes`. No other section's bytes change (unit-tested).
//! - a changed state: bump the component's `VERSION` and decode the older versions too, so
//!   older files still read. The other components do not notice.
//!
//! The components, all at version 1 in this build, with their bodies (primitives below):
//! - `machine`, once: `mem_bytes` u64, `vcpus` u8, `backend` u8 (0 anonymous, 1 memfd,
//!   2 hugetlbfs).
//! - `vcpu`, once per vCPU, in vCPU order: `id` u32, `cpuid` list of blobs, then the blobs
//!   `mp_state`, `regs`, `sregs`, `xsave`, `xcrs`, `debugregs`, `lapic`, then `msrs` list of
//!   blobs, then the blob `events` (restore order).
//! - `irqchip`, once: blobs `pic_master`, `pic_slave`, `ioapic` (`kvm_irqchip` each).
//! - `pit`, once: one blob (`kvm_pit_state2`).
//! - `clock`, once: one blob (`kvm_clock_data`).
//! - `serial`, once: 9 register bytes (divisor latch low and high, interrupt enable, interrupt
//!   identification, line control, line status, modem control, modem status, scratch), then
//!   the receive FIFO as a blob.
//! - `builtin_guest`, once for the built-in guest: `write_rate` u8 (0 idle; 1 pages per second,
//!   then the rate as u64; 2 full), `working_set_pages` opt u64, `seed` u64, `slots` list of
//!   u64, `ticks` u64.
//! - `kernel`, instead of `builtin_guest` for a kernel VM: `kernel` path blob (the path's bytes),
//!   `initrd` opt path blob, `cmdline` UTF-8 blob.
//! - `notes`, optional (absent: no notes): list of UTF-8 blobs.
//!
//! The [`VmConfig`] of a state is assembled from `machine` and the guest component; a kernel
//! VM's (ignored) built-in guest parameters are not saved and read back as the defaults.
//!
//! # Byte layout
//! This is the content of the snapshot file's machine-state section (which ram-saver treats as
//! an opaque, checksummed blob). All integers are little-endian.
//! ```text
//! offset  size  field
//! 0       4     magic "VMST"
//! 4       4     format version u32 (STATE_FORMAT_VERSION = 2)
//! 8       4     section count u32, 1..=MAX_SECTIONS
//! 12      ...   sections, back to back; no byte follows the last one
//!
//! section:
//! 0       1     name length n, 1..=MAX_NAME_LEN
//! 1       n     name: [a-z0-9_]
//! 1+n     4     component body version u32
//! 5+n     4     body length L u32
//! 9+n     L     body
//! ```
//! Body primitives: `u8`, `u32`, `u64` fixed width; a *blob* is a u32 length and that many
//! bytes; a *list* is a u32 count and its items; an *opt* is u8 0 (absent) or u8 1 and the
//! value. A KVM struct is a blob of exactly `size_of` the struct: its bytes as the kernel's ABI
//! lays them out (KVM_GET_* output as is).
//!
//! The encoding is deterministic (one state, one byte string): sections in the list's order,
//! `notes` only when there are notes. The reader accepts the components in any order (the order
//! of the `vcpu` sections gives the vCPU positions).
//!
//! # Reading rules
//! - A name this build does not know is refused: [`VmError::StateUnknownComponent`] names it.
//!   No component is skippable, since a build cannot tell whether state it does not understand
//!   is safe to drop; "optional" means "may be absent".
//! - A component version outside `OLDEST_VERSION..=VERSION` (newer than this build, typically)
//!   is refused: [`VmError::StateVersion`] naming the component, which restore reports as an
//!   unsupported file (exit 6), as it does for a newer format version.
//! - A required component that is absent is refused: [`VmError::StateMissingComponent`]; a
//!   once-only component that appears twice is a [`VmError::StateComponent`].
//! - Every body must be read to its last byte.
//!
//! Format version 1 (the whole state as one JSON object, before components) is not readable:
//! it is refused as [`VmError::StateVersion`] with `found: 1`. No files of it were released.
//!
//! # Decoding is exact
//! Every KVM struct must be exactly `size_of` the struct (kvm-bindings' own serde would zero-fill
//! a short one, and a damaged `sregs` of 7 bytes would restore as zeros and run), every list
//! count is bounded before an item is read (CPUID 1..=`KVM_MAX_CPUID_ENTRIES`, at most
//! [`MAX_STATE_MSRS`] MSRs, at most `MAX_VCPUS` slots, at most [`MAX_NOTES`] notes), and
//! nothing is allocated beyond what the blob holds. [`MachineState::validate`] then checks what
//! spans components: one `vcpu` per configured vCPU, ids `0..vcpus` in order, the guest's slots
//! per vCPU, plus each component's own checks (XCR count, irqchip ids, serial FIFO). A refusal
//! is a [`VmError::StateComponent`] naming the component or its field (and the vCPU state),
//! before any VM or vCPU exists.
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

pub mod codec;
mod guest;
mod machine;
mod platform;
mod serial;
mod vcpu;

use codec::{BodyReader, BodyWriter, Section, SectionWriter};
pub use guest::BuiltinGuestState;
pub use machine::{MachineShape, Notes, MAX_NOTES};
pub use platform::{ClockState, IrqchipState, PitState};
pub use serial::SERIAL_FIFO_BYTES;
pub use vcpu::VcpuState;

use crate::serial::SerialSnapshot;
use crate::{GuestParams, KernelConfig, VmConfig, VmError};

/// Version of the machine-state container (see the module docs). 1 was a single JSON object.
pub const STATE_FORMAT_VERSION: u32 = 2;

/// Most MSRs one vCPU state may carry (KVM's save list has a few hundred at most).
pub const MAX_STATE_MSRS: usize = 1024;

/// One component of the machine state: a named, versioned section that encodes, decodes and
/// checks itself without knowing the others.
pub trait Component: Sized {
    /// Section name: unique in a state, 1..=32 bytes of `[a-z0-9_]`.
    const NAME: &'static str;
    /// Body version this build writes, and the newest it reads.
    const VERSION: u32;
    /// Oldest body version this build still reads.
    const OLDEST_VERSION: u32 = 1;

    /// Writes the body (at [`Component::VERSION`]).
    fn encode(&self, w: &mut BodyWriter);

    /// Reads a body written at `version` (within `OLDEST_VERSION..=VERSION`); the caller
    /// refuses bytes left over.
    fn decode(r: &mut BodyReader<'_>, version: u32) -> Result<Self, VmError>;

    /// What the component can check on its own (counts, ids); run after every decode and by
    /// [`MachineState::validate`].
    fn check(&self) -> Result<(), VmError> {
        Ok(())
    }
}

/// `c`'s body.
pub fn encode_body<C: Component>(c: &C) -> Result<Vec<u8>, VmError> {
    let mut w = BodyWriter::new();
    c.encode(&mut w);
    w.finish()
}

/// Section `s` decoded as component `C`: its version supported, its body read exactly, its own
/// checks passed.
pub fn decode_section<C: Component>(s: &Section<'_>) -> Result<C, VmError> {
    if !(C::OLDEST_VERSION..=C::VERSION).contains(&s.version) {
        return Err(VmError::StateVersion {
            component: Some(C::NAME),
            found: s.version,
            oldest: C::OLDEST_VERSION,
            newest: C::VERSION,
        });
    }
    let mut r = BodyReader::new(C::NAME, s.body);
    let c = C::decode(&mut r, s.version)?;
    r.finish()?;
    c.check()?;
    Ok(c)
}

/// Everything needed to rebuild the machine around its memory.
#[derive(Clone)]
pub struct MachineState {
    /// The VM configuration (memory size, vCPUs, backend; built-in guest parameters or kernel).
    pub config: VmConfig,
    /// Per-vCPU state, by index.
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchip: IrqchipState,
    /// PIT.
    pub pit: PitState,
    /// kvmclock.
    pub clock: ClockState,
    /// COM1 UART.
    pub serial: SerialSnapshot,
    /// The built-in guest's control slots at capture (steps done per vCPU); empty for kernels.
    pub slots: Vec<u64>,
    /// The built-in guest's tick counter at capture; 0 for kernels.
    pub ticks: u64,
    /// Host quirks noted when the state was captured (e.g. dropped MSRs).
    pub notes: Vec<String>,
}

impl std::fmt::Debug for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineState")
            .field("config", &self.config)
            .field("vcpus", &self.vcpus)
            .field("slots", &self.slots)
            .field("ticks", &self.ticks)
            .field("notes", &self.notes)
            .finish_non_exhaustive()
    }
}

/// The components found in an encoded state, before they are put together.
#[derive(Default)]
struct Found {
    machine: Option<MachineShape>,
    vcpus: Vec<VcpuState>,
    irqchip: Option<IrqchipState>,
    pit: Option<PitState>,
    clock: Option<ClockState>,
    serial: Option<SerialSnapshot>,
    builtin_guest: Option<BuiltinGuestState>,
    kernel: Option<KernelConfig>,
    notes: Option<Notes>,
}

/// Decodes `s` into `slot`, which must still be empty.
fn once<C: Component>(slot: &mut Option<C>, s: &Section<'_>) -> Result<(), VmError> {
    if slot.is_some() {
        return Err(bad(C::NAME, None, "appears twice".into()));
    }
    *slot = Some(decode_section(s)?);
    Ok(())
}

fn required<C: Component>(slot: Option<C>) -> Result<C, VmError> {
    slot.ok_or(VmError::StateMissingComponent { component: C::NAME })
}

impl MachineState {
    /// Encodes the state (see the module docs for the layout), after [`MachineState::validate`]:
    /// a state that would not read back is refused, not written.
    pub fn to_bytes(&self) -> Result<Vec<u8>, VmError> {
        self.validate()?;
        fn put<C: Component>(w: &mut SectionWriter, c: &C) -> Result<(), VmError> {
            w.section(C::NAME, C::VERSION, &encode_body(c)?)
        }
        let mut w = SectionWriter::new();
        put(&mut w, &MachineShape::of(&self.config))?;
        for (i, v) in self.vcpus.iter().enumerate() {
            put(&mut w, v).map_err(in_vcpu(i))?;
        }
        put(&mut w, &self.irqchip)?;
        put(&mut w, &self.pit)?;
        put(&mut w, &self.clock)?;
        put(&mut w, &self.serial)?;
        match &self.config.kernel {
            None => put(
                &mut w,
                &BuiltinGuestState {
                    params: self.config.guest.clone(),
                    slots: self.slots.clone(),
                    ticks: self.ticks,
                },
            )?,
            Some(k) => put(&mut w, k)?,
        }
        if !self.notes.is_empty() {
            put(&mut w, &Notes(self.notes.clone()))?;
        }
        Ok(w.finish())
    }

    /// Decodes bytes produced by [`MachineState::to_bytes`], following the module docs' reading
    /// rules; the result has passed [`MachineState::validate`].
    pub fn from_bytes(b: &[u8]) -> Result<Self, VmError> {
        let mut f = Found::default();
        for s in codec::read_sections(b)? {
            match s.name {
                MachineShape::NAME => once(&mut f.machine, &s)?,
                VcpuState::NAME => {
                    let i = f.vcpus.len();
                    f.vcpus.push(decode_section(&s).map_err(in_vcpu(i))?);
                }
                IrqchipState::NAME => once(&mut f.irqchip, &s)?,
                PitState::NAME => once(&mut f.pit, &s)?,
                ClockState::NAME => once(&mut f.clock, &s)?,
                SerialSnapshot::NAME => once(&mut f.serial, &s)?,
                BuiltinGuestState::NAME => once(&mut f.builtin_guest, &s)?,
                KernelConfig::NAME => once(&mut f.kernel, &s)?,
                Notes::NAME => once(&mut f.notes, &s)?,
                name => {
                    return Err(VmError::StateUnknownComponent {
                        name: name.to_owned(),
                    })
                }
            }
        }
        let shape = required(f.machine)?;
        let irqchip = required(f.irqchip)?;
        let pit = required(f.pit)?;
        let clock = required(f.clock)?;
        let serial = required(f.serial)?;
        let (guest, kernel, slots, ticks) = match (f.builtin_guest, f.kernel) {
            (Some(g), None) => (g.params, None, g.slots, g.ticks),
            (None, Some(k)) => (GuestParams::default(), Some(k), Vec::new(), 0),
            (None, None) => {
                return Err(VmError::StateMissingComponent {
                    component: "builtin_guest or kernel",
                })
            }
            (Some(_), Some(_)) => {
                return Err(bad(
                    KernelConfig::NAME,
                    None,
                    "a state has a builtin_guest or a kernel, not both".into(),
                ))
            }
        };
        let st = MachineState {
            config: VmConfig {
                mem_bytes: shape.mem_bytes,
                vcpus: shape.vcpus,
                backend: shape.backend,
                guest,
                kernel,
            },
            vcpus: f.vcpus,
            irqchip,
            pit,
            clock,
            serial,
            slots,
            ticks,
            notes: f.notes.unwrap_or_default().0,
        };
        st.validate()?;
        Ok(st)
    }

    /// The configuration of the VM the state came from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The built-in guest's control slots read at capture.
    pub fn guest_slots(&self) -> Vec<u64> {
        self.slots.clone()
    }

    /// Checks every component on its own and what spans components: one vCPU state per
    /// configured vCPU with ids `0..vcpus` in order, and the guest's slots (see the module docs).
    pub fn validate(&self) -> Result<(), VmError> {
        let c = &self.config;
        MachineShape::of(c).check()?;
        if self.vcpus.len() != usize::from(c.vcpus) {
            return Err(bad(
                VcpuState::NAME,
                None,
                format!("{} vCPU states for {} vCPUs", self.vcpus.len(), c.vcpus),
            ));
        }
        let mut seen = [false; 256];
        for (i, v) in self.vcpus.iter().enumerate() {
            check_id(i, v.id, c.vcpus, &mut seen)?;
            v.check().map_err(in_vcpu(i))?;
        }
        self.irqchip.check()?;
        self.pit.check()?;
        self.clock.check()?;
        self.serial.check()?;
        let slots = if c.is_builtin_guest() { c.vcpus } else { 0 };
        if self.slots.len() != usize::from(slots) {
            return Err(bad(
                "slots",
                None,
                format!("{} guest control slots, expected {slots}", self.slots.len()),
            ));
        }
        if !c.is_builtin_guest() && self.ticks != 0 {
            return Err(bad(
                "ticks",
                None,
                format!("{} built-in guest ticks for a kernel VM", self.ticks),
            ));
        }
        if self.notes.len() > MAX_NOTES {
            return Err(bad(
                Notes::NAME,
                None,
                format!("{} entries, at most {MAX_NOTES}", self.notes.len()),
            ));
        }
        Ok(())
    }
}

/// A bad component (or field of one).
pub(crate) fn bad(component: &'static str, vcpu: Option<usize>, reason: String) -> VmError {
    VmError::StateComponent {
        component,
        vcpu,
        reason,
    }
}

/// Attributes a component error to the `i`-th vCPU state.
fn in_vcpu(i: usize) -> impl Fn(VmError) -> VmError {
    move |e| match e {
        VmError::StateComponent {
            component,
            vcpu: None,
            reason,
        } => VmError::StateComponent {
            component,
            vcpu: Some(i),
            reason,
        },
        e => e,
    }
}

/// The `i`-th vCPU state has id `id`: in range, not seen before, and equal to its position
/// (vCPU threads, guest slots and the oracle index vCPUs by position).
fn check_id(i: usize, id: u8, vcpus: u8, seen: &mut [bool; 256]) -> Result<(), VmError> {
    let reason = if id >= vcpus {
        format!("id {id} out of range 0..{vcpus}")
    } else if seen[usize::from(id)] {
        format!("duplicate id {id}")
    } else if usize::from(id) != i {
        format!("id {id} at position {i}")
    } else {
        seen[usize::from(id)] = true;
        return Ok(());
    };
    Err(bad("id", Some(i), reason))
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use kvm_bindings::{KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES};

    use super::codec::{read_sections, SectionWriter};
    use super::*;
    use crate::{MemBackend, SharedBuffer, Vm, WriteRate};

    /// The state of a real built-in guest (2 vCPUs, 64 MiB) captured once it is writing, encoded.
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
            st.to_bytes().expect("a captured state encodes")
        })
    }

    fn state() -> MachineState {
        MachineState::from_bytes(captured()).unwrap()
    }

    /// An encoded state as its sections, to damage one at a time.
    #[derive(Clone, Debug, PartialEq)]
    struct Model(Vec<(String, u32, Vec<u8>)>);

    impl Model {
        fn parse(b: &[u8]) -> Model {
            Model(
                read_sections(b)
                    .unwrap()
                    .into_iter()
                    .map(|s| (s.name.to_owned(), s.version, s.body.to_vec()))
                    .collect(),
            )
        }

        fn encode(&self) -> Vec<u8> {
            let mut w = SectionWriter::new();
            for (n, v, b) in &self.0 {
                w.section(n, *v, b).unwrap();
            }
            w.finish()
        }

        fn names(&self) -> Vec<&str> {
            self.0.iter().map(|s| s.0.as_str()).collect()
        }

        /// The `nth` section called `name`.
        fn find(&mut self, name: &str, nth: usize) -> &mut (String, u32, Vec<u8>) {
            self.0
                .iter_mut()
                .filter(|s| s.0 == name)
                .nth(nth)
                .unwrap_or_else(|| panic!("no section {name} #{nth}"))
        }

        fn remove(&mut self, name: &str) {
            self.0.retain(|s| s.0 != name);
        }

        fn vcpu(&mut self, i: usize, edit: impl FnOnce(&mut RawVcpu)) {
            let s = self.find("vcpu", i);
            let mut v = RawVcpu::parse(&s.2);
            edit(&mut v);
            s.2 = v.write();
        }

        /// Edits a section made of blobs only (`irqchip`, `pit`, `clock`).
        fn blobs(&mut self, name: &str, edit: impl FnOnce(&mut Vec<Vec<u8>>)) {
            let s = self.find(name, 0);
            let mut r = BodyReader::new("test", &s.2);
            let mut blobs = Vec::new();
            while blobs.iter().map(|b: &Vec<u8>| 4 + b.len()).sum::<usize>() < s.2.len() {
                blobs.push(r.blob("blob").unwrap().to_vec());
            }
            edit(&mut blobs);
            let mut w = BodyWriter::new();
            for b in &blobs {
                w.blob("blob", b);
            }
            s.2 = w.finish().unwrap();
        }

        /// Edits a component's decoded value and encodes it back (without its checks).
        fn typed<C: Component>(&mut self, edit: impl FnOnce(&mut C)) {
            let s = self.find(C::NAME, 0);
            let mut c = C::decode(&mut BodyReader::new(C::NAME, &s.2), s.1).unwrap();
            edit(&mut c);
            s.2 = encode_body(&c).unwrap();
        }
    }

    /// A `vcpu` body (version 1) with every KVM struct as its bytes, as the module docs lay it
    /// out, so that sizes and counts can be damaged.
    #[derive(Clone, Debug, PartialEq)]
    struct RawVcpu {
        id: u32,
        cpuid: Vec<Vec<u8>>,
        fields: Vec<(&'static str, Vec<u8>)>,
        msrs: Vec<Vec<u8>>,
        events: Vec<u8>,
    }

    const VCPU_STRUCTS: [&str; 7] = [
        "mp_state",
        "regs",
        "sregs",
        "xsave",
        "xcrs",
        "debugregs",
        "lapic",
    ];

    impl RawVcpu {
        fn parse(b: &[u8]) -> RawVcpu {
            let mut r = BodyReader::new("vcpu", b);
            let id = r.u32("id").unwrap();
            let list = |r: &mut BodyReader<'_>| {
                let n = r.count("list", usize::MAX).unwrap();
                (0..n)
                    .map(|_| r.blob("item").unwrap().to_vec())
                    .collect::<Vec<_>>()
            };
            let cpuid = list(&mut r);
            let fields = VCPU_STRUCTS
                .iter()
                .map(|f| (*f, r.blob(f).unwrap().to_vec()))
                .collect();
            let msrs = list(&mut r);
            let events = r.blob("events").unwrap().to_vec();
            r.finish().unwrap();
            RawVcpu {
                id,
                cpuid,
                fields,
                msrs,
                events,
            }
        }

        fn write(&self) -> Vec<u8> {
            let mut w = BodyWriter::new();
            w.u32(self.id);
            w.list("cpuid", &self.cpuid, |w, e| w.blob("cpuid", e));
            for (f, b) in &self.fields {
                w.blob(f, b);
            }
            w.list("msrs", &self.msrs, |w, e| w.blob("msrs", e));
            w.blob("events", &self.events);
            w.finish().unwrap()
        }

        fn field(&mut self, name: &str) -> &mut Vec<u8> {
            if name == "events" {
                return &mut self.events;
            }
            &mut self.fields.iter_mut().find(|f| f.0 == name).unwrap().1
        }
    }

    /// `from_bytes` of the captured state after `edit` changed its sections.
    fn decode_edited(edit: impl FnOnce(&mut Model)) -> Result<MachineState, VmError> {
        let mut m = Model::parse(captured());
        edit(&mut m);
        MachineState::from_bytes(&m.encode())
    }

    /// The edit must be refused as a bad `component` (of vCPU state `vcpu`).
    fn refused(what: &str, component: &str, vcpu: Option<usize>, edit: impl FnOnce(&mut Model)) {
        match decode_edited(edit) {
            Err(e @ VmError::StateComponent { .. }) => {
                let VmError::StateComponent {
                    component: c,
                    vcpu: n,
                    ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!((*c, *n), (component, vcpu), "{what}: {e}");
                assert!(e.to_string().contains(component), "{what}: {e}");
                assert!(!e.is_unsupported_state(), "{what}: {e}");
            }
            Err(e) => panic!("{what}: refused, but not as a bad {component}: {e}"),
            Ok(_) => panic!("{what}: accepted"),
        }
    }

    #[test]
    fn captured_state_round_trips_exactly() {
        let b = captured();
        let st = MachineState::from_bytes(b).unwrap();
        assert_eq!(st.vcpus.len(), 2);
        assert!(st.vcpus.iter().all(|v| !v.cpuid.is_empty()));
        assert_eq!(st.slots.len(), 2);
        assert_eq!(st.to_bytes().unwrap(), b);
        let m = Model::parse(b);
        let names = m.names();
        let canonical = [
            "machine",
            "vcpu",
            "vcpu",
            "irqchip",
            "pit",
            "clock",
            "serial",
            "builtin_guest",
        ];
        assert_eq!(names[..8], canonical, "canonical section order");
        assert_eq!(names.len(), 8 + usize::from(!st.notes.is_empty()));
        assert!(m.0.iter().all(|s| s.1 == 1), "every component at version 1");
        // The layout is the documented one: the test's own reading of the vCPU bodies writes
        // them back byte for byte, and the fixed bodies have their documented sizes.
        for i in 0..2 {
            let mut m = m.clone();
            let body = m.find("vcpu", i).2.clone();
            assert_eq!(RawVcpu::parse(&body).write(), body);
        }
        let mut m = m;
        assert_eq!(m.find("machine", 0).2.len(), 8 + 1 + 1);
        assert_eq!(m.find("irqchip", 0).2.len(), 3 * (4 + 520));
        assert_eq!(
            m.find("serial", 0).2.len(),
            9 + 4 + st.serial.in_buffer.len()
        );
        assert_eq!(
            m.find("builtin_guest", 0).2.len(),
            1 + 1 + 8 + 4 + 2 * 8 + 8
        );
    }

    #[test]
    fn every_kvm_struct_must_have_its_exact_size() {
        for c in VCPU_STRUCTS.into_iter().chain(["events"]) {
            // 7 bytes, or one byte short for the 4-byte mp_state.
            refused(&format!("{c} cut short"), c, Some(1), |m| {
                m.vcpu(1, |v| {
                    let f = v.field(c);
                    f.truncate(7.min(f.len() - 1))
                })
            });
            refused(&format!("{c} one byte long"), c, Some(0), |m| {
                m.vcpu(0, |v| v.field(c).push(0))
            });
            refused(&format!("{c} empty"), c, Some(0), |m| {
                m.vcpu(0, |v| v.field(c).clear())
            });
        }
        for (section, i, c) in [
            ("irqchip", 0, "pic_master"),
            ("irqchip", 1, "pic_slave"),
            ("irqchip", 2, "ioapic"),
            ("pit", 0, "pit"),
            ("clock", 0, "clock"),
        ] {
            refused(&format!("{c} cut to 7 bytes"), c, None, |m| {
                m.blobs(section, |b| b[i].truncate(7))
            });
            refused(&format!("{c} one byte long"), c, None, |m| {
                m.blobs(section, |b| b[i].push(0))
            });
        }
        refused("a cpuid entry cut to 39 bytes", "cpuid", Some(0), |m| {
            m.vcpu(0, |v| v.cpuid[3].truncate(39))
        });
        refused("an MSR entry cut to 8 bytes", "msrs", Some(1), |m| {
            m.vcpu(1, |v| v.msrs[0].truncate(8))
        });
    }

    #[test]
    fn bodies_are_read_exactly() {
        refused("a byte after the PIT", "pit", None, |m| {
            m.find("pit", 0).2.push(0)
        });
        refused("a byte after the last vCPU field", "vcpu", Some(1), |m| {
            m.find("vcpu", 1).2.push(0)
        });
        refused(
            "a vCPU body cut inside its events",
            "events",
            Some(0),
            |m| {
                let b = &mut m.find("vcpu", 0).2;
                b.truncate(b.len() - 3)
            },
        );
        refused("a machine body of 9 bytes", "machine", None, |m| {
            m.find("machine", 0).2.truncate(9)
        });
        refused("a serial FIFO length past the body", "serial", None, |m| {
            m.find("serial", 0).2[9] = 0xff
        });
        refused(
            "working-set presence byte 2",
            "working_set_pages",
            None,
            |m| m.find("builtin_guest", 0).2[1] = 2,
        );
        refused("write-rate code 3", "write_rate", None, |m| {
            m.find("builtin_guest", 0).2[0] = 3
        });
        refused("memory backend code 3", "machine", None, |m| {
            m.find("machine", 0).2[9] = 3
        });
    }

    #[test]
    fn lists_and_counts_are_bounded() {
        refused("cpuid empty", "cpuid", Some(0), |m| {
            m.vcpu(0, |v| v.cpuid.clear())
        });
        refused("cpuid over KVM's maximum", "cpuid", Some(1), |m| {
            m.vcpu(1, |v| {
                let e = v.cpuid[0].clone();
                v.cpuid.resize(KVM_MAX_CPUID_ENTRIES + 1, e)
            })
        });
        refused("more MSRs than MAX_STATE_MSRS", "msrs", Some(0), |m| {
            m.vcpu(0, |v| {
                let e = v.msrs[0].clone();
                v.msrs.resize(MAX_STATE_MSRS + 1, e)
            })
        });
        refused("a count of 2^32-1 MSRs", "msrs", Some(1), |m| {
            m.vcpu(1, |v| v.msrs.clear());
            let b = &mut m.find("vcpu", 1).2;
            // The MSR count is right before the events blob.
            let at = b.len() - 4 - std::mem::size_of::<kvm_bindings::kvm_vcpu_events>() - 4;
            assert_eq!(b[at..at + 4], [0; 4]);
            b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        });
        refused("nr_xcrs 17", "xcrs", Some(0), |m| {
            m.vcpu(0, |v| {
                v.field("xcrs")[..4].copy_from_slice(&17u32.to_le_bytes())
            })
        });
        refused("one vCPU state missing", "vcpu", None, |m| {
            let i = m.0.iter().position(|s| s.0 == "vcpu").unwrap();
            m.0.remove(i);
        });
        refused("a third vCPU state", "vcpu", None, |m| {
            let v = m.find("vcpu", 1).clone();
            m.0.insert(3, v);
        });
        refused("machine with 3 vCPUs for 2 states", "vcpu", None, |m| {
            m.typed::<MachineShape>(|s| s.vcpus = 3)
        });
        refused("machine with 0 vCPUs and no states", "machine", None, |m| {
            m.typed::<MachineShape>(|s| s.vcpus = 0);
            m.remove("vcpu");
        });
        refused("machine memory of 1 MiB", "machine", None, |m| {
            m.typed::<MachineShape>(|s| s.mem_bytes = 1 << 20)
        });
        refused("one guest slot for 2 vCPUs", "slots", None, |m| {
            m.typed::<BuiltinGuestState>(|g| g.slots.truncate(1))
        });
        refused("33 guest slots", "slots", None, |m| {
            m.typed::<BuiltinGuestState>(|g| g.slots.resize(33, 0))
        });
        refused("serial FIFO of 65 bytes", "serial", None, |m| {
            m.typed::<SerialSnapshot>(|s| s.in_buffer = vec![0; 65])
        });
    }

    #[test]
    fn vcpu_and_irqchip_ids_are_checked() {
        refused("duplicate vCPU id", "id", Some(1), |m| {
            m.vcpu(1, |v| v.id = 0)
        });
        refused("vCPU id out of range", "id", Some(1), |m| {
            m.vcpu(1, |v| v.id = 2)
        });
        refused("vCPU id beyond u8", "id", Some(0), |m| {
            m.vcpu(0, |v| v.id = 300)
        });
        refused("vCPU states swapped", "id", Some(0), |m| {
            let a = m.0.iter().position(|s| s.0 == "vcpu").unwrap();
            m.0.swap(a, a + 1)
        });
        refused("PIC master with the slave's id", "pic_master", None, |m| {
            m.blobs("irqchip", |b| {
                b[0][..4].copy_from_slice(&KVM_IRQCHIP_PIC_SLAVE.to_le_bytes())
            })
        });
        refused("IOAPIC with id 0", "ioapic", None, |m| {
            m.blobs("irqchip", |b| b[2][..4].fill(0))
        });
    }

    #[test]
    fn validate_refuses_a_built_state_with_bad_counts() {
        let mut st = state();
        st.vcpus[1].cpuid.clear();
        assert!(matches!(
            st.validate(),
            Err(VmError::StateComponent {
                component: "cpuid",
                vcpu: Some(1),
                ..
            })
        ));
        // What would not read back is not written either.
        assert!(st.to_bytes().is_err());
        let mut st = state();
        st.vcpus[1].id = 0;
        assert!(matches!(
            st.validate(),
            Err(VmError::StateComponent {
                component: "id",
                ..
            })
        ));
        let mut st = state();
        st.config.kernel = Some(KernelConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
        });
        assert!(matches!(
            st.to_bytes(),
            Err(VmError::StateComponent {
                component: "slots",
                ..
            })
        ));
    }

    #[test]
    fn an_unknown_component_is_refused_naming_it() {
        for at in [0, 3, 8] {
            let e = decode_edited(|m| m.0.insert(at, ("virtio_blk".into(), 1, vec![1, 2, 3])))
                .unwrap_err();
            assert!(
                matches!(&e, VmError::StateUnknownComponent { name } if name == "virtio_blk"),
                "{e}"
            );
            assert!(e.to_string().contains("\"virtio_blk\""), "{e}");
            assert!(e.is_unsupported_state());
        }
    }

    #[test]
    fn a_newer_component_version_is_refused_as_unsupported() {
        for (name, nth) in [
            ("pit", 0),
            ("vcpu", 1),
            ("machine", 0),
            ("builtin_guest", 0),
        ] {
            for version in [2, u32::MAX, 0] {
                let e = decode_edited(|m| m.find(name, nth).1 = version).unwrap_err();
                match &e {
                    VmError::StateVersion {
                        component: Some(c),
                        found,
                        oldest: 1,
                        newest: 1,
                    } if *c == name && *found == version => {}
                    _ => panic!("{name} at version {version}: {e:?}"),
                }
                assert!(e.to_string().contains(name), "{e}");
                assert!(e.is_unsupported_state());
            }
        }
        // The container's own version.
        let mut b = captured().to_vec();
        b[4..8].copy_from_slice(&3u32.to_le_bytes());
        let e = MachineState::from_bytes(&b).unwrap_err();
        assert!(
            matches!(
                e,
                VmError::StateVersion {
                    component: None,
                    found: 3,
                    ..
                }
            ),
            "{e:?}"
        );
        // The JSON of format version 1 is refused as that version, not as damage.
        let e = MachineState::from_bytes(br#"{"version":1,"config":{"vcpus":2}}"#).unwrap_err();
        assert!(
            matches!(
                e,
                VmError::StateVersion {
                    component: None,
                    found: 1,
                    oldest: 2,
                    newest: 2
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_missing_or_repeated_component_is_refused_naming_it() {
        for name in ["machine", "irqchip", "pit", "clock", "serial"] {
            let e = decode_edited(|m| m.remove(name)).unwrap_err();
            assert!(
                matches!(e, VmError::StateMissingComponent { component } if component == name),
                "{name}: {e:?}"
            );
            assert!(e.to_string().contains(name), "{e}");
            refused(&format!("{name} twice"), name, None, |m| {
                let s = m.find(name, 0).clone();
                m.0.push(s)
            });
        }
        let e = decode_edited(|m| m.remove("builtin_guest")).unwrap_err();
        assert!(
            matches!(
                e,
                VmError::StateMissingComponent {
                    component: "builtin_guest or kernel"
                }
            ),
            "{e:?}"
        );
        refused("a kernel and the built-in guest", "kernel", None, |m| {
            let k = KernelConfig {
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
            };
            m.0.push(("kernel".into(), 1, encode_body(&k).unwrap()))
        });
        // Notes are optional.
        let st = decode_edited(|m| m.remove("notes")).unwrap();
        assert!(st.notes.is_empty());
    }

    #[test]
    fn adding_a_component_leaves_the_others_bytes_alone() {
        let mut without = state();
        without.notes.clear();
        let mut with = without.clone();
        with.notes = vec!["a note".into(), "ünïcode".into()];
        let a = Model::parse(&without.to_bytes().unwrap());
        let b = Model::parse(&with.to_bytes().unwrap());
        assert!(!a.names().contains(&"notes"));
        assert_eq!(b.names().last(), Some(&"notes"));
        assert_eq!(
            a.0[..],
            b.0[..b.0.len() - 1],
            "the other sections are unchanged"
        );
        let back = MachineState::from_bytes(&b.encode()).unwrap();
        assert_eq!(back.notes, with.notes);
        // Every section is its component's body alone: encoding one component needs no other.
        let mut m = b;
        assert_eq!(
            m.find("pit", 0).2,
            encode_body(&with.pit).unwrap(),
            "pit body"
        );
        assert_eq!(m.find("vcpu", 1).2, encode_body(&with.vcpus[1]).unwrap());
        assert_eq!(
            m.find("machine", 0).2,
            encode_body(&MachineShape::of(&with.config)).unwrap()
        );
    }

    #[test]
    fn components_are_read_in_any_order_and_written_in_one() {
        let mut m = Model::parse(captured());
        // Reverse everything but the vCPU sections' order among themselves.
        let (vcpus, mut others): (Vec<_>, Vec<_>) = m.0.drain(..).partition(|s| s.0 == "vcpu");
        others.reverse();
        m.0 = others;
        m.0.splice(1..1, vcpus);
        assert_ne!(m.encode(), captured());
        let st = MachineState::from_bytes(&m.encode()).unwrap();
        assert_eq!(st.to_bytes().unwrap(), captured());
    }

    #[test]
    fn kernel_vms_keep_their_kernel_exactly() {
        use std::os::unix::ffi::OsStrExt;
        let path = |b: &[u8]| std::path::PathBuf::from(std::ffi::OsStr::from_bytes(b));
        for initrd in [None, Some(path(b"/k/\x80rd"))] {
            let mut st = state();
            st.config.kernel = Some(KernelConfig {
                kernel: path(b"/boot/\xff\xfe-not-utf8"),
                initrd,
                cmdline: "console=ttyS0 quiet".into(),
            });
            st.config.guest = GuestParams::default();
            st.slots.clear();
            st.ticks = 0;
            let b = st.to_bytes().unwrap();
            let names = Model::parse(&b).names().join(",");
            assert!(names.contains("kernel") && !names.contains("builtin_guest"));
            let back = MachineState::from_bytes(&b).unwrap();
            assert_eq!(back.config, st.config);
            assert_eq!(back.to_bytes().unwrap(), b);
        }
    }

    #[test]
    fn damaged_bytes_are_refused_without_panicking() {
        let b = captured();
        for n in (0..b.len()).step_by(7).chain([b.len() - 1]) {
            assert!(MachineState::from_bytes(&b[..n]).is_err(), "cut to {n}");
        }
        for (i, at) in (0..b.len()).step_by(3).enumerate() {
            let mut bad = b.to_vec();
            bad[at] ^= [0x01, 0x80, 0xff][i % 3];
            // Flips inside a KVM struct's bytes decode; the decoding must only never panic.
            let _ = MachineState::from_bytes(&bad);
        }
    }
}
