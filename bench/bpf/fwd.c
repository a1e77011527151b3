/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fwd_main: the lab's physical limit, the least an XDP forwarder can do
 * (rewrite both MACs, bpf_redirect to the egress veth).
 * pass_main: XDP_PASS, so that a veth receives frames XDP_TX'd or
 * redirected into it by its peer while the kernel stack (iptables, nftables)
 * does the forwarding.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "bench.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fwd_config);
} fwd_config SEC(".maps");

SEC("xdp")
int fwd_main(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct fwd_config *c;
	__u32 zero = 0;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	c = bpf_map_lookup_elem(&fwd_config, &zero);
	if (!c || !c->ifindex)
		return XDP_PASS;
	__builtin_memcpy(eth->h_dest, c->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, c->smac, ETH_ALEN);
	return bpf_redirect(c->ifindex, 0);
}

SEC("xdp")
int pass_main(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* An empty program: the test-run harness floor. */
SEC("xdp")
int empty_main(struct xdp_md *ctx)
{
	return XDP_DROP;
}
