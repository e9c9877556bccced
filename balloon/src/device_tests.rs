use std::sync::Mutex;

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::F_FREE_PAGE_HINT;

const RAM: u64 = 16 << 20;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(u64, u64)>>,
    fail: bool,
    /// Ranges given as inflated (held) and as deflated (taken back).
    inflated: Mutex<Vec<(u64, u64)>>,
    deflated: Mutex<Vec<(u64, u64)>>,
}

impl ReleaseBackend for Recorder {
    fn release(&self, gpa: u64, len: u64) -> Result<u64, ReleaseError> {
        assert!(
            gpa + len <= RAM
                && gpa.is_multiple_of(PAGE_SIZE)
                && len.is_multiple_of(PAGE_SIZE)
                && len > 0
        );
        self.calls.lock().unwrap().push((gpa, len));
        if self.fail {
            return Err(ReleaseError {
                gpa,
                ranges: 1,
                source: "refused".into(),
            });
        }
        Ok(len)
    }

    fn inflate_many(&self, ranges: &[PageRange]) -> Result<u64, ReleaseError> {
        let mut held = self.inflated.lock().unwrap();
        held.extend(ranges.iter().map(|r| (r.gpa(), r.len())));
        drop(held);
        self.release_many(ranges)
    }

    fn deflate_many(&self, ranges: &[PageRange]) -> Result<(), ReleaseError> {
        let mut back = self.deflated.lock().unwrap();
        back.extend(ranges.iter().map(|r| (r.gpa(), r.len())));
        Ok(())
    }
}

#[derive(Default)]
struct Irqs(Mutex<Vec<NotifyKind>>);

impl Notifier for Irqs {
    fn notify(&self, kind: NotifyKind) -> std::io::Result<()> {
        self.0.lock().unwrap().push(kind);
        Ok(())
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap()
}

fn queue_base(i: usize) -> GuestAddress {
    GuestAddress(0x10_0000 + i as u64 * 0x1_0000)
}

fn mocks(mem: &GuestMemoryMmap, n: usize) -> Vec<MockSplitQueue<'_, GuestMemoryMmap>> {
    (0..n)
        .map(|i| MockSplitQueue::create(mem, queue_base(i), QUEUE_SIZE))
        .collect()
}

/// Driver side of one queue: the mock plus the next free descriptor index.
struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next: u16,
}

impl DriverQueue<'_> {
    /// Adds one chain of (addr, len, flags) buffers and returns its head index.
    fn add(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(k, &(addr, len, flags))| {
                let last = k + 1 == bufs.len();
                let flags = if last { flags } else { flags | NEXT };
                let next = if last { 0 } else { head + k as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&descs, head).unwrap();
        self.next += bufs.len() as u16;
        head
    }

    fn used(&self) -> Vec<u32> {
        let n = self.mock.used().idx().load();
        (0..n as usize)
            .map(|i| self.mock.used().ring().ref_at(i).unwrap().load().id())
            .collect()
    }
}

struct Rig<'a> {
    balloon: Balloon,
    backend: Arc<Recorder>,
    irqs: Arc<Irqs>,
    queues: Vec<DriverQueue<'a>>,
}

/// A balloon offering `config`, negotiated with `acked`, activated over fresh mock queues.
fn rig(mem: &GuestMemoryMmap, config: BalloonConfig, acked: u64, fail: bool) -> Rig<'_> {
    let backend = Arc::new(Recorder {
        fail,
        ..Default::default()
    });
    let irqs = Arc::new(Irqs::default());
    let mut balloon = Balloon::new(config, RAM, backend.clone()).unwrap();
    balloon.ack_features(acked);
    let n = queue_roles(balloon.acked_features()).len();
    let queues: Vec<DriverQueue<'_>> = mocks(mem, n)
        .into_iter()
        .map(|mock| DriverQueue { mock, next: 0 })
        .collect();
    let qs = queues
        .iter()
        .map(|d| d.mock.create_queue::<Queue>().unwrap())
        .collect();
    balloon.activate(mem.clone(), qs, irqs.clone()).unwrap();
    Rig {
        balloon,
        backend,
        irqs,
        queues,
    }
}

fn all_features() -> BalloonConfig {
    BalloonConfig {
        stats: true,
        deflate_on_oom: true,
        reporting: true,
        hinting: false,
    }
}

