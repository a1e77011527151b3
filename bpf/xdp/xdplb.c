/* SPDX-License-Identifier: Apache-2.0 */
/*
 * xdplb: the one XDP program.
 *
 *   parse -> service lookup -> identity policy -> conntrack or Maglev
 *         -> DNAT (+ optional SNAT) -> FIB -> XDP_REDIRECT (devmap)
 *         or, DSR services: -> FIB to the backend -> IPIP/GUE encapsulation
 *            -> XDP_REDIRECT (the backend answers the client itself)
 *   replies to translated flows -> reply index + conntrack (gateway mode)
 *         or reverse NAT (SNAT) -> FIB -> out
 *   ICMP errors quoting a translated flow -> the quote and addresses
 *         translated (icmp_error.h) -> the client, or the flow's backend
 *   unicast frames for another MAC (flooded, promiscuous) -> XDP_PASS (dmac.h)
 *   everything else (neighbour discovery, echo, ...) -> XDP_PASS, untouched
 *
 * IPv4 and IPv6 take the same path: the family is a parameter of each
 * step (parse.h, nat.h, forward.h), not a second program.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "constants.h"
#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "counters.h"
#include "service.h"
#include "policy.h"
#include "maglev.h"
#include "affinity.h"
#include "conntrack.h"
#include "nat.h"
#include "reply.h"
#include "guard.h"
#include "reject.h"
#include "forward.h"
#include "encap.h"
#include "monitor.h"
#include "dmac.h"
#include "icmp_error.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Never read. Its type makes clang emit the enums that no map layout
 * mentions, so the control plane finds every constant in BTF. */
const volatile struct {
	enum xdplb_limits limits;
	enum xdplb_identity identity;
	enum xdplb_counter counter;
	enum xdplb_family family;
	struct flow_event event;    /* ring buffer records have no map value type */
} btf_anchor;

/* Record the decision for the `flow` command (dry-run copy only). */
static __always_inline void probe_record(const struct packet *pkt, enum drop_reason reason,
					 __u32 identity, __u32 svc_id, __u32 backend_id, __u32 ct_hit,
					 __u32 reply)
{
	__u32 zero = 0;
	struct probe_result *p;

	if (!dry_run)
		return;
	p = bpf_map_lookup_elem(&probe, &zero);
	if (!p)
		return;
	p->reason = reason;
	p->identity = identity;
	p->svc_id = svc_id;
	p->backend_id = backend_id;
	p->ct_hit = ct_hit;
	p->reply = reply;
	p->family = pkt->flow.family;
}

static __always_inline int drop(struct xdp_md *ctx, struct packet *pkt, __u32 identity,
				__u32 svc_id, enum drop_reason reason)
{
	probe_record(pkt, reason, identity, svc_id, ID_NONE, 0, 0);
	monitor_drop(ctx, pkt, identity, svc_id, reason);
	return drop_packet(identity, svc_id, reason, pkt->len);
}

/* A new flow to a service without an active backend: dropped, and
 * answered with an ICMP port unreachable while the reject budget lasts. */
static __always_inline int no_backend(struct xdp_md *ctx, struct packet *pkt, __u32 identity,
				      __u32 svc_id, const struct lb_config *cfg)
{
	__u32 len = pkt->len;
	int verdict = drop(ctx, pkt, identity, svc_id, DROP_NO_BACKEND);

	if (!reject_in_place(ctx, pkt, cfg))
		return verdict;
	count_global(CNT_REJECTS, len);
	/* Back out of the ingress device, through the devmap for the reason
	 * transmit() gives. */
	return bpf_redirect_map(&tx_ports, ctx->ingress_ifindex, XDP_DROP);
}

/* A DSR packet that would outgrow the egress MTU: dropped, and answered
 * with fib->mtu_result, the MTU less the tunnel's overhead (encap.h): ICMP
 * fragmentation needed if the client's IPv4 packet has DF set, ICMPv6
 * packet too big for every IPv6 one (routers never fragment IPv6) unless
 * that MTU is below IPv6's minimum: a client raises any smaller value to
 * 1280 (RFC 8201 section 4), so the answer would bring the same packets
 * back; those are only dropped (the path to the backend needs an MTU of
 * 1280 plus the overhead for IPv6 clients). */
