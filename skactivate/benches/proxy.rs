//! `cargo bench -p skactivate --bench proxy`: `skactivate proxy` (sockmap and
//! splice modes) against `systemd-socket-proxyd`, in one interleaved run.
//! The table goes to stdout and to `target/bench-proxy.md`.
//!
//! Root only: everything runs in a network namespace of its own, on
//! loopback. Each proxy is a process of its own pinned to CPU 0 (taskset's
//! `sched_setaffinity`), handed its listening socket as systemd does
//! (`LISTEN_FDS`); the bench's clients and backends are threads pinned to
//! CPU 1. Every measurement is taken for each proxy in turn, round after
//! round, so slow drifts of the machine hit all of them alike.
//!
//! * latency: one connection, 1-byte ping-pong to an echo backend; every
//!   round trip timed; median and p99 over all rounds.
//! * bulk: the client sends `BULK` bytes through the proxy to a backend that
//!   reads and discards; throughput, the proxy process's CPU time
//!   (utime + stime from /proc/PID/stat) per GiB, and the same plus the CPU
//!   time of every kernel thread (kworker/*, ksoftirqd/*: in sockmap mode the
//!   redirected sends run in a kworker) over the same interval; and, from
//!   the bulk proxy's `STATUS=` (to a notify socket of the bench's), how
//!   many bytes the kernel redirected and how many the proxy copied; and
//!   the idle time of CPU 1 over each transfer, per GiB (CPU 1 runs the
//!   client and backend: a transfer that leaves it idle is waiting).
//! * connections: sequential connect, 1 byte each way, close, for `CONN_TIME`.
//! * slow reader: the backend reads nothing while the client pushes for
//!   `SLOW_TIME`; the most the proxy held (bytes its client socket took,
//!   minus those in the backend's receive queue).
//!
//! * context: what waking a thread on the other CPU costs, in the same run
//!   (a pipe ping-pong between a thread on CPU 0 and one on CPU 1, before
//!   and after the rounds). In a virtual machine whose idle CPUs halt, that
//!   wake-up goes through the hypervisor and can cost hundreds of
//!   microseconds: it then dominates the latency of a proxy that is woken
//!   for every byte, and the connection rate. With
//!   `SKACTIVATE_BENCH_CPU_LATENCY_US=N` the bench holds
//!   `/dev/cpu_dma_latency` at N for the run (0: idle CPUs poll instead of
//!   halting), as latency-minded hosts are tuned.
//! * `SKACTIVATE_BENCH_PROXY_CPU=1` pins the proxies to CPU 1 as well, with
//!   the clients and backends: a proxy sharing its CPU with the programs it
//!   serves, as on a busy host (the kernel threads that do sockmap's
//!   redirected sends run there too).
//!
//! * `SKACTIVATE_BENCH_ONLY=bulk` measures the bulk rounds alone (no starts,
//!   latency, connections or slow reader; their columns say `—`), and
//!   `SKACTIVATE_BENCH_ROUNDS=N` sets the number of rounds (4 by default):
//!   the proxy's CPU per GiB varies from round to round, and more rounds of
//!   it alone take less time than more rounds of everything.
//!
//! Run without `--bench` (as `cargo test --benches` does) it is a smoke test:
//! small sizes, no file written.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SOCKET_PROXYD: &str = "/lib/systemd/systemd-socket-proxyd";

struct Plan {
    rounds: usize,
    pings_per_round: usize,
    bulk: usize,
    conn_time: Duration,
    slow_time: Duration,
    /// Socket-activated starts timed per proxy.
    starts: usize,
    /// Fail at once on a bulk round that delivered the wrong number of
    /// bytes (the smoke run, a test); the bench reports them instead.
    strict: bool,
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity on
    // the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
    }
}

