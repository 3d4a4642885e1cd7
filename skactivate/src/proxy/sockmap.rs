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
//! 1. `accept()`, `connect()` the backend, write the PROXY header to the
//!    backend ourselves, and copy the connection's opening (opening.rs):
//!    until it has moved enough to be worth arming, which a short
//!    connection never does. The opening stops with nothing held in user
//!    space: every byte it read was written on.
//! 2. Note each socket's `tcpi_bytes_acked` (the base) and what is in its
//!    send queue: bytes user space wrote and the peer has not acknowledged,
//!    counted as `written` towards that socket; and what we read from it,
//!    which the program will never count ([`End::new`]).
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
//! entered the other side's send queue. Passed bytes are read in a way of
//! their own, below ("The way back to redirecting").
//!
//! # Bounded memory, and credit renewed before it runs out
//!
//! Redirected data has no backpressure: the source socket's receive queue is
//! emptied as data arrives and the window stays open while a slow peer's
//! redirect queue grows. The program therefore redirects only up to
//! `allowed` bytes, a credit we hand out so that at most `limit` bytes
//! towards the peer are unacknowledged (an sk_skb program may not look at
//! TCP state itself). Beyond it the program passes; passed data is charged
//! to the receiving socket, its window closes and the sender waits.
//!
//! The credit is renewed *before* it runs out: with each credit we also set
//! `notify`, a quarter into
//! it; when the program's count reaches it, it puts the side's cookie on the
//! `credit` ring buffer, [`Kernel::wake_events`] wakes that side's
//! [`relay`], which hands out new credit as far as the peer's peer has
//! acknowledged (`tcpi_bytes_acked`), and a new `notify` a quarter into
//! that. One wake-up per quarter credit, no copy, no stall. When too
//! little room is left for a signal to be worth it, the relay re-checks on a
//! timer (1 ms, backing off to 64 ms while the peer takes nothing). The same
//! timer retries the read while passed bytes wait. No signal is lost: the
//! ring is sized so that it cannot fill ([`ring_size`]).
//!
//! **The limit follows the peer** ([`Credit`]). It starts at [`LIMIT`];
//! each time the credit runs out it is doubled if the peer took a whole
//! limit's worth within 50 ms at the pace it kept since the last time, and
//! halved (not below [`LIMIT`]) if it would take less than a quarter. Its
//! ceiling is `tcp_rmem`'s maximum: no more than the kernel lets one TCP
//! socket hold, so a connection never queues more towards a peer than a
//! plain relay's receive buffer may. A bulk transfer whose reader keeps up
//! but whose redirects run in a worker that falls behind (on the sender's
//! CPU, `sk_psock_backlog`) ran out of a fixed 4 MiB credit every few
//! milliseconds, and each time the proxy copied what was held (below): 16
//! to 20 % of the bench's bulk bytes, most of the proxy's CPU time. With
//! the limit grown to 32 MiB, 2 to 3 %. A reader that reads nothing keeps
//! the limit at [`LIMIT`].
//!
//! **The peer's send buffer holds the whole credit** ([`fix_sndbuf`]): a
//! redirected chunk that finds the send queue full puts the kernel worker
//! off by a jiffy, and nothing wakes it sooner. The credit is kept within
//! half of what the buffer was given ([`Credit::within_send_buffer`]).
//!
//! **Nothing but the program, an end or an error wakes a relay.** The
//! sockets are out of the runtime's hands ([`End::new`]) and watched by
//! an epoll instance of the [`Kernel`]'s for their end and errors only
//! (edge-triggered, so a relay keeps looking until a look finds nothing);
//! the program signals the first byte it passes after user space read
//! everything passed, on the same ring buffer. The kernel signals a socket
//! in a SOCKHASH readable after every chunk the program judges, redirected
//! or not (the verdict path's data-ready callback wakes the socket's
//! waiters), and writable after every acknowledgement that frees room:
//! registered with the runtime for both, the proxy was woken for each 64 KiB
//! of a bulk transfer (some 16,000 times per GiB here, against 800 now).
//!
//! # The way back to redirecting
//!
//! When the credit is gone the program passes. A bulk transfer whose
//! reader is the slower end always gets there: no credit size avoids it,
//! the pass path *is* the backpressure. What matters is getting back.
//! Copying passed bytes with a plain read does not: the read frees room in
//! the receive buffer and sends the window update, so the sender's next
//! segment arrives (and is passed, `passed > drained`) while we write the
//! previous one, and the direction stays on the copying path for good
//! (99 % of the bench's bulk bytes were copied that way). So an armed side
//! never consumes a passed byte before the program may redirect after it:
//!
//! 1. **Hold.** While the peer's room is below half the credit, passed bytes
//!    stay unread. They are charged to the socket, its window closes, the
//!    sender waits: TCP's own backpressure. What is held is bounded by
//!    the receive buffer, fixed at [`RCVBUF_CAP`] when the sockets are
//!    armed (see [`fix_rcvbuf`]). A hold waits on its timer only, not on
//!    the socket's readiness (see `relay`).
//! 2. **Look** at every passed byte queued (`MSG_PEEK`), once the peer has
//!    room for half a credit.
//! 3. **Write** them to the peer, after every byte the program redirected
//!    before them (while bytes wait, it redirects nothing).
//! 4. **Publish** `drained` (and new credit). Bytes passed meanwhile (the
//!    sender still had some window) keep `passed > drained`: look again,
//!    and write and publish only those beyond what was written. Nothing is
//!    consumed between rounds, so the window stays as it was and the rounds
//!    end once the sender's window is used up.
//! 5. **Consume** them all, once the program has seen `passed == drained`.
//!    Only now does the window open, and what the sender sends next is
//!    redirected. The bytes read are compared with those looked at: a
//!    kernel that returned others would fail the connection (a reset), not
//!    corrupt it silently.
//!
//! Each turn of this costs one copy of what was held (bounded by the
//! receive buffer) for every credit's worth the kernel moves. With
//! `scripts/proxy-integrity` on Linux 6.18, about four fifths of the bytes
//! stay in the kernel; with a plain read, 2 %. The receive buffer's size
//! trades that share against stalls: with a small buffer the window closes
//! entirely while bytes are held, and after we consume the sender
//! sometimes stays in its zero-window probe timer (200 ms and more) although
//! it was told of the open window (`ss` showed one persisting with a
//! window of 400 KiB). With the buffer at 256 KiB there were 31 probes in
//! 128 MiB and transfers took 20 times as long; at 1 MiB none were seen.
//!
//! # The window after a take
//!
//! The consuming reads of step 5 hold the socket's lock, and each frees
//! room that TCP announces at once. Segments that arrive while the lock is
//! held wait in the socket's backlog, and `release_sock()` runs them
//! through the program in our context: they are redirected and consumed
//! there, but every window computed meanwhile counts the backlog against
//! the receive buffer (`sk_backlog.len` is cleared only once it is empty),
//! so the last acknowledgement can announce a window of nothing while
//! nothing is held. No later event announces the room, and the sender
//! waits in its zero-window probe timer (200 ms, then 400 ms). Where the
//! proxy shares a CPU with the client, the client runs whenever a window
//! opens, inside our reads. A 1 GiB upload through a proxy on the client's
//! and backend's CPU (Linux 6.18) stalled 9 and 11 times in two captured
//! runs (`tcpdump`: each stall begins with our acknowledgement of a window
//! of 0 or 1 KiB and ends with the client's probe; the backlog held 1 MB
//! when the last window was computed) and moved 0.17 to 0.38 GiB/s, where
//! socket-proxyd moved 0.9 to 1.0.
//!
//! So a take that consumed [`NUDGE_AFTER`] or more reads all but its last
//! byte, offers the CPU to whatever waits for it (`sched_yield`: a client on
//! this CPU sends into the room announced while we hold no lock, and that
//! is redirected as it arrives), and then reads the last byte, whose read
//! finds the buffer empty and announces the room
//! (`__tcp_cleanup_rbuf()` acknowledges a read that at least doubles the
//! window). The same uploads then moved 0.80 to 1.31 GiB/s. Alone on its
//! CPU the yield returns at once (the bench's bulk rows, 2.5 % of the
//! bytes copied with it and 2.6 % without). Reading the last byte at once
//! was not enough (its own acknowledgement let the client fill the backlog
//! again); reading it 2 ms later removed the stalls but held up the relay,
//! and the bench's sockmap bulk copied 6.3 % of its bytes.
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
//! 4095 bytes a call, 17 calls a run and on in tail calls of itself (the
//! receive queue coalesces segments: an skb can start with two segments
//! that came again, 130966 old bytes); an skb with no new byte (whole
//! segments come a second time too) is dropped. With the proxy on one CPU
//! and the client and backend on the other (`scripts/proxy-integrity`),
//! 60 of 60 transfers of 1 GiB with every byte checked arrived whole on
//! 6.18 (0.3 to 1 MB cut off per 20 GiB); without the tail calls,
//! once passed bytes were held (below), 4 of 20 were reset; the plain
//! program reset 12 of 40. The kernel then advances `copied_seq` by the cut
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
//! History of the way back: the same sequence with `MSG_PEEK` was tried
//! before the program cut repeated bytes off (see above), consuming after
//! each round and with the receive buffer at 4 MiB. The backend got whole
//! segments twice (the overlap defect, which the cut now handles), and a
//! held amount as large as the credit kept three fifths of the bytes on
//! the copying path. `TCP_WINDOW_CLAMP` does not bound what is held:
//! autotuning raises the clamp again unless the receive buffer is locked,
//! and with it locked the buffer is the bound anyway.
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
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, ProgramArray, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::sys;
use super::{Activity, Fault};