static __always_inline int too_big(struct xdp_md *ctx, struct packet *pkt, __u32 identity,
				   __u32 svc_id, const struct bpf_fib_lookup *fib)
{
	int verdict = drop(ctx, pkt, identity, svc_id, DROP_ENCAP_MTU);
	int answer = pkt->ip ? (pkt->ip->frag_off & bpf_htons(IP_DF)) != 0 :
		fib->mtu_result >= IPV6_MIN_MTU;

	if (!answer || !frag_needed_in_place(ctx, pkt, fib->mtu_result))
		return verdict;
	count_global(CNT_FRAG_NEEDED, pkt->len);
	return bpf_redirect_map(&tx_ports, ctx->ingress_ifindex, XDP_DROP);
}

static __always_inline int handle_service(struct xdp_md *ctx, struct packet *pkt,
					  const struct svc_value *svc_ptr)
{
	/* One copy of the record: every field below comes from the same
	 * version of the service, even if the control plane swaps it now. */
	struct svc_value svc = *svc_ptr;
	struct bpf_fib_lookup fib = {};
	struct lb_config *cfg = active_config();
	const struct snat_source *snat_src;
	struct ct_entry ct = {};
	struct ct_entry *cte;
	struct encap enc;
	const __u32 *hop_saddr;
	__u16 hop_len;
	__u8 hop_proto, hop_family;
	struct backend *b = NULL;
	struct rewrite rw;
	__u32 identity = IDENTITY_UNKNOWN;
	__u32 hash = 0, backend_id;
	enum drop_reason why;
	__u64 now = 0;
	int snat, ct_hit = 0, stateless = 0, rc;

	if (!cfg)
		return count_verdict(XDP_ABORTED, pkt->len);
	/* SNAT applies to NAT services of a family with a SNAT address (the
	 * others are in gateway mode): DSR replies never cross the LB. */
	snat_src = snat_source(cfg, pkt->flow.family);
	snat = snat_src->family == pkt->flow.family && !(svc.flags & SVC_F_ENCAP);

	/* Policy first: a denied source costs no conntrack or backend work. */
	if (dry_run || (svc.flags & SVC_F_HAS_POLICY))
		identity = source_identity(&pkt->flow);
	if (!policy_allows(&svc, identity))
		return drop(ctx, pkt, identity, svc.svc_id, DROP_POLICY);

	cte = bpf_map_lookup_elem(&conntrack, &pkt->flow);
	if (cte) {
		ct = *cte;
		/* An entry made before SNAT was switched on or off is stale. */
		if ((ct.nat_port != 0) == snat)
			b = ct_backend(&ct, svc.svc_id);
		if (b)
			ct_hit = 1;
		else
			count_global(CNT_CT_STALE, pkt->len);
	}
	if (!b) {
		if (!svc.ring_size)
			return no_backend(ctx, pkt, identity, svc.svc_id, cfg);
		/* One clock read for the guard and affinity, only if either is on. */
		if (cfg->new_flow_rate || svc.affinity_timeout_s)
			now = bpf_ktime_get_ns();
		switch (flood_guard(cfg, &svc, snat, now)) {
		case GUARD_DROP:
			return drop(ctx, pkt, identity, svc.svc_id, DROP_NEW_FLOW_RATE);
		case GUARD_STATELESS:
			stateless = 1;
			break;
		default:
			break;
		}
		/* Only new flows need the hash (here and for the SNAT port). */
		hash = flow_hash(&pkt->flow, cfg->hash_seed);
		b = pick_backend(&svc, &pkt->flow, hash, now, &backend_id);
		/* No state check: a table only names backends that were live
		 * when it was published, and a record keeps its address until
		 * a grace period after its removal. A packet that read the old
		 * table just before a flip still goes where it would have. */
		if (!b || backend_id == ID_NONE)
			return no_backend(ctx, pkt, identity, svc.svc_id, cfg);
		ct.backend_id = backend_id;
		ct.backend_gen = b->gen;
		ct.svc_id = svc.svc_id;
		ct.nat_port = 0;
	}

	rw.saddr = snat ? snat_src->addr : pkt->flow.src;
	rw.sport = snat ? ct.nat_port : pkt->flow.sport;
	rw.daddr = b->addr;
	rw.dport = b->port;

	/* The next hop of the packet as it will leave: rewritten (NAT), or
	 * in its tunnel (DSR, encap.h), from an LB address and longer. */
	hop_saddr = rw.saddr;
	hop_len = pkt->ip_len;
	hop_proto = pkt->flow.proto;
	hop_family = pkt->flow.family;
	if (svc.flags & SVC_F_ENCAP) {
		why = encap_plan(pkt, b, cfg, svc.flags, &enc);
		if (why != DROP_NONE)
			return drop(ctx, pkt, identity, svc.svc_id, why);
		hop_saddr = enc.src->addr;
		hop_len += enc.overhead;
		hop_proto = enc.proto;
		hop_family = enc.family;
	}
	rc = next_hop_sized(ctx, pkt, hop_family, hop_saddr, rw.daddr, hop_len, hop_proto, cfg,
			    &fib);
	if (svc.flags & SVC_F_ENCAP) {
		why = encap_verdict(ctx, rc, &fib, &enc);
		if (why == DROP_ENCAP_MTU)
			return too_big(ctx, pkt, identity, svc.svc_id, &fib);
		/* Encapsulated now, before the state is written (the plan's
		 * stack slots are free again there): a drop below drops the
		 * tunnel packet, which nothing reads. */
		if (why == DROP_NONE && encap_apply(ctx, pkt, &enc, b, cfg))
			why = DROP_ENCAP;
	} else {
		why = fib_verdict(rc, &fib, snat);
	}
	if (why != DROP_NONE)
		return drop(ctx, pkt, identity, svc.svc_id, why);

	if (stateless) {
		count_global(CNT_GUARD_STATELESS, pkt->len);
	} else if (!ct_hit) {
		ct.ifindex = fib.ifindex;   /* replies are accepted only from here */
		/* Gateway-mode replies are found through reply_index and this
		 * conntrack entry (reply.h). SNAT replies, and those of a
		 * service missing from reply_index, need a reverse-NAT entry. */
		if (snat || (svc.flags & SVC_F_REV_NAT)) {
			why = reverse_nat_store(&pkt->flow, &rw, &ct, cfg, mix32(hash ^ 0x9e3779b9));
			if (why != DROP_NONE)
				return drop(ctx, pkt, identity, svc.svc_id, why);
		}
		if (ct_store(&pkt->flow, &ct))
			return drop(ctx, pkt, identity, svc.svc_id, DROP_CT_FULL);
		affinity_store(&svc, &pkt->flow, ct.backend_id, ct.backend_gen, now);
		count_global(CNT_CT_NEW, pkt->len);
	} else {
		count_global(CNT_CT_HIT, pkt->len);
	}

	if (!ct_hit && !stateless)
		monitor_forward(ctx, pkt, cfg, identity, svc.svc_id, ct.backend_id, b);
	probe_record(pkt, DROP_NONE, identity, svc.svc_id, ct.backend_id, ct_hit, 0);
	if (svc.flags & SVC_F_ENCAP)
		count_global(svc.flags & SVC_F_GUE ? CNT_ENCAP_GUE : CNT_ENCAP_IPIP, pkt->len);
	else
		rewrite_packet(ctx, pkt, &rw);
	counter_add(&svc_stats, svc.svc_id, pkt->len);
	counter_add(&backend_stats, ct.backend_id, pkt->len);
	return transmit(ctx, pkt, &fib, rc);
}

