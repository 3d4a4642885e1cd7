//! `cargo bench -p skactivate --bench dispatcher`: what one lookup costs
//! skactivate's dispatcher, measured in the same run and interleaved with
//! programs of our own: the empty `SK_PASS` program (`ebpf/empty.bpf.c`, the
//! cost of running any program at all), a plain single-trie reference
//! dispatcher (`ebpf/reference.bpf.c`: tubular's design, one LPM trie asked
//! twice on every lookup, a per-CPU counter per destination), and on hits the
//! hit floor (`ebpf/floor.bpf.c`: a socket assigned without any lookup, what
//! every hit costs at least). Every lookup figure is
//! given net of the empty program; the issue's target is "≤ 0.4× the
//! reference's net cost". Around it: loading and
//! adopting 1M bindings, map memory, fresh-dispatcher creation, the shipped
//! daemon's RSS (measured as `benches/daemon.rs` does, by the module it
//! shares, `benches/shared/daemon.rs`) and steered traffic against no program at all. The report goes to
//! stdout and to `BENCHMARKS.md` at the repository root; with
//! `SKACTIVATE_BENCH_JSON=FILE` the figures also go to FILE as JSON.
//!
//! Root only: every phase unshares a network namespace on a thread of its own
//! and mounts a private bpffs, so nothing of the host is touched.
//!
//! Method (lookups). A phase is one workload and one family in a fresh
//! namespace: one dispatcher and one reference dispatcher, both grown through
//! the sizes with the same bindings. At each size each case (hit, miss on a
//! bound port, unbound port) is timed with `BPF_PROG_TEST_RUN`, `repeat` runs
//! per call (the kernel reports the mean ns per run), `runs` calls per program,
//! round-robin: repetition r runs the empty program, ours and the reference
//! (and on hits the floor) on the same probe, in an order rotated with r. Before timing, one call per
//! probe and program checks the answer (the listener's cookie for a hit, a
//! plain pass otherwise), and so does every timed call. Net of empty = median over r of (program_r −
//! empty_r).
//!
//! Run without `--bench` (as `cargo test --all-targets` does) it is a smoke
//! test: small sizes, few repeats, seconds; no file written.

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "shared/daemon.rs"]
mod daemon;

/// The netns tests' approach (tests/common), cut down to what a benchmark needs.
mod netns {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A private bpffs instance mounted on a temporary directory, unmounted
    /// (taking every pin with it) when dropped.
    pub struct Bpffs {
        pub path: PathBuf,
    }

    impl Bpffs {
        pub fn mount() -> Bpffs {
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "skactivate-bench-bpffs-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).expect("bpffs mount point");
            nix::mount::mount(
                Some("bpf"),
                &path,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .expect("mount -t bpf");
            Bpffs { path }
        }
    }

    impl Drop for Bpffs {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(&self.path);
        }
    }

    /// The calling thread's network namespace.
    pub fn thread_netns() -> &'static Path {
        Path::new("/proc/thread-self/ns/net")
    }

    /// Move the calling thread into a fresh network namespace with `lo` up
    /// and `addrs` on it.
    pub fn enter(addrs: &[&str]) {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        ip(&["link", "set", "lo", "up"]);
        for a in addrs {
            ip(&["addr", "add", a, "dev", "lo"]);
        }
    }

    /// Run `f` on a thread of its own in a fresh network namespace with `lo`
    /// up and a private bpffs.
    pub fn in_netns<T: Send + 'static>(f: impl FnOnce(&Bpffs) -> T + Send + 'static) -> T {
        let handle = std::thread::spawn(move || {
            // unshare acts on this thread only; it never returns to a pool.
            enter(&[]);
            let fs = Bpffs::mount();
            f(&fs)
        });
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

use std::fmt::Write as _;
use std::io::ErrorKind;
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket,
};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use aya::programs::SkLookup;
use ipnet::IpNet;
use skactivate::binding::{Binding, Destination, Family, Ports, Protocol};
use skactivate::dispatcher::{self, Dispatcher};

/// The baseline program, built from `ebpf/empty.bpf.c` by build.rs.
static EMPTY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/empty.bpf.o"));
/// The hit floor, built from `ebpf/floor.bpf.c` by build.rs: socket 0 of a
/// SOCKMAP assigned, no lookup.
static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floor.bpf.o"));
/// The reference dispatcher, built from `ebpf/reference.bpf.c` by build.rs;
/// embedded here only.
static REFERENCE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reference.bpf.o"));

/// The bench workload: TCP /32s drawn from 2^21 (port, address) pairs, the
/// 2^17 addresses of 198.18.0.0/15 (RFC 2544) on 16 ports from `FIRST_PORT`.
const NET: u32 = 0xc612_0000;
/// IPv6 mirrors of both workloads: the same low bits under 2001:db8::/96
/// (RFC 3849), prefix lengths + 96.
const NET6: u128 = 0x2001_0db8 << 96;
const ADDR_BITS: u32 = 17;
const PORT_BITS: u32 = 4;
const SPACE_BITS: u32 = ADDR_BITS + PORT_BITS;
const FIRST_PORT: u16 = 8000;
/// A port no binding of the bench workload has.
const UNBOUND_PORT: u16 = 22;
/// The mixed workload's addresses: 240.0.0.0/4 (reserved, never routed; no
/// documentation range holds 250k distinct /24s). A test run sends no packet.
const MIXED_NET: u32 = 0xf000_0000;
/// The first slot no bench binding takes: miss probes come from there.
const MISS_BASE: u32 = 1 << 20;

/// A bijection of `bits`-bit numbers: odd multipliers and right xorshifts.
fn permute(i: u32, bits: u32) -> u32 {
    let mask = (1u32 << bits) - 1;
    let mut x = i.wrapping_mul(0x9e37_79b1) & mask;
    x ^= x >> (bits / 2);
    x = x.wrapping_mul(0x85eb_ca6b) & mask;
    x ^= x >> (bits / 3);
    x
}

fn addr_of(family: Family, low: u32) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(low)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(NET6 | u128::from(low))),
    }
}

/// A binding as both dispatchers take it: an address prefix (IPv4 length)
/// and a port (`None`: `*`).
#[derive(Clone, Copy)]
struct Spec {
    family: Family,
    /// The IPv4 address, or the low 32 bits of the IPv6 one.
    low: u32,
    len: u8,
    port: Option<u16>,
}

impl Spec {
    fn prefix_len(&self) -> u8 {
        match self.family {
            Family::V4 => self.len,
            Family::V6 => self.len + 96,
        }
    }

    fn binding(&self) -> Binding {
        let net = IpNet::new(addr_of(self.family, self.low), self.prefix_len()).expect("prefix");
        let ports = self.port.map_or(Ports::All, Ports::single);
        Binding::new(Protocol::Tcp, net, ports)
    }

    fn ref_key(&self) -> RefKey {
        let mut addr = [0u8; 16];
        let masked = if self.len == 0 {
            0
        } else {
            self.low & (u32::MAX << (32 - u32::from(self.len)))
        };
        let prefixlen = match self.family {
            Family::V4 => {
                addr[10] = 0xff;
                addr[11] = 0xff;
                addr[12..].copy_from_slice(&masked.to_be_bytes());
                24 + 96 + u32::from(self.len)
            }
            Family::V6 => {
                addr = (NET6 | u128::from(masked)).to_be_bytes();
                24 + 96 + u32::from(self.len)
            }
        };
        RefKey {
            prefixlen,
            protocol: libc::IPPROTO_TCP as u8,
            port: self.port.unwrap_or(0).to_be(),
            addr,
        }
    }
}

/// `struct ref_key` of ebpf/reference.bpf.c (packed, as tubular's).
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct RefKey {
    prefixlen: u32,
    protocol: u8,
    port: u16,
    addr: [u8; 16],
}

// SAFETY: plain bytes, no padding (packed), any bit pattern valid.
unsafe impl aya::Pod for RefKey {}

/// `struct ref_binding` of ebpf/reference.bpf.c: the destination's index and
/// the binding's prefix length (of the whole key, as the trie counts it).
#[repr(C)]
#[derive(Clone, Copy)]
struct RefBinding {
    id: u32,
    prefixlen: u32,
}

impl RefBinding {
    /// Every binding of the bench goes to destination 0.
    fn of(key: &RefKey) -> RefBinding {
        RefBinding {
            id: 0,
            prefixlen: key.prefixlen,
        }
    }
}

// SAFETY: two u32s, no padding, any bit pattern valid.
unsafe impl aya::Pod for RefBinding {}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// TCP /32s from 198.18.0.0/15 on ports 8000–8015.
    Bench,
    /// Half `*`-port bindings, addresses half /24 and half /32.
    Mixed,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Bench => "bench",
            Workload::Mixed => "mixed",
        }
    }

    /// Binding `i`.
    fn spec(self, family: Family, i: u32) -> Spec {
        match self {
            Workload::Bench => {
                let x = permute(i, SPACE_BITS);
                Spec {
                    family,
                    low: NET | (x & ((1 << ADDR_BITS) - 1)),
                    len: 32,
                    port: Some(FIRST_PORT + u16::try_from(x >> ADDR_BITS).expect("4 bits")),
                }
            }
            Workload::Mixed => {
                // Kind k = i % 4: `*` /24, port /24, `*` /32, port /32. Each
                // kind takes its own /24s of a permutation of the 2^20 /24s
                // of 240.0.0.0/4 (the two /32 kinds share theirs, hosts .1
                // and .2); the last quarter is left for miss probes.
                let (k, j) = (i % 4, i / 4);
                let (slot, host, len) = match k {
                    0 => (j, 0, 24),
                    1 => (1 << 18 | j, 0, 24),
                    2 => (2 << 18 | j, 1, 32),
                    _ => (2 << 18 | j, 2, 32),
                };
                Spec {
                    family,
                    low: MIXED_NET | permute(slot, 20) << 8 | host,
                    len,
                    port: (k % 2 == 1).then(|| FIRST_PORT + u16::try_from(j % 16).expect("small")),
                }
            }
        }
    }

    /// A probe that binding `i` answers.
    fn hit_probe(self, family: Family, i: u32) -> (IpAddr, u16) {
        let s = self.spec(family, i);
        let low = if s.len == 24 { s.low | 77 } else { s.low };
        let port = s
            .port
            .unwrap_or(FIRST_PORT + u16::try_from(i % 16).expect("small"));
        (addr_of(family, low), port)
    }

    /// Probe `j`: an address no binding covers, on a port bindings use.
    fn miss_probe(self, family: Family, j: u32) -> (IpAddr, u16) {
        match self {
            Workload::Bench => {
                let s = self.spec(family, MISS_BASE + j);
                (addr_of(family, s.low), s.port.expect("a port"))
            }
            Workload::Mixed => {
                let low = MIXED_NET | permute(3 << 18 | j, 20) << 8 | 1;
                (
                    addr_of(family, low),
                    FIRST_PORT + u16::try_from(j % 16).expect("small"),
                )
            }
        }
    }
}

/// The benchmark's scale: full, or a smoke test.
struct Plan {
    sizes: &'static [u32],
    repeat: u32,
    runs: usize,
    /// Bindings per `add_bindings` call while growing.
    chunk: u32,
    /// Daemon RSS children: binding counts.
    rss: &'static [u32],
    /// Fresh dispatchers created (timed each).
    fresh: usize,
    /// Listeners created for the fresh-dispatcher comparison.
    listeners: u16,
    /// Traffic: rounds, TCP connects and UDP round trips per round and side.
    rounds: usize,
    connects: u32,
    datagrams: u32,
    full: bool,
}

const FULL: Plan = Plan {
    sizes: &[1, 1_000, 100_000, 1_000_000],
    repeat: 200_000,
    runs: 11,
    chunk: 100_000,
    rss: &[100_000, 1_000_000],
    fresh: 9,
    listeners: 65_000,
    rounds: 150,
    connects: 200,
    datagrams: 500,
    full: true,
};

const SMOKE: Plan = Plan {
    sizes: &[1, 1_000],
    repeat: 1_000,
    runs: 3,
    chunk: 500,
    rss: &[1_000],
    fresh: 2,
    listeners: 200,
    rounds: 2,
    connects: 50,
    datagrams: 50,
    full: false,
};

