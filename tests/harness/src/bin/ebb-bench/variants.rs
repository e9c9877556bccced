//! `ebb-bench --variants`: ebb's memory configurations side by side (reclaim strategy x release
//! mode x fill), one row per variant with ratios against ebb's default configuration.

use std::error::Error;
use std::fmt::Write as _;
use std::path::Path;

use ebb_harness::workspace_root;

use crate::round::Round;
use crate::tables::{Unit, csv, median, ratio, show};
use crate::{Cli, Sizes};

/// The ebb configurations `--variants` compares: label, ebb flags. The same list, labels and
/// flags as the rig test of every combination (`scripts/combos-l1.sh`,
/// `tests/harness/tests/ebb_combinations.rs`; why it is that list: docs/TESTING.md). Tracked
/// memfd RAM (2 MiB block fills) with each strategy and both of its release modes; tracked
/// anonymous 4 KiB RAM page by page at the `--no-thp` defaults, and by 16-page windows with
/// `dontneed` and the other two strategies and with `free`; untracked RAM once per release mode.
pub(crate) const VARIANTS: [(&str, &str); 12] = [
    (
        "memfd-punch-hole-off",
        "--reclaim-strategy off --release-mode punch-hole",
    ),
    (
        "memfd-remove-off",
        "--reclaim-strategy off --release-mode remove",
    ),
    (
        "memfd-punch-hole-scan",
        "--reclaim-strategy scan --release-mode punch-hole",
    ),
    (
        "memfd-remove-scan",
        "--reclaim-strategy scan --release-mode remove",
    ),
    (
        "memfd-punch-hole-count",
        "--reclaim-strategy count --release-mode punch-hole",
    ),
    (
        "memfd-remove-count",
        "--reclaim-strategy count --release-mode remove",
    ),
    (
        "anon4k-dontneed-count",
        "--no-thp --reclaim-strategy count --release-mode dontneed",
    ),
    (
        "anon4k-w16-dontneed-off",
        "--no-thp --fault-around 16 --reclaim-strategy off --release-mode dontneed",
    ),
    (
        "anon4k-w16-dontneed-scan",
        "--no-thp --fault-around 16 --reclaim-strategy scan --release-mode dontneed",
    ),
    (
        "anon4k-w16-free-count",
        "--no-thp --fault-around 16 --reclaim-strategy count --release-mode free",
    ),
    (
        "untracked-thp-dontneed",
        "--no-track --release-mode dontneed",
    ),
    (
        "untracked-4k-free",
        "--no-track --no-thp --release-mode free",
    ),
];

/// The ebb flags a variant's label stands for (`memfd-RELEASE-STRATEGY`,
/// `anon4k[-wN]-RELEASE-STRATEGY`, `untracked-thp|4k-RELEASE`), for round logs of variants no
/// longer in [`VARIANTS`].
pub(crate) fn flags_of_label(label: &str) -> Option<String> {
    if let Some(rest) = label.strip_prefix("untracked-") {
        let (fill, release) = rest.split_once('-')?;
        let thp = match fill {
            "thp" => "",
            "4k" => " --no-thp",
            _ => return None,
        };
        return Some(format!("--no-track{thp} --release-mode {release}"));
    }
    let (rest, strategy) = label.rsplit_once('-')?;
    let (fill, release) = if let Some(r) = rest.strip_prefix("memfd-") {
        (String::new(), r)
    } else if let Some(r) = rest.strip_prefix("anon4k-") {
        match r.strip_prefix('w').and_then(|w| w.split_once('-')) {
            Some((n, r)) if n.parse::<u32>().is_ok() => {
                (format!("--no-thp --fault-around {n} "), r)
            }
            _ => ("--no-thp ".to_string(), r),
        }
    } else {
        return None;
    };
    Some(format!(
        "{fill}--reclaim-strategy {strategy} --release-mode {release}"
    ))
}
/// The variant that is ebb's default configuration (tracked memfd RAM, count, punch-hole): the
/// ratios' denominator.
pub(crate) const DEFAULT_VARIANT: &str = "memfd-punch-hole-count";
/// ebb flags every variant runs with: HLT exits off, as in every rig test of tracked guests
/// (docs/ARCHITECTURE.md, "Known flakiness"); the variants differ only in their memory flags.
pub(crate) const VARIANT_COMMON_FLAGS: &str = "--hlt-in-guest";

