//! `cargo xtask bench`, incremental cases (`--only incremental`): the figures behind issue 17's
//! targets, on the built-in guest (anonymous THP memory, 2 vCPUs), reported and never asserted.
//!
//! - `incremental MEM hot N%`: a guest rewriting a hot set of N % of its RAM; a full save, then
//!   incremental saves 1 s apart: downtime (the save's own figure, and the longest a vCPU was held
//!   out of the guest), the save's time end to end and the share of it that writing its file at the
//!   disk limit measured in the same run would take, file bytes ÷ the guest bytes the save stored,
//!   and `dirty_bytes` from `status` before the save.
//! - `incremental MEM tracking hot 6%|full [memfd]`: the guest's write rate in the seconds after a save with
//!   write tracking on and with `--track-writes off` (same guest, same seconds, fresh VMs).
//! - `incremental MEM chain 16`: a real chain of 16 layers made by `save --parent` (hot set of
//!   6 %), merged by `snapctl merge`; eager restore (process start to the guest's progress past its
//!   freeze instant) and lazy restore (time to resident) of the chain's top against the merged file.
//! - `incremental MEM random 10 saves`: a guest writing random pages at a set rate; its huge-page
//!   backing (AnonHugePages of the VMM process) and write rate after 10 incremental saves as shares
//!   of before the first one.

use super::{f, rate, wait_fill, Limits};
use crate::VmmProc;
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// vCPUs of every incremental case.
const VCPUS: u64 = 2;
/// Incremental saves per hot-set case.
const HOT_SAVES: usize = 3;
/// Layers of the chain case (the full save and 15 children).
const CHAIN_LAYERS: usize = 16;
/// Incremental saves of the random-writer case.
const RANDOM_SAVES: usize = 10;
/// Pages per second per vCPU of the random-writer case.
const RANDOM_RATE: u64 = 20_000;
/// Time between saves.
const BETWEEN: Duration = Duration::from_secs(1);

/// One incremental case.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A hot set of this many per cent of RAM.
    Hot(u64),
    /// Tracking on against off: a hot set of 6 % or the full writer, on anonymous (THP) or memfd
    /// (4 KiB pages) memory.
    Tracking {
        hot: bool,
        memfd: bool,
    },
    Chain,
    Random,
}

fn mem_name(mem_mib: u64) -> String {
    if mem_mib >= 1024 {
        format!("{}G", mem_mib / 1024)
    } else {
        format!("{mem_mib}M")
    }
}

fn name(kind: Kind, mem_mib: u64) -> String {
    let m = mem_name(mem_mib);
    match kind {
        Kind::Hot(p) => format!("incremental {m} hot {p}%"),
        Kind::Tracking { hot, memfd } => format!(
            "incremental {m} tracking {}{}",
            if hot { "hot 6%" } else { "full" },
            if memfd { " memfd" } else { "" }
        ),
        Kind::Chain => format!("incremental {m} chain {CHAIN_LAYERS}"),
        Kind::Random => format!("incremental {m} random {RANDOM_SAVES} saves"),
    }
}

/// The incremental cases `only` selects (all without it), by name.
pub(super) fn selected(quick: bool, only: Option<&str>) -> Vec<String> {
    cases(quick, only).into_iter().map(|(_, n)| n).collect()
}

fn mem_mib(quick: bool) -> u64 {
    if quick {
        1024
    } else {
        4096
    }
}

fn cases(quick: bool, only: Option<&str>) -> Vec<(Kind, String)> {
    let mem = mem_mib(quick);
    [
        Kind::Hot(1),
        Kind::Hot(6),
        Kind::Tracking {
            hot: true,
            memfd: false,
        },
        Kind::Tracking {
            hot: false,
            memfd: false,
        },
        Kind::Tracking {
            hot: false,
            memfd: true,
        },
        Kind::Chain,
        Kind::Random,
    ]
    .into_iter()
    .map(|k| (k, name(k, mem)))
    .filter(|(_, n)| only.is_none_or(|o| n.contains(o)))
    .collect()
}

