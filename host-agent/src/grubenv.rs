//! The GRUB environment block and the HostOS A/B slot state kept in it.
//!
//! Format (what `grub-editenv` and GRUB's `save_env` use): exactly 1024 bytes,
//! the line `# GRUB Environment Block`, then `key=value` lines (a backslash
//! escapes a backslash or a newline in a value), padded with `#` to the end.
//!
//! The agent only ever replaces the file atomically (temp file, fsync,
//! rename, fsync of the directory), so after a crash or power loss the file
//! is either the old block or the new one, never a mix.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub use ::grubenv::Slot;

pub const GRUBENV_SIZE: usize = ::grubenv::BLOCK_SIZE;
pub const HEADER: &str = ::grubenv::HEADER;
pub const KEY_ALTERNATIVE: &str = ::grubenv::BOOT_ALTERNATIVE;
pub const KEY_CYCLE: &str = ::grubenv::BOOT_CYCLE;

#[derive(Debug, thiserror::Error)]
pub enum GrubEnvError {
    #[error("grubenv {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("grubenv {path} is not a GRUB environment block: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("grubenv contents exceed {GRUBENV_SIZE} bytes")]
    TooLarge,
    #[error("grubenv key {0:?} is not allowed")]
    BadKey(String),
    #[error("grubenv {path}: boot_alternative={value:?} is neither A nor B")]
    BadSlot { path: PathBuf, value: String },
}

/// `boot_cycle` values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootCycle {
    /// `stable`, or empty/absent (GRUB treats empty as stable).
    Stable,
    /// `install`: freshly installed system; GRUB makes it stable.
    Install,
    /// `first_boot`: an upgrade was written to `boot_alternative`, not yet booted.
    FirstBoot,
    /// `failsafe_check`: the new slot is booting/running, not yet confirmed;
    /// the next boot rolls back unless it is confirmed.
    FailsafeCheck,
    /// Anything else (GRUB's script leaves it alone and boots `boot_alternative`).
    Other(String),
}

impl BootCycle {
    /// Lenient: empty is `Stable`, an unknown value is `Other`.
    pub fn parse(s: &str) -> BootCycle {
        match (s, ::grubenv::BootCycle::parse(s)) {
            ("", _) => BootCycle::Stable,
            (_, Some(known)) => known.into(),
            (other, None) => BootCycle::Other(other.to_string()),
        }
    }
    pub fn as_str(&self) -> &str {
        match self {
            BootCycle::Stable => ::grubenv::BootCycle::Stable.as_str(),
            BootCycle::Install => ::grubenv::BootCycle::Install.as_str(),
            BootCycle::FirstBoot => ::grubenv::BootCycle::FirstBoot.as_str(),
            BootCycle::FailsafeCheck => ::grubenv::BootCycle::FailsafeCheck.as_str(),
            BootCycle::Other(s) => s,
        }
    }
}

impl From<::grubenv::BootCycle> for BootCycle {
    fn from(known: ::grubenv::BootCycle) -> BootCycle {
        match known {
            ::grubenv::BootCycle::Stable => BootCycle::Stable,
            ::grubenv::BootCycle::Install => BootCycle::Install,
            ::grubenv::BootCycle::FirstBoot => BootCycle::FirstBoot,
            ::grubenv::BootCycle::FailsafeCheck => BootCycle::FailsafeCheck,
        }
    }
}

/// The parsed key/value pairs of a grubenv block, in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrubEnv {
    entries: Vec<(String, String)>,
}

