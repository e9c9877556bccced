use std::sync::Mutex;

use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::ActivateError;

#[derive(Default)]
struct Record {
    acked: u64,
    activated: usize,
    notified: Vec<usize>,
    resets: usize,
    refused_not_ready: usize,
    config: [u8; 8],
}

struct Mock {
    rec: Arc<Mutex<Record>>,
    fail: bool,
}

impl VirtioDevice for Mock {
    fn device_type(&self) -> u32 {
        5
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 128]
    }
    fn device_features(&self) -> u64 {
        0b101
    }
    fn ack_features(&mut self, features: u64) {
        self.rec.lock().unwrap().acked = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.rec.lock().unwrap().config;
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| cfg.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut r = self.rec.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset)
                .ok()
                .and_then(|o| r.config.get_mut(o + i))
            {
                *slot = *b;
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.fail {
            return Err(ActivateError::Device("mock refuses".into()));
        }
        assert_eq!(ctx.queues.len(), 2);
        // This device needs both its queues; the transport passes on any it was not given.
        let ready = ctx.queues.iter().filter(|q| q.ready()).count();
        if ready != 2 {
            self.rec.lock().unwrap().refused_not_ready += 1;
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: ready,
            });
        }
        ctx.interrupt.trigger(InterruptKind::Queue).unwrap();
        self.rec.lock().unwrap().activated += 1;
        Ok(())
    }
    fn queue_notify(&mut self, index: usize) {
        self.rec.lock().unwrap().notified.push(index);
    }
    fn reset(&mut self) {
        self.rec.lock().unwrap().resets += 1;
    }
}

