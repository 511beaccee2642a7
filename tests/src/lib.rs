//! The deterministic simulator of DerechoFS clusters.
//!
//! Whole clusters of [`derechofs_core::Node`] state machines run in one thread from a seed: a
//! seeded network of reliable FIFO links with random delays (reordering across links, never
//! within one), slow members, per-node clock skew, per-node persistence delays, and seeded
//! clients. After every step the [`checker`] verifies the invariants of a static view (DESIGN
//! §9); at the end the run checks liveness. The same seed replays the same run exactly.

pub mod checker;
pub mod network;
pub mod rng;
pub mod simulation;

pub use checker::Violation;
pub use simulation::{run, Fault, Options, Report};
