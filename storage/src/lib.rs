//! The persistent versioned log of one DerechoFS shard replica (DESIGN §3).
//!
//! A [`Log`] holds the versions a replica delivered, each with its stamp and its delta (the keys
//! it wrote, with their new values or tombstones), in append-only segment files on a
//! [`backend::Backend`]. In memory it keeps a version table (version ↔ stamp) and a multi-version
//! key index whose entries point at values inside the files, which reads hand out without copying
//! (memory maps on the file backend). The formats are drawn byte by byte in `docs/FORMATS.md`.

pub mod backend;
mod checkpoint;
mod error;
mod index;
mod log;
mod meta;
pub mod prefill;
pub mod record;
mod stamp;

pub use error::{LogError, Result};
pub use log::{
    Change, Located, Location, Log, LogConfig, PendingSync, RecordCursor, RecoveryReport, ScanPage,
    StoredRecord, SyncPolicy, OUT_OF_LINE_VALUE_MIN, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN,
    SYNCS_IN_FLIGHT_MAX,
};
pub use meta::ENGINE_STATE_MAX;
pub use prefill::{PrefillStep, Prefiller};
pub use record::Write;
pub use stamp::{version_of, Hlc, Version};