/// Every loop checks this.
const DEADLINE: Duration = Duration::from_secs(1200);

fn check_deadline(start: Instant, what: &str) {
    assert!(
        start.elapsed() < DEADLINE,
        "benchmark exceeded {DEADLINE:?} while {what}"
    );
}

/// Lookups to time: (local address, local port).
type Probes = Vec<(IpAddr, u16)>;

/// What a probe must get before it is timed.
#[derive(Clone, Copy)]
enum Expect {
    /// Redirected to the socket with this cookie.
    Hit(u64),
    /// Passed on untouched.
    Pass,
}

fn median_i64(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// One case at one size: per-repetition ns of the programs.
struct Case {
    workload: Workload,
    family: Family,
    bindings: u32,
    case: &'static str,
    empty: Vec<u32>,
    ours: Vec<u32>,
    reference: Vec<u32>,
    /// The hit floor's, on hits only (empty otherwise).
    floor: Vec<u32>,
}

impl Case {
    fn raw(v: &[u32]) -> i64 {
        median_i64(v.iter().map(|&x| i64::from(x)).collect())
    }
    fn net(&self, v: &[u32]) -> i64 {
        median_i64(
            v.iter()
                .zip(&self.empty)
                .map(|(&a, &e)| i64::from(a) - i64::from(e))
                .collect(),
        )
    }
    fn ours_net(&self) -> i64 {
        self.net(&self.ours)
    }
    fn reference_net(&self) -> i64 {
        self.net(&self.reference)
    }
    /// The hit floor's cost net of empty, on hits.
    fn floor_net(&self) -> Option<i64> {
        (!self.floor.is_empty()).then(|| self.net(&self.floor))
    }
    /// What finding the binding costs `v` over the floor, in the same
    /// repetitions: the median over r of (program_r − floor_r).
    fn above_floor(&self, v: &[u32]) -> Option<i64> {
        (!self.floor.is_empty()).then(|| {
            median_i64(
                v.iter()
                    .zip(&self.floor)
                    .map(|(&a, &f)| i64::from(a) - i64::from(f))
                    .collect(),
            )
        })
    }
    /// The issue's target for this case, net of empty (ns).
    /// In the mixed workload the `*` bindings cover every port: its
    /// "unbound" probes are misses on a port bound by `*`, held to the miss
    /// target.
    fn target(&self) -> f64 {
        if self.case == "unbound" && self.workload == Workload::Bench {
            3.0
        } else {
            0.4 * self.reference_net() as f64
        }
    }
    fn meets(&self) -> bool {
        (self.ours_net() as f64) <= self.target()
    }
}

/// Time `progs` on `probes`, interleaved; per program, its ns per run of
/// each repetition.
fn measure(
    plan: &Plan,
    start: Instant,
    progs: &[(BorrowedFd<'_>, Expect)],
    probes: &[(IpAddr, u16)],
) -> Vec<Vec<u32>> {
    for &(addr, port) in probes {
        for (i, &(prog, expect)) in progs.iter().enumerate() {
            let r = dispatcher::test_run(prog, Protocol::Tcp, addr, port, 1).expect("test run");
            check_answer(i, addr, port, expect, &r);
        }
    }
    // Every timed call on one CPU: a call that lands on another CPU than
    // the last finds the program and its maps cold there.
    let _pinned = PinnedTo::cpu(traffic_cpu());
    let mut out = vec![Vec::new(); progs.len()];
    for r in 0..plan.runs {
        check_deadline(start, "timing lookups");
        let (addr, port) = probes[r % probes.len()];
        for k in 0..progs.len() {
            let p = (r + k) % progs.len();
            let t = dispatcher::test_run(progs[p].0, Protocol::Tcp, addr, port, plan.repeat)
                .expect("test run");
            // The timed call answers too (its last run's verdict and
            // selected socket): a figure counts only if every call it is
            // made of chose what the probe must get.
            check_answer(p, addr, port, progs[p].1, &t);
            out[p].push(t.duration_ns);
        }
    }
    out
}

/// Panic unless program `i` answered the probe as `expect` says: for
/// `BPF_PROG_TEST_RUN` of an sk_lookup program the kernel writes the cookie
/// of the socket the program selected (0 for none) into the context out.
fn check_answer(
    i: usize,
    addr: IpAddr,
    port: u16,
    expect: Expect,
    r: &dispatcher::sys::TestRun<dispatcher::abi::SkLookupCtx>,
) {
    match expect {
        Expect::Hit(cookie) => assert!(
            r.retval == 1 && r.ctx_out.cookie == cookie,
            "program {i}, {addr}:{port}: expected a redirect to cookie {cookie}, got \
             retval {} cookie {}",
            r.retval,
            r.ctx_out.cookie
        ),
        Expect::Pass => assert!(
            r.retval == 1 && r.ctx_out.cookie == 0,
            "program {i}, {addr}:{port}: expected a plain pass, got retval {} cookie {}",
            r.retval,
            r.ctx_out.cookie
        ),
    }
}

fn count(n: u32) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

fn load_prog(object: &[u8], name: &str) -> aya::Ebpf {
    let mut ebpf = aya::Ebpf::load(object).unwrap_or_else(|e| panic!("load {name}: {e}"));
    let prog: &mut SkLookup = ebpf
        .program_mut(name)
        .expect("program in object")
        .try_into()
        .expect("an sk_lookup program");
    prog.load()
        .unwrap_or_else(|e| panic!("load program {name}: {e}"));
    ebpf
}

fn prog_fd<'a>(ebpf: &'a aya::Ebpf, name: &str) -> BorrowedFd<'a> {
    let prog: &SkLookup = ebpf
        .program(name)
        .expect("loaded")
        .try_into()
        .expect("an sk_lookup program");
    prog.fd().expect("loaded").as_fd()
}

fn map_fd<'a>(ebpf: &'a aya::Ebpf, name: &str) -> BorrowedFd<'a> {
    match ebpf.map(name).expect("map in object") {
        aya::maps::Map::LpmTrie(m)
        | aya::maps::Map::SockMap(m)
        | aya::maps::Map::PerCpuArray(m) => m.fd().as_fd(),
        _ => panic!("{name}: unexpected map type"),
    }
}

/// `memlock:` of a BPF object's fdinfo (bytes).
fn fd_memlock(fd: BorrowedFd<'_>) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    if !info.contains("map_type:") {
        return None;
    }
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Bytes per CPU of a per-CPU map (max_entries × value_size rounded up to
/// 8, as the kernel allocates them); 0 for other maps.
fn per_cpu_bytes(fd: BorrowedFd<'_>) -> u64 {
    let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())) else {
        return 0;
    };
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let map_type = u32::try_from(field("map_type:")).unwrap_or(0);
    let per_cpu = [
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH as u32,
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY as u32,
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_PERCPU_HASH as u32,
    ];
    if per_cpu.contains(&map_type) {
        field("max_entries:") * field("value_size:").next_multiple_of(8)
    } else {
        0
    }
}

/// One phase's dispatcher, reference, hit floor and listener.
struct Setup {
    _listener: TcpListener,
    cookie: u64,
    d: Option<Dispatcher>,
    dest: Destination,
    prog: OwnedFd,
    /// Its id (a grown entries hash brings a new program).
    prog_id: u32,
    program_tag: String,
    reference: aya::Ebpf,
    empty: aya::Ebpf,
    floor: aya::Ebpf,
    /// Whether the reference trie takes `BPF_MAP_UPDATE_BATCH`.
    ref_batch: bool,
}

impl Setup {
    fn new(fs: &netns::Bpffs, family: Family) -> Setup {
        let listener = TcpListener::bind(match family {
            Family::V4 => "127.0.0.1:7999",
            Family::V6 => "[::1]:7999",
        })
        .expect("listen");
        let cookie = dispatcher::socket::socket_cookie(listener.as_fd()).expect("SO_COOKIE");
        let mut d = Dispatcher::open(netns::thread_netns(), &fs.path).expect("open dispatcher");
        let regs = d
            .register_sockets("bench.socket", &[listener.as_fd()])
            .expect("register the listener");
        let dest = regs[0].0.clone();
        let identity = d.program().expect("program info");
        let prog = dispatcher::sys::prog_fd_by_id(identity.id).expect("BPF_PROG_GET_FD_BY_ID");
        let reference = load_prog(REFERENCE_OBJECT, "reference_dispatcher");
        dispatcher::sys::sockmap_insert(map_fd(&reference, "ref_sockets"), 0, listener.as_fd())
            .expect("reference sockmap");
        let floor = load_prog(FLOOR_OBJECT, "skactivate_floor");
        dispatcher::sys::sockmap_insert(map_fd(&floor, "floor_sockets"), 0, listener.as_fd())
            .expect("floor sockmap");
        Setup {
            _listener: listener,
            cookie,
            d: Some(d),
            dest,
            prog,
            prog_id: identity.id,
            program_tag: identity.tag_hex(),
            reference,
            empty: load_prog(EMPTY_OBJECT, "skactivate_empty"),
            floor,
            ref_batch: true,
        }
    }

    fn d(&mut self) -> &mut Dispatcher {
        self.d.as_mut().expect("a dispatcher")
    }

    /// Add `specs` to both dispatchers; returns the time ours took.
    fn add(&mut self, specs: &[Spec]) -> Duration {
        let items: Vec<(Binding, Destination)> = specs
            .iter()
            .map(|s| (s.binding(), self.dest.clone()))
            .collect();
        let t = Instant::now();
        let changes = self.d().add_bindings(&items).expect("add bindings");
        let took = t.elapsed();
        assert_eq!(changes.added, items.len(), "every binding is new");
        // Growing its entries hash swaps the program in the link: measure
        // the one running.
        let identity = self.d().program().expect("program info");
        if self.prog_id != identity.id {
            self.prog = dispatcher::sys::prog_fd_by_id(identity.id).expect("BPF_PROG_GET_FD_BY_ID");
            self.prog_id = identity.id;
        }
        let keys: Vec<RefKey> = specs.iter().map(Spec::ref_key).collect();
        let trie = map_fd(&self.reference, "ref_bindings");
        for chunk in keys.chunks(4096) {
            if self.ref_batch {
                let values: Vec<RefBinding> = chunk.iter().map(RefBinding::of).collect();
                let (_, r) = dispatcher::sys::map_update_batch(trie, chunk, &values);
                match r {
                    Ok(()) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.ref_batch = false,
                    Err(e) => panic!("reference trie batch update: {e}"),
                }
            }
            for k in chunk {
                dispatcher::sys::map_update_elem(trie, k, &RefBinding::of(k), 0)
                    .expect("reference trie");
            }
        }
        took
    }

    fn adopt(&mut self, fs: &netns::Bpffs) -> Duration {
        adopt_again(&mut self.d, fs)
    }

    /// Remove `specs` from ours (the reference is done with); returns the
    /// time it took.
    fn remove(&mut self, specs: &[Spec]) -> Duration {
        let items: Vec<Binding> = specs.iter().map(Spec::binding).collect();
        let t = Instant::now();
        let changes = self.d().remove_bindings(&items).expect("remove bindings");
        let took = t.elapsed();
        assert_eq!(changes.removed, items.len(), "every binding was there");
        took
    }
}

/// Drop the handle, as a stopping daemon would (one writer per namespace),
/// and adopt the pinned state again; returns the time `Dispatcher::open`
/// took.
fn adopt_again(d: &mut Option<Dispatcher>, fs: &netns::Bpffs) -> Duration {
    drop(d.take());
    let t = Instant::now();
    let adopted = Dispatcher::open(netns::thread_netns(), &fs.path).expect("adopt");
    let took = t.elapsed();
    *d = Some(adopted);
    took
}

/// What one phase measured.
#[derive(Default)]
struct Phase {
    cases: Vec<Case>,
    /// (bindings, time to load from the previous size).
    loads: Vec<(u32, u32, Duration)>,
    /// (bindings, adopt time).
    adopts: Vec<(u32, Duration)>,
    /// (bindings, what the cache holds then).
    caches: Vec<(u32, Occupancy)>,
    /// All bindings but the first removed at the end (the first phase).
    shrink: Option<Shrink>,
    program_tag: String,
}

