//! org.skactivate1.Manager over a peer-to-peer D-Bus connection on a
//! socketpair, through the generated proxy: no bus daemon, but the real
//! dispatcher in a fresh netns, real sockets passed as UNIX fds, and real
//! connections. (The same interface on the real system bus, with busctl and
//! systemd, is tests/systemd.rs.)

mod common;

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use common::*;
use skactivate::dbus::wire::SocketEntry;
use skactivate::dbus::{Manager, Shared, SkactivateProxy, SkactivateUnitProxy};
use skactivate::dispatcher::Dispatcher;
use skactivate::service::Service;
use zbus::zvariant::Fd;

/// Serve a Manager for the dispatcher of this netns on one end of a
/// socketpair and hand the proxy of the other end to `f`.
fn with_manager<F>(fs: &Bpffs, f: F)
where
    F: AsyncFnOnce(SkactivateProxy<'static>),
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let d = Dispatcher::open(thread_netns(), &fs.path).unwrap();
    let service = Service::new(d, std::path::Path::new("/")).unwrap();
    let shared = Arc::new(Shared {
        service: Mutex::new(service),
        systemd: None,
        on_change: Box::new(|_| {}),
    });
    rt.block_on(async move {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let guid = zbus::Guid::generate();
        let server = zbus::connection::Builder::unix_stream(a)
            .server(guid)
            .unwrap()
            .p2p()
            .serve_at(
                "/org/skactivate1",
                Manager {
                    shared: shared.clone(),
                },
            )
            .unwrap()
            .build();
        let client = zbus::connection::Builder::unix_stream(b).p2p().build();
        let (server, client) = futures_util::future::join(server, client).await;
        let (server, client) = (server.unwrap(), client.unwrap());
        // Units adopted from the pinned state get their objects, as the
        // daemon gives them at start.
        let adopted: Vec<String> = shared.lock().units().keys().cloned().collect();
        for unit in adopted {
            skactivate::dbus::publish_unit(server.object_server(), &shared, &unit)
                .await
                .unwrap();
        }
        let proxy = SkactivateProxy::builder(&client)
            .destination("org.skactivate1")
            .unwrap()
            .build()
            .await
            .unwrap();
        f(proxy).await;
    });
}

/// The object of a registered unit, found by `GetUnit`, its properties read
/// afresh on every call.
async fn unit_proxy(p: &SkactivateProxy<'static>, unit: &str) -> SkactivateUnitProxy<'static> {
    SkactivateUnitProxy::builder(p.inner().connection())
        .destination("org.skactivate1")
        .unwrap()
        .path(p.get_unit(unit).await.unwrap())
        .unwrap()
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap()
}

fn error_name(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        other => format!("{other:?}"),
    }
}

fn error_text(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(_, Some(m), _) => m.clone(),
        other => other.to_string(),
    }
}

/// `e` is a `BadDirective` error whose text holds each of `parts`.
fn assert_bad_directive(e: &zbus::Error, parts: &[&str]) {
    assert_eq!(error_name(e), "org.skactivate1.Error.BadDirective");
    let text = error_text(e);
    for part in parts {
        assert!(text.contains(part), "no {part:?} in {text}");
    }
}

