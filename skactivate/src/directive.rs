//! The grammar of one `X-SkLookup=` value.
//!
//! ```text
//! X-SkLookup=[tcp:|udp:]ADDRESS[/PREFIXLEN][:PORTS] ...
//! PORTS := * | N | N-M          N in 1-65535
//! ```
//!
//! IPv4 addresses are written bare (`192.0.2.0/24:80`), IPv6 addresses in
//! brackets (`[2001:db8::]/64:443`). Without a prefix length a value means a
//! single host (/32 or /128). Protocol and ports may be left out: the matching
//! in [`crate::config`] fills them in from the unit's sockets.
//!
//! This module knows nothing about files and sockets; it turns text into a
//! [`Value`] or says precisely why it cannot.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::binding::{Family, Ports, Protocol};

/// One parsed `X-SkLookup=` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// `tcp:` or `udp:`; `None` means every socket whose protocol fits.
    pub protocol: Option<Protocol>,
    /// The prefix, host bits zero (a value with host bits set is refused).
    pub prefix: IpNet,
    /// `None` means the port of the socket the value lands on.
    pub ports: Option<Ports>,
    /// The value as written, for messages.
    pub text: String,
}

impl Value {
    pub fn family(&self) -> Family {
        Family::of(&self.prefix.addr())
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Value {
    type Err = DirectiveError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_value(s)
    }
}

/// Why a value is not a valid `X-SkLookup=` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectiveError {
    #[error("empty value")]
    Empty,
    #[error("a comment must be on a line of its own")]
    InlineComment,
    #[error("unknown protocol {protocol:?}: expected tcp or udp")]
    UnknownProtocol { protocol: String },
    #[error("missing address")]
    MissingAddress,
    #[error("\"*\" is not an address: write 0.0.0.0/0 or [::]/0 for every address")]
    AnyAddress,
    #[error("invalid address {address:?}")]
    InvalidAddress { address: String },
    #[error("IPv6 address must be in brackets: [{address}]")]
    UnbracketedIpv6 { address: String },
    #[error("missing \"]\" after IPv6 address")]
    UnclosedBracket,
    #[error("invalid IPv6 address {address:?}")]
    InvalidIpv6 { address: String },
    #[error("IPv4 address must not be in brackets: write {address}")]
    BracketedIpv4 { address: Ipv4Addr },
    #[error("prefix length goes after the brackets: [{address}]/{length}")]
    PrefixInBrackets { address: String, length: String },
    #[error("missing prefix length after \"/\"")]
    MissingPrefixLength,
    #[error("invalid prefix length {text:?}")]
    InvalidPrefixLength { text: String },
    #[error("prefix length {length} is longer than {max}")]
    PrefixTooLong { length: u32, max: u8 },
    #[error("host bits set in {}: the network is {}", show(.given), show(.network))]
    HostBits { given: IpNet, network: IpNet },
    #[error(
        "{} is inside the IPv4-mapped range ::ffff:0:0/96: write the IPv4 form {}",
        show(&IpNet::V6(*.prefix)),
        show(&IpNet::V4(*.ipv4))
    )]
    Ipv4Mapped { prefix: Ipv6Net, ipv4: Ipv4Net },
    #[error("missing port after \":\"")]
    MissingPort,
    #[error("invalid port {text:?}")]
    InvalidPort { text: String },
    #[error("port {port} is out of range 1-65535")]
    PortOutOfRange { port: u64 },
    #[error("invalid port range {text:?}: expected N-M")]
    InvalidPortRange { text: String },
    #[error("port range {first}-{last} is reversed")]
    ReversedRange { first: u16, last: u16 },
    #[error("unexpected {text:?} after the address")]
    Trailing { text: String },
}

/// A value of a list that did not parse, with its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}: {error}")]
pub struct InvalidValue {
    pub text: String,
    #[source]
    pub error: DirectiveError,
}

