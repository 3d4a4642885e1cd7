//! The opening of a sockmap-mode connection: the proxy copies its first
//! bytes itself, and arms the connection (sockmap.rs) only once it has
//! moved enough for the kernel's path to pay.
//!
//! Arming costs a connection some twenty system calls whatever it carries:
//! the sockets' cookies and TCP state, four map inserts, the receive
//! buffers, the kick, the `sides` entries, and six map calls when it ends
//! (its counts read, its entries deleted). Copying costs two (a `recv` and
//! a `send`) per read. A connection that carries one request and one short
//! reply is done before arming would have paid, so the proxy copies until
//! the connection has moved
//! [`ARM_AFTER`]'s bytes in one direction or made its reads, whichever
//! comes first: about what arming costs, spent on copying (the rule of
//! renting until the rent paid equals the price). A bulk transfer is armed
//! after its first 64 KiB, a request/response exchange after a few round
//! trips, and a short connection never.
//!
//! # Where the copying stops
//!
//! Arming needs no byte of the connection in user space: bytes we have
//! read go out before any the kernel will redirect. So [`copy`] returns
//! [`Next::Arm`] only when neither direction holds a byte: everything read
//! so far was written to the other socket, and bytes that arrive from then
//! on wait in the receive queues until arming takes them through the
//! program (the kick, sockmap.rs step 4), ahead of any later byte.
//!
//! Nor may a receive queue start with a segment we have read part of. The
//! verdict path takes the queue's skbs whole (`tcp_read_skb()`, sockmap.rs,
//! "Known defect"): the part we read would go through a second time (a
//! 64 KiB skb read 16 KiB at a time made the first test transfers arrive
//! with 65536 bytes repeated, and the proxy reset them). So once past the
//! threshold a direction *settles*: it asks how many bytes are queued
//! (`SIOCINQ`) and reads with a buffer larger than that, twice as large
//! and 64 KiB more (up to 256 KiB), for what arrives meanwhile.
//! `tcp_recvmsg()` stops short
//! of a full buffer only when the queue has no byte left, having freed
//! every skb it read; such a read leaves the direction *clean*. A read that
//! fills the buffer may have stopped inside a segment, and the direction
//! settles again. A queue found empty is clean too. What arrives after a
//! clean read comes as segments of its own, unread.
//! The connection is armed once both directions are clean and hold
//! nothing.
//!
//! A direction that holds bytes (dst took not all) reads nothing more
//! until they are written; the other reads on, settling, so that a peer
//! that reads only as far as its own writes get through is never kept
//! waiting by us. But a flow that never stops in either direction would
//! then never have both clean at once: while one direction holds, the
//! other keeps reading what keeps arriving. So a clean direction *pauses*
//! (is not read) while the other writes out what it holds to the same
//! peer. A peer may be waiting for its own writes to get through before it
//! reads, which the pause holds up; such a peer neither takes our bytes nor
//! sends more once its window is shut. So the pause goes on only while the
//! peer shows life: every [`PAUSE`] it must have taken bytes, or sent more
//! (the paused direction's receive queue grew). Else the paused direction
//! reads again, and after [`PAUSES`] such pauses the connection pauses no
//! more. A live peer keeps the pause going until the other direction has
//! written everything, settled, and both are clean.
//!
//! Every settling read counts. A connection whose queues are not both
//! clean after [`SETTLE_ROUNDS`] of them is left to splice
//! ([`Next::Unsettled`]), with what each direction holds written out first.
//!
//! While the proxy's mode is being decided (the program loading, the
//! probe, at start) no connection has moved enough: it is copied until the
//! decision, and then armed as above, or spliced.
//!
//! A direction that ended during the opening (EOF read and forwarded with
//! `shutdown`) leaves a socket that can no longer join a SOCKHASH: the other
//! direction, once past the threshold, goes on with splice instead.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

use super::sys;
use super::{Activity, Fault};

/// When a connection has moved enough to be armed.
#[derive(Debug, Clone, Copy)]
pub struct Threshold {
    /// Bytes read in one direction.
    pub bytes: u64,
    /// Reads that returned bytes, both directions together.
    pub reads: u32,
}

/// What serving uses: 64 KiB copy in some 20 µs here, about what arming
/// and disarming take; so do eight reads with their wake-ups.
pub const ARM_AFTER: Threshold = Threshold {
    bytes: 64 * 1024,
    reads: 8,
};