/// The bindings of the largest size but one removed: from how many, how
/// long the removal took (the maps shrinking included), and the state's map
/// memory after.
struct Shrink {
    from: u32,
    took: Duration,
    memory: u64,
}

/// What the dispatcher's cache holds: slots in use (of `entries`, the
/// entries there are), and which of the hit probes' entries are among them;
/// its buckets, and the map memory of the whole state (`memlock`), the
/// cache's part of it.
#[derive(Default)]
struct Occupancy {
    slots: usize,
    entries: usize,
    probes: Vec<bool>,
    buckets: u64,
    memory: u64,
    cache_memory: u64,
}

/// Read the pinned `cache` array (see `ebpf/skactivate.h`): the slots in
/// use, and whether each of `keys` has one.
fn cache_occupancy(
    d: &Dispatcher,
    keys: &[aya::maps::lpm_trie::Key<dispatcher::abi::BindingKey>],
    entries: usize,
) -> Occupancy {
    let data = aya::maps::MapData::from_pin(d.dir().join("cache")).expect("the cache pin");
    let cache: aya::maps::Array<_, [u64; 8]> =
        aya::maps::Array::try_from(aya::maps::Map::Array(data)).expect("an array");
    let buckets = cache.get(&0, 0).expect("the header")[1] + 1;
    let (each, _) = state_memlock(d.dir());
    let cache_memory = each
        .iter()
        .find(|(n, _)| n == "cache")
        .map_or(0, |(_, m)| *m);
    // Line 0 is the header; then two slots of four words per line.
    let slots: std::collections::HashSet<[u64; 3]> = cache
        .iter()
        .skip(1)
        .flat_map(|l| {
            let l = l.expect("a line");
            [[l[0], l[1], l[2], l[3]], [l[4], l[5], l[6], l[7]]]
        })
        .filter(|s| s[3] != 0)
        .map(|s| [s[0], s[1], s[2]])
        .collect();
    Occupancy {
        slots: slots.len(),
        entries,
        probes: keys
            .iter()
            .map(|k| slots.contains(&dispatcher::abi::filter_key_words(k)))
            .collect(),
        buckets,
        memory: each.iter().map(|(_, m)| m).sum(),
        cache_memory,
    }
}

fn run_phase(
    plan: &'static Plan,
    workload: Workload,
    family: Family,
    sizes: &'static [u32],
    adopt_at: &'static [u32],
    start: Instant,
) -> Phase {
    netns::in_netns(move |fs| {
        let mut s = Setup::new(fs, family);
        let mut phase = Phase {
            program_tag: s.program_tag.clone(),
            ..Phase::default()
        };
        let mut have = 0u32;
        for &n in sizes {
            let mut took = Duration::ZERO;
            let from = have;
            while have < n {
                check_deadline(start, "loading bindings");
                let upto = n.min(have + plan.chunk);
                let specs: Vec<Spec> = (have..upto).map(|i| workload.spec(family, i)).collect();
                took += s.add(&specs);
                have = upto;
            }
            phase.loads.push((from, n, took));
            if adopt_at.contains(&n) {
                phase.adopts.push((n, s.adopt(fs)));
            }
            let k = u32::try_from(plan.runs).expect("few runs");
            let hits: Vec<_> = (0..k)
                .map(|r| {
                    let i = u64::from(n) * u64::from(2 * r + 1) / u64::from(2 * k);
                    workload.hit_probe(family, u32::try_from(i).expect("small"))
                })
                .collect();
            let hit_keys: Vec<_> = (0..k)
                .map(|r| {
                    let i = u64::from(n) * u64::from(2 * r + 1) / u64::from(2 * k);
                    let b = workload
                        .spec(family, u32::try_from(i).expect("small"))
                        .binding();
                    let port = match b.ports {
                        Ports::All => 0,
                        Ports::Range(a, _) => a,
                    };
                    dispatcher::abi::binding_key(b.protocol, &b.prefix, port)
                })
                .collect();
            // A binding of the bench's workloads is one entry (one port, or
            // `*`).
            phase
                .caches
                .push((n, cache_occupancy(s.d(), &hit_keys, n as usize)));
            let misses: Vec<_> = (0..k).map(|j| workload.miss_probe(family, j)).collect();
            let unbound: Vec<_> = misses.iter().map(|&(a, _)| (a, UNBOUND_PORT)).collect();
            let cases: [(&'static str, Probes, Expect); 3] = [
                ("hit", hits, Expect::Hit(s.cookie)),
                ("miss", misses, Expect::Pass),
                ("unbound", unbound, Expect::Pass),
            ];
            for (case, probes, expect) in cases {
                let mut progs = vec![
                    (prog_fd(&s.empty, "skactivate_empty"), Expect::Pass),
                    (s.prog.as_fd(), expect),
                    (prog_fd(&s.reference, "reference_dispatcher"), expect),
                ];
                // The floor selects a socket whatever the probe: it is timed
                // on hits only.
                if let Expect::Hit(_) = expect {
                    progs.push((prog_fd(&s.floor, "skactivate_floor"), expect));
                }
                let mut times = measure(plan, start, &progs, &probes).into_iter();
                let mut next = || times.next().unwrap_or_default();
                let (empty, ours, reference, floor) = (next(), next(), next(), next());
                eprintln!(
                    "{} {} {} {case}: empty {} ours {} reference {} floor {}",
                    workload.name(),
                    family_name(family),
                    count(n),
                    Case::raw(&empty),
                    Case::raw(&ours),
                    Case::raw(&reference),
                    if floor.is_empty() {
                        "-".to_owned()
                    } else {
                        Case::raw(&floor).to_string()
                    }
                );
                phase.cases.push(Case {
                    workload,
                    family,
                    bindings: n,
                    case,
                    empty,
                    ours,
                    reference,
                    floor,
                });
            }
        }
        // The first phase ends by removing all but one binding: what the
        // maps take then, shrunk.
        if !adopt_at.is_empty() && have > 1 {
            check_deadline(start, "removing bindings");
            let specs: Vec<Spec> = (1..have).map(|i| workload.spec(family, i)).collect();
            let took = s.remove(&specs);
            let (each, _) = state_memlock(s.d().dir());
            phase.shrink = Some(Shrink {
                from: have,
                took,
                memory: each.iter().map(|(_, m)| m).sum(),
            });
        }
        phase
    })
}

/// Map memory of one binding and one socket, ours and the reference's:
/// (ours total, ours per map, reference total).
struct MapMemory {
    ours: u64,
    each: Vec<(String, u64)>,
    reference: u64,
    /// What each further CPU adds to the per-CPU maps (from their
    /// fdinfo: entries × value size rounded to 8).
    per_cpu: u64,
    /// Fresh dispatcher creation times.
    fresh: Vec<Duration>,
    /// The same, each the first dispatcher of a new process (a daemon
    /// starting: one-time costs included).
    first: Vec<Duration>,
    /// The same, with the kernel's BTF hidden as the shipped unit hides it.
    first_unit: Vec<Duration>,
    /// Creating `plan.listeners` listeners.
    listeners: Duration,
    /// How many of them were held at once.
    listeners_at_once: u16,
}

/// Raise RLIMIT_NOFILE towards `want`; returns how many more listeners this
/// process may hold at once (the limit less some room for other fds).
fn nofile_room(want: u64) -> u16 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit, which `lim` is.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(rc, 0, "getrlimit");
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(lim.rlim_max),
    };
    // SAFETY: setrlimit reads one valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        let soft = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above; the hard limit may always be the soft one.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) };
    }
    // SAFETY: as above.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    u16::try_from(lim.rlim_cur.saturating_sub(1000).clamp(100, 60_000)).expect("clamped")
}

/// Time `n` fresh dispatchers created and destroyed one after another in the
/// calling thread's namespace.
fn fresh_opens(fs: &netns::Bpffs, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let d = Dispatcher::open(netns::thread_netns(), &fs.path).expect("fresh dispatcher");
            let took = t.elapsed();
            d.destroy().expect("destroy");
            took
        })
        .collect()
}

/// The `memlock:` of each map pinned in the state directory `dir` (by pin
/// name, sorted; programs and links have none there), and what each
/// further CPU adds to the per-CPU ones.
fn state_memlock(dir: &Path) -> (Vec<(String, u64)>, u64) {
    let mut each = Vec::new();
    let mut per_cpu = 0;
    for entry in std::fs::read_dir(dir).expect("state dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            continue;
        }
        let Ok(fd) = dispatcher::sys::obj_get(&path) else {
            continue;
        };
        if let Some(m) = fd_memlock(fd.as_fd()) {
            per_cpu += per_cpu_bytes(fd.as_fd());
            each.push((
                path.file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
                m,
            ));
        }
    }
    each.sort();
    (each, per_cpu)
}

fn run_memory(plan: &'static Plan) -> MapMemory {
    netns::in_netns(move |fs| {
        let fresh = fresh_opens(fs, plan.fresh);
        let mut s = Setup::new(fs, Family::V4);
        s.add(&[Workload::Bench.spec(Family::V4, 0)]);
        let (each, per_cpu) = state_memlock(s.d().dir());
        let ours = each.iter().map(|(_, m)| m).sum();
        let reference = ["ref_bindings", "ref_sockets", "ref_metrics"]
            .iter()
            .map(|m| fd_memlock(map_fd(&s.reference, m)).expect("memlock"))
            .sum();
        drop(s);

        // What a socket unit's alternative costs: one listener per port. As
        // many at a time as RLIMIT_NOFILE lets this process hold (raised as
        // far as it goes), batch after batch until all were created.
        let at_once = nofile_room(u64::from(plan.listeners) + 1000);
        let mut listeners = Duration::ZERO;
        let mut made = 0u16;
        while made < plan.listeners {
            let batch = (plan.listeners - made).min(at_once);
            let t = Instant::now();
            let held: Vec<TcpListener> = (0..batch)
                .map(|p| TcpListener::bind(("127.0.0.1", 500 + made + p)).expect("listener"))
                .collect();
            listeners += t.elapsed();
            made += batch;
            drop(held);
        }
        MapMemory {
            ours,
            each,
            reference,
            per_cpu,
            fresh,
            first: first_opens(plan.fresh.min(5), false),
            first_unit: first_opens(plan.fresh.min(5), true),
            listeners,
            listeners_at_once: at_once.min(plan.listeners),
        }
    })
}

/// Time `Dispatcher::open` in `n` child processes, each its first (see
/// `open_child`); with `hide_btf`, as `skactivate.service` runs the daemon.
fn first_opens(n: usize, hide_btf: bool) -> Vec<Duration> {
    let exe = std::env::current_exe().expect("current exe");
    (0..n)
        .map(|_| {
            let out = std::process::Command::new(&exe)
                .env(
                    "SKACTIVATE_BENCH_CHILD",
                    if hide_btf { "open-unit" } else { "open" },
                )
                .output()
                .expect("open child");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "open child: {out:?}");
            let ns: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("open_ns "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("open child printed no open_ns: {text}"));
            Duration::from_nanos(ns)
        })
        .collect()
}

/// The child process of the first-open rows: creates one dispatcher in a
/// namespace of its own, the first of this process, prints `open_ns N`.
/// With `hide_btf`, first does what `InaccessiblePaths=` of
/// units/skactivate.service does to the kernel's BTF, in a mount namespace
/// of this process's own.
fn open_child(hide_btf: bool) {
    if hide_btf {
        use nix::mount::{MsFlags, mount};
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make / private");
        let empty =
            std::env::temp_dir().join(format!("skactivate-bench-btf-{}", std::process::id()));
        std::fs::write(&empty, b"").expect("an empty file");
        std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o000))
            .expect("chmod 000");
        mount(
            Some(&empty),
            "/sys/kernel/btf/vmlinux",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("hide /sys/kernel/btf/vmlinux");
        let _ = std::fs::remove_file(&empty);
    }
    netns::in_netns(move |fs| {
        if hide_btf {
            // And the unit's capabilities (this thread's: the namespace and
            // bpffs are made) and memlock limit: without CAP_PERFMON the
            // verifier walks more.
            // Where this process may not raise its hard limit (no
            // CAP_SYS_RESOURCE in a sandbox), the lower hard limit stands:
            // kernels since 5.11 do not charge maps to it.
            let (caps, memlock) = common::shipped_unit_limits();
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a live rlimit.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) }, 0);
            let limit = memlock.unwrap_or(libc::RLIM_INFINITY);
            let wanted = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: live rlimits.
            if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &wanted) } != 0 {
                r.rlim_cur = r.rlim_max.min(limit);
                // SAFETY: a live rlimit.
                assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) }, 0);
            }
            common::keep_only_capabilities(&caps.iter().map(|(_, n)| *n).collect::<Vec<_>>());
        }
        let t = Instant::now();
        let d = Dispatcher::open(netns::thread_netns(), &fs.path).expect("fresh dispatcher");
        println!("open_ns {}", t.elapsed().as_nanos());
        d.destroy().expect("destroy");
    });
}

