//! What the daemon asks of systemd, and how it follows it: the proxies for
//! `org.freedesktop.systemd1`, a socket unit's files and sockets, and the
//! reconciliation that keeps the registered units exactly the socket units
//! systemd has active.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use futures_util::StreamExt;
use zbus::object_server::ObjectServer;
use zbus::proxy::CacheProperties;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};
use zbus::{Connection, MatchRule, MessageStream};

use super::{Error, Shared, error_chain, escape_label, retire_unit};
use crate::service::UnitFiles;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait SystemdManager {
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn subscribe(&self) -> zbus::Result<()>;
    #[allow(clippy::type_complexity)]
    fn list_units_by_patterns(
        &self,
        states: &[&str],
        patterns: &[&str],
    ) -> zbus::Result<
        Vec<(
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        )>,
    >;
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn list_jobs(
        &self,
    ) -> zbus::Result<
        Vec<(
            u32,
            String,
            String,
            String,
            OwnedObjectPath,
            OwnedObjectPath,
        )>,
    >;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
pub trait SystemdUnit {
    #[zbus(property)]
    fn fragment_path(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn drop_in_paths(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Socket",
    default_service = "org.freedesktop.systemd1"
)]
pub trait SystemdSocket {
    #[zbus(property)]
    fn listen(&self) -> zbus::Result<Vec<(String, String)>>;
    #[zbus(property, name = "BindIPv6Only")]
    fn bind_ipv6_only(&self) -> zbus::Result<String>;
}

/// systemd's answer to `GetUnit` for a unit it has not loaded.
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";

/// The object path of a unit systemd has loaded; `None` if it has not.
async fn loaded_unit(conn: &Connection, unit: &str) -> zbus::Result<Option<OwnedObjectPath>> {
    match SystemdManagerProxy::new(conn).await?.get_unit(unit).await {
        Ok(path) => Ok(Some(path)),
        Err(zbus::Error::MethodError(name, _, _)) if name.as_str() == NO_SUCH_UNIT => Ok(None),
        Err(e) => Err(e),
    }
}

/// `FragmentPath`, `DropInPaths`, `Listen` and `BindIPv6Only` of a socket
/// unit; of any other unit (a service), its files alone.
pub async fn unit_files(conn: &Connection, unit: &str) -> Result<UnitFiles, Error> {
    let Some(path) = loaded_unit(conn, unit).await? else {
        return Err(Error::NoSuchUnit(format!(
            "{unit}: systemd has no such unit loaded"
        )));
    };
    let u = SystemdUnitProxy::builder(conn)
        .path(path.clone())?
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    let fragment = u.fragment_path().await?;
    if fragment.is_empty() {
        return Err(Error::NoSuchUnit(format!(
            "{unit}: systemd knows no unit file for it"
        )));
    }
    let mut files = UnitFiles {
        fragment: fragment.into(),
        dropins: u
            .drop_in_paths()
            .await?
            .into_iter()
            .map(Into::into)
            .collect(),
        ..UnitFiles::default()
    };
    if unit.ends_with(".socket") {
        let s = SystemdSocketProxy::builder(conn)
            .path(path)?
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        files.listen = s.listen().await?;
        files.bind_ipv6_only = s.bind_ipv6_only().await?;
    }
    Ok(files)
}

/// A unit's `ActiveState`, or `None` if systemd has not loaded it (an
/// inactive unit nothing refers to is unloaded: `GetUnit` says NoSuchUnit).
pub async fn active_state(conn: &Connection, unit: &str) -> zbus::Result<Option<String>> {
    let Some(path) = loaded_unit(conn, unit).await? else {
        return Ok(None);
    };
    let u = SystemdUnitProxy::builder(conn)
        .path(path)?
        .cache_properties(CacheProperties::No)
        .build()
        .await?;
    Ok(Some(u.active_state().await?))
}

/// Why a registered unit no longer should be: its state, or "not loaded".
/// `None` while it is active (or on its way up or down).
fn gone(state: Option<&str>) -> Option<String> {
    match state {
        None => Some("not loaded by systemd".to_owned()),
        Some(s @ ("inactive" | "failed")) => Some(s.to_owned()),
        Some(_) => None,
    }
}

/// Unregister a unit whose systemd unit is gone, and say why.
async fn unregister_gone(server: &ObjectServer, shared: &Shared, unit: &str, why: &str) {
    let r = shared.lock().unregister(unit);
    match r {
        Ok(c) => {
            tracing::info!(unit = %unit, removed = c.removed, "{unit}: {why}: unregistered");
            shared.changed();
            retire_unit(server, unit).await;
        }
        Err(e) => tracing::debug!(unit = %unit, "{e}"),
    }
}

/// Make the registered units exactly those systemd has loaded and active:
/// every other one loses its bindings, sockets and object. Units systemd
/// cannot be asked about (an error other than NoSuchUnit) are kept and
/// warned about. Then, in a task of its own (it neither delays readiness
/// nor a reload), every active socket unit with valid `X-SkLookup=` lines
/// that is not registered gets its `skactivate@.service` started (see
/// [`register_missing`]). Returns how many were unregistered.
pub async fn reconcile(server: &ObjectServer, sys: &Connection, shared: &Arc<Shared>) -> usize {
    let n = unregister_stale(server, sys, shared).await;
    let (sys, shared) = (sys.clone(), shared.clone());
    tokio::spawn(async move {
        if let Err(e) = register_missing(&sys, &shared).await {
            tracing::warn!("cannot list systemd's active socket units: {e}");
        }
    });
    n
}

/// The causes already logged by [`register_missing`]: each is said once per
/// daemon, not on every reload.
static SKIPPED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn skip_once(unit: &str, why: &str) {
    let said = SKIPPED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(why.to_owned());
    if said {
        tracing::warn!(unit = %unit, "{why}: not registered");
    }
}

/// Start `skactivate@NAME.service` for every socket unit systemd has active
/// whose files carry `X-SkLookup=` lines but that is not registered (its
/// registration was lost while the daemon was away, or undone by hand). The
/// job is not waited for: it calls back into this daemon, which may be in a
/// D-Bus method (`Reload`) right now. A unit whose directives are bad is
/// logged and skipped. Returns how many registrations were started.
pub async fn register_missing(sys: &Connection, shared: &Shared) -> zbus::Result<usize> {
    let manager = SystemdManagerProxy::new(sys).await?;
    let listed = manager
        .list_units_by_patterns(&["active", "listening"], &["*.socket"])
        .await?;
    // Registrations already queued (at boot, the socket units' own, waiting
    // for this daemon to be ready) need no second start.
    let queued: BTreeSet<String> = manager
        .list_jobs()
        .await?
        .into_iter()
        .filter(|(_, _, kind, ..)| kind == "start")
        .map(|(_, unit, ..)| unit)
        .collect();
    let mut started = 0;
    for (unit, ..) in listed {
        if shared.lock().units().contains_key(&unit) {
            continue;
        }
        let stem = unit.strip_suffix(".socket").unwrap_or(&unit);
        let registration = format!("skactivate@{stem}.service");
        if queued.contains(&registration) {
            continue;
        }
        let files = match unit_files(sys, &unit).await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(unit = %unit, "{}", e.text());
                continue;
            }
        };
        let wanted = shared.lock().wants_registration(&unit, &files);
        // Reading a unit's files may have taken much (a million lines).
        super::release_free_memory();
        match wanted {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                skip_once(&unit, &error_chain(&e));
                continue;
            }
        }
        match manager.start_unit(&registration, "replace").await {
            Ok(job) => {
                tracing::info!(
                    unit = %unit,
                    "{unit}: active with X-SkLookup= but not registered: started {registration} ({})",
                    job.as_str()
                );
                started += 1;
            }
            Err(e) => tracing::warn!(unit = %unit, "{unit}: cannot start {registration}: {e}"),
        }
    }
    Ok(started)
}

