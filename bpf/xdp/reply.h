/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Gateway-mode replies, found without a per-flow reverse-NAT entry.
 *
 * A reply (backend -> client) belongs to a client flow (client -> VIP)
 * whose conntrack entry already exists. The VIP is the one part of that
 * flow the reply does not carry: reply_index gives the services that the
 * reply's source address serves (usually one), svc_keys their VIPs, and a
 * candidate counts only if its conntrack entry points at this very backend.
 * So a new flow writes one LRU entry instead of two (an insert into a full
 * LRU costs ~400 ns, README "Benchmarks"), and a reply pays two lookups
 * more than a reverse-NAT hit.
 */
#ifndef XDPLB_REPLY_H
#define XDPLB_REPLY_H

#include "conntrack.h"

/* Fill `nat` for `reply` if it answers a gateway-mode flow; 0 if not. */
static __always_inline int reply_from_index(const struct flow_key *reply, struct nat_entry *nat)
{
	struct backend_addr key = {
		.port = reply->sport,
		.proto = reply->proto,
		.family = reply->family,
	};
	struct flow_key flow = {
		.sport = reply->dport,
		.proto = reply->proto,
		.family = reply->family,
	};
	struct reply_services *rs;
	int i;

	__builtin_memcpy(key.addr, reply->src, sizeof(key.addr));
	rs = bpf_map_lookup_elem(&reply_index, &key);
	if (!rs)
		return 0;
	__builtin_memcpy(flow.src, reply->dst, sizeof(flow.src));
	for (i = 0; i < REPLY_INDEX_SVCS; i++) {
		__u32 svc_id = rs->svc_id[i];
		struct svc_key *sk;
		struct ct_entry *ct;
		struct backend *b;

		if (svc_id == ID_NONE)
			break;
		sk = bpf_map_lookup_elem(&svc_keys, &svc_id);
		if (!sk)
			continue;
		__builtin_memcpy(flow.dst, sk->vip, sizeof(flow.dst));
		flow.dport = sk->port;
		ct = bpf_map_lookup_elem(&conntrack, &flow);
		/* An SNAT entry's replies have their own reverse-NAT entry. */
		if (!ct || ct->nat_port)
			continue;
		b = ct_backend(ct, svc_id);
		if (!b || b->addr[0] != reply->src[0] || b->port != reply->sport)
			continue;
		__builtin_memcpy(nat->client, reply->dst, sizeof(nat->client));
		__builtin_memcpy(nat->vip, sk->vip, sizeof(nat->vip));
		nat->client_port = reply->dport;
		nat->vip_port = sk->port;
		nat->ifindex = ct->ifindex;
		nat->svc_id = svc_id;
		nat->backend_id = ct->backend_id;
		return 1;
	}
	return 0;
}

#endif
