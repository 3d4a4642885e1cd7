//! `skactivate register` and `skactivate unregister`: hand a socket unit's fds
//! to the daemon, or take a unit away.

use std::os::fd::{BorrowedFd, RawFd};

use anyhow::{Context, Result, bail};

use crate::daemon::Bus;
use crate::dbus::{SkactivateProxy, error_chain};

/// The fds systemd passed us, with their names (`LISTEN_FDS`,
/// `LISTEN_FDNAMES`, for this process only: `LISTEN_PID` is checked).
pub fn passed_fds() -> Result<Vec<(RawFd, String)>> {
    Ok(sd_notify::listen_fds_with_names()
        .context("reading LISTEN_FDS/LISTEN_FDNAMES")?
        .collect())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

async fn proxy(bus: &Bus) -> Result<SkactivateProxy<'static>> {
    let conn = bus
        .connect()
        .await
        .with_context(|| format!("connecting to the {bus:?} bus"))?;
    Ok(SkactivateProxy::new(&conn).await?)
}

/// Pass the sockets systemd gave us to the daemon as `unit`'s. With
/// `sklookup` values the unit's files are not read (for fd providers other
/// than a systemd socket unit).
pub fn register(unit: &str, sklookup: &[String], bus: &Bus) -> Result<()> {
    let fds = passed_fds()?;
    if fds.is_empty() {
        bail!(
            "{unit}: no sockets were passed to this process (LISTEN_FDS is unset or LISTEN_PID is not \
             ours): run it from a service with Sockets={unit}, or under systemd-socket-activate"
        );
    }
    let names: Vec<&str> = fds.iter().map(|(_, n)| n.as_str()).collect();
    // SAFETY: systemd passed these fds to this process and they stay open
    // until we exit; we only borrow them for the call.
    let borrowed: Vec<BorrowedFd<'_>> = fds
        .iter()
        .map(|(fd, _)| unsafe { BorrowedFd::borrow_raw(*fd) })
        .collect();
    let wire: Vec<zbus::zvariant::Fd<'_>> = borrowed
        .iter()
        .map(|fd| zbus::zvariant::Fd::from(*fd))
        .collect();
    let rt = runtime()?;
    let (sockets, bindings) = rt
        .block_on(async {
            let p = proxy(bus).await?;
            let r = if sklookup.is_empty() {
                p.register_sockets(unit, &wire).await
            } else {
                let values: Vec<&str> = sklookup.iter().map(String::as_str).collect();
                p.register_sockets_with_directives(unit, &wire, &values)
                    .await
            };
            r.map_err(|e| anyhow::anyhow!(describe(&e)))
        })
        .with_context(|| {
            format!(
                "registering {unit} ({} fd(s): {})",
                fds.len(),
                names.join(" ")
            )
        })?;
    println!("{unit}: registered {sockets} socket(s) with {bindings} binding(s)");
    Ok(())
}

/// Remove a unit's bindings. Never starts the daemon to do so.
pub fn unregister(unit: &str, bus: &Bus) -> Result<()> {
    runtime()?
        .block_on(async {
            proxy(bus)
                .await?
                .unregister_unit(unit)
                .await
                .map_err(|e| anyhow::anyhow!(describe(&e)))
        })
        .with_context(|| format!("unregistering {unit}"))?;
    println!("{unit}: unregistered");
    Ok(())
}

/// A D-Bus error as a person reads it: the message, with the error name only
/// when the message alone would not say what happened.
pub(crate) fn describe(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, Some(msg), _) => match name.as_str() {
            "org.skactivate1.Error.AccessDenied" | "org.freedesktop.DBus.Error.AccessDenied" => {
                format!("access denied: {msg}")
            }
            "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
                format!("the skactivate daemon is not running ({msg})")
            }
            _ => msg.clone(),
        },
        other => error_chain(other),
    }
}
