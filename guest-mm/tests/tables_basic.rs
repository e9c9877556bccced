//! Single-threaded behaviour of the second-level tables.
#![cfg(not(loom))]

use guest_mm::tables::TABLE_BYTES;
use guest_mm::{BLOCK_SIZE, GpaRange, Leaf, PAGE_SIZE, PageSize, Populate, Strategy, Tables};

const ALL: [Strategy; 3] = [Strategy::Off, Strategy::Scan, Strategy::Count];

fn range(start: u64, len: u64) -> GpaRange {
    GpaRange::new(start, len).expect("valid test range")
}

fn fill(t: &Tables, start: u64, pages: u64) {
    for p in 0..pages {
        let gpa = start + p * PAGE_SIZE;
        assert_eq!(
            t.populate(gpa, gpa + 0x1000_0000, PageSize::Size4K)
                .unwrap(),
            Populate::Installed
        );
    }
}

fn check(t: &Tables) {
    assert_eq!(t.stats(), t.recount());
    t.audit().expect("audit");
}

#[test]
fn populate_then_lookup() {
    for s in ALL {
        let t = Tables::new(s);
        assert_eq!(t.lookup(0), None);
        fill(&t, 0x4000_0000, 3);
        let leaf = t.lookup(0x4000_1000).unwrap();
        assert_eq!(
            leaf,
            Leaf {
                host_offset: 0x5000_1000,
                size: PageSize::Size4K,
                lazy: false
            }
        );
        assert_eq!(t.lookup(0x4000_3000), None);
        // Never overwritten.
        assert_eq!(
            t.populate(0x4000_1000, 0x9000, PageSize::Size4K).unwrap(),
            Populate::Present(leaf)
        );
        let st = t.stats();
        assert_eq!(st.tables, [1, 1, 1, 1]);
        assert_eq!(st.table_bytes, 4 * TABLE_BYTES);
        assert_eq!(st.leaves_4k, 3);
        assert_eq!(st.populates, 3);
        assert_eq!(t.min_table_bytes(), 4 * TABLE_BYTES);
        check(&t);
    }
}

#[test]
fn discard_frees_tables_per_strategy() {
    for s in ALL {
        let t = Tables::new(s);
        fill(&t, 0, 512);
        fill(&t, BLOCK_SIZE, 1);
        let d = t.discard(range(0, BLOCK_SIZE)).unwrap();
        assert_eq!(d.pages_cleared, 512);
        assert_eq!(d.cleared, vec![range(0, BLOCK_SIZE)]);
        match s {
            Strategy::Off => {
                assert_eq!(d.tables_freed, [0; 4]);
                assert!(d.emptied_blocks.is_empty());
                assert_eq!(t.stats().tables, [2, 1, 1, 1]);
            }
            _ => {
                assert_eq!(d.tables_freed, [1, 0, 0, 0]);
                assert_eq!(d.emptied_blocks, vec![range(0, BLOCK_SIZE)]);
                assert_eq!(t.stats().tables, [1, 1, 1, 1]);
                assert_eq!(t.stats().table_bytes, t.min_table_bytes());
            }
        }
        // Emptying the last PT frees PD and PDPT too (never the root).
        let d = t.discard(range(BLOCK_SIZE, PAGE_SIZE)).unwrap();
        assert_eq!(d.pages_cleared, 1);
        if s != Strategy::Off {
            assert_eq!(d.tables_freed, [1, 1, 1, 0]);
            assert_eq!(t.stats().tables, [0, 0, 0, 1]);
            assert_eq!(t.stats().freed_fast, 4);
        }
        check(&t);
        assert_eq!(t.lookup(0), None);
    }
}

#[test]
fn scattered_discards_free_the_table_on_the_last_page() {
    for s in [Strategy::Scan, Strategy::Count] {
        let t = Tables::new(s);
        fill(&t, 0, 512);
        for p in (0..512u64).rev() {
            let d = t.discard(range(p * PAGE_SIZE, PAGE_SIZE)).unwrap();
            assert_eq!(d.pages_cleared, 1);
            if p == 0 {
                assert_eq!(d.emptied_blocks, vec![range(0, BLOCK_SIZE)]);
                assert_eq!(d.tables_freed, [1, 1, 1, 0]);
            } else {
                assert!(d.emptied_blocks.is_empty());
            }
        }
        check(&t);
        assert_eq!(t.stats().table_bytes, TABLE_BYTES);
    }
}

