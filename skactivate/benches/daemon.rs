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
#[path = "shared/daemon.rs"]
mod daemon;

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::Instant;

use daemon::{IDLE, PORTS};

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    // SKACTIVATE_BENCH_SIZES=100000,… measures those sizes only and writes
    // no file (for a quick look while working); so does
    // SKACTIVATE_BENCH_FAMILY=ipv6 (IPv6 /128s on an IPv6 socket).
    let chosen: Option<Vec<u32>> = std::env::var("SKACTIVATE_BENCH_SIZES").ok().map(|v| {
        v.split(',')
            .map(|n| n.trim().parse().expect("a size"))
            .collect()
    });
    let sizes: &[u32] = match &chosen {
        Some(sizes) => sizes,
        None if bench => &[1_000, 100_000, 1_000_000],
        None => &[1_000],
    };
    let ipv6 = std::env::var("SKACTIVATE_BENCH_FAMILY").is_ok_and(|f| f == "ipv6");
    let started = Instant::now();
    let Some(daemon::Run {
        idle_rss,
        idle_wakeups,
        rows,
    }) = daemon::run(sizes)
    else {
        eprintln!("SKIP daemon bench: no throwaway systemd here (see above)");
        return;
    };

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
         `skactivate@bench.service`.{}\n",
        PORTS - 1,
        if ipv6 {
            " **This run: `SKACTIVATE_BENCH_FAMILY=ipv6`**, the lines \
             `X-SkLookup=tcp:[2001:db8::A:B]/128:PORT` on a socket listening on [::1]."
        } else {
            ""
        }
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
         * **RSS**: `VmRSS` of the daemon's main process: before registering (after the same N \
         bindings were registered once, by the generator's link, and unregistered), with the N \
         bindings; after a restart, the new process's with the state it adopted (the restart \
         must leave the `Bindings` count at N); after unregistering them (`systemctl stop \
         bench.socket`). **peak**: the daemon's `VmHWM` with the N bindings: the most its \
         process ever had resident, since it started (at the bench's start for the first \
         row, at the previous row's restart for the others), so mostly registering the N \
         bindings (reading the lines, resolving them, loading the maps), done twice by then. \
         It counts the dispatcher's `filter` and `cache` arrays while they are mapped to be \
         written: every page of such a mapping is resident, though the memory is the map's, \
         not the daemon's (the filter 2 MiB once the `entries` hash holds more than 65,536 \
         entries, the cache 64 bytes per entry rounded up to a power of two, up to 32 MiB: \
         10 MiB with 100k entries, 34 MiB with 1M; see ARCHITECTURE.md).\n\
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
        "| bindings | lines | register (s) | RSS before (MiB) | RSS with them (MiB) | peak (MiB) | idle wakeups | restart (s) | RSS after restart (MiB) | RSS after unregister (MiB) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {} | {:.2} | {:.1} | {:.1} |",
            r.bindings,
            r.lines,
            r.register_s,
            mib(r.rss_before),
            mib(r.rss),
            mib(r.peak),
            r.idle_wakeups,
            r.restart_s,
            mib(r.rss_after_restart),
            mib(r.rss_after_unregister)
        );
    }
    print!("{out}");
    if !bench || chosen.is_some() || ipv6 {
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
                     \"rss_bytes\": {}, \"peak_bytes\": {}, \"idle_wakeups\": {}, \"restart_s\": {:.4}, \
                     \"rss_after_restart_bytes\": {}, \"rss_after_unregister_bytes\": {}}}",
                    r.bindings,
                    r.register_s,
                    r.rss_before,
                    r.rss,
                    r.peak,
                    r.idle_wakeups,
                    r.restart_s,
                    r.rss_after_restart,
                    r.rss_after_unregister
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
