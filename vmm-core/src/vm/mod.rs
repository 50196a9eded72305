//! The VM handle: building a VM (fresh boot of the built-in guest or of a kernel, or from a
//! [`MachineState`]), pause/resume, capture, progress and self-check of the built-in guest, the
//! serial console's input side, and orderly shutdown.

mod freeze;
mod prepared;

use freeze::Control;
pub use freeze::{FreezeError, FreezeTimes, Frozen};
pub use prepared::PreparedVm;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::arch;
use crate::guest::{self, ctrl, GuestLayout, GuestProgress, SelfCheckVerdict, VcpuVerdict};
use crate::kernel::{self, KernelConfig, LoadedKernel};
use crate::memory::{self, guest_u64};
use crate::serial::{IrqLine, SerialDevice, COM1_GSI};
use crate::state::{
    BuiltinGuestState, ClockState, IrqchipState, MachineState, PitState, VcpuState,
};
use crate::vcpu::{self, IoBus, Shared, UnhandledAccesses, VcpuRunner, VmExitStatus};
use crate::{VmConfig, VmError};

/// How long `pause` waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `pause` re-kicks vCPUs that have not parked yet.
const REKICK_INTERVAL: Duration = Duration::from_millis(10);
/// Where KVM_SET_TSS_ADDR puts its three pages (only used by VMX real-mode emulation).
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// A running (or paused, or ended) VM: the built-in guest or a kernel.
pub struct Vm {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    vm_fd: VmFd,
    _kvm: Kvm,
    io: Arc<IoBus>,
    cfg: VmConfig,
    gl: GuestLayout,
    msr_indices: Vec<u32>,
    xsave_ok: bool,
    quirks: Vec<String>,
    /// Serializes pause, resume, capture and freezes; holds whether a client asked for a pause.
    control: Mutex<Control>,
    pause_timeout: Mutex<Duration>,
    loaded_kernel: Option<LoadedKernel>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("cfg", &self.cfg)
            .field("paused", &self.is_paused())
            .field("exit_status", &self.exit_status())
            .finish_non_exhaustive()
    }
}

struct Machine {
    kvm: Kvm,
    vm_fd: VmFd,
    quirks: Vec<String>,
    xsave_ok: bool,
}

/// Loads the VM-wide part of `state` into `m` once its vCPUs hold theirs: the clock last (see
/// crate::state). Returns the MSR indices the state's vCPUs carry, those later captures save.
fn restore_vm_wide(m: &Machine, state: &MachineState) -> Result<Vec<u32>, VmError> {
    state.irqchip.restore(&m.vm_fd)?;
    state.pit.restore(&m.vm_fd)?;
    state.clock.restore(&m.vm_fd)?;
    Ok(state
        .vcpus
        .first()
        .map(|v| v.msrs.iter().map(|e| e.index).collect())
        .unwrap_or_default())
}

