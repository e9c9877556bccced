//! Table benchmarks: criterion groups for populate, lookup and discard per
//! strategy, then a plain summary (the table in `docs/DESIGN-guest-mm.md`),
//! including the seeds' 50 GiB workload and the fault-path cost of reclaim.
//!
//! `cargo bench -p guest-mm --bench tables`; quick smoke run with
//! `EBB_BENCH_QUICK=1` (or `-- --quick`); `EBB_BENCH_SUMMARY_ONLY=1` skips the
//! criterion groups and prints only the summary.

#[path = "tables/measure.rs"]
mod measure;

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use guest_mm::{BLOCK_SIZE, GpaRange, PAGE_SIZE, PageSize, Tables};
use measure::{Config, STRATEGIES};

fn criterion_groups(c: &mut Criterion, quick: bool) {
    let mut g = c.benchmark_group("tables");
    if quick {
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(200));
    } else {
        g.sample_size(20).measurement_time(Duration::from_secs(2));
    }
    for s in STRATEGIES {
        g.bench_with_input(
            BenchmarkId::new("populate_4k", format!("{s:?}")),
            &s,
            |b, &s| {
                b.iter_custom(|iters| {
                    let t = Tables::new(s);
                    let start = Instant::now();
                    for p in 0..iters {
                        let gpa = p * PAGE_SIZE;
                        let _ = std::hint::black_box(t.populate(gpa, gpa, PageSize::Size4K));
                    }
                    start.elapsed()
                })
            },
        );
        g.bench_with_input(BenchmarkId::new("lookup", format!("{s:?}")), &s, |b, &s| {
            let t = Tables::new(s);
            for p in 0..4 * 512 {
                t.populate(p * PAGE_SIZE, 0, PageSize::Size4K).unwrap();
            }
            let mut i = 0u64;
            b.iter(|| {
                i = (i + 769) % (4 * 512);
                std::hint::black_box(t.lookup(i * PAGE_SIZE))
            })
        });
        g.bench_with_input(
            BenchmarkId::new("populate_discard_2m_block", format!("{s:?}")),
            &s,
            |b, &s| {
                let t = Tables::new(s);
                let mut block = 0u64;
                b.iter(|| {
                    let base = block * BLOCK_SIZE;
                    block = (block + 1) % 4096;
                    for p in 0..512 {
                        let gpa = base + p * PAGE_SIZE;
                        let _ = t.populate(gpa, gpa, PageSize::Size4K);
                    }
                    t.discard(GpaRange::new(base, BLOCK_SIZE).unwrap()).unwrap()
                })
            },
        );
    }
    g.finish();
}

fn main() {
    let config = Config::from_env();
    let quick = config.seed_blocks < Config::full().seed_blocks;
    if std::env::var_os("EBB_BENCH_SUMMARY_ONLY").is_none() {
        let mut c = Criterion::default().configure_from_args();
        criterion_groups(&mut c, quick);
        c.final_summary();
    }
    let report = measure::run(config);
    println!("\n{}", measure::format(&report));
}