fn transport(fail: bool) -> (MmioTransport, Arc<Mutex<Record>>, EventFd) {
    let rec = Arc::new(Mutex::new(Record::default()));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(
        Box::new(Mock {
            rec: rec.clone(),
            fail,
        }),
        mem,
        irq.try_clone().unwrap(),
    )
    .unwrap();
    (t, rec, irq)
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn set_up_queue(t: &mut MmioTransport, idx: u32, base: u64) {
    w32(t, 0x30, idx);
    w32(t, 0x38, 16);
    w32(t, 0x80, base as u32);
    w32(t, 0x84, 0);
    w32(t, 0x90, (base + 0x1000) as u32);
    w32(t, 0x94, 0);
    w32(t, 0xa0, (base + 0x2000) as u32);
    w32(t, 0xa4, 0);
    w32(t, 0x44, 1);
}

fn negotiate(t: &mut MmioTransport) {
    w32(t, 0x70, STATUS_ACKNOWLEDGE);
    w32(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w32(t, 0x24, 0);
    w32(t, 0x20, 0b001);
    w32(t, 0x24, 1);
    w32(t, 0x20, 1);
    w32(
        t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
}

const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

#[test]
fn identity_registers() {
    let (mut t, _, _) = transport(false);
    assert_eq!(r32(&mut t, 0x0), MAGIC);
    assert_eq!(r32(&mut t, 0x4), 2);
    assert_eq!(r32(&mut t, 0x8), 5);
    assert_eq!(r32(&mut t, 0xc), VENDOR_ID);
    assert_eq!(r32(&mut t, 0x10), 0b101);
    w32(&mut t, 0x14, 1);
    assert_eq!(r32(&mut t, 0x10), 1, "VERSION_1 is bit 32");
    w32(&mut t, 0x14, 7);
    assert_eq!(r32(&mut t, 0x10), 0);
    w32(&mut t, 0x30, 1);
    assert_eq!(r32(&mut t, 0x34), 128);
    w32(&mut t, 0x30, 99);
    assert_eq!(r32(&mut t, 0x34), 0);
}

#[test]
fn full_negotiation_activates_and_notifies() {
    let (mut t, rec, irq) = transport(false);
    negotiate(&mut t);
    assert_eq!(r32(&mut t, 0x70) & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
    assert_eq!(rec.lock().unwrap().acked, VIRTIO_F_VERSION_1 | 1);
    set_up_queue(&mut t, 0, 0x10000);
    set_up_queue(&mut t, 1, 0x20000);
    w32(&mut t, 0x70, ALL_OK);
    assert!(t.is_active());
    assert_eq!(rec.lock().unwrap().activated, 1);
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(r32(&mut t, 0x60), INT_USED_RING);
    w32(&mut t, 0x64, INT_USED_RING);
    assert_eq!(r32(&mut t, 0x60), 0);

    // A notify write reaches the queue eventfd; the event loop then calls notify_queue.
    w32(&mut t, QUEUE_NOTIFY_OFFSET, 1);
    assert_eq!(t.queue_events()[1].read().unwrap(), 1);
    t.notify_queue(1);
    t.notify_queue(7);
    assert_eq!(rec.lock().unwrap().notified, vec![1]);
    w32(&mut t, QUEUE_NOTIFY_OFFSET, 9);
    assert_eq!(t.stats().refused_writes, 1);

    // Queue set-up after DRIVER_OK is refused.
    w32(&mut t, 0x30, 0);
    w32(&mut t, 0x38, 8);
    assert_eq!(t.stats().refused_writes, 2);

    // Reset.
    w32(&mut t, 0x70, 0);
    assert!(!t.is_active());
    assert_eq!(rec.lock().unwrap().resets, 1);
    assert_eq!(r32(&mut t, 0x70), 0);
    assert_eq!(r32(&mut t, 0x44), 0);
}

#[test]
fn inline_notify_calls_the_device_on_the_writing_thread() {
    let (mut t, rec, _irq) = transport(false);
    t.set_inline_notify(true);
    negotiate(&mut t);
    set_up_queue(&mut t, 0, 0x10000);
    set_up_queue(&mut t, 1, 0x20000);
    // Before DRIVER_OK nothing reaches the device.
    w32(&mut t, QUEUE_NOTIFY_OFFSET, 1);
    assert!(rec.lock().unwrap().notified.is_empty());
    w32(&mut t, 0x70, ALL_OK);
    w32(&mut t, QUEUE_NOTIFY_OFFSET, 1);
    w32(&mut t, QUEUE_NOTIFY_OFFSET, 0);
    assert_eq!(rec.lock().unwrap().notified, vec![1, 0]);
    // No eventfd is written, and a queue that does not exist is refused and counted.
    assert!(t.queue_events()[1].read().is_err(), "nothing signalled");
    w32(&mut t, QUEUE_NOTIFY_OFFSET, 9);
    assert_eq!(t.stats().refused_writes, 1);
    assert_eq!(rec.lock().unwrap().notified, vec![1, 0]);
}

#[test]
fn features_not_offered_or_without_version_1_are_refused() {
    let (mut t, _, _) = transport(false);
    w32(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w32(&mut t, 0x20, 0b010);
    w32(&mut t, 0x24, 1);
    w32(&mut t, 0x20, 1);
    w32(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(r32(&mut t, 0x70) & STATUS_FEATURES_OK, 0);

    let (mut t, _, _) = transport(false);
    w32(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w32(&mut t, 0x20, 0b001);
    w32(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    assert_eq!(
        r32(&mut t, 0x70) & STATUS_FEATURES_OK,
        0,
        "legacy drivers are refused"
    );
}

#[test]
fn driver_ok_without_valid_queues_needs_reset() {
    let (mut t, rec, _) = transport(false);
    negotiate(&mut t);
    set_up_queue(&mut t, 0, 0x10000);
    // Queue 1 points outside guest memory.
    set_up_queue(&mut t, 1, 0xfff_0000);
    w32(&mut t, 0x70, ALL_OK);
    assert!(!t.is_active());
    assert_ne!(r32(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(rec.lock().unwrap().activated, 0);
    assert_eq!(t.stats().failed_activations, 1);
}

#[test]
fn a_queue_left_alone_is_the_devices_call() {
    let (mut t, rec, _) = transport(false);
    negotiate(&mut t);
    set_up_queue(&mut t, 0, 0x10000);
    // Queue 1 is never set up: the transport passes it on not ready and the mock refuses.
    w32(&mut t, 0x70, ALL_OK);
    assert!(!t.is_active());
    assert_ne!(r32(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(rec.lock().unwrap().refused_not_ready, 1);
    assert_eq!(t.stats().failed_activations, 1);
}

#[test]
fn device_refusal_needs_reset() {
    let (mut t, _, _) = transport(true);
    negotiate(&mut t);
    set_up_queue(&mut t, 0, 0x10000);
    set_up_queue(&mut t, 1, 0x20000);
    w32(&mut t, 0x70, ALL_OK);
    assert!(!t.is_active());
    assert_ne!(r32(&mut t, 0x70) & STATUS_DEVICE_NEEDS_RESET, 0);
}

#[test]
fn bad_accesses_are_counted_not_fatal() {
    let (mut t, _, _) = transport(false);
    let mut two = [0u8; 2];
    t.read(0x0, &mut two);
    assert_eq!(two, [0, 0]);
    t.write(0x70, &[1]);
    w32(&mut t, 0x2, 1);
    w32(&mut t, 0xf0, 1);
    assert_eq!(r32(&mut t, 0xf8), 0);
    assert_eq!(t.stats().bad_accesses, 5);
    // Status bits cannot be cleared except by reset; queue sizes are checked.
    w32(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w32(&mut t, 0x70, STATUS_ACKNOWLEDGE);
    assert_eq!(r32(&mut t, 0x70), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w32(&mut t, 0x20, 1);
    w32(&mut t, 0x24, 1);
    w32(&mut t, 0x20, 1);
    w32(
        &mut t,
        0x70,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    w32(&mut t, 0x30, 0);
    w32(&mut t, 0x38, 3);
    w32(&mut t, 0x38, 512);
    w32(&mut t, 0x38, 0x1_0000);
    assert_eq!(t.stats().refused_writes, 4);
}

#[test]
fn config_space_passes_through() {
    let (mut t, rec, _) = transport(false);
    t.write(0x104, &[1, 2]);
    assert_eq!(rec.lock().unwrap().config[4..6], [1, 2]);
    let mut b = [0u8; 4];
    t.read(0x104, &mut b);
    assert_eq!(b, [1, 2, 0, 0]);
    t.read(0xffc, &mut b);
    assert_eq!(b, [0; 4]);
}

mod props {
    use proptest::prelude::*;

    use super::*;

    /// A register access as a hostile driver may make it: mostly the transport's registers
    /// (word aligned, with the queue and status values that matter), sometimes config space
    /// or anywhere, of any width.
    fn access() -> impl Strategy<Value = (u64, usize, bool, u64)> {
        (
            prop_oneof![
                6 => (0u64..0x40).prop_map(|w| w * 4),
                2 => 0x100u64..0x110,
                1 => any::<u64>(),
            ],
            prop_oneof![Just(4usize), Just(1), Just(2), Just(8)],
            prop::bool::weighted(0.7),
            prop_oneof![
                3 => 0u64..4,
                2 => Just(0xf),
                2 => (0u64..0x10_0000).prop_map(|a| a & !0xf),
                1 => any::<u64>(),
            ],
        )
    }

    /// Cases per run: 256 in the suite; `EBB_FUZZ_CASES=N` for a long run (docs/TESTING.md).
    fn cases() -> u32 {
        std::env::var("EBB_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Arbitrary register sequences (feature words, queue addresses anywhere, sizes,
        /// readiness, status, notifications, config writes): the transport never panics, the
        /// device is told nothing it refused, and the identity registers still read true.
        #[test]
        fn arbitrary_register_sequences(accesses in prop::collection::vec(access(), 1..64)) {
            let (mut t, rec, _irq) = transport(false);
            for (off, width, write, value) in accesses {
                let bytes = value.to_le_bytes();
                if write {
                    t.write(off, &bytes[..width]);
                } else {
                    let mut b = [0u8; 8];
                    t.read(off, &mut b[..width]);
                }
            }
            prop_assert_eq!(r32(&mut t, 0), 0x7472_6976);
            prop_assert_eq!(r32(&mut t, 4), 2);
            prop_assert_eq!(r32(&mut t, 8), 5);
            let r = rec.lock().unwrap();
            // Only features offered (and VERSION_1) are ever acknowledged to the device.
            prop_assert_eq!(r.acked & !0b101, 0);
            prop_assert!(r.activated <= 1 + r.resets);
        }
    }
}
