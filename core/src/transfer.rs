//! State transfer: how a member that joined a shard gets the shard's log.
//!
//! A member new to a shard in view `v` (a joiner, or an old member the sticky layout moved to
//! a shard it did not replicate) takes part in the shard's multicast from the start of `v`:
//! it receives, counts and pushes rows, so ordering never waits for it more than any member.
//! But it delivers nothing until its log holds every version the shard had when `v` began —
//! the *end* of the transfer. It pulls those versions from a member that has them, one
//! `Fetch`/`Piece` exchange at a time:
//!
//! - `Fetch { after }` asks for the records after `after`, the last record of the joiner's log
//!   (`None` for an empty log; a node that rejoins keeps its log and resumes from its end).
//! - The member asks its driver for those records (`Action::ReadRecords`): in version order,
//!   up to the end, gathering at most `TRANSFER_PIECE_BYTES_MAX` bytes (a larger record alone).
//!   The driver answers `Input::RecordsRead` and the member sends `Piece { end, records }`.
//! - The joiner hands the records to its driver (`Action::AppendRecords`) and asks it to
//!   persist them (`Action::Persist`). It asks for the next piece only while fewer than
//!   `TRANSFER_PIECES_UNPERSISTED_MAX` pieces wait for its disk: what the transfer holds in
//!   memory is bounded by pieces, never by the size of the log.
//! - Once every record up to the end is persisted, the shard is *caught up*
//!   (`Action::CaughtUp`): it delivers the messages of `v` it has been receiving (flow control
//!   held the other senders within the window meanwhile), takes requests and answers reads.
//!
//! A member that is itself catching up answers `Piece { ready: false }` and the joiner asks the
//! next member. If the view changes before the joiner caught up, it keeps its log and resumes
//! in the next view from a member of that view; its counters do not enter the ragged trim (it
//! delivers none of it: the trimmed versions reach it by transfer in the next view).

use std::collections::VecDeque;

use derechofs_storage::{Hlc, Version};

use crate::bounds::{
    TRANSFER_PIECES_UNPERSISTED_MAX, TRANSFER_PIECE_BYTES_MAX, TRANSFER_PIECE_RECORDS_MAX,
    TRANSFER_RECORD_BYTES_MAX,
};
use crate::error::Rejection;
use crate::message::Record;

/// A shard log a node holds: its last record, and the last version persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Held {
    pub(crate) last: (Version, Hlc),
    pub(crate) persisted: Option<Version>,
}

/// The content of a `Piece` message.
#[derive(Clone, Debug)]
pub(crate) struct Piece {
    pub(crate) after: Option<Version>,
    pub(crate) end: Option<(Version, Hlc)>,
    pub(crate) ready: bool,
    /// The serving member's stamp floor of the view (`Multicast::stamp_floor`).
    pub(crate) floor: Hlc,
    pub(crate) records: Vec<Record>,
}

/// A member's progress in getting one shard's log.
#[derive(Clone, Debug)]
pub(crate) struct CatchUp {
    /// The last record of this member's log (handed to the driver; perhaps not yet persisted).
    pub(crate) have: Option<(Version, Hlc)>,
    /// The last record known persisted.
    pub(crate) persisted: Option<Version>,
    /// The end of the transfer, once a source said it.
    pub(crate) end: Option<Option<(Version, Hlc)>>,
    /// The view's stamp floor, as the sources said it.
    pub(crate) floor: Hlc,
    /// The shard rank of the member asked, or to ask next.
    pub(crate) source: usize,
    /// Sources tried in a row that could not serve; after a whole round the joiner waits.
    pub(crate) refused: usize,
    /// A fetch is outstanding.
    pub(crate) asked: bool,
    /// Do not ask before this time (after every member refused).
    pub(crate) retry_at_us: u64,
    /// The last version of each piece handed to the driver and not yet persisted.
    pub(crate) unpersisted: VecDeque<Version>,
}

impl CatchUp {
    /// A transfer that resumes after `have`, the last record of this member's log, of which
    /// the driver persisted up to `persisted`.
    pub(crate) fn new(have: Option<(Version, Hlc)>, persisted: Option<Version>) -> CatchUp {
        CatchUp {
            have,
            persisted,
            end: None,
            floor: Hlc::ZERO,
            source: 0,
            refused: 0,
            asked: false,
            retry_at_us: 0,
            unpersisted: VecDeque::new(),
        }
    }

    /// Whether every record up to the end is persisted here.
    pub(crate) fn is_done(&self) -> bool {
        match self.end {
            Some(end) => {
                self.have.map(|(v, _)| v) == end.map(|(v, _)| v)
                    && self.persisted >= end.map(|(v, _)| v)
            }
            None => false,
        }
    }

