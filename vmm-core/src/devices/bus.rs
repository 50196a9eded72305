//! An address bus: non-overlapping ranges of port or MMIO addresses, each served by one device.
//!
//! The vCPU loop hands every port or MMIO exit to a [`Bus`] instead of matching addresses itself,
//! so a device is a [`BusDevice`] inserted at its range, and the loop only applies what the
//! device answers ([`BusAction`]) and the VM's policy for addresses no device claims.

use std::collections::BTreeMap;
use std::sync::Arc;

/// A contiguous range of bus addresses, `base..base + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Number of addresses (at least 1).
    pub len: u64,
}

impl BusRange {
    /// The range `base..base + len`.
    pub const fn new(base: u64, len: u64) -> Self {
        BusRange { base, len }
    }

    /// Last address in the range (inclusive).
    pub const fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }

    /// True if `addr` lies in the range.
    pub const fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }
}

impl std::fmt::Display for BusRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:#x}..={:#x}",
            self.base,
            self.base.saturating_add(self.len.saturating_sub(1))
        )
    }
}

/// One guest access as a device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusAccess {
    /// The vCPU doing the access.
    pub vcpu: u8,
    /// Base of the device's range.
    pub base: u64,
    /// Offset of the accessed address from `base`.
    pub offset: u64,
}

impl BusAccess {
    /// The accessed address.
    pub fn addr(&self) -> u64 {
        self.base + self.offset
    }
}

/// A request from the guest, through a device, that ends the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEnd {
    /// Power off.
    PowerOff,
    /// Reset. The VMM does not reboot; the VM ends.
    Reset,
    /// The built-in guest took an exception or interrupt it does not expect.
    GuestPanic {
        /// The vector.
        vector: u32,
    },
}

/// What the vCPU loop does after an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusAction {
    /// The access is done; the vCPU runs on.
    Continue,
    /// The guest asked for the VM to end.
    EndVm(VmEnd),
    /// No device answers this access (no device at the address, or the device does not implement
    /// it and did nothing): the VM's policy for unhandled accesses applies, as for an empty
    /// address.
    Unclaimed,
}

/// A device on a [`Bus`]. Several vCPU threads call it at once, so it takes `&self` and keeps
/// its mutable state behind its own lock: a bus-wide lock would serialise every vCPU behind the
/// slowest device. Accesses a device does not implement are [`BusAction::Unclaimed`], the
/// default.
pub trait BusDevice: Send + Sync {
    /// The guest reads `data.len()` bytes at `access`; the device fills `data`.
    fn read(&self, access: BusAccess, data: &mut [u8]) -> BusAction {
        let _ = (access, data);
        BusAction::Unclaimed
    }

    /// The guest writes `data` at `access`.
    fn write(&self, access: BusAccess, data: &[u8]) -> BusAction {
        let _ = (access, data);
        BusAction::Unclaimed
    }
}

/// Why a device could not be inserted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The range is empty or runs past the end of the address space.
    #[error("invalid bus range at {base:#x} with length {len:#x}")]
    InvalidRange {
        /// Its base.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("bus range {new} overlaps {existing}")]
    Overlap {
        /// The range being inserted.
        new: BusRange,
        /// The range already on the bus.
        existing: BusRange,
    },
}

struct Entry {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// Devices at non-overlapping address ranges. A VM has one bus for port I/O and one for MMIO.
#[derive(Default)]
pub struct Bus {
    /// Keyed by range base; ranges never overlap, so the entry with the greatest base at or
    /// below an address is the only one that can hold it.
    entries: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges().map(|r| r.to_string()))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `range`, refusing an empty range and one that overlaps another device's.
    pub fn insert(&mut self, range: BusRange, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        if range.len == 0 || range.base.checked_add(range.len - 1).is_none() {
            return Err(BusError::InvalidRange {
                base: range.base,
                len: range.len,
            });
        }
        // The only range that can overlap is the last one starting at or below our last address.
        if let Some(existing) = self.range_at_or_below(range.last()) {
            if existing.last() >= range.base {
                return Err(BusError::Overlap {
                    new: range,
                    existing,
                });
            }
        }
        self.entries.insert(
            range.base,
            Entry {
                len: range.len,
                device,
            },
        );
        Ok(())
    }

