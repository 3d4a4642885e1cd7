//! `skactivate proxy` with real sockets: each test runs in a fresh network
//! namespace, hands the proxy its listening sockets as systemd does
//! (`LISTEN_FDS`, `LISTEN_PID`), reads its `sd_notify` messages on a socket
//! of its own (`NOTIFY_SOCKET`), and talks through it to test backends on
//! loopback. Every behaviour is checked in both modes, sockmap and splice.
//! The last test runs the proxy socket-activated under a real systemd.

mod common;

use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::in_netns;
use common::systemd::{ADMIN_UNITS, SETTLE, Systemd, http_get, http_get_padded, poll_until};

/// Every read and write of a test is bounded by this.
const T: Duration = Duration::from_secs(15);

const MODES: [&str; 2] = ["sockmap", "splice"];

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// FNV-1a, to compare long streams by digest.
#[derive(Clone, Copy)]
struct Digest(u64);

impl Digest {
    fn new() -> Digest {
        Digest(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn of(data: &[u8]) -> u64 {
        let mut d = Digest::new();
        d.update(data);
        d.0
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    skactivate::proxy::probe::pattern(seed, len)
}

fn timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(T)).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
}

/// A running `skactivate proxy`, with its notify socket.
struct Proxy {
    child: Child,
    notify: UnixDatagram,
    notify_path: PathBuf,
    status: String,
    ready: bool,
}

impl Proxy {
    /// Start the proxy on `sockets` (they become fds 3, 4, …) with `args`,
    /// and wait for READY=1.
    fn start(args: &[&str], sockets: &[&dyn AsRawFd], env: &[(&str, &str)]) -> Proxy {
        Proxy::start_under(&[], args, sockets, env)
    }

    /// [`Proxy::start`], run by the command `under` (e.g. `setpriv` with
    /// its arguments), which must exec it in the same process.
    fn start_under(
        under: &[&str],
        args: &[&str],
        sockets: &[&dyn AsRawFd],
        env: &[(&str, &str)],
    ) -> Proxy {
        let mut p = Proxy::spawn_under(under, args, sockets, env);
        p.wait_ready(args);
        p
    }

    /// [`Proxy::start_under`] without waiting for READY=1.
    fn spawn_under(
        under: &[&str],
        args: &[&str],
        sockets: &[&dyn AsRawFd],
        env: &[(&str, &str)],
    ) -> Proxy {
        let notify_path = std::env::temp_dir().join(format!(
            "skactivate-proxy-test-{}-{}.notify",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let fds: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ exec "$@""#)
            .arg("sh")
            .args(under)
            .arg(env!("CARGO_BIN_EXE_skactivate"))
            .arg("proxy")
            .args(args)
            .env("LISTEN_FDS", fds.len().to_string())
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("INVOCATION_ID")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Move them above the target range first, then into place.
                let high: Vec<i32> = fds
                    .iter()
                    .map(|&fd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100))
                    .collect();
                for (i, &fd) in high.iter().enumerate() {
                    let to = 3 + i32::try_from(i).unwrap();
                    if libc::dup2(fd, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::fcntl(to, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawning skactivate proxy");
        Proxy {
            child,
            notify,
            notify_path,
            status: String::new(),
            ready: false,
        }
    }

    /// Wait (bounded) for READY=1.
    fn wait_ready(&mut self, args: &[&str]) {
        let start = Instant::now();
        while !self.ready {
            self.read_notify();
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("skactivate proxy {args:?} exited before READY=1: {st}");
            }
            assert!(
                start.elapsed() < T,
                "no READY=1 from skactivate proxy {args:?}"
            );
        }
    }

    fn read_notify(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            self.take(&buf[..n]);
            self.notify
                .set_read_timeout(Some(Duration::from_millis(10)))
                .unwrap();
        }
        self.notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
    }

    fn take(&mut self, datagram: &[u8]) {
        for line in String::from_utf8_lossy(datagram).lines() {
            if line == "READY=1" {
                self.ready = true;
            } else if let Some(s) = line.strip_prefix("STATUS=") {
                s.clone_into(&mut self.status);
            }
        }
    }

    /// Whether READY=1 has come, without waiting for it.
    fn ready_yet(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        self.notify.set_nonblocking(true).unwrap();
        while let Ok(n) = self.notify.recv(&mut buf) {
            self.take(&buf[..n]);
        }
        self.notify.set_nonblocking(false).unwrap();
        self.ready
    }

    /// The latest STATUS=.
    fn status(&mut self) -> String {
        self.read_notify();
        self.status.clone()
    }

    /// Wait (bounded) until STATUS= satisfies `f`.
    fn wait_status(&mut self, f: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            assert!(
                start.elapsed() < T,
                "STATUS= never as expected; last: {s:?}"
            );
        }
    }

    /// Wait (bounded) for the process to exit on its own.
    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.notify_path);
    }
}

/// The proxy in `mode` in front of `target`, on a fresh 127.0.0.1 port.
fn proxy(mode: &str, target: SocketAddr, extra: &[&str]) -> (Proxy, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = target.to_string();
    let mut args = vec!["--mode", mode];
    args.extend_from_slice(extra);
    args.push(&t);
    let mut p = Proxy::start(&args, &[&listener], &[]);
    let st = p.status();
    assert!(
        st.starts_with(&format!("mode {mode} ")),
        "asked for {mode}, STATUS={st:?}"
    );
    (p, addr)
}

/// A backend on 127.0.0.1 that runs `serve` on each connection in a thread
/// of its own, and counts the connections.
struct Backend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

fn backend(serve: fn(TcpStream)) -> Backend {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let acc = accepted.clone();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            acc.fetch_add(1, Ordering::SeqCst);
            timeouts(&c);
            thread::spawn(move || serve(c));
        }
    });
    Backend { addr, accepted }
}

/// Echo until EOF, then EOF.
fn echo(mut c: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = c.shutdown(Shutdown::Write);
}

/// Read the request to EOF (its first 8 bytes say how long a reply to
/// send), then answer its length and digest and the reply, then EOF: the
/// reply comes after the client's half-close.
fn digest_then_reply(mut c: TcpStream) {
    let mut want = [0u8; 8];
    if c.read_exact(&mut want).is_err() {
        return;
    }
    let mut len = 0u64;
    let mut d = Digest::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                len += n as u64;
                d.update(&buf[..n]);
            }
            Err(_) => return,
        }
    }
    let reply_len = usize::try_from(u64::from_le_bytes(want)).unwrap();
    let _ = c.write_all(&len.to_le_bytes());
    let _ = c.write_all(&d.0.to_le_bytes());
    let _ = c.write_all(&pattern(7, reply_len));
    let _ = c.shutdown(Shutdown::Write);
}

/// Send `up` bytes (after the reply length), shut down, read the reply:
/// returns (length the backend saw, its digest, the reply).
fn request(to: SocketAddr, up: &[u8], reply_len: usize) -> (u64, u64, Vec<u8>) {
    let mut c = TcpStream::connect(to).unwrap();
    timeouts(&c);
    c.write_all(&(reply_len as u64).to_le_bytes()).unwrap();
    c.write_all(up).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut head = [0u8; 16];
    c.read_exact(&mut head).unwrap();
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    (
        u64::from_le_bytes(head[..8].try_into().unwrap()),
        u64::from_le_bytes(head[8..].try_into().unwrap()),
        reply,
    )
}

/// The first bytes of an echo, sent and echoed back before the rest: more
/// than the proxy copies before it arms a connection, and then a pause in
/// both directions, where it arms it. (A duplex flow that never pauses may
/// be left to splice instead, see opening.rs; on too slow a machine, such
/// as a qemu guest without KVM, one stayed on the copying path to its end
/// before the opening's settling reads were all counted.)
const ECHO_FIRST: usize = 128 * 1024;

/// Full duplex: write `data` from one thread while reading the echo (after
/// [`ECHO_FIRST`] bytes sent and echoed alone); the client's FIN only once
/// the whole echo is back, so that the connection is still open when the
/// proxy arms it (a socket that has received a FIN cannot join a SOCKHASH,
/// and the rest is spliced).
fn echo_through(to: SocketAddr, data: &Arc<Vec<u8>>) -> Vec<u8> {
    let mut c = TcpStream::connect(to).unwrap();
    timeouts(&c);
    let first = ECHO_FIRST.min(data.len());
    c.write_all(&data[..first]).unwrap();
    let mut got = vec![0u8; data.len()];
    c.read_exact(&mut got[..first]).unwrap();
    let mut w = c.try_clone().unwrap();
    let d = data.clone();
    let writer = thread::spawn(move || w.write_all(&d[first..]).unwrap());
    (&c).read_exact(&mut got[first..]).unwrap();
    writer.join().unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let n = (&c).read_to_end(&mut got).unwrap();
    assert_eq!(n, 0, "more bytes than were sent");
    got
}

