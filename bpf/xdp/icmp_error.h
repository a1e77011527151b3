/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ICMP and ICMPv6 errors about translated flows (RFC 792, RFC 4443).
 *
 * An error quotes the packet that caused it, and that packet was one the
 * LB translated, so neither end could match the error to its socket as it
 * stands. Without this, path MTU discovery through the NAT is broken: the
 * fragmentation needed / packet too big never reaches the sender whose
 * packets are too big. Two directions:
 *
 *  - to the client: an error from the backend's side about a client ->
 *    backend packet (the backend's port unreachable, a router's packet too
 *    big). The quote (client or SNAT address:port -> backend:port) reversed
 *    is the key of a reply, so the flow is found by the reply's own lookups
 *    (reply_lookup, reply.h) and must come in by the interface its replies
 *    come in by. The quote gets its client -> VIP addresses back, the outer
 *    destination the client; an error the backend sent itself leaves from
 *    the VIP.
 *  - to the backend: an error from the client's side about a reply (VIP ->
 *    client). The quote reversed is the client flow: service, policy for
 *    the flow's client, conntrack. The error goes to that backend with the
 *    quote as the backend sent it (backend -> client, or -> SNAT address and
 *    port), from the SNAT address in SNAT mode.
 *
 * Only error types are touched (never echo), only quotes of TCP or UDP with
 * a plain IP header (no IPv4 options, no IPv6 extension headers) and at
 * least the 8 bytes of ports. Anything else, and an error quoting no flow
 * of ours, goes on as any other packet: passed, or dropped if it is
 * addressed to a VIP. DSR flows are left out: their errors would need the
 * tunnel (to the backend) or quote it (from the backend).
 *
 * Checksums are updated incrementally, so each is valid after exactly when
 * it was before: the quoted IPv4 header's, the quoted TCP/UDP one when the
 * quote reaches it (a truncated quote keeps what it has; a UDP 0 stays 0),
 * the ICMP one over everything changed in the message (ICMPv6's also over
 * the outer addresses, through its pseudo-header) and the outer IPv4 one.
 */
#ifndef XDPLB_ICMP_ERROR_H
#define XDPLB_ICMP_ERROR_H

#include "conntrack.h"
#include "counters.h"
#include "csum.h"
#include "encap.h"
#include "forward.h"
#include "nat.h"
#include "parse.h"
#include "policy.h"
#include "reject.h"
#include "reply.h"
#include "service.h"

#define ICMP_TYPE_TIME_EXCEEDED 11
#define ICMP_TYPE_PARAM_PROBLEM 12
#define ICMP6_TYPE_PARAM_PROBLEM 4      /* 1..4: unreachable, too big, time exceeded, parameter */

/* icmp_error()'s answer when the packet is none of its business. */
#define ICMP_ERROR_NOT_OURS (-1)

/* The TCP checksum's offset in its header; UDP's is 6, inside any quote. */
#define TCP_CHECK_OFF 16

static __always_inline int icmp_is_error(__u8 family, __u8 type)
{
	if (family == FAMILY_IPV6)
		return type >= ICMP6_TYPE_DEST_UNREACH && type <= ICMP6_TYPE_PARAM_PROBLEM;
	return type == ICMP_TYPE_DEST_UNREACH || type == ICMP_TYPE_TIME_EXCEEDED ||
	       type == ICMP_TYPE_PARAM_PROBLEM;
}

/* Worth the error path's program: ICMP or ICMPv6 (parse_packet() read no
 * further). */
static __always_inline int icmp_error_candidate(const struct packet *pkt)
{
	return pkt->flow.proto == (pkt->flow.family == FAMILY_IPV6 ? IPPROTO_ICMP6 : IPPROTO_ICMP);
}

static __always_inline __u32 quoted_ip_len(__u8 family)
{
	return family == FAMILY_IPV6 ? sizeof(struct ipv6hdr) : sizeof(struct iphdr);
}

