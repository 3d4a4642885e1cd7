// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * passdup: does the kernel deliver every byte once, in order, through an
 * sk_skb verdict program that passes everything (SK_PASS)?
 *
 * Stand-alone, no skactivate code and no libbpf: the programs are written
 * as raw instructions and loaded with bpf(2). Three threads on loopback:
 *
 *   client --TCP--> copier --TCP--> backend
 *
 * The copier accepts the client's connection, puts that socket into a
 * SOCKHASH whose stream verdict program returns SK_PASS for every skb with
 * data (SK_DROP for a bare FIN, as skactivate's proxy does), then reads it
 * with recv(2) and writes what it reads to the backend: everything it reads
 * went through the psock's pass path (sk_psock_verdict_recv ->
 * sk_psock_skb_ingress_self -> ingress_msg -> tcp_bpf_recvmsg_parser).
 * The client writes a pattern whose every byte depends on its offset; the
 * backend checks every byte and, at the first wrong one, says which offset
 * the bytes it got instead belong to.
 *
 * The copier runs on CPU 0, the client and the backend on CPU 1 (on
 * loopback the receive softirq runs on the sender's CPU), unless told
 * otherwise. A transfer that does not finish within --stall seconds is
 * reported as stalled.
 *
 * With --overlap it asks the question directly, in a few milliseconds: a
 * TCP peer of its own on a TUN device sends bytes [0, 1000), then one
 * segment with bytes [500, 2000), which overlaps what was received; the
 * reader must get 2000 bytes. (Needs /dev/net/tun; uses 192.0.2.0/24.)
 * --repair asks the same on loopback, without TUN: two sockets made
 * established towards each other with TCP_REPAIR, the receiver told it
 * already has the first 500 bytes of the sender's first segment.
 *
 * With --redirect the program instead redirects every skb to the egress of
 * the copier's socket towards the backend (bpf_sk_redirect_hash, no
 * BPF_F_INGRESS) and user space copies nothing: the redirect path.
 *
 * Each transfer's time is printed, and the median. --sndbuf fixes that socket's send buffer
 * (SO_SNDBUFFORCE): the kernel worker that sends redirected bytes
 * (sk_psock_backlog) meets a full send queue, and how long it then waits
 * shows in the time (docs/kernel-report-sockmap-backlog-pause.md).
 * After each redirect transfer the copier takes its socket out of the
 * SOCKHASH and asks SIOCINQ, which for a plain TCP socket is rcv_nxt minus
 * copied_seq: everything was redirected, so it should be 0; a copier
 * blocked in recv(2) meanwhile (the default; not with --nonblocking) rolls
 * copied_seq back on kernels with that defect
 * (docs/kernel-report-sockmap-copied-seq-rollback.md).
 *
 * Besides the bytes, it reports what tells where they went wrong: the
 * verdict program counts the bytes it is handed, marks each skb it has
 * given a verdict on (skb->priority, writable from sk_skb) and counts the
 * bytes of skbs it finds marked, and watches for two verdicts running at
 * once on the socket (a flag taken with BPF_CMPXCHG, Linux 5.12; without
 * it, it only counts); the client reports how many segments its TCP
 * retransmitted. What it found on Linux 6.18 is in skactivate's
 * skactivate/src/proxy/sockmap.rs ("Known defect").
 *
 * Exit status: 0 every transfer right, 1 a transfer wrong or stalled,
 * 2 could not run (no BPF, no second CPU, ...).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum mode { VERDICT, PARSER, NO_PROGRAM, REDIRECT };

static struct {
	size_t bytes;
	int runs;
	size_t buf;
	int nonblocking;
	enum mode mode;
	int copier_cpu, client_cpu, backend_cpu;
	unsigned stall;
	int overlap;
	int sndbuf;

} opt = {
	.bytes = (size_t)1024 << 20,
	.runs = 8,
	.buf = 256 * 1024,
	.mode = VERDICT,
	.copier_cpu = 0,
	.client_cpu = 1,
	.backend_cpu = 1,
	.stall = 60,
};

static uint8_t *pattern;
static int backend_listener, copier_listener, seen_again, overlapped, behind;
/* --redirect: the copier says on it that the socket is in the SOCKHASH, and
 * the client writes only then. A byte that came before would wait in the
 * receive queue, be read by the copier and written after bytes the program
 * redirected meanwhile: out of order through no fault of the kernel's (it
 * happened once in six transfers under 5.10). */
static int go[2];
static struct tcp_info client_info;
static unsigned long retransmitted, retransmitted_wrong;
static const uint16_t BACKEND_PORT = 9000, COPIER_PORT = 8000;

static uint8_t byte_at(uint64_t off)
{
	uint64_t word = off / 8;
	return (uint8_t)(word >> (8 * (off % 8))) ^ (uint8_t)(word * 131);
}

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static void pin(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		die("sched_setaffinity");
}

