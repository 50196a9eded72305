//! Write-protect tracking of guest RAM ranges with userfaultfd: register, protect, release, read faults.
//!
//! API CONTRACT (other crates build against these signatures; implementation in progress).

use std::time::Duration;

/// A host virtual address range, page aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    /// Start address (host virtual, page aligned).
    pub start: usize,
    /// Length in bytes (page aligned).
    pub len: usize,
}

/// One write-protect fault: a write to a protected page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WpFault {
    /// Faulting host address (exact, as the kernel reports it).
    pub addr: usize,
    /// True if this was a write-protect fault (always expected here).
    pub wp: bool,
}

/// Errors of the tracker.
#[derive(Debug, thiserror::Error)]
pub enum WpError {
    /// Placeholder until implemented.
    #[error("not implemented")]
    Unimplemented,
}

/// Write-protect tracker. `Send + Sync`: fault reading and releasing may happen on different threads.
#[derive(Debug)]
pub struct WpTracker {}

impl WpTracker {
    /// Open a userfaultfd able to handle kernel-mode faults, negotiate WP features.
    pub fn new() -> Result<Self, WpError> {
        Err(WpError::Unimplemented)
    }
    /// Register a range for write-protect tracking.
    ///
    /// # Safety
    /// The range must stay mapped until it is unregistered or the tracker is dropped.
    pub unsafe fn register(&self, _range: HostRange) -> Result<(), WpError> {
        Err(WpError::Unimplemented)
    }
    /// Write-protect every registered range (also never-touched pages).
    pub fn protect_all(&self) -> Result<(), WpError> {
        Err(WpError::Unimplemented)
    }
    /// Write-protect one range inside a registered range.
    pub fn protect(&self, _range: HostRange) -> Result<(), WpError> {
        Err(WpError::Unimplemented)
    }
    /// Release protection on a range; `wake` wakes threads blocked on it.
    pub fn unprotect(&self, _range: HostRange, _wake: bool) -> Result<(), WpError> {
        Err(WpError::Unimplemented)
    }
    /// Release protection on every registered range and wake everything.
    pub fn unprotect_all(&self) -> Result<(), WpError> {
        Err(WpError::Unimplemented)
    }
    /// Wake threads blocked on a range without changing protection.
    pub fn wake(&self, _range: HostRange) -> Result<(), WpError> {
        Err(WpError::Unimplemented)
    }
    /// Read pending fault events without blocking; appends to `out`, returns how many.
    pub fn read_faults(&self, _out: &mut Vec<WpFault>) -> Result<usize, WpError> {
        Err(WpError::Unimplemented)
    }
    /// Wait up to `timeout` for fault events; appends to `out`, returns how many (0 on timeout).
    pub fn wait_faults(&self, _timeout: Duration, _out: &mut Vec<WpFault>) -> Result<usize, WpError> {
        Err(WpError::Unimplemented)
    }
}
