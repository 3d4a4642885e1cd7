//! Matching a unit's `X-SkLookup=` values to its sockets.
//!
//! The rules of the design: a value without a port takes the port of the
//! socket it lands on; a value without a protocol goes to every socket whose
//! protocol fits (stream → tcp, datagram → udp); an IPv4 value goes to an IPv4
//! socket of its protocol or, when the unit has none, to a dual-stack IPv6
//! one; an IPv6 value only to an IPv6 socket. A value no socket can carry, or
//! that two sockets of one protocol and family could both take, is an error,
//! and so is the same `(protocol, prefix, port)` twice in one unit.
//!
//! The sockets are a plain list ([`Socket`]): `skactivate check` makes it
//! from the unit's `Listen…=` lines ([`listen_sockets`]), the daemon from the
//! file descriptors systemd hands over.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::binding::{Binding, Destination, Family, Ports, Protocol};
use crate::directive::{self, DirectiveError, Value};
use crate::unit::{
    BindIpv6Only, FileIssue, FileIssueKind, Listen, ListenKind, Location, Severity, SocketProtocol,
    SocketUnit,
};

/// One listening socket of a unit, as the matching sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Socket {
    pub protocol: Protocol,
    /// The local address it is bound to.
    pub address: SocketAddr,
    /// `IPV6_V6ONLY`: an IPv6 socket that cannot take IPv4 traffic.
    pub v6only: bool,
}

impl Socket {
    pub fn family(&self) -> Family {
        Family::of(&self.address.ip())
    }

    /// The destination this socket is in the dispatcher.
    pub fn destination(&self, unit: &str) -> Destination {
        Destination {
            unit: unit.to_owned(),
            family: self.family(),
            protocol: self.protocol,
        }
    }
}

impl fmt::Display for Socket {
    /// `tcp 0.0.0.0:80`, `udp [::]:53`, `tcp [::]:80 (IPv6-only)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.protocol, self.address)?;
        if self.v6only && self.family() == Family::V6 {
            f.write_str(" (IPv6-only)")?;
        }
        Ok(())
    }
}

/// A socket made from a `Listen…=` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSocket {
    pub socket: Socket,
    pub listen: Listen,
}

/// A value matched to a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub binding: Binding,
    /// Index into the sockets given to [`resolve`].
    pub socket: usize,
    /// The value it came from, as written.
    pub value: String,
    pub location: Location,
}

/// What [`resolve`] makes of a unit: its bindings, and what is wrong.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolution {
    pub bindings: Vec<Resolved>,
    pub problems: Vec<Problem>,
}

impl Resolution {
    /// Whether the unit may be applied: no problem is an error.
    pub fn is_valid(&self) -> bool {
        self.problems.iter().all(|p| p.severity < Severity::Error)
    }
}

/// The setting a problem is about: `X-SkLookup=192.0.2.0/33:80`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: &'static str,
    pub value: String,
}

/// One finding: where (file and line, or the unit as a whole), which
/// setting, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    /// `None`: the unit as a whole.
    pub location: Option<Location>,
    pub setting: Option<Setting>,
    pub reason: Reason,
}

impl Problem {
    fn value(location: &Location, value: &str, reason: Reason) -> Self {
        Problem {
            severity: Severity::Error,
            location: Some(location.clone()),
            setting: Some(Setting {
                key: "X-SkLookup",
                value: value.to_owned(),
            }),
            reason,
        }
    }

    fn unit(severity: Severity, reason: Reason) -> Self {
        Problem {
            severity,
            location: None,
            setting: None,
            reason,
        }
    }
}

impl From<FileIssue> for Problem {
    fn from(issue: FileIssue) -> Self {
        Problem {
            severity: issue.kind.severity(),
            location: Some(issue.location),
            setting: None,
            reason: Reason::File(issue.kind),
        }
    }
}

impl fmt::Display for Problem {
    /// `PATH:LINE: X-SkLookup=VALUE: reason`; a unit-level problem is only
    /// its reason (the caller names the unit).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(location) = &self.location {
            write!(f, "{location}: ")?;
        }
        if let Some(setting) = &self.setting {
            write!(f, "{}={}: ", setting.key, setting.value)?;
        }
        write!(f, "{}", self.reason)
    }
}

