//! Rust mirrors of the structs in `ebpf/skactivate.h`.
//!
//! Each type says which C struct it mirrors; `tests::layout_matches_the_object`
//! compares sizes and offsets with the `skactivate_layout` the object exports.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::binding::{Binding, Family, Ports, Protocol};

/// `SKA_LAYOUT_VERSION`.
pub const LAYOUT_VERSION: u32 = 7;
/// `SKA_MAX_BINDINGS`: entries (a binding has one per port).
pub const MAX_BINDINGS: u32 = 1 << 20;
/// `SKA_ENTRIES_MIN`: the `entries` hash's first capacity; it grows
/// sixteenfold at a time up to `MAX_BINDINGS`.
pub const ENTRIES_MIN: u32 = 1 << 12;
/// `SKA_FILTER_BITS_PER_ENTRY`: bits of the `filter` array per entry of
/// the `entries` hash's capacity.
pub const FILTER_BITS_PER_ENTRY: u32 = 16;
/// `SKA_FILTER_K0`, `SKA_FILTER_K1`, `SKA_FILTER_K2`: the filter hash's
/// factors for a key's three 8-byte words.
pub const FILTER_K: [u64; 3] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
];

/// `SKA_FILTER_WORDS(capacity)`: the `filter` array's words (header
/// included) beside an `entries` hash of `capacity` entries.
pub const fn filter_words(capacity: u32) -> u32 {
    capacity * FILTER_BITS_PER_ENTRY / 64 + 1
}

/// `SKA_CACHE_LINE_WORDS`: the `cache` array's values are lines of this
/// many words.
pub const CACHE_LINE_WORDS: u32 = 8;
/// `SKA_CACHE_TAG_DEST`: the bits of a cache slot's tag that hold its
/// destination + 1.
pub const CACHE_TAG_DEST: u64 = 0xffff;

/// `SKA_CACHE_OTHER(hash, mask)`: what turns a key's first cache bucket
/// into its second, and back.
pub const fn cache_other(hash: u64, mask: u64) -> u64 {
    (hash >> 16) & mask | 1
}

/// `SKA_CACHE_BUCKETS(capacity)`: the cache's buckets (two slots each)
/// beside an `entries` hash of `capacity` entries.
pub const fn cache_buckets(capacity: u32) -> u32 {
    if capacity <= ENTRIES_MIN {
        capacity / 4
    } else {
        capacity / 2
    }
}

/// `SKA_CACHE_LINES(capacity)`: the `cache` array's lines (header and
/// buckets) beside an `entries` hash of `capacity` entries.
pub const fn cache_lines(capacity: u32) -> u32 {
    1 + cache_buckets(capacity)
}

/// The cache's fewest buckets: as many as beside the hash's first
/// capacity (the object's own size of the array).
pub const CACHE_BUCKETS_MIN: u32 = cache_buckets(ENTRIES_MIN);

/// The cache's buckets for `entries` entries beside an `entries` hash of
/// `capacity` entries: a bucket of two slots per entry (so that every
/// entry but a few finds room), a power of two, at least
/// `CACHE_BUCKETS_MIN` and at most `cache_buckets(capacity)`, the most
/// that hash can fill.
pub fn cache_buckets_for(entries: usize, capacity: u32) -> u32 {
    let most = cache_buckets(capacity);
    u32::try_from(entries)
        .ok()
        .and_then(u32::checked_next_power_of_two)
        .unwrap_or(most)
        .clamp(CACHE_BUCKETS_MIN, most)
}

