/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Rejecting new flows to a service without active backends: the frame is
 * turned, in place, into an ICMP (ICMPv6) destination unreachable / port
 * unreachable from the VIP and sent back out of the interface it came in on,
 * as kube-proxy's REJECT rule does. A TCP client in SYN_SENT then fails at
 * once with ECONNREFUSED instead of retrying for a minute.
 *
 * Rejects take a token from a per-CPU bucket (cfg->reject_rate per second,
 * cfg->reject_burst back to back) so a flood cannot turn the LB into a
 * reflector; without a token, or with reject_rate 0, the packet is only
 * dropped. Either way it is counted as a `no_backend` drop; CNT_REJECTS
 * counts the ICMP messages sent. Only untagged frames are answered: a
 * VLAN-tagged one is dropped (its reply would need the tag rebuilt).
 *
 * The same in-place answer, with code "fragmentation needed", tells a
 * client of a DSR service its path MTU (encap.h, DROP_ENCAP_MTU).
 */
#ifndef XDPLB_REJECT_H
#define XDPLB_REJECT_H

#include <linux/if_ether.h>
#include "counters.h"
#include "csum.h"
#include "parse.h"
#include "ratelimit.h"

/* RFC 792. Not from <linux/icmp.h>: it pulls in libc headers that a BPF
 * build does not have. */
#define ICMP_TYPE_DEST_UNREACH 3
#define ICMP_CODE_PORT_UNREACH 3
#define ICMP_CODE_FRAG_NEEDED 4

struct icmp_unreach {
	__u8 type;
	__u8 code;
	__u16 checksum;
	__u32 info;                 /* zero for port unreachable; the MTU for fragmentation needed */
};

/* RFC 792: the ICMP error quotes the IP header and the first 8 bytes of
 * the datagram. With no IP options (parse_packet drops those for VIPs) and
 * a full TCP or UDP header, those 28 bytes are always in the frame. */
#define REJECT_QUOTE_LEN (sizeof(struct iphdr) + 8)
#define REJECT_PREPEND (sizeof(struct iphdr) + sizeof(struct icmp_unreach))
#define REJECT_FRAME_LEN (ETH_HLEN + REJECT_PREPEND + REJECT_QUOTE_LEN)

/* ICMPv6 (RFC 4443): destination unreachable / port unreachable, and packet
 * too big with the MTU in the second word. The answer quotes the IPv6
 * header and the 8 bytes after it (the ports when there are no extension
 * headers): as much as the RFC asks of a router is more than a client
 * needs to match its socket, and a fixed length keeps the checksum one
 * call. */
#define ICMP6_TYPE_DEST_UNREACH 1
#define ICMP6_TYPE_PACKET_TOO_BIG 2
#define ICMP6_CODE_PORT_UNREACH 4
#define IPPROTO_ICMP6 58
#define IPV6_MIN_MTU 1280           /* RFC 8200 section 5 */
#define REJECT6_QUOTE_LEN (sizeof(struct ipv6hdr) + 8)
#define REJECT6_PREPEND (sizeof(struct ipv6hdr) + sizeof(struct icmp_unreach))
#define REJECT6_FRAME_LEN (ETH_HLEN + REJECT6_PREPEND + REJECT6_QUOTE_LEN)

/* The one's-complement checksum of `len` bytes (a multiple of 4). */
static __always_inline __u16 csum_of(void *p, __u32 len)
{
	return ~csum_fold32(bpf_csum_diff(NULL, 0, p, len, 0));
}

/* Only untagged frames are answered (a reply would need the tag rebuilt). */
static __always_inline int icmp_answerable(const struct packet *pkt)
{
	if (pkt->ip)
		return (void *)pkt->ip == (void *)(pkt->eth + 1);
	return pkt->ip6 && (void *)pkt->ip6 == (void *)(pkt->eth + 1);
}

/* The ICMPv6 answer's headers, in front of the quoted packet (`quoted`,
 * its IPv6 header): from the address the client tried, to the client. An
 * IPv4 `code` names the error: port unreachable, or fragmentation needed
 * (then packet too big, `info` the MTU). */
static __always_inline void icmp6_fill(struct ipv6hdr *ip6, const struct ipv6hdr *quoted,
				       __u8 code, __u32 info)
{
	struct icmp_unreach *icmp = (void *)(ip6 + 1);
	__u64 sum;

	ip6->version = 6;
	ip6->priority = 0;
	__builtin_memset(ip6->flow_lbl, 0, sizeof(ip6->flow_lbl));
	ip6->payload_len = bpf_htons(sizeof(*icmp) + REJECT6_QUOTE_LEN);
	ip6->nexthdr = IPPROTO_ICMP6;
	ip6->hop_limit = 64;
	__builtin_memcpy(&ip6->saddr, &quoted->daddr, sizeof(ip6->saddr));
	__builtin_memcpy(&ip6->daddr, &quoted->saddr, sizeof(ip6->daddr));

	if (code == ICMP_CODE_PORT_UNREACH) {
		icmp->type = ICMP6_TYPE_DEST_UNREACH;
		icmp->code = ICMP6_CODE_PORT_UNREACH;
	} else {
		icmp->type = ICMP6_TYPE_PACKET_TOO_BIG;
		icmp->code = 0;
	}
	icmp->checksum = 0;
	icmp->info = info;
	/* The pseudo-header: both addresses, the length and next header. */
	sum = (__u32)bpf_csum_diff(NULL, 0, (void *)&ip6->saddr, 32, 0);
	sum += bpf_htonl(sizeof(*icmp) + REJECT6_QUOTE_LEN) + bpf_htonl(IPPROTO_ICMP6);
	sum += (__u32)bpf_csum_diff(NULL, 0, (void *)icmp, sizeof(*icmp) + REJECT6_QUOTE_LEN, 0);
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	icmp->checksum = ~csum_fold32((__u32)sum);
}

