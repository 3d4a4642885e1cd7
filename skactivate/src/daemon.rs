//! `skactivate daemon`: owns the dispatcher and `org.skactivate1`.
//!
//! Start-up: adopt (or create) the pinned dispatcher, upgrade its program if
//! this build's differs, forget adopted units whose socket unit is no longer
//! active, take the bus name, then `READY=1`. From then on it follows systemd:
//! a registered socket unit that goes inactive loses its bindings even if no
//! one called `unregister`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use sd_notify::NotifyState;
use zbus::zvariant::OwnedValue;
use zbus::{Connection, MatchRule, MessageStream};

use crate::dbus::{self, MANAGER_PATH, Manager, Shared, SystemdManagerProxy};
use crate::dispatcher::Dispatcher;
use crate::service::Service;

/// Which bus to serve on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    System,
    Session,
    Address(String),
}

impl std::str::FromStr for Bus {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "system" => Bus::System,
            "session" => Bus::Session,
            other => Bus::Address(other.to_owned()),
        })
    }
}

impl Bus {
    pub fn builder(&self) -> zbus::Result<zbus::connection::Builder<'static>> {
        match self {
            Bus::System => zbus::connection::Builder::system(),
            Bus::Session => zbus::connection::Builder::session(),
            Bus::Address(a) => zbus::connection::Builder::address(a.as_str()),
        }
    }

    pub async fn connect(&self) -> zbus::Result<Connection> {
        self.builder()?.build().await
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub bus: Bus,
    pub bpffs: PathBuf,
    pub netns: PathBuf,
}

/// Log to the journal when systemd runs us, else to stderr.
pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    let under_systemd =
        std::env::var_os("INVOCATION_ID").is_some() || std::env::var_os("JOURNAL_STREAM").is_some();
    let journald = under_systemd
        .then(|| tracing_journald::layer().ok())
        .flatten();
    let registry =
        tracing_subscriber::registry().with(tracing_subscriber::filter::LevelFilter::INFO);
    match journald {
        // Fields become SKACTIVATE_UNIT=, SKACTIVATE_BINDING=, …: filter with
        // `journalctl SKACTIVATE_UNIT=webserver.socket`.
        Some(layer) => registry
            .with(
                layer
                    .with_syslog_identifier("skactivate".into())
                    .with_field_prefix(Some("SKACTIVATE".into())),
            )
            .init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
    }
}

/// `STATUS=` for `systemctl status`.
fn status_line(s: &Service) -> String {
    let c = s.counts();
    format!(
        "{} units, {} bindings, {} sockets",
        c.units, c.bindings, c.sockets
    )
}

pub fn run(opts: &Options) -> Result<()> {
    init_logging();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let r = rt.block_on(serve(opts));
    if let Err(e) = &r {
        tracing::error!("{e:#}");
        let _ = sd_notify::notify(&[NotifyState::Status(&format!("failed: {e:#}"))]);
    }
    r
}

async fn serve(opts: &Options) -> Result<()> {
    let mut dispatcher = Dispatcher::open(&opts.netns, &opts.bpffs).with_context(|| {
        format!(
            "dispatcher for {} on {}",
            opts.netns.display(),
            opts.bpffs.display()
        )
    })?;
    let before = dispatcher.program()?;
    if dispatcher
        .upgrade(false)
        .context("upgrading the dispatcher program")?
    {
        let after = dispatcher.program()?;
        tracing::info!(
            "replaced program {} (tag {}) with this build's {} (tag {})",
            before.id,
            before.tag_hex(),
            after.id,
            after.tag_hex()
        );
    }
    let prog = dispatcher.program()?;
    tracing::info!(
        "dispatcher attached to netns {} from {} (program {} tag {})",
        dispatcher.netns(),
        dispatcher.dir().display(),
        prog.id,
        prog.tag_hex()
    );
    let service = Service::new(dispatcher, Path::new("/")).context("reading the pinned state")?;

    // Serve first, then take the name, so no call finds the name without the object.
    let conn = opts
        .bus
        .connect()
        .await
        .with_context(|| format!("connecting to the {:?} bus", opts.bus))?;
    // systemd lives on the system bus, whichever bus we serve on.
    let systemd = match &opts.bus {
        Bus::System => Some(conn.clone()),
        _ => Connection::system().await.ok(),
    };
    let shared = Arc::new(Shared {
        service: Mutex::new(service),
        systemd,
        on_change: Box::new(|s: &Service| {
            let _ = sd_notify::notify(&[NotifyState::Status(&status_line(s))]);
        }),
    });
    conn.object_server()
        .at(
            MANAGER_PATH,
            Manager {
                shared: shared.clone(),
            },
        )
        .await?;
    conn.request_name(dbus::BUS_NAME)
        .await
        .with_context(|| format!("owning {} on the {:?} bus", dbus::BUS_NAME, opts.bus))?;

    if let Some(sys) = &shared.systemd {
        prune_inactive(&conn, sys, &shared).await;
    }
    let adopted: Vec<String> = shared.lock().units().keys().cloned().collect();
    for unit in adopted {
        dbus::publish_unit(conn.object_server(), &shared, &unit).await?;
    }
    let status = status_line(&shared.lock());
    sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)])
        .context("sd_notify READY=1")?;
    tracing::info!("ready: {status}");

    let watch = shared.systemd.clone().map(|sys| {
        let (conn, shared) = (conn.clone(), shared.clone());
        tokio::spawn(async move {
            if let Err(e) = follow_systemd(&conn, &sys, &shared).await {
                tracing::error!("no longer following systemd's socket units: {e:#}");
            }
        })
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let watchdog = sd_notify::watchdog_enabled();
    let mut tick = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let _ = sd_notify::notify(&[NotifyState::Reloading]);
                let failures = dbus::reload_all(&shared).await;
                let status = status_line(&shared.lock());
                let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
                tracing::info!("reloaded on SIGHUP ({} unit(s) refused): {status}", failures.len());
            }
            _ = tick.tick() => {
                if watchdog.is_some() {
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                }
            }
        }
    }
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    if let Some(w) = watch {
        w.abort();
    }
    // The pinned link and maps stay: traffic flows on while we are gone.
    tracing::info!("stopping; the dispatcher keeps running from its pinned state");
    Ok(())
}

