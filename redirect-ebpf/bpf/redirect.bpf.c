// SPDX-License-Identifier: GPL-2.0
/* weir's tc datapath, attached to the host side of each endpoint's veth.
 *
 * weir_from_endpoint (tc ingress: packets leaving the workload, entering the node)
 *   - connection tracking first: packets of known flows pass (or go to the proxy);
 *   - a new flow is decided by the source's egress policy and, when the destination
 *     is a local endpoint, the destination's ingress policy (deny wins);
 *   - flows with L7 rules are steered to the proxy's transparent socket with
 *     bpf_sk_assign: the packet's own established socket first, the listener only
 *     for new flows; every socket reference is released.
 * weir_to_endpoint (tc egress: packets about to enter the workload)
 *   - locally originated packets (the proxy's upstream connections, the host) are
 *     allowed and tracked so that the replies match;
 *   - packets forwarded from elsewhere that no from-endpoint hook has seen are
 *     decided by the destination's ingress policy.
 * Verdict events go to a ring buffer: one per new flow and one per drop.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "weir_redirect.h"

#define IDENTITY_HOST 1
#define IDENTITY_WORLD 2
#define DIR_INGRESS 0
#define DIR_EGRESS 1

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEIR_COUNTER_MAX);
	__type(key, __u32);
	__type(value, struct weir_counter);
} weir_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct weir_endpoint_key);
	__type(value, struct weir_endpoint_info);
} weir_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weir_ipcache_key);
	__type(value, struct weir_ipcache_value);
} weir_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1 << 20);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct weir_policy_key);
	__type(value, struct weir_policy_value);
} weir_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct weir_ct_key);
	__type(value, struct weir_ct_value);
} weir_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weir_config);
} weir_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} weir_events SEC(".maps");

/* Never used at run time: ring-buffer records have no type in BTF, and this
 * one-entry map gives struct weir_event one, so the Rust mirror can be checked. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weir_event);
} weir_event_layout SEC(".maps");

struct flow {
	struct weir_ct_key key; /* forward tuple */
	__u8 tcp_flags;         /* bit 0: SYN, bit 1: ACK */
};

static __always_inline void count(__u32 idx, struct __sk_buff *skb)
{
	struct weir_counter *c = bpf_map_lookup_elem(&weir_counters, &idx);

	if (c) {
		c->packets += 1;
		c->bytes += skb->len;
	}
}

/* ICMP echo as a flow: the identifier is the request's source "port" and the
 * reply's destination "port" (the other one 0), so a reply is the reverse of its
 * request in conntrack and a request's policy lookup is for port 0. */
/* The start of an ICMP or ICMPv6 echo message (their uapi headers pull in libc). */
struct echo_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129

static __always_inline int parse_echo(struct flow *f, void *l4, void *data_end, __u8 request,
				      __u8 reply)
{
	struct echo_hdr *icmp = l4;

	if ((void *)(icmp + 1) > data_end)
		return -1;
	if (icmp->type == request) {
		f->key.sport = icmp->id;
		f->key.dport = 0;
		return 1;
	}
	if (icmp->type == reply) {
		f->key.sport = 0;
		f->key.dport = icmp->id;
		return 1;
	}
	/* Errors (carrying a tracked flow's headers), neighbour discovery and the
	 * like: not policy's business. */
	return 0;
}