/// A proxy under test.
struct Proxy {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start a proxy to `target`; `sink`, when the target is one of ours that
/// does not echo, is where its readiness probe arrives.
fn start(
    name: &'static str,
    argv: &[&str],
    target: SocketAddr,
    sink: Option<&TcpListener>,
    notify: Option<&str>,
) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let child = spawn(argv, target, &l, notify, false);
    drop(l);
    // Ready when it passes a connection on (the listening socket accepts
    // in the kernel before the proxy runs).
    if let Some(sink) = sink {
        let _probe = TcpStream::connect(addr).unwrap();
        let _ = sink.accept().unwrap();
        return Proxy { name, child, addr };
    }
    let start = Instant::now();
    loop {
        if let Ok(mut c) = TcpStream::connect(addr) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if c.write_all(b"x").is_ok() {
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_ok() {
                    break;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{name} never answered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Proxy { name, child, addr }
}

/// Socket activation as its first client sees it: from the proxy's spawn
/// to the echo of a byte sent at once through its listening socket (which
/// queues the connection until the proxy accepts it), in ms.
fn first_reply(name: &str, argv: &[&str], echo: SocketAddr, hide_btf: bool) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t0 = Instant::now();
    let child = spawn(argv, echo, &l, None, hide_btf);
    let p = Proxy {
        name: "starting",
        child,
        addr,
    };
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    c.read_exact(&mut b)
        .unwrap_or_else(|e| panic!("{name}: no first reply: {e}"));
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(p);
    ms
}

/// The CPU the proxies run on: 0, or `SKACTIVATE_BENCH_PROXY_CPU`.
fn proxy_cpu() -> usize {
    std::env::var("SKACTIVATE_BENCH_PROXY_CPU").map_or(0, |v| {
        v.parse().expect("SKACTIVATE_BENCH_PROXY_CPU: a CPU number")
    })
}

/// Spawn a proxy to `target` on [`proxy_cpu`] with `l` as its socket from systemd;
/// with `hide_btf`, in a mount namespace where the kernel's BTF cannot be
/// read, as the example unit's `InaccessiblePaths=` has it.
fn spawn(
    argv: &[&str],
    target: SocketAddr,
    l: &TcpListener,
    notify: Option<&str>,
    hide_btf: bool,
) -> Child {
    let fd = l.as_raw_fd();
    let cpu = proxy_cpu();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
        .args(argv)
        .arg(target.to_string())
        .env("LISTEN_FDS", "1")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::fcntl(3, libc::F_SETFD, 0);
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
            if hide_btf {
                let null = std::ptr::null::<libc::c_char>();
                if libc::unshare(libc::CLONE_NEWNS) < 0
                    || libc::mount(
                        null,
                        c"/".as_ptr(),
                        null,
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) < 0
                    || libc::mount(
                        c"/dev/null".as_ptr(),
                        c"/sys/kernel/btf/vmlinux".as_ptr(),
                        null,
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    if let Some(n) = notify {
        cmd.env("NOTIFY_SOCKET", n);
    }
    cmd.spawn().unwrap()
}

/// CPU seconds of a process (all its threads).
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    ticks(&stat)
}

/// Seconds CPU 1 has spent idle (/proc/stat: idle and iowait).
fn idle_of_cpu1() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let line = stat.lines().find(|l| l.starts_with("cpu1 ")).unwrap();
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    // SAFETY: plain sysconf.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (f[3] + f[4]) / hz
}

fn ticks(stat: &str) -> f64 {
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split(' ').collect();
    let t: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: plain sysconf.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    t as f64 / hz
}

/// CPU seconds of every kworker and ksoftirqd thread.
fn kernel_threads_cpu() -> f64 {
    let mut total = 0.0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.split_once(')'))
            .map(|(n, _)| n);
        if name.is_some_and(|n| n.starts_with("kworker") || n.starts_with("ksoftirqd")) {
            total += ticks(&stat);
        }
    }
    total
}

fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        pin(1);
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                pin(1);
                let _ = c.set_nodelay(true);
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    a
}

fn latency(p: &Proxy, n: usize, samples: &mut Vec<f64>) {
    let mut c = TcpStream::connect(p.addr).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    // Warm up (and let sockmap arm the connection).
    for _ in 0..200 {
        c.write_all(b"p").unwrap();
        c.read_exact(&mut b).unwrap();
    }
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(b"p").unwrap();
        c.read_exact(&mut b).unwrap();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
}

