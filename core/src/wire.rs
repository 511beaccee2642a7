//! The compact binary form of a [`Message`], for transports to frame.
//!
//! Integers are LEB128 varints (at most 10 bytes, no overlong final byte), so small counters
//! cost one byte. Layout, after a one-byte tag:
//!
//! ```text
//! Data      = 1 view_id shard index body
//!   body    = 0                                   (null)
//!           | 1 stamp count request*count         (batch)
//!   request = id client_hlc len payload[len]
//! Row       = 2 view_id shard senders received*senders delivered persisted
//!             floor floor_delivered suspicions wedged:u8 wants
//!   persisted = 0 (none) | version + 1
//! Heartbeat = 3 view_id suspicions sent_us echo_us
//! Propose   = 4 view_id round suspicions
//! Ack       = 5 view_id round promised suspicions count (shard senders received*senders)*count
//!             0 | 1 accepted_round decision           (accepted)
//!             logs (shard end)*logs                   (restart: each log's last record)
//!             floors (shard floor)*floors             (each shard's highest own floor)
//! Accept    = 6 view_id round decision
//! Accepted  = 7 view_id round
//! Commit    = 8 view_id round decision
//!   decision = removed joins node*joins shards (senders trim*senders)*shards
//!              ends end*ends                          (restart: each shard's log end)
//!              addrs (node addr)*addrs                (the joiners' announced addresses)
//!              floors floor*floors                    (per shard: the next view stamps above)
//! Join      = 9 view_id 0 | 9 view_id addr            (without / with an address)
//! Redirect  = 10 view_id leader
//! Welcome   = 11 view
//!   view    = view_id members node*members namespace_shards data_shards replicas
//!             replicas_min shards (count node*count)*shards
//!             addrs (node addr)*addrs                 (members' announced addresses, ids rising)
//!   addr    = 4 ip:4 port:2 | 6 ip:16 port:2          (bytes as on the network: big-endian)
//! Fetch     = 12 view_id shard after
//! Piece     = 13 view_id shard after ready:u8 end floor
//!             records (version hlc len payload[len])*records
//!   after, end = 0 (none) | 1 version (after) | 1 version wall_us logical (end)
//! stamp, client_hlc, floor = wall_us logical
//! ```
//!
//! Decoding never panics and never allocates more than the input justifies: every count is
//! checked against its bound and against the bytes left before anything is reserved.

use std::net::SocketAddr;

use bytes::Bytes;
use derechofs_storage::Hlc;

use crate::bounds::{
    BATCH_BYTES_MAX, BATCH_REQUESTS_MAX, REQUEST_BYTES_MAX, SHARDS_MAX, SHARD_MEMBERS_MAX,
    TRANSFER_PIECE_BYTES_MAX, TRANSFER_PIECE_RECORDS_MAX, TRANSFER_RECORD_BYTES_MAX,
    VIEW_MEMBERS_MAX,
};
use crate::layout::{Layout, LayoutSpec, ShardId};
use crate::message::{Batch, Body, Decision, Message, Record, Request};
use crate::row::Row;
use crate::view::{NodeId, View};

const TAG_DATA: u8 = 1;
const TAG_ROW: u8 = 2;
const TAG_HEARTBEAT: u8 = 3;
const TAG_PROPOSE: u8 = 4;
const TAG_ACK: u8 = 5;
const TAG_ACCEPT: u8 = 6;
const TAG_ACCEPTED: u8 = 7;
const TAG_COMMIT: u8 = 8;
const TAG_JOIN: u8 = 9;
const TAG_REDIRECT: u8 = 10;
const TAG_WELCOME: u8 = 11;
const TAG_FETCH: u8 = 12;
const TAG_PIECE: u8 = 13;
const ADDR_V4: u8 = 4;
const ADDR_V6: u8 = 6;
const BODY_NULL: u8 = 0;
const BODY_BATCH: u8 = 1;

/// Request payloads of at least this many bytes are parts of their own in
/// [`Message::to_parts`]; smaller ones are copied, which costs less than a part of their own.
pub const PART_SHARED_MIN: usize = 4 << 10;

