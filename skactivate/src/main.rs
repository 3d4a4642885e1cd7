//! The `skactivate` command: parses the arguments and dispatches.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use skactivate::daemon::{Bus, Options};

/// systemd socket activation for whole prefixes and port ranges, via BPF
/// sk_lookup.
#[derive(Debug, Parser)]
#[command(name = "skactivate", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the X-SkLookup= settings of socket units, offline and
    /// without privileges.
    ///
    /// Each argument is a socket unit name (looked up in systemd's unit
    /// search path, with its drop-ins) or, when it contains a "/", a unit
    /// file (read as the unit's fragment, with the drop-ins the search path
    /// has for its name). Exits 0 and prints the resulting bindings when
    /// every unit is valid, 1 and one line per problem on stderr when not.
    Check {
        /// Look for units and drop-ins under DIR instead of /.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Socket units (webserver.socket) or unit files (./webserver.socket).
        #[arg(value_name = "UNIT|FILE", required = true)]
        units: Vec<OsString>,
    },
    /// Run the daemon (as skactivate.service does): load or adopt the
    /// dispatcher of a network namespace and serve org.skactivate1.
    Daemon {
        /// The bus to serve on: system, session, or a D-Bus address.
        #[arg(long, value_name = "system|session|ADDRESS", default_value = "system")]
        bus: Bus,
        /// Where bpffs is mounted; state is pinned under DIR/skactivate/.
        #[arg(long, value_name = "DIR", default_value = skactivate::paths::DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// The network namespace to dispatch in (a path like /run/netns/NAME).
        #[arg(long, value_name = "PATH", default_value = "/proc/self/ns/net")]
        netns: PathBuf,
    },
    /// Hand the listening sockets systemd passed to this process (LISTEN_FDS)
    /// to the daemon as UNIT's, which then applies UNIT's X-SkLookup= lines.
    /// Run by skactivate@.service.
    Register {
        /// The socket unit (webserver.socket).
        unit: String,
        /// X-SkLookup= values to use instead of reading UNIT's files (for
        /// fd providers other than a socket unit); may be repeated.
        #[arg(long = "sklookup", value_name = "VALUE")]
        sklookup: Vec<String>,
        /// The bus the daemon is on: system, session, or a D-Bus address.
        #[arg(long, value_name = "system|session|ADDRESS", default_value = "system")]
        bus: Bus,
    },
    /// Remove UNIT's bindings and sockets (ExecStopPost= of socket units).
    Unregister {
        /// The socket unit (webserver.socket).
        unit: String,
        /// The bus the daemon is on: system, session, or a D-Bus address.
        #[arg(long, value_name = "system|session|ADDRESS", default_value = "system")]
        bus: Bus,
    },
}

/// Runtime failures exit 1 with the whole chain of causes.
fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skactivate: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    // systemd runs us as a generator through a link of that name.
    let mut args = std::env::args_os();
    let argv0 = args.next().map(PathBuf::from);
    if argv0.as_deref().and_then(|p| p.file_name())
        == Some(skactivate::paths::GENERATOR_NAME.as_ref())
    {
        return skactivate::generator::main(&args.collect::<Vec<_>>());
    }
    match Cli::parse().command {
        Command::Check { root, units } => skactivate::check::main(&root, &units),
        Command::Daemon { bus, bpffs, netns } => {
            report(skactivate::daemon::run(&Options { bus, bpffs, netns }))
        }
        Command::Register {
            unit,
            sklookup,
            bus,
        } => report(skactivate::client::register(&unit, &sklookup, &bus)),
        Command::Unregister { unit, bus } => report(skactivate::client::unregister(&unit, &bus)),
    }
}