/// Arm before reading anything (the probe: it tests the kernel's path on
/// the early bytes).
pub const ARM_AT_ONCE: Threshold = Threshold { bytes: 0, reads: 0 };

/// The most a direction reads at once, and holds, before the threshold.
pub const BUF: usize = 16 * 1024;

/// The most one settling read takes: twice what is queued and
/// [`SETTLE_SLACK`], up to this (a buffer of a connection's, held only
/// while it settles; a queue longer than that is read in more rounds).
const SETTLE_MAX: usize = 256 * 1024;
const SETTLE_SLACK: usize = 64 * 1024;

/// Settling reads (both directions together, wherever done) before a
/// connection is left to splice.
pub const SETTLE_ROUNDS: u32 = 64;

/// How long a clean direction stays unread while its peer shows no sign of
/// life: takes nothing of what the other direction holds for it, and sends
/// nothing more (the module's "pauses").
pub const PAUSE: Duration = Duration::from_millis(5);

/// Pauses that may run out before a connection pauses no more.
pub const PAUSES: u32 = 2;

/// What the connection does after its opening.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Both directions ended (each EOF forwarded): nothing left to do.
    Ended,
    /// Both sockets may be armed: nothing of the connection is held.
    Arm,
    /// One direction ended; the other, client to backend if `true`, goes on.
    Rest(bool),
    /// The receive queues never came to be clean together: splice both
    /// directions, each after writing out what it holds.
    Unsettled(Held),
}

/// Bytes read and not yet written on, client to backend and backend to
/// client.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub up: Vec<u8>,
    pub down: Vec<u8>,
}

/// One direction of the opening.
struct Leg<'a> {
    src: &'a AsyncFd<OwnedFd>,
    dst: &'a AsyncFd<OwnedFd>,
    what: &'static str,
    /// Read from src and not yet written to dst: `buf[head..tail]`.
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    /// Bytes read from src (each one written to dst, or held).
    read: u64,
    /// The receive queue holds no segment we read part of: nothing was
    /// read, or the last read was a settling read that took exactly what
    /// was queued while nothing arrived.
    clean: bool,
    /// EOF read from src; `ended` once forwarded to dst.
    eof: bool,
    ended: bool,
}

/// What a settling read found.
enum Settled {
    /// The queue holds only whole segments.
    Clean,
    /// Bytes were read; ask again.
    Read,
}

impl<'a> Leg<'a> {
    fn new(src: &'a AsyncFd<OwnedFd>, dst: &'a AsyncFd<OwnedFd>, what: &'static str) -> Self {
        Leg {
            src,
            dst,
            what,
            buf: Vec::new(),
            head: 0,
            tail: 0,
            read: 0,
            clean: true,
            eof: false,
            ended: false,
        }
    }

    fn holding(&self) -> bool {
        self.head < self.tail
    }

    /// What is held, handed on.
    fn take_held(&mut self) -> Vec<u8> {
        let held = self.buf[self.head..self.tail].to_vec();
        self.head = self.tail;
        held
    }

    /// Clean, holding nothing, and the other direction holds bytes: this
    /// one may pause while they go out.
    fn may_pause(&self, other: &Leg<'_>) -> bool {
        self.clean && !self.holding() && !self.eof && other.holding()
    }

    /// A direction holding bytes reads no more until they are written; one
    /// that is not reads on, before the threshold and after it (settling):
    /// a direction that stopped reading while the other waits to write
    /// could be what keeps that other's peer from reading.
    fn may_read(&self) -> bool {
        !self.eof && !self.holding()
    }

    fn read_fault(&self, e: io::Error) -> Fault {
        Fault::Read(e).on(self.what)
    }

    /// Readable, before the threshold: read once, and write what was read
    /// as far as dst takes it now. Returns whether bytes were read.
    fn on_readable(
        &mut self,
        guard: io::Result<AsyncFdReadyGuard<'_, OwnedFd>>,
        activity: &Activity,
    ) -> Result<bool, Fault> {
        let mut guard = guard.map_err(|e| self.read_fault(e))?;
        if self.buf.len() < BUF {
            self.buf = vec![0u8; BUF];
        }
        let n = match guard.try_io(|fd| sys::recv(fd.get_ref().as_fd(), &mut self.buf[..BUF])) {
            Err(_would_block) => return Ok(false),
            Ok(r) => r.map_err(|e| self.read_fault(e))?,
        };
        self.clean = false;
        self.got(n, activity)
    }

