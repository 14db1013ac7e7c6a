//! The 8250 serial console (vm-superio) on the host's stdout.

use crate::layout::SERIAL_PORT;
use std::io::Write;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The serial port's interrupt: an eventfd that KVM turns into IRQ 4 (when an in-kernel
/// interrupt controller exists; without one the guest polls, as the test guest does).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Output that goes to the host's stdout, flushed at every newline so that lines show up while
/// the guest runs.
pub struct Console {
    out: std::io::Stdout,
}

impl Console {
    /// The console on stdout.
    pub fn stdout() -> Self {
        Console {
            out: std::io::stdout(),
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        if buf[..n].contains(&b'\n') {
            self.out.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The serial device at ports 0x3f8-0x3ff.
pub struct SerialPort {
    serial: Serial<IrqTrigger, NoEvents, Console>,
}

impl SerialPort {
    /// A serial port that interrupts through `irq`.
    pub fn new(irq: EventFd) -> Self {
        SerialPort {
            serial: Serial::new(IrqTrigger(irq), Console::stdout()),
        }
    }

    /// Whether `port` belongs to the serial device.
    pub fn owns(port: u16) -> bool {
        (SERIAL_PORT..SERIAL_PORT + 8).contains(&port)
    }

    /// A guest write to `port`. Console errors (a closed stdout) are not the guest's business.
    pub fn write(&mut self, port: u16, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.serial.write((port - SERIAL_PORT) as u8, b);
        }
    }

    /// A guest read from `port`.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read((port - SERIAL_PORT) as u8);
        }
    }

    /// Flushes the console.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}
