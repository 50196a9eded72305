//! The `serial` component: COM1's registers and receive FIFO (vm-superio's `SerialState`).

use super::codec::{BodyReader, BodyWriter};
use super::{bad, Component};
use crate::serial::SerialSnapshot;
use crate::VmError;

/// Bytes of the UART receive FIFO (vm-superio's `FIFO_SIZE`, which it does not export).
pub const SERIAL_FIFO_BYTES: usize = 64;

/// Body, version 1: nine register bytes (divisor latch low, divisor latch high, interrupt
/// enable, interrupt identification, line control, line status, modem control, modem status,
/// scratch), then the receive FIFO as a blob.
impl Component for SerialSnapshot {
    const NAME: &'static str = "serial";
    const VERSION: u32 = 1;

    fn encode(&self, w: &mut BodyWriter) {
        for r in registers(self) {
            w.u8(r);
        }
        w.blob("serial", &self.in_buffer);
    }

    fn decode(r: &mut BodyReader<'_>, _version: u32) -> Result<Self, VmError> {
        // Fields are evaluated in the order written: the body's order.
        Ok(SerialSnapshot {
            baud_divisor_low: r.u8("serial")?,
            baud_divisor_high: r.u8("serial")?,
            interrupt_enable: r.u8("serial")?,
            interrupt_identification: r.u8("serial")?,
            line_control: r.u8("serial")?,
            line_status: r.u8("serial")?,
            modem_control: r.u8("serial")?,
            modem_status: r.u8("serial")?,
            scratch: r.u8("serial")?,
            in_buffer: {
                let fifo = r.blob("serial")?;
                if fifo.len() > SERIAL_FIFO_BYTES {
                    return Err(fifo_len(fifo.len()));
                }
                fifo.to_vec()
            },
        })
    }

    /// The receive FIFO holds at most [`SERIAL_FIFO_BYTES`].
    fn check(&self) -> Result<(), VmError> {
        if self.in_buffer.len() > SERIAL_FIFO_BYTES {
            return Err(fifo_len(self.in_buffer.len()));
        }
        Ok(())
    }
}

fn fifo_len(n: usize) -> VmError {
    bad(
        "serial",
        None,
        format!("{n} bytes in the receive FIFO, at most {SERIAL_FIFO_BYTES}"),
    )
}

/// The register bytes in body order.
fn registers(s: &SerialSnapshot) -> [u8; 9] {
    [
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ]
}
