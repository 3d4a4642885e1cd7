//! What the daemon does, as plain functions over the dispatcher: register a
//! unit's sockets with its directives, unregister it, reload it. The D-Bus
//! layer (`dbus.rs`) is a thin shim over this; tests reach it without a bus.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::binding::{Binding, Destination, Ports, Protocol};
use crate::config::{self, Problem, Socket};
use crate::dispatcher::records::RecordError;
use crate::dispatcher::{Changes, Dispatcher, DispatcherError, SocketInfo};
use crate::unit::{SocketUnit, UnitError};

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

/// Where a registered unit's `X-SkLookup=` values come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Its unit files, as systemd reports them (`RegisterSockets`).
    Files,
    /// Values given with the sockets (`register --sklookup`,
    /// `RegisterSocketsWithDirectives`); `None` when they were too many to
    /// keep in the pinned record (the bindings are kept all the same).
    Inline(Option<Vec<String>>),
    /// Adopted from pinned state that has no record of it (left by an older
    /// build): either kind of registration may replace it.
    Unknown,
}

impl Origin {
    /// `files`, `inline` or `unknown`, as the `Source` property says it.
    pub fn name(&self) -> &'static str {
        match self {
            Origin::Files => "files",
            Origin::Inline(_) => "inline",
            Origin::Unknown => "unknown",
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Origin::Files => "from its unit files",
            Origin::Inline(_) => "with --sklookup values",
            Origin::Unknown => "by an older skactivate",
        }
    }
}

/// What the daemon knows of a registered unit. Everything but its entries
/// (which the maps and the dispatcher's index hold) is kept in the unit's
/// pinned record, so a restarted daemon knows it as well.
///
/// The bindings themselves are not kept here: the dispatcher holds one entry
/// per port (or `*`) of each, and a binding of one port or `*` is exactly its
/// entry. Only a port range written as one binding
/// (`tcp:192.0.2.0/24:8000-8099`) cannot be told from its entries, so the
/// unit keeps those ([`Service::unit_bindings`] puts the bindings as written
/// back together).
#[derive(Debug, Clone)]
pub struct UnitState {
    /// Inode of the network namespace its sockets live in, whose dispatcher
    /// holds its bindings.
    pub netns: u64,
    pub registered: SystemTime,
    /// The sockets as registered, `None` when adopted without a record.
    pub sockets: Option<Vec<SocketInfo>>,
    pub origin: Origin,
    /// How many bindings it has as written (a range counts once).
    pub bindings: usize,
    /// Its bindings of more than one port, sorted by [`range_key`]. Adopted
    /// without a record of them, the runs of consecutive ports its entries
    /// make.
    pub ranges: Vec<Binding>,
}

/// How [`UnitState::ranges`] is sorted: protocol, prefix, first port.
fn range_key(b: &Binding) -> (Protocol, ipnet::IpNet, u16) {
    let first = match b.ports {
        Ports::All => 0,
        Ports::Range(a, _) => a,
    };
    (b.protocol, b.prefix, first)
}

/// The bindings of `items` that span more than one port, sorted by
/// [`range_key`].
fn multi_port(items: impl Iterator<Item = Binding>) -> Vec<Binding> {
    let mut ranges: Vec<Binding> = items
        .filter(|b| matches!(b.ports, Ports::Range(a, z) if a < z))
        .collect();
    ranges.sort_by_key(range_key);
    ranges.shrink_to_fit();
    ranges
}

/// The range of `ranges` (sorted by [`range_key`]; the ranges of one
/// protocol and prefix never overlap) that holds the entry `entry` (one
/// port, not `*`), if any.
fn range_of(ranges: &[Binding], entry: &Binding) -> Option<Binding> {
    let Ports::Range(port, _) = entry.ports else {
        return None;
    };
    let key = (entry.protocol, entry.prefix, port);
    let after = ranges.partition_point(|r| range_key(r) <= key);
    let r = ranges.get(after.checked_sub(1)?)?;
    (r.protocol == entry.protocol && r.prefix == entry.prefix && r.ports.contains(port))
        .then_some(*r)
}

