/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * The layout shared between the dispatcher and user space.
 *
 * skactivate/src/dispatcher/abi.rs mirrors every struct here field by field, and
 * its tests compare sizes and offsets against the values this object exports in
 * `skactivate_layout` (see dispatcher.bpf.c).  Change one side, change the other,
 * and bump SKA_LAYOUT_VERSION: a daemon refuses to adopt maps of another layout.
 */
#ifndef SKACTIVATE_H
#define SKACTIVATE_H

#include <linux/types.h>

#define SKA_LAYOUT_VERSION 7

/* Bindings: entries (ranges are expanded to single ports).  Every entry is in
 * the `entries` hash; the `bindings` LPM trie holds those shorter than full
 * length (/32, /128) too. */
#define SKA_MAX_BINDINGS (1u << 20)
/* The `entries` hash is created with this many entries and grown sixteenfold
 * at a time (to SKA_MAX_BINDINGS) by replacing it: its bucket array is
 * allocated whole when it is created, 16 bytes per entry of capacity. */
#define SKA_ENTRIES_MIN (1u << 12)
/* The `filter` array: a one-hash Bloom filter of the `entries` hash, so that
 * a probe of a key no entry has costs an array read instead of a hash
 * lookup.  Word 0 is its header: log2 of the number of filter bits.  Bit b
 * of the filter is bit (b & 63) of word 1 + (b >> 6); a key's bit is the top
 * bits of its hash: the sum of its three 8-byte words, each folded (its high
 * half xored into its low half) and times its constant below (mod 2^64), the
 * key's address masked as in the hash.  Without the fold a product's top bits
 * see only the low bits of what sits high in a word: IPv6 /128s that differ
 * in their last 32 bits and in the port fell on 1 bit in 8.  It has 16 bits
 * per entry of the hash's capacity and is replaced with it.  It is mmapable:
 * user space writes each word with one 8-byte store.  A bit is set before its
 * entry enters the hash; bits of removed entries are cleared later, whole
 * words at a time, each written with every bit a present entry needs.  No
 * program that reads the filter runs beside entries before the header is
 * written (a new filter is all zeros): the program does not test it. */
#define SKA_FILTER_BITS_PER_ENTRY 16
#define SKA_FILTER_WORDS(capacity) ((capacity) * SKA_FILTER_BITS_PER_ENTRY / 64 + 1)
/* The `cache` array, so that a hit costs an array read instead of a hash
 * lookup (some 15 to 30 ns here); every probe asks it, after the filter.  Lines of 8 words; mmapable, replaced with the hash, and
 * on its own as the entries grow, written like the filter.  Line 0 is its header: word 0 the shift that takes a key's
 * hash to its first bucket (64 - log2 of the buckets), word 1 the number of
 * buckets - 1; written last, and not tested by the program (a new cache is
 * all zeros, and its slots empty).  Bucket i is line 1 + i.  A key may be in
 * two buckets: the top bits of its hash, and that xor SKA_CACHE_OTHER
 * (writers put it in the emptier, the first on a tie: at a key per slot
 * about 87 % of the keys find room, against 74 % with one bucket).  Two slots
 * per bucket, each four words: the key's three words and a tag, (hash &
 * ~0xffff) | (destination + 1).  A tag of 0 is an empty slot.  A slot answers
 * a probe only when its three words are the key's and its tag's upper 48
 * bits the key's hash's; anything else (an empty slot, another key, a slot
 * read while it changes) sends the probe to the hash.  Writers fill a slot
 * (words, then tag) only after its entry is in the hash with that
 * destination, empty it (tag) before the entry leaves the hash, and write
 * words only into an empty slot: a program that reads one key's words and
 * another's tag finds hash bits that are not its key's.  A key whose buckets
 * are full is not cached.  Entries of every length are (a key's words hold
 * its prefix length, so a probe finds only its own length's), except the
 * shorter ones of a family and protocol whose trie answers them. */
#define SKA_CACHE_LINE_WORDS 8
/* Buckets: the object's array has a quarter of the hash's first capacity
 * (2048 slots, 64 KiB: at 1,000 entries, where an eighth left 13 % of them
 * uncached, all but a few find room; one binding's memory stays in its
 * budget).  User space sizes the array to the entries, a bucket per entry,
 * a power of two from that size up to SKA_CACHE_BUCKETS of the hash's
 * capacity, half of it beyond the first (a slot per entry of capacity); the
 * program reads the size from the header. */
#define SKA_CACHE_BUCKETS(capacity) \
	((capacity) <= SKA_ENTRIES_MIN ? (capacity) / 4 : (capacity) / 2)
#define SKA_CACHE_LINES(capacity) (1 + SKA_CACHE_BUCKETS(capacity))
#define SKA_CACHE_TAG_DEST 0xffffull
/* What turns a key's first bucket into its second, and back. */
#define SKA_CACHE_OTHER(hash, mask) ((((hash) >> 16) & (mask)) | 1)
#define SKA_FILTER_K0 0x9e3779b97f4a7c15ull
#define SKA_FILTER_K1 0xc2b2ae3d27d4eb4full
#define SKA_FILTER_K2 0x165667b19e3779f9ull
#define SKA_FILTER_FOLD(x) ((x) ^ ((x) >> 32))

/* Destinations: ids 0..SKA_MAX_DESTINATIONS-1 index the metrics array.  A
 * destination is one socket of a unit (family and protocol): 1024 are some
 * 500 dual-stack socket units.  The per-CPU metrics array costs 24 bytes per
 * slot and CPU (1.5 MiB for 1024 on 64 CPUs), so it is created with
 * SKA_METRICS_MIN slots and replaced by one four times as big when an id
 * reaches its end (16, 64, 256, 1024): lowest ids are allocated first, so it
 * holds as many slots as destinations were in use at once, rounded up. */
