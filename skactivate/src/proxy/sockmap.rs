//! `--mode sockmap`: the kernel moves the bytes (ebpf/proxy.bpf.c).
//!
//! This module is the only owner of the proxy's BPF objects: one SOCKHASH of
//! sockets by cookie, the per-side settings user space writes (`sides`), the
//! per-side counters the program writes (`counts`), and the verdict program
//! attached to the SOCKHASH.
//!
//! # Arming a connection, and the bytes that arrive meanwhile
//!
//! A socket joins the verdict path when it is inserted into the SOCKHASH, but
//! bytes already in its receive queue are not looked at until the next
//! "data ready" event; bytes that arrive between `accept()` and the insert
//! would sit there (or, read by us afterwards, race with later bytes the
//! program redirects). The sequence, per connection:
//!
//! 1. `accept()`, `connect()` the backend; note each socket's
//!    `tcpi_bytes_acked` and bytes written so far (the bases).
//! 2. Write the PROXY header to the backend ourselves; it counts as
//!    `written` (bytes user space put into the peer's send queue).
//! 3. Zero both `counts` entries, insert **both** sockets into the SOCKHASH.
//!    No `sides` entry exists yet, so every byte arriving now is *passed*
//!    (to the socket's own receive queue, for us to read) and counted —
//!    nothing is redirected to a socket not yet in the map.
//! 4. Kick both sockets with `SO_RCVLOWAT`, which makes TCP call the
//!    data-ready callback if bytes wait in the receive queue: the bytes that
//!    came before step 3 go through the program now, in order, ahead of any
//!    later byte, and are passed (still no `sides` entry) and counted. After
//!    this, no byte is ever read by us except through the program
//!    (everything we read was passed and counted).
//! 5. Write both `sides` entries (`drained = 0`): from now on a side
//!    redirects as long as nothing passed is unread — so once we have
//!    copied the early bytes, if there were any.
//!
//! Why the kick comes before the `sides` entries: a redirect runs in a
//! kernel worker on the CPU that made it (`sk_psock_backlog`), and the kick
//! runs the program in our own context. Redirecting the early bytes from
//! there woke a worker on our CPU for every connection, which preempted the
//! proxy; on a busy machine the proxy then waited a whole time slice behind
//! other work (`perf sched`: most of the time per connection of the
//! connection-rate bench was spent runnable, not running). The early bytes
//! are few; copying them costs one `recv` and one `send`, in our own time.
//!
//! From then on each direction is a loop over one socket's readability
//! ([`relay`]): anything readable was passed (or is EOF, or an error). Before
//! writing passed bytes to the other socket we wait until every byte the
//! program redirected has entered that socket's send queue (redirected bytes
//! go through a kernel work queue first), write them, then publish
//! `drained`/`written`; the program resumes redirecting once it has seen
//! `passed == drained`, i.e. when nothing passed waits unread. EOF is
//! forwarded (`shutdown(SHUT_WR)`) the same way: after every earlier byte has
//! entered the other side's send queue.
//!
//! # Bounded memory, and credit renewed before it runs out
//!
//! Redirected data has no backpressure: the source socket's receive queue is
//! emptied as data arrives and the window stays open while a slow peer's
//! redirect queue grows. The program therefore redirects only up to
//! `allowed` bytes, a credit we hand out so that at most [`LIMIT`] bytes
//! towards the peer are unacknowledged (an sk_skb program may not look at
//! TCP state itself). Beyond it the program passes; passed data is charged
//! to the receiving socket, its window closes and the sender waits.
//!
//! The credit is renewed *before* it runs out: with each credit we also set
//! `notify`, a quarter into
//! it; when the program's count reaches it, it puts the side's cookie on the
//! `credit` ring buffer, [`Kernel::credit_events`] wakes that side's
//! [`relay`], which hands out new credit as far as the peer's peer has
//! acknowledged (`tcpi_bytes_acked`), and a new `notify` a quarter into
//! that. One wake-up per megabyte or so, no copy, no stall. When the
//! peer falls behind and little room is left, the relay re-checks on a
//! timer (1 ms, backing off to 64 ms while nothing moves) instead of asking
//! for a signal per small step; when the credit is gone the program passes,
//! and we write passed bytes at the speed the peer's send queue takes them,
//! renewing the credit each time. The same timer retries the read, so a
//! wake-up lost anywhere cannot leave passed bytes unread.
//!
//! Known defect, the kernel's: bytes the program passes are sometimes
//! delivered twice. On Linux 6.18 a transfer of 1 GiB with every byte's
//! offset checked got one to four whole 65483-byte segments a second time
//! in 3 of 8 runs; with the credit unlimited (nothing passed) 0 of 8 went
//! wrong, with everything passed 6 of 8. `scripts/sockmap-pass-check`
//! reproduces it with nothing of skactivate (a C copier reading a socket
//! whose verdict program passes everything, raw bpf(2)): 2 to 9 transfers
//! of 1 GiB in 8 to 16 go wrong on this machine, each by one or two whole
//! segments coming again right after themselves. Its counters say where:
//! * the verdict program is handed the repeated bytes in an skb it has not
//!   seen before (it marks every skb it judges; it never meets a marked
//!   one), and never runs twice at once on the socket: the socket's
//!   receive queue held those bytes twice;
//! * only transfers whose sender retransmitted go wrong. With the copier on
//!   another CPU than the sender, loopback reorders segments (`nstat`:
//!   TCPOFOQueue, TCPDSACKOldSent, some 30 retransmissions per GiB); with
//!   the copier on the sender's CPU there are hardly any and no transfer
//!   went wrong (0 of 16); without a program, the same retransmissions and
//!   no transfer wrong (0 of 8). Retransmissions are not enough, though:
//!   with the loopback's MTU at 1500, 15000 retransmissions in 8 GiB and 0
//!   or 1 transfer of 8 wrong.
//!
//! The cause, confirmed: `scripts/sockmap-pass-check --overlap` has a TCP
//! peer of its own on a TUN device send bytes [0, 1000), then one segment
//! with bytes [500, 2000), as a retransmission can. The reader of a socket
//! whose verdict program passes everything gets 2500 bytes, [500, 1000)
//! twice, every time, on Debian's 5.10, 6.1, 6.12 and 7.2 (in qemu) and
//! this host's 6.18; with a stream parser as well it gets 1000 bytes and
//! EOF; with no program, the right 2000. TCP queues a segment that overlaps
//! bytes already received whole (the partial-packet case of
//! `tcp_data_queue()`, and `tcp_ofo_queue()`) and leaves it to the reader
//! to skip the old head by sequence number, as `tcp_recvmsg()` and
//! `tcp_read_sock()` do. The verdict path reads the queue with
//! `tcp_read_skb()`, which hands over whole skbs and never looks at their
//! sequence numbers (since "bpf: tcp_read_skb needs to pop skb regardless
//! of seq", 2023, also in stable kernels; before, it looked them up but
//! still handed over whole skbs). A verdict program is not shown the skb's
//! sequence number; with CAP_PERFMON it can read it from the kernel's skb
//! (below). The redirect path goes
//! through the same function: with `--redirect` (the program sends
//! everything to the backend's egress, user space reads nothing) 1 bulk
//! transfer of 1 GiB in 16 got 130966 bytes a second time here. In bulk
//! transfers under qemu nothing went wrong, but there segments are hardly
//! ever retransmitted. With a stream parser, bulk transfers stall as well
//! (4 of 5 runs of 64 MiB here, every run under qemu), so that is no way
//! around it either. The duplicates blamed on the two attempts below were
//! this. `scripts/sockmap-pass-check --repair` asks the same without TUN:
//! two loopback sockets made established towards each other with
//! `TCP_REPAIR`, the receiver told it already has bytes [0, 500) the sender
//! never sent; the sender's first segment, [0, 1000), comes through whole
//! on the same kernels. [`super::probe::overlap`] asks that with our own
//! program, and `--mode auto` takes sockmap only where the answer is right
//! (skactivate-proxy(8), MODES).
//!
//! What the proxy does about it, first: with CAP_PERFMON it loads
//! `ska_proxy_verdict_trim`, which reads each skb's sequence number
//! (`TCP_SKB_CB(skb)->seq`, with `bpf_probe_read_kernel` at a fixed offset
//! in `struct sk_buff`, the same on every kernel of the matrix; a kernel
//! where it differs fails the overlap check), remembers per socket where
//! the last skb ended (`Count::next`; the first skb after the socket joined
//! the map starts at the first unread byte, as we read nothing before), and
//! cuts the bytes before that off the front with `bpf_skb_adjust_room`,
//! 4095 bytes a call; an skb with no new byte (whole segments come a
//! second time too) is dropped. With the proxy on one CPU and the client
//! and backend on the other (`scripts/proxy-integrity`), 60 of 60 transfers
//! of 1 GiB with every byte checked arrived whole on 6.18 (about 1.5 MB
//! cut off); the plain program, same conditions, reset 12 of 40. The kernel then advances `copied_seq` by the cut
//! length, not the original one, so `SIOCINQ` and `ss`'s Recv-Q over-count
//! by the bytes cut; nothing of the data path reads it on these kernels.
//!
//! Second, the last line of defence: the program is handed only bytes TCP has
//! received, so its counts for a socket can exceed `tcpi_bytes_received`
//! (each byte counted once however often it was sent) only when the kernel
//! handed some over twice. [`relay`] compares them whenever it wakes,
//! before it writes what it read or forwards EOF, and then resets both
//! sides ([`Fault::Repeated`], an error in the journal): the peer sees the
//! stream fail instead of taking repeated bytes for data. With the
//! reproducer's client and backend in front of the proxy on this machine,
//! 4 and 5 transfers of 1 GiB in 8 were reset and none delivered a wrong
//! byte. Bytes the program redirected before the check have reached the
//! peer by then; only the reset tells it.
//!
//! Known limit: once the credit has run out, a direction at a high rate
//! stays on the pass path (a new chunk is passed while we copy the previous
//! one, so `drained` never catches up with `passed`), and we copy the rest
//! of the transfer. Getting out needs the sender held back while we catch
//! up; redirected data is charged to no socket, so TCP does not do it. And
//! the credit does run out in any bulk transfer whose reader is the slower
//! end: no credit size avoids that (counting only the redirect queue, not
//! the send queue, still ran out after 25 MiB of 1 GiB), so the pass path is
//! the backpressure and the way back from it is what is missing. Tried and
//! not kept (BENCHMARKS.md, "The proxy"): holding the sender by leaving the
//! passed bytes unread, peeking at them (`MSG_PEEK`), writing them, publishing
//! `drained`, and only then consuming them (the read's window update must
//! come after the program redirects again: on loopback the sender's next
//! segment arrives inside that `recv`). The backend got whole segments
//! twice on 6.18 (probably the defect above). Tried again with every
//! consumed byte compared to what
//! the peek had shown (they always matched, so the peek itself is not what
//! doubles bytes) and the copy buffer as large as the capped receive buffer
//! (so that one peek sees every passed byte): a quarter to two fifths of a
//! 1 GiB transfer stayed in the kernel, the bytes of a 64 MiB slow-then-fast transfer each
//! way arrived whole and in order, but the bench's backend got six extra
//! 64 KiB segments in one 1 GiB round, and with the proxy pinned to one CPU
//! and the client and backend to the other, 7 of 22 transfers of 1 GiB
//! with every offset checked went wrong: the backend received the last
//! 130972 bytes (two 65486-byte segments) a second time, in both cases
//! located. Not kept either (the tree has no copy of it: the sequence above
//! is all it did). Why it is hard: a read of passed bytes is what reopens
//! the window, and nothing else user space can do sends the window update
//! (`TCP_QUICKACK` only when an ACK is already due, `SO_RCVBUF`,
//! `SO_RCVLOWAT` and `TCP_WINDOW_CLAMP` send none), so "consume only after the program may
//! redirect again" needs `MSG_PEEK`. `TCP_WINDOW_CLAMP` does not fit either:
//! raising it again leaves `rcv_ssthresh` at the tiny window, and the
//! sender waits for its persist timer.
//!
//! Also tried and not kept: pausing a direction instead of passing. Every
//! socket went into a second SOCKHASH without a program as well (the
//! redirect targets), and a side with little credit left was taken out of
//! the program's map (its psock, and the queue of bytes redirected towards
//! it, stay: the other map holds them), so that arriving bytes waited in its
//! receive queue with TCP holding the sender back; once the peer caught up
//! it went back in and was kicked, and the program read the queue from where
//! it stopped. Bulk transfers stayed in the kernel, but 3 of 5 transfers of
//! 1 GiB (every byte's offset checked, the proxy on one CPU, client and
//! backend on the other, Linux 6.18) lost a 65483-byte segment or delivered
//! two segments a second time. The likely cause: a map delete does not take the socket's lock (an
//! update does), so it clears the psock's verdict program while a softirq on
//! the other CPU may be inside `tcp_read_skb` for that socket, and
//! `sk_psock_verdict_recv` applies its default verdict, drop, to an skb read
//! with no program. A pause that is safe needs the sender stopped first,
//! which only the pass path does.

