//! Loading a Linux kernel, its initrd and command line into guest memory.

pub mod params;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START, ZERO_PAGE_START};
use params::{BootParamsSpec, build_boot_params};

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Default highest initrd address when the header gives none.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Why the guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be read.
    #[error("cannot read kernel image {0}")]
    KernelIo(String, #[source] std::io::Error),
    /// The image is neither a bzImage nor an x86_64 ELF.
    #[error("kernel image {0} is neither a bzImage nor a 64-bit ELF vmlinux")]
    UnknownFormat(String),
    /// linux-loader refused the image.
    #[error("kernel image {0} is malformed")]
    Load(String, #[source] linux_loader::loader::Error),
    /// The initrd cannot be read.
    #[error("cannot read initrd {0}")]
    InitrdIo(String, #[source] std::io::Error),
    /// The initrd does not fit in guest RAM above the kernel.
    #[error("initrd of {size} bytes does not fit in guest RAM above the kernel")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
    },
    /// The command line was refused.
    #[error("kernel command line is invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// PVH boot was asked for but the image has no PVH entry.
    #[error("kernel image {0} has no Xen PVH entry note (PVH boot needs an ELF vmlinux with one)")]
    NoPvhEntry(String),
    /// Writing to guest memory failed.
    #[error("cannot write {0} into guest memory")]
    GuestWrite(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// Linux 64-bit boot protocol: long mode, zero page in RSI.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, start info in EBX.
    Pvh,
}

/// Where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    /// Entry point.
    pub rip: u64,
    /// Guest address of the zero page (Linux64) or the start info (PVH).
    pub zero_page: u64,
    /// The protocol.
    pub mode: BootMode,
}

enum Format {
    BzImage,
    Elf,
}

fn detect_format(file: &mut File) -> std::io::Result<Option<Format>> {
    let mut head = [0u8; 0x210];
    file.seek(SeekFrom::Start(0))?;
    let n = read_up_to(file, &mut head)?;
    file.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == [0x7f, b'E', b'L', b'F'] {
        return Ok(Some(Format::Elf));
    }
    if n >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(Some(Format::BzImage));
    }
    Ok(None)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads kernel, command line, initrd and zero page; returns the entry point.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    ram_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    pvh: bool,
) -> Result<BootEntry, BootError> {
    let kname = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|e| BootError::KernelIo(kname.clone(), e))?;
    let format = detect_format(&mut file)
        .map_err(|e| BootError::KernelIo(kname.clone(), e))?
        .ok_or_else(|| BootError::UnknownFormat(kname.clone()))?;
    let high = Some(GuestAddress(HIGH_MEMORY_START));
    let (result, rip): (KernelLoaderResult, u64) = match format {
        Format::BzImage => {
            let r = BzImage::load(mem, None, &mut file, high)
                .map_err(|e| BootError::Load(kname.clone(), e))?;
            let rip = r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
            (r, rip)
        }
        Format::Elf => {
            let r = Elf::load(mem, None, &mut file, high)
                .map_err(|e| BootError::Load(kname.clone(), e))?;
            let rip = r.kernel_load.0;
            (r, rip)
        }
    };
    let pvh_entry = match (pvh, &result.pvh_boot_cap) {
        (false, _) => None,
        (true, PvhBootCapability::PvhEntryPresent(entry)) => Some(entry.0),
        (true, _) => return Err(BootError::NoPvhEntry(kname)),
    };

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cl.insert_str(cmdline).map_err(BootError::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(|_| {
        BootError::GuestWrite(
            "command line",
            vm_memory::GuestMemoryError::InvalidBackendAddress,
        )
    })?;
    let cmdline_size = cl
        .as_cstring()
        .map(|c| c.as_bytes_with_nul().len())
        .unwrap_or(1) as u32;

    let initrd_place = match initrd {
        Some(path) => {
            let max = result
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|m| *m != 0)
                .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
            Some(load_initrd(mem, ram_bytes, result.kernel_end, max, path)?)
        }
        None => None,
    };

    if let Some(entry) = pvh_entry {
        let info = pvh::write_start_info(mem, ram_bytes, initrd_place)?;
        return Ok(BootEntry {
            rip: entry,
            zero_page: info,
            mode: BootMode::Pvh,
        });
    }
    let zp = build_boot_params(&BootParamsSpec {
        header: result.setup_header,
        cmdline_addr: CMDLINE_START,
        cmdline_size,
        initrd: initrd_place,
        ram_bytes,
    });
    mem.write_obj(zp, GuestAddress(ZERO_PAGE_START))
        .map_err(|e| BootError::GuestWrite("boot parameters", e))?;
    Ok(BootEntry {
        rip,
        zero_page: ZERO_PAGE_START,
        mode: BootMode::Linux64,
    })
}

/// Places the initrd as high as allowed, page aligned, above the kernel.
fn load_initrd(
    mem: &GuestMemoryMmap,
    ram_bytes: u64,
    kernel_end: u64,
    addr_max: u64,
    path: &Path,
) -> Result<(u64, u32), BootError> {
    let name = path.display().to_string();
    let data = std::fs::read(path).map_err(|e| BootError::InitrdIo(name, e))?;
    let size = data.len() as u64;
    let top = ram_bytes.min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end && size <= u64::from(u32::MAX) => a,
        _ => return Err(BootError::InitrdTooLarge { size }),
    };
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite("initrd", e))?;
    Ok((addr, size as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn garbage_kernel_is_refused_not_panicking() {
        let dir = std::env::temp_dir().join(format!("ebb-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, content) in [
            ("empty", Vec::new()),
            ("junk", vec![0x5au8; 10_000]),
            ("elfhead", b"\x7fELF\x02\x01\x01".to_vec()),
            ("hdrs", {
                let mut v = vec![0u8; 0x300];
                v[0x202..0x206].copy_from_slice(b"HdrS");
                v
            }),
        ] {
            let p = dir.join(name);
            std::fs::File::create(&p)
                .unwrap()
                .write_all(&content)
                .unwrap();
            let r = load_linux(&mem(), 64 << 20, &p, None, "console=ttyS0", false);
            assert!(r.is_err(), "{name} was accepted");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let dir = std::env::temp_dir().join(format!("ebb-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("initrd");
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let (addr, size) = load_initrd(&mem(), 64 << 20, 0x20_0000, u64::MAX, &p).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr & 0xfff, 0);
        assert!(addr + 10_000 <= 64 << 20);
        let big = load_initrd(&mem(), 64 << 20, (64 << 20) - 4096, u64::MAX, &p);
        assert!(matches!(big, Err(BootError::InitrdTooLarge { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
