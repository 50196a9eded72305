//! Errors reading, verifying, writing or loading a snapshot file, and their broad kinds (which
//! the command-line tool maps to exit codes).

use std::io;

/// Broad category of a [`FormatError`], for mapping to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ErrorKind {
    /// The file could not be read (I/O).
    Unreadable,
    /// The output could not be written (I/O).
    Unwritable,
    /// Not a snapshot file at all.
    NotASnapshot,
    /// The file has no valid trailer/footer: the save did not finish.
    Incomplete,
    /// The file is damaged: a checksum, structure or page-coverage error.
    Corrupt,
    /// A version, architecture or feature this build does not support.
    Unsupported,
    /// The snapshot does not fit the target (memory layout differs).
    Mismatch,
}

/// Errors reading, verifying, writing or loading a snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// I/O error while reading.
    #[error("cannot read snapshot")]
    Unreadable(#[source] io::Error),
    /// I/O error while writing.
    #[error("cannot write snapshot")]
    Unwritable(#[source] io::Error),
    /// The file does not start with the snapshot magic.
    #[error("not a snapshot file (bad magic)")]
    NotASnapshot,
    /// No valid footer/trailer: the file was truncated or its save never finished.
    #[error("snapshot is incomplete: {reason}")]
    Incomplete {
        /// What is missing.
        reason: String,
    },
    /// A checksum or structure error.
    #[error("snapshot is corrupt: {what}{} at offset {offset}", record_suffix(*record))]
    Corrupt {
        /// What is wrong.
        what: String,
        /// Index of the record concerned (file order), if any.
        record: Option<u64>,
        /// File offset of the damaged structure.
        offset: u64,
    },
    /// A guest page is missing or appears more than once.
    #[error("snapshot page coverage error: page {page} {what}{}", record_suffix(*record))]
    Coverage {
        /// "missing" or "appears twice" or "outside guest memory".
        what: &'static str,
        /// Guest page number.
        page: u64,
        /// Record where the problem was seen, if any.
        record: Option<u64>,
    },
    /// The format version is not supported.
    #[error("unsupported snapshot format version {found} (this build reads {supported})")]
    UnsupportedVersion {
        /// Version found in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The snapshot is for another architecture.
    #[error("snapshot is for architecture {found}, not x86_64")]
    WrongArchitecture {
        /// Architecture code found.
        found: u32,
    },
    /// A feature of the file is not supported (page size, codec, flags).
    #[error("unsupported snapshot feature: {what}")]
    Unsupported {
        /// The feature.
        what: String,
    },
    /// Pages of an incremental snapshot (a child) are its parent's (Parent records): the file
    /// alone cannot give them; open it with its parents as a [`Chain`](crate::Chain).
    #[error("{} in the parent snapshot: read it as a chain with its parents", in_parent_what(*record))]
    InParent {
        /// The Parent record asked for (index), or `None`: the file as a whole.
        record: Option<u64>,
    },
    /// A writer was given Parent records (pages the parent holds) for a file whose header has
    /// no parent reference.
    #[error("parent records need a header with a parent reference")]
    ParentRunWithoutParent,
    /// A layer of a chain (1: the file named, 2: its parent, …) is bad: `source` says how (the
    /// message names the layer; its source, the problem).
    #[error("layer {layer} ({})", path.display())]
    InLayer {
        /// The layer, counted from the top (1).
        layer: usize,
        /// Its file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<FormatError>,
    },
    /// The parent file a child names (layer `layer` of its chain) cannot be opened.
    #[error("layer {layer} ({}): parent not found (restore it to that path, or merge the chain before moving files)", path.display())]
    ParentNotFound {
        /// The missing layer, counted from the top (1).
        layer: usize,
        /// Where the child says its parent is.
        path: std::path::PathBuf,
        /// Why it cannot be opened.
        #[source]
        source: io::Error,
    },
    /// The file at a child's parent path is not the parent the child was written against
    /// (another save, or the file was rewritten since): its identity differs.
    #[error("layer {layer} ({}): parent changed since the child was written (identity {found}, the child expects {expected})", path.display())]
    ParentChanged {
        /// The layer, counted from the top (1).
        layer: usize,
        /// Its file.
        path: std::path::PathBuf,
        /// The identity the child names.
        expected: crate::format::Identity,
        /// The identity of the file found there.
        found: crate::format::Identity,
    },
    /// A parent's page size or memory regions differ from its child's.
    #[error("layer {layer} ({}): guest memory layout differs from the child's", path.display())]
    ParentLayoutDiffers {
        /// The layer, counted from the top (1).
        layer: usize,
        /// Its file.
        path: std::path::PathBuf,
    },
    /// A chain longer than [`MAX_CHAIN_LAYERS`](crate::MAX_CHAIN_LAYERS) layers.
    #[error("snapshot chain longer than {max} layers (merge it)")]
    ChainTooDeep {
        /// The limit.
        max: usize,
    },
    /// The snapshot does not match the target guest memory.
    #[error("snapshot does not match guest memory: {what}")]
    LayoutMismatch {
        /// How they differ.
        what: String,
    },
}

fn in_parent_what(record: Option<u64>) -> String {
    match record {
        Some(r) => format!("the pages of record {r} are"),
        None => "some pages of this snapshot are".into(),
    }
}

fn record_suffix(record: Option<u64>) -> String {
    match record {
        Some(r) => format!(" in record {r}"),
        None => String::new(),
    }
}

impl FormatError {
    /// The broad category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FormatError::Unreadable(_) => ErrorKind::Unreadable,
            FormatError::Unwritable(_) => ErrorKind::Unwritable,
            FormatError::NotASnapshot => ErrorKind::NotASnapshot,
            FormatError::Incomplete { .. } => ErrorKind::Incomplete,
            FormatError::Corrupt { .. } | FormatError::Coverage { .. } => ErrorKind::Corrupt,
            FormatError::UnsupportedVersion { .. }
            | FormatError::WrongArchitecture { .. }
            | FormatError::Unsupported { .. }
            | FormatError::InParent { .. }
            | FormatError::ParentRunWithoutParent => ErrorKind::Unsupported,
            FormatError::LayoutMismatch { .. }
            | FormatError::ParentChanged { .. }
            | FormatError::ParentLayoutDiffers { .. } => ErrorKind::Mismatch,
            FormatError::InLayer { source, .. } => source.kind(),
            FormatError::ParentNotFound { .. } => ErrorKind::Unreadable,
            FormatError::ChainTooDeep { .. } => ErrorKind::Unsupported,
        }
    }

    /// The record index this error names, if any.
    pub fn record(&self) -> Option<u64> {
        match self {
            FormatError::Corrupt { record, .. } | FormatError::Coverage { record, .. } => *record,
            FormatError::InLayer { source, .. } => source.record(),
            _ => None,
        }
    }
}