static PROXY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy.bpf.o"));

/// Unacknowledged bytes towards one socket beyond which the program stops
/// redirecting (per direction of each connection), at first and at least
/// (it grows with a fast peer, [`Credit`]): the default maximum of the TCP
/// send buffer (`tcp_wmem`), and what a peer that reads nothing makes a
/// direction hold, with the receive buffer.
pub const LIMIT: u64 = 4 << 20;

/// The smallest send buffer a credit is sized to (the probe's credit is a
/// 64th of [`LIMIT`], 64 KiB).
const CAP_FLOOR: u64 = 128 * 1024;

/// How a direction's credit may grow: from `base`, up to `max` while the
/// peer keeps up (see [`Credit::after_hold`]).
#[derive(Debug, Clone, Copy)]
pub struct Credit {
    pub base: u64,
    pub max: u64,
}

/// A credit the peer takes within this time at its pace is too small: it
/// doubles. One it takes in less than four times as long is too large: it
/// halves. So the bytes queued towards a peer are some 50 ms of what it
/// takes, between the base and the ceiling.
const CREDIT_SPAN: Duration = Duration::from_millis(50);

impl Credit {
    /// The ceiling for serving: what one TCP socket of this host may hold in
    /// its receive buffer (`net.ipv4.tcp_rmem`'s maximum: 6 MiB by default
    /// on older kernels, 32 MiB on this machine's 6.18), so that a proxied
    /// connection never queues more than a plain one could, and never less
    /// than [`LIMIT`].
    pub fn serving() -> Credit {
        let rmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem")
            .ok()
            .and_then(|t| t.split_whitespace().nth(2)?.parse::<u64>().ok())
            .unwrap_or(LIMIT);
        Credit {
            base: LIMIT,
            max: rmem_max.max(LIMIT),
        }
    }

    /// A credit that never grows (the probe's).
    pub fn fixed(limit: u64) -> Credit {
        Credit {
            base: limit,
            max: limit,
        }
    }

    /// This credit within what `dst`'s send buffer holds: half of it, the
    /// rest left for the buffers' own overhead (see [`fix_sndbuf`]).
    fn within_send_buffer(self, dst: &End) -> Credit {
        let Ok(sndbuf) =
            sys::getsockopt::<libc::c_int>(dst.fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF)
        else {
            return self;
        };
        let cap = u64::try_from(sndbuf).unwrap_or(0).max(CAP_FLOOR) / 2;
        let base = self.base.min(cap);
        Credit {
            base,
            max: self.max.min(cap).max(base),
        }
    }

