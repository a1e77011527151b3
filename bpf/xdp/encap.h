/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Direct server return: the client's packet, unchanged, inside an outer
 * header towards the backend (SVC_F_IPIP: IP in IP; SVC_F_GUE: IP in UDP,
 * GUE variant 1), put in front with bpf_xdp_adjust_head(). The backend's
 * decapsulation (bpf/decap) strips it and the backend answers the client
 * directly, from the VIP: replies never cross the load balancer, so a DSR
 * flow writes its conntrack entry and nothing else.
 *
 *   [eth][vlan?][inner IP ...] -> [eth][vlan?][outer IP][UDP?][inner IP ...]
 *
 * The inner packet stays where it is; only the link-layer header moves to
 * the new start of the frame. The outer header:
 *   - source: lb_config's encap source of the outer family; configured as a
 *     prefix, its host bits come from the flow's hash, so that a backend
 *     whose NIC hashes only the outer addresses (IPIP) still spreads flows
 *     over its receive queues. Destination: the backend.
 *   - TOS / traffic class: the inner DSCP, ECN Not-ECT (RFC 6040's
 *     compatibility mode: the decapsulation does not copy a CE mark into
 *     the inner header, so an ECN-capable outer header would turn
 *     congestion marks into nothing).
 *   - IPv4: DF set and id 0 (RFC 6864, an atomic datagram: the
 *     decapsulation drops outer fragments); TTL 64.
 *   - IPv6: hop limit 64, the flow label 20 bits of the flow's hash (RFC
 *     6438: a backend's RSS that reads the label spreads tunnelled flows
 *     over its queues, one flow on one queue), no extension headers.
 *   - GUE: UDP source port 49152 + 14 bits of the flow hash (RFC 8086's
 *     choice for tunnels over UDP: the backend's RSS spreads flows, and one
 *     flow stays on one queue), destination lb_config.gue_port, checksum 0.
 *     Over IPv4 a zero checksum is plain UDP. Over IPv6 it is RFC 6935's
 *     exemption for tunnels, used within RFC 6936's limits: the inner
 *     packet carries its own checksums, which the backend's stack checks,
 *     and the receiver is our decapsulation (bpf/decap), which accepts zero
 *     (a kernel `fou` receiver needs its zero-checksum option). Computing
 *     it would cost a pass over every payload byte of every packet.
 *
 * Families: the outer one is the backend's, the inner one the client's,
 * and every pair is sent (4in4, 6in6, 4in6, 6in4); both are parameters of
 * the same functions here.
 *
 * MTU: a packet that would outgrow the egress MTU is not sent; the caller
 * answers the client with ICMP fragmentation needed (IPv4 with DF) or
 * ICMPv6 packet too big carrying the MTU less the overhead (reject.h), so
 * that path MTU discovery works.
 */
#ifndef XDPLB_ENCAP_H
#define XDPLB_ENCAP_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include "csum.h"
#include "counters.h"
#include "forward.h"
#include "maglev.h"
#include "parse.h"

#define IP_DF 0x4000
#define ENCAP_TTL 64
#define ENCAP_FLOW_LABEL_MASK 0xfffff
#define ENCAP_ECN_MASK 0x03
/* GUE source ports: the dynamic range's top quarter, 14 bits of hash. */
#define GUE_SPORT_BASE 49152
#define GUE_SPORT_BITS 0x3fff

#define SVC_F_ENCAP (SVC_F_IPIP | SVC_F_GUE)
/* Outer IPv6 + UDP. */
#define ENCAP_MAX_OVERHEAD (sizeof(struct ipv6hdr) + sizeof(struct udphdr))

/* How one packet leaves in its tunnel. */
struct encap {
	const struct encap_source *src;
	__u32 hash;                 /* per-flow entropy: outer source bits, GUE port, flow label */
	__u16 inner_len;            /* the client's packet, IP header included */
	__u16 overhead;             /* outer IP (+ UDP) header bytes */
	__u8 family;                /* outer family: the backend's */
	__u8 proto;                 /* outer IP protocol: 4, 41 or 17 */
	__u8 gue;
	__u8 tos;                   /* the client's TOS or traffic class */
	__u8 l2_len;                /* 14, or 18 with a VLAN tag */
};

/* The outer IP protocol of IPIP for an inner family. */
static __always_inline __u8 ipip_protocol(__u8 inner_family)
{
	return inner_family == FAMILY_IPV6 ? IPPROTO_IPV6 : IPPROTO_IPIP;
}

static __always_inline __u32 outer_ip_len(__u8 outer_family)
{
	return outer_family == FAMILY_IPV6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
}

static __always_inline const struct encap_source *encap_source(const struct lb_config *cfg,
							       __u8 outer_family)
{
	return outer_family == FAMILY_IPV6 ? &cfg->encap_v6 : &cfg->encap_v4;
}

/* The same for every packet of a flow, so that its outer source and GUE
 * port never change (a flow stays on one receive queue of the backend).
 * Computed per packet, also for conntrack hits: cheaper than flow_hash()
 * (two mixing rounds instead of ten) and needing no state. */
