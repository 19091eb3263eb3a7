//! `keel`: boot one VM from a config file and/or Cloud Hypervisor style
//! flags, run it until it ends, exit with a code saying how it ended.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{CommandFactory, FromArgMatches};
use log::{error, LevelFilter};
use vmm::config::{FlagOverrides, VmConfig};
use vmm::exit::EXIT_CONFIG_ERROR;

/// Keel: a VMM for one large, security-critical guest.
///
/// `--help` ends with the table of exit codes (`vmm::exit::EXIT_CODES`).
#[derive(clap::Parser, Debug)]
#[command(name = "keel", version)]
struct Args {
    /// TOML config file; flags given too override its settings.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel: ELF vmlinux (PVH entry used when present) or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Boot the GuestOS from its disk (the first, or payload.boot_disk):
    /// guestos (the slot grubenv selects) or upgrade (the opposite slot).
    /// Excludes --kernel, --initrd and --cmdline.
    #[arg(long, value_name = "ROLE", conflicts_with_all = ["kernel", "initrd", "cmdline"])]
    boot_slot: Option<String>,
    /// Guest memory: size=512M[,hugepages=on|off|auto][,overcommit=on][,numa=on].
    #[arg(long, value_name = "OPTIONS")]
    memory: Option<String>,
    /// vCPUs: boot=N[,sockets=S,cores=C,threads=T][,mask=feat1:feat2].
    #[arg(long, value_name = "OPTIONS")]
    cpus: Option<String>,
    /// A virtio-blk disk (repeatable): path=P[,readonly=on][,direct=on][,serial=ID][,engine=io_uring|sync][,cow=partition:N[,cow_limit=SIZE]].
    #[arg(long = "disk", value_name = "OPTIONS")]
    disks: Vec<String>,
    /// A virtio-net NIC on a tap (repeatable): tap=NAME[,bridge=BR][,mac=MAC][,mtu=N][,queues=N].
    #[arg(long = "net", value_name = "OPTIONS")]
    nets: Vec<String>,
    /// virtio-vsock: cid=N,socket=PATH[,allow_host_connect=on].
    #[arg(long, value_name = "OPTIONS")]
    vsock: Option<String>,
    /// The machine: acpi=on|off (ACPI tables; on by default)[,transport=mmio|pci].
    #[arg(long, value_name = "OPTIONS")]
    machine: Option<String>,
    /// Transport of the virtio devices: pci (default: virtio-pci functions
    /// on a PCI host bridge, with MSI-X) | mmio (virtio-mmio windows).
    #[arg(long, value_name = "mmio|pci")]
    transport: Option<String>,
    /// Boot monitor: on | off | timeout_s=N[,consoles=PATH:PATH] (watches
    /// the console for GUESTOS BOOT SUCCESS/FAILURE; on, 300 s by default).
    #[arg(long, value_name = "OPTIONS")]
    boot_monitor: Option<String>,
    /// Config disk: dir=PATH (a read-only FAT disk labelled CONFIG with the
    /// directory's files, after the other disks).
    #[arg(long, value_name = "OPTIONS")]
    config_disk: Option<String>,
    /// Control API socket (HTTP/1.1 + JSON over a Unix socket).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Seconds a graceful shutdown waits before a forced stop (default 120).
    #[arg(long, value_name = "SECONDS")]
    shutdown_timeout: Option<u64>,
    /// How a graceful shutdown asks the guest: acpi (power button, the
    /// default) or ctrl-alt-del.
    #[arg(long, value_name = "METHOD")]
    shutdown_method: Option<String>,
    /// After device work, poll for more for up to this many µs before
    /// sleeping (default 0: sleep at once; at most 1000).
    #[arg(long, value_name = "MICROSECONDS")]
    device_poll_us: Option<u32>,
    /// Serial console: stdout | off | file=PATH.
    #[arg(long, value_name = "MODE")]
    serial: Option<String>,
    /// Seccomp filters per thread: on (default) | off (debugging only:
    /// logs a loud warning).
    #[arg(long, value_name = "on|off")]
    seccomp: Option<String>,
    /// After set-up, run as this user and group (names or numbers,
    /// `USER[:GROUP]`; a user name alone takes its primary group), with no
    /// capabilities and no supplementary groups.
    #[arg(long, value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info", value_name = "LEVEL", value_parser = parse_level)]
    log_level: LevelFilter,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?} (error, warn, info, debug, trace, off)"))
}

fn config_from(args: &Args) -> Result<VmConfig, vmm::config::ConfigError> {
    let mut config = match &args.config {
        Some(path) => VmConfig::from_file(path)?,
        None => VmConfig::default(),
    };
    config.apply_flags(&FlagOverrides {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        boot_slot: args.boot_slot.clone(),
        memory: args.memory.clone(),
        cpus: args.cpus.clone(),
        serial: args.serial.clone(),
        disks: args.disks.clone(),
        api_socket: args.api_socket.clone(),
        shutdown_timeout_s: args.shutdown_timeout,
        shutdown_method: args.shutdown_method.clone(),
        device_poll_us: args.device_poll_us,
        vsock: args.vsock.clone(),
        machine: args.machine.clone(),
        transport: args.transport.clone(),
        boot_monitor: args.boot_monitor.clone(),
        config_disk: args.config_disk.clone(),
        nets: args.nets.clone(),
        seccomp: args.seccomp.clone(),
        user: args.user.clone(),
    })?;
    Ok(config)
}

fn main() -> ExitCode {
    let start = Instant::now();
    let matches = Args::command()
        .after_help(vmm::exit::exit_codes_help())
        .get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    vmm::logger::init(args.log_level);
    // A panic anywhere (a vCPU or device thread included) ends the whole
    // VMM: a half-dead VMM holding a guest is worse than a clean restart.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        error!("internal error (panic); aborting");
        std::process::abort();
    }));
    if let Err(e) = vmm::vmm::block_stop_signals() {
        error!("cannot block SIGTERM/SIGINT: {e}");
        return ExitCode::from(EXIT_CONFIG_ERROR);
    }
    let config = match config_from(&args) {
        Ok(c) => c,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EXIT_CONFIG_ERROR);
        }
    };
    if args.print_config {
        return match toml::to_string(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!("cannot print config: {e}");
                ExitCode::from(EXIT_CONFIG_ERROR)
            }
        };
    }
    let vmm = match vmm::builder::build_and_start(&config, start) {
        Ok(v) => v,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(EXIT_CONFIG_ERROR);
        }
    };
    let outcome = vmm.run();
    ExitCode::from(outcome.exit_code())
}
