// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * skactivate's dispatcher: one sk_lookup program per network namespace.
 *
 * For every new connection and every unconnected datagram it finds the most
 * specific binding for (protocol, local address, local port) and hands the packet
 * to that binding's socket.  Precedence: the longest prefix wins; on equal prefix
 * length a specific port beats the wildcard.  No binding: SK_PASS untouched, so
 * the kernel's own lookup goes on.  A binding whose socket is gone: SK_DROP,
 * counted as a miss.
 *
 * The miss path is as hot as the hit path (it runs for every service on the
 * host), so one inlined read of the `ports` array answers "can any entry
 * match this port?" before any other map is touched.  A second one reads the
 * lengths word of the family and protocol: the prefix lengths in use, which
 * kinds of entry (port-specific, `*`) each has, and, while few prefixes are
 * in use, a filter of the addresses they cover.  Then the `entries`
 * hash is probed: the full-length key (/32, /128) first, then, longest first,
 * each shorter prefix length in use, the address masked to it; at each length
 * the specific port before `*`, each only where entries of its kind exist, and
 * the first entry found wins, which is the precedence rule.  Each probe asks
 * the `filter` array first, and stops where the key's bit is clear; then the
 * key's buckets in the `cache` array; then the hash.
 * Where more lengths are in
 * use than the list holds, the LPM trie of the shorter entries answers after
 * the full-length probes.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "skactivate.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* Every entry, its address masked to its prefix: the exact-match table. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ska_binding_key);
	__type(value, struct ska_binding_value);
	__uint(max_entries, SKA_ENTRIES_MIN);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} entries SEC(".maps");

/* Which keys may be in `entries`: see skactivate.h.  Replaced with it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, SKA_FILTER_WORDS(SKA_ENTRIES_MIN));
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} filter SEC(".maps");

/* Full-length entries of `entries`, some: see skactivate.h.  Replaced with
 * it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct ska_cache_line);
	__uint(max_entries, SKA_CACHE_LINES(SKA_ENTRIES_MIN));
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cache SEC(".maps");

/* The entries shorter than full length, used only when more prefix lengths
 * are in use than `ports` lists. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ska_binding_key);
	__type(value, struct ska_binding_value);
	__uint(max_entries, SKA_MAX_BINDINGS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bindings SEC(".maps");

/* destination id -> socket, an array: a hit indexes it instead of hashing the
 * id (about 8 ns less per hit than a SOCKHASH here).  The value is 8 bytes so
 * that a user-space lookup returns the socket's cookie, and ENOENT for an
 * empty slot (an update still takes an fd). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, SKA_MAX_DESTINATIONS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sockets SEC(".maps");

/* Names and ids; used only by user space, kept here so all state is pinned. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ska_destination_key);
	__type(value, struct ska_destination_value);
	__uint(max_entries, SKA_MAX_DESTINATIONS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} destinations SEC(".maps");

/* Destination id -> counters, per CPU.  Its first capacity; user space
 * replaces it by a bigger one, under a new program, before it gives out an
 * id past its end (see skactivate.h). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ska_metrics);
	__uint(max_entries, SKA_METRICS_MIN);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} metrics SEC(".maps");

/* Which kinds of entry exist per port, and the lengths in use: see skactivate.h. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, SKA_PORTS_WORDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ports SEC(".maps");

#define OFF(type, field) ((__u32)__builtin_offsetof(struct type, field))

/* Read by user space from the object file, never by the program. */
const struct ska_layout skactivate_layout SEC(".skactivate_layout") __attribute__((used)) = {
	.version = SKA_LAYOUT_VERSION,
	.binding_key_size = sizeof(struct ska_binding_key),
	.binding_value_size = sizeof(struct ska_binding_value),
	.destination_key_size = sizeof(struct ska_destination_key),
	.destination_value_size = sizeof(struct ska_destination_value),
	.metrics_size = sizeof(struct ska_metrics),
	.off_binding_key_protocol = OFF(ska_binding_key, protocol),
	.off_binding_key_port = OFF(ska_binding_key, port),
	.off_binding_key_family = OFF(ska_binding_key, family),
	.off_binding_key_addr = OFF(ska_binding_key, addr),
	.off_binding_value_prefixlen = OFF(ska_binding_value, prefixlen),
	.off_destination_key_family = OFF(ska_destination_key, family),
	.off_destination_key_protocol = OFF(ska_destination_key, protocol),
	.off_destination_value_refcount = OFF(ska_destination_value, refcount),
	.off_metrics_misses = OFF(ska_metrics, misses),
	.off_metrics_errors = OFF(ska_metrics, errors),
	.cache_line_size = sizeof(struct ska_cache_line),
};

