//! Where table pages live: 2 MiB slabs of private anonymous memory, carved
//! into exact 4 KiB pages.
//!
//! `std::alloc` with 4096-byte alignment costs 8 KiB of resident memory per
//! 4 KiB table with glibc (its `memalign` leaves a touched gap before every
//! block; measured: 8200 bytes of RSS per table), which would make "table
//! bytes" a lie by a factor of two. The arena hands out exact pages instead:
//!
//! ```text
//! slab (2 MiB, 2 MiB-aligned, MADV_NOHUGEPAGE)
//! [ Meta x 512 (header pages) | table page | table page | ... | table page ]
//!   slot i holds the metadata of page i
//! ```
//!
//! A page's metadata is found from its address alone (slab base by masking,
//! slot by page index). A freed page is released with `MADV_DONTNEED`, so its
//! memory goes back to the host at once and it reads back as zero when it is
//! handed out again; only the last [`CACHE_PAGES`] freed pages are kept
//! resident instead (zeroed on reuse), so that a populate/discard churn does
//! not pay a system call and a page fault per table. Slabs are never
//! unmapped (address space only: their pages are resident only while used).

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::node::Meta;
use crate::sys::{Advice, Mapping};

const PAGE: usize = 4096;
const SLAB_BYTES: usize = 2 << 20;
const SLAB_PAGES: usize = SLAB_BYTES / PAGE;
/// Freed pages kept resident for quick reuse (at most 256 KiB).
pub const CACHE_PAGES: usize = 64;
/// Pages at the start of every slab that hold the metadata slots.
const HEADER_PAGES: usize = (SLAB_PAGES * size_of::<Meta>()).div_ceil(PAGE);

struct Inner {
    /// Every slab ever mapped, by base address. Slabs stay mapped for the
    /// life of the process, so they are leaked to `'static`.
    slabs: BTreeMap<usize, &'static Mapping>,
    /// The slab pages are being carved from, and the next unused index.
    current: Option<&'static Mapping>,
    carve: usize,
    /// Released pages, ready for reuse (addresses); they read as zero.
    free: Vec<usize>,
    /// Freed but still resident pages (at most CACHE_PAGES); zeroed on reuse.
    cached: Vec<usize>,
}

/// The process-wide table page arena.
pub(crate) struct Arena {
    inner: Mutex<Inner>,
    /// Pages currently handed out.
    live: AtomicU64,
    /// Slabs mapped.
    slabs: AtomicU64,
}

static ARENA: Arena = Arena {
    inner: Mutex::new(Inner {
        slabs: BTreeMap::new(),
        current: None,
        carve: SLAB_PAGES,
        free: Vec::new(),
        cached: Vec::new(),
    }),
    live: AtomicU64::new(0),
    slabs: AtomicU64::new(0),
};

/// Arena occupancy, process-wide (all `Tables` share the arena).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaStats {
    /// Table pages handed out and not yet released.
    pub live_pages: u64,
    /// Freed pages kept resident for reuse (at most [`CACHE_PAGES`]).
    pub cached_pages: u64,
    /// 2 MiB slabs mapped (address space; only live and cached pages and
    /// the metadata header pages are resident).
    pub slabs: u64,
}

/// Current arena occupancy.
pub fn arena_stats() -> ArenaStats {
    let cached = ARENA
        .inner
        .lock()
        .map(|i| i.cached.len())
        .unwrap_or_else(|e| e.into_inner().cached.len());
    ArenaStats {
        live_pages: ARENA.live.load(Ordering::Relaxed),
        cached_pages: cached as u64,
        slabs: ARENA.slabs.load(Ordering::Relaxed),
    }
}

