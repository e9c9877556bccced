//! EPT-style second-level tables with synchronous reclaim of empty tables.
//!
//! Four levels (PML4, PDPT, PD, PT) of 512-entry tables map guest-physical
//! pages to offsets in a host backing. [`Tables::populate`] installs leaves,
//! [`Tables::lookup`] walks without locks, and [`Tables::discard`] clears
//! leaves and, depending on the [`Strategy`], frees every table that became
//! empty before it returns. See `docs/DESIGN-guest-mm.md` for the protocol.
//!
//! Module map: `node` (one table: page + side metadata), `arena` (exact
//! 4 KiB table pages in 2 MiB slabs), `sync` (primitives,
//! loom-switchable), `populate` (walk, install, lookup), `reclaim` (discard,
//! fast/slow free path, sweep, split, lazy marking), `audit` (recount and
//! invariant checks), `stats` (counters and the minimum footprint).

#[cfg(not(loom))]
mod arena;
mod audit;
mod node;
mod populate;
mod reclaim;
mod stats;
mod sync;
#[cfg(all(test, not(loom)))]
mod tests;

use thiserror::Error;

use crate::entry;
use crate::range::{BLOCK_SIZE, GPA_BITS, GpaRange, LEVEL_BITS, PAGE_SIZE, RangeError};
use node::TablePtr;
use stats::Counters;
use sync::Guard;

#[cfg(not(loom))]
pub use arena::{ArenaStats, CACHE_PAGES, arena_stats};
pub use stats::{TABLE_BYTES, TableStats, min_table_bytes};

/// Number of table levels.
pub const LEVELS: usize = 4;
/// Level of the root table.
const ROOT_LEVEL: u8 = 3;

/// When empty tables are freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Never free tables on discard (what KVM's TDP MMU does); only an
    /// explicit [`Tables::reclaim`] sweep frees them.
    Off,
    /// After clearing leaves, rescan the table's 512 entries to decide
    /// whether it is empty.
    Scan,
    /// Keep a count of present entries in every table, updated on every
    /// install and clear; a table is empty when its count is zero.
    Count,
}

/// The size of a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageSize {
    /// A 4 KiB leaf in a PT table.
    Size4K,
    /// A 2 MiB leaf in a PD table.
    Size2M,
}

impl PageSize {
    /// Bytes mapped by one leaf of this size.
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_SIZE,
            PageSize::Size2M => BLOCK_SIZE,
        }
    }

    fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 0,
            PageSize::Size2M => 1,
        }
    }
}

/// A present mapping as seen by a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Leaf {
    /// Host offset of the 4 KiB page containing the looked-up address (for a
    /// 2 MiB leaf: the leaf's offset plus the page's offset inside it).
    pub host_offset: u64,
    /// Size of the leaf that maps the address.
    pub size: PageSize,
    /// The host page was released lazily and may have been reclaimed.
    pub lazy: bool,
}

impl Leaf {
    fn decode(e: u64, gpa: u64) -> Leaf {
        if entry::is_large(e) {
            Leaf {
                host_offset: entry::addr(e) + (gpa & (BLOCK_SIZE - 1) & !(PAGE_SIZE - 1)),
                size: PageSize::Size2M,
                lazy: entry::is_lazy(e),
            }
        } else {
            Leaf {
                host_offset: entry::addr(e),
                size: PageSize::Size4K,
                lazy: entry::is_lazy(e),
            }
        }
    }
}

/// The outcome of [`Tables::populate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Populate {
    /// The leaf was installed.
    Installed,
    /// A leaf already maps the address; it was left unchanged.
    Present(Leaf),
}

/// The outcome of [`Tables::discard`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discard {
    /// Coalesced guest-physical runs whose leaves were cleared, ascending.
    pub cleared: Vec<GpaRange>,
    /// 2 MiB-aligned blocks in which nothing is mapped any more because
    /// their PT table was freed or their 2 MiB leaf cleared, ascending. The
    /// host may release each block whole.
    pub emptied_blocks: Vec<GpaRange>,
    /// 4 KiB pages whose mapping was cleared.
    pub pages_cleared: u64,
    /// Tables freed, per level (index 0 = PT .. 3 = PML4, always 0).
    pub tables_freed: [u64; LEVELS],
}

/// The outcome of [`Tables::reclaim`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reclaim {
    /// 2 MiB-aligned blocks whose PT table was freed, ascending.
    pub emptied_blocks: Vec<GpaRange>,
    /// Tables freed, per level (index 0 = PT .. 3 = PML4, always 0).
    pub tables_freed: [u64; LEVELS],
}

