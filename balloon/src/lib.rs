//! The virtio memory balloon (virtio 1.x, device id 5) as a device model.
//!
//! This crate knows the balloon protocol and nothing of mmap, madvise or KVM. It parses the
//! queues the guest driver fills, validates every frame number and range it is sent, and hands
//! whole guest-physical ranges to a [`ReleaseBackend`], which the VMM implements on top of its
//! memory manager. Counters ([`BalloonStats`]) and the guest's own statistics
//! ([`GuestStats`]) are kept for the control API.
//!
//! Queues, in the order the driver sets them up (indices are dense: a queue whose feature
//! was not negotiated takes no index, as in the Linux driver):
//!
//! ```text
//!   0 inflateq       le32 page frame numbers the guest gives up
//!   1 deflateq       le32 page frame numbers the guest takes back
//!   [statsq]         one (le16 tag, le64 value) array, held until a refresh is wanted
//!   [reporting_vq]   free blocks; each descriptor's address and length are the payload
//! ```
//!
//! Lifecycle (one [`Balloon`] for the life of the VM):
//!
//! ```text
//!   Inactive ──activate(mem, queues, notifier)──▶ Active ──reset()──▶ Inactive
//!      │  target set by the host is kept across resets; `actual` and the inflated set are not
//! ```

mod config_space;
mod device;
mod frames;
mod guest_stats;
mod queues;
mod stats;

pub use config_space::ConfigSpace;
pub use device::{
    Balloon, BalloonConfig, BalloonError, Notifier, NotifyKind, QueueRole, queue_roles,
};
pub use frames::{PageRange, coalesce};
pub use guest_stats::{GuestStats, stat_name};
pub use stats::BalloonStats;

/// Virtio device id of the memory balloon.
pub const DEVICE_ID: u32 = 5;
/// Size of one balloon page (the unit of `num_pages`, `actual` and the frame numbers).
pub const PAGE_SIZE: u64 = 4096;
/// Pages per MiB.
pub const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;
/// Largest queue size the device offers (the Linux driver sends at most 256 frames a buffer).
pub const QUEUE_SIZE: u16 = 256;

/// Feature bit: the driver may not reuse a page before telling the host (not offered).
pub const F_MUST_TELL_HOST: u32 = 0;
/// Feature bit: the statistics queue exists.
pub const F_STATS_VQ: u32 = 1;
/// Feature bit: the guest deflates by itself when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit: free page hinting (never offered; its queue would sit before reporting).
pub const F_FREE_PAGE_HINT: u32 = 3;
/// Free page hinting command id that ends a run without a new one (the guest keeps its hinted
/// pages).
pub const CMD_ID_STOP: u32 = 0;
/// Free page hinting command id that tells the guest to take its hinted pages back.
pub const CMD_ID_DONE: u32 = 1;
/// Feature bit: page poisoning value in config space (not offered).
pub const F_PAGE_POISON: u32 = 4;
/// Feature bit: free page reporting queue exists.
pub const F_REPORTING: u32 = 5;

/// Why the host could not take ranges back.
#[derive(Debug, thiserror::Error)]
#[error("cannot release {ranges} guest range(s) starting at {gpa:#x}")]
pub struct ReleaseError {
    /// Start of the first range of the call.
    pub gpa: u64,
    /// Ranges in the call.
    pub ranges: usize,
    /// What the memory layer said.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Where the balloon gives guest memory back: the VMM's memory layer.
///
/// Ranges handed in are 4 KiB aligned, non-empty and inside guest RAM (the device checked).
/// The calls are synchronous: when they return, the host memory (and in ebb the page-table
/// pages that mapped it) is gone.
pub trait ReleaseBackend: Send + Sync {
    /// Releases `gpa..gpa+len`; returns the host bytes the release covered.
    fn release(&self, gpa: u64, len: u64) -> Result<u64, ReleaseError>;

    /// Releases every range of one chain in one call; returns the host bytes covered. The
    /// default makes one [`release`](Self::release) per range and stops at the first error;
    /// a memory layer that can batch (one table pass, merged host calls) overrides it.
    fn release_many(&self, ranges: &[PageRange]) -> Result<u64, ReleaseError> {
        let mut bytes = 0;
        for r in ranges {
            bytes += self.release(r.gpa(), r.len())?;
        }
        Ok(bytes)
    }

    /// Releases pages the guest put in the balloon: unlike reported free pages, the guest will
    /// not touch them until it deflates, so a memory layer that fills more than the faulting
    /// page (block fills, fault-around) must leave them out until then. The default is
    /// [`release_many`](Self::release_many).
    fn inflate_many(&self, ranges: &[PageRange]) -> Result<u64, ReleaseError> {
        self.release_many(ranges)
    }

    /// The guest took these pages back out of the balloon (they were inflated before). Nothing
    /// needs releasing; the default does nothing.
    fn deflate_many(&self, ranges: &[PageRange]) -> Result<(), ReleaseError> {
        let _ = ranges;
        Ok(())
    }
}
