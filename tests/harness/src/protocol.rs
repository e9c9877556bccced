//! Parsing of the console transcript: the rig's and the guest's markers, result lines and samples.
//! Markers may appear anywhere in a line (firmware escape codes or kernel messages can precede
//! them), so each is searched for rather than matched at the start.

use std::collections::BTreeMap;

/// L1's page-table counters from `/proc/meminfo`, in kB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meminfo {
    /// KVM's second-level (NPT/EPT) tables.
    pub sec_page_tables_kb: u64,
    /// Page tables of L1's processes.
    pub page_tables_kb: u64,
}

/// Whether `line` is L1's heartbeat (`EBB-RIG-ALIVE`, printed by rig-job every 15 s).
pub fn is_heartbeat(line: &str) -> bool {
    line.contains("EBB-RIG-ALIVE")
}

/// One `EBB-RIG-SAMPLE` line: a process's memory and L1's page-table counters at that moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcSample {
    /// Why it was taken: `periodic`, `guest-done`, or a label given to `rig-sample`.
    pub label: String,
    pub pid: u32,
    pub comm: String,
    /// L1 uptime in milliseconds.
    pub t_ms: u64,
    pub vm_rss_kb: u64,
    pub vm_pte_kb: u64,
    pub meminfo: Meminfo,
}

/// One `EBB-RESULT <name> key=value ...` line printed by a workload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResultLine {
    pub name: String,
    pub fields: BTreeMap<String, String>,
}

impl ResultLine {
    /// A field parsed as an integer.
    pub fn u64(&self, key: &str) -> Option<u64> {
        self.fields.get(key)?.parse().ok()
    }

    /// A field parsed as a float.
    pub fn f64(&self, key: &str) -> Option<f64> {
        self.fields.get(key)?.parse().ok()
    }

    /// A field as text.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }
}

/// Everything recognised in a console transcript.
#[derive(Clone, Debug, Default)]
pub struct Transcript {
    /// `EBB-RIG-KVM` line (L1 only).
    pub kvm: Option<String>,
    /// `EBB-RIG-ERROR` messages.
    pub errors: Vec<String>,
    /// Whether `EBB-RIG-BEGIN` was seen.
    pub begun: bool,
    /// Lines between BEGIN and END, without sample lines.
    pub output: Vec<String>,
    /// From `EBB-RIG-END status=N`.
    pub status: Option<i32>,
    /// From `EBB-RIG-MEMINFO`.
    pub meminfo: Option<Meminfo>,
    /// Whether `EBB-RIG-DONE` was seen.
    pub done: bool,
    pub samples: Vec<ProcSample>,
    pub results: Vec<ResultLine>,
    /// From the L2 guest's `EBB-L2-END status=N` (last one seen).
    pub guest_status: Option<i32>,
    /// From `EBB-PEER-ERROR`.
    pub peer_errors: Vec<String>,
    /// From `EBB-RIG-L1-OOPS`, or from L1's own oops report on the console: L1's kernel oopsed.
    pub l1_oops: Option<String>,
    /// From `EBB-RIG-L1-LOCKUP`, or from L1's own report on the console: L1's kernel saw a CPU
    /// stuck (a soft lockup or an RCU stall).
    pub l1_lockup: Option<String>,
    /// `EBB-RIG-ALIVE` lines seen: L1's heartbeat while the job runs.
    pub heartbeats: u64,
    /// From `EBB-RIG-KVM-PIN`: the idle VM L1 holds during the job (`pid=N`), or why it could
    /// not (in L1 only).
    pub kvm_pin: Option<String>,
    /// The last kernel report's opening line seen, until a line naming a module only L1 has
    /// tells whose kernel it was.
    last_report: Option<(KernelReport, String)>,
}

/// What a kernel report on the console is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelReport {
    /// `Oops:`, `BUG:` (not a soft lockup), `general protection fault`.
    Oops,
    /// `BUG: soft lockup`, or an RCU stall (`detected stall`, `self-detected stall`).
    Lockup,
}

/// A module that only L1 loads: a report listing it ("Modules linked in:") or with a stack frame
/// in it (`[kvm_amd]`) is L1's, not the L2 guest's (whose kernel output reaches the same console
/// through the VMM's serial port).
const L1_ONLY_MODULE: &str = "kvm_amd";

