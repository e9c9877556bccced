//! The memory report printed at exit and served by the API.

use serde::Serialize;

/// Figures from guest-mm's second-level tables.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct TrackStats {
    /// 4 KiB leaves.
    pub leaves_4k: u64,
    /// 2 MiB leaves.
    pub leaves_2m: u64,
    /// Table pages per level: PT, PD, PDPT, PML4.
    pub tables: [u64; 4],
    /// Bytes of table pages.
    pub table_bytes: u64,
    /// Smallest table bytes that can map the current leaves.
    pub min_table_bytes: u64,
    /// Guest page faults resolved by the userfaultfd handlers.
    pub faults: u64,
    /// Pages the guest holds in its balloon (filled only if the guest touches them).
    pub held_pages: u64,
    /// Released pages the host kept (it could not split a 2 MiB page); they keep their leaves.
    pub pages_kept: u64,
    /// Split 2 MiB blocks made one 2 MiB host page and leaf again once all their pages were
    /// back (re-promotion), and the time that took in all, ns.
    pub promotions: u64,
    /// See `promotions`.
    pub promote_ns: u64,
    /// Faults the handlers put back on their retry queue (the page was being released, or a
    /// remove event was pending), and faults they could not resolve at all: a thread whose
    /// fault failed stays blocked, so a non-zero `faults_failed` explains a stalled vCPU.
    pub faults_deferred: u64,
    /// See `faults_deferred`.
    pub faults_failed: u64,
}

/// KVM's nested-table zaps (`--zap-kvm-tables-after`) and what triggers them.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct KvmZaps {
    /// Times KVM was made to drop its nested tables.
    pub zaps: u64,
    /// Their total duration, ns.
    pub ns_total: u64,
    /// The longest, ns.
    pub ns_max: u64,
    /// 2 MiB blocks give-backs emptied so far.
    pub blocks_emptied: u64,
}

/// The reclaim strategy and release mode in force.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Policy {
    /// How guest-mm finds emptied tables.
    pub strategy: crate::config::ReclaimStrategy,
    /// How given-back memory is released.
    pub release: crate::config::ReleaseChoice,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            strategy: crate::config::ReclaimStrategy::Count,
            release: crate::config::ReleaseChoice::PunchHole,
        }
    }
}

/// Everything the report says.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MemoryReport {
    /// Guest RAM size in bytes.
    pub guest_bytes: u64,
    /// The reclaim strategy and release mode in force.
    pub policy: Policy,
    /// 4 KiB pages of guest RAM resident in the host (mincore).
    pub resident_pages: u64,
    /// Bytes of guest RAM the host maps with 2 MiB entries (smaps), if known.
    pub host_huge_bytes: Option<u64>,
    /// Bytes of the host's page tables for this process (`VmPTE`), if readable.
    pub host_pte_bytes: Option<u64>,
    /// Bytes of KVM's second-level (nested) tables on this host (`SecPageTables` in
    /// /proc/meminfo: every VM's, so this VM's where it runs alone), if readable.
    pub kvm_table_bytes: Option<u64>,
    /// KVM table zaps.
    pub kvm_zaps: KvmZaps,
    /// Pages the balloon holds whose release waits for the rest of their 2 MiB block (still
    /// backed; see `VmMemory::discard_held`).
    pub balloon_pending_pages: u64,
    /// Tracking figures, if tracking is on.
    pub tracked: Option<TrackStats>,
}

/// A setting's name as the config file spells it.
fn kebab<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// A `kB` figure from a /proc file of `Key: value kB` lines, in bytes.
pub fn proc_kb(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
}

/// The host's page-table bytes for this process and KVM's nested-table bytes on this host.
/// /proc/meminfo's counters are per-CPU sums refreshed about once a second; writing
/// `stat_refresh` (root only; a failure is ignored) makes them current.
pub fn host_table_bytes() -> (Option<u64>, Option<u64>) {
    let _ = std::fs::write("/proc/sys/vm/stat_refresh", "1");
    (
        proc_kb("/proc/self/status", "VmPTE"),
        proc_kb("/proc/meminfo", "SecPageTables"),
    )
}

impl MemoryReport {
    /// Pages covered by the leaves, in 4 KiB units.
    pub fn leaf_pages(&self) -> Option<u64> {
        self.tracked.map(|t| t.leaves_4k + 512 * t.leaves_2m)
    }

