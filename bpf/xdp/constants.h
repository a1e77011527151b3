/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every limit, flag, counter index and drop reason of the data plane.
 *
 * They are enums, not #defines, so that they land in the object's BTF and the
 * control plane reads them from there (loader/layout.py): nothing here is
 * repeated in Python. Each enum is referenced by a struct field or a map key
 * in maps.h, which is what makes clang emit it.
 */
#ifndef XDPLB_CONSTANTS_H
#define XDPLB_CONSTANTS_H

/* Bump when any struct in maps.h changes shape. Pinned maps written by an
 * older layout are refused (or migrated) by the control plane, never reused
 * blindly. Stored in the pinned `meta` map. */
enum xdplb_layout {
	/* 3: flood guard, no-backend rejects, svc_value.affinity_timeout_s
	 * 4: gateway-mode replies found through reply_index + conntrack
	 *    (ct_entry.ifindex, svc_keys, SVC_F_REV_NAT)
	 * 5: drop_stats and global_stats sized by DROP_REASON_SLOTS and
	 *    COUNTER_SLOTS (room for new reasons and counters without a
	 *    layout change); DROP_NO_NEIGH, DROP_MTU, neigh_requests
	 * 6: DSR (encap.h): lb_config.encap_v4/encap_v6/gue_port,
	 *    SVC_F_IPIP, SVC_F_GUE
	 * 7: lb_config.snat_v4/snat_v6 (one SNAT address per family);
	 *    if_macs (dmac.h); icmp_errors, icmp_scratch (icmp_error.h) */
	XDPLB_LAYOUT_VERSION = 7,
};

/* Default map capacities. The control plane may resize the ones marked
 * "sizable" before load (config `limits:`); the others are fixed. */
enum xdplb_limits {
	MAX_SERVICES = 65536,          /* services hash; svc_id < MAX_SERVICES */
	MAX_VIPS = 65536,              /* distinct VIP addresses */
	MAX_BACKENDS = 262144,         /* backend records; backend_id < MAX_BACKENDS */
	MAX_IDENTITY_CIDRS = 65536,    /* LPM trie entries */
	MAX_POLICY_ENTRIES = 262144,   /* (service, identity, generation) entries */
	MAX_DROP_KEYS = 65536,         /* LRU of (identity, service, reason) counters */
	/* Maglev pool, in chunks of MAGLEV_CHUNK_SLOTS slots (sizable):
	 * 262144 chunks = 4M slots = 16 MiB. */
	MAGLEV_POOL_CHUNKS = 262144,
	MAGLEV_CHUNK_SLOTS = 16,       /* slots per pool element (one 64-byte line) */
	CT_ENTRIES = 262144,           /* conntrack LRU (sizable) */
	NAT_ENTRIES = 262144,          /* reverse-NAT LRU (sizable); SNAT mode and SVC_F_REV_NAT */
	/* Gateway mode finds a reply's client flow through the services its
	 * backend address serves (reply.h). One reply_index entry lists up to
	 * this many; a service past them is flagged SVC_F_REV_NAT and its
	 * flows write a reverse-NAT entry instead. Bounded for the verifier. */
	REPLY_INDEX_SVCS = 8,
	DEVMAP_ENTRIES = 256,          /* egress interfaces for XDP_REDIRECT, and their MACs (if_macs) */
	NEXTHOP_ENTRIES = 65536,       /* cached next hops (backends and clients), LRU */
	NEIGH_REQUEST_ENTRIES = 1024,  /* unresolved next hops for the control plane, LRU */
	/* Client-IP affinity: (service, client address) -> backend, LRU. An
	 * evicted entry only loses stickiness: Maglev picks again. */
	AFFINITY_ENTRIES = 262144,
	/* Flow-event ring buffer (monitor.h), in bytes: a power of two and a
	 * multiple of the page size. A flow_event takes 96 + 8 bytes, so it
	 * holds ~2500 events: over a second of the default rate per CPU. */
	EVENTS_RING_BYTES = 262144,
	/* SNAT source-port allocation probes this many ports before giving up
	 * with DROP_NAT_EXHAUSTED; bounded so that the verifier can unroll it. */
	NAT_PORT_PROBES = 8,
	/* Entries of drop_stats and global_stats. Larger than DROP_REASON_MAX
	 * and CNT_MAX so that a new reason or counter fits in the pinned maps
	 * of a running node: an upgrade adding one keeps every flow. */
	DROP_REASON_SLOTS = 32,
	COUNTER_SLOTS = 32,
	/* IPv6 extension headers (hop-by-hop, routing, destination options)
	 * walked before the L4 header; a VIP packet with more is dropped
	 * (DROP_IPV6_EXT_CHAIN), as is any with a fragment header
	 * (DROP_FRAGMENT). Bounded for the verifier and the per-packet cost. */
	IPV6_EXT_MAX = 4,
	/* svc_id and backend_id 0 are never allocated: 0 means "none". */
	ID_NONE = 0,
};

