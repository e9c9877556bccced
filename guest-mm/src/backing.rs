//! Host backing of guest memory: the mapping that holds a region's pages, and how pages are
//! given back to the host.
//!
//! Two real implementations: [`AnonBacking`] (private anonymous memory, released with
//! `MADV_DONTNEED` or lazily with `MADV_FREE`) and [`MemfdBacking`] (a shared memfd mapping,
//! released with `MADV_REMOVE` or `fallocate(PUNCH_HOLE)`). Every offset/length is checked
//! against the mapping before any call is made.
//!
//! Release modes and what they mean for the second-level tables:
//! - `DontNeed`: the pages are gone when the call returns; the next touch faults (and reads zero).
//!   The manager clears the leaves.
//! - `Free` (`MADV_FREE`, lazy): the kernel may keep a page until memory is short, and a write
//!   before then keeps it for good, without any fault. So the leaves cannot be cleared (the guest
//!   may reuse the page without faulting, and no fault would ever re-record it); the manager marks
//!   them lazy instead (`Tables::mark_lazy`): "maybe present". A lazy leaf that the host did drop
//!   faults again on the next touch, and the fault path keeps the leaf. No table is freed in this
//!   mode, because no leaf goes away.
//! - `Remove` / `PunchHole`: for shared memfd backing, drop the pages from the file (page cache),
//!   so the memory really goes back. `MADV_DONTNEED` on a shared mapping only unmaps, keeping the
//!   page cache, so it is refused for memfd backing.

use std::fmt;
use std::os::fd::OwnedFd;

use crate::sys::{self, Advice, Mapping, SysError};

