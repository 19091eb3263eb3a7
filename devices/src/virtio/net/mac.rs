//! NIC addresses: parsing and formatting, random ones, and the HostOS
//! scheme of deterministic addresses derived from the host's management
//! MAC (so that a node's guest keeps its address, and with it its SLAAC
//! IPv6 address, across reboots and reinstalls).

use sha2::{Digest, Sha256};

/// A locally administered, unicast MAC address from the kernel's random
/// source.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most mac.len() bytes into mac.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        // Practically unreachable; a time-and-pid mix still differs per VM.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 24);
        mac.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err("expected six hex bytes such as 6a:01:02:03:04:05".into());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err("expected six hex bytes such as 6a:01:02:03:04:05".into());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{p:?} is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err("a multicast address cannot be a NIC's address".into());
    }
    if mac == [0; 6] {
        return Err("the all-zero address is not a valid NIC address".into());
    }
    Ok(mac)
}

/// Second byte of a HostOS-style deterministic MAC: which OS the address
/// belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MacNodeType {
    /// The host itself.
    HostOs = 0x00,
    /// The guest (HostOS gives its GuestOS `6a:01:...`).
    GuestOs = 0x01,
    /// A guest started for an upgrade.
    UpgradeGuestOs = 0x02,
    /// The installer.
    SetupOs = 0x0f,
}

/// A HostOS-style deterministic MAC address, so that a node's guest keeps
/// its address (and so its SLAAC IPv6 address) across reboots and
/// reinstalls: `6a:<node type>:` followed by the first four bytes of
/// SHA-256 of the host's management MAC (lower-case, colon-separated)
/// and the deployment name, newline-terminated (the seed HostOS's shell
/// scripts hashed). Always locally administered and unicast (0x6a).
///
/// Check the result against the HostOS release in use before relying on
/// it to match addresses HostOS generated.
pub fn deterministic_mac(mgmt_mac: &[u8; 6], deployment: &str, node: MacNodeType) -> [u8; 6] {
    let seed = format!("{}{deployment}\n", format_mac(mgmt_mac));
    let h = Sha256::digest(seed.as_bytes());
    [0x6a, node as u8, h[0], h[1], h[2], h[3]]
}

/// A NIC address as configured: `aa:bb:cc:dd:ee:ff`, or
/// `hostos:<node>:<deployment>:<management MAC>` for the HostOS
/// deterministic address of `node` (`guestos`, `upgradeguestos`, `hostos`,
/// `setupos`), e.g. `hostos:guestos:mainnet:de:ad:de:ad:de:ad`.
pub fn resolve_mac(text: &str) -> Result<[u8; 6], String> {
    let Some(rest) = text.strip_prefix("hostos:") else {
        return parse_mac(text);
    };
    let usage =
        "expected hostos:<guestos|upgradeguestos|hostos|setupos>:<deployment>:<management MAC>";
    let mut parts = rest.splitn(3, ':');
    let (Some(node), Some(deployment), Some(mgmt)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(usage.into());
    };
    let node = match node.to_ascii_lowercase().as_str() {
        "guestos" => MacNodeType::GuestOs,
        "upgradeguestos" => MacNodeType::UpgradeGuestOs,
        "hostos" => MacNodeType::HostOs,
        "setupos" => MacNodeType::SetupOs,
        other => return Err(format!("unknown node type {other:?}; {usage}")),
    };
    if deployment.is_empty()
        || !deployment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "deployment {deployment:?} must be a non-empty name; {usage}"
        ));
    }
    let mgmt = parse_mac(mgmt).map_err(|why| format!("management MAC: {why}"))?;
    Ok(deterministic_mac(&mgmt, deployment, node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_macs() {
        let mgmt = [0x00, 0x1a, 0x2b, 0x3c, 0x4d, 0x5e];
        // sha256("00:1a:2b:3c:4d:5emainnet\n") = 0dbb99bf2ac6...
        assert_eq!(
            deterministic_mac(&mgmt, "mainnet", MacNodeType::GuestOs),
            [0x6a, 0x01, 0x0d, 0xbb, 0x99, 0xbf]
        );
        let host = deterministic_mac(&mgmt, "mainnet", MacNodeType::HostOs);
        assert_eq!(&host[..2], &[0x6a, 0x00]);
        assert_eq!(
            &host[2..],
            &[0x0d, 0xbb, 0x99, 0xbf],
            "same hash, other node type"
        );
        assert_ne!(
            deterministic_mac(&mgmt, "testnet", MacNodeType::GuestOs),
            deterministic_mac(&mgmt, "mainnet", MacNodeType::GuestOs)
        );
        let m = deterministic_mac(&mgmt, "x", MacNodeType::SetupOs);
        assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast");
        assert!(parse_mac(&format_mac(&m)).is_ok());
    }

    #[test]
    fn deterministic_macs_match_hostos_reference_vectors() {
        // Published with the IC's own implementation (rs/ic_os/network).
        let m = resolve_mac("hostos:guestos:mainnet:de:ad:de:ad:de:ad").unwrap();
        assert_eq!(format_mac(&m), "6a:01:f7:e0:c6:84");
        let m = resolve_mac("hostos:guestos:mainnet:B0:7B:25:C8:F6:C0").unwrap();
        assert_eq!(format_mac(&m), "6a:01:00:ec:bd:51");
    }

    #[test]
    fn resolve_mac_rejects_bad_derivations() {
        assert_eq!(
            resolve_mac("6a:01:aa:bb:cc:dd").unwrap(),
            [0x6a, 1, 0xaa, 0xbb, 0xcc, 0xdd]
        );
        for bad in [
            "hostos:",
            "hostos:guestos:mainnet",
            "hostos:router:mainnet:de:ad:de:ad:de:ad",
            "hostos:guestos::de:ad:de:ad:de:ad",
            "hostos:guestos:main net:de:ad:de:ad:de:ad",
            "hostos:guestos:mainnet:de:ad:de:ad:de",
        ] {
            assert!(resolve_mac(bad).is_err(), "{bad}");
        }
    }
}