/// The variants: a guest on 4 KiB pages (tracked: a userfault per page) boots several times
/// slower than a memfd one under the nested emulation (in the smoke run on the shared machine,
/// about 3 minutes from start to inflation against 1), so the guest is small enough to keep one
/// run of all variants over 2 rounds near 40 minutes on a quiet machine. The guest's boot alone
/// touches about 180 MiB (its kernel, and its initramfs twice); the balloon leaves it 160 MiB.
pub(crate) const VARIANT_SIZES: Sizes = Sizes {
    memory: 256,
    touch: 128,
    ws: 16,
    balloon: 96,
    retouch: 96,
};

/// The variants the rounds ran, in [`VARIANTS`]' order (unknown labels after them).
pub(crate) fn variant_names(rounds: &[Round]) -> Vec<String> {
    let mut ran: Vec<String> = Vec::new();
    for r in rounds {
        for n in r.names() {
            if !ran.contains(&n) {
                ran.push(n);
            }
        }
    }
    let mut v: Vec<String> = VARIANTS
        .iter()
        .map(|(l, _)| l.to_string())
        .filter(|l| ran.contains(l))
        .collect();
    let known: Vec<String> = v.clone();
    v.extend(ran.into_iter().filter(|l| !known.contains(l)));
    v
}

/// The markdown tables of `--variants` for one reporting setting: one row per variant (medians
/// over the rounds where it counts) and ratios against ebb's default configuration.
pub(crate) fn variant_tables(setting: &str, all: &[Round]) -> String {
    let of_setting: Vec<&Round> = all.iter().filter(|r| r.reporting == setting).collect();
    let names = variant_names(all);
    let med_v = |v: &str, phase: &str, key: &str| {
        median(
            of_setting
                .iter()
                .filter(|r| r.counts(v))
                .filter_map(|r| r.get(v, phase, key))
                .collect(),
        )
    };
    let counted = |v: &str| {
        of_setting
            .iter()
            .filter(|r| r.ran(v) && r.counts(v))
            .count()
    };
    let d = DEFAULT_VARIANT;
    let mut s = String::new();
    let n = of_setting.len();
    let _ = writeln!(
        s,
        "### Free page reporting {setting}: medians over {n} round{}
",
        if n == 1 { "" } else { "s" }
    );
    let left_out: Vec<String> = of_setting
        .iter()
        .filter(|r| !r.ok())
        .map(|r| format!("round {} ({})", r.round, r.all_problems().join("; ")))
        .collect();
    if !left_out.is_empty() {
        let _ = writeln!(
            s,
            "Left out (only the variants named; the round's others count): {}.\n",
            left_out.join("; ")
        );
    }
    let faults: Vec<String> = of_setting
        .iter()
        .flat_map(|r| {
            r.variant_faults
                .iter()
                .map(move |(v, f)| format!("{v} in round {} ({f})", r.round))
        })
        .collect();
    let whole: u32 = of_setting.iter().map(|r| r.rig_faults).sum();
    if !faults.is_empty() || whole > 0 {
        let _ = writeln!(
            s,
            "Re-run after a rig fault (the re-run counts): {}{}.\n",
            if faults.is_empty() {
                "no variant".to_string()
            } else {
                faults.join(", ")
            },
            if whole > 0 {
                format!("; whole rounds: {whole}")
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(
        s,
        "Times (the fault-path price is the first touch; `×` is the ratio to `{d}`, ebb's default):\n"
    );
    s.push_str(
        "| variant | rounds | first touch ns/page | × | guest-mm faults | inflate ms | × \
         | deflate ms | × | re-read ws ns/page | × | touch after deflation ns/page | × |\n",
    );
    s.push_str(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for v in &names {
        let _ = write!(s, "| {v} | {} ", counted(v));
        for (phase, key, with_faults) in [
            ("touched", "ns_per_page", true),
            ("inflated", "inflate_ms", false),
            ("deflated", "deflate_ms", false),
            ("retouch-ws", "ns_per_page", false),
            ("retouch", "ns_per_page", false),
        ] {
            let x = med_v(v, phase, key);
            let _ = write!(
                s,
                "| {} | {} ",
                show(x, Unit::Whole),
                ratio(x, med_v(d, phase, key))
            );
            if with_faults {
                let _ = write!(s, "| {} ", show(med_v(v, phase, "faults"), Unit::Whole));
            }
        }
        s.push_str("|\n");
    }
    s.push('\n');
    for (phase, what) in [
        ("touched", "after the first touch"),
        ("inflated", "after inflation (the give-back)"),
        ("deflated", "after deflation"),
    ] {
        let _ = writeln!(s, "Page tables and memory {what} (`{phase}`):\n");
        s.push_str(
            "| variant | ebb tables kB (min) | 2 MiB blocks emptied | host VmPTE kB | × \
             | L1 SecPageTables kB | × | VmRSS MiB | host memory MiB | × |\n",
        );
        s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for v in &names {
            let pte = med_v(v, phase, "VmPTE");
            let sec = med_v(v, phase, "SecPageTables");
            let host = med_v(v, phase, "host_kB");
            let tables = match med_v(v, phase, "table_bytes") {
                None => "–".to_string(),
                t => format!(
                    "{} ({})",
                    show(t, Unit::BytesAsKb),
                    show(med_v(v, phase, "min_table_bytes"), Unit::BytesAsKb)
                ),
            };
            let _ = writeln!(
                s,
                "| {v} | {tables} | {} | {} | {} | {} | {} | {} | {} | {} |",
                show(med_v(v, phase, "blocks_emptied"), Unit::Whole),
                show(pte, Unit::Whole),
                ratio(pte, med_v(d, phase, "VmPTE")),
                show(sec, Unit::Whole),
                ratio(sec, med_v(d, phase, "SecPageTables")),
                show(med_v(v, phase, "VmRSS"), Unit::KbAsMib),
                show(host, Unit::KbAsMib),
                ratio(host, med_v(d, phase, "host_kB")),
            );
        }
        s.push('\n');
    }
    let times: Vec<String> = of_setting
        .iter()
        .map(|r| format!("{:.0}", r.elapsed_s))
        .collect();
    let _ = writeln!(
        s,
        "Rounds took {} s (one L1 boot, all variants).\n",
        times.join(", ")
    );
    s
}

/// The markdown of `--variants`: how it was made, the scenario with its sizes, the tables.
pub(crate) fn variant_document(
    rounds: &[Round],
    settings: &[String],
    cmd: &str,
    commit: &str,
) -> String {
    let z = rounds.iter().find_map(|r| r.sizes).unwrap_or(VARIANT_SIZES);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Made by `{cmd}` at commit {commit}; the raw numbers of every round are in the CSV next to \
         the round logs (`target/bench/...`).\n"
    );
    let _ = write!(
        s,
        "Every variant runs the same scenario in the same L1 boot of the nested test host, one \
         after the other (the order rotated over rounds), with a {} MiB, 1 vCPU Debian guest, \
         `--balloon` and `{VARIANT_COMMON_FLAGS}`: the guest touches {} MiB (`touched`; its ns per \
         page are the fault path's price where ebb has not filled that memory yet), frees it (`freed`, once VmRSS settled), holds a {} MiB \
         working set, the balloon inflates to {} MiB (`inflated`, timed), the guest re-reads its \
         working set (ns per page), the balloon deflates to 0 (`deflated`, timed, sampled once \
         VmRSS settled) and the guest touches {} MiB fresh (ns per page). VmRSS and VmPTE are \
         ebb's; SecPageTables is L1's KVM second-level tables (one VM at a time); host memory \
         is VmRSS plus the pages of ebb's guest-RAM memfd no mapping maps; ebb's tables are \
         guest-mm's table bytes and, in brackets, the minimum for its leaves; 2 MiB blocks \
         emptied counts, since the start, the 2 MiB blocks released to the host whole \
         because a give-back emptied them. Absolute times \
         under emulation mean little; the ratios do.\n\n",
        z.memory, z.touch, z.ws, z.balloon, z.retouch
    );
    s.push_str("| variant | ebb flags |\n| --- | --- |\n");
    for v in variant_names(rounds) {
        let f = VARIANTS
            .iter()
            .find(|(l, _)| *l == v)
            .map(|(_, f)| f.to_string())
            .or_else(|| flags_of_label(&v))
            .unwrap_or_else(|| "?".into());
        let _ = writeln!(s, "| {v} | `{f}` |");
    }
    s.push('\n');
    for st in settings {
        s.push_str(&variant_tables(st, rounds));
    }
    s
}

/// Where `--docs` puts the tables of `--variants`: between these lines of
/// docs/BENCH-strategies.md (the prose around them stays).
pub(crate) const STRATEGIES_BEGIN: &str = "<!-- ebb-bench --variants: begin -->";
pub(crate) const STRATEGIES_END: &str = "<!-- ebb-bench --variants: end -->";

/// `doc` with the text between its markers replaced by `tables` (the markers appended first
/// when it has none).
pub(crate) fn between_markers(doc: &str, tables: &str) -> String {
    let (head, tail) = match (doc.find(STRATEGIES_BEGIN), doc.find(STRATEGIES_END)) {
        (Some(b), Some(e)) if b < e => (&doc[..b], &doc[e + STRATEGIES_END.len()..]),
        _ => (doc, "\n"),
    };
    let mut head = head.to_string();
    if !head.is_empty() && !head.ends_with("\n\n") {
        head.push_str(if head.ends_with('\n') { "\n" } else { "\n\n" });
    }
    format!(
        "{head}{STRATEGIES_BEGIN}\n{}\n{STRATEGIES_END}{tail}",
        tables.trim_end()
    )
}

/// The variants `--variants` asked for (`all`, or labels separated by commas), in
/// [`VARIANTS`]' order.
pub(crate) fn variants_of(arg: &str) -> Result<Vec<&'static str>, String> {
    if arg == "all" {
        return Ok(VARIANTS.iter().map(|(l, _)| *l).collect());
    }
    let asked: Vec<&str> = arg.split(',').map(str::trim).collect();
    for a in &asked {
        if !VARIANTS.iter().any(|(l, _)| l == a) {
            return Err(format!(
                "--variants: no variant {a}; they are: all, {}",
                VARIANTS
                    .iter()
                    .map(|(l, _)| *l)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(VARIANTS
        .iter()
        .map(|(l, _)| *l)
        .filter(|l| asked.contains(l))
        .collect())
}

/// The order of round `round` (1-based) of `rounds`: `names` rotated so that each round starts
/// `(round - 1) / rounds` of the way down the list.
pub(crate) fn rotated<T: Clone>(names: &[T], round: u32, rounds: u32) -> Vec<T> {
    if names.is_empty() {
        return Vec::new();
    }
    let n = names.len();
    let k = (round.saturating_sub(1) as usize * n / rounds.max(1) as usize) % n;
    names[k..].iter().chain(&names[..k]).cloned().collect()
}

/// Writes the tables and CSV of a `--variants` run (and, with `--docs`, the tables into
/// docs/BENCH-strategies.md); returns whether every variant counted in every round.
pub(crate) fn write_variants(
    cli: &Cli,
    dir: &Path,
    rounds: &[Round],
    settings: &[String],
    cmd: &str,
    commit: &str,
) -> Result<bool, Box<dyn Error>> {
    let md = variant_document(rounds, settings, cmd, commit);
    std::fs::write(dir.join("bench-strategies.md"), &md)?;
    std::fs::write(dir.join("bench-strategies.csv"), csv(rounds))?;
    println!("{md}");
    eprintln!(
        "ebb-bench: wrote {}/bench-strategies.{{md,csv}}",
        dir.display()
    );
    if cli.docs {
        let path = workspace_root().join("docs/BENCH-strategies.md");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        std::fs::write(&path, between_markers(&old, &md))?;
        eprintln!("ebb-bench: wrote the tables into docs/BENCH-strategies.md");
    }
    let all_ok = rounds.iter().all(Round::ok);
    if !all_ok {
        eprintln!("ebb-bench: some variants do not count in some rounds (see the table's notes)");
    }
    Ok(all_ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PHASES;
    use crate::round::tests::line;

    /// A `--variants` round: variant `a` meets a rig fault once and then completes, `b`
    /// completes, `c` fails a step.
    fn variants_log() -> String {
        let mut s = String::from(
            "EBB-BENCH-ROUND round=1 reporting=off order=a+b+c status=1 elapsed_s=90.0 \
             rig_faults=0 mode=variants memory_mib=256 touch_mib=128 ws_mib=16 balloon_mib=96 \
             retouch_mib=96\n",
        );
        s.push_str(&line("a", "touched", "ns_per_page=999"));
        s.push_str("EBB-BENCH-STATUS vmm=a status=3\n");
        s.push_str("EBB-BENCH-RIG-FAULT vmm=a attempt=1 fault=L2 triple fault under ebb\n");
        for v in ["a", "b"] {
            for ph in PHASES {
                s.push_str(&line(v, ph, "ns_per_page=100 bad_pages=0 "));
            }
            s.push_str(&format!("EBB-BENCH-STATUS vmm={v} status=0\n"));
        }
        s.push_str(&line("c", "touched", "ns_per_page=50"));
        s.push_str("EBB-BENCH-FAIL vmm=c the guest never freed its memory\n");
        s.push_str("EBB-BENCH-STATUS vmm=c status=0\n");
        s
    }

    #[test]
    fn a_variant_round_counts_each_variant_on_its_own() {
        let r = Round::parse(&variants_log());
        assert!(r.variants);
        assert_eq!(r.sizes, Some(VARIANT_SIZES));
        assert_eq!(r.names(), ["a", "b", "c"]);
        assert!(r.counts("a") && r.counts("b") && !r.counts("c"));
        assert!(!r.ok(), "c failed");
        assert_eq!(r.variant_faults.len(), 1);
        assert_eq!(
            r.get("a", "touched", "ns_per_page"),
            Some(100.0),
            "the faulted attempt's figures are gone"
        );
        assert!(r.all_problems().iter().any(|p| p.contains("never freed")));
        // A variant that exits non-zero does not count.
        let log = variants_log().replace("vmm=b status=0", "vmm=b status=4");
        assert!(!Round::parse(&log).counts("b"));
    }

    #[test]
    fn variant_tables_have_a_row_per_variant_and_ratios_against_the_default() {
        let log = variants_log()
            .replace("vmm=a ", &format!("vmm={DEFAULT_VARIANT} "))
            .replace("order=a+", &format!("order={DEFAULT_VARIANT}+"));
        let rounds = vec![Round::parse(&log)];
        let t = variant_tables("off", &rounds);
        assert!(
            t.contains(&format!("| {DEFAULT_VARIANT} | 1 | 100 | 1.00 |")),
            "{t}"
        );
        assert!(t.contains("| b | 1 | 100 | 1.00 |"), "{t}");
        assert!(t.contains("| c | 0 | – | – |"), "{t}");
        assert!(t.contains("| b | – | – | 100 | 1.00 | 40 | 1.00 |"), "{t}");
        let d = variant_document(&rounds, &["off".into()], "cmd", "abc");
        assert!(d.contains("256 MiB, 1 vCPU"), "{d}");
        // A round of an older list that did not run `b` is no sample of it.
        let older = log
            .replace("round=1", "round=2")
            .replace("+b+", "+")
            .lines()
            .filter(|l| !l.contains("vmm=b "))
            .map(|l| format!("{l}\n"))
            .collect::<String>();
        let two = vec![Round::parse(&log), Round::parse(&older)];
        let t = variant_tables("off", &two);
        assert!(t.contains(&format!("| {DEFAULT_VARIANT} | 2 |")), "{t}");
        assert!(t.contains("| b | 1 |"), "{t}");
    }

    #[test]
    fn variants_rotate_and_are_chosen_by_label() {
        let v = ["a", "b", "c", "d"];
        assert_eq!(rotated(&v, 1, 2), ["a", "b", "c", "d"]);
        assert_eq!(rotated(&v, 2, 2), ["c", "d", "a", "b"]);
        assert_eq!(rotated(&v, 3, 3), ["c", "d", "a", "b"]);
        assert_eq!(variants_of("all").unwrap().len(), VARIANTS.len());
        assert_eq!(
            variants_of("untracked-4k-free,memfd-remove-off").unwrap(),
            ["memfd-remove-off", "untracked-4k-free"]
        );
        assert!(variants_of("nope").is_err());
        assert!(VARIANTS.iter().any(|(l, _)| *l == DEFAULT_VARIANT));
        for (l, f) in VARIANTS {
            assert_eq!(flags_of_label(l).as_deref(), Some(f), "{l}");
        }
        assert_eq!(
            flags_of_label("anon4k-free-scan").as_deref(),
            Some("--no-thp --reclaim-strategy scan --release-mode free")
        );
        assert_eq!(flags_of_label("other"), None);
    }

    #[test]
    fn docs_keep_their_prose_around_the_markers() {
        let doc = format!("# T\n\nprose\n\n{STRATEGIES_BEGIN}\nold\n{STRATEGIES_END}\n\nmore\n");
        let new = between_markers(&doc, "new tables\n");
        assert_eq!(
            new,
            format!("# T\n\nprose\n\n{STRATEGIES_BEGIN}\nnew tables\n{STRATEGIES_END}\n\nmore\n")
        );
        assert_eq!(between_markers(&new, "new tables"), new);
        let fresh = between_markers("", "t");
        assert!(
            fresh.starts_with(STRATEGIES_BEGIN) && fresh.contains("\nt\n"),
            "{fresh}"
        );
    }
}