/// Writes `pfns` as le32 at `at` and returns the byte length.
fn put_pfns(mem: &GuestMemoryMmap, at: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

const BUF: u64 = 0x80_0000;

#[test]
fn inflate_releases_coalesced_ranges_and_interrupts() {
    let mem = mem();
    let mut r = rig(&mem, BalloonConfig::default(), 0, false);
    let len = put_pfns(&mem, BUF, &[10, 11, 12, 20, 13, 21, 100]);
    let head = r.queues[0].add(&[(BUF, len, 0)]);
    r.balloon.queue_notify(0);
    assert_eq!(
        *r.backend.calls.lock().unwrap(),
        vec![
            (10 * 4096, 4 * 4096),
            (20 * 4096, 2 * 4096),
            (100 * 4096, 4096)
        ]
    );
    assert_eq!(r.queues[0].used(), vec![u32::from(head)]);
    assert_eq!(*r.irqs.0.lock().unwrap(), vec![NotifyKind::Queue]);
    let s = r.balloon.stats();
    assert_eq!(s.pages_inflated, 7);
    assert_eq!(s.inflate_ranges, 3);
    assert_eq!(s.release_calls, 1, "one backend call per chain");
    assert_eq!(s.bytes_released, 7 * 4096);
    assert_eq!(r.balloon.held_pages(), 7);
    assert!(s.notify_ns_total > 0 && s.notify_ns_max <= s.notify_ns_total);
    // A notification with nothing queued does nothing.
    r.balloon.queue_notify(0);
    assert_eq!(r.irqs.0.lock().unwrap().len(), 1);
}

#[test]
fn hostile_inflate_chains_are_counted_and_dropped() {
    let mem = mem();
    let mut r = rig(&mem, BalloonConfig::default(), 0, false);
    let ram_pages = (RAM / PAGE_SIZE) as u32;
    // Out of RAM, u32::MAX and a duplicate inside one buffer; the rest is used.
    let len = put_pfns(&mem, BUF, &[5, ram_pages, u32::MAX, 6, 5]);
    r.queues[0].add(&[(BUF, len, 0)]);
    // A length that is not a multiple of 4: the whole chain goes, nothing released.
    put_pfns(&mem, BUF + 0x1000, &[40, 41]);
    r.queues[0].add(&[(BUF + 0x1000, 6, 0)]);
    // A device-writable buffer is skipped, the readable one in the same chain is used.
    let len2 = put_pfns(&mem, BUF + 0x2000, &[50]);
    r.queues[0].add(&[(BUF + 0x3000, 4, WRITE), (BUF + 0x2000, len2, 0)]);
    // A buffer outside guest memory, and an absurd length.
    r.queues[0].add(&[(0xffff_0000_0000, 4, 0)]);
    r.queues[0].add(&[(BUF, 0x8000_0000, 0)]);
    // A buffer that straddles the end of guest memory.
    r.queues[0].add(&[(RAM - 4, 8, 0)]);
    r.balloon.queue_notify(0);

    assert_eq!(
        *r.backend.calls.lock().unwrap(),
        vec![(5 * 4096, 2 * 4096), (50 * 4096, 4096)]
    );
    let s = r.balloon.stats();
    assert_eq!(s.bad_pfns, 2);
    assert_eq!(s.duplicate_pfns, 1);
    assert_eq!(s.bad_descriptors, 1);
    assert_eq!(s.chains_dropped, 4);
    assert_eq!(s.pages_inflated, 3);
    assert_eq!(
        r.queues[0].used().len(),
        6,
        "every chain goes back to the driver"
    );
    assert_eq!(s.chains_used, 6);

    // Inflating an already held page again is a duplicate, not a second release.
    let len = put_pfns(&mem, BUF, &[6]);
    r.queues[0].add(&[(BUF, len, 0)]);
    r.balloon.queue_notify(0);
    assert_eq!(r.balloon.stats().duplicate_pfns, 2);
    assert_eq!(r.backend.calls.lock().unwrap().len(), 2);
}

#[test]
fn a_queue_index_past_the_last_queue_is_ignored() {
    let mem = mem();
    let mut r = rig(&mem, BalloonConfig::default(), 0, false);
    let before = r.balloon.stats();
    r.balloon.queue_notify(2);
    r.balloon.queue_notify(usize::MAX);
    let after = r.balloon.stats();
    assert_eq!(after.notifications, before.notifications + 2);
    let untimed = |s: BalloonStats| BalloonStats {
        notifications: 0,
        notify_ns_total: 0,
        notify_ns_max: 0,
        ..s
    };
    assert_eq!(untimed(after), untimed(before));
    assert_eq!(untimed(after), BalloonStats::default());
    assert!(r.irqs.0.lock().unwrap().is_empty());
}

#[test]
fn deflate_counts_and_releases_nothing() {
    let mem = mem();
    let mut r = rig(&mem, BalloonConfig::default(), 0, false);
    let len = put_pfns(&mem, BUF, &[1, 2, 3]);
    r.queues[0].add(&[(BUF, len, 0)]);
    r.balloon.queue_notify(0);
    let len = put_pfns(&mem, BUF + 0x1000, &[2, 3, 9, 99_999_999]);
    r.queues[1].add(&[(BUF + 0x1000, len, 0)]);
    r.balloon.queue_notify(1);
    let s = r.balloon.stats();
    assert_eq!(s.pages_deflated, 2);
    assert_eq!(s.deflate_not_held, 1);
    assert_eq!(s.bad_pfns, 1);
    assert_eq!(r.balloon.held_pages(), 1);
    assert_eq!(r.backend.calls.lock().unwrap().len(), 1, "only the inflate");
    assert_eq!(r.queues[1].used().len(), 1);
    // The backend heard which pages were held and which came back, so it can fill freely
    // around the returned ones only; a reset returns the rest.
    assert_eq!(
        *r.backend.inflated.lock().unwrap(),
        [(PAGE_SIZE, 3 * PAGE_SIZE)]
    );
    assert_eq!(
        *r.backend.deflated.lock().unwrap(),
        [(2 * PAGE_SIZE, 2 * PAGE_SIZE)]
    );
    r.balloon.reset();
    assert_eq!(r.balloon.held_pages(), 0);
    assert_eq!(
        *r.backend.deflated.lock().unwrap(),
        [(2 * PAGE_SIZE, 2 * PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)]
    );
}

fn stat_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(t, v)| {
            let mut e = t.to_le_bytes().to_vec();
            e.extend_from_slice(&v.to_le_bytes());
            e
        })
        .collect()
}

