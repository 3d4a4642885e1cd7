//! Destinations: ids, refcounts, names and sockets (one socket of one unit,
//! per family and protocol).

use super::*;

impl Dispatcher {
    pub(super) fn destination_key(d: &Destination) -> Result<DestinationKey> {
        DestinationKey::new(&d.unit, d.family, d.protocol)
            .ok_or_else(|| DispatcherError::UnitName(d.unit.clone()))
    }

    /// The id of a destination, allocating the lowest free one (with zeroed
    /// counters) if it has none.
    pub(super) fn ensure_destination(&mut self, d: &Destination) -> Result<u32> {
        if let Some(&id) = self.ids.get(d) {
            return Ok(id);
        }
        let key = Self::destination_key(d)?;
        let id = (0..abi::MAX_DESTINATIONS)
            .find(|i| !self.dests.contains_key(i))
            .ok_or(DispatcherError::DestinationsFull)?;
        if id >= self.metrics_capacity {
            self.grow_metrics(id)?;
        }
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

    /// Replace the `metrics` array by the next size with a slot for `id`,
    /// under a program that counts there. The new array is staged aside
    /// with every destination's counters, then the link runs its program;
    /// what the old program counted meanwhile (it runs until the link
    /// update, and to the end of a lookup it had begun) is added after. On
    /// an error before the link update nothing has changed.
    fn grow_metrics(&mut self, id: u32) -> Result<()> {
        self.settle_pending()?;
        let cap = abi::metrics_capacity_for(id).ok_or(DispatcherError::DestinationsFull)?;
        let (program, map) = pinned::stage_metrics(&self.dir, self.hash_capacity, cap)?;
        let staged = self.dir.join(METRICS_PIN_NEW);
        let unstage = |e| {
            let _ = fs::remove_file(&staged);
            e
        };
        let mut new = PerCpuArray::<_, Metrics>::try_from(Map::PerCpuArray(map))
            .map_err(map_err(METRICS))
            .map_err(unstage)?;
        let mut copied = Vec::with_capacity(self.dests.len());
        for &i in self.dests.keys() {
            let r = self.metrics.get(&i, 0).and_then(|v| {
                let v = v.to_vec();
                new.set(i, PerCpuValues::try_from(v.clone())?, 0)?;
                Ok(v)
            });
            copied.push((i, r.map_err(map_err(METRICS)).map_err(unstage)?));
        }
        let mut old = None;
        let settled = self.swap_program(program, true, |d| {
            old = Some(std::mem::replace(&mut d.metrics, new));
            d.metrics_capacity = cap;
        });
        let Some(old) = old else {
            return settled;
        };
        for (i, before) in copied {
            let after = old.get(&i, 0).map_err(map_err(METRICS))?;
            if after.iter().eq(before.iter()) {
                continue;
            }
            let now = self.metrics.get(&i, 0).map_err(map_err(METRICS))?;
            let sum: Vec<Metrics> = now
                .iter()
                .zip(after.iter().zip(&before))
                .map(|(n, (a, b))| Metrics {
                    lookups: n.lookups.wrapping_add(a.lookups.wrapping_sub(b.lookups)),
                    misses: n.misses.wrapping_add(a.misses.wrapping_sub(b.misses)),
                    errors: n.errors.wrapping_add(a.errors.wrapping_sub(b.errors)),
                })
                .collect();
            let sum = PerCpuValues::try_from(sum).map_err(sys_err("per-CPU values"))?;
            self.metrics.set(i, sum, 0).map_err(map_err(METRICS))?;
        }
        settled
    }

    pub(super) fn socket_cookie(&self, id: u32) -> Result<Option<u64>> {
        sys::sockmap_cookie(self.sockets.fd().as_fd(), id)
            .map_err(sys_err("BPF_MAP_LOOKUP_ELEM (sockets)"))
    }

    /// Forget destinations that have neither bindings nor a socket.
    pub(super) fn collect_garbage(&mut self) -> Result<()> {
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

    pub(super) fn forget_destination(&mut self, id: u32) -> Result<()> {
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

    pub(super) fn write_refcounts(&mut self, ids: impl IntoIterator<Item = u32>) -> Result<()> {
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
            .map(|(e, _)| e)
            .collect();
        let changes = self.apply(&[], &[], remove, 0)?;
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

    /// How many entries each unit has (units without any are left out),
    /// counted from the index.
    pub fn entries_per_unit(&self) -> BTreeMap<String, usize> {
        let mut per_id: BTreeMap<u32, usize> = BTreeMap::new();
        for (_, id) in self.entries.iter() {
            *per_id.entry(id).or_default() += 1;
        }
        let mut out: BTreeMap<String, usize> = BTreeMap::new();
        for (id, n) in per_id {
            if let Some(s) = self.dests.get(&id) {
                *out.entry(s.destination.unit.clone()).or_default() += n;
            }
        }
        out
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
}
