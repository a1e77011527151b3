/* SPDX-License-Identifier: Apache-2.0 */
/* Next hop from the kernel's FIB, then XDP_REDIRECT through the devmap. */
#ifndef XDPLB_FORWARD_H
#define XDPLB_FORWARD_H

#include "counters.h"
#include "parse.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* Fill `fib` for a packet of `tot_len` bytes and L4 protocol `proto` that
 * will leave with (saddr, daddr). Returns the bpf_fib_lookup() result;
 * BPF_FIB_LKUP_RET_FRAG_NEEDED (with fib->mtu_result) when `tot_len`
 * exceeds the route's MTU. */
static __always_inline int fib_route(struct xdp_md *ctx, const struct packet *pkt,
				     __u32 saddr, __u32 daddr, __u16 tot_len, __u8 proto,
				     struct bpf_fib_lookup *fib)
{
	fib->family = AF_INET;
	fib->tos = pkt->ip->tos;
	fib->l4_protocol = proto;
	fib->tot_len = tot_len;
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	fib->ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* The next hop for a packet of `tot_len` bytes and protocol `proto` from
 * saddr to daddr: from the per-CPU cache while fresh, else from the FIB
 * (then cached for cfg->nexthop_ttl_ms). The cache is keyed by destination
 * only, so source-based policy routing (and a changed MTU) is honoured at
 * most one TTL late; a TTL of 0 turns the cache off. A cached answer checks
 * no MTU: on success fib->mtu_result is the egress device's MTU, or 0 if
 * not known (no cache), for callers whose packet grows (encap.h). */
/* Cache a successful FIB answer for `daddr` until `now` + cfg->nexthop_ttl_ms,
 * with the egress device's MTU, which it also leaves in fib->mtu_result.
 * A subprogram: it runs once per destination and TTL, and its record in
 * the entry program's frame left too little of the verifier's 512 bytes. */
static __noinline void nexthop_remember(struct xdp_md *ctx, __u32 daddr,
					struct bpf_fib_lookup *fib,
					const struct lb_config *cfg, __u64 now)
{
	struct nexthop_key key = { .family = FAMILY_IPV4 };
	struct nexthop fresh = {};
	__u32 mtu = 0;

	/* Any length: only the MTU it reports is wanted (always set). */
	if (bpf_check_mtu(ctx, fib->ifindex, &mtu, 0, 0) < 0)
		mtu = 0;
	key.addr[0] = daddr;
	fresh.expires_ns = now + (__u64)cfg->nexthop_ttl_ms * 1000000;
	fresh.ifindex = fib->ifindex;
	fresh.mtu = mtu;
	fib->mtu_result = mtu;
	__builtin_memcpy(fresh.smac, fib->smac, ETH_ALEN);
	__builtin_memcpy(fresh.dmac, fib->dmac, ETH_ALEN);
	bpf_map_update_elem(&nexthops, &key, &fresh, BPF_ANY);
}

static __always_inline int next_hop_sized(struct xdp_md *ctx, const struct packet *pkt,
					  __u32 saddr, __u32 daddr, __u16 tot_len, __u8 proto,
					  const struct lb_config *cfg, struct bpf_fib_lookup *fib)
{
	struct nexthop_key key = { .family = FAMILY_IPV4 };
	struct nexthop *nh;
	__u64 now = 0;
	int rc;

	key.addr[0] = daddr;
	if (cfg->nexthop_ttl_ms) {
		now = bpf_ktime_get_coarse_ns();
		nh = bpf_map_lookup_elem(&nexthops, &key);
		if (nh && nh->expires_ns > now) {
			fib->ifindex = nh->ifindex;
			fib->mtu_result = nh->mtu;
			__builtin_memcpy(fib->smac, nh->smac, ETH_ALEN);
			__builtin_memcpy(fib->dmac, nh->dmac, ETH_ALEN);
			return BPF_FIB_LKUP_RET_SUCCESS;
		}
	}
	rc = fib_route(ctx, pkt, saddr, daddr, tot_len, proto, fib);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		fib->mtu_result = 0;
		if (cfg->nexthop_ttl_ms && !dry_run)
			nexthop_remember(ctx, daddr, fib, cfg, now);
	}
	return rc;
}

