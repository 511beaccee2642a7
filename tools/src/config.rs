//! The node configuration: `derechofs.toml`, one file per node (DESIGN §7, `docs/CONFIG.md`).
//!
//! Every key has a default, so a node can start with no file at all and a few flags
//! ([`Overrides`]). A file is read strictly: an unknown key, a value of the wrong type and a value
//! out of its range are errors that name the key and the line it is on. A value given by a flag is
//! checked the same way and its error names the flag.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use derechofs_core::transport::{check_local_socket_dir, Secret, LOCAL_SOCKET_DIR_DEFAULT};
use derechofs_core::{
    LayoutSpec, NodeId, BATCH_BYTES_MAX, SHARDS_MAX, SHARD_MEMBERS_MAX, VIEW_MEMBERS_MAX,
    WINDOW_MAX,
};
use derechofs_storage::SyncPolicy;
use serde::Deserialize;
use toml::Spanned;

/// The configuration file's conventional name.
#[allow(dead_code)]
pub const CONFIG_FILE_NAME: &str = "derechofs.toml";
/// Bytes of a configuration file.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1 << 20;
/// Bytes of a secret file.
pub const SECRET_FILE_BYTES_MAX: u64 = 64 << 10;
/// Bounds of `layout.chunk_size`, which must also be a power of two.
pub const CHUNK_SIZE_MIN: u64 = 4 << 10;
/// See [`CHUNK_SIZE_MIN`].
pub const CHUNK_SIZE_MAX: u64 = 64 << 20;
/// Bound of `heartbeat_ms`.
pub const HEARTBEAT_MS_MAX: u64 = 60_000;
/// Bound of `suspect_after_ms`.
pub const SUSPECT_AFTER_MS_MAX: u64 = 3_600_000;
/// Bound of `time_read_wait_ms`.
pub const TIME_READ_WAIT_MS_MAX: u64 = 600_000;
/// Bound of `persistence.batch_ms`.
pub const PERSIST_BATCH_MS_MAX: u64 = 60_000;
/// Contact nodes listed.
pub const CONTACTS_MAX: usize = VIEW_MEMBERS_MAX;

/// How long history is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Every version is kept.
    Forever,
    /// Versions older than this are trimmed, keeping each key's state at the horizon.
    Keep(Duration),
}

/// Which network carries the links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP with tokio.
    Tcp,
    /// libfabric RDM endpoints, with `transport.provider`.
    Fabric,
}

/// The shard layout of the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutConfig {
    /// Shards of the namespace subgroup.
    pub namespace_shards: u16,
    /// Shards of the data subgroup.
    pub data_shards: u16,
    /// Members per shard.
    pub replicas: u16,
    /// Members below which a shard, and so a view, is inadequate.
    pub replicas_min: u16,
    /// Bytes of a file chunk: a power of two within [`CHUNK_SIZE_MIN`]..=[`CHUNK_SIZE_MAX`].
    pub chunk_size: u64,
}

/// Everything a node is configured with. See `docs/CONFIG.md` for each key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// `node_id`.
    pub node_id: NodeId,
    /// `listen`: the one port for peers and clients.
    pub listen: SocketAddr,
    /// `data_dir`.
    pub data_dir: PathBuf,
    /// `contacts`: `host:port` of members to join through.
    pub contacts: Vec<String>,
    /// `secret_file`.
    pub secret_file: Option<PathBuf>,
    /// `members`: the initial view, in rank order. Empty: this node alone, at `listen`.
    pub members: Vec<Member>,
    /// `heartbeat_ms`.
    pub heartbeat_ms: u64,
    /// `suspect_after_ms`.
    pub suspect_after_ms: u64,
    /// `partition_safety`.
    pub partition_safety: bool,
    /// `time_read_wait_ms`.
    pub time_read_wait_ms: u64,
    /// `window`.
    pub window: u32,
    /// `batch_bytes`.
    pub batch_bytes: usize,
    /// `retention`.
    pub retention: Retention,
    /// `[layout]`.
    pub layout: LayoutConfig,
    /// `transport.kind`.
    pub transport: TransportKind,
    /// `transport.provider`.
    pub provider: String,
    /// `transport.local_socket_dir`: where this node's socket file for local links is, and
    /// where it looks for its peers'. `None` (set as `""`): TCP only.
    pub local_socket_dir: Option<PathBuf>,
    /// `persistence.policy` and `persistence.batch_ms`.
    pub persistence: SyncPolicy,
    /// Where each key that is not a default was set, for error messages.
    origins: BTreeMap<&'static str, Origin>,
}

