// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * skactivate proxy: the verdict program of `skactivate proxy --mode sockmap`.
 *
 * Each proxied connection is two TCP sockets, the client's (accepted) and the
 * backend's (connected), both in `socks` under their socket cookies. The
 * program runs for every chunk of data that arrives on either socket and
 * sends it to the egress of the other one (bpf_sk_redirect_hash without
 * BPF_F_INGRESS): the bytes never reach user space.
 *
 * It redirects only while user space allows it; otherwise it passes the data
 * to the socket's own receive queue (SK_PASS), where the proxy reads it and
 * writes it on itself, in order. That happens
 *  - before user space has armed the side (`sides` has no entry yet),
 *  - after a pass, until user space has read everything passed so far
 *    (`passed == drained`): a pass never lets later bytes overtake earlier ones,
 *  - when this side has redirected `allowed` bytes. The kernel has no
 *    backpressure of its own for redirected data: a slow backend would make
 *    the redirect queue grow without bound. User space hands out credit as
 *    the peer's peer acknowledges (sk_skb programs may not look at TCP state).
 *    Passed data is charged to the receiving socket, so TCP flow control
 *    then holds the sender back.
 * Credit is renewed before it runs out: when this side's redirected bytes
 * reach `notify` (a quarter into the credit last handed out), the program
 * puts the side's cookie on the `credit` ring buffer, once per `notify`
 * value, and user space hands out more as far as the peer's peer has
 * acknowledged, waking once per quarter credit, not per chunk.
 *
 * A segment can overlap bytes the socket has already received (a
 * retransmission whose first part arrived before). TCP queues it whole and
 * leaves skipping the old head to the reader; the verdict path hands the
 * program the whole segment, old bytes included (sockmap.rs, "Known
 * defect"). ska_proxy_verdict_trim skips them itself: it reads the
 * segment's sequence number, remembers where the last one ended, and cuts
 * the bytes before that off the front. Reading the sequence number needs
 * bpf_probe_read_kernel, so CAP_PERFMON; ska_proxy_verdict is the same
 * program without it.
 * See skactivate/src/proxy/sockmap.rs for the user-space half.
 */
#include <linux/bpf.h>
#include <stdbool.h>
#include <bpf/bpf_helpers.h>

#define SKA_PROXY_MAX_SOCKETS 65536

/* Mirrored by proxy::sockmap::Side. Written by user space only. */
struct ska_proxy_side {
	__u64 peer;    /* the other socket's cookie, its key in `socks` */
	__u64 drained; /* passed bytes user space has read */
	__u64 allowed; /* redirect while redirected + len <= allowed */
	__u64 notify;  /* signal on `credit` once redirected >= notify; 0: never */
};

/* Mirrored by proxy::sockmap::Count. Written by this program only
 * (user space creates it zeroed). */
struct ska_proxy_count {
	__u64 redirected;
	__u64 passed;
	__u64 signalled; /* the `notify` value last signalled */
	__u64 trimmed;   /* old bytes cut off the front of segments */
	__u32 next;      /* the sequence number after the last byte seen */
	__u32 started;   /* 0: `next` not set yet; else 1 + the bytes cut off
			  * the segment being cut so far (see ska_trim) */
	__s32 error;     /* the last error cutting old bytes off, or 0 */
	__u32 failures;  /* segments whose old bytes could not all be cut */
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__type(key, __u64);
	__type(value, __u32);
	__uint(max_entries, SKA_PROXY_MAX_SOCKETS);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct ska_proxy_side);
	__uint(max_entries, SKA_PROXY_MAX_SOCKETS);
} sides SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct ska_proxy_count);
	__uint(max_entries, SKA_PROXY_MAX_SOCKETS);
} counts SEC(".maps");

/* ska_proxy_verdict_trim itself, at index 0 (user space puts it there):
 * a segment with more old bytes than one run can cut goes on being cut in
 * a tail call. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} again SEC(".maps");

/* Cookies of sides whose credit is a quarter used, or that began to pass
 * (a __u64 each): user space wakes that side's relay. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} credit SEC(".maps");

/* offsetof(struct sk_buff, cb), where TCP keeps the segment's sequence
 * number (TCP_SKB_CB(skb)->seq, the first word). The same on x86-64 from
 * 5.10 to 7.2 (their BTF); a kernel where it differs fails the overlap
 * check at start, and the proxy splices there. */
#define SKA_SKB_CB 40
/* bpf_skb_adjust_room removes at most this much per call. */
#define SKA_TRIM_STEP 4095
/* Steps per run: 68 KiB of old bytes. More steps make the verifier give
 * up (64 did, with E2BIG: the paths multiply). A longer old head (the
 * receive queue coalesces segments, so an skb can hold two or more that
 * came again) is cut on in tail calls of the program by itself, up to the
 * kernel's limit of 33 runs: 2.2 MiB. Longer still stays, and is caught. */
