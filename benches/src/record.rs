//! The JSON record format of a bench run, shared by every `keel-bench`
//! subcommand and by `keel-bench report`: one [`Record`] per table row and
//! series (Keel, an anchor such as QEMU, Firecracker or the raw host path),
//! with its median, min, max and raw samples, plus the run's [`Meta`].

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Errors reading or writing a run.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// `--json` or `--json-dir` without a path.
    #[error("{0} needs a path")]
    MissingPath(String),
    /// Reading or writing a file or directory.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A run that is not valid JSON of this format.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: serde_json::Error,
    },
}

/// One series of one row of one bench table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The table (one chart per table and unit).
    pub table: String,
    /// The row, such as `guest -> host 4 KiB`.
    pub name: String,
    /// Who was measured: `Keel`, `Keel mmio`, `Keel pci`, `QEMU microvm`,
    /// `QEMU q35`, `Firecracker`, `raw ...`.
    pub series: String,
    /// The virtio transport the row was measured over (`mmio` or `pci`);
    /// `None` for rows without one (host baselines, older runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Unit of the figures, such as `MiB/s` or `ms`.
    pub unit: String,
    /// Median of the samples (the figure the table prints).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Every sample, in the order measured.
    pub samples: Vec<f64>,
}

impl Record {
    /// A record of `samples`; `None` when there are none (a failed cell).
    pub fn new(table: &str, name: &str, series: &str, unit: &str, samples: &[f64]) -> Option<Self> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        Some(Record {
            table: table.into(),
            name: name.into(),
            series: series.into(),
            transport: None,
            unit: unit.into(),
            median: *sorted.get(sorted.len() / 2)?,
            min: *sorted.first()?,
            max: *sorted.last()?,
            samples: samples.to_vec(),
        })
    }
}

/// A VMM (or other tool) the bench looked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Found {
    /// Its name, such as `QEMU`.
    pub name: String,
    /// Where it was found; `None`: not found, not measured.
    pub path: Option<String>,
}

/// Where and when a run was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Start of the run, RFC 3339, UTC.
    pub timestamp: String,
    /// `git rev-parse HEAD` of the checkout the bench was built in, if known.
    pub git_commit: Option<String>,
    /// Host kernel release (`uname -r`).
    pub host_kernel: Option<String>,
    /// Host CPU model (`/proc/cpuinfo`).
    pub cpu_model: Option<String>,
    /// Arguments of the bench subcommand.
    pub args: Vec<String>,
    /// The VMMs the bench looked for.
    pub vmms: Vec<Found>,
}

/// One bench run: what `--json` writes and `report` reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The subcommand, such as `vsock`.
    pub bench: String,
    /// Run metadata.
    pub meta: Meta,
    /// One record per table row and series.
    pub records: Vec<Record>,
}

/// Where a run's JSON goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Not written.
    None,
    /// `--json PATH`: this file.
    File(PathBuf),
    /// `--json-dir DIR`: a new file per run in this directory.
    Dir(PathBuf),
}

/// Takes `--json PATH` and `--json-dir DIR` out of a subcommand's
/// arguments; returns the others and where the run goes.
pub fn split_args(args: &[String]) -> Result<(Vec<String>, Output), RecordError> {
    let mut rest = Vec::new();
    let mut out = Output::None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut path = || {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| RecordError::MissingPath(a.clone()))
        };
        match a.as_str() {
            "--json" => out = Output::File(path()?),
            "--json-dir" => out = Output::Dir(path()?),
            _ => rest.push(a.clone()),
        }
    }
    Ok((rest, out))
}

fn first_line(text: &str) -> Option<String> {
    text.lines()
        .next()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
}

/// The commit of the checkout `dir` is in.
fn git_commit(dir: &Path) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| first_line(&String::from_utf8_lossy(&out.stdout)))?
}

fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
}

impl Meta {
    /// This host, now, the checkout of this binary.
    pub fn here(args: &[String]) -> Self {
        use time::format_description::well_known::Rfc3339;
        Meta {
            timestamp: time::OffsetDateTime::now_utc()
                .replace_nanosecond(0)
                .ok()
                .and_then(|t| t.format(&Rfc3339).ok())
                .unwrap_or_default(),
            git_commit: git_commit(&super::bin_dir()),
            host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .and_then(|k| first_line(&k)),
            cpu_model: cpu_model(),
            args: args.to_vec(),
            vmms: Vec::new(),
        }
    }
}

impl Run {
    /// An empty run of subcommand `bench`.
    pub fn new(bench: &str, meta: Meta) -> Self {
        Run {
            bench: bench.into(),
            meta,
            records: Vec::new(),
        }
    }