/// A member of the initial view: its id and the address peers and clients reach it at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The member's `node_id`.
    pub id: NodeId,
    /// Its one port, as reachable from the other members and the clients.
    pub addr: SocketAddr,
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Origin {
    File {
        path: String,
        line: usize,
        column: usize,
    },
    Flag(&'static str),
}

impl Default for NodeConfig {
    fn default() -> NodeConfig {
        let engine = derechofs_core::Config::new(0);
        let spec = LayoutSpec::default();
        NodeConfig {
            node_id: 0,
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("derechofs-data"),
            contacts: Vec::new(),
            secret_file: None,
            members: Vec::new(),
            heartbeat_ms: engine.heartbeat_ms,
            suspect_after_ms: engine.suspect_after_ms,
            partition_safety: true,
            time_read_wait_ms: 2_000,
            window: engine.window,
            batch_bytes: engine.batch_bytes_max,
            retention: Retention::Forever,
            layout: LayoutConfig {
                namespace_shards: spec.namespace_shards,
                data_shards: spec.data_shards,
                replicas: spec.replicas,
                replicas_min: spec.replicas_min,
                chunk_size: 1 << 20,
            },
            transport: TransportKind::Tcp,
            provider: "tcp;ofi_rxm".to_string(),
            local_socket_dir: Some(PathBuf::from(LOCAL_SOCKET_DIR_DEFAULT)),
            persistence: SyncPolicy::Fsync,
            origins: BTreeMap::new(),
        }
    }
}

/// A configuration error: the key, where it was set, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, the flag, or `defaults`.
    pub origin: String,
    /// Line and column in the file (1-based), when the error is in a file.
    pub position: Option<(usize, usize)>,
    /// The key, with its table (`layout.replicas`), when known.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Values given on the command line; each replaces the file's value.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct Overrides {
    /// This node's id (`node_id`).
    #[arg(long)]
    pub node_id: Option<NodeId>,
    /// Address for peers and clients (`listen`).
    #[arg(long)]
    pub listen: Option<String>,
    /// Data directory (`data_dir`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A member to join through, `host:port`; repeat for several (`contacts`).
    #[arg(long = "contact")]
    pub contacts: Vec<String>,
    /// File holding the cluster secret (`secret_file`).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
}

// The file as written: every key optional, with its position kept for error messages.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    node_id: Option<Spanned<NodeId>>,
    listen: Option<Spanned<String>>,
    data_dir: Option<Spanned<String>>,
    contacts: Option<Spanned<Vec<String>>>,
    secret_file: Option<Spanned<String>>,
    members: Option<Spanned<Vec<RawMember>>>,
    heartbeat_ms: Option<Spanned<u64>>,
    suspect_after_ms: Option<Spanned<u64>>,
    partition_safety: Option<Spanned<bool>>,
    time_read_wait_ms: Option<Spanned<u64>>,
    window: Option<Spanned<u32>>,
    batch_bytes: Option<Spanned<u64>>,
    retention: Option<Spanned<String>>,
    layout: Option<RawLayout>,
    transport: Option<RawTransport>,
    persistence: Option<RawPersistence>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    id: NodeId,
    addr: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLayout {
    namespace_shards: Option<Spanned<u16>>,
    data_shards: Option<Spanned<u16>>,
    replicas: Option<Spanned<u16>>,
    replicas_min: Option<Spanned<u16>>,
    chunk_size: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransport {
    kind: Option<Spanned<String>>,
    provider: Option<Spanned<String>>,
    local_socket_dir: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPersistence {
    policy: Option<Spanned<String>>,
    batch_ms: Option<Spanned<u64>>,
}

/// 1-based line and column of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The dotted key whose value (or name) is at `offset`: the key of the nearest `key = ` line at
/// or above it, with the table header above that. Good enough to name the key of a TOML error.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let (line, _) = position(text, offset);
    let lines: Vec<&str> = text.lines().take(line).collect();
    let mut key = None;
    for l in lines.iter().rev() {
        let l = l.trim();
        if let Some(header) = l.strip_prefix('[') {
            let table = header.trim_start_matches('[').split(']').next()?.trim();
            let table = table.trim_matches('"');
            return Some(match key {
                Some(key) => format!("{table}.{key}"),
                None => table.to_string(),
            });
        }
        if key.is_none() {
            if let Some((name, _)) = l.split_once('=') {
                let name = name.trim().trim_matches('"');
                if !name.is_empty() && !name.starts_with('#') {
                    key = Some(name.to_string());
                }
            }
        }
    }
    key
}

struct Reader<'a> {
    path: &'a str,
    text: &'a str,
    origins: BTreeMap<&'static str, Origin>,
}

impl Reader<'_> {
    fn error(&self, key: &str, span: std::ops::Range<usize>, message: String) -> ConfigError {
        ConfigError {
            origin: self.path.to_string(),
            position: Some(position(self.text, span.start)),
            key: Some(key.to_string()),
            message,
        }
    }

    /// Takes a value, remembering where it was.
    fn take<T>(&mut self, key: &'static str, value: Option<Spanned<T>>) -> Option<Spanned<T>> {
        if let Some(value) = &value {
            let (line, column) = position(self.text, value.span().start);
            let path = self.path.to_string();
            self.origins
                .insert(key, Origin::File { path, line, column });
        }
        value
    }

    fn set<T>(&mut self, key: &'static str, value: Option<Spanned<T>>, into: &mut T) {
        if let Some(value) = self.take(key, value) {
            *into = value.into_inner();
        }
    }

    fn set_with<T, U>(
        &mut self,
        key: &'static str,
        value: Option<Spanned<T>>,
        into: &mut U,
        parse: impl FnOnce(T) -> Result<U, String>,
    ) -> Result<(), ConfigError> {
        if let Some(value) = self.take(key, value) {
            let span = value.span();
            *into = parse(value.into_inner()).map_err(|m| self.error(key, span, m))?;
        }
        Ok(())
    }
}

fn parse_listen(text: String) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("`{text}` is not an address with a port, such as 0.0.0.0:7070"))
}

fn parse_contact(text: &str) -> Result<(), String> {
    let bad = || format!("`{text}` is not a `host:port` address");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    port.parse::<u16>().map_err(|_| bad())?;
    Ok(())
}

fn parse_path(text: String) -> Result<PathBuf, String> {
    if text.is_empty() {
        return Err("must not be empty".to_string());
    }
    Ok(PathBuf::from(text))
}