/// As [`echo_through`], but where the proxy may reset the connection: its
/// program cannot cut old bytes off an overlapping segment on a kernel that
/// repeats them, and a retransmission (loopback across two CPUs has them)
/// then makes the proxy reset the connection rather than pass the repeated
/// bytes on (skactivate-proxy(8), MODES). What arrives is then either every
/// byte, or a reset.
fn echo_whole_or_reset(to: SocketAddr, data: &Arc<Vec<u8>>) {
    let mut c = TcpStream::connect(to).unwrap();
    timeouts(&c);
    let first = ECHO_FIRST.min(data.len());
    let mut got = vec![0u8; data.len()];
    let r = c
        .write_all(&data[..first])
        .and_then(|()| c.read_exact(&mut got[..first]))
        .and_then(|()| {
            let mut w = c.try_clone()?;
            let d = data.clone();
            let writer = thread::spawn(move || w.write_all(&d[first..]));
            let read = (&c).read_exact(&mut got[first..]).and_then(|()| {
                c.shutdown(Shutdown::Write)?;
                let mut more = Vec::new();
                (&c).read_to_end(&mut more)?;
                got.extend(more);
                Ok(())
            });
            let wrote = writer.join().unwrap();
            read.and(wrote)
        });
    match r {
        Ok(()) => assert!(
            got == **data,
            "{} of {} bytes back, not whole",
            got.len(),
            data.len()
        ),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
            eprintln!(
                "reset after {} of {} bytes back: the kernel repeated bytes (see the proxy's error)",
                got.len(),
                data.len()
            );
        }
    }
}

/// `STATUS=` says how many bytes the kernel redirected; in sockmap mode it
/// must have done the work.
fn assert_kernel_moved(p: &mut Proxy, mode: &str) {
    if mode != "sockmap" {
        return;
    }
    let st = p.wait_status(|s| redirected(s) > 0);
    assert!(redirected(&st) > 0, "{st}");
}

fn redirected(status: &str) -> u64 {
    status_count(status, " bytes redirected")
}

fn copied(status: &str) -> u64 {
    status_count(status, " bytes copied")
}

fn spliced(status: &str) -> u64 {
    status_count(status, " bytes spliced")
}

/// The number before `what` in `STATUS=`, or 0.
fn status_count(status: &str, what: &str) -> u64 {
    status
        .split([';', ','])
        .find_map(|part| part.trim().strip_suffix(what)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn large_transfers_both_ways_arrive_whole() {
    for mode in MODES {
        in_netns(&format!("large transfers ({mode})"), move |_| {
            let echoes = backend(echo);
            let replies = backend(digest_then_reply);
            let (mut p, e) = proxy(mode, echoes.addr, &[]);
            let (mut p2, r) = proxy(mode, replies.addr, &[]);
            // 32 MiB each way at once (full duplex) ...
            let data = Arc::new(pattern(1, 32 << 20));
            let d2 = data.clone();
            let duplex = thread::spawn(move || echo_through(e, &d2));
            // ... and 16 MiB up, then 24 MiB down after the client's EOF.
            let up = pattern(2, 16 << 20);
            let (len, digest, reply) = request(r, &up, 24 << 20);
            assert_eq!(len, up.len() as u64, "{mode}: bytes the backend saw");
            assert_eq!(digest, Digest::of(&up), "{mode}: digest the backend saw");
            assert_eq!(reply.len(), 24 << 20, "{mode}: reply length");
            assert_eq!(
                Digest::of(&reply),
                Digest::of(&pattern(7, 24 << 20)),
                "{mode}"
            );
            let echoed = duplex.join().unwrap();
            assert_eq!(echoed.len(), data.len(), "{mode}: echo length");
            assert_eq!(
                Digest::of(&echoed),
                Digest::of(&data),
                "{mode}: echo digest"
            );
            assert_kernel_moved(&mut p, mode);
            assert_kernel_moved(&mut p2, mode);
        });
    }
}

/// The word at 8-byte index `i` of stream `seed`: every offset of a stream
/// is checkable on its own, and a word found in the wrong place says where
/// it came from (the map is invertible: an odd multiplier mod 2^64).
fn word(seed: u64, i: u64) -> u64 {
    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed
}

/// Where a word found at a wrong place belongs (inverse of [`word`]).
fn index_of(seed: u64, w: u64) -> u64 {
    // The inverse of the multiplier mod 2^64 (Newton's iteration).
    let m: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut inv: u64 = m;
    for _ in 0..6 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(m.wrapping_mul(inv)));
    }
    (w ^ seed).wrapping_mul(inv)
}

/// `len` bytes of stream `seed` (a multiple of 8).
fn positional(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64 / 8)
        .flat_map(|i| word(seed, i).to_le_bytes())
        .collect()
}

/// The word read at byte offset `off` must be the stream's.
fn check(seed: u64, off: u64, w: u64, bytes: &[u8]) -> Result<(), String> {
    if w == word(seed, off / 8) {
        return Ok(());
    }
    Err(format!(
        "at offset {off}: the word of offset {} (bytes {bytes:02x?})",
        index_of(seed, w).wrapping_mul(8)
    ))
}

/// Read stream `seed` to EOF in phases: slow (small reads with pauses, so
/// the proxy's peer falls behind, its redirect credit runs out and it
/// passes) then fast (large reads as fast as possible, so it can catch up),
/// again and again. Checks every byte at its offset as it arrives; returns
/// the length read, or where and how the stream first went wrong.
fn read_slow_then_fast(mut s: &TcpStream, seed: u64, fast_bytes: usize) -> Result<u64, String> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    // The bytes of a word split over two reads.
    let mut partial: Vec<u8> = Vec::with_capacity(8);
    let mut slow_until = Instant::now() + Duration::from_millis(100);
    let mut fast_left = 0usize;
    loop {
        let slow = fast_left == 0;
        let want = if slow { 16 * 1024 } else { buf.len() };
        let n = s
            .read(&mut buf[..want])
            .map_err(|e| format!("read at {off}: {e}"))?;
        if n == 0 {
            if !partial.is_empty() {
                return Err(format!("EOF inside the word at {off}"));
            }
            return Ok(off);
        }
        // Complete a word split over reads, then check whole words.
        let mut rest = &buf[..n];
        if !partial.is_empty() {
            let take = (8 - partial.len()).min(rest.len());
            partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if partial.len() == 8 {
                let w = u64::from_le_bytes(partial[..].try_into().unwrap());
                check(seed, off, w, &partial)?;
                off += 8;
                partial.clear();
            }
        }
        let whole = rest.len() / 8 * 8;
        for b in rest[..whole].chunks_exact(8) {
            check(seed, off, u64::from_le_bytes(b.try_into().unwrap()), b)?;
            off += 8;
        }
        partial.extend_from_slice(&rest[whole..]);
        if slow {
            if Instant::now() >= slow_until {
                fast_left = fast_bytes;
            } else {
                thread::sleep(Duration::from_millis(2));
            }
        } else {
            fast_left = fast_left.saturating_sub(n);
            if fast_left == 0 {
                slow_until = Instant::now() + Duration::from_millis(100);
            }
        }
    }
}

/// Both ways at once, each through a reader that is slow, then fast, many
/// times over: the proxy goes from redirecting to copying and back (in
/// sockmap mode) again and again. A byte lost, duplicated or moved across
/// any of those switches fails the test at its offset; so does a byte of
/// the client's own stream coming back to it.
#[test]
fn bytes_keep_their_order_through_a_slow_then_fast_reader() {
    const LEN: usize = 64 << 20;
    for mode in MODES {
        in_netns(&format!("order across switches ({mode})"), move |_| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let (mut p, a) = proxy(mode, l.local_addr().unwrap(), &[]);
            let c = TcpStream::connect(a).unwrap();
            let (server, _) = l.accept().unwrap();
            for s in [&c, &server] {
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
            }
            let up = Arc::new(positional(0x5eed_0001, LEN));
            let down = Arc::new(positional(0x5eed_0002, LEN));
            let writer = |s: &TcpStream, data: &Arc<Vec<u8>>| {
                let mut w = s.try_clone().unwrap();
                let d = data.clone();
                thread::spawn(move || {
                    for chunk in d.chunks(256 * 1024) {
                        w.write_all(chunk).unwrap();
                    }
                    w.shutdown(Shutdown::Write).unwrap();
                })
            };
            let wu = writer(&c, &up);
            let wd = writer(&server, &down);
            let sr = server.try_clone().unwrap();
            let backend_reads =
                thread::spawn(move || read_slow_then_fast(&sr, 0x5eed_0001, 8 << 20));
            let client_got = read_slow_then_fast(&c, 0x5eed_0002, 8 << 20);
            let backend_got = backend_reads.join().unwrap();
            wu.join().unwrap();
            wd.join().unwrap();
            assert_eq!(backend_got, Ok(LEN as u64), "{mode}: client to backend");
            assert_eq!(client_got, Ok(LEN as u64), "{mode}: backend to client");
            if mode == "sockmap" {
                // Every byte is counted once the connection has ended.
                let st = p.wait_status(|s| redirected(s) + copied(s) >= 2 * LEN as u64);
                eprintln!("{mode}: {st}");
                // The way back to redirecting: after each slow phase the
                // kernel takes over again. Copying everything after the
                // first switch (as the proxy did before it held passed
                // bytes) left a tenth in the kernel here; now about half.
                assert!(
                    redirected(&st) * 4 >= redirected(&st) + copied(&st),
                    "less than a quarter of the bytes redirected: {st}"
                );
            }
        });
    }
}

