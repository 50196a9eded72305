//! Machine states that only decoding can catch. The real machine state of a booted built-in
//! guest (2 vCPUs, captured by vmm-core) is damaged one component at a time in the documented
//! container (vmm-core's `state` module docs: named, versioned sections; per-component bodies):
//! a KVM struct of the wrong size (`regs`, `sregs`, `xsave`, `xcrs`, `lapic`, `events`,
//! `debugregs`, `mp_state`, irqchips, PIT, clock), CPUID empty or too long, too many MSRs,
//! duplicate or out-of-range vCPU ids, a vCPU count that disagrees with the machine section, …
//! Each damaged state is saved with ram-saver's writer, so its crc is valid: the file opens and
//! verifies, restore's decoding (`vm_snapshot::machine_state`) refuses it as `Corrupt` naming the
//! component, and `MachineState::from_bytes` with a `VmError::StateComponent` naming the component
//! and vCPU state. Byte flips through the state must never make the decoding panic.
//!
//! The container's own rules are damaged the same way: a component this build does not know, a
//! component version (or format version) newer than this build's, a required component
//! missing or repeated, a body with a byte after its last field, a kernel beside the built-in
//! guest, a malformed section name. A newer version is `Unsupported` for restore (exit 6); the
//! rest is `Corrupt`, except an unknown component, which may be either (it is what a newer
//! build writes, so `Unsupported` would be fair); every refusal names what it refuses.
//!
//! The file-format mutations (every section of the snapshot file around this blob) are
//! ram-saver's own tests (`ram-saver/tests/sweep_*.rs`, `ram-saver/tests/lies_*.rs`); they carry
//! a real state captured once (`ram-saver/tests/data/`), which the test here checks is still
//! a state this build decodes, and recaptures with `--ignored capture_ram_saver_fixture`.

#![forbid(unsafe_code)]

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ram_saver::{
    AtomicFileSink, Compression, ErrorKind, FormatError, MemRegion, SnapshotHeader, SnapshotReader,
    SnapshotWriter,
};
use vmm_core::{
    GuestParams, MachineState, MemBackend, SharedBuffer, Vm, VmConfig, VmError, WriteRate,
};

/// Address-space limit while damaged states are decoded: an allocation driven by an unchecked
/// count fails loudly instead of being measured.
const ADDRESS_SPACE_LIMIT: u64 = 3 << 30;
/// In debug builds the flips are thinned to keep the runtime sane.
const THIN: usize = if cfg!(debug_assertions) { 8 } else { 1 };
const FLIP_MASKS: [u8; 9] = [0x01, 0x80, 0xff, 0x10, 0x04, 0x40, 0x20, 0x02, 0x08];
/// Guest memory of the files carrying the damaged states: any valid file will do.
const MEM_BYTES: u64 = 2 << 20;

fn limit_address_space() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_AS).expect("getrlimit");
    setrlimit(Resource::RLIMIT_AS, ADDRESS_SPACE_LIMIT.min(hard), hard).expect("setrlimit");
}

/// The machine state of a real built-in guest (2 vCPUs, 32 MiB, writing at full speed),
/// captured once: booted, paused, `capture_state`, `to_bytes`.
fn machine_state_blob() -> Vec<u8> {
    static STATE: OnceLock<Vec<u8>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let cfg = VmConfig {
                mem_bytes: 32 << 20,
                vcpus: 2,
                backend: MemBackend::Anon,
                guest: GuestParams {
                    write_rate: WriteRate::Full,
                    working_set_pages: None,
                    seed: 11,
                },
                kernel: None,
            };
            let vm = Vm::boot(cfg, Box::new(SharedBuffer::new())).expect("boot built-in guest");
            let t0 = Instant::now();
            while !vm.progress().steps.iter().all(|&s| s > 1000) {
                assert!(
                    vm.exit_status().is_none(),
                    "guest ended: {:?}",
                    vm.exit_status()
                );
                assert!(t0.elapsed() < Duration::from_secs(60), "no guest progress");
                std::thread::sleep(Duration::from_millis(10));
            }
            vm.pause().expect("pause");
            let st = vm.capture_state().expect("capture state");
            vm.shutdown();
            st.to_bytes().expect("a captured state encodes")
        })
        .clone()
}