    /// Readable, past the threshold: settle (a readiness that finds nothing
    /// queued is cleared by looking, not reading).
    fn on_readable_settling(
        &mut self,
        guard: io::Result<AsyncFdReadyGuard<'_, OwnedFd>>,
        activity: &Activity,
    ) -> Result<bool, Fault> {
        let mut guard = guard.map_err(|e| self.read_fault(e))?;
        let mut byte = [0u8; 1];
        match guard.try_io(|fd| sys::recv_peek(fd.get_ref().as_fd(), &mut byte)) {
            Err(_would_block) => Ok(false),
            Ok(Ok(0)) => {
                // EOF and nothing before it.
                self.clean = true;
                self.got(0, activity)
            }
            Ok(Ok(_)) => {
                // Bytes arrived (after a clean read, too: while the other
                // direction waits to write, this one reads on).
                self.clean = false;
                self.settle(activity).map(|s| matches!(s, Settled::Read))
            }
            Ok(Err(e)) => Err(self.read_fault(e)),
        }
    }

    /// `n` bytes were read into the buffer (0: EOF): write them as far as
    /// dst takes them now. Returns whether bytes were read.
    fn got(&mut self, n: usize, activity: &Activity) -> Result<bool, Fault> {
        if n == 0 {
            self.eof = true;
            return self.forward_eof().map(|()| false);
        }
        activity.touch();
        self.read += n as u64;
        (self.head, self.tail) = (0, n);
        match sys::send(self.dst.get_ref().as_fd(), &self.buf[..n]) {
            Ok(m) => self.head = m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Fault::Write(e).on(self.what)),
        }
        Ok(true)
    }

    /// Read everything queued (the module's "settles"), and write it as far
    /// as dst takes it now. Called with nothing held.
    fn settle(&mut self, activity: &Activity) -> Result<Settled, Fault> {
        if self.clean {
            return Ok(Settled::Clean);
        }
        let src = self.src.get_ref().as_fd();
        let queued = sys::inq(src).map_err(|e| self.read_fault(e))?;
        if queued == 0 {
            // Read to the end of what had arrived: nothing partly read
            // (what arrives later comes as segments of its own).
            self.clean = true;
            return Ok(Settled::Clean);
        }
        // Room for what arrives meanwhile, too.
        let want = usize::try_from(queued)
            .map_or(SETTLE_MAX, |q| {
                q.saturating_mul(2).saturating_add(SETTLE_SLACK)
            })
            .min(SETTLE_MAX);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let n = match sys::recv(src, &mut self.buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Settled::Read),
            Err(e) => return Err(self.read_fault(e)),
        };
        // A read that did not fill the buffer stopped because the queue
        // had no byte left: every segment it touched was taken whole.
        self.clean = n < want;
        self.got(n, activity)?;
        Ok(Settled::Read)
    }

    /// Write more of what is held. Returns whether dst took any.
    fn on_writable(
        &mut self,
        guard: io::Result<AsyncFdReadyGuard<'_, OwnedFd>>,
    ) -> Result<bool, Fault> {
        let mut guard = guard.map_err(|e| Fault::Write(e).on(self.what))?;
        let held = &self.buf[self.head..self.tail];
        match guard.try_io(|fd| sys::send(fd.get_ref().as_fd(), held)) {
            Err(_would_block) => Ok(false),
            Ok(Ok(m)) => {
                self.head += m;
                self.forward_eof().map(|()| m > 0)
            }
            Ok(Err(e)) => Err(Fault::Write(e).on(self.what)),
        }
    }

    /// After the last held byte: the EOF read, if it was.
    fn forward_eof(&mut self) -> Result<(), Fault> {
        if self.eof && !self.ended && !self.holding() {
            sys::shutdown_write(self.dst.get_ref().as_fd())
                .map_err(|e| Fault::Write(e).on(self.what))?;
            self.ended = true;
        }
        Ok(())
    }
}

/// The bytes each direction's opening copied.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// Client to backend, backend to client.
    pub bytes: [u64; 2],
}

