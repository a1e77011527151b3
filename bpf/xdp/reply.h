/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Gateway-mode replies, found without a per-flow reverse-NAT entry.
 *
 * A reply (backend -> client) belongs to a client flow (client -> VIP).
 * The VIP is the one part of that flow the reply does not carry:
 * reply_index gives the services that the reply's source address serves
 * (usually one), svc_keys their VIPs. A candidate counts if the flow's
 * conntrack entry points at this very backend. So a new flow writes one
 * LRU entry instead of two (an insert into a full LRU costs ~400 ns,
 * README "Benchmarks"), and a reply pays two lookups more than a
 * reverse-NAT hit.
 *
 * A flow the flood guard forwarded without state (guard.h) has no entry.
 * Its reply is recognised by deciding again what the forward path decides
 * for the flow now (policy, then pick_backend(): the current table, the
 * same seed). It is translated only if exactly one candidate service
 * without state for the flow picks this very backend, and the reply came
 * in by the interface the route to that backend leaves by. Two such candidates (services sharing
 * the backend address, both picking it for this client port) cannot be
 * told apart: the reply passes untouched, as does anything else. So a
 * forged reply gets a VIP source only for a flow that would go to the
 * address it forges, and only from that backend's side of the LB.
 */
#ifndef XDPLB_REPLY_H
#define XDPLB_REPLY_H

#include "affinity.h"
#include "conntrack.h"
#include "forward.h"
#include "guard.h"
#include "policy.h"
#include "service.h"

/* The backend id the forward path picks now for `flow`, a flow of service
 * `svc_id` without state; ID_NONE if there is none, or if that service's
 * flows never go without state. A subprogram: the entry program's stack
 * has no room for it. Also the ICMP error path's (icmp_error.h). */
static __noinline __u32 stateless_pick(const struct lb_config *cfg, const struct flow_key *flow,
				       __u32 svc_id)
{
	struct svc_value *svc;
	struct backend *b;
	__u32 backend_id, hash;
	__u64 now = 0;

	/* Whole, here: left alone, clang keeps the flow's words loaded across
	 * the lookups below (128 bytes of stack instead of 40). */
	hash = flow_hash(flow, cfg->hash_seed);
	barrier_var(hash);
	/* The flow's service now, if it is still this one; a flow of a
	 * service whose replies need state never went without. */
	svc = service_lookup(flow);
	if (!svc || svc->svc_id != svc_id || !svc->ring_size || !may_go_stateless(svc, 0))
		return ID_NONE;
	/* A client the policy denies had no flow to answer. */
	if ((svc->flags & SVC_F_HAS_POLICY) && !policy_allows(svc, source_identity(flow)))
		return ID_NONE;
	if (svc->affinity_timeout_s)
		now = bpf_ktime_get_ns();
	b = pick_backend(svc, flow, hash, now, &backend_id);
	if (!b || backend_id == ID_NONE)
		return ID_NONE;
	return backend_id;
}

/* stateless_pick()'s backend id if it is `from` (a reply's source); else
 * ID_NONE. */
static __always_inline __u32 reply_picked(const struct lb_config *cfg, const struct flow_key *flow,
					  __u32 svc_id, const struct backend_addr *from)
{
	__u32 backend_id = stateless_pick(cfg, flow, svc_id);
	struct backend *b;

	if (backend_id == ID_NONE)
		return ID_NONE;
	b = bpf_map_lookup_elem(&backends, &backend_id);
	if (!b || !addr_equal(b->addr, from->addr) || b->port != from->port)
		return ID_NONE;
	return backend_id;
}

static __always_inline void reply_fill(struct nat_entry *nat, const struct flow_key *reply,
				       const struct svc_key *sk, __u32 svc_id, __u32 backend_id,
				       __u32 ifindex)
{
	__builtin_memcpy(nat->client, reply->dst, sizeof(nat->client));
	__builtin_memcpy(nat->vip, sk->vip, sizeof(nat->vip));
	nat->client_port = reply->dport;
	nat->vip_port = sk->port;
	nat->ifindex = ifindex;
	nat->svc_id = svc_id;
	nat->backend_id = backend_id;
}

/* The conntrack entry of `flow`, a flow of `svc_id`, as the forward path
 * reads it: one written under SNAT, or pointing at a removed backend, is no
 * state at all (NULL). Sets *ct to the entry when there is one. */
static __always_inline struct backend *reply_state(const struct flow_key *flow, __u32 svc_id,
						   struct ct_entry **ct)
{
	*ct = bpf_map_lookup_elem(&conntrack, flow);
	if (!*ct || (*ct)->nat_port)
		return NULL;
	return ct_backend(*ct, svc_id);
}

/* Candidate `i` of `rs` as a client flow: its service id, and its VIP and
 * port written into `flow` (whose client side is filled). ID_NONE: no more. */
