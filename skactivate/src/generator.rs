//! `skactivate-generator`: a systemd generator (systemd.generator(7)).
//!
//! For every socket unit that carries `X-SkLookup=` in its unit file or a
//! drop-in, it makes the socket unit want `skactivate@NAME.service` (which
//! registers the socket when it starts) and adds a drop-in whose
//! `ExecStopPost=` unregisters it. The administrator writes the directive and
//! nothing else.
//!
//! For every service unit with `X-SkLookup=` in `[Service]` (a daemon that
//! binds its own sockets) it adds a drop-in whose `ExecStartPost=` takes the
//! sockets out of the main process (`register-pid $MAINPID`) and whose
//! `ExecStopPost=` unregisters them, so each start, and each restart,
//! registers the sockets the new process bound.
//!
//! It reads units below `/`, or below `$SKACTIVATE_GENERATOR_ROOT` (for tests,
//! like zram-generator's `ZRAM_GENERATOR_ROOT`).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::paths;
use crate::unit::{SEARCH_PATH, SocketUnit};

/// The drop-in the generator writes for each socket unit.
pub const DROPIN_NAME: &str = "50-skactivate.conf";

/// How long the generated `ExecStartPost=` waits for a service to bind its
/// sockets (a `Type=simple` service is "started" as soon as it is forked).
pub const SERVICE_WAIT_SECS: u32 = 30;

/// Every socket or service unit name in the search path (files, links, and
/// instances that exist only as drop-in directories): the plain names and
/// instances, then the templates.
fn unit_names(root: &Path, suffix: &str) -> (Vec<String>, Vec<String>) {
    let dot_suffix = format!(".{suffix}");
    let template = format!("@.{suffix}");
    let mut names = BTreeSet::new();
    let mut templates = BTreeSet::new();
    for dir in SEARCH_PATH {
        let Ok(entries) = fs::read_dir(root.join(dir.trim_start_matches('/'))) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let unit = name.strip_suffix(".d").unwrap_or(&name);
            if !unit.ends_with(&dot_suffix) || unit == dot_suffix || unit.starts_with('@') {
                continue;
            }
            if unit.ends_with(&template) {
                templates.insert(unit.to_owned());
            } else {
                names.insert(unit.to_owned());
            }
        }
    }
    (names.into_iter().collect(), templates.into_iter().collect())
}

/// The template `dns@eth0.socket` is an instance of: `dns@.socket`.
fn template_of(name: &str) -> Option<String> {
    let (prefix, rest) = name.split_once('@')?;
    let (_, suffix) = rest.rsplit_once('.')?;
    Some(format!("{prefix}@.{suffix}"))
}

/// Whether any service unit file or service drop-in in the search path
/// mentions `X-SkLookup` (in any case) at all, or cannot be read. Resolving
/// every service unit with its drop-ins costs tens of thousands of `stat`s
/// on a stock system, where none has the setting; this one pass over the
/// files lets the generator skip that.
fn any_service_mentions_sklookup(root: &Path) -> bool {
    let mentions = |path: &Path| match fs::read(path) {
        Ok(bytes) => bytes
            .windows(b"x-sklookup".len())
            .any(|w| w.eq_ignore_ascii_case(b"x-sklookup")),
        Err(_) => true,
    };
    for dir in SEARCH_PATH {
        let Ok(entries) = fs::read_dir(root.join(dir.trim_start_matches('/'))) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if name.ends_with(".service") {
                // A link to /dev/null (a masked unit) reads as nothing.
                if path.is_file() && mentions(&path) {
                    return true;
                }
            } else if name.ends_with(".service.d") || name == "service.d" {
                let Ok(dropins) = fs::read_dir(&path) else {
                    continue;
                };
                if dropins.flatten().any(|d| {
                    d.file_name().to_string_lossy().ends_with(".conf") && mentions(&d.path())
                }) {
                    return true;
                }
            }
        }
    }
    false
}

