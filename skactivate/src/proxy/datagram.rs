//! `ListenDatagram=` sockets: each client address gets its own UDP socket
//! connected to the target, so the backend sees one peer per client and its
//! replies find their way back: a datagram arriving on the connected socket
//! is sent from the listening socket to that client. A flow ends after
//! `--idle-timeout` without a datagram either way (60 s by default). Flows
//! count against `--connections-max`; a datagram from a new client beyond it
//! is dropped, and the journal says so.
//!
//! Replies leave from the address the client sent to: the socket asks for
//! each datagram's local address (`IP_PKTINFO`, `IPV6_RECVPKTINFO`) and
//! sends the replies with it, so a socket bound to a wildcard address (or
//! one that `sk_lookup` steers traffic for other addresses to) answers from
//! the address the client used, and a client's connected socket accepts the
//! reply. A client talking to two of our addresses has a flow for each.
//!
//! With `--proxy-protocol v2` every datagram to the backend starts with the
//! header (the PROXY protocol's form for datagrams); v1 has none.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::unix::AsyncFd;

use super::header::{self, Transport, Version};
use super::sys::{self, Addr, PktInfo};
use super::{DATAGRAM_IDLE_DEFAULT, Options, Shared, Target};

/// The largest datagram (IPv4 and IPv6 without jumbograms).
const MAX_DATAGRAM: usize = 65535;

/// Options that datagram sockets cannot honour are errors at start.
pub fn check_options(opts: &Options) -> Result<()> {
    if opts.proxy_protocol == Some(Version::V1) {
        bail!(
            "--proxy-protocol v1 has no form for datagrams (a ListenDatagram= socket was passed): use v2"
        );
    }
    if matches!(opts.target, Target::Unix(_) | Target::UnixAbstract(_)) {
        bail!(
            "{}: datagram sockets are proxied to HOST:PORT targets only",
            opts.target
        );
    }
    Ok(())
}

/// A client's address and the local address it sent to.
type FlowKey = (Addr, Option<std::net::IpAddr>);

struct Flow {
    sock: Rc<AsyncFd<OwnedFd>>,
    last: Rc<Cell<Instant>>,
}

/// Serve one datagram socket until it fails.
pub async fn serve(shared: Rc<Shared>, fd: OwnedFd) -> Result<()> {
    let listener = Rc::new(super::watch(fd).context("registering a datagram socket")?);
    let bound = sys::local_addr(listener.get_ref().as_fd()).unwrap_or(Addr::Other);
    if let Err(e) = sys::enable_pktinfo(listener.get_ref().as_fd()) {
        tracing::warn!(
            "datagram socket {bound}: IP_PKTINFO/IPV6_RECVPKTINFO: {e}; replies leave from the address routing picks"
        );
    }
    let idle = shared.opts.idle_timeout.unwrap_or(DATAGRAM_IDLE_DEFAULT);
    let flows: Rc<RefCell<HashMap<FlowKey, Flow>>> = Rc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut refused_at: Option<Instant> = None;
    loop {
        let mut g = listener.readable().await.context("datagram socket")?;
        let (n, client, to) = match g.try_io(|l| sys::recv_pktinfo(l.get_ref().as_fd(), &mut buf)) {
            Err(_would_block) => continue,
            Ok(Ok(r)) => r,
            // ICMP errors from earlier sends, a full buffer: not fatal.
            Ok(Err(e)) => {
                tracing::debug!("datagram socket: {e}");
                continue;
            }
        };
        drop(g);
        let key: FlowKey = (client.clone(), to.as_ref().map(PktInfo::ip));
        let existing = flows
            .borrow()
            .get(&key)
            .map(|f| (f.sock.clone(), f.last.clone()));
        let (sock, last) = match existing {
            Some(f) => f,
            None => {
                let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
                    if refused_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(
                            "{client}: --connections-max {} reached, dropping datagrams from new clients",
                            shared.opts.connections_max
                        );
                        refused_at = Some(Instant::now());
                    }
                    continue;
                };
                let sock = match open_flow(&shared.opts.target).await {
                    Ok(s) => Rc::new(s),
                    Err(e) => {
                        tracing::warn!("{client}: {}: {e}", shared.opts.target);
                        continue;
                    }
                };
                let last = Rc::new(Cell::new(Instant::now()));
                flows.borrow_mut().insert(
                    key.clone(),
                    Flow {
                        sock: sock.clone(),
                        last: last.clone(),
                    },
                );
                shared.opened();
                let (shared2, flows2, listener2) =
                    (shared.clone(), flows.clone(), listener.clone());
                let (sock2, last2, key2) = (sock.clone(), last.clone(), key.clone());
                tokio::task::spawn_local(async move {
                    replies(&listener2, &sock2, &key2.0, to.as_ref(), &last2, idle).await;
                    flows2.borrow_mut().remove(&key2);
                    shared2.closed();
                    drop(permit);
                });
                (sock, last)
            }
        };
        last.set(Instant::now());
        let datagram = match shared.opts.proxy_protocol {
            Some(v) => {
                // The destination is the address the client sent to.
                let local = match (&to, &bound) {
                    (Some(to), Addr::Ip(b)) => {
                        Addr::Ip(std::net::SocketAddr::new(to.ip(), b.port()))
                    }
                    _ => bound.clone(),
                };
                let mut d = header::encode(v, Transport::Datagram, &client, &local);
                d.extend_from_slice(&buf[..n]);
                d
            }
            None => buf[..n].to_vec(),
        };
        // Datagrams may be lost; a full socket buffer drops this one.
        if let Err(e) = sys::send(sock.get_ref().as_fd(), &datagram) {
            tracing::debug!("{client}: to {}: {e}", shared.opts.target);
        }
    }
}

/// A UDP socket connected to the target.
async fn open_flow(target: &Target) -> std::io::Result<AsyncFd<OwnedFd>> {
    let addrs = target.resolve().await?;
    let addr = addrs
        .into_iter()
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let fd = sys::socket(sys::family(&addr), libc::SOCK_DGRAM)?;
    sys::connect(fd.as_fd(), &addr)?;
    super::watch(fd)
}

/// Send what the backend answers to `client`, until the flow is idle.
async fn replies(
    listener: &AsyncFd<OwnedFd>,
    sock: &AsyncFd<OwnedFd>,
    client: &Addr,
    from: Option<&PktInfo>,
    last: &Cell<Instant>,
    idle: Duration,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let deadline = last.get() + idle;
        tokio::select! {
            r = sock.readable() => {
                let Ok(mut g) = r else { return };
                match g.try_io(|s| sys::recv(s.get_ref().as_fd(), &mut buf)) {
                    Err(_would_block) => {}
                    Ok(Ok(n)) => {
                        last.set(Instant::now());
                        if let Err(e) = sys::send_from(listener.get_ref().as_fd(), &buf[..n], client, from) {
                            tracing::debug!("to {client}: {e}");
                        }
                    }
                    // ECONNREFUSED: the backend port is closed; keep the
                    // flow, a later datagram may find it open.
                    Ok(Err(e)) => tracing::debug!("{client}: from the backend: {e}"),
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                if last.get() + idle <= Instant::now() {
                    tracing::debug!("{client}: datagram flow idle for {idle:?}, closed");
                    return;
                }
            }
        }
    }
}
