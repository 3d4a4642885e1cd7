//! One registered unit's object, `/org/skactivate1/unit/<escaped name>`,
//! `org.skactivate1.Unit`.

use std::sync::Arc;

use zbus::message::Header;
use zbus::{Connection, interface};

use super::manager::retire_unit;
use super::wire::{SocketEntry, epoch_usec};
use super::{Error, Shared, require_root};

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

    /// Inode of the network namespace the unit's sockets live in (whose
    /// dispatcher holds its bindings): `ls -iL /proc/PID/ns/net` names it.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn network_namespace(&self) -> u64 {
        let s = self.shared.lock();
        s.units()
            .get(&self.unit)
            .map_or_else(|| s.home_netns(), |u| u.netns)
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
        s.unit_bindings(&self.unit)
            .iter()
            .map(|(b, _)| b.to_string())
            .collect()
    }

    /// The unit's sockets; cookie 0 once a socket is gone.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn sockets(&self) -> Vec<SocketEntry> {
        let s = self.shared.lock();
        s.unit_sockets(&self.unit)
            .into_iter()
            .map(Into::into)
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
            .map_or(0, |u| epoch_usec(u.registered))
    }

    #[zbus(property(emits_changed_signal = "false"))]
    async fn warnings(&self) -> Vec<String> {
        self.shared.lock().warnings(&self.unit)
    }
}
