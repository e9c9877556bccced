//! `touch`, `churn` and `hog`: memory access patterns that drive guest page faults and give-back.

use std::time::{Duration, Instant};

use crate::args::Args;
use crate::error::ToolError;
use crate::mem::{Mapping, Thp, page_size};
use crate::report::Report;
use crate::signal;

const MIB: usize = 1 << 20;

/// Reads `--thp never|always|default` (default: never, so every page has a PTE).
pub fn thp_arg(a: &Args) -> Result<Thp, ToolError> {
    match a.get_str("thp").unwrap_or("never") {
        "never" => Ok(Thp::Never),
        "always" => Ok(Thp::Always),
        "default" => Ok(Thp::Default),
        other => Err(ToolError::Invalid(format!(
            "--thp must be never|always|default, not {other}"
        ))),
    }
}

fn mib_arg(a: &Args, name: &str, default: usize) -> Result<usize, ToolError> {
    let mib: usize = a.get(name, default)?;
    if mib == 0 || mib > (1 << 20) {
        return Err(ToolError::Invalid(format!(
            "--{name} must be 1..=1048576 MiB"
        )));
    }
    Ok(mib)
}

fn ns_per(d: Duration, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        (d.as_nanos() as f64 / n as f64 * 10.0).round() / 10.0
    }
}

/// Writes one byte into every page of `buf` (a value that is never zero).
fn touch_pages(buf: &mut [u8], ps: usize, value: u8) -> u64 {
    let mut n = 0;
    for off in (0..buf.len()).step_by(ps) {
        buf[off] = value | 1;
        n += 1;
    }
    n
}

/// `touch --mib N [--thp never|always|default] [--hold-secs S]`: one write per page, timed.
pub fn touch(argv: &[String]) -> Result<i32, ToolError> {
    let a = Args::parse(argv, &["mib", "thp", "hold-secs"], &[])?;
    let mib = mib_arg(&a, "mib", 256)?;
    let hold: u64 = a.get("hold-secs", 0)?;
    if hold > 0 {
        // Before the result line: a host that signals on seeing it must not kill the process.
        signal::install();
    }
    let mut m = Mapping::new(mib * MIB, thp_arg(&a)?)?;
    let ps = page_size();
    let t = Instant::now();
    let pages = touch_pages(m.as_mut_slice(), ps, 0x5a);
    let el = t.elapsed();
    Report::new("touch")
        .kv("mib", mib)
        .kv("pages", pages)
        .kv("ns_per_page", ns_per(el, pages))
        .kv("total_ms", el.as_millis())
        .print();
    if hold > 0 {
        signal::wait(Some(Duration::from_secs(hold)));
    }
    Ok(0)
}

/// A small xorshift generator for the scattered pattern (no dependency, reproducible by seed).
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (zero is replaced by a fixed odd constant).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 {
            0x2545_f491_4f6c_dd1d
        } else {
            seed
        })
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Outcome of a churn run over one mapping.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChurnStats {
    pub ops: u64,
    pub pages: u64,
    pub nonzero: u64,
    pub elapsed: Duration,
}

/// `loop { touch chunk; madvise(DONTNEED) chunk }` over `m`, chunk by chunk, until `stop` says so.
/// A discarded chunk must read back as zero before it is touched again: pages that do not are
/// counted in `nonzero`.
pub fn churn_chunks(
    m: &mut Mapping,
    chunk: usize,
    mut stop: impl FnMut(u64) -> bool,
) -> Result<ChurnStats, ToolError> {
    let ps = page_size();
    let nchunks = m.len() / chunk;
    let mut st = ChurnStats::default();
    let t = Instant::now();
    let mut i = 0usize;
    while !stop(st.ops) {
        let off = (i % nchunks) * chunk;
        let s = &mut m.as_mut_slice()[off..off + chunk];
        for p in (0..chunk).step_by(ps) {
            if s[p] != 0 {
                st.nonzero += 1;
            }
            s[p] = 0xc3;
        }
        st.pages += (chunk / ps) as u64;
        m.discard(off, chunk)?;
        st.ops += 1;
        i += 1;
    }
    st.elapsed = t.elapsed();
    Ok(st)
}

/// Scattered variant: touch one random 4 KiB page, then discard just that page.
pub fn churn_scattered(
    m: &mut Mapping,
    rng: &mut XorShift,
    mut stop: impl FnMut(u64) -> bool,
) -> Result<ChurnStats, ToolError> {
    let ps = page_size();
    let npages = (m.len() / ps) as u64;
    let mut st = ChurnStats::default();
    let t = Instant::now();
    while !stop(st.ops) {
        let off = rng.below(npages) as usize * ps;
        let s = m.as_mut_slice();
        if s[off] != 0 {
            st.nonzero += 1;
        }
        s[off] = 0x3c;
        m.discard(off, ps)?;
        st.pages += 1;
        st.ops += 1;
    }
    st.elapsed = t.elapsed();
    Ok(st)
}