/// The bindings as written, from the dispatcher's view of a unit's entries
/// (`merged`: consecutive ports of one prefix and destination shown as one
/// range) and the unit's multi-port bindings: each run is cut into those
/// ranges and single ports.
fn as_written(
    merged: Vec<(Binding, Destination)>,
    ranges: &[Binding],
) -> Vec<(Binding, Destination)> {
    let mut out = Vec::with_capacity(merged.len());
    for (b, d) in merged {
        let Ports::Range(start, end) = b.ports else {
            out.push((b, d));
            continue;
        };
        let mut port = u32::from(start);
        while port <= u32::from(end) {
            let single = Binding::new(b.protocol, b.prefix, Ports::single(port as u16));
            match range_of(ranges, &single) {
                Some(
                    r @ Binding {
                        ports: Ports::Range(_, z),
                        ..
                    },
                ) => {
                    out.push((r, d.clone()));
                    port = u32::from(z) + 1;
                }
                _ => {
                    out.push((single, d.clone()));
                    port += 1;
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.precedence_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    out
}

/// Why a registration or reload was refused. The unit keeps what it had.
/// Each variant either shows its cause in its text or chains it, never both.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{unit}: {}", list_problems(.problems))]
    BadDirective {
        unit: String,
        problems: Vec<Problem>,
    },
    #[error("{unit}")]
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
    #[error("unit name {unit:?} is not valid: {reason}")]
    InvalidUnitName { unit: String, reason: &'static str },
    #[error(
        "{unit}: neither a socket nor a service unit: RegisterSockets reads X-SkLookup= from the \
         unit's files, a socket unit's [Socket] section or the [Service] section of a service \
         whose process bound the sockets (RegisterSocketsWithDirectives takes the values for \
         other sockets)"
    )]
    NotSocketUnit { unit: String },
    #[error("{unit}: no X-SkLookup= values were given")]
    NoValues { unit: String },
    #[error("{unit}: --sklookup:{index}: the value is empty")]
    EmptyValue { unit: String, index: usize },
    #[error(
        "{unit}: registered {}, it cannot be registered {} as well: unregister it first \
         (skactivate unregister {unit})",
        .registered.describe(),
        .requested.describe()
    )]
    OriginConflict {
        unit: String,
        registered: Origin,
        requested: Origin,
    },
    #[error(
        "{unit}: its sockets live in two network namespaces ({first} in {first_netns}, {second} in \
         {second_netns}): a unit's sockets must share one namespace"
    )]
    SpansNamespaces {
        unit: String,
        first: SocketAddr,
        first_netns: u64,
        second: SocketAddr,
        second_netns: u64,
    },
    #[error("{unit}: the dispatcher of network namespace {netns}")]
    Namespace {
        unit: String,
        netns: u64,
        #[source]
        source: Box<DispatcherError>,
    },
    #[error("{unit}")]
    Dispatcher {
        unit: String,
        #[source]
        source: Box<DispatcherError>,
    },
}

fn list_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// A unit name as systemd spells one: `NAME.TYPE`, at most 255 bytes, of
/// `[A-Za-z0-9:_.\\@-]`.
pub fn check_unit_name(unit: &str) -> Result<(), ServiceError> {
    let bad = |reason| {
        Err(ServiceError::InvalidUnitName {
            unit: unit.to_owned(),
            reason,
        })
    };
    if unit.is_empty() {
        return bad("it is empty");
    }
    if unit.len() > 255 {
        return bad("it is longer than 255 bytes");
    }
    if !unit
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b":_.\\@-".contains(&b))
    {
        return bad("only letters, digits and :_.\\@- may appear in a unit name");
    }
    match unit.rsplit_once('.') {
        Some((name, kind)) if !name.is_empty() && !kind.is_empty() => Ok(()),
        _ => bad("it has no type suffix such as .socket"),
    }
}

/// What `RegisterSockets` accepts: the name of a socket unit, whose
/// `Listen` sockets the fds are, or of a service unit, whose process bound
/// them (`register-pid`); either has `X-SkLookup=` in its files.
pub fn check_files_unit_name(unit: &str) -> Result<(), ServiceError> {
    check_unit_name(unit)?;
    if !unit.ends_with(".socket") && !is_service(unit) {
        return Err(ServiceError::NotSocketUnit {
            unit: unit.to_owned(),
        });
    }
    Ok(())
}

/// A service unit's name: its sockets are its process's, not a socket
/// unit's `Listen` sockets, and only its own registrations replace them.
fn is_service(unit: &str) -> bool {
    unit.ends_with(".service")
}

/// What `RegisterSocketsWithDirectives` accepts: a unit name and at least
/// one value, none empty.
pub fn check_inline(unit: &str, values: &[String]) -> Result<(), ServiceError> {
    check_unit_name(unit)?;
    if values.is_empty() {
        return Err(ServiceError::NoValues {
            unit: unit.to_owned(),
        });
    }
    if let Some(i) = values.iter().position(|v| v.trim().is_empty()) {
        return Err(ServiceError::EmptyValue {
            unit: unit.to_owned(),
            index: i + 1,
        });
    }
    Ok(())
}

impl ServiceError {
    fn dispatcher(unit: &str) -> impl FnOnce(DispatcherError) -> ServiceError + '_ {
        move |source| ServiceError::Dispatcher {
            unit: unit.to_owned(),
            source: Box::new(source),
        }
    }
}

/// How many of a unit's bindings an [`Outcome`] names (a registration's
/// journal message shows them and counts the rest).
pub const SHOWN_BINDINGS: usize = 64;

/// What a registration or reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub sockets: usize,
    pub bindings: usize,
    pub changes: Changes,
    /// The first [`SHOWN_BINDINGS`] bindings, in the order written.
    pub first: Vec<Binding>,
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

/// The daemon's state: the dispatcher of each network namespace it serves,
/// and the registered units.
pub struct Service {
    /// By the namespace's inode. The daemon's own namespace's (`home`) is
    /// always there; another namespace's comes with the first unit whose
    /// sockets live there and goes with the last one.
    dispatchers: BTreeMap<u64, Dispatcher>,
    home: u64,
    /// The bpffs every dispatcher is pinned on.
    bpffs: PathBuf,
    units: BTreeMap<String, UnitState>,
    /// Unit files are read below this root (`/` but for tests).
    root: PathBuf,
}

impl Service {
    /// Take over the dispatcher of the daemon's own network namespace; units
    /// found in its pinned state are adopted as registered, with what their
    /// records say (origin, sockets, time). A record whose unit has nothing
    /// left in the maps is dropped. The dispatchers of other namespaces are
    /// pinned beside it (`<bpffs>/skactivate/<inode>`): see
    /// [`Service::adopt_namespaces`].
    pub fn new(dispatcher: Dispatcher, root: &Path) -> Result<Service, DispatcherError> {
        let home = dispatcher.netns();
        let bpffs = dispatcher
            .dir()
            .parent()
            .and_then(Path::parent)
            .map(Path::to_owned)
            .unwrap_or_default();
        let mut s = Service {
            dispatchers: BTreeMap::new(),
            home,
            bpffs,
            units: BTreeMap::new(),
            root: root.to_owned(),
        };
        s.absorb(dispatcher)?;
        Ok(s)
    }