/// (bindings, RSS of the idle daemon, RSS with them): the shipped
/// `skactivate.service` under a throwaway systemd with `n` bindings
/// registered from a socket unit's files (`benches/shared/daemon.rs`, the
/// daemon bench's own measurement). Empty where no throwaway systemd runs.
fn run_rss(plan: &Plan) -> Vec<(u32, u64, u64)> {
    let Some(run) = daemon::run(plan.rss) else {
        eprintln!("no throwaway systemd here: the daemon RSS rows are left out");
        return Vec::new();
    };
    run.rows
        .iter()
        .map(|r| (r.bindings, run.idle_rss, r.rss))
        .collect()
}

/// The traffic worker's side: the same address and port, steered by the
/// dispatcher to a socket elsewhere; served by a socket bound there in a
/// namespace whose dispatcher has that socket registered but binds another
/// port (what traffic to other services pays while a dispatcher is
/// attached); served by a socket bound there with the empty `SK_PASS`
/// program attached (what running any sk_lookup program costs, the floor
/// under the other two); the same with the sockets also held in a SOCKMAP,
/// as every dispatcher holds the sockets it steers to (the kernel then gives
/// them the sockmap's own socket operations); or served by a socket bound
/// there, with no program attached.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Steered,
    Unrelated,
    Empty,
    EmptyMapped,
    Plain,
}

enum Cmd {
    Tcp(u32),
    Udp(u32),
}

/// What a side reports for one command: its wall time, and the program's
/// own run time and run count over it (`bpf_stats`; zero while statistics
/// are off, and on the plain side).
#[derive(Clone, Copy, Default)]
struct Done {
    took: Duration,
    run_ns: u64,
    runs: u64,
}

const TRAFFIC_ADDR: &str = "198.18.0.10";
const TRAFFIC_PORT: u16 = 8000;
/// The port the unrelated side's binding has: none of the traffic uses it.
const UNRELATED_PORT: u16 = 9000;

fn traffic_worker(side: Side) -> (mpsc::Sender<Cmd>, mpsc::Receiver<Done>) {
    let (tx, rx) = mpsc::channel::<Cmd>();
    let (dtx, drx) = mpsc::channel::<Done>();
    std::thread::spawn(move || {
        // Every side on the same CPU: a side must not win by running where
        // other work on the machine happens to be lighter.
        pin_thread(traffic_cpu());
        netns::enter(&[&format!("{TRAFFIC_ADDR}/32")]);
        let fs = netns::Bpffs::mount();
        let target: SocketAddr = (TRAFFIC_ADDR, TRAFFIC_PORT)
            .to_socket_addrs()
            .expect("addr")
            .next()
            .expect("addr");
        let bind_at: SocketAddr = if side == Side::Steered {
            SocketAddr::from(([127, 0, 0, 1], TRAFFIC_PORT))
        } else {
            target
        };
        let tcp = TcpListener::bind(bind_at).expect("tcp listen");
        tcp.set_nonblocking(true).expect("nonblocking");
        let udp = UdpSocket::bind(bind_at).expect("udp bind");
        udp.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        // Every side answers as a UDP service behind the dispatcher must
        // (skactivate.socket(5)): from the address it was reached at, told
        // by IP_PKTINFO.
        nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::Ipv4PacketInfo, &true)
            .expect("IP_PKTINFO");
        let d = matches!(side, Side::Steered | Side::Unrelated).then(|| {
            let mut d = Dispatcher::open(netns::thread_netns(), &fs.path).expect("dispatcher");
            let regs = d
                .register_sockets("bench.socket", &[tcp.as_fd(), udp.as_fd()])
                .expect("register");
            let port = if side == Side::Steered {
                TRAFFIC_PORT
            } else {
                UNRELATED_PORT
            };
            let items: Vec<_> = regs
                .iter()
                .map(|(dest, _)| {
                    let b = Binding::new(
                        dest.protocol,
                        format!("{TRAFFIC_ADDR}/32").parse().expect("prefix"),
                        Ports::single(port),
                    );
                    (b, dest.clone())
                })
                .collect();
            d.add_bindings(&items).expect("bindings");
            d
        });
        // The empty program, attached to this namespace for the link's
        // life.
        let empty = matches!(side, Side::Empty | Side::EmptyMapped).then(|| {
            let mut ebpf = load_prog(EMPTY_OBJECT, "skactivate_empty");
            let prog: &mut SkLookup = ebpf
                .program_mut("skactivate_empty")
                .expect("loaded")
                .try_into()
                .expect("an sk_lookup program");
            let ns = std::fs::File::open(netns::thread_netns()).expect("netns");
            let link = prog.attach(ns).expect("attach the empty program");
            (ebpf, link)
        });
        // A SOCKMAP holding the sockets, and nothing that reads it: the
        // reference dispatcher's, its program never attached.
        let mapped = (side == Side::EmptyMapped).then(|| {
            let reference = load_prog(REFERENCE_OBJECT, "reference_dispatcher");
            for (i, fd) in [tcp.as_fd(), udp.as_fd()].into_iter().enumerate() {
                dispatcher::sys::sockmap_insert(map_fd(&reference, "ref_sockets"), i as u32, fd)
                    .expect("a socket into the SOCKMAP");
            }
            reference
        });
        let pin = d
            .as_ref()
            .map(|d| d.dir().join(skactivate::paths::PROGRAM_PIN));
        // The program's cumulated run time and count, read outside the
        // timed part.
        let stats = || {
            let info = if let Some(pin) = &pin {
                aya::programs::ProgramInfo::from_pin(pin).expect("program info")
            } else if let Some((ebpf, _)) = &empty {
                let prog: &SkLookup = ebpf
                    .program("skactivate_empty")
                    .expect("loaded")
                    .try_into()
                    .expect("an sk_lookup program");
                prog.info().expect("program info")
            } else {
                return (0, 0);
            };
            (
                u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                info.run_count(),
            )
        };
        let client_udp = UdpSocket::bind((TRAFFIC_ADDR, 0)).expect("client udp");
        client_udp
            .set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        while let Ok(cmd) = rx.recv() {
            let before = stats();
            let t = Instant::now();
            match cmd {
                Cmd::Tcp(k) => {
                    for _ in 0..k {
                        let c = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                            .expect("connect");
                        let mut tries = 0;
                        let accepted = loop {
                            match tcp.accept() {
                                Ok((a, _)) => break a,
                                Err(e) if e.kind() == ErrorKind::WouldBlock && tries < 1000 => {
                                    tries += 1;
                                    std::thread::yield_now();
                                }
                                Err(e) => panic!("accept: {e}"),
                            }
                        };
                        // RST rather than TIME_WAIT: the loop reuses ports.
                        nix::sys::socket::setsockopt(
                            &c,
                            nix::sys::socket::sockopt::Linger,
                            &libc::linger {
                                l_onoff: 1,
                                l_linger: 0,
                            },
                        )
                        .expect("SO_LINGER");
                        drop(c);
                        drop(accepted);
                    }
                }
                Cmd::Udp(k) => {
                    for _ in 0..k {
                        client_udp.send_to(b"ping", target).expect("send");
                        let n = answer_from_reached_address(&udp, &mut buf);
                        assert_eq!(n, 4, "server got the request");
                        client_udp.recv_from(&mut buf).expect("client recv");
                    }
                }
            }
            let took = t.elapsed();
            let after = stats();
            let done = Done {
                took,
                run_ns: after.0 - before.0,
                runs: after.1 - before.1,
            };
            if dtx.send(done).is_err() {
                break;
            }
        }
        drop(mapped);
        drop(empty);
        drop(d);
        drop(fs);
    });
    (tx, drx)
}

/// Receive one datagram on `udp` (IP_PKTINFO on) and send it back from the
/// address it was sent to; returns its length.
fn answer_from_reached_address(udp: &UdpSocket, buf: &mut [u8]) -> usize {
    use nix::sys::socket::{
        ControlMessage, ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, sendmsg,
    };
    let fd = udp.as_raw_fd();
    let (n, peer, reached) = {
        let mut iov = [std::io::IoSliceMut::new(buf)];
        let mut space = nix::cmsg_space!(libc::in_pktinfo);
        let msg = recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut space), MsgFlags::empty())
            .expect("server recv");
        let reached = msg
            .cmsgs()
            .expect("control messages")
            .find_map(|c| match c {
                ControlMessageOwned::Ipv4PacketInfo(i) => Some(i.ipi_addr),
                _ => None,
            })
            .expect("IP_PKTINFO");
        (msg.bytes, msg.address.expect("sender"), reached)
    };
    let info = libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: reached,
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    let iov = [std::io::IoSlice::new(&buf[..n])];
    sendmsg(
        fd,
        &iov,
        &[ControlMessage::Ipv4PacketInfo(&info)],
        MsgFlags::empty(),
        Some(&peer),
    )
    .expect("reply");
    n
}

/// The CPU the traffic workers and the timed lookups run on: the last one.
fn traffic_cpu() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get() - 1)
}

/// The calling thread pinned to one CPU until this is dropped, when it gets
/// back the CPUs it had.
struct PinnedTo(libc::cpu_set_t);

impl PinnedTo {
    fn cpu(cpu: usize) -> PinnedTo {
        // SAFETY: sched_getaffinity(0, …) writes the calling thread's mask
        // into the cpu_set_t it is given, of the size it is told.
        let old = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let r = libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set);
            assert_eq!(
                r,
                0,
                "sched_getaffinity: {}",
                std::io::Error::last_os_error()
            );
            set
        };
        pin_thread(cpu);
        PinnedTo(old)
    }
}

impl Drop for PinnedTo {
    fn drop(&mut self) {
        // SAFETY: sched_setaffinity(0, …) reads the mask saved above.
        unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const self.0) };
    }
}

/// Pins the calling thread to `cpu`.
fn pin_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it, and
    // sched_setaffinity(0, …) reads it for the calling thread.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set)
    };
    assert_eq!(
        r,
        0,
        "sched_setaffinity to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
}

/// Per round, the times of each side ([`SIDES`] order), TCP and UDP; and the
/// program's own cost in that traffic, from the rounds run with `bpf_stats`.
struct Traffic {
    tcp: Vec<Times>,
    udp: Vec<Times>,
    in_situ: Result<InSitu, String>,
}

const SIDES: [Side; 5] = [
    Side::Steered,
    Side::Unrelated,
    Side::Empty,
    Side::EmptyMapped,
    Side::Plain,
];
/// Where each side is in [`SIDES`] (and in a round's [`Times`]).
const STEERED: usize = 0;
const UNRELATED: usize = 1;
const EMPTY: usize = 2;
const EMPTY_MAPPED: usize = 3;
const PLAIN: usize = 4;

/// One round's time of each side, in [`SIDES`] order.
type Times = [Duration; SIDES.len()];

/// The program's run time and run count over the statistics rounds, per
/// traffic (TCP, UDP) and side with a program (steered, unrelated, empty,
/// empty with the sockets in a SOCKMAP).
#[derive(Default)]
struct InSitu {
    rounds: usize,
    /// [traffic][side]: (run ns, runs)
    runs: [[(u64, u64); 4]; 2],
}

impl InSitu {
    fn ns_per_run(&self, traffic: usize, side: usize) -> f64 {
        let (ns, n) = self.runs[traffic][side];
        ns as f64 / n.max(1) as f64
    }
}