static long sys_bpf(int cmd, union bpf_attr *attr)
{
	return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

/* Loads a program; exits unless `may_fail`, then returns -1. */
static int load(const struct bpf_insn *insns, unsigned count, const char *what, int may_fail)
{
	static char log[8192];
	union bpf_attr attr;
	int fd;

	memset(&attr, 0, sizeof(attr));
	attr.prog_type = BPF_PROG_TYPE_SK_SKB;
	attr.insns = (uintptr_t)insns;
	attr.insn_cnt = count;
	attr.license = (uintptr_t)"Dual MIT/GPL";
	attr.log_buf = (uintptr_t)log;
	attr.log_size = sizeof(log);
	attr.log_level = 1;
	fd = sys_bpf(BPF_PROG_LOAD, &attr);
	if (fd < 0 && may_fail)
		return -1;
	if (fd < 0) {
		fprintf(stderr, "loading the %s program: %s\n%s", what, strerror(errno), log);
		exit(2);
	}
	return fd;
}

static void attach(int map, int prog, enum bpf_attach_type type, const char *what)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.target_fd = map;
	attr.attach_bpf_fd = prog;
	attr.attach_type = type;
	if (sys_bpf(BPF_PROG_ATTACH, &attr)) {
		fprintf(stderr, "attaching the %s program: %s\n", what, strerror(errno));
		exit(2);
	}
}

/*
 * u64 counters: [0] bytes the verdict program passed on its first verdict on
 * an skb, [1] bytes of skbs it had given a verdict before (marked, below),
 * [2] a flag held while a verdict runs, [3] verdicts that began while
 * another was running on the same socket (the socket's lock should make
 * that impossible).
 */
static int counters_map = -1, no_overlap_check;
enum { FIRST, AGAIN, RUNNING, OVERLAPS, COUNTERS };

/* What the program writes into skb->priority (writable from sk_skb) on its
 * first verdict on an skb, so that another verdict on the same skb knows. */
#define SEEN_MARK 0x5ca7ac7d

#define INSN(c, d, s, o, i) { .code = (c), .dst_reg = (d), .src_reg = (s), .off = (o), .imm = (i) }
#define MAP_FD(d, fd) INSN(BPF_LD | BPF_DW | BPF_IMM, d, BPF_PSEUDO_MAP_FD, 0, fd), INSN(0, 0, 0, 0, 0)

