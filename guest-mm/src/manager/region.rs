//! Guest-memory regions: where each one sits in guest-physical space, its host backing, and the
//! per-2 MiB-block discard state that keeps the fault path and discards apart.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::backing::HostBacking;
use crate::range::{BLOCK_SIZE, GpaRange, PAGE_SIZE, push_run};

/// One contiguous guest-physical region backed by one host mapping.
#[derive(Debug)]
pub(crate) struct Region {
    /// First guest-physical address (2 MiB aligned).
    pub gpa: u64,
    /// Length in bytes (page multiple).
    pub len: u64,
    /// Host address of the backing's first byte.
    pub host: u64,
    pub backing: Arc<dyn HostBacking>,
    /// One entry per 2 MiB block. The lock is held only briefly: by a discard to change the
    /// count, by [`GuestMm::hold`](super::GuestMm::hold), by a fault handler across the fill
    /// and the leaf record (never across anything that waits for an event).
    blocks: Box<[Mutex<BlockState>]>,
}

/// The state of one 2 MiB block of a region.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockState {
    /// Discards working on the block now; non-zero means faults in it are deferred.
    pub discarding: u32,
    /// Pages of the block the guest gave back and has not taken back yet (balloon): while
    /// non-zero, faults in the block fill only the faulting page, never the block or a window,
    /// which would hand those pages back to the host's memory behind the guest's back.
    pub held: u32,
    /// Held pages not released yet (bit i: page i of the block), when the balloon's give-back
    /// waits for the whole block (see [`GuestMm::give_back_held`](super::GuestMm::give_back_held)).
    pub pending: [u64; 8],
    /// Some of the block's pages were discarded once (given back by the guest, or released by
    /// the host): a fault in it fills its own block, never a fault-around window with it. Memory
    /// the guest gave back comes back a page at a time (the balloon driver zeroing the next page
    /// it takes, an allocation here and there), and blocks filled ahead of such a touch stay
    /// host memory full of zeros that the guest, which already reported them free, never gives
    /// back again. Only memory the guest has never touched is filled ahead (its first touch of
    /// fresh memory).
    pub given_back: bool,
}