/* Is `pkt` (parsed as PARSE_OTHER_L4) an ICMP error quoting a TCP or UDP
 * packet with its ports? Fills `q`. */
static __always_inline int icmp_quote_parse(struct xdp_md *ctx, const struct packet *pkt,
					    struct icmp_quote *q)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u16 off = pkt->l4_off & 0x3fff;
	struct icmp_unreach *icmp = data + off;
	__u8 family = pkt->flow.family;
	__u32 ip_off = ETH_HLEN, msg_len, room;
	__u16 *ports;

	if (!icmp_error_candidate(pkt))
		return 0;
	if (pkt->eth->h_proto == bpf_htons(ETH_P_8021Q) ||
	    pkt->eth->h_proto == bpf_htons(ETH_P_8021AD))
		ip_off += VLAN_HLEN;
	/* The ICMP message: the rest of the outer datagram. */
	msg_len = pkt->ip_len - (off - ip_off);
	if (msg_len < sizeof(*icmp) || (void *)(icmp + 1) > data_end ||
	    !icmp_is_error(family, icmp->type))
		return 0;
	/* What of the quote is both in the message and in the frame. */
	room = data_end - (void *)(icmp + 1);
	msg_len -= sizeof(*icmp);
	if (msg_len > room)
		msg_len = room;
	if (msg_len < quoted_ip_len(family) + 8 || msg_len > 0xffff)
		return 0;
	q->quote_len = msg_len;
	q->icmp_off = off;
	q->flow.family = family;
	if (family == FAMILY_IPV6) {
		struct ipv6hdr *ip6 = (void *)(icmp + 1);

		if ((void *)(ip6 + 1) + 8 > data_end || ip6->version != 6)
			return 0;
		q->flow.proto = ip6->nexthdr;
		__builtin_memcpy(q->flow.src, &ip6->saddr, sizeof(q->flow.src));
		__builtin_memcpy(q->flow.dst, &ip6->daddr, sizeof(q->flow.dst));
		ports = (void *)(ip6 + 1);
	} else {
		struct iphdr *ip = (void *)(icmp + 1);

		/* A later fragment quotes data, not ports. */
		if ((void *)(ip + 1) + 8 > data_end || ip->version != 4 || ip->ihl != 5 ||
		    (ip->frag_off & bpf_htons(IP_OFFSET)))
			return 0;
		q->flow.proto = ip->protocol;
		q->flow.src[0] = ip->saddr;
		q->flow.dst[0] = ip->daddr;
		ports = (void *)(ip + 1);
	}
	if (q->flow.proto != IPPROTO_TCP && q->flow.proto != IPPROTO_UDP)
		return 0;
	q->flow.sport = ports[0];
	q->flow.dport = ports[1];
	return 1;
}

/* The quoted L4 checksum, if the quote holds it and it is in use (a UDP 0
 * means none); else NULL. */
static __always_inline __u16 *quoted_l4_sum(void *l4, void *data_end, const struct icmp_quote *q,
					    __u32 ip_len)
{
	__u16 *sum;

	if (q->flow.proto == IPPROTO_UDP) {
		sum = l4 + 6;
		if ((void *)(sum + 1) > data_end || !*sum)
			return NULL;
		return sum;
	}
	if (q->quote_len < ip_len + TCP_CHECK_OFF + 2)
		return NULL;
	sum = l4 + TCP_CHECK_OFF;
	return (void *)(sum + 1) > data_end ? NULL : sum;
}

/* Replace the address at `at` (16 bytes for IPv6, word 0 for IPv4) with
 * `to`, under the checksums that cover it (`b` and `c` may be NULL). */
