//! `GuestMm`: guest memory regions, their second-level tables, their host backing and the
//! userfaultfd fault path, combined.
//!
//! The manager owns the regions (guest-physical start, length, host mapping). With a fault
//! path configured it registers every region with one userfaultfd in MISSING mode (plus
//! `UFFD_FEATURE_EVENT_REMOVE`) and runs N handler threads, which resolve faults with
//! `UFFDIO_ZEROPAGE`/`UFFDIO_COPY` and record each leaf in the [`Tables`]; the leaves then
//! describe exactly the pages present in the host. A [`GuestMm::discard`] clears leaves, frees
//! the tables that became empty (per strategy) and releases the host memory, merging what it
//! releases into as few calls as possible and releasing the whole 2 MiB block of every freed
//! PT table in one aligned call, so that the host kernel frees its own PTE page at the same
//! moment. Without a fault path there are no leaves; a discard then releases whole, in the same
//! way, every block it touches whose pages the balloon all holds ([`GuestMm::hold`]). See `docs/DESIGN-guest-mm.md`, "Fault path", for why faults and discards cannot
//! leave a phantom or lost leaf.

mod discard;
mod fault;
mod region;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::backing::{
    AnonBacking, BackingError, BackingKind, HostBacking, MemfdBacking, ReleaseMode,
};
use crate::range::{BLOCK_SIZE, GPA_LIMIT, GpaRange, PAGE_SIZE, RangeError};
use crate::sys::{
    Mapping, SysError, UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_MISSING_SHMEM, Userfaultfd,
};
use crate::tables::{Leaf, Strategy, TableError, TableStats, Tables};
use crate::uffd::{FaultHandlers, HandlerControl, HandlerCounts, HandlerError};

pub use discard::DiscardSummary;
use region::Region;

/// Largest fault-around window, in 4 KiB pages.
pub const MAX_FAULT_AROUND_PAGES: u32 = 4096;

/// The host memory behind a region.
#[derive(Debug, Clone)]
pub enum BackingSpec {
    /// Private anonymous memory; `thp: false` marks it `MADV_NOHUGEPAGE`.
    Anonymous {
        /// Allow transparent huge pages.
        thp: bool,
    },
    /// A shared memfd mapping with this name.
    Memfd {
        /// Name shown in /proc (memfd:NAME).
        name: String,
        /// Ask for 2 MiB host pages and fill whole 2 MiB blocks on a fault in an empty block
        /// (one 2 MiB leaf), through a second mapping that userfaultfd does not watch. The
        /// fault path then needs one userfault per block, and the host maps the block with one
        /// PMD where it gives shmem huge pages
        /// ([`shmem_huge_pages_available`](crate::backing::shmem_huge_pages_available)).
        huge: bool,
    },
    /// A backing made by the caller (its length is the region's length).
    Custom(Arc<dyn HostBacking>),
}

/// One guest-memory region to create.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    /// First guest-physical address; must be 2 MiB aligned.
    pub gpa: u64,
    /// Length in bytes; a non-zero multiple of 4 KiB (ignored for `Custom`, whose backing's
    /// length is used).
    pub len: u64,
    /// The host memory.
    pub backing: BackingSpec,
}

/// How faults are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FillMode {
    /// `UFFDIO_ZEROPAGE` for read faults (maps the shared zero page on anonymous memory; a
    /// later write is an ordinary copy-on-write fault in the host, not a userfault), and
    /// `UFFDIO_COPY` of a zero page for write faults (allocates the page at once).
    #[default]
    ZeropageForReads,
    /// `UFFDIO_COPY` of zeros for every fault.
    AlwaysCopy,
    /// `UFFDIO_ZEROPAGE` for every fault.
    AlwaysZeropage,
}

/// The userfaultfd fault path's configuration.
#[derive(Debug, Clone, Copy)]
pub struct FaultConfig {
    /// Handler threads; 0 disables the fault path (no userfaultfd: pages are not tracked as
    /// leaves, and discards release what they are asked to, plus, with an eager release
    /// mode, every 2 MiB block they touch whose pages are all held; see
    /// [`GuestMm::hold`]).
    pub handler_threads: usize,
    /// Pages filled per fault when none of the aligned window around it is populated
    /// (1 = off; a power of two up to [`MAX_FAULT_AROUND_PAGES`]). 4 KiB fills stay inside
    /// the faulting 2 MiB block (at most 512 pages); on a block-fill backing, a window of more
    /// than 512 pages fills that many whole empty blocks at once, if none of them was ever
    /// discarded (memory the guest gave back is filled a block per fault).
    pub fault_around_pages: u32,
    /// Which ioctl fills a fault.
    pub fill: FillMode,
    /// Run first on every handler thread, before it serves a fault (a host installs its
    /// syscall filter there); an error stops [`GuestMm::new`].
    pub thread_start: Option<fn() -> std::io::Result<()>>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            handler_threads: 2,
            fault_around_pages: 1,
            fill: FillMode::default(),
            thread_start: None,
        }
    }
}

