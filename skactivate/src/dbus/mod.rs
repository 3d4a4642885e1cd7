//! `org.skactivate1` on D-Bus: thin shims over [`crate::service`], named
//! errors, the caller check for every state-changing method, and the proxies
//! for systemd that registration and the unit watch need.
//!
//! Reading is open to everyone. Changing state is root-only twice over: the
//! bus policy (`units/org.skactivate1.conf`) and [`require_root`] here, so a
//! loosened policy still leaves the daemon safe.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::UNIX_EPOCH;

use zbus::fdo::DBusProxy;
use zbus::message::Header;
use zbus::object_server::{ObjectServer, SignalEmitter};
use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{Connection, interface};

use crate::binding::Protocol;
use crate::dispatcher::Verdict;
use crate::service::{Directives, Origin, Service, ServiceError, UnitFiles};

pub mod systemd;

pub use systemd::{SystemdManagerProxy, SystemdSocketProxy, SystemdUnitProxy};

pub const BUS_NAME: &str = "org.skactivate1";
pub const MANAGER_PATH: &str = "/org/skactivate1";
pub const MANAGER_INTERFACE: &str = "org.skactivate1.Manager";
pub const UNIT_INTERFACE: &str = "org.skactivate1.Unit";

/// Errors on the wire: `org.skactivate1.Error.*`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.skactivate1.Error")]
pub enum Error {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// A directive is invalid: the message names file, line, value and reason.
    BadDirective(String),
    /// A binding is already another unit's.
    Conflict(String),
    /// The unit is registered the other way (from its unit files, or with
    /// values given with the sockets): unregister it first.
    AlreadyRegistered(String),
    /// An fd is not one of the unit's listening sockets.
    NotUnitSocket(String),
    /// An fd is not a socket skactivate can use.
    InvalidSocket(String),
    NoSuchUnit(String),
    AccessDenied(String),
    InvalidArgs(String),
    Failed(String),
}

impl From<ServiceError> for Error {
    fn from(e: ServiceError) -> Self {
        use crate::dispatcher::DispatcherError as D;
        let msg = error_chain(&e);
        match e {
            ServiceError::BadDirective { .. } | ServiceError::UnitFile { .. } => {
                Error::BadDirective(msg)
            }
            ServiceError::NotUnitSocket { .. } | ServiceError::NoSockets { .. } => {
                Error::NotUnitSocket(msg)
            }
            ServiceError::NotRegistered { .. } => Error::NoSuchUnit(msg),
            ServiceError::InvalidUnitName { .. }
            | ServiceError::NotSocketUnit { .. }
            | ServiceError::NoValues { .. }
            | ServiceError::EmptyValue { .. } => Error::InvalidArgs(msg),
            ServiceError::OriginConflict { .. } => Error::AlreadyRegistered(msg),
            ServiceError::Dispatcher { source, .. } => match *source {
                D::Conflict { .. } => Error::Conflict(msg),
                D::Inspect { .. }
                | D::NotListening { .. }
                | D::Connected { .. }
                | D::OtherNetns { .. }
                | D::AmbiguousSockets { .. } => Error::InvalidSocket(msg),
                D::UnitName(_) => Error::InvalidArgs(msg),
                _ => Error::Failed(msg),
            },
        }
    }
}

impl Error {
    /// The text alone, without the error's name.
    pub fn text(&self) -> String {
        zbus::DBusError::description(self)
            .unwrap_or_default()
            .to_owned()
    }
}

/// An error and its sources, `: `-joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The uid of the caller of a method: from the bus, or from the peer's
/// credentials on a peer-to-peer connection.
pub async fn caller_uid(header: &Header<'_>, conn: &Connection) -> zbus::Result<u32> {
    match header.sender() {
        Some(sender) if conn.unique_name().is_some() => {
            let bus = DBusProxy::new(conn).await?;
            Ok(bus.get_connection_unix_user(sender.clone().into()).await?)
        }
        _ => conn
            .peer_creds()
            .await?
            .unix_user_id()
            .ok_or_else(|| zbus::Error::Failure("peer has no uid".into())),
    }
}