use std::cell::RefCell;
use std::collections::HashMap as Waiters;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use aya::maps::{HashMap, MapData, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::sys;
use super::{Activity, Fault};

static PROXY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy.bpf.o"));

/// Unacknowledged bytes towards one socket beyond which the program stops
/// redirecting (per direction of each connection): the default maximum of
/// the TCP send buffer (`tcp_wmem`). (Twice that did not keep a bulk
/// transfer off the pass path in the bench, and held 12 MiB instead of 8
/// under a slow reader.)
pub const LIMIT: u64 = 4 << 20;

/// The receive buffer a side whose peer falls behind is fixed at.
const RCVBUF_CAP: u64 = 4 << 20;

/// Mirrors `struct ska_proxy_side` (ebpf/proxy.bpf.c).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Side {
    pub peer: u64,
    pub drained: u64,
    pub allowed: u64,
    pub notify: u64,
}
// SAFETY: repr(C), only u64 fields, no padding.
unsafe impl aya::Pod for Side {}

/// Mirrors `struct ska_proxy_count` (ebpf/proxy.bpf.c).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub redirected: u64,
    pub passed: u64,
    pub signalled: u64,
    pub trimmed: u64,
    pub next: u32,
    pub started: u32,
    pub error: i32,
    pub failures: u32,
}
// SAFETY: repr(C), u64 fields then four 32-bit ones: no padding.
unsafe impl aya::Pod for Count {}

