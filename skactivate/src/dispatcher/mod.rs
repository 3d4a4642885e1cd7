//! The dispatcher: the only owner of the BPF program and its maps.
//!
//! Everything else speaks in domain verbs — add and remove bindings, register a
//! unit's sockets, list, look up, upgrade — and never touches a map. All state
//! lives in maps pinned under `<bpffs>/skactivate/<netns inode>/`, so a new
//! process adopts what an old one left, and traffic keeps flowing in between:
//! the program is attached through a pinned bpf_link.
//!
//! The process also keeps an index of the trie in memory (entry → destination),
//! read from the maps when it opens them, so that conflict checks and diffs cost
//! no syscalls; it is the maps' only writer, so the index stays exact.

pub mod abi;
pub mod records;
pub mod socket;
pub mod sys;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aya::maps::{
    Array, HashMap as BpfHashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray,
    PerCpuValues,
};
use aya::programs::links::FdLink;
use aya::programs::{ProgramError, SkLookup};
use aya::{EbpfError, EbpfLoader};
use ipnet::IpNet;

use crate::binding::{Binding, Destination, Family, Ports, Protocol};
use crate::paths;
use abi::{BindingKey, BindingValue, DestinationKey, DestinationValue, Metrics};
pub use socket::SocketInfo;

/// The dispatcher object, built from `ebpf/dispatcher.bpf.c` by build.rs.
pub(crate) static DISPATCHER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dispatcher.bpf.o"));

const PROGRAM: &str = "skactivate_dispatch";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Trie entries per `BPF_MAP_UPDATE_BATCH`.
const UPDATE_BATCH: usize = 4096;

/// What a pinned map must look like for this build to adopt it.
struct MapSpec {
    name: &'static str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

const MAPS: [MapSpec; 5] = [
    MapSpec {
        name: "bindings",
        map_type: 11,
        key_size: 24,
        value_size: 8,
        max_entries: abi::MAX_BINDINGS,
    },
    MapSpec {
        name: "sockets",
        map_type: 15,
        key_size: 4,
        value_size: 8,
        max_entries: abi::MAX_DESTINATIONS,
    },
    MapSpec {
        name: "destinations",
        map_type: 1,
        key_size: 260,
        value_size: 8,
        max_entries: abi::MAX_DESTINATIONS,
    },
    MapSpec {
        name: "metrics",
        map_type: 6,
        key_size: 4,
        value_size: 24,
        max_entries: abi::MAX_DESTINATIONS,
    },
    MapSpec {
        name: "ports",
        map_type: 2,
        key_size: 4,
        value_size: 4,
        max_entries: abi::PORTS_ENTRIES,
    },
];

#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error("this kernel has no BPF sk_lookup programs (Linux 5.9 or later is needed)")]
    Unsupported,
    #[error(
        "the dispatcher needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN; this process lacks {missing}"
    )]
    Capabilities { missing: String },
    #[error("{path}: not a bpffs (mount one with `mount -t bpf bpf {path}`)")]
    NotBpffs { path: PathBuf },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the dispatcher (this needs CAP_BPF and CAP_NET_ADMIN, or root)")]
    Load(#[source] EbpfError),
    #[error("the dispatcher program")]
    Program(#[source] ProgramError),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{call}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: pinned map {map} has another layout (type {found_type}, key {found_key} B, value \
         {found_value} B, {found_max} entries; this build needs type {want_type}, key {want_key} B, \
         value {want_value} B, {want_max} entries): remove {path} to start afresh"
    )]
    Layout {
        path: PathBuf,
        map: &'static str,
        found_type: u32,
        found_key: u32,
        found_value: u32,
        found_max: u32,
        want_type: u32,
        want_key: u32,
        want_value: u32,
        want_max: u32,
    },
    #[error("{binding} is already bound to {other}")]
    Conflict {
        binding: Binding,
        other: Destination,
    },
    #[error("unit name {0:?} is not a valid unit name (at most 255 bytes, no NUL)")]
    UnitName(String),
    #[error("no free destination id: {max} destinations exist", max = abi::MAX_DESTINATIONS)]
    DestinationsFull,
    #[error("{binding}: the bindings map is full ({max} entries)", max = abi::MAX_BINDINGS)]
    BindingsFull { binding: Binding },
    #[error("socket fd {fd}")]
    Inspect {
        fd: i32,
        #[source]
        source: socket::InspectError,
    },
    #[error(
        "socket {local} ({protocol}) is not listening: only listening TCP sockets can take connections"
    )]
    NotListening {
        local: std::net::SocketAddr,
        protocol: Protocol,
    },
    #[error("socket {local} (udp) is connected: only unconnected UDP sockets can take datagrams")]
    Connected { local: std::net::SocketAddr },
    #[error(
        "socket {local} lives in network namespace {socket_netns}, the dispatcher in {dispatcher_netns}"
    )]
    OtherNetns {
        local: std::net::SocketAddr,
        socket_netns: u64,
        dispatcher_netns: u64,
    },
    #[error(
        "sockets {first} and {second} are both {family} {protocol} sockets of {unit} and not one \
         reuseport group: a destination is one socket"
    )]
    AmbiguousSockets {
        unit: String,
        family: Family,
        protocol: Protocol,
        first: std::net::SocketAddr,
        second: std::net::SocketAddr,
    },
}