#define SKA_TRIM_STEPS 17

/* Cut off the bytes of this segment that the socket has seen before;
 * true if all of them were (then it is dropped). The first segment after
 * user space put the socket in the map starts at the first byte not yet
 * read: the proxy reads nothing before, so nothing older can be in the
 * queue. */
static __always_inline bool ska_trim(struct __sk_buff *skb, struct ska_proxy_count *c)
{
	__u32 seq, end, cut, len = skb->len;
	__s32 old;

	long err = bpf_probe_read_kernel(&seq, sizeof(seq), (void *)skb + SKA_SKB_CB);

	if (err) {
		/* Left whole: user space compares counts with TCP's. */
		c->error = err;
		c->failures++;
		if (c->started)
			c->started = 1;
		return false;
	}
	/* The segment's sequence number stays as it arrived while its head
	 * is cut off: a run in a tail call learns from `started` how much
	 * the runs before it cut. */
	cut = c->started ? c->started - 1 : 0;
	end = seq + len + cut;
	old = (__s32)(c->next - seq) - (__s32)cut;
	if (!c->started || old <= 0) {
		c->started = 1;
		c->next = end;
		return false;
	}
	/* Every byte seen before: the kernel hands over whole segments a
	 * second time, right after themselves. */
	if ((__u32)old >= len) {
		c->trimmed += len;
		c->started = 1;
		return true;
	}
	for (int i = 0; i < SKA_TRIM_STEPS && old > 0; i++) {
		__s32 n = old > SKA_TRIM_STEP ? SKA_TRIM_STEP : old;

		err = bpf_skb_adjust_room(skb, -n, 0, 0);
		if (err) {
			c->error = err;
			break;
		}
		old -= n;
		cut += n;
		c->trimmed += n;
	}
	if (old > 0 && !err) {
		c->started = 1 + cut;
		bpf_tail_call(skb, &again, 0);
		/* Not taken: the kernel's limit of tail calls, or no program. */
	}
	c->started = 1;
	if (old > 0)
		c->failures++;
	/* Whatever could not be cut stays, and makes the counts exceed what
	 * TCP received: user space resets the connection. */
	c->next = end;
	return false;
}

static __always_inline int ska_verdict(struct __sk_buff *skb, bool trim)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct ska_proxy_count *c = bpf_map_lookup_elem(&counts, &cookie);
	struct ska_proxy_side *s = bpf_map_lookup_elem(&sides, &cookie);
	__u64 len;

	/* A bare FIN arrives as an skb without data. Redirected, the target's
	 * send path would count zero bytes sent as a broken pipe and fail the
	 * socket; passed, it would read as an early end. It carries no byte,
	 * and the socket's own state says EOF: drop it. */
	if (skb->len == 0)
		return SK_DROP;
	if (!c)
		return SK_PASS;
	if (trim && ska_trim(skb, c))
		return SK_DROP;
	len = skb->len;
	/* One verdict at a time per socket (the socket's lock), so the
	 * counters need no atomics; user space only reads them. */
	if (!s || c->passed != s->drained || c->redirected + len > s->allowed)
		goto pass;
	c->redirected += len;
	/* Signalled once per `notify` value; a signal a full ring refused is
	 * tried again with the next chunk (user space sizes the ring so that it
	 * does not fill: proxy::sockmap::ring_size). */
	if (s->notify && c->redirected >= s->notify && c->signalled != s->notify &&
	    bpf_ringbuf_output(&credit, &cookie, sizeof(cookie), 0) == 0)
		c->signalled = s->notify;
	return bpf_sk_redirect_hash(skb, &socks, &s->peer, 0);
pass:
	/* The first byte passed since user space read everything passed:
	 * wake it (it does not wait on the socket's readability, which the
	 * kernel signals for every redirected chunk as well). Bytes passed
	 * after it are read with it; before `sides` exists user space looks
	 * by itself. */
	if (s && c->passed == s->drained)
		bpf_ringbuf_output(&credit, &cookie, sizeof(cookie), 0);
	c->passed += len;
	return SK_PASS;
}

SEC("sk_skb/stream_verdict")
int ska_proxy_verdict(struct __sk_buff *skb)
{
	return ska_verdict(skb, false);
}

SEC("sk_skb/stream_verdict")
int ska_proxy_verdict_trim(struct __sk_buff *skb)
{
	return ska_verdict(skb, true);
}

char _license[] SEC("license") = "Dual MIT/GPL";
