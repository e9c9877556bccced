use super::*;

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn tables() -> AcpiTables {
    let slots = [
        VirtioMmioSlot {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        },
        VirtioMmioSlot {
            base: 0xd000_1000,
            len: 0x1000,
            irq: 6,
        },
    ];
    build_tables(2, &slots).unwrap()
}

#[test]
fn checksums_and_lengths() {
    let t = tables();
    let (_, rsdp) = &t.blobs[0];
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0);
    assert_eq!(sum(rsdp), 0);
    for (_, b) in &t.blobs[1..] {
        assert_eq!(u32_at(b, 4) as usize, b.len(), "{:?}", &b[..4]);
        assert_eq!(sum(b), 0, "{:?}", &b[..4]);
    }
}

#[test]
fn pointers_chain_up() {
    let t = tables();
    let find = |sig: &[u8]| {
        t.blobs
            .iter()
            .find(|(_, b)| &b[..4] == sig)
            .unwrap()
            .clone()
    };
    let (xsdt_addr, xsdt) = find(b"XSDT");
    assert_eq!(u64_at(&t.blobs[0].1, 24), xsdt_addr);
    let (fadt_addr, fadt) = find(b"FACP");
    let (madt_addr, _) = find(b"APIC");
    assert_eq!(u64_at(&xsdt, 36), fadt_addr);
    assert_eq!(u64_at(&xsdt, 44), madt_addr);
    let (dsdt_addr, _) = find(b"DSDT");
    assert_eq!(u64_at(&fadt, FADT_X_DSDT), dsdt_addr);
    assert_eq!(fadt.len(), 276);
    assert_ne!(u32_at(&fadt, FADT_FLAGS) & FLAG_HW_REDUCED_ACPI, 0);
    // Sleep control register: I/O space, 8 bits, at the ACPI port.
    assert_eq!(fadt[FADT_SLEEP_CONTROL], 1);
    assert_eq!(
        u64_at(&fadt, FADT_SLEEP_CONTROL + 4),
        u64::from(ACPI_SLEEP_CONTROL_PORT)
    );
    // Everything lies in the reserved window, without overlap.
    let mut end = ACPI_START;
    for (addr, b) in &t.blobs {
        assert!(*addr >= end);
        end = addr + b.len() as u64;
    }
    assert!(end <= ACPI_START + ACPI_SIZE);
}

#[test]
fn madt_lists_every_cpu_and_the_ioapic() {
    let t = build_tables(4, &[]).unwrap();
    let madt = &t.blobs.iter().find(|(_, b)| &b[..4] == b"APIC").unwrap().1;
    assert_eq!(u32_at(madt, 36), APIC_START as u32);
    let mut off = 44;
    let mut lapics = Vec::new();
    let mut ioapic = None;
    while off < madt.len() {
        let (kind, len) = (madt[off], madt[off + 1] as usize);
        assert!(len >= 2);
        match kind {
            0 => lapics.push((madt[off + 3], u32_at(madt, off + 4))),
            1 => ioapic = Some(u32_at(madt, off + 4)),
            _ => {}
        }
        off += len;
    }
    assert_eq!(off, madt.len());
    assert_eq!(lapics, vec![(0, 1), (1, 1), (2, 1), (3, 1)]);
    assert_eq!(ioapic, Some(IOAPIC_START as u32));
}

#[test]
fn dsdt_describes_devices() {
    let t = tables();
    let dsdt = &t.blobs.iter().find(|(_, b)| &b[..4] == b"DSDT").unwrap().1;
    assert!(contains(dsdt, b"LNRO0005"));
    assert!(contains(dsdt, b"COM1"));
    assert!(contains(dsdt, b"V001"));
    assert!(contains(dsdt, b"_S5_"));
    // Memory32Fixed descriptor (0x86) for the second window.
    let mut desc = vec![0x86, 9, 0, 1];
    desc.extend_from_slice(&0xd000_1000u32.to_le_bytes());
    assert!(contains(dsdt, &desc));
}

#[test]
fn too_many_devices_do_not_fit() {
    let slots: Vec<_> = (0..4000)
        .map(|i| VirtioMmioSlot {
            base: 0xd000_0000 + i * 0x1000,
            len: 0x1000,
            irq: 5,
        })
        .collect();
    assert!(matches!(
        build_tables(1, &slots),
        Err(AcpiError::TooLarge(_))
    ));
}
