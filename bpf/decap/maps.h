/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The decapsulation program's maps and the structs stored in them; the
 * control plane (lb/backend.py) builds its types from this file's BTF.
 * Addresses are 16 bytes with a family beside them; an IPv4 address sits in
 * addr[0] in network byte order, addr[1..3] zero. Ports are in network order.
 */
#ifndef DECAP_MAPS_H
#define DECAP_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "constants.h"

struct counter {
	__u64 packets;
	__u64 bytes;
};

/* A VIP this backend serves: `vips` key. */
struct decap_addr {
	enum decap_family family;
	__u32 addr[4];
};

/* An address tunnels are accepted on, per ingress interface: a packet is
 * decapsulated only if its outer destination is one of the interface it
 * arrived on. Keyed by interface so that detaching one interface removes
 * exactly its entries. */
struct tunnel_dst {
	__u32 ifindex;
	enum decap_family family;
	__u32 addr[4];
};

struct decap_config {
	enum decap_layout layout_version;   /* written by the control plane */
	__u16 gue_port;                     /* network order; 0 = GUE off */
	__u16 pad;
};

/* VIP -> packets and bytes (as received) decapsulated towards it. Per CPU:
 * a counter, no atomics. The control plane adds and removes keys. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, DECAP_MAX_VIPS);
	__type(key, struct decap_addr);
	__type(value, struct counter);
} vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DECAP_MAX_TUNNEL_DSTS);
	__type(key, struct tunnel_dst);
	__type(value, __u32);               /* unused (1) */
} tunnel_dsts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct decap_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DECAP_CNT_MAX);
	__type(key, __u32);                 /* enum decap_counter */
	__type(value, struct counter);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DECAP_DROP_MAX);
	__type(key, __u32);                 /* enum decap_drop */
	__type(value, struct counter);
} drops SEC(".maps");

#endif
