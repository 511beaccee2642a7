//! `derechofs log PATH`: the history of a path in the file system of a running cluster, for
//! people: one line per version that changed the inode the path names now (its attributes, its
//! size and times with every write, its entries for a directory), oldest first, with the time,
//! the version, and the size and kind of what the path named at that time.

use anyhow::Context;
use derechofs_client::{RemoteConfig, RemoteShards};
use derechofs_fs::filesystem::SKEW_MAX_US_DEFAULT;
use derechofs_fs::time::format_rfc3339;
use derechofs_fs::{Creds, FileSystem, FsConfig, Ino, ROOT_INO};

use std::path::Path;

use crate::kv::{secret, show_version, ClientArgs};
use crate::mountinfo;
use crate::out::{errln, outln};
use crate::table::Table;

/// Exit code when the path does not exist.
pub const EXIT_NOT_FOUND: i32 = 2;

/// `derechofs log`.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// A path inside a mounted DerechoFS (`/mnt/dfs/dir/file`, or relative to the current
    /// directory), whose mount gives the contacts (not a mount made with `fsname=`, whose
    /// source shows that name); or else the path from the root of the file
    /// system (`/dir/file`) of the cluster at `--contacts`. A component may carry `@TIME`.
    path: String,
    /// Show only the latest N changes.
    #[arg(long, default_value_t = 100)]
    max: usize,
}

/// Splits `/a/b/c` into its components; refuses empty components other than the slashes at the
/// ends, and `.` and `..`, which a path from the root does not need.
fn components(path: &str) -> anyhow::Result<Vec<&str>> {
    let trimmed = path.trim_matches('/');
    if !path.starts_with('/') {
        anyhow::bail!("`{path}` is not a path from the root of the file system (`/dir/file`)");
    }
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = trimmed.split('/').collect();
    if let Some(bad) = parts
        .iter()
        .find(|p| p.is_empty() || **p == "." || **p == "..")
    {
        anyhow::bail!("`{path}` has a component `{bad}`: give the path without it");
    }
    Ok(parts)
}

/// Runs `derechofs log`.
pub fn run(args: LogArgs) -> anyhow::Result<i32> {
    // A path inside a mount names its cluster: the mount's contacts win over `--contacts`.
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let (contacts, path) =
        match mountinfo::derechofs_path(&mountinfo::mounts(), Path::new(&args.path), &cwd) {
            Some((mount, inside)) => {
                let contacts: Vec<String> = mount.source.split(',').map(str::to_string).collect();
                if let Some(bad) = contacts.iter().find(|c| !crate::mount::is_host_port(c)) {
                    // Mounted with `fsname=`: the source shows that name, not the contacts.
                    // Asking `--contacts` (whose default may be another cluster) could answer
                    // for the wrong file system.
                    anyhow::bail!(
                        "{} is in a mount whose source is `{}` (mounted with fsname=?), and \
                         `{bad}` is not a member's host:port: give the path from the root of \
                         its file system, `{inside}`, with --contacts",
                        args.path,
                        mount.source
                    );
                }
                (contacts, inside)
            }
            None => (args.client.contacts.clone(), args.path.clone()),
        };
    let parts = components(&path)?;
    let secret = secret(&args.client.secret_file)?;
    let mut remote = RemoteConfig::new(contacts, secret);
    remote.local_socket_dir = args.client.local_socket_dir.0.clone();
    let shards = RemoteShards::connect(remote).context("connecting to the cluster")?;
    let config = FsConfig {
        client_base: crate::client::random_id(),
        skew_max_us: SKEW_MAX_US_DEFAULT,
        root_owner: Creds::default(),
        dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
    };
    let fs = FileSystem::new(shards, config).context("opening the file system")?;
    // The path now: its parent and name (none for the root), and its inode.
    let mut parent: Ino = ROOT_INO;
    let mut ino: Ino = ROOT_INO;
    for (i, part) in parts.iter().enumerate() {
        match fs.lookup(ino, part.as_bytes()) {
            Ok(attr) => {
                parent = ino;
                ino = attr.ino;
            }
            Err(e) if e.errno == libc::ENOENT => {
                let so_far = parts[..=i].join("/");
                errln!("derechofs: /{so_far}: no such file or directory");
                return Ok(EXIT_NOT_FOUND);
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "looking up /{}: {e}",
                    parts[..=i].join("/")
                ))
            }
        }
    }
    let name = parts.last().copied().unwrap_or("");
    let history = fs
        .history(ino)
        .with_context(|| format!("reading the history of {path}"))?;
    let skip = history.len().saturating_sub(args.max);
    if skip > 0 {
        outln!("({skip} older changes left out; --max shows more)")?;
    }
    let mut table = Table::new(&["time", "version", "size", "kind"]);
    for change in &history[skip..] {
        // The path as it was at the change's time (`-`: it named nothing then, for example
        // before a rename gave the inode this name).
        let then = format!("{name}@{}us", change.hlc.wall_us);
        let (size, kind) = match fs.lookup(parent, then.as_bytes()) {
            Ok(attr) => (
                attr.size.to_string(),
                format!("{:?}", attr.kind).to_lowercase(),
            ),
            Err(_) => ("-".into(), "-".into()),
        };
        table.row(vec![
            format_rfc3339(change.hlc.wall_us),
            show_version(change.version),
            size,
            kind,
        ])?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_path_is_split_from_the_root_and_odd_components_are_refused() {
        assert_eq!(components("/").unwrap(), Vec::<&str>::new());
        assert_eq!(components("/a/b@5/").unwrap(), vec!["a", "b@5"]);
        assert!(components("a/b").is_err());
        assert!(components("/a//b").is_err());
        assert!(components("/a/../b").is_err());
    }
}
