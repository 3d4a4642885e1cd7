//! `cargo bench -p skactivate --bench dispatcher`: what one lookup costs the
//! dispatcher, held against the budget of DESIGN.md ("Its budget"), and what
//! loading bindings costs. The table goes to stdout and to `BENCHMARKS.md` at
//! the repository root.
//!
//! Root only: like the netns tests, it unshares a network namespace on a thread
//! of its own and mounts a private bpffs, so nothing of the host is touched.
//!
//! Method. One dispatcher is grown through 1, 1k, 100k and 1M bindings (only the
//! new bindings are added at each step, in chunks, timed: that is the loading
//! figure). At each size every case is run with `BPF_PROG_TEST_RUN`, `REPEAT`
//! times per run; the kernel reports the mean ns per run; a case is `RUNS`
//! runs, each on another probe (another bound or unbound address), and the
//! reported figure is the median of the runs. Before a case is timed, one run
//! checks that the program answers as the case says (the listener's cookie for
//! a hit, a plain pass for a miss). The baseline is `ebpf/empty.bpf.c`, an
//! sk_lookup program that only returns `SK_PASS`, run the same way.
//!
//! IPv6 comes second, in a network namespace and dispatcher of its own (the
//! trie holds 2^20 entries: not room for 1M bindings of each family): the
//! same sizes, the same cases bar the wildcard ones, the same repeats, runs
//! and median, on bindings that mirror the IPv4 ones bit for bit at the end of
//! 2001:db8::/111. The design budgets IPv4 only; these rows get no verdict.
//!
//! Run without `--bench` (as `cargo test --benches` does) it is a smoke test:
//! small sizes, few repeats, no file written.

/// The netns tests' approach (tests/common), cut down to what a benchmark needs.
mod netns {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// A private bpffs instance mounted on a temporary directory, unmounted
    /// (taking every pin with it) when dropped.
    pub struct Bpffs {
        pub path: PathBuf,
    }

