//! Attempts (open + verify, open + load_into, records) under `catch_unwind`, what each must
//! give, and the statistics of a sweep.

use std::collections::BTreeMap;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use ram_saver::{ErrorKind, FormatError, SnapshotReader};
use vm_memory::GuestMemoryMmap;

use super::guest::new_mem;
use super::layout::Sec;

#[derive(Debug)]
pub enum Outcome {
    Accepted,
    Err {
        kind: ErrorKind,
        record: Option<u64>,
        msg: String,
        stage: &'static str,
    },
    Panic(String),
}

pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic>".into())
}

/// Run `f` under `catch_unwind`; `stage` says where an error came from.
pub fn guarded(f: impl FnOnce(&mut &'static str) -> Result<(), FormatError>) -> Outcome {
    let mut stage = "open";
    let r = panic::catch_unwind(AssertUnwindSafe(|| f(&mut stage)));
    match r {
        Ok(Ok(())) => Outcome::Accepted,
        Ok(Err(e)) => Outcome::Err {
            kind: e.kind(),
            record: e.record(),
            msg: e.to_string(),
            stage,
        },
        Err(p) => Outcome::Panic(panic_text(&*p)),
    }
}

pub fn try_verify(path: &Path) -> Outcome {
    guarded(|stage| {
        let mut r = SnapshotReader::open(path)?;
        *stage = "verify";
        r.verify(&mut |_| {})?;
        Ok(())
    })
}

pub fn try_load(path: &Path, loaded: Option<&mut Option<GuestMemoryMmap>>) -> Outcome {
    let mut mem_out = None;
    let o = guarded(|stage| {
        let mut r = SnapshotReader::open(path)?;
        *stage = "load_into";
        let mem = new_mem();
        r.load_into(&mem, &mut |_| {})?;
        mem_out = Some(mem);
        Ok(())
    });
    if let Some(l) = loaded {
        *l = mem_out;
    }
    o
}

/// Drain `records()` (no expectation: it does not check coverage); it must not panic.
pub fn try_records(path: &Path) -> Outcome {
    guarded(|stage| {
        let mut r = SnapshotReader::open(path)?;
        *stage = "records";
        for rec in r.records() {
            rec?;
        }
        Ok(())
    })
}

#[derive(Clone, Debug)]
pub struct Expect {
    pub kinds: &'static [ErrorKind],
    /// The error must name this record.
    pub record: Option<u64>,
    /// The (lowercased) message must contain this.
    pub msg: Option<&'static str>,
}

pub const CORRUPT: &[ErrorKind] = &[ErrorKind::Corrupt];
pub const INCOMPLETE: &[ErrorKind] = &[ErrorKind::Incomplete];
pub const UNSUPPORTED: &[ErrorKind] = &[ErrorKind::Unsupported];
pub const NOT_A_SNAPSHOT: &[ErrorKind] = &[ErrorKind::NotASnapshot];
pub const SHORT: &[ErrorKind] = &[ErrorKind::Incomplete, ErrorKind::NotASnapshot];
pub const INCOMPLETE_OR_CORRUPT: &[ErrorKind] = &[ErrorKind::Incomplete, ErrorKind::Corrupt];
pub const CORRUPT_OR_MISMATCH: &[ErrorKind] = &[ErrorKind::Corrupt, ErrorKind::Mismatch];

pub fn ex(kinds: &'static [ErrorKind]) -> Expect {
    Expect {
        kinds,
        record: None,
        msg: None,
    }
}

pub fn ex_rec(kinds: &'static [ErrorKind], record: usize) -> Expect {
    Expect {
        record: Some(record as u64),
        ..ex(kinds)
    }
}

pub fn ex_msg(kinds: &'static [ErrorKind], msg: &'static str) -> Expect {
    Expect {
        msg: Some(msg),
        ..ex(kinds)
    }
}

/// What damage to the first-checked damaged section must produce (see the module docs).
pub fn expect_for(sec: Sec) -> Expect {
    match sec {
        Sec::Magic => ex(NOT_A_SNAPSHOT),
        Sec::Version => ex_msg(UNSUPPORTED, "version"),
        Sec::Footer => ex(INCOMPLETE),
        Sec::Trailer | Sec::Header | Sec::State => ex(CORRUPT),
        Sec::Record(i) => ex_rec(CORRUPT, i as usize),
    }
}

#[derive(Default)]
pub struct Stats {
    pub files: usize,
    pub attempts: usize,
    pub panics: usize,
    pub accepted: usize,
    pub by_kind: BTreeMap<String, usize>,
    pub by_stage: BTreeMap<String, usize>,
    pub failures: Vec<String>,
    pub slowest: (Duration, String),
}

impl Stats {
    pub fn merge(&mut self, o: Stats) {
        self.files += o.files;
        self.attempts += o.attempts;
        self.panics += o.panics;
        self.accepted += o.accepted;
        for (k, v) in o.by_kind {
            *self.by_kind.entry(k).or_default() += v;
        }
        for (k, v) in o.by_stage {
            *self.by_stage.entry(k).or_default() += v;
        }
        self.failures.extend(o.failures);
        if o.slowest.0 > self.slowest.0 {
            self.slowest = o.slowest;
        }
    }

    pub fn timed(&mut self, what: &str, t0: Instant) {
        let d = t0.elapsed();
        if d > self.slowest.0 {
            self.slowest = (d, what.to_string());
        }
    }

    pub fn check(&mut self, what: &str, path: &str, o: &Outcome, e: &Expect) {
        self.attempts += 1;
        match o {
            Outcome::Panic(m) => {
                self.panics += 1;
                self.failures.push(format!("{what} [{path}]: PANIC: {m}"));
            }
            Outcome::Accepted => {
                self.accepted += 1;
                self.failures.push(format!(
                    "{what} [{path}]: accepted (expected {:?})",
                    e.kinds
                ));
            }
            Outcome::Err {
                kind,
                record,
                msg,
                stage,
            } => {
                *self.by_kind.entry(format!("{kind:?}")).or_default() += 1;
                *self.by_stage.entry(format!("{path}@{stage}")).or_default() += 1;
                let mut bad = Vec::new();
                if !e.kinds.contains(kind) {
                    bad.push(format!("kind {kind:?}, expected {:?}", e.kinds));
                }
                if e.record.is_some() && *record != e.record {
                    bad.push(format!("record {record:?}, expected {:?}", e.record));
                }
                if let Some(m) = e.msg {
                    if !msg.to_lowercase().contains(m) {
                        bad.push(format!("message lacks {m:?}"));
                    }
                }
                if !bad.is_empty() {
                    self.failures.push(format!(
                        "{what} [{path}]: {} (at {stage}: {msg})",
                        bad.join("; ")
                    ));
                }
            }
        }
    }
}
