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

    fn run(&mut self) {
        let control = self.control.clone();
        let index = self.index;
        let stop = |reason: ExitReason| control.request_stop(reason);
        while !self.control.should_stop() {
            let exit = self.fd.run();
            self.stats.exits += 1;
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
                    self.log_state("internal error");
                    let run = self.fd.get_kvm_run();
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the
                    // `internal` member of the exit union.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let sub = internal.suberror;
                    // KVM's own words for the error (for suberror 3 on AMD: the event being
                    // delivered, the exit code, its two info words and the guest-physical
                    // address), as hex.
                    let n = (internal.ndata as usize).min(internal.data.len());
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
    use super::is_reset_state;

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
