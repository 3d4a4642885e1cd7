//! `skactivate proxy TARGET`: a socket-activated proxy, a drop-in for
//! systemd-socket-proxyd, whose bytes stay in the kernel.
//!
//! * [`sockmap`] — `--mode sockmap`: a SOCKHASH and an sk_skb verdict program
//!   redirect each side's data to the other's egress.
//! * [`splice`] — `--mode splice`: pipes and splice(2), as socket-proxyd.
//! * [`opening`] — `--mode sockmap`: the first bytes of a connection,
//!   copied until it has moved enough to be worth arming.
//! * [`probe`] — `--mode sockmap` and `auto`: try the sockmap path on a
//!   loopback pair at start and use it only if it behaves; ask how the
//!   kernel reads a segment overlapping bytes already received (the known
//!   defect, see skactivate-proxy(8)), which decides `auto`.
//! * [`datagram`] — `ListenDatagram=` sockets: one connected backend socket
//!   per client address.
//! * [`header`] — the PROXY protocol header.
//!
//! One thread; each connection is a task. Listening sockets come from systemd
//! (`LISTEN_FDS`): stream listeners (`Accept=no`), datagram sockets, or a
//! single connected stream socket (`Accept=yes`).
//!
//! Connections are served from the start, while `sockmap` and `auto` load
//! the program (on a thread of its own) and probe it: a connection that
//! comes meanwhile is copied as every connection's opening is, and armed or
//! spliced once the mode is decided ([`Path::Deciding`]). `READY=1` and the
//! first `STATUS=` come with the decision.

pub mod datagram;
pub mod header;
pub mod opening;
pub mod probe;
pub mod sockmap;
pub mod splice;
pub mod sys;

use std::cell::{Cell, OnceCell, RefCell};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::TryFutureExt;
use sd_notify::NotifyState;
use tokio::io::unix::AsyncFd;
use tokio::sync::Semaphore;

use crate::notify;
use sys::Addr;

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Auto,
    Sockmap,
    Splice,
}

/// Where connections go: `HOST:PORT`, `/path` or `@abstract`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A literal address.
    Addr(SocketAddr),
    /// A name, resolved for each connection (as socket-proxyd does).
    Host(String, u16),
    Unix(Vec<u8>),
    UnixAbstract(Vec<u8>),
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(name) = s.strip_prefix('@') {
            if name.is_empty() {
                return Err("@ needs an abstract socket name after it".into());
            }
            return Ok(Target::UnixAbstract(name.as_bytes().to_vec()));
        }
        if s.starts_with('/') {
            if s.len() >= 108 {
                return Err(format!("{s}: a socket path has at most 107 bytes"));
            }
            return Ok(Target::Unix(s.as_bytes().to_vec()));
        }
        if let Ok(a) = s.parse::<SocketAddr>() {
            if a.port() == 0 {
                return Err(format!("{s}: port 0"));
            }
            return Ok(Target::Addr(a));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!(
                "{s:?} is not HOST:PORT, /path or @abstract (an IPv6 address goes in brackets: [2001:db8::1]:80)"
            ));
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{s}: {port:?} is not a port (1-65535)"))?;
        if host.is_empty() || host.contains(':') || host.contains(['[', ']']) {
            return Err(format!(
                "{s}: {host:?} is not a host name or address (an IPv6 address goes in brackets)"
            ));
        }
        Ok(Target::Host(host.to_owned(), port))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Host(h, p) => write!(f, "{h}:{p}"),
            Target::Unix(p) => write!(f, "{}", String::from_utf8_lossy(p)),
            Target::UnixAbstract(p) => write!(f, "@{}", String::from_utf8_lossy(p)),
        }
    }
}

impl Target {
    /// The addresses to try, in order (a name is resolved now).
    pub async fn resolve(&self) -> io::Result<Vec<Addr>> {
        match self {
            Target::Addr(a) => Ok(vec![Addr::Ip(*a)]),
            Target::Unix(p) => Ok(vec![Addr::Unix(p.clone())]),
            Target::UnixAbstract(p) => Ok(vec![Addr::UnixAbstract(p.clone())]),
            Target::Host(h, p) => {
                let (h, p) = (h.clone(), *p);
                let addrs = tokio::task::spawn_blocking(move || (h.as_str(), p).to_socket_addrs())
                    .await
                    .map_err(io::Error::other)??;
                Ok(addrs.map(Addr::Ip).collect())
            }
        }
    }
}

/// What the command line says (see `skactivate proxy --help`).
#[derive(Debug, Clone)]
pub struct Options {
    pub connections_max: usize,
    pub exit_idle_time: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub proxy_protocol: Option<header::Version>,
    pub mode: Mode,
    pub target: Target,
}