/// What the generator makes of one unit or template with `X-SkLookup=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Generated {
    /// A socket unit or socket instance: it wants its registration service
    /// (`skactivate@webserver.service`, `skactivate@dns@eth0.service`: an
    /// instance string may hold `@`) and unregisters when it stops.
    Socket { unit: String, registration: String },
    /// A socket template (`dns@.socket`) whose own files carry the setting:
    /// every instance wants `skactivate@%N.service` through the template's
    /// drop-in, whether or not the generator ever sees the instance's name.
    SocketTemplate { unit: String },
    /// A service unit, service instance or service template: its own
    /// `ExecStartPost=` registers its main process's sockets.
    Service { unit: String },
}

/// Whether `unit` (found under its own name, not as an alias) has
/// `X-SkLookup=` in force.
fn has_sklookup(unit: Result<SocketUnit, crate::unit::UnitError>, name: &str) -> bool {
    // Masked or unreadable units are systemd's business, not ours; an alias
    // is the same unit under another name, handled under its own.
    unit.is_ok_and(|u| !u.sklookup.is_empty() && u.id == name)
}

/// The socket and service units and templates that need registration, or
/// why one was skipped.
pub fn plan(root: &Path) -> (Vec<Generated>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    let (services, service_templates) = if any_service_mentions_sklookup(root) {
        unit_names(root, "service")
    } else {
        (Vec::new(), Vec::new())
    };
    let (sockets, socket_templates) = unit_names(root, "socket");

    // Templates first: an instance whose template carries the setting is
    // served by the template's drop-in and needs nothing of its own.
    let mut covered = BTreeSet::new();
    for name in service_templates {
        if has_sklookup(SocketUnit::find_template(root, &name), &name) {
            out.push(Generated::Service { unit: name.clone() });
            covered.insert(name);
        }
    }
    for name in socket_templates {
        if has_sklookup(SocketUnit::find_template(root, &name), &name) {
            out.push(Generated::SocketTemplate { unit: name.clone() });
            covered.insert(name);
        }
    }
    let is_covered = |name: &str| template_of(name).is_some_and(|t| covered.contains(&t));

    // An instance that clears its template's setting in a drop-in of its
    // own still wants its registration through the template's drop-in (a
    // dependency cannot be taken back); the registration then fails, naming
    // the unit. Said here once, at generation time.
    let mut cleared = |name: &str, unit: Result<SocketUnit, crate::unit::UnitError>| {
        if unit.is_ok_and(|u| u.sklookup.is_empty() && u.id == name) {
            warnings.push(format!(
                "{name}: its drop-ins clear the X-SkLookup= of {template}, whose drop-in \
                 still starts its registration, which will fail; move the setting from \
                 the template to the instances that need it",
                template = template_of(name).unwrap_or_default(),
            ));
        }
    };
    for name in services {
        if is_covered(&name) {
            cleared(&name, SocketUnit::find(root, &name));
        } else if has_sklookup(SocketUnit::find(root, &name), &name) {
            out.push(Generated::Service { unit: name });
        }
    }
    for name in sockets {
        if is_covered(&name) {
            cleared(&name, SocketUnit::find(root, &name));
            continue;
        }
        if !has_sklookup(SocketUnit::find(root, &name), &name) {
            continue;
        }
        let stem = name.strip_suffix(".socket").expect("listed as .socket");
        out.push(Generated::Socket {
            registration: format!("skactivate@{stem}.service"),
            unit: name,
        });
    }
    (out, warnings)
}

fn write_new(path: &Path, contents: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents)?;
    fs::rename(&tmp, path)
}