impl Region {
    pub fn new(gpa: u64, backing: Arc<dyn HostBacking>) -> Self {
        let len = backing.len();
        let nblocks = len.div_ceil(BLOCK_SIZE) as usize;
        Self {
            gpa,
            len,
            host: backing.host_ptr() as u64,
            backing,
            blocks: (0..nblocks)
                .map(|_| Mutex::new(BlockState::default()))
                .collect(),
        }
    }

    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }

    pub fn contains(&self, r: &GpaRange) -> bool {
        r.start() >= self.gpa && r.end() <= self.end()
    }

    pub fn host_contains(&self, addr: u64) -> bool {
        addr >= self.host && addr - self.host < self.len
    }

    /// Locks the state of the block holding region offset `off`.
    pub fn block(&self, off: u64) -> MutexGuard<'_, BlockState> {
        let i = (off / BLOCK_SIZE) as usize;
        self.blocks[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Held pages over all blocks.
    pub fn held_pages(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| u64::from(b.lock().unwrap_or_else(|e| e.into_inner()).held))
            .sum()
    }

    /// Whether the 2 MiB block at region offset `block_off` (aligned) lies wholly inside the
    /// region and every one of its pages is held: the guest uses none of them, so the whole
    /// block may be released at once.
    pub fn block_all_held(&self, block_off: u64) -> bool {
        block_off + BLOCK_SIZE <= self.len
            && u64::from(self.block(block_off).held) == BLOCK_SIZE / PAGE_SIZE
    }

    /// Calls `f` for every block `r` (inside the region) covers, with the block's state locked,
    /// the block's region offset, and the first and end page index of `r` inside the block.
    fn each_block(&self, r: &GpaRange, mut f: impl FnMut(&mut BlockState, u64, u64, u64)) {
        let (s, e) = (r.start() - self.gpa, r.end() - self.gpa);
        let mut off = s;
        while off < e {
            let block_off = off - off % BLOCK_SIZE;
            let end = (block_off + BLOCK_SIZE).min(e);
            let mut st = self.block(off);
            f(
                &mut st,
                block_off,
                (off - block_off) / PAGE_SIZE,
                (end - block_off) / PAGE_SIZE,
            );
            off = end;
        }
    }

    /// Adds (`hold`) or removes the pages of `r` (inside the region) to or from the held count
    /// of each block it covers; pages no longer held are no longer pending either (a pending
    /// page the guest takes back is never released).
    pub fn hold(&self, r: &GpaRange, hold: bool) {
        self.each_block(r, |st, _, first, end| {
            let pages = (end - first) as u32;
            if hold {
                st.held = st.held.saturating_add(pages);
            } else {
                st.held = st.held.saturating_sub(pages);
                for p in first..end {
                    st.pending[(p / 64) as usize] &= !(1 << (p % 64));
                }
            }
        });
    }

    /// Holds the pages of `r` (inside the region) and marks them pending; every block whose
    /// pages are then all held is appended to `whole` as a guest range (its pending marks
    /// cleared: the caller releases it whole).
    pub fn hold_pending(&self, r: &GpaRange, whole: &mut Vec<GpaRange>) {
        self.each_block(r, |st, block_off, first, end| {
            st.held = st.held.saturating_add((end - first) as u32);
            for p in first..end {
                st.pending[(p / 64) as usize] |= 1 << (p % 64);
            }
            let block_len = (block_off + BLOCK_SIZE).min(self.len) - block_off;
            if u64::from(st.held) >= block_len / PAGE_SIZE {
                st.pending = [0; 8];
                whole.push(GpaRange::new_unchecked(self.gpa + block_off, block_len));
            }
        });
    }

    /// Clears every pending mark and appends the pages it covered to `runs` as guest ranges
    /// (contiguous pages joined).
    pub fn take_pending(&self, runs: &mut Vec<GpaRange>) {
        for (i, b) in self.blocks.iter().enumerate() {
            let mut st = b.lock().unwrap_or_else(|e| e.into_inner());
            if st.pending == [0; 8] {
                continue;
            }
            let base = self.gpa + i as u64 * BLOCK_SIZE;
            for p in 0..BLOCK_SIZE / PAGE_SIZE {
                if st.pending[(p / 64) as usize] & (1 << (p % 64)) != 0 {
                    push_run(runs, base + p * PAGE_SIZE, PAGE_SIZE);
                }
            }
            st.pending = [0; 8];
        }
    }

    /// Pages marked pending over all blocks.
    pub fn pending_pages(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| {
                let st = b.lock().unwrap_or_else(|e| e.into_inner());
                st.pending
                    .iter()
                    .map(|w| u64::from(w.count_ones()))
                    .sum::<u64>()
            })
            .sum()
    }

    /// Marks (`delta = 1`) or unmarks (`delta = -1`) every block that `r` (inside the region)
    /// touches.
    pub fn mark(&self, r: &GpaRange, mark: bool) {
        let first = (r.start() - self.gpa) / BLOCK_SIZE;
        let last = (r.end() - 1 - self.gpa) / BLOCK_SIZE;
        for i in first..=last {
            let mut st = self.blocks[i as usize]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if mark {
                st.discarding += 1;
                st.given_back = true;
            } else {
                st.discarding = st.discarding.saturating_sub(1);
            }
        }
    }

    /// Clips `r` to the region and returns it as a region offset range.
    pub fn clip_offsets(&self, r: &GpaRange) -> Option<(u64, u64)> {
        let s = r.start().max(self.gpa);
        let e = r.end().min(self.end());
        (s < e).then(|| (s - self.gpa, e - self.gpa))
    }
}

/// Merges offset runs `(region, start, end)` into the fewest covering runs: sorted, with
/// overlapping or touching runs of the same region joined.
pub(crate) fn merge_runs(mut runs: Vec<(usize, u64, u64)>) -> Vec<(usize, u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(usize, u64, u64)> = Vec::with_capacity(runs.len());
    for (r, s, e) in runs {
        match out.last_mut() {
            Some(last) if last.0 == r && s <= last.2 => last.2 = last.2.max(e),
            _ => out.push((r, s, e)),
        }
    }
    debug_assert!(
        out.iter()
            .all(|&(_, s, e)| s.is_multiple_of(PAGE_SIZE) && e.is_multiple_of(PAGE_SIZE))
    );
    out
}

#[cfg(test)]
mod tests {
    use super::merge_runs;

    #[test]
    fn merge_joins_touching_and_overlapping_runs_per_region() {
        let runs = vec![
            (0, 0x3000, 0x4000),
            (0, 0x0, 0x1000),
            (0, 0x1000, 0x2000),
            (1, 0x1000, 0x2000),
            (0, 0x0, 0x20_0000),
            (0, 0x20_0000, 0x20_1000),
            (0, 0x40_0000, 0x40_1000),
        ];
        assert_eq!(
            merge_runs(runs),
            vec![
                (0, 0x0, 0x20_1000),
                (0, 0x40_0000, 0x40_1000),
                (1, 0x1000, 0x2000)
            ]
        );
    }
}
