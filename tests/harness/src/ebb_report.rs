//! ebb's memory report (`---- ebb memory report ----`, printed when ebb exits), parsed for the
//! rig tests. Leaves come in two sizes: `leaves: A x 4 KiB + B x 2 MiB = X MiB`; the pages they
//! cover ("leaf pages") are `A + 512 * B`. Every figure that the report prints twice is checked
//! against its other form, so a change of layout fails here instead of being misread.

use std::collections::HashMap;

/// 4 KiB pages in a 2 MiB leaf.
pub const PAGES_PER_2M: u64 = 512;

const HEADER: &str = "---- ebb memory report ----";

/// The tracked figures of one report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EbbReport {
    /// Guest pages resident (4 KiB units), from `touched (resident)`.
    pub resident_pages: u64,
    /// 4 KiB leaves.
    pub leaves_4k: u64,
    /// 2 MiB leaves.
    pub leaves_2m: u64,
    /// Bytes of second-level tables, and the least those leaves need.
    pub table_bytes: u64,
    pub min_table_bytes: u64,
    /// Faults the fault path handled.
    pub faults: u64,
    /// `leaves cover touched: yes|NO`.
    pub covers: bool,
}

/// Why a report could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("no ebb memory report in the output")]
    NoReport,
    #[error("the report has no {0:?} line (is tracking off?)")]
    MissingLine(&'static str),
    #[error("cannot read report line {line:?}: {why}")]
    BadLine { line: String, why: String },
}

/// The numeric `key=value` fields of the first output line that starts with `tag label=LABEL `
/// (the lines `scripts/ebb-l1-lib.sh` prints: `EBB-BALLOON-SNAP`, `EBB-BALLOON-STATS`). A field
/// whose value is empty or not a number is left out, so a missing figure shows as a missing key.
pub fn labelled_fields(text: &str, tag: &str, label: &str) -> Option<HashMap<String, u64>> {
    let head = format!("{tag} label={label} ");
    let line = text.lines().find(|l| l.starts_with(&head))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect(),
    )
}

impl EbbReport {
    /// Pages covered by the leaves, in 4 KiB units (`A + 512 * B`).
    pub fn leaf_pages(&self) -> u64 {
        self.leaves_4k
            .saturating_add(self.leaves_2m.saturating_mul(PAGES_PER_2M))
    }

    /// Leaves of either size.
    pub fn leaves(&self) -> u64 {
        self.leaves_4k.saturating_add(self.leaves_2m)
    }

    /// Parses the last report in `text` (ebb's output).
    pub fn parse(text: &str) -> Result<Self, ReportError> {
        let start = text.rfind(HEADER).ok_or(ReportError::NoReport)?;
        let lines: Vec<&str> = text[start + HEADER.len()..]
            .lines()
            .map(str::trim)
            .take_while(|l| !l.starts_with("-----"))
            .collect();
        let line = |prefix: &'static str| -> Result<&str, ReportError> {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(prefix))
                .map(str::trim)
                .ok_or(ReportError::MissingLine(prefix))
        };
        let bad = |prefix: &str, rest: &str, why: &str| ReportError::BadLine {
            line: format!("{prefix} {rest}"),
            why: why.to_string(),
        };

        let p = "touched (resident):";
        let rest = line(p)?;
        let resident_pages = rest
            .split_once('(')
            .and_then(|(_, r)| first_u64(r))
            .ok_or_else(|| bad(p, rest, "no page count in parentheses"))?;

        let p = "leaves:";
        let rest = line(p)?;
        let (leaves_4k, leaves_2m, mib) = parse_leaves(rest).map_err(|why| bad(p, rest, &why))?;

        let p = "table bytes:";
        let rest = line(p)?;
        let table_bytes = first_u64(rest).ok_or_else(|| bad(p, rest, "no byte count"))?;
        let min_table_bytes = rest
            .split_once("minimum")
            .and_then(|(_, r)| first_u64(r))
            .ok_or_else(|| bad(p, rest, "no minimum"))?;

        let p = "faults handled:";
        let rest = line(p)?;
        let faults = first_u64(rest).ok_or_else(|| bad(p, rest, "no count"))?;

        let p = "leaves cover touched:";
        let rest = line(p)?;
        let covers = match rest.split_whitespace().next() {
            Some("yes") => true,
            Some("NO") => false,
            _ => return Err(bad(p, rest, "expected yes or NO")),
        };
        let report = EbbReport {
            resident_pages,
            leaves_4k,
            leaves_2m,
            table_bytes,
            min_table_bytes,
            faults,
            covers,
        };

