//! Pause, resume and the freeze instant: a client's pause lasts until its resume, across freezes;
//! a freeze parks every vCPU, captures the machine state, runs the caller's hold (write-protecting
//! guest RAM) and resumes, all under one lock, so no other controller interleaves; a pause that
//! cannot park every vCPU withdraws itself and names the vCPUs that did not stop.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Vm, REKICK_INTERVAL};
use crate::state::MachineState;
use crate::VmError;

/// What the control lock protects.
#[derive(Debug, Default)]
pub(super) struct Control {
    /// A client paused the VM (`pause`) and has not resumed it: a freeze leaves it paused.
    pub(super) user_paused: bool,
}

/// How long each phase of a [`Vm::freeze`] took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FreezeTimes {
    /// Parking every vCPU (zero if the VM was paused already).
    pub pause: Duration,
    /// Capturing the machine state.
    pub capture: Duration,
    /// The caller's work while frozen (e.g. write-protecting guest RAM).
    pub hold: Duration,
    /// Letting the vCPUs run again (zero if the VM stays paused).
    pub resume: Duration,
    /// The longest any vCPU was held out of guest execution, from leaving KVM_RUN for the pause
    /// to leaving its parking spot at the resume: the downtime as the guest sees it (zero if the
    /// VM stays paused). Shorter than [`FreezeTimes::total`] where vCPUs ran on while the pause
    /// waited for the last one to stop.
    pub guest_held: Duration,
}

impl FreezeTimes {
    /// The whole freeze: how long the vCPUs were held (the downtime, for a VM that was running).
    pub fn total(&self) -> Duration {
        self.pause + self.capture + self.hold + self.resume
    }
}

/// The outcome of a successful [`Vm::freeze`].
#[derive(Debug)]
pub struct Frozen<T> {
    /// The machine state at the freeze instant.
    pub state: MachineState,
    /// What the caller's `hold` returned.
    pub held: T,
    /// Phase times.
    pub times: FreezeTimes,
    /// The VM was paused by a client before the freeze and stays paused.
    pub stayed_paused: bool,
}