/// How long a datagram flow lives without traffic when `--idle-timeout` is
/// not given (a datagram "connection" has no end of its own).
pub const DATAGRAM_IDLE_DEFAULT: Duration = Duration::from_secs(60);

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    #[error("reading: {0}")]
    Read(#[source] io::Error),
    #[error("writing: {0}")]
    Write(#[source] io::Error),
    /// Either of the above, on the socket named.
    #[error("{0}: {1}")]
    On(&'static str, #[source] Box<Fault>),
    #[error("idle for {0:?}")]
    Idle(Duration),
    /// The kernel handed the verdict program more bytes than TCP received
    /// on a socket: it repeated some (sockmap.rs, "Known defect").
    /// The second field says what the program could not cut off, if that
    /// is known.
    #[error(
        "the kernel handed the verdict program {0} bytes more than TCP received{1} (a kernel \
         defect with retransmitted segments; skactivate-proxy(8), MODES): \
         resetting the connection rather than letting the repeated bytes pass for data"
    )]
    Repeated(u64, String),
}

impl Fault {
    fn on(self, what: &'static str) -> Fault {
        Fault::On(what, Box::new(self))
    }

    /// The kernel's fault, not the peers': worth more than an info line.
    fn is_repeated(&self) -> bool {
        match self {
            Fault::Repeated(..) => true,
            Fault::On(_, inner) => inner.is_repeated(),
            _ => false,
        }
    }
}

/// A count of transfers, to tell an idle connection from a busy one.
#[derive(Debug, Default)]
pub struct Activity(Cell<u64>);

impl Activity {
    pub fn touch(&self) {
        self.0.set(self.0.get().wrapping_add(1));
    }
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// Register a non-blocking socket with the runtime.
pub fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the fd; nothing closes or replaces it while
    // registered (it is closed when the AsyncFd is dropped, after deregistering).
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// Write all of `buf` to a non-blocking socket, waiting for room.
pub async fn write_all(fd: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> Result<(), Fault> {
    while !buf.is_empty() {
        let mut g = fd.writable().await.map_err(Fault::Write)?;
        match g.try_io(|fd| sys::send(fd.get_ref().as_fd(), buf)) {
            Err(_would_block) => {}
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(Fault::Write(e)),
        }
    }
    Ok(())
}

/// Resolves when nothing moved (as `moved()` counts) for `timeout`; never
/// without a timeout.
pub async fn idle(timeout: Option<Duration>, moved: impl Fn() -> u64) -> Duration {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let tick = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    let mut last = moved();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let now = moved();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= timeout {
            return timeout;
        }
    }
}

/// Connect a stream socket to the first address of `target` that answers.
pub async fn connect(target: &Target) -> io::Result<AsyncFd<OwnedFd>> {
    let addrs = target.resolve().await?;
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{target}: no address"));
    for addr in addrs {
        match connect_one(&addr).await {
            Ok(fd) => return Ok(fd),
            Err(e) => last = io::Error::new(e.kind(), format!("{addr}: {e}")),
        }
    }
    Err(last)
}

async fn connect_one(addr: &Addr) -> io::Result<AsyncFd<OwnedFd>> {
    let fd = sys::socket(sys::family(addr), libc::SOCK_STREAM)?;
    let done = sys::connect(fd.as_fd(), addr)?;
    let fd = watch(fd)?;
    if !done {
        let g = fd.writable().await?;
        drop(g);
        sys::take_error(fd.get_ref().as_fd())?;
    }
    Ok(fd)
}

/// What one connection did, for the probe and the journal.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Bytes the kernel redirected client→backend and backend→client.
    pub redirected: [u64; 2],
    /// Bytes the program passed, which went through user space (sockmap
    /// mode), client→backend and backend→client.
    pub passed: [u64; 2],
    /// Bytes the proxy copied before the connection was armed, or instead
    /// (sockmap mode: the [`opening`]), client→backend and backend→client.
    pub copied: [u64; 2],
    /// Bytes spliced (splice mode, and connections sockmap mode did not
    /// arm), client→backend and backend→client.
    pub spliced: [u64; 2],
    /// Old bytes the program cut off the front of overlapping segments
    /// (sockmap mode, with the trimming program), client→backend and
    /// backend→client.
    pub trimmed: [u64; 2],
}

