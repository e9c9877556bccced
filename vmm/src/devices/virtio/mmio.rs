//! The virtio-mmio transport (virtio 1.x, register layout version 2), device independent.
//!
//! Every guest access is validated: registers are 32 bits wide and aligned, queue set-up is
//! accepted only while the queue is not ready and the device not live, and a driver that
//! breaks the protocol gets DEVICE_NEEDS_RESET rather than a panic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, InterruptError, InterruptKind, VIRTIO_F_VERSION_1, VirtioDevice,
    VirtioInterrupt,
};
use crate::devices::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor id reported by ebb's devices ("EBB\0").
pub const VENDOR_ID: u32 = 0x0042_4245;
/// Offset of the queue-notify register (target of the ioeventfds).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_OFFSET: u64 = 0x100;
/// Bytes of one transport window.
pub const WINDOW_SIZE: u64 = 0x1000;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for the virtio-mmio transport")]
    EventFd(#[source] std::io::Error),
    /// virtio-queue refused a queue size.
    #[error("device asks for an invalid queue size {0}")]
    QueueSize(u16),
}

/// Interrupt status plus the irqfd that raises the device's IOAPIC line.
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    /// An interrupt that writes `irq`.
    pub fn new(irq: EventFd) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// The eventfd to register as an irqfd.
    pub fn irq_event(&self) -> &EventFd {
        &self.irq
    }

    /// Current interrupt-status register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> Result<(), InterruptError> {
        let bit = match kind {
            InterruptKind::Queue => INT_USED_RING,
            InterruptKind::Config => INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.irq.write(1).map_err(InterruptError)
    }
}

/// Counters of what the driver did wrong; never logged per access.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MmioStats {
    /// Accesses of the wrong width or alignment, or to unknown registers.
    pub bad_accesses: u64,
    /// Writes refused by the protocol state (e.g. queue set-up after DRIVER_OK).
    pub refused_writes: u64,
    /// Activations that failed.
    pub failed_activations: u64,
}

