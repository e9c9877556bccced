//! The guest's ways to power off and reset: the hardware-reduced ACPI sleep and reset
//! registers, and the i8042 reset line.

use std::sync::Arc;

use super::bus::BusDevice;
use crate::control::{ExitReason, VmControl};
use crate::layout::ACPI_RESET_VALUE;

/// SLP_EN in the sleep control register.
const SLEEP_ENABLE: u8 = 1 << 5;
/// SLP_TYP field of the sleep control register.
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;
/// The sleep type ebb's DSDT gives for S5 (soft off).
pub const S5_SLEEP_TYPE: u8 = 5;
const I8042_RESET_COMMAND: u8 = 0xfe;

/// ACPI registers at three consecutive ports: sleep control, sleep status, reset.
pub struct AcpiPower {
    control: Arc<VmControl>,
}

impl AcpiPower {
    /// Registers that report to `control`.
    pub fn new(control: Arc<VmControl>) -> Self {
        AcpiPower { control }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLEEP_ENABLE != 0 => {
                let kind = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
                if kind == S5_SLEEP_TYPE {
                    self.control.request_stop(ExitReason::PowerOff);
                } else {
                    log::warn!("guest asked for sleep type {kind}; only S5 is supported");
                }
            }
            2 if value == ACPI_RESET_VALUE => self.control.request_stop(ExitReason::Reset),
            _ => {}
        }
    }
}

/// Just enough of an i8042 keyboard controller for the reset command.
pub struct I8042 {
    control: Arc<VmControl>,
}

impl I8042 {
    /// A controller that reports resets to `control`.
    pub fn new(control: Arc<VmControl>) -> Self {
        I8042 { control }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Offset 4 is port 0x64 (the device spans 0x60..=0x64).
        if offset == 4 && data.first() == Some(&I8042_RESET_COMMAND) {
            self.control.request_stop(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_other_values_do_not() {
        let c = Arc::new(VmControl::new().unwrap());
        let mut p = AcpiPower::new(c.clone());
        p.write(0, &[3 << 2 | SLEEP_ENABLE]);
        p.write(0, &[5 << 2]);
        p.write(1, &[0xff]);
        p.write(0, &[]);
        assert!(!c.should_stop());
        p.write(0, &[5 << 2 | SLEEP_ENABLE]);
        assert_eq!(c.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn reset_paths() {
        let c = Arc::new(VmControl::new().unwrap());
        let mut p = AcpiPower::new(c.clone());
        p.write(2, &[7]);
        assert!(!c.should_stop());
        p.write(2, &[ACPI_RESET_VALUE]);
        assert_eq!(c.reason(), Some(ExitReason::Reset));

        let c = Arc::new(VmControl::new().unwrap());
        let mut k = I8042::new(c.clone());
        k.write(0, &[0xfe]);
        assert!(!c.should_stop());
        k.write(4, &[0xfe]);
        assert_eq!(c.reason(), Some(ExitReason::Reset));
    }
}
