//! The simulated network: one reliable FIFO link per ordered pair of nodes, each message
//! arriving after a random delay, never before a message sent earlier on the same link. Links
//! are independent, so messages on different links overtake each other freely.
//!
//! Faults: a *clogged* link holds every message that would arrive while it is clogged until it
//! is restored (delayed, never lost, still FIFO). A *broken* link loses messages; the
//! simulation tells both ends, and a link is never reconnected inside a view: once a message
//! of view `v` was lost on it, it loses every later message of views up to `v` even after it
//! is restored.

use crate::rng::Rng;

/// Delays of every link.
#[derive(Clone, Debug)]
pub struct Network {
    /// Per node: the multiplier of the delay of every link to or from it (1 for a normal node).
    slowness: Vec<u64>,
    /// Base delay of a link, before jitter, in microseconds.
    delay_us: (u64, u64),
    /// Per link `(from, to)`: when its last message arrives.
    last_arrival_us: Vec<Vec<u64>>,
    /// Per link: the intervals `[start, end)` during which it is clogged.
    clogs: Vec<Vec<Vec<(u64, u64)>>>,
    /// Per link: broken now.
    broken: Vec<Vec<bool>>,
    /// Per link: the highest view of a message it lost.
    dead_view: Vec<Vec<Option<u32>>>,
}

impl Network {
    /// A network of `nodes` nodes whose links take `delay_us.0..=delay_us.1` microseconds,
    /// times the slowness of the slower end.
    pub fn new(nodes: usize, delay_us: (u64, u64), slowness: Vec<u64>) -> Network {
        assert_eq!(slowness.len(), nodes);
        Network {
            slowness,
            delay_us,
            last_arrival_us: vec![vec![0; nodes]; nodes],
            clogs: vec![vec![Vec::new(); nodes]; nodes],
            broken: vec![vec![false; nodes]; nodes],
            dead_view: vec![vec![None; nodes]; nodes],
        }
    }

    /// Clogs link `from → to` during `[start_us, end_us)`.
    pub fn clog(&mut self, from: usize, to: usize, start_us: u64, end_us: u64) {
        assert!(start_us < end_us);
        self.clogs[from][to].push((start_us, end_us));
    }

    /// Breaks or restores the link between `a` and `b`, both directions.
    pub fn set_broken(&mut self, a: usize, b: usize, broken: bool) {
        self.broken[a][b] = broken;
        self.broken[b][a] = broken;
    }

    /// Whether a message of `view_id` arriving now on `from → to` is lost.
    pub fn loses(&mut self, from: usize, to: usize, view_id: u32) -> bool {
        if self.broken[from][to] {
            let dead = &mut self.dead_view[from][to];
            *dead = (*dead).max(Some(view_id));
            return true;
        }
        self.dead_view[from][to].is_some_and(|dead| view_id <= dead)
    }

    /// Whether the link between `a` and `b` is unusable for messages of `view_id`: broken, or
    /// lost a message of that view (or a later one) in either direction.
    pub fn dead_for(&self, a: usize, b: usize, view_id: u32) -> bool {
        self.broken[a][b]
            || self.dead_view[a][b].is_some_and(|dead| view_id <= dead)
            || self.dead_view[b][a].is_some_and(|dead| view_id <= dead)
    }

    /// When a message sent now on link `from → to` arrives: after a random delay, and no
    /// earlier than the previous message of the link (ties keep send order in the event queue).
    pub fn arrival_us(&mut self, from: usize, to: usize, now_us: u64, rng: &mut Rng) -> u64 {
        let slowness = self.slowness[from].max(self.slowness[to]);
        let delay = rng.between(self.delay_us.0, self.delay_us.1) * slowness;
        let mut arrival = now_us + delay;
        for &(start, end) in &self.clogs[from][to] {
            if (start..end).contains(&arrival) {
                arrival = end;
            }
        }
        let last = &mut self.last_arrival_us[from][to];
        *last = (*last).max(arrival);
        *last
    }

    /// The longest one-way delay of any link, for timeouts.
    pub fn delay_max_us(&self) -> u64 {
        self.delay_us.1 * self.slowness.iter().copied().max().unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_never_reorders_its_messages() {
        let mut network = Network::new(2, (10, 5_000), vec![1, 3]);
        let mut rng = Rng::new(1);
        let mut last = 0;
        for now in 0..1_000 {
            let arrival = network.arrival_us(0, 1, now, &mut rng);
            assert!(arrival >= last && arrival >= now + 10);
            last = arrival;
        }
    }

    #[test]
    fn a_clogged_link_delays_until_restored_and_keeps_its_order() {
        let mut network = Network::new(2, (10, 100), vec![1, 1]);
        network.clog(0, 1, 1_000, 5_000);
        let mut rng = Rng::new(2);
        let mut last = 0;
        for now in (900..6_000).step_by(50) {
            let arrival = network.arrival_us(0, 1, now, &mut rng);
            assert!(!(1_000..5_000).contains(&arrival));
            assert!(arrival >= last);
            last = arrival;
        }
    }

    #[test]
    fn a_broken_link_stays_dead_for_the_views_it_lost_messages_of() {
        let mut network = Network::new(2, (10, 100), vec![1, 1]);
        network.set_broken(0, 1, true);
        assert!(network.loses(0, 1, 3));
        network.set_broken(0, 1, false);
        assert!(network.loses(0, 1, 3));
        assert!(network.dead_for(1, 0, 3));
        assert!(!network.loses(0, 1, 4));
    }
}