/// Why a `GuestMm` operation failed. A refused request changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// A region spec is invalid.
    #[error("region {index}: {reason}")]
    Layout {
        /// Index of the region in the layout.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two regions overlap.
    #[error("regions {0} and {1} overlap")]
    Overlap(usize, usize),
    /// The fault configuration is invalid.
    #[error("fault configuration: {0}")]
    FaultConfig(&'static str),
    /// The release mode does not free this region's memory.
    #[error("release mode {mode} cannot free the {kind:?} memory of region {index}")]
    ModeUnsupported {
        /// The region.
        index: usize,
        /// The configured mode.
        mode: ReleaseMode,
        /// The region's backing kind.
        kind: BackingKind,
    },
    /// Creating a region's backing failed.
    #[error("creating the backing of region {index} failed")]
    Backing {
        /// The region.
        index: usize,
        /// The cause.
        #[source]
        source: BackingError,
    },
    /// userfaultfd could not be opened or a region not registered.
    #[error("setting up userfaultfd failed")]
    Uffd(#[source] SysError),
    /// The handler threads could not be started.
    #[error("starting the fault handlers failed")]
    Handlers(#[source] HandlerError),
    /// A requested range is malformed.
    #[error("invalid guest-physical range {start:#x}+{len:#x}")]
    Range {
        /// Requested start.
        start: u64,
        /// Requested length.
        len: u64,
        /// Which check failed.
        #[source]
        source: RangeError,
    },
    /// A requested range is not inside exactly one region.
    #[error("range {start:#x}..{end:#x} is not inside one guest-memory region")]
    NotInRegion {
        /// Start of the range.
        start: u64,
        /// End (exclusive).
        end: u64,
    },
    /// The tables refused an operation.
    #[error("second-level table operation failed")]
    Table(#[source] TableError),
    /// Releasing host memory failed (the leaves in the range were already cleared).
    #[error("releasing host memory failed")]
    Release(#[source] BackingError),
}

/// Where a region lives, for the VMM (which wraps it as a vm-memory region and registers it as
/// a KVM memory slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host address of the first byte (valid while the `GuestMm` lives).
    pub host_addr: u64,
}

/// Counters of the manager and its fault path.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub faults_resolved: AtomicU64,
    pub fault_around_pages: AtomicU64,
    pub block_fills: AtomicU64,
    pub eexist: AtomicU64,
    pub eagain: AtomicU64,
    pub deferred_discarding: AtomicU64,
    pub fault_errors: AtomicU64,
    pub table_errors: AtomicU64,
    pub own_remove_events: AtomicU64,
    pub foreign_remove_events: AtomicU64,
    pub foreign_pages_cleared: AtomicU64,
    pub release_calls: AtomicU64,
    pub release_bytes: AtomicU64,
    pub discards: AtomicU64,
    pub lazy_marked: AtomicU64,
    pub pages_kept: AtomicU64,
    pub promotions: AtomicU64,
    pub rest_fills: AtomicU64,
    pub promote_errors: AtomicU64,
    pub promote_ns: AtomicU64,
}

/// A snapshot of everything the manager counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MmStats {
    /// The tables' own counters (table pages and bytes per level, leaves, reclaim paths).
    pub tables: TableStats,
    /// Faults resolved (a fault-around fill counts once).
    pub faults_resolved: u64,
    /// Pages filled by fault-around windows (including the faulting pages).
    pub fault_around_pages: u64,
    /// Whole 2 MiB blocks filled at once (backings with a block-fill mapping; each is one
    /// 2 MiB leaf and counts as one resolved fault).
    pub block_fills: u64,
    /// Faults on a page already present: fills that met EEXIST, and faults in a block that
    /// another fault had just filled whole (only woken).
    pub eexist: u64,
    /// Fills refused because a remove event was pending (EAGAIN).
    pub eagain: u64,
    /// Faults deferred because their block was being discarded.
    pub deferred_discarding: u64,
    /// Faults that could not be resolved.
    pub fault_errors: u64,
    /// Leaf records the tables refused (e.g. out of memory).
    pub table_errors: u64,
    /// Remove events caused by the manager's own releases (ignored).
    pub own_remove_events: u64,
    /// Remove events from anyone else (their leaves were cleared).
    pub foreign_remove_events: u64,
    /// Pages whose leaves foreign remove events cleared.
    pub foreign_pages_cleared: u64,
    /// Host release calls made (madvise/fallocate).
    pub release_calls: u64,
    /// Bytes covered by those calls.
    pub release_bytes: u64,
    /// Discard requests completed.
    pub discards: u64,
    /// Leaves marked lazy (MADV_FREE mode).
    pub lazy_marked: u64,
    /// Released pages the host kept (it could not split a 2 MiB page to free 4 KiB of it); they
    /// keep their leaves and stay in guest RAM, reading zero.
    pub pages_kept: u64,
    /// Split blocks whose every page came back, made one 2 MiB host page and one 2 MiB leaf
    /// again (re-promotion, on a block-fill backing).
    pub promotions: u64,
    /// Faults that filled the rest of a block holding some pages and none of the balloon's
    /// (all its missing pages at once; the block is then re-promoted).
    pub rest_fills: u64,
    /// Re-promotions the host refused (the block keeps its 4 KiB pages and leaves).
    pub promote_errors: u64,
    /// Time spent re-promoting, in nanoseconds (the host's copy into the new 2 MiB page).
    pub promote_ns: u64,
    /// The handler threads' own counters.
    pub handlers: HandlerCounts,
}

/// Shared state: what the handler threads and the discarding threads both use.
pub(crate) struct Inner {
    pub tables: Tables,
    pub regions: Vec<Region>,
    pub release: ReleaseMode,
    pub fault_around: u32,
    pub fill: FillMode,
    /// Zeros for UFFDIO_COPY (never written; as long as the largest fill).
    pub zeros: Mapping,
    pub uffd: Option<Arc<Userfaultfd>>,
    pub control: Option<Arc<HandlerControl>>,
    /// Host address ranges the manager is releasing right now; REMOVE events inside one of them
    /// are the manager's own.
    pub inflight: Mutex<Vec<(u64, u64)>>,
    pub counters: Counters,
}

/// Guest memory: regions + second-level tables + host backing + the fault path.
///
/// `Send + Sync`; every method takes `&self`. Dropping it stops the handler threads and unmaps
/// the regions, so every thread that touches guest memory (vCPUs, devices) must be stopped first:
/// a thread still waiting on a fault would otherwise find its page unmapped.
pub struct GuestMm {
    // Dropped first: stop the handler threads before the state they use goes away.
    handlers: Option<FaultHandlers>,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GuestMm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMm")
            .field("regions", &self.regions())
            .field("release", &self.inner.release)
            .field("handlers", &self.handlers.is_some())
            .finish()
    }
}

fn make_backing(index: usize, spec: &RegionSpec) -> Result<Arc<dyn HostBacking>, ManagerError> {
    let err = |source| ManagerError::Backing { index, source };
    Ok(match &spec.backing {
        BackingSpec::Anonymous { thp } => Arc::new(AnonBacking::new(spec.len, *thp).map_err(err)?),
        BackingSpec::Memfd { name, huge } => {
            Arc::new(MemfdBacking::with_huge(name, spec.len, *huge).map_err(err)?)
        }
        BackingSpec::Custom(b) => b.clone(),
    })
}

fn check_layout(layout: &[RegionSpec]) -> Result<Vec<(u64, u64)>, ManagerError> {
    let mut spans = Vec::with_capacity(layout.len());
    for (index, spec) in layout.iter().enumerate() {
        let len = match &spec.backing {
            BackingSpec::Custom(b) => b.len(),
            _ => spec.len,
        };
        let bad = |reason| Err(ManagerError::Layout { index, reason });
        if !spec.gpa.is_multiple_of(BLOCK_SIZE) {
            return bad("guest-physical start is not 2 MiB aligned");
        }
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return bad("length is zero or not a multiple of 4 KiB");
        }
        if spec.gpa.checked_add(len).is_none_or(|end| end > GPA_LIMIT) {
            return bad("region ends beyond the guest-physical address space");
        }
        spans.push((spec.gpa, spec.gpa + len));
    }
    for i in 0..spans.len() {
        for j in i + 1..spans.len() {
            if spans[i].0 < spans[j].1 && spans[j].0 < spans[i].1 {
                return Err(ManagerError::Overlap(i, j));
            }
        }
    }
    if spans.is_empty() {
        return Err(ManagerError::Layout {
            index: 0,
            reason: "no regions",
        });
    }
    Ok(spans)
}

