//! The shipped daemon's footprint, measured where it ships: `skactivate.service`
//! from `units/` under a throwaway systemd (tests/common/systemd.rs), a socket
//! unit whose drop-in carries N bindings, registered by the generator's
//! `skactivate@.service` over the real system bus.
//!
//! Shared by the daemon bench (`benches/daemon.rs`, which writes
//! BENCHMARKS-daemon.md) and the dispatcher bench (`benches/dispatcher.rs`,
//! whose `daemon_rss_*` figures are these). The including bench declares
//! `mod common` (tests/common) at its root.

#![allow(dead_code, reason = "each bench reads a different part")]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::common::systemd::{ADMIN_UNITS, Systemd, poll_until};

/// Ports the bindings are spread over, as in the dispatcher bench's workload.
pub const PORTS: u32 = 16;

/// How long the daemon is watched for wakeups while nothing happens.
pub const IDLE: Duration = Duration::from_secs(5);

/// One size, measured.
pub struct Row {
    pub bindings: u32,
    pub lines: u32,
    pub register_s: f64,
    /// After the same bindings were registered once and unregistered.
    pub rss_before: u64,
    /// With the N bindings registered.
    pub rss: u64,
    /// The most the daemon ever had resident until then (`VmHWM`): reading
    /// and resolving the N lines (twice: the first registration too).
    pub peak: u64,
    pub idle_wakeups: u64,
    pub restart_s: f64,
    pub rss_after_restart: u64,
    /// After they were unregistered again (`systemctl stop bench.socket`).
    pub rss_after_unregister: u64,
}

/// One run: the idle daemon, then each size in turn.
pub struct Run {
    pub idle_rss: u64,
    pub idle_wakeups: u64,
    pub rows: Vec<Row>,
}

/// Boot a throwaway systemd, start the shipped daemon and measure it with
/// each of `sizes` bindings. `None` (said on stderr) where no throwaway
/// systemd can run.
pub fn run(sizes: &[u32]) -> Option<Run> {
    let sd = Systemd::boot()?;
    sd.install_skactivate();
    // SKACTIVATE_BENCH_FAMILY=ipv6: IPv6 /128s and an IPv6 socket instead.
    let listen: &[u8] = if ipv6() {
        b"[Socket]\nListenStream=[::1]:7999\n"
    } else {
        b"[Socket]\nListenStream=127.0.0.1:7999\n"
    };
    sd.write_file(&format!("{ADMIN_UNITS}/bench.socket"), listen, 0o644);
    // systemd starts a socket only if it has a service to trigger.
    sd.write_file(
        &format!("{ADMIN_UNITS}/bench.service"),
        b"[Service]\nExecStart=/bin/true\n",
        0o644,
    );
    sd.ok(&["systemctl", "start", "skactivate.service"]);
    let idle_rss = rss(&sd);
    let idle_wakeups = wakeups_over(&sd, IDLE);
    let rows = sizes.iter().map(|&n| measure(&sd, n)).collect();
    sd.down();
    Some(Run {
        idle_rss,
        idle_wakeups,
        rows,
    })
}

/// Whether `SKACTIVATE_BENCH_FAMILY=ipv6` asks for the bindings in IPv6.
fn ipv6() -> bool {
    std::env::var("SKACTIVATE_BENCH_FAMILY").is_ok_and(|f| f == "ipv6")
}

