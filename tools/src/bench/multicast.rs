//! `derechofs bench multicast`: raw ordered multicast in one shard of three members, volatile.
//!
//! One process runs three members, each a driver task around its own engine ([`Node`]) and its
//! own TCP [`Transport`] bound on loopback, all on one tokio runtime of two worker threads: the
//! messages go through the real frame codec, checksums, handshakes and kernel sockets, exactly
//! as between node processes. Nothing is persisted: every persist request is confirmed at once.
//! With `--local-socket-dir` the members link over Unix-domain sockets instead, where parts of
//! 64 KiB and more are lent: each receiver copies them with `process_vm_readv(2)` from the
//! sender, here the same process (the same copy as across processes).
//!
//! Every member sends (unless `--senders` says fewer): it keeps up to `--inflight-bytes` of its
//! own messages submitted and not yet delivered back to it, so the engine's window and batching
//! decide the pace. After a warm-up, for `--seconds`, each member counts the messages and
//! payload bytes it delivers (from every sender), and each sender the latency from submitting a
//! message to its delivery at that sender. The row reports the slowest member's delivery rate
//! (what is delivered at *every* member) and the latency percentiles over all senders.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use derechofs_core::transport::{LinkEvent, Payload, Peer, Transport};
use derechofs_core::{
    Action, Config, Hlc, Input, LayoutSpec, Message, Node, NodeId, Request, ShardId, StepError,
    View, REQUEST_BYTES_MAX,
};

use super::histogram::Histogram;
use super::kv::value_label;

use crate::out::{errln, outln};

/// Members of the shard.
const MEMBERS: usize = 3;
/// Engine tick interval, as the node process uses.
const TICK: Duration = Duration::from_millis(2);
/// Time the drivers keep running after the measurement, so the members finish together.
const GRACE: Duration = Duration::from_millis(300);
/// Longest the members may take to link.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// Own messages in flight per sender, whatever their size.
const INFLIGHT_MESSAGES_MAX: usize = 8192;
const SECONDS_MAX: f64 = 3600.0;

/// Arguments of `derechofs bench multicast`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Message sizes in bytes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [100usize, 10 << 10, 1 << 20])]
    sizes: Vec<usize>,
    /// Seconds measured per size, after the warm-up.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of warm-up per size, not measured.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Members that send (the first ones in rank order); all of them deliver.
    #[arg(long, default_value_t = 3)]
    senders: usize,
    /// Bytes of its own messages a sender keeps submitted and not yet delivered.
    #[arg(long, default_value_t = 32 << 20)]
    inflight_bytes: usize,
    /// The engine's window: messages a sender may have outstanding.
    #[arg(long, default_value_t = 16)]
    window: u32,
    /// Bytes of small messages the engine batches into one multicast message.
    #[arg(long, default_value_t = 1 << 20)]
    batch_bytes: usize,
    /// Loopback address the members listen on (ports are picked by the kernel).
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    address: IpAddr,
    /// Link the members over Unix-domain sockets in this directory, where large parts are lent
    /// (docs/ARCHITECTURE.md) instead of sent. Default "": over loopback TCP.
    #[arg(long, default_value = "", value_parser = crate::kv::parse_local_socket_dir_arg)]
    local_socket_dir: crate::kv::LocalSocketDir,
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.address.is_loopback() {
        bail!("--address must be a loopback address, got {}", args.address);
    }
    for (name, value) in [("--seconds", args.seconds), ("--warmup", args.warmup)] {
        if !((0.0..=SECONDS_MAX).contains(&value)) {
            bail!("{name} must be in [0, {SECONDS_MAX}], got {value}");
        }
    }
    if args.seconds == 0.0 {
        bail!("--seconds must be positive");
    }
    if args.sizes.is_empty() || args.sizes.iter().any(|&s| s == 0 || s > REQUEST_BYTES_MAX) {
        bail!("--sizes must each be in 1..={REQUEST_BYTES_MAX}");
    }
    if args.senders == 0 || args.senders > MEMBERS {
        bail!("--senders must be in 1..={MEMBERS}, got {}", args.senders);
    }
    if args.inflight_bytes == 0 {
        bail!("--inflight-bytes must be positive");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    outln!(
        "| message | senders | MB/s delivered (every member) | msg/s delivered (every member) | p50 ms | p99 ms |"
    )?;
    outln!("|---|---:|---:|---:|---:|---:|")?;
    for &size in &args.sizes {
        let result = runtime.block_on(measure(&args, size))?;
        let slowest = result
            .members
            .iter()
            .min_by(|a, b| a.bytes.cmp(&b.bytes))
            .context("no member reported")?;
        let secs = args.seconds;
        outln!(
            "| {} | {} | {:.1} | {:.0} | {:.3} | {:.3} |",
            value_label(size),
            args.senders,
            slowest.bytes as f64 / secs / 1e6,
            slowest.messages as f64 / secs,
            result.latency.percentile_ms(50.0),
            result.latency.percentile_ms(99.0),
        )?;
        let each: Vec<String> = result
            .members
            .iter()
            .map(|m| {
                format!(
                    "node {}: {:.1} MB/s, {:.0} msg/s, {} batches, {} nulls",
                    m.id,
                    m.bytes as f64 / secs / 1e6,
                    m.messages as f64 / secs,
                    m.batches,
                    m.nulls
                )
            })
            .collect();
        errln!(
            "# {}: {}; {} latency samples",
            value_label(size),
            each.join("; "),
            result.latency.count()
        );
    }
    Ok(())
}

