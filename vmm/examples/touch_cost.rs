//! Host-side cost of first touches on guest RAM through vm-memory, tracked (guest-mm, with
//! several fault-around windows) against plain anonymous memory. No KVM involved.
//! `cargo run --release -p vmm --example touch_cost`
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

fn main() {
    for (track, fa, thp) in [
        (false, 1, true),
        (false, 1, false),
        (true, 1, false),
        (true, 64, false),
        (true, 512, false),
    ] {
        let file = ebb::config::ConfigFile {
            boot: ebb::config::BootFile {
                kernel: Some(std::env::current_exe().unwrap()),
                ..Default::default()
            },
            machine: ebb::config::MachineFile {
                memory_mib: Some(256),
                ..Default::default()
            },
            memory: ebb::config::MemoryFile {
                track: Some(track),
                fault_around: Some(fa),
                thp: Some(thp),
                ..Default::default()
            },
            ..Default::default()
        };
        let config = ebb::config::VmConfig::validate(file).unwrap();
        let m = ebb::memory::VmMemory::new(&config).unwrap();
        let pages = 256 * 256u64;
        let t = Instant::now();
        for p in 0..pages {
            m.vm_memory()
                .write_obj(1u8, GuestAddress(p * 4096))
                .unwrap();
        }
        let ns = t.elapsed().as_nanos() as f64 / pages as f64;
        println!("track={track} thp={thp} fault_around={fa}: {ns:.0} ns/page");
    }
}
