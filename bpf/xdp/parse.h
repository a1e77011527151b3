/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Ethernet (one 802.1Q tag), IPv4 or IPv6, TCP and UDP parsing. The L4
 * checks are one function for both families; IPv6's extension headers are
 * walked up to IPV6_EXT_MAX (constants.h).
 */
#ifndef XDPLB_PARSE_H
#define XDPLB_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include "maps.h"

#ifndef VLAN_HLEN
#define VLAN_HLEN 4
#endif
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* What the parser found. Only PARSE_OK packets may be load-balanced; the
 * others are dropped if they are addressed to a VIP and passed otherwise. */
enum parse_result {
	PARSE_OK = 0,
	PARSE_NOT_IP,               /* neither IPv4 nor IPv6 (or a second VLAN tag): pass */
	PARSE_NO_IP_HEADER,         /* frame too short for an IP header: pass */
	PARSE_BAD_IP,               /* IHL < 5 or a length inconsistent with the frame */
	PARSE_IP_OPTIONS,
	PARSE_FRAGMENT,             /* IPv4 MF/offset, or an IPv6 fragment header */
	PARSE_TRUNCATED,            /* L4 (or an extension) header cut short */
	PARSE_OTHER_L4,             /* neither TCP nor UDP (ICMP, ICMPv6, ND, ...) */
	PARSE_IPV6_EXT_CHAIN,       /* more than IPV6_EXT_MAX extension headers */
};

/* IPv6 next-header values (RFC 8200) walked over, or stopped at. */
#define IPV6_NH_HOP 0
#define IPV6_NH_ROUTING 43
#define IPV6_NH_FRAGMENT 44
#define IPV6_NH_DSTOPTS 60

/* `ip` is set for IPv4 and `ip6` for IPv6, never both: code that reads an
 * IP header tests the pointer (the verifier follows the pointer, not the
 * family byte). The L4 header is kept as an offset, not a pointer: behind
 * IPv6 extension headers it is at a different place on every path the
 * verifier walks, and pointers that differ would keep those paths apart
 * through the whole program (an offset the verifier never needs exactly
 * does not). l4_header() makes the pointer again where it is used. */
struct packet {
	struct ethhdr *eth;
	struct iphdr *ip;
	struct ipv6hdr *ip6;
	__u16 l4_off;               /* from the frame's start; TCP or UDP on PARSE_OK */
	__u32 len;                  /* frame length, for byte counters */
	__u16 ip_len;               /* the IP datagram's length, headers included */
	__u8 tos;                   /* IPv4 TOS or IPv6 traffic class */
	struct flow_key flow;       /* addresses, ports and protocol as received */
};

struct vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

/* TCP or UDP at `l4`, inside a datagram that ends at `ip_end`: the same
 * checks for both families. */
static __always_inline int parse_l4(struct packet *pkt, void *l4, void *ip_end, void *data_end)
{
	pkt->l4_off = l4 - (void *)pkt->eth;
	if (pkt->flow.proto == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;

		/* The data offset must cover the fixed header and stay inside
		 * the datagram; the ports alone are not enough to trust it. */
		if ((void *)(tcp + 1) > data_end || tcp->doff < 5 ||
		    (void *)tcp + tcp->doff * 4 > ip_end)
			return PARSE_TRUNCATED;
		pkt->flow.sport = tcp->source;
		pkt->flow.dport = tcp->dest;
		return PARSE_OK;
	}
	if (pkt->flow.proto == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end ||
		    bpf_ntohs(udp->len) < sizeof(*udp) ||
		    (void *)udp + bpf_ntohs(udp->len) > ip_end)
			return PARSE_TRUNCATED;
		pkt->flow.sport = udp->source;
		pkt->flow.dport = udp->dest;
		return PARSE_OK;
	}
	return PARSE_OTHER_L4;
}

static __always_inline int parse_ipv4(struct packet *pkt, struct iphdr *ip, void *data_end)
{
	if ((void *)(ip + 1) > data_end)
		return PARSE_NO_IP_HEADER;
	pkt->ip = ip;
	pkt->flow.family = FAMILY_IPV4;
	pkt->flow.src[0] = ip->saddr;
	pkt->flow.dst[0] = ip->daddr;
	pkt->flow.proto = ip->protocol;
	pkt->ip_len = bpf_ntohs(ip->tot_len);
	pkt->tos = ip->tos;

	/* Order matters: the reason recorded is the first thing wrong. */
	if (ip->ihl < 5 || pkt->ip_len < ip->ihl * 4 || (void *)ip + pkt->ip_len > data_end)
		return PARSE_BAD_IP;
	if (ip->ihl != 5)
		return PARSE_IP_OPTIONS;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return PARSE_FRAGMENT;
	return parse_l4(pkt, ip + 1, (void *)ip + pkt->ip_len, data_end);
}