/// The VM configuration of a state, as a snapshot header's config stores it.
fn config_json(state: &[u8]) -> Vec<u8> {
    let st = MachineState::from_bytes(state).expect("captured state decodes");
    serde_json::to_vec(st.config()).expect("config json")
}

// ---------------------------------------------------------------------------------------------
// ram-saver's fixture
// ---------------------------------------------------------------------------------------------

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ram-saver/tests/data")
}

/// ram-saver's file-format tests carry a real machine state: it must be one this build reads,
/// with the VM configuration stored beside it.
#[test]
fn ram_saver_fixture_is_a_real_state_this_build_reads() {
    let dir = fixture_dir();
    let state = fs::read(dir.join("machine-state.bin")).expect("fixture state");
    let config = fs::read(dir.join("vm-config.json")).expect("fixture config");
    let st = MachineState::from_bytes(&state).unwrap_or_else(|e| {
        panic!(
            "the fixture no longer decodes ({e}): recapture it with `cargo test --release \
             -p tests --test machine_state_sweep -- --ignored capture_ram_saver_fixture`"
        )
    });
    assert_eq!(st.config().vcpus, 2);
    assert_eq!(config, config_json(&state));
}

/// Write ram-saver's fixture from a freshly booted built-in guest (run when vmm-core's state
/// format changes).
#[test]
#[ignore = "rewrites ram-saver/tests/data"]
fn capture_ram_saver_fixture() {
    let state = machine_state_blob();
    let dir = fixture_dir();
    fs::create_dir_all(&dir).expect("fixture dir");
    fs::write(dir.join("machine-state.bin"), &state).expect("write state");
    fs::write(dir.join("vm-config.json"), config_json(&state)).expect("write config");
}

// ---------------------------------------------------------------------------------------------
// An independent reading of the documented container and of the component bodies
// ---------------------------------------------------------------------------------------------

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A body read front to back.
struct Body<'a>(&'a [u8]);

impl Body<'_> {
    fn take(&mut self, n: usize) -> Vec<u8> {
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
    fn u32(&mut self) -> u32 {
        get32(&self.take(4), 0)
    }
    fn blob(&mut self) -> Vec<u8> {
        let n = self.u32() as usize;
        self.take(n)
    }
    fn blobs(&mut self) -> Vec<Vec<u8>> {
        let n = self.u32();
        (0..n).map(|_| self.blob()).collect()
    }
}

fn put_blobs(out: &mut Vec<u8>, list: &[Vec<u8>]) {
    out.extend_from_slice(&(list.len() as u32).to_le_bytes());
    for b in list {
        put_blob(out, b);
    }
}

/// The state's sections: (name, version, body), in file order; and the format version.
#[derive(Clone, Debug)]
struct Sections(Vec<(String, u32, Vec<u8>)>, u32);

