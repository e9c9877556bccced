//! The loop each handler thread runs.

use std::sync::atomic::Ordering;

use super::{FaultOutcome, FaultResolver, HandlerControl};
use crate::sys::{
    UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMOVE, UffdMsg, Userfaultfd, Waiter, poll_readable,
};

/// Messages read per `read` call.
const BATCH: usize = 64;
/// Poll timeout while deferred faults wait (ms). Deferred faults wait for a discard to finish
/// (which kicks the handlers) or for a pending remove event's madvise to move on, which sends
/// no wake-up of its own; this bounds that wait without spinning.
const RETRY_POLL_MS: i32 = 1;

pub(super) fn run<R: FaultResolver + ?Sized>(
    index: usize,
    uffd: &Userfaultfd,
    ctl: &HandlerControl,
    resolver: &R,
) {
    let seq = &ctl.seqs[index];
    let stats = &ctl.stats;
    let mut buf = [UffdMsg::default(); BATCH];
    // Reused across iterations so that retrying allocates nothing in the steady state.
    let mut retry_now: Vec<UffdMsg> = Vec::with_capacity(256);
    let mut again: Vec<UffdMsg> = Vec::with_capacity(256);
    // One epoll set per handler with the userfaultfd exclusive, so a fault wakes one handler;
    // plain poll (which wakes them all) if epoll cannot be set up.
    let fds = [uffd.raw(), ctl.stop.raw(), ctl.kick.raw()];
    let waiter = match Waiter::new(&[(fds[0], true), (fds[1], false), (fds[2], false)]) {
        Ok(w) => Some(w),
        Err(e) => {
            log::warn!("fault handler {index}: epoll unavailable ({e}), using poll");
            None
        }
    };
    loop {
        let timeout = if ctl.retry_len() > 0 {
            RETRY_POLL_MS
        } else {
            -1
        };
        let ready = match waiter.as_ref() {
            Some(w) => w.wait::<3>(timeout),
            None => poll_readable(fds, timeout),
        };
        let ready = match ready {
            Ok(r) => r,
            Err(e) => {
                stats.io_errors.fetch_add(1, Ordering::Relaxed);
                log::error!("fault handler {index}: {e}");
                return;
            }
        };
        if ready[1] {
            return;
        }
        if ready[2] {
            ctl.kick.drain();
        }
        // Odd while this handler holds messages it has taken (from the uffd or the retry
        // queue) and not yet settled (see HandlerControl::quiesce).
        seq.fetch_add(1, Ordering::AcqRel);
        if ready[0] {
            let n = match uffd.read_msgs(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    // Should not happen on a set-up userfaultfd; log sparsely and back off
                    // rather than spin on a descriptor that keeps failing.
                    let n = stats.io_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        log::error!("fault handler {index} ({n} read errors): {e}");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                    0
                }
            };
            stats.messages.fetch_add(n as u64, Ordering::Relaxed);
            for msg in &buf[..n] {
                dispatch(msg, uffd, ctl, resolver, &mut again);
            }
        }
        // Revisit deferred faults once per wake-up (never in a loop of their own).
        {
            let mut q = ctl.retry.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut *q, &mut retry_now);
        }
        for msg in retry_now.drain(..) {
            stats.retries.fetch_add(1, Ordering::Relaxed);
            let (flags, addr) = msg.pagefault();
            settle(resolver.fault(uffd, flags, addr), msg, ctl, &mut again);
        }
        if !again.is_empty() {
            let mut q = ctl.retry.lock().unwrap_or_else(|e| e.into_inner());
            q.append(&mut again);
        }
        seq.fetch_add(1, Ordering::AcqRel);
    }
}

fn dispatch<R: FaultResolver + ?Sized>(
    msg: &UffdMsg,
    uffd: &Userfaultfd,
    ctl: &HandlerControl,
    resolver: &R,
    again: &mut Vec<UffdMsg>,
) {
    let stats = &ctl.stats;
    match msg.event() {
        UFFD_EVENT_PAGEFAULT => {
            stats.fault_messages.fetch_add(1, Ordering::Relaxed);
            let (flags, addr) = msg.pagefault();
            settle(resolver.fault(uffd, flags, addr), *msg, ctl, again);
        }
        UFFD_EVENT_REMOVE => {
            stats.remove_events.fetch_add(1, Ordering::Relaxed);
            let (start, end) = msg.remove();
            resolver.remove(start, end);
        }
        _ => {
            stats.other_events.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn settle(outcome: FaultOutcome, msg: UffdMsg, ctl: &HandlerControl, again: &mut Vec<UffdMsg>) {
    match outcome {
        FaultOutcome::Resolved => {}
        FaultOutcome::Deferred => {
            ctl.stats.deferred.fetch_add(1, Ordering::Relaxed);
            again.push(msg);
        }
        FaultOutcome::Failed => {
            ctl.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
