//! The guest's memory statistics: an array of packed (le16 tag, le64 value) entries.

use std::time::Instant;

/// Bytes of one packed statistics entry.
pub const ENTRY_SIZE: usize = 10;
/// Most entries kept from one buffer (Linux sends 16 at most today); the rest are ignored.
pub const MAX_ENTRIES: usize = 64;

/// Name of a statistics tag from the virtio spec and Linux's `virtio_balloon.h`, or `None`
/// for a tag this build does not know (it is still kept, by number).
pub fn stat_name(tag: u16) -> Option<&'static str> {
    Some(match tag {
        0 => "swap_in",
        1 => "swap_out",
        2 => "major_faults",
        3 => "minor_faults",
        4 => "free_memory",
        5 => "total_memory",
        6 => "available_memory",
        7 => "disk_caches",
        8 => "hugetlb_allocations",
        9 => "hugetlb_failures",
        10 => "oom_kill",
        11 => "alloc_stall",
        12 => "async_scan",
        13 => "direct_scan",
        14 => "async_reclaim",
        15 => "direct_reclaim",
        _ => return None,
    })
}

/// One statistics buffer as the guest last sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStats {
    /// (tag, value) in the order sent; a repeated tag keeps its last value.
    pub entries: Vec<(u16, u64)>,
    /// Trailing bytes that did not make a whole entry, or entries beyond the first 64 distinct tags.
    pub ignored_bytes: usize,
    /// When the buffer arrived.
    pub received: Instant,
}

impl GuestStats {
    /// Parses a buffer; never fails (malformed tails are counted in `ignored_bytes`).
    pub fn parse(bytes: &[u8], received: Instant) -> Self {
        let mut entries: Vec<(u16, u64)> = Vec::new();
        let mut ignored = bytes.len() % ENTRY_SIZE;
        for e in bytes.chunks_exact(ENTRY_SIZE) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..]);
            let val = u64::from_le_bytes(v);
            if let Some(slot) = entries.iter_mut().find(|(t, _)| *t == tag) {
                slot.1 = val;
            } else if entries.len() < MAX_ENTRIES {
                entries.push((tag, val));
            } else {
                ignored += ENTRY_SIZE;
            }
        }
        GuestStats {
            entries,
            ignored_bytes: ignored,
            received,
        }
    }

    /// Value of `tag`, if the guest sent it.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.entries.iter().find(|(t, _)| *t == tag).map(|e| e.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, val: u64) -> Vec<u8> {
        let mut v = tag.to_le_bytes().to_vec();
        v.extend_from_slice(&val.to_le_bytes());
        v
    }

    #[test]
    fn parses_known_unknown_and_repeated_tags() {
        let mut buf = entry(4, 1 << 30);
        buf.extend(entry(5, 2 << 30));
        buf.extend(entry(0x1234, 7));
        buf.extend(entry(4, 5));
        buf.extend([1, 2, 3]);
        let s = GuestStats::parse(&buf, Instant::now());
        assert_eq!(s.entries, vec![(4, 5), (5, 2 << 30), (0x1234, 7)]);
        assert_eq!(s.get(0x1234), Some(7));
        assert_eq!(s.get(6), None);
        assert_eq!(s.ignored_bytes, 3);
        assert_eq!(stat_name(4), Some("free_memory"));
        assert_eq!(stat_name(0x1234), None);
    }

    #[test]
    fn caps_the_number_of_entries() {
        let buf: Vec<u8> = (0..100u16).flat_map(|t| entry(t, 1)).collect();
        let s = GuestStats::parse(&buf, Instant::now());
        assert_eq!(s.entries.len(), MAX_ENTRIES);
        assert_eq!(s.ignored_bytes, (100 - MAX_ENTRIES) * ENTRY_SIZE);
        assert!(GuestStats::parse(&[], Instant::now()).entries.is_empty());
    }
}
