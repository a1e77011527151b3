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
 *   - TOS: the inner DSCP, ECN Not-ECT (RFC 6040's compatibility mode: the
 *     decapsulation does not copy a CE mark into the inner header, so an
 *     ECN-capable outer header would turn congestion marks into nothing).
 *   - DF set and id 0 (RFC 6864, an atomic datagram: the decapsulation
 *     drops outer fragments); TTL 64.
 *   - GUE: UDP source port 49152 + 14 bits of the flow hash (RFC 8086's
 *     choice for tunnels over UDP: the backend's RSS spreads flows, and one
 *     flow stays on one queue), destination lb_config.gue_port, checksum 0
 *     (allowed over IPv4; the inner packet carries its own).
 *
 * MTU: a packet that would outgrow the egress MTU is not sent; the caller
 * answers the client with ICMP fragmentation needed carrying the MTU less
 * the overhead (reject.h), so that path MTU discovery works.
 *
 * The outer family is the backend's and the inner one the client's: both
 * are parameters here. Outer IPv6 headers are for later: a backend of
 * another family than IPv4 is DROP_ENCAP until then.
 */
#ifndef XDPLB_ENCAP_H
#define XDPLB_ENCAP_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include "csum.h"
#include "counters.h"
#include "forward.h"
#include "maglev.h"
#include "parse.h"

#define IP_DF 0x4000
#define ENCAP_TTL 64
#define ENCAP_ECN_MASK 0x03
/* GUE source ports: the dynamic range's top quarter, 14 bits of hash. */
#define GUE_SPORT_BASE 49152
#define GUE_SPORT_BITS 0x3fff

#define SVC_F_ENCAP (SVC_F_IPIP | SVC_F_GUE)
/* Outer IPv4 + UDP; grows to IPv6's 48 with outer IPv6 headers. */
#define ENCAP_MAX_OVERHEAD (sizeof(struct iphdr) + sizeof(struct udphdr))

/* How one packet leaves in its tunnel. */
struct encap {
	const struct encap_source *src;
	__u32 hash;                 /* per-flow entropy: outer source bits, GUE source port */
	__u16 inner_len;            /* the client's packet, IP header included */
	__u16 overhead;             /* outer IP (+ UDP) header bytes */
	__u8 family;                /* outer family: the backend's */
	__u8 proto;                 /* outer IP protocol: 4, 41 or 17 */
	__u8 gue;
};

/* The outer IP protocol of IPIP for an inner family. */
static __always_inline __u8 ipip_protocol(__u8 inner_family)
{
	return inner_family == FAMILY_IPV6 ? IPPROTO_IPV6 : IPPROTO_IPIP;
}