/* The next hop of the packet itself, rewritten to (saddr, daddr). */
static __always_inline int next_hop(struct xdp_md *ctx, const struct packet *pkt,
				    __u32 saddr, __u32 daddr, const struct lb_config *cfg,
				    struct bpf_fib_lookup *fib)
{
	return next_hop_sized(ctx, pkt, saddr, daddr, bpf_ntohs(pkt->ip->tot_len),
			      pkt->ip->protocol, cfg, fib);
}

/* Did `pkt` come in by the interface the route from saddr to daddr leaves
 * by? From the next-hop cache while fresh, else from the FIB (NO_NEIGH
 * still names the device); nothing is cached here. A subprogram: called
 * where the entry program's stack has no room for a FIB request. */
static __noinline int arrived_by_route(struct xdp_md *ctx, const struct packet *pkt,
				       const struct lb_config *cfg, __u32 saddr, __u32 daddr)
{
	struct nexthop_key key = { .family = FAMILY_IPV4 };
	struct bpf_fib_lookup fib = {};
	__u32 ingress = ctx->ingress_ifindex, egress = 0;
	struct nexthop *nh;
	int rc;

	key.addr[0] = daddr;
	if (cfg->nexthop_ttl_ms) {
		nh = bpf_map_lookup_elem(&nexthops, &key);
		if (nh && nh->expires_ns > bpf_ktime_get_coarse_ns())
			egress = nh->ifindex;
	}
	if (!egress) {
		rc = fib_route(ctx, pkt, saddr, daddr, bpf_ntohs(pkt->ip->tot_len),
			       pkt->ip->protocol, &fib);
		if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH)
			egress = fib.ifindex;
	}
	return egress && egress == ingress;
}

/* What a FIB answer means for a packet: DROP_NONE to go on (by XDP, or
 * by the kernel), or why it cannot.
 *
 * Two answers XDP cannot use the kernel can finish: a missing neighbour
 * (the kernel forwards the packet and resolves it, so the next packet
 * takes the fast path) and a packet bigger than the egress MTU (the kernel
 * fragments it or sends ICMP). But only a packet whose source address is
 * still the sender's: one from the SNAT address is a martian to the kernel
 * (its own address), one from a VIP may be one too, or fail rp_filter, and
 * the kernel drops either without resolving anything, for every packet of
 * the flow. Those are dropped and counted here, and the next hop is handed
 * to the control plane (neigh_requests), which has it resolved; the
 * sender's retransmission then finds it. */
static __always_inline enum drop_reason fib_verdict(int rc, const struct bpf_fib_lookup *fib,
						    int source_rewritten)
{
	struct nexthop_key key = { .family = FAMILY_IPV4 };
	__u32 ifindex = fib->ifindex;

	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		return DROP_NONE;
	if (rc != BPF_FIB_LKUP_RET_NO_NEIGH && rc != BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return DROP_FIB;
	if (!source_rewritten)
		return DROP_NONE;
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return DROP_MTU;
	/* On NO_NEIGH the FIB left the next hop's address and interface. */
	key.addr[0] = fib->ipv4_dst;
	if (!dry_run)
		bpf_map_update_elem(&neigh_requests, &key, &ifindex, BPF_ANY);
	return DROP_NO_NEIGH;
}

/* Send a rewritten packet to its next hop. */
static __always_inline int transmit(struct xdp_md *ctx, struct packet *pkt,
				    const struct bpf_fib_lookup *fib, int rc)
{
	int action;

	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {   /* fib_verdict() said the kernel can finish it */
		count_global(CNT_NEIGH_PASS, pkt->len);
		return count_verdict(XDP_PASS, pkt->len);
	}
	__builtin_memcpy(pkt->eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_source, fib->smac, ETH_ALEN);
	/* Through the devmap even when the packet leaves by the interface it
	 * came in on: on veth, XDP_TX does not wake the peer's NAPI unless the
	 * peer runs XDP itself (veth_xdp_flush), so the frames sat in its ring
	 * until other traffic came by; a redirect flushes. An egress device
	 * that xdplb is not attached to is not in the devmap: the kernel
	 * forwards the (already rewritten) packet instead. */
	action = bpf_redirect_map(&tx_ports, fib->ifindex, XDP_PASS);
	return count_verdict(action, pkt->len);
}

#endif
