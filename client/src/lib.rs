//! A client of a DerechoFS cluster, as a library: what the FUSE mount and the `derechofs`
//! command use to reach the nodes.
//!
//! - [`remote`]: [`RemoteShards`], the file system's [`Shards`](derechofs_fs::Shards) seam over
//!   the client protocol (`derechofs_core::protocol`), so that
//!   `derechofs_fs::FileSystem::new(RemoteShards::connect(..)?, ..)` is the file system of a
//!   running cluster.
//!
//! Dependencies point down: `mount`, `tools` → `client` → `fs` → `core`, `storage`.

pub mod remote;

pub use remote::{RemoteConfig, RemoteError, RemoteShards};
