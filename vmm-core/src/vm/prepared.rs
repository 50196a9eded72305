//! A VM built ahead of its state: the KVM VM, its memory slots and its vCPUs created from the
//! configuration alone, so that a restore whose state arrives later (a live migration's
//! destination) costs only loading the state and starting the vCPUs.

use super::*;

/// A KVM VM and its vCPUs, created for a configuration, waiting for a machine state
/// ([`Vm::prepare`], then [`PreparedVm::restore`]).
pub struct PreparedVm {
    m: Machine,
    fds: Vec<VcpuFd>,
    mem: GuestMemoryMmap,
    cfg: VmConfig,
    gl: GuestLayout,
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVm")
            .field("cfg", &self.cfg)
            .field("vcpus", &self.fds.len())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates the KVM VM for `cfg` around `mem` (slots, irqchip, PIT) and its vCPUs, without
    /// any state: [`PreparedVm::restore`] loads one of the same configuration and starts it.
    pub fn prepare(cfg: &VmConfig, mem: GuestMemoryMmap) -> Result<PreparedVm, VmError> {
        memory::check_layout(&mem, cfg.mem_bytes)?;
        let gl = GuestLayout::new(cfg.mem_bytes, cfg.vcpus, &cfg.guest)?;
        let m = new_machine(&mem)?;
        if !m.xsave_ok {
            return Err(VmError::XsaveTooLarge(
                m.vm_fd.check_extension_int(Cap::Xsave2),
            ));
        }
        let mut fds = Vec::new();
        for id in 0..cfg.vcpus {
            fds.push(
                m.vm_fd
                    .create_vcpu(u64::from(id))
                    .map_err(VmError::vcpu("KVM_CREATE_VCPU", id))?,
            );
        }
        Ok(PreparedVm {
            m,
            fds,
            mem,
            cfg: cfg.clone(),
            gl,
        })
    }
}

impl PreparedVm {
    /// Loads `state` (whose configuration must be the one prepared for, its vCPUs numbered
    /// from 0) and starts the VM, as [`Vm::restore`] does.
    pub fn restore(
        self,
        state: &MachineState,
        serial_out: Box<dyn Write + Send>,
        start_paused: bool,
    ) -> Result<Vm, VmError> {
        state.validate()?;
        if state.config != self.cfg {
            return Err(VmError::StateInvalid(format!(
                "the state's configuration {:?} is not the prepared one {:?}",
                state.config, self.cfg
            )));
        }
        if state
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, s)| usize::from(s.id) != i)
            || state.vcpus.len() != self.fds.len()
        {
            return Err(VmError::StateInvalid(
                "the state's vCPUs are not numbered 0..n for the prepared vCPUs".into(),
            ));
        }
        let PreparedVm {
            m,
            fds,
            mem,
            cfg,
            gl,
        } = self;
        let serial = new_serial(&m.vm_fd, Some(&(&state.serial).into()), serial_out)?;
        for (s, fd) in state.vcpus.iter().zip(&fds) {
            s.restore(fd, m.xsave_ok)?;
        }
        let msr_indices = restore_vm_wide(&m, state)?;
        Vm::start(
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
}
