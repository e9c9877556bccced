//! The only place in guest-mm that makes raw memory system calls (userfaultfd in `uffd.rs`).
//!
//! Everything here wraps one Linux call (mmap, munmap, madvise, fallocate, memfd_create, mincore,
//! eventfd, poll, userfaultfd and its ioctls) behind a safe API. Calls that act on a [`Mapping`]
//! take offsets into it and check them against the mapping's length first, so no caller can make
//! them touch memory outside a mapping this module created.
//!
//! The userfaultfd uapi structures and ioctl numbers are written out in `uffd.rs` from
//! `linux/userfaultfd.h`; `tests/uffd_sys.rs` makes the real calls to check them.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// Host page size assumed throughout guest-mm (x86_64 base pages).
pub const HOST_PAGE_SIZE: u64 = 4096;

/// A failed system call: which one, and the OS error behind it.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// The kernel refused the call.
    #[error("{call} failed")]
    Call {
        /// Name of the call (e.g. `madvise(MADV_DONTNEED)`).
        call: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An offset/length pair does not lie inside the mapping or is not page aligned.
    #[error(
        "range {offset:#x}+{len:#x} is not a page-aligned, non-empty range inside a mapping of {size:#x} bytes"
    )]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Length of the mapping.
        size: u64,
    },
    /// A length of zero, or one that is not a multiple of the page size.
    #[error("length {0:#x} is zero or not a multiple of the page size")]
    BadLength(u64),
    /// A name given to memfd_create contained a NUL byte.
    #[error("memfd name contains a NUL byte")]
    BadName,
}

fn last(call: &'static str) -> SysError {
    SysError::Call {
        call,
        source: io::Error::last_os_error(),
    }
}

fn check_len(len: u64) -> Result<usize, SysError> {
    if len == 0 || !len.is_multiple_of(HOST_PAGE_SIZE) {
        return Err(SysError::BadLength(len));
    }
    usize::try_from(len).map_err(|_| SysError::BadLength(len))
}

/// madvise advice values used by guest-mm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// `MADV_DONTNEED`: drop the pages now; private anonymous memory reads back as zero.
    DontNeed,
    /// `MADV_FREE`: the kernel may drop the pages lazily, unless they are written again first.
    Free,
    /// `MADV_REMOVE`: punch the range out of a shared (shmem/memfd) backing.
    Remove,
    /// `MADV_NOHUGEPAGE`: never back this range with transparent huge pages.
    NoHugePage,
    /// `MADV_HUGEPAGE`: allow transparent huge pages here.
    HugePage,
    /// `MADV_POPULATE_WRITE`: fault the range in writable now (allocating zeroed pages).
    PopulateWrite,
    /// `MADV_COLLAPSE`: replace the small pages of each 2 MiB range by one huge page now
    /// (copying them) and map it with one PMD; independent of the THP sysfs settings.
    Collapse,
}

impl Advice {
    fn raw(self) -> (libc::c_int, &'static str) {
        match self {
            Advice::DontNeed => (libc::MADV_DONTNEED, "madvise(MADV_DONTNEED)"),
            Advice::Free => (libc::MADV_FREE, "madvise(MADV_FREE)"),
            Advice::Remove => (libc::MADV_REMOVE, "madvise(MADV_REMOVE)"),
            Advice::NoHugePage => (libc::MADV_NOHUGEPAGE, "madvise(MADV_NOHUGEPAGE)"),
            Advice::HugePage => (libc::MADV_HUGEPAGE, "madvise(MADV_HUGEPAGE)"),
            Advice::PopulateWrite => (libc::MADV_POPULATE_WRITE, "madvise(MADV_POPULATE_WRITE)"),
            Advice::Collapse => (libc::MADV_COLLAPSE, "madvise(MADV_COLLAPSE)"),
        }
    }
}

