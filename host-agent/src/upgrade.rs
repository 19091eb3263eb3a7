//! A/B host upgrades (`upgrade {url, target-hash}`).
//!
//! Order of work, and why it is safe at every point:
//! 1. refuse unless `boot_cycle` is stable; find the inactive slot; check its
//!    three volumes open for writing (block devices with O_EXCL, so a mounted
//!    or otherwise claimed volume is refused);
//! 2. download over HTTPS to a temp file in the state dir (size cap, time
//!    limit), hashing while streaming; compare with `target-hash`:
//!    nothing has been written to any volume yet;
//! 3. read the archive once without writing (zstd + tar, streaming): both
//!    `boot.img` and `root.img` present, each fits its volume, the whole
//!    stream decodes; their SHA-256 are noted;
//! 4. write them to the inactive slot's boot and root volumes (hashing again,
//!    and refusing if the bytes differ from step 3), zero the first 16 MiB
//!    of its var volume, fsync each;
//! 5. only then commit: grubenv `boot_alternative=<new>`,
//!    `boot_cycle=first_boot`, replaced atomically.
//!
//! A failure or crash before 5 leaves grubenv pointing at the untouched
//! active slot; after 5 the new slot is complete. After the answer to the
//! guest, [`after_commit`] shuts the guest down through Keel and reboots.

use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::fault;
use crate::grubenv::{BootState, DirLock, GrubEnv, KEY_ALTERNATIVE, KEY_CYCLE};
use crate::keel_api::ApiError;
use crate::Agent;

/// Bytes of the var volume zeroed for the new slot.
pub const VAR_WIPE_BYTES: u64 = 16 << 20;
const CHUNK: usize = 1 << 20;
const MAX_ARCHIVE_ENTRIES: usize = 64;
/// Largest entry other than boot.img/root.img, and most data after the tar end.
const MAX_OTHER_ENTRY: u64 = 64 << 20;
pub const DOWNLOAD_FILE: &str = "upgrade.download";
/// Largest zstd window accepted (log2): 2^27 = 128 MiB, what `zstd --long`
/// and `zstd --ultra -22` use; the format allows up to 2^31.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("the upgrade URL's host {0:?} is not in upgrade_url_hosts")]
    HostNotAllowed(String),
    #[error("invalid upgrade request: {0}")]
    Invalid(String),
    #[error("an upgrade is already in progress")]
    Busy,
    #[error("refusing to upgrade: boot_cycle is {0:?}, not \"stable\" (an earlier upgrade still awaits its reboot or confirmation)")]
    NotStable(String),
    #[error("cannot read the boot state: {0}")]
    BootState(String),
    #[error("download failed: {0}")]
    Download(String),
    #[error("download refused: {0}")]
    TooLarge(String),
    #[error("SHA-256 mismatch: target-hash is {expected}, the download is {actual}")]
    HashMismatch { expected: String, actual: String },
    #[error("invalid upgrade image: {0}")]
    Archive(String),
    #[error("volume error: {0}")]
    Volume(String),
    #[error("cannot commit the upgrade to grubenv: {0}")]
    Commit(String),
}

impl UpgradeError {
    /// Label for the failure counter.
    pub fn reason(&self) -> &'static str {
        match self {
            UpgradeError::Invalid(_) => "invalid_request",
            UpgradeError::HostNotAllowed(_) => "host_not_allowed",
            UpgradeError::Busy => "busy",
            UpgradeError::NotStable(_) => "not_stable",
            UpgradeError::BootState(_) => "boot_state",
            UpgradeError::Download(_) => "download",
            UpgradeError::TooLarge(_) => "too_large",
            UpgradeError::HashMismatch { .. } => "hash_mismatch",
            UpgradeError::Archive(_) => "archive",
            UpgradeError::Volume(_) => "volume",
            UpgradeError::Commit(_) => "commit",
        }
    }

    /// What the guest is told: a fixed message per category. Nothing that
    /// came from the download server (bodies, statuses, TLS or archive
    /// details, the download's hash) is passed on, so that the guest cannot
    /// use the agent to read other HTTPS hosts; the host's log has the
    /// detail ([`Display`](std::fmt::Display)).
    pub fn guest_message(&self) -> String {
        const SEE_LOG: &str = "(details in the host's log)";
        match self {
            // The agent's own messages about the guest's request, and the
            // host's own volumes: nothing from the download server.
            UpgradeError::Invalid(_)
            | UpgradeError::Busy
            | UpgradeError::NotStable(_)
            | UpgradeError::Volume(_) => self.to_string(),
            UpgradeError::HostNotAllowed(_) => {
                "the upgrade URL's host is not in this host's upgrade_url_hosts".into()
            }
            UpgradeError::BootState(_) => format!("cannot read the boot state {SEE_LOG}"),
            UpgradeError::Download(_) => format!("download failed {SEE_LOG}"),
            UpgradeError::TooLarge(_) => {
                format!("download refused: the image is more than max_download_bytes {SEE_LOG}")
            }
            UpgradeError::HashMismatch { expected, .. } => {
                format!("SHA-256 mismatch: the download is not target-hash {expected}")
            }
            UpgradeError::Archive(_) => format!("invalid upgrade image {SEE_LOG}"),
            UpgradeError::Commit(_) => format!("cannot commit the upgrade to grubenv {SEE_LOG}"),
        }
    }
}

