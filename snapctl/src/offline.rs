//! Work on snapshot files: `verify`, `info`, `merge`, `oracle`, and loading for `restore` (the
//! protocol itself is `vm_snapshot`'s; this is presentation: progress bars, messages, exit
//! codes). An incremental snapshot is read with its parents as a [`Chain`].

use crate::units::fmt_bytes;
use indicatif::{ProgressBar, ProgressStyle};
use ram_saver::{AtomicFileSink, Chain, Compression, ErrorKind, FormatError, SnapshotReader};
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

/// `snapctl verify FILE`: the file, and for an incremental snapshot every parent and the links.
pub fn verify(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = match Chain::open(file) {
        Ok(c) => c,
        Err(e) => return Ok(report_bad(file, &e, json)),
    };
    let totals: Vec<u64> = c
        .layers()
        .iter()
        .map(|l| l.reader.trailer().totals.pages)
        .collect();
    let b = bar(totals.iter().sum(), "verify");
    let res = c.verify(&mut |k, p| b.set_position(totals[k + 1..].iter().sum::<u64>() + p.pages));
    b.finish_and_clear();
    match res {
        Ok(rep) if c.layers().len() == 1 => {
            let rep = &rep.layers[0];
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
        Ok(rep) => {
            if json {
                println!(
                    "{}",
                    json!({"ok": true, "report": rep, "chain": c.figures()})
                );
            } else {
                println!(
                    "{}: OK — a chain of {} layers, each with every guest page in exactly one record, every checksum valid, trailer valid; each parent is the file its child was written against",
                    file.display(),
                    c.layers().len()
                );
                for (k, (l, r)) in c.layers().iter().zip(&rep.layers).enumerate() {
                    println!(
                        "  layer {}: {} — {} records ({} data, {} zero, {} parent pages)",
                        k + 1,
                        l.path.display(),
                        r.totals.records,
                        r.totals.data_pages,
                        r.totals.zero_pages,
                        r.totals.parent_pages
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(report_bad(file, &e, json)),
    }
}

/// `snapctl merge FILE --out OUT`: the chain of FILE as one standalone file, written to a
/// temporary beside OUT and renamed over it at the end (never a partial file under its name).
pub fn merge(file: &Path, out: &Path, force: bool, json: bool) -> anyhow::Result<ExitCode> {
    let c = match Chain::open(file) {
        Ok(c) => c,
        Err(e) => return Ok(report_bad(file, &e, json)),
    };
    if !force && std::fs::symlink_metadata(out).is_ok() {
        anyhow::bail!("{} exists (use --force to replace it)", out.display());
    }
    let sink = if force {
        AtomicFileSink::create(out)
    } else {
        AtomicFileSink::create_new(out)
    }
    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    let b = ProgressBar::new(c.header().total_pages());
    b.set_style(
        ProgressStyle::with_template(
            "merge [{elapsed_precise}] [{wide_bar}] {pos}/{len} pages ({msg}) ETA {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let res = c.merge(sink, &mut |p| {
        b.set_position(p.pages);
        b.set_message(fmt_bytes(p.bytes_written));
    });
    b.finish_and_clear();
    let sum = match res {
        Ok(s) => s,
        Err(e @ FormatError::Unwritable(_)) => {
            return Err(anyhow::Error::new(e).context(format!("writing {}", out.display())))
        }
        Err(e) => return Ok(report_bad(file, &e, json)),
    };
    let mbps = sum.file_bytes as f64 / sum.secs.max(1e-9) / 1e6;
    if json {
        println!(
            "{}",
            json!({"ok": true, "out": out, "layers": c.layers().len(), "summary": sum, "mb_per_s": mbps})
        );
    } else {
        println!(
            "merged {} layer(s) of {} into {}: {} in {:.2} s ({mbps:.0} MB/s); {} records copied as stored ({}), {} pages re-encoded from records cut by newer layers",
            c.layers().len(),
            file.display(),
            out.display(),
            fmt_bytes(sum.file_bytes),
            sum.secs,
            sum.records_copied,
            fmt_bytes(sum.bytes_copied),
            sum.pages_reencoded
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `snapctl info FILE`: the header and totals, and for an incremental snapshot its chain (each
/// layer: path, identity, pages stored, bytes) and what the chain holds.
pub fn info(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let r = match SnapshotReader::open(file) {
        Ok(r) => r,
        Err(e) => return Ok(report_bad(file, &e, json)),
    };
    // The file alone is shown even when its chain is broken; the error follows.
    let chain = r.header().parent.as_ref().map(|_| Chain::open(file));
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
                "identity": r.identity().to_string(),
                "parent": h.parent.as_ref().map(|p| json!({
                    "path": p.path, "identity": p.identity.to_string(),
                })),
                "chain": match &chain {
                    Some(Ok(c)) => json!({"layers": c.figures()}),
                    Some(Err(e)) => json!({"error": format!("{}", ErrorChain(e))}),
                    None => Value::Null,
                },
            })
        );
        return Ok(match &chain {
            Some(Err(e)) => ExitCode::from(exit_code(e)),
            _ => ExitCode::SUCCESS,
        });
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
    println!("identity:     {}", r.identity());
    let Some(chain) = chain else {
        return Ok(ExitCode::SUCCESS);
    };
    if let Some(p) = &h.parent {
        println!(
            "parent:       {} (identity {}); {} pages left to it",
            p.path.display(),
            p.identity,
            t.parent_pages
        );
    }
    match chain {
        Ok(c) => {
            let f = c.figures();
            println!("chain:        {} layers, the file first", f.len());
            for (k, l) in f.iter().enumerate() {
                println!(
                    "  layer {}: {} ({}), identity {}: {} pages stored ({} data, {} zero), {} parent; {} pages of the content",
                    k + 1,
                    l.path.display(),
                    fmt_bytes(l.file_bytes),
                    l.identity,
                    l.totals.data_pages + l.totals.zero_pages,
                    l.totals.data_pages,
                    l.totals.zero_pages,
                    l.totals.parent_pages,
                    l.pages_used
                );
            }
            let bytes: u64 = f.iter().map(|l| l.file_bytes).sum();
            println!(
                "chain total:  {} in {} files, {} spans",
                fmt_bytes(bytes),
                f.len(),
                c.spans().len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(report_bad(file, &e, false)),
    }
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
