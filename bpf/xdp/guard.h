/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Flood guard: a per-CPU bound on how fast new flows may write state.
 *
 * Each conntrack miss that would insert state (a conntrack entry, and a
 * reverse-NAT entry or a SNAT port) first takes a token from this CPU's
 * bucket (cfg->new_flow_rate per second, cfg->new_flow_burst back to back).
 * Inserts into full LRU maps are the most expensive thing the program does
 * (~0.5 us each under load), and a random-source flood would otherwise
 * evict the state of established flows at line rate.
 *
 * Without a token, a flow that may go stateless (below) is forwarded to
 * the backend a new flow would get (pick_backend(): the client's affinity
 * backend, else Maglev's pick), and nothing is written: no conntrack,
 * affinity or reverse-NAT entry, no flow event (CNT_GUARD_STATELESS). A
 * new flow (TCP SYN, UDP) and a flow that lost its entry alike: a flash
 * crowd is served, not turned away. While the service's table does not
 * change, each packet of the flow is picked the same way, so it keeps its
 * backend; its gateway-mode replies are recognised by deciding again
 * (reply.h). The rest is dropped (DROP_NEW_FLOW_RATE), see below.
 */
#ifndef XDPLB_GUARD_H
#define XDPLB_GUARD_H

#include "counters.h"
#include "parse.h"
#include "ratelimit.h"

enum guard_verdict {
	GUARD_INSERT = 0,       /* write state as usual */
	GUARD_STATELESS = 1,    /* forward by pick_backend(), write nothing */
	GUARD_DROP = 2,         /* DROP_NEW_FLOW_RATE */
};

/* May a flow of `svc` be forwarded without state? Yes, unless its replies
 * can only be translated through state written for the flow:
 *   - SNAT: a reply carries the SNAT address and port, not the client's
 *     address and port, and 16 bits of port cannot encode 48 bits of
 *     client: without the reverse-NAT entry there is nothing to restore;
 *   - SVC_F_REV_NAT: the service is not in the reply index entry of its
 *     backends, so a reply cannot name it (reply.h).
 * Only replies matter here: a flow whose replies bypass the LB has nothing
 * to restore. */
static __always_inline int may_go_stateless(const struct svc_value *svc, int snat)
{
	return !snat && !(svc->flags & SVC_F_REV_NAT);
}

/* `now` is bpf_ktime_get_ns(), read by the caller whenever the guard is on. */
static __always_inline enum guard_verdict flood_guard(const struct lb_config *cfg,
						      const struct svc_value *svc, int snat, __u64 now)
{
	struct token_bucket *b;
	__u32 zero = 0;

	/* The dry-run copy explains the normal decision and takes no token. */
	if (!cfg->new_flow_rate || dry_run)
		return GUARD_INSERT;
	b = bpf_map_lookup_elem(&flood_bucket, &zero);
	if (!b || bucket_take(b, cfg->new_flow_rate, cfg->new_flow_burst, now))
		return GUARD_INSERT;
	return may_go_stateless(svc, snat) ? GUARD_STATELESS : GUARD_DROP;
}

#endif
