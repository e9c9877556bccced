//! The balloon's configuration space: `num_pages` (device writes) and `actual` (driver
//! writes), both le32 in 4 KiB pages, then `free_page_hint_cmd_id` (device writes; zero unless
//! free page hinting runs). `poison_val` belongs to a feature ebb does not offer and reads as
//! zero.

/// Bytes of configuration space the device answers for; reads beyond it give zeros.
pub const CONFIG_SPACE_SIZE: u64 = 16;
const ACTUAL: u64 = 4;

/// The two live fields of the balloon configuration space.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConfigSpace {
    /// Target size of the balloon in pages, set by the host.
    pub num_pages: u32,
    /// Pages the driver says it holds.
    pub actual: u32,
    /// The free page hinting command id the host published.
    pub free_page_hint_cmd_id: u32,
}

impl ConfigSpace {
    fn bytes(&self) -> [u8; CONFIG_SPACE_SIZE as usize] {
        let mut b = [0u8; CONFIG_SPACE_SIZE as usize];
        b[..4].copy_from_slice(&self.num_pages.to_le_bytes());
        b[4..8].copy_from_slice(&self.actual.to_le_bytes());
        b[8..12].copy_from_slice(&self.free_page_hint_cmd_id.to_le_bytes());
        b
    }

    /// Fills `data` from `offset`; bytes outside the space read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let bytes = self.bytes();
        for (i, out) in data.iter_mut().enumerate() {
            *out = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Applies a driver write. Only the bytes of `actual` are writable; returns the number of
    /// bytes that were refused (outside `actual`).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> usize {
        let mut actual = self.actual.to_le_bytes();
        let mut refused = 0;
        for (i, b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(o) if (ACTUAL..ACTUAL + 4).contains(&o) => actual[(o - ACTUAL) as usize] = *b,
                _ => refused += 1,
            }
        }
        self.actual = u32::from_le_bytes(actual);
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded_and_little_endian() {
        let c = ConfigSpace {
            num_pages: 0x0102_0304,
            actual: 0x0a0b_0c0d,
            free_page_hint_cmd_id: 7,
        };
        let mut b = [0xffu8; 8];
        c.read(0, &mut b);
        assert_eq!(b, [4, 3, 2, 1, 0xd, 0xc, 0xb, 0xa]);
        let mut b = [0xffu8; 4];
        c.read(6, &mut b);
        assert_eq!(b, [0xb, 0xa, 7, 0], "actual, then the hint command id");
        c.read(u64::MAX - 1, &mut b);
        assert_eq!(b, [0; 4]);
        c.read(CONFIG_SPACE_SIZE, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn only_actual_is_writable() {
        let mut c = ConfigSpace {
            num_pages: 7,
            actual: 0,
            free_page_hint_cmd_id: 2,
        };
        assert_eq!(c.write(0, &[9, 9, 9, 9]), 4);
        assert_eq!(c.num_pages, 7);
        assert_eq!(c.write(4, &100u32.to_le_bytes()), 0);
        assert_eq!(c.actual, 100);
        assert_eq!(c.write(6, &[1, 0, 5, 5]), 2, "straddling the end");
        assert_eq!(c.actual, 0x0001_0064);
        assert_eq!(c.write(u64::MAX, &[1, 2]), 2);
        assert_eq!(c.actual, 0x0001_0064);
        assert_eq!(
            c.write(8, &[0, 0, 0, 0]),
            4,
            "the command id is the device's"
        );
        assert_eq!(c.free_page_hint_cmd_id, 2);
        let mut b = [0u8; 4];
        c.read(8, &mut b);
        assert_eq!(u32::from_le_bytes(b), 2);
    }
}