    /// The ranges on the bus, ascending.
    pub fn ranges(&self) -> impl Iterator<Item = BusRange> + '_ {
        self.entries
            .iter()
            .map(|(&base, e)| BusRange::new(base, e.len))
    }

    fn range_at_or_below(&self, addr: u64) -> Option<BusRange> {
        self.entries
            .range(..=addr)
            .next_back()
            .map(|(&base, e)| BusRange::new(base, e.len))
    }

    /// The device whose range holds `addr`, and how `vcpu` accesses it there.
    ///
    /// An access is routed by its first address, as x86 decodes port I/O: a multi-byte access
    /// that runs past the end of a range goes entirely to the device at its start.
    fn device_at(&self, vcpu: u8, addr: u64) -> Option<(&Arc<dyn BusDevice>, BusAccess)> {
        let (&base, e) = self.entries.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < e.len).then_some((&e.device, BusAccess { vcpu, base, offset }))
    }

    /// Vcpu `vcpu` reads `data.len()` bytes at `addr`.
    pub fn read(&self, vcpu: u8, addr: u64, data: &mut [u8]) -> BusAction {
        match self.device_at(vcpu, addr) {
            Some((d, access)) => d.read(access, data),
            None => BusAction::Unclaimed,
        }
    }

    /// Vcpu `vcpu` writes `data` at `addr`.
    pub fn write(&self, vcpu: u8, addr: u64, data: &[u8]) -> BusAction {
        match self.device_at(vcpu, addr) {
            Some((d, access)) => d.write(access, data),
            None => BusAction::Unclaimed,
        }
    }
}

