/* SPDX-License-Identifier: Apache-2.0 */
/*
 * xdplb_decap: the backend side of DSR. Attached (XDP) to a backend's
 * interface, it strips the tunnel header the load balancer added and passes
 * the inner packet to the stack, where the VIP is a local address; the
 * backend then answers the client directly.
 *
 * Encapsulations (outer -> inner), the inner family taken from the protocol:
 *   IPv4, protocol 4 (IPIP) or 41 (IPv6)     -> IPv4 or IPv6     DECAP_CNT_IPIP4
 *   IPv6, next header 4 or 41                -> IPv4 or IPv6     DECAP_CNT_IPIP6
 *   IPv4/IPv6 + UDP to config.gue_port, GUE variant 1           DECAP_CNT_GUE4/6
 * GUE variant 1 (draft-ietf-intarea-gue, section 4) has no GUE header: the
 * UDP payload is the inner IP packet, and its first nibble (4 or 6) is the
 * inner version. Variant 0 (a GUE header, first two bits 00) is dropped.
 *
 * A packet is decapsulated only if its outer destination is a tunnel address
 * of the interface it arrived on (`tunnel_dsts`) and its inner destination
 * is a VIP of this backend (`vips`): the program cannot be used to slip
 * arbitrary packets into the host, and routed traffic is left alone. A
 * tunnel packet for us that cannot be decapsulated (lengths that disagree, a
 * cut-short header, a fragment) is dropped, counted by reason in `drops`.
 * Everything else - ARP, ND, the host's own traffic, tunnel packets for
 * other inner destinations - is passed untouched.
 *
 * Not handled (passed untouched, so the kernel decides): frames with a VLAN
 * tag, outer IPv6 extension headers, UDP with outer IPv4 options.
 *
 * The inner packet is not modified, so its checksums stay valid; the stack
 * checks them (and the inner IPv4 header checksum) as for any packet. The
 * outer IPv4 header checksum is checked here, since the stack never sees
 * that header. The outer UDP checksum of GUE is not (zero is allowed).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "constants.h"
#include "maps.h"
#include "../xdp/csum.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Never read. Its type makes clang emit the enums no map layout mentions,
 * so the control plane finds every constant in BTF. */
const volatile struct {
	enum decap_limits limits;
	enum decap_counter counter;
	enum decap_drop drop;
} btf_anchor;

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* Results of the parsing steps besides a drop reason (> 0) or 0 = go on. */
enum {
	NOT_TUNNEL = -1,            /* not a tunnel packet for this interface: pass */
	NOT_VIP = -2,               /* inner destination is not a VIP: pass */
};

/* What the outer headers say; filled by outer_ipv4/outer_ipv6. */
struct tunnel {
	__u32 outer_len;            /* bytes between the Ethernet header and the inner packet */
	__u32 inner_len;            /* bytes the outer headers give the inner packet */
	__u32 inner_version;        /* 4 or 6 */
	enum decap_counter counter; /* counted on success */
};