#[test]
fn half_close_either_way_keeps_the_other_direction() {
    for mode in MODES {
        in_netns(&format!("half-close ({mode})"), move |_| {
            // The backend closes its side first and goes on reading.
            fn early_closer(mut c: TcpStream) {
                c.write_all(b"bye\n").unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got).unwrap();
                // How much arrived after our EOF.
                RECEIVED.lock().unwrap().push(got.len());
            }
            static RECEIVED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
            RECEIVED.lock().unwrap().clear();
            let b = backend(early_closer);
            let (_p, a) = proxy(mode, b.addr, &[]);
            let mut c = TcpStream::connect(a).unwrap();
            timeouts(&c);
            let mut bye = Vec::new();
            c.read_to_end(&mut bye).unwrap();
            assert_eq!(bye, b"bye\n", "{mode}: the backend's bytes, then its EOF");
            // Our side is still open: 4 MiB after the backend's EOF.
            let more = pattern(3, 4 << 20);
            c.write_all(&more).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            assert!(
                poll_until(T, || !RECEIVED.lock().unwrap().is_empty()),
                "{mode}: backend never saw EOF"
            );
            assert_eq!(RECEIVED.lock().unwrap()[0], more.len(), "{mode}");

            // And the other way (the request/reply test of
            // large_transfers_... covers the client closing first): a reply
            // after the client's EOF.
            let r = backend(digest_then_reply);
            let (_p2, a2) = proxy(mode, r.addr, &[]);
            let (len, _, reply) = request(a2, b"question", 100_000);
            assert_eq!(len, 8, "{mode}");
            assert_eq!(reply, pattern(7, 100_000), "{mode}");
        });
    }
}

#[test]
fn early_bytes_arrive_first_and_once() {
    for mode in MODES {
        in_netns(&format!("early bytes ({mode})"), move |_| {
            let b = backend(digest_then_reply);
            // One connection at a time: the second client's bytes wait in
            // the kernel before the proxy has even accepted it.
            let (_p, a) = proxy(mode, b.addr, &["--connections-max", "1"]);
            let first = TcpStream::connect(a).unwrap();
            timeouts(&first);
            assert!(poll_until(T, || b.accepted.load(Ordering::SeqCst) == 1));
            let mut second = TcpStream::connect(a).unwrap();
            timeouts(&second);
            let early = pattern(4, 200_000);
            second.write_all(&(0u64).to_le_bytes()).unwrap();
            second.write_all(&early).unwrap();
            thread::sleep(Duration::from_millis(200));
            assert_eq!(
                b.accepted.load(Ordering::SeqCst),
                1,
                "{mode}: at most one at a time"
            );
            drop(first);
            // Then more, once the proxy has it.
            assert!(
                poll_until(T, || b.accepted.load(Ordering::SeqCst) == 2),
                "{mode}"
            );
            let late = pattern(5, 300_000);
            second.write_all(&late).unwrap();
            second.shutdown(Shutdown::Write).unwrap();
            let mut head = [0u8; 16];
            second.read_exact(&mut head).unwrap();
            let len = u64::from_le_bytes(head[..8].try_into().unwrap());
            let digest = u64::from_le_bytes(head[8..].try_into().unwrap());
            let all = [early, late].concat();
            assert_eq!(len, all.len() as u64, "{mode}: every byte once");
            assert_eq!(digest, Digest::of(&all), "{mode}: in order");
        });
    }
}

#[test]
fn many_concurrent_connections() {
    for mode in MODES {
        in_netns(&format!("many connections ({mode})"), move |_| {
            let b = backend(echo);
            let (mut p, a) = proxy(mode, b.addr, &[]);
            // Each client waits for the echo of its first part before it
            // sends the rest and its FIN, so every connection is armed
            // while open: the first part is more than the proxy copies
            // before it arms (a connection whose client has already sent its
            // FIN when it would be armed is spliced: it cannot join a
            // SOCKHASH).
            let threads: Vec<_> = (0..200u64)
                .map(|i| {
                    thread::spawn(move || {
                        let data = pattern(100 + i, 128 * 1024 + usize::try_from(i).unwrap());
                        let (first, rest) = data.split_at(96 * 1024);
                        let mut c = TcpStream::connect(a).unwrap();
                        timeouts(&c);
                        c.write_all(first).unwrap();
                        let mut got = vec![0u8; first.len()];
                        c.read_exact(&mut got).unwrap();
                        c.write_all(rest).unwrap();
                        c.shutdown(Shutdown::Write).unwrap();
                        c.read_to_end(&mut got).unwrap();
                        got == data
                    })
                })
                .collect();
            let ok = threads
                .into_iter()
                .filter_map(|t| t.join().ok())
                .filter(|&ok| ok)
                .count();
            assert_eq!(ok, 200, "{mode}: connections echoed intact");
            assert_eq!(b.accepted.load(Ordering::SeqCst), 200, "{mode}");
            assert_kernel_moved(&mut p, mode);
            p.wait_status(|s| s.contains("; 0 connections open"));
        });
    }
}

#[test]
fn connections_max_makes_clients_wait_never_drops_them() {
    for mode in MODES {
        in_netns(&format!("connections-max ({mode})"), move |_| {
            let b = backend(echo);
            let (mut p, a) = proxy(mode, b.addr, &["--connections-max", "2"]);
            let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(a).unwrap()).collect();
            assert!(poll_until(T, || b.accepted.load(Ordering::SeqCst) == 2));
            p.wait_status(|s| s.contains("; 2 connections open"));
            let waiting: Vec<TcpStream> = (0..3)
                .map(|i| {
                    let mut c = TcpStream::connect(a).unwrap();
                    timeouts(&c);
                    c.write_all(format!("waiting {i}\n").as_bytes()).unwrap();
                    c.shutdown(Shutdown::Write).unwrap();
                    c
                })
                .collect();
            thread::sleep(Duration::from_millis(300));
            assert_eq!(
                b.accepted.load(Ordering::SeqCst),
                2,
                "{mode}: none beyond the limit"
            );
            drop(held);
            for (i, mut c) in waiting.into_iter().enumerate() {
                let mut got = String::new();
                c.read_to_string(&mut got).unwrap();
                assert_eq!(
                    got,
                    format!("waiting {i}\n"),
                    "{mode}: served after waiting"
                );
            }
            assert_eq!(b.accepted.load(Ordering::SeqCst), 5, "{mode}");
        });
    }
}

#[test]
fn idle_timeout_closes_idle_connections_only() {
    for mode in MODES {
        in_netns(&format!("idle timeout ({mode})"), move |_| {
            let b = backend(echo);
            let (_p, a) = proxy(mode, b.addr, &["--idle-timeout", "1s"]);
            let mut idle = TcpStream::connect(a).unwrap();
            timeouts(&idle);
            idle.write_all(b"x").unwrap();
            let mut one = [0u8; 1];
            idle.read_exact(&mut one).unwrap();
            let mut busy = TcpStream::connect(a).unwrap();
            timeouts(&busy);
            let start = Instant::now();
            // The busy one talks every 200 ms for 2.5 s.
            while start.elapsed() < Duration::from_millis(2500) {
                busy.write_all(b"y").unwrap();
                busy.read_exact(&mut one).unwrap();
                thread::sleep(Duration::from_millis(200));
            }
            // The idle one was closed after about 1 s.
            let mut rest = Vec::new();
            let r = idle.read_to_end(&mut rest);
            assert!(
                matches!(r, Ok(0))
                    || r.as_ref()
                        .is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
                "{mode}: idle connection still open: {r:?}"
            );
            busy.write_all(b"z").unwrap();
            busy.read_exact(&mut one).unwrap();
            assert_eq!(&one, b"z", "{mode}: the busy connection lives");
        });
    }
}

/// Reads `c` until EOF ("eof") or an error (its kind, "ConnectionReset"),
/// showing each read to `data`, which may end it first with a word of its
/// own.
fn how_reading_ends(mut c: &TcpStream, mut data: impl FnMut(&[u8]) -> Option<String>) -> String {
    let mut buf = [0u8; 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return "eof".to_owned(),
            Ok(n) => {
                if let Some(word) = data(&buf[..n]) {
                    return word;
                }
            }
            Err(e) => return format!("{:?}", e.kind()),
        }
    }
}

