//! Sockets in other network namespaces: each namespace gets its own
//! dispatcher, found from the registered socket itself, pinned under its
//! inode, torn down with its last unit and adopted again by a restarted
//! daemon. Real kernel, real namespaces (created here, nested in the test's
//! own fresh one), real sockets and connections made inside them; routes
//! only inside namespaces the tests create.
//!
//! The interface is reached two ways: over a peer-to-peer D-Bus connection
//! to the manager (as tests/dbus.rs), and through the real `skactivate
//! daemon` binary on a private dbus-daemon, asked by the real CLI
//! (`lookup --netns`, `status --json`, `bindings --json`, `metrics`).
//! That daemon also shows it never waits on a service manager whose
//! notification queue is full.

mod common;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use skactivate::dbus::{Manager, Shared, SkactivateProxy, SkactivateUnitProxy};
use skactivate::dispatcher::Dispatcher;
use skactivate::service::Service;
use zbus::zvariant::Fd;

const PREFIX: &str = "192.0.2.0/24";

/// A network namespace this test made, held by an fd (no name anywhere).
struct Netns {
    fd: OwnedFd,
    ino: u64,
}

impl Netns {
    /// A fresh namespace with `lo` up and `local PREFIX dev lo` in it.
    fn new() -> Netns {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            run(&["ip", "link", "set", "lo", "up"]);
            local_route(PREFIX);
            let f = File::open("/proc/thread-self/ns/net").unwrap();
            let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata().unwrap());
            Netns { fd: f.into(), ino }
        })
        .join()
        .unwrap()
    }

    /// Run `f` on a thread inside this namespace.
    fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&self.fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// A path to it that other processes can open.
    fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd())
    }
}

fn own_netns_inode() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap()
}

/// A directory of this test process and namespace, made if missing.
fn scratch_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "skactivate-{kind}-{}-{}",
        std::process::id(),
        own_netns_inode()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn state_dir(fs: &Bpffs, ino: u64) -> PathBuf {
    fs.path.join("skactivate").join(ino.to_string())
}

fn to(ip: &str, port: u16) -> std::net::SocketAddr {
    sa(ip.parse().unwrap(), port)
}

fn error_parts(e: &zbus::Error) -> (String, String) {
    match e {
        zbus::Error::MethodError(name, m, _) => (name.to_string(), m.clone().unwrap_or_default()),
        other => (format!("{other:?}"), other.to_string()),
    }
}

/// Serve a Manager over a fresh service (the dispatcher of this thread's
/// namespace, others adopted as the daemon does) on one end of a socketpair;
/// `f` gets the proxy of the other end. The service is dropped afterwards,
/// as a stopped daemon's is: pinned state stays.
fn with_manager<F>(fs: &Bpffs, f: F)
where
    F: AsyncFnOnce(SkactivateProxy<'static>, zbus::Connection),
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let d = Dispatcher::open(thread_netns(), &fs.path).unwrap();
    let mut service = Service::new(d, Path::new("/")).unwrap();
    service.adopt_namespaces();
    let adopted: Vec<String> = service.units().keys().cloned().collect();
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
        for unit in adopted {
            skactivate::dbus::publish_unit(server.object_server(), &shared, &unit)
                .await
                .unwrap();
        }
        let proxy = SkactivateProxy::builder(&client)
            .destination("org.skactivate1")
            .unwrap()
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .unwrap();
        f(proxy, client.clone()).await;
    });
}

async fn unit_netns(conn: &zbus::Connection, unit: &str) -> u64 {
    SkactivateUnitProxy::builder(conn)
        .destination("org.skactivate1")
        .unwrap()
        .path(skactivate::dbus::unit_path(unit))
        .unwrap()
        .build()
        .await
        .unwrap()
        .network_namespace()
        .await
        .unwrap()
}

