//! The in-memory index of the entries (entry → destination id), kept compact:
//! the daemon holds one item per entry, up to 2^20 of them.
//!
//! IPv4 entries are packed into 8 bytes (address; port, prefix length and
//! protocol), 12 bytes with their id; IPv6 entries into 20, 24 with their
//! id. (hashbrown keeps 8/7 to 16/7 as many buckets as items, and a byte
//! more per bucket: 2^20 IPv6 entries take 50 MiB, 58 as an `Entry` and
//! its id.) Both maps hash with a multiplicative hash instead of SipHash:
//! the keys come from the administrator's own unit files, not from the
//! network.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

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

/// An IPv6 entry: the address as four words, then port (16 bits), prefix
/// length (8) and protocol (1). Words of 4 bytes, so that with its id an
/// item of the table is 24 bytes (an `Entry` and its id take 28).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct V6Key([u32; 5]);

impl Hash for V6Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let [a, b, c, d, meta] = self.0.map(u64::from);
        state.write_u64(a | b << 32);
        state.write_u64(c | d << 32);
        state.write_u64(meta);
    }
}

const _: () = assert!(size_of::<(V6Key, u32)>() == 24);

/// An entry packed for its family's table.
enum Packed {
    V4(V4Key),
    V6(V6Key),
}

fn pack(e: &Entry) -> Packed {
    let protocol = match e.protocol {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
    };
    match e.prefix {
        IpNet::V4(net) => Packed::V4(V4Key(
            u32::from(net.addr()),
            u32::from(e.port) | u32::from(net.prefix_len()) << 16 | protocol << 22,
        )),
        IpNet::V6(net) => {
            let a = u128::from(net.addr());
            Packed::V6(V6Key([
                (a >> 96) as u32,
                (a >> 64) as u32,
                (a >> 32) as u32,
                a as u32,
                u32::from(e.port) | u32::from(net.prefix_len()) << 16 | protocol << 24,
            ]))
        }
    }
}

fn protocol_of(bit: u32) -> Protocol {
    if bit & 1 == 0 {
        Protocol::Tcp
    } else {
        Protocol::Udp
    }
}

fn unpack(k: V4Key) -> Entry {
    let len = (k.1 >> 16 & 0x3f) as u8;
    let prefix = Ipv4Net::new(Ipv4Addr::from(k.0), len)
        .map(IpNet::V4)
        .unwrap_or_else(|_| IpNet::from(IpAddr::V4(Ipv4Addr::from(k.0))));
    Entry {
        protocol: protocol_of(k.1 >> 22),
        prefix,
        port: k.1 as u16,
    }
}

fn unpack6(k: V6Key) -> Entry {
    let [a, b, c, d, meta] = k.0.map(u128::from);
    let addr = Ipv6Addr::from(a << 96 | b << 64 | c << 32 | d);
    let len = (meta >> 16 & 0xff) as u8;
    let prefix = Ipv6Net::new(addr, len)
        .map(IpNet::V6)
        .unwrap_or_else(|_| IpNet::from(IpAddr::V6(addr)));
    Entry {
        protocol: protocol_of((meta >> 24) as u32),
        prefix,
        port: meta as u16,
    }
}

/// From how many buckets on (about 6 MiB of table) inserting many keys
/// goes in the table's order.
const SORTED_INSERT_BUCKETS: usize = 1 << 19;
/// Into how many groups (as bits): 2^11 groups of a 2^21-bucket table are
/// 13 KiB of it each.
const INSERT_GROUP_BITS: u32 = 11;

/// `key` into `map` unless present: `None` when inserted, else its id.
fn insert_new<K: Hash + Eq>(map: &mut HashMap<K, u32, Fast>, key: K, id: u32) -> Option<u32> {
    use std::collections::hash_map::Entry as Slot;
    match map.entry(key) {
        Slot::Occupied(o) => Some(*o.get()),
        Slot::Vacant(v) => {
            v.insert(id);
            None
        }
    }
}