/// The ring buffer's fd, for readiness only (the `RingBuf` owns it).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The loaded program and its maps.
pub struct Kernel {
    /// Registered with the runtime; declared before `ring` so that it is
    /// deregistered before the ring buffer's fd is closed.
    ring_ready: AsyncFd<RingFd>,
    ring: RefCell<RingBuf<MapData>>,
    /// The relay of each armed side, by cookie, woken by a credit signal.
    waiters: RefCell<Waiters<u64, Rc<Notify>>>,
    _ebpf: Ebpf,
    socks: RefCell<SockHash<MapData, u64>>,
    sides: RefCell<HashMap<MapData, u64, Side>>,
    counts: RefCell<HashMap<MapData, u64, Count>>,
    /// Why the program does not cut old bytes off overlapping segments;
    /// `None` when it does (`ska_proxy_verdict_trim`).
    pub untrimmed: Option<String>,
}

/// Which step of setting up the kernel side failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the BPF object: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("the object has no map or program {0}")]
    Missing(&'static str),
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("loading the sk_skb verdict program (needs CAP_BPF and CAP_NET_ADMIN): {0}")]
    Program(#[source] aya::programs::ProgramError),
    #[error("attaching the verdict program to the SOCKHASH: {0}")]
    Attach(#[source] aya::programs::ProgramError),
    #[error("watching the credit ring buffer: {0}")]
    Ring(#[source] io::Error),
}

impl Kernel {
    /// Load the program, the one that trims overlapping segments if `trim`
    /// (it needs CAP_PERFMON), and attach it.
    pub fn load(trim: bool) -> Result<Kernel, LoadError> {
        let mut ebpf = EbpfLoader::new()
            .load(PROXY_OBJECT)
            .map_err(LoadError::Object)?;
        let socks: SockHash<MapData, u64> = ebpf
            .take_map("socks")
            .ok_or(LoadError::Missing("socks"))?
            .try_into()
            .map_err(|e| LoadError::Map("socks", e))?;
        let sides: HashMap<MapData, u64, Side> = ebpf
            .take_map("sides")
            .ok_or(LoadError::Missing("sides"))?
            .try_into()
            .map_err(|e| LoadError::Map("sides", e))?;
        let counts: HashMap<MapData, u64, Count> = ebpf
            .take_map("counts")
            .ok_or(LoadError::Missing("counts"))?
            .try_into()
            .map_err(|e| LoadError::Map("counts", e))?;
        let ring: RingBuf<MapData> = ebpf
            .take_map("credit")
            .ok_or(LoadError::Missing("credit"))?
            .try_into()
            .map_err(|e| LoadError::Map("credit", e))?;
        // SAFETY: the fd belongs to `ring`, which the Kernel keeps open
        // until after this registration is dropped (field order).
        let ring_ready = unsafe {
            AsyncFd::register_with_interest(RingFd(ring.as_raw_fd()), tokio::io::Interest::READABLE)
        }
        .map_err(|e| LoadError::Ring(e.into()))?;
        let name = if trim {
            "ska_proxy_verdict_trim"
        } else {
            "ska_proxy_verdict"
        };
        let prog: &mut SkSkb = ebpf
            .program_mut(name)
            .ok_or(LoadError::Missing(name))?
            .try_into()
            .map_err(LoadError::Program)?;
        prog.load().map_err(LoadError::Program)?;
        prog.attach(socks.fd()).map_err(LoadError::Attach)?;
        Ok(Kernel {
            ring_ready,
            ring: RefCell::new(ring),
            waiters: RefCell::default(),
            _ebpf: ebpf,
            socks: RefCell::new(socks),
            sides: RefCell::new(sides),
            counts: RefCell::new(counts),
            untrimmed: (!trim).then(|| "it was not asked to".to_owned()),
        })
    }

    fn count(&self, cookie: u64) -> Count {
        self.counts.borrow().get(&cookie, 0).unwrap_or_default()
    }

    fn set_side(&self, cookie: u64, side: &Side) -> io::Result<()> {
        self.sides
            .borrow_mut()
            .insert(cookie, side, 0)
            .map_err(io::Error::other)
    }

    /// Wake the relay of each side whose credit is a quarter used; runs as long
    /// as the process serves (one task).
    pub async fn credit_events(&self) {
        loop {
            let Ok(mut g) = self.ring_ready.readable().await else {
                tracing::warn!("credit ring buffer: not pollable; credit renewed on passes only");
                return;
            };
            {
                let mut ring = self.ring.borrow_mut();
                let waiters = self.waiters.borrow();
                while let Some(item) = ring.next() {
                    let Ok(cookie) = <[u8; 8]>::try_from(&*item) else {
                        continue;
                    };
                    if let Some(w) = waiters.get(&u64::from_ne_bytes(cookie)) {
                        w.notify_one();
                    }
                }
            }
            g.clear_ready();
        }
    }

    /// Drop a side's entries. Its socket leaves the SOCKHASH when it is
    /// closed (the kernel unlinks a closing socket from every map), which
    /// follows at once: one call fewer per socket.
    fn forget(&self, cookie: u64) {
        self.waiters.borrow_mut().remove(&cookie);
        let _ = self.sides.borrow_mut().remove(&cookie);
        let _ = self.counts.borrow_mut().remove(&cookie);
    }
}

/// One socket of an armed connection.
pub struct End {
    pub fd: AsyncFd<OwnedFd>,
    pub cookie: u64,
    /// tcpi_bytes_acked and bytes written when the connection was set up.
    acked_base: u64,
    written_base: u64,
    /// ESTABLISHED when the end was made (only such a socket may join a
    /// SOCKHASH; one that has changed since makes the insert fail, and
    /// [`arm`] copes with that).
    established: bool,
    /// The most [`End::written_since`] has returned: below it, no need to ask.
    sent_seen: std::cell::Cell<u64>,
}

impl End {
    /// Note the bases; call before anything is written to the socket.
    pub fn new(fd: AsyncFd<OwnedFd>) -> io::Result<End> {
        let cookie = sys::cookie(fd.get_ref().as_fd())?;
        let (state, acked) = sys::tcp_state_acked(fd.get_ref().as_fd())?;
        let written = acked + sys::outq(fd.get_ref().as_fd())?;
        Ok(End {
            fd,
            cookie,
            acked_base: acked,
            written_base: written,
            established: state == 1,
            sent_seen: std::cell::Cell::new(0),
        })
    }

    fn written_since(&self) -> io::Result<u64> {
        Ok(sys::bytes_written(self.fd.get_ref().as_fd())? - self.written_base)
    }

    fn acked_since(&self) -> io::Result<u64> {
        Ok(sys::bytes_acked(self.fd.get_ref().as_fd())? - self.acked_base)
    }
}

/// The connection's two ends while they are in the maps; dropping it
/// removes every entry.
pub struct Armed<'a> {
    kernel: &'a Kernel,
    pub client: &'a End,
    pub backend: &'a End,
    /// Both sockets are in the SOCKHASH and the program redirects. When
    /// only the backend could be inserted (the client's FIN came between
    /// our check and the insert: a socket that is no longer ESTABLISHED
    /// cannot join a SOCKHASH) everything it receives is passed, and we copy
    /// both directions ourselves: its passed bytes would be lost if we took
    /// it out again.
    pub full: bool,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.kernel.forget(self.client.cookie);
        self.kernel.forget(self.backend.cookie);
    }
}