/// `churn --mib N [--mode chunk|scattered] [--chunk-kib K] [--ops N | --secs S | --wait-signal]
/// [--seed X]`. With `--wait-signal` it runs until SIGUSR1, SIGTERM or SIGINT, then prints its
/// result as usual: how a host-driven run (the stress run) ends it without a time limit.
pub fn churn(argv: &[String]) -> Result<i32, ToolError> {
    let a = Args::parse(
        argv,
        &["mib", "mode", "chunk-kib", "ops", "secs", "seed", "thp"],
        &["wait-signal"],
    )?;
    let mib = mib_arg(&a, "mib", 512)?;
    let mode = a.get_str("mode").unwrap_or("chunk").to_string();
    let chunk_kib: usize = a.get("chunk-kib", 2048)?;
    let ps = page_size();
    if chunk_kib == 0 || !(chunk_kib * 1024).is_multiple_of(ps) || chunk_kib * 1024 > mib * MIB {
        return Err(ToolError::Invalid(
            "--chunk-kib must be whole pages within --mib".into(),
        ));
    }
    let secs: u64 = a.get("secs", 0)?;
    let default_ops = if mode == "chunk" {
        (mib * MIB / (chunk_kib * 1024)) as u64 * 2
    } else {
        100_000
    };
    let ops: u64 = a.get("ops", default_ops)?;
    let until_signal = a.flag("wait-signal");
    if until_signal {
        if secs > 0 || a.get_str("ops").is_some() {
            return Err(ToolError::Invalid(
                "--wait-signal goes without --ops and --secs".into(),
            ));
        }
        signal::install();
    }
    let mut m = Mapping::new(mib * MIB, thp_arg(&a)?)?;
    let deadline = (secs > 0).then(|| Instant::now() + Duration::from_secs(secs));
    let stop = |done: u64| {
        if until_signal {
            signal::requested()
        } else if let Some(d) = deadline {
            done.is_multiple_of(16) && Instant::now() >= d
        } else {
            done >= ops
        }
    };
    let st = match mode.as_str() {
        "chunk" => churn_chunks(&mut m, chunk_kib * 1024, stop)?,
        "scattered" => churn_scattered(&mut m, &mut XorShift::new(a.get("seed", 1)?), stop)?,
        other => {
            return Err(ToolError::Invalid(format!(
                "--mode must be chunk|scattered, not {other}"
            )));
        }
    };
    Report::new("churn")
        .kv("mode", &mode)
        .kv("mib", mib)
        .kv(
            "chunk_kib",
            if mode == "chunk" {
                chunk_kib
            } else {
                ps / 1024
            },
        )
        .kv("ops", st.ops)
        .kv("pages", st.pages)
        .kv("ns_per_page", ns_per(st.elapsed, st.pages))
        .kv("nonzero", st.nonzero)
        .kv("total_ms", st.elapsed.as_millis())
        .print();
    Ok(if st.nonzero == 0 { 0 } else { 1 })
}

/// `hog --mib N [--hold-secs S] [--release munmap|dontneed] [--after-secs S] [--wait-console]`:
/// takes and touches N MiB, holds it until a signal (SIGUSR1/SIGTERM/SIGINT), a line on the
/// console (with --wait-console) or `--hold-secs` (0 = no time limit), gives it back, then waits
/// `--after-secs` (free page reporting runs ~2 s after a free).
pub fn hog(argv: &[String]) -> Result<i32, ToolError> {
    let a = Args::parse(
        argv,
        &["mib", "hold-secs", "release", "after-secs", "thp"],
        &["wait-console"],
    )?;
    let mib = mib_arg(&a, "mib", 256)?;
    let hold: u64 = a.get("hold-secs", 10)?;
    let after: u64 = a.get("after-secs", 0)?;
    let release = a.get_str("release").unwrap_or("munmap").to_string();
    if release != "munmap" && release != "dontneed" {
        return Err(ToolError::Invalid(
            "--release must be munmap|dontneed".into(),
        ));
    }
    signal::install();
    if a.flag("wait-console") {
        signal::install_console();
    }
    let mut m = Mapping::new(mib * MIB, thp_arg(&a)?)?;
    let t = Instant::now();
    let pages = touch_pages(m.as_mut_slice(), page_size(), 0x77);
    Report::new("hog")
        .kv("phase", "held")
        .kv("mib", mib)
        .kv("pages", pages)
        .kv("ns_per_page", ns_per(t.elapsed(), pages))
        .print();
    let signalled = signal::wait((hold > 0).then(|| Duration::from_secs(hold)));
    let t = Instant::now();
    if release == "dontneed" {
        let len = m.len();
        m.discard(0, len)?;
    } else {
        drop(m);
    }
    Report::new("hog")
        .kv("phase", "released")
        .kv("mib", mib)
        .kv("how", &release)
        .kv("by_signal", u8::from(signalled))
        .kv("release_us", t.elapsed().as_micros())
        .print();
    std::thread::sleep(Duration::from_secs(after));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_churn_sees_only_zeroes() {
        let mut m = Mapping::new(8 * MIB, Thp::Never).unwrap();
        let st = churn_chunks(&mut m, 2 * MIB, |n| n >= 12).unwrap();
        assert_eq!(st.ops, 12);
        assert_eq!(st.pages, 12 * (2 * MIB / page_size()) as u64);
        assert_eq!(st.nonzero, 0);
    }

    #[test]
    fn scattered_churn_sees_only_zeroes() {
        let mut m = Mapping::new(4 * MIB, Thp::Never).unwrap();
        let st = churn_scattered(&mut m, &mut XorShift::new(7), |n| n >= 500).unwrap();
        assert_eq!((st.ops, st.pages, st.nonzero), (500, 500, 0));
    }

    #[test]
    fn churn_until_signal_runs_until_sigusr1_and_reports() {
        // The handler first, so that the signal never meets the default action (termination).
        signal::install();
        let run = std::thread::spawn(|| {
            let argv = ["--mib", "4", "--chunk-kib", "64", "--wait-signal"].map(String::from);
            churn(&argv)
        });
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: kill(2) on this process with a signal whose handler is installed above.
        assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) }, 0);
        assert_eq!(run.join().unwrap().unwrap(), 0);
        let both = ["--mib", "4", "--secs", "1", "--wait-signal"].map(String::from);
        assert!(matches!(churn(&both), Err(ToolError::Invalid(_))));
    }

    #[test]
    fn xorshift_stays_in_range() {
        let mut r = XorShift::new(0);
        assert!((0..1000).all(|_| r.below(10) < 10));
    }
}