/// A memory mapping owned by this process, unmapped on drop.
///
/// The mapping never hands out references to its contents, only its base address: guest memory
/// is written by the guest, by the kernel (userfaultfd) and by madvise behind Rust's back, so
/// code that reads it must use raw pointers or volatile accesses.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an owned address range; the struct holds no thread-affine state and all
// of its methods are system calls that the kernel serialises itself.
unsafe impl Send for Mapping {}
// SAFETY: as above; &Mapping only allows system calls on the range, never Rust references to it.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of private anonymous memory, read/write, without reserving swap, at an
    /// address aligned to `align` (a power of two, at least a page; e.g. 2 MiB so that each
    /// 2 MiB block of the mapping is covered by exactly one host PTE page).
    pub fn anonymous(len: u64, align: u64) -> Result<Self, SysError> {
        Self::map_aligned(len, align, None, "mmap(anonymous)")
    }

    /// Maps `len` bytes of `fd` from offset 0, shared, read/write, at an address aligned to
    /// `align`.
    pub fn shared(fd: &OwnedFd, len: u64, align: u64) -> Result<Self, SysError> {
        Self::map_aligned(len, align, Some(fd.as_raw_fd()), "mmap(shared)")
    }

    fn map_aligned(
        len: u64,
        align: u64,
        fd: Option<RawFd>,
        call: &'static str,
    ) -> Result<Self, SysError> {
        let ulen = check_len(len)?;
        if !align.is_power_of_two() || align < HOST_PAGE_SIZE {
            return Err(SysError::BadLength(align));
        }
        let slack = (align - HOST_PAGE_SIZE) as usize;
        let total = ulen.checked_add(slack).ok_or(SysError::BadLength(len))?;
        // SAFETY: a fresh inaccessible reservation at a kernel-chosen address; it aliases
        // nothing this process uses. Checked for MAP_FAILED below.
        let resv = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if resv == libc::MAP_FAILED {
            return Err(last("mmap(reserve)"));
        }
        let base = resv as usize;
        let aligned = base.next_multiple_of(align as usize);
        let (flags, raw_fd) = match fd {
            Some(fd) => (libc::MAP_SHARED | libc::MAP_NORESERVE | libc::MAP_FIXED, fd),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
            ),
        };
        // SAFETY: `aligned..aligned + len` lies inside the reservation made above (aligned -
        // base <= slack), which this function owns and nothing else references, so MAP_FIXED
        // replaces only our own inaccessible pages.
        let ptr = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                ulen,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw_fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let err = last(call);
            // SAFETY: unmaps exactly the reservation made above, which nothing references.
            unsafe { libc::munmap(resv, total) };
            return Err(err);
        }
        let head = aligned - base;
        let tail = total - head - ulen;
        // SAFETY: the head and tail are the unused parts of our own reservation, outside the
        // mapping just created; nothing references them.
        unsafe {
            if head > 0 {
                libc::munmap(resv, head);
            }
            if tail > 0 {
                libc::munmap((aligned + ulen) as *mut libc::c_void, tail);
            }
        }
        Self::from_raw(ptr, ulen, call)
    }

    fn from_raw(ptr: *mut libc::c_void, len: usize, call: &'static str) -> Result<Self, SysError> {
        if ptr == libc::MAP_FAILED {
            return Err(last(call));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(SysError::Call {
            call,
            source: io::Error::other("kernel returned a null mapping"),
        })?;
        Ok(Self { ptr, len })
    }

    /// Base address of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `offset..offset + len` is a page-aligned, non-empty range inside the mapping and
    /// returns its start address.
    pub fn checked_range(&self, offset: u64, len: u64) -> Result<*mut u8, SysError> {
        let size = self.len as u64;
        let ok = len != 0
            && offset.is_multiple_of(HOST_PAGE_SIZE)
            && len.is_multiple_of(HOST_PAGE_SIZE)
            && offset.checked_add(len).is_some_and(|end| end <= size);
        if !ok {
            return Err(SysError::OutOfRange { offset, len, size });
        }
        // SAFETY: offset < size was checked above, so the result stays inside the mapping.
        Ok(unsafe { self.as_ptr().add(offset as usize) })
    }

    /// Applies `advice` to `offset..offset + len` of this mapping.
    pub fn madvise(&self, offset: u64, len: u64, advice: Advice) -> Result<(), SysError> {
        let addr = self.checked_range(offset, len)?;
        let (raw, call) = advice.raw();
        // SAFETY: the range lies inside this mapping (checked); no Rust reference into the mapping
        // exists (the type never creates one), so changing its contents breaks no aliasing rule.
        let rc = unsafe { libc::madvise(addr.cast(), len as usize, raw) };
        if rc != 0 {
            return Err(last(call));
        }
        Ok(())
    }

    /// Fills `out` with one residency byte per page of `offset..offset + len` (bit 0 set: the page
    /// is resident). For a private anonymous mapping that means "has a present PTE"; for a
    /// shared file mapping, "is in the page cache".
    pub fn mincore(&self, offset: u64, len: u64, out: &mut Vec<u8>) -> Result<(), SysError> {
        let addr = self.checked_range(offset, len)?;
        let pages = (len / HOST_PAGE_SIZE) as usize;
        out.clear();
        out.resize(pages, 0);
        // SAFETY: the range lies inside this mapping (checked) and `out` has exactly one byte per
        // page of it, which is what mincore writes.
        let rc = unsafe { libc::mincore(addr.cast(), len as usize, out.as_mut_ptr()) };
        if rc != 0 {
            return Err(last("mincore"));
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping this value created and still owns; nothing can use it
        // after drop because the type hands out no references.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            log::error!(
                "munmap of guest mapping failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// Creates a memfd named `name` of `len` bytes (`MFD_CLOEXEC`).
pub fn memfd_create(name: &str, len: u64) -> Result<OwnedFd, SysError> {
    check_len(len)?;
    let cname = CString::new(name).map_err(|_| SysError::BadName)?;
    // SAFETY: cname is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(last("memfd_create"));
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let size = libc::off_t::try_from(len).map_err(|_| SysError::BadLength(len))?;
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
        return Err(last("ftruncate(memfd)"));
    }
    Ok(fd)
}

/// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)` on `offset..offset + len` of `fd`.
pub fn punch_hole(fd: &OwnedFd, offset: u64, len: u64) -> Result<(), SysError> {
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(SysError::OutOfRange {
            offset,
            len,
            size: 0,
        });
    };
    // SAFETY: plain syscall on a descriptor we own; it only frees file blocks.
    let rc = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if rc != 0 {
        return Err(last("fallocate(PUNCH_HOLE)"));
    }
    Ok(())
}

/// A non-blocking eventfd, used to wake pollers.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// Creates an eventfd (`EFD_NONBLOCK | EFD_CLOEXEC`), counter 0.
    pub fn new() -> Result<Self, SysError> {
        // SAFETY: plain syscall creating a new descriptor.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(last("eventfd"));
        }
        // SAFETY: fd is freshly created and owned by nobody else.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds 1 to the counter, making the fd readable.
    pub fn signal(&self) -> Result<(), SysError> {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to a descriptor we own.
        let rc = unsafe { libc::write(self.0.as_raw_fd(), (&raw const one).cast(), 8) };
        if rc != 8 {
            let err = io::Error::last_os_error();
            // A saturated counter is still readable, which is all a waker needs.
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(SysError::Call {
                    call: "write(eventfd)",
                    source: err,
                });
            }
        }
        Ok(())
    }

    /// Resets the counter to 0; returns whether it was non-zero.
    pub fn drain(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from a descriptor we own.
        let rc = unsafe { libc::read(self.0.as_raw_fd(), (&raw mut v).cast(), 8) };
        rc == 8
    }

    /// The raw descriptor, for polling.
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Polls `fds` for readability, for at most `timeout_ms` (-1: forever). Returns one flag per fd;
/// an interrupted poll returns all false.
pub fn poll_readable<const N: usize>(
    fds: [RawFd; N],
    timeout_ms: i32,
) -> Result<[bool; N], SysError> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: pfds is a live array of N pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(SysError::Call {
            call: "poll",
            source: err,
        });
    }
    Ok(pfds.map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0))
}

