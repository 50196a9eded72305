//! Work on snapshot files: `verify`, `info`, `oracle`, and loading for `restore` (the protocol
//! itself is `vm_snapshot`'s; this is presentation: progress bars, messages, exit codes).

use crate::units::fmt_bytes;
use indicatif::{ProgressBar, ProgressStyle};
use ram_saver::{Compression, ErrorKind, FormatError, SnapshotReader};
use serde_json::{json, Value};
use std::path::Path;
use std::process::ExitCode;
use vm_snapshot::{RestoreError, RestoreParams};
use vmm_core::{MemBackend, Vm};

/// Exit codes of `verify`, `info`, `oracle` and `restore` for bad files (documented in README.md).
pub mod exit {
    /// The file is damaged (a checksum, structure or page-coverage error).
    pub const CORRUPT: u8 = 3;
    /// The file has no valid trailer: the save never finished.
    pub const INCOMPLETE: u8 = 4;
    /// The file cannot be read (missing, permissions, I/O error) or is not a snapshot.
    pub const UNREADABLE: u8 = 5;
    /// A format version, architecture or feature this build does not support.
    pub const UNSUPPORTED: u8 = 6;
    /// The built-in guest's memory in the file is not the memory at the freeze instant.
    pub const INCONSISTENT: u8 = 7;
}

fn exit_code(e: &FormatError) -> u8 {
    match e.kind() {
        ErrorKind::Corrupt | ErrorKind::Mismatch => exit::CORRUPT,
        ErrorKind::Incomplete => exit::INCOMPLETE,
        ErrorKind::Unreadable | ErrorKind::Unwritable | ErrorKind::NotASnapshot => exit::UNREADABLE,
        ErrorKind::Unsupported => exit::UNSUPPORTED,
    }
}

fn kind_word(e: &FormatError) -> &'static str {
    match e.kind() {
        ErrorKind::Corrupt | ErrorKind::Mismatch => "corrupt",
        ErrorKind::Incomplete => "incomplete",
        ErrorKind::Unreadable | ErrorKind::Unwritable => "unreadable",
        ErrorKind::NotASnapshot => "not a snapshot",
        ErrorKind::Unsupported => "unsupported",
    }
}

fn report_bad(file: &Path, e: &FormatError, json: bool) -> ExitCode {
    let msg = format!("{}", ErrorChain(e));
    if json {
        println!(
            "{}",
            json!({"ok": false, "kind": kind_word(e), "error": msg, "record": e.record()})
        );
    }
    eprintln!(
        "snapctl: {}: {} snapshot: {msg}",
        file.display(),
        kind_word(e)
    );
    ExitCode::from(exit_code(e))
}

/// Prints an error with its sources, once each.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut s = self.0.source();
        while let Some(e) = s {
            write!(f, ": {e}")?;
            s = e.source();
        }
        Ok(())
    }
}

fn bar(total: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{elapsed_precise}}] [{{wide_bar}}] {{pos}}/{{len}} pages ETA {{eta}}"
        ))
        .expect("static template")
        .progress_chars("=> "),
    );
    b
}