impl Sections {
    fn parse(b: &[u8]) -> Sections {
        assert_eq!(&b[0..4], b"VMST");
        let n = get32(b, 8) as usize;
        let mut at = 12;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let len = b[at] as usize;
            let name = String::from_utf8(b[at + 1..at + 1 + len].to_vec()).expect("name");
            at += 1 + len;
            let version = get32(b, at);
            let body_len = get32(b, at + 4) as usize;
            v.push((name, version, b[at + 8..at + 8 + body_len].to_vec()));
            at += 8 + body_len;
        }
        assert_eq!(at, b.len(), "nothing follows the last section");
        Sections(v, get32(b, 4))
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = b"VMST".to_vec();
        b.extend_from_slice(&self.1.to_le_bytes());
        b.extend_from_slice(&(self.0.len() as u32).to_le_bytes());
        for (name, version, body) in &self.0 {
            b.push(name.len() as u8);
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&version.to_le_bytes());
            put_blob(&mut b, body);
        }
        b
    }

    /// The body of the `nth` section named `name`.
    fn body(&mut self, name: &str, nth: usize) -> &mut Vec<u8> {
        &mut self
            .0
            .iter_mut()
            .filter(|s| s.0 == name)
            .nth(nth)
            .unwrap_or_else(|| panic!("no section {name} #{nth}"))
            .2
    }

    /// Edit the `i`-th vCPU state.
    fn vcpu(&mut self, i: usize, f: impl FnOnce(&mut RawVcpu)) {
        let body = self.body("vcpu", i);
        let mut v = RawVcpu::parse(body);
        f(&mut v);
        *body = v.write();
    }

    /// Edit a section whose body is blobs only (irqchip, pit, clock).
    fn blobs(&mut self, name: &str, f: impl FnOnce(&mut Vec<Vec<u8>>)) {
        let body = self.body(name, 0);
        let mut r = Body(body);
        let mut list = Vec::new();
        while !r.0.is_empty() {
            list.push(r.blob());
        }
        f(&mut list);
        body.clear();
        for b in &list {
            put_blob(body, b);
        }
    }

    fn remove(&mut self, name: &str) {
        self.0.retain(|s| s.0 != name);
    }

    /// The first section named `name`, whole.
    fn section(&mut self, name: &str) -> &mut (String, u32, Vec<u8>) {
        self.0
            .iter_mut()
            .find(|s| s.0 == name)
            .unwrap_or_else(|| panic!("no section {name}"))
    }

    fn push(&mut self, name: &str, body: Vec<u8>) {
        self.0.push((name.into(), 1, body));
    }
}

/// The body of a `vcpu` section: id, CPUID entries, the KVM structs in restore order, MSRs,
/// events.
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
        let mut r = Body(b);
        let id = r.u32();
        let cpuid = r.blobs();
        let fields = VCPU_STRUCTS.iter().map(|&f| (f, r.blob())).collect();
        let msrs = r.blobs();
        let events = r.blob();
        assert!(r.0.is_empty(), "vCPU body read to its end");
        RawVcpu {
            id,
            cpuid,
            fields,
            msrs,
            events,
        }
    }

    fn write(&self) -> Vec<u8> {
        let mut b = self.id.to_le_bytes().to_vec();
        put_blobs(&mut b, &self.cpuid);
        for (_, f) in &self.fields {
            put_blob(&mut b, f);
        }
        put_blobs(&mut b, &self.msrs);
        put_blob(&mut b, &self.events);
        b
    }

    /// The KVM struct `name` (or the events).
    fn field(&mut self, name: &str) -> &mut Vec<u8> {
        if name == "events" {
            return &mut self.events;
        }
        &mut self
            .fields
            .iter_mut()
            .find(|f| f.0 == name)
            .expect("vCPU field")
            .1
    }
}

/// Edit the `slots` list of the `builtin_guest` body: write_rate u8 (+ u64 when 1), working set
/// opt u64, seed u64, slots list of u64, ticks u64.
fn edit_slots(s: &mut Sections, f: impl FnOnce(&mut Vec<u64>)) {
    let body = s.body("builtin_guest", 0);
    let mut at = 1 + if body[0] == 1 { 8 } else { 0 };
    at += 1 + if body[at] == 1 { 8 } else { 0 };
    at += 8;
    let n = get32(body, at) as usize;
    let mut slots: Vec<u64> = (0..n)
        .map(|i| u64::from_le_bytes(body[at + 4 + 8 * i..at + 12 + 8 * i].try_into().unwrap()))
        .collect();
    let tail = body[at + 4 + 8 * n..].to_vec();
    f(&mut slots);
    body.truncate(at);
    body.extend_from_slice(&(slots.len() as u32).to_le_bytes());
    for v in slots {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&tail);
}

/// Replace the receive FIFO of the `serial` body (9 register bytes, then the FIFO blob).
fn set_serial_fifo(s: &mut Sections, fifo: &[u8]) {
    let body = s.body("serial", 0);
    body.truncate(9);
    put_blob(body, fifo);
}

// ---------------------------------------------------------------------------------------------
// The damaged states
// ---------------------------------------------------------------------------------------------