/// The sizes (the `entries` hash's capacity, the cache's buckets) to
/// which maps of sizes `have` shrink once `entries` entries are left: the
/// hash a sixteenth (down to `ENTRIES_MIN`) while they fill at most a
/// quarter of that; the cache to `cache_buckets_for` twice the entries
/// where that is at most half what it has (or has to be, beside a smaller
/// hash). `have` where nothing shrinks. So it takes a fourfold fall to
/// shrink, and twice the entries left to grow again.
pub fn shrunk_sizes(entries: usize, (capacity, buckets): (u32, u32)) -> (u32, u32) {
    let mut cap = capacity;
    while cap > ENTRIES_MIN && entries <= (cap / 64) as usize {
        cap /= 16;
    }
    let fit = cache_buckets_for(entries.saturating_mul(2), cap);
    if buckets > cache_buckets(cap) || buckets / 2 >= fit {
        (cap, fit)
    } else {
        (cap, buckets)
    }
}

/// Whether a cache of `buckets` buckets is a size this build makes beside
/// an `entries` hash of `capacity` entries.
pub fn cache_buckets_fit(buckets: u32, capacity: u32) -> bool {
    buckets.is_power_of_two() && (CACHE_BUCKETS_MIN..=cache_buckets(capacity)).contains(&buckets)
}

/// log2 of the filter's bits beside an `entries` hash of `capacity`
/// entries (a power of two), as its header says.
pub const fn filter_log2(capacity: u32) -> u32 {
    (capacity * FILTER_BITS_PER_ENTRY).trailing_zeros()
}

/// The three 8-byte words of a key, as the program holds them.
pub fn filter_key_words(key: &aya::maps::lpm_trie::Key<BindingKey>) -> [u64; 3] {
    let k = key.data();
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&key.prefix_len().to_le_bytes());
    head[4] = k.protocol;
    head[5..7].copy_from_slice(&k.port);
    head[7] = k.family;
    let (a1, a2) = k.addr.split_at(8);
    [
        u64::from_le_bytes(head),
        u64::from_le_bytes(a1.try_into().expect("8 bytes")),
        u64::from_le_bytes(a2.try_into().expect("8 bytes")),
    ]
}

/// The key whose three 8-byte words are `words` (as `filter_key_words`
/// gives them).
pub fn key_from_words(words: &[u64; 3]) -> aya::maps::lpm_trie::Key<BindingKey> {
    let head = words[0].to_le_bytes();
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&words[1].to_le_bytes());
    addr[8..].copy_from_slice(&words[2].to_le_bytes());
    let prefixlen = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    aya::maps::lpm_trie::Key::new(
        prefixlen,
        BindingKey {
            protocol: head[4],
            port: [head[5], head[6]],
            family: head[7],
            addr,
        },
    )
}

/// The hash of `key` the filter and the cache use: as the program
/// computes it.
pub fn key_hash(key: &aya::maps::lpm_trie::Key<BindingKey>) -> u64 {
    let fold = |x: u64| x ^ x >> 32;
    let [q0, a1, a2] = filter_key_words(key);
    fold(q0)
        .wrapping_mul(FILTER_K[0])
        .wrapping_add(fold(a1).wrapping_mul(FILTER_K[1]))
        .wrapping_add(fold(a2).wrapping_mul(FILTER_K[2]))
}

/// The filter bit of a key of hash `hash` in a filter of 2^`log2` bits.
pub fn filter_bit(hash: u64, log2: u32) -> u64 {
    hash >> (64 - log2)
}

/// `SKA_MAX_DESTINATIONS`.
pub const MAX_DESTINATIONS: u32 = 1024;
/// `SKA_METRICS_MIN`: the `metrics` array's first capacity; it is replaced
/// by one four times as big when an id reaches its end, up to
/// `MAX_DESTINATIONS`.
pub const METRICS_MIN: u32 = 16;

/// The `metrics` capacities a dispatcher makes: `METRICS_MIN`, fourfold
/// steps, `MAX_DESTINATIONS`.
pub fn metrics_capacities() -> impl Iterator<Item = u32> {
    std::iter::successors(Some(METRICS_MIN), |&c| {
        (c < MAX_DESTINATIONS).then(|| (c * 4).min(MAX_DESTINATIONS))
    })
}

