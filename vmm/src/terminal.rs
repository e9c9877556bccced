//! Raw mode for an interactive console: when stdin is a terminal, keys go to the guest
//! unprocessed and unechoed, except that Ctrl-C still raises SIGINT (a clean stop of ebb);
//! the previous mode comes back when the guard drops.

/// Restores the terminal's mode on drop.
pub struct RawGuard {
    saved: libc::termios,
}

impl RawGuard {
    /// Puts stdin in raw mode if it is a terminal; `None` otherwise (or if that fails).
    pub fn new() -> Option<Self> {
        // SAFETY: isatty only inspects fd 0.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0 and the result is checked.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::IEXTEN);
        raw.c_iflag &= !(libc::ICRNL | libc::IXON);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: `raw` is a valid termios derived from the terminal's own settings.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawGuard { saved })
    }
}

impl Drop for RawGuard {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal in `new`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}
