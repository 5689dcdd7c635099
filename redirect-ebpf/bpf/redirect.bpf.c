// SPDX-License-Identifier: GPL-2.0
/* tc programs of the redirect family. For now: count packets on an endpoint's
 * host-side veth and pass them on; the eBPF datapath issue fills in identity
 * lookup, policy and sk_assign here. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "weir_redirect.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_COUNTER_MAX);
	__type(key, __u32);
	__type(value, struct weir_counter);
} weir_counters SEC(".maps");

SEC("classifier")
int weir_tc_count(struct __sk_buff *skb)
{
	__u32 key = WEIR_COUNTER_SEEN;
	struct weir_counter *c = bpf_map_lookup_elem(&weir_counters, &key);

	if (c) {
		c->packets += 1;
		c->bytes += skb->len;
	}
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
