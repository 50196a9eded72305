//! The scanner: every unit in address order, claiming what is still protected, skipping the
//! copy of units the kernel says hold no data, releasing each run of claimed sub-blocks in one
//! call (one TLB flush per run; whole huge pages stay huge), throttled by `max_bandwidth`. While
//! the guest writes, it stages into fault staging too (`staging`), at memory speed.

use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use wp_tracker::HostRange;

use super::blocks::PROTECTED;
use super::staging::Nice;
use super::{InjectPoint, Run, SaveError, Shared, Work, PAGE_SIZE, POLL};
use crate::pagemap;

impl Shared<'_> {
    /// Scanner: claim and save every sub-block still protected, one unit at a time in address
    /// order, releasing each run of claimed sub-blocks in one call.
    pub(super) fn scan_loop(&self, max_bandwidth: Option<u64>) -> Result<(), SaveError> {
        let start = Instant::now();
        let mut copied: u64 = 0;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut nice = Nice::new();
        for u in 0..self.blocks.units.len() {
            if self.stopped() {
                return Ok(());
            }
            self.scan_pos.store(u, Ordering::Relaxed);
            nice.set_if(self.copy_first(), self.fault_nice);
            if let Some(InjectPoint::ScannerPanic { after_blocks }) = self.inject {
                if u >= after_blocks {
                    panic!("injected scanner failure");
                }
            }
            let unit = self.blocks.units[u];
            self.push_parent_runs(u);
            let protected = (unit.first..unit.first + unit.count)
                .any(|i| self.blocks.state[i].load(Ordering::Acquire) == PROTECTED);
            if protected {
                copied += self.scan_unit(u, &mut runs, start, copied, max_bandwidth)?;
            }
        }
        self.scan_done.store(true, Ordering::Release);
        Ok(())
    }

    /// Parent runs for the sub-blocks of unit `u` an incremental save inherits (whatever their
    /// state: a fault may have released one, but its content at the freeze is the parent's).
    fn push_parent_runs(&self, u: usize) {
        if self.blocks.inherited.is_empty() {
            return;
        }
        let unit = self.blocks.units[u];
        let mut i = unit.first;
        while i < unit.first + unit.count {
            if !self.blocks.is_inherited(i) {
                i += 1;
                continue;
            }
            let first = i;
            while i < unit.first + unit.count && self.blocks.is_inherited(i) {
                i += 1;
            }
            let r = self.range_of(first, i - first);
            self.bytes_scanned
                .fetch_add(r.len as u64, Ordering::Relaxed);
            self.push_scan_work(Work::Parent {
                first_page: self.blocks.block(first).gpa / PAGE_SIZE as u64,
                pages: (r.len / PAGE_SIZE) as u64,
            });
        }
    }

    /// Save what is still protected of unit `u`; returns the bytes copied.
    fn scan_unit(
        &self,
        u: usize,
        runs: &mut Vec<(usize, usize)>,
        start: Instant,
        copied: u64,
        max_bandwidth: Option<u64>,
    ) -> Result<u64, SaveError> {
        let unit = self.blocks.units[u];
        // Throttle before claiming: a claimed block must never wait on the throttle.
        let range = HostRange::new(unit.host, unit.len);
        let likely_data = pagemap::may_hold_data(self.tracker, range);
        if let (Some(rate), true) = (max_bandwidth, likely_data) {
            let burst = self.blocks.unit_size as u64;
            loop {
                let allowed = (start.elapsed().as_secs_f64() * rate as f64) as u64 + burst;
                if copied + unit.len as u64 <= allowed || self.stopped() {
                    break;
                }
                let wait = (copied + unit.len as u64 - allowed) as f64 / rate.max(1) as f64;
                thread::sleep(Duration::from_secs_f64(wait).min(POLL));
            }
        }
        if likely_data {
            self.yield_to_faults();
        }
        // `grown`: the buffer is fault staging (the guest writes), its work goes with faults'.
        let Some((mut buf, grown)) = self.scan_buffer() else {
            return Ok(0);
        };
        // Released at once even when saved memory stays protected: see `finish_run`.
        let release = grown && self.copy_first();
        // Claim every sub-block still protected, as runs of consecutive sub-blocks.
        runs.clear();
        for i in unit.first..unit.first + unit.count {
            if self.blocks.claim(i).is_ok() {
                match runs.last_mut() {
                    Some((f, n)) if *f + *n == i => *n += 1,
                    _ => runs.push((i, 1)),
                }
            }
        }
        if runs.is_empty() {
            self.release_buffer(buf, grown);
            return Ok(0);
        }
        // Authoritative check while claimed and protected: nothing can appear unseen.
        if !pagemap::may_hold_data(self.tracker, range) {
            self.release_buffer(buf, grown);
            for &(first, n) in runs.iter() {
                self.finish_run(first, n, release)?;
                let r = self.range_of(first, n);
                self.bytes_scanned
                    .fetch_add(r.len as u64, Ordering::Relaxed);
                let first_page = self.blocks.block(first).gpa / PAGE_SIZE as u64;
                let pages = (r.len / PAGE_SIZE) as u64;
                self.push_scan_work(Work::Zero { first_page, pages });
            }
            return Ok(0);
        }
        let mut staged = Vec::with_capacity(runs.len());
        let mut bytes = 0;
        for &(first, n) in runs.iter() {
            let r = self.range_of(first, n);
            let off = r.start - unit.host;
            self.copy_claimed(r, &mut buf[off..off + r.len])?;
            staged.push(Run {
                first_page: self.blocks.block(first).gpa / PAGE_SIZE as u64,
                off,
                len: r.len,
            });
            bytes += r.len;
        }
        for &(first, n) in runs.iter() {
            self.finish_run(first, n, release)?;
        }
        self.bytes_scanned
            .fetch_add(bytes as u64, Ordering::Relaxed);
        let work = Work::Data {
            buf,
            runs: staged,
            fault: grown,
            hot: false,
        };
        if grown {
            self.scan_units_staged.fetch_add(1, Ordering::Relaxed);
            self.push_fault_work(&mut vec![work]);
        } else {
            self.push_scan_work(work);
        }
        Ok(bytes as u64)
    }
}
