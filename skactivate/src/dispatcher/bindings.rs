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

    /// The family and protocol's slot: `(family slot << 1 | protocol slot)`,
    /// the index of its lengths word after the port words.
    pub(super) fn slot(&self) -> usize {
        slots(Family::of(&self.prefix.addr()), self.protocol)
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
    /// the entries under bits it did not know, so until `adopt_tries` has
    /// read them back they count as differing from what the entries want.
    pub(super) fn assume_written(&mut self) {
        self.written.clone_from(&self.words);
        for w in &mut self.written[abi::PORTS_LENGTHS as usize..] {
            *w = !*w;
        }
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
    /// Write the `ports` words in `dirty` that differ from what was written:
    /// the port words first, then the lengths words.
    ///
    /// A port word only gains bits before entries appear and loses them
    /// after they vanish, so a word the program reads half written (the
    /// kernel copies a syscall's value with memcpy, which may go byte by
    /// byte) has every bit an entry needs. A lengths word holds values, the
    /// listed lengths and the address filter's nibble, and half of one could
    /// hide entries: each is written with one 8-byte store, by a program run
    /// with `BPF_PROG_TEST_RUN` (`skactivate_store_word`).
    pub(super) fn sync_ports(&mut self, dirty: &BTreeSet<u32>) -> Result<()> {
        let (keys, values): (Vec<u32>, Vec<u64>) = dirty
            .iter()
            .filter(|&&w| self.kinds.words[w as usize] != self.kinds.written[w as usize])
            .map(|&w| (w, self.kinds.words[w as usize]))
            .unzip();
        if keys.is_empty() {
            return Ok(());
        }
        // `dirty` is ordered: the lengths words come last.
        let split = keys.partition_point(|&k| k < abi::PORTS_LENGTHS);
        let (port_keys, port_values) = (&keys[..split], &values[..split]);
        if !port_keys.is_empty() {
            let fd = self.ports.fd().as_fd();
            let (mut n, mut r) = if port_keys.len() > 1 && self.hash_batch {
                sys::map_update_batch(fd, port_keys, port_values)
            } else {
                (0, Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)))
            };
            if r.is_err() && n == 0 {
                // Arrays without batch operations: one word per syscall.
                (n, r) = update_each(fd, port_keys, port_values);
            }
            for (&k, &v) in port_keys[..n].iter().zip(port_values) {
                self.kinds.written[k as usize] = v;
            }
            r.map_err(sys_err("BPF_MAP_UPDATE_ELEM (ports)"))?;
        }
        for (&k, &v) in keys[split..].iter().zip(&values[split..]) {
            self.store_word(k, v)?;
            self.kinds.written[k as usize] = v;
        }
        Ok(())
    }

    /// Write one `ports` word with one 8-byte store (see [`Self::sync_ports`]).
    fn store_word(&mut self, idx: u32, value: u64) -> Result<()> {
        if self.store.is_none() {
            self.store = Some(pinned::load_store_program(&self.dir, self.hash_capacity)?);
        }
        let prog = self.store.as_ref().expect("loaded just above").as_fd();
        let ctx = abi::SkLookupCtx {
            family: libc::AF_INET6 as u32,
            protocol: libc::IPPROTO_TCP as u32,
            local_port: idx,
            // The low half first: the program reads two native words.
            local_ip6: [value as u32, (value >> 32) as u32, 0, 0],
            ..Default::default()
        };
        let what = "BPF_PROG_TEST_RUN (storing a ports word)";
        let run = sys::prog_test_run(prog, &ctx, 1).map_err(sys_err(what))?;
        if run.retval != 1 {
            // SK_DROP: the program found no such word.
            return Err(sys_err(what)(io::Error::from_raw_os_error(libc::ENOENT)));
        }
        Ok(())
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
        if trie {
            write_chunks(fd, batch, keys, values)
        } else {
            write_hash(fd, batch, keys, values)
        }
    }

    /// Take `keys` out of the hash (`trie` false) or the trie, in batches
    /// where the map takes them; absent ones are no error.
    fn delete_keys(&self, trie: bool, keys: &[aya::maps::lpm_trie::Key<BindingKey>]) -> Result<()> {
        let (fd, mut batch, call) = if trie {
            let call = "BPF_MAP_DELETE_ELEM (bindings)";
            (self.bindings.map().fd().as_fd(), self.batch, call)
        } else {
            (
                self.hash.fd().as_fd(),
                self.hash_batch,
                "BPF_MAP_DELETE_ELEM (entries)",
            )
        };
        let mut rest = keys;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(UPDATE_BATCH)];
            let (n, r) = if batch {
                sys::map_delete_batch(fd, chunk)
            } else {
                delete_each(fd, chunk)
            };
            match r {
                Ok(()) => rest = &rest[chunk.len()..],
                // `chunk[n]` was absent.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[n + 1..],
                // A map without batch deletes: one key per syscall.
                Err(e) if batch && n == 0 && host::no_batch_support(&e) => batch = false,
                Err(e) => return Err(sys_err(call)(e)),
            }
        }
        Ok(())
    }

    /// Whether the program reads the trie of a family and protocol (its
    /// lengths word as written says so).
    fn trie_read(&self, slot: usize) -> bool {
        self.kinds.written[abi::PORTS_LENGTHS as usize + slot] & abi::LENGTHS_TRIE != 0
    }

    /// Whether the entries want the program to read it.
    fn trie_wanted(&self, slot: usize) -> bool {
        self.kinds.words[abi::PORTS_LENGTHS as usize + slot] & abi::LENGTHS_TRIE != 0
    }

    /// Which entries to cache: those a probe asks for. Where the trie
    /// answers a family and protocol's shorter lengths, no probe asks for
    /// its shorter entries, which are left the room to the full-length
    /// ones. (A slot cached before its trie was wanted stays: the cache
    /// only ever holds entries of the hash, whatever it holds.)
    pub(super) fn cached_kinds(&self) -> impl Fn(&Entry) -> bool + use<> {
        let trie = [0, 1, 2, 3].map(|slot| self.trie_wanted(slot));
        move |e| e.is_full() || !trie[e.slot()]
    }

    /// Put every shorter-than-full entry of a family and protocol (`slot`)
    /// in the trie, which the program does not read for it yet: what a
    /// crash left there of the slot goes first.
    fn fill_trie(&mut self, slot: usize) -> Result<()> {
        let fd = self.bindings.map().fd().as_fd();
        let mut stale = Vec::new();
        sys::map_for_each_key::<aya::maps::lpm_trie::Key<BindingKey>>(
            fd,
            abi::MAX_BINDINGS as usize + 1,
            |k| {
                if Entry::from_key(k).is_none_or(|e| e.slot() == slot) {
                    stale.push(*k);
                }
            },
        )
        .map_err(sys_err("BPF_MAP_GET_NEXT_KEY (bindings)"))?;
        self.delete_keys(true, &stale)?;
        drop(stale);
        let mut short: Vec<(Entry, u32)> = self
            .entries
            .iter()
            .filter(|(e, _)| !e.is_full() && e.slot() == slot)
            .collect();
        // In the trie's own order: each insert walks the path the previous
        // one just walked, still in cache.
        short.sort_by_cached_key(|(e, _)| e.trie_order());
        for chunk in short.chunks(UPDATE_BATCH) {
            let (keys, values) = keys_values(chunk);
            let (n, r) = self.write_entries(true, &keys, &values);
            if let Err(err) = r {
                return Err(write_err(err, chunk.get(n).map(|a| a.0), "bindings"));
            }
        }
        self.trie_filled[slot] = true;
        Ok(())
    }

    /// Take the shorter entries of a family and protocol out of the trie,
    /// once the program no longer reads it for them; its probes of those
    /// lengths now ask the cache, so the entries are cached where their
    /// buckets have room (see `cached_kinds`).
    fn empty_trie(&mut self, slot: usize) -> Result<()> {
        self.trie_filled[slot] = false;
        let short: Vec<(Entry, u32)> = self
            .entries
            .iter()
            .filter(|(e, _)| !e.is_full() && e.slot() == slot)
            .collect();
        let keys: Vec<_> = short.iter().map(|(e, _)| e.key()).collect();
        self.delete_keys(true, &keys)?;
        // Mapped for a change already, or (adoption) until it ends.
        self.filter.map()?;
        self.filter
            .cache_many(keys.iter().zip(&short).map(|(key, (_, id))| (key, *id)));
        Ok(())
    }

    /// Write the `ports` words in `dirty` as they rise: a family and
    /// protocol whose lengths word is about to say "trie" gets its trie
    /// filled first, so the program never reads an incomplete one. Returns
    /// the slots filled here (their trie already holds every entry).
    pub(super) fn raise_ports(&mut self, dirty: &BTreeSet<u32>) -> Result<[bool; 4]> {
        let mut filled = [false; 4];
        for (slot, f) in filled.iter_mut().enumerate() {
            if self.trie_wanted(slot) && !self.trie_filled[slot] {
                self.fill_trie(slot)?;
                *f = true;
            }
        }
        self.sync_ports(dirty)?;
        Ok(filled)
    }

    /// Empty the trie of each family and protocol the program no longer
    /// reads it for (after its lengths word was written). A run that read
    /// the word just before it was written may still be walking the trie:
    /// those runs end first. (Without the wait, a prober running the
    /// program while a test switched back and forth got one answer wrong
    /// in 96040.)
    pub(super) fn settle_trie(&mut self) -> Result<()> {
        let settle: Vec<usize> = (0..4)
            .filter(|&slot| {
                self.trie_filled[slot] && !self.trie_read(slot) && !self.trie_wanted(slot)
            })
            .collect();
        if settle.is_empty() {
            return Ok(());
        }
        sys::wait_for_program_runs();
        for slot in settle {
            self.empty_trie(slot)?;
        }
        Ok(())
    }

    /// After adoption: the lengths words as pinned say which tries the
    /// program reads, and those are complete (filled before a word said
    /// so). Where the entries want otherwise (a crash in the middle of a
    /// change), the tries and words are put right; else nothing is written.
    pub(super) fn adopt_tries(&mut self) -> Result<()> {
        let fd = self.ports.fd().as_fd();
        let mut dirty = BTreeSet::new();
        for slot in 0..4 {
            let idx = abi::PORTS_LENGTHS + slot as u32;
            let word: u64 = sys::map_lookup_elem(fd, &idx)
                .map_err(sys_err("BPF_MAP_LOOKUP_ELEM (ports)"))?
                .unwrap_or(0);
            self.kinds.written[idx as usize] = word;
            self.trie_filled[slot] = word & abi::LENGTHS_TRIE != 0;
            dirty.insert(idx);
        }
        self.raise_ports(&dirty)?;
        self.settle_trie()
    }

    /// One step of `apply`: `batch`, new entries already in the index, into
    /// the maps: counted, the hash grown if need be, the `ports` words
    /// raised, then the hash, the cache grown if need be, and (where the
    /// program reads it) the trie.
    fn write_batch(&mut self, batch: &[(Entry, u32)]) -> Result<()> {
        let mut dirty = BTreeSet::new();
        for (e, _) in batch {
            self.kinds.count(e, 1, &mut dirty);
        }
        let needed = self.entries.len();
        if needed > self.hash_capacity as usize && self.hash_capacity < abi::MAX_BINDINGS {
            // A new hash, and the cache with it, holds the whole index,
            // this batch included.
            self.make_room(needed)?;
        }
        let filled = self.raise_ports(&dirty)?;
        // A batch cannot say BPF_NOEXIST; it need not, as the index has
        // already left out every entry present and this process is the
        // maps' only writer.
        let (keys, values) = keys_values(batch);
        self.filter.add(keys.iter());
        let (n, r) = self.write_entries(false, &keys, &values);
        let cached = self.cached_kinds();
        self.filter.cache_many(
            keys.iter()
                .zip(batch)
                .take(n)
                .filter(|(_, (e, _))| cached(e))
                .map(|(key, (_, id))| (key, *id)),
        );
        if let Err(err) = r {
            return Err(write_err(err, batch.get(n).map(|a| a.0), "entries"));
        }
        // A larger cache only now: it is filled from the index, and holds
        // nothing the hash does not.
        self.make_room(needed)?;
        let mut short: Vec<usize> = (0..batch.len())
            .filter(|&i| {
                let e = &batch[i].0;
                !e.is_full() && self.trie_filled[e.slot()] && !filled[e.slot()]
            })
            .collect();
        if short.is_empty() {
            return Ok(());
        }
        short.sort_by_cached_key(|&i| batch[i].0.trie_order());
        let k: Vec<_> = short.iter().map(|&i| keys[i]).collect();
        let v: Vec<_> = short.iter().map(|&i| values[i]).collect();
        let (n, r) = self.write_entries(true, &k, &v);
        r.map_err(|err| write_err(err, short.get(n).map(|&i| batch[i].0), "bindings"))
    }

    /// Undo the first `upto` entries of an `apply` that failed: those
    /// marked in `added` leave the index, and the first `counted` of them
    /// the maps and the counts.
    fn roll_back(&mut self, add: &[(Binding, u32)], added: &[u64], upto: usize, counted: usize) {
        let mut dirty = BTreeSet::new();
        let mut keys = Vec::new();
        let mut trie_keys = Vec::new();
        let mut pos = 0;
        'all: for (b, _) in add {
            for e in Entry::of(b) {
                if pos >= upto {
                    break 'all;
                }
                if added[pos / 64] >> (pos % 64) & 1 == 1 {
                    self.entries.remove(&e);
                    if pos < counted {
                        self.kinds.count(&e, -1, &mut dirty);
                        keys.push(e.key());
                        if !e.is_full() && self.trie_filled[e.slot()] {
                            trie_keys.push(e.key());
                        }
                    }
                }
                pos += 1;
            }
        }
        let _ = self.delete_keys(true, &trie_keys);
        self.filter.uncache(keys.iter());
        let _ = self.delete_keys(false, &keys);
        self.filter.removed(
            keys.len(),
            self.entries.len(),
            self.entries.iter().map(|(e, _)| e.key()),
        );
        let _ = self.sync_ports(&dirty);
        let _ = self.settle_trie();
    }

    /// Apply a change all at once or not at all: `add` (binding → index
    /// into `ids`, the destination ids) goes in first, in steps of at most
    /// `APPLY_BATCH` entries, then `remove` entries go out, so that a
    /// replacement never leaves a gap. The `ports` words rise before
    /// entries appear and fall after they vanish, so the program never
    /// skips an entry. `reserve`: how many entries the index should make
    /// room for (the new ones, as far as known).
    pub(super) fn apply(
        &mut self,
        add: &[(Binding, u32)],
        ids: &[u32],
        remove: Vec<Entry>,
        reserve: usize,
    ) -> Result<Changes> {
        self.settle_pending()?;
        // The filter and cache are mapped for the change only (see
        // `filter::Words`).
        self.filter.map()?;
        let r = self.apply_mapped(add, ids, remove, reserve);
        self.filter.unmap();
        r
    }

    fn apply_mapped(
        &mut self,
        add: &[(Binding, u32)],
        ids: &[u32],
        remove: Vec<Entry>,
        reserve: usize,
    ) -> Result<Changes> {
        let remove: Vec<Entry> = remove
            .into_iter()
            .filter(|e| self.entries.contains_key(e))
            .collect();
        let total: usize = add.iter().map(|(b, _)| entry_count(b)).sum();
        let v4: usize = add
            .iter()
            .filter(|(b, _)| b.prefix.addr().is_ipv4())
            .map(|(b, _)| entry_count(b))
            .sum();
        self.entries
            .reserve(reserve.min(v4), reserve.min(total - v4));
        // Room in the hash and the cache before anything is written:
        // growing copies every entry, so once, to what the change will need.
        self.make_room(self.entries.len() + reserve.min(total))?;
        // Which entries this change added (the others were present with
        // the same destination, or named twice): what a failure undoes.
        let mut added = vec![0u64; total.div_ceil(64)];
        // The entries of one step, then those of them that are new.
        let mut step: Vec<(Entry, u32)> = Vec::with_capacity(total.min(APPLY_BATCH));
        let mut batch: Vec<(Entry, u32)> = Vec::with_capacity(total.min(APPLY_BATCH));
        let mut per_id: BTreeMap<u32, u32> = BTreeMap::new();
        let (mut pos, mut counted) = (0, 0);
        let mut failure = None;
        let mut entries = add.iter().flat_map(|(b, i)| {
            let id = ids[*i as usize];
            Entry::of(b).map(move |e| (e, id))
        });
        loop {
            step.clear();
            step.extend(entries.by_ref().take(APPLY_BATCH));
            if step.is_empty() {
                break;
            }
            // Into the index in its own order; a conflict stops the
            // change once the step is in (the first of the step's, in the
            // order of `add`, is the one reported), and what it added goes
            // out again with the rest.
            let answers = self.entries.insert_new_many(&step);
            batch.clear();
            for (j, (&(e, id), answer)) in step.iter().zip(answers).enumerate() {
                match answer {
                    None => {
                        added[(pos + j) / 64] |= 1 << ((pos + j) % 64);
                        batch.push((e, id));
                        *per_id.entry(id).or_default() += 1;
                    }
                    Some(other) if other == id => {}
                    Some(other) => {
                        failure.get_or_insert_with(|| DispatcherError::Conflict {
                            binding: e.binding(),
                            other: self.dests[&other].destination.clone(),
                        });
                    }
                }
            }
            pos += step.len();
            if failure.is_some() {
                break;
            }
            // What a failed write leaves half done is undone with the rest.
            counted = pos;
            if let Err(e) = self.write_batch(&batch) {
                failure = Some(e);
                break;
            }
        }
        drop(step);
        drop(batch);
        if let Some(e) = failure {
            self.roll_back(add, &added, pos, counted);
            return Err(e);
        }
        drop(added);
        let mut touched: BTreeSet<u32> = BTreeSet::new();
        let mut added_count = 0;
        for (id, n) in per_id {
            if let Some(s) = self.dests.get_mut(&id) {
                s.refcount += n;
            }
            added_count += n as usize;
            touched.insert(id);
        }

        let failure = self.remove_entries(&remove, &mut touched).err();
        self.write_refcounts(touched)?;
        self.collect_garbage()?;
        if failure.is_none() && !remove.is_empty() {
            self.shrink_to_fit();
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(Changes {
                added: added_count,
                removed: remove.len(),
            }),
        }
    }

    /// Take entries (all present) out, in steps: out of the maps first,
    /// then the counts and the `ports` words fall; the trie of a family and
    /// protocol that falls back to the list is emptied last.
    fn remove_entries(&mut self, remove: &[Entry], touched: &mut BTreeSet<u32>) -> Result<()> {
        let mut failure = None;
        for chunk in remove.chunks(APPLY_BATCH) {
            let trie_keys: Vec<_> = chunk
                .iter()
                .filter(|e| !e.is_full() && self.trie_filled[e.slot()])
                .map(Entry::key)
                .collect();
            if let Err(e) = self.delete_keys(true, &trie_keys) {
                failure.get_or_insert(e);
            }
            drop(trie_keys);
            let keys: Vec<_> = chunk.iter().map(Entry::key).collect();
            self.filter.uncache(keys.iter());
            if let Err(e) = self.delete_keys(false, &keys) {
                failure.get_or_insert(e);
            }
            drop(keys);
            let mut dirty = BTreeSet::new();
            for e in chunk {
                self.kinds.count(e, -1, &mut dirty);
                if let Some(id) = self.entries.remove(e) {
                    if let Some(s) = self.dests.get_mut(&id) {
                        s.refcount = s.refcount.saturating_sub(1);
                    }
                    touched.insert(id);
                }
            }
            self.sync_ports(&dirty)?;
        }
        self.filter.removed(
            remove.len(),
            self.entries.len(),
            self.entries.iter().map(|(e, _)| e.key()),
        );
        self.settle_trie()?;
        failure.map_or(Ok(()), Err)
    }

    /// Room for `needed` entries: a larger `entries` hash where it has
    /// less (sixteenfold steps, at most `MAX_BINDINGS`), and a larger cache
    /// where it has fewer buckets than that, as far as the hash can fill
    /// (see `abi::cache_buckets_for`). Shrinking is `shrink_to_fit`'s, after
    /// removals.
    fn make_room(&mut self, needed: usize) -> Result<()> {
        let mut cap = self.hash_capacity.max(abi::ENTRIES_MIN);
        while (cap as usize) < needed && cap < abi::MAX_BINDINGS {
            cap = (cap * 16).min(abi::MAX_BINDINGS);
        }
        let buckets = abi::cache_buckets_for(needed, cap).max(self.filter.cache_buckets());
        if cap != self.hash_capacity {
            return self.restage((cap, buckets));
        }
        if buckets != self.filter.cache_buckets() {
            // The cache only spares hits a hash lookup: where a larger one
            // cannot be made (memory), the change goes on beside this one,
            // whose entries stay right, and what it has no room for is
            // found in the hash. The next change tries again.
            if let Err(e) = self.restage((cap, buckets)) {
                tracing::warn!(
                    "the dispatcher's cache stays at {} buckets, {buckets} wanted: {e}",
                    self.filter.cache_buckets()
                );
            }
        }
        Ok(())
    }

    /// After entries went: a smaller `entries` hash where those left fill at
    /// most a quarter of the next capacity down, and a smaller cache where
    /// they would fill at most a quarter of this one's buckets (see
    /// `abi::shrunk_sizes`), so that what a namespace's maps take follows
    /// what it holds both ways. Not on every removal: it takes a fourfold
    /// fall, and growing back takes the entries past the smaller size, so a
    /// set that comes and goes around one size does not copy its entries
    /// each time. The maps are replaced as when they grow (`restage`); where
    /// smaller ones cannot be made, the larger serve as well: warned, and
    /// tried again at the next removal.
    fn shrink_to_fit(&mut self) {
        let have = (self.hash_capacity, self.filter.cache_buckets());
        let want = abi::shrunk_sizes(self.entries.len(), have);
        if want == have {
            return;
        }
        if let Err(e) = self.restage(want) {
            tracing::warn!(
                "the dispatcher's maps stay sized for {} entries (a cache of {} buckets), \
                 {} left, for which {} (and {}) would do: {e}",
                have.0,
                have.1,
                self.entries.len(),
                want.0,
                want.1,
            );
        }
    }

    /// Replace the filter and the cache by ones for an `entries` hash of
    /// `cap` entries and a cache of `buckets` buckets, and the hash too
    /// where `cap` is not its capacity, under a program that uses them.
    /// The new maps are created, pinned aside and filled first; the link
    /// then runs a program on them, and the pins follow. A crash in
    /// between leaves the link's program not the pinned one, and adoption
    /// runs one on the pinned maps again (see `swap_program` for the
    /// order).
    fn restage(&mut self, (cap, buckets): (u32, u32)) -> Result<()> {
        let new_hash = cap != self.hash_capacity;
        let entries_pin = self
            .dir
            .join(if new_hash { ENTRIES_PIN_NEW } else { ENTRIES });
        let (program, staged) = pinned::stage(&self.dir, &entries_pin, (cap, buckets), new_hash)?;
        let unstage = |e| {
            for name in [
                ENTRIES_PIN_NEW,
                filter::FILTER_PIN_NEW,
                filter::CACHE_PIN_NEW,
            ] {
                let _ = fs::remove_file(self.dir.join(name));
            }
            e
        };
        let mut filter = filter::Filter::open_new(staged.filter, staged.cache, (cap, buckets))
            .and_then(|mut f| f.map().map(|()| f))
            .map_err(unstage)?;
        filter.fill(self.entries.iter().map(|(e, _)| e.key()));
        if let Some(map) = &staged.hash {
            self.copy_entries(map).map_err(unstage)?;
        }
        sync_cache(&self.entries, &mut filter, self.cached_kinds());
        self.swap_program(program, true, |d| {
            if let Some(map) = staged.hash {
                d.hash = map;
            }
            d.filter = filter;
            d.hash_capacity = cap;
        })
    }

    /// Every entry of the index into `map`, a new `entries` hash.
    fn copy_entries(&self, map: &MapData) -> Result<()> {
        // The index, a step at a time.
        let fd = map.fd().as_fd();
        let mut r = Ok(());
        let step = self.entries.len().min(APPLY_BATCH);
        let mut keys = Vec::with_capacity(step);
        let mut values = Vec::with_capacity(step);
        let mut all = self.entries.iter().peekable();
        while r.is_ok() && all.peek().is_some() {
            keys.clear();
            values.clear();
            for (e, id) in all.by_ref().take(APPLY_BATCH) {
                keys.push(e.key());
                values.push(value_of(&e, id));
            }
            r = write_hash(fd, self.hash_batch, &keys, &values).1;
        }
        drop(all);
        r.map_err(sys_err("BPF_MAP_UPDATE (entries)"))
    }

    /// The ids of `destinations` (allocated where new), and the list of
    /// `items` by index into them.
    fn ids_of(&mut self, destinations: &[Destination]) -> Result<Vec<u32>> {
        destinations
            .iter()
            .map(|d| self.ensure_destination(d))
            .collect()
    }

    /// Add bindings, each to its destination, all or none.
    pub fn add_bindings(&mut self, items: &[(Binding, Destination)]) -> Result<Changes> {
        let (destinations, indexed) = by_index(items);
        self.add_bindings_to(&destinations, &indexed)
    }

    /// Add bindings, each to a destination given by its index in
    /// `destinations`, all or none: the list a daemon holds of a million
    /// bindings names each destination once.
    pub fn add_bindings_to(
        &mut self,
        destinations: &[Destination],
        items: &[(Binding, u32)],
    ) -> Result<Changes> {
        check_indexes(destinations, items);
        let r = self
            .ids_of(destinations)
            .and_then(|ids| self.apply(items, &ids, Vec::new(), usize::MAX));
        if r.is_err() {
            self.collect_garbage()?;
        }
        r
    }

    /// Remove bindings, whoever they point to.
    pub fn remove_bindings(&mut self, items: &[Binding]) -> Result<Changes> {
        let remove = items.iter().flat_map(Entry::of).collect();
        self.apply(&[], &[], remove, 0)
    }

    /// Make `items` the complete set of bindings of `unit`: what is new is added,
    /// what is gone is removed, what stays is untouched. All or nothing.
    pub fn replace_unit_bindings(
        &mut self,
        unit: &str,
        items: &[(Binding, Destination)],
    ) -> Result<Changes> {
        let (destinations, indexed) = by_index(items);
        self.replace_unit_bindings_to(unit, &destinations, &indexed)
    }

    /// `replace_unit_bindings` with each destination given by its index in
    /// `destinations`.
    pub fn replace_unit_bindings_to(
        &mut self,
        unit: &str,
        destinations: &[Destination],
        items: &[(Binding, u32)],
    ) -> Result<Changes> {
        check_indexes(destinations, items);
        let r = self.replace_indexed(unit, destinations, items);
        if r.is_err() {
            self.collect_garbage()?;
        }
        r
    }

    fn replace_indexed(
        &mut self,
        unit: &str,
        destinations: &[Destination],
        items: &[(Binding, u32)],
    ) -> Result<Changes> {
        let ids = self.ids_of(destinations)?;
        let of_unit: BTreeSet<u32> = self
            .dests
            .iter()
            .filter(|(_, s)| s.destination.unit == unit)
            .map(|(&id, _)| id)
            .collect();
        // The unit's entries as they are, sorted to be found; each marked
        // 1 if it stays, 2 if it moves to another destination of the unit.
        let mut present: Vec<((u128, u32), u32)> = if of_unit.is_empty() {
            Vec::new()
        } else {
            self.entries
                .iter()
                .filter(|(_, id)| of_unit.contains(id))
                .map(|(e, id)| (e.sort_key(), id))
                .collect()
        };
        present.sort_unstable_by_key(|p| p.0);
        let mut marks = vec![0u8; present.len()];
        let mut moving = Vec::new();
        if !present.is_empty() {
            for (b, i) in items {
                let id = ids[*i as usize];
                for e in Entry::of(b) {
                    if let Ok(at) = present.binary_search_by_key(&e.sort_key(), |p| p.0) {
                        if present[at].1 == id {
                            marks[at] |= 1;
                        } else if marks[at] & 2 == 0 {
                            marks[at] |= 2;
                            moving.push(e);
                        }
                    }
                }
            }
        }
        let kept = marks.iter().filter(|&&m| m == 1).count();
        let remove: Vec<Entry> = self
            .entries
            .iter()
            .filter(|(e, id)| {
                of_unit.contains(id)
                    && present
                        .binary_search_by_key(&e.sort_key(), |p| p.0)
                        .is_ok_and(|at| marks[at] == 0)
            })
            .map(|(e, _)| e)
            .collect();
        drop(present);
        drop(marks);
        // An entry moving between two destinations of this unit: out first.
        if !moving.is_empty() {
            self.apply(&[], &[], moving, 0)?;
        }
        let total: usize = items.iter().map(|(b, _)| entry_count(b)).sum();
        self.apply(items, &ids, remove, total.saturating_sub(kept))
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

/// `keys` and `values` into a map, `UPDATE_BATCH` per syscall (`batch`)
/// or one per syscall; how many went in, and the error.
fn write_chunks<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    batch: bool,
    keys: &[K],
    values: &[V],
) -> (usize, io::Result<()>) {
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

/// `write_chunks` into a hash. Its buckets have a lock each: two threads
/// insert side by side (the kernel's insert is most of loading). (The
/// trie has one lock for all.)
fn write_hash<K: aya::Pod + Sync, V: aya::Pod + Sync>(
    fd: BorrowedFd<'_>,
    batch: bool,
    keys: &[K],
    values: &[V],
) -> (usize, io::Result<()>) {
    if !batch || keys.len() < PARALLEL_WRITE || !two_cpus() {
        return write_chunks(fd, batch, keys, values);
    }
    let half = keys.len() / 2;
    let ((n_low, r_low), (n_high, r_high)) = std::thread::scope(|s| {
        let high = s.spawn(|| write_chunks(fd, batch, &keys[half..], &values[half..]));
        let low = write_chunks(fd, batch, &keys[..half], &values[..half]);
        (low, high.join().expect("the writer does not panic"))
    });
    match (r_low, r_high) {
        (Err(e), _) => (n_low, Err(e)),
        (Ok(()), Err(e)) => (half + n_high, Err(e)),
        (Ok(()), Ok(())) => (keys.len(), Ok(())),
    }
}

/// From how many entries on a write to the hash is shared by two threads.
const PARALLEL_WRITE: usize = 4 * UPDATE_BATCH;

/// Whether this process may run on more than one CPU.
fn two_cpus() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
}

