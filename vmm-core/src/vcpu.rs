//! vCPU threads: the KVM_RUN loop, VM-exit handling, kicking and parking.
//!
//! # How pause works
//! `Vm::pause` sets `pause_req` and sends every vCPU thread the kick signal. The signal handler
//! runs on the vCPU thread and sets `kvm_run.immediate_exit = 1`, so no kick is lost: if the thread
//! is inside KVM_RUN it leaves with EINTR; if it is about to enter, KVM_RUN returns EINTR at once
//! (after completing any pending port I/O, which keeps the saved state consistent). On EINTR the
//! thread clears `immediate_exit`, sees `pause_req`, releases its `VcpuFd` lock and parks on a
//! condition variable. `pause` returns once every thread has parked (re-kicking every 10 ms in case
//! a thread was busy in the VMM). Pause is only checked after EINTR, never between an I/O exit and
//! the next KVM_RUN, so a parked vCPU never has a half-completed instruction.
//!
//! # Device policy (which I/O the VMM answers)
//! Port and MMIO exits go to the VM's port and MMIO buses ([`crate::devices`]). Both guest kinds
//! have COM1 (0x3f8-0x3ff, vm-superio 16550), port 0x80 (POST code, ignored) and the reset
//! requests (0xFE to 0x64, the keyboard controller; bit 2 to 0xCF9), which end the VM as `Reset`.
//! PIC, PIT and IOAPIC/LAPIC are in the kernel and never reach the VMM. Accesses no device claims
//! (no device there, or one the device does not implement, such as a read of 0x64):
//!
//! - Built-in guest: its own ports ([`crate::guest::ctrl::port`]) are on its port bus; any other
//!   port and any MMIO access to an unbacked address ends the VM with an error, because the
//!   built-in guest never does that unless it is broken.
//! - Kernel VMs: a kernel probes hardware that is not there (other UARTs, the RTC, PCI config
//!   space, the i8042, VGA ...). Reads of any other port return all ones (0xff per byte, what an
//!   absent ISA device reads as), writes are ignored; MMIO reads of unbacked addresses return all
//!   ones and writes are dropped. Every such access is counted ([`UnhandledAccesses`], exposed by
//!   `Vm::unhandled_accesses`) with the first distinct ports, so nothing is silently hidden. The
//!   built-in guest's private ports are not on a kernel VM's bus and fall under the same policy.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::{self, bus, Bus, BusAction, PortDeviceContext, VmEnd};
use crate::serial::{SerialDevice, SerialPort};
use crate::VmError;

/// Offset above SIGRTMIN of the signal used to kick vCPU threads out of KVM_RUN.
pub const KICK_SIGNAL_OFFSET: i32 = 1;

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer was set by this thread to its own vCPU's kvm_run mapping, which stays
        // mapped while the thread runs (the thread holds an Arc to the VcpuFd). A volatile byte
        // store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

/// The kick signal number.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VmError> {
    static RESULT: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = RESULT.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| e.errno())
    });
    r.map_err(|e| VmError::Signal(vmm_sys_util::errno::Error::new(e)))
}

/// Register summary for error reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RegSummary {
    /// General registers rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8..r15.
    pub gprs: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// Flags.
    pub rflags: u64,
    /// Control registers cr0, cr2, cr3, cr4.
    pub cr: [u64; 4],
    /// EFER.
    pub efer: u64,
    /// CS selector.
    pub cs: u16,
    /// Current privilege level (CS.DPL).
    pub cpl: u8,
}

/// A readable account of why a vCPU stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuReport {
    /// vCPU index.
    pub vcpu: u8,
    /// What happened.
    pub reason: String,
    /// Registers at the exit, if they could be read.
    pub regs: Option<RegSummary>,
}