/* A SOCKHASH with the programs of opt.mode attached. */
static int sockhash(void)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_type = BPF_MAP_TYPE_ARRAY;
	attr.key_size = sizeof(uint32_t);
	attr.value_size = sizeof(uint64_t);
	attr.max_entries = COUNTERS;
	counters_map = sys_bpf(BPF_MAP_CREATE, &attr);
	if (counters_map < 0)
		die("creating the counters");
	/*
	 * if (!skb->len) return SK_DROP;            (a bare FIN, as skactivate does)
	 * if (cmpxchg(&counters[RUNNING], 0, 1)) counters[OVERLAPS]++;
	 * again = skb->priority == SEEN_MARK; skb->priority = SEEN_MARK;
	 * counters[again ? AGAIN : FIRST] += skb->len;
	 * release RUNNING if taken;
	 * return SK_PASS;
	 * (BPF_CMPXCHG: Linux 5.12 and later.)
	 */
	const struct bpf_insn verdict[] = {
		/* 0 */ INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_6, BPF_REG_1, 0, 0),
		/* 1 */ INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_7, BPF_REG_6, offsetof(struct __sk_buff, len), 0),
		/* 2 */ INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_7, 0, 43, 0), /* -> 46 */
		/* 3 */ INSN(BPF_ST | BPF_MEM | BPF_W, BPF_REG_10, 0, -4, RUNNING),
		/* 4 */ MAP_FD(BPF_REG_1, counters_map),
		/* 6 */ INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_2, BPF_REG_10, 0, 0),
		/* 7 */ INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_2, 0, 0, -4),
		/* 8 */ INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_map_lookup_elem),
		/* 9 */ INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 36, 0), /* -> 46 */
		/* 10 */ INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_8, BPF_REG_0, 0, 0),
		/* 11 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, 0),
		/* 12 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_1, 0, 0, 1),
		/* 13 */ INSN(BPF_STX | BPF_ATOMIC | BPF_DW, BPF_REG_8, BPF_REG_1, 0, BPF_CMPXCHG),
		/* 14 */ INSN(BPF_STX | BPF_MEM | BPF_DW, BPF_REG_10, BPF_REG_0, -16, 0),
		/* 15 */ INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 9, 0), /* -> 25 */
		/* 16 */ INSN(BPF_ST | BPF_MEM | BPF_W, BPF_REG_10, 0, -4, OVERLAPS),
		/* 17 */ MAP_FD(BPF_REG_1, counters_map),
		/* 19 */ INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_2, BPF_REG_10, 0, 0),
		/* 20 */ INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_2, 0, 0, -4),
		/* 21 */ INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_map_lookup_elem),
		/* 22 */ INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 2, 0), /* -> 25 */
		/* 23 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_1, 0, 0, 1),
		/* 24 */ INSN(BPF_STX | BPF_ATOMIC | BPF_DW, BPF_REG_0, BPF_REG_1, 0, BPF_ADD),
		/* 25 */ INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_2, BPF_REG_6, offsetof(struct __sk_buff, priority), 0),
		/* 26 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_9, 0, 0, FIRST),
		/* 27 */ INSN(BPF_JMP | BPF_JNE | BPF_K, BPF_REG_2, 0, 2, SEEN_MARK), /* -> 30 */
		/* 28 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_9, 0, 0, AGAIN),
		/* 29 */ INSN(BPF_JMP | BPF_JA, 0, 0, 2, 0), /* -> 32 */
		/* 30 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_1, 0, 0, SEEN_MARK),
		/* 31 */ INSN(BPF_STX | BPF_MEM | BPF_W, BPF_REG_6, BPF_REG_1, offsetof(struct __sk_buff, priority), 0),
		/* 32 */ INSN(BPF_STX | BPF_MEM | BPF_W, BPF_REG_10, BPF_REG_9, -4, 0),
		/* 33 */ MAP_FD(BPF_REG_1, counters_map),
		/* 35 */ INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_2, BPF_REG_10, 0, 0),
		/* 36 */ INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_2, 0, 0, -4),
		/* 37 */ INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_map_lookup_elem),
		/* 38 */ INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 1, 0), /* -> 40 */
		/* 39 */ INSN(BPF_STX | BPF_ATOMIC | BPF_DW, BPF_REG_0, BPF_REG_7, 0, BPF_ADD),
		/* 40 */ INSN(BPF_LDX | BPF_MEM | BPF_DW, BPF_REG_1, BPF_REG_10, -16, 0),
		/* 41 */ INSN(BPF_JMP | BPF_JNE | BPF_K, BPF_REG_1, 0, 2, 0), /* -> 44 */
		/* 42 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_1, 0, 0, 0),
		/* 43 */ INSN(BPF_STX | BPF_MEM | BPF_DW, BPF_REG_8, BPF_REG_1, 0, 0),
		/* 44 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, SK_PASS),
		/* 45 */ INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
		/* 46 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, SK_DROP),
		/* 47 */ INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
	};
	/* The same without the overlap check and the mark: counters[FIRST] += skb->len. */
	const struct bpf_insn plain_verdict[] = {
		/* 0 */ INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_6, BPF_REG_1, 0, 0),
		/* 1 */ INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_7, BPF_REG_6, offsetof(struct __sk_buff, len), 0),
		/* 2 */ INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_7, 0, 10, 0), /* -> 13 */
		/* 3 */ INSN(BPF_ST | BPF_MEM | BPF_W, BPF_REG_10, 0, -4, FIRST),
		/* 4 */ MAP_FD(BPF_REG_1, counters_map),
		/* 6 */ INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_2, BPF_REG_10, 0, 0),
		/* 7 */ INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_2, 0, 0, -4),
		/* 8 */ INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_map_lookup_elem),
		/* 9 */ INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 1, 0), /* -> 11 */
		/* 10 */ INSN(BPF_STX | BPF_XADD | BPF_DW, BPF_REG_0, BPF_REG_7, 0, 0),
		/* 11 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, SK_PASS),
		/* 12 */ INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
		/* 13 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, SK_DROP),
		/* 14 */ INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
	};
	int map, prog;

	/* A message is whatever has arrived: return skb->len. */
	static const struct bpf_insn parser[] = {
		{ .code = BPF_LDX | BPF_MEM | BPF_W, .dst_reg = BPF_REG_0, .src_reg = BPF_REG_1,
		  .off = offsetof(struct __sk_buff, len) },
		{ .code = BPF_JMP | BPF_EXIT },
	};

	memset(&attr, 0, sizeof(attr));
	attr.map_type = BPF_MAP_TYPE_SOCKHASH;
	attr.key_size = sizeof(uint64_t);
	attr.value_size = sizeof(uint32_t);
	attr.max_entries = 4;
	map = sys_bpf(BPF_MAP_CREATE, &attr);
	if (map < 0)
		die("creating the SOCKHASH");
	if (opt.mode == NO_PROGRAM)
		return map;
	if (opt.mode == REDIRECT) {
		/*
		 * counters[FIRST] += skb->len; return bpf_sk_redirect_hash(skb, map, &1, 0):
		 * to the egress of the socket under key 1, the copier's to the backend.
		 */
		const struct bpf_insn redirect[] = {
			/* 0 */ INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_6, BPF_REG_1, 0, 0),
			/* 1 */ INSN(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_7, BPF_REG_6, offsetof(struct __sk_buff, len), 0),
			/* 2 */ INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_7, 0, 17, 0), /* -> 20 */
			/* 3 */ INSN(BPF_ST | BPF_MEM | BPF_DW, BPF_REG_10, 0, -8, 1),
			/* 4 */ INSN(BPF_ST | BPF_MEM | BPF_W, BPF_REG_10, 0, -12, FIRST),
			/* 5 */ MAP_FD(BPF_REG_1, counters_map),
			/* 7 */ INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_2, BPF_REG_10, 0, 0),
			/* 8 */ INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_2, 0, 0, -12),
			/* 9 */ INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_map_lookup_elem),
			/* 10 */ INSN(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 1, 0), /* -> 12 */
			/* 11 */ INSN(BPF_STX | BPF_XADD | BPF_DW, BPF_REG_0, BPF_REG_7, 0, 0),
			/* 12 */ INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_1, BPF_REG_6, 0, 0),
			/* 13 */ MAP_FD(BPF_REG_2, map),
			/* 15 */ INSN(BPF_ALU64 | BPF_MOV | BPF_X, BPF_REG_3, BPF_REG_10, 0, 0),
			/* 16 */ INSN(BPF_ALU64 | BPF_ADD | BPF_K, BPF_REG_3, 0, 0, -8),
			/* 17 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_4, 0, 0, 0),
			/* 18 */ INSN(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_sk_redirect_hash),
			/* 19 */ INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
			/* 20 */ INSN(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, SK_DROP),
			/* 21 */ INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
		};

		no_overlap_check = 1;
		attach(map, load(redirect, sizeof(redirect) / sizeof(redirect[0]), "redirect", 0),
		       BPF_SK_SKB_STREAM_VERDICT, "redirect");
		return map;
	}
	if (opt.mode == PARSER)
		attach(map, load(parser, 2, "parser", 0), BPF_SK_SKB_STREAM_PARSER, "parser");
	prog = load(verdict, sizeof(verdict) / sizeof(verdict[0]), "verdict", 1);
	if (prog < 0) {
		/* BPF_CMPXCHG came in Linux 5.12: count without watching for overlaps. */
		no_overlap_check = 1;
		prog = load(plain_verdict, sizeof(plain_verdict) / sizeof(plain_verdict[0]), "verdict", 0);
	}
	attach(map, prog, BPF_SK_SKB_STREAM_VERDICT, "verdict");
	return map;
}