/// Whether a TCP socket may join a SOCKHASH (it must be ESTABLISHED), as
/// it was when the end was made.
pub fn established(end: &End) -> bool {
    end.established
}

/// Steps 3 to 5 of the module's sequence. `header` bytes were already
/// written to the backend. `limit` is [`LIMIT`] but for the probe, which
/// makes it small to go through the pass path. An error means nothing was
/// inserted: the connection can go on without the kernel's help. When only
/// part could be set up, the result is not [`Armed::full`]: the sockets stay
/// in the SOCKHASH, everything is passed, and the relay copies.
pub fn arm<'a>(
    kernel: &'a Kernel,
    client: &'a End,
    backend: &'a End,
    header: u64,
    limit: u64,
) -> io::Result<Armed<'a>> {
    let mut armed = Armed {
        kernel,
        client,
        backend,
        full: false,
    };
    {
        let mut counts = kernel.counts.borrow_mut();
        for end in [client, backend] {
            counts
                .insert(end.cookie, Count::default(), 0)
                .map_err(io::Error::other)?;
        }
    }
    kernel
        .socks
        .borrow_mut()
        .insert(backend.cookie, backend.fd.get_ref().as_raw_fd(), 0)
        .map_err(io::Error::other)?;
    let client_in =
        kernel
            .socks
            .borrow_mut()
            .insert(client.cookie, client.fd.get_ref().as_raw_fd(), 0);
    if let Err(e) = client_in {
        tracing::debug!("client socket not inserted ({e}): copying this connection");
        kernel_kick(backend);
        return Ok(armed);
    }
    // Step 4 before step 5: bytes already queued are passed, not
    // redirected from our context (see the module's documentation).
    kernel_kick(client);
    kernel_kick(backend);
    let sides = kernel.set_side(
        client.cookie,
        &Side {
            peer: backend.cookie,
            drained: 0,
            allowed: limit.saturating_sub(header),
            notify: notify_at(0, limit.saturating_sub(header), limit),
        },
    );
    let sides = sides.and_then(|()| {
        kernel.set_side(
            backend.cookie,
            &Side {
                peer: client.cookie,
                drained: 0,
                allowed: limit,
                notify: notify_at(0, limit, limit),
            },
        )
    });
    if let Err(e) = sides {
        // The kick may have passed bytes to a socket's own queue; taking
        // the socket out of the SOCKHASH would discard them. Both stay in,
        // without `sides` entries: everything is passed and we copy both
        // directions.
        tracing::debug!("sides not written ({e}): copying this connection");
        let _ = kernel.sides.borrow_mut().remove(&client.cookie);
        let _ = kernel.sides.borrow_mut().remove(&backend.cookie);
        return Ok(armed);
    }
    armed.full = true;
    Ok(armed)
}

