//! The userfaultfd fault path: N handler threads reading one userfaultfd.
//!
//! This module owns the threads and the event plumbing; what a fault *means* (which leaf to
//! record, which locks guard it) is decided by a [`FaultResolver`], which the manager implements
//! on top of the tables. Keeping the two apart lets the plumbing be tested with plain threads and
//! a trivial resolver.
//!
//! Each handler polls the userfaultfd, a stop eventfd and a kick eventfd; it reads messages in
//! batches without blocking and hands page faults and remove events to the resolver. A fault the
//! resolver cannot settle now (its block is being discarded, or the kernel said EAGAIN because a
//! remove event is pending) goes to a shared retry queue. Handlers revisit that queue after each
//! wake-up: new messages, a kick (sent when a discard finishes), or, while the queue is not
//! empty, a 1 ms poll timeout. A handler never waits for a discard, so a discard's madvise, which
//! blocks until some handler reads its REMOVE event, always completes.
//!
//! Each handler also keeps a sequence number that is odd while it holds messages it has read but
//! not yet handed to the resolver. [`HandlerControl::quiesce`] waits until every handler that was
//! inside such a window has left it; the manager uses it to know that the REMOVE event of its own
//! madvise has been classified before it forgets that the range was its own.

mod handler;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use crate::sys::{EventFd, SysError, UffdMsg, Userfaultfd};

/// What became of one page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The page is mapped and the faulting threads woken.
    Resolved,
    /// Not now: retry after the next wake-up.
    Deferred,
    /// It cannot be resolved (counted; the faulting thread stays blocked).
    Failed,
}

/// Decides what page faults and remove events mean. Called from the handler threads; must never
/// block on anything a discarding thread holds across its release calls.
pub trait FaultResolver: Send + Sync + 'static {
    /// Resolves a fault at host address `addr` (`flags` are `UFFD_PAGEFAULT_FLAG_*`).
    fn fault(&self, uffd: &Userfaultfd, flags: u64, addr: u64) -> FaultOutcome;
    /// Pages `start..end` (host addresses) were removed by an madvise.
    fn remove(&self, start: u64, end: u64);
}

/// Counters kept by the handler threads themselves.
#[derive(Debug, Default)]
pub struct HandlerStats {
    /// Messages read from the userfaultfd.
    pub messages: AtomicU64,
    /// Page-fault messages read.
    pub fault_messages: AtomicU64,
    /// Remove events read.
    pub remove_events: AtomicU64,
    /// Other events (ignored).
    pub other_events: AtomicU64,
    /// Faults put on the retry queue.
    pub deferred: AtomicU64,
    /// Retry attempts made from the queue.
    pub retries: AtomicU64,
    /// Faults that failed.
    pub failed: AtomicU64,
    /// Read or poll errors.
    pub io_errors: AtomicU64,
}

/// A snapshot of [`HandlerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandlerCounts {
    /// Messages read.
    pub messages: u64,
    /// Page-fault messages.
    pub fault_messages: u64,
    /// Remove events.
    pub remove_events: u64,
    /// Other events.
    pub other_events: u64,
    /// Faults deferred.
    pub deferred: u64,
    /// Retry attempts.
    pub retries: u64,
    /// Failed faults.
    pub failed: u64,
    /// I/O errors.
    pub io_errors: u64,
}