/// The value of a port or MMIO write of up to 4 bytes (little-endian; further bytes ignored).
pub fn le_u32(data: &[u8]) -> u32 {
    data.iter()
        .take(4)
        .enumerate()
        .fold(0u32, |a, (i, b)| a | (u32::from(*b) << (8 * i)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records every access; reads answer the offset in each byte.
    #[derive(Default)]
    struct Probe {
        seen: Mutex<Vec<(&'static str, BusAccess, Vec<u8>)>>,
    }

    impl BusDevice for Probe {
        fn read(&self, access: BusAccess, data: &mut [u8]) -> BusAction {
            data.fill(access.offset as u8);
            self.seen
                .lock()
                .unwrap()
                .push(("read", access, data.to_vec()));
            BusAction::Continue
        }
        fn write(&self, access: BusAccess, data: &[u8]) -> BusAction {
            self.seen
                .lock()
                .unwrap()
                .push(("write", access, data.to_vec()));
            BusAction::EndVm(VmEnd::Reset)
        }
    }

    /// Implements nothing: every access is unclaimed.
    struct Mute;
    impl BusDevice for Mute {}

    fn probe() -> Arc<Probe> {
        Arc::new(Probe::default())
    }

    #[test]
    fn overlapping_and_invalid_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(BusRange::new(0x10, 8), probe()).unwrap();
        bus.insert(BusRange::new(0x40, 1), probe()).unwrap();
        for (base, len) in [
            (0x10, 8),    // the same range
            (0x17, 1),    // its last address
            (0x08, 9),    // runs into its first address
            (0x0, 0x100), // covers it
            (0x12, 2),    // inside it
            (0x3f, 2),    // runs into the one-port range
        ] {
            let r = BusRange::new(base, len);
            assert!(
                matches!(bus.insert(r, probe()), Err(BusError::Overlap { new, .. }) if new == r),
                "{r}"
            );
        }
        assert_eq!(
            bus.insert(BusRange::new(0x20, 0), probe()),
            Err(BusError::InvalidRange { base: 0x20, len: 0 })
        );
        assert!(matches!(
            bus.insert(BusRange::new(u64::MAX, 2), probe()),
            Err(BusError::InvalidRange { .. })
        ));
        // Touching ranges on both sides are fine, and so is the very top of the address space.
        bus.insert(BusRange::new(0x08, 8), probe()).unwrap();
        bus.insert(BusRange::new(0x18, 0x28), probe()).unwrap();
        bus.insert(BusRange::new(u64::MAX, 1), probe()).unwrap();
        let ranges: Vec<_> = bus.ranges().map(|r| (r.base, r.len)).collect();
        assert_eq!(
            ranges,
            [(0x08, 8), (0x10, 8), (0x18, 0x28), (0x40, 1), (u64::MAX, 1)]
        );
    }

    #[test]
    fn lookup_finds_a_device_exactly_within_its_range() {
        let (a, b) = (probe(), probe());
        let mut bus = Bus::new();
        bus.insert(BusRange::new(0x3f8, 8), a.clone()).unwrap();
        bus.insert(BusRange::new(0x400, 1), b.clone()).unwrap();
        let mut d = [0u8; 1];
        for addr in [0x3f7, 0x401, 0, u64::MAX] {
            assert_eq!(bus.read(0, addr, &mut d), BusAction::Unclaimed, "{addr:#x}");
            assert_eq!(bus.write(0, addr, &d), BusAction::Unclaimed, "{addr:#x}");
        }
        assert_eq!(bus.read(0, 0x3f8, &mut d), BusAction::Continue);
        assert_eq!(bus.read(0, 0x3ff, &mut d), BusAction::Continue);
        assert_eq!(bus.read(0, 0x400, &mut d), BusAction::Continue);
        let offsets: Vec<_> = a.seen.lock().unwrap().iter().map(|s| s.1.offset).collect();
        assert_eq!(offsets, [0, 7]);
        assert_eq!(b.seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn devices_get_base_offset_vcpu_and_data() {
        let dev = probe();
        let mut bus = Bus::new();
        bus.insert(BusRange::new(0xfee0_0000, 0x1000), dev.clone())
            .unwrap();
        let mut d = [0u8; 4];
        assert_eq!(bus.read(3, 0xfee0_0020, &mut d), BusAction::Continue);
        assert_eq!(d, [0x20; 4]);
        assert_eq!(
            bus.write(1, 0xfee0_0ffc, &[1, 2, 3, 4]),
            BusAction::EndVm(VmEnd::Reset)
        );
        // A wide access at the last address goes to the device at its start.
        assert_eq!(
            bus.write(1, 0xfee0_0fff, &[9, 9]),
            BusAction::EndVm(VmEnd::Reset)
        );
        let seen = dev.seen.lock().unwrap();
        let access = |vcpu, offset| BusAccess {
            vcpu,
            base: 0xfee0_0000,
            offset,
        };
        assert_eq!(seen[0], ("read", access(3, 0x20), vec![0x20; 4]));
        assert_eq!(seen[1], ("write", access(1, 0xffc), vec![1, 2, 3, 4]));
        assert_eq!(seen[2], ("write", access(1, 0xfff), vec![9, 9]));
        assert_eq!(seen[2].1.addr(), 0xfee0_0fff);
    }

    #[test]
    fn accesses_a_device_does_not_implement_are_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(BusRange::new(0x80, 1), Arc::new(Mute)).unwrap();
        let mut d = [0x5a; 2];
        assert_eq!(bus.read(0, 0x80, &mut d), BusAction::Unclaimed);
        assert_eq!(d, [0x5a; 2]);
        assert_eq!(bus.write(0, 0x80, &d), BusAction::Unclaimed);
    }

    #[test]
    fn writes_are_little_endian() {
        assert_eq!(le_u32(&[]), 0);
        assert_eq!(le_u32(&[0xfe]), 0xfe);
        assert_eq!(le_u32(&[1, 2, 3, 4, 5]), 0x0403_0201);
    }
}
