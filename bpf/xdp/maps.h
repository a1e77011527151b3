/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every map and every struct stored in one. This file is the single source
 * of truth for layouts: the control plane builds its ctypes/numpy types from
 * the BTF that clang emits for it.
 *
 * Addresses are 16 bytes (`__u32 addr[4]`) with a `family` next to them, so
 * IPv6 fits without a new layout. An IPv4 address sits in addr[0] in network
 * byte order with addr[1..3] zero. Ports are in network byte order.
 */
#ifndef XDPLB_MAPS_H
#define XDPLB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "constants.h"
#include "flow.h"

/* Services: (VIP, port, proto) -> service record. */
struct svc_key {
	__u32 vip[4];
	__u16 port;
	__u8 proto;                 /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;                /* enum xdplb_family, as a byte */
};

/* A service record is replaced whole by one map update (the map is not
 * preallocated, so the kernel swaps elements under RCU): a packet sees the
 * old record or the new one. Everything it points at is written first. */
struct svc_value {
	__u32 svc_id;               /* index into svc_stats; key part of policy */
	__u32 ring_offset;          /* first slot of the Maglev table in the pool */
	__u32 ring_size;            /* prime table size M; 0 = no active backend */
	__u32 policy_gen;           /* generation of this service's policy entries */
	enum svc_flags flags;
	__u32 affinity_timeout_s;   /* client-IP affinity lifetime (affinity.h); 0 = none */
};

/* Addresses that carry at least one service: lets the program drop malformed
 * or unknown-port traffic to a VIP without parsing further. */
struct vip_key {
	__u32 addr[4];
	__u32 family;
};

struct vip_value {
	__u32 services;             /* how many services use this address */
};

/* One backend of one service. The address and port of a record never change
 * while it is in use; a new backend gets a new id (and a new `gen`), so a
 * reader racing an update can only see a stale `state`, never a mixed
 * address. */
struct backend {
	__u32 addr[4];
	__u16 port;
	__u8 family;
	__u8 pad;
	enum backend_state state;
	__u32 gen;                  /* bumped whenever this id is reused */
	__u32 svc_id;               /* owning service */
};

/* Maglev pool: all services' tables, each a contiguous run of slots
 * [ring_offset, ring_offset + ring_size). A slot holds a backend id. Slots
 * are grouped 16 to an element so that the mmap()ed array is a dense __u32
 * array for the control plane (array elements are 8-byte aligned). */
struct maglev_chunk {
	__u32 slots[MAGLEV_CHUNK_SLOTS];
};

/* A backend's address as its replies carry it in their source. */
struct backend_addr {
	__u32 addr[4];
	__u16 port;                 /* network order */
	__u8 proto;
	__u8 family;
};

/* Gateway-mode reply index: backend address -> the services it serves,
 * which give the VIP of the client flow a reply belongs to. Unused slots
 * are ID_NONE, all after the used ones. */
struct reply_services {
	__u32 svc_id[REPLY_INDEX_SVCS];
};

/* Reverse NAT: reply flow (backend -> client or SNAT address) -> what to
 * restore. */
struct nat_entry {
	__u32 client[4];            /* restored as destination */
	__u32 vip[4];               /* restored as source */
	__u16 client_port;
	__u16 vip_port;
	__u32 ifindex;              /* replies are accepted only from here */
	__u32 svc_id;
	__u32 backend_id;
};

/* Source CIDR -> identity. prefixlen counts the 32 bits of `family` first,
 * so an IPv4 /24 is prefixlen 56 and never matches an IPv6 key. */
struct identity_key {
	__u32 prefixlen;
	__u32 family;
	__u32 addr[4];
};

struct identity_value {
	__u32 identity;
};

/* Policy entry: (service, identity, generation) -> verdict. The generation
 * lets a new allow-list be written beside the old one and switched in by the
 * service record. */
struct policy_key {
	__u32 svc_id;
	__u32 identity;
	__u32 gen;
};

