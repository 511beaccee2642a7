//! Mount options: the `-o` list of `derechofs mount`, `mount.derechofs` and `/etc/fstab`.
//!
//! The list is comma-separated, as mount(8) passes it. Options the kernel or fuser act on are
//! kept; options that only mean something to mount(8) or fstab (`defaults`, `noauto`, `nofail`,
//! `_netdev`, `x-*`, …) are accepted and ignored, as every mount helper does; anything else is an
//! error that names the option. Of a pair of opposites (`ro`/`rw`, `sync`/`async`, …) the last
//! one given wins, as in mount(8), so `defaults,ro` is read-only.

use std::time::Duration;

/// FUSE worker threads when `threads=` is not given.
pub const THREADS_DEFAULT: usize = 4;
/// Most FUSE worker threads `threads=` may ask for.
pub const THREADS_MAX: usize = 64;
/// How long a mount waits for a contact node to answer when `connect_timeout_ms=` is not given.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Longest `connect_timeout_ms=` accepted.
pub const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(600);
/// Longest option list accepted, in bytes (the kernel's own limit on mount data is a page).
pub const OPTIONS_LEN_MAX: usize = 4096;
/// The kernel's readahead window for the mount, in KiB, when `readahead_kb=` is not given: a
/// sequential reader then has several 1 MiB reads in flight at once (the kernel's own default of
/// 128 KiB has one 128 KiB read at a time, each a round trip to the cluster).
pub const READAHEAD_KB_DEFAULT: u32 = 4096;
/// Largest `readahead_kb=` accepted.
pub const READAHEAD_KB_MAX: u32 = 65_536;

/// Who may use the mount besides the user who mounted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only the user who mounted it (FUSE's default).
    Owner,
    /// The owner and root (`allow_root`).
    OwnerAndRoot,
    /// Every user (`allow_other`).
    All,
}

/// A three-way kernel flag: not given (the kernel's default), on, or off.
pub type Flag = Option<bool>;

/// The parsed options of one mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// `ro` (true) or `rw` (false, the default).
    pub read_only: bool,
    /// `allow_other`, `allow_root`, or neither.
    pub access: Access,
    /// `default_permissions`: the kernel checks permissions from the attributes the file system
    /// reports, as a local file system does.
    pub default_permissions: bool,
    /// `noatime` (`atime` is refused: reads never update access times).
    pub atime: Flag,
    /// `dev` / `nodev` (FUSE defaults to `nodev`).
    pub dev: Flag,
    /// `suid` / `nosuid` (FUSE defaults to `nosuid`).
    pub suid: Flag,
    /// `exec` / `noexec`.
    pub exec: Flag,
    /// `sync` / `async`.
    pub sync: Flag,
    /// `dirsync`.
    pub dirsync: bool,
    /// `fsname=NAME`: the source shown in `/proc/mounts`.
    pub fsname: Option<String>,
    /// `threads=N`: FUSE worker threads (1..=`THREADS_MAX`).
    pub threads: usize,
    /// `connect_timeout_ms=N`: how long to wait for the contact nodes (DerechoFS mounts only).
    pub connect_timeout: Duration,
    /// `prefer=NODE`: send requests to this member whenever it replicates the shard and is
    /// reachable (data locality; reading through one replica). DerechoFS mounts only.
    pub prefer: Option<u32>,
    /// `readahead_kb=N`: the kernel's readahead window for the mount, in KiB (0: the kernel's
    /// default). Set once the mount is up, through the mount's `read_ahead_kb` in sysfs (root).
    pub readahead_kb: u32,
    /// `ac` / `noac` (NFS's names): keep the client's cache of live attributes and names,
    /// coherent with the namespace feed (default; the kernel then keeps the files' entries and
    /// attributes it holds for 60 s, dropped at the feed's reports), or read every `getattr`
    /// and `lookup` from the cluster (the kernel keeps them 1 s). DerechoFS mounts only.
    pub attr_cache: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            access: Access::Owner,
            default_permissions: false,
            atime: None,
            dev: None,
            suid: None,
            exec: None,
            sync: None,
            dirsync: false,
            fsname: None,
            threads: THREADS_DEFAULT,
            connect_timeout: CONNECT_TIMEOUT_DEFAULT,
            prefer: None,
            readahead_kb: READAHEAD_KB_DEFAULT,
            attr_cache: true,
        }
    }
}