/*
 * Every stack slot the program writes is written whole, 8 bytes at a time.
 * Verifiers without CAP_PERFMON refuse a narrower store into a slot that
 * holds a spilled register ("attempt to corrupt spilled pointer on stack"),
 * and Debian 11's 5.10 counts a 4-byte store of a non-zero scalar at an
 * 8-aligned offset as such a spill, so even a key built in 32-bit words fails
 * there as soon as its second word is written.  Hence the key is three u64
 * words, and the 4-byte map keys (`idx`, `dest`) live in u64 variables whose
 * low half the helpers read (the BPF target is little-endian here; see the
 * static assertion).
 */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
	       "the u64 words below assume a little-endian BPF target");

union ska_key_words {
	struct ska_binding_key key;
	__u64 q[sizeof(struct ska_binding_key) / 8];
};

/* The first word of a key: prefixlen, then protocol, port (network order)
 * and family at offsets 4..7. */
static __always_inline __u64 key_head(__u32 prefixlen, __u32 protocol, __u32 port, __u32 family)
{
	__u32 header = protocol | (port >> 8) << 8 | (port & 0xff) << 16 | family << 24;

	return (__u64)header << 32 | prefixlen;
}

/* The address mask of `bits` (< the family's full length) in the two address
 * words of a key, as they lie in memory (network order).  One form for both
 * families: an IPv4 address is the first four bytes of the key's. */
static __always_inline void prefix_mask(__u32 bits, __u64 *m1, __u64 *m2)
{
	if (bits >= 64) {
		*m1 = ~0ull;
		*m2 = bits > 64 ? __builtin_bswap64(~0ull << (128 - bits)) : 0;
	} else {
		*m1 = bits ? __builtin_bswap64(~0ull << (64 - bits)) : 0;
		*m2 = 0;
	}
}

/* 1 where x is 0, else 0, without a branch (the empty asm keeps the
 * compiler from making one). */
static __always_inline __u64 is_zero(__u64 x)
{
	__u64 r = (x | -x) >> 63;

	asm volatile("" : "+r"(r));
	return r ^ 1;
}

/* The destination + 1 of the key q0, q1, q2 (its hash h) where the `cache`
 * holds it, else 0.  Inlined at the two full-length probes; the shorter ones
 * call it as `cache_find`, below. */
static __always_inline int cache_lookup(__u64 q0, __u64 q1, __u64 q2, __u64 h)
{
	struct ska_cache_line *line;
	__u64 idx = 0, bucket, mask, tag, t0, t1, hit0, hit1;
	int b;

	line = bpf_map_lookup_elem(&cache, &idx);
	if (!line)
		return 0;
	bucket = h >> (line->w[0] & 63);
	mask = line->w[1];
	/* Each bucket costs one branch: whether either slot holds the key. */
#pragma unroll
	for (b = 0; b < 2; b++) {
		idx = 1 + bucket;
		line = bpf_map_lookup_elem(&cache, &idx);
		if (line) {
			t0 = line->w[3];
			t1 = line->w[7];
			hit0 = is_zero((line->w[0] ^ q0) | (line->w[1] ^ q1) | (line->w[2] ^ q2) |
				       (t0 ^ h) >> 16 | is_zero(t0 & SKA_CACHE_TAG_DEST));
			hit1 = is_zero((line->w[4] ^ q0) | (line->w[5] ^ q1) | (line->w[6] ^ q2) |
				       (t1 ^ h) >> 16 | is_zero(t1 & SKA_CACHE_TAG_DEST));
			if (hit0 | hit1) {
				tag = t1 ^ ((t0 ^ t1) & -hit0);
				return tag & SKA_CACHE_TAG_DEST;
			}
		}
		bucket ^= SKA_CACHE_OTHER(h, mask);
	}
	return 0;
}

