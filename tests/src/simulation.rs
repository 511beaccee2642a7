//! One simulated cluster run: nodes, network, disks, clients and the event loop that drives
//! them, checking every invariant after every step.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};

use bytes::Bytes;
use derechofs_core::{
    Action, Barrier, Config, Decision, Delivery, Hlc, Input, LayoutSpec, Membership, Message, Node,
    NodeId, Now, Record, Request, ShardId, StepError, SubmitError, Version, View,
};

/// Ids of probe requests: above every client's.
const PROBE_ID_BASE: u64 = (u32::MAX as u64) << 32;

use crate::checker::{Checker, Violation};
use crate::network::Network;
use crate::rng::Rng;

/// Microseconds since the Unix epoch at which simulated time starts: stamps look like real ones.
const EPOCH_US: u64 = 1_700_000_000_000_000;

/// Everything that shapes one run. [`Options::from_seed`] draws them all from the seed; tests
/// may then adjust them for a scenario.
#[derive(Clone, Debug)]
pub struct Options {
    /// The seed of every random choice of the run.
    pub seed: u64,
    /// Members of the first view.
    pub nodes: usize,
    /// Nodes outside the first view, which the faults may make join (`Fault::Join`). They
    /// take the indices after the members.
    pub spares: usize,
    /// The shard layout.
    pub spec: LayoutSpec,
    /// Flow control window of every node.
    pub window: u32,
    /// Batch bound of every node.
    pub batch_bytes_max: usize,
    /// Heartbeat interval of every node.
    pub heartbeat_ms: u64,
    /// Silence before suspicion.
    pub suspect_after_ms: u64,
    /// Range of one-way link delays, before slowness.
    pub delay_us: (u64, u64),
    /// Per node: multiplier of the delays of its links.
    pub slowness: Vec<u64>,
    /// Per node: offset of its clock from true time.
    pub skew_us: Vec<i64>,
    /// Per node: range of the time its disk takes to persist.
    pub persist_us: Vec<(u64, u64)>,
    /// Interval between ticks of each node.
    pub tick_us: u64,
    /// Clients submitting requests.
    pub clients: usize,
    /// Requests each client submits.
    pub requests_per_client: u32,
    /// Requests a client has in flight at most.
    pub outstanding_max: u32,
    /// Largest request payload.
    pub payload_bytes_max: usize,
    /// Longest pause of a client between requests.
    pub think_us_max: u64,
    /// Interval between time reads at random replicas.
    pub time_read_us: u64,
    /// If set, every client submits only to this node, in the shards it replicates, so the
    /// other members have nothing to send and only nulls carry the order.
    pub submit_to: Option<usize>,
    /// Faults injected during the run. With none, every request must be delivered and no node
    /// may suspect another.
    pub faults: Vec<Fault>,
    /// When every broken link is restored; faults all lie before it.
    pub heal_us: u64,
    /// Simulated time by which every request must be delivered (without faults), or by which
    /// the probes sent after healing must be delivered (with faults).
    pub time_limit_us: u64,
    /// Events processed at most.
    pub steps_max: u64,
}

impl Options {
    /// Options drawn from `seed`: 3 to 7 nodes, one namespace and one to three data shards of 2
    /// to 4 replicas, small windows and batches to stress flow control, link delays up to 3 ms
    /// with some members 4 to 10 times slower, clock skew up to ±100 ms, disks taking up to
    /// 5 ms (some up to 20 ms), and a few clients with a few dozen requests each (a quarter of
    /// the seeds: up to 8 clients with up to 150 requests each and 32 in flight).
    pub fn from_seed(seed: u64) -> Options {
        let mut rng = Rng::new(seed);
        let nodes = rng.between(3, 7) as usize;
        let replicas = rng.between(2, 4).min(nodes as u64) as u16;
        let spec = LayoutSpec {
            namespace_shards: 1,
            data_shards: rng.between(1, 3) as u16,
            replicas,
            replicas_min: 1,
        };
        let slowness: Vec<u64> = (0..nodes)
            .map(|_| {
                if rng.chance(20) {
                    rng.between(4, 10)
                } else {
                    1
                }
            })
            .collect();
        let skew_us: Vec<i64> = (0..nodes)
            .map(|_| rng.between(0, 200_000) as i64 - 100_000)
            .collect();
        let persist_us: Vec<(u64, u64)> = (0..nodes)
            .map(|_| {
                if rng.chance(20) {
                    (5_000, 20_000)
                } else {
                    (0, rng.between(0, 5_000))
                }
            })
            .collect();
        let mut options = Options {
            seed,
            nodes,
            spares: 0,
            spec,
            window: rng.between(1, 8) as u32,
            batch_bytes_max: rng.between(64, 4096) as usize,
            heartbeat_ms: rng.between(5, 30),
            suspect_after_ms: 5_000,
            delay_us: (rng.between(20, 500), rng.between(500, 3_000)),
            slowness,
            skew_us,
            persist_us,
            tick_us: 1_000,
            clients: rng.between(1, 5) as usize,
            requests_per_client: rng.between(5, 40) as u32,
            outstanding_max: rng.between(1, 6) as u32,
            payload_bytes_max: rng.between(1, 300) as usize,
            think_us_max: rng.between(0, 5_000),
            time_read_us: 2_000,
            submit_to: None,
            faults: Vec::new(),
            heal_us: 0,
            time_limit_us: 60_000_000,
            steps_max: 5_000_000,
        };
        // A quarter of the seeds are heavy: more clients with more requests in flight, so
        // windows fill, batches grow, and slow disks fall behind delivery.
        if rng.chance(25) {
            options.clients = rng.between(4, 8) as usize;
            options.requests_per_client = rng.between(50, 150) as u32;
            options.outstanding_max = rng.between(8, 32) as u32;
        }
        options
    }

    /// Options drawn from `seed` as [`Options::from_seed`], with shards of more replicas than
    /// the faults take out (so spare members refill them by state transfer), suspicion after
    /// 100 to 300 ms, and a schedule of faults: crashes (the leader's in half of them, and a
    /// second crash during the view change the first one causes) and, in some schedules,
    /// restarts of the crashed nodes from what their disks kept (they join again and resume
    /// their logs), link breaks, a partition isolating a minority, join bursts (up to 5 new
    /// nodes at once, some crashing while they join and some of those restarting), and
    /// swizzle-clogging (links stopped one by one, restored in random order). A crash loses
    /// what the node's disk had not synced, or tears it (a prefix of the unsynced records
    /// survives). Usually the faults spare a majority, so the run must make progress after
    /// healing; one schedule in eight takes out a majority, and the run only checks safety.
    pub fn with_faults(seed: u64) -> Options {
        let mut options = Options::from_seed(seed);
        let mut rng = Rng::new(seed ^ 0xfa17_fa17);
        let nodes = options.nodes;
        options.suspect_after_ms = rng.between(100, 300).max(3 * options.heartbeat_ms);
        let suspect_us = options.suspect_after_ms * 1_000;
        let tolerated = (nodes - 1) / 2;
        let too_many = rng.chance(12);
        let budget = if too_many { tolerated + 1 } else { tolerated };
        // A shard keeps a member with its log through every fault a recoverable schedule has.
        options.spec.replicas = options
            .spec
            .replicas
            .max(tolerated as u16 + 1)
            .min(nodes as u16);
        options.spec.replicas_min = 1;
        let start_us = rng.between(20_000, 200_000);
        let mut faults = Vec::new();
        let mut order: Vec<usize> = (0..nodes).collect();
        for i in (1..nodes).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        if rng.chance(50) {
            // The leader is among the faulty.
            let at = order.iter().position(|&n| n == 0).expect("node 0 exists");
            order.swap(0, at);
        }
        let faulty: Vec<usize> = order[..budget].to_vec();
        let kind = rng.below(7);
        match kind {
            // Only long clogs, below.
            4 => {}
            5 => {
                // A join burst: new nodes ask to join at nearly the same time; some crash
                // while they join (few enough that every view keeps a live majority), and
                // some of those start again from what their disks kept.
                let spares = rng.between(1, 5) as usize;
                options.spares = spares;
                let crashing = rng.below(spares.min(tolerated) as u64 + 1) as usize;
                for i in 0..spares {
                    let node = nodes + i;
                    let at_us = start_us + rng.below(suspect_us / 2);
                    faults.push(Fault::Join { node, at_us });
                    if i < crashing {
                        let crash_us = at_us + rng.between(1_000, 2 * suspect_us);
                        faults.push(Fault::Crash {
                            node,
                            at_us: crash_us,
                        });
                        if rng.chance(50) {
                            faults.push(Fault::Restart {
                                node,
                                at_us: crash_us + rng.between(1_000, 2 * suspect_us),
                            });
                        }
                    }
                }
            }
            0 | 6 => {
                // Crashes: the first wedges the group about `suspect_us` later (less up to a
                // heartbeat); the next ones land while that view change runs.
                let heartbeat_us = options.heartbeat_ms * 1_000;
                for (i, &node) in faulty.iter().enumerate() {
                    let at_us = if i == 0 {
                        start_us
                    } else {
                        start_us + suspect_us - heartbeat_us + rng.below(heartbeat_us + 30_000)
                    };
                    faults.push(Fault::Crash { node, at_us });
                    if kind == 6 {
                        // It starts again from its disk: it joins and resumes its logs.
                        let restart_us = at_us + rng.between(suspect_us / 2, 4 * suspect_us);
                        faults.push(Fault::Restart {
                            node,
                            at_us: restart_us,
                        });
                    }
                }
            }
            1 if faulty.len() >= 2 => {
                // Links break between faulty nodes; both ends of each are suspected.
                for pair in faulty.windows(2) {
                    let at_us = start_us + rng.below(suspect_us);
                    faults.push(Fault::Break {
                        a: pair[0],
                        b: pair[1],
                        at_us,
                    });
                }
            }
            _ => {
                faults.push(Fault::Partition {
                    minority: faulty.clone(),
                    at_us: start_us,
                });
                if rng.chance(30) {
                    // The leader of the majority fails during the change too: a majority
                    // remains only if the budget allowed it.
                    if let Some(&node) = order[budget..].first() {
                        faults.push(Fault::Crash {
                            node,
                            at_us: start_us + suspect_us + rng.below(suspect_us / 2),
                        });
                    }
                }
            }
        }
        let mut heal_us = start_us + rng.between(2 * suspect_us, 6 * suspect_us);
        for fault in &faults {
            if let Fault::Restart { at_us, .. } | Fault::Crash { at_us, .. } = fault {
                heal_us = heal_us.max(*at_us);
            }
        }
        if kind == 4 {
            // Long clogs of the links out of the faulty nodes: messages are delayed past the
            // suspicion timeout, never lost, and arrive after the view that removed their
            // sender. Only links out of them, so they suspect no one themselves.
            for &from in &faulty {
                let clog_start = start_us + rng.below(suspect_us);
                let end_us = clog_start + rng.between(suspect_us * 3 / 2, 3 * suspect_us);
                for to in (0..nodes).filter(|&to| to != from) {
                    let start_us = clog_start + rng.below(suspect_us / 8);
                    faults.push(Fault::Clog {
                        from,
                        to,
                        start_us,
                        end_us,
                    });
                }
                heal_us = heal_us.max(end_us);
            }
        }
        if rng.chance(50) {
            // Swizzle-clogging: links stopped one by one and restored in random order, each
            // for less than half the suspicion timeout: they delay, mostly without suspicion.
            let links = rng.between(1, (nodes * (nodes - 1)) as u64) as usize;
            let nodes = nodes + options.spares;
            let clog_start = rng.between(10_000, heal_us);
            let step_us = (suspect_us / 5) / links as u64 + 1;
            for i in 0..links {
                let from = rng.below(nodes as u64) as usize;
                let to = (from + 1 + rng.below(nodes as u64 - 1) as usize) % nodes;
                let start_us = clog_start + i as u64 * step_us;
                let end_us = clog_start + links as u64 * step_us + rng.below(suspect_us / 5) + 1;
                faults.push(Fault::Clog {
                    from,
                    to,
                    start_us,
                    end_us,
                });
                heal_us = heal_us.max(end_us);
            }
        }
        options.faults = faults;
        options.heal_us = heal_us;
        options.time_limit_us = heal_us + 40 * suspect_us + 2_000_000;
        options
    }