#[test]
fn register_with_directives_then_traffic_and_lookup() {
    in_netns("register_with_directives_then_traffic_and_lookup", |fs| {
        local_route("192.0.2.0/24");
        let web = tcp_server("web", "127.0.0.1:8080", false);
        let dns = udp_server("dns", "127.0.0.1:53");
        with_manager(fs, async |p| {
            let fds = [Fd::from(web.fd()), Fd::from(dns.fd())];
            let (sockets, bindings) = p
                .register_sockets_with_directives(
                    "edge.socket",
                    &fds,
                    &["tcp:192.0.2.0/24:80", "udp:192.0.2.0/24"],
                )
                .await
                .unwrap();
            assert_eq!((sockets, bindings), (2, 2));
            assert_eq!(
                tcp_ask(sa("192.0.2.10".parse().unwrap(), 80)).unwrap(),
                "web"
            );
            assert_eq!(
                udp_ask(sa("192.0.2.10".parse().unwrap(), 53)).unwrap(),
                "dns"
            );

            let list = p.list_bindings().await.unwrap();
            let shown: Vec<(&str, &str)> = list
                .iter()
                .map(|b| (b.binding.as_str(), b.unit.as_str()))
                .collect();
            assert_eq!(
                shown,
                [
                    ("tcp:192.0.2.0/24:80", "edge.socket"),
                    ("udp:192.0.2.0/24:53", "edge.socket")
                ]
            );
            assert!(list[0].present, "the socket is present");
            assert_eq!(list[0].cookie, web.cookie);

            let (verdict, unit, binding, cookie) = p.lookup("tcp", "192.0.2.99", 80).await.unwrap();
            assert_eq!(
                (verdict.as_str(), unit.as_str(), binding.as_str()),
                ("redirect", "edge.socket", "tcp:192.0.2.0/24:80")
            );
            assert_eq!(cookie, web.cookie);
            let (verdict, ..) = p.lookup("tcp", "192.0.2.99", 81).await.unwrap();
            assert_eq!(verdict, "pass");

            let units = p.list_units().await.unwrap();
            assert_eq!(units.len(), 1);
            assert_eq!(units[0].unit, "edge.socket");
            assert_eq!(
                units[0].path.as_str(),
                "/org/skactivate1/unit/edge_2esocket"
            );
            assert_eq!(
                (p.units().await.unwrap(), p.bindings().await.unwrap()),
                (1, 2)
            );

            p.unregister_unit("edge.socket").await.unwrap();
            assert!(p.list_bindings().await.unwrap().is_empty());
            assert!(tcp_refused(sa("192.0.2.10".parse().unwrap(), 80)));
        });
    });
}

#[test]
fn errors_are_named_and_leave_state_alone() {
    in_netns("errors_are_named_and_leave_state_alone", |fs| {
        let a = tcp_server("a", "127.0.0.1:8001", false);
        let b = tcp_server("b", "127.0.0.1:8002", false);
        with_manager(fs, async |p| {
            p.register_sockets_with_directives(
                "a.socket",
                &[Fd::from(a.fd())],
                &["192.0.2.0/24:80"],
            )
            .await
            .unwrap();

            // A bad directive: named error, names the value and why; nothing applied.
            let e = p
                .register_sockets_with_directives(
                    "b.socket",
                    &[Fd::from(b.fd())],
                    &["198.51.100.0/24:80", "192.0.2.0/33:80"],
                )
                .await
                .unwrap_err();
            assert_bad_directive(&e, &["--sklookup:2", "192.0.2.0/33:80", "33"]);
            assert_eq!(p.list_bindings().await.unwrap().len(), 1);

            // Two values of one unit that make the same entry, far apart:
            // the later one is named with the one it repeats; nothing applied.
            let e = p
                .register_sockets_with_directives(
                    "b.socket",
                    &[Fd::from(b.fd())],
                    &[
                        "198.51.100.0/24:8000-8010",
                        "203.0.113.7",
                        "198.51.100.0/24:8010-8020",
                    ],
                )
                .await
                .unwrap_err();
            assert_bad_directive(
                &e,
                &[
                    "--sklookup:3",
                    "198.51.100.0/24:8010-8020",
                    "X-SkLookup=198.51.100.0/24:8000-8010 at --sklookup:1",
                ],
            );
            assert_eq!(p.list_bindings().await.unwrap().len(), 1);

            // A conflict names the unit that has the binding.
            let e = p
                .register_sockets_with_directives(
                    "b.socket",
                    &[Fd::from(b.fd())],
                    &["198.51.100.0/24:80", "192.0.2.0/24:80"],
                )
                .await
                .unwrap_err();
            assert_eq!(error_name(&e), "org.skactivate1.Error.Conflict");
            assert!(error_text(&e).contains("a.socket"), "{}", error_text(&e));
            let list = p.list_bindings().await.unwrap();
            assert_eq!(list.len(), 1, "b.socket got nothing: {list:?}");
            assert_eq!(p.list_units().await.unwrap().len(), 1);

            // Not a listening socket.
            let f = std::fs::File::open("/dev/null").unwrap();
            let e = p
                .register_sockets_with_directives(
                    "c.socket",
                    &[Fd::from(f.as_fd())],
                    &["192.0.2.1"],
                )
                .await
                .unwrap_err();
            assert_eq!(error_name(&e), "org.skactivate1.Error.InvalidSocket");

            // Unknown unit; bad arguments.
            let e = p.unregister_unit("nope.socket").await.unwrap_err();
            assert_eq!(error_name(&e), "org.skactivate1.Error.NoSuchUnit");
            let e = p.lookup("sctp", "192.0.2.1", 80).await.unwrap_err();
            assert_eq!(error_name(&e), "org.skactivate1.Error.InvalidArgs");
            let e = p.lookup("tcp", "192.0.2.300", 80).await.unwrap_err();
            assert_eq!(error_name(&e), "org.skactivate1.Error.InvalidArgs");

            // Registering from unit files needs systemd, which this connection lacks.
            let e = p
                .register_sockets("b.socket", &[Fd::from(b.fd())])
                .await
                .unwrap_err();
            assert_eq!(error_name(&e), "org.skactivate1.Error.Failed");
        });
    });
}

