//! Memfd backing with block fills: a fault in an empty 2 MiB block fills the whole block through
//! the fill alias and records one 2 MiB leaf; partial discards split it and give back exactly
//! the discarded pages; a block emptied again is filled whole again. Leaves stay exactly the
//! host-present pages throughout.

mod manager_common;

use std::sync::Arc;
use std::thread;

use guest_mm::backing::{
    BackingError, BackingKind, HostBacking, MemfdBacking, ReleaseMode, shmem_huge_pages_available,
};
use guest_mm::manager::{BackingSpec, FaultConfig, GuestMm, RegionSpec, gpa_range};
use guest_mm::{BLOCK_SIZE, PAGE_SIZE, Strategy};
use manager_common::{MIB, assert_exact, read, settle, shmem_pmd_kb, write};

/// 4 whole blocks plus a 64 KiB tail that no block fill may cover.
const LEN: u64 = 8 * MIB + 64 * 1024;
const BLOCK_PAGES: u64 = BLOCK_SIZE / PAGE_SIZE;

fn huge_mm(strategy: Strategy, release: ReleaseMode) -> GuestMm {
    let layout = [RegionSpec {
        gpa: 0,
        len: LEN,
        backing: BackingSpec::Memfd {
            name: "ebb-huge-test".into(),
            huge: true,
        },
    }];
    GuestMm::new(&layout, strategy, release, FaultConfig::default())
        .expect("GuestMm over a huge memfd with a userfaultfd fault path (needs root)")
}

