//! Bad snapshot files, shared by the sweep tests (`sweep_*.rs`, `lies_*.rs`): real snapshots
//! written by ram-saver's writer (8 MiB of guest memory in two regions: zero pages, random pages,
//! repetitive pages and sparse pages, saved in shuffled block order, once raw and once with zstd
//! (format 2: records in zstd pieces) and a parent reference, and that zstd file re-encoded as
//! format 1 wrote it (one zstd frame per record), carrying the real machine state of a booted
//! built-in guest captured
//! once by vmm-core, `tests/data/`) are damaged in every way we can think of. For every damaged
//! file, `SnapshotReader::open` + `verify` and, separately, `open` + `load_into` (into fresh
//! guest memory) must return a typed [`FormatError`](ram_saver::FormatError): never `Ok`, never a
//! panic (every attempt runs under `catch_unwind`), never a hang (a watchdog bounds every test,
//! and every attempt is timed), never an absurd allocation (the process's address space is
//! limited with RLIMIT_AS, so an allocation driven by an unchecked length aborts the run, and
//! `VmHWM` bounds the peak RSS).
//!
//! - `sweep_flips`: byte flips and zeroed 4 KiB windows through every section.
//! - `sweep_truncation`: truncations, appended bytes, foreign and tiny files.
//! - `lies_header`, `lies_machine_state`, `lies_records`, `lies_coverage`, `lies_trailer`:
//!   lies in length, count, page and offset fields, section by section, re-encoded with valid
//!   checksums by this directory's own encoder of the documented layout (`layout`, checked to
//!   reproduce the writer's output byte for byte) so that only the lie itself can give the file
//!   away; plus a newer format version and another architecture code, and valid re-encodings
//!   (records reordered, a zero run split in two) as controls that must be accepted.
//!
//! What only decoding the machine state can catch (a KVM struct of the wrong size, duplicate
//! vCPU ids, …) is tested with vmm-core, in `tests/tests/machine_state_sweep.rs`.
//!
//! Expected error for damage, by the first section the reader checks (it checks in this order;
//! of the trailer it checks the tag and totals first, its index and crc after the machine
//! state, still before any record):
//!
//! | damaged bytes                                | kind           | record      |
//! |----------------------------------------------|----------------|-------------|
//! | magic (0..8)                                 | `NotASnapshot` | -           |
//! | format version (8..12)                       | `Unsupported`  | -           |
//! | footer (last 32 bytes), truncation, appended | `Incomplete`   | -           |
//! | trailer (totals, index, crc)                 | `Corrupt`      | -           |
//! | rest of the header (incl. `header_len`)      | `Corrupt`      | -           |
//! | machine state (tag, length, crc, blob)       | `Corrupt`      | -           |
//! | record `i` (header or payload)               | `Corrupt`      | `Some(i)`   |
//!
//! Files shorter than the magic may also be called `NotASnapshot`.
//!
//! Lies: length/count/offset/page lies and coverage errors (overlap, outside guest memory,
//! missing pages) are `Corrupt` (naming the record where the reader can know it); a footer that
//! does not point at a trailer ending before it is `Incomplete`; version, architecture, page
//! size, codec and flags this build does not know are `Unsupported` (the message names the
//! version / architecture); a header layout that differs from the target memory may also be
//! `Mismatch` for `load_into`. Trailer totals that disagree with the records are `Corrupt` for
//! `load_into` too: a trailer that lies is not a valid trailer, and the totals are what
//! `load_into` returns.

// Each test binary uses the part of these helpers its sweep needs.
#![allow(dead_code)]

pub mod check;
pub mod guest;
pub mod layout;
pub mod run;
