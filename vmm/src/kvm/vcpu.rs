//! One thread per vCPU: KVM_RUN and exit dispatch.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::control::{ExitReason, VmControl};
use crate::devices::bus::Bus;

/// Signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler; KVM_RUN then returns EINTR when kicked.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

/// Whether registers look like the architectural reset state (CS 0xf000 with base 0xffff0000,
/// RIP 0xfff0, paging and protection off): what KVM leaves behind after re-initialising a vCPU.
pub fn is_reset_state(rip: u64, cs_selector: u16, cs_base: u64, cr0: u64) -> bool {
    const CR0_PE_PG: u64 = (1 << 0) | (1 << 31);
    rip == 0xfff0 && cs_selector == 0xf000 && cs_base == 0xffff_0000 && cr0 & CR0_PE_PG == 0
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Per-vCPU counters, reported at exit.
#[derive(Debug, Default, Clone, Copy)]
pub struct VcpuStats {
    /// KVM_RUN exits handled.
    pub exits: u64,
    /// Port I/O accesses no device claimed.
    pub unclaimed_pio: u64,
    /// MMIO accesses no device claimed.
    pub unclaimed_mmio: u64,
    /// Accesses to a device's MMIO registers that KVM refused to emulate as "during event
    /// delivery" while no event was being delivered, run again (see [`Vcpu::stale_vectoring`]).
    pub stale_vectoring: u64,
}

/// KVM_INTERNAL_ERROR_DELIVERY_EV: KVM met an exit it cannot handle while an event was being
/// delivered to the guest.
const KVM_INTERNAL_ERROR_DELIVERY_EV: u32 = 3;

/// How many times in a row one vCPU may run an access again after a stale vectoring report
/// before ebb takes the report at its word.
const STALE_VECTORING_MAX: u32 = 8;

/// Whether KVM holds an event for delivery to the vCPU: an exception injected or pending, an
/// interrupt or NMI injected. KVM requeues the event a real vectoring exit interrupted, so after
/// such an exit this is true.
pub fn holds_event(e: &kvm_bindings::kvm_vcpu_events) -> bool {
    e.exception.injected != 0
        || e.exception.pending != 0
        || e.interrupt.injected != 0
        || e.nmi.injected != 0
}

/// A vCPU and the buses its exits go to.
pub struct Vcpu {
    /// Index (= APIC id).
    pub index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    control: Arc<VmControl>,
    stats: VcpuStats,
    /// Stale vectoring reports since this vCPU's last other exit.
    stale_in_a_row: u32,
}

impl Vcpu {
    /// Wraps a configured vCPU.
    pub fn new(
        index: u8,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        control: Arc<VmControl>,
    ) -> Self {
        Vcpu {
            index,
            fd,
            pio,
            mmio,
            control,
            stats: VcpuStats::default(),
            stale_in_a_row: 0,
        }
    }

    /// Starts the vCPU on its own thread. The thread installs its seccomp filter, then waits
    /// for `go` (sent once the event loop's own filter is in: true to run) before it enters
    /// the guest; a filter that cannot be installed stops the VM.
    pub fn spawn(
        mut self,
        go: std::sync::mpsc::Receiver<bool>,
    ) -> std::io::Result<JoinHandle<VcpuStats>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || {
                let kind = crate::seccomp::ThreadKind::Vcpu;
                match crate::seccomp::install(kind, self.index as usize) {
                    Ok(()) => {
                        if go.recv() == Ok(true) {
                            self.run();
                        }
                    }
                    Err(e) => self
                        .control
                        .request_stop(ExitReason::HostError(e.to_string())),
                }
                self.stats
            })
    }

    /// Logs the registers that locate a crash (once, at the fatal exit), and the vCPU's
    /// pending events. On AMD hosts KVM re-initialises the vCPU when it handles a SHUTDOWN
    /// intercept (the VMCB is undefined after one), so at a triple fault the registers are
    /// usually the reset state and say nothing about the fault; that case is named in the log.
    fn log_state(&self, what: &str) {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => {
                log::error!(
                    "vCPU {} {what}: rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} \
                     cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} idt={:#x}/{:#x} gdt={:#x}/{:#x}",
                    self.index,
                    r.rip,
                    r.rsp,
                    r.rflags,
                    s.cr0,
                    s.cr2,
                    s.cr3,
                    s.cr4,
                    s.efer,
                    s.cs.selector,
                    s.idt.base,
                    s.idt.limit,
                    s.gdt.base,
                    s.gdt.limit
                );
                if is_reset_state(r.rip, s.cs.selector, s.cs.base, s.cr0) {
                    log::error!(
                        "vCPU {}: these are the x86 reset values: KVM re-initialised the vCPU \
                         at the shutdown (it does so on AMD), so they do not locate the fault; \
                         the guest RIP before the shutdown is in the host's kvm:kvm_exit trace",
                        self.index
                    );
                }
            }
            _ => log::error!("vCPU {} {what}: registers unavailable", self.index),
        }
        match self.fd.get_vcpu_events() {
            Ok(e) => log::error!(
                "vCPU {} {what}: exception injected={} pending={} nr={} error_code={:#x}; \
                 interrupt injected={} nr={}; nmi injected={} pending={}",
                self.index,
                e.exception.injected,
                e.exception.pending,
                e.exception.nr,
                e.exception.error_code,
                e.interrupt.injected,
                e.interrupt.nr,
                e.nmi.injected,
                e.nmi.pending
            ),
            Err(e) => log::error!("vCPU {} {what}: events unavailable: {e}", self.index),
        }
    }

    /// Whether KVM's "internal error during event delivery" (`data` is its report) is one
    /// ebb may answer by running the guest again: the access is to one of ebb's own MMIO
    /// devices, KVM holds no event for re-delivery (it requeues the event of a real vectoring
    /// exit, which the vCPU's events then show), and it has not come more than
    /// [`STALE_VECTORING_MAX`] times in a row. KVM checks the type field of the exit's
    /// interrupt information without its valid bit; an emulated SVM that leaves the last
    /// delivered event's type there with the valid bit clear (QEMU's TCG does, see
    /// docs/ARCHITECTURE.md, "A stale event-delivery report") makes KVM refuse a plain MMIO
    /// access. The access was not performed (KVM emulates nothing when it refuses), so
    /// re-entering the guest at the same instruction makes it again, and the next exit reports
    /// it normally.
    fn stale_vectoring(&mut self, data: &[u64]) -> bool {
        // data: exit info 2, exit reason, exit info 1, the guest-physical address, CPU.
        let Some(&gpa) = data.get(3) else {
            return false;
        };
        if !self.mmio.claims(gpa) || self.stale_in_a_row >= STALE_VECTORING_MAX {
            return false;
        }
        let Ok(e) = self.fd.get_vcpu_events() else {
            return false;
        };
        if holds_event(&e) {
            return false;
        }
        self.stale_in_a_row += 1;
        self.stats.stale_vectoring += 1;
        log::warn!(
            "vCPU {}: KVM refused an MMIO access at {gpa:#x} as \"during event delivery\" with \
             no event being delivered; running it again ({} so far)",
            self.index,
            self.stats.stale_vectoring
        );
        true
    }

    fn run(&mut self) {
        let control = self.control.clone();
        let index = self.index;
        let stop = |reason: ExitReason| control.request_stop(reason);
        while !self.control.should_stop() {
            let exit = self.fd.run();
            self.stats.exits += 1;
            if !matches!(exit, Ok(VcpuExit::InternalError)) {
                self.stale_in_a_row = 0;
            }
            match exit {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                        self.stats.unclaimed_pio += 1;
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.pio.write(u64::from(port), data) {
                        self.stats.unclaimed_pio += 1;
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0);
                        self.stats.unclaimed_mmio += 1;
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(addr, data) {
                        self.stats.unclaimed_mmio += 1;
                    }
                }
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Shutdown) => {
                    self.log_state("triple fault");
                    stop(ExitReason::TripleFault { vcpu: index })
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => stop(ExitReason::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => stop(ExitReason::Reset),
                    KVM_SYSTEM_EVENT_CRASH => stop(ExitReason::GuestPanic),
                    other => stop(ExitReason::KvmError {
                        vcpu: index,
                        detail: format!("unknown system event {other}"),
                    }),
                },
                Ok(VcpuExit::FailEntry(reason, cpu)) => stop(ExitReason::KvmError {
                    vcpu: index,
                    detail: format!("VM entry failed (hardware reason {reason:#x}, cpu {cpu})"),
                }),
                Ok(VcpuExit::InternalError) => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the
                    // `internal` member of the exit union.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let sub = internal.suberror;
                    // KVM's own words for the error (for suberror 3: exit info 2, the exit
                    // code, exit info 1, the guest-physical address and the host CPU), as hex.
                    let n = (internal.ndata as usize).min(internal.data.len());
                    if sub == KVM_INTERNAL_ERROR_DELIVERY_EV
                        && self.stale_vectoring(&internal.data[..n])
                    {
                        continue;
                    }
                    self.log_state("internal error");
                    let data: Vec<String> = internal.data[..n]
                        .iter()
                        .map(|d| format!("{d:#x}"))
                        .collect();
                    stop(ExitReason::KvmError {
                        vcpu: index,
                        detail: format!(
                            "internal error, suberror {sub} (1 = emulation failure, 3 = during \
                             event delivery); data [{}]",
                            data.join(" ")
                        ),
                    });
                }
                Ok(other) => stop(ExitReason::KvmError {
                    vcpu: index,
                    detail: format!("unexpected exit {other:?}"),
                }),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => stop(ExitReason::KvmError {
                    vcpu: index,
                    detail: format!("KVM_RUN failed: {e}"),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{holds_event, is_reset_state};

    #[test]
    fn an_event_held_by_kvm_is_seen_in_any_of_its_forms() {
        let mut e = kvm_bindings::kvm_vcpu_events::default();
        // What ebb's log showed at every stale report: nothing held, the last vector left over.
        e.interrupt.nr = 236;
        assert!(!holds_event(&e));
        for set in [
            |e: &mut kvm_bindings::kvm_vcpu_events| e.exception.injected = 1,
            |e: &mut kvm_bindings::kvm_vcpu_events| e.exception.pending = 1,
            |e: &mut kvm_bindings::kvm_vcpu_events| e.interrupt.injected = 1,
            |e: &mut kvm_bindings::kvm_vcpu_events| e.nmi.injected = 1,
        ] {
            let mut held = e;
            set(&mut held);
            assert!(holds_event(&held));
        }
    }

    #[test]
    fn reset_state_is_recognised_and_a_kernel_state_is_not() {
        assert!(is_reset_state(0xfff0, 0xf000, 0xffff_0000, 0x6000_0010));
        // A 64-bit kernel: paging and protection on, kernel CS.
        assert!(!is_reset_state(0xffff_ffff_8100_0000, 0x10, 0, 0x8005_0033));
        // Real mode at another address is not the reset vector.
        assert!(!is_reset_state(0x7c00, 0, 0, 0x10));
        assert!(!is_reset_state(0xfff0, 0xf000, 0xffff_0000, 0x8000_0011));
    }
}