type Result<T, E = DispatcherError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DispatcherError + '_ {
    move |source| DispatcherError::Io {
        path: path.to_owned(),
        source,
    }
}

fn sys_err(call: &'static str) -> impl FnOnce(io::Error) -> DispatcherError {
    move |source| DispatcherError::Syscall { call, source }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DispatcherError {
    move |source| DispatcherError::Map { name, source }
}

/// One trie entry: a binding narrowed to one port (0 = `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Entry {
    protocol: Protocol,
    prefix: IpNet,
    port: u16,
}

impl Entry {
    fn of(binding: &Binding) -> impl Iterator<Item = Entry> + '_ {
        let ports = match binding.ports {
            Ports::All => 0..=0,
            Ports::Range(a, b) => a..=b,
        };
        ports.map(move |port| Entry {
            protocol: binding.protocol,
            prefix: binding.prefix,
            port,
        })
    }

    fn key(&self) -> aya::maps::lpm_trie::Key<BindingKey> {
        abi::binding_key(self.protocol, &self.prefix, self.port)
    }

    /// Sorts entries as the trie orders its keys.
    fn trie_order(&self) -> (u8, [u8; 2], u8, [u8; 16], u32) {
        let key = self.key();
        let k = key.data();
        (k.protocol, k.port, k.family, k.addr, key.prefix_len())
    }

    fn binding(&self) -> Binding {
        let ports = if self.port == 0 {
            Ports::All
        } else {
            Ports::single(self.port)
        };
        Binding::new(self.protocol, self.prefix, ports)
    }
}

/// What a change did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// Trie entries added and removed (a port range counts once per port).
    pub added: usize,
    pub removed: usize,
}

/// A binding as the dispatcher holds it, with its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingInfo {
    pub binding: Binding,
    pub destination: Destination,
    /// Cookie of the destination's socket, `None` while it has none.
    pub socket: Option<u64>,
}

/// A destination with its socket and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationInfo {
    pub destination: Destination,
    pub id: u32,
    /// Trie entries pointing here.
    pub refcount: u32,
    pub socket: Option<u64>,
    pub metrics: Metrics,
}

/// What the dispatcher program does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Handed to the destination's socket.
    Redirect,
    /// No binding: the kernel's own socket lookup goes on.
    Pass,
    /// A binding matched but its socket is gone (or could not take it).
    Drop,
}

/// The answer of [`Dispatcher::lookup`], found by running the live program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub verdict: Verdict,
    /// The binding that matched, if any.
    pub binding: Option<Binding>,
    pub destination: Option<Destination>,
    /// The cookie of the socket the program selected.
    pub cookie: Option<u64>,
}

/// The identity of the running program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramIdentity {
    pub id: u32,
    pub tag: [u8; 8],
}

