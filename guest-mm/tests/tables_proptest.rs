//! Random sequences of populate (4K and 2M), discard, lazy marking, sweep
//! and lookup, checked against a model map, for every strategy.
//!
//! After every discard with `Scan` and `Count`: no empty table remains, the
//! counters equal a recount of the tree, table bytes equal the minimum for
//! the leaves present, and lookups in the range agree with the model.
#![cfg(not(loom))]

use std::collections::{BTreeMap, BTreeSet};

use guest_mm::{
    BLOCK_SIZE, GpaRange, Leaf, PAGE_SIZE, PageSize, Populate, Strategy, TableError, Tables,
    min_table_bytes, range::GPA_LIMIT,
};
use proptest::prelude::{
    ProptestConfig, TestCaseError, prop_assert, prop_assert_eq, prop_oneof, proptest,
};
use proptest::strategy::Strategy as _;

/// Region bases: two PDs in one PDPT, and a second PDPT.
const REGIONS: [u64; 3] = [0, 1 << 30, 1 << 39];
const BLOCKS_PER_REGION: u64 = 3;
const PAGES_PER_REGION: u64 = BLOCKS_PER_REGION * BLOCK_SIZE / PAGE_SIZE;

#[derive(Debug, Clone)]
enum Op {
    Populate4K {
        region: usize,
        page: u64,
    },
    Populate2M {
        region: usize,
        block: u64,
    },
    Discard {
        region: usize,
        page: u64,
        pages: u64,
    },
    MarkLazy {
        region: usize,
        page: u64,
        pages: u64,
    },
    Reclaim {
        region: usize,
        page: u64,
        pages: u64,
    },
    Lookup {
        region: usize,
        page: u64,
    },
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    let region = 0..REGIONS.len();
    let page = 0..PAGES_PER_REGION;
    prop_oneof![
        6 => (region.clone(), page.clone()).prop_map(|(region, page)| Op::Populate4K { region, page }),
        2 => (region.clone(), 0..BLOCKS_PER_REGION)
            .prop_map(|(region, block)| Op::Populate2M { region, block }),
        4 => (region.clone(), page.clone(), 1..700u64)
            .prop_map(|(region, page, pages)| Op::Discard { region, page, pages }),
        1 => (region.clone(), page.clone(), 1..700u64)
            .prop_map(|(region, page, pages)| Op::MarkLazy { region, page, pages }),
        1 => (region.clone(), page.clone(), 1..1600u64)
            .prop_map(|(region, page, pages)| Op::Reclaim { region, page, pages }),
        2 => (region, page).prop_map(|(region, page)| Op::Lookup { region, page }),
    ]
}

/// The model: every mapped 4 KiB page, and which blocks hold a PT table.
#[derive(Default)]
struct Model {
    pages: BTreeMap<u64, Leaf>,
    pt_blocks: BTreeSet<u64>,
}

fn block_of(gpa: u64) -> u64 {
    gpa & !(BLOCK_SIZE - 1)
}

impl Model {
    fn has_2m(&self, block: u64) -> bool {
        self.pages
            .get(&block)
            .is_some_and(|l| l.size == PageSize::Size2M)
    }

    fn leaves_in_block(&self, block: u64) -> bool {
        self.pages.range(block..block + BLOCK_SIZE).next().is_some()
    }

    /// Turns a 2M leaf into 512 4K leaves with the same offsets.
    fn split(&mut self, block: u64) {
        if self.has_2m(block) {
            for p in 0..BLOCK_SIZE / PAGE_SIZE {
                if let Some(l) = self.pages.get_mut(&(block + p * PAGE_SIZE)) {
                    l.size = PageSize::Size4K;
                }
            }
            self.pt_blocks.insert(block);
        }
    }

    /// Splits the 2M leaves a range covers only in part.
    fn split_partial(&mut self, r: GpaRange) {
        let mut b = block_of(r.start());
        while b < r.end() {
            let whole = r.start() <= b && r.end() >= b + BLOCK_SIZE;
            if !whole {
                self.split(b);
            }
            b += BLOCK_SIZE;
        }
    }

    fn min_bytes(&self) -> u64 {
        min_table_bytes(self.pages.iter().map(|(&g, l)| (g, l.size)))
    }
}

fn range_of(region: usize, page: u64, pages: u64) -> GpaRange {
    let start = REGIONS[region] + page * PAGE_SIZE;
    let end = (start + pages * PAGE_SIZE).min(REGIONS[region] + PAGES_PER_REGION * PAGE_SIZE);
    GpaRange::from_bounds(start, end).expect("generated ranges are valid")
}

fn check_quiescent(t: &Tables, model: &Model, strategy: Strategy) -> Result<(), TestCaseError> {
    prop_assert_eq!(t.stats(), t.recount());
    prop_assert!(t.audit().is_ok(), "{:?}", t.audit());
    let st = t.stats();
    let min = model.min_bytes();
    prop_assert_eq!(t.min_table_bytes(), min);
    prop_assert_eq!(st.leaves_4k + 512 * st.leaves_2m, model.pages.len() as u64);
    if strategy == Strategy::Off {
        prop_assert!(st.table_bytes >= min);
    } else {
        prop_assert_eq!(t.empty_tables(GpaRange::new(0, GPA_LIMIT).unwrap()), 0);
        prop_assert_eq!(st.table_bytes, min);
    }
    Ok(())
}

fn check_lookups(t: &Tables, model: &Model, r: GpaRange) -> Result<(), TestCaseError> {
    let mut gpa = r.start();
    while gpa < r.end() {
        prop_assert_eq!(
            t.lookup(gpa),
            model.pages.get(&gpa).copied(),
            "gpa {:#x}",
            gpa
        );
        gpa += PAGE_SIZE;
    }
    Ok(())
}