#[test]
fn reregistration_replaces_the_units_bindings() {
    in_netns("reregistration_replaces_the_units_bindings", |fs| {
        local_route("192.0.2.0/24");
        let first = tcp_server("first", "127.0.0.1:8080", false);
        with_manager(fs, async |p| {
            p.register_sockets_with_directives(
                "web.socket",
                &[Fd::from(first.fd())],
                &["192.0.2.0/24:80"],
            )
            .await
            .unwrap();
            assert_eq!(
                tcp_ask(sa("192.0.2.1".parse().unwrap(), 80)).unwrap(),
                "first"
            );
            // The socket unit restarts: a new socket, new directives.
            let second = tcp_server("second", "127.0.0.1:8081", false);
            first.close();
            p.register_sockets_with_directives(
                "web.socket",
                &[Fd::from(second.fd())],
                &["192.0.2.0/25:8081"],
            )
            .await
            .unwrap();
            assert_eq!(
                tcp_ask(sa("192.0.2.1".parse().unwrap(), 8081)).unwrap(),
                "second"
            );
            assert!(tcp_refused(sa("192.0.2.1".parse().unwrap(), 80)));
            let list = p.list_bindings().await.unwrap();
            assert_eq!(list.len(), 1);
            assert_eq!(list[0].binding, "tcp:192.0.2.0/25:8081");
            drop(second);
        });
    });
}

