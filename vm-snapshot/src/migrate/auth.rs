//! The shared secret and the mutual challenge–response of a migration connection.
//!
//! Each side sends a `Hello` with a fresh 32-byte nonce (from `/dev/urandom`); each then proves it
//! holds the secret with `HMAC-SHA256(secret, label ‖ source nonce ‖ destination nonce)`, the
//! label naming the prover's role (so neither proof can be reflected as the other). The
//! destination proves first, the source second; the destination accepts nothing but the
//! source's proof before it answers `AuthOk`, and the source sends no state before that. MACs are
//! compared in constant time.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::wire::{expect_frame, write_frame, Kind};
use super::MigrateError;

/// The protocol's magic, first in every `Hello`.
pub const MAGIC: &[u8; 16] = b"snapctl-migrate\0";
/// The protocol version this build speaks.
pub const VERSION: u32 = 2;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a `Hello` payload: magic, version (u32), role (u8), nonce.
pub const HELLO_LEN: usize = 16 + 4 + 1 + NONCE_LEN;
/// Bytes of a MAC.
pub const MAC_LEN: usize = 32;
/// Shortest secret accepted.
pub const MIN_TOKEN: usize = 16;
/// Longest token file accepted.
pub const MAX_TOKEN: usize = 4096;

const ROLE_SOURCE: u8 = 1;
const ROLE_DEST: u8 = 2;

/// The shared secret of a migration (the token file's contents, trailing white space removed).
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// Reads the secret from `path`: a regular file of the caller's own, closed to group and
    /// others (as ssh demands of a private key), of 16 bytes to 4 KiB.
    pub fn read(path: &Path) -> Result<Token, MigrateError> {
        let bad = |why: String| MigrateError::Token {
            path: path.display().to_string(),
            why,
        };
        let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
        let m = f.metadata().map_err(|e| bad(e.to_string()))?;
        if !m.is_file() {
            return Err(bad("not a regular file".into()));
        }
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(bad(format!(
                "readable or writable by group or others (mode {mode:03o}); `chmod 600 {}`",
                path.display()
            )));
        }
        let me = nix::unistd::geteuid().as_raw();
        if m.uid() != me && me != 0 {
            return Err(bad(format!(
                "owned by uid {}, not by you (uid {me})",
                m.uid()
            )));
        }
        let mut v = Vec::new();
        f.take(MAX_TOKEN as u64 + 1)
            .read_to_end(&mut v)
            .map_err(|e| bad(e.to_string()))?;
        if v.len() > MAX_TOKEN {
            return Err(bad(format!("longer than {MAX_TOKEN} bytes")));
        }
        while v.last().is_some_and(|b| b.is_ascii_whitespace()) {
            v.pop();
        }
        if v.len() < MIN_TOKEN {
            return Err(bad(format!(
                "{} bytes of secret, at least {MIN_TOKEN} needed (e.g. `head -c 32 /dev/urandom | \
                 base64 > FILE; chmod 600 FILE`)",
                v.len()
            )));
        }
        Ok(Token(v))
    }

    fn mac(&self, role: u8, ns: &[u8], nd: &[u8]) -> [u8; MAC_LEN] {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(MAGIC);
        m.update(&VERSION.to_le_bytes());
        m.update(&[role]);
        m.update(ns);
        m.update(nd);
        m.finalize().into_bytes().into()
    }

    fn verify(&self, role: u8, ns: &[u8], nd: &[u8], got: &[u8]) -> bool {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(MAGIC);
        m.update(&VERSION.to_le_bytes());
        m.update(&[role]);
        m.update(ns);
        m.update(nd);
        // Constant time.
        m.verify_slice(got).is_ok()
    }
}

pub(super) fn nonce() -> Result<[u8; NONCE_LEN], MigrateError> {
    let mut n = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .map_err(|e| MigrateError::Io("reading /dev/urandom", e))?;
    Ok(n)
}

fn hello(role: u8, n: &[u8; NONCE_LEN]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HELLO_LEN);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.push(role);
    v.extend_from_slice(n);
    v
}