    impl Bpffs {
        fn mount() -> Bpffs {
            let path =
                std::env::temp_dir().join(format!("skactivate-bench-bpffs-{}", std::process::id()));
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

    /// Run `f` on a thread of its own in a fresh network namespace with `lo`
    /// up and a private bpffs; `None` (saying why) when the kernel has no
    /// sk_lookup.
    pub fn in_netns<T: Send + 'static>(f: impl FnOnce(&Bpffs) -> T + Send + 'static) -> Option<T> {
        if !skactivate::dispatcher::is_supported() {
            eprintln!("SKIP: kernel has no BPF sk_lookup (needs Linux >= 5.9)");
            return None;
        }
        let handle = std::thread::spawn(move || {
            // unshare acts on this thread only; it never returns to a pool.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            let out = Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .output()
                .expect("ip link set lo up");
            assert!(out.status.success(), "ip link set lo up: {out:?}");
            let fs = Bpffs::mount();
            f(&fs)
        });
        match handle.join() {
            Ok(v) => Some(v),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use aya::programs::SkLookup;
use ipnet::IpNet;
use skactivate::binding::{Binding, Destination, Family, Ports, Protocol};
use skactivate::dispatcher::{self, Dispatcher};

/// The baseline program, built from `ebpf/empty.bpf.c` by build.rs.
static EMPTY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/empty.bpf.o"));

/// Bulk bindings are TCP /32s drawn from 2^21 (port, address) pairs: the 2^17
/// addresses of 198.18.0.0/15 (set aside for benchmarks, RFC 2544) on 16 ports
/// from `FIRST_PORT`. BPF_PROG_TEST_RUN sends no packet: none of these
/// addresses ever appears on a wire.
const NET: u32 = 0xc612_0000;
/// The IPv6 bindings are /128s with the same 17 varying bits at the end of
/// 2001:db8::/111 (the documentation prefix, RFC 3849; again, a test run sends
/// no packet): the same trie shape as the IPv4 one, only with longer keys.
const NET6: u128 = 0x2001_0db8 << 96;
const ADDR_BITS: u32 = 17;
const PORT_BITS: u32 = 4;
const SPACE_BITS: u32 = ADDR_BITS + PORT_BITS;
const FIRST_PORT: u16 = 8000;
/// A port no binding has.
const UNBOUND_PORT: u16 = 22;
/// Where the listener itself is bound (no binding points at it).
const LISTEN: &str = "127.0.0.1:7999";
/// The IPv6 phase's listener: an IPv4 socket cannot take an IPv6 lookup.
const LISTEN6: &str = "[::1]:7999";

/// Binding `i` (for `i < 2^20`) and miss probe `j` (index `2^20 + j`) are
/// slots of one permutation of the 2^21 pairs, so that consecutive bindings
/// spread over the whole space and no miss probe is ever bound. The address
/// is the one of `family`'s range with these low bits.
fn slot(family: Family, i: u32) -> (IpAddr, u16) {
    const MASK: u32 = (1 << SPACE_BITS) - 1;
    // Odd multipliers and right xorshifts are bijections modulo 2^21.
    let mut x = i.wrapping_mul(0x9e37_79b1) & MASK;
    x ^= x >> 11;
    x = x.wrapping_mul(0x85eb_ca6b) & MASK;
    x ^= x >> 7;
    let host = x & ((1 << ADDR_BITS) - 1);
    let addr = match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(NET | host)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(NET6 | u128::from(host))),
    };
    let port = FIRST_PORT + u16::try_from(x >> ADDR_BITS).expect("PORT_BITS wide");
    (addr, port)
}

/// Binding `i`: a host prefix (/32 or /128) on one port.
fn binding(family: Family, i: u32) -> Binding {
    let (addr, port) = slot(family, i);
    let len = match family {
        Family::V4 => 32,
        Family::V6 => 128,
    };
    let net = IpNet::new(addr, len).expect("a host prefix is valid");
    Binding::new(Protocol::Tcp, net, Ports::single(port))
}

/// The first index no binding ever takes.
const MISS_BASE: u32 = 1 << 20;

/// The benchmark's scale: full, or a smoke test.
struct Plan {
    sizes: &'static [u32],
    repeat: u32,
    runs: usize,
    /// Bindings per `add_bindings` call while growing: one change each, as a
    /// big unit's registration would be.
    chunk: u32,
    write: bool,
}

const FULL: Plan = Plan {
    sizes: &[1, 1_000, 100_000, 1_000_000],
    repeat: 1_000_000,
    runs: 7,
    chunk: 100_000,
    write: true,
};

const SMOKE: Plan = Plan {
    sizes: &[1, 1_000],
    repeat: 10_000,
    runs: 3,
    chunk: 500,
    write: false,
};

/// Every loop checks this: the whole benchmark, loading included, takes well
/// under a minute here.
const DEADLINE: Duration = Duration::from_secs(600);

fn check_deadline(start: Instant, what: &str) {
    assert!(
        start.elapsed() < DEADLINE,
        "benchmark exceeded {DEADLINE:?} while {what}"
    );
}

/// What a probe must get before it is timed.
#[derive(Clone, Copy)]
enum Expect {
    /// Redirected to the socket with this cookie.
    Hit(u64),
    /// Passed on untouched.
    Pass,
}

/// One timed case: per-run means (ns), in run order.
struct Sample {
    runs: Vec<u32>,
}

impl Sample {
    fn sorted(&self) -> Vec<u32> {
        let mut v = self.runs.clone();
        v.sort_unstable();
        v
    }
    fn median(&self) -> u32 {
        let v = self.sorted();
        v[v.len() / 2]
    }
    fn min(&self) -> u32 {
        self.sorted()[0]
    }
    fn max(&self) -> u32 {
        *self.sorted().last().expect("at least one run")
    }
}

/// Time `prog` on `probes` (run `r` uses probe `r % len`).
fn measure(
    plan: &Plan,
    start: Instant,
    prog: BorrowedFd<'_>,
    probes: &[(IpAddr, u16)],
    expect: Expect,
) -> Sample {
    for &(addr, port) in probes {
        let r = dispatcher::test_run(prog, Protocol::Tcp, addr, port, 1).expect("test run");
        match expect {
            Expect::Hit(cookie) => assert!(
                r.retval == 1 && r.ctx_out.cookie == cookie,
                "{addr}:{port}: expected a redirect to cookie {cookie}, got retval {} cookie {}",
                r.retval,
                r.ctx_out.cookie
            ),
            Expect::Pass => assert!(
                r.retval == 1 && r.ctx_out.cookie == 0,
                "{addr}:{port}: expected a plain pass, got retval {} cookie {}",
                r.retval,
                r.ctx_out.cookie
            ),
        }
    }
    let mut runs = Vec::with_capacity(plan.runs);
    for r in 0..plan.runs {
        check_deadline(start, "timing lookups");
        let (addr, port) = probes[r % probes.len()];
        let out =
            dispatcher::test_run(prog, Protocol::Tcp, addr, port, plan.repeat).expect("test run");
        runs.push(out.duration_ns);
    }
    Sample { runs }
}

/// Bound (address, port) pairs spread over the first `n` bindings.
fn hit_probes(plan: &Plan, family: Family, n: u32) -> Vec<(IpAddr, u16)> {
    let k = u32::try_from(plan.runs).expect("few runs");
    (0..k)
        .map(|r| {
            slot(
                family,
                u64_to_u32(u64::from(n) * u64::from(2 * r + 1) / u64::from(2 * k)),
            )
        })
        .collect()
}

fn u64_to_u32(v: u64) -> u32 {
    u32::try_from(v).expect("index below 2^21")
}

/// Unbound addresses of the bulk range on ports that the first `n` bindings
/// use.
fn miss_probes(plan: &Plan, family: Family, n: u32) -> Vec<(IpAddr, u16)> {
    let used: HashSet<u16> = (0..n).map(|i| slot(family, i).1).collect();
    let out: Vec<_> = (MISS_BASE..MISS_BASE + 10_000)
        .map(|i| slot(family, i))
        .filter(|(_, p)| used.contains(p))
        .take(plan.runs)
        .collect();
    assert_eq!(out.len(), plan.runs, "no bound port to miss on");
    out
}

/// Addresses of the bulk range on a port no binding has.
fn unbound_port_probes(plan: &Plan, family: Family) -> Vec<(IpAddr, u16)> {
    (0..plan.runs)
        .map(|r| {
            let (a, _) = slot(family, u32::try_from(r).expect("few runs"));
            (a, UNBOUND_PORT)
        })
        .collect()
}

/// What the design's table says for a case.
#[derive(Clone, Copy)]
enum Budget {
    /// An absolute bound (ns).
    AtMost(u32),
    /// At most this fraction of tubular's figure.
    OfTubular(f64),
    /// At most this multiple of the empty program.
    OfEmpty(f64),
    /// Not budgeted: shown for context.
    None,
}

struct Row {
    case: String,
    sample: Sample,
    tubular: Option<u32>,
    demo: Option<u32>,
    budget: Budget,
}

impl Row {
    fn limit(&self, empty: u32) -> Option<f64> {
        match self.budget {
            Budget::AtMost(n) => Some(f64::from(n)),
            Budget::OfTubular(f) => self.tubular.map(|t| f * f64::from(t)),
            Budget::OfEmpty(f) => Some(f * f64::from(empty)),
            Budget::None => None,
        }
    }

