//! The markdown tables (medians over the rounds that count, ebb against QEMU) and the CSV of
//! every round's raw figures.

use std::fmt::Write as _;

use crate::PHASES;
use crate::round::Round;

pub(crate) fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// How a figure is shown.
#[derive(Clone, Copy)]
pub(crate) enum Unit {
    /// kB shown as MiB, one decimal.
    KbAsMib,
    /// As is, no decimals.
    Whole,
    /// Bytes shown as kB.
    BytesAsKb,
    /// ns shown as ms, one decimal.
    NsAsMs,
}

pub(crate) fn show(x: Option<f64>, u: Unit) -> String {
    let Some(x) = x else {
        return "–".into();
    };
    match u {
        Unit::KbAsMib => format!("{:.1}", x / 1024.0),
        Unit::Whole => format!("{x:.0}"),
        Unit::BytesAsKb => format!("{:.0}", x / 1024.0),
        Unit::NsAsMs => format!("{:.1}", x / 1e6),
    }
}

pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        (Some(0.0), Some(_)) => "1.00".into(),
        _ => "–".into(),
    }
}

/// Table cells: ebb's median of `key` in `phase`, QEMU's, and their ratio.
pub(crate) fn ebb_and_qemu(rounds: &[&Round], phase: &str, key: &str, unit: Unit) -> String {
    let e = med(rounds, "ebb", phase, key);
    let q = med(rounds, "qemu", phase, key);
    format!("{} | {} | {}", show(e, unit), show(q, unit), ratio(e, q))
}

/// The median over `rounds` of a figure of `vmm` at `phase`.
pub(crate) fn med(rounds: &[&Round], vmm: &str, phase: &str, key: &str) -> Option<f64> {
    median(
        rounds
            .iter()
            .filter_map(|r| r.get(vmm, phase, key))
            .collect(),
    )
}

/// The markdown tables for one reporting setting: medians over the rounds that count.
pub(crate) fn tables(setting: &str, all: &[Round]) -> String {
    let rounds: Vec<&Round> = all
        .iter()
        .filter(|r| r.reporting == setting && r.ok())
        .collect();
    let left_out: Vec<String> = all
        .iter()
        .filter(|r| r.reporting == setting && !r.ok())
        .map(|r| format!("round {} ({})", r.round, r.all_problems().join("; ")))
        .collect();
    let faults: u32 = all
        .iter()
        .filter(|r| r.reporting == setting)
        .map(|r| r.rig_faults)
        .sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### Free page reporting {setting}: median of {} round{}\n",
        rounds.len(),
        if rounds.len() == 1 { "" } else { "s" }
    );
    if !left_out.is_empty() {
        let _ = writeln!(s, "Left out: {}.\n", left_out.join("; "));
    }
    if faults > 0 {
        let _ = writeln!(
            s,
            "Rounds re-run after a rig fault: {faults} (the re-run counts, not the faulted attempt).\n"
        );
    }
    s.push_str(
        "| phase | host memory MiB ebb | QEMU | ebb/QEMU | VmRSS MiB ebb | QEMU \
         | guest RAM held MiB ebb | QEMU | its non-zero pages MiB ebb | QEMU |\n",
    );
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for ph in PHASES {
        let g = |v| med(&rounds, v, ph, "guest_kB");
        let nz = |v| {
            rounds
                .iter()
                .filter_map(|r| Some(r.get(v, ph, "guest_kB")? - r.get(v, ph, "guest_zero_kB")?))
                .collect::<Vec<_>>()
        };
        let (e, q) = (
            med(&rounds, "ebb", ph, "host_kB"),
            med(&rounds, "qemu", ph, "host_kB"),
        );
        let _ = writeln!(
            s,
            "| {ph} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            show(e, Unit::KbAsMib),
            show(q, Unit::KbAsMib),
            ratio(e, q),
            show(med(&rounds, "ebb", ph, "VmRSS"), Unit::KbAsMib),
            show(med(&rounds, "qemu", ph, "VmRSS"), Unit::KbAsMib),
            show(g("ebb"), Unit::KbAsMib),
            show(g("qemu"), Unit::KbAsMib),
            show(median(nz("ebb")), Unit::KbAsMib),
            show(median(nz("qemu")), Unit::KbAsMib),
        );
    }
    s.push('\n');
    s.push_str(
        "| phase | VmPTE kB ebb | QEMU | ebb/QEMU \
         | SecPageTables kB ebb | QEMU | ebb/QEMU | ebb table kB (min) |\n",
    );
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for ph in PHASES {
        let _ = write!(s, "| {ph} ");
        for key in ["VmPTE", "SecPageTables"] {
            let _ = write!(s, "| {} ", ebb_and_qemu(&rounds, ph, key, Unit::Whole));
        }
        let _ = writeln!(
            s,
            "| {} ({}) |",
            show(med(&rounds, "ebb", ph, "table_bytes"), Unit::BytesAsKb),
            show(med(&rounds, "ebb", ph, "min_table_bytes"), Unit::BytesAsKb)
        );
    }
    s.push('\n');
    s.push_str("| time | ebb | QEMU | ebb/QEMU |\n| --- | ---: | ---: | ---: |\n");
    for (what, phase, key, unit) in [
        (
            "touch 600 MiB, ns/page",
            "touched",
            "ns_per_page",
            Unit::Whole,
        ),
        (
            "settle after the free, ms",
            "freed",
            "settle_ms",
            Unit::Whole,
        ),
        (
            "inflate (target set to driver there), ms",
            "inflated",
            "inflate_ms",
            Unit::Whole,
        ),
        (
            "re-read 32 MiB working set, ns/page",
            "retouch-ws",
            "ns_per_page",
            Unit::Whole,
        ),
        ("deflate to 0, ms", "deflated", "deflate_ms", Unit::Whole),
        (
            "touch 512 MiB fresh, ns/page",
            "retouch",
            "ns_per_page",
            Unit::Whole,
        ),
    ] {
        let _ = writeln!(
            s,
            "| {what} | {} |",
            ebb_and_qemu(&rounds, phase, key, unit)
        );
    }
    s.push('\n');
    // ebb's counters only grow: the last phase has the whole run's.
    let last = "retouch";
    let _ = writeln!(
        s,
        "ebb's own, at the end: longest balloon queue notification (the thread that handled it held) {} ms; \
         KVM table zaps {} (longest {} ms, 2 MiB blocks emptied {}).\n",
        show(med(&rounds, "ebb", last, "notify_ns_max"), Unit::NsAsMs),
        show(med(&rounds, "ebb", last, "zaps"), Unit::Whole),
        show(med(&rounds, "ebb", last, "ns_max"), Unit::NsAsMs),
        show(med(&rounds, "ebb", last, "blocks_emptied"), Unit::Whole),
    );
    let times: Vec<String> = all
        .iter()
        .filter(|r| r.reporting == setting)
        .map(|r| format!("{:.0}", r.elapsed_s))
        .collect();
    let _ = writeln!(
        s,
        "Rounds took {} s (one L1 boot, both VMMs).\n",
        times.join(", ")
    );
    s
}

