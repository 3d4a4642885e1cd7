//! skactivate: systemd socket activation joined to BPF `sk_lookup`.
//!
//! * [`binding`] — the data model: bindings, destinations, precedence.
//! * [`directive`] — the `X-SkLookup=` grammar.
//! * [`unit`] — finding and reading socket units and their drop-ins.
//! * [`config`] — matching a unit's directives to its sockets.
//! * [`check`] — `skactivate check`, offline validation.
//! * [`dispatcher`] — the only owner of the BPF program and maps.
//! * [`service`] — what the daemon does: register, reload, unregister units.
//! * [`dbus`] — `org.skactivate1`, thin shims over [`service`].
//! * [`daemon`] — `skactivate daemon`: bus, readiness, following systemd.
//! * [`client`] — `skactivate register` / `unregister`.
//! * [`register_pid`] — `skactivate register-pid`: sockets of a running process.
//! * [`generator`] — `skactivate-generator`, the systemd generator.
//! * [`notify`] — `sd_notify` messages that never wait on the manager.
//! * [`proxy`] — `skactivate proxy`, the socket-activated proxy.

pub mod binding;
pub mod check;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod directive;
pub mod dispatcher;
pub mod generator;
pub mod notify;
pub mod paths;
pub mod proxy;
pub mod register_pid;
pub mod route;
pub mod service;
pub mod status;
pub mod unit;
