//! `keel-agent`: the thin host agent that sits next to Keel on a HostOS-style
//! host. It answers the guest's vsock commands (HostOS vsock protocol v1),
//! installs A/B host upgrades, and exports metrics. See `README.md`.

pub mod cmd;
pub mod config;
pub mod fault;
pub mod grub_model;
pub mod grubenv;
pub mod json_frame;
pub mod keel_api;
pub mod logger;
pub mod metrics;
pub mod notify;
pub mod protocol;
pub mod server;
pub mod upgrade;

use std::sync::Arc;

/// Everything a running agent shares between its threads.
pub struct Agent {
    pub config: config::Config,
    pub metrics: metrics::Metrics,
    pub api: keel_api::KeelApi,
    pub notifier: notify::Notifier,
    /// Held while an upgrade runs (only one at a time).
    pub upgrade_lock: std::sync::Mutex<()>,
}

impl Agent {
    pub fn new(config: config::Config) -> Arc<Agent> {
        let api = keel_api::KeelApi::new(config.keel_api_socket.clone());
        let mut notifier = notify::Notifier::new(config.consoles.clone());
        notifier.interval = config.notify_interval();
        Arc::new(Agent {
            config,
            metrics: metrics::Metrics::default(),
            api,
            notifier,
            upgrade_lock: std::sync::Mutex::new(()),
        })
    }
}
