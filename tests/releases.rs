//! Each Debian release's .deb (`packaging/build deb --suite SUITE`), installed
//! into a root of that release (`packaging/release-root NAME`, made with
//! mmdebstrap) booted as a throwaway systemd: that release's systemd, D-Bus
//! bus, glibc, dpkg, apt and lintian, this machine's kernel. Used as an
//! administrator would, from the package alone:
//!
//! * that release's lintian finds no error and no warning in the package;
//! * `apt-get install ./skactivate_*.deb` installs it offline, so its
//!   `Depends:` are met by what the release has;
//! * the generator and the units are where `pkg-config` says that release's
//!   systemd looks (split /usr on Debian 11), and the generator ran;
//! * a socket unit with an `X-SkLookup=` drop-in serves a prefix and port
//!   range (real connections to several addresses, a local route in the
//!   container's netns); restarting the daemon under a connection loop loses
//!   no connection; stopping the socket removes its bindings;
//! * `systemd-analyze verify` of the shipped units is clean and the journal
//!   has no "Unknown key"/"Unknown lvalue" for them (a unit with an unknown
//!   key shows that the journal would say so);
//! * on Debian 13 (systemd 257) also the systemd ≥ 256 route: a socket unit
//!   with `PassFileDescriptorsToExec=yes` and `ExecStartPost=skactivate
//!   register %N.socket` (units/examples/webdirect.socket).
//!
//! The tests need the packages and the roots, so `cargo test` lists them as
//! ignored; `packaging/check` builds both and runs them with
//! `SKACTIVATE_RELEASE_DEBS=DIR cargo test --test releases -- --ignored`,
//! DIR holding one directory per suite with its .deb.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::systemd::{
    ADMIN_UNITS, EXAMPLES_DIR, SETTLE, Systemd, describe, http_ask, poll_for, poll_until, repo,
};
use common::tcp_refused;

const DOC_EXAMPLES: &str = "/usr/share/doc/skactivate/examples";
const DEB_INSIDE: &str = "/tmp/skactivate.deb";

