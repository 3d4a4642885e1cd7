//! `--mode sockmap`: does the sockmap path work on this kernel? Asked of its
//! behaviour, not its version: the same code that serves clients
//! ([`super::relay_pair`]) proxies one connection over a loopback pair, and
//! the bytes must arrive whole and in order:
//!
//! * the program loads and attaches (CAP_BPF, CAP_NET_ADMIN, sk_skb verdict
//!   without a stream parser, SOCKHASH lookups from the program);
//! * bytes the client sent before the connection was armed arrive first;
//! * 2 MiB each way, with the kernel redirecting (its counters say so);
//! * a backend that stops reading until the client can write no more makes
//!   the program stop redirecting (the bound on queued memory) and the
//!   proxy go on in order;
//! * the client's `shutdown(SHUT_WR)`, a FIN in a segment of its own,
//!   reaches the backend as EOF (the FIN handling fixed in Linux 6.4), and
//!   the backend's reply after it still reaches the client, then its EOF;
//! * every step wakes up in time (stuck backlogs, lost wake-ups: a timeout).
//!
//! [`overlap`] then asks what the probe above cannot provoke on demand: a
//! segment that overlaps bytes already received, as a retransmission can.
//! The kernels tried so far hand it to the verdict program whole (see
//! [`super::sockmap`], "Known defect"); the program loaded with CAP_PERFMON
//! cuts the old bytes off, the other one passes them on. Two loopback
//! sockets are made established towards each other with `TCP_REPAIR`
//! (CAP_NET_ADMIN, which the sockmap mode needs anyway), no handshake: the
//! receiver's queue holds bytes [0, 500), unread, and the sender's first
//! segment, bytes [0, 1000), overlaps them. The receiver is proxied as a
//! client is; a short segment follows once the first has gone through, and
//! the backend must get each byte once. `--mode auto` chooses sockmap only
//! where both pass; `--mode sockmap` warns when this one fails.
//!
//! `SKACTIVATE_PROXY_PROBE=fail` in the environment makes the probe fail, to
//! test the fallback; `SKACTIVATE_PROXY_PROBE=ignore-overlap` counts the
//! overlap check as passed (it still runs and is logged), to test what
//! `auto` does on a kernel without the defect, where none is known yet.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use super::sockmap::{Kernel, Loaded};
use super::sys::{self, Addr};
use super::{Fault, Stats};

/// The environment variable that forces the probe to fail (`fail`) or the
/// overlap check to count as passed (`ignore-overlap`).
pub const FORCE_FAIL_ENV: &str = "SKACTIVATE_PROXY_PROBE";

const EARLY: &[u8] = b"early bytes, sent before the connection was armed\n";
const BULK: usize = 2 << 20;
/// Small, so a backend that pauses exceeds it.
const PROBE_LIMIT: u64 = 64 * 1024;
const STEP_TIMEOUT: Duration = Duration::from_secs(3);

/// Deterministic bytes that show reordering and loss.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// The program, loaded; or why not. What the process may not do is asked
/// before bpf(2) is called: a unit whose `SystemCallFilter=` leaves bpf(2)
/// out has seccomp kill the process that calls it. Blocking (the verifier,
/// aya's parse of the kernel's BTF): the proxy runs it on a thread of its
/// own and serves meanwhile.
pub fn load(connections_max: usize) -> Result<Loaded, String> {
    if std::env::var(FORCE_FAIL_ENV).as_deref() == Ok("fail") {
        return Err(format!("forced by {FORCE_FAIL_ENV}=fail"));
    }
    // Without them the load fails anyway: say which.
    if let Some(missing) = crate::dispatcher::missing_capabilities() {
        return Err(format!("sockmap needs {missing}, which this process lacks"));
    }
    bpf_syscall_allowed()?;
    // The program that cuts old bytes off overlapping segments reads
    // kernel memory (bpf_probe_read_kernel): CAP_PERFMON.
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    let eff = crate::dispatcher::effective_capabilities().unwrap_or(0);
    let why_not = if eff & (1 << CAP_PERFMON | 1 << CAP_SYS_ADMIN) == 0 {
        "it needs CAP_PERFMON, which this process lacks".to_owned()
    } else {
        match Loaded::load(true, connections_max) {
            Ok(k) => return Ok(k),
            Err(e) => {
                tracing::info!("the verdict program that trims did not load: {e}");
                format!("it did not load: {e}")
            }
        }
    };
    let mut loaded = Loaded::load(false, connections_max).map_err(|e| e.to_string())?;
    loaded.untrimmed = Some(why_not);
    Ok(loaded)
}

