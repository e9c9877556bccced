//! Host page tables and RSS really drop after discards through GuestMm (this kernel has
//! CONFIG_PT_RECLAIM: a PTE page is freed when one MADV_DONTNEED covers its whole 2 MiB).
//! One test in its own binary, because VmPTE and VmRSS are per process.

mod manager_common;

use std::sync::Arc;

use guest_mm::backing::ReleaseMode;
use guest_mm::manager::{GuestMm, gpa_range};
use guest_mm::{BLOCK_SIZE, PAGE_SIZE, Strategy};
use manager_common::{MIB, anon_mm, discard_scattered, status_kb, touch_all};

const LEN: u64 = 128 * MIB;
const PAGES: u64 = LEN / PAGE_SIZE;
/// kB of host PTE pages needed to map LEN with 4 KiB pages.
const PTE_KB: u64 = LEN / BLOCK_SIZE * 4;

/// Touches everything, runs `discard`, returns (VmPTE before touch, after touch, after discard)
/// and the RSS drop in kB.
fn scenario(strategy: Strategy, discard: impl Fn(&GuestMm)) -> (u64, u64, u64, u64) {
    let mm = Arc::new(anon_mm(LEN, strategy, ReleaseMode::DontNeed, 2));
    let pte0 = status_kb("VmPTE");
    touch_all(&mm, LEN);
    assert_eq!(mm.stats().tables.leaves_4k, PAGES);
    let (pte1, rss1) = (status_kb("VmPTE"), status_kb("VmRSS"));
    discard(&mm);
    assert_eq!(mm.stats().tables.leaves_4k, 0);
    let (pte2, rss2) = (status_kb("VmPTE"), status_kb("VmRSS"));
    eprintln!(
        "{strategy:?}: VmPTE {pte0} -> {pte1} -> {pte2} kB, VmRSS drop {} kB",
        rss1 - rss2
    );
    (pte0, pte1, pte2, rss1.saturating_sub(rss2))
}

fn scattered(mm: &GuestMm) {
    discard_scattered(mm, LEN, 42);
}

#[test]
fn host_page_tables_and_rss_drop() {
    // 2 MiB-aligned discards.
    let (_, pte1, pte2, rss_drop) = scenario(Strategy::Scan, |mm| {
        for b in (0..LEN).step_by(BLOCK_SIZE as usize) {
            mm.discard(gpa_range(b, BLOCK_SIZE).unwrap()).unwrap();
        }
    });
    assert!(
        pte1 - pte2 >= PTE_KB * 9 / 10,
        "aligned discards: VmPTE {pte1} -> {pte2} kB"
    );
    assert!(
        rss_drop >= LEN / 1024 * 9 / 10,
        "aligned discards: RSS dropped {rss_drop} kB"
    );

    // Scattered 4 KiB discards in random order, 256 per batch: each PT table that empties
    // has its whole block released in one call, so the host frees its PTE page too.
    let (_, pte1, pte2, rss_drop) = scenario(Strategy::Scan, scattered);
    assert!(
        pte1 - pte2 >= PTE_KB * 9 / 10,
        "scattered, Scan: VmPTE {pte1} -> {pte2} kB"
    );
    assert!(
        rss_drop >= LEN / 1024 * 9 / 10,
        "scattered, Scan: RSS dropped {rss_drop} kB"
    );
    let (_, pte1, pte2, _) = scenario(Strategy::Count, scattered);
    assert!(
        pte1 - pte2 >= PTE_KB * 9 / 10,
        "scattered, Count: VmPTE {pte1} -> {pte2} kB"
    );

    // The same with Off never frees a table, so the host keeps every PTE page...
    let (_, pte1, pte2, rss_drop) = scenario(Strategy::Off, scattered);
    assert!(
        pte2 + PTE_KB / 10 >= pte1,
        "scattered, Off: VmPTE {pte1} -> {pte2} kB"
    );
    assert!(
        rss_drop >= LEN / 1024 * 9 / 10,
        "scattered, Off: RSS dropped {rss_drop} kB"
    );

    // ...until an explicit sweep frees the empty tables and releases their blocks whole.
    let swept = std::sync::Mutex::new((0, 0));
    scenario(Strategy::Off, |mm| {
        scattered(mm);
        let before = status_kb("VmPTE");
        let sum = mm.reclaim(gpa_range(0, LEN).unwrap()).unwrap();
        assert_eq!(sum.tables_freed[0], LEN / BLOCK_SIZE);
        assert_eq!(sum.blocks_released, LEN / BLOCK_SIZE);
        assert_eq!(
            sum.release_calls, 1,
            "adjacent emptied blocks merge into one call"
        );
        *swept.lock().unwrap() = (before, status_kb("VmPTE"));
    });
    let (before, after) = *swept.lock().unwrap();
    assert!(
        before - after >= PTE_KB * 9 / 10,
        "Off + reclaim sweep: VmPTE {before} -> {after} kB"
    );
}
