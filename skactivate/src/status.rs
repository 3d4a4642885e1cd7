//! `skactivate status`, `bindings`, `lookup` and `metrics`: clients of
//! org.skactivate1. Each gathers what the daemon says into plain structs, and
//! plain functions render them (a readable view, `--json`, Prometheus), so
//! the rendering is tested without a bus.

use std::fmt::Write as _;
use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::binding::Protocol;
use crate::daemon::Bus;
use crate::dbus::wire::LookupReply;
use crate::dbus::{SkactivateProxy, SkactivateUnitProxy};

/// What the manager object says about the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManagerInfo {
    pub version: String,
    pub netns: u64,
    pub state_path: String,
    pub program_id: u32,
    pub program_tag: String,
    pub attached: bool,
    /// Every network namespace the daemon serves a dispatcher in, its own
    /// (`netns`) first.
    pub namespaces: Vec<u64>,
}

/// What a unit object says about its unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitInfo {
    pub id: String,
    /// Inode of the network namespace its sockets live in.
    pub netns: u64,
    pub source: String,
    pub bindings: Vec<String>,
    pub sockets: Vec<SocketEntry>,
    pub lookups: u64,
    pub misses: u64,
    pub errors: u64,
    /// µs since the epoch.
    pub registered_at: u64,
    pub warnings: Vec<String>,
}

/// One row of `ListBindings`, as it comes off the wire.
pub use crate::dbus::wire::BindingEntry as BindingRow;
/// One row of `ListDestinations`, as it comes off the wire.
pub use crate::dbus::wire::DestinationEntry as DestinationRow;
/// One socket of a unit, as it comes off the wire.
pub use crate::dbus::wire::SocketEntry;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// A D-Bus failure as a person reads it.
fn explain(e: zbus::Error) -> anyhow::Error {
    match &e {
        zbus::Error::MethodError(name, msg, _)
            if name.as_str() == "org.freedesktop.DBus.Error.ServiceUnknown"
                || name.as_str() == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
        {
            anyhow::anyhow!(
                "the skactivate daemon is not running (start skactivate.service){}",
                msg.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
            )
        }
        zbus::Error::MethodError(_, Some(msg), _) => anyhow::anyhow!("{msg}"),
        _ => anyhow::Error::new(e),
    }
}

async fn manager(bus: &Bus) -> Result<(zbus::Connection, SkactivateProxy<'static>)> {
    let conn = bus
        .connect()
        .await
        .with_context(|| format!("connecting to the {bus:?} bus"))?;
    let p = SkactivateProxy::new(&conn).await?;
    Ok((conn, p))
}

async fn manager_info(p: &SkactivateProxy<'_>) -> Result<ManagerInfo> {
    Ok(ManagerInfo {
        version: p.version().await.map_err(explain)?,
        netns: p.net_ns().await.map_err(explain)?,
        state_path: p.state_path().await.map_err(explain)?,
        program_id: p.program_id().await.map_err(explain)?,
        program_tag: p.program_tag().await.map_err(explain)?,
        attached: p.attached().await.map_err(explain)?,
        namespaces: p.network_namespaces().await.map_err(explain)?,
    })
}

async fn unit_info(
    conn: &zbus::Connection,
    path: zbus::zvariant::OwnedObjectPath,
) -> Result<UnitInfo> {
    let u = SkactivateUnitProxy::builder(conn)
        .path(path)?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    Ok(UnitInfo {
        id: u.id().await.map_err(explain)?,
        netns: u.network_namespace().await.map_err(explain)?,
        source: u.source().await.map_err(explain)?,
        bindings: u.bindings().await.map_err(explain)?,
        sockets: u.sockets().await.map_err(explain)?,
        lookups: u.lookups().await.map_err(explain)?,
        misses: u.misses().await.map_err(explain)?,
        errors: u.errors().await.map_err(explain)?,
        registered_at: u.registered_at().await.map_err(explain)?,
        warnings: u.warnings().await.map_err(explain)?,
    })
}