    /// Take a dispatcher and the units its pinned state holds.
    fn absorb(&mut self, mut dispatcher: Dispatcher) -> Result<(), DispatcherError> {
        let netns = dispatcher.netns();
        let mut units: BTreeMap<String, UnitState> = BTreeMap::new();
        for unit in dispatcher.units() {
            units.insert(
                unit,
                UnitState {
                    netns,
                    registered: SystemTime::now(),
                    sockets: None,
                    origin: Origin::Unknown,
                    bindings: 0,
                    ranges: Vec::new(),
                },
            );
        }
        let records = dispatcher.unit_records().unwrap_or_else(|e| {
            tracing::warn!(
                "network namespace {netns}: the units' records cannot be read, adopting without them: {e}"
            );
            Vec::new()
        });
        // A unit's multi-port bindings, from its record; `None`: unknown.
        let mut recorded: BTreeMap<String, Vec<Binding>> = BTreeMap::new();
        for (unit, bytes) in records {
            match units.get_mut(&unit) {
                Some(state) => match record::decode(&bytes) {
                    Some(r) => {
                        state.registered = r.registered;
                        state.sockets = Some(r.sockets);
                        state.origin = r.origin;
                        if let Some(ranges) = r.ranges {
                            recorded.insert(unit, ranges);
                        }
                    }
                    None => tracing::warn!(unit = %unit, "{unit}: its record is unreadable"),
                },
                None => {
                    if let Err(e) = dispatcher.remove_unit_record(&unit) {
                        tracing::warn!(unit = %unit, "{unit}: stale record stays: {e}");
                    }
                }
            }
        }
        // A unit's count as written is its entries less what its ranges
        // span, plus one per range. The entries are counted from the index;
        // the ranges come from the record, or, for a unit whose record has
        // none, from its entries with consecutive ports merged (that list
        // is costly: a name and a binding per merged run).
        let entries = dispatcher.entries_per_unit();
        let mut runs: BTreeMap<String, Vec<Binding>> = BTreeMap::new();
        if units
            .keys()
            .any(|u| !recorded.contains_key(u) && entries.contains_key(u))
        {
            for b in dispatcher.bindings()? {
                if !recorded.contains_key(&b.destination.unit) {
                    runs.entry(b.destination.unit).or_default().push(b.binding);
                }
            }
        }
        for (name, u) in units.iter_mut() {
            let ranges = match recorded.remove(name) {
                Some(ranges) => ranges,
                None => runs.remove(name).unwrap_or_default(),
            };
            u.ranges = multi_port(ranges.into_iter());
            let spanned: usize = u.ranges.iter().map(|r| r.ports.entries() as usize).sum();
            let n = entries.get(name).copied().unwrap_or(0);
            u.bindings = n.saturating_sub(spanned) + u.ranges.len();
        }
        drop(runs);
        for (name, state) in units {
            if let Some(kept) = self.units.get(&name) {
                // A daemon stopped between registering a unit in its new
                // namespace and removing it from the old one: one stays.
                tracing::warn!(
                    unit = %name,
                    "{name}: found in network namespaces {} and {netns}; kept in {} only",
                    kept.netns,
                    kept.netns
                );
                let _ = dispatcher.unregister_unit(&name);
                let _ = dispatcher.remove_unit_record(&name);
                continue;
            }
            self.units.insert(name, state);
        }
        self.dispatchers.insert(netns, dispatcher);
        Ok(())
    }

