//! placeholder

pub mod sys;
pub mod backing;
