/* SPDX-License-Identifier: Apache-2.0 */
/* Address/port rewriting, SNAT port allocation and the reverse-NAT table. */
#ifndef XDPLB_NAT_H
#define XDPLB_NAT_H

#include "csum.h"
#include "counters.h"
#include "parse.h"

/* The rewrite a packet gets: new source and destination, all in network
 * byte order. */
struct rewrite {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

/* Rewrite IPv4 addresses and L4 ports, updating the IP checksum and the
 * TCP/UDP checksum incrementally. The L4 checksum covers the addresses via
 * the pseudo-header, so it changes with them. A UDP checksum of 0 means
 * "none" (IPv4 only) and stays 0; a computed 0 is sent as 0xffff. */
static __always_inline void rewrite_packet(struct packet *pkt, const struct rewrite *rw)
{
	struct iphdr *ip = pkt->ip;
	__u16 *l4sum = NULL;
	__u16 *sport, *dport;

	if (pkt->tcp) {
		l4sum = &pkt->tcp->check;
		sport = &pkt->tcp->source;
		dport = &pkt->tcp->dest;
	} else if (pkt->udp) {
		if (pkt->udp->check)
			l4sum = &pkt->udp->check;
		sport = &pkt->udp->source;
		dport = &pkt->udp->dest;
	} else {
		return;
	}

	if (ip->saddr != rw->saddr) {
		csum_replace4(&ip->check, ip->saddr, rw->saddr);
		if (l4sum)
			csum_replace4(l4sum, ip->saddr, rw->saddr);
		ip->saddr = rw->saddr;
	}
	if (ip->daddr != rw->daddr) {
		csum_replace4(&ip->check, ip->daddr, rw->daddr);
		if (l4sum)
			csum_replace4(l4sum, ip->daddr, rw->daddr);
		ip->daddr = rw->daddr;
	}
	if (*sport != rw->sport) {
		if (l4sum)
			csum_replace2(l4sum, *sport, rw->sport);
		*sport = rw->sport;
	}
	if (*dport != rw->dport) {
		if (l4sum)
			csum_replace2(l4sum, *dport, rw->dport);
		*dport = rw->dport;
	}
	if (pkt->udp && l4sum && *l4sum == 0)
		*l4sum = 0xffff;
}

static __always_inline struct lb_config *active_config(void)
{
	__u32 zero = 0, idx;
	struct meta *m = bpf_map_lookup_elem(&meta, &zero);

	if (!m)
		return NULL;
	idx = m->active_config & 1;
	return bpf_map_lookup_elem(&config, &idx);
}

/* Claim a SNAT source port for the reply key `rkey` (whose dport is the
 * port). Linear probing from a hash-chosen start; BPF_NOEXIST makes the
 * claim race-free between CPUs. Returns the port in network order, or 0. */
static __always_inline __u16 nat_port_take(struct flow_key *rkey, const struct nat_entry *nat,
					   const struct lb_config *cfg, __u32 hash)
{
	__u32 range, i;

	if (cfg->snat_port_max < cfg->snat_port_min)
		return 0;
	range = (__u32)cfg->snat_port_max - cfg->snat_port_min + 1;
#pragma unroll
	for (i = 0; i < NAT_PORT_PROBES; i++) {
		__u16 port = cfg->snat_port_min + (hash + i) % range;

		rkey->dport = bpf_htons(port);
		if (dry_run) {
			if (!bpf_map_lookup_elem(&rev_nat, rkey))
				return rkey->dport;
			continue;
		}
		if (!bpf_map_update_elem(&rev_nat, rkey, nat, BPF_NOEXIST))
			return rkey->dport;
	}
	return 0;
}

static __always_inline int nat_store(const struct flow_key *rkey, const struct nat_entry *nat)
{
	if (dry_run)
		return 0;
	return bpf_map_update_elem(&rev_nat, rkey, nat, BPF_ANY);
}

#endif
