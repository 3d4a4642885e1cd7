//! The daemon as it ships, measured: `skactivate.service` from `units/`
//! under a throwaway systemd (tests/common/systemd.rs), a socket unit whose
//! drop-in carries N bindings, registered by the generator's
//! `skactivate@.service` over the real system bus.
//!
//! Per size it reports the time from `systemctl start skactivate@bench.service`
//! until the daemon counts every binding, the daemon's resident memory
//! (`VmRSS` of its main process) with none and with N, the wakeups of all its
//! threads over an idle interval, and the time `systemctl restart
//! skactivate.service` takes (a new process adopting the pinned state; the
//! unit is `Type=notify`, so systemctl returns at `READY=1`) with the memory
//! after it.
//!
//! `cargo bench -p skactivate --bench daemon` (root) writes
//! BENCHMARKS-daemon.md, and with `SKACTIVATE_BENCH_JSON=FILE` the figures as
//! JSON; without `--bench` (as `cargo test --all-targets` runs it) it is a
//! smoke run of one small size that writes nothing.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::systemd::{ADMIN_UNITS, Systemd, poll_until};

/// Ports the bindings are spread over, as in the dispatcher bench's workload.
const PORTS: u32 = 16;

/// How long the daemon is watched for wakeups while nothing happens.
const IDLE: Duration = Duration::from_secs(5);

struct Row {
    bindings: u32,
    lines: u32,
    register_s: f64,
    rss_before: u64,
    rss: u64,
    idle_wakeups: u64,
    restart_s: f64,
    rss_after_restart: u64,
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes: &[u32] = if bench {
        &[1_000, 100_000, 1_000_000]
    } else {
        &[1_000]
    };
    let started = Instant::now();
    let Some(sd) = Systemd::boot() else {
        eprintln!("SKIP daemon bench: no throwaway systemd here (see above)");
        return;
    };
    sd.install_skactivate();
    sd.write_file(
        &format!("{ADMIN_UNITS}/bench.socket"),
        b"[Socket]\nListenStream=127.0.0.1:7999\n",
        0o644,
    );
    // systemd starts a socket only if it has a service to trigger.
    sd.write_file(
        &format!("{ADMIN_UNITS}/bench.service"),
        b"[Service]\nExecStart=/bin/true\n",
        0o644,
    );
    sd.ok(&["systemctl", "start", "skactivate.service"]);
    let idle_rss = rss(&sd);
    let idle_wakeups = wakeups_over(&sd, IDLE);

