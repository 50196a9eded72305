//! The `irqchip`, `pit` and `clock` components: KVM's in-kernel PICs and IOAPIC, its PIT, and
//! kvmclock. Restored after the vCPUs exist, in that order (the clock last, so the guest clock
//! resumes from the captured value as close to the restart as possible).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use super::codec::{exact, BodyReader, BodyWriter};
use super::{bad, Component};
use crate::VmError;

/// The in-kernel interrupt controllers (KVM_GET_IRQCHIP, one struct each).
#[derive(Clone, Copy)]
pub struct IrqchipState {
    /// Master PIC.
    pub pic_master: kvm_irqchip,
    /// Slave PIC.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqchipState")
            .field("pic_master", &self.pic_master.chip_id)
            .field("pic_slave", &self.pic_slave.chip_id)
            .field("ioapic", &self.ioapic.chip_id)
            .finish()
    }
}

/// Body, version 1: `pic_master`, `pic_slave`, `ioapic` blobs (`kvm_irqchip` each).
impl Component for IrqchipState {
    const NAME: &'static str = "irqchip";
    const VERSION: u32 = 1;

    fn encode(&self, w: &mut BodyWriter) {
        w.kvm("pic_master", &self.pic_master);
        w.kvm("pic_slave", &self.pic_slave);
        w.kvm("ioapic", &self.ioapic);
    }

    fn decode(r: &mut BodyReader<'_>, _version: u32) -> Result<Self, VmError> {
        Ok(IrqchipState {
            pic_master: exact(r.blob("pic_master")?, "pic_master")?,
            pic_slave: exact(r.blob("pic_slave")?, "pic_slave")?,
            ioapic: exact(r.blob("ioapic")?, "ioapic")?,
        })
    }

    /// Each struct carries its own chip id: KVM_SET_IRQCHIP sets the chip the struct names, so
    /// a wrong id would restore another chip.
    fn check(&self) -> Result<(), VmError> {
        for (name, chip, id) in self.chips() {
            if chip.chip_id != id {
                return Err(bad(
                    name,
                    None,
                    format!("chip id {}, expected {id}", chip.chip_id),
                ));
            }
        }
        Ok(())
    }
}

impl IrqchipState {
    fn chips(&self) -> [(&'static str, &kvm_irqchip, u32); 3] {
        [
            ("pic_master", &self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            ("pic_slave", &self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            ("ioapic", &self.ioapic, KVM_IRQCHIP_IOAPIC),
        ]
    }

    /// Reads the three chips.
    pub(crate) fn capture(vm: &VmFd) -> Result<Self, VmError> {
        let chip = |chip_id| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c)
                .map_err(VmError::kvm("KVM_GET_IRQCHIP"))?;
            Ok::<_, VmError>(c)
        };
        Ok(IrqchipState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Sets PIC master, PIC slave, IOAPIC.
    pub(crate) fn restore(&self, vm: &VmFd) -> Result<(), VmError> {
        for (_, c, _) in self.chips() {
            vm.set_irqchip(c).map_err(VmError::kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

/// The in-kernel PIT (KVM_GET_PIT2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PitState(pub kvm_pit_state2);

/// Body, version 1: one blob (`kvm_pit_state2`).
impl Component for PitState {
    const NAME: &'static str = "pit";
    const VERSION: u32 = 1;

    fn encode(&self, w: &mut BodyWriter) {
        w.kvm("pit", &self.0);
    }

    fn decode(r: &mut BodyReader<'_>, _version: u32) -> Result<Self, VmError> {
        Ok(PitState(exact(r.blob("pit")?, "pit")?))
    }
}

impl PitState {
    /// Reads the PIT.
    pub(crate) fn capture(vm: &VmFd) -> Result<Self, VmError> {
        Ok(PitState(
            vm.get_pit2().map_err(VmError::kvm("KVM_GET_PIT2"))?,
        ))
    }

    /// Sets the PIT.
    pub(crate) fn restore(&self, vm: &VmFd) -> Result<(), VmError> {
        vm.set_pit2(&self.0).map_err(VmError::kvm("KVM_SET_PIT2"))
    }
}

/// kvmclock (KVM_GET_CLOCK).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockState(pub kvm_clock_data);

/// Body, version 1: one blob (`kvm_clock_data`).
impl Component for ClockState {
    const NAME: &'static str = "clock";
    const VERSION: u32 = 1;

    fn encode(&self, w: &mut BodyWriter) {
        w.kvm("clock", &self.0);
    }

    fn decode(r: &mut BodyReader<'_>, _version: u32) -> Result<Self, VmError> {
        Ok(ClockState(exact(r.blob("clock")?, "clock")?))
    }
}

impl ClockState {
    /// Reads kvmclock.
    pub(crate) fn capture(vm: &VmFd) -> Result<Self, VmError> {
        Ok(ClockState(
            vm.get_clock().map_err(VmError::kvm("KVM_GET_CLOCK"))?,
        ))
    }

    /// Sets kvmclock to the captured value. Only the clock is passed: KVM accepts a subset of
    /// the flags it reports.
    pub(crate) fn restore(&self, vm: &VmFd) -> Result<(), VmError> {
        let c = kvm_clock_data {
            clock: self.0.clock,
            ..Default::default()
        };
        vm.set_clock(&c).map_err(VmError::kvm("KVM_SET_CLOCK"))
    }
}