/// `skactivate status [UNIT] [--json]`.
pub fn status(unit: Option<&str>, json: bool, bus: &Bus) -> Result<()> {
    let (m, units) = runtime()?.block_on(async {
        let (conn, p) = manager(bus).await?;
        // Asked first, without auto-start: status never starts the daemon.
        let listed = p.list_units().await.map_err(explain)?;
        let m = manager_info(&p).await?;
        let mut units = Vec::new();
        for listed in listed {
            if unit.is_none_or(|u| u == listed.unit) {
                units.push(unit_info(&conn, listed.path).await?);
            }
        }
        anyhow::Ok((m, units))
    })?;
    if let Some(u) = unit
        && units.is_empty()
    {
        bail!("{u}: not registered with skactivate");
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status_json(&m, &units))?
        );
    } else {
        print!("{}", render_status(&m, &units, unit.is_none()));
    }
    Ok(())
}

/// UTC `YYYY-MM-DD HH:MM:SS` for µs since the epoch (civil-from-days).
pub fn format_utc(usec: u64) -> String {
    let secs = usec / 1_000_000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn socket_text(s: &SocketEntry) -> String {
    let at = if s.local.is_empty() {
        String::new()
    } else {
        format!(" {}", s.local)
    };
    let state = if s.cookie == 0 {
        "gone".to_owned()
    } else {
        format!("cookie {}", s.cookie)
    };
    format!("{} {}{at} ({state})", s.family, s.protocol)
}

/// The readable view: the daemon, then each unit, its warnings last.
pub fn render_status(m: &ManagerInfo, units: &[UnitInfo], with_daemon: bool) -> String {
    let mut out = String::new();
    if with_daemon {
        let attached = if m.attached {
            "attached"
        } else {
            "NOT ATTACHED"
        };
        let _ = writeln!(out, "skactivate {}: dispatcher {attached}", m.version);
        let _ = writeln!(out, "  Program: id {} tag {}", m.program_id, m.program_tag);
        let _ = writeln!(out, "    Netns: {}", m.netns);
        let others: Vec<String> = m
            .namespaces
            .iter()
            .filter(|&&n| n != m.netns)
            .map(ToString::to_string)
            .collect();
        if !others.is_empty() {
            let _ = writeln!(out, "     Also: {}", others.join(" "));
        }
        let _ = writeln!(out, "    State: {}", m.state_path);
        let bindings: usize = units.iter().map(|u| u.bindings.len()).sum();
        let sockets: usize = units
            .iter()
            .map(|u| u.sockets.iter().filter(|s| s.cookie != 0).count())
            .sum();
        let _ = writeln!(
            out,
            "   Totals: {} units, {bindings} bindings, {sockets} sockets",
            units.len()
        );
    }
    for u in units {
        if with_daemon || !out.is_empty() {
            out.push('\n');
        }
        let bullet = if u.warnings.is_empty() { '●' } else { '×' };
        let from = match u.source.as_str() {
            "inline" => "from --sklookup",
            "files" => "from unit files",
            _ => "origin unknown",
        };
        let _ = writeln!(
            out,
            "{bullet} {} ({from}, registered {})",
            u.id,
            format_utc(u.registered_at)
        );
        let own = if u.netns == m.netns {
            " (the daemon's)"
        } else {
            ""
        };
        let _ = writeln!(out, "{:>11} {}{own}", "Netns:", u.netns);
        for (i, b) in u.bindings.iter().enumerate() {
            let _ = writeln!(out, "{:>11} {b}", if i == 0 { "Bindings:" } else { "" });
        }
        if u.bindings.is_empty() {
            let _ = writeln!(out, "{:>11} none", "Bindings:");
        }
        for (i, s) in u.sockets.iter().enumerate() {
            let _ = writeln!(
                out,
                "{:>11} {}",
                if i == 0 { "Sockets:" } else { "" },
                socket_text(s)
            );
        }
        let _ = writeln!(
            out,
            "{:>11} {} lookups, {} misses, {} errors",
            "Counters:", u.lookups, u.misses, u.errors
        );
        for w in &u.warnings {
            let _ = writeln!(out, "{:>11} {w}", "Warning:");
        }
    }
    if with_daemon && units.is_empty() {
        out.push_str("\nNo units registered.\n");
    }
    out
}

pub fn status_json(m: &ManagerInfo, units: &[UnitInfo]) -> Value {
    json!({
        "version": m.version,
        "netns": m.netns,
        "state_path": m.state_path,
        "program": { "id": m.program_id, "tag": m.program_tag },
        "attached": m.attached,
        "namespaces": m.namespaces,
        "units": units.iter().map(unit_json).collect::<Vec<_>>(),
    })
}

fn unit_json(u: &UnitInfo) -> Value {
    json!({
        "unit": u.id,
        "netns": u.netns,
        "source": u.source,
        "registered_at_usec": u.registered_at,
        "bindings": u.bindings,
        "sockets": u.sockets.iter().map(|s| json!({
            "family": s.family, "protocol": s.protocol,
            "local": if s.local.is_empty() { Value::Null } else { json!(s.local) },
            "cookie": if s.cookie == 0 { Value::Null } else { json!(s.cookie) },
        })).collect::<Vec<_>>(),
        "lookups": u.lookups,
        "misses": u.misses,
        "errors": u.errors,
        "warnings": u.warnings,
    })
}

/// `skactivate bindings [--json]`.
pub fn bindings(json: bool, bus: &Bus) -> Result<()> {
    let rows = runtime()?.block_on(async {
        let (_conn, p) = manager(bus).await?;
        p.list_bindings().await.map_err(explain)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&bindings_json(&rows))?);
    } else {
        print!("{}", render_bindings(&rows));
    }
    Ok(())
}