/// `items` (each a key first) in the order in which to insert them into a
/// table with room for `capacity` items: grouped by where each goes.
/// hashbrown puts an item in the bucket its hash selects (its hash masked
/// to the buckets), so keys inserted by the top bits of that fill the table
/// front to back, a stretch small enough to stay in cache at a time, where a
/// million inserted in any other order cost a cache miss or two each. As
/// they come where the table fits in the caches, and keys are inserted
/// faster that way.
fn in_table_order<K: Hash + Copy, T: Copy>(capacity: usize, items: Vec<(K, T)>) -> Vec<(K, T)> {
    // hashbrown keeps 7/8 of its buckets usable (a power of two): a wrong
    // guess here would only cost speed.
    let buckets = (capacity * 8).div_ceil(7).next_power_of_two();
    if buckets < SORTED_INSERT_BUCKETS {
        return items;
    }
    let bits = buckets.trailing_zeros();
    let mask = (buckets - 1) as u64;
    let hasher = Fast::default();
    grouped(items, bits, |(k, _)| hasher.hash_one(k) & mask)
}

/// `items` grouped (stably) by the top [`INSERT_GROUP_BITS`] bits of
/// `place`, a number below `2^bits` (where each goes in a table): one
/// counting pass, one scatter.
pub(super) fn grouped<T: Copy>(items: Vec<T>, bits: u32, place: impl Fn(&T) -> u64) -> Vec<T> {
    let Some(&first) = items.first() else {
        return items;
    };
    let shift = bits.saturating_sub(INSERT_GROUP_BITS);
    let groups: Vec<u16> = items.iter().map(|t| (place(t) >> shift) as u16).collect();
    let mut start = vec![0usize; (1 << (bits - shift)) + 1];
    for &g in &groups {
        start[usize::from(g) + 1] += 1;
    }
    for i in 1..start.len() {
        start[i] += start[i - 1];
    }
    let mut out = vec![first; items.len()];
    for (item, &g) in items.iter().zip(&groups) {
        out[start[usize::from(g)]] = *item;
        start[usize::from(g)] += 1;
    }
    out
}

/// Every entry and its destination id.
#[derive(Debug, Default)]
pub(super) struct Index {
    v4: HashMap<V4Key, u32, Fast>,
    v6: HashMap<V6Key, u32, Fast>,
}

impl Index {
    pub(super) fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub(super) fn get(&self, e: &Entry) -> Option<u32> {
        match pack(e) {
            Packed::V4(k) => self.v4.get(&k).copied(),
            Packed::V6(k) => self.v6.get(&k).copied(),
        }
    }

    pub(super) fn contains_key(&self, e: &Entry) -> bool {
        self.get(e).is_some()
    }

    #[cfg(test)]
    pub(super) fn insert(&mut self, e: Entry, id: u32) -> Option<u32> {
        match pack(&e) {
            Packed::V4(k) => self.v4.insert(k, id),
            Packed::V6(k) => self.v6.insert(k, id),
        }
    }

    /// Room for `v4` more IPv4 entries and `v6` more IPv6 ones.
    pub(super) fn reserve(&mut self, v4: usize, v6: usize) {
        self.v4.reserve(v4);
        self.v6.reserve(v6);
    }

    pub(super) fn remove(&mut self, e: &Entry) -> Option<u32> {
        match pack(e) {
            Packed::V4(k) => self.v4.remove(&k),
            Packed::V6(k) => self.v6.remove(&k),
        }
    }

    /// Insert many entries (none of them present yet, or replaced): in
    /// the table's own order (see [`in_table_order`]).
    pub(super) fn insert_many(&mut self, items: impl IntoIterator<Item = (Entry, u32)>) {
        let mut v4: Vec<(V4Key, u32)> = Vec::new();
        let mut v6: Vec<(V6Key, u32)> = Vec::new();
        for (e, id) in items {
            match pack(&e) {
                Packed::V4(k) => v4.push((k, id)),
                Packed::V6(k) => v6.push((k, id)),
            }
        }
        self.v4.reserve(v4.len());
        let v4 = in_table_order(self.v4.capacity(), v4);
        self.v4.extend(v4);
        self.v6.reserve(v6.len());
        let v6 = in_table_order(self.v6.capacity(), v6);
        self.v6.extend(v6);
    }

