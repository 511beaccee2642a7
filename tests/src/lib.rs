//! The deterministic simulator of DerechoFS clusters.
//!
//! Whole clusters of [`derechofs_core::Node`] state machines run in one thread from a seed: a
//! seeded network of reliable FIFO links with random delays (reordering across links, never
//! within one), slow members, per-node clock skew, per-node persistence delays, and seeded
//! clients. After every step the [`checker`] verifies the invariants of DESIGN §9, within a
//! view and across view changes; at the end the run checks liveness. [`Options::with_faults`]
//! adds crashes (the leader's too, and during a view change) that lose or tear the unsynced
//! tail of the node's disk, restarts from what the disk kept, join bursts (joiners crashing
//! mid-join too), link breaks, partitions and swizzle-clogging; each node's log lives on a
//! simulated disk that serves state transfer. Once the faults heal, the group must install a new
//! view and deliver new requests within a bound. The same seed replays the same run exactly.

pub mod checker;
pub mod network;
pub mod rng;
pub mod simulation;

pub use checker::Violation;
pub use simulation::{run, Fault, Options, Report};
