//! Per-vCPU adjustments to the CPUID table KVM says it supports.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// What the CPUID table must say about this vCPU and its siblings.
#[derive(Debug, Clone, Copy)]
pub struct CpuTopology {
    /// This vCPU's APIC id (equal to its index).
    pub apic_id: u8,
    /// Number of vCPUs in the VM.
    pub count: u8,
    /// Whether the in-kernel LAPIC supports the TSC-deadline timer.
    pub tsc_deadline: bool,
    /// Offer only x87/SSE XSAVE state (see [`sanitize_xstate`]).
    pub legacy_xsave: bool,
}

fn bits_for(count: u8) -> u32 {
    // Number of APIC-id bits needed to number `count` CPUs: ceil(log2(count)).
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_XSTATE: u32 = 0xd;
const ECX_AVX: u32 = 1 << 28;
const ECX_FMA: u32 = 1 << 12;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_F16C: u32 = 1 << 29;
const EBX7_AVX2: u32 = 1 << 5;
/// AVX512F, DQ, IFMA, PF, ER, CD, BW, VL.
const EBX7_AVX512_ALL: u32 =
    (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
const EBX7_MPX: u32 = 1 << 14;
const EBX7_AVX512F: u32 = 1 << 16;
const ECX7_PKU: u32 = 1 << 3;
const EDX7_AMX_TILE: u32 = 1 << 24;
/// Size of the legacy XSAVE area plus header (x87 and SSE state).
const XSAVE_LEGACY_SIZE: u32 = 576;

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
        .copied()
}

/// Makes leaf 0xd agree with the feature bits: an XSAVE component whose feature is not
/// advertised is removed, and the size fields are recomputed. Nested KVM can report AVX
/// state in leaf 0xd without AVX in leaf 1, which makes Linux's xstate set-up fail.
///
/// With `legacy_only`, XSAVE is hidden altogether (the guest uses FXSAVE) and so is the
/// AVX family:
/// nested KVM on an emulated host can leave leaf 0xd's size for the enabled state stale,
/// which Linux 6.18 turns into a NULL dereference at boot.
pub fn sanitize_xstate(entries: &mut [kvm_cpuid_entry2], legacy_only: bool) {
    if legacy_only {
        for e in entries.iter_mut() {
            match (e.function, e.index) {
                (LEAF_FEATURES, _) => {
                    e.ecx &= !(ECX_AVX | ECX_FMA | ECX_F16C | ECX_XSAVE | ECX_OSXSAVE)
                }
                (LEAF_EXT_FEATURES, 0) => e.ebx &= !(EBX7_AVX2 | EBX7_AVX512_ALL),
                (LEAF_XSTATE, _) => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = 0;
                    e.edx = 0;
                }
                _ => {}
            }
        }
        return;
    }
    let leaf1 = find(entries, LEAF_FEATURES, 0).unwrap_or_default();
    let leaf7 = find(entries, LEAF_EXT_FEATURES, 0).unwrap_or_default();
    let mut allowed: u64 = 0b11;
    if leaf1.ecx & ECX_AVX != 0 {
        allowed |= 1 << 2;
    }
    if leaf7.ebx & EBX7_MPX != 0 {
        allowed |= 0b11 << 3;
    }
    if leaf7.ebx & EBX7_AVX512F != 0 && allowed & (1 << 2) != 0 {
        allowed |= 0b111 << 5;
    }
    if leaf7.ecx & ECX7_PKU != 0 {
        allowed |= 1 << 9;
    }
    if leaf7.edx & EDX7_AMX_TILE != 0 {
        allowed |= 0b11 << 17;
    }
    let Some(main) = find(entries, LEAF_XSTATE, 0) else {
        return;
    };
    let offered = u64::from(main.eax) | (u64::from(main.edx) << 32);
    let mask = offered & allowed;
    let mut max_size = XSAVE_LEGACY_SIZE;
    for e in entries
        .iter_mut()
        .filter(|e| e.function == LEAF_XSTATE && e.index >= 2)
    {
        if e.index < 64 && mask & (1 << e.index) != 0 {
            max_size = max_size.max(e.ebx.saturating_add(e.eax));
        } else if e.index < 64 && offered & (1 << e.index) != 0 {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
    }
    for e in entries
        .iter_mut()
        .filter(|e| e.function == LEAF_XSTATE && e.index == 0)
    {
        e.eax = mask as u32;
        e.edx = (mask >> 32) as u32;
        e.ebx = e.ebx.min(max_size);
        e.ecx = max_size;
    }
}

/// Rewrites the table in place for one vCPU.
pub fn adjust(entries: &mut [kvm_cpuid_entry2], topo: CpuTopology) {
    sanitize_xstate(entries, topo.legacy_xsave);
    let apic = u32::from(topo.apic_id);
    let count = u32::from(topo.count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC id, [23:16] logical CPUs per package,
                // [15:8] CLFLUSH line size in quadwords.
                e.ebx = (apic << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if topo.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                // EAX[31:26]: cores per package - 1; [25:14]: CPUs sharing this cache - 1.
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                // One thread per core, `count` cores in one package.
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = bits_for(topo.count);
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = apic;
            }
            LEAF_AMD_SIZES => {
                // ECX[15:12]: APIC-id bits for cores; [7:0]: cores per package - 1.
                e.ecx = (bits_for(topo.count) << 12) | (count - 1);
            }
            LEAF_AMD_TOPOLOGY => {
                e.eax = apic;
                e.ebx = apic & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ff12,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_hypervisor_bit() {
        let mut t = vec![
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x8000_0008, 0),
        ];
        adjust(
            &mut t,
            CpuTopology {
                apic_id: 3,
                count: 4,
                tsc_deadline: true,
                legacy_xsave: false,
            },
        );
        assert_eq!(t[0].ebx >> 24, 3);
        assert_eq!((t[0].ebx >> 16) & 0xff, 4);
        assert_eq!(t[0].ebx & 0xff, 0x12);
        assert_ne!(t[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(t[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(t[0].edx & EDX_HTT, 0);
        assert_eq!(t[1].edx, 3);
        assert_eq!(t[2].ebx, 4);
        assert_eq!(t[2].eax, 2);
        assert_eq!(t[3].ecx & 0xff, 3);
    }

    #[test]
    fn xstate_without_avx_drops_the_avx_component() {
        let mut t = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ecx: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                index: 0,
                eax: 7,
                ebx: 0x240,
                ecx: 0x340,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                index: 2,
                eax: 0x100,
                ebx: 0x240,
                ..Default::default()
            },
        ];
        sanitize_xstate(&mut t, false);
        assert_eq!((t[1].eax, t[1].ecx), (3, 576));
        assert_eq!(t[2].eax, 0);
        t[0].ecx = ECX_AVX;
        t[1].eax = 7;
        t[2].eax = 0x100;
        t[2].ebx = 0x240;
        sanitize_xstate(&mut t, false);
        assert_eq!((t[1].eax, t[1].ecx), (7, 832));
        t[0].ecx |= ECX_XSAVE;
        sanitize_xstate(&mut t, true);
        assert_eq!((t[1].eax, t[1].ecx), (0, 0));
        assert_eq!(t[0].ecx & ECX_XSAVE, 0);
        assert_eq!(t[0].ecx & ECX_AVX, 0);
    }

    #[test]
    fn bit_widths() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(32), 5);
    }
}