/* Returns 1 for a TCP/UDP packet whose ports could be read, or an ICMP echo; 0 for
 * what policy does not cover (not IP, other ICMP/ICMPv6, non-first fragments, which
 * cannot be reassembled without their policy-checked first fragment); -1 for any
 * other IP packet (other protocols, IPv6 extension headers, truncated headers),
 * addresses filled in. */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	void *l4;

	if ((void *)(eth + 1) > data_end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return 0;
		f->key.family = 4;
		f->key.protocol = ip->protocol;
		f->key.saddr[0] = ip->saddr;
		f->key.daddr[0] = ip->daddr;
		if (ip->ihl < 5)
			return -1;
		/* Non-first fragments carry no ports. */
		if (ip->frag_off & bpf_htons(0x1fff))
			return 0;
		l4 = (void *)ip + ip->ihl * 4;
		if (ip->protocol == IPPROTO_ICMP)
			return parse_echo(f, l4, data_end, ICMP_ECHO, ICMP_ECHOREPLY);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return 0;
		f->key.family = 6;
		f->key.protocol = ip6->nexthdr;
		__builtin_memcpy(f->key.saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->key.daddr, &ip6->daddr, 16);
		l4 = (void *)(ip6 + 1);
		if (ip6->nexthdr == IPPROTO_ICMPV6)
			return parse_echo(f, l4, data_end, ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY);
	} else {
		return 0;
	}
	if (f->key.protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;

		if ((void *)(tcp + 1) > data_end)
			return -1;
		f->key.sport = tcp->source;
		f->key.dport = tcp->dest;
		f->tcp_flags = (tcp->syn ? 1 : 0) | (tcp->ack ? 2 : 0);
		return 1;
	}
	if (f->key.protocol == IPPROTO_UDP) {
		struct udphdr *udp = l4;

		if ((void *)(udp + 1) > data_end)
			return -1;
		f->key.sport = udp->source;
		f->key.dport = udp->dest;
		return 1;
	}
	return -1;
}

static __always_inline struct weir_endpoint_info *endpoint(__u32 *addr, __u8 family)
{
	struct weir_endpoint_key k = {};

	k.family = family;
	__builtin_memcpy(k.ip, addr, 16);
	return bpf_map_lookup_elem(&weir_endpoints, &k);
}

static __always_inline __u32 identity_of(struct weir_endpoint_info *ep, __u32 *addr, __u8 family)
{
	struct weir_ipcache_key k = {};
	struct weir_ipcache_value *v;

	if (ep)
		return ep->identity;
	k.family = family;
	k.prefixlen = 32 + (family == 4 ? 32 : 128);
	__builtin_memcpy(k.ip, addr, 16);
	v = bpf_map_lookup_elem(&weir_ipcache, &k);
	return v ? v->identity : IDENTITY_WORLD;
}

static __always_inline __u32 policy(__u32 endpoint_id, __u8 dir, __u8 proto, __u32 remote,
				    __u16 dport, __u32 *rule_id)
{
	struct weir_policy_key k = {};
	struct weir_policy_value *v;

	k.prefixlen = 96 + 16;
	k.endpoint_id = bpf_htonl(endpoint_id);
	k.direction = dir;
	k.protocol = proto;
	k.identity = bpf_htonl(remote);
	k.dport = dport;
	v = bpf_map_lookup_elem(&weir_policy, &k);
	if (!v) {
		k.identity = 0;
		v = bpf_map_lookup_elem(&weir_policy, &k);
	}
	if (!v)
		return WEIR_DROP;
	*rule_id = v->rule_id;
	return v->verdict;
}

static __always_inline void event(struct flow *f, __u8 kind, __u8 reason, __u32 src_id,
				  __u32 dst_id, __u32 rule_id, __u32 ifindex)
{
	struct weir_event *e = bpf_ringbuf_reserve(&weir_events, sizeof(*e), 0);

	if (!e)
		return;
	e->timestamp_ns = bpf_ktime_get_ns();
	__builtin_memcpy(e->saddr, f->key.saddr, 16);
	__builtin_memcpy(e->daddr, f->key.daddr, 16);
	e->sport = f->key.sport;
	e->dport = f->key.dport;
	e->protocol = f->key.protocol;
	e->family = f->key.family;
	e->kind = kind;
	e->reason = reason;
	e->src_identity = src_id;
	e->dst_identity = dst_id;
	e->rule_id = rule_id;
	e->ifindex = ifindex;
	/* Wake the reader only once a batch has piled up: it also drains on a short
	 * timer, and one wake-up per new flow costs the node more than the flow. */
	bpf_ringbuf_submit(e, bpf_ringbuf_query(&weir_events, BPF_RB_AVAIL_DATA) >=
				      WEIR_EVENTS_WAKEUP_BYTES ?
				      BPF_RB_FORCE_WAKEUP :
				      BPF_RB_NO_WAKEUP);
}