/// The CSV columns taken from each phase line, after round, reporting, order, vmm, phase.
pub(crate) const CSV_KEYS: [&str; 26] = [
    "t_ms",
    "host_kB",
    "VmRSS",
    "RssAnon",
    "RssFile",
    "RssShmem",
    "guest_kB",
    "guest_zero_kB",
    "VmPTE",
    "SecPageTables",
    "PageTables",
    "table_bytes",
    "min_table_bytes",
    "resident_pages",
    "host_pte_bytes",
    "kvm_table_bytes",
    "notify_ns_max",
    "zaps",
    "ns_max",
    "blocks_emptied",
    "faults",
    "settle_ms",
    "inflate_ms",
    "deflate_ms",
    "ns_per_page",
    "bad_pages",
];

pub(crate) fn csv(rounds: &[Round]) -> String {
    let mut s = format!(
        "round,reporting,order,counts,vmm,phase,{}\n",
        CSV_KEYS
            .iter()
            .map(|k| match *k {
                "VmRSS" | "VmPTE" | "SecPageTables" | "PageTables" | "RssAnon" | "RssFile"
                | "RssShmem" => format!("{k}_kB"),
                "ns_max" => "kvm_zap_ns_max".into(),
                "zaps" => "kvm_zaps".into(),
                other => other.into(),
            })
            .collect::<Vec<_>>()
            .join(",")
    );
    for r in rounds {
        for p in &r.phases {
            let vals: Vec<String> = CSV_KEYS
                .iter()
                .map(|k| p.f.get(*k).map(|v| v.to_string()).unwrap_or_default())
                .collect();
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{}",
                r.round,
                r.reporting,
                r.order,
                u8::from(r.ok()),
                p.vmm,
                p.phase,
                vals.join(",")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round::tests::full_log;

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(ratio(Some(1.0), Some(4.0)), "0.25");
        assert_eq!(ratio(Some(0.0), Some(0.0)), "1.00");
        assert_eq!(ratio(Some(1.0), None), "–");
    }

    #[test]
    fn the_table_has_every_phase() {
        let rounds = vec![Round::parse(&full_log(0))];
        let t = tables("on", &rounds);
        for ph in PHASES {
            assert!(t.contains(&format!("| {ph} |")), "{t}");
        }
        assert!(
            t.contains("| 3.0 | 3.0 | 1.00 | 2.0 | 2.0 | 1.0 | 1.0 | 0.8 | 0.8 |"),
            "{t}"
        );
        assert!(t.contains("| 100 | 100 | 1.00 |"), "{t}");
        let c = csv(&rounds);
        assert_eq!(c.lines().count(), 1 + 14);
    }
}
