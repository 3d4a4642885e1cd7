//! Pinned state: create, adopt, pin, upgrade and destroy the dispatcher of
//! one network namespace, under its writer lock.

use std::sync::{LazyLock, Mutex, PoisonError};

use super::*;

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
        host::raise_memlock();
        if !is_supported() {
            return Err(DispatcherError::Unsupported {
                release: kernel_release(),
            });
        }
        let ns = fs::File::open(netns).map_err(io_err(netns))?;
        let ino = socket::fd_inode(ns.as_raw_fd()).map_err(io_err(netns))?;
        check_bpffs(bpffs)?;
        let root = paths::state_root(bpffs);
        ensure_dir(&root)?;
        // Before anything is changed (stale state removed, a program
        // upgraded, a map written), and for as long as this handle lives.
        let lock = lock::lock(&root, ino).map_err(|e| match e {
            lock::LockError::Held { path, pid } => DispatcherError::Locked { path, pid },
            lock::LockError::Io { path, source } => DispatcherError::Io { path, source },
        })?;
        let mut d = Self::open_locked(&root, ns.as_fd(), ino, bpffs)?;
        d.lock = Some(lock);
        Ok(d)
    }

    pub(super) fn open_locked(
        root: &Path,
        ns: BorrowedFd<'_>,
        ino: u64,
        bpffs: &Path,
    ) -> Result<Dispatcher> {
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
        let built = build(&tmp, ns);
        let renamed = built.and_then(|()| fs::rename(&tmp, &dir).map_err(io_err(&dir)));
        if let Err(e) = renamed {
            // Removing the pins detaches our link; someone may have won a race.
            let _ = fs::remove_dir_all(&tmp);
            if !dir.exists() {
                return Err(e);
            }
        }
        Self::adopt(&dir, ino)?.ok_or_else(|| DispatcherError::NotAttached { path: dir.clone() })
    }

    /// Open pinned state; `None` if its link no longer serves this namespace.
    pub(super) fn adopt(dir: &Path, ino: u64) -> Result<Option<Dispatcher>> {
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
        // The pin is missing or stale (a crash between an upgrade's link
        // update and its re-pin): this build's program is to run, once the
        // filter it reads is filled (below).
        let (program, repair) = match open_program(dir, info.prog_id)? {
            Some(fd) => (fd, false),
            None => (load_program(dir)?, true),
        };

        // A bigger entries hash, or a filter, that a crash left half made
        // (see `grow`).
        let _ = fs::remove_file(dir.join(ENTRIES_PIN_NEW));
        let _ = fs::remove_file(dir.join(filter::FILTER_PIN_NEW));
        let _ = fs::remove_file(dir.join(filter::CACHE_PIN_NEW));
        // And a bigger metrics array (see `grow_metrics`).
        let _ = fs::remove_file(dir.join(METRICS_PIN_NEW));
        let mut maps = HashMap::new();
        let mut hash_capacity = abi::ENTRIES_MIN;
        let mut cache_buckets = 0;
        let mut metrics_capacity = abi::METRICS_MIN;
        for spec in &MAPS {
            let path = dir.join(spec.name);
            if spec.name == filter::FILTER || spec.name == filter::CACHE {
                // Absent (state an older skactivate made) or not sized to
                // the hash (a crash while growing): made anew below.
                if let Some((data, max)) = usable_filter(&path, spec, hash_capacity) {
                    if spec.name == filter::CACHE {
                        cache_buckets = max - 1;
                    }
                    maps.insert(spec.name, data);
                }
                continue;
            }
            let data = MapData::from_pin(&path).map_err(map_err(spec.name))?;
            let found = sys::map_info(data.fd().as_fd())
                .map_err(sys_err("BPF_OBJ_GET_INFO_BY_FD (map)"))?;
            // The entries hash grows sixteenfold from its first capacity.
            let grown = spec.name == ENTRIES
                && found.max_entries.is_power_of_two()
                && (abi::ENTRIES_MIN..=abi::MAX_BINDINGS).contains(&found.max_entries);
            // The metrics array grows fourfold (state of skactivate before
            // it did has the largest).
            let grown_metrics =
                spec.name == METRICS && abi::metrics_capacities().any(|c| c == found.max_entries);
            let want_max = if grown {
                hash_capacity = found.max_entries;
                found.max_entries
            } else if grown_metrics {
                metrics_capacity = found.max_entries;
                found.max_entries
            } else {
                spec.max_entries
            };
            if (
                found.map_type,
                found.key_size,
                found.value_size,
                found.max_entries,
            ) != (spec.map_type, spec.key_size, spec.value_size, want_max)
            {
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
            PerCpuArray::try_from(Map::PerCpuArray(take(METRICS))).map_err(map_err(METRICS))?;
        let ports = take("ports");
        let hash = take(ENTRIES);
        // A filter and cache made here run only once filled
        // (`load_index`), under a program loaded with them: `staged`.
        let (filter, staged) = match (maps.remove(filter::FILTER), maps.remove(filter::CACHE)) {
            (Some(data), Some(cache)) => (
                filter::Filter::open(data, cache, (hash_capacity, cache_buckets))?,
                None,
            ),
            _ => {
                // As large as the hash can fill: how many entries it holds
                // is read only once the program to run is loaded.
                let sizes = (hash_capacity, abi::cache_buckets(hash_capacity));
                let (program, map) = stage(dir, &dir.join(ENTRIES), sizes, false)?;
                (
                    filter::Filter::open_new(map.filter, map.cache, sizes)?,
                    Some(program),
                )
            }
        };

        let mut d = Dispatcher {
            dir: dir.to_owned(),
            netns: ino,
            link,
            program,
            bindings,
            sockets,
            destinations,
            metrics,
            metrics_capacity,
            ports,
            hash,
            hash_capacity,
            hash_batch: false,
            filter,
            kinds: bindings::Kinds::default(),
            dests: BTreeMap::new(),
            ids: HashMap::new(),
            entries: index::Index::default(),
            batch: false,
            trie_filled: [false; 4],
            lock: None,
            records: records::Records::open(dir)?,
            store: None,
            pins_pending: false,
        };
        d.batch = d.probe_batch();
        d.hash_batch = probe_batch(d.hash.fd().as_fd());
        d.load_index()?;
        d.filter.unmap();
        match (staged, repair) {
            (Some(program), _) => d.swap_program(program, !repair, |_| {})?,
            (None, true) => {
                let program = d.program.try_clone().map_err(sys_err("dup"))?;
                d.swap_program(program, false, |_| {})?;
            }
            (None, false) => {}
        }
        Ok(Some(d))
    }

    /// Run `program` (loaded against the pinned maps, or maps staged aside,
    /// all filled) in the link in place of `self.program` (only if that is
    /// what runs, where `replaces`), hand this handle the maps it reads
    /// (`install`), then move the staged pins into place (`settle_pins`).
    /// An error before the link update leaves everything as it was; after
    /// it, the handle writes where the program reads, and only the pins lag.
    pub(super) fn swap_program(
        &mut self,
        program: OwnedFd,
        replaces: bool,
        install: impl FnOnce(&mut Self),
    ) -> Result<()> {
        let staged = STAGED_PINS.map(|(from, _)| self.dir.join(from));
        let old = replaces.then(|| self.program.as_fd());
        let r = staged
            .iter()
            .filter(|p| p.exists())
            .try_for_each(|p| restrict(p, 0o640))
            .and_then(|()| {
                sys::link_update(self.link.as_fd(), program.as_fd(), old)
                    .map_err(sys_err("BPF_LINK_UPDATE"))
            });
        if let Err(e) = r {
            for p in &staged {
                let _ = fs::remove_file(p);
            }
            return Err(e);
        }
        self.program = program;
        install(self);
        self.settle_pins()
    }

    /// Move the staged pins into place, the filter first and the cache
    /// last: a crash in between leaves a filter with a bit for every entry
    /// of either hash, and a cache of entries the pinned hash has (the new
    /// hash holds every entry of the old, with the same destination); then
    /// pin the program that runs. Until this has succeeded no change is
    /// made (`settle_pending`): a daemon adopting the state would find the
    /// maps the pins name, not the ones the program reads.
    pub(super) fn settle_pins(&mut self) -> Result<()> {
        self.pins_pending = true;
        for (from, to) in STAGED_PINS {
            let from = self.dir.join(from);
            if from.exists() {
                let pin = self.dir.join(to);
                fs::rename(&from, &pin).map_err(io_err(&pin))?;
            }
        }
        pin_program(&self.dir, self.program.as_fd())?;
        self.pins_pending = false;
        Ok(())
    }

    /// Before a change: the pins of an earlier swap that could not be moved
    /// into place, moved now, or the change refused with the reason.
    pub(super) fn settle_pending(&mut self) -> Result<()> {
        if self.pins_pending {
            self.settle_pins()?;
        }
        Ok(())
    }

    /// Read the destinations and the entries hash into the in-memory index
    /// and the counts; nothing is written but what `adopt_tries` finds stale
    /// (the lengths words, and the tries they lead to).
    pub(super) fn load_index(&mut self) -> Result<()> {
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
        // Every entry is in the hash: read it in batches where the kernel
        // can (hash maps since 5.6), else a key at a time. Read straight
        // into entries, with nothing kept of the keys.
        let fd = self.hash.fd().as_fd();
        let (mut items, read, r) = read_entries(fd, self.hash_capacity);
        if let Err(e) = r {
            if read > 0 || !host::no_batch_support(&e) {
                return Err(sys_err("BPF_MAP_LOOKUP_BATCH (entries)")(e));
            }
            let dup = fd.try_clone_to_owned().map_err(sys_err("dup"))?;
            let data = MapData::from_fd(dup).map_err(map_err("entries"))?;
            let map: BpfHashMap<_, aya::maps::lpm_trie::Key<BindingKey>, BindingValue> =
                BpfHashMap::try_from(Map::HashMap(data)).map_err(map_err("entries"))?;
            for item in map.iter() {
                let (k, v) = item.map_err(map_err("entries"))?;
                if let Some(e) = Entry::from_key(&k) {
                    items.push((e, v.destination));
                }
            }
        }
        let mut dirty = BTreeSet::new();
        for (e, _) in &items {
            self.kinds.count(e, 1, &mut dirty);
        }
        self.entries.insert_many(items);
        self.filter.fill(self.entries.iter().map(|(e, _)| e.key()));
        // A cache whose header is written agrees with the hash: its writers
        // fill a slot only after the hash has the entry and empty it before
        // the entry leaves, so a crash leaves at most an entry uncached, and
        // a grown cache is pinned after its hash (`swap_program`). Reading
        // it back whole would cost a restart a third of a second at 2^20.
        if !self.filter.cache_active()? {
            self.filter.map()?;
            let cached = self.cached_kinds();
            bindings::sync_cache(&self.entries, &mut self.filter, cached);
        }
        self.kinds.assume_written();
        self.adopt_tries()
    }

    /// Whether the trie has batch updates: an empty `BPF_MAP_UPDATE_BATCH`
    /// changes nothing, and says ENOTSUPP where the map has no batch
    /// operations (the LPM trie before 6.0, e.g. on Debian 11's 5.10).
    pub(super) fn probe_batch(&self) -> bool {
        probe_batch(self.bindings.map().fd().as_fd())
    }

    /// Whether changes to the trie go in batches (else one element per
    /// syscall, as on kernels without batch operations for it).
    pub fn batch_updates(&self) -> bool {
        self.batch
    }

    /// Write the trie one element per syscall even where batches work: the
    /// path kernels without batch operations take, kept testable on every
    /// kernel.
    pub fn force_single_updates(&mut self) {
        self.batch = false;
        self.hash_batch = false;
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
    pub fn destroy(mut self) -> Result<()> {
        let dir = self.dir.clone();
        // Detach first, so that traffic is the kernel's again when this
        // returns (releasing the pinned link alone happens asynchronously).
        sys::link_detach(self.link.as_fd()).map_err(sys_err("BPF_LINK_DETACH"))?;
        let lock = self.lock.take();
        drop(self);
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        // The lock goes with the state it guarded, while still held.
        remove_lock(lock)
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
}

/// Every entry of the `entries` hash (`buckets`: its capacity, a power of
/// two, is its bucket count), read in batches: a large one by two threads,
/// one from each half of the buckets. The kernel spends most of adopting
/// here, and a bucket's lock and copies cost the same on any CPU. Returns
/// the entries, how many elements were read, and the error that stopped.
fn read_entries(fd: BorrowedFd<'_>, buckets: u32) -> (Vec<(Entry, u32)>, usize, io::Result<()>) {
    type K = aya::maps::lpm_trie::Key<BindingKey>;
    // No bigger than the map: the buffers are zeroed memory to fault in,
    // half a MiB at full size: a few per cent of starting a fresh
    // dispatcher, whose hash has 4096 buckets.
    let chunk = LOOKUP_BATCH.min(buckets.max(1) as usize);
    let read_half = |from: u32, until: u32| {
        let mut items: Vec<(Entry, u32)> = Vec::new();
        let mut read = 0usize;
        // Where the entries of a call that read past `until` begin.
        let mut past = None;
        let r = sys::map_lookup_batch_buckets::<K, BindingValue>(
            fd,
            chunk,
            from,
            until,
            |k, v, beyond| {
                read += 1;
                if beyond && past.is_none() {
                    past = Some(items.len());
                }
                if let Some(e) = Entry::from_key(k) {
                    items.push((e, v.destination));
                }
            },
        );
        (items, read, r, past)
    };
    let two = buckets >= PARALLEL_READ_BUCKETS
        && std::thread::available_parallelism().is_ok_and(|n| n.get() > 1);
    if !two {
        let (items, read, r, _) = read_half(0, u32::MAX);
        return (items, read, r);
    }
    let half = buckets / 2;
    let ((mut low, read_low, r_low, past), (high, read_high, r_high, _)) =
        std::thread::scope(|s| {
            let high = s.spawn(|| read_half(half, u32::MAX));
            let low = read_half(0, half);
            (low, high.join().expect("the reader does not panic"))
        });
    // The low reader's last call may have read on into the high half: the
    // high reader's first entry marks where that began.
    if let (Some(at), Some(first)) = (past, high.first())
        && let Some(p) = low[at..].iter().position(|x| x == first)
    {
        low.truncate(at + p);
    }
    let r = r_low.and(r_high);
    low.extend(high);
    (low, read_low + read_high, r)
}

/// From how many buckets (the `entries` hash's capacity) on adoption reads
/// with two threads.
const PARALLEL_READ_BUCKETS: u32 = 1 << 16;

/// Whether a map of binding keys and values takes `BPF_MAP_UPDATE_BATCH`:
/// an empty batch changes nothing, and says ENOTSUPP where the map has no
/// batch operations (the LPM trie before 6.0, e.g. on Debian 11's 5.10).
pub(super) fn probe_batch(fd: BorrowedFd<'_>) -> bool {
    let none: [aya::maps::lpm_trie::Key<BindingKey>; 0] = [];
    let values: [BindingValue; 0] = [];
    match sys::map_update_batch(fd, &none, &values).1 {
        Ok(()) => true,
        Err(e) => {
            debug_assert!(host::no_batch_support(&e), "{e}");
            false
        }
    }
}

pub(super) fn program_of(ebpf: &mut aya::Ebpf) -> Result<&mut SkLookup> {
    let prog = ebpf
        .program_mut(PROGRAM)
        .ok_or(DispatcherError::MissingProgram { name: PROGRAM })?;
    prog.try_into().map_err(DispatcherError::Program)
}

/// One loader per process. `EbpfLoader::new()` reads and parses the
/// kernel's BTF (`/sys/kernel/btf/vmlinux`, megabytes: most of the time a
/// fresh dispatcher took) on every call, though the object has no CO-RE
/// relocations and `.btf(None)` drops it again; this one parses it once,
/// at its first use, and keeps none of it.
static LOADER: LazyLock<Mutex<EbpfLoader<'static>>> = LazyLock::new(|| {
    let mut loader = EbpfLoader::new();
    loader.btf(None);
    Mutex::new(loader)
});

/// The pins a swap stages aside, and where each goes once the link runs a
/// program on them, in that order (see `Dispatcher::settle_pins`).
const STAGED_PINS: [(&str, &str); 4] = [
    (METRICS_PIN_NEW, METRICS),
    (filter::FILTER_PIN_NEW, filter::FILTER),
    (ENTRIES_PIN_NEW, ENTRIES),
    (filter::CACHE_PIN_NEW, filter::CACHE),
];

/// Load the object against `dir`: each map pinned there is used, a missing
/// one is created and pinned there, except the `entries` hash, its filter
/// and its cache, which are pinned at `entries_pin`, and at `filter_pin`
/// and `cache_pin`, and created for a capacity of `capacity` entries (the
/// cache with `cache_buckets` buckets), and the `metrics` array, pinned at
/// `metrics_pin` and created with `metrics_capacity` slots.
pub(super) fn load_object(
    dir: &Path,
    entries_pin: &Path,
    [filter_pin, cache_pin]: [&Path; 2],
    (capacity, cache_buckets): (u32, u32),
    (metrics_pin, metrics_capacity): (&Path, u32),
) -> Result<aya::Ebpf> {
    let mut loader = LOADER.lock().unwrap_or_else(PoisonError::into_inner);
    loader
        .default_map_pin_directory(dir)
        .map_pin_path(METRICS, metrics_pin.to_owned())
        .map_max_entries(METRICS, metrics_capacity)
        .map_pin_path(ENTRIES, entries_pin.to_owned())
        .map_max_entries(ENTRIES, capacity)
        .map_pin_path(filter::FILTER, filter_pin.to_owned())
        .map_max_entries(filter::FILTER, abi::filter_words(capacity))
        .map_pin_path(filter::CACHE, cache_pin.to_owned())
        .map_max_entries(filter::CACHE, 1 + cache_buckets)
        .load(DISPATCHER_OBJECT)
        .map_err(load_err)
}

/// The object against the maps pinned in `dir`, its replaceable maps at
/// their usual pins (the sizes of those missing: for `capacity` entries).
fn load_pinned(dir: &Path, capacity: u32) -> Result<aya::Ebpf> {
    let pins = [filter::FILTER, filter::CACHE].map(|n| dir.join(n));
    load_object(
        dir,
        &dir.join(ENTRIES),
        [&pins[0], &pins[1]],
        (capacity, abi::cache_buckets(capacity)),
        (&dir.join(METRICS), abi::METRICS_MIN),
    )
}

/// Load the program against a new `metrics` array of `metrics_capacity`
/// slots pinned aside (`metrics-new`) and the other maps pinned in `dir`
/// (an `entries` hash of `capacity` entries). The program is not run and
/// the new array is zeroed; on an error nothing staged is left.
pub(super) fn stage_metrics(
    dir: &Path,
    capacity: u32,
    metrics_capacity: u32,
) -> Result<(OwnedFd, MapData)> {
    let pin = dir.join(METRICS_PIN_NEW);
    let _ = fs::remove_file(&pin);
    let built = (|| {
        let pins = [filter::FILTER, filter::CACHE].map(|n| dir.join(n));
        let mut ebpf = load_object(
            dir,
            &dir.join(ENTRIES),
            [&pins[0], &pins[1]],
            (capacity, abi::cache_buckets(capacity)),
            (&pin, metrics_capacity),
        )?;
        let program = load_fd(program_of(&mut ebpf)?)?;
        match ebpf.take_map(METRICS) {
            Some(Map::PerCpuArray(m)) => Ok((program, m)),
            _ => Err(DispatcherError::MissingProgram { name: METRICS }),
        }
    })();
    if built.is_err() {
        let _ = fs::remove_file(&pin);
    }
    built
}

/// The maps `stage` made.
pub(super) struct Staged {
    pub(super) hash: Option<MapData>,
    pub(super) filter: MapData,
    pub(super) cache: MapData,
}

/// Load the program against a new filter for `capacity` entries and a new
/// cache of `cache_buckets` buckets, pinned aside (`filter-new`,
/// `cache-new`), and `entries_pin`'s hash: a new one pinned aside too
/// where `new_hash`, else the one at `entries_pin`. The program is not run
/// and the new maps are empty; on an error nothing staged is left.
pub(super) fn stage(
    dir: &Path,
    entries_pin: &Path,
    (capacity, cache_buckets): (u32, u32),
    new_hash: bool,
) -> Result<(OwnedFd, Staged)> {
    let filter_pin = dir.join(filter::FILTER_PIN_NEW);
    let cache_pin = dir.join(filter::CACHE_PIN_NEW);
    let staged = [
        filter_pin.clone(),
        cache_pin.clone(),
        dir.join(ENTRIES_PIN_NEW),
    ];
    for p in &staged {
        let _ = fs::remove_file(p);
    }
    let built = (|| {
        let mut ebpf = load_object(
            dir,
            entries_pin,
            [&filter_pin, &cache_pin],
            (capacity, cache_buckets),
            (&dir.join(METRICS), abi::METRICS_MIN),
        )?;
        let program = load_fd(program_of(&mut ebpf)?)?;
        let hash = match (new_hash, ebpf.take_map(ENTRIES)) {
            (false, _) => None,
            (true, Some(Map::HashMap(m))) => Some(m),
            _ => return Err(DispatcherError::MissingProgram { name: ENTRIES }),
        };
        let mut take = |name| match ebpf.take_map(name) {
            Some(Map::Array(m)) => Ok(m),
            _ => Err(DispatcherError::MissingProgram { name }),
        };
        let filter = take(filter::FILTER)?;
        let cache = take(filter::CACHE)?;
        Ok((
            program,
            Staged {
                hash,
                filter,
                cache,
            },
        ))
    })();
    if built.is_err() {
        for p in &staged {
            let _ = fs::remove_file(p);
        }
    }
    built
}

/// The filter or cache (`spec`) pinned at `path`, if it is one for an
/// entries hash of `capacity` entries, and its size (`max_entries`): the
/// filter's is the hash's, the cache's any this build makes beside it.
fn usable_filter(path: &Path, spec: &MapSpec, capacity: u32) -> Option<(MapData, u32)> {
    let data = MapData::from_pin(path).ok()?;
    let found = sys::map_info(data.fd().as_fd()).ok()?;
    let max = if spec.name == filter::CACHE {
        let buckets = found.max_entries.wrapping_sub(1);
        if !abi::cache_buckets_fit(buckets, capacity) {
            return None;
        }
        found.max_entries
    } else {
        abi::filter_words(capacity)
    };
    let want = (spec.map_type, spec.key_size, spec.value_size, max);
    (
        found.map_type,
        found.key_size,
        found.value_size,
        found.max_entries,
    )
        .eq(&want)
        .then_some((data, found.max_entries))
}

/// Create maps and program in `dir`, attach to `netns`, pin the link.
pub(super) fn build(dir: &Path, netns: BorrowedFd<'_>) -> Result<()> {
    let mut ebpf = load_pinned(dir, abi::ENTRIES_MIN)?;
    // The lengths words of no entries, while no program runs: nothing can
    // read one half written, so plain updates do, and a fresh dispatcher
    // need not load `skactivate_store_word` to write them (see
    // `Dispatcher::sync_ports`; adoption finds them as the entries want).
    let Some(Map::Array(ports)) = ebpf.map("ports") else {
        return Err(DispatcherError::MissingProgram { name: "ports" });
    };
    let none = abi::lengths_word(&[], Default::default(), Default::default());
    let words: Vec<u32> = (abi::PORTS_LENGTHS..abi::PORTS_WORDS).collect();
    bindings::update_each(ports.fd().as_fd(), &words, &vec![none; words.len()])
        .1
        .map_err(sys_err("BPF_MAP_UPDATE_ELEM (ports)"))?;
    let prog = program_of(&mut ebpf)?;
    prog.load().map_err(program_err)?;
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
pub(super) fn load_program(dir: &Path) -> Result<OwnedFd> {
    let mut ebpf = load_pinned(dir, abi::ENTRIES_MIN)?;
    load_fd(program_of(&mut ebpf)?)
}

/// Load this build's `skactivate_store_word` against the maps pinned in
/// `dir` (the `entries` hash has `entries_max` entries). Never attached:
/// run to write one `ports` word with one store.
pub(super) fn load_store_program(dir: &Path, entries_max: u32) -> Result<OwnedFd> {
    let mut ebpf = load_pinned(dir, entries_max)?;
    let prog: &mut SkLookup = ebpf
        .program_mut(STORE_PROGRAM)
        .ok_or(DispatcherError::MissingProgram {
            name: STORE_PROGRAM,
        })?
        .try_into()
        .map_err(DispatcherError::Program)?;
    load_fd(prog)
}

/// Load `prog` into the kernel; its fd, ours to keep.
fn load_fd(prog: &mut SkLookup) -> Result<OwnedFd> {
    prog.load().map_err(program_err)?;
    prog.fd()
        .map_err(DispatcherError::Program)?
        .as_fd()
        .try_clone_to_owned()
        .map_err(sys_err("dup"))
}

/// Pin `prog` as the state's program, replacing the pin atomically.
pub(super) fn pin_program(dir: &Path, prog: BorrowedFd<'_>) -> Result<()> {
    let staged = dir.join(paths::PROGRAM_PIN_NEW);
    let _ = fs::remove_file(&staged);
    sys::obj_pin(prog, &staged).map_err(io_err(&staged))?;
    restrict(&staged, 0o640)?;
    let pin = dir.join(paths::PROGRAM_PIN);
    fs::rename(&staged, &pin).map_err(io_err(&pin))
}

/// The pinned program, if it is the one the link runs (`link_prog_id`).
pub(super) fn open_program(dir: &Path, link_prog_id: u32) -> Result<Option<OwnedFd>> {
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

pub(super) fn restrict(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

pub(super) fn ensure_dir(dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => restrict(dir, 0o750),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

pub(super) fn check_bpffs(path: &Path) -> Result<()> {
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

/// Remove a held lock's directory (after the state it guards).
pub(super) fn remove_lock(lock: Option<lock::StateLock>) -> Result<()> {
    let Some(lock) = lock else { return Ok(()) };
    let path = lock::lock_dir_of(&lock);
    lock.remove().map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two readers, one per half of the buckets, hand back every entry of a
    /// large hash exactly once: the low reader's last call, which reads on
    /// into the high half, is cut where the high reader began.
    #[test]
    fn a_large_hash_is_read_back_once_by_two_readers() {
        type K = aya::maps::lpm_trie::Key<BindingKey>;
        let buckets = PARALLEL_READ_BUCKETS;
        let Some(map) = sys::test_hash::<K, BindingValue>("read_test", buckets) else {
            return;
        };
        let fd = map.as_fd();
        // Sizes around one batch call (LOOKUP_BATCH), so the low reader's
        // last call crosses the middle in more than one way.
        let mut written = 0u32;
        for n in [1u32, 3_000, 20_000, 40_000] {
            let entries: Vec<Entry> = (written..n)
                .map(|i| Entry {
                    protocol: Protocol::Tcp,
                    prefix: IpNet::new(IpAddr::from([198, 18, (i >> 8) as u8, i as u8]), 32)
                        .unwrap(),
                    port: 8000 + (i >> 16) as u16,
                })
                .collect();
            let keys: Vec<K> = entries.iter().map(Entry::key).collect();
            let values: Vec<BindingValue> = (written..n)
                .map(|i| BindingValue {
                    destination: i,
                    prefixlen: 64,
                })
                .collect();
            let (done, r) = sys::map_update_batch(fd, &keys, &values);
            r.unwrap();
            assert_eq!(done, keys.len());
            written = n;
            let (mut items, read, r) = read_entries(fd, buckets);
            r.unwrap();
            assert!(read >= n as usize, "{read} read of {n}");
            assert_eq!(items.len(), n as usize, "each entry once");
            items.sort_by_key(|(_, id)| *id);
            for (i, (e, id)) in items.iter().enumerate() {
                assert_eq!(*id, i as u32);
                assert_eq!(e.prefix.prefix_len(), 32);
            }
        }
    }
}