#[test]
fn resets_and_refusal_propagate() {
    for mode in MODES {
        in_netns(&format!("resets ({mode})"), move |_| {
            static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
            fn record(c: TcpStream) {
                let r = how_reading_ends(&c, |data| {
                    (data == b"reset me").then(|| {
                        // The backend resets the client.
                        socket2_linger0(&c);
                        "reset sent".to_owned()
                    })
                });
                drop(c);
                SEEN.lock().unwrap().push(r);
            }
            SEEN.lock().unwrap().clear();
            let b = backend(record);
            let (_p, a) = proxy(mode, b.addr, &[]);

            // The client resets: the backend reads ECONNRESET, not EOF.
            let c = TcpStream::connect(a).unwrap();
            (&c).write_all(b"hello").unwrap();
            assert!(poll_until(T, || b.accepted.load(Ordering::SeqCst) == 1));
            thread::sleep(Duration::from_millis(100));
            socket2_linger0(&c);
            drop(c);
            assert!(poll_until(T, || !SEEN.lock().unwrap().is_empty()), "{mode}");
            assert_eq!(
                SEEN.lock().unwrap()[0],
                "ConnectionReset",
                "{mode}: client reset"
            );

            // The backend resets: the client reads ECONNRESET.
            let mut c = TcpStream::connect(a).unwrap();
            timeouts(&c);
            c.write_all(b"reset me").unwrap();
            let mut buf = Vec::new();
            let r = c.read_to_end(&mut buf);
            assert_eq!(
                r.map_err(|e| e.kind()),
                Err(ErrorKind::ConnectionReset),
                "{mode}: backend reset"
            );

            // Nothing listens at the target: the client is reset.
            let closed = TcpListener::bind("127.0.0.1:0").unwrap();
            let nowhere = closed.local_addr().unwrap();
            drop(closed);
            let (_p2, a2) = proxy(mode, nowhere, &[]);
            let mut c = TcpStream::connect(a2).unwrap();
            timeouts(&c);
            let r = c.read_to_end(&mut buf);
            assert_eq!(
                r.map_err(|e| e.kind()),
                Err(ErrorKind::ConnectionReset),
                "{mode}: backend refused"
            );
        });
    }
}

/// The `counts` map of the proxy with process id `pid` (the verdict
/// program's per-socket counters, `struct ska_proxy_count`), found through
/// its file descriptors: other tests' proxies have maps of that name too.
/// (`struct ska_proxy_count` is six 8-byte words.)
fn counts_map_of(pid: u32) -> aya::maps::HashMap<aya::maps::MapData, u64, [u64; 6]> {
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = fd.unwrap();
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if target.to_str() != Some("anon_inode:bpf-map") {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_str().unwrap()
        ))
        .unwrap();
        let id: u32 = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let map = aya::maps::MapData::from_id(id).unwrap();
        if map.info().unwrap().name_as_str() == Some("counts") {
            return aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).unwrap();
        }
    }
    panic!("proxy {pid} has no counts map");
}

/// The last line of defence against the kernel's repeated segments
/// (skactivate-proxy(8), MODES): once the verdict program has been handed
/// more bytes than TCP received on a socket, the stream the peer got is not
/// the one sent, and the connection ends in a reset on both sides, never in
/// a clean EOF that would pass it for whole. The kernel's repeat cannot be
/// had on demand, so the test makes the program's count say it happened
/// (1000 bytes added to what it redirected); the client's FIN then reaches
/// neither side as an EOF. A connection left alone ends in EOF both ways.
#[test]
fn bytes_counted_beyond_what_tcp_received_reset_the_connection() {
    in_netns("repeated bytes reset the connection", |_| {
        static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());
        fn record(c: TcpStream) {
            let r = how_reading_ends(&c, |_| None);
            drop(c);
            SEEN.lock().unwrap().push(r);
        }
        SEEN.lock().unwrap().clear();
        let b = backend(record);
        let (p, a) = proxy("sockmap", b.addr, &[]);
        for (n, inflate) in [(1, false), (2, true)] {
            let mut c = TcpStream::connect(a).unwrap();
            timeouts(&c);
            // More than the proxy copies before it arms the connection.
            c.write_all(&pattern(n as u64, 100_000)).unwrap();
            assert!(poll_until(T, || b.accepted.load(Ordering::SeqCst) == n));
            // The proxy has armed the connection once its counters exist.
            let mut counts = counts_map_of(p.child.id());
            assert!(poll_until(T, || counts.keys().count() == 2));
            if inflate {
                let keys: Vec<u64> = counts.keys().map(Result::unwrap).collect();
                for k in keys {
                    let mut v = counts.get(&k, 0).unwrap();
                    v[0] += 1000;
                    counts.insert(k, v, 0).unwrap();
                }
            }
            c.shutdown(Shutdown::Write).unwrap();
            assert!(poll_until(T, || SEEN.lock().unwrap().len() == n));
            let mut buf = Vec::new();
            let r = c.read_to_end(&mut buf).map(drop).map_err(|e| e.kind());
            let backend_saw = SEEN.lock().unwrap()[n - 1].clone();
            if inflate {
                assert_eq!(backend_saw, "ConnectionReset", "the backend");
                assert_eq!(r, Err(ErrorKind::ConnectionReset), "the client");
            } else {
                assert_eq!(backend_saw, "eof", "the backend, left alone");
                assert_eq!(r, Ok(()), "the client, left alone");
            }
            drop(c);
            assert!(poll_until(T, || counts.keys().count() == 0));
        }
    });
}

/// A connection is armed only once it has moved enough to be worth it
/// (opening.rs): a short exchange is copied by the proxy and never enters
/// the maps; a ping-pong is armed after its first round trips and the
/// kernel moves the rest.
#[test]
fn short_connections_are_copied_and_longer_ones_armed() {
    in_netns("arming after the opening", |_| {
        let b = backend(echo);
        let (mut p, a) = proxy("sockmap", b.addr, &[]);
        let counts = counts_map_of(p.child.id());

        let mut c = TcpStream::connect(a).unwrap();
        timeouts(&c);
        c.write_all(b"0123456789").unwrap();
        let mut got = [0u8; 10];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"0123456789");
        assert_eq!(counts.keys().count(), 0, "a short exchange is not armed");
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        let st = p.wait_status(|s| s.contains(", 1 served"));
        assert_eq!(copied(&st), 20, "{st}");
        assert_eq!(redirected(&st), 0, "{st}");

        let mut c = TcpStream::connect(a).unwrap();
        timeouts(&c);
        let mut armed_after = None;
        for i in 0..100u8 {
            c.write_all(&[i]).unwrap();
            let mut byte = [0u8; 1];
            c.read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], i);
            if armed_after.is_none() && counts.keys().count() == 2 {
                armed_after = Some(i);
            }
        }
        let armed_after = armed_after.expect("a ping-pong of 100 round trips is armed");
        assert!(
            armed_after < 20,
            "armed only after {armed_after} round trips"
        );
        drop(c);
        let st = p.wait_status(|s| s.contains(", 2 served"));
        // The first round trips copied, the rest redirected; each byte once.
        assert_eq!(copied(&st) + redirected(&st), 20 + 200, "{st}");
        assert!(redirected(&st) >= 100, "{st}");
        assert!(poll_until(T, || counts.keys().count() == 0));
    });
}

/// Both directions at once, and a client that reads nothing for its first
/// 300 ms while it uploads: the proxy soon holds bytes for it while the
/// upload goes on, and a sockmap-mode connection is then left to splice
/// within the opening's bounds (opening.rs), or armed once the client reads.
/// Either way every byte arrives in order, and `STATUS=` counts each once
/// (redirected, copied or spliced).
#[test]
fn a_duplex_flow_whose_client_reads_late_arrives_whole_and_counted_once() {
    for mode in MODES {
        in_netns(&format!("late reader ({mode})"), move |_| {
            const LEN: usize = 24 << 20;
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let target = l.local_addr().unwrap();
            // The backend sends LEN bytes while it reads the client's to EOF.
            let server = thread::spawn(move || {
                let (c, _) = l.accept().unwrap();
                timeouts(&c);
                let mut w = c.try_clone().unwrap();
                let writer = thread::spawn(move || {
                    w.write_all(&pattern(11, LEN)).unwrap();
                    w.shutdown(Shutdown::Write).unwrap();
                });
                let mut got = Vec::new();
                (&c).read_to_end(&mut got).unwrap();
                writer.join().unwrap();
                got
            });
            let (mut p, a) = proxy(mode, target, &[]);
            let c = TcpStream::connect(a).unwrap();
            timeouts(&c);
            nix::sys::socket::setsockopt(&c, nix::sys::socket::sockopt::RcvBuf, &(64 * 1024))
                .expect("SO_RCVBUF");
            let mut w = c.try_clone().unwrap();
            let writer = thread::spawn(move || {
                w.write_all(&pattern(12, LEN)).unwrap();
                w.shutdown(Shutdown::Write).unwrap();
            });
            thread::sleep(Duration::from_millis(300));
            let mut down = Vec::new();
            (&c).read_to_end(&mut down).unwrap();
            writer.join().unwrap();
            let up = server.join().unwrap();
            assert_eq!(up.len(), LEN, "{mode}: bytes the backend got");
            assert!(up == pattern(12, LEN), "{mode}: the upload, in order");
            assert_eq!(down.len(), LEN, "{mode}: bytes the client got");
            assert!(down == pattern(11, LEN), "{mode}: the download, in order");
            let st = p.wait_status(|s| s.contains(", 1 served"));
            eprintln!("{mode}: {st}");
            let counted = redirected(&st) + copied(&st) + spliced(&st);
            assert_eq!(
                counted,
                2 * LEN as u64,
                "{mode}: each byte counted once: {st}"
            );
        });
    }
}

