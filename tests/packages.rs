//! The Debian package, installed with dpkg into a throwaway systemd
//! (tests/common/systemd.rs) and used only through what it installed: the
//! webserver example from /usr/share/doc/skactivate/examples, the man pages,
//! the completions; then upgraded, removed and purged, each leaving the
//! system as README.md ("Packages") and skactivate(8) describe.
//!
//! The tests need a built package, so `cargo test` lists them as ignored;
//! `packaging/check` builds the .deb and runs them with
//! `SKACTIVATE_DEB=PATH cargo test --test packages -- --ignored`.
//! Without SKACTIVATE_DEB they take the one .deb in target/packages/.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::systemd::{ADMIN_UNITS, EXAMPLES_DIR, SETTLE, Systemd, http_ask, poll_for, repo};
use common::tcp_refused;

/// Where the package puts the examples.
const DOC_EXAMPLES: &str = "/usr/share/doc/skactivate/examples";

/// Every file and link the package installs, besides directories.
const INSTALLED: &[&str] = &[
    "/usr/bin/skactivate",
    "/usr/lib/systemd/system-generators/skactivate-generator",
    "/usr/lib/systemd/system/skactivate.service",
    "/usr/lib/systemd/system/skactivate@.service",
    "/usr/share/dbus-1/system.d/org.skactivate1.conf",
    "/usr/share/dbus-1/system-services/org.skactivate1.service",
    "/usr/share/man/man8/skactivate.8.gz",
    "/usr/share/man/man8/skactivate-generator.8.gz",
    "/usr/share/man/man5/skactivate.socket.5.gz",
    "/usr/share/man/man5/org.skactivate1.5.gz",
    "/usr/share/bash-completion/completions/skactivate",
    "/usr/share/zsh/vendor-completions/_skactivate",
    "/usr/share/fish/vendor_completions.d/skactivate.fish",
    "/usr/share/doc/skactivate/copyright",
];

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The .deb under test: `$SKACTIVATE_DEB`, or the only one in target/packages.
fn deb() -> PathBuf {
    if let Some(path) = std::env::var_os("SKACTIVATE_DEB") {
        return PathBuf::from(path);
    }
    let dir = repo().join("target/packages");
    let debs: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: build the package with packaging/build deb",
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    match debs.as_slice() {
        [one] => one.clone(),
        _ => panic!(
            "{}: expected one .deb, found {debs:?}; set SKACTIVATE_DEB",
            dir.display()
        ),
    }
}

/// A copy of `deb` whose version has `revision` as its Debian revision, to
/// upgrade to: same files, newer version (dpkg-deb on the host, in a
/// temporary directory only).
fn with_revision(deb: &Path, revision: u32) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "skactivate-packages-test-{}-{revision}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let tree = dir.join("tree");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("dpkg-deb")
        .arg("--raw-extract")
        .arg(deb)
        .arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control).unwrap();
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .expect("control has a Version");
    let upstream = version.rsplit_once('-').map_or(version, |(u, _)| u);
    let text = text.replace(
        &format!("Version: {version}\n"),
        &format!("Version: {upstream}-{revision}\n"),
    );
    fs::write(&control, text).unwrap();
    let out = dir.join(format!("skactivate_{upstream}-{revision}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&tree)
        .arg(&out));
    out
}

/// Boot a throwaway systemd and install `deb` into it with dpkg.
fn boot_with_package(deb: &Path) -> Option<Systemd> {
    let sd = Systemd::boot()?;
    // The throwaway system is the host's file system under an overlay. A
    // host built as a container image may carry Docker's policy-rc.d, which
    // forbids maintainer scripts to start services; a real system has none.
    // (Removed inside the overlay only.)
    sd.remove("/usr/sbin/policy-rc.d");
    install(&sd, deb);
    Some(sd)
}

fn install(sd: &Systemd, deb: &Path) {
    sd.copy_in(deb, "/tmp/skactivate.deb", 0o644);
    sd.ok(&["dpkg", "--install", "/tmp/skactivate.deb"]);
}

/// What the administrator does, with the package's examples and nothing
/// else: copy the web server's units, its server and its X-SkLookup=
/// drop-in where the examples' README says, add a drop-in of their own, add
/// the local routes, reload, start the socket.
///
/// The example socket listens on [::]:80, which the kernel's own lookup
/// finds for port 80 of any local address: only the other ports of the
/// second drop-in prove that the dispatcher is at work.
fn set_up_webserver(sd: &Systemd) {
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
        b"[Socket]\nX-SkLookup=192.0.2.0/24:8000-8099 203.0.113.7:*\n",
        0o644,
    );
    sd.local_route("192.0.2.0/24");
    sd.local_route("203.0.113.0/24");
    sd.daemon_reload();
    sd.ok(&["systemctl", "start", "webserver.socket"]);
}