/// Why a table operation was refused. A refused operation changes nothing.
#[derive(Debug, Error)]
pub enum TableError {
    /// The range failed validation.
    #[error("invalid guest-physical range")]
    Range(#[from] RangeError),
    /// The address is outside the guest-physical address space.
    #[error("guest-physical address {gpa:#x} is outside the {GPA_BITS}-bit space")]
    OutOfSpace {
        /// The offending address.
        gpa: u64,
    },
    /// The address is not aligned to the leaf size.
    #[error("guest-physical address {gpa:#x} is not aligned to a {size:?} leaf")]
    UnalignedGpa {
        /// The offending address.
        gpa: u64,
        /// The requested leaf size.
        size: PageSize,
    },
    /// The host offset is not aligned to the leaf size.
    #[error("host offset {offset:#x} is not aligned to a {size:?} leaf")]
    UnalignedHostOffset {
        /// The offending offset.
        offset: u64,
        /// The requested leaf size.
        size: PageSize,
    },
    /// The host offset does not fit in the entry's address field.
    #[error("host offset {offset:#x} does not fit in the 52-bit address field")]
    HostOffsetTooLarge {
        /// The offending offset.
        offset: u64,
    },
    /// A 2 MiB leaf was requested where a PT table of 4 KiB mappings exists.
    #[error("2 MiB block at {gpa:#x} is already mapped with 4 KiB pages")]
    Occupied {
        /// The block's address.
        gpa: u64,
    },
    /// A table could not be allocated.
    #[error("out of memory allocating a level-{level} table")]
    OutOfMemory {
        /// Level of the table (0 = PT).
        level: u8,
    },
    /// An audit found the tree inconsistent with its counters or metadata.
    #[error("table audit failed at level {level}, gpa {gpa:#x}: {what}")]
    Corrupt {
        /// Level of the table at fault.
        level: u8,
        /// First address the table maps.
        gpa: u64,
        /// What was wrong.
        what: &'static str,
    },
}

/// The second-level tables of one guest. `Send + Sync`; every method takes
/// `&self` and may run concurrently with any other.
pub struct Tables {
    root: TablePtr,
    strategy: Strategy,
    counters: Counters,
    /// Under loom, retired tables are kept until drop (see `retire`).
    #[cfg(loom)]
    graveyard: std::sync::Mutex<Vec<TablePtr>>,
}

// SAFETY: the tree is only reached through `&self` methods that use atomics,
// per-table locks and epoch guards; no state is tied to a thread.
unsafe impl Send for Tables {}
// SAFETY: as above; concurrent `&self` calls are the intended use.
unsafe impl Sync for Tables {}

/// Shift of the address bits that index a table at `level`.
#[inline]
pub(crate) fn shift(level: u8) -> u32 {
    12 + LEVEL_BITS * level as u32
}

/// Index into a table at `level` for `gpa`.
#[inline]
pub(crate) fn index(gpa: u64, level: u8) -> usize {
    ((gpa >> shift(level)) as usize) & (crate::range::ENTRIES_PER_TABLE - 1)
}

/// Bytes mapped by one whole table at `level`.
#[inline]
pub(crate) fn table_span(level: u8) -> u64 {
    1u64 << (shift(level) + LEVEL_BITS)
}

impl Tables {
    /// Creates an empty tree (just the root) using `strategy`.
    pub fn new(strategy: Strategy) -> Self {
        let Some(root) = TablePtr::alloc(ROOT_LEVEL, 0, None) else {
            // One page at start-up: nothing sensible can continue without it.
            std::alloc::handle_alloc_error(std::alloc::Layout::new::<[u64; 512]>());
        };
        let counters = Counters::new();
        counters.tables[ROOT_LEVEL as usize].store(1, sync::Ordering::Relaxed);
        Self {
            root,
            strategy,
            counters,
            #[cfg(loom)]
            graveyard: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The strategy this tree was built with.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The current counters. Cheap: a handful of relaxed loads.
    pub fn stats(&self) -> TableStats {
        self.counters.snapshot()
    }

    /// Hands a table that was just unlinked to the epoch collector: it is
    /// freed once every thread that could still be walking it has unpinned.
    fn retire(&self, guard: &Guard, table: TablePtr) {
        #[cfg(not(loom))]
        // SAFETY: `table` was unlinked from its parent and marked dead under
        // both locks, so no new reference to it can be created; threads that
        // read the old entry did so while pinned, and the closure runs only
        // after all of them have unpinned. Nothing else frees it.
        unsafe {
            guard.defer_unchecked(move || table.free());
        }
        #[cfg(loom)]
        {
            let _ = guard;
            self.graveyard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(table);
        }
    }

    /// Under loom: the retired tables that still hold a present entry
    /// (must be zero: nothing may be written into a table being freed).
    #[cfg(loom)]
    pub fn graveyard_leaks(&self) -> usize {
        let g = self.graveyard.lock().unwrap_or_else(|e| e.into_inner());
        g.iter()
            // SAFETY: parked tables are only freed in Drop.
            .filter(|t| unsafe { t.get() }.present() != 0)
            .count()
    }
}

impl Drop for Tables {
    fn drop(&mut self) {
        // SAFETY: `&mut self` means no other thread is using the tree; every
        // linked table is reachable exactly once from the root.
        unsafe { audit::free_tree(self.root) };
        #[cfg(loom)]
        for t in self
            .graveyard
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            // SAFETY: parked tables are unlinked and no thread is left.
            unsafe { t.free() };
        }
    }
}

impl std::fmt::Debug for Tables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tables")
            .field("strategy", &self.strategy)
            .field("stats", &self.stats())
            .finish()
    }
}