    /// The credit after `limit` ran out, the peer having acknowledged
    /// `taken` bytes over `span` since it last ran out (or the relay began).
    fn after_hold(self, limit: u64, taken: u64, span: Duration) -> u64 {
        // What the peer takes in CREDIT_SPAN at the pace it just kept.
        let pace = u128::from(taken) * CREDIT_SPAN.as_micros() / span.as_micros().max(1);
        let pace = u64::try_from(pace).unwrap_or(u64::MAX);
        if pace >= limit {
            limit.saturating_mul(2).min(self.max)
        } else if pace < limit / 4 {
            (limit / 2).max(self.base)
        } else {
            limit
        }
    }
}

/// The receive buffer of every armed socket: what a side holds while the
/// program passes, and what is copied each time the way back to
/// redirecting is taken (the module's documentation). 4 MiB kept three
/// fifths of a bulk transfer on the copying path; 256 KiB made senders
/// wait for zero-window probes.
const RCVBUF_CAP: u64 = 1 << 20;

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
    /// An epoll instance of our own, registered with the runtime, watching
    /// armed sockets for what [`End::new`] says, each under its cookie.
    quiet: AsyncFd<OwnedFd>,
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
    /// The trimming program's tail-call array. Kept open: the kernel
    /// empties a program array once no file descriptor refers to it.
    _again: Option<ProgramArray<MapData>>,
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
    #[error("creating the epoll instance that watches proxied sockets: {0}")]
    Watch(#[source] io::Error),
}

/// The program loaded and attached, its maps taken: what [`Kernel`] is made
/// of before it is registered with the runtime. Made on any thread (loading
/// runs the verifier, and aya parses the kernel's BTF: tens of ms, which a
/// proxy serves through, [`Loaded::load`]), registered on the runtime's.
pub struct Loaded {
    ebpf: Ebpf,
    socks: SockHash<MapData, u64>,
    sides: HashMap<MapData, u64, Side>,
    counts: HashMap<MapData, u64, Count>,
    ring: RingBuf<MapData>,
    again: Option<ProgramArray<MapData>>,
    /// As [`Kernel::untrimmed`].
    pub untrimmed: Option<String>,
}

impl Loaded {
    /// Load the program, the one that trims overlapping segments if `trim`
    /// (it needs CAP_PERFMON), and attach it; its ring buffer sized for
    /// `connections_max` connections ([`ring_size`]).
    pub fn load(trim: bool, connections_max: usize) -> Result<Loaded, LoadError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("credit", ring_size(connections_max))
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
        let again = if trim {
            // The program cuts on in a tail call of itself (ska_trim).
            let mut again: ProgramArray<MapData> = ebpf
                .take_map("again")
                .ok_or(LoadError::Missing("again"))?
                .try_into()
                .map_err(|e| LoadError::Map("again", e))?;
            let prog: &SkSkb = ebpf
                .program(name)
                .ok_or(LoadError::Missing(name))?
                .try_into()
                .map_err(LoadError::Program)?;
            let fd = prog.fd().map_err(LoadError::Program)?;
            again
                .set(0, fd, 0)
                .map_err(|e| LoadError::Map("again", e))?;
            Some(again)
        } else {
            None
        };
        let prog: &mut SkSkb = ebpf
            .program_mut(name)
            .ok_or(LoadError::Missing(name))?
            .try_into()
            .map_err(LoadError::Program)?;
        prog.attach(socks.fd()).map_err(LoadError::Attach)?;
        Ok(Loaded {
            ebpf,
            socks,
            sides,
            counts,
            ring,
            again,
            untrimmed: (!trim).then(|| "it was not asked to".to_owned()),
        })
    }

    /// Watch the ring buffer and make the epoll instance for armed
    /// sockets, with the runtime of the calling thread.
    pub fn register(self) -> Result<Kernel, LoadError> {
        // SAFETY: the fd belongs to `ring`, which the Kernel keeps open
        // until after this registration is dropped (field order).
        let ring_ready = unsafe {
            AsyncFd::register_with_interest(RingFd(self.ring.as_raw_fd()), Interest::READABLE)
        }
        .map_err(|e| LoadError::Ring(e.into()))?;
        let quiet = sys::epoll_create()
            // SAFETY: the AsyncFd owns the epoll fd and closes it when
            // dropped, after deregistering.
            .and_then(|ep| Ok(unsafe { AsyncFd::register_with_interest(ep, Interest::READABLE) }?))
            .map_err(LoadError::Watch)?;
        Ok(Kernel {
            quiet,
            ring_ready,
            ring: RefCell::new(self.ring),
            waiters: RefCell::default(),
            _ebpf: self.ebpf,
            socks: RefCell::new(self.socks),
            sides: RefCell::new(self.sides),
            counts: RefCell::new(self.counts),
            _again: self.again,
            untrimmed: self.untrimmed,
        })
    }
}

impl Kernel {
    fn count(&self, cookie: u64) -> Count {
        self.counts.borrow().get(&cookie, 0).unwrap_or_default()
    }

    fn set_side(&self, cookie: u64, side: &Side) -> io::Result<()> {
        self.sides
            .borrow_mut()
            .insert(cookie, side, 0)
            .map_err(io::Error::other)
    }

    /// Wake the relay of each side whose credit is a quarter used or that
    /// began to pass (the `credit` ring buffer), or whose socket has ended or
    /// failed, or has input where that is watched ([`Kernel::watch`]); runs
    /// as long as the process serves (one task).
    pub async fn wake_events(&self) {
        let mut ready = Vec::new();
        loop {
            tokio::select! {
                g = self.ring_ready.readable() => {
                    // Only when the runtime shuts down.
                    let Ok(mut g) = g else {
                        tracing::error!("the credit ring buffer is not pollable");
                        return;
                    };
                    {
                        let mut ring = self.ring.borrow_mut();
                        while let Some(item) = ring.next() {
                            if let Ok(cookie) = <[u8; 8]>::try_from(&*item) {
                                self.wake(u64::from_ne_bytes(cookie));
                            }
                        }
                    }
                    g.clear_ready();
                }
                g = self.quiet.readable() => {
                    let Ok(mut g) = g else {
                        tracing::error!("the epoll instance watching proxied sockets failed");
                        return;
                    };
                    ready.clear();
                    if let Err(e) = sys::epoll_ready(self.quiet.get_ref().as_fd(), &mut ready) {
                        tracing::warn!("reading the proxied sockets' events: {e}");
                    }
                    for &cookie in &ready {
                        self.wake(cookie);
                    }
                    g.clear_ready();
                }
            }
        }
    }