impl std::fmt::Display for CpuReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vCPU {}: {}", self.vcpu, self.reason)?;
        if let Some(r) = &self.regs {
            write!(
                f,
                "\n  rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cpl={}\n  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.gprs[7], r.rflags, r.cs, r.cpl, r.cr[0], r.cr[1], r.cr[2], r.cr[3], r.efer
            )?;
            const N: [&str; 16] = [
                "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
                "r12", "r13", "r14", "r15",
            ];
            for (i, (n, v)) in N.iter().zip(r.gprs.iter()).enumerate() {
                if i % 4 == 0 {
                    write!(f, "\n ")?;
                }
                write!(f, " {n}={v:#x}")?;
            }
        }
        Ok(())
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmExitStatus {
    /// The guest powered off (power-off port, or KVM system event SHUTDOWN).
    PowerOff {
        /// vCPU that asked.
        vcpu: u8,
    },
    /// The guest asked for a reset (0xCF9, keyboard controller, or KVM system event RESET).
    /// The VMM does not reboot; the VM ends.
    Reset {
        /// vCPU that asked.
        vcpu: u8,
    },
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault(CpuReport),
    /// The built-in guest hit an unexpected exception or interrupt.
    GuestPanic(CpuReport),
    /// An exit the VMM cannot handle, a KVM internal error, a failed entry, or a KVM_RUN error.
    Error(CpuReport),
    /// The host stopped the VM (`Vm::shutdown`).
    Stopped,
}

impl std::fmt::Display for VmExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExitStatus::PowerOff { vcpu } => write!(f, "guest powered off (vCPU {vcpu})"),
            VmExitStatus::Reset { vcpu } => write!(f, "guest requested reset (vCPU {vcpu})"),
            VmExitStatus::TripleFault(r) => write!(f, "triple fault: {r}"),
            VmExitStatus::GuestPanic(r) => write!(f, "guest panic: {r}"),
            VmExitStatus::Error(r) => write!(f, "VM error: {r}"),
            VmExitStatus::Stopped => write!(f, "stopped by the host"),
        }
    }
}

/// Coordination state shared by the VM handle and its vCPU threads.
#[derive(Debug)]
pub(crate) struct Shared {
    pub pause_req: AtomicBool,
    pub stop_req: AtomicBool,
    pub ctl: Mutex<Ctl>,
    pub cv: Condvar,
    pub reports: Vec<AtomicU64>,
    pub fills_reported: Vec<AtomicBool>,
    pub serial_errors: Arc<AtomicU64>,
    pub idle_sleep: Duration,
}

#[derive(Debug)]
pub(crate) struct Ctl {
    pub parked: Vec<bool>,
    /// How long each vCPU's last parking lasted, from leaving guest execution to leaving the
    /// parking spot (set before `parked` is cleared).
    pub held: Vec<Duration>,
    pub exited: Vec<bool>,
    pub tids: Vec<Option<libc::pthread_t>>,
    pub exit_status: Option<VmExitStatus>,
}

impl Shared {
    pub fn new(n: usize, start_paused: bool) -> Self {
        Shared {
            pause_req: AtomicBool::new(start_paused),
            stop_req: AtomicBool::new(false),
            ctl: Mutex::new(Ctl {
                parked: vec![false; n],
                held: vec![Duration::ZERO; n],
                exited: vec![false; n],
                tids: vec![None; n],
                exit_status: None,
            }),
            cv: Condvar::new(),
            reports: (0..n).map(|_| AtomicU64::new(0)).collect(),
            fills_reported: (0..n).map(|_| AtomicBool::new(false)).collect(),
            serial_errors: Arc::default(),
            idle_sleep: Duration::from_millis(1),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the kick signal to every live vCPU thread. Caller holds `ctl`.
    pub fn kick_locked(&self, ctl: &Ctl) {
        for tid in ctl.tids.iter().flatten() {
            // SAFETY: `tid` belongs to a vCPU thread that has not yet cleared its entry, i.e. has
            // not exited (it clears the entry under this lock before exiting), so it is valid.
            unsafe { libc::pthread_kill(*tid, kick_signal()) };
        }
    }

    /// Records how the VM ended (first one wins) and stops every vCPU.
    pub fn end(&self, status: VmExitStatus) {
        let mut c = self.lock();
        if c.exit_status.is_none() {
            c.exit_status = Some(status);
        }
        self.stop_req.store(true, Ordering::SeqCst);
        self.kick_locked(&c);
        self.cv.notify_all();
    }
}

/// Kernel VMs: accesses answered by the lenient device policy (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UnhandledAccesses {
    /// Port reads answered with all ones.
    pub port_reads: u64,
    /// Port writes ignored.
    pub port_writes: u64,
    /// MMIO reads of unbacked addresses answered with all ones.
    pub mmio_reads: u64,
    /// MMIO writes to unbacked addresses dropped.
    pub mmio_writes: u64,
    /// The first distinct ports involved (at most [`UNHANDLED_PORTS_KEPT`]), ascending.
    pub ports: Vec<u16>,
}

/// How many distinct unhandled ports [`UnhandledAccesses`] lists.
pub const UNHANDLED_PORTS_KEPT: usize = 64;

/// Counters behind [`UnhandledAccesses`].
#[derive(Debug, Default)]
pub(crate) struct UnhandledCounters {
    port_reads: AtomicU64,
    port_writes: AtomicU64,
    mmio_reads: AtomicU64,
    mmio_writes: AtomicU64,
    ports: Mutex<BTreeSet<u16>>,
}

impl UnhandledCounters {
    fn port(&self, p: u16) {
        let mut s = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < UNHANDLED_PORTS_KEPT {
            s.insert(p);
        }
    }

