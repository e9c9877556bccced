//! Seccomp filters: one syscall allowlist per kind of ebb thread, built with `seccompiler` and
//! installed by each thread on itself before any guest code runs.
//!
//! The kinds: vCPU threads (KVM_RUN and the device work a VM exit does inline, balloon
//! give-backs included), guest-mm's fault handlers (userfaultfd fills), the event loop (which
//! also serves the API socket and makes KVM drop its nested tables) and the balloon's statistics
//! poller. Every list holds what any Rust thread needs (memory allocation, futexes, writing a
//! log line, ending the thread); ioctls are allowed by request number only.
//!
//! A syscall outside a thread's list raises SIGSYS; ebb's handler writes one line naming the
//! thread and the syscall number and ends the process with [`KILLED_EXIT_CODE`]. `log` mode
//! allows everything and has the kernel log what `on` would stop (audit type 1326 in the kernel
//! log), to find what a new code path needs; `off` installs nothing.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use kvm_bindings::{KVMIO, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

/// Exit status of a process stopped by a filter (128 + SIGSYS).
pub const KILLED_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// Whether and how the filters are installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// A syscall outside a thread's list stops ebb with a message.
    #[default]
    On,
    /// No filters.
    Off,
    /// Everything is allowed; what `on` would stop is written to the kernel log.
    Log,
}

/// The kinds of ebb thread, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU and the device work its exits do.
    Vcpu,
    /// A guest-mm userfaultfd handler.
    FaultHandler,
    /// The main thread once the VM runs: event loop, API socket, KVM table zaps, teardown.
    EventLoop,
    /// The balloon's statistics poller.
    Stats,
}

impl ThreadKind {
    /// All kinds.
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::FaultHandler,
        ThreadKind::EventLoop,
        ThreadKind::Stats,
    ];

    /// The name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::FaultHandler => "fault-handler",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Stats => "balloon-stats",
        }
    }
}

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Building or compiling the filter failed.
    #[error("cannot build the {0} seccomp filter: {1}")]
    Build(&'static str, String),
    /// The kernel refused the filter.
    #[error("cannot install the {0} seccomp filter: {1}")]
    Install(&'static str, String),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

impl From<SeccompError> for std::io::Error {
    fn from(e: SeccompError) -> Self {
        std::io::Error::other(e.to_string())
    }
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Sets the process's mode (first call wins) and, unless it is `off`, installs the SIGSYS
/// handler. Until this is called, [`install`] installs nothing.
pub fn init(mode: SeccompMode) -> Result<(), SeccompError> {
    let mode = *MODE.get_or_init(|| mode);
    if mode == SeccompMode::On {
        install_sigsys_handler()?;
    }
    Ok(())
}

/// The mode in force ([`SeccompMode::Off`] before [`init`]).
pub fn mode() -> SeccompMode {
    MODE.get().copied().unwrap_or(SeccompMode::Off)
}

thread_local! {
    /// This thread's kind and index, for the SIGSYS message (read in the signal handler:
    /// const-initialised, so reading it allocates nothing).
    static WHO: Cell<(u8, u16)> = const { Cell::new((u8::MAX, 0)) };
}

/// Installs `kind`'s filter on the calling thread (nothing in `off` mode). `index` names the
/// thread in a message (the vCPU or handler number).
pub fn install(kind: ThreadKind, index: usize) -> Result<(), SeccompError> {
    let mode = mode();
    if mode == SeccompMode::Off {
        return Ok(());
    }
    let program = compile(kind, mode)?;
    WHO.with(|w| w.set((kind as u8, index.min(usize::from(u16::MAX)) as u16)));
    seccompiler::apply_filter(&program)
        .map_err(|e| SeccompError::Install(kind.name(), e.to_string()))
}

/// The fault handlers' start hook (guest-mm's `FaultConfig::thread_start`).
pub fn install_fault_handler() -> std::io::Result<()> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let index = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    install(ThreadKind::FaultHandler, index).map_err(Into::into)
}

/// `kind`'s filter as BPF, with the action for a syscall outside the list that `mode` asks for.
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let err = |e: &dyn std::fmt::Display| SeccompError::Build(kind.name(), e.to_string());
    let rules = allowlist(kind).map_err(|e| err(&e))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| err(&e))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(&e))
}

// KVM's ioctl numbers (linux/kvm.h) that threads make once the VM runs.
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);

/// What every ebb thread needs: allocation, locks, clocks and sleeping, log lines, signal
/// return (the vCPU kick) and ending itself.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Syscalls that give guest memory back (guest-mm's release modes and residency reads): made
/// by whoever releases (a vCPU's inline balloon notification, the event loop's deferred
/// release) and by the fault handlers.
const RELEASE: &[i64] = &[libc::SYS_fallocate, libc::SYS_mincore];

/// The ioctls each kind makes.
fn ioctls(kind: ThreadKind) -> Vec<u64> {
    let uffd = guest_mm::sys::UFFD_RUNTIME_IOCTLS.map(u64::from);
    let mut v: Vec<u64> = match kind {
        ThreadKind::Vcpu => vec![
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_VCPU_EVENTS(),
        ],
        ThreadKind::FaultHandler => Vec::new(),
        ThreadKind::EventLoop => vec![
            KVM_SET_USER_MEMORY_REGION(),
            libc::TCGETS,
            libc::TCSETS,
            libc::TCSETSW,
            libc::TCSETSF,
            libc::FIONBIO,
        ],
        ThreadKind::Stats => Vec::new(),
    };
    if kind != ThreadKind::Stats {
        v.extend(uffd);
    }
    v
}