impl GuestMm {
    /// Creates the regions, the tables (with `strategy`), and, if `faults.handler_threads > 0`,
    /// the userfaultfd fault path. `release` must be able to free every region's memory
    /// (`DontNeed`/`Free` for anonymous, `Remove`/`PunchHole` for memfd).
    pub fn new(
        layout: &[RegionSpec],
        strategy: Strategy,
        release: ReleaseMode,
        faults: FaultConfig,
    ) -> Result<Self, ManagerError> {
        check_layout(layout)?;
        let fa = faults.fault_around_pages;
        if fa == 0 || !fa.is_power_of_two() || fa > MAX_FAULT_AROUND_PAGES {
            return Err(ManagerError::FaultConfig(
                "fault_around_pages must be a power of two from 1 to 4096",
            ));
        }
        let mut regions = Vec::with_capacity(layout.len());
        for (index, spec) in layout.iter().enumerate() {
            let backing = make_backing(index, spec)?;
            if !backing.supports(release) {
                return Err(ManagerError::ModeUnsupported {
                    index,
                    mode: release,
                    kind: backing.kind(),
                });
            }
            regions.push(Region::new(spec.gpa, backing));
        }
        regions.sort_by_key(|r| r.host);
        let zeros = Mapping::anonymous(u64::from(fa.min(512)) * PAGE_SIZE, PAGE_SIZE)
            .map_err(ManagerError::Uffd)?;

        let (uffd, control) = if faults.handler_threads > 0 {
            let shmem = regions
                .iter()
                .any(|r| r.backing.kind() == BackingKind::SharedMemfd);
            let mut want = UFFD_FEATURE_EVENT_REMOVE;
            if shmem {
                want |= UFFD_FEATURE_MISSING_SHMEM;
            }
            let uffd = Userfaultfd::new(want).map_err(ManagerError::Uffd)?;
            for r in &regions {
                uffd.register_missing(r.host, r.len)
                    .map_err(ManagerError::Uffd)?;
            }
            let control =
                HandlerControl::new(faults.handler_threads).map_err(ManagerError::Handlers)?;
            (Some(Arc::new(uffd)), Some(Arc::new(control)))
        } else {
            (None, None)
        };

        let inner = Arc::new(Inner {
            tables: Tables::new(strategy),
            regions,
            release,
            fault_around: fa,
            fill: faults.fill,
            zeros,
            uffd: uffd.clone(),
            control: control.clone(),
            inflight: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        let handlers = match (uffd, control) {
            (Some(u), Some(c)) => Some(
                FaultHandlers::start(u, c, inner.clone(), faults.thread_start)
                    .map_err(ManagerError::Handlers)?,
            ),
            _ => None,
        };
        log::info!(
            "guest-mm: {} region(s), strategy {strategy:?}, release {release}, {} fault handler(s)",
            inner.regions.len(),
            faults.handler_threads
        );
        Ok(Self { handlers, inner })
    }

    /// The regions, ordered by host address.
    pub fn regions(&self) -> Vec<RegionInfo> {
        self.inner
            .regions
            .iter()
            .map(|r| RegionInfo {
                gpa: r.gpa,
                len: r.len,
                host_addr: r.host,
            })
            .collect()
    }

    /// Host address of guest-physical `gpa`, if it lies in a region.
    pub fn host_addr(&self, gpa: u64) -> Option<u64> {
        let r = self.inner.region_for_gpa(gpa)?;
        Some(r.host + (gpa - r.gpa))
    }

    /// The leaf mapping `gpa`, if any (lock-free).
    pub fn lookup(&self, gpa: u64) -> Option<Leaf> {
        self.inner.tables.lookup(gpa)
    }

    /// The tables (read-only use: lookups, stats, recount).
    pub fn tables(&self) -> &Tables {
        &self.inner.tables
    }

    /// The configured release mode.
    pub fn release_mode(&self) -> ReleaseMode {
        self.inner.release
    }

    /// True if the userfaultfd fault path is running.
    pub fn tracks_faults(&self) -> bool {
        self.handlers.is_some()
    }

    /// One residency byte per page of `range` (bit 0: present in the host), via mincore.
    pub fn residency(&self, range: GpaRange, out: &mut Vec<u8>) -> Result<(), ManagerError> {
        let r = self.inner.region_of(&range)?;
        r.backing
            .residency(range.start() - r.gpa, range.len(), out)
            .map_err(ManagerError::Release)
    }

    /// 4 KiB pages of every region present in the host (mincore: for anonymous memory, pages
    /// mapped; for memfd, pages in the file), read 1 GiB at a time.
    pub fn resident_pages(&self) -> Result<u64, ManagerError> {
        const CHUNK: u64 = 1 << 30;
        let mut res = Vec::new();
        let mut count = 0;
        for r in &self.inner.regions {
            let mut off = 0;
            while off < r.len {
                let len = (r.len - off).min(CHUNK);
                r.backing
                    .residency(off, len, &mut res)
                    .map_err(ManagerError::Release)?;
                count += res.iter().filter(|b| *b & 1 != 0).count() as u64;
                off += len;
            }
        }
        Ok(count)
    }

    /// Waits (up to `timeout`) until the fault path holds no deferred or half-handled fault;
    /// true if it did. Without a fault path, true at once.
    pub fn settle_faults(&self, timeout: std::time::Duration) -> bool {
        self.inner
            .control
            .as_ref()
            .is_none_or(|c| c.settle(timeout))
    }

    /// Counters.
    pub fn stats(&self) -> MmStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MmStats {
            tables: self.inner.tables.stats(),
            faults_resolved: l(&c.faults_resolved),
            fault_around_pages: l(&c.fault_around_pages),
            block_fills: l(&c.block_fills),
            eexist: l(&c.eexist),
            eagain: l(&c.eagain),
            deferred_discarding: l(&c.deferred_discarding),
            fault_errors: l(&c.fault_errors),
            table_errors: l(&c.table_errors),
            own_remove_events: l(&c.own_remove_events),
            foreign_remove_events: l(&c.foreign_remove_events),
            foreign_pages_cleared: l(&c.foreign_pages_cleared),
            release_calls: l(&c.release_calls),
            release_bytes: l(&c.release_bytes),
            discards: l(&c.discards),
            lazy_marked: l(&c.lazy_marked),
            pages_kept: l(&c.pages_kept),
            promotions: l(&c.promotions),
            rest_fills: l(&c.rest_fills),
            promote_errors: l(&c.promote_errors),
            promote_ns: l(&c.promote_ns),
            handlers: self
                .inner
                .control
                .as_ref()
                .map(|c| c.counts())
                .unwrap_or_default(),
        }
    }
}

impl Inner {
    pub fn region_for_gpa(&self, gpa: u64) -> Option<&Region> {
        self.regions.iter().find(|r| gpa >= r.gpa && gpa < r.end())
    }

