//! Handler threads + toucher threads + a discarding thread, all at once. After each round,
//! once everything is quiet, the leaves must be exactly the pages present in the host
//! (mincore): no phantom leaf, no lost leaf; stats must equal a recount of the tables.

mod manager_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use guest_mm::backing::ReleaseMode;
use guest_mm::manager::{BackingSpec, FaultConfig, FillMode, GuestMm, RegionSpec, gpa_range};
use guest_mm::{BLOCK_SIZE, GpaRange, PAGE_SIZE, Strategy};
use manager_common::{MIB, Rng, assert_exact, read, write};

const LEN: u64 = 16 * MIB;
const PAGES: u64 = LEN / PAGE_SIZE;
const MIN_TOUCHES: u64 = 5000;
const MIN_DISCARDS: u64 = 50;

fn round(strategy: Strategy, release: ReleaseMode, backing: BackingSpec, fa: u32, seed: u64) {
    let layout = [RegionSpec {
        gpa: 0,
        len: LEN,
        backing,
    }];
    let faults = FaultConfig {
        handler_threads: 3,
        fault_around_pages: fa,
        fill: if seed.is_multiple_of(2) {
            FillMode::ZeropageForReads
        } else {
            FillMode::AlwaysCopy
        },
        thread_start: None,
    };
    let mm = Arc::new(GuestMm::new(&layout, strategy, release, faults).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let touches = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for t in 0..3u64 {
        let (mm, stop, touches) = (mm.clone(), stop.clone(), touches.clone());
        hs.push(thread::spawn(move || {
            let mut rng = Rng(seed * 31 + t + 1);
            while !stop.load(Ordering::Relaxed) {
                // Touch a short run so that neighbours (and fault-around windows) interleave.
                let start = rng.below(PAGES - 8);
                for p in start..start + 1 + rng.below(8) {
                    let gpa = p * PAGE_SIZE;
                    if rng.below(2) == 0 {
                        write(&mm, gpa, gpa);
                    } else {
                        let v = read(&mm, gpa);
                        assert!(v == 0 || v == gpa, "gpa {gpa:#x} holds {v:#x}");
                    }
                    touches.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let discards_done = Arc::new(AtomicU64::new(0));
    let discarder = {
        let (mm, stop, done) = (mm.clone(), stop.clone(), discards_done.clone());
        thread::spawn(move || {
            let mut rng = Rng(seed * 77 + 5);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match rng.below(4) {
                    0 => {
                        // A whole aligned block.
                        let b = rng.below(LEN / BLOCK_SIZE) * BLOCK_SIZE;
                        mm.discard(gpa_range(b, BLOCK_SIZE).unwrap()).unwrap();
                    }
                    1 => {
                        // A balloon-like batch of scattered pages.
                        let batch: Vec<GpaRange> = (0..256)
                            .map(|_| gpa_range(rng.below(PAGES) * PAGE_SIZE, PAGE_SIZE).unwrap())
                            .collect();
                        mm.discard_many(&batch).unwrap();
                    }
                    2 => {
                        let s = rng.below(PAGES - 1024);
                        let l = 1 + rng.below(1024);
                        mm.discard(gpa_range(s * PAGE_SIZE, l * PAGE_SIZE).unwrap())
                            .unwrap();
                    }
                    _ => {
                        let b = rng.below(LEN / BLOCK_SIZE) * BLOCK_SIZE;
                        mm.reclaim(gpa_range(b, (2 * BLOCK_SIZE).min(LEN - b)).unwrap())
                            .unwrap();
                    }
                }
                n += 1;
                done.store(n, Ordering::Relaxed);
            }
            n
        })
    };
    // At least 0.7 s, and until enough of both happened (faults can wait behind a discarder
    // that never pauses, so on a loaded machine this takes longer), but at most 20 s.
    let t0 = Instant::now();
    thread::sleep(Duration::from_millis(700));
    while (touches.load(Ordering::Relaxed) < MIN_TOUCHES
        || discards_done.load(Ordering::Relaxed) < MIN_DISCARDS)
        && t0.elapsed() < Duration::from_secs(20)
    {
        thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    let discards = discarder.join().unwrap();
    let all = gpa_range(0, LEN).unwrap();
    let present = assert_exact(&mm, all);
    let st = mm.stats();
    assert_eq!(
        st.tables,
        mm.tables().recount(),
        "stats equal a recount once quiet"
    );
    assert_eq!(st.tables.leaves_4k + 512 * st.tables.leaves_2m, present);
    assert_eq!(st.foreign_remove_events, 0);
    assert_eq!(st.fault_errors + st.table_errors, 0);
    let touched = touches.load(Ordering::Relaxed);
    assert!(
        discards >= MIN_DISCARDS && touched >= MIN_TOUCHES,
        "too little happened in 20 s: {touched} touches, {discards} discards"
    );
    if release == ReleaseMode::DontNeed && strategy != Strategy::Off {
        // After discarding everything, no table is left but the root (and nothing is present).
        mm.discard(all).unwrap();
        assert_eq!(assert_exact(&mm, all), 0);
        assert_eq!(mm.stats().tables.tables[..3], [0, 0, 0]);
    }
    eprintln!(
        "{strategy:?}/{release}/fa{fa}: {} touches, {discards} discards, {} deferred, {} eagain, {} eexist",
        touches.load(Ordering::Relaxed),
        st.deferred_discarding,
        st.eagain,
        st.eexist
    );
}

#[test]
fn leaves_match_host_pages_under_concurrency() {
    let t0 = Instant::now();
    let anon = || BackingSpec::Anonymous { thp: false };
    for (i, strategy) in [Strategy::Off, Strategy::Scan, Strategy::Count]
        .into_iter()
        .enumerate()
    {
        round(strategy, ReleaseMode::DontNeed, anon(), 1, i as u64);
        round(strategy, ReleaseMode::DontNeed, anon(), 16, 10 + i as u64);
    }
    let memfd = || BackingSpec::Memfd {
        name: "ebb-concurrent".into(),
        huge: false,
    };
    round(Strategy::Scan, ReleaseMode::Remove, memfd(), 1, 20);
    round(Strategy::Count, ReleaseMode::PunchHole, memfd(), 16, 21);
    // Block fills (2 MiB leaves) racing 4 KiB fills, splits and discards.
    let huge = || BackingSpec::Memfd {
        name: "ebb-concurrent-huge".into(),
        huge: true,
    };
    round(Strategy::Count, ReleaseMode::PunchHole, huge(), 1, 22);
    round(Strategy::Scan, ReleaseMode::Remove, huge(), 16, 23);
    round(Strategy::Count, ReleaseMode::PunchHole, huge(), 2048, 24);
    assert!(t0.elapsed() < Duration::from_secs(200));
}
