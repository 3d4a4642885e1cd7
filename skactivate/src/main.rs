//! The `skactivate` command: parses the arguments and dispatches.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use skactivate::cli::{Cli, Command};
use skactivate::daemon::Options;

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
        Command::RegisterPid {
            pid,
            unit,
            sockets,
            sklookup,
            wait,
            bus,
        } => report(skactivate::register_pid::register_pid(
            &skactivate::register_pid::Request {
                pid,
                unit,
                sockets,
                sklookup,
                wait: std::time::Duration::from_secs(wait.into()),
            },
            &bus,
        )),
        Command::Unregister { unit, bus } => report(skactivate::client::unregister(&unit, &bus)),
        Command::Status { unit, json, bus } => {
            report(skactivate::status::status(unit.as_deref(), json, &bus))
        }
        Command::Bindings { json, bus } => report(skactivate::status::bindings(json, &bus)),
        Command::Lookup {
            protocol,
            address,
            port,
            netns,
            json,
            bus,
        } => report(skactivate::status::lookup(
            protocol,
            address,
            port,
            netns.as_deref(),
            json,
            &bus,
        )),
        Command::Metrics { bus } => report(skactivate::status::metrics(&bus)),
        Command::Proxy {
            connections_max,
            exit_idle_time,
            idle_timeout,
            proxy_protocol,
            mode,
            target,
        } => report(skactivate::proxy::run(skactivate::proxy::Options {
            connections_max,
            exit_idle_time,
            idle_timeout,
            proxy_protocol,
            mode,
            target,
        })),
    }
}
