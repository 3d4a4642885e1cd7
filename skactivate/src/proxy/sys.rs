//! The few socket calls the proxy makes that std and tokio do not offer:
//! raw sockets of any family, non-blocking connect, splice, pipes, socket
//! cookies, SO_LINGER resets, TCP_INFO.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A socket address of any family the proxy meets: IP or AF_UNIX (a path or
/// an abstract name, without the leading NUL).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    Ip(SocketAddr),
    Unix(Vec<u8>),
    UnixAbstract(Vec<u8>),
    /// An unnamed AF_UNIX socket, or a family we do not name.
    Other,
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Ip(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "{}", String::from_utf8_lossy(p)),
            Addr::UnixAbstract(p) => write!(f, "@{}", String::from_utf8_lossy(p)),
            Addr::Other => f.write_str("(unnamed)"),
        }
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r.cast_unsigned())
    }
}

/// `struct sockaddr_storage` and its length for `addr`.
pub fn to_raw(addr: &Addr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        Addr::Ip(SocketAddr::V4(a)) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and aligned for it.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        Addr::Ip(SocketAddr::V6(a)) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
        Addr::Unix(path) | Addr::UnixAbstract(path) => {
            // SAFETY: an all-zero sockaddr_un is valid.
            let mut sun: libc::sockaddr_un = unsafe { zeroed() };
            sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
            let off = usize::from(matches!(addr, Addr::UnixAbstract(_)));
            let n = path.len().min(sun.sun_path.len() - 1 - off);
            for (i, b) in path[..n].iter().enumerate() {
                sun.sun_path[off + i] = b.cast_signed();
            }
            // SAFETY: as above, for sockaddr_un.
            unsafe { std::ptr::write((&raw mut ss).cast(), sun) };
            std::mem::offset_of!(libc::sockaddr_un, sun_path) + off + n
        }
        Addr::Other => size_of::<libc::sa_family_t>(),
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "bounded by sockaddr_storage"
    )]
    (ss, len as libc::socklen_t)
}

/// The address in `ss` (as filled in by the kernel, `len` bytes).
pub fn from_raw(ss: &libc::sockaddr_storage, len: libc::socklen_t) -> Addr {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel filled in a sockaddr_in for AF_INET.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const *ss).cast()) };
            Addr::Ip(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel filled in a sockaddr_in6 for AF_INET6.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const *ss).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Addr::Ip(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        libc::AF_UNIX => {
            // SAFETY: the kernel filled in a sockaddr_un for AF_UNIX.
            let sun: libc::sockaddr_un = unsafe { std::ptr::read((&raw const *ss).cast()) };
            let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
            let n = (len as usize).saturating_sub(base).min(sun.sun_path.len());
            let bytes: Vec<u8> = sun.sun_path[..n]
                .iter()
                .map(|b| b.cast_unsigned())
                .collect();
            match bytes.split_first() {
                None => Addr::Other,
                Some((0, rest)) => Addr::UnixAbstract(rest.to_vec()),
                Some(_) => Addr::Unix(bytes.split(|&b| b == 0).next().unwrap_or(&[]).to_vec()),
            }
        }
        _ => Addr::Other,
    }
}

pub fn family(addr: &Addr) -> libc::c_int {
    match addr {
        Addr::Ip(SocketAddr::V4(_)) => libc::AF_INET,
        Addr::Ip(SocketAddr::V6(_)) => libc::AF_INET6,
        _ => libc::AF_UNIX,
    }
}

/// A new non-blocking, close-on-exec socket.
pub fn socket(family: libc::c_int, ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd =
        cvt(unsafe { libc::socket(family, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Start a connect; `Ok(true)` when it completed at once, `Ok(false)` when
/// it is in progress (wait for writability, then [`take_error`]).
pub fn connect(fd: BorrowedFd<'_>, addr: &Addr) -> io::Result<bool> {
    let (ss, len) = to_raw(addr);
    // SAFETY: ss is a valid sockaddr of len bytes.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&raw const ss).cast(), len) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) || e.raw_os_error() == Some(libc::EAGAIN) {
        Ok(false)
    } else {
        Err(e)
    }
}

pub fn bind(fd: BorrowedFd<'_>, addr: &Addr) -> io::Result<()> {
    let (ss, len) = to_raw(addr);
    // SAFETY: ss is a valid sockaddr of len bytes.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&raw const ss).cast(), len) }).map(drop)
}

/// `SO_ERROR`: the outcome of a non-blocking connect.
pub fn take_error(fd: BorrowedFd<'_>) -> io::Result<()> {
    let e: libc::c_int = getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR)?;
    if e == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(e))
    }
}

