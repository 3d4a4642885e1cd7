//! Bindings: the in-memory index of the entries, the counts behind the
//! `ports` words, and `apply`, which changes the maps all at once or not at
//! all.

use super::*;

/// One entry: a binding narrowed to one port (0 = `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Entry {
    pub(super) protocol: Protocol,
    pub(super) prefix: IpNet,
    pub(super) port: u16,
}

impl Entry {
    pub(super) fn of(binding: &Binding) -> impl Iterator<Item = Entry> + '_ {
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

    /// The entry a hash or trie key stands for (written masked), or `None`
    /// for a key skactivate would never have written. The adoption path:
    /// no `Binding` on the way.
    pub(super) fn from_key(key: &aya::maps::lpm_trie::Key<BindingKey>) -> Option<Entry> {
        let k = key.data();
        let protocol = Protocol::from_number(k.protocol)?;
        let bits = u8::try_from(key.prefix_len().checked_sub(abi::KEY_HEADER_BITS)?).ok()?;
        let prefix = match Family::from_af(k.family)? {
            Family::V4 => {
                let [a, b, c, d, ..] = k.addr;
                IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(a, b, c, d), bits).ok()?)
            }
            Family::V6 => {
                IpNet::V6(ipnet::Ipv6Net::new(std::net::Ipv6Addr::from(k.addr), bits).ok()?)
            }
        };
        Some(Entry {
            protocol,
            // Masked as `Binding::new` masks (the keys written were).
            prefix: prefix.trunc(),
            port: u16::from_be_bytes(k.port),
        })
    }

    /// A /32 or /128: in the hash only.
    pub(super) fn is_full(&self) -> bool {
        self.prefix.prefix_len() == self.prefix.max_prefix_len()
    }

    pub(super) fn key(&self) -> aya::maps::lpm_trie::Key<BindingKey> {
        abi::binding_key(self.protocol, &self.prefix, self.port)
    }

    /// A total order of entries, cheap to compare: address, then family,
    /// length, protocol and port packed in one word.
    pub(super) fn sort_key(&self) -> (u128, u32) {
        let (addr, family) = match self.prefix.addr() {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 0),
            IpAddr::V6(a) => (u128::from(a), 1),
        };
        let rest = family << 31
            | u32::from(self.prefix.prefix_len()) << 24
            | abi::protocol_slot(self.protocol) << 16
            | u32::from(self.port);
        (addr, rest)
    }

    /// Sorts entries as the trie orders its keys.
    pub(super) fn trie_order(&self) -> (u8, [u8; 2], u8, [u8; 16], u32) {
        let key = self.key();
        let k = key.data();
        (k.protocol, k.port, k.family, k.addr, key.prefix_len())
    }

    pub(super) fn binding(&self) -> Binding {
        let ports = if self.port == 0 {
            Ports::All
        } else {
            Ports::single(self.port)
        };
        Binding::new(self.protocol, self.prefix, ports)
    }
}

/// What kinds of entry exist, counted, and the `ports` words that say so to
/// the program (see `ebpf/skactivate.h`).
#[derive(Debug)]
pub(super) struct Kinds {
    /// Entries per (protocol slot << 16 | port), port ≠ 0.
    specific: HashMap<u32, u32, index::Fast>,
    /// Wildcard entries per (family slot << 1 | protocol slot).
    wild: [u32; 4],
    /// Entries per address length, port-specific and `*`, per (family slot
    /// << 1 | protocol slot).
    lengths: [BTreeMap<u8, [u32; 2]>; 4],
    /// Entries per prefix, per slot, while a slot has at most
    /// `FILTER_PREFIXES` (the address filter); `None` past that until the
    /// slot is empty again.
    prefixes: [Option<HashMap<IpNet, u32>>; 4],
    /// Entries per slot.
    total: [u64; 4],
    /// The `ports` words as the entries want them.
    words: Vec<u64>,
    /// The `ports` words as written (a crash may have left more bits set in
    /// the map than these say, never fewer: bits rise before entries appear
    /// and fall after they are gone).
    written: Vec<u64>,
}