static struct sockaddr_in loopback(uint16_t port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

static int listener(uint16_t port)
{
	struct sockaddr_in a = loopback(port);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;

	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, 4))
		die("listening on loopback");
	return fd;
}

static int connected(uint16_t port)
{
	struct sockaddr_in a = loopback(port);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)))
		die("connecting on loopback");
	return fd;
}

static void write_all(int fd, const uint8_t *p, size_t n, const char *who)
{
	while (n) {
		ssize_t w = write(fd, p, n);

		if (w <= 0)
			die(who);
		p += w;
		n -= (size_t)w;
	}
}

/* Reads to EOF; returns 0 when every byte came once and in order. */
static void *backend(void *unused)
{
	static uint8_t buf[1 << 20];
	uint64_t off = 0;
	long wrong = -1;
	int fd;

	(void)unused;
	pin(opt.backend_cpu);
	fd = accept4(backend_listener, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0)
		die("backend accept");
	for (;;) {
		ssize_t n = read(fd, buf, sizeof(buf)), i = 0;

		if (n < 0)
			die("backend read");
		if (n == 0)
			break;
		if (wrong < 0 && off + (size_t)n > opt.bytes) {
			wrong = (long)opt.bytes;
		} else if (wrong < 0 && memcmp(buf, pattern + off, (size_t)n)) {
			while (buf[i] == pattern[off + i])
				i++;
			wrong = (long)(off + i);
			if (n - i >= 64) {
				uint64_t from = off + i > (16u << 20) ? off + i - (16u << 20) : 0;
				uint8_t *seen = memmem(pattern + from, off + i - from + 64, buf + i, 64);

				if (seen)
					printf("  at offset %ld: the bytes of offset %ld again (%ld back)\n",
					       wrong, (long)(seen - pattern), wrong - (long)(seen - pattern));
				else
					printf("  at offset %ld: bytes not from the 16 MiB before\n", wrong);
			}
		}
		off += (uint64_t)n;
	}
	close(fd);
	if (off != opt.bytes || wrong >= 0) {
		printf("  wrong: received %lu bytes of %zu, first wrong byte at offset %ld\n",
		       (unsigned long)off, opt.bytes, wrong);
		return (void *)1;
	}
	return NULL;
}

static void *client(void *unused)
{
	int fd;
	char c;

	(void)unused;
	pin(opt.client_cpu);
	fd = connected(COPIER_PORT);
	if (opt.mode == REDIRECT && read(go[0], &c, 1) != 1)
		die("client waiting for the copier");
	write_all(fd, pattern, opt.bytes, "client write");
	if (shutdown(fd, SHUT_WR))
		die("client shutdown");
	if (read(fd, &c, 1) < 0)
		die("client read");
	socklen_t len = sizeof(client_info);
	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &client_info, &len))
		die("TCP_INFO");
	close(fd);
	return NULL;
}

static void stalled(int sig)
{
	static const char msg[] = "  stalled: a transfer did not finish in time\n";

	(void)sig;
	if (write(STDOUT_FILENO, msg, sizeof(msg) - 1) < 0)
		_exit(1);
	_exit(1);
}

static uint64_t counter(uint32_t key, const uint64_t *set)
{
	union bpf_attr attr;
	uint64_t value = set ? *set : 0;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = (uint32_t)counters_map;
	attr.key = (uintptr_t)&key;
	attr.value = (uintptr_t)&value;
	if (sys_bpf(set ? BPF_MAP_UPDATE_ELEM : BPF_MAP_LOOKUP_ELEM, &attr))
		die("the counters");
	return value;
}

/* One transfer; returns 1 if it went wrong. */
static void insert(int map, uint64_t key, int fd)
{
	union bpf_attr attr;
	uint32_t value = (uint32_t)fd;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = (uint32_t)map;
	attr.key = (uintptr_t)&key;
	attr.value = (uintptr_t)&value;
	attr.flags = BPF_ANY;
	if (sys_bpf(BPF_MAP_UPDATE_ELEM, &attr))
		die("adding a socket to the SOCKHASH");
}

static void take_out(int map, uint64_t key)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = (uint32_t)map;
	attr.key = (uintptr_t)&key;
	if (sys_bpf(BPF_MAP_DELETE_ELEM, &attr))
		die("taking a socket out of the SOCKHASH");
}

/* Bytes the peer of `fd` has acknowledged: tcpi_bytes_acked (Linux 4.1),
 * which glibc's struct tcp_info does not have; the kernel's layout up to it. */
static uint64_t acked(int fd)
{
	struct {
		uint8_t head[8];
		uint32_t u32s[24];
		uint64_t pacing_rate, max_pacing_rate, bytes_acked;
	} info;
	socklen_t len = sizeof(info);

	if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &len))
		die("TCP_INFO");
	return info.bytes_acked;
}

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Each transfer's time, from the client's connection to the backend's EOF;
 * the first 1024. */