/// A socket made inside another namespace gets that namespace's dispatcher:
/// pinned under its inode, reaching the socket from inside it, while the
/// daemon's own namespace has no binding for it; the namespace shows in
/// ListBindings, ListDestinations, ListUnits, the unit's NetworkNamespace
/// and the manager's NetworkNamespaces; LookupInNamespace answers from its
/// program; the last unit going takes the dispatcher along.
#[test]
fn a_socket_in_another_namespace_is_served_there_and_nowhere_else() {
    in_netns(
        "a_socket_in_another_namespace_is_served_there_and_nowhere_else",
        |fs| {
            let home = own_netns_inode();
            let inner = Netns::new();
            assert_ne!(inner.ino, home);
            let web = inner.run(|| tcp_server("inner-web", "127.0.0.1:8080", false));
            assert!(!state_dir(fs, inner.ino).exists());
            with_manager(fs, async |p, conn| {
                let (sockets, bindings) = p
                    .register_sockets_with_directives(
                        "inner.socket",
                        &[Fd::from(web.fd())],
                        &["tcp:192.0.2.0/24:80"],
                    )
                    .await
                    .unwrap();
                assert_eq!((sockets, bindings), (1, 1));
                assert!(state_dir(fs, inner.ino).join("link").exists());
                assert_eq!(
                    p.network_namespaces().await.unwrap(),
                    [home, inner.ino],
                    "the daemon's own namespace first"
                );

                // Inside: the prefix reaches the socket.
                let got = inner.run(|| tcp_ask(to("192.0.2.77", 80)));
                assert_eq!(got.unwrap(), "inner-web");
                // The daemon's own namespace: its dispatcher knows nothing of it.
                let (verdict, ..) = p.lookup("tcp", "192.0.2.77", 80).await.unwrap();
                assert_eq!(verdict, "pass");

                let list = p.list_bindings().await.unwrap();
                assert_eq!(list.len(), 1);
                assert_eq!(
                    (
                        list[0].binding.as_str(),
                        list[0].unit.as_str(),
                        list[0].netns
                    ),
                    ("tcp:192.0.2.0/24:80", "inner.socket", inner.ino)
                );
                assert_eq!(list[0].cookie, web.cookie);
                let dests = p.list_destinations().await.unwrap();
                assert_eq!(dests.len(), 1);
                assert_eq!(dests[0].netns, inner.ino);
                assert!(dests[0].lookups >= 1, "the connection was counted");
                let units = p.list_units().await.unwrap();
                assert_eq!(units[0].netns, inner.ino);
                assert_eq!(unit_netns(&conn, "inner.socket").await, inner.ino);

                // Lookup in a namespace, given as an fd.
                let (verdict, unit, binding, cookie) = p
                    .lookup_in_namespace(Fd::from(inner.fd.as_fd()), "tcp", "192.0.2.77", 80)
                    .await
                    .unwrap();
                assert_eq!(
                    (verdict.as_str(), unit.as_str(), binding.as_str(), cookie),
                    (
                        "redirect",
                        "inner.socket",
                        "tcp:192.0.2.0/24:80",
                        web.cookie
                    )
                );
                let own_ns = File::open(thread_netns()).unwrap();
                let (verdict, ..) = p
                    .lookup_in_namespace(Fd::from(own_ns.as_fd()), "tcp", "192.0.2.77", 80)
                    .await
                    .unwrap();
                assert_eq!(verdict, "pass");
                // Not a network namespace: a clear error naming the argument.
                let uts = File::open("/proc/thread-self/ns/uts").unwrap();
                let e = p
                    .lookup_in_namespace(Fd::from(uts.as_fd()), "tcp", "192.0.2.77", 80)
                    .await
                    .unwrap_err();
                let (name, text) = error_parts(&e);
                assert_eq!(name, "org.skactivate1.Error.InvalidArgs", "{text}");
                assert!(
                    text.contains("netns") && text.contains("not a network namespace"),
                    "{text}"
                );
                let e = p
                    .lookup_in_namespace(Fd::from(web.fd()), "tcp", "192.0.2.77", 80)
                    .await
                    .unwrap_err();
                assert_eq!(error_parts(&e).0, "org.skactivate1.Error.InvalidArgs");

                // The last unit of the namespace takes its dispatcher along.
                p.unregister_unit("inner.socket").await.unwrap();
                assert!(
                    !state_dir(fs, inner.ino).exists(),
                    "pinned state of the namespace removed"
                );
                let lock = state_dir(fs, inner.ino).with_file_name("locks");
                assert!(
                    !lock.join(inner.ino.to_string()).exists(),
                    "its lock directory too"
                );
                assert_eq!(p.network_namespaces().await.unwrap(), [home]);
                assert!(inner.run(|| tcp_refused(to("192.0.2.77", 80))));
                assert!(state_dir(fs, home).exists(), "the daemon's own stays");
            });
            // The lock was released with the dispatcher: another may take it.
            let s = inner.run(|| File::open("/proc/thread-self/ns/net").unwrap());
            let again = Dispatcher::open(
                Path::new(&format!("/proc/self/fd/{}", s.as_raw_fd())),
                &fs.path,
            )
            .expect("the namespace's lock is free again");
            again.destroy().unwrap();
            web.close();
        },
    );
}

