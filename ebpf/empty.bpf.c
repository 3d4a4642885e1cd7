// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The benchmarks' baseline: an sk_lookup program that does nothing and passes.
 * Its BPF_PROG_TEST_RUN duration is the cost of running any program at all on
 * this machine, the floor the dispatcher's miss path is held against.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("sk_lookup")
int skactivate_empty(struct bpf_sk_lookup *ctx)
{
	return SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