static double transfer_seconds[1024];

static int by_value(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static int transfer(int map, uint64_t key, uint8_t *buf)
{
	pthread_t b, c;
	void *result;
	int from, to;
	double start = now();
	const uint64_t run = key;

	if (pthread_create(&b, NULL, backend, NULL) || pthread_create(&c, NULL, client, NULL))
		die("pthread_create");
	from = accept4(copier_listener, NULL, NULL, SOCK_CLOEXEC);
	if (from < 0)
		die("copier accept");
	to = connected(BACKEND_PORT);
	/* The kernel doubles what it is given, as for SO_SNDBUF. */
	if (opt.sndbuf) {
		int half = opt.sndbuf / 2, got;
		socklen_t len = sizeof(got);

		if (setsockopt(to, SOL_SOCKET, SO_SNDBUFFORCE, &half, sizeof(half)) ||
		    getsockopt(to, SOL_SOCKET, SO_SNDBUF, &got, &len))
			die("SO_SNDBUFFORCE");
		if (run == 0)
			printf("the send buffer towards the backend: %d bytes\n", got);
	}
	if (opt.mode != NO_PROGRAM) {
		const uint64_t zero = 0;

		for (uint32_t k = 0; k < COUNTERS; k++)
			counter(k, &zero);
	}
	if (opt.mode == REDIRECT) {
		/* The target first, under key 1; the copier's socket under 0. */
		insert(map, 1, to);
		key = 0;
	}
	insert(map, key, from);
	if (opt.mode == REDIRECT && write(go[1], "", 1) != 1)
		die("copier telling the client");
	for (;;) {
		ssize_t n = recv(from, buf, opt.buf, opt.nonblocking ? MSG_DONTWAIT : 0);

		if (n < 0 && errno == EAGAIN) {
			struct pollfd p = { .fd = from, .events = POLLIN };

			if (poll(&p, 1, 100) < 0)
				die("poll");
			continue;
		}
		if (n < 0)
			die("copier recv");
		if (n == 0)
			break;
		write_all(to, buf, (size_t)n, "copier write");
	}
	/* Redirected bytes go through a kernel worker: EOF only after them (or
	 * the stall alarm, if some never come). */
	while (opt.mode == REDIRECT && acked(to) < opt.bytes)
		usleep(1000);
	if (shutdown(to, SHUT_WR))
		die("copier shutdown");
	if (pthread_join(b, &result))
		die("pthread_join");
	if (run < sizeof(transfer_seconds) / sizeof(transfer_seconds[0]))
		transfer_seconds[run] = now() - start;
	printf("  transfer %lu: %.3f s, %.0f MiB/s\n", (unsigned long)run, now() - start,
		       (double)(opt.bytes >> 20) / (now() - start));
	if (opt.mode == REDIRECT) {
		/* Out of the SOCKHASH, the socket is plain TCP again: SIOCINQ is
		 * rcv_nxt - copied_seq (less the FIN, once it came). */
		int inq = 0;

		take_out(map, 0);
		if (ioctl(from, SIOCINQ, &inq))
			die("SIOCINQ");
		if (inq) {
			behind++;
			printf("  the copier's socket: copied_seq %d bytes behind rcv_nxt, its receive "
			       "queue empty\n",
			       inq);
		}
	}
	if (opt.mode != NO_PROGRAM) {
		uint64_t first = counter(FIRST, NULL), again = counter(AGAIN, NULL);
		uint64_t overlaps = counter(OVERLAPS, NULL);

		if (again || overlaps || first != opt.bytes)
			printf("  the verdict program: %lu bytes in skbs it saw for the first time, %lu in "
			       "skbs it had seen before; %lu verdicts began while another ran\n",
			       (unsigned long)first, (unsigned long)again, (unsigned long)overlaps);
		seen_again += again != 0;
		overlapped += overlaps != 0;
	}
	close(to);
	close(from);
	if (pthread_join(c, NULL))
		die("pthread_join");
	retransmitted += client_info.tcpi_total_retrans;
	if (result) {
		retransmitted_wrong += client_info.tcpi_total_retrans;
		printf("  the client's TCP retransmitted %u segments\n", client_info.tcpi_total_retrans);
	}
	return result != NULL;
}

/*
 * --overlap: the question asked directly. A TCP peer of our own on a TUN
 * device (192.0.2.2, the socket under test listens on 192.0.2.1) opens a
 * connection without options, sends bytes [0, 1000), waits for their ACK,
 * then sends one segment with bytes [500, 2000): it overlaps what was
 * received. TCP queues it whole and a reader must skip its first 500
 * bytes. The copier reads the socket (in the SOCKHASH, or not with
 * --no-program) to EOF and checks what it got.
 */
#define OVERLAP_FROM 500
#define OVERLAP_END 2000
#define FIRST_END 1000
static const uint32_t PEER_ISN = 1000;

static uint16_t checksum(const void *data, size_t len, uint32_t sum)
{
	const uint8_t *p = data;

	for (size_t i = 0; i + 1 < len; i += 2)
		sum += (uint32_t)(p[i] << 8 | p[i + 1]);
	if (len & 1)
		sum += (uint32_t)(p[len - 1] << 8);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

struct segment {
	struct iphdr ip;
	struct tcphdr tcp;
	uint8_t data[2048];
} __attribute__((packed));

static void peer_send(int tun, uint32_t seq, uint32_t ack, uint8_t flags, const uint8_t *data, size_t len)
{
	struct segment s;
	size_t tcp_len = sizeof(s.tcp) + len;
	uint32_t pseudo = 0;

	memset(&s, 0, sizeof(s));
	s.ip.version = 4;
	s.ip.ihl = 5;
	s.ip.tot_len = htons((uint16_t)(sizeof(s.ip) + tcp_len));
	s.ip.ttl = 64;
	s.ip.protocol = IPPROTO_TCP;
	s.ip.saddr = htonl(0xc0000202); /* 192.0.2.2 */
	s.ip.daddr = htonl(0xc0000201); /* 192.0.2.1 */
	s.ip.check = htons(checksum(&s.ip, sizeof(s.ip), 0));
	s.tcp.source = htons(40000);
	s.tcp.dest = htons(COPIER_PORT);
	s.tcp.seq = htonl(seq);
	s.tcp.ack_seq = htonl(ack);
	s.tcp.doff = 5;
	s.tcp.window = htons(65535);
	((uint8_t *)&s.tcp)[13] = flags;
	memcpy(s.data, data, len);
	/* The pseudo-header: addresses, protocol, TCP length. */
	pseudo += 0xc000 + 0x0202 + 0xc000 + 0x0201 + IPPROTO_TCP + (uint32_t)tcp_len;
	s.tcp.check = htons(checksum(&s.tcp, tcp_len, pseudo));
	if (write(tun, &s, sizeof(s.ip) + tcp_len) < 0)
		die("writing to the TUN device");
}

/* Reads the TUN device until a TCP segment to our peer's port with `flags`
 * set and, if `ack` is nonzero, acknowledging at least `ack`; returns it. */
static struct segment peer_wait(int tun, uint8_t flags, uint32_t ack)
{
	struct segment s;

	for (;;) {
		struct pollfd p = { .fd = tun, .events = POLLIN };
		ssize_t n;

		if (poll(&p, 1, 5000) != 1) {
			fprintf(stderr, "passdup: the socket under test did not answer the peer "
					"(waited for flags %#x, ack %u)\n", flags, ack);
			exit(1);
		}
		n = read(tun, &s, sizeof(s));
		if (n < (ssize_t)(sizeof(s.ip) + sizeof(s.tcp)) || s.ip.protocol != IPPROTO_TCP ||
		    s.tcp.dest != htons(40000))
			continue;
		if ((((uint8_t *)&s.tcp)[13] & flags) == flags &&
		    (!ack || (int32_t)(ntohl(s.tcp.ack_seq) - ack) >= 0))
			return s;
	}
}

static int tun_device(void)
{
	struct ifreq ifr;
	int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		die("/dev/net/tun");
	memset(&ifr, 0, sizeof(ifr));
	ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
	strcpy(ifr.ifr_name, "passdup0");
	if (ioctl(fd, TUNSETIFF, &ifr))
		die("TUNSETIFF");
	if (system("ip addr add 192.0.2.1/24 dev passdup0 && ip link set passdup0 up"))
		die("configuring passdup0");
	return fd;
}

/* Reads `fd` to EOF into `buf`; returns how many bytes came. */
static size_t read_to_eof(int fd, uint8_t *buf, size_t size)
{
	size_t have = 0;

	for (;;) {
		ssize_t n = recv(fd, buf + have, size - have, 0);

		if (n < 0)
			die("recv");
		if (n == 0)
			return have;
		have += (size_t)n;
	}
}

static int overlap_transfer(int map, int tun, int listener_fd, uint32_t port)
{
	uint8_t got[4096];
	size_t have;
	struct segment synack;
	uint32_t server_isn, s0 = PEER_ISN + 1;
	int from;

	peer_send(tun, PEER_ISN, 0, TH_SYN, NULL, 0);
	synack = peer_wait(tun, TH_SYN | TH_ACK, PEER_ISN + 1);
	server_isn = ntohl(synack.tcp.seq);
	peer_send(tun, s0, server_isn + 1, TH_ACK, NULL, 0);
	from = accept4(listener_fd, NULL, NULL, SOCK_CLOEXEC);
	if (from < 0)
		die("accept");
	if (opt.mode != NO_PROGRAM)
		insert(map, port, from);
	peer_send(tun, s0, server_isn + 1, TH_ACK | TH_PUSH, pattern, FIRST_END);
	peer_wait(tun, TH_ACK, s0 + FIRST_END);
	peer_send(tun, s0 + OVERLAP_FROM, server_isn + 1, TH_ACK | TH_PUSH, pattern + OVERLAP_FROM,
		  OVERLAP_END - OVERLAP_FROM);
	peer_wait(tun, TH_ACK, s0 + OVERLAP_END);
	peer_send(tun, s0 + OVERLAP_END, server_isn + 1, TH_ACK | TH_FIN, NULL, 0);
	have = read_to_eof(from, got, sizeof(got));
	close(from);
	if (have == OVERLAP_END && !memcmp(got, pattern, OVERLAP_END)) {
		printf("  right: %d bytes, once and in order\n", OVERLAP_END);
		return 0;
	}
	printf("  wrong: the reader got %zu bytes for %d", have, OVERLAP_END);
	if (have == OVERLAP_END + (FIRST_END - OVERLAP_FROM) && !memcmp(got, pattern, FIRST_END) &&
	    !memcmp(got + FIRST_END, pattern + OVERLAP_FROM, OVERLAP_END - OVERLAP_FROM))
		printf(": the overlapping segment whole, bytes [%d, %d) a second time", OVERLAP_FROM,
		       FIRST_END);
	printf("\n");
	return 1;
}

static int overlap(int map)
{
	int tun = tun_device(), l, one = 1, wrong = 0;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(COPIER_PORT) };

	a.sin_addr.s_addr = htonl(0xc0000201);
	l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (l < 0 || setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 4))
		die("listening on 192.0.2.1");
	/* One connection: the peer's port and ISN are fixed. */
	wrong = overlap_transfer(map, tun, l, 0);
	printf("%s: a segment overlapping bytes already received (%s)\n", wrong ? "WRONG" : "right",
	       opt.mode == NO_PROGRAM ? "no program"
	       : opt.mode == PARSER  ? "parser and verdict, SK_PASS"
				     : "verdict only, SK_PASS");
	return wrong;
}

