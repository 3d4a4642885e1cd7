//! Under a real systemd: the harness itself, the shipped units and the
//! examples (tests/common/systemd.rs boots a throwaway systemd per test, with
//! its own network namespace, dbus-daemon, journald and bpffs).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use common::systemd::{
    ADMIN_UNITS, EXAMPLE_DROPINS, EXAMPLE_UNITS, SETTLE, SHIPPED_UNITS, Systemd, VENDOR_UNITS,
    http_ask, poll_for, poll_until, repo,
};
use common::{tcp_refused, udp_ask};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn boots_with_dbus_and_journald() {
    let Some(sd) = Systemd::boot() else { return };
    assert_eq!(sd.ok(&["systemctl", "is-system-running"]).trim(), "running");
    assert_eq!(sd.ok(&["cat", "/proc/1/comm"]).trim(), "systemd");
    let names = sd.ok(&["busctl", "--system", "--no-pager", "--acquired", "list"]);
    assert!(names.contains("org.freedesktop.systemd1"), "{names}");
    // The system bus is the real dbus-daemon, and it answers.
    let id = sd.ok(&[
        "busctl",
        "--system",
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "GetId",
    ]);
    assert!(id.starts_with("s \""), "{id}");
    // journald takes a unit's output.
    sd.ok(&[
        "systemd-run",
        "--wait",
        "--quiet",
        "--unit=hello-journal",
        "echo",
        "hello from a unit",
    ]);
    assert!(
        sd.journal("hello-journal").contains("hello from a unit"),
        "{}",
        sd.journal("hello-journal")
    );
    // Its own network namespace: only lo, and the host's is another one.
    let links = sd.ok(&["ip", "-o", "link", "show"]);
    assert_eq!(links.lines().count(), 1, "{links}");
    let ns = |pid: &str| {
        fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.ino()
        })
    };
    assert_ne!(
        ns(&sd.pid().to_string()).unwrap(),
        ns("self").unwrap(),
        "the container must not share the host's network namespace"
    );
}

/// Every shipped unit and example passes `systemd-analyze verify` as
/// installed, next to the real systemd, its units and the binary.
#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    let Some(sd) = Systemd::boot() else { return };
    sd.install_skactivate();
    let mut units: Vec<String> = Vec::new();
    for unit in SHIPPED_UNITS {
        // A template verifies as an instance.
        units.push(match unit.strip_suffix("@.service") {
            Some(prefix) => format!("{prefix}@webserver.service"),
            None => format!("{VENDOR_UNITS}/{unit}"),
        });
    }
    units.extend(EXAMPLE_UNITS.iter().map(|u| format!("{ADMIN_UNITS}/{u}")));
    // The man pages are not installed here: --man=no.
    let mut argv = vec!["systemd-analyze", "verify", "--man=no"];
    argv.extend(units.iter().map(String::as_str));
    let out = sd.exec(&argv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Not even a warning about one of ours.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("skactivate") || l.contains("webserver") || l.contains("echo-udp"))
        .collect();
    assert!(ours.is_empty(), "{stderr}");
    // The drop-ins load: the unit knows them (systemd ignores X- keys).
    for dropin in EXAMPLE_DROPINS {
        let unit = dropin.split_once(".d/").unwrap().0;
        let paths = sd.property(unit, "DropInPaths");
        assert!(
            paths.contains(&format!("{ADMIN_UNITS}/{dropin}")),
            "{paths}"
        );
    }
    // The bus accepted the policy and the activation file.
    let activatable = sd.ok(&["busctl", "--system", "--no-pager", "--activatable", "list"]);
    assert!(activatable.contains("org.skactivate1"), "{activatable}");
    let policy = fs::read_to_string(repo().join("units/org.skactivate1.conf")).unwrap();
    let log = sd.journal("dbus.service");
    assert!(
        !log.contains("org.skactivate1.conf"),
        "dbus-daemon complains about our policy:\n{log}\n{policy}"
    );
}