/// Runs the selected incremental cases; one row each (`error` on failure).
pub(super) fn run(
    bin: &Path,
    dir: &Path,
    quick: bool,
    only: Option<&str>,
    limits: &Limits,
) -> Vec<Value> {
    let mem = mem_mib(quick);
    let dir = dir.join("incremental");
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return vec![
            json!({"case": "incremental", "error": format!("creating {}: {e}", dir.display())}),
        ];
    }
    let mut rows = Vec::new();
    for (kind, name) in cases(quick, only) {
        eprintln!("bench: {name}");
        let load = loadavg();
        let r = match kind {
            Kind::Hot(p) => hot(bin, &dir, mem, p, limits),
            Kind::Tracking { hot, memfd } => tracking(bin, &dir, mem, hot, memfd, quick),
            Kind::Chain => chain(bin, &dir, mem),
            Kind::Random => random(bin, &dir, mem, quick),
        };
        let row = match r {
            Ok(mut v) => {
                v["case"] = json!(name);
                v["mem_mib"] = json!(mem);
                v["load_before"] = json!(load);
                v["load_after"] = json!(loadavg());
                eprintln!("bench:   {v}");
                v
            }
            Err(e) => {
                eprintln!("bench:   FAILED: {e:#}");
                json!({"case": name, "error": format!("{e:#}")})
            }
        };
        rows.push(row);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    rows
}

