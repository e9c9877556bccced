//! The Linux zero page (`struct boot_params`) and the e820 memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::ByteValued;

use crate::layout::{ACPI_START, EBDA_START, HIGH_MEMORY_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const E820_MAX: usize = 128;

/// `boot_params` as plain bytes for guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct ZeroPage(pub boot_params);

// SAFETY: `boot_params` is a `repr(C, packed)` struct of integers and arrays of integers:
// every bit pattern is valid and it has no padding or references.
unsafe impl ByteValued for ZeroPage {}

/// One range of the guest's memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest-physical byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The e820 map for `ram_bytes` of RAM starting at guest-physical 0.
pub fn e820_map(ram_bytes: u64) -> Vec<E820Entry> {
    vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIGH_MEMORY_START - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIGH_MEMORY_START,
            size: ram_bytes.saturating_sub(HIGH_MEMORY_START),
            kind: E820_RAM,
        },
    ]
}

/// What the zero page must say.
#[derive(Debug, Clone)]
pub struct BootParamsSpec {
    /// The kernel's own setup header (bzImage), or `None` for an ELF kernel.
    pub header: Option<setup_header>,
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Command line length including the NUL.
    pub cmdline_size: u32,
    /// Initrd placement (address, size).
    pub initrd: Option<(u64, u32)>,
    /// Guest RAM size.
    pub ram_bytes: u64,
}

/// Builds the zero page; fails only if the e820 map does not fit.
pub fn build_boot_params(spec: &BootParamsSpec) -> ZeroPage {
    let mut params = boot_params::default();
    let mut hdr = spec.header.unwrap_or_default();
    if spec.header.is_none() {
        hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        hdr.header = KERNEL_HDR_MAGIC;
        hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    // The layout keeps the command line below 4 GiB.
    hdr.cmd_line_ptr = spec.cmdline_addr as u32;
    hdr.cmdline_size = spec.cmdline_size;
    if let Some((addr, size)) = spec.initrd {
        // initrd placement is bounded by guest RAM, which ends below 4 GiB.
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = ACPI_START;
    let map = e820_map(spec.ram_bytes);
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter().take(E820_MAX)) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = map.len().min(E820_MAX) as u8;
    ZeroPage(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_the_legacy_hole() {
        let map = e820_map(256 << 20);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(map[1].kind, E820_RESERVED);
        assert_eq!(map[1].addr + map[1].size, 0x10_0000);
        assert_eq!(map[2].addr + map[2].size, 256 << 20);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (256 << 20) - (0x10_0000 - 0x9fc00));
    }

    #[test]
    fn zero_page_fields() {
        let zp = build_boot_params(&BootParamsSpec {
            header: None,
            cmdline_addr: 0x20000,
            cmdline_size: 12,
            initrd: Some((0x800_0000, 4096)),
            ram_bytes: 512 << 20,
        });
        let p = zp.0;
        let (flag, magic, loader) = (p.hdr.boot_flag, p.hdr.header, p.hdr.type_of_loader);
        assert_eq!((flag, magic, loader), (0xaa55, 0x5372_6448, 0xff));
        let (ptr, size, rd, rds) = (
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
        );
        assert_eq!((ptr, size, rd, rds), (0x20000, 12, 0x800_0000, 4096));
        assert_eq!(p.e820_entries, 3);
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, ACPI_START);
        // The zero page is one 4 KiB page.
        assert_eq!(std::mem::size_of::<ZeroPage>(), 4096);
        let bytes = zp.as_slice();
        assert_eq!(bytes[0x1e8], 3);
        assert_eq!(&bytes[0x1fe..0x200], &[0x55, 0xaa]);
    }
}
