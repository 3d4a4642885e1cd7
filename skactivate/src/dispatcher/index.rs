//! The in-memory index of the entries (entry → destination id), kept compact:
//! the daemon holds one item per entry, up to 2^20 of them.
//!
//! IPv4 entries, nearly all of them in a large configuration, are packed into
//! 8 bytes (address; port, prefix length and protocol), 12 bytes with their
//! id; IPv6 entries keep their `Entry`. Both maps hash with a multiplicative
//! hash instead of SipHash: the keys come from the administrator's own unit
//! files, not from the network.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

use super::bindings::Entry;
use crate::binding::Protocol;

/// FxHash's step: fast, and good enough for keys nobody chooses to collide.
#[derive(Default, Clone, Copy)]
pub(super) struct FastHasher(u64);

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        // A product's low bits see only the input's low bits, and the map
        // takes its bucket from the low bits: mix (murmur3's finalizer).
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ x >> 33
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

pub(super) type Fast = BuildHasherDefault<FastHasher>;

/// An IPv4 entry: the address, then port (16 bits), prefix length (6) and
/// protocol (1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct V4Key(u32, u32);

impl Hash for V4Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from(self.0) | u64::from(self.1) << 32);
    }
}

fn pack(e: &Entry) -> Option<V4Key> {
    let IpNet::V4(net) = e.prefix else {
        return None;
    };
    let protocol = match e.protocol {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
    };
    Some(V4Key(
        u32::from(net.addr()),
        u32::from(e.port) | u32::from(net.prefix_len()) << 16 | protocol << 22,
    ))
}

fn unpack(k: V4Key) -> Entry {
    let protocol = if k.1 >> 22 & 1 == 0 {
        Protocol::Tcp
    } else {
        Protocol::Udp
    };
    let len = (k.1 >> 16 & 0x3f) as u8;
    let prefix = Ipv4Net::new(Ipv4Addr::from(k.0), len)
        .map(IpNet::V4)
        .unwrap_or_else(|_| IpNet::from(IpAddr::V4(Ipv4Addr::from(k.0))));
    Entry {
        protocol,
        prefix,
        port: k.1 as u16,
    }
}

/// From how many buckets on (about 6 MiB of table) `Index::insert_many`
/// groups what it inserts by where it goes.
const SORTED_INSERT_BUCKETS: usize = 1 << 19;
/// Into how many groups (as bits): 2^11 groups of a 2^21-bucket table are
/// 13 KiB of it each.
const INSERT_GROUP_BITS: u32 = 11;

/// Every entry and its destination id.
#[derive(Debug, Default)]
pub(super) struct Index {
    v4: HashMap<V4Key, u32, Fast>,
    v6: HashMap<Entry, u32, Fast>,
}

impl Index {
    pub(super) fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub(super) fn get(&self, e: &Entry) -> Option<u32> {
        match pack(e) {
            Some(k) => self.v4.get(&k).copied(),
            None => self.v6.get(e).copied(),
        }
    }

    pub(super) fn contains_key(&self, e: &Entry) -> bool {
        self.get(e).is_some()
    }

    #[cfg(test)]
    pub(super) fn insert(&mut self, e: Entry, id: u32) -> Option<u32> {
        match pack(&e) {
            Some(k) => self.v4.insert(k, id),
            None => self.v6.insert(e, id),
        }
    }

    /// Insert `e` unless present: `None` when inserted, else the id it has.
    pub(super) fn insert_new(&mut self, e: Entry, id: u32) -> Option<u32> {
        use std::collections::hash_map::Entry as Slot;
        match pack(&e) {
            Some(k) => match self.v4.entry(k) {
                Slot::Occupied(o) => Some(*o.get()),
                Slot::Vacant(v) => {
                    v.insert(id);
                    None
                }
            },
            None => match self.v6.entry(e) {
                Slot::Occupied(o) => Some(*o.get()),
                Slot::Vacant(v) => {
                    v.insert(id);
                    None
                }
            },
        }
    }

    /// Room for `v4` more IPv4 entries and `v6` more IPv6 ones.
    pub(super) fn reserve(&mut self, v4: usize, v6: usize) {
        self.v4.reserve(v4);
        self.v6.reserve(v6);
    }

    pub(super) fn remove(&mut self, e: &Entry) -> Option<u32> {
        match pack(e) {
            Some(k) => self.v4.remove(&k),
            None => self.v6.remove(e),
        }
    }