/// The 1-minute load average.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// AnonHugePages of the whole process (`/proc/PID/smaps_rollup`), bytes.
fn process_thp(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("AnonHugePages:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Per-vCPU working set giving a hot set of `pct` % of `mem_mib`, as a `--working-set` size.
fn working_set(mem_mib: u64, pct: u64) -> String {
    let kib = (mem_mib << 10) * pct / 100 / VCPUS;
    format!("{}K", kib.div_ceil(4) * 4)
}

/// The bytes of a [`working_set`] size.
fn working_set_bytes(ws: &str) -> u64 {
    ws.trim_end_matches('K').parse::<u64>().unwrap_or(0) << 10
}

/// Boots the built-in guest (2 vCPUs, full speed) with `extra` arguments and waits for its fill.
fn boot(bin: &Path, dir: &Path, mem_mib: u64, extra: &[&str]) -> anyhow::Result<VmmProc> {
    let mem = format!("{mem_mib}M");
    let vcpus = VCPUS.to_string();
    let mut args = vec!["boot", "--mem", &mem, "--vcpus", &vcpus];
    args.extend(extra);
    let vm = VmmProc::start(bin, &args, &dir.join("vm.sock"), &dir.join("vm.serial"))?;
    wait_fill(&vm)?;
    Ok(vm)
}

/// `save --out OUT [--parent PARENT] --force --json`; the summary. A save that names a parent
/// must be incremental.
fn save(vm: &VmmProc, out: &Path, parent: Option<&Path>) -> anyhow::Result<Value> {
    let out_s = out.to_str().context("path")?;
    let mut args = vec!["save", "--out", out_s, "--force", "--json"];
    if let Some(p) = parent {
        args.extend(["--parent", p.to_str().context("path")?]);
    }
    let s: Value = serde_json::from_str(vm.ctl(&args)?.trim())
        .with_context(|| format!("save {out_s}: no JSON summary"))?;
    if let Some(p) = parent {
        if s.get("parent").is_none() {
            bail!(
                "save {out_s} --parent {} was not incremental: {}",
                p.display(),
                s["full_reason"]
            );
        }
    }
    Ok(s)
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// A hot set of `pct` % of RAM: a full save, then [`HOT_SAVES`] incremental ones.
fn hot(bin: &Path, dir: &Path, mem: u64, pct: u64, l: &Limits) -> anyhow::Result<Value> {
    let ws = working_set(mem, pct);
    // What the guest rewrites between saves (its working sets; at full speed it rewrites all of
    // them within a second).
    let hot_bytes = working_set_bytes(&ws) * VCPUS;
    let vm = boot(
        bin,
        dir,
        mem,
        &["--write-rate", "full", "--working-set", &ws],
    )?;
    let mut parent = dir.join("hot-0.snap");
    let full = save(&vm, &parent, None)?;
    let mut saves = Vec::new();
    let mut old: Option<PathBuf> = None;
    for i in 1..=HOT_SAVES {
        std::thread::sleep(BETWEEN);
        let dirty = vm.status()?["dirty_bytes"].as_u64().unwrap_or(0);
        let child = dir.join(format!("hot-{i}.snap"));
        let s = save(&vm, &child, Some(&parent))?;
        let file = s["file_bytes"].as_u64().unwrap_or(0);
        let stored = s["stored_bytes"].as_u64().unwrap_or(0);
        let dur = f(&s, "duration_s");
        // The time writing the file at the disk limit takes, as a share of the save's time.
        let disk_s = file as f64 / 1e9 / l.file_write_gbps.max(1e-9);
        saves.push(json!({
            "status_dirty_bytes": dirty, "stored_bytes": stored, "file_bytes": file,
            "inherited_bytes": s["inherited_bytes"],
            "file_per_stored": file as f64 / stored.max(1) as f64,
            "file_per_hot_set": file as f64 / hot_bytes.max(1) as f64,
            "downtime_ms": s["downtime_ms"], "guest_held_ms": s["freeze_ms"]["guest_held"],
            "freeze_ms": s["freeze_ms"], "duration_s": dur,
            "disk_share": disk_s / dur.max(1e-9),
            "guest_steps_per_s_during": s["guest_steps_per_s_during"],
        }));
        // Only the parent is needed for the next save.
        if let Some(o) = old.take() {
            let _ = std::fs::remove_file(o);
        }
        old = Some(std::mem::replace(&mut parent, child));
    }
    vm.shutdown()?;
    let col = |k: &str| saves.iter().map(|s| f(s, k)).collect::<Vec<f64>>();
    Ok(json!({
        "kind": "hot", "hot_pct": pct, "working_set_per_vcpu": ws,
        "full_save": {"duration_s": full["duration_s"], "downtime_ms": full["downtime_ms"],
                      "file_bytes": full["file_bytes"]},
        "saves": saves,
        "downtime_ms_median": median(&mut col("downtime_ms")), "downtime_ms_max": max(&col("downtime_ms")),
        "guest_held_ms_median": median(&mut col("guest_held_ms")), "guest_held_ms_max": max(&col("guest_held_ms")),
        "duration_s_median": median(&mut col("duration_s")),
        "disk_share_median": median(&mut col("disk_share")),
        "file_per_stored_median": median(&mut col("file_per_stored")),
        "file_per_hot_set_median": median(&mut col("file_per_hot_set")),
        "hot_set_bytes": hot_bytes,
        "stored_bytes_median": median(&mut col("stored_bytes")),
        "status_dirty_bytes_median": median(&mut col("status_dirty_bytes")),
        "file_write_gbps": l.file_write_gbps,
    }))
}

/// The guest's rate in the seconds after a save, tracking on against off: fresh VMs, on first,
/// two saves each.
fn tracking(
    bin: &Path,
    dir: &Path,
    mem: u64,
    hot: bool,
    memfd: bool,
    quick: bool,
) -> anyhow::Result<Value> {
    let window = Duration::from_secs(if quick { 3 } else { 5 });
    let ws = working_set(mem, 6);
    let mut out =
        json!({"kind": "tracking", "hot": hot, "memfd": memfd, "window_s": window.as_secs_f64()});
    for track in ["on", "off"] {
        let mut args = vec!["--write-rate", "full", "--track-writes", track];
        if hot {
            args.extend(["--working-set", &ws]);
        }
        if memfd {
            args.extend(["--mem-backend", "memfd"]);
        }
        let vm = boot(bin, dir, mem, &args)?;
        let before = rate(&vm, window)?;
        let mut after = Vec::new();
        for i in 0..2 {
            save(&vm, &dir.join(format!("track-{i}.snap")), None)?;
            after.push(rate(&vm, window)?);
        }
        let st = vm.status()?;
        vm.shutdown()?;
        let _ = std::fs::remove_file(dir.join("track-0.snap"));
        let _ = std::fs::remove_file(dir.join("track-1.snap"));
        let mean = after.iter().sum::<f64>() / after.len() as f64;
        out[track] = json!({
            "rate_before_first_save": before, "rate_after_saves": after, "rate_after": mean,
            "tracking_state": st["tracking"]["state"], "tracking_faults": st["tracking"]["faults"],
        });
    }
    let on = f(&out["on"], "rate_after");
    let off = f(&out["off"], "rate_after");
    out["on_per_off"] = json!(on / off.max(1e-9));
    // Each VM's rate after its saves over its own rate before: the two VMs ran at different
    // times on a shared machine.
    let kept = |v: &Value| f(v, "rate_after") / f(v, "rate_before_first_save").max(1e-9);
    out["on_per_off_normalized"] = json!(kept(&out["on"]) / kept(&out["off"]).max(1e-9));
    Ok(out)
}

/// Starts `snapctl restore [--lazy] FILE` and returns it with the time it was started; polls its
/// socket every 5 ms (not [`VmmProc::start`]'s 100 ms, which would blur a restore's time).
fn start_restore(
    bin: &Path,
    dir: &Path,
    file: &Path,
    lazy: bool,
) -> anyhow::Result<(VmmProc, Instant)> {
    let sock = dir.join("restore.sock");
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let child = Command::new(bin)
        .arg("restore")
        .args(lazy.then_some("--lazy"))
        .arg(file)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial-log")
        .arg(dir.join("restore.serial"))
        .stdin(Stdio::null())
        .spawn()
        .context("starting snapctl restore")?;
    let mut vm = VmmProc {
        child,
        sock,
        bin: bin.to_path_buf(),
    };
    while std::os::unix::net::UnixStream::connect(&vm.sock).is_err() {
        if let Some(st) = vm.child.try_wait()? {
            bail!("restore {} exited early: {st}", file.display());
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("restore {} opened no socket in 120 s", file.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((vm, t0))
}

/// Drops `file`'s pages from the page cache (`dd iflag=nocache count=0`: `POSIX_FADV_DONTNEED`
/// on the whole file; only this file, nothing else of the shared machine's cache).
fn uncache(file: &Path) -> anyhow::Result<()> {
    let st = Command::new("dd")
        .arg(format!("if={}", file.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status()
        .context("running dd")?;
    if !st.success() {
        bail!("dd iflag=nocache {} failed: {st}", file.display());
    }
    Ok(())
}

/// Eager restore: seconds from process start to every vCPU past `freeze`.
fn eager_restore_s(bin: &Path, dir: &Path, file: &Path, freeze: &[u64]) -> anyhow::Result<f64> {
    let (vm, t0) = start_restore(bin, dir, file, false)?;
    loop {
        let s = vm.steps()?;
        if s.len() == freeze.len() && s.iter().zip(freeze).all(|(a, b)| a > b) {
            let t = t0.elapsed().as_secs_f64();
            vm.shutdown()?;
            return Ok(t);
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("restored guest made no progress past {freeze:?} in 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Lazy restore: (seconds from process start to all resident, the restore's own `resident_s`).
fn lazy_restore_s(bin: &Path, dir: &Path, file: &Path) -> anyhow::Result<(f64, f64)> {
    let (vm, t0) = start_restore(bin, dir, file, true)?;
    loop {
        let r = vm.status()?["restore"].clone();
        if !r["failed"].is_null() {
            bail!("lazy restore of {} failed: {r}", file.display());
        }
        if r["resident"] == true {
            let t = t0.elapsed().as_secs_f64();
            vm.shutdown()?;
            return Ok((t, f(&r, "resident_s")));
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!(
                "lazy restore of {} not resident after 120 s",
                file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A chain of [`CHAIN_LAYERS`] layers made by `save --parent`, merged; restores of its top
/// against the merged file, alternating, twice each.
fn chain(bin: &Path, dir: &Path, mem: u64) -> anyhow::Result<Value> {
    let ws = working_set(mem, 6);
    let vm = boot(
        bin,
        dir,
        mem,
        &["--write-rate", "full", "--working-set", &ws],
    )?;
    let mut top = dir.join("chain-00.snap");
    let mut summary = save(&vm, &top, None)?;
    let mut chain_bytes = summary["file_bytes"].as_u64().unwrap_or(0);
    let mut files = vec![top.clone()];
    for i in 1..CHAIN_LAYERS {
        std::thread::sleep(Duration::from_millis(300));
        let child = dir.join(format!("chain-{i:02}.snap"));
        summary = save(&vm, &child, Some(&top))?;
        chain_bytes += summary["file_bytes"].as_u64().unwrap_or(0);
        files.push(child.clone());
        top = child;
    }
    vm.shutdown()?;
    let freeze: Vec<u64> = summary["freeze_steps"]
        .as_array()
        .context("summary without freeze_steps")?
        .iter()
        .map(|v| v.as_u64().unwrap_or(0))
        .collect();
    let merged = dir.join("chain-merged.snap");
    let t0 = Instant::now();
    let out = Command::new(bin)
        .args(["merge", top.to_str().context("path")?, "--out"])
        .arg(&merged)
        .stdin(Stdio::null())
        .output()?;
    let merge_s = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "merge failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let merged_bytes = std::fs::metadata(&merged)?.len();
    let (mut eager_chain, mut eager_merged, mut lazy_chain, mut lazy_merged) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    files.push(merged.clone());
    // Every restore reads cold files: a layer read through the page cache would otherwise be
    // fast the second time and the comparison would measure the cache.
    let uncache = || -> anyhow::Result<()> {
        for f in &files {
            uncache(f)?;
        }
        Ok(())
    };
    for _ in 0..2 {
        uncache()?;
        eager_chain.push(eager_restore_s(bin, dir, &top, &freeze)?);
        uncache()?;
        eager_merged.push(eager_restore_s(bin, dir, &merged, &freeze)?);
        uncache()?;
        lazy_chain.push(lazy_restore_s(bin, dir, &top)?);
        uncache()?;
        lazy_merged.push(lazy_restore_s(bin, dir, &merged)?);
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let lazy_res = |v: &[(f64, f64)]| v.iter().map(|x| x.1).collect::<Vec<_>>();
    let (ec, em) = (best(&eager_chain), best(&eager_merged));
    let (lc, lm) = (best(&lazy_res(&lazy_chain)), best(&lazy_res(&lazy_merged)));
    Ok(json!({
        "kind": "chain", "layers": CHAIN_LAYERS, "chain_file_bytes": chain_bytes,
        "merged_bytes": merged_bytes, "merge_s": merge_s,
        "merge_gbps": merged_bytes as f64 / merge_s.max(1e-9) / 1e9,
        "eager_chain_s": eager_chain, "eager_merged_s": eager_merged,
        "lazy_chain_s": lazy_chain, "lazy_merged_s": lazy_merged,
        "eager_chain_per_merged": ec / em.max(1e-9),
        "lazy_resident_chain_per_merged": lc / lm.max(1e-9),
        "eager_chain_best_s": ec, "eager_merged_best_s": em,
        "lazy_resident_chain_best_s": lc, "lazy_resident_merged_best_s": lm,
    }))
}

/// A guest writing random pages at [`RANDOM_RATE`] per vCPU: huge pages and rate after
/// [`RANDOM_SAVES`] incremental saves, against before the first save.
fn random(bin: &Path, dir: &Path, mem: u64, quick: bool) -> anyhow::Result<Value> {
    let window = Duration::from_secs(if quick { 3 } else { 5 });
    let wr = RANDOM_RATE.to_string();
    let vm = boot(bin, dir, mem, &["--write-rate", &wr])?;
    let pid = vm.child.id();
    let thp_before = process_thp(pid);
    let rate_before = rate(&vm, window)?;
    let mut parent = dir.join("random-00.snap");
    save(&vm, &parent, None)?;
    let mut stored = Vec::new();
    let mut old: Option<PathBuf> = None;
    for i in 1..=RANDOM_SAVES {
        std::thread::sleep(BETWEEN);
        let child = dir.join(format!("random-{i:02}.snap"));
        let s = save(&vm, &child, Some(&parent))?;
        stored.push(s["stored_bytes"].as_u64().unwrap_or(0));
        // Only the parent is needed for the next save.
        if let Some(o) = old.take() {
            let _ = std::fs::remove_file(o);
        }
        old = Some(std::mem::replace(&mut parent, child));
    }
    std::thread::sleep(BETWEEN);
    let thp_after = process_thp(pid);
    let rate_after = rate(&vm, window)?;
    vm.shutdown()?;
    Ok(json!({
        "kind": "random", "pages_per_s_per_vcpu": RANDOM_RATE, "saves": RANDOM_SAVES,
        "thp_before_bytes": thp_before, "thp_after_bytes": thp_after,
        "thp_share": thp_after as f64 / thp_before.max(1) as f64,
        "rate_before": rate_before, "rate_after": rate_after,
        "rate_share": rate_after / rate_before.max(1e-9),
        "stored_bytes_per_save": stored,
    }))
}

fn mib(b: f64) -> String {
    format!("{:.1}", b / (1 << 20) as f64)
}

fn pct(x: f64) -> String {
    format!("{:.0} %", x * 100.0)
}

/// The incremental cases' tables (empty without rows).
pub(super) fn markdown(rows: &[Value]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from("## Incremental saves\n\n");
    let loads: Vec<String> = rows
        .iter()
        .filter(|r| r.get("load_before").is_some())
        .map(|r| format!("{:.1}", f(r, "load_before")))
        .collect();
    s += &format!(
        "Built-in guest, 2 vCPUs, anonymous THP memory (`memfd`: `--mem-backend memfd`, 4 KiB pages). 1-minute load average at the start of each case: {}.\n\n",
        loads.join(", ")
    );
    for r in rows.iter().filter(|r| r.get("error").is_some()) {
        s += &format!(
            "- {}: FAILED: {}\n",
            r["case"].as_str().unwrap_or("?"),
            r["error"]
        );
    }
    let hot: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "hot").collect();
    if !hot.is_empty() {
        s += &format!(
            "\nHot set: a full save, then {HOT_SAVES} `save --parent` saves {} s apart (medians; max in brackets). \
             Held: the longest a vCPU was held out of the guest (`freeze_ms.guest_held`). Disk share: the time \
             writing the file at the disk limit measured in this run takes, over the save's time. File ÷ stored: file \
             bytes over the guest bytes the save stored (the save's own figures; zero pages are stored without \
             data); file ÷ hot set: over the bytes the guest rewrites (its working sets, all rewritten within a \
             second at full speed). Dirty: `status` `dirty_bytes` just before the save.\n\n",
            BETWEEN.as_secs()
        );
        s += "| case | hot set MiB | dirty before MiB | stored MiB | file ÷ stored | file ÷ hot set | downtime ms | held ms | save ms | disk share | full save s |\n";
        s += "|---|---|---|---|---|---|---|---|---|---|---|\n";
        for r in hot {
            s += &format!(
                "| {} | {} | {} | {} | {:.3} | {:.3} | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.0} | {} | {:.2} |\n",
                r["case"].as_str().unwrap_or("?"),
                mib(f(r, "hot_set_bytes")),
                mib(f(r, "status_dirty_bytes_median")),
                mib(f(r, "stored_bytes_median")),
                f(r, "file_per_stored_median"),
                f(r, "file_per_hot_set_median"),
                f(r, "downtime_ms_median"),
                f(r, "downtime_ms_max"),
                f(r, "guest_held_ms_median"),
                f(r, "guest_held_ms_max"),
                f(r, "duration_s_median") * 1e3,
                pct(f(r, "disk_share_median")),
                f(&r["full_save"], "duration_s"),
            );
        }
    }
    let tr: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "tracking").collect();
    if !tr.is_empty() {
        s += &format!(
            "\nTracking cost: the guest's rate (steps/s) over {} s right after each of two full saves, in a VMM \
             with write tracking on and in one with `--track-writes off` (fresh VMs, same guest and seconds); \
             before: the same window before any save. Normalized: each VM's after ÷ before, on over off. Tracker \
             faults: the write faults the tracker served since the last save, read after the last window.\n\n",
            f(tr[0], "window_s")
        );
        s += "| case | on: before → after | off: before → after | on ÷ off after | normalized | tracker faults |\n";
        s += "|---|---|---|---|---|---|\n";
        for r in tr {
            let (on, off) = (&r["on"], &r["off"]);
            s += &format!(
                "| {} | {:.0} → {:.0} | {:.0} → {:.0} | {} | {} | {} |\n",
                r["case"].as_str().unwrap_or("?"),
                f(on, "rate_before_first_save"),
                f(on, "rate_after"),
                f(off, "rate_before_first_save"),
                f(off, "rate_after"),
                pct(f(r, "on_per_off")),
                pct(f(r, "on_per_off_normalized")),
                on["tracking_faults"],
            );
        }
    }
    for r in rows.iter().filter(|r| r["kind"] == "chain") {
        s += &format!(
            "\nChain: {} layers made by `save --parent` (hot set 6 %, 0.3 s apart; {} MiB in all), merged by \
             `snapctl merge`, restores alternated, best of 2, every file dropped from the page cache before each \
             restore (merge GB/s: the merged file's bytes over the command's time, fsync included). Eager: process start to the guest's progress past \
             its freeze instant; lazy: the restore's `resident_s`.\n\n",
            r["layers"],
            mib(f(r, "chain_file_bytes"))
        );
        s += "| case | eager chain / merged s | chain ÷ merged | lazy resident chain / merged s | chain ÷ merged | merge s | merge GB/s |\n";
        s += "|---|---|---|---|---|---|---|\n";
        s += &format!(
            "| {} | {:.2} / {:.2} | {:.2} | {:.2} / {:.2} | {:.2} | {:.2} | {:.2} |\n",
            r["case"].as_str().unwrap_or("?"),
            f(r, "eager_chain_best_s"),
            f(r, "eager_merged_best_s"),
            f(r, "eager_chain_per_merged"),
            f(r, "lazy_resident_chain_best_s"),
            f(r, "lazy_resident_merged_best_s"),
            f(r, "lazy_resident_chain_per_merged"),
            f(r, "merge_s"),
            f(r, "merge_gbps"),
        );
    }
    for r in rows.iter().filter(|r| r["kind"] == "random") {
        s += &format!(
            "\nRandom writer: {} pages/s per vCPU over all of RAM; a full save, then {} `save --parent` saves {} s \
             apart. Huge pages: AnonHugePages of the VMM process (`/proc/PID/smaps_rollup`).\n\n",
            r["pages_per_s_per_vcpu"],
            r["saves"],
            BETWEEN.as_secs()
        );
        s += "| case | huge MiB before → after | share | rate before → after | share |\n";
        s += "|---|---|---|---|---|\n";
        s += &format!(
            "| {} | {} → {} | {} | {:.0} → {:.0} | {} |\n",
            r["case"].as_str().unwrap_or("?"),
            mib(f(r, "thp_before_bytes")),
            mib(f(r, "thp_after_bytes")),
            pct(f(r, "thp_share")),
            f(r, "rate_before"),
            f(r, "rate_after"),
            pct(f(r, "rate_share")),
        );
    }
    s + "\n"
}
