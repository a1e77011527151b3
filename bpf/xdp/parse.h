/* SPDX-License-Identifier: Apache-2.0 */
/* Ethernet (one 802.1Q tag), IPv4, TCP and UDP parsing. */
#ifndef XDPLB_PARSE_H
#define XDPLB_PARSE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
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
	PARSE_NOT_IPV4,             /* not IPv4 (or a second VLAN tag): pass */
	PARSE_NO_IP_HEADER,         /* frame too short for an IPv4 header: pass */
	PARSE_BAD_IP,               /* IHL < 5 or total length inconsistent */
	PARSE_IP_OPTIONS,
	PARSE_FRAGMENT,
	PARSE_TRUNCATED,            /* L4 header cut short */
	PARSE_OTHER_L4,             /* neither TCP nor UDP */
};

struct packet {
	struct ethhdr *eth;
	struct iphdr *ip;
	struct tcphdr *tcp;         /* exactly one of tcp/udp is set on PARSE_OK */
	struct udphdr *udp;
	__u32 len;                  /* frame length, for byte counters */
	struct flow_key flow;       /* addresses, ports and protocol as received */
};

struct vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

static __always_inline int parse_packet(struct xdp_md *ctx, struct packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__u16 proto;
	__u64 off;

	pkt->len = data_end - data;
	if ((void *)(eth + 1) > data_end)
		return PARSE_NOT_IPV4;
	pkt->eth = eth;
	proto = eth->h_proto;
	off = sizeof(*eth);
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		struct vlan_hdr *vh = data + off;

		if ((void *)(vh + 1) > data_end)
			return PARSE_NOT_IPV4;
		proto = vh->encap_proto;
		off += sizeof(*vh);
	}
	if (proto != bpf_htons(ETH_P_IP))
		return PARSE_NOT_IPV4;

	ip = data + off;
	if ((void *)(ip + 1) > data_end)
		return PARSE_NO_IP_HEADER;
	pkt->ip = ip;
	pkt->flow.family = FAMILY_IPV4;
	pkt->flow.src[0] = ip->saddr;
	pkt->flow.dst[0] = ip->daddr;
	pkt->flow.proto = ip->protocol;

	/* Order matters: the reason recorded is the first thing wrong. */
	if (ip->ihl < 5 || bpf_ntohs(ip->tot_len) < ip->ihl * 4 ||
	    (void *)ip + bpf_ntohs(ip->tot_len) > data_end)
		return PARSE_BAD_IP;
	if (ip->ihl != 5)
		return PARSE_IP_OPTIONS;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return PARSE_FRAGMENT;

	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = (void *)(ip + 1);

		/* The data offset must cover the fixed header and stay inside
		 * the datagram; the ports alone are not enough to trust it. */
		if ((void *)(tcp + 1) > data_end || tcp->doff < 5 ||
		    (void *)tcp + tcp->doff * 4 > (void *)ip + bpf_ntohs(ip->tot_len))
			return PARSE_TRUNCATED;
		pkt->tcp = tcp;
		pkt->flow.sport = tcp->source;
		pkt->flow.dport = tcp->dest;
		return PARSE_OK;
	}
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);

		if ((void *)(udp + 1) > data_end ||
		    bpf_ntohs(udp->len) < sizeof(*udp) ||
		    (void *)udp + bpf_ntohs(udp->len) > (void *)ip + bpf_ntohs(ip->tot_len))
			return PARSE_TRUNCATED;
		pkt->udp = udp;
		pkt->flow.sport = udp->source;
		pkt->flow.dport = udp->dest;
		return PARSE_OK;
	}
	return PARSE_OTHER_L4;
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
	default:
		return DROP_NONE;
	}
}

#endif
