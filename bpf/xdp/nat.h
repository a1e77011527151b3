/* SPDX-License-Identifier: Apache-2.0 */
/* Address/port rewriting, SNAT port allocation and the reverse-NAT table. */
#ifndef XDPLB_NAT_H
#define XDPLB_NAT_H

#include "csum.h"
#include "counters.h"
#include "parse.h"

/* The rewrite a packet gets: new source and destination, all in network
 * byte order. The addresses are the 16-byte words of the packet's family
 * (IPv4 in word 0), pointed at where they already are (the flow, a backend
 * record, the config): four bytes of stack each instead of sixteen. */
struct rewrite {
	const __u32 *saddr;
	const __u32 *daddr;
	__u16 sport;
	__u16 dport;
};

/* Replace a 16-byte IPv6 address covered by *sum (the L4 pseudo-header). */
static __always_inline void csum_replace16(__u16 *sum, const __u32 *from, const __u32 *to)
{
#pragma unroll
	for (int i = 0; i < 4; i++)
		csum_replace4(sum, from[i], to[i]);
}

/* IPv6 addresses: no IP checksum, only the L4 one through the pseudo-header. */
static __always_inline void rewrite_addrs_v6(struct ipv6hdr *ip6, __u16 *l4sum,
					     const struct rewrite *rw)
{
	__u32 *saddr = (__u32 *)&ip6->saddr, *daddr = (__u32 *)&ip6->daddr;

	if (l4sum) {
		csum_replace16(l4sum, saddr, rw->saddr);
		csum_replace16(l4sum, daddr, rw->daddr);
	}
	__builtin_memcpy(saddr, rw->saddr, 16);
	__builtin_memcpy(daddr, rw->daddr, 16);
}

/* Rewrite the addresses and L4 ports, updating the IPv4 header checksum and
 * the TCP/UDP checksum incrementally. The L4 checksum covers the addresses
 * via the pseudo-header, so it changes with them. A UDP checksum of 0 means
 * "none" (IPv4 only) and stays 0; a computed 0 is sent as 0xffff. */
static __always_inline void rewrite_packet(struct xdp_md *ctx, struct packet *pkt,
					   const struct rewrite *rw)
{
	struct iphdr *ip = pkt->ip;
	__u16 *l4sum = NULL;
	__u16 *sport, *dport;
	int udp = pkt->flow.proto == IPPROTO_UDP;

	if (pkt->flow.proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4_header(ctx, pkt, sizeof(*tcp));

		if (!tcp)
			return;
		l4sum = &tcp->check;
		sport = &tcp->source;
		dport = &tcp->dest;
	} else if (udp) {
		struct udphdr *uh = l4_header(ctx, pkt, sizeof(*uh));

		if (!uh)
			return;
		if (uh->check)
			l4sum = &uh->check;
		sport = &uh->source;
		dport = &uh->dest;
	} else {
		return;
	}

	if (ip) {
		if (ip->saddr != rw->saddr[0]) {
			csum_replace4(&ip->check, ip->saddr, rw->saddr[0]);
			if (l4sum)
				csum_replace4(l4sum, ip->saddr, rw->saddr[0]);
			ip->saddr = rw->saddr[0];
		}
		if (ip->daddr != rw->daddr[0]) {
			csum_replace4(&ip->check, ip->daddr, rw->daddr[0]);
			if (l4sum)
				csum_replace4(l4sum, ip->daddr, rw->daddr[0]);
			ip->daddr = rw->daddr[0];
		}
	} else if (pkt->ip6) {
		rewrite_addrs_v6(pkt->ip6, l4sum, rw);
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
	if (udp && l4sum && *l4sum == 0)
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

/* The SNAT source of `family`'s NAT services, configured or not. */
static __always_inline const struct snat_source *snat_source(const struct lb_config *cfg,
							     __u8 family)
{
	return family == FAMILY_IPV6 ? &cfg->snat_v6 : &cfg->snat_v4;
}

/* SNAT mode for `family`; without it that family's NAT is gateway mode. */
static __always_inline int snat_on(const struct lb_config *cfg, __u8 family)
{
	return snat_source(cfg, family)->family == family;
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

/* The reverse-NAT entry of a new flow `flow` that leaves as `rw` for
 * `ct`'s backend: in SNAT mode it first claims a source port (written to
 * rw->sport and ct->nat_port). Returns DROP_NONE or why the flow cannot go.
 * A subprogram, not inlined, with the entry in nat_scratch: its two
 * structs on the stack, with the entry program's frame under them, went
 * past the verifier's 512 bytes. */
static __noinline int reverse_nat_store(const struct flow_key *flow, struct rewrite *rw,
					struct ct_entry *ct, const struct lb_config *cfg, __u32 hash)
{
	__u32 zero = 0;
	struct nat_entry *nat = bpf_map_lookup_elem(&nat_scratch, &zero);
	/* The reply: backend -> client, or backend -> SNAT address:port. */
	struct flow_key rkey = {
		.sport = rw->dport,
		.dport = rw->sport,
		.proto = flow->proto,
		.family = flow->family,
	};

	if (!nat)
		return DROP_CT_FULL;
	nat->client_port = flow->sport;
	nat->vip_port = flow->dport;
	nat->ifindex = ct->ifindex;
	nat->svc_id = ct->svc_id;
	nat->backend_id = ct->backend_id;
	__builtin_memcpy(nat->client, flow->src, sizeof(nat->client));
	__builtin_memcpy(nat->vip, flow->dst, sizeof(nat->vip));
	__builtin_memcpy(rkey.src, rw->daddr, sizeof(rkey.src));
	__builtin_memcpy(rkey.dst, rw->saddr, sizeof(rkey.dst));
	/* Gateway mode for this family: the entry is only for replies. */
	if (!snat_on(cfg, flow->family))
		return nat_store(&rkey, nat) ? DROP_CT_FULL : DROP_NONE;
	ct->nat_port = nat_port_take(&rkey, nat, cfg, hash);
	if (!ct->nat_port)
		return DROP_NAT_EXHAUSTED;
	rw->sport = ct->nat_port;
	return DROP_NONE;
}

#endif