/// One `BPF_MAP_DELETE_ELEM` per key, absent ones skipped: the same
/// contract as `sys::map_delete_batch` otherwise.
fn delete_each<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> (usize, io::Result<()>) {
    for (i, k) in keys.iter().enumerate() {
        match sys::map_delete_elem(map, k) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return (i, Err(e)),
        }
    }
    (keys.len(), Ok(()))
}

/// Entries per step of `apply`: how much of a change is held expanded at
/// a time (a few MiB), however many bindings it has.
const APPLY_BATCH: usize = 1 << 16;

/// How many entries a binding stands for.
fn entry_count(b: &Binding) -> usize {
    match b.ports {
        Ports::All => 1,
        Ports::Range(a, z) => usize::from(z.saturating_sub(a)) + 1,
    }
}

/// Make `filter`'s cache agree with the entries of the index `entries`
/// (see `Filter::sync_cache`), caching those `cached` says the program
/// asks the cache for.
pub(super) fn sync_cache(
    entries: &index::Index,
    filter: &mut filter::Filter,
    cached: impl Fn(&Entry) -> bool,
) {
    let get = |key: &aya::maps::lpm_trie::Key<BindingKey>| {
        let e = Entry::from_key(key)?;
        (abi::filter_key_words(&e.key()) == abi::filter_key_words(key))
            .then(|| entries.get(&e))
            .flatten()
    };
    filter.sync_cache(
        get,
        entries
            .iter()
            .filter(|(e, _)| cached(e))
            .map(|(e, id)| (e.key(), id)),
    );
}

