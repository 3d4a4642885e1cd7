//! The dispatcher: the only owner of the BPF program and its maps.
//!
//! Everything else speaks in domain verbs — add and remove bindings, register a
//! unit's sockets, list, look up, upgrade — and never touches a map. All state
//! lives in maps pinned under `<bpffs>/skactivate/<netns inode>/`, so a new
//! process adopts what an old one left, and traffic keeps flowing in between:
//! the program is attached through a pinned bpf_link.
//!
//! The process also keeps an index of the entries in memory (entry → destination),
//! read from the maps when it opens them, so that conflict checks and diffs cost
//! no syscalls; it is the maps' only writer, so the index stays exact.

pub mod abi;
mod bindings;
mod destinations;
mod filter;
mod host;
mod index;
mod lock;
mod lookup;
mod pinned;
pub mod records;
pub mod socket;
pub mod sys;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aya::maps::{
    HashMap as BpfHashMap, IterableMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues,
};
use aya::programs::links::FdLink;
use aya::programs::{ProgramError, SkLookup};
use aya::{EbpfError, EbpfLoader};
use ipnet::IpNet;

use crate::binding::{Binding, Destination, Family, Ports, Protocol};
use crate::paths;
use abi::{BindingKey, BindingValue, DestinationKey, DestinationValue, Metrics};
use bindings::Entry;
pub use host::kernel_release;
pub use lookup::test_run;
pub use socket::SocketInfo;

/// The dispatcher object, built from `ebpf/dispatcher.bpf.c` by build.rs.
pub(crate) static DISPATCHER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dispatcher.bpf.o"));

const PROGRAM: &str = "skactivate_dispatch";
/// The program that writes one `ports` word with one store (never attached).
const STORE_PROGRAM: &str = "skactivate_store_word";
#[allow(clippy::unnecessary_cast)] // `c_long` is narrower on 32-bit targets
const BPF_FS_MAGIC: i64 = libc::BPF_FS_MAGIC as i64;
/// Entries per `BPF_MAP_UPDATE_BATCH`.
const UPDATE_BATCH: usize = 4096;
/// Entries per `BPF_MAP_LOOKUP_BATCH` when adopting: 512 KiB of keys and
/// values per call.
const LOOKUP_BATCH: usize = 16384;
/// The `entries` hash, and where a bigger one is pinned while it is filled.
const ENTRIES: &str = "entries";
const ENTRIES_PIN_NEW: &str = "entries-new";
/// The per-CPU `metrics` array, and where a bigger one is pinned while its
/// program is loaded.
const METRICS: &str = "metrics";
const METRICS_PIN_NEW: &str = "metrics-new";

/// What a pinned map must look like for this build to adopt it.
struct MapSpec {
    name: &'static str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

/// `size_of::<T>()` as the kernel's u32 key or value size.
const fn size<T>() -> u32 {
    size_of::<T>() as u32
}

/// The maps as `ebpf/dispatcher.bpf.c` declares them; sizes come from the
/// `abi` mirrors, which the layout test holds against the object.
const MAPS: [MapSpec; 8] = [
    MapSpec {
        name: "bindings",
        map_type: sys::MAP_TYPE_LPM_TRIE,
        key_size: size::<aya::maps::lpm_trie::Key<BindingKey>>(),
        value_size: size::<BindingValue>(),
        max_entries: abi::MAX_BINDINGS,
    },
    MapSpec {
        name: "sockets",
        map_type: sys::MAP_TYPE_SOCKMAP,
        key_size: size::<u32>(),
        // The socket's cookie when user space looks it up.
        value_size: size::<u64>(),
        max_entries: abi::MAX_DESTINATIONS,
    },
    MapSpec {
        name: "destinations",
        map_type: sys::MAP_TYPE_HASH,
        key_size: size::<DestinationKey>(),
        value_size: size::<DestinationValue>(),
        max_entries: abi::MAX_DESTINATIONS,
    },
    // Its capacity grows (see `Dispatcher::grow_metrics`): the object's is
    // the first.
    MapSpec {
        name: METRICS,
        map_type: sys::MAP_TYPE_PERCPU_ARRAY,
        key_size: size::<u32>(),
        value_size: size::<Metrics>(),
        max_entries: abi::METRICS_MIN,
    },
    MapSpec {
        name: "ports",
        map_type: sys::MAP_TYPE_ARRAY,
        key_size: size::<u32>(),
        value_size: size::<u64>(),
        max_entries: abi::PORTS_WORDS,
    },
    // Its capacity grows (see `Dispatcher::grow`): the object's is the first.
    MapSpec {
        name: ENTRIES,
        map_type: sys::MAP_TYPE_HASH,
        key_size: size::<aya::maps::lpm_trie::Key<BindingKey>>(),
        value_size: size::<BindingValue>(),
        max_entries: abi::ENTRIES_MIN,
    },
    // Replaced with the entries hash, sized to its capacity: after it.
    MapSpec {
        name: filter::FILTER,
        map_type: sys::MAP_TYPE_ARRAY,
        key_size: size::<u32>(),
        value_size: size::<u64>(),
        max_entries: abi::filter_words(abi::ENTRIES_MIN),
    },
    // Replaced with the entries hash, sized to its capacity: after it.
    MapSpec {
        name: filter::CACHE,
        map_type: sys::MAP_TYPE_ARRAY,
        key_size: size::<u32>(),
        value_size: abi::CACHE_LINE_WORDS * size::<u64>(),
        max_entries: abi::cache_lines(abi::ENTRIES_MIN),
    },
];

#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error("{}: the dispatcher just created there is not attached to this network namespace", .path.display())]
    NotAttached { path: PathBuf },
    #[error("the embedded BPF object has no program {name} (a broken build)")]
    MissingProgram { name: &'static str },
    #[error(
        "Linux {release} has no BPF sk_lookup programs: skactivate needs Linux 5.9 or later \
         (Debian 11's 5.10 or newer)"
    )]
    Unsupported { release: String },
    #[error(
        "Linux {release} refused the dispatcher program: {verdict} (verifier). Report this \
         line and the kernel release; as a stopgap, grant CAP_PERFMON as well (add it to \
         CapabilityBoundingSet= of skactivate.service)"
    )]
    Refused {
        release: String,
        verdict: String,
        /// The verifier's whole log, for a bug report (not in the message).
        log: String,
    },
    #[error(
        "Linux {release} refused to create map {map} ({errno}): this kernel charges BPF maps \
         to RLIMIT_MEMLOCK, which is {limit} here, and the dispatcher's maps need about \
         {needed} MiB: raise LimitMEMLOCK= of skactivate.service (or `ulimit -l`)"
    )]
    Memlock {
        release: String,
        map: String,
        errno: io::Error,
        limit: String,
        needed: u64,
    },
    #[error(
        "{path}: the dispatcher of this network namespace is in use by {holder}; \
         only one process may change it (stop that one first)",
        holder = match pid { Some(p) => format!("process {p}"), None => "another process".to_owned() }
    )]
    Locked { path: PathBuf, pid: Option<u32> },
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