/// webserver.socket, plain systemd (no drop-in, no skactivate): the first
/// connection starts webserver.service, which then serves IPv4 and IPv6 on
/// one dual-stack socket; stopping the socket stops the service.
#[test]
fn example_webserver_is_socket_activated() {
    let Some(sd) = Systemd::boot() else { return };
    sd.install_examples(false);
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    assert_eq!(sd.active_state("webserver.socket"), "active");
    assert_eq!(sd.active_state("webserver.service"), "inactive");

    let first = sd.in_netns(|| http_ask(addr("[::1]:80")));
    assert_eq!(
        first.as_ref().map(String::as_str).ok(),
        Some("webserver"),
        "{first:?}\n{}",
        sd.journal("webserver.service")
    );
    assert_eq!(sd.active_state("webserver.service"), "active");
    let pid = sd.property("webserver.service", "MainPID");
    let answers = sd.in_netns(|| {
        ["127.0.0.1:80", "[::1]:80", "127.0.0.1:80", "127.1.2.3:80"]
            .iter()
            .map(|a| http_ask(addr(a)).map_err(|e| format!("{a}: {e}")))
            .collect::<Result<Vec<_>, _>>()
    });
    assert_eq!(answers, Ok(vec!["webserver".to_owned(); 4]));
    // One activation: the same process served every connection.
    assert_eq!(sd.property("webserver.service", "MainPID"), pid);
    assert_eq!(sd.property("webserver.service", "NRestarts"), "0");

    sd.ok(&["systemctl", "stop", "webserver.socket"]);
    sd.wait_state("webserver.service", "inactive");
    assert!(sd.in_netns(|| tcp_refused(addr("127.0.0.1:80"))));
}

/// echo-udp.socket, plain systemd: the server answers every datagram from the
/// address it was sent to (udp_ask accepts only that), over IPv4, IPv6 and
/// prefixes reached through local routes, on the one dual-stack socket.
#[test]
fn example_udp_echo_answers_from_the_address_asked() {
    let Some(sd) = Systemd::boot() else { return };
    sd.install_examples(false);
    sd.local_route("198.51.100.0/24");
    sd.local_route("2001:db8::/64");
    sd.ok(&["systemctl", "start", "echo-udp.socket"]);
    let targets = [
        "127.0.0.1:5353",
        "127.0.0.77:5353",
        "198.51.100.9:5353",
        "[::1]:5353",
        "[2001:db8::9]:5353",
        "[2001:db8::ffff:1]:5353",
    ];
    let answers = sd.in_netns(|| {
        targets
            .iter()
            .map(|a| udp_ask(addr(a)).map_err(|e| format!("{a}: {e}")))
            .collect::<Result<Vec<_>, _>>()
    });
    assert_eq!(
        answers,
        Ok(vec!["echo-udp".to_owned(); targets.len()]),
        "{}",
        sd.journal("echo-udp.service")
    );
    assert_eq!(sd.active_state("echo-udp.service"), "active");
}

