/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Traffic generator for BPF test-run's live-frames mode: every run turns the
 * frame into the next packet of the stream and sends it back out (XDP_TX).
 *
 * Live frames come from a page pool whose pages are recycled without being
 * re-initialised: a frame may hold whatever the next hop left in it (a
 * rewritten MAC, a decremented TTL, a DNATed address). So the whole template
 * is copied over the frame on every run, then the flow variables are written
 * and the checksums patched.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "shared.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gen_config);
} gen_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct gen_state);
} gen_state SEC(".maps");

/* 1: keep this frame back (window full and the sink still making progress). */
static __always_inline int hold_back(struct flow_ctl *fc)
{
	__u64 now;

	if (!fc->window || (__s64)(fc->sent - fc->delivered) < (__s64)fc->window)
		return 0;
	now = bpf_ktime_get_ns();
	if (fc->delivered != fc->last_delivered) {
		fc->last_delivered = fc->delivered;
		fc->last_ns = now;
	} else if (now - fc->last_ns > FLOW_CTL_STALL_NS) {
		fc->sent = fc->delivered;       /* the window's frames were lost */
		fc->last_ns = now;
		fc->stalls++;
		return 0;
	}
	fc->held++;
	return 1;
}

/* One's-complement contribution of a big-endian value of `size` bytes at
 * packet offset `off` (a byte at an even offset is a word's high half). */
static __always_inline __u32 contrib(__u32 v, __u32 size, __u32 off)
{
	__u32 b0 = (v >> 24) & 0xff, b1 = (v >> 16) & 0xff, b2 = (v >> 8) & 0xff, b3 = v & 0xff;

	/* Bytes, most significant first: 4 -> b0..b3, 2 -> b2 b3, 1 -> b3. */
	if (size == 4)
		return (off & 1) ? (b0 + b2 + ((b1 + b3) << 8)) : (((b0 + b2) << 8) + b1 + b3);
	if (size == 2)
		return (off & 1) ? (b2 + (b3 << 8)) : ((b2 << 8) + b3);
	return (off & 1) ? b3 : b3 << 8;
}

static __always_inline __u32 fold(__u64 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u32)s;
}

static __always_inline __u64 var_value(const struct gen_var *v, __u64 k)
{
	__u64 n, r = v->range ? v->range : 1;

	if (v->op == GEN_OP_RANDOM)
		return v->min + (bpf_get_prandom_u32() % r);
	if (v->limit)
		k %= v->limit;
	n = (v->init + (k / (v->div ? v->div : 1)) * v->step) % r;
	if (v->op == GEN_OP_DEC)
		return v->min + (r - 1 - n);
	return v->min + n;
}

/* Patch the big-endian checksum at `off`: HC' = ~(~HC + ~m + m') with the
 * sums of old and new contributions given. */
static __always_inline void patch_csum(void *data, void *data_end, __u32 off, __u32 old_sum,
				       __u32 new_sum, int udp)
{
	__u8 *p = data + (off & (GEN_TEMPLATE_MAX - 1));
	__u32 hc, s;

	if ((void *)(p + 2) > data_end)
		return;
	hc = ((__u32)p[0] << 8) | p[1];
	if (udp && hc == 0)
		return;             /* UDP without checksum stays without */
	s = (~hc & 0xffff) + (0xffff - fold(old_sum)) + fold(new_sum);
	hc = ~fold(s) & 0xffff;
	if (udp && hc == 0)
		hc = 0xffff;
	p[0] = hc >> 8;
	p[1] = hc & 0xff;
}

SEC("xdp")
int gen_main(struct xdp_md *ctx)
{
	__u64 vals[GEN_MAX_VARS] = {};
	__u32 ip_old = 0, ip_new = 0, l4_old = 0, l4_new = 0;
	struct gen_config *c;
	struct gen_state *st;
	struct flow_ctl *fc;
	__u32 zero = 0, len;
	void *data, *data_end;
	__u64 k;
	int i;

	c = bpf_map_lookup_elem(&gen_config, &zero);
	st = bpf_map_lookup_elem(&gen_state, &zero);
	fc = bpf_map_lookup_elem(&flow_ctl, &zero);
	if (!c || !st || !fc)
		return XDP_ABORTED;
	if (hold_back(fc))
		return XDP_DROP;
	len = c->len;
	if (len < 1 || len > GEN_TEMPLATE_MAX)
		return XDP_ABORTED;
	if (bpf_xdp_store_bytes(ctx, 0, c->pkt, len))
		return XDP_ABORTED;
	/* One generator thread at a time: a plain increment is enough. */
	k = st->packets++;

	for (i = 0; i < GEN_MAX_VARS; i++) {
		if (i >= c->nvars)
			break;
		vals[i] = var_value(&c->vars[i], k);
	}

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	for (i = 0; i < GEN_MAX_WRITES; i++) {
		const struct gen_write *w = &c->writes[i];
		__u32 off = w->offset & (GEN_TEMPLATE_MAX - 1), size = w->size, v;
		__u8 *p = data + off;

		if (i >= c->nwrites)
			break;
		if ((void *)(p + 4) > data_end && size == 4)
			return XDP_ABORTED;
		if ((void *)(p + 2) > data_end && size == 2)
			return XDP_ABORTED;
		if ((void *)(p + 1) > data_end)
			return XDP_ABORTED;
		v = (__u32)vals[w->var & (GEN_MAX_VARS - 1)] + w->add;
		if (size == 4) {
			if ((void *)(p + 4) > data_end)
				return XDP_ABORTED;
			p[0] = v >> 24;
			p[1] = v >> 16;
			p[2] = v >> 8;
			p[3] = v;
		} else if (size == 2) {
			if ((void *)(p + 2) > data_end)
				return XDP_ABORTED;
			p[0] = v >> 8;
			p[1] = v;
		} else {
			p[0] = v;
		}
		if (w->fix_ip) {
			ip_old += contrib(w->tmpl_value, size, off);
			ip_new += contrib(v, size, off);
		}
		if (w->fix_l4) {
			l4_old += contrib(w->tmpl_value, size, off);
			l4_new += contrib(v, size, off);
		}
	}
	if (c->ip_csum_off)
		patch_csum(data, data_end, c->ip_csum_off, ip_old, ip_new, 0);
	if (c->l4_csum_off)
		patch_csum(data, data_end, c->l4_csum_off, l4_old, l4_new, c->l4_is_udp);
	fc->sent++;
	return XDP_TX;
}