/// Checks that `url`'s host is one of `allowed` (any host when empty).
fn check_host(url: &str, allowed: &[String]) -> Result<(), UpgradeError> {
    if allowed.is_empty() {
        return Ok(());
    }
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|_| UpgradeError::Invalid("malformed URL".into()))?;
    let host = uri.host().unwrap_or_default();
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        Ok(())
    } else {
        Err(UpgradeError::HostNotAllowed(host.to_string()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Check `target-hash`: 64 hex digits (either case).
pub fn parse_hash(s: &str) -> Result<String, UpgradeError> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(UpgradeError::Invalid(
            "target-hash must be a SHA-256 in 64 hex digits".into(),
        ));
    }
    Ok(s.to_ascii_lowercase())
}

/// The upgrade, from request to commit. Blocks for the whole download and
/// install; at most one runs at a time.
pub fn run(agent: &Agent, url: &str, target_hash: &str) -> Result<(), UpgradeError> {
    let m = &agent.metrics;
    let guard = match agent.upgrade_lock.try_lock() {
        Ok(g) => g,
        // A panicked upgrade thread left no state behind that matters here.
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => {
            m.upgrade_failed(UpgradeError::Busy.reason());
            return Err(UpgradeError::Busy);
        }
    };
    m.upgrade_started();
    let result = run_locked(agent, url, target_hash);
    match &result {
        Ok(()) => m.upgrade_succeeded(),
        Err(e) => m.upgrade_failed(e.reason()),
    }
    drop(guard);
    result
}

fn run_locked(agent: &Agent, url: &str, target_hash: &str) -> Result<(), UpgradeError> {
    let cfg = &agent.config;
    let m = &agent.metrics;
    let expected = parse_hash(target_hash)?;
    if !url.to_ascii_lowercase().starts_with("https://") {
        return Err(UpgradeError::Invalid(
            "only https:// URLs are accepted".into(),
        ));
    }
    if url.len() > 8192 || url.chars().any(|c| c.is_control() || c == ' ') {
        return Err(UpgradeError::Invalid("malformed URL".into()));
    }
    check_host(url, &cfg.upgrade_url_hosts)?;

    // 1. Boot state and the volumes of the inactive slot.
    m.set_phase("checking");
    let state =
        BootState::load(&cfg.grubenv).map_err(|e| UpgradeError::BootState(e.to_string()))?;
    if !state.is_stable() {
        return Err(UpgradeError::NotStable(state.cycle.as_str().to_string()));
    }
    let target = state.target();
    let vols = cfg.volumes.slot(target);
    log::info!(
        "upgrade: running slot {}, installing to slot {} from {url}",
        state.current(),
        target
    );
    let boot_vol = Volume::open(&vols.boot)?;
    let root_vol = Volume::open(&vols.root)?;
    let var_vol = Volume::open(&vols.var)?;
    fault::point("accepted");

    // 2. Download and verify.
    m.set_phase("downloading");
    let download = TempFile(cfg.state_dir.join(DOWNLOAD_FILE));
    let actual = download_to(agent, url, &download.0)?;
    fault::point("downloaded");
    if actual != expected {
        return Err(UpgradeError::HashMismatch { expected, actual });
    }
    log::info!("upgrade: SHA-256 verified ({actual})");
    fault::point("verified");

    // 3. Check the archive without writing anything.
    m.set_phase("validating");
    let info = scan_archive(&download.0, boot_vol.size, root_vol.size, None)?;
    log::info!(
        "upgrade: image ok: boot.img {} bytes, root.img {} bytes",
        info.boot.size,
        info.root.size
    );
    fault::point("validated");

    // 4. Write the inactive slot.
    m.set_phase("writing");
    let mut vols_w = Targets {
        boot: boot_vol,
        root: root_vol,
        metrics: m,
    };
    let written = scan_archive(
        &download.0,
        vols_w.boot.size,
        vols_w.root.size,
        Some(&mut vols_w),
    )?;
    for (name, want, got) in [
        ("boot.img", &info.boot, &written.boot),
        ("root.img", &info.root, &written.root),
    ] {
        if want != got {
            return Err(UpgradeError::Archive(format!(
                "{name} changed between the check and the write; slot {target} not committed"
            )));
        }
    }
    var_vol.zero_prefix(VAR_WIPE_BYTES)?;
    log::info!(
        "upgrade: wiped the first 16 MiB of {}",
        var_vol.path.display()
    );
    fault::point("var-zeroed");

    // 5. Commit.
    m.set_phase("committing");
    commit(cfg, &state, target)?;
    fault::point("grubenv-renamed");
    log::info!(
        "upgrade: committed: grubenv boot_alternative={target} boot_cycle=first_boot; slot {target} boots next"
    );
    m.set_phase("committed");
    m.mark_dirty();
    Ok(())
}

fn commit(
    cfg: &Config,
    before: &BootState,
    target: crate::grubenv::Slot,
) -> Result<(), UpgradeError> {
    let err = |e: crate::grubenv::GrubEnvError| UpgradeError::Commit(e.to_string());
    let _lock = DirLock::acquire(&cfg.grubenv).map_err(err)?;
    let mut env = GrubEnv::load(&cfg.grubenv).map_err(err)?;
    let now = BootState::from_env(&env, &cfg.grubenv).map_err(err)?;
    if &now != before {
        return Err(UpgradeError::Commit(format!(
            "grubenv changed during the upgrade (now {}/{})",
            now.alternative,
            now.cycle.as_str()
        )));
    }
    env.set(KEY_ALTERNATIVE, target.as_str());
    env.set(KEY_CYCLE, "first_boot");
    env.store_atomic(&cfg.grubenv, || fault::point("grubenv-temp-written"))
        .map_err(err)
}

/// Removes the file when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Remove what a crashed agent may have left in the state dir.
pub fn cleanup_state_dir(cfg: &Config) {
    let p = cfg.state_dir.join(DOWNLOAD_FILE);
    if std::fs::remove_file(&p).is_ok() {
        log::info!("removed a leftover download {}", p.display());
    }
    let t = crate::grubenv::temp_path(&cfg.grubenv);
    if std::fs::remove_file(&t).is_ok() {
        log::info!("removed a leftover grubenv temp file {}", t.display());
    }
}

fn http_agent(cfg: &Config) -> Result<ureq::Agent, UpgradeError> {
    use ureq::tls::{parse_pem, PemItem, RootCerts, TlsConfig};
    let mut tls = TlsConfig::builder();
    if let Some(extra) = &cfg.extra_ca_file {
        let mut certs = Vec::new();
        let mut load = |path: &Path, required: bool| -> Result<(), UpgradeError> {
            let pem = match std::fs::read(path) {
                Ok(p) => p,
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => {
                    return Err(UpgradeError::Download(format!(
                        "cannot read CA file {}: {e}",
                        path.display()
                    )))
                }
            };
            let before = certs.len();
            for item in parse_pem(&pem) {
                if let Ok(PemItem::Certificate(c)) = item {
                    certs.push(c.to_owned());
                }
            }
            if required && certs.len() == before {
                return Err(UpgradeError::Download(format!(
                    "no certificate in CA file {}",
                    path.display()
                )));
            }
            Ok(())
        };
        load(&cfg.system_ca_file, false)?;
        load(extra, true)?;
        tls = tls.root_certs(RootCerts::new_with_certs(&certs));
    }
    let config = ureq::Agent::config_builder()
        .https_only(true)
        .http_status_as_error(true)
        .max_redirects(5)
        .timeout_global(Some(Duration::from_secs(cfg.download_timeout_s)))
        .user_agent(concat!("keel-agent/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls.build())
        .build();
    Ok(config.into())
}

/// Download `url` to `dest`, hashing as it streams; returns the SHA-256 (hex).
fn download_to(agent: &Agent, url: &str, dest: &Path) -> Result<String, UpgradeError> {
    let cfg = &agent.config;
    let m = &agent.metrics;
    let max = cfg.max_download_bytes;
    let dl = |e: String| UpgradeError::Download(e);
    let _ = std::fs::remove_file(dest);
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| dl(format!("cannot create {}: {e}", dest.display())))?;
    let http = http_agent(cfg)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(cfg.download_timeout_s);
    let resp = http.get(url).call().map_err(|e| dl(e.to_string()))?;
    // A redirect may not lead off the allowed hosts.
    check_host(
        &ureq::ResponseExt::get_uri(&resp).to_string(),
        &cfg.upgrade_url_hosts,
    )?;
    let expected_len = resp.body().content_length();
    if let Some(n) = expected_len {
        if n > max {
            return Err(UpgradeError::TooLarge(format!(
                "the image is {n} bytes, more than max_download_bytes ({max})"
            )));
        }
    }
    m.set_download(0, expected_len);
    let mut reader = resp.into_body().into_reader();
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut buf = vec![0u8; CHUNK];
    let mut next_log: u64 = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(dl(format!("after {total} bytes: {e}"))),
        };
        total += n as u64;
        if total > max {
            return Err(UpgradeError::TooLarge(format!(
                "the download passed max_download_bytes ({max})"
            )));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| dl(format!("writing {}: {e}", dest.display())))?;
        m.set_download(total, expected_len);
        if total == n as u64 {
            fault::point("download-partial");
        }
        if total >= next_log {
            match expected_len {
                Some(len) if len > 0 => {
                    log::info!(
                        "upgrade: downloaded {total} of {len} bytes ({}%)",
                        total * 100 / len
                    );
                    next_log = total + (len / 10).max(1);
                }
                _ => {
                    log::info!("upgrade: downloaded {total} bytes");
                    next_log = total + (64 << 20);
                }
            }
        }
        if Instant::now() > deadline {
            return Err(dl(format!(
                "timed out after {} s ({total} bytes)",
                cfg.download_timeout_s
            )));
        }
    }
    if let Some(len) = expected_len {
        if total != len {
            return Err(dl(format!("truncated: got {total} of {len} bytes")));
        }
    }
    out.flush().map_err(|e| dl(e.to_string()))?;
    log::info!(
        "upgrade: downloaded {total} bytes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(hex(&hasher.finalize()))
}

/// A volume of the slot being written.
pub struct Volume {
    pub path: PathBuf,
    file: File,
    /// Its size, where it has one (regular files, block devices).
    pub size: Option<u64>,
}

impl Volume {
    /// Open for writing (never creating or truncating). Block devices are
    /// opened O_EXCL: the kernel refuses if the device is mounted or claimed.
    pub fn open(path: &Path) -> Result<Volume, UpgradeError> {
        let verr = |e: std::io::Error| UpgradeError::Volume(format!("{}: {e}", path.display()));
        let meta = std::fs::metadata(path).map_err(verr)?;
        let ft = meta.file_type();
        let mut opts = OpenOptions::new();
        opts.write(true);
        if ft.is_block_device() {
            opts.custom_flags(libc::O_EXCL);
        } else if !ft.is_file() && !ft.is_char_device() {
            return Err(UpgradeError::Volume(format!(
                "{} is neither a block device nor a file",
                path.display()
            )));
        }
        let mut file = opts.open(path).map_err(verr)?;
        let size = if ft.is_file() {
            Some(meta.len())
        } else if ft.is_block_device() {
            Some(file.seek(SeekFrom::End(0)).map_err(verr)?)
        } else {
            None
        };
        file.seek(SeekFrom::Start(0)).map_err(verr)?;
        Ok(Volume {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    fn zero_prefix(&self, bytes: u64) -> Result<(), UpgradeError> {
        let verr =
            |e: std::io::Error| UpgradeError::Volume(format!("{}: {e}", self.path.display()));
        let n = self.size.map_or(bytes, |s| s.min(bytes));
        let mut f = &self.file;
        f.seek(SeekFrom::Start(0)).map_err(verr)?;
        let zeros = vec![0u8; CHUNK];
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK as u64) as usize;
            f.write_all(&zeros[..k]).map_err(verr)?;
            left -= k as u64;
        }
        f.sync_all().map_err(verr)
    }
}

/// What the archive holds for one volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    pub size: u64,
    pub sha256: String,
}

#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub boot: ImageEntry,
    pub root: ImageEntry,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    Boot,
    Root,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Boot => "boot.img",
            Which::Root => "root.img",
        }
    }
}

