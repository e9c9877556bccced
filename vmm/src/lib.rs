//! ebb: a KVM microVM host whose guest memory is tracked page by page in guest-mm's
//! second-level tables.
//!
//! The binary `ebb` is a thin wrapper over [`vmm::run`]. The modules are public so that
//! device crates (the balloon) can be wired in through [`devices::virtio::VirtioDevice`].

pub mod acpi;
pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod control;
pub mod devices;
pub mod event_loop;
pub mod kvm;
pub mod layout;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod preboot;
pub mod report;
pub mod seccomp;
pub mod terminal;
pub mod vmm;

/// An error and every cause, on one line (`a: b: c`), as ebb prints and answers them.
pub fn error_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}