    /// Whether the next fetch may go out now.
    pub(crate) fn may_ask(&self, now_us: u64) -> bool {
        let more = match self.end {
            Some(end) => self.have.map(|(v, _)| v) != end.map(|(v, _)| v),
            None => true,
        };
        more && !self.asked
            && now_us >= self.retry_at_us
            && self.unpersisted.len() < TRANSFER_PIECES_UNPERSISTED_MAX
    }

    /// The driver persisted up to `version`.
    pub(crate) fn persisted(&mut self, version: Version) {
        self.persisted = self.persisted.max(Some(version));
        while self.unpersisted.front().is_some_and(|&v| v <= version) {
            self.unpersisted.pop_front();
        }
    }
}

/// Checks a piece against the transfer it answers: the records follow `after` in strictly
/// increasing versions and stamps, within the end, and the piece is within its bounds.
pub(crate) fn check_piece(
    have: Option<(Version, Hlc)>,
    end: Option<(Version, Hlc)>,
    records: &[Record],
) -> Result<(), Rejection> {
    if records.len() > TRANSFER_PIECE_RECORDS_MAX {
        return Err(Rejection::OutOfRange("records in a piece"));
    }
    let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
    if records.len() > 1 && bytes > TRANSFER_PIECE_BYTES_MAX {
        return Err(Rejection::OutOfRange("bytes in a piece"));
    }
    if records
        .iter()
        .any(|r| r.payload.len() > TRANSFER_RECORD_BYTES_MAX)
    {
        return Err(Rejection::OutOfRange("bytes of a record"));
    }
    let Some((end_version, end_hlc)) = end else {
        return if have.is_none() && records.is_empty() {
            Ok(())
        } else {
            Err(Rejection::OutOfRange("records beyond the end of the log"))
        };
    };
    if have.is_some_and(|(v, h)| v > end_version || h > end_hlc) {
        return Err(Rejection::OutOfRange(
            "a log beyond the end of the transfer",
        ));
    }
    let mut last = have;
    for record in records {
        if let Some((version, hlc)) = last {
            if record.version <= version || record.hlc <= hlc {
                return Err(Rejection::OutOfRange("records out of order"));
            }
        }
        if record.version > end_version || record.hlc > end_hlc {
            return Err(Rejection::OutOfRange("records beyond the end of the log"));
        }
        last = Some((record.version, record.hlc));
    }
    if last.map(|(v, _)| v) == Some(end_version) && last.map(|(_, h)| h) != Some(end_hlc) {
        return Err(Rejection::OutOfRange("the last record is not the end"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn record(version: Version, wall_us: u64) -> Record {
        Record {
            version,
            hlc: Hlc::at(wall_us),
            payload: Bytes::from_static(b"delta"),
        }
    }

    #[test]
    fn a_piece_must_follow_the_log_and_stay_within_the_end() {
        let end = Some((10, Hlc::at(100)));
        assert_eq!(
            check_piece(None, end, &[record(1, 10), record(10, 100)]),
            Ok(())
        );
        assert!(check_piece(Some((5, Hlc::at(50))), end, &[record(4, 60)]).is_err());
        assert!(check_piece(None, end, &[record(11, 110)]).is_err());
        assert!(check_piece(None, end, &[record(3, 30), record(2, 40)]).is_err());
        assert!(check_piece(Some((1, Hlc::at(10))), None, &[]).is_err());
        assert_eq!(check_piece(None, None, &[]), Ok(()));
    }

    #[test]
    fn a_transfer_is_done_once_the_end_is_persisted() {
        let mut catch_up = CatchUp::new(None, None);
        assert!(!catch_up.is_done());
        assert!(catch_up.may_ask(0));
        catch_up.end = Some(Some((10, Hlc::at(100))));
        catch_up.have = Some((10, Hlc::at(100)));
        catch_up.unpersisted.push_back(10);
        assert!(!catch_up.is_done());
        assert!(!catch_up.may_ask(0), "nothing more to ask for");
        catch_up.persisted(10);
        assert!(catch_up.is_done());
        assert!(catch_up.unpersisted.is_empty());
    }

    #[test]
    fn a_slow_disk_stops_the_fetches() {
        let mut catch_up = CatchUp::new(None, None);
        for v in 0..TRANSFER_PIECES_UNPERSISTED_MAX as u64 {
            catch_up.unpersisted.push_back(v);
        }
        assert!(!catch_up.may_ask(0));
        catch_up.persisted(0);
        assert!(catch_up.may_ask(0));
    }
}
