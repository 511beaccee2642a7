//! The handshake that opens every connection: who the dialer is (a node or a client), and a
//! mutual challenge–response over the cluster secret, so that each side proves it holds the
//! secret without the secret ever crossing the wire.
//!
//! Every integer is little-endian. The dialer speaks first:
//!
//! 1. **Hello**, dialer → acceptor, 72 bytes:
//!
//!    | offset | size | field |
//!    |---|---|---|
//!    | 0 | 8 | magic `"DFSLINK\x06"` (the last byte is the link version) |
//!    | 8 | 1 | role: 1 = node, 2 = client |
//!    | 9 | 1 | flags: bit 0 = an expected acceptor id follows; bit 1 = the group settings follow; other bits zero |
//!    | 10 | 2 | reserved, zero |
//!    | 12 | 8 | dialer id: a node id (below 2³²) or a client id |
//!    | 20 | 4 | the node id the dialer expects to reach (0 when bit 0 is clear) |
//!    | 24 | 4 | the dialer's view id |
//!    | 28 | 32 | dialer nonce, random |
//!    | 60 | 12 | the dialer's group settings ([`GroupSettings`]; zero when bit 1 is clear) |
//!
//! 2. **Challenge**, acceptor → dialer, 96 bytes:
//!
//!    | offset | size | field |
//!    |---|---|---|
//!    | 0 | 8 | magic `"DFSLINK\x06"` (the last byte is the link version) |
//!    | 8 | 4 | acceptor node id |
//!    | 12 | 4 | acceptor view id |
//!    | 16 | 32 | acceptor nonce, random |
//!    | 48 | 1 | flags: bit 0 = the group settings follow; other bits zero |
//!    | 49 | 3 | reserved, zero |
//!    | 52 | 12 | the acceptor's group settings (zero when bit 0 is clear) |
//!    | 64 | 32 | HMAC-SHA256(secret, `"derechofs accept\0"` ‖ hello ‖ challenge bytes 0..64) |
//!
//!    The dialer checks the MAC (and the acceptor id, if it expected one) and closes the
//!    connection if it does not match. If both sides sent group settings and they differ, it
//!    goes on to the proof, so that the acceptor refuses with verdict 5 and both ends know why,
//!    and closes the connection even on an accepted verdict.
//!
//!    Group settings, 12 bytes: `layout.namespace_shards` (2), `layout.data_shards` (2),
//!    `layout.replicas` (2), `layout.replicas_min` (2), `layout.chunk_size` (4). Nodes send
//!    theirs; clients send none. Members whose settings differ would lay out shards, or cut file
//!    chunks, differently, so their replicas would diverge: they never link.
//!
//! 3. **Proof**, dialer → acceptor, 32 bytes: HMAC-SHA256(secret, `"derechofs dial\0"` ‖ hello ‖
//!    challenge). The acceptor checks it and closes the connection if it does not match.
//!
//! 4. **Verdict**, acceptor → dialer, 1 byte: 0 = accepted; otherwise the link is refused and the
//!    acceptor closes the connection: 1 = a link with this dialer already exists, 2 = the acceptor
//!    is not the node the dialer expected, 3 = the dialer should not dial (the lower node id
//!    dials), 4 = the link between the two nodes broke in the acceptor's current view and is not
//!    reopened until the view changes, 5 = both sides sent group settings and they differ.
//!
//! Frames (see [`super::frame`]) follow an accepted verdict in both directions. The two MACs use
//! different labels, so one side's answer can never be replayed as the other's; both cover both
//! nonces, so neither can be replayed on another connection. Holding the secret proves membership
//! of the cluster, not a particular node id: any holder may claim any id.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ClientId, Peer};
use crate::layout::LayoutSpec;
use crate::view::NodeId;

