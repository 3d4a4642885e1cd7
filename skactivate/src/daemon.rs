//! `skactivate daemon`: owns the dispatcher and `org.skactivate1`.
//!
//! Start-up: adopt (or create) the pinned dispatcher, upgrade its program if
//! this build's differs, forget adopted units whose socket unit is no longer
//! active, take the bus name, then `READY=1`. From then on it follows systemd:
//! a registered socket unit that goes inactive loses its bindings even if no
//! one called `unregister`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use sd_notify::NotifyState;
use zbus::Connection;

use crate::dbus::{self, MANAGER_PATH, Manager, Shared};
use crate::dispatcher::Dispatcher;
use crate::notify::{Notifier, notify_nowait};
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
    // The caller prints the error (stderr reaches the journal): said once.
    if let Err(e) = &r {
        let _ = notify_nowait(&[NotifyState::Status(&format!("failed: {e:#}"))]);
    }
    r
}

/// What the daemon tells the service manager. Nothing waits on the manager
/// (see [`crate::notify`]): a change is told from a D-Bus handler with the
/// service locked, and a full queue would hold every call. What finds the
/// queue full is sent again by [`Telling::settle`], which runs only while
/// something is owed: no wake-ups when idle.
struct Telling {
    notifier: Mutex<Notifier>,
    owed: tokio::sync::Notify,
}

impl Telling {
    fn new() -> Telling {
        Telling {
            notifier: Mutex::new(Notifier::default()),
            owed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Notifier> {
        self.notifier
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `f` with the notifier; what it leaves owed is sent again later.
    fn with(&self, f: impl FnOnce(&mut Notifier)) {
        let mut n = self.lock();
        f(&mut n);
        if n.owes() {
            self.owed.notify_one();
        }
    }

    /// Send what is owed every `every` until nothing is.
    async fn settle(&self, every: Duration) {
        loop {
            self.owed.notified().await;
            loop {
                tokio::time::sleep(every).await;
                if self.lock().flush() {
                    break;
                }
            }
        }
    }
}

/// Who owns `org.skactivate1` on `conn`'s bus, if anyone: its pid.
async fn name_owner_pid(conn: &Connection) -> Option<u32> {
    let bus = zbus::fdo::DBusProxy::new(conn).await.ok()?;
    let name = zbus::names::BusName::try_from(dbus::BUS_NAME).ok()?;
    let owner = bus.get_name_owner(name).await.ok()?;
    bus.get_connection_unix_process_id(owner.into()).await.ok()
}

/// The bus name, without allowing anyone to take it from us and without
/// queueing: a second daemon fails at once instead of waiting its turn.
async fn own_bus_name(conn: &Connection, bus: &Bus) -> Result<()> {
    use zbus::fdo::RequestNameFlags;
    match conn
        .request_name_with_flags(dbus::BUS_NAME, RequestNameFlags::DoNotQueue.into())
        .await
    {
        Ok(_) => Ok(()),
        Err(zbus::Error::NameTaken) => Err(name_taken(conn, bus).await),
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("owning {} on the {bus:?} bus", dbus::BUS_NAME)))
        }
    }
}

async fn name_taken(conn: &Connection, bus: &Bus) -> anyhow::Error {
    let holder = match name_owner_pid(conn).await {
        Some(pid) => format!("pid {pid}"),
        None => "another process".to_owned(),
    };
    anyhow::anyhow!(
        "{} is already owned on the {bus:?} bus by {holder}: another skactivate daemon is running \
         (systemctl status skactivate.service); this one changed nothing and exits",
        dbus::BUS_NAME
    )
}

