//! The `skactivate` command: parses the arguments and dispatches.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { root, units } => skactivate::check::main(&root, &units),
    }
}
