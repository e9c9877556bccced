//! `ebb-ctl` against a real API socket serving the balloon endpoints.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use balloon::{Balloon, BalloonConfig, ReleaseBackend, ReleaseError};
use ebb::api::ApiServer;
use ebb::devices::virtio::balloon::BalloonApi;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

struct NoRelease;

impl ReleaseBackend for NoRelease {
    fn release(&self, _gpa: u64, len: u64) -> Result<u64, ReleaseError> {
        Ok(len)
    }
}

/// Runs `ebb-ctl` with `args`; returns (exit code, stdout).
fn ctl(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ebb-ctl"))
        .args(args)
        .output()
        .expect("run ebb-ctl");
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn ebb_ctl_drives_the_balloon_api() {
    let sock = std::env::temp_dir().join(format!("ebb-ctl-test-{}.sock", std::process::id()));
    let balloon = Balloon::new(BalloonConfig::default(), 256 << 20, Arc::new(NoRelease)).unwrap();
    let shared = Arc::new(Mutex::new(balloon));
    let interval = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let server =
        ApiServer::bind(&sock, Box::new(BalloonApi::new(shared.clone(), interval))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let loop_thread = std::thread::spawn(move || {
        let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new().unwrap();
        em.add_subscriber(Box::new(server));
        while !stop2.load(Ordering::Acquire) {
            em.run_with_timeout(20).unwrap();
        }
    });
    let s = sock.to_str().unwrap();

    let (code, body) = ctl(&["--api-sock", s, "GET", "/balloon"]);
    assert_eq!(code, 0, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["amount_mib"], 0);
    assert_eq!(v["free_page_hinting"], false);

    // No driver here, so a target is refused (Firecracker's rule) and changes nothing.
    let (code, body) = ctl(&[
        "--api-sock",
        s,
        "PATCH",
        "/balloon",
        r#"{"amount_mib":128}"#,
    ]);
    assert_eq!(code, 1);
    assert!(body.contains("Device not activated yet"), "{body}");
    let (code, body) = ctl(&["--api-sock", s, "PATCH", "/balloon", "{oops"]);
    assert_eq!(code, 1);
    assert!(body.contains("fault_message"), "{body}");
    let (code, body) = ctl(&["--api-sock", s, "GET", "/nowhere"]);
    assert_eq!(code, 1);
    assert!(
        body.contains("Invalid request method and/or path: GET nowhere."),
        "{body}"
    );
    let (code, body) = ctl(&["--api-sock", s, "GET", "/balloon/statistics"]);
    assert_eq!(code, 0, "{body}");
    assert!(body.contains("\"actual_mib\":0"), "{body}");
    // A 204 has no body: ebb-ctl succeeds and prints an empty line.
    let (code, body) = ctl(&[
        "--api-sock",
        s,
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s":0}"#,
    ]);
    assert_eq!((code, body.trim()), (0, ""));
    assert_eq!(shared.lock().unwrap().target_pages(), 0);

    // The commands for people: a table, or JSON with --json.
    let (code, body) = ctl(&["--api-sock", s, "balloon", "stats"]);
    assert_eq!(code, 0, "{body}");
    assert!(
        body.lines()
            .any(|l| l.starts_with("actual_mib") && l.ends_with(" 0")),
        "{body}"
    );
    let (code, body) = ctl(&["--api-sock", s, "balloon", "stats", "--json"]);
    assert_eq!(code, 0, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["target_mib"], 0);
    let (code, body) = ctl(&["--api-sock", s, "balloon", "show"]);
    assert_eq!(code, 0, "{body}");
    assert!(
        body.lines().any(|l| l.starts_with("deflate_on_oom")),
        "{body}"
    );
    let (code, _) = ctl(&["--api-sock", s, "balloon", "set", "128MiB", "--wait"]);
    assert_eq!(code, 1, "no driver: refused");
    let (code, _) = ctl(&["--api-sock", s, "balloon", "set", "lots"]);
    assert_eq!(code, 1, "not a size");
    assert_eq!(shared.lock().unwrap().target_pages(), 0);

    let (code, _) = ctl(&["--api-sock", "/nonexistent/ebb.sock", "GET", "/balloon"]);
    assert_eq!(code, 2, "cannot connect");
    let (code, _) = ctl(&["GET", "/balloon"]);
    assert_eq!(code, 1, "usage");

    stop.store(true, Ordering::Release);
    loop_thread.join().unwrap();
}