/// SO_LINGER {1, 0}: the next close sends a RST.
fn socket2_linger0(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid linger struct on an open socket.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
}

/// A UDP backend that answers each datagram with "PEER DATA".
fn udp_backend() -> (SocketAddr, Arc<Mutex<HashSet<SocketAddr>>>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = s.local_addr().unwrap();
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let p = peers.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            p.lock().unwrap().insert(from);
            let mut reply = format!("{from} ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&reply, from);
        }
    });
    (addr, peers)
}

#[test]
fn datagrams_from_several_clients_get_their_own_replies() {
    for mode in MODES {
        in_netns(&format!("datagrams ({mode})"), move |_| {
            let (target, peers) = udp_backend();
            let front = UdpSocket::bind("127.0.0.1:0").unwrap();
            let at = front.local_addr().unwrap();
            let t = target.to_string();
            let _p = Proxy::start(
                &["--mode", mode, "--idle-timeout", "1s", &t],
                &[&front],
                &[],
            );
            let clients: Vec<UdpSocket> = (0..5)
                .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
                .collect();
            let mut backend_peer = Vec::new();
            for round in 0..3 {
                for (i, c) in clients.iter().enumerate() {
                    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let msg = format!("client {i} round {round}");
                    c.send_to(msg.as_bytes(), at).unwrap();
                    let mut buf = [0u8; 1024];
                    let (n, from) = c.recv_from(&mut buf).unwrap();
                    assert_eq!(from, at, "{mode}: the reply comes from the proxy's socket");
                    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let (peer, echoed) = reply.split_once(' ').unwrap();
                    assert_eq!(echoed, msg, "{mode}: client {i} got its own reply");
                    if round == 0 {
                        backend_peer.push(peer.to_owned());
                    } else {
                        assert_eq!(
                            peer, backend_peer[i],
                            "{mode}: one backend socket per client"
                        );
                    }
                }
            }
            assert_eq!(peers.lock().unwrap().len(), 5, "{mode}: five flows");
            // After the idle timeout a flow is gone: a new one starts.
            thread::sleep(Duration::from_millis(2200));
            clients[0].send_to(b"again", at).unwrap();
            let mut buf = [0u8; 1024];
            let (n, _) = clients[0].recv_from(&mut buf).unwrap();
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            let (peer, _) = reply.split_once(' ').unwrap();
            assert_ne!(peer, backend_peer[0], "{mode}: the idle flow was closed");
            assert_eq!(peers.lock().unwrap().len(), 6, "{mode}");
        });
    }
}

#[test]
fn datagram_replies_leave_from_the_address_the_client_used() {
    for mode in MODES {
        in_netns(&format!("datagram reply source ({mode})"), move |_| {
            // Second addresses on lo, beside 127.0.0.1 and ::1.
            common::run(&["ip", "addr", "add", "198.51.100.7/32", "dev", "lo"]);
            common::run(&["ip", "addr", "add", "2001:db8::7/128", "dev", "lo", "nodad"]);
            let (target, _) = udp_backend();
            let t = target.to_string();
            // Wildcard sockets: an IPv4 one, and a dual-stack IPv6 one.
            let v4 = UdpSocket::bind("0.0.0.0:0").unwrap();
            let v6 = UdpSocket::bind("[::]:0").unwrap();
            let (p4, p6) = (
                v4.local_addr().unwrap().port(),
                v6.local_addr().unwrap().port(),
            );
            let _p = Proxy::start(&["--mode", mode, &t], &[&v4, &v6], &[]);
            // Each client sends from the primary address to the second one,
            // on a connected socket: the kernel drops a reply from any
            // other address, which routing alone would pick (the client's
            // own address is the route's preferred source).
            let cases = [
                ("127.0.0.1:0", format!("198.51.100.7:{p4}")),
                ("[::1]:0", format!("[2001:db8::7]:{p6}")),
                ("127.0.0.1:0", format!("198.51.100.7:{p6}")),
            ];
            for (from, to) in cases {
                let c = UdpSocket::bind(from).unwrap();
                c.connect(&to).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 1024];
                let mut got = None;
                // Datagrams may be lost: a few tries, bounded.
                for i in 0..3 {
                    c.send(format!("hello {i}").as_bytes()).unwrap();
                    if let Ok(n) = c.recv(&mut buf) {
                        got = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                        break;
                    }
                }
                let got = got.unwrap_or_else(|| {
                    panic!(
                        "{mode}: no reply from {to} to a client at {from} (wrong source address?)"
                    )
                });
                assert!(got.contains(" hello "), "{mode}: {got}");
                // And the unconnected view: the reply's source, exactly.
                let u = UdpSocket::bind(from).unwrap();
                u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                u.send_to(b"where from", &to).unwrap();
                let (_, src) = u.recv_from(&mut buf).unwrap();
                let want: SocketAddr = to.parse().unwrap();
                assert_eq!(
                    src.ip().to_canonical(),
                    want.ip().to_canonical(),
                    "{mode}: reply source for {from} -> {to}"
                );
                assert_eq!(
                    src.port(),
                    want.port(),
                    "{mode}: reply port for {from} -> {to}"
                );
            }
        });
    }
}

/// Parse a PROXY header at the start of `data`: (source, destination, rest).
fn parse_proxy(data: &[u8]) -> (String, String, &[u8]) {
    const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    if let Some(rest) = data.strip_prefix(SIG) {
        assert_eq!(rest[0], 0x21, "v2, PROXY command");
        let fam = rest[1];
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let body = &rest[4..4 + len];
        let (src, dst) = match fam >> 4 {
            1 => {
                let ip = |b: &[u8]| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
                let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
                (
                    SocketAddr::from((ip(&body[0..4]), port(&body[8..10]))),
                    SocketAddr::from((ip(&body[4..8]), port(&body[10..12]))),
                )
            }
            other => panic!("family {other}"),
        };
        let proto = if fam & 0xf == 1 { "stream" } else { "dgram" };
        return (format!("{proto} {src}"), dst.to_string(), &rest[4 + len..]);
    }
    let end = data.windows(2).position(|w| w == b"\r\n").expect("v1 line");
    let line = std::str::from_utf8(&data[..end]).unwrap();
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(f[0], "PROXY", "{line}");
    assert_eq!(f.len(), 6, "{line}");
    (
        format!("{} {}:{}", f[1], f[2], f[4]),
        format!("{}:{}", f[3], f[5]),
        &data[end + 2..],
    )
}

#[test]
fn proxy_protocol_v1_and_v2_headers_come_first() {
    for mode in MODES {
        in_netns(&format!("PROXY protocol ({mode})"), move |_| {
            // The backend answers the parsed header and the bytes after it.
            fn parse_back(mut c: TcpStream) {
                let mut all = Vec::new();
                if c.read_to_end(&mut all).is_err() {
                    return;
                }
                let (src, dst, rest) = parse_proxy(&all);
                let _ = write!(c, "{src}|{dst}|");
                let _ = c.write_all(rest);
            }
            let b = backend(parse_back);
            for v in ["v1", "v2"] {
                let (_p, a) = proxy(mode, b.addr, &["--proxy-protocol", v]);
                let mut c = TcpStream::connect(a).unwrap();
                timeouts(&c);
                let me = c.local_addr().unwrap();
                c.write_all(b"payload").unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                let mut got = String::new();
                c.read_to_string(&mut got).unwrap();
                let proto = if v == "v1" { "TCP4" } else { "stream" };
                assert_eq!(got, format!("{proto} {me}|{a}|payload"), "{mode} {v}");
            }
            // Datagrams: v2 on every datagram.
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let target = s.local_addr().unwrap();
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    let (src, dst, rest) = parse_proxy(&buf[..n]);
                    let mut reply = format!("{src}|{dst}|").into_bytes();
                    reply.extend_from_slice(rest);
                    let _ = s.send_to(&reply, from);
                }
            });
            let front = UdpSocket::bind("127.0.0.1:0").unwrap();
            let at = front.local_addr().unwrap();
            let t = target.to_string();
            let _p = Proxy::start(
                &["--mode", mode, "--proxy-protocol", "v2", &t],
                &[&front],
                &[],
            );
            let c = UdpSocket::bind("127.0.0.1:0").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            for i in 0..2 {
                c.send_to(format!("dgram {i}").as_bytes(), at).unwrap();
                let mut buf = [0u8; 2048];
                let n = c.recv(&mut buf).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&buf[..n]),
                    format!("dgram {}|{at}|dgram {i}", c.local_addr().unwrap()),
                    "{mode}"
                );
            }
            // v1 has no datagram form: refused at start, with the reason.
            let out = Command::new("sh")
                .arg("-c")
                .arg(r#"LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" proxy --proxy-protocol v1 "$1" 3<&0"#)
                .arg(env!("CARGO_BIN_EXE_skactivate"))
                .arg(&t)
                .stdin(OwnedFd::from(UdpSocket::bind("127.0.0.1:0").unwrap()))
                .env_remove("INVOCATION_ID")
                .env_remove("JOURNAL_STREAM")
                .output()
                .unwrap();
            assert_eq!(out.status.code(), Some(1));
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("v1 has no form for datagrams"),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        });
    }
}

