/* SPDX-License-Identifier: Apache-2.0 */
/* Per-CPU packet and byte counters. No atomics: every map here is per-CPU. */
#ifndef XDPLB_COUNTERS_H
#define XDPLB_COUNTERS_H

#include "maps.h"

/* Set at load time. The `flow` command loads a second copy of the program
 * with dry_run = 1 to ask what it would do: that copy shares the live maps
 * but neither counts nor creates conntrack or NAT state. The verifier prunes
 * the dead branch, so the live copy pays nothing for it. */
const volatile __u32 dry_run = 0;

static __always_inline void counter_add(void *map, __u32 key, __u32 bytes)
{
	struct counter *c;

	if (dry_run)
		return;
	c = bpf_map_lookup_elem(map, &key);
	if (c) {
		c->packets++;
		c->bytes += bytes;
	}
}

static __always_inline void count_global(enum xdplb_counter idx, __u32 bytes)
{
	counter_add(&global_stats, idx, bytes);
}

static __always_inline int count_verdict(int action, __u32 bytes)
{
	switch (action) {
	case XDP_PASS:
		count_global(CNT_PASS, bytes);
		break;
	case XDP_TX:
		count_global(CNT_TX, bytes);
		break;
	case XDP_REDIRECT:
		count_global(CNT_REDIRECT, bytes);
		break;
	case XDP_DROP:
		count_global(CNT_DROP, bytes);
		break;
	default:
		count_global(CNT_ABORTED, bytes);
	}
	return action;
}

/* Count a drop by reason, and by (identity, service, reason). */
static __always_inline int drop_packet(__u32 identity, __u32 svc_id,
				       enum drop_reason reason, __u32 bytes)
{
	struct drop_key key = { .identity = identity, .svc_id = svc_id, .reason = reason };
	struct counter *c;

	counter_add(&drop_stats, reason, bytes);
	if (!dry_run) {
		c = bpf_map_lookup_elem(&drop_detail, &key);
		if (c) {
			c->packets++;
			c->bytes += bytes;
		} else {
			struct counter init = { .packets = 1, .bytes = bytes };

			bpf_map_update_elem(&drop_detail, &key, &init, BPF_NOEXIST);
		}
	}
	return count_verdict(XDP_DROP, bytes);
}

#endif
