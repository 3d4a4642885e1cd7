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
 * host), so the `ports` array answers "can any binding match this port?" with
 * one inlined array read before the trie is touched, and the wildcard lookup
 * only happens when wildcard bindings exist for the protocol.
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
	__type(key, struct ska_destination_key);
	__type(value, struct ska_destination_value);
	__uint(max_entries, SKA_MAX_DESTINATIONS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} destinations SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ska_metrics);
	__uint(max_entries, SKA_MAX_DESTINATIONS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} metrics SEC(".maps");

/* slot << 16 | port -> number of trie entries with that protocol and port;
 * port 0 counts the protocol's wildcard entries. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, SKA_PORTS_ENTRIES);
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
};

SEC("sk_lookup")
int skactivate_dispatch(struct bpf_sk_lookup *ctx)
{
	struct ska_binding_key key = {};
	struct ska_binding_value *match = NULL, *wild;
	struct ska_metrics *m;
	struct bpf_sock *sk;
	__u32 slot, idx, dest, full, port = ctx->local_port;
	__u32 *specific_count, *wild_count;
	__u32 *addr = (__u32 *)key.addr;
	int err;

	if (ctx->protocol == IPPROTO_TCP)
		slot = SKA_PORT_SLOT_TCP;
	else if (ctx->protocol == IPPROTO_UDP)
		slot = SKA_PORT_SLOT_UDP;
	else
		return SK_PASS;

	idx = slot << 16 | (port & 0xffff);
	specific_count = bpf_map_lookup_elem(&ports, &idx);
	idx = slot << 16;
	wild_count = bpf_map_lookup_elem(&ports, &idx);
	if (!specific_count || !wild_count)
		return SK_PASS;
	if (!*specific_count && !*wild_count)
		return SK_PASS; /* the common miss: one array read, no trie */

	key.protocol = ctx->protocol;
	key.family = ctx->family;
	if (ctx->family == AF_INET) {
		key.prefixlen = full = SKA_KEY_V4_FULL_BITS;
		addr[0] = ctx->local_ip4;
	} else if (ctx->family == AF_INET6) {
		key.prefixlen = full = SKA_KEY_V6_FULL_BITS;
		addr[0] = ctx->local_ip6[0];
		addr[1] = ctx->local_ip6[1];
		addr[2] = ctx->local_ip6[2];
		addr[3] = ctx->local_ip6[3];
	} else {
		return SK_PASS;
	}

	if (*specific_count) {
		key.port[0] = port >> 8;
		key.port[1] = port;
		match = bpf_map_lookup_elem(&bindings, &key);
		/* A full-length prefix cannot be beaten by the wildcard. */
		if (match && match->prefixlen == full)
			goto found;
	}
	if (*wild_count) {
		key.port[0] = 0;
		key.port[1] = 0;
		wild = bpf_map_lookup_elem(&bindings, &key);
		/* Equal length: the specific port wins, so only a longer one replaces. */
		if (wild && (!match || wild->prefixlen > match->prefixlen))
			match = wild;
	}
	if (!match)
		return SK_PASS;

found:
	dest = match->destination;
	m = bpf_map_lookup_elem(&metrics, &dest);
	if (m)
		m->lookups++;

	sk = bpf_map_lookup_elem(&sockets, &dest);
	if (!sk) {
		if (m)
			m->misses++;
		return SK_DROP;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		if (m)
			m->errors++;
		/* An earlier sk_lookup program in this netns already chose a socket:
		 * leave its choice in force rather than drop the packet. */
		return err == -17 /* EEXIST */ ? SK_PASS : SK_DROP;
	}
	return SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
