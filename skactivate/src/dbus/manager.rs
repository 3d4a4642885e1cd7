//! The manager object, `/org/skactivate1`, `org.skactivate1.Manager`: thin
//! shims over [`crate::service::Service`], plus the unit objects' coming and
//! going and the reload that reconciles with systemd first.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::{ObjectServer, SignalEmitter};
use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{Connection, interface};

use super::unit::UnitObject;
use super::wire::{BindingEntry, DestinationEntry, LookupReply, UnitEntry, epoch_usec};
use super::{Error, MANAGER_PATH, Shared, error_chain, require_root, systemd, unit_path};
use crate::binding::Protocol;
use crate::service::{Directives, Origin};

/// How many of a unit's bindings a registration's journal message and its
/// `SKACTIVATE_BINDING=` field name; the rest are counted.
const LOGGED_BINDINGS: usize = crate::service::SHOWN_BINDINGS;

/// The protocol and address arguments of `Lookup` and `LookupInNamespace`.
fn lookup_args(protocol: &str, address: &str) -> Result<(Protocol, std::net::IpAddr), Error> {
    let protocol: Protocol = protocol
        .parse()
        .map_err(|e: crate::binding::UnknownProtocol| Error::InvalidArgs(e.to_string()))?;
    let addr = address
        .parse()
        .map_err(|_| Error::InvalidArgs(format!("{address:?} is not an IP address")))?;
    Ok((protocol, addr))
}

#[expect(clippy::needless_pass_by_value, reason = "used as map_err(failed)")]
fn failed(e: crate::dispatcher::DispatcherError) -> Error {
    Error::Failed(error_chain(&e))
}

/// The manager object, `/org/skactivate1`.
pub struct Manager {
    pub shared: Arc<Shared>,
}

