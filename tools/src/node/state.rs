//! The node's membership record: the last view it installed and the view-change decision it
//! logged for that view, in one file replaced atomically (`DATA/view-state`).
//!
//! The engine asks for both to be durable: a decision before the node echoes or uses it
//! (`Action::LogTrim`), a view once installed (`Action::InstallView`). One file for both makes
//! "the view with its decision" one atomic write: temp file, fsync, rename, fsync of the
//! directory. `docs/FORMATS.md` ("Node view state") draws the format byte by byte.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use derechofs_core::{
    Decision, Layout, LayoutSpec, NodeId, View, SHARDS_MAX, SHARD_MEMBERS_MAX, VIEW_MEMBERS_MAX,
};

/// The file's name in the data directory.
pub const STATE_FILE: &str = "view-state";
/// The temporary name it is written under before the rename.
const STATE_TEMP: &str = "view-state.tmp";
/// The magic and format version at the start of the file.
const MAGIC: &[u8; 8] = b"DFSVIEW\x05";
/// Format 4, read as format 5 without a decision's stamp floors (written before decisions
/// carried them).
const MAGIC_4: &[u8; 8] = b"DFSVIEW\x04";
/// Format 3, read as format 4 without addresses (written before views carried them).
const MAGIC_3: &[u8; 8] = b"DFSVIEW\x03";
/// The file's header: magic, body length, body checksum.
const HEADER_BYTES: usize = 16;
/// Largest body accepted: 64 members, 1024 shards of 16 members with a trim each.
pub const STATE_BODY_MAX: usize = 1 << 20;

/// What went wrong reading or writing the state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading, writing or syncing failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a valid state file.
    #[error("{path}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// A decision logged for the recorded view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedDecision {
    /// The view change round that proposed it.
    pub round: u64,
    /// Who leaves, and each shard's ragged trim.
    pub decision: Decision,
}

/// The node's durable membership record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeState {
    /// The last view installed (or started in).
    pub view_id: u32,
    /// Its members in rank order.
    pub members: Vec<NodeId>,
    /// The layout parameters it was made with.
    pub spec: LayoutSpec,
    /// Its shards' members in rank order, in shard id order.
    pub shards: Vec<Vec<NodeId>>,
    /// The addresses members announced when they joined (`View::addrs`).
    pub addrs: Vec<(NodeId, SocketAddr)>,
    /// The decision that ends this view, once logged.
    pub decision: Option<LoggedDecision>,
}

impl NodeState {
    /// The record of `view`, with no decision yet.
    pub fn of_view(view: &View) -> NodeState {
        NodeState {
            view_id: view.view_id,
            members: view.members.clone(),
            spec: view.layout.spec(),
            shards: view
                .layout
                .shards()
                .iter()
                .map(|s| s.members.clone())
                .collect(),
            addrs: view.addrs.clone(),
            decision: None,
        }
    }

