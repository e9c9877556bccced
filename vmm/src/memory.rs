//! Guest RAM: one guest-mm region, seen by KVM as a memslot and by devices and loaders through
//! vm-memory.
//!
//! Tracked or not, guest RAM is a guest-mm region: this module only chooses its spec (backing,
//! release mode, fault path or none) and wraps guest-mm's mapping for vm-memory. Every host
//! memory call (mmap, madvise, mincore, fallocate) is guest-mm's. The mapping lives as long as
//! [`VmMemory`], which the VMM keeps until the process exits, so every `GuestMemoryMmap` clone
//! handed to a device stays valid.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use guest_mm::Strategy;

use crate::config::{ReclaimStrategy, ReleaseChoice};
use guest_mm::backing::ReleaseMode;
use guest_mm::manager::{BackingSpec, FaultConfig, FillMode, GuestMm, ManagerError, RegionSpec};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Why guest RAM could not be set up, released or inspected.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// vm-memory refused the mapping.
    #[error("cannot describe guest RAM to vm-memory: {0}")]
    Region(String),
    /// guest-mm refused a request or failed: setting up the region or its fault path,
    /// releasing host memory, reading residency.
    #[error("guest-mm failed on guest RAM")]
    Manager(#[source] ManagerError),
    /// guest-mm's tables refused a sweep.
    #[error("guest-mm's tables refused the sweep")]
    Tables(#[source] guest_mm::tables::TableError),
    /// A discard range is unaligned, empty or outside guest RAM.
    #[error("range {gpa:#x}+{len:#x} is not an aligned range inside guest RAM")]
    BadRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// The host mapping that backs guest RAM at guest-physical address 0.
pub struct GuestRam {
    host: NonNull<u8>,
    size: usize,
    mem: GuestMemoryMmap,
}

// SAFETY: `host` points to guest-mm's mapping, which outlives every user of the `GuestRam` (see
// `VmMemory`); the pointer itself is only read, and all accesses to the memory go through
// vm-memory's volatile accessors or KVM.
unsafe impl Send for GuestRam {}
// SAFETY: as for `Send`: no interior state is mutated through `&GuestRam`.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Wraps an existing mapping of `size` bytes at `host`, made with mmap `flags`, as guest
    /// RAM at address 0.
    ///
    /// # Safety
    /// `host..host+size` must be a readable and writable mapping that stays mapped as long as
    /// the returned value and every clone of its [`memory`](Self::memory) are used.
    pub unsafe fn from_raw(
        host: NonNull<u8>,
        size: usize,
        flags: libc::c_int,
    ) -> Result<Self, MemoryError> {
        // SAFETY: the caller guarantees the range is a live mapping for the process lifetime.
        let region = unsafe {
            MmapRegion::build_raw(
                host.as_ptr(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
            )
        }
        .map_err(|e| MemoryError::Region(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| MemoryError::Region("region end overflows".to_owned()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        Ok(GuestRam { host, size, mem })
    }

    /// The vm-memory view used by loaders and devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Host address of guest-physical 0 (for the KVM memslot).
    pub fn host_addr(&self) -> u64 {
        self.host.as_ptr() as u64
    }

    /// Size of guest RAM in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Bytes of guest RAM the host maps with 2 MiB page-table entries (PMDs), from
    /// /proc/self/smaps (`AnonHugePages` + `ShmemPmdMapped` + `FilePmdMapped` of every mapping
    /// inside guest RAM); `None` if smaps cannot be read.
    pub fn host_huge_bytes(&self) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let (lo, hi) = (self.host_addr(), self.host_addr() + self.size as u64);
        let mut inside = false;
        let mut kb = 0u64;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                inside = a >= lo && b <= hi;
                continue;
            }
            if !inside {
                continue;
            }
            for key in ["AnonHugePages:", "ShmemPmdMapped:", "FilePmdMapped:"] {
                if let Some(v) = line.strip_prefix(key) {
                    kb += v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
                }
            }
        }
        Some(kb * 1024)
    }
}

/// Guest RAM: guest-mm's region (with its userfaultfd fault path when tracking) and its
/// vm-memory view.
pub struct VmMemory {
    // Dropped first: the view goes before guest-mm unmaps the memory.
    ram: GuestRam,
    mm: GuestMm,
    /// 2 MiB blocks that give-backs emptied (guest-mm's `blocks_released`: tracked, blocks whose
    /// PT table it freed; untracked, whole blocks released), and KVM's table zaps (see
    /// [`VmMemory::kvm_zap_due`]).
    zap: ZapCounters,
    /// How long the balloon's give-back of a 2 MiB block it holds only in part may wait for
    /// the rest of the block (`None`: released at once); see [`discard_held`](Self::discard_held).
    partial_release: Option<std::time::Duration>,
    /// Since when give-backs have been waiting (the last deferred one), if any.
    pending_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// The reclaim strategy and release mode in force.
    policy: crate::report::Policy,
}

/// What the KVM table-zap policy counts.
#[derive(Debug, Default)]
struct ZapCounters {
    blocks_emptied: AtomicU64,
    blocks_at_last_zap: AtomicU64,
    zaps: AtomicU64,
    zap_ns_total: AtomicU64,
    zap_ns_max: AtomicU64,
}

impl VmMemory {
    /// Sets up guest RAM for `config`: a guest-mm region, with fault handlers when tracking.
    ///
    /// Tracked RAM with huge pages allowed (the default) is a memfd that guest-mm fills a whole
    /// 2 MiB block at a time (one 2 MiB leaf per block, one host PMD where the host gives shmem
    /// huge pages), released with `fallocate(PUNCH_HOLE)`. With `--no-thp` it is anonymous
    /// memory in 4 KiB pages, released with `MADV_DONTNEED`. Untracked RAM (`--no-track`) is
    /// anonymous memory without a fault path (`MADV_HUGEPAGE`, or `MADV_NOHUGEPAGE` with
    /// `--no-thp`), released with `MADV_DONTNEED`.
    pub fn new(config: &crate::config::VmConfig) -> Result<Self, MemoryError> {
        let backing = if !config.memory.track {
            BackingSpec::Anonymous {
                thp: config.memory.thp,
            }
        } else if config.memory.memfd() {
            if !guest_mm::backing::shmem_huge_pages_available() {
                log::warn!(
                    "this host gives shared memory no 2 MiB pages \
                     (/sys/kernel/mm/transparent_hugepage/shmem_enabled): guest RAM is filled \
                     2 MiB at a time but mapped with 4 KiB host pages; \
                     `echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled` fixes that"
                );
            }
            BackingSpec::Memfd {
                name: "ebb-guest-ram".to_owned(),
                huge: true,
            }
        } else {
            BackingSpec::Anonymous { thp: false }
        };
        let spec = RegionSpec {
            gpa: 0,
            len: config.memory_bytes(),
            backing,
        };
        let memfd = matches!(spec.backing, BackingSpec::Memfd { .. });
        let faults = FaultConfig {
            // 0: no userfaultfd, no leaves; the region is mapped, released and read for
            // residency all the same.
            handler_threads: if config.memory.track {
                config.memory.fault_threads
            } else {
                0
            },
            fault_around_pages: config.memory.fault_around,
            fill: FillMode::default(),
            thread_start: Some(crate::seccomp::install_fault_handler),
        };
        // The configuration chose both (VmConfig::validate checked the mode against the
        // backing).
        let release = match config.memory.release {
            ReleaseChoice::Dontneed => ReleaseMode::DontNeed,
            ReleaseChoice::Free => ReleaseMode::Free,
            ReleaseChoice::PunchHole => ReleaseMode::PunchHole,
            ReleaseChoice::Remove => ReleaseMode::Remove,
        };
        let strategy = match config.memory.strategy {
            ReclaimStrategy::Off => Strategy::Off,
            ReclaimStrategy::Scan => Strategy::Scan,
            ReclaimStrategy::Count => Strategy::Count,
        };
        let mm = GuestMm::new(&[spec], strategy, release, faults).map_err(MemoryError::Manager)?;
        let region = mm
            .regions()
            .first()
            .copied()
            .ok_or_else(|| MemoryError::Region("guest-mm returned no region".to_owned()))?;
        let host = NonNull::new(region.host_addr as *mut u8)
            .ok_or_else(|| MemoryError::Region("guest-mm region at address 0".to_owned()))?;
        let len = usize::try_from(region.len)
            .map_err(|_| MemoryError::Region("region too large".to_owned()))?;
        let flags = if memfd {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
        };
        // SAFETY: the region is guest-mm's mapping, which lives as long as `mm`; `mm` is
        // kept in the returned value, which the VMM holds until the process exits. `flags`
        // are those guest-mm mapped it with.
        let ram = unsafe { GuestRam::from_raw(host, len, flags)? };
        let partial_release = config.balloon.as_ref().map_or(0, |b| b.partial_release_ms);
        Ok(VmMemory {
            ram,
            mm,
            zap: ZapCounters::default(),
            partial_release: (partial_release > 0)
                .then(|| std::time::Duration::from_millis(partial_release)),
            pending_since: std::sync::Mutex::new(None),
            policy: crate::report::Policy {
                strategy: config.memory.strategy,
                release: config.memory.release,
            },
        })
    }

    /// Host address of guest-physical 0.
    pub fn host_addr(&self) -> u64 {
        self.ram.host_addr()
    }

    /// Guest RAM size in bytes.
    pub fn size(&self) -> usize {
        self.ram.size()
    }

    /// The vm-memory view.
    pub fn vm_memory(&self) -> &GuestMemoryMmap {
        self.ram.memory()
    }

    /// guest-mm, which holds guest RAM.
    pub fn guest_mm(&self) -> &GuestMm {
        &self.mm
    }

    /// Whether guest-mm's fault path tracks every page (`--no-track` turns it off).
    pub fn tracked(&self) -> bool {
        self.mm.tracks_faults()
    }

    /// Gives the host memory behind guest-physical `gpa..gpa+len` back (the balloon's path)
    /// through guest-mm (when tracking, leaves and empty tables go too). Returns the bytes
    /// released. The range must be 4 KiB aligned and inside guest RAM; anything else is refused
    /// and nothing changes.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<u64, MemoryError> {
        self.discard_many(&[(gpa, len)])
    }

    /// Counts the blocks a give-back emptied; returns its bytes released.
    fn count(&self, summary: &guest_mm::manager::DiscardSummary) -> u64 {
        self.zap
            .blocks_emptied
            .fetch_add(summary.blocks_released, Ordering::Relaxed);
        summary.host_bytes_released
    }

    /// Whether give-backs emptied at least `after` 2 MiB blocks since KVM last dropped its
    /// nested tables (0: never). The caller then zaps (`kvm::Vm::zap_nested_tables`) and
    /// records it with [`record_kvm_zap`](Self::record_kvm_zap).
    pub fn kvm_zap_due(&self, after: u64) -> bool {
        after > 0
            && self.zap.blocks_emptied.load(Ordering::Relaxed)
                - self.zap.blocks_at_last_zap.load(Ordering::Relaxed)
                >= after
    }

    /// Records a zap of KVM's nested tables that took `took`.
    pub fn record_kvm_zap(&self, took: std::time::Duration) {
        let z = &self.zap;
        z.blocks_at_last_zap
            .store(z.blocks_emptied.load(Ordering::Relaxed), Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        z.zaps.fetch_add(1, Ordering::Relaxed);
        z.zap_ns_total.fetch_add(ns, Ordering::Relaxed);
        z.zap_ns_max.fetch_max(ns, Ordering::Relaxed);
    }

    /// Gives back many ranges in one call (a balloon chain's runs): every range is checked
    /// first, and if any is bad nothing is released. guest-mm merges the host releases (one
    /// syscall per merged run instead of one per range); with tracking it also clears all
    /// their leaves and frees emptied tables in one pass. Returns the bytes released.
    pub fn discard_many(&self, ranges: &[(u64, u64)]) -> Result<u64, MemoryError> {
        let ranges = self.checked_ranges(ranges)?;
        let summary = self
            .mm
            .discard_many(&ranges)
            .map_err(MemoryError::Manager)?;
        Ok(self.count(&summary))
    }

    /// The balloon's inflate: marks the ranges as held by the guest (see `GuestMm::hold`), then
    /// discards them like [`discard_many`](Self::discard_many). Tracked, no block fill or
    /// fault-around window brings them back; untracked, a 2 MiB block whose pages are then all
    /// held is released whole, so the host frees its page-table page. Returns the bytes
    /// released.
    ///
    /// With a partial-release delay (the balloon's `partial_release_ms`, the default), every
    /// 2 MiB block whose pages the balloon now all holds is released whole at once, and the
    /// pages of blocks it holds only in part wait, held and still backed, until their block is
    /// whole or until no give-back came for that delay ([`release_pending_if_due`]
    /// (Self::release_pending_if_due), from the event loop): a release of part of a block splits
    /// the host's 2 MiB page and KVM's 2 MiB entry, and every later guest access to the rest
    /// of the block becomes a 4 KiB nested fault (guest-mm's `give_back_held`).
    pub fn discard_held(&self, ranges: &[(u64, u64)]) -> Result<u64, MemoryError> {
        let granges = self.checked_ranges(ranges)?;
        let summary = self
            .mm
            .give_back_held(&granges, self.partial_release.is_some())
            .map_err(MemoryError::Manager)?;
        if self.partial_release.is_some() {
            *self.pending_since.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(std::time::Instant::now());
        }
        Ok(self.count(&summary))
    }

    /// Releases the balloon's pending pages (see [`discard_held`](Self::discard_held)) once no
    /// give-back has come for the partial-release delay; returns the bytes released. Called
    /// between event dispatches, so never inside a queue chain.
    pub fn release_pending_if_due(&self) -> Result<u64, MemoryError> {
        let Some(delay) = self.partial_release else {
            return Ok(0);
        };
        let mut since = self.pending_since.lock().unwrap_or_else(|e| e.into_inner());
        if !since.is_some_and(|t| t.elapsed() >= delay) {
            return Ok(0);
        }
        *since = None;
        let summary = self.mm.release_pending().map_err(MemoryError::Manager)?;
        Ok(self.count(&summary))
    }

    /// Pages the balloon holds that are not released yet (see [`discard_held`](Self::discard_held)).
    pub fn pending_pages(&self) -> u64 {
        self.mm.pending_pages()
    }

    /// The balloon's deflate: the guest takes the ranges back (pending pages among them are
    /// never released); faults in their blocks may fill more than the faulting page again once
    /// nothing in the block is held. Nothing else happens now (the pages come back when the
    /// guest touches them).
    pub fn unhold(&self, ranges: &[(u64, u64)]) -> Result<(), MemoryError> {
        let granges = self.checked_ranges(ranges)?;
        self.mm.hold(&granges, false).map_err(MemoryError::Manager)
    }

    /// Pages the balloon holds, as guest-mm counts them (tracked or not).
    pub fn held_pages(&self) -> u64 {
        self.mm.held_pages()
    }

    /// Refuses a range that is empty, not 4 KiB aligned or not inside guest RAM.
    fn check_range(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let end = gpa
            .checked_add(len)
            .filter(|e| *e <= self.ram.size() as u64);
        if len == 0 || !gpa.is_multiple_of(4096) || !len.is_multiple_of(4096) || end.is_none() {
            return Err(MemoryError::BadRange { gpa, len });
        }
        Ok(())
    }

    /// Every range checked (the first bad one refuses all), as guest-mm ranges.
    fn checked_ranges(
        &self,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<guest_mm::GpaRange>, MemoryError> {
        ranges
            .iter()
            .map(|&(gpa, len)| {
                self.check_range(gpa, len)?;
                guest_mm::manager::gpa_range(gpa, len).map_err(MemoryError::Manager)
            })
            .collect()
    }

    /// The explicit sweep (`PUT /memory/reclaim`): frees every empty table of guest-mm's over
    /// all of guest RAM, whatever the reclaim strategy; returns the tables freed per level
    /// (PT, PD, PDPT, PML4) and the 2 MiB blocks whose PT table went. Under the default
    /// strategy (a count per table) give-backs free emptied tables at once, so nothing is left.
    pub fn reclaim(&self) -> Result<([u64; 4], u64), MemoryError> {
        let mut freed = [0u64; 4];
        let mut blocks = 0u64;
        for r in self.mm.regions() {
            let range = guest_mm::manager::gpa_range(r.gpa, r.len).map_err(MemoryError::Manager)?;
            let done = self
                .mm
                .tables()
                .reclaim(range)
                .map_err(MemoryError::Tables)?;
            for (f, n) in freed.iter_mut().zip(done.tables_freed) {
                *f += n;
            }
            blocks += done.emptied_blocks.len() as u64;
        }
        Ok((freed, blocks))
    }

    /// Current memory figures; `exact` also walks the tables for the minimum (slower).
    pub fn report(&self) -> Result<crate::report::MemoryReport, MemoryError> {
        let mm = &self.mm;
        let tracked = mm.tracks_faults().then(|| {
            // Let in-flight faults finish so the figures are consistent.
            mm.settle_faults(std::time::Duration::from_millis(200));
            let st = mm.stats();
            crate::report::TrackStats {
                leaves_4k: st.tables.leaves_4k,
                leaves_2m: st.tables.leaves_2m,
                tables: st.tables.tables,
                table_bytes: st.tables.table_bytes,
                min_table_bytes: mm.tables().min_table_bytes(),
                faults: st.faults_resolved,
                held_pages: mm.held_pages(),
                pages_kept: st.pages_kept,
                promotions: st.promotions,
                promote_ns: st.promote_ns,
                faults_deferred: st.handlers.deferred,
                faults_failed: st.handlers.failed,
            }
        });
        let (host_pte_bytes, kvm_table_bytes) = crate::report::host_table_bytes();
        Ok(crate::report::MemoryReport {
            guest_bytes: self.ram.size() as u64,
            policy: self.policy,
            resident_pages: mm.resident_pages().map_err(MemoryError::Manager)?,
            host_huge_bytes: self.ram.host_huge_bytes(),
            host_pte_bytes,
            kvm_table_bytes,
            kvm_zaps: crate::report::KvmZaps {
                zaps: self.zap.zaps.load(Ordering::Relaxed),
                ns_total: self.zap.zap_ns_total.load(Ordering::Relaxed),
                ns_max: self.zap.zap_ns_max.load(Ordering::Relaxed),
                blocks_emptied: self.zap.blocks_emptied.load(Ordering::Relaxed),
            },
            balloon_pending_pages: mm.pending_pages(),
            tracked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn untracked_ram_is_usable_and_residency_counts() {
        let m = untracked(64);
        assert!(!m.tracked());
        assert_eq!(m.size(), 64 << 20);
        assert_eq!(m.host_addr() % (2 << 20), 0, "guest-mm maps 2 MiB aligned");
        assert_eq!(m.report().unwrap().resident_pages, 0);
        for page in 0..10u64 {
            m.vm_memory()
                .write_obj(0xabu8, GuestAddress(page * 4096))
                .unwrap();
        }
        let r = m.report().unwrap();
        assert_eq!(r.resident_pages, 10);
        assert!(
            r.tracked.is_none(),
            "no tracking figures without the fault path"
        );
        assert!(
            m.vm_memory()
                .write_obj(1u8, GuestAddress(64 << 20))
                .is_err()
        );
    }

    /// Untracked guest RAM (`--no-track --no-thp`): guest-mm's region without a fault path.
    fn untracked(mib: u64) -> VmMemory {
        memory_with(mib, |f| {
            f.memory.track = Some(false);
            f.memory.thp = Some(false);
        })
    }

    /// Guest RAM of `mib` MiB as `set` configures it (the rest at its defaults).
    fn memory_with(mib: u64, set: impl FnOnce(&mut crate::config::ConfigFile)) -> VmMemory {
        let mut file = crate::config::ConfigFile::default();
        file.boot.kernel = Some(std::env::current_exe().unwrap());
        file.machine.memory_mib = Some(mib);
        set(&mut file);
        let config = crate::config::VmConfig::validate(file).unwrap();
        VmMemory::new(&config).expect("guest-mm with userfaultfd (needs root)")
    }

    fn resident(m: &VmMemory) -> u64 {
        m.report().unwrap().resident_pages
    }

    #[test]
    fn untracked_balloon_blocks_are_released_whole() {
        let m = untracked(64);
        // Blocks 1 and 2 written whole, page by page.
        for page in 512..3 * 512u64 {
            m.vm_memory()
                .write_obj(3u8, GuestAddress(page * 4096))
                .unwrap();
        }
        assert_eq!(resident(&m), 2 * 512);
        // The balloon takes block 1 in 4 KiB pieces, odd pages first, one chain each: the
        // first chain empties no block, the second completes the block's hold and releases it
        // whole (one call over the block: its bytes are what that chain released).
        for (parity, released) in [(1, 256 * 4096), (0, 2 << 20)] {
            let pieces: Vec<(u64, u64)> = (0..512u64)
                .filter(|p| p % 2 == parity)
                .map(|p| ((2 << 20) + p * 4096, 4096))
                .collect();
            assert_eq!(m.discard_held(&pieces).unwrap(), released);
            assert_eq!(
                m.kvm_zap_due(1),
                parity == 0,
                "a block counts once all its pages are held"
            );
        }
        assert!(!m.kvm_zap_due(2));
        assert_eq!(m.held_pages(), 512);
        assert_eq!(resident(&m), 512);
        // Block 2 given back in 4 KiB pieces without holding them (free page reporting): its
        // pages go, but no block counts (nothing says the guest will not touch the rest).
        let pieces: Vec<(u64, u64)> = (0..512u64)
            .map(|p| ((4 << 20) + p * 4096, 4096))
            .filter(|&(gpa, _)| gpa % 8192 == 0)
            .collect();
        m.discard_many(&pieces).unwrap();
        assert_eq!(resident(&m), 256);
        assert!(!m.kvm_zap_due(2));
        // A refused inflate holds nothing.
        assert!(matches!(
            m.discard_held(&[(0, 4096), (64 << 20, 4096)]),
            Err(MemoryError::BadRange { .. })
        ));
        assert_eq!(m.held_pages(), 512);
        // Deflate: the guest takes block 1 back and reads zeros.
        m.unhold(&[(2 << 20, 2 << 20)]).unwrap();
        assert_eq!(m.held_pages(), 0);
        let v: u8 = m.vm_memory().read_obj(GuestAddress(3 << 20)).unwrap();
        assert_eq!(v, 0);
        assert_eq!(m.report().unwrap().kvm_zaps.blocks_emptied, 1);
    }

    #[test]
    fn discard_checks_the_range_and_releases() {
        let m = untracked(64);
        for page in 0..8u64 {
            m.vm_memory()
                .write_obj(7u8, GuestAddress(page * 4096))
                .unwrap();
        }
        assert_eq!(resident(&m), 8);
        for (gpa, len) in [
            (1, 4096),
            (0, 100),
            (0, 0),
            (64 << 20, 4096),
            (u64::MAX - 4095, 4096),
        ] {
            assert!(matches!(
                m.discard(gpa, len),
                Err(MemoryError::BadRange { .. })
            ));
        }
        assert_eq!(m.discard(0, 4 * 4096).unwrap(), 4 * 4096);
        assert_eq!(resident(&m), 4);
        let v: u8 = m.vm_memory().read_obj(GuestAddress(0)).unwrap();
        assert_eq!(v, 0);
    }

    #[test]
    fn emptied_blocks_make_a_kvm_table_zap_due() {
        for m in [untracked(64), tracked(64, false), tracked(64, true)] {
            for page in 0..(8 << 20) / 4096 {
                m.vm_memory()
                    .write_obj(1u8, GuestAddress(page * 4096))
                    .unwrap();
            }
            assert!(!m.kvm_zap_due(1), "nothing given back yet");
            // Scattered pages empty no block; the whole range then empties four.
            m.discard_many(&[(4096, 4096), (3 << 20, 8192)]).unwrap();
            assert!(!m.kvm_zap_due(1));
            m.discard_many(&[(0, 8 << 20)]).unwrap();
            assert!(m.kvm_zap_due(4) && !m.kvm_zap_due(5) && !m.kvm_zap_due(0));
            m.record_kvm_zap(std::time::Duration::from_millis(3));
            assert!(!m.kvm_zap_due(1), "counted from the last zap");
            let z = m.report().unwrap().kvm_zaps;
            assert_eq!((z.zaps, z.blocks_emptied, z.ns_max), (1, 4, 3_000_000));
        }
    }

    fn tracked(mib: u64, thp: bool) -> VmMemory {
        memory_with(mib, |f| {
            f.memory.thp = Some(thp);
            // One block (or page) per fault, so the tests can count.
            f.memory.fault_around = Some(1);
        })
    }

    #[test]
    fn partly_held_blocks_are_released_after_the_delay() {
        for track in [true, false] {
            let m = memory_with(64, |f| {
                f.memory.track = Some(track);
                f.balloon = Some(crate::config::BalloonFile {
                    partial_release_ms: Some(30),
                    ..Default::default()
                });
            });
            for page in 0..(4 << 20) / 4096 {
                m.vm_memory()
                    .write_obj(1u8, GuestAddress(page * 4096))
                    .unwrap();
            }
            let before = m.report().unwrap().resident_pages;
            // Ten pages of block 0 wait; the whole of block 1 goes at once.
            assert_eq!(m.discard_held(&[(0, 10 * 4096)]).unwrap(), 0);
            assert_eq!(m.discard_held(&[(2 << 20, 2 << 20)]).unwrap(), 2 << 20);
            let r = m.report().unwrap();
            assert_eq!(
                (r.resident_pages, r.balloon_pending_pages),
                (before - 512, 10)
            );
            assert_eq!(m.held_pages(), 522);
            assert_eq!(m.release_pending_if_due().unwrap(), 0, "not yet");
            std::thread::sleep(std::time::Duration::from_millis(40));
            assert_eq!(m.release_pending_if_due().unwrap(), 10 * 4096);
            let r = m.report().unwrap();
            assert_eq!(
                (r.resident_pages, r.balloon_pending_pages),
                (before - 522, 0)
            );
            assert_eq!(m.held_pages(), 522, "released pages stay held");
            assert_eq!(m.release_pending_if_due().unwrap(), 0, "once");
        }
    }

    #[test]
    fn tracked_memory_records_touched_pages_and_discard_clears_them() {
        let m = tracked(64, false);
        for page in [0u64, 1, 2, 600, 16_000] {
            m.vm_memory()
                .write_obj(0x5au8, GuestAddress(page * 4096))
                .unwrap();
        }
        let r = m.report().unwrap();
        let t = r.tracked.expect("tracking is on");
        assert_eq!(t.leaves_4k, 5);
        assert_eq!(r.resident_pages, 5);
        assert_eq!(t.table_bytes, t.min_table_bytes);
        assert!(t.faults >= 5);
        m.discard(600 * 4096, 4096).unwrap();
        let t = m.report().unwrap().tracked.unwrap();
        assert_eq!(t.leaves_4k, 4);
        let v: u8 = m.vm_memory().read_obj(GuestAddress(600 * 4096)).unwrap();
        assert_eq!(v, 0, "a discarded page reads back as zero");
    }

    #[test]
    fn discard_many_checks_every_range_first() {
        for thp in [false, true] {
            let m = tracked(64, thp);
            for page in 0..16u64 {
                m.vm_memory()
                    .write_obj(9u8, GuestAddress(page * 4096))
                    .unwrap();
            }
            let before = m.report().unwrap().resident_pages;
            assert!(matches!(
                m.discard_many(&[(0, 4096), (64 << 20, 4096)]),
                Err(MemoryError::BadRange { .. })
            ));
            assert_eq!(
                m.report().unwrap().resident_pages,
                before,
                "nothing released"
            );
            m.discard_many(&[(4096, 4096), (3 * 4096, 2 * 4096)])
                .unwrap();
            let r = m.report().unwrap();
            assert_eq!(r.resident_pages, before - 3);
            assert_eq!(r.leaf_pages(), Some(r.resident_pages));
            let v: u8 = m.vm_memory().read_obj(GuestAddress(4 * 4096)).unwrap();
            assert_eq!(v, 0);
            let v: u8 = m.vm_memory().read_obj(GuestAddress(2 * 4096)).unwrap();
            assert_eq!(v, 9);
        }
    }

    #[test]
    fn ballooned_pages_stay_out_until_deflated() {
        // The default window: 8 blocks per fault.
        let m = memory_with(64, |_| {});
        m.vm_memory().write_obj(1u8, GuestAddress(0)).unwrap();
        assert_eq!(m.report().unwrap().resident_pages, 8 * 512);
        // The balloon takes all of block 1, then gives back 4 pages, and the guest touches one.
        m.discard_held(&[(2 << 20, 2 << 20)]).unwrap();
        assert_eq!(m.held_pages(), 512);
        m.unhold(&[(2 << 20, 4 * 4096)]).unwrap();
        m.vm_memory().write_obj(2u8, GuestAddress(2 << 20)).unwrap();
        let r = m.report().unwrap();
        assert_eq!(
            r.resident_pages,
            7 * 512 + 1,
            "one page back, not the block"
        );
        assert_eq!(r.leaf_pages(), Some(r.resident_pages));
        assert!(matches!(
            m.discard_held(&[(64 << 20, 4096)]),
            Err(MemoryError::BadRange { .. })
        ));
        assert_eq!(m.held_pages(), 508);
    }

    #[test]
    fn tracked_memory_with_huge_pages_fills_whole_blocks() {
        let m = tracked(64, true);
        // Pages in blocks 0, 1 and 31.
        for page in [0u64, 1, 2, 600, 16_000] {
            m.vm_memory()
                .write_obj(0x5au8, GuestAddress(page * 4096))
                .unwrap();
        }
        let r = m.report().unwrap();
        let t = r.tracked.expect("tracking is on");
        assert_eq!((t.leaves_2m, t.leaves_4k), (3, 0));
        assert_eq!(r.resident_pages, 3 * 512);
        assert_eq!(r.leaf_pages(), Some(r.resident_pages));
        assert_eq!(t.table_bytes, t.min_table_bytes);
        assert_eq!(t.faults, 3, "one fault per block");
        // A balloon-sized discard splits block 1's leaf and gives back just that page.
        assert_eq!(m.discard(600 * 4096, 4096).unwrap(), 4096);
        let r = m.report().unwrap();
        let t = r.tracked.unwrap();
        assert_eq!((t.leaves_2m, t.leaves_4k), (2, 511));
        assert_eq!(r.resident_pages, 3 * 512 - 1);
        assert_eq!(t.table_bytes, t.min_table_bytes);
        let v: u8 = m.vm_memory().read_obj(GuestAddress(600 * 4096)).unwrap();
        assert_eq!(v, 0, "a discarded page reads back as zero");
        let v: u8 = m.vm_memory().read_obj(GuestAddress(16_000 * 4096)).unwrap();
        assert_eq!(v, 0x5a);
        assert!(m.report().unwrap().host_huge_bytes.is_some());
    }

    #[test]
    fn the_strategy_and_release_mode_in_force_are_guest_mms_and_reported() {
        use crate::config::{ReclaimStrategy, ReleaseChoice};
        for (thp, strategy, release) in [
            (false, ReclaimStrategy::Scan, ReleaseChoice::Free),
            (false, ReclaimStrategy::Off, ReleaseChoice::Dontneed),
            (true, ReclaimStrategy::Count, ReleaseChoice::Remove),
        ] {
            let m = memory_with(64, |f| {
                f.memory.thp = Some(thp);
                f.memory.strategy = Some(strategy);
                f.memory.release = Some(release);
            });
            m.vm_memory().write_obj(7u8, GuestAddress(0)).unwrap();
            m.discard(0, 2 << 20).unwrap();
            let r = m.report().unwrap();
            assert_eq!((r.policy.strategy, r.policy.release), (strategy, release));
            let text = r.render();
            assert!(text.contains("reclaim / release:"), "{text}");
        }
    }
}