    /// Insert each of `items` unless its entry is present, in the tables'
    /// own order (see [`in_table_order`]; the tables hold room for them
    /// already): for each, in the order of `items`, `None` where it went
    /// in, else the id its entry has.
    pub(super) fn insert_new_many(&mut self, items: &[(Entry, u32)]) -> Vec<Option<u32>> {
        // Each with its id and its position in `items`.
        let mut v4: Vec<(V4Key, (u32, u32))> = Vec::new();
        let mut v6: Vec<(V6Key, (u32, u32))> = Vec::new();
        for (i, &(e, id)) in items.iter().enumerate() {
            match pack(&e) {
                Packed::V4(k) => v4.push((k, (id, i as u32))),
                Packed::V6(k) => v6.push((k, (id, i as u32))),
            }
        }
        let mut answers = vec![None; items.len()];
        for (k, (id, i)) in in_table_order(self.v4.capacity(), v4) {
            answers[i as usize] = insert_new(&mut self.v4, k, id);
        }
        for (k, (id, i)) in in_table_order(self.v6.capacity(), v6) {
            answers[i as usize] = insert_new(&mut self.v6, k, id);
        }
        answers
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (Entry, u32)> + '_ {
        self.v4
            .iter()
            .map(|(&k, &id)| (unpack(k), id))
            .chain(self.v6.iter().map(|(&k, &id)| (unpack6(k), id)))
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
            ("2001:db8:ffff:1::7/128", Protocol::Udp, 65535),
            ("::/0", Protocol::Udp, 0),
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
        assert_eq!(index.len(), 6);
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
        assert_eq!(index.len(), 5);
    }

    fn entry(prefix: IpNet, port: u16) -> Entry {
        Entry {
            protocol: Protocol::Tcp,
            prefix,
            port,
        }
    }

    /// `insert_new_many` answers, for each item in its place, what
    /// inserting the items one by one in their order would: `None` for an
    /// entry new here (the first of two alike in one call), else the id
    /// the entry had; into tables large enough to be filled in their own
    /// order, and small ones.
    #[test]
    fn insert_new_many_answers_as_one_by_one_would() {
        for n in [1_000u32, 300_000] {
            let v4 = |i: u32| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0xc612_0000 + i), 32).unwrap());
            let v6 = |i: u32| {
                let a = Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i));
                IpNet::V6(Ipv6Net::new(a, 128).unwrap())
            };
            let mut index = Index::default();
            // Present already: every third of the first half, id 7.
            let present: Vec<(Entry, u32)> = (0..n / 2)
                .step_by(3)
                .flat_map(|i| [(entry(v4(i), 80), 7), (entry(v6(i), 80), 7)])
                .collect();
            index.insert_many(present.iter().copied());
            let mut items: Vec<(Entry, u32)> = (0..n)
                .flat_map(|i| [(entry(v4(i), 80), i % 5), (entry(v6(i), 80), i % 5)])
                .collect();
            // Named twice in one call, with the same id and another.
            items.push((entry(v4(n - 1), 80), (n - 1) % 5));
            items.push((entry(v6(n - 1), 80), 9));
            index.reserve(items.len(), items.len());
            let mut one_by_one: HashMap<Entry, u32> = present.iter().copied().collect();
            let expected: Vec<Option<u32>> = items
                .iter()
                .map(|&(e, id)| match one_by_one.get(&e) {
                    Some(&had) => Some(had),
                    None => {
                        one_by_one.insert(e, id);
                        None
                    }
                })
                .collect();
            assert_eq!(index.insert_new_many(&items), expected, "{n}");
            assert_eq!(index.len(), one_by_one.len());
            for (e, id) in &one_by_one {
                assert_eq!(index.get(e), Some(*id), "{e:?}");
            }
        }
    }

    #[test]
    fn grouped_keeps_every_item_and_the_order_within_a_group() {
        let items: Vec<(u64, u32)> = (0..10_000u32)
            .map(|i| (u64::from(i.wrapping_mul(2_654_435_761)) >> 12, i))
            .collect();
        let out = grouped(items.clone(), 20, |(place, _)| *place);
        let shift = 20 - INSERT_GROUP_BITS;
        assert!(out.windows(2).all(|w| w[0].0 >> shift <= w[1].0 >> shift));
        assert!(
            out.windows(2)
                .all(|w| w[0].0 >> shift != w[1].0 >> shift || w[0].1 < w[1].1),
            "stable"
        );
        let mut sorted = out.clone();
        sorted.sort_by_key(|&(_, i)| i);
        assert_eq!(sorted, items);
    }
}
