//! Guest RAM: one host mapping, seen by KVM as a memslot and by devices and loaders through
//! vm-memory.
//!
//! This is the only module of `vmm` that maps memory. The mapping is created once and kept
//! until the process exits, so every `GuestMemoryMmap` clone handed to a device stays valid.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use guest_mm::Strategy;
use guest_mm::backing::ReleaseMode;
use guest_mm::manager::{BackingSpec, FaultConfig, FillMode, GuestMm, ManagerError, RegionSpec};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Why guest RAM could not be set up or inspected.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of the guest RAM failed.
    #[error("cannot map {bytes} bytes of guest RAM")]
    Map {
        /// Requested size.
        bytes: u64,
        /// The mmap error.
        #[source]
        source: std::io::Error,
    },
    /// vm-memory refused the mapping.
    #[error("cannot describe guest RAM to vm-memory: {0}")]
    Region(String),
    /// guest-mm refused the layout or could not start its fault path.
    #[error("guest-mm could not set up guest RAM")]
    Tracker(#[source] ManagerError),
    /// A discard range is unaligned, empty or outside guest RAM.
    #[error("range {gpa:#x}+{len:#x} is not an aligned range inside guest RAM")]
    BadRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// madvise failed.
    #[error("cannot release guest memory")]
    Discard(#[source] std::io::Error),
    /// mincore failed.
    #[error("cannot query residency of guest RAM")]
    Mincore(#[source] std::io::Error),
}

/// The host mapping that backs guest RAM at guest-physical address 0.
pub struct GuestRam {
    host: NonNull<u8>,
    size: usize,
    mem: GuestMemoryMmap,
}

// SAFETY: `host` points to a process-lifetime shared mapping; the pointer itself is only
// read, and all accesses to the memory go through vm-memory's volatile accessors or KVM.
unsafe impl Send for GuestRam {}
// SAFETY: as for `Send`: no interior state is mutated through `&GuestRam`.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `size` bytes of anonymous private memory (not reserved up front); `thp: false`
    /// marks it `MADV_NOHUGEPAGE`.
    pub fn anonymous(size: u64, thp: bool) -> Result<Self, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::Map {
            bytes: size,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: a fresh anonymous mapping with no address hint; it aliases nothing and the
        // result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MemoryError::Map {
                bytes: size,
                source: std::io::Error::last_os_error(),
            });
        }
        let host = NonNull::new(addr.cast::<u8>()).ok_or(MemoryError::Map {
            bytes: size,
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        })?;
        let advice = if thp {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice on the mapping just created; it changes no contents.
        let rc = unsafe { libc::madvise(addr, len, advice) };
        if rc != 0 {
            log::warn!(
                "madvise({}) on guest RAM failed: {}",
                if thp {
                    "MADV_HUGEPAGE"
                } else {
                    "MADV_NOHUGEPAGE"
                },
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: `host`/`len` is the mapping just created; it is never unmapped, so it
        // outlives every region built from it.
        unsafe { Self::from_raw(host, len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) }
    }

    /// Wraps an existing mapping of `size` bytes at `host`, made with mmap `flags`, as guest
    /// RAM at address 0.
    ///
    /// # Safety
    /// `host..host+size` must be a readable and writable mapping that stays mapped for the
    /// rest of the process's life.
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

    /// Counts the 4 KiB pages of guest RAM that are resident in the host.
    pub fn resident_pages(&self) -> Result<u64, MemoryError> {
        const CHUNK: usize = 1 << 30;
        let mut vec = vec![0u8; CHUNK >> 12];
        let mut count = 0u64;
        let mut off = 0usize;
        while off < self.size {
            let len = (self.size - off).min(CHUNK);
            // SAFETY: `off..off+len` lies inside the live guest mapping and `vec` has one
            // byte for each of its `len / 4096` pages.
            let rc = unsafe {
                libc::mincore(
                    self.host.as_ptr().add(off).cast(),
                    len,
                    vec.as_mut_ptr().cast(),
                )
            };
            if rc != 0 {
                return Err(MemoryError::Mincore(std::io::Error::last_os_error()));
            }
            count += vec[..len.div_ceil(4096)]
                .iter()
                .filter(|b| **b & 1 != 0)
                .count() as u64;
            off += len;
        }
        Ok(count)
    }
}

/// Guest RAM plus, when tracking is on, guest-mm's userfaultfd fault path over it.
pub struct VmMemory {
    ram: GuestRam,
    tracker: Option<GuestMm>,
    /// 2 MiB blocks that give-backs emptied (guest-mm freed their PT table; untracked: whole
    /// blocks released), and KVM's table zaps (see [`VmMemory::kvm_zap_due`]).
    zap: ZapCounters,
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
    /// Sets up guest RAM for `config`: a guest-mm region with fault handlers when tracking,
    /// a plain anonymous mapping otherwise.
    ///
    /// Tracked RAM with huge pages allowed (the default) is a memfd that guest-mm fills a whole
    /// 2 MiB block at a time (one 2 MiB leaf per block, one host PMD where the host gives shmem
    /// huge pages), released with `fallocate(PUNCH_HOLE)`. With `--no-thp` it is anonymous
    /// memory in 4 KiB pages, released with `MADV_DONTNEED`.
    pub fn new(config: &crate::config::VmConfig) -> Result<Self, MemoryError> {
        if !config.track {
            let ram = GuestRam::anonymous(config.memory_bytes(), config.thp)?;
            return Ok(VmMemory {
                ram,
                tracker: None,
                zap: ZapCounters::default(),
            });
        }
        let (backing, release) = if config.thp {
            if !guest_mm::backing::shmem_huge_pages_available() {
                log::warn!(
                    "this host gives shared memory no 2 MiB pages \
                     (/sys/kernel/mm/transparent_hugepage/shmem_enabled): guest RAM is filled \
                     2 MiB at a time but mapped with 4 KiB host pages; \
                     `echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled` fixes that"
                );
            }
            let backing = BackingSpec::Memfd {
                name: "ebb-guest-ram".to_owned(),
                huge: true,
            };
            (backing, ReleaseMode::PunchHole)
        } else {
            (BackingSpec::Anonymous { thp: false }, ReleaseMode::DontNeed)
        };
        let spec = RegionSpec {
            gpa: 0,
            len: config.memory_bytes(),
            backing,
        };
        let faults = FaultConfig {
            handler_threads: config.fault_threads,
            fault_around_pages: config.fault_around,
            fill: FillMode::default(),
        };
        let mm = GuestMm::new(&[spec], Strategy::Count, release, faults)
            .map_err(MemoryError::Tracker)?;
        let region = mm
            .regions()
            .first()
            .copied()
            .ok_or_else(|| MemoryError::Region("guest-mm returned no region".to_owned()))?;
        let host = NonNull::new(region.host_addr as *mut u8)
            .ok_or_else(|| MemoryError::Region("guest-mm region at address 0".to_owned()))?;
        let len = usize::try_from(region.len)
            .map_err(|_| MemoryError::Region("region too large".to_owned()))?;
        let flags = if config.thp {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
        };
        // SAFETY: the region is guest-mm's mapping, which lives as long as `mm`; `mm` is
        // kept in the returned value, which the VMM holds until the process exits. `flags`
        // are those guest-mm mapped it with.
        let ram = unsafe { GuestRam::from_raw(host, len, flags)? };
        Ok(VmMemory {
            ram,
            tracker: Some(mm),
            zap: ZapCounters::default(),
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

    /// guest-mm, when tracking.
    pub fn tracker(&self) -> Option<&GuestMm> {
        self.tracker.as_ref()
    }

    /// Gives the host memory behind guest-physical `gpa..gpa+len` back (the balloon's path):
    /// through guest-mm when tracking (leaves and empty tables go too), with a plain
    /// `MADV_DONTNEED` otherwise. Returns the bytes released. The range must be 4 KiB aligned
    /// and inside guest RAM; anything else is refused and nothing changes.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<u64, MemoryError> {
        self.check_range(gpa, len)?;
        if let Some(mm) = &self.tracker {
            let range = guest_mm::manager::gpa_range(gpa, len).map_err(MemoryError::Tracker)?;
            let summary = mm.discard(range).map_err(MemoryError::Tracker)?;
            return Ok(self.count(&summary));
        }
        self.dontneed(gpa, len)
    }

    /// Counts the blocks a tracked give-back emptied; returns its bytes released.
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

    /// The untracked release of a range already checked by [`check_range`](Self::check_range).
    fn dontneed(&self, gpa: u64, len: u64) -> Result<u64, MemoryError> {
        // SAFETY: the caller checked that the range lies inside the live guest mapping;
        // MADV_DONTNEED on private anonymous memory only drops pages, which read back as zeros.
        let rc = unsafe {
            libc::madvise(
                self.ram.host.as_ptr().add(gpa as usize).cast(),
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(MemoryError::Discard(std::io::Error::last_os_error()));
        }
        // Whole 2 MiB blocks released (the host frees their PTE page with PT_RECLAIM).
        let block = guest_mm::BLOCK_SIZE;
        let blocks = ((gpa + len) / block).saturating_sub(gpa.div_ceil(block));
        self.zap.blocks_emptied.fetch_add(blocks, Ordering::Relaxed);
        Ok(len)
    }

    /// Gives back many ranges in one call (a balloon chain's runs): every range is checked
    /// first, and if any is bad nothing is released. With tracking, guest-mm clears all their
    /// leaves and frees emptied tables in one pass and merges the host releases (one syscall
    /// per merged run instead of one per range). Returns the bytes released.
    pub fn discard_many(&self, ranges: &[(u64, u64)]) -> Result<u64, MemoryError> {
        let Some(mm) = &self.tracker else {
            for &(gpa, len) in ranges {
                self.check_range(gpa, len)?;
            }
            let mut bytes = 0;
            for &(gpa, len) in ranges {
                bytes += self.dontneed(gpa, len)?;
            }
            return Ok(bytes);
        };
        let ranges = self.checked_ranges(ranges)?;
        let summary = mm.discard_many(&ranges).map_err(MemoryError::Tracker)?;
        Ok(self.count(&summary))
    }

    /// The balloon's inflate: marks the ranges as held by the guest (no block fill or
    /// fault-around window will bring them back; see `GuestMm::hold`), then discards them like
    /// [`discard_many`](Self::discard_many). Returns the bytes released.
    pub fn discard_held(&self, ranges: &[(u64, u64)]) -> Result<u64, MemoryError> {
        let Some(mm) = &self.tracker else {
            return self.discard_many(ranges);
        };
        let granges = self.checked_ranges(ranges)?;
        mm.hold(&granges, true).map_err(MemoryError::Tracker)?;
        let summary = mm.discard_many(&granges).map_err(MemoryError::Tracker)?;
        Ok(self.count(&summary))
    }

    /// The balloon's deflate: the guest takes the ranges back; faults in their blocks may fill
    /// more than the faulting page again once nothing in the block is held. Nothing else
    /// happens now (the pages come back when the guest touches them).
    pub fn unhold(&self, ranges: &[(u64, u64)]) -> Result<(), MemoryError> {
        let Some(mm) = &self.tracker else {
            return Ok(());
        };
        let granges = self.checked_ranges(ranges)?;
        mm.hold(&granges, false).map_err(MemoryError::Tracker)
    }

    /// Pages the balloon holds, as guest-mm counts them (0 untracked).
    pub fn held_pages(&self) -> u64 {
        self.tracker.as_ref().map_or(0, GuestMm::held_pages)
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
                guest_mm::manager::gpa_range(gpa, len).map_err(MemoryError::Tracker)
            })
            .collect()
    }

    /// Current memory figures; `exact` also walks the tables for the minimum (slower).
    pub fn report(&self) -> Result<crate::report::MemoryReport, MemoryError> {
        let tracked = self.tracker.as_ref().map(|mm| {
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
            }
        });
        let (host_pte_bytes, kvm_table_bytes) = crate::report::host_table_bytes();
        Ok(crate::report::MemoryReport {
            guest_bytes: self.ram.size() as u64,
            resident_pages: self.ram.resident_pages()?,
            host_huge_bytes: self.ram.host_huge_bytes(),
            host_pte_bytes,
            kvm_table_bytes,
            kvm_zaps: crate::report::KvmZaps {
                zaps: self.zap.zaps.load(Ordering::Relaxed),
                ns_total: self.zap.zap_ns_total.load(Ordering::Relaxed),
                ns_max: self.zap.zap_ns_max.load(Ordering::Relaxed),
                blocks_emptied: self.zap.blocks_emptied.load(Ordering::Relaxed),
            },
            tracked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn anonymous_ram_is_usable_and_residency_counts() {
        let ram = GuestRam::anonymous(16 << 20, false).unwrap();
        assert_eq!(ram.size(), 16 << 20);
        assert_eq!(ram.resident_pages().unwrap(), 0);
        for page in 0..10u64 {
            ram.memory()
                .write_obj(0xabu8, GuestAddress(page * 4096))
                .unwrap();
        }
        assert_eq!(ram.resident_pages().unwrap(), 10);
        assert!(ram.memory().write_obj(1u8, GuestAddress(16 << 20)).is_err());
    }

    fn untracked(mib: u64) -> VmMemory {
        VmMemory {
            ram: GuestRam::anonymous(mib << 20, false).unwrap(),
            tracker: None,
            zap: ZapCounters::default(),
        }
    }

    #[test]
    fn discard_checks_the_range_and_releases() {
        let m = untracked(4);
        for page in 0..8u64 {
            m.vm_memory()
                .write_obj(7u8, GuestAddress(page * 4096))
                .unwrap();
        }
        assert_eq!(m.ram.resident_pages().unwrap(), 8);
        for (gpa, len) in [
            (1, 4096),
            (0, 100),
            (0, 0),
            (4 << 20, 4096),
            (u64::MAX - 4095, 4096),
        ] {
            assert!(matches!(
                m.discard(gpa, len),
                Err(MemoryError::BadRange { .. })
            ));
        }
        assert_eq!(m.discard(0, 4 * 4096).unwrap(), 4 * 4096);
        assert_eq!(m.ram.resident_pages().unwrap(), 4);
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
        let file = crate::config::ConfigFile {
            kernel: Some(std::env::current_exe().unwrap()),
            memory_mib: Some(mib),
            thp: Some(thp),
            // One block (or page) per fault, so the tests can count.
            fault_around: Some(1),
            ..Default::default()
        };
        let config = crate::config::VmConfig::validate(file).unwrap();
        VmMemory::new(&config).expect("guest-mm with userfaultfd (needs root)")
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
        let file = crate::config::ConfigFile {
            kernel: Some(std::env::current_exe().unwrap()),
            memory_mib: Some(64),
            ..Default::default()
        };
        // The default window: 8 blocks per fault.
        let config = crate::config::VmConfig::validate(file).unwrap();
        let m = VmMemory::new(&config).expect("guest-mm with userfaultfd (needs root)");
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
}