/* Reserved identities. Identities from the config start at
 * IDENTITY_USER_MIN; a source that matches no CIDR is IDENTITY_WORLD. */
enum xdplb_identity {
	IDENTITY_UNKNOWN = 0,
	IDENTITY_WORLD = 2,
	IDENTITY_USER_MIN = 256,
};

/* Address families, as in <sys/socket.h>; IPv6 keys use the same structs. */
enum xdplb_family {
	FAMILY_NONE = 0,
	FAMILY_IPV4 = 2,
	FAMILY_IPV6 = 10,
};

/* svc_value.flags: independent bits, none aliases another. */
enum svc_flags {
	SVC_F_HAS_POLICY = 1 << 0,     /* look up policy entries for this service */
	SVC_F_DEFAULT_DENY = 1 << 1,   /* no entry for an identity = deny */
	/* Gateway mode: this service is missing from the reply_index entry of
	 * one of its backends (more than REPLY_INDEX_SVCS services share that
	 * address), so each new flow also writes a reverse-NAT entry. */
	SVC_F_REV_NAT = 1 << 2,
	/* Direct server return (encap.h): the client's packet is sent to the
	 * backend unchanged inside an outer IP header (IPIP: protocol 4 for an
	 * IPv4 inner packet, 41 for IPv6) or outer IP + UDP to
	 * lb_config.gue_port (GUE variant 1). The backend answers the client
	 * itself: no reverse NAT, no reply state. At most one of the two. */
	SVC_F_IPIP = 1 << 3,
	SVC_F_GUE = 1 << 4,
};

/* backend.state. A draining backend keeps its flows but gets no new ones
 * (it is absent from the Maglev table). A free record matches no flow. */
enum backend_state {
	BACKEND_FREE = 0,
	BACKEND_ACTIVE = 1,
	BACKEND_DRAINING = 2,
};

enum policy_verdict {
	VERDICT_NONE = 0,
	VERDICT_ALLOW = 1,
	VERDICT_DENY = 2,
};

/* Why a packet was dropped. Index into `drop_stats` and part of the key of
 * `drop_detail`. */