#[test]
fn stats_buffer_is_parsed_held_and_returned_on_request() {
    let mem = mem();
    let mut r = rig(&mem, BalloonConfig::default(), 1 << F_STATS_VQ, false);
    assert_eq!(r.balloon.queue_role(2), Some(QueueRole::Stats));
    assert!(!r.balloon.request_stats(), "no buffer yet");
    let b = stat_bytes(&[(4, 100 << 20), (5, 256 << 20), (42, 7)]);
    mem.write_slice(&b, GuestAddress(BUF)).unwrap();
    let head = r.queues[2].add(&[(BUF, b.len() as u32, 0)]);
    r.balloon.queue_notify(2);
    let g = r.balloon.guest_stats().unwrap();
    assert_eq!(g.get(4), Some(100 << 20));
    assert_eq!(g.get(5), Some(256 << 20));
    assert_eq!(g.get(42), Some(7), "unknown tags are kept by number");
    assert!(r.queues[2].used().is_empty(), "the buffer is held");
    assert!(r.balloon.request_stats());
    assert_eq!(r.queues[2].used(), vec![u32::from(head)]);
    assert!(!r.balloon.request_stats(), "already returned");
    let s = r.balloon.stats();
    assert_eq!((s.stats_updates, s.stats_requests), (1, 1));
    assert_eq!(*r.irqs.0.lock().unwrap(), vec![NotifyKind::Queue]);

    // The driver refills: the new figures replace the old ones.
    let b = stat_bytes(&[(4, 1)]);
    mem.write_slice(&b, GuestAddress(BUF)).unwrap();
    r.queues[2].add(&[(BUF, b.len() as u32, 0)]);
    r.balloon.queue_notify(2);
    assert_eq!(r.balloon.guest_stats().unwrap().get(4), Some(1));
    assert_eq!(r.balloon.guest_stats().unwrap().get(5), None);
}

#[test]
fn stats_sent_before_driver_ok_are_picked_up_at_activation() {
    let mem = mem();
    let backend = Arc::new(Recorder::default());
    let mut balloon = Balloon::new(BalloonConfig::default(), RAM, backend).unwrap();
    balloon.ack_features(1 << F_STATS_VQ);
    let ms = mocks(&mem, 3);
    let mut stats_q = DriverQueue {
        mock: MockSplitQueue::create(&mem, queue_base(2), QUEUE_SIZE),
        next: 0,
    };
    let b = stat_bytes(&[(6, 12345)]);
    mem.write_slice(&b, GuestAddress(BUF)).unwrap();
    stats_q.add(&[(BUF, b.len() as u32, 0)]);
    let qs = vec![
        ms[0].create_queue::<Queue>().unwrap(),
        ms[1].create_queue::<Queue>().unwrap(),
        stats_q.mock.create_queue::<Queue>().unwrap(),
    ];
    balloon
        .activate(mem.clone(), qs, Arc::new(Irqs::default()))
        .unwrap();
    assert_eq!(balloon.guest_stats().unwrap().get(6), Some(12345));
}

