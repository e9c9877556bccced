//! The table bytes reported are the memory the tables really hold: each
//! table costs one resident 4 KiB page, and a freed table's page goes back
//! to the host once the epoch has passed.
#![cfg(not(loom))]

use guest_mm::tables::{TABLE_BYTES, arena_stats};
use guest_mm::{BLOCK_SIZE, GpaRange, PageSize, Strategy, Tables};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS line");
    kb * 1024
}

/// Lets the epoch advance so that retired tables are really freed.
fn collect_garbage() {
    for _ in 0..1024 {
        crossbeam_epoch::pin().flush();
    }
}

#[test]
fn table_bytes_match_resident_memory() {
    const BLOCKS: u64 = 4096; // 8 GiB of guest space, one page per block
    let t = Tables::new(Strategy::Scan);
    let live0 = arena_stats().live_pages;
    let rss0 = rss_bytes();
    for b in 0..BLOCKS {
        t.populate(b * BLOCK_SIZE, 0, PageSize::Size4K).unwrap();
    }
    let rss1 = rss_bytes();
    let st = t.stats();
    let grew = rss1.saturating_sub(rss0);
    // 4096 PTs + 8 PDs + 1 PDPT created here (the root existed before).
    let created = (BLOCKS + 8 + 1) * TABLE_BYTES;
    assert_eq!(st.table_bytes, created + TABLE_BYTES);
    assert_eq!(arena_stats().live_pages - live0, BLOCKS + 9);
    // Metadata header pages: 3 per 2 MiB slab of 509 tables; allow 5% more.
    println!(
        "populated: table bytes {} kB, RSS grew {} kB",
        created / 1024,
        grew / 1024
    );
    assert!(grew >= created, "RSS grew {grew}, tables {created}");
    assert!(
        grew <= created + created / 20,
        "RSS grew {grew}, tables {created}"
    );

    let d = t
        .discard(GpaRange::new(0, BLOCKS * BLOCK_SIZE).unwrap())
        .unwrap();
    assert_eq!(d.tables_freed, [BLOCKS, 8, 1, 0]);
    collect_garbage();
    let rss2 = rss_bytes();
    let shrank = rss1.saturating_sub(rss2);
    println!("discarded: RSS shrank {} kB", shrank / 1024);
    let arena = arena_stats();
    assert_eq!(arena.live_pages, live0);
    // All freed pages but the small reuse cache went back to the host.
    let cached = arena.cached_pages * TABLE_BYTES;
    assert!(cached <= guest_mm::tables::CACHE_PAGES as u64 * TABLE_BYTES);
    assert!(
        shrank + cached >= created - created / 20,
        "RSS shrank {shrank}, tables freed {created}"
    );
}
