//! `skactivate register-pid PID`: take the listening sockets of a running
//! process (a daemon that binds its own, the nginx case) and register them.
//!
//! The fds are copied out of the process with `pidfd_open` + `pidfd_getfd`
//! (Linux ≥ 5.6), which needs ptrace access to it (`CAP_SYS_PTRACE`, or the
//! same uid and Yama's consent). Every fd of `/proc/PID/fd` that is a socket is
//! looked at, however sparse the table; kept are listening TCP and bound,
//! unconnected UDP sockets in our own network namespace (the daemon serves
//! each namespace with a dispatcher of its own), one per reuseport group,
//! and of those the ones `--socket` selects. Every other copy is closed at
//! once. The copies share the process's open file description:
//! nothing here changes its file status flags (no `F_SETFL`), so the daemon
//! sees its socket exactly as it left it.
//!
//! The values come from `--sklookup` or from the unit's own `X-SkLookup=`
//! lines (`[Service]` of a service unit, read from the files systemd reports)
//! and are matched to the taken sockets here with the rules a socket unit's
//! `Listen…=` sockets get (so a problem names its file and line). Then the
//! fds go to the daemon, which matches them again, the same way, before it
//! changes anything: with `RegisterSockets` when the values are a service's
//! own (the daemon reads the same files itself, and again on `Reload`),
//! else with `RegisterSocketsWithDirectives` and the values.

use std::fmt;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::binding::{Family, Protocol};
use crate::config::{self, Socket};
use crate::daemon::Bus;
use crate::dbus::{SkactivateProxy, SystemdManagerProxy, SystemdUnitProxy};
use crate::dispatcher::SocketInfo;
use crate::unit::{Severity, SocketUnit};

/// Yama's setting: who may ptrace (and so `pidfd_getfd`) whom.
const YAMA_PTRACE_SCOPE: &str = "/proc/sys/kernel/yama/ptrace_scope";

/// How often `--wait` looks again.
const POLL: Duration = Duration::from_millis(100);

/// `--socket [tcp:|udp:]ADDRESS:PORT`: a local address the process's socket
/// is bound to (as `ss -l` shows it), optionally of one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketSpec {
    pub protocol: Option<Protocol>,
    pub address: SocketAddr,
}

impl FromStr for SocketSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (protocol, rest) = match s.split_once(':') {
            Some(("tcp", rest)) => (Some(Protocol::Tcp), rest),
            Some(("udp", rest)) => (Some(Protocol::Udp), rest),
            _ => (None, s),
        };
        let address = rest.parse::<SocketAddr>().map_err(|_| {
            format!(
                "{s:?}: expected [tcp:|udp:]ADDRESS:PORT, an IPv6 address in brackets \
                 (tcp:0.0.0.0:80, udp:[::]:53)"
            )
        })?;
        Ok(SocketSpec { protocol, address })
    }
}

impl fmt::Display for SocketSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = self.protocol {
            write!(f, "{p}:")?;
        }
        write!(f, "{}", self.address)
    }
}

impl SocketSpec {
    fn selects(&self, info: &SocketInfo) -> bool {
        self.protocol.is_none_or(|p| p == info.protocol)
            && canonical(self.address) == canonical(info.local)
    }
}

/// IPv4-mapped IPv6 addresses compare as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// What `register-pid` was asked to do.
#[derive(Debug, Clone)]
pub struct Request {
    pub pid: i32,
    /// The registration's name; `None`: the process's systemd unit.
    pub unit: Option<String>,
    pub sockets: Vec<SocketSpec>,
    /// Values instead of the unit's own `X-SkLookup=` lines.
    pub sklookup: Vec<String>,
    /// How long to wait for the process to bind what is asked for.
    pub wait: Duration,
}

