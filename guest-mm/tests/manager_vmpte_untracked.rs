//! The host's page tables follow a region without a fault path (ebb's `--no-track` guest RAM)
//! when the balloon takes its pages. No leaves tell guest-mm that a block is empty, and 4 KiB
//! `MADV_DONTNEED`s that empty a block one page at a time leave its host PTE page allocated
//! (Linux frees one only for a call covering the whole 2 MiB, `CONFIG_PT_RECLAIM`). But a block
//! whose pages are all held is unused by the guest, so the discard that completes it releases it
//! whole. One test in its own binary, because VmPTE is per process.

mod manager_common;

use std::sync::Arc;

use guest_mm::backing::ReleaseMode;
use guest_mm::manager::{BackingSpec, FaultConfig, GuestMm, RegionSpec};
use guest_mm::{BLOCK_SIZE, PAGE_SIZE, Strategy};
use manager_common::{MIB, discard_scattered_as, status_kb, touch_all};

const LEN: u64 = 128 * MIB;
const PAGES: u64 = LEN / PAGE_SIZE;
const BLOCKS: u64 = LEN / BLOCK_SIZE;
/// kB of host PTE pages needed to map LEN with 4 KiB pages.
const PTE_KB: u64 = BLOCKS * 4;

fn untracked_mm() -> Arc<GuestMm> {
    let layout = [RegionSpec {
        gpa: 0,
        len: LEN,
        backing: BackingSpec::Anonymous { thp: false },
    }];
    let faults = FaultConfig {
        handler_threads: 0,
        ..FaultConfig::default()
    };
    let mm = GuestMm::new(&layout, Strategy::Count, ReleaseMode::DontNeed, faults).unwrap();
    assert!(!mm.tracks_faults());
    Arc::new(mm)
}

/// Touches all of LEN, gives every page back in scattered 4 KiB discards (held first if
/// `hold`), returns VmPTE before the touch, after it and after the discards.
fn scenario(hold: bool) -> (u64, u64, u64) {
    let mm = untracked_mm();
    let pte0 = status_kb("VmPTE");
    touch_all(&mm, LEN);
    assert_eq!(mm.resident_pages().unwrap(), PAGES);
    let pte1 = status_kb("VmPTE");
    let blocks = discard_scattered_as(&mm, LEN, 11, hold);
    let pte2 = status_kb("VmPTE");
    assert_eq!(mm.resident_pages().unwrap(), 0);
    let st = mm.stats();
    assert_eq!(st.tables.leaves_4k + st.tables.leaves_2m, 0, "no leaves");
    if hold {
        assert_eq!(mm.held_pages(), PAGES);
        assert_eq!(blocks, BLOCKS, "each block released whole once");
    } else {
        assert_eq!(mm.held_pages(), 0);
        assert_eq!(blocks, 0, "no 256-page call covers a whole block");
    }
    eprintln!(
        "untracked, {}: VmPTE {pte0} -> {pte1} -> {pte2} kB",
        if hold { "held" } else { "not held" }
    );
    assert!(
        pte1 >= pte0 + PTE_KB * 9 / 10,
        "the touch maps with 4 KiB PTEs here: VmPTE {pte0} -> {pte1} kB"
    );
    (pte0, pte1, pte2)
}

#[test]
fn held_blocks_give_back_their_host_page_tables_without_a_fault_path() {
    // Not held: every page goes, but the host keeps every PTE page.
    let (_, pte1, pte2) = scenario(false);
    assert!(
        pte2 + PTE_KB / 10 >= pte1,
        "not held: VmPTE {pte1} -> {pte2} kB"
    );
    // Held, as the balloon's inflate does: the call that holds a block's last page releases the
    // whole block, and the host frees its PTE page; back to the baseline, give or take a few
    // pages of the test's own (as manager_vmpte.rs measures it).
    let (pte0, pte1, pte2) = scenario(true);
    assert!(
        pte1 - pte2 >= PTE_KB * 9 / 10 && pte2 <= pte0 + PTE_KB / 10,
        "held: VmPTE {pte0} -> {pte1} -> {pte2} kB"
    );
}