    let mut rows = Vec::new();
    for &n in sizes {
        rows.push(measure(&sd, n));
    }
    sd.down();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Daemon benchmarks\n\nWritten by `cargo bench -p skactivate --bench daemon` \
         (`skactivate/benches/daemon.rs`, root). Do not edit by hand: run it again.\n"
    );
    let _ = writeln!(
        out,
        "The shipped `skactivate.service` under a throwaway systemd (this host's systemd as \
         PID 1 of a fresh set of namespaces, the real dbus-daemon), driven as an \
         administrator would: a socket unit `bench.socket` whose drop-in has N \
         `X-SkLookup=tcp:198.18.A.B/32:PORT` lines (the dispatcher bench's workload: /32s from \
         198.18.0.0/15 on ports 8000–80{}, one binding per line, the most the daemon can be \
         asked to hold per binding), registered by the generator's \
         `skactivate@bench.service`.\n",
        PORTS - 1
    );
    let _ = writeln!(
        out,
        "* kernel: {}\n* CPUs: {}\n* load average at the end: {}\n* source: {}\n* bench took {:.1} s\n",
        read_trimmed("/proc/sys/kernel/osrelease"),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        read_trimmed("/proc/loadavg"),
        git_revision(),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        out,
        "Idle with no unit registered: {:.1} MiB resident, {idle_wakeups} wakeups in {} s.\n",
        mib(idle_rss),
        IDLE.as_secs()
    );
    let _ = writeln!(
        out,
        "* **register**: `systemctl start skactivate@bench.service` until the daemon's \
         `Bindings` property counts N (reading the unit files, resolving, loading the maps).\n\
         * **RSS**: `VmRSS` of the daemon's main process, before registering and with the N \
         bindings; after a restart, the new process's with the state it adopted.\n\
         * **idle wakeups**: voluntary and involuntary context switches of all its threads over \
         {} s with nothing happening, with the N bindings. The unit's `WatchdogSec=30s` wakes \
         it every 15 s by design (a ping to systemd), so a window may hold one such wakeup.\n\
         * **restart**: `systemctl restart skactivate.service` (stop, then a new process that \
         adopts the pinned state and says `READY=1`).\n\
         Targets (issue 10): ≤ 16 MiB resident with 100k bindings, ≤ 64 MiB with 1M; no \
         wakeups when idle; adopting 1M pinned bindings in ≤ 0.5 s.\n",
        IDLE.as_secs()
    );
    let _ = writeln!(
        out,
        "| bindings | lines | register (s) | RSS before (MiB) | RSS with them (MiB) | idle wakeups | restart (s) | RSS after restart (MiB) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.1} | {:.1} | {} | {:.2} | {:.1} |",
            r.bindings,
            r.lines,
            r.register_s,
            mib(r.rss_before),
            mib(r.rss),
            r.idle_wakeups,
            r.restart_s,
            mib(r.rss_after_restart)
        );
    }
    print!("{out}");
    if !bench {
        for r in &rows {
            assert!(r.rss > 0 && r.rss_after_restart > 0, "no VmRSS read");
        }
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS-daemon.md");
    fs::write(&path, &out).unwrap();
    eprintln!("written to {}", path.display());
    if let Some(json) = std::env::var_os("SKACTIVATE_BENCH_JSON") {
        let rows_json: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"bindings\": {}, \"register_s\": {:.4}, \"rss_before_bytes\": {}, \
                     \"rss_bytes\": {}, \"idle_wakeups\": {}, \"restart_s\": {:.4}, \
                     \"rss_after_restart_bytes\": {}}}",
                    r.bindings,
                    r.register_s,
                    r.rss_before,
                    r.rss,
                    r.idle_wakeups,
                    r.restart_s,
                    r.rss_after_restart
                )
            })
            .collect();
        let text = format!(
            "{{\"idle_rss_bytes\": {idle_rss}, \"idle_wakeups\": {idle_wakeups}, \"rows\": [{}]}}\n",
            rows_json.join(", ")
        );
        fs::write(&json, text).unwrap();
    }
}

/// Register `n` bindings through the unit files, measure, restart, measure,
/// and unregister them again.
fn measure(sd: &Systemd, n: u32) -> Row {
    let lines = n;
    let mut dropin = String::with_capacity(n as usize * 40);
    dropin.push_str("[Socket]\n");
    for i in 0..n {
        // 198.18.0.0/15 holds 131,072 addresses, 16 ports each: 2M bindings.
        let a = i / PORTS;
        let _ = writeln!(
            dropin,
            "X-SkLookup=tcp:198.{}.{}.{}/32:{}",
            18 + (a >> 16),
            (a >> 8) & 0xff,
            a & 0xff,
            8000 + i % PORTS
        );
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
    let idle_wakeups = wakeups_over(sd, IDLE);

    let t = Instant::now();
    sd.ok(&["systemctl", "restart", "skactivate.service"]);
    let restart_s = t.elapsed().as_secs_f64();
    // READY=1 comes after the pinned state is adopted. An adopted unit's
    // bindings are rebuilt from the map entries, the ports of one address
    // merged into a range, so the count is not compared.
    let adopted = sd.manager_property("Bindings");
    assert!(adopted.trim() != "u 0", "nothing adopted: {adopted}");
    let rss_after_restart = rss(sd);

    sd.ok(&["systemctl", "stop", "bench.socket"]);
    wait_bindings(sd, 0);
    Row {
        bindings: lines,
        lines,
        register_s,
        rss_before,
        rss: rss_with,
        idle_wakeups,
        restart_s,
        rss_after_restart,
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

fn rss(sd: &Systemd) -> u64 {
    let status = sd.ok(&["cat", &format!("/proc/{}/status", main_pid(sd))]);
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
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

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn read_trimmed(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}