/// After `down`: no process, namespace, cgroup, mount or state directory of
/// the instance is left, and a BPF program pinned inside is gone.
#[test]
fn teardown_leaves_nothing() {
    let Some(sd) = Systemd::boot() else { return };
    sd.install_examples(false);
    // Something running, with a socket and a child in the container's cgroup.
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    let ok = sd.in_netns(|| poll_for(SETTLE, || http_ask(addr("127.0.0.1:80")).ok()));
    assert_eq!(ok.as_deref(), Some("webserver"));
    let instance = sd.instance().clone();
    assert!(instance.cgroups.iter().all(|c| c.is_dir()));
    assert_eq!(instance.namespaces.len(), 4, "{instance:?}");
    sd.down();

    // Exited. nspawn, orphaned when `throwaway.sh up` returned, may linger
    // as a zombie until the host's init reaps it: a zombie holds nothing.
    for pid in [instance.systemd_pid, instance.nspawn_pid] {
        let state = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ")?.1.chars().next());
        assert!(
            matches!(state, None | Some('Z')),
            "pid {pid} of {} is still running ({state:?})",
            instance.machine
        );
    }
    for cgroup in &instance.cgroups {
        assert!(!cgroup.exists(), "{} left behind", cgroup.display());
    }
    assert!(
        !instance.state_dir.exists(),
        "{} left",
        instance.state_dir.display()
    );
    // No process sees its mounts (a process in its mount namespaces would:
    // its binds name the state directory), none holds one of its namespaces,
    // and no nsfs mount pins one. The kernel reuses a freed namespace's
    // inode, so a holder that belongs to another instance booted meanwhile
    // (its mounts or cgroup name another one) is not ours.
    let state = instance.state_dir.to_string_lossy().into_owned();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let proc = entry.path();
        let Ok(mounts) = fs::read_to_string(proc.join("mountinfo")) else {
            continue;
        };
        assert!(
            !mounts.contains(&state),
            "{} still sees the mounts of {}",
            proc.display(),
            instance.machine
        );
        let cgroup = fs::read_to_string(proc.join("cgroup")).unwrap_or_default();
        let elsewhere = mounts.contains("/skactivate-systemd-")
            || cgroup.contains("/ska") && !cgroup.contains(&instance.machine);
        for (kind, ino) in &instance.namespaces {
            let Ok(meta) = fs::metadata(proc.join("ns").join(kind)) else {
                continue;
            };
            use std::os::unix::fs::MetadataExt;
            assert!(
                meta.ino() != *ino || elsewhere,
                "{} still in the {kind} namespace of {}",
                proc.display(),
                instance.machine
            );
        }
    }
    for (kind, ino) in &instance.namespaces {
        assert!(
            !mountinfo.contains(&format!("{kind}:[{ino}]")),
            "{kind} namespace {ino} is bind-mounted"
        );
    }
    assert!(!mountinfo.contains(&state), "a mount under {state} is left");
    let leftovers: Vec<_> = mountinfo
        .lines()
        .filter(|l| l.contains(&instance.machine))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Nothing is left under its name on the host either.
    assert!(poll_until(SETTLE, || {
        std::process::Command::new("pgrep")
            .args(["-f", &instance.machine])
            .output()
            .is_ok_and(|o| o.stdout.is_empty())
    }));
}