    pub fn region_for_host(&self, addr: u64) -> Option<&Region> {
        self.regions.iter().find(|r| r.host_contains(addr))
    }

    /// Index of the region wholly containing `range`, or a clear error.
    pub fn region_index(&self, range: &GpaRange) -> Result<usize, ManagerError> {
        self.regions
            .iter()
            .position(|r| r.contains(range))
            .ok_or(ManagerError::NotInRegion {
                start: range.start(),
                end: range.end(),
            })
    }

    /// For each range, the index of the region wholly containing it; the first range outside
    /// every region refuses them all.
    pub fn region_indices(&self, ranges: &[GpaRange]) -> Result<Vec<usize>, ManagerError> {
        ranges.iter().map(|r| self.region_index(r)).collect()
    }

    /// The region wholly containing `range`, or a clear error.
    pub fn region_of(&self, range: &GpaRange) -> Result<&Region, ManagerError> {
        Ok(&self.regions[self.region_index(range)?])
    }
}

/// Validates a raw `(start, len)` request into a range (page-aligned, non-empty, no overflow,
/// inside the guest-physical space).
pub fn gpa_range(start: u64, len: u64) -> Result<GpaRange, ManagerError> {
    GpaRange::new(start, len).map_err(|source| ManagerError::Range { start, len, source })
}