/*
 * --repair: the same question without a TUN device or an address of its
 * own, on loopback, with TCP_REPAIR (CAP_NET_ADMIN). Two sockets are made
 * established towards each other without a handshake: the sender's next
 * byte is 0 while the receiver's says it already has [0, 500). The sender
 * then writes bytes [0, 1000): one segment overlapping what the receiver
 * "received". A reader must get bytes [500, 1000).
 */
#define REPAIR_FROM 500
#define REPAIR_END 1000

static void repair(int fd, int on)
{
	if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR, &on, sizeof(on)))
		die("TCP_REPAIR (needs CAP_NET_ADMIN)");
}

static void queue_seq(int fd, int queue, uint32_t seq)
{
	if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, &queue, sizeof(queue)) ||
	    setsockopt(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, &seq, sizeof(seq)))
		die("TCP_QUEUE_SEQ");
}

/* A socket in repair mode, bound to a loopback port of its own, whose next
 * byte to send is `snd` and next byte to receive `rcv`. */
static int repaired(uint32_t snd, uint32_t rcv, struct sockaddr_in *at)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	socklen_t len = sizeof(*at);

	if (fd < 0)
		die("socket");
	repair(fd, 1);
	queue_seq(fd, TCP_SEND_QUEUE, snd);
	queue_seq(fd, TCP_RECV_QUEUE, rcv);
	*at = loopback(0);
	if (bind(fd, (struct sockaddr *)at, sizeof(*at)) || getsockname(fd, (struct sockaddr *)at, &len))
		die("binding a repaired socket");
	return fd;
}

