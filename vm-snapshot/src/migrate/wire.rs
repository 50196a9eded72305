//! Frames on the migration connection (see the module docs of [`crate::migrate`] for the
//! protocol): a 12-byte header (kind, flags, reserved, payload length, crc32), then the payload.
//! Every header is checked (known kind, zero flags and reserved bytes, length within the kind's
//! bound) before the payload is read into memory, and the crc before the payload is looked at.

use std::io::{self, Read, Write};

use super::MigrateError;

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 12;

/// Largest machine state accepted (the built-in guest's and a kernel's are a few hundred KiB).
pub const MAX_STATE: usize = 16 << 20;
/// Largest memory map accepted (regions and one bit per 2 MiB unit: 1 TiB of guest RAM is 64 KiB).
pub const MAX_MAP: usize = 1 << 20;
/// Largest figures or error message accepted.
pub const MAX_TEXT: usize = 64 << 10;
/// Bytes before the pages in a data frame: guest address u64, length u32, encoding u8, 3 zero
/// bytes.
pub const DATA_HEAD: usize = 16;

/// The kinds of frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Handshake: protocol magic, version, role, nonce (both directions).
    Hello = 1,
    /// Handshake: the sender's HMAC over the transcript (both directions).
    Auth = 2,
    /// Destination → source: the source's proof is good; state may follow.
    AuthOk = 3,
    /// Source → destination: the machine state at the freeze instant.
    State = 4,
    /// Source → destination: guest regions and which 2 MiB units hold data.
    Map = 5,
    /// Destination → source: the vCPUs run.
    Running = 6,
    /// Source → destination: guest pages (raw, zstd or zero).
    Data = 7,
    /// Destination → source: send the 64 KiB piece at this guest address first.
    Request = 8,
    /// Source → destination: every piece was sent.
    End = 9,
    /// Destination → source: every page is resident; the destination's figures (JSON).
    Done = 10,
    /// Either direction: the sender gives up, with a reason (UTF-8).
    Error = 11,
    /// Source → destination, before the freeze: the VM's configuration (JSON).
    Prepare = 12,
    /// Destination → source: memory and the KVM VM are ready for the state; the session id.
    Prepared = 13,
    /// Source → destination, first on the demand connection after its handshake: the session id.
    Attach = 14,
    /// Destination → source: the demand connection is bound to the session.
    Attached = 15,
    /// Source → destination, first after the handshake of a reconnection: the session id.
    Resume = 16,
    /// Destination → source: which pieces it holds (one bit per piece, LSB first).
    Have = 17,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Auth,
            3 => AuthOk,
            4 => State,
            5 => Map,
            6 => Running,
            7 => Data,
            8 => Request,
            9 => End,
            10 => Done,
            11 => Error,
            12 => Prepare,
            13 => Prepared,
            14 => Attach,
            15 => Attached,
            16 => Resume,
            17 => Have,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may carry.
    pub fn max_len(self, unit: usize) -> usize {
        match self {
            Kind::Hello => super::auth::HELLO_LEN,
            Kind::Auth => super::auth::MAC_LEN,
            Kind::AuthOk | Kind::Running | Kind::End | Kind::Attached => 0,
            Kind::Prepared | Kind::Attach | Kind::Resume => super::SESSION_LEN,
            Kind::Have => MAX_STATE,
            Kind::State => MAX_STATE,
            Kind::Map => MAX_MAP,
            Kind::Data => DATA_HEAD + unit,
            Kind::Request => 8,
            Kind::Done | Kind::Error | Kind::Prepare => MAX_TEXT,
        }
    }
}

/// How the pages of a data frame are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// The pages as they are.
    Raw = 0,
    /// One zstd frame that decodes to exactly the pages.
    Zstd = 1,
    /// All zeros: no bytes follow.
    Zero = 2,
}

impl Encoding {
    /// The encoding named by byte `b`, if any.
    pub fn from_u8(b: u8) -> Option<Encoding> {
        match b {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Zstd),
            2 => Some(Encoding::Zero),
            _ => None,
        }
    }
}