/// Why a [`Vm::freeze`] failed. Whatever failed, every vCPU the freeze paused runs again (unless
/// the VM ended), and what `hold` returned was dropped.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError<E: std::error::Error + 'static> {
    /// Not every vCPU parked.
    #[error("pausing the vCPUs")]
    Pause(#[source] VmError),
    /// The machine state could not be captured.
    #[error("capturing the machine state")]
    Capture(#[source] VmError),
    /// The caller's work while frozen failed.
    #[error(transparent)]
    Hold(E),
    /// The vCPUs could not be resumed (the VM ended meanwhile).
    #[error("resuming the vCPUs after the freeze")]
    Resume(#[source] VmError),
}

impl Vm {
    pub(super) fn wait_parked(&self, t0: Instant) -> Result<Duration, VmError> {
        let timeout = *self.pause_timeout.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = self.shared.lock();
        let mut last_kick: Option<Instant> = None;
        loop {
            if c.exit_status.is_some() {
                return Err(VmError::NotRunning);
            }
            if c.parked.iter().all(|&p| p) {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                let stuck = c
                    .parked
                    .iter()
                    .enumerate()
                    .filter(|(_, &p)| !p)
                    .map(|(i, _)| i as u8)
                    .collect();
                return Err(VmError::PauseTimeout {
                    stuck,
                    total: c.parked.len(),
                    waited: timeout,
                });
            }
            if last_kick.is_none_or(|k| k.elapsed() >= REKICK_INTERVAL) {
                self.shared.kick_locked(&c);
                last_kick = Some(Instant::now());
            }
            c = self
                .shared
                .cv
                .wait_timeout(c, REKICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// How long a pause (or a freeze) waits for every vCPU to park before it gives up and lets
    /// them run again (default 10 s).
    pub fn set_pause_timeout(&self, t: Duration) {
        *self.pause_timeout.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    pub(super) fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks every vCPU; the caller holds the control lock. If they do not all park, the request
    /// is withdrawn again unless `keep` (a client's pause already in force), so a failed pause
    /// never leaves the VM half-paused.
    fn pause_locked(&self, keep: bool) -> Result<Duration, VmError> {
        let t0 = Instant::now();
        if self.ended() {
            return Err(VmError::NotRunning);
        }
        self.shared.pause_req.store(true, Ordering::SeqCst);
        let r = self.wait_parked(t0);
        if r.is_err() && !keep {
            let _c = self.shared.lock();
            self.shared.pause_req.store(false, Ordering::SeqCst);
            self.shared.cv.notify_all();
        }
        r
    }

    /// Resumes parked vCPUs and waits until all have left their parking spot; the caller holds
    /// the control lock. Returns how long that took and the longest a vCPU was parked.
    fn resume_locked(&self) -> Result<(Duration, Duration), VmError> {
        let t0 = Instant::now();
        let mut c = self.shared.lock();
        if c.exit_status.is_some() {
            return Err(VmError::NotRunning);
        }
        self.shared.pause_req.store(false, Ordering::SeqCst);
        self.shared.cv.notify_all();
        while c.parked.iter().any(|&p| p) && c.exit_status.is_none() {
            c = self
                .shared
                .cv
                .wait_timeout(c, REKICK_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let held = c.held.iter().max().copied().unwrap_or_default();
        Ok((t0.elapsed(), held))
    }

    /// Pauses every vCPU (a client's pause: it lasts until [`Vm::resume`], across freezes);
    /// returns once all are parked, with the time it took. If a vCPU does not park within the
    /// pause timeout, the VM runs on and the error names the vCPUs that did not park.
    pub fn pause(&self) -> Result<Duration, VmError> {
        let mut ctl = self.control();
        let r = self.pause_locked(ctl.user_paused);
        if r.is_ok() {
            ctl.user_paused = true;
        }
        r
    }

    /// Resumes paused vCPUs (ends a client's pause); returns once all have left their parking
    /// spot.
    pub fn resume(&self) -> Result<Duration, VmError> {
        let mut ctl = self.control();
        let r = self.resume_locked().map(|(d, _)| d);
        if r.is_ok() {
            ctl.user_paused = false;
        }
        r
    }

    /// The freeze instant, atomic against every other control operation: parks every vCPU,
    /// captures the machine state, runs `hold` (e.g. write-protecting guest RAM) while still
    /// frozen, and lets the vCPUs run again, all under one lock, so no `resume` from another
    /// client can restart a vCPU in between. A VM a client paused stays paused.
    ///
    /// On any failure the vCPUs this freeze paused run again and whatever `hold` returned is
    /// dropped (make it a guard that undoes its work on drop).
    pub fn freeze<T, E: std::error::Error + 'static>(
        &self,
        hold: impl FnOnce(&MachineState) -> Result<T, E>,
    ) -> Result<Frozen<T>, FreezeError<E>> {
        let ctl = self.control();
        let stay_paused = ctl.user_paused;
        let mut times = FreezeTimes::default();
        if !stay_paused {
            times.pause = self.pause_locked(false).map_err(FreezeError::Pause)?;
        }
        let frozen = || {
            let t = Instant::now();
            let state = self.capture_locked().map_err(FreezeError::Capture)?;
            times.capture = t.elapsed();
            let t = Instant::now();
            let held = hold(&state).map_err(FreezeError::Hold)?;
            times.hold = t.elapsed();
            Ok((state, held))
        };
        let frozen = frozen();
        let resumed = if stay_paused {
            Ok((Duration::ZERO, Duration::ZERO))
        } else {
            self.resume_locked()
        };
        drop(ctl);
        match (frozen, resumed) {
            (Ok((state, held)), Ok((d, guest_held))) => {
                times.resume = d;
                times.guest_held = guest_held;
                Ok(Frozen {
                    state,
                    held,
                    times,
                    stayed_paused: stay_paused,
                })
            }
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(FreezeError::Resume(e)),
        }
    }
}