struct policy_value {
	enum policy_verdict verdict;
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

struct drop_key {
	__u32 identity;
	__u32 svc_id;
	enum drop_reason reason;
};

/* The outer source address of DSR packets of one outer family (encap.h).
 * `spread_mask` makes it a prefix: the low bits of the address's last word
 * (addr[0] for IPv4, addr[3] for IPv6) come from the flow's hash, so that a
 * backend whose NIC hashes only the outer addresses (IPIP) still spreads
 * the flows over its receive queues. */
struct encap_source {
	__u32 addr[4];              /* network order; host bits zero */
	__u32 spread_mask;          /* host order; 0 = always `addr` */
	__u32 family;               /* FAMILY_NONE: not configured (DROP_ENCAP) */
};

/* The SNAT source of one family: NAT services of that family leave from
 * this address and a port of lb_config's range (nat.h). The port range is
 * shared; each address has all of it, as rev_nat keys carry the address. */
struct snat_source {
	__u32 addr[4];              /* network order; IPv4 in addr[0] */
	__u32 family;               /* FAMILY_NONE: gateway mode for this family */
};

/* Global settings. Two copies: the control plane writes the inactive one and
 * then flips meta.active_config, so a packet never sees a half-written copy. */
struct lb_config {
	struct snat_source snat_v4;
	struct snat_source snat_v6;
	__u16 snat_port_min;        /* host order, inclusive */
	__u16 snat_port_max;        /* host order, inclusive */
	__u32 hash_seed;
	/* Flow monitor (monitor.h). Limits are per CPU: each CPU has its own
	 * token bucket, so no atomics are needed on the data path. */
	__u32 monitor_rate;         /* events per second; 0 = no events */
	__u32 monitor_burst;        /* events sent back to back after a quiet spell */
	__u32 monitor_sample;       /* 1 new forwarded flow in N makes an event (0, 1 = all) */
	__u32 nexthop_ttl_ms;       /* next-hop cache lifetime; 0 = bpf_fib_lookup() every packet */
	/* Flood guard (guard.h), per CPU: conntrack misses that may write
	 * state per second, and how many may come back to back. 0 = no guard. */
	__u32 new_flow_rate;
	__u32 new_flow_burst;
	/* ICMP rejects for services without backends (reject.h), per CPU:
	 * per second and back to back. 0 = drop silently. */
	__u32 reject_rate;
	__u32 reject_burst;
	/* DSR (encap.h): outer sources for IPv4 and IPv6 outer headers, and
	 * GUE's UDP destination port (network order), one for all services:
	 * it is the backends' decapsulation port, a property of the hosts. */
	struct encap_source encap_v4;
	struct encap_source encap_v6;
	__u16 gue_port;
	__u16 pad;
};

/* What the dry-run copy of the program decided (the `flow` command). The
 * live program never writes it; it is not pinned. */
struct probe_result {
	enum drop_reason reason;
	__u32 identity;
	__u32 svc_id;
	__u32 backend_id;
	__u32 ct_hit;               /* 1 if conntrack chose the backend */
	__u32 reply;                /* 1 if the packet was a NAT reply */
	enum xdplb_family family;   /* anchors the enum in BTF */
};

/* One record of the `events` ring buffer, read by `xdplb monitor`.
 * Addresses and ports as in flow_key: network order, IPv4 in word 0. */
struct flow_event {
	__u64 timestamp_ns;         /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 src[4];
	__u32 dst[4];
	__u32 backend_addr[4];      /* the rewritten destination; zero if none */
	__u16 sport;
	__u16 dport;
	__u16 backend_port;
	__u8 proto;
	__u8 family;
	enum event_verdict verdict;
	enum drop_reason reason;    /* DROP_NONE unless the verdict is EVENT_DROPPED */
	__u32 identity;             /* source identity */
	__u32 svc_id;               /* ID_NONE: no service matched */
	__u32 backend_id;           /* ID_NONE unless forwarded */
	__u32 ifindex;              /* ingress interface */
	__u32 len;                  /* frame length */
	__u32 pad;
};

/* Next hop of a destination address, cached from bpf_fib_lookup(): the
 * lookup is the program's most expensive step, and a destination's next hop
 * rarely changes. Only successful lookups are cached. */
struct nexthop_key {
	__u32 addr[4];
	__u32 family;
};

struct nexthop {
	__u64 expires_ns;           /* bpf_ktime_get_coarse_ns() deadline */
	__u32 ifindex;              /* egress interface */
	__u8 smac[6];
	__u8 dmac[6];
	__u16 mtu;                  /* the egress device's, for packets that grow (encap.h) */
	__u8 pad[6];                /* explicit: the struct is 32 bytes either way */
};

/* A token bucket kept in time units (ratelimit.h). */
struct token_bucket {
	__u64 credit_ns;            /* saved-up time; one token costs 1e9 / rate ns */
	__u64 last_ns;              /* when credit was last brought up to date */
};

/* Per-CPU token bucket of the flow monitor. */
struct monitor_bucket {
	struct token_bucket tokens;
	__u32 sampled;              /* new flows skipped since the last sampled one */
	__u32 pad;
};

struct meta {
	enum xdplb_layout layout_version;
	__u32 active_config;        /* 0 or 1: index into `config` */
};

/* ---- maps ---- */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);   /* RCU-freed elements: atomic swap */
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_VIPS);
	__type(key, struct vip_key);
	__type(value, struct vip_value);
} vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, MAGLEV_POOL_CHUNKS);
	__type(key, __u32);
	__type(value, struct maglev_chunk);
} maglev_pool SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct ct_entry);
} conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NAT_ENTRIES);
	__type(key, struct flow_key);
	__type(value, struct nat_entry);
} rev_nat SEC(".maps");