/// The maximum (third value) of net.ipv4.`name`, in this netns.
fn sysctl_max(name: &str) -> usize {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap();
    text.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// SIOCINQ / SIOCOUTQ of a socket.
fn queued(s: &TcpStream, request: libc::Ioctl) -> usize {
    let mut v: libc::c_int = 0;
    // SAFETY: both ioctls take an int out-parameter.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), request, &raw mut v) };
    assert_eq!(r, 0);
    usize::try_from(v).unwrap()
}

/// Write `chunk` to the client `c` (nonblocking) for `how_long` while the
/// backend `server` reads nothing, each byte written added to `d`: the
/// bytes written, and the most the proxy held in the kernel meanwhile
/// (taken from the client, not yet in the backend's receive queue; the
/// backend had read every byte sent before).
fn push_to_stalled_backend(
    c: &TcpStream,
    server: &TcpStream,
    chunk: &[u8],
    how_long: Duration,
    d: &mut Digest,
    mode: &str,
) -> (usize, usize) {
    c.set_nonblocking(true).unwrap();
    let mut sent = 0usize;
    let mut held_max = 0usize;
    let start = Instant::now();
    while start.elapsed() < how_long {
        match (&*c).write(chunk) {
            Ok(n) => {
                d.update(&chunk[..n]);
                sent += n;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{mode}: {e}"),
        }
        let held = sent - queued(c, libc::TIOCOUTQ) - queued(server, libc::FIONREAD);
        held_max = held_max.max(held);
    }
    c.set_nonblocking(false).unwrap();
    (sent, held_max)
}

/// Shut down the client's write side and read the backend to EOF, each byte
/// added to `g`: how many.
fn client_ends_backend_reads(c: &TcpStream, server: &mut TcpStream, g: &mut Digest) -> usize {
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = server.read(&mut buf).unwrap();
        if n == 0 {
            return got;
        }
        got += n;
        g.update(&buf[..n]);
    }
}

#[test]
fn a_slow_backend_cannot_grow_kernel_memory_without_bound() {
    for mode in MODES {
        in_netns(&format!("slow backend ({mode})"), move |_| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let (mut p, a) = proxy(mode, l.local_addr().unwrap(), &[]);
            let c = TcpStream::connect(a).unwrap();
            let (mut server, _) = l.accept().unwrap();
            timeouts(&server);
            // The backend reads nothing while the client pushes for 3 s.
            let chunk = pattern(9, 1 << 20);
            let mut d = Digest::new();
            let (sent, held_max) =
                push_to_stalled_backend(&c, &server, &chunk, Duration::from_secs(3), &mut d, mode);
            // Unbounded would be gigabytes. sockmap: the 4 MiB redirect
            // credit (what the backend has not acknowledged, its socket's
            // send queue included) and the client socket's receive buffer,
            // fixed at 1 MiB (skactivate-proxy(8), MEMORY). splice: the
            // client socket's receive buffer, which autotuning grows up to
            // tcp_rmem's maximum (copied from the host's into the netns),
            // the backend socket's send buffer (tcp_wmem's) and the pipe.
            // Each with 1 MiB for what the buffers charge beyond the bytes.
            let bound = if mode == "sockmap" {
                (4 << 20) + (1 << 20) + (1 << 20)
            } else {
                sysctl_max("tcp_rmem") + sysctl_max("tcp_wmem") + (256 << 10) + (1 << 20)
            };
            eprintln!(
                "{mode}: client sent {sent} bytes, proxy held at most {held_max} (bound {bound})"
            );
            assert!(
                held_max < bound,
                "{mode}: the proxy held {held_max} bytes, more than {bound}"
            );
            // Then everything arrives, in order.
            let mut g = Digest::new();
            let got = client_ends_backend_reads(&c, &mut server, &mut g);
            assert_eq!(got, sent, "{mode}");
            assert_eq!(g.0, d.0, "{mode}");
            if mode == "sockmap" {
                let st = p.status();
                eprintln!("{mode}: {st}");
            }
        });
    }
}

/// A backend that reads fast and then stops: in sockmap mode the credit
/// grows while the backend keeps up, and what the proxy then holds is still
/// bounded, by the credit's ceiling (tcp_rmem's maximum) and the 1 MiB
/// receive buffer: no more than splice mode may hold. Then everything
/// arrives, in order.
#[test]
fn a_backend_that_stops_after_reading_fast_is_still_bounded() {
    for mode in MODES {
        in_netns(&format!("fast then stopped backend ({mode})"), move |_| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let (_p, a) = proxy(mode, l.local_addr().unwrap(), &[]);
            let c = TcpStream::connect(a).unwrap();
            let (mut server, _) = l.accept().unwrap();
            timeouts(&server);
            let chunk = pattern(11, 1 << 20);
            // Fast: 128 MiB through, the backend reading as it comes (a
            // thread), long enough for the credit to grow to its ceiling.
            let fast = 128usize << 20;
            let reader = {
                let mut server = server.try_clone().unwrap();
                thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut d = Digest::new();
                    let mut got = 0usize;
                    while got < fast {
                        let n = server.read(&mut buf[..(fast - got).min(1 << 20)]).unwrap();
                        assert!(n > 0, "early EOF");
                        d.update(&buf[..n]);
                        got += n;
                    }
                    d
                })
            };
            let mut d = Digest::new();
            let mut sent = 0usize;
            while sent < fast {
                (&c).write_all(&chunk).unwrap();
                d.update(&chunk);
                sent += chunk.len();
            }
            let mut g = reader.join().unwrap();
            // Then the backend reads nothing while the client pushes for 2 s.
            let (more, held_max) =
                push_to_stalled_backend(&c, &server, &chunk, Duration::from_secs(2), &mut d, mode);
            sent += more;
            let rmem = sysctl_max("tcp_rmem");
            // sockmap: the credit's ceiling and the client socket's 1 MiB
            // receive buffer, each with 1 MiB for what buffers charge
            // beyond the bytes. splice: as in the test above.
            let bound = if mode == "sockmap" {
                rmem.max(4 << 20) + (1 << 20) + (2 << 20)
            } else {
                rmem + sysctl_max("tcp_wmem") + (256 << 10) + (1 << 20)
            };
            eprintln!(
                "{mode}: after {fast} bytes read fast, the proxy held at most {held_max} (bound {bound})"
            );
            assert!(
                held_max < bound,
                "{mode}: the proxy held {held_max} bytes, more than {bound}"
            );
            let got = fast + client_ends_backend_reads(&c, &mut server, &mut g);
            assert_eq!(got, sent, "{mode}");
            assert_eq!(g.0, d.0, "{mode}");
        });
    }
}