impl Default for Kinds {
    fn default() -> Self {
        let mut words = vec![0; abi::PORTS_WORDS as usize];
        // No entries: every kind absent (a fresh map holds zeros, "probe",
        // until the word is first written).
        let none = abi::lengths_word(&[], Default::default(), Default::default());
        words[abi::PORTS_LENGTHS as usize..].fill(none);
        Kinds {
            specific: HashMap::default(),
            wild: [0; 4],
            lengths: Default::default(),
            prefixes: std::array::from_fn(|_| Some(HashMap::new())),
            total: [0; 4],
            words,
            written: vec![0; abi::PORTS_WORDS as usize],
        }
    }
}

fn bump(count: &mut u32, delta: i64) -> bool {
    let before = *count;
    *count = u32::try_from((i64::from(before) + delta).max(0)).unwrap_or(u32::MAX);
    (before == 0) != (*count == 0)
}

/// Past this many prefixes in a slot the address filter is off: 16 values
/// of a nibble are mostly taken by then.
const FILTER_PREFIXES: usize = 32;

fn slots(family: Family, protocol: Protocol) -> usize {
    (abi::family_slot(family) << 1 | abi::protocol_slot(protocol)) as usize
}

impl Kinds {
    /// Count `delta` entries like `e`; the words whose bits change go into
    /// `dirty`.
    pub(super) fn count(&mut self, e: &Entry, delta: i64, dirty: &mut BTreeSet<u32>) {
        let family = Family::of(&e.prefix.addr());
        let ps = abi::protocol_slot(e.protocol);
        let fs = abi::family_slot(family);
        if e.port != 0 {
            let c = self
                .specific
                .entry(ps << 16 | u32::from(e.port))
                .or_default();
            if bump(c, delta) {
                let on = *c != 0;
                if !on {
                    self.specific.remove(&(ps << 16 | u32::from(e.port)));
                }
                let (word, bit) = abi::port_word_bit(e.protocol, e.port);
                set_bit(&mut self.words[word as usize], bit, on);
                dirty.insert(word);
                self.unwritten_lengths(e.protocol, dirty);
            }
        } else if bump(&mut self.wild[slots(family, e.protocol)], delta) {
            let on = self.wild[slots(family, e.protocol)] != 0;
            for word in ps << 11..(ps + 1) << 11 {
                set_bit(&mut self.words[word as usize], abi::PORTS_WILD_BIT + fs, on);
                dirty.insert(word);
            }
        }
        let bits = e.prefix.prefix_len();
        let slot = slots(family, e.protocol);
        let total = &mut self.total[slot];
        *total = total.saturating_add_signed(delta);
        let mut filter_changed = false;
        match &mut self.prefixes[slot] {
            Some(prefixes) => {
                let c = prefixes.entry(e.prefix).or_default();
                filter_changed = bump(c, delta);
                if *c == 0 {
                    prefixes.remove(&e.prefix);
                }
                if prefixes.len() > FILTER_PREFIXES {
                    self.prefixes[slot] = None;
                }
            }
            None if *total == 0 => self.prefixes[slot] = Some(HashMap::new()),
            None => {}
        }
        let lengths = &mut self.lengths[slot];
        let c = lengths.entry(bits).or_default();
        let kinds_changed = bump(&mut c[usize::from(e.port == 0)], delta);
        if *c == [0, 0] {
            lengths.remove(&bits);
        }
        if kinds_changed || filter_changed {
            let idx = abi::lengths_index(family, e.protocol);
            self.words[idx as usize] = self.lengths_word(slot, family);
            dirty.insert(idx);
        }
    }