#[test]
fn reported_ranges_are_validated_merged_and_released() {
    let mem = mem();
    // Stats not negotiated: reporting is queue 2, not 3.
    let mut r = rig(&mem, all_features(), 1 << F_REPORTING, false);
    assert_eq!(r.balloon.queue_role(2), Some(QueueRole::Reporting));
    let mib = 1u64 << 20;
    let head = r.queues[2].add(&[
        (4 * mib, 2 << 20, WRITE),
        (6 * mib, 2 << 20, WRITE),
        (10 * mib + 1, 4096, WRITE),
        (12 * mib, 0, WRITE),
        (RAM - 4096, 8192, WRITE),
        (u64::MAX - 4095, 4096, WRITE),
        (14 * mib, 4096 + 512, 0),
        (8 * mib, 4096, 0),
    ]);
    r.balloon.queue_notify(2);
    assert_eq!(
        *r.backend.calls.lock().unwrap(),
        vec![(4 * mib, 4 * mib + 4096)],
        "adjacent blocks are one release"
    );
    let s = r.balloon.stats();
    assert_eq!(s.bad_ranges, 5);
    assert_eq!(s.reports_handled, 3);
    assert_eq!(s.bytes_reported, 4 * mib + 4096);
    assert_eq!(r.queues[2].used(), vec![u32::from(head)]);
}

#[test]
fn queue_indices_follow_negotiated_features() {
    use QueueRole::*;
    assert_eq!(queue_roles(0), vec![Inflate, Deflate]);
    assert_eq!(queue_roles(1 << F_STATS_VQ), vec![Inflate, Deflate, Stats]);
    assert_eq!(
        queue_roles(1 << F_REPORTING),
        vec![Inflate, Deflate, Reporting]
    );
    let both = (1 << F_STATS_VQ) | (1 << F_REPORTING) | (1 << F_DEFLATE_ON_OOM);
    assert_eq!(queue_roles(both), vec![Inflate, Deflate, Stats, Reporting]);
    // Hinting sits between statistics and reporting when negotiated.
    let hint = (1 << F_STATS_VQ) | (1 << F_FREE_PAGE_HINT) | (1 << F_REPORTING);
    assert_eq!(
        queue_roles(hint),
        vec![Inflate, Deflate, Stats, Hinting, Reporting]
    );
    assert_eq!(
        queue_roles(1 << F_FREE_PAGE_HINT),
        vec![Inflate, Deflate, Hinting]
    );
    // Not offered here, so acknowledging it changes nothing.
    let mut b = Balloon::new(all_features(), RAM, Arc::new(Recorder::default())).unwrap();
    assert_eq!(b.device_features(), both);
    assert_eq!(b.queue_sizes(), vec![QUEUE_SIZE; 4]);
    b.ack_features(1 << F_FREE_PAGE_HINT | 1 << F_REPORTING);
    assert_eq!(b.acked_features(), 1 << F_REPORTING);
    let off = Balloon::new(
        BalloonConfig {
            stats: false,
            ..BalloonConfig::default()
        },
        RAM,
        Arc::new(Recorder::default()),
    )
    .unwrap();
    assert_eq!(off.device_features(), 0);
    assert_eq!(off.queue_sizes().len(), 2);
}

#[test]
fn activation_checks_the_queues_against_the_features() {
    let mem = mem();
    let ms = mocks(&mem, 4);
    let make = |n: usize, ready: usize| -> Vec<Queue> {
        (0..n)
            .map(|i| {
                let mut q = ms[i].create_queue::<Queue>().unwrap();
                q.set_ready(i < ready);
                q
            })
            .collect()
    };
    let irqs: Arc<dyn Notifier> = Arc::new(Irqs::default());
    let mut b = Balloon::new(all_features(), RAM, Arc::new(Recorder::default())).unwrap();
    b.ack_features(1 << F_REPORTING);
    // A transport sized for every offered queue, with the unused last one not ready: fine.
    b.activate(mem.clone(), make(4, 3), irqs.clone()).unwrap();
    assert!(b.is_active());
    b.reset();
    b.ack_features(1 << F_REPORTING);
    assert!(matches!(
        b.activate(mem.clone(), make(2, 2), irqs.clone()),
        Err(BalloonError::QueueCount {
            expected: 3,
            got: 2
        })
    ));
    assert!(matches!(
        b.activate(mem.clone(), make(4, 4), irqs.clone()),
        Err(BalloonError::QueueCount { .. })
    ));
    // A queue whose rings lie outside guest memory.
    let mut bad = make(3, 3);
    bad[1].set_desc_table_address(Some(0xffff_0000), Some(0xff));
    assert!(matches!(
        b.activate(mem.clone(), bad, irqs.clone()),
        Err(BalloonError::QueueInvalid(1))
    ));
    assert!(!b.is_active());
}