/// `scripts/sockmap-pass-check` (its own C, none of skactivate's code)
/// with `args`: its exit status and what it printed.
fn reproducer(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/sockmap-pass-check"
    ))
    .args(args)
    .output()
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// auto uses sockmap only where a segment overlapping bytes already
/// received is read once. The reproducer's `--repair` check, independent of
/// this code, says whether the kernel hands such a segment to a verdict
/// program whole (every kernel known does). With CAP_PERFMON the proxy's
/// program cuts the old bytes off, and auto takes sockmap; without it
/// (`setpriv` drops it, and CAP_SYS_ADMIN, which implies it) auto takes
/// sockmap only where the reproducer found the kernel right, and otherwise
/// splices and says why. With the check counted as passed
/// (`SKACTIVATE_PROXY_PROBE=ignore-overlap`) auto takes sockmap all the
/// same. sockmap, asked for, is probed first, says what the overlap check
/// found, and falls back to splice when the probe fails. Where the program
/// cannot cut and the kernel repeats, an echo comes back whole or is reset
/// (CI saw a reset once in many runs); everywhere else it comes back whole.
#[test]
fn auto_uses_sockmap_only_where_an_overlapping_segment_is_read_once() {
    let (code, text) = reproducer(&["--repair", "--stall", "30"]);
    let read_once = match code {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("the reproducer could not run: {text}"),
    };
    eprintln!("the reproducer: {text}");
    const NO_PERFMON: &[&str] = &["setpriv", "--bounding-set=-perfmon,-sys_admin", "--"];
    in_netns("auto mode", move |_| {
        let b = backend(echo);
        let t = b.addr.to_string();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let data = Arc::new(pattern(11, 1 << 20));

        // With CAP_PERFMON: the program cuts the old bytes off (if the
        // kernel hands them over).
        let mut p = Proxy::start(&[&t], &[&l], &[]);
        let st = p.status();
        let found = if read_once {
            "read once)"
        } else {
            "read once (the program cut its 500 old bytes off))"
        };
        assert!(
            st.starts_with(&format!(
                "mode sockmap (auto; probe passed: redirect, half-close, early data, bounded \
                 queue, a segment overlapping bytes already received {found}"
            )),
            "{st}"
        );
        assert_eq!(echo_through(a, &data), *data);
        assert_kernel_moved(&mut p, "sockmap");
        drop(p);

        // Without: right only where the kernel is.
        let mut p = Proxy::start_under(NO_PERFMON, &[&t], &[&l], &[]);
        let st = p.status();
        if read_once {
            assert!(st.starts_with("mode sockmap (auto; probe passed"), "{st}");
        } else {
            assert!(
                st.starts_with(
                    "mode splice (auto: the kernel handed the verdict program a segment \
                     overlapping 500 bytes already received whole, and those bytes went through \
                     a second time (the program that cuts them off is not used: it needs \
                     CAP_PERFMON, which this process lacks)"
                ),
                "{st}"
            );
        }
        assert_eq!(echo_through(a, &data), *data);
        drop(p);

        let mut p = Proxy::start_under(
            NO_PERFMON,
            &[&t],
            &[&l],
            &[("SKACTIVATE_PROXY_PROBE", "ignore-overlap")],
        );
        let st = p.status();
        assert!(
            st.starts_with(
                "mode sockmap (auto; probe passed: redirect, half-close, early data, bounded \
                 queue, a segment overlapping bytes already received read once)"
            ),
            "{st}"
        );
        // The check ignored where the kernel fails it: whole, or reset.
        if read_once {
            assert_eq!(echo_through(a, &data), *data);
        } else {
            echo_whole_or_reset(a, &data);
        }
        assert_kernel_moved(&mut p, "sockmap");
        drop(p);

        for under in [&[][..], NO_PERFMON] {
            let mut p = Proxy::start_under(under, &["--mode", "sockmap", &t], &[&l], &[]);
            let st = p.status();
            assert!(
                st.starts_with("mode sockmap (as asked; probe passed"),
                "{st}"
            );
            let uncut = !read_once && !under.is_empty();
            assert_eq!(
                st.contains("; but the kernel handed the verdict program a segment overlapping"),
                uncut,
                "{under:?}: {st}"
            );
            if uncut {
                echo_whole_or_reset(a, &data);
            } else {
                assert_eq!(echo_through(a, &data), *data);
            }
            assert_kernel_moved(&mut p, "sockmap");
            drop(p);
        }

        for (mode, expect) in [
            (
                "sockmap",
                "mode splice (sockmap asked for, but its probe failed: forced by \
                 SKACTIVATE_PROXY_PROBE=fail)",
            ),
            (
                "auto",
                "mode splice (auto: the sockmap probe failed: forced by \
                 SKACTIVATE_PROXY_PROBE=fail)",
            ),
        ] {
            let mut p = Proxy::start(
                &["--mode", mode, &t],
                &[&l],
                &[("SKACTIVATE_PROXY_PROBE", "fail")],
            );
            let st = p.status();
            assert!(st.starts_with(expect), "{st}");
            assert_eq!(echo_through(a, &data), *data);
        }
    });
}

/// `scripts/sockmap-pass-check`, the reproducer that found the sockmap
/// mode's known defect in the kernel (skactivate-proxy(8)), builds and runs,
/// and its checks are right where the kernel is: with no program attached
/// (the socket in the SOCKHASH, plain TCP) every byte of a bulk transfer
/// arrives once and in order, and so does the segment that overlaps bytes
/// already received, made by the `--repair` pair and by the `--overlap`
/// peer (which shows that TCP takes their segments), and a transfer
/// through a send buffer fixed with `--sndbuf`. Not run with its
/// verdict program here: every kernel tried answers that wrongly, which is
/// the reproducer's point, not a fault of ours.
#[test]
fn the_pass_path_reproducer_is_right_where_the_kernel_is() {
    let check = |args: &[&str], expect: &str| {
        let (code, text) = reproducer(args);
        assert_eq!(code, Some(0), "{args:?}: {text}");
        assert!(text.contains(expect), "{args:?}: {text}");
    };
    check(
        &[
            "--no-program",
            "--mib",
            "64",
            "--runs",
            "2",
            "--stall",
            "60",
        ],
        "0 of 2 transfers of 64 MiB wrong (no program",
    );
    // The send buffer the pause report's runs fix (docs/
    // kernel-report-sockmap-backlog-pause.md) is the one asked for, and
    // the bytes still come right through it.
    let (code, text) = reproducer(&[
        "--no-program",
        "--sndbuf",
        "262144",
        "--mib",
        "16",
        "--runs",
        "1",
        "--stall",
        "60",
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("the send buffer towards the backend: 262144 bytes"),
        "{text}"
    );
    assert!(text.contains("0 of 1 transfers of 16 MiB wrong"), "{text}");
    assert!(text.contains("median transfer: "), "{text}");
    // The redirect with a copier that never blocks in recv(2) leaves the
    // source socket's copied_seq where rcv_nxt is (docs/
    // kernel-report-sockmap-copied-seq-rollback.md: a blocking one rolls it
    // back on 6.1 and later, this host's 6.18 among them). Only the
    // bookkeeping is asserted: a redirected transfer can still meet the
    // overlap defect (skactivate-proxy(8)).
    let args = [
        "--redirect",
        "--nonblocking",
        "--sndbuf",
        "67108864",
        "--mib",
        "16",
        "--runs",
        "2",
        "--stall",
        "60",
    ];
    let (_, text) = reproducer(&args);
    assert!(
        text.contains("copied_seq lagged behind rcv_nxt after 0 transfers (non-blocking copier)"),
        "{text}"
    );
    // A blocking copier: the count is the kernel's to give, the line is
    // there.
    let blocking: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| *a != "--nonblocking")
        .collect();
    let (_, text) = reproducer(&blocking);
    assert!(
        text.contains("transfers of 16 MiB wrong (redirect"),
        "{text}"
    );
    assert!(text.contains("transfers (blocking copier)"), "{text}");
    check(
        &["--repair", "--no-program", "--stall", "30"],
        "right: a segment overlapping bytes already received, made with TCP_REPAIR (no program)",
    );
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping --overlap: no /dev/net/tun (a kernel without TUN)");
        return;
    }
    check(
        &["--overlap", "--no-program", "--stall", "30"],
        "right: a segment overlapping bytes already received (no program)",
    );
}

/// A service manager that does not read its notification socket does not
/// hold the proxy up. The socket here, never read, holds one datagram
/// (`net.unix.max_dgram_qlen` 0 in this namespace, set before it is made):
/// `READY=1` fills it, and the status line after the first connection finds
/// it full. The proxy sends without waiting and serves the next client;
/// `sd_notify()`'s blocking send stopped the whole proxy there (the proxy
/// bench hung on it, in a namespace whose queues hold ten).
#[test]
fn a_manager_that_reads_late_does_not_hold_the_proxy_up() {
    in_netns("manager reads late", |_| {
        std::fs::write("/proc/sys/net/unix/max_dgram_qlen", "0").unwrap();
        let b = backend(echo);
        let t = b.addr.to_string();
        let data = Arc::new(pattern(7, 64 * 1024));
        for mode in ["splice", "sockmap"] {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = l.local_addr().unwrap();
            let _p = Proxy::spawn_under(&[], &["--mode", mode, t.as_str()], &[&l], &[]);
            assert_eq!(echo_through(a, &data), *data, "{mode}: first client");
            // The status is looked at every 500 ms: by now the line that
            // counts the first client has found the queue full.
            thread::sleep(Duration::from_millis(1200));
            for i in 0..3 {
                assert_eq!(echo_through(a, &data), *data, "{mode}: client {i} after");
            }
        }
    });
}