    /// Register the relay reading the socket `cookie`, woken by
    /// [`Kernel::wake_events`]; it is woken once at once.
    fn waiter(&self, cookie: u64) -> Rc<Notify> {
        let wake = Rc::new(Notify::new());
        wake.notify_one();
        self.waiters.borrow_mut().insert(cookie, wake.clone());
        wake
    }

    fn wake(&self, cookie: u64) {
        if let Some(w) = self.waiters.borrow().get(&cookie) {
            w.notify_one();
        }
    }

    /// Watch an armed socket for its end and errors, and for input too if
    /// `input` (where every byte is passed: then every input is for us).
    fn watch(&self, end: &End, input: bool) -> io::Result<()> {
        self.epoll_ctl(libc::EPOLL_CTL_ADD, end, input)
    }

    /// Stop watching an armed socket for input.
    fn watch_end_only(&self, end: &End) -> io::Result<()> {
        self.epoll_ctl(libc::EPOLL_CTL_MOD, end, false)
    }

    fn epoll_ctl(&self, op: libc::c_int, end: &End, input: bool) -> io::Result<()> {
        sys::epoll_ctl(
            self.quiet.get_ref().as_fd(),
            op,
            end.fd.as_fd(),
            watched(input),
            end.cookie,
        )
    }

    fn unwatch(&self, end: &End) {
        // Not watched (arming failed first) or closed: nothing to undo.
        let _ = sys::epoll_del(self.quiet.get_ref().as_fd(), end.fd.as_fd());
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

/// The `credit` ring buffer's size for `connections_max` connections. It
/// must not fill: a lost signal leaves a relay asleep (nothing else wakes
/// it for passed bytes). Each side has at most one credit signal and one
/// pass signal outstanding between two times its relay runs (a new one
/// needs a value only the relay writes: a new `notify`, or `drained` caught
/// up), and the task that reads the ring runs whenever the runtime turns;
/// room for four records of 16 bytes per side, and at least the 64 KiB of
/// the object, covers that with margin. The SOCKHASH holds 65536 sockets
/// at most (`SKA_PROXY_MAX_SOCKETS`), so 4 MiB at most.
pub fn ring_size(connections_max: usize) -> u32 {
    const MAX_SOCKETS: usize = 65536;
    let sides = connections_max.saturating_mul(2).min(MAX_SOCKETS);
    let bytes = (sides * 4 * 16).next_power_of_two().max(64 * 1024);
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// What [`Kernel::watch`] watches a socket for: its peer's FIN
/// (`EPOLLRDHUP`; errors and hang-ups always), edge-triggered, and input if
/// `input`.
fn watched(input: bool) -> libc::c_int {
    let events = libc::EPOLLRDHUP | libc::EPOLLET;
    if input {
        events | libc::EPOLLIN
    } else {
        events
    }
}

/// One socket of an armed connection.
pub struct End {
    /// Not registered with the runtime: see [`End::new`].
    pub fd: OwnedFd,
    pub cookie: u64,
    /// tcpi_bytes_acked when the end was made, the base of both counts
    /// below: bytes written since then are those acknowledged since and
    /// those in the send queue now.
    acked_base: u64,
    written_base: u64,
    /// Bytes in the send queue when the end was made: written by user space
    /// (the PROXY header, the connection's opening) and not yet
    /// acknowledged. They count as written towards this socket.
    in_flight: u64,
    /// Bytes user space read from the socket before it was made (the
    /// opening): TCP received them, the program never saw them.
    received_base: u64,
    /// ESTABLISHED when the end was made (only such a socket may join a
    /// SOCKHASH; one that has changed since makes the insert fail, and
    /// [`arm`] copes with that).
    established: bool,
    /// The most [`End::written_since`] has returned: below it, no need to ask.
    sent_seen: std::cell::Cell<u64>,
}

impl End {
    /// Note the bases, just before the socket is armed; `consumed` is what
    /// user space has read from it so far.
    ///
    /// The socket is not registered with the runtime, whose registrations
    /// are for reading and writing: while the kernel redirects, the
    /// kernel signals a socket readable for every chunk the program
    /// redirects (the sockmap's data-ready callback wakes the socket's
    /// waiters after each read of the receive queue, whatever the verdict),
    /// and writable for every acknowledgement that frees room in its send
    /// buffer; a bulk transfer woke the proxy for each 64 KiB. An armed
    /// socket is watched by [`Kernel`] for its end and errors only (and for
    /// input where every byte is passed); passed bytes are signalled by the
    /// program ([`relay`]), and a write that finds no room waits through a
    /// registration of its own ([`send_all`]).
    pub fn new(fd: OwnedFd, consumed: u64) -> io::Result<End> {
        let cookie = sys::cookie(fd.as_fd())?;
        let (state, acked) = sys::tcp_state_acked(fd.as_fd())?;
        let in_flight = sys::outq(fd.as_fd())?;
        Ok(End {
            fd,
            cookie,
            acked_base: acked,
            written_base: acked,
            in_flight,
            received_base: consumed,
            established: state == 1,
            sent_seen: std::cell::Cell::new(0),
        })
    }

    /// The socket, for a connection that is not armed after all.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    fn written_since(&self) -> io::Result<u64> {
        Ok(sys::bytes_written(self.fd.as_fd())? - self.written_base)
    }

    fn acked_since(&self) -> io::Result<u64> {
        Ok(sys::bytes_acked(self.fd.as_fd())?.saturating_sub(self.acked_base))
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
        self.kernel.unwatch(self.client);
        self.kernel.unwatch(self.backend);
        self.kernel.forget(self.client.cookie);
        self.kernel.forget(self.backend.cookie);
    }
}

/// Whether a TCP socket may join a SOCKHASH (it must be ESTABLISHED), as
/// it was when the end was made.
pub fn established(end: &End) -> bool {
    end.established
}

/// Steps 3 to 5 of the module's sequence. What user space wrote to either
/// socket and was not acknowledged counts against the credit towards it
/// ([`End`]'s `in_flight`). `limit` is [`LIMIT`] but for the probe, which
/// makes it small to go through the pass path. An error means nothing was
/// inserted: the connection can go on without the kernel's help. When only
/// part could be set up, the result is not [`Armed::full`]: the sockets stay
/// in the SOCKHASH, everything is passed, and the relay copies.
pub fn arm<'a>(
    kernel: &'a Kernel,
    client: &'a End,
    backend: &'a End,
    credit: Credit,
) -> io::Result<Armed<'a>> {
    let mut armed = Armed {
        kernel,
        client,
        backend,
        full: false,
    };
    // For input too until both sides redirect: until then everything
    // either socket receives is passed to us.
    for end in [client, backend] {
        kernel.watch(end, true)?;
    }
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
        .insert(backend.cookie, backend.fd.as_raw_fd(), 0)
        .map_err(io::Error::other)?;
    let client_in = kernel
        .socks
        .borrow_mut()
        .insert(client.cookie, client.fd.as_raw_fd(), 0);
    if let Err(e) = client_in {
        tracing::debug!("client socket not inserted ({e}): copying this connection");
        kernel_kick(backend);
        return Ok(armed);
    }
    for end in [client, backend] {
        fix_rcvbuf(end);
        fix_sndbuf(end, credit.max);
    }
    // Step 4 before step 5: bytes already queued are passed, not
    // redirected from our context (see the module's documentation).
    kernel_kick(client);
    kernel_kick(backend);
    let first = |src: &End, dst: &End| {
        let limit = credit.within_send_buffer(dst).base;
        let room = limit.saturating_sub(dst.in_flight);
        kernel.set_side(
            src.cookie,
            &Side {
                peer: dst.cookie,
                drained: 0,
                allowed: room,
                notify: notify_at(0, room, limit),
            },
        )
    };
    let sides = first(client, backend).and_then(|()| first(backend, client));
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
    for end in [client, backend] {
        if let Err(e) = kernel.watch_end_only(end) {
            // Woken for every chunk redirected: slower, not wrong.
            tracing::debug!("epoll: {e}");
        }
    }
    armed.full = true;
    Ok(armed)
}

