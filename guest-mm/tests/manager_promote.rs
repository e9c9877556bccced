//! Re-promotion: a 2 MiB block split by 4 KiB give-backs, which the guest touches again (its
//! first touch fills all the block's missing pages), becomes one 2 MiB host page mapped by one
//! PMD and one 2 MiB leaf again; the host's PTE
//! pages and guest-mm's PT tables that the splits made go away. One test in its own binary,
//! because VmPTE is per process.

mod manager_common;

use std::sync::Arc;

use guest_mm::backing::ReleaseMode;
use guest_mm::manager::{BackingSpec, FaultConfig, GuestMm, RegionSpec, gpa_range};
use guest_mm::{BLOCK_SIZE, PAGE_SIZE, Strategy};
use manager_common::{MIB, assert_exact, read, settle, shmem_pmd_kb, status_kb, touch_all, write};

const LEN: u64 = 64 * MIB;
const BLOCKS: u64 = LEN / BLOCK_SIZE;
/// The pages of every block given back and touched again.
const HOLES: [u64; 4] = [3, 100, 257, 511];

fn memfd_mm(strategy: Strategy) -> Arc<GuestMm> {
    let layout = [RegionSpec {
        gpa: 0,
        len: LEN,
        backing: BackingSpec::Memfd {
            name: "ebb-promote-test".into(),
            huge: true,
        },
    }];
    Arc::new(
        GuestMm::new(
            &layout,
            strategy,
            ReleaseMode::PunchHole,
            FaultConfig::default(),
        )
        .expect("GuestMm over a huge memfd with a userfaultfd fault path (needs root)"),
    )
}

#[test]
fn split_blocks_touched_whole_again_are_promoted() {
    for strategy in [Strategy::Count, Strategy::Scan] {
        let mm = memfd_mm(strategy);
        let all = gpa_range(0, LEN).unwrap();
        let host = mm.regions()[0].host_addr;
        let pte0 = status_kb("VmPTE");
        touch_all(&mm, LEN);
        assert_eq!(
            mm.stats().tables.leaves_2m,
            BLOCKS,
            "{strategy:?}: block fills"
        );

        // Give back 4 pages of every block (one discard, as a balloon chain would), then read
        // every page, so that the host maps what is left of each block with 4 KiB PTEs.
        let ranges: Vec<_> = (0..BLOCKS)
            .flat_map(|b| HOLES.map(|p| gpa_range(b * BLOCK_SIZE + p * PAGE_SIZE, PAGE_SIZE)))
            .collect::<Result<_, _>>()
            .unwrap();
        mm.discard_many(&ranges).unwrap();
        for p in 0..LEN / PAGE_SIZE {
            if !HOLES.contains(&(p % 512)) {
                assert_eq!(read(&mm, p * PAGE_SIZE), p, "{strategy:?}: page {p} kept");
            }
        }
        settle(&mm);
        let split = mm.stats();
        assert_eq!(
            (
                split.tables.leaves_2m,
                split.tables.leaves_4k,
                split.promotions
            ),
            (0, BLOCKS * 508, 0),
            "{strategy:?}: every block split"
        );
        let pte1 = status_kb("VmPTE");
        assert_eq!(
            shmem_pmd_kb(host),
            0,
            "{strategy:?}: split blocks are PTE-mapped"
        );

        // The guest takes the pages back: its first touch in each block fills the block's
        // missing pages at once, and the block is promoted.
        for b in 0..BLOCKS {
            for p in HOLES {
                write(&mm, b * BLOCK_SIZE + p * PAGE_SIZE, 0xa000 + b);
            }
        }
        settle(&mm);
        let st = mm.stats();
        let pte2 = status_kb("VmPTE");
        eprintln!(
            "{strategy:?}: VmPTE {pte0} -> split {pte1} -> promoted {pte2} kB; {} promotions in {} us; errors {} {} {} rest {}",
            st.promotions,
            st.promote_ns / 1000,
            st.promote_errors,
            st.fault_errors,
            st.table_errors,
            st.rest_fills
        );
        assert_eq!(
            (st.tables.leaves_2m, st.tables.leaves_4k, st.promotions),
            (BLOCKS, 0, BLOCKS),
            "{strategy:?}: every block one 2 MiB leaf again"
        );
        assert_eq!(
            st.rest_fills, BLOCKS,
            "{strategy:?}: the first touch fills the rest of its block"
        );
        assert_eq!(st.promote_errors + st.fault_errors + st.table_errors, 0);
        assert_eq!(st.tables.tables[0], 0, "{strategy:?}: no PT table left");
        assert_eq!(
            mm.tables().stats().table_bytes,
            mm.tables().min_table_bytes()
        );
        assert_eq!(assert_exact(&mm, all), LEN / PAGE_SIZE);
        assert_eq!(
            shmem_pmd_kb(host),
            LEN >> 10,
            "{strategy:?}: one PMD per block"
        );
        // The split blocks are mapped with a host PTE page each (4 kB; where the host gives
        // shmem no huge pages, the block fills were too); the promotion frees them all, give or
        // take a page of the test's own (its threads' stacks).
        assert!(
            pte1 >= pte0 + BLOCKS * 4 * 9 / 10,
            "{strategy:?}: the split maps with PTEs: VmPTE {pte0} -> {pte1} kB"
        );
        assert!(
            pte1 - pte2 >= BLOCKS * 4 * 9 / 10,
            "{strategy:?}: promoted blocks keep host PTE pages: VmPTE {pte0} -> {pte1} -> {pte2} kB"
        );
        for p in 0..LEN / PAGE_SIZE {
            let want = if HOLES.contains(&(p % 512)) {
                0xa000 + p / 512
            } else {
                p
            };
            assert_eq!(read(&mm, p * PAGE_SIZE), want, "{strategy:?}: page {p}");
        }

        // A promoted block splits again on the next partial give-back.
        mm.discard(gpa_range(5 * PAGE_SIZE, PAGE_SIZE).unwrap())
            .unwrap();
        let st = mm.stats();
        assert_eq!(
            (st.tables.leaves_2m, st.tables.leaves_4k),
            (BLOCKS - 1, 511)
        );
        assert_eq!(read(&mm, 5 * PAGE_SIZE), 0);
        settle(&mm);
        mm.discard(all).unwrap();
        assert_eq!(assert_exact(&mm, all), 0);
    }
}