/// Write the wants link and the unregister drop-in of each unit into `dir`
/// (the generator's normal output directory).
pub fn generate(root: &Path, dir: &Path) -> Result<Vec<String>> {
    let (units, warnings) = plan(root);
    for g in &units {
        match g {
            Generated::Service { unit } => write_service_dropin(dir, unit)?,
            Generated::Socket { unit, registration } => {
                let wants = dir.join(format!("{unit}.wants"));
                fs::create_dir_all(&wants).with_context(|| format!("{}", wants.display()))?;
                let link = wants.join(registration);
                match fs::remove_file(&link) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("{}", link.display()));
                    }
                    _ => {}
                }
                std::os::unix::fs::symlink(paths::TEMPLATE_UNIT, &link)
                    .with_context(|| format!("{}", link.display()))?;
                let text = format!(
                    "# Written by skactivate-generator because {unit} has X-SkLookup=.\n\
                     # Its bindings go when the socket stops (the daemon also follows systemd).\n\
                     [Socket]\n\
                     ExecStopPost=-{bin} unregister %n\n",
                    bin = paths::BINARY,
                );
                write_dropin(dir, unit, &text)?;
            }
            Generated::SocketTemplate { unit } => {
                // `%N` is the instance's full name without its type:
                // `dns@eth0`, so each instance wants skactivate@dns@eth0.service.
                let text = format!(
                    "# Written by skactivate-generator because {unit} has X-SkLookup=.\n\
                     # Each instance wants its own registration, skactivate@NAME@INSTANCE.service,\n\
                     # and its bindings go when it stops (the daemon also follows systemd).\n\
                     [Unit]\n\
                     Wants=skactivate@%N.service\n\
                     [Socket]\n\
                     ExecStopPost=-{bin} unregister %n\n",
                    bin = paths::BINARY,
                );
                write_dropin(dir, unit, &text)?;
            }
        }
    }
    Ok(warnings)
}

/// Write the generator's drop-in for `unit` into `dir`.
fn write_dropin(dir: &Path, unit: &str, text: &str) -> Result<()> {
    let dropins = dir.join(format!("{unit}.d"));
    fs::create_dir_all(&dropins).with_context(|| format!("{}", dropins.display()))?;
    let conf = dropins.join(DROPIN_NAME);
    write_new(&conf, text).with_context(|| format!("{}", conf.display()))
}

/// A service's drop-in: take its sockets once started, let them go when it
/// stops. Both commands run with `+` (full privileges), whatever `User=`,
/// `CapabilityBoundingSet=` or sandboxing the service has: taking another
/// process's fds needs `CAP_SYS_PTRACE` (or its uid, and Yama's consent, which
/// a sibling process never has under `ptrace_scope` 1), and registering with
/// the daemon is root's only.
fn write_service_dropin(dir: &Path, unit: &str) -> Result<()> {
    let text = format!(
        "# Written by skactivate-generator because {unit} has X-SkLookup=.\n\
         # Once the service has started, its main process's listening sockets are\n\
         # registered with its X-SkLookup= values; they go when the service stops\n\
         # (the daemon also follows systemd). \"+\": full privileges, see\n\
         # skactivate-generator(8).\n\
         [Service]\n\
         ExecStartPost=+{bin} register-pid --unit %n --wait {wait} $MAINPID\n\
         ExecStopPost=-+{bin} unregister %n\n",
        bin = paths::BINARY,
        wait = SERVICE_WAIT_SECS,
    );
    write_dropin(dir, unit, &text)
}

/// `skactivate-generator NORMAL [EARLY LATE]`.
pub fn main(args: &[std::ffi::OsString]) -> std::process::ExitCode {
    let Some(normal) = args.first() else {
        eprintln!(
            "skactivate-generator: usage: skactivate-generator NORMAL-DIR [EARLY-DIR LATE-DIR]"
        );
        return std::process::ExitCode::from(2);
    };
    let root = std::env::var_os("SKACTIVATE_GENERATOR_ROOT")
        .map_or_else(|| PathBuf::from("/"), PathBuf::from);
    match generate(&root, Path::new(normal)) {
        Ok(warnings) => {
            for w in warnings {
                eprintln!("skactivate-generator: {w}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("skactivate-generator: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
