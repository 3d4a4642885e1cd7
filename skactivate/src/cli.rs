//! The command line: every subcommand and option, in one clap definition
//! that the binary parses and the packaging turns into completions.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::daemon::Bus;

/// systemd socket activation for whole prefixes and port ranges, via BPF
/// sk_lookup.
#[derive(Debug, Parser)]
#[command(name = "skactivate", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the X-SkLookup= settings of socket units, offline and
    /// without privileges.
    ///
    /// Each argument is a socket unit name (looked up in systemd's unit
    /// search path, with its drop-ins) or, when it contains a "/", a unit
    /// file (read as the unit's fragment, with the drop-ins the search path
    /// has for its name). Exits 0 and prints the resulting bindings when
    /// every unit is valid, 1 and one line per problem on stderr when not.
    Check {
        /// Look for units and drop-ins under DIR instead of /.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Socket units (webserver.socket) or unit files (./webserver.socket).
        #[arg(value_name = "UNIT|FILE", required = true)]
        units: Vec<OsString>,
    },
    /// Run the daemon (as skactivate.service does): load or adopt the
    /// dispatcher of a network namespace and serve org.skactivate1.
    Daemon {
        /// The bus to serve on: system, session, or a D-Bus address.
        #[arg(long, value_name = "system|session|ADDRESS", default_value = "system")]
        bus: Bus,
        /// Where bpffs is mounted; state is pinned under DIR/skactivate/.
        #[arg(long, value_name = "DIR", default_value = crate::paths::DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// The network namespace to dispatch in (a path like /run/netns/NAME).
        #[arg(long, value_name = "PATH", default_value = "/proc/self/ns/net")]
        netns: PathBuf,
    },
    /// Hand the listening sockets systemd passed to this process (LISTEN_FDS)
    /// to the daemon as UNIT's, which then applies UNIT's X-SkLookup= lines.
    /// Run by skactivate@.service.
    Register {
        /// The socket unit (webserver.socket).
        unit: String,
        /// X-SkLookup= values to use instead of reading UNIT's files (for
        /// fd providers other than a socket unit); may be repeated.
        #[arg(long = "sklookup", value_name = "VALUE")]
        sklookup: Vec<String>,
        /// The bus the daemon is on: system, session, or a D-Bus address.
        #[arg(long, value_name = "system|session|ADDRESS", default_value = "system")]
        bus: Bus,
    },
    /// Take the listening sockets of a running process (a daemon that binds
    /// its own) with pidfd_getfd and hand them to the daemon as UNIT's, with
    /// UNIT's X-SkLookup= lines or the --sklookup values. Needs CAP_SYS_PTRACE
    /// (or the process's uid) and Linux >= 5.6.
    RegisterPid {
        /// The process holding the sockets.
        pid: i32,
        /// The registration's name (default: the systemd unit the process
        /// runs in, from its cgroup).
        #[arg(long, value_name = "UNIT")]
        unit: Option<String>,
        /// Take only this socket (its local address as bound); may be
        /// repeated. Default: every listening TCP and bound UDP socket.
        #[arg(long = "socket", value_name = "[tcp:|udp:]ADDRESS:PORT")]
        sockets: Vec<crate::register_pid::SocketSpec>,
        /// X-SkLookup= values to use instead of UNIT's own lines; may be
        /// repeated.
        #[arg(long = "sklookup", value_name = "VALUE")]
        sklookup: Vec<String>,
        /// Wait up to SECONDS for the process to bind what is asked for
        /// (the generated ExecStartPost= waits 30).
        #[arg(long, value_name = "SECONDS", default_value_t = 0)]
        wait: u32,
        /// The bus the daemon is on: system, session, or a D-Bus address.
        #[arg(long, value_name = "system|session|ADDRESS", default_value = "system")]
        bus: Bus,
    },
    /// Remove UNIT's bindings and sockets (ExecStopPost= of socket units).
    Unregister {
        /// The socket unit (webserver.socket).
        unit: String,
        /// The bus the daemon is on: system, session, or a D-Bus address.
        #[arg(long, value_name = "system|session|ADDRESS", default_value = "system")]
        bus: Bus,
    },
    /// Show the daemon, its registered units, their bindings, sockets and
    /// counters, and what looks wrong (a bound prefix without a local route,
    /// a UDP unit without PassPacketInfo=yes).
    Status {
        /// Only this unit.
        unit: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The bus the daemon is on: system, session, or a D-Bus address.
        #[arg(long, value_name = "system|session|ADDRESS", default_value = "system")]
        bus: Bus,
    },
    /// List every binding in precedence order (most specific first), with
    /// its unit and whether its socket is present.
    Bindings {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The bus the daemon is on: system, session, or a D-Bus address.
        #[arg(long, value_name = "system|session|ADDRESS", default_value = "system")]
        bus: Bus,
    },
    /// Which unit and socket a packet would reach, answered by running the
    /// live dispatcher program (BPF_PROG_TEST_RUN).
    Lookup {
        /// tcp or udp.
        protocol: crate::binding::Protocol,
        /// The local (destination) address of the packet.
        address: std::net::IpAddr,
        /// The local (destination) port.
        port: u16,
        /// Ask the dispatcher of this network namespace (/run/netns/NAME,
        /// /proc/PID/ns/net) instead of the daemon's own.
        #[arg(long, value_name = "PATH")]
        netns: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The bus the daemon is on: system, session, or a D-Bus address.
        #[arg(long, value_name = "system|session|ADDRESS", default_value = "system")]
        bus: Bus,
    },
    /// Print counters and gauges in the Prometheus text exposition format.
    Metrics {
        /// The bus the daemon is on: system, session, or a D-Bus address.
        #[arg(long, value_name = "system|session|ADDRESS", default_value = "system")]
        bus: Bus,
    },
    /// Proxy connections from the sockets systemd passed (LISTEN_FDS) to
    /// TARGET, as systemd-socket-proxyd does, with the kernel moving the
    /// bytes (SOCKMAP) where it can. Run by a service behind a socket unit.
    Proxy {
        /// Connections (and datagram flows) open at once; beyond it no more
        /// are accepted and they wait in the kernel's backlog.
        #[arg(long, short = 'c', value_name = "N", default_value_t = 256)]
        connections_max: usize,
        /// Exit when no connection has been open for this long (the socket
        /// unit starts us again on the next one): 30s, 5min, 1h, or seconds.
        #[arg(long, value_name = "TIME", value_parser = crate::proxy::parse_time)]
        exit_idle_time: Option<std::time::Duration>,
        /// Close a connection after this long without a byte either way;
        /// datagram flows end after it (default 60s for them).
        #[arg(long, value_name = "TIME", value_parser = crate::proxy::parse_time)]
        idle_timeout: Option<std::time::Duration>,
        /// Send a PROXY protocol header (v1 text or v2 binary) to the
        /// backend before any byte of the client's.
        #[arg(long, value_name = "v1|v2")]
        proxy_protocol: Option<crate::proxy::header::Version>,
        /// How bytes move: sockmap (in the kernel, after a probe; see the man
        /// page's known defect), splice (pipes, as socket-proxyd), auto
        /// (splice, until sockmap's defect is gone).
        #[arg(long, value_enum, default_value = "auto")]
        mode: crate::proxy::Mode,
        /// HOST:PORT, /path (AF_UNIX) or @abstract.
        #[arg(value_name = "TARGET")]
        target: crate::proxy::Target,
    },
}
