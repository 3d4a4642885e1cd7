//! skactivate: systemd socket activation joined to BPF `sk_lookup`.
//!
//! * [`binding`] — the data model: bindings, destinations, precedence.
//! * [`directive`] — the `X-SkLookup=` grammar.
//! * [`unit`] — finding and reading socket units and their drop-ins.
//! * [`config`] — matching a unit's directives to its sockets.
//! * [`check`] — `skactivate check`, offline validation.
//! * [`dispatcher`] — the only owner of the BPF program and maps.

pub mod binding;
pub mod check;
pub mod config;
pub mod directive;
pub mod dispatcher;
pub mod paths;
pub mod unit;
