//! `keel-agent`: see the crate README.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use host_agent::config::{Config, DEFAULT_CONFIG_PATH};
use host_agent::grubenv::{BootCycle, BootState, DirLock, GrubEnv, KEY_CYCLE};
use host_agent::{logger, metrics, server, upgrade, Agent};

#[derive(Parser)]
#[command(
    name = "keel-agent",
    version,
    about = "Keel's HostOS agent: guest vsock commands, A/B upgrades, metrics"
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// error, warn, info, debug, trace
    #[arg(long, default_value = "info", value_parser = parse_level)]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the vsock command server and the metrics exporters.
    Serve,
    /// Mark the running slot as good (boot_cycle=stable). HostOS runs this
    /// once the guest VM is up.
    Confirm,
    /// Print the A/B slot state.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the configuration file and print the effective configuration.
    CheckConfig,
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        _ => return Err(format!("unknown log level {s:?}")),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init(cli.log_level);
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keel-agent: {e}");
            return ExitCode::from(1);
        }
    };
    let r = match cli.command {
        Cmd::Serve => serve(config),
        Cmd::Confirm => confirm(&config),
        Cmd::Status { json } => status(&config, json),
        Cmd::CheckConfig => {
            print!("{}", toml::to_string(&config).unwrap_or_default());
            Ok(())
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-agent: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(config: Config) -> Result<(), String> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| format!("state_dir {}: {e}", config.state_dir.display()))?;
    upgrade::cleanup_state_dir(&config);
    match BootState::load(&config.grubenv) {
        Ok(s) => log::info!(
            "boot state: running slot {}, boot_cycle {}, next boot {}",
            s.current(),
            s.cycle.as_str(),
            s.next_boot()
        ),
        Err(e) => log::warn!("boot state unreadable: {e} (upgrades will be refused)"),
    }
    let agent = Agent::new(config);
    // Metrics first: once the vsock socket exists, everything is up.
    metrics::spawn_http(agent.clone())?;
    metrics::spawn_textfile(agent.clone());
    let listener = server::bind(&agent.config.vsock_socket)
        .map_err(|e| format!("vsock_socket {}: {e}", agent.config.vsock_socket.display()))?;
    log::info!(
        "vsock: serving guest CID {} on {}",
        agent.config.guest_cid,
        agent.config.vsock_socket.display()
    );
    server::serve(agent, listener);
    Ok(())
}

fn confirm(config: &Config) -> Result<(), String> {
    let _lock = DirLock::acquire(&config.grubenv).map_err(|e| e.to_string())?;
    let mut env = GrubEnv::load(&config.grubenv).map_err(|e| e.to_string())?;
    let st = BootState::from_env(&env, &config.grubenv).map_err(|e| e.to_string())?;
    match st.cycle {
        BootCycle::Stable => {
            println!("slot {} is already stable", st.current());
            Ok(())
        }
        BootCycle::FirstBoot => {
            // Confirming now would make the new slot "stable" before it has
            // ever booted, removing the rollback. Not an error: guestos.service
            // runs confirm each time the guest starts.
            println!(
                "an upgrade to slot {} awaits its first boot; slot {} keeps running unconfirmed (nothing changed)",
                st.alternative,
                st.current()
            );
            Ok(())
        }
        BootCycle::FailsafeCheck | BootCycle::Install | BootCycle::Other(_) => {
            env.set(KEY_CYCLE, "stable");
            env.store_atomic(&config.grubenv, || {})
                .map_err(|e| e.to_string())?;
            log::info!("confirmed slot {} (boot_cycle=stable)", st.current());
            println!("confirmed slot {} (boot_cycle=stable)", st.current());
            Ok(())
        }
    }
}

fn status(config: &Config, json: bool) -> Result<(), String> {
    let st = BootState::load(&config.grubenv).map_err(|e| e.to_string())?;
    let version = std::fs::read_to_string(&config.version_file)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    if json {
        let v = serde_json::json!({
            "current": st.current().as_str(),
            "next_boot": st.next_boot().as_str(),
            "upgrade_target": st.target().as_str(),
            "boot_alternative": st.alternative.as_str(),
            "boot_cycle": st.cycle.as_str(),
            "stable": st.is_stable(),
            "version": version,
        });
        println!("{v}");
    } else {
        println!("version:          {version}");
        println!("running slot:     {}", st.current());
        println!("boot_alternative: {}", st.alternative);
        println!("boot_cycle:       {}", st.cycle.as_str());
        println!("next boot:        {}", st.next_boot());
        println!(
            "upgrades:         {}",
            if st.is_stable() {
                format!("accepted, into slot {}", st.target())
            } else {
                "refused until the slot is stable".to_string()
            }
        );
    }
    Ok(())
}
