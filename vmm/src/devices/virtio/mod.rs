//! The device side of virtio: what a device implements, independent of the transport.
//!
//! Lifecycle of a device behind the transport:
//!
//! ```text
//!   created ──(driver: ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues, DRIVER_OK)──▶ activate()
//!      ▲                                                                                   │
//!      └──────────────────────────── status := 0 (reset()) ◀──────────────────────────────┘
//! ```

pub mod balloon;
pub mod mmio;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Feature bit every modern device offers: the device follows virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer or more queues than the device uses.
    #[error("device expects {expected} queues, driver made {got} ready")]
    QueueCount {
        /// Queues the device uses.
        expected: usize,
        /// Queues made ready.
        got: usize,
    },
    /// The device refused for its own reason.
    #[error("device could not start: {0}")]
    Device(String),
}

/// Why an interrupt could not be delivered.
#[derive(Debug, thiserror::Error)]
#[error("cannot signal the guest")]
pub struct InterruptError(#[source] pub std::io::Error);

/// What an interrupt tells the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// Buffers were added to a used ring.
    Queue,
    /// The configuration space changed.
    Config,
}

/// The transport's way for a device to interrupt the guest.
pub trait VirtioInterrupt: Send + Sync {
    /// Sets the matching interrupt-status bit and raises the interrupt.
    fn trigger(&self, kind: InterruptKind) -> Result<(), InterruptError>;
}

/// Everything a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory for reading and writing buffers.
    pub mem: GuestMemoryMmap,
    /// The queues in device order, already checked against guest memory.
    pub queues: Vec<Queue>,
    /// The interrupt line.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// A virtio device model. Methods run with the transport's lock held, on a vCPU thread
/// (register access) or the event-loop thread (queue notifications).
pub trait VirtioDevice: Send {
    /// Virtio device id (e.g. 5 for the balloon).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (the transport adds `VIRTIO_F_VERSION_1`).
    fn device_features(&self) -> u64;
    /// The features the driver accepted (a subset of those offered).
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration space at `offset`; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; the device ignores what it does not allow.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// The driver notified queue `index` (already bounds-checked).
    fn queue_notify(&mut self, index: usize);
    /// Returns the device to its initial state; the transport discards the queues.
    fn reset(&mut self);
}