static __always_inline void addr_replace(__u8 family, __u32 *at, const __u32 *to, __u16 *a,
					 __u16 *b, __u16 *c)
{
	if (family == FAMILY_IPV6) {
		if (addr_equal(at, to))
			return;
		csum_replace16(a, at, to);
		if (b)
			csum_replace16(b, at, to);
		if (c)
			csum_replace16(c, at, to);
		__builtin_memcpy(at, to, 16);
		return;
	}
	if (at[0] == to[0])
		return;
	csum_replace4(a, at[0], to[0]);
	if (b)
		csum_replace4(b, at[0], to[0]);
	if (c)
		csum_replace4(c, at[0], to[0]);
	at[0] = to[0];
}

static __always_inline void port_replace(__u16 *at, __u16 to, __u16 *a, __u16 *b)
{
	if (*at == to)
		return;
	csum_replace2(a, *at, to);
	if (b)
		csum_replace2(b, *at, to);
	*at = to;
}

/* The message's rewrite, for one family (a constant at each call: the
 * verifier then walks only that family's accesses). The quote's addresses
 * are under the ICMP checksum `isum` (they are in its message), the quoted
 * IPv4 header's `ipsum` (NULL for IPv6) and the quoted L4 one (its
 * pseudo-header); its ports under the ICMP and L4 ones. The outer addresses
 * (`osrc`, `odst`) are under `osum`: the outer IPv4 header's, or ICMPv6's
 * (its pseudo-header; ICMP for IPv4 has none). */
static __always_inline void message_rewrite(__u8 family, __u16 *isum, __u16 *ipsum, __u32 *qsrc,
					    __u32 *qdst, __u16 *ports, __u16 *l4sum, __u8 proto,
					    const struct rewrite *quoted, __u32 *osrc, __u32 *odst,
					    __u16 *osum, const struct rewrite *outer)
{
	__u16 old_l4sum = l4sum ? *l4sum : 0, old_ipsum = ipsum ? *ipsum : 0;

	addr_replace(family, qsrc, quoted->saddr, isum, ipsum, l4sum);
	addr_replace(family, qdst, quoted->daddr, isum, ipsum, l4sum);
	port_replace(&ports[0], quoted->sport, isum, l4sum);
	port_replace(&ports[1], quoted->dport, isum, l4sum);
	if (l4sum && proto == IPPROTO_UDP && !*l4sum)
		*l4sum = 0xffff;
	/* The quoted checksums that changed are in the ICMP message too. */
	if (l4sum)
		port_replace(&old_l4sum, *l4sum, isum, NULL);
	if (ipsum)
		port_replace(&old_ipsum, *ipsum, isum, NULL);
	addr_replace(family, osrc, outer->saddr, osum, NULL, NULL);
	addr_replace(family, odst, outer->daddr, osum, NULL, NULL);
}

/* Rewrite the quote to `quoted` and the outer addresses to `outer` (ports
 * unused), with every checksum (top of file). 0 if the frame is not as
 * icmp_quote_parse() found it (cannot happen; the verifier needs bounds). */
static __always_inline int icmp_error_rewrite(struct xdp_md *ctx, struct packet *pkt,
					      const struct icmp_quote *q,
					      const struct rewrite *outer,
					      const struct rewrite *quoted)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct icmp_unreach *icmp = data + (q->icmp_off & 0x3fff);
	struct ipv6hdr *ip6 = (void *)(icmp + 1), *outer6 = pkt->ip6;
	struct iphdr *ip = (void *)(icmp + 1), *outer4 = pkt->ip;

	if (outer6 && (void *)(ip6 + 1) + 8 <= data_end) {
		message_rewrite(FAMILY_IPV6, &icmp->checksum, NULL, (__u32 *)&ip6->saddr,
				(__u32 *)&ip6->daddr, (void *)(ip6 + 1),
				quoted_l4_sum(ip6 + 1, data_end, q, sizeof(*ip6)), q->flow.proto,
				quoted, (__u32 *)&outer6->saddr, (__u32 *)&outer6->daddr,
				&icmp->checksum, outer);
		return 1;
	}
	if (outer4 && (void *)(ip + 1) + 8 <= data_end) {
		message_rewrite(FAMILY_IPV4, &icmp->checksum, &ip->check, &ip->saddr, &ip->daddr,
				(void *)(ip + 1), quoted_l4_sum(ip + 1, data_end, q, sizeof(*ip)),
				q->flow.proto, quoted, &outer4->saddr, &outer4->daddr,
				&outer4->check, outer);
		return 1;
	}
	return 0;
}

