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
/// instances that exist only as drop-in directories), templates excluded.
fn unit_names(root: &Path, suffix: &str) -> Vec<String> {
    let dot_suffix = format!(".{suffix}");
    let template = format!("@.{suffix}");
    let mut names = BTreeSet::new();
    for dir in SEARCH_PATH {
        let Ok(entries) = fs::read_dir(root.join(dir.trim_start_matches('/'))) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let unit = name.strip_suffix(".d").unwrap_or(&name);
            if unit.ends_with(&dot_suffix) && !unit.ends_with(&template) && unit != dot_suffix {
                names.insert(unit.to_owned());
            }
        }
    }
    names.into_iter().collect()
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

/// What the generator makes of one unit: `None` if it has no `X-SkLookup=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub unit: String,
    /// `skactivate@webserver.service` for a socket unit; `None` for a
    /// service unit (its own `ExecStartPost=` registers it).
    pub registration: Option<String>,
}

/// The socket and service units that need registration, or why one was
/// skipped.
pub fn plan(root: &Path) -> (Vec<Generated>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    let services = if any_service_mentions_sklookup(root) {
        unit_names(root, "service")
    } else {
        Vec::new()
    };
    for name in services {
        let Ok(unit) = SocketUnit::find(root, &name) else {
            continue;
        };
        if unit.sklookup.is_empty() || unit.id != name {
            continue;
        }
        out.push(Generated {
            unit: name,
            registration: None,
        });
    }
    for name in unit_names(root, "socket") {
        let unit = match SocketUnit::find(root, &name) {
            Ok(u) => u,
            // Masked or unreadable units are systemd's business, not ours.
            Err(_) => continue,
        };
        // An alias is the same unit under another name: its real name is
        // listed too, and one registration per socket is all there may be.
        if unit.sklookup.is_empty() || unit.id != name {
            continue;
        }
        let stem = name.strip_suffix(".socket").expect("listed as .socket");
        if stem.contains('@') {
            warnings.push(format!(
                "{name}: X-SkLookup= on a template instance is not supported by the generator \
                 (an instance name cannot hold '@'); start skactivate@ by hand with --sklookup"
            ));
            continue;
        }
        out.push(Generated {
            unit: name.clone(),
            registration: Some(format!("skactivate@{stem}.service")),
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
        let Some(registration) = &g.registration else {
            write_service_dropin(dir, &g.unit)?;
            continue;
        };
        let wants = dir.join(format!("{}.wants", g.unit));
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

        let dropins = dir.join(format!("{}.d", g.unit));
        fs::create_dir_all(&dropins).with_context(|| format!("{}", dropins.display()))?;
        let conf = dropins.join(DROPIN_NAME);
        let text = format!(
            "# Written by skactivate-generator because {unit} has X-SkLookup=.\n\
             # Its bindings go when the socket stops (the daemon also follows systemd).\n\
             [Socket]\n\
             ExecStopPost=-{bin} unregister %n\n",
            unit = g.unit,
            bin = paths::BINARY,
        );
        write_new(&conf, &text).with_context(|| format!("{}", conf.display()))?;
    }
    Ok(warnings)
}

/// A service's drop-in: take its sockets once started, let them go when it
/// stops. Both commands run with `+` (full privileges), whatever `User=`,
/// `CapabilityBoundingSet=` or sandboxing the service has: taking another
/// process's fds needs `CAP_SYS_PTRACE` (or its uid, and Yama's consent, which
/// a sibling process never has under `ptrace_scope` 1), and registering with
/// the daemon is root's only.
fn write_service_dropin(dir: &Path, unit: &str) -> Result<()> {
    let dropins = dir.join(format!("{unit}.d"));
    fs::create_dir_all(&dropins).with_context(|| format!("{}", dropins.display()))?;
    let conf = dropins.join(DROPIN_NAME);
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
    write_new(&conf, &text).with_context(|| format!("{}", conf.display()))
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