/// Where a connection's bytes go.
#[derive(Clone, Copy)]
pub enum Path<'a> {
    /// Spliced from the start.
    Splice,
    /// Copied until the connection is worth arming, then in the kernel.
    Sockmap(&'a sockmap::Kernel),
    /// The mode is being decided: copied until it is, then armed or spliced
    /// as decided.
    Deciding(&'a Choice),
}

impl Path<'_> {
    /// The kernel's path, where it is in use (or decided on).
    fn kernel(&self) -> Option<&sockmap::Kernel> {
        match self {
            Path::Splice => None,
            Path::Sockmap(k) => Some(k),
            Path::Deciding(c) => c.kernel.get(),
        }
    }

    /// Whether a connection that has moved enough may leave its opening:
    /// not while the mode is being decided.
    fn decided(&self) -> bool {
        match self {
            Path::Deciding(c) => c.decided.get(),
            _ => true,
        }
    }
}

/// The mode of the process: decided once, after start (`choose_mode`).
#[derive(Default)]
pub struct Choice {
    decided: Cell<bool>,
    /// Set where sockmap was chosen.
    kernel: OnceCell<sockmap::Kernel>,
    /// What was chosen and why; empty until decided.
    line: RefCell<String>,
}

impl Choice {
    /// The kernel's path, once chosen.
    pub fn kernel(&self) -> Option<&sockmap::Kernel> {
        self.kernel.get()
    }
}

/// Move bytes between `client` and `backend` until both directions have
/// ended (each EOF forwarded) or one fails; `header` goes to the backend
/// first. By `path`: in sockmap mode, copied until `arm_after` says the
/// connection is worth arming ([`opening`]), then in the kernel; else with
/// splice. On a fault both sockets are left set to reset when closed.
pub async fn relay_pair(
    path: Path<'_>,
    credit: sockmap::Credit,
    arm_after: opening::Threshold,
    client: AsyncFd<OwnedFd>,
    backend: AsyncFd<OwnedFd>,
    header: &[u8],
    idle_timeout: Option<Duration>,
) -> (Result<(), Fault>, Stats) {
    let activity = Activity::default();
    let mut stats = Stats::default();
    let reset = |a: &AsyncFd<OwnedFd>, b: &AsyncFd<OwnedFd>| {
        sys::set_reset_on_close(a.get_ref().as_fd());
        sys::set_reset_on_close(b.get_ref().as_fd());
    };
    if let Err(f) = write_all(&backend, header).await {
        reset(&client, &backend);
        return (Err(f), stats);
    }
    if let Path::Splice = path {
        let held = opening::Held::default();
        let r = splice_pair(&client, &backend, idle_timeout, held, &mut stats).await;
        return (r, stats);
    }
    let mut copied = opening::Copied::default();
    let decided = || path.decided();
    let next = tokio::select! {
        r = opening::copy(&client, &backend, arm_after, &decided, &activity, &mut copied) => r,
        t = idle(idle_timeout, || activity.get()) => Err(Fault::Idle(t)),
    };
    stats.copied = copied.bytes;
    let next = match next {
        Ok(next) => next,
        Err(f) => {
            if !matches!(f, Fault::Idle(_)) {
                reset(&client, &backend);
            }
            return (Err(f), stats);
        }
    };
    let up = match next {
        opening::Next::Ended => return (Ok(()), stats),
        opening::Next::Arm => None,
        opening::Next::Rest(up) => Some(up),
        opening::Next::Unsettled(held) => {
            tracing::debug!("receive queues never clean together while settling: splicing");
            let r = splice_pair(&client, &backend, idle_timeout, held, &mut stats).await;
            return (r, stats);
        }
    };
    if let Some(up) = up {
        // One direction ended: its socket cannot join a SOCKHASH. The other
        // goes on with splice.
        let (src, dst, what, i) = if up {
            (&client, &backend, "client to backend", 0)
        } else {
            (&backend, &client, "backend to client", 1)
        };
        let spliced = Cell::new(0);
        let r = tokio::select! {
            r = splice::relay(src, dst, &activity, &[], &spliced) => r.map_err(|e| e.on(what)),
            t = idle(idle_timeout, || activity.get()) => Err(Fault::Idle(t)),
        };
        stats.spliced[i] = spliced.get();
        if matches!(r, Err(Fault::On(..))) {
            reset(&client, &backend);
        }
        return (r, stats);
    }
    let Some(kernel) = path.kernel() else {
        // Splice was decided on while the opening copied.
        let held = opening::Held::default();
        let r = splice_pair(&client, &backend, idle_timeout, held, &mut stats).await;
        return (r, stats);
    };
    // Out of the runtime's hands: see sockmap::End::new.
    let end = |fd: AsyncFd<OwnedFd>, consumed| sockmap::End::new(fd.into_inner(), consumed);
    let ends = end(client, copied.bytes[0]).and_then(|c| Ok((c, end(backend, copied.bytes[1])?)));
    let (c, b) = match ends {
        Ok(ends) => ends,
        Err(e) => return (Err(Fault::Read(e)), stats),
    };
    // A socket that has seen its peer's FIN (a short request sent with
    // shutdown, before we got here) can no longer join a SOCKHASH: splice.
    if !(sockmap::established(&c) && sockmap::established(&b)) {
        return (splice_unarmed(c, b, idle_timeout, &mut stats).await, stats);
    }
    let arming = sockmap::arm(kernel, &c, &b, credit);
    let armed = match arming {
        Ok(armed) => armed,
        Err(ref e) => {
            tracing::debug!("not armed ({e}): splicing this connection");
            drop(arming);
            return (splice_unarmed(c, b, idle_timeout, &mut stats).await, stats);
        }
    };
    let both = async {
        tokio::try_join!(
            sockmap::relay(&armed, &c, &b, credit, &activity)
                .map_err(|e| e.on("client to backend")),
            sockmap::relay(&armed, &b, &c, credit, &activity)
                .map_err(|e| e.on("backend to client")),
        )
    };
    let r = tokio::select! {
        r = both => r.map(drop),
        t = idle(idle_timeout, || activity.get() + sockmap::moved(kernel, &armed)) => Err(Fault::Idle(t)),
    };
    let (cs, bs) = sockmap::stats(kernel, &armed);
    stats.redirected = [cs.redirected, bs.redirected];
    stats.passed = [cs.passed, bs.passed];
    stats.trimmed = [cs.trimmed, bs.trimmed];
    if matches!(
        r,
        Err(Fault::Read(_) | Fault::Write(_) | Fault::On(..) | Fault::Repeated(..))
    ) {
        sys::set_reset_on_close(c.fd.as_fd());
        sys::set_reset_on_close(b.fd.as_fd());
    }
    (r, stats)
}

