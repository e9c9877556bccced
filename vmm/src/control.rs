//! How any thread asks the VM to stop, and why it stopped.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off through ACPI.
    PowerOff,
    /// The guest asked for a reset (ACPI reset register or i8042); ebb stops instead.
    Reset,
    /// The guest kernel printed a panic.
    GuestPanic,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU index.
        vcpu: u8,
    },
    /// KVM reported an error or an exit ebb cannot handle.
    KvmError {
        /// The vCPU index.
        vcpu: u8,
        /// What happened.
        detail: String,
    },
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// ebb itself failed while running.
    HostError(String),
}

impl ExitReason {
    /// Process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Reset => 0,
            ExitReason::Signal(_) => 130,
            ExitReason::GuestPanic => 2,
            ExitReason::TripleFault { .. } => 3,
            ExitReason::KvmError { .. } => 4,
            ExitReason::HostError(_) => 5,
        }
    }

    /// One line for the user.
    pub fn describe(&self) -> String {
        match self {
            ExitReason::PowerOff => "guest powered off".to_owned(),
            ExitReason::Reset => "guest requested a reset; ebb does not restart guests".to_owned(),
            ExitReason::GuestPanic => "guest kernel panicked (see the console above)".to_owned(),
            ExitReason::TripleFault { vcpu } => {
                format!("vCPU {vcpu} triple-faulted (KVM shutdown exit)")
            }
            ExitReason::KvmError { vcpu, detail } => format!("KVM error on vCPU {vcpu}: {detail}"),
            ExitReason::Signal(sig) => format!("stopped by signal {sig}"),
            ExitReason::HostError(e) => format!("host error: {e}"),
        }
    }
}

/// Shared stop request: the first reason wins; `event` wakes the event loop.
pub struct VmControl {
    stop: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
    panic_seen: AtomicBool,
}

impl VmControl {
    /// A control with no stop requested.
    pub fn new() -> std::io::Result<Self> {
        Ok(VmControl {
            stop: AtomicBool::new(false),
            reason: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            panic_seen: AtomicBool::new(false),
        })
    }

    /// Asks the VM to stop; later requests keep the first reason, except that a reset
    /// after a printed panic is reported as the panic.
    pub fn request_stop(&self, reason: ExitReason) {
        let reason = if reason == ExitReason::Reset && self.panic_seen.load(Ordering::Acquire) {
            ExitReason::GuestPanic
        } else {
            reason
        };
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        self.stop.store(true, Ordering::Release);
        // A failed write only delays the wake-up until the loop's next timeout.
        let _ = self.event.write(1);
    }

    /// Records that the guest printed a kernel panic.
    pub fn note_panic(&self) {
        self.panic_seen.store(true, Ordering::Release);
    }

    /// Whether a panic was printed.
    pub fn panic_seen(&self) -> bool {
        self.panic_seen.load(Ordering::Acquire)
    }

    /// Whether a stop was requested.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// The stop reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd written on every stop request.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_panic_upgrades_reset() {
        let c = VmControl::new().unwrap();
        assert!(!c.should_stop());
        c.request_stop(ExitReason::PowerOff);
        c.request_stop(ExitReason::TripleFault { vcpu: 1 });
        assert_eq!(c.reason(), Some(ExitReason::PowerOff));
        assert!(c.should_stop());
        assert_eq!(c.event().read().unwrap(), 2);

        let c = VmControl::new().unwrap();
        c.note_panic();
        c.request_stop(ExitReason::Reset);
        assert_eq!(c.reason(), Some(ExitReason::GuestPanic));
        assert_ne!(ExitReason::GuestPanic.exit_code(), 0);
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
    }
}