    /// The recorded view, with its layout rebuilt from the recorded shard lists (checked:
    /// every shard member is a member of the view, once, at most `replicas` per shard).
    pub fn view(&self) -> Result<View, String> {
        let layout =
            Layout::from_parts(self.spec, self.shards.clone(), &self.members).map_err(|e| {
                format!(
                    "the recorded layout of view {} is invalid: {e}",
                    self.view_id
                )
            })?;
        Ok(View {
            view_id: self.view_id,
            members: self.members.clone(),
            layout,
            addrs: self.addrs.clone(),
        })
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&self.view_id.to_le_bytes());
        put_nodes(&mut body, &self.members);
        for x in [
            self.spec.namespace_shards,
            self.spec.data_shards,
            self.spec.replicas,
            self.spec.replicas_min,
        ] {
            body.extend_from_slice(&x.to_le_bytes());
        }
        body.extend_from_slice(&(self.shards.len() as u16).to_le_bytes());
        for shard in &self.shards {
            put_nodes(&mut body, shard);
        }
        put_addrs(&mut body, &self.addrs);
        match &self.decision {
            None => body.push(0),
            Some(logged) => {
                body.push(1);
                body.extend_from_slice(&logged.round.to_le_bytes());
                body.extend_from_slice(&logged.decision.removed.to_le_bytes());
                put_nodes(&mut body, &logged.decision.joined);
                body.extend_from_slice(&(logged.decision.trims.len() as u16).to_le_bytes());
                for trim in &logged.decision.trims {
                    body.extend_from_slice(&(trim.len() as u16).to_le_bytes());
                    for count in trim {
                        body.extend_from_slice(&count.to_le_bytes());
                    }
                }
                body.extend_from_slice(&(logged.decision.ends.len() as u16).to_le_bytes());
                for end in &logged.decision.ends {
                    match end {
                        None => body.push(0),
                        Some((version, hlc)) => {
                            body.push(1);
                            body.extend_from_slice(&version.to_le_bytes());
                            body.extend_from_slice(&hlc.wall_us.to_le_bytes());
                            body.extend_from_slice(&hlc.logical.to_le_bytes());
                        }
                    }
                }
                put_addrs(&mut body, &logged.decision.addrs);
                body.extend_from_slice(&(logged.decision.floors.len() as u16).to_le_bytes());
                for floor in &logged.decision.floors {
                    body.extend_from_slice(&floor.wall_us.to_le_bytes());
                    body.extend_from_slice(&floor.logical.to_le_bytes());
                }
            }
        }
        let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes and checks the file's bytes; the error says what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<NodeState, String> {
        if bytes.len() < HEADER_BYTES {
            return Err(format!("{} bytes, shorter than the header", bytes.len()));
        }
        let (with_addrs, with_floors) = match &bytes[..8] {
            m if m == MAGIC => (true, true),
            m if m == MAGIC_4 => (true, false),
            m if m == MAGIC_3 => (false, false),
            _ => return Err("wrong magic (not a view state, or a newer format)".into()),
        };
        let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        if len > STATE_BODY_MAX || bytes.len() != HEADER_BYTES + len {
            return Err(format!(
                "body length {len} does not match the file's {} bytes",
                bytes.len()
            ));
        }
        let body = &bytes[HEADER_BYTES..];
        if crc32c::crc32c(body) != u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) {
            return Err("checksum mismatch".into());
        }
        let mut r = Reader { bytes: body };
        let view_id = r.u32()?;
        let members = r.nodes(VIEW_MEMBERS_MAX, "members")?;
        if members.is_empty() {
            return Err("a view with no members".into());
        }
        for (i, m) in members.iter().enumerate() {
            if members[..i].contains(m) {
                return Err(format!("member {m} listed twice"));
            }
        }
        let spec = LayoutSpec {
            namespace_shards: r.u16()?,
            data_shards: r.u16()?,
            replicas: r.u16()?,
            replicas_min: r.u16()?,
        };
        let shard_count = usize::from(r.u16()?);
        if shard_count == 0
            || shard_count > SHARDS_MAX
            || shard_count != usize::from(spec.namespace_shards) + usize::from(spec.data_shards)
        {
            return Err(format!(
                "{shard_count} shards do not match the layout parameters"
            ));
        }
        let mut shards = Vec::with_capacity(shard_count);
        for _ in 0..shard_count {
            let shard = r.nodes(SHARD_MEMBERS_MAX, "shard members")?;
            if let Some(m) = shard.iter().find(|m| !members.contains(m)) {
                return Err(format!("shard member {m} is not a member of the view"));
            }
            shards.push(shard);
        }
        let addrs = if with_addrs { r.addrs()? } else { Vec::new() };
        if addrs.windows(2).any(|w| w[0].0 >= w[1].0) {
            return Err("member addresses out of id order".into());
        }
        if let Some((m, _)) = addrs.iter().find(|(m, _)| !members.contains(m)) {
            return Err(format!("an address for node {m}, which is not a member"));
        }
        let decision = match r.u8()? {
            0 => None,
            1 => {
                let round = r.u64()?;
                let removed = r.u64()?;
                if members.len() < 64 && removed >> members.len() != 0 {
                    return Err("a decision removing a rank beyond the view".into());
                }
                let joined = r.nodes(VIEW_MEMBERS_MAX, "joined nodes")?;
                for (i, node) in joined.iter().enumerate() {
                    let stays = members
                        .iter()
                        .position(|m| m == node)
                        .is_some_and(|rank| removed & (1 << rank) == 0);
                    if stays || joined[..i].contains(node) {
                        return Err(format!("a decision joining node {node} twice"));
                    }
                }
                let count = usize::from(r.u16()?);
                if count != shard_count {
                    return Err(format!("{count} trims for {shard_count} shards"));
                }
                let mut trims = Vec::with_capacity(count);
                for shard in &shards {
                    let senders = usize::from(r.u16()?);
                    if senders != shard.len() {
                        return Err(format!(
                            "a trim of {senders} senders for a shard of {}",
                            shard.len()
                        ));
                    }
                    let mut trim = Vec::with_capacity(senders);
                    for _ in 0..senders {
                        trim.push(r.u64()?);
                    }
                    trims.push(trim);
                }
                let count = usize::from(r.u16()?);
                if count != 0 && count != shard_count {
                    return Err(format!("{count} log ends for {shard_count} shards"));
                }
                let mut ends = Vec::with_capacity(count);
                for _ in 0..count {
                    ends.push(match r.u8()? {
                        0 => None,
                        1 => {
                            let version = r.u64()?;
                            let wall_us = r.u64()?;
                            let logical = r.u32()?;
                            Some((version, derechofs_core::Hlc { wall_us, logical }))
                        }
                        other => return Err(format!("log end flag {other}, not 0 or 1")),
                    });
                }
                let addrs = if with_addrs { r.addrs()? } else { Vec::new() };
                for (i, (node, _)) in addrs.iter().enumerate() {
                    if !joined.contains(node) || addrs[..i].iter().any(|(n, _)| n == node) {
                        return Err(format!(
                            "a decision address for node {node}, which it does not add, or twice"
                        ));
                    }
                }
                let count = if with_floors {
                    usize::from(r.u16()?)
                } else {
                    0
                };
                if count != 0 && count != shard_count {
                    return Err(format!("{count} stamp floors for {shard_count} shards"));
                }
                let mut floors = Vec::with_capacity(count);
                for _ in 0..count {
                    let wall_us = r.u64()?;
                    let logical = r.u32()?;
                    floors.push(derechofs_core::Hlc { wall_us, logical });
                }
                Some(LoggedDecision {
                    round,
                    decision: Decision {
                        removed,
                        joined,
                        trims,
                        ends,
                        addrs,
                        floors,
                    },
                })
            }
            other => return Err(format!("decision flag {other}, not 0 or 1")),
        };
        if !r.bytes.is_empty() {
            return Err(format!("{} bytes after the end", r.bytes.len()));
        }
        Ok(NodeState {
            view_id,
            members,
            spec,
            shards,
            addrs,
            decision,
        })
    }

    /// Reads the state of `data_dir`; `None` if the node never recorded one.
    pub fn load(data_dir: &Path) -> Result<Option<NodeState>, StateError> {
        let path = data_dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    what: format!("reading {}", path.display()),
                    source,
                })
            }
        };
        NodeState::decode(&bytes)
            .map(Some)
            .map_err(|why| StateError::Corrupt { path, why })
    }

    /// Replaces the state of `data_dir` atomically and durably: write a temporary file, fsync
    /// it, rename it over the old one, fsync the directory. Blocks on the disk.
    pub fn save(&self, data_dir: &Path) -> Result<(), StateError> {
        let temp = data_dir.join(STATE_TEMP);
        let path = data_dir.join(STATE_FILE);
        let io = |what: String| move |source| StateError::Io { what, source };
        let mut file =
            std::fs::File::create(&temp).map_err(io(format!("creating {}", temp.display())))?;
        file.write_all(&self.encode())
            .map_err(io(format!("writing {}", temp.display())))?;
        file.sync_all()
            .map_err(io(format!("syncing {}", temp.display())))?;
        drop(file);
        std::fs::rename(&temp, &path).map_err(io(format!("renaming to {}", path.display())))?;
        std::fs::File::open(data_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io(format!("syncing {}", data_dir.display())))
    }
}

