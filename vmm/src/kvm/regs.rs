//! Register, MSR, FPU and LAPIC state a vCPU needs to enter a 64-bit Linux kernel.

use kvm_bindings::{
    Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_COUNT, PDE_START, PDPTE_START, PML4_START,
};

/// Why the boot-time register state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT or page tables to guest memory failed.
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str, #[source] vm_memory::GuestMemoryError),
    /// The MSR list could not be built.
    #[error("cannot build the MSR list")]
    Msrs,
    /// A LAPIC register offset is outside the LAPIC page.
    #[error("LAPIC register offset {0:#x} is out of range")]
    LapicOffset(usize),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Packs a segment descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// Unpacks a descriptor into KVM's segment form, with `index` its GDT slot.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: limit as u32,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes `gdt` (null, code, data, TSS) at `GDT_START` and loads it with its segments: CS from
/// entry 1, DS/ES/FS/GS/SS from entry 2, TR from entry 3.
fn load_gdt(mem: &GuestMemoryMmap, gdt: &[u64; 4], sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(|e| RegsError::GuestWrite("GDT", e))?;
    }
    let data = segment_from_gdt(gdt[2], 2);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.cs = segment_from_gdt(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    Ok(())
}

/// Writes the GDT, IDT and identity page tables and fills the long-mode system registers.
pub fn setup_long_mode(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    load_gdt(mem, &boot_gdt(), sregs)?;
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|e| RegsError::GuestWrite("IDT", e))?;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    // Identity map of the first 4 GiB with 2 MiB pages.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(|e| RegsError::GuestWrite("PML4", e))?;
    for d in 0..PDE_COUNT {
        let pd = PDE_START + d * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPTE_START + d * 8))
            .map_err(|e| RegsError::GuestWrite("PDPT", e))?;
        for i in 0..512u64 {
            let phys = (d << 30) | (i << 21);
            mem.write_obj(phys | 0x83, GuestAddress(pd + i * 8))
                .map_err(|e| RegsError::GuestWrite("page directory", e))?;
        }
    }
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// The PVH GDT: null, 32-bit code, data, TSS.
pub fn pvh_gdt() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xc09b, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Writes the PVH GDT and fills flat 32-bit protected-mode system registers, paging off.
pub fn setup_pvh_mode(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    load_gdt(mem, &pvh_gdt(), sregs)?;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    Ok(())
}

/// General registers at the PVH entry with the start info in RBX.
pub fn pvh_regs(rip: u64, start_info: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip,
        rbx: start_info,
        ..Default::default()
    }
}

/// General registers at the 64-bit entry point with the zero page in RSI.
pub fn boot_regs(rip: u64, zero_page: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: zero_page,
        ..Default::default()
    }
}

/// x87 and SSE control words at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The MSRs a Linux kernel expects to find initialised.
pub fn boot_msrs() -> Result<Msrs, RegsError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ])
    .map_err(|_| RegsError::Msrs)
}

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> Result<u32, RegsError> {
    let b = state
        .regs
        .get(off..off + 4)
        .ok_or(RegsError::LapicOffset(off))?;
    Ok(u32::from_le_bytes([
        b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8,
    ]))
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, v: u32) -> Result<(), RegsError> {
    let b = state
        .regs
        .get_mut(off..off + 4)
        .ok_or(RegsError::LapicOffset(off))?;
    for (dst, src) in b.iter_mut().zip(v.to_le_bytes()) {
        *dst = src as _;
    }
    Ok(())
}

/// LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI.
pub fn set_lint(state: &mut kvm_lapic_state) -> Result<(), RegsError> {
    let mode = |reg: u32, m: u32| (reg & !0x700) | (m << 8);
    let lvt0 = lapic_reg(state, APIC_LVT0)?;
    set_lapic_reg(state, APIC_LVT0, mode(lvt0, APIC_MODE_EXTINT))?;
    let lvt1 = lapic_reg(state, APIC_LVT1)?;
    set_lapic_reg(state, APIC_LVT1, mode(lvt1, APIC_MODE_NMI))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trips_to_segments() {
        let gdt = boot_gdt();
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!(
            (cs.selector, cs.l, cs.present, cs.type_, cs.g),
            (8, 1, 1, 0xb, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let null = segment_from_gdt(gdt[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn long_mode_tables_identity_map() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_long_mode(&mem, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last, ((3u64 << 30) | (511 << 21)) | 0x83);
    }

    #[test]
    fn lint_modes() {
        let mut s = kvm_lapic_state::default();
        set_lint(&mut s).unwrap();
        assert_eq!((lapic_reg(&s, APIC_LVT0).unwrap() >> 8) & 7, 7);
        assert_eq!((lapic_reg(&s, APIC_LVT1).unwrap() >> 8) & 7, 4);
    }
}
