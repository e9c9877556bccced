//! Hostile input: every bad range or address gives a clear error and leaves
//! the tree exactly as it was.
#![cfg(not(loom))]

use guest_mm::range::GPA_LIMIT;
use guest_mm::{
    BLOCK_SIZE, GpaRange, PAGE_SIZE, PageSize, RangeError, Strategy, TableError, Tables,
};

fn populated() -> Tables {
    let t = Tables::new(Strategy::Scan);
    for p in 0..4 {
        t.populate(p * PAGE_SIZE, p * PAGE_SIZE, PageSize::Size4K)
            .unwrap();
    }
    t
}

fn unchanged(t: &Tables, before: &guest_mm::TableStats) {
    assert_eq!(&t.stats(), before);
    assert_eq!(t.recount(), *before);
    for p in 0..4 {
        assert!(t.lookup(p * PAGE_SIZE).is_some());
    }
}

#[test]
fn bad_ranges_are_rejected_with_the_reason() {
    let cases: [(u64, u64, RangeError); 6] = [
        (1, PAGE_SIZE, RangeError::UnalignedStart { start: 1 }),
        (0, 100, RangeError::UnalignedLen { len: 100 }),
        (PAGE_SIZE, 0, RangeError::Empty { start: PAGE_SIZE }),
        (
            u64::MAX - PAGE_SIZE + 1,
            PAGE_SIZE,
            RangeError::Overflow {
                start: u64::MAX - PAGE_SIZE + 1,
                len: PAGE_SIZE,
            },
        ),
        (
            GPA_LIMIT,
            PAGE_SIZE,
            RangeError::OutOfSpace {
                end: GPA_LIMIT + PAGE_SIZE,
            },
        ),
        (
            0,
            GPA_LIMIT + PAGE_SIZE,
            RangeError::OutOfSpace {
                end: GPA_LIMIT + PAGE_SIZE,
            },
        ),
    ];
    for (start, len, want) in cases {
        assert_eq!(GpaRange::new(start, len), Err(want), "{start:#x}+{len:#x}");
        // The message names the failed check.
        assert!(!want.to_string().is_empty());
    }
    assert!(GpaRange::from_bounds(2 * PAGE_SIZE, PAGE_SIZE).is_err());
}

#[test]
fn bad_populates_change_nothing() {
    let t = populated();
    let before = t.stats();
    let bad = [
        (GPA_LIMIT, 0, PageSize::Size4K),
        (!0xfff, 0, PageSize::Size4K),
        (GPA_LIMIT - PAGE_SIZE, 0, PageSize::Size2M),
        (0x1001, 0, PageSize::Size4K),
        (PAGE_SIZE, 0, PageSize::Size2M),
        (BLOCK_SIZE, 0x1234, PageSize::Size4K),
        (BLOCK_SIZE, PAGE_SIZE, PageSize::Size2M),
        (BLOCK_SIZE, 1 << 52, PageSize::Size4K),
        (BLOCK_SIZE, !0x1f_ffff, PageSize::Size2M),
        (0, 0, PageSize::Size2M), // 4K mappings already there
    ];
    for (gpa, off, size) in bad {
        let err = t.populate(gpa, off, size).unwrap_err();
        assert!(!err.to_string().is_empty());
        unchanged(&t, &before);
    }
    assert!(matches!(
        t.populate(GPA_LIMIT, 0, PageSize::Size4K),
        Err(TableError::OutOfSpace { .. })
    ));
    assert!(matches!(
        t.populate(0x1001, 0, PageSize::Size4K),
        Err(TableError::UnalignedGpa { .. })
    ));
    assert!(matches!(
        t.populate(BLOCK_SIZE, 0x10, PageSize::Size4K),
        Err(TableError::UnalignedHostOffset { .. })
    ));
    assert!(matches!(
        t.populate(BLOCK_SIZE, 1 << 52, PageSize::Size4K),
        Err(TableError::HostOffsetTooLarge { .. })
    ));
    // The largest valid offset still fits.
    t.populate(BLOCK_SIZE, (1 << 52) - PAGE_SIZE, PageSize::Size4K)
        .unwrap();
    assert_eq!(
        t.lookup(BLOCK_SIZE).unwrap().host_offset,
        (1 << 52) - PAGE_SIZE
    );
}

#[test]
fn lookups_outside_the_space_find_nothing() {
    let t = populated();
    let before = t.stats();
    for gpa in [GPA_LIMIT, GPA_LIMIT + PAGE_SIZE, u64::MAX, 1 << 63] {
        assert_eq!(t.lookup(gpa), None);
    }
    unchanged(&t, &before);
}

#[test]
fn errors_carry_their_source() {
    let err: TableError = GpaRange::new(0, 0).unwrap_err().into();
    let src = std::error::Error::source(&err).expect("range error is the source");
    assert!(src.to_string().contains("empty"));
}