    fn target_text(&self, empty: u32) -> String {
        match (self.budget, self.limit(empty)) {
            (Budget::AtMost(n), _) => format!("≤ {n}"),
            (Budget::OfTubular(f), Some(l)) => format!("≤ {l:.0} ({f}× tubular)"),
            (Budget::OfEmpty(f), Some(l)) => format!("≤ {l:.0} ({f}× empty)"),
            _ => "—".to_owned(),
        }
    }

    fn verdict(&self, empty: u32) -> String {
        match self.limit(empty) {
            Some(l) if f64::from(self.sample.median()) <= l => "meets".to_owned(),
            Some(l) => format!(
                "**misses** by {:.0} ns",
                f64::from(self.sample.median()) - l
            ),
            None => "(context)".to_owned(),
        }
    }

    /// The same check with each side's empty program taken off: ours as
    /// measured, the reference figures' as the design gives it.
    fn net_verdict(&self, empty: u32) -> String {
        let net = f64::from(self.sample.median()) - f64::from(empty);
        let limit = match self.budget {
            Budget::AtMost(_) | Budget::OfTubular(_) => {
                self.limit(empty).map(|l| l - f64::from(DESIGN_EMPTY_NS))
            }
            Budget::OfEmpty(_) => self.limit(empty).map(|l| l - f64::from(empty)),
            Budget::None => None,
        };
        match limit {
            Some(l) if net <= l => format!("meets ({net:.0} ≤ {l:.0})"),
            Some(l) => format!("**misses** ({net:.0} > {l:.0})"),
            None => "—".to_owned(),
        }
    }
}

/// The empty program's cost where the design's reference figures were taken.
const DESIGN_EMPTY_NS: u32 = 27;

/// Loading figures of one growth step.
struct Load {
    from: u32,
    to: u32,
    elapsed: Duration,
}

impl Load {
    fn us_per_entry(&self) -> f64 {
        self.elapsed.as_secs_f64() * 1e6 / f64::from(self.to - self.from)
    }
}

fn count(n: u32) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// The design's reference figures by size: (tubular, one-lookup demo).
fn reference_hit(n: u32) -> (Option<u32>, Option<u32>) {
    match n {
        1 => (Some(96), Some(122)),
        1_000 => (Some(205), Some(154)),
        100_000 => (Some(312), Some(211)),
        1_000_000 => (Some(354), Some(235)),
        _ => (None, None),
    }
}

fn reference_miss(n: u32) -> Option<(u32, u32)> {
    match n {
        1_000 => Some((182, 96)),
        1_000_000 => Some((335, 156)),
        _ => None,
    }
}

struct Results {
    rows: Vec<Row>,
    empty: u32,
    loads: Vec<Load>,
    adopt: Option<(u32, Duration)>,
    program_tag: String,
    /// Filled in by `main` once the IPv6 phase has run.
    v6: Option<V6Results>,
    /// The whole benchmark, both phases; set by `main`.
    total: Duration,
}

/// The IPv6 phase: rows (no budget) and its loading steps.
struct V6Results {
    rows: Vec<Row>,
    loads: Vec<Load>,
}

fn load_empty() -> aya::Ebpf {
    let mut ebpf = aya::Ebpf::load(EMPTY_OBJECT).expect("load empty.bpf.o");
    let prog: &mut SkLookup = ebpf
        .program_mut("skactivate_empty")
        .expect("program in empty.bpf.o")
        .try_into()
        .expect("an sk_lookup program");
    prog.load().expect("load the empty program");
    ebpf
}

fn empty_fd(ebpf: &aya::Ebpf) -> BorrowedFd<'_> {
    let prog: &SkLookup = ebpf
        .program("skactivate_empty")
        .expect("loaded")
        .try_into()
        .expect("an sk_lookup program");
    prog.fd().expect("loaded").as_fd()
}

/// A fresh dispatcher in the calling thread's namespace with one listener
/// registered as `bench.socket`.
struct Setup {
    /// Open for as long as the phase runs: the registered socket.
    _listener: TcpListener,
    cookie: u64,
    d: Dispatcher,
    dest: Destination,
    prog: std::os::fd::OwnedFd,
    program_tag: String,
}

fn setup(fs: &netns::Bpffs, listen: &str) -> Setup {
    let listener = TcpListener::bind(listen).expect("listen");
    let cookie = dispatcher::socket::socket_cookie(listener.as_fd()).expect("SO_COOKIE");
    let mut d = Dispatcher::open(netns::thread_netns(), &fs.path).expect("open dispatcher");
    let regs = d
        .register_sockets("bench.socket", &[listener.as_fd()])
        .expect("register the listener");
    let dest: Destination = regs[0].0.clone();
    let program_tag = d.program().expect("program info").tag_hex();
    let prog = {
        // The dispatcher's own program, through the public test-run entry.
        let id = d.program().expect("program info").id;
        prog_fd_by_id(id)
    };
    Setup {
        _listener: listener,
        cookie,
        d,
        dest,
        prog,
        program_tag,
    }
}

/// Grow `s.d` through `plan.sizes` with `family`'s bindings (timed into
/// `loads`) and, at each size, time the hit, the misses at 1k and 1M (any
/// size for a smoke test's last one) and, at the last size, the miss on a
/// port with no binding. IPv4 rows carry the design's budget, IPv6 rows none.
/// Returns the number of bindings loaded.
fn grow(
    plan: &Plan,
    start: Instant,
    family: Family,
    s: &mut Setup,
    rows: &mut Vec<Row>,
    loads: &mut Vec<Load>,
) -> u32 {
    let v4 = family == Family::V4;
    let mut have = 0u32;
    for &n in plan.sizes {
        let step = Instant::now();
        while have < n {
            check_deadline(start, "loading bindings");
            let upto = n.min(have + plan.chunk);
            let items: Vec<(Binding, Destination)> = (have..upto)
                .map(|i| (binding(family, i), s.dest.clone()))
                .collect();
            let changes = s.d.add_bindings(&items).expect("add bindings");
            assert_eq!(changes.added, items.len());
            have = upto;
        }
        if n > 1 {
            loads.push(Load {
                from: loads.last().map_or(1, |l: &Load| l.to),
                to: n,
                elapsed: step.elapsed(),
            });
        }

        let (tubular, demo) = if v4 { reference_hit(n) } else { (None, None) };
        rows.push(Row {
            case: format!("hit, {} binding{}", count(n), if n == 1 { "" } else { "s" }),
            sample: measure(
                plan,
                start,
                s.prog.as_fd(),
                &hit_probes(plan, family, n),
                Expect::Hit(s.cookie),
            ),
            tubular,
            demo,
            budget: match (v4, n) {
                (false, _) => Budget::None,
                (true, 1) => Budget::AtMost(90),
                (true, _) => Budget::OfTubular(0.7),
            },
        });
        if let Some((tubular, demo)) = reference_miss(n) {
            rows.push(Row {
                case: format!("miss, {} bindings (bound port)", count(n)),
                sample: measure(
                    plan,
                    start,
                    s.prog.as_fd(),
                    &miss_probes(plan, family, n),
                    Expect::Pass,
                ),
                tubular: v4.then_some(tubular),
                demo: v4.then_some(demo),
                budget: if v4 {
                    Budget::OfTubular(0.5)
                } else {
                    Budget::None
                },
            });
        }
        if n == *plan.sizes.last().expect("sizes") {
            rows.push(Row {
                case: format!("miss, {} bindings, port with no binding", count(n)),
                sample: measure(
                    plan,
                    start,
                    s.prog.as_fd(),
                    &unbound_port_probes(plan, family),
                    Expect::Pass,
                ),
                tubular: None,
                demo: None,
                budget: if v4 {
                    Budget::OfEmpty(2.0)
                } else {
                    Budget::None
                },
            });
        }
    }
    have
}

fn run_all(plan: &Plan, fs: &netns::Bpffs, start: Instant) -> Results {
    let mut s = setup(fs, LISTEN);

    let empty_obj = load_empty();
    let empty_sample = measure(
        plan,
        start,
        empty_fd(&empty_obj),
        &unbound_port_probes(plan, Family::V4),
        Expect::Pass,
    );
    let empty = empty_sample.median();
    let mut rows = vec![Row {
        case: "empty `SK_PASS` program (baseline)".to_owned(),
        sample: empty_sample,
        tubular: None,
        demo: None,
        budget: Budget::None,
    }];

    let mut loads = Vec::new();
    let have = grow(plan, start, Family::V4, &mut s, &mut rows, &mut loads);

    // Context, not budget: once the protocol has a `*` binding, no port is
    // unbound any more and every lookup walks the trie's wildcard part.
    let wild = Binding::new(
        Protocol::Tcp,
        "192.0.2.1/32".parse().expect("prefix"),
        Ports::All,
    );
    s.d.add_bindings(&[(wild, s.dest.clone())])
        .expect("add a wildcard binding");
    let n = have;
    rows.push(Row {
        case: format!("miss, {} bindings + one `*` binding, bound port", count(n)),
        sample: measure(
            plan,
            start,
            s.prog.as_fd(),
            &miss_probes(plan, Family::V4, n),
            Expect::Pass,
        ),
        tubular: None,
        demo: None,
        budget: Budget::None,
    });
    rows.push(Row {
        case: format!(
            "miss, {} bindings + one `*` binding, port with no binding",
            count(n)
        ),
        sample: measure(
            plan,
            start,
            s.prog.as_fd(),
            &unbound_port_probes(plan, Family::V4),
            Expect::Pass,
        ),
        tubular: None,
        demo: None,
        budget: Budget::None,
    });

    // A restarted daemon adopts the pinned state and reads the trie back;
    // the first handle goes first, as its process would (one writer).
    let program_tag = s.program_tag.clone();
    drop(s);
    let t = Instant::now();
    let again = Dispatcher::open(netns::thread_netns(), &fs.path).expect("adopt");
    let adopt = Some((n + 1, t.elapsed()));
    drop(again);
    Results {
        rows,
        empty,
        loads,
        adopt,
        program_tag,
        v6: None,
        total: start.elapsed(),
    }
}

/// The IPv6 phase, in a namespace of its own: the same growth and cases as
/// the IPv4 one, without the wildcard rows and the adoption.
fn run_v6(plan: &Plan, fs: &netns::Bpffs, start: Instant) -> V6Results {
    let mut s = setup(fs, LISTEN6);
    let mut rows = Vec::new();
    let mut loads = Vec::new();
    grow(plan, start, Family::V6, &mut s, &mut rows, &mut loads);
    V6Results { rows, loads }
}

/// The dispatcher's program by id (the bench runs it like `lookup` does, but
/// needs the fd to time it on arbitrary probes).
fn prog_fd_by_id(id: u32) -> std::os::fd::OwnedFd {
    dispatcher::sys::prog_fd_by_id(id).expect("BPF_PROG_GET_FD_BY_ID")
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
    // "YYYY-MM-DD HH:MM:SS UTC" without the seconds.
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

fn fmt_opt(v: Option<u32>) -> String {
    v.map_or_else(|| "—".to_owned(), |v| v.to_string())
}

fn report(plan: &Plan, r: &Results, root: &Path) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Written by `cargo bench -p skactivate --bench dispatcher` (root; \
         `skactivate/benches/dispatcher.rs`). Do not edit by hand: run it again.\n"
    );
    let _ = writeln!(w, "## Machine\n");
    let _ = writeln!(w, "* date: {}", now_utc());
    let _ = writeln!(
        w,
        "* kernel: {}",
        read_trimmed("/proc/sys/kernel/osrelease")
    );
    let _ = writeln!(w, "* CPU: {}", cpu_model());
    let _ = writeln!(
        w,
        "* nproc: {}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    let _ = writeln!(
        w,
        "* load average at the end: {}",
        read_trimmed("/proc/loadavg")
    );
    let _ = writeln!(
        w,
        "* source: {}; program tag {}",
        git_revision(root),
        r.program_tag
    );
    let _ = writeln!(w, "* bench took {:.1} s\n", r.total.as_secs_f64());

