//! Errors as errno: every failure of a file system operation is an [`FsError`] carrying the errno
//! that the mount hands to the kernel, and a sentence for logs. Build one with [`fs_err!`].

use std::fmt;

use derechofs_storage::LogError;

/// A failed file system operation: the errno the caller sees and why.
#[derive(Clone, PartialEq, Eq)]
pub struct FsError {
    /// The errno (`libc::ENOENT`, …), positive.
    pub errno: i32,
    /// What went wrong, for logs; not part of any decision.
    pub reason: String,
}

/// Builds an [`FsError`]: `fs_err!(libc::ENOENT, "no entry {name:?}")`.
#[macro_export]
macro_rules! fs_err {
    ($errno:expr, $($arg:tt)+) => {
        $crate::FsError::new($errno, format!($($arg)+))
    };
}

/// Returns early with an [`FsError`]: `fs_bail!(libc::EEXIST, "{name:?} exists")`.
#[macro_export]
macro_rules! fs_bail {
    ($errno:expr, $($arg:tt)+) => {
        return Err($crate::fs_err!($errno, $($arg)+).into())
    };
}

impl FsError {
    /// An error with `errno` and `reason`.
    pub fn new(errno: i32, reason: impl Into<String>) -> FsError {
        FsError {
            errno,
            reason: reason.into(),
        }
    }

    /// The symbolic name of the errno, for messages (`"ENOENT"`).
    pub fn name(&self) -> &'static str {
        errno_name(self.errno)
    }
}

/// The symbolic name of the errnos this crate returns; `"E?"` for others.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::E2BIG => "E2BIG",
        libc::ENOTSUP => "ENOTSUP",
        libc::EOVERFLOW => "EOVERFLOW",
        _ => "E?",
    }
}

impl fmt::Debug for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name(), self.reason)
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.name())
    }
}

impl std::error::Error for FsError {}

impl From<LogError> for FsError {
    /// History dropped by trim reads as absent (ENOENT, DESIGN §5); anything else the log reports
    /// is an I/O error of this replica.
    fn from(e: LogError) -> FsError {
        match e {
            LogError::Trimmed { .. } => FsError::new(libc::ENOENT, e.to_string()),
            other => FsError::new(libc::EIO, other.to_string()),
        }
    }
}

/// Shorthand for results of this crate.
pub type FsResult<T> = Result<T, FsError>;

/// Why an operation did not apply: an errno decided in the order (the reply), or a failure of
/// this replica's store (which must stop the replica: its state can no longer follow the others).
#[derive(Debug)]
pub(crate) enum Fail {
    /// The reply.
    Fs(FsError),
    /// The replica's store failed.
    Store(LogError),
}

impl From<FsError> for Fail {
    fn from(e: FsError) -> Fail {
        Fail::Fs(e)
    }
}

impl From<LogError> for Fail {
    fn from(e: LogError) -> Fail {
        Fail::Store(e)
    }
}

impl From<crate::codec::DecodeError> for Fail {
    /// A record of this crate's own that does not decode: the replica's store is corrupt.
    fn from(e: crate::codec::DecodeError) -> Fail {
        Fail::Store(LogError::Corrupt {
            file: "file system state".into(),
            offset: 0,
            reason: e.to_string(),
        })
    }
}
