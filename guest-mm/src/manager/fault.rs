//! The manager's side of the fault path: resolving a fault into a host page plus a leaf, and
//! classifying remove events.
//!
//! A fault locks its 2 MiB block's state. If a discard is working on the block the fault is
//! deferred (the handler moves on; the discard kicks the handlers when done). Otherwise the
//! fill ioctl and the leaf record both happen under the block lock, so a discard, which must
//! take the same lock to mark the block before it clears leaves, sees either both (and clears
//! the leaf and zaps the page) or neither. The fill ioctl never waits for an event: while a
//! remove event is pending it fails with EAGAIN, and the fault is deferred.

use std::sync::atomic::{AtomicU64, Ordering};

use super::region::{BlockState, Region};
use super::{FillMode, Inner};
use crate::backing::ReleaseMode;
use crate::range::{BLOCK_SIZE, GpaRange, PAGE_SIZE};
use crate::sys::{UFFD_PAGEFAULT_FLAG_WRITE, UffdIoError, Userfaultfd};
use crate::tables::PageSize;
use crate::uffd::{FaultOutcome, FaultResolver};

/// Counts an error; true for the 1st, 2nd, 4th, 8th, ... so that a failure repeating on every
/// fault does not log once per page.
fn first_of_many(counter: &AtomicU64) -> bool {
    (counter.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
}

impl Inner {
    fn fill(
        &self,
        uffd: &Userfaultfd,
        write: bool,
        addr: u64,
        len: u64,
    ) -> Result<u64, UffdIoError> {
        let copy = match self.fill {
            FillMode::ZeropageForReads => write,
            FillMode::AlwaysCopy => true,
            FillMode::AlwaysZeropage => false,
        };
        if copy {
            let n = (len as usize).min(self.zeros.len() as usize);
            // SAFETY: `zeros` is a live private anonymous mapping of at least `n` bytes that
            // nothing ever writes (it only serves as a source of zeros for UFFDIO_COPY), so a
            // shared slice over it is never aliased by a mutable access.
            let src = unsafe { std::slice::from_raw_parts(self.zeros.as_ptr(), n) };
            uffd.copy(addr, src, false)
        } else {
            uffd.zeropage(addr, len, false)
        }
    }

    /// Fills the whole blocks `off..off + len` of `region` through its block-fill mapping,
    /// records a 2 MiB leaf for each and wakes the range. The caller holds the blocks' locks
    /// and checked they are empty. On failure nothing stays present (what the fill managed is
    /// punched out again) and false is returned.
    fn fill_blocks(&self, uffd: &Userfaultfd, region: &Region, off: u64, len: u64) -> bool {
        let c = &self.counters;
        if let Err(e) = region.backing.fill_blocks(off, len) {
            if first_of_many(&c.fault_errors) {
                log::warn!("block fill at {:#x} failed: {e}", region.host + off);
            }
            // Punching the file sends no userfaultfd event, so a handler may do it.
            if let Err(e) = region.backing.release(off, len, ReleaseMode::PunchHole)
                && first_of_many(&c.fault_errors)
            {
                log::warn!(
                    "undoing a failed block fill at {:#x}: {e}",
                    region.host + off
                );
            }
            return false;
        }
        for b in (off..off + len).step_by(BLOCK_SIZE as usize) {
            if self
                .tables
                .populate(region.gpa + b, b, PageSize::Size2M)
                .is_err()
            {
                c.table_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The pages are in the file now; the retried accesses map them.
        self.wake(uffd, region.host + off, len);
        c.block_fills.fetch_add(len / BLOCK_SIZE, Ordering::Relaxed);
        c.faults_resolved.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Fills every page of the block at region offset `block_off` that has no leaf, through
    /// the block-fill mapping, records their 4 KiB leaves and wakes the block. The caller holds
    /// the block's lock, and the block is not being discarded and holds no page of the balloon,
    /// so its missing pages are exactly the pages the host lacks. False (nothing changed) if
    /// the block has no leaf at all (the whole-block fill's case) or the fill failed.
    fn fill_rest(&self, uffd: &Userfaultfd, region: &Region, block_off: u64) -> bool {
        let c = &self.counters;
        let pages = BLOCK_SIZE / PAGE_SIZE;
        let mut missing: Vec<(u64, u64)> = Vec::new();
        for p in 0..pages {
            let o = block_off + p * PAGE_SIZE;
            if self.tables.lookup(region.gpa + o).is_some() {
                continue;
            }
            match missing.last_mut() {
                Some(last) if last.1 == o => last.1 = o + PAGE_SIZE,
                _ => missing.push((o, o + PAGE_SIZE)),
            }
        }
        let count: u64 = missing.iter().map(|(s, e)| (e - s) / PAGE_SIZE).sum();
        if count == 0 || count == pages {
            return false;
        }
        // One populate over the whole block: the present pages are only mapped in the fill
        // mapping (and unmapped again with the rest, which frees its PTE page too).
        if let Err(err) = region.backing.fill_blocks(block_off, BLOCK_SIZE) {
            if first_of_many(&c.fault_errors) {
                log::warn!(
                    "filling the rest of the block at {:#x} failed: {err}",
                    region.host + block_off
                );
            }
            // Undo what the fill added, only where pages were missing, so nothing stays
            // present without a leaf; punching raises no userfaultfd event.
            for &(s, e) in &missing {
                let _ = region.backing.release(s, e - s, ReleaseMode::PunchHole);
            }
            return false;
        }
        for &(s, e) in &missing {
            self.record(region.gpa, s, (e - s) / PAGE_SIZE);
        }
        self.wake(uffd, region.host + block_off, BLOCK_SIZE);
        c.rest_fills.fetch_add(1, Ordering::Relaxed);
        c.fault_around_pages.fetch_add(count, Ordering::Relaxed);
        c.faults_resolved.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Wakes the threads waiting on `addr..addr + len`; a failure is counted and logged
    /// sparsely.
    fn wake(&self, uffd: &Userfaultfd, addr: u64, len: u64) {
        if let Err(e) = uffd.wake(addr, len)
            && first_of_many(&self.counters.fault_errors)
        {
            log::warn!("waking {addr:#x} failed: {e}");
        }
    }

    /// After 4 KiB fills in the block holding region offset `off` (whose lock the caller
    /// holds, with no page of it held by the balloon): if every page of the block is present
    /// again, makes it one 2 MiB host page mapped by one PMD (the host frees the PTE page the
    /// split had made, and KVM, told by the host's invalidation, maps the block with one 2 MiB
    /// entry on the next access) and one 2 MiB leaf (the PT table is freed). Only on backings
    /// that fill blocks; a refusal by the host leaves the block as it was, counted.
    fn promote_if_full(&self, region: &Region, off: u64) {
        let block_off = off & !(BLOCK_SIZE - 1);
        if !region.backing.fills_blocks()
            || block_off + BLOCK_SIZE > region.len
            || !self.tables.block_is_full(region.gpa + block_off)
        {
            return;
        }
        let c = &self.counters;
        let t = std::time::Instant::now();
        match region.backing.collapse(block_off, BLOCK_SIZE) {
            Ok(()) => match self.tables.promote(region.gpa + block_off) {
                Ok(true) => {
                    c.promotions.fetch_add(1, Ordering::Relaxed);
                }
                // The block is locked and full, so the tables cannot refuse; if they do, the
                // 4 KiB leaves still map exactly the present pages.
                Ok(false) | Err(_) => {
                    c.table_errors.fetch_add(1, Ordering::Relaxed);
                }
            },
            Err(e) => {
                if first_of_many(&c.promote_errors) {
                    log::warn!(
                        "re-promoting the block at {:#x} failed: {e}",
                        region.host + block_off
                    );
                }
            }
        }
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        c.promote_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Records leaves for `pages` pages from region offset `off`.
    fn record(&self, region_gpa: u64, off: u64, pages: u64) {
        for i in 0..pages {
            let o = off + i * PAGE_SIZE;
            if self
                .tables
                .populate(region_gpa + o, o, PageSize::Size4K)
                .is_err()
            {
                self.counters.table_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl FaultResolver for Inner {
    fn fault(&self, uffd: &Userfaultfd, flags: u64, addr: u64) -> FaultOutcome {
        let c = &self.counters;
        let Some(region) = self.region_for_host(addr) else {
            c.fault_errors.fetch_add(1, Ordering::Relaxed);
            return FaultOutcome::Failed;
        };
        let write = flags & UFFD_PAGEFAULT_FLAG_WRITE != 0;
        let off = (addr - region.host) & !(PAGE_SIZE - 1);
        let page_addr = region.host + off;
        // Blocks filled per fault on a block-fill backing: the fault-around window rounded up
        // to whole blocks (1 = just the faulting block). All of the window's block locks are
        // taken, in address order, so no discard can work on any of them meanwhile.
        let fills_blocks = region.backing.fills_blocks();
        let window = if fills_blocks {
            u64::from(self.fault_around).div_ceil(BLOCK_SIZE / PAGE_SIZE) * BLOCK_SIZE
        } else {
            BLOCK_SIZE
        };
        let mut wstart = off & !(window - 1);
        if wstart + window > region.len {
            wstart = off & !(BLOCK_SIZE - 1);
        }
        let wlen = if wstart + window <= region.len {
            window
        } else {
            BLOCK_SIZE
        };
        let guards: Vec<_> = (0..wlen.div_ceil(BLOCK_SIZE))
            .map(|i| region.block(wstart + i * BLOCK_SIZE))
            .collect();
        let own = *guards[((off - wstart) / BLOCK_SIZE) as usize];
        if own.discarding > 0 {
            c.deferred_discarding.fetch_add(1, Ordering::Relaxed);
            return FaultOutcome::Deferred;
        }
        // A block holding pages the guest gave back is filled page by page.
        let exact = own.held > 0;

        // A backing with a block-fill mapping fills empty blocks whole: 2 MiB leaves. First the
        // whole window if every block of it is empty, quiet and never given back, else the
        // faulting block.
        if fills_blocks && wlen > BLOCK_SIZE {
            let all_empty = guards.iter().all(|g| **g == BlockState::default())
                && (0..wlen / BLOCK_SIZE).all(|i| {
                    self.tables
                        .block_is_empty(region.gpa + wstart + i * BLOCK_SIZE)
                });
            if all_empty && self.fill_blocks(uffd, region, wstart, wlen) {
                return FaultOutcome::Resolved;
            }
        }
        if fills_blocks && !exact {
            let block_off = off & !(BLOCK_SIZE - 1);
            if block_off + BLOCK_SIZE <= region.len
                && self.tables.block_is_empty(region.gpa + block_off)
                && self.fill_blocks(uffd, region, block_off, BLOCK_SIZE)
            {
                return FaultOutcome::Resolved;
            }
        }

        // A block that holds some pages and none the balloon keeps (split by give-backs the
        // guest has taken back since) gets all its missing pages at once, then becomes one
        // 2 MiB page again: one userfault instead of one per missing page.
        if fills_blocks && !exact {
            let block_off = off & !(BLOCK_SIZE - 1);
            if block_off + BLOCK_SIZE <= region.len
                && self.tables.lookup(region.gpa + off).is_none()
                && self.fill_rest(uffd, region, block_off)
            {
                self.promote_if_full(region, off);
                return FaultOutcome::Resolved;
            }
        }

        // Another fault filled this page's block already (a second vCPU touched the block before
        // the first one's retried access mapped it). Only wake: a fill ioctl would fail with
        // EEXIST too, but would first allocate a host PTE table under the empty PMD, and the
        // block could then never be mapped by one PMD.
        if let Some(leaf) = self.tables.lookup(region.gpa + off)
            && leaf.size == PageSize::Size2M
            && !leaf.lazy
        {
            c.eexist.fetch_add(1, Ordering::Relaxed);
            self.wake(uffd, page_addr, PAGE_SIZE);
            return FaultOutcome::Resolved;
        }

        // 4 KiB fault-around stays inside the faulting block (the block lock covers no more).
        let fa_pages = if exact {
            1
        } else {
            self.fault_around.min((BLOCK_SIZE / PAGE_SIZE) as u32)
        };
        let fa_bytes = u64::from(fa_pages) * PAGE_SIZE;
        if fa_pages > 1 {
            let win = off & !(fa_bytes - 1);
            let empty = win + fa_bytes <= region.len
                && (0..u64::from(self.fault_around)).all(|i| {
                    self.tables
                        .lookup(region.gpa + win + i * PAGE_SIZE)
                        .is_none()
                });
            if empty {
                match self.fill(uffd, write, region.host + win, fa_bytes) {
                    Ok(_) => {
                        self.record(region.gpa, win, u64::from(fa_pages));
                        c.fault_around_pages
                            .fetch_add(u64::from(fa_pages), Ordering::Relaxed);
                        c.faults_resolved.fetch_add(1, Ordering::Relaxed);
                        self.promote_if_full(region, off);
                        return FaultOutcome::Resolved;
                    }
                    Err(UffdIoError::Exists { done } | UffdIoError::Again { done }) if done > 0 => {
                        // Filled (and woke) the first `done` bytes, then met a present page.
                        self.record(region.gpa, win, done / PAGE_SIZE);
                        c.fault_around_pages
                            .fetch_add(done / PAGE_SIZE, Ordering::Relaxed);
                        if off < win + done {
                            c.faults_resolved.fetch_add(1, Ordering::Relaxed);
                            self.promote_if_full(region, off);
                            return FaultOutcome::Resolved;
                        }
                    }
                    Err(UffdIoError::Exists { .. }) => {
                        c.eexist.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(UffdIoError::Again { .. }) => {
                        c.eagain.fetch_add(1, Ordering::Relaxed);
                        return FaultOutcome::Deferred;
                    }
                    Err(UffdIoError::Failed(e)) => {
                        if first_of_many(&c.fault_errors) {
                            log::warn!("fault-around fill at {:#x} failed: {e}", region.host + win);
                        }
                        // Fall back to the single page.
                    }
                }
            }
        }

        match self.fill(uffd, write, page_addr, PAGE_SIZE) {
            Ok(_) => {
                self.record(region.gpa, off, 1);
                c.faults_resolved.fetch_add(1, Ordering::Relaxed);
                if !exact {
                    self.promote_if_full(region, off);
                }
                FaultOutcome::Resolved
            }
            Err(UffdIoError::Exists { .. }) => {
                // Already present (another handler, or fault-around): make sure the leaf is
                // recorded and the faulting thread is awake.
                c.eexist.fetch_add(1, Ordering::Relaxed);
                self.record(region.gpa, off, 1);
                self.wake(uffd, page_addr, PAGE_SIZE);
                FaultOutcome::Resolved
            }
            Err(UffdIoError::Again { .. }) => {
                c.eagain.fetch_add(1, Ordering::Relaxed);
                FaultOutcome::Deferred
            }
            Err(UffdIoError::Failed(e)) => {
                if first_of_many(&c.fault_errors) {
                    log::warn!("filling {page_addr:#x} failed: {e}");
                }
                FaultOutcome::Failed
            }
        }
    }

    fn remove(&self, start: u64, end: u64) {
        let c = &self.counters;
        let own = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|&(s, e)| s <= start && end <= e);
        if own {
            c.own_remove_events.fetch_add(1, Ordering::Relaxed);
            return;
        }
        c.foreign_remove_events.fetch_add(1, Ordering::Relaxed);
        // Someone else released pages of a region: clear their leaves so the next touch is
        // recorded again. Never release anything from here (a handler that madvises a
        // registered range would wait for its own REMOVE event).
        let Some(region) = self.region_for_host(start) else {
            return;
        };
        let s = (start - region.host).next_multiple_of(PAGE_SIZE);
        let e = (end.min(region.host + region.len) - region.host) & !(PAGE_SIZE - 1);
        if s >= e {
            return;
        }
        match GpaRange::new(region.gpa + s, e - s).map(|r| self.tables.discard(r)) {
            Ok(Ok(d)) => {
                c.foreign_pages_cleared
                    .fetch_add(d.pages_cleared, Ordering::Relaxed);
            }
            _ => {
                c.table_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