/// The same prefix and port in two namespaces (and in the daemon's own) are
/// three units that never conflict; each connection reaches its own
/// namespace's socket.
#[test]
fn the_same_binding_in_two_namespaces_does_not_conflict() {
    in_netns(
        "the_same_binding_in_two_namespaces_does_not_conflict",
        |fs| {
            local_route(PREFIX);
            let (a, b) = (Netns::new(), Netns::new());
            let web_a = a.run(|| tcp_server("a", "127.0.0.1:8080", false));
            let web_b = b.run(|| tcp_server("b", "127.0.0.1:8080", false));
            let web_home = tcp_server("home", "127.0.0.1:8080", false);
            with_manager(fs, async |p, _conn| {
                for (unit, server) in [
                    ("a.socket", &web_a),
                    ("b.socket", &web_b),
                    ("home.socket", &web_home),
                ] {
                    p.register_sockets_with_directives(
                        unit,
                        &[Fd::from(server.fd())],
                        &["tcp:192.0.2.0/24:80"],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{unit}: {e}"));
                }
                assert_eq!(a.run(|| tcp_ask(to("192.0.2.1", 80))).unwrap(), "a");
                assert_eq!(b.run(|| tcp_ask(to("192.0.2.1", 80))).unwrap(), "b");
                assert_eq!(tcp_ask(to("192.0.2.1", 80)).unwrap(), "home");
                let mut shown: Vec<(String, u64)> = p
                    .list_bindings()
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.unit, r.netns))
                    .collect();
                shown.sort();
                assert_eq!(
                    shown,
                    [
                        ("a.socket".to_owned(), a.ino),
                        ("b.socket".to_owned(), b.ino),
                        ("home.socket".to_owned(), own_netns_inode())
                    ]
                );
                // Within one namespace the usual conflict stands.
                let other = a.run(|| tcp_server("a2", "127.0.0.1:8081", false));
                let e = p
                    .register_sockets_with_directives(
                        "a2.socket",
                        &[Fd::from(other.fd())],
                        &["tcp:192.0.2.0/24:80"],
                    )
                    .await
                    .unwrap_err();
                assert_eq!(error_parts(&e).0, "org.skactivate1.Error.Conflict");
                other.close();

                // b going leaves a alone.
                p.unregister_unit("b.socket").await.unwrap();
                assert!(!state_dir(fs, b.ino).exists());
                assert!(state_dir(fs, a.ino).exists());
                assert_eq!(a.run(|| tcp_ask(to("192.0.2.1", 80))).unwrap(), "a");
                assert!(b.run(|| tcp_refused(to("192.0.2.1", 80))));
                p.unregister_unit("a.socket").await.unwrap();
                p.unregister_unit("home.socket").await.unwrap();
            });
            for s in [web_a, web_b, web_home] {
                s.close();
            }
        },
    );
}

/// A unit registered again with sockets of another namespace (a socket unit
/// restarted with a new one) moves: its bindings go from the old namespace,
/// whose dispatcher goes with its last unit, to the new one. UDP too.
#[test]
fn a_unit_registered_again_from_another_namespace_moves_there() {
    in_netns(
        "a_unit_registered_again_from_another_namespace_moves_there",
        |fs| {
            let (a, b) = (Netns::new(), Netns::new());
            let dns_a = a.run(|| udp_server("dns-a", "127.0.0.1:53"));
            let dns_b = b.run(|| udp_server("dns-b", "127.0.0.1:53"));
            with_manager(fs, async |p, conn| {
                p.register_sockets_with_directives(
                    "dns.socket",
                    &[Fd::from(dns_a.fd())],
                    &["udp:192.0.2.0/24"],
                )
                .await
                .unwrap();
                assert_eq!(a.run(|| udp_ask(to("192.0.2.53", 53))).unwrap(), "dns-a");
                assert!(state_dir(fs, a.ino).exists());

                p.register_sockets_with_directives(
                    "dns.socket",
                    &[Fd::from(dns_b.fd())],
                    &["udp:192.0.2.0/24"],
                )
                .await
                .unwrap();
                assert_eq!(b.run(|| udp_ask(to("192.0.2.53", 53))).unwrap(), "dns-b");
                assert!(
                    !state_dir(fs, a.ino).exists(),
                    "the old namespace's dispatcher went"
                );
                assert!(
                    a.run(|| udp_ask(to("192.0.2.53", 53))).is_err(),
                    "nothing answers in a any more"
                );
                assert_eq!(unit_netns(&conn, "dns.socket").await, b.ino);
                let list = p.list_bindings().await.unwrap();
                assert_eq!(list.len(), 1);
                assert_eq!((list[0].netns, list[0].cookie), (b.ino, dns_b.cookie));
                p.unregister_unit("dns.socket").await.unwrap();
                assert!(!state_dir(fs, b.ino).exists());
            });
            dns_a.close();
            dns_b.close();
        },
    );
}