/// Where `scan_archive` writes, when it writes.
struct Targets<'a> {
    boot: Volume,
    root: Volume,
    metrics: &'a crate::metrics::Metrics,
}

fn which(path: &Path) -> Option<Which> {
    let mut comps = path
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir));
    let first = comps.next()?;
    if comps.next().is_some() {
        return None;
    }
    match first.as_os_str().to_str()? {
        "boot.img" => Some(Which::Boot),
        "root.img" => Some(Which::Root),
        _ => None,
    }
}

/// Stream `update-img.tar.zst`: check (and with `targets`, write) boot.img
/// and root.img. Everything streams; nothing is held in memory.
fn scan_archive(
    archive: &Path,
    boot_cap: Option<u64>,
    root_cap: Option<u64>,
    targets: Option<&mut Targets<'_>>,
) -> Result<ImageInfo, UpgradeError> {
    let f = File::open(archive)
        .map_err(|e| UpgradeError::Archive(format!("cannot open the download: {e}")))?;
    scan_stream(
        BufReader::with_capacity(CHUNK, f),
        boot_cap,
        root_cap,
        targets,
    )
}

/// Checks an `update-img.tar.zst` read from `archive` without writing
/// anything: what [`run`] does before it touches a volume (the fuzz
/// target's entry point).
pub fn check_archive<R: std::io::BufRead>(
    archive: R,
    boot_cap: Option<u64>,
    root_cap: Option<u64>,
) -> Result<ImageInfo, UpgradeError> {
    scan_stream(archive, boot_cap, root_cap, None)
}