impl ProgramIdentity {
    pub fn tag_hex(&self) -> String {
        self.tag.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Whether this kernel can run sk_lookup programs at all.
pub fn is_supported() -> bool {
    aya::sys::is_program_supported(aya::programs::ProgramType::SkLookup).unwrap_or(false)
}

/// The capabilities loading and attaching the dispatcher needs that the
/// calling thread's effective set lacks (`None`: it has them all).
pub fn missing_capabilities() -> Option<String> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = fs::read_to_string("/proc/thread-self/status").ok()?;
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    let eff = u64::from_str_radix(eff.trim(), 16).ok()?;
    let has = |c: u32| eff & (1 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    (!missing.is_empty()).then(|| missing.join(" "))
}

/// The inode of a network namespace, given by a path like `/proc/self/ns/net`.
pub fn netns_inode(netns: &Path) -> Result<u64> {
    let f = fs::File::open(netns).map_err(io_err(netns))?;
    socket::fd_inode(f.as_raw_fd()).map_err(io_err(netns))
}

#[derive(Debug, Clone)]
struct DestState {
    destination: Destination,
    refcount: u32,
}

/// The dispatcher of one network namespace.
pub struct Dispatcher {
    dir: PathBuf,
    netns: u64,
    link: OwnedFd,
    program: OwnedFd,
    bindings: LpmTrie<MapData, BindingKey, BindingValue>,
    sockets: MapData,
    destinations: BpfHashMap<MapData, DestinationKey, DestinationValue>,
    metrics: PerCpuArray<MapData, Metrics>,
    ports: Array<MapData, u32>,
    /// id → destination and refcount, mirroring `destinations`.
    dests: BTreeMap<u32, DestState>,
    ids: HashMap<Destination, u32>,
    /// Every trie entry and its destination id, mirroring `bindings`.
    entries: HashMap<Entry, u32>,
    records: records::Records,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("dir", &self.dir)
            .field("netns", &self.netns)
            .finish()
    }
}

impl Dispatcher {
    /// Adopt the dispatcher of the network namespace `netns` pinned under
    /// `bpffs`, or create and attach one. Creation happens in a temporary
    /// directory that is renamed into place, so a crash never leaves half a
    /// dispatcher; state whose namespace has died is replaced.
    pub fn open(netns: &Path, bpffs: &Path) -> Result<Dispatcher> {
        // Asked first: without privileges the feature probe fails too, and
        // would blame the kernel.
        if let Some(missing) = missing_capabilities() {
            return Err(DispatcherError::Capabilities { missing });
        }
        if !is_supported() {
            return Err(DispatcherError::Unsupported);
        }
        let ns = fs::File::open(netns).map_err(io_err(netns))?;
        let ino = socket::fd_inode(ns.as_raw_fd()).map_err(io_err(netns))?;
        check_bpffs(bpffs)?;
        let root = paths::state_root(bpffs);
        ensure_dir(&root)?;
        let dir = paths::netns_state(bpffs, ino);
        if dir.exists() {
            match Self::adopt(&dir, ino)? {
                Some(d) => return Ok(d),
                None => fs::remove_dir_all(&dir).map_err(io_err(&dir))?,
            }
        }
        // bpffs refuses names with a dot, so no hidden name.
        let tmp = root.join(format!("new-{ino}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        ensure_dir(&tmp)?;
        let built = build(&tmp, ns.as_fd());
        let renamed = built.and_then(|()| fs::rename(&tmp, &dir).map_err(io_err(&dir)));
        if let Err(e) = renamed {
            // Removing the pins detaches our link; someone may have won a race.
            let _ = fs::remove_dir_all(&tmp);
            if !dir.exists() {
                return Err(e);
            }
        }
        Self::adopt(&dir, ino)?.ok_or_else(|| DispatcherError::Io {
            path: dir.clone(),
            source: io::Error::other("freshly created dispatcher is not attached"),
        })
    }

    /// Open pinned state; `None` if its link no longer serves this namespace.
    fn adopt(dir: &Path, ino: u64) -> Result<Option<Dispatcher>> {
        let link_path = dir.join(paths::LINK_PIN);
        let link = match sys::obj_get(&link_path) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => {
                return Err(DispatcherError::Io {
                    path: link_path,
                    source: e,
                });
            }
        };
        let info =
            sys::link_info(link.as_fd()).map_err(sys_err("BPF_OBJ_GET_INFO_BY_FD (link)"))?;
        if u64::from(info.netns_ino) != ino {
            return Ok(None);
        }
        let program = match open_program(dir, info.prog_id)? {
            Some(fd) => fd,
            // The pin is missing or stale (a crash between an upgrade's link
            // update and its re-pin): run this build's program and pin it.
            None => {
                let new = load_program(dir)?;
                sys::link_update(link.as_fd(), new.as_fd(), None)
                    .map_err(sys_err("BPF_LINK_UPDATE"))?;
                pin_program(dir, new.as_fd())?;
                new
            }
        };

        let mut maps = HashMap::new();
        for spec in &MAPS {
            let path = dir.join(spec.name);
            let data = MapData::from_pin(&path).map_err(map_err(spec.name))?;
            let found = sys::map_info(data.fd().as_fd())
                .map_err(sys_err("BPF_OBJ_GET_INFO_BY_FD (map)"))?;
            if (
                found.map_type,
                found.key_size,
                found.value_size,
                found.max_entries,
            ) != (
                spec.map_type,
                spec.key_size,
                spec.value_size,
                spec.max_entries,
            ) {
                return Err(DispatcherError::Layout {
                    path: dir.to_owned(),
                    map: spec.name,
                    found_type: found.map_type,
                    found_key: found.key_size,
                    found_value: found.value_size,
                    found_max: found.max_entries,
                    want_type: spec.map_type,
                    want_key: spec.key_size,
                    want_value: spec.value_size,
                    want_max: spec.max_entries,
                });
            }
            maps.insert(spec.name, data);
        }
        let mut take = |name: &'static str| maps.remove(name).expect("opened above");
        let bindings =
            LpmTrie::try_from(Map::LpmTrie(take("bindings"))).map_err(map_err("bindings"))?;
        let sockets = take("sockets");
        let destinations = BpfHashMap::try_from(Map::HashMap(take("destinations")))
            .map_err(map_err("destinations"))?;
        let metrics =
            PerCpuArray::try_from(Map::PerCpuArray(take("metrics"))).map_err(map_err("metrics"))?;
        let ports = Array::try_from(Map::Array(take("ports"))).map_err(map_err("ports"))?;

        let mut d = Dispatcher {
            dir: dir.to_owned(),
            netns: ino,
            link,
            program,
            bindings,
            sockets,
            destinations,
            metrics,
            ports,
            dests: BTreeMap::new(),
            ids: HashMap::new(),
            entries: HashMap::new(),
            records: records::Records::open(dir)?,
        };
        d.load_index()?;
        Ok(Some(d))
    }

    /// Read the destinations and the trie into the in-memory index.
    fn load_index(&mut self) -> Result<()> {
        for item in self.destinations.iter() {
            let (k, v) = item.map_err(map_err("destinations"))?;
            let (Some(family), Some(protocol)) =
                (Family::from_af(k.family), Protocol::from_number(k.protocol))
            else {
                continue;
            };
            let destination = Destination {
                unit: k.unit_name(),
                family,
                protocol,
            };
            self.ids.insert(destination.clone(), v.id);
            self.dests.insert(
                v.id,
                DestState {
                    destination,
                    refcount: v.refcount,
                },
            );
        }
        for item in self.bindings.iter() {
            let (k, v) = item.map_err(map_err("bindings"))?;
            let Some((b, port)) = abi::decode_binding_key(k.prefix_len(), &k.data()) else {
                continue;
            };
            self.entries.insert(
                Entry {
                    protocol: b.protocol,
                    prefix: b.prefix,
                    port,
                },
                v.destination,
            );
        }
        Ok(())
    }

    /// The pinned state's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Inode of the network namespace this dispatcher serves.
    pub fn netns(&self) -> u64 {
        self.netns
    }

    pub fn program(&self) -> Result<ProgramIdentity> {
        let i = sys::prog_info(self.program.as_fd())
            .map_err(sys_err("BPF_OBJ_GET_INFO_BY_FD (prog)"))?;
        Ok(ProgramIdentity {
            id: i.id,
            tag: i.tag,
        })
    }

    /// Whether the pinned link still attaches the program to the namespace.
    pub fn attached(&self) -> bool {
        sys::link_info(self.link.as_fd()).is_ok_and(|i| u64::from(i.netns_ino) == self.netns)
    }

    /// Detach the program and remove all pinned state of this namespace.
    pub fn destroy(self) -> Result<()> {
        let dir = self.dir.clone();
        // Detach first, so that traffic is the kernel's again when this
        // returns (releasing the pinned link alone happens asynchronously).
        sys::link_detach(self.link.as_fd()).map_err(sys_err("BPF_LINK_DETACH"))?;
        drop(self);
        fs::remove_dir_all(&dir).map_err(io_err(&dir))
    }

    /// Replace the running program with this build's, atomically
    /// (`BPF_LINK_UPDATE`), reusing the pinned maps. With `force` false nothing
    /// happens when the running program is already this build's. Returns
    /// whether the program was replaced.
    pub fn upgrade(&mut self, force: bool) -> Result<bool> {
        let new = load_program(&self.dir)?;
        let new_tag = sys::prog_info(new.as_fd())
            .map_err(sys_err("BPF_OBJ_GET_INFO_BY_FD (prog)"))?
            .tag;
        if !force && new_tag == self.program()?.tag {
            return Ok(false);
        }
        // Pinned aside first, swapped in the link, then renamed over the old
        // pin: whatever happens in between, adopt() finds a usable program.
        let staged = self.dir.join(paths::PROGRAM_PIN_NEW);
        let _ = fs::remove_file(&staged);
        sys::obj_pin(new.as_fd(), &staged).map_err(io_err(&staged))?;
        if let Err(e) = sys::link_update(self.link.as_fd(), new.as_fd(), Some(self.program.as_fd()))
        {
            let _ = fs::remove_file(&staged);
            return Err(sys_err("BPF_LINK_UPDATE")(e));
        }
        self.program = new;
        restrict(&staged, 0o640)?;
        let pin = self.dir.join(paths::PROGRAM_PIN);
        fs::rename(&staged, &pin).map_err(io_err(&pin))?;
        Ok(true)
    }

    // ---- destinations ----

    fn destination_key(d: &Destination) -> Result<DestinationKey> {
        DestinationKey::new(&d.unit, d.family, d.protocol)
            .ok_or_else(|| DispatcherError::UnitName(d.unit.clone()))
    }

    /// The id of a destination, allocating the lowest free one (with zeroed
    /// counters) if it has none.
    fn ensure_destination(&mut self, d: &Destination) -> Result<u32> {
        if let Some(&id) = self.ids.get(d) {
            return Ok(id);
        }
        let key = Self::destination_key(d)?;
        let id = (0..abi::MAX_DESTINATIONS)
            .find(|i| !self.dests.contains_key(i))
            .ok_or(DispatcherError::DestinationsFull)?;
        let zeros = PerCpuValues::try_from(vec![Metrics::default(); nr_cpus()?])
            .map_err(sys_err("per-CPU values"))?;
        self.metrics.set(id, zeros, 0).map_err(map_err("metrics"))?;
        self.destinations
            .insert(key, DestinationValue { id, refcount: 0 }, 0)
            .map_err(map_err("destinations"))?;
        self.ids.insert(d.clone(), id);
        self.dests.insert(
            id,
            DestState {
                destination: d.clone(),
                refcount: 0,
            },
        );
        Ok(id)
    }

    fn socket_cookie(&self, id: u32) -> Result<Option<u64>> {
        sys::sockmap_cookie(self.sockets.fd().as_fd(), id)
            .map_err(sys_err("BPF_MAP_LOOKUP_ELEM (sockets)"))
    }

    /// Forget destinations that have neither bindings nor a socket.
    fn collect_garbage(&mut self) -> Result<()> {
        let idle: Vec<u32> = self
            .dests
            .iter()
            .filter(|(_, s)| s.refcount == 0)
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            if self.socket_cookie(id)?.is_some() {
                continue;
            }
            self.forget_destination(id)?;
        }
        Ok(())
    }

