//! Loom model of the reclaim protocol on one PT table and its parent.
//!
//! Under `cfg(loom)` tables have two entries (see `range::LEVEL_BITS`), so
//! a PT maps two pages and a PD two PTs; the protocol code is the real one.
//! Run with:
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p guest-mm --release --test loom_reclaim`
#![cfg(loom)]

use guest_mm::{BLOCK_SIZE, GpaRange, PAGE_SIZE, PageSize, Populate, Strategy, Tables};
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::{AtomicU64, Ordering};

/// Executions explored, and executions that ended with a table freed by the
/// slow path (plain std atomics: they count across loom executions).
static EXECUTIONS: AtomicU64 = AtomicU64::new(0);
static SLOW_FREES: AtomicU64 = AtomicU64::new(0);

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

fn off(gpa: u64) -> u64 {
    gpa + 0x10_0000
}

/// Invariants once every thread has joined.
fn quiescent(t: &Tables, strategy: Strategy) {
    EXECUTIONS.fetch_add(1, Ordering::Relaxed);
    if t.stats().freed_slow > 0 {
        SLOW_FREES.fetch_add(1, Ordering::Relaxed);
    }
    assert_eq!(t.stats(), t.recount());
    t.audit().unwrap();
    assert_eq!(
        t.graveyard_leaks(),
        0,
        "a leaf was written into a freed table"
    );
    if strategy != Strategy::Off {
        let all = GpaRange::new(0, guest_mm::range::GPA_LIMIT).unwrap();
        assert_eq!(t.empty_tables(all), 0);
        assert_eq!(t.stats().table_bytes, t.min_table_bytes());
    }
}

/// Discard empties the PT (and frees it) while a populate targets the same
/// PT and a lookup walks it.
fn populate_vs_discard_same_pt(strategy: Strategy) {
    model(move || {
        assert_eq!(BLOCK_SIZE, 2 * PAGE_SIZE, "loom geometry");
        let t = Arc::new(Tables::new(strategy));
        t.populate(0, off(0), PageSize::Size4K).unwrap();
        let t1 = t.clone();
        let discarder = thread::spawn(move || {
            let d = t1.discard(GpaRange::new(0, PAGE_SIZE).unwrap()).unwrap();
            assert_eq!(d.pages_cleared, 1);
        });
        let t2 = t.clone();
        let populater = thread::spawn(move || {
            let r = t2.populate(PAGE_SIZE, off(PAGE_SIZE), PageSize::Size4K);
            assert_eq!(r.unwrap(), Populate::Installed);
        });
        if let Some(l) = t.lookup(PAGE_SIZE) {
            assert_eq!(l.host_offset, off(PAGE_SIZE));
        }
        if let Some(l) = t.lookup(0) {
            assert_eq!(l.host_offset, off(0));
        }
        discarder.join().unwrap();
        populater.join().unwrap();
        assert_eq!(t.lookup(0), None);
        assert_eq!(t.lookup(PAGE_SIZE).unwrap().host_offset, off(PAGE_SIZE));
        quiescent(&t, strategy);
    });
}

/// The populate installs a sibling PT into the same PD, so the discard's
/// try-lock of the PD can fail and the slow path runs.
fn populate_sibling_vs_discard(strategy: Strategy) {
    let slow_before = SLOW_FREES.load(Ordering::Relaxed);
    model(move || {
        let t = Arc::new(Tables::new(strategy));
        t.populate(0, off(0), PageSize::Size4K).unwrap();
        let t1 = t.clone();
        let discarder = thread::spawn(move || {
            t1.discard(GpaRange::new(0, PAGE_SIZE).unwrap()).unwrap();
        });
        let t2 = t.clone();
        let populater = thread::spawn(move || {
            let r = t2.populate(BLOCK_SIZE, off(BLOCK_SIZE), PageSize::Size4K);
            assert_eq!(r.unwrap(), Populate::Installed);
        });
        if let Some(l) = t.lookup(BLOCK_SIZE) {
            assert_eq!(l.host_offset, off(BLOCK_SIZE));
        }
        discarder.join().unwrap();
        populater.join().unwrap();
        assert_eq!(t.lookup(0), None);
        assert_eq!(t.lookup(BLOCK_SIZE).unwrap().host_offset, off(BLOCK_SIZE));
        quiescent(&t, strategy);
    });
    // The model must have reached the slow path, or it proves little.
    assert!(SLOW_FREES.load(Ordering::Relaxed) > slow_before);
    eprintln!(
        "{strategy:?}: {} executions so far, {} with a slow-path free",
        EXECUTIONS.load(Ordering::Relaxed),
        SLOW_FREES.load(Ordering::Relaxed)
    );
}

/// Two discards each clear one of the PT's two leaves; exactly one of them
/// frees the PT, neither frees it twice.
fn two_discards_race_to_free(strategy: Strategy) {
    model(move || {
        let t = Arc::new(Tables::new(strategy));
        t.populate(0, off(0), PageSize::Size4K).unwrap();
        t.populate(PAGE_SIZE, off(PAGE_SIZE), PageSize::Size4K)
            .unwrap();
        let handles: Vec<_> = [0, PAGE_SIZE]
            .into_iter()
            .map(|gpa| {
                let t = t.clone();
                thread::spawn(move || {
                    t.discard(GpaRange::new(gpa, PAGE_SIZE).unwrap())
                        .unwrap()
                        .tables_freed[0]
                })
            })
            .collect();
        let freed: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(freed, 1);
        assert_eq!(t.stats().tables, [0, 0, 0, 1]);
        quiescent(&t, strategy);
    });
}

/// A large (two-page, in the loom geometry) leaf is split by one partial
/// discard while another discard clears the other half and a lookup reads
/// it: the lookup sees the old offset or nothing, and the tree ends empty.
fn split_vs_discard(strategy: Strategy) {
    model(move || {
        let t = Arc::new(Tables::new(strategy));
        t.populate(0, off(0) & !(BLOCK_SIZE - 1), PageSize::Size2M)
            .unwrap();
        let base = off(0) & !(BLOCK_SIZE - 1);
        let handles: Vec<_> = [0, PAGE_SIZE]
            .into_iter()
            .map(|gpa| {
                let t = t.clone();
                thread::spawn(move || {
                    let d = t.discard(GpaRange::new(gpa, PAGE_SIZE).unwrap()).unwrap();
                    assert_eq!(d.pages_cleared, 1);
                })
            })
            .collect();
        if let Some(l) = t.lookup(PAGE_SIZE) {
            assert_eq!(l.host_offset, base + PAGE_SIZE);
        }
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(t.lookup(0), None);
        assert_eq!(t.lookup(PAGE_SIZE), None);
        assert_eq!(t.stats().splits, 1);
        quiescent(&t, strategy);
    });
}

/// The explicit sweep runs while a populate builds a new path of tables:
/// the sweep may free a table the populate just installed (still empty),
/// and the populate must then walk again instead of using it.
fn sweep_vs_populate(strategy: Strategy) {
    model(move || {
        let t = Arc::new(Tables::new(strategy));
        let t1 = t.clone();
        let sweeper = thread::spawn(move || {
            let all = GpaRange::new(0, guest_mm::range::GPA_LIMIT).unwrap();
            t1.reclaim(all).unwrap();
        });
        let r = t.populate(PAGE_SIZE, off(PAGE_SIZE), PageSize::Size4K);
        assert_eq!(r.unwrap(), Populate::Installed);
        sweeper.join().unwrap();
        assert_eq!(t.lookup(PAGE_SIZE).unwrap().host_offset, off(PAGE_SIZE));
        quiescent(&t, strategy);
    });
}

#[test]
fn scan_split_vs_discard() {
    split_vs_discard(Strategy::Scan);
}

#[test]
fn count_split_vs_discard() {
    split_vs_discard(Strategy::Count);
}

#[test]
fn off_sweep_vs_populate() {
    sweep_vs_populate(Strategy::Off);
}

#[test]
fn scan_sweep_vs_populate() {
    sweep_vs_populate(Strategy::Scan);
}

#[test]
fn scan_populate_vs_discard_same_pt() {
    populate_vs_discard_same_pt(Strategy::Scan);
}

#[test]
fn count_populate_vs_discard_same_pt() {
    populate_vs_discard_same_pt(Strategy::Count);
}

#[test]
fn scan_populate_sibling_vs_discard() {
    populate_sibling_vs_discard(Strategy::Scan);
}

#[test]
fn count_populate_sibling_vs_discard() {
    populate_sibling_vs_discard(Strategy::Count);
}

#[test]
fn scan_two_discards_race_to_free() {
    two_discards_race_to_free(Strategy::Scan);
}

#[test]
fn count_two_discards_race_to_free() {
    two_discards_race_to_free(Strategy::Count);
}