/// Why `register-pid` stopped. Each names the process.
#[derive(Debug, thiserror::Error)]
pub enum RegisterPidError {
    #[error("no process {pid}")]
    NoSuchProcess { pid: i32 },
    #[error("process {pid} exited while its sockets were being taken")]
    Exited { pid: i32 },
    #[error("not permitted to take fds from process {pid} ({call}): {why}")]
    NotPermitted {
        pid: i32,
        call: &'static str,
        why: String,
    },
    #[error(
        "this kernel has no {call} (Linux >= {since} has it): sockets of a running process cannot be taken"
    )]
    Unsupported {
        call: &'static str,
        since: &'static str,
    },
    #[error("process {pid} has no listening TCP or bound UDP socket in this network namespace{}", seen_list(.seen))]
    NoSocket { pid: i32, seen: Vec<String> },
    #[error("--socket {spec}: process {pid} has no such socket{}", seen_list(.seen))]
    NotFound {
        pid: i32,
        spec: SocketSpec,
        seen: Vec<String>,
    },
    #[error(
        "ambiguous: process {pid} has two {family} {protocol} sockets, {first} and {second}, \
         and a unit takes one per protocol and family; choose with --socket"
    )]
    Ambiguous {
        pid: i32,
        family: Family,
        protocol: Protocol,
        first: SocketAddr,
        second: SocketAddr,
    },
    #[error(
        "process {pid} belongs to no systemd service, socket or scope unit (cgroup {cgroup}): name one with --unit"
    )]
    NoUnit { pid: i32, cgroup: String },
    #[error(
        "{unit}: {}",
        .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    BadDirective {
        unit: String,
        problems: Vec<config::Problem>,
    },
    #[error(
        "{unit}: no X-SkLookup= in force in {} and no --sklookup given",
        .files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NoValues { unit: String, files: Vec<PathBuf> },
    #[error("{what}")]
    Os {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn seen_list(seen: &[String]) -> String {
    if seen.is_empty() {
        String::new()
    } else {
        format!(" (it has: {})", seen.join("; "))
    }
}

impl RegisterPidError {
    /// Whether waiting longer could help: the process may still bind it.
    fn retryable(&self) -> bool {
        matches!(
            self,
            RegisterPidError::NoSocket { .. }
                | RegisterPidError::NotFound { .. }
                | RegisterPidError::BadDirective { .. }
        )
    }
}

/// A socket copied out of the process and kept.
#[derive(Debug)]
pub struct Taken {
    /// Our copy.
    pub fd: OwnedFd,
    /// Its number in the process.
    pub number: RawFd,
    pub info: SocketInfo,
    /// Other members of its reuseport group that were left alone.
    pub siblings: usize,
}

impl fmt::Display for Taken {
    /// `fd 6: tcp 0.0.0.0:80 (and 3 more of its reuseport group)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fd {}: {} {}",
            self.number, self.info.protocol, self.info.local
        )?;
        if self.siblings > 0 {
            write!(f, " (and {} more of its reuseport group)", self.siblings)?;
        }
        Ok(())
    }
}