fn run_traffic(plan: &Plan, start: Instant) -> Traffic {
    let workers = SIDES.map(traffic_worker);
    let ask = |i: usize, c: Cmd| {
        workers[i].0.send(c).expect("worker alive");
        workers[i]
            .1
            .recv_timeout(Duration::from_secs(120))
            .expect("worker answered")
    };
    // One warm-up round each, not counted.
    for i in 0..SIDES.len() {
        ask(i, Cmd::Tcp(plan.connects / 10 + 1));
        ask(i, Cmd::Udp(plan.datagrams / 10 + 1));
    }
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for r in 0..plan.rounds {
        check_deadline(start, "traffic");
        // The order rotates with the round, so each side goes first, second
        // and last equally often.
        let mut t = [Duration::ZERO; SIDES.len()];
        let mut u = [Duration::ZERO; SIDES.len()];
        for j in 0..SIDES.len() {
            let i = (r + j) % SIDES.len();
            t[i] = ask(i, Cmd::Tcp(plan.connects)).took;
        }
        for j in 0..SIDES.len() {
            let i = (r + 1 + j) % SIDES.len();
            u[i] = ask(i, Cmd::Udp(plan.datagrams)).took;
        }
        tcp.push(t);
        udp.push(u);
    }
    // The program's own cost in this traffic: with run-time statistics on
    // (the kernel then reads its clock around every run, so these rounds
    // are not among the timed ones above).
    let in_situ = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Err(e) => Err(format!("BPF_ENABLE_STATS: {e}")),
        Ok(on) => {
            let mut s = InSitu {
                rounds: (plan.rounds / 5).max(2),
                ..InSitu::default()
            };
            for _ in 0..s.rounds {
                check_deadline(start, "traffic statistics");
                for (side, i) in [(0, STEERED), (1, UNRELATED), (2, EMPTY), (3, EMPTY_MAPPED)] {
                    for (traffic, cmd) in
                        [(0, Cmd::Tcp(plan.connects)), (1, Cmd::Udp(plan.datagrams))]
                    {
                        let d = ask(i, cmd);
                        s.runs[traffic][side].0 += d.run_ns;
                        s.runs[traffic][side].1 += d.runs;
                    }
                }
            }
            drop(on);
            Ok(s)
        }
    };
    Traffic { tcp, udp, in_situ }
}

/// Median over rounds of the plain side's time / side `i`'s: its rate as a
/// fraction of the plain one.
fn rate_ratio(v: &[Times], i: usize) -> f64 {
    rate_ratio_to(v, i, PLAIN)
}

/// Median over rounds of side `base`'s time / side `i`'s.
fn rate_ratio_to(v: &[Times], i: usize, base: usize) -> f64 {
    let mut r: Vec<f64> = v
        .iter()
        .map(|t| t[base].as_secs_f64() / t[i].as_secs_f64())
        .collect();
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

/// The lowest and highest per-round ratio to the plain side.
fn rate_ratio_range(v: &[Times], i: usize) -> (f64, f64) {
    v.iter()
        .map(|t| t[PLAIN].as_secs_f64() / t[i].as_secs_f64())
        .fold((f64::INFINITY, 0.0), |(lo, hi), x| (lo.min(x), hi.max(x)))
}

/// Median over rounds of (side `i`'s time − side `base`'s) / operations:
/// what side `i` adds to one connection or one round trip, in ns.
fn median_extra_ns(v: &[Times], i: usize, base: usize, k: u32) -> f64 {
    let mut r: Vec<f64> = v
        .iter()
        .map(|t| (t[i].as_secs_f64() - t[base].as_secs_f64()) * 1e9 / f64::from(k))
        .collect();
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

/// Median over rounds of side `i`'s operations per second.
fn median_rate(v: &[Times], k: u32, i: usize) -> f64 {
    let mut r: Vec<f64> = v
        .iter()
        .map(|t| f64::from(k) / t[i].as_secs_f64())
        .collect();
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("({path}: {e})"))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// UTC date and time, `YYYY-MM-DD HH:MM UTC`.
fn now_utc() -> String {
    let usec = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let full = skactivate::status::format_utc(usec);
    format!("{} UTC", &full[..16])
}

fn git_revision(root: &Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "ebpf",
                "skactivate/src/dispatcher",
                "skactivate/benches/dispatcher.rs",
            ])
            .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{rev} + uncommitted changes to the dispatcher or the bench")
            } else {
                rev
            }
        }
        None => "unknown".to_owned(),
    }
}

/// Everything one run measured.
struct Results {
    phases: Vec<Phase>,
    memory: MapMemory,
    rss: Vec<(u32, u64, u64)>,
    traffic: Traffic,
    load_start: String,
    load_end: String,
    total: Duration,
}

impl Results {
    fn cases(&self) -> impl Iterator<Item = &Case> {
        self.phases.iter().flat_map(|p| p.cases.iter())
    }

    fn empty_ns(&self) -> i64 {
        median_i64(
            self.cases()
                .flat_map(|c| c.empty.iter().map(|&x| i64::from(x)))
                .collect(),
        )
    }

    /// Loading 1 → the largest size of the bench workload, IPv4.
    fn load_total(&self) -> Option<(u32, Duration)> {
        let p = self.phases.first()?;
        let n = p.loads.last()?.1;
        Some((n, p.loads.iter().map(|l| l.2).sum()))
    }

    /// What `of` says of the first phase (the bench workload, IPv4) at `n`
    /// bindings, from its list of (bindings, figure).
    fn first_phase_at<T, R>(
        &self,
        n: u32,
        of: impl Fn(&Phase) -> &[(u32, T)],
        get: impl Fn(&T) -> R,
    ) -> Option<R> {
        of(self.phases.first()?)
            .iter()
            .find(|(m, _)| *m == n)
            .map(|(_, t)| get(t))
    }

    fn adopt(&self, n: u32) -> Option<Duration> {
        self.first_phase_at(n, |p| &p.adopts, |&d| d)
    }

    /// The map memory of the first phase's state with `n` bindings.
    fn maps_bytes(&self, n: u32) -> Option<u64> {
        self.first_phase_at(n, |p| &p.caches, |o| o.memory)
    }

    fn rss(&self, n: u32) -> Option<u64> {
        self.rss.iter().find(|r| r.0 == n).map(|r| r.2)
    }

    fn shrink(&self) -> Option<&Shrink> {
        self.phases.first()?.shrink.as_ref()
    }
}

fn json(r: &Results) -> String {
    let cases: Vec<serde_json::Value> = r
        .cases()
        .map(|c| {
            serde_json::json!({
                "workload": c.workload.name(),
                "family": family_name(c.family),
                "bindings": c.bindings,
                "case": c.case,
                "ns": c.ours_net(),
                "raw_ns": Case::raw(&c.ours),
                "reference_ns": c.reference_net(),
                "reference_raw_ns": Case::raw(&c.reference),
            })
        })
        .collect();
    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
    let v = serde_json::json!({
        "empty_ns": r.empty_ns(),
        "cases": cases,
        "load_1m_s": secs(r.load_total().filter(|l| l.0 == 1_000_000).map(|l| l.1)),
        "adopt_1m_s": secs(r.adopt(1_000_000)),
        "adopt_100k_s": secs(r.adopt(100_000)),
        "maps_bytes_one_binding": r.memory.ours,
        "reference_maps_bytes_one_binding": r.memory.reference,
        "maps_bytes_100k": r.maps_bytes(100_000),
        "maps_bytes_1m": r.maps_bytes(1_000_000),
        "maps_bytes_after_removal": r.shrink().map(|s| s.memory),
        "removal_s": secs(r.shrink().map(|s| s.took)),
        "daemon_rss_100k_bytes": r.rss(100_000),
        "daemon_rss_1m_bytes": r.rss(1_000_000),
        "fresh_dispatcher_s": median_secs(&r.memory.fresh),
        "fresh_dispatcher_first_s": median_secs(&r.memory.first),
        "fresh_dispatcher_first_unit_s": median_secs(&r.memory.first_unit),
        "tcp_connect_ratio": rate_ratio(&r.traffic.tcp, STEERED),
        "udp_request_response_ratio": rate_ratio(&r.traffic.udp, STEERED),
        "tcp_connect_ratio_unrelated": rate_ratio(&r.traffic.tcp, UNRELATED),
        "udp_request_response_ratio_unrelated": rate_ratio(&r.traffic.udp, UNRELATED),
        "tcp_connect_ratio_empty_program": rate_ratio(&r.traffic.tcp, EMPTY),
        "udp_request_response_ratio_empty_program": rate_ratio(&r.traffic.udp, EMPTY),
        "tcp_connect_ratio_empty_program_sockmap": rate_ratio(&r.traffic.tcp, EMPTY_MAPPED),
        "udp_request_response_ratio_empty_program_sockmap": rate_ratio(&r.traffic.udp, EMPTY_MAPPED),
        "tcp_connect_program_ns_per_run": r.traffic.in_situ.as_ref().ok().map(|s| s.ns_per_run(0, 0)),
        "udp_request_response_program_ns_per_run": r.traffic.in_situ.as_ref().ok().map(|s| s.ns_per_run(1, 0)),
    });
    serde_json::to_string_pretty(&v).expect("json")
}

fn median_secs(v: &[Duration]) -> f64 {
    let mut s: Vec<f64> = v.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20))
}