/// Unregister every registered unit systemd no longer has active; returns
/// how many.
async fn unregister_stale(server: &ObjectServer, sys: &Connection, shared: &Shared) -> usize {
    let units: Vec<String> = shared.lock().units().keys().cloned().collect();
    let mut n = 0;
    for unit in units {
        match active_state(sys, &unit).await {
            Ok(state) => {
                if let Some(why) = gone(state.as_deref()) {
                    unregister_gone(server, shared, &unit, &why).await;
                    n += 1;
                }
            }
            Err(e) => tracing::warn!(unit = %unit, "{unit}: cannot ask systemd about it: {e}"),
        }
    }
    n
}

/// Follow `ActiveState` of every registered unit; one that went inactive,
/// failed or was unloaded loses its bindings. The state is asked afresh
/// before acting, so a stop signal that arrives after a quick restart's
/// registration is ignored.
pub async fn follow(
    server: &ObjectServer,
    sys: &Connection,
    shared: &Shared,
) -> anyhow::Result<()> {
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
            s.units().keys().find(|u| escape_label(u) == label).cloned()
        };
        let Some(unit) = unit else { continue };
        match active_state(sys, &unit).await {
            Ok(state) => {
                if let Some(why) = gone(state.as_deref()) {
                    unregister_gone(server, shared, &unit, &why).await;
                }
            }
            Err(e) => tracing::warn!(unit = %unit, "{unit}: cannot ask systemd about it: {e}"),
        }
    }
    Ok(())
}