    fn forget_destination(&mut self, id: u32) -> Result<()> {
        let Some(state) = self.dests.remove(&id) else {
            return Ok(());
        };
        self.ids.remove(&state.destination);
        sys::sockmap_remove(self.sockets.fd().as_fd(), id)
            .map_err(sys_err("BPF_MAP_DELETE_ELEM (sockets)"))?;
        let key = Self::destination_key(&state.destination)?;
        match self.destinations.remove(&key) {
            Ok(()) => Ok(()),
            Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err("destinations")(e)),
        }
    }

    fn write_refcounts(&mut self, ids: impl IntoIterator<Item = u32>) -> Result<()> {
        for id in ids {
            let Some(state) = self.dests.get(&id) else {
                continue;
            };
            let key = Self::destination_key(&state.destination)?;
            self.destinations
                .insert(
                    key,
                    DestinationValue {
                        id,
                        refcount: state.refcount,
                    },
                    0,
                )
                .map_err(map_err("destinations"))?;
        }
        Ok(())
    }

    // ---- bindings ----

    fn bump_ports(&mut self, deltas: &HashMap<u32, i64>, sign: i64) -> Result<()> {
        for (&idx, &delta) in deltas {
            let d = delta * sign;
            if d == 0 {
                continue;
            }
            let cur = i64::from(self.ports.get(&idx, 0).map_err(map_err("ports"))?);
            let new = u32::try_from((cur + d).max(0)).unwrap_or(u32::MAX);
            self.ports.set(idx, new, 0).map_err(map_err("ports"))?;
        }
        Ok(())
    }