/// What the hit floor shows: which part of each hit no lookup design can
/// remove, and how ours and the reference compare on the rest.
fn floor_paragraph(w: &mut String, r: &Results) {
    let hits: Vec<(&Case, i64, i64, i64)> = r
        .cases()
        .filter_map(|c| {
            Some((
                c,
                c.floor_net()?,
                c.above_floor(&c.ours)?,
                c.above_floor(&c.reference)?,
            ))
        })
        .collect();
    if hits.is_empty() {
        return;
    }
    let span = |v: &mut dyn Iterator<Item = i64>| {
        let v: Vec<i64> = v.collect();
        let (lo, hi) = (v.iter().min().copied(), v.iter().max().copied());
        match (lo, hi) {
            (Some(lo), Some(hi)) if lo == hi => format!("{lo}"),
            (Some(lo), Some(hi)) => format!("{lo} to {hi}"),
            _ => "—".to_owned(),
        }
    };
    let within = hits
        .iter()
        .filter(|&&(_, _, o, rf)| o as f64 <= 0.4 * rf as f64)
        .count();
    let below: Vec<String> = hits
        .iter()
        .filter(|&&(c, f, _, _)| f as f64 > c.target())
        .map(|&(c, f, _, _)| {
            format!(
                "{} {} {} ({f} ns against ≤ {:.0})",
                c.workload.name(),
                family_name(c.family),
                count(c.bindings),
                c.target()
            )
        })
        .collect();
    let _ = writeln!(
        w,
        "**The hit floor.** On the {} hit rows the floor program costs {} ns \
         net of empty. Above it, in the same repetitions (the median over r \
         of program_r − floor_r: what finding the binding costs), skactivate \
         costs {} ns and the reference {} ns; skactivate is within 0.4× of \
         the reference above the floor in {within} of {} hit rows. Hit rows \
         whose target is below the floor itself, so that no dispatcher which \
         assigns a socket from a SOCKMAP can meet it: {}.\n",
        hits.len(),
        span(&mut hits.iter().map(|h| h.1)),
        span(&mut hits.iter().map(|h| h.2)),
        span(&mut hits.iter().map(|h| h.3)),
        hits.len(),
        if below.is_empty() {
            "none".to_owned()
        } else {
            below.join("; ")
        }
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok { "meets" } else { "**misses**" }
}

fn report(plan: &Plan, r: &Results, root: &Path) -> String {
    let mut s = String::new();
    let w = &mut s;
    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Written by `cargo bench -p skactivate --bench dispatcher` (root; \
         `skactivate/benches/dispatcher.rs`). Do not edit by hand: run it again. \
         Every figure below was measured in this one run; nothing is copied \
         from elsewhere.\n"
    );
    let _ = writeln!(w, "## Machine\n");
    let _ = writeln!(w, "* date: {}", now_utc());
    let _ = writeln!(
        w,
        "* kernel: {}",
        read_trimmed("/proc/sys/kernel/osrelease")
    );
    let _ = writeln!(w, "* CPU: {} ({nproc} CPUs)", cpu_model());
    let _ = writeln!(
        w,
        "* load average at the start: {}; at the end: {}",
        r.load_start, r.load_end
    );
    let load1: f64 = r
        .load_start
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if load1 > 1.0 {
        let _ = writeln!(
            w,
            "* **the machine was shared**: other work (builds and tests) ran \
             during this run, so absolute figures are noisier and higher than \
             on an idle machine. The programs of a case were measured \
             interleaved on the same probes, so the net figures and ratios \
             are what to read; the traffic and timing rows suffer most."
        );
    }
    let phase0 = r.phases.first();
    let _ = writeln!(
        w,
        "* source: {}; program tag {}",
        git_revision(root),
        phase0.map_or("?", |p| p.program_tag.as_str())
    );
    let _ = writeln!(w, "* bench took {:.1} s\n", r.total.as_secs_f64());

    // Lookups.
    let _ = writeln!(w, "## Lookup cost (`BPF_PROG_TEST_RUN`, ns per run)\n");
    let _ = writeln!(
        w,
        "Three programs, measured interleaved in one run on the same probes: \
         the empty `SK_PASS` program (`ebpf/empty.bpf.c`), skactivate's \
         dispatcher, and the reference dispatcher (`ebpf/reference.bpf.c`, \
         written for this bench: tubular's plain design, done as tubular's \
         program does it, one LPM trie keyed {{prefixlen, protocol, port, \
         IPv4-mapped address}} asked twice on every lookup, with the port and \
         with port 0 for `*`, the longer match kept, the lookup counted in a \
         per-CPU array of counters per destination, then `bpf_sk_assign` \
         from a SOCKMAP); on \
         hits a fourth, the hit floor (`ebpf/floor.bpf.c`: no lookup at all, \
         socket 0 of a SOCKMAP assigned and released, what every hit of any \
         dispatcher pays at least, `BPF_PROG_TEST_RUN`'s handling of a \
         selected socket included). Each \
         program runs {} calls of {} repeats per case (the kernel reports the \
         mean per call), every call on CPU {}; repetition r runs them all on \
         probe r, in an order rotated with r. **Every figure is net of the empty program**: the \
         median over r of (program_r − empty_r). The empty program's median \
         over the whole run: **{} ns**.\n",
        plan.runs,
        plan.repeat,
        traffic_cpu(),
        r.empty_ns()
    );
    let _ = writeln!(
        w,
        "Target (issue 10): skactivate's net cost ≤ 0.4× the reference's net \
         cost on every hit and every miss on a bound port; an unbound port \
         ≤ 3 ns net (bench workload; in the mixed workload port 22 is bound \
         by the `*` bindings, so its \"unbound\" rows are misses on a bound \
         port and get the 0.4× target).\n"
    );
    let _ = writeln!(
        w,
        "| workload | family | bindings | case | skactivate (net) | reference (net) | ours / reference | target | verdict | floor (net) | above the floor: ours / reference |"
    );
    let _ = writeln!(
        w,
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"
    );
    let mut met = 0;
    let mut total = 0;
    for c in r.cases() {
        let ratio = if c.reference_net() > 0 {
            format!("{:.2}", c.ours_net() as f64 / c.reference_net() as f64)
        } else {
            "—".to_owned()
        };
        total += 1;
        if c.meets() {
            met += 1;
        }
        let (floor, above) = match (
            c.floor_net(),
            c.above_floor(&c.ours),
            c.above_floor(&c.reference),
        ) {
            (Some(f), Some(o), Some(rf)) => (f.to_string(), format!("{o} / {rf}")),
            _ => ("—".to_owned(), "—".to_owned()),
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | **{}** | {} | {ratio} | ≤ {:.0} | {} | {floor} | {above} |",
            c.workload.name(),
            family_name(c.family),
            count(c.bindings),
            c.case,
            c.ours_net(),
            c.reference_net(),
            c.target(),
            verdict(c.meets()),
        );
    }
    let dearer: Vec<String> = r
        .cases()
        .filter(|c| c.ours_net() > c.reference_net())
        .map(|c| {
            format!(
                "{} {} {} {}",
                c.workload.name(),
                family_name(c.family),
                count(c.bindings),
                c.case
            )
        })
        .collect();
    let _ = writeln!(
        w,
        "\n{met} of {total} rows meet the target. The dispatcher reads one \
         `ports` word (an unbound port stops there), then the lengths word of \
         the family and protocol (the prefix lengths in use, which kinds of \
         entry each has, and while few prefixes are in use an address filter, \
         where a miss elsewhere stops), then probes its `entries` hash: the \
         full-length key, then each shorter prefix length in use, longest \
         first, only the kinds in use; each probe reads the key's bit in the \
         `filter` array (a Bloom filter of the hash's keys, 16 bits per entry \
         of its capacity) first and stops where it is clear; a full-length \
         probe (/32, /128) then reads the `cache` array's header and the \
         key's first bucket, and only where the key is not cached its second bucket and \
         the hash; a shorter probe goes to the hash (the bench workload, all \
         /32: a cached hit is one filter read and one cache read, a miss on a \
         bound port one filter read; the mixed workload, /32 and /24: up to \
         four filter reads, and a cache read for a /32 that hits, a hash \
         lookup for a /24; see \"The cache\" below for which were cached). \
         Every hit then counts itself in the per-CPU `metrics` array and \
         pays the SOCKMAP lookup, `bpf_sk_assign` and release, as the \
         reference's hits do. The reference walks its LPM trie twice on every \
         lookup. Rows where skactivate costs more \
         than the reference: {}.\n",
        if dearer.is_empty() {
            "none".to_owned()
        } else {
            dearer.join("; ")
        }
    );
    floor_paragraph(w, r);
    let _ = writeln!(w, "Raw medians (ns, not net), for the record:\n");
    let _ = writeln!(
        w,
        "| workload | family | bindings | case | empty | skactivate | reference | floor |"
    );
    let _ = writeln!(w, "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |");
    for c in r.cases() {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            c.workload.name(),
            family_name(c.family),
            count(c.bindings),
            c.case,
            Case::raw(&c.empty),
            Case::raw(&c.ours),
            Case::raw(&c.reference),
            if c.floor.is_empty() {
                "—".to_owned()
            } else {
                Case::raw(&c.floor).to_string()
            }
        );
    }

    let _ = writeln!(w, "\n### Workloads and cases\n");
    let _ = writeln!(
        w,
        "* bench: TCP /32s, one port each, drawn by a fixed permutation from \
         2^{SPACE_BITS} (port, address) pairs: 198.18.0.0/15 (RFC 2544) on \
         ports {FIRST_PORT}–{}.\n\
         * mixed: binding i is, by i mod 4, a `*`-port /24, a one-port /24, a \
         `*`-port /32 or a one-port /32 (ports {FIRST_PORT}–{}): half `*`, \
         half /24. The /24s are drawn by a permutation of the 2^20 /24s of \
         240.0.0.0/4 (reserved; no documentation range holds 250k distinct \
         /24s), a quarter of them kept for miss probes.\n\
         * IPv6: the same bindings with the same low 32 bits under \
         2001:db8::/96, prefix lengths + 96; the reference keys them as they \
         are, IPv4 as ::ffff:a.b.c.d (as tubular does).\n\
         * hit: an address and port a binding covers (for `*` bindings, a port \
         of {FIRST_PORT}–{}); miss: an address no binding covers on such a \
         port; unbound: those addresses on port {UNBOUND_PORT}, which no \
         one-port binding has. In the mixed workload the `*` bindings cover \
         every port, so \"unbound\" there is a port no one-port binding uses, \
         not one without any binding.\n\
         * A test run sends no packet: none of these addresses is on a wire.",
        FIRST_PORT + (1 << PORT_BITS) - 1,
        FIRST_PORT + (1 << PORT_BITS) - 1,
        FIRST_PORT + (1 << PORT_BITS) - 1,
    );
    let sizes: Vec<String> = plan.sizes.iter().map(|&n| count(n)).collect();
    let _ = writeln!(
        w,
        "* Sizes: {} bindings for each workload and family; each phase (one \
         workload, one family) has a namespace, a dispatcher and a reference \
         of its own, grown through the sizes.{}",
        sizes.join(", "),
        if plan.full {
            " Nothing is cut: every size, both workloads, both families."
        } else {
            " (A smoke run: the full bench goes to 1M.)"
        }
    );

    // What the cache held.
    let _ = writeln!(w, "\n### The cache\n");
    let _ = writeln!(
        w,
        "A hit whose entry is cached costs a filter read and a cache read; \
         one whose entry is not, a second cache bucket and the hash lookup \
         more. \
         The cache is sized to the entries: a bucket of two slots per entry, \
         a power of two, at least 1024 buckets and at most half the entries \
         hash's capacity (a slot per entry of it), and a key has two buckets \
         to choose from: where the bindings fill the cache (1M) some keys \
         find both full. Entries of every length are cached. Read from the \
         pinned map after loading each size; \"probes\": which of the hit \
         probes' entries were cached, in the order they were timed (C cached, \
         . not); map memory: the `memlock:` of every map of the dispatcher's \
         state then, as the kernel accounts it (the cache's part of it in \
         brackets).\n"
    );
    let _ = writeln!(
        w,
        "| workload | family | bindings | cache buckets | entries cached | hit probes cached | map memory |"
    );
    let _ = writeln!(w, "| --- | --- | ---: | ---: | ---: | --- | ---: |");
    for p in &r.phases {
        let Some(c) = p.cases.first() else { continue };
        for (n, o) in &p.caches {
            let flags: String = o
                .probes
                .iter()
                .map(|&c| if c { 'C' } else { '.' })
                .collect();
            let mib = |b: u64| b as f64 / f64::from(1 << 20);
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {} of {} ({:.1} %) | {} of {}: `{flags}` | {:.1} MiB ({:.1}) |",
                c.workload.name(),
                family_name(c.family),
                count(*n),
                o.buckets,
                o.slots,
                o.entries,
                100.0 * o.slots as f64 / o.entries.max(1) as f64,
                o.probes.iter().filter(|&&c| c).count(),
                o.probes.len(),
                mib(o.memory),
                mib(o.cache_memory)
            );
        }
    }

    // Loading and adopting.
    let _ = writeln!(w, "\n## Loading and adopting\n");
    let _ = writeln!(
        w,
        "`Dispatcher::add_bindings`, one call per {} new bindings, growing \
         the bench workload's IPv4 dispatcher (and, in the rows that say so, \
         the other workloads and families, each loaded after the one before \
         it was destroyed: the kernel may still be freeing its maps); \
         adopting = dropping the handle (one writer per namespace) and \
         `Dispatcher::open` on the pinned state.\n",
        plan.chunk
    );
    let _ = writeln!(w, "| row | measured | target | verdict |");
    let _ = writeln!(w, "| --- | ---: | ---: | --- |");
    // The bench workload's IPv4 dispatcher first (the JSON's `load_1m_s`),
    // then each other workload and family as the lookup phases loaded it.
    for (i, p) in r.phases.iter().enumerate() {
        let (Some(c), Some(&(_, n, _))) = (p.cases.first(), p.loads.last()) else {
            continue;
        };
        let t: Duration = p.loads.iter().map(|l| l.2).sum();
        let target = (n == 1_000_000).then_some(1.0);
        let _ = writeln!(
            w,
            "| load 1 → {} bindings{} | {:.2} s ({:.2} µs per binding) | {} | {} |",
            count(n),
            if i == 0 {
                String::new()
            } else {
                format!(", {} {}", c.workload.name(), family_name(c.family))
            },
            t.as_secs_f64(),
            t.as_secs_f64() * 1e6 / f64::from(n),
            target.map_or("—".to_owned(), |t| format!("≤ {t} s")),
            target.map_or("—", |l| verdict(t.as_secs_f64() <= l)),
        );
    }
    for p in r.phases.iter().take(1) {
        for &(n, t) in &p.adopts {
            let target = match n {
                1_000_000 => Some(0.5),
                100_000 => Some(0.05),
                _ => None,
            };
            let _ = writeln!(
                w,
                "| adopt {} bindings | {:.3} s | {} | {} |",
                count(n),
                t.as_secs_f64(),
                target.map_or("—".to_owned(), |t| format!("≤ {t} s")),
                target.map_or("—", |l| verdict(t.as_secs_f64() <= l)),
            );
        }
    }
    let _ = writeln!(
        w,
        "\nLoading per phase (ours; the reference is loaded too but not timed):\n"
    );
    let _ = writeln!(w, "| workload | family | step | time |");
    let _ = writeln!(w, "| --- | --- | --- | ---: |");
    for p in &r.phases {
        let Some(c) = p.cases.first() else { continue };
        for &(from, to, t) in &p.loads {
            if from == to || to == 1 {
                continue;
            }
            let _ = writeln!(
                w,
                "| {} | {} | {} → {} | {:.2} s |",
                c.workload.name(),
                family_name(c.family),
                count(from),
                count(to),
                t.as_secs_f64()
            );
        }
    }

    // Memory and start-up.
    let m = &r.memory;
    let _ = writeln!(w, "\n## Memory and start-up\n");
    let _ = writeln!(w, "| row | measured | target | verdict |");
    let _ = writeln!(w, "| --- | ---: | ---: | --- |");
    let each: Vec<String> = m.each.iter().map(|(n, b)| format!("{n} {b}")).collect();
    let _ = writeln!(
        w,
        "| BPF map memory, one binding and one socket ({nproc} CPUs) | {} bytes ({}) | ≤ 262144 bytes | {} |",
        m.ours,
        each.join(", "),
        verdict(m.ours <= 256 << 10)
    );
    if let Some(sh) = r.shrink() {
        let _ = writeln!(
            w,
            "| the same, the bench workload's IPv4 state after {} of its {} bindings were removed in one call ({:.2} s; {} before) | {} bytes | ≤ 262144 bytes | {} |",
            count(sh.from - 1),
            count(sh.from),
            sh.took.as_secs_f64(),
            r.maps_bytes(sh.from).map_or("—".to_owned(), mib),
            sh.memory,
            verdict(sh.memory <= 256 << 10)
        );
    }
    let cpus = u64::try_from(nproc).unwrap_or(0);
    let _ = writeln!(
        w,
        "| the same on 64 CPUs, computed (the per-CPU maps' {} bytes per CPU × {} more CPUs), not measured | {} bytes | — | (context) |",
        m.per_cpu,
        64u64.saturating_sub(cpus),
        m.ours + m.per_cpu * 64u64.saturating_sub(cpus)
    );
    let _ = writeln!(
        w,
        "| the reference's maps, one binding and one socket | {} bytes | — | (context) |",
        m.reference
    );
    let fresh = median_secs(&m.fresh);
    for (what, samples) in [
        (
            "fresh dispatcher ready (`Dispatcher::open`, median of {n})",
            &m.fresh,
        ),
        (
            "fresh dispatcher ready, the first of a new process (a daemon starting; median of {n} child processes)",
            &m.first,
        ),
        (
            "the same, as `skactivate.service` runs it (`/sys/kernel/btf/vmlinux` inaccessible, the unit's capabilities and `LimitMEMLOCK=`; median of {n} child processes)",
            &m.first_unit,
        ),
    ] {
        let t = median_secs(samples);
        let _ = writeln!(
            w,
            "| {} | {:.1} ms | ≤ 8 ms | {} |",
            what.replace("{n}", &samples.len().to_string()),
            t * 1e3,
            verdict(t <= 0.008)
        );
    }
    let _ = writeln!(
        w,
        "| creating {} TCP listeners instead (at most {} held at once: RLIMIT_NOFILE) | {:.1} ms ({:.1}× the fresh dispatcher) | — | (context) |",
        plan.listeners,
        m.listeners_at_once,
        m.listeners.as_secs_f64() * 1e3,
        m.listeners.as_secs_f64() / fresh
    );
    for &(n, empty, rss) in &r.rss {
        let target = match n {
            100_000 => Some(16u64 << 20),
            1_000_000 => Some(64 << 20),
            _ => None,
        };
        let _ = writeln!(
            w,
            "| daemon RSS (`skactivate.service`), {} bindings (idle: {}) | {} | {} | {} |",
            count(n),
            mib(empty),
            mib(rss),
            target.map_or("—".to_owned(), |t| format!("≤ {}", mib(t))),
            target.map_or("—", |t| verdict(rss <= t)),
        );
    }
    let _ = writeln!(
        w,
        "\nMap memory is the `memlock:` line of `/proc/self/fdinfo` for each map \
         pinned in the dispatcher's state directory (programs and links \
         excluded), as the kernel accounts it. The per-CPU `metrics` map grows \
         with the CPU count. Daemon RSS: the shipped `skactivate.service` \
         under a throwaway systemd (the real dbus-daemon), a socket unit whose \
         drop-in has the bench workload's bindings one per `X-SkLookup=` line, \
         registered by the generator's `skactivate@bench.service`; the \
         daemon's `VmRSS` once it counts them all (`benches/shared/daemon.rs`, \
         the measurement `cargo bench --bench daemon` reports in \
         BENCHMARKS-daemon.md). Fresh dispatchers: created and destroyed one \
         after another in one namespace of this process, before the lookup \
         phases (after them the kernel is still freeing their million-entry \
         maps, and a fresh dispatcher took twice as long); the first of a new \
         process is timed in child processes (this binary again), one \
         dispatcher each, and pays once what a process pays once (aya parses \
         the kernel's BTF when its loader is made, and probes the kernel's \
         features); the shipped unit hides that BTF, which the dispatcher does \
         not use, and the last of these rows does the same in its child \
         processes (a bind mount of a mode-000 file, in a mount namespace of \
         their own), with only the unit's capabilities (`CAP_BPF`, \
         `CAP_NET_ADMIN`: without `CAP_PERFMON` the verifier walks more) and \
         its `LimitMEMLOCK=`.",
    );

    // Traffic.
    let _ = writeln!(w, "\n## Steered traffic against no program\n");
    let _ = w.write_str(&traffic_report(&r.traffic, plan));

    let _ = writeln!(w, "\n## JSON\n");
    let _ = writeln!(
        w,
        "With `SKACTIVATE_BENCH_JSON=FILE` the bench also writes the figures to \
         FILE: `empty_ns` is the empty program's raw median; in `cases`, `ns` \
         is skactivate's cost **net of the empty program** (the median of the \
         paired differences, as in the table), `raw_ns` its raw median, \
         `reference_ns` and `reference_raw_ns` the same for the reference \
         dispatcher. `load_1m_s`, `adopt_1m_s` (and `adopt_100k_s`) in \
         seconds; `maps_bytes_one_binding` (and \
         `reference_maps_bytes_one_binding`, and `maps_bytes_100k`, \
         `maps_bytes_1m`: the bench workload's IPv4 state with 100k and 1M \
         bindings, as in \"The cache\"; `maps_bytes_after_removal`: that \
         state once all its bindings but one were removed, which took \
         `removal_s` seconds), `daemon_rss_100k_bytes`, \
         `daemon_rss_1m_bytes` in bytes; `fresh_dispatcher_s`, \
         `fresh_dispatcher_first_s`, `fresh_dispatcher_first_unit_s`, \
         `tcp_connect_ratio`, `udp_request_response_ratio` (the steered \
         side), `tcp_connect_ratio_unrelated`, \
         `udp_request_response_ratio_unrelated`, \
         `tcp_connect_ratio_empty_program`, \
         `udp_request_response_ratio_empty_program`, \
         `tcp_connect_ratio_empty_program_sockmap`, \
         `udp_request_response_ratio_empty_program_sockmap`, \
         `tcp_connect_program_ns_per_run`, \
         `udp_request_response_program_ns_per_run` (the steered side; null \
         where not measured) as in the tables."
    );
    s
}

