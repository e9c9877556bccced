//! Devices on the port-I/O and MMIO buses.

pub mod bus;
pub mod power;
pub mod serial;
pub mod virtio;