/// Why a value, a line or a unit is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error(transparent)]
    Directive(#[from] DirectiveError),
    #[error(transparent)]
    File(#[from] FileIssueKind),
    #[error("not an IP address and port systemd accepts: systemd ignores this line")]
    BadListen,
    #[error("the unit has Accept=yes ({at}): sk_lookup needs the listening socket; set Accept=no")]
    Accept { at: Location },
    #[error(
        "the unit has no TCP or UDP socket to take it \
         (ListenStream= or ListenDatagram= with an IP address or a port)"
    )]
    NoIpSocket,
    #[error("the unit has no {protocol} socket (it has {})", list(.sockets))]
    NoProtocol {
        protocol: Protocol,
        sockets: Vec<Socket>,
    },
    #[error(
        "no {}socket of the unit can take {} traffic (it has {})",
        .protocol.map(|p| format!("{p} ")).unwrap_or_default(),
        family_name(*.family),
        list(.sockets)
    )]
    NoFamily {
        protocol: Option<Protocol>,
        family: Family,
        sockets: Vec<Socket>,
    },
    #[error(
        "{} {} is IPv6-only (BindIPv6Only=ipv6-only) and cannot take IPv4 traffic",
        .socket.protocol,
        .socket.address
    )]
    V6Only { socket: Socket },
    #[error(
        "ambiguous: {} could each take it; X-SkLookup= needs at most one socket per protocol and family",
        list(.sockets)
    )]
    Ambiguous { sockets: Vec<Socket> },
    #[error("{binding} is already claimed by X-SkLookup={value} at {at}")]
    Duplicate {
        binding: Binding,
        value: String,
        at: Location,
    },
    #[error("{binding} is already claimed by {unit} (X-SkLookup={value} at {at})")]
    Conflict {
        binding: Binding,
        unit: String,
        value: String,
        at: Location,
    },
    #[error(
        "{socket} gets X-SkLookup= traffic but PassPacketInfo= is not yes: \
         its replies may leave from the wrong source address"
    )]
    NoPacketInfo { socket: Socket },
    #[error(
        "{socket} gets IPv6 X-SkLookup= traffic but FreeBind= is not yes: its replies \
         from the bound prefix's addresses fail unless an interface carries them"
    )]
    NoFreeBind { socket: Socket },
}

