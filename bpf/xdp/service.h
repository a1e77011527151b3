/* SPDX-License-Identifier: Apache-2.0 */
/* Service lookup: one hash lookup on (VIP, port, proto). */
#ifndef XDPLB_SERVICE_H
#define XDPLB_SERVICE_H

#include "parse.h"

static __always_inline struct svc_value *service_lookup(const struct flow_key *flow)
{
	struct svc_key key = {
		.port = flow->dport,
		.proto = flow->proto,
		.family = flow->family,
	};

	__builtin_memcpy(key.vip, flow->dst, sizeof(key.vip));
	return bpf_map_lookup_elem(&services, &key);
}

/* Is this destination address a VIP at all (any port, any protocol)? */
static __always_inline int is_vip(const struct flow_key *flow)
{
	struct vip_key key = { .family = flow->family };

	__builtin_memcpy(key.addr, flow->dst, sizeof(key.addr));
	return bpf_map_lookup_elem(&vips, &key) != NULL;
}

#endif