/// accept4, non-blocking and close-on-exec; the peer's address with it.
pub fn accept(fd: BorrowedFd<'_>) -> io::Result<(OwnedFd, Addr)> {
    // SAFETY: zeroed storage for the kernel to fill.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss/len describe writable storage.
    let r = cvt(unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            (&raw mut ss).cast(),
            &raw mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: a fresh fd we own.
    Ok((unsafe { OwnedFd::from_raw_fd(r) }, from_raw(&ss, len)))
}

pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<Addr> {
    // SAFETY: zeroed storage for the kernel to fill.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss/len describe writable storage.
    cvt(unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut ss).cast(), &raw mut len) })?;
    Ok(from_raw(&ss, len))
}

pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<Addr> {
    // SAFETY: zeroed storage for the kernel to fill.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss/len describe writable storage.
    cvt(unsafe { libc::getpeername(fd.as_raw_fd(), (&raw mut ss).cast(), &raw mut len) })?;
    Ok(from_raw(&ss, len))
}

pub fn getsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<T> {
    // SAFETY: the option types used here are plain integers and C structs.
    let mut v: T = unsafe { zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: v/len describe writable storage of T.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut v).cast(),
            &raw mut len,
        )
    })?;
    Ok(v)
}

pub fn setsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    v: T,
) -> io::Result<()> {
    // SAFETY: v is a readable T.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const v).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The socket's type: SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET.
pub fn sock_type(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE)
}

pub fn is_listening(fd: BorrowedFd<'_>) -> io::Result<bool> {
    getsockopt::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).map(|v| v != 0)
}

/// The socket's cookie: its key in the SOCKHASH.
pub fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// Make the next close send a RST instead of a FIN.
pub fn set_reset_on_close(fd: BorrowedFd<'_>) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, l);
}

pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) }).map(drop)
}

pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain fcntl calls.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    }
    Ok(())
}

pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buf, libc::MSG_DONTWAIT)
}

/// Like [`recv`], but the bytes stay queued (`MSG_PEEK`).
pub fn recv_peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv_flags(fd, buf, libc::MSG_DONTWAIT | libc::MSG_PEEK)
}

fn recv_flags(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: buf is writable for its length.
    cvt_size(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) })
}

pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is readable for its length.
    cvt_size(unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

pub fn recv_from(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Addr)> {
    // SAFETY: zeroed storage for the kernel to fill.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buf, ss and len describe writable storage.
    let n = cvt_size(unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
            (&raw mut ss).cast(),
            &raw mut len,
        )
    })?;
    Ok((n, from_raw(&ss, len)))
}

pub fn send_to(fd: BorrowedFd<'_>, buf: &[u8], to: &Addr) -> io::Result<usize> {
    let (ss, len) = to_raw(to);
    // SAFETY: buf is readable, ss a valid sockaddr of len bytes.
    cvt_size(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            (&raw const ss).cast(),
            len,
        )
    })
}

/// The local address a datagram was sent to, as `IP_PKTINFO` /
/// `IPV6_PKTINFO` give it (an IPv4 datagram on a dual-stack IPv6 socket
/// comes as a v4-mapped IPv6 address), with the interface it came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PktInfo {
    V4(Ipv4Addr),
    V6(Ipv6Addr, u32),
}

impl PktInfo {
    pub fn ip(&self) -> std::net::IpAddr {
        match *self {
            PktInfo::V4(a) => a.into(),
            PktInfo::V6(a, _) => a.to_ipv4_mapped().map_or(a.into(), Into::into),
        }
    }
}

/// Ask for the local address of each datagram received on `fd`
/// (`IP_PKTINFO` on IPv4 sockets, `IPV6_RECVPKTINFO` on IPv6 ones).
pub fn enable_pktinfo(fd: BorrowedFd<'_>) -> io::Result<()> {
    match local_addr(fd)? {
        Addr::Ip(SocketAddr::V4(_)) => {
            setsockopt(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1 as libc::c_int)
        }
        Addr::Ip(SocketAddr::V6(_)) => setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVPKTINFO,
            1 as libc::c_int,
        ),
        _ => Ok(()),
    }
}

/// Room for one `in6_pktinfo` control message (the larger of the two),
/// aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// `recvmsg`: the datagram, its sender, and the local address it was sent
/// to when [`enable_pktinfo`] asked for it.
pub fn recv_pktinfo(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Addr, Option<PktInfo>)> {
    // SAFETY: zeroed storage for the kernel to fill.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut cbuf = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw mut ss).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len();
    // SAFETY: msg describes writable storage that outlives the call.
    let n = cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) })?;
    let mut info = None;
    // SAFETY: walking the control messages the kernel wrote into cbuf,
    // with the CMSG_* accessors; each payload is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let p: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                    info = Some(PktInfo::V4(Ipv4Addr::from(u32::from_be(p.ipi_addr.s_addr))));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let p: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                    info = Some(PktInfo::V6(
                        Ipv6Addr::from(p.ipi6_addr.s6_addr),
                        p.ipi6_ifindex,
                    ));
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((n, from_raw(&ss, msg.msg_namelen), info))
}