/// [`scan_archive`] on an open stream.
fn scan_stream<R: std::io::BufRead>(
    archive: R,
    boot_cap: Option<u64>,
    root_cap: Option<u64>,
    mut targets: Option<&mut Targets<'_>>,
) -> Result<ImageInfo, UpgradeError> {
    let aerr = |e: String| UpgradeError::Archive(e);
    let mut dec = zstd::stream::read::Decoder::with_buffer(archive)
        .map_err(|e| aerr(format!("not a zstd stream: {e}")))?;
    // Accept long-distance windows up to zstd --long's default (and
    // --ultra -22's): 128 MiB. A frame asking for more is refused rather
    // than allowed to take up to 2 GiB of the agent's memory.
    dec.window_log_max(ZSTD_WINDOW_LOG_MAX)
        .map_err(|e| aerr(format!("zstd: {e}")))?;
    let mut tar = tar::Archive::new(dec);
    let mut boot: Option<ImageEntry> = None;
    let mut root: Option<ImageEntry> = None;
    let entries = tar
        .entries()
        .map_err(|e| aerr(format!("not a tar archive: {e}")))?;
    for (i, entry) in entries.enumerate() {
        if i >= MAX_ARCHIVE_ENTRIES {
            return Err(aerr(format!("more than {MAX_ARCHIVE_ENTRIES} entries")));
        }
        let mut entry = entry.map_err(|e| aerr(format!("corrupt archive: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| aerr(format!("bad entry name: {e}")))?
            .into_owned();
        let Some(w) = which(&path) else {
            // Skipping still decompresses it: keep other entries small.
            if entry.size() > MAX_OTHER_ENTRY {
                return Err(aerr(format!(
                    "unexpected large entry {} ({} bytes)",
                    path.display(),
                    entry.size()
                )));
            }
            log::info!("upgrade: ignoring archive entry {}", path.display());
            continue;
        };
        let et = entry.header().entry_type();
        if !(et.is_file() || et.is_gnu_sparse() || et == tar::EntryType::Continuous) {
            return Err(aerr(format!("{} is not a regular file", w.name())));
        }
        let slot = match w {
            Which::Boot => &mut boot,
            Which::Root => &mut root,
        };
        if slot.is_some() {
            return Err(aerr(format!("{} appears twice", w.name())));
        }
        let cap = match w {
            Which::Boot => boot_cap,
            Which::Root => root_cap,
        };
        let out = match targets.as_deref_mut() {
            Some(t) => Some((
                match w {
                    Which::Boot => &mut t.boot,
                    Which::Root => &mut t.root,
                },
                t.metrics,
            )),
            None => None,
        };
        *slot = Some(copy_entry(&mut entry, w, cap, out)?);
    }
    // Read the zstd stream to its end: that is where the frame checksum is
    // checked (tar stops at its end-of-archive blocks).
    let mut rest = tar.into_inner().take(MAX_OTHER_ENTRY + 1);
    let trailing = std::io::copy(&mut rest, &mut std::io::sink())
        .map_err(|e| aerr(format!("corrupt archive: {e}")))?;
    if trailing > MAX_OTHER_ENTRY {
        return Err(aerr("too much data after the tar archive".into()));
    }
    match (boot, root) {
        (Some(boot), Some(root)) => Ok(ImageInfo { boot, root }),
        (None, _) => Err(aerr("boot.img is missing".into())),
        (_, None) => Err(aerr("root.img is missing".into())),
    }
}

fn copy_entry(
    entry: &mut impl Read,
    w: Which,
    cap: Option<u64>,
    mut out: Option<(&mut Volume, &crate::metrics::Metrics)>,
) -> Result<ImageEntry, UpgradeError> {
    let name = w.name();
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut buf = vec![0u8; CHUNK];
    if let Some((v, _)) = out.as_mut() {
        v.file
            .seek(SeekFrom::Start(0))
            .map_err(|e| UpgradeError::Volume(format!("{}: {e}", v.path.display())))?;
    }
    let mut next_log: u64 = 256 << 20;
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(UpgradeError::Archive(format!("corrupt {name}: {e}"))),
        };
        size += n as u64;
        if let Some(cap) = cap {
            if size > cap {
                return Err(UpgradeError::Archive(format!(
                    "{name} is larger than its volume ({cap} bytes)"
                )));
            }
        }
        hasher.update(&buf[..n]);
        if let Some((v, m)) = out.as_mut() {
            v.file
                .write_all(&buf[..n])
                .map_err(|e| UpgradeError::Volume(format!("writing {}: {e}", v.path.display())))?;
            m.add_written(n as u64);
            if size == n as u64 {
                fault::point(match w {
                    Which::Boot => "boot-partial",
                    Which::Root => "root-partial",
                });
            }
            if size >= next_log {
                log::info!(
                    "upgrade: {name}: {size} bytes written to {}",
                    v.path.display()
                );
                next_log += 256 << 20;
            }
        }
    }
    if let Some((v, _)) = out {
        v.file
            .sync_all()
            .map_err(|e| UpgradeError::Volume(format!("fsync {}: {e}", v.path.display())))?;
        log::info!(
            "upgrade: {name}: {size} bytes written to {} and synced",
            v.path.display()
        );
        fault::point(match w {
            Which::Boot => "boot-written",
            Which::Root => "root-written",
        });
    }
    Ok(ImageEntry {
        size,
        sha256: hex(&hasher.finalize()),
    })
}

/// After the guest has its answer: shut it down through Keel (graceful,
/// forced after `shutdown_timeout_s`), wait until it is stopped, reboot.
pub fn after_commit(agent: &Agent) {
    let cfg = &agent.config;
    fault::point("answered");
    agent.metrics.set_phase("shutting-down-guest");
    match agent.api.shutdown(cfg.shutdown_timeout_s) {
        Ok(()) => log::info!(
            "upgrade: asked Keel to shut the guest down (graceful, forced after {} s)",
            cfg.shutdown_timeout_s
        ),
        Err(ApiError::Unavailable(..)) => {
            log::info!("upgrade: Keel is not running; no guest to stop")
        }
        Err(e) => log::warn!("upgrade: guest shutdown request failed: {e}; rebooting anyway"),
    }
    fault::point("shutdown-requested");
    let deadline = Instant::now() + Duration::from_secs(cfg.shutdown_timeout_s + 30);
    loop {
        match agent.api.vm_state() {
            Ok(s) if s == "stopped" => break,
            Err(ApiError::Unavailable(..)) => break,
            Ok(_) | Err(_) if Instant::now() >= deadline => {
                log::warn!("upgrade: the guest did not stop in time; rebooting anyway");
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    log::info!("upgrade: the guest is stopped");
    fault::point("guest-stopped");
    agent.metrics.set_phase("rebooting");
    agent.metrics.reboot_requested();
    log::info!(
        "upgrade: running the reboot command {:?}",
        cfg.reboot_command
    );
    match crate::cmd::run(&cfg.reboot_command, Duration::from_secs(120)) {
        Ok(o) if o.success => log::info!("upgrade: reboot command done"),
        Ok(o) => log::error!(
            "upgrade: reboot command failed ({}): {}",
            o.status,
            o.output
        ),
        Err(e) => log::error!("upgrade: cannot run the reboot command: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_never_sees_remote_content() {
        let secret = "<html>internal admin page: SECRET</html>";
        for e in [
            UpgradeError::Download(format!("http status 500: {secret}")),
            UpgradeError::TooLarge(format!("{secret} 123 bytes")),
            UpgradeError::Archive(format!("unexpected entry {secret}")),
            UpgradeError::BootState(secret.into()),
            UpgradeError::Commit(secret.into()),
            UpgradeError::HostNotAllowed(secret.into()),
            UpgradeError::HashMismatch {
                expected: "ab".repeat(32),
                actual: "SECRET".into(),
            },
        ] {
            let m = e.guest_message();
            assert!(!m.contains("SECRET"), "{m}");
            assert!(e.to_string().contains("SECRET"), "the log has the detail");
        }
    }

    #[test]
    fn only_allowed_hosts_are_fetched_from() {
        let allowed = vec!["updates.example.org".to_string()];
        assert!(check_host("https://10.0.0.1/x", &[]).is_ok());
        assert!(check_host("https://UPDATES.example.org:8443/a.tar.zst", &allowed).is_ok());
        for bad in [
            "https://10.0.0.1/x",
            "https://updates.example.org.evil.net/x",
            "https://user@internal/x",
        ] {
            assert!(
                matches!(
                    check_host(bad, &allowed),
                    Err(UpgradeError::HostNotAllowed(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_zstd_window_over_the_cap_is_refused() {
        use std::io::Write as _;
        let dir = std::env::temp_dir().join(format!("keel-agent-zstd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let frame = |log: u32| {
            let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            enc.window_log(log).unwrap();
            enc.long_distance_matching(true).unwrap();
            enc.write_all(&[0u8; 4096]).unwrap();
            enc.finish().unwrap()
        };
        // The frame header asks for 2^28 bytes: refused before any
        // window is allocated.
        let big = dir.join("big.tar.zst");
        std::fs::write(&big, frame(ZSTD_WINDOW_LOG_MAX + 1)).unwrap();
        let e = scan_archive(&big, None, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.to_lowercase().contains("memory") || e.contains("window"),
            "{e}"
        );
        // At the cap it decodes (and fails later, as an empty tar).
        let ok = dir.join("ok.tar.zst");
        std::fs::write(&ok, frame(ZSTD_WINDOW_LOG_MAX)).unwrap();
        let e = scan_archive(&ok, None, None, None).unwrap_err().to_string();
        assert!(!e.to_lowercase().contains("memory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hashes_and_names() {
        assert!(parse_hash("zz").is_err());
        assert!(parse_hash(&"g".repeat(64)).is_err());
        assert_eq!(parse_hash(&"AB".repeat(32)).unwrap(), "ab".repeat(32));
        assert_eq!(which(Path::new("./boot.img")), Some(Which::Boot));
        assert_eq!(which(Path::new("root.img")), Some(Which::Root));
        assert_eq!(which(Path::new("x/root.img")), None);
        assert_eq!(which(Path::new("version.txt")), None);
    }

    /// A tar.zst of `members` (name, bytes), in memory.
    fn tar_zst(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
    }

    #[test]
    fn check_archive_reads_a_stream() {
        let a = tar_zst(&[
            ("boot.img", b"boot"),
            ("VERSION", b"1\n"),
            ("./root.img", b"root!"),
        ]);
        let info = check_archive(&a[..], Some(16), Some(16)).unwrap();
        assert_eq!(info.boot.size, 4);
        assert_eq!(info.root.size, 5);
        assert_eq!(info.boot.sha256, hex(&Sha256::digest(b"boot")));
        // Too large for its volume, missing, or not an archive at all.
        assert!(check_archive(&a[..], Some(16), Some(4)).is_err());
        let no_root = tar_zst(&[("boot.img", b"boot")]);
        assert!(check_archive(&no_root[..], None, None).is_err());
        assert!(check_archive(&b"not zstd"[..], None, None).is_err());
    }
}
