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
 * Without a token:
 *   - a TCP SYN, a UDP datagram, and anything in SNAT mode is dropped
 *     (DROP_NEW_FLOW_RATE): a new connection over the rate, retried by its
 *     client. Forwarding it without state would be worse: its replies could
 *     not be translated back, and the backend would still pay for it.
 *   - any other TCP packet (a flow whose entry was evicted, or state lost in
 *     a restart) is forwarded to the backend Maglev picks, which is the one
 *     it had while the service is unchanged, and nothing is written
 *     (CNT_GUARD_STATELESS). Its reply path still has its reverse-NAT entry.
 */
#ifndef XDPLB_GUARD_H
#define XDPLB_GUARD_H

#include "counters.h"
#include "parse.h"
#include "ratelimit.h"

enum guard_verdict {
	GUARD_INSERT = 0,       /* write state as usual */
	GUARD_STATELESS = 1,    /* forward by Maglev, write nothing */
	GUARD_DROP = 2,         /* DROP_NEW_FLOW_RATE */
};

/* `now` is bpf_ktime_get_ns(), read by the caller whenever the guard is on. */
static __always_inline enum guard_verdict flood_guard(const struct packet *pkt,
						      const struct lb_config *cfg, int snat, __u64 now)
{
	struct token_bucket *b;
	__u32 zero = 0;

	/* The dry-run copy explains the normal decision and takes no token. */
	if (!cfg->new_flow_rate || dry_run)
		return GUARD_INSERT;
	b = bpf_map_lookup_elem(&flood_bucket, &zero);
	if (!b || bucket_take(b, cfg->new_flow_rate, cfg->new_flow_burst, now))
		return GUARD_INSERT;
	if (snat || !pkt->tcp || pkt->tcp->syn)
		return GUARD_DROP;
	return GUARD_STATELESS;
}

#endif