/// The first bytes of every connection; the last is the link version. Version 5 carried no group
/// settings in the handshake; version 4 had no lending
/// frames (lent message, offer, read) on local links; version 3 summed the
/// payload of every frame, on local links too; version 2 had no send time and echo in a
/// heartbeat and no stamp floors; version 1 had no `wants` in a row and carried a file system
/// write's data after its offset.
pub const HANDSHAKE_MAGIC: [u8; 8] = *b"DFSLINK\x06";
/// Bytes of a hello.
pub const HELLO_BYTES: usize = 72;
/// Bytes of a challenge.
pub const CHALLENGE_BYTES: usize = 96;
/// Bytes of the challenge its MAC covers (with the hello).
const CHALLENGE_SIGNED_BYTES: usize = 64;
/// Bytes of encoded group settings.
pub const SETTINGS_BYTES: usize = 12;
/// Bytes of a proof (an HMAC-SHA256).
pub const PROOF_BYTES: usize = 32;
/// Bytes of a nonce.
pub const NONCE_BYTES: usize = 32;

const ROLE_NODE: u8 = 1;
const ROLE_CLIENT: u8 = 2;
const FLAG_EXPECTED: u8 = 1;
/// Hello flag: the dialer's group settings follow.
const FLAG_SETTINGS: u8 = 2;
/// Challenge flag: the acceptor's group settings follow.
const CHALLENGE_FLAG_SETTINGS: u8 = 1;
const LABEL_ACCEPT: &[u8] = b"derechofs accept\0";
const LABEL_DIAL: &[u8] = b"derechofs dial\0";

/// Refuses another magic, naming a link version other than this build's (the message names
/// version 6: `HANDSHAKE_MAGIC`'s last byte, checked below).
fn check_magic(magic: &[u8]) -> Result<(), HandshakeError> {
    if magic == HANDSHAKE_MAGIC {
        Ok(())
    } else if magic[..7] == HANDSHAKE_MAGIC[..7] {
        Err(HandshakeError::Malformed(
            "another link version (this build speaks version 6)",
        ))
    } else {
        Err(HandshakeError::Malformed("bad magic"))
    }
}

const _: () = assert!(HANDSHAKE_MAGIC[7] == 6);

/// The settings every member of a group must share, which a node states in the handshake: the
/// shard layout's parameters and the file chunk size. Two nodes whose settings differ do not
/// link (the dialer closes the connection, the acceptor refuses it), and both log what differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSettings {
    /// The layout parameters (`layout.*`).
    pub spec: LayoutSpec,
    /// Bytes of a file chunk (`layout.chunk_size`).
    pub chunk_size: u32,
}