    /// Adopt the dispatchers of other network namespaces that an earlier
    /// daemon left pinned, with their units. The state of a namespace that
    /// no longer exists is removed (the kernel detached its link when it
    /// died), and a dispatcher left without units is torn down. Each outcome
    /// is logged; a namespace that cannot be adopted does not stop the others.
    pub fn adopt_namespaces(&mut self) {
        let root = crate::paths::state_root(&self.bpffs);
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        let mut inodes: Vec<u64> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|ino| !self.dispatchers.contains_key(ino))
            .collect();
        inodes.sort_unstable();
        for ino in inodes {
            let dir = crate::paths::netns_state(&self.bpffs, ino);
            match Dispatcher::adopt_pinned(&self.bpffs, ino) {
                Ok(Some(mut d)) => {
                    if let Err(e) = d.upgrade(false) {
                        tracing::warn!(
                            "network namespace {ino}: its program stays as it was: {}",
                            crate::dbus::error_chain(&e)
                        );
                    }
                    if let Err(e) = self.absorb(d) {
                        tracing::warn!(
                            "network namespace {ino}: {} is not adopted: {}",
                            dir.display(),
                            crate::dbus::error_chain(&e)
                        );
                        continue;
                    }
                    let n = self.units.values().filter(|u| u.netns == ino).count();
                    tracing::info!(
                        "network namespace {ino}: adopted its dispatcher from {} with {n} unit(s)",
                        dir.display()
                    );
                    self.retire_if_unused(ino);
                }
                Ok(None) => tracing::info!(
                    "network namespace {ino} no longer exists: removed its stale dispatcher state {}",
                    dir.display()
                ),
                Err(e) => tracing::warn!(
                    "network namespace {ino}: its pinned dispatcher in {} is not adopted: {}",
                    dir.display(),
                    crate::dbus::error_chain(&e)
                ),
            }
        }
    }

    /// Make sure the namespace `netns`, where the socket `fd` lives, has its
    /// dispatcher: created, or adopted when pinned state is there. Returns
    /// whether it was not there before.
    ///
    /// The namespace is reached through the socket itself (`SIOCGSKNS`),
    /// which needs neither a name for it nor CAP_SYS_ADMIN: the daemon never
    /// enters it (attaching the program takes the namespace's fd).
    fn ensure_dispatcher(
        &mut self,
        netns: u64,
        fd: BorrowedFd<'_>,
    ) -> Result<bool, DispatcherError> {
        if self.dispatchers.contains_key(&netns) {
            return Ok(false);
        }
        let ns = crate::dispatcher::socket::socket_netns_fd(fd).map_err(|source| {
            DispatcherError::Syscall {
                call: "SIOCGSKNS",
                source,
            }
        })?;
        // `Dispatcher::open` takes the namespace as a path: the fd's own.
        let path = PathBuf::from(format!("/proc/self/fd/{}", ns.as_raw_fd()));
        let mut d = Dispatcher::open(&path, &self.bpffs)?;
        drop(ns);
        d.upgrade(false)?;
        tracing::info!(
            "network namespace {netns}: dispatcher attached, pinned in {}",
            d.dir().display()
        );
        self.absorb(d)?;
        Ok(true)
    }

    /// Tear down the dispatcher of a namespace other than the daemon's own
    /// once none of its units is left: link detached, maps unpinned, lock
    /// released.
    fn retire_if_unused(&mut self, netns: u64) {
        if netns == self.home || self.units.values().any(|u| u.netns == netns) {
            return;
        }
        let Some(d) = self.dispatchers.remove(&netns) else {
            return;
        };
        let dir = d.dir().to_owned();
        match d.destroy() {
            Ok(()) => tracing::info!(
                "network namespace {netns}: no unit left; its dispatcher is detached and {} removed",
                dir.display()
            ),
            Err(e) => tracing::warn!(
                "network namespace {netns}: tearing its dispatcher down failed (the next start retries): {}",
                crate::dbus::error_chain(&e)
            ),
        }
    }

    /// The dispatcher holding a unit's bindings (the daemon's own for an
    /// unknown unit).
    fn unit_dispatcher(&self, unit: &str) -> &Dispatcher {
        let netns = self.units.get(unit).map_or(self.home, |u| u.netns);
        self.dispatchers
            .get(&netns)
            .unwrap_or_else(|| &self.dispatchers[&self.home])
    }

    /// A unit's entries as the dispatcher shows them, consecutive ports of
    /// one prefix merged into a range.
    fn unit_entries(&self, unit: &str) -> Vec<(Binding, Destination)> {
        self.unit_dispatcher(unit)
            .bindings()
            .unwrap_or_default()
            .into_iter()
            .filter(|b| b.destination.unit == unit)
            .map(|b| (b.binding, b.destination))
            .collect()
    }

    /// A registered unit's bindings as written, each with its destination,
    /// in precedence order: the same before and after a restart.
    pub fn unit_bindings(&self, unit: &str) -> Vec<(Binding, Destination)> {
        let Some(state) = self.units.get(unit) else {
            return Vec::new();
        };
        as_written(self.unit_entries(unit), &state.ranges)
    }

    /// Keep a unit's record with the pinned state; values, then port ranges,
    /// that do not fit are left out of it (the bindings stay in the maps all
    /// the same).
    fn save_record(&mut self, unit: &str) {
        let Some(state) = self.units.get(unit) else {
            return;
        };
        let Some(dispatcher) = self.dispatchers.get_mut(&state.netns) else {
            return;
        };
        let too_large = |r: &Result<(), RecordError>| {
            matches!(r, Err(RecordError::TooLarge { .. } | RecordError::Full))
        };
        let mut with_values = true;
        let mut r = dispatcher.put_unit_record(unit, &record::encode(state, true, true));
        if too_large(&r) && matches!(state.origin, Origin::Inline(Some(_))) {
            tracing::warn!(unit = %unit, "{unit}: its --sklookup values are too many to keep in its record");
            with_values = false;
            r = dispatcher.put_unit_record(unit, &record::encode(state, false, true));
        }
        if too_large(&r) && !state.ranges.is_empty() {
            tracing::warn!(
                unit = %unit,
                "{unit}: its {} port ranges are too many to keep in its record: after a restart \
                 consecutive ports of one prefix show as one range",
                state.ranges.len()
            );
            r = dispatcher.put_unit_record(unit, &record::encode(state, with_values, false));
        }
        if r.is_ok()
            && !with_values
            && let Some(s) = self.units.get_mut(unit)
        {
            s.origin = Origin::Inline(None);
        }
        if let Err(e) = r {
            tracing::warn!(unit = %unit, "{unit}: its record is not kept, a restarted daemon will not know its origin: {e}");
        }
    }

    /// The dispatcher of the daemon's own network namespace.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatchers[&self.home]
    }

    pub fn dispatcher_mut(&mut self) -> &mut Dispatcher {
        self.dispatchers
            .get_mut(&self.home)
            .expect("the daemon's own dispatcher stays")
    }

    /// Inode of the daemon's own network namespace.
    pub fn home_netns(&self) -> u64 {
        self.home
    }

    /// Every dispatcher with its namespace's inode: the daemon's own first,
    /// then the others by inode.
    pub fn dispatchers(&self) -> impl Iterator<Item = (u64, &Dispatcher)> {
        let home = self.dispatchers.get_key_value(&self.home);
        home.into_iter()
            .chain(self.dispatchers.iter().filter(|(k, _)| **k != self.home))
            .map(|(k, d)| (*k, d))
    }

    /// The dispatcher of the namespace `netns`, if the daemon serves one there.
    pub fn namespace_dispatcher(&self, netns: u64) -> Option<&Dispatcher> {
        self.dispatchers.get(&netns)
    }

    /// Every binding with its namespace: namespace by namespace (the
    /// daemon's own first), each in precedence order.
    pub fn bindings(&self) -> Result<Vec<(u64, crate::dispatcher::BindingInfo)>, DispatcherError> {
        let mut out = Vec::new();
        for (ns, d) in self.dispatchers() {
            out.extend(d.bindings()?.into_iter().map(|b| (ns, b)));
        }
        Ok(out)
    }

    /// Every destination with its namespace.
    pub fn destinations(
        &self,
    ) -> Result<Vec<(u64, crate::dispatcher::DestinationInfo)>, DispatcherError> {
        let mut out = Vec::new();
        for (ns, d) in self.dispatchers() {
            out.extend(d.destinations()?.into_iter().map(|x| (ns, x)));
        }
        Ok(out)
    }

    pub fn units(&self) -> &BTreeMap<String, UnitState> {
        &self.units
    }

    pub fn counts(&self) -> Counts {
        let sockets: usize = self
            .dispatchers
            .values()
            .map(|d| {
                d.destinations()
                    .map(|d| d.iter().filter(|d| d.socket.is_some()).count())
                    .unwrap_or(0)
            })
            .sum();
        Counts {
            units: self.units.len() as u32,
            bindings: self.units.values().map(|u| u.bindings).sum::<usize>() as u32,
            sockets: sockets as u32,
        }
    }

    /// A registered unit's sockets: as registered, with the cookie the map
    /// still holds (a closed socket has left the map).
    pub fn unit_sockets(&self, unit: &str) -> Vec<UnitSocket> {
        let live: Vec<_> = self
            .unit_dispatcher(unit)
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

    /// Where a packet would go (the live program answers) and the binding
    /// that took it as its unit wrote it (a range, not the one port of it).
    pub fn lookup(
        &self,
        protocol: Protocol,
        addr: std::net::IpAddr,
        port: u16,
    ) -> Result<(crate::dispatcher::Lookup, Option<Binding>), DispatcherError> {
        self.lookup_in(self.home, protocol, addr, port)
    }

    /// [`Service::lookup`] in the network namespace `netns`. Where the
    /// daemon serves no dispatcher, no program runs: the kernel's own socket
    /// lookup decides (`Pass`).
    pub fn lookup_in(
        &self,
        netns: u64,
        protocol: Protocol,
        addr: std::net::IpAddr,
        port: u16,
    ) -> Result<(crate::dispatcher::Lookup, Option<Binding>), DispatcherError> {
        let Some(dispatcher) = self.dispatchers.get(&netns) else {
            let none = crate::dispatcher::Lookup {
                verdict: crate::dispatcher::Verdict::Pass,
                binding: None,
                destination: None,
                cookie: None,
            };
            return Ok((none, None));
        };
        let l = dispatcher.lookup(protocol, addr, port)?;
        let written = match (&l.destination, &l.binding) {
            (Some(d), Some(b)) => self.units.get(&d.unit).map(|u| {
                let entry = match b.ports {
                    Ports::All => *b,
                    Ports::Range(..) => Binding::new(b.protocol, b.prefix, Ports::single(port)),
                };
                range_of(&u.ranges, &entry).unwrap_or(entry)
            }),
            _ => None,
        };
        Ok((l, written))
    }

    /// A unit's counters, summed over its destinations.
    pub fn unit_metrics(&self, unit: &str) -> crate::dispatcher::abi::Metrics {
        let mut m = crate::dispatcher::abi::Metrics::default();
        for d in self
            .unit_dispatcher(unit)
            .destinations()
            .unwrap_or_default()
        {
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
        // The routes are read in the daemon's own namespace; another
        // namespace's table is out of its sight (it never enters one).
        let bindings = self.unit_entries(unit);
        let routes = if state.netns == self.home {
            &bindings[..]
        } else {
            &[]
        };
        for (b, _) in routes {
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
                let v6_bound = bindings.iter().any(|(b, d)| {
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
    ) -> Result<Resolved, ServiceError> {
        let socket_unit = match directives {
            Directives::Files(files) => {
                SocketUnit::from_paths(&self.root, unit, &files.fragment, &files.dropins).map_err(
                    |source| ServiceError::UnitFile {
                        unit: unit.to_owned(),
                        source,
                    },
                )?
            }
            Directives::Inline(values) => SocketUnit::from_sklookup_options(unit, values),
        };
        // Each binding goes straight to the list the dispatcher takes, its
        // socket by index: a unit may hold a million, and nothing else of
        // them is kept.
        let destinations: Vec<Destination> = sockets.iter().map(|s| s.destination(unit)).collect();
        let (mut items, problems) = config::resolve_bindings(&socket_unit, sockets);
        drop(socket_unit);
        let resolution = config::Resolution {
            bindings: Vec::new(),
            problems,
        };
        for p in resolution
            .problems
            .iter()
            .filter(|p| p.severity < crate::unit::Severity::Error)
        {
            tracing::warn!(unit = %unit, "{unit}: {p}");
        }
        if !resolution.is_valid() {
            return Err(bad_directive(unit, &resolution));
        }
        items.shrink_to_fit();
        Ok(Resolved {
            destinations,
            items,
        })
    }

    /// Register `fds` as the sockets of `unit` and apply its directives, all
    /// at once or not at all. With `Directives::Files`, every fd must be one
    /// of a socket unit's `Listen` sockets; a service unit's are whatever its
    /// process bound. The caller closes its fds afterwards:
    /// the map entry then lives exactly as long as systemd's socket.
    pub fn register(
        &mut self,
        unit: &str,
        fds: &[BorrowedFd<'_>],
        directives: &Directives,
    ) -> Result<Outcome, ServiceError> {
        let requested = match directives {
            Directives::Files(_) => {
                check_files_unit_name(unit)?;
                Origin::Files
            }
            Directives::Inline(values) => {
                check_inline(unit, values)?;
                Origin::Inline(Some(values.clone()))
            }
        };
        if let Some(state) = self.units.get(unit) {
            // A service registers its process's sockets each time it
            // starts (register-pid), whichever way they were registered
            // before: the new process's sockets replace the old ones.
            let clash = !is_service(unit)
                && matches!(
                    (&state.origin, &requested),
                    (Origin::Files, Origin::Inline(_)) | (Origin::Inline(_), Origin::Files)
                );
            if clash {
                return Err(ServiceError::OriginConflict {
                    unit: unit.to_owned(),
                    registered: state.origin.clone(),
                    requested,
                });
            }
        }
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
                    fd: fd.as_raw_fd(),
                    source,
                }),
            })?;
            if let Directives::Files(files) = directives
                && !is_service(unit)
            {
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
        // One namespace per unit: its dispatcher is that namespace's.
        let netns = infos[0].netns;
        if let Some(other) = infos.iter().find(|i| i.netns != netns) {
            return Err(ServiceError::SpansNamespaces {
                unit: unit.to_owned(),
                first: infos[0].local,
                first_netns: netns,
                second: other.local,
                second_netns: other.netns,
            });
        }
        let sockets = distinct_sockets(&infos);
        let items = self.resolve(unit, directives, &sockets)?;
        let before = self.units.get(unit).map(|u| u.netns);
        self.ensure_dispatcher(netns, fds[0])
            .map_err(|source| ServiceError::Namespace {
                unit: unit.to_owned(),
                netns,
                source: Box::new(source),
            })?;
        let dispatcher = self
            .dispatchers
            .get_mut(&netns)
            .expect("ensured just above");
        let applied = dispatcher.register_sockets(unit, fds).and_then(|_| {
            dispatcher.replace_unit_bindings_to(unit, &items.destinations, &items.items)
        });
        let changes = match applied {
            Ok(c) => {
                if c.removed > 0 {
                    dispatcher.shrink_index();
                }
                c
            }
            Err(e) => {
                if before != Some(netns) {
                    let _ = dispatcher.unregister_unit(unit);
                }
                // A dispatcher made for this unit alone goes again.
                self.retire_if_unused(netns);
                return Err(ServiceError::Dispatcher {
                    unit: unit.to_owned(),
                    source: Box::new(e),
                });
            }
        };
        // Registered again from another namespace (a socket unit restarted
        // with a new one): its old bindings go once the new ones are in.
        if let Some(old) = before.filter(|&old| old != netns) {
            if let Some(d) = self.dispatchers.get_mut(&old) {
                if let Err(e) = d.unregister_unit(unit) {
                    tracing::warn!(unit = %unit, "{unit}: its bindings in network namespace {old} stay: {e}");
                }
                let _ = d.remove_unit_record(unit);
            }
            tracing::info!(unit = %unit, "{unit}: moved from network namespace {old} to {netns}");
        }
        let outcome = Outcome {
            sockets: sockets.len(),
            bindings: items.items.len(),
            changes,
            first: first_bindings(&items.items),
        };
        let ranges = multi_port(items.items.iter().map(|(b, _)| *b));
        drop(items);
        self.units.insert(
            unit.to_owned(),
            UnitState {
                netns,
                registered: SystemTime::now(),
                sockets: Some(infos),
                origin: requested,
                bindings: outcome.bindings,
                ranges,
            },
        );
        if let Some(old) = before {
            self.retire_if_unused(old);
        }
        self.save_record(unit);
        Ok(outcome)
    }

    /// Whether a socket unit's files carry `X-SkLookup=` lines that resolve
    /// against its `Listen` sockets: read and checked, nothing registered.
    /// `Ok(false)` for a unit without the directive; an error names what is
    /// wrong, as registering it would.
    pub fn wants_registration(&self, unit: &str, files: &UnitFiles) -> Result<bool, ServiceError> {
        let socket_unit = SocketUnit::from_paths(&self.root, unit, &files.fragment, &files.dropins)
            .map_err(|source| ServiceError::UnitFile {
                unit: unit.to_owned(),
                source,
            })?;
        if socket_unit.sklookup.is_empty() {
            return Ok(false);
        }
        let (_, problems) = config::resolve_bindings(&socket_unit, &files.sockets());
        let resolution = config::Resolution {
            bindings: Vec::new(),
            problems,
        };
        if !resolution.is_valid() {
            return Err(bad_directive(unit, &resolution));
        }
        Ok(true)
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
        let directives = match (&state.origin, files) {
            (Origin::Inline(Some(values)), _) => Directives::Inline(values.clone()),
            (Origin::Files | Origin::Unknown, Some(f)) => Directives::Files(f.clone()),
            // Values too many to have been kept, or files systemd does not
            // report: nothing to re-read, the bindings stay.
            _ => {
                return Ok(Outcome {
                    sockets: state
                        .sockets
                        .as_ref()
                        .map_or(0, |s| distinct_sockets(s).len()),
                    bindings: state.bindings,
                    changes: Changes::default(),
                    first: Vec::new(),
                });
            }
        };
        let sockets: Vec<Socket> = match (&state.sockets, files) {
            (Some(infos), _) => distinct_sockets(infos),
            (None, Some(f)) => f.sockets(),
            (None, None) => Vec::new(),
        };
        let items = self.resolve(unit, &directives, &sockets)?;
        let netns = state.netns;
        let changes = self
            .dispatchers
            .get_mut(&netns)
            .ok_or_else(|| ServiceError::NotRegistered {
                unit: unit.to_owned(),
            })?
            .replace_unit_bindings_to(unit, &items.destinations, &items.items)
            .map_err(ServiceError::dispatcher(unit))?;
        if changes.removed > 0
            && let Some(d) = self.dispatchers.get_mut(&netns)
        {
            d.shrink_index();
        }
        let state = self.units.get_mut(unit).expect("checked above");
        state.bindings = items.items.len();
        state.ranges = multi_port(items.items.iter().map(|(b, _)| *b));
        let first = first_bindings(&items.items);
        drop(items);
        self.save_record(unit);
        Ok(Outcome {
            sockets: sockets.len(),
            bindings: self.units[unit].bindings,
            changes,
            first,
        })
    }

    /// Remove a unit: bindings, sockets, destinations.
    pub fn unregister(&mut self, unit: &str) -> Result<Changes, ServiceError> {
        let netns = self.units.get(unit).map_or(self.home, |u| u.netns);
        let known = self.units.remove(unit).is_some();
        let Some(dispatcher) = self.dispatchers.get_mut(&netns) else {
            return Err(ServiceError::NotRegistered {
                unit: unit.to_owned(),
            });
        };
        let changes = dispatcher
            .unregister_unit(unit)
            .map_err(ServiceError::dispatcher(unit))?;
        if changes.removed > 0 {
            dispatcher.shrink_index();
        }
        if let Err(e) = dispatcher.remove_unit_record(unit) {
            tracing::warn!(unit = %unit, "{unit}: its record stays (dropped at the next start): {e}");
        }
        // The last unit of another namespace takes its dispatcher along.
        self.retire_if_unused(netns);
        if !known && changes == Changes::default() {
            return Err(ServiceError::NotRegistered {
                unit: unit.to_owned(),
            });
        }
        Ok(changes)
    }
}

/// A unit's directives matched against its sockets: each binding with the
/// index of its socket's destination.
struct Resolved {
    destinations: Vec<Destination>,
    items: Vec<(Binding, u32)>,
}

/// The first [`SHOWN_BINDINGS`] of `items`.
fn first_bindings(items: &[(Binding, u32)]) -> Vec<Binding> {
    items.iter().take(SHOWN_BINDINGS).map(|(b, _)| *b).collect()
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

/// A unit's pinned record: JSON, so that `bpftool map dump` shows it.
mod record {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde_json::{Value, json};

    use super::{Origin, UnitState};
    use crate::binding::{Binding, Family, Ports, Protocol};
    use crate::dispatcher::SocketInfo;

    pub struct Record {
        pub registered: SystemTime,
        pub origin: Origin,
        pub sockets: Vec<SocketInfo>,
        /// The unit's multi-port bindings; `None` when not kept.
        pub ranges: Option<Vec<Binding>>,
    }

    pub fn encode(state: &UnitState, with_values: bool, with_ranges: bool) -> Vec<u8> {
        let registered = state
            .registered
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let values = match &state.origin {
            Origin::Inline(Some(v)) if with_values => json!(v),
            _ => Value::Null,
        };
        let sockets: Vec<Value> = state
            .sockets
            .iter()
            .flatten()
            .map(|i| {
                json!({
                    "family": i.family.to_string(),
                    "protocol": i.protocol.to_string(),
                    "local": i.local.to_string(),
                    "cookie": i.cookie,
                    "v6only": i.v6only,
                    "reuseport": i.reuseport,
                    "pktinfo": i.pktinfo,
                    "freebind": i.freebind,
                    "netns": i.netns,
                })
            })
            .collect();
        // `["tcp", "192.0.2.0/24", 8000, 8099]` each.
        let ranges = if with_ranges {
            json!(
                state
                    .ranges
                    .iter()
                    .filter_map(|b| match b.ports {
                        Ports::Range(a, z) =>
                            Some(json!([b.protocol.as_str(), b.prefix.to_string(), a, z])),
                        Ports::All => None,
                    })
                    .collect::<Vec<_>>()
            )
        } else {
            Value::Null
        };
        json!({
            "version": 1,
            "origin": state.origin.name(),
            "values": values,
            "registered_usec": registered,
            "sockets": sockets,
            "ranges": ranges,
        })
        .to_string()
        .into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let v: Value = serde_json::from_slice(bytes).ok()?;
        let origin = match v.get("origin")?.as_str()? {
            "files" => Origin::Files,
            "inline" => Origin::Inline(v.get("values").and_then(Value::as_array).map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })),
            _ => Origin::Unknown,
        };
        let registered = UNIX_EPOCH + Duration::from_micros(v.get("registered_usec")?.as_u64()?);
        let mut sockets = Vec::new();
        for s in v.get("sockets")?.as_array()? {
            let family = match s.get("family")?.as_str()? {
                f if f == Family::V4.to_string() => Family::V4,
                f if f == Family::V6.to_string() => Family::V6,
                _ => return None,
            };
            let protocol: Protocol = s.get("protocol")?.as_str()?.parse().ok()?;
            let flag = |k: &str| s.get(k).and_then(Value::as_bool).unwrap_or(false);
            sockets.push(SocketInfo {
                family,
                protocol,
                local: s.get("local")?.as_str()?.parse().ok()?,
                listening: protocol == Protocol::Tcp,
                connected: false,
                v6only: flag("v6only"),
                reuseport: flag("reuseport"),
                pktinfo: flag("pktinfo"),
                freebind: flag("freebind"),
                cookie: s.get("cookie")?.as_u64()?,
                netns: s.get("netns").and_then(Value::as_u64).unwrap_or(0),
            });
        }
        let ranges = v.get("ranges").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(|r| {
                    let protocol: Protocol = r.get(0)?.as_str()?.parse().ok()?;
                    let prefix = r.get(1)?.as_str()?.parse().ok()?;
                    let port = |i| r.get(i)?.as_u64().and_then(|p| u16::try_from(p).ok());
                    Some(Binding::new(
                        protocol,
                        prefix,
                        Ports::Range(port(2)?, port(3)?),
                    ))
                })
                .collect()
        });
        Some(Record {
            registered,
            origin,
            sockets,
            ranges,
        })
    }
}