/// Does seccomp let this process call bpf(2)? A child calls it (with no
/// attributes: the kernel answers EINVAL or EFAULT) and is what gets killed
/// if not.
fn bpf_syscall_allowed() -> Result<(), String> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    // SAFETY: the child makes one raw syscall and _exits: nothing that a
    // fork of a threaded process may not do.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: a raw syscall with a null pointer and size 0, then _exit.
        unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, std::ptr::null::<u8>(), 0);
            libc::_exit(0)
        }
    }
    if pid < 0 {
        return Err(format!(
            "fork, to test whether bpf(2) is allowed: {}",
            io::Error::last_os_error()
        ));
    }
    let mut status = 0;
    // SAFETY: waiting for our own child, status is a valid c_int.
    while unsafe { libc::waitpid(pid, &raw mut status, 0) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("waitpid: {e}"));
        }
    }
    if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS {
        return Err(
            "bpf(2) is not allowed: the unit's SystemCallFilter= leaves it out (a \
                    child that called it was killed by SIGSYS); add \"bpf\" to it"
                .into(),
        );
    }
    Ok(())
}

/// Proxy one connection to completion as when serving, with the credit
/// signals served too; or why it did not finish in time.
async fn proxied(
    kernel: &Kernel,
    client: AsyncFd<OwnedFd>,
    backend: AsyncFd<OwnedFd>,
) -> Result<(Result<(), Fault>, Stats), String> {
    let relay = super::relay_pair(
        super::Path::Sockmap(kernel),
        super::sockmap::Credit::fixed(PROBE_LIMIT),
        super::opening::ARM_AT_ONCE,
        client,
        backend,
        b"",
        None,
    );
    let relay = async {
        tokio::select! {
            r = relay => r,
            () = async {
                kernel.wake_events().await;
                std::future::pending::<()>().await;
            } => unreachable!(),
        }
    };
    tokio::time::timeout(STEP_TIMEOUT * 4, relay)
        .await
        .map_err(|_| {
            "the proxied connection did not finish (lost wake-up or stuck queue)".to_owned()
        })
}

/// Does the sockmap path behave (the list at the top)?
pub async fn probe(kernel: &Kernel) -> Result<(), String> {
    let io = |what: &str, e: io::Error| format!("loopback pair: {what}: {e}");
    let front = TcpListener::bind("127.0.0.1:0").map_err(|e| io("bind", e))?;
    let back = TcpListener::bind("127.0.0.1:0").map_err(|e| io("bind", e))?;
    let mut client = TcpStream::connect(front.local_addr().map_err(|e| io("address", e))?)
        .map_err(|e| io("connect", e))?;
    let (accepted, _) = front.accept().map_err(|e| io("accept", e))?;
    client.write_all(EARLY).map_err(|e| io("write", e))?;
    let backend = TcpStream::connect(back.local_addr().map_err(|e| io("address", e))?)
        .map_err(|e| io("connect", e))?;
    let (server, _) = back.accept().map_err(|e| io("accept", e))?;
    let fd = |s: TcpStream| -> Result<AsyncFd<OwnedFd>, String> {
        s.set_nonblocking(true).map_err(|e| io("O_NONBLOCK", e))?;
        super::watch(OwnedFd::from(s)).map_err(|e| io("epoll", e))
    };
    let (accepted, backend) = (fd(accepted)?, fd(backend)?);

    let driver = tokio::task::spawn_blocking(move || drive(client, server));
    let (r, stats) = proxied(kernel, accepted, backend).await?;
    let d = tokio::time::timeout(STEP_TIMEOUT * 4, driver)
        .await
        .map_err(|_| "the test client did not finish".to_owned())?
        .map_err(|e| format!("test client: {e}"))?;
    // The proxy's own failure first: it explains the test client's (a
    // reset, most often).
    r.map_err(|e| format!("the proxied connection failed: {e}"))?;
    d?;
    if stats.redirected[0] == 0 || stats.redirected[1] == 0 {
        return Err(format!(
            "the kernel redirected nothing ({} and {} bytes): every byte went through user space",
            stats.redirected[0], stats.redirected[1]
        ));
    }
    // The early bytes are always passed (the connection is not armed yet):
    // the stalled backend must have made the program pass more than them.
    if stats.passed[0] <= EARLY.len() as u64 {
        return Err(
            "a stalled backend did not stop the redirect (no bound on queued bytes)".into(),
        );
    }
    tracing::debug!("sockmap probe: {stats:?}");
    Ok(())
}