    /// Options drawn from `seed` as [`Options::from_seed`], with suspicion after 100 to 300 ms
    /// and slow members: every member of the first view stalls (takes no step) once, for one
    /// to three suspicion timeouts, the stalls starting within one timeout of each other, so
    /// they overlap and are staggered — as when every node of a loaded machine applies big
    /// versions: members suspect each other, falsely, often all of them. Nothing fails, so
    /// the group must make progress again (some view of whoever hears each other).
    pub fn with_stalls(seed: u64) -> Options {
        let mut options = Options::from_seed(seed);
        let mut rng = Rng::new(seed ^ 0x051a_11ed);
        options.suspect_after_ms = rng.between(100, 300).max(3 * options.heartbeat_ms);
        let suspect_us = options.suspect_after_ms * 1_000;
        let start_us = rng.between(20_000, 200_000);
        let mut faults = Vec::new();
        let mut heal_us = start_us;
        for node in 0..options.nodes {
            let start_us = start_us + rng.below(suspect_us);
            let end_us = start_us + rng.between(suspect_us, 3 * suspect_us);
            heal_us = heal_us.max(end_us);
            faults.push(Fault::Stall {
                node,
                start_us,
                end_us,
            });
        }
        options.faults = faults;
        options.heal_us = heal_us;
        options.time_limit_us = heal_us + 40 * suspect_us + 2_000_000;
        options
    }

    /// Options drawn from `seed` as [`Options::with_stalls`] (slow members, clock skews), with
    /// wall clocks stepped besides: each member's wall clock is set ahead or back, once or
    /// twice, by up to three suspicion timeouts, at times around the stalls. Timers read each
    /// node's timer clock, which no step moves: nothing may be suspected or leased differently,
    /// and stamps stay in order whatever the wall clock does.
    pub fn with_clock_steps(seed: u64) -> Options {
        let mut options = Options::with_stalls(seed);
        let mut rng = Rng::new(seed ^ 0x0c10_c5e7);
        let suspect_us = options.suspect_after_ms * 1_000;
        let span_us = options.heal_us + 2 * suspect_us;
        for node in 0..options.nodes {
            for _ in 0..1 + rng.below(2) {
                let by_us = rng.between(1_000, 3 * suspect_us) as i64;
                let by_us = if rng.chance(50) { by_us } else { -by_us };
                let at_us = rng.between(10_000, span_us);
                options.faults.push(Fault::ClockStep { node, at_us, by_us });
            }
        }
        options
    }

    /// Options drawn from `seed` as [`Options::from_seed`], with suspicion after 100 to 300 ms
    /// and a host-wide stall, in one of two shapes. Together: every member stalls over the
    /// same span of two to four suspicion timeouts (the whole machine is not scheduled), so
    /// that each one's pause hides its peers' silence. In turn: from one moment on, every
    /// member stalls except one at a time, each running alone for more than a suspicion
    /// timeout, so that each suspects every other one and trusts no majority, as on a machine
    /// so loaded that each node runs while the others wait; then all run again. Nothing
    /// fails: the group must make progress again by itself.
    pub fn with_host_stall(seed: u64) -> Options {
        let mut options = Options::from_seed(seed);
        let mut rng = Rng::new(seed ^ 0x0a11_57a1);
        options.suspect_after_ms = rng.between(100, 300).max(3 * options.heartbeat_ms);
        let suspect_us = options.suspect_after_ms * 1_000;
        let start_us = rng.between(20_000, 200_000);
        let mut faults = Vec::new();
        let heal_us = if options.host_stall_in_turn() {
            let alone_us = suspect_us + rng.between(suspect_us / 2, suspect_us);
            let end_us = start_us + options.nodes as u64 * alone_us;
            for node in 0..options.nodes {
                let (from_us, to_us) = (
                    start_us + node as u64 * alone_us,
                    start_us + (node as u64 + 1) * alone_us,
                );
                for (start_us, end_us) in [(start_us, from_us), (to_us, end_us)] {
                    if start_us < end_us {
                        faults.push(Fault::Stall {
                            node,
                            start_us,
                            end_us,
                        });
                    }
                }
            }
            end_us
        } else {
            let end_us = start_us + rng.between(2 * suspect_us, 4 * suspect_us);
            for node in 0..options.nodes {
                faults.push(Fault::Stall {
                    node,
                    start_us,
                    end_us,
                });
            }
            end_us
        };
        options.faults = faults;
        options.heal_us = heal_us;
        options.time_limit_us = heal_us + 40 * suspect_us + 2_000_000;
        options
    }

    /// Whether a [`Options::with_host_stall`] run stalls its members in turn (else together):
    /// odd seeds do.
    pub fn host_stall_in_turn(&self) -> bool {
        self.seed % 2 == 1
    }

    /// Options drawn from `seed` as [`Options::from_seed`], with suspicion after 100 to 300 ms
    /// and a total restart: under load, every node stops (within a few milliseconds of each
    /// other, so some logs end earlier than others), losing what its disk had not synced or
    /// tearing it; then every node, or a majority, starts again from its disk and recorded
    /// view within two suspicion timeouts, and some of the others come back much later (they
    /// join the restarted group) or never. Shards have enough replicas that the nodes back in
    /// time hold a replica of each, so the run must make progress after the restart.
    pub fn with_total_restart(seed: u64) -> Options {
        let mut options = Options::from_seed(seed);
        let mut rng = Rng::new(seed ^ 0x02e5_7a27);
        let nodes = options.nodes;
        options.suspect_after_ms = rng.between(100, 300).max(3 * options.heartbeat_ms);
        let suspect_us = options.suspect_after_ms * 1_000;
        let stop_us = rng.between(20_000, 300_000);
        let mut order: Vec<usize> = (0..nodes).collect();
        for i in (1..nodes).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let quorum = if rng.chance(50) {
            nodes
        } else {
            nodes / 2 + 1 + rng.below((nodes - nodes / 2 - 1) as u64 + 1) as usize
        };
        options.spec.replicas = options
            .spec
            .replicas
            .max((nodes - quorum + 1) as u16)
            .min(nodes as u16);
        options.spec.replicas_min = 1;
        let mut faults = Vec::new();
        for &node in &order {
            let at_us = stop_us + rng.below(3_000);
            faults.push(Fault::Crash { node, at_us });
        }
        let back_us = stop_us + 3_000;
        let mut heal_us = back_us;
        for (i, &node) in order.iter().enumerate() {
            if i < quorum {
                let at_us = back_us + rng.below(2 * suspect_us);
                heal_us = heal_us.max(at_us);
                faults.push(Fault::Recover { node, at_us });
            }
        }
        for &node in &order[quorum..] {
            if rng.chance(70) {
                let at_us = heal_us + rng.between(suspect_us, 8 * suspect_us);
                faults.push(Fault::Recover { node, at_us });
            }
        }
        options.faults = faults;
        options.heal_us = heal_us;
        options.time_limit_us = heal_us + 40 * suspect_us + 2_000_000;
        options
    }

