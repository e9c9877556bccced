//! Plain measurements of the tables behind the summary table in
//! `docs/DESIGN-guest-mm.md`. Shared by the criterion bench (`tables.rs`)
//! and the smoke test (`tests/tables_bench_smoke.rs`).

use std::sync::Barrier;
use std::time::{Duration, Instant};

use guest_mm::{BLOCK_SIZE, GpaRange, PAGE_SIZE, PageSize, Populate, Strategy, Tables};

/// All strategies, in report order.
pub const STRATEGIES: [Strategy; 3] = [Strategy::Off, Strategy::Scan, Strategy::Count];

const BASE: u64 = 1 << 32;
const PAGES_PER_BLOCK: u64 = BLOCK_SIZE / PAGE_SIZE;

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Pages populated for the populate, lookup and discard columns.
    pub pages: u64,
    /// Lookups timed.
    pub lookups: u64,
    /// Pages discarded one by one in random order.
    pub scattered_pages: u64,
    /// 2 MiB blocks in the seeds' workload (25 * 1024 for 50 GiB).
    pub seed_blocks: u64,
    /// Interleaved rounds; medians are reported.
    pub rounds: usize,
    /// Rounds of the side-by-side fault-path cost measurement.
    pub fault_rounds: usize,
}

impl Config {
    /// The full run.
    pub fn full() -> Self {
        Self {
            pages: 128 * PAGES_PER_BLOCK,
            lookups: 1 << 20,
            scattered_pages: 32 * PAGES_PER_BLOCK,
            seed_blocks: 25 * 1024,
            rounds: 7,
            fault_rounds: 101,
        }
    }

    /// A few-second smoke run.
    pub fn quick() -> Self {
        Self {
            pages: 8 * PAGES_PER_BLOCK,
            lookups: 1 << 14,
            scattered_pages: 2 * PAGES_PER_BLOCK,
            seed_blocks: 256,
            rounds: 3,
            fault_rounds: 5,
        }
    }

    /// `quick()` if `EBB_BENCH_QUICK` is set or `--quick` was passed.
    pub fn from_env() -> Self {
        let quick = std::env::var_os("EBB_BENCH_QUICK").is_some()
            || std::env::args().any(|a| a == "--quick");
        if quick { Self::quick() } else { Self::full() }
    }
}

/// Per-strategy timings (medians over rounds), in nanoseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Populate, one thread, per page.
    pub populate_1t: f64,
    /// Populate, two threads on disjoint blocks, wall time per page.
    pub populate_2t: f64,
    /// Populate, two threads: CPU time per page (both threads summed).
    pub populate_2t_cpu: f64,
    /// One lookup.
    pub lookup: f64,
    /// Discard in 2 MiB pieces (plus the `reclaim` sweep for Off), per page.
    pub discard_2m: f64,
    /// Discard of single 4 KiB pages in random order, per page.
    pub discard_4k: f64,
}

/// The seeds' workload result for one strategy.
#[derive(Debug, Clone, Copy)]
pub struct SeedResult {
    /// Table bytes at the end.
    pub table_bytes: u64,
    /// Minimum table bytes for the leaves left (none: the root).
    pub min_bytes: u64,
    /// Populate time inside the loop, per page (median over rounds).
    pub populate_ns: f64,
    /// Whole loop time per block (median over rounds).
    pub block_ns: f64,
}

/// Side-by-side populate cost per strategy, nanoseconds per page.
#[derive(Debug, Clone, Copy)]
pub struct FaultCost {
    /// Fastest round.
    pub min: f64,
    /// Median round.
    pub median: f64,
}