/// A connection whose ends were made for arming but not armed: splice, its
/// sockets registered with the runtime again.
async fn splice_unarmed(
    c: sockmap::End,
    b: sockmap::End,
    idle_timeout: Option<Duration>,
    stats: &mut Stats,
) -> Result<(), Fault> {
    let c = watch(c.into_fd()).map_err(Fault::Read)?;
    let b = watch(b.into_fd()).map_err(Fault::Read)?;
    splice_pair(&c, &b, idle_timeout, opening::Held::default(), stats).await
}

/// Both directions with splice, each after writing what `held` holds for
/// it, until both have ended or one fails (then both sockets are set to
/// reset when closed). Counts what it spliced in `stats`.
async fn splice_pair(
    client: &AsyncFd<OwnedFd>,
    backend: &AsyncFd<OwnedFd>,
    idle_timeout: Option<Duration>,
    held: opening::Held,
    stats: &mut Stats,
) -> Result<(), Fault> {
    let activity = Activity::default();
    let spliced = [Cell::new(0), Cell::new(0)];
    let both = async {
        tokio::try_join!(
            splice::relay(client, backend, &activity, &held.up, &spliced[0])
                .map_err(|e| e.on("client to backend")),
            splice::relay(backend, client, &activity, &held.down, &spliced[1])
                .map_err(|e| e.on("backend to client")),
        )
    };
    let r = tokio::select! {
        r = both => r.map(drop),
        t = idle(idle_timeout, || activity.get()) => Err(Fault::Idle(t)),
    };
    stats.spliced = spliced.map(Cell::into_inner);
    if matches!(r, Err(Fault::Read(_) | Fault::Write(_) | Fault::On(..))) {
        sys::set_reset_on_close(client.get_ref().as_fd());
        sys::set_reset_on_close(backend.get_ref().as_fd());
    }
    r
}

/// State shared by every task of the process.
pub struct Shared {
    pub opts: Options,
    /// The mode, once decided; the kernel's path where it is sockmap.
    pub choice: Choice,
    /// Each armed direction's credit (sockmap mode).
    pub credit: sockmap::Credit,
    pub slots: Arc<Semaphore>,
    /// Connections and datagram flows open now.
    pub open: Cell<usize>,
    /// When `open` last became 0.
    pub idle_since: Cell<Instant>,
    /// Connections served to their end.
    pub served: Cell<u64>,
    /// Bytes the kernel redirected, and bytes the proxy itself copied, over
    /// the connections that ended (sockmap mode).
    pub redirected: Cell<u64>,
    pub copied: Cell<u64>,
    /// Bytes spliced, over the connections that ended.
    pub spliced: Cell<u64>,
    /// Old bytes the program cut off overlapping segments, over the same.
    pub trimmed: Cell<u64>,
}