fn new_machine(mem: &GuestMemoryMmap) -> Result<Machine, VmError> {
    vcpu::install_kick_handler()?;
    let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
        (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
        (Cap::Xsave, "KVM_CAP_XSAVE"),
        (Cap::Xcrs, "KVM_CAP_XCRS"),
        (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    let vm_fd = kvm.create_vm().map_err(VmError::kvm("KVM_CREATE_VM"))?;
    let mut quirks = Vec::new();
    let xsave2 = vm_fd.check_extension_int(Cap::Xsave2);
    let xsave_ok = xsave2 <= 4096;
    if !xsave_ok {
        quirks.push(format!(
            "XSAVE area is {xsave2} bytes; machine state capture will fail (KVM_GET_XSAVE carries 4096)"
        ));
    }
    // Only VMX's real-mode emulation uses this; we never run real mode, so a refusal (e.g. on
    // hosts without VMX) is noted rather than fatal.
    if let Err(e) = vm_fd.set_tss_address(KVM_TSS_ADDR) {
        quirks.push(format!(
            "KVM_SET_TSS_ADDR refused ({e}); not needed in long mode"
        ));
    }
    vm_fd
        .create_irq_chip()
        .map_err(VmError::kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd
        .create_pit2(pit)
        .map_err(VmError::kvm("KVM_CREATE_PIT2"))?;
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`; the `Vm` keeps a clone of
        // `mem` (in its IoBus) for at least as long as the VmFd, which is dropped first.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(VmError::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(Machine {
        kvm,
        vm_fd,
        quirks,
        xsave_ok,
    })
}

fn new_serial(
    vm_fd: &VmFd,
    state: Option<&SerialState>,
    out: Box<dyn Write + Send>,
) -> Result<SerialDevice, VmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd
        .register_irqfd(&evt, COM1_GSI)
        .map_err(VmError::kvm("KVM_IRQFD (serial)"))?;
    let line = IrqLine(evt);
    match state {
        None => Ok(Serial::with_events(line, NoEvents, out)),
        Some(s) => Serial::from_state(s, line, NoEvents, out)
            .map_err(|e| VmError::StateInvalid(format!("serial state: {e:?}"))),
    }
}

/// Creates vCPUs `0..vcpus` for a fresh boot: each gets its CPUID, then `per_vcpu` (the boot
/// kind's registers/MSRs; it may add quirks), then its LAPIC setup. vCPU 0 also probes which MSRs
/// can be saved (before `per_vcpu`); the unusable ones are noted in `quirks`. Returns the vCPU fds
/// and the usable MSR indices.
fn create_boot_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    vcpus: u8,
    quirks: &mut Vec<String>,
    mut per_vcpu: impl FnMut(&VcpuFd, u8, &mut Vec<String>) -> Result<(), VmError>,
) -> Result<(Vec<VcpuFd>, Vec<u32>), VmError> {
    let base_cpuid = arch::cpuid::supported(kvm)?;
    let mut msr_indices = Vec::new();
    let mut fds = Vec::new();
    for v in 0..vcpus {
        let fd = vm_fd
            .create_vcpu(u64::from(v))
            .map_err(VmError::vcpu("KVM_CREATE_VCPU", v))?;
        fd.set_cpuid2(&arch::cpuid::for_vcpu(&base_cpuid, v))
            .map_err(VmError::vcpu("KVM_SET_CPUID2", v))?;
        if v == 0 {
            let p = arch::msr::probe(kvm, &fd)?;
            if !p.dropped.is_empty() {
                quirks.push(format!(
                    "{} MSRs listed by KVM cannot be read and set back and are not saved: {:x?}",
                    p.dropped.len(),
                    p.dropped
                ));
            }
            msr_indices = p.usable;
        }
        per_vcpu(&fd, v, quirks)?;
        arch::lapic::setup(&fd, v)?;
        fds.push(fd);
    }
    Ok((fds, msr_indices))
}

impl Vm {
    /// Creates memory for `cfg` and boots the built-in guest; vCPUs are running on return.
    pub fn boot(cfg: VmConfig, serial_out: Box<dyn Write + Send>) -> Result<Vm, VmError> {
        let mem = memory::create_guest_memory(cfg.mem_bytes, cfg.backend)?;
        Self::boot_with_memory(cfg, mem, serial_out)
    }

    /// Boots the built-in guest, or `cfg.kernel` if set, in caller-made memory (laid out as
    /// [`crate::layout`] says).
    pub fn boot_with_memory(
        cfg: VmConfig,
        mem: GuestMemoryMmap,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Vm, VmError> {
        memory::validate_mem_size(cfg.mem_bytes)?;
        memory::check_layout(&mem, cfg.mem_bytes)?;
        let gl = GuestLayout::new(cfg.mem_bytes, cfg.vcpus, &cfg.guest)?;
        if let Some(k) = cfg.kernel.clone() {
            return Self::boot_kernel(cfg, &k, gl, mem, serial_out);
        }
        let prog = guest::program::assemble()?;
        guest::write_boot_image(&mem, cfg.mem_bytes, &gl, &cfg.guest, &prog)?;
        let (vcpus, entry) = (cfg.vcpus, prog.kernel_entry);
        Self::boot_fresh(cfg, gl, mem, serial_out, None, move |fd, v, _| {
            arch::regs::setup(fd, v, vcpus, entry)
        })
    }

    /// Kernel VMs: boot tables, MP table, ACPI MADT, kernel/initrd/command line/zero page, then vCPUs
    /// (CPUID, boot MSRs, LAPIC; only vCPU 0 gets entry registers, the others wait for SIPI).
    fn boot_kernel(
        cfg: VmConfig,
        k: &KernelConfig,
        gl: GuestLayout,
        mem: GuestMemoryMmap,
        serial_out: Box<dyn Write + Send>,
    ) -> Result<Vm, VmError> {
        arch::paging::write_identity_map(&mem, cfg.mem_bytes)?;
        arch::gdt::write_boot_tables(&mem)?;
        arch::mptable::write(&mem, cfg.vcpus)?;
        arch::acpi::write(&mem, cfg.vcpus)?;
        let loaded = kernel::load(&mem, cfg.mem_bytes, k)?;
        let entry = loaded.entry;
        Self::boot_fresh(
            cfg,
            gl,
            mem,
            serial_out,
            Some(loaded),
            move |fd, v, quirks| {
                if v == 0 {
                    arch::regs::setup_kernel_entry(fd, entry)?;
                }
                let refused = arch::msr::set_boot(fd)?;
                if v == 0 && !refused.is_empty() {
                    quirks.push(format!("KVM refused boot MSR values for {refused:x?}"));
                }
                Ok(())
            },
        )
    }

    /// Fresh boots, once the boot image is in `mem`: a new VM and serial port, vCPUs made by
    /// [`create_boot_vcpus`] (with `per_vcpu` for the boot kind's registers/MSRs), running.
    fn boot_fresh(
        cfg: VmConfig,
        gl: GuestLayout,
        mem: GuestMemoryMmap,
        serial_out: Box<dyn Write + Send>,
        loaded_kernel: Option<LoadedKernel>,
        per_vcpu: impl FnMut(&VcpuFd, u8, &mut Vec<String>) -> Result<(), VmError>,
    ) -> Result<Vm, VmError> {
        let mut m = new_machine(&mem)?;
        let serial = new_serial(&m.vm_fd, None, serial_out)?;
        let (fds, msr_indices) =
            create_boot_vcpus(&m.kvm, &m.vm_fd, cfg.vcpus, &mut m.quirks, per_vcpu)?;
        Self::start(
            m,
            fds,
            mem,
            serial,
            cfg,
            gl,
            msr_indices,
            false,
            loaded_kernel,
        )
    }

    /// Builds a fresh VM (new VM and vCPU fds) from `state` around `mem`, which must hold the
    /// guest memory as of the capture. With `start_paused` the vCPUs park before running.
    pub fn restore(
        state: &MachineState,
        mem: GuestMemoryMmap,
        serial_out: Box<dyn Write + Send>,
        start_paused: bool,
    ) -> Result<Vm, VmError> {
        state.validate()?;
        let cfg = state.config.clone();
        memory::check_layout(&mem, cfg.mem_bytes)?;
        let gl = GuestLayout::new(cfg.mem_bytes, cfg.vcpus, &cfg.guest)?;
        let m = new_machine(&mem)?;
        let serial = new_serial(&m.vm_fd, Some(&(&state.serial).into()), serial_out)?;
        if !m.xsave_ok {
            return Err(VmError::XsaveTooLarge(
                m.vm_fd.check_extension_int(Cap::Xsave2),
            ));
        }
        let mut fds = Vec::new();
        for s in &state.vcpus {
            let fd = m
                .vm_fd
                .create_vcpu(u64::from(s.id))
                .map_err(VmError::vcpu("KVM_CREATE_VCPU", s.id))?;
            s.restore(&fd, m.xsave_ok)?;
            fds.push(fd);
        }
        let msr_indices = restore_vm_wide(&m, state)?;
        Self::start(
            m,
            fds,
            mem,
            serial,
            cfg,
            gl,
            msr_indices,
            start_paused,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        m: Machine,
        fds: Vec<VcpuFd>,
        mem: GuestMemoryMmap,
        serial: SerialDevice,
        cfg: VmConfig,
        gl: GuestLayout,
        msr_indices: Vec<u32>,
        start_paused: bool,
        loaded_kernel: Option<LoadedKernel>,
    ) -> Result<Vm, VmError> {
        let Machine {
            kvm,
            vm_fd,
            quirks,
            xsave_ok,
        } = m;
        let n = fds.len();
        let shared = Arc::new(Shared::new(n, start_paused));
        let io = Arc::new(IoBus::new(serial, mem, !cfg.is_builtin_guest(), &shared));
        let vcpus: Vec<Arc<Mutex<VcpuFd>>> =
            fds.into_iter().map(|f| Arc::new(Mutex::new(f))).collect();
        let vm = Vm {
            shared,
            threads: Mutex::new(Vec::new()),
            vcpus,
            vm_fd,
            _kvm: kvm,
            io,
            cfg,
            gl,
            msr_indices,
            xsave_ok,
            quirks,
            control: Mutex::new(Control {
                user_paused: start_paused,
            }),
            pause_timeout: Mutex::new(PAUSE_TIMEOUT),
            loaded_kernel,
        };
        for (i, fd) in vm.vcpus.iter().enumerate() {
            let runner = VcpuRunner {
                id: i as u8,
                fd: Arc::clone(fd),
                shared: Arc::clone(&vm.shared),
                io: Arc::clone(&vm.io),
            };
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || runner.run())
                .map_err(VmError::ThreadSpawn)?;
            vm.threads.lock().unwrap_or_else(|e| e.into_inner()).push(h);
        }
        if start_paused {
            vm.wait_parked(Instant::now())?;
        }
        Ok(vm)
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.io.mem
    }

    /// Configuration.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// Where each vCPU's data lives.
    pub fn guest_layout(&self) -> &GuestLayout {
        &self.gl
    }

    /// Kernel VMs booted by this process: where the kernel went (None for the built-in guest
    /// and for restored VMs, whose memory already holds the kernel).
    pub fn loaded_kernel(&self) -> Option<&LoadedKernel> {
        self.loaded_kernel.as_ref()
    }

    /// Kernel VMs: accesses answered by the lenient device policy so far (see [`crate::vcpu`]).
    pub fn unhandled_accesses(&self) -> UnhandledAccesses {
        self.io.unhandled.snapshot()
    }

    /// Queues `bytes` as input on COM1 (what the guest reads from the UART); returns how many
    /// were accepted, which is fewer when the 64-byte receive FIFO is full (retry the rest later,
    /// or use [`Vm::serial_input`], which does).
    pub fn send_serial_input(&self, bytes: &[u8]) -> Result<usize, VmError> {
        if self.ended() {
            return Err(VmError::NotRunning);
        }
        enqueue(&self.io, bytes)
    }

    /// A `Write` handle feeding COM1's input, for forwarding a terminal's stdin: it blocks
    /// (polling every millisecond) while the guest has not drained the FIFO, and fails with
    /// `BrokenPipe` once the VM has ended. Owned and `Send`, so it can move to a thread.
    pub fn serial_input(&self) -> SerialInput {
        SerialInput {
            io: Arc::clone(&self.io),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Host quirks noticed while building the VM (refused optional ioctls, dropped MSRs ...).
    pub fn quirks(&self) -> &[String] {
        &self.quirks
    }

    /// Number of failed writes to the serial output so far.
    pub fn serial_errors(&self) -> u64 {
        self.shared.serial_errors.load(Ordering::Relaxed)
    }

    fn ended(&self) -> bool {
        self.shared.lock().exit_status.is_some()
    }

    /// True while every vCPU is parked by a pause.
    pub fn is_paused(&self) -> bool {
        let c = self.shared.lock();
        self.shared.pause_req.load(Ordering::SeqCst)
            && c.exit_status.is_none()
            && c.parked.iter().all(|&p| p)
    }

    /// Captures the complete machine state; the VM must be paused. The vCPU ioctls run on the
    /// calling thread (KVM allows that; parked vCPU threads have released their `VcpuFd`).
    pub fn capture_state(&self) -> Result<MachineState, VmError> {
        let _g = self.control();
        self.capture_locked()
    }

    fn capture_locked(&self) -> Result<MachineState, VmError> {
        if !self.is_paused() {
            return Err(VmError::NotPaused);
        }
        if !self.xsave_ok {
            return Err(VmError::XsaveTooLarge(
                self.vm_fd.check_extension_int(Cap::Xsave2),
            ));
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (i, fd) in self.vcpus.iter().enumerate() {
            let fd = fd.lock().unwrap_or_else(|e| e.into_inner());
            vcpus.push(VcpuState::capture(&fd, i as u8, &self.msr_indices)?);
        }
        let irqchip = IrqchipState::capture(&self.vm_fd)?;
        let pit = PitState::capture(&self.vm_fd)?;
        let clock = ClockState::capture(&self.vm_fd)?;
        let serial = self
            .io
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
            .into();
        let (slots, ticks) = if self.cfg.is_builtin_guest() {
            BuiltinGuestState::capture_run(&self.io.mem, self.cfg.vcpus)?
        } else {
            (Vec::new(), 0)
        };
        Ok(MachineState {
            config: self.cfg.clone(),
            vcpus,
            irqchip,
            pit,
            clock,
            serial,
            slots,
            ticks,
            notes: self.quirks.clone(),
        })
    }

    /// The built-in guest's progress, read from guest memory (cheap; any thread, any time).
    /// Kernel VMs have no such progress: all fields are empty.
    pub fn progress(&self) -> GuestProgress {
        if !self.cfg.is_builtin_guest() {
            return GuestProgress::default();
        }
        let mut p = guest::read_progress(&self.io.mem, &self.gl).unwrap_or_default();
        p.reports = self
            .shared
            .reports
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .collect();
        p
    }

    /// Asks every vCPU of the built-in guest to verify its memory (served between steps).
    pub fn request_self_check(&self) -> Result<(), VmError> {
        if !self.cfg.is_builtin_guest() {
            return Err(VmError::NotBuiltinGuest);
        }
        if self.ended() {
            return Err(VmError::NotRunning);
        }
        let req = guest_u64(&self.io.mem, ctrl::global(ctrl::CHECK_REQ))?;
        req.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// The verdict of the latest self-check request, once every vCPU answered it.
    pub fn self_check_result(&self) -> Option<SelfCheckVerdict> {
        if !self.cfg.is_builtin_guest() {
            return None;
        }
        let mem = &self.io.mem;
        let req = guest_u64(mem, ctrl::global(ctrl::CHECK_REQ))
            .ok()?
            .load(Ordering::Acquire);
        if req == 0 {
            return None;
        }
        let mut vcpus = Vec::new();
        for v in 0..self.cfg.vcpus {
            let ack = guest_u64(mem, ctrl::vcpu(v, ctrl::V_CHECK_ACK))
                .ok()?
                .load(Ordering::Acquire);
            if ack != req {
                return None;
            }
            let code = guest_u64(mem, ctrl::vcpu(v, ctrl::V_CHECK_STATUS))
                .ok()?
                .load(Ordering::Acquire);
            let bad = guest_u64(mem, ctrl::vcpu(v, ctrl::V_CHECK_BAD))
                .ok()?
                .load(Ordering::Acquire);
            vcpus.push(VcpuVerdict {
                vcpu: v,
                passed: code == ctrl::CHECK_PASS,
                code,
                first_bad_gpa: (code != ctrl::CHECK_PASS).then_some(bad),
            });
        }
        Some(SelfCheckVerdict { vcpus })
    }

    /// Asks the built-in guest to power off (it writes the power-off port).
    pub fn request_guest_poweroff(&self) -> Result<(), VmError> {
        if !self.cfg.is_builtin_guest() {
            return Err(VmError::NotBuiltinGuest);
        }
        guest_u64(&self.io.mem, ctrl::global(ctrl::POWEROFF_REQ))?.store(1, Ordering::Release);
        Ok(())
    }

    /// How the VM ended, once it has.
    pub fn exit_status(&self) -> Option<VmExitStatus> {
        self.shared.lock().exit_status.clone()
    }

    /// Waits up to `timeout` for the VM to end.
    pub fn wait(&self, timeout: Duration) -> Option<VmExitStatus> {
        let deadline = Instant::now() + timeout;
        let mut c = self.shared.lock();
        loop {
            if let Some(s) = &c.exit_status {
                return Some(s.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            c = self
                .shared
                .cv
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops the vCPUs and joins their threads (idempotent). The memory stays usable.
    pub fn shutdown(&self) {
        self.shared.end(VmExitStatus::Stopped);
        let threads: Vec<JoinHandle<()>> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            // A panicking vCPU thread already recorded nothing useful; the VM is ending anyway.
            let _ = t.join();
        }
        let _ = self
            .io
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .writer_mut()
            .flush();
    }
}

fn enqueue(io: &IoBus, bytes: &[u8]) -> Result<usize, VmError> {
    let mut s = io.serial.lock().unwrap_or_else(|e| e.into_inner());
    let n = bytes.len().min(s.fifo_capacity());
    // vm-superio accepts everything that fits and raises the receive interrupt if enabled; the
    // only error is a failed irqfd write.
    s.enqueue_raw_bytes(&bytes[..n])
        .map_err(|e| VmError::SerialInput(format!("{e:?}")))
}

/// Owned writer into COM1's receive FIFO (see [`Vm::serial_input`]).
pub struct SerialInput {
    io: Arc<IoBus>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialInput").finish_non_exhaustive()
    }
}

impl Write for SerialInput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.shared.lock().exit_status.is_some() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the VM has ended",
                ));
            }
            let n = enqueue(&self.io, buf).map_err(std::io::Error::other)?;
            if n > 0 {
                return Ok(n);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
