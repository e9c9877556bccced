//! Host-side benchmark of GuestMm (a plain binary that prints tables).
//!
//! 1. Fault path: ns per fault for each fill mode, read and write faults, with and without
//!    fault-around, through real handler threads.
//! 2. Give-back: an anonymous mapping (MADV_NOHUGEPAGE) is touched through the fault path, then
//!    all of it is discarded as scattered 4 KiB pages in random order, 256 pages per request
//!    (one Linux balloon buffer), once with `Strategy::Off` and once with `Strategy::Scan`.
//!    Reported: host VmPTE before/after, guest-mm table bytes, release calls, time.
//!
//! Size: 8 GiB by default; `EBB_BENCH_QUICK=1` uses 256 MiB (smoke run), and
//! `EBB_BENCH_MIB=N` sets it explicitly. Run: `cargo bench -p guest-mm --bench host`.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use guest_mm::backing::ReleaseMode;
use guest_mm::manager::{BackingSpec, FaultConfig, FillMode, GuestMm, RegionSpec, gpa_range};
use guest_mm::{GpaRange, PAGE_SIZE, Strategy};

const MIB: u64 = 1 << 20;

fn status_kb(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} missing from /proc/self/status"))
}

fn make(len: u64, strategy: Strategy, faults: FaultConfig) -> Arc<GuestMm> {
    let layout = [RegionSpec {
        gpa: 0,
        len,
        backing: BackingSpec::Anonymous { thp: false },
    }];
    Arc::new(
        GuestMm::new(&layout, strategy, ReleaseMode::DontNeed, faults)
            .expect("GuestMm with userfaultfd (run as root)"),
    )
}

/// Touches every page of `0..len` from `threads` threads (write or read); returns the time.
fn touch(mm: &Arc<GuestMm>, len: u64, threads: u64, write: bool) -> Duration {
    let pages = len / PAGE_SIZE;
    let t0 = Instant::now();
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let mm = mm.clone();
            thread::spawn(move || {
                let chunk = pages.div_ceil(threads);
                let base = mm.host_addr(0).expect("region at gpa 0") as *mut u8;
                for p in t * chunk..((t + 1) * chunk).min(pages) {
                    // SAFETY: page p lies inside the live region (p < pages); guest memory is
                    // only accessed with volatile raw accesses.
                    unsafe {
                        let a = base.add((p * PAGE_SIZE) as usize);
                        if write {
                            a.write_volatile(1);
                        } else {
                            a.read_volatile();
                        }
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("toucher thread");
    }
    t0.elapsed()
}

fn shuffled(n: u64, mut seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    v
}

fn fault_path(len: u64) {
    println!(
        "\n## Fault path: {} MiB touched by 2 threads, 2 handler threads",
        len / MIB
    );
    println!("| fill mode | access | fault-around | ns/page | faults | EEXIST |");
    println!("|---|---|---|---|---|---|");
    for fill in [FillMode::AlwaysCopy, FillMode::AlwaysZeropage] {
        for write in [true, false] {
            for fa in [1u32, 16] {
                let faults = FaultConfig {
                    handler_threads: 2,
                    fault_around_pages: fa,
                    fill,
                    thread_start: None,
                };
                let mm = make(len, Strategy::Scan, faults);
                let t = touch(&mm, len, 2, write);
                mm.settle_faults(Duration::from_secs(10));
                let st = mm.stats();
                println!(
                    "| {fill:?} | {} | {fa} | {:.0} | {} | {} |",
                    if write { "write" } else { "read" },
                    t.as_nanos() as f64 / (len / PAGE_SIZE) as f64,
                    st.faults_resolved,
                    st.eexist
                );
            }
        }
    }
}

fn give_back(len: u64) {
    let pages = len / PAGE_SIZE;
    println!(
        "\n## Give-back: {} MiB anonymous (MADV_NOHUGEPAGE), touched, then discarded as scattered \
         4 KiB pages in random order, 256 per request",
        len / MIB
    );
    println!(
        "| strategy | VmPTE idle kB | VmPTE touched kB | VmPTE after kB | after/touched | \
         guest-mm table kB after | release calls | 2 MiB blocks released | touch s | discard s | discard ns/page |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let order = shuffled(pages, 0x9e37_79b9_7f4a_7c15);
    let mut after = Vec::new();
    for (strategy, sweep) in [
        (Strategy::Off, false),
        (Strategy::Scan, false),
        (Strategy::Off, true),
    ] {
        let faults = FaultConfig {
            handler_threads: 2,
            fault_around_pages: 16,
            fill: FillMode::default(),
            thread_start: None,
        };
        let pte0 = status_kb("VmPTE");
        let mm = make(len, strategy, faults);
        let t_touch = touch(&mm, len, 2, true);
        mm.settle_faults(Duration::from_secs(30));
        assert_eq!(mm.stats().tables.leaves_4k, pages, "every page has a leaf");
        let pte1 = status_kb("VmPTE");
        let t0 = Instant::now();
        let (mut calls, mut blocks) = (0, 0);
        let mut batch: Vec<GpaRange> = Vec::with_capacity(256);
        for chunk in order.chunks(256) {
            batch.clear();
            batch.extend(
                chunk
                    .iter()
                    .map(|p| gpa_range(p * PAGE_SIZE, PAGE_SIZE).expect("range")),
            );
            let s = mm.discard_many(&batch).expect("discard");
            calls += s.release_calls;
            blocks += s.blocks_released;
        }
        if sweep {
            // Seed 000's user-triggered reclaim: one sweep over everything after the fact.
            let s = mm
                .reclaim(gpa_range(0, len).expect("range"))
                .expect("reclaim");
            calls += s.release_calls;
            blocks += s.blocks_released;
        }
        let t_discard = t0.elapsed();
        let pte2 = status_kb("VmPTE");
        let st = mm.stats();
        assert_eq!(st.tables.leaves_4k, 0);
        println!(
            "| {strategy:?}{} | {pte0} | {pte1} | {pte2} | {:.3} | {} | {calls} | {blocks} | {:.2} | {:.2} | {:.0} |",
            if sweep { " + reclaim sweep" } else { "" },
            (pte2 - pte0.min(pte2)) as f64 / (pte1 - pte0.min(pte1)).max(1) as f64,
            st.tables.table_bytes / 1024,
            t_touch.as_secs_f64(),
            t_discard.as_secs_f64(),
            t_discard.as_nanos() as f64 / pages as f64
        );
        after.push((pte2 - pte0.min(pte2), pte1 - pte0.min(pte1)));
        drop(mm);
    }
    let (off, scan) = (after[0].0, after[1].0);
    println!(
        "\nVmPTE left by the mapping after discard (above the idle baseline): Off {off} kB, Scan {scan} kB \
         (Scan/Off = {:.1}%; target < 5%)",
        100.0 * scan as f64 / off.max(1) as f64
    );
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let quick = std::env::var_os("EBB_BENCH_QUICK").is_some();
    let mib = std::env::var("EBB_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(if quick { 256 } else { 8192 });
    let len = mib * MIB;
    fault_path(if quick { 64 * MIB } else { 512 * MIB });
    give_back(len);
}
