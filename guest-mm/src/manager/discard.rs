//! Discard and reclaim: clear leaves, free tables, release host memory in few, large,
//! 2 MiB-aligned-where-possible calls.
//!
//! Protocol (see docs/DESIGN-guest-mm.md, "Fault path"):
//! 1. mark every 2 MiB block the request touches as "discarding" (faults there are deferred);
//! 2. clear the leaves (`Tables::discard`, which frees emptied tables synchronously), or mark
//!    them lazy in `MADV_FREE` mode;
//! 3. note the host ranges as in flight, release them, then wait for the handlers to have
//!    classified the REMOVE events those calls produced (`quiesce`) and forget them;
//! 4. unmark the blocks and kick the handlers so deferred faults are retried.
//!
//! No lock is held across step 3: the madvise waits for a handler to read its REMOVE event,
//! and handlers never wait for a discard.

use std::sync::atomic::Ordering;

use super::region::merge_runs;
use super::{GuestMm, Inner, ManagerError};
use crate::range::{BLOCK_SIZE, GpaRange, PAGE_SIZE};
use crate::tables::LEVELS;
use crate::tables::PageSize;

/// What one discard (or reclaim) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscardSummary {
    /// 4 KiB pages whose leaves were cleared.
    pub pages_cleared: u64,
    /// Leaves marked lazy (`MADV_FREE` mode).
    pub pages_lazy: u64,
    /// Host bytes covered by release calls.
    pub host_bytes_released: u64,
    /// Release calls made.
    pub release_calls: u64,
    /// Tables freed per level (0 = PT .. 3 = PML4).
    pub tables_freed: [u64; LEVELS],
    /// 2 MiB blocks released whole, in one call covering the aligned block (so the host frees
    /// its PTE page too). With a fault path: the blocks whose PT table the discard freed.
    /// Without one: the whole blocks inside the merged release runs, which include every
    /// block the discard touched whose pages the balloon all holds (see
    /// [`GuestMm::hold`]).
    pub blocks_released: u64,
    /// Pages the host kept although they were released (a 2 MiB host page it could not split);
    /// their leaves were recorded again, so the tables stay exact. See
    /// [`MmStats::pages_kept`](super::MmStats::pages_kept).
    pub pages_kept: u64,
}

impl GuestMm {
    /// Discards `range`: clears its leaves, frees emptied tables, releases the host memory.
    /// The range must lie inside one region.
    pub fn discard(&self, range: GpaRange) -> Result<DiscardSummary, ManagerError> {
        self.discard_many(&[range])
    }

    /// Discards several ranges as one request (e.g. one balloon buffer of 256 pages): each
    /// must lie inside one region; all are validated before anything changes, and the host
    /// release calls for all of them are merged.
    pub fn discard_many(&self, ranges: &[GpaRange]) -> Result<DiscardSummary, ManagerError> {
        self.inner.release_ranges(ranges, Op::Discard)
    }

    /// Marks the pages of `ranges` as given back by the guest and not to be filled unasked
    /// (`held = true`: a balloon's inflated pages), or as taken back (`false`: deflated). While
    /// a 2 MiB block holds such pages, a fault in it fills only the faulting page: a block fill
    /// or fault-around window would make the host back pages the guest gave away. Call it with
    /// `true` before discarding the pages, so that no fill races in between. All ranges are
    /// checked first; a refused request changes nothing. Counts are per page and saturate, so
    /// the caller must not hold a page twice (the balloon's frame bitmap sees to that). Pages
    /// taken back that were pending (see [`give_back_held`](Self::give_back_held)) are never
    /// released.
    ///
    /// The counts are kept without a fault path too, where they serve the release: a discard
    /// that touches a 2 MiB block whose pages are all held releases the whole block in one
    /// call (no page of it is in use), so the host frees its PTE page, which 4 KiB releases
    /// emptying the block one page at a time never do.
    pub fn hold(&self, ranges: &[GpaRange], held: bool) -> Result<(), ManagerError> {
        let regions = self.inner.region_indices(ranges)?;
        for (r, &i) in ranges.iter().zip(&regions) {
            self.inner.regions[i].hold(r, held);
        }
        Ok(())
    }