/// `"forever"`, or a positive count with a unit: `s`, `m`, `h`, `d` (`"30d"`).
pub fn parse_retention(text: &str) -> Result<Retention, String> {
    if text == "forever" {
        return Ok(Retention::Forever);
    }
    let bad = || {
        format!(
            "`{text}` is neither \"forever\" nor a count with a unit (s, m, h, d), such as \"30d\""
        )
    };
    let unit_at = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (count, unit) = text.split_at(unit_at);
    let count: u64 = count.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    if count == 0 {
        return Err("must be positive; write \"forever\" to keep every version".to_string());
    }
    let total = count
        .checked_mul(seconds)
        .ok_or_else(|| format!("`{text}` is too long"))?;
    Ok(Retention::Keep(Duration::from_secs(total)))
}

/// A directory of local sockets from outside input: `""` turns them off.
pub fn parse_local_socket_dir(text: &str) -> Result<Option<PathBuf>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let dir = PathBuf::from(text);
    check_local_socket_dir(&dir)?;
    Ok(Some(dir))
}

fn parse_transport(text: String) -> Result<TransportKind, String> {
    match text.as_str() {
        "tcp" => Ok(TransportKind::Tcp),
        "fabric" => Ok(TransportKind::Fabric),
        _ => Err(format!("`{text}` is not one of \"tcp\", \"fabric\"")),
    }
}