/// Splits the right-hand side of one `X-SkLookup=` line at whitespace and
/// parses every value; all of them, so that every error can be reported.
/// A word starting with `#` or `;` makes the rest of the line one error:
/// systemd has no comments after a value.
pub fn parse_list(s: &str) -> Vec<Result<Value, InvalidValue>> {
    let mut values = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        if rest.starts_with(['#', ';']) {
            values.push(Err(InvalidValue {
                text: rest.trim_end().to_owned(),
                error: DirectiveError::InlineComment,
            }));
            break;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let text = &rest[..end];
        values.push(parse_value(text).map_err(|error| InvalidValue {
            text: text.to_owned(),
            error,
        }));
        rest = rest[end..].trim_start();
    }
    values
}

/// Parses one value, `[tcp:|udp:]ADDRESS[/PREFIXLEN][:PORTS]`.
pub fn parse_value(text: &str) -> Result<Value, DirectiveError> {
    if text.is_empty() {
        return Err(DirectiveError::Empty);
    }
    let (protocol, rest) = split_protocol(text)?;
    let (addr, rest) = split_address(rest)?;

    let (length, rest) = match rest.strip_prefix('/') {
        Some(after) => {
            let end = after.find(':').unwrap_or(after.len());
            (Some(parse_prefix_length(&after[..end])?), &after[end..])
        }
        None => (None, rest),
    };

    let ports = match rest.strip_prefix(':') {
        Some(ports) => Some(parse_ports(ports)?),
        None if rest.is_empty() => None,
        None => {
            return Err(DirectiveError::Trailing {
                text: rest.to_owned(),
            });
        }
    };

    Ok(Value {
        protocol,
        prefix: make_prefix(addr, length)?,
        ports,
        text: text.to_owned(),
    })
}

/// Takes a leading `tcp:` or `udp:` off, and recognises a protocol-like word
/// that is neither.
fn split_protocol(text: &str) -> Result<(Option<Protocol>, &str), DirectiveError> {
    if let Some(rest) = text.strip_prefix("tcp:") {
        return Ok((Some(Protocol::Tcp), rest));
    }
    if let Some(rest) = text.strip_prefix("udp:") {
        return Ok((Some(Protocol::Udp), rest));
    }
    let Some((head, rest)) = text.split_once(':') else {
        return Ok((None, text));
    };
    // A word followed by an address is a protocol we do not know; a word
    // followed by a port is a host name; a word that is part of an IPv6
    // address (`dead:beef::1`) is left to the address parser.
    let wordlike = head.starts_with(|c: char| c.is_ascii_alphabetic())
        && head.chars().all(|c| c.is_ascii_alphanumeric());
    let portlike = rest
        .chars()
        .all(|c| c.is_ascii_digit() || c == '-' || c == '*');
    if wordlike && !portlike && !looks_like_ipv6(text) {
        return Err(DirectiveError::UnknownProtocol {
            protocol: head.to_owned(),
        });
    }
    Ok((None, text))
}

/// Whether `text` is an unbracketed IPv6 address, possibly followed by a
/// prefix length or a port.
fn looks_like_ipv6(text: &str) -> bool {
    let addr = text.split('/').next().unwrap_or(text);
    addr.parse::<Ipv6Addr>().is_ok()
        || addr
            .rsplit_once(':')
            .is_some_and(|(a, _)| a.parse::<Ipv6Addr>().is_ok())
}

/// Splits the address off; returns what follows it (`/LEN`, `:PORTS` or
/// nothing).
fn split_address(rest: &str) -> Result<(IpAddr, &str), DirectiveError> {
    if let Some(inner) = rest.strip_prefix('[') {
        let close = inner.find(']').ok_or(DirectiveError::UnclosedBracket)?;
        let (inside, after) = (&inner[..close], &inner[close + 1..]);
        if let Some((address, length)) = inside.split_once('/') {
            return Err(DirectiveError::PrefixInBrackets {
                address: address.to_owned(),
                length: length.to_owned(),
            });
        }
        return match inside.parse::<Ipv6Addr>() {
            Ok(a) => Ok((IpAddr::V6(a), after)),
            Err(_) => match inside.parse::<Ipv4Addr>() {
                Ok(address) => Err(DirectiveError::BracketedIpv4 { address }),
                Err(_) if inside.is_empty() => Err(DirectiveError::MissingAddress),
                Err(_) => Err(DirectiveError::InvalidIpv6 {
                    address: inside.to_owned(),
                }),
            },
        };
    }

    let end = rest.find(['/', ':']).unwrap_or(rest.len());
    let head = &rest[..end];
    if let Ok(a) = head.parse::<Ipv4Addr>() {
        return Ok((IpAddr::V4(a), &rest[end..]));
    }
    let before_slash = rest.split('/').next().unwrap_or(rest);
    if before_slash.matches(':').count() >= 2 || looks_like_ipv6(rest) {
        return Err(DirectiveError::UnbracketedIpv6 {
            address: before_slash.to_owned(),
        });
    }
    Err(match head {
        "" => DirectiveError::MissingAddress,
        "*" => DirectiveError::AnyAddress,
        _ => DirectiveError::InvalidAddress {
            address: head.to_owned(),
        },
    })
}