pub fn render_bindings(rows: &[BindingRow]) -> String {
    let w0 = rows
        .iter()
        .map(|r| r.binding.len())
        .max()
        .unwrap_or(0)
        .max("BINDING".len());
    let w1 = rows
        .iter()
        .map(|r| r.unit.len())
        .max()
        .unwrap_or(0)
        .max("UNIT".len());
    let w2 = rows
        .iter()
        .map(|r| r.netns.to_string().len())
        .max()
        .unwrap_or(0)
        .max("NETNS".len());
    let mut out = format!(
        "{:w0$}  {:w1$}  {:w2$}  SOCKET\n",
        "BINDING", "UNIT", "NETNS"
    );
    for r in rows {
        let socket = if r.present {
            format!("cookie {}", r.cookie)
        } else {
            "gone (dropped)".into()
        };
        let _ = writeln!(
            out,
            "{:w0$}  {:w1$}  {:w2$}  {} {} {socket}",
            r.binding, r.unit, r.netns, r.family, r.protocol
        );
    }
    let n = rows.len();
    let plural = if n == 1 { "" } else { "s" };
    let _ = writeln!(
        out,
        "\n{n} binding{plural} listed, most specific first in each network namespace."
    );
    out
}

pub fn bindings_json(rows: &[BindingRow]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "binding": r.binding, "unit": r.unit, "netns": r.netns,
                    "family": r.family, "protocol": r.protocol,
                    "socket": r.present, "cookie": if r.present { json!(r.cookie) } else { Value::Null },
                })
            })
            .collect(),
    )
}