/// Why bytes are not a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends inside a field.
    #[error("truncated message")]
    Truncated,
    /// A varint is longer than 10 bytes or does not fit its field.
    #[error("malformed integer in {0}")]
    BadInteger(&'static str),
    /// An unknown message or body tag.
    #[error("unknown tag {0}")]
    UnknownTag(u8),
    /// A count or length beyond its bound.
    #[error("{0} beyond its bound")]
    TooLarge(&'static str),
    /// Bytes left over after the message.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    /// A view whose members or layout do not fit together.
    #[error("invalid view: {0}")]
    BadView(String),
}

impl Message {
    /// Appends the encoding of this message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Data {
                view_id,
                shard,
                index,
                body,
            } => {
                out.push(TAG_DATA);
                put_varint(out, u64::from(*view_id));
                put_varint(out, u64::from(shard.0));
                put_varint(out, *index);
                match body {
                    Body::Null => out.push(BODY_NULL),
                    Body::Batch(batch) => {
                        out.push(BODY_BATCH);
                        put_hlc(out, batch.stamp);
                        put_varint(out, batch.requests.len() as u64);
                        for request in &batch.requests {
                            put_varint(out, request.id);
                            put_hlc(out, request.client_hlc);
                            put_varint(out, request.payload.len() as u64);
                            out.extend_from_slice(&request.payload);
                        }
                    }
                }
            }
            Message::Row {
                view_id,
                shard,
                row,
            } => {
                out.push(TAG_ROW);
                put_varint(out, u64::from(*view_id));
                put_varint(out, u64::from(shard.0));
                put_varint(out, row.received.len() as u64);
                for &count in &row.received {
                    put_varint(out, count);
                }
                put_varint(out, row.delivered);
                put_varint(out, row.persisted.map_or(0, |v| v.saturating_add(1)));
                put_hlc(out, row.floor);
                put_varint(out, row.floor_delivered);
                put_varint(out, row.suspicions);
                out.push(u8::from(row.wedged));
                put_varint(out, row.wants);
            }
            Message::Heartbeat {
                view_id,
                suspicions,
                sent_us,
                echo_us,
            } => {
                out.push(TAG_HEARTBEAT);
                put_varint(out, u64::from(*view_id));
                put_varint(out, *suspicions);
                put_varint(out, *sent_us);
                put_varint(out, *echo_us);
            }
            Message::Propose {
                view_id,
                round,
                suspicions,
            } => {
                out.push(TAG_PROPOSE);
                put_varint(out, u64::from(*view_id));
                put_varint(out, *round);
                put_varint(out, *suspicions);
            }
            Message::Ack {
                view_id,
                round,
                promised,
                suspicions,
                counts,
                accepted,
                logs,
                floors,
            } => {
                out.push(TAG_ACK);
                put_varint(out, u64::from(*view_id));
                put_varint(out, *round);
                put_varint(out, *promised);
                put_varint(out, *suspicions);
                put_varint(out, counts.len() as u64);
                for (shard, received) in counts {
                    put_varint(out, u64::from(shard.0));
                    put_counters(out, received);
                }
                match accepted {
                    None => out.push(0),
                    Some((round, decision)) => {
                        out.push(1);
                        put_varint(out, *round);
                        put_decision(out, decision);
                    }
                }
                put_varint(out, logs.len() as u64);
                for (shard, end) in logs {
                    put_varint(out, u64::from(shard.0));
                    put_end(out, *end);
                }
                put_varint(out, floors.len() as u64);
                for (shard, floor) in floors {
                    put_varint(out, u64::from(shard.0));
                    put_hlc(out, *floor);
                }
            }
            Message::Accept {
                view_id,
                round,
                decision,
            }
            | Message::Commit {
                view_id,
                round,
                decision,
            } => {
                let tag = if matches!(self, Message::Accept { .. }) {
                    TAG_ACCEPT
                } else {
                    TAG_COMMIT
                };
                out.push(tag);
                put_varint(out, u64::from(*view_id));
                put_varint(out, *round);
                put_decision(out, decision);
            }
            Message::Accepted { view_id, round } => {
                out.push(TAG_ACCEPTED);
                put_varint(out, u64::from(*view_id));
                put_varint(out, *round);
            }
            Message::Join { view_id, addr } => {
                out.push(TAG_JOIN);
                put_varint(out, u64::from(*view_id));
                match addr {
                    None => out.push(0),
                    Some(addr) => put_addr(out, addr),
                }
            }
            Message::Redirect { view_id, leader } => {
                out.push(TAG_REDIRECT);
                put_varint(out, u64::from(*view_id));
                put_varint(out, u64::from(*leader));
            }
            Message::Welcome { view } => {
                out.push(TAG_WELCOME);
                put_view(out, view);
            }
            Message::Fetch {
                view_id,
                shard,
                after,
            } => {
                out.push(TAG_FETCH);
                put_varint(out, u64::from(*view_id));
                put_varint(out, u64::from(shard.0));
                put_version(out, *after);
            }
            Message::Piece {
                view_id,
                shard,
                after,
                end,
                ready,
                floor,
                records,
            } => {
                out.push(TAG_PIECE);
                put_varint(out, u64::from(*view_id));
                put_varint(out, u64::from(shard.0));
                put_version(out, *after);
                out.push(u8::from(*ready));
                put_end(out, *end);
                put_hlc(out, *floor);
                put_varint(out, records.len() as u64);
                for record in records {
                    put_varint(out, record.version);
                    put_hlc(out, record.hlc);
                    put_varint(out, record.payload.len() as u64);
                    out.extend_from_slice(&record.payload);
                }
            }
        }
    }

    /// The encoding of this message.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Room for the payloads and about 64 bytes of fields per request, so large batches are
        // encoded without growing (and copying) the buffer.
        let payloads = match self {
            Message::Data {
                body: Body::Batch(batch),
                ..
            } => batch.requests.iter().map(|r| r.payload.len() + 64).sum(),
            _ => 0,
        };
        let mut out = Vec::with_capacity(64 + payloads);
        self.encode(&mut out);
        out
    }

    /// The encoding of this message as parts whose concatenation is [`Message::to_bytes`]:
    /// request payloads of at least [`PART_SHARED_MIN`] bytes are their own parts, sharing the
    /// request's memory instead of being copied, so a large batch is sent without an encoding
    /// copy (the transport writes the parts with one vectored write).
    pub fn to_parts(&self) -> Vec<Bytes> {
        let Message::Data {
            view_id,
            shard,
            index,
            body: Body::Batch(batch),
        } = self
        else {
            return vec![Bytes::from(self.to_bytes())];
        };
        let mut parts = Vec::new();
        let mut out = Vec::with_capacity(64);
        out.push(TAG_DATA);
        put_varint(&mut out, u64::from(*view_id));
        put_varint(&mut out, u64::from(shard.0));
        put_varint(&mut out, *index);
        out.push(BODY_BATCH);
        put_hlc(&mut out, batch.stamp);
        put_varint(&mut out, batch.requests.len() as u64);
        for request in &batch.requests {
            put_varint(&mut out, request.id);
            put_hlc(&mut out, request.client_hlc);
            put_varint(&mut out, request.payload.len() as u64);
            if request.payload.len() >= PART_SHARED_MIN {
                parts.push(Bytes::from(std::mem::replace(
                    &mut out,
                    Vec::with_capacity(64),
                )));
                parts.push(request.payload.clone());
            } else {
                out.extend_from_slice(&request.payload);
            }
        }
        if !out.is_empty() {
            parts.push(Bytes::from(out));
        }
        parts
    }

    /// Decodes one whole message; payloads share `frame`'s memory.
    pub fn decode(frame: &Bytes) -> Result<Message, DecodeError> {
        let mut reader = Reader { frame, at: 0 };
        let message = match reader.u8()? {
            TAG_DATA => {
                let view_id = reader.u32("view id")?;
                let shard = reader.shard()?;
                let index = reader.varint("index")?;
                let body = match reader.u8()? {
                    BODY_NULL => Body::Null,
                    BODY_BATCH => Body::Batch(reader.batch()?),
                    tag => return Err(DecodeError::UnknownTag(tag)),
                };
                Message::Data {
                    view_id,
                    shard,
                    index,
                    body,
                }
            }
            TAG_ROW => {
                let view_id = reader.u32("view id")?;
                let shard = reader.shard()?;
                let senders = reader.varint("senders")?;
                if senders == 0 || senders > SHARD_MEMBERS_MAX as u64 {
                    return Err(DecodeError::TooLarge("senders"));
                }
                let mut received = Vec::with_capacity(senders as usize);
                for _ in 0..senders {
                    received.push(reader.varint("received")?);
                }
                let delivered = reader.varint("delivered")?;
                let persisted = reader.varint("persisted")?.checked_sub(1);
                let floor = reader.hlc()?;
                let floor_delivered = reader.varint("floor delivered")?;
                let suspicions = reader.varint("suspicions")?;
                let wedged = match reader.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::BadInteger("wedged")),
                };
                let wants = reader.varint("wants")?;
                let row = Row {
                    received,
                    delivered,
                    persisted,
                    floor,
                    floor_delivered,
                    suspicions,
                    wedged,
                    wants,
                };
                Message::Row {
                    view_id,
                    shard,
                    row,
                }
            }
            TAG_HEARTBEAT => {
                let view_id = reader.u32("view id")?;
                let suspicions = reader.varint("suspicions")?;
                Message::Heartbeat {
                    view_id,
                    suspicions,
                    sent_us: reader.varint("heartbeat send time")?,
                    echo_us: reader.varint("heartbeat echo")?,
                }
            }
            TAG_PROPOSE => Message::Propose {
                view_id: reader.u32("view id")?,
                round: reader.varint("round")?,
                suspicions: reader.varint("suspicions")?,
            },
            TAG_ACK => {
                let view_id = reader.u32("view id")?;
                let round = reader.varint("round")?;
                let promised = reader.varint("promised")?;
                let suspicions = reader.varint("suspicions")?;
                // Each entry takes at least 2 bytes.
                let (count, mut counts) = reader.list("shard count", 0, SHARDS_MAX, 2)?;
                for _ in 0..count {
                    let shard = reader.shard()?;
                    counts.push((shard, reader.counters("received")?));
                }
                let accepted = match reader.u8()? {
                    0 => None,
                    1 => Some((reader.varint("accepted round")?, reader.decision()?)),
                    _ => return Err(DecodeError::BadInteger("accepted")),
                };
                // Each log takes at least 2 bytes.
                let (count, mut logs) = reader.list("log count", 0, SHARDS_MAX, 2)?;
                for _ in 0..count {
                    let shard = reader.shard()?;
                    logs.push((shard, reader.end()?));
                }
                // Each floor takes at least 3 bytes.
                let (count, mut floors) = reader.list("floor count", 0, SHARDS_MAX, 3)?;
                for _ in 0..count {
                    let shard = reader.shard()?;
                    floors.push((shard, reader.hlc()?));
                }
                Message::Ack {
                    view_id,
                    round,
                    promised,
                    suspicions,
                    counts,
                    accepted,
                    logs,
                    floors,
                }
            }
            TAG_ACCEPT => Message::Accept {
                view_id: reader.u32("view id")?,
                round: reader.varint("round")?,
                decision: reader.decision()?,
            },
            TAG_ACCEPTED => Message::Accepted {
                view_id: reader.u32("view id")?,
                round: reader.varint("round")?,
            },
            TAG_COMMIT => Message::Commit {
                view_id: reader.u32("view id")?,
                round: reader.varint("round")?,
                decision: reader.decision()?,
            },
            TAG_JOIN => Message::Join {
                view_id: reader.u32("view id")?,
                addr: match reader.frame.get(reader.at) {
                    Some(0) => {
                        reader.at += 1;
                        None
                    }
                    _ => Some(reader.addr()?),
                },
            },
            TAG_REDIRECT => Message::Redirect {
                view_id: reader.u32("view id")?,
                leader: reader.u32("leader")?,
            },
            TAG_WELCOME => Message::Welcome {
                view: reader.view()?,
            },
            TAG_FETCH => Message::Fetch {
                view_id: reader.u32("view id")?,
                shard: reader.shard()?,
                after: reader.version("after")?,
            },
            TAG_PIECE => {
                let view_id = reader.u32("view id")?;
                let shard = reader.shard()?;
                let after = reader.version("after")?;
                let ready = match reader.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::BadInteger("ready")),
                };
                let end = reader.end()?;
                let floor = reader.hlc()?;
                Message::Piece {
                    view_id,
                    shard,
                    after,
                    end,
                    ready,
                    floor,
                    records: reader.records()?,
                }
            }
            tag => return Err(DecodeError::UnknownTag(tag)),
        };
        let left = frame.len() - reader.at;
        if left != 0 {
            return Err(DecodeError::TrailingBytes(left));
        }
        Ok(message)
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_hlc(out: &mut Vec<u8>, hlc: Hlc) {
    put_varint(out, hlc.wall_us);
    put_varint(out, u64::from(hlc.logical));
}

