//! Multi-threaded stress: populating, discarding, sweeping and lookup
//! threads on overlapping ranges, in bounded rounds. After every round the
//! threads are joined (quiescent) and the invariants are checked:
//!
//! * no lost leaf: every page a populater was told `Installed` is present,
//!   unless a discard covering it ran at any time since the populate began;
//! * every leaf seen maps the offset its populater chose;
//! * no leak: counters equal a recount, the audit passes, and (Scan and
//!   Count) no empty table remains and table bytes equal the minimum.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use guest_mm::{BLOCK_SIZE, GpaRange, PAGE_SIZE, PageSize, Populate, Strategy, Tables};

/// Two PDs worth of blocks in one PDPT, and two blocks in a second PDPT.
const WINDOW: [(u64, u64); 2] = [(0, 4), ((1 << 39) + (1 << 30), 2)];
const ROUNDS: u32 = 4;
const ROUND_TIME: Duration = Duration::from_millis(200);
/// Host offset = gpa + OFFSET, for 4K and 2M leaves alike.
const OFFSET: u64 = 64 * BLOCK_SIZE;

fn window_pages() -> u64 {
    WINDOW
        .iter()
        .map(|&(_, b)| b * BLOCK_SIZE / PAGE_SIZE)
        .sum()
}

/// Maps a page number in the window to its guest-physical address.
fn page_gpa(mut n: u64) -> u64 {
    for &(base, blocks) in &WINDOW {
        let pages = blocks * BLOCK_SIZE / PAGE_SIZE;
        if n < pages {
            return base + n * PAGE_SIZE;
        }
        n -= pages;
    }
    unreachable!("page number inside the window")
}

