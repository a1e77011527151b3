/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Flow events for `xdplb monitor`: struct flow_event records in the `events`
 * ring buffer.
 *
 * What is emitted:
 *   - every drop, whatever the path (policy, no backend, malformed VIP
 *     traffic, spoofed replies, ...);
 *   - the first packet of each new forwarded flow (a conntrack miss), one in
 *     cfg->monitor_sample of them.
 * Established packets and replies emit nothing: one event per flow, so the
 * event rate follows connection setups, not bandwidth.
 *
 * A flood must not stall the data path, so an event first takes a token from
 * a per-CPU bucket (no atomics, no shared cache line). When the bucket is
 * empty or the ring is full the event is dropped and counted in
 * CNT_EVENTS_LOST; nothing here ever waits. With cfg->monitor_rate == 0 the
 * cost is one load from the config. The dry-run copy never emits.
 */
#ifndef XDPLB_MONITOR_H
#define XDPLB_MONITOR_H

#include "counters.h"
#include "nat.h"
#include "policy.h"
#include "ratelimit.h"

/* What the caller knows about the packet; the rest comes from ctx and flow. */
struct monitor_note {
	__u32 verdict;              /* enum event_verdict */
	__u32 reason;               /* enum drop_reason */
	__u32 identity;
	__u32 svc_id;
	__u32 backend_id;
	__u32 len;
};

/* A subprogram, not inlined: drop() calls it from a dozen paths, and one
 * copy keeps the program small. `cfg` and `b` may be NULL. */
static __noinline int monitor_emit(struct xdp_md *ctx, const struct flow_key *flow,
				   const struct lb_config *cfg, const struct monitor_note *note,
				   const struct backend *b)
{
	struct monitor_bucket *bucket;
	struct flow_event *e;
	__u32 zero = 0, identity;
	__u64 now;

	if (dry_run)
		return 0;
	if (!cfg)
		cfg = active_config();
	if (!cfg || !cfg->monitor_rate)
		return 0;
	bucket = bpf_map_lookup_elem(&monitor_bucket, &zero);
	if (!bucket)
		return 0;
	/* Sampling is not a loss: skipped flows are not counted. */
	if (note->verdict == EVENT_FORWARDED && cfg->monitor_sample > 1) {
		if (++bucket->sampled < cfg->monitor_sample)
			return 0;
		bucket->sampled = 0;
	}
	now = bpf_ktime_get_ns();
	if (!bucket_take(&bucket->tokens, cfg->monitor_rate, cfg->monitor_burst, now)) {
		count_global(CNT_EVENTS_LOST, note->len);
		return 0;
	}
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_global(CNT_EVENTS_LOST, note->len);
		return 0;
	}
	/* A service without a policy never looked the source up; an event is
	 * rare enough to pay for it here. */
	identity = note->identity;
	if (identity == IDENTITY_UNKNOWN)
		identity = source_identity(flow);

	e->timestamp_ns = now;
	__builtin_memcpy(e->src, flow->src, sizeof(e->src));
	__builtin_memcpy(e->dst, flow->dst, sizeof(e->dst));
	if (b) {
		__builtin_memcpy(e->backend_addr, b->addr, sizeof(e->backend_addr));
		e->backend_port = b->port;
	} else {
		__builtin_memset(e->backend_addr, 0, sizeof(e->backend_addr));
		e->backend_port = 0;
	}
	e->sport = flow->sport;
	e->dport = flow->dport;
	e->proto = flow->proto;
	e->family = flow->family;
	e->verdict = note->verdict;
	e->reason = note->reason;
	e->identity = identity;
	e->svc_id = note->svc_id;
	e->backend_id = note->backend_id;
	e->ifindex = ctx->ingress_ifindex;
	e->len = note->len;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
	count_global(CNT_EVENTS, note->len);
	return 1;
}

/* Called by drop(), for every drop reason. */
static __always_inline void monitor_drop(struct xdp_md *ctx, const struct packet *pkt,
					 __u32 identity, __u32 svc_id, enum drop_reason reason)
{
	struct monitor_note note = {
		.verdict = EVENT_DROPPED,
		.reason = reason,
		.identity = identity,
		.svc_id = svc_id,
		.backend_id = ID_NONE,
		.len = pkt->len,
	};

	if (dry_run)
		return;
	monitor_emit(ctx, &pkt->flow, NULL, &note, NULL);
}

/* Called on the forward path for the first packet of a new flow, once the
 * backend, conntrack and NAT state are settled. `b` is the backend record. */
static __always_inline void monitor_forward(struct xdp_md *ctx, const struct packet *pkt,
					    const struct lb_config *cfg, __u32 identity,
					    __u32 svc_id, __u32 backend_id, const struct backend *b)
{
	struct monitor_note note = {
		.verdict = EVENT_FORWARDED,
		.reason = DROP_NONE,
		.identity = identity,
		.svc_id = svc_id,
		.backend_id = backend_id,
		.len = pkt->len,
	};

	if (dry_run || !cfg->monitor_rate)
		return;
	monitor_emit(ctx, &pkt->flow, cfg, &note, b);
}

#endif