/* An extension header's first two bytes (RFC 8200 4.2): what follows, and
 * its length in 8-byte units not counting the first 8. */
struct ipv6_opt_hdr_start {
	__u8 nexthdr;
	__u8 hdrlen;
};

/* IPv6: the fixed header, then hop-by-hop, routing and destination-options
 * headers, at most IPV6_EXT_MAX of them (a bounded loop for the verifier,
 * and a bound on what one packet may cost). A fragment header anywhere in
 * the chain is a fragment. The flow's protocol is the last next header. */
static __always_inline int parse_ipv6(struct packet *pkt, struct ipv6hdr *ip6, void *data_end)
{
	void *ip_end, *l4;
	__u8 nexthdr;
	int i;

	if ((void *)(ip6 + 1) > data_end)
		return PARSE_NO_IP_HEADER;
	pkt->ip6 = ip6;
	pkt->flow.family = FAMILY_IPV6;
	__builtin_memcpy(pkt->flow.src, &ip6->saddr, sizeof(pkt->flow.src));
	__builtin_memcpy(pkt->flow.dst, &ip6->daddr, sizeof(pkt->flow.dst));
	pkt->ip_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	pkt->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
	nexthdr = ip6->nexthdr;
	pkt->flow.proto = nexthdr;
	/* A jumbogram (payload length 0) is not ours either. */
	ip_end = (void *)ip6 + pkt->ip_len;
	if (!ip6->payload_len || ip_end > data_end)
		return PARSE_BAD_IP;

	l4 = ip6 + 1;
#pragma unroll
	for (i = 0; i < IPV6_EXT_MAX; i++) {
		struct ipv6_opt_hdr_start *h = l4;

		if (nexthdr == IPV6_NH_FRAGMENT)
			return PARSE_FRAGMENT;
		if (nexthdr != IPV6_NH_HOP && nexthdr != IPV6_NH_ROUTING &&
		    nexthdr != IPV6_NH_DSTOPTS)
			break;
		if ((void *)(h + 1) > data_end)
			return PARSE_TRUNCATED;
		nexthdr = h->nexthdr;
		l4 += (h->hdrlen + 1) * 8;
		if (l4 > ip_end)
			return PARSE_TRUNCATED;
	}
	pkt->flow.proto = nexthdr;
	if (nexthdr == IPV6_NH_FRAGMENT)
		return PARSE_FRAGMENT;
	if (nexthdr == IPV6_NH_HOP || nexthdr == IPV6_NH_ROUTING || nexthdr == IPV6_NH_DSTOPTS)
		return PARSE_IPV6_EXT_CHAIN;
	return parse_l4(pkt, l4, ip_end, data_end);
}

static __always_inline int parse_packet(struct xdp_md *ctx, struct packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u16 proto;
	__u64 off;

	pkt->len = data_end - data;
	if ((void *)(eth + 1) > data_end)
		return PARSE_NOT_IP;
	pkt->eth = eth;
	proto = eth->h_proto;
	off = sizeof(*eth);
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		struct vlan_hdr *vh = data + off;

		if ((void *)(vh + 1) > data_end)
			return PARSE_NOT_IP;
		proto = vh->encap_proto;
		off += sizeof(*vh);
	}
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(pkt, data + off, data_end);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(pkt, data + off, data_end);
	return PARSE_NOT_IP;
}

/* The L4 header of a PARSE_OK packet, `size` bytes of it checked to be in
 * the frame; NULL if not (cannot happen after parse_packet). */
static __always_inline void *l4_header(struct xdp_md *ctx, const struct packet *pkt, __u32 size)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	/* The mask is the verifier's bound; offsets are far below it. */
	void *l4 = data + (pkt->l4_off & 0x3fff);

	if (l4 + size > data_end)
		return NULL;
	return l4;
}

static __always_inline enum drop_reason parse_drop_reason(int result)
{
	switch (result) {
	case PARSE_BAD_IP:
		return DROP_BAD_IP;
	case PARSE_IP_OPTIONS:
		return DROP_IP_OPTIONS;
	case PARSE_FRAGMENT:
		return DROP_FRAGMENT;
	case PARSE_TRUNCATED:
		return DROP_TRUNCATED;
	case PARSE_OTHER_L4:
		return DROP_UNSUPPORTED_L4;
	case PARSE_IPV6_EXT_CHAIN:
		return DROP_IPV6_EXT_CHAIN;
	default:
		return DROP_NONE;
	}
}

#endif