/// The client and the backend of the probe, on blocking sockets.
fn drive(mut client: TcpStream, mut server: TcpStream) -> Result<(), String> {
    let e = |what: &str, e: io::Error| format!("{what}: {e}");
    for s in [&client, &server] {
        s.set_read_timeout(Some(STEP_TIMEOUT))
            .map_err(|x| e("timeout", x))?;
        s.set_write_timeout(Some(STEP_TIMEOUT))
            .map_err(|x| e("timeout", x))?;
    }
    let up = pattern(1, BULK);
    let down = pattern(2, BULK);
    let mut writer = client.try_clone().map_err(|x| e("dup", x))?;
    let up2 = up.clone();
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = written.clone();
    let w = std::thread::spawn(move || -> io::Result<()> {
        for chunk in up2.chunks(64 << 10) {
            writer.write_all(chunk)?;
            progress.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
        // A FIN of its own, not on the last data segment: a bare FIN must
        // not break the connection.
        std::thread::sleep(Duration::from_millis(10));
        writer.shutdown(Shutdown::Write)
    });
    // The backend stalls first: the program must stop redirecting. It
    // stalls until the client can write no more (every queue on the way is
    // full, so the redirect has stopped) or has written everything, at
    // least 20 ms and at most 500; [`probe`] checks that bytes were passed.
    let start = std::time::Instant::now();
    let (mut seen, mut since) = (0, start);
    loop {
        std::thread::sleep(Duration::from_millis(2));
        let n = written.load(std::sync::atomic::Ordering::Relaxed);
        if n != seen {
            (seen, since) = (n, std::time::Instant::now());
        }
        let blocked = since.elapsed() >= Duration::from_millis(10);
        if start.elapsed() >= Duration::from_millis(500)
            || start.elapsed() >= Duration::from_millis(20) && (n == BULK || blocked)
        {
            break;
        }
    }
    let mut got = Vec::with_capacity(EARLY.len() + BULK);
    server
        .read_to_end(&mut got)
        .map_err(|x| e("backend reading up to the client's EOF", x))?;
    w.join()
        .map_err(|_| "writer panicked".to_owned())?
        .map_err(|x| e("client writing", x))?;
    if got.len() != EARLY.len() + BULK
        || &got[..EARLY.len()] != EARLY
        || got[EARLY.len()..] != up[..]
    {
        return Err(format!(
            "client to backend: {} bytes arrived, {} sent, {}",
            got.len(),
            EARLY.len() + BULK,
            if got.starts_with(EARLY) {
                "early bytes first"
            } else {
                "early bytes not first"
            }
        ));
    }
    // Half-close: the reply after the client's EOF.
    server
        .write_all(&down)
        .map_err(|x| e("backend replying after EOF", x))?;
    std::thread::sleep(Duration::from_millis(10));
    server
        .shutdown(Shutdown::Write)
        .map_err(|x| e("backend shutdown", x))?;
    let mut back = Vec::with_capacity(BULK);
    client
        .read_to_end(&mut back)
        .map_err(|x| e("client reading the reply after its own EOF", x))?;
    if back != down {
        return Err(format!(
            "backend to client after half-close: {} bytes arrived, {BULK} sent",
            back.len()
        ));
    }
    Ok(())
}

/// What [`overlap`] found wrong.
#[derive(Debug)]
pub enum Overlap {
    /// The known defect: the segment's old bytes went through again; why
    /// the program did not cut them off.
    Repeated(Option<String>),
    /// The check could not be made, or went wrong otherwise.
    Failed(String),
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Overlap::Repeated(untrimmed) => {
                write!(
                    f,
                    "the kernel handed the verdict program a segment overlapping {OLD} bytes \
                     already received whole, and those bytes went through a second time"
                )?;
                match untrimmed {
                    Some(why) => write!(f, " (the program that cuts them off is not used: {why})"),
                    None => write!(f, " although the program cut them off"),
                }
            }
            Overlap::Failed(why) => write!(f, "the overlapping-segment check failed: {why}"),
        }
    }
}

