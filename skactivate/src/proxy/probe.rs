//! `--mode sockmap`: does the sockmap path work on this kernel? Asked of its
//! behaviour, not its version: the same code that serves clients
//! ([`super::relay_pair`]) proxies one connection over a loopback pair, and
//! the bytes must arrive whole and in order:
//!
//! * the program loads and attaches (CAP_BPF, CAP_NET_ADMIN, sk_skb verdict
//!   without a stream parser, SOCKHASH lookups from the program);
//! * bytes the client sent before the connection was armed arrive first;
//! * 2 MiB each way, with the kernel redirecting (its counters say so);
//! * a backend that stops reading for a while makes the program stop
//!   redirecting (the bound on queued memory) and the proxy go on in order;
//! * the client's `shutdown(SHUT_WR)`, a FIN in a segment of its own,
//!   reaches the backend as EOF (the FIN handling fixed in Linux 6.4), and
//!   the backend's reply after it still reaches the client, then its EOF;
//! * every step wakes up in time (stuck backlogs, lost wake-ups: a timeout).
//!
//! `SKACTIVATE_PROXY_PROBE=fail` in the environment makes the probe fail,
//! to test the fallback.
//!
//! What it cannot see: whole segments the kernel hands the program a second
//! time, which takes retransmitted segments (see [`super::sockmap`], "Known
//! defect"). A loopback pair of its own does not retransmit on demand, which is why `--mode auto`
//! splices (skactivate-proxy(8), MODES).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use super::sockmap::Kernel;

/// The environment variable that forces the probe to fail.
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

/// The kernel, loaded and proven; or why not.
pub async fn probe() -> Result<Kernel, String> {
    if std::env::var(FORCE_FAIL_ENV).as_deref() == Ok("fail") {
        return Err(format!("forced by {FORCE_FAIL_ENV}=fail"));
    }
    let kernel = Kernel::load().map_err(|e| e.to_string())?;
    let io = |what: &str, e: std::io::Error| format!("loopback pair: {what}: {e}");
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
    let relay = super::relay_pair(Some(&kernel), PROBE_LIMIT, accepted, backend, b"", None);
    // The credit signals too, as when serving.
    let relay = async {
        tokio::select! {
            r = relay => r,
            () = async {
                kernel.credit_events().await;
                std::future::pending::<()>().await;
            } => unreachable!(),
        }
    };
    let (r, stats) = tokio::time::timeout(STEP_TIMEOUT * 4, relay)
        .await
        .map_err(|_| {
            "the proxied connection did not finish (lost wake-up or stuck queue)".to_owned()
        })?;
    let d = tokio::time::timeout(STEP_TIMEOUT * 4, driver)
        .await
        .map_err(|_| "the test client did not finish".to_owned())?
        .map_err(|e| format!("test client: {e}"))?;
    d?;
    r.map_err(|e| format!("the proxied connection failed: {e}"))?;
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
    Ok(kernel)
}

/// The client and the backend of the probe, on blocking sockets.
fn drive(mut client: TcpStream, mut server: TcpStream) -> Result<(), String> {
    let e = |what: &str, e: std::io::Error| format!("{what}: {e}");
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
    let w = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&up2)?;
        // A FIN of its own, not on the last data segment: a bare FIN must
        // not break the connection.
        std::thread::sleep(Duration::from_millis(50));
        writer.shutdown(Shutdown::Write)
    });
    // The backend stalls first: the program must stop redirecting.
    std::thread::sleep(Duration::from_millis(200));
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
    std::thread::sleep(Duration::from_millis(50));
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