/// `kind`'s syscalls beyond [`COMMON`].
fn extra(kind: ThreadKind) -> Vec<i64> {
    match kind {
        ThreadKind::Vcpu => RELEASE.to_vec(),
        ThreadKind::FaultHandler => {
            let mut v = RELEASE.to_vec();
            v.extend([
                libc::SYS_read,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
            ]);
            v
        }
        ThreadKind::EventLoop => {
            let mut v = RELEASE.to_vec();
            v.extend([
                // Event loop: eventfds, signalfd, stdin.
                libc::SYS_read,
                libc::SYS_epoll_ctl,
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                // API socket: connections, their reads and writes, their timeouts.
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_recvmsg,
                libc::SYS_sendmsg,
                libc::SYS_shutdown,
                libc::SYS_setsockopt,
                libc::SYS_getsockopt,
                libc::SYS_fcntl,
                libc::SYS_poll,
                libc::SYS_ppoll,
                // The memory report reads the host's figures under /proc.
                libc::SYS_openat,
                libc::SYS_newfstatat,
                libc::SYS_fstat,
                libc::SYS_statx,
                libc::SYS_lseek,
                libc::SYS_pread64,
                // Stopping the vCPUs (a signal to each thread) and removing the API socket.
                libc::SYS_tgkill,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
            ]);
            v
        }
        ThreadKind::Stats => Vec::new(),
    }
}

fn allowlist(
    kind: ThreadKind,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(extra(kind).iter())
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let ioctls = ioctls(kind);
    if !ioctls.is_empty() {
        let mut by_request = Vec::with_capacity(ioctls.len());
        for request in ioctls {
            let cond =
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?;
            by_request.push(SeccompRule::new(vec![cond])?);
        }
        rules.insert(libc::SYS_ioctl, by_request);
    }
    // Every thread may ask whether a descriptor is open: Rust's standard library, built with
    // debug assertions, checks that with fcntl(F_GETFD) before it closes one.
    if let std::collections::btree_map::Entry::Vacant(e) = rules.entry(libc::SYS_fcntl) {
        let getfd = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::F_GETFD as u64,
        )?;
        e.insert(vec![SeccompRule::new(vec![getfd])?]);
    }
    Ok(rules)
}

/// The syscalls `kind` may make (for tests and documentation).
pub fn allowed_syscalls(kind: ThreadKind) -> Vec<i64> {
    let mut v: Vec<i64> = COMMON.iter().chain(extra(kind).iter()).copied().collect();
    if !ioctls(kind).is_empty() {
        v.push(libc::SYS_ioctl);
    }
    v.push(libc::SYS_fcntl);
    v.sort_unstable();
    v.dedup();
    v
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; the handler only reads a thread-local cell and
    // the siginfo, formats on the stack, and calls write and _exit (async-signal-safe).
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// A small stack buffer for the SIGSYS message (no allocation in a signal handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn text(&mut self, s: &str) {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn hex(&mut self, n: u64) {
        self.text("0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let d = ((n >> (shift * 4)) & 0xf) as usize;
            if d != 0 || started || shift == 0 {
                started = true;
                if self.len < self.buf.len() {
                    self.buf[self.len] = b"0123456789abcdef"[d];
                    self.len += 1;
                }
            }
        }
    }

    fn number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &d in &digits[i..] {
            if self.len < self.buf.len() {
                self.buf[self.len] = d;
                self.len += 1;
            }
        }
    }
}

/// The message the SIGSYS handler writes for thread `who` and syscall `nr`; for an ioctl,
/// `request` is its request number (the second argument).
fn sigsys_line(who: (u8, u16), nr: i64, request: u64) -> Line {
    let mut l = Line {
        buf: [0; 256],
        len: 0,
    };
    l.text("ebb: seccomp: the ");
    let kind = ThreadKind::ALL.get(usize::from(who.0));
    match kind {
        Some(k) => {
            l.text(k.name());
            if matches!(k, ThreadKind::Vcpu | ThreadKind::FaultHandler) {
                l.text(" ");
                l.number(u64::from(who.1));
            }
        }
        None => l.text("unfiltered"),
    }
    l.text(" thread made system call ");
    if nr < 0 {
        l.text("-");
    }
    l.number(nr.unsigned_abs());
    l.text(" (x86_64 numbering");
    if nr == libc::SYS_ioctl {
        l.text(", request ");
        l.hex(request);
    }
    l.text(
        "), which its allowlist does not hold; ebb stops (--no-seccomp turns the filters off)\n",
    );
    l
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SIGSYS's siginfo holds `_sigsys { void *_call_addr; int _syscall; unsigned _arch; }`
    // after the three ints of the header and their padding: the syscall number is at 24.
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read() };
    // The trapped syscall's arguments are still in the registers the signal frame saved.
    // SAFETY: an SA_SIGINFO handler's third argument is the interrupted context.
    let request = unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RSI as usize] as u64
    };
    let who = WHO.with(Cell::get);
    let line = sigsys_line(who, i64::from(nr), request);
    // SAFETY: write and _exit are async-signal-safe; the buffer lives on this stack.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(KILLED_EXIT_CODE);
    }
}

#[cfg(test)]
#[path = "seccomp_tests.rs"]
mod tests;