/// A unit whose sockets live in two namespaces is refused, naming the unit
/// and both namespaces, and nothing is left behind.
#[test]
fn a_unit_spanning_two_namespaces_is_refused() {
    in_netns("a_unit_spanning_two_namespaces_is_refused", |fs| {
        let inner = Netns::new();
        let here = tcp_server("here", "127.0.0.1:8080", false);
        let there = inner.run(|| udp_server("there", "127.0.0.1:53"));
        let home = own_netns_inode();
        with_manager(fs, async |p, _conn| {
            let e = p
                .register_sockets_with_directives(
                    "split.socket",
                    &[Fd::from(here.fd()), Fd::from(there.fd())],
                    &["192.0.2.0/24"],
                )
                .await
                .unwrap_err();
            let (name, text) = error_parts(&e);
            assert_eq!(name, "org.skactivate1.Error.InvalidSocket", "{text}");
            assert!(
                text.contains("split.socket")
                    && text.contains(&home.to_string())
                    && text.contains(&inner.ino.to_string())
                    && text.contains("two network namespaces"),
                "{text}"
            );
            assert!(p.list_units().await.unwrap().is_empty());
            assert!(!state_dir(fs, inner.ino).exists());
            assert_eq!(p.network_namespaces().await.unwrap(), [home]);
        });
        here.close();
        there.close();
    });
}

/// A restarted daemon adopts the dispatcher of another namespace from its
/// pinned state, with its unit; traffic flows in between. The state of a
/// namespace that died while the daemon was away is removed at the next
/// start.
#[test]
fn a_restarted_daemon_adopts_other_namespaces_and_drops_dead_ones() {
    in_netns(
        "a_restarted_daemon_adopts_other_namespaces_and_drops_dead_ones",
        |fs| {
            let inner = Netns::new();
            let web = inner.run(|| tcp_server("inner-web", "127.0.0.1:8080", false));
            let doomed = Netns::new();
            let doomed_ino = doomed.ino;
            let gone = doomed.run(|| tcp_server("doomed", "127.0.0.1:8080", false));
            with_manager(fs, async |p, _conn| {
                for (unit, s) in [("inner.socket", &web), ("doomed.socket", &gone)] {
                    p.register_sockets_with_directives(
                        unit,
                        &[Fd::from(s.fd())],
                        &["tcp:192.0.2.0/24:80"],
                    )
                    .await
                    .unwrap();
                }
            });
            // No daemon: the pinned link still serves the namespace.
            assert_eq!(
                inner.run(|| tcp_ask(to("192.0.2.5", 80))).unwrap(),
                "inner-web"
            );
            // The doomed namespace dies: its last socket and fd closed.
            gone.close();
            drop(doomed);
            with_manager(fs, async |p, conn| {
                let units: Vec<(String, u64)> = p
                    .list_units()
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|u| (u.unit, u.netns))
                    .collect();
                assert!(
                    units.contains(&("inner.socket".to_owned(), inner.ino)),
                    "{units:?}"
                );
                assert_eq!(unit_netns(&conn, "inner.socket").await, inner.ino);
                let list = p.list_bindings().await.unwrap();
                assert!(
                    list.iter().any(|b| b.unit == "inner.socket"
                        && b.netns == inner.ino
                        && b.cookie == web.cookie),
                    "{list:?}"
                );
                assert_eq!(
                    inner.run(|| tcp_ask(to("192.0.2.5", 80))).unwrap(),
                    "inner-web"
                );
                // Still adoptable, or not: a namespace's cleanup is asynchronous.
                let _ = p.unregister_unit("doomed.socket").await;
            });
            // Whether it was torn down just above or found dead at a later start,
            // its state goes; starts until then (bounded) adopt it harmlessly.
            let start = Instant::now();
            while state_dir(fs, doomed_ino).exists() && start.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(100));
                with_manager(fs, async |_p, _conn| {});
            }
            assert!(
                !state_dir(fs, doomed_ino).exists(),
                "the dead namespace's state stays"
            );
            with_manager(fs, async |p, _conn| {
                p.unregister_unit("inner.socket").await.unwrap();
                assert!(!state_dir(fs, inner.ino).exists());
            });
            web.close();
        },
    );
}

