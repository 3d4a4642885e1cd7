//! What a socket fd is: asked of the kernel with getsockopt and friends, so the
//! dispatcher only ever stores sockets that `bpf_sk_assign` can use.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::binding::{Family, Protocol};

/// `SO_COOKIE` (asm-generic/socket.h).
const SO_COOKIE: libc::c_int = 57;
/// `SIOCGSKNS` (linux/sockios.h): an fd for the socket's network namespace.
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// The facts about a socket that registration checks.
#[derive(Debug, Clone)]
pub struct SocketInfo {
    pub family: Family,
    pub protocol: Protocol,
    pub local: SocketAddr,
    /// TCP: `listen()` was called.
    pub listening: bool,
    /// UDP: `connect()` was called (such a socket cannot take new flows).
    pub connected: bool,
    /// IPv6 only; `false` for a dual-stack IPv6 socket and for IPv4.
    pub v6only: bool,
    pub reuseport: bool,
    /// UDP: the socket learns each datagram's destination address
    /// (`IP_PKTINFO`, `IPV6_RECVPKTINFO`: systemd's `PassPacketInfo=yes`),
    /// so it can answer from the address it was reached at.
    pub pktinfo: bool,
    /// `IP_FREEBIND`/`IPV6_FREEBIND` (`FreeBind=yes`): over IPv6 the kernel
    /// lets a socket answer from an address no interface carries only so.
    pub freebind: bool,
    pub cookie: u64,
    /// Inode of the socket's network namespace.
    pub netns: u64,
}

fn getsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are live and sized for an int option.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut v).cast(), &mut len) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: v and len are live and sized for SO_COOKIE's u64.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

/// The socket's cookie, as `bpf_sk_assign` reports it in a test run.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    cookie(fd)
}

fn sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: ss_family says this storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in =
                unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: ss_family says this storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::new(
                IpAddr::V6(ip),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

fn local_addr(fd: BorrowedFd<'_>) -> io::Result<Option<SocketAddr>> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len are live and sized.
    let r = unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut storage).cast(), &mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sockaddr(&storage))
}

fn has_peer(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len are live and sized.
    let r = unsafe { libc::getpeername(fd.as_raw_fd(), (&raw mut storage).cast(), &mut len) };
    if r == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        e => Err(e),
    }
}

/// The inode of the network namespace a socket lives in.
pub fn socket_netns(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let ns = socket_netns_fd(fd)?;
    fd_inode(ns.as_raw_fd())
}

/// An fd for the network namespace a socket lives in (`SIOCGSKNS`; needs
/// CAP_NET_ADMIN over that namespace). Holding it keeps the namespace alive.
pub fn socket_netns_fd(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just handed us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// `st_ino` of an fd (for a namespace fd: the namespace's id).
pub fn fd_inode(fd: i32) -> io::Result<u64> {
    // SAFETY: an all-zero stat is valid.
    let mut st: libc::stat = unsafe { zeroed() };
    // SAFETY: st is live and sized.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_ino)
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("not a socket")]
    NotASocket,
    #[error("not an IPv4 or IPv6 socket")]
    NotInet,
    #[error("neither a TCP stream nor a UDP datagram socket")]
    NotTcpOrUdp,
    #[error("socket is not bound to an address")]
    Unbound,
    #[error("{call}")]
    Os {
        call: &'static str,
        #[source]
        source: io::Error,
    },
}

fn os(call: &'static str) -> impl FnOnce(io::Error) -> InspectError {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOTSOCK) {
            InspectError::NotASocket
        } else {
            InspectError::Os { call, source }
        }
    }
}

impl SocketInfo {
    pub fn inspect(fd: BorrowedFd<'_>) -> Result<SocketInfo, InspectError> {
        let domain =
            getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(os("SO_DOMAIN"))?;
        let family = u8::try_from(domain)
            .ok()
            .and_then(Family::from_af)
            .ok_or(InspectError::NotInet)?;
        let ty = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(os("SO_TYPE"))?;
        let proto =
            getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).map_err(os("SO_PROTOCOL"))?;
        let protocol = match (ty, proto) {
            (libc::SOCK_STREAM, libc::IPPROTO_TCP) => Protocol::Tcp,
            (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => Protocol::Udp,
            _ => return Err(InspectError::NotTcpOrUdp),
        };
        let local = local_addr(fd)
            .map_err(os("getsockname"))?
            .ok_or(InspectError::Unbound)?;
        let listening = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
            .map_err(os("SO_ACCEPTCONN"))?
            != 0;
        let connected = has_peer(fd).map_err(os("getpeername"))?;
        let v6only = family == Family::V6
            && getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)
                .map_err(os("IPV6_V6ONLY"))?
                != 0;
        let reuseport = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT)
            .map_err(os("SO_REUSEPORT"))?
            != 0;
        let (pktinfo, freebind) = match family {
            Family::V4 => (
                getsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO).map_err(os("IP_PKTINFO"))?
                    != 0,
                getsockopt_int(fd, libc::IPPROTO_IP, libc::IP_FREEBIND)
                    .map_err(os("IP_FREEBIND"))?
                    != 0,
            ),
            // A dual-stack socket needs both: IPv4 datagrams report through IP_PKTINFO.
            Family::V6 => (
                getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
                    .map_err(os("IPV6_RECVPKTINFO"))?
                    != 0
                    && (v6only
                        || getsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO)
                            .map_err(os("IP_PKTINFO"))?
                            != 0),
                getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_FREEBIND)
                    .map_err(os("IPV6_FREEBIND"))?
                    != 0,
            ),
        };
        Ok(SocketInfo {
            family,
            protocol,
            local,
            listening,
            connected,
            v6only,
            reuseport,
            pktinfo,
            freebind,
            cookie: cookie(fd).map_err(os("SO_COOKIE"))?,
            netns: socket_netns(fd).map_err(os("SIOCGSKNS"))?,
        })
    }

    /// Whether the socket can carry traffic of `family`: its own, or IPv4 into a
    /// dual-stack IPv6 socket.
    pub fn takes(&self, family: Family) -> bool {
        self.family == family || (self.family == Family::V6 && family == Family::V4 && !self.v6only)
    }
}