/// Hands out a zeroed, 4096-aligned page. `None` if a new slab could not be
/// mapped. Called without any table lock held.
pub(crate) fn alloc_page() -> Option<NonNull<u8>> {
    let mut inner = ARENA.inner.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(addr) = inner.cached.pop() {
        drop(inner);
        ARENA.live.fetch_add(1, Ordering::Relaxed);
        let page = NonNull::new(addr as *mut u8)?;
        // SAFETY: a cached page is owned by the arena alone until handed out
        // here; it is PAGE bytes inside a live slab.
        unsafe { page.as_ptr().write_bytes(0, PAGE) };
        return Some(page);
    }
    let addr = match inner.free.pop() {
        Some(addr) => addr,
        None => {
            if inner.carve == SLAB_PAGES {
                let slab = match Mapping::anonymous(SLAB_BYTES as u64, SLAB_BYTES as u64) {
                    Ok(m) => m,
                    Err(e) => {
                        log::error!("cannot map a table slab: {e}");
                        return None;
                    }
                };
                if let Err(e) = slab.madvise(0, SLAB_BYTES as u64, Advice::NoHugePage) {
                    // Only costs memory if THP is set to "always".
                    log::warn!("table slab: {e}");
                }
                let slab: &'static Mapping = Box::leak(Box::new(slab));
                inner.slabs.insert(slab.as_ptr() as usize, slab);
                inner.current = Some(slab);
                inner.carve = HEADER_PAGES;
                ARENA.slabs.fetch_add(1, Ordering::Relaxed);
            }
            let base = inner.current.map(|s| s.as_ptr() as usize)?;
            let addr = base + inner.carve * PAGE;
            inner.carve += 1;
            addr
        }
    };
    drop(inner);
    ARENA.live.fetch_add(1, Ordering::Relaxed);
    NonNull::new(addr as *mut u8)
}

/// Takes a page back: keeps it resident for reuse if the cache has room,
/// otherwise releases it to the host and keeps its address for reuse.
///
/// # Safety
/// `page` came from [`alloc_page`], is not referenced by anyone any more,
/// and is not released twice.
pub(crate) unsafe fn free_page(page: NonNull<u8>) {
    let addr = page.as_ptr() as usize;
    let slab = {
        let mut inner = ARENA.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.cached.len() < CACHE_PAGES {
            inner.cached.push(addr);
            drop(inner);
            ARENA.live.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        inner.slabs.get(&(addr & !(SLAB_BYTES - 1))).copied()
    };
    // The system call runs without the arena lock.
    let released =
        slab.map(|s| s.madvise((addr % SLAB_BYTES) as u64, PAGE as u64, Advice::DontNeed));
    match released {
        Some(Ok(())) => {}
        other => {
            // The page stays resident; zero it so it can be handed out again.
            log::warn!("table page {addr:#x} not released: {other:?}");
            // SAFETY: the caller owns the page exclusively; it is PAGE bytes
            // inside a live slab.
            unsafe { page.as_ptr().write_bytes(0, PAGE) };
        }
    }
    let mut inner = ARENA.inner.lock().unwrap_or_else(|e| e.into_inner());
    inner.free.push(addr);
    drop(inner);
    ARENA.live.fetch_sub(1, Ordering::Relaxed);
}

/// The metadata slot of a table page.
#[inline]
pub(crate) fn meta_slot(page: NonNull<u8>) -> *mut Meta {
    let addr = page.as_ptr() as usize;
    let base = addr & !(SLAB_BYTES - 1);
    let index = (addr - base) / PAGE;
    (base + index * size_of::<Meta>()) as *mut Meta
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fits_and_pages_are_exact() {
        const {
            assert!(HEADER_PAGES * PAGE >= SLAB_PAGES * size_of::<Meta>());
            assert!(HEADER_PAGES <= 4, "metadata stays under 1% of a slab");
        }
        let a = alloc_page().unwrap();
        let b = alloc_page().unwrap();
        assert_eq!(a.as_ptr() as usize % PAGE, 0);
        assert_ne!(a, b);
        let slot = meta_slot(a) as usize;
        assert!(slot < (a.as_ptr() as usize & !(SLAB_BYTES - 1)) + HEADER_PAGES * PAGE);
        // SAFETY: both pages are ours and unreferenced.
        unsafe {
            a.as_ptr().write_bytes(0xff, PAGE);
            free_page(a);
            free_page(b);
        }
    }
}
