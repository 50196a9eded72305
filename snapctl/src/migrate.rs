//! `snapctl migrate`: asks the source VMM to move its VM to a destination, shows progress, prints
//! the summary.

use crate::api::{self, MigrateParams, Reply, Request};
use crate::units::fmt_bytes;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Exit code of a failed migration whose source guest runs on (nothing moved).
const EXIT_FAILED: u8 = 1;
/// Exit code of a failed migration that left the source guest frozen.
const EXIT_FROZEN: u8 = 2;

/// `snapctl migrate --to ADDR --token-file FILE [--zstd] [--json]`, or `--resume` (`--to` and
/// `--token-file` then default to the interrupted migration's).
pub fn migrate(
    sock: &Path,
    to: Option<&str>,
    token_file: Option<&Path>,
    resume: bool,
    zstd: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // The VMM reads the token file itself (it runs as the same user; the path must not depend
    // on this client's working directory).
    let token_file = match token_file {
        Some(t) => {
            let t = std::path::absolute(t).with_context(|| format!("resolving {}", t.display()))?;
            vm_snapshot::migrate::Token::read(&t)?;
            t
        }
        None => Default::default(),
    };
    if let Some(to) = to {
        vm_snapshot::migrate::Endpoint::parse(to)?;
    }
    let req = Request::Migrate(MigrateParams {
        to: to.unwrap_or_default().to_string(),
        token_file,
        zstd,
        resume,
    });
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let reply = crate::client::exchange(api::connect(sock)?, &req, |p| {
        let get = |k: &str| p.get(k).and_then(Value::as_u64).unwrap_or(0);
        bar.set_length(get("total_bytes"));
        bar.set_position(get("done_bytes"));
        bar.set_message(format!(
            "{}; {} on the wire, {} demand requests",
            p.get("phase").and_then(Value::as_str).unwrap_or(""),
            fmt_bytes(get("wire_bytes")),
            get("demand_requests")
        ));
    });
    bar.finish_and_clear();
    match reply? {
        Reply::Ok(s) => {
            if json {
                println!("{s}");
            } else {
                print_summary(&s);
            }
            Ok(ExitCode::SUCCESS)
        }
        Reply::Error { kind, message } => {
            eprintln!("snapctl: migration failed: {message} [{kind}]");
            Ok(ExitCode::from(if kind == "migration_failed_frozen" {
                EXIT_FROZEN
            } else {
                EXIT_FAILED
            }))
        }
        Reply::Progress(_) => unreachable!("progress is handled by exchange()"),
    }
}

fn print_summary(s: &Value) {
    let u = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let f = |k: &str| s.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let d = &s["dest"];
    let mut e = std::io::stderr().lock();
    let _ = writeln!(
        e,
        "migrated {} to {} in {:.3} s",
        fmt_bytes(u(s, "guest_bytes")),
        s["to"].as_str().unwrap_or("?"),
        f("duration_s")
    );
    let _ = writeln!(
        e,
        "  downtime:        {:.3} ms (pause {:.3} ms, capture {:.3} ms)",
        f("downtime_ms"),
        f("pause_ms"),
        f("capture_ms")
    );
    let _ = writeln!(
        e,
        "  sent:            {} on the wire for {} of data ({} of zeros as runs; ratio {:.4}){}",
        fmt_bytes(u(s, "wire_bytes")),
        fmt_bytes(u(s, "data_bytes")),
        fmt_bytes(u(s, "zero_bytes")),
        f("wire_ratio"),
        if s["zstd"].as_bool() == Some(true) {
            ", zstd"
        } else {
            ""
        }
    );
    if u(s, "reconnects") > 0 {
        let _ = writeln!(
            e,
            "  reconnected:     {} time(s) after lost connections (`--resume`)",
            u(s, "reconnects")
        );
    }
    let _ = writeln!(
        e,
        "  demand faults:   {} requests ({} sent ahead of the stream); wait p50 {} µs, p99 {} µs, \
         max {} µs",
        u(s, "demand_requests"),
        u(s, "demand_sent"),
        u(d, "fault_wait_p50_us"),
        u(d, "fault_wait_p99_us"),
        u(d, "fault_wait_max_us")
    );
}
