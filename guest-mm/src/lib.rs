//! guest-mm: ebb's hypervisor-level guest memory manager.
//!
//! * [`range`]: guest-physical geometry and validated ranges.
//! * [`entry`]: the EPT-layout table entry.
//! * [`tables`]: the four-level second-level tables, their locks, lock-free
//!   lookup, epoch-deferred freeing and the reclaim strategies.

pub mod backing;
pub mod entry;
pub mod manager;
pub mod range;
pub mod sys;
pub mod tables;
pub mod uffd;

pub use range::{BLOCK_SIZE, GPA_BITS, GpaRange, PAGE_SIZE, RangeError};
pub use tables::{
    Discard, Leaf, PageSize, Populate, Reclaim, Strategy, TableError, TableStats, Tables,
    min_table_bytes,
};
