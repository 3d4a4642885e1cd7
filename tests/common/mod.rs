//! Test harness: a fresh network namespace and a private bpffs per test, and
//! real echo servers that say which socket answered.
//!
//! `unshare(CLONE_NEWNET)` acts on the calling thread only and `cargo test` runs
//! tests as threads of one process, so each test body runs on a thread of its
//! own that unshares first; threads and processes it starts inherit the netns.
//! Each mount of bpffs is a new instance, so a test's pins vanish with its mount.

#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod systemd;

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, sockopt,
};

/// Every server loop is bounded by this; servers stop when dropped. Generous,
/// because under qemu TCG a thousand connections can take over a minute.
pub const DEADLINE: Duration = Duration::from_secs(600);
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A private bpffs instance mounted on a temporary directory.
pub struct Bpffs {
    pub path: PathBuf,
}

impl Bpffs {
    pub fn mount() -> Bpffs {
        let path = std::env::temp_dir().join(format!(
            "skactivate-test-bpffs-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        nix::mount::mount(
            Some("bpf"),
            &path,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount -t bpf");
        Bpffs { path }
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Why a test cannot run here, or `None`. Only a missing kernel feature counts.
pub fn missing_kernel_feature() -> Option<&'static str> {
    (!skactivate::dispatcher::is_supported())
        .then_some("kernel has no BPF sk_lookup (needs Linux >= 5.9)")
}

/// Run `f` in a fresh network namespace with `lo` up and a private bpffs.
/// Skips (saying why) only when the kernel lacks sk_lookup.
pub fn in_netns<F: FnOnce(&Bpffs) + Send + 'static>(name: &str, f: F) {
    if let Some(why) = missing_kernel_feature() {
        eprintln!("SKIP {name}: {why}");
        return;
    }
    let handle = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): tests run as root");
        run(&["ip", "link", "set", "lo", "up"]);
        let fs = Bpffs::mount();
        f(&fs);
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Run a command, panicking with its stderr if it fails.
pub fn run(argv: &[&str]) {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip route add local PREFIX dev lo`: sk_lookup only sees locally delivered traffic.
pub fn local_route(prefix: &str) {
    if prefix.contains(':') {
        run(&["ip", "-6", "route", "add", "local", prefix, "dev", "lo"]);
    } else {
        run(&["ip", "route", "add", "local", prefix, "dev", "lo"]);
    }
}

/// The path of the calling thread's network namespace (for children).
pub fn thread_netns() -> &'static Path {
    Path::new("/proc/thread-self/ns/net")
}

/// A server that answers `NAME:` followed by what it received.
pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    pub cookie: u64,
    fd: Arc<dyn AsFdSend>,
    stop: Arc<AtomicBool>,
    pub served: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

pub trait AsFdSend: Send + Sync {
    fn borrowed(&self) -> BorrowedFd<'_>;
}
impl AsFdSend for TcpListener {
    fn borrowed(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}
impl AsFdSend for UdpSocket {
    fn borrowed(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

impl Server {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.borrowed()
    }

    /// Stop serving and close every fd of the socket.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn cookie(fd: BorrowedFd<'_>) -> u64 {
    skactivate::dispatcher::socket::socket_cookie(fd).unwrap()
}

/// A TCP echo server on `addr` (`reuseport` for groups).
pub fn tcp_server(name: &str, addr: &str, reuseport: bool) -> Server {
    let addr: SocketAddr = addr.parse().unwrap();
    let domain = if addr.is_ipv4() {
        socket::AddressFamily::Inet
    } else {
        socket::AddressFamily::Inet6
    };
    let fd = socket::socket(
        domain,
        socket::SockType::Stream,
        socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true).unwrap();
    if reuseport {
        socket::setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
    }
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false).unwrap();
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
    socket::listen(&fd, socket::Backlog::new(1024).unwrap()).unwrap();
    let listener = TcpListener::from(fd);
    listener.set_nonblocking(true).unwrap();
    let local = listener.local_addr().unwrap();
    let listener = Arc::new(listener);
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let (l, s, n, tag) = (
        listener.clone(),
        stop.clone(),
        served.clone(),
        name.to_owned(),
    );
    let thread = std::thread::spawn(move || {
        let start = Instant::now();
        while !s.load(Ordering::Relaxed) && start.elapsed() < DEADLINE {
            match l.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    let mut buf = [0u8; 256];
                    if let Ok(k) = c.read(&mut buf) {
                        let mut reply = format!("{tag}:").into_bytes();
                        reply.extend_from_slice(&buf[..k]);
                        let _ = c.write_all(&reply);
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(_) => break,
            }
        }
    });
    Server {
        name: name.to_owned(),
        addr: local,
        cookie: cookie(listener.as_fd()),
        fd: listener,
        stop,
        served,
        thread: Some(thread),
    }
}

/// A UDP echo server on `addr` that answers from the address it was reached
/// at (IP_PKTINFO / IPV6_RECVPKTINFO, as `PassPacketInfo=yes` gives).
pub fn udp_server(name: &str, addr: &str) -> Server {
    let addr: SocketAddr = addr.parse().unwrap();
    let sock = if addr.is_ipv4() {
        UdpSocket::bind(addr).unwrap()
    } else {
        let fd = socket::socket(
            socket::AddressFamily::Inet6,
            socket::SockType::Datagram,
            socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &false).unwrap();
        // IPv6 lets a socket send from an address no interface carries (a
        // prefix reached through a local route) only with IPV6_FREEBIND:
        // what systemd's FreeBind=yes sets. IPv4 accepts local routes as is.
        let on: libc::c_int = 1;
        // SAFETY: a live int option for a live socket.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_FREEBIND,
                (&raw const on).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "IPV6_FREEBIND");
        socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
        UdpSocket::from(fd)
    };
    socket::setsockopt(&sock, sockopt::Ipv4PacketInfo, &true).unwrap();
    if addr.is_ipv6() {
        socket::setsockopt(&sock, sockopt::Ipv6RecvPacketInfo, &true).unwrap();
    }
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let local = sock.local_addr().unwrap();
    let sock = Arc::new(sock);
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let (u, s, n, tag) = (sock.clone(), stop.clone(), served.clone(), name.to_owned());
    let thread = std::thread::spawn(move || {
        let start = Instant::now();
        let mut buf = [0u8; 512];
        let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
        while !s.load(Ordering::Relaxed) && start.elapsed() < DEADLINE {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(msg) = socket::recvmsg::<SockaddrStorage>(
                u.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            ) else {
                continue;
            };
            let (Some(peer), k) = (msg.address, msg.bytes) else {
                continue;
            };
            let mut v4 = None;
            let mut v6 = None;
            for c in msg.cmsgs().unwrap() {
                match c {
                    ControlMessageOwned::Ipv4PacketInfo(p) => v4 = Some(p),
                    ControlMessageOwned::Ipv6PacketInfo(p) => v6 = Some(p),
                    _ => {}
                }
            }
            let mut reply = format!("{tag}:").into_bytes();
            reply.extend_from_slice(&buf[..k]);
            let iov = [IoSlice::new(&reply)];
            let mut info4;
            let info6;
            let cm: Vec<ControlMessage> = if let Some(p) = v4 {
                info4 = p;
                info4.ipi_ifindex = 0;
                info4.ipi_spec_dst = info4.ipi_addr;
                vec![ControlMessage::Ipv4PacketInfo(&info4)]
            } else if let Some(p) = v6 {
                info6 = libc::in6_pktinfo {
                    ipi6_addr: p.ipi6_addr,
                    ipi6_ifindex: 0,
                };
                vec![ControlMessage::Ipv6PacketInfo(&info6)]
            } else {
                vec![]
            };
            if socket::sendmsg(u.as_raw_fd(), &iov, &cm, MsgFlags::empty(), Some(&peer)).is_ok() {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Server {
        name: name.to_owned(),
        addr: local,
        cookie: cookie(sock.as_fd()),
        fd: sock,
        stop,
        served,
        thread: Some(thread),
    }
}

/// Connect to `to`, send a message, return the reply (`NAME:message`).
pub fn tcp_ask(to: SocketAddr) -> std::io::Result<String> {
    let mut c = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    // To a local address, the kernel may pick the destination's own port as
    // the ephemeral port: the socket then connects to itself (TCP
    // simultaneous open; no listener, no sk_lookup involved) and would wait
    // for a reply forever. Another ephemeral port cannot do that.
    for _ in 0..3 {
        if c.local_addr()? != to {
            break;
        }
        c = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    }
    if c.local_addr()? == to {
        return Err(std::io::Error::other(format!(
            "{to}: connected to itself, thrice"
        )));
    }
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    let msg = format!("hello {to}");
    c.write_all(msg.as_bytes())?;
    let mut reply = String::new();
    c.read_to_string(&mut reply)?;
    let name = reply
        .strip_suffix(&msg)
        .and_then(|r| r.strip_suffix(':'))
        .ok_or_else(|| std::io::Error::other(format!("reply {reply:?} does not echo {msg:?}")))?;
    Ok(name.to_owned())
}

/// Like [`tcp_ask`] with a short connect timeout, for probes expected to
/// fail: true when no server took the connection. A socket that connected
/// to itself (the kernel picked `to`'s own port as the ephemeral port, see
/// [`tcp_ask`]) says nothing either way: its SYN met the socket itself
/// before any listener lookup, so neither a listener nor a program was
/// asked. It connects again, as [`tcp_ask`] does.
pub fn tcp_refused(to: SocketAddr) -> bool {
    for _ in 0..3 {
        match TcpStream::connect_timeout(&to, Duration::from_millis(300)) {
            Err(_) => return true,
            Ok(c) if c.local_addr().is_ok_and(|local| local == to) => continue,
            Ok(_) => return false,
        }
    }
    panic!("{to}: connected to itself, thrice");
}

/// Send a datagram from a connected UDP socket (so only a reply from `to`
/// itself is accepted) and return the answering server's name.
pub fn udp_ask(to: SocketAddr) -> std::io::Result<String> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let c = UdpSocket::bind(any)?;
    c.connect(to)?;
    c.set_read_timeout(Some(Duration::from_millis(500)))?;
    let msg = format!("hello {to}");
    let mut buf = [0u8; 512];
    for _ in 0..3 {
        c.send(msg.as_bytes())?;
        if let Ok(k) = c.recv(&mut buf) {
            let reply = String::from_utf8_lossy(&buf[..k]).into_owned();
            let name = reply
                .strip_suffix(&msg)
                .and_then(|r| r.strip_suffix(':'))
                .ok_or_else(|| {
                    std::io::Error::other(format!("reply {reply:?} does not echo {msg:?}"))
                })?;
            return Ok(name.to_owned());
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no UDP reply from {to}"),
    ))
}

pub fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// What the shipped units/skactivate.service grants the daemon: the
/// capabilities of `CapabilityBoundingSet=` (as numbers) and `LimitMEMLOCK=`
/// in bytes (`None`: infinity), read from the file itself.
pub fn shipped_unit_limits() -> (Vec<(String, u32)>, Option<u64>) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../units/skactivate.service");
    let unit = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let value = |key: &str| {
        let mut v = unit
            .lines()
            .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
            .map(str::trim);
        let first = v.next().unwrap_or_else(|| panic!("{path}: no {key}="));
        assert!(v.next().is_none(), "{path}: {key}= given twice");
        first.to_owned()
    };
    let caps = value("CapabilityBoundingSet")
        .split_whitespace()
        .map(|name| {
            let n = match name {
                "CAP_NET_ADMIN" => 12,
                "CAP_SYS_ADMIN" => 21,
                "CAP_SYS_RESOURCE" => 24,
                "CAP_PERFMON" => 38,
                "CAP_BPF" => 39,
                other => panic!("{path}: capability {other} unknown to this test"),
            };
            (name.to_owned(), n)
        })
        .collect();
    let memlock = value("LimitMEMLOCK");
    let bytes = if memlock == "infinity" {
        None
    } else {
        let (num, unit) = memlock.split_at(
            memlock
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(memlock.len()),
        );
        let mult: u64 = match unit {
            "" => 1,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            other => panic!("{path}: LimitMEMLOCK={memlock}: unit {other} unknown to this test"),
        };
        Some(num.parse::<u64>().unwrap() * mult)
    };
    (caps, bytes)
}

/// capset(2): the calling thread's effective and permitted sets become
/// exactly `caps` (credentials are per thread; the test runs on this one).
pub fn keep_only_capabilities(caps: &[u32]) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut data = [Data::default(); 2];
    for &c in caps {
        let d = &mut data[(c / 32) as usize];
        d.effective |= 1 << (c % 32);
        d.permitted |= 1 << (c % 32);
    }
    let mut header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    // SAFETY: _LINUX_CAPABILITY_VERSION_3 header and two data structs.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    let mask = caps.iter().fold(0u64, |m, &c| m | 1 << c);
    assert!(eff.ends_with(&format!("{mask:016x}")), "{eff}");
}
