//! `skactivate register-pid` and `X-SkLookup=` in `[Service]`, under a real
//! systemd (tests/common/systemd.rs): daemons that bind their own sockets
//! (units/examples/selfbound.py), run as real units, their sockets taken with
//! pidfd_getfd by the installed binary and reached with real connections
//! through the real daemon; the file status flags of the taken sockets read
//! from /proc before and after; a process in another network namespace, a
//! caller of another uid, and processes that are gone, refused.

mod common;

use std::net::SocketAddr;
use std::process::Output;

use common::systemd::{ADMIN_UNITS, EXAMPLES_DIR, SETTLE, Systemd, http_ask, poll_until};
use common::tcp_refused;

const USER: &str = "skuser";
const SELFBOUND: &str = "/usr/local/lib/skactivate-examples/selfbound.py";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn boot() -> Option<Systemd> {
    let sd = Systemd::boot()?;
    sd.install_skactivate();
    let examples = common::systemd::repo().join("units/examples");
    sd.copy_in(&examples.join("selfbound.py"), SELFBOUND, 0o755);
    sd.copy_in(
        &examples.join("selfbound.service"),
        &format!("{ADMIN_UNITS}/selfbound.service"),
        0o644,
    );
    sd.copy_in(
        &examples.join("selfbound.service.d/sklookup.conf"),
        &format!("{ADMIN_UNITS}/selfbound.service.d/sklookup.conf"),
        0o644,
    );
    sd.daemon_reload();
    sd.local_route("203.0.113.0/24");
    sd.local_route("198.51.100.0/24");
    assert!(EXAMPLES_DIR.ends_with("skactivate-examples"));
    Some(sd)
}

/// Start selfbound.py as the transient service `unit` (ready once its
/// sockets are bound) and return its pid.
fn start(sd: &Systemd, unit: &str, properties: &[&str], args: &[&str]) -> u32 {
    let mut argv = vec![
        "systemd-run".to_owned(),
        format!("--unit={unit}"),
        "--property=Type=notify".to_owned(),
    ];
    argv.extend(properties.iter().map(|p| format!("--property={p}")));
    argv.extend(["/usr/bin/python3".to_owned(), SELFBOUND.to_owned()]);
    argv.push(unit.trim_end_matches(".service").to_owned());
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    sd.ok(&argv);
    main_pid(sd, unit)
}

fn main_pid(sd: &Systemd, unit: &str) -> u32 {
    let pid: u32 = sd.property(unit, "MainPID").parse().unwrap();
    assert_ne!(pid, 0, "{unit} has no main process:\n{}", sd.status(unit));
    pid
}