/* An IP packet policy cannot decide: dropped when either end enforces policy. */
static __always_inline int unsupported(struct __sk_buff *skb, struct flow *f, int check_egress)
{
	struct weir_endpoint_info *src = endpoint(f->key.saddr, f->key.family);
	struct weir_endpoint_info *dst = endpoint(f->key.daddr, f->key.family);

	if ((check_egress && src && (src->flags & WEIR_EP_EGRESS_ENFORCED)) ||
	    (dst && (dst->flags & WEIR_EP_INGRESS_ENFORCED))) {
		count(WEIR_COUNTER_DROPPED, skb);
		event(f, WEIR_EVENT_DROPPED, WEIR_REASON_UNSUPPORTED_PROTOCOL,
		      identity_of(src, f->key.saddr, f->key.family),
		      identity_of(dst, f->key.daddr, f->key.family), WEIR_NO_RULE, skb->ifindex);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

static __always_inline void reverse(struct weir_ct_key *fwd, struct weir_ct_key *rev)
{
	__builtin_memcpy(rev->saddr, fwd->daddr, 16);
	__builtin_memcpy(rev->daddr, fwd->saddr, 16);
	rev->sport = fwd->dport;
	rev->dport = fwd->sport;
	rev->protocol = fwd->protocol;
	rev->family = fwd->family;
	rev->pad = 0;
}

/* The flow as a socket tuple for the kernel's socket lookups; returns its length. */
static __always_inline __u32 sock_tuple(struct flow *f, struct bpf_sock_tuple *t)
{
	if (f->key.family == 4) {
		t->ipv4.saddr = f->key.saddr[0];
		t->ipv4.daddr = f->key.daddr[0];
		t->ipv4.sport = f->key.sport;
		t->ipv4.dport = f->key.dport;
		return sizeof(t->ipv4);
	}
	__builtin_memcpy(t->ipv6.saddr, f->key.saddr, 16);
	__builtin_memcpy(t->ipv6.daddr, f->key.daddr, 16);
	t->ipv6.sport = f->key.sport;
	t->ipv6.dport = f->key.dport;
	return sizeof(t->ipv6);
}

/* Points a tuple's destination port at the proxy's listener. */
static __always_inline void to_proxy_port(struct flow *f, struct bpf_sock_tuple *t,
					  struct weir_config *cfg)
{
	if (f->key.family == 4)
		t->ipv4.dport = bpf_htons(cfg->proxy_port);
	else
		t->ipv6.dport = bpf_htons(cfg->proxy_port);
}

/* Hands the packet to `sk` (releasing it) and marks it for local delivery; 0 on
 * success. */
static __always_inline int assign(struct __sk_buff *skb, struct bpf_sock *sk,
				  struct weir_config *cfg)
{
	long err = bpf_sk_assign(skb, sk, 0);

	bpf_sk_release(sk);
	if (err)
		return -1;
	skb->mark = cfg->mark;
	return 0;
}

/* Steers the packet to the proxy's socket; 0 on success. */
static __always_inline int to_proxy(struct __sk_buff *skb, struct flow *f, struct weir_config *cfg)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk = 0;
	__u32 len;

	len = sock_tuple(f, &t);
	if (f->key.protocol == IPPROTO_TCP) {
		/* The packet's own connection, if the proxy already accepted it. */
		sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
		if (sk && sk->state == BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
			sk = 0;
		}
		if (!sk) {
			to_proxy_port(f, &t, cfg);
			sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
			if (sk && sk->state != BPF_TCP_LISTEN) {
				bpf_sk_release(sk);
				return -1;
			}
		}
	} else {
		/* The proxy's session for this flow (connected to the client); an
		 * unconnected socket on the destination port is someone else's. */
		sk = bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
		if (sk && sk->dst_port == 0) {
			bpf_sk_release(sk);
			sk = 0;
		}
		if (!sk) {
			to_proxy_port(f, &t, cfg);
			sk = bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
		}
	}
	if (!sk)
		return -1;
	return assign(skb, sk, cfg);
}

/* Delivers a server's reply to the proxy's transparent upstream socket (its local
 * address is the client's); 0 on success. */
static __always_inline int to_upstream_socket(struct __sk_buff *skb, struct flow *f,
					      struct weir_config *cfg)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 len;

	len = sock_tuple(f, &t);
	if (f->key.protocol == IPPROTO_UDP) {
		/* The proxy's UDP session socket: bound to the client's address and
		 * port, connected to this server. */
		sk = bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return -1;
	} else {
		sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return -1;
		if (sk->state == BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
			return -1;
		}
	}
	return assign(skb, sk, cfg);
}

