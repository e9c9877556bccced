//! A release request by signal (SIGUSR1, SIGTERM, SIGINT) as a flag the workloads poll.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs the handler for SIGUSR1, SIGTERM and SIGINT.
pub fn install() {
    for sig in [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: on_signal only stores to an atomic, which is async-signal-safe; the handler is a
        // plain extern "C" fn that lives for the whole program.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Whether a release was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Waits until `limit` passes (None: no limit) or a signal arrives. Returns true if signalled.
pub fn wait(limit: Option<Duration>) -> bool {
    let start = Instant::now();
    loop {
        if requested() {
            return true;
        }
        if limit.is_some_and(|l| start.elapsed() >= l) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