/* Turn the frame, in place, into an ICMP destination unreachable with
 * `code` and `info` (the header's second word, network order) from the
 * packet's destination to its source, quoting its IP header and first 8
 * bytes; for IPv6 the ICMPv6 equivalent (icmp6_fill). 1: ctx now holds it, to send back out of the ingress device; 0:
 * not done (dry run, a VLAN-tagged frame, or no headroom), drop the
 * packet. Shared by the no-backend reject and DSR's fragmentation needed;
 * a subprogram, so that its frame is not part of the entry program's. */
static __noinline int icmp_unreach_in_place(struct xdp_md *ctx, struct packet *pkt,
						 __u8 code, __u32 info)
{
	struct ethhdr *eth;
	struct iphdr *ip;
	struct icmp_unreach *icmp;
	void *data, *data_end;
	__u8 smac[ETH_ALEN], dmac[ETH_ALEN];
	__u32 saddr = 0, daddr = 0;
	int len, v6, prepend, frame_len;

	if (dry_run || !icmp_answerable(pkt))
		return 0;
	__builtin_memcpy(smac, pkt->eth->h_source, ETH_ALEN);
	__builtin_memcpy(dmac, pkt->eth->h_dest, ETH_ALEN);
	v6 = pkt->ip6 != NULL;
	if (pkt->ip) {
		saddr = pkt->ip->saddr;
		daddr = pkt->ip->daddr;
	}
	len = pkt->len;
	prepend = v6 ? REJECT6_PREPEND : REJECT_PREPEND;
	frame_len = v6 ? REJECT6_FRAME_LEN : REJECT_FRAME_LEN;

	/* Room for the new IP and ICMP headers in front. The original IP
	 * header then starts exactly where the quote belongs, so it is never
	 * copied: only the Ethernet header moves and the tail is cut. */
	if (bpf_xdp_adjust_head(ctx, -prepend))
		return 0;
	if (bpf_xdp_adjust_tail(ctx, frame_len - (len + prepend)))
		return 0;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + REJECT_FRAME_LEN > data_end)
		return 0;      /* cannot happen; the verifier needs the bound */

	eth = data;
	__builtin_memcpy(eth->h_dest, smac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, dmac, ETH_ALEN);
	if (v6) {
		if (data + REJECT6_FRAME_LEN > data_end)
			return 0;
		eth->h_proto = bpf_htons(ETH_P_IPV6);
		icmp6_fill((void *)(eth + 1), data + ETH_HLEN + REJECT6_PREPEND, code, info);
		return 1;
	}
	eth->h_proto = bpf_htons(ETH_P_IP);

	ip = (void *)(eth + 1);
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0xc0;             /* internetwork control, as the kernel's own ICMP */
	ip->tot_len = bpf_htons(REJECT_PREPEND + REJECT_QUOTE_LEN);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = 64;
	ip->protocol = IPPROTO_ICMP;
	ip->check = 0;
	ip->saddr = daddr;          /* from the VIP the client tried */
	ip->daddr = saddr;
	ip->check = csum_of(ip, sizeof(*ip));

	icmp = (void *)(ip + 1);
	icmp->type = ICMP_TYPE_DEST_UNREACH;
	icmp->code = code;
	icmp->checksum = 0;
	icmp->info = info;
	icmp->checksum = csum_of(icmp, sizeof(*icmp) + REJECT_QUOTE_LEN);
	return 1;
}

/* A new flow to a service without backends: port unreachable, within the
 * reject budget. 1: ctx holds the answer; 0: drop the packet. */
static __always_inline int reject_in_place(struct xdp_md *ctx, struct packet *pkt,
					   const struct lb_config *cfg)
{
	struct token_bucket *bucket;
	__u32 zero = 0;

	if (dry_run || !cfg->reject_rate || !icmp_answerable(pkt))
		return 0;
	bucket = bpf_map_lookup_elem(&reject_bucket, &zero);
	if (!bucket || !bucket_take(bucket, cfg->reject_rate, cfg->reject_burst, bpf_ktime_get_ns()))
		return 0;
	return icmp_unreach_in_place(ctx, pkt, ICMP_CODE_PORT_UNREACH, 0);
}

/* RFC 1191: fragmentation needed and DF set, with the next-hop MTU in the
 * low 16 bits of the second word; for IPv6 packet too big (RFC 4443), the
 * MTU the whole second word. Not budgeted: each answer is smaller than
 * the packet that caused it, and a flow cannot progress without it. */
static __always_inline int frag_needed_in_place(struct xdp_md *ctx, struct packet *pkt, __u32 mtu)
{
	return icmp_unreach_in_place(ctx, pkt, ICMP_CODE_FRAG_NEEDED, bpf_htonl(mtu & 0xffff));
}

#endif
