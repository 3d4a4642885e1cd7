// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The benchmarks' reference dispatcher: the plain single-trie design of
 * Cloudflare's tubular, written here from its description, so that
 * benches/dispatcher.rs can hold skactivate's dispatcher against it in the
 * same run. It never ships: build.rs compiles it next to the dispatcher and
 * only the benchmark embeds it.
 *
 * One LPM trie keyed {prefixlen, protocol, port, address}, the address
 * IPv4-mapped for IPv4 (::ffff:a.b.c.d), packed as tubular packs it; a `*`
 * binding is stored with port 0. As tubular does, every lookup asks the trie
 * twice, with the connection's port and with port 0, and keeps the longer
 * match (the specific port on equal length); then it counts the lookup in a
 * per-CPU array of counters per destination, takes the destination's socket
 * from a SOCKMAP and assigns it. The value is the destination's index and the
 * binding's prefix length.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

#define REF_MAX_BINDINGS (1u << 20)
#define REF_MAX_SOCKETS 1024

struct ref_key {
	__u32 prefixlen;
	__u8 protocol;
	__u16 port; /* network byte order; 0 means every port */
	__u8 addr[16];
} __attribute__((packed));

struct ref_binding {
	__u32 id;
	__u32 prefixlen;
};

struct ref_metrics {
	__u64 lookups;
	__u64 misses;
	__u64 errors;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, REF_MAX_BINDINGS);
	__type(key, struct ref_key);
	__type(value, struct ref_binding);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ref_bindings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, REF_MAX_SOCKETS);
	__type(key, __u32);
	__type(value, __u64);
} ref_sockets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, REF_MAX_SOCKETS);
	__type(key, __u32);
	__type(value, struct ref_metrics);
} ref_metrics SEC(".maps");

SEC("sk_lookup")
int reference_dispatcher(struct bpf_sk_lookup *ctx)
{
	struct ref_key key = {
		.prefixlen = (1 + 2 + 16) * 8,
		.protocol = ctx->protocol,
		.port = bpf_htons(ctx->local_port),
	};

	if (ctx->family == AF_INET) {
		__u32 a = ctx->local_ip4;

		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &a, 4);
	} else if (ctx->family == AF_INET6) {
		__u32 a[4] = { ctx->local_ip6[0], ctx->local_ip6[1],
			       ctx->local_ip6[2], ctx->local_ip6[3] };

		__builtin_memcpy(key.addr, a, 16);
	} else {
		return SK_PASS;
	}

	const struct ref_binding *bind = bpf_map_lookup_elem(&ref_bindings, &key);

	key.port = 0;
	const struct ref_binding *wild = bpf_map_lookup_elem(&ref_bindings, &key);

	/* The longer prefix wins; on equal length the specific port. */
	if (!bind || (wild && wild->prefixlen > bind->prefixlen))
		bind = wild;
	if (!bind)
		return SK_PASS;

	struct ref_metrics *m = bpf_map_lookup_elem(&ref_metrics, &bind->id);
	if (!m)
		return SK_DROP;
	m->lookups++;

	struct bpf_sock *sk = bpf_map_lookup_elem(&ref_sockets, &bind->id);
	if (!sk) {
		m->misses++;
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		m->errors++;
		return SK_DROP;
	}
	return SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
