//! The FUSE side of DerechoFS: mount options, running a mount in the foreground until it is
//! unmounted, and a passthrough of a local directory (the benchmarks' FUSE limit and the test
//! harness's reference).

pub mod options;
pub mod passthrough;
pub mod session;

pub use options::{MountOptions, OptionError};
pub use passthrough::Passthrough;
pub use session::{serve, MountError};