    let _ = writeln!(w, "## Lookup cost (ns per run, `BPF_PROG_TEST_RUN`)\n");
    let _ = writeln!(
        w,
        "Median of {} runs of {} repeats each (min–max in brackets); each run \
         probes another address. tubular and the one-lookup demo are the design's \
         figures (DESIGN.md, \"Its budget\", same kernel series), not measured \
         here.\n",
        plan.runs, plan.repeat
    );
    let _ = writeln!(
        w,
        "| case | skactivate | tubular | one-lookup demo | target | verdict | net of the empty program |"
    );
    let _ = writeln!(w, "| --- | ---: | ---: | ---: | --- | --- | --- |");
    for row in &r.rows {
        let _ = writeln!(
            w,
            "| {} | **{}** ({}–{}) | {} | {} | {} | {} | {} |",
            row.case,
            row.sample.median(),
            row.sample.min(),
            row.sample.max(),
            fmt_opt(row.tubular),
            fmt_opt(row.demo),
            row.target_text(r.empty),
            row.verdict(r.empty),
            row.net_verdict(r.empty),
        );
    }
    let _ = writeln!(
        w,
        "\nThe empty program costs {} ns here and ~{DESIGN_EMPTY_NS} ns where the \
         reference figures were taken, so the plain verdict may flatter us by the \
         difference. The last column holds each side to the budget net of its own \
         empty program: ours minus {} ns against the target minus \
         {DESIGN_EMPTY_NS} ns (for the 2× empty row: against one empty program).",
        r.empty, r.empty
    );

