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
 * binding is stored with port 0. A lookup asks the trie twice: with the
 * connection's port, then with port 0. The value is an index into a
 * SOCKMAP; the socket found there is assigned.
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

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, REF_MAX_BINDINGS);
	__type(key, struct ref_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} ref_bindings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, REF_MAX_SOCKETS);
	__type(key, __u32);
	__type(value, __u64);
} ref_sockets SEC(".maps");

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

	__u32 *index = bpf_map_lookup_elem(&ref_bindings, &key);
	if (!index) {
		key.port = 0;
		index = bpf_map_lookup_elem(&ref_bindings, &key);
		if (!index)
			return SK_PASS;
	}

	struct bpf_sock *sk = bpf_map_lookup_elem(&ref_sockets, index);
	if (!sk)
		return SK_DROP;
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