/* Connects (in repair mode: no handshake) and gives it an MSS and an open
 * window as its peer would have announced them. It stays in repair mode
 * (silent) until its peer is established too: a segment to a port with no
 * connected socket would be answered with a reset. */
static void establish(int fd, const struct sockaddr_in *peer, uint32_t rcv)
{
	struct tcp_repair_opt mss = { .opt_code = TCPOPT_MAXSEG, .opt_val = 16384 };
	struct tcp_repair_window w = {
		.snd_wl1 = rcv, .snd_wnd = 65535, .max_window = 65535, .rcv_wnd = 65535, .rcv_wup = rcv,
	};

	if (connect(fd, (const struct sockaddr *)peer, sizeof(*peer)))
		die("connecting a repaired socket");
	if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_OPTIONS, &mss, sizeof(mss)))
		die("TCP_REPAIR_OPTIONS");
	if (setsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, &w, sizeof(w)))
		die("TCP_REPAIR_WINDOW");
}

static int repaired_overlap(int map)
{
	const uint32_t a_seq = 1000000, b_seq = 2000000;
	struct sockaddr_in at_a, at_b;
	int a = repaired(a_seq, b_seq, &at_a);
	int b = repaired(b_seq, a_seq + REPAIR_FROM, &at_b);
	uint8_t got[4096];
	size_t have;
	int wrong;

	establish(a, &at_b, b_seq);
	establish(b, &at_a, a_seq + REPAIR_FROM);
	repair(b, 0);
	repair(a, 0);
	if (opt.mode != NO_PROGRAM)
		insert(map, 0, b);
	write_all(a, pattern, REPAIR_END, "sending the overlapping segment");
	if (shutdown(a, SHUT_WR))
		die("shutdown");
	have = read_to_eof(b, got, sizeof(got));
	wrong = !(have == REPAIR_END - REPAIR_FROM && !memcmp(got, pattern + REPAIR_FROM, have));
	if (!wrong)
		printf("  right: bytes [%d, %d), once\n", REPAIR_FROM, REPAIR_END);
	else if (have == REPAIR_END && !memcmp(got, pattern, have))
		printf("  wrong: the segment whole, bytes [0, %d) though [0, %d) were received before\n",
		       REPAIR_END, REPAIR_FROM);
	else
		printf("  wrong: the reader got %zu bytes for %d\n", have, REPAIR_END - REPAIR_FROM);
	printf("%s: a segment overlapping bytes already received, made with TCP_REPAIR (%s)\n",
	       wrong ? "WRONG" : "right",
	       opt.mode == NO_PROGRAM ? "no program"
	       : opt.mode == PARSER  ? "parser and verdict, SK_PASS"
				     : "verdict only, SK_PASS");
	close(a);
	close(b);
	return wrong;
}

static void usage(FILE *f)
{
	fprintf(f, "usage: passdup [--mib N] [--runs N] [--buf BYTES] [--nonblocking]\n"
		   "               [--parser | --no-program | --redirect] [--copier-cpu N] [--client-cpu N]\n"
		   "               [--backend-cpu N] [--stall SECONDS] [--sndbuf BYTES]\n"
		   "               [--overlap | --repair]\n");
}

