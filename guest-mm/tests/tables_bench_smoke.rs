//! Smoke run of the table benchmarks in quick mode: the measurement code
//! works, and the footprint targets hold (Scan and Count end at exactly the
//! minimum table bytes after the seeds' workload, Off keeps every PT).
#![cfg(not(loom))]

#[path = "../benches/tables/measure.rs"]
#[allow(dead_code)]
mod measure;

use guest_mm::tables::TABLE_BYTES;
use measure::{Config, STRATEGIES};

#[test]
fn quick_bench_meets_the_footprint_targets() {
    let config = Config {
        rounds: 1,
        ..Config::quick()
    };
    let report = measure::run(config);
    println!("{}", measure::format(&report));
    for (s, seed) in STRATEGIES.iter().zip(&report.seeds) {
        assert_eq!(seed.min_bytes, TABLE_BYTES, "{s:?}: nothing left mapped");
        match s {
            guest_mm::Strategy::Off => {
                // One PT per block, plus PD, PDPT and root.
                let pds = config.seed_blocks.div_ceil(512);
                let want = (config.seed_blocks + pds + 2) * TABLE_BYTES;
                assert_eq!(seed.table_bytes, want);
            }
            _ => assert_eq!(seed.table_bytes, seed.min_bytes, "{s:?} ratio 1.00"),
        }
    }
    for t in &report.timings {
        assert!(t.populate_1t > 0.0 && t.lookup > 0.0 && t.discard_2m > 0.0);
    }
}
