//! Who is calling: the peer's uid and groups from the kernel
//! (SO_PEERCRED, SO_PEERGROUPS), mapped to a role through configured groups.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Nothing.
    None,
    /// Query the VM and watch the console.
    ReadOnly,
    /// Also change the VM's state and type into the console.
    Admin,
}

/// The caller's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Primary and supplementary groups.
    pub groups: Vec<u32>,
}

/// Group to role mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RolePolicy {
    /// Members are admins.
    pub admin_gid: Option<u32>,
    /// Members are read-only.
    pub readonly_gid: Option<u32>,
}

impl RolePolicy {
    /// The role of `peer`: root and the admin group are admins, the
    /// read-only group read-only, anyone else nothing.
    pub fn role(&self, peer: &Peer) -> Role {
        let member = |g: Option<u32>| g.is_some_and(|g| peer.groups.contains(&g));
        if peer.uid == 0 || member(self.admin_gid) {
            Role::Admin
        } else if member(self.readonly_gid) {
            Role::ReadOnly
        } else {
            Role::None
        }
    }
}

/// Reads the peer's credentials from the kernel.
pub fn peer_of(stream: &UnixStream) -> std::io::Result<Peer> {
    let fd = stream.as_raw_fd();
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the size given; both point at
    // live locals.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut groups = vec![cred.gid];
    let mut buf = [0 as libc::gid_t; 256];
    let mut len = std::mem::size_of_val(&buf) as libc::socklen_t;
    // SAFETY: SO_PEERGROUPS writes at most `len` bytes of gids into `buf`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r == 0 {
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        groups.extend_from_slice(&buf[..n.min(buf.len())]);
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_groups() {
        let p = RolePolicy {
            admin_gid: Some(10),
            readonly_gid: Some(20),
        };
        let peer = |uid, groups: &[u32]| Peer {
            pid: 1,
            uid,
            groups: groups.to_vec(),
        };
        assert_eq!(p.role(&peer(0, &[0])), Role::Admin);
        assert_eq!(p.role(&peer(1000, &[1000, 10])), Role::Admin);
        assert_eq!(p.role(&peer(1000, &[20])), Role::ReadOnly);
        assert_eq!(p.role(&peer(1000, &[1000])), Role::None);
        assert_eq!(RolePolicy::default().role(&peer(1000, &[20])), Role::None);
    }

    #[test]
    fn own_credentials_come_from_the_kernel() {
        let (a, _b) = UnixStream::pair().unwrap();
        let me = peer_of(&a).unwrap();
        // SAFETY: getuid/getgid have no preconditions.
        assert_eq!(me.uid, unsafe { libc::getuid() });
        assert!(me.groups.contains(&unsafe { libc::getgid() }));
        assert_eq!(me.pid as u32, std::process::id());
    }
}