/// Checks a peer's `Hello` and returns its nonce.
fn parse_hello(b: &[u8], role: u8) -> Result<[u8; NONCE_LEN], MigrateError> {
    if b.len() != HELLO_LEN || &b[..16] != MAGIC {
        return Err(MigrateError::Corrupt(
            "the peer is not a snapctl migration endpoint (bad hello)".into(),
        ));
    }
    let v = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
    if v != VERSION {
        return Err(MigrateError::Version(v));
    }
    if b[20] != role {
        return Err(MigrateError::Corrupt(format!(
            "the peer claims role {} where {role} was expected (two sources or two \
             destinations?)",
            b[20]
        )));
    }
    Ok(b[21..].try_into().expect("32 bytes"))
}

/// The source's side: hello, check the destination's proof, prove, wait for `AuthOk`.
pub fn source_handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    token: &Token,
) -> Result<(), MigrateError> {
    let io = |e| MigrateError::Io("writing to the destination", e);
    let ns = nonce()?;
    write_frame(w, Kind::Hello, &[&hello(ROLE_SOURCE, &ns)]).map_err(io)?;
    let mut buf = Vec::new();
    expect_frame(r, &mut buf, Kind::Hello)?;
    let nd = parse_hello(&buf, ROLE_DEST)?;
    expect_frame(r, &mut buf, Kind::Auth)?;
    if !token.verify(ROLE_DEST, &ns, &nd, &buf) {
        let _ = write_frame(w, Kind::Error, &[b"authentication failed"]);
        return Err(MigrateError::AuthFailed(
            "the destination does not hold the same secret (check both --token-file)",
        ));
    }
    write_frame(w, Kind::Auth, &[&token.mac(ROLE_SOURCE, &ns, &nd)]).map_err(io)?;
    match expect_frame(r, &mut buf, Kind::AuthOk) {
        Err(MigrateError::Peer(_)) => Err(MigrateError::AuthFailed(
            "the destination refused this secret (check both --token-file)",
        )),
        other => other,
    }
}

/// The destination's side: read the source's hello, prove, check the source's proof, answer
/// `AuthOk` (or an error frame and [`MigrateError::AuthFailed`]).
pub fn dest_handshake(
    r: &mut impl Read,
    w: &mut impl Write,
    token: &Token,
) -> Result<(), MigrateError> {
    let io = |e| MigrateError::Io("writing to the source", e);
    let mut buf = Vec::new();
    expect_frame(r, &mut buf, Kind::Hello)?;
    let ns = parse_hello(&buf, ROLE_SOURCE)?;
    let nd = nonce()?;
    write_frame(w, Kind::Hello, &[&hello(ROLE_DEST, &nd)]).map_err(io)?;
    write_frame(w, Kind::Auth, &[&token.mac(ROLE_DEST, &ns, &nd)]).map_err(io)?;
    expect_frame(r, &mut buf, Kind::Auth)?;
    if !token.verify(ROLE_SOURCE, &ns, &nd, &buf) {
        let _ = write_frame(w, Kind::Error, &[b"authentication failed"]);
        return Err(MigrateError::AuthFailed(
            "the source does not hold the same secret",
        ));
    }
    write_frame(w, Kind::AuthOk, &[]).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn token(s: &str) -> Token {
        Token(s.as_bytes().to_vec())
    }

    fn run(a: &'static str, b: &'static str) -> (Result<(), String>, Result<(), String>) {
        let (x, y) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut r = x.try_clone().unwrap();
            let mut w = x;
            dest_handshake(&mut r, &mut w, &token(b)).map_err(|e| e.to_string())
        });
        let mut r = y.try_clone().unwrap();
        let mut w = y;
        let s = source_handshake(&mut r, &mut w, &token(a)).map_err(|e| e.to_string());
        (s, t.join().unwrap())
    }

    #[test]
    fn same_secret_authenticates_and_a_different_one_is_refused_by_both() {
        let (s, d) = run("0123456789abcdef-one", "0123456789abcdef-one");
        assert_eq!((s, d), (Ok(()), Ok(())));
        let (s, d) = run("0123456789abcdef-one", "0123456789abcdef-two");
        assert!(s.unwrap_err().contains("secret"));
        // The source stops at the destination's bad proof: the destination sees it leave.
        assert!(d.is_err());
    }

    #[test]
    fn token_files_open_to_others_are_refused() {
        let dir = std::env::temp_dir().join(format!("snapctl-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Token::read(&p)
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Token::read(&p).unwrap().0, b"0123456789abcdef0123");
        std::fs::write(&p, "short\n").unwrap();
        assert!(Token::read(&p).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