/// The value an entry's key carries.
fn value_of(e: &Entry, id: u32) -> BindingValue {
    BindingValue {
        destination: id,
        prefixlen: abi::trie_prefixlen(&e.prefix),
    }
}

fn keys_values(
    entries: &[(Entry, u32)],
) -> (Vec<aya::maps::lpm_trie::Key<BindingKey>>, Vec<BindingValue>) {
    entries
        .iter()
        .map(|(e, id)| (e.key(), value_of(e, *id)))
        .unzip()
}

/// A write to the hash or the trie that failed at entry `at`: a full hash
/// says E2BIG, a full trie ENOSPC (`at` did not fit).
fn write_err(err: io::Error, at: Option<Entry>, map: &str) -> DispatcherError {
    match (err.raw_os_error(), at) {
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
    }
}

/// Each destination of `items` once, and the items by index into them.
fn by_index(items: &[(Binding, Destination)]) -> (Vec<Destination>, Vec<(Binding, u32)>) {
    let mut destinations: Vec<Destination> = Vec::new();
    let mut indexed = Vec::with_capacity(items.len());
    let mut last: Option<(&Destination, u32)> = None;
    for (b, d) in items {
        // Bindings come in runs of one destination: no search then.
        let i = match last {
            Some((l, i)) if l == d => i,
            _ => match destinations.iter().position(|x| x == d) {
                Some(i) => i as u32,
                None => {
                    destinations.push(d.clone());
                    (destinations.len() - 1) as u32
                }
            },
        };
        last = Some((d, i));
        indexed.push((*b, i));
    }
    (destinations, indexed)
}

fn check_indexes(destinations: &[Destination], items: &[(Binding, u32)]) {
    assert!(
        items
            .iter()
            .all(|(_, i)| (*i as usize) < destinations.len()),
        "a destination index out of range"
    );
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
        for i in abi::PORTS_LENGTHS..abi::PORTS_WORDS {
            assert_ne!(k.written[i as usize], k.words[i as usize]);
        }
        let ports = abi::PORTS_LENGTHS as usize;
        assert_eq!(k.written[..ports], k.words[..ports]);
    }
}