static __always_inline __u32 encap_hash(const struct flow_key *flow, __u32 seed)
{
	__u32 h = mix32(seed ^ flow->src[0] ^ flow->src[1] ^ flow->src[2] ^ flow->src[3]);

	return mix32(h ^ (((__u32)flow->sport << 16) | flow->dport) ^ flow->proto);
}

/* The outer source's last word (word 0 of IPv4, 3 of IPv6): the
 * configured address's, its spread bits (at most 16) from the hash's top
 * half; the GUE port takes the bottom. */
static __always_inline __u32 outer_source_word(const struct encap_source *src, __u32 hash,
						__u32 last)
{
	return bpf_htonl(bpf_ntohl(src->addr[last]) | ((hash >> 16) & src->spread_mask));
}

/* The tunnel of `pkt` to backend `b` (`svc_flags`: SVC_F_IPIP or
 * SVC_F_GUE); DROP_ENCAP without a source of the backend's family. */
static __always_inline enum drop_reason encap_plan(const struct packet *pkt,
						   const struct backend *b,
						   const struct lb_config *cfg, __u32 svc_flags,
						   struct encap *e)
{
	e->family = b->family;
	e->src = encap_source(cfg, e->family);
	if (e->src->family != e->family)
		return DROP_ENCAP;
	e->gue = (svc_flags & SVC_F_GUE) != 0;
	e->overhead = outer_ip_len(e->family) + (e->gue ? sizeof(struct udphdr) : 0);
	e->proto = e->gue ? IPPROTO_UDP : ipip_protocol(pkt->flow.family);
	e->inner_len = pkt->ip_len;
	e->tos = pkt->tos;
	/* parse_packet() takes one tag, and the IP header after it. */
	e->l2_len = pkt->eth->h_proto == bpf_htons(ETH_P_8021Q) ||
		pkt->eth->h_proto == bpf_htons(ETH_P_8021AD) ? ETH_HLEN + VLAN_HLEN : ETH_HLEN;
	/* GUE's source port, a source prefix and IPv6's flow label use it. */
	e->hash = e->gue || e->src->spread_mask || e->family == FAMILY_IPV6 ?
		encap_hash(&pkt->flow, cfg->hash_seed) : 0;
	return DROP_NONE;
}

/* The next hop of the tunnel packet, as next_hop_sized() asks the FIB
 * about it: the length it will have, so that a route's MTU answers
 * FRAG_NEEDED. The source it asks with is the configured one, without the
 * flow's spread bits: the prefix is routed as one (and the 16 bytes of an
 * IPv6 source kept per packet did not fit the entry program's stack). */
static __always_inline int encap_next_hop(struct xdp_md *ctx, const struct packet *pkt,
					  const struct encap *e, const __u32 *daddr,
					  const struct lb_config *cfg, struct bpf_fib_lookup *fib)
{
	return next_hop_sized(ctx, pkt, e->family, e->src->addr, daddr, e->inner_len + e->overhead,
			      e->proto, cfg, fib);
}

/* What next-hop answer `rc` means for the tunnel packet: DROP_NONE (it
 * goes, by XDP), DROP_ENCAP_MTU (fib->mtu_result: the MTU the client must
 * use), or why it cannot go. Its outer source is ours: the kernel would
 * take it for a martian, so nothing is handed to the kernel (forward.h). */
static __always_inline enum drop_reason encap_verdict(struct xdp_md *ctx, int rc,
						      struct bpf_fib_lookup *fib,
						      const struct encap *e)
{
	enum drop_reason why;
	__u32 mtu_len;

	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		mtu_len = fib->mtu_result;
	} else {
		why = fib_verdict(rc, fib, 1);
		if (why != DROP_NONE)
			return why;
		/* A cached next hop was never asked about the MTU: the egress
		 * device's is checked for every packet, from the cache when it
		 * has it (bpf_check_mtu() costs ~40 ns), else by the helper. */
		mtu_len = fib->mtu_result;
		if (!mtu_len) {
			mtu_len = e->inner_len;
			rc = bpf_check_mtu(ctx, fib->ifindex, &mtu_len, e->overhead, 0);
			if (rc == BPF_MTU_CHK_RET_SUCCESS)
				return DROP_NONE;
			if (rc < 0)
				return DROP_FIB;
		} else if (e->inner_len + e->overhead <= mtu_len) {
			return DROP_NONE;
		}
	}
	fib->mtu_result = mtu_len > e->overhead ? mtu_len - e->overhead : 0;
	return DROP_ENCAP_MTU;
}

static __always_inline void outer_ipv4(struct iphdr *ip, const struct encap *e,
				       const struct encap_source *src, __u32 daddr, __u8 tos)
{
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = tos & ~ENCAP_ECN_MASK;
	ip->tot_len = bpf_htons(e->inner_len + e->overhead);
	ip->id = 0;
	ip->frag_off = bpf_htons(IP_DF);
	ip->ttl = ENCAP_TTL;
	ip->protocol = e->proto;
	ip->check = 0;
	ip->saddr = outer_source_word(src, e->hash, 0);
	ip->daddr = daddr;
	ip->check = ~ipv4_header_sum(ip);
}