    if let Some(v6) = &r.v6 {
        report_v6(plan, r, v6, w);
    }

    let _ = writeln!(w, "\n## Loading\n");
    let _ = writeln!(
        w,
        "`Dispatcher::add_bindings`, one call per {} new bindings, growing one \
         dispatcher (the entries of a change go in sorted in trie order, 4096 \
         per `BPF_MAP_UPDATE_BATCH`); the design's reference is ~4 µs per \
         entry, one `BPF_MAP_UPDATE_ELEM` each.\n",
        plan.chunk
    );
    let _ = writeln!(w, "| step | entries | time | µs per entry |");
    let _ = writeln!(w, "| --- | ---: | ---: | ---: |");
    let mut total = Duration::ZERO;
    let mut entries = 0;
    for l in &r.loads {
        total += l.elapsed;
        entries += l.to - l.from;
        let _ = writeln!(
            w,
            "| {} → {} | {} | {:.2} s | {:.2} |",
            count(l.from),
            count(l.to),
            l.to - l.from,
            l.elapsed.as_secs_f64(),
            l.us_per_entry()
        );
    }
    if entries > 0 {
        let _ = writeln!(
            w,
            "| **1 → {}** | {} | {:.2} s | **{:.2}** |",
            count(r.loads.last().map_or(0, |l| l.to)),
            entries,
            total.as_secs_f64(),
            total.as_secs_f64() * 1e6 / f64::from(entries)
        );
    }
    if let Some((n, t)) = r.adopt {
        let _ = writeln!(
            w,
            "\nAdopting the pinned state again (`Dispatcher::open`, which reads \
             the whole trie back into the index) with {n} entries: {:.2} s.",
            t.as_secs_f64()
        );
    }