static __always_inline int redirect_or_drop(struct __sk_buff *skb, struct flow *f,
					    struct weir_config *cfg, __u32 src_id, __u32 dst_id)
{
	if (to_proxy(skb, f, cfg) == 0) {
		count(WEIR_COUNTER_REDIRECTED, skb);
		return TC_ACT_OK;
	}
	count(WEIR_COUNTER_DROPPED, skb);
	event(f, WEIR_EVENT_DROPPED, WEIR_REASON_NO_PROXY, src_id, dst_id, WEIR_NO_RULE, skb->ifindex);
	return TC_ACT_SHOT;
}

SEC("classifier")
int weir_from_endpoint(struct __sk_buff *skb)
{
	__u32 zero = 0, rule_id = WEIR_NO_RULE, verdict = WEIR_ALLOW, v, src_id, dst_id;
	struct weir_endpoint_info *src_ep, *dst_ep;
	struct weir_ct_value *ct, entry = {};
	struct weir_config *cfg;
	struct weir_ct_key rev = {};
	struct flow f = {};
	__u8 reason = WEIR_REASON_NONE;
	int parsed;

	count(WEIR_COUNTER_SEEN, skb);
	cfg = bpf_map_lookup_elem(&weir_config, &zero);
	if (!cfg)
		return TC_ACT_OK;
	parsed = parse(skb, &f);
	if (parsed == 0)
		return TC_ACT_OK;
	if (parsed < 0)
		return unsupported(skb, &f, 1);

	ct = bpf_map_lookup_elem(&weir_ct, &f.key);
	if (ct && ct->policy_generation == cfg->policy_generation) {
		ct->last_seen_ns = bpf_ktime_get_ns();
		if (ct->verdict == WEIR_REDIRECT)
			return redirect_or_drop(skb, &f, cfg, ct->src_identity, ct->dst_identity);
		count(WEIR_COUNTER_ALLOWED, skb);
		return TC_ACT_OK;
	}
	reverse(&f.key, &rev);
	ct = bpf_map_lookup_elem(&weir_ct, &rev);
	if (ct) {
		/* A reply: the flow was decided when it started. */
		ct->last_seen_ns = bpf_ktime_get_ns();
		if (ct->verdict == WEIR_PROXY_LEG) {
			if (to_upstream_socket(skb, &f, cfg) == 0) {
				count(WEIR_COUNTER_REDIRECTED, skb);
				return TC_ACT_OK;
			}
			count(WEIR_COUNTER_DROPPED, skb);
			return TC_ACT_SHOT;
		}
		count(WEIR_COUNTER_ALLOWED, skb);
		return TC_ACT_OK;
	}

	src_ep = endpoint(f.key.saddr, f.key.family);
	dst_ep = endpoint(f.key.daddr, f.key.family);
	src_id = identity_of(src_ep, f.key.saddr, f.key.family);
	dst_id = identity_of(dst_ep, f.key.daddr, f.key.family);
	if (src_ep && (src_ep->flags & WEIR_EP_EGRESS_ENFORCED)) {
		v = policy(src_ep->endpoint_id, DIR_EGRESS, f.key.protocol, dst_id, f.key.dport,
			   &rule_id);
		if (v == WEIR_DROP)
			reason = WEIR_REASON_POLICY_EGRESS;
		else if (v == WEIR_REDIRECT)
			verdict = WEIR_REDIRECT;
	}
	if (reason == WEIR_REASON_NONE && dst_ep && (dst_ep->flags & WEIR_EP_INGRESS_ENFORCED)) {
		v = policy(dst_ep->endpoint_id, DIR_INGRESS, f.key.protocol, src_id, f.key.dport,
			   &rule_id);
		if (v == WEIR_DROP)
			reason = WEIR_REASON_POLICY_INGRESS;
		else if (v == WEIR_REDIRECT)
			verdict = WEIR_REDIRECT;
	}
	if (reason != WEIR_REASON_NONE) {
		count(WEIR_COUNTER_DROPPED, skb);
		event(&f, WEIR_EVENT_DROPPED, reason, src_id, dst_id, rule_id, skb->ifindex);
		return TC_ACT_SHOT;
	}
	entry.verdict = verdict;
	entry.src_identity = src_id;
	entry.dst_identity = dst_id;
	entry.policy_generation = cfg->policy_generation;
	entry.last_seen_ns = bpf_ktime_get_ns();
	bpf_map_update_elem(&weir_ct, &f.key, &entry, BPF_ANY);
	event(&f, verdict == WEIR_REDIRECT ? WEIR_EVENT_REDIRECTED : WEIR_EVENT_ALLOWED,
	      WEIR_REASON_NONE, src_id, dst_id, rule_id, skb->ifindex);
	if (verdict == WEIR_REDIRECT)
		return redirect_or_drop(skb, &f, cfg, src_id, dst_id);
	count(WEIR_COUNTER_ALLOWED, skb);
	return TC_ACT_OK;
}