/// `sendmsg` to `to`, from the local address `from` (when given) rather
/// than the one routing would pick for a socket bound to a wildcard.
pub fn send_from(
    fd: BorrowedFd<'_>,
    buf: &[u8],
    to: &Addr,
    from: Option<&PktInfo>,
) -> io::Result<usize> {
    let (ss, len) = to_raw(to);
    let mut cbuf = CmsgBuf([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&raw const ss).cast_mut().cast();
    msg.msg_namelen = len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if let Some(from) = from {
        let (level, ty, size) = match from {
            PktInfo::V4(_) => (
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                size_of::<libc::in_pktinfo>(),
            ),
            PktInfo::V6(..) => (
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                size_of::<libc::in6_pktinfo>(),
            ),
        };
        #[expect(clippy::cast_possible_truncation, reason = "a pktinfo struct's size")]
        let size = size as u32;
        // SAFETY: CMSG_SPACE of a small struct fits the 64-byte buffer;
        // the header and payload are written inside it, unaligned-safe.
        unsafe {
            msg.msg_control = cbuf.0.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(size) as usize;
            let c = libc::CMSG_FIRSTHDR(&raw const msg);
            (*c).cmsg_level = level;
            (*c).cmsg_type = ty;
            (*c).cmsg_len = libc::CMSG_LEN(size) as usize;
            let data = libc::CMSG_DATA(c);
            match *from {
                PktInfo::V4(a) => std::ptr::write_unaligned(
                    data.cast(),
                    libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(a).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    },
                ),
                PktInfo::V6(a, ifindex) => std::ptr::write_unaligned(
                    data.cast(),
                    libc::in6_pktinfo {
                        ipi6_addr: libc::in6_addr {
                            s6_addr: a.octets(),
                        },
                        // The interface matters for a link-local address
                        // only; elsewhere routing picks it.
                        ipi6_ifindex: if a.is_unicast_link_local() {
                            ifindex
                        } else {
                            0
                        },
                    },
                ),
            }
        }
    }
    // SAFETY: msg describes readable storage that outlives the call.
    cvt_size(unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &raw const msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// A non-blocking pipe of (at least) `size` bytes: (read end, write end).
pub fn pipe(size: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds is writable for two ints.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
    // SAFETY: fresh fds we own.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A smaller pipe still works (pipe-max-size may be lower for non-root).
    // SAFETY: plain fcntl.
    let _ = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    Ok((r, w))
}

/// splice(2) without blocking.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds we hold.
    cvt_size(unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    })
}

/// `SIOCOUTQ`: bytes in the send queue not yet acknowledged by the peer.
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: TIOCOUTQ == SIOCOUTQ takes an int out-parameter.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut v) })?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// Bytes in the socket's receive queue, not yet read (`SIOCINQ`).
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut v: libc::c_int = 0;
    // SAFETY: FIONREAD == SIOCINQ takes an int out-parameter.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &raw mut v) })?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// `struct tcp_info` up to `tcpi_bytes_received` (Linux ≥ 4.1).
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpInfo {
    head: [u8; 8],
    u32s: [u32; 24],
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

/// Every byte that has entered the socket's send queue since it was made:
/// acknowledged bytes plus those still queued (`SIOCOUTQ`).
pub fn bytes_written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info: TcpInfo = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(info.bytes_acked + outq(fd)?)
}

/// The TCP state (1 is ESTABLISHED) and `tcpi_bytes_acked`, in one call.
pub fn tcp_state_acked(fd: BorrowedFd<'_>) -> io::Result<(u8, u64)> {
    let info: TcpInfo = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok((info.head[0], info.bytes_acked))
}

/// `tcpi_bytes_acked`: bytes the peer has acknowledged.
pub fn bytes_acked(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info: TcpInfo = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(info.bytes_acked)
}

/// `tcpi_bytes_received`: bytes TCP has received in order (each once,
/// however often it was sent).
pub fn bytes_received(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info: TcpInfo = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(info.bytes_received)
}

/// `SO_RCVLOWAT`: setting it makes TCP re-check its receive queue and call
/// the socket's data-ready callback if data waits there.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, v: libc::c_int) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, v)
}

/// A new epoll instance.
pub fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: no pointers; a new fd is ours.
    let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Add `fd` to the epoll instance `ep` (`EPOLL_CTL_ADD`), or change what
