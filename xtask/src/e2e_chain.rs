//! `cargo xtask e2e`, the chain round trip: incremental saves of a guest writing at full speed,
//! each layer checked against the guest's oracle, the chain merged into a standalone file, and the
//! chain's top restored eagerly and lazily.

use super::{
    fmt_summary, lazy_restore_and_check, restore_and_check, save_verify_oracle, snapctl, Steps,
    VmmProc,
};
use anyhow::{bail, Context};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Incremental saves after the full one.
const CHILDREN: usize = 3;

/// Hot set per vCPU of the chain's guest: a guest rewriting all of its RAM at full speed touches
/// every 2 MiB unit within milliseconds, so its children would store everything and inherit
/// nothing.
const HOT_SET: &str = "32M";

/// Runs the chain steps (numbered from `first`): boots the built-in guest at full speed over a
/// hot set, makes the chain while it writes, checks it and restores its top.
pub(super) fn chain_round_trip(bin: &Path, dir: &Path, first: u32, st: &mut Steps) {
    let p = |n: &str| dir.join(n);
    let mut chain: Vec<(PathBuf, Value)> = Vec::new();
    let mut booted = None;
    st.run(
        &format!(
            "{first} chain: boot the built-in guest (2 vCPUs, 512 MiB, full speed over a {HOT_SET} \
             hot set per vCPU); a full save, then {CHILDREN} `save --parent` saves 1 s apart while \
             it writes, each layer verified and checked with the oracle"
        ),
        || {
            let vm = VmmProc::start(
                bin,
                &[
                    "boot",
                    "--mem",
                    "512M",
                    "--vcpus",
                    "2",
                    "--write-rate",
                    "full",
                    "--working-set",
                    HOT_SET,
                ],
                &p("chain-vm.sock"),
                &p("chain-vm.serial"),
            )?;
            vm.wait_steps_beyond(&[0, 0], Duration::from_secs(60))?;
            let vm = &*booted.insert(vm);
            let base = p("chain0.snap");
            let s = save_verify_oracle(vm, &base, &[])?;
            if s["tracking"] != true {
                bail!("writes are not tracked after the full save: {s}");
            }
            let mut detail = format!("full {}", fmt_summary(&s));
            chain.push((base, s));
            for i in 1..=CHILDREN {
                std::thread::sleep(Duration::from_secs(1));
                let st = vm.status()?;
                let dirty = st["dirty_bytes"].as_u64().with_context(|| {
                    format!("status has no dirty_bytes after a save: tracking {}", st["tracking"])
                })?;
                let parent = chain.last().expect("the base").0.clone();
                let child = p(&format!("chain{i}.snap"));
                let parent_s = parent.to_str().context("path")?;
                let s = save_verify_oracle(vm, &child, &["--parent", parent_s])?;
                if s["parent"] != parent_s {
                    bail!(
                        "layer {i} is not an incremental save of {parent_s}: {}",
                        s["full_reason"]
                    );
                }
                let (stored, inherited) = (u(&s, "stored_bytes"), u(&s, "inherited_bytes"));
                if stored + inherited != u(&s, "guest_bytes") {
                    bail!("layer {i}: stored {stored} + inherited {inherited} is not all of RAM: {s}");
                }
                if inherited == 0 {
                    bail!("layer {i} inherits nothing from its parent (the guest keeps to a hot set): {s}");
                }
                detail.push_str(&format!(
                    "; child {i}: {} MiB dirty before, {} MiB stored, {} MiB inherited, downtime {:.2} ms",
                    dirty >> 20,
                    stored >> 20,
                    inherited >> 20,
                    s["downtime_ms"].as_f64().unwrap_or(0.0)
                ));
                chain.push((child, s));
            }
            Ok(detail)
        },
    );
    if let Some(vm) = booted {
        if let Err(e) = vm.shutdown() {
            println!("     (the chain's guest did not shut down cleanly: {e:#})");
        }
    }
    if chain.len() != CHILDREN + 1 {
        for (n, what) in [
            (
                1,
                "verify and info of the chain's top; oracle of every layer",
            ),
            (2, "merge the chain into a standalone file: verify, oracle"),
            (3, "restore the chain's top eagerly, self-check"),
            (4, "restore the chain's top lazily, self-check"),
        ] {
            st.run(&format!("{} {what}", first + n), || {
                bail!("not run: step {first} made no complete chain")
            });
        }
        return;
    }
    let top = chain.last().expect("a chain").0.clone();
    let top_s = top.to_str().unwrap_or_default().to_string();

    st.run(
        &format!(
            "{} verify and info of the chain's top; oracle of every layer",
            first + 1
        ),
        || {
            let (code, out, err) = snapctl(bin, &["verify", &top_s])?;
            if code != 0 {
                bail!(
                    "verify {top_s} (and its parents) failed ({code}): {}",
                    err.trim()
                );
            }
            let (code, info, err) = snapctl(bin, &["info", &top_s])?;
            if code != 0 {
                bail!("info {top_s} failed ({code}): {}", err.trim());
            }
            // `info` lists every layer of the chain by file name.
            for (f, _) in &chain {
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                if !info.contains(name) {
                    bail!("info {top_s} does not show layer {name}:\n{info}");
                }
            }
            for (f, _) in &chain {
                let f = f.to_str().context("path")?;
                let (code, so, err) = snapctl(bin, &["oracle", f])?;
                if code != 0 {
                    bail!("oracle {f} failed ({code}): {} {}", so.trim(), err.trim());
                }
            }
            Ok(format!(
                "{} layers; verify: {}",
                chain.len(),
                out.lines().chain(err.lines()).last().unwrap_or("").trim()
            ))
        },
    );

    st.run(
        &format!(
            "{} merge the chain into a standalone file: verify, oracle",
            first + 2
        ),
        || {
            let merged = p("chain-merged.snap");
            let merged_s = merged.to_str().context("path")?;
            let t0 = std::time::Instant::now();
            let (code, _, err) = snapctl(bin, &["merge", &top_s, "--out", merged_s])?;
            let took = t0.elapsed();
            if code != 0 {
                bail!("merge {top_s} failed ({code}): {}", err.trim());
            }
            let (code, _, err) = snapctl(bin, &["verify", merged_s])?;
            if code != 0 {
                bail!("verify of the merged file failed ({code}): {}", err.trim());
            }
            let (code, info, _) = snapctl(bin, &["info", merged_s])?;
            if code != 0 {
                bail!("info of the merged file failed ({code})");
            }
            for (f, _) in &chain[..chain.len() - 1] {
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                if info.contains(name) {
                    bail!("the merged file still refers to {name}:\n{info}");
                }
            }
            let (code, so, err) = snapctl(bin, &["oracle", merged_s])?;
            if code != 0 {
                bail!(
                    "oracle of the merged file failed ({code}): {} {}",
                    so.trim(),
                    err.trim()
                );
            }
            Ok(format!(
                "[{:.2} s, {} MiB]",
                took.as_secs_f64(),
                std::fs::metadata(&merged)?.len() >> 20
            ))
        },
    );

    let top_summary = chain.last().expect("a chain").1.clone();
    st.run(
        &format!(
            "{} restore the chain's top eagerly, runs on, self-check",
            first + 3
        ),
        || {
            let vm = restore_and_check(
                bin,
                &top,
                &p("chain-eager.sock"),
                &p("chain-eager.serial"),
                &top_summary,
            )?;
            let s = vm.steps()?;
            vm.shutdown()?;
            Ok(format!("steps {s:?}"))
        },
    );
    st.run(
        &format!(
            "{} restore the chain's top lazily, runs on, fill completes, self-check, save, oracle",
            first + 4
        ),
        || {
            lazy_restore_and_check(
                bin,
                &top,
                &p("chain-lazy.sock"),
                &p("chain-lazy.serial"),
                &top_summary,
                &p("chain-lazy-saved.snap"),
            )
        },
    );
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}
