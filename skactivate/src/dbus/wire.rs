//! The structures `org.skactivate1` puts on the wire, shared by the server
//! (`manager.rs`, `unit.rs`), the proxies (`client.rs`) and the status
//! client, so that each signature is written once. Each says its D-Bus
//! signature; the field order is the wire order.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Type, Value};

use crate::dispatcher::{BindingInfo, DestinationInfo, Lookup, Verdict};
use crate::service::UnitSocket;

/// µs since the epoch, 0 before it.
pub fn epoch_usec(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One element of `ListUnits()`: `(soutt)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct UnitEntry {
    pub unit: String,
    pub path: OwnedObjectPath,
    pub bindings: u32,
    /// µs since the epoch.
    pub registered_at: u64,
    /// Inode of the network namespace its sockets live in.
    pub netns: u64,
}

/// One element of `ListBindings()`: `(ssssbtt)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct BindingEntry {
    pub binding: String,
    pub unit: String,
    pub family: String,
    pub protocol: String,
    pub present: bool,
    /// 0 once the socket is gone.
    pub cookie: u64,
    /// Inode of the network namespace whose dispatcher holds it.
    pub netns: u64,
}

impl From<(u64, BindingInfo)> for BindingEntry {
    fn from((netns, b): (u64, BindingInfo)) -> Self {
        BindingEntry {
            binding: b.binding.to_string(),
            unit: b.destination.unit,
            family: b.destination.family.to_string(),
            protocol: b.destination.protocol.to_string(),
            present: b.socket.is_some(),
            cookie: b.socket.unwrap_or(0),
            netns,
        }
    }
}

/// One element of `ListDestinations()`: `(ssstttbtt)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type)]
pub struct DestinationEntry {
    pub unit: String,
    pub family: String,
    pub protocol: String,
    pub lookups: u64,
    pub misses: u64,
    pub errors: u64,
    pub present: bool,
    pub cookie: u64,
    /// Inode of the network namespace whose dispatcher holds it.
    pub netns: u64,
}

impl From<(u64, DestinationInfo)> for DestinationEntry {
    fn from((netns, d): (u64, DestinationInfo)) -> Self {
        DestinationEntry {
            unit: d.destination.unit,
            family: d.destination.family.to_string(),
            protocol: d.destination.protocol.to_string(),
            lookups: d.metrics.lookups,
            misses: d.metrics.misses,
            errors: d.metrics.errors,
            present: d.socket.is_some(),
            cookie: d.socket.unwrap_or(0),
            netns,
        }
    }
}

/// One element of the unit's `Sockets` property: `(ssst)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Type, Value, OwnedValue)]
pub struct SocketEntry {
    pub family: String,
    pub protocol: String,
    /// Empty when unknown (adopted without a record).
    pub local: String,
    /// 0 once the socket is gone.
    pub cookie: u64,
}

impl From<UnitSocket> for SocketEntry {
    fn from(k: UnitSocket) -> Self {
        SocketEntry {
            family: k.family.to_string(),
            protocol: k.protocol.to_string(),
            local: k.local.map(|a| a.to_string()).unwrap_or_default(),
            cookie: k.cookie.unwrap_or(0),
        }
    }
}

/// What `Lookup()` answers, its four out args `ssst`: (verdict, unit,
/// binding, cookie).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupReply {
    /// `redirect`, `pass` or `drop`.
    pub verdict: String,
    pub unit: String,
    /// As the unit wrote it (a range, not the one port of it).
    pub binding: String,
    pub cookie: u64,
}

/// The out args as they go on the wire.
pub type LookupArgs = (String, String, String, u64);

impl LookupReply {
    pub fn new(l: &Lookup, written: Option<String>) -> Self {
        let verdict = match l.verdict {
            Verdict::Redirect => "redirect",
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
        };
        LookupReply {
            verdict: verdict.to_owned(),
            unit: l
                .destination
                .as_ref()
                .map(|d| d.unit.clone())
                .unwrap_or_default(),
            binding: written
                .or_else(|| l.binding.as_ref().map(ToString::to_string))
                .unwrap_or_default(),
            cookie: l.cookie.unwrap_or(0),
        }
    }
}

impl From<LookupReply> for LookupArgs {
    fn from(r: LookupReply) -> Self {
        (r.verdict, r.unit, r.binding, r.cookie)
    }
}

impl From<LookupArgs> for LookupReply {
    fn from((verdict, unit, binding, cookie): LookupArgs) -> Self {
        LookupReply {
            verdict,
            unit,
            binding,
            cookie,
        }
    }
}

/// What a registration answers, its two out args `uu`: (sockets, bindings).
pub type RegisteredArgs = (u32, u32);
