//! Full walks of the tree: recount (for tests and diagnostics), invariant
//! checks, the minimum footprint, and freeing the whole tree on drop.

use super::node::{TablePtr, TableRef};
use super::sync::{Ordering, pin};
use super::{LEVELS, ROOT_LEVEL, Strategy, TableError, TableStats, Tables, table_span};
use crate::entry;
use crate::range::{ENTRIES_PER_TABLE, GpaRange};

use super::node::TABLE_BYTES;

/// Visits every linked table (pre-order) with its level and base address.
fn walk<'g>(
    table: TableRef<'g>,
    level: u8,
    base: u64,
    visit: &mut dyn FnMut(TableRef<'g>, u8, u64) -> Result<(), TableError>,
) -> Result<(), TableError> {
    visit(table, level, base)?;
    if level == 0 {
        return Ok(());
    }
    let child_span = table_span(level - 1);
    for i in 0..ENTRIES_PER_TABLE {
        let e = table.entry(i).load(Ordering::Acquire);
        if !entry::is_present(e) || (level == 1 && entry::is_large(e)) {
            continue;
        }
        // SAFETY: present non-large entries above level 0 point at tables;
        // the caller holds an epoch guard for 'g.
        let child = unsafe { table.child(e) };
        walk(child, level - 1, base + i as u64 * child_span, visit)?;
    }
    Ok(())
}

impl Tables {
    /// Recounts the gauges (tables per level, table bytes, leaves) by walking
    /// the whole tree; event counters are copied from [`Tables::stats`].
    /// When no operation runs concurrently it must equal `stats()`.
    pub fn recount(&self) -> TableStats {
        let mut s = self.stats();
        let guard = pin();
        let mut tables = [0u64; LEVELS];
        let (mut l4k, mut l2m) = (0u64, 0u64);
        let root = self.root_ref(&guard);
        let res = walk(root, ROOT_LEVEL, 0, &mut |t, level, _| {
            tables[level as usize] += 1;
            if level <= 1 {
                for i in 0..ENTRIES_PER_TABLE {
                    let e = t.entry(i).load(Ordering::Relaxed);
                    if !entry::is_present(e) {
                        continue;
                    }
                    if level == 0 {
                        l4k += 1;
                    } else if entry::is_large(e) {
                        l2m += 1;
                    }
                }
            }
            Ok(())
        });
        debug_assert!(res.is_ok());
        s.tables = tables;
        s.table_bytes = tables.iter().sum::<u64>() * TABLE_BYTES;
        s.leaves_4k = l4k;
        s.leaves_2m = l2m;
        s
    }

    /// Checks the structural invariants: every linked table is live (not
    /// dead), knows its level and parent, and, with `Count`, its live count
    /// equals its present entries. Meant for quiescent trees (tests).
    pub fn audit(&self) -> Result<(), TableError> {
        let guard = pin();
        let root = self.root_ref(&guard);
        let count = self.strategy == Strategy::Count;
        walk(root, ROOT_LEVEL, 0, &mut |t, level, gpa| {
            let m = t.meta();
            let fail = |what| Err(TableError::Corrupt { level, gpa, what });
            if m.dead.load(Ordering::Relaxed) {
                return fail("a linked table is marked dead");
            }
            if m.level != level {
                return fail("metadata level does not match the tree");
            }
            if m.lock.is_held() {
                return fail("table lock held while quiescent");
            }
            if level < ROOT_LEVEL {
                let Some(parent) = m.parent else {
                    return fail("non-root table without parent");
                };
                // SAFETY: the parent is linked (we came from it) and pinned.
                let p = unsafe { parent.get() };
                let e = p.entry(m.index as usize).load(Ordering::Relaxed);
                if e != t.ptr().to_entry() {
                    return fail("parent entry does not point at this table");
                }
            }
            if count && m.count.load(Ordering::Relaxed) != t.present() {
                return fail("live count differs from present entries");
            }
            Ok(())
        })
    }

    /// Number of linked tables (root excluded) overlapping `range` that
    /// have no present entry. Zero after a discard with `Scan` or `Count`.
    pub fn empty_tables(&self, range: GpaRange) -> u64 {
        let guard = pin();
        let mut n = 0;
        let root = self.root_ref(&guard);
        let _ = walk(root, ROOT_LEVEL, 0, &mut |t, level, base| {
            let overlaps = base < range.end() && base + table_span(level) > range.start();
            if level < ROOT_LEVEL && overlaps && t.scan_empty() {
                n += 1;
            }
            Ok(())
        });
        n
    }

    /// The fewest table bytes that could map the current leaves (see
    /// [`super::min_table_bytes`]), computed by walking the tree.
    pub fn min_table_bytes(&self) -> u64 {
        let guard = pin();
        let root = self.root_ref(&guard);
        needed(root, ROOT_LEVEL).1 * TABLE_BYTES
    }
}

/// Whether the subtree holds any leaf, and how many tables (including this
/// one, if it holds any leaf or is the root) it needs at minimum.
fn needed(t: TableRef<'_>, level: u8) -> (bool, u64) {
    let mut any = false;
    let mut tables = 0;
    for i in 0..ENTRIES_PER_TABLE {
        let e = t.entry(i).load(Ordering::Acquire);
        if !entry::is_present(e) {
            continue;
        }
        if level == 0 || (level == 1 && entry::is_large(e)) {
            any = true;
            continue;
        }
        // SAFETY: a present non-leaf entry points at a table; the caller is
        // pinned.
        let (a, n) = needed(unsafe { t.child(e) }, level - 1);
        any |= a;
        tables += n;
    }
    let own = u64::from(any || level == ROOT_LEVEL);
    (any, tables + own)
}

/// Frees every table reachable from `root`, including the root.
///
/// # Safety
/// No other thread may access the tree, and it must not be used afterwards.
pub(crate) unsafe fn free_tree(root: TablePtr) {
    // SAFETY: exclusive access is the caller's promise, so the root and
    // every linked table stay allocated until freed here, each exactly once.
    let t = unsafe { root.get() };
    let level = t.meta().level;
    if level > 0 {
        for i in 0..ENTRIES_PER_TABLE {
            let e = t.entry(i).load(Ordering::Relaxed);
            if entry::is_present(e) && !(level == 1 && entry::is_large(e)) {
                // SAFETY: a linked child, freed once, nobody else accesses it.
                unsafe { free_tree(TablePtr::from_entry(e)) };
            }
        }
    }
    // SAFETY: as above.
    unsafe { root.free() };
}
