//! skactivate end to end under a real systemd: the installed binary, the real
//! `units/`, the generator, the real dbus-daemon and busctl, and real traffic
//! into the throwaway system's own network namespace. Each test boots its own
//! systemd (tests/common/systemd.rs) and leaves nothing behind.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::systemd::{ADMIN_UNITS, SETTLE, Systemd, http_ask, poll_until};
use common::{tcp_refused, udp_ask};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// What `busctl` says `ListBindings` returns.
fn list_bindings(sd: &Systemd) -> String {
    sd.manager_call("ListBindings", &[])
}

/// Wait until `binding` of `unit` is registered (registration runs after
/// `systemctl start` returns).
fn wait_bound(sd: &Systemd, binding: &str, unit: &str) {
    let needle = format!("\"{binding}\" \"{unit}\"");
    assert!(
        poll_until(SETTLE, || sd
            .busctl(&[
                "--system",
                "call",
                "org.skactivate1",
                "/org/skactivate1",
                "org.skactivate1.Manager",
                "ListBindings"
            ])
            .stdout
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())),
        "{binding} of {unit} never registered:\n{}\n{}\n{}",
        list_bindings(sd),
        sd.status(&format!(
            "skactivate@{}.service",
            unit.trim_end_matches(".socket")
        )),
        sd.journal("skactivate.service")
    );
}

/// `Lookup` through busctl: `ssst "redirect" "unit" "binding" cookie`.
fn lookup(sd: &Systemd, address: &str, port: u16) -> String {
    let port = port.to_string();
    sd.manager_call("Lookup", &["ssq", "tcp", address, &port])
}

fn wait_unbound(sd: &Systemd, unit: &str) {
    let needle = format!("\"{unit}\"");
    assert!(
        poll_until(SETTLE, || !list_bindings(sd).contains(&needle)),
        "{unit} still has bindings:\n{}\n{}",
        list_bindings(sd),
        sd.journal("skactivate.service")
    );
}

fn boot() -> Option<Systemd> {
    let sd = Systemd::boot()?;
    sd.install_skactivate();
    sd.local_route("192.0.2.0/24");
    sd.local_route("198.51.100.0/24");
    Some(sd)
}