/// A process, held by a pidfd so that its pid cannot be reused under us.
pub struct Process {
    pub pid: i32,
    pidfd: OwnedFd,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

impl Process {
    pub fn open(pid: i32) -> Result<Process, RegisterPidError> {
        if pid <= 0 {
            return Err(RegisterPidError::NoSuchProcess { pid });
        }
        // SAFETY: pidfd_open(pid, flags) takes no pointers.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(match errno(&e) {
                libc::ESRCH => RegisterPidError::NoSuchProcess { pid },
                libc::ENOSYS => RegisterPidError::Unsupported {
                    call: "pidfd_open",
                    since: "5.3",
                },
                _ => RegisterPidError::Os {
                    what: format!("pidfd_open({pid})"),
                    source: e,
                },
            });
        }
        // SAFETY: the kernel just handed us this fd.
        let pidfd = unsafe { OwnedFd::from_raw_fd(r as RawFd) };
        Ok(Process { pid, pidfd })
    }

    /// Whether the process has exited (its pidfd polls readable then).
    pub fn exited(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, no wait.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0
    }

    fn gone_or(&self, e: RegisterPidError) -> RegisterPidError {
        if self.exited() {
            RegisterPidError::Exited { pid: self.pid }
        } else {
            e
        }
    }

    /// A copy of the process's fd `number`; `None` if it has closed it.
    fn getfd(&self, number: RawFd) -> Result<Option<OwnedFd>, RegisterPidError> {
        // SAFETY: pidfd_getfd(pidfd, targetfd, flags) takes no pointers.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, self.pidfd.as_raw_fd(), number, 0) };
        if r >= 0 {
            // SAFETY: the kernel just handed us this fd (O_CLOEXEC is set).
            return Ok(Some(unsafe { OwnedFd::from_raw_fd(r as RawFd) }));
        }
        let e = io::Error::last_os_error();
        match errno(&e) {
            libc::EBADF => Ok(None),
            libc::ESRCH => Err(RegisterPidError::Exited { pid: self.pid }),
            libc::EPERM | libc::EACCES => Err(self.gone_or(not_permitted(self.pid, "pidfd_getfd"))),
            libc::ENOSYS => Err(RegisterPidError::Unsupported {
                call: "pidfd_getfd",
                since: "5.6",
            }),
            _ => Err(self.gone_or(RegisterPidError::Os {
                what: format!("pidfd_getfd({}, fd {number})", self.pid),
                source: e,
            })),
        }
    }

    /// The numbers of the process's fds that are sockets, in order.
    fn socket_fds(&self) -> Result<Vec<RawFd>, RegisterPidError> {
        let dir = PathBuf::from(format!("/proc/{}/fd", self.pid));
        let entries = fs::read_dir(&dir).map_err(|e| self.proc_error(&dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.proc_error(&dir, e))?;
            let Some(number) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            match fs::read_link(entry.path()) {
                Ok(target)
                    if target
                        .as_os_str()
                        .as_encoded_bytes()
                        .starts_with(b"socket:[") =>
                {
                    out.push(number);
                }
                Ok(_) => {}
                // Closed since the listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.proc_error(&entry.path(), e)),
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn proc_error(&self, path: &Path, e: io::Error) -> RegisterPidError {
        match e.kind() {
            _ if self.exited() => RegisterPidError::Exited { pid: self.pid },
            io::ErrorKind::NotFound => RegisterPidError::Exited { pid: self.pid },
            io::ErrorKind::PermissionDenied => not_permitted(self.pid, "reading /proc/PID/fd"),
            _ => RegisterPidError::Os {
                what: path.display().to_string(),
                source: e,
            },
        }
    }

    /// The systemd unit the process runs in, from its cgroup.
    pub fn unit(&self) -> Result<String, RegisterPidError> {
        let path = PathBuf::from(format!("/proc/{}/cgroup", self.pid));
        let text = fs::read_to_string(&path).map_err(|e| self.proc_error(&path, e))?;
        let cgroup = systemd_cgroup(&text).unwrap_or_default();
        let unit = unit_of_cgroup(&cgroup);
        if self.exited() {
            return Err(RegisterPidError::Exited { pid: self.pid });
        }
        unit.ok_or(RegisterPidError::NoUnit {
            pid: self.pid,
            cgroup: if cgroup.is_empty() {
                "?".into()
            } else {
                cgroup
            },
        })
    }
}

/// "Not permitted", with what would permit it.
fn not_permitted(pid: i32, call: &'static str) -> RegisterPidError {
    let mut why = String::from(
        "taking another process's fds needs CAP_SYS_PTRACE, or the process's own uid while it is dumpable",
    );
    if let Ok(scope) = fs::read_to_string(YAMA_PTRACE_SCOPE) {
        let scope = scope.trim();
        let says = match scope {
            "0" => None,
            "1" => Some("only a process's ancestors may, unless they have CAP_SYS_PTRACE"),
            "2" => Some("only with CAP_SYS_PTRACE"),
            "3" => Some("never (no process may attach, not even root)"),
            _ => Some("an unknown setting"),
        };
        if let Some(says) = says {
            why.push_str(&format!("; Yama's {YAMA_PTRACE_SCOPE} is {scope}: {says}"));
        }
    }
    RegisterPidError::NotPermitted { pid, call, why }
}

/// The cgroup path systemd manages: the unified hierarchy's (`0::`), or the
/// `name=systemd` one on a legacy or hybrid host.
pub fn systemd_cgroup(proc_cgroup: &str) -> Option<String> {
    let mut legacy = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers == "name=systemd" {
            legacy = Some(path.to_owned());
        } else if id == "0" && controllers.is_empty() && path != "/" {
            return Some(path.to_owned());
        }
    }
    legacy
}

/// The unit of a cgroup path: its last component naming a service, socket
/// or scope (`/system.slice/nginx.service` → `nginx.service`; a delegated
/// subtree below it does not hide it). systemd escapes a component that
/// could clash with a kernel file by a leading `_`.
pub fn unit_of_cgroup(path: &str) -> Option<String> {
    path.rsplit('/')
        .map(|c| c.strip_prefix('_').unwrap_or(c))
        .find(|c| {
            [".service", ".socket", ".scope"]
                .iter()
                .any(|s| c.len() > s.len() && c.ends_with(s))
        })
        .map(str::to_owned)
}

/// `(st_dev, st_ino)` of an fd: a namespace's identity.
fn dev_ino(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: an all-zero stat is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is live and sized.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

/// The network namespace of a socket, as `(dev, ino)` (`SIOCGSKNS`).
fn socket_netns(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just handed us this fd.
    let ns = unsafe { OwnedFd::from_raw_fd(r) };
    dev_ino(ns.as_fd())
}

fn getsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<i64> {
    let mut v: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: v and len are live and sized for an int or u64 option.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut v).cast(), &mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if len == 4 {
        i64::from(v as u32 as i32)
    } else {
        v as i64
    })
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the network namespace's cookie, which
/// needs no privilege to read, unlike `SIOCGSKNS`.
fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    getsockopt_int(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE).map(|v| v as u64)
}