/// The errors of a resolution that is not valid, as the unit's error.
fn bad_directive(unit: &str, resolution: &config::Resolution) -> ServiceError {
    ServiceError::BadDirective {
        unit: unit.to_owned(),
        problems: resolution
            .problems
            .iter()
            .filter(|p| p.severity >= crate::unit::Severity::Error)
            .cloned()
            .collect(),
    }
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

    fn binding(text: &str) -> Binding {
        let (protocol, rest) = text.split_once(':').unwrap();
        let (prefix, ports) = rest.rsplit_once(':').unwrap();
        let ports = match ports.split_once('-') {
            _ if ports == "*" => Ports::All,
            Some((a, z)) => Ports::Range(a.parse().unwrap(), z.parse().unwrap()),
            None => Ports::single(ports.parse().unwrap()),
        };
        Binding::new(protocol.parse().unwrap(), prefix.parse().unwrap(), ports)
    }

    fn dest(family: crate::binding::Family) -> Destination {
        Destination {
            unit: "t.socket".into(),
            family,
            protocol: Protocol::Tcp,
        }
    }

    /// The bindings as written come back from the merged entries and the
    /// unit's ranges: single ports, ranges and `*` as they were.
    #[test]
    fn bindings_as_written_from_entries_and_ranges() {
        use crate::binding::Family::V4;
        let written = [
            "tcp:192.0.2.0/24:80",
            "tcp:192.0.2.0/24:81",
            "tcp:192.0.2.0/24:82-90",
            "tcp:192.0.2.0/24:91",
            "tcp:192.0.2.0/24:*",
            "tcp:198.51.100.7/32:1000-1001",
            "tcp:198.51.100.7/32:1002-1003",
        ]
        .map(binding);
        let ranges = multi_port(written.iter().copied());
        assert_eq!(ranges.len(), 3);
        // What the dispatcher shows: consecutive ports of one prefix merged.
        let merged = [
            "tcp:192.0.2.0/24:80-91",
            "tcp:192.0.2.0/24:*",
            "tcp:198.51.100.7/32:1000-1003",
        ]
        .map(|b| (binding(b), dest(V4)))
        .to_vec();
        let mut back: Vec<String> = as_written(merged, &ranges)
            .iter()
            .map(|(b, _)| b.to_string())
            .collect();
        back.sort();
        let mut expected: Vec<String> = written.iter().map(ToString::to_string).collect();
        expected.sort();
        assert_eq!(back, expected);
        // The binding as written that holds one port of an entry.
        let entry = binding("tcp:192.0.2.0/24:85");
        assert_eq!(
            range_of(&ranges, &entry),
            Some(binding("tcp:192.0.2.0/24:82-90"))
        );
        assert_eq!(range_of(&ranges, &binding("tcp:192.0.2.0/24:81")), None);
    }

    /// A unit's record keeps its ranges, so the count and the bindings as
    /// written survive a restart; left out, they are unknown.
    #[test]
    fn records_keep_the_port_ranges() {
        let state = UnitState {
            netns: 1,
            registered: SystemTime::UNIX_EPOCH,
            sockets: Some(Vec::new()),
            origin: Origin::Files,
            bindings: 3,
            ranges: vec![
                binding("tcp:192.0.2.0/24:82-90"),
                binding("udp:2001:db8::/64:53-54"),
            ],
        };
        let r = record::decode(&record::encode(&state, true, true)).unwrap();
        assert_eq!(r.ranges, Some(state.ranges.clone()));
        let r = record::decode(&record::encode(&state, true, false)).unwrap();
        assert_eq!(r.ranges, None);
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
