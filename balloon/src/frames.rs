//! Page frames: validation against guest RAM, the set of frames the balloon holds, and
//! coalescing frames into ranges.

use crate::PAGE_SIZE;

/// A run of contiguous guest pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// First page frame number.
    pub first: u64,
    /// Number of pages (at least 1).
    pub pages: u64,
}

impl PageRange {
    /// Guest-physical start address.
    pub fn gpa(&self) -> u64 {
        self.first * PAGE_SIZE
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// Whether the range holds no page (never true for ranges built by [`coalesce`]).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// Sorts `frames` and merges runs of consecutive frame numbers into ranges. Duplicates
/// must already have been removed (a repeated frame would end a run).
pub fn coalesce(frames: &mut [u64]) -> Vec<PageRange> {
    frames.sort_unstable();
    let mut out: Vec<PageRange> = Vec::new();
    for &f in frames.iter() {
        match out.last_mut() {
            Some(r) if r.first + r.pages == f => r.pages += 1,
            _ => out.push(PageRange { first: f, pages: 1 }),
        }
    }
    out
}

/// One bit per page of guest RAM: set while the page is in the balloon.
#[derive(Debug, Clone)]
pub(crate) struct FrameSet {
    bits: Vec<u64>,
    pages: u64,
    held: u64,
}

impl FrameSet {
    /// A set for `pages` pages of guest RAM, all out of the balloon.
    pub(crate) fn new(pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(0);
        FrameSet {
            bits: vec![0; words],
            pages,
            held: 0,
        }
    }

    /// Whether `pfn` names a page of guest RAM.
    pub(crate) fn contains(&self, pfn: u64) -> bool {
        pfn < self.pages
    }

    fn slot(&self, pfn: u64) -> Option<(usize, u64)> {
        if !self.contains(pfn) {
            return None;
        }
        Some(((pfn / 64) as usize, 1u64 << (pfn % 64)))
    }

    /// Marks `pfn` as held; false if it is outside RAM or already held.
    pub(crate) fn insert(&mut self, pfn: u64) -> bool {
        let Some((w, bit)) = self.slot(pfn) else {
            return false;
        };
        let word = &mut self.bits[w];
        if *word & bit != 0 {
            return false;
        }
        *word |= bit;
        self.held += 1;
        true
    }

    /// Clears `pfn`; false if it was not held.
    pub(crate) fn remove(&mut self, pfn: u64) -> bool {
        let Some((w, bit)) = self.slot(pfn) else {
            return false;
        };
        let word = &mut self.bits[w];
        if *word & bit == 0 {
            return false;
        }
        *word &= !bit;
        self.held -= 1;
        true
    }

    /// Pages currently held.
    pub(crate) fn held(&self) -> u64 {
        self.held
    }

    /// Forgets every page (device reset) and returns them, sorted.
    pub(crate) fn take_all(&mut self) -> Vec<u64> {
        let mut out = Vec::with_capacity(usize::try_from(self.held).unwrap_or(0));
        for (w, word) in self.bits.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                out.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        self.held = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_all_returns_every_held_page_and_empties_the_set() {
        let mut f = FrameSet::new(200);
        for p in [0, 63, 64, 130, 199] {
            assert!(f.insert(p));
        }
        assert_eq!(f.take_all(), vec![0, 63, 64, 130, 199]);
        assert_eq!(f.held(), 0);
        assert!(f.insert(63), "cleared");
    }

    #[test]
    fn coalesces_sorted_runs() {
        let mut f = vec![9, 3, 4, 5, 100, 8, 7];
        let r = coalesce(&mut f);
        assert_eq!(
            r,
            vec![
                PageRange { first: 3, pages: 3 },
                PageRange { first: 7, pages: 3 },
                PageRange {
                    first: 100,
                    pages: 1
                },
            ]
        );
        assert_eq!(r[1].gpa(), 7 * 4096);
        assert_eq!(r[1].len(), 3 * 4096);
        assert!(coalesce(&mut []).is_empty());
    }

    #[test]
    fn frame_set_tracks_membership() {
        let mut s = FrameSet::new(130);
        assert!(s.insert(0));
        assert!(s.insert(129));
        assert!(!s.insert(129), "duplicate");
        assert!(!s.insert(130), "outside RAM");
        assert!(!s.insert(u64::MAX));
        assert_eq!(s.held(), 2);
        assert!(s.remove(129));
        assert!(!s.remove(129));
        assert!(!s.remove(u64::MAX));
        assert_eq!(s.held(), 1);
        s.take_all();
        assert_eq!(s.held(), 0);
        assert!(s.insert(0));
    }
}