/* `cfg` is the caller's active_config(), possibly NULL. */
static __always_inline int handle_reply(struct xdp_md *ctx, struct packet *pkt,
					const struct nat_entry *nat_ptr, const struct lb_config *cfg)
{
	struct nat_entry nat = *nat_ptr;
	struct bpf_fib_lookup fib = {};
	struct rewrite rw;
	enum drop_reason why;
	int rc;

	/* Only the backend-facing interface may carry replies: a forged
	 * "reply" from elsewhere must not get translated into a client flow. */
	if (nat.ifindex != ctx->ingress_ifindex)
		return drop(ctx, pkt, source_identity(&pkt->flow), nat.svc_id, DROP_SPOOFED_REPLY);

	if (!cfg)
		return count_verdict(XDP_ABORTED, pkt->len);
	rw.saddr = nat.vip;
	rw.sport = nat.vip_port;
	rw.daddr = nat.client;
	rw.dport = nat.client_port;
	rc = next_hop(ctx, pkt, rw.saddr, rw.daddr, cfg, &fib);
	why = fib_verdict(rc, &fib, 1);      /* a reply leaves from the VIP */
	if (why != DROP_NONE)
		return drop(ctx, pkt, IDENTITY_UNKNOWN, nat.svc_id, why);

	probe_record(pkt, DROP_NONE, IDENTITY_UNKNOWN, nat.svc_id, nat.backend_id, 0, 1);
	rewrite_packet(ctx, pkt, &rw);
	count_global(CNT_REPLY, pkt->len);
	return transmit(ctx, pkt, &fib, rc);
}

