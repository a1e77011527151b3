/* SPDX-License-Identifier: Apache-2.0 */
/* Source identity (LPM trie) and the (service, identity) verdict. */
#ifndef XDPLB_POLICY_H
#define XDPLB_POLICY_H

#include "parse.h"

static __always_inline __u32 source_identity(const struct flow_key *flow)
{
	struct identity_key key = {
		/* The family word is part of the matched prefix. */
		.prefixlen = 32 + 128,
		.family = flow->family,
	};
	struct identity_value *v;

	__builtin_memcpy(key.addr, flow->src, sizeof(key.addr));
	v = bpf_map_lookup_elem(&identities, &key);
	return v ? v->identity : IDENTITY_WORLD;
}

/* Returns 1 if `identity` may reach the service. A service without
 * SVC_F_HAS_POLICY allows everyone and costs no lookup. */
static __always_inline int policy_allows(const struct svc_value *svc, __u32 identity)
{
	struct policy_key key = {
		.svc_id = svc->svc_id,
		.identity = identity,
		.gen = svc->policy_gen,
	};
	struct policy_value *v;

	if (!(svc->flags & SVC_F_HAS_POLICY))
		return 1;
	v = bpf_map_lookup_elem(&policy, &key);
	if (v)
		return v->verdict == VERDICT_ALLOW;
	return !(svc->flags & SVC_F_DEFAULT_DENY);
}

#endif