/// A program the kernel refused: the verifier's own last line, and the release.
fn program_err(e: ProgramError) -> DispatcherError {
    match &e {
        ProgramError::LoadError { verifier_log, .. } => {
            let log = format!("{verifier_log:?}");
            match host::verifier_verdict(&log) {
                Some(verdict) => DispatcherError::Refused {
                    release: kernel_release(),
                    verdict,
                    log,
                },
                None => DispatcherError::Program(e),
            }
        }
        _ => DispatcherError::Program(e),
    }
}

/// Loading the object: a map the kernel would not create for want of memlock
/// is said as such (the capabilities were checked before).
fn load_err(e: EbpfError) -> DispatcherError {
    match e {
        EbpfError::MapError(MapError::CreateError { name, io_error })
            if io_error.raw_os_error() == Some(libc::EPERM) =>
        {
            let (soft, _) = host::memlock_limit();
            DispatcherError::Memlock {
                release: kernel_release(),
                map: name,
                errno: io_error,
                limit: soft.map_or("unlimited".to_owned(), |b| format!("{} KiB", b / 1024)),
                needed: memlock_needed().div_ceil(1 << 20),
            }
        }
        EbpfError::ProgramError(p) => program_err(p),
        e => DispatcherError::Load(e),
    }
}

/// What a kernel that charges maps to `RLIMIT_MEMLOCK` (before 5.11) charges
/// for the dispatcher's maps, in bytes: it charges what `max_entries` could
/// hold at creation, whether preallocated or not (and the program's pages,
/// counted generously here).
pub fn memlock_needed() -> u64 {
    let cpus = nr_cpus().unwrap_or(1) as u64;
    let r8 = |n: u32| u64::from(n).next_multiple_of(8);
    let mut total = 64 << 10; // two programs (one while upgrading), a few pages each
    for spec in &MAPS {
        // The entries hash at its largest.
        let n = if spec.name == ENTRIES {
            u64::from(abi::MAX_BINDINGS)
        } else if spec.name == filter::FILTER {
            u64::from(abi::filter_words(abi::MAX_BINDINGS))
        } else if spec.name == filter::CACHE {
            u64::from(abi::cache_lines(abi::MAX_BINDINGS))
        } else {
            u64::from(spec.max_entries)
        };
        total += match spec.map_type {
            // lpm_trie_node: rcu_head, two children, prefixlen, flags; then data and value.
            sys::MAP_TYPE_LPM_TRIE => {
                n * (40 + u64::from(spec.key_size - 4) + u64::from(spec.value_size))
            }
            // htab_elem (48 bytes of header) + key + value, and a bucket each.
            sys::MAP_TYPE_HASH => {
                n * (48 + r8(spec.key_size) + r8(spec.value_size)) + n.next_power_of_two() * 16
            }
            sys::MAP_TYPE_PERCPU_ARRAY => n * (r8(spec.value_size) * cpus + 8),
            _ => n * r8(spec.value_size),
        };
    }
    total
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
    // A yes is remembered (the kernel does not lose the feature); a no is
    // asked again, as it may come from missing privileges.
    static SUPPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SUPPORTED.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    let yes = aya::sys::is_program_supported(aya::programs::ProgramType::SkLookup).unwrap_or(false);
    SUPPORTED.store(yes, std::sync::atomic::Ordering::Relaxed);
    yes
}