    /// The balloon's give-back of `ranges`, with the host's 2 MiB mappings kept whole where it
    /// can be: holds the pages (as [`hold`](Self::hold)), releases at once every 2 MiB block
    /// whose pages are now all held, as one whole block, and keeps the other pages *pending*:
    /// held, still backed, released by [`release_pending`](Self::release_pending) or with
    /// their block once it is whole; [`hold`](Self::hold) with `false` (the deflate) takes
    /// pending pages back without releasing them. With `defer = false` every page is released at once (the
    /// behaviour of `hold` + [`discard_many`](Self::discard_many)).
    ///
    /// Why: releasing 4 KiB of a block the host maps with one 2 MiB page splits that page, and
    /// KVM's 2 MiB entry with it; every later guest access to the rest of the block is then a
    /// 4 KiB nested page fault. A balloon inflation takes a block's pages over several chains
    /// (256 pages each, in the order the guest allocates them, zeroing each), so a release per
    /// chain split nearly every block it touched: in the nested rig, inflating 768 MiB took
    /// 181,016 nested page faults for 196,608 pages. Whole-block releases split nothing, and
    /// neither KVM nor the host builds a 4 KiB page table for the block.
    ///
    /// All ranges are checked first; a refused request changes nothing.
    pub fn give_back_held(
        &self,
        ranges: &[GpaRange],
        defer: bool,
    ) -> Result<DiscardSummary, ManagerError> {
        if !defer {
            self.hold(ranges, true)?;
            return self.discard_many(ranges);
        }
        let regions = self.inner.region_indices(ranges)?;
        let mut whole = Vec::new();
        for (r, &i) in ranges.iter().zip(&regions) {
            self.inner.regions[i].hold_pending(r, &mut whole);
        }
        if whole.is_empty() {
            return Ok(DiscardSummary::default());
        }
        self.discard_many(&whole)
    }

    /// Releases every pending page (see [`give_back_held`](Self::give_back_held)); they stay
    /// held.
    pub fn release_pending(&self) -> Result<DiscardSummary, ManagerError> {
        let mut runs = Vec::new();
        for region in &self.inner.regions {
            region.take_pending(&mut runs);
        }
        if runs.is_empty() {
            return Ok(DiscardSummary::default());
        }
        self.discard_many(&runs)
    }

    /// Pages held but not released yet (see [`give_back_held`](Self::give_back_held)).
    pub fn pending_pages(&self) -> u64 {
        self.inner.regions.iter().map(|r| r.pending_pages()).sum()
    }

    /// Pages currently held (see [`hold`](Self::hold)), summed over every block.
    pub fn held_pages(&self) -> u64 {
        self.inner.regions.iter().map(|r| r.held_pages()).sum()
    }

    /// The explicit sweep: frees tables in `range` left empty by other paths (e.g. with
    /// `Strategy::Off`, or after foreign remove events) and releases each freed PT table's
    /// 2 MiB block whole, so the host frees its PTE page too.
    pub fn reclaim(&self, range: GpaRange) -> Result<DiscardSummary, ManagerError> {
        self.inner.release_ranges(&[range], Op::Reclaim)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Discard,
    Reclaim,
}

impl Inner {
    fn release_ranges(&self, ranges: &[GpaRange], op: Op) -> Result<DiscardSummary, ManagerError> {
        // Validate everything first: a refused request changes nothing.
        let regions = self.region_indices(ranges)?;
        for (r, &i) in ranges.iter().zip(&regions) {
            self.regions[i].mark(r, true);
        }
        let res = self.release_marked(ranges, &regions, op);
        for (r, &i) in ranges.iter().zip(&regions) {
            self.regions[i].mark(r, false);
        }
        if let Some(c) = &self.control {
            c.kick();
        }
        if res.is_ok() && op == Op::Discard {
            self.counters.discards.fetch_add(1, Ordering::Relaxed);
        }
        res
    }