/// it is watched for (`EPOLL_CTL_MOD`), with `data` in its events.
pub fn epoll_ctl(
    ep: BorrowedFd<'_>,
    op: libc::c_int,
    fd: BorrowedFd<'_>,
    events: libc::c_int,
    data: u64,
) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: events.cast_unsigned(),
        u64: data,
    };
    // SAFETY: ev is a valid epoll_event for the call's duration.
    cvt(unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd.as_raw_fd(), &raw mut ev) }).map(drop)
}

/// Remove `fd` from the epoll instance `ep`.
pub fn epoll_del(ep: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: ev is valid for the call (EPOLL_CTL_DEL ignores it).
    cvt(unsafe {
        libc::epoll_ctl(
            ep.as_raw_fd(),
            libc::EPOLL_CTL_DEL,
            fd.as_raw_fd(),
            &raw mut ev,
        )
    })
    .map(drop)
}

/// The `data` of the events ready on `ep` now, without waiting.
pub fn epoll_ready(ep: BorrowedFd<'_>, out: &mut Vec<u64>) -> io::Result<()> {
    let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
    loop {
        // SAFETY: evs has room for its length of events.
        let n = cvt(unsafe {
            libc::epoll_wait(
                ep.as_raw_fd(),
                evs.as_mut_ptr(),
                evs.len() as libc::c_int,
                0,
            )
        })?;
        let n = usize::try_from(n).unwrap_or(0);
        out.extend(evs[..n].iter().map(|e| e.u64));
        if n < evs.len() {
            return Ok(());
        }
    }
}

/// The TCP state (`tcpi_state`: 1 is ESTABLISHED).
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    let info: TcpInfo = getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(info.head[0])
}

/// `TCP_REPAIR_QUEUE` values (linux/tcp.h).
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// `TCPOPT_MAXSEG`, the option code `TCP_REPAIR_OPTIONS` takes for the MSS.
const TCPOPT_MAXSEG: u32 = 2;
/// `TCPOPT_WINDOW`: the window scales, ours and the peer's.
const TCPOPT_WINDOW: u32 = 3;
/// The window scale both ends of a repaired pair use.
const REPAIR_WSCALE: u32 = 7;

/// `struct tcp_repair_opt` (linux/tcp.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpRepairOpt {
    opt_code: u32,
    opt_val: u32,
}

/// `struct tcp_repair_window` (linux/tcp.h, Linux 4.8).
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpRepairWindow {
    snd_wl1: u32,
    snd_wnd: u32,
    max_window: u32,
    rcv_wnd: u32,
    rcv_wup: u32,
}

/// `TCP_REPAIR` on or off (needs CAP_NET_ADMIN). In repair mode a socket
/// sends nothing and `connect` makes it established without a handshake.
pub fn set_repair(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    setsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
        libc::c_int::from(on),
    )
}

/// In repair mode, before `connect`: the sequence numbers of the next byte
/// to send and of the next byte to receive.
pub fn set_repair_seqs(fd: BorrowedFd<'_>, send: u32, recv: u32) -> io::Result<()> {
    for (queue, seq) in [(TCP_SEND_QUEUE, send), (TCP_RECV_QUEUE, recv)] {
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, queue)?;
        setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, seq)?;
    }
    Ok(())
}

/// In repair mode, once established: put `bytes` in the socket's receive
/// queue, unread, as received from the peer (advances the next sequence
/// number to receive by their length).
pub fn repair_receive_queue(fd: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<()> {
    setsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        TCP_RECV_QUEUE,
    )?;
    let n = send(fd, bytes)?;
    if n != bytes.len() {
        return Err(io::Error::other(format!(
            "{n} of {} bytes queued",
            bytes.len()
        )));
    }
    Ok(())
}

/// In repair mode, once established: what the peer would have announced,
/// an MSS, a window scale and an open window (`rcv` is the next byte to receive).
pub fn set_repair_peer(fd: BorrowedFd<'_>, mss: u32, window: u32, rcv: u32) -> io::Result<()> {
    let opt = TcpRepairOpt {
        opt_code: TCPOPT_MAXSEG,
        opt_val: mss,
    };
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_OPTIONS, opt)?;
    // connect() chose a window scale for what this socket announces, which
    // the peer would otherwise not apply: it would take a window of 8 KiB
    // for 68 bytes. The same scale both ways, told to both ends.
    let opt = TcpRepairOpt {
        opt_code: TCPOPT_WINDOW,
        opt_val: REPAIR_WSCALE | REPAIR_WSCALE << 16,
    };
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_OPTIONS, opt)?;
    let w = TcpRepairWindow {
        snd_wl1: rcv,
        snd_wnd: window,
        max_window: window,
        rcv_wnd: window,
        rcv_wup: rcv,
    };
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, w)
}