/// Register `n` bindings through the unit files, measure, restart, measure,
/// and unregister them again.
fn measure(sd: &Systemd, n: u32) -> Row {
    let lines = n;
    let mut dropin = String::with_capacity(n as usize * 40);
    dropin.push_str("[Socket]\n");
    let v6 = ipv6();
    for i in 0..n {
        // 198.18.0.0/15 holds 131,072 addresses, 16 ports each: 2M bindings.
        let a = i / PORTS;
        let _ = if v6 {
            writeln!(
                dropin,
                "X-SkLookup=tcp:[2001:db8::{:x}:{:x}]/128:{}",
                a >> 16,
                a & 0xffff,
                8000 + i % PORTS
            )
        } else {
            writeln!(
                dropin,
                "X-SkLookup=tcp:198.{}.{}.{}/32:{}",
                18 + (a >> 16),
                (a >> 8) & 0xff,
                a & 0xff,
                8000 + i % PORTS
            )
        };
    }
    sd.write_file(
        &format!("{ADMIN_UNITS}/bench.socket.d/sklookup.conf"),
        dropin.as_bytes(),
        0o644,
    );
    sd.daemon_reload();
    sd.ok(&["systemctl", "start", "bench.socket"]);
    // The generator's link made bench.socket want its registration; let
    // that run end before timing one of our own.
    wait_bindings(sd, n);
    sd.ok(&["skactivate", "unregister", "bench.socket"]);
    wait_bindings(sd, 0);
    let rss_before = rss(sd);

    let t = Instant::now();
    sd.ok(&["systemctl", "start", "skactivate@bench.service"]);
    wait_bindings(sd, n);
    let register_s = t.elapsed().as_secs_f64();
    let rss_with = rss(sd);
    let peak = status_kib(sd, "VmHWM:") * 1024;
    let idle_wakeups = wakeups_over(sd, IDLE);

    let t = Instant::now();
    sd.ok(&["systemctl", "restart", "skactivate.service"]);
    let restart_s = t.elapsed().as_secs_f64();
    // READY=1 comes after the pinned state is adopted; the unit counts the
    // bindings it wrote, as before the restart.
    let adopted = sd.manager_property("Bindings");
    assert_eq!(
        adopted.trim(),
        format!("u {n}"),
        "the restart changed the count"
    );
    let rss_after_restart = rss(sd);
    if std::env::var_os("SKACTIVATE_BENCH_JOURNAL").is_some() {
        // Where a restart goes: the daemon's own lines, timestamped.
        let _ = sd.exec(&["journalctl", "--sync"]);
        let out = sd.exec(&[
            "journalctl",
            "--no-pager",
            "-q",
            "-b",
            "-o",
            "short-precise",
            "-n",
            "14",
            "-u",
            "skactivate.service",
        ]);
        eprintln!(
            "restart at {n} bindings:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    sd.ok(&["systemctl", "stop", "bench.socket"]);
    wait_bindings(sd, 0);
    let rss_after_unregister = rss(sd);
    Row {
        bindings: lines,
        lines,
        register_s,
        rss_before,
        rss: rss_with,
        peak,
        idle_wakeups,
        restart_s,
        rss_after_restart,
        rss_after_unregister,
    }
}

fn main_pid(sd: &Systemd) -> String {
    let pid = sd.property("skactivate.service", "MainPID");
    assert!(
        pid != "0" && !pid.is_empty(),
        "skactivate.service is not running"
    );
    pid
}

/// `VmRSS` of the daemon's main process (bytes).
fn rss(sd: &Systemd) -> u64 {
    status_kib(sd, "VmRSS:") * 1024
}

/// A `kB` line of the daemon's `/proc/PID/status`.
fn status_kib(sd: &Systemd, field: &str) -> u64 {
    let status = sd.ok(&["cat", &format!("/proc/{}/status", main_pid(sd))]);
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// Context switches of every thread of the daemon over `d`.
fn wakeups_over(sd: &Systemd, d: Duration) -> u64 {
    let pid = main_pid(sd);
    let count = || -> u64 {
        let out = sd.ok(&[
            "sh",
            "-c",
            &format!("cat /proc/{pid}/task/*/status | grep ctxt_switches"),
        ]);
        out.lines()
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum()
    };
    let before = count();
    std::thread::sleep(d);
    count().saturating_sub(before)
}

fn wait_bindings(sd: &Systemd, n: u32) {
    let want = format!("u {n}");
    assert!(
        poll_until(Duration::from_secs(300), || sd
            .manager_property("Bindings")
            .trim()
            == want),
        "the daemon never counted {n} bindings: {}\n{}",
        sd.manager_property("Bindings"),
        sd.journal("skactivate.service")
    );
}
