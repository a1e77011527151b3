/* SPDX-License-Identifier: Apache-2.0 */
/* Per-CPU token buckets (flow monitor, flood guard). */
#ifndef XDPLB_RATELIMIT_H
#define XDPLB_RATELIMIT_H

#include "maps.h"

#define NSEC_PER_SEC 1000000000ULL

/* Take one token at `rate` per second, at most `burst` saved up. Credit is
 * kept in ns: a token costs 1e9 / rate ns and credit accrues with elapsed
 * time, so the (unbounded) elapsed time is never multiplied and nothing
 * overflows. A bucket never used (last_ns == 0) starts full. Per-CPU
 * buckets need no atomics: only this CPU's softirq touches them. */
static __always_inline int bucket_take(struct token_bucket *b, __u32 rate, __u32 burst,
				       __u64 now)
{
	__u64 cost = NSEC_PER_SEC / (rate ? rate : 1);
	__u64 cap = cost * (burst ? burst : 1);
	__u64 credit = b->credit_ns + (now - b->last_ns);

	if (credit > cap)
		credit = cap;
	b->last_ns = now;
	if (credit < cost) {
		b->credit_ns = credit;
		return 0;
	}
	b->credit_ns = credit - cost;
	return 1;
}

#endif