fn main() {
    if let Ok(spec) = std::env::var("SKACTIVATE_BENCH_CHILD") {
        assert!(
            spec == "open" || spec == "open-unit",
            "unknown child {spec}"
        );
        open_child(spec == "open-unit");
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let plan: &'static Plan = if full { &FULL } else { &SMOKE };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the dispatcher benchmark needs root: it unshares a network namespace");
        std::process::exit(1);
    }
    if !dispatcher::is_supported() {
        eprintln!("SKIP: kernel has no BPF sk_lookup (needs Linux >= 5.9)");
        return;
    }
    if let Ok(only) = std::env::var("SKACTIVATE_BENCH_ONLY") {
        run_only(plan, &only);
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_owned();
    let start = Instant::now();
    let load_start = read_trimmed("/proc/loadavg");
    let last = *plan.sizes.last().expect("sizes");
    let adopt_at: &'static [u32] = if plan.full {
        &[100_000, 1_000_000]
    } else {
        std::slice::from_ref(plan.sizes.last().expect("sizes"))
    };
    // First: a fresh dispatcher timed after the phases competed with the
    // kernel freeing their million-entry maps (RCU callbacks and deferred
    // work on both CPUs) and took twice as long.
    eprintln!("memory and start-up");
    let memory = run_memory(plan);
    let mut phases = Vec::new();
    for (workload, family) in [
        (Workload::Bench, Family::V4),
        (Workload::Bench, Family::V6),
        (Workload::Mixed, Family::V4),
        (Workload::Mixed, Family::V6),
    ] {
        let adopts: &'static [u32] = if phases.is_empty() { adopt_at } else { &[] };
        eprintln!(
            "phase {} {} up to {} bindings",
            workload.name(),
            family_name(family),
            count(last)
        );
        phases.push(run_phase(plan, workload, family, plan.sizes, adopts, start));
    }
    eprintln!("daemon RSS");
    let rss = run_rss(plan);
    eprintln!("traffic");
    let traffic = run_traffic(plan, start);
    let results = Results {
        phases,
        memory,
        rss,
        traffic,
        load_start,
        load_end: read_trimmed("/proc/loadavg"),
        total: start.elapsed(),
    };
    let text = report(plan, &results, &root);
    println!("{text}");
    if let Some(path) = std::env::var_os("SKACTIVATE_BENCH_JSON") {
        std::fs::write(&path, json(&results))
            .unwrap_or_else(|e| panic!("{}: {e}", Path::new(&path).display()));
        eprintln!("wrote {}", Path::new(&path).display());
    }
    if plan.full {
        let path = root.join("BENCHMARKS.md");
        let kept = proxy_section(&path);
        std::fs::write(&path, text + &kept).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("wrote {}", path.display());
    }
}

/// `SKACTIVATE_BENCH_ONLY=PART`: one part of the bench, printed to stdout;
/// BENCHMARKS.md is left as it is.
fn run_only(plan: &'static Plan, only: &str) {
    match only {
        "startup" => run_only_startup(plan),
        "traffic" => run_only_traffic(plan),
        "load" => run_loads(plan),
        "lookup" => run_lookup(plan),
        _ => panic!(
            "SKACTIVATE_BENCH_ONLY: unknown part {only:?} (known: startup, load, lookup, traffic)"
        ),
    }
}

/// `traffic`: the steered-traffic rows.
fn run_only_traffic(plan: &'static Plan) {
    let t = run_traffic(plan, Instant::now());
    print!("{}", traffic_report(&t, plan));
}

