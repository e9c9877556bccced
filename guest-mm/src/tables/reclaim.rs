//! Discard, the emptiness decision with its fast and slow paths, the
//! upward propagation to PD and PDPT tables, the explicit sweep, 2 MiB
//! splits and lazy marking.
//!
//! Lock order: a parent before its child, always. The one exception is the
//! fast path, which holds a child and only *tries* the parent's lock.

use super::node::{TablePtr, TableRef};
use super::sync::{Guard, Ordering, pin};
use super::{
    Discard, LEVELS, ROOT_LEVEL, Reclaim, Strategy, TableError, Tables, index, shift, table_span,
};
use crate::entry;
use crate::range::{BLOCK_SIZE, ENTRIES_PER_TABLE, GpaRange, PAGE_SIZE, push_run};

/// How a table is judged empty.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Emptiness {
    /// Rescan all entries.
    Scan,
    /// Trust the live count.
    Count,
}

/// Which counter a freed table is booked to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    Discard,
    Sweep,
}

/// What a discard or sweep freed, accumulated across blocks.
#[derive(Default)]
struct FreeLog {
    freed: [u64; LEVELS],
    emptied_blocks: Vec<GpaRange>,
}

impl FreeLog {
    fn block(&mut self, start: u64) {
        push_block(&mut self.emptied_blocks, start);
    }
}

/// Appends a 2 MiB block, keeping the list ascending and free of repeats.
fn push_block(blocks: &mut Vec<GpaRange>, start: u64) {
    if blocks.last().is_none_or(|b| b.start() < start) {
        blocks.push(GpaRange::new_unchecked(start, BLOCK_SIZE));
    }
}

/// Where the per-block walk continues.
enum Step {
    /// Go on at this address.
    Next(u64),
    /// The block changed under us (table freed, leaf split): walk it again.
    Again,
}

fn is_empty(t: TableRef<'_>, how: Emptiness) -> bool {
    match how {
        Emptiness::Scan => t.scan_empty(),
        Emptiness::Count => t.meta().count.load(Ordering::Relaxed) == 0,
    }
}

/// The first address of the next region of `span` bytes after `gpa`.
fn next_boundary(gpa: u64, span: u64) -> u64 {
    (gpa & !(span - 1)).saturating_add(span)
}

impl Tables {
    fn emptiness(&self) -> Option<Emptiness> {
        match self.strategy {
            Strategy::Off => None,
            Strategy::Scan => Some(Emptiness::Scan),
            Strategy::Count => Some(Emptiness::Count),
        }
    }

    /// Clears every leaf in `range` and, per strategy, frees every PT, PD and
    /// PDPT table that became empty, before returning. A 2 MiB leaf that is
    /// only partly covered is split first; the uncovered part stays mapped.
    pub fn discard(&self, range: GpaRange) -> Result<Discard, TableError> {
        let guard = pin();
        let mut out = Discard::default();
        let mut log = FreeLog::default();
        let mut gpa = range.start();
        while gpa < range.end() {
            match self.discard_block(&guard, range, gpa, &mut out, &mut log)? {
                Step::Next(next) => gpa = next,
                Step::Again => {}
            }
        }
        self.counters.discards.fetch_add(1, Ordering::Relaxed);
        out.tables_freed = log.freed;
        out.emptied_blocks = log.emptied_blocks;
        if out.tables_freed.iter().any(|&n| n != 0) {
            flush(&guard);
        }
        Ok(out)
    }