static __always_inline __u32 outer_ip_len(__u8 outer_family)
{
	return outer_family == FAMILY_IPV6 ? 40 : sizeof(struct iphdr);
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

/* The outer IPv4 source: the configured address, its spread bits from the
 * hash (the hash's top half; the GUE port takes the bottom). */
static __always_inline __u32 outer_source_v4(const struct encap *e)
{
	return bpf_htonl(bpf_ntohl(e->src->addr[0]) | ((e->hash >> 16) & e->src->spread_mask));
}

/* The tunnel of `pkt` to backend `b` (`svc_flags`: SVC_F_IPIP or
 * SVC_F_GUE); DROP_ENCAP without a source of the backend's family (outer
 * IPv6 headers come with IPv6 support). */
static __always_inline enum drop_reason encap_plan(const struct packet *pkt,
						   const struct backend *b,
						   const struct lb_config *cfg, __u32 svc_flags,
						   struct encap *e)
{
	e->family = b->family;
	e->src = encap_source(cfg, e->family);
	if (e->family != FAMILY_IPV4 || e->src->family != e->family)
		return DROP_ENCAP;
	e->gue = (svc_flags & SVC_F_GUE) != 0;
	e->overhead = outer_ip_len(e->family) + (e->gue ? sizeof(struct udphdr) : 0);
	e->proto = e->gue ? IPPROTO_UDP : ipip_protocol(pkt->flow.family);
	e->inner_len = bpf_ntohs(pkt->ip->tot_len);
	/* Only GUE's source port and a source prefix use it. */
	e->hash = e->gue || e->src->spread_mask ? encap_hash(&pkt->flow, cfg->hash_seed) : 0;
	return DROP_NONE;
}

/* The next hop of the tunnel packet, as next_hop_sized() asks the FIB
 * about it: the length it will have, so that a route's MTU answers
 * FRAG_NEEDED. */
static __always_inline int encap_next_hop(struct xdp_md *ctx, const struct packet *pkt,
					  const struct encap *e, __u32 daddr,
					  const struct lb_config *cfg, struct bpf_fib_lookup *fib)
{
	return next_hop_sized(ctx, pkt, outer_source_v4(e), daddr, e->inner_len + e->overhead,
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

static __always_inline void outer_ipv4(struct iphdr *ip, const struct encap *e, __u32 daddr,
				       __u8 tos)
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
	ip->saddr = outer_source_v4(e);
	ip->daddr = daddr;
	ip->check = ~ipv4_header_sum(ip);
}

/* Put the outer headers in front of the inner packet. 0 on success:
 * pkt->eth and pkt->ip then point at the new link-layer and outer IP
 * headers (every older packet pointer is gone); -1 if the frame has no
 * headroom. A subprogram: its packet pointers and header fields, in the
 * entry program's frame, left too little of the verifier's 512 bytes. */
static __noinline int encap_push(struct xdp_md *ctx, struct packet *pkt,
				 const struct encap *e, const struct backend *b,
				 const struct lb_config *cfg)
{
	__u32 l2_len = (void *)pkt->ip - (void *)pkt->eth;   /* 14, or 18 with a VLAN tag */
	/* Recomputed rather than read back: a value reloaded after the call
	 * below would lose the bound the verifier needs. */
	__u32 overhead = outer_ip_len(e->family) + (e->gue ? sizeof(struct udphdr) : 0);
	__u8 tos = pkt->ip->tos;
	void *data, *data_end, *old;
	__be16 *ether_type;
	struct iphdr *ip;
	struct udphdr *udp;

	if (overhead > ENCAP_MAX_OVERHEAD)
		return -1;      /* outer IPv6: not yet */
	if (bpf_xdp_adjust_head(ctx, -(int)overhead))
		return -1;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	old = data + overhead;
	/* [new l2][outer][old l2][inner]: the old link-layer header moves to
	 * the front (it does not overlap: 18 < 20 bytes of outer header). Any
	 * frame we encapsulate is longer than both bounds (the inner IP and
	 * L4 headers follow); the verifier needs each pointer checked. */
	if (data + ENCAP_MAX_OVERHEAD + ETH_HLEN + VLAN_HLEN > data_end ||
	    old + ETH_HLEN + VLAN_HLEN > data_end)
		return -1;
	__builtin_memcpy(data, old, ETH_HLEN);
	ether_type = &((struct ethhdr *)data)->h_proto;
	if (l2_len != ETH_HLEN) {
		__builtin_memcpy(data + ETH_HLEN, old + ETH_HLEN, VLAN_HLEN);
		ether_type = &((struct vlan_hdr *)(data + ETH_HLEN))->encap_proto;
		l2_len = ETH_HLEN + VLAN_HLEN;
	}
	*ether_type = bpf_htons(e->family == FAMILY_IPV6 ? ETH_P_IPV6 : ETH_P_IP);

	ip = data + l2_len;
	udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > data_end)
		return -1;
	outer_ipv4(ip, e, b->addr[0], tos);
	if (e->gue) {
		udp->source = bpf_htons(GUE_SPORT_BASE | (e->hash & GUE_SPORT_BITS));
		udp->dest = cfg->gue_port;
		udp->len = bpf_htons(e->inner_len + sizeof(*udp));
		udp->check = 0;
	}
	pkt->eth = data;
	pkt->ip = ip;
	pkt->tcp = NULL;
	pkt->udp = NULL;
	return 0;
}

#endif