impl NodeConfig {
    /// Reads a configuration file, applies `overrides`, and checks the result. With no file,
    /// starts from the defaults.
    pub fn resolve(path: Option<&Path>, overrides: &Overrides) -> Result<NodeConfig, ConfigError> {
        let mut config = match path {
            Some(path) => NodeConfig::load(path)?,
            None => NodeConfig::default(),
        };
        config.apply(overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a configuration file, without the cross-key checks of
    /// [`NodeConfig::validate`].
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let name = path.display().to_string();
        let read_error = |message: String| ConfigError {
            origin: name.clone(),
            position: None,
            key: None,
            message,
        };
        let metadata =
            std::fs::metadata(path).map_err(|e| read_error(format!("cannot read: {e}")))?;
        if metadata.len() > CONFIG_FILE_BYTES_MAX {
            return Err(read_error(format!(
                "{} bytes is more than a configuration file may hold ({CONFIG_FILE_BYTES_MAX})",
                metadata.len()
            )));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| read_error(format!("cannot read: {e}")))?;
        NodeConfig::parse(&name, &text)
    }

    /// Parses the text of a configuration file named `name` (used in error messages).
    pub fn parse(name: &str, text: &str) -> Result<NodeConfig, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let span = e.span();
            ConfigError {
                origin: name.to_string(),
                position: span.as_ref().map(|s| position(text, s.start)),
                key: span.and_then(|s| key_at(text, s.start)),
                message: e.message().trim_end().to_string(),
            }
        })?;
        let mut config = NodeConfig::default();
        let mut r = Reader {
            path: name,
            text,
            origins: BTreeMap::new(),
        };
        r.set("node_id", raw.node_id, &mut config.node_id);
        r.set_with("listen", raw.listen, &mut config.listen, parse_listen)?;
        r.set_with("data_dir", raw.data_dir, &mut config.data_dir, parse_path)?;
        r.set("contacts", raw.contacts, &mut config.contacts);
        let mut secret_file = None;
        r.set_with("secret_file", raw.secret_file, &mut secret_file, |t| {
            parse_path(t).map(Some)
        })?;
        config.secret_file = secret_file;
        r.set_with("members", raw.members, &mut config.members, |members| {
            members
                .into_iter()
                .map(|m| {
                    let addr = parse_listen(m.addr).map_err(|e| format!("member {}: {e}", m.id))?;
                    Ok(Member { id: m.id, addr })
                })
                .collect()
        })?;
        r.set("heartbeat_ms", raw.heartbeat_ms, &mut config.heartbeat_ms);
        r.set(
            "suspect_after_ms",
            raw.suspect_after_ms,
            &mut config.suspect_after_ms,
        );
        r.set(
            "partition_safety",
            raw.partition_safety,
            &mut config.partition_safety,
        );
        r.set(
            "time_read_wait_ms",
            raw.time_read_wait_ms,
            &mut config.time_read_wait_ms,
        );
        r.set("window", raw.window, &mut config.window);
        r.set_with(
            "batch_bytes",
            raw.batch_bytes,
            &mut config.batch_bytes,
            |n| usize::try_from(n).map_err(|_| format!("{n} is too large")),
        )?;
        r.set_with("retention", raw.retention, &mut config.retention, |t| {
            parse_retention(&t)
        })?;

        let layout = raw.layout.unwrap_or_default();
        let l = &mut config.layout;
        r.set(
            "layout.namespace_shards",
            layout.namespace_shards,
            &mut l.namespace_shards,
        );
        r.set("layout.data_shards", layout.data_shards, &mut l.data_shards);
        let replicas_given = layout.replicas.is_some();
        r.set("layout.replicas", layout.replicas, &mut l.replicas);
        if replicas_given {
            // A majority of each shard, unless the file says otherwise below.
            l.replicas_min = l.replicas / 2 + 1;
        }
        r.set(
            "layout.replicas_min",
            layout.replicas_min,
            &mut l.replicas_min,
        );
        r.set("layout.chunk_size", layout.chunk_size, &mut l.chunk_size);

        let transport = raw.transport.unwrap_or_default();
        r.set_with(
            "transport.kind",
            transport.kind,
            &mut config.transport,
            parse_transport,
        )?;
        r.set(
            "transport.provider",
            transport.provider,
            &mut config.provider,
        );
        r.set_with(
            "transport.local_socket_dir",
            transport.local_socket_dir,
            &mut config.local_socket_dir,
            |t| parse_local_socket_dir(&t),
        )?;

        let persistence = raw.persistence.unwrap_or_default();
        let batch_ms = r.take("persistence.batch_ms", persistence.batch_ms);
        let policy = r.take("persistence.policy", persistence.policy);
        let batch = batch_ms.as_ref().map(|b| *b.get_ref());
        if let Some(policy) = policy {
            let span = policy.span();
            config.persistence = match policy.get_ref().as_str() {
                "fsync" => SyncPolicy::Fsync,
                "batch" => SyncPolicy::BatchMs(batch.unwrap_or(PERSIST_BATCH_MS_DEFAULT)),
                "none" => SyncPolicy::None,
                other => {
                    let message = format!("`{other}` is not one of \"fsync\", \"batch\", \"none\"");
                    return Err(r.error("persistence.policy", span, message));
                }
            };
        }
        if let Some(batch_ms) = batch_ms {
            if !matches!(config.persistence, SyncPolicy::BatchMs(_)) {
                let message = "applies only with policy = \"batch\"".to_string();
                return Err(r.error("persistence.batch_ms", batch_ms.span(), message));
            }
        }
        for (index, contact) in config.contacts.iter().enumerate() {
            if let Err(message) = parse_contact(contact) {
                let origin = r.origins.get("contacts").cloned();
                let mut error = origin_error("contacts", origin.as_ref(), message);
                error.key = Some(format!("contacts[{index}]"));
                return Err(error);
            }
        }
        config.origins = r.origins;
        Ok(config)
    }

    /// Replaces values with those given on the command line; a flag's value that does not
    /// parse is an error naming the flag.
    pub fn apply(&mut self, overrides: &Overrides) -> Result<(), ConfigError> {
        if let Some(node_id) = overrides.node_id {
            self.node_id = node_id;
            self.origins.insert("node_id", Origin::Flag("--node-id"));
        }
        if let Some(listen) = &overrides.listen {
            let origin = Origin::Flag("--listen");
            self.listen = parse_listen(listen.clone())
                .map_err(|m| origin_error("listen", Some(&origin), m))?;
            self.origins.insert("listen", origin);
        }
        if let Some(data_dir) = &overrides.data_dir {
            self.data_dir = data_dir.clone();
            self.origins.insert("data_dir", Origin::Flag("--data-dir"));
        }
        if !overrides.contacts.is_empty() {
            let origin = Origin::Flag("--contact");
            for contact in &overrides.contacts {
                parse_contact(contact).map_err(|m| origin_error("contacts", Some(&origin), m))?;
            }
            self.contacts = overrides.contacts.clone();
            self.origins.insert("contacts", origin);
        }
        if let Some(secret_file) = &overrides.secret_file {
            self.secret_file = Some(secret_file.clone());
            self.origins
                .insert("secret_file", Origin::Flag("--secret-file"));
        }
        Ok(())
    }

    /// An error about `key`, placed where its value was set.
    fn error(&self, key: &'static str, message: String) -> ConfigError {
        origin_error(key, self.origins.get(key), message)
    }

    /// Checks every value against its bounds and the keys against each other, and that the
    /// secret file, if any, can be read.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |key: &'static str, value: u64, min: u64, max: u64| {
            if value < min || value > max {
                Err(self.error(key, format!("must be between {min} and {max}, not {value}")))
            } else {
                Ok(())
            }
        };
        range("heartbeat_ms", self.heartbeat_ms, 1, HEARTBEAT_MS_MAX)?;
        range(
            "suspect_after_ms",
            self.suspect_after_ms,
            2,
            SUSPECT_AFTER_MS_MAX,
        )?;
        if self.suspect_after_ms <= self.heartbeat_ms {
            let message = format!(
                "must exceed heartbeat_ms ({}), or every peer is suspected between heartbeats",
                self.heartbeat_ms
            );
            return Err(self.error("suspect_after_ms", message));
        }
        range(
            "time_read_wait_ms",
            self.time_read_wait_ms,
            0,
            TIME_READ_WAIT_MS_MAX,
        )?;
        range("window", u64::from(self.window), 1, u64::from(WINDOW_MAX))?;
        range(
            "batch_bytes",
            self.batch_bytes as u64,
            1,
            BATCH_BYTES_MAX as u64,
        )?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(self.error("data_dir", "must not be empty".to_string()));
        }
        if self.contacts.len() > CONTACTS_MAX {
            let message = format!(
                "lists {} nodes, at most {CONTACTS_MAX}",
                self.contacts.len()
            );
            return Err(self.error("contacts", message));
        }
        if self.members.len() > VIEW_MEMBERS_MAX {
            let message = format!(
                "lists {} members, at most {VIEW_MEMBERS_MAX}",
                self.members.len()
            );
            return Err(self.error("members", message));
        }
        for (index, member) in self.members.iter().enumerate() {
            if self.members[..index].iter().any(|m| m.id == member.id) {
                let message = format!("node {} is listed twice", member.id);
                return Err(self.error("members", message));
            }
        }
        if self.joins() {
            // A node not in `members` joins the group and announces `listen` to it.
            if self.listen.ip().is_unspecified() {
                let message = format!(
                    "{} is not an address the members can reach: node {} is not in `members`, \
                     so it joins and announces `listen` to the group, which must be a specific \
                     address",
                    self.listen, self.node_id
                );
                return Err(self.error("listen", message));
            }
            if let Some(m) = self.members.iter().find(|m| m.addr == self.listen) {
                let message = format!(
                    "{} is the address of member {} in `members`; node {} is not in `members`",
                    self.listen, m.id, self.node_id
                );
                return Err(self.error("listen", message));
            }
            for (index, contact) in self.contacts.iter().enumerate() {
                if self.member_at(contact).is_none() {
                    let origin = self.origins.get("contacts").cloned();
                    let message = format!(
                        "`{contact}` is not the address of a node in `members`: a node that is \
                         not in `members` joins through members listed there"
                    );
                    let mut error = origin_error("contacts", origin.as_ref(), message);
                    error.key = Some(format!("contacts[{index}]"));
                    return Err(error);
                }
            }
        }

        let layout = &self.layout;
        let shards = SHARDS_MAX as u64;
        range(
            "layout.namespace_shards",
            u64::from(layout.namespace_shards),
            1,
            shards,
        )?;
        range(
            "layout.data_shards",
            u64::from(layout.data_shards),
            1,
            shards,
        )?;
        let total = u64::from(layout.namespace_shards) + u64::from(layout.data_shards);
        if total > shards {
            let message = format!("namespace and data shards add up to {total}, above {shards}");
            return Err(self.error("layout.data_shards", message));
        }
        range(
            "layout.replicas",
            u64::from(layout.replicas),
            1,
            SHARD_MEMBERS_MAX as u64,
        )?;
        range(
            "layout.replicas_min",
            u64::from(layout.replicas_min),
            1,
            u64::from(layout.replicas),
        )?;
        let chunk = layout.chunk_size;
        range("layout.chunk_size", chunk, CHUNK_SIZE_MIN, CHUNK_SIZE_MAX)?;
        if !chunk.is_power_of_two() {
            return Err(self.error(
                "layout.chunk_size",
                format!("{chunk} is not a power of two"),
            ));
        }

        if let Retention::Keep(_) = self.retention {
            // Trimming by age is not wired into the node yet (and a member whose log was
            // trimmed could not yet serve a joiner from before its horizon): a node that took
            // the setting and kept everything would pretend.
            let message = "trimming history by age is not available yet: a node keeps every \
                           version; use \"forever\" (the default)";
            return Err(self.error("retention", message.to_string()));
        }
        if !self.partition_safety {
            let message = "`false` is not supported: the engine always needs a majority of the \
                           previous view to install the next one";
            return Err(self.error("partition_safety", message.to_string()));
        }
        if self.transport == TransportKind::Fabric {
            // The design's libfabric transport is not written yet: a node that ran TCP when
            // told `fabric` would pretend, so the value is refused until the transport exists.
            let message = "`fabric` is not available: this build has no libfabric transport \
                           (docs/CONFIG.md); use \"tcp\"";
            return Err(self.error("transport.kind", message.to_string()));
        }
        if let SyncPolicy::BatchMs(ms) = self.persistence {
            range("persistence.batch_ms", ms, 1, PERSIST_BATCH_MS_MAX)?;
        }
        if self.secret_file.is_none() && !self.listen.ip().is_loopback() {
            let message = format!(
                "is required when listen ({}) is not a loopback address",
                self.listen
            );
            // Placed where `listen` was set: that is what made the secret necessary.
            return Err(origin_error(
                "secret_file",
                self.origins.get("listen"),
                message,
            ));
        }
        self.secret().map(|_| ())
    }

    /// The cluster secret: the bytes of `secret_file` less trailing whitespace, or, when no
    /// file is set, a fixed development secret (only for nodes listening on loopback, which
    /// [`NodeConfig::validate`] enforces).
    pub fn secret(&self) -> Result<Secret, ConfigError> {
        let Some(path) = &self.secret_file else {
            return Ok(Secret::new(DEVELOPMENT_SECRET).expect("not empty"));
        };
        let unreadable = |e: std::io::Error| {
            self.error(
                "secret_file",
                format!("cannot read {}: {e}", path.display()),
            )
        };
        let size = std::fs::metadata(path).map_err(unreadable)?.len();
        if size > SECRET_FILE_BYTES_MAX {
            let message = format!(
                "{} holds {size} bytes, more than a secret may ({SECRET_FILE_BYTES_MAX})",
                path.display()
            );
            return Err(self.error("secret_file", message));
        }
        let mut bytes = std::fs::read(path).map_err(unreadable)?;
        while bytes.last().is_some_and(u8::is_ascii_whitespace) {
            bytes.pop();
        }
        Secret::new(bytes)
            .ok_or_else(|| self.error("secret_file", format!("{} is empty", path.display())))
    }

    /// The engine's parameters for this node.
    pub fn engine_config(&self) -> derechofs_core::Config {
        derechofs_core::Config {
            heartbeat_ms: self.heartbeat_ms,
            suspect_after_ms: self.suspect_after_ms,
            window: self.window,
            batch_bytes_max: self.batch_bytes,
            addr: self.announced_addr(),
            ..derechofs_core::Config::new(self.node_id)
        }
    }

    /// Whether this node is not in `members` (and `members` is not empty): it joins the group
    /// through `contacts` instead of starting it.
    pub fn joins(&self) -> bool {
        !self.members.is_empty() && !self.members.iter().any(|m| m.id == self.node_id)
    }

    /// Where the members reach this node, announced when it asks to join: its address in
    /// `members`, else `listen` unless it is unspecified (`0.0.0.0`).
    pub fn announced_addr(&self) -> Option<SocketAddr> {
        match self.members.iter().find(|m| m.id == self.node_id) {
            Some(member) => Some(member.addr),
            None => (!self.listen.ip().is_unspecified()).then_some(self.listen),
        }
    }

    /// The member of `members` at `contact` (`host:port` written as the member's address).
    fn member_at(&self, contact: &str) -> Option<&Member> {
        let addr: SocketAddr = contact.parse().ok()?;
        self.members.iter().find(|m| m.addr == addr)
    }

    /// The members a joining node asks first, in `contacts` order: the members at `contacts`,
    /// then every other member of `members` (the leader may be any of them).
    pub fn join_contacts(&self) -> Vec<Member> {
        let mut contacts: Vec<Member> = self
            .contacts
            .iter()
            .filter_map(|c| self.member_at(c).cloned())
            .collect();
        for member in &self.members {
            if member.id != self.node_id && !contacts.iter().any(|c| c.id == member.id) {
                contacts.push(member.clone());
            }
        }
        contacts
    }

    /// The members of the initial view in rank order: `members`, or this node alone.
    pub fn initial_members(&self) -> Vec<Member> {
        if self.members.is_empty() {
            vec![Member {
                id: self.node_id,
                addr: self.listen,
            }]
        } else {
            self.members.clone()
        }
    }

    /// The shard layout the group is built with.
    pub fn layout_spec(&self) -> LayoutSpec {
        LayoutSpec {
            namespace_shards: self.layout.namespace_shards,
            data_shards: self.layout.data_shards,
            replicas: self.layout.replicas,
            replicas_min: self.layout.replicas_min,
        }
    }
}