#[test]
fn empty_blocks_fill_whole_and_partial_discards_split() {
    for (strategy, release) in [
        (Strategy::Count, ReleaseMode::PunchHole),
        (Strategy::Scan, ReleaseMode::Remove),
    ] {
        let mm = Arc::new(huge_mm(strategy, release));
        let all = gpa_range(0, LEN).unwrap();

        // One write in block 0: the whole block arrives, as one 2 MiB leaf, from one fault.
        write(&mm, 5 * PAGE_SIZE, 0x55);
        settle(&mm);
        let st = mm.stats();
        assert_eq!((st.tables.leaves_2m, st.tables.leaves_4k), (1, 0));
        assert_eq!(st.block_fills, 1);
        assert_eq!(assert_exact(&mm, all), BLOCK_PAGES);
        assert_eq!(read(&mm, 6 * PAGE_SIZE), 0, "filled pages read zero");

        // Block 1 from two threads at once: still one fill.
        let hs: Vec<_> = (0..2u64)
            .map(|t| {
                let mm = mm.clone();
                thread::spawn(move || {
                    for p in (t..BLOCK_PAGES).step_by(2) {
                        let gpa = BLOCK_SIZE + p * PAGE_SIZE;
                        write(&mm, gpa, gpa ^ 0xb1);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        settle(&mm);
        let st = mm.stats();
        assert_eq!(st.tables.leaves_2m, 2);
        assert_eq!(st.block_fills, 2);
        assert_eq!(st.fault_errors + st.table_errors, 0);

        // The tail lies in a block the region does not cover whole: 4 KiB leaves.
        write(&mm, 8 * MIB + PAGE_SIZE, 0x7a);
        settle(&mm);
        let st = mm.stats();
        assert_eq!((st.tables.leaves_2m, st.tables.leaves_4k), (2, 1));
        assert_eq!(assert_exact(&mm, all), 2 * BLOCK_PAGES + 1);
        assert_eq!(
            mm.tables().stats().table_bytes,
            mm.tables().min_table_bytes()
        );

        if shmem_huge_pages_available() {
            let kb = shmem_pmd_kb(mm.regions()[0].host_addr);
            assert!(kb >= 4096, "both filled blocks PMD-mapped, got {kb} kB");
        } else {
            eprintln!(
                "NOTE: this host gives shmem no 2 MiB pages (transparent_hugepage/shmem_enabled); \
                 the PMD mapping is checked in the rig (ebb_boot), not here"
            );
        }

        // A 4 KiB discard inside block 0 splits its leaf and gives back that page only.
        mm.discard(gpa_range(3 * PAGE_SIZE, PAGE_SIZE).unwrap())
            .unwrap();
        let st = mm.stats();
        assert_eq!(
            (st.tables.leaves_2m, st.tables.leaves_4k),
            (1, BLOCK_PAGES - 1 + 1)
        );
        assert_eq!(assert_exact(&mm, all), 2 * BLOCK_PAGES);
        assert_eq!(read(&mm, 5 * PAGE_SIZE), 0x55, "the rest of the block kept");
        assert_eq!(
            read(&mm, BLOCK_SIZE + 7 * PAGE_SIZE),
            (BLOCK_SIZE + 7 * PAGE_SIZE) ^ 0xb1
        );
        // The hole faults back in as a 4 KiB page (its block is not empty).
        assert_eq!(read(&mm, 3 * PAGE_SIZE), 0);
        settle(&mm);
        assert_eq!(mm.stats().block_fills, 2);
        assert_eq!(assert_exact(&mm, all), 2 * BLOCK_PAGES + 1);

        // Emptied whole, block 0 loses its tables and is filled whole on the next touch.
        mm.discard(gpa_range(0, BLOCK_SIZE).unwrap()).unwrap();
        assert!(mm.tables().block_is_empty(0));
        assert_eq!(read(&mm, 5 * PAGE_SIZE), 0, "discarded data is gone");
        settle(&mm);
        let st = mm.stats();
        assert_eq!((st.block_fills, st.tables.leaves_2m), (3, 2));
        assert_eq!(assert_exact(&mm, all), 2 * BLOCK_PAGES + 1);

        // Everything back: only the root is left.
        mm.discard(all).unwrap();
        assert_eq!(assert_exact(&mm, all), 0);
        assert_eq!(mm.stats().tables.tables[..3], [0, 0, 0]);
        eprintln!("{strategy:?}/{release}: ok");
    }
}

/// A huge memfd backing that, like a kernel failing to split a 2 MiB page, keeps one page
/// resident (zeroed) whatever release covers it.
#[derive(Debug)]
struct StickyPage {
    inner: MemfdBacking,
    sticky: u64,
}

impl HostBacking for StickyPage {
    fn host_ptr(&self) -> *mut u8 {
        self.inner.host_ptr()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn kind(&self) -> BackingKind {
        self.inner.kind()
    }
    fn supports(&self, mode: ReleaseMode) -> bool {
        self.inner.supports(mode)
    }
    fn release(&self, offset: u64, len: u64, mode: ReleaseMode) -> Result<(), BackingError> {
        let end = offset + len;
        if !(offset..end).contains(&self.sticky) {
            return self.inner.release(offset, len, mode);
        }
        if offset < self.sticky {
            self.inner.release(offset, self.sticky - offset, mode)?;
        }
        if self.sticky + PAGE_SIZE < end {
            self.inner
                .release(self.sticky + PAGE_SIZE, end - self.sticky - PAGE_SIZE, mode)?;
        }
        // SAFETY: the sticky page lies inside the live mapping and is resident (it is only
        // ever released through here), so this write raises no userfault; nothing holds a
        // reference into guest memory.
        unsafe {
            std::ptr::write_bytes(
                self.inner.host_ptr().add(self.sticky as usize),
                0,
                PAGE_SIZE as usize,
            )
        };
        Ok(())
    }
    fn residency(&self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), BackingError> {
        self.inner.residency(offset, len, out)
    }
    fn fills_blocks(&self) -> bool {
        self.inner.fills_blocks()
    }
    fn fill_blocks(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.inner.fill_blocks(offset, len)
    }
}

#[test]
fn a_page_the_host_keeps_keeps_its_leaf() {
    let sticky = 7 * PAGE_SIZE;
    let backing = StickyPage {
        inner: MemfdBacking::with_huge("ebb-sticky", 4 * MIB, true).unwrap(),
        sticky,
    };
    let layout = [RegionSpec {
        gpa: 0,
        len: 4 * MIB,
        backing: BackingSpec::Custom(Arc::new(backing)),
    }];
    let mm = GuestMm::new(
        &layout,
        Strategy::Count,
        ReleaseMode::PunchHole,
        FaultConfig::default(),
    )
    .unwrap();
    let all = gpa_range(0, 4 * MIB).unwrap();
    write(&mm, sticky, 0x77);
    write(&mm, sticky + PAGE_SIZE, 0x78);
    settle(&mm);
    assert_eq!(assert_exact(&mm, all), BLOCK_PAGES);
    // The discard covers the sticky page and its neighbour; only the neighbour goes.
    let d = mm
        .discard(gpa_range(sticky, 2 * PAGE_SIZE).unwrap())
        .unwrap();
    assert_eq!(d.pages_kept, 1);
    assert_eq!(mm.stats().pages_kept, 1);
    assert!(mm.lookup(sticky).is_some(), "the kept page keeps a leaf");
    assert!(mm.lookup(sticky + PAGE_SIZE).is_none());
    assert_eq!(assert_exact(&mm, all), BLOCK_PAGES - 1);
    assert_eq!(
        read(&mm, sticky),
        0,
        "a kept page reads zero like any discarded page"
    );
    assert_eq!(
        mm.tables().stats().table_bytes,
        mm.tables().min_table_bytes()
    );
}

#[test]
fn a_block_window_fills_only_when_every_block_is_empty() {
    let layout = [RegionSpec {
        gpa: 0,
        len: LEN,
        backing: BackingSpec::Memfd {
            name: "ebb-huge-window".into(),
            huge: true,
        },
    }];
    let faults = FaultConfig {
        fault_around_pages: 4 * 512,
        ..FaultConfig::default()
    };
    let mm = GuestMm::new(&layout, Strategy::Count, ReleaseMode::PunchHole, faults).unwrap();
    let all = gpa_range(0, LEN).unwrap();
    // One touch in block 2 fills the aligned 8 MiB window: blocks 0-3, one fault.
    write(&mm, 2 * BLOCK_SIZE + PAGE_SIZE, 1);
    settle(&mm);
    let st = mm.stats();
    assert_eq!(
        (st.block_fills, st.tables.leaves_2m, st.faults_resolved),
        (4, 4, 1)
    );
    assert_eq!(assert_exact(&mm, all), 4 * BLOCK_PAGES);
    // Empty block 1 again: the window is no longer empty, so a touch fills block 1 alone.
    mm.discard(gpa_range(BLOCK_SIZE, BLOCK_SIZE).unwrap())
        .unwrap();
    write(&mm, BLOCK_SIZE, 2);
    settle(&mm);
    let st = mm.stats();
    assert_eq!((st.block_fills, st.tables.leaves_2m), (5, 4));
    // The 64 KiB tail takes no block and no 4 KiB window (a window never leaves its block,
    // and the tail's block is not whole): one page.
    write(&mm, 8 * MIB, 3);
    settle(&mm);
    assert_eq!(mm.stats().tables.leaves_4k, 1);
    assert_eq!(assert_exact(&mm, all), 4 * BLOCK_PAGES + 1);
    assert_eq!(read(&mm, 2 * BLOCK_SIZE + PAGE_SIZE), 1);
    assert_eq!(
        mm.tables().stats().table_bytes,
        mm.tables().min_table_bytes()
    );
}

#[test]
fn memory_given_back_is_filled_a_block_at_a_time_and_fresh_memory_a_window() {
    let layout = [RegionSpec {
        gpa: 0,
        len: 16 * MIB,
        backing: BackingSpec::Memfd {
            name: "ebb-huge-given-back".into(),
            huge: true,
        },
    }];
    let faults = FaultConfig {
        fault_around_pages: 4 * 512,
        ..FaultConfig::default()
    };
    let mm = GuestMm::new(&layout, Strategy::Count, ReleaseMode::PunchHole, faults).unwrap();
    let all = gpa_range(0, 16 * MIB).unwrap();
    write(&mm, PAGE_SIZE, 1);
    settle(&mm);
    assert_eq!(
        assert_exact(&mm, all),
        4 * BLOCK_PAGES,
        "the first touch fills blocks 0-3"
    );
    // The guest gives all four back (free page reporting, say): the window is empty again, but
    // its blocks were given back, so touching one page fills that block alone.
    mm.discard(gpa_range(0, 4 * BLOCK_SIZE).unwrap()).unwrap();
    assert_eq!(assert_exact(&mm, all), 0);
    write(&mm, 2 * BLOCK_SIZE + PAGE_SIZE, 2);
    settle(&mm);
    assert_eq!(assert_exact(&mm, all), BLOCK_PAGES);
    assert_eq!(mm.stats().tables.leaves_2m, 1);
    // Blocks 4-7 were never touched: a window again.
    write(&mm, 5 * BLOCK_SIZE, 3);
    settle(&mm);
    assert_eq!(assert_exact(&mm, all), 5 * BLOCK_PAGES);
    let st = mm.stats();
    assert_eq!((st.block_fills, st.faults_resolved), (9, 3));
    assert_eq!(read(&mm, 2 * BLOCK_SIZE + PAGE_SIZE), 2);
    assert_eq!(read(&mm, PAGE_SIZE), 0, "a page given back reads zero");
    assert_eq!(
        mm.tables().stats().table_bytes,
        mm.tables().min_table_bytes()
    );
}

#[test]
fn held_pages_are_never_filled_unasked() {
    let layout = [RegionSpec {
        gpa: 0,
        len: 32 * MIB,
        backing: BackingSpec::Memfd {
            name: "ebb-huge-held".into(),
            huge: true,
        },
    }];
    let faults = FaultConfig {
        fault_around_pages: 4 * 512,
        ..FaultConfig::default()
    };
    let mm = GuestMm::new(&layout, Strategy::Count, ReleaseMode::PunchHole, faults).unwrap();
    let all = gpa_range(0, 32 * MIB).unwrap();
    write(&mm, 0, 1);
    settle(&mm);
    assert_eq!(assert_exact(&mm, all), 4 * BLOCK_PAGES, "blocks 0-3 filled");
    // A balloon inflates all of block 1: held first, then discarded (its tables go).
    let block1 = gpa_range(BLOCK_SIZE, BLOCK_SIZE).unwrap();
    mm.hold(&[block1], true).unwrap();
    mm.discard(block1).unwrap();
    assert!(mm.tables().block_is_empty(BLOCK_SIZE));
    assert_eq!(mm.held_pages(), BLOCK_PAGES);
    // It deflates 16 pages and the guest touches one: one page comes back, not the block.
    let sixteen = gpa_range(BLOCK_SIZE, 16 * PAGE_SIZE).unwrap();
    mm.hold(&[sixteen], false).unwrap();
    write(&mm, BLOCK_SIZE + 3 * PAGE_SIZE, 2);
    settle(&mm);
    let st = mm.stats();
    assert_eq!((st.tables.leaves_2m, st.tables.leaves_4k), (3, 1));
    assert_eq!(assert_exact(&mm, all), 3 * BLOCK_PAGES + 1);
    // Blocks 4-7: block 5 holds pages, so a touch in block 4 fills block 4 alone.
    let in5 = gpa_range(5 * BLOCK_SIZE + PAGE_SIZE, PAGE_SIZE).unwrap();
    mm.hold(&[in5], true).unwrap();
    write(&mm, 4 * BLOCK_SIZE, 3);
    settle(&mm);
    assert_eq!(assert_exact(&mm, all), 4 * BLOCK_PAGES + 1);
    // A touch in block 5 (holding a page) fills one page.
    write(&mm, 5 * BLOCK_SIZE + 9 * PAGE_SIZE, 4);
    settle(&mm);
    assert_eq!(assert_exact(&mm, all), 4 * BLOCK_PAGES + 2);
    // Everything taken back: blocks 8-11 fill as a window again.
    mm.hold(
        &[
            in5,
            gpa_range(BLOCK_SIZE + 16 * PAGE_SIZE, BLOCK_SIZE - 16 * PAGE_SIZE).unwrap(),
        ],
        false,
    )
    .unwrap();
    assert_eq!(mm.held_pages(), 0);
    write(&mm, 8 * BLOCK_SIZE, 5);
    settle(&mm);
    assert_eq!(assert_exact(&mm, all), 8 * BLOCK_PAGES + 2);
    // A bad range changes nothing.
    assert!(
        mm.hold(&[in5, gpa_range(32 * MIB, PAGE_SIZE).unwrap()], true)
            .is_err()
    );
    assert_eq!(mm.held_pages(), 0);
    assert_eq!(
        mm.tables().stats().table_bytes,
        mm.tables().min_table_bytes()
    );
}
