//! The KVM VM: capabilities, irqchip, PIT, memslot and vCPU creation.

pub mod cpuid;
pub mod regs;
pub mod vcpu;

use kvm_bindings::{
    CpuId, KVM_CAP_X86_DISABLE_EXITS, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
    KVM_X86_DISABLE_EXITS_HLT, kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use std::time::{Duration, Instant};

use crate::boot::{BootEntry, BootMode};
use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, ZAP_SLOT_GPA};
use cpuid::CpuTopology;

/// What failed while setting up KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    /// A capability ebb needs is missing.
    #[error("KVM lacks the capability {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// Boot register state could not be built.
    #[error("cannot prepare the boot vCPU")]
    Regs(#[from] regs::RegsError),
    /// The page behind the table-zap memslot could not be mapped.
    #[error("cannot map the table-zap page")]
    ZapPage(#[source] std::io::Error),
}

/// The memslot whose creation and deletion makes KVM drop its nested tables.
const ZAP_SLOT: u32 = 1;

/// One anonymous page, mapped for the VM's life, behind the table-zap memslot.
struct ZapPage(u64);

impl ZapPage {
    fn new() -> Result<Self, KvmError> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(KvmError::ZapPage(std::io::Error::last_os_error()));
        }
        Ok(ZapPage(p as u64))
    }
}

impl Drop for ZapPage {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `new`; it is in a memslot only inside
        // `zap_nested_tables`, which deletes the slot before it returns.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, 4096) };
    }
}

/// An open VM with its supported CPUID table.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    cpuid: CpuId,
    tsc_deadline: bool,
    legacy_xsave: bool,
    zap_page: ZapPage,
}