/// The main job: one X-SkLookup= line in a drop-in, the generator does the
/// rest, and all 256 addresses of the prefix reach the socket-activated
/// service; the same for UDP.
#[test]
fn dropin_alone_serves_a_whole_prefix_through_socket_activation() {
    let Some(sd) = boot() else { return };
    // The generator wired the socket unit up.
    let wants = sd.property("webserver.socket", "Wants");
    assert!(
        wants.contains("skactivate@webserver.service"),
        "Wants={wants}"
    );
    let post = sd.property("webserver.socket", "ExecStopPost");
    assert!(
        post.contains("/usr/bin/skactivate") && post.contains("unregister"),
        "ExecStopPost={post}"
    );

    sd.ok(&["systemctl", "start", "webserver.socket", "echo-udp.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
    wait_bound(&sd, "udp:198.51.100.0/24:5353", "echo-udp.socket");
    // Registration did not start the service: the first connection will.
    assert_eq!(sd.active_state("webserver.service"), "inactive");
    assert_eq!(
        sd.active_state("skactivate@webserver.service"),
        "inactive",
        "the template must not stay active"
    );
    assert_eq!(sd.active_state("skactivate.service"), "active");

    let failures = sd.in_netns(|| {
        let mut failures = Vec::new();
        for i in 0..=255u8 {
            let to = SocketAddr::new(std::net::Ipv4Addr::new(192, 0, 2, i).into(), 80);
            match http_ask(to) {
                Ok(name) if name == "webserver" => {}
                other => failures.push(format!("{to}: {other:?}")),
            }
        }
        for i in 0..=255u8 {
            let to = SocketAddr::new(std::net::Ipv4Addr::new(198, 51, 100, i).into(), 5353);
            match udp_ask(to) {
                Ok(name) if name == "echo-udp" => {}
                other => failures.push(format!("{to}: {other:?}")),
            }
        }
        // Neither another port nor another prefix is taken.
        if !tcp_refused(addr("192.0.2.1:81")) {
            failures.push("192.0.2.1:81 answered".into());
        }
        failures
    });
    assert!(
        failures.is_empty(),
        "{} failed: {failures:#?}",
        failures.len()
    );
    assert_eq!(
        sd.active_state("webserver.service"),
        "active",
        "socket-activated by the first connection"
    );
    assert_eq!(sd.active_state("echo-udp.service"), "active");

    // The journal carries the unit and its bindings as fields.
    sd.ok(&["journalctl", "--sync"]);
    let fields = sd.ok(&[
        "journalctl",
        "--no-pager",
        "-o",
        "verbose",
        "SKACTIVATE_UNIT=webserver.socket",
    ]);
    assert!(
        fields.contains("SKACTIVATE_BINDING=tcp:192.0.2.0/24:80"),
        "{fields}"
    );
    // The daemon reports it all.
    let status = sd.status("skactivate.service");
    assert!(
        status.contains("2 units, 2 bindings, 2 sockets"),
        "{status}"
    );
}

#[test]
fn stopping_the_socket_removes_its_bindings_and_starting_restores_them() {
    let Some(sd) = boot() else { return };
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
    assert_eq!(
        sd.in_netns(|| http_ask(addr("192.0.2.7:80")).unwrap()),
        "webserver"
    );

    sd.ok(&["systemctl", "stop", "webserver.socket"]);
    wait_unbound(&sd, "webserver.socket");
    assert!(
        sd.in_netns(|| tcp_refused(addr("192.0.2.7:80"))),
        "the prefix is refused once the socket stopped"
    );

    sd.ok(&["systemctl", "start", "webserver.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
    assert_eq!(
        sd.in_netns(|| http_ask(addr("192.0.2.7:80")).unwrap()),
        "webserver"
    );
}

/// A socket unit that goes away without anyone calling `unregister` (no
/// generator drop-in: registered by hand with --sklookup) loses its bindings:
/// the daemon follows systemd.
#[test]
fn the_daemon_follows_socket_units_nobody_unregisters() {
    let Some(sd) = boot() else { return };
    sd.write_file(
        &format!("{ADMIN_UNITS}/lone.socket"),
        b"[Socket]\nListenStream=127.0.0.1:8088\n",
        0o644,
    );
    // systemd starts a socket only if it has a service to trigger.
    sd.write_file(
        &format!("{ADMIN_UNITS}/lone.service"),
        b"[Service]\nExecStart=/bin/true\n",
        0o644,
    );
    sd.write_file(
        &format!("{ADMIN_UNITS}/lone-register.service"),
        b"[Unit]\nRequires=skactivate.service\nAfter=skactivate.service\n\
          [Service]\nType=oneshot\nSockets=lone.socket\n\
          ExecStart=/usr/bin/skactivate register lone.socket --sklookup 203.0.113.0/24\n",
        0o644,
    );
    sd.daemon_reload();
    sd.ok(&["systemctl", "start", "lone.socket"]);
    sd.ok(&["systemctl", "start", "lone-register.service"]);
    wait_bound(&sd, "tcp:203.0.113.0/24:8088", "lone.socket");
    sd.ok(&["systemctl", "stop", "lone.socket"]);
    wait_unbound(&sd, "lone.socket");
    let journal = sd.journal("skactivate.service");
    assert!(
        journal.contains("lone.socket") && journal.contains("unregistered"),
        "{journal}"
    );
}

#[test]
fn restarting_the_daemon_loses_no_connection() {
    let Some(sd) = boot() else { return };
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
    let pid_before = sd.property("skactivate.service", "MainPID");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let errors = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let (stop2, ok2, failed2, errors) = (stop.clone(), ok.clone(), failed.clone(), &errors);
        let sd = &sd;
        s.spawn(move || {
            sd.in_netns(|| {
                let start = Instant::now();
                let mut i = 0u32;
                while !stop2.load(Ordering::Relaxed)
                    && start.elapsed() < Duration::from_secs(60)
                    && i < 20_000
                {
                    let to = SocketAddr::new(
                        std::net::Ipv4Addr::new(192, 0, 2, (i % 256) as u8).into(),
                        80,
                    );
                    match http_ask(to) {
                        Ok(n) if n == "webserver" => {
                            ok2.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed2.fetch_add(1, Ordering::Relaxed);
                            errors.lock().unwrap().push(format!("{to}: {other:?}"));
                        }
                    }
                    i += 1;
                }
            });
        });
        assert!(
            poll_until(SETTLE, || ok.load(Ordering::Relaxed) >= 50),
            "the loop runs"
        );
        for _ in 0..3 {
            sd.ok(&["systemctl", "restart", "skactivate.service"]);
            let seen = ok.load(Ordering::Relaxed);
            assert!(
                poll_until(SETTLE, || ok.load(Ordering::Relaxed) >= seen + 50),
                "the loop goes on"
            );
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_ne!(
        sd.property("skactivate.service", "MainPID"),
        pid_before,
        "the daemon was restarted"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed connections: {:?}",
        errors.lock().unwrap()
    );
    assert!(ok.load(Ordering::Relaxed) >= 200);
    // The restarted daemon adopted the unit and still answers for it.
    assert!(list_bindings(&sd).contains("\"tcp:192.0.2.0/24:80\" \"webserver.socket\""));
    let units = sd.manager_property("Units");
    assert_eq!(units.trim(), "u 1");
}

/// A bad directive: the registration fails, `systemctl status` of the
/// template and the journal name the file, the line and the reason, and
/// nothing of the unit is registered.
#[test]
fn a_bad_directive_is_reported_with_file_and_line_and_registers_nothing() {
    let Some(sd) = boot() else { return };
    let dropin = format!("{ADMIN_UNITS}/webserver.socket.d/sklookup.conf");
    sd.write_file(
        &dropin,
        b"[Socket]\nX-SkLookup=198.51.100.0/24:80\nX-SkLookup=192.0.2.0/33:80\n",
        0o644,
    );
    sd.daemon_reload();
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    assert!(
        poll_until(SETTLE, || sd
            .property("skactivate@webserver.service", "Result")
            == "exit-code"),
        "{}",
        sd.status("skactivate@webserver.service")
    );
    let wanted = format!("{dropin}:3");
    // The client's stderr reaches the journal, and status, asynchronously.
    let status_with_log = || {
        let out = sd.systemctl(&[
            "status",
            "--no-pager",
            "--full",
            "--lines=20",
            "skactivate@webserver.service",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    poll_until(SETTLE, || status_with_log().contains(&wanted));
    let status = status_with_log();
    let journal = sd.journal("skactivate@webserver.service");
    for text in [&status, &journal] {
        assert!(
            text.contains(&format!("{dropin}:3")),
            "no file:line in:\n{text}"
        );
        assert!(
            text.contains("192.0.2.0/33:80") && text.contains("prefix length 33 is longer than 32"),
            "{text}"
        );
    }
    assert!(
        !list_bindings(&sd).contains("webserver.socket"),
        "{}",
        list_bindings(&sd)
    );
    // The socket itself is still up: the service behind it is reached as before.
    assert_eq!(sd.active_state("webserver.socket"), "active");
}

#[test]
fn reload_applies_the_difference_and_keeps_old_bindings_on_a_bad_edit() {
    let Some(sd) = boot() else { return };
    let dropin = format!("{ADMIN_UNITS}/webserver.socket.d/sklookup.conf");
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");

    sd.write_file(&dropin, b"[Socket]\nX-SkLookup=192.0.2.0/25:80\n", 0o644);
    sd.daemon_reload();
    sd.ok(&["systemctl", "reload", "skactivate.service"]);
    let listed = list_bindings(&sd);
    assert!(
        listed.contains("\"tcp:192.0.2.0/25:80\"") && !listed.contains("/24"),
        "{listed}"
    );
    assert_eq!(
        sd.in_netns(|| http_ask(addr("192.0.2.1:80")).ok())
            .as_deref(),
        Some("webserver")
    );
    // 192.0.2.200 left the binding: the live program passes it to the kernel's
    // own lookup (which finds webserver.socket's [::]:80 as for any local address).
    assert!(
        lookup(&sd, "192.0.2.200", 80).starts_with("ssst \"pass\""),
        "{}",
        lookup(&sd, "192.0.2.200", 80)
    );
    assert!(
        lookup(&sd, "192.0.2.1", 80)
            .contains("\"redirect\" \"webserver.socket\" \"tcp:192.0.2.0/25:80\"")
    );

    // A bad edit: the reload fails and says why; the old bindings stay in force.
    sd.refused_reload(&dropin, "Socket", "192.0.2.0/25:8o");
    assert!(list_bindings(&sd).contains("\"tcp:192.0.2.0/25:80\""));
    assert_eq!(
        sd.in_netns(|| http_ask(addr("192.0.2.1:80")).ok())
            .as_deref(),
        Some("webserver")
    );
    assert_eq!(sd.active_state("skactivate.service"), "active");
}

#[test]
fn busctl_sees_org_skactivate1() {
    let Some(sd) = boot() else { return };
    // D-Bus activation starts the daemon on the first call.
    let version = sd.manager_property("Version");
    assert_eq!(
        version.trim(),
        format!("s \"{}\"", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(sd.active_state("skactivate.service"), "active");
    let names = sd.ok(&["busctl", "--system", "--no-pager", "list"]);
    assert!(names.contains("org.skactivate1"), "{names}");
    let intro = sd.ok(&[
        "busctl",
        "--system",
        "--no-pager",
        "introspect",
        "org.skactivate1",
        "/org/skactivate1",
    ]);
    for member in [
        "RegisterSockets",
        "UnregisterUnit",
        "Reload",
        "ListUnits",
        "ListBindings",
        "Lookup",
        "UnitRegistered",
    ] {
        assert!(intro.contains(member), "{member} missing:\n{intro}");
    }
    let attached = sd.manager_property("Attached");
    assert_eq!(attached.trim(), "b true");
    // The pinned state is where the design says, in the system's own bpffs:
    // one directory per network namespace (named by its inode) beside the
    // writers' locks.
    let ls = sd.ok(&["ls", "/sys/fs/bpf/skactivate"]);
    let mut names: Vec<&str> = ls.lines().collect();
    names.sort_unstable();
    assert_eq!(names.len(), 2, "{ls}");
    assert!(names[0].parse::<u64>().is_ok(), "{ls}");
    assert_eq!(names[1], "locks", "{ls}");
}

/// With a short WatchdogSec= the daemon lives on by its own pings: systemd
/// would kill it two seconds after a missed one.
#[test]
fn the_daemon_keeps_the_watchdog_fed() {
    let Some(sd) = boot() else { return };
    sd.write_file(
        &format!("{ADMIN_UNITS}/skactivate.service.d/watchdog.conf"),
        b"[Service]\nWatchdogSec=2s\n",
        0o644,
    );
    sd.daemon_reload();
    sd.ok(&["systemctl", "start", "skactivate.service"]);
    assert_eq!(sd.property("skactivate.service", "WatchdogUSec"), "2s");
    let pid = sd.property("skactivate.service", "MainPID");
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(sd.active_state("skactivate.service"), "active");
    assert_eq!(
        sd.property("skactivate.service", "MainPID"),
        pid,
        "not restarted"
    );
    assert_eq!(sd.property("skactivate.service", "NRestarts"), "0");
    let journal = sd.journal("skactivate.service");
    assert!(!journal.contains("Watchdog timeout"), "{journal}");
}

/// Ask systemd whether it has `unit` loaded: `GetUnit` fails with NoSuchUnit
/// once an inactive unit has been unloaded.
fn systemd_has_loaded(sd: &Systemd, unit: &str) -> bool {
    sd.busctl(&[
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "GetUnit",
        "s",
        unit,
    ])
    .status
    .success()
}

/// The daemon-down case: a socket unit stops (and systemd unloads it) while
/// the daemon is stopped, so no one unregisters it. When the daemon is back
/// its bindings are gone, and traffic for the prefix reaches the ordinary
/// sockets that would get it, instead of being dropped for a socket that is
/// gone. A reload finds nothing left either.
#[test]
fn a_socket_unit_that_stopped_while_the_daemon_was_down_loses_its_bindings() {
    let Some(sd) = boot() else { return };
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");

    sd.ok(&["systemctl", "stop", "skactivate.service"]);
    sd.ok(&["systemctl", "stop", "webserver.socket"]);
    // Unloaded, as systemd does with an inactive unit nothing refers to.
    assert!(
        poll_until(SETTLE, || !systemd_has_loaded(&sd, "webserver.socket")),
        "systemd keeps webserver.socket loaded: {}",
        sd.status("webserver.socket")
    );
    // Nobody unregistered it: the dispatcher still drops its traffic.
    let ordinary = sd.in_netns(|| {
        let server = common::tcp_server("ordinary", "192.0.2.7:80", false);
        let dropped = tcp_refused(addr("192.0.2.7:80"));
        server.close();
        dropped
    });
    assert!(
        ordinary,
        "the stale binding takes the prefix while the daemon is down"
    );

    sd.ok(&["systemctl", "start", "skactivate.service"]);
    let listed = list_bindings(&sd);
    assert!(!listed.contains("webserver.socket"), "{listed}");
    assert_eq!(sd.manager_property("Units").trim(), "u 0");
    let reached = sd.in_netns(|| {
        let server = common::tcp_server("ordinary", "192.0.2.7:80", false);
        let r = common::tcp_ask(addr("192.0.2.7:80"));
        server.close();
        r
    });
    assert_eq!(
        reached.as_deref().ok(),
        Some("ordinary"),
        "{reached:?}\n{}",
        sd.journal("skactivate.service")
    );
    let journal = sd.journal("skactivate.service");
    assert!(
        journal.contains("webserver.socket") && journal.contains("not loaded"),
        "{journal}"
    );
    sd.ok(&["systemctl", "reload", "skactivate.service"]);
    assert_eq!(sd.manager_property("Units").trim(), "u 0");
}

/// A real connection into webserver.socket's prefix reaches the web server,
/// and the dispatcher counts it as a lookup of the unit.
fn served_through_the_dispatcher(sd: &Systemd) {
    let lookups = || {
        let p = sd.unit_property("webserver.socket", "Lookups");
        p.trim()
            .strip_prefix("t ")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("Lookups: {p:?}"))
    };
    let before = lookups();
    assert_eq!(
        sd.in_netns(|| http_ask(addr("192.0.2.7:80")).ok())
            .as_deref(),
        Some("webserver"),
        "{}",
        sd.journal("skactivate.service")
    );
    assert!(
        lookups() > before,
        "the connection did not go through the dispatcher"
    );
}

/// An active socket unit with `X-SkLookup=` whose registration was lost
/// while the daemon was down (its pinned state removed) is registered again
/// when the daemon starts: the daemon starts its `skactivate@.service`, and
/// the prefix reaches the socket again.
#[test]
fn an_active_socket_unit_whose_registration_was_lost_is_registered_on_start() {
    let Some(sd) = boot() else { return };
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");

    sd.ok(&["systemctl", "stop", "skactivate.service"]);
    sd.ok(&["rm", "-r", "/sys/fs/bpf/skactivate"]);
    assert_eq!(sd.active_state("webserver.socket"), "active");

    sd.ok(&["systemctl", "start", "skactivate.service"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
    served_through_the_dispatcher(&sd);
    assert_eq!(sd.manager_property("Units").trim(), "u 1");
    let journal = sd.journal("skactivate.service");
    assert!(
        journal.contains("webserver.socket: active with X-SkLookup= but not registered: started skactivate@webserver.service"),
        "{journal}"
    );
}

/// On Reload the same holds for a unit unregistered by hand while its
/// socket stays active; an active socket unit whose directives are bad is
/// not started, and its cause is logged once however often one reloads.
#[test]
fn reload_registers_active_socket_units_that_are_not_registered() {
    let Some(sd) = boot() else { return };
    sd.write_file(
        &format!("{ADMIN_UNITS}/lone.socket"),
        b"[Socket]\nListenStream=127.0.0.1:8088\nX-SkLookup=198.51.100.0/24:8o\n",
        0o644,
    );
    sd.write_file(
        &format!("{ADMIN_UNITS}/lone.service"),
        b"[Service]\nExecStart=/bin/true\n",
        0o644,
    );
    sd.daemon_reload();
    sd.ok(&["systemctl", "start", "webserver.socket", "lone.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");

    sd.ok(&["/usr/bin/skactivate", "unregister", "webserver.socket"]);
    wait_unbound(&sd, "webserver.socket");
    assert_eq!(sd.active_state("webserver.socket"), "active");

    let restarts = |journal: &str| {
        journal
            .matches("webserver.socket: active with X-SkLookup= but not registered")
            .count()
    };
    // Also at start, which raced with the socket's own registration job.
    let before = restarts(&sd.journal("skactivate.service"));
    for _ in 0..2 {
        sd.ok(&["systemctl", "reload", "skactivate.service"]);
        wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
        served_through_the_dispatcher(&sd);
    }
    assert!(!list_bindings(&sd).contains("lone.socket"));
    assert_eq!(sd.manager_property("Units").trim(), "u 1");
    let journal = sd.journal("skactivate.service");
    let skipped = journal
        .lines()
        .filter(|l| {
            l.contains("lone.socket") && l.contains("8o") && l.ends_with(": not registered")
        })
        .count();
    assert_eq!(skipped, 1, "{journal}");
    assert_eq!(restarts(&journal), before + 1, "{journal}");
}

/// A second `skactivate daemon`, run by hand next to the service: it exits
/// non-zero at once naming the holder, and changes nothing — the service
/// keeps `org.skactivate1`, its program and its bindings, and registering
/// and `status` still work.
///
/// The holder named by the dispatcher's lock (taken before any change) comes
/// with the lock; without it the bus name's owner is named.
#[test]
fn a_second_daemon_exits_at_once_and_changes_nothing() {
    let Some(sd) = boot() else { return };
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
    let pid = sd.property("skactivate.service", "MainPID");
    let program = sd.manager_property("ProgramId");
    let owner = || {
        sd.busctl(&["status", "org.skactivate1"])
            .stdout
            .split(|&b| b == b'\n')
            .find_map(|l| {
                std::str::from_utf8(l)
                    .ok()?
                    .strip_prefix("PID=")
                    .map(str::to_owned)
            })
    };
    assert_eq!(owner().as_deref(), Some(pid.as_str()));

    let started = Instant::now();
    let out = sd.exec(&["timeout", "20", "/usr/bin/skactivate", "daemon"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the second daemon waited {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains(&format!("pid {pid}")),
        "holder not named: {stderr}"
    );
    assert_eq!(stderr.matches("pid ").count(), 1, "said once: {stderr}");

    // The service keeps its name, its program and its bindings.
    assert_eq!(owner().as_deref(), Some(pid.as_str()));
    assert_eq!(sd.active_state("skactivate.service"), "active");
    assert_eq!(sd.property("skactivate.service", "MainPID"), pid);
    assert_eq!(sd.manager_property("ProgramId"), program);
    assert_eq!(
        sd.in_netns(|| http_ask(addr("192.0.2.7:80")).ok())
            .as_deref(),
        Some("webserver")
    );
    // Registering and status still work, within the bus's timeout.
    sd.ok(&["systemctl", "start", "echo-udp.socket"]);
    wait_bound(&sd, "udp:198.51.100.0/24:5353", "echo-udp.socket");
    let status = sd.ok(&["timeout", "10", "/usr/bin/skactivate", "status"]);
    assert!(status.contains("echo-udp.socket"), "{status}");
}

/// lone.socket (no X-SkLookup= in its files) with a oneshot that registers
/// it with --sklookup values, as tests above do.
fn install_lone(sd: &Systemd) {
    sd.write_file(
        &format!("{ADMIN_UNITS}/lone.socket"),
        b"[Socket]\nListenStream=127.0.0.1:8088\n",
        0o644,
    );
    sd.write_file(
        &format!("{ADMIN_UNITS}/lone.service"),
        b"[Service]\nExecStart=/bin/true\n",
        0o644,
    );
    sd.write_file(
        &format!("{ADMIN_UNITS}/lone-register.service"),
        b"[Unit]\nRequires=skactivate.service\nAfter=skactivate.service\n\
          [Service]\nType=oneshot\nSockets=lone.socket\n\
          ExecStart=/usr/bin/skactivate register lone.socket --sklookup 203.0.113.0/24\n",
        0o644,
    );
    sd.daemon_reload();
}

/// A unit registered with --sklookup keeps its origin, its sockets'
/// addresses and its registration time across a daemon restart, and a
/// reload after the restart keeps its bindings.
#[test]
fn an_inline_unit_survives_a_restart_and_a_reload() {
    let Some(sd) = boot() else { return };
    install_lone(&sd);
    sd.ok(&["systemctl", "start", "lone.socket"]);
    sd.ok(&["systemctl", "start", "lone-register.service"]);
    wait_bound(&sd, "tcp:203.0.113.0/24:8088", "lone.socket");
    let props = |sd: &Systemd| {
        ["Source", "Sockets", "RegisteredAt", "Bindings"]
            .map(|p| sd.unit_property("lone.socket", p))
    };
    let before = props(&sd);
    assert_eq!(before[0].trim(), "s \"inline\"");
    assert!(before[1].contains("127.0.0.1:8088"), "{}", before[1]);

    sd.ok(&["systemctl", "restart", "skactivate.service"]);
    assert_eq!(props(&sd), before, "the restart changed what is shown");
    sd.ok(&["systemctl", "reload", "skactivate.service"]);
    assert!(
        list_bindings(&sd).contains("\"tcp:203.0.113.0/24:8088\" \"lone.socket\""),
        "{}\n{}",
        list_bindings(&sd),
        sd.journal("skactivate.service")
    );
    assert_eq!(props(&sd), before, "the reload changed what is shown");
    let status = sd.ok(&["skactivate", "status", "lone.socket"]);
    assert!(status.contains("127.0.0.1:8088"), "{status}");
}

/// An inline registration may not replace a registration from unit files,
/// nor the other way round, without unregistering first.
#[test]
fn a_registration_does_not_replace_one_of_the_other_origin() {
    let Some(sd) = boot() else { return };
    install_lone(&sd);
    // Inline first; then the unit-file registration is refused.
    sd.ok(&["systemctl", "start", "lone.socket"]);
    sd.ok(&["systemctl", "start", "lone-register.service"]);
    wait_bound(&sd, "tcp:203.0.113.0/24:8088", "lone.socket");
    let out = sd.systemctl(&["start", "skactivate@lone.service"]);
    assert!(!out.status.success());
    let journal = sd.journal("skactivate@lone.service");
    assert!(
        journal.contains("lone.socket: registered with --sklookup values")
            && journal.contains("unregister it first"),
        "{journal}"
    );
    assert!(list_bindings(&sd).contains("\"tcp:203.0.113.0/24:8088\" \"lone.socket\""));

    // From unit files first; then an inline registration is refused.
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
    sd.write_file(
        &format!("{ADMIN_UNITS}/web-inline.service"),
        b"[Service]\nType=oneshot\nSockets=webserver.socket\n\
          ExecStart=/usr/bin/skactivate register webserver.socket --sklookup 198.51.100.0/24\n",
        0o644,
    );
    sd.daemon_reload();
    let out = sd.systemctl(&["start", "web-inline.service"]);
    assert!(!out.status.success());
    let journal = sd.journal("web-inline.service");
    assert!(
        journal.contains("webserver.socket: registered from its unit files")
            && journal.contains("unregister it first"),
        "{journal}"
    );
    let listed = list_bindings(&sd);
    assert!(
        listed.contains("\"tcp:192.0.2.0/24:80\" \"webserver.socket\"")
            && !listed.contains("198.51.100"),
        "{listed}"
    );
    // Unregistered first, the other kind is accepted.
    sd.ok(&["skactivate", "unregister", "webserver.socket"]);
    sd.ok(&["systemctl", "start", "web-inline.service"]);
    wait_bound(&sd, "tcp:198.51.100.0/24:80", "webserver.socket");
}

/// Introspection of every object is well-formed XML to a real parser and
/// to GDBus, as well as to busctl.
#[test]
fn introspection_is_well_formed_for_gdbus_and_an_xml_parser() {
    let Some(sd) = boot() else { return };
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
    let unit = skactivate::dbus::unit_path("webserver.socket");
    for path in ["/org/skactivate1", unit.as_str()] {
        let xml = sd.ok(&[
            "busctl",
            "--system",
            "introspect",
            "--xml-interface",
            "org.skactivate1",
            path,
        ]);
        let parsed = sd.exec_input(
            &[
                "python3",
                "-c",
                "import sys, xml.etree.ElementTree as E; \
                 r = E.fromstring(sys.stdin.buffer.read()); \
                 print(' '.join(i.get('name') for i in r.iter('interface')))",
            ],
            Some(xml.as_bytes()),
        );
        assert!(
            parsed.status.success(),
            "{path}: {}\n{xml}",
            String::from_utf8_lossy(&parsed.stderr)
        );
        let gdbus = sd.ok(&[
            "gdbus",
            "introspect",
            "--system",
            "--dest",
            "org.skactivate1",
            "--object-path",
            path,
        ]);
        let iface = if path == "/org/skactivate1" {
            "org.skactivate1.Manager"
        } else {
            "org.skactivate1.Unit"
        };
        assert!(
            String::from_utf8_lossy(&parsed.stdout).contains(iface) && gdbus.contains(iface),
            "{path}:\n{gdbus}"
        );
    }
}

/// Count what the pinned maps of the instance's netns hold, with the daemon
/// stopped: (trie bindings, destinations, record chunks).
fn pinned_entries(sd: &Systemd) -> (usize, usize, usize) {
    let netns = std::path::PathBuf::from(format!("/proc/{}/ns/net", sd.pid()));
    let bpffs = std::path::PathBuf::from(format!("/proc/{}/root/sys/fs/bpf", sd.pid()));
    let d = skactivate::dispatcher::Dispatcher::open(&netns, &bpffs).expect("pinned state");
    (
        d.bindings().unwrap().len(),
        d.destinations().unwrap().len(),
        d.unit_record_chunks().unwrap(),
    )
}

fn daemon_fds(sd: &Systemd) -> usize {
    let pid = sd.property("skactivate.service", "MainPID");
    sd.ok(&["ls", &format!("/proc/{pid}/fd")]).lines().count()
}

/// Churn: a socket unit started and stopped again and again, with the
/// daemon stopped and killed in between, ends with nothing stale in the
/// maps, and the daemon's fd count stays flat.
#[test]
fn churn_leaves_no_stale_entries_and_no_fds() {
    let Some(sd) = boot() else { return };
    sd.ok(&["systemctl", "start", "skactivate.service"]);
    for round in 0..12 {
        sd.ok(&["systemctl", "start", "webserver.socket"]);
        wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
        match round % 3 {
            0 => {
                // Stopped while the daemon is down.
                sd.ok(&["systemctl", "stop", "skactivate.service"]);
                sd.ok(&["systemctl", "stop", "webserver.socket"]);
                sd.ok(&["systemctl", "start", "skactivate.service"]);
            }
            1 => {
                // The daemon killed (Restart=on-failure brings it back).
                let pid = sd.property("skactivate.service", "MainPID");
                sd.ok(&["systemctl", "kill", "--signal=KILL", "skactivate.service"]);
                sd.ok(&["systemctl", "stop", "webserver.socket"]);
                assert!(
                    poll_until(SETTLE, || {
                        sd.active_state("skactivate.service") == "active"
                            && sd.property("skactivate.service", "MainPID") != pid
                    }),
                    "{}",
                    sd.status("skactivate.service")
                );
            }
            _ => {
                sd.ok(&["systemctl", "stop", "webserver.socket"]);
            }
        }
        wait_unbound(&sd, "webserver.socket");
    }
    // The daemon alone now: its fd count does not grow with the churn.
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
    sd.ok(&["systemctl", "stop", "webserver.socket"]);
    wait_unbound(&sd, "webserver.socket");
    let fds = daemon_fds(&sd);
    for _ in 0..10 {
        sd.ok(&["systemctl", "start", "webserver.socket"]);
        wait_bound(&sd, "tcp:192.0.2.0/24:80", "webserver.socket");
        sd.ok(&["systemctl", "stop", "webserver.socket"]);
        wait_unbound(&sd, "webserver.socket");
    }
    assert_eq!(daemon_fds(&sd), fds, "the daemon's fd count grew");
    assert_eq!(sd.manager_property("Units").trim(), "u 0");
    sd.ok(&["systemctl", "stop", "skactivate.service"]);
    assert_eq!(pinned_entries(&sd), (0, 0, 0), "stale entries in the maps");
}

/// A socket template whose drop-in carries `X-SkLookup=`: every instance
/// started wants its own registration (`skactivate@tmpl@8091.service`, an
/// instance string may hold `@`) through the generator's template drop-in,
/// each is registered with its own port, each serves the prefix, and one
/// stopping leaves the other in place. The instance names exist nowhere in the
/// search path: the generator never saw them.
#[test]
fn socket_template_instances_are_each_registered_and_served() {
    let Some(sd) = boot() else { return };
    sd.local_route("203.0.113.0/24");
    sd.write_file(
        &format!("{ADMIN_UNITS}/tmpl@.socket"),
        b"[Socket]\nListenStream=127.0.0.1:%i\n",
        0o644,
    );
    sd.write_file(
        &format!("{ADMIN_UNITS}/tmpl@.service"),
        format!(
            "[Unit]\nRequires=%N.socket\nAfter=%N.socket\nPartOf=%N.socket\n\
             [Service]\nExecStart=/usr/bin/python3 {}/webserver.py %N\n",
            common::systemd::EXAMPLES_DIR
        )
        .as_bytes(),
        0o644,
    );
    sd.write_file(
        &format!("{ADMIN_UNITS}/tmpl@.socket.d/sklookup.conf"),
        b"[Socket]\nX-SkLookup=203.0.113.0/24\n",
        0o644,
    );
    sd.daemon_reload();
    let wants = sd.property("tmpl@8091.socket", "Wants");
    assert!(
        wants.contains("skactivate@tmpl@8091.service"),
        "Wants={wants}"
    );

    sd.ok(&["systemctl", "start", "tmpl@8091.socket", "tmpl@8092.socket"]);
    wait_bound(&sd, "tcp:203.0.113.0/24:8091", "tmpl@8091.socket");
    wait_bound(&sd, "tcp:203.0.113.0/24:8092", "tmpl@8092.socket");
    assert_eq!(
        sd.active_state("skactivate@tmpl@8091.service"),
        "inactive",
        "the registration must not stay active"
    );
    for (to, name) in [
        ("203.0.113.7:8091", "tmpl@8091"),
        ("203.0.113.200:8092", "tmpl@8092"),
    ] {
        assert_eq!(sd.in_netns(|| http_ask(addr(to)).unwrap()), name, "{to}");
    }

    sd.ok(&["systemctl", "stop", "tmpl@8091.socket"]);
    wait_unbound(&sd, "tmpl@8091.socket");
    assert!(
        sd.in_netns(|| tcp_refused(addr("203.0.113.7:8091"))),
        "the stopped instance's port is refused"
    );
    assert!(
        list_bindings(&sd).contains("\"tcp:203.0.113.0/24:8092\" \"tmpl@8092.socket\""),
        "{}",
        list_bindings(&sd)
    );
    assert_eq!(
        sd.in_netns(|| http_ask(addr("203.0.113.7:8092")).unwrap()),
        "tmpl@8092"
    );
}