#[test]
fn config_space_and_target() {
    let mem = mem();
    let mut r = rig(&mem, BalloonConfig::default(), 0, false);
    let ram_pages = RAM / PAGE_SIZE;
    assert!(matches!(
        r.balloon.set_target_pages(ram_pages + 1),
        Err(BalloonError::TargetTooLarge { .. })
    ));
    assert_eq!(r.balloon.target_pages(), 0);
    r.balloon.set_target_pages(1000).unwrap();
    assert_eq!(*r.irqs.0.lock().unwrap(), vec![NotifyKind::Config]);
    let mut b = [0u8; 8];
    r.balloon.read_config(0, &mut b);
    assert_eq!(b[..4], 1000u32.to_le_bytes());
    r.balloon.write_config(0, &5u32.to_le_bytes());
    r.balloon.write_config(4, &900u32.to_le_bytes());
    assert_eq!(
        r.balloon.target_pages(),
        1000,
        "the driver cannot set the target"
    );
    assert_eq!(r.balloon.actual_pages(), 900);
    assert_eq!(r.balloon.stats().config_writes_refused, 4);
    let mut far = [0xffu8; 4];
    r.balloon.read_config(0x1000, &mut far);
    assert_eq!(far, [0; 4]);

    // Reset keeps the host's target and forgets the driver's state.
    let len = put_pfns(&mem, BUF, &[1]);
    r.queues[0].add(&[(BUF, len, 0)]);
    r.balloon.queue_notify(0);
    r.balloon.reset();
    assert!(!r.balloon.is_active());
    assert_eq!(r.balloon.target_pages(), 1000);
    assert_eq!(r.balloon.actual_pages(), 0);
    assert_eq!(r.balloon.held_pages(), 0);
    // Not active: the target is stored, no interrupt.
    r.balloon.set_target_pages(0).unwrap();
    assert_eq!(r.irqs.0.lock().unwrap().len(), 2, "config + the inflate");
    r.balloon.queue_notify(0);
}

#[test]
fn release_failures_are_counted_and_the_chain_still_completes() {
    let mem = mem();
    let mut r = rig(&mem, BalloonConfig::default(), 0, true);
    let len = put_pfns(&mem, BUF, &[7, 9]);
    r.queues[0].add(&[(BUF, len, 0)]);
    r.balloon.queue_notify(0);
    let s = r.balloon.stats();
    // One call for the chain's two ranges; the default batch stops at the first failure.
    assert_eq!((s.release_calls, s.release_errors), (1, 1));
    assert_eq!(r.backend.calls.lock().unwrap().len(), 1);
    assert_eq!(s.bytes_released, 0);
    assert_eq!(s.pages_inflated, 2, "the guest gave them up all the same");
    assert_eq!(r.queues[0].used().len(), 1);
}

#[test]
fn ram_that_frame_numbers_cannot_describe_is_refused() {
    for ram in [0, 4095, 4097, (u64::from(u32::MAX) + 1) * PAGE_SIZE] {
        assert!(matches!(
            Balloon::check_ram(ram),
            Err(BalloonError::BadRam(_))
        ));
    }
    assert_eq!(Balloon::check_ram(RAM).unwrap(), RAM / PAGE_SIZE);
}

mod props {
    use proptest::prelude::*;

    use super::*;

    /// One buffer of a chain: frame numbers (some inside RAM, some anywhere), extra bytes that
    /// break the 4-byte length rule, the write-only flag, and whether it points outside RAM.
    /// (frame numbers, extra length bytes, write-only, outside RAM).
    type Buffer = (Vec<u32>, u32, bool, bool);

