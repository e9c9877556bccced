//! The DSDT: COM1, one `LNRO0005` device per virtio-mmio window, and the S5 sleep state.

use acpi_tables::Aml;
use acpi_tables::aml::{
    Device, EISAName, IO, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate,
};
use acpi_tables::sdt::Sdt;

use crate::devices::power::S5_SLEEP_TYPE;
use crate::layout::{COM1_PORT, SERIAL_IRQ};

/// One virtio-mmio window as the guest must see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Guest-physical base of the register window.
    pub base: u32,
    /// Window length.
    pub len: u32,
    /// IOAPIC pin (GSI).
    pub irq: u32,
}

/// Builds the DSDT.
pub fn build_dsdt(virtio: &[VirtioMmioSlot]) -> Sdt {
    let mut aml = Vec::new();

    let com1_io = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    Device::new(
        Path::new("_SB_.COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &0u8),
            &Name::new(Path::new("_CRS"), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut aml);

    for (i, slot) in virtio.iter().enumerate() {
        let mem = Memory32Fixed::new(true, slot.base, slot.len);
        // Edge-triggered, active high, exclusive: the irqfd pulses the line.
        let irq = Interrupt::new(true, true, false, false, slot.irq);
        let crs = ResourceTemplate::new(vec![&mem, &irq]);
        let uid = i as u32;
        Device::new(
            Path::new(&format!("_SB_.V{i:03X}")),
            vec![
                &Name::new(Path::new("_HID"), &"LNRO0005"),
                &Name::new(Path::new("_UID"), &uid),
                &Name::new(Path::new("_CCA"), &1u8),
                &Name::new(Path::new("_CRS"), &crs),
            ],
        )
        .to_aml_bytes(&mut aml);
    }

    let s5 = Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &0u8, &0u8]);
    Name::new(Path::new("_S5_"), &s5).to_aml_bytes(&mut aml);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, *b"EBBVMM", *b"EBBDSDT ", 1);
    dsdt.append_slice(&aml);
    dsdt
}
