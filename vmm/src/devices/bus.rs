//! Address-range dispatch of port I/O and MMIO exits to devices.

use std::sync::{Arc, Mutex};

/// A device on a bus; `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    /// Guest read; `data` arrives zeroed and is filled by the device.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be put on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps one already on the bus, or is empty or wraps.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is invalid")]
    Overlap {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// A sorted set of non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` at `base..base+len`.
    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let idx = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let e = &self.entries[idx];
        let off = addr - e.base;
        (off.checked_add(size as u64)? <= e.len).then_some((e, off))
    }

    /// Whether a device on the bus claims the byte at `addr`.
    pub fn claims(&self, addr: u64) -> bool {
        self.find(addr, 1).is_some()
    }

    /// Dispatches a read; returns false (leaving `data` untouched) if no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, off)) => {
                e.dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, off)) => {
                e.dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert!(bus.insert(dev.clone(), u64::MAX, 2).is_err());
        assert!(bus.insert(dev.clone(), 0x0, 0).is_err());
        bus.insert(dev.clone(), 0x110, 0x10).unwrap();
        let mut b = [0u8; 4];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4; 4]);
        assert!(!bus.read(0x10e, &mut b), "straddles the end of the range");
        assert!(!bus.read(0xff, &mut b));
        assert!(!bus.read(u64::MAX - 1, &mut b));
        assert!(bus.write(0x112, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(2, vec![9])]);
        assert!(bus.claims(0x100) && bus.claims(0x11f));
        assert!(!bus.claims(0xff) && !bus.claims(0x120) && !bus.claims(u64::MAX));
    }
}