    /// Notes a VMM the bench looked for and where it was found.
    pub fn found(&mut self, name: &str, path: Option<&Path>) {
        self.meta.vmms.push(Found {
            name: name.into(),
            path: path.map(|p| p.display().to_string()),
        });
    }

    /// Records one cell's samples (nothing when there are none).
    pub fn push(&mut self, table: &str, name: &str, series: &str, unit: &str, samples: &[f64]) {
        self.records
            .extend(Record::new(table, name, series, unit, samples));
    }

    /// Records one cell measured over virtio transport `transport`.
    pub fn push_on(
        &mut self,
        table: &str,
        name: &str,
        series: &str,
        transport: &str,
        unit: &str,
        samples: &[f64],
    ) {
        self.records.extend(
            Record::new(table, name, series, unit, samples).map(|r| Record {
                transport: Some(transport.into()),
                ..r
            }),
        );
    }

    /// Writes the run; returns the file written, if any.
    pub fn write(&self, out: &Output) -> Result<Option<PathBuf>, RecordError> {
        let path = match out {
            Output::None => return Ok(None),
            Output::File(p) => p.clone(),
            Output::Dir(d) => {
                std::fs::create_dir_all(d).map_err(|source| RecordError::Io {
                    path: d.clone(),
                    source,
                })?;
                let stamp: String = self
                    .meta
                    .timestamp
                    .chars()
                    .filter(char::is_ascii_digit)
                    .collect();
                d.join(format!(
                    "{}-{stamp}-{}.json",
                    self.bench,
                    std::process::id()
                ))
            }
        };
        let text = serde_json::to_string_pretty(self).map_err(|source| RecordError::Json {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&path, text + "\n").map_err(|source| RecordError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Some(path))
    }

    /// Reads a run written by [`Run::write`].
    pub fn read(path: &Path) -> Result<Self, RecordError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecordError::Io {
            path: path.into(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| RecordError::Json {
            path: path.into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn record_has_median_min_max_of_its_samples() {
        let r = Record::new("t", "row", "Keel", "ms", &[3.0, 1.0, 2.0]).expect("samples");
        assert_eq!((r.median, r.min, r.max), (2.0, 1.0, 3.0));
        assert_eq!(r.samples, vec![3.0, 1.0, 2.0]);
        assert!(Record::new("t", "row", "Keel", "ms", &[]).is_none());
    }

    #[test]
    fn json_round_trip() {
        let dir = std::env::temp_dir().join(format!("keel-record-test-{}", std::process::id()));
        let mut run = Run::new("vsock", Meta::here(&strings(&["--runs", "3"])));
        run.found("Firecracker", None);
        run.found("QEMU", Some(Path::new("/usr/bin/qemu-system-x86_64")));
        run.push(
            "vsock throughput",
            "guest -> host 4 KiB",
            "Keel",
            "MiB/s",
            &[900.5, 1000.0, 950.25],
        );
        run.push(
            "vsock throughput",
            "guest -> host 4 KiB",
            "Firecracker",
            "MiB/s",
            &[],
        );
        run.push_on(
            "vsock throughput",
            "guest -> host 4 KiB",
            "Keel pci",
            "pci",
            "MiB/s",
            &[800.0],
        );
        let path = run
            .write(&Output::Dir(dir.clone()))
            .expect("write")
            .expect("a file");
        assert!(path.starts_with(&dir));
        let back = Run::read(&path).expect("read");
        assert_eq!(back, run);
        assert_eq!(back.records.len(), 2, "the failed cell is not recorded");
        assert_eq!(back.records[0].median, 950.25);
        assert_eq!(back.records[0].transport, None);
        assert_eq!(back.records[1].transport.as_deref(), Some("pci"));
        assert!(
            back.meta.timestamp.ends_with('Z'),
            "{}",
            back.meta.timestamp
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_without_a_transport_still_read() {
        let old = r#"{"table":"t","name":"r","series":"Keel","unit":"ms","median":1.0,"min":1.0,"max":1.0,"samples":[1.0]}"#;
        let r: Record = serde_json::from_str(old).expect("an older record");
        assert_eq!(r.transport, None);
        let text = serde_json::to_string(&r).expect("json");
        assert!(!text.contains("transport"), "{text}");
    }

    #[test]
    fn json_flags_are_taken_out_of_the_arguments() {
        let (rest, out) =
            split_args(&strings(&["--runs", "3", "--json", "/tmp/r.json"])).expect("args");
        assert_eq!(rest, strings(&["--runs", "3"]));
        assert_eq!(out, Output::File("/tmp/r.json".into()));
        let (_, out) = split_args(&strings(&["--json-dir", "d"])).expect("args");
        assert_eq!(out, Output::Dir("d".into()));
        assert!(split_args(&strings(&["--json"])).is_err());
    }
}
