/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Limits, counters and drop reasons of the backend-side decapsulation
 * program (decap.c). As in bpf/xdp/constants.h they are enums, not
 * #defines, so that they land in BTF and lb/backend.py reads them from
 * there: nothing here is repeated in Python.
 */
#ifndef DECAP_CONSTANTS_H
#define DECAP_CONSTANTS_H

/* Bump when a struct in maps.h changes shape: lb/backend.py refuses pinned
 * maps written by another layout (stored in config.layout_version). */
enum decap_layout {
	DECAP_LAYOUT_VERSION = 1,
};

enum decap_limits {
	/* VIPs this backend serves (`vips`): the inner destination must be one. */
	DECAP_MAX_VIPS = 4096,
	/* (interface, address) pairs tunnels are accepted on (`tunnel_dsts`). */
	DECAP_MAX_TUNNEL_DSTS = 1024,
	/* IANA's port for GUE ("gue", 6080/udp), which Katran also uses. The
	 * control plane writes it to config.gue_port unless told otherwise;
	 * 0 there turns GUE off. */
	DECAP_GUE_PORT_DEFAULT = 6080,
};

/* Address families, as in <sys/socket.h> (the same values as xdplb's). */
enum decap_family {
	DECAP_FAMILY_IPV4 = 2,
	DECAP_FAMILY_IPV6 = 10,
};

/* What happened to a packet: index into `stats`. Exactly one per packet. */
enum decap_counter {
	DECAP_CNT_PASS = 0,         /* not tunnel traffic for this host: passed untouched */
	DECAP_CNT_NOT_VIP = 1,      /* tunnel packet for us, inner destination not a VIP: passed untouched */
	DECAP_CNT_IPIP4 = 2,        /* decapsulated: IPv4 or IPv6 in IPv4 (protocol 4 or 41) */
	DECAP_CNT_IPIP6 = 3,        /* decapsulated: IPv4 or IPv6 in IPv6 (next header 4 or 41) */
	DECAP_CNT_GUE4 = 4,         /* decapsulated: GUE variant 1 over IPv4 */
	DECAP_CNT_GUE6 = 5,         /* decapsulated: GUE variant 1 over IPv6 */
	DECAP_CNT_DROP = 6,         /* dropped; `drops` says why */
	DECAP_CNT_MAX = 7,
};

/* Why a tunnel packet for one of our tunnel addresses was dropped: index
 * into `drops`. Only packets whose outer destination is a tunnel address
 * (and, for GUE, whose UDP port is the GUE port) can be dropped; anything
 * else is passed untouched. */
enum decap_drop {
	DECAP_DROP_NONE = 0,
	DECAP_DROP_OUTER_BAD_IP = 1,        /* outer IPv4: options, bad checksum or total length;
					     * outer IPv6: payload length past the frame */
	DECAP_DROP_OUTER_FRAGMENT = 2,      /* outer IPv4 fragment: cannot be decapsulated alone */
	DECAP_DROP_BAD_UDP = 3,             /* GUE: UDP length disagrees with the outer header */
	DECAP_DROP_GUE_VERSION = 4,         /* GUE: first nibble neither 4 nor 6 (a variant 0
					     * GUE header, or garbage) */
	DECAP_DROP_INNER_TRUNCATED = 5,     /* inner IP header cut short */
	DECAP_DROP_INNER_VERSION = 6,       /* IPIP: the inner version disagrees with the outer
					     * protocol (4 must carry IPv4, 41 IPv6) */
	DECAP_DROP_INNER_BAD_LENGTH = 7,    /* inner IHL or total/payload length disagrees with
					     * what the outer header carries */
	DECAP_DROP_ADJUST_HEAD = 8,         /* bpf_xdp_adjust_head() refused */
	DECAP_DROP_MAX = 9,
};

#endif
