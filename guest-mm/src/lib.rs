//! placeholder

pub mod sys;