/// An epoll set owned by one thread, reporting which of its descriptors are readable.
/// Descriptors added as exclusive (`EPOLLEXCLUSIVE`) wake one of the threads waiting on them
/// per event instead of all: the fault handler threads share one userfaultfd, and waking every
/// handler for each fault costs a context switch per idle handler.
#[derive(Debug)]
pub struct Waiter {
    epfd: OwnedFd,
    fds: usize,
}

impl Waiter {
    /// A set over `fds` (descriptor, exclusive); event `i` is `fds[i]` being readable.
    pub fn new(fds: &[(RawFd, bool)]) -> Result<Self, SysError> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked below.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(last("epoll_create1"));
        }
        // SAFETY: `raw` is a fresh descriptor this function owns from here on.
        let epfd = unsafe { OwnedFd::from_raw_fd(raw) };
        for (i, &(fd, exclusive)) in fds.iter().enumerate() {
            let mut events = libc::EPOLLIN as u32;
            if exclusive {
                events |= libc::EPOLLEXCLUSIVE as u32;
            }
            let mut ev = libc::epoll_event {
                events,
                u64: i as u64,
            };
            // SAFETY: `ev` is a live epoll_event; `fd` is the caller's open descriptor.
            let rc = unsafe { libc::epoll_ctl(raw, libc::EPOLL_CTL_ADD, fd, &mut ev) };
            if rc < 0 {
                return Err(last("epoll_ctl"));
            }
        }
        Ok(Waiter {
            epfd,
            fds: fds.len(),
        })
    }

    /// Waits at most `timeout_ms` (-1: forever) for readable descriptors; one flag per
    /// descriptor given to `new` (N must be that count). An interrupted wait returns all false.
    pub fn wait<const N: usize>(&self, timeout_ms: i32) -> Result<[bool; N], SysError> {
        let mut out = [false; N];
        if N != self.fds {
            return Err(SysError::BadLength(N as u64));
        }
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        // SAFETY: `evs` is a live array of 8 epoll_event structs.
        let rc = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                evs.as_mut_ptr(),
                evs.len() as i32,
                timeout_ms,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(out);
            }
            return Err(SysError::Call {
                call: "epoll_wait",
                source: err,
            });
        }
        for ev in &evs[..rc as usize] {
            if let Some(flag) = out.get_mut(ev.u64 as usize) {
                *flag = true;
            }
        }
        Ok(out)
    }
}