/// Fix `end`'s receive buffer at [`RCVBUF_CAP`], which bounds what it
/// holds while the program passes. Autotuning would otherwise grow it to
/// tcp_rmem's maximum (32 MiB on this machine's Linux 6.18, 6 MiB by
/// default on older ones) even while nothing reads it: with a backend that
/// read nothing, the proxy held 27 MB of a client's bytes. Done when the
/// socket is armed, before its window ever went past the initial one.
/// Made smaller later, while the sender had a larger window in flight, the
/// buffer dropped segments, whose retransmissions overlap bytes received:
/// the program must cut them off, and where it cannot the connection is
/// reset. (Fixed when the first held bytes were consumed, the buffer did
/// not bound the first hold, which autotuning had grown; fixed from the
/// start, `scripts/proxy-integrity`'s 1 GiB transfers took some 5 % longer,
/// with the same share redirected and the same CPU time per GiB.)
fn fix_rcvbuf(end: &End) {
    // The kernel doubles the value it is given.
    let half = i32::try_from(RCVBUF_CAP / 2).unwrap_or(i32::MAX);
    if let Err(e) = sys::setsockopt(end.fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, half) {
        tracing::debug!("SO_RCVBUF: {e}");
    }
}

/// Fix `end`'s send buffer at twice `ceiling`, the most credit a direction
/// towards it may reach ([`Credit::serving`]'s maximum), so that the bytes
/// the program redirects to it always find room in its send queue.
///
/// A redirected chunk is sent from a kernel worker (`sk_psock_backlog`).
/// Where the socket's send queue is full the send fails with `EAGAIN`, and
/// the worker puts itself off by one jiffy (`schedule_delayed_work(…, 1)`,
/// since the sockmap fixes of 6.4 and the stable kernels they went to; 4 ms
/// at `HZ=250`). The room the peer's acknowledgements free meanwhile wakes
/// it no sooner: the write-space callback's own `schedule_delayed_work(…,
/// 0)` finds the work already pending and does nothing (before 6.4 that
/// callback was what restarted the worker). Autotuned, the send buffer
/// stops at `tcp_wmem`'s maximum (4 MiB), under a credit that grows to
/// `tcp_rmem`'s (32 MiB here), so a bulk transfer hit that pause every few
/// MiB, with every thread of the transfer waiting: 0.8 s of the clients' CPU
/// idle per GiB in the bench's bulk rounds. A redirect towards a send buffer
/// of `S` bytes moves about `S/2` per jiffy; measured on 5.10 to 7.2 with
/// `scripts/sockmap-pass-check --redirect --sndbuf` and written up in
/// docs/kernel-report-sockmap-backlog-pause.md.
///
/// The buffer is a bound, not an allocation: what is queued stays within
/// the credit. `SO_SNDBUFFORCE` passes `net.core.wmem_max` with
/// `CAP_NET_ADMIN`, which sockmap mode has; otherwise `SO_SNDBUF` gives what
/// that allows, and the credit is kept within it
/// ([`Credit::within_send_buffer`]).
fn fix_sndbuf(end: &End, ceiling: u64) {
    // The kernel doubles the value it is given.
    let v = i32::try_from(ceiling).unwrap_or(i32::MAX / 2);
    let fd = end.fd.as_fd();
    if sys::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, v).is_err()
        && let Err(e) = sys::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, v)
    {
        tracing::debug!("SO_SNDBUF: {e}");
    }
}