    fn buffer() -> impl Strategy<Value = Buffer> {
        let pfn = prop_oneof![0u32..(RAM / PAGE_SIZE) as u32 + 8, any::<u32>()];
        (
            prop::collection::vec(pfn, 0..40),
            prop_oneof![8 => Just(0u32), 1 => 1u32..4],
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.05),
        )
    }

    fn chain() -> impl Strategy<Value = (bool, Vec<Buffer>)> {
        (
            prop::bool::weighted(0.7),
            prop::collection::vec(buffer(), 1..4),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn inflate_and_deflate_keep_their_books(chains in prop::collection::vec(chain(), 1..16)) {
            let mem = mem();
            let mut r = rig(&mem, BalloonConfig::default(), 0, false);
            let mut slot = 0u64;
            let mut added = [0usize; 2];
            for (inflate, bufs) in &chains {
                let mut descs = Vec::new();
                for (pfns, extra, write_only, outside) in bufs {
                    let at = BUF + slot * 0x1000;
                    slot += 1;
                    let len = put_pfns(&mem, at, pfns) + extra;
                    let addr = if *outside { RAM + at } else { at };
                    descs.push((addr, len, if *write_only { WRITE } else { 0 }));
                }
                let q = usize::from(!*inflate);
                r.queues[q].add(&descs);
                added[q] += 1;
                r.balloon.queue_notify(q);
            }
            let s = r.balloon.stats();
            let released: u64 = r.backend.calls.lock().unwrap().iter().map(|c| c.1).sum();
            prop_assert_eq!(released, s.pages_inflated * PAGE_SIZE);
            prop_assert_eq!(s.bytes_released, released);
            prop_assert_eq!(r.balloon.held_pages(), s.pages_inflated - s.pages_deflated);
            prop_assert_eq!(r.queues[0].used().len(), added[0]);
            prop_assert_eq!(r.queues[1].used().len(), added[1]);
            prop_assert_eq!(s.chains_used as usize, added[0] + added[1]);
        }

        #[test]
        fn reported_blocks_stay_inside_ram(
            blocks in prop::collection::vec((any::<u64>(), any::<u32>(), 0u64..RAM / PAGE_SIZE, 1u32..600), 1..40)
        ) {
            let mem = mem();
            let mut r = rig(&mem, all_features(), 1 << F_REPORTING, false);
            // Mix arbitrary blocks with well-formed ones.
            let descs: Vec<(u64, u32, u16)> = blocks
                .iter()
                .enumerate()
                .map(|(i, &(a, l, page, pages))| {
                    if i % 2 == 0 {
                        (a, l, WRITE)
                    } else {
                        (page * PAGE_SIZE, pages * PAGE_SIZE as u32, WRITE)
                    }
                })
                .take(200)
                .collect();
            for part in descs.chunks(32) {
                r.queues[2].add(part);
            }
            r.balloon.queue_notify(2);
            let s = r.balloon.stats();
            let calls = r.backend.calls.lock().unwrap().clone();
            let total: u64 = calls.iter().map(|c| c.1).sum();
            prop_assert_eq!(total, s.bytes_reported);
            // virtio-queue ends a chain at the descriptor that takes it past 4 GiB in total
            // (virtio 1.2, 2.7.5.2); the rest of that chain is never seen.
            let seen: u64 = descs
                .chunks(32)
                .map(|part| {
                    let mut sum = 0u64;
                    part.iter()
                        .take_while(|d| {
                            sum += u64::from(d.1);
                            sum <= u64::from(u32::MAX)
                        })
                        .count() as u64
                })
                .sum();
            prop_assert_eq!(s.reports_handled + s.bad_ranges, seen);
            prop_assert_eq!(r.queues[2].used().len(), descs.len().div_ceil(32));
        }
    }
}

/// Writes a le32 command id at `at`.
fn put_cmd(mem: &GuestMemoryMmap, at: u64, cmd: u32) {
    mem.write_slice(&cmd.to_le_bytes(), GuestAddress(at))
        .unwrap();
}