SEC("classifier")
int weir_to_endpoint(struct __sk_buff *skb)
{
	__u32 zero = 0, rule_id = WEIR_NO_RULE, src_id, dst_id;
	struct weir_endpoint_info *dst_ep;
	struct weir_ct_value *ct, entry = {};
	struct weir_config *cfg;
	struct weir_ct_key rev = {};
	struct flow f = {};

	int parsed;

	cfg = bpf_map_lookup_elem(&weir_config, &zero);
	if (!cfg)
		return TC_ACT_OK;
	parsed = parse(skb, &f);
	if (parsed == 0)
		return TC_ACT_OK;
	if (parsed < 0) {
		/* Forwarded from outside the node's endpoints (those were checked on
		 * their own veth); the node's own packets are not policed here. */
		if (skb->ingress_ifindex == 0 || endpoint(f.key.saddr, f.key.family))
			return TC_ACT_OK;
		return unsupported(skb, &f, 0);
	}
	ct = bpf_map_lookup_elem(&weir_ct, &f.key);
	if (ct)
		return TC_ACT_OK;
	reverse(&f.key, &rev);
	if (bpf_map_lookup_elem(&weir_ct, &rev))
		return TC_ACT_OK;
	dst_ep = endpoint(f.key.daddr, f.key.family);
	dst_id = identity_of(dst_ep, f.key.daddr, f.key.family);
	if (cfg->upstream_mark && skb->mark == cfg->upstream_mark) {
		/* The proxy's upstream leg, from the client's own address: the proxy
		 * already decided it; remember it so the replies come back to the proxy. */
		entry.verdict = WEIR_PROXY_LEG;
		entry.src_identity = identity_of(endpoint(f.key.saddr, f.key.family), f.key.saddr,
						 f.key.family);
		entry.dst_identity = dst_id;
		entry.policy_generation = cfg->policy_generation;
		entry.last_seen_ns = bpf_ktime_get_ns();
		bpf_map_update_elem(&weir_ct, &f.key, &entry, BPF_ANY);
		return TC_ACT_OK;
	}
	if (skb->ingress_ifindex == 0) {
		/* Originated on the node: the proxy's upstream leg (already decided by the
		 * proxy) or the host itself. Track it so the replies pass. */
		src_id = IDENTITY_HOST;
	} else {
		if (endpoint(f.key.saddr, f.key.family))
			return TC_ACT_OK; /* decided by the source's from-endpoint hook */
		src_id = identity_of(0, f.key.saddr, f.key.family);
		if (dst_ep && (dst_ep->flags & WEIR_EP_INGRESS_ENFORCED) &&
		    policy(dst_ep->endpoint_id, DIR_INGRESS, f.key.protocol, src_id, f.key.dport,
			   &rule_id) == WEIR_DROP) {
			count(WEIR_COUNTER_DROPPED, skb);
			event(&f, WEIR_EVENT_DROPPED, WEIR_REASON_POLICY_INGRESS, src_id, dst_id,
			      rule_id, skb->ifindex);
			return TC_ACT_SHOT;
		}
	}
	entry.verdict = WEIR_ALLOW;
	entry.src_identity = src_id;
	entry.dst_identity = dst_id;
	entry.policy_generation = cfg->policy_generation;
	entry.last_seen_ns = bpf_ktime_get_ns();
	bpf_map_update_elem(&weir_ct, &f.key, &entry, BPF_ANY);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