/// The secret of a cluster whose nodes set no `secret_file`: it keeps strangers' stray
/// connections out but protects nothing, so only loopback listeners may use it.
const DEVELOPMENT_SECRET: &[u8] = b"derechofs development secret: set secret_file";

/// `persistence.batch_ms` when `policy = "batch"` does not give it.
pub const PERSIST_BATCH_MS_DEFAULT: u64 = 2;

fn origin_error(key: &str, origin: Option<&Origin>, message: String) -> ConfigError {
    let (origin, position) = match origin {
        Some(Origin::File { path, line, column }) => (path.clone(), Some((*line, *column))),
        Some(Origin::Flag(flag)) => (format!("flag {flag}"), None),
        None => ("defaults".to_string(), None),
    };
    ConfigError {
        origin,
        position,
        key: Some(key.to_string()),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "derechofs.toml";

    /// Parses and validates `text`, and returns the error it must produce.
    fn error_of(text: &str) -> ConfigError {
        match NodeConfig::parse(FILE, text).and_then(|c| c.validate().map(|_| c)) {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(e) => e,
        }
    }

    /// The error names `key` and `line`, in its fields and in its message.
    fn assert_names(error: &ConfigError, key: &str, line: usize) {
        assert_eq!(error.key.as_deref(), Some(key), "{error}");
        assert_eq!(error.position.map(|(l, _)| l), Some(line), "{error}");
        let shown = error.to_string();
        assert!(shown.starts_with(&format!("{FILE}:{line}:")), "{shown}");
        assert!(shown.contains(&format!("`{key}`")), "{shown}");
    }

    fn check(text: &str, key: &str, line: usize) {
        assert_names(&error_of(text), key, line);
    }

    #[test]
    fn config_defaults_are_valid_and_match_the_engine() {
        let config = NodeConfig::default();
        config.validate().unwrap();
        let engine = derechofs_core::Config {
            addr: Some(config.listen),
            ..derechofs_core::Config::new(0)
        };
        assert_eq!(config.engine_config(), engine);
        assert_eq!(config.layout_spec(), LayoutSpec::default());
        assert_eq!(NodeConfig::parse(FILE, "").unwrap(), config);
    }

    #[test]
    fn config_members_name_the_initial_view() {
        let text = "node_id = 2\nmembers = [\n  { id = 1, addr = \"127.0.0.1:7071\" },\n  { id = 2, addr = \"127.0.0.1:7072\" },\n]\n";
        let config = NodeConfig::parse(FILE, text).unwrap();
        config.validate().unwrap();
        let ids: Vec<NodeId> = config.initial_members().iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(config.members[1].addr, "127.0.0.1:7072".parse().unwrap());
        assert!(!config.joins());
        assert_eq!(config.announced_addr(), Some(config.members[1].addr));
        check(
            "members = [{ id = 0, addr = \"127.0.0.1:1\" }, { id = 0, addr = \"127.0.0.1:2\" }]\n",
            "members",
            1,
        );
        check(
            "\nmembers = [{ id = 0, addr = \"nowhere\" }]\n",
            "members",
            2,
        );
        let alone = NodeConfig::default().initial_members();
        assert_eq!(alone.len(), 1);
    }

    #[test]
    fn config_a_node_not_in_members_joins_through_its_contacts_and_announces_listen() {
        let members = "members = [\n  { id = 1, addr = \"127.0.0.1:7071\" },\n  { id = 2, addr = \"127.0.0.1:7072\" },\n  { id = 3, addr = \"127.0.0.1:7073\" },\n]\n";
        let text = format!(
            "node_id = 4\nlisten = \"127.0.0.1:7074\"\ncontacts = [\"127.0.0.1:7072\"]\n{members}"
        );
        let config = NodeConfig::parse(FILE, &text).unwrap();
        config.validate().unwrap();
        assert!(config.joins());
        assert_eq!(
            config.announced_addr(),
            Some("127.0.0.1:7074".parse().unwrap())
        );
        assert_eq!(config.engine_config().addr, config.announced_addr());
        let ids: Vec<NodeId> = config.join_contacts().iter().map(|m| m.id).collect();
        assert_eq!(
            ids,
            vec![2, 1, 3],
            "contacts first, then every other member"
        );

        // It must announce an address the members can reach ...
        check(
            &format!(
                "node_id = 4\nlisten = \"0.0.0.0:7074\"\nsecret_file = \"/nonexistent\"\n{members}"
            ),
            "listen",
            2,
        );
        check(
            &format!("node_id = 4\nlisten = \"127.0.0.1:7071\"\n{members}"),
            "listen",
            2,
        );
        // ... and join through members it knows the id of.
        check(
            &format!("node_id = 4\nlisten = \"127.0.0.1:7074\"\ncontacts = [\"127.0.0.1:7072\", \"127.0.0.1:9\"]\n{members}"),
            "contacts[1]",
            3,
        );
    }

    #[test]
    fn config_every_key_is_read() {
        let dir = tempdir();
        let secret = dir.join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let text = format!(
            r#"
node_id = 7
listen = "0.0.0.0:7171"
data_dir = "/var/lib/derechofs"
contacts = ["node1:7070", "10.0.0.2:7070"]
secret_file = "{}"
heartbeat_ms = 50
suspect_after_ms = 2000
partition_safety = true
time_read_wait_ms = 500
window = 32
batch_bytes = 65536
retention = "forever"

[layout]
namespace_shards = 2
data_shards = 8
replicas = 5
chunk_size = 4194304

[transport]
kind = "tcp"
provider = "verbs"
local_socket_dir = "/tmp/dfs"

[persistence]
policy = "batch"
batch_ms = 5
"#,
            secret.display()
        );
        let config = NodeConfig::parse(FILE, &text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.node_id, 7);
        assert_eq!(config.local_socket_dir, Some(PathBuf::from("/tmp/dfs")));
        assert_eq!(config.listen, "0.0.0.0:7171".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/derechofs"));
        assert_eq!(config.contacts, ["node1:7070", "10.0.0.2:7070"]);
        assert_eq!(config.secret_file.as_deref(), Some(secret.as_path()));
        assert_eq!((config.heartbeat_ms, config.suspect_after_ms), (50, 2000));
        assert!(config.partition_safety);
        assert_eq!(config.time_read_wait_ms, 500);
        assert_eq!((config.window, config.batch_bytes), (32, 65536));
        assert_eq!(config.retention, Retention::Forever);
        assert_eq!(
            config.layout,
            LayoutConfig {
                namespace_shards: 2,
                data_shards: 8,
                replicas: 5,
                replicas_min: 3,
                chunk_size: 4 << 20
            }
        );
        assert_eq!(config.transport, TransportKind::Tcp);
        assert_eq!(config.provider, "verbs");
        assert_eq!(config.persistence, SyncPolicy::BatchMs(5));
        assert_eq!(
            config.secret().unwrap(),
            Secret::new(&b"s3cret"[..]).unwrap()
        );
    }

    #[test]
    fn config_unknown_keys_are_named_with_their_line() {
        check(
            "node_id = 1\nlisten_addr = \"127.0.0.1:1\"\n",
            "listen_addr",
            2,
        );
        check("[layout]\nreplicas = 3\nshards = 2\n", "layout.shards", 3);
        check("node_id = 1\n\n[bogus]\nx = 1\n", "bogus", 3);
    }

    #[test]
    fn config_values_of_the_wrong_type_are_named_with_their_line() {
        check("node_id = \"one\"\n", "node_id", 1);
        check("node_id = -1\n", "node_id", 1);
        check("\npartition_safety = \"yes\"\n", "partition_safety", 2);
        check(
            "node_id = 1\npartition_safety = false\n",
            "partition_safety",
            2,
        );
        check("[layout]\n\nreplicas = 70000\n", "layout.replicas", 3);
        check("contacts = \"node1:7070\"\n", "contacts", 1);
    }

    #[test]
    fn config_syntax_errors_give_the_line() {
        let error = error_of("node_id = 1\nlisten = \n");
        assert_eq!(error.position.map(|(line, _)| line), Some(2), "{error}");
    }

    #[test]
    fn config_bad_values_are_named_with_their_line() {
        check("listen = \"localhost\"\n", "listen", 1);
        check("data_dir = \"\"\n", "data_dir", 1);
        check("secret_file = \"\"\n", "secret_file", 1);
        check("retention = \"30 days\"\n", "retention", 1);
        check("retention = \"0d\"\n", "retention", 1);
        check("node_id = 1\nretention = \"30d\"\n", "retention", 2);
        check("[transport]\nkind = \"udp\"\n", "transport.kind", 2);
        check(
            &format!(
                "[transport]\n\nlocal_socket_dir = \"/{}\"\n",
                "d".repeat(100)
            ),
            "transport.local_socket_dir",
            3,
        );
        let off = NodeConfig::parse(FILE, "[transport]\nlocal_socket_dir = \"\"\n").unwrap();
        assert_eq!(off.local_socket_dir, None);
        check(
            "[persistence]\npolicy = \"sometimes\"\n",
            "persistence.policy",
            2,
        );
        check("[persistence]\nbatch_ms = 5\n", "persistence.batch_ms", 2);
        check("contacts = [\"node1:7070\", \"node2\"]\n", "contacts[1]", 1);
    }

    #[test]
    fn config_values_out_of_range_are_named_with_their_line() {
        check("heartbeat_ms = 0\n", "heartbeat_ms", 1);
        check(
            "heartbeat_ms = 50\nsuspect_after_ms = 50\n",
            "suspect_after_ms",
            2,
        );
        check("time_read_wait_ms = 100000000\n", "time_read_wait_ms", 1);
        check("window = 0\n", "window", 1);
        check("batch_bytes = 1000000000\n", "batch_bytes", 1);
        check(
            "[layout]\nnamespace_shards = 0\n",
            "layout.namespace_shards",
            2,
        );
        check("[layout]\ndata_shards = 0\n", "layout.data_shards", 2);
        check("[layout]\ndata_shards = 1024\n", "layout.data_shards", 2);
        check("[layout]\nreplicas = 0\n", "layout.replicas", 2);
        check(
            "[layout]\nreplicas = 3\nreplicas_min = 4\n",
            "layout.replicas_min",
            3,
        );
        check("[layout]\nchunk_size = 1000000\n", "layout.chunk_size", 2);
        check("[layout]\nchunk_size = 1024\n", "layout.chunk_size", 2);
        check("[layout]\nchunk_size = 134217728\n", "layout.chunk_size", 2);
        check("[transport]\nkind = \"fabric\"\n", "transport.kind", 2);
        check(
            "[transport]\nprovider = \"shm\"\nkind = \"fabric\"\n",
            "transport.kind",
            3,
        );
        check(
            "[persistence]\npolicy = \"batch\"\nbatch_ms = 0\n",
            "persistence.batch_ms",
            3,
        );
    }

    #[test]
    fn config_secret_file_must_be_readable_and_not_empty() {
        let dir = tempdir();
        let missing = dir.join("missing");
        check(
            &format!("\nsecret_file = \"{}\"\n", missing.display()),
            "secret_file",
            2,
        );
        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();
        check(
            &format!("secret_file = \"{}\"\n", empty.display()),
            "secret_file",
            1,
        );
        check("listen = \"0.0.0.0:7070\"\n", "secret_file", 1);
    }

    #[test]
    fn config_flags_override_the_file_and_errors_name_the_flag() {
        let config_path = tempdir().join(CONFIG_FILE_NAME);
        std::fs::write(&config_path, "node_id = 1\nlisten = \"127.0.0.1:7000\"\n").unwrap();
        let overrides = Overrides {
            node_id: Some(4),
            listen: Some("127.0.0.1:7004".to_string()),
            contacts: vec!["127.0.0.1:7000".to_string()],
            ..Overrides::default()
        };
        let config = NodeConfig::resolve(Some(&config_path), &overrides).unwrap();
        assert_eq!(config.node_id, 4);
        assert_eq!(config.listen, "127.0.0.1:7004".parse().unwrap());
        assert_eq!(config.contacts, ["127.0.0.1:7000"]);

        let bad = Overrides {
            listen: Some("nowhere".to_string()),
            ..Overrides::default()
        };
        let error = NodeConfig::resolve(None, &bad).unwrap_err();
        assert_eq!(error.key.as_deref(), Some("listen"));
        assert_eq!(error.origin, "flag --listen");

        let bad = Overrides {
            contacts: vec!["no-port".to_string()],
            ..Overrides::default()
        };
        let error = NodeConfig::resolve(None, &bad).unwrap_err();
        assert_eq!(
            (error.key.as_deref(), error.origin.as_str()),
            (Some("contacts"), "flag --contact")
        );

        let exposed = Overrides {
            listen: Some("0.0.0.0:7070".to_string()),
            ..Overrides::default()
        };
        let error = NodeConfig::resolve(None, &exposed).unwrap_err();
        assert_eq!(error.key.as_deref(), Some("secret_file"));
    }

    #[test]
    fn config_with_no_file_starts_from_defaults() {
        let config = NodeConfig::resolve(None, &Overrides::default()).unwrap();
        assert_eq!(config, NodeConfig::default());
        let error = NodeConfig::resolve(
            Some(Path::new("/nonexistent/derechofs.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("/nonexistent/derechofs.toml: cannot read"),
            "{error}"
        );
    }

    #[test]
    fn config_retention_accepts_each_unit() {
        for (text, seconds) in [
            ("90s", 90),
            ("15m", 900),
            ("12h", 43_200),
            ("30d", 2_592_000),
        ] {
            assert_eq!(
                parse_retention(text),
                Ok(Retention::Keep(Duration::from_secs(seconds)))
            );
        }
        assert_eq!(parse_retention("forever"), Ok(Retention::Forever));
        assert!(parse_retention("99999999999999999999d").is_err());
        assert!(parse_retention("d").is_err());
        assert!(parse_retention("10w").is_err());
    }

    /// The example in docs/CONFIG.md is a valid file.
    #[test]
    fn config_documented_example_parses() {
        let doc = include_str!("../../docs/CONFIG.md");
        let example = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/CONFIG.md has a toml example");
        NodeConfig::parse("docs/CONFIG.md", example).unwrap();
    }

    /// A fresh directory under the system's temporary directory.
    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "derechofs-config-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
