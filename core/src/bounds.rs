//! Every bound of the engine, in one place. Each queue the engine keeps is bounded by one of
//! these, and the wire decoder rejects anything beyond them before allocating.

/// Members of one view. Suspicions travel as a 64-bit mask over view ranks.
pub const VIEW_MEMBERS_MAX: usize = 64;

/// Members of one shard, which are also its senders.
pub const SHARD_MEMBERS_MAX: usize = 16;

/// Shards of one layout, over all subgroups. Shard ids travel as `u16`.
pub const SHARDS_MAX: usize = 1024;

/// Messages a sender may have outstanding beyond the slowest member's delivered counter. A peer
/// that exceeds it at a receiver is rejected, so each per-sender receive buffer holds at most this.
pub const WINDOW_MAX: u32 = 1024;

/// Heartbeat intervals between two steps of a node beyond which the node itself counts as
/// paused (a long step before, its process not scheduled): the excess of the gap is not
/// counted as silence of its peers, whose messages wait unread meanwhile.
pub const PAUSE_HEARTBEATS: u64 = 2;

/// Suspicion timeouts a node stays wedged without a new view before it counts its view
/// change as stuck: it then keeps only its own suspicions and trusts again members it hears
/// from, so that false suspicions that left no leader a trusting majority end.
pub const STUCK_CHANGE_TIMEOUTS: u64 = 3;

/// Bytes of one client request's payload.
pub const REQUEST_BYTES_MAX: usize = 4 << 20;

/// Bytes of requests batched into one multicast message. A request alone in its message may use
/// up to [`REQUEST_BYTES_MAX`], which is below this.
pub const BATCH_BYTES_MAX: usize = 8 << 20;

/// Requests batched into one multicast message.
pub const BATCH_REQUESTS_MAX: usize = 4096;

/// Local requests waiting for the window to open, per shard.
pub const PENDING_REQUESTS_MAX: usize = 1 << 16;

/// Bytes of local requests waiting for the window to open, per shard.
pub const PENDING_BYTES_MAX: usize = 256 << 20;

/// Persist requests the driver has not yet confirmed, per shard; beyond it they merge.
pub const PERSIST_QUEUE_MAX: usize = 64;

/// Stamps of own messages not yet persisted here, per shard; beyond it the newest merges into
/// the last one kept, holding the floor at the lower stamp a little longer.
pub const UNPERSISTED_STAMPS_MAX: usize = 64;

/// Published stability floors remembered per member until this replica's log covers them;
/// beyond it the newest replaces the last one kept.
pub const FLOOR_HISTORY_MAX: usize = 32;

/// Sequence numbers of one view: the low 32 bits of a version.
pub const SEQ_MAX: u64 = u32::MAX as u64;

/// Messages of a later view buffered per peer until this node installs that view (heartbeats
/// are not buffered, and a peer's newer row of a shard replaces its older one).
pub const FUTURE_MESSAGES_MAX: usize = 4096;

/// View change rounds. A round is `attempt * VIEW_MEMBERS_MAX + leader rank`; far beyond any
/// real number of attempts, and low enough that the next round never overflows.
pub const ROUND_MAX: u64 = 1 << 56;

/// Nodes waiting at the leader to join; a join request beyond it is dropped (the joiner retries).
pub const JOINS_PENDING_MAX: usize = VIEW_MEMBERS_MAX;

/// Bytes of record payloads in one state transfer piece. Records are gathered into a piece up to
/// this; a larger record travels alone. This, times [`TRANSFER_PIECES_UNPERSISTED_MAX`], bounds
/// what a transfer holds in flight, whatever the size of the log.
pub const TRANSFER_PIECE_BYTES_MAX: usize = 1 << 20;

/// Bytes of one record in a state transfer piece: the delta of one version.
pub const TRANSFER_RECORD_BYTES_MAX: usize = 12 << 20;

/// Bytes of the delta one version may add to a shard's log: the payload of its log record, as
/// `derechofs_storage::record::payload_len` counts it. The state machines keep every version
/// within it (a request that would bring its version over is answered "retry" and resent by its
/// client into a later version), so every record can travel in a state transfer piece and stays
/// far below the log's own record limit.
pub const VERSION_DELTA_BYTES_MAX: usize = TRANSFER_RECORD_BYTES_MAX;

const _: () = assert!(VERSION_DELTA_BYTES_MAX <= TRANSFER_RECORD_BYTES_MAX);
const _: () = assert!(TRANSFER_RECORD_BYTES_MAX <= derechofs_storage::record::RECORD_PAYLOAD_MAX);

/// Records in one state transfer piece.
pub const TRANSFER_PIECE_RECORDS_MAX: usize = 4096;

/// Pieces a joiner has handed to its driver and not yet seen persisted; it asks for the next
/// piece only below this, so a slow disk slows the transfer instead of filling memory.
pub const TRANSFER_PIECES_UNPERSISTED_MAX: usize = 4;