    /// Apply a change to the trie all at once or not at all: `add` entries
    /// (entry → destination id) go in first, then `remove` entries go out, so
    /// that a replacement never leaves a gap. Port counts rise before entries
    /// appear and fall after they vanish, so the program never skips an entry.
    fn apply(&mut self, add: Vec<(Entry, u32)>, remove: Vec<Entry>) -> Result<Changes> {
        // Conflicts first, from the index: nothing has been touched yet.
        for (e, id) in &add {
            if let Some(other) = self.entries.get(e).filter(|&&o| o != *id) {
                return Err(DispatcherError::Conflict {
                    binding: e.binding(),
                    other: self.dests[other].destination.clone(),
                });
            }
        }
        let mut add: Vec<(Entry, u32)> = add
            .into_iter()
            .filter(|(e, _)| !self.entries.contains_key(e))
            .collect();
        // In the trie's own order: each insert walks the path the previous one
        // just walked, still in cache (in random order a big trie costs a
        // cache miss per level).
        add.sort_by_cached_key(|(e, id)| (e.trie_order(), *id));
        add.dedup();
        if let Some(w) = add.windows(2).find(|w| w[0].0 == w[1].0) {
            let (e, first) = w[0];
            return Err(DispatcherError::Conflict {
                binding: e.binding(),
                other: self.dests[&first].destination.clone(),
            });
        }
        let remove: Vec<Entry> = remove
            .into_iter()
            .filter(|e| self.entries.contains_key(e))
            .collect();

        let mut up: HashMap<u32, i64> = HashMap::new();
        for (e, _) in &add {
            *up.entry(abi::ports_index(e.protocol, e.port)).or_default() += 1;
        }
        self.bump_ports(&up, 1)?;

        // In batches: one syscall per 4096 entries instead of one each. A batch
        // cannot say BPF_NOEXIST; it need not, as the index has already left
        // out every entry present and this process is the trie's only writer.
        let mut done = 0;
        for chunk in add.chunks(UPDATE_BATCH) {
            let keys: Vec<_> = chunk.iter().map(|(e, _)| e.key()).collect();
            let values: Vec<_> = chunk
                .iter()
                .map(|(e, id)| BindingValue {
                    destination: *id,
                    prefixlen: abi::trie_prefixlen(&e.prefix),
                })
                .collect();
            let fd = self.bindings.map().fd().as_fd();
            let (n, r) = sys::map_update_batch(fd, &keys, &values);
            done += n;
            if let Err(err) = r {
                for (d, _) in &add[..done] {
                    let _ = self.bindings.remove(&d.key());
                }
                let _ = self.bump_ports(&up, -1);
                // The trie says ENOSPC when it is full (add[done] did not fit).
                return Err(match (err.raw_os_error(), add.get(done)) {
                    (Some(libc::ENOSPC | libc::E2BIG), Some((e, _))) => {
                        DispatcherError::BindingsFull {
                            binding: e.binding(),
                        }
                    }
                    _ => sys_err("BPF_MAP_UPDATE_BATCH (bindings)")(err),
                });
            }
        }
        let mut touched: HashSet<u32> = HashSet::new();
        for (e, id) in add.iter() {
            self.entries.insert(*e, *id);
            if let Some(s) = self.dests.get_mut(id) {
                s.refcount += 1;
            }
            touched.insert(*id);
        }

        let mut down: HashMap<u32, i64> = HashMap::new();
        let mut removed = 0;
        let mut failure = None;
        for e in &remove {
            match self.bindings.remove(&e.key()) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(err) => {
                    failure.get_or_insert(map_err("bindings")(err));
                    continue;
                }
            }
            removed += 1;
            *down
                .entry(abi::ports_index(e.protocol, e.port))
                .or_default() += 1;
            if let Some(id) = self.entries.remove(e) {
                if let Some(s) = self.dests.get_mut(&id) {
                    s.refcount = s.refcount.saturating_sub(1);
                }
                touched.insert(id);
            }
        }
        self.bump_ports(&down, -1)?;
        self.write_refcounts(touched)?;
        self.collect_garbage()?;
        match failure {
            Some(e) => Err(e),
            None => Ok(Changes {
                added: add.len(),
                removed,
            }),
        }
    }

    /// Add bindings, each to its destination, all or none.
    pub fn add_bindings(&mut self, items: &[(Binding, Destination)]) -> Result<Changes> {
        let mut add = Vec::new();
        for (b, d) in items {
            let id = self.ensure_destination(d)?;
            add.extend(Entry::of(b).map(|e| (e, id)));
        }
        let r = self.apply(add, Vec::new());
        if r.is_err() {
            self.collect_garbage()?;
        }
        r
    }

    /// Remove bindings, whoever they point to.
    pub fn remove_bindings(&mut self, items: &[Binding]) -> Result<Changes> {
        let remove = items.iter().flat_map(Entry::of).collect();
        self.apply(Vec::new(), remove)
    }

    /// Make `items` the complete set of bindings of `unit`: what is new is added,
    /// what is gone is removed, what stays is untouched. All or nothing.
    pub fn replace_unit_bindings(
        &mut self,
        unit: &str,
        items: &[(Binding, Destination)],
    ) -> Result<Changes> {
        let mut add = Vec::new();
        let mut wanted = HashSet::new();
        for (b, d) in items {
            let id = self.ensure_destination(d)?;
            for e in Entry::of(b) {
                wanted.insert((e, id));
                add.push((e, id));
            }
        }
        let remove = self
            .entries
            .iter()
            .filter(|(e, id)| {
                self.dests
                    .get(id)
                    .is_some_and(|s| s.destination.unit == unit)
                    && !wanted.contains(&(**e, **id))
            })
            .map(|(e, _)| *e)
            .collect();
        // An entry moving between two destinations of this unit: take it out first.
        let moving: Vec<Entry> = add
            .iter()
            .filter(|(e, id)| {
                self.entries
                    .get(e)
                    .is_some_and(|o| o != id && self.dests[o].destination.unit == unit)
            })
            .map(|(e, _)| *e)
            .collect();
        if !moving.is_empty() {
            self.apply(Vec::new(), moving)?;
        }
        let r = self.apply(add, remove);
        if r.is_err() {
            self.collect_garbage()?;
        }
        r
    }

    /// Bindings in precedence order, consecutive ports of one prefix and
    /// destination shown as one range.
    pub fn bindings(&self) -> Result<Vec<BindingInfo>> {
        let mut by_prefix: BTreeMap<(u32, Protocol, IpNetOrd, bool), Vec<u16>> = BTreeMap::new();
        for (e, &id) in &self.entries {
            by_prefix
                .entry((id, e.protocol, IpNetOrd(e.prefix), e.port == 0))
                .or_default()
                .push(e.port);
        }
        let mut cookies = HashMap::new();
        let mut out = Vec::new();
        for ((id, protocol, IpNetOrd(prefix), wildcard), mut ports) in by_prefix {
            let Some(state) = self.dests.get(&id) else {
                continue;
            };
            let socket = match cookies.get(&id) {
                Some(&c) => c,
                None => *cookies.entry(id).or_insert(self.socket_cookie(id)?),
            };
            let mut push = |ports: Ports| {
                out.push(BindingInfo {
                    binding: Binding::new(protocol, prefix, ports),
                    destination: state.destination.clone(),
                    socket,
                });
            };
            if wildcard {
                push(Ports::All);
                continue;
            }
            ports.sort_unstable();
            let mut start = ports[0];
            let mut end = start;
            for &p in &ports[1..] {
                if p == end + 1 {
                    end = p;
                } else {
                    push(Ports::Range(start, end));
                    start = p;
                    end = p;
                }
            }
            push(Ports::Range(start, end));
        }
        out.sort_by(|a, b| {
            a.binding
                .precedence_cmp(&b.binding)
                .then_with(|| a.destination.cmp(&b.destination))
        });
        Ok(out)
    }

    /// Every destination, with its socket's cookie and its counters summed
    /// over CPUs.
    pub fn destinations(&self) -> Result<Vec<DestinationInfo>> {
        let mut out = Vec::new();
        for (&id, state) in &self.dests {
            let per_cpu = self.metrics.get(&id, 0).map_err(map_err("metrics"))?;
            let mut m = Metrics::default();
            for c in per_cpu.iter() {
                m.lookups += c.lookups;
                m.misses += c.misses;
                m.errors += c.errors;
            }
            out.push(DestinationInfo {
                destination: state.destination.clone(),
                id,
                refcount: state.refcount,
                socket: self.socket_cookie(id)?,
                metrics: m,
            });
        }
        Ok(out)
    }

    // ---- sockets ----

    /// Register a unit's sockets: each becomes the socket of the destination
    /// (unit, its family, its protocol), replacing any earlier one. Checked
    /// first, all of them: TCP listening, UDP unconnected, this namespace, one
    /// socket per family and protocol (members of one reuseport group count
    /// once: the first is registered and the kernel spreads load in the group).
    pub fn register_sockets(
        &mut self,
        unit: &str,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Vec<(Destination, SocketInfo)>> {
        let mut chosen: Vec<(Destination, SocketInfo, BorrowedFd<'_>)> = Vec::new();
        for fd in fds {
            let info = SocketInfo::inspect(*fd).map_err(|source| DispatcherError::Inspect {
                fd: fd.as_raw_fd(),
                source,
            })?;
            match info.protocol {
                Protocol::Tcp if !info.listening => {
                    return Err(DispatcherError::NotListening {
                        local: info.local,
                        protocol: info.protocol,
                    });
                }
                Protocol::Udp if info.connected => {
                    return Err(DispatcherError::Connected { local: info.local });
                }
                _ => {}
            }
            if info.netns != self.netns {
                return Err(DispatcherError::OtherNetns {
                    local: info.local,
                    socket_netns: info.netns,
                    dispatcher_netns: self.netns,
                });
            }
            let destination = Destination {
                unit: unit.to_owned(),
                family: info.family,
                protocol: info.protocol,
            };
            if let Some((_, first, _)) = chosen.iter().find(|(d, _, _)| *d == destination) {
                let same_group = first.reuseport && info.reuseport && first.local == info.local;
                if same_group {
                    continue;
                }
                return Err(DispatcherError::AmbiguousSockets {
                    unit: unit.to_owned(),
                    family: info.family,
                    protocol: info.protocol,
                    first: first.local,
                    second: info.local,
                });
            }
            chosen.push((destination, info, *fd));
        }
        let mut out = Vec::new();
        for (destination, info, fd) in chosen {
            let id = self.ensure_destination(&destination)?;
            sys::sockmap_insert(self.sockets.fd().as_fd(), id, fd)
                .map_err(sys_err("BPF_MAP_UPDATE_ELEM (sockets)"))?;
            out.push((destination, info));
        }
        Ok(out)
    }

    /// Remove everything of a unit: its bindings, its sockets, its destinations.
    pub fn unregister_unit(&mut self, unit: &str) -> Result<Changes> {
        let remove = self
            .entries
            .iter()
            .filter(|(_, id)| {
                self.dests
                    .get(id)
                    .is_some_and(|s| s.destination.unit == unit)
            })
            .map(|(e, _)| *e)
            .collect();
        let changes = self.apply(Vec::new(), remove)?;
        let ids: Vec<u32> = self
            .dests
            .iter()
            .filter(|(_, s)| s.destination.unit == unit)
            .map(|(&i, _)| i)
            .collect();
        for id in ids {
            self.forget_destination(id)?;
        }
        Ok(changes)
    }

    /// The units that have a destination here.
    pub fn units(&self) -> Vec<String> {
        let mut u: Vec<String> = self
            .dests
            .values()
            .map(|s| s.destination.unit.clone())
            .collect();
        u.sort();
        u.dedup();
        u
    }

    // ---- lookup ----

    /// Where a packet for `addr:port` would go, found by running the live
    /// program once with `BPF_PROG_TEST_RUN` (which counts in the metrics like
    /// real traffic). The program decides verdict and socket; the trie tells
    /// which binding it used.
    pub fn lookup(&self, protocol: Protocol, addr: IpAddr, port: u16) -> Result<Lookup> {
        let run = self.test_run(protocol, addr, port, 1)?;
        let cookie = (run.ctx_out.cookie != 0).then_some(run.ctx_out.cookie);
        let verdict = match (run.retval, cookie) {
            (1, Some(_)) => Verdict::Redirect,
            (1, None) => Verdict::Pass,
            _ => Verdict::Drop,
        };
        let mut by_cookie = None;
        if let Some(c) = cookie {
            for &id in self.dests.keys() {
                if self.socket_cookie(id)? == Some(c) {
                    by_cookie = Some(id);
                }
            }
        }
        let candidates = self.matching_entries(protocol, addr, port)?;
        let chosen = match verdict {
            Verdict::Redirect => candidates.iter().find(|(_, id)| Some(*id) == by_cookie),
            Verdict::Drop => candidates.first(),
            Verdict::Pass => None,
        };
        Ok(Lookup {
            verdict,
            binding: chosen.map(|(b, _)| *b),
            destination: by_cookie
                .or(chosen.map(|(_, id)| *id))
                .and_then(|id| self.dests.get(&id))
                .map(|s| s.destination.clone()),
            cookie,
        })
    }

    /// The trie's answers for the specific port and for `*`, longest first.
    fn matching_entries(
        &self,
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
    ) -> Result<Vec<(Binding, u32)>> {
        let mut out = Vec::new();
        for p in [port, 0] {
            match self.bindings.get(&abi::lookup_key(protocol, addr, p), 0) {
                Ok(v) => {
                    // The family is part of the key: an answer is of addr's family.
                    let entry = self.entries.iter().find(|(e, id)| {
                        **id == v.destination
                            && e.protocol == protocol
                            && e.port == p
                            && abi::trie_prefixlen(&e.prefix) == v.prefixlen
                            && e.prefix.contains(&addr)
                    });
                    if let Some((e, id)) = entry {
                        out.push((e.binding(), *id, v.prefixlen));
                    }
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err("bindings")(e)),
            }
        }
        out.sort_by_key(|(_, _, len)| std::cmp::Reverse(*len));
        Ok(out.into_iter().map(|(b, id, _)| (b, id)).collect())
    }

    /// Run the program `repeat` times on one lookup; the kernel reports the mean
    /// duration. Used by `lookup` and by the benchmarks.
    pub fn test_run(
        &self,
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
        repeat: u32,
    ) -> Result<sys::TestRun<abi::SkLookupCtx>> {
        test_run(self.program.as_fd(), protocol, addr, port, repeat)
    }
}

/// Run an sk_lookup program once per `repeat` on a synthetic lookup.
pub fn test_run(
    prog: BorrowedFd<'_>,
    protocol: Protocol,
    addr: IpAddr,
    port: u16,
    repeat: u32,
) -> Result<sys::TestRun<abi::SkLookupCtx>> {
    let mut ctx = abi::SkLookupCtx {
        protocol: u32::from(protocol.number()),
        local_port: u32::from(port),
        remote_port: 40000u16.to_be(),
        ..Default::default()
    };
    match addr {
        IpAddr::V4(a) => {
            ctx.family = libc::AF_INET as u32;
            ctx.local_ip4 = u32::from_ne_bytes(a.octets());
            ctx.remote_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        }
        IpAddr::V6(a) => {
            ctx.family = libc::AF_INET6 as u32;
            let o = a.octets();
            for (i, w) in ctx.local_ip6.iter_mut().enumerate() {
                *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            }
            ctx.remote_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        }
    }
    sys::prog_test_run(prog, &ctx, repeat).map_err(sys_err("BPF_PROG_TEST_RUN"))
}

/// `IpNet` ordered by family, address and length, for grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IpNetOrd(IpNet);

impl PartialOrd for IpNetOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IpNetOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0.addr(), self.0.prefix_len()).cmp(&(other.0.addr(), other.0.prefix_len()))
    }
}