    fn release_marked(
        &self,
        ranges: &[GpaRange],
        regions: &[usize],
        op: Op,
    ) -> Result<DiscardSummary, ManagerError> {
        let mut sum = DiscardSummary::default();
        let mut runs: Vec<(usize, u64, u64)> = Vec::with_capacity(ranges.len());
        let mut blocks = 0u64;
        let mut table_err = None;
        let eager = self.release.is_eager();
        // Without a fault path there are no leaves and no tables to free; see below.
        let untracked_eager = eager && self.uffd.is_none();
        for (r, &ri) in ranges.iter().zip(regions) {
            let region = &self.regions[ri];
            let emptied = match op {
                Op::Discard if eager => match self.tables.discard(*r) {
                    Ok(d) => {
                        sum.pages_cleared += d.pages_cleared;
                        add(&mut sum.tables_freed, &d.tables_freed);
                        d.emptied_blocks
                    }
                    Err(e) => {
                        table_err = Some(e);
                        break;
                    }
                },
                Op::Discard => match self.tables.mark_lazy(*r) {
                    Ok(n) => {
                        sum.pages_lazy += n;
                        Vec::new()
                    }
                    Err(e) => {
                        table_err = Some(e);
                        break;
                    }
                },
                Op::Reclaim => match self.tables.reclaim(*r) {
                    Ok(d) => {
                        add(&mut sum.tables_freed, &d.tables_freed);
                        d.emptied_blocks
                    }
                    Err(e) => {
                        table_err = Some(e);
                        break;
                    }
                },
            };
            if op == Op::Discard {
                // The requested range itself: pages in it without a leaf are not present, so
                // covering them costs the host nothing and joins neighbouring runs.
                let (s, e) = (r.start() - region.gpa, r.end() - region.gpa);
                runs.push((ri, s, e));
                if untracked_eager {
                    // No leaves tell which blocks are empty, but a block whose pages are all
                    // held is unused by the guest: release it whole.
                    let first = s - s % BLOCK_SIZE;
                    for b in (first..e).step_by(BLOCK_SIZE as usize) {
                        if region.block_all_held(b) {
                            runs.push((ri, b, b + BLOCK_SIZE));
                        }
                    }
                }
            }
            for b in &emptied {
                // Only blocks this request touched can have been emptied by it, and those are
                // marked; a block reported outside the marks is left alone.
                let touched = b.start() < r.end().next_multiple_of(BLOCK_SIZE)
                    && b.end() > r.start() - r.start() % BLOCK_SIZE;
                if !touched {
                    continue;
                }
                if let Some((s, e)) = region.clip_offsets(b) {
                    blocks += 1;
                    runs.push((ri, s, e));
                }
            }
        }
        let runs = merge_runs(runs);
        if untracked_eager {
            // Every whole aligned block inside a run is released by one call over it, which
            // frees the host's PTE page of the block (`CONFIG_PT_RECLAIM`; memfd backings
            // follow their release with that `MADV_DONTNEED`). Two discards racing over one
            // held block may both release it, and both count it.
            blocks = runs.iter().map(|&(_, s, e)| whole_blocks(s, e)).sum();
        }
        sum.blocks_released = blocks;
        let release_res = self.release_runs(&runs, &mut sum);
        if let Some(e) = table_err {
            return Err(ManagerError::Table(e));
        }
        release_res?;
        Ok(sum)
    }