impl GrubEnv {
    pub fn new() -> GrubEnv {
        GrubEnv::default()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, key: &str, value: &str) {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value.to_string(),
            None => self.entries.push((key.to_string(), value.to_string())),
        }
    }

    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// Parse a block. The header is required; `#` lines (padding) are skipped.
    pub fn parse(bytes: &[u8]) -> Result<GrubEnv, String> {
        use ::grubenv::ParseError;
        let header = || "missing the \"# GRUB Environment Block\" header".to_string();
        let not_utf8 = || "line is not UTF-8".to_string();
        let mut env = GrubEnv::new();
        // Line by line, so that the first bad line is the one reported.
        for entry in ::grubenv::entries(bytes).map_err(|_| header())? {
            let (k, v) = entry.map_err(|e| match e {
                ParseError::NoHeader => header(),
                ParseError::Unterminated => "unterminated line".to_string(),
                ParseError::NotNameValue(line) => match String::from_utf8(line) {
                    Ok(line) => format!("line {line:?} is not key=value"),
                    Err(_) => not_utf8(),
                },
            })?;
            // The line is UTF-8 exactly when both halves are (`=` is ASCII).
            let k = String::from_utf8(k).map_err(|_| not_utf8())?;
            let v = String::from_utf8(v).map_err(|_| not_utf8())?;
            env.set(&k, &v);
        }
        Ok(env)
    }

    /// Encode as an exactly 1024-byte block.
    pub fn encode(&self) -> Result<Vec<u8>, GrubEnvError> {
        let vars = self.entries.iter().map(|(k, v)| (k, v));
        ::grubenv::encode(vars).map_err(|e| match e {
            ::grubenv::EncodeError::TooLarge => GrubEnvError::TooLarge,
            ::grubenv::EncodeError::BadName(k) => {
                GrubEnvError::BadKey(String::from_utf8_lossy(&k).into_owned())
            }
        })
    }

    /// Read a grubenv file. A missing file is an empty environment (GRUB's
    /// `load_env` then leaves every variable empty, which means A/stable).
    pub fn load(path: &Path) -> Result<GrubEnv, GrubEnvError> {
        let mut buf = Vec::new();
        match File::open(path) {
            Ok(f) => {
                f.take(64 * 1024)
                    .read_to_end(&mut buf)
                    .map_err(|source| GrubEnvError::Io {
                        path: path.to_path_buf(),
                        source,
                    })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(GrubEnv::new()),
            Err(source) => {
                return Err(GrubEnvError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        GrubEnv::parse(&buf).map_err(|reason| GrubEnvError::Corrupt {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Replace the file atomically: write a temp file in the same directory,
    /// fsync it, rename it over `path`, fsync the directory. `before_rename`
    /// runs between the fsync and the rename (fault injection uses it).
    pub fn store_atomic(
        &self,
        path: &Path,
        before_rename: impl FnOnce(),
    ) -> Result<(), GrubEnvError> {
        let bytes = self.encode()?;
        let io = |source| GrubEnvError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = parent_dir(path);
        let tmp = temp_path(path);
        let _ = std::fs::remove_file(&tmp);
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        before_rename();
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The temp file `store_atomic` uses (left behind only by a crash; GRUB never reads it).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "grubenv".into());
    parent_dir(path).join(format!(".{name}.keel-agent.tmp"))
}

/// An exclusive advisory lock on the grubenv's directory, held for a
/// read-modify-write (the server's upgrade and `keel-agent confirm` are
/// separate processes).
pub struct DirLock {
    _dir: File,
}

impl DirLock {
    pub fn acquire(grubenv: &Path) -> Result<DirLock, GrubEnvError> {
        let dir = parent_dir(grubenv);
        let f = File::open(&dir).map_err(|source| GrubEnvError::Io {
            path: dir.clone(),
            source,
        })?;
        // SAFETY: flock on a valid descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(GrubEnvError::Io {
                path: dir,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(DirLock { _dir: f })
    }
}

/// The A/B state as the running system sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootState {
    /// `boot_alternative` (empty means A).
    pub alternative: Slot,
    pub cycle: BootCycle,
}

impl BootState {
    pub fn from_env(env: &GrubEnv, path: &Path) -> Result<BootState, GrubEnvError> {
        let alternative = match env.get(KEY_ALTERNATIVE).unwrap_or("") {
            "" => Slot::A,
            other => Slot::parse(other).ok_or_else(|| GrubEnvError::BadSlot {
                path: path.to_path_buf(),
                value: other.to_string(),
            })?,
        };
        let cycle = BootCycle::parse(env.get(KEY_CYCLE).unwrap_or(""));
        Ok(BootState { alternative, cycle })
    }

    pub fn load(path: &Path) -> Result<BootState, GrubEnvError> {
        BootState::from_env(&GrubEnv::load(path)?, path)
    }

    /// The slot the running system booted from. While an upgrade waits for
    /// its first boot, `boot_alternative` already names the new slot.
    pub fn current(&self) -> Slot {
        match self.cycle {
            BootCycle::FirstBoot => self.alternative.other(),
            _ => self.alternative,
        }
    }

    /// Where an upgrade would be installed.
    pub fn target(&self) -> Slot {
        self.current().other()
    }

    /// The slot GRUB will boot next.
    pub fn next_boot(&self) -> Slot {
        match self.cycle {
            BootCycle::FailsafeCheck => self.alternative.other(),
            _ => self.alternative,
        }
    }

    pub fn is_stable(&self) -> bool {
        self.cycle == BootCycle::Stable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_is_1024_bytes_with_header_and_padding() {
        let mut env = GrubEnv::new();
        env.set(KEY_ALTERNATIVE, "B");
        env.set(KEY_CYCLE, "first_boot");
        let b = env.encode().unwrap();
        assert_eq!(b.len(), GRUBENV_SIZE);
        let expect = "# GRUB Environment Block\nboot_alternative=B\nboot_cycle=first_boot\n";
        assert!(b.starts_with(expect.as_bytes()));
        assert!(b[expect.len()..].iter().all(|&c| c == b'#'));
        assert_eq!(GrubEnv::parse(&b).unwrap(), env);
    }

    #[test]
    fn parse_keeps_unknown_keys_and_escapes() {
        let mut env = GrubEnv::new();
        env.set("saved_entry", "x\\y\nz");
        env.set(KEY_CYCLE, "stable");
        let b = env.encode().unwrap();
        let back = GrubEnv::parse(&b).unwrap();
        assert_eq!(back.get("saved_entry"), Some("x\\y\nz"));
        assert_eq!(back, env);
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(GrubEnv::parse(b"hello").is_err());
        assert!(GrubEnv::parse(b"# GRUB Environment Block\nnovalue\n").is_err());
        assert!(GrubEnv::parse(b"# GRUB Environment Block\nk=v").is_err());
        // Header only, no padding: valid and empty.
        assert_eq!(GrubEnv::parse(HEADER.as_bytes()).unwrap(), GrubEnv::new());
    }

    #[test]
    fn too_large_is_refused() {
        let mut env = GrubEnv::new();
        env.set("big", &"x".repeat(1000));
        assert!(matches!(env.encode(), Err(GrubEnvError::TooLarge)));
    }

    #[test]
    fn slots_follow_the_cycle() {
        let p = Path::new("/x");
        let st = |a: &str, c: &str| {
            let mut e = GrubEnv::new();
            e.set(KEY_ALTERNATIVE, a);
            e.set(KEY_CYCLE, c);
            BootState::from_env(&e, p).unwrap()
        };
        let s = BootState::from_env(&GrubEnv::new(), p).unwrap();
        assert_eq!(
            (s.current(), s.target(), s.next_boot()),
            (Slot::A, Slot::B, Slot::A)
        );
        assert!(s.is_stable());
        let s = st("B", "first_boot");
        assert_eq!(
            (s.current(), s.target(), s.next_boot()),
            (Slot::A, Slot::B, Slot::B)
        );
        let s = st("B", "failsafe_check");
        assert_eq!((s.current(), s.next_boot()), (Slot::B, Slot::A));
        let mut e = GrubEnv::new();
        e.set(KEY_ALTERNATIVE, "C");
        assert!(BootState::from_env(&e, p).is_err());
    }

    #[test]
    fn store_atomic_replaces_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("grubenv-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("grubenv");
        let mut env = GrubEnv::new();
        env.set(KEY_CYCLE, "stable");
        env.store_atomic(&path, || {}).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1024);
        assert!(!temp_path(&path).exists());
        assert_eq!(GrubEnv::load(&path).unwrap(), env);
        let _l = DirLock::acquire(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