    pub fn snapshot(&self) -> UnhandledAccesses {
        UnhandledAccesses {
            port_reads: self.port_reads.load(Ordering::Relaxed),
            port_writes: self.port_writes.load(Ordering::Relaxed),
            mmio_reads: self.mmio_reads.load(Ordering::Relaxed),
            mmio_writes: self.mmio_writes.load(Ordering::Relaxed),
            ports: self
                .ports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .copied()
                .collect(),
        }
    }
}

/// Devices a vCPU thread needs for exits handled in user space.
pub(crate) struct IoBus {
    /// COM1's UART, also on `pio`.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Port devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    pub mem: GuestMemoryMmap,
    /// True for kernel VMs: the lenient device policy applies.
    pub kernel_vm: bool,
    pub unhandled: UnhandledCounters,
}

impl IoBus {
    /// The buses of a VM with console `serial`: a kernel VM's when `kernel_vm`, else the
    /// built-in guest's (its control ports report into `shared`).
    pub fn new(
        serial: SerialDevice,
        mem: GuestMemoryMmap,
        kernel_vm: bool,
        shared: &Arc<Shared>,
    ) -> Self {
        let serial = Arc::new(Mutex::new(serial));
        let ctx = PortDeviceContext {
            com1: Arc::new(SerialPort::new(
                Arc::clone(&serial),
                Arc::clone(&shared.serial_errors),
            )),
        };
        let guest = (!kernel_vm).then(|| Arc::clone(shared));
        IoBus {
            serial,
            pio: devices::port_bus(&ctx, guest),
            mmio: Bus::new(),
            mem,
            kernel_vm,
            unhandled: UnhandledCounters::default(),
        }
    }
}

impl std::fmt::Debug for IoBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBus").finish_non_exhaustive()
    }
}

enum Handled {
    Continue,
    End(EndKind),
}

enum EndKind {
    PowerOff,
    Reset,
    TripleFault,
    Panic(String),
    Error(String),
}