int main(int argc, char **argv)
{
	static const struct option options[] = {
		{ "mib", required_argument, NULL, 'm' },
		{ "runs", required_argument, NULL, 'r' },
		{ "buf", required_argument, NULL, 'b' },
		{ "nonblocking", no_argument, NULL, 'n' },
		{ "parser", no_argument, NULL, 'p' },
		{ "no-program", no_argument, NULL, 'N' },
		{ "redirect", no_argument, NULL, 'r' + 256 },
		{ "overlap", no_argument, NULL, 'o' + 256 },
		{ "repair", no_argument, NULL, 'R' + 256 },
		{ "copier-cpu", required_argument, NULL, 'C' },
		{ "client-cpu", required_argument, NULL, 'c' },
		{ "backend-cpu", required_argument, NULL, 'B' },
		{ "stall", required_argument, NULL, 's' },
		{ "sndbuf", required_argument, NULL, 'S' },

		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	static const char *const mode_names[] = { "verdict only", "parser and verdict", "no program",
						  "redirect to the backend" };
	int o, map, n, wrong = 0;
	uint8_t *buf;

	while ((o = getopt_long(argc, argv, "", options, NULL)) != -1) {
		switch (o) {
		case 'm': opt.bytes = (size_t)strtoul(optarg, NULL, 10) << 20; break;
		case 'r': opt.runs = atoi(optarg); break;
		case 'b': opt.buf = (size_t)strtoul(optarg, NULL, 10); break;
		case 'n': opt.nonblocking = 1; break;
		case 'p': opt.mode = PARSER; break;
		case 'N': opt.mode = NO_PROGRAM; break;
		case 'r' + 256: opt.mode = REDIRECT; break;
		case 'o' + 256: opt.overlap = 1; break;
		case 'R' + 256: opt.overlap = 2; break;
		case 'C': opt.copier_cpu = atoi(optarg); break;
		case 'c': opt.client_cpu = atoi(optarg); break;
		case 'B': opt.backend_cpu = atoi(optarg); break;
		case 's': opt.stall = (unsigned)atoi(optarg); break;
		case 'S': opt.sndbuf = atoi(optarg); break;

		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (opt.overlap)
		opt.bytes = 1 << 20; /* the pattern the peer sends from */
	if (optind != argc || !opt.bytes || opt.runs < 1 || !opt.buf || opt.sndbuf < 0) {
		usage(stderr);
		return 2;
	}
	if (sysconf(_SC_NPROCESSORS_ONLN) < 2 &&
	    (opt.copier_cpu != 0 || opt.client_cpu != 0 || opt.backend_cpu != 0)) {
		fprintf(stderr, "passdup: one CPU online; the race needs two (or pass --*-cpu 0)\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	pattern = malloc(opt.bytes);
	buf = malloc(opt.buf);
	if (!pattern || !buf)
		die("malloc");
	for (size_t i = 0; i < opt.bytes; i++)
		pattern[i] = byte_at(i);
	backend_listener = listener(BACKEND_PORT);
	copier_listener = listener(COPIER_PORT);
	if (pipe(go))
		die("pipe");

	map = sockhash();
	signal(SIGALRM, stalled);
	if (opt.overlap) {
		if (opt.mode == REDIRECT) {
			fprintf(stderr, "passdup: --overlap does not go with --redirect\n");
			return 2;
		}
		alarm(opt.stall);
		return opt.overlap == 2 ? repaired_overlap(map) : overlap(map);
	}
	pin(opt.copier_cpu);
	for (int r = 0; r < opt.runs; r++) {
		alarm(opt.stall);
		wrong += transfer(map, (uint64_t)r, buf);
		alarm(0);
	}
	printf("%d of %d transfers of %zu MiB wrong (%s, copier on CPU %d, client on %d, backend on %d, "
	       "recv of %zu bytes%s)\n",
	       wrong, opt.runs, opt.bytes >> 20, mode_names[opt.mode], opt.copier_cpu, opt.client_cpu,
	       opt.backend_cpu, opt.buf, opt.nonblocking ? ", non-blocking" : "");
	printf("the client's TCP retransmitted %lu segments in all, %lu in the wrong transfers\n",
	       retransmitted, retransmitted_wrong);
	n = opt.runs < 1024 ? opt.runs : 1024;
	qsort(transfer_seconds, (size_t)n, sizeof(transfer_seconds[0]), by_value);
	printf("median transfer: %.3f s, %.0f MiB/s (send buffer towards the backend %s)\n",
	       transfer_seconds[n / 2], (double)(opt.bytes >> 20) / transfer_seconds[n / 2],
	       opt.sndbuf ? "fixed" : "autotuned");
	if (opt.mode == REDIRECT)
		printf("the redirect program counted bytes only; copied_seq lagged behind rcv_nxt "
		       "after %d transfers (%s copier)\n",
		       behind, opt.nonblocking ? "non-blocking" : "blocking");
	else if (opt.mode != NO_PROGRAM && no_overlap_check)
		printf("the verdict program counted bytes only (BPF_CMPXCHG needs Linux 5.12)\n");
	else if (opt.mode != NO_PROGRAM)
		printf("the verdict program saw an skb a second time in %d transfers; two verdicts "
		       "overlapped on the socket in %d\n",
		       seen_again, overlapped);
	return wrong ? 1 : 0;
}