fn put_counters(out: &mut Vec<u8>, counters: &[u64]) {
    put_varint(out, counters.len() as u64);
    for &count in counters {
        put_varint(out, count);
    }
}

fn put_decision(out: &mut Vec<u8>, decision: &Decision) {
    put_varint(out, decision.removed);
    put_varint(out, decision.joined.len() as u64);
    for &node in &decision.joined {
        put_varint(out, u64::from(node));
    }
    put_varint(out, decision.trims.len() as u64);
    for trim in &decision.trims {
        put_counters(out, trim);
    }
    put_varint(out, decision.ends.len() as u64);
    for end in &decision.ends {
        put_end(out, *end);
    }
    put_addrs(out, &decision.addrs);
    put_varint(out, decision.floors.len() as u64);
    for floor in &decision.floors {
        put_hlc(out, *floor);
    }
}

fn put_addrs(out: &mut Vec<u8>, addrs: &[(NodeId, SocketAddr)]) {
    put_varint(out, addrs.len() as u64);
    for (node, addr) in addrs {
        put_varint(out, u64::from(*node));
        put_addr(out, addr);
    }
}

/// Appends an address: `4 ip:4 port:2` or `6 ip:16 port:2`, big-endian as on the network.
pub fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            out.push(ADDR_V4);
            out.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            out.push(ADDR_V6);
            out.extend_from_slice(&a.ip().octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Reads an address written by [`put_addr`] at the start of `bytes`; returns it and the bytes
/// it took.
pub fn get_addr(bytes: &[u8]) -> Result<(SocketAddr, usize), DecodeError> {
    let (&kind, rest) = bytes.split_first().ok_or(DecodeError::Truncated)?;
    let ip_len = match kind {
        ADDR_V4 => 4,
        ADDR_V6 => 16,
        other => return Err(DecodeError::UnknownTag(other)),
    };
    let body = rest.get(..ip_len + 2).ok_or(DecodeError::Truncated)?;
    let port = u16::from_be_bytes([body[ip_len], body[ip_len + 1]]);
    let ip: std::net::IpAddr = if ip_len == 4 {
        <[u8; 4]>::try_from(&body[..4])
            .map(std::net::IpAddr::from)
            .map_err(|_| DecodeError::Truncated)?
    } else {
        <[u8; 16]>::try_from(&body[..16])
            .map(std::net::IpAddr::from)
            .map_err(|_| DecodeError::Truncated)?
    };
    Ok((SocketAddr::new(ip, port), 1 + ip_len + 2))
}

fn put_end(out: &mut Vec<u8>, end: Option<(u64, Hlc)>) {
    match end {
        None => out.push(0),
        Some((version, hlc)) => {
            out.push(1);
            put_varint(out, version);
            put_hlc(out, hlc);
        }
    }
}

fn put_version(out: &mut Vec<u8>, version: Option<u64>) {
    match version {
        None => out.push(0),
        Some(version) => {
            out.push(1);
            put_varint(out, version);
        }
    }
}

fn put_view(out: &mut Vec<u8>, view: &View) {
    put_varint(out, u64::from(view.view_id));
    put_varint(out, view.members.len() as u64);
    for &node in &view.members {
        put_varint(out, u64::from(node));
    }
    let spec = view.layout.spec();
    for value in [
        spec.namespace_shards,
        spec.data_shards,
        spec.replicas,
        spec.replicas_min,
    ] {
        put_varint(out, u64::from(value));
    }
    put_varint(out, view.layout.shards().len() as u64);
    for shard in view.layout.shards() {
        put_varint(out, shard.members.len() as u64);
        for &node in &shard.members {
            put_varint(out, u64::from(node));
        }
    }
    put_addrs(out, &view.addrs);
}

struct Reader<'a> {
    frame: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn left(&self) -> usize {
        self.frame.len() - self.at
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let byte = *self.frame.get(self.at).ok_or(DecodeError::Truncated)?;
        self.at += 1;
        Ok(byte)
    }

    fn varint(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            // The tenth byte holds only the top bit of a u64.
            if shift == 63 && bits > 1 {
                return Err(DecodeError::BadInteger(field));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::BadInteger(field))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        u32::try_from(self.varint(field)?).map_err(|_| DecodeError::BadInteger(field))
    }

    fn shard(&mut self) -> Result<ShardId, DecodeError> {
        let value = self.varint("shard")?;
        u16::try_from(value)
            .map(ShardId)
            .map_err(|_| DecodeError::BadInteger("shard"))
    }

    fn hlc(&mut self) -> Result<Hlc, DecodeError> {
        let wall_us = self.varint("hlc wall")?;
        let logical = self.u32("hlc logical")?;
        Ok(Hlc { wall_us, logical })
    }

    /// A count of `min..=max` items, each taking at least `entry_bytes_min` bytes, and an empty
    /// vector for them whose capacity the remaining input bounds, so a forged count cannot make
    /// the decoder allocate more than the message could hold.
    fn list<T>(
        &mut self,
        field: &'static str,
        min: u64,
        max: usize,
        entry_bytes_min: usize,
    ) -> Result<(u64, Vec<T>), DecodeError> {
        let count = self.varint(field)?;
        if count < min || count > max as u64 {
            return Err(DecodeError::TooLarge(field));
        }
        let capacity = (count as usize).min(self.left() / entry_bytes_min);
        Ok((count, Vec::with_capacity(capacity)))
    }

    /// Per-sender counters of one shard: 1..=SHARD_MEMBERS_MAX of them.
    fn counters(&mut self, field: &'static str) -> Result<Vec<u64>, DecodeError> {
        let senders = self.varint("senders")?;
        if senders == 0 || senders > SHARD_MEMBERS_MAX as u64 {
            return Err(DecodeError::TooLarge("senders"));
        }
        let mut counters = Vec::with_capacity(senders as usize);
        for _ in 0..senders {
            counters.push(self.varint(field)?);
        }
        Ok(counters)
    }

    fn decision(&mut self) -> Result<Decision, DecodeError> {
        let removed = self.varint("removed")?;
        let joined = self.nodes("joined", 0, VIEW_MEMBERS_MAX)?;
        // Each trim takes at least 2 bytes.
        let (shards, mut trims) = self.list("shard count", 0, SHARDS_MAX, 2)?;
        for _ in 0..shards {
            trims.push(self.counters("trim")?);
        }
        // Each end takes at least 1 byte.
        let (count, mut ends) = self.list("end count", 0, SHARDS_MAX, 1)?;
        for _ in 0..count {
            ends.push(self.end()?);
        }
        let addrs = self.addrs()?;
        // Each floor takes at least 2 bytes.
        let (count, mut floors) = self.list("floor count", 0, SHARDS_MAX, 2)?;
        for _ in 0..count {
            floors.push(self.hlc()?);
        }
        Ok(Decision {
            removed,
            joined,
            trims,
            ends,
            addrs,
            floors,
        })
    }

    fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let (addr, len) = get_addr(&self.frame[self.at..])?;
        self.at += len;
        Ok(addr)
    }

    /// A count of at most `VIEW_MEMBERS_MAX` (node, address) pairs, ids distinct.
    fn addrs(&mut self) -> Result<Vec<(NodeId, SocketAddr)>, DecodeError> {
        // Each pair takes at least 8 bytes.
        let (count, mut addrs) = self.list("address count", 0, VIEW_MEMBERS_MAX, 8)?;
        for _ in 0..count {
            let node = self.u32("address node")?;
            let addr = self.addr()?;
            if addrs.iter().any(|(n, _)| *n == node) {
                return Err(DecodeError::BadView(format!(
                    "two addresses for node {node}"
                )));
            }
            addrs.push((node, addr));
        }
        Ok(addrs)
    }

    /// The last record of a log, if any: `0` or `1 version wall_us logical`.
    fn end(&mut self) -> Result<Option<(u64, Hlc)>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some((self.varint("end")?, self.hlc()?))),
            _ => Err(DecodeError::BadInteger("end")),
        }
    }

    /// A count of `min..=max` node ids and the ids.
    fn nodes(
        &mut self,
        field: &'static str,
        min: u64,
        max: usize,
    ) -> Result<Vec<NodeId>, DecodeError> {
        let (count, mut nodes) = self.list(field, min, max, 1)?;
        for _ in 0..count {
            nodes.push(self.u32(field)?);
        }
        Ok(nodes)
    }

    fn version(&mut self, field: &'static str) -> Result<Option<u64>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.varint(field)?)),
            _ => Err(DecodeError::BadInteger(field)),
        }
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        u16::try_from(self.varint(field)?).map_err(|_| DecodeError::BadInteger(field))
    }

    fn view(&mut self) -> Result<View, DecodeError> {
        let view_id = self.u32("view id")?;
        let members = self.nodes("members", 1, VIEW_MEMBERS_MAX)?;
        let spec = LayoutSpec {
            namespace_shards: self.u16("namespace shards")?,
            data_shards: self.u16("data shards")?,
            replicas: self.u16("replicas")?,
            replicas_min: self.u16("replicas min")?,
        };
        // Each shard takes at least 1 byte.
        let (shards, mut shard_members) = self.list("shard count", 1, SHARDS_MAX, 1)?;
        for _ in 0..shards {
            shard_members.push(self.nodes("shard members", 0, SHARD_MEMBERS_MAX)?);
        }
        let layout = Layout::from_parts(spec, shard_members, &members)
            .map_err(|error| DecodeError::BadView(error.to_string()))?;
        let addrs = self.addrs()?;
        if addrs.windows(2).any(|w| w[0].0 >= w[1].0)
            || addrs.iter().any(|(node, _)| !members.contains(node))
        {
            return Err(DecodeError::BadView(
                "addresses out of id order, or of a node that is not a member".to_string(),
            ));
        }
        Ok(View {
            view_id,
            members,
            layout,
            addrs,
        })
    }

    /// A length-prefixed byte string of at most `max` bytes, as a slice of the frame (no copy).
    fn payload(
        &mut self,
        field: &'static str,
        what: &'static str,
        max: usize,
    ) -> Result<Bytes, DecodeError> {
        let len = self.varint(field)?;
        if len > max as u64 {
            return Err(DecodeError::TooLarge(what));
        }
        let len = len as usize;
        if len > self.left() {
            return Err(DecodeError::Truncated);
        }
        let payload = self.frame.slice(self.at..self.at + len);
        self.at += len;
        Ok(payload)
    }

    fn records(&mut self) -> Result<Vec<Record>, DecodeError> {
        // Each record takes at least 4 bytes.
        let (count, mut records) = self.list("record count", 0, TRANSFER_PIECE_RECORDS_MAX, 4)?;
        let mut total = 0usize;
        for _ in 0..count {
            let version = self.varint("record version")?;
            let hlc = self.hlc()?;
            let payload = self.payload("record length", "record", TRANSFER_RECORD_BYTES_MAX)?;
            total += payload.len();
            // A record larger than a piece travels alone.
            if total > TRANSFER_PIECE_BYTES_MAX && count > 1 {
                return Err(DecodeError::TooLarge("piece"));
            }
            records.push(Record {
                version,
                hlc,
                payload,
            });
        }
        Ok(records)
    }

    fn batch(&mut self) -> Result<Batch, DecodeError> {
        let stamp = self.hlc()?;
        // Each request takes at least 4 bytes.
        let (count, mut requests) = self.list("request count", 1, BATCH_REQUESTS_MAX, 4)?;
        let mut total = 0usize;
        for _ in 0..count {
            let id = self.varint("request id")?;
            let client_hlc = self.hlc()?;
            let payload = self.payload("payload length", "payload", REQUEST_BYTES_MAX)?;
            total += payload.len();
            if total > BATCH_BYTES_MAX {
                return Err(DecodeError::TooLarge("batch"));
            }
            requests.push(Request {
                id,
                client_hlc,
                payload,
            });
        }
        Ok(Batch { stamp, requests })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator so the tests need no dependency and rerun identically.
    struct SplitMix(u64);

    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// Small values most of the time, any value sometimes: varints of every length.
        fn number(&mut self) -> u64 {
            match self.below(4) {
                0 => self.below(4),
                1 => self.below(300),
                2 => self.next() >> self.below(64),
                _ => self.next(),
            }
        }

        fn hlc(&mut self) -> Hlc {
            Hlc {
                wall_us: self.number(),
                logical: self.number() as u32,
            }
        }
    }

    fn random_counters(rng: &mut SplitMix) -> Vec<u64> {
        let senders = 1 + rng.below(SHARD_MEMBERS_MAX as u64);
        (0..senders).map(|_| rng.number()).collect()
    }

    fn random_nodes(rng: &mut SplitMix, max: u64) -> Vec<NodeId> {
        (0..rng.below(max)).map(|_| rng.number() as u32).collect()
    }

    fn random_view(rng: &mut SplitMix) -> View {
        let mut members: Vec<NodeId> = random_nodes(rng, 8);
        members.sort_unstable();
        members.dedup();
        if members.is_empty() {
            members.push(1);
        }
        let spec = LayoutSpec {
            namespace_shards: 1 + rng.below(2) as u16,
            data_shards: rng.below(3) as u16,
            replicas: 1 + rng.below(4) as u16,
            replicas_min: 1,
        };
        let layout = Layout::assign_allowing_inadequate(spec, &members, None).unwrap();
        let mut addrs = Vec::new();
        for &node in &members {
            if rng.below(2) == 0 {
                addrs.push((node, random_addr(rng)));
            }
        }
        View {
            view_id: rng.number() as u32,
            members,
            layout,
            addrs,
        }
    }

    fn random_addr(rng: &mut SplitMix) -> SocketAddr {
        let port = rng.next() as u16;
        if rng.below(2) == 0 {
            SocketAddr::from(((rng.next() as u32).to_be_bytes(), port))
        } else {
            SocketAddr::from((u128::from(rng.next()).to_be_bytes(), port))
        }
    }

    fn random_decision(rng: &mut SplitMix) -> Decision {
        Decision {
            removed: rng.number(),
            joined: random_nodes(rng, 4),
            trims: (0..rng.below(4)).map(|_| random_counters(rng)).collect(),
            ends: (0..rng.below(3))
                .map(|_| (rng.below(2) == 1).then(|| (rng.number(), rng.hlc())))
                .collect(),
            addrs: (0..rng.below(3))
                .map(|i| (i as NodeId, random_addr(rng)))
                .collect(),
            floors: (0..rng.below(3)).map(|_| rng.hlc()).collect(),
        }
    }

    fn random_message(rng: &mut SplitMix) -> Message {
        let view_id = rng.number() as u32;
        let shard = ShardId(rng.number() as u16);
        match rng.below(14) {
            9 => Message::Join {
                view_id,
                addr: (rng.below(2) == 0).then(|| random_addr(rng)),
            },
            10 => Message::Redirect {
                view_id,
                leader: rng.number() as u32,
            },
            11 => Message::Welcome {
                view: random_view(rng),
            },
            12 => Message::Fetch {
                view_id,
                shard,
                after: (rng.below(2) == 0).then(|| rng.number()),
            },
            13 => Message::Piece {
                view_id,
                shard,
                after: (rng.below(2) == 0).then(|| rng.number()),
                end: (rng.below(2) == 0).then(|| (rng.number(), rng.hlc())),
                ready: rng.below(2) == 0,
                floor: rng.hlc(),
                records: (0..rng.below(4))
                    .map(|_| Record {
                        version: rng.number(),
                        hlc: rng.hlc(),
                        payload: (0..rng.below(40)).map(|_| rng.next() as u8).collect(),
                    })
                    .collect(),
            },
            4 => Message::Propose {
                view_id,
                round: rng.number(),
                suspicions: rng.number(),
            },
            5 => {
                let counts = (0..rng.below(4))
                    .map(|_| (ShardId(rng.number() as u16), random_counters(rng)))
                    .collect();
                let accepted = if rng.below(2) == 0 {
                    None
                } else {
                    Some((rng.number(), random_decision(rng)))
                };
                let logs = (0..rng.below(3))
                    .map(|_| {
                        let end = (rng.below(2) == 1).then(|| (rng.number(), rng.hlc()));
                        (ShardId(rng.number() as u16), end)
                    })
                    .collect();
                let floors = (0..rng.below(3))
                    .map(|_| (ShardId(rng.number() as u16), rng.hlc()))
                    .collect();
                Message::Ack {
                    view_id,
                    round: rng.number(),
                    promised: rng.number(),
                    suspicions: rng.number(),
                    counts,
                    accepted,
                    logs,
                    floors,
                }
            }
            6 => Message::Accept {
                view_id,
                round: rng.number(),
                decision: random_decision(rng),
            },
            7 => Message::Accepted {
                view_id,
                round: rng.number(),
            },
            8 => Message::Commit {
                view_id,
                round: rng.number(),
                decision: random_decision(rng),
            },
            0 => Message::Data {
                view_id,
                shard,
                index: rng.number(),
                body: Body::Null,
            },
            1 => {
                let requests = (0..1 + rng.below(5))
                    .map(|_| Request {
                        id: rng.number(),
                        client_hlc: rng.hlc(),
                        payload: (0..rng.below(40)).map(|_| rng.next() as u8).collect(),
                    })
                    .collect();
                let body = Body::Batch(Batch {
                    stamp: rng.hlc(),
                    requests,
                });
                Message::Data {
                    view_id,
                    shard,
                    index: rng.number(),
                    body,
                }
            }
            2 => {
                let senders = 1 + rng.below(SHARD_MEMBERS_MAX as u64) as usize;
                let row = Row {
                    received: (0..senders).map(|_| rng.number()).collect(),
                    delivered: rng.number(),
                    persisted: rng.number().checked_sub(1),
                    floor: rng.hlc(),
                    floor_delivered: rng.number(),
                    suspicions: rng.number(),
                    wedged: rng.below(2) == 1,
                    wants: rng.number(),
                };
                Message::Row {
                    view_id,
                    shard,
                    row,
                }
            }
            _ => Message::Heartbeat {
                view_id,
                suspicions: rng.number(),
                sent_us: rng.number(),
                echo_us: rng.number(),
            },
        }
    }

    #[test]
    fn every_message_survives_a_round_trip() {
        let mut rng = SplitMix(1);
        for _ in 0..5_000 {
            let message = random_message(&mut rng);
            let bytes = Bytes::from(message.to_bytes());
            assert_eq!(Message::decode(&bytes), Ok(message));
        }
    }

    #[test]
    fn parts_concatenate_to_the_encoding_and_share_large_payloads() {
        let mut rng = SplitMix(4);
        for _ in 0..5_000 {
            let message = random_message(&mut rng);
            assert_eq!(message.to_parts().concat(), message.to_bytes());
        }
        for round in 0..200u64 {
            let requests: Vec<Request> = (0..rng.below(6))
                .map(|_| {
                    let len = match rng.below(3) {
                        0 => rng.below(PART_SHARED_MIN as u64),
                        1 => PART_SHARED_MIN as u64 - 1 + rng.below(3),
                        _ => rng.below(64 << 10),
                    } as usize;
                    Request {
                        id: rng.number(),
                        client_hlc: rng.hlc(),
                        payload: (0..len).map(|_| rng.next() as u8).collect(),
                    }
                })
                .collect();
            let message = Message::Data {
                view_id: rng.number() as u32,
                shard: ShardId(rng.number() as u16),
                index: round,
                body: Body::Batch(Batch {
                    stamp: rng.hlc(),
                    requests: requests.clone(),
                }),
            };
            let parts = message.to_parts();
            assert_eq!(parts.concat(), message.to_bytes());
            for request in requests
                .iter()
                .filter(|r| r.payload.len() >= PART_SHARED_MIN)
            {
                assert!(
                    parts.iter().any(|p| p.as_ptr() == request.payload.as_ptr()
                        && p.len() == request.payload.len()),
                    "a large payload was copied"
                );
            }
            assert!(parts.iter().all(|p| !p.is_empty()));
        }
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        let mut rng = SplitMix(2);
        for _ in 0..50_000 {
            let len = rng.below(64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Start with a valid tag half of the time so the decoder gets past the first byte.
            if let Some(first) = bytes.first_mut() {
                if rng.below(2) == 0 {
                    *first = 1 + (*first % 13);
                }
            }
            let _ = Message::decode(&Bytes::from(bytes));
        }
    }

    #[test]
    fn damaged_encodings_are_refused_or_decode_without_panic() {
        let mut rng = SplitMix(3);
        for _ in 0..20_000 {
            let mut bytes = random_message(&mut rng).to_bytes();
            match rng.below(3) {
                0 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
                1 => {
                    let at = rng.below(bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << rng.below(8);
                }
                _ => bytes.push(rng.next() as u8),
            }
            let _ = Message::decode(&Bytes::from(bytes));
        }
    }

    #[test]
    fn truncation_and_trailing_bytes_are_reported() {
        let message = Message::Heartbeat {
            view_id: 3,
            suspicions: 1 << 40,
            sent_us: 1_700_000_000_000_000,
            echo_us: 1_699_999_999_980_000,
        };
        let bytes = message.to_bytes();
        let short = Bytes::copy_from_slice(&bytes[..bytes.len() - 1]);
        assert_eq!(Message::decode(&short), Err(DecodeError::Truncated));
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            Message::decode(&Bytes::from(long)),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn a_huge_request_count_is_refused_before_allocating() {
        let mut bytes = vec![TAG_DATA, 1, 0, 0, BODY_BATCH, 0, 0];
        put_varint(&mut bytes, u64::MAX);
        assert_eq!(
            Message::decode(&Bytes::from(bytes)),
            Err(DecodeError::TooLarge("request count"))
        );
    }

    #[test]
    fn a_huge_trim_count_is_refused_before_allocating() {
        // view 1, round 1, removed 0, no joiners, then the shard count.
        let mut bytes = vec![TAG_COMMIT, 1, 1, 0, 0];
        put_varint(&mut bytes, u64::MAX);
        assert_eq!(
            Message::decode(&Bytes::from(bytes)),
            Err(DecodeError::TooLarge("shard count"))
        );
        let mut bytes = vec![TAG_COMMIT, 1, 1, 0];
        put_varint(&mut bytes, u64::MAX);
        assert_eq!(
            Message::decode(&Bytes::from(bytes)),
            Err(DecodeError::TooLarge("joined"))
        );
        let bytes = vec![TAG_ACCEPT, 1, 1, 0, 0, 1, 0];
        assert_eq!(
            Message::decode(&Bytes::from(bytes)),
            Err(DecodeError::TooLarge("senders"))
        );
    }

    #[test]
    fn a_huge_record_count_and_an_oversized_piece_are_refused_before_allocating() {
        // view 1, shard 0, after none, ready, end none, floor 0.0, then the record count.
        let mut bytes = vec![TAG_PIECE, 1, 0, 0, 1, 0, 0, 0];
        put_varint(&mut bytes, u64::MAX);
        assert_eq!(
            Message::decode(&Bytes::from(bytes)),
            Err(DecodeError::TooLarge("record count"))
        );
        // Two records whose payloads together exceed a piece.
        let half = TRANSFER_PIECE_BYTES_MAX / 2 + 1;
        let record = |version| Record {
            version,
            hlc: Hlc::at(version),
            payload: Bytes::from(vec![7u8; half]),
        };
        let piece = Message::Piece {
            view_id: 1,
            shard: ShardId(0),
            after: None,
            end: Some((2, Hlc::at(2))),
            ready: true,
            floor: Hlc::ZERO,
            records: vec![record(1), record(2)],
        };
        assert_eq!(
            Message::decode(&Bytes::from(piece.to_bytes())),
            Err(DecodeError::TooLarge("piece"))
        );
    }

    #[test]
    fn a_welcome_whose_layout_names_a_stranger_is_refused() {
        let view = View::initial(3, vec![1, 2, 3], LayoutSpec::default()).unwrap();
        let mut bytes = Message::Welcome { view }.to_bytes();
        // The byte before the (empty) address list is the last member of the last shard:
        // make it node 9.
        let at = bytes.len() - 2;
        bytes[at] = 9;
        assert!(matches!(
            Message::decode(&Bytes::from(bytes)),
            Err(DecodeError::BadView(_))
        ));
        // An address for a node that is not a member is refused the same way.
        let mut view = View::initial(3, vec![1, 2, 3], LayoutSpec::default()).unwrap();
        view.addrs = vec![(9, "127.0.0.9:7000".parse().unwrap())];
        let bytes = Message::Welcome { view }.to_bytes();
        assert!(matches!(
            Message::decode(&Bytes::from(bytes)),
            Err(DecodeError::BadView(_))
        ));
    }

    #[test]
    fn an_overlong_varint_is_refused() {
        let mut bytes = vec![TAG_HEARTBEAT, 1];
        bytes.extend_from_slice(&[0xff; 10]);
        bytes.push(0);
        assert!(matches!(
            Message::decode(&Bytes::from(bytes)),
            Err(DecodeError::BadInteger(_))
        ));
    }
}