/// `skactivate lookup tcp|udp ADDRESS PORT [--netns PATH] [--json]`.
///
/// With `--netns` the namespace is opened here and its fd passed to the
/// daemon (`LookupInNamespace`), which finds that namespace's dispatcher by
/// the fd's inode. Neither side enters the namespace: the daemon could not
/// (its unit grants no CAP_SYS_ADMIN, which setns(2) needs), and the program
/// of any namespace can be run from anywhere (`BPF_PROG_TEST_RUN`). Whoever
/// may open PATH may ask, as reading is open to everyone.
pub fn lookup(
    protocol: Protocol,
    address: IpAddr,
    port: u16,
    netns: Option<&std::path::Path>,
    json: bool,
    bus: &Bus,
) -> Result<()> {
    let ns = netns
        .map(|path| {
            let f =
                std::fs::File::open(path).with_context(|| format!("--netns {}", path.display()))?;
            let ino = crate::dispatcher::socket::fd_inode(std::os::fd::AsRawFd::as_raw_fd(&f))
                .with_context(|| format!("--netns {}", path.display()))?;
            anyhow::Ok((f, ino))
        })
        .transpose()?;
    let (reply, ino) = runtime()?.block_on(async {
        let (_conn, p) = manager(bus).await?;
        let (reply, ino) = match &ns {
            Some((f, ino)) => {
                let fd = zbus::zvariant::Fd::from(std::os::fd::AsFd::as_fd(f));
                let r = p
                    .lookup_in_namespace(fd, protocol.as_str(), &address.to_string(), port)
                    .await;
                (r, *ino)
            }
            None => {
                let r = p
                    .lookup(protocol.as_str(), &address.to_string(), port)
                    .await;
                (r, p.net_ns().await.map_err(explain)?)
            }
        };
        let reply = reply.map_err(|e| match (&e, netns) {
            (zbus::Error::MethodError(name, _, _), Some(path))
                if name.as_str() == "org.freedesktop.DBus.Error.UnknownMethod" =>
            {
                anyhow::anyhow!(
                    "the running daemon cannot look up in another network namespace ({}): \
                     restart skactivate.service to run this version",
                    path.display()
                )
            }
            _ => explain(e),
        })?;
        anyhow::Ok((reply, ino))
    })?;
    let LookupReply {
        verdict,
        unit,
        binding,
        cookie,
    } = reply.into();
    if json {
        let v = json!({
            "protocol": protocol.as_str(), "address": address.to_string(), "port": port,
            "netns": ino,
            "verdict": verdict,
            "unit": if unit.is_empty() { Value::Null } else { json!(unit) },
            "binding": if binding.is_empty() { Value::Null } else { json!(binding) },
            "cookie": if cookie == 0 { Value::Null } else { json!(cookie) },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let line = render_lookup(protocol, address, port, &verdict, &unit, &binding, cookie);
        match netns {
            Some(path) => println!("{line} (network namespace {ino}, {})", path.display()),
            None => println!("{line}"),
        }
    }
    Ok(())
}

pub fn render_lookup(
    protocol: Protocol,
    address: IpAddr,
    port: u16,
    verdict: &str,
    unit: &str,
    binding: &str,
    cookie: u64,
) -> String {
    let to = std::net::SocketAddr::new(address, port);
    match verdict {
        "redirect" => {
            format!("{protocol} {to}: {unit} (binding {binding}, socket cookie {cookie})")
        }
        "drop" if !unit.is_empty() => {
            format!("{protocol} {to}: dropped: {unit} has binding {binding} but its socket is gone")
        }
        "drop" => format!("{protocol} {to}: dropped by the dispatcher"),
        _ => format!("{protocol} {to}: no binding; the kernel's own socket lookup decides"),
    }
}

/// `skactivate metrics`: the Prometheus text exposition format.
pub fn metrics(bus: &Bus) -> Result<()> {
    let (m, units, dests) = runtime()?.block_on(async {
        let (_conn, p) = manager(bus).await?;
        let units = p.list_units().await.map_err(explain)?;
        let dests = p.list_destinations().await.map_err(explain)?;
        let m = manager_info(&p).await?;
        anyhow::Ok((m, units, dests))
    })?;
    let units: Vec<(String, u64, u32)> = units
        .into_iter()
        .map(|u| (u.unit, u.netns, u.bindings))
        .collect();
    print!("{}", render_metrics(&m, &units, &dests));
    Ok(())
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render_metrics(
    m: &ManagerInfo,
    units: &[(String, u64, u32)],
    dests: &[DestinationRow],
) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    family(
        "skactivate_build_info",
        "gauge",
        "Version of skactivate and tag of the running dispatcher program.",
        vec![(
            format!(
                "{{version=\"{}\",program_tag=\"{}\"}}",
                label(&m.version),
                label(&m.program_tag)
            ),
            1,
        )],
    );
    family(
        "skactivate_dispatcher_attached",
        "gauge",
        "Whether the dispatcher is attached to its network namespace.",
        vec![(String::new(), u64::from(m.attached))],
    );
    family(
        "skactivate_dispatchers",
        "gauge",
        "Network namespaces the daemon serves a dispatcher in (its own and those of registered units).",
        vec![(String::new(), m.namespaces.len() as u64)],
    );
    family(
        "skactivate_units",
        "gauge",
        "Registered socket units.",
        vec![(String::new(), units.len() as u64)],
    );
    family(
        "skactivate_bindings",
        "gauge",
        "Bindings of each registered unit.",
        units
            .iter()
            .map(|(u, ns, n)| {
                (
                    format!("{{unit=\"{}\",netns=\"{ns}\"}}", label(u)),
                    u64::from(*n),
                )
            })
            .collect(),
    );
    let dest_labels = |d: &DestinationRow| {
        format!(
            "{{unit=\"{}\",netns=\"{}\",family=\"{}\",protocol=\"{}\"}}",
            label(&d.unit),
            d.netns,
            d.family,
            d.protocol
        )
    };
    family(
        "skactivate_socket_present",
        "gauge",
        "Whether the destination's socket is registered and open (1) or gone (0).",
        dests
            .iter()
            .map(|d| (dest_labels(d), u64::from(d.present)))
            .collect(),
    );
    family(
        "skactivate_lookups_total",
        "counter",
        "Lookups that matched a binding of the destination.",
        dests.iter().map(|d| (dest_labels(d), d.lookups)).collect(),
    );
    family(
        "skactivate_misses_total",
        "counter",
        "Matched lookups dropped because the destination's socket was gone.",
        dests.iter().map(|d| (dest_labels(d), d.misses)).collect(),
    );
    family(
        "skactivate_errors_total",
        "counter",
        "Matched lookups dropped because the kernel refused the socket (bpf_sk_assign failed).",
        dests.iter().map(|d| (dest_labels(d), d.errors)).collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager() -> ManagerInfo {
        ManagerInfo {
            version: "0.1.0".into(),
            netns: 4026531840,
            state_path: "/sys/fs/bpf/skactivate/4026531840".into(),
            program_id: 42,
            program_tag: "5a567cea3cdbb212".into(),
            attached: true,
            namespaces: vec![4026531840, 4026532301],
        }
    }

    fn web() -> UnitInfo {
        UnitInfo {
            id: "webserver.socket".into(),
            netns: 4026531840,
            source: "files".into(),
            bindings: vec![
                "tcp:192.0.2.0/24:80".into(),
                "tcp:192.0.2.0/24:8000-8099".into(),
            ],
            sockets: vec![SocketEntry {
                family: "ipv6".into(),
                protocol: "tcp".into(),
                local: "[::]:80".into(),
                cookie: 4249,
            }],
            lookups: 256,
            misses: 1,
            errors: 0,
            registered_at: 1_795_305_958_000_000,
            warnings: vec![],
        }
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400_000_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_795_305_958_000_000), "2026-11-22 00:05:58 UTC");
    }

    #[test]
    fn status_view() {
        let mut dns = web();
        dns.id = "dns.socket".into();
        dns.source = "inline".into();
        dns.netns = 4026532301;
        dns.bindings = vec!["udp:198.51.100.0/24:53".into()];
        dns.sockets = vec![SocketEntry {
            family: "ipv4".into(),
            protocol: "udp".into(),
            local: "0.0.0.0:53".into(),
            cookie: 0,
        }];
        dns.warnings = vec!["ipv4 udp socket 0.0.0.0:53 is gone".into()];
        let text = render_status(&manager(), &[web(), dns], true);
        let expected = "\
skactivate 0.1.0: dispatcher attached
  Program: id 42 tag 5a567cea3cdbb212
    Netns: 4026531840
     Also: 4026532301
    State: /sys/fs/bpf/skactivate/4026531840
   Totals: 2 units, 3 bindings, 1 sockets

● webserver.socket (from unit files, registered 2026-11-22 00:05:58 UTC)
     Netns: 4026531840 (the daemon's)
  Bindings: tcp:192.0.2.0/24:80
            tcp:192.0.2.0/24:8000-8099
   Sockets: ipv6 tcp [::]:80 (cookie 4249)
  Counters: 256 lookups, 1 misses, 0 errors

× dns.socket (from --sklookup, registered 2026-11-22 00:05:58 UTC)
     Netns: 4026532301
  Bindings: udp:198.51.100.0/24:53
   Sockets: ipv4 udp 0.0.0.0:53 (gone)
  Counters: 256 lookups, 1 misses, 0 errors
   Warning: ipv4 udp socket 0.0.0.0:53 is gone
";
        assert_eq!(text, expected);
        let j = status_json(&manager(), &[web()]);
        assert_eq!(j["units"][0]["sockets"][0]["cookie"], 4249);
        assert_eq!(j["program"]["tag"], "5a567cea3cdbb212");
        assert_eq!(j["units"][0]["netns"], 4026531840u64);
        assert_eq!(j["namespaces"][1], 4026532301u64);
    }

    #[test]
    fn prometheus_exposition() {
        let dests = [DestinationRow {
            unit: "we\"b.socket".into(),
            family: "ipv6".into(),
            protocol: "tcp".into(),
            lookups: 256,
            misses: 1,
            errors: 2,
            present: true,
            cookie: 7,
            netns: 4026532301,
        }];
        let text = render_metrics(
            &manager(),
            &[("we\"b.socket".into(), 4026532301, 2)],
            &dests,
        );
        assert!(text.contains(
            "skactivate_build_info{version=\"0.1.0\",program_tag=\"5a567cea3cdbb212\"} 1\n"
        ));
        assert!(text.contains("# TYPE skactivate_lookups_total counter\n"));
        assert!(text.contains("skactivate_lookups_total{unit=\"we\\\"b.socket\",netns=\"4026532301\",family=\"ipv6\",protocol=\"tcp\"} 256\n"));
        assert!(text.contains(
            "skactivate_errors_total{unit=\"we\\\"b.socket\",netns=\"4026532301\",family=\"ipv6\",protocol=\"tcp\"} 2\n"
        ));
        assert!(
            text.contains("skactivate_bindings{unit=\"we\\\"b.socket\",netns=\"4026532301\"} 2\n")
        );
        assert!(text.contains("skactivate_dispatchers 2\n"));
        assert!(text.contains("skactivate_units 1\n"));
        // Every sample line belongs to a declared family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{line}");
        }
    }

    #[test]
    fn lookup_lines() {
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            render_lookup(
                Protocol::Tcp,
                a,
                80,
                "redirect",
                "web.socket",
                "tcp:192.0.2.0/24:80",
                9
            ),
            "tcp 192.0.2.1:80: web.socket (binding tcp:192.0.2.0/24:80, socket cookie 9)"
        );
        assert_eq!(
            render_lookup(Protocol::Udp, a, 53, "pass", "", "", 0),
            "udp 192.0.2.1:53: no binding; the kernel's own socket lookup decides"
        );
        assert!(
            render_lookup(
                Protocol::Tcp,
                a,
                80,
                "drop",
                "web.socket",
                "tcp:192.0.2.0/24:80",
                0
            )
            .contains("gone")
        );
    }
}