    /// The lengths word of a slot: the lengths in use and their kinds.
    fn lengths_word(&self, slot: usize, family: Family) -> u64 {
        let kinds = |c: &[u32; 2]| abi::LengthKinds {
            specific: c[0] != 0,
            wild: c[1] != 0,
        };
        let full = abi::full_bits(family);
        let lengths = &self.lengths[slot];
        let shorter: Vec<_> = lengths
            .range(..full)
            .rev()
            .map(|(&bits, c)| (bits, kinds(c)))
            .collect();
        let filter = match (&self.prefixes[slot], lengths.keys().next()) {
            // The last nibble within the shortest prefix in use.
            (Some(prefixes), Some(&shortest)) if shortest >= 4 => {
                let nibble = shortest / 4 - 1;
                let present = prefixes.keys().fold(0u16, |m, p| {
                    m | 1 << abi::AddrFilter::value(p.addr(), nibble)
                });
                abi::AddrFilter {
                    nibble,
                    absent: !present,
                }
            }
            _ => abi::AddrFilter::default(),
        };
        abi::lengths_word(
            &shorter,
            lengths.get(&full).map(kinds).unwrap_or_default(),
            filter,
        )
    }

    /// A port bit of `protocol` changed: the program may now read the
    /// protocol's lengths words, so each not yet written goes into `dirty`
    /// (a fresh map holds zeros there, which is right but slow).
    fn unwritten_lengths(&self, protocol: Protocol, dirty: &mut BTreeSet<u32>) {
        for family in [Family::V4, Family::V6] {
            let idx = abi::lengths_index(family, protocol);
            if self.words[idx as usize] != self.written[idx as usize] {
                dirty.insert(idx);
            }
        }
    }

    /// The address lengths in use for a family and protocol, longest first.
    pub(super) fn lengths(&self, family: Family, protocol: Protocol) -> Vec<u8> {
        self.lengths[slots(family, protocol)]
            .keys()
            .rev()
            .copied()
            .collect()
    }

    /// Take the port words as written (after adoption: derived, never read
    /// back). The lengths words are not: an older daemon may have changed
    /// the entries under bits it did not know; `lengths_indices` are to be
    /// written after adoption.
    pub(super) fn assume_written(&mut self) {
        self.written.clone_from(&self.words);
        for w in &mut self.written[abi::PORTS_LENGTHS as usize..] {
            *w = !*w;
        }
    }

    /// The indices of the lengths words.
    pub(super) fn lengths_indices() -> BTreeSet<u32> {
        (abi::PORTS_LENGTHS..abi::PORTS_WORDS).collect()
    }
}

fn set_bit(word: &mut u64, bit: u32, on: bool) {
    if on {
        *word |= 1 << bit;
    } else {
        *word &= !(1 << bit);
    }
}