/// The smallest `metrics` capacity with a slot for destination `id`.
pub fn metrics_capacity_for(id: u32) -> Option<u32> {
    metrics_capacities().find(|&c| c > id)
}
/// `SKA_UNIT_NAME_MAX`.
pub const UNIT_NAME_MAX: usize = 256;
/// `SKA_PORTS_PORT_WORDS`: words of the `ports` array with a bit per
/// protocol and port (32 ports a word).
pub const PORTS_PORT_WORDS: u32 = (2 << 16) / 32;
/// `SKA_PORTS_LENGTHS`: the first of the 4 lengths words.
pub const PORTS_LENGTHS: u32 = PORTS_PORT_WORDS;
/// `SKA_PORTS_WORDS`: all words of the `ports` array.
pub const PORTS_WORDS: u32 = PORTS_PORT_WORDS + 4;
/// `SKA_PORTS_WILD_BIT`: bit of the port words set while the protocol has
/// wildcard entries of IPv4 (and the next bit: of IPv6).
pub const PORTS_WILD_BIT: u32 = 32;
/// `SKA_MAX_LENGTHS`: shorter-than-full lengths a lengths word lists.
pub const MAX_LENGTHS: usize = 4;
/// `SKA_LENGTHS_TRIE`: more lengths in use than listed: the trie answers.
pub const LENGTHS_TRIE: u64 = 1 << 63;
/// `SKA_LENGTHS_NO_SPECIFIC`: bit + i of a lengths word says the i-th
/// listed length (i = `LENGTHS_FULL`: the full length) has no port-specific
/// entries. Inverted, so that a clear bit means "probe".
pub const LENGTHS_NO_SPECIFIC: u32 = 32;
/// `SKA_LENGTHS_NO_WILD`: the same for `*` entries.
pub const LENGTHS_NO_WILD: u32 = 37;
/// `SKA_LENGTHS_FULL`: the i of the full length in those bits.
pub const LENGTHS_FULL: u32 = MAX_LENGTHS as u32;
/// `SKA_LENGTHS_NIBBLE`: 5 bits, the address filter's nibble number.
pub const LENGTHS_NIBBLE: u32 = 42;
/// `SKA_LENGTHS_FILTER`: 16 bits, bit v set when no entry has the value v
/// in that nibble. All clear: no filter.
pub const LENGTHS_FILTER: u32 = 47;
/// `SKA_KEY_HEADER_BITS`: protocol, port and family in front of the address.
pub const KEY_HEADER_BITS: u32 = 32;

/// Mirrors `struct ska_binding_key` without its leading `prefixlen`, which aya's
/// `lpm_trie::Key` supplies.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BindingKey {
    pub protocol: u8,
    /// Network byte order; 0 = every port.
    pub port: [u8; 2],
    /// `AF_INET` or `AF_INET6`: part of every prefix, so the families never mix.
    pub family: u8,
    /// IPv6, or IPv4 in the first 4 bytes followed by zeros.
    pub addr: [u8; 16],
}

// SAFETY: plain bytes, no padding, every bit pattern valid.
unsafe impl aya::Pod for BindingKey {}

/// Mirrors `struct ska_binding_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingValue {
    pub destination: u32,
    /// The prefixlen of the entry's own key.
    pub prefixlen: u32,
}

// SAFETY: two u32, no padding.
unsafe impl aya::Pod for BindingValue {}

/// Mirrors `struct ska_destination_key`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DestinationKey {
    pub unit: [u8; UNIT_NAME_MAX],
    pub family: u8,
    pub protocol: u8,
    pub pad: [u8; 2],
}

// SAFETY: bytes only, explicit padding.
unsafe impl aya::Pod for DestinationKey {}

impl std::fmt::Debug for DestinationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationKey")
            .field("unit", &self.unit_name())
            .field("family", &self.family)
            .field("protocol", &self.protocol)
            .finish()
    }
}