#[test]
fn unit_objects_properties_signals_and_warnings() {
    in_netns("unit_objects_properties_signals_and_warnings", |fs| {
        local_route("192.0.2.0/24");
        // 203.0.113.0/24 gets no local route: status must say so.
        let web = tcp_server("web", "127.0.0.1:8080", false);
        let dns = udp_server("dns", "127.0.0.1:53");
        with_manager(fs, async |p| {
            use futures_util::StreamExt;
            let mut registered = p.receive_unit_registered().await.unwrap();
            let mut unregistered = p.receive_unit_unregistered().await.unwrap();
            p.register_sockets_with_directives(
                "edge.socket",
                &[Fd::from(web.fd()), Fd::from(dns.fd())],
                &[
                    "tcp:192.0.2.0/24:80",
                    "tcp:203.0.113.0/24:80",
                    "udp:192.0.2.0/24",
                ],
            )
            .await
            .unwrap();
            let signal = registered.next().await.unwrap();
            let args = signal.args().unwrap();
            assert_eq!(args.unit, "edge.socket");
            assert_eq!(args.path.as_str(), "/org/skactivate1/unit/edge_2esocket");

            let path = p.get_unit("edge.socket").await.unwrap();
            assert_eq!(path, args.path);
            let u = unit_proxy(&p, "edge.socket").await;
            assert_eq!(u.id().await.unwrap(), "edge.socket");
            assert_eq!(u.source().await.unwrap(), "inline");
            assert_eq!(
                u.bindings().await.unwrap(),
                [
                    "tcp:192.0.2.0/24:80",
                    "tcp:203.0.113.0/24:80",
                    "udp:192.0.2.0/24:53"
                ]
            );
            let sockets = u.sockets().await.unwrap();
            assert!(
                sockets.contains(&SocketEntry {
                    family: "ipv4".into(),
                    protocol: "tcp".into(),
                    local: "127.0.0.1:8080".into(),
                    cookie: web.cookie,
                }),
                "{sockets:?}"
            );
            assert!(
                sockets.contains(&SocketEntry {
                    family: "ipv4".into(),
                    protocol: "udp".into(),
                    local: "127.0.0.1:53".into(),
                    cookie: dns.cookie,
                }),
                "{sockets:?}"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros() as u64;
            let at = u.registered_at().await.unwrap();
            assert!(
                at <= now && now - at < 60_000_000,
                "registered {at}, now {now}"
            );

            // Counters follow real traffic.
            for i in 0..5u8 {
                tcp_ask(sa(
                    std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, i)),
                    80,
                ))
                .unwrap();
            }
            assert_eq!(u.lookups().await.unwrap(), 5);
            let dests = p.list_destinations().await.unwrap();
            let tcp = dests.iter().find(|d| d.protocol == "tcp").unwrap();
            assert_eq!(
                (
                    tcp.unit.as_str(),
                    tcp.lookups,
                    tcp.misses,
                    tcp.errors,
                    tcp.present,
                    tcp.cookie
                ),
                ("edge.socket", 5, 0, 0, true, web.cookie)
            );

            // What looks wrong: no route for 203.0.113.0/24; a UDP socket without packet info.
            let warnings = u.warnings().await.unwrap();
            assert!(
                warnings
                    .iter()
                    .any(|w| w.contains("203.0.113.0/24 has no local route")
                        && w.contains("ip route add local 203.0.113.0/24 dev lo")),
                "{warnings:?}"
            );
            assert!(
                !warnings
                    .iter()
                    .any(|w| w.contains("192.0.2.0/24 has no local route")),
                "{warnings:?}"
            );
            assert!(
                !warnings.iter().any(|w| w.contains("PassPacketInfo")),
                "the test's UDP server passes packet info: {warnings:?}"
            );

            // Unregistering through the unit object; the object goes, the signal comes.
            u.unregister().await.unwrap();
            let gone = unregistered.next().await.unwrap();
            assert_eq!(gone.args().unwrap().unit, "edge.socket");
            assert!(p.list_units().await.unwrap().is_empty());
            let e = p.get_unit("edge.socket").await.unwrap_err();
            assert!(error_name(&e).ends_with("NoSuchUnit"));
        });
    });
}

#[test]
fn a_udp_socket_without_packet_info_is_warned_about() {
    in_netns("a_udp_socket_without_packet_info_is_warned_about", |fs| {
        local_route("198.51.100.0/24");
        let plain = std::net::UdpSocket::bind("127.0.0.1:5300").unwrap();
        with_manager(fs, async |p| {
            p.register_sockets_with_directives(
                "plain.socket",
                &[Fd::from(plain.as_fd())],
                &["198.51.100.0/24"],
            )
            .await
            .unwrap();
            let u = unit_proxy(&p, "plain.socket").await;
            let warnings = u.warnings().await.unwrap();
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert!(
                warnings[0].contains(
                    "udp socket 127.0.0.1:5300 does not pass packet info (PassPacketInfo=yes)"
                ),
                "{warnings:?}"
            );
        });
    });
}

