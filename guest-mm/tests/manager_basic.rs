//! GuestMm with real handler threads and real toucher threads: leaves follow touches, discarded
//! pages read back as zero and fault again, data outside a discard survives, memfd and
//! MADV_FREE modes, foreign remove events, and hostile requests.

mod manager_common;

use std::sync::Arc;
use std::thread;

use guest_mm::backing::{AnonBacking, HostBacking, ReleaseMode};
use guest_mm::manager::{
    BackingSpec, FaultConfig, FillMode, GuestMm, ManagerError, RegionSpec, gpa_range,
};
use guest_mm::{BLOCK_SIZE, GpaRange, PAGE_SIZE, Strategy};
use manager_common::{MIB, Rng, anon_mm, assert_exact, read, settle, write};

/// Touches `pages` pages from `start` from `threads` threads, writing `tag ^ gpa`.
fn touch_all(mm: &Arc<GuestMm>, start: u64, pages: u64, threads: u64, tag: u64) {
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let mm = mm.clone();
            thread::spawn(move || {
                for p in (t..pages).step_by(threads as usize) {
                    let gpa = start + p * PAGE_SIZE;
                    write(&mm, gpa, tag ^ gpa);
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    settle(mm);
}

#[test]
fn discard_zeroes_refaults_and_keeps_the_rest() {
    for strategy in [Strategy::Off, Strategy::Scan, Strategy::Count] {
        let mm = Arc::new(anon_mm(8 * MIB, strategy, ReleaseMode::DontNeed, 2));
        let pages = 8 * MIB / PAGE_SIZE;
        touch_all(&mm, 0, pages, 3, 0xabcd);
        let st = mm.stats();
        assert_eq!(
            st.tables.leaves_4k, pages,
            "{strategy:?}: leaves == pages touched"
        );
        assert_eq!(st.faults_resolved, pages);
        assert_eq!(assert_exact(&mm, gpa_range(0, 8 * MIB).unwrap()), pages);

        // Discard 1 MiB + 12 KiB starting in the middle of the first block.
        let d = gpa_range(MIB - 4 * PAGE_SIZE, MIB + 12 * PAGE_SIZE).unwrap();
        let sum = mm.discard(d).unwrap();
        assert_eq!(sum.pages_cleared, d.pages());
        assert_eq!(sum.release_calls, 1, "one contiguous range, one call");
        assert_eq!(sum.host_bytes_released, d.len());
        assert_eq!(mm.stats().tables.leaves_4k, pages - d.pages());
        for p in 0..pages {
            let gpa = p * PAGE_SIZE;
            if d.contains(gpa) {
                assert!(mm.lookup(gpa).is_none());
            } else {
                assert_eq!(
                    read(&mm, gpa),
                    0xabcd ^ gpa,
                    "{strategy:?}: data outside survives"
                );
            }
        }
        assert_exact(&mm, gpa_range(0, 8 * MIB).unwrap());

        // Discarded pages read back as zero, through new faults, and get leaves again.
        let before = mm.stats().faults_resolved;
        for gpa in (d.start()..d.end()).step_by(PAGE_SIZE as usize) {
            assert_eq!(read(&mm, gpa), 0);
        }
        settle(&mm);
        let st = mm.stats();
        assert_eq!(
            st.faults_resolved - before,
            d.pages(),
            "each discarded page faulted again"
        );
        assert_eq!(st.tables.leaves_4k, pages);
        assert_eq!(st.own_remove_events, 1);
        assert_eq!(st.foreign_remove_events, 0);
        assert_eq!(
            st.tables,
            mm.tables().recount(),
            "stats equal a recount when quiescent"
        );
        assert_exact(&mm, gpa_range(0, 8 * MIB).unwrap());
    }
}

#[test]
fn emptied_blocks_are_released_whole_and_batches_merge() {
    let mm = Arc::new(anon_mm(8 * MIB, Strategy::Scan, ReleaseMode::DontNeed, 2));
    let pages = 8 * MIB / PAGE_SIZE;
    touch_all(&mm, 0, pages, 2, 1);
    // Discard every page of block 1 except one, in scattered single pages: no table freed.
    let per_block = BLOCK_SIZE / PAGE_SIZE;
    let mut order: Vec<u64> = (1..per_block).collect();
    let mut rng = Rng(7);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let ranges: Vec<GpaRange> = order
        .iter()
        .map(|p| gpa_range(BLOCK_SIZE + p * PAGE_SIZE, PAGE_SIZE).unwrap())
        .collect();
    let sum = mm.discard_many(&ranges).unwrap();
    assert_eq!(sum.pages_cleared, per_block - 1);
    assert_eq!(sum.tables_freed[0], 0);
    assert_eq!(
        sum.release_calls, 1,
        "the scattered pages of one batch merge into one call"
    );
    // The last page empties the PT table: the whole block goes in one aligned call.
    let sum = mm
        .discard(gpa_range(BLOCK_SIZE, PAGE_SIZE).unwrap())
        .unwrap();
    assert_eq!(sum.tables_freed[0], 1);
    assert_eq!(sum.blocks_released, 1);
    assert_eq!(
        (sum.release_calls, sum.host_bytes_released),
        (1, BLOCK_SIZE)
    );
    assert_exact(&mm, gpa_range(0, 8 * MIB).unwrap());
    // Neighbouring blocks are intact.
    assert_eq!(read(&mm, 0), 1);
    assert_eq!(read(&mm, 2 * BLOCK_SIZE), 1 ^ (2 * BLOCK_SIZE));
}

#[test]
fn fault_around_fills_windows_and_falls_back() {
    for fill in [
        FillMode::ZeropageForReads,
        FillMode::AlwaysCopy,
        FillMode::AlwaysZeropage,
    ] {
        let layout = [RegionSpec {
            gpa: 0,
            len: 4 * MIB,
            backing: BackingSpec::Anonymous { thp: false },
        }];
        let faults = FaultConfig {
            handler_threads: 2,
            fault_around_pages: 16,
            fill,
            thread_start: None,
        };
        let mm =
            Arc::new(GuestMm::new(&layout, Strategy::Scan, ReleaseMode::DontNeed, faults).unwrap());
        write(&mm, 5 * PAGE_SIZE, 42);
        settle(&mm);
        let st = mm.stats();
        assert_eq!(st.fault_around_pages, 16, "{fill:?} {st:#?}");
        assert_eq!(st.tables.leaves_4k, 16);
        assert_exact(&mm, gpa_range(0, 4 * MIB).unwrap());
        // Discard one page of the window; touching it again fills just that page.
        mm.discard(gpa_range(3 * PAGE_SIZE, PAGE_SIZE).unwrap())
            .unwrap();
        assert_eq!(read(&mm, 3 * PAGE_SIZE), 0);
        settle(&mm);
        assert_eq!(mm.stats().fault_around_pages, 16);
        assert_eq!(mm.stats().tables.leaves_4k, 16);
        assert_eq!(read(&mm, 5 * PAGE_SIZE), 42);
        touch_all(&mm, 0, 4 * MIB / PAGE_SIZE, 3, 9);
        assert_eq!(mm.stats().tables.leaves_4k, 4 * MIB / PAGE_SIZE);
        assert_exact(&mm, gpa_range(0, 4 * MIB).unwrap());
    }
}

#[test]
fn memfd_remove_and_punch_hole() {
    for mode in [ReleaseMode::Remove, ReleaseMode::PunchHole] {
        let layout = [RegionSpec {
            gpa: 0,
            len: 4 * MIB,
            backing: BackingSpec::Memfd {
                name: "ebb-test-guest".into(),
                huge: false,
            },
        }];
        let mm =
            Arc::new(GuestMm::new(&layout, Strategy::Count, mode, FaultConfig::default()).unwrap());
        let pages = 4 * MIB / PAGE_SIZE;
        touch_all(&mm, 0, pages, 2, 5);
        assert_eq!(assert_exact(&mm, gpa_range(0, 4 * MIB).unwrap()), pages);
        let d = gpa_range(BLOCK_SIZE, BLOCK_SIZE).unwrap();
        let sum = mm.discard(d).unwrap();
        assert_eq!(sum.pages_cleared, d.pages());
        assert_eq!(
            sum.tables_freed[0], 1,
            "{mode}: the block's PT table is freed"
        );
        assert_eq!(
            assert_exact(&mm, gpa_range(0, 4 * MIB).unwrap()),
            pages - d.pages()
        );
        let before = mm.stats().faults_resolved;
        assert_eq!(read(&mm, BLOCK_SIZE + 8 * PAGE_SIZE), 0);
        settle(&mm);
        assert_eq!(
            mm.stats().faults_resolved,
            before + 1,
            "{mode}: a removed page faults again {:#?}",
            mm.stats()
        );
        assert_eq!(read(&mm, 0), 5);
        assert_exact(&mm, gpa_range(0, 4 * MIB).unwrap());
    }
    // MADV_DONTNEED would keep a shared page in the page cache: refused up front.
    let layout = [RegionSpec {
        gpa: 0,
        len: MIB,
        backing: BackingSpec::Memfd {
            name: "x".into(),
            huge: false,
        },
    }];
    let err = GuestMm::new(
        &layout,
        Strategy::Scan,
        ReleaseMode::DontNeed,
        FaultConfig::default(),
    );
    assert!(matches!(err, Err(ManagerError::ModeUnsupported { .. })));
}

#[test]
fn madv_free_marks_leaves_lazy() {
    let mm = Arc::new(anon_mm(4 * MIB, Strategy::Scan, ReleaseMode::Free, 2));
    let pages = 4 * MIB / PAGE_SIZE;
    touch_all(&mm, 0, pages, 2, 3);
    let d = gpa_range(MIB, MIB).unwrap();
    let sum = mm.discard(d).unwrap();
    assert_eq!((sum.pages_lazy, sum.pages_cleared), (d.pages(), 0));
    assert_eq!(
        sum.tables_freed, [0; 4],
        "MADV_FREE frees no tables: no leaf goes away"
    );
    let st = mm.stats();
    assert_eq!(st.tables.leaves_4k, pages, "lazy leaves stay");
    assert_eq!(st.lazy_marked, d.pages());
    for p in 0..pages {
        let gpa = p * PAGE_SIZE;
        let leaf = mm.lookup(gpa).expect("every touched page keeps its leaf");
        assert_eq!(leaf.lazy, d.contains(gpa));
        let v = read(&mm, gpa);
        // A lazily freed page reads either its old contents or zero.
        assert!(
            v == 3 ^ gpa || (d.contains(gpa) && v == 0),
            "gpa {gpa:#x} read {v:#x}"
        );
    }
}

#[test]
fn foreign_remove_events_clear_leaves() {
    let backing = Arc::new(AnonBacking::new(4 * MIB, false).unwrap());
    let layout = [RegionSpec {
        gpa: 0,
        len: 4 * MIB,
        backing: BackingSpec::Custom(backing.clone()),
    }];
    let mm = Arc::new(
        GuestMm::new(
            &layout,
            Strategy::Scan,
            ReleaseMode::DontNeed,
            FaultConfig::default(),
        )
        .unwrap(),
    );
    touch_all(&mm, 0, 4 * MIB / PAGE_SIZE, 2, 11);
    // Someone else releases 64 KiB behind the manager's back.
    backing
        .release(MIB, 16 * PAGE_SIZE, ReleaseMode::DontNeed)
        .unwrap();
    assert!(mm.settle_faults(std::time::Duration::from_secs(5)));
    let st = mm.stats();
    assert_eq!(
        (st.foreign_remove_events, st.foreign_pages_cleared),
        (1, 16)
    );
    assert!(mm.lookup(MIB).is_none());
    assert_exact(&mm, gpa_range(0, 4 * MIB).unwrap());
    assert_eq!(read(&mm, MIB), 0);
    settle(&mm);
    assert!(mm.lookup(MIB).is_some());
}

#[test]
fn hostile_requests_are_refused_and_change_nothing() {
    let layout = [
        RegionSpec {
            gpa: 0,
            len: 2 * MIB,
            backing: BackingSpec::Anonymous { thp: false },
        },
        RegionSpec {
            gpa: 4 * MIB,
            len: 2 * MIB,
            backing: BackingSpec::Anonymous { thp: false },
        },
    ];
    let mm = Arc::new(
        GuestMm::new(
            &layout,
            Strategy::Scan,
            ReleaseMode::DontNeed,
            FaultConfig::default(),
        )
        .unwrap(),
    );
    touch_all(&mm, 0, 512, 2, 1);
    touch_all(&mm, 4 * MIB, 512, 2, 2);
    let before = mm.stats();

    // Malformed ranges never become a GpaRange.
    for (s, l) in [
        (0, 0),
        (1, PAGE_SIZE),
        (0, 100),
        (u64::MAX - PAGE_SIZE + 1, PAGE_SIZE),
        (1 << 48, PAGE_SIZE),
    ] {
        assert!(
            matches!(gpa_range(s, l), Err(ManagerError::Range { .. })),
            "({s:#x}, {l:#x})"
        );
    }
    // Well-formed ranges outside the regions, in the hole, or straddling two regions.
    for (s, l) in [
        (2 * MIB, PAGE_SIZE),
        (MIB, 2 * MIB),
        (0, 6 * MIB),
        (6 * MIB, PAGE_SIZE),
        (1 << 40, MIB),
    ] {
        let r = gpa_range(s, l).unwrap();
        assert!(
            matches!(mm.discard(r), Err(ManagerError::NotInRegion { .. })),
            "({s:#x}, {l:#x})"
        );
        assert!(matches!(
            mm.reclaim(r),
            Err(ManagerError::NotInRegion { .. })
        ));
    }
    // A batch with one bad range is refused whole.
    let batch = [
        gpa_range(0, PAGE_SIZE).unwrap(),
        gpa_range(3 * MIB, PAGE_SIZE).unwrap(),
    ];
    assert!(mm.discard_many(&batch).is_err());

    let after = mm.stats();
    assert_eq!(before.tables, after.tables);
    assert_eq!(
        (before.release_calls, after.discards),
        (after.release_calls, before.discards)
    );
    assert_eq!(read(&mm, 0), 1);
    assert_eq!(read(&mm, 4 * MIB), 2 ^ (4 * MIB));

    // Bad layouts and fault configurations.
    let anon = |gpa, len| RegionSpec {
        gpa,
        len,
        backing: BackingSpec::Anonymous { thp: false },
    };
    let fc = FaultConfig::default();
    for layout in [
        vec![anon(PAGE_SIZE, MIB)],
        vec![anon(0, 0)],
        vec![anon(0, 100)],
        vec![anon(0, 4 * MIB), anon(2 * MIB, 4 * MIB)],
        vec![anon((1 << 48) - 2 * MIB, 4 * MIB)],
        vec![],
    ] {
        assert!(GuestMm::new(&layout, Strategy::Scan, ReleaseMode::DontNeed, fc).is_err());
    }
    let bad_fa = FaultConfig {
        fault_around_pages: 3,
        ..fc
    };
    assert!(
        GuestMm::new(
            &[anon(0, MIB)],
            Strategy::Scan,
            ReleaseMode::DontNeed,
            bad_fa
        )
        .is_err()
    );
}

#[test]
fn two_regions_stay_apart() {
    let anon = |gpa| RegionSpec {
        gpa,
        len: 4 * MIB,
        backing: BackingSpec::Anonymous { thp: false },
    };
    let layout = [anon(0), anon(1 << 32)];
    let mm = Arc::new(
        GuestMm::new(
            &layout,
            Strategy::Count,
            ReleaseMode::DontNeed,
            FaultConfig::default(),
        )
        .unwrap(),
    );
    let pages = 4 * MIB / PAGE_SIZE;
    touch_all(&mm, 0, pages, 2, 1);
    touch_all(&mm, 1 << 32, pages, 2, 2);
    assert_eq!(mm.stats().tables.leaves_4k, 2 * pages);
    // Same offsets in both regions: only the second region's pages go.
    let d = gpa_range((1 << 32) + BLOCK_SIZE, BLOCK_SIZE).unwrap();
    let sum = mm.discard(d).unwrap();
    assert_eq!((sum.pages_cleared, sum.tables_freed[0]), (d.pages(), 1));
    assert_eq!(read(&mm, BLOCK_SIZE), 1 ^ BLOCK_SIZE);
    assert_eq!(read(&mm, d.start()), 0);
    assert_exact(&mm, gpa_range(0, 4 * MIB).unwrap());
    assert_exact(&mm, gpa_range(1 << 32, 4 * MIB).unwrap());
    let infos = mm.regions();
    assert_eq!(infos.len(), 2);
    assert!(
        infos
            .iter()
            .all(|r| r.host_addr.is_multiple_of(BLOCK_SIZE) && r.len == 4 * MIB)
    );
}

#[test]
fn without_fault_path_discard_releases_what_is_asked() {
    let layout = [RegionSpec {
        gpa: 0,
        len: 4 * MIB,
        backing: BackingSpec::Anonymous { thp: false },
    }];
    let faults = FaultConfig {
        handler_threads: 0,
        ..FaultConfig::default()
    };
    let mm = GuestMm::new(&layout, Strategy::Scan, ReleaseMode::DontNeed, faults).unwrap();
    assert!(!mm.tracks_faults());
    for p in 0..4 * MIB / PAGE_SIZE {
        write(&mm, p * PAGE_SIZE, 7);
    }
    assert_eq!(mm.stats().tables.leaves_4k, 0, "untracked: no leaves");
    let sum = mm.discard(gpa_range(MIB, 8 * PAGE_SIZE).unwrap()).unwrap();
    assert_eq!(
        (sum.release_calls, sum.host_bytes_released),
        (1, 8 * PAGE_SIZE)
    );
    assert_eq!(read(&mm, MIB), 0);
    assert_eq!(read(&mm, MIB + 8 * PAGE_SIZE), 7);
    let mut res = Vec::new();
    mm.residency(gpa_range(MIB, 9 * PAGE_SIZE).unwrap(), &mut res)
        .unwrap();
    // The page just read back is resident again (zero page); the other seven are gone.
    assert_eq!(res.iter().filter(|r| *r & 1 == 1).count(), 2);
}

#[test]
fn every_handler_runs_the_start_hook_first_and_a_failing_hook_stops_new() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    fn count() -> std::io::Result<()> {
        STARTED.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn refuse() -> std::io::Result<()> {
        Err(std::io::Error::other("no filter for you"))
    }
    let region = |gpa, len| RegionSpec {
        gpa,
        len,
        backing: BackingSpec::Anonymous { thp: false },
    };
    let faults = FaultConfig {
        handler_threads: 3,
        thread_start: Some(count),
        ..FaultConfig::default()
    };
    let mm = Arc::new(
        GuestMm::new(
            &[region(0, 4 * MIB)],
            Strategy::Scan,
            ReleaseMode::DontNeed,
            faults,
        )
        .unwrap(),
    );
    // new returned only after every handler ran the hook, and the fault path works after it.
    assert_eq!(STARTED.load(Ordering::SeqCst), 3);
    touch_all(&mm, 0, 16, 2, 7);
    assert_eq!(assert_exact(&mm, gpa_range(0, 4 * MIB).unwrap()), 16);
    drop(mm);
    let faults = FaultConfig {
        thread_start: Some(refuse),
        ..FaultConfig::default()
    };
    let Err(err) = GuestMm::new(
        &[region(0, 4 * MIB)],
        Strategy::Scan,
        ReleaseMode::DontNeed,
        faults,
    ) else {
        panic!("a failing start hook fails new");
    };
    assert!(matches!(err, ManagerError::Handlers(_)), "{err:?}");
    let text = format!("{:?}", std::error::Error::source(&err));
    assert!(text.contains("no filter for you"), "{text}");
}