/* pkt->flow becomes the quoted flow reversed: a reply's key when the quote
 * is a forwarded packet, the client flow's when it is a reply. The lookups
 * of those take a packet (reply.h). */
static __always_inline void quote_reversed(struct packet *pkt, const struct icmp_quote *q)
{
	pkt->flow.proto = q->flow.proto;
	pkt->flow.sport = q->flow.dport;
	pkt->flow.dport = q->flow.sport;
	__builtin_memcpy(pkt->flow.src, q->flow.dst, sizeof(pkt->flow.src));
	__builtin_memcpy(pkt->flow.dst, q->flow.src, sizeof(pkt->flow.dst));
}

/* Send the rewritten error on, as a reply or a forwarded packet goes. */
static __always_inline int icmp_error_send(struct xdp_md *ctx, struct packet *pkt,
					   struct icmp_work *w, const struct rewrite *outer,
					   const struct rewrite *quoted, const struct lb_config *cfg,
					   int source_rewritten, enum xdplb_counter counter)
{
	enum drop_reason why;
	int rc;

	__builtin_memset(&w->fib, 0, sizeof(w->fib));
	rc = next_hop(ctx, pkt, outer->saddr, outer->daddr, cfg, &w->fib);
	why = fib_verdict(rc, &w->fib, source_rewritten);
	if (why != DROP_NONE)
		return drop_packet(IDENTITY_UNKNOWN, ID_NONE, why, pkt->len);
	if (!icmp_error_rewrite(ctx, pkt, &w->q, outer, quoted))
		return count_verdict(XDP_DROP, pkt->len);
	count_global(counter, pkt->len);
	return transmit(ctx, pkt, &w->fib, rc);
}

/* From the backend's side, about a client -> backend packet: the quote
 * reversed is a reply's key (reply_lookup). `outer_src` is the error's
 * sender. */
static __always_inline int icmp_error_to_client(struct xdp_md *ctx, struct packet *pkt,
						struct icmp_work *w, const struct lb_config *cfg)
{
	const struct icmp_quote *q = &w->q;
	const __u32 *outer_src = w->outer.src;
	struct nat_entry *nat = &w->nat;
	const struct nat_entry *found;
	struct rewrite outer, quoted;
	int from_backend;

	quote_reversed(pkt, q);
	__builtin_memset(nat, 0, sizeof(*nat));
	found = reply_lookup(ctx, pkt, cfg, nat);
	if (!found)
		return ICMP_ERROR_NOT_OURS;
	if (found != nat)
		*nat = *found;
	/* The reply path's guarantee: only the backend's side may speak for it. */
	if (nat->ifindex != ctx->ingress_ifindex)
		return drop_packet(IDENTITY_UNKNOWN, nat->svc_id, DROP_SPOOFED_REPLY, pkt->len);
	quoted.saddr = nat->client;
	quoted.sport = nat->client_port;
	quoted.daddr = nat->vip;
	quoted.dport = nat->vip_port;
	/* The backend's own error (port unreachable) comes from the VIP, as
	 * its replies do; a router's keeps the router's address. */
	from_backend = addr_equal(outer_src, q->flow.dst);
	outer.saddr = from_backend ? nat->vip : outer_src;
	outer.daddr = nat->client;
	return icmp_error_send(ctx, pkt, w, &outer, &quoted, cfg, from_backend,
			       CNT_ICMP_ERROR_TO_CLIENT);
}

/* From the client's side, about a reply (VIP -> client): the quote
 * reversed is the client flow, found as the forward path finds it: its
 * conntrack entry, or without one the flood guard's stateless pick. Not
 * DSR flows. */
