//! The devices the VMM emulates in user space, on a port bus and an MMIO bus ([`bus`]).
//!
//! Every VM has the port devices of `PORT_DEVICES`: COM1, the POST code port and the two reset
//! ports. The built-in guest also has its control ports ([`GUEST_CONTROL_PORTS`]). Nothing is on
//! the MMIO bus yet. PIC, PIT, IOAPIC and LAPIC are KVM's in-kernel devices and never reach
//! these buses. What happens to accesses no device claims is the vCPU loop's policy (see
//! [`crate::vcpu`]).
//!
//! To add a port device every VM has: implement [`BusDevice`] and add a row to `PORT_DEVICES`.
//! The port bus is built from that table, and a kernel's boot TSS opens exactly those ports
//! ([`crate::arch::gdt::BOOT_IO_PORTS`]).

pub mod bus;

use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use bus::{Bus, BusAccess, BusAction, BusDevice, BusError, BusRange, VmEnd};

use crate::guest::ctrl::port;
use crate::serial::{SerialPort, COM1_BASE, COM1_LEN};
use crate::vcpu::Shared;

/// A port device every VM has, at its ports.
pub(crate) struct PortDevice {
    /// First port.
    pub base: u16,
    /// Number of ports.
    pub len: u16,
    /// Builds the device for one VM.
    pub make: fn(&PortDeviceContext) -> Arc<dyn BusDevice>,
}

/// The parts of a VM that port devices are built around.
pub(crate) struct PortDeviceContext {
    /// COM1, which the VM handle reaches too (console input, state capture).
    pub com1: Arc<SerialPort>,
}

/// Every VM's port devices: the one place a port device is added.
pub(crate) const PORT_DEVICES: &[PortDevice] = &[
    PortDevice {
        base: 0x64,
        len: 1,
        make: |_| Arc::new(KeyboardController),
    },
    PortDevice {
        base: 0x80,
        len: 1,
        make: |_| Arc::new(PostCode),
    },
    PortDevice {
        base: COM1_BASE,
        len: COM1_LEN,
        make: |c| c.com1.clone(),
    },
    PortDevice {
        base: 0xCF9,
        len: 1,
        make: |_| Arc::new(ResetControl),
    },
];

/// The built-in guest's control ports ([`crate::guest::ctrl::port`]), one contiguous range.
pub const GUEST_CONTROL_PORTS: BusRange = BusRange::new(port::POWEROFF as u64, 6);

const _: () = {
    let ports = [
        port::POWEROFF,
        port::PROGRESS,
        port::IDLE,
        port::CHECK,
        port::PANIC,
        port::FILL_DONE,
    ];
    let mut i = 0;
    while i < ports.len() {
        assert!(GUEST_CONTROL_PORTS.contains(ports[i] as u64));
        i += 1;
    }
};

/// The port bus of a VM: `PORT_DEVICES`, and the built-in guest's control ports when `guest`
/// (the state they report into) is given.
pub(crate) fn port_bus(ctx: &PortDeviceContext, guest: Option<Arc<Shared>>) -> Bus {
    let mut bus = Bus::new();
    // The table and the guest's range are fixed and disjoint (unit-tested), so inserting them
    // cannot fail.
    for d in PORT_DEVICES {
        bus.insert(
            BusRange::new(u64::from(d.base), u64::from(d.len)),
            (d.make)(ctx),
        )
        .expect("PORT_DEVICES has no overlapping ranges");
    }
    if let Some(shared) = guest {
        bus.insert(GUEST_CONTROL_PORTS, Arc::new(GuestControlPorts { shared }))
            .expect("the guest's control ports overlap no PORT_DEVICES range");
    }
    bus
}

/// Port 0x80, the POST diagnostic port: written as a delay idiom; writes are ignored.
#[derive(Debug)]
pub struct PostCode;

impl BusDevice for PostCode {
    fn write(&self, _: BusAccess, _: &[u8]) -> BusAction {
        BusAction::Continue
    }
}

/// Port 0x64, the keyboard controller's command port, for its one command the VMM implements:
/// 0xFE pulses the CPU reset line. Everything else is unclaimed.
#[derive(Debug)]
pub struct KeyboardController;

impl BusDevice for KeyboardController {
    fn write(&self, _: BusAccess, data: &[u8]) -> BusAction {
        match data.first() {
            Some(0xFE) => BusAction::EndVm(VmEnd::Reset),
            _ => BusAction::Unclaimed,
        }
    }
}

/// Port 0xCF9, the reset control register: a write with bit 2 (reset CPU) set resets.
/// Everything else is unclaimed.
#[derive(Debug)]
pub struct ResetControl;

impl BusDevice for ResetControl {
    fn write(&self, _: BusAccess, data: &[u8]) -> BusAction {
        match data.first() {
            Some(v) if v & 0x4 != 0 => BusAction::EndVm(VmEnd::Reset),
            _ => BusAction::Unclaimed,
        }
    }
}

/// The built-in guest's control ports (written only; see [`crate::guest::ctrl::port`]).
#[derive(Debug)]
pub(crate) struct GuestControlPorts {
    shared: Arc<Shared>,
}