async fn serve(opts: &Options) -> Result<()> {
    dbus::keep_large_allocations_apart();
    // A daemon already serving this bus: say so before touching anything.
    let conn = opts
        .bus
        .connect()
        .await
        .with_context(|| format!("connecting to the {:?} bus", opts.bus))?;
    let owned = zbus::fdo::DBusProxy::new(&conn)
        .await?
        .name_has_owner(zbus::names::BusName::try_from(dbus::BUS_NAME)?)
        .await?;
    if owned {
        return Err(name_taken(&conn, &opts.bus).await);
    }
    let opening = std::time::Instant::now();
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
        "dispatcher attached to netns {} from {} (program {} tag {}; opened in {} ms)",
        dispatcher.netns(),
        dispatcher.dir().display(),
        prog.id,
        prog.tag_hex(),
        opening.elapsed().as_millis()
    );
    let mut service =
        Service::new(dispatcher, Path::new("/")).context("reading the pinned state")?;
    // Other namespaces served before a restart: their dispatchers are adopted
    // (or their state removed, if the namespace is gone).
    service.adopt_namespaces();

    // Serve first, then take the name, so no call finds the name without the object.
    // systemd lives on the system bus, whichever bus we serve on.
    let systemd = match &opts.bus {
        Bus::System => Some(conn.clone()),
        _ => Connection::system().await.ok(),
    };
    let telling = Arc::new(Telling::new());
    let watchdog = sd_notify::watchdog_enabled();
    // Owed messages go again this often: a WATCHDOG=1 that found the queue
    // full goes well within the watchdog's time.
    let again = watchdog.map_or(Duration::from_millis(500), |d| {
        (d / 4).min(Duration::from_millis(500))
    });
    let settling = {
        let telling = telling.clone();
        tokio::spawn(async move { telling.settle(again).await })
    };
    let shared = Arc::new(Shared {
        service: Mutex::new(service),
        systemd,
        on_change: {
            let telling = telling.clone();
            Box::new(move |s: &Service| {
                telling.with(|n| {
                    n.update(false, &status_line(s));
                });
            })
        },
    });
    conn.object_server()
        .at(
            MANAGER_PATH,
            Manager {
                shared: shared.clone(),
            },
        )
        .await?;
    own_bus_name(&conn, &opts.bus).await?;

    // The units adopted from the pinned state are reconciled with systemd:
    // one that stopped or was unloaded while we were away loses its bindings.
    if let Some(sys) = &shared.systemd {
        dbus::systemd::reconcile(conn.object_server(), sys, &shared).await;
    }
    let adopted: Vec<String> = shared.lock().units().keys().cloned().collect();
    for unit in adopted {
        dbus::publish_unit(conn.object_server(), &shared, &unit).await?;
    }
    let status = status_line(&shared.lock());
    telling.with(|n| {
        n.update(true, &status);
    });
    tracing::info!("ready: {status}");

    let watch = shared.systemd.clone().map(|sys| {
        let (conn, shared) = (conn.clone(), shared.clone());
        tokio::spawn(async move {
            if let Err(e) = dbus::systemd::follow(conn.object_server(), &sys, &shared).await {
                tracing::error!("no longer following systemd's socket units: {e:#}");
            }
        })
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    // The watchdog's ping, at half its time; without a watchdog no timer at
    // all: nothing wakes the daemon while nothing happens.
    let mut ping = watchdog.map(|d| tokio::time::interval(d / 2));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                telling.with(Notifier::reloading);
                let failures = dbus::reload_all(&shared, conn.object_server()).await;
                let status = status_line(&shared.lock());
                telling.with(|n| {
                    n.update(true, &status);
                });
                tracing::info!("reloaded on SIGHUP ({} unit(s) refused): {status}", failures.len());
            }
            _ = async {
                match ping.as_mut() {
                    Some(p) => {
                        p.tick().await;
                    }
                    None => std::future::pending().await,
                }
            } => {
                telling.with(|n| {
                    n.watchdog();
                });
            }
        }
    }
    settling.abort();
    let _ = notify_nowait(&[NotifyState::Stopping]);
    if let Some(w) = watch {
        w.abort();
    }
    // The pinned link and maps stay: traffic flows on while we are gone.
    tracing::info!("stopping; the dispatcher keeps running from its pinned state");
    Ok(())
}
