//! Guest-physical address geometry and validated address ranges.
//!
//! Every range that enters guest-mm (from a balloon request, a fault, a
//! socket) passes through [`GpaRange::new`], which rejects anything that is
//! not page aligned, empty, overflowing or outside the 48-bit guest-physical
//! address space. Code past that point can rely on the checks.

use thiserror::Error;

/// Bits of address translated by one table level (512 entries per table).
///
/// Under `cfg(loom)` the fan-out is reduced to two entries per table so that
/// the model checker can explore the reclaim protocol exhaustively; nothing
/// else changes.
#[cfg(not(loom))]
pub const LEVEL_BITS: u32 = 9;
/// Reduced fan-out for the loom model (two entries per table).
#[cfg(loom)]
pub const LEVEL_BITS: u32 = 1;

/// Entries in one table.
pub const ENTRIES_PER_TABLE: usize = 1 << LEVEL_BITS;

/// Size of a base guest page (4 KiB).
pub const PAGE_SIZE: u64 = 4096;

/// Bytes mapped by one PT table, and the size of a large leaf (2 MiB).
pub const BLOCK_SIZE: u64 = PAGE_SIZE << LEVEL_BITS;

/// Guest-physical addresses are below `1 << GPA_BITS` (48 with four levels).
pub const GPA_BITS: u32 = 12 + 4 * LEVEL_BITS;

/// One past the highest valid guest-physical address.
pub const GPA_LIMIT: u64 = 1 << GPA_BITS;

/// Why a guest-physical range was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RangeError {
    /// The start address is not a multiple of [`PAGE_SIZE`].
    #[error("range start {start:#x} is not aligned to {PAGE_SIZE:#x}")]
    UnalignedStart {
        /// The offending start address.
        start: u64,
    },
    /// The length is not a multiple of [`PAGE_SIZE`].
    #[error("range length {len:#x} is not a multiple of {PAGE_SIZE:#x}")]
    UnalignedLen {
        /// The offending length.
        len: u64,
    },
    /// The length is zero.
    #[error("range at {start:#x} is empty")]
    Empty {
        /// The start address of the empty range.
        start: u64,
    },
    /// `start + len` does not fit in 64 bits.
    #[error("range {start:#x} + {len:#x} overflows")]
    Overflow {
        /// The start address.
        start: u64,
        /// The length.
        len: u64,
    },
    /// The range ends above the guest-physical address space.
    #[error("range end {end:#x} is above the {GPA_BITS}-bit guest-physical space")]
    OutOfSpace {
        /// The (exclusive) end of the range.
        end: u64,
    },
}

/// A non-empty, page-aligned range of guest-physical addresses inside the
/// 48-bit space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpaRange {
    start: u64,
    len: u64,
}

impl GpaRange {
    /// Validates and builds a range.
    pub fn new(start: u64, len: u64) -> Result<Self, RangeError> {
        if !start.is_multiple_of(PAGE_SIZE) {
            return Err(RangeError::UnalignedStart { start });
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(RangeError::UnalignedLen { len });
        }
        if len == 0 {
            return Err(RangeError::Empty { start });
        }
        let end = start
            .checked_add(len)
            .ok_or(RangeError::Overflow { start, len })?;
        if end > GPA_LIMIT {
            return Err(RangeError::OutOfSpace { end });
        }
        Ok(Self { start, len })
    }

    /// Builds a range from `[start, end)`, with the same checks as [`GpaRange::new`].
    pub fn from_bounds(start: u64, end: u64) -> Result<Self, RangeError> {
        if end < start {
            return Err(RangeError::Overflow {
                start,
                len: end.wrapping_sub(start),
            });
        }
        Self::new(start, end - start)
    }

    /// First address of the range.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Length in bytes (a non-zero multiple of [`PAGE_SIZE`]).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: an empty range cannot be built. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Number of base pages in the range.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE
    }

    /// Whether `gpa` lies inside the range.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.start && gpa < self.end()
    }

    /// The part of `self` inside `other`, if any.
    pub fn intersect(&self, other: &GpaRange) -> Option<GpaRange> {
        let start = self.start.max(other.start);
        let end = self.end().min(other.end());
        (start < end).then(|| GpaRange {
            start,
            len: end - start,
        })
    }

    /// Whether `self` covers all of `other`.
    pub fn covers(&self, other: &GpaRange) -> bool {
        self.start <= other.start && self.end() >= other.end()
    }

    /// Builds a range the caller knows is valid (aligned, in space, non-empty).
    pub(crate) fn new_unchecked(start: u64, len: u64) -> Self {
        debug_assert!(Self::new(start, len).is_ok());
        Self { start, len }
    }
}

/// Appends `[start, start + len)` to `runs`, merging it into the last run when
/// they touch. Runs are expected in ascending order.
pub(crate) fn push_run(runs: &mut Vec<GpaRange>, start: u64, len: u64) {
    if let Some(last) = runs.last_mut()
        && last.end() == start
    {
        last.len += len;
        return;
    }
    runs.push(GpaRange::new_unchecked(start, len));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_ranges() {
        assert_eq!(
            GpaRange::new(1, PAGE_SIZE),
            Err(RangeError::UnalignedStart { start: 1 })
        );
        assert_eq!(
            GpaRange::new(0, 12),
            Err(RangeError::UnalignedLen { len: 12 })
        );
        assert_eq!(GpaRange::new(0, 0), Err(RangeError::Empty { start: 0 }));
        let top = !(PAGE_SIZE - 1);
        assert!(matches!(
            GpaRange::new(top, PAGE_SIZE),
            Err(RangeError::Overflow { .. })
        ));
        assert_eq!(
            GpaRange::new(GPA_LIMIT, PAGE_SIZE),
            Err(RangeError::OutOfSpace {
                end: GPA_LIMIT + PAGE_SIZE
            })
        );
        assert!(GpaRange::new(GPA_LIMIT - PAGE_SIZE, PAGE_SIZE).is_ok());
    }

    #[test]
    fn runs_coalesce() {
        let mut runs = Vec::new();
        push_run(&mut runs, 0, PAGE_SIZE);
        push_run(&mut runs, PAGE_SIZE, PAGE_SIZE);
        push_run(&mut runs, 3 * PAGE_SIZE, PAGE_SIZE);
        assert_eq!(
            runs,
            vec![
                GpaRange::new(0, 2 * PAGE_SIZE).unwrap(),
                GpaRange::new(3 * PAGE_SIZE, PAGE_SIZE).unwrap()
            ]
        );
    }
}
