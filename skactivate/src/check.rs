//! `skactivate check [--root DIR] UNIT|FILE...`: offline validation.
//!
//! Reads each socket unit (by name from the search path under `root`, or a
//! unit file given by path with its drop-ins from the search path), matches
//! its `X-SkLookup=` values to the sockets of its `Listen…=` lines and
//! reports every problem, one line each, on stderr:
//!
//! ```text
//! /etc/systemd/system/webserver.socket.d/10-sklookup.conf:3: X-SkLookup=192.0.2.0/33:80: prefix length 33 is longer than 32
//! webserver.socket: not found in the unit search path
//! warning: dns.socket: udp [::]:53 gets X-SkLookup= traffic but PassPacketInfo= is not yes: …
//! ```
//!
//! A unit without errors gets a summary of its bindings on stdout. Units
//! checked together must not claim the same `(protocol, prefix, port)`, as
//! the daemon would refuse the second.

use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;

use crate::config::{self, Problem, Reason, Resolution, Setting, Socket};
use crate::unit::{self, Severity, SocketUnit, UnitError};

/// Runs the check on the process's stdout and stderr; exit code 0 when every
/// unit is valid, 1 otherwise.
pub fn main(root: &Path, targets: &[OsString]) -> ExitCode {
    if !root.is_dir() {
        eprintln!("skactivate: --root {}: not a directory", root.display());
        return ExitCode::FAILURE;
    }
    // Buffered (a unit may have 100,000 bindings to list); `run` flushes
    // after each unit, so stdout and stderr still interleave unit by unit.
    let (stdout, stderr) = (io::stdout(), io::stderr());
    let mut out = io::BufWriter::new(stdout.lock());
    let mut err = io::BufWriter::new(stderr.lock());
    match run(root, targets, &mut out, &mut err) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("skactivate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Checks every target, writes the summaries to `out` and the problems to
/// `err`; returns whether all units are valid.
pub fn run(
    root: &Path,
    targets: &[OsString],
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> io::Result<bool> {
    let mut checked: Vec<Checked> = targets.iter().map(|t| Checked::load(root, t)).collect();
    find_conflicts(&mut checked);
    let mut valid = true;
    for c in &checked {
        valid &= c.report(out, err)?;
        // A report writes its problems first, then its summary.
        err.flush()?;
        out.flush()?;
    }
    Ok(valid)
}

/// One unit, checked.
struct Checked {
    /// How the unit is named in messages: its name, or the file as given.
    label: String,
    outcome: Result<Loaded, UnitError>,
}

struct Loaded {
    unit: SocketUnit,
    sockets: Vec<Socket>,
    resolution: Resolution,
}

impl Checked {
    fn load(root: &Path, target: &OsStr) -> Checked {
        let (label, unit) = if target.as_bytes().contains(&b'/') {
            let path = Path::new(target);
            (
                path.display().to_string(),
                SocketUnit::from_file(root, path),
            )
        } else {
            let given = target.to_string_lossy().into_owned();
            match target
                .to_str()
                .ok_or(UnitError::InvalidName)
                .and_then(unit::sklookup_unit_name)
            {
                Ok(name) => {
                    let unit = SocketUnit::find(root, &name);
                    (name, unit)
                }
                Err(e) => (given, Err(e)),
            }
        };
        Checked {
            label,
            outcome: unit.map(Loaded::new),
        }
    }

    /// Writes the problems, and the summary if there is no error.
    fn report(&self, out: &mut dyn Write, err: &mut dyn Write) -> io::Result<bool> {
        let loaded = match &self.outcome {
            Ok(loaded) => loaded,
            Err(e) => {
                writeln!(err, "{}: {e}", self.label)?;
                return Ok(false);
            }
        };
        let mut problems: Vec<&Problem> = loaded.resolution.problems.iter().collect();
        let files: Vec<&Path> = loaded.unit.files().collect();
        problems.sort_by_key(|p| match &p.location {
            Some(l) => (
                files
                    .iter()
                    .position(|f| *f == &*l.path)
                    .unwrap_or(files.len()),
                l.line,
            ),
            None => (usize::MAX, 0),
        });
        for problem in &problems {
            if problem.severity == Severity::Warning {
                write!(err, "warning: ")?;
            }
            if problem.location.is_none() {
                write!(err, "{}: ", self.label)?;
            }
            writeln!(err, "{problem}")?;
        }
        if !loaded.resolution.is_valid() {
            return Ok(false);
        }
        self.summary(loaded, out)?;
        Ok(true)
    }

    fn summary(&self, loaded: &Loaded, out: &mut dyn Write) -> io::Result<()> {
        if loaded.unit.section == "Service" {
            return self.service_summary(loaded, out);
        }
        let bindings = &loaded.resolution.bindings;
        match bindings.len() {
            0 => writeln!(out, "{}: no bindings (no X-SkLookup= in force)", self.label)?,
            1 => writeln!(out, "{}: 1 binding", self.label)?,
            n => writeln!(out, "{}: {n} bindings", self.label)?,
        }
        writeln!(out, "  fragment {}", loaded.unit.fragment.display())?;
        for dropin in &loaded.unit.dropins {
            writeln!(out, "  drop-in  {}", dropin.display())?;
        }
        let shown: Vec<(String, String)> = bindings
            .iter()
            .map(|r| (r.binding.to_string(), loaded.sockets[r.socket].to_string()))
            .collect();
        let width = shown.iter().map(|(b, _)| b.len()).max().unwrap_or(0);
        let socket_width = shown.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
        for ((binding, socket), resolved) in shown.iter().zip(bindings) {
            writeln!(
                out,
                "  {binding:<width$} -> {socket:<socket_width$}  {}",
                resolved.location
            )?;
        }
        Ok(())
    }
}

impl Checked {
    /// A service unit's values: their grammar is checked, but the sockets
    /// they land on are the running daemon's own, unknown offline.
    fn service_summary(&self, loaded: &Loaded, out: &mut dyn Write) -> io::Result<()> {
        let values: Vec<(String, unit::Location)> = loaded
            .unit
            .sklookup
            .iter()
            .flat_map(|l| {
                crate::directive::parse_list(l.value)
                    .into_iter()
                    .filter_map(Result::ok)
                    .map(move |v| (v.text, l.location.clone()))
            })
            .collect();
        match values.len() {
            0 => writeln!(out, "{}: no bindings (no X-SkLookup= in force)", self.label)?,
            n => writeln!(
                out,
                "{}: {n} value{}, grammar checked; the sockets are the ones the service binds \
                 itself, so which socket each value lands on is checked by register-pid when it \
                 starts",
                self.label,
                if n == 1 { "" } else { "s" }
            )?,
        }
        writeln!(out, "  fragment {}", loaded.unit.fragment.display())?;
        for dropin in &loaded.unit.dropins {
            writeln!(out, "  drop-in  {}", dropin.display())?;
        }
        let width = values.iter().map(|(v, _)| v.len()).max().unwrap_or(0);
        for (value, location) in &values {
            writeln!(out, "  {value:<width$}  {location}")?;
        }
        Ok(())
    }
}

impl Loaded {
    fn new(unit: SocketUnit) -> Loaded {
        if unit.section == "Service" {
            // No Listen…= to match against: the grammar, the file and the
            // section are all that can be checked offline.
            let mut problems: Vec<Problem> =
                unit.issues.iter().cloned().map(Problem::from).collect();
            let mut resolution = config::resolve(&unit, &[]);
            resolution
                .problems
                .retain(|p| p.reason != Reason::NoIpSocket);
            problems.append(&mut resolution.problems);
            resolution.problems = problems;
            return Loaded {
                unit,
                sockets: Vec::new(),
                resolution,
            };
        }
        let mut problems: Vec<Problem> = unit.issues.iter().cloned().map(Problem::from).collect();
        let (listens, listen_problems) = config::listen_sockets(&unit);
        problems.extend(listen_problems);
        let sockets: Vec<Socket> = listens.iter().map(|l| l.socket).collect();
        let mut resolution = config::resolve(&unit, &sockets);
        problems.append(&mut resolution.problems);
        resolution.problems = problems;
        Loaded {
            unit,
            sockets,
            resolution,
        }
    }
}

/// Refuses a binding that an earlier unit of the same check already claims
/// (the daemon would refuse the second unit). One index of every binding
/// kept so far: linear in the number of bindings.
fn find_conflicts(checked: &mut [Checked]) {
    let mut claimed = config::Claimed::default();
    // Claimed index → (unit in `checked`, binding of that unit).
    let mut owners: Vec<(usize, usize)> = Vec::new();
    for j in 0..checked.len() {
        let (earlier, rest) = checked.split_at_mut(j);
        let Ok(later) = &mut rest[0].outcome else {
            continue;
        };
        let mut kept = Vec::new();
        for resolved in later.resolution.bindings.drain(..) {
            let owner = claimed
                .claim(&resolved.binding, owners.len())
                .map(|i| owners[i]);
            let first = owner.and_then(|(u, b)| {
                let first = earlier.get(u)?.outcome.as_ref().ok()?;
                (first.unit.id != later.unit.id).then(|| (first, &first.resolution.bindings[b]))
            });
            match first {
                None => {
                    if owner.is_none() {
                        owners.push((j, kept.len()));
                    }
                    kept.push(resolved);
                }
                Some((first, other)) => later.resolution.problems.push(Problem {
                    severity: Severity::Error,
                    location: Some(resolved.location.clone()),
                    setting: Some(Setting {
                        key: "X-SkLookup",
                        value: resolved.value.clone(),
                    }),
                    reason: Reason::Conflict {
                        binding: resolved.binding,
                        unit: first.unit.name.clone(),
                        value: other.value.clone(),
                        at: other.location.clone(),
                    },
                }),
            }
        }
        later.resolution.bindings = kept;
    }
}
