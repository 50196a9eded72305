//! The control protocol between `snapctl` clients and a VMM process (`snapctl boot` / `snapctl restore`).
//!
//! See `snapctl/PROTOCOL.md` for the full description. In short: a Unix stream socket (mode 0600, peer
//! credentials checked), one JSON object per line in each direction. The client sends one [`Request`];
//! the VMM answers with one or more [`Reply`] lines: zero or more `progress` events, then exactly one
//! final `ok` or `error` line.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
pub use vm_snapshot::migrate::MigrateParams;
pub use vm_snapshot::SaveParams;

/// Longest request line the VMM accepts; longer ones get an error reply.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// A request from a client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Report guest progress, uptime, memory, save state.
    Status,
    /// Take a live snapshot.
    Save(SaveParams),
    /// Cancel the running save.
    Cancel,
    /// Pause every vCPU.
    Pause,
    /// Resume every vCPU (after a migration that failed once the destination ran: only when
    /// forced).
    Resume {
        /// Resume a guest frozen by a migration that failed after the destination started it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force_after_failed_migration: bool,
    },
    /// Migrate the VM live to a destination VMM (`restore --listen`).
    Migrate(MigrateParams),
    /// Ask the built-in guest to check its own memory; the reply carries the verdict.
    SelfCheck,
    /// Stop the VM and end the VMM process.
    Shutdown,
}

/// One line from the VMM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// Intermediate progress of a save.
    Progress(serde_json::Value),
    /// Final success; the payload depends on the request.
    Ok(serde_json::Value),
    /// Final failure.
    Error {
        /// Stable machine-readable kind: `busy`, `bad_request`, `save_failed`, `cancelled`, `not_running`, `io`.
        kind: String,
        /// What went wrong and what to do about it.
        message: String,
    },
}

/// Default control socket path for a VM name: `$XDG_RUNTIME_DIR/snapctl/NAME.sock`, else `/run/snapctl/NAME.sock`
/// for root, else `/tmp/snapctl-UID/NAME.sock`.
pub fn default_socket_path(name: &str) -> PathBuf {
    let dir = if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        PathBuf::from(d).join("snapctl")
    } else if nix::unistd::getuid().is_root() {
        PathBuf::from("/run/snapctl")
    } else {
        PathBuf::from(format!("/tmp/snapctl-{}", nix::unistd::getuid()))
    };
    dir.join(format!("{name}.sock"))
}

/// Resolves `--api-sock` / `--name` into a socket path. A default path's directory is checked with
/// [`check_private_dir`] (created first when `create`, as the VMM does); a path the user names with
/// `--api-sock` is taken as it is.
pub fn socket_path(api_sock: Option<&Path>, name: &str, create: bool) -> anyhow::Result<PathBuf> {
    if let Some(p) = api_sock {
        return Ok(p.to_path_buf());
    }
    let path = default_socket_path(name);
    if let Some(dir) = path.parent() {
        if create {
            use std::os::unix::fs::DirBuilderExt;
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    anyhow::bail!("cannot create the socket directory {}: {e}", dir.display())
                }
                _ => {}
            }
        }
        if create || std::fs::symlink_metadata(dir).is_ok() {
            check_private_dir(dir)?;
        }
    }
    Ok(path)
}