/// Step 4: bytes that arrived before the insert go through the program now.
fn kernel_kick(end: &End) {
    if let Err(e) = sys::set_rcvlowat(end.fd.get_ref().as_fd(), 1) {
        tracing::warn!("SO_RCVLOWAT: {e}");
    }
}

/// Where to ask for a credit signal: a quarter into `room` fresh bytes past
/// `redirected` (early, so that the renewal has three quarters of the
/// credit's time to arrive), or never (0) when the room is too small to be
/// worth a signal (then the relay's timer re-checks).
fn notify_at(redirected: u64, room: u64, limit: u64) -> u64 {
    if room >= limit / 16 {
        redirected + room / 4
    } else {
        0
    }
}

/// The copy buffer of a direction that has passed bytes to copy: first
/// small (below malloc's mmap threshold), then, once a read fills it, large.
const BUF_FIRST: usize = 16 * 1024;
const BUF_MAX: usize = 256 * 1024;

/// The shortest and longest pause of the low-credit re-check.
const RECHECK_MIN: Duration = Duration::from_millis(1);
const RECHECK_MAX: Duration = Duration::from_millis(64);

/// Sleep for `pause`, or forever without one.
async fn maybe_sleep(pause: Option<Duration>) {
    match pause {
        Some(p) => tokio::time::sleep(p).await,
        None => std::future::pending().await,
    }
}