/// What is wrong with an option list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("unknown mount option `{0}`")]
    Unknown(String),
    #[error("mount option `{option}`: {why}")]
    BadValue { option: String, why: String },
    #[error("mount option `{0}` takes no value")]
    UnexpectedValue(String),
    #[error("mount option `{0}` needs a value (`{0}=…`)")]
    MissingValue(String),
    #[error("mount options longer than {OPTIONS_LEN_MAX} bytes")]
    TooLong,
}

/// Options that only mount(8), fstab or other helpers act on: accepted, and ignored here.
const IGNORED: &[&str] = &[
    "defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users", "owner", "group",
    "loud", "silent", "nomand",
];

impl MountOptions {
    /// Parses a comma-separated list; an empty list gives the defaults.
    pub fn parse(list: &str) -> Result<MountOptions, OptionError> {
        let mut options = MountOptions::default();
        options.apply(list)?;
        Ok(options)
    }

    /// Applies a comma-separated list over these options (later options win).
    pub fn apply(&mut self, list: &str) -> Result<(), OptionError> {
        if list.len() > OPTIONS_LEN_MAX {
            return Err(OptionError::TooLong);
        }
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (name, value) = match item.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (item, None),
            };
            self.apply_one(name, value)?;
        }
        Ok(())
    }

    fn apply_one(&mut self, name: &str, value: Option<&str>) -> Result<(), OptionError> {
        let flag = |target: &mut Flag, on: bool| -> Result<(), OptionError> {
            if value.is_some() {
                return Err(OptionError::UnexpectedValue(name.to_string()));
            }
            *target = Some(on);
            Ok(())
        };
        match name {
            "ro" | "rw" => {
                no_value(name, value)?;
                self.read_only = name == "ro";
            }
            "allow_other" => {
                no_value(name, value)?;
                self.access = Access::All;
            }
            "allow_root" => {
                no_value(name, value)?;
                self.access = Access::OwnerAndRoot;
            }
            "default_permissions" => {
                no_value(name, value)?;
                self.default_permissions = true;
            }
            "dirsync" => {
                no_value(name, value)?;
                self.dirsync = true;
            }
            "ac" | "noac" => {
                no_value(name, value)?;
                self.attr_cache = name == "ac";
            }
            "atime" => {
                // Reads never update a file's access time here (docs/SEMANTICS.md): a mount
                // that took `atime` would promise what it does not do.
                return Err(bad(
                    name,
                    "not supported: reads never update access times on DerechoFS (it behaves \
                     as `noatime`)",
                ));
            }
            "noatime" => flag(&mut self.atime, false)?,
            "dev" => flag(&mut self.dev, true)?,
            "nodev" => flag(&mut self.dev, false)?,
            "suid" => flag(&mut self.suid, true)?,
            "nosuid" => flag(&mut self.suid, false)?,
            "exec" => flag(&mut self.exec, true)?,
            "noexec" => flag(&mut self.exec, false)?,
            "sync" => flag(&mut self.sync, true)?,
            "async" => flag(&mut self.sync, false)?,
            "fsname" => {
                let v = need_value(name, value)?;
                if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c.is_control()) {
                    return Err(bad(
                        name,
                        "must be non-empty, without spaces or control characters",
                    ));
                }
                self.fsname = Some(v.to_string());
            }
            "threads" => {
                let v = need_value(name, value)?;
                let n: usize = v
                    .parse()
                    .map_err(|_| bad(name, &format!("`{v}` is not a number")))?;
                if n == 0 || n > THREADS_MAX {
                    return Err(bad(
                        name,
                        &format!("must be between 1 and {THREADS_MAX}, not {n}"),
                    ));
                }
                self.threads = n;
            }
            "connect_timeout_ms" => {
                let v = need_value(name, value)?;
                let ms: u64 = v
                    .parse()
                    .map_err(|_| bad(name, &format!("`{v}` is not a number of milliseconds")))?;
                let t = Duration::from_millis(ms);
                if ms == 0 || t > CONNECT_TIMEOUT_MAX {
                    return Err(bad(
                        name,
                        &format!("must be between 1 and {}", CONNECT_TIMEOUT_MAX.as_millis()),
                    ));
                }
                self.connect_timeout = t;
            }
            "readahead_kb" => {
                let v = need_value(name, value)?;
                let kb: u32 = v
                    .parse()
                    .map_err(|_| bad(name, &format!("`{v}` is not a number of KiB")))?;
                if kb > READAHEAD_KB_MAX {
                    return Err(bad(
                        name,
                        &format!("must be between 0 and {READAHEAD_KB_MAX}, not {kb}"),
                    ));
                }
                self.readahead_kb = kb;
            }
            "prefer" => {
                let v = need_value(name, value)?;
                let node: u32 = v
                    .parse()
                    .map_err(|_| bad(name, &format!("`{v}` is not a node id")))?;
                self.prefer = Some(node);
            }
            _ if IGNORED.contains(&name) => {}
            _ if name.starts_with("x-") || name == "comment" => {}
            _ => {
                let shown = match value {
                    Some(v) => format!("{name}={v}"),
                    None => name.to_string(),
                };
                return Err(OptionError::Unknown(shown));
            }
        }
        Ok(())
    }

    /// The fuser configuration these options ask for; `fsname` is used when no `fsname=` was
    /// given.
    pub fn to_fuser(&self, fsname: &str, subtype: &str) -> fuser::Config {
        use fuser::MountOption as M;
        let mut m = vec![
            M::FSName(self.fsname.clone().unwrap_or_else(|| fsname.to_string())),
            // The kernel's own `subtype=` (fuser's `Subtype` only reaches fusermount), so
            // /proc/mounts shows the type as `fuse.SUBTYPE`.
            M::CUSTOM(format!("subtype={subtype}")),
            if self.read_only { M::RO } else { M::RW },
        ];
        if self.default_permissions {
            m.push(M::DefaultPermissions);
        }
        let pairs = [
            (self.atime, M::Atime, M::NoAtime),
            (self.dev, M::Dev, M::NoDev),
            (self.suid, M::Suid, M::NoSuid),
            (self.exec, M::Exec, M::NoExec),
            (self.sync, M::Sync, M::Async),
        ];
        for (flag, on, off) in pairs {
            match flag {
                Some(true) => m.push(on),
                Some(false) => m.push(off),
                None => {}
            }
        }
        if self.dirsync {
            m.push(M::DirSync);
        }
        let mut config = fuser::Config::default();
        config.mount_options = m;
        config.acl = match self.access {
            Access::Owner => fuser::SessionACL::Owner,
            Access::OwnerAndRoot => fuser::SessionACL::RootAndOwner,
            Access::All => fuser::SessionACL::All,
        };
        config.n_threads = Some(self.threads);
        config.clone_fd = self.threads > 1;
        config
    }
}