/// Every state-changing method begins here.
pub async fn require_root(header: &Header<'_>, conn: &Connection, what: &str) -> Result<(), Error> {
    let uid = caller_uid(header, conn).await?;
    if uid != 0 {
        return Err(Error::AccessDenied(format!(
            "{what} is for root only (caller uid {uid})"
        )));
    }
    Ok(())
}

/// systemd's object-path escaping (`bus_label_escape`): every byte but
/// `[A-Za-z0-9]` becomes `_xx`.
pub fn escape_label(s: &str) -> String {
    if s.is_empty() {
        return "_".to_owned();
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

pub fn unit_path(unit: &str) -> OwnedObjectPath {
    ObjectPath::try_from(format!("{MANAGER_PATH}/unit/{}", escape_label(unit)))
        .expect("escaped labels are valid object paths")
        .into()
}

/// What the manager object shares with the daemon.
pub struct Shared {
    pub service: Mutex<Service>,
    /// The system bus, where systemd lives; `None` when there is none (tests).
    pub systemd: Option<Connection>,
    /// Called after every change with the service, for `STATUS=` and logs.
    pub on_change: Box<dyn Fn(&Service) + Send + Sync>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Service> {
        self.service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tell the daemon something changed (for `STATUS=`).
    pub fn changed(&self) {
        let s = self.lock();
        (self.on_change)(&s);
    }

    /// Ask systemd where a socket unit's files are and what it listens on.
    pub async fn unit_files(&self, unit: &str) -> Result<UnitFiles, Error> {
        let conn = self
            .systemd
            .as_ref()
            .ok_or_else(|| Error::Failed("no system bus: cannot ask systemd about units".into()))?;
        systemd::unit_files(conn, unit).await
    }
}

/// The manager object, `/org/skactivate1`.
pub struct Manager {
    pub shared: Arc<Shared>,
}

#[interface(name = "org.skactivate1.Manager")]
impl Manager {
    /// Register a socket unit's listening sockets, reading its `X-SkLookup=`
    /// lines from the files systemd reports. Returns (sockets, bindings).
    async fn register_sockets(
        &self,
        unit: String,
        fds: Vec<zbus::zvariant::OwnedFd>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(u32, u32), Error> {
        require_root(&header, conn, "RegisterSockets").await?;
        crate::service::check_socket_unit_name(&unit)?;
        let files = self.shared.unit_files(&unit).await?;
        self.register(unit, fds, Directives::Files(files), &emitter, server)
            .await
    }

    /// Register sockets with directives given here instead of unit files
    /// (what `skactivate register` sends for its sklookup options). Returns
    /// (sockets, bindings).
    #[allow(
        clippy::too_many_arguments,
        reason = "zbus injects header, connection, emitter and server"
    )]
    async fn register_sockets_with_directives(
        &self,
        unit: String,
        fds: Vec<zbus::zvariant::OwnedFd>,
        directives: Vec<String>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(u32, u32), Error> {
        require_root(&header, conn, "RegisterSocketsWithDirectives").await?;
        self.register(unit, fds, Directives::Inline(directives), &emitter, server)
            .await
    }

    /// Remove a unit's bindings and sockets.
    async fn unregister_unit(
        &self,
        unit: String,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), Error> {
        require_root(&header, conn, "UnregisterUnit").await?;
        unregister(&self.shared, server, &unit).await
    }

    /// Re-read every registered unit and apply the differences, unit by unit;
    /// a unit whose directives are now bad keeps its bindings and is named in
    /// the error.
    async fn reload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        #[zbus(object_server)] server: &ObjectServer,
    ) -> Result<(), Error> {
        require_root(&header, conn, "Reload").await?;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        let mut failures = reload_all(&self.shared, server).await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        self.shared.changed();
        self.counts_changed(&emitter).await;
        match failures.len() {
            0 => Ok(()),
            1 => Err(failures.remove(0)),
            _ => Err(Error::BadDirective(
                failures
                    .iter()
                    .map(Error::text)
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
        }
    }

    /// Registered units: (name, object path, bindings, registered at µs since the epoch).
    async fn list_units(&self) -> Vec<(String, OwnedObjectPath, u32, u64)> {
        let s = self.shared.lock();
        s.units()
            .iter()
            .map(|(name, u)| {
                let at = u
                    .registered
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0);
                (name.clone(), unit_path(name), u.bindings.len() as u32, at)
            })
            .collect()
    }

    /// Bindings in precedence order: (binding, unit, family, protocol,
    /// socket present, socket cookie).
    async fn list_bindings(
        &self,
    ) -> Result<Vec<(String, String, String, String, bool, u64)>, Error> {
        let s = self.shared.lock();
        let list = s
            .dispatcher()
            .bindings()
            .map_err(|e| Error::Failed(error_chain(&e)))?;
        Ok(list
            .into_iter()
            .map(|b| {
                (
                    b.binding.to_string(),
                    b.destination.unit,
                    b.destination.family.to_string(),
                    b.destination.protocol.to_string(),
                    b.socket.is_some(),
                    b.socket.unwrap_or(0),
                )
            })
            .collect())
    }

    /// Every destination with its counters: (unit, family, protocol,
    /// lookups, misses, errors, socket present, socket cookie).
    #[allow(clippy::type_complexity, reason = "the D-Bus signature a(ssstttbt)")]
    async fn list_destinations(
        &self,
    ) -> Result<Vec<(String, String, String, u64, u64, u64, bool, u64)>, Error> {
        let s = self.shared.lock();
        let list = s
            .dispatcher()
            .destinations()
            .map_err(|e| Error::Failed(error_chain(&e)))?;
        Ok(list
            .into_iter()
            .map(|d| {
                (
                    d.destination.unit,
                    d.destination.family.to_string(),
                    d.destination.protocol.to_string(),
                    d.metrics.lookups,
                    d.metrics.misses,
                    d.metrics.errors,
                    d.socket.is_some(),
                    d.socket.unwrap_or(0),
                )
            })
            .collect())
    }

    /// The object path of a registered unit.
    async fn get_unit(&self, unit: String) -> Result<OwnedObjectPath, Error> {
        if self.shared.lock().units().contains_key(&unit) {
            Ok(unit_path(&unit))
        } else {
            Err(Error::NoSuchUnit(format!("{unit}: not registered")))
        }
    }

    /// Where a packet would go, answered by running the live program:
    /// (verdict `redirect`|`pass`|`drop`, unit, binding, socket cookie).
    async fn lookup(
        &self,
        protocol: String,
        address: String,
        port: u16,
    ) -> Result<(String, String, String, u64), Error> {
        let protocol: Protocol = protocol
            .parse()
            .map_err(|e: crate::binding::UnknownProtocol| Error::InvalidArgs(e.to_string()))?;
        let addr: std::net::IpAddr = address
            .parse()
            .map_err(|_| Error::InvalidArgs(format!("{address:?} is not an IP address")))?;
        let s = self.shared.lock();
        let l = s
            .dispatcher()
            .lookup(protocol, addr, port)
            .map_err(|e| Error::Failed(error_chain(&e)))?;
        let verdict = match l.verdict {
            Verdict::Redirect => "redirect",
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
        };
        // Name the binding as the unit wrote it (a range, not the one port of it).
        let written = match (&l.destination, &l.binding) {
            (Some(d), Some(b)) => s.units().get(&d.unit).and_then(|u| {
                u.bindings.iter().map(|(w, _)| w).find(|w| {
                    w.protocol == b.protocol
                        && w.prefix == b.prefix
                        && w.ports.is_wildcard() == b.ports.is_wildcard()
                        && w.ports.contains(port)
                })
            }),
            _ => None,
        };
        Ok((
            verdict.to_owned(),
            l.destination.map(|d| d.unit).unwrap_or_default(),
            written
                .or(l.binding.as_ref())
                .map(ToString::to_string)
                .unwrap_or_default(),
            l.cookie.unwrap_or(0),
        ))
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    /// Inode of the network namespace the dispatcher serves.
    #[zbus(property(emits_changed_signal = "const"), name = "NetNS")]
    async fn net_ns(&self) -> u64 {
        self.shared.lock().dispatcher().netns()
    }

    /// Where the dispatcher's state is pinned.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn state_path(&self) -> String {
        self.shared.lock().dispatcher().dir().display().to_string()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn program_id(&self) -> u32 {
        self.shared
            .lock()
            .dispatcher()
            .program()
            .map(|p| p.id)
            .unwrap_or(0)
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn program_tag(&self) -> String {
        self.shared
            .lock()
            .dispatcher()
            .program()
            .map(|p| p.tag_hex())
            .unwrap_or_default()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn attached(&self) -> bool {
        self.shared.lock().dispatcher().attached()
    }

    #[zbus(property)]
    async fn units(&self) -> u32 {
        self.shared.lock().counts().units
    }

    #[zbus(property)]
    async fn bindings(&self) -> u32 {
        self.shared.lock().counts().bindings
    }

    #[zbus(property)]
    async fn sockets(&self) -> u32 {
        self.shared.lock().counts().sockets
    }

    #[zbus(signal)]
    pub async fn unit_registered(
        emitter: &SignalEmitter<'_>,
        unit: &str,
        path: ObjectPath<'_>,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    pub async fn unit_unregistered(
        emitter: &SignalEmitter<'_>,
        unit: &str,
        path: ObjectPath<'_>,
    ) -> zbus::Result<()>;
}

impl Manager {
    async fn register(
        &self,
        unit: String,
        fds: Vec<zbus::zvariant::OwnedFd>,
        directives: Directives,
        emitter: &SignalEmitter<'_>,
        server: &ObjectServer,
    ) -> Result<(u32, u32), Error> {
        let fds: Vec<OwnedFd> = fds.into_iter().map(Into::into).collect();
        // Reading and matching the values is linear, but a unit may carry many:
        // off the event loop, which keeps answering and feeding the watchdog.
        let (shared, name) = (self.shared.clone(), unit.clone());
        let r = tokio::task::spawn_blocking(move || {
            let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
            shared.lock().register(&name, &borrowed, &directives)
            // Our copies close here: the map entries now live as long as systemd's sockets.
        })
        .await
        .map_err(|e| Error::Failed(format!("{unit}: the registration did not finish: {e}")))?;
        match r {
            Ok(o) => {
                let bindings =
                    self.shared
                        .lock()
                        .units()
                        .get(&unit)
                        .map_or_else(String::new, |u| {
                            u.bindings
                                .iter()
                                .map(|(b, _)| b.to_string())
                                .collect::<Vec<_>>()
                                .join(" ")
                        });
                // Journal fields SKACTIVATE_UNIT=, SKACTIVATE_BINDING= (space-separated), …
                tracing::info!(unit = %unit, binding = %bindings, sockets = o.sockets, "{unit}: registered {o}: {bindings}");
                self.shared.changed();
                publish_unit(server, &self.shared, &unit).await?;
                Self::unit_registered(emitter, &unit, unit_path(&unit).as_ref()).await?;
                self.counts_changed(emitter).await;
                Ok((o.sockets as u32, o.bindings as u32))
            }
            Err(e) => {
                tracing::error!(unit = %unit, "registration refused: {}", error_chain(&e));
                Err(e.into())
            }
        }
    }

    pub async fn counts_changed(&self, emitter: &SignalEmitter<'_>) {
        let _ = self.units_changed(emitter).await;
        let _ = self.bindings_changed(emitter).await;
        let _ = self.sockets_changed(emitter).await;
    }
}

/// Put a unit's object on the bus (no-op if it is there).
pub async fn publish_unit(
    server: &ObjectServer,
    shared: &Arc<Shared>,
    unit: &str,
) -> zbus::Result<()> {
    server
        .at(
            unit_path(unit),
            UnitObject {
                shared: shared.clone(),
                unit: unit.to_owned(),
            },
        )
        .await?;
    Ok(())
}

/// Unregister a unit: its bindings, its object, and the signals saying so.
pub async fn unregister(shared: &Shared, server: &ObjectServer, unit: &str) -> Result<(), Error> {
    let changes = shared.lock().unregister(unit)?;
    tracing::info!(unit = %unit, removed = changes.removed, "{unit}: unregistered");
    shared.changed();
    retire_unit(server, unit).await;
    Ok(())
}

/// Take a unit's object off the bus and tell subscribers it went.
pub async fn retire_unit(server: &ObjectServer, unit: &str) {
    let path = unit_path(unit);
    let _ = server.remove::<UnitObject, _>(&path).await;
    if let Ok(iface) = server.interface::<_, Manager>(MANAGER_PATH).await {
        let emitter = iface.signal_emitter();
        let _ = Manager::unit_unregistered(emitter, unit, path.as_ref()).await;
        iface.get().await.counts_changed(emitter).await;
    }
}

/// One registered unit, `/org/skactivate1/unit/<escaped name>`.
pub struct UnitObject {
    pub shared: Arc<Shared>,
    pub unit: String,
}

#[interface(name = "org.skactivate1.Unit")]
impl UnitObject {
    /// Unregister this unit (as `UnregisterUnit`).
    async fn unregister(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), Error> {
        require_root(&header, conn, "Unregister").await?;
        // This object goes away: do it outside its own method call.
        let (shared, conn, unit) = (self.shared.clone(), conn.clone(), self.unit.clone());
        let r = shared.lock().unregister(&unit);
        r?;
        shared.changed();
        tokio::spawn(async move { retire_unit(conn.object_server(), &unit).await });
        Ok(())
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn id(&self) -> String {
        self.unit.clone()
    }

    /// `files` (X-SkLookup= from the unit's files), `inline` (values given
    /// with the sockets) or `unknown` (adopted from an older build's state).
    #[zbus(property(emits_changed_signal = "const"))]
    async fn source(&self) -> String {
        let s = self.shared.lock();
        s.units()
            .get(&self.unit)
            .map_or("unknown", |u| u.origin.name())
            .to_owned()
    }

    /// The unit's bindings as written: `tcp:192.0.2.0/24:80`.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn bindings(&self) -> Vec<String> {
        let s = self.shared.lock();
        s.units()
            .get(&self.unit)
            .map(|u| u.bindings.iter().map(|(b, _)| b.to_string()).collect())
            .unwrap_or_default()
    }

    /// (family, protocol, local address, cookie); cookie 0 once the socket is gone.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn sockets(&self) -> Vec<(String, String, String, u64)> {
        let s = self.shared.lock();
        s.unit_sockets(&self.unit)
            .into_iter()
            .map(|k| {
                (
                    k.family.to_string(),
                    k.protocol.to_string(),
                    k.local.map(|a| a.to_string()).unwrap_or_default(),
                    k.cookie.unwrap_or(0),
                )
            })
            .collect()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn lookups(&self) -> u64 {
        self.shared.lock().unit_metrics(&self.unit).lookups
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn misses(&self) -> u64 {
        self.shared.lock().unit_metrics(&self.unit).misses
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn errors(&self) -> u64 {
        self.shared.lock().unit_metrics(&self.unit).errors
    }

    /// µs since the epoch.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn registered_at(&self) -> u64 {
        let s = self.shared.lock();
        s.units()
            .get(&self.unit)
            .and_then(|u| u.registered.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as u64)
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn warnings(&self) -> Vec<String> {
        self.shared.lock().warnings(&self.unit)
    }
}

/// Reconcile with systemd, then re-read every registered unit; returns one
/// error per unit that failed (it keeps its bindings).
pub async fn reload_all(shared: &Arc<Shared>, server: &ObjectServer) -> Vec<Error> {
    if let Some(sys) = &shared.systemd {
        systemd::reconcile(server, sys, shared).await;
    }
    let units: Vec<(String, bool)> = shared
        .lock()
        .units()
        .iter()
        .map(|(name, u)| (name.clone(), matches!(u.origin, Origin::Inline(_))))
        .collect();
    let mut failures = Vec::new();
    for (unit, inline) in units {
        let files = match &shared.systemd {
            Some(conn) if !inline => match systemd::unit_files(conn, &unit).await {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::error!(unit = %unit, "reload refused, keeping the previous bindings: {}", e.text());
                    failures.push(e);
                    continue;
                }
            },
            _ => None,
        };
        let r = {
            let (shared, unit) = (shared.clone(), unit.clone());
            tokio::task::spawn_blocking(move || shared.lock().reload(&unit, files.as_ref())).await
        };
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                failures.push(Error::Failed(format!(
                    "{unit}: the reload did not finish: {e}"
                )));
                continue;
            }
        };
        match r {
            Ok(o) => tracing::info!(unit = %unit, "{unit}: reloaded, {o}"),
            Err(e) => {
                tracing::error!(unit = %unit, "reload refused, keeping the previous bindings: {}", error_chain(&e));
                failures.push(e.into());
            }
        }
    }
    failures
}

/// The client side of `org.skactivate1.Manager`.
#[zbus::proxy(
    interface = "org.skactivate1.Manager",
    default_service = "org.skactivate1",
    default_path = "/org/skactivate1"
)]
pub trait Skactivate {
    fn register_sockets(
        &self,
        unit: &str,
        fds: &[zbus::zvariant::Fd<'_>],
    ) -> zbus::Result<(u32, u32)>;
    fn register_sockets_with_directives(
        &self,
        unit: &str,
        fds: &[zbus::zvariant::Fd<'_>],
        directives: &[&str],
    ) -> zbus::Result<(u32, u32)>;
    /// Never starts the daemon just to unregister (it may be shutting down).
    #[zbus(no_autostart)]
    fn unregister_unit(&self, unit: &str) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<()>;
    // Reading never starts the daemon (as `systemctl status` starts nothing).
    #[zbus(no_autostart)]
    fn get_unit(&self, unit: &str) -> zbus::Result<OwnedObjectPath>;
    #[zbus(no_autostart)]
    fn list_units(&self) -> zbus::Result<Vec<(String, OwnedObjectPath, u32, u64)>>;
    #[zbus(no_autostart)]
    fn list_bindings(&self) -> zbus::Result<Vec<(String, String, String, String, bool, u64)>>;
    #[allow(clippy::type_complexity, reason = "the D-Bus signature a(ssstttbt)")]
    #[zbus(no_autostart)]
    fn list_destinations(
        &self,
    ) -> zbus::Result<Vec<(String, String, String, u64, u64, u64, bool, u64)>>;
    #[zbus(no_autostart)]
    fn lookup(
        &self,
        protocol: &str,
        address: &str,
        port: u16,
    ) -> zbus::Result<(String, String, String, u64)>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property, name = "NetNS")]
    fn net_ns(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn state_path(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn program_id(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn program_tag(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn attached(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn units(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn bindings(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn sockets(&self) -> zbus::Result<u32>;
    #[zbus(signal)]
    fn unit_registered(&self, unit: String, path: OwnedObjectPath) -> zbus::Result<()>;
    #[zbus(signal)]
    fn unit_unregistered(&self, unit: String, path: OwnedObjectPath) -> zbus::Result<()>;
}

/// The client side of `org.skactivate1.Unit`.
#[zbus::proxy(
    interface = "org.skactivate1.Unit",
    default_service = "org.skactivate1"
)]
pub trait SkactivateUnit {
    fn unregister(&self) -> zbus::Result<()>;
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn source(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn bindings(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn sockets(&self) -> zbus::Result<Vec<(String, String, String, u64)>>;
    #[zbus(property)]
    fn lookups(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn misses(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn errors(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn registered_at(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn warnings(&self) -> zbus::Result<Vec<String>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_use_systemds_escaping() {
        assert_eq!(
            unit_path("webserver.socket").as_str(),
            "/org/skactivate1/unit/webserver_2esocket"
        );
        assert_eq!(
            unit_path("dns-a@eth0.socket").as_str(),
            "/org/skactivate1/unit/dns_2da_40eth0_2esocket"
        );
        assert_eq!(escape_label(""), "_");
    }
}