/// One root: its name for packaging/release-root, the suite of its .deb, and
/// its systemd's version.
struct Release {
    root: &'static str,
    suite: &'static str,
    systemd: u32,
    /// /lib, /bin, /sbin are links into /usr.
    merged_usr: bool,
    /// The unit behind dbus.service: dbus.service or dbus-broker.service.
    bus: &'static str,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The root file system of `name`, made by packaging/release-root unless
/// cached.
fn release_root(name: &str) -> PathBuf {
    let script = repo().join("packaging/release-root");
    let out = Command::new(&script)
        .arg(name)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(
        out.status.success(),
        "packaging/release-root {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The .deb built for `suite`: the one .deb in `$SKACTIVATE_RELEASE_DEBS/SUITE`
/// (default target/packages/releases/SUITE).
fn deb(suite: &str) -> PathBuf {
    let base = std::env::var_os("SKACTIVATE_RELEASE_DEBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/packages/releases"));
    let dir = base.join(suite);
    let debs: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: build it with packaging/build deb --suite {suite} {}",
                dir.display(),
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    match debs.as_slice() {
        [one] => one.clone(),
        _ => panic!("{}: expected one .deb, found {debs:?}", dir.display()),
    }
}

/// Run `argv` inside; its stdout, or a panic with everything it printed.
fn ok_within(sd: &Systemd, argv: &[&str], limit: Duration) -> String {
    let out = sd.exec_within(argv, None, limit);
    assert!(out.status.success(), "{}", describe(argv, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The journal lines of this boot in which systemd says it does not know a
/// setting ("Unknown key name …" since systemd 248-ish, "Unknown lvalue …"
/// before) and that name `what`.
fn unknown_settings(sd: &Systemd, what: &str) -> Vec<String> {
    let _ = sd.exec(&["journalctl", "--sync"]);
    let out = sd.ok(&["journalctl", "--no-pager", "-q", "-b", "-o", "cat"]);
    out.lines()
        .filter(|l| l.contains("Unknown key") || l.contains("Unknown lvalue"))
        .filter(|l| l.contains(what))
        .map(str::to_owned)
        .collect()
}

/// The daemon's bindings, as `skactivate bindings` prints them.
fn bindings(sd: &Systemd) -> String {
    sd.ok(&["skactivate", "bindings"])
}

/// Ask the example web server at each of `targets`, from inside the
/// container's netns: every one must answer as `name`.
fn all_answer(sd: &Systemd, name: &str, targets: &[&str]) {
    // The first may wait for registration and socket activation.
    let first = addr(targets[0]);
    let who = sd.in_netns(|| poll_for(SETTLE, || http_ask(first).ok()));
    assert_eq!(
        who.as_deref(),
        Some(name),
        "{}",
        sd.journal("skactivate.service")
    );
    let answers = sd.in_netns(|| {
        targets
            .iter()
            .map(|a| http_ask(addr(a)).map_err(|e| format!("{a}: {e}")))
            .collect::<Result<Vec<_>, _>>()
    });
    assert_eq!(answers, Ok(vec![name.to_owned(); targets.len()]));
}

/// The whole scenario on one release.
fn scenario(release: &Release) {
    let started = Instant::now();
    let deb = deb(release.suite);
    let root = release_root(release.root);
    let Some(sd) = Systemd::boot_root(&root) else {
        return;
    };
    let version = sd.ok(&["systemctl", "--version"]);
    assert!(
        version.starts_with(&format!("systemd {} ", release.systemd)),
        "{}: not systemd {}: {version}",
        release.root,
        release.systemd
    );
    let lib = sd.exec(&["test", "-L", "/lib"]);
    assert_eq!(
        lib.status.success(),
        release.merged_usr,
        "{}: /lib is a link (merged /usr): {}",
        release.root,
        lib.status.success()
    );
    assert_eq!(sd.property("dbus.service", "Id"), release.bus);
    sd.wait_state("dbus.service", "active");
    sd.copy_in(&deb, DEB_INSIDE, 0o644);

    // That release's lintian: no error, no warning.
    let lint = sd.exec_within(
        &[
            "lintian",
            "--fail-on",
            "error,warning",
            "--display-info",
            DEB_INSIDE,
        ],
        None,
        Duration::from_secs(600),
    );
    let lint_out = format!(
        "{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    eprintln!("{}: lintian: {}", release.root, lint_out.trim());
    assert!(
        lint.status.success(),
        "{}'s lintian: {lint_out}",
        release.root
    );

    // apt, offline (the container has no network): every dependency must
    // already be in the release's root. (apt 2.2's --no-download refuses a
    // local .deb.)
    ok_within(
        &sd,
        &[
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
            DEB_INSIDE,
        ],
        Duration::from_secs(300),
    );
    assert_eq!(sd.ok(&["dpkg", "--verify", "skactivate"]), "");

    // Where that release's systemd looks, as its pkg-config says.
    let pkg = |var: &str| {
        sd.ok(&["pkg-config", &format!("--variable={var}"), "systemd"])
            .trim()
            .to_owned()
    };
    let generators = pkg("systemdsystemgeneratordir");
    let unit_dir = pkg("systemdsystemunitdir");
    let generator = format!("{generators}/skactivate-generator");
    assert_eq!(
        sd.ok(&["readlink", "-f", &generator]).trim(),
        "/usr/bin/skactivate",
        "{generator}"
    );
    assert_eq!(
        sd.property("skactivate.service", "FragmentPath"),
        format!("{unit_dir}/skactivate.service")
    );
    let listed = sd.ok(&["dpkg", "-L", "skactivate"]);
    assert!(
        listed.lines().any(|l| l == generator),
        "the package does not ship {generator}:\n{listed}"
    );

    // postinst enabled and started the daemon.
    assert_eq!(
        sd.ok(&["systemctl", "is-enabled", "skactivate.service"])
            .trim(),
        "enabled"
    );
    sd.wait_state("skactivate.service", "active");

    // The administrator: the example web server from the package's
    // documentation, a drop-in of their own, a local route.
    sd.ok(&[
        "sh",
        "-ec",
        r#"cd "$1"
           install -m 0644 webserver.socket webserver.service "$2"/
           install -D -m 0644 webserver.socket.d/sklookup.conf "$2"/webserver.socket.d/sklookup.conf
           install -D -m 0755 webserver.py "$3"/webserver.py"#,
        "sh",
        DOC_EXAMPLES,
        ADMIN_UNITS,
        EXAMPLES_DIR,
    ]);
    sd.write_file(
        &format!("{ADMIN_UNITS}/webserver.socket.d/ports.conf"),
        b"[Socket]\nX-SkLookup=192.0.2.0/24:8000-8099\n",
        0o644,
    );
    sd.local_route("192.0.2.0/24");
    sd.daemon_reload();
    // The generator ran (where this release's systemd looks for it).
    let wants = sd.property("webserver.socket", "Wants");
    assert!(wants.contains("skactivate@webserver.service"), "{wants}");
    sd.ok(&["systemctl", "start", "webserver.socket"]);
    // Port 80 of the prefix reaches the [::]:80 socket by the kernel's own
    // lookup too; the other ports only through the dispatcher.
    all_answer(
        &sd,
        "webserver",
        &[
            "192.0.2.7:8042",
            "192.0.2.1:8000",
            "192.0.2.130:8050",
            "192.0.2.254:8099",
            "192.0.2.9:80",
        ],
    );
    assert!(sd.in_netns(|| tcp_refused(addr("192.0.2.7:8100"))));

    // The shipped units as that release's systemd reads them. (--man=no:
    // the roots have no man-db; tests/packages.rs reads the pages.)
    let verify = sd.exec(&[
        "systemd-analyze",
        "verify",
        "--man=no",
        "skactivate.service",
        "skactivate@webserver.service",
    ]);
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "{stderr}");
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("skactivate"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify: {stderr}");

    restart_under_load(&sd);

    // Stop: the bindings go, the prefix is refused.
    sd.ok(&["systemctl", "stop", "webserver.socket"]);
    assert!(
        poll_until(SETTLE, || !bindings(&sd).contains("webserver.socket")),
        "bindings left after stop: {}",
        bindings(&sd)
    );
    assert!(sd.in_netns(|| tcp_refused(addr("192.0.2.7:8042"))));

    if release.systemd >= 256 {
        self_registering_socket(&sd);
    }

    // Nothing of ours is a setting this systemd does not know: reload once
    // more so every loaded unit is parsed again, then read the journal. A
    // unit with a key no systemd knows shows the journal would say so.
    sd.write_file(
        &format!("{ADMIN_UNITS}/probe-unknown.service"),
        b"[Service]\nExecStart=/bin/true\nNoSuchSettingAnywhere=yes\n",
        0o644,
    );
    sd.daemon_reload();
    sd.ok(&[
        "systemctl",
        "show",
        "-P",
        "LoadState",
        "probe-unknown.service",
    ]);
    assert!(
        poll_until(SETTLE, || !unknown_settings(&sd, "probe-unknown")
            .is_empty()),
        "systemd did not log the unknown key of probe-unknown.service"
    );
    assert_eq!(unknown_settings(&sd, "skactivate"), Vec::<String>::new());
    eprintln!(
        "{}: scenario passed in {:.1?}",
        release.root,
        started.elapsed()
    );
}

/// `systemctl restart skactivate.service`, three times, while a loop asks
/// the prefix: no connection may fail.
fn restart_under_load(sd: &Systemd) {
    let pid_before = sd.property("skactivate.service", "MainPID");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let (stop2, ok2, failed2, errors) = (stop.clone(), ok.clone(), failed.clone(), &errors);
        s.spawn(move || {
            sd.in_netns(|| {
                let start = Instant::now();
                let mut i = 0u32;
                while !stop2.load(Ordering::Relaxed)
                    && start.elapsed() < Duration::from_secs(120)
                    && i < 20_000
                {
                    let to = SocketAddr::new(
                        std::net::Ipv4Addr::new(192, 0, 2, (i % 254 + 1) as u8).into(),
                        8000 + (i % 100) as u16,
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
        let running = poll_until(SETTLE, || ok.load(Ordering::Relaxed) >= 30);
        if running {
            for _ in 0..3 {
                sd.ok(&["systemctl", "restart", "skactivate.service"]);
                let seen = ok.load(Ordering::Relaxed);
                if !poll_until(SETTLE, || ok.load(Ordering::Relaxed) >= seen + 30) {
                    break;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed connections: {:?}",
        errors.lock().unwrap()
    );
    assert!(
        ok.load(Ordering::Relaxed) >= 120,
        "only {} answers",
        ok.load(Ordering::Relaxed)
    );
    sd.wait_state("skactivate.service", "active");
    assert_ne!(
        sd.property("skactivate.service", "MainPID"),
        pid_before,
        "the daemon was restarted"
    );
    // The restarted daemon adopted the unit.
    let listed = bindings(sd);
    assert!(listed.contains("192.0.2.0/24:8000-8099"), "{listed}");
}

/// systemd ≥ 256: webdirect.socket registers its own fds from
/// `ExecStartPost=` with `PassFileDescriptorsToExec=yes`.
fn self_registering_socket(sd: &Systemd) {
    sd.ok(&[
        "sh",
        "-ec",
        r#"cd "$1"; install -m 0644 webdirect.socket webdirect.service "$2"/"#,
        "sh",
        DOC_EXAMPLES,
        ADMIN_UNITS,
    ]);
    sd.local_route("198.51.100.0/24");
    sd.daemon_reload();
    sd.ok(&["systemctl", "start", "webdirect.socket"]);
    // ExecStartPost= ran before `systemctl start` returned: the binding is
    // there already, registered by the socket unit itself.
    let listed = bindings(sd);
    assert!(
        listed.contains("198.51.100.0/24:80") && listed.contains("webdirect.socket"),
        "{listed}\n{}",
        sd.journal("webdirect.socket")
    );
    let journal = sd.journal("webdirect.socket");
    assert!(
        journal.contains("webdirect.socket: registered 1 socket(s)"),
        "{journal}"
    );
    all_answer(
        sd,
        "webdirect",
        &["198.51.100.20:80", "198.51.100.1:80", "198.51.100.254:80"],
    );
    // Bound to 127.0.0.1:8080: without the dispatcher nothing of the prefix
    // would reach it.
    assert!(sd.in_netns(|| tcp_refused(addr("198.51.100.20:8080"))));
    sd.ok(&["systemctl", "stop", "webdirect.socket"]);
    assert!(
        poll_until(SETTLE, || !bindings(sd).contains("webdirect.socket")),
        "{}",
        bindings(sd)
    );
    assert!(sd.in_netns(|| tcp_refused(addr("198.51.100.20:80"))));
}

#[test]
#[ignore = "needs the release .debs and roots: packaging/check makes them and runs these"]
fn debian_11_split_usr() {
    scenario(&Release {
        root: "bullseye-split",
        suite: "bullseye",
        systemd: 247,
        merged_usr: false,
        bus: "dbus.service",
    });
}

#[test]
#[ignore = "needs the release .debs and roots: packaging/check makes them and runs these"]
fn debian_11_merged_usr() {
    scenario(&Release {
        root: "bullseye-merged",
        suite: "bullseye",
        systemd: 247,
        merged_usr: true,
        bus: "dbus.service",
    });
}

#[test]
#[ignore = "needs the release .debs and roots: packaging/check makes them and runs these"]
fn debian_12() {
    scenario(&Release {
        root: "bookworm",
        suite: "bookworm",
        systemd: 252,
        merged_usr: true,
        bus: "dbus.service",
    });
}

#[test]
#[ignore = "needs the release .debs and roots: packaging/check makes them and runs these"]
fn debian_13_dbus_daemon() {
    scenario(&Release {
        root: "trixie",
        suite: "trixie",
        systemd: 257,
        merged_usr: true,
        bus: "dbus.service",
    });
}

#[test]
#[ignore = "needs the release .debs and roots: packaging/check makes them and runs these"]
fn debian_13_dbus_broker() {
    scenario(&Release {
        root: "trixie-broker",
        suite: "trixie",
        systemd: 257,
        merged_usr: true,
        bus: "dbus-broker.service",
    });
}