    fn release_runs(
        &self,
        runs: &[(usize, u64, u64)],
        sum: &mut DiscardSummary,
    ) -> Result<(), ManagerError> {
        if runs.is_empty() {
            return Ok(());
        }
        let tracked = self.uffd.is_some();
        if tracked {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            for &(ri, s, e) in runs {
                let host = self.regions[ri].host;
                inflight.push((host + s, host + e));
            }
        }
        let mut first_err = None;
        for &(ri, s, e) in runs {
            match self.regions[ri].backing.release(s, e - s, self.release) {
                Ok(()) => {
                    sum.release_calls += 1;
                    sum.host_bytes_released += e - s;
                }
                Err(err) => {
                    first_err.get_or_insert(err);
                }
            }
        }
        if first_err.is_none() {
            self.keep_stuck_pages(runs, sum);
        }
        self.counters
            .release_calls
            .fetch_add(sum.release_calls, Ordering::Relaxed);
        self.counters
            .release_bytes
            .fetch_add(sum.host_bytes_released, Ordering::Relaxed);
        self.counters
            .lazy_marked
            .fetch_add(sum.pages_lazy, Ordering::Relaxed);
        if tracked {
            // Every REMOVE event these calls produced was read before the call returned; wait
            // until the handler holding it has classified it, then forget the ranges.
            if let Some(c) = &self.control {
                c.quiesce();
            }
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            for &(ri, s, e) in runs {
                let host = self.regions[ri].host;
                if let Some(pos) = inflight.iter().position(|&x| x == (host + s, host + e)) {
                    inflight.swap_remove(pos);
                }
            }
        }
        match first_err {
            Some(e) => Err(ManagerError::Release(e)),
            None => Ok(()),
        }
    }
}

impl Inner {
    /// On backings with 2 MiB host pages, punching 4 KiB out of a huge page needs the kernel to
    /// split it, which it may fail to do (an extra reference at that moment); it then zeroes the
    /// range and keeps the page. So check the pieces of `runs` that cover their 2 MiB block only
    /// in part: a page still resident is released once more, and if it stays, its leaf is
    /// recorded again (the page is present, and reads zero as a discarded page should). The
    /// blocks are still marked, so no fault races this.
    fn keep_stuck_pages(&self, runs: &[(usize, u64, u64)], sum: &mut DiscardSummary) {
        let mut res = Vec::new();
        for &(ri, s, e) in runs {
            let region = &self.regions[ri];
            if !region.backing.fills_blocks() {
                continue;
            }
            for (ps, pe) in partial_pieces(s, e) {
                for attempt in 0..2 {
                    if region.backing.residency(ps, pe - ps, &mut res).is_err() {
                        self.counters.fault_errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    let stuck: Vec<u64> = res
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| *r & 1 == 1)
                        .map(|(i, _)| ps + i as u64 * PAGE_SIZE)
                        .collect();
                    if stuck.is_empty() {
                        break;
                    }
                    if attempt == 0 {
                        for &off in &stuck {
                            let _ = region.backing.release(off, PAGE_SIZE, self.release);
                        }
                        continue;
                    }
                    for &off in &stuck {
                        if self
                            .tables
                            .populate(region.gpa + off, off, PageSize::Size4K)
                            .is_err()
                        {
                            self.counters.table_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    sum.pages_kept += stuck.len() as u64;
                    self.counters
                        .pages_kept
                        .fetch_add(stuck.len() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The parts of region offsets `s..e` that lie in 2 MiB blocks the range covers only in part
/// (at most a head and a tail piece).
fn partial_pieces(s: u64, e: u64) -> impl Iterator<Item = (u64, u64)> {
    let head_end = s.next_multiple_of(BLOCK_SIZE).min(e);
    let head = (!s.is_multiple_of(BLOCK_SIZE)).then_some((s, head_end));
    let tail_start = (e - e % BLOCK_SIZE).max(head_end);
    let tail = (!e.is_multiple_of(BLOCK_SIZE) && tail_start < e).then_some((tail_start, e));
    head.into_iter().chain(tail)
}

/// The aligned 2 MiB blocks wholly inside offsets `s..e`.
fn whole_blocks(s: u64, e: u64) -> u64 {
    (e / BLOCK_SIZE).saturating_sub(s.div_ceil(BLOCK_SIZE))
}

fn add(acc: &mut [u64; LEVELS], v: &[u64; LEVELS]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_pieces_are_the_unaligned_ends() {
        const B: u64 = BLOCK_SIZE;
        const P: u64 = PAGE_SIZE;
        let v = |s, e| partial_pieces(s, e).collect::<Vec<_>>();
        assert_eq!(v(0, B), vec![]);
        assert_eq!(v(0, 3 * B), vec![]);
        assert_eq!(v(P, 2 * P), vec![(P, 2 * P)]);
        assert_eq!(v(B - P, B + P), vec![(B - P, B), (B, B + P)]);
        assert_eq!(v(P, 3 * B), vec![(P, B)]);
        assert_eq!(v(B, 2 * B + P), vec![(2 * B, 2 * B + P)]);
        assert_eq!(v(P, 3 * B + P), vec![(P, B), (3 * B, 3 * B + P)]);
    }

    #[test]
    fn whole_blocks_counts_aligned_blocks_inside() {
        const B: u64 = BLOCK_SIZE;
        const P: u64 = PAGE_SIZE;
        assert_eq!(whole_blocks(0, B), 1);
        assert_eq!(whole_blocks(0, B - P), 0);
        assert_eq!(whole_blocks(P, 2 * B), 1);
        assert_eq!(whole_blocks(P, B + P), 0);
        assert_eq!(whole_blocks(B, 5 * B + P), 4);
    }
}
