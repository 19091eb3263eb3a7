//! The shipped GRUB snippet (`resources/grub/keel-ab.cfg`) and the Rust model
//! (`grub_model`) agree: the snippet's state-machine section is run by a tiny
//! interpreter for the GRUB script subset it uses, on every combination of
//! grubenv values, and compared with the model. The whole snippet is
//! syntax-checked by GRUB's own `grub-script-check` too (from grub-common: a
//! missing tool fails the test).

use host_agent::grub_model;
use host_agent::grubenv::{GrubEnv, KEY_ALTERNATIVE, KEY_CYCLE};
use std::collections::HashMap;
use std::path::PathBuf;

fn snippet_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/grub/keel-ab.cfg")
}

#[derive(Debug)]
struct Cond {
    var: String,
    eq: bool,
    lit: String,
}

#[derive(Debug)]
enum Stmt {
    LoadEnv,
    SaveEnv(Vec<String>),
    Set(String, String),
    If(Vec<(Cond, Vec<Stmt>)>, Vec<Stmt>),
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

fn parse_cond(s: &str) -> Cond {
    let inner = s
        .trim()
        .strip_prefix("[ ")
        .and_then(|s| s.strip_suffix(" ]"))
        .unwrap_or_else(|| panic!("unsupported condition {s:?}"));
    let t: Vec<&str> = inner.split_whitespace().collect();
    assert_eq!(t.len(), 3, "unsupported condition {s:?}");
    let var = unquote(t[0])
        .strip_prefix("${")
        .and_then(|v| v.strip_suffix('}'))
        .unwrap_or_else(|| panic!("left side must be \"${{var}}\": {s:?}"));
    let eq = match t[1] {
        "=" => true,
        "!=" => false,
        op => panic!("unsupported operator {op}"),
    };
    Cond {
        var: var.to_string(),
        eq,
        lit: unquote(t[2]).to_string(),
    }
}

fn parse_block(lines: &[&str], i: &mut usize, stop: &[&str]) -> Vec<Stmt> {
    let mut out = Vec::new();
    while *i < lines.len() {
        let l = lines[*i];
        if stop
            .iter()
            .any(|s| l == *s || l.starts_with(&format!("{s} ")))
        {
            return out;
        }
        *i += 1;
        if l == "load_env" {
            out.push(Stmt::LoadEnv);
        } else if let Some(rest) = l.strip_prefix("save_env ") {
            out.push(Stmt::SaveEnv(
                rest.split_whitespace().map(str::to_string).collect(),
            ));
        } else if let Some(rest) = l.strip_prefix("set ") {
            let (k, v) = rest.split_once('=').expect("set k=v");
            out.push(Stmt::Set(k.to_string(), unquote(v).to_string()));
        } else if let Some(rest) = l.strip_prefix("if ") {
            let cond = parse_cond(rest.strip_suffix("; then").expect("if ...; then"));
            let mut arms = vec![(cond, parse_block(lines, i, &["elif", "else", "fi"]))];
            let mut otherwise = Vec::new();
            loop {
                let l = lines[*i];
                *i += 1;
                if let Some(rest) = l.strip_prefix("elif ") {
                    let cond = parse_cond(rest.strip_suffix("; then").expect("elif ...; then"));
                    arms.push((cond, parse_block(lines, i, &["elif", "else", "fi"])));
                } else if l == "else" {
                    otherwise = parse_block(lines, i, &["fi"]);
                } else if l == "fi" {
                    break;
                } else {
                    panic!("unexpected {l:?}");
                }
            }
            out.push(Stmt::If(arms, otherwise));
        } else {
            panic!("command outside the supported subset: {l:?}");
        }
    }
    out
}

/// The state-machine section of the snippet, parsed.
fn state_machine() -> Vec<Stmt> {
    let text = std::fs::read_to_string(snippet_path()).unwrap();
    let body = text
        .split("# BEGIN keel-ab-state-machine")
        .nth(1)
        .and_then(|t| t.split("# END keel-ab-state-machine").next())
        .expect("markers");
    let lines: Vec<&str> = body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut i = 0;
    let prog = parse_block(&lines, &mut i, &[]);
    assert_eq!(i, lines.len());
    prog
}

struct Machine<'a> {
    vars: HashMap<String, String>,
    env: &'a mut GrubEnv,
    saved: bool,
}

impl Machine<'_> {
    fn run(&mut self, prog: &[Stmt]) {
        for s in prog {
            match s {
                Stmt::LoadEnv => {
                    for (k, v) in self.env.entries() {
                        self.vars.insert(k.clone(), v.clone());
                    }
                }
                Stmt::SaveEnv(keys) => {
                    for k in keys {
                        let v = self.vars.get(k).cloned().unwrap_or_default();
                        self.env.set(k, &v);
                    }
                    self.saved = true;
                }
                Stmt::Set(k, v) => {
                    self.vars.insert(k.clone(), v.clone());
                }
                Stmt::If(arms, otherwise) => {
                    let taken = arms.iter().find(|(c, _)| {
                        let v = self.vars.get(&c.var).map(String::as_str).unwrap_or("");
                        (v == c.lit) == c.eq
                    });
                    match taken {
                        Some((_, body)) => self.run(body),
                        None => self.run(otherwise),
                    }
                }
            }
        }
    }
}

#[test]
fn snippet_and_model_agree_on_every_state() {
    let prog = state_machine();
    let mut checked = 0;
    for alt in [None, Some(""), Some("A"), Some("B"), Some("C")] {
        for cycle in [
            None,
            Some(""),
            Some("stable"),
            Some("install"),
            Some("first_boot"),
            Some("failsafe_check"),
            Some("bogus"),
        ] {
            let mut start = GrubEnv::new();
            start.set("saved_entry", "keep-me");
            if let Some(a) = alt {
                start.set(KEY_ALTERNATIVE, a);
            }
            if let Some(c) = cycle {
                start.set(KEY_CYCLE, c);
            }
            let mut by_script = start.clone();
            let mut m = Machine {
                vars: HashMap::new(),
                env: &mut by_script,
                saved: false,
            };
            m.run(&prog);
            let script_slot = m.vars.get(KEY_ALTERNATIVE).cloned().unwrap_or_default();
            let script_saved = m.saved;

            let mut by_model = start.clone();
            let out = grub_model::boot(&mut by_model);
            let ctx = format!("alt={alt:?} cycle={cycle:?}");
            assert_eq!(script_slot, out.slot.as_str(), "{ctx}");
            assert_eq!(script_saved, out.saved, "{ctx}");
            assert_eq!(by_script, by_model, "{ctx}");
            checked += 1;
        }
    }
    assert_eq!(checked, 35);
}

#[test]
fn snippet_passes_grub_script_check() {
    let path = snippet_path();
    let out = std::process::Command::new("grub-script-check")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run grub-script-check ({e}): install grub-common (apt-get install grub-common)")
        });
    assert!(
        out.status.success(),
        "grub-script-check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
