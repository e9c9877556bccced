//! The guest-physical address map ebb presents to an x86_64 guest.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (RAM, reserved by the guest itself)
//! 0x0000_0500  GDT              0x0000_0520  IDT
//! 0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  initial stack    0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  end of low RAM (EBDA and legacy hole reserved up to 1 MiB)
//! 0x000e_0000  ACPI tables (RSDP first, inside the BIOS scan window)
//! 0x0010_0000  kernel, then the rest of RAM up to MMIO_GAP_START
//! 0xd000_0000  virtio-mmio devices, one 4 KiB window each
//! 0xfec0_0000  IOAPIC           0xfee0_0000  local APIC
//! ```

/// Start of the 32-bit global descriptor table.
pub const GDT_START: u64 = 0x500;
/// Start of the (empty) interrupt descriptor table.
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level identity page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the identity map.
pub const PDPTE_START: u64 = 0xa000;
/// First of the page directories of the identity map (4 tables, 4 GiB).
pub const PDE_START: u64 = 0xb000;
/// Number of page directories used by the boot identity map (one per GiB).
pub const PDE_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line ebb writes (bytes, including the terminating NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the region between low RAM and the kernel that is not usable RAM.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the ACPI tables are written (RSDP first).
pub const ACPI_START: u64 = 0xe0000;
/// Size reserved for the ACPI tables.
pub const ACPI_SIZE: u64 = 0x20000;
/// Start of high memory; the kernel is loaded here.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// End of guest RAM: everything above is device space.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC base address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) lives just below the BIOS area at the top of 4 GiB.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for real mode, right after the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Where the memslot that makes KVM drop its nested tables lives for an instant (see
/// `kvm::Vm::zap_nested_tables`): above 4 GiB, where the guest has neither RAM nor devices.
pub const ZAP_SLOT_GPA: u64 = 0x1_0000_0000;

/// IOAPIC pin of the COM1 serial port.
pub const SERIAL_IRQ: u32 = 4;
/// First IOAPIC pin handed to virtio-mmio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IOAPIC pin (the KVM IOAPIC has 24).
pub const IRQ_MAX: u32 = 23;

/// COM1 I/O port base.
pub const COM1_PORT: u16 = 0x3f8;
/// ACPI sleep control register (hardware-reduced, one byte).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (one byte).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register (one byte).
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the guest writes to the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;
/// i8042 command port: writing 0xfe pulses the CPU reset line.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;

/// Smallest guest RAM ebb accepts, in MiB.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Largest guest RAM ebb accepts, in MiB: RAM must end below the MMIO gap.
pub const MAX_MEMORY_MIB: u64 = MMIO_GAP_START >> 20;
/// Largest number of vCPUs (one IOAPIC, xAPIC ids, MADT sized for it).
pub const MAX_VCPUS: u8 = 32;