    /// Discards the part of `range` inside the 2 MiB block holding `gpa`.
    fn discard_block(
        &self,
        guard: &Guard,
        range: GpaRange,
        gpa: u64,
        out: &mut Discard,
        log: &mut FreeLog,
    ) -> Result<Step, TableError> {
        let block = gpa & !(BLOCK_SIZE - 1);
        let block_end = block + BLOCK_SIZE;
        let (pd, e) = match self.walk_to_pd(guard, gpa) {
            Ok(found) => found,
            Err(next) => return Ok(Step::Next(next.min(range.end()))),
        };
        let sub_start = gpa.max(block);
        let sub_end = range.end().min(block_end);
        if entry::is_large(e) {
            let whole = sub_start == block && sub_end == block_end;
            if !whole {
                return self.split(pd, index(block, 1), e).map(|_| Step::Again);
            }
            out.cleared.reserve(1);
            log.emptied_blocks.reserve(1);
            let meta = pd.meta();
            meta.lock.lock();
            let slot = pd.entry(index(block, 1));
            if meta.dead.load(Ordering::Relaxed) || slot.load(Ordering::Relaxed) != e {
                meta.lock.unlock();
                return Ok(Step::Again);
            }
            slot.store(entry::EMPTY, Ordering::Release);
            if self.strategy == Strategy::Count {
                meta.count_sub(1);
            }
            let pages = BLOCK_SIZE / PAGE_SIZE;
            self.counters.leaves_2m.fetch_sub(1, Ordering::Relaxed);
            self.counters
                .pages_cleared
                .fetch_add(pages, Ordering::Relaxed);
            out.pages_cleared += pages;
            push_run(&mut out.cleared, block, BLOCK_SIZE);
            log.block(block);
            match self.emptiness() {
                Some(how) => self.free_up(guard, pd, block, how, Caller::Discard, log),
                None => meta.lock.unlock(),
            }
            return Ok(Step::Next(block_end));
        }
        // SAFETY: a present, non-large PD entry points at a PT, read while
        // pinned by `guard`.
        let pt = unsafe { pd.child(e) };
        // Room for every run this block can add, so nothing allocates while
        // the PT is locked.
        out.cleared.reserve(ENTRIES_PER_TABLE / 2 + 1);
        let meta = pt.meta();
        meta.lock.lock();
        if meta.dead.load(Ordering::Relaxed) {
            meta.lock.unlock();
            return Ok(Step::Again);
        }
        let mut cleared = 0u64;
        let mut page = sub_start;
        while page < sub_end {
            let old = pt
                .entry(index(page, 0))
                .swap(entry::EMPTY, Ordering::AcqRel);
            if entry::is_present(old) {
                cleared += 1;
                push_run(&mut out.cleared, page, PAGE_SIZE);
            }
            page += PAGE_SIZE;
        }
        if cleared != 0 {
            if self.strategy == Strategy::Count {
                meta.count_sub(cleared as u32);
            }
            self.counters.leaves_4k.sub(cleared);
            self.counters
                .pages_cleared
                .fetch_add(cleared, Ordering::Relaxed);
            out.pages_cleared += cleared;
        }
        match self.emptiness() {
            Some(how) => self.free_up(guard, pt, block, how, Caller::Discard, log),
            None => meta.lock.unlock(),
        }
        Ok(Step::Next(block_end))
    }

