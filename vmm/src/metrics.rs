//! `GET /metrics`: ebb's figures in the OpenMetrics text format (Prometheus reads it), encoded by
//! the `prometheus-client` crate. Each scrape builds the metrics from the memory report and the
//! devices' figures of that moment; nothing is kept between scrapes.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use serde_json::Value;

use crate::report::MemoryReport;

fn gauge(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: u64) {
    let g: Gauge = Gauge::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, g),
        None => reg.register(name, help, g),
    }
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter = Counter::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// The text of one scrape: the memory report, and the balloon's figures when there is one
/// (`balloon`: the device's part of `GET /memory`).
pub fn render(report: &MemoryReport, balloon: Option<&Value>) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("ebb");
    gauge(
        &mut reg,
        "guest_ram",
        "Guest RAM",
        Some(Unit::Bytes),
        report.guest_bytes,
    );
    gauge(
        &mut reg,
        "guest_resident",
        "Guest RAM the host holds",
        Some(Unit::Bytes),
        report.resident_pages * 4096,
    );
    if let Some(b) = report.host_pte_bytes {
        gauge(
            &mut reg,
            "host_page_tables",
            "The process's page tables (VmPTE)",
            Some(Unit::Bytes),
            b,
        );
    }
    if let Some(b) = report.kvm_table_bytes {
        gauge(
            &mut reg,
            "kvm_page_tables",
            "KVM's second-level tables (SecPageTables)",
            Some(Unit::Bytes),
            b,
        );
    }
    gauge(
        &mut reg,
        "balloon_pending",
        "Ballooned pages waiting for the rest of their 2 MiB block",
        None,
        report.balloon_pending_pages,
    );
    counter(
        &mut reg,
        "kvm_table_zaps",
        "Times KVM was made to drop its tables",
        report.kvm_zaps.zaps,
    );
    if let Some(t) = &report.tracked {
        gauge(
            &mut reg,
            "leaves_4k",
            "4 KiB leaves in guest-mm's tables",
            None,
            t.leaves_4k,
        );
        gauge(
            &mut reg,
            "leaves_2m",
            "2 MiB leaves in guest-mm's tables",
            None,
            t.leaves_2m,
        );
        gauge(
            &mut reg,
            "table",
            "guest-mm's table pages",
            Some(Unit::Bytes),
            t.table_bytes,
        );
        gauge(
            &mut reg,
            "table_minimum",
            "The fewest table pages that map the leaves",
            Some(Unit::Bytes),
            t.min_table_bytes,
        );
        counter(&mut reg, "faults", "Guest faults guest-mm filled", t.faults);
        counter(
            &mut reg,
            "promotions",
            "Blocks made one 2 MiB page again",
            t.promotions,
        );
    }
    if let Some(b) = balloon {
        let n = |k: &str| b[k].as_u64().unwrap_or(0);
        gauge(
            &mut reg,
            "balloon_target",
            "The balloon's target",
            Some(Unit::Bytes),
            n("target_pages") * 4096,
        );
        gauge(
            &mut reg,
            "balloon_actual",
            "The balloon's size, as the guest's driver says",
            Some(Unit::Bytes),
            n("actual_pages") * 4096,
        );
        gauge(
            &mut reg,
            "balloon_held",
            "Pages the device holds",
            None,
            n("held_pages"),
        );
        if let Some(c) = b["counters"].as_object() {
            for (name, v) in c {
                if let Some(v) = v.as_u64() {
                    if name == "notify_ns_max" {
                        gauge(
                            &mut reg,
                            "balloon_notify_ns_max",
                            "Longest queue notification, ns",
                            None,
                            v,
                        );
                    } else {
                        counter(
                            &mut reg,
                            &format!("balloon_{name}"),
                            &format!("Balloon device: {name}"),
                            v,
                        );
                    }
                }
            }
        }
    }
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{KvmZaps, TrackStats};

    #[test]
    fn a_scrape_has_the_figures_in_openmetrics_text() {
        let report = MemoryReport {
            guest_bytes: 512 << 20,
            policy: crate::report::Policy::default(),
            resident_pages: 1000,
            host_huge_bytes: None,
            host_pte_bytes: Some(81920),
            kvm_table_bytes: None,
            kvm_zaps: KvmZaps::default(),
            balloon_pending_pages: 0,
            tracked: Some(TrackStats {
                leaves_4k: 488,
                leaves_2m: 1,
                table_bytes: 16384,
                min_table_bytes: 16384,
                ..TrackStats::default()
            }),
        };
        let balloon = serde_json::json!({"target_pages": 256, "actual_pages": 128, "held_pages": 128,
            "counters": {"pages_inflated": 128, "notify_ns_max": 5000}});
        let text = render(&report, Some(&balloon)).unwrap();
        for line in [
            "ebb_guest_resident_bytes 4096000",
            "ebb_host_page_tables_bytes 81920",
            "ebb_leaves_4k 488",
            "ebb_table_bytes 16384",
            "ebb_table_minimum_bytes 16384",
            "ebb_balloon_target_bytes 1048576",
            "ebb_balloon_pages_inflated_total 128",
            "ebb_balloon_notify_ns_max 5000",
            "# TYPE ebb_faults counter",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
        assert!(
            !text.contains("kvm_page_tables"),
            "unknown figures are left out"
        );
    }
}