/// Where the repaired pair's sequence numbers start (any will do).
const SENDER_SEQ: u32 = 0x5ca7_0000;
const RECEIVER_SEQ: u32 = 0x0ac7_0000;
/// The receiver's queue holds the first `OLD` bytes of the sender's first
/// segment, `SEGMENT` bytes long; a segment of `TAIL` bytes follows it.
const OLD: usize = 500;
const SEGMENT: usize = 1000;
/// Fewer than `OLD`: a kernel that counts the old bytes as read twice
/// (its next read would start `OLD` bytes late) loses all of it.
const TAIL: usize = 300;

/// Is a segment that overlaps bytes already received read once through
/// the sockmap path (the top of this file)? The receiver's queue holds
/// bytes [0, OLD), unread; the sender's first segment is [0, SEGMENT), and
/// once the backend has those, [SEGMENT, SEGMENT + TAIL) follows. The
/// backend must get [0, SEGMENT + TAIL), each byte once, and the program
/// must have been handed every byte. The old bytes the program cut off.
pub async fn overlap(kernel: &Kernel) -> Result<u64, Overlap> {
    let failed = |what: &str, e: io::Error| Overlap::Failed(format!("{what}: {e}"));
    let data = pattern(3, SEGMENT + TAIL);
    let (sender, receiver) =
        repaired_pair(&data[..OLD]).map_err(|e| failed("TCP_REPAIR on a loopback pair", e))?;
    let back = TcpListener::bind("127.0.0.1:0").map_err(|e| failed("bind", e))?;
    let proxy_side = TcpStream::connect(back.local_addr().map_err(|e| failed("address", e))?)
        .map_err(|e| failed("connect", e))?;
    let (backend, _) = back.accept().map_err(|e| failed("accept", e))?;
    proxy_side
        .set_nonblocking(true)
        .map_err(|e| failed("O_NONBLOCK", e))?;
    let receiver = super::watch(receiver).map_err(|e| failed("epoll", e))?;
    let proxy_side = super::watch(proxy_side.into()).map_err(|e| failed("epoll", e))?;

    // The backend reads the first segment's worth, says so, reads to EOF
    // (or a reset), then ends its side.
    let (first_read, first_done) = tokio::sync::oneshot::channel();
    let reader = tokio::task::spawn_blocking(move || {
        let mut got = vec![0; SEGMENT];
        let r = backend
            .set_read_timeout(Some(STEP_TIMEOUT))
            .and_then(|()| (&backend).read_exact(&mut got))
            .and_then(|()| {
                let _ = first_read.send(());
                (&backend).read_to_end(&mut got)
            });
        let _ = backend.shutdown(Shutdown::Write);
        (got, r)
    });
    // The segment goes once the relay has armed the connection (its first
    // poll), the tail once the segment has gone through: a tail coming
    // sooner could join the segment in the receive queue.
    let send = async {
        tokio::task::yield_now().await;
        let sent = |n: usize, len: usize| {
            (n == len)
                .then_some(())
                .ok_or_else(|| io::Error::other(format!("sent {n} bytes of {len}")))
        };
        sent(sys::send(sender.as_fd(), &data[..SEGMENT])?, SEGMENT)?;
        if tokio::time::timeout(STEP_TIMEOUT, first_done)
            .await
            .is_ok_and(|r| r.is_ok())
        {
            sent(sys::send(sender.as_fd(), &data[SEGMENT..])?, TAIL)?;
        }
        sys::shutdown_write(sender.as_fd())
    };
    let (relayed, sent) = tokio::join!(proxied(kernel, receiver, proxy_side), send);
    let (r, stats) = relayed.map_err(Overlap::Failed)?;
    let (got, read) = tokio::time::timeout(STEP_TIMEOUT * 2, reader)
        .await
        .map_err(|_| Overlap::Failed("the backend did not finish reading".into()))?
        .map_err(|e| Overlap::Failed(format!("the backend's reader: {e}")))?;
    tracing::debug!(
        "overlap check: {stats:?}, {} bytes to the backend, {r:?}",
        got.len()
    );
    let repeated = [&data[..OLD], &data[..]].concat();
    if r.as_ref().is_err_and(Fault::is_repeated)
        || repeated.starts_with(&got[..]) && got.len() > SEGMENT
    {
        return Err(Overlap::Repeated(kernel.untrimmed.clone()));
    }
    if let Err(f) = r {
        return Err(Overlap::Failed(format!(
            "the proxied connection failed: {f}"
        )));
    }
    sent.map_err(|e| failed("sending the segments", e))?;
    read.map_err(|e| failed("the backend reading", e))?;
    if got != data {
        return Err(Overlap::Failed(format!(
            "{} bytes reached the backend, not the {} sent, once and in order",
            got.len(),
            data.len()
        )));
    }
    // Bytes that went around the program (read before it was attached)
    // prove nothing.
    let handed = stats.redirected[0] + stats.passed[0];
    if handed != data.len() as u64 || stats.redirected[0] == 0 {
        return Err(Overlap::Failed(format!(
            "the program was handed {handed} bytes of {} and redirected {}",
            data.len(),
            stats.redirected[0]
        )));
    }
    Ok(stats.trimmed[0])
}

