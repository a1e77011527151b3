/* SPDX-License-Identifier: Apache-2.0 */
/* Backend choice: a seeded flow hash indexes the service's Maglev table. */
#ifndef XDPLB_MAGLEV_H
#define XDPLB_MAGLEV_H

#include "maps.h"

/* murmur3's finaliser: full avalanche, five ALU ops, no tables. */
static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 flow_hash(const struct flow_key *flow, __u32 seed)
{
	__u32 h = seed;

	/* All four address words, so an IPv6 flow hashes the same way. */
	h = mix32(h ^ flow->src[0]);
	h = mix32(h ^ flow->src[1]);
	h = mix32(h ^ flow->src[2]);
	h = mix32(h ^ flow->src[3]);
	h = mix32(h ^ flow->dst[0]);
	h = mix32(h ^ flow->dst[1]);
	h = mix32(h ^ flow->dst[2]);
	h = mix32(h ^ flow->dst[3]);
	h = mix32(h ^ (((__u32)flow->sport << 16) | flow->dport));
	return mix32(h ^ flow->proto);
}

/* Returns the backend id in slot hash % ring_size of the service's table,
 * or ID_NONE. ring_size is checked non-zero by the caller. */
static __always_inline __u32 maglev_pick(const struct svc_value *svc, __u32 hash)
{
	__u32 slot = svc->ring_offset + hash % svc->ring_size;
	__u32 chunk = slot / MAGLEV_CHUNK_SLOTS;
	struct maglev_chunk *c = bpf_map_lookup_elem(&maglev_pool, &chunk);

	if (!c)
		return ID_NONE;
	/* The mask keeps the verifier's bound on the index obvious. */
	return c->slots[slot & (MAGLEV_CHUNK_SLOTS - 1)];
}

#endif
