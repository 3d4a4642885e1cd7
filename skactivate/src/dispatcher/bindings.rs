//! Bindings: the in-memory index of the trie, and `apply`, which changes
//! the trie all at once or not at all.

use super::*;

/// One trie entry: a binding narrowed to one port (0 = `*`).
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

    pub(super) fn key(&self) -> aya::maps::lpm_trie::Key<BindingKey> {
        abi::binding_key(self.protocol, &self.prefix, self.port)
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

impl Dispatcher {
    /// Count entries per (protocol, port) bit and write the words whose bits
    /// change. A bit is set before its first entry appears and cleared after
    /// its last one went, so the program never skips an entry; a crash in
    /// between leaves a bit set with no entry, which costs a lookup and is
    /// cleared by the next write of its word. Hence the words are derived from
    /// the entries when the state is adopted, never read back.
    pub(super) fn bump_ports(&mut self, deltas: &HashMap<u32, i64>, sign: i64) -> Result<()> {
        let mut dirty = HashSet::new();
        for (&idx, &delta) in deltas {
            let d = delta * sign;
            if d == 0 {
                continue;
            }
            let cur = self.port_counts.get(&idx).copied().unwrap_or(0);
            let new = u32::try_from((i64::from(cur) + d).max(0)).unwrap_or(u32::MAX);
            if new == 0 {
                self.port_counts.remove(&idx);
            } else {
                self.port_counts.insert(idx, new);
            }
            let (word, bit) = abi::ports_word_bit(idx);
            let w = &mut self.port_words[word as usize];
            let before = *w;
            if new == 0 {
                *w &= !(1 << bit);
            } else {
                *w |= 1 << bit;
            }
            if *w != before {
                dirty.insert(word);
            }
        }
        for word in dirty {
            self.ports
                .set(word, self.port_words[word as usize], 0)
                .map_err(map_err("ports"))?;
        }
        Ok(())
    }

    /// Apply a change to the trie all at once or not at all: `add` entries
    /// (entry → destination id) go in first, then `remove` entries go out, so
    /// that a replacement never leaves a gap. Port counts rise before entries
    /// appear and fall after they vanish, so the program never skips an entry.
    pub(super) fn apply(&mut self, add: Vec<(Entry, u32)>, remove: Vec<Entry>) -> Result<Changes> {
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
            let (n, r) = if self.batch {
                sys::map_update_batch(fd, &keys, &values)
            } else {
                update_each(fd, &keys, &values)
            };
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