/// `path` does not exist inside, not even as a dangling link.
fn assert_gone(sd: &Systemd, path: &str) {
    let out = sd.exec(&[
        "sh",
        "-c",
        r#"test ! -e "$1" && test ! -L "$1""#,
        "sh",
        path,
    ]);
    assert!(out.status.success(), "{path} is still there");
}

/// Ask the web server at `to` who it is, until it answers (registration runs
/// after `systemctl start` returns).
fn who_answers(sd: &Systemd, to: &str) -> Option<String> {
    let to = addr(to);
    sd.in_netns(|| poll_for(SETTLE, || http_ask(to).ok()))
}

#[test]
#[ignore = "needs the .deb: packaging/check builds it and runs these"]
fn installed_package_serves_a_prefix_through_the_example_webserver() {
    let Some(sd) = boot_with_package(&deb()) else {
        return;
    };
    for path in INSTALLED {
        sd.ok(&["test", "-e", path]);
    }
    // Every file as the package shipped it (DEBIAN/md5sums).
    assert_eq!(sd.ok(&["dpkg", "--verify", "skactivate"]), "");
    // The generator is the program, under its own name.
    assert_eq!(
        sd.ok(&[
            "readlink",
            "-f",
            "/usr/lib/systemd/system-generators/skactivate-generator"
        ])
        .trim(),
        "/usr/bin/skactivate"
    );
    // postinst enabled and started the daemon, not the template.
    assert_eq!(
        sd.ok(&["systemctl", "is-enabled", "skactivate.service"])
            .trim(),
        "enabled"
    );
    sd.wait_state("skactivate.service", "active");
    let template = sd.systemctl(&["is-enabled", "skactivate@.service"]);
    assert_eq!(String::from_utf8_lossy(&template.stdout).trim(), "static");

    set_up_webserver(&sd);
    let who = who_answers(&sd, "192.0.2.7:8042");
    assert_eq!(
        who.as_deref(),
        Some("webserver"),
        "{}\n{}",
        sd.journal("skactivate.service"),
        sd.journal("skactivate@webserver.service")
    );
    let targets = [
        "192.0.2.1:80",
        "192.0.2.200:8000",
        "192.0.2.254:8099",
        "203.0.113.7:22",
        "203.0.113.7:65535",
    ];
    let answers = sd.in_netns(|| {
        targets
            .iter()
            .map(|a| http_ask(addr(a)).map_err(|e| format!("{a}: {e}")))
            .collect::<Result<Vec<_>, _>>()
    });
    assert_eq!(answers, Ok(vec!["webserver".to_owned(); targets.len()]));
    // Ports outside the bindings are left to the kernel: nobody listens.
    assert!(sd.in_netns(|| tcp_refused(addr("192.0.2.7:8100"))));
    assert!(sd.in_netns(|| tcp_refused(addr("203.0.113.8:22"))));

    // The installed command and the bus policy: anyone may read.
    let status = sd.ok(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "skactivate",
        "status",
        "webserver.socket",
    ]);
    assert!(status.contains("tcp:192.0.2.0/24:8000-8099"), "{status}");
    let lookup = sd.ok(&["skactivate", "lookup", "tcp", "192.0.2.9", "80"]);
    assert!(lookup.contains("webserver.socket"), "{lookup}");

    // Every shipped unit and the examples as installed, with the man pages
    // their Documentation= names (systemd-analyze looks them up).
    let out = sd.exec(&[
        "systemd-analyze",
        "verify",
        "skactivate.service",
        "skactivate@webserver.service",
        "webserver.socket",
        "webserver.service",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("skactivate") || l.contains("webserver"))
        .collect();
    assert!(ours.is_empty(), "{stderr}");

    // The manuals read cleanly where an administrator reads them.
    for page in [
        "skactivate",
        "skactivate-generator",
        "skactivate.socket",
        "org.skactivate1",
    ] {
        let out = sd.exec(&["man", "--warnings", page]);
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "man {page}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "man {page} printed nothing");
    }
    // bash loads the completion and completes a subcommand.
    let completed = sd.ok(&[
        "bash",
        "-c",
        r#"source /usr/share/bash-completion/completions/skactivate
           COMP_WORDS=(skactivate look); COMP_CWORD=1; COMP_LINE="skactivate look"
           _skactivate skactivate look skactivate
           printf '%s\n' "${COMPREPLY[@]}""#,
    ]);
    assert_eq!(completed.trim(), "lookup");
}