#[test]
fn off_keeps_tables_until_reclaim() {
    let t = Tables::new(Strategy::Off);
    fill(&t, 0, 4);
    fill(&t, 5 * BLOCK_SIZE, 4);
    t.discard(range(0, 8 * BLOCK_SIZE)).unwrap();
    assert_eq!(t.stats().tables, [2, 1, 1, 1]);
    assert_eq!(t.empty_tables(range(0, 8 * BLOCK_SIZE)), 2);
    let r = t.reclaim(range(0, 1 << 40)).unwrap();
    assert_eq!(r.tables_freed, [2, 1, 1, 0]);
    assert_eq!(
        r.emptied_blocks,
        vec![range(0, BLOCK_SIZE), range(5 * BLOCK_SIZE, BLOCK_SIZE)]
    );
    assert_eq!(t.stats().freed_sweep, 4);
    assert_eq!(t.stats().tables, [0, 0, 0, 1]);
    check(&t);
}

#[test]
fn two_meg_leaves_split_on_partial_discard() {
    for s in ALL {
        let t = Tables::new(s);
        let gpa = 3 * BLOCK_SIZE;
        assert_eq!(
            t.populate(gpa, 8 * BLOCK_SIZE, PageSize::Size2M).unwrap(),
            Populate::Installed
        );
        let l = t.lookup(gpa + 0x5000).unwrap();
        assert_eq!(l.host_offset, 8 * BLOCK_SIZE + 0x5000);
        assert_eq!(l.size, PageSize::Size2M);
        // A 4K populate inside reports the 2M leaf.
        assert_eq!(
            t.populate(gpa + 0x5000, 0, PageSize::Size4K).unwrap(),
            Populate::Present(l)
        );
        assert_eq!(t.stats().tables, [0, 1, 1, 1]);
        check(&t);
        let d = t.discard(range(gpa + PAGE_SIZE, 2 * PAGE_SIZE)).unwrap();
        assert_eq!(d.pages_cleared, 2);
        assert!(d.emptied_blocks.is_empty());
        let st = t.stats();
        assert_eq!(st.splits, 1);
        assert_eq!((st.leaves_2m, st.leaves_4k), (0, 510));
        assert_eq!(t.lookup(gpa + PAGE_SIZE), None);
        let l0 = t.lookup(gpa).unwrap();
        assert_eq!(
            (l0.host_offset, l0.size),
            (8 * BLOCK_SIZE, PageSize::Size4K)
        );
        let l3 = t.lookup(gpa + 3 * PAGE_SIZE).unwrap();
        assert_eq!(l3.host_offset, 8 * BLOCK_SIZE + 3 * PAGE_SIZE);
        check(&t);
    }
}

#[test]
fn whole_two_meg_leaf_discard_empties_block() {
    for s in ALL {
        let t = Tables::new(s);
        t.populate(0, 0, PageSize::Size2M).unwrap();
        t.populate(BLOCK_SIZE, BLOCK_SIZE, PageSize::Size2M)
            .unwrap();
        let d = t.discard(range(0, BLOCK_SIZE)).unwrap();
        assert_eq!(d.pages_cleared, 512);
        assert_eq!(d.emptied_blocks, vec![range(0, BLOCK_SIZE)]);
        assert_eq!(d.tables_freed, [0; 4]);
        let d = t.discard(range(BLOCK_SIZE, BLOCK_SIZE)).unwrap();
        if s == Strategy::Off {
            assert_eq!(d.tables_freed, [0; 4]);
        } else {
            assert_eq!(d.tables_freed, [0, 1, 1, 0]);
        }
        check(&t);
    }
}

#[test]
fn two_meg_populate_over_pt_is_refused() {
    let t = Tables::new(Strategy::Scan);
    fill(&t, 0, 1);
    assert!(matches!(
        t.populate(0, 0, PageSize::Size2M),
        Err(guest_mm::TableError::Occupied { gpa: 0 })
    ));
    check(&t);
}

#[test]
fn mark_lazy_sets_the_bit() {
    for s in ALL {
        let t = Tables::new(s);
        fill(&t, 0, 8);
        t.populate(BLOCK_SIZE, 0, PageSize::Size2M).unwrap();
        assert_eq!(t.mark_lazy(range(PAGE_SIZE, 2 * PAGE_SIZE)).unwrap(), 2);
        assert!(t.lookup(PAGE_SIZE).unwrap().lazy);
        assert!(!t.lookup(0).unwrap().lazy);
        assert_eq!(t.mark_lazy(range(PAGE_SIZE, 2 * PAGE_SIZE)).unwrap(), 0);
        assert_eq!(t.mark_lazy(range(BLOCK_SIZE, BLOCK_SIZE)).unwrap(), 512);
        assert!(t.lookup(BLOCK_SIZE + 0x3000).unwrap().lazy);
        // Partial mark of a 2M leaf splits it.
        t.populate(4 * BLOCK_SIZE, 0, PageSize::Size2M).unwrap();
        assert_eq!(t.mark_lazy(range(4 * BLOCK_SIZE, PAGE_SIZE)).unwrap(), 1);
        assert_eq!(t.stats().splits, 1);
        assert!(!t.lookup(4 * BLOCK_SIZE + PAGE_SIZE).unwrap().lazy);
        check(&t);
    }
}