impl GroupSettings {
    fn encode(&self) -> [u8; SETTINGS_BYTES] {
        let mut out = [0u8; SETTINGS_BYTES];
        out[0..2].copy_from_slice(&self.spec.namespace_shards.to_le_bytes());
        out[2..4].copy_from_slice(&self.spec.data_shards.to_le_bytes());
        out[4..6].copy_from_slice(&self.spec.replicas.to_le_bytes());
        out[6..8].copy_from_slice(&self.spec.replicas_min.to_le_bytes());
        out[8..12].copy_from_slice(&self.chunk_size.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> GroupSettings {
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        GroupSettings {
            spec: LayoutSpec {
                namespace_shards: u16_at(0),
                data_shards: u16_at(2),
                replicas: u16_at(4),
                replicas_min: u16_at(6),
            },
            chunk_size: u32::from_le_bytes(array(&bytes[8..12])),
        }
    }

    /// What differs between this node's settings and a peer's, one `key: here, there` each
    /// (empty when they agree).
    pub fn differences(&self, peer: &GroupSettings) -> String {
        let fields = [
            (
                "layout.namespace_shards",
                u32::from(self.spec.namespace_shards),
                u32::from(peer.spec.namespace_shards),
            ),
            (
                "layout.data_shards",
                u32::from(self.spec.data_shards),
                u32::from(peer.spec.data_shards),
            ),
            (
                "layout.replicas",
                u32::from(self.spec.replicas),
                u32::from(peer.spec.replicas),
            ),
            (
                "layout.replicas_min",
                u32::from(self.spec.replicas_min),
                u32::from(peer.spec.replicas_min),
            ),
            ("layout.chunk_size", self.chunk_size, peer.chunk_size),
        ];
        fields
            .iter()
            .filter(|(_, here, there)| here != there)
            .map(|(key, here, there)| format!("{key} is {here} here and {there} there"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What differs between `ours` and `theirs` when both are stated (empty otherwise).
pub(crate) fn settings_differ(
    ours: Option<&GroupSettings>,
    theirs: Option<&GroupSettings>,
) -> Option<String> {
    let (ours, theirs) = (ours?, theirs?);
    let differences = ours.differences(theirs);
    (!differences.is_empty()).then_some(differences)
}

/// The cluster secret every node and client holds. Its bytes never leave the process, and its
/// `Debug` form does not show them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret from its bytes; `None` if there are none.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Option<Secret> {
        let bytes = bytes.into();
        (!bytes.is_empty()).then_some(Secret(bytes))
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(label);
        for part in parts {
            mac.update(part);
        }
        mac
    }

    fn sign(&self, label: &[u8], parts: &[&[u8]]) -> [u8; PROOF_BYTES] {
        self.mac(label, parts).finalize().into_bytes().into()
    }

    /// Compares in constant time.
    fn verify(&self, label: &[u8], parts: &[&[u8]], proof: &[u8]) -> bool {
        self.mac(label, parts).verify_slice(proof).is_ok()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Why the acceptor refused an authenticated dialer (the verdict byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Refusal {
    /// A link with this dialer already exists.
    Duplicate = 1,
    /// The acceptor is not the node the dialer expected.
    WrongNode = 2,
    /// The lower node id dials; this dialer has the higher one.
    WrongDirection = 3,
    /// The link between the two nodes broke in the acceptor's current view.
    BrokenInView = 4,
    /// Both sides stated their group settings, and they differ.
    SettingsDiffer = 5,
}

impl Refusal {
    fn from_byte(byte: u8) -> Option<Refusal> {
        match byte {
            1 => Some(Refusal::Duplicate),
            2 => Some(Refusal::WrongNode),
            3 => Some(Refusal::WrongDirection),
            4 => Some(Refusal::BrokenInView),
            5 => Some(Refusal::SettingsDiffer),
            _ => None,
        }
    }
}

/// The verdict byte of an accepted link.
pub(crate) const VERDICT_ACCEPTED: u8 = 0;

/// Why a handshake failed. The connection is closed in every case.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading or writing the connection failed.
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection during the handshake (an acceptor does so when the dialer's
    /// proof is wrong).
    #[error("the peer closed the connection during the handshake (wrong secret?)")]
    Closed,
    /// The handshake did not finish in time.
    #[error("the handshake timed out")]
    TimedOut,
    /// The peer does not speak this protocol, or sent a malformed message.
    #[error("malformed handshake: {0}")]
    Malformed(&'static str),
    /// The peer's MAC does not match: it does not hold the cluster secret.
    #[error("the peer failed authentication: it does not hold the cluster secret")]
    Authentication,
    /// The acceptor is another node than the one dialed.
    #[error("reached node {found}, expected node {expected}")]
    WrongNode {
        /// The node dialed.
        expected: NodeId,
        /// The node that answered.
        found: NodeId,
    },
    /// The acceptor refused the link.
    #[error("the acceptor refused the link: {0:?}")]
    Refused(Refusal),
    /// The acceptor's group settings differ from this node's.
    #[error("node {peer}'s group settings differ from this node's: {differences}")]
    SettingsDiffer {
        /// The acceptor.
        peer: NodeId,
        /// What differs, `key is HERE here and THERE there`.
        differences: String,
    },
    /// The system's random source failed.
    #[error("no random nonce: {0}")]
    Random(getrandom::Error),
}

/// A decoded hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Who dials.
    pub dialer: Peer,
    /// The node the dialer expects to reach, if it knows.
    pub expected: Option<NodeId>,
    /// The dialer's view id.
    pub view_id: u32,
    /// The dialer's nonce.
    pub nonce: [u8; NONCE_BYTES],
    /// The dialer's group settings (a node's; a client states none).
    pub settings: Option<GroupSettings>,
}

impl Hello {
    /// The 72 bytes of this hello.
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[0..8].copy_from_slice(&HANDSHAKE_MAGIC);
        let (role, id) = match self.dialer {
            Peer::Node(node) => (ROLE_NODE, u64::from(node)),
            Peer::Client(client) => (ROLE_CLIENT, client),
        };
        out[8] = role;
        if let Some(expected) = self.expected {
            out[9] = FLAG_EXPECTED;
            out[20..24].copy_from_slice(&expected.to_le_bytes());
        }
        out[12..20].copy_from_slice(&id.to_le_bytes());
        out[24..28].copy_from_slice(&self.view_id.to_le_bytes());
        out[28..60].copy_from_slice(&self.nonce);
        if let Some(settings) = &self.settings {
            out[9] |= FLAG_SETTINGS;
            out[60..72].copy_from_slice(&settings.encode());
        }
        out
    }

    /// Decodes a hello; never panics.
    pub fn decode(bytes: &[u8; HELLO_BYTES]) -> Result<Hello, HandshakeError> {
        check_magic(&bytes[0..8])?;
        if bytes[9] & !(FLAG_EXPECTED | FLAG_SETTINGS) != 0 || bytes[10..12] != [0, 0] {
            return Err(HandshakeError::Malformed("reserved hello bits set"));
        }
        let id = u64::from_le_bytes(array(&bytes[12..20]));
        let dialer = match bytes[8] {
            ROLE_NODE => Peer::Node(
                NodeId::try_from(id).map_err(|_| HandshakeError::Malformed("node id too large"))?,
            ),
            ROLE_CLIENT => Peer::Client(id as ClientId),
            _ => return Err(HandshakeError::Malformed("unknown role")),
        };
        let expected_id = u32::from_le_bytes(array(&bytes[20..24]));
        let expected = if bytes[9] & FLAG_EXPECTED != 0 {
            Some(expected_id)
        } else if expected_id != 0 {
            return Err(HandshakeError::Malformed(
                "expected node id without its flag",
            ));
        } else {
            None
        };
        let settings = if bytes[9] & FLAG_SETTINGS != 0 {
            Some(GroupSettings::decode(&bytes[60..72]))
        } else if bytes[60..72].iter().any(|&b| b != 0) {
            return Err(HandshakeError::Malformed(
                "group settings without their flag",
            ));
        } else {
            None
        };
        Ok(Hello {
            dialer,
            expected,
            view_id: u32::from_le_bytes(array(&bytes[24..28])),
            nonce: array(&bytes[28..60]),
            settings,
        })
    }
}

/// A decoded challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The acceptor's node id.
    pub node_id: NodeId,
    /// The acceptor's view id.
    pub view_id: u32,
    /// The acceptor's nonce.
    pub nonce: [u8; NONCE_BYTES],
    /// The acceptor's group settings, if it states them.
    pub settings: Option<GroupSettings>,
    /// The acceptor's MAC over the hello and the challenge's first 64 bytes.
    pub proof: [u8; PROOF_BYTES],
}

impl Challenge {
    /// A challenge answering `hello`, signed with `secret`.
    pub fn new(
        secret: &Secret,
        hello: &[u8; HELLO_BYTES],
        node_id: NodeId,
        view_id: u32,
        nonce: [u8; NONCE_BYTES],
        settings: Option<GroupSettings>,
    ) -> Challenge {
        let mut challenge = Challenge {
            node_id,
            view_id,
            nonce,
            settings,
            proof: [0; PROOF_BYTES],
        };
        let signed = challenge.encode();
        challenge.proof = secret.sign(LABEL_ACCEPT, &[hello, &signed[..CHALLENGE_SIGNED_BYTES]]);
        challenge
    }

    /// The 96 bytes of this challenge.
    pub fn encode(&self) -> [u8; CHALLENGE_BYTES] {
        let mut out = [0u8; CHALLENGE_BYTES];
        out[0..8].copy_from_slice(&HANDSHAKE_MAGIC);
        out[8..12].copy_from_slice(&self.node_id.to_le_bytes());
        out[12..16].copy_from_slice(&self.view_id.to_le_bytes());
        out[16..48].copy_from_slice(&self.nonce);
        if let Some(settings) = &self.settings {
            out[48] = CHALLENGE_FLAG_SETTINGS;
            out[52..64].copy_from_slice(&settings.encode());
        }
        out[64..96].copy_from_slice(&self.proof);
        out
    }

    /// Decodes a challenge and checks its MAC against the hello it answers; never panics.
    pub fn decode(
        secret: &Secret,
        hello: &[u8; HELLO_BYTES],
        bytes: &[u8; CHALLENGE_BYTES],
    ) -> Result<Challenge, HandshakeError> {
        check_magic(&bytes[0..8])?;
        let signed = &bytes[..CHALLENGE_SIGNED_BYTES];
        if !secret.verify(LABEL_ACCEPT, &[hello, signed], &bytes[64..96]) {
            return Err(HandshakeError::Authentication);
        }
        if bytes[48] & !CHALLENGE_FLAG_SETTINGS != 0 || bytes[49..52] != [0, 0, 0] {
            return Err(HandshakeError::Malformed("reserved challenge bits set"));
        }
        let settings = if bytes[48] & CHALLENGE_FLAG_SETTINGS != 0 {
            Some(GroupSettings::decode(&bytes[52..64]))
        } else if bytes[52..64].iter().any(|&b| b != 0) {
            return Err(HandshakeError::Malformed(
                "group settings without their flag",
            ));
        } else {
            None
        };
        Ok(Challenge {
            node_id: u32::from_le_bytes(array(&bytes[8..12])),
            view_id: u32::from_le_bytes(array(&bytes[12..16])),
            nonce: array(&bytes[16..48]),
            settings,
            proof: array(&bytes[64..96]),
        })
    }
}

/// The dialer's proof over the whole exchange.
pub fn dial_proof(
    secret: &Secret,
    hello: &[u8; HELLO_BYTES],
    challenge: &[u8; CHALLENGE_BYTES],
) -> [u8; PROOF_BYTES] {
    secret.sign(LABEL_DIAL, &[hello, challenge])
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(bytes);
    out
}

fn nonce() -> Result<[u8; NONCE_BYTES], HandshakeError> {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(HandshakeError::Random)?;
    Ok(nonce)
}

async fn read_exact<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
) -> Result<(), HandshakeError> {
    match stream.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(HandshakeError::Closed),
        Err(e) => Err(HandshakeError::Io(e)),
    }
}

/// Reads a hello or a challenge: its magic first, so that a peer of another link version, whose
/// messages have other lengths, is told so at once rather than waited for until the timeout.
async fn read_magic_then_rest<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
) -> Result<(), HandshakeError> {
    let (magic, rest) = buf.split_at_mut(HANDSHAKE_MAGIC.len());
    read_exact(stream, magic).await?;
    check_magic(magic)?;
    read_exact(stream, rest).await
}

/// What the dialer learned about the acceptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Acceptor {
    pub node_id: NodeId,
    pub view_id: u32,
}

/// Runs the dialer's side to the verdict.
pub(crate) async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    secret: &Secret,
    me: Peer,
    expected: Option<NodeId>,
    view_id: u32,
    settings: Option<&GroupSettings>,
) -> Result<Acceptor, HandshakeError> {
    let hello = Hello {
        dialer: me,
        expected,
        view_id,
        nonce: nonce()?,
        settings: settings.copied(),
    }
    .encode();
    stream.write_all(&hello).await?;
    stream.flush().await?;
    let mut challenge_bytes = [0u8; CHALLENGE_BYTES];
    read_magic_then_rest(stream, &mut challenge_bytes).await?;
    let challenge = Challenge::decode(secret, &hello, &challenge_bytes)?;
    if let Some(expected) = expected {
        if challenge.node_id != expected {
            return Err(HandshakeError::WrongNode {
                expected,
                found: challenge.node_id,
            });
        }
    }
    // Settings that differ are not a reason to stop here: the acceptor, which checks them
    // too, then refuses with its own reason, so both ends know why (rather than the acceptor
    // seeing a dialer vanish mid-handshake).
    let differ = settings_differ(settings, challenge.settings.as_ref());
    stream
        .write_all(&dial_proof(secret, &hello, &challenge_bytes))
        .await?;
    stream.flush().await?;
    let mut verdict = [0u8; 1];
    read_exact(stream, &mut verdict).await?;
    if let Some(differences) = differ {
        // Refused for it, or accepted by an acceptor that did not look: no link either way.
        if verdict[0] == VERDICT_ACCEPTED || verdict[0] == Refusal::SettingsDiffer as u8 {
            return Err(HandshakeError::SettingsDiffer {
                peer: challenge.node_id,
                differences,
            });
        }
    }
    match verdict[0] {
        VERDICT_ACCEPTED => Ok(Acceptor {
            node_id: challenge.node_id,
            view_id: challenge.view_id,
        }),
        other => Err(Refusal::from_byte(other).map_or(
            HandshakeError::Malformed("unknown verdict"),
            HandshakeError::Refused,
        )),
    }
}

