//! `integrity`: fill memory with per-page checksummed patterns, let other things happen, verify.

use std::time::{Duration, Instant};

use crate::args::Args;
use crate::error::ToolError;
use crate::mem::{Mapping, Thp, page_size};
use crate::pattern::{self, PageState, Tally};
use crate::report::Report;
use crate::signal;
use crate::workloads::{churn_chunks, thp_arg};

const MIB: usize = 1 << 20;
/// At most this many bad pages are listed one by one.
const LIST_BAD: u64 = 8;

/// Fills every page of `m` for generation `generation`.
pub fn fill_all(m: &mut Mapping, generation: u64) {
    let ps = page_size();
    let base = m.addr();
    for (i, page) in m.as_mut_slice().chunks_exact_mut(ps).enumerate() {
        pattern::fill(page, base + (i * ps) as u64, generation);
    }
}

/// Verifies every page of `m`; prints the first few bad pages.
pub fn verify_all(m: &Mapping, generation: u64) -> Tally {
    let ps = page_size();
    let base = m.addr();
    let mut t = Tally::default();
    for (i, page) in m.as_slice().chunks_exact(ps).enumerate() {
        let addr = base + (i * ps) as u64;
        let s = pattern::verify(page, addr, generation);
        if s != PageState::Good && t.bad() < LIST_BAD {
            println!("EBB-BAD-PAGE addr={addr:#x} index={i} state={s:?}");
        }
        t.add(s);
    }
    t
}

/// `integrity --mib N [--passes P] [--hold-secs S] [--churn-mib M] [--churn-secs S]
/// [--wait-signal] [--wait-console] [--thp ..]`: per pass, fill with a new generation, then hold
/// while sleeping, churning a second mapping, or waiting for SIGUSR1 (or, with --wait-console,
/// for a line on the console; one line ends every pass's wait), then verify every page.
pub fn integrity(argv: &[String]) -> Result<i32, ToolError> {
    let a = Args::parse(
        argv,
        &[
            "mib",
            "passes",
            "hold-secs",
            "churn-mib",
            "churn-secs",
            "thp",
        ],
        &["wait-signal", "wait-console"],
    )?;
    let mib: usize = a.get("mib", 256)?;
    if mib == 0 || mib > (1 << 20) {
        return Err(ToolError::Invalid("--mib must be 1..=1048576".into()));
    }
    let passes: u64 = a.get("passes", 1)?;
    let hold: u64 = a.get("hold-secs", 0)?;
    let churn_mib: usize = a.get("churn-mib", 0)?;
    let churn_secs: u64 = a.get("churn-secs", 5)?;
    if passes == 0 {
        return Err(ToolError::Invalid("--passes must be at least 1".into()));
    }
    let thp = thp_arg(&a)?;
    let wait = a.flag("wait-signal") || a.flag("wait-console");
    if wait {
        signal::install();
    }
    if a.flag("wait-console") {
        signal::install_console();
    }
    let mut m = Mapping::new(mib * MIB, thp)?;
    let pages = (m.len() / page_size()) as u64;
    let mut total = Tally::default();
    let (mut fill_t, mut verify_t, mut churn_ops) = (Duration::ZERO, Duration::ZERO, 0u64);
    for pass in 0..passes {
        let generation = pass + 1;
        let t = Instant::now();
        fill_all(&mut m, generation);
        fill_t += t.elapsed();
        if churn_mib > 0 {
            let mut c = Mapping::new(churn_mib * MIB, Thp::Never)?;
            let chunk = (2 * MIB).min(c.len());
            let end = Instant::now() + Duration::from_secs(churn_secs);
            let st = churn_chunks(&mut c, chunk, |n| {
                n.is_multiple_of(8) && Instant::now() >= end
            })?;
            churn_ops += st.ops;
            if st.nonzero != 0 {
                println!(
                    "EBB-WARN churn saw {} non-zero pages after discard",
                    st.nonzero
                );
            }
        }
        if hold > 0 {
            // Tells a host-side driver (e.g. a balloon test) that the pages are written.
            println!("EBB-INTEGRITY-HOLDING pass={pass} secs={hold}");
            std::thread::sleep(Duration::from_secs(hold));
        }
        if wait {
            println!(
                "EBB-INTEGRITY-WAITING pid={} pass={pass}",
                std::process::id()
            );
            signal::wait(None);
        }
        let t = Instant::now();
        let tally = verify_all(&m, generation);
        verify_t += t.elapsed();
        total.good += tally.good;
        total.zeroed += tally.zeroed;
        total.stale += tally.stale;
        total.corrupt += tally.corrupt;
    }
    let per = |d: Duration| (d.as_nanos() as f64 / (pages * passes) as f64).round();
    Report::new("integrity")
        .kv("mib", mib)
        .kv("pages", pages)
        .kv("passes", passes)
        .kv("checked", total.good + total.bad())
        .kv("bad_pages", total.bad())
        .kv("zeroed", total.zeroed)
        .kv("stale", total.stale)
        .kv("corrupt", total.corrupt)
        .kv("churn_ops", churn_ops)
        .kv("fill_ns_per_page", per(fill_t))
        .kv("verify_ns_per_page", per(verify_t))
        .print();
    Ok(if total.bad() == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_verify_is_clean_and_damage_is_counted() {
        let mut m = Mapping::new(MIB, Thp::Never).unwrap();
        fill_all(&mut m, 5);
        assert_eq!(verify_all(&m, 5).bad(), 0);
        let ps = page_size();
        m.discard(3 * ps, 2 * ps).unwrap();
        m.as_mut_slice()[10 * ps + 100] ^= 0x10;
        let t = verify_all(&m, 5);
        assert_eq!((t.zeroed, t.corrupt, t.stale), (2, 1, 0));
        assert_eq!(verify_all(&m, 6).stale, (m.len() / ps) as u64 - 3);
    }
}
