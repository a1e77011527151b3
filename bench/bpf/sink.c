/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The benchmark's sink: counts what arrives and checks that each stamped
 * packet reached a backend of the service it was sent to. The generator
 * stamps STAMP_MAGIC and the service's stamp at the start of the L4 payload;
 * the harness fills `sink_backends` with every backend (address, port,
 * protocol) -> stamp. Stamped packets are dropped, everything else (ARP)
 * passes.
 *
 * A DSR engine's frame is the client's packet inside an outer IPv4 header
 * (IPIP, or GUE to sink_config.gue_port): the stamp is read from the inner
 * packet, the backend is the outer destination, and the inner destination
 * must be the service's VIP (enum sink_delivery says which kind is due).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "shared.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SINK_MAX_BACKENDS);
	__type(key, struct sink_key);
	__type(value, struct sink_value);
} sink_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sink_config);
} sink_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sink_state);
} sink_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SINK_COUNTERS);
	__type(key, __u32);
	__type(value, struct sink_stat);
} sink_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SINK_SAMPLES);
	__type(key, __u32);
	__type(value, struct sink_sample);
} sink_samples SEC(".maps");

static __always_inline int count(__u32 what, __u32 len, int verdict)
{
	struct sink_stat *s = bpf_map_lookup_elem(&sink_stats, &what);

	if (s) {
		s->packets++;
		s->bytes += len;
	}
	return verdict;
}

static __always_inline void sample(struct xdp_md *ctx, struct sink_config *cfg, __u32 verdict,
				   __u32 len)
{
	__u32 zero = 0, i;
	__u64 n;
	struct sink_state *st = bpf_map_lookup_elem(&sink_state, &zero);
	struct sink_sample *smp;

	if (!st || st->samples >= cfg->sample_max)
		return;
	/* Samples are for tests of one slow stream: no atomics needed. */
	i = st->samples;
	st->samples = i + 1;
	if (i >= SINK_SAMPLES)
		return;
	smp = bpf_map_lookup_elem(&sink_samples, &i);
	if (!smp)
		return;
	smp->len = len;
	smp->verdict = verdict;
	/* 64-bit and clamped on the very register passed to the helper:
	 * clang 14 otherwise hands it an unchecked 32-bit copy. */
	n = len;
	if (n > SINK_SAMPLE_BYTES)
		n = SINK_SAMPLE_BYTES;
	barrier_var(n);
	if (n >= 1 && n <= SINK_SAMPLE_BYTES)
		bpf_xdp_load_bytes(ctx, 0, smp->data, n);
}

/* The client's packet inside an encapsulated frame: IPIP, or GUE variant 1
 * (no GUE header: the UDP payload is the inner IP header) to the configured
 * port. NULL for any other frame. */
static __always_inline struct iphdr *inner_ip(struct sink_config *cfg, struct iphdr *ip,
					       void *data_end)
{
	void *l4 = (void *)ip + ip->ihl * 4;
	struct iphdr *inner = NULL;

	if (ip->protocol == IPPROTO_IPIP) {
		inner = l4;
	} else if (ip->protocol == IPPROTO_UDP && cfg->gue_port) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end || udp->dest != cfg->gue_port)
			return NULL;
		inner = (void *)(udp + 1);
	}
	if (!inner || (void *)(inner + 1) > data_end || inner->version != 4 || inner->ihl < 5)
		return NULL;
	return inner;
}

SEC("xdp")
int sink_main(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 len = data_end - data, zero = 0, verdict;
	struct ethhdr *eth = data;
	struct sink_config *cfg;
	struct sink_value *want;
	struct flow_ctl *fc;
	struct sink_key key = {};
	struct iphdr *ip, *inner;
	__u32 *stamp;
	__be32 to;
	void *l4;
	__u16 dport;

	cfg = bpf_map_lookup_elem(&sink_config, &zero);
	if (!cfg)
		return XDP_ABORTED;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return count(SINK_OTHER, len, XDP_PASS);
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->ihl < 5)
		return count(SINK_OTHER, len, XDP_PASS);
	to = ip->daddr;             /* where the frame was sent: the backend */
	inner = inner_ip(cfg, ip, data_end);
	if (inner)
		ip = inner;
	l4 = (void *)ip + ip->ihl * 4;
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end)
			return count(SINK_OTHER, len, XDP_PASS);
		dport = udp->dest;
		stamp = (void *)(udp + 1);
	} else if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end)
			return count(SINK_OTHER, len, XDP_PASS);
		dport = tcp->dest;
		stamp = (void *)tcp + tcp->doff * 4;
	} else {
		return count(SINK_OTHER, len, XDP_PASS);
	}
	if ((void *)(stamp + 2) > data_end || stamp[0] != bpf_htonl(STAMP_MAGIC))
		return count(SINK_UNSTAMPED, len, XDP_PASS);

	fc = bpf_map_lookup_elem(&flow_ctl, &zero);
	if (fc)
		fc->delivered++;        /* one NAPI context at a time: no atomics */
	verdict = SINK_GOOD;
	if (cfg->check) {
		key.addr = to;
		key.port = dport;
		key.proto = ip->protocol;
		want = bpf_map_lookup_elem(&sink_backends, &key);
		if (!want || want->stamp != bpf_ntohl(stamp[1]) ||
		    (inner != NULL) != (cfg->delivery == SINK_ENCAP) ||
		    (inner && want->vip != ip->daddr))
			verdict = SINK_MISROUTED;
	}
	if (verdict == SINK_GOOD && cfg->watch_stamp && bpf_ntohl(stamp[1]) == cfg->watch_stamp) {
		struct sink_state *st = bpf_map_lookup_elem(&sink_state, &zero);

		if (st && !st->watch_first_ns)
			st->watch_first_ns = bpf_ktime_get_ns();
	}
	if (cfg->sample_max)
		sample(ctx, cfg, verdict, len);
	return count(verdict, len, XDP_DROP);
}