/// A damaged (real) machine state, stored with a valid crc, and how it must be refused.
struct StateLie {
    what: &'static str,
    expect: Expect,
    edit: fn(&mut Sections),
}

/// How a damaged state is refused: the typed error of `MachineState::from_bytes`, and restore's
/// `FormatError` kind; either way the message names `Expect::named`.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// A bad component or field (of a vCPU state): `StateComponent`, `Corrupt`.
    Component(&'static str, Option<usize>),
    /// A required component absent: `StateMissingComponent`, `Corrupt`.
    Missing(&'static str),
    /// A version this build does not read, of a component (`None`: of the format):
    /// `StateVersion`, `Unsupported`.
    Version(Option<&'static str>),
    /// A component this build does not know: `StateUnknownComponent`, `Corrupt` or
    /// `Unsupported`.
    Unknown(&'static str),
    /// A malformed container: `StateFraming`, `Corrupt`.
    Framing,
}

impl Expect {
    /// What the refusal's message must contain.
    fn named(self) -> &'static str {
        match self {
            Expect::Component(c, _) | Expect::Missing(c) | Expect::Unknown(c) => c,
            Expect::Version(c) => c.unwrap_or("format"),
            Expect::Framing => "framing",
        }
    }

    fn restore_kinds(self) -> &'static [ErrorKind] {
        match self {
            Expect::Component(..) | Expect::Missing(_) | Expect::Framing => &[ErrorKind::Corrupt],
            Expect::Version(_) => &[ErrorKind::Unsupported],
            Expect::Unknown(_) => &[ErrorKind::Corrupt, ErrorKind::Unsupported],
        }
    }

    fn typed(self, e: &VmError) -> bool {
        match (self, e) {
            (
                Expect::Component(c, v),
                VmError::StateComponent {
                    component, vcpu, ..
                },
            ) => *component == c && *vcpu == v,
            (Expect::Missing(c), VmError::StateMissingComponent { component }) => *component == c,
            (Expect::Version(c), VmError::StateVersion { component, .. }) => *component == c,
            (Expect::Unknown(c), VmError::StateUnknownComponent { name }) => name == c,
            (Expect::Framing, VmError::StateFraming { .. }) => true,
            _ => false,
        }
    }
}

fn cut(b: &mut Vec<u8>, n: usize) {
    b.truncate(n);
}

/// Grow a list to `n` entries, repeating its first.
fn grow(list: &mut Vec<Vec<u8>>, n: usize) {
    let first = list[0].clone();
    list.resize(n, first);
}

fn state_lies() -> Vec<StateLie> {
    let l = |what, component, vcpu, edit| StateLie {
        what,
        expect: Expect::Component(component, vcpu),
        edit,
    };
    let c = |what, expect, edit| StateLie { what, expect, edit };
    vec![
        l("regs cut to 7 bytes", "regs", Some(1), |s| {
            s.vcpu(1, |v| cut(v.field("regs"), 7))
        }),
        l("sregs cut to 7 bytes", "sregs", Some(1), |s| {
            s.vcpu(1, |v| cut(v.field("sregs"), 7))
        }),
        l("xsave cut to 7 bytes", "xsave", Some(0), |s| {
            s.vcpu(0, |v| cut(v.field("xsave"), 7))
        }),
        l("xcrs cut to 7 bytes", "xcrs", Some(0), |s| {
            s.vcpu(0, |v| cut(v.field("xcrs"), 7))
        }),
        l("lapic cut to 7 bytes", "lapic", Some(1), |s| {
            s.vcpu(1, |v| cut(v.field("lapic"), 7))
        }),
        l("events cut to 7 bytes", "events", Some(0), |s| {
            s.vcpu(0, |v| cut(v.field("events"), 7))
        }),
        l("debugregs cut to 7 bytes", "debugregs", Some(1), |s| {
            s.vcpu(1, |v| cut(v.field("debugregs"), 7))
        }),
        l(
            "mp_state cut to 3 of its 4 bytes",
            "mp_state",
            Some(0),
            |s| s.vcpu(0, |v| cut(v.field("mp_state"), 3)),
        ),
        l("mp_state of 7 bytes", "mp_state", Some(1), |s| {
            s.vcpu(1, |v| v.field("mp_state").resize(7, 0))
        }),
        l("regs one byte too long", "regs", Some(0), |s| {
            s.vcpu(0, |v| v.field("regs").push(0))
        }),
        l("cpuid empty", "cpuid", Some(1), |s| {
            s.vcpu(1, |v| v.cpuid.clear())
        }),
        l("cpuid entry cut to 39 bytes", "cpuid", Some(0), |s| {
            s.vcpu(0, |v| cut(&mut v.cpuid[0], 39))
        }),
        l("cpuid of 257 entries", "cpuid", Some(0), |s| {
            s.vcpu(0, |v| grow(&mut v.cpuid, 257))
        }),
        l("MSR list of 1025 entries", "msrs", Some(1), |s| {
            s.vcpu(1, |v| grow(&mut v.msrs, 1025))
        }),
        l("MSR entry cut to 7 bytes", "msrs", Some(0), |s| {
            s.vcpu(0, |v| cut(&mut v.msrs[0], 7))
        }),
        l("nr_xcrs 17", "xcrs", Some(1), |s| {
            s.vcpu(1, |v| {
                v.field("xcrs")[..4].copy_from_slice(&17u32.to_le_bytes())
            })
        }),
        l("duplicate vCPU id", "id", Some(1), |s| {
            s.vcpu(1, |v| v.id = 0)
        }),
        l("vCPU id out of range", "id", Some(1), |s| {
            s.vcpu(1, |v| v.id = 2)
        }),
        l("vCPU id 300", "id", Some(0), |s| s.vcpu(0, |v| v.id = 300)),
        l("vCPU states swapped", "id", Some(0), |s| {
            let a = s.0.iter().position(|x| x.0 == "vcpu").expect("vcpu");
            s.0.swap(a, a + 1)
        }),
        l("one vCPU state missing", "vcpu", None, |s| {
            let a = s.0.iter().position(|x| x.0 == "vcpu").expect("vcpu");
            s.0.remove(a);
        }),
        l("machine says 3 vCPUs", "vcpu", None, |s| {
            s.body("machine", 0)[8] = 3
        }),
        l("machine says 0 vCPUs, no states", "machine", None, |s| {
            s.body("machine", 0)[8] = 0;
            s.remove("vcpu");
        }),
        l("pic_master cut to 7 bytes", "pic_master", None, |s| {
            s.blobs("irqchip", |b| cut(&mut b[0], 7))
        }),
        l(
            "ioapic with the PIC master's chip id",
            "ioapic",
            None,
            |s| s.blobs("irqchip", |b| b[2][..4].fill(0)),
        ),
        l("pit cut to 7 bytes", "pit", None, |s| {
            s.blobs("pit", |b| cut(&mut b[0], 7))
        }),
        l("clock cut to 7 bytes", "clock", None, |s| {
            s.blobs("clock", |b| cut(&mut b[0], 7))
        }),
        l("one guest slot for 2 vCPUs", "slots", None, |s| {
            edit_slots(s, |v| v.truncate(1))
        }),
        l("serial FIFO of 65 bytes", "serial", None, |s| {
            set_serial_fifo(s, &[0; 65])
        }),
        // The container's rules.
        c("an unknown component", Expect::Unknown("virtio_blk"), |s| {
            s.push("virtio_blk", vec![0; 4])
        }),
        c(
            "an unknown component first",
            Expect::Unknown("virtio_blk"),
            |s| s.0.insert(0, ("virtio_blk".into(), 1, Vec::new())),
        ),
        c("pit at version 2", Expect::Version(Some("pit")), |s| {
            s.section("pit").1 = 2
        }),
        c("a vCPU at version 2", Expect::Version(Some("vcpu")), |s| {
            s.0.iter_mut()
                .filter(|x| x.0 == "vcpu")
                .nth(1)
                .expect("vcpu")
                .1 = 2
        }),
        c(
            "serial at version 0",
            Expect::Version(Some("serial")),
            |s| s.section("serial").1 = 0,
        ),
        c("format version 3", Expect::Version(None), |s| s.1 = 3),
        c("pit missing", Expect::Missing("pit"), |s| s.remove("pit")),
        c("machine missing", Expect::Missing("machine"), |s| {
            s.remove("machine")
        }),
        c(
            "guest missing",
            Expect::Missing("builtin_guest or kernel"),
            |s| s.remove("builtin_guest"),
        ),
        c("clock twice", Expect::Component("clock", None), |s| {
            let x = s.section("clock").clone();
            s.0.push(x)
        }),
        c(
            "a kernel beside the built-in guest",
            Expect::Component("kernel", None),
            // kernel "/k", no initrd, empty command line.
            |s| s.push("kernel", vec![2, 0, 0, 0, b'/', b'k', 0, 0, 0, 0, 0]),
        ),
        c(
            "a byte after the irqchip's last field",
            Expect::Component("irqchip", None),
            |s| s.body("irqchip", 0).push(0),
        ),
        c(
            "a byte after the first vCPU's last field",
            Expect::Component("vcpu", Some(0)),
            |s| s.body("vcpu", 0).push(0),
        ),
        c("a section name in capitals", Expect::Framing, |s| {
            s.section("pit").0 = "PIT".into()
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// Running them
// ---------------------------------------------------------------------------------------------

/// What each step is doing, for the watchdog's message.
static CURRENT: Mutex<String> = Mutex::new(String::new());

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic>".into())
}

/// A complete snapshot file carrying `state` (2 MiB of guest memory, a few pages of data).
fn write_file(path: &Path, state: &[u8], config: &[u8]) {
    let regions = vec![MemRegion {
        gpa: 0,
        size: MEM_BYTES,
    }];
    let mut header = SnapshotHeader::new(regions, 2, config.to_vec());
    header.compression = Compression::None;
    let sink = AtomicFileSink::create(path).expect("create snapshot");
    let mut w = SnapshotWriter::new(sink, &header, state).expect("writer");
    let mut data = vec![0u8; MEM_BYTES as usize];
    for (i, page) in data.chunks_mut(4096).enumerate().step_by(7) {
        page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    }
    w.write_pages(0, &data).expect("write pages");
    w.finish().expect("finish");
}

/// How the machine state of the file at `path` decodes: through restore's path
/// (`vm_snapshot::machine_state` on the opened reader: a refusal is a `FormatError`) and
/// through `MachineState::from_bytes` directly (the typed error restore's message comes from).
/// Panics are caught and reported.
type StateDecoding = (Result<(), FormatError>, Result<(), VmError>);

fn try_decode_state(path: &Path) -> Result<Result<StateDecoding, FormatError>, String> {
    panic::catch_unwind(|| {
        let r = SnapshotReader::open(path)?;
        Ok((
            vm_snapshot::machine_state(&r).map(drop),
            MachineState::from_bytes(r.machine_state()).map(drop),
        ))
    })
    .map_err(|p| panic_text(&*p))
}

/// The file itself must be sound: open and verify accept it.
fn file_is_sound(path: &Path) -> Result<(), String> {
    let r = panic::catch_unwind(AssertUnwindSafe(|| {
        SnapshotReader::open(path)?.verify(&mut |_| {}).map(drop)
    }));
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{:?}: {e}", e.kind())),
        Err(p) => Err(format!("PANIC: {}", panic_text(&*p))),
    }
}

/// Check one damaged state; failures are appended to `failures`.
fn check_lie(lie: &StateLie, path: &Path, failures: &mut Vec<String>, panics: &mut usize) {
    let what = format!("machine state {}", lie.what);
    let (named, kinds) = (lie.expect.named(), lie.expect.restore_kinds());
    if let Err(e) = file_is_sound(path) {
        failures.push(format!("{what}: the file itself was refused: {e}"));
        return;
    }
    match try_decode_state(path) {
        Err(p) => {
            *panics += 1;
            failures.push(format!("{what}: PANIC: {p}"));
        }
        Ok(Err(e)) => failures.push(format!("{what}: open failed: {e}")),
        Ok(Ok((restore, typed))) => {
            match restore {
                Ok(()) => failures.push(format!("{what}: restore's decoding accepted it")),
                Err(e) if !kinds.contains(&e.kind()) || !e.to_string().contains(named) => {
                    failures.push(format!(
                        "{what}: restore refused it as {e:?}, expected {kinds:?} naming {named}"
                    ));
                }
                Err(_) => {}
            }
            let as_expected = typed
                .as_ref()
                .is_err_and(|e| lie.expect.typed(e) && e.to_string().contains(named));
            if !as_expected {
                failures.push(format!(
                    "{what}: from_bytes gave {typed:?}, expected {:?}",
                    lie.expect
                ));
            }
        }
    }
}

/// Flip bytes through the whole blob, decoded as restore would get them (the reader hands over
/// exactly these bytes, its crc recomputed by the writer); returns the number of flips.
fn flips(blob: &[u8], failures: &mut Vec<String>, panics: &mut usize) -> usize {
    let step = (blob.len() / (2000 / THIN)).max(1);
    let mut n = 0;
    for (k, at) in (0..blob.len()).step_by(step).enumerate() {
        let mut bad = blob.to_vec();
        bad[at] ^= FLIP_MASKS[k % FLIP_MASKS.len()];
        n += 1;
        if let Err(p) = panic::catch_unwind(|| MachineState::from_bytes(&bad).map(drop)) {
            *panics += 1;
            failures.push(format!(
                "machine state byte {at} flipped: decoding PANIC: {}",
                panic_text(&*p)
            ));
        }
    }
    n
}

fn sweep() {
    // A real VM first, outside the address-space limit (guest memory, vCPU threads).
    let state = machine_state_blob();
    let config = config_json(&state);
    limit_address_space();
    let reported = AtomicUsize::new(0);
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if reported.fetch_add(1, Ordering::Relaxed) < 5 {
            default_hook(info);
        }
    }));
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("machine-state-sweep-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("state-lie.snap");

    // The undamaged state passes every check, so each refusal below is the damage's.
    write_file(&path, &state, &config);
    file_is_sound(&path).expect("the undamaged file");
    let r = SnapshotReader::open(&path).expect("open");
    vm_snapshot::machine_state(&r).expect("the undamaged state decodes");
    let good = Sections::parse(&state);
    assert_eq!(good.encode(), state, "the test's reading of the state");

    let (mut failures, mut panics) = (Vec::new(), 0);
    let t0 = Instant::now();
    let lies = state_lies();
    for lie in &lies {
        *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = lie.what.to_string();
        let mut s = good.clone();
        (lie.edit)(&mut s);
        write_file(&path, &s.encode(), &config);
        check_lie(lie, &path, &mut failures, &mut panics);
    }
    *CURRENT.lock().unwrap_or_else(|p| p.into_inner()) = "byte flips".into();
    let nflips = flips(&state, &mut failures, &mut panics);
    let _ = fs::remove_dir_all(&dir);

    eprintln!(
        "machine state sweep: {} B state, {} damaged states refused by name, \
         {nflips} byte flips decoded ({:.1?})",
        state.len(),
        lies.len(),
        t0.elapsed()
    );
    for f in failures.iter().take(40) {
        eprintln!("  FAIL {f}");
    }
    assert_eq!(panics, 0, "the state decoding panicked");
    assert!(
        failures.is_empty(),
        "{} damaged states were not refused as expected (first: {})",
        failures.len(),
        failures[0]
    );
}

/// Run `f` on its own thread; fail (naming what was running) if it takes longer than `limit`.
fn with_deadline(limit: Duration, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => h.join().expect("sweep thread"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = h.join() {
                panic::resume_unwind(p);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let now = CURRENT.lock().unwrap_or_else(|p| p.into_inner()).clone();
            panic!("machine state sweep hung (> {limit:?}); running: {now}");
        }
    }
}

#[test]
fn machine_states_only_decoding_can_catch_are_refused_by_name() {
    with_deadline(Duration::from_secs(300), sweep);
}
