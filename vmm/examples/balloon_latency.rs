//! How long a balloon inflate chain holds the event loop: 256-page chains (what the Linux
//! driver sends) handed to the balloon device over tracked guest RAM, each released
//! synchronously through guest-mm (one batched release per chain). Contiguous frames (one range
//! per chain) against scattered ones (every other page: 256 ranges per chain). No KVM involved.
//! `cargo run --release -p vmm --example balloon_latency`

use std::sync::Arc;
use std::time::{Duration, Instant};

use balloon::{Notifier, NotifyKind};
use ebb::config::{BalloonSettings, BootFile, ConfigFile, MachineFile, MemoryFile, VmConfig};
use ebb::memory::VmMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: u64 = 4096;
const QSIZE: u16 = 256;
const DESC: u64 = 0x10_0000;
const AVAIL: u64 = 0x10_1000;
const USED: u64 = 0x10_2000;
const BUF: u64 = 0x20_0000;

struct Quiet;

impl Notifier for Quiet {
    fn notify(&self, _kind: NotifyKind) -> std::io::Result<()> {
        Ok(())
    }
}

/// Driver side of the inflate queue: one single-buffer chain per call.
struct Inflate {
    sent: u16,
}

impl Inflate {
    fn queue() -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn push(&mut self, gm: &GuestMemoryMmap, pfns: &[u64]) {
        let bytes: Vec<u8> = pfns
            .iter()
            .flat_map(|p| (*p as u32).to_le_bytes())
            .collect();
        let head = self.sent % QSIZE;
        let at = BUF + u64::from(head) * 1024;
        gm.write_slice(&bytes, GuestAddress(at)).unwrap();
        let d = DESC + 16 * u64::from(head);
        gm.write_obj(at.to_le(), GuestAddress(d)).unwrap();
        gm.write_obj((bytes.len() as u32).to_le(), GuestAddress(d + 8))
            .unwrap();
        gm.write_obj(0u32, GuestAddress(d + 12)).unwrap();
        gm.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * u64::from(head)))
            .unwrap();
        self.sent = self.sent.wrapping_add(1);
        gm.write_obj(self.sent.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }
}

fn run(label: &str, thp: Option<bool>, scattered: bool) {
    let file = ConfigFile {
        boot: BootFile {
            kernel: Some(std::env::current_exe().unwrap()),
            ..Default::default()
        },
        machine: MachineFile {
            memory_mib: Some(1024),
            ..Default::default()
        },
        memory: MemoryFile {
            thp,
            ..Default::default()
        },
        ..Default::default()
    };
    let memory = Arc::new(VmMemory::new(&VmConfig::validate(file).unwrap()).unwrap());
    let gm = memory.vm_memory().clone();
    let settings = BalloonSettings {
        deflate_on_oom: false,
        stats: false,
        stats_polling_interval_s: 0,
        reporting: false,
        // No balloon in the config: VmMemory releases every page at once, as this measures.
        partial_release_ms: 0,
        target_mib: 0,
        hinting: false,
    };
    let parts = ebb::devices::virtio::balloon::build(&memory, &settings).unwrap();
    let mut b = parts.shared.lock().unwrap();
    b.ack_features(0);
    b.activate(
        gm.clone(),
        vec![Inflate::queue(), Inflate::queue()],
        Arc::new(Quiet),
    )
    .unwrap();

    let first = 256 * 256u64; // 256 MiB
    let pages = 512 * 256u64; // 512 MiB touched, then all of it inflated
    for p in first..first + pages {
        gm.write_obj(1u8, GuestAddress(p * PAGE)).unwrap();
    }
    let before = memory.report().unwrap().tracked.unwrap();
    let order: Vec<u64> = if scattered {
        let even = (first..first + pages).step_by(2);
        let odd = (first + 1..first + pages).step_by(2);
        even.chain(odd).collect()
    } else {
        (first..first + pages).collect()
    };
    let mut drv = Inflate { sent: 0 };
    let mut times = Vec::new();
    for chunk in order.chunks(256) {
        drv.push(&gm, chunk);
        let t = Instant::now();
        b.queue_notify(0);
        times.push(t.elapsed());
    }
    let after = memory.report().unwrap().tracked.unwrap();
    let s = b.stats();
    assert_eq!(s.pages_inflated, pages);
    let total: Duration = times.iter().sum();
    let max = times.iter().max().copied().unwrap_or_default();
    let mean = total / times.len() as u32;
    println!(
        "{label}: {} chains of 256 pages, {} ranges in {} release calls; per chain mean {:.0} us, max {:.0} us; \
         {:.0} ns/page; leaves {} -> {} pages; table bytes {} -> {} (minimum {})",
        times.len(),
        s.inflate_ranges,
        s.release_calls,
        mean.as_secs_f64() * 1e6,
        max.as_secs_f64() * 1e6,
        total.as_secs_f64() * 1e9 / pages as f64,
        before.leaves_4k + 512 * before.leaves_2m,
        after.leaves_4k + 512 * after.leaves_2m,
        before.table_bytes,
        after.table_bytes,
        after.min_table_bytes,
    );
}

fn main() {
    run("4 KiB backing, contiguous", Some(false), false);
    run("4 KiB backing, scattered", Some(false), true);
    run("default backing, contiguous", None, false);
    run("default backing, scattered", None, true);
}