static __always_inline struct svc_key *reply_candidate(const struct reply_services *rs, int i,
						       struct flow_key *flow, __u32 *svc_id)
{
	struct svc_key *sk;

	*svc_id = rs->svc_id[i];
	if (*svc_id == ID_NONE)
		return NULL;
	sk = bpf_map_lookup_elem(&svc_keys, svc_id);
	if (!sk)
		return NULL;
	__builtin_memcpy(flow->dst, sk->vip, sizeof(flow->dst));
	flow->dport = sk->port;
	return sk;
}

/* The flows without state that `pkt` might answer: translated only if
 * exactly one candidate without an entry picks the reply's source (`from`),
 * and the reply came in by the route to it. The second pass over the
 * candidates repeats their conntrack lookups rather than carry a mask of
 * them: the verifier would walk every value of the mask. */
static __always_inline int reply_without_state(struct xdp_md *ctx, const struct packet *pkt,
					       const struct lb_config *cfg,
					       const struct reply_services *rs, struct flow_key *flow,
					       const struct backend_addr *from, struct nat_entry *nat)
{
	const struct flow_key *reply = &pkt->flow;
	struct svc_key *picked = NULL;
	__u32 picked_svc = ID_NONE, picked_backend = ID_NONE;
	int i;

	for (i = 0; i < REPLY_INDEX_SVCS; i++) {
		__u32 svc_id, backend_id;
		struct ct_entry *ct;
		struct svc_key *sk = reply_candidate(rs, i, flow, &svc_id);

		if (svc_id == ID_NONE)
			break;
		if (!sk || reply_state(flow, svc_id, &ct))
			continue;
		backend_id = reply_picked(cfg, flow, svc_id, from);
		if (backend_id == ID_NONE)
			continue;
		if (picked)             /* a second one: whose reply is it? */
			return 0;
		picked = sk;
		picked_svc = svc_id;
		picked_backend = backend_id;
	}
	if (!picked || !arrived_by_route(ctx, pkt, cfg, reply->dst, reply->src))
		return 0;
	/* The route check stands in for the entry's interface. */
	reply_fill(nat, reply, picked, picked_svc, picked_backend, ctx->ingress_ifindex);
	count_global(CNT_REPLY_STATELESS, pkt->len);
	return 1;
}

/* Fill `nat` for the reply `pkt` if it answers a gateway-mode flow; 0 if
 * not. Conntrack first, for every candidate: a flow with state is the
 * truth, and its replies pay for no pick. */
static __always_inline int reply_from_index(struct xdp_md *ctx, const struct packet *pkt,
					    const struct lb_config *cfg, struct nat_entry *nat)
{
	const struct flow_key *reply = &pkt->flow;
	struct backend_addr key = {
		.port = reply->sport,
		.proto = reply->proto,
		.family = reply->family,
	};
	struct flow_key flow = {
		.sport = reply->dport,
		.proto = reply->proto,
		.family = reply->family,
	};
	struct reply_services *rs;
	int i;

	__builtin_memcpy(key.addr, reply->src, sizeof(key.addr));
	rs = bpf_map_lookup_elem(&reply_index, &key);
	if (!rs)
		return 0;
	__builtin_memcpy(flow.src, reply->dst, sizeof(flow.src));
	for (i = 0; i < REPLY_INDEX_SVCS; i++) {
		__u32 svc_id;
		struct ct_entry *ct;
		struct backend *b;
		struct svc_key *sk = reply_candidate(rs, i, &flow, &svc_id);

		if (svc_id == ID_NONE)
			break;
		if (!sk)
			continue;
		b = reply_state(&flow, svc_id, &ct);
		if (!b || !addr_equal(b->addr, reply->src) || b->port != reply->sport)
			continue;
		reply_fill(nat, reply, sk, svc_id, ct->backend_id, ct->ifindex);
		return 1;
	}
	/* Without the guard every flow writes state: nothing to pick. */
	if (!cfg->new_flow_rate)
		return 0;
	return reply_without_state(ctx, pkt, cfg, rs, &flow, &key, nat);
}

/* The client flow that the reply `pkt->flow` answers: gateway mode's
 * lookup through reply_index (filling `buf`), else a reverse-NAT entry.
 * NULL: not a reply to a translated flow. */
static __always_inline const struct nat_entry *reply_lookup(struct xdp_md *ctx,
							    const struct packet *pkt,
							    const struct lb_config *cfg,
							    struct nat_entry *buf)
{
	/* SNAT has no gateway flows: its family's replies are all in rev_nat. */
	if (cfg && !snat_on(cfg, pkt->flow.family) && reply_from_index(ctx, pkt, cfg, buf))
		return buf;
	return bpf_map_lookup_elem(&rev_nat, &pkt->flow);
}

#endif