impl Shared {
    pub fn opened(&self) {
        self.open.set(self.open.get() + 1);
    }
    pub fn closed(&self) {
        self.open.set(self.open.get() - 1);
        if self.open.get() == 0 {
            self.idle_since.set(Instant::now());
        }
    }
}

/// One accepted (or systemd-accepted) client connection, start to end. The
/// caller has counted it as open ([`Shared::opened`]).
async fn serve_connection(shared: Rc<Shared>, client: OwnedFd, peer: Addr) {
    // An accepted socket has its peer's family; an unnamed AF_UNIX peer
    // comes as Other.
    let client_is_tcp = matches!(peer, Addr::Ip(_));
    let client = match watch(client) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("{peer}: {e}");
            shared.closed();
            return;
        }
    };
    match connect(&shared.opts.target).await {
        Err(e) => {
            // Refused or unreachable: the client sees a reset, as it would
            // from the backend itself.
            tracing::warn!("{peer}: connecting to {}: {e}", shared.opts.target);
            sys::set_reset_on_close(client.get_ref().as_fd());
        }
        Ok(backend) => {
            let header = shared
                .opts
                .proxy_protocol
                .map(|v| {
                    let local = sys::local_addr(client.get_ref().as_fd()).unwrap_or(Addr::Other);
                    header::encode(v, header::Transport::Stream, &peer, &local)
                })
                .unwrap_or_default();
            // The target's kind says the backend socket's family.
            let backend_is_tcp = matches!(shared.opts.target, Target::Addr(_) | Target::Host(..));
            // Sockmap proxies TCP to TCP only.
            let choice = &shared.choice;
            let path = match choice.kernel() {
                _ if !(client_is_tcp && backend_is_tcp) => Path::Splice,
                Some(k) => Path::Sockmap(k),
                None if choice.decided.get() => Path::Splice,
                None => Path::Deciding(choice),
            };
            let (r, stats) = relay_pair(
                path,
                shared.credit,
                opening::ARM_AFTER,
                client,
                backend,
                &header,
                shared.opts.idle_timeout,
            )
            .await;
            shared.served.set(shared.served.get() + 1);
            let add = |c: &Cell<u64>, v: [u64; 2]| c.set(c.get() + v[0] + v[1]);
            add(&shared.redirected, stats.redirected);
            add(&shared.copied, stats.passed);
            add(&shared.copied, stats.copied);
            add(&shared.spliced, stats.spliced);
            add(&shared.trimmed, stats.trimmed);
            match r {
                Ok(()) => {}
                Err(Fault::Idle(t)) => tracing::info!("{peer}: closed after {t:?} without traffic"),
                Err(e) if e.is_repeated() => tracing::error!("{peer}: {e}"),
                Err(e) => tracing::info!("{peer}: {e}; reset both sides"),
            }
        }
    }
    shared.closed();
}