/// Why the handler threads could not be started.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Creating an eventfd failed.
    #[error("creating the handler eventfds failed")]
    EventFd(#[source] SysError),
    /// Spawning a thread failed.
    #[error("spawning fault handler thread {index} failed")]
    Spawn {
        /// Which thread.
        index: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A thread's start hook failed.
    #[error("fault handler thread {index} could not start")]
    ThreadStart {
        /// Which thread.
        index: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// State shared between the handler threads and whoever discards: wake-ups, the retry queue,
/// the per-thread sequence numbers and counters.
#[derive(Debug)]
pub struct HandlerControl {
    stop: EventFd,
    kick: EventFd,
    retry: Mutex<Vec<UffdMsg>>,
    seqs: Box<[AtomicU64]>,
    stats: HandlerStats,
}

impl HandlerControl {
    /// Control block for `threads` handler threads.
    pub fn new(threads: usize) -> Result<Self, HandlerError> {
        Ok(Self {
            stop: EventFd::new().map_err(HandlerError::EventFd)?,
            kick: EventFd::new().map_err(HandlerError::EventFd)?,
            retry: Mutex::new(Vec::with_capacity(1024)),
            seqs: (0..threads).map(|_| AtomicU64::new(0)).collect(),
            stats: HandlerStats::default(),
        })
    }

    /// Wakes the handlers so that they retry deferred faults now (cheap when none is deferred).
    pub fn kick(&self) {
        if self.retry_len() > 0
            && let Err(e) = self.kick.signal()
        {
            log::warn!("waking fault handlers failed: {e}");
        }
    }

    fn retry_len(&self) -> usize {
        self.retry.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Waits until every handler that has read messages it has not yet handed to the resolver
    /// has done so. Handlers never wait for the caller, so this finishes quickly.
    pub fn quiesce(&self) {
        for seq in self.seqs.iter() {
            let s = seq.load(Ordering::Acquire);
            if s % 2 == 1 {
                let mut spins = 0u32;
                while seq.load(Ordering::Acquire) == s {
                    spins += 1;
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        thread::yield_now();
                    }
                }
            }
        }
    }

    /// Waits until no fault is deferred and no handler holds an unsettled message, or until
    /// `timeout` passes; returns whether it got there. For tests and orderly shutdown: with
    /// vCPUs still faulting, "settled" lasts only an instant.
    pub fn settle(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.retry_len() == 0 {
                self.quiesce();
                if self.retry_len() == 0 {
                    return true;
                }
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Counter snapshot.
    pub fn counts(&self) -> HandlerCounts {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        HandlerCounts {
            messages: l(&s.messages),
            fault_messages: l(&s.fault_messages),
            remove_events: l(&s.remove_events),
            other_events: l(&s.other_events),
            deferred: l(&s.deferred),
            retries: l(&s.retries),
            failed: l(&s.failed),
            io_errors: l(&s.io_errors),
        }
    }

    /// Number of faults waiting on the retry queue.
    pub fn pending_retries(&self) -> usize {
        self.retry_len()
    }
}

/// The running handler threads; stopped and joined on drop.
#[derive(Debug)]
pub struct FaultHandlers {
    control: Arc<HandlerControl>,
    threads: Vec<JoinHandle<()>>,
}

impl FaultHandlers {
    /// Starts one handler thread per sequence slot of `control`, all reading `uffd`. Each
    /// runs `thread_start` first, and this returns once every thread has run it (the first
    /// error stops them all).
    pub fn start<R: FaultResolver>(
        uffd: Arc<Userfaultfd>,
        control: Arc<HandlerControl>,
        resolver: Arc<R>,
        thread_start: Option<fn() -> io::Result<()>>,
    ) -> Result<Self, HandlerError> {
        let mut me = Self {
            control: control.clone(),
            threads: Vec::new(),
        };
        let (started_tx, started) = std::sync::mpsc::channel();
        for index in 0..control.seqs.len() {
            let (u, c, r) = (uffd.clone(), control.clone(), resolver.clone());
            let tx = started_tx.clone();
            let t = thread::Builder::new()
                .name(format!("ebb-uffd-{index}"))
                .spawn(move || {
                    let ready = thread_start.map_or(Ok(()), |f| f());
                    let ok = ready.is_ok();
                    let _ = tx.send((index, ready));
                    if ok {
                        handler::run(index, &u, &c, &*r);
                    }
                })
                .map_err(|source| HandlerError::Spawn { index, source })?;
            me.threads.push(t);
        }
        drop(started_tx);
        for _ in 0..me.threads.len() {
            match started.recv() {
                Ok((_, Ok(()))) => {}
                Ok((index, Err(source))) => {
                    return Err(HandlerError::ThreadStart { index, source });
                }
                Err(_) => {
                    return Err(HandlerError::ThreadStart {
                        index: 0,
                        source: io::Error::other("a handler thread ended before it started"),
                    });
                }
            }
        }
        Ok(me)
    }

    /// The shared control block.
    pub fn control(&self) -> &Arc<HandlerControl> {
        &self.control
    }
}

impl Drop for FaultHandlers {
    fn drop(&mut self) {
        if let Err(e) = self.control.stop.signal() {
            log::error!("stopping fault handlers failed: {e}");
            return;
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a fault handler thread panicked");
            }
        }
    }
}
