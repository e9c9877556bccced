//! COM1: a 16550A-compatible UART (vm-superio) whose output goes to ebb's stdout and whose
//! interrupt is an irqfd.
//!
//! Host input waits in ebb until the guest listens. Linux's 8250 driver, when it first opens the
//! port, reads the receive register twice to clear stale interrupts (with the receive interrupt
//! off) and would swallow two bytes typed before that; while the console prints it switches the
//! receive interrupt off and on again. So host bytes enter the UART's 64-byte FIFO only while the
//! receive-data interrupt is enabled (IER bit 0, OUT2 set, no loopback); bytes the guest has not
//! read when it stops listening go back to the front of ebb's buffer; and the FIFO is topped up
//! from that buffer after every read of the receive register, so a paste longer than the FIFO
//! arrives whole without waiting for more host input.

use std::collections::VecDeque;
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

/// Register offsets and bits of a 16550A that decide whether the guest listens.
const DATA: u8 = 0;
const IER: u8 = 1;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const IER_RDA: u8 = 0x01;
const LCR_DLAB: u8 = 0x80;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const LSR_DATA_READY: u8 = 0x01;
/// Host input ebb keeps for the guest at most; more is counted and dropped.
const PENDING_MAX: usize = 1 << 16;

/// The COM1 UART on the port-I/O bus.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
    /// Host input not in the FIFO yet.
    pending: VecDeque<u8>,
    /// The guest's last writes to IER, LCR and MCR (vm-superio's reset values to start).
    ier: u8,
    lcr: u8,
    mcr: u8,
    dropped_input: u64,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
            pending: VecDeque::new(),
            ier: 0,
            lcr: 0x03,
            mcr: MCR_OUT2,
            dropped_input: 0,
        }
    }

    /// Takes host input for the guest: it reaches the FIFO as soon as, and as fast as, the guest
    /// listens. Beyond [`PENDING_MAX`] bytes waiting, input is counted and dropped.
    pub fn queue_input(&mut self, bytes: &[u8]) {
        let room = PENDING_MAX.saturating_sub(self.pending.len());
        let take = bytes.len().min(room);
        self.pending.extend(&bytes[..take]);
        self.dropped_input += (bytes.len() - take) as u64;
        self.top_up();
    }

    /// Host input dropped because too much was waiting.
    pub fn dropped_input(&self) -> u64 {
        self.dropped_input
    }

    /// Bytes written by the guest so far.
    pub fn output_bytes(&self) -> u64 {
        self.uart.writer().bytes
    }

    fn listening(&self) -> bool {
        self.ier & IER_RDA != 0 && self.mcr & MCR_OUT2 != 0 && self.mcr & MCR_LOOP == 0
    }

    /// Moves waiting input into the FIFO while the guest listens.
    fn top_up(&mut self) {
        if !self.listening() || self.pending.is_empty() {
            return;
        }
        let chunk = self.pending.as_slices().0;
        let fits = chunk.len().min(self.uart.fifo_capacity());
        let n = match self.uart.enqueue_raw_bytes(chunk) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::FullFifo) => 0,
            Err(e) => {
                // The bytes are in the FIFO; only the interrupt could not be raised.
                log::warn!("serial input interrupt not delivered: {e}");
                fits
            }
        };
        self.pending.drain(..n);
    }

    /// Takes bytes the guest did not read back out of the FIFO, to the front of the buffer.
    fn take_back(&mut self) {
        if self.mcr & MCR_LOOP != 0 {
            // The FIFO holds the guest's own looped-back bytes, not host input.
            return;
        }
        let mut unread = Vec::new();
        while self.uart.read(LSR) & LSR_DATA_READY != 0 {
            unread.push(self.uart.read(DATA));
        }
        for b in unread.into_iter().rev() {
            self.pending.push_front(b);
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
            if offset as u8 == DATA && self.lcr & LCR_DLAB == 0 {
                self.top_up();
            }
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= 8 {
            return;
        }
        let (offset, value) = (offset as u8, data[0]);
        if let Err(e) = self.uart.write(offset, value) {
            log::warn!("serial write failed: {e}");
        }
        let listened = self.listening();
        match offset {
            IER if self.lcr & LCR_DLAB == 0 => self.ier = value,
            LCR => self.lcr = value,
            MCR => self.mcr = value,
            _ => return,
        }
        match (listened, self.listening()) {
            (true, false) => self.take_back(),
            (false, true) => self.top_up(),
            _ => {}
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
        dev.queue_input(b"ab");
        assert!(irq.read().unwrap() >= 1);
        assert_eq!(read_byte(&mut dev, 0), b'a');
        // Wrong widths and offsets are ignored without panicking.
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(9, &[0]);
    }

    fn read_byte(dev: &mut SerialDevice, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    /// What the guest reads from the data register while the line status says data is ready.
    fn drain(dev: &mut SerialDevice) -> Vec<u8> {
        let mut got = Vec::new();
        while read_byte(dev, 5) & LSR_DATA_READY != 0 {
            got.push(read_byte(dev, 0));
        }
        got
    }

    #[test]
    fn input_typed_before_the_driver_opens_the_port_survives_its_start_up_reads() {
        let (mut dev, _out, _control, _irq) = device();
        dev.queue_input(b"typed-into-ebb\n");
        // Linux's 8250 start-up, with the receive interrupt off: clear the interrupt registers
        // (LSR, RX, IIR, MSR) twice.
        for _ in 0..2 {
            for r in [5, 0, 2, 6] {
                read_byte(&mut dev, r);
            }
        }
        assert_eq!(
            read_byte(&mut dev, 5) & LSR_DATA_READY,
            0,
            "nothing offered yet"
        );
        // The driver listens: everything typed arrives.
        dev.write(1, &[IER_RDA | 0x04]);
        assert_eq!(drain(&mut dev), b"typed-into-ebb\n");
    }

    #[test]
    fn unread_input_goes_back_while_the_guest_stops_listening() {
        let (mut dev, _out, _control, _irq) = device();
        dev.write(1, &[IER_RDA]);
        dev.queue_input(b"abc");
        assert_eq!(read_byte(&mut dev, 0), b'a');
        // A console write masks IER; a stray read of RX then takes nothing.
        dev.write(1, &[0]);
        assert_eq!(read_byte(&mut dev, 5) & LSR_DATA_READY, 0);
        read_byte(&mut dev, 0);
        dev.queue_input(b"d");
        dev.write(1, &[IER_RDA]);
        assert_eq!(drain(&mut dev), b"bcd");
        // Loopback: the guest's own bytes come back, host input waits.
        dev.write(4, &[MCR_OUT2 | MCR_LOOP]);
        dev.queue_input(b"host");
        dev.write(0, b"L");
        assert_eq!(drain(&mut dev), b"L");
        dev.write(4, &[MCR_OUT2]);
        assert_eq!(drain(&mut dev), b"host");
    }

    #[test]
    fn a_paste_longer_than_the_fifo_arrives_whole_without_more_input() {
        let (mut dev, _out, _control, _irq) = device();
        dev.write(1, &[IER_RDA]);
        let paste: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        dev.queue_input(&paste);
        assert_eq!(drain(&mut dev), paste);
    }

    #[test]
    fn input_beyond_the_buffer_is_counted_and_dropped() {
        let (mut dev, _out, _control, _irq) = device();
        dev.queue_input(&vec![b'x'; PENDING_MAX + 10]);
        assert_eq!(dev.dropped_input(), 10);
        dev.write(1, &[IER_RDA]);
        assert_eq!(drain(&mut dev).len(), PENDING_MAX);
    }

    #[test]
    fn the_divisor_latch_is_not_mistaken_for_ier() {
        let (mut dev, _out, _control, _irq) = device();
        dev.queue_input(b"z");
        dev.write(3, &[LCR_DLAB | 0x03]);
        dev.write(1, &[IER_RDA]); // the divisor's high byte
        dev.write(3, &[0x03]);
        assert_eq!(read_byte(&mut dev, 5) & LSR_DATA_READY, 0);
        dev.write(1, &[IER_RDA]);
        assert_eq!(drain(&mut dev), b"z");
    }
}