/// The steered-traffic section of the report: the method, the rates, and
/// the program's own cost in that traffic.
fn traffic_report(t: &Traffic, plan: &Plan) -> String {
    let mut w = String::new();
    let _ = writeln!(
        w,
        "Five namespaces, each with {TRAFFIC_ADDR}/32 on `lo`, and in each \
         a TCP listener and a UDP socket:\n\n\
         * **steered**: the sockets are bound to 127.0.0.1:{TRAFFIC_PORT} \
         (the steered port, as a socket unit with `ListenStream=127.0.0.1:PORT` \
         has it) and the dispatcher steers tcp and udp \
         {TRAFFIC_ADDR}:{TRAFFIC_PORT} to them;\n\
         * **unrelated**: the sockets are bound to \
         {TRAFFIC_ADDR}:{TRAFFIC_PORT} and registered with a dispatcher whose \
         bindings are for port {UNRELATED_PORT}: the program runs for every \
         SYN and datagram and finds the port unbound, which is what traffic \
         to other services pays while a dispatcher is attached;\n\
         * **empty program**: the sockets are bound to \
         {TRAFFIC_ADDR}:{TRAFFIC_PORT} and the empty `SK_PASS` program \
         (`ebpf/empty.bpf.c`) is attached: what running any sk_lookup \
         program costs this traffic, the floor under the two above;\n\
         * **empty program, sockets in a SOCKMAP**: the same, and the \
         sockets also held in a SOCKMAP that nothing reads, as a \
         dispatcher holds every socket it steers to (steered and unrelated \
         alike): the kernel then serves them with the sockmap's own socket \
         operations (`udp_bpf_recvmsg`, and so on), whatever the program \
         does;\n\
         * **no program**: the sockets are bound to \
         {TRAFFIC_ADDR}:{TRAFFIC_PORT}, nothing is attached.\n\n\
         One thread per side, all pinned to the same CPU (CPU {}), one side \
         at a time. {} rounds, the order of the sides rotated each round; per \
         round and side {} TCP connections (connect, accept, close with RST) \
         and {} UDP request/response pairs from an unconnected client socket \
         in the same namespace, each answered from the address it was sent \
         to (`IP_PKTINFO`, as skactivate.socket(5) asks of a UDP service). Short rounds, so that a change in the \
         machine's load falls on every side of a round alike. Ratio = median \
         over rounds of a side's rate / the no-program rate (its spread over \
         rounds in brackets: wide on a shared machine); \"extra\" = median \
         over rounds of (that side's time − the no-program time) per \
         connection or round trip; \"to empty\" and \"extra over empty\" \
         the same against the empty-program side: what the dispatcher adds \
         to the floor. The program runs for every SYN and every \
         datagram in the namespace, the replies to the client's socket (a \
         port with no binding) included.\n",
        traffic_cpu(),
        plan.rounds,
        plan.connects,
        plan.datagrams
    );
    let _ = writeln!(
        w,
        "| traffic | side | per s | ratio to no program | extra (ns) | to empty | extra over empty (ns) | target | verdict |"
    );
    let _ = writeln!(
        w,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for (name, v, k) in [
        ("TCP connect", &t.tcp, plan.connects),
        ("UDP request/response", &t.udp, plan.datagrams),
    ] {
        for (i, side) in SIDES.iter().enumerate() {
            let rate = median_rate(v, k, i);
            match side {
                Side::Plain => {
                    let _ = writeln!(
                        w,
                        "| {name} | no program | {rate:.0} | 1 | — | — | — | — | — |"
                    );
                }
                Side::Steered | Side::Unrelated | Side::Empty | Side::EmptyMapped => {
                    let ratio = rate_ratio(v, i);
                    let (lo, hi) = rate_ratio_range(v, i);
                    let (label, target, verdict_text) = match side {
                        Side::Steered => ("steered", "≥ 0.99", verdict(ratio >= 0.99).to_string()),
                        Side::Unrelated => ("unrelated", "—", "(context)".to_string()),
                        Side::Empty => ("empty program", "—", "(context)".to_string()),
                        _ => (
                            "empty program, sockets in a SOCKMAP",
                            "—",
                            "(context)".to_string(),
                        ),
                    };
                    let (to_empty, over_empty) = if *side == Side::Empty {
                        ("—".to_string(), "—".to_string())
                    } else {
                        (
                            format!("{:.3}", rate_ratio_to(v, i, EMPTY)),
                            format!("{:.0}", median_extra_ns(v, i, EMPTY, k)),
                        )
                    };
                    let _ = writeln!(
                        w,
                        "| {name} | {label} | {rate:.0} | **{ratio:.3}** ({lo:.3}–{hi:.3}) | {:.0} | {to_empty} | {over_empty} | {target} | {verdict_text} |",
                        median_extra_ns(v, i, PLAIN, k),
                    );
                }
            }
        }
    }
    let _ = writeln!(w, "\n### The program's own cost in that traffic\n");
    match &t.in_situ {
        Err(e) => {
            let _ = writeln!(w, "Not measured: {e}.");
        }
        Ok(s) => {
            let _ = writeln!(
                w,
                "{} more rounds of every side with a program with the \
                 kernel's run-time statistics on (`BPF_ENABLE_STATS`; not \
                 among the timed rounds above: the kernel then reads its clock \
                 around every run, and these figures include those reads). \
                 \"ns per run\" is the program's own time per run in this \
                 traffic, where every run comes between microseconds of \
                 network stack; the lookup table's `BPF_PROG_TEST_RUN` figures \
                 run it 200000 times in a row, hot in the caches. \"Budget\" \
                 is 1 % of the no-program time per connection or round trip: \
                 what a ratio of 0.99 allows the program and everything \
                 steering changes to cost.\n",
                s.rounds
            );
            let _ = writeln!(
                w,
                "| traffic | side | program runs per op | ns per run | program ns per op | budget at 0.99 (ns per op) |"
            );
            let _ = writeln!(w, "| --- | --- | ---: | ---: | ---: | ---: |");
            for (traffic, name, v, k) in [
                (0, "TCP connect", &t.tcp, plan.connects),
                (1, "UDP request/response", &t.udp, plan.datagrams),
            ] {
                let ops = (s.rounds as f64) * f64::from(k);
                let budget = 0.01 * 1e9 / median_rate(v, k, PLAIN);
                for (side, label) in [
                    (0, "steered"),
                    (1, "unrelated"),
                    (2, "empty program"),
                    (3, "empty program, sockets in a SOCKMAP"),
                ] {
                    let (ns, runs) = s.runs[traffic][side];
                    let _ = writeln!(
                        w,
                        "| {name} | {label} | {:.2} | {:.0} | {:.0} | {budget:.0} |",
                        runs as f64 / ops,
                        s.ns_per_run(traffic, side),
                        ns as f64 / ops,
                    );
                }
            }
        }
    }
    w
}

/// `SKACTIVATE_BENCH_ONLY=lookup`: only the lookup rows, both workloads and
/// families, at the sizes in `SKACTIVATE_BENCH_SIZES` (comma-separated;
/// default: the plan's), printed to stdout; BENCHMARKS.md is left as it is.
fn run_lookup(plan: &'static Plan) {
    let sizes: &'static [u32] = match std::env::var("SKACTIVATE_BENCH_SIZES") {
        Ok(v) => Vec::leak(
            v.split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("SKACTIVATE_BENCH_SIZES: {n:?}: {e}"))
                })
                .collect(),
        ),
        Err(_) => plan.sizes,
    };
    let start = Instant::now();
    for (workload, family) in [
        (Workload::Bench, Family::V4),
        (Workload::Bench, Family::V6),
        (Workload::Mixed, Family::V4),
        (Workload::Mixed, Family::V6),
    ] {
        let phase = run_phase(plan, workload, family, sizes, &[], start);
        for c in &phase.cases {
            let floor = match (
                c.floor_net(),
                c.above_floor(&c.ours),
                c.above_floor(&c.reference),
            ) {
                (Some(f), Some(o), Some(rf)) => {
                    format!("; floor {f}, above it ours {o} reference {rf}")
                }
                _ => String::new(),
            };
            println!(
                "{} {} {} {}: ours {} reference {} (net; empty {}) target {:.0}: {}{floor}",
                workload.name(),
                family_name(family),
                count(c.bindings),
                c.case,
                c.ours_net(),
                c.reference_net(),
                Case::raw(&c.empty),
                c.target(),
                verdict(c.meets())
            );
        }
    }
}

/// A dispatcher of the startup and load parts: one listener registered,
/// grown with a workload's bindings in calls of `Plan::chunk`, as the
/// phases grow theirs, but without lookups or a reference.
struct Loaded {
    _listener: TcpListener,
    d: Option<Dispatcher>,
    dest: Destination,
    have: u32,
}

impl Loaded {
    fn open(fs: &netns::Bpffs) -> Self {
        let listener = TcpListener::bind("127.0.0.1:7999").expect("listen");
        let mut d = Dispatcher::open(netns::thread_netns(), &fs.path).expect("open dispatcher");
        let regs = d
            .register_sockets("bench.socket", &[listener.as_fd()])
            .expect("register the listener");
        let dest = regs[0].0.clone();
        Loaded {
            _listener: listener,
            d: Some(d),
            dest,
            have: 0,
        }
    }

    /// Add the workload's bindings up to `n`; returns the time
    /// `add_bindings` took.
    fn grow_to(
        &mut self,
        plan: &Plan,
        (workload, family): (Workload, Family),
        n: u32,
        start: Instant,
    ) -> Duration {
        let mut took = Duration::ZERO;
        while self.have < n {
            check_deadline(start, "loading bindings");
            let upto = n.min(self.have + plan.chunk);
            let items: Vec<(Binding, Destination)> = (self.have..upto)
                .map(|i| (workload.spec(family, i).binding(), self.dest.clone()))
                .collect();
            let d = self.d.as_mut().expect("a dispatcher");
            let t = Instant::now();
            let changes = d.add_bindings(&items).expect("add bindings");
            took += t.elapsed();
            assert_eq!(changes.added, items.len(), "every binding is new");
            self.have = upto;
        }
        took
    }

    fn adopt(&mut self, fs: &netns::Bpffs) -> Duration {
        adopt_again(&mut self.d, fs)
    }

    fn destroy(mut self) {
        self.d
            .take()
            .expect("a dispatcher")
            .destroy()
            .expect("destroy");
    }
}

/// `startup`: only the fresh-dispatcher, load and adopt rows (the bench
/// workload's IPv4 dispatcher, no lookups and no reference).
fn run_only_startup(plan: &'static Plan) {
    let start = Instant::now();
    let adopt_at: &'static [u32] = if plan.full {
        &[100_000, 1_000_000]
    } else {
        std::slice::from_ref(plan.sizes.last().expect("sizes"))
    };
    netns::in_netns(move |fs| {
        let fresh = fresh_opens(fs, plan.fresh);
        println!(
            "fresh dispatcher ready: median {:.2} ms of {} ({:?})",
            median_secs(&fresh) * 1e3,
            fresh.len(),
            fresh
        );
        for hide_btf in [false, true] {
            let first = first_opens(plan.fresh.min(5), hide_btf);
            println!(
                "fresh dispatcher, first of a process{}: median {:.2} ms of {} ({:?})",
                if hide_btf {
                    ", as the unit runs it"
                } else {
                    ""
                },
                median_secs(&first) * 1e3,
                first.len(),
                first
            );
        }
        let mut loaded = Loaded::open(fs);
        let mut took = Duration::ZERO;
        for &n in plan.sizes {
            took += loaded.grow_to(plan, (Workload::Bench, Family::V4), n, start);
            println!("load 0 → {n} bindings: {:.3} s", took.as_secs_f64());
            if adopt_at.contains(&n) {
                let t = loaded.adopt(fs);
                println!("adopt {n} bindings: {:.3} s", t.as_secs_f64());
            }
        }
        loaded.destroy();
    });
}

/// `SKACTIVATE_BENCH_ONLY=load`: loading each workload and family as the
/// phases do (no lookups, no reference), each step timed, then adopting the
/// largest; printed to stdout.
fn run_loads(plan: &'static Plan) {
    let start = Instant::now();
    for (workload, family) in [
        (Workload::Bench, Family::V4),
        (Workload::Bench, Family::V6),
        (Workload::Mixed, Family::V4),
        (Workload::Mixed, Family::V6),
    ] {
        netns::in_netns(move |fs| {
            let mut loaded = Loaded::open(fs);
            for &n in plan.sizes {
                let from = loaded.have;
                let took = loaded.grow_to(plan, (workload, family), n, start);
                println!(
                    "{} {} load {} → {}: {:.3} s",
                    workload.name(),
                    family_name(family),
                    count(from),
                    count(n),
                    took.as_secs_f64()
                );
            }
            let t = loaded.adopt(fs);
            println!(
                "{} {} adopt {}: {:.3} s",
                workload.name(),
                family_name(family),
                count(loaded.have),
                t.as_secs_f64()
            );
            loaded.destroy();
        });
    }
}

/// A "## The proxy" section another bench writes into BENCHMARKS.md: kept
/// as it is, after ours.
fn proxy_section(path: &Path) -> String {
    let Ok(old) = std::fs::read_to_string(path) else {
        return String::new();
    };
    match old.find("\n## The proxy") {
        Some(i) => {
            let rest = &old[i..];
            // Up to the next top-level section that is not the proxy's.
            let end = rest[1..].find("\n## ").map_or(rest.len(), |j| j + 1);
            rest[..end].to_owned()
        }
        None => String::new(),
    }
}
