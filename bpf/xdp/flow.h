/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The flow key and the conntrack entry. Apart from maps.h so that the
 * benchmark's state floor (bench/bpf/fwd.c) keeps the same layouts without
 * xdplb's maps.
 */
#ifndef XDPLB_FLOW_H
#define XDPLB_FLOW_H

#include <linux/types.h>

/* A flow as it appears on the wire. `pad` is always zero. */
struct flow_key {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/* Two addresses of maps.h (__u32[4], IPv4 in word 0 and the rest zero):
 * the same address of the same family. */
static __always_inline int addr_equal(const __u32 *a, const __u32 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0;
}

/* Conntrack: client flow (client -> VIP) -> chosen backend. In gateway
 * mode it is also what a reply is checked against (reply.h). */
struct ct_entry {
	__u32 backend_id;
	__u32 backend_gen;          /* must match backend.gen, or the entry is stale */
	__u32 svc_id;
	__u16 nat_port;             /* SNAT source port, network order; 0 = no SNAT */
	__u16 pad;
	__u32 ifindex;              /* egress towards the backend: replies come in here */
};

#endif