pub(crate) fn summarize(fd: &VcpuFd) -> Option<RegSummary> {
    let r = fd.get_regs().ok()?;
    let s = fd.get_sregs().ok()?;
    Some(RegSummary {
        gprs: [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        rip: r.rip,
        rflags: r.rflags,
        cr: [s.cr0, s.cr2, s.cr3, s.cr4],
        efer: s.efer,
        cs: s.cs.selector,
        cpl: s.cs.dpl,
    })
}

/// One vCPU thread.
pub(crate) struct VcpuRunner {
    pub id: u8,
    pub fd: Arc<Mutex<VcpuFd>>,
    pub shared: Arc<Shared>,
    pub io: Arc<IoBus>,
}

impl VcpuRunner {
    pub fn run(self) {
        // The kick must reach this thread even if the spawner blocked the signal.
        let _ = vmm_sys_util::signal::unblock_signal(kick_signal());
        {
            let mut fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
            let p: *mut kvm_run = fd.get_kvm_run();
            KVM_RUN_PTR.with(|c| c.set(p));
        }
        {
            let mut c = self.shared.lock();
            // SAFETY: pthread_self has no preconditions.
            c.tids[usize::from(self.id)] = Some(unsafe { libc::pthread_self() });
        }
        loop {
            if self.shared.stop_req.load(Ordering::SeqCst) {
                break;
            }
            if self.shared.pause_req.load(Ordering::SeqCst) {
                self.park();
                continue;
            }
            let mut fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(end) = self.run_until_interrupted(&mut fd) {
                let regs = summarize(&fd);
                let report = |reason: String| CpuReport {
                    vcpu: self.id,
                    reason,
                    regs: regs.clone(),
                };
                let status = match end {
                    EndKind::PowerOff => VmExitStatus::PowerOff { vcpu: self.id },
                    EndKind::Reset => VmExitStatus::Reset { vcpu: self.id },
                    EndKind::TripleFault => VmExitStatus::TripleFault(report(
                        "KVM_EXIT_SHUTDOWN (triple fault or shutdown cycle)".into(),
                    )),
                    EndKind::Panic(s) => VmExitStatus::GuestPanic(report(s)),
                    EndKind::Error(s) => VmExitStatus::Error(report(s)),
                };
                drop(fd);
                self.shared.end(status);
                break;
            }
        }
        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
        let mut c = self.shared.lock();
        c.tids[usize::from(self.id)] = None;
        c.exited[usize::from(self.id)] = true;
        self.shared.cv.notify_all();
    }

    fn park(&self) {
        let since = Instant::now();
        let mut c = self.shared.lock();
        c.parked[usize::from(self.id)] = true;
        self.shared.cv.notify_all();
        while self.shared.pause_req.load(Ordering::SeqCst)
            && !self.shared.stop_req.load(Ordering::SeqCst)
        {
            c = self.shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        c.held[usize::from(self.id)] = since.elapsed();
        c.parked[usize::from(self.id)] = false;
        self.shared.cv.notify_all();
    }

    /// Runs until a kick (returns None) or until the VM must end.
    fn run_until_interrupted(&self, fd: &mut VcpuFd) -> Option<EndKind> {
        loop {
            let handled = match fd.run() {
                Ok(exit) => self.handle_exit(exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    fd.set_kvm_immediate_exit(0);
                    if self.shared.stop_req.load(Ordering::SeqCst)
                        || self.shared.pause_req.load(Ordering::SeqCst)
                    {
                        return None;
                    }
                    Handled::Continue
                }
                Err(e) => Handled::End(EndKind::Error(format!("KVM_RUN failed: {e}"))),
            };
            match handled {
                Handled::Continue => {}
                Handled::End(EndKind::Panic(s)) => {
                    return Some(EndKind::Panic(self.panic_detail(fd, s)))
                }
                Handled::End(EndKind::Error(s)) if s == INTERNAL => {
                    return Some(EndKind::Error(internal_error_detail(fd)))
                }
                Handled::End(k) => return Some(k),
            }
        }
    }

    fn panic_detail(&self, fd: &VcpuFd, s: String) -> String {
        let Ok(r) = fd.get_regs() else { return s };
        let mut frame = [0u64; 7];
        for (i, w) in frame.iter_mut().enumerate() {
            *w = self
                .io
                .mem
                .read_obj(GuestAddress(r.rsp + 8 * i as u64))
                .unwrap_or(u64::MAX);
        }
        format!(
            "{s}: vector {} error code {:#x} at rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} ss={:#x}",
            frame[0], frame[1], frame[2], frame[3], frame[4], frame[5], frame[6]
        )
    }

    fn handle_exit(&self, exit: VcpuExit<'_>) -> Handled {
        match exit {
            VcpuExit::IoOut(p, data) => {
                let done = self.io.pio.write(self.id, u64::from(p), data);
                after_bus(done, || self.unclaimed_port_write(p, data))
            }
            VcpuExit::IoIn(p, data) => {
                let done = self.io.pio.read(self.id, u64::from(p), data);
                after_bus(done, || self.unclaimed_port_read(p, data))
            }
            VcpuExit::MmioRead(a, data) => {
                let done = self.io.mmio.read(self.id, a, data);
                after_bus(done, || self.unclaimed_mmio_read(a, data))
            }
            VcpuExit::MmioWrite(a, data) => {
                let done = self.io.mmio.write(self.id, a, data);
                after_bus(done, || self.unclaimed_mmio_write(a, data))
            }
            // With the in-kernel irqchip KVM handles HLT itself; if one reaches us, just re-enter
            // (HLT is not shutdown).
            VcpuExit::Hlt => Handled::Continue,
            VcpuExit::Shutdown => Handled::End(EndKind::TripleFault),
            VcpuExit::SystemEvent(t, data) => match t {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Handled::End(EndKind::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Handled::End(EndKind::Reset),
                _ => Handled::End(EndKind::Error(format!(
                    "KVM_EXIT_SYSTEM_EVENT type {t} data {data:x?}"
                ))),
            },
            VcpuExit::FailEntry(reason, cpu) => Handled::End(EndKind::Error(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
            ))),
            VcpuExit::InternalError => Handled::End(EndKind::Error(INTERNAL.into())),
            VcpuExit::Intr => Handled::Continue,
            VcpuExit::MemoryFault { flags, gpa, size } => Handled::End(EndKind::Error(format!(
                "KVM_EXIT_MEMORY_FAULT gpa={gpa:#x} size={size:#x} flags={flags:#x}"
            ))),
            other => Handled::End(EndKind::Error(format!("unexpected VM exit {other:?}"))),
        }
    }
}

impl VcpuRunner {
    // Accesses no device claims, by the device policy in the module docs.

    fn unclaimed_port_write(&self, p: u16, data: &[u8]) -> Handled {
        if !self.io.kernel_vm {
            return Handled::End(EndKind::Error(format!(
                "write of {:#x} ({} bytes) to unhandled I/O port {p:#x}",
                bus::le_u32(data),
                data.len()
            )));
        }
        let u = &self.io.unhandled;
        u.port_writes.fetch_add(1, Ordering::Relaxed);
        u.port(p);
        Handled::Continue
    }

    fn unclaimed_port_read(&self, p: u16, data: &mut [u8]) -> Handled {
        if !self.io.kernel_vm {
            return Handled::End(EndKind::Error(format!(
                "read of {} bytes from unhandled I/O port {p:#x}",
                data.len()
            )));
        }
        data.fill(0xff);
        let u = &self.io.unhandled;
        u.port_reads.fetch_add(1, Ordering::Relaxed);
        u.port(p);
        Handled::Continue
    }

    fn unclaimed_mmio_read(&self, a: u64, data: &mut [u8]) -> Handled {
        if !self.io.kernel_vm {
            return Handled::End(EndKind::Error(format!(
                "MMIO read of {} bytes at unbacked GPA {a:#x}",
                data.len()
            )));
        }
        data.fill(0xff);
        self.io.unhandled.mmio_reads.fetch_add(1, Ordering::Relaxed);
        Handled::Continue
    }

    fn unclaimed_mmio_write(&self, a: u64, data: &[u8]) -> Handled {
        if !self.io.kernel_vm {
            return Handled::End(EndKind::Error(format!(
                "MMIO write of {} bytes at unbacked GPA {a:#x}",
                data.len()
            )));
        }
        self.io
            .unhandled
            .mmio_writes
            .fetch_add(1, Ordering::Relaxed);
        Handled::Continue
    }
}

/// What the vCPU loop does after a bus access: what the device asked for, or `unclaimed` (the
/// device policy) if no device claimed it.
fn after_bus(action: BusAction, unclaimed: impl FnOnce() -> Handled) -> Handled {
    match action {
        BusAction::Unclaimed => unclaimed(),
        BusAction::Continue => Handled::Continue,
        BusAction::EndVm(VmEnd::PowerOff) => Handled::End(EndKind::PowerOff),
        BusAction::EndVm(VmEnd::Reset) => Handled::End(EndKind::Reset),
        BusAction::EndVm(VmEnd::GuestPanic { vector }) => Handled::End(EndKind::Panic(format!(
            "unexpected exception/interrupt vector {vector}"
        ))),
    }
}

const INTERNAL: &str = "KVM_EXIT_INTERNAL_ERROR";

fn internal_error_detail(fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the `internal` union member is the valid one.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let what = match internal.suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event failure",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    };
    format!(
        "{INTERNAL}: suberror {} ({what}), data {:x?}",
        internal.suberror,
        &internal.data[..n]
    )
}
