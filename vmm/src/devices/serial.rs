//! COM1: a 16550A-compatible UART (vm-superio) whose output goes to ebb's stdout and whose
//! interrupt is an irqfd.

use std::io::Write;
use std::sync::Arc;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::control::VmControl;

/// The line a Linux guest prints when it panics.
const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";
const LINE_MAX: usize = 512;

/// Raises the UART's IOAPIC line through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Console output: forwards bytes and watches complete lines for a kernel panic.
pub struct ConsoleOut {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    control: Arc<VmControl>,
    bytes: u64,
}

impl ConsoleOut {
    /// Output to `out`, reporting panics to `control`.
    pub fn new(out: Box<dyn Write + Send>, control: Arc<VmControl>) -> Self {
        ConsoleOut {
            out,
            line: Vec::with_capacity(LINE_MAX),
            control,
            bytes: 0,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' {
                if self
                    .line
                    .windows(PANIC_MARKER.len())
                    .any(|w| w == PANIC_MARKER)
                {
                    log::error!("guest kernel panic seen on the console");
                    self.control.note_panic();
                }
                self.line.clear();
            } else if self.line.len() < LINE_MAX {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.scan(buf);
        self.bytes += buf.len() as u64;
        // A closed or full stdout must not stop the guest: the byte is dropped.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// The COM1 UART on the port-I/O bus.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
    dropped_input: u64,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
            dropped_input: 0,
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                log::warn!("serial input not delivered: {e}");
                self.dropped_input += bytes.len() as u64;
                bytes.len()
            }
        }
    }

    /// Bytes written by the guest so far.
    pub fn output_bytes(&self) -> u64 {
        self.uart.writer().bytes
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1
            && offset < 8
            && let Err(e) = self.uart.write(offset as u8, data[0])
        {
            log::warn!("serial write failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn device() -> (SerialDevice, Shared, Arc<VmControl>, EventFd) {
        let control = Arc::new(VmControl::new().unwrap());
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            ConsoleOut::new(Box::new(out.clone()), control.clone()),
        );
        (dev, out, control, irq)
    }

    #[test]
    fn output_reaches_the_writer_and_panics_are_noticed() {
        let (mut dev, out, control, _irq) = device();
        for b in b"hello\nKernel panic - not syncing: VFS\n" {
            dev.write(0, &[*b]);
        }
        assert!(out.0.lock().unwrap().starts_with(b"hello\n"));
        assert!(control.panic_seen());
        assert_eq!(dev.output_bytes(), 38);
    }

    #[test]
    fn input_is_readable_and_raises_the_irq() {
        let (mut dev, _out, _control, irq) = device();
        // Enable the received-data interrupt (IER bit 0).
        dev.write(1, &[1]);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
        // Wrong widths and offsets are ignored without panicking.
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(9, &[0]);
    }
}