/* cache_lookup as a global function: the verifier checks it once, on its
 * own, instead of at every probe and for every state that reaches one,
 * which doubled the time a fresh dispatcher takes to load. */
__attribute__((noinline)) int cache_find(__u64 q0, __u64 q1, __u64 q2, __u64 h)
{
	return cache_lookup(q0, q1, q2, h);
}

/* The entry of key k: its destination in *dest, or 0 where `entries` has
 * none.  The filter first (`bits`: log2 of its bits): a clear bit answers no.
 * Then the key's cache buckets, then the hash.  Inlined: as a function the
 * verifier checks once, it cost a call per probe (some 9 ns here).
 *
 * Every probe asks the cache, which holds entries of every length.  Each
 * branch the cache adds is walked again as a speculative path by verifiers
 * without CAP_PERFMON (the shipped unit's); an attempt with the cache
 * inlined at all ten probes (and the filter in the same array, read at a
 * variable offset, which 5.10 walks again too) passed a million
 * instructions on Debian 11's 5.10.  So the eight shorter probes read it
 * through a function of its own, `cache_find`, which the verifier checks
 * once: each adds a call and a test of its result (77 walked instructions
 * for the eight).  The two full-length probes, which every /32 and /128 hit
 * goes through, read it inlined (`full`): 7 to 10 ns less per such hit in
 * BPF_PROG_TEST_RUN, for some 0.3 ms more of verifying per load. */
static __always_inline int probe(const union ska_key_words *k, __u64 bits, __u64 *dest,
				 const int full)
{
	struct ska_binding_value *v;
	__u64 h, bit, idx, *word;

	h = SKA_FILTER_FOLD(k->q[0]) * SKA_FILTER_K0 + SKA_FILTER_FOLD(k->q[1]) * SKA_FILTER_K1 +
	    SKA_FILTER_FOLD(k->q[2]) * SKA_FILTER_K2;
	bit = h >> (64 - bits);
	idx = 1 + (bit >> 6);
	word = bpf_map_lookup_elem(&filter, &idx);
	if (word && !(*word >> (bit & 63) & 1))
		return 0;

	if (full)
		idx = cache_lookup(k->q[0], k->q[1], k->q[2], h);
	else
		idx = cache_find(k->q[0], k->q[1], k->q[2], h);
	if (idx) {
		*dest = idx - 1;
		return 1;
	}

	v = bpf_map_lookup_elem(&entries, k);
	if (!v)
		return 0;
	*dest = v->destination;
	return 1;
}

/* x, opaque to the compiler: a value it cannot see through, so that it
 * tests it as computed instead of splitting it back into the branches it
 * came from. */
static __always_inline __u64 opaque(__u64 x)
{
	asm volatile("" : "+r"(x));
	return x;
}

/*
 * The verifier walks every path through the program once for each state it
 * cannot prove equivalent to one it has walked: a value it learnt exactly
 * on a branch (a family, a protocol, "this port has specific entries") and
 * later tests again, or uses as a constant key, splits every path below
 * into one per value.  So what the program knows about the lookup (protocol
 * and family slot, which kinds of entry exist) is computed without
 * branches, each probe is decided by a value tested once, and a probe that
 * finds its entry goes straight to `hit`.  On 6.18 this took the verifier
 * from 5,001 walked instructions (289 states) to 1,950 (92), and its time
 * from about 8 ms to 3.5 (13 to 4.5 without CAP_PERFMON): most of what a
 * fresh dispatcher costs.  (Every probe asking the cache since made it
 * 2,027 and 99 states.)
 */
