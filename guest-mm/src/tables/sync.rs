//! The synchronization primitives the table protocol is built from.
//!
//! Everything the reclaim protocol relies on (entry atomics, the per-table
//! lock, the dead marker, the live counts) comes from here, so that under
//! `cfg(loom)` the same protocol code runs on loom's model types.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Back-off step inside a spin loop.
#[inline]
fn backoff(spins: &mut u32) {
    #[cfg(loom)]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        if *spins < 32 {
            *spins += 1;
            std::hint::spin_loop();
        } else {
            // Two cores shared by many threads: a preempted holder is only
            // rescheduled if we give the core away.
            std::thread::yield_now();
        }
    }
}

/// A small test-and-test-and-set lock, one per table (split page-table-lock
/// style). Critical sections are a few hundred nanoseconds at most, and
/// nothing allocates or sleeps while holding one.
///
/// The lock is used without a guard object because the reclaim protocol
/// hands locks over between levels (child held, parent taken, child
/// released); every caller pairs `lock`/`try_lock` with `unlock` explicitly.
pub(crate) struct SpinLock {
    locked: AtomicBool,
}

impl SpinLock {
    pub(crate) fn new() -> Self {
        Self {
            locked: AtomicBool::new(false),
        }
    }

    /// Takes the lock if it is free, without waiting.
    #[inline]
    pub(crate) fn try_lock(&self) -> bool {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Takes the lock, spinning (then yielding) while another thread holds it.
    #[inline]
    pub(crate) fn lock(&self) {
        let mut spins = 0;
        loop {
            if self.try_lock() {
                return;
            }
            while self.locked.load(Ordering::Relaxed) {
                backoff(&mut spins);
            }
        }
    }

    /// Releases the lock; the caller must hold it.
    #[inline]
    pub(crate) fn unlock(&self) {
        debug_assert!(self.locked.load(Ordering::Relaxed));
        self.locked.store(false, Ordering::Release);
    }

    /// Whether some thread holds the lock (for audits and assertions).
    pub(crate) fn is_held(&self) -> bool {
        self.locked.load(Ordering::Relaxed)
    }
}

/// An epoch guard: while one is alive, no table retired after it was taken
/// is freed.
#[cfg(not(loom))]
pub(crate) type Guard = crossbeam_epoch::Guard;

/// Under loom retired tables are parked until the `Tables` is dropped, so
/// the guard carries nothing.
#[cfg(loom)]
pub(crate) struct Guard;

/// Pins the current thread.
#[cfg(not(loom))]
#[inline]
pub(crate) fn pin() -> Guard {
    crossbeam_epoch::pin()
}

/// Pins the current thread (a no-op under loom).
#[cfg(loom)]
#[inline]
pub(crate) fn pin() -> Guard {
    Guard
}
