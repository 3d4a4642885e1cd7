// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The benchmarks' hit floor: an sk_lookup program that finds nothing, takes
 * socket 0 of a SOCKMAP and assigns it. Every dispatcher that steers a
 * connection pays at least this (an sk_lookup program can get a socket only
 * from a SOCKMAP or SOCKHASH, and must assign and release it), and so does
 * BPF_PROG_TEST_RUN for a run that selects a socket. benches/dispatcher.rs
 * times it beside the dispatchers on every hit, so that a hit's figure can be
 * split into what finding the binding costs and what no lookup design can
 * remove. Never shipped: only the benchmark embeds it.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} floor_sockets SEC(".maps");

SEC("sk_lookup")
int skactivate_floor(struct bpf_sk_lookup *ctx)
{
	__u32 idx = 0;
	struct bpf_sock *sk = bpf_map_lookup_elem(&floor_sockets, &idx);
	long err;

	if (!sk)
		return SK_DROP;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
