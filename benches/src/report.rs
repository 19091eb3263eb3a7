//! `keel-bench report DIR [DIR...] --out OUT_DIR`: SVG bar charts of bench
//! runs written with `--json`/`--json-dir`, one chart per bench table and
//! unit. Each row is a group of bars: every series (Keel beside its anchors:
//! QEMU, Firecracker, the raw host path) and, with several runs, every run
//! of that series side by side, older runs paler, so a change can be read
//! against the last run at a glance.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::record::{RecordError, Run};

/// Errors making a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Reading a run or writing a chart.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// Writing a chart.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// Drawing a chart.
    #[error("drawing {chart}: {why}")]
    Draw {
        /// The chart's title.
        chart: String,
        /// What plotters said.
        why: String,
    },
    /// No run had a record.
    #[error("no records in {0}")]
    Empty(String),
    /// Bad arguments.
    #[error("usage: keel-bench report DIR|FILE [DIR|FILE...] --out OUT_DIR")]
    Usage,
}

/// One run as the report labels it.
pub struct LabelledRun {
    /// Its label in the legend (the directory or file it came from).
    pub label: String,
    /// The run.
    pub run: Run,
}

/// Runs in `path`: the file itself, or every `*.json` in the directory
/// (sorted by name), labelled by the path's file name; several runs of the
/// same bench in one directory are numbered.
pub fn load(path: &Path) -> Result<Vec<LabelledRun>, ReportError> {
    let base = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    if path.is_file() {
        return Ok(vec![LabelledRun {
            label: base,
            run: Run::read(path)?,
        }]);
    }
    let io = |source| ReportError::Io {
        path: path.into(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let runs = files
        .iter()
        .map(|f| Run::read(f))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out: Vec<LabelledRun> = Vec::new();
    for run in runs {
        let seen = out.iter().filter(|r| r.run.bench == run.bench).count();
        let label = if seen == 0 {
            base.clone()
        } else {
            format!("{base} #{}", seen + 1)
        };
        out.push(LabelledRun { label, run });
    }
    Ok(out)
}

/// One chart: a table's rows in one unit, across runs.
#[derive(Debug, PartialEq)]
pub struct Chart {
    /// `bench: table (unit)`.
    pub title: String,
    /// File name, without `.svg`.
    pub file: String,
    /// The unit of the y axis.
    pub unit: String,
    /// Row names, in the order first seen.
    pub rows: Vec<String>,
    /// Bars per row: one per (series, run), in this order.
    pub bars: Vec<Bar>,
}

/// One bar of every row: a series in a run.
#[derive(Debug, PartialEq)]
pub struct Bar {
    /// Legend text.
    pub label: String,
    /// Index of the series (its colour).
    pub series: usize,
    /// Index of the run (older runs paler).
    pub run: usize,
    /// The median of each row, `None` where it was not measured.
    pub values: Vec<Option<f64>>,
}

fn push_new(v: &mut Vec<String>, s: &str) -> usize {
    v.iter().position(|x| x == s).unwrap_or_else(|| {
        v.push(s.to_string());
        v.len() - 1
    })
}

fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Groups the runs' records into charts, one per bench, table and unit.
pub fn charts(runs: &[LabelledRun]) -> Vec<Chart> {
    // (bench, table, unit) in the order first seen.
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in runs {
        for rec in &r.run.records {
            let k = (r.run.bench.clone(), rec.table.clone(), rec.unit.clone());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    let several = runs.len() > 1;
    keys.into_iter()
        .map(|(bench, table, unit)| {
            let in_chart = |r: &LabelledRun| {
                r.run
                    .records
                    .iter()
                    .filter(|x| r.run.bench == bench && x.table == table && x.unit == unit)
                    .cloned()
                    .collect::<Vec<_>>()
            };
            let (mut rows, mut series) = (Vec::new(), Vec::new());
            for r in runs {
                for rec in in_chart(r) {
                    push_new(&mut rows, &rec.name);
                    push_new(&mut series, &rec.series);
                }
            }
            let mut bars = Vec::new();
            for (si, s) in series.iter().enumerate() {
                for (ri, r) in runs.iter().enumerate() {
                    let recs = in_chart(r);
                    if !recs.iter().any(|x| &x.series == s) {
                        continue;
                    }
                    bars.push(Bar {
                        label: if several {
                            format!("{s} ({})", r.label)
                        } else {
                            s.clone()
                        },
                        series: si,
                        run: ri,
                        values: rows
                            .iter()
                            .map(|row| {
                                recs.iter()
                                    .find(|x| &x.series == s && &x.name == row)
                                    .map(|x| x.median)
                            })
                            .collect(),
                    });
                }
            }
            Chart {
                file: slug(&format!("{bench} {table} {unit}")),
                title: format!("{bench}: {table} ({unit})"),
                unit,
                rows,
                bars,
            }
        })
        .collect()
}

/// Series colours: Keel first in every table, then the anchors.
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// The colour of a bar: its series' colour, paler the older its run
/// (`runs` in all; the last run is full colour).
pub fn bar_colour(series: usize, run: usize, runs: usize) -> RGBColor {
    let RGBColor(r, g, b) = PALETTE[series % PALETTE.len()];
    let runs = runs.max(1);
    let pale = (runs - 1 - run.min(runs - 1)) as f64 * 0.5 / runs as f64;
    let mix = |c: u8| (f64::from(c) + (255.0 - f64::from(c)) * pale).round() as u8;
    RGBColor(mix(r), mix(g), mix(b))
}

/// A figure as a bar label: three significant digits or so.
fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The chart as SVG text.
pub fn svg(chart: &Chart, runs: usize) -> Result<String, ReportError> {
    let draw = |why: String| ReportError::Draw {
        chart: chart.title.clone(),
        why,
    };
    let groups = chart.rows.len().max(1);
    let per = chart.bars.len().max(1);
    let width = (160 + groups * (per * 28 + 24)).clamp(480, 1400) as u32;
    let top = chart
        .bars
        .iter()
        .flat_map(|b| b.values.iter().flatten())
        .fold(0.0f64, |a, &v| a.max(v));
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let mut text = String::new();
    {
        let root = SVGBackend::with_string(&mut text, (width, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw(e.to_string()))?;
        let mut c = ChartBuilder::on(&root)
            .caption(&chart.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..groups as f64, 0f64..top)
            .map_err(|e| draw(e.to_string()))?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc(chart.unit.as_str())
            .draw()
            .map_err(|e| draw(e.to_string()))?;
        // Row names under their groups of bars.
        let under = ("sans-serif", 12)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (i, row) in chart.rows.iter().enumerate() {
            let (x, y) = c.backend_coord(&(i as f64 + 0.5, 0.0));
            root.draw(&Text::new(row.as_str(), (x, y + 8), under.clone()))
                .map_err(|e| draw(e.to_string()))?;
        }
        let slot = 0.8 / per as f64;
        for (bi, bar) in chart.bars.iter().enumerate() {
            let colour = bar_colour(bar.series, bar.run, runs);
            let x0 = |row: usize| row as f64 + 0.1 + bi as f64 * slot;
            let cells: Vec<(usize, f64)> = bar
                .values
                .iter()
                .enumerate()
                .filter_map(|(i, v)| v.map(|v| (i, v)))
                .collect();
            c.draw_series(cells.iter().map(|&(i, v)| {
                Rectangle::new([(x0(i), 0.0), (x0(i) + slot * 0.9, v)], colour.filled())
            }))
            .map_err(|e| draw(e.to_string()))?
            .label(bar.label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
            c.draw_series(cells.iter().map(|&(i, v)| {
                Text::new(
                    short(v),
                    (x0(i) + slot * 0.45, v),
                    ("sans-serif", 10)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))
            .map_err(|e| draw(e.to_string()))?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw(e.to_string()))?;
        root.present().map_err(|e| draw(e.to_string()))?;
    }
    Ok(text)
}

/// Writes one SVG per chart of `runs` into `out`; returns the files.
pub fn write(runs: &[LabelledRun], out: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let all = charts(runs);
    if all.is_empty() {
        let labels: Vec<&str> = runs.iter().map(|r| r.label.as_str()).collect();
        return Err(ReportError::Empty(labels.join(", ")));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReportError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut files = Vec::new();
    for chart in &all {
        let path = out.join(format!("{}.svg", chart.file));
        std::fs::write(&path, svg(chart, runs.len())?).map_err(io(&path))?;
        files.push(path);
    }
    Ok(files)
}

/// The `report` subcommand.
pub fn main(args: &[String]) -> Result<(), ReportError> {
    let mut inputs = Vec::new();
    let mut out = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(it.next().ok_or(ReportError::Usage)?)),
            _ => inputs.push(PathBuf::from(a)),
        }
    }
    let out = out.ok_or(ReportError::Usage)?;
    if inputs.is_empty() {
        return Err(ReportError::Usage);
    }
    let mut runs = Vec::new();
    for i in &inputs {
        runs.extend(load(i)?);
    }
    for f in write(&runs, &out)? {
        println!("{}", f.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Meta, Run};

    fn run(values: &[(&str, &str, f64)]) -> Run {
        let mut r = Run::new("vsock", Meta::here(&[]));
        for &(row, series, v) in values {
            r.push(
                "vsock throughput",
                row,
                series,
                "MiB/s",
                &[v, v * 0.9, v * 1.1],
            );
        }
        r.push("round trip", "connect-request-reply", "Keel", "µs", &[50.0]);
        r
    }

    /// `<rect>`s of one fill colour: (y, height) of each, left to right.
    fn rects(doc: &roxmltree::Document<'_>, colour: RGBColor) -> Vec<(f64, f64)> {
        let fill = format!("#{:02X}{:02X}{:02X}", colour.0, colour.1, colour.2);
        let mut v: Vec<(f64, f64, f64)> = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect"))
            .filter(|n| {
                n.attribute("fill")
                    .is_some_and(|f| f.eq_ignore_ascii_case(&fill))
            })
            .filter_map(|n| {
                let num = |a| n.attribute(a)?.parse::<f64>().ok();
                Some((num("x")?, num("y")?, num("height")?))
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v.into_iter().map(|(_, y, h)| (y, h)).collect()
    }

    #[test]
    fn a_run_makes_one_chart_per_table_and_unit() {
        let runs = [LabelledRun {
            label: "a".into(),
            run: run(&[("tx 4 KiB", "Keel", 100.0), ("tx 4 KiB", "raw", 200.0)]),
        }];
        let c = charts(&runs);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].file, "vsock-vsock-throughput-mib-s");
        assert_eq!(c[0].rows, vec!["tx 4 KiB"]);
        assert_eq!(c[0].bars.len(), 2);
        assert_eq!(c[0].bars[1].values, vec![Some(200.0)]);
    }

    #[test]
    fn svg_has_every_row_name_and_a_bar_per_value() {
        let dir = std::env::temp_dir().join(format!("keel-report-test-{}", std::process::id()));
        let in_dir = dir.join("last");
        let r = run(&[
            ("guest -> host 4 KiB", "Keel", 400.0),
            ("guest -> host 4 KiB", "raw Unix socket", 800.0),
            ("host -> guest 64 KiB", "Keel", 300.0),
            ("host -> guest 64 KiB", "raw Unix socket", 600.0),
        ]);
        r.write(&crate::record::Output::Dir(in_dir.clone()))
            .expect("write run");
        let runs = load(&in_dir).expect("load");
        let files = write(&runs, &dir.join("out")).expect("report");
        assert_eq!(files.len(), 2);
        let text = std::fs::read_to_string(&files[0]).expect("svg");
        let doc = roxmltree::Document::parse(&text).expect("valid SVG");
        let texts: Vec<String> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_string()))
            .collect();
        for name in [
            "guest -> host 4 KiB",
            "host -> guest 64 KiB",
            "Keel",
            "raw Unix socket",
        ] {
            assert!(texts.iter().any(|t| t == name), "{name} not in {texts:?}");
        }
        // Keel's bars (first colour), one per row plus its legend swatch,
        // and raw's: heights in proportion to the medians.
        let keel = rects(&doc, bar_colour(0, 0, 1));
        let raw = rects(&doc, bar_colour(1, 0, 1));
        let tall = |v: &[(f64, f64)]| -> Vec<f64> {
            v.iter().map(|r| r.1).filter(|&h| h > 10.0).collect()
        };
        let (k, w) = (tall(&keel), tall(&raw));
        assert_eq!((k.len(), w.len()), (2, 2), "keel {keel:?} raw {raw:?}");
        assert!((k[0] / k[1] - 400.0 / 300.0).abs() < 0.02, "{k:?}");
        assert!((w[0] / k[0] - 2.0).abs() < 0.02, "{w:?} {k:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn several_runs_stand_side_by_side_older_paler() {
        let runs = [
            LabelledRun {
                label: "before".into(),
                run: run(&[("tx", "Keel", 100.0)]),
            },
            LabelledRun {
                label: "after".into(),
                run: run(&[("tx", "Keel", 150.0)]),
            },
        ];
        let c = charts(&runs);
        let labels: Vec<&str> = c[0].bars.iter().map(|b| b.label.as_str()).collect();
        assert_eq!(labels, vec!["Keel (before)", "Keel (after)"]);
        assert_ne!(bar_colour(0, 0, 2), bar_colour(0, 1, 2));
        assert_eq!(bar_colour(0, 1, 2), bar_colour(0, 0, 1));
        let text = svg(&c[0], 2).expect("svg");
        let doc = roxmltree::Document::parse(&text).expect("valid SVG");
        let old = rects(&doc, bar_colour(0, 0, 2));
        let new = rects(&doc, bar_colour(0, 1, 2));
        let h = |v: &[(f64, f64)]| v.iter().map(|r| r.1).fold(0.0, f64::max);
        assert!((h(&new) / h(&old) - 1.5).abs() < 0.02, "{old:?} {new:?}");
    }
}