        // Cross-checks: the same figures printed twice must agree.
        if let Some(mib) = mib {
            let want = report.leaf_pages() as f64 * 4096.0 / (1u64 << 20) as f64;
            if (mib - want).abs() > 0.051 {
                return Err(bad(
                    "leaves:",
                    line("leaves:")?,
                    &format!("total {mib} MiB, but the leaves make {want:.1} MiB"),
                ));
            }
        }
        if let Some((_, r)) = rest.split_once('(') {
            let mut nums = r.split_whitespace().filter_map(|w| w.parse::<u64>().ok());
            let (leaf, res) = (nums.next(), nums.next());
            if leaf != Some(report.leaf_pages()) || res != Some(resident_pages) {
                return Err(bad(
                    p,
                    rest,
                    &format!(
                        "expected {} leaf pages vs {resident_pages} resident",
                        report.leaf_pages()
                    ),
                ));
            }
        }
        Ok(report)
    }
}

/// The first whitespace-separated word of `s` that is an integer.
fn first_u64(s: &str) -> Option<u64> {
    s.split_whitespace().next()?.parse().ok()
}

/// `A x 4 KiB + B x 2 MiB = X MiB` (either term may be missing, in either order) into
/// `(A, B, Some(X))`.
fn parse_leaves(s: &str) -> Result<(u64, u64, Option<f64>), String> {
    let (terms, total) = match s.split_once('=') {
        Some((t, total)) => (t, Some(total.trim())),
        None => (s, None),
    };
    let (mut a, mut b) = (None, None);
    for term in terms.split('+') {
        let w: Vec<&str> = term.split_whitespace().collect();
        let [n, "x", size, unit] = w[..] else {
            return Err(format!("term {:?} is not \"N x SIZE UNIT\"", term.trim()));
        };
        let n: u64 = n.parse().map_err(|_| format!("{n:?} is not a count"))?;
        let slot = match (size, unit) {
            ("4", "KiB") => &mut a,
            ("2", "MiB") => &mut b,
            _ => return Err(format!("unknown leaf size {size} {unit}")),
        };
        if slot.replace(n).is_some() {
            return Err(format!("leaf size {size} {unit} given twice"));
        }
    }
    if a.is_none() && b.is_none() {
        return Err("no leaf counts".into());
    }
    let mib = match total {
        None => None,
        Some(t) => {
            let v = t
                .strip_suffix("MiB")
                .and_then(|v| v.trim().parse::<f64>().ok())
                .ok_or_else(|| format!("total {t:?} is not \"X MiB\""))?;
            Some(v)
        }
    };
    Ok((a.unwrap_or(0), b.unwrap_or(0), mib))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(leaves: &str, resident: u64, cover: &str) -> String {
        format!(
            "[ 12.0] reboot: Power down\nebb: guest powered off\n{HEADER}\n\
             guest RAM:                 512.0 MiB\n\
             touched (resident):        {:.1} MiB  ({resident} pages of 4 KiB)\n\
             leaves:               {leaves}\n\
             table pages:          PT 130 | PD 1 | PDPT 1 | PML4 1\n\
             table bytes:              544768  minimum 544768 (minimal)\n\
             faults handled:            71234\n\
             leaves cover touched:        {cover}\n\
             ---------------------------\n",
            resident as f64 / 256.0
        )
    }

    #[test]
    fn four_kib_and_two_mib_leaves() {
        let text = report(
            "    1000 x 4 KiB + 130 x 2 MiB = 263.9 MiB",
            67560,
            "yes  (67560 leaf pages vs 67560 resident)",
        );
        let r = EbbReport::parse(&text).unwrap();
        assert_eq!((r.leaves_4k, r.leaves_2m), (1000, 130));
        assert_eq!(r.leaf_pages(), 1000 + 512 * 130);
        assert_eq!(r.leaves(), 1130);
        assert_eq!(r.resident_pages, 67560);
        assert_eq!((r.table_bytes, r.min_table_bytes), (544768, 544768));
        assert_eq!(r.faults, 71234);
        assert!(r.covers);
    }

    #[test]
    fn only_four_kib_leaves_in_either_form() {
        for leaves in [
            "65536 x 4 KiB + 0 x 2 MiB = 256.0 MiB",
            "65536 x 4 KiB = 256.0 MiB",
            "65536 x 4 KiB",
        ] {
            let text = report(leaves, 65536, "yes  (65536 leaf pages vs 65536 resident)");
            let r = EbbReport::parse(&text).unwrap_or_else(|e| panic!("{leaves}: {e}"));
            assert_eq!(
                (r.leaves_4k, r.leaves_2m, r.leaf_pages()),
                (65536, 0, 65536)
            );
        }
    }

    #[test]
    fn the_last_report_counts() {
        let first = report("1 x 4 KiB", 1, "yes  (1 leaf pages vs 1 resident)");
        let second = report("2 x 4 KiB", 2, "yes  (2 leaf pages vs 2 resident)");
        let r = EbbReport::parse(&format!("{first}{second}")).unwrap();
        assert_eq!(r.leaves_4k, 2);
    }

    #[test]
    fn inconsistent_or_malformed_reports_are_errors() {
        let cases = [
            // The total does not match the counts.
            report(
                "10 x 4 KiB + 1 x 2 MiB = 9.0 MiB",
                522,
                "yes  (522 leaf pages vs 522 resident)",
            ),
            // The cover line's leaf pages disagree with A + 512 * B.
            report(
                "10 x 4 KiB + 1 x 2 MiB",
                522,
                "yes  (10 leaf pages vs 522 resident)",
            ),
            // Unknown leaf size, repeated size, junk counts.
            report("10 x 1 GiB", 10, "yes"),
            report("10 x 4 KiB + 3 x 4 KiB", 13, "yes"),
            report("ten x 4 KiB", 10, "yes"),
            report("", 0, "yes"),
            report("10 x 4 KiB", 10, "maybe"),
        ];
        for text in &cases {
            assert!(
                matches!(EbbReport::parse(text), Err(ReportError::BadLine { .. })),
                "{text}"
            );
        }
        assert_eq!(EbbReport::parse("no report"), Err(ReportError::NoReport));
        let untracked = format!(
            "{HEADER}\ntouched (resident): 1.0 MiB  (256 pages of 4 KiB)\ntracking: off\n----\n"
        );
        assert_eq!(
            EbbReport::parse(&untracked),
            Err(ReportError::MissingLine("leaves:"))
        );
    }

    #[test]
    fn a_report_as_ebb_prints_it_in_the_rig() {
        // Taken from a tracked boot in the rig (memfd RAM, 2 MiB leaves), console around it.
        let text = "EBB-L2-END status=0\n[    4.780112] reboot: Power down\n\n\
            ---- ebb memory report ----\n\
            guest RAM:                 512.0 MiB\n\
            touched (resident):        412.0 MiB  (105472 pages of 4 KiB)\n\
            host 2 MiB mappings:       412.0 MiB  (206 of 2 MiB)\n\
            leaves:                        0 x 4 KiB + 206 x 2 MiB = 412.0 MiB\n\
            table pages:          PT 0 | PD 1 | PDPT 1 | PML4 1\n\
            table bytes:               12288  minimum 12288 (minimal)\n\
            faults handled:              206\n\
            leaves cover touched:        yes  (105472 leaf pages vs 105472 resident)\n\
            ---------------------------\n\
            ebb: guest powered off after 6.276 s (1034 vCPU exits)\n";
        let r = EbbReport::parse(text).unwrap();
        assert_eq!((r.leaves_4k, r.leaves_2m), (0, 206));
        assert_eq!(r.leaf_pages(), 105472);
        assert_eq!(r.resident_pages, 105472);
        assert_eq!(
            (r.table_bytes, r.min_table_bytes, r.faults),
            (12288, 12288, 206)
        );
        assert!(r.faults >= r.leaves());
    }

    #[test]
    fn not_covering_is_read_as_such() {
        let text = report("10 x 4 KiB", 12, "NO  (10 leaf pages vs 12 resident)");
        assert!(!EbbReport::parse(&text).unwrap().covers);
    }

    #[test]
    fn labelled_fields_take_numbers_of_the_named_line() {
        let text = "x\nEBB-BALLOON-SNAP label=held resident=10 held=\nEBB-BALLOON-SNAP label=inflated resident=7 kept=0\n";
        let f = labelled_fields(text, "EBB-BALLOON-SNAP", "inflated").unwrap();
        assert_eq!(f.get("resident"), Some(&7));
        assert_eq!(f.get("kept"), Some(&0));
        let f = labelled_fields(text, "EBB-BALLOON-SNAP", "held").unwrap();
        assert_eq!(f.get("held"), None, "an empty value is a missing key");
        assert!(labelled_fields(text, "EBB-BALLOON-SNAP", "hel").is_none());
        assert!(labelled_fields(text, "EBB-BALLOON-STATS", "held").is_none());
    }
}
