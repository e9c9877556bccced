//! Walking the tree: lock-free lookup, populate, and the installation of
//! missing tables.

use super::node::{TablePtr, TableRef};
use super::sync::{Guard, Ordering, pin};
use super::{Leaf, PageSize, Populate, ROOT_LEVEL, Strategy, TableError, Tables, index};
use crate::entry;
use crate::range::GPA_LIMIT;

/// Result of trying to fill an empty parent entry.
pub(crate) enum Install {
    /// The entry now holds this value (our new table, or what a racing
    /// thread installed first).
    Entry(u64),
    /// The parent is being freed; walk again from the root.
    Retry,
}

impl Tables {
    /// The root, borrowed for as long as `self`.
    #[inline]
    pub(crate) fn root_ref<'a>(&'a self, _guard: &'a Guard) -> TableRef<'a> {
        // SAFETY: the root is never freed while the Tables lives.
        unsafe { self.root.get() }
    }

    /// Looks up the leaf mapping `gpa`. Lock-free: it never blocks and never
    /// writes; it may miss a leaf being installed concurrently or see one
    /// being cleared, but it never reads freed memory (the walk is pinned).
    pub fn lookup(&self, gpa: u64) -> Option<Leaf> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let guard = pin();
        let mut table = self.root_ref(&guard);
        let mut level = ROOT_LEVEL;
        loop {
            let e = table.entry(index(gpa, level)).load(Ordering::Acquire);
            if !entry::is_present(e) {
                return None;
            }
            if level == 0 || (level == 1 && entry::is_large(e)) {
                return Some(Leaf::decode(e, gpa));
            }
            // SAFETY: a present entry above level 0 that is not a large leaf
            // points at a table, read while pinned by `guard`.
            table = unsafe { table.child(e) };
            level -= 1;
        }
    }

    /// True when nothing maps any page of the 2 MiB block holding `gpa`: the walk ends at a
    /// non-present entry at or above the PD level (no 2 MiB leaf, no PT table). Lock-free, like
    /// [`lookup`](Self::lookup). An empty PT table left behind (strategy `Off`) counts as
    /// not empty.
    ///
    /// The walk repeats `lookup`'s on purpose: one walker serving both (stopping at a given
    /// level, as a const parameter or not) made `lookup` 4-15% slower in `benches/tables.rs`
    /// (`tables/lookup`, all three strategies, against a saved baseline of this code).
    pub fn block_is_empty(&self, gpa: u64) -> bool {
        if gpa >= GPA_LIMIT {
            return false;
        }
        let guard = pin();
        let mut table = self.root_ref(&guard);
        let mut level = ROOT_LEVEL;
        loop {
            let e = table.entry(index(gpa, level)).load(Ordering::Acquire);
            if !entry::is_present(e) {
                return true;
            }
            if level == 1 {
                return false;
            }
            // SAFETY: a present entry above level 1 is a table pointer (large leaves exist
            // only at level 1), read while pinned by `guard`.
            table = unsafe { table.child(e) };
            level -= 1;
        }
    }

    /// Installs a leaf mapping `gpa` (aligned to `size`) to `host_offset`.
    ///
    /// Missing tables are allocated without holding any lock and installed
    /// under the parent's lock; a thread that loses the race frees its spare
    /// at once. The leaf itself is written under the PT (or PD) lock after
    /// checking that the table is not being freed; if it is, the walk starts
    /// again from the root. An existing leaf is never overwritten.
    pub fn populate(
        &self,
        gpa: u64,
        host_offset: u64,
        size: PageSize,
    ) -> Result<Populate, TableError> {
        check_populate(gpa, host_offset, size)?;
        let guard = pin();
        let leaf_level = size.level();
        let new_leaf = entry::leaf(host_offset, size == PageSize::Size2M, false);
        'walk: loop {
            let mut table = self.root_ref(&guard);
            let mut level = ROOT_LEVEL;
            while level > leaf_level {
                let i = index(gpa, level);
                let mut e = table.entry(i).load(Ordering::Acquire);
                if !entry::is_present(e) {
                    match self.install_child(table, i, level - 1)? {
                        Install::Entry(v) => e = v,
                        Install::Retry => continue 'walk,
                    }
                }
                if level == 1 && entry::is_large(e) {
                    // A 4 KiB populate under an existing 2 MiB leaf.
                    return Ok(Populate::Present(Leaf::decode(e, gpa)));
                }
                // SAFETY: a present non-large entry above the leaf level is a
                // table pointer, read while pinned by `guard`.
                table = unsafe { table.child(e) };
                level -= 1;
            }
            let meta = table.meta();
            meta.lock.lock();
            if meta.dead.load(Ordering::Relaxed) {
                meta.lock.unlock();
                continue 'walk;
            }
            let slot = table.entry(index(gpa, leaf_level));
            let cur = slot.load(Ordering::Relaxed);
            if entry::is_present(cur) {
                meta.lock.unlock();
                if leaf_level == 1 && !entry::is_large(cur) {
                    return Err(TableError::Occupied { gpa });
                }
                return Ok(Populate::Present(Leaf::decode(cur, gpa)));
            }
            slot.store(new_leaf, Ordering::Release);
            if self.strategy == Strategy::Count {
                meta.count_add(1);
            }
            match size {
                PageSize::Size4K => self.counters.leaves_4k.add(1),
                PageSize::Size2M => {
                    self.counters.leaves_2m.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.counters.populates.add(1);
            meta.lock.unlock();
            return Ok(Populate::Installed);
        }
    }

    /// Fills the empty entry `i` of `parent` with a new table of
    /// `child_level`. The table is allocated before taking any lock.
    pub(crate) fn install_child(
        &self,
        parent: TableRef<'_>,
        i: usize,
        child_level: u8,
    ) -> Result<Install, TableError> {
        let spare = TablePtr::alloc(child_level, i as u16, Some(parent.ptr()))
            .ok_or(TableError::OutOfMemory { level: child_level })?;
        let meta = parent.meta();
        meta.lock.lock();
        let outcome = if meta.dead.load(Ordering::Relaxed) {
            Install::Retry
        } else {
            let cur = parent.entry(i).load(Ordering::Relaxed);
            if entry::is_present(cur) {
                Install::Entry(cur)
            } else {
                let e = spare.to_entry();
                // Release: the zeroed page and its metadata are visible to
                // any walker that reads this entry.
                parent.entry(i).store(e, Ordering::Release);
                if self.strategy == super::Strategy::Count {
                    meta.count_add(1);
                }
                self.counters.tables[child_level as usize].fetch_add(1, Ordering::Relaxed);
                meta.lock.unlock();
                return Ok(Install::Entry(e));
            }
        };
        meta.lock.unlock();
        // SAFETY: the spare was never published.
        unsafe { spare.free() };
        Ok(outcome)
    }
}

/// Validates the arguments of a populate.
fn check_populate(gpa: u64, host_offset: u64, size: PageSize) -> Result<(), TableError> {
    let bytes = size.bytes();
    if gpa >= GPA_LIMIT || gpa.checked_add(bytes).is_none_or(|end| end > GPA_LIMIT) {
        return Err(TableError::OutOfSpace { gpa });
    }
    if !gpa.is_multiple_of(bytes) {
        return Err(TableError::UnalignedGpa { gpa, size });
    }
    if !host_offset.is_multiple_of(bytes) {
        return Err(TableError::UnalignedHostOffset {
            offset: host_offset,
            size,
        });
    }
    if host_offset
        .checked_add(bytes)
        .is_none_or(|end| end > entry::HOST_OFFSET_LIMIT)
    {
        return Err(TableError::HostOffsetTooLarge {
            offset: host_offset,
        });
    }
    Ok(())
}