    /// The nodes the faults touch: crashed, at an end of a broken link, partitioned away, or
    /// with a link out of them clogged for half the suspicion timeout or more.
    pub fn faulty(&self) -> Vec<usize> {
        let mut faulty = Vec::new();
        for fault in &self.faults {
            match fault {
                Fault::Crash { node, .. } => faulty.push(*node),
                Fault::Join { .. }
                | Fault::Restart { .. }
                | Fault::Recover { .. }
                | Fault::Stall { .. }
                | Fault::ClockStep { .. } => {}
                Fault::Break { a, b, .. } => faulty.extend([*a, *b]),
                Fault::Partition { minority, .. } => faulty.extend(minority),
                Fault::Clog {
                    from,
                    start_us,
                    end_us,
                    ..
                } => {
                    // Held long enough to be suspected by its receivers.
                    if end_us - start_us >= self.suspect_after_ms * 1_000 / 2 {
                        faulty.push(*from);
                    }
                }
            }
        }
        // A node that comes back in time for a total restart is not faulty.
        faulty.retain(|node| {
            !self
                .faults
                .iter()
                .any(|f| matches!(f, Fault::Recover { node: n, at_us } if n == node && *at_us <= self.heal_us))
        });
        faulty.sort_unstable();
        faulty.dedup();
        faulty
    }

    /// Whether the faults leave a majority of the first view alive and connected, so the run
    /// must make progress once they heal.
    pub fn must_recover(&self) -> bool {
        let faulty = self.faulty().iter().filter(|&&n| n < self.nodes).count();
        !self.faults.is_empty() && 2 * (self.nodes - faulty) > self.nodes
    }
}

/// One injected fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The node stops: its events are dropped from then on, and its disk keeps only what it
    /// synced and perhaps part of what it did not (a torn write).
    Crash {
        /// The node.
        node: usize,
        /// When.
        at_us: u64,
    },
    /// The link between two nodes breaks (both directions) until the heal.
    Break {
        /// One end.
        a: usize,
        /// The other end.
        b: usize,
        /// When.
        at_us: u64,
    },
    /// Every link between the minority and the others breaks until the heal.
    Partition {
        /// The isolated nodes.
        minority: Vec<usize>,
        /// When.
        at_us: u64,
    },
    /// A spare node starts and asks to join the group.
    Join {
        /// The node: a spare, after the members of the first view.
        node: usize,
        /// When.
        at_us: u64,
    },
    /// A crashed node starts again from what its disk kept: it asks to join and resumes its
    /// logs by state transfer.
    Restart {
        /// The node.
        node: usize,
        /// When.
        at_us: u64,
    },
    /// After every node stopped (total restart): a crashed node starts again from its disk
    /// and the view it recorded, with the decision it logged for that view, if any.
    Recover {
        /// The node.
        node: usize,
        /// When.
        at_us: u64,
    },
    /// The node takes no step during `[start_us, end_us)`: its process is not scheduled, or
    /// one of its steps (applying a big version) takes that long. Its ticks, messages and
    /// disk confirmations wait and come, in order, at `end_us`. It is not faulty: it comes
    /// back by itself, and a majority of stalled members must still make progress.
    Stall {
        /// The node.
        node: usize,
        /// Stopped.
        start_us: u64,
        /// Runs again.
        end_us: u64,
    },
    /// The node's wall clock is set `by_us` ahead (back if negative) at `at_us`, as by an
    /// operator or an NTP step; its timer clock goes on unmoved. Not a failure: the node's
    /// stamps may stand still or jump, its leases and suspicions must not change.
    ClockStep {
        /// The node.
        node: usize,
        /// When.
        at_us: u64,
        /// By how much.
        by_us: i64,
    },
    /// Link `from → to` holds its messages during `[start_us, end_us)`.
    Clog {
        /// Sender end.
        from: usize,
        /// Receiver end.
        to: usize,
        /// Stopped.
        start_us: u64,
        /// Restored.
        end_us: u64,
    },
}

/// What a run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Its seed.
    pub seed: u64,
    /// Events processed.
    pub steps: u64,
    /// Simulated time.
    pub simulated_us: u64,
    /// Versions delivered over all shards (the canonical logs).
    pub versions: u64,
    /// Requests acknowledged to clients.
    pub requests_acknowledged: u64,
    /// Time reads answered and checked.
    pub time_reads: u64,
    /// Null messages sent over all nodes.
    pub nulls_sent: u64,
    /// Per node: whether it ended wedged.
    pub wedged: Vec<bool>,
    /// Per node: the nodes it ended suspecting.
    pub suspected: Vec<Vec<NodeId>>,
    /// Per node: the view it ended in.
    pub view_ids: Vec<u32>,
    /// Client writes refused because the replica had no majority.
    pub refused_no_majority: u64,
    /// Probe requests delivered after the faults healed.
    pub probes_delivered: u64,
    /// View change rounds started by leaders, over all nodes: more than the view changes when
    /// a leader failed during one and another took over.
    pub rounds_led: u64,
    /// Nodes welcomed into a view they joined (new nodes, restarted ones, removed ones).
    pub joins: u64,
    /// Views installed by a node after another node had installed the view after it.
    pub late_installs: u64,
    /// Barriers taken (reads of the latest state a member answered).
    pub barriers_taken: u64,
    /// Barriers a member declined to take: joining, in a minority, back from a total restart,
    /// or without its read lease.
    pub barriers_refused: u64,
    /// Records received by state transfer, over all nodes.
    pub records_transferred: u64,
    /// Shards caught up by state transfer, over all nodes.
    pub shards_caught_up: u64,
    /// Crashed nodes started again from their disks.
    pub restarts: u64,
    /// Members trusted again after a false suspicion, over all nodes (a node without a
    /// majority it trusts, or whose view change is stuck, trusts again whom it hears from).
    pub forgiven: u64,
    /// The members of the newest view installed anywhere.
    pub last_members: Vec<NodeId>,
    /// A digest of every event in order: equal digests mean identical runs.
    pub trace: u64,
}

/// A run that broke an invariant.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The seed that reproduces it.
    pub seed: u64,
    /// The step at which it was found.
    pub step: u64,
    /// Simulated time then.
    pub time_us: u64,
    /// What broke.
    pub violation: Violation,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} failed at step {} ({} us simulated): {}\n  rerun: DERECHOFS_SIM_SEED={} \
             cargo test -p derechofs-tests --test simulator one_seed_from_the_environment",
            self.seed, self.step, self.time_us, self.violation, self.seed
        )
    }
}

#[derive(Debug)]
enum Event {
    Tick {
        node: usize,
    },
    Message {
        from: usize,
        to: usize,
        frame: Bytes,
    },
    Persisted {
        node: usize,
        shard: ShardId,
        version: Version,
    },
    Submit {
        node: usize,
        shard: ShardId,
        request: Request,
    },
    ClientWake {
        client: usize,
    },
    TimeRead,
    Fault {
        index: usize,
    },
    Heal,
    TrimLogged {
        node: usize,
        view_id: u32,
        round: u64,
    },
    LinkBroken {
        node: usize,
        peer: NodeId,
    },
    Probe,
    /// A probe of `shard` to submit at some replica that can take it.
    ProbeSubmit {
        shard: ShardId,
    },
    /// The driver's answer to a read of its log.
    Driver {
        node: usize,
        input: Input,
    },
}

impl Event {
    /// The node whose step the event is, if any.
    fn node(&self) -> Option<usize> {
        match self {
            Event::Tick { node }
            | Event::Persisted { node, .. }
            | Event::Submit { node, .. }
            | Event::TrimLogged { node, .. }
            | Event::LinkBroken { node, .. }
            | Event::Driver { node, .. } => Some(*node),
            Event::Message { to, .. } => Some(*to),
            Event::ClientWake { .. }
            | Event::TimeRead
            | Event::Fault { .. }
            | Event::Heal
            | Event::Probe
            | Event::ProbeSubmit { .. } => None,
        }
    }

    fn tag(&self) -> (u8, usize) {
        match self {
            Event::Tick { node } => (0, *node),
            Event::Message { to, .. } => (1, *to),
            Event::Persisted { node, .. } => (2, *node),
            Event::Submit { node, .. } => (3, *node),
            Event::ClientWake { client } => (4, *client),
            Event::TimeRead => (5, 0),
            Event::Fault { index } => (6, *index),
            Event::Heal => (7, 0),
            Event::TrimLogged { node, .. } => (8, *node),
            Event::LinkBroken { node, .. } => (9, *node),
            Event::Probe => (10, 0),
            Event::ProbeSubmit { shard } => (11, usize::from(shard.0)),
            Event::Driver { node, .. } => (12, *node),
        }
    }
}

