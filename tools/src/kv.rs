//! `derechofs kv …` and `derechofs status`: the K/V store and the cluster's state from the
//! command line.

use std::path::PathBuf;

use anyhow::{bail, Context};
use bytes::Bytes;
use derechofs_core::kv::{KvOp, KvReply, ReadAt};
use derechofs_core::transport::{Secret, LOCAL_SOCKET_DIR_DEFAULT};
use derechofs_core::{Hlc, NodeId, Version};

use crate::client::Client;
use crate::config::NodeConfig;
use crate::out::{errln, outln, StdoutError};
use derechofs_fs::time::{format_rfc3339, parse_time_us};

/// How to reach the cluster.
#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    /// Members to learn the view from, `host:port,...`.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7070")]
    pub contacts: Vec<String>,
    /// File holding the cluster secret (default: the development secret of loopback clusters).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Directory of the nodes' local sockets: members with a socket file there are reached
    /// through it, the others over TCP; "" for TCP only.
    #[arg(long, default_value = LOCAL_SOCKET_DIR_DEFAULT, value_parser = parse_local_socket_dir_arg)]
    pub local_socket_dir: LocalSocketDir,
}

/// A `--local-socket-dir` value: `None` for TCP only.
#[derive(Clone, Debug)]
pub struct LocalSocketDir(pub Option<PathBuf>);

/// Parses `--local-socket-dir`.
pub fn parse_local_socket_dir_arg(text: &str) -> Result<LocalSocketDir, String> {
    crate::config::parse_local_socket_dir(text).map(LocalSocketDir)
}

/// `derechofs kv`.
#[derive(Debug, clap::Args)]
pub struct KvArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: KvCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KvCommand {
    /// Write VALUE to KEY; prints the version and its stamp once durable.
    Put { key: String, value: String },
    /// Read KEY: at the latest version (seeing this client's writes), at a time or at a version.
    /// Exit status 2 when the key is absent.
    Get {
        key: String,
        /// A time: RFC 3339 or Unix seconds with a fraction; waits for the stability frontier.
        #[arg(long, conflicts_with = "version")]
        at: Option<String>,
        /// A version, `VIEW.SEQ` or the integer.
        #[arg(long)]
        version: Option<String>,
        /// Read from this member only.
        #[arg(long)]
        member: Option<NodeId>,
        /// Print the version read, the version and stamp of the value, and the value.
        #[arg(long, short)]
        long: bool,
    },
    /// Write VALUE to KEY only if the key's current version is VERSION (or it is absent).
    /// Exit status 3 on a conflict.
    Cput {
        key: String,
        value: String,
        /// The version read, `VIEW.SEQ` or the integer.
        #[arg(long, required_unless_present = "absent", conflicts_with = "absent")]
        expect: Option<String>,
        /// Only if the key does not exist.
        #[arg(long)]
        absent: bool,
    },
    /// Delete KEY.
    Delete { key: String },
    /// Every change of KEY still held, oldest first.
    History { key: String },
    /// Print the changes of every key starting with PREFIX as they are delivered (each once, in
    /// version order per shard, resuming on another member when its member fails).
    Watch {
        prefix: String,
        /// Stop after this many changes.
        #[arg(long)]
        count: Option<u64>,
    },
}

/// `VIEW.SEQ`.
pub fn show_version(v: Version) -> String {
    format!("{}.{}", v >> 32, v & 0xffff_ffff)
}

fn parse_version(text: &str) -> anyhow::Result<Version> {
    let bad =
        || anyhow::anyhow!("`{text}` is not a version (VIEW.SEQ, such as 2.17, or an integer)");
    match text.split_once('.') {
        Some((view, seq)) => {
            let view: u32 = view.parse().map_err(|_| bad())?;
            let seq: u32 = seq.parse().map_err(|_| bad())?;
            Ok(derechofs_core::version_of(view, seq))
        }
        None => text.parse().map_err(|_| bad()),
    }
}

fn show_stamp(hlc: Hlc) -> String {
    format!(
        "{}+{} ({})",
        hlc.wall_us,
        hlc.logical,
        format_rfc3339(hlc.wall_us)
    )
}

