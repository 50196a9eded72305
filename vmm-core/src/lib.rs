//! KVM guest execution: guest memory, vCPUs, serial, the built-in guest, pause/resume, machine state.
