/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
 *
 * Byte order: the one's-complement sum is the same whichever way the 16-bit
 * words are read, as long as the checksum field and the data are read the
 * same way. We load everything as raw little-endian words from packet memory
 * and never byte-swap, so no htons() appears here.
 */
#ifndef XDPLB_CSUM_H
#define XDPLB_CSUM_H

#include <linux/types.h>

static __always_inline __u16 csum_fold32(__u32 sum)
{
	/* Two folds: after the first the value is at most 0x1fffe. */
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* The folded one's-complement sum of an IPv4 header without options (20
 * bytes). A valid header sums to 0xffff; a header built with check = 0
 * gets check = ~sum. Unrolled: no helper call for ten words. */
static __always_inline __u16 ipv4_header_sum(const void *ip)
{
	const __u16 *w = ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	return csum_fold32(sum);
}

/* Replace a 32-bit field (an IPv4 address) covered by *sum. */
static __always_inline void csum_replace4(__u16 *sum, __u32 from, __u32 to)
{
	__u32 s = (__u16)~*sum;
	__u32 nfrom = ~from;

	s += (nfrom & 0xffff) + (nfrom >> 16);
	s += (to & 0xffff) + (to >> 16);
	*sum = (__u16)~csum_fold32(s);
}

/* Replace a 16-bit field (a port) covered by *sum. */
static __always_inline void csum_replace2(__u16 *sum, __u16 from, __u16 to)
{
	__u32 s = (__u16)~*sum;

	s += (__u16)~from;
	s += to;
	*sum = (__u16)~csum_fold32(s);
}

#endif
