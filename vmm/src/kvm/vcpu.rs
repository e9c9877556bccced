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

    /// Starts the vCPU on its own thread.
    pub fn spawn(mut self) -> std::io::Result<JoinHandle<VcpuStats>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || {
                self.run();
                self.stats
            })
    }

    /// Logs the registers that locate a crash (once, at the fatal exit).
    fn log_state(&self, what: &str) {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => log::error!(
                "vCPU {} {what}: rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} \
                 cr4={:#x} efer={:#x} cs={:#x}",
                self.index,
                r.rip,
                r.rsp,
                r.rflags,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector
            ),
            _ => log::error!("vCPU {} {what}: registers unavailable", self.index),
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
                    let sub = unsafe { run.__bindgen_anon_1.internal.suberror };
                    stop(ExitReason::KvmError {
                        vcpu: index,
                        detail: format!("internal error, suberror {sub} (1 = emulation failure)"),
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
