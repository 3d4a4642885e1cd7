//! A real systemd, as PID 1 of throwaway namespaces, for end-to-end tests.
//!
//! [`Systemd::boot`] runs `tests/systemd/throwaway.sh up`: systemd-nspawn boots
//! the host's root filesystem under a tmpfs overlay, with its own network
//! namespace, the real dbus-daemon and journald, and a fresh bpffs at
//! `/sys/fs/bpf`. Each instance has its own state directory, so tests boot
//! several side by side. Dropping the value powers it off and removes
//! everything (see [`Systemd::down`]).
//!
//! ```ignore
//! let Some(sd) = Systemd::boot() else { return };  // skips only for a kernel reason
//! sd.install_skactivate();
//! sd.local_route("192.0.2.0/24");
//! sd.ok(&["systemctl", "start", "webserver.socket"]);
//! let who = sd.in_netns(|| poll_for(SETTLE, || http_ask("192.0.2.7:80".parse().unwrap()).ok()));
//! assert_eq!(who.as_deref(), Some("webserver"), "{}", sd.journal("skactivate"));
//! ```
//!
//! Commands run inside with [`Systemd::exec`] (`nsenter` into every namespace,
//! with the test's capabilities); files go in through stdin
//! ([`Systemd::write_file`]), never through `/proc/PID/root`, whose absolute
//! symlinks would resolve on the host. Every command has a time limit.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a command inside may take before it is killed.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the harness waits for something asynchronous to settle (a unit
/// becoming active, a first reply) before a test fails.
pub const SETTLE: Duration = Duration::from_secs(20);

/// Where the examples' servers are installed (see units/examples/README).
pub const EXAMPLES_DIR: &str = "/usr/local/lib/skactivate-examples";

/// The administrator's unit directory inside (bound to the state directory).
pub const ADMIN_UNITS: &str = "/etc/systemd/system";
/// The vendor unit directory inside, where the package puts its units.
pub const VENDOR_UNITS: &str = "/usr/lib/systemd/system";

/// Units shipped in `units/`, as installed into [`VENDOR_UNITS`].
pub const SHIPPED_UNITS: &[&str] = &["skactivate.service", "skactivate@.service"];
/// Example units in `units/examples/`, as installed into [`ADMIN_UNITS`].
pub const EXAMPLE_UNITS: &[&str] = &[
    "webserver.socket",
    "webserver.service",
    "echo-udp.socket",
    "echo-udp.service",
];
/// The examples' `X-SkLookup=` drop-ins, relative to `units/examples/`.
pub const EXAMPLE_DROPINS: &[&str] = &[
    "webserver.socket.d/sklookup.conf",
    "echo-udp.socket.d/sklookup.conf",
];

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_owned()
}

/// Why no systemd can be booted here, or `None`. Only a missing kernel
/// feature counts; everything else is a test failure.
pub fn missing_kernel_feature() -> Option<String> {
    for ns in ["mnt", "pid", "net", "uts", "ipc", "cgroup"] {
        if !Path::new("/proc/self/ns").join(ns).exists() {
            return Some(format!("kernel has no {ns} namespaces"));
        }
    }
    let has_fs = |name: &str| {
        fs::read_to_string("/proc/filesystems").is_ok_and(|all| {
            all.lines()
                .any(|l| l.split_whitespace().last() == Some(name))
        })
    };
    if !has_fs("overlay") {
        // Usually a module: load it before giving up.
        let _ = Command::new("modprobe").arg("overlay").output();
        if !has_fs("overlay") {
            return Some("kernel has no overlayfs (needed for --volatile=overlay)".into());
        }
    }
    for (name, why) in [
        ("bpf", "no bpffs"),
        ("cgroup2", "no cgroup v2"),
        ("tmpfs", "no tmpfs"),
    ] {
        if !has_fs(name) {
            return Some(format!("kernel has {why}"));
        }
    }
    None
}