/// This thread's effective capabilities (a bit per capability number), if
/// `/proc` says.
pub fn effective_capabilities() -> Option<u64> {
    let status = fs::read_to_string("/proc/thread-self/status").ok()?;
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(eff.trim(), 16).ok()
}

/// The capabilities loading and attaching the dispatcher needs that the
/// calling thread's effective set lacks (`None`: it has them all).
pub fn missing_capabilities() -> Option<String> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let eff = effective_capabilities()?;
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

impl Dispatcher {
    /// Adopt the pinned dispatcher of the network namespace whose inode is
    /// `ino`, found under `bpffs` without a path to the namespace (a daemon
    /// restarting finds the other namespaces it served only by their pinned
    /// state). The kernel detaches a namespace's links when the namespace
    /// dies, so a link that no longer serves `ino` means the namespace is
    /// gone: its state is then removed and `None` returned.
    pub fn adopt_pinned(bpffs: &Path, ino: u64) -> Result<Option<Dispatcher>> {
        if let Some(missing) = missing_capabilities() {
            return Err(DispatcherError::Capabilities { missing });
        }
        host::raise_memlock();
        pinned::check_bpffs(bpffs)?;
        let root = paths::state_root(bpffs);
        let lock = lock::lock(&root, ino).map_err(|e| match e {
            lock::LockError::Held { path, pid } => DispatcherError::Locked { path, pid },
            lock::LockError::Io { path, source } => DispatcherError::Io { path, source },
        })?;
        let dir = paths::netns_state(bpffs, ino);
        match Self::adopt(&dir, ino)? {
            Some(mut d) => {
                d.lock = Some(lock);
                Ok(Some(d))
            }
            None => {
                fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
                pinned::remove_lock(Some(lock))?;
                Ok(None)
            }
        }
    }
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
    /// Its `max_entries`: ids below it have counters.
    metrics_capacity: u32,
    ports: MapData,
    /// The `entries` hash: every entry, the program's exact-match table.
    hash: MapData,
    /// Its `max_entries`.
    hash_capacity: u32,
    /// Whether it takes `BPF_MAP_UPDATE_BATCH` (probed when opened).
    hash_batch: bool,
    /// The `filter` of the entries hash.
    filter: filter::Filter,
    /// The kinds of entry in use, counted, and the `ports` words.
    kinds: bindings::Kinds,
    /// id → destination and refcount, mirroring `destinations`.
    dests: BTreeMap<u32, DestState>,
    ids: HashMap<Destination, u32>,
    /// Every entry and its destination id, mirroring `entries`.
    entries: index::Index,
    /// Whether the trie takes `BPF_MAP_UPDATE_BATCH` (probed when opened).
    batch: bool,
    /// Per family and protocol (`Entry::slot`): whether the trie holds all
    /// its shorter-than-full entries. It does while the program reads it
    /// (its lengths word says "trie"), and only then: below the lengths a
    /// lengths word lists, the trie is left empty.
    trie_filled: [bool; 4],
    /// The namespace's writer lock, held as long as this handle lives.
    lock: Option<lock::StateLock>,
    /// The units' records, kept with the pinned state (see [`records`]).
    records: records::Records,
    /// `skactivate_store_word`, loaded the first time a lengths word is
    /// written (see `sync_ports`).
    store: Option<OwnedFd>,
    /// Whether a swap's pins are still to be moved into place (see
    /// `settle_pins`).
    pins_pending: bool,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("dir", &self.dir)
            .field("netns", &self.netns)
            .finish()
    }
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| sys_err("possible CPUs")(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every map of the object, as aya parses it, is what `MAPS` expects of a
    /// pinned one: the adoption check and the C declarations agree.
    #[test]
    fn map_specs_match_the_object() {
        let obj = aya_obj::Object::parse(DISPATCHER_OBJECT).unwrap();
        for spec in &MAPS {
            let map = obj
                .maps
                .get(spec.name)
                .unwrap_or_else(|| panic!("{} missing", spec.name));
            assert_eq!(
                (
                    map.map_type(),
                    map.key_size(),
                    map.value_size(),
                    map.max_entries()
                ),
                (
                    spec.map_type,
                    spec.key_size,
                    spec.value_size,
                    spec.max_entries
                ),
                "{}",
                spec.name
            );
        }
        assert_eq!(obj.maps.len(), MAPS.len());
    }
}