/// Accept on a listening stream socket, at most `--connections-max` at a
/// time: at the limit we stop accepting, and new connections wait in the
/// kernel's backlog.
async fn accept_loop(shared: Rc<Shared>, listener: OwnedFd) -> Result<()> {
    let listener = watch(listener).context("registering a listening socket")?;
    loop {
        let permit = shared
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let (fd, peer) = loop {
            let mut g = listener
                .readable()
                .await
                .context("waiting on a listening socket")?;
            match g.try_io(|l| sys::accept(l.get_ref().as_fd())) {
                Err(_would_block) => continue,
                Ok(Ok(c)) => break c,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Ok(Err(e)) => {
                    // EMFILE, ENOBUFS, …: say so and retry later; the
                    // connection waits in the backlog.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let shared = shared.clone();
        shared.opened();
        tokio::task::spawn_local(async move {
            serve_connection(shared, fd, peer).await;
            drop(permit);
        });
    }
}

/// The `STATUS=` line.
fn status_line(shared: &Shared) -> String {
    let mut line = format!(
        "{}; {} connection{} open, {} served",
        shared.choice.line.borrow(),
        shared.open.get(),
        if shared.open.get() == 1 { "" } else { "s" },
        shared.served.get(),
    );
    if let Some(k) = shared.choice.kernel() {
        line += &format!(
            "; {} bytes redirected, {} bytes copied, {} bytes spliced",
            shared.redirected.get(),
            shared.copied.get(),
            shared.spliced.get()
        );
        if k.untrimmed.is_none() {
            line += &format!(", {} repeated bytes cut off", shared.trimmed.get());
        }
    } else {
        line += &format!("; {} bytes spliced", shared.spliced.get());
    }
    line
}

/// The sockets systemd passed us (LISTEN_FDS, this process's).
fn passed_sockets() -> Result<Vec<OwnedFd>> {
    let fds: Vec<RawFd> = sd_notify::listen_fds()
        .context("reading LISTEN_FDS")?
        .collect();
    if fds.is_empty() {
        bail!(
            "no sockets were passed to this process (LISTEN_FDS is unset or LISTEN_PID is not \
             ours): run it from a service started by a socket unit, or under systemd-socket-activate"
        );
    }
    // SAFETY: systemd passed these fds to this process, nothing else owns them.
    Ok(fds
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect())
}

/// The mode to use, and the line that says which and why.
async fn choose_mode(opts: &Options) -> (Option<sockmap::Kernel>, String) {
    let unix_target = matches!(opts.target, Target::Unix(_) | Target::UnixAbstract(_));
    match opts.mode {
        Mode::Splice => (None, "mode splice (as asked)".to_owned()),
        Mode::Sockmap if unix_target => (
            None,
            "mode splice (sockmap proxies TCP only and the target is an AF_UNIX socket)".to_owned(),
        ),
        Mode::Auto if unix_target => (
            None,
            "mode splice (the target is an AF_UNIX socket; sockmap proxies TCP only)".to_owned(),
        ),
        Mode::Sockmap => match proven(false, opts.connections_max).await {
            Ok((k, Ok(cut))) => (
                Some(k),
                format!("mode sockmap (as asked; {PROBED}, {})", read_once(cut)),
            ),
            Ok((k, Err(why))) => {
                tracing::warn!("--mode sockmap: {why}; {SOCKMAP_DUPLICATES}");
                (
                    Some(k),
                    format!(
                        "mode sockmap (as asked; {PROBED}; but {why}: such connections are reset)"
                    ),
                )
            }
            Err(why) => {
                tracing::error!("--mode sockmap: {why}");
                (
                    None,
                    format!("mode splice (sockmap asked for, but its probe failed: {why})"),
                )
            }
        },
        Mode::Auto => match proven(true, opts.connections_max).await {
            Ok((k, Ok(cut))) => (
                Some(k),
                format!("mode sockmap (auto; {PROBED}, {})", read_once(cut)),
            ),
            Ok((_, Err(why))) => (
                None,
                format!("mode splice (auto: {why}; see skactivate-proxy(8), MODES)"),
            ),
            Err(why) => (
                None,
                format!("mode splice (auto: the sockmap probe failed: {why})"),
            ),
        },
    }
}

/// What the probe checked, for `STATUS=`.
const PROBED: &str = "probe passed: redirect, half-close, early data, bounded queue";

/// What the overlap check found, for `STATUS=`, given the old bytes the
/// program cut off the segment.
fn read_once(cut: u64) -> String {
    let what = "a segment overlapping bytes already received read once";
    if cut == 0 {
        what.to_owned()
    } else {
        format!("{what} (the program cut its {cut} old bytes off)")
    }
}

/// Load the program, check how it reads an overlapping segment, and probe
/// it. A failed overlap check is the known defect, returned inside: `auto`
/// (`decisive`) then stops there, as the longer probe could not change its
/// choice; `--mode sockmap` runs the probe all the same.
async fn proven(
    decisive: bool,
    connections_max: usize,
) -> Result<(sockmap::Kernel, Result<u64, probe::Overlap>), String> {
    let kernel = tokio::task::spawn_blocking(move || probe::load(connections_max))
        .await
        .map_err(|e| format!("loading the program: {e}"))??
        .register()
        .map_err(|e| e.to_string())?;
    let mut overlap = probe::overlap(&kernel).await;
    if let Err(why) = &overlap {
        tracing::info!("sockmap probe: {why}");
        if std::env::var(probe::FORCE_FAIL_ENV).as_deref() == Ok("ignore-overlap") {
            tracing::warn!(
                "{}=ignore-overlap: counted as passed",
                probe::FORCE_FAIL_ENV
            );
            overlap = Ok(0);
        }
    }
    if overlap.is_ok() || !decisive {
        probe::probe(&kernel).await?;
    }
    Ok((kernel, overlap))
}

/// What the known defect means for `--mode sockmap`, said when the overlap
/// check fails.
const SOCKMAP_DUPLICATES: &str = "a retransmission can send such a segment, and any network \
     has them (on Linux 6.18 loopback, a good part of bulk transfers); a connection whose bytes \
     the kernel repeats is reset, not passed on; use sockmap only on a kernel that passes this \
     check (skactivate-proxy(8), MODES)";

pub fn run(opts: Options) -> Result<()> {
    crate::daemon::init_logging();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    let r = local.block_on(&rt, serve(opts));
    if let Err(e) = &r {
        tracing::error!("{e:#}");
        let _ = notify::notify_nowait(&[NotifyState::Status(&format!("failed: {e:#}"))]);
    }
    r
}

async fn serve(opts: Options) -> Result<()> {
    let sockets = passed_sockets()?;
    if opts.connections_max == 0 {
        bail!("--connections-max must be at least 1");
    }
    let mut streams = Vec::new();
    let mut connected = Vec::new();
    let mut datagrams = Vec::new();
    for fd in sockets {
        let ty = sys::sock_type(fd.as_fd()).context("a passed fd is not a socket")?;
        match ty {
            libc::SOCK_STREAM if sys::is_listening(fd.as_fd())? => streams.push(fd),
            libc::SOCK_STREAM => connected.push(fd),
            libc::SOCK_DGRAM => datagrams.push(fd),
            other => bail!(
                "passed socket of type {other} (only stream and datagram sockets are proxied)"
            ),
        }
    }
    if !datagrams.is_empty() {
        datagram::check_options(&opts)?;
    }
    for fd in streams.iter().chain(&datagrams).chain(&connected) {
        sys::set_nonblocking(fd.as_fd()).context("O_NONBLOCK on a passed socket")?;
    }
    let shared = Rc::new(Shared {
        slots: Arc::new(Semaphore::new(opts.connections_max)),
        opts,
        choice: Choice::default(),
        credit: sockmap::Credit::serving(),
        open: Cell::new(0),
        idle_since: Cell::new(Instant::now()),
        served: Cell::new(0),
        redirected: Cell::new(0),
        copied: Cell::new(0),
        spliced: Cell::new(0),
        trimmed: Cell::new(0),
    });
    // Serving starts now: connections that come while the mode is decided
    // are copied until it is (Path::Deciding).
    let mut tasks = tokio::task::JoinSet::new();
    let (n_streams, n_datagrams) = (streams.len(), datagrams.len());
    for fd in streams {
        tasks.spawn_local(accept_loop(shared.clone(), fd));
    }
    for fd in datagrams {
        tasks.spawn_local(datagram::serve(shared.clone(), fd));
    }
    let accept_yes = !connected.is_empty();
    let n_connected = connected.len();
    for fd in connected {
        let peer = sys::peer_addr(fd.as_fd()).unwrap_or(Addr::Other);
        let shared = shared.clone();
        shared.opened();
        tokio::task::spawn_local(async move { serve_connection(shared, fd, peer).await });
    }
    let (kernel, mode_line) = choose_mode(&shared.opts).await;
    tracing::info!(
        "proxying to {}: {mode_line}; {n_streams} listening stream, {n_datagrams} datagram, \
         {n_connected} connected socket(s)",
        shared.opts.target,
    );
    *shared.choice.line.borrow_mut() = mode_line;
    if let Some(k) = kernel {
        let _ = shared.choice.kernel.set(k);
        let shared = shared.clone();
        tokio::task::spawn_local(async move {
            if let Some(k) = shared.choice.kernel() {
                k.wake_events().await;
            }
        });
    }
    shared.choice.decided.set(true);
    // Never waits on the manager: see crate::notify.
    let mut notifier = notify::Notifier::default();
    notifier.update(true, &status_line(&shared));
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            r = tasks.join_next(), if !tasks.is_empty() => {
                if let Some(r) = r {
                    r.context("a listening task")??;
                }
            }
            _ = tick.tick() => {}
        }
        // What found the queue full is sent again here.
        notifier.update(true, &status_line(&shared));
        let idle = shared.open.get() == 0;
        if accept_yes && idle && tasks.is_empty() {
            // Accept=yes: our one connection is done.
            return Ok(());
        }
        if let Some(t) = shared.opts.exit_idle_time
            && idle
            && shared.idle_since.get().elapsed() >= t
        {
            tracing::info!("no connection for {t:?}: exiting (--exit-idle-time)");
            let _ = notify::notify_nowait(&[NotifyState::Stopping]);
            return Ok(());
        }
    }
}

/// A time span as systemd writes them: `30s`, `5min`, `1h`, `500ms`, `2min
/// 30s`, or a bare number of seconds.
pub fn parse_time(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a time span (like 30s, 5min, 1h, 500ms)");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let n: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = rest[digits..].trim_start();
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        let secs = match unit {
            "" | "s" | "sec" | "second" | "seconds" => 1.0,
            "ms" | "msec" => 1e-3,
            "us" | "usec" => 1e-6,
            "m" | "min" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86400.0,
            _ => return Err(bad()),
        };
        total += Duration::try_from_secs_f64(n * secs).map_err(|_| bad())?;
    }
    Ok(total)
}