#[derive(Debug)]
struct Scheduled {
    time_us: u64,
    order: u64,
    /// The node the event is for and its incarnation then: a node that crashed since never
    /// sees it.
    to: Option<(usize, u32)>,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.time_us, self.order) == (other.time_us, other.order)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    /// Reversed, so the heap pops the earliest event, and among equal times the first scheduled.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.time_us, other.order).cmp(&(self.time_us, self.order))
    }
}

#[derive(Debug)]
struct Client {
    /// The highest stamp this client has seen; its next request must be stamped above it.
    observed: Hlc,
    remaining: u32,
    outstanding: u32,
    next_number: u64,
}

#[derive(Debug)]
struct InFlight {
    client: usize,
    node: usize,
    observed: Hlc,
}

/// One node's log of one shard on its simulated disk.
#[derive(Debug, Default, Clone)]
struct Disk {
    records: Vec<Record>,
    /// Records before this index are synced: a crash never loses them.
    synced: usize,
}

struct Simulation {
    options: Options,
    rng: Rng,
    nodes: Vec<Node>,
    crashed: Vec<bool>,
    /// Per node: bumped at every crash, so events for the old process are dropped.
    incarnation: Vec<u32>,
    /// Per node, per shard: its log.
    disks: Vec<Vec<Disk>>,
    /// Per node, per shard: new to the shard and still catching up (kept through a crash and
    /// restart: what its disk holds of such a shard is a partial transfer).
    catching_up: Vec<Vec<bool>>,
    /// Per shard: the indices of its members in the first view.
    members: Vec<Vec<usize>>,
    network: Network,
    /// Per node, per shard: when its disk finishes the last persist asked of it.
    disk_free_us: Vec<Vec<u64>>,
    queue: BinaryHeap<Scheduled>,
    order: u64,
    time_us: u64,
    steps: u64,
    checker: Checker,
    clients: Vec<Client>,
    in_flight: BTreeMap<u64, InFlight>,
    acknowledged: u64,
    /// Per node: the view it is in, as its installs said (none before it first joins).
    views: Vec<Option<View>>,
    /// Per node: the last view it installed, which its driver recorded (0 if none).
    last_view_ids: Vec<u32>,
    /// The first view.
    first_view: View,
    /// Probe attempts sent after healing: id to shard.
    probe_ids: BTreeMap<u64, ShardId>,
    /// Per shard, once probing started: whether a probe was delivered.
    probes: BTreeMap<ShardId, bool>,
    refused_no_majority: u64,
    joins: u64,
    late_installs: u64,
    barriers_taken: u64,
    barriers_refused: u64,
    transferred: u64,
    caught_up: u64,
    restarts: u64,
    /// Per node: the decision its driver was asked to log, until it confirms it.
    logging: Vec<Option<(u32, u64, Decision)>>,
    /// Per node: the decision logged for the view it recorded, on its disk.
    logged: Vec<Option<(u32, u64, Decision)>>,
    /// Per node: back from a total restart, not yet in the view that ends it.
    restarting: Vec<bool>,
    /// Views a total restart ended, whose logs the checker cut.
    restarts_ended: BTreeSet<u32>,
    trace: DefaultHasher,
    actions: Vec<Action>,
    /// Per node: multicast messages were taken without moving the engine on (as the node's
    /// driver takes every link event already waiting in one turn), and no step since.
    unflushed: Vec<bool>,
    /// Barriers taken and not yet reached, oldest first (at most [`PENDING_BARRIERS_MAX`]).
    barriers: Vec<PendingBarrier>,
}

/// Barriers the simulation follows at once; past it the oldest is no longer followed.
const PENDING_BARRIERS_MAX: usize = 256;

/// A barrier taken at a node (as for a client's `FsReadBarrier`), with the newest version of
/// its view any live member had delivered then: once the node reaches the barrier, it must have
/// delivered that version too.
#[derive(Debug)]
struct PendingBarrier {
    node: usize,
    incarnation: u32,
    shard: ShardId,
    barrier: Barrier,
    delivered_then: Version,
}

/// Runs the cluster described by `options` to its end, checking every invariant after every
/// step; returns what it did, or the first violation with its seed.
pub fn run(options: &Options) -> Result<Report, Failure> {
    let mut simulation = Simulation::new(options.clone());
    // An assertion inside the engine is a failure of the run too: report it with its seed.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| simulation.run()));
    let outcome = outcome.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        Err(Violation(format!("panic: {message}")))
    });
    match outcome {
        Ok(()) => Ok(simulation.report()),
        Err(violation) => Err(Failure {
            seed: options.seed,
            step: simulation.steps,
            time_us: simulation.time_us,
            violation,
        }),
    }
}

impl Simulation {
    fn new(mut options: Options) -> Simulation {
        let mut rng = Rng::new(options.seed).fork();
        let total = options.nodes + options.spares;
        // Spares get ordinary links, clocks and disks.
        options.slowness.resize(total, 1);
        options.skew_us.resize(total, 0);
        options.persist_us.resize(total, (0, 2_000));
        let ids: Vec<NodeId> = (1..=options.nodes as NodeId).collect();
        let view = View::initial(1, ids.clone(), options.spec).expect("the options make a view");
        let nodes: Vec<Node> = (1..=total as NodeId)
            .map(|id| {
                let config = config_of(&options, id);
                if (id as usize) <= options.nodes {
                    Node::new(config, view.clone()).expect("the options make a valid config")
                } else {
                    Node::joining(config, ids.clone(), Vec::new(), 0)
                        .expect("the options make a valid config")
                }
            })
            .collect();
        let members: Vec<Vec<usize>> = view
            .layout
            .shards()
            .iter()
            .map(|shard| shard.members.iter().map(|&id| (id - 1) as usize).collect())
            .collect();
        let shards = members.len();
        let mut network = Network::new(total, options.delay_us, options.slowness.clone());
        for fault in &options.faults {
            if let Fault::Clog {
                from,
                to,
                start_us,
                end_us,
            } = fault
            {
                network.clog(*from, *to, *start_us, *end_us);
            }
        }
        let clients = (0..options.clients)
            .map(|_| Client {
                observed: Hlc::ZERO,
                remaining: options.requests_per_client,
                outstanding: 0,
                next_number: 0,
            })
            .collect();
        let mut simulation = Simulation {
            rng: rng.fork(),
            // Spares are not started until they join.
            crashed: (0..total).map(|n| n >= options.nodes).collect(),
            incarnation: vec![0; total],
            disks: vec![vec![Disk::default(); shards]; total],
            catching_up: vec![vec![false; shards]; total],
            disk_free_us: vec![vec![0; shards]; total],
            queue: BinaryHeap::new(),
            order: 0,
            time_us: 0,
            steps: 0,
            checker: Checker::new(total, shards),
            clients,
            in_flight: BTreeMap::new(),
            acknowledged: 0,
            views: (0..total)
                .map(|n| (n < options.nodes).then(|| view.clone()))
                .collect(),
            first_view: view.clone(),
            last_view_ids: (0..total).map(|n| u32::from(n < options.nodes)).collect(),
            probe_ids: BTreeMap::new(),
            probes: BTreeMap::new(),
            refused_no_majority: 0,
            joins: 0,
            late_installs: 0,
            barriers_taken: 0,
            barriers_refused: 0,
            transferred: 0,
            caught_up: 0,
            restarts: 0,
            logging: vec![None; total],
            logged: vec![None; total],
            restarting: vec![false; total],
            restarts_ended: BTreeSet::new(),
            trace: DefaultHasher::new(),
            actions: Vec::new(),
            unflushed: Vec::new(),
            barriers: Vec::new(),
            nodes,
            members,
            network,
            options,
        };
        for node in 0..simulation.options.nodes {
            let first = rng.below(simulation.options.tick_us);
            simulation.schedule_to(node, first, Event::Tick { node });
        }
        for client in 0..simulation.options.clients {
            let first = rng.below(10_000);
            simulation.schedule(first, Event::ClientWake { client });
        }
        simulation.schedule(simulation.options.time_read_us, Event::TimeRead);
        let faults = simulation.options.faults.clone();
        for (index, fault) in faults.iter().enumerate() {
            match fault {
                Fault::Crash { at_us, .. }
                | Fault::Break { at_us, .. }
                | Fault::Partition { at_us, .. }
                | Fault::Join { at_us, .. }
                | Fault::Restart { at_us, .. }
                | Fault::Recover { at_us, .. } => {
                    simulation.schedule(*at_us, Event::Fault { index });
                }
                Fault::Clog { .. } | Fault::Stall { .. } | Fault::ClockStep { .. } => {}
            }
        }
        if !faults.is_empty() {
            let heal_us = simulation.options.heal_us;
            simulation.schedule(heal_us, Event::Heal);
            if simulation.options.must_recover() {
                let suspect_us = simulation.options.suspect_after_ms * 1_000;
                simulation.schedule(heal_us + 4 * suspect_us, Event::Probe);
            }
        }
        simulation
    }

    fn schedule(&mut self, time_us: u64, event: Event) {
        self.order += 1;
        self.queue.push(Scheduled {
            time_us,
            order: self.order,
            to: None,
            event,
        });
    }

    /// Schedules an event for the current process of `node`.
    fn schedule_to(&mut self, node: usize, time_us: u64, event: Event) {
        self.order += 1;
        self.queue.push(Scheduled {
            time_us,
            order: self.order,
            to: Some((node, self.incarnation[node])),
            event,
        });
    }