/* Not a service packet: a reply to a translated flow, or not ours. */
static __always_inline int handle_other(struct xdp_md *ctx, struct packet *pkt)
{
	struct lb_config *cfg = active_config();
	struct nat_entry reply = {};
	struct nat_entry *nat;

	/* SNAT has no gateway flows: its family's replies are all in rev_nat. */
	if (cfg && !snat_on(cfg, pkt->flow.family) && reply_from_index(ctx, pkt, cfg, &reply))
		return handle_reply(ctx, pkt, &reply, cfg);
	nat = bpf_map_lookup_elem(&rev_nat, &pkt->flow);
	if (nat)
		return handle_reply(ctx, pkt, nat, cfg);
	if (is_vip(&pkt->flow))
		return drop(ctx, pkt, source_identity(&pkt->flow), ID_NONE, DROP_NO_SERVICE);
	return count_verdict(XDP_PASS, pkt->len);
}

/* A packet parse_packet() did not find fit to balance: dropped if it is
 * addressed to a VIP, passed untouched otherwise. */
static __always_inline int not_balanced(struct xdp_md *ctx, struct packet *pkt, int res)
{
	if (is_vip(&pkt->flow))
		return drop(ctx, pkt, source_identity(&pkt->flow), ID_NONE, parse_drop_reason(res));
	return count_verdict(XDP_PASS, pkt->len);
}

/* ICMP errors (icmp_error.h), in a program of their own entered by tail
 * call: its own stack (the entry program's leaves no room for the error
 * path's records and subprograms) and its own verifier budget. */
SEC("xdp")
int xdplb_icmp_error(struct xdp_md *ctx)
{
	struct packet pkt = {};
	int res = parse_packet(ctx, &pkt);
	int rc;

	if (res != PARSE_OTHER_L4)         /* cannot happen: only those come here */
		return count_verdict(XDP_PASS, pkt.len);
	rc = icmp_error(ctx, &pkt);
	if (rc != ICMP_ERROR_NOT_OURS)
		return rc;
	return not_balanced(ctx, &pkt, res);
}

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, int (void *));
} icmp_errors SEC(".maps") = {
	.values = { [0] = (void *)&xdplb_icmp_error },
};

SEC("xdp")
int xdplb_main(struct xdp_md *ctx)
{
	struct packet pkt = {};
	struct svc_value *svc;
	int res;

	/* First, while nothing else is live across the call. */
	if (for_another_host(ctx))
		return count_verdict(XDP_PASS, ctx->data_end - ctx->data);
	res = parse_packet(ctx, &pkt);
	if (res == PARSE_NOT_IP || res == PARSE_NO_IP_HEADER)
		return count_verdict(XDP_PASS, pkt.len);
	if (res != PARSE_OK) {
		if (res == PARSE_OTHER_L4 && icmp_error_candidate(&pkt))
			bpf_tail_call(ctx, &icmp_errors, 0);
		return not_balanced(ctx, &pkt, res);
	}

	svc = service_lookup(&pkt.flow);
	if (svc)
		return handle_service(ctx, &pkt, svc);
	return handle_other(ctx, &pkt);
}
