/* SPDX-License-Identifier: Apache-2.0 */
/* Flow stickiness: an LRU from the client flow to its backend. */
#ifndef XDPLB_CONNTRACK_H
#define XDPLB_CONNTRACK_H

#include "counters.h"

/* The backend a conntrack entry points at, if that backend still exists
 * (active or draining) and is the same incarnation of its id. */
static __always_inline struct backend *ct_backend(const struct ct_entry *ct, __u32 svc_id)
{
	__u32 id = ct->backend_id;
	struct backend *b = bpf_map_lookup_elem(&backends, &id);

	if (!b || b->state == BACKEND_FREE || b->gen != ct->backend_gen ||
	    b->svc_id != svc_id)
		return NULL;
	return b;
}

static __always_inline int ct_store(const struct flow_key *flow, const struct ct_entry *ct)
{
	if (dry_run)
		return 0;
	return bpf_map_update_elem(&conntrack, flow, ct, BPF_ANY);
}

#endif