enum drop_reason {
	DROP_NONE = 0,
	DROP_POLICY = 1,            /* identity denied by the service's policy */
	DROP_NO_BACKEND = 2,        /* service has no active backend */
	DROP_IP_OPTIONS = 3,        /* VIP packet with IPv4 options (IHL > 5) */
	DROP_FRAGMENT = 4,          /* VIP packet that is a fragment */
	DROP_TRUNCATED = 5,         /* VIP packet whose IP/L4 header is cut short */
	DROP_NO_SERVICE = 6,        /* VIP address, but no service on this port/proto */
	DROP_UNSUPPORTED_L4 = 7,    /* VIP address, protocol is not TCP or UDP */
	DROP_NAT_EXHAUSTED = 8,     /* no free SNAT source port after NAT_PORT_PROBES */
	DROP_FIB = 9,               /* no route to the backend or back to the client */
	DROP_SPOOFED_REPLY = 10,    /* NAT reply arrived on the wrong interface */
	DROP_BAD_IP = 11,           /* VIP packet with a bad IHL or total length */
	DROP_CT_FULL = 12,          /* conntrack/NAT insert failed */
	DROP_REDIRECT = 13,         /* egress interface not in the devmap */
	DROP_NEW_FLOW_RATE = 14,    /* flood guard: a new flow over the per-CPU rate (guard.h) */
	/* The next hop's neighbour is unresolved and the packet's source was
	 * rewritten (SNAT, or a reply now from the VIP): the kernel may drop
	 * such a packet (a martian when the source is its own, rp_filter) and
	 * then resolves nothing. The control plane keeps backends' next hops
	 * resolved and resolves the ones the program asks for
	 * (neigh_requests, lb/neighbours.py): this is the moment before. */
	DROP_NO_NEIGH = 15,
	/* Bigger than the egress MTU, with a rewritten source (as above). */
	DROP_MTU = 16,
	/* DSR: the encapsulated packet would exceed the egress MTU. An IPv4
	 * client's packet with DF set is answered with ICMP fragmentation
	 * needed, an IPv6 one with ICMPv6 packet too big, carrying the MTU
	 * less the tunnel overhead (CNT_FRAG_NEEDED), so its path MTU
	 * discovery shrinks its packets; with DF clear, or for IPv6 when that
	 * MTU is below 1280, it is only dropped (XDP cannot fragment, and
	 * fragments to a VIP are dropped anyway). */
	DROP_ENCAP_MTU = 17,
	/* DSR: no encapsulation source of the backend's family configured,
	 * or no headroom for the outer headers (bpf_xdp_adjust_head). */
	DROP_ENCAP = 18,
	/* IPv6 VIP packet with more than IPV6_EXT_MAX extension headers
	 * before its L4 header (parse.h). */
	DROP_IPV6_EXT_CHAIN = 19,
	DROP_REASON_MAX = 20,
};

/* flow_event.verdict (monitor.h). Only drops and the first packet of new
 * forwarded flows make events; established packets and replies do not. */
enum event_verdict {
	EVENT_NONE = 0,
	EVENT_FORWARDED = 1,        /* new flow sent to a backend (conntrack miss) */
	EVENT_DROPPED = 2,          /* any drop; flow_event.reason says why */
};

/* Global per-CPU counters: one per XDP verdict plus a few events. */
enum xdplb_counter {
	CNT_PASS = 0,
	CNT_TX = 1,
	CNT_REDIRECT = 2,
	CNT_DROP = 3,
	CNT_ABORTED = 4,
	CNT_CT_NEW = 5,             /* flows that got a backend from Maglev */
	CNT_CT_HIT = 6,             /* packets that kept their backend from conntrack */
	CNT_CT_STALE = 7,           /* conntrack pointed at a removed backend */
	CNT_REPLY = 8,              /* replies reverse-translated */
	CNT_NEIGH_PASS = 9,         /* passed to the kernel to resolve a neighbour */
	CNT_EVENTS = 10,            /* flow events written to the ring buffer */
	CNT_EVENTS_LOST = 11,       /* flow events not sent: rate limit or ring full */
	CNT_GUARD_STATELESS = 12,   /* flood guard: forwarded by pick_backend() with no state written */
	CNT_REJECTS = 13,           /* ICMP port unreachable sent for a no_backend drop (reject.h) */
	/* Gateway-mode replies of flows forwarded without state, recognised
	 * by picking their backend again (reply.h); then counted as replies. */
	CNT_REPLY_STATELESS = 14,
	CNT_ENCAP_IPIP = 15,        /* DSR: sent to a backend in IPIP (encap.h) */
	CNT_ENCAP_GUE = 16,         /* DSR: sent to a backend in GUE */
	CNT_FRAG_NEEDED = 17,       /* DSR: ICMP frag. needed / ICMPv6 too big sent for a DROP_ENCAP_MTU */
	CNT_OTHER_HOST = 18,        /* unicast frames for another MAC, passed untouched (dmac.h) */
	/* ICMP/ICMPv6 errors quoting a translated flow (icmp_error.h): about
	 * a client -> backend packet, translated and sent to the client; about
	 * a reply, translated and sent to the flow's backend. */
	CNT_ICMP_ERROR_TO_CLIENT = 19,
	CNT_ICMP_ERROR_TO_BACKEND = 20,
	CNT_MAX = 21,
};

#endif
