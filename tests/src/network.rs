//! The simulated network: one reliable FIFO link per ordered pair of nodes, each message
//! arriving after a random delay, never before a message sent earlier on the same link. Links
//! are independent, so messages on different links overtake each other freely.

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
        }
    }

    /// When a message sent now on link `from → to` arrives: after a random delay, and no
    /// earlier than the previous message of the link (ties keep send order in the event queue).
    pub fn arrival_us(&mut self, from: usize, to: usize, now_us: u64, rng: &mut Rng) -> u64 {
        let slowness = self.slowness[from].max(self.slowness[to]);
        let delay = rng.between(self.delay_us.0, self.delay_us.1) * slowness;
        let last = &mut self.last_arrival_us[from][to];
        *last = (*last).max(now_us + delay);
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
}
