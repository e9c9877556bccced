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
}

fn bits_for(count: u8) -> u32 {
    // Number of APIC-id bits needed to number `count` CPUs: ceil(log2(count)).
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Rewrites the table in place for one vCPU.
pub fn adjust(entries: &mut [kvm_cpuid_entry2], topo: CpuTopology) {
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
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; [25:14]: CPUs sharing this cache - 1.
                if e.eax & 0x1f != 0 {
                    e.eax = (e.eax & 0x3fff) | ((count - 1) << 26);
                }
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
    fn bit_widths() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(32), 5);
    }
}