fn program_of(ebpf: &mut aya::Ebpf) -> Result<&mut SkLookup> {
    let prog = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| DispatcherError::Io {
            path: PathBuf::from(PROGRAM),
            source: io::Error::other("program missing from the embedded object"),
        })?;
    prog.try_into().map_err(DispatcherError::Program)
}

/// Create maps and program in `dir`, attach to `netns`, pin the link.
fn build(dir: &Path, netns: BorrowedFd<'_>) -> Result<()> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(DISPATCHER_OBJECT)
        .map_err(DispatcherError::Load)?;
    let prog = program_of(&mut ebpf)?;
    prog.load().map_err(DispatcherError::Program)?;
    let link_id = prog.attach(netns).map_err(DispatcherError::Program)?;
    let link: FdLink = prog
        .take_link(link_id)
        .map_err(DispatcherError::Program)?
        .into();
    let pin = dir.join(paths::LINK_PIN);
    link.pin(&pin).map_err(|e| DispatcherError::Io {
        path: pin.clone(),
        source: io::Error::other(e),
    })?;
    let fd = prog
        .fd()
        .map_err(DispatcherError::Program)?
        .as_fd()
        .try_clone_to_owned()
        .map_err(sys_err("dup"))?;
    pin_program(dir, fd.as_fd())?;
    for spec in &MAPS {
        restrict(&dir.join(spec.name), 0o640)?;
    }
    restrict(&pin, 0o640)?;
    Ok(())
}