#[test]
fn discard_of_unmapped_space_is_cheap_and_harmless() {
    let t = Tables::new(Strategy::Scan);
    fill(&t, 1 << 45, 1);
    let whole = range(0, guest_mm::range::GPA_LIMIT);
    let d = t.discard(whole).unwrap();
    assert_eq!(d.pages_cleared, 1);
    assert_eq!(d.tables_freed, [1, 1, 1, 0]);
    check(&t);
    assert_eq!(t.reclaim(whole).unwrap().tables_freed, [0; 4]);
}

#[test]
fn tables_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tables>();
}

#[test]
fn a_full_contiguous_pt_is_promoted_to_one_2m_leaf() {
    for s in ALL {
        let t = Tables::new(s);
        let b = 3 * BLOCK_SIZE;
        // One page short: no promotion, and nothing changes.
        for p in 0..511u64 {
            let gpa = b + p * PAGE_SIZE;
            t.populate(gpa, gpa, PageSize::Size4K).unwrap();
        }
        assert!(!t.block_is_full(b));
        assert!(!t.promote(b).unwrap(), "{s:?}: a page is missing");
        assert_eq!(t.stats().leaves_4k, 511);
        t.populate(b + 511 * PAGE_SIZE, b + 511 * PAGE_SIZE, PageSize::Size4K)
            .unwrap();
        assert!(t.block_is_full(b + 5 * PAGE_SIZE));
        let before = t.stats().table_bytes;
        assert!(t.promote(b + 5 * PAGE_SIZE).unwrap(), "{s:?}");
        let st = t.stats();
        assert_eq!((st.leaves_2m, st.leaves_4k, st.promotions), (1, 0, 1));
        assert_eq!(
            st.table_bytes,
            before - TABLE_BYTES,
            "{s:?}: the PT is freed"
        );
        assert_eq!(st.table_bytes, t.min_table_bytes());
        assert_eq!(
            t.lookup(b + 7 * PAGE_SIZE),
            Some(Leaf {
                host_offset: b + 7 * PAGE_SIZE,
                size: PageSize::Size2M,
                lazy: false
            })
        );
        check(&t);
        // Already a 2 MiB leaf, or nothing mapped: nothing to do.
        assert!(!t.promote(b).unwrap());
        assert!(!t.promote(9 * BLOCK_SIZE).unwrap());
        // A partial discard splits the promoted leaf again.
        t.discard(range(b + PAGE_SIZE, PAGE_SIZE)).unwrap();
        let st = t.stats();
        assert_eq!((st.leaves_2m, st.leaves_4k), (0, 511));
        check(&t);
    }
}

#[test]
fn a_pt_that_does_not_map_one_aligned_2m_run_stays() {
    for s in ALL {
        let t = Tables::new(s);
        // Full, but the host offsets are not one aligned run.
        fill(&t, 0, 512);
        let skewed = BLOCK_SIZE;
        for p in 0..512u64 {
            let gpa = skewed + p * PAGE_SIZE;
            let host = if p == 100 { 0x7000_0000 } else { gpa };
            t.populate(gpa, host, PageSize::Size4K).unwrap();
        }
        assert!(t.block_is_full(0) && t.block_is_full(skewed));
        // fill() maps block 0 at +0x1000_0000: aligned and contiguous, so it promotes.
        assert!(t.promote(0).unwrap(), "{s:?}");
        assert!(
            !t.promote(skewed).unwrap(),
            "{s:?}: page 100 maps elsewhere"
        );
        // Lazy leaves (released with MADV_FREE) are not promoted either.
        let lazy = 2 * BLOCK_SIZE;
        for p in 0..512u64 {
            let gpa = lazy + p * PAGE_SIZE;
            t.populate(gpa, gpa, PageSize::Size4K).unwrap();
        }
        t.mark_lazy(range(lazy + PAGE_SIZE, PAGE_SIZE)).unwrap();
        assert!(!t.promote(lazy).unwrap(), "{s:?}: a lazy leaf");
        let st = t.stats();
        assert_eq!((st.leaves_2m, st.leaves_4k, st.promotions), (1, 1024, 1));
        check(&t);
    }
}
