//! placeholder

pub mod sys;
pub mod backing;
pub mod uffd;