#[test]
fn free_page_hinting_releases_only_the_current_runs_blocks() {
    let mem = mem();
    let config = BalloonConfig {
        stats: false,
        hinting: true,
        ..BalloonConfig::default()
    };
    let mut r = rig(&mem, config, 1 << F_FREE_PAGE_HINT, false);
    assert_eq!(r.balloon.queue_role(2), Some(QueueRole::Hinting));
    let cmd_id = |b: &Balloon| {
        let mut c = [0u8; 4];
        b.read_config(8, &mut c);
        u32::from_le_bytes(c)
    };
    assert_eq!(r.balloon.hinting_status().unwrap(), (CMD_ID_STOP, None));

    // A block before any run is ignored.
    r.queues[2].add(&[(0x40_0000, 0x40_0000, WRITE)]);
    r.balloon.queue_notify(2);
    assert_eq!(r.balloon.stats().hints_ignored, 1);
    assert!(r.backend.calls.lock().unwrap().is_empty());

    // Run 2: the id is published with a config interrupt.
    let id = r.balloon.start_hinting(true).unwrap();
    assert_eq!((id, cmd_id(&r.balloon)), (2, 2));
    assert_eq!(r.irqs.0.lock().unwrap().last(), Some(&NotifyKind::Config));
    // The guest starts the run, then hints two 4 MiB blocks, each in its own chain.
    put_cmd(&mem, BUF, 2);
    r.queues[2].add(&[(BUF, 4, 0)]);
    r.queues[2].add(&[(0x40_0000, 0x40_0000, WRITE)]);
    r.queues[2].add(&[(0x80_0000 + 0x40_0000, 0x40_0000, WRITE)]);
    r.balloon.queue_notify(2);
    assert_eq!(r.balloon.hinting_status().unwrap(), (2, Some(2)));
    assert_eq!(
        *r.backend.calls.lock().unwrap(),
        vec![(0x40_0000, 0x40_0000), (0xc0_0000, 0x40_0000)]
    );
    let st = r.balloon.stats();
    assert_eq!((st.hint_blocks, st.bytes_hinted), (2, 8 << 20));
    // Hostile blocks (outside RAM, unaligned) and a command of the wrong size are dropped.
    r.queues[2].add(&[(RAM - 4096, 8192, WRITE)]);
    r.queues[2].add(&[(0x1001, 4096, WRITE)]);
    r.queues[2].add(&[(BUF, 8, 0)]);
    r.queues[2].add(&[(BUF, 4, 0), (0x40_0000, 4096, WRITE)]);
    r.balloon.queue_notify(2);
    let st = r.balloon.stats();
    assert_eq!(st.bad_ranges, 2);
    assert_eq!(st.chains_dropped, 2);
    assert_eq!(r.backend.calls.lock().unwrap().len(), 2);
    // STOP from the guest is answered with DONE (acknowledge_on_stop).
    put_cmd(&mem, BUF, CMD_ID_STOP);
    r.queues[2].add(&[(BUF, 4, 0)]);
    r.balloon.queue_notify(2);
    assert_eq!(r.balloon.hinting_status().unwrap(), (CMD_ID_DONE, Some(0)));
    assert_eq!(cmd_id(&r.balloon), CMD_ID_DONE);
    // A late block of run 2, after DONE, is never released: the guest may use it again.
    r.queues[2].add(&[(0x100_0000 - 0x40_0000, 0x40_0000, WRITE)]);
    r.balloon.queue_notify(2);
    assert_eq!(r.balloon.stats().hints_ignored, 2);
    assert_eq!(r.backend.calls.lock().unwrap().len(), 2);
    // Every chain went back to the driver.
    assert_eq!(r.queues[2].used().len(), 10);

    // Run 3 without acknowledgement: STOP leaves the id; stop_hinting publishes DONE.
    assert_eq!(r.balloon.start_hinting(false).unwrap(), 3);
    put_cmd(&mem, BUF, 2);
    r.queues[2].add(&[(BUF, 4, 0)]);
    r.queues[2].add(&[(0x40_0000, 0x40_0000, WRITE)]);
    r.balloon.queue_notify(2);
    assert_eq!(
        r.balloon.stats().hints_ignored,
        3,
        "a block of an older run is ignored"
    );
    put_cmd(&mem, BUF, CMD_ID_STOP);
    r.queues[2].add(&[(BUF, 4, 0)]);
    r.balloon.queue_notify(2);
    assert_eq!(r.balloon.hinting_status().unwrap(), (3, Some(0)));
    r.balloon.stop_hinting().unwrap();
    assert_eq!(cmd_id(&r.balloon), CMD_ID_DONE);
    assert_eq!(r.balloon.stats().hint_runs, 2);

    // A reset forgets the run.
    r.balloon.reset();
    assert_eq!(cmd_id(&r.balloon), CMD_ID_STOP);
    assert!(matches!(
        r.balloon.start_hinting(true),
        Err(BalloonError::NotActive)
    ));
}

