//! What a save is asked to do ([`SaveParams`], the shape the control protocol carries) and its
//! one validation into ram-saver's [`SaveOptions`].

use std::path::Path;

use ram_saver::{Compression, SaveOptions};
use serde::{Deserialize, Serialize};

/// ram-saver's default scan unit (`SaveOptions::block_size`), used when `scan_block` is not given.
const DEFAULT_SCAN_BLOCK: usize = 2 << 20;

/// Largest accepted `fault_block` / `scan_block`.
pub const MAX_TUNING_BLOCK: usize = 64 << 20;

/// Lowest accepted `max_bandwidth`: pages stay write-protected until the scan reaches them, so a
/// crawling scan would keep the guest's memory protected (and its writes faulting) for hours.
pub const MIN_BANDWIDTH: u64 = 1 << 20;

/// Smallest accepted `max_staging`: less would make nearly every write of a busy guest wait for
/// the output.
pub const MIN_MAX_STAGING: u64 = 4 << 20;

/// Default zstd level.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Nice value of the scan and compression threads for `background` saves.
const BACKGROUND_NICE: i32 = 10;

/// Parameters of a live save, as a client asks for it (serialized as is by the control protocol).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SaveParams {
    /// Absolute target path. With `stream`, an existing FIFO (or other special file) to write the
    /// stream into.
    pub path: String,
    /// Write the snapshot as a stream into `path` as it is (no temporary file, no rename).
    #[serde(default)]
    pub stream: bool,
    /// Compress records with zstd.
    #[serde(default)]
    pub zstd: bool,
    /// zstd level (1..=19).
    #[serde(default)]
    pub level: Option<i32>,
    /// Limit for the linear scan, bytes per second. Faulted pages are never throttled.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// Replace an existing file at `path`.
    #[serde(default)]
    pub force: bool,
    /// Run the scan and compression threads at low CPU priority: a busy guest keeps more of its
    /// speed, the save takes longer. Faulted pages are served first either way.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub background: bool,
    /// Cap of the memory that guest writes are staged in before they are written, bytes
    /// (default: half of the host's available memory, never more than guest RAM). At least
    /// 4 MiB, at most the host's memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_staging: Option<u64>,
    /// Fault staging to allocate before the freeze (default `auto`). Memory never used before is
    /// slow to come by on some hosts (a cloud VM's first touch of a page goes through the
    /// hypervisor below it); prepared ahead, a guest writing all over its memory does not wait
    /// for it during the save. The save starts that much later and holds the memory until it
    /// ends. At most the staging cap is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare_staging: Option<PrepareStaging>,
    /// Tuning knob: bytes the fault handler copies and releases per write fault (default: chosen
    /// by ram-saver from the memory's backing). A power of two from 4096 to 64 MiB, not larger than
    /// the scan block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_block: Option<usize>,
    /// Tuning knob: bytes the linear scan copies and releases per unit (default 2 MiB). A power
    /// of two from 4096 to 64 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_block: Option<usize>,
    /// Tuning knob: do not collapse huge pages that small releases split back after the save.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_huge_restore: bool,
    /// Tuning knob: do not hash the pages this save stores, and store every page of the units
    /// written since the parent instead of only those whose content changed (the VMM's page
    /// hashes are then forgotten: later incremental saves store whole written units until a
    /// full save hashes every page again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_page_hashes: bool,
    /// An incremental save: the absolute path of this VM's last snapshot, whose content the new
    /// file then inherits where the guest wrote nothing since (the file stores a reference to
    /// it). Without a record of the writes since that snapshot's freeze, all memory is saved and
    /// the report says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// How much fault staging a save prepares before its freeze ([`SaveParams::prepare_staging`]).
/// On the wire: `"auto"` or `{"bytes": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PrepareStaging {
    /// What the guest wrote since the VM's last save (its record of writes: a guest that wrote
    /// all over its memory will fault all over it during the save too), within the staging cap;
    /// 16 MiB without a record (the first save, or write tracking off).
    Auto,
    /// This many bytes (0: only the 16 MiB every save prepares), within the staging cap.
    Bytes(u64),
}

/// Checks a tuning block size: a power of two, a multiple of 4096, at most [`MAX_TUNING_BLOCK`].
fn check_block(name: &str, b: usize) -> Result<(), String> {
    if b < 4096 || !b.is_power_of_two() || b > MAX_TUNING_BLOCK {
        return Err(format!(
            "{name} must be a power of two from 4096 to {MAX_TUNING_BLOCK} bytes, not {b}"
        ));
    }
    Ok(())
}

/// Checks a staging cap against [`MIN_MAX_STAGING`] and the host's memory (`host_bytes`, if
/// known): a cap the host could never give is a mistake, not a wish.
fn check_max_staging(m: u64, host_bytes: Option<u64>) -> Result<(), String> {
    if m < MIN_MAX_STAGING {
        return Err(format!(
            "max_staging must be at least {MIN_MAX_STAGING} bytes (4 MiB), not {m}"
        ));
    }
    if let Some(host) = host_bytes {
        if m > host {
            return Err(format!(
                "max_staging ({m} bytes) is more than the host's memory ({host} bytes)"
            ));
        }
    }
    Ok(())
}

impl SaveParams {
    /// The compression these parameters ask for.
    pub fn compression(&self) -> Compression {
        if self.zstd {
            Compression::Zstd {
                level: self.level.unwrap_or(DEFAULT_ZSTD_LEVEL),
            }
        } else {
            Compression::None
        }
    }