/// Load this build's program against the maps pinned in `dir`.
fn load_program(dir: &Path) -> Result<OwnedFd> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(DISPATCHER_OBJECT)
        .map_err(DispatcherError::Load)?;
    let prog: &mut SkLookup = program_of(&mut ebpf)?;
    prog.load().map_err(DispatcherError::Program)?;
    prog.fd()
        .map_err(DispatcherError::Program)?
        .as_fd()
        .try_clone_to_owned()
        .map_err(sys_err("dup"))
}

/// Pin `prog` as the state's program, replacing the pin atomically.
fn pin_program(dir: &Path, prog: BorrowedFd<'_>) -> Result<()> {
    let staged = dir.join(paths::PROGRAM_PIN_NEW);
    let _ = fs::remove_file(&staged);
    sys::obj_pin(prog, &staged).map_err(io_err(&staged))?;
    restrict(&staged, 0o640)?;
    let pin = dir.join(paths::PROGRAM_PIN);
    fs::rename(&staged, &pin).map_err(io_err(&pin))
}

/// The pinned program, if it is the one the link runs (`link_prog_id`).
fn open_program(dir: &Path, link_prog_id: u32) -> Result<Option<OwnedFd>> {
    let pin = dir.join(paths::PROGRAM_PIN);
    let fd = match sys::obj_get(&pin) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(io_err(&pin)(e)),
    };
    let id = sys::prog_info(fd.as_fd())
        .map_err(sys_err("BPF_OBJ_GET_INFO_BY_FD (prog)"))?
        .id;
    Ok((id == link_prog_id).then_some(fd))
}

fn restrict(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

fn ensure_dir(dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => restrict(dir, 0o750),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

fn check_bpffs(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        DispatcherError::NotBpffs {
            path: path.to_owned(),
        }
    })?;
    // SAFETY: an all-zero statfs is valid; c is a live C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } < 0 {
        return Err(io_err(path)(io::Error::last_os_error()));
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between targets"
    )]
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(DispatcherError::NotBpffs {
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| sys_err("possible CPUs")(e))
}
