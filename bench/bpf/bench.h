/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Layouts shared by the benchmark's own XDP programs (generator, sink,
 * forwarder). Python reads them from BTF (bench/progs.py); nothing here is
 * repeated there.
 */
#ifndef XDPLB_BENCH_H
#define XDPLB_BENCH_H

#include <linux/types.h>

enum bench_limits {
	GEN_TEMPLATE_MAX = 256,     /* bytes of template packet */
	GEN_MAX_VARS = 8,           /* flow variables per stream */
	GEN_MAX_WRITES = 8,         /* writes of a variable into the packet */
	SINK_SAMPLES = 64,          /* packets the sink can keep for inspection */
	SINK_SAMPLE_BYTES = 128,
	SINK_MAX_BACKENDS = 262144, /* (address, port) -> service stamp */
	STAMP_MAGIC = 0x584c4231,   /* "XLB1": first payload word of bench packets */
	/* With no delivery for this long, the generator takes what is in
	 * flight for lost and sends again. */
	FLOW_CTL_STALL_NS = 10000000,
};

/* How a flow variable moves from one packet to the next (TRex STLVM ops). */
enum gen_op {
	GEN_OP_INC = 0,
	GEN_OP_DEC = 1,
	GEN_OP_RANDOM = 2,
};

/* Sink counters (per-CPU array index). */
enum sink_counter {
	SINK_GOOD = 0,              /* stamped, and at an address:port of its service */
	SINK_MISROUTED = 1,         /* stamped, but at another service's or no backend */
	SINK_UNSTAMPED = 2,         /* IPv4 TCP/UDP without the stamp */
	SINK_OTHER = 3,             /* anything else (ARP, ...): passed */
	SINK_COUNTERS = 4,
};

/* A flow variable: value(k) for packet number k. With `div` > 1 it only
 * steps once every `div` packets, which chains variables (TRex next_var and
 * tuple generators: the port steps when the address wraps). */
struct gen_var {
	__u64 min;
	__u64 range;                /* max - min + 1, >= 1 */
	__u64 init;                 /* start value - min */
	__u64 step;
	__u64 div;                  /* >= 1 */
	__u64 limit;                /* the sequence restarts every `limit` packets (0 = never) */
	__u32 op;                   /* enum gen_op */
	__u32 pad;
};

/* Write variable `var` (+ add) big-endian, `size` bytes at `offset`, and
 * update the IPv4 header and/or L4 checksum incrementally against the
 * template's own bytes there (`tmpl_value`). */
struct gen_write {
	__u16 offset;
	__u8 size;                  /* 1, 2 or 4 */
	__u8 var;
	__u32 add;
	__u32 tmpl_value;
	__u8 fix_ip;
	__u8 fix_l4;
	__u16 pad;
};

struct gen_config {
	__u32 len;                  /* template length == test-run data_size_in */
	__u32 nvars;
	__u32 nwrites;
	__u16 ip_csum_off;          /* 0 = no IPv4 header checksum to fix */
	__u16 l4_csum_off;          /* 0 = no L4 checksum to fix */
	__u32 l4_is_udp;            /* a computed 0 is sent as 0xffff */
	__u32 pad;
	__u8 pkt[GEN_TEMPLATE_MAX];
	struct gen_var vars[GEN_MAX_VARS];
	struct gen_write writes[GEN_MAX_WRITES];
};

struct gen_state {
	__u64 packets;              /* frames generated, ever (the flow counter) */
};

/* Closed-loop flow control between generator and sink (one map, shared by
 * both objects): the generator keeps at most `window` stamped frames in
 * flight (sent and not yet seen by the sink) and drops the rest of its
 * frames itself, so that a slow engine is offered what it can take instead
 * of a full ring that only costs CPU. window = 0: open loop. */
struct flow_ctl {
	__u64 sent;                 /* frames transmitted (offered) */
	__u64 delivered;            /* stamped frames the sink saw */
	__u64 held;                 /* frames the generator dropped itself */
	__u64 stalls;               /* windows given up for lost */
	__u64 last_delivered;
	__u64 last_ns;
	__u32 window;
	__u32 pad;
};

/* Where a backend lives: key of the sink's allowed set. */
struct sink_key {
	__u32 addr;                 /* network order */
	__u16 port;                 /* network order */
	__u8 proto;
	__u8 pad;
};

struct sink_value {
	__u32 stamp;                /* the service id the generator stamps */
	__u32 vip;                  /* network order; encapsulated delivery only: the inner
				     * destination must be the service's VIP (0 for NAT) */
};

/* How frames must arrive at the sink. A NAT engine rewrites the destination
 * to the backend's address and port; a DSR engine (Katran, xdplb ipip/gue)
 * leaves the client's packet untouched inside an outer header addressed to
 * the backend. Either way the key of sink_backends is (where the frame is
 * addressed: the outer destination when encapsulated, the service port then)
 * and a frame of the other kind is misrouted. */
enum sink_delivery {
	SINK_PLAIN = 0,
	SINK_ENCAP = 1,             /* IPv4 outer: IPIP, or GUE variant 1 to gue_port */
};

struct sink_config {
	__u32 check;                /* 0: count stamped packets as good unchecked */
	__u32 sample_max;           /* keep the first N stamped packets */
	__u32 watch_stamp;          /* record when this stamp first arrives */
	__u32 delivery;             /* enum sink_delivery */
	__u16 gue_port;             /* network order; 0: no GUE expected */
	__u16 pad;
};

struct sink_state {
	__u32 samples;              /* packets kept so far */
	__u32 pad;
	__u64 watch_first_ns;       /* bpf_ktime_get_ns() of watch_stamp's first good packet */
};

struct sink_sample {
	__u32 len;                  /* frame length */
	__u32 verdict;              /* enum sink_counter */
	__u8 data[SINK_SAMPLE_BYTES];
};

struct sink_stat {
	__u64 packets;
	__u64 bytes;
};

/* Bare forwarder: rewrite the MACs and redirect. */
struct fwd_config {
	__u32 ifindex;
	__u8 smac[6];
	__u8 dmac[6];
};

#endif
