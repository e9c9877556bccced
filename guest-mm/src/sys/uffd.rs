//! userfaultfd: the syscall, the API handshake and the ioctls guest-mm uses, with the uapi
//! structures and ioctl numbers written out from `linux/userfaultfd.h` (checked against the
//! running kernel by `tests/uffd_sys.rs`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::{SysError, last};

/// `UFFD_API`: the only userfaultfd API version.
const UFFD_API: u64 = 0xAA;
/// ioctl type byte of the userfaultfd ioctls.
const UFFDIO: libc::c_ulong = 0xAA;

const fn ioc(dir: libc::c_ulong, nr: libc::c_ulong, size: usize) -> libc::c_ulong {
    (dir << 30) | ((size as libc::c_ulong) << 16) | (UFFDIO << 8) | nr
}
const IOC_READ: libc::c_ulong = 2;
const IOC_RW: libc::c_ulong = 3;

const UFFDIO_API: libc::c_ulong = ioc(IOC_RW, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = ioc(IOC_RW, 0x00, size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: libc::c_ulong = ioc(IOC_READ, 0x01, size_of::<UffdioRange>());
const UFFDIO_WAKE: libc::c_ulong = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: libc::c_ulong = ioc(IOC_RW, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: libc::c_ulong = ioc(IOC_RW, 0x04, size_of::<UffdioZeropage>());

/// The userfaultfd ioctls a running fault path makes (fills and wake-ups, from the handler
/// threads and from whoever discards); a syscall filter for those threads allows these.
pub const RUNTIME_IOCTLS: [libc::c_ulong; 3] = [UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE];

/// Event: a thread faulted on a missing page.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Event: pages of a registered range were removed (madvise DONTNEED/FREE/REMOVE).
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
/// Page-fault flag: the access was a write.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// Feature: deliver `UFFD_EVENT_REMOVE`.
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// Feature: MISSING mode on shmem (memfd) mappings.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// One message read from a userfaultfd (`struct uffd_msg`, 32 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdMsg {
    event: u8,
    reserved: [u8; 7],
    arg: [u64; 3],
}

const _: () = assert!(size_of::<UffdMsg>() == 32);

impl UffdMsg {
    /// The event code (`UFFD_EVENT_*`).
    pub fn event(&self) -> u8 {
        self.event
    }
    /// For a page fault: `(flags, faulting address)`.
    pub fn pagefault(&self) -> (u64, u64) {
        (self.arg[0], self.arg[1])
    }
    /// For a remove event: `(start, end)` host addresses, end exclusive.
    pub fn remove(&self) -> (u64, u64) {
        (self.arg[0], self.arg[1])
    }
    /// Builds a page-fault message (for retry queues and tests).
    pub fn new_pagefault(flags: u64, address: u64) -> Self {
        Self {
            event: UFFD_EVENT_PAGEFAULT,
            reserved: [0; 7],
            arg: [flags, address, 0],
        }
    }
}

/// Why a UFFDIO_COPY or UFFDIO_ZEROPAGE did not fill the whole range.
#[derive(Debug, thiserror::Error)]
pub enum UffdIoError {
    /// A page in the range was already present; `done` bytes before it were filled.
    #[error("page already present after {done:#x} bytes")]
    Exists {
        /// Bytes filled before the present page.
        done: u64,
    },
    /// The call stopped early: a non-cooperative event (e.g. a remove) is pending, or, with
    /// `done > 0`, it met a present page part way.
    #[error("stopped after {done:#x} bytes (pending event or present page)")]
    Again {
        /// Bytes filled before it stopped.
        done: u64,
    },
    /// Any other failure.
    #[error("userfaultfd fill failed")]
    Failed(#[source] SysError),
}

/// A userfaultfd descriptor (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    features: u64,
}

impl Userfaultfd {
    /// Opens a userfaultfd and performs the API handshake asking for `features`
    /// (`UFFD_FEATURE_*`). Fails if the kernel lacks userfaultfd or any requested feature.
    pub fn new(features: u64) -> Result<Self, SysError> {
        // SAFETY: plain syscall creating a new descriptor; flags are valid open flags.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(last("userfaultfd"));
        }
        // SAFETY: fd is a freshly created descriptor owned by nobody else (fits in c_int).
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one uffdio_api, which `api` is.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &raw mut api) };
        if rc != 0 {
            return Err(last("ioctl(UFFDIO_API)"));
        }
        if api.features & features != features {
            return Err(SysError::Call {
                call: "ioctl(UFFDIO_API)",
                source: io::Error::other(format!(
                    "kernel lacks requested features {:#x}",
                    features & !api.features
                )),
            });
        }
        Ok(Self {
            fd,
            features: api.features,
        })
    }

    /// Features the kernel reported in the handshake.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The raw descriptor, for polling.
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Registers `addr..addr + len` in MISSING mode; returns the ioctl mask the kernel allows
    /// there. The range must be a mapping of this process (the kernel checks).
    pub fn register_missing(&self, addr: u64, len: u64) -> Result<u64, SysError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register, which `reg` is; the
        // kernel validates the address range itself.
        let rc = unsafe { libc::ioctl(self.raw(), UFFDIO_REGISTER, &raw mut reg) };
        if rc != 0 {
            return Err(last("ioctl(UFFDIO_REGISTER)"));
        }
        Ok(reg.ioctls)
    }

    /// Unregisters `addr..addr + len`.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), SysError> {
        let mut range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_UNREGISTER reads one uffdio_range, which `range` is.
        let rc = unsafe { libc::ioctl(self.raw(), UFFDIO_UNREGISTER, &raw mut range) };
        if rc != 0 {
            return Err(last("ioctl(UFFDIO_UNREGISTER)"));
        }
        Ok(())
    }

    /// Wakes threads waiting on faults in `addr..addr + len`.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), SysError> {
        let mut range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_WAKE reads one uffdio_range, which `range` is.
        let rc = unsafe { libc::ioctl(self.raw(), UFFDIO_WAKE, &raw mut range) };
        if rc != 0 {
            return Err(last("ioctl(UFFDIO_WAKE)"));
        }
        Ok(())
    }

    /// Fills the missing pages `dst..dst + src.len()` of a registered range with a copy of `src`
    /// (UFFDIO_COPY) and, unless `dontwake`, wakes the threads waiting there. It never changes
    /// a page that is already present (the kernel stops with EEXIST instead).
    pub fn copy(&self, dst: u64, src: &[u8], dontwake: bool) -> Result<u64, UffdIoError> {
        let mut c = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: if dontwake {
                UFFDIO_COPY_MODE_DONTWAKE
            } else {
                0
            },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes one uffdio_copy, which `c` is; the kernel reads
        // `src.len()` bytes from `src`, a live slice; it writes only missing pages of a
        // registered range, which it validates itself.
        let rc = unsafe { libc::ioctl(self.raw(), UFFDIO_COPY, &raw mut c) };
        fill_result(rc, c.copy, c.len, "ioctl(UFFDIO_COPY)")
    }

    /// Maps zero pages at the missing pages of `dst..dst + len` (UFFDIO_ZEROPAGE) and, unless
    /// `dontwake`, wakes the threads waiting there.
    pub fn zeropage(&self, dst: u64, len: u64, dontwake: bool) -> Result<u64, UffdIoError> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: if dontwake {
                UFFDIO_ZEROPAGE_MODE_DONTWAKE
            } else {
                0
            },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one uffdio_zeropage, which `z` is; the kernel
        // fills only missing pages of a registered range, which it validates itself.
        let rc = unsafe { libc::ioctl(self.raw(), UFFDIO_ZEROPAGE, &raw mut z) };
        fill_result(rc, z.zeropage, len, "ioctl(UFFDIO_ZEROPAGE)")
    }

    /// Reads as many pending messages as fit in `buf` without blocking; 0 if none is pending.
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> Result<usize, SysError> {
        let bytes = size_of_val(buf);
        // SAFETY: buf is a live, writable slice of `bytes` bytes of plain-old-data messages.
        let rc = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), bytes) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(SysError::Call {
                    call: "read(userfaultfd)",
                    source: err,
                }),
            };
        }
        Ok(rc as usize / size_of::<UffdMsg>())
    }
}

fn fill_result(
    rc: libc::c_int,
    done: i64,
    len: u64,
    call: &'static str,
) -> Result<u64, UffdIoError> {
    if rc == 0 {
        return Ok(len);
    }
    let err = io::Error::last_os_error();
    let done = u64::try_from(done).unwrap_or(0);
    match err.raw_os_error() {
        Some(libc::EEXIST) => Err(UffdIoError::Exists { done }),
        Some(libc::EAGAIN) => Err(UffdIoError::Again { done }),
        _ => Err(UffdIoError::Failed(SysError::Call { call, source: err })),
    }
}
