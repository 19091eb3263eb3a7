//! The agent's configuration: one TOML file (`keel-agent --config FILE`).
//!
//! Every field has a HostOS default, so an empty file describes a HostOS host.
//! Every invalid value is refused at load time with an error naming the field.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::grubenv::Slot;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/keel/keel-agent.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for {field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The guest's vsock CID; requests carrying another `sender_cid` are refused.
    #[serde(default = "d_guest_cid")]
    pub guest_cid: u32,
    /// Unix socket Keel forwards guest connections to host port 19090 to
    /// (Firecracker-style hybrid vsock: `<uds_path>_<port>`).
    #[serde(default = "d_vsock_socket")]
    pub vsock_socket: PathBuf,
    /// File holding the HostOS version (`GetHostOSVersion`).
    #[serde(default = "d_version_file")]
    pub version_file: PathBuf,
    /// Where downloads are staged (must hold `max_download_bytes`).
    #[serde(default = "d_state_dir")]
    pub state_dir: PathBuf,
    /// The GRUB environment block on the GRUB partition.
    #[serde(default = "d_grubenv")]
    pub grubenv: PathBuf,
    #[serde(default)]
    pub volumes: Volumes,
    /// Keel's control socket (`keel --api-socket PATH`).
    #[serde(default = "d_keel_api_socket")]
    pub keel_api_socket: PathBuf,
    /// Run (argv, no shell) once an upgrade is committed and the guest is down.
    #[serde(default = "d_reboot_command")]
    pub reboot_command: Vec<String>,
    /// systemd unit that `start-upgrade-guest-vm` starts; unset: the command is refused.
    #[serde(default)]
    pub upgrade_vm_unit: Option<String>,
    /// The systemctl binary used for `start-upgrade-guest-vm`.
    #[serde(default = "d_systemctl")]
    pub systemctl: PathBuf,
    /// Consoles `notify` prints on (HostOS: /dev/tty1 and /dev/ttyS0).
    #[serde(default = "d_consoles")]
    pub consoles: Vec<PathBuf>,
    /// Pause between two prints of one `notify` message, in seconds (HostOS: 2).
    #[serde(default = "d_notify_interval_s")]
    pub notify_interval_s: f64,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Hosts upgrade URLs may name (exact, case-insensitive; checked again
    /// after redirects). Empty: any host (the guest chooses the URL).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upgrade_url_hosts: Vec<String>,
    /// Largest upgrade image accepted (bytes).
    #[serde(default = "d_max_download_bytes")]
    pub max_download_bytes: u64,
    /// Extra CA certificate(s) (PEM) trusted for upgrade downloads, on top of
    /// `system_ca_file`. Unset: Mozilla's roots (bundled) are used.
    #[serde(default)]
    pub extra_ca_file: Option<PathBuf>,
    /// The system CA bundle, used together with `extra_ca_file` (skipped when absent).
    #[serde(default = "d_system_ca_file")]
    pub system_ca_file: PathBuf,
    /// Whole-download time limit in seconds (HostOS: 120).
    #[serde(default = "d_download_timeout_s")]
    pub download_timeout_s: u64,
    /// How long Keel may take to shut the guest down gracefully before it forces it off.
    #[serde(default = "d_shutdown_timeout_s")]
    pub shutdown_timeout_s: u64,
    #[serde(default)]
    pub vsock: VsockTuning,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlotVolumes {
    pub boot: PathBuf,
    pub root: PathBuf,
    pub var: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Volumes {
    #[serde(rename = "A")]
    pub a: SlotVolumes,
    #[serde(rename = "B")]
    pub b: SlotVolumes,
}

impl Default for Volumes {
    fn default() -> Self {
        let slot = |s: &str| SlotVolumes {
            boot: PathBuf::from(format!("/dev/hostlvm/{s}_boot")),
            root: PathBuf::from(format!("/dev/hostlvm/{s}_root")),
            var: PathBuf::from(format!("/dev/hostlvm/{s}_var")),
        };
        Volumes {
            a: slot("A"),
            b: slot("B"),
        }
    }
}

impl Volumes {
    pub fn slot(&self, slot: Slot) -> &SlotVolumes {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` of the Prometheus endpoint (`GET /metrics`); "" disables it.
    #[serde(default = "d_metrics_listen")]
    pub listen: String,
    /// node_exporter textfile-collector file, written atomically; "" disables it.
    #[serde(default = "d_metrics_textfile")]
    pub textfile: String,
    /// How often the textfile is rewritten (seconds).
    #[serde(default = "d_metrics_interval_s")]
    pub interval_s: u64,
    /// Optional TLS for the endpoint: PEM certificate chain and private key.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: d_metrics_listen(),
            textfile: d_metrics_textfile(),
            interval_s: d_metrics_interval_s(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Limits of the vsock command server (HostOS: 5 s per read, 30 s in all).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VsockTuning {
    #[serde(default = "d_max_request_bytes")]
    pub max_request_bytes: usize,
    #[serde(default = "d_read_timeout_s")]
    pub read_timeout_s: f64,
    #[serde(default = "d_total_timeout_s")]
    pub total_timeout_s: f64,
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
}

impl Default for VsockTuning {
    fn default() -> Self {
        VsockTuning {
            max_request_bytes: d_max_request_bytes(),
            read_timeout_s: d_read_timeout_s(),
            total_timeout_s: d_total_timeout_s(),
            max_connections: d_max_connections(),
        }
    }
}

impl VsockTuning {
    pub fn read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.read_timeout_s)
    }
    pub fn total_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.total_timeout_s)
    }
}

fn d_guest_cid() -> u32 {
    3
}
fn d_vsock_socket() -> PathBuf {
    "/run/keel/vsock.sock_19090".into()
}
fn d_version_file() -> PathBuf {
    "/opt/ic/share/version.txt".into()
}
fn d_state_dir() -> PathBuf {
    "/var/lib/keel-agent".into()
}
fn d_grubenv() -> PathBuf {
    "/boot/grub/grubenv".into()
}
fn d_keel_api_socket() -> PathBuf {
    "/run/keel/api.sock".into()
}
fn d_reboot_command() -> Vec<String> {
    vec!["/usr/bin/systemctl".into(), "reboot".into()]
}
fn d_systemctl() -> PathBuf {
    "/usr/bin/systemctl".into()
}
fn d_consoles() -> Vec<PathBuf> {
    vec!["/dev/tty1".into(), "/dev/ttyS0".into()]
}
fn d_notify_interval_s() -> f64 {
    2.0
}
fn d_max_download_bytes() -> u64 {
    4 << 30
}
fn d_system_ca_file() -> PathBuf {
    "/etc/ssl/certs/ca-certificates.crt".into()
}
fn d_download_timeout_s() -> u64 {
    120
}
fn d_shutdown_timeout_s() -> u64 {
    120
}
fn d_metrics_listen() -> String {
    "127.0.0.1:19100".into()
}
fn d_metrics_textfile() -> String {
    "/run/node_exporter/collector_textfile/keel_agent.prom".into()
}
fn d_metrics_interval_s() -> u64 {
    15
}
fn d_max_request_bytes() -> usize {
    64 * 1024
}
fn d_read_timeout_s() -> f64 {
    5.0
}
fn d_total_timeout_s() -> f64 {
    30.0
}
fn d_max_connections() -> usize {
    16
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("defaults parse")
    }
}

impl Config {
    /// The pause between two prints of one `notify` message.
    pub fn notify_interval(&self) -> Duration {
        Duration::from_secs_f64(self.notify_interval_s)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        // 0, 1 and 2 are the hypervisor, local and host CIDs; u32::MAX is "any".
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(invalid(
                "guest_cid",
                format!("{} is not a guest CID (3 ..= 4294967294)", self.guest_cid),
            ));
        }
        for (field, p) in [
            ("vsock_socket", &self.vsock_socket),
            ("version_file", &self.version_file),
            ("state_dir", &self.state_dir),
            ("grubenv", &self.grubenv),
            ("keel_api_socket", &self.keel_api_socket),
            ("systemctl", &self.systemctl),
            ("system_ca_file", &self.system_ca_file),
        ] {
            if !p.is_absolute() {
                return Err(invalid(field, format!("{p:?} is not an absolute path")));
            }
        }
        if self.grubenv.file_name().is_none() {
            return Err(invalid("grubenv", "must name a file"));
        }
        let mut seen: Vec<(String, &PathBuf)> = Vec::new();
        for (slot, v) in [("A", &self.volumes.a), ("B", &self.volumes.b)] {
            for (kind, p) in [("boot", &v.boot), ("root", &v.root), ("var", &v.var)] {
                let field = format!("volumes.{slot}.{kind}");
                if !p.is_absolute() {
                    return Err(invalid(&field, format!("{p:?} is not an absolute path")));
                }
                if let Some((other, _)) = seen.iter().find(|(_, q)| *q == p) {
                    return Err(invalid(
                        &field,
                        format!("{p:?} is also used for {other}; the six volumes must differ"),
                    ));
                }
                seen.push((field, p));
            }
        }
        if self.reboot_command.is_empty() || self.reboot_command[0].is_empty() {
            return Err(invalid("reboot_command", "must name a program (argv list)"));
        }
        if !Path::new(&self.reboot_command[0]).is_absolute() {
            return Err(invalid(
                "reboot_command",
                format!("{:?} must be an absolute path", self.reboot_command[0]),
            ));
        }
        if let Some(unit) = &self.upgrade_vm_unit {
            validate_unit_name(unit).map_err(|m| invalid("upgrade_vm_unit", m))?;
        }
        for c in &self.consoles {
            if !c.is_absolute() {
                return Err(invalid(
                    "consoles",
                    format!("{c:?} is not an absolute path"),
                ));
            }
        }
        let n = self.notify_interval_s;
        if !(n.is_finite() && n > 0.0 && n <= 3600.0) {
            return Err(invalid(
                "notify_interval_s",
                "must be within (0, 3600] seconds",
            ));
        }
        if let Some(h) = self.upgrade_url_hosts.iter().find(|h| {
            h.is_empty()
                || !h
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c))
        }) {
            return Err(invalid(
                "upgrade_url_hosts",
                format!("{h:?} is not a host name or address"),
            ));
        }
        if self.max_download_bytes == 0 {
            return Err(invalid("max_download_bytes", "must be > 0"));
        }
        if self.download_timeout_s == 0 {
            return Err(invalid("download_timeout_s", "must be > 0"));
        }
        if let Some(p) = &self.extra_ca_file {
            if !p.is_absolute() {
                return Err(invalid(
                    "extra_ca_file",
                    format!("{p:?} is not an absolute path"),
                ));
            }
        }
        if !self.metrics.listen.is_empty() {
            if let Err(e) = self.metrics.listen.parse::<std::net::SocketAddr>() {
                return Err(invalid(
                    "metrics.listen",
                    format!(
                        "{:?}: {e} (expected host:port, or \"\" to disable)",
                        self.metrics.listen
                    ),
                ));
            }
        }
        if !self.metrics.textfile.is_empty() {
            let p = Path::new(&self.metrics.textfile);
            if !p.is_absolute() || p.extension().and_then(|e| e.to_str()) != Some("prom") {
                return Err(invalid(
                    "metrics.textfile",
                    "must be an absolute path ending in .prom (node_exporter reads only those), or \"\"",
                ));
            }
        }
        if self.metrics.interval_s == 0 {
            return Err(invalid("metrics.interval_s", "must be > 0"));
        }
        if self.metrics.tls_cert.is_some() != self.metrics.tls_key.is_some() {
            return Err(invalid(
                "metrics.tls_cert",
                "tls_cert and tls_key go together",
            ));
        }
        let t = &self.vsock;
        if !(1024..=16 << 20).contains(&t.max_request_bytes) {
            return Err(invalid(
                "vsock.max_request_bytes",
                "must be within 1 KiB ..= 16 MiB",
            ));
        }
        for (field, v) in [
            ("vsock.read_timeout_s", t.read_timeout_s),
            ("vsock.total_timeout_s", t.total_timeout_s),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 3600.0) {
                return Err(invalid(field, "must be within (0, 3600] seconds"));
            }
        }
        if t.max_connections == 0 {
            return Err(invalid("vsock.max_connections", "must be > 0"));
        }
        Ok(())
    }
}

/// A systemd unit name we are willing to pass to systemctl: plain characters,
/// a known suffix, never an option.
pub fn validate_unit_name(unit: &str) -> Result<(), String> {
    let ok_chars = unit
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || ":_.@-\\".contains(c));
    let ok_suffix = [".service", ".target"].iter().any(|s| unit.ends_with(s));
    if unit.is_empty() || unit.len() > 255 || unit.starts_with('-') || !ok_chars || !ok_suffix {
        return Err(format!(
            "{unit:?} is not a unit name (letters, digits, \":_.@-\\\", ending in .service or .target)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_hostos_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.guest_cid, 3);
        assert_eq!(c.vsock_socket, PathBuf::from("/run/keel/vsock.sock_19090"));
        assert_eq!(c.volumes.b.var, PathBuf::from("/dev/hostlvm/B_var"));
        assert_eq!(c.consoles.len(), 2);
        assert_eq!(c.download_timeout_s, 120);
        assert_eq!(c.vsock.read_timeout_s, 5.0);
        assert_eq!(c.vsock.total_timeout_s, 30.0);
        assert_eq!(c.notify_interval(), Duration::from_secs(2));
    }

    #[test]
    fn bad_values_name_the_field() {
        for (text, field) in [
            ("guest_cid = 2", "guest_cid"),
            ("reboot_command = []", "reboot_command"),
            ("reboot_command = [\"reboot\"]", "reboot_command"),
            ("upgrade_vm_unit = \"--now\"", "upgrade_vm_unit"),
            ("upgrade_vm_unit = \"a b.service\"", "upgrade_vm_unit"),
            ("[metrics]\nlisten = \"nope\"", "metrics.listen"),
            ("[metrics]\ntextfile = \"/tmp/x.txt\"", "metrics.textfile"),
            ("[vsock]\nread_timeout_s = 0", "vsock.read_timeout_s"),
            ("notify_interval_s = 0", "notify_interval_s"),
            ("notify_interval_s = -1.0", "notify_interval_s"),
            ("notify_interval_s = nan", "notify_interval_s"),
            (
                "[volumes.A]\nboot=\"/v/1\"\nroot=\"/v/2\"\nvar=\"/v/3\"\n[volumes.B]\nboot=\"/v/4\"\nroot=\"/v/2\"\nvar=\"/v/6\"",
                "volumes.B.root",
            ),
        ] {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(field), "{text:?}: {e}");
        }
        assert!(Config::parse("no_such_key = 1").is_err());
    }

    #[test]
    fn example_file_is_the_defaults() {
        let example = Config::parse(include_str!("../keel-agent.example.toml")).unwrap();
        let defaults = Config {
            upgrade_vm_unit: Some("guestos-upgrader.service".into()),
            ..Config::default()
        };
        assert_eq!(
            toml::to_string(&example).unwrap(),
            toml::to_string(&defaults).unwrap()
        );
    }

    #[test]
    fn unit_names() {
        assert!(validate_unit_name("guestos-upgrader.service").is_ok());
        assert!(validate_unit_name("upgrade-guestos@1.service").is_ok());
        assert!(validate_unit_name("-x.service").is_err());
        assert!(validate_unit_name("x;reboot.service").is_err());
        assert!(validate_unit_name("x").is_err());
    }
}
