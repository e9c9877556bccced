//! One table: a 4 KiB-aligned page of exactly 512 atomic entries, plus a
//! small side structure (lock, dead marker, live count, level, parent link)
//! that never counts as table bytes.
//!
//! Pages come from the slab arena (`arena.rs`), which keeps each page's
//! metadata in a slot at the head of its slab. Under `cfg(loom)` a table is
//! one `std::alloc` block instead, page first and metadata right after it
//! (loom needs its atomics constructed and dropped, and the model never
//! frees early). Either way the parent entry holds the page address, and
//! the metadata is found from that address alone.

#[cfg(loom)]
use std::alloc::{Layout, alloc, dealloc};
use std::marker::PhantomData;
use std::ptr::NonNull;

use super::sync::{AtomicBool, AtomicU32, AtomicU64, Ordering, SpinLock};
use crate::entry;
use crate::range::ENTRIES_PER_TABLE;

/// Bytes of one table page: exactly the entries.
pub const TABLE_BYTES: u64 = 4096;

#[cfg(any(loom, test))]
type Page = [AtomicU64; ENTRIES_PER_TABLE];

/// Side metadata of one table.
pub(crate) struct Meta {
    /// Serializes every change to this table's entries except the lazy-bit
    /// update of an already present leaf.
    pub(crate) lock: SpinLock,
    /// Set, under this table's lock and its parent's, in the same critical
    /// section that clears the parent entry. A dead table is never written.
    pub(crate) dead: AtomicBool,
    /// Present entries (maintained under the lock by the Count strategy only).
    pub(crate) count: AtomicU32,
    /// 0 = PT, 1 = PD, 2 = PDPT, 3 = PML4.
    pub(crate) level: u8,
    /// Index of this table's entry in its parent.
    pub(crate) index: u16,
    /// The parent table, `None` for the root.
    pub(crate) parent: Option<TablePtr>,
}

impl Meta {
    /// Adds `n` to the live count. The caller holds `lock`, the only
    /// writer, so a plain load and store suffice (no locked instruction on
    /// the fault path).
    #[inline]
    pub(crate) fn count_add(&self, n: u32) {
        debug_assert!(self.lock.is_held());
        let c = self.count.load(Ordering::Relaxed);
        self.count.store(c.wrapping_add(n), Ordering::Relaxed);
    }

    /// Subtracts `n` from the live count; the caller holds `lock`.
    #[inline]
    pub(crate) fn count_sub(&self, n: u32) {
        debug_assert!(self.lock.is_held());
        let c = self.count.load(Ordering::Relaxed);
        debug_assert!(c >= n, "live count underflow");
        self.count.store(c.wrapping_sub(n), Ordering::Relaxed);
    }
}

#[cfg(loom)]
const META_OFFSET: usize = {
    let page = size_of::<Page>();
    let align = align_of::<Meta>();
    page.div_ceil(align) * align
};

#[cfg(loom)]
fn layout() -> Layout {
    match Layout::from_size_align(META_OFFSET + size_of::<Meta>(), TABLE_BYTES as usize) {
        Ok(l) => l,
        Err(_) => unreachable!("constant layout is valid"),
    }
}

/// The address of a live table allocation. Copyable; it does not own the
/// table. Dereferencing it goes through [`TablePtr::get`], whose caller
/// promises the table is still allocated.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct TablePtr(NonNull<u8>);

// SAFETY: a TablePtr is an address; all access to the table behind it is
// through atomics and the per-table lock, and its lifetime is governed by the
// tree plus epoch deferral, not by which thread holds the pointer.
unsafe impl Send for TablePtr {}
// SAFETY: as above, sharing the address shares nothing non-atomic.
unsafe impl Sync for TablePtr {}

/// A table that is known to stay allocated for `'a` (the owning `Tables`
/// borrow, or an epoch guard).
#[derive(Clone, Copy)]
pub(crate) struct TableRef<'a> {
    ptr: TablePtr,
    _life: PhantomData<&'a Meta>,
}

impl TablePtr {
    /// Allocates a zeroed table. `None` if the allocator fails or returns an
    /// address the entry format cannot hold.
    pub(crate) fn alloc(level: u8, index: u16, parent: Option<TablePtr>) -> Option<TablePtr> {
        let meta = Meta {
            lock: SpinLock::new(),
            dead: AtomicBool::new(false),
            count: AtomicU32::new(0),
            level,
            index,
            parent,
        };
        #[cfg(not(loom))]
        let base = {
            let base = super::arena::alloc_page()?;
            // SAFETY: the slot belongs to this page, which nobody else holds;
            // Meta has no destructor with effects, so overwriting a previous
            // occupant's metadata needs no drop.
            unsafe { super::arena::meta_slot(base).write(meta) };
            base
        };
        #[cfg(loom)]
        let base = {
            let layout = layout();
            // SAFETY: the layout has non-zero size.
            let base = NonNull::new(unsafe { alloc(layout) })?;
            let page = base.as_ptr().cast::<AtomicU64>();
            for i in 0..ENTRIES_PER_TABLE {
                // SAFETY: `i` is inside the page part of the fresh
                // allocation, which is aligned for AtomicU64.
                unsafe { page.add(i).write(AtomicU64::new(0)) };
            }
            // SAFETY: META_OFFSET is inside the allocation and aligned for
            // Meta; the memory is not yet shared.
            unsafe { base.as_ptr().add(META_OFFSET).cast::<Meta>().write(meta) };
            base
        };
        if (base.as_ptr() as u64) & !entry::ADDR_MASK != 0 {
            // Cannot happen for user-space addresses; refuse rather than
            // build an entry that points elsewhere.
            // SAFETY: just allocated, never shared.
            unsafe { TablePtr(base).free() };
            return None;
        }
        Some(TablePtr(base))
    }