SEC("sk_lookup")
int skactivate_dispatch(struct bpf_sk_lookup *ctx)
{
	union ska_key_words k;
	struct ska_binding_value *v;
	struct ska_metrics *m;
	struct bpf_sock *sk;
	__u32 protocol = ctx->protocol;
	__u32 port = ctx->local_port; /* host order, below 65536 */
	__u32 family, pslot, fslot, full, len = 0, found = 0;
	__u64 idx, dest; /* 4-byte keys, read through their low half */
	__u64 w, a1, a2, m1, m2, lengths, nibbles, specific, wild, bits;
	__u64 *word;
	int err, i;

	/* The common miss first, in as few instructions as can be: the
	 * protocol's slot is bit 4 of its number (TCP 6: 0, UDP 17: 1); any
	 * other protocol is turned away below. */
	idx = (protocol >> 4 & 1) << 11 | port >> 5;
	word = bpf_map_lookup_elem(&ports, &idx);
	if (!word)
		return SK_PASS;
	w = *word;
	if (!(w & (1ull << (port & 31) | 3ull << SKA_PORTS_WILD_BIT)))
		return SK_PASS; /* one inlined array read */

	/* Each pointer a helper returns is tested exactly once, and what it
	 * points to is copied into scalars at once.  Verifiers without
	 * CAP_PERFMON (6.12 among them) also walk the branch a second test of a
	 * known-NULL pointer would not take, as a speculative path, and refuse
	 * the dereference they find there ("invalid mem access 'scalar'"). */
	/* TCP (6) or UDP (17), tested without learning which. */
	if (opaque(protocol) >= 32 ||
	    !(opaque((1u << IPPROTO_TCP | 1u << IPPROTO_UDP) >> opaque(protocol)) & 1))
		return SK_PASS;
	/* AF_INET (2) or AF_INET6 (10): the only values with family | 8 == 10. */
	family = ctx->family;
	if (opaque(family | 8) != (AF_INET6 | 8))
		return SK_PASS;
	pslot = opaque(protocol) >> 4 & 1;
	fslot = opaque(family) >> 3 & 1;
	full = SKA_KEY_V4_FULL_BITS + fslot * (SKA_KEY_V6_FULL_BITS - SKA_KEY_V4_FULL_BITS);
	/* The address is the first bytes of the key's in either family.  The
	 * family is read again to choose: the branch teaches the verifier
	 * nothing about `family` or `fslot`, and both paths meet again. */
	if (ctx->family == AF_INET6) {
		a1 = (__u64)ctx->local_ip6[1] << 32 | ctx->local_ip6[0];
		a2 = (__u64)ctx->local_ip6[3] << 32 | ctx->local_ip6[2];
	} else {
		a1 = ctx->local_ip4;
		a2 = 0;
	}
	/* Written on every path to `hit`: 5.10 without CAP_PERFMON walks a
	 * speculative one that skips the assignments ("invalid indirect read
	 * from stack"). */
	dest = 0;

	specific = opaque((w >> (port & 31)) & 1);
	wild = opaque((w >> (SKA_PORTS_WILD_BIT + fslot)) & 1);
	if (!opaque(specific | wild))
		return SK_PASS;

	/* Which lengths are in use, and which kinds of entry each has. */
	idx = SKA_PORTS_LENGTHS + (fslot << 1 | pslot);
	word = bpf_map_lookup_elem(&ports, &idx);
	if (!word)
		return SK_PASS;
	lengths = *word;

	nibbles = lengths >> SKA_LENGTHS_FILTER & 0xffff;
	if (nibbles) {
		/* Nibble n of the address, most significant first: of its first
		 * eight bytes (an IPv4 address's four among them) for n < 16. */
		__u64 n = lengths >> SKA_LENGTHS_NIBBLE & 15, high = lengths >> SKA_LENGTHS_NIBBLE >> 4 & 1;
		__u64 half = a1 ^ ((a1 ^ a2) & -high);

		if (nibbles >> (__builtin_bswap64(half) >> (60 - 4 * n) & 15) & 1)
			return SK_PASS; /* no entry has that nibble */
	}

	idx = 0;
	word = bpf_map_lookup_elem(&filter, &idx);
	if (!word)
		return SK_PASS;
	bits = *word & 63;

	k.q[1] = a1;
	k.q[2] = a2;
	if (opaque(specific & ~(lengths >> (SKA_LENGTHS_NO_SPECIFIC + SKA_LENGTHS_FULL)) & 1)) {
		k.q[0] = key_head(full, protocol, port, family);
		if (probe(&k, bits, &dest, 1))
			goto hit;
	}
	if (opaque(wild & ~(lengths >> (SKA_LENGTHS_NO_WILD + SKA_LENGTHS_FULL)) & 1)) {
		k.q[0] = key_head(full, protocol, 0, family);
		if (probe(&k, bits, &dest, 1))
			goto hit;
	}

	if (lengths & SKA_LENGTHS_TRIE) {
		/* Too many lengths: the trie of the shorter entries answers, the
		 * full-length address as its key. */
		if (specific) {
			k.q[0] = key_head(full, protocol, port, family);
			v = bpf_map_lookup_elem(&bindings, &k);
			if (v) {
				dest = v->destination;
				len = v->prefixlen;
				found = 1;
			}
		}
		if (wild) {
			k.q[0] = key_head(full, protocol, 0, family);
			v = bpf_map_lookup_elem(&bindings, &k);
			if (v) {
				__u32 wlen = v->prefixlen, wdest = v->destination;

				/* On equal length the specific port wins. */
				if (!found || wlen > len) {
					dest = wdest;
					found = 1;
				}
			}
		}
		if (!found)
			return SK_PASS;
		goto hit;
	}

#pragma unroll
	for (i = 0; i < SKA_MAX_LENGTHS; i++) {
		__u32 plen = (lengths >> (8 * i)) & 0xff;

		if (!plen)
			return SK_PASS;
		plen -= 1;
		prefix_mask(plen, &m1, &m2);
		k.q[1] = a1 & m1;
		k.q[2] = a2 & m2;
		if (opaque(specific & ~(lengths >> (SKA_LENGTHS_NO_SPECIFIC + i)) & 1)) {
			k.q[0] = key_head(SKA_KEY_HEADER_BITS + plen, protocol, port, family);
			if (probe(&k, bits, &dest, 0))
				goto hit;
		}
		if (opaque(wild & ~(lengths >> (SKA_LENGTHS_NO_WILD + i)) & 1)) {
			k.q[0] = key_head(SKA_KEY_HEADER_BITS + plen, protocol, 0, family);
			if (probe(&k, bits, &dest, 0))
				goto hit;
		}
	}
	return SK_PASS;

hit:
	m = bpf_map_lookup_elem(&metrics, &dest);
	if (!m)
		return SK_PASS; /* an id out of range: not ours to judge */
	m->lookups++;

	sk = bpf_map_lookup_elem(&sockets, &dest);
	if (!sk) {
		m->misses++;
		return SK_DROP;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		m->errors++;
		/* An earlier sk_lookup program in this netns already chose a socket:
		 * leave its choice in force rather than drop the packet. */
		return err == -17 /* EEXIST */ ? SK_PASS : SK_DROP;
	}
	return SK_PASS;
}

/*
 * Never attached: user space runs it (BPF_PROG_TEST_RUN) to write one
 * `ports` word with a single 8-byte store, so that the dispatcher, reading
 * the word on another CPU, sees the old value or the new one and nothing in
 * between. A write through the bpf() syscall copies the value with memcpy,
 * which may go byte by byte (`rep movsb`): a lengths word read half written
 * could list no length and not say "trie" either, and hide every shorter
 * entry for that moment. The word's index comes in local_port, its value in
 * local_ip6[0] (low half) and local_ip6[1] (high half).
 */
SEC("sk_lookup")
int skactivate_store_word(struct bpf_sk_lookup *ctx)
{
	__u64 idx = ctx->local_port; /* a 4-byte key, read through its low half */
	__u64 value = (__u64)ctx->local_ip6[1] << 32 | ctx->local_ip6[0];
	__u64 *word = bpf_map_lookup_elem(&ports, &idx);

	if (!word)
		return SK_DROP;
	*word = value;
	return SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
