//! The mounts of this process's mount namespace, read from `/proc/self/mountinfo`
//! (proc(5)): which directories are mount points, and which of them are DerechoFS mounts with
//! the contacts they were mounted from.

use std::path::{Component, Path, PathBuf};

/// The file system type a DerechoFS mount shows in the mount table.
pub const FSTYPE: &str = "fuse.derechofs";

/// One line of the mount table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Its file system type (`fuse.derechofs`, `ext4`, …).
    pub fstype: String,
    /// What was mounted: for DerechoFS, the contacts `host:port,…`.
    pub source: String,
}

/// Undoes the octal escapes (`\040` for a space, `\011`, `\012`, `\134`) of the mount table.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                // Three octal digits above \377 are not an escape the kernel writes: keep them.
                match u8::try_from(value) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 4]),
                }
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a mountinfo file; lines that do not have the documented shape are
/// skipped (the kernel writes them, but a reader must not fail on one it does not know).
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            // id parent major:minor root mount_point options [optional…] - fstype source super
            let dash = fields.iter().position(|f| *f == "-")?;
            if dash < 6 {
                return None;
            }
            Some(Mount {
                mount_point: PathBuf::from(unescape(fields[4])),
                fstype: fields.get(dash + 1)?.to_string(),
                source: unescape(fields.get(dash + 2)?),
            })
        })
        .collect()
}

/// The mounts of this process; empty when the table cannot be read.
pub fn mounts() -> Vec<Mount> {
    parse(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

/// Whether `path`, as written (give it canonical: nothing here touches the file system, so a
/// hung mount cannot block the check), is a mount point.
pub fn is_mount_point(path: &Path) -> bool {
    mounts().iter().any(|m| m.mount_point == path)
}

/// `path` made absolute against `cwd` and with `.` and `..` resolved by the letters alone:
/// following symbolic links would read through the mount, and a name like `file@T` must stay
/// as written.
fn lexical(path: &Path, cwd: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in cwd.join(path).components() {
        match component {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
        }
    }
    out
}

/// If `path` (relative to `cwd`) lies inside a DerechoFS mount, that mount (the innermost one)
/// and the path from the root of its file system (`/dir/file`).
pub fn derechofs_path(mounts: &[Mount], path: &Path, cwd: &Path) -> Option<(Mount, String)> {
    let path = lexical(path, cwd);
    // The innermost mount holding the path decides, even when it is not DerechoFS.
    let holder = mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())?;
    if holder.fstype != FSTYPE {
        return None;
    }
    let inside = path.strip_prefix(&holder.mount_point).ok()?;
    Some((holder.clone(), format!("/{}", inside.to_string_lossy())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
43 22 0:40 / /mnt/dfs rw,nosuid,nodev,relatime - fuse.derechofs 127.0.0.1:7070,127.0.0.2:7070 rw,user_id=0
44 43 0:41 / /mnt/dfs/inner rw - tmpfs tmpfs rw
45 22 0:42 / /mnt/with\\040space rw - fuse.derechofs 127.0.0.1:9 rw
not a mount line
";

    #[test]
    fn the_table_gives_mount_points_types_and_sources_with_escapes_undone() {
        let mounts = parse(TABLE);
        assert_eq!(mounts.len(), 4, "the malformed line is skipped");
        assert_eq!(mounts[1].mount_point, PathBuf::from("/mnt/dfs"));
        assert_eq!(mounts[1].fstype, FSTYPE);
        assert_eq!(mounts[1].source, "127.0.0.1:7070,127.0.0.2:7070");
        assert_eq!(mounts[3].mount_point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn a_path_inside_a_derechofs_mount_maps_to_the_path_from_its_root() {
        let mounts = parse(TABLE);
        let cwd = Path::new("/mnt/dfs/logs");
        let (m, p) = derechofs_path(&mounts, Path::new("app.log@1763720100"), cwd).unwrap();
        assert_eq!(m.source, "127.0.0.1:7070,127.0.0.2:7070");
        assert_eq!(p, "/logs/app.log@1763720100");
        let (_, p) = derechofs_path(&mounts, Path::new("/mnt/dfs"), cwd).unwrap();
        assert_eq!(p, "/");
        let (_, p) = derechofs_path(&mounts, Path::new("../x/./y"), cwd).unwrap();
        assert_eq!(p, "/x/y");
        let (m, _) = derechofs_path(&mounts, Path::new("/mnt/with space/a"), cwd).unwrap();
        assert_eq!(m.source, "127.0.0.1:9");
    }

    #[test]
    fn a_path_outside_or_under_another_file_system_is_not_a_derechofs_path() {
        let mounts = parse(TABLE);
        let cwd = Path::new("/");
        assert!(derechofs_path(&mounts, Path::new("/mnt/dfsx/a"), cwd).is_none());
        assert!(derechofs_path(&mounts, Path::new("/mnt/dfs/inner/a"), cwd).is_none());
        assert!(derechofs_path(&mounts, Path::new("/etc/passwd"), cwd).is_none());
    }

    #[test]
    fn escapes_that_are_not_octal_bytes_stay_as_written() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("a\\999b"), "a\\999b");
        assert_eq!(unescape("a\\777b"), "a\\777b");
        assert_eq!(unescape("end\\04"), "end\\04");
    }
}