/// The module's "pauses": while one runs, when it is next looked at, and
/// how many ran out.
#[derive(Default)]
struct Pause {
    until: Option<tokio::time::Instant>,
    /// Which direction it holds unread (client to backend: `true`).
    up: bool,
    /// What the paused direction's receive queue held when last looked at.
    queued: u64,
    /// One ran out; none starts again until neither direction may pause.
    off: bool,
    ran_out: u32,
}

impl Pause {
    /// Whether the direction that may pause (`may`: client to backend if
    /// `true`) does so now; starts the clock, anew for a pause of the other
    /// direction.
    fn on(&mut self, may: Option<bool>) -> bool {
        let Some(up) = may.filter(|_| !self.off && self.ran_out < PAUSES) else {
            self.until = None;
            self.off &= may.is_some();
            return false;
        };
        if self.until.is_none() || self.up != up {
            self.until = Some(tokio::time::Instant::now() + PAUSE);
            self.up = up;
            self.queued = 0;
        }
        true
    }

    /// A PAUSE passed without the holding direction's dst taking a byte.
    /// The paused direction's receive queue holds `queued` bytes now: if
    /// more than before, the peer is still writing, so not blocked by us,
    /// and the pause goes on; else it runs out.
    fn tick(&mut self, queued: u64) {
        if queued > self.queued {
            self.queued = queued;
            self.progress();
        } else {
            self.until = None;
            self.off = true;
            self.ran_out += 1;
        }
    }

    /// Dst took bytes from the direction that holds them: another PAUSE.
    fn progress(&mut self) {
        if let Some(until) = &mut self.until {
            *until = tokio::time::Instant::now() + PAUSE;
        }
    }

    async fn ran_out_at(until: Option<tokio::time::Instant>) {
        match until {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }
}

/// Copy between `client` and `backend` until the connection ends or has
/// moved enough to be armed (the module's documentation), and `decided`
/// says it may be (the proxy's mode is decided). `copied` says what was
/// moved, however it ends.
pub async fn copy(
    client: &AsyncFd<OwnedFd>,
    backend: &AsyncFd<OwnedFd>,
    threshold: Threshold,
    decided: &dyn Fn() -> bool,
    activity: &Activity,
    copied: &mut Copied,
) -> Result<Next, Fault> {
    let mut up = Leg::new(client, backend, "client to backend");
    let mut down = Leg::new(backend, client, "backend to client");
    let mut reads = 0u32;
    let mut settling = 0u32;
    let mut pause = Pause::default();
    let r = loop {
        copied.bytes = [up.read, down.read];
        if up.ended && down.ended {
            break Ok(Next::Ended);
        }
        let enough = (reads >= threshold.reads
            || up.read >= threshold.bytes
            || down.read >= threshold.bytes)
            && decided();
        if enough && !up.holding() && !down.holding() {
            if up.ended || down.ended {
                break Ok(Next::Rest(!up.ended));
            }
            if up.clean && down.clean {
                break Ok(Next::Arm);
            }
        }
        if enough && settling >= SETTLE_ROUNDS && !up.eof && !down.eof {
            let held = Held {
                up: up.take_held(),
                down: down.take_held(),
            };
            break Ok(Next::Unsettled(held));
        }
        if enough && !up.holding() && !down.holding() {
            settling += 1;
            // Settle both now; a direction that read goes round again
            // (writing out what it holds first, if dst took not all).
            let settled = up
                .settle(activity)
                .and_then(|a| Ok((a, down.settle(activity)?)));
            match settled {
                Ok((Settled::Clean, Settled::Clean)) => continue,
                Ok(_) if !up.holding() && !down.holding() => continue,
                Ok(_) => {}
                Err(f) => break Err(f),
            }
        }
        // At most one direction may pause: the other holds bytes.
        let may = if !enough {
            None
        } else if up.may_pause(&down) {
            Some(true)
        } else if down.may_pause(&up) {
            Some(false)
        } else {
            None
        };
        let paused = pause.on(may);
        let (pause_up, pause_down) = (paused && pause.up, paused && !pause.up);
        let (up_src, up_dst, down_src, down_dst) = (up.src, up.dst, down.src, down.dst);
        let step = tokio::select! {
            g = up_src.readable(), if up.may_read() && !pause_up => if enough {
                up.on_readable_settling(g, activity)
            } else {
                up.on_readable(g, activity)
            },
            g = down_src.readable(), if down.may_read() && !pause_down => if enough {
                down.on_readable_settling(g, activity)
            } else {
                down.on_readable(g, activity)
            },
            g = up_dst.writable(), if up.holding() => up.on_writable(g).map(|took| {
                if took {
                    pause.progress();
                }
                false
            }),
            g = down_dst.writable(), if down.holding() => down.on_writable(g).map(|took| {
                if took {
                    pause.progress();
                }
                false
            }),
            () = Pause::ran_out_at(pause.until), if pause.until.is_some() => {
                let paused = if pause_up { up_src } else { down_src };
                pause.tick(sys::inq(paused.get_ref().as_fd()).unwrap_or(0));
                Ok(false)
            }
            else => Err(Fault::Read(io::Error::other("the opening has nothing to wait for"))),
        };
        match step {
            Ok(read) => {
                reads += u32::from(read);
                if enough {
                    settling += u32::from(read);
                }
            }
            Err(f) => break Err(f),
        }
    };
    copied.bytes = [up.read, down.read];
    r
}

#[cfg(test)]
mod tests {
    use super::super::testing::{pair, reply_after_eof, request_sent, run};
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};