#[test]
fn hinting_needs_the_feature() {
    let mem = mem();
    let mut r = rig(&mem, all_features(), 1 << F_REPORTING, false);
    assert!(matches!(
        r.balloon.start_hinting(true),
        Err(BalloonError::HintingOff)
    ));
    assert!(matches!(
        r.balloon.stop_hinting(),
        Err(BalloonError::HintingOff)
    ));
    assert!(r.balloon.hinting_status().is_err());
}

mod raw_props {
    use proptest::prelude::*;

    use super::*;

    /// A descriptor as a hostile driver may write it: any table index, address (mostly near
    /// guest RAM, sometimes anywhere), length, flags (NEXT, WRITE, INDIRECT and unknown bits)
    /// and next index.
    fn raw_desc() -> impl Strategy<Value = (u16, u64, u32, u16, u16)> {
        (
            prop_oneof![3 => 0u16..32, 1 => any::<u16>()],
            // Mostly the buffer area, whose words are frame numbers (see below).
            prop_oneof![
                4 => (0u64..64).prop_map(|i| BUF + i * 256),
                2 => 0u64..RAM + 0x10_0000,
                1 => any::<u64>(),
            ],
            prop_oneof![4 => (0u32..64).prop_map(|n| n * 4), 2 => 0u32..0x40_1000, 1 => any::<u32>()],
            any::<u16>(),
            prop_oneof![3 => 0u16..32, 1 => any::<u16>()],
        )
    }

    /// One step: descriptors written into queue `q`'s table, heads offered on its avail ring,
    /// then a notification of queue `notify` (any index, valid or not), and maybe a hinting run.
    type Step = (usize, Vec<(u16, u64, u32, u16, u16)>, Vec<u16>, usize, bool);

    fn step() -> impl Strategy<Value = Step> {
        (
            0usize..5,
            prop::collection::vec(raw_desc(), 0..8),
            prop::collection::vec(prop_oneof![3 => 0u16..32, 1 => any::<u16>()], 0..4),
            0usize..8,
            prop::bool::weighted(0.1),
        )
    }

    /// Cases per run: 128 in the suite; `EBB_FUZZ_CASES=N` for a long run (docs/TESTING.md).
    fn cases() -> u32 {
        std::env::var("EBB_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(128)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Arbitrary descriptor tables and avail rings on every queue: no panic, every release
        /// inside guest RAM and page aligned (the recorder asserts it), no more chains returned
        /// than offered, and the books of held pages balance.
        #[test]
        fn arbitrary_tables_and_rings_on_every_queue(
            steps in prop::collection::vec(step(), 1..24),
            words in prop::collection::vec(prop_oneof![3 => 0u32..(RAM / PAGE_SIZE) as u32, 1 => any::<u32>()], 4096),
        ) {
            let mem = mem();
            // The buffer area holds frame numbers, most of them inside guest RAM, and command
            // ids (2, the first run's, among them).
            put_pfns(&mem, BUF, &words);
            mem.write_slice(&2u32.to_le_bytes(), GuestAddress(BUF)).unwrap();
            let config = BalloonConfig { hinting: true, ..all_features() };
            let acked = (1 << F_STATS_VQ) | (1 << F_DEFLATE_ON_OOM) | (1 << F_REPORTING)
                | (1 << F_FREE_PAGE_HINT);
            let mut r = rig(&mem, config, acked, false);
            let mut offered = [0u64; 5];
            for (q, descs, heads, notify, hint) in &steps {
                let m = &r.queues[*q].mock;
                for &(idx, addr, len, flags, next) in descs {
                    // An index past the table is refused by the mock, as the ring would be.
                    let _ = m.desc_table().store(
                        idx,
                        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
                    );
                }
                for &head in heads {
                    let avail = m.avail();
                    let i = avail.idx().load();
                    avail.ring().ref_at(usize::from(i) % usize::from(QUEUE_SIZE)).unwrap().store(head);
                    avail.idx().store(i.wrapping_add(1));
                    offered[*q] += 1;
                }
                if *hint {
                    let _ = r.balloon.start_hinting(true);
                }
                r.balloon.queue_notify(*notify);
            }
            let s = r.balloon.stats();
            prop_assert_eq!(r.balloon.held_pages(), s.pages_inflated - s.pages_deflated);
            for (q, dq) in r.queues.iter().enumerate() {
                let used = u64::from(dq.mock.used().idx().load());
                prop_assert!(used <= offered[q], "queue {}: {} used of {} offered", q, used, offered[q]);
            }
            for &(gpa, len) in r.backend.calls.lock().unwrap().iter() {
                prop_assert!(gpa + len <= RAM);
            }
        }
    }
}
