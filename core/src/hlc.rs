//! The stamp rule: how every replica computes the same hybrid logical clock for a version.

use derechofs_storage::Hlc;

use crate::message::Request;

/// The stamp a sender puts on a message it sends at `now_us`: the later of its wall clock and
/// every client HLC carried by the requests, so an operation that causally follows another one
/// (through the client) gets a later stamp even in another shard.
pub fn sender_stamp(now_us: u64, requests: &[Request]) -> Hlc {
    requests
        .iter()
        .map(|request| request.client_hlc)
        .fold(Hlc::at(now_us), Hlc::max)
}

/// The stamp of the next version: one tick after the previous version's, or the sender's stamp
/// if that is later. Every replica computes it from the same inputs in the same order, so every
/// replica agrees on every stamp and, within a shard, stamp order is log order.
pub fn delivery_stamp(previous: Hlc, sender_stamp: Hlc) -> Hlc {
    previous.tick().max(sender_stamp)
}

/// The greatest stamp strictly below `stamp` (or zero): used to turn "every future stamp is at
/// least `s`" into a frontier at or below which nothing can change.
pub fn just_before(stamp: Hlc) -> Hlc {
    if stamp.logical > 0 {
        Hlc {
            wall_us: stamp.wall_us,
            logical: stamp.logical - 1,
        }
    } else if stamp.wall_us > 0 {
        Hlc {
            wall_us: stamp.wall_us - 1,
            logical: u32::MAX,
        }
    } else {
        Hlc::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn request(client_hlc: Hlc) -> Request {
        Request {
            id: 0,
            client_hlc,
            payload: Bytes::new(),
        }
    }

    #[test]
    fn sender_stamp_is_never_below_a_client_hlc_nor_the_wall_clock() {
        let ahead = Hlc {
            wall_us: 50,
            logical: 3,
        };
        assert_eq!(
            sender_stamp(10, &[request(Hlc::at(5)), request(ahead)]),
            ahead
        );
        assert_eq!(sender_stamp(100, &[request(ahead)]), Hlc::at(100));
    }

    #[test]
    fn delivery_stamp_strictly_increases_even_when_the_sender_clock_is_behind() {
        let previous = Hlc::at(1_000);
        let next = delivery_stamp(previous, Hlc::at(10));
        assert!(next > previous);
        assert_eq!(delivery_stamp(previous, Hlc::at(2_000)), Hlc::at(2_000));
    }

    #[test]
    fn just_before_is_the_predecessor() {
        let stamp = Hlc::at(7);
        assert!(just_before(stamp) < stamp);
        assert_eq!(just_before(stamp).tick(), stamp);
        assert_eq!(
            just_before(Hlc {
                wall_us: 7,
                logical: 2
            })
            .tick(),
            Hlc {
                wall_us: 7,
                logical: 2
            }
        );
        assert_eq!(just_before(Hlc::ZERO), Hlc::ZERO);
    }
}
