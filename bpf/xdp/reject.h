/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Rejecting new flows to a service without active backends: the frame is
 * turned, in place, into an ICMP destination unreachable / port unreachable
 * from the VIP and sent back out of the interface it came in on,
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

/* The one's-complement checksum of `len` bytes (a multiple of 4). */
static __always_inline __u16 csum_of(void *p, __u32 len)
{
	return ~csum_fold32(bpf_csum_diff(NULL, 0, p, len, 0));
}

/* Only untagged frames are answered (a reply would need the tag rebuilt). */
static __always_inline int icmp_answerable(const struct packet *pkt)
{
	return (void *)pkt->ip == (void *)(pkt->eth + 1);
}

/* Turn the frame, in place, into an ICMP destination unreachable with
 * `code` and `info` (the header's second word, network order) from the
 * packet's destination to its source, quoting its IP header and first 8
 * bytes. 1: ctx now holds it, to send back out of the ingress device; 0:
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
	__u32 saddr, daddr;
	int len;

	if (dry_run || !icmp_answerable(pkt))
		return 0;
	__builtin_memcpy(smac, pkt->eth->h_source, ETH_ALEN);
	__builtin_memcpy(dmac, pkt->eth->h_dest, ETH_ALEN);
	saddr = pkt->ip->saddr;
	daddr = pkt->ip->daddr;
	len = pkt->len;

	/* Room for the new IP and ICMP headers in front. The original IP
	 * header then starts exactly where the quote belongs, so it is never
	 * copied: only the Ethernet header moves and the tail is cut. */
	if (bpf_xdp_adjust_head(ctx, -(int)REJECT_PREPEND))
		return 0;
	if (bpf_xdp_adjust_tail(ctx, (int)REJECT_FRAME_LEN - (len + (int)REJECT_PREPEND)))
		return 0;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + REJECT_FRAME_LEN > data_end)
		return 0;      /* cannot happen; the verifier needs the bound */

	eth = data;
	__builtin_memcpy(eth->h_dest, smac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, dmac, ETH_ALEN);
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
 * low 16 bits of the second word. Not budgeted: each answer is smaller than
 * the packet that caused it, and a flow cannot progress without it. */
static __always_inline int frag_needed_in_place(struct xdp_md *ctx, struct packet *pkt, __u32 mtu)
{
	return icmp_unreach_in_place(ctx, pkt, ICMP_CODE_FRAG_NEEDED, bpf_htonl(mtu & 0xffff));
}

#endif