/// What identifies one instance on the host, to prove after [`Systemd::down`]
/// that nothing of it is left.
#[derive(Debug, Clone)]
pub struct Instance {
    /// The machine name, also the name of its cgroups.
    pub machine: String,
    pub state_dir: PathBuf,
    /// systemd (PID 1 inside), as the host sees it.
    pub systemd_pid: u32,
    pub nspawn_pid: u32,
    /// Inodes of the container's network, mount and PID namespaces, and of
    /// the private mount namespace around nspawn.
    pub namespaces: Vec<(String, u64)>,
    /// Its cgroups on the host.
    pub cgroups: Vec<PathBuf>,
}

/// A booted systemd. Dropping it powers it off and cleans up.
#[derive(Debug)]
pub struct Systemd {
    script: PathBuf,
    instance: Instance,
    up: bool,
}

impl Systemd {
    /// Boot a fresh instance and wait until it is `running`. `None`, after
    /// printing why, only when the kernel cannot run it; any other failure
    /// panics with the console log.
    pub fn boot() -> Option<Systemd> {
        Self::boot_from(None)
    }

    /// [`Systemd::boot`] of another root file system (a Debian release made
    /// by packaging/release-root) under the same throwaway overlay: its own
    /// systemd, bus and files, this kernel.
    pub fn boot_root(root: &Path) -> Option<Systemd> {
        Self::boot_from(Some(root))
    }

    fn boot_from(root: Option<&Path>) -> Option<Systemd> {
        let test = std::thread::current()
            .name()
            .unwrap_or("systemd test")
            .to_owned();
        if let Some(why) = missing_kernel_feature() {
            eprintln!("SKIP {test}: cannot boot a throwaway systemd: {why}");
            return None;
        }
        let state_dir = std::env::temp_dir().join(format!(
            "skactivate-systemd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let script = repo().join("tests/systemd/throwaway.sh");
        let started = Instant::now();
        // Generous: a first run installs systemd-container.
        let mut up = Command::new(&script);
        up.arg("up")
            .env("SD_STATE", &state_dir)
            .env("SD_BOOT_TIMEOUT", "60");
        if let Some(root) = root {
            up.env("SD_ROOT", root);
        }
        let out = timed(&mut up, Duration::from_secs(600), None);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{test}: booting systemd failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let var = |key: &str| -> String {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("`throwaway.sh up` printed no {key}: {stdout}"))
                .to_owned()
        };
        let systemd_pid: u32 = var("SD_PID").parse().unwrap();
        let nspawn_pid: u32 = var("NSPAWN_PID").parse().unwrap();
        let machine = var("SD_MACHINE");
        let namespaces = [
            ("net", systemd_pid),
            ("mnt", systemd_pid),
            ("pid", systemd_pid),
            ("mnt", nspawn_pid),
        ]
        .iter()
        .filter_map(|&(ns, pid)| {
            let ino = fs::metadata(format!("/proc/{pid}/ns/{ns}")).ok()?.ino();
            Some((ns.to_owned(), ino))
        })
        .collect();
        let cgroups = ["systemd", "unified"]
            .iter()
            .map(|h| Path::new("/sys/fs/cgroup").join(h).join(&machine))
            .collect();
        let sd = Systemd {
            script,
            instance: Instance {
                machine,
                state_dir,
                systemd_pid,
                nspawn_pid,
                namespaces,
                cgroups,
            },
            up: true,
        };
        eprintln!(
            "{test}: systemd {} up in {:.2?} (pid {systemd_pid}, state {})",
            sd.instance.machine,
            started.elapsed(),
            sd.instance.state_dir.display()
        );
        Some(sd)
    }

    /// What identifies this instance on the host.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// systemd's PID as the host sees it.
    pub fn pid(&self) -> u32 {
        self.instance.systemd_pid
    }

    /// Run `argv` inside every namespace of the instance (with the test's
    /// capabilities, outside any unit), killed after [`EXEC_TIMEOUT`].
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.exec_input(argv, None)
    }

    /// [`Systemd::exec`] with `input` as stdin.
    pub fn exec_input(&self, argv: &[&str], input: Option<&[u8]>) -> Output {
        self.exec_within(argv, input, EXEC_TIMEOUT)
    }