fn no_value(name: &str, value: Option<&str>) -> Result<(), OptionError> {
    match value {
        Some(_) => Err(OptionError::UnexpectedValue(name.to_string())),
        None => Ok(()),
    }
}

fn need_value<'a>(name: &str, value: Option<&'a str>) -> Result<&'a str, OptionError> {
    value.ok_or_else(|| OptionError::MissingValue(name.to_string()))
}

fn bad(option: &str, why: &str) -> OptionError {
    OptionError::BadValue {
        option: option.to_string(),
        why: why.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_list_gives_defaults() {
        assert_eq!(MountOptions::parse("").unwrap(), MountOptions::default());
        assert_eq!(MountOptions::parse(",,").unwrap(), MountOptions::default());
    }

    #[test]
    fn usual_options_are_parsed() {
        let o =
            MountOptions::parse("ro,allow_other,default_permissions,noatime,threads=8").unwrap();
        assert!(o.read_only);
        assert_eq!(o.access, Access::All);
        assert!(o.default_permissions);
        assert_eq!(o.atime, Some(false));
        assert_eq!(o.threads, 8);
    }

    #[test]
    fn last_of_opposites_wins_as_in_mount() {
        assert!(MountOptions::parse("defaults,rw,ro").unwrap().read_only);
        assert!(!MountOptions::parse("ro,rw").unwrap().read_only);
        assert_eq!(MountOptions::parse("noatime").unwrap().atime, Some(false));
        assert!(matches!(
            MountOptions::parse("noatime,atime"),
            Err(OptionError::BadValue { option, .. }) if option == "atime"
        ));
        assert!(MountOptions::default().attr_cache);
        assert!(!MountOptions::parse("ac,noac").unwrap().attr_cache);
        assert!(MountOptions::parse("noac,ac").unwrap().attr_cache);
        assert!(MountOptions::parse("noac=1").is_err());
    }

    #[test]
    fn readahead_defaults_to_several_reads_in_flight_and_zero_leaves_the_kernels() {
        assert_eq!(MountOptions::default().readahead_kb, READAHEAD_KB_DEFAULT);
        assert_eq!(
            MountOptions::parse("readahead_kb=0").unwrap().readahead_kb,
            0
        );
        assert_eq!(
            MountOptions::parse("readahead_kb=65536")
                .unwrap()
                .readahead_kb,
            READAHEAD_KB_MAX
        );
    }

    #[test]
    fn fstab_only_options_are_accepted_and_ignored() {
        let o = MountOptions::parse("defaults,_netdev,nofail,noauto,x-systemd.automount,comment=x")
            .unwrap();
        assert_eq!(o, MountOptions::default());
    }

    #[test]
    fn unknown_option_is_an_error_naming_it() {
        let e = MountOptions::parse("ro,frobnicate,rw").unwrap_err();
        assert_eq!(e, OptionError::Unknown("frobnicate".into()));
        assert!(e.to_string().contains("`frobnicate`"));
        let e = MountOptions::parse("colour=blue").unwrap_err();
        assert!(e.to_string().contains("`colour=blue`"));
    }

    #[test]
    fn bad_values_are_errors_naming_the_option() {
        for (list, option) in [
            ("threads=0", "threads"),
            ("threads=65", "threads"),
            ("threads=many", "threads"),
            ("connect_timeout_ms=0", "connect_timeout_ms"),
            ("connect_timeout_ms=-1", "connect_timeout_ms"),
            ("fsname=", "fsname"),
            ("fsname=a b", "fsname"),
            ("prefer=x", "prefer"),
            ("prefer=-1", "prefer"),
            ("readahead_kb=65537", "readahead_kb"),
            ("readahead_kb=-1", "readahead_kb"),
            ("readahead_kb=lots", "readahead_kb"),
        ] {
            let e = MountOptions::parse(list).unwrap_err();
            assert!(
                matches!(&e, OptionError::BadValue { option: o, .. } if o == option),
                "{list}: {e}"
            );
        }
        assert_eq!(
            MountOptions::parse("ro=1").unwrap_err(),
            OptionError::UnexpectedValue("ro".into())
        );
        assert_eq!(
            MountOptions::parse("threads").unwrap_err(),
            OptionError::MissingValue("threads".into())
        );
        assert_eq!(
            MountOptions::parse(&"ro,".repeat(OPTIONS_LEN_MAX)).unwrap_err(),
            OptionError::TooLong
        );
    }

    #[test]
    fn fuser_config_carries_every_option() {
        let o = MountOptions::parse("ro,allow_other,default_permissions,noatime,nodev,dirsync")
            .unwrap();
        let c = o.to_fuser("src", "derechofs");
        use fuser::MountOption as M;
        for want in [
            M::FSName("src".into()),
            M::CUSTOM("subtype=derechofs".into()),
            M::RO,
            M::DefaultPermissions,
            M::NoAtime,
            M::NoDev,
            M::DirSync,
        ] {
            assert!(c.mount_options.contains(&want), "{want:?} missing");
        }
        assert!(!c.mount_options.contains(&M::RW));
        assert_eq!(c.acl, fuser::SessionACL::All);
    }
}