    /// The one-screen text form.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("---- ebb memory report ----\n");
        s.push_str(&format!(
            "guest RAM:            {:>10.1} MiB\n",
            mib(self.guest_bytes)
        ));
        s.push_str(&format!(
            "reclaim / release:    {:>10}  / {}\n",
            kebab(&self.policy.strategy),
            kebab(&self.policy.release)
        ));
        s.push_str(&format!(
            "touched (resident):   {:>10.1} MiB  ({} pages of 4 KiB)\n",
            mib(self.resident_pages * 4096),
            self.resident_pages
        ));
        if let Some(b) = self.host_huge_bytes {
            s.push_str(&format!(
                "host 2 MiB mappings:  {:>10.1} MiB  ({} of 2 MiB)\n",
                mib(b),
                b >> 21
            ));
        }
        if self.host_pte_bytes.is_some() || self.kvm_table_bytes.is_some() {
            let kb = |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{} kB", b >> 10));
            s.push_str(&format!(
                "host page tables:     {:>10}  (VmPTE; KVM's nested tables on this host: {})\n",
                kb(self.host_pte_bytes),
                kb(self.kvm_table_bytes)
            ));
        }
        let z = &self.kvm_zaps;
        if z.zaps > 0 || z.blocks_emptied > 0 {
            s.push_str(&format!(
                "KVM table zaps:       {:>10}  ({:.1} ms total, longest {:.1} ms; {} blocks emptied)\n",
                z.zaps,
                z.ns_total as f64 / 1e6,
                z.ns_max as f64 / 1e6,
                z.blocks_emptied
            ));
        }
        if self.balloon_pending_pages > 0 {
            s.push_str(&format!(
                "balloon pending:      {:>10}  pages held, released with their whole block\n",
                self.balloon_pending_pages
            ));
        }
        match &self.tracked {
            None => s.push_str("tracking:             off (--no-track)\n"),
            Some(t) => {
                let leaf_pages = t.leaves_4k + 512 * t.leaves_2m;
                s.push_str(&format!(
                    "leaves:               {:>10} x 4 KiB + {} x 2 MiB = {:.1} MiB\n",
                    t.leaves_4k,
                    t.leaves_2m,
                    mib(leaf_pages * 4096)
                ));
                s.push_str(&format!(
                    "table pages:          PT {} | PD {} | PDPT {} | PML4 {}\n",
                    t.tables[0], t.tables[1], t.tables[2], t.tables[3]
                ));
                let verdict = if t.table_bytes == t.min_table_bytes {
                    "(minimal)"
                } else {
                    "(above minimum)"
                };
                s.push_str(&format!(
                    "table bytes:          {:>10}  minimum {} {}\n",
                    t.table_bytes, t.min_table_bytes, verdict
                ));
                s.push_str(&format!("faults handled:       {:>10}\n", t.faults));
                if t.faults_deferred + t.faults_failed > 0 {
                    s.push_str(&format!(
                        "faults deferred:      {:>10}  (failed, their threads blocked: {})\n",
                        t.faults_deferred, t.faults_failed
                    ));
                }
                if t.promotions > 0 {
                    s.push_str(&format!(
                        "blocks re-promoted:   {:>10}  ({:.1} ms)\n",
                        t.promotions,
                        t.promote_ns as f64 / 1e6
                    ));
                }
                if t.held_pages + t.pages_kept > 0 {
                    s.push_str(&format!(
                        "balloon-held pages:   {:>10}  (released but kept by the host: {})\n",
                        t.held_pages, t.pages_kept
                    ));
                }
                let cover = if leaf_pages >= self.resident_pages {
                    "yes"
                } else {
                    "NO"
                };
                s.push_str(&format!(
                    "leaves cover touched: {:>10}  ({} leaf pages vs {} resident)\n",
                    cover, leaf_pages, self.resident_pages
                ));
            }
        }
        s.push_str("---------------------------");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_tracked_and_untracked() {
        let mut r = MemoryReport {
            guest_bytes: 256 << 20,
            policy: Policy::default(),
            resident_pages: 1000,
            host_huge_bytes: Some(4 << 20),
            host_pte_bytes: Some(48 << 10),
            kvm_table_bytes: None,
            kvm_zaps: KvmZaps::default(),
            balloon_pending_pages: 0,
            tracked: None,
        };
        assert!(r.render().contains("off"));
        assert!(r.render().contains("host page tables:          48 kB"));
        assert!(r.render().contains("on this host: ?"));
        assert_eq!(r.leaf_pages(), None);
        r.tracked = Some(TrackStats {
            leaves_4k: 1000,
            tables: [2, 1, 1, 1],
            table_bytes: 5 * 4096,
            min_table_bytes: 5 * 4096,
            faults: 1000,
            ..TrackStats::default()
        });
        let text = r.render();
        assert!(text.contains("(minimal)"));
        assert!(text.contains("yes"));
        assert!(text.lines().count() < 24, "fits one screen");
    }
}