    let _ = writeln!(w, "\n## Workload\n");
    let _ = writeln!(
        w,
        "* One TCP listener (`{LISTEN}`) registered as `bench.socket`; every \
         binding points at it.\n\
         * Bindings are TCP /32s, one port each, drawn by a fixed permutation \
         from 2^{SPACE_BITS} (port, address) pairs: 198.18.0.0/15 (RFC 2544's \
         benchmarking range; test runs send no packet) on ports {FIRST_PORT}–{}. \
         The trie therefore grows evenly, about log2(N) levels deep.\n\
         * hit: a bound (address, port); miss (bound port): an address of the \
         same range that no binding covers, on a port that has bindings; port \
         with no binding: port {UNBOUND_PORT}.\n\
         * No `*` binding exists until the last two rows, which add one \
         (tcp:192.0.2.1/32:*) to show what the miss path costs once the \
         protocol has a wildcard.",
        FIRST_PORT + (1 << PORT_BITS) - 1
    );
    s
}

/// Loading steps in total: (entries, time).
fn load_total(loads: &[Load]) -> (u32, Duration) {
    loads.iter().fold((0, Duration::ZERO), |(n, t), l| {
        (n + l.to - l.from, t + l.elapsed)
    })
}

/// The IPv6 section: its table beside the IPv4 figures of the same cases,
/// why the difference, how it was loaded and what it ran on.
fn report_v6(plan: &Plan, r: &Results, v6: &V6Results, w: &mut String) {
    let _ = writeln!(w, "\n## IPv6 (not budgeted by the design)\n");
    let _ = writeln!(
        w,
        "The same cases measured the same way (median of {} runs of {} \
         repeats each, min–max in brackets; each run probes another address), \
         on IPv6 bindings, in a second network namespace with a dispatcher of \
         its own (the trie holds 2^20 entries: no room for 1M bindings of each \
         family). DESIGN.md budgets IPv4 only, so there is no verdict; the IPv4 \
         column repeats the table above.\n",
        plan.runs, plan.repeat
    );
    let _ = writeln!(w, "| case | IPv6 | IPv4 (above) | IPv6 − IPv4 |");
    let _ = writeln!(w, "| --- | ---: | ---: | ---: |");
    let v4_of = |case: &str| {
        r.rows
            .iter()
            .find(|row| row.case == case)
            .map(|row| row.sample.median())
    };
    for row in &v6.rows {
        let v6_ns = row.sample.median();
        let v4_ns = v4_of(&row.case);
        let _ = writeln!(
            w,
            "| {} | **{}** ({}–{}) | {} | {} |",
            row.case,
            v6_ns,
            row.sample.min(),
            row.sample.max(),
            fmt_opt(v4_ns),
            v4_ns.map_or_else(
                || "—".to_owned(),
                |v4| format!("{:+}", i64::from(v6_ns) - i64::from(v4))
            ),
        );
    }
    let gap = |case: String| {
        let v6 = v6.rows.iter().find(|row| row.case == case)?.sample.median();
        Some(i64::from(v6) - i64::from(v4_of(&case)?))
    };
    let first = *plan.sizes.first().expect("sizes");
    let last = *plan.sizes.last().expect("sizes");
    let (Some(gap_first), Some(gap_last), Some(gap_miss)) = (
        gap(format!(
            "hit, {} binding{}",
            count(first),
            if first == 1 { "" } else { "s" }
        )),
        gap(format!("hit, {} bindings", count(last))),
        gap(format!("miss, {} bindings (bound port)", count(last))),
    ) else {
        return;
    };
    let _ = writeln!(
        w,
        "\nWhy IPv6 costs more: the address bytes compared at each trie node. \
         A key is the same 20 bytes for both families: protocol, port and \
         family (4 bytes), then 16 address bytes, IPv4 in the first 4. At each \
         node on the way down the kernel compares the node's prefix with the \
         key, the first 8 bytes at once and then 4 at a time, never past the \
         node's prefix length. An IPv4 prefix ends within those first 8 bytes: \
         one compare per node. Here every IPv6 node that splits on the address \
         (all but the few port levels at the top) is at least 32 + 111 bits \
         long, as the bindings share 2001:db8::/111: the 8-byte compare and \
         three 4-byte ones. Both tries have the same shape (see the workload below), so the gap \
         is that extra work times the depth, about log2(N) levels: a hit costs \
         {:+} ns with {} binding{} and {:+} ns at {}. A miss on a bound port \
         costs {:+} ns at that size{}. The miss on a port with no binding \
         is answered by the `ports` array before the key is even built, so the \
         family makes no difference there. Bindings that differ higher up in \
         the address (/64s, say) would need fewer 4-byte compares at the upper \
         nodes (not measured here): these are the long-key case.",
        gap_first,
        count(first),
        if first == 1 { "" } else { "s" },
        gap_last,
        count(last),
        gap_miss,
        if gap_miss > gap_last {
            ", more than a hit: the compares alone do not say why, and this \
             bench does not look into it"
        } else {
            ""
        },
    );
    let (entries, time) = load_total(&v6.loads);
    if entries > 0 {
        let _ = writeln!(
            w,
            "\nLoading them (`Dispatcher::add_bindings`, one call per {} new \
             bindings, as for IPv4): 1 → {} in {:.2} s, {:.2} µs per entry.",
            plan.chunk,
            count(last),
            time.as_secs_f64(),
            time.as_secs_f64() * 1e6 / f64::from(entries)
        );
    }
    let _ = writeln!(
        w,
        "\nWorkload: one TCP listener (`{LISTEN6}`) registered as \
         `bench.socket` in that namespace. IPv6 binding i is TCP, a /128 on \
         IPv4 binding i's port, its address IPv4 binding i's low {ADDR_BITS} \
         bits under 2001:db8::/111 (RFC 3849's documentation prefix; a test \
         run sends no packet), so the trie grows exactly as the IPv4 one; the \
         probes are the IPv4 probes moved the same way. No `*` binding."
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let plan = if full { &FULL } else { &SMOKE };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the dispatcher benchmark needs root: it unshares a network namespace");
        std::process::exit(1);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_owned();
    let start = Instant::now();
    let Some(mut results) = netns::in_netns(move |fs| run_all(plan, fs, start)) else {
        return;
    };
    // Its own namespace and dispatcher: the IPv4 phase's are gone by now.
    results.v6 = netns::in_netns(move |fs| run_v6(plan, fs, start));
    results.total = start.elapsed();
    let text = report(plan, &results, &root);
    println!("{text}");
    if plan.write {
        let path = root.join("BENCHMARKS.md");
        std::fs::write(&path, &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("wrote {}", path.display());
    }
}
