//! ACPI tables for a hardware-reduced x86 microVM: RSDP, XSDT, FADT, MADT and DSDT.
//!
//! The guest finds its CPUs and IOAPIC in the MADT (Debian kernels have no MP-table
//! parsing), COM1 and every virtio-mmio window in the DSDT, and powers off through the
//! FADT's sleep control register.

mod dsdt;

use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SIZE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT,
    ACPI_START, APIC_START, IOAPIC_START,
};
pub use dsdt::{VirtioMmioSlot, build_dsdt};

const OEM_ID: [u8; 6] = *b"EBBVMM";
const FADT_LEN: u32 = 276;
const FADT_DSDT: usize = 40;
const FADT_IAPC_BOOT_ARCH: usize = 109;
const FADT_FLAGS: usize = 112;
const FADT_RESET_REG: usize = 116;
const FADT_RESET_VALUE: usize = 128;
const FADT_MINOR_VERSION: usize = 131;
const FADT_X_DSDT: usize = 140;
const FADT_SLEEP_CONTROL: usize = 244;
const FADT_SLEEP_STATUS: usize = 256;
const FADT_HYPERVISOR_ID: usize = 268;

const FLAG_PWR_BUTTON: u32 = 1 << 4;
const FLAG_SLP_BUTTON: u32 = 1 << 5;
const FLAG_RESET_REG_SUP: u32 = 1 << 10;
const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

const MADT_TYPE_LAPIC: u8 = 0;
const MADT_TYPE_IOAPIC: u8 = 1;
const MADT_TYPE_LAPIC_NMI: u8 = 4;
const MADT_FLAG_PCAT_COMPAT: u32 = 1;

/// Why the tables could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the reserved window.
    #[error("ACPI tables need {0} bytes, more than the reserved window")]
    TooLarge(u64),
    /// Writing to guest memory failed.
    #[error("cannot write the ACPI tables into guest memory")]
    GuestWrite(#[source] vm_memory::GuestMemoryError),
}

/// The tables with the guest addresses they belong at.
pub struct AcpiTables {
    /// (guest address, bytes), RSDP first.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

fn fadt(dsdt_addr: u64) -> Sdt {
    let mut t = Sdt::new(*b"FACP", FADT_LEN, 6, OEM_ID, *b"EBBFADT ", 1);
    // The 32-bit DSDT pointer stays 0: the 64-bit one below is authoritative.
    t.write_u32(FADT_DSDT, 0);
    t.write_u16(
        FADT_IAPC_BOOT_ARCH,
        BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_CMOS_RTC_NOT_PRESENT,
    );
    t.write_u32(
        FADT_FLAGS,
        FLAG_PWR_BUTTON | FLAG_SLP_BUTTON | FLAG_RESET_REG_SUP | FLAG_HW_REDUCED_ACPI,
    );
    t.write(
        FADT_RESET_REG,
        GenericAddress::io_port_address::<u8>(ACPI_RESET_PORT),
    );
    t.write_u8(FADT_RESET_VALUE, ACPI_RESET_VALUE);
    t.write_u8(FADT_MINOR_VERSION, 5);
    t.write_u64(FADT_X_DSDT, dsdt_addr);
    t.write(
        FADT_SLEEP_CONTROL,
        GenericAddress::io_port_address::<u8>(ACPI_SLEEP_CONTROL_PORT),
    );
    t.write(
        FADT_SLEEP_STATUS,
        GenericAddress::io_port_address::<u8>(ACPI_SLEEP_STATUS_PORT),
    );
    t.write_u64(FADT_HYPERVISOR_ID, u64::from_le_bytes(*b"EBBVMM\0\0"));
    t
}

fn madt(vcpus: u8) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"EBBMADT ", 1);
    // Local APIC address and flags follow the header.
    t.write_u32(36, APIC_START as u32);
    t.write_u32(40, MADT_FLAG_PCAT_COMPAT);
    let mut body = Vec::new();
    for id in 0..vcpus {
        body.extend_from_slice(&[MADT_TYPE_LAPIC, 8, id, id]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    body.extend_from_slice(&[MADT_TYPE_IOAPIC, 12, 0, 0]);
    body.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // LINT1 of every processor is the NMI input.
    body.extend_from_slice(&[MADT_TYPE_LAPIC_NMI, 6, 0xff, 0, 0, 1]);
    t.append_slice(&body);
    t
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Builds all tables for `vcpus` CPUs and the given virtio-mmio windows.
pub fn build_tables(vcpus: u8, virtio: &[VirtioMmioSlot]) -> Result<AcpiTables, AcpiError> {
    // Device names are V000..VFFF; more could not be named (nor fit).
    if virtio.len() > 0xfff {
        return Err(AcpiError::TooLarge(virtio.len() as u64 * 64));
    }
    let rsdp_addr = ACPI_START;
    let dsdt_addr = align8(rsdp_addr + Rsdp::len() as u64);
    let dsdt = build_dsdt(virtio);
    let fadt_addr = align8(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align8(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let xsdt_addr = align8(madt_addr + madt.len() as u64);
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, *b"EBBXSDT ", 1);
    let mut entries = Vec::new();
    for a in [fadt_addr, madt_addr] {
        entries.extend_from_slice(&a.to_le_bytes());
    }
    xsdt.append_slice(&entries);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > ACPI_START + ACPI_SIZE {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);
    let rsdp_bytes = zerocopy_bytes(&rsdp);
    Ok(AcpiTables {
        blobs: vec![
            (rsdp_addr, rsdp_bytes),
            (dsdt_addr, dsdt.as_slice().to_vec()),
            (fadt_addr, fadt.as_slice().to_vec()),
            (madt_addr, madt.as_slice().to_vec()),
            (xsdt_addr, xsdt.as_slice().to_vec()),
        ],
    })
}

fn zerocopy_bytes(rsdp: &Rsdp) -> Vec<u8> {
    let mut v = Vec::new();
    acpi_tables::Aml::to_aml_bytes(rsdp, &mut v);
    v
}

/// Writes the tables into guest memory.
pub fn write_tables(mem: &GuestMemoryMmap, tables: &AcpiTables) -> Result<(), AcpiError> {
    for (addr, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(AcpiError::GuestWrite)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
