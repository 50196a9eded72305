//! The 16550 UART at COM1 (0x3f8), emulated by vm-superio; its interrupt line is GSI 4 via irqfd.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::{BusAccess, BusAction, BusDevice};

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of COM1 ports.
pub const COM1_LEN: u16 = 8;
/// GSI of COM1's interrupt.
pub const COM1_GSI: u32 = 4;

/// Interrupt line of the UART: an eventfd registered as irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The guest's console.
pub type SerialDevice = Serial<IrqLine, NoEvents, Box<dyn Write + Send>>;

/// COM1 on the port bus. The UART is shared with the VM handle (console input, state capture).
#[derive(Clone)]
pub struct SerialPort {
    uart: Arc<Mutex<SerialDevice>>,
    write_errors: Arc<AtomicU64>,
}

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort")
            .field("write_errors", &self.write_errors)
            .finish_non_exhaustive()
    }
}

impl SerialPort {
    /// COM1 backed by `uart`; failed writes to the console output are counted in `write_errors`.
    pub fn new(uart: Arc<Mutex<SerialDevice>>, write_errors: Arc<AtomicU64>) -> Self {
        SerialPort { uart, write_errors }
    }

    fn uart(&self) -> std::sync::MutexGuard<'_, SerialDevice> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A port writing its output to `out`, for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(out: Box<dyn Write + Send>) -> Self {
        let line = IrqLine(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let uart = Serial::with_events(line, NoEvents, out);
        SerialPort::new(Arc::new(Mutex::new(uart)), Arc::default())
    }
}

// A wide access reads or writes every one of its bytes at the register of its first port.
impl BusDevice for SerialPort {
    fn read(&self, access: BusAccess, data: &mut [u8]) -> BusAction {
        let mut uart = self.uart();
        for b in data.iter_mut() {
            *b = uart.read(access.offset as u8);
        }
        BusAction::Continue
    }

    fn write(&self, access: BusAccess, data: &[u8]) -> BusAction {
        let mut uart = self.uart();
        for b in data {
            if uart.write(access.offset as u8, *b).is_err() {
                // Console output failures (closed terminal, full disk) must not kill the guest;
                // they are counted and exposed by the VM.
                self.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        BusAction::Continue
    }
}

/// Serde mirror of vm-superio's `SerialState`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SerialSnapshot {
    /// Divisor latch low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Receive FIFO contents.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// A `Write` sink that appends to a shared buffer (for tests and for callers that want to inspect
/// the console).
#[derive(Debug, Clone, Default)]
pub struct SharedBuffer(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// A new empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The contents so far, lossily decoded as UTF-8.
    pub fn text(&self) -> String {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&g).into_owned()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("closed"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn at(offset: u64) -> BusAccess {
        BusAccess {
            vcpu: 0,
            base: u64::from(COM1_BASE),
            offset,
        }
    }

    #[test]
    fn bus_accesses_reach_the_uart_registers() {
        let out = SharedBuffer::new();
        let com1 = SerialPort::for_tests(Box::new(out.clone()));
        assert_eq!(com1.write(at(0), b"hi"), BusAction::Continue);
        assert_eq!(out.text(), "hi");
        // Scratch register (offset 7): what is written reads back.
        assert_eq!(com1.write(at(7), &[0x5a]), BusAction::Continue);
        let mut d = [0u8; 2];
        assert_eq!(com1.read(at(7), &mut d), BusAction::Continue);
        assert_eq!(d, [0x5a, 0x5a]);
        // Line status (offset 5): transmitter empty.
        com1.read(at(5), &mut d[..1]);
        assert_eq!(d[0] & 0x60, 0x60);
        assert_eq!(com1.write_errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn failed_console_writes_are_counted_not_fatal() {
        let com1 = SerialPort::for_tests(Box::new(Broken));
        assert_eq!(com1.write(at(0), b"abc"), BusAction::Continue);
        assert_eq!(com1.write_errors.load(Ordering::Relaxed), 3);
    }
}