    /// `node`'s clocks now: its wall clock, skewed and stepped (`Fault::ClockStep`), and its
    /// timer clock, skewed only (its origin does not matter).
    fn local_now(&self, node: usize) -> Now {
        let mono_us = (EPOCH_US + self.time_us).saturating_add_signed(self.options.skew_us[node]);
        let stepped_us: i64 = self
            .options
            .faults
            .iter()
            .map(|fault| match fault {
                Fault::ClockStep {
                    node: n,
                    at_us,
                    by_us,
                } if *n == node && *at_us <= self.time_us => *by_us,
                _ => 0,
            })
            .sum();
        Now {
            wall_us: mono_us.saturating_add_signed(stepped_us),
            mono_us,
        }
    }

    fn total_requests(&self) -> u64 {
        self.options.clients as u64 * u64::from(self.options.requests_per_client)
    }

    fn run(&mut self) -> Result<(), Violation> {
        let skew_max = self
            .options
            .skew_us
            .iter()
            .map(|s| s.unsigned_abs())
            .max()
            .unwrap_or(0);
        let persist_max = self
            .options
            .persist_us
            .iter()
            .map(|p| p.1)
            .max()
            .unwrap_or(0);
        let settle_us = 2 * skew_max
            + 20 * self.options.heartbeat_ms * 1_000
            + 20 * self.network.delay_max_us()
            + 4 * persist_max;
        let mut settle_until: Option<u64> = None;
        while let Some(Scheduled {
            time_us, event, to, ..
        }) = self.queue.pop()
        {
            if settle_until.is_some_and(|until| time_us > until) {
                break;
            }
            if time_us > self.options.time_limit_us {
                if !self.options.faults.is_empty() {
                    if self.options.must_recover() {
                        return Err(Violation(format!(
                            "liveness: {} of {} probes delivered by {} us, {} us after the \
                             faults healed; views {:?}; suspected {:?}",
                            self.probes.values().filter(|&&d| d).count(),
                            self.probes.len(),
                            self.options.time_limit_us,
                            self.options.time_limit_us - self.options.heal_us,
                            self.nodes
                                .iter()
                                .map(|n| (n.view().view_id, n.membership()))
                                .collect::<Vec<_>>(),
                            self.nodes.iter().map(|n| n.suspected()).collect::<Vec<_>>()
                        )));
                    }
                    return Ok(());
                }
                return Err(Violation(format!(
                    "liveness: {} of {} requests acknowledged after {} us",
                    self.acknowledged,
                    self.total_requests(),
                    self.options.time_limit_us
                )));
            }
            self.time_us = time_us;
            self.steps += 1;
            if self.steps > self.options.steps_max {
                return Err(Violation(format!(
                    "liveness: {} steps",
                    self.options.steps_max
                )));
            }
            (time_us, event.tag()).hash(&mut self.trace);
            let stale = to.is_some_and(|(node, incarnation)| {
                self.crashed[node] || self.incarnation[node] != incarnation
            });
            if let Some(end_us) = event.node().and_then(|node| self.stalled_until(node)) {
                // The node does not run: the event waits for it, behind those already waiting.
                self.order += 1;
                self.queue.push(Scheduled {
                    time_us: end_us,
                    order: self.order,
                    to,
                    event,
                });
                continue;
            }
            if !stale {
                self.handle(event)?;
            }
            let done = if self.options.faults.is_empty() {
                self.acknowledged == self.total_requests()
            } else {
                !self.probes.is_empty() && self.probes.values().all(|&d| d)
            };
            if settle_until.is_none() && done {
                settle_until = Some(self.time_us + settle_us);
            }
        }
        if self.options.faults.is_empty() {
            self.check_settled()?;
        }
        Ok(())
    }

    /// The end of the stall `node` is in now, if any.
    fn stalled_until(&self, node: usize) -> Option<u64> {
        self.options.faults.iter().find_map(|fault| match fault {
            Fault::Stall {
                node: n,
                start_us,
                end_us,
            } if *n == node && (*start_us..*end_us).contains(&self.time_us) => Some(*end_us),
            _ => None,
        })
    }

    fn handle(&mut self, event: Event) -> Result<(), Violation> {
        match event {
            Event::Tick { node } => {
                let jitter = self.rng.below(self.options.tick_us / 4 + 1);
                let next = self.time_us + self.options.tick_us + jitter;
                self.schedule_to(node, next, Event::Tick { node });
                self.step(node, Input::Tick)
            }
            Event::Message { from, to, frame } => {
                let message = Message::decode(&frame)
                    .map_err(|e| Violation(format!("wire: a frame does not decode: {e}")))?;
                // As the node's driver does: multicast messages taken in one turn with others
                // waiting behind them move the engine on once, after the last.
                let queued = matches!(message, Message::Data { .. } | Message::Row { .. })
                    && self.queue.peek().is_some_and(|next| {
                        next.time_us == self.time_us
                            && matches!(next.event, Event::Message { to: t, .. } if t == to)
                            && next.to.is_none_or(|(n, incarnation)| {
                                !self.crashed[n] && self.incarnation[n] == incarnation
                            })
                    });
                if self.network.loses(from, to, message.view_id()) {
                    if !queued && self.unflushed.get(to).copied().unwrap_or(false) {
                        return self.step_as(to, None, false);
                    }
                    return Ok(());
                }
                let from = self.nodes[from].node_id();
                self.step_as(to, Some(Input::Message { from, message }), queued)
            }
            Event::Persisted {
                node,
                shard,
                version,
            } => {
                let disk = &mut self.disks[node][usize::from(shard.0)];
                let upto = disk.records.partition_point(|r| r.version <= version);
                disk.synced = disk.synced.max(upto);
                self.checker.persist(node, shard, version)?;
                self.step(node, Input::Persisted { shard, version })
            }
            Event::Submit {
                node,
                shard,
                request,
            } => self.step(node, submit_input(shard, request)),
            Event::ClientWake { client } => {
                self.client_send(client);
                Ok(())
            }
            Event::TimeRead => {
                self.schedule(self.time_us + self.options.time_read_us, Event::TimeRead);
                self.time_read()
            }
            Event::Fault { index } => self.inject(index),
            Event::Heal => {
                let total = self.nodes.len();
                for a in 0..total {
                    for b in 0..total {
                        self.network.set_broken(a, b, false);
                    }
                }
                Ok(())
            }
            Event::TrimLogged {
                node,
                view_id,
                round,
            } => {
                if self.logging[node]
                    .as_ref()
                    .is_some_and(|(v, r, _)| (*v, *r) == (view_id, round))
                {
                    self.logged[node] = self.logging[node].take();
                }
                self.step(node, Input::TrimLogged { view_id, round })
            }
            Event::LinkBroken { node, peer } => self.step(node, Input::LinkBroken { peer }),
            Event::Probe => {
                for s in 0..self.members.len() {
                    let shard = ShardId(s as u16);
                    self.probes.insert(shard, false);
                    self.schedule(self.time_us, Event::ProbeSubmit { shard });
                }
                Ok(())
            }
            Event::ProbeSubmit { shard } => self.probe(shard),
            Event::Driver { node, input } => self.step(node, input),
        }
    }

    fn inject(&mut self, index: usize) -> Result<(), Violation> {
        let fault = self.options.faults[index].clone();
        let mut pairs = Vec::new();
        match fault {
            Fault::Crash { node, .. } => self.crash(node),
            Fault::Restart { node, .. } => self.restart(node)?,
            Fault::Recover { node, .. } => self.recover(node)?,
            Fault::Join { node, .. } => {
                self.crashed[node] = false;
                self.schedule_to(node, self.time_us, Event::Tick { node });
            }
            Fault::Break { a, b, .. } => pairs.push((a, b)),
            Fault::Partition { minority, .. } => {
                for &a in &minority {
                    for b in (0..self.nodes.len()).filter(|b| !minority.contains(b)) {
                        pairs.push((a, b));
                    }
                }
            }
            Fault::Clog { .. } | Fault::Stall { .. } | Fault::ClockStep { .. } => {}
        }
        for (a, b) in pairs {
            self.network.set_broken(a, b, true);
            for (end, other) in [(a, b), (b, a)] {
                let peer = self.nodes[other].node_id();
                self.schedule_to(end, self.time_us, Event::LinkBroken { node: end, peer });
            }
        }
        Ok(())
    }

    /// The process stops. Its disk keeps what it synced; of what it did not, a crash keeps
    /// nothing or, as a torn write, a prefix.
    fn crash(&mut self, node: usize) {
        if self.crashed[node] {
            return;
        }
        self.crashed[node] = true;
        self.incarnation[node] += 1;
        for disk in &mut self.disks[node] {
            let unsynced = (disk.records.len() - disk.synced) as u64;
            let kept = if unsynced > 0 && self.rng.chance(50) {
                self.rng.below(unsynced + 1) as usize
            } else {
                0
            };
            disk.records.truncate(disk.synced + kept);
        }
    }