/// The kind of kernel report a console line opens, if any (a `WARNING:` opens none).
fn opens_report(line: &str) -> Option<KernelReport> {
    if line.contains("BUG: soft lockup") || line.contains("detected stall") {
        Some(KernelReport::Lockup)
    } else if line.contains("Oops: ")
        || line.contains("BUG: ")
        || line.contains("general protection fault")
    {
        Some(KernelReport::Oops)
    } else {
        None
    }
}

/// Whether a console line inside a kernel report shows it is L1's.
fn names_l1_module(line: &str) -> bool {
    line.contains(L1_ONLY_MODULE)
        && (line.contains("Modules linked in:") || line.contains(&format!("[{L1_ONLY_MODULE}]")))
}

fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| line[i + marker.len()..].trim())
}

fn kv_pairs(s: &str) -> BTreeMap<String, String> {
    s.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(m: &BTreeMap<String, String>, k: &str) -> u64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn meminfo_of(m: &BTreeMap<String, String>) -> Meminfo {
    Meminfo {
        sec_page_tables_kb: num(m, "SecPageTables"),
        page_tables_kb: num(m, "PageTables"),
    }
}

fn status_of(rest: &str) -> Option<i32> {
    kv_pairs(rest).get("status")?.parse().ok()
}

/// Parses a result line's text after `EBB-RESULT `.
pub fn parse_result(rest: &str) -> Option<ResultLine> {
    let mut it = rest.split_whitespace();
    let name = it.next()?.to_string();
    let fields = kv_pairs(&it.collect::<Vec<_>>().join(" "));
    Some(ResultLine { name, fields })
}

impl Transcript {
    /// Feeds one console line (without its line ending).
    pub fn feed(&mut self, raw: &str) {
        let line = raw.trim_end_matches('\r');
        // L1's in-guest watcher may never run once L1's scheduler itself is hit (a lockup on
        // every CPU), so L1's reports are also recognised on the console: an opening line
        // followed by a module list or a stack frame that only L1 has.
        if let Some(kind) = opens_report(line) {
            self.last_report = Some((kind, line.trim().to_string()));
        } else if names_l1_module(line)
            && let Some((kind, first)) = self.last_report.take()
        {
            match kind {
                KernelReport::Oops => self.l1_oops.get_or_insert(first),
                KernelReport::Lockup => self.l1_lockup.get_or_insert(first),
            };
        }
        if let Some(r) = after(line, "EBB-RIG-SAMPLE ") {
            let m = kv_pairs(r);
            self.samples.push(ProcSample {
                label: m.get("label").cloned().unwrap_or_default(),
                pid: num(&m, "pid") as u32,
                comm: m.get("comm").cloned().unwrap_or_default(),
                t_ms: num(&m, "t_ms"),
                vm_rss_kb: num(&m, "VmRSS"),
                vm_pte_kb: num(&m, "VmPTE"),
                meminfo: meminfo_of(&m),
            });
            return;
        }
        if is_heartbeat(line) {
            self.heartbeats += 1;
            return;
        }
        if let Some(r) = after(line, "EBB-RIG-KVM-PIN ") {
            self.kvm_pin = Some(r.to_string());
            return;
        }
        if let Some(r) = after(line, "EBB-RIG-L1-OOPS ") {
            self.l1_oops.get_or_insert_with(|| r.to_string());
            return;
        }
        if let Some(r) = after(line, "EBB-RIG-L1-LOCKUP ") {
            self.l1_lockup.get_or_insert_with(|| r.to_string());
            return;
        }
        if let Some(r) = after(line, "EBB-RIG-KVM ") {
            self.kvm = Some(r.to_string());
        } else if let Some(r) = after(line, "EBB-RIG-ERROR ") {
            self.errors.push(r.to_string());
        } else if line.contains("EBB-RIG-BEGIN") {
            self.begun = true;
            return;
        } else if let Some(r) = after(line, "EBB-RIG-END ") {
            self.status = status_of(r);
            return;
        } else if let Some(r) = after(line, "EBB-RIG-MEMINFO ") {
            self.meminfo = Some(meminfo_of(&kv_pairs(r)));
        } else if line.contains("EBB-RIG-DONE") {
            self.done = true;
        }
        if !self.begun || self.status.is_some() {
            return;
        }
        self.output.push(line.to_string());
        if let Some(r) = after(line, "EBB-RESULT ") {
            self.results.extend(parse_result(r));
        } else if let Some(r) = after(line, "EBB-L2-END ") {
            self.guest_status = status_of(r);
        } else if let Some(r) = after(line, "EBB-PEER-ERROR ") {
            self.peer_errors.push(r.to_string());
        }
    }

    /// Parses a whole transcript.
    pub fn parse(text: &str) -> Self {
        let mut t = Transcript::default();
        for l in text.lines() {
            t.feed(l);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "\x1bc\x1b[?7l\x1b[2JEBB-RIG-KVM ok npt=Y\r
EBB-RIG-BEGIN\r
EBB-PEER-START mem=1024 cpus=1\r
EBB-RIG-SAMPLE label=periodic pid=145 comm=qemu-system-x86 t_ms=3820 VmRSS=29772 VmPTE=144 SecPageTables=0 PageTables=996\r
[    5.934229] kvm: kvm [145]: vcpu0, guest rIP: 0xffffffff8b51fb6f Unhandled WRMSR\r
EBB-L2-BEGIN cmd=ebb-guest churn --mib 512\r
EBB-RESULT churn mode=chunk mib=512 chunk_kib=2048 ops=512 pages=262144 ns_per_page=17186.4 nonzero=0\r
EBB-L2-END status=0\r
EBB-RIG-SAMPLE label=guest-done pid=145 comm=qemu-system-x86 t_ms=19840 VmRSS=295884 VmPTE=696 SecPageTables=32 PageTables=1408\r
EBB-PEER-END status=0\r
EBB-RIG-END status=3\r
EBB-RIG-MEMINFO SecPageTables=0 PageTables=604\r
EBB-RESULT late x=1\r
EBB-RIG-DONE\r
";

    #[test]
    fn parses_a_peer_transcript() {
        let t = Transcript::parse(CONSOLE);
        assert_eq!(t.kvm.as_deref(), Some("ok npt=Y"));
        assert!(t.begun && t.done);
        assert_eq!(t.status, Some(3));
        assert_eq!(t.guest_status, Some(0));
        assert_eq!(
            t.meminfo,
            Some(Meminfo {
                sec_page_tables_kb: 0,
                page_tables_kb: 604
            })
        );
        assert_eq!(t.results.len(), 1, "results after END are not the job's");
        let r = &t.results[0];
        assert_eq!(
            (r.name.as_str(), r.u64("pages"), r.f64("ns_per_page")),
            ("churn", Some(262144), Some(17186.4))
        );
        assert_eq!(r.str("mode"), Some("chunk"));
        assert_eq!(t.samples.len(), 2);
        let d = &t.samples[1];
        assert_eq!(
            (d.label.as_str(), d.pid, d.vm_pte_kb, d.vm_rss_kb),
            ("guest-done", 145, 696, 295884)
        );
        assert_eq!(d.meminfo.sec_page_tables_kb, 32);
        assert!(t.output.iter().all(|l| !l.contains("EBB-RIG-SAMPLE")));
        assert!(t.output.iter().any(|l| l.contains("Unhandled WRMSR")));
        assert!(t.output.iter().all(|l| !l.ends_with('\r')));
    }

    #[test]
    fn l1_oops_is_recorded_once() {
        let t = Transcript::parse(
            "EBB-RIG-BEGIN\nEBB-RIG-L1-OOPS Oops: int3: 0000 [#1]\nEBB-RIG-L1-OOPS x\n",
        );
        assert_eq!(t.l1_oops.as_deref(), Some("Oops: int3: 0000 [#1]"));
        assert!(t.output.is_empty());
    }

    #[test]
    fn l1_oops_on_the_console_is_recognised_by_its_modules() {
        let l1 = Transcript::parse(
            "EBB-RIG-BEGIN\n[ 15.2] Oops: int3: 0000 [#1] SMP NOPTI\n[ 15.2] RIP: x\n\
             [ 15.2] Modules linked in: kvm_amd kvm irqbypass\n",
        );
        assert_eq!(
            l1.l1_oops.as_deref(),
            Some("[ 15.2] Oops: int3: 0000 [#1] SMP NOPTI")
        );
        // The L2 guest's oops (relayed by the VMM) lists its own modules: not L1's.
        let l2 = Transcript::parse(
            "EBB-RIG-BEGIN\n[ 3.1] Oops: 0002 [#1] SMP NOPTI\n\
             [ 3.1] Modules linked in: virtio_balloon virtio_mmio\n",
        );
        assert_eq!(l2.l1_oops, None);
        // A warning that lists kvm_amd is not an oops.
        let warn = Transcript::parse(
            "[ 9.0] WARNING: CPU: 0 at x\n[ 9.0] Modules linked in: kvm_amd kvm irqbypass\n",
        );
        assert_eq!(warn.l1_oops, None);
    }

    #[test]
    fn l1_heartbeats_are_counted_and_kept_out_of_the_output() {
        let t = Transcript::parse(
            "EBB-RIG-BEGIN\nbefore\nEBB-RIG-ALIVE\r\nafter\nEBB-RIG-ALIVE\nEBB-RIG-END status=0\n",
        );
        assert_eq!(t.heartbeats, 2);
        assert_eq!(t.output, ["before", "after"]);
    }

    #[test]
    fn the_held_vm_line_is_recorded_and_kept_out_of_the_output() {
        let t = Transcript::parse(
            "EBB-RIG-BEGIN\nEBB-RIG-KVM-PIN pid=97\r\njob\nEBB-RIG-END status=0\n",
        );
        assert_eq!(t.kvm_pin.as_deref(), Some("pid=97"));
        assert_eq!(t.output, ["job"]);
        // EBB-RIG-KVM (L1's KVM check) is another line.
        let k = Transcript::parse("EBB-RIG-KVM ok npt=Y\n");
        assert_eq!((k.kvm.as_deref(), k.kvm_pin), (Some("ok npt=Y"), None));
    }

    #[test]
    fn l1_lockups_are_recognised_by_the_watcher_and_on_the_console() {
        let w = Transcript::parse(
            "EBB-RIG-BEGIN
EBB-RIG-L1-LOCKUP watchdog: BUG: soft lockup - CPU#1 stuck for 22s! \
             [vcpu1:168]
",
        );
        assert!(w.l1_lockup.as_deref().unwrap().contains("CPU#1 stuck"));
        assert_eq!(w.l1_oops, None);
        // On the console, with the module list L1's raised log level prints.
        let soft = Transcript::parse(
            "EBB-RIG-BEGIN
[ 48.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [vcpu1:168]
\
             [ 48.1] Modules linked in: kvm_amd kvm irqbypass
[ 48.1] RIP: 0010:svm_vcpu_run
",
        );
        assert_eq!(
            soft.l1_lockup.as_deref(),
            Some("[ 48.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [vcpu1:168]")
        );
        assert_eq!(soft.l1_oops, None, "a soft lockup is not an oops");
        // An RCU stall has no module list; a stack frame in kvm_amd names L1.
        let rcu = Transcript::parse(
            "[ 50.0] rcu: INFO: rcu_preempt self-detected stall on CPU
\
             [ 50.0] rcu: \t1-....: (21000 ticks this GP)
\
             [ 50.0]  svm_vcpu_run+0x1f0/0x7a0 [kvm_amd]
",
        );
        assert!(
            rcu.l1_lockup
                .as_deref()
                .unwrap()
                .contains("self-detected stall")
        );
        // The L2 guest's stall (relayed by the VMM) has no L1 module in it.
        let l2 = Transcript::parse(
            "[ 7.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:
\
             [ 7.0] Modules linked in: virtio_balloon virtio_mmio
[ 7.0]  schedule+0x1/0x2
",
        );
        assert_eq!((l2.l1_lockup, l2.l1_oops), (None, None));
    }

    #[test]
    fn errors_and_garbage_do_not_panic() {
        let t = Transcript::parse(
            "EBB-RIG-ERROR no /dev/kvm\nEBB-RIG-END status=x\nEBB-RESULT\n\u{fffd}\n",
        );
        assert_eq!(t.errors, vec!["no /dev/kvm".to_string()]);
        assert_eq!(t.status, None);
        assert!(t.results.is_empty());
        assert!(parse_result("").is_none());
    }
}