    /// [`copy`] with the proxy's mode decided, as after its start.
    async fn copy_decided(
        c: &AsyncFd<OwnedFd>,
        b: &AsyncFd<OwnedFd>,
        threshold: Threshold,
        copied: &mut Copied,
    ) -> Result<Next, Fault> {
        copy(c, b, threshold, &|| true, &Activity::default(), copied).await
    }

    #[test]
    fn a_short_exchange_ends_without_arming() {
        run(async {
            let (c, mut client, b, backend) = request_sent(b"?");
            let peer = reply_after_eof(backend, b"!!".to_vec(), true);
            let mut copied = Copied::default();
            let next = copy_decided(&c, &b, ARM_AFTER, &mut copied).await;
            assert_eq!(next.unwrap(), Next::Ended);
            assert_eq!(copied.bytes, [1, 2]);
            assert_eq!(peer.join().unwrap(), b"?");
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"!!");
        });
    }

    #[test]
    fn the_threshold_stops_reading_with_nothing_held() {
        run(async {
            let (c, mut client) = pair();
            let (b, mut backend) = pair();
            // More than the threshold, in one go: the opening stops past
            // it, with what was queued then read whole (settled), and
            // everything it read written.
            let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let sender = {
                let data = data.clone();
                std::thread::spawn(move || client.write_all(&data).map(|()| client))
            };
            let mut copied = Copied::default();
            let next = copy_decided(&c, &b, ARM_AFTER, &mut copied).await;
            assert_eq!(next.unwrap(), Next::Arm);
            let [up, down] = copied.bytes;
            assert_eq!(down, 0);
            assert!((ARM_AFTER.bytes..=data.len() as u64).contains(&up), "{up}");
            let mut got = vec![0u8; usize::try_from(up).unwrap()];
            backend.read_exact(&mut got).unwrap();
            assert_eq!(got, data[..got.len()]);
            // The rest waits in the client socket's receive queue, unread.
            let mut rest = vec![0u8; data.len() - got.len()];
            let mut client_side = TcpStream::from(c.into_inner());
            client_side.set_nonblocking(false).unwrap();
            client_side.read_exact(&mut rest).unwrap();
            assert_eq!(rest, data[got.len()..]);
            drop(sender.join().unwrap().unwrap());
        });
    }

    #[test]
    fn reads_count_in_both_directions() {
        run(async {
            let (c, mut client) = pair();
            let (b, mut backend) = pair();
            let pong = std::thread::spawn(move || {
                let mut byte = [0u8; 1];
                for _ in 0..ARM_AFTER.reads / 2 {
                    backend.read_exact(&mut byte).unwrap();
                    backend.write_all(&byte).unwrap();
                }
            });
            let ping = std::thread::spawn(move || {
                let mut byte = [7u8; 1];
                for _ in 0..ARM_AFTER.reads / 2 {
                    client.write_all(&byte).unwrap();
                    client.read_exact(&mut byte).unwrap();
                }
                client
            });
            let mut copied = Copied::default();
            let next = copy_decided(&c, &b, ARM_AFTER, &mut copied).await;
            assert_eq!(next.unwrap(), Next::Arm);
            let half = u64::from(ARM_AFTER.reads / 2);
            assert_eq!(copied.bytes, [half, half]);
            pong.join().unwrap();
            drop(ping.join().unwrap());
        });
    }

    #[test]
    fn a_half_closed_connection_goes_on_without_arming() {
        run(async {
            let (c, mut client, b, backend) = request_sent(b"GET");
            let reply = reply_after_eof(backend, vec![1u8; 100_000], false);
            let mut copied = Copied::default();
            let next = copy_decided(&c, &b, ARM_AFTER, &mut copied).await;
            assert_eq!(
                next.unwrap(),
                Next::Rest(false),
                "backend to client goes on"
            );
            assert_eq!(reply.join().unwrap(), b"GET");
            assert!(copied.bytes[1] >= ARM_AFTER.bytes, "{copied:?}");
            let mut got = vec![0u8; usize::try_from(copied.bytes[1]).unwrap()];
            client.read_exact(&mut got).unwrap();
            assert!(got.iter().all(|&x| x == 1));
        });
    }

    #[test]
    fn at_once_reads_nothing() {
        run(async {
            let (c, mut client) = pair();
            let (b, _backend) = pair();
            client.write_all(b"early").unwrap();
            let mut copied = Copied::default();
            let next = copy_decided(&c, &b, ARM_AT_ONCE, &mut copied).await;
            assert_eq!(next.unwrap(), Next::Arm);
            assert_eq!(copied.bytes, [0, 0]);
        });
    }

    /// Both directions flowing without a pause, and a client that reads
    /// nothing for its first 300 ms while it writes: the backend-to-client
    /// direction holds bytes all that time, the other keeps reading. The
    /// opening must still end within its bounds (armed, once the client
    /// reads, or left to splice with what it holds), not copy the upload to
    /// its end as it did before its settling reads were all counted.
    #[test]
    fn a_duplex_flow_that_never_pauses_ends_within_bounds() {
        run(async {
            let (c, client) = pair();
            let (b, backend) = pair();
            const TOTAL: usize = 64 << 20;
            // Each end: one thread writing TOTAL bytes in small writes, one
            // reading after `delay`, until the proxy's ends go away.
            let flow = |s: TcpStream, delay: u64| {
                let mut w = s.try_clone().unwrap();
                let mut r = s;
                [
                    std::thread::spawn(move || {
                        let chunk = [5u8; 1024];
                        let mut sent = 0;
                        while sent < TOTAL && w.write_all(&chunk).is_ok() {
                            sent += chunk.len();
                        }
                    }),
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(delay));
                        let mut chunk = [0u8; 16 * 1024];
                        while matches!(r.read(&mut chunk), Ok(n) if n > 0) {}
                    }),
                ]
            };
            // Small buffers towards the client: the proxy soon holds bytes
            // for it.
            let small = |fd: std::os::fd::BorrowedFd<'_>, opt| {
                sys::setsockopt(fd, libc::SOL_SOCKET, opt, 4096 as libc::c_int).unwrap();
            };
            small(client.as_fd(), libc::SO_RCVBUF);
            small(c.get_ref().as_fd(), libc::SO_SNDBUF);
            let threads = [flow(client, 300), flow(backend, 0)];
            // Both directions queued before the opening starts.
            std::thread::sleep(Duration::from_millis(20));
            let mut copied = Copied::default();
            let next = copy_decided(&c, &b, ARM_AFTER, &mut copied).await;
            let bound = ARM_AFTER.bytes + BUF as u64 + u64::from(SETTLE_ROUNDS) * SETTLE_MAX as u64;
            assert!(copied.bytes[0] <= bound, "{copied:?}, bound {bound}");
            match next.unwrap() {
                Next::Arm => {}
                Next::Unsettled(held) => {
                    // Held bytes were read, not yet written.
                    assert!(held.up.len() as u64 <= copied.bytes[0], "{copied:?}");
                    assert!(held.down.len() as u64 <= copied.bytes[1], "{copied:?}");
                }
                next => panic!("{next:?}, {copied:?}"),
            }
            // Unblock the threads: the proxy's ends go, theirs fail.
            for fd in [c, b] {
                let s = TcpStream::from(fd.into_inner());
                s.shutdown(Shutdown::Both).unwrap();
            }
            for t in threads.into_iter().flatten() {
                t.join().unwrap();
            }
        });
    }
}