/// The sandbox of `skactivate.service` (every line of its [Unit] and
/// [Service] sections but the daemon's own) lets the dispatcher be created,
/// adopted, fed a socket and a binding, and run (`lookup`, BPF_PROG_TEST_RUN):
/// [`sandbox_probe`] does that from inside a unit made of those lines. The
/// pins it leaves in the container's bpffs vanish with the container.
#[test]
fn skactivate_service_sandbox_runs_the_dispatcher() {
    if let Some(why) = common::missing_kernel_feature() {
        eprintln!("SKIP skactivate_service_sandbox_runs_the_dispatcher: {why}");
        return;
    }
    let Some(sd) = Systemd::boot() else { return };
    let probe = "/usr/local/libexec/skactivate-sandbox-probe";
    sd.copy_in(&std::env::current_exe().unwrap(), probe, 0o755);
    let real = fs::read_to_string(repo().join("units/skactivate.service")).unwrap();
    let mut unit = String::new();
    for line in real.lines() {
        if line.starts_with("[Install]") {
            break;
        }
        let key = line.split_once('=').map(|(k, _)| k.trim());
        match key {
            Some("Type") => unit.push_str("Type=oneshot\n"),
            Some("ExecStart") => unit.push_str(&format!(
                "ExecStart={probe} --exact sandbox_probe --ignored --nocapture --test-threads=1\n\
                 Environment=SKACTIVATE_SANDBOX_PROBE=/sys/fs/bpf\n"
            )),
            Some("BusName" | "ExecReload" | "Restart" | "WatchdogSec") => {}
            _ => {
                unit.push_str(line);
                unit.push('\n');
            }
        }
    }
    sd.write_file(
        &format!("{ADMIN_UNITS}/skactivate-sandbox-probe.service"),
        unit.as_bytes(),
        0o644,
    );
    sd.daemon_reload();
    let out = sd.systemctl(&["start", "skactivate-sandbox-probe.service"]);
    let journal = sd.journal("skactivate-sandbox-probe.service");
    assert!(
        out.status.success() && journal.contains("SANDBOX-PROBE-OK"),
        "the dispatcher fails under skactivate.service's sandbox:\n{}\n{journal}\n--- unit ---\n{unit}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The sandbox really applied: exactly the unit's capabilities.
    let words =
        |s: &str| -> BTreeSet<String> { s.split_whitespace().map(str::to_lowercase).collect() };
    let wanted = real
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("skactivate.service limits its capabilities");
    let caps = sd.property("skactivate-sandbox-probe.service", "CapabilityBoundingSet");
    assert_eq!(words(&caps), words(wanted));
    // Pinned inside the container, and only there.
    let pins = sd.ok(&["find", "/sys/fs/bpf/skactivate", "-mindepth", "2"]);
    assert!(pins.contains("/link"), "{pins}");
    let id: u32 = journal
        .lines()
        .find_map(|l| {
            l.split_once("SANDBOX-PROBE-OK prog_id=")?
                .1
                .trim()
                .parse()
                .ok()
        })
        .expect("the probe names its program");
    assert!(skactivate::dispatcher::sys::prog_fd_by_id(id).is_ok());
    sd.down();
    assert!(
        poll_until(SETTLE, || skactivate::dispatcher::sys::prog_fd_by_id(id)
            .is_err()),
        "program {id} outlived the container"
    );
}

/// Not a test of its own: run inside the throwaway systemd, under the
/// sandbox of skactivate.service, by the test above; does nothing elsewhere.
#[test]
#[ignore = "run inside a throwaway systemd by skactivate_service_sandbox_runs_the_dispatcher"]
fn sandbox_probe() {
    use std::net::TcpListener;
    use std::os::fd::AsFd;

    use ipnet::IpNet;
    use skactivate::binding::{Binding, Ports, Protocol};
    use skactivate::dispatcher::{Dispatcher, Verdict};
    use skactivate::paths::SELF_NETNS;

    let Ok(bpffs) = std::env::var("SKACTIVATE_SANDBOX_PROBE") else {
        return;
    };
    let (netns, bpffs) = (Path::new(SELF_NETNS), Path::new(&bpffs));
    let created = Dispatcher::open(netns, bpffs).expect("create the dispatcher");
    let id = created.program().expect("program").id;
    drop(created);
    let mut d = Dispatcher::open(netns, bpffs).expect("adopt the dispatcher");
    assert_eq!(d.program().expect("program").id, id);

    let server = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = server.local_addr().unwrap().port();
    let regs = d
        .register_sockets("probe.socket", &[server.as_fd()])
        .expect("register a socket");
    let prefix: IpNet = "127.0.0.2/32".parse().unwrap();
    let binding = Binding::new(Protocol::Tcp, prefix, Ports::single(port));
    d.add_bindings(&[(binding, regs[0].0.clone())])
        .expect("add a binding");
    let to = "127.0.0.2".parse().unwrap();
    let lookup = d.lookup(Protocol::Tcp, to, port).expect("lookup");
    assert_eq!(lookup.verdict, Verdict::Redirect, "{lookup:?}");
    println!("SANDBOX-PROBE-OK prog_id={id}");
}

/// Run `argv` inside as the unprivileged user nobody.
fn as_nobody<'a>(argv: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    v.extend_from_slice(argv);
    v
}

/// `dbus-send --system --print-reply` to org.skactivate1's manager object:
/// unlike busctl, it prints the error's name.
fn dbus_send<'a>(member: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "dbus-send",
        "--system",
        "--print-reply",
        "--reply-timeout=10000",
        "--dest=org.skactivate1",
        "/org/skactivate1",
        member,
    ];
    v.extend_from_slice(args);
    v
}