mod uffd;
/// The userfaultfd ioctls of a running fault path.
pub use uffd::RUNTIME_IOCTLS as UFFD_RUNTIME_IOCTLS;
pub use uffd::{
    UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMOVE, UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_MISSING_SHMEM,
    UFFD_PAGEFAULT_FLAG_WRITE, UffdIoError, UffdMsg, Userfaultfd,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_rejects_ranges_outside() {
        let m = Mapping::anonymous(4 * HOST_PAGE_SIZE, HOST_PAGE_SIZE).unwrap();
        for (off, len) in [
            (0, 0),
            (1, HOST_PAGE_SIZE),
            (0, 5 * HOST_PAGE_SIZE),
            (4 * HOST_PAGE_SIZE, HOST_PAGE_SIZE),
            (!(HOST_PAGE_SIZE - 1), 2 * HOST_PAGE_SIZE),
        ] {
            assert!(matches!(
                m.madvise(off, len, Advice::DontNeed),
                Err(SysError::OutOfRange { .. })
            ));
        }
        m.madvise(0, 4 * HOST_PAGE_SIZE, Advice::DontNeed).unwrap();
    }

    #[test]
    fn mincore_sees_touch_and_dontneed() {
        let m = Mapping::anonymous(8 * HOST_PAGE_SIZE, 2 << 20).unwrap();
        assert_eq!(m.as_ptr() as u64 % (2 << 20), 0);
        // SAFETY: offset 3 pages is inside the 8-page mapping; nothing else accesses it.
        unsafe { m.as_ptr().add(3 * 4096).write_volatile(7) };
        let mut v = Vec::new();
        m.mincore(0, 8 * HOST_PAGE_SIZE, &mut v).unwrap();
        assert_eq!(
            v.iter().map(|b| b & 1).collect::<Vec<_>>(),
            [0, 0, 0, 1, 0, 0, 0, 0]
        );
        m.madvise(3 * HOST_PAGE_SIZE, HOST_PAGE_SIZE, Advice::DontNeed)
            .unwrap();
        m.mincore(0, 8 * HOST_PAGE_SIZE, &mut v).unwrap();
        assert!(v.iter().all(|b| b & 1 == 0));
    }

    #[test]
    fn memfd_punch_hole_frees_page_cache() {
        let fd = memfd_create("ebb-test", 4 * HOST_PAGE_SIZE).unwrap();
        let m = Mapping::shared(&fd, 4 * HOST_PAGE_SIZE, 2 << 20).unwrap();
        // SAFETY: page 1 is inside the mapping; nothing else accesses it.
        unsafe { m.as_ptr().add(4096).write_volatile(9) };
        let mut v = Vec::new();
        m.mincore(0, 4 * HOST_PAGE_SIZE, &mut v).unwrap();
        assert_eq!(v[1] & 1, 1);
        punch_hole(&fd, HOST_PAGE_SIZE, HOST_PAGE_SIZE).unwrap();
        m.mincore(0, 4 * HOST_PAGE_SIZE, &mut v).unwrap();
        assert_eq!(v[1] & 1, 0);
        // SAFETY: as above.
        assert_eq!(unsafe { m.as_ptr().add(4096).read_volatile() }, 0);
    }

    #[test]
    fn eventfd_signals_poll() {
        let e = EventFd::new().unwrap();
        assert_eq!(poll_readable([e.raw()], 0).unwrap(), [false]);
        e.signal().unwrap();
        assert_eq!(poll_readable([e.raw()], 0).unwrap(), [true]);
        assert!(e.drain());
        assert!(!e.drain());
    }

    #[test]
    fn waiter_reports_readable_descriptors_by_index() {
        let (a, b) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        let w = Waiter::new(&[(a.raw(), true), (b.raw(), false)]).unwrap();
        assert_eq!(w.wait::<2>(0).unwrap(), [false, false]);
        b.signal().unwrap();
        assert_eq!(w.wait::<2>(0).unwrap(), [false, true]);
        a.signal().unwrap();
        assert_eq!(w.wait::<2>(-1).unwrap(), [true, true]);
        assert!(a.drain() && b.drain());
        assert_eq!(w.wait::<2>(0).unwrap(), [false, false]);
        assert!(w.wait::<3>(0).is_err(), "the flag count must match the set");
    }
}