fn list(sockets: &[Socket]) -> String {
    match sockets {
        [] => "no socket".to_owned(),
        [one] => one.to_string(),
        [init @ .., last] => {
            let init: Vec<String> = init.iter().map(ToString::to_string).collect();
            format!("{} and {last}", init.join(", "))
        }
    }
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

/// The IP sockets a unit's `Listen…=` lines make, the way systemd parses
/// them: `80` is `[::]:80`, dual-stack unless `BindIPv6Only=ipv6-only`;
/// `0.0.0.0:80`, `[::]:80`, `192.0.2.1:80%eth0`, `[fe80::1%eth0]:80`. UNIX
/// sockets, FIFOs, vsock and the like are not IP and are left out, as are
/// sockets `SocketProtocol=` makes something else than TCP or UDP. A line
/// systemd would ignore comes back as a warning.
pub fn listen_sockets(unit: &SocketUnit) -> (Vec<ListenSocket>, Vec<Problem>) {
    let v6only = unit.bind_ipv6_only() == BindIpv6Only::Ipv6Only;
    let other_protocol = unit.socket_protocol.as_ref().map(|p| p.value);
    let mut sockets = Vec::new();
    let mut problems = Vec::new();
    for listen in &unit.listens {
        let protocol = match (listen.kind, other_protocol) {
            (ListenKind::Stream, None | Some(SocketProtocol::UdpLite)) => Protocol::Tcp,
            (ListenKind::Datagram, None | Some(SocketProtocol::Sctp | SocketProtocol::Mptcp)) => {
                Protocol::Udp
            }
            _ => continue,
        };
        let address = expand_specifiers(&listen.address, &unit.name);
        match parse_listen_address(&address) {
            ListenAddress::NotIp => {}
            ListenAddress::Invalid => problems.push(Problem {
                severity: Severity::Warning,
                location: Some(listen.location.clone()),
                setting: Some(Setting {
                    key: listen.kind.key(),
                    value: listen.address.clone(),
                }),
                reason: Reason::BadListen,
            }),
            ListenAddress::Ip(address) => sockets.push(ListenSocket {
                socket: Socket {
                    protocol,
                    address,
                    v6only: v6only && address.is_ipv6(),
                },
                listen: listen.clone(),
            }),
        }
    }
    (sockets, problems)
}

enum ListenAddress {
    Ip(SocketAddr),
    NotIp,
    Invalid,
}

/// systemd's `socket_address_parse()`, for what matters here.
fn parse_listen_address(text: &str) -> ListenAddress {
    if text.starts_with(['/', '@']) || text.starts_with("vsock:") {
        return ListenAddress::NotIp;
    }
    let parsed = if let Some(inner) = text.strip_prefix('[') {
        inner.split_once("]:").and_then(|(host, port)| {
            let host = host.split('%').next().unwrap_or(host);
            let ip: Ipv6Addr = host.parse().ok()?;
            Some(SocketAddr::new(IpAddr::V6(ip), listen_port(port)?))
        })
    } else if text.bytes().all(|b| b.is_ascii_digit()) {
        listen_port(text).map(|port| SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
    } else {
        text.rsplit_once(':').and_then(|(host, port)| {
            let host = host.split('%').next().unwrap_or(host);
            let ip: Ipv4Addr = host.parse().ok()?;
            Some(SocketAddr::new(IpAddr::V4(ip), listen_port(port)?))
        })
    };
    parsed.map_or(ListenAddress::Invalid, ListenAddress::Ip)
}

/// A port, maybe followed by `%INTERFACE`.
fn listen_port(text: &str) -> Option<u16> {
    let port = text.split('%').next().unwrap_or(text);
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse::<u16>().ok().filter(|&p| p != 0)
}

/// The specifiers that make sense in an address (`%i`, `%I`, `%n`, `%N`,
/// `%p`, `%P`, `%%`); any other `%` is left as written.
pub(crate) fn expand_specifiers(text: &str, unit: &str) -> String {
    let stem = unit.rsplit_once('.').map_or(unit, |(stem, _)| stem);
    let (prefix, instance) = stem.split_once('@').unwrap_or((stem, ""));
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some('n') => out.push_str(unit),
            Some('N') => out.push_str(stem),
            Some('p') => out.push_str(prefix),
            Some('P') => out.push_str(&unescape(prefix)),
            Some('i') => out.push_str(instance),
            Some('I') => out.push_str(&unescape(instance)),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// systemd's `unit_name_unescape()`: `-` is `/`, `\xNN` a byte.
fn unescape(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'-' => out.push(b'/'),
            b'\\' if bytes.get(i + 1) == Some(&b'x') => {
                let byte = text
                    .get(i + 2..i + 4)
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok());
                if let Some(byte) = byte {
                    out.push(byte);
                    i += 4;
                    continue;
                }
                out.push(b'\\');
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Matches the unit's `X-SkLookup=` values to `sockets`.
pub fn resolve(unit: &SocketUnit, sockets: &[Socket]) -> Resolution {
    let mut bindings = Vec::new();
    let problems = resolve_each(unit, sockets, true, |binding, socket, value, location| {
        bindings.push(Resolved {
            binding,
            socket,
            value: value.to_owned(),
            location: location.clone(),
        });
    });
    Resolution { bindings, problems }
}

/// [`resolve`] without keeping the values' text and lines: each binding
/// with the index of its socket, in the order written, and the problems.
/// What the daemon needs of a unit that may hold a million values. Two
/// values that make the same entry are found by sorting indexes of the
/// bindings (4 bytes each) rather than by [`Claimed`]'s tree of each
/// prefix's ports (some 45 bytes per binding: 1M values took 47 MB more);
/// only where a clash exists is the unit read again with it, so that
/// each clash names the value it repeats, as [`resolve`] does.
pub fn resolve_bindings(
    unit: &SocketUnit,
    sockets: &[Socket],
) -> (Vec<(Binding, u32)>, Vec<Problem>) {
    // One binding per line is the usual count: no doubling past it.
    let mut items = Vec::with_capacity(unit.sklookup.len());
    let mut problems = resolve_each(unit, sockets, false, |binding, socket, _, _| {
        items.push((binding, socket as u32));
    });
    if any_same_key(&items) {
        items.clear();
        problems = resolve_each(unit, sockets, true, |binding, socket, _, _| {
            items.push((binding, socket as u32));
        });
    }
    (items, problems)
}

/// Whether two of `items` make the same entry ([`same_key`]). Sorted by
/// protocol, prefix and ports (`*` first, then by first port), a clash is
/// between neighbours: ranges that overlap at all include a neighbouring
/// pair that does. The items stay in their order; their indexes are sorted.
fn any_same_key(items: &[(Binding, u32)]) -> bool {
    let n = u32::try_from(items.len()).expect("fewer than 2^32 bindings");
    let mut order: Vec<u32> = (0..n).collect();
    order.sort_unstable_by_key(|&i| {
        let b = &items[i as usize].0;
        let ports = match b.ports {
            Ports::All => (0, 0, 0),
            Ports::Range(first, last) => (1, first, last),
        };
        (b.protocol, b.prefix, ports)
    });
    order
        .windows(2)
        .any(|w| same_key(&items[w[0] as usize].0, &items[w[1] as usize].0))
}

/// The value at `index` (`line << 32 | nth`, the nth value of that line of
/// `unit.sklookup`) as written, and its line.
fn value_at(unit: &SocketUnit, index: usize) -> (String, Location) {
    let line = unit
        .sklookup
        .get(index >> 32)
        .expect("the index of a value read");
    let text = directive::parse_list(line.value)
        .into_iter()
        .nth(index & 0xffff_ffff)
        .map(|v| match v {
            Ok(v) => v.text,
            Err(bad) => bad.text,
        })
        .unwrap_or_default();
    (text, line.location.clone())
}

/// The matching itself, one value at a time (a line's values are parsed
/// when it is reached, nothing of the whole list is copied): `emit` gets
/// each binding, its socket's index, the value as written and its line.
/// Returns the problems. With `claims`, a binding that makes the same
/// entry as an earlier one is a problem and is not emitted; without, every
/// binding is (the caller looks for clashes itself).
fn resolve_each(
    unit: &SocketUnit,
    sockets: &[Socket],
    claims: bool,
    mut emit: impl FnMut(Binding, usize, &str, &Location),
) -> Vec<Problem> {
    let mut problems = Vec::new();
    let accept = unit.accept.as_ref().filter(|a| a.value);
    if accept.is_none() && sockets.is_empty() {
        // Said once, at the first value that would need a socket.
        let first = unit.sklookup.iter().find_map(|entry| {
            directive::parse_list(entry.value)
                .into_iter()
                .find_map(Result::ok)
                .map(|value| (value, entry.location))
        });
        if let Some((value, location)) = first {
            problems.push(Problem::value(&location, &value.text, Reason::NoIpSocket));
        }
    }

    let mut claimed = Claimed::default();
    // Sockets that take UDP, and UDP over IPv6, for the warnings below.
    let mut udp = Vec::new();
    let mut udp_v6 = Vec::new();
    for (line, entry) in unit.sklookup.iter().enumerate() {
        let location = &entry.location;
        for (nth, parsed) in directive::parse_list(entry.value).into_iter().enumerate() {
            let value = match parsed {
                Ok(value) => value,
                Err(bad) => {
                    problems.push(Problem::value(location, &bad.text, bad.error.into()));
                    continue;
                }
            };
            if let Some(accept) = accept {
                let reason = Reason::Accept {
                    at: accept.location.clone(),
                };
                problems.push(Problem::value(location, &value.text, reason));
                continue;
            }
            if sockets.is_empty() {
                continue;
            }
            let targets = match place(&value, sockets) {
                Ok(targets) => targets,
                Err(reason) => {
                    problems.push(Problem::value(location, &value.text, reason));
                    continue;
                }
            };
            for (protocol, socket) in targets {
                let port = sockets[socket].address.port();
                let ports = value.ports.unwrap_or(Ports::single(port));
                let binding = Binding::new(protocol, value.prefix, ports);
                if let Some(first) = claims
                    .then(|| claimed.claim(&binding, line << 32 | nth))
                    .flatten()
                {
                    let (first_value, at) = value_at(unit, first);
                    let reason = Reason::Duplicate {
                        binding,
                        value: first_value,
                        at,
                    };
                    problems.push(Problem::value(location, &value.text, reason));
                    continue;
                }
                if protocol == Protocol::Udp {
                    if !udp.contains(&socket) {
                        udp.push(socket);
                    }
                    if binding.prefix.addr().is_ipv6() && !udp_v6.contains(&socket) {
                        udp_v6.push(socket);
                    }
                }
                emit(binding, socket, &value.text, location);
            }
        }
    }

    if !unit.pass_packet_info() {
        for &socket in &udp {
            let reason = Reason::NoPacketInfo {
                socket: sockets[socket],
            };
            problems.push(Problem::unit(Severity::Warning, reason));
        }
    }
    if !unit.free_bind() {
        for &socket in &udp_v6 {
            let reason = Reason::NoFreeBind {
                socket: sockets[socket],
            };
            problems.push(Problem::unit(Severity::Warning, reason));
        }
    }
    problems
}

/// The bindings a unit claimed so far, indexed so that finding a clash
/// ([`same_key`]) costs a hash lookup and a tree search, not a scan: the
/// check stays linear in the number of values, however many share a line.
#[derive(Default)]
pub(crate) struct Claimed {
    by_prefix: std::collections::HashMap<(Protocol, ipnet::IpNet), ClaimedPorts>,
}

#[derive(Default)]
struct ClaimedPorts {
    /// The `*` binding, by its index in the resolution.
    all: Option<usize>,
    /// Disjoint port ranges: start → (end, index). Disjoint because a range
    /// that overlaps one here is refused, never added.
    ranges: std::collections::BTreeMap<u16, (u16, usize)>,
}

impl Claimed {
    /// Claim `binding` as resolution entry `index`; if an earlier binding
    /// already makes the same entry, its index instead (nothing is claimed).
    pub(crate) fn claim(&mut self, binding: &Binding, index: usize) -> Option<usize> {
        let ports = self
            .by_prefix
            .entry((binding.protocol, binding.prefix))
            .or_default();
        match binding.ports {
            Ports::All => {
                if let Some(first) = ports.all {
                    return Some(first);
                }
                ports.all = Some(index);
            }
            Ports::Range(a, b) => {
                // The range starting last at or before b is the only one
                // that can overlap [a, b] (the stored ranges are disjoint).
                if let Some((_, &(end, first))) = ports.ranges.range(..=b).next_back()
                    && end >= a
                {
                    return Some(first);
                }
                ports.ranges.insert(a, (b, index));
            }
        }
        None
    }
}

/// Whether two bindings would make the same dispatcher entry: the same
/// protocol and prefix, and both `*` or port ranges that share a port. (`*`
/// and a port do not clash: the port is more specific and wins.)
pub fn same_key(a: &Binding, b: &Binding) -> bool {
    a.protocol == b.protocol
        && a.prefix == b.prefix
        && match (a.ports, b.ports) {
            (Ports::All, Ports::All) => true,
            (Ports::Range(..), Ports::Range(..)) => a.ports.overlaps(b.ports),
            _ => false,
        }
}

/// Where one socket protocol leaves a value.
enum Fit {
    /// The unit has no socket of the protocol.
    NoProtocol,
    /// It has some, none of the value's family; maybe an IPv6-only one
    /// that refuses an IPv4 value.
    NoFamily(Option<Socket>),
    One(usize),
    Many(Vec<Socket>),
}

/// The sockets a value goes to: one per protocol it names or fits.
fn place(value: &Value, sockets: &[Socket]) -> Result<Vec<(Protocol, usize)>, Reason> {
    let protocols = match value.protocol {
        Some(p) => vec![p],
        None => vec![Protocol::Tcp, Protocol::Udp],
    };
    let mut targets = Vec::new();
    let mut refused = None;
    for &protocol in &protocols {
        match fit(protocol, value.family(), sockets) {
            Fit::One(i) => targets.push((protocol, i)),
            Fit::Many(sockets) => return Err(Reason::Ambiguous { sockets }),
            Fit::NoProtocol if value.protocol.is_some() => {
                return Err(Reason::NoProtocol {
                    protocol,
                    sockets: sockets.to_vec(),
                });
            }
            Fit::NoFamily(v6only) => refused = refused.or(v6only),
            Fit::NoProtocol => {}
        }
    }
    if targets.is_empty() {
        return Err(match refused {
            Some(socket) => Reason::V6Only { socket },
            None => Reason::NoFamily {
                protocol: value.protocol,
                family: value.family(),
                sockets: sockets.to_vec(),
            },
        });
    }
    Ok(targets)
}

fn fit(protocol: Protocol, family: Family, sockets: &[Socket]) -> Fit {
    let of_protocol: Vec<(usize, &Socket)> = sockets
        .iter()
        .enumerate()
        .filter(|(_, s)| s.protocol == protocol)
        .collect();
    if of_protocol.is_empty() {
        return Fit::NoProtocol;
    }
    let mut candidates: Vec<(usize, &Socket)> = of_protocol
        .iter()
        .copied()
        .filter(|(_, s)| s.family() == family)
        .collect();
    if candidates.is_empty() && family == Family::V4 {
        candidates = of_protocol
            .iter()
            .copied()
            .filter(|(_, s)| s.family() == Family::V6 && !s.v6only)
            .collect();
    }
    // Sockets with the same address are one reuseport group: its first
    // member stands for it.
    let mut distinct: Vec<(usize, &Socket)> = Vec::new();
    for (i, s) in candidates {
        if !distinct.iter().any(|(_, d)| d.address == s.address) {
            distinct.push((i, s));
        }
    }
    match distinct.as_slice() {
        [] => {
            let v6only = of_protocol
                .iter()
                .find(|(_, s)| family == Family::V4 && s.family() == Family::V6 && s.v6only)
                .map(|(_, s)| **s);
            Fit::NoFamily(v6only)
        }
        [(i, _)] => Fit::One(*i),
        many => Fit::Many(many.iter().map(|(_, s)| **s).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(protocol: Protocol, address: &str, v6only: bool) -> Socket {
        Socket {
            protocol,
            address: address.parse().unwrap_or_else(|e| panic!("{address}: {e}")),
            v6only,
        }
    }

    fn unit(lines: &[&str]) -> SocketUnit {
        let mut unit = test_unit();
        for (i, line) in lines.iter().enumerate() {
            let location = Location::new(std::path::Path::new("/t.socket"), i as u32 + 1);
            unit.sklookup.push(&location, line);
        }
        unit
    }

    fn test_unit() -> SocketUnit {
        let mut unit = SocketUnit::inline("t.socket", Default::default());
        unit.fragment = "/t.socket".into();
        unit
    }

    fn shown(resolution: &Resolution) -> Vec<String> {
        resolution
            .bindings
            .iter()
            .map(|r| format!("{} -> {}", r.binding, r.socket))
            .chain(resolution.problems.iter().map(ToString::to_string))
            .collect()
    }

    #[test]
    fn listen_addresses_as_systemd_reads_them() {
        let cases: &[(&str, Option<&str>)] = &[
            ("80", Some("[::]:80")),
            ("0.0.0.0:80", Some("0.0.0.0:80")),
            ("192.0.2.1:80%eth0", Some("192.0.2.1:80")),
            ("[::]:443", Some("[::]:443")),
            ("[fe80::1%eth0]:443", Some("[fe80::1]:443")),
            ("[::1]:53%lo", Some("[::1]:53")),
        ];
        for (text, expected) in cases {
            let got = match parse_listen_address(text) {
                ListenAddress::Ip(a) => Some(a.to_string()),
                _ => None,
            };
            assert_eq!(got.as_deref(), *expected, "{text}");
        }
        for text in ["/run/x.sock", "@abstract", "vsock:2:80"] {
            assert!(
                matches!(parse_listen_address(text), ListenAddress::NotIp),
                "{text}"
            );
        }
        for text in [
            "0",
            "65536",
            "0.0.0.0",
            "::1:80",
            "[::1]",
            "localhost:80",
            "1.2.3.4:0",
        ] {
            assert!(
                matches!(parse_listen_address(text), ListenAddress::Invalid),
                "{text}"
            );
        }
        assert_eq!(expand_specifiers("%i:%%x", "dns@8053.socket"), "8053:%x");
        assert_eq!(expand_specifiers("/run/%I", "a@b-c.socket"), "/run/b/c");
    }

    #[test]
    fn values_land_on_sockets_by_the_rules() {
        use Protocol::{Tcp, Udp};
        let sockets = [
            socket(Tcp, "[::]:80", false),
            socket(Udp, "0.0.0.0:53", false),
            socket(Udp, "[::]:53", true),
        ];
        let u = unit(&[
            "192.0.2.0/24",
            "[2001:db8::]/64:8080-8090 tcp:198.51.100.7:*",
            "tcp:[2001:db8::1]:443 udp:[2001:db8::]/64:53",
            "192.0.2.0/24:80",
        ]);
        assert_eq!(
            shown(&resolve(&u, &sockets)),
            [
                "tcp:192.0.2.0/24:80 -> 0",
                "udp:192.0.2.0/24:53 -> 1",
                "tcp:[2001:db8::]/64:8080-8090 -> 0",
                "udp:[2001:db8::]/64:8080-8090 -> 2",
                "tcp:198.51.100.7/32:* -> 0",
                "tcp:[2001:db8::1]/128:443 -> 0",
                "udp:[2001:db8::]/64:53 -> 2",
                "udp:192.0.2.0/24:80 -> 1",
                "/t.socket:4: X-SkLookup=192.0.2.0/24:80: tcp:192.0.2.0/24:80 is already claimed by X-SkLookup=192.0.2.0/24 at /t.socket:1",
                "udp 0.0.0.0:53 gets X-SkLookup= traffic but PassPacketInfo= is not yes: its replies may leave from the wrong source address",
                "udp [::]:53 (IPv6-only) gets X-SkLookup= traffic but PassPacketInfo= is not yes: its replies may leave from the wrong source address",
                "udp [::]:53 (IPv6-only) gets IPv6 X-SkLookup= traffic but FreeBind= is not yes: its replies from the bound prefix's addresses fail unless an interface carries them",
            ]
        );
    }

    /// The daemon's path ([`resolve_bindings`], which looks for clashes by
    /// sorting) answers as [`resolve`] (which claims each binding in turn)
    /// does: the same bindings in the same order, the same problems.
    #[test]
    fn the_daemons_resolution_agrees_with_resolve() {
        use Protocol::{Tcp, Udp};
        let sockets = [
            socket(Tcp, "[::]:80", false),
            socket(Udp, "0.0.0.0:53", false),
        ];
        // Distinct, in no order: 2,000 /32s on two ports, shuffled.
        let mut many: Vec<String> = (0..2000u32)
            .map(|i| {
                let a = (i * 7919) % 1000;
                format!("tcp:198.18.{}.{}:{}", a / 256, a % 256, 8000 + i / 1000)
            })
            .collect();
        many.push("tcp:198.18.0.0/24:*".into());
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let cases: &[&[&str]] = &[
            &[
                "192.0.2.0/24",
                "192.0.2.0/24:53",
                "[2001:db8::]/64:8080-8090",
            ],
            // Clashes: `*` twice, the same port through both protocols,
            // far apart in the file.
            &[
                "192.0.2.1:*",
                "198.51.100.0/24",
                "tcp:192.0.2.1:*",
                "udp:198.51.100.0/24:53",
            ],
            // Overlapping ranges in a chain: the second clashes with the
            // first and is refused, so the third, which overlaps only the
            // second, does not clash.
            &[
                "tcp:192.0.2.0/24:8000-8010",
                "tcp:192.0.2.0/24:8005-8015",
                "tcp:192.0.2.0/24:8012-8020",
            ],
            // The same prefix written two ways, and a range around a port.
            &["tcp:192.0.2.7/32:443 tcp:192.0.2.7:400-500"],
            &many,
        ];
        for lines in cases {
            let u = unit(lines);
            let expected = resolve(&u, &sockets);
            let (items, problems) = resolve_bindings(&u, &sockets);
            let got: Vec<(Binding, usize)> = items.iter().map(|&(b, s)| (b, s as usize)).collect();
            let want: Vec<(Binding, usize)> = expected
                .bindings
                .iter()
                .map(|r| (r.binding, r.socket))
                .collect();
            assert_eq!(got, want, "{lines:?}");
            let got: Vec<String> = problems.iter().map(ToString::to_string).collect();
            let want: Vec<String> = expected.problems.iter().map(ToString::to_string).collect();
            assert_eq!(got, want, "{lines:?}");
        }
        // The chain: one clash, the second value's.
        let (_, problems) = resolve_bindings(&unit(cases[2]), &sockets);
        let clashes: Vec<String> = problems
            .iter()
            .filter(|p| matches!(p.reason, Reason::Duplicate { .. }))
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            clashes,
            [
                "/t.socket:2: X-SkLookup=tcp:192.0.2.0/24:8005-8015: tcp:192.0.2.0/24:8005-8015 is already claimed by X-SkLookup=tcp:192.0.2.0/24:8000-8010 at /t.socket:1"
            ]
        );
        // Far apart: found though the two are not neighbours in the file.
        let (_, problems) = resolve_bindings(&unit(cases[1]), &sockets);
        assert_eq!(
            problems
                .iter()
                .filter(|p| matches!(p.reason, Reason::Duplicate { .. }))
                .count(),
            2,
            "{problems:?}"
        );
    }

    #[test]
    fn values_no_socket_can_carry() {
        use Protocol::{Tcp, Udp};
        let sockets = [
            socket(Tcp, "[::]:80", true),
            socket(Tcp, "0.0.0.0:8080", false),
            socket(Tcp, "0.0.0.0:8080", false),
        ];
        let u = unit(&["192.0.2.1 udp:[::1] [::1] [::1]:*"]);
        assert_eq!(
            shown(&resolve(&u, &sockets)),
            [
                "tcp:192.0.2.1/32:8080 -> 1",
                "tcp:[::1]/128:80 -> 0",
                "tcp:[::1]/128:* -> 0",
                "/t.socket:1: X-SkLookup=udp:[::1]: the unit has no udp socket (it has tcp [::]:80 (IPv6-only), tcp 0.0.0.0:8080 and tcp 0.0.0.0:8080)",
            ]
        );
        let sockets = [socket(Tcp, "[::]:80", true), socket(Udp, "[::1]:53", false)];
        let u = unit(&["tcp:192.0.2.1", "192.0.2.1"]);
        assert_eq!(
            shown(&resolve(&u, &sockets)),
            [
                "udp:192.0.2.1/32:53 -> 1",
                "/t.socket:1: X-SkLookup=tcp:192.0.2.1: tcp [::]:80 is IPv6-only (BindIPv6Only=ipv6-only) and cannot take IPv4 traffic",
                "udp [::1]:53 gets X-SkLookup= traffic but PassPacketInfo= is not yes: its replies may leave from the wrong source address",
            ]
        );
        let sockets = [
            socket(Tcp, "0.0.0.0:80", false),
            socket(Tcp, "192.0.2.1:443", false),
        ];
        let u = unit(&["192.0.2.1 [::1]"]);
        assert_eq!(
            shown(&resolve(&u, &sockets)),
            [
                "/t.socket:1: X-SkLookup=192.0.2.1: ambiguous: tcp 0.0.0.0:80 and tcp 192.0.2.1:443 could each take it; X-SkLookup= needs at most one socket per protocol and family",
                "/t.socket:1: X-SkLookup=[::1]: no socket of the unit can take IPv6 traffic (it has tcp 0.0.0.0:80 and tcp 192.0.2.1:443)",
            ]
        );
    }
}