fn register_pid(sd: &Systemd, args: &[&str]) -> Output {
    sd.exec(&[&["skactivate", "register-pid"], args].concat())
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run register-pid expecting failure (exit 1); returns what it said.
fn refused(sd: &Systemd, args: &[&str]) -> String {
    let out = register_pid(sd, args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "register-pid {args:?} should fail: {}",
        text(&out)
    );
    text(&out)
}

/// Run register-pid expecting success; returns its stdout.
fn registered(sd: &Systemd, args: &[&str]) -> String {
    let out = register_pid(sd, args);
    assert!(
        out.status.success(),
        "register-pid {args:?}: {}\n{}",
        text(&out),
        sd.journal("skactivate.service")
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(fd, "socket:[INODE] flags: N")` of every socket the process holds, from
/// /proc/PID/fd and fdinfo.
fn socket_flags(sd: &Systemd, pid: u32) -> Vec<(u32, String)> {
    let script = format!(
        "cd /proc/{pid}/fd && for f in *; do case $(readlink $f) in socket:*) \
         echo $f $(readlink $f) $(grep '^flags:' ../fdinfo/$f);; esac; done"
    );
    let out = sd.sh(&script);
    assert!(out.status.success(), "{}", text(&out));
    let mut v: Vec<(u32, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (fd, flags) = l.split_once(' ').unwrap();
            (fd.parse().unwrap(), flags.to_owned())
        })
        .collect();
    v.sort();
    v
}

fn skactivate(sd: &Systemd, args: &[&str]) -> String {
    sd.ok(&[&["skactivate"], args].concat())
}

/// By pid: the unit comes from the process's cgroup, the values from
/// --sklookup; only the listening socket is taken (at fd 1000, among a
/// connected UDP socket, a UNIX pair, a pipe and TCP connections), the
/// prefix reaches the process, and no file status flag changed.
#[test]
fn by_pid_the_listening_socket_is_taken_and_serves_the_prefix_with_its_flags_unchanged() {
    let Some(sd) = boot() else { return };
    let pid = start(
        &sd,
        "sb1.service",
        &[],
        &["--noise", "--high-fds", "tcp:127.0.0.1:8080"],
    );
    let pid_s = pid.to_string();
    let before = socket_flags(&sd, pid);
    assert!(
        before.iter().any(|(fd, _)| *fd == 1000) && before.len() >= 5,
        "selfbound.py --noise --high-fds holds its listener at fd 1000 among other sockets: {before:?}"
    );

    // The unit is found from the cgroup; it has no X-SkLookup= of its own.
    let said = refused(&sd, &[&pid_s]);
    assert!(
        said.contains("sb1.service: no X-SkLookup= in force in /run/systemd/transient/sb1.service")
            && said.contains("no --sklookup given"),
        "{said}"
    );

    let out = registered(&sd, &[&pid_s, "--sklookup", "tcp:203.0.113.0/24:80"]);
    assert!(
        out.contains(&format!(
            "sb1.service: registered 1 socket(s) of process {pid} with 1 binding(s)"
        )) && out.contains("fd 1000: tcp 127.0.0.1:8080")
            && out.contains("tcp:203.0.113.0/24:80 -> tcp 127.0.0.1:8080  --sklookup:1"),
        "{out}"
    );
    assert_eq!(
        out.matches("fd ").count(),
        1,
        "only the listener is taken: {out}"
    );
    for to in ["203.0.113.9:80", "203.0.113.250:80"] {
        assert_eq!(
            sd.in_netns(|| http_ask(addr(to))).unwrap(),
            "sb1",
            "{to}: {}",
            sd.journal("skactivate.service")
        );
    }
    // The process still serves its own address, and holds its sockets with
    // exactly the flags it had.
    assert_eq!(
        sd.in_netns(|| http_ask(addr("127.0.0.1:8080"))).unwrap(),
        "sb1"
    );
    let after = socket_flags(&sd, pid);
    let listener_before = before.iter().find(|(fd, _)| *fd == 1000).unwrap();
    assert!(
        after.contains(listener_before),
        "fd 1000 flags changed: {before:?} -> {after:?}"
    );
    // Each entry is "socket:[INODE] flags: N": an fd number the process
    // closed and reused for another socket (its HTTP server accepts
    // connections meanwhile) is another file, not a changed one.
    let inode = |v: &str| v.split_whitespace().next().unwrap_or_default().to_owned();
    for (fd, flags) in &before {
        if let Some((_, now)) = after
            .iter()
            .find(|(f, v)| f == fd && inode(v) == inode(flags))
        {
            assert_eq!(flags, now, "flags of fd {fd} changed");
        }
    }

    let status = skactivate(&sd, &["status", "sb1.service"]);
    assert!(
        status.contains("127.0.0.1:8080") && status.contains("203.0.113.0/24"),
        "{status}"
    );

    // The socket closes with the process, and the prefix with it.
    sd.ok(&["systemctl", "kill", "--signal=KILL", "sb1.service"]);
    assert!(
        poll_until(SETTLE, || sd
            .in_netns(|| tcp_refused(addr("203.0.113.9:80")))),
        "the prefix outlived the process"
    );
}

/// By unit name, with --socket: two TCP sockets are ambiguous until one is
/// chosen; a reuseport group counts once; UDP is taken too; a --socket the
/// process does not have is named.
#[test]
fn socket_selects_among_several_and_a_reuseport_group_counts_once() {
    let Some(sd) = boot() else { return };
    let pid = start(
        &sd,
        "sb2.service",
        &[],
        &[
            "--reuseport",
            "3",
            "tcp:127.0.0.1:8081",
            "tcp:127.0.0.1:8082",
            "udp:127.0.0.1:5300",
        ],
    )
    .to_string();

    let said = refused(
        &sd,
        &[
            &pid,
            "--unit",
            "web-two.service",
            "--sklookup",
            "tcp:203.0.113.0/24:80",
        ],
    );
    assert!(
        said.contains("ambiguous")
            && said.contains("127.0.0.1:8081")
            && said.contains("127.0.0.1:8082")
            && said.contains("--socket"),
        "{said}"
    );

    let said = refused(
        &sd,
        &[
            &pid,
            "--unit",
            "web-two.service",
            "--socket",
            "127.0.0.1:9999",
            "--sklookup",
            "tcp:203.0.113.0/24:80",
        ],
    );
    assert!(
        said.contains("--socket 127.0.0.1:9999: process")
            && said.contains("has no such socket")
            && said.contains("tcp 127.0.0.1:8081"),
        "{said}"
    );

    let out = registered(
        &sd,
        &[
            &pid,
            "--unit",
            "web-two.service",
            "--socket",
            "tcp:127.0.0.1:8082",
            "--sklookup",
            "tcp:203.0.113.0/24:80",
        ],
    );
    assert!(
        out.contains("web-two.service: registered 1 socket(s)")
            && out.contains("tcp 127.0.0.1:8082 (and 2 more of its reuseport group)"),
        "{out}"
    );
    assert_eq!(
        sd.in_netns(|| http_ask(addr("203.0.113.9:80"))).unwrap(),
        "sb2"
    );

    // No protocol in --socket: the UDP socket of that address; the value
    // without a port takes the socket's.
    let out = registered(
        &sd,
        &[
            &pid,
            "--unit",
            "dns-two.service",
            "--socket",
            "127.0.0.1:5300",
            "--sklookup",
            "198.51.100.0/24",
        ],
    );
    assert!(
        out.contains("udp 127.0.0.1:5300 (and 2 more of its reuseport group)")
            && out.contains("udp:198.51.100.0/24:5300 -> udp 127.0.0.1:5300"),
        "{out}"
    );
    let bindings = skactivate(&sd, &["bindings"]);
    assert!(
        bindings
            .lines()
            .any(|l| l.contains("udp:198.51.100.0/24:5300") && l.contains("dns-two.service")),
        "{bindings}"
    );
    let status = skactivate(&sd, &["status", "web-two.service"]);
    assert!(status.contains("127.0.0.1:8082"), "{status}");
}

/// A process whose socket lives in another network namespace, a caller of
/// another uid, a same-uid caller who is not root, and processes that are
/// gone: each refused with the reason, and nothing registered.
#[test]
fn other_netns_other_uid_and_gone_processes_are_refused() {
    let Some(sd) = boot() else { return };
    sd.ok(&[
        "useradd",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        USER,
    ]);

    let private = start(
        &sd,
        "private.service",
        &["PrivateNetwork=yes"],
        &["tcp:127.0.0.1:8083"],
    )
    .to_string();
    let said = refused(&sd, &[&private, "--sklookup", "tcp:203.0.113.0/24:80"]);
    assert!(
        said.contains("has no listening TCP or bound UDP socket in this network namespace")
            && said.contains("tcp 127.0.0.1:8083 (in another network namespace, "),
        "{said}"
    );

    // Another uid, without CAP_SYS_PTRACE.
    let root_owned = start(&sd, "sb3.service", &[], &["tcp:127.0.0.1:8084"]).to_string();
    let out = sd.exec(&[
        "runuser",
        "-u",
        USER,
        "--",
        "skactivate",
        "register-pid",
        &root_owned,
        "--sklookup",
        "tcp:203.0.113.0/24:80",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "not permitted to take fds from process {root_owned}"
        )) && text(&out).contains("CAP_SYS_PTRACE"),
        "{}",
        text(&out)
    );
    // The same uid may take the fds, but only root may register them.
    let own = start(
        &sd,
        "sb4.service",
        &[&format!("User={USER}")],
        &["tcp:127.0.0.1:8085"],
    )
    .to_string();
    let out = sd.exec(&[
        "runuser",
        "-u",
        USER,
        "--",
        "skactivate",
        "register-pid",
        &own,
        "--sklookup",
        "tcp:203.0.113.0/24:80",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("access denied"), "{}", text(&out));
    let units = sd.manager_property("Units");
    assert_eq!(units.trim(), "u 0", "nothing was registered");

    let said = refused(&sd, &["4000000", "--sklookup", "203.0.113.0/24"]);
    assert!(said.contains("no process 4000000"), "{said}");

    // A zombie: exited, not yet reaped by its parent. The parent learns
    // that the child has exited without reaping it (waitid with WNOWAIT)
    // and only then publishes its pid, so what is tested is never a race
    // with the child's exit (a shell's `true &` was: once in CI the pid it
    // wrote never showed state Z within the time allowed).
    sd.ok(&[
        "systemd-run",
        "--unit=zombie.service",
        "python3",
        "-c",
        "import os, time; p = os.fork() or os._exit(0); \
         os.waitid(os.P_PID, p, os.WEXITED | os.WNOWAIT); \
         open('/run/zombie.tmp', 'w').write(str(p)); \
         os.rename('/run/zombie.tmp', '/run/zombie.pid'); time.sleep(600)",
    ]);
    let zombie = common::systemd::poll_for(SETTLE, || {
        let out = sd.exec(&["cat", "/run/zombie.pid"]);
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !pid.is_empty()).then_some(pid)
    })
    .unwrap_or_else(|| panic!("no /run/zombie.pid: {}", sd.journal("zombie.service")));
    let status = sd.ok(&["cat", &format!("/proc/{zombie}/status")]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("Z (zombie)")),
        "process {zombie} should be a zombie: {status}"
    );
    let said = refused(&sd, &[&zombie, "--sklookup", "203.0.113.0/24"]);
    assert!(said.contains(&format!("process {zombie} exited")), "{said}");

    // Exits while register-pid waits for it to bind something.
    sd.ok(&["systemd-run", "--unit=brief.service", "sleep", "4"]);
    let brief = main_pid(&sd, "brief.service").to_string();
    let said = refused(
        &sd,
        &[&brief, "--wait", "50", "--sklookup", "203.0.113.0/24"],
    );
    assert!(
        said.contains(&format!(
            "process {brief} exited while its sockets were being taken"
        )),
        "{said}"
    );
}

/// The example selfbound.service: X-SkLookup= in a [Service] drop-in is all
/// there is. The generated ExecStartPost=+ registers the sockets of a
/// hardened service (no capabilities, a dynamic user), each restart
/// registers the new process's socket, and stopping removes the bindings.
/// Without the "+" the same command fails, which is why it is there.
#[test]
fn a_service_with_x_sklookup_is_registered_at_every_start_and_gone_at_stop() {
    let Some(sd) = boot() else { return };
    let dropin = sd.ok(&[
        "cat",
        "/run/systemd/generator/selfbound.service.d/50-skactivate.conf",
    ]);
    assert!(
        dropin.contains(
            "ExecStartPost=+/usr/bin/skactivate register-pid --unit %n --wait 30 $MAINPID"
        ) && dropin.contains("ExecStopPost=-+/usr/bin/skactivate unregister %n"),
        "{dropin}"
    );
    let check = skactivate(&sd, &["check", "selfbound.service"]);
    assert!(check.contains("tcp:203.0.113.0/24:80"), "{check}");

    sd.ok(&["systemctl", "start", "selfbound.service"]);
    let first = main_pid(&sd, "selfbound.service");
    let status = sd.ok(&["cat", &format!("/proc/{first}/status")]);
    assert!(
        status.contains("CapBnd:\t0000000000000000") && !status.contains("Uid:\t0\t"),
        "the example runs without capabilities, as a dynamic user:\n{status}"
    );
    let ask = || sd.in_netns(|| http_ask(addr("203.0.113.9:80")));
    assert_eq!(
        ask().unwrap(),
        "selfbound",
        "{}\n{}",
        sd.journal("selfbound.service"),
        sd.journal("skactivate.service")
    );
    let journal = sd.journal("selfbound.service");
    assert!(
        journal.contains("selfbound.service: registered 1 socket(s)"),
        "{journal}"
    );

    sd.ok(&["systemctl", "restart", "selfbound.service"]);
    let second = main_pid(&sd, "selfbound.service");
    assert_ne!(first, second, "a restart runs a new process");
    assert_eq!(ask().unwrap(), "selfbound");
    let status = skactivate(&sd, &["status", "selfbound.service"]);
    assert!(
        status.contains("127.0.0.1:8080") && !status.contains("gone"),
        "{status}"
    );

    sd.ok(&["systemctl", "stop", "selfbound.service"]);
    let bindings = skactivate(&sd, &["bindings"]);
    assert!(!bindings.contains("selfbound.service"), "{bindings}");
    assert!(sd.in_netns(|| tcp_refused(addr("203.0.113.9:80"))));

    // The same command without "+" runs with the service's (empty)
    // capabilities as its dynamic user: refused, and the start fails.
    sd.write_file(
        &format!("{ADMIN_UNITS}/selfbound.service.d/60-without-plus.conf"),
        b"[Service]\nExecStartPost=\n\
          ExecStartPost=/usr/bin/skactivate register-pid --unit %n $MAINPID\n",
        0o644,
    );
    sd.daemon_reload();
    let out = sd.systemctl(&["start", "selfbound.service"]);
    assert!(!out.status.success(), "{}", text(&out));
    // The service's own SystemCallFilter=@system-service kills it first
    // (pidfd_getfd is not in the set); without that, the kernel (no
    // CAP_SYS_PTRACE, or Yama) or the daemon (not root) would refuse it.
    let journal = sd.journal("selfbound.service");
    assert!(
        journal.contains("Control process exited, code=killed, status=31/SYS"),
        "{journal}"
    );
    assert!(
        !journal[journal.rfind("Starting selfbound").unwrap()..].contains("registered 1 socket(s)")
    );

    // Without the filter, the command (the service's dynamic user, no
    // capabilities) may take its own process's fds, but registering is
    // root's only: the system bus refuses the dynamic user's connection here
    // (the daemon would refuse a caller that is not root), and the start
    // fails.
    sd.write_file(
        &format!("{ADMIN_UNITS}/selfbound.service.d/70-no-filter.conf"),
        b"[Service]\nSystemCallFilter=\n",
        0o644,
    );
    sd.daemon_reload();
    let out = sd.systemctl(&["start", "selfbound.service"]);
    assert!(!out.status.success(), "{}", text(&out));
    let journal = sd.journal("selfbound.service");
    let last = &journal[journal.rfind("Starting selfbound").unwrap()..];
    assert!(
        last.contains("skactivate: registering selfbound.service (sockets of process")
            && !last.contains("registered 1 socket(s)"),
        "{journal}"
    );
    let bindings = skactivate(&sd, &["bindings"]);
    assert!(!bindings.contains("selfbound.service"), "{bindings}");
}

/// A service's own `X-SkLookup=` lines are read by the daemon itself
/// (`Source` is "files"): an edited drop-in applies on `systemctl reload
/// skactivate`, without restarting the service and across a restart of the
/// daemon; a bad edit is refused by file, line and value, and the bindings
/// in force stay.
#[test]
fn a_services_own_lines_are_read_again_on_reload() {
    let Some(sd) = boot() else { return };
    let dropin = format!("{ADMIN_UNITS}/selfbound.service.d/sklookup.conf");
    sd.ok(&["systemctl", "start", "selfbound.service"]);
    let pid = main_pid(&sd, "selfbound.service");
    let ask = |a: &str| sd.in_netns(|| http_ask(addr(a)));
    assert_eq!(ask("203.0.113.9:80").unwrap(), "selfbound");
    let source = sd.unit_property("selfbound.service", "Source");
    assert_eq!(source.trim(), "s \"files\"");

    sd.write_file(
        &dropin,
        b"[Service]\nX-SkLookup=tcp:198.51.100.0/24:80\n",
        0o644,
    );
    sd.daemon_reload();
    // The daemon restarted in between adopts the unit with its origin.
    sd.ok(&["systemctl", "restart", "skactivate.service"]);
    sd.ok(&["systemctl", "reload", "skactivate.service"]);
    assert_eq!(
        ask("198.51.100.9:80").unwrap(),
        "selfbound",
        "{}",
        sd.journal("skactivate.service")
    );
    assert!(sd.in_netns(|| tcp_refused(addr("203.0.113.9:80"))));
    assert_eq!(main_pid(&sd, "selfbound.service"), pid, "not restarted");

    sd.refused_reload(&dropin, "Service", "tcp:198.51.100.0/24:8o");
    assert_eq!(ask("198.51.100.9:80").unwrap(), "selfbound");
    assert_eq!(sd.active_state("skactivate.service"), "active");
}

/// The example selfbound.service in a network namespace of its own
/// (`NetworkNamespacePath=`): the generated ExecStartPost=+ runs there too,
/// takes the socket there, and the daemon, which runs in its own namespace,
/// serves the prefix inside the service's with that namespace's dispatcher,
/// and nowhere else; stopping the service takes the dispatcher down.
#[test]
fn a_service_in_a_network_namespace_of_its_own_is_served_there() {
    let Some(sd) = boot() else { return };
    let inner = sd.named_netns("inner", "203.0.113.0/24");
    sd.write_file(
        &format!("{ADMIN_UNITS}/selfbound.service.d/80-netns.conf"),
        b"[Service]\nNetworkNamespacePath=/run/netns/inner\n",
        0o644,
    );
    sd.daemon_reload();
    let out = sd.systemctl(&["start", "selfbound.service"]);
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        text(&out),
        sd.journal("selfbound.service"),
        sd.journal("skactivate.service")
    );
    let own = sd.inode("/proc/self/ns/net");
    assert_ne!(inner, own);
    let pid = main_pid(&sd, "selfbound.service");
    assert_eq!(sd.inode(&format!("/proc/{pid}/ns/net")), inner);
    let journal = sd.journal("selfbound.service");
    assert!(
        journal.contains(&format!(
            "selfbound.service: registered 1 socket(s) of process {pid} in network namespace \
             net:[{inner}] (the daemon's own is net:[{own}]) with 1 binding(s)"
        )),
        "{journal}"
    );

    // Inside the service's namespace the prefix reaches it.
    let ask = "import urllib.request as u; \
               print(u.urlopen('http://203.0.113.9/', timeout=3).read().decode())";
    let out = sd.exec(&["ip", "netns", "exec", "inner", "python3", "-c", ask]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        sd.journal("skactivate.service")
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("selfbound 203.0.113.9:80"), "{said}");
    // The daemon's own namespace routes the prefix locally too (boot()),
    // but has no binding for it.
    assert!(sd.in_netns(|| tcp_refused(addr("203.0.113.9:80"))));
    let s: serde_json::Value =
        serde_json::from_str(&skactivate(&sd, &["status", "--json"])).unwrap();
    assert_eq!(s["namespaces"], serde_json::json!([own, inner]), "{s}");
    assert_eq!(
        (&s["units"][0]["unit"], &s["units"][0]["netns"]),
        (&"selfbound.service".into(), &inner.into()),
        "{s}"
    );
    let prop = sd.unit_property("selfbound.service", "NetworkNamespace");
    assert_eq!(prop.trim(), format!("t {inner}"));

    sd.ok(&["systemctl", "stop", "selfbound.service"]);
    sd.wait_dispatcher_gone(inner);
    let s: serde_json::Value =
        serde_json::from_str(&skactivate(&sd, &["status", "--json"])).unwrap();
    assert_eq!(s["units"], serde_json::json!([]), "{s}");
    assert_eq!(s["namespaces"], serde_json::json!([own]), "{s}");
}

/// A service template with `X-SkLookup=` in the template itself, using `%i`
/// for the port its instances bind: the generator's template drop-in
/// registers each instance started (names it never saw), each with its own
/// socket, and stopping one leaves the other.
#[test]
fn instances_of_a_service_template_are_registered_each_with_its_socket() {
    let Some(sd) = boot() else { return };
    sd.write_file(
        &format!("{ADMIN_UNITS}/selfbound-at@.service"),
        format!(
            "[Service]\nType=notify\n\
             ExecStart=/usr/bin/python3 {SELFBOUND} %N tcp:127.0.0.1:%i\n\
             X-SkLookup=tcp:198.51.100.0/24\n"
        )
        .as_bytes(),
        0o644,
    );
    sd.daemon_reload();
    let dropin = sd.ok(&[
        "cat",
        "/run/systemd/generator/selfbound-at@.service.d/50-skactivate.conf",
    ]);
    assert!(dropin.contains("register-pid --unit %n"), "{dropin}");

    sd.ok(&[
        "systemctl",
        "start",
        "selfbound-at@8093.service",
        "selfbound-at@8094.service",
    ]);
    for (port, unit) in [
        (8093, "selfbound-at@8093.service"),
        (8094, "selfbound-at@8094.service"),
    ] {
        let to = addr(&format!("198.51.100.77:{port}"));
        assert_eq!(
            sd.in_netns(|| http_ask(to)).unwrap(),
            unit.trim_end_matches(".service"),
            "{}\n{}",
            sd.journal(unit),
            sd.journal("skactivate.service")
        );
    }
    sd.ok(&["systemctl", "stop", "selfbound-at@8093.service"]);
    let bindings = skactivate(&sd, &["bindings"]);
    assert!(
        !bindings.contains("selfbound-at@8093.service")
            && bindings.contains("selfbound-at@8094.service"),
        "{bindings}"
    );
    assert!(sd.in_netns(|| tcp_refused(addr("198.51.100.77:8093"))));
}
