//! The deterministic simulator of DerechoFS clusters.
//!
//! Whole clusters of [`derechofs_core::Node`] state machines run in one thread from a seed: a
//! seeded network of reliable FIFO links with random delays (reordering across links, never
//! within one), slow members, per-node clock skew, per-node persistence delays, and seeded
//! clients. After every step the [`checker`] verifies the invariants of DESIGN §9, within a
//! view and across view changes; at the end the run checks liveness. [`Options::with_faults`]
//! adds crashes (the leader's too, and during a view change), link breaks, partitions and
//! swizzle-clogging; once they heal, the group must install a new view and deliver new
//! requests within a bound. The same seed replays the same run exactly.

pub mod checker;
pub mod network;
pub mod rng;
pub mod simulation;

pub use checker::Violation;
pub use simulation::{run, Fault, Options, Report};
