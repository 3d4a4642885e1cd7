//! What the daemon does, as plain functions over the dispatcher: register a
//! unit's sockets with its directives, unregister it, reload it. The D-Bus
//! layer (`dbus.rs`) is a thin shim over this; tests reach it without a bus.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::binding::{Binding, Destination, Protocol};
use crate::config::{self, Socket};
use crate::dispatcher::{Changes, Dispatcher, DispatcherError, SocketInfo};
use crate::unit::{Located, Location, SocketUnit, UnitError};

/// Where a unit's `X-SkLookup=` values come from.
#[derive(Debug, Clone)]
pub enum Directives {
    /// Read from the unit's files, as systemd reports them.
    Files(UnitFiles),
    /// Given on the command line (`register --sklookup`), for sockets that
    /// come from something other than a systemd socket unit.
    Inline(Vec<String>),
}

/// What systemd says about a socket unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitFiles {
    pub fragment: PathBuf,
    pub dropins: Vec<PathBuf>,
    /// The `Listen` property: `("Stream", "[::]:80")`, …
    pub listen: Vec<(String, String)>,
    /// The `BindIPv6Only` property: `default`, `both` or `ipv6-only`.
    pub bind_ipv6_only: String,
}

impl UnitFiles {
    /// The IP sockets the `Listen` property names.
    fn sockets(&self) -> Vec<Socket> {
        let v6only = self.bind_ipv6_only == "ipv6-only";
        self.listen
            .iter()
            .filter_map(|(kind, addr)| {
                let protocol = match kind.as_str() {
                    "Stream" => Protocol::Tcp,
                    "Datagram" => Protocol::Udp,
                    _ => return None,
                };
                let address = parse_listen_address(addr)?;
                Some(Socket {
                    protocol,
                    address,
                    v6only: v6only && address.is_ipv6(),
                })
            })
            .collect()
    }
}

/// `[::]:80`, `0.0.0.0:80`, `192.0.2.1:80`, `[fe80::1%eth0]:80`, `80`.
fn parse_listen_address(s: &str) -> Option<SocketAddr> {
    if let Ok(port) = s.parse::<u16>() {
        return Some(SocketAddr::new(
            std::net::Ipv6Addr::UNSPECIFIED.into(),
            port,
        ));
    }
    let s = match s.split_once('%') {
        // Interface suffix after the address: "192.0.2.1:80%eth0" or "[fe80::1%eth0]:80".
        Some((a, rest)) if a.starts_with('[') => format!("{a}{}", &rest[rest.find(']')?..]),
        Some((a, _)) => a.to_owned(),
        None => s.to_owned(),
    };
    s.parse().ok()
}

/// What the daemon knows of a registered unit.
#[derive(Debug, Clone)]
pub struct UnitState {
    pub registered: SystemTime,
    /// The sockets as registered, `None` after a daemon restart (then the
    /// `Listen` property stands in for them).
    pub sockets: Option<Vec<SocketInfo>>,
    pub inline: Option<Vec<String>>,
    pub bindings: Vec<(Binding, Destination)>,
}

/// Why a registration or reload was refused. The unit keeps what it had.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{unit}: {}", problems.join("; "))]
    BadDirective { unit: String, problems: Vec<String> },
    #[error("{unit}: {source}")]
    UnitFile {
        unit: String,
        #[source]
        source: UnitError,
    },
    #[error(
        "{unit}: socket {local} ({protocol}) is not one of the unit's sockets (Listen: {listen})"
    )]
    NotUnitSocket {
        unit: String,
        local: SocketAddr,
        protocol: Protocol,
        listen: String,
    },
    #[error("{unit}: no sockets were passed")]
    NoSockets { unit: String },
    #[error("{unit}: not registered")]
    NotRegistered { unit: String },
    #[error("{unit}: {source}")]
    Dispatcher {
        unit: String,
        #[source]
        source: Box<DispatcherError>,
    },
}

impl ServiceError {
    fn dispatcher(unit: &str) -> impl FnOnce(DispatcherError) -> ServiceError + '_ {
        move |source| ServiceError::Dispatcher {
            unit: unit.to_owned(),
            source: Box::new(source),
        }
    }
}

/// What a registration or reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub sockets: usize,
    pub bindings: usize,
    pub changes: Changes,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} socket(s), {} binding(s) ({} entries added, {} removed)",
            self.sockets, self.bindings, self.changes.added, self.changes.removed
        )
    }
}

/// One socket of a registered unit, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSocket {
    pub family: crate::binding::Family,
    pub protocol: Protocol,
    /// Unknown (`None`) for units adopted after a daemon restart.
    pub local: Option<SocketAddr>,
    /// `None` once the socket has closed.
    pub cookie: Option<u64>,
}

