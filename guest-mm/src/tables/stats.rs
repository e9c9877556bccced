//! Table statistics: cheap atomic counters, read by `Tables::stats`, and the
//! minimum table footprint a set of leaves needs.

use std::collections::BTreeSet;

use super::sync::{AtomicU64, Ordering};
use super::{LEVELS, PageSize};
use crate::range::{BLOCK_SIZE, LEVEL_BITS};

pub use super::node::TABLE_BYTES;

/// A snapshot of the table counters.
///
/// Gauges (`tables`, `table_bytes`, `leaves_4k`, `leaves_2m`) describe the
/// tree now; the rest count events since the `Tables` was created. When no
/// operation is running, `Tables::stats()` equals `Tables::recount()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableStats {
    /// Linked tables per level: index 0 = PT, 1 = PD, 2 = PDPT, 3 = PML4.
    pub tables: [u64; LEVELS],
    /// Bytes of linked table pages (4096 per table): the second-level
    /// analogue of `VmPTE`.
    pub table_bytes: u64,
    /// Present 4 KiB leaves.
    pub leaves_4k: u64,
    /// Present 2 MiB leaves.
    pub leaves_2m: u64,
    /// Leaves installed by `populate`.
    pub populates: u64,
    /// Calls to `discard`.
    pub discards: u64,
    /// 4 KiB pages whose mapping a discard cleared (a 2 MiB leaf counts 512).
    pub pages_cleared: u64,
    /// Tables freed by the fast path (child locked, parent try-locked).
    pub freed_fast: u64,
    /// Tables freed by the slow path (parent then child locked, rescan).
    pub freed_slow: u64,
    /// Tables freed by the explicit `reclaim` sweep.
    pub freed_sweep: u64,
    /// 2 MiB leaves split into a PT table by a partial discard or mark.
    pub splits: u64,
    /// Full PT tables replaced by one 2 MiB leaf (`Tables::promote`).
    pub promotions: u64,
}

const STRIPES: usize = 8;

#[repr(align(128))]
struct Padded(AtomicU64);

/// A counter split over cache lines so that fault-handling threads do not
/// contend on one line. Values are summed with wrapping arithmetic, so a
/// gauge may be raised on one stripe and lowered on another.
pub(crate) struct Striped {
    cells: [Padded; STRIPES],
}

#[cfg(not(loom))]
fn stripe() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        let mut v = s.get();
        if v == usize::MAX {
            v = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % STRIPES;
            s.set(v);
        }
        v
    })
}

#[cfg(loom)]
fn stripe() -> usize {
    0
}

impl Striped {
    pub(crate) fn new() -> Self {
        Self {
            cells: std::array::from_fn(|_| Padded(AtomicU64::new(0))),
        }
    }

    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.cells[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn sub(&self, n: u64) {
        self.cells[stripe()].0.fetch_sub(n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.cells
            .iter()
            .fold(0u64, |acc, c| acc.wrapping_add(c.0.load(Ordering::Relaxed)))
    }
}

/// The live counters behind [`TableStats`].
pub(crate) struct Counters {
    pub(crate) tables: [AtomicU64; LEVELS],
    pub(crate) leaves_4k: Striped,
    pub(crate) leaves_2m: AtomicU64,
    pub(crate) populates: Striped,
    pub(crate) discards: AtomicU64,
    pub(crate) pages_cleared: AtomicU64,
    pub(crate) freed_fast: AtomicU64,
    pub(crate) freed_slow: AtomicU64,
    pub(crate) freed_sweep: AtomicU64,
    pub(crate) splits: AtomicU64,
    pub(crate) promotions: AtomicU64,
}

impl Counters {
    pub(crate) fn new() -> Self {
        Self {
            tables: std::array::from_fn(|_| AtomicU64::new(0)),
            leaves_4k: Striped::new(),
            leaves_2m: AtomicU64::new(0),
            populates: Striped::new(),
            discards: AtomicU64::new(0),
            pages_cleared: AtomicU64::new(0),
            freed_fast: AtomicU64::new(0),
            freed_slow: AtomicU64::new(0),
            freed_sweep: AtomicU64::new(0),
            splits: AtomicU64::new(0),
            promotions: AtomicU64::new(0),
        }
    }

    pub(crate) fn snapshot(&self) -> TableStats {
        let tables: [u64; LEVELS] = std::array::from_fn(|i| self.tables[i].load(Ordering::Relaxed));
        TableStats {
            tables,
            table_bytes: tables.iter().sum::<u64>() * TABLE_BYTES,
            leaves_4k: self.leaves_4k.get(),
            leaves_2m: self.leaves_2m.load(Ordering::Relaxed),
            populates: self.populates.get(),
            discards: self.discards.load(Ordering::Relaxed),
            pages_cleared: self.pages_cleared.load(Ordering::Relaxed),
            freed_fast: self.freed_fast.load(Ordering::Relaxed),
            freed_slow: self.freed_slow.load(Ordering::Relaxed),
            freed_sweep: self.freed_sweep.load(Ordering::Relaxed),
            splits: self.splits.load(Ordering::Relaxed),
            promotions: self.promotions.load(Ordering::Relaxed),
        }
    }
}

/// The fewest table bytes that can map a set of leaves: one PT per 2 MiB
/// block holding a 4 KiB leaf, one PD per 1 GiB region, one PDPT per
/// 512 GiB region holding any leaf, plus the root.
///
/// `leaves` yields `(gpa, size)` for every present leaf (any address inside
/// the leaf will do).
pub fn min_table_bytes(leaves: impl IntoIterator<Item = (u64, PageSize)>) -> u64 {
    let mut pts = BTreeSet::new();
    let mut pds = BTreeSet::new();
    let mut pdpts = BTreeSet::new();
    for (gpa, size) in leaves {
        if size == PageSize::Size4K {
            pts.insert(gpa / BLOCK_SIZE);
        }
        pds.insert(gpa / (BLOCK_SIZE << LEVEL_BITS));
        pdpts.insert(gpa / (BLOCK_SIZE << (2 * LEVEL_BITS)));
    }
    (pts.len() + pds.len() + pdpts.len() + 1) as u64 * TABLE_BYTES
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn min_bytes_counts_distinct_tables() {
        assert_eq!(min_table_bytes([]), TABLE_BYTES);
        let one = [(0, PageSize::Size4K), (4096, PageSize::Size4K)];
        assert_eq!(min_table_bytes(one), 4 * TABLE_BYTES);
        let two_m = [(0, PageSize::Size2M)];
        assert_eq!(min_table_bytes(two_m), 3 * TABLE_BYTES);
        let far = [(0, PageSize::Size4K), (1 << 40, PageSize::Size4K)];
        assert_eq!(min_table_bytes(far), 7 * TABLE_BYTES);
    }

    #[test]
    fn striped_sums_across_threads() {
        let c = Striped::new();
        std::thread::scope(|s| {
            s.spawn(|| c.add(5));
            s.spawn(|| c.sub(2));
        });
        assert_eq!(c.get(), 3);
    }
}