impl Dispatcher {
    /// Write the `ports` words in `dirty` that differ from what was written.
    pub(super) fn sync_ports(&mut self, dirty: &BTreeSet<u32>) -> Result<()> {
        let (keys, values): (Vec<u32>, Vec<u64>) = dirty
            .iter()
            .filter(|&&w| self.kinds.words[w as usize] != self.kinds.written[w as usize])
            .map(|&w| (w, self.kinds.words[w as usize]))
            .unzip();
        if keys.is_empty() {
            return Ok(());
        }
        let fd = self.ports.fd().as_fd();
        let (mut n, mut r) = if keys.len() > 1 && self.hash_batch {
            sys::map_update_batch(fd, &keys, &values)
        } else {
            (0, Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)))
        };
        if r.is_err() && n == 0 {
            // Arrays without batch operations: one word per syscall.
            (n, r) = update_each(fd, &keys, &values);
        }
        for (&k, &v) in keys[..n].iter().zip(&values) {
            self.kinds.written[k as usize] = v;
        }
        r.map_err(sys_err("BPF_MAP_UPDATE_ELEM (ports)"))
    }

    /// Write `keys` and `values` into the hash (`trie` false) or the trie, in
    /// batches where the map takes them; how many went in, and the error.
    fn write_entries(
        &self,
        trie: bool,
        keys: &[aya::maps::lpm_trie::Key<BindingKey>],
        values: &[BindingValue],
    ) -> (usize, io::Result<()>) {
        let (fd, batch) = if trie {
            (self.bindings.map().fd().as_fd(), self.batch)
        } else {
            (self.hash.fd().as_fd(), self.hash_batch)
        };
        let mut done = 0;
        for (k, v) in keys.chunks(UPDATE_BATCH).zip(values.chunks(UPDATE_BATCH)) {
            let (n, r) = if batch {
                sys::map_update_batch(fd, k, v)
            } else {
                update_each(fd, k, v)
            };
            done += n;
            if r.is_err() {
                return (done, r);
            }
        }
        (done, Ok(()))
    }

    /// Take entries out of the hash and, if shorter than full length, the
    /// trie; absent ones are no error.
    fn delete_entries<'e>(&self, entries: impl Iterator<Item = &'e Entry>) -> Result<()> {
        let mut failure = None;
        for e in entries {
            let key = e.key();
            if !e.is_full() {
                match sys::map_delete_elem(self.bindings.map().fd().as_fd(), &key) {
                    Ok(()) => {}
                    Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(err) => {
                        failure.get_or_insert(sys_err("BPF_MAP_DELETE_ELEM (bindings)")(err));
                    }
                }
            }
            match sys::map_delete_elem(self.hash.fd().as_fd(), &key) {
                Ok(()) => {}
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
                Err(err) => {
                    failure.get_or_insert(sys_err("BPF_MAP_DELETE_ELEM (entries)")(err));
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Apply a change all at once or not at all: `add` entries (entry →
    /// destination id) go in first, then `remove` entries go out, so that a
    /// replacement never leaves a gap. The `ports` words rise before entries
    /// appear and fall after they vanish, so the program never skips an entry.
    pub(super) fn apply(&mut self, add: Vec<(Entry, u32)>, remove: Vec<Entry>) -> Result<Changes> {
        // Conflicts first, from the index: nothing has been touched yet.
        let mut add = add;
        let mut conflict = None;
        add.retain(|(e, id)| match self.entries.get(e) {
            None => true,
            Some(other) => {
                if other != *id && conflict.is_none() {
                    conflict = Some((*e, other));
                }
                false
            }
        });
        if let Some((e, other)) = conflict {
            return Err(DispatcherError::Conflict {
                binding: e.binding(),
                other: self.dests[&other].destination.clone(),
            });
        }
        // Equal entries side by side, by a key quick to compare.
        add.sort_unstable_by_key(|(e, id)| (e.sort_key(), *id));
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

        // Room in the hash before anything is written.
        let needed = self.entries.len() + add.len();
        if needed > self.hash_capacity as usize && self.hash_capacity < abi::MAX_BINDINGS {
            self.grow(needed)?;
        }

        let mut dirty = BTreeSet::new();
        for (e, _) in &add {
            self.kinds.count(e, 1, &mut dirty);
        }
        let undo_counts = |d: &mut Dispatcher, add: &[(Entry, u32)]| {
            let mut dirty = BTreeSet::new();
            for (e, _) in add {
                d.kinds.count(e, -1, &mut dirty);
            }
            let _ = d.sync_ports(&dirty);
        };
        if let Err(e) = self.sync_ports(&dirty) {
            undo_counts(self, &add);
            return Err(e);
        }

        // The hash holds every entry, the trie the shorter ones. A batch
        // cannot say BPF_NOEXIST; it need not, as the index has already left
        // out every entry present and this process is the maps' only writer.
        let keys: Vec<_> = add.iter().map(|(e, _)| e.key()).collect();
        let values: Vec<_> = add
            .iter()
            .map(|(e, id)| BindingValue {
                destination: *id,
                prefixlen: abi::trie_prefixlen(&e.prefix),
            })
            .collect();
        let (done, r) = self.write_entries(false, &keys, &values);
        let mut failed = r
            .err()
            .map(|err| (err, add.get(done).map(|a| a.0), "entries"));
        let mut hash_done = done;
        let mut short: Vec<usize> = (0..add.len()).filter(|&i| !add[i].0.is_full()).collect();
        // In the trie's own order: each insert walks the path the previous one
        // just walked, still in cache (in random order a big trie costs a
        // cache miss per level).
        short.sort_by_cached_key(|&i| add[i].0.trie_order());
        let mut trie_done = 0;
        if failed.is_none() && !short.is_empty() {
            let k: Vec<_> = short.iter().map(|&i| keys[i]).collect();
            let v: Vec<_> = short.iter().map(|&i| values[i]).collect();
            let (n, r) = self.write_entries(true, &k, &v);
            trie_done = n;
            failed = r
                .err()
                .map(|err| (err, short.get(n).map(|&i| add[i].0), "bindings"));
        }
        if let Some((err, at, map)) = failed {
            let trie_part: Vec<Entry> = short[..trie_done].iter().map(|&i| add[i].0).collect();
            let _ = self.delete_entries(trie_part.iter());
            hash_done = hash_done.min(add.len());
            let hash_part: Vec<Entry> = add[..hash_done].iter().map(|a| a.0).collect();
            let _ = self.delete_entries(hash_part.iter());
            undo_counts(self, &add);
            // A full hash says E2BIG, a full trie ENOSPC (`at` did not fit).
            return Err(match (err.raw_os_error(), at) {
                (Some(libc::ENOSPC | libc::E2BIG), Some(e)) => DispatcherError::BindingsFull {
                    binding: e.binding(),
                },
                _ => DispatcherError::Syscall {
                    call: if map == "entries" {
                        "BPF_MAP_UPDATE (entries)"
                    } else {
                        "BPF_MAP_UPDATE (bindings)"
                    },
                    source: err,
                },
            });
        }
        let mut per_id: HashMap<u32, u32, index::Fast> = HashMap::default();
        for (_, id) in &add {
            *per_id.entry(*id).or_default() += 1;
        }
        let mut touched: HashSet<u32> = HashSet::new();
        for (id, n) in per_id {
            if let Some(s) = self.dests.get_mut(&id) {
                s.refcount += n;
            }
            touched.insert(id);
        }
        self.entries.insert_many(add.iter().copied());

        let failure = self.delete_entries(remove.iter()).err();
        let mut dirty = BTreeSet::new();
        for e in &remove {
            self.kinds.count(e, -1, &mut dirty);
            if let Some(id) = self.entries.remove(e) {
                if let Some(s) = self.dests.get_mut(&id) {
                    s.refcount = s.refcount.saturating_sub(1);
                }
                touched.insert(id);
            }
        }
        self.sync_ports(&dirty)?;
        self.write_refcounts(touched)?;
        self.collect_garbage()?;
        match failure {
            Some(e) => Err(e),
            None => Ok(Changes {
                added: add.len(),
                removed: remove.len(),
            }),
        }
    }

    /// Replace the `entries` hash by one with room for `needed` entries
    /// (sixteenfold steps, at most `MAX_BINDINGS`), under a program that uses
    /// it. The new map is created, pinned aside and filled first; the link
    /// then runs a program on it, and the pins follow. A crash in between
    /// leaves the link's program not the pinned one, and adoption runs one
    /// on the pinned (old, complete) map again.
    pub(super) fn grow(&mut self, needed: usize) -> Result<()> {
        let mut cap = self.hash_capacity.max(abi::ENTRIES_MIN);
        while (cap as usize) < needed && cap < abi::MAX_BINDINGS {
            cap = (cap * 16).min(abi::MAX_BINDINGS);
        }
        let staged = self.dir.join(ENTRIES_PIN_NEW);
        let _ = fs::remove_file(&staged);
        let mut ebpf = pinned::load_object(&self.dir, &staged, cap)?;
        let built = (|| {
            let prog = pinned::program_of(&mut ebpf)?;
            prog.load().map_err(program_err)?;
            let program = prog
                .fd()
                .map_err(DispatcherError::Program)?
                .as_fd()
                .try_clone_to_owned()
                .map_err(sys_err("dup"))?;
            let map = match ebpf.take_map(ENTRIES) {
                Some(Map::HashMap(m)) => m,
                _ => return Err(DispatcherError::MissingProgram { name: ENTRIES }),
            };
            Ok((program, map))
        })();
        let (program, map) = match built {
            Ok(b) => b,
            Err(e) => {
                let _ = fs::remove_file(&staged);
                return Err(e);
            }
        };
        let (keys, values): (Vec<_>, Vec<_>) = self
            .entries
            .iter()
            .map(|(e, id)| {
                (
                    e.key(),
                    BindingValue {
                        destination: id,
                        prefixlen: abi::trie_prefixlen(&e.prefix),
                    },
                )
            })
            .unzip();
        let fd = map.fd().as_fd();
        let mut r = Ok(());
        for (k, v) in keys.chunks(UPDATE_BATCH).zip(values.chunks(UPDATE_BATCH)) {
            r = if self.hash_batch {
                sys::map_update_batch(fd, k, v).1
            } else {
                update_each(fd, k, v).1
            };
            if r.is_err() {
                break;
            }
        }
        let r = r
            .map_err(sys_err("BPF_MAP_UPDATE (entries)"))
            .and_then(|()| pinned::restrict(&staged, 0o640))
            .and_then(|()| {
                sys::link_update(
                    self.link.as_fd(),
                    program.as_fd(),
                    Some(self.program.as_fd()),
                )
                .map_err(sys_err("BPF_LINK_UPDATE"))
            });
        if let Err(e) = r {
            let _ = fs::remove_file(&staged);
            return Err(e);
        }
        self.program = program;
        self.hash = map;
        self.hash_capacity = cap;
        let pin = self.dir.join(ENTRIES);
        fs::rename(&staged, &pin).map_err(io_err(&pin))?;
        pinned::pin_program(&self.dir, self.program.as_fd())
    }

    /// Add bindings, each to its destination, all or none.
    pub fn add_bindings(&mut self, items: &[(Binding, Destination)]) -> Result<Changes> {
        let mut add = Vec::with_capacity(items.len());
        let mut last: Option<(&Destination, u32)> = None;
        for (b, d) in items {
            // Bindings come in runs of one destination: no hashing then.
            let id = match last {
                Some((l, id)) if l == d => id,
                _ => self.ensure_destination(d)?,
            };
            last = Some((d, id));
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
                    && !wanted.contains(&(*e, *id))
            })
            .map(|(e, _)| e)
            .collect();
        // An entry moving between two destinations of this unit: take it out first.
        let moving: Vec<Entry> = add
            .iter()
            .filter(|(e, id)| {
                self.entries
                    .get(e)
                    .is_some_and(|o| o != *id && self.dests[&o].destination.unit == unit)
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
        for (e, id) in self.entries.iter() {
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
}

/// One `BPF_MAP_UPDATE_ELEM` per element, stopping at the first error: the
/// same contract as `sys::map_update_batch`.
pub(super) fn update_each<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> (usize, io::Result<()>) {
    for (i, (k, v)) in keys.iter().zip(values).enumerate() {
        if let Err(e) = sys::map_update_elem(map, k, v, 0) {
            return (i, Err(e));
        }
    }
    (keys.len(), Ok(()))
}

/// `IpNet` ordered by family, address and length, for grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct IpNetOrd(IpNet);

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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(protocol: Protocol, prefix: &str, port: u16) -> Entry {
        Entry {
            protocol,
            prefix: prefix.parse().unwrap(),
            port,
        }
    }

    const NO_SPECIFIC: u32 = abi::LENGTHS_NO_SPECIFIC;
    const NO_WILD: u32 = abi::LENGTHS_NO_WILD;
    const FULL: u32 = abi::LENGTHS_FULL;

    /// Absent kinds: (listed length i or FULL, no specific, no wild).
    fn absent(kinds: &[(u32, bool, bool)]) -> u64 {
        kinds.iter().fold(0, |w, &(i, s, wild)| {
            w | u64::from(s) << (NO_SPECIFIC + i) | u64::from(wild) << (NO_WILD + i)
        })
    }

    const FILTER_BITS: u64 = 0x1f << abi::LENGTHS_NIBBLE | 0xffff << abi::LENGTHS_FILTER;

    /// A lengths word but its address filter.
    fn word(k: &Kinds, family: Family, protocol: Protocol) -> u64 {
        k.words[abi::lengths_index(family, protocol) as usize] & !FILTER_BITS
    }

    /// The address filter of a lengths word: (nibble, absent values).
    fn filter(k: &Kinds, family: Family, protocol: Protocol) -> (u64, u16) {
        let w = k.words[abi::lengths_index(family, protocol) as usize];
        (
            w >> abi::LENGTHS_NIBBLE & 31,
            (w >> abi::LENGTHS_FILTER) as u16,
        )
    }

    #[test]
    fn the_address_filter_follows_few_prefixes() {
        let mut k = Kinds::default();
        let mut dirty = BTreeSet::new();
        assert_eq!(filter(&k, Family::V4, Protocol::Tcp), (0, 0));
        // 192.0.2.0/24: nibble 5 (bits 20-23) is 0 (of 0x02).
        let net = entry(Protocol::Tcp, "192.0.2.0/24", 0);
        k.count(&net, 1, &mut dirty);
        assert_eq!(filter(&k, Family::V4, Protocol::Tcp), (5, !(1 << 2)));
        // A /32 elsewhere, on many ports: still read at the /24's nibble.
        for port in 1..=100 {
            k.count(
                &entry(Protocol::Tcp, "198.51.100.7/32", port),
                1,
                &mut dirty,
            );
        }
        assert_eq!(
            filter(&k, Family::V4, Protocol::Tcp),
            (5, !(1 << 2 | 1 << 4))
        );
        // The /24 gone: the last nibble of the /32 (7).
        k.count(&net, -1, &mut dirty);
        assert_eq!(filter(&k, Family::V4, Protocol::Tcp), (7, !(1 << 7)));
        // IPv6: the /64's last nibble (bits 60-63).
        k.count(
            &entry(Protocol::Udp, "2001:db8:0:5::/64", 53),
            1,
            &mut dirty,
        );
        assert_eq!(filter(&k, Family::V6, Protocol::Udp), (15, !(1 << 5)));
        // Past FILTER_PREFIXES prefixes: no filter, until the slot empties.
        let many: Vec<Entry> = (0..=FILTER_PREFIXES)
            .map(|i| entry(Protocol::Tcp, &format!("203.0.113.{i}/32"), 80))
            .collect();
        for e in &many {
            k.count(e, 1, &mut dirty);
        }
        assert_eq!(filter(&k, Family::V4, Protocol::Tcp), (0, 0));
        for e in &many {
            k.count(e, -1, &mut dirty);
        }
        assert_eq!(filter(&k, Family::V4, Protocol::Tcp), (0, 0));
        for port in 1..=100 {
            k.count(
                &entry(Protocol::Tcp, "198.51.100.7/32", port),
                -1,
                &mut dirty,
            );
        }
        assert_eq!(filter(&k, Family::V4, Protocol::Tcp), (0, 0));
        k.count(&net, 1, &mut dirty);
        assert_eq!(filter(&k, Family::V4, Protocol::Tcp), (5, !(1 << 2)));
    }

    #[test]
    fn lengths_words_say_which_kinds_each_length_has() {
        let mut k = Kinds::default();
        let none = absent(&[(FULL, true, true)]);
        for family in [Family::V4, Family::V6] {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                assert_eq!(word(&k, family, protocol), none);
            }
        }
        let mut dirty = BTreeSet::new();
        let star24 = entry(Protocol::Tcp, "192.0.2.0/24", 0);
        k.count(&star24, 1, &mut dirty);
        let tcp4 = abi::lengths_index(Family::V4, Protocol::Tcp);
        assert!(dirty.contains(&tcp4));
        // One `*` /24: the /24 listed with no specific entry, nothing at /32.
        assert_eq!(
            word(&k, Family::V4, Protocol::Tcp),
            25 | absent(&[(0, true, false), (FULL, true, true)])
        );
        // A /32 with a port: the full length has specific entries.
        let host80 = entry(Protocol::Tcp, "192.0.2.4/32", 80);
        k.count(&host80, 1, &mut dirty);
        assert_eq!(
            word(&k, Family::V4, Protocol::Tcp),
            25 | absent(&[(0, true, false), (FULL, false, true)])
        );
        // A /25 with a port, listed before the /24; a second /32 changes nothing.
        k.count(&entry(Protocol::Tcp, "192.0.2.0/25", 80), 1, &mut dirty);
        k.count(&entry(Protocol::Tcp, "192.0.2.5/32", 81), 1, &mut dirty);
        assert_eq!(
            word(&k, Family::V4, Protocol::Tcp),
            26 | 25 << 8 | absent(&[(0, false, true), (1, true, false), (FULL, false, true)])
        );
        // The other slots are untouched.
        assert_eq!(word(&k, Family::V4, Protocol::Udp), none);
        assert_eq!(word(&k, Family::V6, Protocol::Tcp), none);
        // Gone again, kind by kind.
        k.count(&entry(Protocol::Tcp, "192.0.2.0/25", 80), -1, &mut dirty);
        k.count(&star24, -1, &mut dirty);
        assert_eq!(
            word(&k, Family::V4, Protocol::Tcp),
            absent(&[(FULL, false, true)])
        );
        k.count(&host80, -1, &mut dirty);
        k.count(&entry(Protocol::Tcp, "192.0.2.5/32", 81), -1, &mut dirty);
        assert_eq!(word(&k, Family::V4, Protocol::Tcp), none);
    }

    #[test]
    fn more_lengths_than_listed_keep_the_full_length_kinds() {
        let mut k = Kinds::default();
        let mut dirty = BTreeSet::new();
        for bits in [8, 12, 16, 20, 24] {
            k.count(
                &entry(Protocol::Udp, &format!("2001:db8::/{}", 96 + bits), 53),
                1,
                &mut dirty,
            );
        }
        k.count(&entry(Protocol::Udp, "2001:db8::1/128", 0), 1, &mut dirty);
        assert_eq!(
            word(&k, Family::V6, Protocol::Udp),
            abi::LENGTHS_TRIE | absent(&[(FULL, true, false)])
        );
    }

    #[test]
    fn a_port_bit_brings_the_protocols_unwritten_lengths_words() {
        let mut k = Kinds::default();
        let mut dirty = BTreeSet::new();
        k.count(&entry(Protocol::Tcp, "192.0.2.4/32", 80), 1, &mut dirty);
        // The IPv6 word of TCP too: the port bit sends IPv6 lookups there.
        for family in [Family::V4, Family::V6] {
            assert!(dirty.contains(&abi::lengths_index(family, Protocol::Tcp)));
            assert!(!dirty.contains(&abi::lengths_index(family, Protocol::Udp)));
        }
        // Once written, only what changes.
        k.written.clone_from(&k.words);
        let mut dirty = BTreeSet::new();
        k.count(&entry(Protocol::Tcp, "192.0.2.5/32", 81), 1, &mut dirty);
        assert!(!dirty.contains(&abi::lengths_index(Family::V6, Protocol::Tcp)));
        // Adoption takes the port words as written, never the lengths words.
        k.assume_written();
        for i in Kinds::lengths_indices() {
            assert_ne!(k.written[i as usize], k.words[i as usize]);
        }
        let ports = abi::PORTS_LENGTHS as usize;
        assert_eq!(k.written[..ports], k.words[..ports]);
    }
}
