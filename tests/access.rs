//! org.skactivate1 as administrators and users meet it under a real systemd:
//! busctl introspection and properties, Lookup against real connections,
//! signals seen by a subscriber on the system bus, the status tools, and who
//! may change what — a real unprivileged user, refused by the bus policy and,
//! with the policy loosened, by the daemon itself.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::systemd::{SETTLE, Systemd, http_ask, poll_until};
use futures_util::StreamExt;
use skactivate::dbus::SkactivateProxy;

const USER: &str = "skuser";

fn boot() -> Option<Systemd> {
    let sd = Systemd::boot()?;
    sd.install_skactivate();
    sd.local_route("192.0.2.0/24");
    // Deliberately no route for 198.51.100.0/24: echo-udp's prefix (status warns).
    sd.ok(&[
        "useradd",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        USER,
    ]);
    Some(sd)
}

fn start_webserver(sd: &Systemd) {
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    assert!(
        poll_until(SETTLE, || sd
            .busctl(&[
                "--system",
                "get-property",
                "org.skactivate1",
                "/org/skactivate1",
                "org.skactivate1.Manager",
                "Units"
            ])
            .stdout
            .starts_with(b"u 1")),
        "webserver.socket never registered"
    );
}

fn as_user(sd: &Systemd, argv: &[&str]) -> std::process::Output {
    let mut full = vec!["runuser", "-u", USER, "--"];
    full.extend_from_slice(argv);
    sd.exec(&full)
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The mutating methods busctl can call (systemd 252's busctl cannot pass
/// fds: RegisterSockets* are called through `skactivate register` below).
const MUTATING: &[&[&str]] = &[&["UnregisterUnit", "s", "webserver.socket"], &["Reload"]];

/// `skactivate register` as the user, handed a listening socket the way
/// systemd hands one (fd 3, LISTEN_FDS, LISTEN_PID): RegisterSockets, or
/// RegisterSocketsWithDirectives with `--sklookup`.
fn register_as_user(sd: &Systemd, sklookup: bool) -> std::process::Output {
    let extra = if sklookup {
        r#", "--sklookup", "192.0.2.0/24:80""#
    } else {
        ""
    };
    let script = format!(
        r#"import os, socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)  # dup2 onto itself keeps close-on-exec
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="webserver.socket", LISTEN_PID=str(os.getpid()))
os.execv("/usr/bin/skactivate", ["skactivate", "register", "webserver.socket"{extra}])
"#
    );
    as_user(sd, &["python3", "-c", &script])
}

fn call_as_user(sd: &Systemd, args: &[&str]) -> std::process::Output {
    let mut argv = vec![
        "busctl",
        "--system",
        "call",
        "org.skactivate1",
        "/org/skactivate1",
        "org.skactivate1.Manager",
    ];
    argv.extend_from_slice(args);
    as_user(sd, &argv)
}

/// Every state-changing call as the user fails: busctl's calls of the
/// manager's methods and of Unit.Unregister saying `busctl_says`, and
/// `skactivate register` (with and without --sklookup) saying `client_says`.
fn assert_every_change_refused(sd: &Systemd, busctl_says: &str, client_says: &str) {
    for args in MUTATING {
        let out = call_as_user(sd, args);
        assert!(!out.status.success(), "{args:?} as {USER} succeeded");
        assert!(text(&out).contains(busctl_says), "{args:?}: {}", text(&out));
    }
    let path = skactivate::dbus::unit_path("webserver.socket");
    let out = as_user(
        sd,
        &[
            "busctl",
            "--system",
            "call",
            "org.skactivate1",
            path.as_str(),
            "org.skactivate1.Unit",
            "Unregister",
        ],
    );
    assert!(!out.status.success(), "Unit.Unregister as {USER} succeeded");
    assert!(text(&out).contains(busctl_says), "{}", text(&out));
    for sklookup in [false, true] {
        let out = register_as_user(sd, sklookup);
        assert_eq!(
            out.status.code(),
            Some(1),
            "register (--sklookup: {sklookup}) as {USER}: {}",
            text(&out)
        );
        assert!(text(&out).contains(client_says), "{}", text(&out));
    }
}

#[test]
fn an_unprivileged_user_reads_everything_and_changes_nothing() {
    let Some(sd) = boot() else { return };
    start_webserver(&sd);

    // Reading: status, bindings, lookup, metrics, busctl properties.
    for argv in [
        &["skactivate", "status"][..],
        &["skactivate", "status", "webserver.socket", "--json"],
        &["skactivate", "bindings"],
        &["skactivate", "lookup", "tcp", "192.0.2.1", "80"],
        &["skactivate", "metrics"],
    ] {
        let out = as_user(&sd, argv);
        assert!(out.status.success(), "{argv:?} as {USER}: {}", text(&out));
        assert!(
            text(&out).contains("webserver.socket"),
            "{argv:?}: {}",
            text(&out)
        );
    }
    let out = as_user(
        &sd,
        &[
            "busctl",
            "--system",
            "get-property",
            "org.skactivate1",
            "/org/skactivate1/unit/webserver_2esocket",
            "org.skactivate1.Unit",
            "Bindings",
        ],
    );
    assert_eq!(text(&out).trim(), "as 1 \"tcp:192.0.2.0/24:80\"");

    // Changing: refused by the bus policy, every method.
    assert_every_change_refused(&sd, "Access denied", "ccess denied");
    let out = as_user(&sd, &["skactivate", "unregister", "webserver.socket"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("ccess denied"), "{}", text(&out));
    // Nothing changed.
    assert_eq!(
        sd.in_netns(|| http_ask("192.0.2.9:80".parse().unwrap()).ok())
            .as_deref(),
        Some("webserver")
    );

    // Loosen the bus policy: the daemon's own uid check still refuses.
    sd.write_file(
        "/etc/dbus-1/system.d/zz-loose-skactivate.conf",
        br#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "https://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><policy context="default"><allow send_destination="org.skactivate1"/></policy></busconfig>
"#,
        0o644,
    );
    sd.reload_dbus();
    let daemon_says = "is for root only (caller uid";
    assert_every_change_refused(&sd, daemon_says, daemon_says);
    assert!(
        sd.ok(&["skactivate", "bindings"])
            .contains("tcp:192.0.2.0/24:80"),
        "still registered"
    );
}

#[test]
fn busctl_introspects_reads_and_looks_up_what_real_traffic_does() {
    let Some(sd) = boot() else { return };
    start_webserver(&sd);
    sd.ok(&["systemctl", "start", "echo-udp.socket"]);
    assert!(poll_until(SETTLE, || sd
        .ok(&["skactivate", "bindings"])
        .contains("echo-udp.socket")));

    let tree = sd.ok(&[
        "busctl",
        "--system",
        "--no-pager",
        "tree",
        "org.skactivate1",
    ]);
    for path in [
        "/org/skactivate1",
        "/org/skactivate1/unit/webserver_2esocket",
        "/org/skactivate1/unit/echo_2dudp_2esocket",
    ] {
        assert!(tree.contains(path), "{path} missing:\n{tree}");
    }
    let intro = sd.ok(&[
        "busctl",
        "--system",
        "--no-pager",
        "introspect",
        "org.skactivate1",
        "/org/skactivate1/unit/webserver_2esocket",
        "org.skactivate1.Unit",
    ]);
    for member in [
        "Bindings",
        "Sockets",
        "Lookups",
        "Misses",
        "Errors",
        "RegisteredAt",
        "Warnings",
        "Unregister",
    ] {
        assert!(intro.contains(member), "{member}:\n{intro}");
    }
    let intro = sd.ok(&[
        "busctl",
        "--system",
        "--no-pager",
        "introspect",
        "org.skactivate1",
        "/org/skactivate1",
        "org.skactivate1.Manager",
    ]);
    for member in [
        "GetUnit",
        "ListDestinations",
        "NetNS",
        "ProgramId",
        "ProgramTag",
        "StatePath",
        "UnitUnregistered",
    ] {
        assert!(intro.contains(member), "{member}:\n{intro}");
    }

    // Lookup answers as real connections go.
    for (ip, port, real) in [
        ("192.0.2.1", 80u16, true),
        ("192.0.2.254", 80, true),
        ("192.0.2.1", 81, false),
    ] {
        let to: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let answered = sd.in_netns(|| http_ask(to).ok());
        let lookup = sd.manager_call("Lookup", &["ssq", "tcp", ip, &port.to_string()]);
        if real {
            assert_eq!(answered.as_deref(), Some("webserver"));
            assert!(
                lookup
                    .starts_with("ssst \"redirect\" \"webserver.socket\" \"tcp:192.0.2.0/24:80\""),
                "{lookup}"
            );
        } else {
            assert_eq!(answered, None);
            assert!(lookup.starts_with("ssst \"pass\""), "{lookup}");
        }
    }
    // The cookie Lookup names is the socket the unit object lists.
    let sockets = sd.unit_property("webserver.socket", "Sockets");
    let lookup = sd.manager_call("Lookup", &["ssq", "tcp", "192.0.2.3", "80"]);
    let cookie = lookup.split_whitespace().last().unwrap();
    assert!(
        sockets.contains(&format!("\"[::]:80\" {cookie}")),
        "{sockets} vs {lookup}"
    );
    let lookups = sd.unit_property("webserver.socket", "Lookups");
    assert!(
        lookups
            .trim()
            .strip_prefix("t ")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 2,
        "{lookups}"
    );

    // status: the UDP unit's prefix has no local route here, and says so.
    let status = sd.ok(&["skactivate", "status", "echo-udp.socket"]);
    assert!(
        status.contains("198.51.100.0/24 has no local route"),
        "{status}"
    );
    let status = sd.ok(&["skactivate", "status", "webserver.socket"]);
    assert!(!status.contains("Warning:"), "{status}");
    let json: serde_json::Value =
        serde_json::from_str(&sd.ok(&["skactivate", "status", "--json"])).unwrap();
    assert_eq!(json["attached"], true);
    assert_eq!(json["units"].as_array().unwrap().len(), 2);
    let metrics = sd.ok(&["skactivate", "metrics"]);
    // Each series names the network namespace of its unit: the daemon's own.
    let netns = &json["netns"];
    assert!(netns.as_u64().is_some_and(|n| n != 0), "{json}");
    assert_eq!(json["units"][0]["netns"], *netns, "{json}");
    assert!(
        metrics.contains(&format!(
            "skactivate_lookups_total{{unit=\"webserver.socket\",netns=\"{netns}\",family=\"ipv6\",protocol=\"tcp\"}}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("skactivate_units 2"), "{metrics}");
    let lookup = sd.ok(&["skactivate", "lookup", "tcp", "192.0.2.1", "80"]);
    assert!(
        lookup.starts_with("tcp 192.0.2.1:80: webserver.socket (binding tcp:192.0.2.0/24:80"),
        "{lookup}"
    );
    let out = sd.exec(&["skactivate", "status", "nope.socket"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("nope.socket: not registered"),
        "{}",
        text(&out)
    );
}

/// A subscriber on the system bus sees units come and go, and the counts change.
#[test]
fn signals_reach_a_subscriber_on_the_system_bus() {
    let Some(sd) = boot() else { return };
    sd.ok(&["systemctl", "start", "skactivate.service"]);
    let address = format!(
        "unix:path=/proc/{}/root/run/dbus/system_bus_socket",
        sd.pid()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let conn = zbus::connection::Builder::address(address.as_str())
            .unwrap()
            .build()
            .await
            .unwrap();
        let p = SkactivateProxy::new(&conn).await.unwrap();
        let mut registered = p.receive_unit_registered().await.unwrap();
        let mut unregistered = p.receive_unit_unregistered().await.unwrap();
        let mut units = p.receive_units_changed().await;
        sd.ok(&["systemctl", "start", "webserver.socket"]);
        let s = tokio::time::timeout(Duration::from_secs(20), registered.next())
            .await
            .expect("UnitRegistered")
            .unwrap();
        let a = s.args().unwrap();
        assert_eq!(
            (a.unit.as_str(), a.path.as_str()),
            (
                "webserver.socket",
                "/org/skactivate1/unit/webserver_2esocket"
            )
        );
        let mut seen = false;
        for _ in 0..5 {
            let Ok(Some(c)) = tokio::time::timeout(Duration::from_secs(20), units.next()).await
            else {
                break;
            };
            if c.get().await.unwrap() == 1 {
                seen = true;
                break;
            }
        }
        assert!(seen, "PropertiesChanged for Units");
        sd.ok(&["systemctl", "stop", "webserver.socket"]);
        let s = tokio::time::timeout(Duration::from_secs(20), unregistered.next())
            .await
            .expect("UnitUnregistered")
            .unwrap();
        assert_eq!(s.args().unwrap().unit, "webserver.socket");
    });
}
