//! The event-loop thread: stdin, virtio queue notifications, signals, stop requests and the
//! API socket, all on one event-manager.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::control::{ExitReason, VmControl};
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;

/// Why a loop source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// Blocking signals or creating the signalfd failed.
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
    /// The event manager failed.
    #[error("event manager failed: {0:?}")]
    Manager(event_manager::Error),
}

/// Boxed subscriber type used by ebb's event manager.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Blocks SIGTERM and SIGINT in the calling thread (and every thread it spawns afterwards)
/// and returns a signalfd for them. Call before any other thread starts.
pub fn block_stop_signals() -> Result<OwnedFd, EventLoopError> {
    // SAFETY: `set` is a local sigset_t initialised by sigemptyset before use; the calls only
    // read and write it and the thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(EventLoopError::Signals(std::io::Error::from_raw_os_error(
                rc,
            )));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(EventLoopError::Signals(std::io::Error::last_os_error()));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Turns SIGTERM/SIGINT into a stop request.
pub struct SignalWatcher {
    fd: OwnedFd,
    control: Arc<VmControl>,
}

impl SignalWatcher {
    /// Watches `fd` (from [`block_stop_signals`]).
    pub fn new(fd: OwnedFd, control: Arc<VmControl>) -> Self {
        SignalWatcher { fd, control }
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reads at most `info.len()` bytes into the local buffer from our signalfd.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        if n == info.len() as isize {
            let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
            self.control.request_stop(ExitReason::Signal(signo as i32));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch signals: {e:?}");
        }
    }
}

/// Wakes the loop when any thread requests a stop.
pub struct StopWatcher {
    control: Arc<VmControl>,
}

impl StopWatcher {
    /// Watches `control`'s eventfd.
    pub fn new(control: Arc<VmControl>) -> Self {
        StopWatcher { control }
    }
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Only the wake-up matters; the count is irrelevant.
        let _ = self.control.event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.control.event(), EventSet::IN)) {
            log::error!("cannot watch stop requests: {e:?}");
        }
    }
}

const STDIN: RawFd = 0;

/// Host stdin to the guest's COM1 (which keeps what the guest is not ready for).
pub struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
}

impl StdinInput {
    /// Feeds `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        StdinInput { serial }
    }
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        // SAFETY: reads at most `buf.len()` bytes from fd 0 into the local buffer.
        let n = unsafe { libc::read(STDIN, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // EOF or error: stop listening, the guest keeps running.
            let _ = ops.remove(Events::new_raw(STDIN, EventSet::IN));
            return;
        }
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_input(&buf[..n as usize]);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(STDIN, EventSet::IN)) {
            log::info!("stdin is not pollable ({e:?}); guest console input disabled");
        }
    }
}

/// Queue notifications of every virtio-mmio transport.
pub struct VirtioQueueEvents {
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl VirtioQueueEvents {
    /// Watches the queue eventfds of `transports`.
    pub fn new(transports: Vec<Arc<Mutex<MmioTransport>>>) -> Self {
        VirtioQueueEvents { transports }
    }
}

impl MutEventSubscriber for VirtioQueueEvents {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        let (t, q) = ((data >> 16) as usize, (data & 0xffff) as usize);
        let Some(transport) = self.transports.get(t) else {
            return;
        };
        let mut guard = transport.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(evt) = guard.queue_events().get(q) {
            let _ = evt.read();
        }
        guard.notify_queue(q);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (t, transport) in self.transports.iter().enumerate() {
            let guard = transport.lock().unwrap_or_else(|p| p.into_inner());
            for (q, evt) in guard.queue_events().iter().enumerate() {
                let data = ((t as u32) << 16) | q as u32;
                if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                    log::error!("cannot watch virtio queue {t}/{q}: {e:?}");
                }
            }
        }
    }
}