/// The real daemon under the real skactivate.service: it starts, owns its
/// bus name, reports its status, answers `systemctl reload` (a synchronous
/// D-Bus Reload) and runs with exactly the unit's capabilities.
#[test]
fn skactivate_service_runs_under_its_sandbox() {
    if let Some(why) = common::missing_kernel_feature() {
        eprintln!("SKIP skactivate_service_runs_under_its_sandbox: {why}");
        return;
    }
    let Some(sd) = Systemd::boot() else { return };
    sd.install_skactivate();
    let started = sd.systemctl(&["start", "skactivate.service"]);
    assert!(
        started.status.success(),
        "{}\n{}",
        sd.status("skactivate.service"),
        sd.journal("skactivate.service")
    );
    assert_eq!(sd.active_state("skactivate.service"), "active");
    let owners = sd.ok(&["busctl", "--system", "--no-pager", "--acquired", "list"]);
    assert!(
        owners
            .lines()
            .any(|l| l.starts_with("org.skactivate1 ") && l.contains("skactivate.service")),
        "{owners}"
    );
    assert!(!sd.property("skactivate.service", "StatusText").is_empty());
    assert_eq!(sd.property("skactivate.service", "WatchdogUSec"), "30s");
    let real = fs::read_to_string(repo().join("units/skactivate.service")).unwrap();
    let words =
        |s: &str| -> BTreeSet<String> { s.split_whitespace().map(str::to_lowercase).collect() };
    let wanted = real
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap();
    let pid = sd.property("skactivate.service", "MainPID");
    let status = sd.ok(&["cat", &format!("/proc/{pid}/status")]);
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim();
    let decoded = sd.ok(&["capsh", &format!("--decode={bnd}")]);
    let decoded = decoded.trim().split_once('=').unwrap().1.replace(',', " ");
    assert_eq!(words(&decoded), words(wanted), "{status}");
    let seccomp = status.lines().find(|l| l.starts_with("Seccomp:")).unwrap();
    assert_eq!(seccomp.split_whitespace().nth(1), Some("2"), "{status}");

    let pins = sd.ok(&["find", "/sys/fs/bpf/skactivate", "-mindepth", "2"]);
    assert!(pins.contains("/link"), "{pins}");
    // Between changes the daemon keeps no BPF map mapped: a mapping of the
    // filter and cache would count all their pages (34 MiB at 2^20
    // entries) in its resident set.
    let maps = sd.ok(&["cat", &format!("/proc/{pid}/maps")]);
    assert!(!maps.contains("bpf-map"), "{maps}");
    sd.ok(&["systemctl", "reload", "skactivate.service"]);
    assert_eq!(sd.active_state("skactivate.service"), "active");
    assert_eq!(sd.property("skactivate.service", "MainPID"), pid);
    assert_eq!(sd.property("skactivate.service", "NRestarts"), "0");
}

/// The bus policy (units/org.skactivate1.conf) and the activation file: a
/// read by anyone starts the daemon and is answered; every change is refused
/// by the bus itself to anyone but root; root's calls reach the daemon.
#[test]
fn bus_policy_lets_everyone_read_and_only_root_change() {
    if let Some(why) = common::missing_kernel_feature() {
        eprintln!("SKIP bus_policy_lets_everyone_read_and_only_root_change: {why}");
        return;
    }
    let Some(sd) = Systemd::boot() else { return };
    sd.install_skactivate();
    assert_eq!(sd.active_state("skactivate.service"), "inactive");
    // D-Bus activation, by an unprivileged read.
    let listed = sd.exec(&as_nobody(&[
        "busctl",
        "--system",
        "call",
        "org.skactivate1",
        "/org/skactivate1",
        "org.skactivate1.Manager",
        "ListUnits",
    ]));
    assert!(
        listed.status.success(),
        "{}\n{}",
        common::systemd::describe(&["ListUnits"], &listed),
        sd.journal("skactivate.service")
    );
    // The daemon answers once it owns its name, and says READY=1 just after.
    sd.wait_state("skactivate.service", "active");

    let reads: [Vec<&str>; 7] = [
        dbus_send("org.skactivate1.Manager.ListUnits", &[]),
        dbus_send("org.skactivate1.Manager.ListBindings", &[]),
        dbus_send(
            "org.skactivate1.Manager.Lookup",
            &["string:tcp", "string:192.0.2.1", "uint16:80"],
        ),
        dbus_send(
            "org.freedesktop.DBus.Properties.Get",
            &["string:org.skactivate1.Manager", "string:Version"],
        ),
        dbus_send(
            "org.freedesktop.DBus.Properties.GetAll",
            &["string:org.skactivate1.Manager"],
        ),
        dbus_send("org.freedesktop.DBus.Introspectable.Introspect", &[]),
        dbus_send("org.freedesktop.DBus.Peer.Ping", &[]),
    ];
    for argv in &reads {
        let out = sd.exec(&as_nobody(argv));
        assert!(
            out.status.success(),
            "{}",
            common::systemd::describe(argv, &out)
        );
    }

    // Refused by the bus ("Rejected send message"), before the daemon sees them.
    let changes: [Vec<&str>; 3] = [
        dbus_send("org.skactivate1.Manager.Reload", &[]),
        dbus_send(
            "org.skactivate1.Manager.UnregisterUnit",
            &["string:webserver.socket"],
        ),
        dbus_send(
            "org.freedesktop.DBus.Properties.Set",
            &[
                "string:org.skactivate1.Manager",
                "string:Units",
                "variant:uint32:7",
            ],
        ),
    ];
    for argv in &changes {
        let out = sd.exec(&as_nobody(argv));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && stderr.contains("org.freedesktop.DBus.Error.AccessDenied")
                && stderr.contains("Rejected send message"),
            "{}",
            common::systemd::describe(argv, &out)
        );
    }
    // The fd-passing methods (dbus-send cannot pass fds: busctl, whose
    // "Access denied" is the bus's AccessDenied).
    for (method, signature, args) in [
        ("RegisterSockets", "sah", &["x.socket", "0"][..]),
        (
            "RegisterSocketsWithDirectives",
            "sahas",
            &["x.socket", "0", "0"][..],
        ),
    ] {
        let mut argv = vec![
            "busctl",
            "--system",
            "call",
            "org.skactivate1",
            "/org/skactivate1",
            "org.skactivate1.Manager",
            method,
            signature,
        ];
        argv.extend_from_slice(args);
        let out = sd.exec(&as_nobody(&argv));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.trim() == "Call failed: Access denied",
            "{}",
            common::systemd::describe(&argv, &out)
        );
    }

    // Root's changes reach the daemon: its own answer, not the bus's refusal.
    let argv = dbus_send(
        "org.skactivate1.Manager.UnregisterUnit",
        &["string:never-registered.socket"],
    );
    let out = sd.exec(&argv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("org.skactivate1.Error."),
        "{}",
        common::systemd::describe(&argv, &out)
    );
    sd.ok(&dbus_send("org.skactivate1.Manager.Reload", &[]));
}