/// Counts for `STATUS=` and the manager's properties.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub units: u32,
    pub bindings: u32,
    pub sockets: u32,
}

/// The daemon's state: the dispatcher and the registered units.
pub struct Service {
    dispatcher: Dispatcher,
    units: BTreeMap<String, UnitState>,
    /// Unit files are read below this root (`/` but for tests).
    root: PathBuf,
}

impl Service {
    /// Take over a dispatcher; units found in its pinned state are adopted
    /// as registered (their sockets are whatever the maps hold).
    pub fn new(dispatcher: Dispatcher, root: &Path) -> Result<Service, DispatcherError> {
        let mut units: BTreeMap<String, UnitState> = BTreeMap::new();
        for unit in dispatcher.units() {
            units.insert(
                unit,
                UnitState {
                    registered: SystemTime::now(),
                    sockets: None,
                    inline: None,
                    bindings: Vec::new(),
                },
            );
        }
        for b in dispatcher.bindings()? {
            if let Some(u) = units.get_mut(&b.destination.unit) {
                u.bindings.push((b.binding, b.destination));
            }
        }
        Ok(Service {
            dispatcher,
            units,
            root: root.to_owned(),
        })
    }

    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    pub fn dispatcher_mut(&mut self) -> &mut Dispatcher {
        &mut self.dispatcher
    }

    pub fn units(&self) -> &BTreeMap<String, UnitState> {
        &self.units
    }

    pub fn counts(&self) -> Counts {
        let sockets = self
            .dispatcher
            .destinations()
            .map(|d| d.iter().filter(|d| d.socket.is_some()).count())
            .unwrap_or(0);
        Counts {
            units: self.units.len() as u32,
            bindings: self.units.values().map(|u| u.bindings.len()).sum::<usize>() as u32,
            sockets: sockets as u32,
        }
    }

