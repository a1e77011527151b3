/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Client-IP affinity (Kubernetes `sessionAffinity: ClientIP`): a client's
 * new flows to a service go to the backend its last new flow went to, if
 * that was less than svc->affinity_timeout_s ago and the backend is still
 * an active member of the service. The clock restarts with each new flow,
 * as kube-proxy's `recent` match does (--rcheck --seconds, then --set).
 * Otherwise Maglev picks, and the pick is remembered.
 */
#ifndef XDPLB_AFFINITY_H
#define XDPLB_AFFINITY_H

#include "counters.h"
#include "maglev.h"
#include "maps.h"
#include "ratelimit.h"

static __always_inline void affinity_key_of(struct affinity_key *key, const struct svc_value *svc,
					    const struct flow_key *flow)
{
	__builtin_memcpy(key->client, flow->src, sizeof(key->client));
	key->svc_id = svc->svc_id;
	key->family = flow->family;
}

/* The backend this client is bound to, or NULL. */
static __always_inline struct backend *affinity_backend(const struct svc_value *svc,
							const struct flow_key *flow, __u64 now,
							__u32 *backend_id)
{
	struct affinity_key key = {};
	struct affinity_value *a;
	struct backend *b;
	__u32 id;

	if (!svc->affinity_timeout_s)
		return NULL;
	affinity_key_of(&key, svc, flow);
	a = bpf_map_lookup_elem(&affinity, &key);
	if (!a || now - a->last_ns > (__u64)svc->affinity_timeout_s * NSEC_PER_SEC)
		return NULL;
	id = a->backend_id;
	b = bpf_map_lookup_elem(&backends, &id);
	/* Draining backends take no new flows, affinity or not; a reused id
	 * (other gen) or another service's record is not the one remembered. */
	if (!b || b->state != BACKEND_ACTIVE || b->gen != a->backend_gen || b->svc_id != svc->svc_id)
		return NULL;
	*backend_id = id;
	return b;
}

static __always_inline void affinity_store(const struct svc_value *svc, const struct flow_key *flow,
					   __u32 backend_id, __u32 backend_gen, __u64 now)
{
	struct affinity_key key = {};
	struct affinity_value v = {
		.last_ns = now,
		.backend_id = backend_id,
		.backend_gen = backend_gen,
	};

	if (!svc->affinity_timeout_s || dry_run)
		return;
	affinity_key_of(&key, svc, flow);
	bpf_map_update_elem(&affinity, &key, &v, BPF_ANY);
}

/* The backend a new flow of `svc` goes to: the client's affinity backend,
 * else Maglev's pick for the flow's `hash`. One function for both
 * directions: a flow forwarded without state has its replies recognised
 * by calling it again (reply.h), so the two must decide alike. */
static __always_inline struct backend *pick_backend(const struct svc_value *svc,
						    const struct flow_key *flow, __u32 hash,
						    __u64 now, __u32 *backend_id)
{
	struct backend *b = affinity_backend(svc, flow, now, backend_id);

	if (b)
		return b;
	*backend_id = maglev_pick(svc, hash);
	return bpf_map_lookup_elem(&backends, backend_id);
}

#endif