/// How released guest pages are given back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReleaseMode {
    /// `MADV_DONTNEED` (anonymous backing; the default).
    #[default]
    DontNeed,
    /// `MADV_FREE` (anonymous backing, lazy).
    Free,
    /// `MADV_REMOVE` (shared memfd backing).
    Remove,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)` (shared memfd backing).
    PunchHole,
}

impl ReleaseMode {
    /// True for modes after which the pages are certainly gone (leaves are cleared); false for
    /// `Free`, after which they may stay (leaves are marked lazy).
    pub fn is_eager(self) -> bool {
        !matches!(self, ReleaseMode::Free)
    }
}

impl fmt::Display for ReleaseMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReleaseMode::DontNeed => "MADV_DONTNEED",
            ReleaseMode::Free => "MADV_FREE",
            ReleaseMode::Remove => "MADV_REMOVE",
            ReleaseMode::PunchHole => "fallocate(PUNCH_HOLE)",
        })
    }
}

/// What kind of memory a backing is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    /// Private anonymous memory.
    Anonymous,
    /// A shared mapping of a memfd (shmem).
    SharedMemfd,
}

/// Why a backing operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// The range is empty, unaligned or not inside the backing.
    #[error(
        "range {offset:#x}+{len:#x} is not a page-aligned, non-empty range inside the {size:#x}-byte backing"
    )]
    OutOfRange {
        /// Offset into the backing.
        offset: u64,
        /// Length.
        len: u64,
        /// Backing size.
        size: u64,
    },
    /// The release mode cannot free this kind of memory.
    #[error("release mode {mode} does not free {kind:?} memory")]
    Unsupported {
        /// Requested mode.
        mode: ReleaseMode,
        /// Backing kind.
        kind: BackingKind,
    },
    /// Creating the backing failed.
    #[error("creating the host mapping failed")]
    Create(#[source] SysError),
    /// The release call failed.
    #[error("releasing {offset:#x}+{len:#x} failed")]
    Release {
        /// Offset into the backing.
        offset: u64,
        /// Length.
        len: u64,
        /// The failed call.
        #[source]
        source: SysError,
    },
    /// mincore failed.
    #[error("reading page residency failed")]
    Residency(#[source] SysError),
    /// The backing cannot fill blocks outside the fault path.
    #[error("{kind:?} backing has no block-fill mapping")]
    NoBlockFill {
        /// Backing kind.
        kind: BackingKind,
    },
    /// Collapsing a block into one huge page failed (the host keeps its small pages).
    #[error("collapsing {offset:#x}+{len:#x} into a 2 MiB page failed")]
    Collapse {
        /// Offset into the backing.
        offset: u64,
        /// Length.
        len: u64,
        /// The failed call.
        #[source]
        source: SysError,
    },
    /// Filling a block failed.
    #[error("filling {offset:#x}+{len:#x} failed")]
    Fill {
        /// Offset into the backing.
        offset: u64,
        /// Length.
        len: u64,
        /// The failed call.
        #[source]
        source: SysError,
    },
}

/// The host memory behind one guest-memory region.
pub trait HostBacking: Send + Sync + fmt::Debug {
    /// Base address of the mapping (stable for the backing's lifetime).
    fn host_ptr(&self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> u64;
    /// True if the backing has no bytes (never for the real implementations).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// What kind of memory this is.
    fn kind(&self) -> BackingKind;
    /// Whether `mode` really gives this kind of memory back.
    fn supports(&self, mode: ReleaseMode) -> bool;
    /// Gives `offset..offset + len` back to the host with `mode`.
    fn release(&self, offset: u64, len: u64, mode: ReleaseMode) -> Result<(), BackingError>;
    /// One residency byte per page of `offset..offset + len` (bit 0: resident), via mincore.
    fn residency(&self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), BackingError>;
    /// Whether [`fill_blocks`](Self::fill_blocks) works on this backing.
    fn fills_blocks(&self) -> bool {
        false
    }
    /// Allocates zeroed pages for `offset..offset + len` without going through the main
    /// mapping (so no userfault is raised); the next access through the main mapping maps them,
    /// as one 2 MiB host mapping per block where the host's page cache holds a huge page.
    fn fill_blocks(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        check(offset, len, self.len())?;
        Err(BackingError::NoBlockFill { kind: self.kind() })
    }
    /// Replaces the small host pages of the whole 2 MiB blocks `offset..offset + len`, every
    /// page of which is present, by one 2 MiB page per block mapped with one PMD, and frees the
    /// host PTE pages that mapped them (the re-promotion of a block split by partial
    /// releases). Only backings that fill blocks can.
    fn collapse(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        check(offset, len, self.len())?;
        Err(BackingError::NoBlockFill { kind: self.kind() })
    }
}

/// Whether the host gives shared memory (shmem, hence memfd) 2 MiB pages in mappings marked
/// `MADV_HUGEPAGE`: the global `shmem_enabled` setting is `always`, `within_size`, `advise` or
/// `force`, and the 2 MiB size's own setting does not say `never`.
pub fn shmem_huge_pages_available() -> bool {
    fn selected(path: &str) -> Option<String> {
        let text = std::fs::read_to_string(path).ok()?;
        let start = text.find('[')? + 1;
        let end = start + text[start..].find(']')?;
        Some(text[start..end].to_owned())
    }
    const THP: &str = "/sys/kernel/mm/transparent_hugepage";
    let global = selected(&format!("{THP}/shmem_enabled"));
    let global_ok = matches!(
        global.as_deref(),
        Some("always" | "within_size" | "advise" | "force")
    );
    match selected(&format!("{THP}/hugepages-2048kB/shmem_enabled")).as_deref() {
        None | Some("inherit") => global_ok,
        Some("never") => false,
        Some(_) => true,
    }
}

/// How many more times a collapse that met a busy page (EAGAIN) is tried: the first
/// `COLLAPSE_YIELDS` after a yield, the rest after a sleep that doubles from 50 us (12.75 ms in
/// all), because on a loaded host the page can stay busy longer than a few yields.
const COLLAPSE_TRIES: u32 = 12;
const COLLAPSE_YIELDS: u32 = 4;

/// Host mappings are aligned to 2 MiB, so that each 2 MiB guest block whose gpa is 2 MiB-aligned
/// maps to exactly the host range one host PTE page covers.
pub const HOST_ALIGN: u64 = 2 << 20;

fn check(offset: u64, len: u64, size: u64) -> Result<(), BackingError> {
    let page = sys::HOST_PAGE_SIZE;
    let ok = len != 0
        && offset.is_multiple_of(page)
        && len.is_multiple_of(page)
        && offset.checked_add(len).is_some_and(|end| end <= size);
    if ok {
        Ok(())
    } else {
        Err(BackingError::OutOfRange { offset, len, size })
    }
}

/// Private anonymous memory.
#[derive(Debug)]
pub struct AnonBacking {
    map: Mapping,
}

impl AnonBacking {
    /// Maps `len` bytes. With `thp == false` the range is marked `MADV_NOHUGEPAGE`, so every page
    /// is a 4 KiB page with its own PTE (what guest-mm's 4 KiB leaves describe).
    pub fn new(len: u64, thp: bool) -> Result<Self, BackingError> {
        let map = Mapping::anonymous(len, HOST_ALIGN).map_err(BackingError::Create)?;
        let advice = if thp {
            Advice::HugePage
        } else {
            Advice::NoHugePage
        };
        map.madvise(0, len, advice).map_err(BackingError::Create)?;
        Ok(Self { map })
    }
}

impl HostBacking for AnonBacking {
    fn host_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }
    fn len(&self) -> u64 {
        self.map.len()
    }
    fn kind(&self) -> BackingKind {
        BackingKind::Anonymous
    }
    fn supports(&self, mode: ReleaseMode) -> bool {
        matches!(mode, ReleaseMode::DontNeed | ReleaseMode::Free)
    }
    fn release(&self, offset: u64, len: u64, mode: ReleaseMode) -> Result<(), BackingError> {
        check(offset, len, self.len())?;
        let advice = match mode {
            ReleaseMode::DontNeed => Advice::DontNeed,
            ReleaseMode::Free => Advice::Free,
            ReleaseMode::Remove | ReleaseMode::PunchHole => {
                return Err(BackingError::Unsupported {
                    mode,
                    kind: self.kind(),
                });
            }
        };
        self.map
            .madvise(offset, len, advice)
            .map_err(|source| BackingError::Release {
                offset,
                len,
                source,
            })
    }
    fn residency(&self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), BackingError> {
        check(offset, len, self.len())?;
        self.map
            .mincore(offset, len, out)
            .map_err(BackingError::Residency)
    }
}

/// A shared mapping of a memfd (shmem).
///
/// With `huge`, both the main mapping and a second mapping of the same file (the "fill alias",
/// never registered with userfaultfd) are marked `MADV_HUGEPAGE`. The fault path can then fill
/// a whole 2 MiB block by populating it through the alias: the page cache gets one 2 MiB page
/// (where the host enables shmem huge pages), and the guest's retried access maps it with a
/// single host PMD, which lets KVM map it with one 2 MiB second-level entry.
#[derive(Debug)]
pub struct MemfdBacking {
    // Field order matters: the mappings are unmapped before the file is closed.
    map: Mapping,
    alias: Option<Mapping>,
    fd: OwnedFd,
}

impl MemfdBacking {
    /// Creates a memfd of `len` bytes named `name` and maps it shared.
    pub fn new(name: &str, len: u64) -> Result<Self, BackingError> {
        Self::with_huge(name, len, false)
    }

    /// Like [`new`](Self::new); with `huge`, asks for 2 MiB pages and adds the fill alias.
    pub fn with_huge(name: &str, len: u64, huge: bool) -> Result<Self, BackingError> {
        let fd = sys::memfd_create(name, len).map_err(BackingError::Create)?;
        let map = Mapping::shared(&fd, len, HOST_ALIGN).map_err(BackingError::Create)?;
        let alias = if huge {
            map.madvise(0, len, Advice::HugePage)
                .map_err(BackingError::Create)?;
            let alias = Mapping::shared(&fd, len, HOST_ALIGN).map_err(BackingError::Create)?;
            alias
                .madvise(0, len, Advice::HugePage)
                .map_err(BackingError::Create)?;
            Some(alias)
        } else {
            None
        };
        Ok(Self { map, alias, fd })
    }

    /// The memfd (e.g. to hand to a vhost-user process).
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// After `offset..offset + len` left the file: the host page-table pages that mapped the
    /// whole 2 MiB blocks inside it are empty now, but a punch (or `MADV_REMOVE`) zaps the
    /// entries without freeing the tables. Linux frees an empty PTE page only for a
    /// `MADV_DONTNEED` covering its whole 2 MiB (`CONFIG_PT_RECLAIM`), and on a shared mapping
    /// that call only unmaps (the pages are already gone from the file): so it is made over those
    /// blocks, in every mapping of the file.
    fn drop_empty_tables(&self, offset: u64, len: u64) -> Result<(), SysError> {
        let start = offset.next_multiple_of(HOST_ALIGN);
        let end = (offset + len) / HOST_ALIGN * HOST_ALIGN;
        if start >= end {
            return Ok(());
        }
        self.map.madvise(start, end - start, Advice::DontNeed)?;
        if let Some(alias) = &self.alias {
            alias.madvise(start, end - start, Advice::DontNeed)?;
        }
        Ok(())
    }
}

impl HostBacking for MemfdBacking {
    fn host_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }
    fn len(&self) -> u64 {
        self.map.len()
    }
    fn kind(&self) -> BackingKind {
        BackingKind::SharedMemfd
    }
    fn supports(&self, mode: ReleaseMode) -> bool {
        matches!(mode, ReleaseMode::Remove | ReleaseMode::PunchHole)
    }
    fn release(&self, offset: u64, len: u64, mode: ReleaseMode) -> Result<(), BackingError> {
        check(offset, len, self.len())?;
        let res = match mode {
            ReleaseMode::Remove => self.map.madvise(offset, len, Advice::Remove),
            ReleaseMode::PunchHole => sys::punch_hole(&self.fd, offset, len),
            ReleaseMode::DontNeed | ReleaseMode::Free => {
                return Err(BackingError::Unsupported {
                    mode,
                    kind: self.kind(),
                });
            }
        }
        .and_then(|()| self.drop_empty_tables(offset, len));
        res.map_err(|source| BackingError::Release {
            offset,
            len,
            source,
        })
    }
    fn residency(&self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), BackingError> {
        check(offset, len, self.len())?;
        self.map
            .mincore(offset, len, out)
            .map_err(BackingError::Residency)
    }
    fn fills_blocks(&self) -> bool {
        self.alias.is_some()
    }
    fn fill_blocks(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        check(offset, len, self.len())?;
        let Some(alias) = &self.alias else {
            return Err(BackingError::NoBlockFill { kind: self.kind() });
        };
        let fill = |source| BackingError::Fill {
            offset,
            len,
            source,
        };
        alias
            .madvise(offset, len, Advice::PopulateWrite)
            .map_err(fill)?;
        // Unmap the alias again (a shared mapping's MADV_DONTNEED keeps the page cache), so the
        // pages are mapped once, by the main mapping, and counted once in the process's RSS.
        alias.madvise(offset, len, Advice::DontNeed).map_err(fill)
    }
    fn collapse(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        check(offset, len, self.len())?;
        if self.alias.is_none()
            || !offset.is_multiple_of(HOST_ALIGN)
            || !len.is_multiple_of(HOST_ALIGN)
        {
            return Err(BackingError::NoBlockFill { kind: self.kind() });
        }
        // MADV_COLLAPSE copies the block's pages into a new 2 MiB page of the file, maps it with
        // one PMD in this mapping and frees the PTE page; it works whatever the THP sysfs
        // settings say. With the main mapping registered for missing userfaults, the kernel
        // refuses to fill a hole in the block, so it can never bring back a page the guest gave
        // away; the caller collapses only blocks whose every page is present anyway. The fill
        // alias maps none of these pages (fill_blocks unmaps it again).
        //
        // EAGAIN is transient: a page of the block was busy for a moment (in manager_promote,
        // about one block in 400, right after the fault that filled it; once, with the host's
        // two cores busy, still after four yields). More tries get through; a block left split
        // would stay split, since a full block takes no more faults.
        let mut tries = 0;
        loop {
            match self.map.madvise(offset, len, Advice::Collapse) {
                Err(SysError::Call { source, .. })
                    if source.raw_os_error() == Some(libc::EAGAIN) && tries < COLLAPSE_TRIES =>
                {
                    if tries < COLLAPSE_YIELDS {
                        std::thread::yield_now();
                    } else {
                        let us = 50u64 << (tries - COLLAPSE_YIELDS);
                        std::thread::sleep(std::time::Duration::from_micros(us));
                    }
                    tries += 1;
                }
                res => {
                    return res.map_err(|source| BackingError::Collapse {
                        offset,
                        len,
                        source,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = sys::HOST_PAGE_SIZE;

    fn touch(b: &dyn HostBacking, page: u64, v: u8) {
        assert!(page * P < b.len());
        // SAFETY: the page lies inside the backing (asserted); no reference into it exists.
        unsafe { b.host_ptr().add((page * P) as usize).write_volatile(v) };
    }

    fn read(b: &dyn HostBacking, page: u64) -> u8 {
        assert!(page * P < b.len());
        // SAFETY: as in `touch`.
        unsafe { b.host_ptr().add((page * P) as usize).read_volatile() }
    }

    #[test]
    fn anon_dontneed_zeroes_and_rejects_bad_ranges() {
        let b = AnonBacking::new(8 * P, false).unwrap();
        for p in 0..8 {
            touch(&b, p, 1 + p as u8);
        }
        b.release(2 * P, 2 * P, ReleaseMode::DontNeed).unwrap();
        let got: Vec<u8> = (0..8).map(|p| read(&b, p)).collect();
        assert_eq!(got, [1, 2, 0, 0, 5, 6, 7, 8]);
        for (off, len) in [(0, 0), (1, P), (7 * P, 2 * P), (u64::MAX - P + 1, P)] {
            assert!(matches!(
                b.release(off, len, ReleaseMode::DontNeed),
                Err(BackingError::OutOfRange { .. })
            ));
        }
        assert!(matches!(
            b.release(0, P, ReleaseMode::Remove),
            Err(BackingError::Unsupported { .. })
        ));
        assert_eq!(read(&b, 0), 1, "a refused release must change nothing");
    }

    #[test]
    fn memfd_remove_and_punch_hole_free_pages() {
        let b = MemfdBacking::new("ebb-backing-test", 8 * P).unwrap();
        for p in 0..8 {
            touch(&b, p, 0x40 + p as u8);
        }
        b.release(P, P, ReleaseMode::Remove).unwrap();
        b.release(5 * P, 2 * P, ReleaseMode::PunchHole).unwrap();
        let mut res = Vec::new();
        b.residency(0, 8 * P, &mut res).unwrap();
        let res: Vec<u8> = res.iter().map(|r| r & 1).collect();
        assert_eq!(res, [1, 0, 1, 1, 1, 0, 0, 1]);
        let got: Vec<u8> = (0..8).map(|p| read(&b, p)).collect();
        assert_eq!(got, [0x40, 0, 0x42, 0x43, 0x44, 0, 0, 0x47]);
        assert!(matches!(
            b.release(0, P, ReleaseMode::DontNeed),
            Err(BackingError::Unsupported { .. })
        ));
    }
}