/// Real sockets for the unit tests of the proxy's modules.
#[cfg(test)]
mod testing {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::fd::OwnedFd;
    use std::thread::JoinHandle;

    use tokio::io::unix::AsyncFd;

    /// A connected TCP pair on loopback: (the end the proxy's code uses,
    /// nonblocking and watched; the test's end).
    pub fn pair() -> (AsyncFd<OwnedFd>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (theirs, _) = l.accept().unwrap();
        theirs.set_nonblocking(true).unwrap();
        (super::watch(OwnedFd::from(theirs)).unwrap(), ours)
    }

    /// A client and a backend, each a [`pair`]: (the proxy's client end,
    /// the client, the proxy's backend end, the backend). The client has
    /// sent `request` and its FIN.
    pub fn request_sent(
        request: &[u8],
    ) -> (AsyncFd<OwnedFd>, TcpStream, AsyncFd<OwnedFd>, TcpStream) {
        let (c, mut client) = pair();
        let (b, backend) = pair();
        client.write_all(request).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        (c, client, b, backend)
    }

    /// The backend, in a thread: reads the request to EOF, then sends
    /// `reply` (and its FIN, where `fin`). The thread returns the request.
    pub fn reply_after_eof(
        mut backend: TcpStream,
        reply: Vec<u8>,
        fin: bool,
    ) -> JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).unwrap();
            backend.write_all(&reply).unwrap();
            if fin {
                backend.shutdown(Shutdown::Write).unwrap();
            }
            got
        })
    }

    /// Run `f` on a runtime like the proxy's (one thread).
    pub fn run<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            "127.0.0.1:80".parse::<Target>(),
            Ok(Target::Addr("127.0.0.1:80".parse().unwrap()))
        );
        assert_eq!(
            "[2001:db8::1]:443".parse::<Target>(),
            Ok(Target::Addr("[2001:db8::1]:443".parse().unwrap()))
        );
        assert_eq!(
            "localhost:8080".parse::<Target>(),
            Ok(Target::Host("localhost".into(), 8080))
        );
        assert_eq!(
            "/run/app.sock".parse::<Target>(),
            Ok(Target::Unix(b"/run/app.sock".to_vec()))
        );
        assert_eq!(
            "@app".parse::<Target>(),
            Ok(Target::UnixAbstract(b"app".to_vec()))
        );
        for bad in [
            "localhost",
            "host:0",
            "host:70000",
            "2001:db8::1:80",
            "@",
            ":80",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    /// A connection that comes while the mode is decided is copied, past
    /// its threshold too, until the decision; splice decided, it is spliced
    /// from there, every byte once and in order.
    #[test]
    fn a_connection_copied_while_deciding_is_spliced_once_splice_is_decided() {
        use std::io::{Read, Write};
        // Before the decision; after it, while the opening settles; then
        // the rest, spliced.
        const FIRST: usize = 256 * 1024;
        const SECOND: usize = 16 * 1024;
        let data = probe::pattern(5, 4 << 20);
        let choice = Choice::default();
        let (r, stats, writer, reader) = testing::run(async {
            let (c, mut client) = testing::pair();
            let (b, mut backend) = testing::pair();
            let sent = data.clone();
            let writer = std::thread::spawn(move || {
                client.write_all(&sent[..FIRST]).unwrap();
                std::thread::sleep(Duration::from_millis(200));
                client.write_all(&sent[FIRST..FIRST + SECOND]).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                client.write_all(&sent[FIRST + SECOND..]).unwrap();
                client.shutdown(std::net::Shutdown::Write).unwrap();
                client
            });
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                backend.read_to_end(&mut got).unwrap();
                backend.shutdown(std::net::Shutdown::Write).unwrap();
                got
            });
            let relay = relay_pair(
                Path::Deciding(&choice),
                sockmap::Credit::fixed(1 << 20),
                opening::ARM_AFTER,
                c,
                b,
                b"",
                None,
            );
            let decide = async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                choice.decided.set(true);
            };
            let ((r, stats), ()) = tokio::join!(relay, decide);
            (r, stats, writer, reader)
        });
        r.unwrap();
        let mut client = writer.join().unwrap();
        assert!(reader.join().unwrap() == data, "the bytes differ");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        // Past the threshold (64 KiB) before the decision, and copied all
        // the same, then what the settling read took; the rest spliced.
        assert_eq!(stats.copied, [(FIRST + SECOND) as u64, 0], "{stats:?}");
        assert_eq!(
            stats.spliced,
            [(data.len() - FIRST - SECOND) as u64, 0],
            "{stats:?}"
        );
        assert_eq!(stats.redirected, [0, 0]);
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_time("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_time("2min 30s"), Ok(Duration::from_secs(150)));
        assert_eq!(parse_time("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_time("soon").is_err());
        assert!(parse_time("").is_err());
    }
}
