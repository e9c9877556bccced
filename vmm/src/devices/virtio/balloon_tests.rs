//! The balloon behind the real virtio-mmio transport, over guest RAM tracked by guest-mm
//! (needs root for userfaultfd).

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
#[allow(unused_imports)]
use crate::config::{BalloonFile, BootFile, MachineFile, MemoryFile};
use crate::config::{ConfigFile, VmConfig};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::report::TrackStats;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const WRITE: u16 = 2;
const NEXT: u16 = 1;

fn tracked_memory(mib: u64, thp: Option<bool>) -> Arc<VmMemory> {
    let file = ConfigFile {
        boot: BootFile {
            kernel: Some(std::env::current_exe().unwrap()),
            ..Default::default()
        },
        machine: MachineFile {
            memory_mib: Some(mib),
            ..Default::default()
        },
        memory: MemoryFile {
            thp,
            ..Default::default()
        },
        ..Default::default()
    };
    let config = VmConfig::validate(file).unwrap();
    Arc::new(VmMemory::new(&config).expect("tracked guest RAM (userfaultfd needs root)"))
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Driver side of one queue.
struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next: u16,
}

impl DriverQueue<'_> {
    fn add(&mut self, bufs: &[(u64, u32, u16)]) {
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
    }

    fn used(&self) -> u16 {
        self.mock.used().idx().load()
    }
}

/// Negotiates every offered feature, sets up the queues and sets DRIVER_OK, as the Linux
/// driver does.
fn bring_up<'a>(t: &mut MmioTransport, gm: &'a GuestMemoryMmap) -> Vec<DriverQueue<'a>> {
    w32(t, 0x70, 1);
    w32(t, 0x70, 1 | 2);
    w32(t, 0x14, 0);
    let features = r32(t, 0x10);
    w32(t, 0x24, 0);
    w32(t, 0x20, features);
    w32(t, 0x24, 1);
    w32(t, 0x20, 1);
    w32(t, 0x70, 1 | 2 | 8);
    assert_eq!(r32(t, 0x70) & 8, 8, "FEATURES_OK accepted");
    let mut queues = Vec::new();
    for i in 0..4u32 {
        w32(t, 0x30, i);
        let max = r32(t, 0x34);
        if max == 0 {
            break;
        }
        let base = GuestAddress(0x10_0000 + u64::from(i) * 0x1_0000);
        let mock = MockSplitQueue::create(gm, base, max as u16);
        w32(t, 0x38, max);
        for (reg, addr) in [
            (0x80, mock.desc_table_addr()),
            (0x90, mock.avail_addr()),
            (0xa0, mock.used_addr()),
        ] {
            w32(t, reg, addr.0 as u32);
            w32(t, reg + 4, (addr.0 >> 32) as u32);
        }
        w32(t, 0x44, 1);
        queues.push(DriverQueue { mock, next: 0 });
    }
    w32(t, 0x70, 1 | 2 | 8 | 4);
    assert!(t.is_active(), "the balloon activated");
    queues
}

/// What the event loop does for a notify write: the ioeventfd fires, the loop calls in.
fn kick(t: &mut MmioTransport, q: u32) {
    w32(t, QUEUE_NOTIFY_OFFSET, q);
    assert_eq!(t.queue_events()[q as usize].read().unwrap(), 1);
    t.notify_queue(q as usize);
}

fn tracked(m: &VmMemory) -> TrackStats {
    m.report().unwrap().tracked.expect("tracking is on")
}

fn leaf_pages(t: &TrackStats) -> u64 {
    t.leaves_4k + 512 * t.leaves_2m
}