struct Bulk {
    secs: f64,
    proxy_cpu: f64,
    kthreads_cpu: f64,
    /// Idle time of CPU 1 (the clients' and backends'; the proxies' too
    /// with `SKACTIVATE_BENCH_PROXY_CPU=1`) over the transfer: where it
    /// is busy, a transfer that leaves it idle waits on something.
    idle_cpu1: f64,
    /// Bytes the backend received (sent: `bytes` + 1).
    received: usize,
    /// The proxy reset the connection (it does when the kernel handed its
    /// verdict program bytes twice; skactivate-proxy(8), MODES).
    reset: bool,
}

fn bulk(p: &Proxy, sink: &TcpListener, bytes: usize) -> Bulk {
    let chunk = vec![0x5au8; 1 << 20];
    let mut c = TcpStream::connect(p.addr).unwrap();
    let (mut s, _) = sink.accept().unwrap();
    let reader = std::thread::spawn(move || {
        pin(1);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    });
    // Connection set up and armed before the clock starts.
    c.write_all(&chunk[..1]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (cpu0, k0, i0, t0) = (
        cpu_of(p.child.id()),
        kernel_threads_cpu(),
        idle_of_cpu1(),
        Instant::now(),
    );
    let mut sent = 0;
    let mut reset = false;
    while sent < bytes && !reset {
        reset = c.write_all(&chunk).is_err();
        sent += chunk.len();
    }
    reset |= c.shutdown(Shutdown::Write).is_err();
    let got = reader.join().unwrap();
    // A reset the client's writes did not see shows when it reads.
    let mut rest = Vec::new();
    reset |= c.read_to_end(&mut rest).is_err();
    let secs = t0.elapsed().as_secs_f64();
    Bulk {
        secs,
        proxy_cpu: cpu_of(p.child.id()) - cpu0,
        kthreads_cpu: kernel_threads_cpu() - k0,
        idle_cpu1: idle_of_cpu1() - i0,
        received: got,
        reset,
    }
}

fn conn_rate(p: &Proxy, for_: Duration) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    let mut b = [0u8; 1];
    while start.elapsed() < for_ {
        let mut c = TcpStream::connect(p.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"c").unwrap();
        c.read_exact(&mut b).unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn queued(s: &TcpStream, request: libc::Ioctl) -> usize {
    let mut v: libc::c_int = 0;
    // SAFETY: both ioctls take an int out-parameter.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), request, &raw mut v) };
    assert_eq!(r, 0);
    usize::try_from(v).unwrap_or(0)
}

fn slow_reader(p: &Proxy, sink: &TcpListener, for_: Duration) -> usize {
    let c = TcpStream::connect(p.addr).unwrap();
    let (server, _) = sink.accept().unwrap();
    c.set_nonblocking(true).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let (mut sent, mut held_max) = (0usize, 0usize);
    let start = Instant::now();
    while start.elapsed() < for_ {
        match (&c).write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("{}: {e}", p.name),
        }
        let held = sent
            .saturating_sub(queued(&c, libc::TIOCOUTQ))
            .saturating_sub(queued(&server, libc::FIONREAD));
        held_max = held_max.max(held);
    }
    held_max
}

/// Where a proxy's sd_notify messages arrive (a path: the sd-notify crate
/// does not take abstract addresses). Removed again by [`NotifyPath`].
fn notify_socket(tag: usize) -> (UnixDatagram, NotifyPath) {
    let path = std::env::temp_dir().join(format!(
        "skactivate-bench-proxy-{}-{tag}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let s = UnixDatagram::bind(&path).unwrap();
    s.set_nonblocking(true).unwrap();
    (s, NotifyPath(path.to_string_lossy().into_owned()))
}

struct NotifyPath(String);

impl Drop for NotifyPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The last `STATUS=` a proxy sent, if any (it updates it every 500 ms).
fn last_status(s: &UnixDatagram) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let mut last = None;
    while let Ok(n) = s.recv(&mut buf) {
        let text = String::from_utf8_lossy(&buf[..n]);
        if let Some(st) = text.lines().find_map(|l| l.strip_prefix("STATUS=")) {
            last = Some(st.to_string());
        }
    }
    last
}

/// The number before `what` in a status line ("N bytes redirected").
fn status_number(status: &str, what: &str) -> Option<u64> {
    let before = &status[..status.find(what)?];
    before.trim_end().rsplit(' ').next()?.parse().ok()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i]
}

/// The median round trip of a one-byte pipe ping-pong between a thread
/// on CPU 0 and one on CPU 1: two cross-CPU wake-ups.
fn cross_cpu_wakeup() -> Duration {
    pin(1);
    let mut a = [0i32; 2];
    let mut b = [0i32; 2];
    // SAFETY: pipe() fills two fds into each array.
    assert!(unsafe { libc::pipe(a.as_mut_ptr()) == 0 && libc::pipe(b.as_mut_ptr()) == 0 });
    const N: usize = 2000;
    let (ar, bw) = (a[0], b[1]);
    let peer = std::thread::spawn(move || {
        pin(0);
        let mut byte = 0u8;
        for _ in 0..N {
            // SAFETY: one-byte reads and writes on our own pipes.
            unsafe {
                libc::read(ar, (&raw mut byte).cast(), 1);
                libc::write(bw, (&raw const byte).cast(), 1);
            }
        }
    });
    let mut times = Vec::with_capacity(N);
    let mut byte = 1u8;
    for _ in 0..N {
        let t = Instant::now();
        // SAFETY: as above.
        unsafe {
            libc::write(a[1], (&raw const byte).cast(), 1);
            libc::read(b[0], (&raw mut byte).cast(), 1);
        }
        times.push(t.elapsed());
    }
    peer.join().unwrap();
    for fd in a.into_iter().chain(b) {
        // SAFETY: closing our own fds once.
        unsafe { libc::close(fd) };
    }
    times.sort();
    times[N / 2]
}

/// `SKACTIVATE_BENCH_CPU_LATENCY_US`: hold `/dev/cpu_dma_latency` at that
/// many microseconds while the returned file is open.
fn cpu_latency_hold() -> Option<(std::fs::File, i32)> {
    let us: i32 = std::env::var("SKACTIVATE_BENCH_CPU_LATENCY_US")
        .ok()?
        .parse()
        .expect("SKACTIVATE_BENCH_CPU_LATENCY_US: a number of microseconds");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .expect("/dev/cpu_dma_latency");
    f.write_all(&us.to_ne_bytes())
        .expect("writing /dev/cpu_dma_latency");
    Some((f, us))
}

/// `SKACTIVATE_BENCH_ONLY=bulk`: the bulk rounds alone.
fn only_bulk() -> bool {
    match std::env::var("SKACTIVATE_BENCH_ONLY") {
        Err(_) => false,
        Ok(v) if v == "bulk" => true,
        Ok(v) => panic!("SKACTIVATE_BENCH_ONLY={v}: the proxy bench knows only \"bulk\""),
    }
}

/// A figure, or `—` for one not measured.
fn figure(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.decimals$}"))
}