    /// A registered unit's sockets: as registered, with the cookie the map
    /// still holds (a closed socket has left the map).
    pub fn unit_sockets(&self, unit: &str) -> Vec<UnitSocket> {
        let live: Vec<_> = self
            .dispatcher
            .destinations()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.destination.unit == unit)
            .collect();
        match self.units.get(unit).and_then(|u| u.sockets.as_ref()) {
            Some(infos) => {
                let mut out: Vec<UnitSocket> = Vec::new();
                for i in infos {
                    if out
                        .iter()
                        .any(|s| s.family == i.family && s.protocol == i.protocol)
                    {
                        continue; // a reuseport sibling
                    }
                    let cookie = live
                        .iter()
                        .find(|d| {
                            d.destination.family == i.family && d.destination.protocol == i.protocol
                        })
                        .and_then(|d| d.socket)
                        .filter(|&c| c == i.cookie);
                    out.push(UnitSocket {
                        family: i.family,
                        protocol: i.protocol,
                        local: Some(i.local),
                        cookie,
                    });
                }
                out
            }
            None => live
                .iter()
                .map(|d| UnitSocket {
                    family: d.destination.family,
                    protocol: d.destination.protocol,
                    local: None,
                    cookie: d.socket,
                })
                .collect(),
        }
    }

    /// A unit's counters, summed over its destinations.
    pub fn unit_metrics(&self, unit: &str) -> crate::dispatcher::abi::Metrics {
        let mut m = crate::dispatcher::abi::Metrics::default();
        for d in self.dispatcher.destinations().unwrap_or_default() {
            if d.destination.unit == unit {
                m.lookups += d.metrics.lookups;
                m.misses += d.metrics.misses;
                m.errors += d.metrics.errors;
            }
        }
        m
    }

    /// What looks wrong with a registered unit: a bound prefix the routing
    /// table does not deliver locally (sk_lookup never sees its traffic), a
    /// socket that is gone (its traffic is dropped), a UDP socket that cannot
    /// answer from the address it was reached at.
    pub fn warnings(&self, unit: &str) -> Vec<String> {
        let Some(state) = self.units.get(unit) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut checked = std::collections::HashSet::new();
        for (b, _) in &state.bindings {
            if !checked.insert(b.prefix) {
                continue;
            }
            if let Ok(false) = crate::route::is_local(b.prefix.network()) {
                let ip = if b.prefix.addr().is_ipv6() {
                    "ip -6"
                } else {
                    "ip"
                };
                out.push(format!(
                    "{b}: {} has no local route, so no traffic for it arrives (add one: {ip} route add local {} dev lo)",
                    b.prefix, b.prefix
                ));
            }
        }
        for s in self.unit_sockets(unit) {
            if s.cookie.is_none() {
                out.push(format!(
                    "{} {} socket{} is gone: traffic for its bindings is dropped until the unit registers again",
                    s.family,
                    s.protocol,
                    s.local.map(|a| format!(" {a}")).unwrap_or_default()
                ));
            }
        }
        if let Some(infos) = &state.sockets {
            for i in infos.iter().filter(|i| i.protocol == Protocol::Udp) {
                if !i.pktinfo {
                    out.push(format!(
                        "udp socket {} does not pass packet info (PassPacketInfo=yes): it cannot answer from the \
                         address a datagram was sent to",
                        i.local
                    ));
                }
                let v6_bound = state.bindings.iter().any(|(b, d)| {
                    b.protocol == Protocol::Udp && d.family == i.family && b.prefix.addr().is_ipv6()
                });
                if v6_bound && !i.freebind {
                    out.push(format!(
                        "udp socket {} has no FreeBind=yes: IPv6 answers from a bound prefix's addresses fail \
                         unless an interface carries them",
                        i.local
                    ));
                }
            }
        }
        out
    }

    /// Read and match a unit's directives against its sockets.
    fn resolve(
        &self,
        unit: &str,
        directives: &Directives,
        sockets: &[Socket],
    ) -> Result<Vec<(Binding, Destination)>, ServiceError> {
        let socket_unit = match directives {
            Directives::Files(files) => {
                SocketUnit::from_paths(&self.root, unit, &files.fragment, &files.dropins).map_err(
                    |source| ServiceError::UnitFile {
                        unit: unit.to_owned(),
                        source,
                    },
                )?
            }
            Directives::Inline(values) => inline_unit(unit, values),
        };
        let resolution = config::resolve(&socket_unit, sockets);
        for p in resolution
            .problems
            .iter()
            .filter(|p| p.severity < crate::unit::Severity::Error)
        {
            tracing::warn!(unit = %unit, "{unit}: {p}");
        }
        if !resolution.is_valid() {
            return Err(ServiceError::BadDirective {
                unit: unit.to_owned(),
                problems: resolution
                    .problems
                    .iter()
                    .filter(|p| p.severity >= crate::unit::Severity::Error)
                    .map(ToString::to_string)
                    .collect(),
            });
        }
        Ok(resolution
            .bindings
            .iter()
            .map(|r| (r.binding, sockets[r.socket].destination(unit)))
            .collect())
    }

    /// Register `fds` as the sockets of `unit` and apply its directives, all
    /// at once or not at all. With `Directives::Files`, every fd must be one
    /// of the unit's `Listen` sockets. The caller closes its fds afterwards:
    /// the map entry then lives exactly as long as systemd's socket.
    pub fn register(
        &mut self,
        unit: &str,
        fds: &[BorrowedFd<'_>],
        directives: &Directives,
    ) -> Result<Outcome, ServiceError> {
        if fds.is_empty() {
            return Err(ServiceError::NoSockets {
                unit: unit.to_owned(),
            });
        }
        let mut infos = Vec::new();
        for fd in fds {
            let info = SocketInfo::inspect(*fd).map_err(|source| ServiceError::Dispatcher {
                unit: unit.to_owned(),
                source: Box::new(DispatcherError::Inspect {
                    fd: std::os::fd::AsRawFd::as_raw_fd(fd),
                    source,
                }),
            })?;
            if let Directives::Files(files) = directives {
                let listed = files.sockets();
                let ok = listed.iter().any(|s| {
                    s.protocol == info.protocol && same_listen_address(&s.address, &info.local)
                });
                if !ok {
                    return Err(ServiceError::NotUnitSocket {
                        unit: unit.to_owned(),
                        local: info.local,
                        protocol: info.protocol,
                        listen: files
                            .listen
                            .iter()
                            .map(|(k, a)| format!("{k} {a}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            }
            infos.push(info);
        }
        let sockets = distinct_sockets(&infos);
        let items = self.resolve(unit, directives, &sockets)?;
        let was_registered = self.units.contains_key(unit);
        self.dispatcher
            .register_sockets(unit, fds)
            .map_err(ServiceError::dispatcher(unit))?;
        let changes = match self.dispatcher.replace_unit_bindings(unit, &items) {
            Ok(c) => c,
            Err(e) => {
                if !was_registered {
                    let _ = self.dispatcher.unregister_unit(unit);
                }
                return Err(ServiceError::Dispatcher {
                    unit: unit.to_owned(),
                    source: Box::new(e),
                });
            }
        };
        let outcome = Outcome {
            sockets: sockets.len(),
            bindings: items.len(),
            changes,
        };
        self.units.insert(
            unit.to_owned(),
            UnitState {
                registered: SystemTime::now(),
                sockets: Some(infos),
                inline: match directives {
                    Directives::Inline(v) => Some(v.clone()),
                    Directives::Files(_) => None,
                },
                bindings: items,
            },
        );
        Ok(outcome)
    }

    /// Re-read a registered unit's directives and apply the difference; on any
    /// error the unit keeps the bindings it had. Inline units keep their values.
    pub fn reload(
        &mut self,
        unit: &str,
        files: Option<&UnitFiles>,
    ) -> Result<Outcome, ServiceError> {
        let state = self
            .units
            .get(unit)
            .ok_or_else(|| ServiceError::NotRegistered {
                unit: unit.to_owned(),
            })?;
        let directives = match (&state.inline, files) {
            (Some(values), _) => Directives::Inline(values.clone()),
            (None, Some(f)) => Directives::Files(f.clone()),
            // Adopted after a restart and unknown to systemd: nothing to re-read.
            (None, None) => {
                return Ok(Outcome {
                    sockets: 0,
                    bindings: state.bindings.len(),
                    changes: Changes::default(),
                });
            }
        };
        let sockets: Vec<Socket> = match (&state.sockets, files) {
            (Some(infos), _) => distinct_sockets(infos),
            (None, Some(f)) => f.sockets(),
            (None, None) => Vec::new(),
        };
        let items = self.resolve(unit, &directives, &sockets)?;
        let changes = self
            .dispatcher
            .replace_unit_bindings(unit, &items)
            .map_err(ServiceError::dispatcher(unit))?;
        let state = self.units.get_mut(unit).expect("checked above");
        state.bindings = items;
        Ok(Outcome {
            sockets: sockets.len(),
            bindings: state.bindings.len(),
            changes,
        })
    }

    /// Remove a unit: bindings, sockets, destinations.
    pub fn unregister(&mut self, unit: &str) -> Result<Changes, ServiceError> {
        let known = self.units.remove(unit).is_some();
        let changes = self
            .dispatcher
            .unregister_unit(unit)
            .map_err(ServiceError::dispatcher(unit))?;
        if !known && changes == Changes::default() {
            return Err(ServiceError::NotRegistered {
                unit: unit.to_owned(),
            });
        }
        Ok(changes)
    }
}

/// The sockets as matching sees them, once each: the members of a
/// reuseport group share an address and count once.
fn distinct_sockets(infos: &[SocketInfo]) -> Vec<Socket> {
    let mut sockets: Vec<Socket> = Vec::new();
    for i in infos {
        let s = Socket {
            protocol: i.protocol,
            address: i.local,
            v6only: i.v6only,
        };
        if !sockets.contains(&s) {
            sockets.push(s);
        }
    }
    sockets
}

/// systemd reports `ListenStream=80` as `[::]:80`; a dual-stack socket bound
/// there reports `[::]:80` too. IPv4-mapped forms are compared as IPv4.
fn same_listen_address(listed: &SocketAddr, actual: &SocketAddr) -> bool {
    fn canon(a: &SocketAddr) -> SocketAddr {
        match a {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                None => SocketAddr::new((*v6.ip()).into(), v6.port()),
            },
            v4 => *v4,
        }
    }
    canon(listed) == canon(actual)
}

/// A unit made of `--sklookup` values alone; problems point at
/// `--sklookup:N`, the Nth value given.
fn inline_unit(unit: &str, values: &[String]) -> SocketUnit {
    let located = values
        .iter()
        .enumerate()
        .map(|(i, v)| Located {
            value: v.clone(),
            location: Location {
                path: PathBuf::from("--sklookup"),
                line: i + 1,
            },
        })
        .collect();
    SocketUnit::inline(unit, located)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_as_systemd_prints_them() {
        assert_eq!(
            parse_listen_address("[::]:80"),
            Some("[::]:80".parse().unwrap())
        );
        assert_eq!(parse_listen_address("80"), Some("[::]:80".parse().unwrap()));
        assert_eq!(
            parse_listen_address("192.0.2.1:53%eth0"),
            Some("192.0.2.1:53".parse().unwrap())
        );
        assert_eq!(
            parse_listen_address("[fe80::1%eth0]:80"),
            Some("[fe80::1]:80".parse().unwrap())
        );
        assert_eq!(parse_listen_address("/run/foo.sock"), None);
    }

    #[test]
    fn v4_mapped_listen_addresses_compare_as_ipv4() {
        assert!(same_listen_address(
            &"[::ffff:127.0.0.1]:80".parse().unwrap(),
            &"127.0.0.1:80".parse().unwrap()
        ));
        assert!(!same_listen_address(
            &"[::]:80".parse().unwrap(),
            &"0.0.0.0:80".parse().unwrap()
        ));
    }
}
