//! A release request by signal (SIGUSR1, SIGTERM, SIGINT), or by a line the host types on the
//! guest's console, as a flag the workloads poll.

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

/// Also takes the next line on the console (`/dev/console`, where the host's VMM puts its
/// stdin) as a release request: how a host script orders itself with the guest without sleeps.
pub fn install_console() {
    std::thread::spawn(|| {
        if read_console_line().is_ok() {
            REQUESTED.store(true, Ordering::SeqCst);
        }
    });
}

/// Blocks until a whole line arrives on the console; returns it without its line ending.
pub fn read_console_line() -> std::io::Result<String> {
    use std::io::BufRead;
    let console = std::fs::File::open("/dev/console")?;
    let mut line = String::new();
    if std::io::BufReader::new(console).read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the console closed",
        ));
    }
    Ok(line.trim_end().to_string())
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
