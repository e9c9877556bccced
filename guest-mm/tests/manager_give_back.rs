//! The balloon's give-back with whole-block release (`GuestMm::give_back_held`): a 2 MiB block
//! the balloon holds only in part keeps its pages, held and backed, and its 2 MiB leaf (no
//! split); once the balloon holds the whole block it goes in one release; pending pages taken
//! back are never released; `release_pending` releases the rest. On every backing.

mod manager_common;

use guest_mm::backing::ReleaseMode;
use guest_mm::manager::{BackingSpec, FaultConfig, GuestMm, RegionSpec, gpa_range};
use guest_mm::{BLOCK_SIZE, GpaRange, PAGE_SIZE, Strategy};
use manager_common::{MIB, read, settle, write};

const LEN: u64 = 16 * MIB;

fn pages(first: u64, n: u64) -> Vec<GpaRange> {
    (first..first + n)
        .map(|p| gpa_range(p * PAGE_SIZE, PAGE_SIZE).unwrap())
        .collect()
}

fn check(mm: &GuestMm, what: &str, resident: u64, held: u64, pending: u64) {
    settle(mm);
    assert_eq!(
        (
            mm.resident_pages().unwrap(),
            mm.held_pages(),
            mm.pending_pages()
        ),
        (resident, held, pending),
        "{what}: (resident, held, pending)"
    );
    if mm.tracks_faults() {
        let st = mm.stats().tables;
        assert_eq!(
            st.leaves_4k + 512 * st.leaves_2m,
            resident,
            "{what}: leaves"
        );
        assert_eq!(st.table_bytes, mm.tables().min_table_bytes(), "{what}");
    }
}

#[test]
fn partly_held_blocks_wait_for_the_whole_block() {
    let specs = [
        (
            "memfd",
            BackingSpec::Memfd {
                name: "ebb-give-back".into(),
                huge: true,
            },
            ReleaseMode::PunchHole,
            2,
        ),
        (
            "anonymous",
            BackingSpec::Anonymous { thp: false },
            ReleaseMode::DontNeed,
            2,
        ),
        (
            "untracked",
            BackingSpec::Anonymous { thp: false },
            ReleaseMode::DontNeed,
            0,
        ),
    ];
    for (name, backing, release, threads) in specs {
        let layout = [RegionSpec {
            gpa: 0,
            len: LEN,
            backing,
        }];
        let faults = FaultConfig {
            handler_threads: threads,
            ..FaultConfig::default()
        };
        let mm = GuestMm::new(&layout, Strategy::Count, release, faults)
            .expect("GuestMm (needs root for userfaultfd)");
        let all = LEN / PAGE_SIZE;
        for p in 0..all {
            write(&mm, p * PAGE_SIZE, p + 1);
        }
        check(&mm, name, all, 0, 0);
        let leaves_2m = mm.stats().tables.leaves_2m;

        // Half of block 0: held, nothing released, and a block-filled block stays one leaf.
        let s = mm.give_back_held(&pages(0, 256), true).unwrap();
        assert_eq!(s.host_bytes_released, 0, "{name}");
        check(&mm, name, all, 256, 256);
        assert_eq!(mm.stats().tables.leaves_2m, leaves_2m, "{name}: no split");
        assert_eq!(mm.stats().tables.splits, 0, "{name}: no split");
        assert_eq!(
            read(&mm, 3 * PAGE_SIZE),
            4,
            "{name}: a pending page keeps its data"
        );

        // The other half: the whole block goes in one release, without a split.
        let s = mm.give_back_held(&pages(256, 256), true).unwrap();
        assert_eq!(s.host_bytes_released, BLOCK_SIZE, "{name}");
        assert_eq!(s.blocks_released, 1, "{name}");
        check(&mm, name, all - 512, 512, 0);
        assert_eq!(mm.stats().tables.splits, 0, "{name}: no split");

        // Ten pages of block 1, five taken back before the release: only the other five go.
        mm.give_back_held(&pages(512 + 100, 10), true).unwrap();
        check(&mm, name, all - 512, 522, 10);
        mm.hold(&pages(512 + 100, 5), false).unwrap();
        check(&mm, name, all - 512, 517, 5);
        let s = mm.release_pending().unwrap();
        assert_eq!(s.host_bytes_released, 5 * PAGE_SIZE, "{name}");
        check(&mm, name, all - 517, 517, 0);
        assert_eq!(
            read(&mm, (512 + 100) * PAGE_SIZE),
            513 + 100,
            "{name}: taken back, kept"
        );
        assert_eq!(mm.release_pending().unwrap().host_bytes_released, 0);

        // Without deferral every page goes at once, as before.
        mm.give_back_held(&pages(1024, 3), false).unwrap();
        check(&mm, name, all - 520, 520, 0);

        // Refused requests change nothing.
        let outside = [gpa_range(LEN, PAGE_SIZE).unwrap()];
        assert!(mm.give_back_held(&outside, true).is_err());
        assert!(mm.hold(&outside, false).is_err());
        check(&mm, name, all - 520, 520, 0);
        // (A read maps the page again.)
        assert_eq!(read(&mm, (512 + 105) * PAGE_SIZE), 0, "{name}: released");
    }
}
