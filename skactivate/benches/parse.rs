//! `cargo bench -p skactivate --bench parse`: what reading and matching a
//! unit's `X-SkLookup=` values costs as the values on one line grow, in the
//! daemon (unit files read and resolved in process, as a registration or a
//! reload does) and in `skactivate check` (the binary, end to end). The table
//! goes to stdout and to `BENCHMARKS-parse.md` at the repository root.
//!
//! Method. For each size N a unit tree is written under a temporary root:
//! `x.socket` with `ListenStream=80` and a drop-in with ONE line of N values.
//! Two workloads: N distinct /32 prefixes drawn from 198.18.0.0/15 (the port
//! is the socket's), and N distinct ports of one prefix (every value a clash
//! candidate of every other, the worst case for the duplicate check). Each
//! case runs `RUNS` times, sizes interleaved round by round, and the median
//! is reported, with the cost per value; the last column is that cost
//! relative to the smallest size measured in the same run, so the machine's
//! speed drops out: linear parsing keeps it near 1.
//!
//! Run without `--bench` (as `cargo test --benches` does) it is a smoke test:
//! small sizes, one run, no file written.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skactivate::config;
use skactivate::unit::SocketUnit;

const RUNS: usize = 5;

#[derive(Clone, Copy)]
enum Workload {
    /// N distinct /32 prefixes, the socket's port.
    Prefixes,
    /// One prefix, N distinct ports.
    Ports,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Prefixes => "distinct /32 prefixes",
            Workload::Ports => "one prefix, distinct ports",
        }
    }

    fn line(self, n: usize) -> String {
        let mut line = String::from("X-SkLookup=");
        for i in 0..n {
            match self {
                Workload::Prefixes => {
                    let a = 198u32 << 24 | 18 << 16 | i as u32;
                    let [o1, o2, o3, o4] = a.to_be_bytes();
                    let _ = write!(line, "{o1}.{o2}.{o3}.{o4} ");
                }
                Workload::Ports => {
                    let _ = write!(line, "192.0.2.0/24:{} ", i + 1);
                }
            }
        }
        line.push('\n');
        line
    }
}

/// A unit tree under a fresh temporary root, removed when dropped.
struct Tree {
    root: PathBuf,
    dropin: PathBuf,
}

impl Tree {
    fn new(workload: Workload, n: usize) -> Tree {
        let root = std::env::temp_dir().join(format!(
            "skactivate-bench-parse-{}-{n}-{}",
            std::process::id(),
            workload as u8
        ));
        let units = root.join("etc/systemd/system");
        fs::create_dir_all(units.join("x.socket.d")).unwrap();
        fs::write(units.join("x.socket"), "[Socket]\nListenStream=80\n").unwrap();
        let dropin = units.join("x.socket.d/sklookup.conf");
        fs::write(&dropin, format!("[Socket]\n{}", workload.line(n))).unwrap();
        Tree { root, dropin }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// What the daemon does with a unit's files: read them, match the values
/// to the sockets. Returns the number of bindings.
fn daemon_resolve(tree: &Tree) -> usize {
    let unit = SocketUnit::from_paths(
        &tree.root,
        "x.socket",
        Path::new("/etc/systemd/system/x.socket"),
        &[tree
            .dropin
            .strip_prefix(&tree.root)
            .map(|p| Path::new("/").join(p))
            .unwrap()],
    )
    .unwrap();
    let (listens, _) = config::listen_sockets(&unit);
    let sockets: Vec<config::Socket> = listens.iter().map(|l| l.socket).collect();
    let (items, problems) = config::resolve_bindings(&unit, &sockets);
    assert!(problems.is_empty(), "{:?}", problems.first());
    items.len()
}

/// `skactivate check --root ROOT x.socket`, output discarded.
fn check_binary(tree: &Tree) {
    let status = Command::new(env!("CARGO_BIN_EXE_skactivate"))
        .args(["check", "--root"])
        .arg(&tree.root)
        .arg("x.socket")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (sizes, runs): (&[usize], usize) = if bench {
        (&[1_000, 10_000, 100_000], RUNS)
    } else {
        (&[100, 1_000], 1)
    };
    let started = Instant::now();
    let mut rows = Vec::new();
    for workload in [Workload::Prefixes, Workload::Ports] {
        // 65535 ports at most on one prefix.
        let sizes: Vec<usize> = match workload {
            Workload::Prefixes => sizes.to_vec(),
            Workload::Ports => sizes.iter().map(|&n| n.min(65_535)).collect(),
        };
        let trees: Vec<Tree> = sizes.iter().map(|&n| Tree::new(workload, n)).collect();
        let mut daemon = vec![Vec::new(); sizes.len()];
        let mut check = vec![Vec::new(); sizes.len()];
        for _ in 0..runs {
            for (i, tree) in trees.iter().enumerate() {
                let t = Instant::now();
                assert_eq!(daemon_resolve(tree), sizes[i]);
                daemon[i].push(t.elapsed());
                let t = Instant::now();
                check_binary(tree);
                check[i].push(t.elapsed());
            }
        }
        let daemon: Vec<Duration> = daemon.into_iter().map(median).collect();
        let check: Vec<Duration> = check.into_iter().map(median).collect();
        let per = |d: Duration, n: usize| d.as_nanos() as f64 / n as f64;
        for (i, &n) in sizes.iter().enumerate() {
            for (what, d) in [
                ("daemon: read + resolve", &daemon),
                ("`skactivate check`", &check),
            ] {
                rows.push(format!(
                    "| {} | {what} | {n} | {:.1} | {:.0} | {:.2} |",
                    workload.name(),
                    d[i].as_secs_f64() * 1e3,
                    per(d[i], n),
                    per(d[i], n) / per(d[0], sizes[0]),
                ));
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Parsing benchmarks\n\nWritten by `cargo bench -p skactivate --bench parse` \
         (`skactivate/benches/parse.rs`). Do not edit by hand: run it again.\n"
    );
    let _ = writeln!(
        out,
        "* kernel: {}\n* nproc: {}\n* runs per case: {runs} (median), sizes interleaved\n* bench took {:.1} s\n",
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        out,
        "N values on one `X-SkLookup=` line. \"per value vs smallest\" is the cost per value \
         relative to the smallest N of the same workload and path in this run: near 1 means linear.\n"
    );
    let _ = writeln!(
        out,
        "| workload | path | values | ms (median) | ns per value | per value vs smallest |\n| --- | --- | ---: | ---: | ---: | ---: |"
    );
    for r in &rows {
        let _ = writeln!(out, "{r}");
    }
    print!("{out}");
    if bench {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS-parse.md");
        fs::write(&path, &out).unwrap();
        eprintln!("written to {}", path.display());
    }
}
