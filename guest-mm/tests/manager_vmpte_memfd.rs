//! The host's page-table pages follow guest-mm's tables on memfd backing too (ebb's default
//! guest RAM: a shared memfd with 2 MiB block fills, released with `fallocate(PUNCH_HOLE)` or
//! `MADV_REMOVE`). A punch zaps the host's page-table entries but never frees the emptied PTE
//! page; guest-mm's release of a whole emptied block must. One test in its own binary, because
//! VmPTE is per process.

mod manager_common;

use std::sync::Arc;

use guest_mm::backing::ReleaseMode;
use guest_mm::manager::{BackingSpec, FaultConfig, GuestMm, RegionSpec};
use guest_mm::{BLOCK_SIZE, Strategy};
use manager_common::{MIB, discard_scattered, status_kb, touch_all};

const LEN: u64 = 128 * MIB;
/// kB of host PTE pages needed to map LEN with 4 KiB pages.
const PTE_KB: u64 = LEN / BLOCK_SIZE * 4;

fn memfd_mm(release: ReleaseMode) -> Arc<GuestMm> {
    let layout = [RegionSpec {
        gpa: 0,
        len: LEN,
        backing: BackingSpec::Memfd {
            name: "ebb-vmpte-test".into(),
            huge: true,
        },
    }];
    let faults = FaultConfig {
        handler_threads: 2,
        ..FaultConfig::default()
    };
    Arc::new(
        GuestMm::new(&layout, Strategy::Scan, release, faults)
            .expect("GuestMm over a memfd with a userfaultfd fault path (needs root)"),
    )
}

#[test]
fn emptied_memfd_blocks_give_back_their_host_page_tables() {
    for release in [ReleaseMode::PunchHole, ReleaseMode::Remove] {
        let mm = memfd_mm(release);
        // The baseline: the manager, its handler threads and its table arena exist.
        let pte0 = status_kb("VmPTE");
        touch_all(&mm, LEN);
        let pte1 = status_kb("VmPTE");
        discard_scattered(&mm, LEN, 7);
        let st = mm.stats();
        assert_eq!(st.tables.leaves_4k + st.tables.leaves_2m, 0);
        let pte2 = status_kb("VmPTE");
        eprintln!("{release}: VmPTE {pte0} -> {pte1} -> {pte2} kB");
        assert!(
            pte1 >= pte0 + PTE_KB * 9 / 10,
            "{release}: the touch maps with 4 KiB PTEs here: VmPTE {pte0} -> {pte1} kB"
        );
        // Back to the baseline, give or take a few pages of the test's own (thread stacks, heap):
        // as the anonymous-backing test (manager_vmpte.rs) measures it.
        assert!(
            pte1 - pte2 >= PTE_KB * 9 / 10,
            "{release}: emptied blocks keep their host PTE pages: VmPTE {pte0} -> {pte1} -> {pte2} kB"
        );
        drop(mm);
    }
}
