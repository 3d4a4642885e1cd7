//! `org.skactivate1` on D-Bus, cut as stratisd and oo7 cut theirs:
//!
//! * here: the names, the errors on the wire, the caller check for every
//!   state-changing method, object paths, and what the objects share;
//! * [`manager`] and [`unit`]: the two interfaces, thin shims over
//!   [`crate::service::Service`];
//! * [`wire`]: the structures on the wire, shared by server, proxies and
//!   the status client;
//! * [`client`]: the proxies of our own interfaces;
//! * [`systemd`]: the proxies for systemd, and following its units.
//!
//! Reading is open to everyone. Changing state is root-only twice over: the
//! bus policy (`units/org.skactivate1.conf`) and [`require_root`] here, so a
//! loosened policy still leaves the daemon safe.

use std::sync::{Mutex, MutexGuard};

use zbus::Connection;
use zbus::fdo::DBusProxy;
use zbus::message::Header;
use zbus::zvariant::{ObjectPath, OwnedObjectPath};

use crate::service::{Service, ServiceError, UnitFiles};

pub mod client;
pub mod manager;
pub mod systemd;
pub mod unit;
pub mod wire;

pub use client::{SkactivateProxy, SkactivateUnitProxy};
pub use manager::{Manager, publish_unit, reload_all, retire_unit, unregister};
pub use systemd::{SystemdManagerProxy, SystemdSocketProxy, SystemdUnitProxy};
pub use unit::UnitObject;

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
            ServiceError::SpansNamespaces { .. } => Error::InvalidSocket(msg),
            ServiceError::Namespace { .. } => Error::Failed(msg),
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
        drop(s);
        release_free_memory();
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

/// Keep every large allocation (the index's tables, a unit's resolved
/// values, batches for the maps) in mappings of its own, returned to the
/// kernel as soon as it is freed. glibc's default raises the threshold to
/// the size of any mapped block freed (up to 32 MiB), after which such
/// buffers come from the heap, where the small allocations living beside
/// them keep their pages resident. Called once, at the daemon's start.
pub fn keep_large_allocations_apart() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a parameter of the allocator; it is
    // thread-safe (it takes the main arena's lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Give the memory freed by a change back to the kernel. Reading a unit's
/// files and resolving a million values allocates several times what the
/// daemon keeps; glibc's allocator would hold on to that peak (hundreds of
/// MiB with a million bindings) until the process exits. A change is rare
/// and the trim takes milliseconds.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and returns the allocator's own free
    // memory; it is thread-safe (it takes the arenas' locks).
    unsafe {
        libc::malloc_trim(0);
    }
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