/// One direction, `src` to `dst`, until EOF was forwarded. `written` is
/// what user space already wrote to `dst` (the PROXY header).
pub async fn relay(
    armed: &Armed<'_>,
    src: &End,
    dst: &End,
    mut written: u64,
    limit: u64,
    activity: &Activity,
) -> Result<(), Fault> {
    let kernel = armed.kernel;
    let mut drained = 0u64;
    // Allocated on the first pass, small: most connections see only the
    // early bytes and EOF. A 256 KiB buffer per direction cost each
    // connection two mmap/munmap pairs, 128 page faults and 512 KiB of
    // zeroing; it grows to that only when a read fills the small one.
    let mut buf = Vec::new();
    let wake = Rc::new(Notify::new());
    if armed.full {
        kernel.waiters.borrow_mut().insert(src.cookie, wake.clone());
    }
    // Some(pause) while little credit is left or passed bytes wait: re-check
    // (and retry the read) after the pause.
    let mut recheck: Option<Duration> = None;
    let mut last_room = limit;
    let mut rcvbuf_capped = false;
    loop {
        enum Why<G> {
            Readable(G),
            Credit,
            Timer,
        }
        let why = tokio::select! {
            biased;
            r = src.fd.readable() => Why::Readable(r.map_err(Fault::Read)?),
            () = wake.notified() => Why::Credit,
            () = maybe_sleep(recheck) => Why::Timer,
        };
        if buf.is_empty() && !matches!(why, Why::Credit) {
            buf = vec![0u8; BUF_FIRST];
        }
        let readiness = matches!(why, Why::Readable(_));
        let got = match why {
            Why::Readable(mut guard) => {
                match guard.try_io(|fd| sys::recv(fd.get_ref().as_fd(), &mut buf)) {
                    Err(_would_block) => None,
                    Ok(Err(e)) => return Err(Fault::Read(e)),
                    Ok(Ok(n)) => Some(n),
                }
            }
            Why::Timer => match sys::recv(src.fd.get_ref().as_fd(), &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => return Err(Fault::Read(e)),
                Ok(n) => Some(n),
            },
            Why::Credit => None,
        };
        if readiness && got.is_none() {
            // A stale readiness: nothing to read, nothing changed.
            continue;
        }
        let count = kernel.count(src.cookie);
        if armed.full {
            // Before a passed byte is written or EOF forwarded: a peer must
            // not take a stream with repeated bytes for the one sent.
            check_not_repeated(src, &count)?;
        }
        if let Some(n) = got {
            if n == 0 && count.passed > drained {
                // EOF ahead of passed bytes still in the socket's work queue:
                // they become readable shortly; EOF is only real after them.
                tokio::time::sleep(Duration::from_micros(200)).await;
                continue;
            }
            // Everything the program redirected before this pass goes first.
            wait_sent(dst, written + count.redirected).await?;
            if n == 0 {
                sys::shutdown_write(dst.fd.get_ref().as_fd()).map_err(Fault::Write)?;
                return Ok(());
            }
            activity.touch();
            super::write_all(&dst.fd, &buf[..n]).await?;
            written += n as u64;
            drained += n as u64;
            if n == buf.len() && buf.len() < BUF_MAX {
                buf = vec![0u8; BUF_MAX];
            }
        }
        if !armed.full {
            continue;
        }
        // New credit: what keeps unacknowledged bytes towards dst <= limit.
        let acked = dst.acked_since().map_err(Fault::Write)?;
        let outstanding = (written + count.redirected).saturating_sub(acked);
        let room = limit.saturating_sub(outstanding);
        kernel
            .set_side(
                src.cookie,
                &Side {
                    peer: dst.cookie,
                    drained,
                    allowed: count.redirected + room,
                    notify: notify_at(count.redirected, room, limit),
                },
            )
            .map_err(Fault::Write)?;
        if room < limit / 2 && !rcvbuf_capped {
            // The peer falls behind: what we pass next waits in src's
            // receive buffer, which autotuning may have grown to
            // tcp_rmem's maximum (tens of MiB on some systems). Fix it
            // at RCVBUF_CAP; only for such connections, a fast one never
            // pays the call.
            rcvbuf_capped = true;
            // The kernel doubles the value it is given.
            let half = i32::try_from(RCVBUF_CAP / 2).unwrap_or(i32::MAX);
            if let Err(e) = sys::setsockopt(
                src.fd.get_ref().as_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                half,
            ) {
                tracing::debug!("SO_RCVBUF: {e}");
            }
        }
        recheck = if room < limit / 2 || count.passed > drained {
            Some(match recheck {
                Some(p) if room <= last_room && got.is_none() => (p * 2).min(RECHECK_MAX),
                _ => RECHECK_MIN,
            })
        } else {
            None
        };
        last_room = room;
    }
}

