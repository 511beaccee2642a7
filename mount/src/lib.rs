//! The FUSE side of DerechoFS: the adapter from kernel requests to `derechofs-fs`, mount options,
//! running a mount in the foreground until it is unmounted, and a passthrough of a local
//! directory (the benchmarks' FUSE limit and the test harness's reference).

pub mod adapter;
pub mod options;
pub mod passthrough;
pub mod session;

pub use adapter::DerechoFs;
pub use options::{MountOptions, OptionError};
pub use passthrough::Passthrough;
pub use session::{serve, MountError};