/// The secret: the file's bytes less trailing whitespace, or the development secret.
pub fn secret(path: &Option<PathBuf>) -> anyhow::Result<Secret> {
    let mut config = NodeConfig::default();
    config.secret_file = path.clone();
    Ok(config.secret()?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `derechofs kv …`; returns the exit status.
pub fn run(args: KvArgs) -> anyhow::Result<i32> {
    runtime()?.block_on(run_kv(args))
}

async fn run_kv(args: KvArgs) -> anyhow::Result<i32> {
    let secret = secret(&args.client.secret_file)?;
    let local_dir = args.client.local_socket_dir.0.clone();
    let mut client = Client::connect_via(&args.client.contacts, secret, local_dir).await?;
    let result = kv_command(&mut client, args.command).await;
    client.close().await;
    result
}

async fn kv_command(client: &mut Client, command: KvCommand) -> anyhow::Result<i32> {
    let written = |reply: KvReply| -> anyhow::Result<i32> {
        match reply {
            KvReply::Written { version, hlc } => {
                outln!(
                    "version {} stamp {}",
                    show_version(version),
                    show_stamp(hlc)
                )?;
                Ok(0)
            }
            KvReply::Conflict { current } => {
                match current {
                    Some(v) => errln!("conflict: the current version is {}", show_version(v)),
                    None => errln!("conflict: the key does not exist"),
                }
                Ok(3)
            }
            KvReply::Stale { last } => bail!("stale request: the shard applied request {last}"),
            KvReply::Invalid { reason } => bail!("invalid request: {reason}"),
        }
    };
    match command {
        KvCommand::Put { key, value } => {
            let op = KvOp::Put {
                key: Bytes::from(key),
                value: Bytes::from(value),
            };
            written(client.write(op).await?)
        }
        KvCommand::Cput {
            key,
            value,
            expect,
            absent,
        } => {
            let expected = match (expect, absent) {
                (Some(v), false) => Some(parse_version(&v)?),
                _ => None,
            };
            let op = KvOp::CondPut {
                key: Bytes::from(key),
                value: Bytes::from(value),
                expected,
            };
            written(client.write(op).await?)
        }
        KvCommand::Delete { key } => written(
            client
                .write(KvOp::Delete {
                    key: Bytes::from(key),
                })
                .await?,
        ),
        KvCommand::Get {
            key,
            at,
            version,
            member,
            long,
        } => {
            let at = match (at, version) {
                (Some(t), _) => ReadAt::Time(Hlc {
                    wall_us: parse_time_us(&t)?,
                    logical: u32::MAX,
                }),
                (None, Some(v)) => ReadAt::Version(parse_version(&v)?),
                (None, None) => ReadAt::Latest,
            };
            let read = client.get(key.as_bytes(), at, member).await?;
            let read_at = read.read_version.map_or("none".to_string(), show_version);
            match read.found {
                Some(v) => {
                    if long {
                        outln!(
                            "read {} version {} stamp {} value {}",
                            read_at,
                            show_version(v.version),
                            show_stamp(v.hlc),
                            String::from_utf8_lossy(&v.value)
                        )?;
                    } else {
                        outln!("{}", String::from_utf8_lossy(&v.value))?;
                    }
                    Ok(0)
                }
                None => {
                    if long {
                        outln!("read {read_at} absent")?;
                    }
                    errln!("{key}: not found");
                    Ok(2)
                }
            }
        }
        KvCommand::History { key } => {
            let (truncated, changes) = client.history(key.as_bytes()).await?;
            if truncated {
                outln!("(older changes left out)")?;
            }
            for c in changes {
                let what = c
                    .value_len
                    .map_or("deleted".to_string(), |n| format!("{n} bytes"));
                outln!("{} {} {what}", show_version(c.version), show_stamp(c.hlc))?;
            }
            Ok(0)
        }
        KvCommand::Watch { prefix, count } => {
            let mut events = client.watch(prefix.as_bytes()).await?;
            errln!("watching {prefix:?}");
            let mut seen = 0u64;
            while count.is_none_or(|n| seen < n) {
                let Some(event) = events.recv().await else {
                    bail!("the watch ended");
                };
                let e = event?;
                let value = e.value.as_ref().map_or("(deleted)".to_string(), |v| {
                    String::from_utf8_lossy(v).into_owned()
                });
                outln!(
                    "{} {} {} {value}",
                    show_version(e.version),
                    show_stamp(e.hlc),
                    String::from_utf8_lossy(&e.key)
                )?;
                seen += 1;
            }
            Ok(0)
        }
    }
}

/// Runs `derechofs status`.
/// How many times `status` learns the view again when a member answers from a later one.
const STATUS_ROUNDS: usize = 4;

pub fn status(args: ClientArgs) -> anyhow::Result<i32> {
    runtime()?.block_on(async {
        let secret = secret(&args.secret_file)?;
        let local_dir = args.local_socket_dir.0.clone();
        let mut client = Client::connect_via(&args.contacts, secret, local_dir).await?;
        // Each member is asked in turn, after the view was learnt: while the view changes, a
        // member may answer from a later view than the one learnt. The view is then learnt
        // again and the members asked again, a few times, so that the table shows one view.
        let mut statuses = Vec::new();
        for _ in 0..STATUS_ROUNDS {
            statuses.clear();
            let members: Vec<NodeId> = client.layout().members.iter().map(|(n, _)| *n).collect();
            for node in members {
                let status = client.status_of(node).await;
                statuses.push((node, status));
            }
            let view = client.layout().view_id;
            let later = statuses
                .iter()
                .any(|(_, s)| s.as_ref().is_ok_and(|s| s.view_id > view));
            if !later || !client.learn_layout().await {
                break;
            }
        }
        let layout = client.layout().clone();
        outln!("view {}", layout.view_id)?;
        let mut table = vec![vec![
            "node".to_string(),
            "address".into(),
            "state".into(),
            "shard".into(),
            "delivered".into(),
            "persisted".into(),
            "durable".into(),
            "stable lag ms".into(),
            "pending".into(),
            "versions".into(),
            "keys".into(),
            "link".into(),
            "serving".into(),
        ]];
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut failed = false;
        for (node, addr) in &layout.members {
            let status = match statuses.iter().position(|(n, _)| n == node) {
                Some(i) => statuses.swap_remove(i).1,
                None => client.status_of(*node).await,
            };
            let link = client
                .link_kind(*node)
                .await
                .map_or("-".to_string(), |kind| kind.to_string());
            match status {
                Ok(s) => {
                    let mut state = s.state.clone();
                    if s.view_id != layout.view_id {
                        // Still in (or already past) another view than the one shown.
                        state.push_str(&format!(" in view {}", s.view_id));
                    }
                    if !s.suspected.is_empty() {
                        state.push_str(&format!(" (suspects {:?})", s.suspected));
                    }
                    if s.shards.is_empty() {
                        // A spare (or a node still joining): one row, with no shard.
                        let mut row = vec![node.to_string(), addr.to_string(), state.clone()];
                        row.resize(11, "-".to_string());
                        row.push(link.clone());
                        row.push("-".to_string());
                        table.push(row);
                    }
                    for sh in &s.shards {
                        let shard = layout.shards.iter().find(|x| x.id == sh.id);
                        let name = shard.map_or(sh.id.to_string(), |x| {
                            format!(
                                "{}/{} {:?}",
                                if x.data { "data" } else { "namespace" },
                                x.index,
                                sh.members
                            )
                        });
                        let lag = now_us.saturating_sub(sh.stability_frontier.wall_us) / 1000;
                        table.push(vec![
                            node.to_string(),
                            addr.to_string(),
                            state.clone(),
                            name,
                            sh.last_delivered
                                .map_or("-".into(), |(v, _)| show_version(v)),
                            sh.persisted_here.map_or("-".into(), show_version),
                            sh.persistence_frontier.map_or("-".into(), show_version),
                            if sh.stability_frontier == Hlc::ZERO {
                                "-".into()
                            } else {
                                lag.to_string()
                            },
                            sh.pending_requests.to_string(),
                            sh.versions.to_string(),
                            sh.keys.to_string(),
                            link.clone(),
                            if sh.catching_up {
                                "catching-up".into()
                            } else {
                                "yes".into()
                            },
                        ]);
                    }
                }
                Err(e) => {
                    failed = true;
                    let mut row = vec![
                        node.to_string(),
                        addr.to_string(),
                        format!("unreachable: {e}"),
                    ];
                    row.resize(11, String::new());
                    row.push(link);
                    row.push(String::new());
                    table.push(row);
                }
            }
        }
        client.close().await;
        print_table(&table)?;
        Ok(if failed { 1 } else { 0 })
    })
}

fn print_table(rows: &[Vec<String>]) -> Result<(), StdoutError> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        outln!("{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_versions_read_as_view_dot_seq_or_integers() {
        assert_eq!(parse_version("2.17").unwrap(), (2 << 32) | 17);
        assert_eq!(parse_version("42").unwrap(), 42);
        assert_eq!(show_version((2 << 32) | 17), "2.17");
        for bad in ["", "x", "1.", ".1", "1.2.3", "99999999999.1", "-1"] {
            assert!(parse_version(bad).is_err(), "{bad}");
        }
    }
}
