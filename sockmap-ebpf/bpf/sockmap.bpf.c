// SPDX-License-Identifier: GPL-2.0
/* sock_ops + sk_msg programs that will short-cut same-node TCP legs through a
 * sockhash. For now sock_ops records established sockets and sk_msg passes every
 * message; the accelerated-path issue adds the redirect. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "weir_sockmap.h"

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct weir_sock_key);
	__type(value, __u32);
} weir_socks SEC(".maps");

static __always_inline void sock_key(struct bpf_sock_ops *ops, struct weir_sock_key *k)
{
	k->family = ops->family;
	k->local_port = ops->local_port;
	k->remote_port = ops->remote_port;
	if (ops->family == 2 /* AF_INET */) {
		k->local_ip[0] = ops->local_ip4;
		k->remote_ip[0] = ops->remote_ip4;
	} else {
		k->local_ip[0] = ops->local_ip6[0];
		k->local_ip[1] = ops->local_ip6[1];
		k->local_ip[2] = ops->local_ip6[2];
		k->local_ip[3] = ops->local_ip6[3];
		k->remote_ip[0] = ops->remote_ip6[0];
		k->remote_ip[1] = ops->remote_ip6[1];
		k->remote_ip[2] = ops->remote_ip6[2];
		k->remote_ip[3] = ops->remote_ip6[3];
	}
}

SEC("sockops")
int weir_sockops(struct bpf_sock_ops *ops)
{
	struct weir_sock_key key = {};

	switch (ops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		sock_key(ops, &key);
		bpf_sock_hash_update(ops, &weir_socks, &key, BPF_NOEXIST);
		break;
	}
	return 1;
}

SEC("sk_msg")
int weir_sk_msg(struct sk_msg_md *msg)
{
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