/// Units adopted from the pinned state whose socket unit is no longer
/// active lose their bindings; units systemd does not know are left alone.
async fn prune_inactive(conn: &Connection, sys: &Connection, shared: &Shared) {
    let units: Vec<String> = shared.lock().units().keys().cloned().collect();
    for unit in units {
        match dbus::systemd_active_state(sys, &unit).await {
            Ok(Some(state)) if is_gone(&state) => {
                unregister_gone(conn, shared, &unit, &state).await
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(unit = %unit, "{unit}: cannot ask systemd about it: {e}"),
        }
    }
}

fn is_gone(active_state: &str) -> bool {
    matches!(active_state, "inactive" | "failed")
}

async fn unregister_gone(conn: &Connection, shared: &Shared, unit: &str, state: &str) {
    let r = shared.lock().unregister(unit);
    match r {
        Ok(c) => {
            tracing::info!(unit = %unit, removed = c.removed, "{unit}: socket unit is {state}: unregistered");
            shared.changed();
            dbus::retire_unit(conn.object_server(), unit).await;
        }
        Err(e) => tracing::debug!(unit = %unit, "{e}"),
    }
}

/// Follow `ActiveState` of every socket unit; one that went inactive or
/// failed loses its bindings. The state is asked afresh before acting, so a
/// stop signal that arrives after a quick restart's registration is ignored.
async fn follow_systemd(conn: &Connection, sys: &Connection, shared: &Shared) -> Result<()> {
    SystemdManagerProxy::new(sys)
        .await?
        .subscribe()
        .await
        .context("subscribing to systemd")?;
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.freedesktop.systemd1")?
        .interface("org.freedesktop.DBus.Properties")?
        .member("PropertiesChanged")?
        .build();
    let mut stream = MessageStream::for_match_rule(rule, sys, Some(1024)).await?;
    while let Some(msg) = stream.next().await {
        let Ok(msg) = msg else { continue };
        let header = msg.header();
        let Some(path) = header.path() else { continue };
        let Some(label) = path
            .as_str()
            .strip_prefix("/org/freedesktop/systemd1/unit/")
        else {
            continue;
        };
        let Ok((iface, changed, _)) = msg
            .body()
            .deserialize::<(String, HashMap<String, OwnedValue>, Vec<String>)>()
        else {
            continue;
        };
        if iface != "org.freedesktop.systemd1.Unit" || !changed.contains_key("ActiveState") {
            continue;
        }
        let unit = {
            let s = shared.lock();
            s.units()
                .keys()
                .find(|u| dbus::escape_label(u) == label)
                .cloned()
        };
        let Some(unit) = unit else { continue };
        match dbus::systemd_active_state(sys, &unit).await {
            Ok(Some(state)) if is_gone(&state) => {
                unregister_gone(conn, shared, &unit, &state).await
            }
            Ok(None) => unregister_gone(conn, shared, &unit, "unloaded").await,
            Ok(Some(_)) => {}
            Err(e) => tracing::warn!(unit = %unit, "{unit}: cannot ask systemd about it: {e}"),
        }
    }
    Ok(())
}
