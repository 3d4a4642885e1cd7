//! Bindings and destinations: the data model of the design.
//!
//! A [`Binding`] says which traffic is meant (protocol, prefix, ports); a
//! [`Destination`] names one socket of one socket unit (unit, family, protocol).
//! The dispatcher maps the first onto the second.

use std::cmp::Ordering;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// The L4 protocol of a binding or a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IANA protocol number (`IPPROTO_TCP`, `IPPROTO_UDP`).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = UnknownProtocol;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(UnknownProtocol(s.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown protocol {0:?}: expected tcp or udp")]
pub struct UnknownProtocol(pub String);

/// The address family of a socket or a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// `AF_INET` or `AF_INET6`.
    pub fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }

    pub fn from_af(af: u8) -> Option<Self> {
        match i32::from(af) {
            libc::AF_INET => Some(Family::V4),
            libc::AF_INET6 => Some(Family::V6),
            _ => None,
        }
    }

    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The ports of a binding: all of them, or an inclusive range (a single port is
/// a range of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ports {
    All,
    Range(u16, u16),
}

impl Ports {
    pub fn single(port: u16) -> Self {
        Ports::Range(port, port)
    }

    pub fn is_wildcard(self) -> bool {
        matches!(self, Ports::All)
    }

    /// How many dispatcher entries this takes per prefix: `*` is one entry.
    pub fn entries(self) -> u32 {
        match self {
            Ports::All => 1,
            Ports::Range(a, b) => u32::from(b) - u32::from(a) + 1,
        }
    }

    /// Whether `port` is one of these ports.
    pub fn contains(self, port: u16) -> bool {
        match self {
            Ports::All => true,
            Ports::Range(a, b) => (a..=b).contains(&port),
        }
    }

    /// Whether the two sets of ports share a port.
    pub fn overlaps(self, other: Ports) -> bool {
        match (self, other) {
            (Ports::All, _) | (_, Ports::All) => true,
            (Ports::Range(a, b), Ports::Range(c, d)) => a <= d && c <= b,
        }
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::All => f.write_str("*"),
            Ports::Range(a, b) if a == b => write!(f, "{a}"),
            Ports::Range(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// Which traffic is meant: `(protocol, prefix, ports)`.
///
/// The prefix is always stored truncated (host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Binding {
    pub protocol: Protocol,
    pub prefix: IpNet,
    pub ports: Ports,
}

impl Binding {
    pub fn new(protocol: Protocol, prefix: IpNet, ports: Ports) -> Self {
        Binding {
            protocol,
            prefix: prefix.trunc(),
            ports,
        }
    }

    pub fn family(&self) -> Family {
        Family::of(&self.prefix.addr())
    }

    /// Precedence order, most specific first: longest prefix, then a specific
    /// port before `*`; ties broken by protocol, address and port so that the
    /// order is total and stable.
    pub fn precedence_cmp(&self, other: &Binding) -> Ordering {
        other
            .prefix
            .prefix_len()
            .cmp(&self.prefix.prefix_len())
            .then_with(|| self.ports.is_wildcard().cmp(&other.ports.is_wildcard()))
            .then_with(|| self.protocol.cmp(&other.protocol))
            .then_with(|| self.family().cmp(&other.family()))
            .then_with(|| self.prefix.addr().cmp(&other.prefix.addr()))
            .then_with(|| port_key(self.ports).cmp(&port_key(other.ports)))
    }
}

fn port_key(p: Ports) -> (u16, u16) {
    match p {
        Ports::All => (0, 0),
        Ports::Range(a, b) => (a, b),
    }
}

impl fmt::Display for Binding {
    /// `tcp:192.0.2.0/24:80`, `udp:[2001:db8::]/64:*`: the directive's own syntax.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix {
            IpNet::V4(n) => write!(f, "{}:{}/{}", self.protocol, n.addr(), n.prefix_len())?,
            IpNet::V6(n) => write!(f, "{}:[{}]/{}", self.protocol, n.addr(), n.prefix_len())?,
        }
        write!(f, ":{}", self.ports)
    }
}

/// One socket of one socket unit: `(unit, family, protocol)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub unit: String,
    pub family: Family,
    pub protocol: Protocol,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.unit, self.family, self.protocol)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str, ports: Ports) -> Binding {
        Binding::new(Protocol::Tcp, s.parse().unwrap(), ports)
    }

    #[test]
    fn precedence_longest_prefix_then_specific_port() {
        let mut v = [
            b("192.0.2.0/24", Ports::All),
            b("192.0.2.4/32", Ports::All),
            b("192.0.2.0/24", Ports::single(443)),
            b("0.0.0.0/0", Ports::single(443)),
        ];
        v.sort_by(Binding::precedence_cmp);
        let shown: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "tcp:192.0.2.4/32:*",
                "tcp:192.0.2.0/24:443",
                "tcp:192.0.2.0/24:*",
                "tcp:0.0.0.0/0:443"
            ]
        );
    }

    #[test]
    fn prefix_is_truncated_and_displayed_in_directive_syntax() {
        let x = Binding::new(
            Protocol::Udp,
            "2001:db8::7/64".parse().unwrap(),
            Ports::Range(1000, 2000),
        );
        assert_eq!(x.to_string(), "udp:[2001:db8::]/64:1000-2000");
    }

    #[test]
    fn ports_overlap() {
        assert!(Ports::Range(1, 5).overlaps(Ports::Range(5, 9)));
        assert!(!Ports::Range(1, 4).overlaps(Ports::Range(5, 9)));
        assert!(Ports::All.overlaps(Ports::single(80)));
        assert_eq!(Ports::Range(10, 19).entries(), 10);
    }
}