fn run(plan: &Plan) -> String {
    let only_bulk = only_bulk();
    let hold = cpu_latency_hold();
    let wakeup_before = cross_cpu_wakeup();
    pin(1);
    let echo = echo_backend();
    let bin = env!("CARGO_BIN_EXE_skactivate");
    let kinds: [(&'static str, Vec<&str>); 3] = [
        ("systemd-socket-proxyd", vec![SOCKET_PROXYD]),
        (
            "skactivate sockmap",
            vec![bin, "proxy", "--mode", "sockmap"],
        ),
        ("skactivate splice", vec![bin, "proxy", "--mode", "splice"]),
    ];
    // Starts first, while nothing else of the bench runs. auto (the
    // default) is timed too: with the bench's capabilities it loads the
    // program and asks the kernel before it chooses.
    let starting: [(&str, Vec<&str>, bool); 5] = [
        ("systemd-socket-proxyd", vec![SOCKET_PROXYD], false),
        (
            "skactivate splice",
            vec![bin, "proxy", "--mode", "splice"],
            false,
        ),
        ("skactivate auto", vec![bin, "proxy"], false),
        (
            "skactivate auto, kernel BTF hidden (as the example unit)",
            vec![bin, "proxy"],
            true,
        ),
        (
            "skactivate sockmap",
            vec![bin, "proxy", "--mode", "sockmap"],
            false,
        ),
    ];
    let mut starts: Vec<Vec<f64>> = vec![Vec::new(); starting.len()];
    for r in 0..if only_bulk { 0 } else { plan.starts } {
        for k in 0..starting.len() {
            let i = (k + r) % starting.len();
            let (name, argv, hide_btf) = &starting[i];
            starts[i].push(first_reply(name, argv, echo, *hide_btf));
        }
    }
    let proxies: Vec<Proxy> = kinds
        .iter()
        .map(|(n, argv)| start(n, argv, echo, None, None))
        .collect();
    let sinks: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    // The bulk proxies report what the kernel redirected and what they
    // copied themselves in their STATUS= (sockmap mode).
    let notifies: Vec<(UnixDatagram, NotifyPath)> = (0..3).map(notify_socket).collect();
    let sink_proxies: Vec<Proxy> = kinds
        .iter()
        .zip(&sinks)
        .zip(&notifies)
        .map(|(((n, argv), s), (_, addr))| {
            start(n, argv, s.local_addr().unwrap(), Some(s), Some(&addr.0))
        })
        .collect();
    let n = proxies.len();
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut direct: Vec<f64> = Vec::new();
    let mut bulks: Vec<Vec<Bulk>> = (0..n).map(|_| Vec::new()).collect();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut held: Vec<usize> = vec![0; n];
    // The newest STATUS= of each bulk proxy, read after every round: a
    // queue left unread fills (ten datagrams in a fresh namespace), and
    // what does not fit is sent later or not at all.
    let mut bulk_status: Vec<Option<String>> = vec![None; n];
    for round in 0..plan.rounds {
        for k in 0..n {
            // Rotate the order each round.
            let i = (k + round) % n;
            if !only_bulk {
                latency(&proxies[i], plan.pings_per_round, &mut lat[i]);
            }
            let b = bulk(&sink_proxies[i], &sinks[i], plan.bulk);
            if plan.strict {
                assert!(!b.reset, "{}: bulk connection reset", proxies[i].name);
                assert_eq!(b.received, plan.bulk + 1, "{}: bulk bytes", proxies[i].name);
            }
            bulks[i].push(b);
            if let Some(st) = last_status(&notifies[i].0) {
                bulk_status[i] = Some(st);
            }
            if !only_bulk {
                rates[i].push(conn_rate(&proxies[i], plan.conn_time));
            }
        }
        if !only_bulk {
            let d = Proxy {
                name: "direct",
                child: Command::new("true").spawn().unwrap(),
                addr: echo,
            };
            latency(&d, plan.pings_per_round, &mut direct);
        }
        eprintln!("round {} of {} done", round + 1, plan.rounds);
    }
    // Every bulk connection is closed; the status is at most 500 ms old.
    std::thread::sleep(Duration::from_millis(700));
    for (i, (s, _)) in notifies.iter().enumerate() {
        if let Some(st) = last_status(s) {
            bulk_status[i] = Some(st);
        }
    }
    for i in 0..if only_bulk { 0 } else { n } {
        held[i] = slow_reader(&sink_proxies[i], &sinks[i], plan.slow_time);
    }
    direct.sort_by(f64::total_cmp);
    let wakeup_after = cross_cpu_wakeup();
    let mut out = String::new();
    out += &format!(
        "Waking a thread on the other CPU and back (pipe ping-pong, median of 2000): {:.1} µs \
         before the rounds, {:.1} µs after; {}; the proxies on CPU {}, clients and backends on CPU 1.\n\n",
        wakeup_before.as_secs_f64() * 1e6,
        wakeup_after.as_secs_f64() * 1e6,
        match &hold {
            Some((_, us)) => format!("`/dev/cpu_dma_latency` held at {us} µs"),
            None => "CPU idle states as the machine has them".to_owned(),
        },
        proxy_cpu()
    );
    let gib = (plan.bulk as f64) / f64::from(1u32 << 30);
    out += "| proxy | latency median µs | p99 µs | median ratio | p99 ratio | throughput GiB/s | proxy CPU s/GiB | ratio | + kernel threads s/GiB | ratio | connections/s | ratio | slow reader: held MiB |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    let mut base = (0.0, 0.0, 0.0, 0.0, 0.0);
    for i in 0..n {
        let mut l = lat[i].clone();
        l.sort_by(f64::total_cmp);
        let (med, p99) = if l.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            (percentile(&l, 0.5), percentile(&l, 0.99))
        };
        let secs: f64 = bulks[i].iter().map(|b| b.secs).sum();
        let total_gib = gib * bulks[i].len() as f64;
        let cpu = bulks[i].iter().map(|b| b.proxy_cpu).sum::<f64>() / total_gib;
        let kcpu = bulks[i]
            .iter()
            .map(|b| b.proxy_cpu + b.kthreads_cpu)
            .sum::<f64>()
            / total_gib;
        let rate = rates[i].iter().sum::<f64>() / rates[i].len() as f64;
        if i == 0 {
            base = (med, p99, cpu, kcpu, rate);
        }
        // NaN where a figure was not measured (SKACTIVATE_BENCH_ONLY).
        let some = |v: f64| Some(v).filter(|v| v.is_finite());
        out += &format!(
            "| {} | {} | {} | {} | {} | {:.2} | {cpu:.3} | {:.2} | {kcpu:.3} | {:.2} | {} | {} | {} |\n",
            proxies[i].name,
            figure(some(med), 1),
            figure(some(p99), 1),
            figure(some(med / base.0), 2),
            figure(some(p99 / base.1), 2),
            total_gib / secs,
            cpu / base.2,
            kcpu / base.3,
            figure(some(rate), 0),
            figure(some(rate / base.4), 2),
            figure(
                (!only_bulk).then(|| held[i] as f64 / f64::from(1u32 << 20)),
                1
            ),
        );
    }
    if only_bulk {
        out += &format!(
            "\nBulk rounds only (`SKACTIVATE_BENCH_ONLY=bulk`): {} rounds of {:.0} MiB each.\n",
            plan.rounds,
            plan.bulk as f64 / f64::from(1u32 << 20),
        );
    } else {
        out += &format!(
            "\nNo proxy (client straight to the echo backend): median {:.1} µs, p99 {:.1} µs over {} round trips.\n\nEach proxy: {} round trips ({} rounds of {}); {} rounds of {:.0} MiB bulk; {} rounds of {:?} of connections; slow reader {:?}.\n",
            percentile(&direct, 0.5),
            percentile(&direct, 0.99),
            direct.len(),
            plan.rounds * plan.pings_per_round,
            plan.rounds,
            plan.pings_per_round,
            plan.rounds,
            plan.bulk as f64 / f64::from(1u32 << 20),
            plan.rounds,
            plan.conn_time,
            plan.slow_time,
        );
    }
    for (i, b) in bulks.iter().enumerate() {
        let wrong: Vec<String> = b
            .iter()
            .filter(|b| b.reset || b.received != plan.bulk + 1)
            .map(|b| {
                if b.reset {
                    "reset".to_owned()
                } else {
                    format!("{:+}", b.received as i64 - (plan.bulk + 1) as i64)
                }
            })
            .collect();
        if !wrong.is_empty() {
            out += &format!(
                "\n**Wrong bytes through {}**: {} of {} bulk rounds were reset by the proxy or \
                 delivered a different number of bytes than were sent ({}); its figures are not \
                 those of a correct transfer.\n",
                proxies[i].name,
                wrong.len(),
                b.len(),
                wrong.join(", "),
            );
        }
    }
    if !only_bulk {
        out += "\nSocket-activated start: from the proxy's spawn to the echo of a byte its first client \
            sent at once, ms (`auto` and `sockmap` serve from the start while they load the \
            program, on a thread of their own, and probe it; a connection that comes \
            meanwhile is copied until the mode is decided):\n\n| proxy | median ms | max ms | median ratio |\n| --- | ---: | ---: | ---: |\n";
        let mut base = 0.0;
        for (i, (name, ..)) in starting.iter().enumerate() {
            let mut t = starts[i].clone();
            t.sort_by(f64::total_cmp);
            let med = percentile(&t, 0.5);
            if i == 0 {
                base = med;
            }
            out += &format!(
                "| {name} | {med:.1} | {:.1} | {:.2} |\n",
                t[t.len() - 1],
                med / base
            );
        }
        out += &format!(
            "\n{} starts each, the order rotated each time.\n",
            plan.starts
        );
    }
    out += "\nCPU 1 idle during the bulk rounds (it runs the clients and backends; a transfer that \
            leaves it idle waits on something, e.g. a zero window), s per GiB:";
    for i in 0..n {
        let idle: f64 = bulks[i].iter().map(|b| b.idle_cpu1).sum();
        let per_round: Vec<String> = bulks[i]
            .iter()
            .map(|b| format!("{:.2}", b.idle_cpu1 / gib))
            .collect();
        out += &format!(
            "{} {}: {:.3} (rounds: {})",
            if i == 0 { "" } else { ";" },
            proxies[i].name,
            idle / (gib * bulks[i].len() as f64),
            per_round.join(", ")
        );
    }
    out += ".\n";
    for (i, st) in bulk_status.iter().enumerate() {
        let Some(st) = st else { continue };
        let (Some(r), Some(c)) = (
            status_number(st, "bytes redirected"),
            status_number(st, "bytes copied"),
        ) else {
            continue;
        };
        out += &format!(
            "\nBulk through {}: {:.1} MiB redirected by the kernel, {:.1} MiB copied by the proxy ({:.1} % copied), {} repeated bytes cut off by the program.\n",
            proxies[i].name,
            r as f64 / f64::from(1u32 << 20),
            c as f64 / f64::from(1u32 << 20),
            100.0 * c as f64 / (r + c).max(1) as f64,
            status_number(st, "repeated bytes cut off")
                .map_or_else(|| "no count of".to_owned(), |n| n.to_string()),
        );
    }
    out
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let rounds = std::env::var("SKACTIVATE_BENCH_ROUNDS").map_or(4, |v| {
        v.parse()
            .ok()
            .filter(|&n| n > 0)
            .expect("SKACTIVATE_BENCH_ROUNDS: a number of rounds, at least 1")
    });
    let plan = if bench {
        Plan {
            rounds,
            pings_per_round: 6000,
            bulk: 1 << 30,
            conn_time: Duration::from_secs(2),
            slow_time: Duration::from_secs(3),
            starts: 20,
            strict: false,
        }
    } else {
        Plan {
            rounds: 1,
            pings_per_round: 200,
            bulk: 8 << 20,
            conn_time: Duration::from_millis(200),
            slow_time: Duration::from_millis(300),
            starts: 1,
            strict: true,
        }
    };
    if !std::path::Path::new(SOCKET_PROXYD).exists() {
        eprintln!("SKIP: {SOCKET_PROXYD} not found (Debian: apt-get install systemd)");
        return;
    }
    let out = std::thread::spawn(move || {
        nix_unshare();
        run(&plan)
    })
    .join()
    .unwrap();
    println!("{out}");
    if bench {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let path = root.join("target/bench-proxy.md");
        std::fs::write(&path, &out).unwrap();
        eprintln!("written to {}", path.display());
    }
}

/// A network namespace of our own with lo up, for this thread and the
/// processes it starts.
fn nix_unshare() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .expect("unshare(CLONE_NEWNET): run as root");
    let st = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(st.success());
}