/// Page number of a gpa inside the window.
fn page_no(gpa: u64) -> usize {
    let mut n = 0;
    for &(base, blocks) in &WINDOW {
        let len = blocks * BLOCK_SIZE;
        if gpa >= base && gpa < base + len {
            return (n + (gpa - base) / PAGE_SIZE) as usize;
        }
        n += len / PAGE_SIZE;
    }
    unreachable!("gpa inside the window")
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Per-page discard generations: a discard bumps every page it covers once
/// before it starts and once after it returns.
struct Gens(Vec<AtomicU64>);

impl Gens {
    fn bump(&self, r: GpaRange) {
        let mut g = r.start();
        while g < r.end() {
            self.0[page_no(g)].fetch_add(1, Ordering::SeqCst);
            g += PAGE_SIZE;
        }
    }
    fn get(&self, gpa: u64) -> u64 {
        self.0[page_no(gpa)].load(Ordering::SeqCst)
    }
}

/// A random range inside one window region, up to `max_pages` long.
fn random_range(rng: &mut Rng, max_pages: u64) -> GpaRange {
    let (base, blocks) = WINDOW[rng.below(WINDOW.len() as u64) as usize];
    let pages = blocks * BLOCK_SIZE / PAGE_SIZE;
    let start = rng.below(pages);
    let len = 1 + rng.below(max_pages.min(pages - start));
    GpaRange::new(base + start * PAGE_SIZE, len * PAGE_SIZE).unwrap()
}

fn stress(strategy: Strategy) {
    let t = Tables::new(strategy);
    let gens = Gens((0..window_pages()).map(|_| AtomicU64::new(0)).collect());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ strategy as u64;
    for round in 0..ROUNDS {
        let stop = AtomicBool::new(false);
        let deadline = Instant::now() + ROUND_TIME;
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let (promised, lookups) = std::thread::scope(|s| {
            let populaters: Vec<_> = (0..2u64)
                .map(|id| {
                    let (t, gens, stop) = (&t, &gens, &stop);
                    s.spawn(move || {
                        let mut rng = Rng(seed ^ ((id + 1) * 0x1234_5678_9abc));
                        let mut promised = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            let gpa = page_gpa(rng.below(window_pages()));
                            if rng.below(64) == 0 {
                                let block = gpa & !(BLOCK_SIZE - 1);
                                let before: Vec<u64> =
                                    (0..512).map(|p| gens.get(block + p * PAGE_SIZE)).collect();
                                let r = t.populate(block, block + OFFSET, PageSize::Size2M);
                                if let Ok(Populate::Installed) = r {
                                    for (p, g) in before.into_iter().enumerate() {
                                        promised.push((block + p as u64 * PAGE_SIZE, g));
                                    }
                                }
                                continue;
                            }
                            let before = gens.get(gpa);
                            match t.populate(gpa, gpa + OFFSET, PageSize::Size4K).unwrap() {
                                Populate::Installed => promised.push((gpa, before)),
                                Populate::Present(l) => {
                                    assert_eq!(l.host_offset, gpa + OFFSET, "gpa {gpa:#x}")
                                }
                            }
                        }
                        promised
                    })
                })
                .collect();
            let discarder = {
                let (t, gens, stop) = (&t, &gens, &stop);
                s.spawn(move || {
                    let mut rng = Rng(seed ^ 0xdead_beef);
                    while !stop.load(Ordering::Relaxed) {
                        let max = if rng.below(16) == 0 { 1024 } else { 8 };
                        let r = random_range(&mut rng, max);
                        gens.bump(r);
                        let d = t.discard(r).unwrap();
                        gens.bump(r);
                        for c in &d.cleared {
                            assert!(r.covers(c), "cleared {c:?} outside {r:?}");
                        }
                    }
                })
            };
            let sweeper = {
                let (t, stop) = (&t, &stop);
                s.spawn(move || {
                    let mut rng = Rng(seed ^ 0x5eed);
                    while !stop.load(Ordering::Relaxed) {
                        let r = random_range(&mut rng, 2048);
                        t.reclaim(r).unwrap();
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
            };
            let looker = {
                let (t, stop) = (&t, &stop);
                s.spawn(move || {
                    let mut rng = Rng(seed ^ 0x100c);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let gpa = page_gpa(rng.below(window_pages()));
                        if let Some(l) = t.lookup(gpa) {
                            assert_eq!(l.host_offset, gpa + OFFSET, "lookup {gpa:#x}");
                        }
                        n += 1;
                    }
                    n
                })
            };
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
            let promised: Vec<(u64, u64)> = populaters
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect();
            discarder.join().unwrap();
            sweeper.join().unwrap();
            (promised, looker.join().unwrap())
        });
        // Quiescent: check the invariants.
        let mut kept = 0;
        for &(gpa, before) in &promised {
            if gens.get(gpa) == before {
                let l = t
                    .lookup(gpa)
                    .unwrap_or_else(|| panic!("lost leaf at {gpa:#x}"));
                assert_eq!(l.host_offset, gpa + OFFSET);
                kept += 1;
            }
        }
        let st = t.stats();
        assert_eq!(st, t.recount(), "round {round}");
        t.audit().unwrap();
        let whole = GpaRange::new(0, guest_mm::range::GPA_LIMIT).unwrap();
        if strategy == Strategy::Off {
            assert!(st.table_bytes >= t.min_table_bytes());
            t.reclaim(whole).unwrap();
        }
        assert_eq!(t.empty_tables(whole), 0, "round {round}");
        assert_eq!(t.stats().table_bytes, t.min_table_bytes(), "round {round}");
        assert_eq!(t.stats(), t.recount());
        assert!(promised.len() > 100, "populaters made progress");
        assert!(lookups > 100, "lookups made progress");
        eprintln!(
            "{strategy:?} round {round}: {} installs promised, {kept} checked present, \
             {lookups} lookups, freed fast {} slow {} sweep {}, splits {}",
            promised.len(),
            st.freed_fast,
            st.freed_slow,
            st.freed_sweep,
            st.splits
        );
    }
}

#[test]
fn stress_off() {
    stress(Strategy::Off);
}

#[test]
fn stress_scan() {
    stress(Strategy::Scan);
}

#[test]
fn stress_count() {
    stress(Strategy::Count);
}