/// The program is handed only bytes TCP has received, so it cannot have
/// seen more of them than TCP counts (`tcpi_bytes_received`, each byte once)
/// unless the kernel handed some over twice (see "Known defect" above): then
/// the stream the peer gets is not the one sent, and the connection must end
/// in a reset. Checked whenever the relay wakes and at EOF, where everything
/// received has been through the program.
fn check_not_repeated(src: &End, count: &Count) -> Result<(), Fault> {
    let received = sys::bytes_received(src.fd.get_ref().as_fd()).map_err(Fault::Read)?;
    match repeated(count, received) {
        0 => Ok(()),
        extra => Err(Fault::Repeated(
            extra,
            if count.failures == 0 {
                String::new()
            } else {
                format!(
                    "; the program could not cut the old bytes off {} segment(s) (last error: \
                     {})",
                    count.failures,
                    io::Error::from_raw_os_error(-count.error)
                )
            },
        )),
    }
}

/// Bytes the program was handed beyond what TCP received.
fn repeated(count: &Count, received: u64) -> u64 {
    (count.redirected + count.passed).saturating_sub(received)
}

/// Wait until `total` bytes have entered `dst`'s send queue (the redirect
/// work queue has caught up). Polls: the kernel says nothing when it has.
async fn wait_sent(dst: &End, total: u64) -> Result<(), Fault> {
    let mut pause = Duration::from_millis(1);
    for round in 0u32.. {
        if dst.sent_seen.get() >= total {
            return Ok(());
        }
        let now = dst.written_since().map_err(Fault::Write)?;
        dst.sent_seen.set(now);
        if now >= total {
            return Ok(());
        }
        // The peer may have reset meanwhile: then nothing will ever move.
        sys::take_error(dst.fd.get_ref().as_fd()).map_err(Fault::Write)?;
        if round < 16 {
            // The work queue usually catches up within microseconds; the
            // timer's resolution is a millisecond.
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
    unreachable!()
}

/// Bytes the program moved for this connection so far (for idleness).
pub fn moved(kernel: &Kernel, armed: &Armed<'_>) -> u64 {
    let a = kernel.count(armed.client.cookie);
    let b = kernel.count(armed.backend.cookie);
    a.redirected + a.passed + b.redirected + b.passed
}

/// The counters of the client's side and the backend's.
pub fn stats(kernel: &Kernel, armed: &Armed<'_>) -> (Count, Count) {
    (
        kernel.count(armed.client.cookie),
        kernel.count(armed.backend.cookie),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mirrors have the C structs' sizes (aya also refuses a map whose
    /// value size differs, so a mismatch fails every sockmap test too).
    #[test]
    fn mirrors_match_the_c_structs() {
        assert_eq!(size_of::<Side>(), 4 * 8, "struct ska_proxy_side");
        assert_eq!(size_of::<Count>(), 6 * 8, "struct ska_proxy_count");
        assert_eq!(std::mem::offset_of!(Side, allowed), 16);
        assert_eq!(std::mem::offset_of!(Side, notify), 24);
        assert_eq!(std::mem::offset_of!(Count, passed), 8);
        assert_eq!(std::mem::offset_of!(Count, signalled), 16);
        assert_eq!(std::mem::offset_of!(Count, trimmed), 24);
        assert_eq!(std::mem::offset_of!(Count, next), 32);
        assert_eq!(std::mem::offset_of!(Count, started), 36);
        assert_eq!(std::mem::offset_of!(Count, error), 40);
        assert_eq!(std::mem::offset_of!(Count, failures), 44);
    }
}
