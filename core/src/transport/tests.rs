//! The transport on loopback and over local sockets: order, authentication, malformed input,
//! meshes, clients, and the choice between the two kinds of connection.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::frame::{encode_header_with_crc, FrameKind, PayloadSum};
use super::stream::Stream;
use super::*;

const WAIT: Duration = Duration::from_secs(10);

fn secret(bytes: &[u8]) -> Secret {
    Secret::new(bytes).unwrap()
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn node(id: NodeId, key: &[u8]) -> (Transport, mpsc::Receiver<LinkEvent>) {
    Transport::bind(loopback(), id, secret(key)).await.unwrap()
}

/// A directory of local sockets for one test, removed at its end.
struct LocalDir(PathBuf);

impl LocalDir {
    fn new(test: &str) -> LocalDir {
        let dir = std::env::temp_dir().join(format!("dfs-t-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        LocalDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for LocalDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node listening on TCP and, with `dir`, on its socket file there (which must work).
async fn node_in(
    id: NodeId,
    key: &[u8],
    dir: Option<&Path>,
) -> (Transport, mpsc::Receiver<LinkEvent>) {
    let (transport, events) = Transport::bind_with(loopback(), id, secret(key), dir, None)
        .await
        .unwrap();
    assert_eq!(
        transport.local_socket(),
        dir.map(|dir| local_socket_path(dir, transport.local_addr()))
    );
    (transport, events)
}

/// The kind of connection a dialer with `dir` makes to a node that listens locally there.
fn kind_with(dir: Option<&Path>) -> LinkKind {
    match dir {
        Some(_) => LinkKind::Local,
        None => LinkKind::Tcp,
    }
}

/// A raw connection to `to`: through its socket file in `dir`, or over TCP without one.
/// Sends `hello`, reads the challenge, answers with a proof made with `key` whatever the
/// challenge says, and returns the verdict byte, or `None` if the acceptor closed without one.
async fn dial_by_hand<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    raw: &mut S,
    hello: handshake::Hello,
    key: &[u8],
) -> Option<u8> {
    let hello = hello.encode();
    raw.write_all(&hello).await.unwrap();
    let mut challenge = [0u8; handshake::CHALLENGE_BYTES];
    raw.read_exact(&mut challenge).await.unwrap();
    let proof = handshake::dial_proof(&secret(key), &hello, &challenge);
    raw.write_all(&proof).await.unwrap();
    let mut verdict = [0u8; 1];
    (raw.read(&mut verdict).await.unwrap() == 1).then_some(verdict[0])
}

async fn raw_connect(to: &Transport, dir: Option<&Path>) -> Stream {
    let (stream, addr) = Stream::connect(to.local_addr(), dir).await.unwrap();
    assert_eq!(addr.kind(), kind_with(dir));
    if let Stream::Local(local) = &stream {
        let widened = socket2::SockRef::from(local).send_buffer_size().unwrap();
        assert!(
            widened >= super::stream::LOCAL_SEND_BUFFER_BYTES,
            "{widened}"
        );
    }
    stream
}

async fn next_event(events: &mut mpsc::Receiver<LinkEvent>) -> LinkEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event within the wait")
        .expect("the transport is alive")
}

async fn expect_connected(events: &mut mpsc::Receiver<LinkEvent>, peer: Peer) {
    match next_event(events).await {
        LinkEvent::Connected { peer: got, .. } => assert_eq!(got, peer),
        other => panic!("expected Connected from {peer:?}, got {other:?}"),
    }
}

async fn expect_broken(events: &mut mpsc::Receiver<LinkEvent>, peer: Peer) -> BreakReason {
    match next_event(events).await {
        LinkEvent::Broken { peer: got, reason } => {
            assert_eq!(got, peer);
            reason
        }
        other => panic!("expected Broken from {peer:?}, got {other:?}"),
    }
}

/// Polls `check` every few milliseconds until it gives a value, within [`WAIT`].
async fn eventually<T>(mut check: impl FnMut() -> Option<T>) -> T {
    let poll = async {
        loop {
            if let Some(value) = check() {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(WAIT, poll)
        .await
        .expect("the condition within the wait")
}

/// A client `id` of node `to`, through its socket file in `dir`.
async fn local_client(to: &Transport, dir: &Path, id: ClientId) -> ClientConn {
    ClientConn::connect_via(to.local_addr(), Some(dir), id, &secret(b"cluster"), None)
        .await
        .unwrap()
}

async fn assert_quiet(events: &mut mpsc::Receiver<LinkEvent>) {
    let quiet = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
    assert!(quiet.is_err(), "unexpected event: {quiet:?}");
}

fn payload(from: u64, index: u64) -> Bytes {
    let len = (index * 37 % 3000) as usize;
    let mut bytes = from.to_le_bytes().to_vec();
    bytes.extend_from_slice(&index.to_le_bytes());
    bytes.extend((0..len).map(|i| (i as u64 ^ index) as u8));
    Bytes::from(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_two_nodes_exchange_many_frames_in_order() {
    let (one, mut one_events) = node(1, b"cluster").await;
    let (two, mut two_events) = node(2, b"cluster").await;
    one.connect(2, two.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(2)).await;
    expect_connected(&mut two_events, Peer::Node(1)).await;

    const FRAMES: u64 = 5_000;
    let sending = async {
        for index in 0..FRAMES {
            one.send(Peer::Node(2), 1, payload(1, index)).await.unwrap();
            two.send(Peer::Node(1), 1, payload(2, index)).await.unwrap();
        }
    };
    let receiving = async {
        for index in 0..FRAMES {
            for (events, from) in [(&mut two_events, 1), (&mut one_events, 2)] {
                match next_event(events).await {
                    LinkEvent::Frame {
                        peer,
                        view_id,
                        bytes,
                    } => {
                        assert_eq!(peer, Peer::Node(from));
                        assert_eq!(view_id, 1);
                        assert_eq!(bytes, payload(from as u64, index), "frame {index}");
                    }
                    other => panic!("expected a frame, got {other:?}"),
                }
            }
        }
    };
    tokio::join!(sending, receiving);

    // An orderly close is reported to the other side as such, and not to the closing side.
    assert!(one.disconnect(Peer::Node(2)));
    assert_eq!(
        expect_broken(&mut two_events, Peer::Node(1)).await,
        BreakReason::PeerClosed
    );
    assert_quiet(&mut one_events).await;
}

#[tokio::test]
async fn transport_wrong_secret_is_refused_on_both_sides() {
    wrong_secret_is_refused_on_both_sides(None).await;
}

#[tokio::test]
async fn transport_wrong_secret_is_refused_on_both_sides_over_local_sockets() {
    let dir = LocalDir::new("secret");
    wrong_secret_is_refused_on_both_sides(Some(dir.path())).await;
}

async fn wrong_secret_is_refused_on_both_sides(dir: Option<&Path>) {
    let (one, mut one_events) = node_in(1, b"cluster", dir).await;
    let (two, mut two_events) = node_in(2, b"intruder", dir).await;
    let error = one.connect(2, two.local_addr()).await.unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::Handshake(HandshakeError::Authentication)
        ),
        "{error}"
    );
    let (three, mut three_events) = node_in(3, b"intruder", dir).await;
    let error = three.connect(4, one.local_addr()).await.unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::Handshake(HandshakeError::WrongNode { .. })
                | ConnectError::Handshake(HandshakeError::Authentication)
        ),
        "{error}"
    );
    let error = ClientConn::connect_via(one.local_addr(), dir, 77, &secret(b"intruder"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::Handshake(HandshakeError::Authentication)
        ),
        "{error}"
    );
    // A dialer with the wrong secret that ignores the acceptor's bad MAC still fails: the
    // acceptor checks the dialer's proof and closes without a verdict.
    let mut raw = raw_connect(&one, dir).await;
    let hello = handshake::Hello {
        dialer: Peer::Node(0),
        expected: None,
        view_id: 0,
        nonce: [7; handshake::NONCE_BYTES],
        settings: None,
    };
    assert_eq!(
        dial_by_hand(&mut raw, hello, b"intruder").await,
        None,
        "closed without a verdict"
    );

    assert!(!one.is_linked(Peer::Node(2)) && !two.is_linked(Peer::Node(1)));
    assert_quiet(&mut one_events).await;
    assert_quiet(&mut two_events).await;
    assert_quiet(&mut three_events).await;
}

/// Opens an authenticated connection to `to` as node `as_node`, by hand, so a test can then write
/// whatever bytes it likes.
async fn raw_link(to: &Transport, as_node: NodeId, key: &[u8], dir: Option<&Path>) -> Stream {
    let mut stream = raw_connect(to, dir).await;
    handshake::dial(
        &mut stream,
        &secret(key),
        Peer::Node(as_node),
        Some(to.node_id()),
        0,
        None,
    )
    .await
    .unwrap();
    stream
}

#[tokio::test]
async fn transport_garbage_before_the_handshake_is_refused_without_an_event() {
    let (two, mut two_events) = node(2, b"cluster").await;
    for garbage in [&b""[..], b"GET / HTTP/1.1\r\n\r\n", &[0xFF; 200]] {
        let mut raw = TcpStream::connect(two.local_addr()).await.unwrap();
        raw.write_all(garbage).await.unwrap();
        raw.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = raw.read_to_end(&mut rest).await;
    }
    assert_quiet(&mut two_events).await;
    // The transport still serves well-behaved peers.
    let (one, mut one_events) = node(1, b"cluster").await;
    one.connect(2, two.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(2)).await;
    expect_connected(&mut two_events, Peer::Node(1)).await;
}

/// Each malformed stream after the handshake breaks the link with its reason.
#[tokio::test]
async fn transport_malformed_frames_break_the_link_with_a_reason() {
    malformed_frames_break_the_link_with_a_reason(None).await;
}

#[tokio::test]
async fn transport_malformed_frames_break_a_local_link_with_a_reason() {
    let dir = LocalDir::new("malformed");
    malformed_frames_break_the_link_with_a_reason(Some(dir.path())).await;
}

async fn malformed_frames_break_the_link_with_a_reason(dir: Option<&Path>) {
    // Frames as the link sums them: a local link's checksum covers the header's fields only.
    let sum = PayloadSum::of(kind_with(dir));
    let good = |seq: u64, view: u32| {
        let payload = b"payload";
        let crc = match sum {
            PayloadSum::Summed => crc32c::crc32c(payload),
            PayloadSum::HeaderOnly => 0,
        };
        let mut bytes =
            encode_header_with_crc(FrameKind::Message, view, seq, payload.len(), crc).to_vec();
        bytes.extend_from_slice(payload);
        bytes
    };
    let mut corrupted_header = good(1, 0);
    corrupted_header[23] ^= 0x01;
    let mut unknown_kind = good(1, 0);
    unknown_kind[8] = 7;
    let mut too_long = good(1, 0);
    too_long[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut view_back = good(1, 5);
    view_back.extend_from_slice(&good(2, 4));
    let mut truncated = good(1, 0);
    truncated.truncate(20);
    type Check = fn(&BreakReason) -> bool;
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        ("garbage", vec![0xAB; 64], |r| {
            matches!(r, BreakReason::Malformed(_))
        }),
        ("corrupted header", corrupted_header, |r| {
            matches!(r, BreakReason::Malformed(FrameError::Checksum { .. }))
        }),
        ("unknown kind", unknown_kind, |r| {
            matches!(r, BreakReason::Malformed(FrameError::UnknownKind(7)))
        }),
        ("length above the bound", too_long, |r| {
            matches!(r, BreakReason::Malformed(FrameError::TooLong(_)))
        }),
        ("sequence gap", good(2, 0), |r| {
            matches!(
                r,
                BreakReason::Malformed(FrameError::Sequence {
                    expected: 1,
                    got: 2
                })
            )
        }),
        ("view going back", view_back, |r| {
            matches!(
                r,
                BreakReason::Malformed(FrameError::ViewWentBack { floor: 5, got: 4 })
            )
        }),
        ("truncated frame", truncated, |r| {
            *r == BreakReason::Truncated
        }),
    ];
    let mut cases = cases;
    // The frames that lend: malformed on TCP; on a local link, a lent frame before this end
    // accepted any loan, a read of a frame never lent, and an offer of the wrong size.
    let frame_of = |kind: FrameKind, payload: &[u8]| {
        let crc = match sum {
            PayloadSum::Summed => crc32c::crc32c(payload),
            PayloadSum::HeaderOnly => 0,
        };
        let mut bytes = encode_header_with_crc(kind, 0, 1, payload.len(), crc).to_vec();
        bytes.extend_from_slice(payload);
        bytes
    };
    let (descriptor, _) = super::lend::describe(&[Bytes::from_static(b"inline")]);
    cases.push((
        "lent frame not accepted",
        frame_of(FrameKind::Lent, &descriptor),
        |r| matches!(r, BreakReason::Malformed(FrameError::Loan(_))),
    ));
    cases.push((
        "read of a frame never lent",
        frame_of(FrameKind::Read, &9u64.to_le_bytes()),
        |r| matches!(r, BreakReason::Malformed(FrameError::Loan(_))),
    ));
    cases.push((
        "offer of three bytes",
        frame_of(FrameKind::Offer, b"abc"),
        |r| matches!(r, BreakReason::Malformed(FrameError::Loan(_))),
    ));
    if sum == PayloadSum::Summed {
        let mut corrupted = good(1, 0);
        corrupted[30] ^= 0x01;
        cases.push(("corrupted payload", corrupted, |r| {
            matches!(r, BreakReason::Malformed(FrameError::Checksum { .. }))
        }));
    }
    let (acceptor, mut events) = node_in(100, b"cluster", dir).await;
    for (dialer, (name, bytes, expected)) in (0..).zip(cases) {
        acceptor.set_view(dialer); // so the previous case's broken link does not refuse this one
        let mut raw = raw_link(&acceptor, dialer, b"cluster", dir).await;
        expect_connected(&mut events, Peer::Node(dialer)).await;
        assert_eq!(acceptor.links(), [(Peer::Node(dialer), kind_with(dir))]);
        raw.write_all(&bytes).await.unwrap();
        raw.shutdown().await.unwrap();
        // Well-formed frames before the bad one are delivered; then the link breaks.
        let reason = loop {
            match next_event(&mut events).await {
                LinkEvent::Frame { peer, .. } => assert_eq!(peer, Peer::Node(dialer)),
                LinkEvent::Broken { peer, reason } => {
                    assert_eq!(peer, Peer::Node(dialer));
                    break reason;
                }
                other => panic!("{name}: unexpected {other:?}"),
            }
        };
        assert!(expected(&reason), "{name}: got {reason:?}");
        assert!(!acceptor.is_linked(Peer::Node(dialer)), "{name}");
    }
}

#[tokio::test]
async fn transport_broken_link_is_not_reopened_in_the_same_view() {
    let (one, mut one_events) = node(1, b"cluster").await;
    let (two, mut two_events) = node(2, b"cluster").await;
    one.connect(2, two.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(2)).await;
    expect_connected(&mut two_events, Peer::Node(1)).await;
    assert!(two.disconnect(Peer::Node(1)));
    assert_eq!(
        expect_broken(&mut one_events, Peer::Node(2)).await,
        BreakReason::PeerClosed
    );

    let error = one.connect(2, two.local_addr()).await.unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::BrokenInView {
                peer: 2,
                view_id: 0
            }
        ),
        "{error}"
    );

    // Node 1 moved on but node 2 did not see the link break (it closed it): it accepts.
    one.set_view(1);
    one.connect(2, two.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(2)).await;
    expect_connected(&mut two_events, Peer::Node(1)).await;

    // Now node 2 sees the link break; until it moves on, it refuses node 1.
    assert!(one.disconnect(Peer::Node(2)));
    assert_eq!(
        expect_broken(&mut two_events, Peer::Node(1)).await,
        BreakReason::PeerClosed
    );
    one.set_view(2);
    let error = one.connect(2, two.local_addr()).await.unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::Handshake(HandshakeError::Refused(Refusal::BrokenInView))
        ),
        "{error}"
    );
    two.set_view(2);
    one.connect(2, two.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(2)).await;
    expect_connected(&mut two_events, Peer::Node(1)).await;
}

