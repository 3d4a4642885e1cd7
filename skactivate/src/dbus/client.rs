//! The client side of `org.skactivate1`: the proxies `skactivate register`,
//! `unregister` and `status` use, over the same wire structures as the server.

use zbus::zvariant::OwnedObjectPath;

use super::wire::{
    BindingEntry, DestinationEntry, LookupArgs, RegisteredArgs, SocketEntry, UnitEntry,
};

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
    ) -> zbus::Result<RegisteredArgs>;
    fn register_sockets_with_directives(
        &self,
        unit: &str,
        fds: &[zbus::zvariant::Fd<'_>],
        directives: &[&str],
    ) -> zbus::Result<RegisteredArgs>;
    /// Never starts the daemon just to unregister (it may be shutting down).
    #[zbus(no_autostart)]
    fn unregister_unit(&self, unit: &str) -> zbus::Result<()>;
    fn reload(&self) -> zbus::Result<()>;
    // Reading never starts the daemon (as `systemctl status` starts nothing).
    #[zbus(no_autostart)]
    fn get_unit(&self, unit: &str) -> zbus::Result<OwnedObjectPath>;
    #[zbus(no_autostart)]
    fn list_units(&self) -> zbus::Result<Vec<UnitEntry>>;
    #[zbus(no_autostart)]
    fn list_bindings(&self) -> zbus::Result<Vec<BindingEntry>>;
    #[zbus(no_autostart)]
    fn list_destinations(&self) -> zbus::Result<Vec<DestinationEntry>>;
    #[zbus(no_autostart)]
    fn lookup(&self, protocol: &str, address: &str, port: u16) -> zbus::Result<LookupArgs>;
    #[zbus(no_autostart)]
    fn lookup_in_namespace(
        &self,
        netns: zbus::zvariant::Fd<'_>,
        protocol: &str,
        address: &str,
        port: u16,
    ) -> zbus::Result<LookupArgs>;
    #[zbus(property)]
    fn network_namespaces(&self) -> zbus::Result<Vec<u64>>;
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
    fn network_namespace(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn source(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn bindings(&self) -> zbus::Result<Vec<String>>;
    #[zbus(property)]
    fn sockets(&self) -> zbus::Result<Vec<SocketEntry>>;
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
