/* SPDX-License-Identifier: Apache-2.0 */
/*
 * fwd_main: the lab's physical limit, the least an XDP forwarder can do
 * (rewrite both MACs, bpf_redirect to the egress veth).
 * state_main: the least a forwarder that keeps per-flow state can do: the
 * same, plus one lookup of the packet's 5-tuple in an LRU hash shaped like
 * xdplb's conntrack, and an insert when it misses. It is the floor of any
 * design with an LRU conntrack, which is what the issue asks xdplb for.
 * pass_main: XDP_PASS, so that a veth receives frames XDP_TX'd or
 * redirected into it by its peer while the kernel stack (iptables, nftables)
 * does the forwarding.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include "bench.h"
#include "../../bpf/xdp/flow.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct fwd_config);
} fwd_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);           /* xdplb's default limits.conntrack */
	__type(key, struct flow_key);          /* xdplb's own layouts: an insert */
	__type(value, struct ct_entry);        /* costs what it costs there */
} flow_state SEC(".maps");

static __always_inline int forward(struct ethhdr *eth)
{
	struct fwd_config *c;
	__u32 zero = 0;

	c = bpf_map_lookup_elem(&fwd_config, &zero);
	if (!c || !c->ifindex)
		return XDP_PASS;
	__builtin_memcpy(eth->h_dest, c->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, c->smac, ETH_ALEN);
	return bpf_redirect(c->ifindex, 0);
}

SEC("xdp")
int fwd_main(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	return forward(eth);
}

SEC("xdp")
int state_main(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *l4 = (void *)(ip + 1);   /* TCP and UDP ports sit alike */
	struct flow_key key = {};
	struct ct_entry value = {};

	if ((void *)(l4 + 1) > data_end || eth->h_proto != __builtin_bswap16(ETH_P_IP) ||
	    ip->ihl != 5)
		return XDP_PASS;
	key.src[0] = ip->saddr;
	key.dst[0] = ip->daddr;
	key.sport = l4->source;
	key.dport = l4->dest;
	key.proto = ip->protocol;
	key.family = 2;
	if (!bpf_map_lookup_elem(&flow_state, &key))
		bpf_map_update_elem(&flow_state, &key, &value, BPF_ANY);
	return forward(eth);
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
