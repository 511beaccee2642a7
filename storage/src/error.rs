//! Errors of the log, one enum for the layer, each variant naming what went wrong and where.

use std::io;

use crate::{Hlc, Version};

/// Everything that can go wrong when opening, writing or reading a log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The backend failed; `what` says which operation on which file.
    #[error("I/O error during {what}: {source}")]
    Io {
        /// The operation and file, e.g. `sync of 00000003.seg`.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An append carried a version that is not above the last one.
    #[error("version {got:#x} does not increase past the last version {last:#x}")]
    VersionNotIncreasing {
        /// The last version in the log.
        last: Version,
        /// The version of the rejected append.
        got: Version,
    },
    /// An append carried a stamp that is not above the last one.
    #[error("stamp {got} does not increase past the last stamp {last}")]
    StampNotIncreasing {
        /// The stamp of the last version in the log.
        last: Hlc,
        /// The stamp of the rejected append.
        got: Hlc,
    },
    /// A key or delta is larger than the format allows.
    #[error("{what} is {len} bytes, above the limit of {max}")]
    TooLarge {
        /// Which thing is too large.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A read asked for history that trim has dropped.
    #[error("history before version {horizon:#x} (stamp {horizon_stamp}) was trimmed; asked for {asked}")]
    Trimmed {
        /// The oldest version still readable.
        horizon: Version,
        /// Its stamp.
        horizon_stamp: Hlc,
        /// What was asked for, for the message.
        asked: String,
    },
    /// A file of the log holds something that cannot be what the log wrote.
    #[error("corrupt {file} at byte {offset}: {reason}")]
    Corrupt {
        /// The file.
        file: String,
        /// Where the problem starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An earlier write failed; the log refuses further writes until it is reopened, because the
    /// state of its tail on the backend is unknown.
    #[error("the log is read-only after an earlier write failure; reopen it to recover")]
    Poisoned,
    /// A bad argument from the caller (for example an empty key).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = LogError> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LogError {
    let what = what.into();
    move |source| LogError::Io { what, source }
}