fn put_nodes(out: &mut Vec<u8>, nodes: &[NodeId]) {
    out.extend_from_slice(&(nodes.len() as u16).to_le_bytes());
    for n in nodes {
        out.extend_from_slice(&n.to_le_bytes());
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if self.bytes.len() < n {
            return Err("the body ends early".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn nodes(&mut self, max: usize, what: &str) -> Result<Vec<NodeId>, String> {
        let count = usize::from(self.u16()?);
        if count > max {
            return Err(format!("{count} {what}, more than {max}"));
        }
        (0..count).map(|_| self.u32()).collect()
    }

    /// A count (2 bytes, at most `VIEW_MEMBERS_MAX`) of (node id, address) pairs.
    fn addrs(&mut self) -> Result<Vec<(NodeId, SocketAddr)>, String> {
        let count = usize::from(self.u16()?);
        if count > VIEW_MEMBERS_MAX {
            return Err(format!("{count} addresses, more than {VIEW_MEMBERS_MAX}"));
        }
        let mut addrs = Vec::with_capacity(count);
        for _ in 0..count {
            let node = self.u32()?;
            let ip = match self.u8()? {
                4 => IpAddr::from(<[u8; 4]>::try_from(self.take(4)?).expect("4 bytes")),
                6 => IpAddr::from(<[u8; 16]>::try_from(self.take(16)?).expect("16 bytes")),
                other => return Err(format!("address kind {other}, not 4 or 6")),
            };
            let port = u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes"));
            addrs.push((node, SocketAddr::new(ip, port)));
        }
        Ok(addrs)
    }
}

/// A count (2 bytes) of (node id (4), kind 4 or 6 (1), IP (4 or 16), port (2, big-endian)).
fn put_addrs(body: &mut Vec<u8>, addrs: &[(NodeId, SocketAddr)]) {
    body.extend_from_slice(&(addrs.len() as u16).to_le_bytes());
    for (node, addr) in addrs {
        body.extend_from_slice(&node.to_le_bytes());
        match addr.ip() {
            IpAddr::V4(ip) => {
                body.push(4);
                body.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                body.push(6);
                body.extend_from_slice(&ip.octets());
            }
        }
        body.extend_from_slice(&addr.port().to_be_bytes());
    }
}

/// The last version of view `view_id` that the ragged `trim` keeps in a shard (message `i` of
/// the sender of rank `r` is sequence `i * senders + r`), or the last version before the view
/// if the trim keeps nothing: the point a log of that shard is cut back to on restart.
pub fn trim_end(view_id: u32, trim: &[u64]) -> derechofs_core::Version {
    let senders = trim.len() as u64;
    let end = trim
        .iter()
        .enumerate()
        .filter(|(_, &kept)| kept > 0)
        .map(|(sender, &kept)| (kept - 1) * senders + sender as u64 + 1)
        .max()
        .unwrap_or(0);
    let start = u64::from(view_id) << 32;
    (start + end).saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(decision: Option<LoggedDecision>) -> NodeState {
        let mut view = View::initial(7, vec![4, 2, 9], LayoutSpec::default()).unwrap();
        view.addrs = vec![
            (2, "10.0.0.2:7070".parse().unwrap()),
            (9, "[fe80::1]:7071".parse().unwrap()),
        ];
        NodeState {
            decision,
            ..NodeState::of_view(&view)
        }
    }

    #[test]
    fn view_state_round_trips_with_and_without_a_decision() {
        let logged = LoggedDecision {
            round: 130,
            decision: Decision {
                removed: 0b100,
                joined: vec![9, 12],
                trims: vec![vec![3, 2, 2], vec![5, 0, 1]],
                ends: vec![],
                addrs: vec![(12, "127.0.0.5:9000".parse().unwrap())],
                floors: vec![
                    derechofs_core::Hlc::at(1_700_000_000_000_000),
                    derechofs_core::Hlc::ZERO,
                ],
            },
        };
        let restart = LoggedDecision {
            round: 64,
            decision: Decision {
                removed: 0b010,
                joined: vec![],
                trims: vec![vec![3, 2, 2], vec![0, 0, 0]],
                ends: vec![Some((7 << 32 | 6, derechofs_core::Hlc::at(99))), None],
                addrs: vec![],
                floors: vec![],
            },
        };
        for s in [state(None), state(Some(logged)), state(Some(restart))] {
            assert_eq!(NodeState::decode(&s.encode()), Ok(s.clone()));
            assert_eq!(s.view().unwrap().members, vec![4, 2, 9]);
        }
    }

    /// A view-state file of `body` with `magic`: its header, then the body.
    fn file_of(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
        let mut file = magic.to_vec();
        file.extend_from_slice(&(body.len() as u32).to_le_bytes());
        file.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        file.extend_from_slice(body);
        file
    }

    #[test]
    fn view_state_of_format_3_reads_as_a_view_without_addresses() {
        let mut state = state(None);
        state.addrs.clear();
        let bytes = state.encode();
        // Format 3 is format 4 without the address lists: here only the view's (empty: two
        // zero bytes before the last byte, the absent decision's flag).
        let body = &bytes[HEADER_BYTES..];
        let n = body.len();
        assert_eq!(&body[n - 3..], &[0, 0, 0]);
        let old_body: Vec<u8> = body[..n - 3]
            .iter()
            .chain(&body[n - 1..])
            .copied()
            .collect();
        let old = file_of(MAGIC_3, &old_body);
        assert_eq!(NodeState::decode(&old), Ok(state));
    }

    #[test]
    fn view_state_of_format_4_reads_as_a_decision_without_stamp_floors() {
        let logged = LoggedDecision {
            round: 3,
            decision: Decision {
                removed: 0b100,
                joined: vec![],
                trims: vec![vec![2, 2, 1], vec![0, 0, 0]],
                ends: vec![],
                addrs: vec![],
                floors: vec![],
            },
        };
        let state = state(Some(logged));
        let bytes = state.encode();
        // Format 4 is format 5 without the decision's floor count (two zero bytes, last).
        let body = &bytes[HEADER_BYTES..];
        let n = body.len();
        assert_eq!(&body[n - 2..], &[0, 0]);
        let old = file_of(MAGIC_4, &body[..n - 2]);
        assert_eq!(NodeState::decode(&old), Ok(state.clone()));
        let mut stale = old.clone();
        stale[..8].copy_from_slice(MAGIC);
        assert!(
            NodeState::decode(&stale).is_err(),
            "format 5 needs the floor count"
        );
    }

    #[test]
    fn view_state_refuses_every_truncation_and_flipped_byte() {
        let bytes = state(Some(LoggedDecision {
            round: 1,
            decision: Decision {
                removed: 1,
                joined: vec![],
                trims: vec![vec![1, 1, 1], vec![0, 0, 0]],
                ends: vec![None, Some((3, derechofs_core::Hlc::at(5)))],
                addrs: vec![],
                floors: vec![derechofs_core::Hlc::at(9), derechofs_core::Hlc::at(4)],
            },
        }))
        .encode();
        for n in 0..bytes.len() {
            assert!(NodeState::decode(&bytes[..n]).is_err(), "{n} bytes");
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(NodeState::decode(&bad).is_err(), "byte {i} flipped");
        }
    }

    #[test]
    fn view_state_save_replaces_the_file_and_load_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NodeState::load(dir.path()).unwrap(), None);
        let first = state(None);
        first.save(dir.path()).unwrap();
        let mut second = first.clone();
        second.view_id += 1;
        second.save(dir.path()).unwrap();
        assert_eq!(NodeState::load(dir.path()).unwrap(), Some(second));
        assert!(!dir.path().join(STATE_TEMP).exists());
        std::fs::write(dir.path().join(STATE_FILE), b"DFSVIEW\x02junk").unwrap();
        assert!(matches!(
            NodeState::load(dir.path()),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_trim_ends_at_its_last_kept_sequence_number() {
        // Three senders; sender 2 keeps 3 messages: sequence numbers 2, 5, 8.
        assert_eq!(trim_end(1, &[1, 0, 3]), (1 << 32) | 8);
        assert_eq!(trim_end(1, &[2, 2, 0]), (1 << 32) | 4);
        // Nothing kept: everything of the view goes.
        assert_eq!(trim_end(2, &[0, 0, 0]), (2 << 32) - 1);
    }
}