static __always_inline void count(void *map, __u32 key, __u32 bytes)
{
	struct counter *c = bpf_map_lookup_elem(map, &key);

	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline int pass(enum decap_counter why, __u32 bytes)
{
	count(&stats, why, bytes);
	return XDP_PASS;
}

static __always_inline int drop(enum decap_drop reason, __u32 bytes)
{
	count(&drops, reason, bytes);
	count(&stats, DECAP_CNT_DROP, bytes);
	return XDP_DROP;
}

static __always_inline int is_tunnel_proto(__u8 proto)
{
	return proto == IPPROTO_IPIP || proto == IPPROTO_IPV6 || proto == IPPROTO_UDP;
}

/* GUE's UDP destination port (network order), 0 if GUE is off. */
static __always_inline __u16 gue_port(void)
{
	__u32 zero = 0;
	struct decap_config *cfg = bpf_map_lookup_elem(&config, &zero);

	return cfg ? cfg->gue_port : 0;
}

/* A UDP datagram to the GUE port: `udp` is inside the frame. */
static __always_inline int is_gue(struct udphdr *udp, void *data_end)
{
	__u16 port;

	if ((void *)(udp + 1) > data_end)
		return 0;
	port = gue_port();
	return port && udp->dest == port;
}

/* GUE variant 1: the inner version is the first nibble of the payload. */
static __always_inline int gue_inner_version(void *payload, __u32 len, void *data_end,
					     struct tunnel *t)
{
	__u8 *first = payload;

	if (len < 1 || (void *)(first + 1) > data_end)
		return DECAP_DROP_INNER_TRUNCATED;
	t->inner_version = *first >> 4;
	if (t->inner_version != 4 && t->inner_version != 6)
		return DECAP_DROP_GUE_VERSION;
	return 0;
}

/* The tunnel behind an outer IP header of `ip_len` bytes that carries
 * `payload` bytes of protocol `proto` (GUE if `gue`, `udp` then its UDP
 * header), for either outer family: `ipip` and `gue_cnt` are its counters. */
static __always_inline int tunnel_behind(struct tunnel *t, struct udphdr *udp, void *data_end,
					 __u32 ip_len, __u32 payload, __u8 proto, int gue,
					 enum decap_counter ipip, enum decap_counter gue_cnt)
{
	if (gue) {
		if (bpf_ntohs(udp->len) != payload || payload < sizeof(*udp))
			return DECAP_DROP_BAD_UDP;
		t->outer_len = ip_len + sizeof(*udp);
		t->inner_len = payload - sizeof(*udp);
		t->counter = gue_cnt;
		return gue_inner_version(udp + 1, t->inner_len, data_end, t);
	}
	t->outer_len = ip_len;
	t->inner_len = payload;
	t->inner_version = proto == IPPROTO_IPIP ? 4 : 6;
	t->counter = ipip;
	return 0;
}

static __always_inline int outer_ipv4(struct xdp_md *ctx, struct iphdr *ip, void *data_end,
				      struct tunnel *t)
{
	struct tunnel_dst key = { .ifindex = ctx->ingress_ifindex, .family = DECAP_FAMILY_IPV4 };
	struct udphdr *udp = (void *)(ip + 1);
	__u32 tot_len;
	int gue = 0;

	/* Cheap tests first: most of a backend's traffic is not tunnelled. */
	if ((void *)(ip + 1) > data_end || !is_tunnel_proto(ip->protocol))
		return NOT_TUNNEL;
	if (ip->protocol == IPPROTO_UDP) {
		/* With options the UDP header is elsewhere: not ours (the load
		 * balancer never sends options). */
		if (ip->ihl != 5 || !is_gue(udp, data_end))
			return NOT_TUNNEL;
		gue = 1;
	}
	key.addr[0] = ip->daddr;
	if (!bpf_map_lookup_elem(&tunnel_dsts, &key))
		return NOT_TUNNEL;

	/* Ours from here on: what is wrong is dropped. */
	tot_len = bpf_ntohs(ip->tot_len);
	if (ip->ihl != 5 || tot_len < sizeof(*ip) || (void *)ip + tot_len > data_end ||
	    ipv4_header_sum(ip) != 0xffff)
		return DECAP_DROP_OUTER_BAD_IP;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return DECAP_DROP_OUTER_FRAGMENT;
	return tunnel_behind(t, udp, data_end, sizeof(*ip), tot_len - sizeof(*ip), ip->protocol, gue,
			     DECAP_CNT_IPIP4, DECAP_CNT_GUE4);
}

static __always_inline int outer_ipv6(struct xdp_md *ctx, struct ipv6hdr *ip6, void *data_end,
				      struct tunnel *t)
{
	struct tunnel_dst key = { .ifindex = ctx->ingress_ifindex, .family = DECAP_FAMILY_IPV6 };
	struct udphdr *udp = (void *)(ip6 + 1);
	__u32 plen;
	int gue = 0;

	/* Extension headers are not walked: the load balancer adds none. */
	if ((void *)(ip6 + 1) > data_end || !is_tunnel_proto(ip6->nexthdr))
		return NOT_TUNNEL;
	if (ip6->nexthdr == IPPROTO_UDP) {
		if (!is_gue(udp, data_end))
			return NOT_TUNNEL;
		gue = 1;
	}
	__builtin_memcpy(key.addr, &ip6->daddr, sizeof(key.addr));
	if (!bpf_map_lookup_elem(&tunnel_dsts, &key))
		return NOT_TUNNEL;

	plen = bpf_ntohs(ip6->payload_len);
	/* 0 would be a jumbogram (RFC 2675): never one of ours. */
	if (plen == 0 || (void *)(ip6 + 1) + plen > data_end)
		return DECAP_DROP_OUTER_BAD_IP;
	return tunnel_behind(t, udp, data_end, sizeof(*ip6), plen, ip6->nexthdr, gue,
			     DECAP_CNT_IPIP6, DECAP_CNT_GUE6);
}

/* Check the inner header and find its VIP. `inner` is where it starts. */
static __always_inline int inner_packet(void *inner, void *data_end, const struct tunnel *t,
					struct counter **vip_stats)
{
	struct decap_addr vip = {};

	if (t->inner_version == 4) {
		struct iphdr *ip = inner;

		if (t->inner_len < sizeof(*ip) || (void *)(ip + 1) > data_end)
			return DECAP_DROP_INNER_TRUNCATED;
		if (ip->version != 4)
			return DECAP_DROP_INNER_VERSION;
		vip.family = DECAP_FAMILY_IPV4;
		vip.addr[0] = ip->daddr;
		*vip_stats = bpf_map_lookup_elem(&vips, &vip);
		if (!*vip_stats)
			return NOT_VIP;
		/* Exactly the outer payload: a shorter inner packet would leave
		 * bytes the stack never checks; a longer one is cut short. */
		if (ip->ihl < 5 || bpf_ntohs(ip->tot_len) != t->inner_len ||
		    bpf_ntohs(ip->tot_len) < ip->ihl * 4)
			return DECAP_DROP_INNER_BAD_LENGTH;
		return 0;
	}

	struct ipv6hdr *ip6 = inner;

	if (t->inner_len < sizeof(*ip6) || (void *)(ip6 + 1) > data_end)
		return DECAP_DROP_INNER_TRUNCATED;
	if (ip6->version != 6)
		return DECAP_DROP_INNER_VERSION;
	vip.family = DECAP_FAMILY_IPV6;
	__builtin_memcpy(vip.addr, &ip6->daddr, sizeof(vip.addr));
	*vip_stats = bpf_map_lookup_elem(&vips, &vip);
	if (!*vip_stats)
		return NOT_VIP;
	if (bpf_ntohs(ip6->payload_len) + sizeof(*ip6) != t->inner_len)
		return DECAP_DROP_INNER_BAD_LENGTH;
	return 0;
}

SEC("xdp")
int xdplb_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct counter *vip_stats = NULL;
	struct tunnel t = {};
	__u8 macs[2 * ETH_ALEN];
	__u32 len = data_end - data;
	int rc;

	if ((void *)(eth + 1) > data_end)
		return pass(DECAP_CNT_PASS, len);
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		rc = outer_ipv4(ctx, (void *)(eth + 1), data_end, &t);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		rc = outer_ipv6(ctx, (void *)(eth + 1), data_end, &t);
	else
		rc = NOT_TUNNEL;
	if (rc == NOT_TUNNEL)
		return pass(DECAP_CNT_PASS, len);
	if (rc > 0)
		return drop(rc, len);

	/* outer_len is one of 20, 28, 40, 48: the verifier needs the bound. */
	if (t.outer_len > sizeof(struct ipv6hdr) + sizeof(struct udphdr))
		return drop(DECAP_DROP_ADJUST_HEAD, len);
	rc = inner_packet(data + sizeof(*eth) + t.outer_len, data_end, &t, &vip_stats);
	if (rc == NOT_VIP)
		return pass(DECAP_CNT_NOT_VIP, len);
	if (rc > 0)
		return drop(rc, len);

	/* Keep the MACs: the stack still tells our frames from others' by
	 * them (pkt_type), and they are all it reads of this header. */
	__builtin_memcpy(macs, eth, sizeof(macs));
	if (bpf_xdp_adjust_head(ctx, (int)t.outer_len))
		return drop(DECAP_DROP_ADJUST_HEAD, len);
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return drop(DECAP_DROP_ADJUST_HEAD, len);
	__builtin_memcpy(eth, macs, sizeof(macs));
	eth->h_proto = bpf_htons(t.inner_version == 4 ? ETH_P_IP : ETH_P_IPV6);

	if (vip_stats) {
		vip_stats->packets++;
		vip_stats->bytes += len;
	}
	return pass(t.counter, len);
}