/// A default socket directory must be the user's own: a real directory (not a symbolic link),
/// owned by the effective user, closed to everyone else (mode 0700). Otherwise another local user
/// could have made it first and serve a socket there that impersonates the VMM.
pub fn check_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::symlink_metadata(dir)
        .map_err(|e| anyhow::anyhow!("socket directory {}: {e}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if m.file_type().is_symlink() {
        anyhow::bail!(
            "the socket directory {} is a symbolic link; refusing to use it (remove it, or pass --api-sock)",
            dir.display()
        );
    }
    if !m.is_dir() {
        anyhow::bail!(
            "{} is not a directory; refusing to use it as the socket directory (remove it, or pass --api-sock)",
            dir.display()
        );
    }
    if m.uid() != me {
        anyhow::bail!(
            "the socket directory {} belongs to uid {}, not to you (uid {me}): another user may have made it \
             to impersonate the VMM; refusing to use it (remove it, or pass --api-sock)",
            dir.display(),
            m.uid()
        );
    }
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "the socket directory {} is open to other users (mode {mode:03o}); refusing to use it \
             (`chmod 700 {}`, or pass --api-sock)",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Writes one JSON line.
pub fn write_line<T: Serialize>(w: &mut impl Write, v: &T) -> std::io::Result<()> {
    let mut s = serde_json::to_string(v).map_err(std::io::Error::other)?;
    s.push('\n');
    w.write_all(s.as_bytes())?;
    w.flush()
}

/// Reads one line of at most `max` bytes. `Ok(None)` at end of stream.
pub fn read_line_bounded(r: &mut impl BufRead, max: usize) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
            };
        }
        if let Some(i) = avail.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&avail[..i]);
            r.consume(i + 1);
            if buf.len() > max {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("line longer than {max} bytes"),
                ));
            }
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        let n = avail.len();
        buf.extend_from_slice(avail);
        r.consume(n);
        if buf.len() > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line longer than {max} bytes"),
            ));
        }
    }
}

/// Connects to a VMM's control socket with an error that says what to do.
pub fn connect(path: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(path).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "is a VM running? start one with `snapctl boot` (or pass --api-sock/--name)"
            }
            std::io::ErrorKind::PermissionDenied => "the socket belongs to another user",
            _ => "check the path",
        };
        anyhow::anyhow!("cannot connect to {}: {e} ({hint})", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let reqs = [
            Request::Status,
            Request::Save(SaveParams {
                path: "/tmp/x.snap".into(),
                stream: false,
                zstd: true,
                level: Some(3),
                max_bandwidth: Some(1 << 20),
                max_staging: Some(512 << 20),
                prepare_staging: Some(vm_snapshot::PrepareStaging::Bytes(1 << 30)),
                force: false,
                fault_block: Some(2 << 20),
                scan_block: None,
                no_huge_restore: true,
                no_page_hashes: true,
                background: true,
                parent: Some("/tmp/p.snap".into()),
            }),
            Request::Cancel,
        ];
        for r in reqs {
            let s = serde_json::to_string(&r).unwrap();
            assert!(!s.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        }
        let s = r#"{"cmd":"save","path":"/a","zstd":true}"#;
        assert!(matches!(
            serde_json::from_str::<Request>(s).unwrap(),
            Request::Save(_)
        ));
        // Staging to prepare: "auto" or {"bytes": N} on the wire.
        let s = r#"{"cmd":"save","path":"/a","prepare_staging":"auto"}"#;
        let Request::Save(p) = serde_json::from_str::<Request>(s).unwrap() else {
            panic!("not a save");
        };
        assert_eq!(p.prepare_staging, Some(vm_snapshot::PrepareStaging::Auto));
        let s = r#"{"cmd":"save","path":"/a","prepare_staging":{"bytes":1048576}}"#;
        let Request::Save(p) = serde_json::from_str::<Request>(s).unwrap() else {
            panic!("not a save");
        };
        assert_eq!(
            p.prepare_staging,
            Some(vm_snapshot::PrepareStaging::Bytes(1 << 20))
        );
        assert!(serde_json::from_str::<Request>(
            r#"{"cmd":"save","path":"/a","prepare_staging":"lots"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"cmd":"save","path":"/a","bogus":1}"#).is_err()
        );
    }

    #[test]
    fn bounded_lines() {
        let data = b"short\nxxxxxxxxxxxxxxxxxxxxxxxx\n";
        let mut r = std::io::BufReader::with_capacity(4, &data[..]);
        assert_eq!(
            read_line_bounded(&mut r, 10).unwrap().as_deref(),
            Some("short")
        );
        assert!(read_line_bounded(&mut r, 10).is_err());
    }
}
