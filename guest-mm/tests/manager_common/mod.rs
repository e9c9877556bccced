//! Helpers shared by the manager tests: touching guest memory through host addresses, reading
//! /proc/self/status, and the leaves-versus-mincore exactness check.

#![allow(dead_code)]

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use guest_mm::backing::ReleaseMode;
use guest_mm::manager::gpa_range;
use guest_mm::manager::{BackingSpec, FaultConfig, GuestMm, RegionSpec};
use guest_mm::{GpaRange, PAGE_SIZE, Strategy};

pub const MIB: u64 = 1 << 20;

/// One anonymous (no THP) region at gpa 0 with the fault path on.
pub fn anon_mm(len: u64, strategy: Strategy, release: ReleaseMode, threads: usize) -> GuestMm {
    let layout = [RegionSpec {
        gpa: 0,
        len,
        backing: BackingSpec::Anonymous { thp: false },
    }];
    let faults = FaultConfig {
        handler_threads: threads,
        ..FaultConfig::default()
    };
    GuestMm::new(&layout, strategy, release, faults)
        .expect("GuestMm with a userfaultfd fault path (needs root and CONFIG_USERFAULTFD)")
}

fn host(mm: &GuestMm, gpa: u64) -> *mut u64 {
    mm.host_addr(gpa)
        .unwrap_or_else(|| panic!("gpa {gpa:#x} outside the regions")) as *mut u64
}

/// Writes `v` to the first word of the page at `gpa` (faults through the handlers if needed).
pub fn write(mm: &GuestMm, gpa: u64, v: u64) {
    // SAFETY: host_addr returned an address inside a live region of `mm`, 8-byte aligned
    // (gpa is page aligned); guest memory is only ever accessed with volatile raw accesses.
    unsafe { host(mm, gpa).write_volatile(v) }
}

/// Reads the first word of the page at `gpa`.
pub fn read(mm: &GuestMm, gpa: u64) -> u64 {
    // SAFETY: as in `write`.
    unsafe { host(mm, gpa).read_volatile() }
}

/// Waits for the fault path to settle (leaves and counters are recorded just after the
/// faulting thread is woken).
pub fn settle(mm: &GuestMm) {
    assert!(
        mm.settle_faults(Duration::from_secs(10)),
        "fault path did not settle"
    );
}

/// A value from /proc/self/status in kB (e.g. "VmPTE", "VmRSS").
pub fn status_kb(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{key} missing from /proc/self/status"))
}

/// Checks that the leaves in `range` are exactly the pages present in the host (mincore):
/// no phantom leaf (leaf without page), no lost leaf (page without leaf). Returns the number
/// of present pages.
pub fn assert_exact(mm: &GuestMm, range: GpaRange) -> u64 {
    assert!(
        mm.settle_faults(Duration::from_secs(10)),
        "fault path did not settle"
    );
    let mut res = Vec::new();
    mm.residency(range, &mut res).unwrap();
    let mut present = 0;
    let (mut phantom, mut lost) = (Vec::new(), Vec::new());
    for (i, r) in res.iter().enumerate() {
        let gpa = range.start() + i as u64 * PAGE_SIZE;
        let leaf = mm.lookup(gpa).is_some();
        let resident = r & 1 == 1;
        present += u64::from(resident);
        match (leaf, resident) {
            (true, false) => phantom.push(gpa),
            (false, true) => lost.push(gpa),
            _ => {}
        }
    }
    assert!(
        phantom.is_empty() && lost.is_empty(),
        "{} phantom leaves (first {:x?}), {} lost leaves (first {:x?})",
        phantom.len(),
        phantom.first(),
        lost.len(),
        lost.first()
    );
    present
}

/// A tiny deterministic generator (xorshift64*), so failures can be replayed from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes every page of `0..len` once, from two threads, and waits for the fault path.
pub fn touch_all(mm: &Arc<GuestMm>, len: u64) {
    let pages = len / PAGE_SIZE;
    let hs: Vec<_> = (0..2u64)
        .map(|t| {
            let mm = mm.clone();
            thread::spawn(move || {
                for p in (t..pages).step_by(2) {
                    write(&mm, p * PAGE_SIZE, p);
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    settle(mm);
}

/// Discards every page of `0..len` on its own, in an order shuffled by `seed`, 256 per call:
/// each 2 MiB block is split by 4 KiB releases until it is empty.
pub fn discard_scattered(mm: &GuestMm, len: u64, seed: u64) {
    discard_scattered_as(mm, len, seed, false);
}

/// As [`discard_scattered`]; with `hold`, each call's pages are first held (`GuestMm::hold`,
/// as the balloon's inflate does). Returns the summed `blocks_released`.
pub fn discard_scattered_as(mm: &GuestMm, len: u64, seed: u64, hold: bool) -> u64 {
    let mut pages: Vec<u64> = (0..len / PAGE_SIZE).collect();
    let mut rng = Rng(seed);
    for i in (1..pages.len()).rev() {
        pages.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut blocks = 0;
    for batch in pages.chunks(256) {
        let ranges: Vec<GpaRange> = batch
            .iter()
            .map(|p| gpa_range(p * PAGE_SIZE, PAGE_SIZE).unwrap())
            .collect();
        if hold {
            mm.hold(&ranges, true).unwrap();
        }
        blocks += mm.discard_many(&ranges).unwrap().blocks_released;
    }
    blocks
}

/// kB of the mapping at `addr` that the host maps with PMDs (ShmemPmdMapped in smaps).
pub fn shmem_pmd_kb(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
    let head = format!("{addr:x}-");
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
    assert!(lines.next().is_some(), "mapping {addr:#x} not in smaps");
    lines
        .take_while(|l| !l.contains('-') || l.contains(':'))
        .find_map(|l| l.strip_prefix("ShmemPmdMapped:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("ShmemPmdMapped in smaps")
}
