//! Dropping privileges once set-up has opened everything: switch to the
//! configured user and group (`--user USER[:GROUP]`, names or numbers, `[security] user`), clear
//! supplementary groups, drop every capability (effective, permitted,
//! inheritable, ambient and the bounding set) and set `PR_SET_NO_NEW_PRIVS`.
//!
//! Capabilities belong to threads, and the credentials change is applied
//! by the C library to every thread: this runs on the main thread before
//! any other thread exists, so every thread starts without privileges.

use caps::CapSet;
use log::{info, warn};
use nix::unistd::{getuid, setgroups, setresgid, setresuid, Gid, Uid};

/// The user and group Keel runs as after set-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl RunAs {
    /// Parses `USER[:GROUP]`: each part a number or a name from the host's
    /// user and group databases; a user name alone takes its primary group.
    pub fn parse(input: &str) -> Result<Self, String> {
        let (u, g) = match input.split_once(':') {
            Some((u, g)) => (u.trim(), Some(g.trim())),
            None => (input.trim(), None),
        };
        let user = lookup_user(u)?;
        let gid = match g {
            Some(g) => lookup_group(g)?,
            None => user
                .1
                .ok_or_else(|| format!("user {u:?} is a number: give its group as UID:GID"))?,
        };
        Ok(RunAs { uid: user.0, gid })
    }
}

/// A number below `u32::MAX` (which means "no id" to the kernel).
fn number(v: &str) -> Option<u32> {
    v.parse::<u32>().ok().filter(|n| *n != u32::MAX)
}

/// Resolves a user: its uid, and its primary gid when given by name.
fn lookup_user(v: &str) -> Result<(u32, Option<u32>), String> {
    if let Some(n) = number(v) {
        return Ok((n, None));
    }
    match nix::unistd::User::from_name(v) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), Some(u.gid.as_raw()))),
        Ok(None) => Err(format!("unknown user {v:?}")),
        Err(e) => Err(format!("cannot look up user {v:?}: {e}")),
    }
}

/// Resolves a group given by number or name.
fn lookup_group(v: &str) -> Result<u32, String> {
    if let Some(n) = number(v) {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(v) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!("unknown group {v:?}")),
        Err(e) => Err(format!("cannot look up group {v:?}: {e}")),
    }
}

/// Errors of dropping privileges; any one stops Keel before the guest runs.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// A capability set could not be read or changed.
    #[error("cannot drop the {0} capabilities: {1}")]
    Caps(&'static str, caps::errors::CapsError),
    /// setgroups/setresgid/setresuid failed.
    #[error("cannot switch to {what} {id}: {source}")]
    Switch {
        /// uid, gid or groups.
        what: &'static str,
        /// The id.
        id: u32,
        /// Why.
        source: nix::Error,
    },
    /// PR_SET_NO_NEW_PRIVS failed.
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
    /// A capability survived the drop.
    #[error("capabilities remain after the drop ({0})")]
    Remaining(&'static str),
}

const SETS: [(CapSet, &str); 4] = [
    (CapSet::Ambient, "ambient"),
    (CapSet::Inheritable, "inheritable"),
    (CapSet::Effective, "effective"),
    (CapSet::Permitted, "permitted"),
];

/// Drops every privilege; switches to `run_as` when given. Started as root
/// without it, Keel stays uid 0 (without any capability) and warns.
pub fn drop_privileges(run_as: Option<RunAs>) -> Result<(), PrivilegeError> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(PrivilegeError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    // The bounding set needs CAP_SETPCAP, so it goes first.
    let can_setpcap = caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP)
        .map_err(|e| PrivilegeError::Caps("effective", e))?;
    if can_setpcap {
        caps::clear(None, CapSet::Bounding).map_err(|e| PrivilegeError::Caps("bounding", e))?;
    }
    match run_as {
        Some(r) => {
            let switch = |what, id| move |source| PrivilegeError::Switch { what, id, source };
            setgroups(&[]).map_err(switch("groups", r.gid))?;
            let gid = Gid::from_raw(r.gid);
            setresgid(gid, gid, gid).map_err(switch("gid", r.gid))?;
            let uid = Uid::from_raw(r.uid);
            setresuid(uid, uid, uid).map_err(switch("uid", r.uid))?;
        }
        None if getuid().is_root() => warn!(
            "running as root without --user (or [security] user): every capability is dropped, \
             but files owned by root stay writable; run as an unprivileged user"
        ),
        None => {}
    }
    for (set, name) in SETS {
        caps::clear(None, set).map_err(|e| PrivilegeError::Caps(name, e))?;
    }
    for (set, name) in SETS.into_iter().chain([(CapSet::Bounding, "bounding")]) {
        let left = caps::read(None, set).map_err(|e| PrivilegeError::Caps(name, e))?;
        if !left.is_empty() && (name != "bounding" || can_setpcap) {
            return Err(PrivilegeError::Remaining(name));
        }
    }
    if !can_setpcap {
        warn!("no CAP_SETPCAP: the capability bounding set is left as it was");
    }
    info!(
        "privileges dropped: uid {} gid {}, no capabilities, no_new_privs",
        getuid(),
        nix::unistd::getgid()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_is_uid_colon_gid() {
        assert_eq!(
            RunAs::parse("65534:100"),
            Ok(RunAs {
                uid: 65534,
                gid: 100
            })
        );
        assert!(RunAs::parse("65534").is_err());
        assert!(RunAs::parse("no-such-user-keel:1").is_err());
        assert!(RunAs::parse("1:no-such-group-keel").is_err());
        // Names resolve through the user and group databases.
        let root = nix::unistd::User::from_name("root").unwrap().unwrap();
        assert_eq!(
            RunAs::parse("root:0"),
            Ok(RunAs {
                uid: root.uid.as_raw(),
                gid: 0
            })
        );
        assert!(RunAs::parse("1:-1").is_err());
        assert!(RunAs::parse("4294967295:1").is_err());
    }
}