    /// Walks to the PD entry for `gpa`. On success returns the PD and its
    /// present entry; otherwise the address where the next mapped region
    /// could start.
    fn walk_to_pd<'g>(&'g self, guard: &'g Guard, gpa: u64) -> Result<(TableRef<'g>, u64), u64> {
        let mut table = self.root_ref(guard);
        let mut level = ROOT_LEVEL;
        loop {
            let e = table.entry(index(gpa, level)).load(Ordering::Acquire);
            if !entry::is_present(e) {
                return Err(next_boundary(gpa, 1u64 << shift(level)));
            }
            if level == 1 {
                return Ok((table, e));
            }
            // SAFETY: present entries above PD level are table pointers, read
            // while pinned by `guard`.
            table = unsafe { table.child(e) };
            level -= 1;
        }
    }

    /// Frees `child` if it is empty, then its parent if that became empty,
    /// and so on up to (never including) the root.
    ///
    /// Entered with `child` locked and not dead; returns with every lock
    /// released. Fast path: try-lock the parent while holding the child.
    /// Slow path: drop the child, lock parent then child, check that the
    /// parent still points at the child, and judge emptiness again.
    fn free_up<'g>(
        &self,
        guard: &'g Guard,
        mut child: TableRef<'g>,
        gpa: u64,
        how: Emptiness,
        caller: Caller,
        log: &mut FreeLog,
    ) {
        // Tables unlinked here are retired, and the emptied block recorded,
        // only after every lock is released: nothing allocates under a lock.
        let mut unlinked: [Option<TablePtr>; LEVELS] = [None; LEVELS];
        let mut emptied_block = None;
        loop {
            let cm = child.meta();
            let Some(parent_ptr) = cm.parent else {
                cm.lock.unlock();
                break;
            };
            if !is_empty(child, how) {
                cm.lock.unlock();
                break;
            }
            // SAFETY: the parent was walked through (or is the root) while
            // `guard` was held, so it stays allocated for 'g.
            let parent = unsafe { parent_ptr.get::<'g>() };
            let pm = parent.meta();
            let slot = parent.entry(cm.index as usize);
            let fast = pm.lock.try_lock();
            if !fast {
                cm.lock.unlock();
                pm.lock.lock();
                cm.lock.lock();
                if cm.dead.load(Ordering::Relaxed) || !is_empty(child, how) {
                    cm.lock.unlock();
                    pm.lock.unlock();
                    break;
                }
            }
            if pm.dead.load(Ordering::Relaxed)
                || slot.load(Ordering::Relaxed) != child.ptr().to_entry()
            {
                // Cannot happen while `child` is live and locked; refuse
                // rather than clear an entry we do not own.
                debug_assert!(false, "live table not linked from its parent");
                cm.lock.unlock();
                pm.lock.unlock();
                break;
            }
            slot.store(entry::EMPTY, Ordering::Release);
            if self.strategy == Strategy::Count {
                pm.count_sub(1);
            }
            cm.dead.store(true, Ordering::Relaxed);
            let level = cm.level as usize;
            self.counters.tables[level].fetch_sub(1, Ordering::Relaxed);
            let counter = match (caller, fast) {
                (Caller::Sweep, _) => &self.counters.freed_sweep,
                (Caller::Discard, true) => &self.counters.freed_fast,
                (Caller::Discard, false) => &self.counters.freed_slow,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            log.freed[level] += 1;
            if level == 0 {
                emptied_block = Some(gpa & !(BLOCK_SIZE - 1));
            }
            cm.lock.unlock();
            unlinked[level] = Some(child.ptr());
            child = parent;
        }
        if let Some(block) = emptied_block {
            log.block(block);
        }
        for t in unlinked.into_iter().flatten() {
            self.retire(guard, t);
        }
    }

    /// Replaces the 2 MiB leaf `e` in entry `i` of `pd` by a PT table holding
    /// the same 512 pages as 4 KiB leaves. The PT is built before the PD lock
    /// is taken; if the entry changed meanwhile the spare is dropped.
    fn split(&self, pd: TableRef<'_>, i: usize, e: u64) -> Result<(), TableError> {
        let spare = TablePtr::alloc(0, i as u16, Some(pd.ptr()))
            .ok_or(TableError::OutOfMemory { level: 0 })?;
        // SAFETY: the spare is ours until published; it is freed below if not.
        let pt = unsafe { spare.get() };
        let lazy = entry::is_lazy(e);
        for k in 0..ENTRIES_PER_TABLE {
            let off = entry::addr(e) + k as u64 * PAGE_SIZE;
            pt.entry(k)
                .store(entry::leaf(off, false, lazy), Ordering::Relaxed);
        }
        if self.strategy == Strategy::Count {
            pt.meta()
                .count
                .store(ENTRIES_PER_TABLE as u32, Ordering::Relaxed);
        }
        let meta = pd.meta();
        meta.lock.lock();
        let slot = pd.entry(i);
        if meta.dead.load(Ordering::Relaxed) || slot.load(Ordering::Relaxed) != e {
            meta.lock.unlock();
            // SAFETY: never published.
            unsafe { spare.free() };
            return Ok(());
        }
        // One store swaps the large leaf for the table: a lookup sees either,
        // and both map the same pages.
        slot.store(spare.to_entry(), Ordering::Release);
        self.counters.tables[0].fetch_add(1, Ordering::Relaxed);
        self.counters.leaves_2m.fetch_sub(1, Ordering::Relaxed);
        self.counters.leaves_4k.add(ENTRIES_PER_TABLE as u64);
        self.counters.splits.fetch_add(1, Ordering::Relaxed);
        meta.lock.unlock();
        Ok(())
    }

    /// True when the 2 MiB block holding `gpa` is mapped by a PT table whose 512 entries are
    /// all present (a candidate for [`promote`](Self::promote)). Lock-free, like
    /// [`lookup`](Self::lookup); with `Strategy::Count` it reads the table's count, otherwise
    /// it scans the table.
    pub fn block_is_full(&self, gpa: u64) -> bool {
        if gpa >= crate::range::GPA_LIMIT {
            return false;
        }
        let guard = pin();
        let Ok((pd, e)) = self.walk_to_pd(&guard, gpa) else {
            return false;
        };
        if entry::is_large(e) {
            return false;
        }
        // SAFETY: a present, non-large PD entry points at a PT, read while pinned by `guard`.
        let pt = unsafe { pd.child(e) };
        let full = ENTRIES_PER_TABLE as u32;
        match self.strategy {
            Strategy::Count => pt.meta().count.load(Ordering::Relaxed) == full,
            Strategy::Scan | Strategy::Off => pt.present() == full,
        }
    }

    /// The inverse of a split: if the 2 MiB block holding `gpa` is mapped by a PT table whose
    /// 512 entries are all present, not lazy, and map one aligned, contiguous 2 MiB of host
    /// offsets, replaces the table by one 2 MiB leaf and frees it. Returns whether it did.
    ///
    /// The PD is locked before the PT (parent before child), and both are checked alive and
    /// linked. One store swaps the table for the leaf, as in a split: a lock-free lookup sees
    /// either, and both map the same pages. The table is then marked dead, so a populate or
    /// discard that reached it walks again and finds the leaf (a later partial discard splits
    /// it again), and it is retired like any freed table. It keeps its entries until the epoch
    /// frees it (the arena zeroes a freed page), so a lookup still reading it finds its leaf.
    pub fn promote(&self, gpa: u64) -> Result<bool, TableError> {
        if gpa >= crate::range::GPA_LIMIT {
            return Err(TableError::OutOfSpace { gpa });
        }
        let block = gpa & !(BLOCK_SIZE - 1);
        let guard = pin();
        let Ok((pd, e)) = self.walk_to_pd(&guard, block) else {
            return Ok(false);
        };
        if entry::is_large(e) {
            return Ok(false);
        }
        // SAFETY: a present, non-large PD entry points at a PT, read while pinned by `guard`.
        let pt = unsafe { pd.child(e) };
        let pm = pd.meta();
        let cm = pt.meta();
        pm.lock.lock();
        cm.lock.lock();
        let i = index(block, 1);
        let slot = pd.entry(i);
        let unlock = || {
            cm.lock.unlock();
            pm.lock.unlock();
        };
        if pm.dead.load(Ordering::Relaxed)
            || cm.dead.load(Ordering::Relaxed)
            || slot.load(Ordering::Relaxed) != e
        {
            unlock();
            return Ok(false);
        }
        let base = entry::addr(pt.entry(0).load(Ordering::Relaxed));
        let whole = base.is_multiple_of(BLOCK_SIZE)
            && (0..ENTRIES_PER_TABLE).all(|k| {
                let v = pt.entry(k).load(Ordering::Relaxed);
                entry::is_present(v)
                    && !entry::is_lazy(v)
                    && entry::addr(v) == base + k as u64 * PAGE_SIZE
            });
        if !whole {
            unlock();
            return Ok(false);
        }
        slot.store(entry::leaf(base, true, false), Ordering::Release);
        // The PD's count is unchanged: one present entry replaces another.
        cm.dead.store(true, Ordering::Relaxed);
        self.counters.tables[0].fetch_sub(1, Ordering::Relaxed);
        self.counters.leaves_4k.sub(ENTRIES_PER_TABLE as u64);
        self.counters.leaves_2m.fetch_add(1, Ordering::Relaxed);
        self.counters.promotions.fetch_add(1, Ordering::Relaxed);
        unlock();
        self.retire(&guard, pt.ptr());
        flush(&guard);
        Ok(true)
    }

    /// Sets the lazy bit on every leaf in `range` (the host released those
    /// pages with `MADV_FREE`). Returns the number of 4 KiB pages newly
    /// marked. A partly covered 2 MiB leaf is split first.
    pub fn mark_lazy(&self, range: GpaRange) -> Result<u64, TableError> {
        let guard = pin();
        let mut marked = 0;
        let mut gpa = range.start();
        while gpa < range.end() {
            let block = gpa & !(BLOCK_SIZE - 1);
            let block_end = block + BLOCK_SIZE;
            let (pd, e) = match self.walk_to_pd(&guard, gpa) {
                Ok(found) => found,
                Err(next) => {
                    gpa = next.min(range.end());
                    continue;
                }
            };
            let sub_end = range.end().min(block_end);
            let (table, level, first, last) = if entry::is_large(e) {
                if gpa != block || sub_end != block_end {
                    self.split(pd, index(block, 1), e)?;
                    continue;
                }
                (pd, 1, block, block)
            } else {
                // SAFETY: a present, non-large PD entry points at a PT, read
                // while pinned.
                (unsafe { pd.child(e) }, 0, gpa, sub_end - PAGE_SIZE)
            };
            let meta = table.meta();
            meta.lock.lock();
            if meta.dead.load(Ordering::Relaxed) {
                meta.lock.unlock();
                continue;
            }
            let step = if level == 1 { BLOCK_SIZE } else { PAGE_SIZE };
            let mut a = first;
            while a <= last {
                let slot = table.entry(index(a, level));
                let cur = slot.load(Ordering::Relaxed);
                let still_large = level == 0 || entry::is_large(cur);
                if entry::is_present(cur) && still_large && !entry::is_lazy(cur) {
                    slot.store(cur | entry::LAZY, Ordering::Release);
                    marked += step / PAGE_SIZE;
                }
                a += step;
            }
            meta.lock.unlock();
            gpa = block_end;
        }
        Ok(marked)
    }

    /// The explicit sweep: frees every table overlapping `range` that is
    /// empty (by a full scan, whatever the strategy), bottom-up, including
    /// PD and PDPT tables left empty. Works with every strategy, including
    /// `Off`.
    pub fn reclaim(&self, range: GpaRange) -> Result<Reclaim, TableError> {
        let guard = pin();
        let mut log = FreeLog::default();
        let root = self.root_ref(&guard);
        self.sweep(&guard, root, ROOT_LEVEL, 0, range, &mut log);
        if log.freed.iter().any(|&n| n != 0) {
            flush(&guard);
            log::debug!("sweep of {range:?} freed tables per level {:?}", log.freed);
        }
        Ok(Reclaim {
            emptied_blocks: log.emptied_blocks,
            tables_freed: log.freed,
        })
    }

    /// Post-order walk of `table` (mapping from `base`), freeing empty tables.
    fn sweep<'g>(
        &self,
        guard: &'g Guard,
        table: TableRef<'g>,
        level: u8,
        base: u64,
        range: GpaRange,
        log: &mut FreeLog,
    ) {
        if level > 0 {
            let child_span = table_span(level - 1);
            let first = index(range.start().max(base), level);
            let last_addr = (range.end() - 1).min(base + table_span(level) - 1);
            let last = index(last_addr, level);
            for i in first..=last {
                let e = table.entry(i).load(Ordering::Acquire);
                if !entry::is_present(e) || (level == 1 && entry::is_large(e)) {
                    continue;
                }
                // SAFETY: a present non-large entry above level 0 points at
                // a table, read while pinned.
                let child = unsafe { table.child(e) };
                let child_base = base + i as u64 * child_span;
                self.sweep(guard, child, level - 1, child_base, range, log);
            }
        }
        if level == ROOT_LEVEL {
            return;
        }
        let meta = table.meta();
        meta.lock.lock();
        if meta.dead.load(Ordering::Relaxed) || !table.scan_empty() {
            meta.lock.unlock();
            return;
        }
        self.free_up(guard, table, base, Emptiness::Scan, Caller::Sweep, log);
    }
}

/// Pushes this thread's retired tables to the global queue so that they are
/// freed soon, not after the thread retires many more.
fn flush(guard: &Guard) {
    #[cfg(not(loom))]
    guard.flush();
    #[cfg(loom)]
    let _ = guard;
}