fn parse_prefix_length(text: &str) -> Result<u32, DirectiveError> {
    if text.is_empty() {
        return Err(DirectiveError::MissingPrefixLength);
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DirectiveError::InvalidPrefixLength {
            text: text.to_owned(),
        });
    }
    text.parse()
        .map_err(|_| DirectiveError::InvalidPrefixLength {
            text: text.to_owned(),
        })
}

fn make_prefix(addr: IpAddr, length: Option<u32>) -> Result<IpNet, DirectiveError> {
    let max: u8 = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let length = length.unwrap_or(u32::from(max));
    let Ok(len) = u8::try_from(length) else {
        return Err(DirectiveError::PrefixTooLong { length, max });
    };
    let Ok(given) = IpNet::new(addr, len) else {
        return Err(DirectiveError::PrefixTooLong { length, max });
    };
    let network = given.trunc();
    if network != given {
        return Err(DirectiveError::HostBits { given, network });
    }
    if let IpNet::V6(prefix) = network
        && let Some(ipv4) = ipv4_mapped(prefix)
    {
        return Err(DirectiveError::Ipv4Mapped { prefix, ipv4 });
    }
    Ok(network)
}

/// The IPv4 prefix an IPv6 prefix inside `::ffff:0:0/96` stands for.
fn ipv4_mapped(prefix: Ipv6Net) -> Option<Ipv4Net> {
    let len = prefix.prefix_len().checked_sub(96)?;
    let v4 = prefix.addr().to_ipv4_mapped()?;
    Ipv4Net::new(v4, len).ok()
}

fn parse_ports(text: &str) -> Result<Ports, DirectiveError> {
    match text {
        "" => Err(DirectiveError::MissingPort),
        "*" => Ok(Ports::All),
        _ => match text.split_once('-') {
            None => parse_port(text).map(Ports::single),
            Some((a, b)) if a.is_empty() || b.is_empty() => Err(DirectiveError::InvalidPortRange {
                text: text.to_owned(),
            }),
            Some((a, b)) => {
                let (first, last) = (parse_port(a)?, parse_port(b)?);
                if first > last {
                    return Err(DirectiveError::ReversedRange { first, last });
                }
                Ok(Ports::Range(first, last))
            }
        },
    }
}

fn parse_port(text: &str) -> Result<u16, DirectiveError> {
    let invalid = || DirectiveError::InvalidPort {
        text: text.to_owned(),
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let port: u64 = text.parse().map_err(|_| invalid())?;
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(DirectiveError::PortOutOfRange { port }),
    }
}

