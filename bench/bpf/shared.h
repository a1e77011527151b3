/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What the generator and the sink both define: the BTF anchor that makes
 * clang emit bench.h's enums for the harness, and the flow-control map the
 * harness gives both objects as one map (bench/progs.py reuses its fd).
 */
#ifndef XDPLB_BENCH_SHARED_H
#define XDPLB_BENCH_SHARED_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "bench.h"

/* Never read. */
const volatile struct {
	enum bench_limits limits;
	enum gen_op op;
	enum sink_counter counter;
	enum sink_delivery delivery;
} bench_anchor;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct flow_ctl);
} flow_ctl SEC(".maps");

#endif
