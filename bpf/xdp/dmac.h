/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Frames addressed to another host. A switch flooding unknown unicast, or a
 * bridge or NIC in promiscuous mode, hands this interface unicast frames
 * whose destination MAC is not its own. The host they were sent to forwards
 * them already: forwarding them here too would duplicate them. They are
 * passed untouched; the kernel marks them PACKET_OTHERHOST and drops them.
 */
#ifndef XDPLB_DMAC_H
#define XDPLB_DMAC_H

#include <linux/if_ether.h>
#include "maps.h"
#include "counters.h"

/* 1 (and counted as CNT_OTHER_HOST) if the frame is unicast to a MAC other
 * than that of the interface it arrived on. Broadcast and multicast frames
 * (the group bit) are never for another host. An interface without an
 * if_macs entry (the control plane writes it at attach; BPF test-run's
 * ingress) is not checked.
 * A subprogram: its stack slots (the lookup keys), inlined into the entry
 * program, took the deepest call chain past the verifier's 512 bytes. */
static __noinline int for_another_host(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	const struct ethhdr *eth = data;
	__u32 ifindex = ctx->ingress_ifindex;
	const struct if_mac *own;

	if ((void *)(eth + 1) > data_end || (eth->h_dest[0] & 1))
		return 0;
	own = bpf_map_lookup_elem(&if_macs, &ifindex);
	if (!own)
		return 0;
	/* 4 + 2 bytes: the frame's MAC is only 2-byte aligned. */
	if (*(const __u32 *)own->addr == *(const __u32 *)eth->h_dest &&
	    *(const __u16 *)&own->addr[4] == *(const __u16 *)&eth->h_dest[4])
		return 0;
	count_global(CNT_OTHER_HOST, data_end - data);
	return 1;
}

#endif