/// A prefix in the directive's own syntax: `192.0.2.0/24`, `[2001:db8::]/64`.
pub fn show(prefix: &IpNet) -> String {
    match prefix {
        IpNet::V4(n) => format!("{}/{}", n.addr(), n.prefix_len()),
        IpNet::V6(n) => format!("[{}]/{}", n.addr(), n.prefix_len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use Protocol::{Tcp, Udp};

    fn ok(text: &str) -> (Option<Protocol>, String, Option<Ports>) {
        let v = parse_value(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(v.text, text);
        (v.protocol, show(&v.prefix), v.ports)
    }

    #[test]
    fn valid_values() {
        let r = Ports::Range;
        let one = Ports::single;
        #[rustfmt::skip]
        let table: &[(&str, Option<Protocol>, &str, Option<Ports>)] = &[
            ("192.0.2.0/24:80", None, "192.0.2.0/24", Some(one(80))),
            ("192.0.2.7", None, "192.0.2.7/32", None),
            ("192.0.2.7:*", None, "192.0.2.7/32", Some(Ports::All)),
            ("tcp:192.0.2.0/24", Some(Tcp), "192.0.2.0/24", None),
            ("udp:192.0.2.0/24:53", Some(Udp), "192.0.2.0/24", Some(one(53))),
            ("0.0.0.0/0:443", None, "0.0.0.0/0", Some(one(443))),
            ("192.0.2.0/24:1-65535", None, "192.0.2.0/24", Some(r(1, 65535))),
            ("192.0.2.0/24:80-80", None, "192.0.2.0/24", Some(r(80, 80))),
            ("192.0.2.0/24:08080", None, "192.0.2.0/24", Some(one(8080))),
            ("[2001:db8::]/64:443", None, "[2001:db8::]/64", Some(one(443))),
            ("[2001:db8::1]", None, "[2001:db8::1]/128", None),
            ("[2001:db8::1]:53", None, "[2001:db8::1]/128", Some(one(53))),
            ("udp:[2001:db8::1]/128:53", Some(Udp), "[2001:db8::1]/128", Some(one(53))),
            ("tcp:[::]/0:*", Some(Tcp), "[::]/0", Some(Ports::All)),
            ("[::1]", None, "[::1]/128", None),
            ("[64:ff9b::]/96:80", None, "[64:ff9b::]/96", Some(one(80))),
            ("[::fffe:0:0]/95:80", None, "[::fffe:0:0]/95", Some(one(80))),
        ];
        for (text, protocol, prefix, ports) in table {
            assert_eq!(
                ok(text),
                (*protocol, (*prefix).to_owned(), *ports),
                "{text}"
            );
        }
    }

    #[test]
    fn invalid_values() {
        #[rustfmt::skip]
        let table: &[(&str, &str)] = &[
            ("", "empty value"),
            ("sctp:192.0.2.0/24:80", "unknown protocol \"sctp\": expected tcp or udp"),
            ("TCP:192.0.2.1", "unknown protocol \"TCP\": expected tcp or udp"),
            ("udp6:[::1]:53", "unknown protocol \"udp6\": expected tcp or udp"),
            ("tcp:", "missing address"),
            ("/24:80", "missing address"),
            (":80", "missing address"),
            ("[]:80", "missing address"),
            ("*:80", "\"*\" is not an address: write 0.0.0.0/0 or [::]/0 for every address"),
            ("localhost:80", "invalid address \"localhost\""),
            ("192.0.2.256", "invalid address \"192.0.2.256\""),
            ("192.0.2", "invalid address \"192.0.2\""),
            ("2001:db8::/64:443", "IPv6 address must be in brackets: [2001:db8::]"),
            ("2001:db8::1", "IPv6 address must be in brackets: [2001:db8::1]"),
            ("::1", "IPv6 address must be in brackets: [::1]"),
            ("dead:beef::1", "IPv6 address must be in brackets: [dead:beef::1]"),
            ("tcp:fe80::1:80", "IPv6 address must be in brackets: [fe80::1:80]"),
            ("[2001:db8::1:80", "missing \"]\" after IPv6 address"),
            ("[2001:db8::zz]", "invalid IPv6 address \"2001:db8::zz\""),
            ("[192.0.2.1]:80", "IPv4 address must not be in brackets: write 192.0.2.1"),
            ("[2001:db8::/64]:443", "prefix length goes after the brackets: [2001:db8::]/64"),
            ("192.0.2.0/", "missing prefix length after \"/\""),
            ("192.0.2.0/:80", "missing prefix length after \"/\""),
            ("192.0.2.0/x", "invalid prefix length \"x\""),
            ("192.0.2.0/-1", "invalid prefix length \"-1\""),
            ("192.0.2.0/24/25", "invalid prefix length \"24/25\""),
            ("192.0.2.0/99999999999", "invalid prefix length \"99999999999\""),
            ("192.0.2.0/33:80", "prefix length 33 is longer than 32"),
            ("192.0.2.0/256", "prefix length 256 is longer than 32"),
            ("[2001:db8::]/129", "prefix length 129 is longer than 128"),
            ("192.0.2.1/24:80", "host bits set in 192.0.2.1/24: the network is 192.0.2.0/24"),
            ("[2001:db8::1]/64", "host bits set in [2001:db8::1]/64: the network is [2001:db8::]/64"),
            ("[::ffff:192.0.2.0]/120:80",
             "[::ffff:192.0.2.0]/120 is inside the IPv4-mapped range ::ffff:0:0/96: write the IPv4 form 192.0.2.0/24"),
            ("[::ffff:192.0.2.1]",
             "[::ffff:192.0.2.1]/128 is inside the IPv4-mapped range ::ffff:0:0/96: write the IPv4 form 192.0.2.1/32"),
            ("[::ffff:0:0]/96",
             "[::ffff:0.0.0.0]/96 is inside the IPv4-mapped range ::ffff:0:0/96: write the IPv4 form 0.0.0.0/0"),
            ("192.0.2.1:", "missing port after \":\""),
            ("192.0.2.1:http", "invalid port \"http\""),
            ("192.0.2.1:+80", "invalid port \"+80\""),
            ("192.0.2.1:80:90", "invalid port \"80:90\""),
            ("192.0.2.1:0", "port 0 is out of range 1-65535"),
            ("192.0.2.1:65536", "port 65536 is out of range 1-65535"),
            ("192.0.2.1:99999999999999999999999", "invalid port \"99999999999999999999999\""),
            ("192.0.2.1:80-", "invalid port range \"80-\": expected N-M"),
            ("192.0.2.1:-80", "invalid port range \"-80\": expected N-M"),
            ("192.0.2.1:1-2-3", "invalid port \"2-3\""),
            ("192.0.2.1:0-80", "port 0 is out of range 1-65535"),
            ("192.0.2.1:80-70000", "port 70000 is out of range 1-65535"),
            ("192.0.2.1:90-80", "port range 90-80 is reversed"),
            ("192.0.2.1:*-80", "invalid port \"*\""),
            ("[::1]80", "unexpected \"80\" after the address"),
            ("[::1]/64x", "invalid prefix length \"64x\""),
        ];
        let mut failed = Vec::new();
        for (text, message) in table {
            match parse_value(text) {
                Ok(v) => failed.push(format!("{text}: parsed as {v:?}")),
                Err(e) if e.to_string() != *message => {
                    failed.push(format!("{text}: got {e:?} ({e}), expected {message}"));
                }
                Err(_) => {}
            }
        }
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    }

    /// `ok VALUE` or `err MESSAGE` per word, for comparing lists.
    fn outcomes(parsed: &[Result<Value, InvalidValue>]) -> Vec<String> {
        parsed
            .iter()
            .map(|r| match r {
                Ok(v) => format!("ok {v}"),
                Err(e) => format!("err {e}"),
            })
            .collect()
    }

    #[test]
    fn list_keeps_every_value_and_every_error() {
        let parsed =
            parse_list("  192.0.2.0/24:80\t[2001:db8::]/64:443  192.0.2.0/33 tcp:198.51.100.1:* ");
        assert_eq!(
            outcomes(&parsed),
            [
                "ok 192.0.2.0/24:80",
                "ok [2001:db8::]/64:443",
                "err 192.0.2.0/33: prefix length 33 is longer than 32",
                "ok tcp:198.51.100.1:*",
            ]
        );
        assert!(parse_list(" \t ").is_empty());
        assert_eq!(
            outcomes(&parse_list("192.0.2.1  # the ; web host ")),
            [
                "ok 192.0.2.1",
                "err # the ; web host: a comment must be on a line of its own"
            ]
        );
    }

    #[test]
    fn family_follows_the_address() {
        assert_eq!(parse_value("192.0.2.1").map(|v| v.family()), Ok(Family::V4));
        assert_eq!(parse_value("[::1]").map(|v| v.family()), Ok(Family::V6));
    }
}