impl BusDevice for GuestControlPorts {
    fn write(&self, access: BusAccess, data: &[u8]) -> BusAction {
        let vcpu = usize::from(access.vcpu);
        let Ok(p) = u16::try_from(access.addr()) else {
            return BusAction::Unclaimed;
        };
        match p {
            port::IDLE => {
                if !self.shared.pause_req.load(Ordering::Relaxed) {
                    std::thread::sleep(self.shared.idle_sleep);
                }
            }
            port::PROGRESS => {
                self.shared.reports[vcpu].fetch_add(1, Ordering::Relaxed);
            }
            port::FILL_DONE => {
                self.shared.fills_reported[vcpu].store(true, Ordering::Relaxed);
            }
            port::CHECK => {}
            port::POWEROFF => return BusAction::EndVm(VmEnd::PowerOff),
            port::PANIC => {
                return BusAction::EndVm(VmEnd::GuestPanic {
                    vector: bus::le_u32(data),
                })
            }
            _ => return BusAction::Unclaimed,
        }
        BusAction::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(addr: u64) -> BusAccess {
        BusAccess {
            vcpu: 0,
            base: addr,
            offset: 0,
        }
    }

    #[test]
    fn reset_ports_reset_only_on_their_reset_values() {
        let a = access(0x64);
        assert_eq!(
            KeyboardController.write(a, &[0xFE]),
            BusAction::EndVm(VmEnd::Reset)
        );
        assert_eq!(
            KeyboardController.write(a, &[0xFE, 0x12]),
            BusAction::EndVm(VmEnd::Reset)
        );
        for v in [&[0xFF][..], &[0xD1], &[]] {
            assert_eq!(KeyboardController.write(a, v), BusAction::Unclaimed);
        }
        assert_eq!(KeyboardController.read(a, &mut [0]), BusAction::Unclaimed);
        let a = access(0xCF9);
        for v in [0x04, 0x06, 0x0E] {
            assert_eq!(ResetControl.write(a, &[v]), BusAction::EndVm(VmEnd::Reset));
        }
        for v in [&[0x02][..], &[0x00, 0x04], &[]] {
            assert_eq!(ResetControl.write(a, v), BusAction::Unclaimed);
        }
        assert_eq!(ResetControl.read(a, &mut [0]), BusAction::Unclaimed);
        assert_eq!(PostCode.write(access(0x80), &[0x55]), BusAction::Continue);
        assert_eq!(PostCode.read(access(0x80), &mut [0]), BusAction::Unclaimed);
    }

    #[test]
    fn guest_control_ports_report_into_the_shared_state() {
        let shared = Arc::new(Shared::new(2, false));
        let dev = GuestControlPorts {
            shared: shared.clone(),
        };
        let at = |vcpu, p: u16| BusAccess {
            vcpu,
            base: GUEST_CONTROL_PORTS.base,
            offset: u64::from(p) - GUEST_CONTROL_PORTS.base,
        };
        assert_eq!(
            dev.write(at(1, port::PROGRESS), &[0; 4]),
            BusAction::Continue
        );
        assert_eq!(
            dev.write(at(1, port::PROGRESS), &[0; 4]),
            BusAction::Continue
        );
        assert_eq!(
            dev.write(at(0, port::FILL_DONE), &[0; 4]),
            BusAction::Continue
        );
        assert_eq!(
            dev.write(at(0, port::CHECK), &[1, 0, 0, 0]),
            BusAction::Continue
        );
        assert_eq!(shared.reports[0].load(Ordering::Relaxed), 0);
        assert_eq!(shared.reports[1].load(Ordering::Relaxed), 2);
        assert!(shared.fills_reported[0].load(Ordering::Relaxed));
        assert!(!shared.fills_reported[1].load(Ordering::Relaxed));
        assert_eq!(
            dev.write(at(0, port::POWEROFF), &[0]),
            BusAction::EndVm(VmEnd::PowerOff)
        );
        assert_eq!(
            dev.write(at(1, port::PANIC), &[14, 0, 0, 0]),
            BusAction::EndVm(VmEnd::GuestPanic { vector: 14 })
        );
        assert_eq!(
            dev.read(at(0, port::PROGRESS), &mut [0]),
            BusAction::Unclaimed
        );
    }

    #[test]
    fn port_buses_hold_the_table_and_the_guest_ports_only_for_the_guest() {
        let com1 = Arc::new(SerialPort::for_tests(Box::new(std::io::sink())));
        let ctx = PortDeviceContext { com1 };
        let mut table: Vec<_> = PORT_DEVICES
            .iter()
            .map(|d| BusRange::new(u64::from(d.base), u64::from(d.len)))
            .collect();
        table.sort_by_key(|r| r.base);
        let kernel: Vec<_> = port_bus(&ctx, None).ranges().collect();
        assert_eq!(kernel, table);
        let guest: Vec<_> = port_bus(&ctx, Some(Arc::new(Shared::new(1, false))))
            .ranges()
            .collect();
        let mut want = table.clone();
        want.push(GUEST_CONTROL_PORTS);
        want.sort_by_key(|r| r.base);
        assert_eq!(guest, want);
    }
}