impl Vm {
    /// Opens /dev/kvm and creates a VM with an in-kernel irqchip and PIT.
    ///
    /// With `hlt_in_guest`, HLT exits are turned off (KVM_CAP_X86_DISABLE_EXITS): an idle vCPU
    /// halts inside the guest. KVM then never uses its synthetic "async page fault" halt, in
    /// which it parks a vCPU whose page the host cannot map at once (every first touch of
    /// userfaultfd-backed RAM) and re-enters the guest when the page is ready or an interrupt
    /// arrives; the vCPU thread instead waits for guest-mm's fill. In the nested test rig that
    /// park-and-re-enter path is where guests triple-fault (docs/ARCHITECTURE.md, "Known
    /// flakiness").
    pub fn new(legacy_xsave: bool, hlt_in_guest: bool) -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::Ioeventfd, "IOEVENTFD"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::SetTssAddr, "SET_TSS_ADDR"),
            (Cap::Pit2, "PIT2"),
            (Cap::ExtCpuid, "EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCap(name));
            }
        }
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::Ioctl("GET_SUPPORTED_CPUID", e))?;
        let fd = kvm
            .create_vm()
            .map_err(|e| KvmError::Ioctl("CREATE_VM", e))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(|e| KvmError::Ioctl("SET_TSS_ADDR", e))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| KvmError::Ioctl("SET_IDENTITY_MAP_ADDR", e))?;
        if hlt_in_guest {
            // The capability's value is the mask of exits that may be turned off.
            let supported = kvm.check_extension_raw(libc::c_ulong::from(KVM_CAP_X86_DISABLE_EXITS));
            let hlt = KVM_X86_DISABLE_EXITS_HLT;
            if supported <= 0 || (supported as u32) & hlt == 0 {
                return Err(KvmError::MissingCap("X86_DISABLE_EXITS (HLT)"));
            }
            let cap = kvm_enable_cap {
                cap: KVM_CAP_X86_DISABLE_EXITS,
                args: [u64::from(hlt), 0, 0, 0],
                ..Default::default()
            };
            fd.enable_cap(&cap)
                .map_err(|e| KvmError::Ioctl("ENABLE_CAP(X86_DISABLE_EXITS)", e))?;
        }
        fd.create_irq_chip()
            .map_err(|e| KvmError::Ioctl("CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| KvmError::Ioctl("CREATE_PIT2", e))?;
        Ok(Vm {
            kvm,
            fd,
            cpuid,
            tsc_deadline,
            legacy_xsave,
            zap_page: ZapPage::new()?,
        })
    }

    /// The VM file descriptor (for irqfds and ioeventfds).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers guest RAM as memslot 0 at guest-physical 0.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must be a mapping that stays valid while the VM exists.
    pub unsafe fn add_ram(&self, host_addr: u64, size: u64) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: host_addr,
            flags: 0,
        };
        // SAFETY: the caller guarantees the host range outlives the VM.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| KvmError::Ioctl("SET_USER_MEMORY_REGION", e))
    }

    /// Makes KVM drop every nested (second-level) table of this VM, before this returns, and
    /// says how long that took. KVM frees the tables an MMU-notifier invalidation emptied only
    /// when the VM dies or a memslot is deleted or moved (with its default quirk
    /// `KVM_X86_QUIRK_SLOT_ZAP_ALL` on x86: every root is zapped). So a one-page memslot is
    /// created above everything the guest uses and deleted at once. Every page still mapped
    /// then faults into KVM once more (cheap where the host maps 2 MiB). Safe from any thread
    /// while vCPUs run: KVM serialises memslot changes and kicks the vCPUs.
    pub fn zap_nested_tables(&self) -> Result<Duration, KvmError> {
        let start = Instant::now();
        let mut region = kvm_userspace_memory_region {
            slot: ZAP_SLOT,
            guest_phys_addr: ZAP_SLOT_GPA,
            memory_size: 4096,
            userspace_addr: self.zap_page.0,
            flags: 0,
        };
        // SAFETY: the page stays mapped for the VM's life (`zap_page`).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| KvmError::Ioctl("SET_USER_MEMORY_REGION (zap slot)", e))?;
        region.memory_size = 0;
        // SAFETY: deleting the slot just created.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| KvmError::Ioctl("SET_USER_MEMORY_REGION (zap slot delete)", e))?;
        Ok(start.elapsed())
    }

    /// Creates and configures vCPU `index` of `count`; the boot vCPU (0) gets `entry`.
    pub fn create_vcpu(
        &self,
        index: u8,
        count: u8,
        mem: &GuestMemoryMmap,
        entry: BootEntry,
    ) -> Result<VcpuFd, KvmError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| KvmError::Ioctl("CREATE_VCPU", e))?;
        let mut cpuid = self.cpuid.clone();
        cpuid::adjust(
            cpuid.as_mut_slice(),
            CpuTopology {
                apic_id: index,
                count,
                tsc_deadline: self.tsc_deadline,
                legacy_xsave: self.legacy_xsave,
            },
        );
        fd.set_cpuid2(&cpuid)
            .map_err(|e| KvmError::Ioctl("SET_CPUID2", e))?;
        let msrs = regs::boot_msrs()?;
        let written = fd
            .set_msrs(&msrs)
            .map_err(|e| KvmError::Ioctl("SET_MSRS", e))?;
        if written != msrs.as_slice().len() {
            log::warn!(
                "KVM accepted {written} of {} boot MSRs",
                msrs.as_slice().len()
            );
        }
        fd.set_fpu(&regs::boot_fpu())
            .map_err(|e| KvmError::Ioctl("SET_FPU", e))?;
        let mut lapic = fd
            .get_lapic()
            .map_err(|e| KvmError::Ioctl("GET_LAPIC", e))?;
        regs::set_lint(&mut lapic)?;
        fd.set_lapic(&lapic)
            .map_err(|e| KvmError::Ioctl("SET_LAPIC", e))?;
        if index == 0 {
            let mut sregs = fd
                .get_sregs()
                .map_err(|e| KvmError::Ioctl("GET_SREGS", e))?;
            let regs = match entry.mode {
                BootMode::Linux64 => {
                    regs::setup_long_mode(mem, &mut sregs)?;
                    regs::boot_regs(entry.rip, entry.zero_page)
                }
                BootMode::Pvh => {
                    regs::setup_pvh_mode(mem, &mut sregs)?;
                    regs::pvh_regs(entry.rip, entry.zero_page)
                }
            };
            fd.set_sregs(&sregs)
                .map_err(|e| KvmError::Ioctl("SET_SREGS", e))?;
            fd.set_regs(&regs)
                .map_err(|e| KvmError::Ioctl("SET_REGS", e))?;
        }
        Ok(fd)
    }

    /// Largest vCPU count KVM recommends.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_nr_vcpus()
    }
}