/// A client that comes while the proxy decides its mode (the program
/// loading on a thread of its own, the probe) is served at once, not after
/// the decision; its connection is copied until then, and armed once the
/// mode is decided (sockmap, as root here).
#[test]
fn a_client_is_served_while_the_mode_is_decided() {
    in_netns("served while deciding", |_| {
        let b = backend(echo);
        let t = b.addr.to_string();
        for mode in ["auto", "sockmap"] {
            let args = ["--mode", mode, t.as_str()];
            // The decision takes tens of ms (the probe moves 2 MiB each
            // way), the first echo a few; a machine busy with the other
            // tests may still stall the one and not the other, so a few
            // tries.
            let mut before_ready = 0;
            for _ in 0..3 {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let a = l.local_addr().unwrap();
                let mut p = Proxy::spawn_under(&[], &args, &[&l], &[]);
                let mut c = TcpStream::connect(a).unwrap();
                timeouts(&c);
                c.write_all(b"?").unwrap();
                let mut one = [0u8; 1];
                c.read_exact(&mut one).unwrap();
                assert_eq!(&one, b"?");
                if !p.ready_yet() {
                    before_ready += 1;
                }
                p.wait_ready(&args);
                let st = p.status();
                assert!(st.starts_with("mode sockmap ("), "{mode}: {st}");
                // The same connection, now that the mode is decided: past
                // the opening's threshold, so armed.
                let data = Arc::new(pattern(21, 4 << 20));
                let mut w = c.try_clone().unwrap();
                let d = data.clone();
                let writer = thread::spawn(move || w.write_all(&d).unwrap());
                let mut got = vec![0u8; data.len()];
                c.read_exact(&mut got).unwrap();
                writer.join().unwrap();
                assert!(got == *data, "{mode}: the echo differs");
                c.shutdown(Shutdown::Write).unwrap();
                assert_eq!(c.read(&mut one).unwrap(), 0, "{mode}: more than was sent");
                let st = p.wait_status(|s| s.contains(" 1 served"));
                assert!(redirected(&st) > 0, "{mode}: not armed: {st}");
                assert_eq!(
                    redirected(&st) + copied(&st) + spliced(&st),
                    2 * (1 + data.len() as u64),
                    "{mode}: every byte counted once: {st}"
                );
                if before_ready > 0 {
                    break;
                }
            }
            assert!(
                before_ready > 0,
                "{mode}: in 3 tries the first byte came back only after READY=1"
            );
        }
    });
}

#[test]
fn exit_idle_time_ends_the_process_when_nothing_is_open() {
    for mode in MODES {
        in_netns(&format!("exit-idle-time ({mode})"), move |_| {
            let b = backend(echo);
            let (mut p, a) = proxy(mode, b.addr, &["--exit-idle-time", "1s"]);
            // Busy for 2 s: it stays.
            let mut c = TcpStream::connect(a).unwrap();
            timeouts(&c);
            thread::sleep(Duration::from_secs(2));
            assert!(
                p.child.try_wait().unwrap().is_none(),
                "{mode}: exited with a connection open"
            );
            c.write_all(b"still here").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let mut got = String::new();
            c.read_to_string(&mut got).unwrap();
            assert_eq!(got, "still here");
            drop(c);
            let st = p.wait_exit(Duration::from_secs(5));
            assert_eq!(
                st.and_then(|s| s.code()),
                Some(0),
                "{mode}: exit after 1 s idle"
            );
        });
    }
}

/// The example units under a real systemd: socket-activated, Type=notify,
/// STATUS= in `systemctl status`, in front of the example web server. As
/// shipped (auto, no capabilities, bpf(2) filtered out) it splices and says
/// why; given the capabilities but not bpf(2), it finds that out in a child
/// and splices instead of being killed; with both, sockmap as asked.
#[test]
fn socket_activated_under_systemd_with_type_notify() {
    let Some(sd) = Systemd::boot() else { return };
    sd.install_skactivate();
    let examples = common::systemd::repo().join("units/examples");
    for unit in ["webserver-proxy.socket", "webserver-proxy.service"] {
        sd.copy_in(
            &examples.join(unit),
            &format!("{ADMIN_UNITS}/{unit}"),
            0o644,
        );
    }
    sd.daemon_reload();
    // The example exits after a minute idle; the test has no minute.
    let exec = sd.property("webserver-proxy.service", "ExecStart");
    assert!(exec.contains("--exit-idle-time 1min"), "{exec}");
    // As shipped: auto, no capabilities, bpf(2) filtered out. It splices,
    // says why, and is not killed for trying sockmap.
    sd.ok(&[
        "systemctl",
        "start",
        "webserver.socket",
        "webserver-proxy.socket",
    ]);
    let to: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    // Serves, says `status` (its start), and is stopped for the next round.
    let served_saying = |status: &str| {
        let reply = sd.in_netns(|| common::systemd::poll_for(SETTLE, || http_get(to).ok()));
        assert!(
            reply.as_ref().is_some_and(|r| r.status == 200),
            "{reply:?}\n{}",
            sd.journal("webserver-proxy.service")
        );
        // It serves while it decides its mode, so the reply may come
        // before READY=1 and the STATUS= sent with it.
        sd.wait_state("webserver-proxy.service", "active");
        let said = sd.property("webserver-proxy.service", "StatusText");
        assert!(said.starts_with(status), "{said}");
        sd.ok(&["systemctl", "stop", "webserver-proxy.service"]);
    };
    served_saying(
        "mode splice (auto: the sockmap probe failed: sockmap needs CAP_BPF CAP_NET_ADMIN, \
         which this process lacks)",
    );
    // Given the capabilities but not bpf(2): it asks in a child, which
    // seccomp kills, and splices saying so, instead of being killed itself.
    let dropin = format!("{ADMIN_UNITS}/webserver-proxy.service.d/test.conf");
    sd.write_file(
        &dropin,
        b"[Service]\nAmbientCapabilities=CAP_BPF CAP_NET_ADMIN\n\
          CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN\n",
        0o644,
    );
    sd.daemon_reload();
    served_saying(
        "mode splice (auto: the sockmap probe failed: bpf(2) is not allowed: the unit's \
         SystemCallFilter= leaves it out",
    );
    sd.write_file(
        &dropin,
        b"[Service]\nExecStart=\n\
          ExecStart=/usr/bin/skactivate proxy --mode sockmap --exit-idle-time 3s 127.0.0.1:80\n\
          AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON\n\
          CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON\n\
          SystemCallFilter=bpf\n",
        0o644,
    );
    sd.daemon_reload();
    let reply = sd.in_netns(|| common::systemd::poll_for(SETTLE, || http_get(to).ok()));
    let reply = reply.unwrap_or_else(|| {
        panic!(
            "no answer through the proxy: {}",
            sd.journal("webserver-proxy.service")
        )
    });
    assert_eq!(reply.status, 200);
    assert!(reply.body.starts_with("webserver "), "{reply:?}");
    sd.wait_state("webserver-proxy.service", "active");
    let status = sd.property("webserver-proxy.service", "StatusText");
    assert!(
        status.starts_with("mode sockmap (as asked; probe passed"),
        "{status}"
    );
    // The overlap check ran under the unit's limits (TCP_REPAIR needs the
    // CAP_NET_ADMIN sockmap needs anyway), and with CAP_PERFMON the
    // program read the segment once, cutting the old bytes off where the
    // kernel handed them over (every kernel known does).
    assert!(
        status.contains("a segment overlapping bytes already received read once"),
        "{status}"
    );
    assert_eq!(sd.property("webserver-proxy.service", "Type"), "notify");
    // Many requests, each long enough to be armed and go through the
    // kernel (the proxy copies a connection's first 64 KiB itself).
    let ok = sd.in_netns(|| {
        (0..50)
            .filter(|_| http_get_padded(to, 96 * 1024).is_ok_and(|r| r.status == 200))
            .count()
    });
    assert_eq!(ok, 50);
    assert!(
        poll_until(SETTLE, || redirected(
            &sd.property("webserver-proxy.service", "StatusText")
        ) > 0),
        "{}",
        sd.property("webserver-proxy.service", "StatusText")
    );
    let journal = sd.journal("webserver-proxy.service");
    assert!(
        journal.contains("mode sockmap (as asked; probe passed"),
        "{journal}"
    );
    // --exit-idle-time in the example: it goes, the socket stays and
    // starts it again.
    sd.wait_state("webserver-proxy.service", "inactive");
    assert_eq!(sd.active_state("webserver-proxy.socket"), "active");
    // The new instance serves while it probes the kernel; polled all the
    // same, for a machine loaded enough to make starting it slow.
    let mut last = None;
    let again = poll_until(SETTLE, || {
        let r = sd.in_netns(|| http_get(to));
        let ok = r.as_ref().is_ok_and(|r| r.status == 200);
        last = Some(format!("{r:?}"));
        ok
    });
    assert!(again, "no answer after the restart: {last:?}");
}
