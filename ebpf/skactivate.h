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

#define SKA_LAYOUT_VERSION 4

/* Bindings: LPM trie entries (ranges are expanded to single ports). */
#define SKA_MAX_BINDINGS (1u << 20)
/* Destinations: ids 0..SKA_MAX_DESTINATIONS-1 index the metrics array.  A
 * destination is one socket of a unit (family and protocol): 1024 are some
 * 500 dual-stack socket units.  The per-CPU metrics array costs 24 bytes per
 * destination and CPU, so this is what keeps the maps small. */
#define SKA_MAX_DESTINATIONS 1024
/* systemd's UNIT_NAME_MAX is 256 including the terminating NUL. */
#define SKA_UNIT_NAME_MAX 256

/* The ports bitmap: bit (protocol slot << 16 | port) is set while the trie
 * has entries of that protocol and port; port 0 stands for the protocol's
 * wildcard entries.  64 bits a word: 16 KiB in all. */
#define SKA_PORT_SLOT_TCP 0
#define SKA_PORT_SLOT_UDP 1
#define SKA_PORTS_WORDS ((2u << 16) / 64)

/* Bits of the trie key in front of the address: protocol (8), port (16) and
 * family (8).  The family is part of every prefix, so an IPv6 binding can
 * never answer an IPv4 lookup, nor the other way round. */
#define SKA_KEY_HEADER_BITS 32
/* Full-length keys: a /32 or a /128 behind the header. */
#define SKA_KEY_V4_FULL_BITS (SKA_KEY_HEADER_BITS + 32)
#define SKA_KEY_V6_FULL_BITS (SKA_KEY_HEADER_BITS + 128)

/* Key of the `bindings` trie. prefixlen counts bits of everything after it.
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

/* Value of the `bindings` trie: the trie does not say which prefix matched, so
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
};

#endif