    /// Checks the parameters and turns them into ram-saver's options; the error says what is
    /// wrong. The only place they are checked.
    pub fn options(&self) -> Result<SaveOptions, String> {
        if !Path::new(&self.path).is_absolute() {
            return Err(format!(
                "the save path must be absolute, not `{}`",
                self.path
            ));
        }
        if let Some(parent) = &self.parent {
            if !Path::new(parent).is_absolute() {
                return Err(format!("the parent path must be absolute, not `{parent}`"));
            }
            if self.stream {
                return Err(
                    "an incremental save (parent) needs a file target, not a stream".into(),
                );
            }
            if parent == &self.path {
                return Err("the parent and the new file must differ".into());
            }
        }
        if let Some(l) = self.level {
            if !(1..=19).contains(&l) {
                return Err(format!("zstd level must be 1..=19, not {l}"));
            }
        }
        if let Some(b) = self.max_bandwidth {
            if b < MIN_BANDWIDTH {
                return Err(format!(
                    "max_bandwidth must be at least {MIN_BANDWIDTH} bytes/s (1 MiB/s), not {b}"
                ));
            }
        }
        if let Some(m) = self.max_staging {
            check_max_staging(m, ram_saver::host_total_memory())?;
        }
        if let Some(b) = self.fault_block {
            check_block("fault_block", b)?;
        }
        if let Some(b) = self.scan_block {
            check_block("scan_block", b)?;
        }
        let block_size = self.scan_block.unwrap_or(DEFAULT_SCAN_BLOCK);
        if let Some(f) = self.fault_block {
            if f > block_size {
                return Err(format!(
                    "fault_block ({f}) must not be larger than scan_block ({block_size})"
                ));
            }
        }
        let defaults = SaveOptions::default();
        Ok(SaveOptions {
            compression: self.compression(),
            max_bandwidth: self.max_bandwidth,
            max_staging: self
                .max_staging
                .map(|m| usize::try_from(m).unwrap_or(usize::MAX)),
            block_size,
            fault_block_size: self.fault_block,
            bulk_nice: self.background.then_some(BACKGROUND_NICE),
            restore_huge_pages: defaults.restore_huge_pages && !self.no_huge_restore,
            ..defaults
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> SaveParams {
        SaveParams {
            path: "/tmp/x.snap".into(),
            ..SaveParams::default()
        }
    }

    #[test]
    fn bad_parameters_are_refused_with_what_is_wrong() {
        let cases: Vec<(SaveParams, &str)> = vec![
            (
                SaveParams {
                    path: "rel.snap".into(),
                    ..p()
                },
                "absolute",
            ),
            (
                SaveParams {
                    level: Some(20),
                    ..p()
                },
                "1..=19",
            ),
            (
                SaveParams {
                    max_bandwidth: Some(1000),
                    ..p()
                },
                "at least",
            ),
            (
                SaveParams {
                    fault_block: Some(4097),
                    ..p()
                },
                "power of two",
            ),
            (
                SaveParams {
                    scan_block: Some(128 << 20),
                    ..p()
                },
                "power of two",
            ),
            (
                SaveParams {
                    fault_block: Some(4 << 20),
                    ..p()
                },
                "not be larger",
            ),
            (
                SaveParams {
                    max_staging: Some(0),
                    ..p()
                },
                "at least",
            ),
            (
                SaveParams {
                    parent: Some("rel.snap".into()),
                    ..p()
                },
                "parent path must be absolute",
            ),
            (
                SaveParams {
                    parent: Some("/tmp/p.snap".into()),
                    stream: true,
                    ..p()
                },
                "not a stream",
            ),
            (
                SaveParams {
                    parent: Some("/tmp/x.snap".into()),
                    ..p()
                },
                "must differ",
            ),
            (
                SaveParams {
                    max_staging: Some(u64::MAX),
                    ..p()
                },
                "more than the host",
            ),
        ];
        for (params, needle) in cases {
            let e = params.options().unwrap_err();
            assert!(e.contains(needle), "{params:?}: {e}");
        }
    }

    #[test]
    fn good_parameters_become_options() {
        let o = SaveParams {
            zstd: true,
            level: Some(5),
            background: true,
            scan_block: Some(4 << 20),
            fault_block: Some(4096),
            no_huge_restore: true,
            max_bandwidth: Some(1 << 30),
            max_staging: Some(64 << 20),
            ..p()
        }
        .options()
        .unwrap();
        assert_eq!(o.max_staging, Some(64 << 20));
        assert_eq!(o.compression, Compression::Zstd { level: 5 });
        assert_eq!(o.block_size, 4 << 20);
        assert_eq!(o.fault_block_size, Some(4096));
        assert_eq!(o.bulk_nice, Some(BACKGROUND_NICE));
        assert!(!o.restore_huge_pages);
        assert_eq!(o.max_bandwidth, Some(1 << 30));
        let d = p().options().unwrap();
        assert_eq!(d.compression, Compression::None);
        assert_eq!(d.block_size, DEFAULT_SCAN_BLOCK);
        assert!(d.restore_huge_pages);
        assert_eq!(d.max_staging, None);
    }

    #[test]
    fn staging_cap_bounds() {
        assert!(check_max_staging(MIN_MAX_STAGING, Some(1 << 30)).is_ok());
        assert!(check_max_staging(MIN_MAX_STAGING - 1, None).is_err());
        assert!(check_max_staging(1 << 30, Some(1 << 30)).is_ok());
        assert!(check_max_staging((1 << 30) + 1, Some(1 << 30)).is_err());
        // Unknown host memory: only the floor is checked.
        assert!(check_max_staging(u64::MAX, None).is_ok());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<SaveParams>(r#"{"path":"/x","zstdd":true}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