/// Everything the summary prints.
#[derive(Debug, Clone)]
pub struct Report {
    /// The configuration used.
    pub config: Config,
    /// One entry per strategy, in [`STRATEGIES`] order.
    pub timings: Vec<Timings>,
    /// One entry per strategy, in [`STRATEGIES`] order.
    pub seeds: Vec<SeedResult>,
    /// One entry per strategy, in [`STRATEGIES`] order.
    pub fault: Vec<FaultCost>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut rng = Rng(seed | 1);
    for i in (1..v.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn per(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n as f64
}

fn populate_range(t: &Tables, first_page: u64, pages: u64) {
    for p in first_page..first_page + pages {
        let gpa = BASE + p * PAGE_SIZE;
        let r = t.populate(gpa, gpa, PageSize::Size4K);
        assert!(matches!(r, Ok(Populate::Installed)), "{r:?}");
    }
}

/// Populate with one thread: ns per page.
pub fn populate_1t(s: Strategy, pages: u64) -> f64 {
    let t = Tables::new(s);
    let start = Instant::now();
    populate_range(&t, 0, pages);
    per(start.elapsed(), pages)
}

/// CPU time consumed by the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a
    // constant the kernel supports for every thread.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Populate with two threads on disjoint halves: (wall ns per page, CPU ns
/// per page summed over both threads). The CPU figure shows the cost of
/// sharing the tree; the wall figure also depends on how many cores the
/// machine could give the two threads.
pub fn populate_2t(s: Strategy, pages: u64) -> (f64, f64) {
    let t = Tables::new(s);
    let half = pages / 2;
    let barrier = Barrier::new(2);
    // Each worker times itself: wall = last end - first start, so a late
    // wake-up of any other thread does not distort the figure.
    let spans: Vec<(Instant, Instant, Duration)> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..2)
            .map(|i| {
                let (t, barrier) = (&t, &barrier);
                sc.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    let cpu = thread_cpu();
                    populate_range(t, i * half, half);
                    (start, Instant::now(), thread_cpu() - cpu)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let first = spans.iter().map(|s| s.0).min().unwrap();
    let last = spans.iter().map(|s| s.1).max().unwrap();
    let cpu: Duration = spans.iter().map(|s| s.2).sum();
    (per(last - first, 2 * half), per(cpu, 2 * half))
}

/// Lookup of random populated pages: ns per lookup.
pub fn lookup(s: Strategy, pages: u64, lookups: u64) -> f64 {
    let t = Tables::new(s);
    populate_range(&t, 0, pages);
    let mut rng = Rng(0x1234_5678);
    let gpas: Vec<u64> = (0..lookups.min(1 << 16))
        .map(|_| BASE + (rng.next() % pages) * PAGE_SIZE)
        .collect();
    let mut found = 0u64;
    let start = Instant::now();
    for i in 0..lookups {
        let gpa = gpas[(i as usize) % gpas.len()];
        found += u64::from(std::hint::black_box(t.lookup(gpa)).is_some());
    }
    let ns = per(start.elapsed(), lookups);
    assert_eq!(found, lookups);
    ns
}

/// Discard in 2 MiB pieces (Off: followed by the reclaim sweep): ns per page.
pub fn discard_2m(s: Strategy, pages: u64) -> f64 {
    let t = Tables::new(s);
    populate_range(&t, 0, pages);
    let start = Instant::now();
    for b in 0..pages / PAGES_PER_BLOCK {
        let r = GpaRange::new(BASE + b * BLOCK_SIZE, BLOCK_SIZE).unwrap();
        t.discard(r).unwrap();
        if s == Strategy::Off {
            t.reclaim(r).unwrap();
        }
    }
    let ns = per(start.elapsed(), pages);
    assert_eq!(t.stats().leaves_4k, 0);
    ns
}

/// Discard single pages in random order (the balloon pattern): ns per page.
pub fn discard_4k(s: Strategy, pages: u64) -> f64 {
    let t = Tables::new(s);
    populate_range(&t, 0, pages);
    let order = shuffled(pages, 0xfeed);
    let start = Instant::now();
    for p in order {
        let r = GpaRange::new(BASE + p * PAGE_SIZE, PAGE_SIZE).unwrap();
        t.discard(r).unwrap();
    }
    let ns = per(start.elapsed(), pages);
    if s != Strategy::Off {
        assert_eq!(t.stats().table_bytes, t.min_table_bytes());
    }
    ns
}

/// The seeds' workload: for every 2 MiB block of the space, populate its
/// 512 pages, then discard the block. Returns (table bytes, min bytes,
/// populate ns/page, loop ns/block).
pub fn seed_workload(s: Strategy, blocks: u64) -> (u64, u64, f64, f64) {
    let t = Tables::new(s);
    let mut populate = Duration::ZERO;
    let start = Instant::now();
    for b in 0..blocks {
        let base = b * BLOCK_SIZE;
        let p0 = Instant::now();
        for p in 0..PAGES_PER_BLOCK {
            let gpa = base + p * PAGE_SIZE;
            let r = t.populate(gpa, gpa, PageSize::Size4K);
            debug_assert!(matches!(r, Ok(Populate::Installed)));
            std::hint::black_box(r).ok();
        }
        populate += p0.elapsed();
        t.discard(GpaRange::new(base, BLOCK_SIZE).unwrap()).unwrap();
    }
    let total = start.elapsed();
    let st = t.stats();
    assert_eq!(st, t.recount());
    (
        st.table_bytes,
        t.min_table_bytes(),
        per(populate, blocks * PAGES_PER_BLOCK),
        per(total, blocks),
    )
}

/// The fault-path cost of reclaim: populate throughput into fresh space,
/// each strategy timed right after the others in every round (order
/// rotating), many short rounds, so that machine noise hits all alike.
pub fn fault_cost(pages: u64, rounds: usize) -> Vec<FaultCost> {
    let n = STRATEGIES.len();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); n];
    for round in 0..rounds {
        for k in 0..n {
            let i = (k + round) % n;
            samples[i].push(populate_1t(STRATEGIES[i], pages));
        }
    }
    samples
        .into_iter()
        .map(|v| FaultCost {
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            median: median(v),
        })
        .collect()
}

/// Runs everything, interleaving the strategies inside each round (rotating
/// their order) so that they are measured side by side under the same load.
pub fn run(config: Config) -> Report {
    let n = STRATEGIES.len();
    let mut cols: Vec<[Vec<f64>; 6]> = (0..n).map(|_| Default::default()).collect();
    let mut seed_pop: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut seed_block: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut seed_bytes = vec![(0u64, 0u64); n];
    for round in 0..config.rounds {
        for k in 0..n {
            let i = (k + round) % n;
            let s = STRATEGIES[i];
            cols[i][0].push(populate_1t(s, config.pages));
            let (wall, cpu) = populate_2t(s, config.pages);
            cols[i][1].push(wall);
            cols[i][5].push(cpu);
            cols[i][2].push(lookup(s, config.pages, config.lookups));
            cols[i][3].push(discard_2m(s, config.pages));
            cols[i][4].push(discard_4k(s, config.scattered_pages));
            let (bytes, min, pop, block) = seed_workload(s, config.seed_blocks);
            seed_bytes[i] = (bytes, min);
            seed_pop[i].push(pop);
            seed_block[i].push(block);
        }
    }
    let timings = cols
        .into_iter()
        .map(|[a, b, c, d, e, f]| Timings {
            populate_1t: median(a),
            populate_2t: median(b),
            populate_2t_cpu: median(f),
            lookup: median(c),
            discard_2m: median(d),
            discard_4k: median(e),
        })
        .collect();
    let seeds = (0..n)
        .map(|i| SeedResult {
            table_bytes: seed_bytes[i].0,
            min_bytes: seed_bytes[i].1,
            populate_ns: median(std::mem::take(&mut seed_pop[i])),
            block_ns: median(std::mem::take(&mut seed_block[i])),
        })
        .collect();
    let fault = fault_cost(config.pages / 4, config.fault_rounds);
    Report {
        config,
        timings,
        seeds,
        fault,
    }
}

/// Formats the report as the markdown tables used in the design doc.
pub fn format(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let c = r.config;
    let _ = writeln!(
        s,
        "tables: {} pages ({} MiB) per column, {} lookups, {} scattered pages, \
         seeds' workload {} blocks ({} GiB), medians of {} interleaved rounds\n",
        c.pages,
        (c.pages * PAGE_SIZE) >> 20,
        c.lookups,
        c.scattered_pages,
        c.seed_blocks,
        (c.seed_blocks * BLOCK_SIZE) >> 30,
        c.rounds
    );
    let _ = writeln!(
        s,
        "| strategy | populate 1T ns/page | populate 2T wall ns/page | populate 2T CPU ns/page | \
         lookup ns | discard 2M (+sweep for Off) ns/page | discard 4K scattered ns/page |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    for (st, t) in STRATEGIES.iter().zip(&r.timings) {
        let _ = writeln!(
            s,
            "| {st:?} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            t.populate_1t, t.populate_2t, t.populate_2t_cpu, t.lookup, t.discard_2m, t.discard_4k
        );
    }
    let _ = writeln!(
        s,
        "\n| strategy | table bytes at end | kB | minimum | ratio | populate ns/page in loop | \
         vs Off | loop ns/block |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let off_pop = r.seeds[0].populate_ns;
    for (st, x) in STRATEGIES.iter().zip(&r.seeds) {
        let _ = writeln!(
            s,
            "| {st:?} | {} | {} | {} | {:.2} | {:.1} | {:+.1}% | {:.0} |",
            x.table_bytes,
            x.table_bytes / 1024,
            x.min_bytes,
            x.table_bytes as f64 / x.min_bytes as f64,
            x.populate_ns,
            (x.populate_ns / off_pop - 1.0) * 100.0,
            x.block_ns
        );
    }
    let _ = writeln!(
        s,
        "\nfault-path cost, populate of {} fresh pages, {} interleaved rounds:\n",
        c.pages / 4,
        c.fault_rounds
    );
    let _ = writeln!(
        s,
        "| strategy | min ns/page | vs Off | median ns/page | vs Off |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    let off = r.fault[0];
    for (st, f) in STRATEGIES.iter().zip(&r.fault) {
        let _ = writeln!(
            s,
            "| {st:?} | {:.2} | {:+.1}% | {:.2} | {:+.1}% |",
            f.min,
            (f.min / off.min - 1.0) * 100.0,
            f.median,
            (f.median / off.median - 1.0) * 100.0
        );
    }
    s
}