/// What one member measured.
#[derive(Debug, Default)]
struct MemberResult {
    id: NodeId,
    /// Payload bytes and messages delivered during the measurement.
    bytes: u64,
    messages: u64,
    /// Multicast messages with requests, and nulls, this member sent over the whole run.
    batches: u64,
    nulls: u64,
    latency: Histogram,
}

#[derive(Debug)]
struct RunResult {
    members: Vec<MemberResult>,
    latency: Histogram,
}

async fn measure(args: &Args, size: usize) -> anyhow::Result<RunResult> {
    let secret = crate::kv::secret(&None)?;
    let ids: Vec<NodeId> = (1..=MEMBERS as NodeId).collect();
    let mut bound = Vec::new();
    for &id in &ids {
        let (transport, events) = Transport::bind_with(
            SocketAddr::new(args.address, 0),
            id,
            secret.clone(),
            args.local_socket_dir.0.as_deref(),
            None,
        )
        .await
        .with_context(|| format!("listening on {}", args.address))?;
        transport.set_view(1);
        bound.push((Arc::new(transport), events));
    }
    // The lower id dials; each connect returns once its link is up.
    for (i, (transport, _)) in bound.iter().enumerate() {
        for (peer, (other, _)) in bound.iter().enumerate().skip(i + 1) {
            tokio::time::timeout(
                LINK_TIMEOUT,
                transport.connect(ids[peer], other.local_addr()),
            )
            .await
            .context("linking the members timed out")?
            .with_context(|| format!("linking node {} with node {}", ids[i], ids[peer]))?;
        }
    }
    if args.local_socket_dir.0.is_some() {
        for (transport, _) in &bound {
            if let Some((peer, kind)) = transport
                .links()
                .into_iter()
                .find(|(_, kind)| *kind != derechofs_core::transport::LinkKind::Local)
            {
                bail!("the link with {peer:?} runs over {kind}, not the local socket directory");
            }
        }
    }
    let spec = LayoutSpec {
        namespace_shards: 0,
        data_shards: 1,
        replicas: MEMBERS as u16,
        replicas_min: 2,
    };
    let view = View::initial(1, ids.clone(), spec)?;
    let shard = view.layout.shards()[0].id;
    let payload = Bytes::from(vec![0xA5u8; size]);
    let inflight = (args.inflight_bytes / size).clamp(2, INFLIGHT_MESSAGES_MAX);
    let t0 = Instant::now();
    let from = t0 + Duration::from_secs_f64(args.warmup);
    let until = from + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for (rank, (transport, events)) in bound.into_iter().enumerate() {
        let config = Config {
            window: args.window,
            batch_bytes_max: args.batch_bytes,
            suspect_after_ms: 5000,
            ..Config::new(ids[rank])
        };
        let node = Node::new(config, view.clone())?;
        let member = Member {
            id: ids[rank],
            node,
            transport,
            shard,
            sender: rank < args.senders,
            payload: payload.clone(),
            inflight,
            submitted: VecDeque::new(),
            next_id: 1,
            from,
            until,
            result: MemberResult {
                id: ids[rank],
                ..MemberResult::default()
            },
            last_encoded: None,
        };
        tasks.push(tokio::spawn(member.run(events)));
    }
    let mut members = Vec::new();
    let mut latency = Histogram::default();
    for task in tasks {
        let result = task.await.context("a member task failed")??;
        latency.merge(&result.latency);
        members.push(result);
    }
    Ok(RunResult { members, latency })
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One member: its engine, its transport, and what it measures.
struct Member {
    id: NodeId,
    node: Node,
    transport: Arc<Transport>,
    shard: ShardId,
    sender: bool,
    payload: Bytes,
    inflight: usize,
    /// Own messages submitted and not yet delivered here, oldest first: id and submit time.
    submitted: VecDeque<(u64, Instant)>,
    next_id: u64,
    from: Instant,
    until: Instant,
    result: MemberResult,
    /// The last data message encoded (view, shard, sender index) and its bytes: a multicast
    /// goes to every peer as the same message, encoded once.
    last_encoded: Option<((u32, ShardId, u64), Payload)>,
}

impl Member {
    async fn run(
        mut self,
        mut events: tokio::sync::mpsc::Receiver<LinkEvent>,
    ) -> anyhow::Result<MemberResult> {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let end = tokio::time::Instant::from(self.until + GRACE);
        self.step(Input::Tick).await?;
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(LinkEvent::Frame { peer: Peer::Node(from), bytes, .. }) => {
                        let message = Message::decode(&bytes)
                            .map_err(|e| anyhow::anyhow!("node {}: undecodable message from {from}: {e}", self.id))?;
                        // A refused message shows in the engine's counters; the run goes on.
                        let _refused = self.step(Input::Message { from, message }).await?;
                    }
                    // A member that finished first closes its links.
                    Some(LinkEvent::Broken { .. }) if Instant::now() >= self.until => break,
                    Some(LinkEvent::Broken { peer, reason }) => {
                        bail!("node {}: the link with {peer:?} broke: {reason}", self.id)
                    }
                    Some(_) => {}
                    None => bail!("node {}: the transport stopped", self.id),
                },
                _ = ticker.tick() => {
                    self.step(Input::Tick).await?;
                }
                _ = tokio::time::sleep_until(end) => break,
            }
            self.top_up().await?;
        }
        let counters = self.node.counters();
        self.result.batches = counters.batches_sent;
        self.result.nulls = counters.nulls_sent;
        Ok(self.result)
    }

    /// Submits own messages until `inflight` are on their way, while the run lasts.
    async fn top_up(&mut self) -> anyhow::Result<()> {
        if !self.sender || Instant::now() >= self.until {
            return Ok(());
        }
        while self.submitted.len() < self.inflight {
            let id = self.next_id;
            let request = Request {
                id,
                client_hlc: Hlc::ZERO,
                payload: self.payload.clone(),
            };
            let input = Input::Submit {
                shard: self.shard,
                request,
                durable: false,
            };
            match self.step(input).await? {
                None => {
                    self.next_id += 1;
                    self.submitted.push_back((id, Instant::now()));
                }
                // The engine's queue is full: the window is closed; wait for deliveries.
                Some(StepError::Submit(_)) => break,
                Some(e) => bail!("node {}: {e}", self.id),
            }
        }
        Ok(())
    }

    /// Steps the engine and carries out its actions (persist requests are confirmed at once:
    /// nothing is persisted); returns the step's own error.
    async fn step(&mut self, input: Input) -> anyhow::Result<Option<StepError>> {
        let mut actions = Vec::new();
        let error = self.node.step(now_us(), input, &mut actions).err();
        let mut persisted = Vec::new();
        self.carry_out(actions, &mut persisted).await?;
        while let Some((shard, version)) = persisted.pop() {
            let mut actions = Vec::new();
            if let Err(e) =
                self.node
                    .step(now_us(), Input::Persisted { shard, version }, &mut actions)
            {
                bail!("node {}: {e}", self.id);
            }
            self.carry_out(actions, &mut persisted).await?;
        }
        Ok(error)
    }

    async fn carry_out(
        &mut self,
        actions: Vec<Action>,
        persisted: &mut Vec<(ShardId, u64)>,
    ) -> anyhow::Result<()> {
        for action in actions {
            match action {
                Action::Send { to, message } => {
                    let view_id = message.view_id();
                    let payload = self.encode(&message);
                    // A link that went away is reported as an event, which ends the run.
                    let _ = self
                        .transport
                        .send_payload(Peer::Node(to), view_id, &payload)
                        .await;
                }
                Action::Deliver { deliveries, .. } => {
                    let now = Instant::now();
                    let counting = now >= self.from && now < self.until;
                    for d in deliveries {
                        for request in &d.requests {
                            if counting {
                                self.result.messages += 1;
                                self.result.bytes += request.payload.len() as u64;
                            }
                            if d.sender == self.id {
                                let (id, submitted) = self
                                    .submitted
                                    .pop_front()
                                    .context("a delivery of an own message never submitted")?;
                                anyhow::ensure!(
                                    id == request.id,
                                    "own messages delivered out of order: {} before {id}",
                                    request.id
                                );
                                if submitted >= self.from && now < self.until {
                                    self.result.latency.record(now - submitted);
                                }
                            }
                        }
                    }
                }
                Action::Persist { shard, version } => persisted.push((shard, version)),
                Action::Suspect { node } => {
                    bail!(
                        "node {} suspected node {node}: the run is not valid",
                        self.id
                    )
                }
                Action::Wedge => bail!("node {} wedged: the run is not valid", self.id),
                other => bail!("node {}: unexpected action {other:?}", self.id),
            }
        }
        Ok(())
    }

    /// The message's bytes and checksum; a data message multicast to several peers is encoded
    /// and checksummed once.
    fn encode(&mut self, message: &Message) -> Payload {
        if let Message::Data {
            view_id,
            shard,
            index,
            ..
        } = message
        {
            let key = (*view_id, *shard, *index);
            if let Some((last, payload)) = &self.last_encoded {
                if *last == key {
                    return payload.clone();
                }
            }
            let payload = Payload::from_parts(message.to_parts());
            self.last_encoded = Some((key, payload.clone()));
            return payload;
        }
        Payload::new(Bytes::from(message.to_bytes()))
    }
}