    /// A crashed node starts again from its disk: it syncs what its logs kept, and asks the
    /// members of the first view (and the nodes that joined) to be added again.
    fn restart(&mut self, node: usize) -> Result<(), Violation> {
        if !self.crashed[node] {
            return Ok(());
        }
        let id = node as NodeId + 1;
        let mut held = Vec::new();
        for (s, disk) in self.disks[node].iter_mut().enumerate() {
            disk.synced = disk.records.len();
            let shard = ShardId(s as u16);
            self.checker
                .restart(node, shard, &disk.records)
                .map_err(|v| Violation(format!("restart of node {node}: {v}")))?;
            if let Some(last) = disk.records.last() {
                held.push((shard, last.version, last.hlc));
            }
            // A shard it was still catching up stays new to it: its disk holds a partial
            // transfer, not a log it persisted as a member, so a view that still lists it (until
            // a change removes it) must not count it among the members whose logs bound the
            // persistence frontier (`check_frontiers`). Rejoining, it is new to its shards anyway.
        }
        let contacts: Vec<NodeId> = (1..=self.nodes.len() as NodeId)
            .filter(|&c| c != id)
            .collect();
        let last_view_id = self.last_view_ids[node];
        let config = config_of(&self.options, id);
        self.nodes[node] = Node::joining(config, contacts, held, last_view_id)
            .map_err(|e| Violation(format!("node {node} cannot restart: {e}")))?;
        self.views[node] = None;
        self.crashed[node] = false;
        self.incarnation[node] += 1;
        self.restarts += 1;
        self.schedule_to(node, self.time_us, Event::Tick { node });
        Ok(())
    }

    /// After every node stopped, a node starts again from its disk: it syncs what its logs
    /// kept, cuts them back to the trim it logged for its recorded view (as its driver does),
    /// and comes back in that view, restarting. A node with no recorded view (it was joining)
    /// asks to join instead.
    fn recover(&mut self, node: usize) -> Result<(), Violation> {
        if !self.crashed[node] {
            return Ok(());
        }
        let Some(recorded) = self.views[node].clone() else {
            return self.restart(node);
        };
        let logged = self.logged[node]
            .clone()
            .filter(|(view_id, _, _)| *view_id == recorded.view_id);
        let me = node as NodeId + 1;
        let mut logs = Vec::new();
        for (s, disk) in self.disks[node].iter_mut().enumerate() {
            let shard = ShardId(s as u16);
            if let Some((view_id, _, decision)) = &logged {
                let end = trim_end(*view_id, &decision.trims[s]);
                disk.records.retain(|r| r.version <= end);
            }
            disk.synced = disk.records.len();
            self.checker
                .recover(node, shard, &disk.records)
                .map_err(|v| Violation(format!("recovery of node {node}: {v}")))?;
            let replicated = recorded
                .layout
                .shard(shard)
                .is_some_and(|s| s.members.contains(&me));
            let last = disk.records.last().map(|r| (r.version, r.hlc));
            if replicated || last.is_some() {
                logs.push((shard, last));
            }
            self.catching_up[node][s] = false;
        }
        let config = config_of(&self.options, me);
        let decision = logged.map(|(_, round, decision)| (round, decision));
        self.nodes[node] = Node::restarting(config, recorded, decision, logs)
            .map_err(|e| Violation(format!("node {node} cannot recover: {e}")))?;
        self.logging[node] = None;
        self.restarting[node] = true;
        self.crashed[node] = false;
        self.incarnation[node] += 1;
        self.restarts += 1;
        self.schedule_to(node, self.time_us, Event::Tick { node });
        Ok(())
    }