/// The registration template does not stand in the way of socket
/// activation: after skactivate@webserver.service has registered the socket
/// (and is inactive again), the first connection starts webserver.service.
/// The socket listens on 127.0.0.1:8080 here, so only the dispatcher can
/// bring it a connection for 192.0.2.7:80.
#[test]
fn webserver_is_socket_activated_after_registration() {
    if let Some(why) = common::missing_kernel_feature() {
        eprintln!("SKIP webserver_is_socket_activated_after_registration: {why}");
        return;
    }
    let Some(sd) = Systemd::boot() else { return };
    sd.install_skactivate();
    sd.write_file(
        &format!("{ADMIN_UNITS}/webserver.socket.d/listen.conf"),
        b"[Socket]\nListenStream=\nListenStream=127.0.0.1:8080\n",
        0o644,
    );
    sd.daemon_reload();
    sd.local_route("192.0.2.0/24");
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    let registered = poll_until(SETTLE, || {
        sd.property(
            "skactivate@webserver.service",
            "ExecMainExitTimestampMonotonic",
        ) != "0"
    });
    assert!(
        registered,
        "{}\n{}",
        sd.status("skactivate@webserver.service"),
        sd.journal("skactivate.service")
    );
    let template = "skactivate@webserver.service";
    assert_eq!(
        sd.property(template, "Result"),
        "success",
        "{}",
        sd.journal(template)
    );
    assert_eq!(sd.active_state(template), "inactive");
    assert_eq!(sd.active_state("webserver.service"), "inactive");

    let first = sd.in_netns(|| http_ask(addr("192.0.2.7:80")));
    assert_eq!(
        first.as_ref().ok().map(String::as_str),
        Some("webserver"),
        "{first:?}\n{}\n{}",
        sd.journal("webserver.service"),
        sd.journal("skactivate.service")
    );
    assert_eq!(sd.active_state("webserver.service"), "active");
    let more = sd.in_netns(|| {
        ["192.0.2.0:80", "192.0.2.255:80", "127.0.0.1:8080"]
            .iter()
            .map(|a| http_ask(addr(a)).map_err(|e| format!("{a}: {e}")))
            .collect::<Result<Vec<_>, _>>()
    });
    assert_eq!(more, Ok(vec!["webserver".to_owned(); 3]));
}