fn put_pfns(gm: &GuestMemoryMmap, at: u64, pfns: impl Iterator<Item = u64>) -> u32 {
    let bytes: Vec<u8> = pfns.flat_map(|p| (p as u32).to_le_bytes()).collect();
    gm.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

/// An answer with its body as a JSON value (null for 204).
struct Answer {
    status: u16,
    body: Value,
}

fn api(h: &mut dyn ApiHandler, method: &str, path: &str, body: &str) -> Answer {
    let r = h.handle(method, path, body.as_bytes());
    Answer {
        status: r.status,
        body: r.body.unwrap_or(Value::Null),
    }
}

/// The device's figures in `GET /memory`.
fn figures(h: &mut dyn ApiHandler) -> Value {
    let (key, v) = h.memory_figures().expect("the balloon adds its figures");
    assert_eq!(key, "balloon");
    v
}

const SETTINGS: BalloonSettings = BalloonSettings {
    deflate_on_oom: true,
    stats: true,
    stats_polling_interval_s: 0,
    reporting: true,
    // Every page at once, so each chain's release can be counted.
    partial_release_ms: 0,
    target_mib: 0,
    hinting: false,
};

#[test]
fn inflate_through_the_transport_releases_pages_and_their_tables() {
    let memory = tracked_memory(64, Some(false));
    let gm = memory.vm_memory().clone();
    let parts = build(&memory, &SETTINGS).unwrap();
    let mut api_handler = parts.api;
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(parts.device, gm.clone(), irq.try_clone().unwrap()).unwrap();
    assert_eq!(t.device_type(), 5);
    let mut qs = bring_up(&mut t, &gm);
    assert_eq!(qs.len(), 4, "inflate, deflate, stats, reporting");

    // The guest writes 64 contiguous pages at 16 MiB, three scattered ones, and a whole
    // 2 MiB block at 32 MiB it will report free.
    let run: Vec<u64> = (16 * MIB / PAGE..16 * MIB / PAGE + 64).collect();
    let scattered = [5000u64, 5002, 5004];
    for &p in run.iter().chain(&scattered) {
        gm.write_obj(0x5au8, GuestAddress(p * PAGE)).unwrap();
    }
    for off in (0..2 * MIB).step_by(PAGE as usize) {
        gm.write_obj(0x77u8, GuestAddress(32 * MIB + off)).unwrap();
    }
    let buf = 0x20_0000;
    let len = put_pfns(&gm, buf, run.iter().chain(&scattered).copied());
    // Adding the chain writes the descriptor table: count leaves after that.
    qs[0].add(&[(buf, len, 0)]);
    let before = tracked(&memory);
    kick(&mut t, 0);
    assert_eq!(qs[0].used(), 1, "the chain went back to the driver");
    assert_eq!(irq.read().unwrap(), 1, "and the driver was interrupted");
    assert_eq!(r32(&mut t, 0x60) & 1, 1);

    let after = tracked(&memory);
    assert_eq!(leaf_pages(&before) - leaf_pages(&after), 67);
    assert_eq!(after.table_bytes, after.min_table_bytes);
    for &p in run.iter().chain(&scattered) {
        let v: u8 = gm.read_obj(GuestAddress(p * PAGE)).unwrap();
        assert_eq!(v, 0, "page {p} reads back zero after inflation");
    }

    // Free page reporting of the 2 MiB block (Linux adds it device-writable).
    qs[3].add(&[(32 * MIB, (2 * MIB) as u32, WRITE)]);
    let before = tracked(&memory);
    kick(&mut t, 3);
    assert_eq!(qs[3].used(), 1);
    let after = tracked(&memory);
    assert_eq!(leaf_pages(&before) - leaf_pages(&after), 512);
    assert_eq!(after.table_bytes, after.min_table_bytes);

    // Deflate half of the run: counted, nothing to do host-side.
    let len = put_pfns(&gm, buf, run[..32].iter().copied());
    qs[1].add(&[(buf, len, 0)]);
    kick(&mut t, 1);
    assert_eq!(qs[1].used(), 1);

    let status = Answer {
        status: 200,
        body: figures(api_handler.as_mut()),
    };
    let c = &status.body["counters"];
    assert_eq!(c["pages_inflated"], 67);
    // guest-mm counts what the host freed, which may include whole 2 MiB blocks and
    // table pages around the ranges; never less than the pages themselves.
    assert!(c["bytes_released"].as_u64().unwrap() >= 67 * 4096);
    assert_eq!(c["inflate_ranges"], 4);
    // One discard_many per chain: inflate, reporting.
    assert_eq!(c["release_calls"], 2);
    assert_eq!(c["pages_deflated"], 32);
    assert_eq!(c["reports_handled"], 1);
    assert_eq!(c["bytes_reported"], 2 * MIB);
    assert_eq!(status.body["held_pages"], 35);
    assert_eq!(status.body["negotiated"]["reporting"], true);
    assert_eq!(status.body["active"], true);
}

#[test]
fn api_sets_the_target_and_reports_guest_stats() {
    let memory = tracked_memory(64, Some(false));
    let gm = memory.vm_memory().clone();
    let parts = build(&memory, &SETTINGS).unwrap();
    let mut h = parts.api;
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(parts.device, gm.clone(), irq.try_clone().unwrap()).unwrap();

    // Before the driver is up a target is refused (Firecracker's rule), and nothing changes.
    let r = api(h.as_mut(), "PATCH", "/balloon", r#"{"amount_mib": 8}"#);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.body["fault_message"],
        "Balloon update error: Balloon: Device not activated yet."
    );
    assert!(irq.read().is_err(), "no interrupt before DRIVER_OK");
    let mut qs = bring_up(&mut t, &gm);
    let mut cfg = [0u8; 4];
    t.read(0x100, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg), 0);

    let r = api(h.as_mut(), "PATCH", "/balloon", r#"{"amount_mib": 32}"#);
    assert_eq!(r.status, 204);
    assert_eq!(r.body, Value::Null);
    assert_eq!(r32(&mut t, 0x60) & 2, 2, "config-change interrupt");
    t.read(0x100, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg), 32 * 256);
    // The driver reports progress through `actual`.
    t.write(0x104, &(16u32 * 256).to_le_bytes());
    let s = api(h.as_mut(), "GET", "/balloon", "");
    assert_eq!(s.status, 200);
    assert_eq!(
        s.body,
        serde_json::json!({
            "amount_mib": 32,
            "deflate_on_oom": true,
            "stats_polling_interval_s": 0,
            "free_page_hinting": false,
            "free_page_reporting": true,
        })
    );
    let f = figures(h.as_mut());
    assert_eq!(
        (f["target_mib"].clone(), f["actual_mib"].clone()),
        (32.into(), 16.into())
    );

    for (body, why) in [
        (r#"{"amount_mib": 65}"#, "beyond guest RAM"),
        (r#"{"amount_mib": 4294967296}"#, "beyond u32"),
        (r#"{"amount_mib": -1}"#, "negative"),
        (r#"{"amount_mib": "lots"}"#, "not a number"),
        (
            r#"{"amount_mib": 1, "stats_polling_interval_s": 1}"#,
            "unknown field",
        ),
        (r#"{"target_mib": 1}"#, "ebb's old field"),
        ("{", "bad JSON"),
        ("", "empty"),
    ] {
        let r = api(h.as_mut(), "PATCH", "/balloon", body);
        assert_eq!(r.status, 400, "{why}: {:?}", r.body);
        assert!(r.body["fault_message"].is_string(), "{why}");
    }
    for (method, path, message) in [
        (
            "GET",
            "/balloon/nope",
            "Invalid request method and/or path: GET balloon.",
        ),
        (
            "DELETE",
            "/balloon",
            "Invalid request method and/or path: DELETE balloon.",
        ),
        (
            "PUT",
            "/balloon",
            "The requested operation is not supported after starting the microVM.",
        ),
        (
            "PATCH",
            "/balloon/hinting/start",
            "Balloon update error: Balloon: Attempting to use hinting when not enabled",
        ),
        (
            "GET",
            "/balloon/hinting/status",
            "Balloon update error: Balloon: Attempting to use hinting when not enabled",
        ),
    ] {
        let r = api(h.as_mut(), method, path, r#"{"amount_mib": 1}"#);
        assert_eq!(
            (r.status, r.body["fault_message"].as_str()),
            (400, Some(message)),
            "{method} {path}"
        );
    }
    t.read(0x100, &mut cfg);
    assert_eq!(
        u32::from_le_bytes(cfg),
        32 * 256,
        "refused requests change nothing"
    );

    // Statistics: the sizes only, then the driver's buffer (free memory 100 MiB, an unknown
    // tag, which Firecracker's names leave out).
    let r = api(h.as_mut(), "GET", "/balloon/statistics", "");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        serde_json::json!({"target_pages": 8192, "actual_pages": 4096, "target_mib": 32, "actual_mib": 16})
    );
    let mut b = Vec::new();
    for (tag, val) in [(4u16, 100 * MIB), (5, 64 * MIB), (10, 0), (77, 9)] {
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&val.to_le_bytes());
    }
    gm.write_slice(&b, GuestAddress(0x21_0000)).unwrap();
    qs[2].add(&[(0x21_0000, b.len() as u32, 0)]);
    kick(&mut t, 2);
    assert_eq!(qs[2].used(), 0, "held until a refresh is wanted");
    let r = api(h.as_mut(), "GET", "/balloon/statistics", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.body["free_memory"], 100 * MIB);
    assert_eq!(r.body["total_memory"], 64 * MIB);
    assert_eq!(r.body["oom_kill"], 0);
    assert_eq!(r.body.as_object().unwrap().len(), 7, "{:?}", r.body);
    assert_eq!(qs[2].used(), 1, "the buffer went back for fresh figures");
    assert!(figures(h.as_mut())["stats_age_ms"].as_u64().is_some());

    // The polling interval: the same value is a no-op; turning polling on once the device
    // runs is refused, as Firecracker refuses it.
    let r = api(
        h.as_mut(),
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 0}"#,
    );
    assert_eq!(r.status, 204);
    let r = api(
        h.as_mut(),
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 5}"#,
    );
    assert_eq!(
        (r.status, r.body["fault_message"].as_str()),
        (
            400,
            Some(
                "Balloon update error: Balloon: Statistics cannot be enabled/disabled after activation."
            )
        )
    );
    assert_eq!(figures(h.as_mut())["stats_polling_interval_s"], 0);
}

#[test]
fn a_running_pollers_interval_changes_and_stats_off_refuses_statistics() {
    let memory = tracked_memory(64, Some(false));
    let settings = BalloonSettings {
        stats_polling_interval_s: 3,
        ..SETTINGS
    };
    let parts = build(&memory, &settings).unwrap();
    let mut h = parts.api;
    let r = api(
        h.as_mut(),
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s": 7}"#,
    );
    assert_eq!(r.status, 204);
    assert_eq!(
        parts.polling_interval_s.load(Ordering::Relaxed),
        7,
        "the poller reads the new interval"
    );
    assert_eq!(
        api(h.as_mut(), "GET", "/balloon", "").body["stats_polling_interval_s"],
        7
    );
    for body in [
        r#"{"stats_polling_interval_s": 70000}"#,
        r#"{"interval": 1}"#,
    ] {
        assert_eq!(
            api(h.as_mut(), "PATCH", "/balloon/statistics", body).status,
            400
        );
    }

    let settings = BalloonSettings {
        stats: false,
        ..SETTINGS
    };
    let mut h = build(&memory, &settings).unwrap().api;
    let r = api(h.as_mut(), "GET", "/balloon/statistics", "");
    assert_eq!(
        (r.status, r.body["fault_message"].as_str()),
        (
            400,
            Some("Internal VMM error: Balloon: Received stats query when stats are disabled.")
        )
    );
}

#[test]
fn a_whole_block_inflated_with_the_default_backing_is_released() {
    // Whatever the default backing fills per fault (4 KiB or 2 MiB), inflating an aligned
    // 2 MiB block in two 256-page chains (as Linux sends them) releases all of it.
    let memory = tracked_memory(64, None);
    let gm = memory.vm_memory().clone();
    let parts = build(&memory, &SETTINGS).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(parts.device, gm.clone(), irq).unwrap();
    let mut qs = bring_up(&mut t, &gm);
    let first = 40 * MIB / PAGE;
    for p in first..first + 512 {
        gm.write_obj(1u8, GuestAddress(p * PAGE)).unwrap();
    }
    let len = put_pfns(&gm, 0x20_0000, first..first + 256);
    put_pfns(&gm, 0x20_0000 + 1024, first + 256..first + 512);
    qs[0].add(&[(0x20_0000, len, 0)]);
    qs[0].add(&[(0x20_0000 + 1024, len, 0)]);
    let before = tracked(&memory);
    kick(&mut t, 0);
    assert_eq!(qs[0].used(), 2);
    let after = tracked(&memory);
    assert_eq!(leaf_pages(&before) - leaf_pages(&after), 512);
    assert_eq!(after.table_bytes, after.min_table_bytes);
    let v: u8 = gm.read_obj(GuestAddress(first * PAGE)).unwrap();
    assert_eq!(v, 0);
}