/// Parse `xml` with a real XML parser (python3's xml.etree); the error if
/// it is not well-formed.
fn xml_parse_error(xml: &str) -> Option<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as E; E.fromstring(sys.stdin.buffer.read())",
        ])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(xml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every object's introspection is well-formed XML (GDBus and dbus-python
/// refuse anything else; busctl happens to cope).
#[test]
fn introspection_of_every_object_is_well_formed_xml() {
    in_netns("introspection_of_every_object_is_well_formed_xml", |fs| {
        let web = tcp_server("web", "127.0.0.1:8080", false);
        with_manager(fs, async |p| {
            p.register_sockets_with_directives(
                "web.socket",
                &[Fd::from(web.fd())],
                &["192.0.2.0/24:80"],
            )
            .await
            .unwrap();
            let conn = p.inner().connection();
            for path in [
                "/",
                "/org",
                "/org/skactivate1",
                "/org/skactivate1/unit/web_2esocket",
            ] {
                let intro = zbus::fdo::IntrospectableProxy::builder(conn)
                    .destination("org.skactivate1")
                    .unwrap()
                    .path(path)
                    .unwrap()
                    .build()
                    .await
                    .unwrap();
                let xml = intro.introspect().await.unwrap();
                assert!(xml.contains("<node"), "{path}: {xml}");
                if let Some(e) = xml_parse_error(&xml) {
                    panic!("{path}: not well-formed XML: {e}\n{xml}");
                }
            }
        });
    });
}

/// Bad input over D-Bus: each gets a named error that names the argument,
/// and nothing changes.
#[test]
fn bad_arguments_get_named_errors_and_change_nothing() {
    in_netns("bad_arguments_get_named_errors_and_change_nothing", |fs| {
        let a = tcp_server("a", "127.0.0.1:8001", false);
        let b = tcp_server("b", "127.0.0.1:8002", false);
        with_manager(fs, async |p| {
            p.register_sockets_with_directives(
                "a.socket",
                &[Fd::from(a.fd())],
                &["192.0.2.0/24:80"],
            )
            .await
            .unwrap();
            let before = p.list_bindings().await.unwrap();
            let fds = [Fd::from(b.fd())];

            // RegisterSockets: only a socket or service unit's name, checked
            // before systemd is asked.
            for (unit, says) in [
                ("", "is empty"),
                ("webserver.mount", "neither a socket nor a service unit"),
                ("no-suffix", "no type suffix"),
                ("bad/name.socket", "may appear in a unit name"),
            ] {
                let e = p.register_sockets(unit, &fds).await.unwrap_err();
                assert_eq!(
                    error_name(&e),
                    "org.skactivate1.Error.InvalidArgs",
                    "{unit:?}: {e}"
                );
                assert!(
                    error_text(&e).contains(says),
                    "{unit:?}: {}",
                    error_text(&e)
                );
            }
            // RegisterSocketsWithDirectives: a unit name, at least one value, none empty.
            let e = p
                .register_sockets_with_directives("", &fds, &["198.51.100.0/24:80"])
                .await
                .unwrap_err();
            assert_eq!(error_name(&e), "org.skactivate1.Error.InvalidArgs", "{e}");
            assert!(error_text(&e).contains("\"\""), "{}", error_text(&e));
            let e = p
                .register_sockets_with_directives("b.socket", &fds, &[])
                .await
                .unwrap_err();
            assert_eq!(error_name(&e), "org.skactivate1.Error.InvalidArgs", "{e}");
            assert!(
                error_text(&e).contains("b.socket: no X-SkLookup= values"),
                "{}",
                error_text(&e)
            );
            let e = p
                .register_sockets_with_directives("b.socket", &fds, &["198.51.100.0/24:80", " "])
                .await
                .unwrap_err();
            assert_eq!(error_name(&e), "org.skactivate1.Error.InvalidArgs", "{e}");
            assert!(
                error_text(&e).contains("--sklookup:2"),
                "{}",
                error_text(&e)
            );

            assert_eq!(p.list_bindings().await.unwrap(), before);
            let units = p.list_units().await.unwrap();
            assert_eq!(units.len(), 1, "{units:?}");
        });
    });
}

/// Each cause is said once in the error text: a conflict names the binding
/// and its owner one time.
#[test]
fn error_texts_say_each_cause_once() {
    in_netns("error_texts_say_each_cause_once", |fs| {
        let a = tcp_server("a", "127.0.0.1:8001", false);
        let b = tcp_server("b", "127.0.0.1:8002", false);
        with_manager(fs, async |p| {
            p.register_sockets_with_directives(
                "a.socket",
                &[Fd::from(a.fd())],
                &["192.0.2.0/24:80"],
            )
            .await
            .unwrap();
            let e = p
                .register_sockets_with_directives(
                    "b.socket",
                    &[Fd::from(b.fd())],
                    &["192.0.2.0/24:80"],
                )
                .await
                .unwrap_err();
            let text = error_text(&e);
            assert_eq!(text.matches("is already bound to").count(), 1, "{text}");
            assert!(text.starts_with("b.socket: "), "{text}");
        });
    });
}

/// A unit's bindings as written (single ports, a range, `*`) and their count
/// are what a restarted daemon shows too: it adopts the entries, one per
/// port, and puts the range back together from the unit's record.
#[test]
fn bindings_as_written_survive_a_restart() {
    in_netns("bindings_as_written_survive_a_restart", |fs| {
        local_route("192.0.2.0/24");
        let web = tcp_server("web", "127.0.0.1:8080", false);
        let written = [
            "tcp:192.0.2.0/24:8000-8009",
            "tcp:192.0.2.0/24:8010",
            "tcp:192.0.2.0/24:8011",
            "tcp:192.0.2.7/32:*",
        ];
        // What the daemon shows: counts, the unit's bindings, and the
        // binding a lookup names, for a port inside the range and next to it.
        async fn shown(p: &SkactivateProxy<'static>) -> (u32, u32, Vec<String>, Vec<String>) {
            let u = unit_proxy(p, "edge.socket").await;
            let mut looked_up = Vec::new();
            // 192.0.2.7 is the /32's on every port: ask another address of the /24.
            for (addr, port) in [
                ("192.0.2.9", 8005),
                ("192.0.2.9", 8010),
                ("192.0.2.9", 8011),
                ("192.0.2.7", 8005),
            ] {
                let (_, _, binding, _) = p.lookup("tcp", addr, port).await.unwrap();
                looked_up.push(binding);
            }
            let units = p.list_units().await.unwrap();
            (
                p.bindings().await.unwrap(),
                units[0].bindings,
                u.bindings().await.unwrap(),
                looked_up,
            )
        }
        let mut before = None;
        with_manager(fs, async |p| {
            let (_, n) = p
                .register_sockets_with_directives("edge.socket", &[Fd::from(web.fd())], &written)
                .await
                .unwrap();
            assert_eq!(n, 4);
            let s = shown(&p).await;
            assert_eq!((s.0, s.1), (4, 4));
            assert_eq!(
                s.2,
                [
                    "tcp:192.0.2.7/32:*",
                    "tcp:192.0.2.0/24:8000-8009",
                    "tcp:192.0.2.0/24:8010",
                    "tcp:192.0.2.0/24:8011",
                ]
            );
            assert_eq!(
                s.3,
                [
                    "tcp:192.0.2.0/24:8000-8009",
                    "tcp:192.0.2.0/24:8010",
                    "tcp:192.0.2.0/24:8011",
                    "tcp:192.0.2.7/32:*",
                ]
            );
            before = Some(s);
        });
        // A new daemon: the dispatcher adopted from the pinned state.
        with_manager(fs, async |p| {
            assert_eq!(
                Some(shown(&p).await),
                before,
                "the restart changed what is shown"
            );
            p.unregister_unit("edge.socket").await.unwrap();
            assert_eq!(p.bindings().await.unwrap(), 0);
        });
    });
}