    /// [`Systemd::exec_input`] with a time limit of its own, for the rare
    /// command that may take longer than [`EXEC_TIMEOUT`] (lintian).
    pub fn exec_within(&self, argv: &[&str], input: Option<&[u8]>, limit: Duration) -> Output {
        assert!(self.up, "exec on a powered-off systemd");
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.pid().to_string())
            .arg("-a")
            .args(argv);
        timed(&mut cmd, limit, input)
    }

    /// Run `argv` inside and return its stdout; panic with its output if it
    /// fails.
    pub fn ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(out.status.success(), "{}", describe(argv, &out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run a shell script inside (`sh -c`).
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }

    /// `systemctl ARGS...`
    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.exec(&[&["systemctl", "--no-pager"], args].concat())
    }

    /// `busctl --system ARGS...`
    pub fn busctl(&self, args: &[&str]) -> Output {
        self.exec(&[&["busctl", "--system", "--no-pager"], args].concat())
    }

    /// `busctl --system call` of a method of org.skactivate1.Manager:
    /// `manager_call("Lookup", &["ssq", "tcp", "192.0.2.1", "80"])`.
    pub fn manager_call(&self, member: &str, args: &[&str]) -> String {
        let mut argv = vec![
            "busctl",
            "--system",
            "call",
            "org.skactivate1",
            "/org/skactivate1",
        ];
        argv.extend(["org.skactivate1.Manager", member]);
        argv.extend_from_slice(args);
        self.ok(&argv)
    }

    /// `busctl --system get-property` of org.skactivate1.Manager: `u 1`.
    pub fn manager_property(&self, name: &str) -> String {
        self.ok(&[
            "busctl",
            "--system",
            "get-property",
            "org.skactivate1",
            "/org/skactivate1",
            "org.skactivate1.Manager",
            name,
        ])
    }

    /// `busctl --system get-property` of a registered unit's object.
    pub fn unit_property(&self, unit: &str, name: &str) -> String {
        let path = skactivate::dbus::unit_path(unit);
        self.ok(&[
            "busctl",
            "--system",
            "get-property",
            "org.skactivate1",
            path.as_str(),
            "org.skactivate1.Unit",
            name,
        ])
    }

    /// `systemctl show -P PROPERTY UNIT`, trimmed.
    pub fn property(&self, unit: &str, property: &str) -> String {
        self.ok(&["systemctl", "show", "-P", property, unit])
            .trim()
            .to_owned()
    }

    /// The unit's `ActiveState` (active, inactive, failed, activating, ...).
    pub fn active_state(&self, unit: &str) -> String {
        self.property(unit, "ActiveState")
    }

    /// Wait until the unit's `ActiveState` is `state`; panics with its status
    /// and journal after [`SETTLE`].
    pub fn wait_state(&self, unit: &str, state: &str) {
        if !poll_until(SETTLE, || self.active_state(unit) == state) {
            panic!(
                "{unit} did not become {state} within {SETTLE:?}: {}\n{}",
                self.active_state(unit),
                self.status(unit)
            );
        }
    }

    /// `systemctl status UNIT` output, whatever its exit code.
    pub fn status(&self, unit: &str) -> String {
        let out = self.systemctl(&["status", "--lines=0", unit]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Everything the unit logged in this boot, messages only (`-o cat`).
    /// Flushes journald first, so it holds whatever was logged before.
    pub fn journal(&self, unit: &str) -> String {
        let _ = self.exec(&["journalctl", "--sync"]);
        let out = self.exec(&[
            "journalctl",
            "--no-pager",
            "-q",
            "-b",
            "-o",
            "cat",
            "-u",
            unit,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Write `contents` to `path` inside (creating directories) with `mode`,
    /// atomically: whoever watches the directory (dbus-daemon does) sees the
    /// whole file with its mode or nothing (the temporary name is hidden and
    /// ends in `.tmp`, which neither systemd nor dbus-daemon reads).
    pub fn write_file(&self, path: &str, contents: &[u8], mode: u32) {
        let mode = format!("{mode:04o}");
        let argv = [
            "sh",
            "-ec",
            r#"tmp="$(dirname "$1")/.#$(basename "$1").tmp"
               install -D -m "$2" /dev/stdin "$tmp"
               mv -f "$tmp" "$1""#,
            "sh",
            path,
            &mode,
        ];
        let out = self.exec_input(&argv, Some(contents));
        assert!(out.status.success(), "{}", describe(&argv, &out));
    }

    /// Copy the host file `from` to `path` inside with `mode`.
    pub fn copy_in(&self, from: &Path, path: &str, mode: u32) {
        let contents = fs::read(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        self.write_file(path, &contents, mode);
    }

    /// Remove `path` inside (recursively; no error if missing).
    pub fn remove(&self, path: &str) {
        self.ok(&["rm", "-rf", "--", path]);
    }

    /// `systemctl daemon-reload` (which also runs the generators).
    pub fn daemon_reload(&self) {
        self.ok(&["systemctl", "daemon-reload"]);
    }

    /// Write `dropin` with one bad `X-SkLookup=` value on its line 3 (in
    /// `[section]`), `daemon-reload`, and check that reloading skactivate
    /// fails and its journal names the file, the line and the value. What
    /// stays in force is the caller's to check.
    pub fn refused_reload(&self, dropin: &str, section: &str, value: &str) {
        let text = format!("[{section}]\n# a typo\nX-SkLookup={value}\n");
        self.write_file(dropin, text.as_bytes(), 0o644);
        self.daemon_reload();
        let out = self.systemctl(&["reload", "skactivate.service"]);
        assert!(!out.status.success(), "a bad reload is reported as failed");
        let journal = self.journal("skactivate.service");
        assert!(
            journal.contains(&format!("{dropin}:3")) && journal.contains(value),
            "{journal}"
        );
    }

    /// Make the bus re-read its policy files and activation files.
    pub fn reload_dbus(&self) {
        self.ok(&[
            "busctl",
            "--system",
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "ReloadConfig",
        ]);
    }

    /// `ip route add local PREFIX dev lo` inside: traffic for the prefix is
    /// delivered locally, where sk_lookup sees it.
    pub fn local_route(&self, prefix: &str) {
        let family = if prefix.contains(':') { "-6" } else { "-4" };
        self.ok(&["ip", family, "route", "add", "local", prefix, "dev", "lo"]);
    }

    /// A named network namespace inside, `/run/netns/NAME`, with `lo` up and
    /// `prefix` delivered locally there; returns its inode.
    pub fn named_netns(&self, name: &str, prefix: &str) -> u64 {
        self.ok(&["ip", "netns", "add", name]);
        self.ok(&["ip", "-n", name, "link", "set", "lo", "up"]);
        self.ok(&[
            "ip", "-n", name, "route", "add", "local", prefix, "dev", "lo",
        ]);
        self.inode(&format!("/run/netns/{name}"))
    }

    /// The inode of a file inside (`stat -L`): a namespace's identity.
    pub fn inode(&self, path: &str) -> u64 {
        let out = self.ok(&["stat", "-L", "-c", "%i", path]);
        out.trim()
            .parse()
            .unwrap_or_else(|e| panic!("stat {path}: {out:?}: {e}"))
    }

    /// Wait until the daemon has taken down the dispatcher of namespace
    /// `ino` (its pinned state under /sys/fs/bpf/skactivate); panics if it
    /// stays.
    pub fn wait_dispatcher_gone(&self, ino: u64) {
        assert!(
            poll_until(SETTLE, || !self
                .ok(&["ls", "/sys/fs/bpf/skactivate"])
                .lines()
                .any(|l| l == ino.to_string())),
            "the dispatcher of {ino} stays:\n{}",
            self.journal("skactivate.service")
        );
    }

    /// Install skactivate as a package would: the freshly built binary as
    /// /usr/bin/skactivate with its generator symlink, `units/` in the vendor
    /// unit directory and the D-Bus files in /usr/share/dbus-1; then the
    /// examples with their `X-SkLookup=` drop-ins ([`Systemd::install_examples`]),
    /// `daemon-reload` and the bus's `ReloadConfig`. Starts nothing.
    pub fn install_skactivate(&self) {
        let units = repo().join("units");
        self.copy_in(
            Path::new(env!("CARGO_BIN_EXE_skactivate")),
            "/usr/bin/skactivate",
            0o755,
        );
        self.ok(&[
            "ln",
            "-sfn",
            "/usr/bin/skactivate",
            "/usr/lib/systemd/system-generators/skactivate-generator",
        ]);
        for unit in SHIPPED_UNITS {
            self.copy_in(&units.join(unit), &format!("{VENDOR_UNITS}/{unit}"), 0o644);
        }
        self.copy_in(
            &units.join("org.skactivate1.conf"),
            "/usr/share/dbus-1/system.d/org.skactivate1.conf",
            0o644,
        );
        self.copy_in(
            &units.join("org.skactivate1.service"),
            "/usr/share/dbus-1/system-services/org.skactivate1.service",
            0o644,
        );
        self.put_examples(true);
        self.daemon_reload();
        self.reload_dbus();
    }

    /// Install the example units into [`ADMIN_UNITS`] and their servers into
    /// [`EXAMPLES_DIR`], with the `X-SkLookup=` drop-ins or without (then they
    /// are plain socket-activated services), and `daemon-reload`.
    pub fn install_examples(&self, dropins: bool) {
        self.put_examples(dropins);
        self.daemon_reload();
    }

    fn put_examples(&self, dropins: bool) {
        let examples = repo().join("units/examples");
        for unit in EXAMPLE_UNITS {
            self.copy_in(
                &examples.join(unit),
                &format!("{ADMIN_UNITS}/{unit}"),
                0o644,
            );
        }
        for file in ["webserver.py", "echo-udp.py"] {
            self.copy_in(
                &examples.join(file),
                &format!("{EXAMPLES_DIR}/{file}"),
                0o755,
            );
        }
        self.copy_in(
            &examples.join("README"),
            &format!("{EXAMPLES_DIR}/README"),
            0o644,
        );
        for dropin in EXAMPLE_DROPINS {
            let path = format!("{ADMIN_UNITS}/{dropin}");
            if dropins {
                self.copy_in(&examples.join(dropin), &path, 0o644);
            } else {
                self.remove(&path);
            }
        }
    }

    /// Run `f` on a thread inside the instance's network namespace, so it
    /// can make real connections to its sockets; returns what `f` returns.
    /// A panic in `f` is the caller's.
    pub fn in_netns<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> R {
        let path = format!("/proc/{}/ns/net", self.pid());
        let ns = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::thread::scope(|s| {
            let thread = s.spawn(move || {
                // setns(CLONE_NEWNET) moves only this thread.
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns({path}): {e}"));
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Power off (bounded), kill what is left, remove the cgroups and the
    /// state directory. Panics if something could not be removed.
    pub fn down(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if !self.up {
            return;
        }
        self.up = false;
        let out = timed(
            Command::new(&self.script)
                .arg("down")
                .env("SD_STATE", &self.instance.state_dir),
            Duration::from_secs(60),
            None,
        );
        if !out.status.success() {
            let msg = describe(&["throwaway.sh", "down"], &out);
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }

    /// On a failing test: what a developer needs to see.
    fn dump_diagnostics(&self) {
        let failed = self.systemctl(&["--failed"]);
        let _ = self.exec(&["journalctl", "--sync"]);
        let journal = self.exec(&["journalctl", "--no-pager", "-q", "-b", "-n", "150"]);
        eprintln!(
            "--- systemd {} (test failed) ---\n$ systemctl --failed\n{}\n$ journalctl -b -n 150\n{}--- end ---",
            self.instance.machine,
            String::from_utf8_lossy(&failed.stdout),
            String::from_utf8_lossy(&journal.stdout),
        );
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        if self.up && std::thread::panicking() {
            self.dump_diagnostics();
        }
        self.shutdown();
    }
}

/// Call `f` until it returns true, for at most `within`; false if it never
/// did. `f` must be bounded itself.
pub fn poll_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    poll_for(within, || f().then_some(())).is_some()
}

/// Call `f` until it returns `Some`, for at most `within`.
pub fn poll_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= within {
            return None;
        }
        std::thread::sleep(pause.min(within.saturating_sub(start.elapsed())));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Run `cmd` with `input` as stdin and a time limit; on timeout it is killed
/// and the output says so (exit status of a kill).
fn timed(cmd: &mut Command, limit: Duration, input: Option<&[u8]>) -> Output {
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    std::thread::scope(|s| {
        if let Some(data) = input {
            let mut stdin = child.stdin.take().expect("piped");
            s.spawn(move || {
                let _ = stdin.write_all(data);
            });
        }
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out = s.spawn(move || {
            let mut buf = Vec::new();
            let _ = stdout.read_to_end(&mut buf);
            buf
        });
        let err = s.spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            buf
        });
        let start = Instant::now();
        let mut timed_out = false;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if start.elapsed() > limit {
                timed_out = true;
                let _ = child.kill();
                break child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let stdout = out.join().expect("reader");
        let mut stderr = err.join().expect("reader");
        if timed_out {
            stderr.extend(format!("\n(killed after {limit:?})\n").bytes());
        }
        Output {
            status,
            stdout,
            stderr,
        }
    })
}

/// A failed command, for a panic message.
pub fn describe(argv: &[&str], out: &Output) -> String {
    format!(
        "{argv:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The status and body of an HTTP/1.0 `GET /` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

/// How long one step of [`http_get`] may take. The first request to a
/// socket-activated example server waits for systemd to start a Python
/// process, which takes seconds on a loaded 2-CPU machine; this is a bound
/// that keeps a test from hanging, not a speed requirement.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /` over a fresh connection, every step bounded by [`HTTP_TIMEOUT`].
pub fn http_get(to: SocketAddr) -> io::Result<HttpReply> {
    http_get_padded(to, 0)
}

/// [`http_get`] with a request made `pad` bytes longer by headers of
/// 32 KiB at most (a proxy that arms a connection only once it has moved
/// enough is made to arm it).
pub fn http_get_padded(to: SocketAddr, pad: usize) -> io::Result<HttpReply> {
    let mut c = TcpStream::connect_timeout(&to, HTTP_TIMEOUT)?;
    c.set_read_timeout(Some(HTTP_TIMEOUT))?;
    c.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut request = format!("GET / HTTP/1.0\r\nHost: {to}\r\n");
    let mut left = pad;
    while left > 0 {
        // "X-Pad: " and CRLF take 9 bytes of each header.
        let n = left.clamp(10, 32 * 1024);
        request += &format!("X-Pad: {}\r\n", "x".repeat(n - 9));
        left = left.saturating_sub(n);
    }
    request += "\r\n";
    c.write_all(request.as_bytes())?;
    let mut reply = Vec::new();
    c.take(64 * 1024).read_to_end(&mut reply)?;
    let reply = String::from_utf8_lossy(&reply);
    let bad = || io::Error::other(format!("not an HTTP reply from {to}: {reply:?}"));
    let (head, body) = reply.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok(HttpReply {
        status,
        body: body.to_owned(),
    })
}

/// Ask an example web server (units/examples/webserver.py) who it is: the
/// name of the service that answered `GET /` at `to`. Fails unless it
/// answered 200 and saw the connection arrive at `to` itself.
pub fn http_ask(to: SocketAddr) -> io::Result<String> {
    let reply = http_get(to)?;
    let line = reply.body.trim_end();
    let (name, reached) = line
        .split_once(' ')
        .ok_or_else(|| io::Error::other(format!("{to}: unexpected body {line:?}")))?;
    if reply.status != 200 || reached.parse::<SocketAddr>().ok() != Some(to) {
        return Err(io::Error::other(format!(
            "{to}: answered {} {line:?}",
            reply.status
        )));
    }
    Ok(name.to_owned())
}