/// A dead namespace whose unit was never unregistered: the next start finds
/// its link detached by the kernel and removes the state.
#[test]
fn the_state_of_a_namespace_that_died_is_removed_at_start() {
    in_netns(
        "the_state_of_a_namespace_that_died_is_removed_at_start",
        |fs| {
            let doomed = Netns::new();
            let ino = doomed.ino;
            let s = doomed.run(|| tcp_server("doomed", "127.0.0.1:8080", false));
            with_manager(fs, async |p, _conn| {
                p.register_sockets_with_directives(
                    "doomed.socket",
                    &[Fd::from(s.fd())],
                    &["tcp:192.0.2.0/24:80"],
                )
                .await
                .unwrap();
            });
            s.close();
            drop(doomed);
            // The kernel frees a namespace in a work queue: wait (bounded) until
            // its link says it serves none, then start.
            let dir = state_dir(fs, ino);
            let start = Instant::now();
            loop {
                let d = Dispatcher::adopt_pinned(&fs.path, ino).unwrap();
                match d {
                    None => break,
                    Some(d) => {
                        drop(d);
                        assert!(
                            start.elapsed() < Duration::from_secs(20),
                            "the namespace never died"
                        );
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            assert!(
                !dir.exists(),
                "adopt_pinned removed the dead namespace's state"
            );
            with_manager(fs, async |p, _conn| {
                assert!(p.list_units().await.unwrap().is_empty());
                assert_eq!(p.network_namespaces().await.unwrap().len(), 1);
            });
        },
    );
}

/// A private dbus-daemon and the real daemon binary on it.
struct Daemon {
    bus: Child,
    daemon: Option<Child>,
    address: String,
    bpffs: PathBuf,
    /// `NOTIFY_SOCKET` for the daemon, if any.
    notify: Option<PathBuf>,
    /// `WATCHDOG_USEC` for the daemon, if any.
    watchdog: Option<Duration>,
}

impl Daemon {
    fn start(fs: &Bpffs) -> Daemon {
        Daemon::start_notifying(fs, None)
    }

    fn start_notifying(fs: &Bpffs, notify: Option<&Path>) -> Daemon {
        Daemon::start_watched(fs, notify, None)
    }

    fn start_watched(fs: &Bpffs, notify: Option<&Path>, watchdog: Option<Duration>) -> Daemon {
        let dir = scratch_dir("netns-bus");
        let sock = dir.join("bus");
        let _ = std::fs::remove_file(&sock);
        let address = format!("unix:path={}", sock.display());
        let bus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", "--nosyslog"])
            .arg(format!("--address={address}"))
            .stdout(Stdio::null())
            .spawn()
            .expect("dbus-daemon");
        let start = Instant::now();
        while !sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "dbus-daemon never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut d = Daemon {
            bus,
            daemon: None,
            address,
            bpffs: fs.path.clone(),
            notify: notify.map(Path::to_owned),
            watchdog,
        };
        d.restart();
        d
    }

    fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skactivate"));
        cmd.args(["daemon", "--bus", &self.address, "--bpffs"])
            .arg(&self.bpffs)
            // No system bus: systemd is not asked about these units.
            .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")
            .env_remove("NOTIFY_SOCKET")
            .stderr(Stdio::piped());
        if let Some(n) = &self.notify {
            cmd.env("NOTIFY_SOCKET", n);
        }
        cmd.env_remove("WATCHDOG_USEC").env_remove("WATCHDOG_PID");
        if let Some(w) = self.watchdog {
            cmd.env("WATCHDOG_USEC", w.as_micros().to_string());
        }
        let child = cmd.spawn().expect("skactivate daemon");
        self.daemon = Some(child);
        let start = Instant::now();
        loop {
            let out = self.cli(&["status", "--json"]);
            if out.status.success() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the daemon never answered: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(c) = self.daemon.take() {
            // SAFETY: kill(2) on our own child's pid, which we have not reaped.
            let _ = unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "daemon: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_skactivate"))
            .args(args)
            .args(["--bus", &self.address])
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "skactivate {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// `RegisterSocketsWithDirectives(unit, [fd], [directive])` over the
    /// daemon's bus, answered within 10 s: (sockets, bindings).
    fn register(&self, unit: &str, fd: std::os::fd::BorrowedFd<'_>, directive: &str) -> (u32, u32) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let conn = zbus::connection::Builder::address(self.address.as_str())
                .unwrap()
                .build()
                .await
                .unwrap();
            let call = async {
                SkactivateProxy::new(&conn)
                    .await
                    .unwrap()
                    .register_sockets_with_directives(unit, &[Fd::from(fd)], &[directive])
                    .await
                    .unwrap()
            };
            tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .unwrap_or_else(|_| panic!("registering {unit} took more than 10 s"))
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.bus.kill();
        let _ = self.bus.wait();
    }
}

/// The daemon never waits on the service manager. Its notification queue
/// is full (`net.unix.max_dgram_qlen` 0 in this namespace: one datagram
/// fits, READY=1 takes it, and nothing reads until later): a registration,
/// whose handler tells the manager the new status with the service locked,
/// still answers, and so does `status`; the new status is sent once there is
/// room; and with the queue full again SIGTERM still stops the daemon.
/// (With `sd_notify`'s blocking send the registration never returned.)
#[test]
fn a_manager_that_reads_late_does_not_hold_the_daemon_up() {
    in_netns(
        "a_manager_that_reads_late_does_not_hold_the_daemon_up",
        |fs| {
            std::fs::write("/proc/sys/net/unix/max_dgram_qlen", "0").unwrap();
            let dir = scratch_dir("notify");
            let path = dir.join("notify");
            let _ = std::fs::remove_file(&path);
            // Made in this namespace, so its queue holds one datagram.
            let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
            rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut d = Daemon::start_notifying(fs, Some(&path));
            let web = tcp_server("web", "127.0.0.1:8080", false);
            // The handler tells the manager with the service locked.
            let registered = d.register("web.socket", web.fd(), &format!("tcp:{PREFIX}:80"));
            assert_eq!(registered, (1, 1));
            let s = d.json(&["status", "--json"]);
            assert_eq!(s["units"][0]["unit"], "web.socket", "{s}");
            let mut buf = [0u8; 4096];
            let k = rx.recv(&mut buf).expect("READY=1");
            let first = String::from_utf8_lossy(&buf[..k]).into_owned();
            assert!(
                first.contains("READY=1\n")
                    && first.contains("STATUS=0 units, 0 bindings, 0 sockets\n"),
                "{first:?}"
            );
            // Room now: the status the registration left owed comes (sent again
            // every 500 ms while owed), and nothing older.
            let k = rx.recv(&mut buf).expect("the status owed");
            assert_eq!(
                String::from_utf8_lossy(&buf[..k]),
                "STATUS=1 units, 1 bindings, 1 sockets\n"
            );
            // The queue full again: SIGTERM's STOPPING=1 does not wait either.
            let filler = std::os::unix::net::UnixDatagram::unbound().unwrap();
            filler.send_to(b"X=1\n", &path).unwrap();
            let mut child = d.daemon.take().unwrap();
            // SAFETY: kill(2) on our own child's pid, which we have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            let status = loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break st;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the daemon did not stop on SIGTERM with the manager's queue full");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(status.success(), "{status:?}");
            let _ = std::fs::remove_dir_all(&dir);
        },
    );
}

/// The daemon's notifications over time: with `WATCHDOG_USEC` (1 s here) it
/// pings at half that; without, it says `READY=1` and then nothing, and its
/// threads do not run while nothing happens (no timer of its own).
#[test]
fn the_daemon_pings_its_watchdog_and_is_quiet_without_one() {
    in_netns(
        "the_daemon_pings_its_watchdog_and_is_quiet_without_one",
        |fs| {
            let dir = scratch_dir("watchdog");
            let path = dir.join("notify");
            let _ = std::fs::remove_file(&path);
            let rx = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
            rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 4096];
            let mut next = |timeout: Duration| {
                rx.set_read_timeout(Some(timeout)).unwrap();
                rx.recv(&mut buf)
                    .ok()
                    .map(|k| String::from_utf8_lossy(&buf[..k]).into_owned())
            };

            let mut d = Daemon::start_watched(fs, Some(&path), Some(Duration::from_secs(1)));
            let first = next(Duration::from_secs(10)).expect("READY=1");
            assert!(first.contains("READY=1\n"), "{first:?}");
            let start = Instant::now();
            let mut pings = 0;
            while start.elapsed() < Duration::from_millis(2200) {
                match next(Duration::from_millis(2200)) {
                    Some(m) => {
                        assert_eq!(m, "WATCHDOG=1\n");
                        pings += 1;
                    }
                    None => break,
                }
            }
            assert!(
                (3..=6).contains(&pings),
                "{pings} pings in 2.2 s at WATCHDOG_USEC=1s"
            );
            d.stop();
            // What the first daemon said last (a ping, STOPPING=1) is read.
            while next(Duration::from_millis(300)).is_some() {}

            d.watchdog = None;
            d.restart();
            let first = next(Duration::from_secs(10)).expect("READY=1");
            assert!(first.contains("READY=1\n"), "{first:?}");
            let pid = d.daemon.as_ref().unwrap().id();
            let switches = || -> u64 {
                std::fs::read_dir(format!("/proc/{pid}/task"))
                    .unwrap()
                    .flatten()
                    .map(|t| {
                        std::fs::read_to_string(t.path().join("status"))
                            .unwrap_or_default()
                            .lines()
                            .filter(|l| l.contains("ctxt_switches"))
                            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                            .sum::<u64>()
                    })
                    .sum()
            };
            // Let the start settle, then watch two idle seconds.
            std::thread::sleep(Duration::from_millis(500));
            let before = switches();
            assert_eq!(next(Duration::from_secs(2)), None, "a message while idle");
            assert_eq!(switches(), before, "the daemon ran while idle");
            d.stop();
            let _ = std::fs::remove_dir_all(&dir);
        },
    );
}

/// The real daemon and CLI: a socket of another namespace registered over
/// the bus; `lookup --netns` asks that namespace's program; `status`,
/// `bindings` (both `--json`) and `metrics` show the namespace; a restarted
/// daemon adopts it; `unregister` tears it down.
#[test]
fn the_daemon_and_its_cli_show_and_ask_other_namespaces() {
    in_netns(
        "the_daemon_and_its_cli_show_and_ask_other_namespaces",
        |fs| {
            let inner = Netns::new();
            let web = inner.run(|| tcp_server("inner-web", "127.0.0.1:8080", false));
            let mut d = Daemon::start(fs);
            assert_eq!(
                d.register("inner.socket", web.fd(), "tcp:192.0.2.0/24:80"),
                (1, 1)
            );
            assert_eq!(
                inner.run(|| tcp_ask(to("192.0.2.9", 80))).unwrap(),
                "inner-web"
            );
            let home = own_netns_inode();

            let check = |d: &Daemon| {
                let path = inner.path();
                let l = d.json(&[
                    "lookup",
                    "tcp",
                    "192.0.2.9",
                    "80",
                    "--netns",
                    &path,
                    "--json",
                ]);
                assert_eq!(l["verdict"], "redirect", "{l}");
                assert_eq!(l["unit"], "inner.socket");
                assert_eq!(l["netns"], inner.ino);
                assert_eq!(l["cookie"], web.cookie);
                let text = d.ok(&["lookup", "tcp", "192.0.2.9", "80", "--netns", &path]);
                assert!(
                    text.contains("inner.socket") && text.contains(&inner.ino.to_string()),
                    "{text}"
                );
                let l = d.json(&["lookup", "tcp", "192.0.2.9", "80", "--json"]);
                assert_eq!(l["verdict"], "pass", "the daemon's own namespace: {l}");
                assert_eq!(l["netns"], home);

                let s = d.json(&["status", "--json"]);
                assert_eq!(s["netns"], home, "{s}");
                assert_eq!(s["namespaces"], serde_json::json!([home, inner.ino]), "{s}");
                assert_eq!(s["units"][0]["unit"], "inner.socket");
                assert_eq!(s["units"][0]["netns"], inner.ino);
                let text = d.ok(&["status", "inner.socket"]);
                assert!(text.contains(&format!("Netns: {}", inner.ino)), "{text}");
                let b = d.json(&["bindings", "--json"]);
                assert_eq!(b[0]["unit"], "inner.socket", "{b}");
                assert_eq!(b[0]["netns"], inner.ino);
                let m = d.ok(&["metrics"]);
                assert!(
                m.contains(&format!(
                    "skactivate_lookups_total{{unit=\"inner.socket\",netns=\"{}\",family=\"ipv4\",protocol=\"tcp\"}}",
                    inner.ino
                )),
                "{m}"
            );
                assert!(m.contains("skactivate_dispatchers 2\n"), "{m}");
            };
            check(&d);
            // A bad --netns is said with its path.
            let out = d.cli(&[
                "lookup",
                "tcp",
                "192.0.2.9",
                "80",
                "--netns",
                "/nonexistent/ns",
            ]);
            assert_eq!(out.status.code(), Some(1));
            assert!(String::from_utf8_lossy(&out.stderr).contains("--netns /nonexistent/ns"));

            d.restart();
            assert_eq!(
                inner.run(|| tcp_ask(to("192.0.2.9", 80))).unwrap(),
                "inner-web"
            );
            check(&d);

            d.ok(&["unregister", "inner.socket"]);
            assert!(
                !state_dir(fs, inner.ino).exists(),
                "torn down with its last unit"
            );
            let s = d.json(&["status", "--json"]);
            assert_eq!(s["namespaces"], serde_json::json!([home]), "{s}");
            assert!(inner.run(|| tcp_refused(to("192.0.2.9", 80))));
            d.stop();
            web.close();
        },
    );
}

/// Under a real systemd, with the shipped units (the daemon's capability set
/// and sandbox): a socket unit with `NetworkNamespacePath=` serves its prefix
/// inside that namespace, reached from inside it, while the daemon's own
/// namespace, which routes the same prefix locally, is untouched; the CLI
/// shows and asks that namespace; stopping the socket tears its dispatcher
/// down.
#[test]
fn a_socket_unit_in_another_namespace_under_systemd() {
    use common::systemd::{ADMIN_UNITS, SETTLE, Systemd, describe, poll_until, repo};
    let Some(sd) = Systemd::boot() else { return };
    sd.install_skactivate();
    let inner = sd.named_netns("inner", "203.0.113.0/24");
    // The daemon's own namespace routes the prefix too: only the binding is missing there.
    sd.local_route("203.0.113.0/24");
    sd.write_file(
        &format!("{ADMIN_UNITS}/inner-web.socket"),
        b"[Socket]\nListenStream=127.0.0.1:8080\nNetworkNamespacePath=/run/netns/inner\n\
          X-SkLookup=tcp:203.0.113.0/24:80\n",
        0o644,
    );
    let service = std::fs::read_to_string(repo().join("units/examples/webserver.service"))
        .unwrap()
        .replace("webserver.socket", "inner-web.socket");
    sd.write_file(
        &format!("{ADMIN_UNITS}/inner-web.service"),
        service.as_bytes(),
        0o644,
    );
    sd.daemon_reload();
    sd.ok(&["systemctl", "start", "inner-web.socket"]);
    assert!(
        poll_until(SETTLE, || sd
            .exec(&["skactivate", "status", "inner-web.socket"])
            .status
            .success()),
        "inner-web.socket never registered:\n{}\n{}",
        sd.status("skactivate@inner-web.service"),
        sd.journal("skactivate.service")
    );
    let own = sd.inode("/proc/self/ns/net");
    assert_ne!(inner, own);

    // Inside the namespace the prefix reaches the socket unit's service.
    let ask = "import urllib.request as u; \
               print(u.urlopen('http://203.0.113.5/', timeout=3).read().decode())";
    let reached = || sd.exec(&["ip", "netns", "exec", "inner", "python3", "-c", ask]);
    let out = reached();
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&["ip", "netns", "exec", "inner", "python3"], &out),
        sd.journal("skactivate.service")
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("inner-web 203.0.113.5:80"), "{said}");
    // The daemon's own namespace: no binding, so nothing listens there.
    let refused = sd.exec(&["python3", "-c", ask]);
    assert!(
        !refused.status.success(),
        "reached in the daemon's own namespace: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    let l = sd.ok(&["skactivate", "lookup", "tcp", "203.0.113.5", "80", "--json"]);
    let l: serde_json::Value = serde_json::from_str(&l).unwrap();
    assert_eq!(l["verdict"], "pass", "{l}");

    // The CLI shows the namespace and asks its program.
    let l = sd.ok(&[
        "skactivate",
        "lookup",
        "--netns",
        "/run/netns/inner",
        "tcp",
        "203.0.113.5",
        "80",
        "--json",
    ]);
    let l: serde_json::Value = serde_json::from_str(&l).unwrap();
    assert_eq!(
        (&l["verdict"], &l["unit"]),
        (&"redirect".into(), &"inner-web.socket".into()),
        "{l}"
    );
    assert_eq!(l["netns"], inner);
    let b: serde_json::Value =
        serde_json::from_str(&sd.ok(&["skactivate", "bindings", "--json"])).unwrap();
    assert_eq!(b[0]["unit"], "inner-web.socket", "{b}");
    assert_eq!(b[0]["netns"], inner, "{b}");
    let s: serde_json::Value =
        serde_json::from_str(&sd.ok(&["skactivate", "status", "--json"])).unwrap();
    assert_eq!(s["netns"], own, "{s}");
    assert_eq!(s["namespaces"], serde_json::json!([own, inner]), "{s}");
    assert_eq!(s["units"][0]["netns"], inner, "{s}");
    let state = sd.ok(&["ls", "/sys/fs/bpf/skactivate"]);
    assert!(state.lines().any(|l| l == inner.to_string()), "{state}");
    let prop = sd.unit_property("inner-web.socket", "NetworkNamespace");
    assert_eq!(prop.trim(), format!("t {inner}"));

    // Stopping the socket unit takes the namespace's dispatcher along.
    sd.ok(&["systemctl", "stop", "inner-web.socket"]);
    sd.wait_dispatcher_gone(inner);
    let s: serde_json::Value =
        serde_json::from_str(&sd.ok(&["skactivate", "status", "--json"])).unwrap();
    assert_eq!(s["namespaces"], serde_json::json!([own]), "{s}");
    let journal = sd.journal("skactivate.service");
    assert!(
        journal.contains(&format!("network namespace {inner}: dispatcher attached")),
        "{journal}"
    );
}