#[tokio::test]
async fn transport_a_node_that_left_its_view_relinks_at_once_until_it_enters_a_later_one() {
    let (one, mut one_events) = node(1, b"cluster").await;
    let (two, mut two_events) = node(2, b"cluster").await;
    let (three, mut three_events) = node(3, b"cluster").await;
    two.set_view(1);
    three.set_view(1);
    one.set_view(1);
    one.connect(2, two.local_addr()).await.unwrap();
    one.connect(3, three.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(2)).await;
    expect_connected(&mut one_events, Peer::Node(3)).await;
    expect_connected(&mut two_events, Peer::Node(1)).await;
    expect_connected(&mut three_events, Peer::Node(1)).await;

    // Node 2 moves to view 2 without node 1 and drops its link; node 1, still in view 1,
    // may not dial it again in view 1 ...
    two.set_view(2);
    assert!(two.disconnect(Peer::Node(1)));
    expect_broken(&mut one_events, Peer::Node(2)).await;
    let error = one.connect(2, two.local_addr()).await.unwrap_err();
    assert!(
        matches!(error, ConnectError::BrokenInView { peer: 2, .. }),
        "{error}"
    );

    // ... until it learns it left the view: then it relinks, and keeps relinking after
    // breaks that come later (node 3 drops it too), still in view 1.
    one.leave_view();
    one.connect(2, two.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(2)).await;
    expect_connected(&mut two_events, Peer::Node(1)).await;
    three.set_view(2);
    assert!(three.disconnect(Peer::Node(1)));
    expect_broken(&mut one_events, Peer::Node(3)).await;
    one.connect(3, three.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(3)).await;

    // Welcomed into view 3, the ordinary rule is back.
    one.set_view(3);
    assert!(two.disconnect(Peer::Node(1)));
    expect_broken(&mut one_events, Peer::Node(2)).await;
    let error = one.connect(2, two.local_addr()).await.unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::BrokenInView {
                peer: 2,
                view_id: 3
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn transport_close_says_bye_on_every_link_and_makes_no_link_after() {
    let (one, _one_events) = node(1, b"cluster").await;
    let (two, mut two_events) = node(2, b"cluster").await;
    let (three, mut three_events) = node(3, b"cluster").await;
    one.connect(2, two.local_addr()).await.unwrap();
    one.connect(3, three.local_addr()).await.unwrap();
    expect_connected(&mut two_events, Peer::Node(1)).await;
    expect_connected(&mut three_events, Peer::Node(1)).await;
    one.send(Peer::Node(2), 0, Bytes::from_static(b"last"))
        .await
        .unwrap();

    one.close().await;
    // The frame queued before the close arrives, then the bye: the peers see an orderly stop.
    match next_event(&mut two_events).await {
        LinkEvent::Frame { bytes, .. } => assert_eq!(&bytes[..], b"last"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        expect_broken(&mut two_events, Peer::Node(1)).await,
        BreakReason::PeerClosed
    );
    assert_eq!(
        expect_broken(&mut three_events, Peer::Node(1)).await,
        BreakReason::PeerClosed
    );
    assert!(!one.is_linked(Peer::Node(2)));
    let error = one.connect(2, two.local_addr()).await.unwrap_err();
    assert!(matches!(error, ConnectError::Closing), "{error}");
}

#[tokio::test]
async fn transport_a_joiner_unknown_to_a_member_dials_it_until_the_member_knows_it() {
    let (one, mut one_events) = node(1, b"cluster").await;
    let (nine, mut nine_events) = node(9, b"cluster").await;
    one.know([2, 3]);
    // Node 9 is not in node 1's configuration: node 1 cannot dial it, so it dials node 1.
    nine.connect_joining(1, one.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(9)).await;
    expect_connected(&mut nine_events, Peer::Node(1)).await;
    nine.send(Peer::Node(1), 0, Bytes::from_static(b"join"))
        .await
        .unwrap();
    match next_event(&mut one_events).await {
        LinkEvent::Frame { peer, bytes, .. } => {
            assert_eq!((peer, &bytes[..]), (Peer::Node(9), &b"join"[..]))
        }
        other => panic!("unexpected {other:?}"),
    }

    // Once node 1 learned node 9's address (the view that adds it), the ordinary rule holds:
    // node 9's dial is refused and node 1 dials.
    one.know([9]);
    assert!(one.disconnect(Peer::Node(9)));
    expect_broken(&mut nine_events, Peer::Node(1)).await;
    one.set_view(1);
    nine.set_view(1);
    let error = nine.connect_joining(1, one.local_addr()).await.unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::Handshake(HandshakeError::Refused(Refusal::WrongDirection))
        ),
        "{error}"
    );
    one.connect(9, nine.local_addr()).await.unwrap();
    expect_connected(&mut nine_events, Peer::Node(1)).await;
}

#[tokio::test]
async fn transport_only_the_lower_id_dials_and_duplicates_are_refused() {
    let (one, mut one_events) = node(1, b"cluster").await;
    let (two, mut two_events) = node(2, b"cluster").await;
    let error = two.connect(1, one.local_addr()).await.unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::NotDialer {
                local: 2,
                remote: 1
            }
        ),
        "{error}"
    );

    // A higher id the acceptor knows, dialing by hand, is refused by it.
    one.know([2]);
    let mut raw = TcpStream::connect(one.local_addr()).await.unwrap();
    let error = handshake::dial(&mut raw, &secret(b"cluster"), Peer::Node(2), None, 0, None)
        .await
        .unwrap_err();
    assert!(
        matches!(error, HandshakeError::Refused(Refusal::WrongDirection)),
        "{error}"
    );

    one.connect(2, two.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(2)).await;
    expect_connected(&mut two_events, Peer::Node(1)).await;
    let error = one.connect(2, two.local_addr()).await.unwrap_err();
    assert!(matches!(error, ConnectError::AlreadyLinked(2)), "{error}");
    let mut raw = TcpStream::connect(two.local_addr()).await.unwrap();
    let error = handshake::dial(
        &mut raw,
        &secret(b"cluster"),
        Peer::Node(1),
        Some(2),
        0,
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, HandshakeError::Refused(Refusal::Duplicate)),
        "{error}"
    );

    // Dialing a node under another id than its own is refused by the dialer.
    let (three, _three_events) = node(3, b"cluster").await;
    let error = one.connect(4, three.local_addr()).await.unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::Handshake(HandshakeError::WrongNode {
                expected: 4,
                found: 3
            })
        ),
        "{error}"
    );
    assert_quiet(&mut one_events).await;
    assert_quiet(&mut two_events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_three_nodes_form_a_full_mesh() {
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(node(id, b"mesh").await);
    }
    for i in 0..3 {
        for j in i + 1..3 {
            nodes[i]
                .0
                .connect(nodes[j].0.node_id(), nodes[j].0.local_addr())
                .await
                .unwrap();
        }
    }
    for (transport, events) in &mut nodes {
        let mut connected = Vec::new();
        for _ in 0..2 {
            match next_event(events).await {
                LinkEvent::Connected { peer, .. } => connected.push(peer),
                other => panic!("expected Connected, got {other:?}"),
            }
        }
        connected.sort();
        let expected: Vec<Peer> = (1..=3)
            .filter(|&id| id != transport.node_id())
            .map(Peer::Node)
            .collect();
        assert_eq!(connected, expected);
    }
    const FRAMES: u64 = 200;
    for index in 0..FRAMES {
        for (transport, _) in &nodes {
            for to in (1..=3).filter(|&id| id != transport.node_id()) {
                let from = transport.node_id();
                transport
                    .send(Peer::Node(to), 0, payload(u64::from(from), index))
                    .await
                    .unwrap();
            }
        }
    }
    for (transport, events) in &mut nodes {
        let mut next = [0u64; 4];
        for _ in 0..2 * FRAMES {
            match next_event(events).await {
                LinkEvent::Frame {
                    peer: Peer::Node(from),
                    bytes,
                    ..
                } => {
                    let index = next[from as usize];
                    assert_eq!(
                        bytes,
                        payload(u64::from(from), index),
                        "at {}",
                        transport.node_id()
                    );
                    next[from as usize] += 1;
                }
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn transport_clients_send_requests_and_get_replies() {
    clients_send_requests_and_get_replies(None).await;
}

#[tokio::test]
async fn transport_local_clients_send_requests_and_get_replies() {
    let dir = LocalDir::new("clients");
    clients_send_requests_and_get_replies(Some(dir.path())).await;
}

async fn clients_send_requests_and_get_replies(dir: Option<&Path>) {
    let (one, mut one_events) = node_in(1, b"cluster", dir).await;
    let mut client =
        ClientConn::connect_via(one.local_addr(), dir, 42, &secret(b"cluster"), Some(1))
            .await
            .unwrap();
    assert_eq!(client.node_id(), 1);
    assert_eq!(client.kind(), kind_with(dir));
    expect_connected(&mut one_events, Peer::Client(42)).await;

    // A second connection under the same client id is refused while the first is up.
    let error = ClientConn::connect_via(one.local_addr(), dir, 42, &secret(b"cluster"), None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ConnectError::Handshake(HandshakeError::Refused(Refusal::Duplicate))
        ),
        "{error}"
    );

    for index in 0..100u64 {
        client.send(0, &index.to_le_bytes()).await.unwrap();
        let request = match next_event(&mut one_events).await {
            LinkEvent::Frame { peer, bytes, .. } => {
                assert_eq!(peer, Peer::Client(42));
                bytes
            }
            other => panic!("expected a request, got {other:?}"),
        };
        assert_eq!(request, Bytes::copy_from_slice(&index.to_le_bytes()));
        let mut reply = b"ok ".to_vec();
        reply.extend_from_slice(&request);
        one.send(Peer::Client(42), 3, Bytes::from(reply.clone()))
            .await
            .unwrap();
        assert_eq!(client.recv().await.unwrap(), (3, Bytes::from(reply)));
    }

    // A message sent in parts arrives as one frame of their bytes in order (its checksum over
    // all of them), a large part written past the link's buffer included.
    let large: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    for parts in [
        vec![&b"head"[..], &large[..]],
        vec![&b""[..], &b"x"[..], &b""[..]],
        vec![&large[..1000], &large[1000..], &b"tail"[..]],
    ] {
        client.send_parts(0, &parts).await.unwrap();
        match next_event(&mut one_events).await {
            LinkEvent::Frame { bytes, .. } => assert_eq!(bytes, parts.concat()),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    let (sender, mut receiver) = client.into_split();
    sender.close().await.unwrap();
    assert_eq!(
        expect_broken(&mut one_events, Peer::Client(42)).await,
        BreakReason::PeerClosed
    );
    // The node drops its side at once, without a bye of its own.
    assert_eq!(receiver.recv().await.unwrap_err(), BreakReason::Eof);
}

#[tokio::test]
async fn transport_send_rejects_oversized_payloads_and_unknown_peers() {
    let (one, _events) = node(1, b"cluster").await;
    let big = Bytes::from(vec![0u8; FRAME_PAYLOAD_MAX + 1]);
    assert_eq!(
        one.send(Peer::Node(2), 0, big.clone()).await,
        Err(SendError::TooLarge(FRAME_PAYLOAD_MAX + 1))
    );
    assert_eq!(
        one.try_send(Peer::Node(2), 0, Bytes::new()),
        Err(SendError::NoLink(Peer::Node(2)))
    );
    assert_eq!(
        one.send(Peer::Client(9), 0, Bytes::new()).await,
        Err(SendError::NoLink(Peer::Client(9)))
    );
}

/// A peer that stops reading makes the sender's queue fill: `try_send` reports it, and memory
/// stays bounded by the link's budget.
#[tokio::test]
async fn transport_a_stalled_peer_fills_the_queue_instead_of_memory() {
    a_stalled_peer_fills_the_queue_instead_of_memory(None).await;
}

#[tokio::test]
async fn transport_a_stalled_local_peer_fills_the_queue_instead_of_memory() {
    let dir = LocalDir::new("stalled");
    a_stalled_peer_fills_the_queue_instead_of_memory(Some(dir.path())).await;
}

async fn a_stalled_peer_fills_the_queue_instead_of_memory(dir: Option<&Path>) {
    let (two, mut two_events) = node_in(2, b"cluster", dir).await;
    let _raw = raw_link(&two, 1, b"cluster", dir).await; // never reads
    expect_connected(&mut two_events, Peer::Node(1)).await;
    let chunk = Bytes::from(vec![1u8; 1 << 20]);
    let mut queued = 0usize;
    loop {
        match two.try_send(Peer::Node(1), 0, chunk.clone()) {
            Ok(()) => queued += 1,
            Err(SendError::Full(_)) => break,
            Err(other) => panic!("unexpected {other}"),
        }
        assert!(
            queued <= LINK_QUEUE_BYTES_MAX / chunk.len() + 64,
            "queue is not bounded"
        );
        tokio::task::yield_now().await;
    }
    assert!(queued > 0);
}

/// Nodes and clients with the same socket directory link over the socket files, report it, and
/// exchange frames; a node without a directory dials over TCP.
#[tokio::test]
async fn transport_nodes_with_a_socket_directory_link_locally() {
    let dir = LocalDir::new("locally");
    let (one, mut one_events) = node_in(1, b"cluster", Some(dir.path())).await;
    let (two, mut two_events) = node_in(2, b"cluster", Some(dir.path())).await;
    one.connect(2, two.local_addr()).await.unwrap();
    let socket = local_socket_path(dir.path(), two.local_addr());
    for events in [&mut one_events, &mut two_events] {
        match next_event(events).await {
            LinkEvent::Connected { addr, .. } => assert_eq!(addr, LinkAddr::Local(socket.clone())),
            other => panic!("expected Connected, got {other:?}"),
        }
    }
    assert_eq!(one.links(), [(Peer::Node(2), LinkKind::Local)]);
    assert_eq!(two.links(), [(Peer::Node(1), LinkKind::Local)]);
    for index in 0..100 {
        one.send(Peer::Node(2), 0, payload(1, index)).await.unwrap();
        match next_event(&mut two_events).await {
            LinkEvent::Frame { bytes, .. } => assert_eq!(bytes, payload(1, index)),
            other => panic!("expected a frame, got {other:?}"),
        }
    }
    // A node without the directory dials the same node over TCP.
    let (zero, mut zero_events) = node_in(0, b"cluster", None).await;
    zero.connect(2, two.local_addr()).await.unwrap();
    match next_event(&mut zero_events).await {
        LinkEvent::Connected { addr, .. } => assert_eq!(addr, LinkAddr::Tcp(two.local_addr())),
        other => panic!("expected Connected, got {other:?}"),
    }
    expect_connected(&mut two_events, Peer::Node(0)).await;
    assert_eq!(
        two.links(),
        [
            (Peer::Node(0), LinkKind::Tcp),
            (Peer::Node(1), LinkKind::Local)
        ]
    );
}

/// A message with a large part crosses a local link lent: the receiver copies the part out of
/// the sender's memory, every message arrives whole and in order among inline ones, and the
/// sender keeps each loan only until the receiver says it copied it. Over TCP nothing is lent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_local_links_lend_large_parts_and_get_each_loan_back() {
    let dir = LocalDir::new("lend");
    let (one, mut one_events) = node_in(1, b"cluster", Some(dir.path())).await;
    let (two, mut two_events) = node_in(2, b"cluster", Some(dir.path())).await;
    one.connect(2, two.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(2)).await;
    expect_connected(&mut two_events, Peer::Node(1)).await;
    // Each end offers at once; the peer's answer comes in its first turn.
    let lends = |t: &Transport, peer| t.lending(Peer::Node(peer)).unwrap().lends;
    eventually(|| (lends(&one, 2) && lends(&two, 1)).then_some(())).await;

    let large: Bytes = (0..300_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let mut expected = Vec::new();
    for index in 0..40u64 {
        let message = if index % 3 == 0 {
            Payload::new(payload(1, index))
        } else {
            Payload::from_parts(vec![
                Bytes::copy_from_slice(&index.to_le_bytes()),
                large.slice(index as usize..),
                Bytes::from_static(b"tail"),
            ])
        };
        expected.push(message.parts().concat());
        one.send_payload(Peer::Node(2), 0, &message).await.unwrap();
    }
    for (index, want) in expected.iter().enumerate() {
        match next_event(&mut two_events).await {
            LinkEvent::Frame { bytes, .. } => assert_eq!(&bytes[..], &want[..], "message {index}"),
            other => panic!("expected a frame, got {other:?}"),
        }
    }
    let lent = expected.len() as u64 - 14; // every message but each third
    let stats = eventually(|| {
        let stats = one.lending(Peer::Node(2)).unwrap();
        (stats.outstanding == 0).then_some(stats)
    })
    .await;
    assert_eq!(stats.lent_frames, lent);
    assert_eq!(two.lending(Peer::Node(1)).unwrap().copied_parts, lent);

    // Over TCP the same node lends nothing.
    let (zero, mut zero_events) = node_in(0, b"cluster", None).await;
    zero.connect(2, two.local_addr()).await.unwrap();
    expect_connected(&mut zero_events, Peer::Node(2)).await;
    expect_connected(&mut two_events, Peer::Node(0)).await;
    assert_eq!(zero.lending(Peer::Node(2)), None);
    assert_eq!(two.lending(Peer::Node(0)), None);
}

/// A client on a local link lends its large requests once the node has read its offer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_a_local_client_lends_its_large_requests() {
    let dir = LocalDir::new("lendclient");
    let (one, mut one_events) = node_in(1, b"cluster", Some(dir.path())).await;
    let client = local_client(&one, dir.path(), 7).await;
    expect_connected(&mut one_events, Peer::Client(7)).await;
    let (mut sender, mut receiver) = client.into_split();
    // The node's answer to the offer reaches the client's receiver, which must be reading.
    let (replies, mut replied) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok(reply) = receiver.recv().await {
            let _ = replies.send(reply).await;
        }
    });
    let large: Bytes = (0..200_000u32)
        .map(|i| (i % 249) as u8)
        .collect::<Vec<u8>>()
        .into();
    let message = [Bytes::from_static(b"head"), large.clone()];
    // Sent inline until the node accepted, lent after: the node gets the same bytes either way.
    let mut index = 0;
    while sender.lent_frames() < 3 {
        assert!(index < 1000, "the client never lent");
        sender.send_payload(0, &message).await.unwrap();
        match next_event(&mut one_events).await {
            LinkEvent::Frame { bytes, .. } => assert_eq!(bytes, message.concat()),
            other => panic!("expected a request, got {other:?}"),
        }
        one.send(Peer::Client(7), 0, Bytes::from_static(b"ok"))
            .await
            .unwrap();
        assert_eq!(
            replied.recv().await.unwrap(),
            (0, Bytes::from_static(b"ok"))
        );
        index += 1;
    }
    eventually(|| (sender.loans_outstanding() == 0).then_some(())).await;
    assert_eq!(one.lending(Peer::Client(7)).unwrap().copied_parts, 3);
}

/// A client that takes loans gets a node's large replies lent, and each loan back once it
/// answers; one that does not gets them inline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_a_local_client_that_takes_loans_gets_large_replies_lent() {
    let dir = LocalDir::new("takeloans");
    let (one, mut one_events) = node_in(1, b"cluster", Some(dir.path())).await;
    let large: Bytes = (0..500_000u32)
        .map(|i| (i % 241) as u8)
        .collect::<Vec<u8>>()
        .into();
    for (id, takes) in [(8u64, true), (9, false)] {
        let client = local_client(&one, dir.path(), id).await;
        if takes {
            client.take_loans();
        }
        expect_connected(&mut one_events, Peer::Client(id)).await;
        let (mut sender, mut receiver) = client.into_split();
        for index in 0..20u64 {
            sender.send(0, &index.to_le_bytes()).await.unwrap();
            match next_event(&mut one_events).await {
                LinkEvent::Frame { bytes, .. } => assert_eq!(&bytes[..], &index.to_le_bytes()),
                other => panic!("expected a request, got {other:?}"),
            }
            let reply = Payload::from_parts(vec![
                Bytes::copy_from_slice(&index.to_le_bytes()),
                large.slice(index as usize..),
            ]);
            one.send_payload(Peer::Client(id), 0, &reply).await.unwrap();
            let (_, got) = receiver.recv().await.unwrap();
            assert_eq!(&got[..], &reply.parts().concat()[..], "reply {index}");
            if receiver.loans_to_answer() {
                sender.answer_loans().await.unwrap();
            }
        }
        let stats = eventually(|| {
            let stats = one.lending(Peer::Client(id)).unwrap();
            (stats.outstanding == 0).then_some(stats)
        })
        .await;
        assert_eq!(stats.lends, takes, "client {id}");
        if takes {
            // Inline until the client's first answer reached the node, lent after.
            assert!(stats.lent_frames >= 15, "{stats:?}");
        } else {
            assert_eq!(stats.lent_frames, 0);
        }
        drop((sender, receiver));
        expect_broken(&mut one_events, Peer::Client(id)).await;
    }
}

/// A socket file nobody listens on (a node that died) makes dialers fall back to TCP; a node
/// that binds the address replaces the stale file, and removes its own at a clean stop.
#[tokio::test]
async fn transport_a_stale_socket_file_falls_back_to_tcp_and_is_replaced() {
    let dir = LocalDir::new("stale");
    std::fs::create_dir_all(dir.path()).unwrap();
    // A TCP-only node, and a stale socket file under its address.
    let (tcp_only, mut tcp_events) = node_in(5, b"cluster", None).await;
    let stale = local_socket_path(dir.path(), tcp_only.local_addr());
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let client = ClientConn::connect_via(
        tcp_only.local_addr(),
        Some(dir.path()),
        7,
        &secret(b"cluster"),
        Some(5),
    )
    .await
    .unwrap();
    assert_eq!(client.kind(), LinkKind::Tcp);
    expect_connected(&mut tcp_events, Peer::Client(7)).await;
    let (one, mut one_events) = node_in(1, b"cluster", Some(dir.path())).await;
    one.connect(5, tcp_only.local_addr()).await.unwrap();
    match next_event(&mut one_events).await {
        LinkEvent::Connected { addr, .. } => {
            assert_eq!(addr, LinkAddr::Tcp(tcp_only.local_addr()))
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    drop(client);
    drop(tcp_only);

    // A node that owns an address replaces a stale socket file of its name.
    let addr = {
        let probe = std::net::TcpListener::bind(loopback()).unwrap();
        probe.local_addr().unwrap()
    };
    let path = local_socket_path(dir.path(), addr);
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let (owner, _owner_events) =
        Transport::bind_with(addr, 6, secret(b"cluster"), Some(dir.path()), None)
            .await
            .unwrap();
    assert_eq!(owner.local_socket(), Some(path.clone()));
    let client = ClientConn::connect_via(addr, Some(dir.path()), 8, &secret(b"cluster"), Some(6))
        .await
        .unwrap();
    assert_eq!(client.kind(), LinkKind::Local);
    owner.close().await;
    assert!(!path.exists(), "a clean stop removes the socket file");
}

/// A socket directory that cannot be used does not stop the node: it serves TCP only.
#[tokio::test]
async fn transport_an_unusable_socket_directory_leaves_tcp_serving() {
    let dir = LocalDir::new("unusable");
    std::fs::create_dir_all(dir.path()).unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let (one, mut one_events) =
        Transport::bind_with(loopback(), 1, secret(b"cluster"), Some(&file), None)
            .await
            .unwrap();
    assert_eq!(one.local_socket(), None);
    let client =
        ClientConn::connect_via(one.local_addr(), Some(&file), 3, &secret(b"cluster"), None)
            .await
            .unwrap();
    assert_eq!(client.kind(), LinkKind::Tcp);
    expect_connected(&mut one_events, Peer::Client(3)).await;
    assert!(check_local_socket_dir(Path::new("/run/derechofs")).is_ok());
    assert!(check_local_socket_dir(Path::new("")).is_ok());
    assert!(check_local_socket_dir(&PathBuf::from("/".repeat(90))).is_err());
}

/// A second node on an address another node listens on fails to bind and leaves the first
/// node's socket file in place and working.
#[tokio::test]
async fn transport_a_second_node_on_a_taken_address_leaves_the_owners_socket_alone() {
    let dir = LocalDir::new("taken");
    let (owner, mut owner_events) = node_in(1, b"cluster", Some(dir.path())).await;
    let taken = Transport::bind_with(
        owner.local_addr(),
        2,
        secret(b"cluster"),
        Some(dir.path()),
        None,
    )
    .await;
    assert!(taken.is_err(), "bound an address another node listens on");
    let client = local_client(&owner, dir.path(), 4).await;
    assert_eq!((client.kind(), client.node_id()), (LinkKind::Local, 1));
    expect_connected(&mut owner_events, Peer::Client(4)).await;
}

/// Nodes whose group settings differ never link: the acceptor refuses the dialer (verdict 5),
/// and the dialer names what differs; nodes that agree link.
#[tokio::test]
async fn transport_nodes_whose_group_settings_differ_do_not_link() {
    use crate::layout::LayoutSpec;
    let settings = |chunk_size: u32| GroupSettings {
        spec: LayoutSpec::default(),
        chunk_size,
    };
    let bind = |id: NodeId, chunk_size: u32| {
        Transport::bind_with(
            loopback(),
            id,
            secret(b"cluster"),
            None,
            Some(settings(chunk_size)),
        )
    };
    let (one, mut one_events) = bind(1, 1 << 20).await.unwrap();
    let (two, mut two_events) = bind(2, 1 << 16).await.unwrap();
    let error = one.connect(2, two.local_addr()).await.unwrap_err();
    match &error {
        ConnectError::Handshake(HandshakeError::SettingsDiffer { peer, differences }) => {
            assert_eq!(*peer, 2);
            assert_eq!(
                differences,
                "layout.chunk_size is 1048576 here and 65536 there"
            );
        }
        other => panic!("expected SettingsDiffer, got {other}"),
    }
    let mut raw = TcpStream::connect(two.local_addr()).await.unwrap();
    let stated = settings(1 << 20);
    let error = handshake::dial(
        &mut raw,
        &secret(b"cluster"),
        Peer::Node(1),
        Some(2),
        0,
        Some(&stated),
    )
    .await
    .unwrap_err();
    // The acceptor refuses with verdict 5, and the dialer names what differs.
    assert!(
        matches!(error, HandshakeError::SettingsDiffer { .. }),
        "{error}"
    );
    // The verdict on the wire, by hand: 5.
    let mut raw = TcpStream::connect(two.local_addr()).await.unwrap();
    let hello = handshake::Hello {
        dialer: Peer::Node(1),
        expected: Some(2),
        view_id: 0,
        nonce: [9; handshake::NONCE_BYTES],
        settings: Some(stated),
    };
    assert_eq!(
        dial_by_hand(&mut raw, hello, b"cluster").await,
        Some(Refusal::SettingsDiffer as u8)
    );
    assert!(!one.is_linked(Peer::Node(2)) && !two.is_linked(Peer::Node(1)));
    assert_quiet(&mut one_events).await;
    assert_quiet(&mut two_events).await;

    // Nodes that agree link.
    let (three, mut three_events) = bind(3, 1 << 20).await.unwrap();
    one.connect(3, three.local_addr()).await.unwrap();
    expect_connected(&mut one_events, Peer::Node(3)).await;
    expect_connected(&mut three_events, Peer::Node(1)).await;
}