#define SKA_MAX_DESTINATIONS 1024
#define SKA_METRICS_MIN 16
/* systemd's UNIT_NAME_MAX is 256 including the terminating NUL. */
#define SKA_UNIT_NAME_MAX 256

/* The `ports` array.  Word (protocol slot << 11 | port >> 5) says what kinds
 * of entry can match a port: bit (port & 31) is set while entries of that
 * protocol and port exist (any family and length); bits 32 and 33 are set in
 * every word of the protocol while it has wildcard-port entries of IPv4 and
 * of IPv6.  So an unbound port costs one array read.  Then 4 words of
 * lengths, one per (family slot << 1 | protocol slot): byte i (i < 4) is 1 +
 * the address bits of the i-th longest shorter-than-full prefix length in use
 * (0 ends the list), and bit 63 says more lengths are in use than listed: use
 * the trie.  Bits SKA_LENGTHS_NO_SPECIFIC + i and SKA_LENGTHS_NO_WILD + i say
 * that the i-th listed length has no port-specific entries, and no `*`
 * entries; i = SKA_LENGTHS_FULL (4) says it of the full length (/32, /128).
 * An address filter for when few prefixes are in use: the 16 bits at
 * SKA_LENGTHS_FILTER say which values no entry has in the address's nibble
 * number (the 5 bits at SKA_LENGTHS_NIBBLE; nibble n is address bits 4n to
 * 4n + 3, most significant first, within the shortest prefix in use).  All
 * these bits are inverted so that a clear bit, as a word of an older writer
 * has it, means "probe as ever".  Written by user space, which counts the
 * entries. */
#define SKA_PORT_SLOT_TCP 0
#define SKA_PORT_SLOT_UDP 1
#define SKA_FAMILY_SLOT_V4 0
#define SKA_FAMILY_SLOT_V6 1
#define SKA_PORTS_WILD_BIT 32
#define SKA_PORTS_PORT_WORDS ((2u << 16) / 32)
#define SKA_PORTS_LENGTHS SKA_PORTS_PORT_WORDS
#define SKA_MAX_LENGTHS 4
#define SKA_LENGTHS_TRIE (1ull << 63)
#define SKA_LENGTHS_NO_SPECIFIC 32
#define SKA_LENGTHS_NO_WILD 37
#define SKA_LENGTHS_FULL SKA_MAX_LENGTHS
#define SKA_LENGTHS_NIBBLE 42
#define SKA_LENGTHS_FILTER 47
#define SKA_PORTS_WORDS (SKA_PORTS_PORT_WORDS + 4)

/* Bits of the trie key in front of the address: protocol (8), port (16) and
 * family (8).  The family is part of every prefix, so an IPv6 binding can
 * never answer an IPv4 lookup, nor the other way round. */
#define SKA_KEY_HEADER_BITS 32
/* Full-length keys: a /32 or a /128 behind the header. */
#define SKA_KEY_V4_FULL_BITS (SKA_KEY_HEADER_BITS + 32)
#define SKA_KEY_V6_FULL_BITS (SKA_KEY_HEADER_BITS + 128)

/* Key of the `bindings` trie and of the `entries` hash. prefixlen counts bits
 * of everything after it; in the hash the address is masked to its prefix.
 *
 * Laid out for the trie's walk, which compares a key with each node 8 bytes
 * at a time first: header and IPv4 address together are the first 8 bytes, so
 * an IPv4 lookup costs one comparison per node.  No padding, 4-byte aligned:
 * the address sits at offset 8 and is written as whole words. */
struct ska_binding_key {
	__u32 prefixlen;
	__u8 protocol;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 port[2];   /* network byte order; 0 means every port */
	__u8 family;    /* AF_INET or AF_INET6 */
	__u8 addr[16];  /* IPv6, or IPv4 in the first 4 bytes and zeros */
};

/* Value of the `bindings` trie and the `entries` hash: the trie does not say which prefix matched, so
 * the value carries the key's own prefixlen for the precedence comparison. */
struct ska_binding_value {
	__u32 destination;
	__u32 prefixlen;
};

/* Key of the `destinations` hash: one socket of one unit. */
struct ska_destination_key {
	char unit[SKA_UNIT_NAME_MAX]; /* NUL-padded */
	__u8 family;                  /* AF_INET or AF_INET6 */
	__u8 protocol;                /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 _pad[2];
};

/* Value of the `destinations` hash. */
struct ska_destination_value {
	__u32 id;       /* key of `sockets`, index of `metrics` */
	__u32 refcount; /* bindings (trie entries) that point here */
};

/* Value of the `cache` array: see above. */
struct ska_cache_line {
	__u64 w[SKA_CACHE_LINE_WORDS];
};

/* Value of the per-CPU `metrics` array, per destination id. */
struct ska_metrics {
	__u64 lookups; /* lookups that matched a binding of this destination */
	__u64 misses;  /* ...whose socket was gone: dropped */
	__u64 errors;  /* ...where bpf_sk_assign failed: dropped */
};

/* Exported so that user space can check the layout of the object it loads. */
struct ska_layout {
	__u32 version;
	__u32 binding_key_size;
	__u32 binding_value_size;
	__u32 destination_key_size;
	__u32 destination_value_size;
	__u32 metrics_size;
	__u32 off_binding_key_protocol;
	__u32 off_binding_key_port;
	__u32 off_binding_key_family;
	__u32 off_binding_key_addr;
	__u32 off_binding_value_prefixlen;
	__u32 off_destination_key_family;
	__u32 off_destination_key_protocol;
	__u32 off_destination_value_refcount;
	__u32 off_metrics_misses;
	__u32 off_metrics_errors;
	__u32 cache_line_size;
};

#endif