impl DestinationKey {
    /// `None` if the unit name does not fit (systemd's limit is 255 bytes).
    pub fn new(unit: &str, family: Family, protocol: Protocol) -> Option<Self> {
        let bytes = unit.as_bytes();
        if bytes.len() >= UNIT_NAME_MAX || bytes.contains(&0) {
            return None;
        }
        let mut name = [0u8; UNIT_NAME_MAX];
        name[..bytes.len()].copy_from_slice(bytes);
        Some(DestinationKey {
            unit: name,
            family: family.af(),
            protocol: protocol.number(),
            pad: [0; 2],
        })
    }

    pub fn unit_name(&self) -> String {
        let end = self
            .unit
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(UNIT_NAME_MAX);
        String::from_utf8_lossy(&self.unit[..end]).into_owned()
    }
}

/// Mirrors `struct ska_destination_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationValue {
    pub id: u32,
    pub refcount: u32,
}

// SAFETY: two u32, no padding.
unsafe impl aya::Pod for DestinationValue {}

/// Mirrors `struct ska_metrics`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metrics {
    pub lookups: u64,
    pub misses: u64,
    pub errors: u64,
}

// SAFETY: three u64, no padding.
unsafe impl aya::Pod for Metrics {}

/// `SKA_PORT_SLOT_*`.
pub fn protocol_slot(protocol: Protocol) -> u32 {
    match protocol {
        Protocol::Tcp => 0,
        Protocol::Udp => 1,
    }
}

/// `SKA_FAMILY_SLOT_*`.
pub fn family_slot(family: Family) -> u32 {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// The word of the `ports` array for a protocol's port, and the port's bit.
pub fn port_word_bit(protocol: Protocol, port: u16) -> (u32, u32) {
    (
        protocol_slot(protocol) << 11 | u32::from(port) >> 5,
        u32::from(port) & 31,
    )
}

/// The lengths word of a family and protocol.
pub fn lengths_index(family: Family, protocol: Protocol) -> u32 {
    PORTS_LENGTHS + (family_slot(family) << 1 | protocol_slot(protocol))
}

/// Which kinds of entry a prefix length has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LengthKinds {
    /// Port-specific entries.
    pub specific: bool,
    /// `*` entries.
    pub wild: bool,
}

/// An address filter: the values no entry has in nibble `nibble` of the
/// address (bits 4 × `nibble` to 4 × `nibble` + 3, most significant first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddrFilter {
    pub nibble: u8,
    pub absent: u16,
}

impl AddrFilter {
    /// The value of `addr` in nibble `nibble`.
    pub fn value(addr: IpAddr, nibble: u8) -> u16 {
        let (bits, last) = match addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 28u32),
            IpAddr::V6(a) => (u128::from(a), 124),
        };
        let v = last
            .checked_sub(4 * u32::from(nibble))
            .map_or(0, |shift| bits >> shift);
        (v & 15) as u16
    }
}

/// A lengths word: `shorter` are the address bits of the shorter-than-full
/// prefix lengths in use, longest first, and their kinds; `full` the kinds
/// of the full-length entries; `filter` what no entry's address has.
pub fn lengths_word(shorter: &[(u8, LengthKinds)], full: LengthKinds, filter: AddrFilter) -> u64 {
    let absent = |i: u32, kinds: LengthKinds| {
        u64::from(!kinds.specific) << (LENGTHS_NO_SPECIFIC + i)
            | u64::from(!kinds.wild) << (LENGTHS_NO_WILD + i)
    };
    let head = absent(LENGTHS_FULL, full)
        | u64::from(filter.nibble & 31) << LENGTHS_NIBBLE
        | u64::from(filter.absent) << LENGTHS_FILTER;
    if shorter.len() > MAX_LENGTHS {
        return LENGTHS_TRIE | head;
    }
    (0u32..).zip(shorter).fold(head, |w, (i, &(bits, kinds))| {
        w | (u64::from(bits) + 1) << (8 * i) | absent(i, kinds)
    })
}

/// The address bits of a full-length prefix of `family`.
pub fn full_bits(family: Family) -> u8 {
    match family {
        Family::V4 => 32,
        Family::V6 => 128,
    }
}