    /// Insert many entries (none of them present yet, or replaced): in
    /// the table's own order. hashbrown puts an item in the bucket its hash
    /// selects (`hash & (buckets - 1)`), so items inserted in that order
    /// fill the table front to back, where inserting a million in any other
    /// order costs a cache miss or two each.
    pub(super) fn insert_many(&mut self, items: impl IntoIterator<Item = (Entry, u32)>) {
        let mut v4: Vec<(V4Key, u32)> = Vec::new();
        for (e, id) in items {
            match pack(&e) {
                Some(k) => v4.push((k, id)),
                None => {
                    self.v6.insert(e, id);
                }
            }
        }
        self.v4.reserve(v4.len());
        // hashbrown keeps 7/8 of its buckets usable (a power of two): a wrong
        // guess here would only cost speed.
        let buckets = (self.v4.capacity() * 8).div_ceil(7).next_power_of_two();
        // A table that fits in the caches (13 bytes a bucket) is filled
        // faster as it comes than grouped first.
        if buckets < SORTED_INSERT_BUCKETS || v4.len() < buckets / 8 {
            self.v4.extend(v4);
            return;
        }
        // Grouped by the top bits of the bucket each item goes to (one
        // counting pass, one scatter): each group fills a stretch of the
        // table small enough to stay in cache.
        let bits = buckets.trailing_zeros();
        let shift = bits.saturating_sub(INSERT_GROUP_BITS);
        let mask = (buckets - 1) as u64;
        let hasher = Fast::default();
        let group = |k: &V4Key| ((hasher.hash_one(k) & mask) >> shift) as usize;
        let mut start = vec![0usize; (1 << (bits - shift)) + 1];
        for (k, _) in &v4 {
            start[group(k) + 1] += 1;
        }
        for i in 1..start.len() {
            start[i] += start[i - 1];
        }
        let mut grouped: Vec<(V4Key, u32)> = vec![(V4Key(0, 0), 0); v4.len()];
        for item in &v4 {
            let g = group(&item.0);
            grouped[start[g]] = *item;
            start[g] += 1;
        }
        drop(v4);
        self.v4.extend(grouped);
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (Entry, u32)> + '_ {
        self.v4
            .iter()
            .map(|(&k, &id)| (unpack(k), id))
            .chain(self.v6.iter().map(|(&e, &id)| (e, id)))
    }
}

impl Index {
    /// Give back the room of removed entries (a table never shrinks by itself).
    pub(super) fn shrink_to_fit(&mut self) {
        self.v4.shrink_to_fit();
        self.v6.shrink_to_fit();
    }
}

impl super::Dispatcher {
    /// Give back the memory the index kept for entries since removed: after
    /// a unit with many bindings goes, its table would otherwise stay as
    /// large as it ever was.
    pub fn shrink_index(&mut self) {
        self.entries.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_the_packed_form() {
        let mut index = Index::default();
        let entries: Vec<Entry> = [
            ("192.0.2.0/24", Protocol::Tcp, 80),
            ("0.0.0.0/0", Protocol::Udp, 0),
            ("203.0.113.7/32", Protocol::Udp, 65535),
            ("2001:db8::/64", Protocol::Tcp, 443),
        ]
        .iter()
        .map(|&(p, protocol, port)| Entry {
            protocol,
            prefix: p.parse().unwrap(),
            port,
        })
        .collect();
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(index.insert(*e, i as u32), None);
        }
        assert_eq!(index.len(), 4);
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(index.get(e), Some(i as u32));
        }
        let mut back: Vec<(Entry, u32)> = index.iter().collect();
        back.sort_by_key(|(_, id)| *id);
        assert_eq!(
            back.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
            entries,
            "unpacked as packed"
        );
        let mut many = Index::default();
        // Enough for a table of SORTED_INSERT_BUCKETS, inserted sorted.
        let bulk: Vec<(Entry, u32)> = (0..300_000u32)
            .map(|i| {
                let e = Entry {
                    protocol: Protocol::Tcp,
                    prefix: IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0xc612_0000 + i), 32).unwrap()),
                    port: 8000 + (i % 16) as u16,
                };
                (e, i % 7)
            })
            .chain(entries.iter().enumerate().map(|(i, e)| (*e, i as u32)))
            .collect();
        many.insert_many(bulk.iter().copied());
        assert_eq!(many.len(), bulk.len());
        for (e, id) in &bulk {
            assert_eq!(many.get(e), Some(*id), "{e:?}");
        }
        assert_eq!(index.remove(&entries[2]), Some(2));
        assert!(!index.contains_key(&entries[2]));
        assert_eq!(index.len(), 3);
    }
}