/// Step 4: bytes that arrived before the insert go through the program now.
fn kernel_kick(end: &End) {
    if let Err(e) = sys::set_rcvlowat(end.fd.as_fd(), 1) {
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
/// small (below malloc's mmap threshold), then, once a read fills it,
/// larger. An armed side looks at every passed byte waiting in one go (see
/// "The way back to redirecting"); they are at most what the capped
/// receive buffer holds.
const BUF_FIRST: usize = 16 * 1024;
const BUF_MAX: usize = RCVBUF_CAP as usize;

/// What a consuming read takes at once, to compare with what was peeked.
const SCRATCH: usize = 64 * 1024;

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

/// Why a relay woke up.
enum Why {
    /// A signal of the program's, the socket's end or an error.
    Wake,
    Timer,
}

/// A connection whose sides could not both be armed: every byte is passed
/// and copied here, in order after whatever the program redirected before.
async fn relay_copied(
    armed: &Armed<'_>,
    src: &End,
    dst: &End,
    activity: &Activity,
) -> Result<(), Fault> {
    let kernel = armed.kernel;
    let mut written = dst.in_flight;
    let mut drained = 0u64;
    let mut buf = vec![0u8; BUF_FIRST];
    // Watched for input, edge-triggered: read until nothing is left, then
    // wait for the next event (and look once first).
    let wake = kernel.waiter(src.cookie);
    loop {
        wake.notified().await;
        loop {
            let n = match sys::recv(src.fd.as_fd(), &mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                r => r.map_err(Fault::Read)?,
            };
            let count = kernel.count(src.cookie);
            if n == 0 && count.passed > drained {
                // EOF ahead of passed bytes still in the socket's work queue:
                // they become readable shortly; EOF is only real after them.
                tokio::time::sleep(Duration::from_micros(200)).await;
                continue;
            }
            wait_sent(dst, written + count.redirected).await?;
            if n == 0 {
                sys::shutdown_write(dst.fd.as_fd()).map_err(Fault::Write)?;
                return Ok(());
            }
            activity.touch();
            send_all(dst, &buf[..n]).await?;
            written += n as u64;
            // Bytes of a socket outside the SOCKHASH are not counted.
            drained = (drained + n as u64).min(count.passed);
            if n == buf.len() && buf.len() < 256 * 1024 {
                buf = vec![0u8; 256 * 1024];
            }
        }
    }
}

/// One direction, `src` to `dst`, until EOF was forwarded.
///
/// Both sides armed: the program redirects while the credit lasts, and
/// bytes it passed are held, looked at, written, published and only then
/// consumed (the module's "The way back to redirecting").
pub async fn relay(
    armed: &Armed<'_>,
    src: &End,
    dst: &End,
    credit: Credit,
    activity: &Activity,
) -> Result<(), Fault> {
    if !armed.full {
        return relay_copied(armed, src, dst, activity).await;
    }
    let credit = credit.within_send_buffer(dst);
    let mut limit = credit.base;
    let kernel = armed.kernel;
    let mut flow = Flow {
        written: dst.in_flight,
        drained: 0,
        // Allocated on the first pass, small: most connections see only
        // the early bytes and EOF. A large buffer per direction cost each
        // connection mmap/munmap pairs, page faults and zeroing; it grows
        // only when passed bytes need more.
        buf: Vec::new(),
        scratch: Vec::new(),
    };
    // Woken by the program (credit a quarter used; the first byte passed),
    // by the socket's end or an error, and looks once first: bytes passed
    // before the sides were written came with no signal.
    let wake = kernel.waiter(src.cookie);
    // Some(pause) while little credit is left or passed bytes are held:
    // re-check after the pause.
    let mut recheck: Option<Duration> = None;
    let mut last_room = limit;
    // A peer takes a small credit's worth sooner: the probe's (a 64th of
    // LIMIT) is re-checked every millisecond, so that its stalled backend
    // is seen to read again at once, not after a backed-off pause.
    let recheck_max = RECHECK_MAX
        .mul_f64(credit.base as f64 / LIMIT as f64)
        .clamp(RECHECK_MIN, RECHECK_MAX);
    // The socket may have something to read (an end, an error, passed
    // bytes) since a wake-up: its events are edge-triggered, so this stays
    // set until a look finds nothing (a hold does not look).
    let mut look = false;
    // Holding since the credit last ran out; and what the peer had
    // acknowledged then, and when.
    let mut held = false;
    let mut since = (0u64, Instant::now());
    loop {
        let why = tokio::select! {
            biased;
            () = wake.notified() => Why::Wake,
            () = maybe_sleep(recheck) => Why::Timer,
        };
        let timer = matches!(why, Why::Timer);
        look |= !timer;
        let count = kernel.count(src.cookie);
        // Before a passed byte is written or EOF forwarded: a peer must
        // not take a stream with repeated bytes for the one sent.
        check_not_repeated(src, &count)?;
        let waiting = count.passed.saturating_sub(flow.drained);
        let mut room = flow.room(dst, &count, limit)?;
        let hold = waiting > 0 && room < limit / 2;
        if hold && !held {
            // The credit ran out: size the next one to the peer's pace.
            let acked = dst.acked_since().map_err(Fault::Write)?;
            limit = credit.after_hold(limit, acked.saturating_sub(since.0), since.1.elapsed());
            since = (acked, Instant::now());
            room = flow.room(dst, &count, limit)?;
        }
        held = hold;
        if hold {
            // Hold: the passed bytes stay unread and charged to src, whose
            // window closes, and the sender waits until the peer has taken
            // half a credit's worth. A reset of either end must still end
            // the connection.
            sys::take_error(src.fd.as_fd()).map_err(Fault::Read)?;
            sys::take_error(dst.fd.as_fd()).map_err(Fault::Write)?;
            publish(kernel, src, dst, &count, flow.drained, room, limit)?;
        } else if waiting > 0 || look {
            let peeked = match flow.peek(&src.fd, waiting, 0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                r => Some(r.map_err(Fault::Read)?),
            };
            look = peeked.is_some();
            match peeked {
                // Nothing readable yet: passed bytes still on their way
                // through the socket's work queue (the timer looks again), or
                // a wake-up for credit.
                None => publish(kernel, src, dst, &count, flow.drained, room, limit)?,
                Some(0) => {
                    // EOF. Only real once every byte before it went
                    // through the program and was forwarded.
                    let count = kernel.count(src.cookie);
                    if count.passed > flow.drained {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                        wake.notify_one();
                        continue;
                    }
                    check_not_repeated(src, &count)?;
                    wait_sent(dst, flow.written + count.redirected).await?;
                    sys::shutdown_write(dst.fd.as_fd()).map_err(Fault::Write)?;
                    return Ok(());
                }
                Some(_) if waiting == 0 => {
                    // Readable bytes the program has not counted: the
                    // program counts before it queues, so only a byte it
                    // never saw. Sending it would break the order.
                    if kernel.count(src.cookie).passed == flow.drained {
                        return Err(Fault::Read(io::Error::other(
                            "bytes readable that the verdict program never saw",
                        )));
                    }
                    wake.notify_one();
                    continue;
                }
                Some(n) => {
                    activity.touch();
                    room = flow.take(kernel, src, dst, count, n, limit).await?;
                }
            }
        } else {
            publish(kernel, src, dst, &count, flow.drained, room, limit)?;
        }
        // While passed bytes wait (the program signals only the first;
        // they may not be readable yet; a hold waits for the peer), and while
        // too little credit is left for the program to signal its use
        // (`notify_at`), the peer's progress is only seen by asking: every
        // millisecond while it moves, backing off to `recheck_max` while it
        // does not (counted on the timer only). Otherwise the relay sleeps
        // until the program, the socket's end or an error wakes it.
        let waiting = kernel.count(src.cookie).passed > flow.drained;
        if look && !waiting {
            // Bytes were taken: look again at once, for an end behind them.
            wake.notify_one();
        }
        recheck = if waiting || notify_at(0, room, limit) == 0 {
            Some(match recheck {
                Some(p) if timer && room <= last_room => (p * 2).min(recheck_max),
                Some(p) if !timer && room <= last_room => p,
                _ => RECHECK_MIN,
            })
        } else {
            None
        };
        last_room = room;
    }
}

/// The user-space state of one armed direction.
struct Flow {
    /// Bytes user space wrote to dst since its end was made: what was in
    /// flight then (the PROXY header, the opening), and passed bytes.
    written: u64,
    /// Passed bytes written to dst and published.
    drained: u64,
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

impl Flow {
    /// Credit left towards dst: what keeps the bytes it has not
    /// acknowledged within `limit`.
    fn room(&self, dst: &End, count: &Count, limit: u64) -> Result<u64, Fault> {
        let acked = dst.acked_since().map_err(Fault::Write)?;
        Ok(limit.saturating_sub((self.written + count.redirected).saturating_sub(acked)))
    }

    /// Look at the first `seen + waiting` queued bytes (MSG_PEEK): the
    /// `seen` already written and the `waiting` passed after them, as far
    /// as the buffer goes.
    fn peek(&mut self, fd: &OwnedFd, waiting: u64, seen: usize) -> io::Result<usize> {
        let need = seen.saturating_add(usize::try_from(waiting).unwrap_or(usize::MAX));
        if self.buf.len() < need.clamp(BUF_FIRST, BUF_MAX) {
            self.buf = vec![0u8; need.next_power_of_two().clamp(BUF_FIRST, BUF_MAX)];
        }
        let want = need.clamp(1, self.buf.len());
        sys::recv_peek(fd.as_fd(), &mut self.buf[..want])
    }

    /// The way back to redirecting: the first `n` queued bytes were looked
    /// at. Write them, publish, and look again for bytes passed meanwhile
    /// (the sender still had some window), writing and publishing those,
    /// until the program has seen `passed == drained`: only then consume,
    /// which opens the window, and what the sender sends next is
    /// redirected. Returns the room left.
    async fn take(
        &mut self,
        kernel: &Kernel,
        src: &End,
        dst: &End,
        mut count: Count,
        n: usize,
        limit: u64,
    ) -> Result<u64, Fault> {
        // Bytes looked at and written, not yet consumed.
        let mut seen = 0usize;
        let mut visible = n;
        let mut room = self.room(dst, &count, limit)?;
        for _ in 0..TAKE_ROUNDS {
            let new = visible.saturating_sub(seen);
            if new > 0 {
                // Everything the program redirected before these bytes goes
                // first (while bytes wait, it redirects nothing).
                wait_sent(dst, self.written + count.redirected).await?;
                send_all(dst, &self.buf[seen..visible]).await?;
                self.written += new as u64;
                self.drained += new as u64;
                room = room.saturating_sub(new as u64);
                publish(kernel, src, dst, &count, self.drained, room, limit)?;
                seen = visible;
            }
            count = kernel.count(src.cookie);
            let waiting = count.passed.saturating_sub(self.drained);
            if waiting == 0 || seen >= self.buf.len() {
                break;
            }
            visible = match self.peek(&src.fd, waiting, seen) {
                Ok(v) if v > seen => v,
                // Passed bytes not readable yet (the socket's work queue):
                // the next wake-up takes them.
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(Fault::Read(e)),
            };
        }
        if seen < NUDGE_AFTER {
            consume(src, &self.buf[..seen], &mut self.scratch).await?;
        } else {
            // All but the last byte; then let a sender on this CPU fill the
            // window while we hold no lock; the last byte's read announces
            // the room (the module's "The window after a take").
            let last = seen - 1;
            consume(src, &self.buf[..last], &mut self.scratch).await?;
            std::thread::yield_now();
            consume(src, &self.buf[last..seen], &mut self.scratch).await?;
        }
        Ok(room)
    }
}

/// A take that consumed this much may have left the sender's window shut
/// with nothing held: its last byte is read after the CPU was offered to
/// whatever waits for it (the module's "The window after a take").
const NUDGE_AFTER: usize = 64 * 1024;

/// Rounds of [`Flow::take`] at most: each one writes what the sender's
/// remaining window let in during the one before, which shrinks to nothing
/// as the held bytes fill the receive buffer.
const TAKE_ROUNDS: usize = 32;

/// Hand out credit: what keeps the bytes towards `dst` that it has not
/// acknowledged within the limit, and the `drained` count.
fn publish(
    kernel: &Kernel,
    src: &End,
    dst: &End,
    count: &Count,
    drained: u64,
    room: u64,
    limit: u64,
) -> Result<(), Fault> {
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
        .map_err(Fault::Write)
}

/// Consume the bytes just looked at, written and published: they are at
/// the head of the socket's queue (only we consume; the program only
/// appends), so the reads return exactly them. Compared, because they were
/// sent on already: a kernel that showed other bytes than it now returns
/// fails the connection rather than corrupt it silently.
async fn consume(src: &End, peeked: &[u8], scratch: &mut Vec<u8>) -> Result<(), Fault> {
    if scratch.is_empty() {
        *scratch = vec![0u8; SCRATCH];
    }
    let mut done = 0;
    let mut waits = 0u32;
    while done < peeked.len() {
        let want = (peeked.len() - done).min(scratch.len());
        match sys::recv(src.fd.as_fd(), &mut scratch[..want]) {
            Ok(0) => {
                return Err(Fault::Read(io::Error::other(
                    "end of stream inside bytes already looked at",
                )));
            }
            Ok(k) if scratch[..k] != peeked[done..done + k] => {
                let at = (0..k)
                    .find(|&i| scratch[i] != peeked[done + i])
                    .unwrap_or(0);
                return Err(Fault::Read(io::Error::other(format!(
                    "the kernel returned other bytes than MSG_PEEK showed (at {} of {}, read {k}: {:?} vs {:?})",
                    done + at,
                    peeked.len(),
                    &scratch[at..(at + 16).min(k)],
                    &peeked[done + at..(done + at + 16).min(peeked.len())]
                ))));
            }
            Ok(k) => done += k,
            // The bytes are there; the socket's lock was contended.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && waits < 1000 => {
                waits += 1;
                if waits < 16 {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Err(e) => return Err(Fault::Read(e)),
        }
    }
    Ok(())
}

/// The program is handed only bytes TCP has received, so it cannot have
/// seen more of them than TCP counts (`tcpi_bytes_received`, each byte once)
/// unless the kernel handed some over twice (see "Known defect" above): then
/// the stream the peer gets is not the one sent, and the connection must end
/// in a reset. Checked whenever the relay wakes and at EOF, where everything
/// received has been through the program.
fn check_not_repeated(src: &End, count: &Count) -> Result<(), Fault> {
    let received = sys::bytes_received(src.fd.as_fd()).map_err(Fault::Read)?;
    match repeated(count, received.saturating_sub(src.received_base)) {
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

/// Write all of `buf` to `dst`. Its socket is registered for reading only
/// ([`End::new`]): when its send buffer is full, a duplicate of its fd is
/// registered for writing for as long as this write waits.
async fn send_all(dst: &End, buf: &[u8]) -> Result<(), Fault> {
    let mut at = 0;
    while at < buf.len() {
        match sys::send(dst.fd.as_fd(), &buf[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let dup = dst.fd.try_clone().map_err(Fault::Write)?;
                // SAFETY: the AsyncFd owns the duplicate and closes it
                // when dropped, after deregistering.
                let w = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }
                    .map_err(|e| Fault::Write(e.into()))?;
                return super::write_all(&w, &buf[at..]).await;
            }
            Err(e) => return Err(Fault::Write(e)),
        }
    }
    Ok(())
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
        sys::take_error(dst.fd.as_fd()).map_err(Fault::Write)?;
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

    /// The ring buffer: a power of two of pages (the kernel's rule), 64 KiB
    /// for the default 256 connections, growing with them up to the
    /// SOCKHASH's 65536 sockets.
    #[test]
    fn the_ring_buffer_is_sized_for_the_connections() {
        assert_eq!(ring_size(256), 64 * 1024);
        assert_eq!(ring_size(4096), 512 * 1024);
        assert_eq!(ring_size(32768), 4 << 20);
        assert_eq!(ring_size(usize::MAX), 4 << 20);
        for n in [1, 300, 5000, 40000] {
            let r = ring_size(n);
            assert!(r.is_power_of_two() && r >= 4096, "{n}: {r}");
            assert!(u64::from(r) >= n.min(32768) as u64 * 2 * 4 * 16, "{n}: {r}");
        }
    }

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

    /// What a direction may queue towards a socket fits in its send buffer
    /// (so a redirect never finds it full: see [`fix_sndbuf`]). A small
    /// buffer halves the credit down to its size; fixed, the buffer holds
    /// the whole ceiling twice over where `SO_SNDBUFFORCE` is allowed (as
    /// root; sockmap mode has `CAP_NET_ADMIN`), else what `wmem_max` allows,
    /// and the credit stays within half of it.
    #[test]
    fn the_credit_fits_the_peers_send_buffer() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let end = End::new(OwnedFd::from(c), 0).unwrap();
        let sndbuf = |end: &End| {
            let v: libc::c_int =
                sys::getsockopt(end.fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap();
            u64::try_from(v).unwrap()
        };
        let credit = Credit {
            base: LIMIT,
            max: 32 << 20,
        };

        // The kernel doubles it: 128 KiB.
        sys::setsockopt(end.fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, 64 << 10).unwrap();
        assert_eq!(sndbuf(&end), 128 << 10);
        let small = credit.within_send_buffer(&end);
        assert_eq!((small.base, small.max), (64 << 10, 64 << 10));

        fix_sndbuf(&end, credit.max);
        let fixed = sndbuf(&end);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(fixed, 64 << 20);
        }
        let within = credit.within_send_buffer(&end);
        assert_eq!(within.max, credit.max.min(fixed / 2));
        assert_eq!(within.base, credit.base.min(fixed / 2));
        assert!(2 * within.max <= fixed, "{within:?} in {fixed}");
    }
}