/// One virtio-mmio window and the device behind it.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    interrupt: Arc<MmioInterrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
    /// Queue notifications are handled by the writing thread (a vCPU), not signalled to an
    /// eventfd for the event loop (see [`set_inline_notify`](Self::set_inline_notify)).
    inline_notify: bool,
    stats: MmioStats,
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd that raises its interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|_| MmioError::QueueSize(max))?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_events,
            interrupt: Arc::new(MmioInterrupt::new(irq)),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
            inline_notify: false,
            stats: MmioStats::default(),
        })
    }

    /// With `true`, a QueueNotify write runs the device's queue handler on the writing thread
    /// (a vCPU, on its MMIO exit) instead of signalling the queue's eventfd; the caller then
    /// registers no ioeventfd for the window. The driver usually waits for the used buffer
    /// right after it notifies, so handling it before the vCPU re-enters the guest saves the
    /// hand-off to the event loop and the guest's halt and wake-up.
    pub fn set_inline_notify(&mut self, inline: bool) {
        self.inline_notify = inline;
    }

    /// One eventfd per queue, written when the driver notifies that queue.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The interrupt (its eventfd is the device's irqfd).
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// Protocol violation counters.
    pub fn stats(&self) -> MmioStats {
        self.stats
    }

    /// Virtio device id of the device behind this window.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Whether the device was activated by the driver.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Called by the event loop when queue `index`'s eventfd fired.
    pub fn notify_queue(&mut self, index: usize) {
        if self.active && index < self.queues.len() {
            self.device.queue_notify(index);
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.device_features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.status.store(0, Ordering::Release);
    }

    fn needs_reset(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        // The driver sees the status bit even if the interrupt cannot be raised.
        let _ = self.interrupt.trigger(InterruptKind::Config);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, never cleared, except by a reset.
        if value & self.status != self.status {
            self.stats.refused_writes += 1;
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FAILED != 0 {
            self.status = value;
            return;
        }
        if added & STATUS_FEATURES_OK != 0 {
            let acked = self.driver_features;
            let offered = self.offered_features();
            if acked & !offered != 0 || acked & VIRTIO_F_VERSION_1 == 0 {
                self.stats.refused_writes += 1;
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
            self.device.ack_features(acked);
        }
        if added & STATUS_DRIVER_OK != 0 {
            let required = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
            if value & required != required || self.active {
                self.stats.refused_writes += 1;
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        // Every queue the driver made ready must be valid in guest memory. A queue it left
        // alone is passed on not ready: which queues a device needs can depend on the features
        // negotiated (a balloon driver that declines free page reporting never sets up that
        // queue), so the device decides.
        let ready_valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        if !ready_valid {
            self.stats.failed_activations += 1;
            self.needs_reset();
            return;
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues: self.queues.iter().map(duplicate_queue).collect(),
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => self.active = true,
            Err(e) => {
                log::warn!(
                    "virtio device {} failed to start: {e}",
                    self.device.device_type()
                );
                self.stats.failed_activations += 1;
                self.needs_reset();
            }
        }
    }

    fn queue_setup_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & STATUS_DRIVER_OK == 0
            && self
                .queues
                .get(self.queue_sel as usize)
                .is_some_and(|q| !q.ready())
    }

    fn read_register(&mut self, offset: u64) -> Option<u32> {
        let features = self.offered_features();
        Some(match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => return None,
        })
    }

    fn write_register(&mut self, offset: u64, v: u32) -> bool {
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
                    self.stats.refused_writes += 1;
                    return true;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => self.stats.refused_writes += 1,
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x50 if self.inline_notify => {
                if (v as usize) < self.queues.len() {
                    self.notify_queue(v as usize);
                } else {
                    self.stats.refused_writes += 1;
                }
            }
            0x50 => match self.queue_events.get(v as usize) {
                Some(evt) => {
                    if evt.write(1).is_err() {
                        self.stats.refused_writes += 1;
                    }
                }
                None => self.stats.refused_writes += 1,
            },
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::AcqRel);
            }
            0x70 => self.set_status(v),
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => self.write_queue(offset, v),
            _ => return false,
        }
        true
    }

    fn write_queue(&mut self, offset: u64, v: u32) {
        if !self.queue_setup_allowed() {
            // Clearing QueueReady on a ready queue is legal but ebb does not support
            // per-queue reset; both are refused alike.
            self.stats.refused_writes += 1;
            return;
        }
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            return;
        };
        match offset {
            0x38 => {
                let ok = u16::try_from(v)
                    .ok()
                    .is_some_and(|n| q.try_set_size(n).is_ok());
                if !ok {
                    self.stats.refused_writes += 1;
                }
            }
            0x44 => q.set_ready(v == 1),
            0x80 => q.set_desc_table_address(Some(v), None),
            0x84 => q.set_desc_table_address(None, Some(v)),
            0x90 => q.set_avail_ring_address(Some(v), None),
            0x94 => q.set_avail_ring_address(None, Some(v)),
            0xa0 => q.set_used_ring_address(Some(v), None),
            0xa4 => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }
}

/// A copy of a configured queue for the device (virtio-queue's `Queue` is not `Clone`).
fn duplicate_queue(q: &Queue) -> Queue {
    let mut copy = Queue::new(q.max_size()).unwrap_or_default();
    // The source queue passed the same checks, so these cannot fail.
    let _ = copy.try_set_size(q.size());
    let _ = copy.try_set_desc_table_address(vm_memory::GuestAddress(q.desc_table()));
    let _ = copy.try_set_avail_ring_address(vm_memory::GuestAddress(q.avail_ring()));
    let _ = copy.try_set_used_ring_address(vm_memory::GuestAddress(q.used_ring()));
    copy.set_ready(q.ready());
    copy
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let value = if data.len() == 4 && offset.is_multiple_of(4) {
            self.read_register(offset)
        } else {
            None
        };
        match value {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => {
                self.stats.bad_accesses += 1;
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let ok = match <[u8; 4]>::try_from(data) {
            Ok(b) if offset.is_multiple_of(4) => self.write_register(offset, u32::from_le_bytes(b)),
            _ => false,
        };
        if !ok {
            self.stats.bad_accesses += 1;
        }
    }
}

#[cfg(test)]
#[path = "mmio_tests.rs"]
mod tests;