static __always_inline int icmp_error_to_backend(struct xdp_md *ctx, struct packet *pkt,
						 struct icmp_work *w, const struct lb_config *cfg)
{
	const struct icmp_quote *q = &w->q;
	const __u32 *outer_src = w->outer.src;
	struct rewrite outer, quoted;
	struct svc_value *svc;
	struct ct_entry *ct;
	struct backend *b = NULL;
	__u32 backend_id;
	__u16 nat_port = 0;
	int snat;

	quote_reversed(pkt, q);
	svc = service_lookup(&pkt->flow);
	if (!svc || (svc->flags & SVC_F_ENCAP))
		return ICMP_ERROR_NOT_OURS;
	/* A client the policy denies has no flow to hear about. */
	if ((svc->flags & SVC_F_HAS_POLICY) &&
	    !policy_allows(svc, source_identity(&pkt->flow)))
		return drop_packet(IDENTITY_UNKNOWN, svc->svc_id, DROP_POLICY, pkt->len);
	snat = snat_on(cfg, pkt->flow.family);
	ct = bpf_map_lookup_elem(&conntrack, &pkt->flow);
	/* As the forward path reads it: an entry of the other mode is stale. */
	if (ct && (ct->nat_port != 0) == snat)
		b = ct_backend(ct, svc->svc_id);
	/* Without state (the flood guard forwarded the flow so, gateway mode
	 * only): the backend the forward path picks for it now. */
	if (!b && cfg->new_flow_rate && !snat) {
		backend_id = stateless_pick(cfg, &pkt->flow, svc->svc_id);
		b = bpf_map_lookup_elem(&backends, &backend_id);
		nat_port = 0;
	} else if (b) {
		nat_port = ct->nat_port;
	}
	if (!b || b->state == BACKEND_FREE)
		return ICMP_ERROR_NOT_OURS;
	/* The quote as the backend sent it: to the client, or to the SNAT
	 * address and port; from the SNAT address then, so that the error
	 * comes back to the LB as the flow's replies do. */
	quoted.saddr = b->addr;
	quoted.sport = b->port;
	quoted.daddr = snat ? snat_source(cfg, pkt->flow.family)->addr : q->flow.dst;
	quoted.dport = snat ? nat_port : q->flow.dport;
	outer.saddr = snat ? snat_source(cfg, pkt->flow.family)->addr : outer_src;
	outer.daddr = b->addr;
	return icmp_error_send(ctx, pkt, w, &outer, &quoted, cfg, snat, CNT_ICMP_ERROR_TO_BACKEND);
}

/* An ICMP error about a translated flow, translated (top of file): the
 * verdict; or ICMP_ERROR_NOT_OURS, and `pkt` is as parse_packet() left it. */
static __always_inline int icmp_error(struct xdp_md *ctx, struct packet *pkt)
{
	struct lb_config *cfg = active_config();
	struct icmp_work *w;
	__u32 zero = 0;
	int rc;

	w = bpf_map_lookup_elem(&icmp_scratch, &zero);
	if (!cfg || !w)
		return ICMP_ERROR_NOT_OURS;
	__builtin_memset(&w->q, 0, sizeof(w->q));
	if (!icmp_quote_parse(ctx, pkt, &w->q))
		return ICMP_ERROR_NOT_OURS;
	/* Sent to the quote's source: a VIP (about a reply), or a client or
	 * the SNAT address (about a forwarded packet). */
	if (!addr_equal(pkt->flow.dst, w->q.flow.src))
		return ICMP_ERROR_NOT_OURS;
	w->outer = pkt->flow;
	if (is_vip(&w->outer))
		rc = icmp_error_to_backend(ctx, pkt, w, cfg);
	else
		rc = icmp_error_to_client(ctx, pkt, w, cfg);
	if (rc == ICMP_ERROR_NOT_OURS)
		pkt->flow = w->outer;
	return rc;
}

#endif