/// `snapctl verify FILE`.
pub fn verify(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let mut r = match SnapshotReader::open(file) {
        Ok(r) => r,
        Err(e) => return Ok(report_bad(file, &e, json)),
    };
    let b = bar(r.header().total_pages(), "verify");
    let res = r.verify(&mut |p| b.set_position(p.pages));
    b.finish_and_clear();
    match res {
        Ok(rep) => {
            if json {
                println!("{}", json!({"ok": true, "report": rep}));
            } else {
                println!(
                    "{}: OK — {} records, {} guest pages each stored once ({} data, {} zero), every checksum valid, trailer valid",
                    file.display(),
                    rep.totals.records,
                    rep.guest_pages,
                    rep.totals.data_pages,
                    rep.totals.zero_pages
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(report_bad(file, &e, json)),
    }
}

/// `snapctl info FILE`.
pub fn info(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let r = match SnapshotReader::open(file) {
        Ok(r) => r,
        Err(e) => return Ok(report_bad(file, &e, json)),
    };
    let h = r.header();
    let t = &r.trailer().totals;
    let guest_bytes = h.total_pages() * u64::from(h.page_size);
    let nonzero = t.data_pages * u64::from(h.page_size);
    let ratio = if nonzero > 0 {
        r.file_len() as f64 / nonzero as f64
    } else {
        0.0
    };
    let cfg: Value = serde_json::from_slice(&h.vmm_config).unwrap_or(Value::Null);
    let hot = r.hot_totals();
    if json {
        println!(
            "{}",
            json!({
                "guest_bytes": guest_bytes, "regions": h.regions, "vcpus": h.vcpu_count,
                "page_size": h.page_size, "compression": h.compression,
                "created_unix_secs": h.created_unix_secs, "totals": t,
                "file_bytes": r.file_len(), "image_size_ratio": ratio, "vmm_config": cfg,
                "machine_state_bytes": r.machine_state().len(),
                "format_version": r.format_version(), "hot": hot,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "file:         {} ({}, format {})",
        file.display(),
        fmt_bytes(r.file_len()),
        r.format_version()
    );
    println!(
        "guest memory: {} in {} region(s)",
        fmt_bytes(guest_bytes),
        h.regions.len()
    );
    for reg in &h.regions {
        println!("              {:#x}..{:#x}", reg.gpa, reg.gpa + reg.size);
    }
    println!("vCPUs:        {}", h.vcpu_count);
    println!("created:      {} (unix seconds)", h.created_unix_secs);
    println!(
        "compression:  {}",
        match h.compression {
            Compression::None => "none (raw)".to_string(),
            Compression::Zstd { level } => format!("zstd level {level}"),
        }
    );
    println!(
        "pages:        {} ({} data, {} zero) in {} records",
        t.pages, t.data_pages, t.zero_pages, t.records
    );
    println!(
        "hot:          {} records, {} pages ({} guest, {} stored): saved first, the guest wrote them during the save",
        hot.records,
        hot.pages,
        fmt_bytes(hot.pages * u64::from(h.page_size)),
        fmt_bytes(hot.stored_bytes)
    );
    println!("size ratio:   {ratio:.4} (file bytes / non-zero guest RAM)");
    if !cfg.is_null() {
        println!("VM config:    {cfg}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads `file` into fresh guest memory, with a progress bar.
fn load(
    file: &Path,
    backend: Option<MemBackend>,
) -> Result<(vmm_core::MachineState, vm_memory::GuestMemoryMmap), RestoreError> {
    let b = bar(0, "load");
    let res = vm_snapshot::load(file, backend, &mut |p| {
        b.set_length(p.total_pages);
        b.set_position(p.pages);
    });
    b.finish_and_clear();
    res
}

/// Reports a file `restore` refuses (before any vCPU runs); returns the file's exit code.
pub fn refuse_restore(file: &Path, e: &FormatError) -> ExitCode {
    let code = report_bad(file, e, false);
    eprintln!("snapctl: not restoring {}", file.display());
    code
}

/// Builds a VM from a snapshot. A bad file is refused before any vCPU runs: `Ok(Err(code))`, with
/// the problem already reported and `code` the file's exit code (3 corrupt, 4 incomplete, …).
pub fn restore_vm(file: &Path, params: RestoreParams) -> anyhow::Result<Result<Vm, ExitCode>> {
    let b = bar(0, "load");
    let res = vm_snapshot::restore(file, params, &mut |p| {
        b.set_length(p.total_pages);
        b.set_position(p.pages);
    });
    b.finish_and_clear();
    match res {
        Ok(vm) => Ok(Ok(vm)),
        Err(RestoreError::File(e)) => Ok(Err(refuse_restore(file, &e))),
        Err(e) => Err(e.into()),
    }
}

/// `snapctl oracle FILE`: loads the RAM of a built-in-guest snapshot and checks that every page holds exactly
/// what the guest's write sequence says at the control slots captured at the freeze instant.
pub fn oracle(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    // Checked in anonymous memory whatever backed the guest: the oracle runs no VM, and a
    // hugetlbfs pool may be in use by the VM itself.
    let (state, mem) = match load(file, Some(MemBackend::Anon)) {
        Ok(x) => x,
        Err(RestoreError::File(e)) => return Ok(report_bad(file, &e, json)),
        Err(e) => return Err(e.into()),
    };
    let slots = state.guest_slots();
    match vmm_core::oracle::check(&mem, state.config(), Some(&slots)) {
        Ok(rep) => {
            if json {
                println!(
                    "{}",
                    json!({"ok": true, "slots": slots, "report": format!("{rep:?}")})
                );
            } else {
                println!(
                    "{}: oracle PASS — guest memory is exactly the memory at the freeze instant (steps {slots:?})",
                    file.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(m) => {
            if json {
                println!(
                    "{}",
                    json!({"ok": false, "slots": slots, "mismatch": m.to_string()})
                );
            }
            eprintln!("snapctl: {}: oracle FAIL — {m}", file.display());
            Ok(ExitCode::from(exit::INCONSISTENT))
        }
    }
}
