//! Is an address delivered locally? One `RTM_GETROUTE` over rtnetlink, the
//! question `ip route get ADDRESS` asks: sk_lookup only sees traffic the
//! routing table delivers locally, so a bound prefix without a local route
//! receives nothing.

use std::io;
use std::mem::size_of;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const RTA_DST: u16 = 1;
const RTN_LOCAL: u8 = 2;

/// `struct nlmsghdr`, `struct rtmsg` and one `struct rtattr` with the address.
#[repr(C)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    // struct rtmsg
    family: u8,
    dst_len: u8,
    src_len: u8,
    tos: u8,
    table: u8,
    protocol: u8,
    scope: u8,
    rtm_type: u8,
    rtm_flags: u32,
    // struct rtattr + address
    rta_len: u16,
    rta_type: u16,
    addr: [u8; 16],
}

/// Whether the calling thread's network namespace delivers `addr` locally.
pub fn is_local(addr: IpAddr) -> io::Result<bool> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd from socket(2).
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (family, bits, bytes, octets) = match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, 32, 4, {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&a.octets());
            o
        }),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, 128, 16, a.octets()),
    };
    let len = size_of::<Request>() - 16 + bytes;
    let req = Request {
        len: len as u32,
        kind: RTM_GETROUTE,
        flags: NLM_F_REQUEST,
        seq: 1,
        pid: 0,
        family,
        dst_len: bits,
        src_len: 0,
        tos: 0,
        table: 0,
        protocol: 0,
        scope: 0,
        rtm_type: 0,
        rtm_flags: 0,
        rta_len: (4 + bytes) as u16,
        rta_type: RTA_DST,
        addr: octets,
    };
    // SAFETY: req is live for `len` bytes (a prefix of the struct).
    if unsafe { libc::send(fd.as_raw_fd(), (&raw const req).cast(), len, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    // SAFETY: buf is live and sized.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let reply = &buf[..n as usize];
    if reply.len() < 16 {
        return Err(io::Error::other("short rtnetlink reply"));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    match kind {
        RTM_NEWROUTE if reply.len() >= 24 => Ok(reply[16 + 7] == RTN_LOCAL),
        NLMSG_ERROR if reply.len() >= 20 => {
            let errno = -i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            match errno {
                // No route at all: certainly not local.
                libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL => Ok(false),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        }
        other => Err(io::Error::other(format!(
            "unexpected rtnetlink reply type {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_local() {
        assert!(is_local("127.0.0.1".parse().unwrap()).unwrap());
        assert!(is_local("::1".parse().unwrap()).unwrap());
    }
}