static __always_inline void outer_ipv6(struct ipv6hdr *ip6, const struct encap *e,
				       const struct encap_source *src, const __u32 *daddr, __u8 tos)
{
	__u32 label = e->hash & ENCAP_FLOW_LABEL_MASK;

	tos &= ~ENCAP_ECN_MASK;
	ip6->version = 6;
	ip6->priority = tos >> 4;
	ip6->flow_lbl[0] = (tos << 4) | (label >> 16);
	ip6->flow_lbl[1] = label >> 8;
	ip6->flow_lbl[2] = label;
	ip6->payload_len = bpf_htons(e->inner_len + e->overhead - sizeof(*ip6));
	ip6->nexthdr = e->proto;
	ip6->hop_limit = ENCAP_TTL;
	__builtin_memcpy(&ip6->saddr, src->addr, sizeof(ip6->saddr));
	ip6->saddr.in6_u.u6_addr32[3] = outer_source_word(src, e->hash, 3);
	__builtin_memcpy(&ip6->daddr, daddr, sizeof(ip6->daddr));
}

/* Put the outer headers of `e` in front of the inner packet, towards
 * backend `b`. 0 on success, -1 if the frame has no headroom. A global
 * function: the verifier checks it once, on its own, instead of once for
 * each way the entry program reaches it (families, tags, cache or FIB),
 * which cost it ~100k instructions of its budget. So it sees only ctx and
 * plain memory: every packet pointer of the caller is void after it
 * (encap_apply() makes the one it needs again). */
__noinline int encap_push(struct xdp_md *ctx, const struct encap *e, const struct backend *b,
			  const struct lb_config *cfg)
{
	const struct encap_source *src;
	__u32 outer_len, overhead, l2_len;
	void *data, *data_end, *old, *ip;
	__be16 *ether_type;
	struct udphdr *udp;
	__u8 family;

	if (!ctx || !e || !b || !cfg)
		return -1;
	family = e->family;
	src = encap_source(cfg, family);
	/* Recomputed rather than read: the verifier needs their bounds. */
	outer_len = outer_ip_len(family);
	overhead = outer_len + (e->gue ? sizeof(struct udphdr) : 0);
	l2_len = e->l2_len == ETH_HLEN ? ETH_HLEN : ETH_HLEN + VLAN_HLEN;
	if (bpf_xdp_adjust_head(ctx, -(int)overhead))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	old = data + overhead;
	/* [new l2][outer][old l2][inner]: the old link-layer header moves to
	 * the front (it does not overlap: 18 < 20 bytes of outer header). Any
	 * frame we encapsulate is longer than both bounds (the inner IP and
	 * L4 headers follow); the verifier needs each pointer checked. */
	if (data + ETH_HLEN + VLAN_HLEN > data_end || old + ETH_HLEN + VLAN_HLEN > data_end)
		return -1;
	__builtin_memcpy(data, old, ETH_HLEN);
	ether_type = &((struct ethhdr *)data)->h_proto;
	if (l2_len != ETH_HLEN) {
		__builtin_memcpy(data + ETH_HLEN, old + ETH_HLEN, VLAN_HLEN);
		ether_type = &((struct vlan_hdr *)(data + ETH_HLEN))->encap_proto;
	}
	*ether_type = bpf_htons(family == FAMILY_IPV6 ? ETH_P_IPV6 : ETH_P_IP);

	ip = data + l2_len;
	/* Each family checks its own bound: one shared pointer would leave
	 * the verifier only the shorter one. */
	if (family == FAMILY_IPV6) {
		udp = ip + sizeof(struct ipv6hdr);
		if ((void *)(udp + 1) > data_end)
			return -1;
		outer_ipv6(ip, e, src, b->addr, e->tos);
	} else {
		udp = ip + sizeof(struct iphdr);
		if ((void *)(udp + 1) > data_end)
			return -1;
		outer_ipv4(ip, e, src, b->addr[0], e->tos);
	}
	if (e->gue) {
		udp->source = bpf_htons(GUE_SPORT_BASE | (e->hash & GUE_SPORT_BITS));
		udp->dest = cfg->gue_port;
		udp->len = bpf_htons(e->inner_len + sizeof(*udp));
		udp->check = 0;         /* IPv4, and RFC 6935 over IPv6: see the top */
	}
	return 0;
}

/* encap_push(), and the packet's pointers after it: pkt->eth at the new
 * link-layer header, from a fresh load checked for its own length only;
 * pkt->ip and pkt->ip6 NULL (only the link-layer header is written after
 * this). 0 on success, -1 if nothing can be sent. */
static __always_inline int encap_apply(struct xdp_md *ctx, struct packet *pkt,
				       const struct encap *e, const struct backend *b,
				       const struct lb_config *cfg)
{
	void *data, *data_end;
	int rc = encap_push(ctx, e, b, cfg);

	pkt->ip = NULL;
	pkt->ip6 = NULL;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (rc || data + ETH_HLEN > data_end)
		return -1;
	pkt->eth = data;
	return 0;
}

#endif
