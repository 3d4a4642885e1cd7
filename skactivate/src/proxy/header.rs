//! The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and
//! 2), sent to the backend before any byte of the client's.

use std::net::{IpAddr, SocketAddr};

use super::sys::Addr;

/// `--proxy-protocol v1|v2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl std::str::FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "v1" | "1" => Ok(Version::V1),
            "v2" | "2" => Ok(Version::V2),
            other => Err(format!(
                "{other:?} is not a PROXY protocol version (v1 or v2)"
            )),
        }
    }
}

/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The transport the header describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Stream,
    Datagram,
}

/// Both addresses as one family: an IPv4 address on one side and IPv6 on
/// the other becomes IPv4-mapped IPv6 on both.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (src, dst),
        _ => (v6(src), v6(dst)),
    }
}

/// The client's address as the header's source, and the address it reached
/// (the accepted socket's local address) as its destination. A non-IP client
/// (an AF_UNIX listening socket) gets v1's `UNKNOWN` or v2's `LOCAL`.
pub fn encode(version: Version, transport: Transport, src: &Addr, dst: &Addr) -> Vec<u8> {
    let ips = match (src, dst) {
        (Addr::Ip(s), Addr::Ip(d)) => Some(same_family(*s, *d)),
        _ => None,
    };
    match version {
        Version::V1 => match ips {
            Some((s, d)) => {
                let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
                format!(
                    "PROXY {proto} {} {} {} {}\r\n",
                    s.ip(),
                    d.ip(),
                    s.port(),
                    d.port()
                )
                .into_bytes()
            }
            None => b"PROXY UNKNOWN\r\n".to_vec(),
        },
        Version::V2 => {
            let mut h = V2_SIGNATURE.to_vec();
            let Some((s, d)) = ips else {
                // Version 2, command LOCAL; family UNSPEC, no addresses.
                h.extend_from_slice(&[0x20, 0x00, 0, 0]);
                return h;
            };
            let proto = match transport {
                Transport::Stream => 0x1,
                Transport::Datagram => 0x2,
            };
            // Version 2, command PROXY.
            h.push(0x21);
            match (s.ip(), d.ip()) {
                (IpAddr::V4(si), IpAddr::V4(di)) => {
                    h.push(0x10 | proto);
                    h.extend_from_slice(&12u16.to_be_bytes());
                    h.extend_from_slice(&si.octets());
                    h.extend_from_slice(&di.octets());
                }
                (IpAddr::V6(si), IpAddr::V6(di)) => {
                    h.push(0x20 | proto);
                    h.extend_from_slice(&36u16.to_be_bytes());
                    h.extend_from_slice(&si.octets());
                    h.extend_from_slice(&di.octets());
                }
                _ => unreachable!("same_family made them one family"),
            }
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
            h
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Addr {
        Addr::Ip(s.parse().unwrap())
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        assert_eq!(
            encode(
                Version::V1,
                Transport::Stream,
                &a("192.0.2.1:5000"),
                &a("198.51.100.2:80")
            ),
            b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 80\r\n"
        );
        assert_eq!(
            encode(
                Version::V1,
                Transport::Stream,
                &a("[2001:db8::1]:5000"),
                &a("[2001:db8::2]:443")
            ),
            b"PROXY TCP6 2001:db8::1 2001:db8::2 5000 443\r\n"
        );
        assert_eq!(
            encode(
                Version::V1,
                Transport::Stream,
                &a("192.0.2.1:5000"),
                &a("[2001:db8::2]:443")
            ),
            b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 5000 443\r\n"
        );
        assert_eq!(
            encode(
                Version::V1,
                Transport::Stream,
                &Addr::Other,
                &Addr::Unix(b"/run/x".to_vec())
            ),
            b"PROXY UNKNOWN\r\n"
        );
    }

    #[test]
    fn v2_inet_stream_and_dgram() {
        let h = encode(
            Version::V2,
            Transport::Stream,
            &a("192.0.2.1:5000"),
            &a("198.51.100.2:80"),
        );
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 2, 0x13, 0x88, 0, 80,
        ]);
        assert_eq!(h, want);
        let h = encode(
            Version::V2,
            Transport::Datagram,
            &a("[2001:db8::1]:53"),
            &a("[2001:db8::2]:53"),
        );
        assert_eq!(h[12..16], [0x21, 0x22, 0, 36]);
        assert_eq!(h.len(), 16 + 36);
        let h = encode(Version::V2, Transport::Stream, &Addr::Other, &Addr::Other);
        assert_eq!(h[12..], [0x20, 0x00, 0, 0]);
    }
}