    /// After healing, every shard must take a new request: a probe goes to a replica that can
    /// take it now, and again every two suspicion timeouts until one is delivered.
    fn probe(&mut self, shard: ShardId) -> Result<(), Violation> {
        if self.probes.get(&shard) == Some(&true) {
            return Ok(());
        }
        let suspect_us = self.options.suspect_after_ms * 1_000;
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| {
                !self.crashed[n]
                    && self.nodes[n].membership() == Membership::Active
                    && self.nodes[n]
                        .status(shard)
                        .is_some_and(|status| !status.catching_up)
            })
            .collect();
        if candidates.is_empty() {
            self.schedule(self.time_us + 5_000, Event::ProbeSubmit { shard });
            return Ok(());
        }
        let node = candidates[self.rng.below(candidates.len() as u64) as usize];
        let id = PROBE_ID_BASE | self.probe_ids.len() as u64;
        self.probe_ids.insert(id, shard);
        let mut payload = id.to_le_bytes().to_vec();
        payload.push(0x9b);
        let request = Request {
            id,
            client_hlc: Hlc::ZERO,
            payload: Bytes::from(payload),
        };
        self.schedule(self.time_us + 2 * suspect_us, Event::ProbeSubmit { shard });
        self.step(node, submit_input(shard, request))
    }

    /// The view clients learn: the newest any node installed.
    fn current_view(&self) -> &View {
        self.checker.latest_view().unwrap_or(&self.first_view)
    }

    fn client_send(&mut self, client: usize) {
        let state = &mut self.clients[client];
        if state.remaining == 0 || state.outstanding >= self.options.outstanding_max {
            return;
        }
        state.remaining -= 1;
        state.outstanding += 1;
        let number = state.next_number;
        state.next_number += 1;
        let observed = state.observed;
        let id = ((client as u64) << 32) | number;
        let (node, shard) = if let Some(node) = self.options.submit_to {
            let shards: Vec<ShardId> = self.nodes[node].shards().collect();
            (node, shards[self.rng.below(shards.len() as u64) as usize])
        } else {
            let view = self.current_view().clone();
            let shards = view.layout.shards().len() as u64;
            let shard = ShardId(self.rng.below(shards) as u16);
            let replicas = view.layout.shard(shard).expect("a shard").members.clone();
            let replica = replicas[self.rng.below(replicas.len() as u64) as usize];
            ((replica - 1) as usize, shard)
        };
        let len = self.rng.between(1, self.options.payload_bytes_max as u64) as usize;
        let mut payload = id.to_le_bytes().to_vec();
        payload.extend((0..len).map(|_| self.rng.next_u64() as u8));
        // A client's clock ticks past everything it has seen before it sends.
        let request = Request {
            id,
            client_hlc: observed.tick(),
            payload: Bytes::from(payload),
        };
        self.in_flight.insert(
            id,
            InFlight {
                client,
                node,
                observed,
            },
        );
        let arrival = self.time_us + self.rng.between(50, 1_000);
        if self.crashed[node] {
            // The client finds the replica down and gives the request up.
            self.give_up(id);
            return;
        }
        self.schedule_to(
            node,
            arrival,
            Event::Submit {
                node,
                shard,
                request,
            },
        );
        let think = self.rng.between(0, self.options.think_us_max);
        self.schedule(self.time_us + think, Event::ClientWake { client });
    }

    /// A client gives request `id` up (its replica cannot take writes) and goes on.
    fn give_up(&mut self, id: u64) {
        if let Some(in_flight) = self.in_flight.remove(&id) {
            self.clients[in_flight.client].outstanding -= 1;
            let client = in_flight.client;
            self.schedule(self.time_us, Event::ClientWake { client });
        }
    }

    fn step(&mut self, node: usize, input: Input) -> Result<(), Violation> {
        self.step_as(node, Some(input), false)
    }

    /// Steps `node` with `input`; without moving the engine on if `queued`; with no input,
    /// moves it on (`Node::flush`).
    fn step_as(
        &mut self,
        node: usize,
        input: Option<Input>,
        queued: bool,
    ) -> Result<(), Violation> {
        let retry = match &input {
            Some(Input::Submit { shard, request, .. }) => Some((*shard, request.clone())),
            _ => None,
        };
        let mut actions = std::mem::take(&mut self.actions);
        let now = self.local_now(node);
        if self.unflushed.len() <= node {
            self.unflushed.resize(node + 1, false);
        }
        self.unflushed[node] = queued;
        let result = match input {
            Some(input) if queued => self.nodes[node].step_queued(now, input, &mut actions),
            Some(input) => self.nodes[node].step(now, input, &mut actions),
            None => {
                self.nodes[node].flush(now, &mut actions);
                Ok(())
            }
        };
        match result {
            Ok(()) => {}
            Err(StepError::Submit(error)) if retry.is_some() => {
                let (shard, request) = retry.expect("a submit");
                if request.id >= PROBE_ID_BASE {
                    // The next probe of the shard tries another replica.
                } else {
                    match error {
                        SubmitError::QueueFull(_) | SubmitError::Wedged(_) => {
                            // The client backs off and tries the same replica again.
                            let later = self.time_us + self.rng.between(1_000, 5_000);
                            let event = Event::Submit {
                                node,
                                shard,
                                request,
                            };
                            self.schedule_to(node, later, event);
                        }
                        SubmitError::TooLarge(_) => {
                            return Err(Violation(format!(
                                "node {node}: a correct request was refused: {error}"
                            )))
                        }
                        _ => {
                            // The replica cannot take writes: the client gives the request up.
                            if error == SubmitError::NoMajority {
                                self.refused_no_majority += 1;
                            }
                            self.give_up(request.id);
                        }
                    }
                }
            }
            Err(error) => {
                return Err(Violation(format!(
                    "node {node}: a correct input was refused: {error}"
                )))
            }
        }
        let result = actions
            .drain(..)
            .try_for_each(|action| self.apply(node, action));
        self.actions = actions;
        result?;
        if self.nodes[node].membership() == Membership::Joining {
            // Removed: it will join a later view, not the next one.
            self.views[node] = None;
        }
        self.check_barriers(node)?;
        self.check_frontiers(node)
    }

    fn apply(&mut self, node: usize, action: Action) -> Result<(), Violation> {
        match action {
            Action::Send { to, message } => {
                let to = (to - 1) as usize;
                let frame = Bytes::from(message.to_bytes());
                let arrival = self
                    .network
                    .arrival_us(node, to, self.time_us, &mut self.rng);
                self.schedule_to(
                    to,
                    arrival,
                    Event::Message {
                        from: node,
                        to,
                        frame,
                    },
                );
            }
            Action::Deliver { shard, deliveries } => {
                self.checker.deliver(node, shard, &deliveries)?;
                let disk = &mut self.disks[node][usize::from(shard.0)];
                for delivery in &deliveries {
                    disk.records.push(Record {
                        version: delivery.version,
                        hlc: delivery.hlc,
                        payload: encode_delivery(delivery),
                    });
                }
                let me = self.nodes[node].node_id();
                for delivery in deliveries.iter().filter(|d| d.sender == me) {
                    for request in &delivery.requests {
                        self.acknowledge(node, request.id, delivery.hlc)?;
                    }
                }
            }
            Action::AppendRecords { shard, records } => {
                let deliveries = records
                    .iter()
                    .map(decode_delivery)
                    .collect::<Result<Vec<_>, _>>()?;
                self.checker
                    .deliver(node, shard, &deliveries)
                    .map_err(|v| Violation(format!("state transfer: {v}")))?;
                self.transferred += records.len() as u64;
                self.disks[node][usize::from(shard.0)]
                    .records
                    .extend(records);
            }
            Action::ReadRecords {
                to,
                shard,
                view_id,
                after,
                end,
                bytes_max,
                records_max,
            } => {
                let disk = &self.disks[node][usize::from(shard.0)];
                let first = disk.records.partition_point(|r| Some(r.version) <= after);
                let mut records = Vec::new();
                let mut bytes = 0;
                for record in &disk.records[first..] {
                    if record.version > end
                        || records.len() >= records_max
                        || (!records.is_empty() && bytes + record.payload.len() > bytes_max)
                    {
                        break;
                    }
                    bytes += record.payload.len();
                    records.push(record.clone());
                }
                if records.is_empty()
                    || disk.records[..disk.synced].last().map(|r| r.version) < Some(end)
                {
                    return Err(Violation(format!(
                        "state transfer: node {node} serves {shard} up to {end:#x} but its \
                         disk holds no record after {after:?} or has not synced the end"
                    )));
                }
                let input = Input::RecordsRead {
                    to,
                    shard,
                    view_id,
                    after,
                    records,
                };
                let (low, high) = self.options.persist_us[node];
                let done = self.time_us + self.rng.between(low, high) / 4;
                self.schedule_to(node, done, Event::Driver { node, input });
            }
            Action::TruncateLog { shard, after } => {
                let disk = &mut self.disks[node][usize::from(shard.0)];
                disk.records.retain(|r| Some(r.version) <= after);
                disk.synced = disk.synced.min(disk.records.len());
                let kept = disk.records.len();
                self.checker
                    .truncate(node, shard, kept)
                    .map_err(|v| Violation(format!("cut after a total restart: {v}")))?;
            }
            Action::CaughtUp { shard } => {
                self.caught_up += 1;
                self.catching_up[node][usize::from(shard.0)] = false;
            }
            Action::Persist { shard, version } => {
                let (low, high) = self.options.persist_us[node];
                let free = &mut self.disk_free_us[node][usize::from(shard.0)];
                *free = (*free).max(self.time_us + self.rng.between(low, high));
                let done = *free;
                self.schedule_to(
                    node,
                    done,
                    Event::Persisted {
                        node,
                        shard,
                        version,
                    },
                );
            }
            Action::Suspect { node: suspected } => {
                if self.options.faults.is_empty() {
                    return Err(Violation(format!(
                        "node {node} suspected node {suspected} in a run without faults"
                    )));
                }
            }
            Action::Wedge => {}
            Action::LogTrim {
                view_id,
                round,
                decision,
            } => {
                if !decision.ends.is_empty() && self.restarts_ended.insert(view_id) {
                    // The first replica to log the restart decision: the shards' logs end
                    // where it says, before any delivery of the next view.
                    for (s, end) in decision.ends.iter().enumerate() {
                        self.checker
                            .cut(ShardId(s as u16), end.map(|(v, _)| v))
                            .map_err(|v| Violation(format!("node {node}: {v}")))?;
                    }
                }
                self.logging[node] = Some((view_id, round, decision));
                let (low, high) = self.options.persist_us[node];
                let done = self.time_us + self.rng.between(low, high);
                self.schedule_to(
                    node,
                    done,
                    Event::TrimLogged {
                        node,
                        view_id,
                        round,
                    },
                );
            }
            Action::InstallView { view } => {
                let me = self.nodes[node].node_id();
                let old = self.views[node].take();
                self.joins += u64::from(old.is_none());
                self.late_installs += u64::from(
                    view.view_id
                        .checked_add(1)
                        .is_some_and(|next| self.checker.view(next).is_some()),
                );
                self.logged[node] = None;
                self.logging[node] = None;
                let restarted = self.restarting[node];
                self.restarting[node] = self.nodes[node].is_restarting();
                // The shards whose trim it delivered: those it replicated, caught up (none
                // after a total restart: the logs are what it had, the longest is fetched).
                let mut trimmed = Vec::new();
                if let (Some(old), false) = (&old, restarted) {
                    for shard in old.layout.shards_of(me) {
                        if !self.catching_up[node][usize::from(shard.id.0)] {
                            trimmed.push(shard.id);
                        }
                    }
                }
                self.checker.install(node, old.as_ref(), &view, &trimmed)?;
                for shard in view.layout.shards_of(me) {
                    let s = usize::from(shard.id.0);
                    let kept = old.as_ref().is_some_and(|old| {
                        old.layout
                            .shard(shard.id)
                            .is_some_and(|o| o.members.contains(&me))
                    });
                    let behind = restarted
                        && self.nodes[node]
                            .status(shard.id)
                            .is_some_and(|status| status.catching_up);
                    if !kept || self.catching_up[node][s] || behind {
                        self.catching_up[node][s] = true;
                        self.checker.join_shard(node, shard.id);
                    }
                }
                // A link that broke, or lost a message, in this view stays broken in it.
                for &peer in &view.members {
                    let other = (peer - 1) as usize;
                    if other != node && self.network.dead_for(node, other, view.view_id) {
                        self.schedule_to(node, self.time_us, Event::LinkBroken { node, peer });
                    }
                }
                self.last_view_ids[node] = view.view_id;
                self.views[node] = Some(view);
            }
        }
        Ok(())
    }

    /// The replica a client sent a request to delivered it: the client gets its reply.
    fn acknowledge(&mut self, node: usize, id: u64, hlc: Hlc) -> Result<(), Violation> {
        if id >= PROBE_ID_BASE {
            if let Some(shard) = self.probe_ids.get(&id) {
                self.probes.insert(*shard, true);
            }
            return Ok(());
        }
        let Some(in_flight) = self.in_flight.remove(&id) else {
            return Err(Violation(format!("request {id:#x} acknowledged twice")));
        };
        if in_flight.node != node {
            return Err(Violation(format!(
                "request {id:#x} delivered as sent by node {node}"
            )));
        }
        if hlc <= in_flight.observed {
            return Err(Violation(format!(
                "causality: request {id:#x} stamped {hlc}, its client had seen {}",
                in_flight.observed
            )));
        }
        let client = &mut self.clients[in_flight.client];
        client.observed = client.observed.max(hlc);
        client.outstanding -= 1;
        self.acknowledged += 1;
        let think = self.rng.between(0, self.options.think_us_max);
        self.schedule(
            self.time_us + think,
            Event::ClientWake {
                client: in_flight.client,
            },
        );
        Ok(())
    }

    fn check_frontiers(&mut self, node: usize) -> Result<(), Violation> {
        let shards: Vec<ShardId> = self.nodes[node].shards().collect();
        for shard in shards {
            let stability = self.nodes[node]
                .stability_frontier(shard)
                .expect("a local shard");
            let durable = self.nodes[node].persistence_frontier(shard);
            // Members new to the shard (installed and catching up, or not installed yet) have
            // persisted nothing of it yet: the frontier is what the others persisted.
            let view = self.nodes[node].view();
            let previous = self
                .checker
                .view(view.view_id - 1)
                .and_then(|v| v.layout.shard(shard))
                .map(|shard| shard.members.clone())
                .unwrap_or_default();
            let members: Vec<usize> = view
                .layout
                .shard(shard)
                .expect("a shard of the layout")
                .members
                .iter()
                .filter(|&id| {
                    let m = (id - 1) as usize;
                    let installed = self.views[m]
                        .as_ref()
                        .is_some_and(|v| v.view_id >= view.view_id);
                    !self.catching_up[m][usize::from(shard.0)]
                        && (installed || previous.contains(id))
                })
                .map(|&id| (id - 1) as usize)
                .collect();
            self.checker
                .frontiers(node, shard, &members, stability, durable)?;
        }
        Ok(())
    }

    /// A random live replica answers a read at a random time its stability frontier passed.
    fn time_read(&mut self) -> Result<(), Violation> {
        let node = self.rng.below(self.nodes.len() as u64) as usize;
        if self.crashed[node] {
            return Ok(());
        }
        let shards: Vec<ShardId> = self.nodes[node].shards().collect();
        if shards.is_empty() {
            return Ok(());
        }
        let shard = shards[self.rng.below(shards.len() as u64) as usize];
        self.take_barrier(node, shard);
        let frontier = self.nodes[node]
            .stability_frontier(shard)
            .expect("a local shard");
        if frontier == Hlc::ZERO {
            return Ok(());
        }
        let at = if self.rng.chance(50) {
            frontier
        } else {
            Hlc::at(frontier.wall_us.saturating_sub(self.rng.below(30_000)))
        };
        self.checker.time_read(node, shard, at)
    }

    /// Takes a barrier of `shard` at `node`, to be checked once the node reaches it.
    fn take_barrier(&mut self, node: usize, shard: ShardId) {
        // As a node's driver: a member that is joining (back from a crash, or removed) or in a
        // minority answers no read at the latest state, nor one without its read lease (it may
        // have been removed without having heard of it yet), nor one back from a total restart
        // until the view that ends it is formed.
        if self.restarting[node]
            || matches!(
                self.nodes[node].membership(),
                Membership::Joining | Membership::NoMajority
            )
            || !self.nodes[node].holds_read_lease(self.local_now(node))
        {
            self.barriers_refused += 1;
            return;
        }
        self.barriers_taken += 1;
        let Some(barrier) = self.nodes[node].barrier(shard) else {
            return;
        };
        let delivered_then = (0..self.nodes.len())
            .filter(|&n| !self.crashed[n])
            .filter_map(|n| self.nodes[n].status(shard)?.last_delivered)
            .map(|(version, _)| version)
            .filter(|version| version >> 32 == u64::from(barrier.view_id))
            .max();
        let Some(delivered_then) = delivered_then else {
            return;
        };
        if self.barriers.len() == PENDING_BARRIERS_MAX {
            self.barriers.remove(0);
        }
        self.barriers.push(PendingBarrier {
            node,
            incarnation: self.incarnation[node],
            shard,
            barrier,
            delivered_then,
        });
    }

    /// Every barrier `node` reached: it delivered what any member had delivered when it was
    /// taken (`Node::barrier`'s contract), also when the others removed it meanwhile (its read
    /// lease kept it from taking one once they could have). Not checked once a total restart
    /// ended a view: it cuts logs to the logged trim, the simulator's other checks cover what
    /// it keeps.
    fn check_barriers(&mut self, node: usize) -> Result<(), Violation> {
        let incarnation = self.incarnation[node];
        let mut result = Ok(());
        let restarted = !self.restarts_ended.is_empty();
        let nodes = &self.nodes;
        self.barriers.retain(|p| {
            if p.node != node {
                return true;
            }
            if p.incarnation != incarnation {
                return false;
            }
            if !nodes[node].barrier_reached(p.shard, p.barrier) {
                return true;
            }
            let delivered = nodes[node]
                .status(p.shard)
                .and_then(|s| s.last_delivered)
                .map(|(version, _)| version);
            if !restarted && delivered < Some(p.delivered_then) && result.is_ok() {
                result = Err(Violation(format!(
                    "node {node}: barrier {:?} of {} reached with {delivered:?} delivered, below \
                     version {:#x} a member had delivered when it was taken",
                    p.barrier, p.shard, p.delivered_then
                )));
            }
            false
        });
        result
    }

    /// After the workload and a quiet period: every replica holds the whole log persisted, and
    /// both frontiers passed its last version.
    fn check_settled(&mut self) -> Result<(), Violation> {
        for (s, members) in self.members.iter().enumerate() {
            let shard = ShardId(s as u16);
            let log = self.checker.canonical(shard);
            let Some(last) = log.last().copied() else {
                continue;
            };
            for &node in members {
                let delivered = self.checker.delivered(node, shard);
                if delivered != log.len() {
                    return Err(Violation(format!(
                        "liveness: node {node} delivered {delivered} of {} versions of {shard}",
                        log.len()
                    )));
                }
                if self.checker.persisted(node, shard) != Some(last.version) {
                    return Err(Violation(format!(
                        "liveness: node {node} did not persist {shard}"
                    )));
                }
                let durable = self.nodes[node].persistence_frontier(shard);
                if durable != Some(last.version) {
                    return Err(Violation(format!(
                        "liveness: node {node}: persistence frontier of {shard} stuck at \
                         {durable:?}, last version {:#x}",
                        last.version
                    )));
                }
                let stable = self.nodes[node]
                    .stability_frontier(shard)
                    .expect("a local shard");
                if stable < last.hlc {
                    return Err(Violation(format!(
                        "liveness: node {node}: stability frontier of {shard} stuck at {stable}, \
                         last stamp {}",
                        last.hlc
                    )));
                }
            }
        }
        Ok(())
    }

    fn report(&self) -> Report {
        let versions = (0..self.members.len())
            .map(|s| self.checker.canonical(ShardId(s as u16)).len() as u64)
            .sum();
        Report {
            seed: self.options.seed,
            steps: self.steps,
            simulated_us: self.time_us,
            versions,
            requests_acknowledged: self.acknowledged,
            time_reads: self.checker.time_reads,
            nulls_sent: self.nodes.iter().map(|n| n.counters().nulls_sent).sum(),
            wedged: self.nodes.iter().map(Node::is_wedged).collect(),
            suspected: self.nodes.iter().map(Node::suspected).collect(),
            view_ids: self.nodes.iter().map(|n| n.view().view_id).collect(),
            refused_no_majority: self.refused_no_majority,
            probes_delivered: self.probes.values().filter(|&&d| d).count() as u64,
            rounds_led: self.nodes.iter().map(|n| n.counters().rounds_led).sum(),
            forgiven: self.nodes.iter().map(|n| n.counters().forgiven).sum(),
            joins: self.joins,
            late_installs: self.late_installs,
            barriers_taken: self.barriers_taken,
            barriers_refused: self.barriers_refused,
            records_transferred: self.transferred,
            shards_caught_up: self.caught_up,
            restarts: self.restarts,
            last_members: self.current_view().members.clone(),
            trace: self.trace.finish(),
        }
    }
}