#[interface(name = "org.skactivate1.Manager")]
impl Manager {
    /// Register a socket unit's listening sockets, or the sockets a service
    /// unit's process bound itself (`register-pid`), reading the unit's
    /// `X-SkLookup=` lines from the files systemd reports.
    #[zbus(out_args("sockets", "bindings"))]
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
        crate::service::check_files_unit_name(&unit)?;
        let files = self.shared.unit_files(&unit).await?;
        self.register(unit, fds, Directives::Files(files), &emitter, server)
            .await
    }

    /// Register sockets with directives given here instead of unit files
    /// (what `skactivate register` sends for its sklookup options).
    #[zbus(out_args("sockets", "bindings"))]
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

    /// Registered units, sorted by name.
    #[zbus(out_args("units"))]
    async fn list_units(&self) -> Vec<UnitEntry> {
        let s = self.shared.lock();
        s.units()
            .iter()
            .map(|(name, u)| UnitEntry {
                unit: name.clone(),
                path: unit_path(name),
                bindings: u.bindings as u32,
                registered_at: epoch_usec(u.registered),
                netns: u.netns,
            })
            .collect()
    }

    /// Bindings in precedence order, most specific first, namespace by
    /// namespace (the daemon's own first).
    #[zbus(out_args("bindings"))]
    async fn list_bindings(&self) -> Result<Vec<BindingEntry>, Error> {
        let s = self.shared.lock();
        let list = s.bindings().map_err(failed)?;
        Ok(list.into_iter().map(Into::into).collect())
    }

    /// Every destination with its counters.
    #[zbus(out_args("destinations"))]
    async fn list_destinations(&self) -> Result<Vec<DestinationEntry>, Error> {
        let s = self.shared.lock();
        let list = s.destinations().map_err(failed)?;
        Ok(list.into_iter().map(Into::into).collect())
    }

    /// The object path of a registered unit.
    #[zbus(out_args("path"))]
    async fn get_unit(&self, unit: String) -> Result<OwnedObjectPath, Error> {
        if self.shared.lock().units().contains_key(&unit) {
            Ok(unit_path(&unit))
        } else {
            Err(Error::NoSuchUnit(format!("{unit}: not registered")))
        }
    }

    /// Where a packet would go, answered by running the live program.
    #[zbus(out_args("verdict", "unit", "binding", "cookie"))]
    async fn lookup(
        &self,
        protocol: String,
        address: String,
        port: u16,
    ) -> Result<(String, String, String, u64), Error> {
        let (protocol, addr) = lookup_args(&protocol, &address)?;
        let (l, written) = self
            .shared
            .lock()
            .lookup(protocol, addr, port)
            .map_err(failed)?;
        Ok(LookupReply::new(&l, written.map(|b| b.to_string())).into())
    }

    /// `Lookup` in the network namespace `netns` is an fd of (as opened from
    /// `/run/netns/NAME` or `/proc/PID/ns/net`): its dispatcher's program
    /// answers. The daemon only reads the fd's inode (fstat); it never
    /// enters the namespace, which would take CAP_SYS_ADMIN. A namespace it
    /// serves no dispatcher in answers `pass`.
    #[zbus(out_args("verdict", "unit", "binding", "cookie"))]
    async fn lookup_in_namespace(
        &self,
        netns: zbus::zvariant::OwnedFd,
        protocol: String,
        address: String,
        port: u16,
    ) -> Result<(String, String, String, u64), Error> {
        let (protocol, addr) = lookup_args(&protocol, &address)?;
        let fd: OwnedFd = netns.into();
        let ino = netns_fd_inode(fd.as_fd())?;
        let (l, written) = self
            .shared
            .lock()
            .lookup_in(ino, protocol, addr, port)
            .map_err(failed)?;
        Ok(LookupReply::new(&l, written.map(|b| b.to_string())).into())
    }

    #[zbus(property(emits_changed_signal = "const"))]
    async fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    /// Inode of the daemon's own network namespace (`NetworkNamespaces`
    /// lists every one it serves).
    #[zbus(property(emits_changed_signal = "const"), name = "NetNS")]
    async fn net_ns(&self) -> u64 {
        self.shared.lock().dispatcher().netns()
    }

    /// Inodes of every network namespace the daemon serves a dispatcher
    /// in: its own first.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn network_namespaces(&self) -> Vec<u64> {
        self.shared.lock().dispatchers().map(|(ns, _)| ns).collect()
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

/// The inode of a network namespace fd passed by a caller, or why it is not one.
fn netns_fd_inode(fd: std::os::fd::BorrowedFd<'_>) -> Result<u64, Error> {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    // SAFETY: an all-zero statfs is valid; fstatfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a live fd and a live statfs.
    let r = unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut st) };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between targets"
    )]
    if r != 0 || st.f_type as i64 != NSFS_MAGIC {
        return Err(Error::InvalidArgs(
            "netns: the fd is not a namespace (open /run/netns/NAME or /proc/PID/ns/net)".into(),
        ));
    }
    // A namespace of another type (mnt, uts, …) is nsfs too: NS_GET_NSTYPE.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: NS_GET_NSTYPE takes no argument and returns the CLONE_NEW* flag.
    let ty = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), NS_GET_NSTYPE as _) };
    if ty != libc::CLONE_NEWNET {
        return Err(Error::InvalidArgs(
            "netns: the fd is a namespace, but not a network namespace".into(),
        ));
    }
    crate::dispatcher::socket::fd_inode(std::os::fd::AsRawFd::as_raw_fd(&fd))
        .map_err(|e| Error::Failed(format!("netns: fstat: {e}")))
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
                // A unit may hold a million bindings: the journal gets the
                // first LOGGED_BINDINGS of them and how many more there are.
                let mut bindings = o
                    .first
                    .iter()
                    .take(LOGGED_BINDINGS)
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ");
                if o.bindings > LOGGED_BINDINGS {
                    bindings.push_str(&format!(" … ({} more)", o.bindings - LOGGED_BINDINGS));
                }
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