    /// Frees the table.
    ///
    /// # Safety
    /// The table must have been allocated by [`TablePtr::alloc`], be
    /// unreachable from the tree, and no thread may still hold a reference
    /// to it (the epoch guarantees this for retired tables).
    pub(crate) unsafe fn free(self) {
        #[cfg(not(loom))]
        // SAFETY: forwarded from the caller: the page came from the arena and
        // is referenced by nobody.
        unsafe {
            super::arena::free_page(self.0)
        };
        #[cfg(loom)]
        {
            let base = self.0.as_ptr();
            let page = base.cast::<AtomicU64>();
            for i in 0..ENTRIES_PER_TABLE {
                // SAFETY: initialized in `alloc`, dropped exactly once here.
                unsafe { std::ptr::drop_in_place(page.add(i)) };
            }
            // SAFETY: the caller guarantees exclusive access to a table built
            // by `alloc`, whose Meta was written at META_OFFSET.
            unsafe {
                std::ptr::drop_in_place(base.add(META_OFFSET).cast::<Meta>());
                dealloc(base, layout());
            }
        }
    }

    /// Recovers the table from a non-leaf entry.
    ///
    /// # Safety
    /// `e` must be a non-leaf entry (built with [`entry::table`] from a
    /// `TablePtr`).
    #[inline]
    pub(crate) unsafe fn from_entry(e: u64) -> TablePtr {
        let addr = entry::addr(e) as usize as *mut u8;
        // SAFETY: non-leaf entries hold the non-null address of a table.
        TablePtr(unsafe { NonNull::new_unchecked(addr) })
    }

    /// The non-leaf entry pointing at this table.
    #[inline]
    pub(crate) fn to_entry(self) -> u64 {
        entry::table(self.0.as_ptr() as u64)
    }

    /// Borrows the table for `'a`.
    ///
    /// # Safety
    /// The table must stay allocated for `'a`: either it is the root (owned
    /// by the `Tables` borrowed for `'a`), or it was reached through the tree
    /// while an epoch guard living for `'a` was held.
    #[inline]
    pub(crate) unsafe fn get<'a>(self) -> TableRef<'a> {
        TableRef {
            ptr: self,
            _life: PhantomData,
        }
    }
}

impl<'a> TableRef<'a> {
    /// The pointer behind this reference.
    #[inline]
    pub(crate) fn ptr(&self) -> TablePtr {
        self.ptr
    }

    /// Entry `i` (masked to the table size).
    #[inline]
    pub(crate) fn entry(&self, i: usize) -> &'a AtomicU64 {
        let i = i & (ENTRIES_PER_TABLE - 1);
        // SAFETY: `i` is in bounds, and the page stays allocated for 'a (the
        // contract of `TablePtr::get`).
        unsafe { &*self.ptr.0.as_ptr().cast::<AtomicU64>().add(i) }
    }

    /// The side metadata.
    #[inline]
    pub(crate) fn meta(&self) -> &'a Meta {
        #[cfg(not(loom))]
        let meta = super::arena::meta_slot(self.ptr.0);
        #[cfg(loom)]
        // SAFETY: META_OFFSET lies inside the table's allocation.
        let meta = unsafe { self.ptr.0.as_ptr().add(META_OFFSET).cast::<Meta>() };
        // SAFETY: `alloc` wrote this table's Meta into that slot, and the
        // table (hence its slot) stays allocated for 'a.
        unsafe { &*meta }
    }

    /// The child table behind a non-leaf entry read from this table.
    ///
    /// # Safety
    /// `e` must be a non-leaf entry read from this table while the epoch
    /// guard backing `'a` was held.
    #[inline]
    pub(crate) unsafe fn child(&self, e: u64) -> TableRef<'a> {
        // SAFETY: forwarded from the caller.
        unsafe { TablePtr::from_entry(e).get() }
    }

    /// Whether every entry is empty (a full 512-entry scan that stops at
    /// the first present entry).
    #[inline]
    pub(crate) fn scan_empty(&self) -> bool {
        (0..ENTRIES_PER_TABLE).all(|i| !entry::is_present(self.entry(i).load(Ordering::Relaxed)))
    }

    /// Number of present entries (full scan).
    pub(crate) fn present(&self) -> u32 {
        (0..ENTRIES_PER_TABLE)
            .filter(|&i| entry::is_present(self.entry(i).load(Ordering::Relaxed)))
            .count() as u32
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn table_page_is_one_aligned_page() {
        assert_eq!(size_of::<Page>() as u64, TABLE_BYTES);
        assert!(size_of::<Meta>() <= 32);
        let t = TablePtr::alloc(0, 0, None).unwrap();
        // SAFETY: freshly allocated, owned here.
        let r = unsafe { t.get() };
        assert_eq!(t.0.as_ptr() as u64 % TABLE_BYTES, 0);
        assert!(r.scan_empty());
        assert!(!r.meta().lock.is_held());
        // SAFETY: unshared and unreachable.
        unsafe { t.free() };
    }
}