fn config_of(options: &Options, id: NodeId) -> Config {
    Config {
        heartbeat_ms: options.heartbeat_ms,
        suspect_after_ms: options.suspect_after_ms,
        window: options.window,
        batch_bytes_max: options.batch_bytes_max,
        addr: Some(crate::checker::announced_addr(id)),
        ..Config::new(id)
    }
}

/// The submission of `request` to `shard`. Every other request (by its id) has a client that
/// waits until it is durable on every member, so that runs mix the rows pushed at once for a
/// waiting client with the persistence reported at the next push or tick.
fn submit_input(shard: ShardId, request: Request) -> Input {
    let durable = request.id % 2 == 0;
    Input::Submit {
        shard,
        request,
        durable,
    }
}

/// The simulated driver's encoding of a delivery in its log: the sender, then each request's
/// id, client stamp and payload.
fn encode_delivery(delivery: &Delivery) -> Bytes {
    let mut out = Vec::new();
    out.extend_from_slice(&delivery.sender.to_le_bytes());
    out.extend_from_slice(&(delivery.requests.len() as u32).to_le_bytes());
    for request in &delivery.requests {
        out.extend_from_slice(&request.id.to_le_bytes());
        out.extend_from_slice(&request.client_hlc.wall_us.to_le_bytes());
        out.extend_from_slice(&request.client_hlc.logical.to_le_bytes());
        out.extend_from_slice(&(request.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&request.payload);
    }
    Bytes::from(out)
}

/// The delivery a transferred record holds, or why it does not decode.
fn decode_delivery(record: &Record) -> Result<Delivery, Violation> {
    let bytes = &record.payload;
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], Violation> {
        let slice = bytes
            .get(at..at + n)
            .ok_or_else(|| Violation(format!("transfer: record {:#x} is cut", record.version)))?;
        at += n;
        Ok(slice)
    };
    let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let sender = u32_of(take(4)?);
    let count = u32_of(take(4)?);
    let mut requests = Vec::new();
    for _ in 0..count {
        let id = u64_of(take(8)?);
        let wall_us = u64_of(take(8)?);
        let logical = u32_of(take(4)?);
        let len = u32_of(take(4)?) as usize;
        let payload = Bytes::copy_from_slice(take(len)?);
        requests.push(Request {
            id,
            client_hlc: Hlc { wall_us, logical },
            payload,
        });
    }
    Ok(Delivery {
        version: record.version,
        hlc: record.hlc,
        sender,
        requests,
    })
}

/// The last version of view `view_id` that the ragged `trim` keeps in a shard (message `i` of
/// the sender of rank `r` is sequence `i * senders + r`), or the last version before the view
/// if it keeps nothing: where a node cuts its log back to on restart (as the node's driver).
fn trim_end(view_id: u32, trim: &[u64]) -> Version {
    let senders = trim.len() as u64;
    let end = trim
        .iter()
        .enumerate()
        .filter(|(_, &kept)| kept > 0)
        .map(|(sender, &kept)| (kept - 1) * senders + sender as u64 + 1)
        .max()
        .unwrap_or(0);
    ((u64::from(view_id) << 32) + end).saturating_sub(1)
}
