//! The host side of a guest NIC: open or create the tap, bring it up, set
//! its MTU, put it on a bridge; and, when the VM ends, undo what Keel did
//! (a tap Keel created is deleted; a tap that existed before is left in
//! place but taken off the bridge if Keel put it there).

use std::io;

use log::{info, warn};

use super::netlink::Rtnl;
use super::tap::{valid_ifname, Tap};

/// How to set a tap up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TapSetup {
    /// Interface name.
    pub name: String,
    /// Bridge to attach it to.
    pub bridge: Option<String>,
    /// MTU to set.
    pub mtu: Option<u32>,
    /// Queue fds to open (IFF_MULTI_QUEUE when above 1).
    pub queues: usize,
}

/// Why a tap cannot be set up; each names the interface and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The bridge does not exist.
    #[error("bridge {0} does not exist (create it first, e.g. `ip link add {0} type bridge`)")]
    NoBridge(String),
    /// The named master is not a bridge.
    #[error("{0} is not a bridge")]
    NotABridge(String),
    /// Another process holds the tap.
    #[error("tap {0} is in use by another process (EBUSY)")]
    Busy(String),
    /// The name belongs to something else, or its queue mode differs.
    #[error("{name} cannot be opened as a tap: {why}")]
    NotATap {
        /// Interface.
        name: String,
        /// Details.
        why: String,
    },
    /// Missing privileges.
    #[error("{what} {name}: permission denied (Keel needs CAP_NET_ADMIN)")]
    Permission {
        /// The interface.
        name: String,
        /// What was attempted.
        what: &'static str,
    },
    /// /dev/net/tun is missing.
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded?)")]
    NoTunDevice(io::Error),
    /// An invalid name.
    #[error("invalid interface name {name:?}: {why}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// Any other failure.
    #[error("{what} {name}: {source}")]
    Other {
        /// The interface.
        name: String,
        /// What was attempted.
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

fn fail(name: &str, what: &'static str, e: io::Error) -> TapError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission {
            name: name.to_string(),
            what,
        },
        _ => TapError::Other {
            name: name.to_string(),
            what,
            source: e,
        },
    }
}

/// A tap set up for a VM: its queue fds (for the device) and what to undo.
pub struct HostTap {
    /// The queue fds, in queue-pair order.
    pub queues: Vec<Tap>,
    /// Undoes the set-up when dropped.
    pub teardown: TapTeardown,
    /// The tap's MTU now.
    pub mtu: u32,
}

/// Undoes a tap's set-up when dropped (see the module docs).
#[derive(Debug)]
pub struct TapTeardown {
    name: String,
    index: u32,
    created: bool,
    attached_to: Option<u32>,
}

impl HostTap {
    /// Sets the tap up as `cfg` says. Checks the bridge before creating
    /// anything; on error, whatever was done is undone.
    pub fn open(cfg: &TapSetup) -> Result<HostTap, TapError> {
        let name = cfg.name.as_str();
        valid_ifname(name).map_err(|why| TapError::BadName {
            name: name.into(),
            why,
        })?;
        let mut nl = Rtnl::new().map_err(|e| fail(name, "netlink socket for", e))?;
        let bridge = match &cfg.bridge {
            Some(br) => {
                let link = nl
                    .link_by_name(br)
                    .map_err(|e| fail(br, "looking up bridge", e))?
                    .ok_or_else(|| TapError::NoBridge(br.clone()))?;
                if !link.is_bridge {
                    return Err(TapError::NotABridge(br.clone()));
                }
                Some(link.index)
            }
            None => None,
        };
        let existed = nl
            .link_by_name(name)
            .map_err(|e| fail(name, "looking up", e))?;
        if let Some(l) = &existed {
            if !l.is_tun {
                return Err(TapError::NotATap {
                    name: name.into(),
                    why: "an interface of another kind has this name".into(),
                });
            }
        }
        let queues = Tap::open(name, cfg.queues.max(1)).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => TapError::Busy(name.into()),
            Some(libc::EINVAL) => TapError::NotATap {
                name: name.into(),
                why: if cfg.queues > 1 {
                    "it exists without multi-queue support (or is a tun device)".into()
                } else {
                    "it exists as a multi-queue tap or as a tun device".into()
                },
            },
            Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => TapError::NoTunDevice(e),
            _ => fail(
                name,
                if existed.is_some() {
                    "opening tap"
                } else {
                    "creating tap"
                },
                e,
            ),
        })?;
        let link = nl
            .link_by_name(name)
            .map_err(|e| fail(name, "looking up", e))?
            .ok_or_else(|| TapError::Other {
                name: name.into(),
                what: "looking up",
                source: io::Error::from_raw_os_error(libc::ENODEV),
            })?;
        // From here on, dropping `teardown` undoes what was done.
        let mut teardown = TapTeardown {
            name: name.into(),
            index: link.index,
            created: existed.is_none(),
            attached_to: None,
        };
        if let Some(mtu) = cfg.mtu {
            if link.mtu != Some(mtu) {
                nl.set_mtu(link.index, mtu)
                    .map_err(|e| fail(name, "setting the MTU of", e))?;
            }
        }
        if !link.up {
            nl.set_up(link.index)
                .map_err(|e| fail(name, "bringing up", e))?;
        }
        if let Some(br) = bridge {
            if link.master != Some(br) {
                nl.set_master(link.index, br)
                    .map_err(|e| fail(name, "attaching to the bridge", e))?;
                teardown.attached_to = Some(br);
            }
        }
        info!(
            "net: tap {name} ({}{}, {} queue{})",
            if teardown.created {
                "created"
            } else {
                "existing"
            },
            cfg.bridge
                .as_deref()
                .map(|b| format!(", on bridge {b}"))
                .unwrap_or_default(),
            queues.len(),
            if queues.len() == 1 { "" } else { "s" }
        );
        Ok(HostTap {
            queues,
            teardown,
            mtu: cfg.mtu.or(link.mtu).unwrap_or(1500),
        })
    }
}

impl TapTeardown {
    /// Whether Keel created the tap (and so deletes it).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Whether Keel put the tap on its bridge.
    pub fn attached(&self) -> bool {
        self.attached_to.is_some()
    }
}

impl Drop for TapTeardown {
    fn drop(&mut self) {
        let mut nl = match Rtnl::new() {
            Ok(nl) => nl,
            Err(e) => {
                warn!("net: cannot clean up tap {}: {e}", self.name);
                return;
            }
        };
        // The index may have been reused by another interface since: act
        // only on the tap of that name.
        let current = match nl.link_by_index(self.index) {
            Ok(Some(l)) if l.name == self.name => l,
            _ => return,
        };
        if self.created {
            match nl.delete(self.index) {
                Ok(()) => info!("net: tap {} deleted", self.name),
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                // Privileges dropped: the tap is not persistent, so the
                // kernel deletes it when Keel's last queue descriptor
                // closes, at exit.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => info!(
                    "net: tap {} goes away with Keel's descriptors (no CAP_NET_ADMIN to delete it now)",
                    self.name
                ),
                Err(e) => warn!("net: cannot delete tap {}: {e}", self.name),
            }
        } else if let Some(br) = self.attached_to {
            if current.master == Some(br) {
                match nl.set_master(self.index, 0) {
                    Ok(()) => info!("net: tap {} taken off its bridge", self.name),
                    Err(e) => warn!("net: cannot detach tap {} from its bridge: {e}", self.name),
                }
            }
        }
    }
}