/// Two TCP sockets on loopback established towards each other without a
/// handshake (`TCP_REPAIR`): the sender's next byte is its byte 0, and the
/// receiver's queue holds `old` as its bytes [0, old.len()), unread (the
/// kernel's way to restore a socket's receive queue), as if the sender had
/// sent them before.
fn repaired_pair(old: &[u8]) -> io::Result<(OwnedFd, OwnedFd)> {
    let loopback = Addr::Ip(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let made = |send: u32, recv: u32| -> io::Result<(OwnedFd, Addr)> {
        let fd = sys::socket(libc::AF_INET, libc::SOCK_STREAM)?;
        sys::set_repair(fd.as_fd(), true)?;
        sys::set_repair_seqs(fd.as_fd(), send, recv)?;
        sys::bind(fd.as_fd(), &loopback)?;
        let at = sys::local_addr(fd.as_fd())?;
        Ok((fd, at))
    };
    let receiver_next =
        SENDER_SEQ.wrapping_add(u32::try_from(old.len()).map_err(io::Error::other)?);
    let (sender, at_sender) = made(SENDER_SEQ, RECEIVER_SEQ)?;
    let (receiver, at_receiver) = made(RECEIVER_SEQ, SENDER_SEQ)?;
    // Both stay in repair mode (silent) until both are established: a
    // segment to a port with no connected socket would be answered with a
    // reset.
    for (fd, peer) in [(&sender, &at_receiver), (&receiver, &at_sender)] {
        if !sys::connect(fd.as_fd(), peer)? {
            return Err(io::Error::other("connect in repair mode did not complete"));
        }
    }
    sys::repair_receive_queue(receiver.as_fd(), old)?;
    sys::set_repair_peer(sender.as_fd(), 16384, 65535, RECEIVER_SEQ)?;
    sys::set_repair_peer(receiver.as_fd(), 16384, 65535, receiver_next)?;
    sys::set_repair(receiver.as_fd(), false)?;
    sys::set_repair(sender.as_fd(), false)?;
    Ok((sender, receiver))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repaired pair's segments are ones TCP takes, and a plain reader
    /// (recv, no program) gets each byte once: the old bytes from the
    /// queue, only the new ones of the overlapping segment, then the tail.
    /// Without that the overlap check could not tell a right kernel from a
    /// wrong one. Needs CAP_NET_ADMIN (run as root, as CI does).
    #[test]
    fn a_plain_reader_gets_an_overlapping_segments_new_bytes_once() {
        let data = pattern(3, SEGMENT + TAIL);
        let (sender, receiver) =
            repaired_pair(&data[..OLD]).expect("TCP_REPAIR (needs CAP_NET_ADMIN)");
        assert_eq!(
            sys::send(sender.as_fd(), &data[..SEGMENT]).unwrap(),
            SEGMENT
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(sys::send(sender.as_fd(), &data[SEGMENT..]).unwrap(), TAIL);
        sys::shutdown_write(sender.as_fd()).unwrap();
        let mut receiver = TcpStream::from(receiver);
        receiver.set_nonblocking(false).unwrap();
        receiver.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
        let mut got = Vec::new();
        receiver.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "each byte once, in order");
    }
}
