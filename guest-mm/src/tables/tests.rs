//! White-box tests of the reclaim protocol that need the per-table locks.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::sync::pin;
use super::{Strategy, Tables, index};
use crate::range::{BLOCK_SIZE, GpaRange, PAGE_SIZE};
use crate::tables::PageSize;

/// Runs `f` while another thread holds the lock of the PD table mapping
/// `gpa`, released after a short delay.
fn with_pd_locked_for_a_while(t: &Tables, gpa: u64, f: impl FnOnce() + Send) {
    let guard = pin();
    let root = t.root_ref(&guard);
    let e3 = root.entry(index(gpa, 3)).load(Ordering::Acquire);
    // SAFETY: present entries at the root point at tables; pinned.
    let pdpt = unsafe { root.child(e3) };
    let e2 = pdpt.entry(index(gpa, 2)).load(Ordering::Acquire);
    // SAFETY: as above.
    let pd = unsafe { pdpt.child(e2) };
    pd.meta().lock.lock();
    std::thread::scope(|s| {
        let h = s.spawn(f);
        std::thread::sleep(Duration::from_millis(50));
        pd.meta().lock.unlock();
        h.join().unwrap();
    });
}

#[test]
fn contended_parent_takes_the_slow_path() {
    for strategy in [Strategy::Scan, Strategy::Count] {
        let t = Tables::new(strategy);
        t.populate(0, 0, PageSize::Size4K).unwrap();
        t.populate(BLOCK_SIZE, 0, PageSize::Size4K).unwrap();
        with_pd_locked_for_a_while(&t, 0, || {
            let d = t.discard(GpaRange::new(0, PAGE_SIZE).unwrap()).unwrap();
            assert_eq!(d.tables_freed, [1, 0, 0, 0]);
        });
        let st = t.stats();
        assert_eq!((st.freed_fast, st.freed_slow), (0, 1));
        assert_eq!(st, t.recount());
        t.audit().unwrap();
    }
}

#[test]
fn slow_path_rechecks_emptiness_after_relocking() {
    // While the discard waits for the PD lock, the holder repopulates the
    // PT it is about to free: the slow path's rescan must see the new leaf.
    let t = Tables::new(Strategy::Scan);
    t.populate(0, 0, PageSize::Size4K).unwrap();
    let guard = pin();
    let root = t.root_ref(&guard);
    let e3 = root.entry(0).load(Ordering::Acquire);
    // SAFETY: present root entry, pinned.
    let pdpt = unsafe { root.child(e3) };
    // SAFETY: present PDPT entry, pinned.
    let pd = unsafe { pdpt.child(pdpt.entry(0).load(Ordering::Acquire)) };
    // SAFETY: present PD entry (a PT), pinned.
    let pt = unsafe { pd.child(pd.entry(0).load(Ordering::Acquire)) };
    pd.meta().lock.lock();
    std::thread::scope(|s| {
        let h = s.spawn(|| t.discard(GpaRange::new(0, PAGE_SIZE).unwrap()).unwrap());
        // Wait until the discard has cleared the leaf and dropped the PT lock
        // on its way to the slow path.
        while pt.entry(0).load(Ordering::Acquire) != 0 || pt.meta().lock.is_held() {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(20));
        // Populate directly under the PT lock (the PD lock is held here, so
        // a normal populate would not block either: it only needs the PT).
        assert_eq!(
            t.populate(PAGE_SIZE, 0, PageSize::Size4K).unwrap(),
            super::Populate::Installed
        );
        pd.meta().lock.unlock();
        let d = h.join().unwrap();
        assert_eq!(d.tables_freed, [0; 4]);
    });
    assert!(t.lookup(PAGE_SIZE).is_some());
    assert_eq!(t.stats().freed_slow, 0);
    assert_eq!(t.stats(), t.recount());
    t.audit().unwrap();
}