/* Sized like `backends`: there are never more distinct backend addresses
 * than backend records. Entries are replaced whole (RCU-freed elements). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, struct backend_addr);
	__type(value, struct reply_services);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} reply_index SEC(".maps");

/* svc_id -> the service's key (VIP, port, proto), for replies. Written
 * before the service record and unchanged while the id is in use. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct svc_key);
} svc_keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);   /* required for LPM tries */
	__uint(max_entries, MAX_IDENTITY_CIDRS);
	__type(key, struct identity_key);
	__type(value, struct identity_value);
} identities SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_POLICY_ENTRIES);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SERVICES);
	__type(key, __u32);
	__type(value, struct counter);
} svc_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct counter);
} backend_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASON_SLOTS);
	__type(key, __u32);                     /* enum drop_reason */
	__type(value, struct counter);
} drop_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, MAX_DROP_KEYS);
	__type(key, struct drop_key);
	__type(value, struct counter);
} drop_detail SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_SLOTS);
	__type(key, __u32);                     /* enum xdplb_counter */
	__type(value, struct counter);
} global_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct lb_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct meta);
} meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, DEVMAP_ENTRIES);
	__type(key, __u32);
	__type(value, __u32);
} tx_ports SEC(".maps");

/* ifindex -> the MAC of an interface the program is attached to, written
 * by the control plane at attach (dmac.h). */
struct if_mac {
	__u8 addr[6];
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEVMAP_ENTRIES);
	__type(key, __u32);
	__type(value, struct if_mac);
} if_macs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct probe_result);
} probe SEC(".maps");

/* Per CPU: each CPU refreshes its own copy, so no entry is ever written
 * by two CPUs at once and no reader sees half of a MAC address. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_PERCPU_HASH);
	__uint(max_entries, NEXTHOP_ENTRIES);
	__type(key, struct nexthop_key);
	__type(value, struct nexthop);
} nexthops SEC(".maps");

/* Next hops the program found unresolved and could not hand to the kernel
 * (forward.h): key = the next hop's address, value = its interface. The
 * control plane drains it and asks the kernel to resolve each one
 * (lb/neighbours.py). Written only on that rare path. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, NEIGH_REQUEST_ENTRIES);
	__type(key, struct nexthop_key);
	__type(value, __u32);
} neigh_requests SEC(".maps");

/* Client-IP affinity (affinity.h): a client's last backend per service. */
struct affinity_key {
	__u32 client[4];
	__u32 svc_id;
	__u32 family;
};

struct affinity_value {
	__u64 last_ns;              /* bpf_ktime_get_ns() of the client's last new flow */
	__u32 backend_id;
	__u32 backend_gen;          /* the incarnation of backend_id it meant */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AFFINITY_ENTRIES);
	__type(key, struct affinity_key);
	__type(value, struct affinity_value);
} affinity SEC(".maps");

/* Flow events (struct flow_event) for `xdplb monitor`. A ring buffer has
 * one consumer position: only one reader at a time sees every event. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_RING_BYTES);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct monitor_bucket);
} monitor_bucket SEC(".maps");

/* Per-CPU token bucket of the flood guard (guard.h). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct token_bucket);
} flood_bucket SEC(".maps");

/* Per-CPU room for the records of subprograms whose frame, added to the
 * entry program's, would pass the verifier's 512 bytes: a FIB request
 * (forward.h) and a reverse-NAT entry (nat.h). Not state: written and read
 * within one call. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bpf_fib_lookup);
} fib_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nat_entry);
} nat_scratch SEC(".maps");

/* Per-CPU token bucket of the no-backend rejects (reject.h). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct token_bucket);
} reject_bucket SEC(".maps");

/* An ICMP error message as icmp_error.h found it in the frame. Offsets
 * from the frame's start, not pointers: it lives in icmp_scratch, and a
 * map value cannot hold a packet pointer. */
struct icmp_quote {
	struct flow_key flow;       /* the quoted packet's, as it was sent */
	__u16 icmp_off;             /* the ICMP header */
	__u16 quote_len;            /* bytes of the quote in the message and in the frame */
};

/* Per-CPU room for the records of the ICMP error path (icmp_error.h),
 * whose program's stack, with the reply lookups' subprograms under it,
 * went past the verifier's 512 bytes. */
struct icmp_work {
	struct icmp_quote q;
	struct flow_key outer;      /* the error's own flow, restored if not ours */
	struct nat_entry nat;       /* the flow an error to the client is about */
	struct bpf_fib_lookup fib;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct icmp_work);
} icmp_scratch SEC(".maps");

#endif