/// One frame's header as encoded.
fn header(kind: Kind, payload: &[&[u8]]) -> [u8; HEADER_LEN] {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..8]);
    for p in payload {
        crc.update(p);
    }
    h[8..12].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Writes one frame whose payload is the concatenation of `payload`; returns the bytes written.
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[&[u8]]) -> io::Result<u64> {
    let h = header(kind, payload);
    w.write_all(&h)?;
    for p in payload {
        w.write_all(p)?;
    }
    w.flush()?;
    Ok(HEADER_LEN as u64 + payload.iter().map(|p| p.len() as u64).sum::<u64>())
}

/// Reads one frame into `buf` (resized to the payload) and returns its kind. `unit` bounds data
/// frames. A peer that closes between frames is [`MigrateError::Closed`], inside one
/// [`MigrateError::Truncated`]; a header or crc that does not check is [`MigrateError::Corrupt`].
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>, unit: usize) -> Result<Kind, MigrateError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Err(MigrateError::Closed),
            Ok(0) => return Err(MigrateError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MigrateError::Io("reading from the peer", e)),
        }
    }
    let kind = Kind::from_u8(h[0])
        .ok_or_else(|| MigrateError::Corrupt(format!("unknown frame kind {}", h[0])))?;
    if h[1..4] != [0, 0, 0] {
        return Err(MigrateError::Corrupt(format!(
            "frame {kind:?}: flags/reserved bytes {:02x?} are not zero",
            &h[1..4]
        )));
    }
    let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) as usize;
    if len > kind.max_len(unit) {
        return Err(MigrateError::Corrupt(format!(
            "frame {kind:?}: {len} bytes, at most {} allowed",
            kind.max_len(unit)
        )));
    }
    buf.resize(len, 0);
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => MigrateError::Truncated,
        _ => MigrateError::Io("reading from the peer", e),
    })?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..8]);
    crc.update(buf);
    let want = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if crc.finalize() != want {
        return Err(MigrateError::Corrupt(format!(
            "frame {kind:?} of {len} bytes fails its crc32"
        )));
    }
    Ok(kind)
}

/// Reads a frame that must be of kind `want` (an [`Kind::Error`] frame becomes
/// [`MigrateError::Peer`]).
pub fn expect_frame(r: &mut impl Read, buf: &mut Vec<u8>, want: Kind) -> Result<(), MigrateError> {
    match read_frame(r, buf, 0)? {
        k if k == want => Ok(()),
        Kind::Error => Err(MigrateError::Peer(
            String::from_utf8_lossy(buf).into_owned(),
        )),
        k => Err(MigrateError::Corrupt(format!(
            "expected a {want:?} frame, got {k:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_refused() {
        let mut v = Vec::new();
        write_frame(&mut v, Kind::Request, &[&7u64.to_le_bytes()]).unwrap();
        write_frame(&mut v, Kind::End, &[]).unwrap();
        let mut buf = Vec::new();
        let mut r = &v[..];
        assert_eq!(read_frame(&mut r, &mut buf, 0).unwrap(), Kind::Request);
        assert_eq!(buf, 7u64.to_le_bytes());
        assert_eq!(read_frame(&mut r, &mut buf, 0).unwrap(), Kind::End);
        assert!(matches!(
            read_frame(&mut r, &mut buf, 0),
            Err(MigrateError::Closed)
        ));
        // Every single bit flipped is refused, and every cut is truncated (or closed).
        for i in 0..20 * 8 {
            let mut bad = v[..20].to_vec();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                matches!(
                    read_frame(&mut &bad[..], &mut buf, 0),
                    Err(MigrateError::Corrupt(_)) | Err(MigrateError::Truncated)
                ),
                "bit {i}"
            );
        }
        for cut in 1..20 {
            assert!(matches!(
                read_frame(&mut &v[..cut], &mut buf, 0),
                Err(MigrateError::Truncated)
            ));
        }
        // A length beyond the kind's bound is refused before anything is allocated.
        let mut big = Vec::new();
        write_frame(&mut big, Kind::Request, &[&[0u8; 9]]).unwrap();
        assert!(matches!(
            read_frame(&mut &big[..], &mut buf, 0),
            Err(MigrateError::Corrupt(_))
        ));
    }
}