/// Runs the acceptor's side up to checking the dialer's proof; the caller decides the verdict.
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    secret: &Secret,
    node_id: NodeId,
    view_id: u32,
    settings: Option<&GroupSettings>,
) -> Result<Hello, HandshakeError> {
    let mut hello_bytes = [0u8; HELLO_BYTES];
    read_magic_then_rest(stream, &mut hello_bytes).await?;
    let hello = Hello::decode(&hello_bytes)?;
    let challenge = Challenge::new(
        secret,
        &hello_bytes,
        node_id,
        view_id,
        nonce()?,
        settings.copied(),
    )
    .encode();
    stream.write_all(&challenge).await?;
    stream.flush().await?;
    let mut proof = [0u8; PROOF_BYTES];
    read_exact(stream, &mut proof).await?;
    if !secret.verify(LABEL_DIAL, &[&hello_bytes, &challenge], &proof) {
        return Err(HandshakeError::Authentication);
    }
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(bytes: &[u8]) -> Secret {
        Secret::new(bytes).unwrap()
    }

    #[test]
    fn hello_roundtrips_nodes_and_clients() {
        for hello in [
            Hello {
                dialer: Peer::Node(7),
                expected: Some(9),
                view_id: 3,
                nonce: [5; NONCE_BYTES],
                settings: Some(settings(4, 1 << 20)),
            },
            Hello {
                dialer: Peer::Node(7),
                expected: None,
                view_id: 3,
                nonce: [5; NONCE_BYTES],
                settings: None,
            },
            Hello {
                dialer: Peer::Client(u64::MAX),
                expected: None,
                view_id: 0,
                nonce: [1; NONCE_BYTES],
                settings: None,
            },
        ] {
            assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        }
    }

    #[test]
    fn hello_rejects_bad_magic_role_and_reserved_bits() {
        let good = Hello {
            dialer: Peer::Node(1),
            expected: None,
            view_id: 0,
            nonce: [0; NONCE_BYTES],
            settings: None,
        }
        .encode();
        for (at, value) in [
            (0, b'X'),
            (8, 3),
            (9, 4),
            (11, 1),
            (16, 1),
            (20, 1),
            (60, 1),
            (71, 1),
        ] {
            let mut bad = good;
            bad[at] = value;
            assert!(
                matches!(Hello::decode(&bad), Err(HandshakeError::Malformed(_))),
                "byte {at} = {value}"
            );
        }
        let mut older = good;
        older[7] = 1;
        assert_eq!(
            Hello::decode(&older).unwrap_err().to_string(),
            HandshakeError::Malformed("another link version (this build speaks version 6)")
                .to_string()
        );
    }

    #[test]
    fn challenge_is_accepted_only_with_the_same_secret_and_hello() {
        let hello = Hello {
            dialer: Peer::Node(1),
            expected: Some(2),
            view_id: 0,
            nonce: [3; NONCE_BYTES],
            settings: Some(settings(1, 4096)),
        }
        .encode();
        for stated in [None, Some(settings(2, 65536))] {
            let challenge =
                Challenge::new(&secret(b"s3cret"), &hello, 2, 0, [4; NONCE_BYTES], stated);
            let bytes = challenge.encode();
            assert_eq!(
                Challenge::decode(&secret(b"s3cret"), &hello, &bytes).unwrap(),
                challenge
            );
        }
        let challenge = Challenge::new(
            &secret(b"s3cret"),
            &hello,
            2,
            0,
            [4; NONCE_BYTES],
            Some(settings(1, 4096)),
        );
        let bytes = challenge.encode();
        // The settings are under the MAC: changed on the way, the challenge is refused.
        let mut changed = bytes;
        changed[60] ^= 1;
        assert!(matches!(
            Challenge::decode(&secret(b"s3cret"), &hello, &changed),
            Err(HandshakeError::Authentication)
        ));
        assert!(matches!(
            Challenge::decode(&secret(b"other"), &hello, &bytes),
            Err(HandshakeError::Authentication)
        ));
        let mut other_hello = hello;
        other_hello[30] ^= 1;
        assert!(matches!(
            Challenge::decode(&secret(b"s3cret"), &other_hello, &bytes),
            Err(HandshakeError::Authentication)
        ));
    }

    #[test]
    fn the_dialers_proof_differs_from_the_acceptors() {
        let hello = [0u8; HELLO_BYTES];
        let challenge =
            Challenge::new(&secret(b"k"), &hello, 2, 0, [0; NONCE_BYTES], None).encode();
        let dial = dial_proof(&secret(b"k"), &hello, &challenge);
        assert_ne!(&dial[..], &challenge[64..96]);
    }

    fn settings(data_shards: u16, chunk_size: u32) -> GroupSettings {
        GroupSettings {
            spec: LayoutSpec {
                data_shards,
                ..LayoutSpec::default()
            },
            chunk_size,
        }
    }

    #[test]
    fn group_settings_round_trip_and_name_each_key_that_differs() {
        let ours = settings(4, 1 << 20);
        assert_eq!(GroupSettings::decode(&ours.encode()), ours);
        assert_eq!(settings_differ(Some(&ours), Some(&ours)), None);
        // A client states none: nothing to compare.
        assert_eq!(settings_differ(Some(&ours), None), None);
        assert_eq!(settings_differ(None, Some(&ours)), None);
        assert_eq!(
            settings_differ(Some(&ours), Some(&settings(4, 65536))).as_deref(),
            Some("layout.chunk_size is 1048576 here and 65536 there")
        );
        let theirs = GroupSettings {
            spec: LayoutSpec {
                namespace_shards: 2,
                data_shards: 3,
                replicas: 5,
                replicas_min: 3,
            },
            chunk_size: 1 << 20,
        };
        assert_eq!(
            ours.differences(&theirs),
            "layout.namespace_shards is 1 here and 2 there, layout.data_shards is 4 here and 3 \
             there, layout.replicas is 3 here and 5 there, layout.replicas_min is 2 here and 3 \
             there"
        );
    }

    #[tokio::test]
    async fn a_peer_of_another_link_version_is_named_from_its_magic_alone() {
        // A version-5 peer's hello is shorter: only its first bytes are waited for.
        let mut older: &[u8] = b"DFSLINK\x05";
        let mut hello = [0u8; HELLO_BYTES];
        let error = read_magic_then_rest(&mut older, &mut hello)
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            HandshakeError::Malformed("another link version (this build speaks version 6)")
                .to_string()
        );
        let mut current: &[u8] = &[&HANDSHAKE_MAGIC[..], &[7; HELLO_BYTES - 8]].concat();
        read_magic_then_rest(&mut current, &mut hello)
            .await
            .unwrap();
        assert_eq!(hello[HELLO_BYTES - 1], 7);
    }

    #[test]
    fn a_secret_does_not_show_in_debug_output() {
        assert_eq!(format!("{:?}", secret(b"hunter2")), "Secret(7 bytes)");
        assert!(Secret::new(Vec::new()).is_none());
    }
}
