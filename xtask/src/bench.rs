//! `cargo xtask bench`: performance figures on the built-in guest, written to `target/bench/`.

use anyhow::{bail, Context};
use std::process::Command;

/// Entry point of `cargo xtask bench [uffd]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("uffd") => uffd(),
        _ => {
            uffd()?;
            Ok(())
        }
    }
}

/// userfaultfd figures: fault service latency, write-protect time for 1 and 4 GiB.
fn uffd() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .current_dir(crate::root())
        .args(["run", "--release", "-p", "wp-tracker", "--example", "wp_bench"])
        .status()
        .context("running wp_bench")?;
    if !st.success() {
        bail!("wp_bench failed");
    }
    Ok(())
}