#[test]
#[ignore = "needs the .deb: packaging/check builds it and runs these"]
fn upgrade_keeps_local_changes_and_remove_and_purge_leave_what_is_documented() {
    let deb1 = deb();
    let deb2 = with_revision(&deb1, 2);
    let Some(sd) = boot_with_package(&deb1) else {
        return;
    };
    // All configuration is the administrator's, under /etc/systemd/system:
    // the package has no conffiles.
    let conffiles = sd.ok(&[
        "dpkg-query",
        "--show",
        "--showformat=${Conffiles}",
        "skactivate",
    ]);
    assert_eq!(conffiles.trim(), "", "conffiles: {conffiles}");
    set_up_webserver(&sd);
    assert_eq!(
        who_answers(&sd, "192.0.2.7:8042").as_deref(),
        Some("webserver")
    );

    // A local change to the daemon's unit, the way systemd means it.
    let override_conf = format!("{ADMIN_UNITS}/skactivate.service.d/local.conf");
    let local = b"[Service]\nEnvironment=SKACTIVATE_LOCAL=kept\n";
    sd.write_file(&override_conf, local, 0o644);
    sd.daemon_reload();
    let before = sd.property("skactivate.service", "InvocationID");

    // Upgrade: the daemon restarts (and adopts the pinned dispatcher), the
    // local change stays and applies, the prefix keeps its binding.
    install(&sd, &deb2);
    let version = sd.ok(&[
        "dpkg-query",
        "--show",
        "--showformat=${Version}",
        "skactivate",
    ]);
    assert!(version.ends_with("-2"), "{version}");
    assert_eq!(sd.ok(&["dpkg", "--verify", "skactivate"]), "");
    sd.wait_state("skactivate.service", "active");
    assert_ne!(sd.property("skactivate.service", "InvocationID"), before);
    assert_eq!(sd.ok(&["cat", &override_conf]).as_bytes(), local);
    assert!(
        sd.property("skactivate.service", "Environment")
            .contains("SKACTIVATE_LOCAL=kept")
    );
    assert_eq!(
        who_answers(&sd, "192.0.2.8:8043").as_deref(),
        Some("webserver")
    );
    let bindings = sd.ok(&["skactivate", "bindings"]);
    assert!(bindings.contains("tcp:203.0.113.7/32:*"), "{bindings}");

    // A unit the administrator disabled stays disabled over an upgrade.
    sd.ok(&["systemctl", "disable", "skactivate.service"]);
    install(&sd, &deb2);
    let enabled = sd.systemctl(&["is-enabled", "skactivate.service"]);
    assert_eq!(String::from_utf8_lossy(&enabled.stdout).trim(), "disabled");
    sd.ok(&["systemctl", "enable", "skactivate.service"]);

    // dpkg -r: the daemon stops, the package's files go, the dispatcher is
    // taken out of the kernel, the generator's links go with the next
    // daemon-reload (postrm runs it). The socket unit is a plain socket unit
    // again: its own address answers, the prefix no longer does. The
    // administrator's files stay.
    sd.ok(&["dpkg", "--remove", "skactivate"]);
    assert_eq!(sd.active_state("skactivate.service"), "inactive");
    for path in INSTALLED {
        assert_gone(&sd, path);
    }
    assert_gone(&sd, "/sys/fs/bpf/skactivate");
    let wants = sd.property("webserver.socket", "Wants");
    assert!(!wants.contains("skactivate@"), "{wants}");
    assert_eq!(
        sd.in_netns(|| poll_for(SETTLE, || http_ask(addr("127.0.0.1:80")).ok()))
            .as_deref(),
        Some("webserver")
    );
    assert!(sd.in_netns(|| tcp_refused(addr("192.0.2.7:8042"))));
    assert!(sd.in_netns(|| tcp_refused(addr("203.0.113.7:22"))));
    sd.ok(&["test", "-e", &override_conf]);
    sd.ok(&[
        "test",
        "-e",
        &format!("{ADMIN_UNITS}/webserver.socket.d/sklookup.conf"),
    ]);
    // Removed, not purged: dpkg keeps the package's record until purge.
    let state = sd.ok(&[
        "dpkg-query",
        "--show",
        "--showformat=${db:Status-Abbrev}",
        "skactivate",
    ]);
    assert_eq!(state.trim(), "rc", "{state}");

    // dpkg -P: nothing of the package is left, not even the record of the
    // daemon having been enabled; the administrator's files still are.
    sd.ok(&["dpkg", "--purge", "skactivate"]);
    let known = sd.exec(&["dpkg-query", "--show", "skactivate"]);
    assert!(!known.status.success(), "dpkg still knows skactivate");
    for path in [
        "/etc/systemd/system/multi-user.target.wants/skactivate.service",
        "/etc/systemd/system/skactivate.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/skactivate.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-masked/skactivate.service",
        "/usr/share/doc/skactivate",
    ] {
        assert_gone(&sd, path);
    }
    sd.ok(&["test", "-e", &override_conf]);
    let _ = fs::remove_dir_all(deb2.parent().unwrap());
}
