//! The command line as a user and a packager meet it: shell completions and the man page generated from the
//! clap definitions, and the VMM's log (levels, timestamps, `RUST_LOG`) on the real binary.

mod common;

use common::{bin, request, run, serial, Proc, TempDir};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

#[test]
fn completions_name_commands_and_flags() {
    let out = run(&["completions", "bash"], T);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let script = String::from_utf8(out.stdout).expect("the script is text");
    assert!(script.contains("complete "), "not a bash completion script");
    for word in ["save", "restore", "verify", "--zstd", "--api-sock"] {
        assert!(script.contains(word), "bash completions lack `{word}`");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell], T);
        assert_eq!(out.code(), Some(0), "{shell}: {}", out.stderr);
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("snapctl") && script.contains("zstd"),
            "{shell} completions: {script}"
        );
    }
    let out = run(&["completions", "tcsh"], T);
    assert_eq!(out.code(), Some(2), "an unknown shell is a usage error");
}

#[test]
fn man_page_is_roff_and_lists_commands() {
    let out = run(&["man"], T);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let page = String::from_utf8(out.stdout).expect("the page is text");
    assert!(
        page.starts_with(".TH") || page.starts_with(".ie"),
        "not roff: {}",
        &page[..page.len().min(200)]
    );
    assert!(page.contains(".TH SNAPCTL 1"), "no SNAPCTL title");
    assert!(page.contains(".SH SUBCOMMANDS"), "no SUBCOMMANDS section");
    // roff escapes the hyphen in the names of the commands' pages.
    for cmd in ["boot", "save", "restore", "verify", "completions", "man"] {
        assert!(
            page.contains(&format!("snapctl\\-{cmd}(1)")),
            "the page does not list `{cmd}`"
        );
    }

    // The pages it refers to exist too.
    let dir = TempDir::new("man");
    let out = run(&["man", "--dir", dir.path().to_str().unwrap()], T);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let main = std::fs::read_to_string(dir.join("snapctl.1")).expect("snapctl.1 written");
    assert_eq!(main, page, "--dir writes the same snapctl(1) as stdout");
    let save = std::fs::read_to_string(dir.join("snapctl-save.1")).expect("snapctl-save.1 written");
    assert!(save.contains(".TH SNAPCTL-SAVE 1"), "{save}");
    assert!(save.contains("zstd"), "{save}");
}

#[test]
fn help_documents_completions_and_man() {
    let out = run(&["--help"], T);
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("completions"), "{help}");
    assert!(help.contains("man "), "{help}");
}

/// `[2026-01-02T03:04:05.678Z LEVEL ...`: a bracketed RFC 3339 UTC timestamp with milliseconds, then the level.
fn log_level(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('[')?;
    let (ts, rest) = rest.split_at_checked(24)?;
    let ok = ts.char_indices().all(|(i, c)| match i {
        4 | 7 => c == '-',
        10 => c == 'T',
        13 | 16 => c == ':',
        19 => c == '.',
        23 => c == 'Z',
        _ => c.is_ascii_digit(),
    });
    if !ok {
        return None;
    }
    rest.strip_prefix(' ')?.split_whitespace().next()
}

/// Boots a 64 MiB idle guest with `RUST_LOG=rust_log`, shuts it down through the socket and returns what
/// the VMM wrote on standard error.
fn boot_and_shut_down(rust_log: &str) -> String {
    let dir = TempDir::new("log");
    let sock = dir.join("s.sock");
    let mut cmd = Command::new(bin());
    cmd.env("RUST_LOG", rust_log)
        .args(["boot", "--mem", "64M", "--write-rate", "idle", "--api-sock"])
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join("serial.log"));
    let mut vmm = Proc::spawn_cmd(&mut cmd, true);
    let t0 = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(vmm.running(), "snapctl boot exited early");
        assert!(t0.elapsed() < Duration::from_secs(60), "no socket in 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let reply = request(&sock, r#"{"cmd":"shutdown"}"#);
    assert_eq!(reply["reply"], "ok", "{reply}");
    let out = vmm.wait(T, "snapctl boot after shutdown");
    assert_eq!(out.code(), Some(0), "{}", out.stderr);
    out.stderr
}

#[test]
fn vmm_logs_timestamped_levels() {
    let _serial = serial();
    let err = boot_and_shut_down("debug");
    let running = err
        .lines()
        .find(|l| l.contains("running"))
        .unwrap_or_else(|| panic!("no line says the VM runs: {err}"));
    assert_eq!(log_level(running), Some("INFO"), "{running}");
    assert!(running.contains("64.00 MiB"), "{running}");
    // Debug shows the control requests; the end of the VM is logged too.
    assert!(
        err.lines()
            .any(|l| log_level(l) == Some("DEBUG") && l.contains("Shutdown")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| log_level(l) == Some("INFO") && l.contains("shut down on request")),
        "{err}"
    );
}

#[test]
fn rust_log_warn_hides_info() {
    let _serial = serial();
    let err = boot_and_shut_down("warn");
    assert!(
        !err.contains("INFO") && !err.contains("running"),
        "info lines with RUST_LOG=warn: {err}"
    );
}

#[test]
fn vmm_errors_reach_stderr_whatever_rust_log() {
    let dir = TempDir::new("logerr");
    let not_a_socket = dir.join("file");
    std::fs::write(&not_a_socket, b"x").unwrap();
    let mut cmd = Command::new(bin());
    cmd.env("RUST_LOG", "off")
        .args(["boot", "--mem", "64M", "--api-sock"])
        .arg(&not_a_socket);
    let out = Proc::spawn_cmd(&mut cmd, true).wait(T, "snapctl boot on a file");
    assert_eq!(out.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("snapctl: error:") && out.stderr.contains("not a socket"),
        "{}",
        out.stderr
    );
}