/// The address as the trie stores it: IPv6, or IPv4 followed by zeros.
pub fn trie_addr(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => {
            let mut out = [0; 16];
            out[..4].copy_from_slice(&a.octets());
            out
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// The trie's prefix length for an address prefix: header bits plus the
/// prefix.
pub fn trie_prefixlen(prefix: &IpNet) -> u32 {
    KEY_HEADER_BITS + u32::from(prefix.prefix_len())
}

fn trie_key(protocol: Protocol, addr: IpAddr, port: u16) -> BindingKey {
    BindingKey {
        protocol: protocol.number(),
        port: port.to_be_bytes(),
        family: Family::of(&addr).af(),
        addr: trie_addr(addr),
    }
}

/// The key of one entry of a binding, for the trie and (the prefix being
/// masked, as `Binding::new` keeps it) the hash: `port` is 0 for `*`.
pub fn binding_key(
    protocol: Protocol,
    prefix: &IpNet,
    port: u16,
) -> aya::maps::lpm_trie::Key<BindingKey> {
    aya::maps::lpm_trie::Key::new(
        trie_prefixlen(prefix),
        trie_key(protocol, prefix.addr(), port),
    )
}

/// A full-length lookup key for one address and port.
pub fn lookup_key(
    protocol: Protocol,
    addr: IpAddr,
    port: u16,
) -> aya::maps::lpm_trie::Key<BindingKey> {
    let bits = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    aya::maps::lpm_trie::Key::new(KEY_HEADER_BITS + bits, trie_key(protocol, addr, port))
}

/// The (protocol, prefix, port) a trie entry stands for, or `None` for an entry
/// that skactivate would never have written.
pub fn decode_binding_key(prefixlen: u32, key: &BindingKey) -> Option<(Binding, u16)> {
    let protocol = Protocol::from_number(key.protocol)?;
    let port = u16::from_be_bytes(key.port);
    let addr_bits = u8::try_from(prefixlen.checked_sub(KEY_HEADER_BITS)?).ok()?;
    let addr = match Family::from_af(key.family)? {
        Family::V4 => {
            let [a, b, c, d, ..] = key.addr;
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        }
        Family::V6 => IpAddr::V6(Ipv6Addr::from(key.addr)),
    };
    let prefix = IpNet::new(addr, addr_bits).ok()?;
    let ports = if port == 0 {
        Ports::All
    } else {
        Ports::single(port)
    };
    Some((Binding::new(protocol, prefix, ports), port))
}

/// The all-zero IPv4 address, for tests and defaults.
pub const V4_ANY: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

/// `struct bpf_sk_lookup` of `linux/bpf.h`, as `BPF_PROG_TEST_RUN` takes it.
/// Every byte after `local_port` must be zero, tail padding included: hence the
/// explicit trailing field.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SkLookupCtx {
    pub cookie: u64,
    pub family: u32,
    pub protocol: u32,
    pub remote_ip4: u32,
    pub remote_ip6: [u32; 4],
    pub remote_port: u16,
    pub pad0: u16,
    pub local_ip4: u32,
    pub local_ip6: [u32; 4],
    pub local_port: u32,
    pub ingress_ifindex: u32,
    pub pad1: u32,
}

// SAFETY: u64, u32 and u16 fields with explicit padding; any bit pattern is valid.
unsafe impl aya::Pod for SkLookupCtx {}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;

    /// `struct ska_layout`, read from the object's `.skactivate_layout` section.
    fn object_layout() -> Vec<u32> {
        use object::{Object, ObjectSection};
        let file = object::File::parse(super::super::DISPATCHER_OBJECT).unwrap();
        let section = file.section_by_name(".skactivate_layout").unwrap();
        section
            .data()
            .unwrap()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn the_cache_is_sized_to_its_entries_within_the_hashs_capacity() {
        let big = 1 << 20;
        assert_eq!(CACHE_BUCKETS_MIN, 1024);
        assert_eq!(cache_buckets_for(0, ENTRIES_MIN), 1024);
        // Shrinking: a fourfold fall, never below the first sizes, and
        // room for twice the entries left.
        assert_eq!(shrunk_sizes(1_000_000, (big, 1 << 19)), (big, 1 << 19));
        assert_eq!(shrunk_sizes(200_000, (big, 1 << 19)), (big, 1 << 19));
        assert_eq!(shrunk_sizes(131_073, (big, 1 << 19)), (big, 1 << 19));
        assert_eq!(shrunk_sizes(131_072, (big, 1 << 19)), (big, 1 << 18));
        assert_eq!(shrunk_sizes(16_385, (big, 1 << 17)), (big, 1 << 16));
        assert_eq!(shrunk_sizes(16_384, (big, 1 << 17)), (1 << 16, 1 << 15));
        assert_eq!(shrunk_sizes(1_024, (1 << 16, 1 << 14)), (ENTRIES_MIN, 1024));
        assert_eq!(shrunk_sizes(1_025, (1 << 16, 1 << 14)), (1 << 16, 1 << 12));
        assert_eq!(shrunk_sizes(0, (big, 1 << 19)), (ENTRIES_MIN, 1024));
        assert_eq!(shrunk_sizes(0, (ENTRIES_MIN, 1024)), (ENTRIES_MIN, 1024));
        for entries in [0, 1, 1_000, 4_096, 4_097, 60_000, 65_537, 400_000, 1 << 20] {
            for have in [(ENTRIES_MIN, 1024), (1 << 16, 1 << 15), (big, 1 << 19)] {
                let (cap, buckets) = shrunk_sizes(entries, have);
                assert!(cap <= have.0 && buckets <= have.1);
                assert!(cache_buckets_fit(buckets, cap), "{entries} {have:?}");
                if (cap, buckets) != have {
                    // Room for the entries, and for as many again; and a
                    // fourfold fall at least.
                    assert!(entries * 2 <= cap as usize, "{entries} {have:?}");
                    assert!(cache_buckets_for(entries * 2, cap) <= buckets);
                    assert!(entries * 4 <= have.1 as usize || cap < have.0);
                }
            }
        }
        assert_eq!(cache_buckets_for(4096, ENTRIES_MIN), 1024);
        assert_eq!(cache_buckets_for(1, big), 1024);
        assert_eq!(cache_buckets_for(6000, 1 << 16), 8192);
        assert_eq!(cache_buckets_for(60_000, 1 << 16), 1 << 15);
        assert_eq!(cache_buckets_for(100_000, big), 1 << 17);
        assert_eq!(cache_buckets_for(1 << 17, big), 1 << 17);
        assert_eq!(cache_buckets_for((1 << 17) + 1, big), 1 << 18);
        assert_eq!(cache_buckets_for(1 << 20, big), 1 << 19);
        assert_eq!(cache_buckets_for(usize::MAX, big), 1 << 19);
        for (buckets, fits) in [
            (1024, true),
            (1 << 19, true),
            (512, false),
            (3 << 10, false),
        ] {
            assert_eq!(cache_buckets_fit(buckets, big), fits, "{buckets}");
        }
        assert!(!cache_buckets_fit(1 << 16, 1 << 16));
        // The most is what the hash's capacity made before the cache was
        // sized to its entries: state of that build is adopted as it is.
        for capacity in [ENTRIES_MIN, 1 << 16, big] {
            assert!(cache_buckets_fit(cache_buckets(capacity), capacity));
        }
    }

    #[test]
    fn metrics_grow_fourfold_to_the_destinations_cap() {
        assert_eq!(
            metrics_capacities().collect::<Vec<_>>(),
            [16, 64, 256, 1024]
        );
        assert_eq!(metrics_capacity_for(0), Some(16));
        assert_eq!(metrics_capacity_for(15), Some(16));
        assert_eq!(metrics_capacity_for(16), Some(64));
        assert_eq!(metrics_capacity_for(1023), Some(1024));
        assert_eq!(metrics_capacity_for(1024), None);
    }

    #[test]
    fn layout_matches_the_object() {
        let c = object_layout();
        let full_key = 4 + size_of::<BindingKey>();
        let ours = [
            LAYOUT_VERSION as usize,
            full_key,
            size_of::<BindingValue>(),
            size_of::<DestinationKey>(),
            size_of::<DestinationValue>(),
            size_of::<Metrics>(),
            4 + offset_of!(BindingKey, protocol),
            4 + offset_of!(BindingKey, port),
            4 + offset_of!(BindingKey, family),
            4 + offset_of!(BindingKey, addr),
            offset_of!(BindingValue, prefixlen),
            offset_of!(DestinationKey, family),
            offset_of!(DestinationKey, protocol),
            offset_of!(DestinationValue, refcount),
            offset_of!(Metrics, misses),
            offset_of!(Metrics, errors),
            CACHE_LINE_WORDS as usize * 8,
        ];
        let ours: Vec<u32> = ours.iter().map(|&v| u32::try_from(v).unwrap()).collect();
        assert_eq!(c, ours, "ebpf/skactivate.h and abi.rs disagree");
        assert_eq!(size_of::<aya::maps::lpm_trie::Key<BindingKey>>(), full_key);
    }

    #[test]
    fn sk_lookup_ctx_is_the_kernels_size() {
        // sizeof(struct bpf_sk_lookup) in linux/bpf.h of 6.x: 68 bytes of
        // fields, padded to 72 by the u64 cookie.
        assert_eq!(size_of::<SkLookupCtx>(), 72);
        assert_eq!(offset_of!(SkLookupCtx, local_port), 60);
    }

    #[test]
    fn ipv4_keys_fit_the_first_eight_bytes() {
        // The trie compares the first 8 bytes of a key in one go: an IPv4
        // lookup should never need more.
        let key = lookup_key(Protocol::Tcp, "192.0.2.7".parse().unwrap(), 80);
        assert_eq!(key.prefix_len(), 64);
        let data = key.data();
        assert_eq!(data.family, libc::AF_INET as u8);
        assert_eq!(
            data.addr,
            [192, 0, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(offset_of!(BindingKey, addr) + 4, 8);
    }

    #[test]
    fn families_never_share_a_prefix() {
        // ::/0 and 0.0.0.0/0 differ in the family byte, inside both prefixes.
        let v6 = binding_key(Protocol::Tcp, &"::/0".parse().unwrap(), 0);
        let v4 = binding_key(Protocol::Tcp, &"0.0.0.0/0".parse().unwrap(), 0);
        assert_eq!(v6.prefix_len(), KEY_HEADER_BITS);
        assert_ne!(v6.data().family, v4.data().family);
        // A v4-mapped IPv6 prefix stays IPv6.
        let mapped: IpNet = "::ffff:192.0.2.0/120".parse().unwrap();
        let key = binding_key(Protocol::Tcp, &mapped, 80);
        let (b, _) = decode_binding_key(key.prefix_len(), &key.data()).unwrap();
        assert_eq!(b.prefix, mapped);
    }

    #[test]
    fn keys_round_trip() {
        for (text, port) in [
            ("192.0.2.0/24", 80u16),
            ("0.0.0.0/0", 0),
            ("203.0.113.7/32", 8080),
            ("2001:db8::/64", 443),
            ("2001:db8::1/128", 53),
            ("::/0", 0),
        ] {
            let net: IpNet = text.parse().unwrap();
            let key = binding_key(Protocol::Udp, &net, port);
            let (b, p) = decode_binding_key(key.prefix_len(), &key.data()).unwrap();
            assert_eq!(b.prefix, net);
            assert_eq!(p, port);
            assert_eq!(b.protocol, Protocol::Udp);
        }
    }
}
