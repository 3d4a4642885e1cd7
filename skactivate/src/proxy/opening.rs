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
//! waiting by us. A pair whose queues are not both clean after
//! [`SETTLE_ROUNDS`] settling reads is left to splice ([`Next::Unsettled`]).
//!
//! A direction that ended during the opening (EOF read and forwarded with
//! `shutdown`) leaves a socket that can no longer join a SOCKHASH: the other
//! direction, once past the threshold, goes on with splice instead.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

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

/// Settling reads before a connection is left to splice.
pub const SETTLE_ROUNDS: u32 = 64;

/// What the connection does after its opening.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Both directions ended (each EOF forwarded): nothing left to do.
    Ended,
    /// Both sockets may be armed: nothing of the connection is held.
    Arm,
    /// One direction ended; the other, client to backend if `true`, goes on.
    Rest(bool),
    /// The receive queues never came to be empty together: splice both
    /// directions.
    Unsettled,
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

    /// Write more of what is held.
    fn on_writable(
        &mut self,
        guard: io::Result<AsyncFdReadyGuard<'_, OwnedFd>>,
    ) -> Result<(), Fault> {
        let mut guard = guard.map_err(|e| Fault::Write(e).on(self.what))?;
        let held = &self.buf[self.head..self.tail];
        match guard.try_io(|fd| sys::send(fd.get_ref().as_fd(), held)) {
            Err(_would_block) => Ok(()),
            Ok(Ok(m)) => {
                self.head += m;
                self.forward_eof()
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

/// Copy between `client` and `backend` until the connection ends or has
/// moved enough to be armed (the module's documentation). `copied` says
/// what was moved, however it ends.
pub async fn copy(
    client: &AsyncFd<OwnedFd>,
    backend: &AsyncFd<OwnedFd>,
    threshold: Threshold,
    activity: &Activity,
    copied: &mut Copied,
) -> Result<Next, Fault> {
    let mut up = Leg::new(client, backend, "client to backend");
    let mut down = Leg::new(backend, client, "backend to client");
    let mut reads = 0u32;
    let mut settling = 0u32;
    let r = loop {
        copied.bytes = [up.read, down.read];
        if up.ended && down.ended {
            break Ok(Next::Ended);
        }
        let enough =
            reads >= threshold.reads || up.read >= threshold.bytes || down.read >= threshold.bytes;
        if enough && !up.holding() && !down.holding() {
            if up.ended || down.ended {
                break Ok(Next::Rest(!up.ended));
            }
            if up.clean && down.clean {
                break Ok(Next::Arm);
            }
            if settling == SETTLE_ROUNDS {
                break Ok(Next::Unsettled);
            }
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
        let (up_src, up_dst, down_src, down_dst) = (up.src, up.dst, down.src, down.dst);
        let step = tokio::select! {
            g = up_src.readable(), if up.may_read() => if enough {
                up.on_readable_settling(g, activity)
            } else {
                up.on_readable(g, activity)
            },
            g = down_src.readable(), if down.may_read() => if enough {
                down.on_readable_settling(g, activity)
            } else {
                down.on_readable(g, activity)
            },
            g = up_dst.writable(), if up.holding() => up.on_writable(g).map(|()| false),
            g = down_dst.writable(), if down.holding() => down.on_writable(g).map(|()| false),
            else => Err(Fault::Read(io::Error::other("the opening has nothing to wait for"))),
        };
        match step {
            Ok(read) => reads += u32::from(read),
            Err(f) => break Err(f),
        }
    };
    copied.bytes = [up.read, down.read];
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};

    /// A connected pair: (the end the opening reads, the test's end).
    fn pair() -> (AsyncFd<OwnedFd>, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (theirs, _) = l.accept().unwrap();
        theirs.set_nonblocking(true).unwrap();
        (super::super::watch(OwnedFd::from(theirs)).unwrap(), ours)
    }

    fn run<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_short_exchange_ends_without_arming() {
        run(async {
            let (c, mut client) = pair();
            let (b, mut backend) = pair();
            client.write_all(b"?").unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let peer = std::thread::spawn(move || {
                let mut got = Vec::new();
                backend.read_to_end(&mut got).unwrap();
                backend.write_all(b"!!").unwrap();
                backend.shutdown(Shutdown::Write).unwrap();
                got
            });
            let mut copied = Copied::default();
            let next = copy(&c, &b, ARM_AFTER, &Activity::default(), &mut copied).await;
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
            let next = copy(&c, &b, ARM_AFTER, &Activity::default(), &mut copied).await;
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
            let next = copy(&c, &b, ARM_AFTER, &Activity::default(), &mut copied).await;
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
            let (c, mut client) = pair();
            let (b, mut backend) = pair();
            client.write_all(b"GET").unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let reply = std::thread::spawn(move || {
                let mut got = Vec::new();
                backend.read_to_end(&mut got).unwrap();
                backend.write_all(&[1u8; 100_000]).unwrap();
                got
            });
            let mut copied = Copied::default();
            let next = copy(&c, &b, ARM_AFTER, &Activity::default(), &mut copied).await;
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
            let next = copy(&c, &b, ARM_AT_ONCE, &Activity::default(), &mut copied).await;
            assert_eq!(next.unwrap(), Next::Arm);
            assert_eq!(copied.bytes, [0, 0]);
        });
    }
}
