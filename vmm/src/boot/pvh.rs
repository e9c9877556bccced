//! The PVH boot protocol: the kernel starts at its Xen PVH ELF note's entry in 32-bit protected
//! mode, paging off, with EBX pointing at an `hvm_start_info` that names the command line, the
//! initrd (as module 0), the memory map and the RSDP.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use super::params::e820_map;
use crate::layout::{ACPI_START, CMDLINE_START, PVH_INFO_START};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// `hvm_start_info` as bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
/// A module list entry as bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModEntry(hvm_modlist_entry);
/// A memory map entry as bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemEntry(hvm_memmap_table_entry);

// SAFETY: the three wrapped structs are `repr(C)` integers only, without padding holes that
// could expose uninitialised bytes (the reserved fields are explicit); any bit pattern is valid.
unsafe impl ByteValued for StartInfo {}
// SAFETY: as above.
unsafe impl ByteValued for ModEntry {}
// SAFETY: as above.
unsafe impl ByteValued for MemEntry {}

/// Writes the start info, module list and memory map; returns the start-info address.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    ram_bytes: u64,
    initrd: Option<(u64, u32)>,
) -> Result<u64, BootError> {
    let info_addr = PVH_INFO_START;
    let mod_addr = info_addr + std::mem::size_of::<StartInfo>() as u64;
    let map_addr = mod_addr + std::mem::size_of::<ModEntry>() as u64;
    let map = e820_map(ram_bytes);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: ACPI_START,
        memmap_paddr: map_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let entry = hvm_modlist_entry {
            paddr: addr,
            size: u64::from(size),
            ..Default::default()
        };
        mem.write_obj(ModEntry(entry), GuestAddress(mod_addr))
            .map_err(|e| BootError::GuestWrite("PVH module list", e))?;
        info.nr_modules = 1;
        info.modlist_paddr = mod_addr;
    }
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = map_addr + (i * std::mem::size_of::<MemEntry>()) as u64;
        mem.write_obj(MemEntry(entry), GuestAddress(at))
            .map_err(|e| BootError::GuestWrite("PVH memory map", e))?;
    }
    mem.write_obj(StartInfo(info), GuestAddress(info_addr))
        .map_err(|e| BootError::GuestWrite("PVH start info", e))?;
    Ok(info_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_layout() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let addr = write_start_info(&mem, 256 << 20, Some((0x80_0000, 4096))).unwrap();
        let info: StartInfo = mem.read_obj(GuestAddress(addr)).unwrap();
        let i = info.0;
        assert_eq!(
            (i.magic, i.version, i.nr_modules),
            (XEN_HVM_START_MAGIC, 1, 1)
        );
        assert_eq!(i.memmap_entries, 3);
        let m: ModEntry = mem.read_obj(GuestAddress(i.modlist_paddr)).unwrap();
        assert_eq!((m.0.paddr, m.0.size), (0x80_0000, 4096));
        let last: MemEntry = mem.read_obj(GuestAddress(i.memmap_paddr + 2 * 24)).unwrap();
        assert_eq!(last.0.addr + last.0.size, 256 << 20);
    }
}