/// Our network namespace's cookie, read from a socket made here.
fn own_netns_cookie() -> io::Result<u64> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    netns_cookie(s.as_fd())
}

/// The socket's local address, `None` if it is not IPv4 or IPv6.
fn local_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len are live and sized.
    if unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut storage).cast(), &mut len) } < 0 {
        return None;
    }
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: ss_family says this storage holds a sockaddr_in.
            let sin = unsafe { &*(&raw const storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::new(
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into(),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: ss_family says this storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(&raw const storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::new(
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// What matters about a socket of the process, read without privileges
/// (the dispatcher's `SocketInfo::inspect` also asks `SIOCGSKNS`, which
/// needs `CAP_NET_ADMIN`; the namespace is checked by [`in_netns`]).
/// `None`: not a TCP or UDP socket over IP with an address, none of ours.
fn inspect(fd: BorrowedFd<'_>) -> Option<SocketInfo> {
    let opt = |level, name| getsockopt_int(fd, level, name).ok();
    let family = match opt(libc::SOL_SOCKET, libc::SO_DOMAIN)? {
        d if d == i64::from(libc::AF_INET) => Family::V4,
        d if d == i64::from(libc::AF_INET6) => Family::V6,
        _ => return None,
    };
    let protocol = match (
        opt(libc::SOL_SOCKET, libc::SO_TYPE)?,
        opt(libc::SOL_SOCKET, libc::SO_PROTOCOL)?,
    ) {
        (t, p) if t == i64::from(libc::SOCK_STREAM) && p == i64::from(libc::IPPROTO_TCP) => {
            Protocol::Tcp
        }
        (t, p) if t == i64::from(libc::SOCK_DGRAM) && p == i64::from(libc::IPPROTO_UDP) => {
            Protocol::Udp
        }
        _ => return None,
    };
    let local = local_addr(fd)?;
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: peer and len are live and sized.
    let connected =
        unsafe { libc::getpeername(fd.as_raw_fd(), (&raw mut peer).cast(), &mut len) } == 0;
    let v6only = family == Family::V6 && opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)? != 0;
    let (pktinfo, freebind) = match family {
        Family::V4 => (
            opt(libc::IPPROTO_IP, libc::IP_PKTINFO)? != 0,
            opt(libc::IPPROTO_IP, libc::IP_FREEBIND)? != 0,
        ),
        Family::V6 => (
            opt(libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)? != 0,
            opt(libc::IPPROTO_IPV6, libc::IPV6_FREEBIND)? != 0,
        ),
    };
    Some(SocketInfo {
        family,
        protocol,
        local,
        listening: opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0,
        connected,
        v6only,
        reuseport: opt(libc::SOL_SOCKET, libc::SO_REUSEPORT)? != 0,
        pktinfo,
        freebind,
        cookie: crate::dispatcher::socket::socket_cookie(fd).ok()?,
        netns: 0,
    })
}

/// How a socket of another namespace is shown: `tcp 127.0.0.1:8083` for a
/// listening TCP or bound UDP socket, `None` for anything else.
fn describe_foreign(fd: BorrowedFd<'_>) -> Option<String> {
    let info = inspect(fd)?;
    let ours = match info.protocol {
        Protocol::Tcp => info.listening,
        Protocol::Udp => !info.connected && info.local.port() != 0,
    };
    ours.then(|| format!("{} {}", info.protocol, info.local))
}

/// Whether a socket lives in our network namespace: by device and inode of
/// the namespace `SIOCGSKNS` opens or, where that is refused (it needs
/// `CAP_NET_ADMIN` over the socket's namespace: a caller that is not root),
/// by the namespaces' cookies (`SO_NETNS_COOKIE`, Linux 5.14). `Err`: another
/// namespace, named.
fn in_netns(fd: BorrowedFd<'_>, ours: (u64, u64)) -> Result<(), String> {
    match socket_netns(fd) {
        Ok(ns) if ns == ours => Ok(()),
        Ok((_, ino)) => Err(format!("net:[{ino}]")),
        Err(_) => match (netns_cookie(fd), own_netns_cookie()) {
            (Ok(theirs), Ok(mine)) if theirs == mine => Ok(()),
            (Ok(theirs), Ok(_)) => Err(format!("netns cookie {theirs}")),
            (Err(e), _) | (_, Err(e)) => Err(format!(
                "unknown: neither SIOCGSKNS nor SO_NETNS_COOKIE answers: {e}"
            )),
        },
    }
}

/// Our own network namespace, as `(dev, ino)`.
pub fn own_netns() -> io::Result<(u64, u64)> {
    let f = fs::File::open(crate::paths::SELF_NETNS)?;
    dev_ino(f.as_fd())
}

/// What one look at the process found.
#[derive(Debug, Default)]
pub struct Scan {
    pub kept: Vec<Taken>,
    /// Sockets seen and left, with why (for messages).
    pub left: Vec<String>,
}

/// Copy the process's sockets and keep the ones to register; every other
/// copy is closed before this returns.
pub fn take(
    process: &Process,
    netns: (u64, u64),
    specs: &[SocketSpec],
) -> Result<Scan, RegisterPidError> {
    let mut scan = Scan::default();
    let mut seen_inodes = Vec::new();
    for number in process.socket_fds()? {
        let Some(fd) = process.getfd(number)? else {
            continue;
        };
        // Two fds of one socket (dup()): the first counts.
        let Ok((_, ino)) = dev_ino(fd.as_fd()) else {
            continue;
        };
        if seen_inodes.contains(&ino) {
            continue;
        }
        seen_inodes.push(ino);
        if let Err(which) = in_netns(fd.as_fd(), netns) {
            if let Some(what) = describe_foreign(fd.as_fd()) {
                scan.left.push(format!(
                    "fd {number}: {what} (in another network namespace, {which})"
                ));
            }
            continue;
        }
        let Some(info) = inspect(fd.as_fd()) else {
            continue; // not TCP or UDP over IP: none of ours
        };
        let what = format!("fd {number}: {} {}", info.protocol, info.local);
        match info.protocol {
            Protocol::Tcp if !info.listening => continue, // a connection
            Protocol::Udp if info.connected => {
                scan.left.push(format!("{what} (connected)"));
                continue;
            }
            Protocol::Udp if info.local.port() == 0 => continue,
            _ => {}
        }
        if let Some(first) = scan.kept.iter_mut().find(|t| {
            t.info.reuseport
                && info.reuseport
                && t.info.protocol == info.protocol
                && t.info.local == info.local
        }) {
            first.siblings += 1;
            continue;
        }
        if !specs.is_empty() && !specs.iter().any(|s| s.selects(&info)) {
            scan.left.push(format!("{what} (not selected by --socket)"));
            continue;
        }
        scan.kept.push(Taken {
            fd,
            number,
            info,
            siblings: 0,
        });
    }
    if process.exited() {
        return Err(RegisterPidError::Exited { pid: process.pid });
    }
    let seen = || {
        scan.kept
            .iter()
            .map(|t| format!("fd {}: {} {}", t.number, t.info.protocol, t.info.local))
            .chain(scan.left.iter().cloned())
            .collect::<Vec<_>>()
    };
    for spec in specs {
        if !scan.kept.iter().any(|t| spec.selects(&t.info)) {
            return Err(RegisterPidError::NotFound {
                pid: process.pid,
                spec: *spec,
                seen: seen(),
            });
        }
    }
    if scan.kept.is_empty() {
        return Err(RegisterPidError::NoSocket {
            pid: process.pid,
            seen: seen(),
        });
    }
    for (i, a) in scan.kept.iter().enumerate() {
        if let Some(b) = scan.kept[i + 1..]
            .iter()
            .find(|b| b.info.family == a.info.family && b.info.protocol == a.info.protocol)
        {
            return Err(RegisterPidError::Ambiguous {
                pid: process.pid,
                family: a.info.family,
                protocol: a.info.protocol,
                first: a.info.local,
                second: b.info.local,
            });
        }
    }
    Ok(scan)
}

/// The unit's `X-SkLookup=` lines, from the files systemd reports for it
/// (from the unit search path when systemd cannot be asked).
async fn unit_values(unit: &str) -> Result<SocketUnit> {
    let root = Path::new("/");
    let asked = async {
        let conn = zbus::Connection::system().await?;
        let path = SystemdManagerProxy::new(&conn)
            .await?
            .get_unit(unit)
            .await?;
        let u = SystemdUnitProxy::builder(&conn)
            .path(path)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        Ok::<_, zbus::Error>((u.fragment_path().await?, u.drop_in_paths().await?))
    }
    .await;
    let unit_file = match asked {
        Ok((fragment, dropins)) if !fragment.is_empty() => {
            let dropins: Vec<PathBuf> = dropins.into_iter().map(PathBuf::from).collect();
            SocketUnit::from_paths(root, unit, Path::new(&fragment), &dropins)
        }
        Ok(_) => return Err(anyhow!("{unit}: systemd knows no unit file for it")),
        Err(e) => {
            tracing::debug!("asking systemd about {unit}: {e}; reading the unit search path");
            SocketUnit::find(root, unit)
        }
    };
    unit_file.with_context(|| format!("{unit}: reading its X-SkLookup= lines"))
}

/// Match the values to the taken sockets, as the daemon will.
fn resolve(
    unit: &SocketUnit,
    name: &str,
    kept: &[Taken],
) -> Result<config::Resolution, RegisterPidError> {
    let sockets: Vec<Socket> = kept
        .iter()
        .map(|t| Socket {
            protocol: t.info.protocol,
            address: t.info.local,
            v6only: t.info.v6only,
        })
        .collect();
    let resolution = config::resolve(unit, &sockets);
    if resolution.is_valid() {
        Ok(resolution)
    } else {
        Err(RegisterPidError::BadDirective {
            unit: name.to_owned(),
            problems: resolution
                .problems
                .iter()
                .filter(|p| p.severity >= Severity::Error)
                .cloned()
                .collect(),
        })
    }
}

/// `skactivate register-pid`.
pub fn register_pid(req: &Request, bus: &Bus) -> Result<()> {
    let process = Process::open(req.pid)?;
    let unit = match &req.unit {
        Some(u) => u.clone(),
        None => process.unit()?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let values = if req.sklookup.is_empty() {
        let read = rt.block_on(unit_values(&unit))?;
        if read.sklookup.is_empty() {
            return Err(RegisterPidError::NoValues {
                unit,
                files: read.files().map(Path::to_path_buf).collect(),
            }
            .into());
        }
        for issue in &read.issues {
            eprintln!("warning: {issue}");
        }
        read
    } else {
        SocketUnit::from_sklookup_options(&unit, &req.sklookup)
    };
    // A value that cannot parse will not parse later either.
    let grammar: Vec<config::Problem> = config::resolve(&values, &[])
        .problems
        .into_iter()
        .filter(|p| p.severity >= Severity::Error && p.reason != config::Reason::NoIpSocket)
        .collect();
    if !grammar.is_empty() {
        return Err(RegisterPidError::BadDirective {
            unit,
            problems: grammar,
        }
        .into());
    }

    let netns = own_netns().context("reading our network namespace")?;
    let deadline = Instant::now() + req.wait;
    let (scan, resolution) = loop {
        let attempt = take(&process, netns, &req.sockets)
            .and_then(|scan| resolve(&values, &unit, &scan.kept).map(|r| (scan, r)));
        match attempt {
            Ok(done) => break done,
            Err(e) if e.retryable() && Instant::now() < deadline => {
                std::thread::sleep(POLL);
                if process.exited() {
                    return Err(RegisterPidError::Exited { pid: process.pid }.into());
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    for p in resolution
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Warning)
    {
        eprintln!("warning: {unit}: {p}");
    }

    let wire_values: Vec<&str> = values.sklookup.iter().map(|l| l.value).collect();
    let from_files = req.sklookup.is_empty() && unit.ends_with(".service");
    let fds: Vec<zbus::zvariant::Fd<'_>> = scan
        .kept
        .iter()
        .map(|t| zbus::zvariant::Fd::from(t.fd.as_fd()))
        .collect();
    let (registered, daemon_ns) = rt
        .block_on(async {
            let conn = bus
                .connect()
                .await
                .with_context(|| format!("connecting to the {bus:?} bus"))?;
            let p = SkactivateProxy::new(&conn).await?;
            if process.exited() {
                return Err(RegisterPidError::Exited { pid: process.pid }.into());
            }
            // The daemon serves the namespace the sockets live in, ours
            // (a service's PrivateNetwork= or NetworkNamespacePath= applies
            // to its ExecStartPost=+ too), whichever its own is.
            // Values from a service's own files: the daemon reads them
            // itself (RegisterSockets), so that a reload reads them again.
            let registered = if from_files {
                p.register_sockets(&unit, &fds).await
            } else {
                p.register_sockets_with_directives(&unit, &fds, &wire_values)
                    .await
            }
            .map_err(|e| anyhow!(crate::client::describe(&e)))?;
            Ok::<_, anyhow::Error>((registered, p.net_ns().await.ok()))
        })
        .with_context(|| format!("registering {unit} (sockets of process {})", process.pid))?;
    drop(fds);
    let (sockets, bindings) = registered;
    let elsewhere = match daemon_ns {
        Some(d) if d != netns.1 => format!(
            " in network namespace net:[{}] (the daemon's own is net:[{d}])",
            netns.1
        ),
        _ => String::new(),
    };
    println!(
        "{unit}: registered {sockets} socket(s) of process {}{elsewhere} with {bindings} binding(s)",
        process.pid
    );
    for t in &scan.kept {
        println!("  {t}");
    }
    for r in &resolution.bindings {
        let t = &scan.kept[r.socket];
        println!(
            "  {} -> {} {}  {}",
            r.binding, t.info.protocol, t.info.local, r.location
        );
    }
    // Our copies close here; the map entries live as long as the process's sockets.
    drop(scan);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_specs_parse() {
        let s: SocketSpec = "tcp:0.0.0.0:80".parse().unwrap();
        assert_eq!(s.protocol, Some(Protocol::Tcp));
        assert_eq!(s.address, "0.0.0.0:80".parse().unwrap());
        let s: SocketSpec = "udp:[::]:53".parse().unwrap();
        assert_eq!(s.protocol, Some(Protocol::Udp));
        let s: SocketSpec = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(s.protocol, None);
        assert_eq!(s.to_string(), "[2001:db8::1]:443");
        for bad in [
            "sctp:1.2.3.4:80",
            "1.2.3.4",
            "tcp:1.2.3.4:99999",
            "2001:db8::1:80",
        ] {
            assert!(bad.parse::<SocketSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_unit_is_the_last_unit_component_of_the_cgroup() {
        let v2 = "0::/system.slice/nginx.service\n";
        assert_eq!(
            systemd_cgroup(v2).as_deref(),
            Some("/system.slice/nginx.service")
        );
        assert_eq!(
            unit_of_cgroup("/system.slice/nginx.service").as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            unit_of_cgroup("/system.slice/app.service/payload/sub.scope").as_deref(),
            Some("sub.scope")
        );
        assert_eq!(
            unit_of_cgroup("/system.slice/app.service/payload").as_deref(),
            Some("app.service")
        );
        assert_eq!(
            unit_of_cgroup("/user.slice/user-0.slice/session-2.scope").as_deref(),
            Some("session-2.scope")
        );
        assert_eq!(unit_of_cgroup("/"), None);
        assert_eq!(unit_of_cgroup("/machine.slice"), None);
        let hybrid =
            "12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/x.service\n0::/\n";
        assert_eq!(
            systemd_cgroup(hybrid).as_deref(),
            Some("/system.slice/x.service")
        );
    }

    #[test]
    fn mapped_addresses_select_ipv4_sockets() {
        let spec: SocketSpec = "tcp:[::ffff:127.0.0.1]:80".parse().unwrap();
        assert_eq!(canonical(spec.address), "127.0.0.1:80".parse().unwrap());
    }
}
