//! The 8-byte table entry, laid out as an Intel EPT entry.
//!
//! ```text
//!  63  62..54  53   52   51 ........... 12  11..10  9  8  7   6   5..3  2 1 0
//! [ 0 |  0   | -  |LAZY|  address (40 b)   |   0   | D| A|LRG|IPAT| MT  |X|W|R]
//! ```
//!
//! * bits 0-2: read/write/execute. Every present entry has all three set, so
//!   "present" is simply "non-zero".
//! * bits 3-5: memory type (write-back, 6, on leaves), bit 6: ignore PAT.
//! * bit 7: large page (a 2 MiB leaf in a PD table).
//! * bits 8, 9: accessed and dirty (kept for the format; ebb never sets them).
//! * bits 12-51: a non-leaf entry holds the child table's address, a leaf the
//!   host offset of the page it maps.
//! * bit 52 (software-available): the leaf's host page was released lazily
//!   (`MADV_FREE`) and may still hold data.
//!
//! A table being freed is marked in its side metadata, not in an entry: the
//! entry pointing at it is cleared in the same critical section.

/// Read permission.
pub const READ: u64 = 1 << 0;
/// Write permission.
pub const WRITE: u64 = 1 << 1;
/// Execute permission.
pub const EXEC: u64 = 1 << 2;
/// All three permissions; set on every present entry.
pub const RWX: u64 = READ | WRITE | EXEC;
/// Memory type field shift (bits 3-5).
pub const MEMTYPE_SHIFT: u32 = 3;
/// Write-back memory type, as used on leaves.
pub const MEMTYPE_WB: u64 = 6 << MEMTYPE_SHIFT;
/// Ignore the guest PAT.
pub const IGNORE_PAT: u64 = 1 << 6;
/// Large page: a 2 MiB leaf in a PD table.
pub const LARGE: u64 = 1 << 7;
/// Accessed flag.
pub const ACCESSED: u64 = 1 << 8;
/// Dirty flag.
pub const DIRTY: u64 = 1 << 9;
/// Software bit: the host page was released lazily (`MADV_FREE`).
pub const LAZY: u64 = 1 << 52;
/// The address field, bits 12-51.
pub const ADDR_MASK: u64 = ((1 << 52) - 1) & !0xfff;
/// Largest host offset (exclusive) a leaf can hold.
pub const HOST_OFFSET_LIMIT: u64 = 1 << 52;

/// The empty (not present) entry.
pub const EMPTY: u64 = 0;

/// Whether an entry maps anything.
#[inline]
pub fn is_present(e: u64) -> bool {
    e != EMPTY
}

/// Whether an entry is a 2 MiB leaf (only meaningful at PD level).
#[inline]
pub fn is_large(e: u64) -> bool {
    e & LARGE != 0
}

/// Whether a leaf is marked lazy.
#[inline]
pub fn is_lazy(e: u64) -> bool {
    e & LAZY != 0
}

/// The address field.
#[inline]
pub fn addr(e: u64) -> u64 {
    e & ADDR_MASK
}

/// Encodes a non-leaf entry pointing at a table at `table_addr`
/// (4 KiB aligned, below `1 << 52`).
#[inline]
pub fn table(table_addr: u64) -> u64 {
    debug_assert_eq!(table_addr & !ADDR_MASK, 0);
    table_addr | RWX
}

/// Encodes a leaf for the host offset `host_offset` (aligned to the leaf
/// size and below [`HOST_OFFSET_LIMIT`], checked by the caller).
#[inline]
pub fn leaf(host_offset: u64, large: bool, lazy: bool) -> u64 {
    debug_assert_eq!(host_offset & !ADDR_MASK, 0);
    let mut e = host_offset | RWX | MEMTYPE_WB | IGNORE_PAT;
    if large {
        e |= LARGE;
    }
    if lazy {
        e |= LAZY;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_round_trip() {
        let e = leaf(0x1234_5000, false, true);
        assert!(is_present(e));
        assert!(!is_large(e));
        assert!(is_lazy(e));
        assert_eq!(addr(e), 0x1234_5000);
        assert_eq!(e & RWX, RWX);
        let l = leaf(0x20_0000, true, false);
        assert!(is_large(l) && !is_lazy(l));
        assert_eq!(addr(l), 0x20_0000);
    }

    #[test]
    fn table_entry_has_no_leaf_bits() {
        let e = table(0x7f00_1234_5000);
        assert_eq!(addr(e), 0x7f00_1234_5000);
        assert_eq!(e & (LARGE | LAZY | MEMTYPE_WB), 0);
        assert!(!is_present(EMPTY));
        assert_eq!((HOST_OFFSET_LIMIT - 1) & !ADDR_MASK, 0xfff);
        let _ = (ACCESSED, DIRTY);
    }
}
