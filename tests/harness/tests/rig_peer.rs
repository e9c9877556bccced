//! End to end: the L2 guest boots in the QEMU peer inside the rig, runs `integrity` over 256 MiB
//! (with a churn running while the patterns are held) and both `churn` variants, and the parsed
//! results must show no lost page. Needs `resources/setup.sh` to have run; fails otherwise.

use std::io::Write as _;
use std::time::{Duration, Instant};

use ebb_harness::{PeerJob, Rig};

const INTEGRITY_MIB: u64 = 256;

#[test]
fn peer_guest_keeps_data_through_churn() {
    let rig = Rig::from_env().expect("rig images (run resources/setup.sh first)");
    let mut job = PeerJob::new(format!(
        "ebb-guest integrity --mib {INTEGRITY_MIB} --churn-mib 256 --churn-secs 5 ; \
         ebb-guest churn --mib 512 --ops 512 ; \
         ebb-guest churn --mode scattered --mib 512 --ops 20000"
    ));
    job.mem_mib = 1024;
    job.timeout = Duration::from_secs(420);
    let start = Instant::now();
    // Rig faults in the peer's L2 (docs/ARCHITECTURE.md, "Known flakiness") run again, at most
    // twice, said on stderr; a lost page or a failed workload never does.
    let reruns = rig.peer_reruns("rig_peer");
    let out = match rig.run_peer_with(&job, &reruns) {
        Ok(o) => o,
        Err(e) => panic!("peer run failed: {e}"),
    };
    let took = start.elapsed();
    // Written to the stream directly (not eprintln!) so it shows even when the test passes.
    let _ = writeln!(
        std::io::stderr(),
        "rig_peer: {:?} mode, L1 + L2 boot and workloads took {:.1} s",
        out.run.mode,
        took.as_secs_f64()
    );
    for r in &out.results {
        eprintln!("rig_peer: {} {:?}", r.name, r.fields);
    }
    let d = &out.at_guest_done;
    eprintln!(
        "rig_peer: QEMU at guest end VmRSS={} kB VmPTE={} kB; L1 SecPageTables={} kB PageTables={} kB",
        d.vm_rss_kb, d.vm_pte_kb, d.meminfo.sec_page_tables_kb, d.meminfo.page_tables_kb
    );
    let tail = out.run.tail();

    assert_eq!(out.guest_status, 0, "guest command failed:\n{tail}");
    let integ = out
        .result("integrity")
        .unwrap_or_else(|| panic!("no integrity result:\n{tail}"));
    let pages = INTEGRITY_MIB * 256;
    assert_eq!(integ.u64("mib"), Some(INTEGRITY_MIB));
    assert_eq!(integ.u64("pages"), Some(pages));
    assert_eq!(integ.u64("checked"), Some(pages), "every page verified");
    assert_eq!(
        integ.u64("bad_pages"),
        Some(0),
        "guest data lost: {integ:?}"
    );
    assert!(
        integ.u64("churn_ops").unwrap_or(0) > 0,
        "churn ran while patterns were held"
    );

    let churns: Vec<_> = out.results.iter().filter(|r| r.name == "churn").collect();
    assert_eq!(churns.len(), 2, "two churn results:\n{tail}");
    let chunk = churns
        .iter()
        .find(|r| r.str("mode") == Some("chunk"))
        .expect("chunk churn");
    assert_eq!(chunk.u64("ops"), Some(512));
    assert_eq!(chunk.u64("pages"), Some(512 * 512));
    assert_eq!(
        chunk.u64("nonzero"),
        Some(0),
        "discarded memory read back non-zero"
    );
    let ns = chunk.f64("ns_per_page").unwrap_or(0.0);
    assert!(
        ns > 0.0 && ns < 10_000_000.0,
        "chunk churn ns_per_page {ns}"
    );
    let scat = churns
        .iter()
        .find(|r| r.str("mode") == Some("scattered"))
        .expect("scattered churn");
    assert_eq!(scat.u64("ops"), Some(20000));
    assert_eq!(scat.u64("nonzero"), Some(0));

    // The VM existed when sampled: QEMU holds guest memory and KVM has second-level tables.
    assert!(d.vm_rss_kb > 64 * 1024, "QEMU VmRSS {} kB", d.vm_rss_kb);
    assert!(d.vm_pte_kb > 0);
    assert!(
        d.meminfo.sec_page_tables_kb > 0,
        "no SecPageTables while the VM ran"
    );
    assert!(!out.periodic.is_empty(), "periodic samples of QEMU");
    assert!(took < job.timeout);
}