fn run(strategy: Strategy, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let t = Tables::new(strategy);
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Populate4K { region, page } => {
                let gpa = REGIONS[region] + page * PAGE_SIZE;
                let off = gpa ^ 0x5_0000_0000;
                let got = t.populate(gpa, off, PageSize::Size4K).unwrap();
                match m.pages.get(&gpa) {
                    Some(l) => prop_assert_eq!(got, Populate::Present(*l)),
                    None => {
                        prop_assert_eq!(got, Populate::Installed);
                        let leaf = Leaf {
                            host_offset: off,
                            size: PageSize::Size4K,
                            lazy: false,
                        };
                        m.pages.insert(gpa, leaf);
                        m.pt_blocks.insert(block_of(gpa));
                    }
                }
            }
            Op::Populate2M { region, block } => {
                let gpa = REGIONS[region] + block * BLOCK_SIZE;
                let off = (7 + block) * BLOCK_SIZE;
                let got = t.populate(gpa, off, PageSize::Size2M);
                if m.has_2m(gpa) {
                    prop_assert_eq!(got.unwrap(), Populate::Present(m.pages[&gpa]));
                } else if m.pt_blocks.contains(&gpa) {
                    let occupied = matches!(got, Err(TableError::Occupied { .. }));
                    prop_assert!(occupied, "got {:?}", got);
                } else {
                    prop_assert_eq!(got.unwrap(), Populate::Installed);
                    for p in 0..BLOCK_SIZE / PAGE_SIZE {
                        let leaf = Leaf {
                            host_offset: off + p * PAGE_SIZE,
                            size: PageSize::Size2M,
                            lazy: false,
                        };
                        m.pages.insert(gpa + p * PAGE_SIZE, leaf);
                    }
                }
            }
            Op::Discard {
                region,
                page,
                pages,
            } => {
                let r = range_of(region, page, pages);
                m.split_partial(r);
                let removed: Vec<u64> =
                    m.pages.range(r.start()..r.end()).map(|(&g, _)| g).collect();
                let mut want_blocks = Vec::new();
                let mut b = block_of(r.start());
                while b < r.end() {
                    let whole_2m = m.has_2m(b);
                    b += BLOCK_SIZE;
                    if whole_2m {
                        want_blocks.push(b - BLOCK_SIZE);
                    }
                }
                for g in &removed {
                    m.pages.remove(g);
                }
                let mut b = block_of(r.start());
                while b < r.end() {
                    if strategy != Strategy::Off
                        && m.pt_blocks.contains(&b)
                        && !m.leaves_in_block(b)
                    {
                        m.pt_blocks.remove(&b);
                        want_blocks.push(b);
                    }
                    b += BLOCK_SIZE;
                }
                want_blocks.sort_unstable();
                let d = t.discard(r).unwrap();
                prop_assert_eq!(d.pages_cleared, removed.len() as u64);
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for g in removed {
                    match runs.last_mut() {
                        Some((s, l)) if *s + *l == g => *l += PAGE_SIZE,
                        _ => runs.push((g, PAGE_SIZE)),
                    }
                }
                let got: Vec<(u64, u64)> = d.cleared.iter().map(|c| (c.start(), c.len())).collect();
                prop_assert_eq!(got, runs);
                let got: Vec<u64> = d.emptied_blocks.iter().map(|b| b.start()).collect();
                prop_assert_eq!(got, want_blocks);
                check_quiescent(&t, &m, strategy)?;
                check_lookups(&t, &m, r)?;
            }
            Op::MarkLazy {
                region,
                page,
                pages,
            } => {
                let r = range_of(region, page, pages);
                m.split_partial(r);
                let mut want = 0;
                for (_, l) in m.pages.range_mut(r.start()..r.end()) {
                    if !l.lazy {
                        l.lazy = true;
                        want += 1;
                    }
                }
                prop_assert_eq!(t.mark_lazy(r).unwrap(), want);
                check_lookups(&t, &m, r)?;
            }
            Op::Reclaim {
                region,
                page,
                pages,
            } => {
                let r = range_of(region, page, pages);
                let mut want = Vec::new();
                let mut b = block_of(r.start());
                while b < r.end() {
                    if m.pt_blocks.contains(&b) && !m.leaves_in_block(b) {
                        m.pt_blocks.remove(&b);
                        want.push(b);
                    }
                    b += BLOCK_SIZE;
                }
                let rec = t.reclaim(r).unwrap();
                let got: Vec<u64> = rec.emptied_blocks.iter().map(|b| b.start()).collect();
                prop_assert_eq!(got, want);
                prop_assert_eq!(t.empty_tables(r), 0);
                prop_assert_eq!(t.stats(), t.recount());
            }
            Op::Lookup { region, page } => {
                let gpa = REGIONS[region] + page * PAGE_SIZE;
                prop_assert_eq!(t.lookup(gpa), m.pages.get(&gpa).copied());
            }
        }
    }
    prop_assert_eq!(t.stats(), t.recount());
    prop_assert!(t.audit().is_ok());
    for base in REGIONS {
        check_lookups(
            &t,
            &m,
            GpaRange::new(base, PAGES_PER_REGION * PAGE_SIZE).unwrap(),
        )?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn model_off(ops in proptest::collection::vec(op(), 1..60)) {
        run(Strategy::Off, ops)?;
    }

    #[test]
    fn model_scan(ops in proptest::collection::vec(op(), 1..60)) {
        run(Strategy::Scan, ops)?;
    }

    #[test]
    fn model_count(ops in proptest::collection::vec(op(), 1..60)) {
        run(Strategy::Count, ops)?;
    }
}
