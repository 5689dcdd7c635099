// SPDX-License-Identifier: GPL-2.0
/* weir's tc datapath. Four programs, one decision procedure:
 *
 * weir_from_endpoint (tc ingress of an endpoint's host-side veth: packets leaving
 *   the workload). The source must be that endpoint (else SPOOFED_SOURCE); a new
 *   flow is decided by its egress policy and, for a local destination, the
 *   destination's ingress policy (deny wins). L7 flows go to the proxy's socket
 *   with bpf_sk_assign.
 * weir_from_netdev (tc ingress of every other interface of the node: the world,
 *   CIDR peers, other nodes). Packets to local endpoints are decided by the
 *   destination's ingress policy with the peer's CIDR/world identity (never an
 *   endpoint's: a packet from outside that claims an endpoint's address is
 *   dropped), and L7 flows are handed to the proxy right here. Servers' replies
 *   to the proxy's upstream connections are handed to those sockets.
 * weir_to_endpoint (tc egress of an endpoint's veth: packets about to enter the
 *   workload). Tracks the proxy's upstream leg (by its mark) so replies come back
 *   to the proxy, decides the node's own traffic as the `host` identity, and
 *   decides (fail closed) what no ingress hook saw.
 * weir_to_netdev (tc egress of the other interfaces): tracks the proxy's
 *   upstream leg to servers that are not local endpoints.
 *
 * weir_sk_lookup (the node namespace's socket lookup): a listener lookup for a
 *   flow that goes to the proxy finds the proxy's listener. The kernel asks when
 *   a new SYN meets the TIME_WAIT socket of an earlier connection on the same
 *   tuple (the proxy closed first): without an answer that SYN is lost. And
 *   for a UDP datagram that arrived in fragments: reassembly drops the first
 *   fragment's socket assignment, and a flow's first datagram has no session
 *   socket yet that the ports would find.
 *
 * Conntrack entries carry the policy generation they were decided under and are
 * decided again when it changes, on every path (new packets, replies, the proxy
 * leg). They end with their connections (RST, FIN both ways) or after an idle
 * lifetime. Packets that are not weir's business return TC_ACT_UNSPEC (TCX
 * "next"), so other programs on the interface still see them.
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
#define NOT_OURS TC_ACT_UNSPEC /* TCX_NEXT */
#define NSEC 1000000000ull

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
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);   /* ifindex */
	__type(value, __u32); /* WEIR_DEVICE_* */
} weir_devices SEC(".maps");

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
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct weir_frag_key);
	__type(value, struct weir_frag_value);
} weir_frags SEC(".maps");

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

/* The proxy's listeners for weir_sk_lookup: TCP (index 0 IPv4, 1 IPv6) and UDP
 * (2 IPv4, 3 IPv6). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32); /* a socket fd, on update */
} weir_listeners SEC(".maps");

/* Never used at run time: ring-buffer records have no type in BTF, and this
 * one-entry map gives struct weir_event one, so the Rust mirror can be checked;
 * likewise for the shared enums. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weir_event);
} weir_event_layout SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct weir_enums);
} weir_enum_layout SEC(".maps");

/* What parse() found. */
enum parsed {
	PARSED_NOT_IP = 0,     /* not IP, or ICMP that is the network's own (ND, MLD) */
	PARSED_FLOW = 1,       /* TCP/UDP with ports, or ICMP as a flow (echo id) */
	PARSED_UNSUPPORTED = 2, /* IP policy cannot see: other protocols, ext headers */
	PARSED_FRAGMENT = 3,   /* a non-first fragment: addresses, protocol, frag_id */
	PARSED_ICMP_ERROR = 4, /* key = the flow the error is about, as it was sent */
};

struct flow {
	struct weir_ct_key key; /* forward tuple (leg 0) */
	__u32 src[4];           /* the packet's own addresses (an ICMP error's key is the quoted flow) */
	__u32 dst[4];
	__u32 frag_id;
	__u8 tcp_flags;  /* TCP_F_* */
	__u8 first_frag; /* a first fragment: its allowed datagram's rest may follow */
	__u8 icmp_outer_dst_ok; /* ICMP error: the inner source is the outer destination */
};

#define TCP_F_SYN 1
#define TCP_F_ACK 2
#define TCP_F_FIN 4
#define TCP_F_RST 8

struct decision {
	__u32 verdict;
	__u32 rule_id;
	__u32 src_id;
	__u32 dst_id;
	__u8 reason;
};

static __always_inline void count(__u32 idx, struct __sk_buff *skb)
{
	struct weir_counter *c = bpf_map_lookup_elem(&weir_counters, &idx);

	if (c) {
		c->packets += 1;
		c->bytes += skb->len;
	}
}

/* The start of an ICMP or ICMPv6 message (their uapi headers pull in libc). */
struct icmp_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_SOURCE_QUENCH 4
#define ICMP_REDIRECT 5
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3
#define ICMPV6_PARAMPROB 4
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define ICMPV6_MLD_QUERY 130
#define ICMPV6_MLD_DONE 132
#define ICMPV6_ND_FIRST 133 /* router solicitation .. redirect (137) */
#define ICMPV6_ND_LAST 137
#define ICMPV6_MLD2_REPORT 143
#define IPV6_FRAGMENT_HDR 44

struct ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset << 3 | M */
	__be32 id;
};

/* Reads the ports (or echo identifier) of the L4 header at `l4` into the key. */
static __always_inline int l4_ports(struct flow *f, void *l4, void *data_end, __u8 proto, int inner)
{
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		/* Both start with source and destination port; an ICMP error quotes
		 * only 8 bytes, so the inner header is read no further. */
		__be16 *ports = l4;

		if ((void *)(ports + 2) > data_end)
			return -1;
		f->key.sport = ports[0];
		f->key.dport = ports[1];
		if (proto == IPPROTO_TCP && !inner) {
			struct tcphdr *tcp = l4;

			if ((void *)(tcp + 1) > data_end)
				return -1;
			f->tcp_flags = (tcp->syn ? TCP_F_SYN : 0) | (tcp->ack ? TCP_F_ACK : 0) |
				       (tcp->fin ? TCP_F_FIN : 0) | (tcp->rst ? TCP_F_RST : 0);
		}
		return 0;
	}
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		struct icmp_hdr *icmp = l4;
		__u8 request = proto == IPPROTO_ICMP ? ICMP_ECHO : ICMPV6_ECHO_REQUEST;
		__u8 reply = proto == IPPROTO_ICMP ? ICMP_ECHOREPLY : ICMPV6_ECHO_REPLY;

		if ((void *)(icmp + 1) > data_end)
			return -1;
		/* ICMP as a flow whose destination "port" is its type, so `icmps`
		 * rules (type per family) are policy entries like ports. An echo
		 * request also carries its identifier as the source "port", and an
		 * echo reply is the reverse: (request type, identifier). */
		f->key.sport = 0;
		f->key.dport = bpf_htons(icmp->type);
		if (icmp->type == request) {
			f->key.sport = icmp->id;
		} else if (icmp->type == reply) {
			f->key.sport = bpf_htons(request);
			f->key.dport = icmp->id;
		}
		return 0;
	}
	return -1;
}

static __always_inline int icmp_is_error(__u8 proto, __u8 type)
{
	if (proto == IPPROTO_ICMP)
		return type == ICMP_DEST_UNREACH || type == ICMP_SOURCE_QUENCH ||
		       type == ICMP_REDIRECT || type == ICMP_TIME_EXCEEDED ||
		       type == ICMP_PARAMETERPROB;
	return type >= ICMPV6_DEST_UNREACH && type <= ICMPV6_PARAMPROB;
}

/* ICMPv6 that the network itself needs (neighbour discovery, MLD). */
static __always_inline int icmp6_is_link(__u8 type)
{
	return (type >= ICMPV6_MLD_QUERY && type <= ICMPV6_MLD_DONE) ||
	       (type >= ICMPV6_ND_FIRST && type <= ICMPV6_ND_LAST) || type == ICMPV6_MLD2_REPORT;
}

/* An ICMP error: the key becomes the quoted packet's flow (as its sender sent it). */
static __always_inline int parse_icmp_error(struct flow *f, void *inner, void *data_end)
{
	__u32 outer_dst[4];
	__u8 proto;

	__builtin_memcpy(outer_dst, f->key.daddr, 16);
	if (f->key.family == 4) {
		struct iphdr *ip = inner;

		if ((void *)(ip + 1) > data_end || ip->ihl < 5)
			return PARSED_UNSUPPORTED;
		proto = ip->protocol;
		f->key.saddr[0] = ip->saddr;
		f->key.daddr[0] = ip->daddr;
		inner = (void *)ip + ip->ihl * 4;
	} else {
		struct ipv6hdr *ip6 = inner;

		if ((void *)(ip6 + 1) > data_end)
			return PARSED_UNSUPPORTED;
		proto = ip6->nexthdr;
		__builtin_memcpy(f->key.saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->key.daddr, &ip6->daddr, 16);
		inner = ip6 + 1;
	}
	f->key.protocol = proto;
	if (l4_ports(f, inner, data_end, proto, 1) < 0)
		return PARSED_UNSUPPORTED;
	f->icmp_outer_dst_ok = outer_dst[0] == f->key.saddr[0] && outer_dst[1] == f->key.saddr[1] &&
			       outer_dst[2] == f->key.saddr[2] && outer_dst[3] == f->key.saddr[3];
	return PARSED_ICMP_ERROR;
}

/* Makes sure the headers policy reads are in the linear part of the packet
 * (pulled only when they are not: pulling can copy a cloned packet). */
static __always_inline void pull_headers(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	/* The most parse() reads: eth, IPv6, fragment or ICMP header, a quoted
	 * IPv6 header, its ports. */
	__u32 want = 14 + 40 + 8 + 40 + 8;

	/* A plain TCP or UDP packet needs only its own headers. Its payload is
	 * usually not linear (a socket's data sits in page fragments), and pulling
	 * payload bytes into the head on every packet costs more than the rest of
	 * the program. */
	if ((void *)(eth + 1) <= data_end) {
		if (eth->h_proto == bpf_htons(ETH_P_IP)) {
			struct iphdr *ip = (void *)(eth + 1);

			if ((void *)(ip + 1) <= data_end && ip->ihl >= 5 &&
			    (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP))
				want = 14 + ip->ihl * 4 +
				       (ip->protocol == IPPROTO_TCP ? sizeof(struct tcphdr) : 8);
		} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
			struct ipv6hdr *ip6 = (void *)(eth + 1);

			if ((void *)(ip6 + 1) <= data_end &&
			    (ip6->nexthdr == IPPROTO_TCP || ip6->nexthdr == IPPROTO_UDP))
				want = 14 + 40 +
				       (ip6->nexthdr == IPPROTO_TCP ? sizeof(struct tcphdr) : 8);
		}
	}
	if (want > skb->len)
		want = skb->len;
	if (data + want <= data_end)
		return;
	bpf_skb_pull_data(skb, want);
}

/* Fills `f` from the packet; see enum parsed. Addresses are filled whenever the
 * packet is IP. */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
	void *data, *data_end, *l4;
	struct ethhdr *eth;
	__u8 proto;

	pull_headers(skb);
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return PARSED_NOT_IP;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u16 frag;

		if ((void *)(ip + 1) > data_end)
			return PARSED_NOT_IP;
		f->key.family = 4;
		proto = ip->protocol;
		f->key.protocol = proto;
		f->key.saddr[0] = ip->saddr;
		f->key.daddr[0] = ip->daddr;
		f->src[0] = ip->saddr;
		f->dst[0] = ip->daddr;
		if (ip->ihl < 5)
			return PARSED_UNSUPPORTED;
		/* Multicast and limited broadcast never leave the link. */
		if ((bpf_ntohl(ip->daddr) & 0xf0000000) == 0xe0000000 || ip->daddr == 0xffffffff)
			return PARSED_NOT_IP;
		frag = bpf_ntohs(ip->frag_off);
		f->frag_id = ip->id;
		if (frag & 0x1fff)
			return PARSED_FRAGMENT;
		f->first_frag = (frag & 0x2000) != 0;
		l4 = (void *)ip + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return PARSED_NOT_IP;
		f->key.family = 6;
		proto = ip6->nexthdr;
		__builtin_memcpy(f->key.saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->key.daddr, &ip6->daddr, 16);
		__builtin_memcpy(f->src, &ip6->saddr, 16);
		__builtin_memcpy(f->dst, &ip6->daddr, 16);
		l4 = ip6 + 1;
		/* Multicast and link-local destinations never leave the link (MLD
		 * reports, ND): the network's own, not a flow between peers. */
		if (ip6->daddr.in6_u.u6_addr8[0] == 0xff ||
		    (ip6->daddr.in6_u.u6_addr8[0] == 0xfe &&
		     (ip6->daddr.in6_u.u6_addr8[1] & 0xc0) == 0x80))
			return PARSED_NOT_IP;
		if (proto == IPV6_FRAGMENT_HDR) {
			struct ipv6_frag_hdr *fh = l4;
			__u16 off;

			if ((void *)(fh + 1) > data_end)
				return PARSED_UNSUPPORTED;
			proto = fh->nexthdr;
			off = bpf_ntohs(fh->frag_off);
			f->frag_id = fh->id;
			if (off & 0xfff8) {
				f->key.protocol = proto;
				return PARSED_FRAGMENT;
			}
			f->first_frag = (off & 1) != 0;
			l4 = fh + 1;
		}
		f->key.protocol = proto;
	} else {
		return PARSED_NOT_IP;
	}
	if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		struct icmp_hdr *icmp = l4;

		if ((void *)(icmp + 1) > data_end)
			return PARSED_UNSUPPORTED;
		if ((proto == IPPROTO_ICMP) != (f->key.family == 4))
			return PARSED_UNSUPPORTED;
		if (proto == IPPROTO_ICMPV6 && icmp6_is_link(icmp->type))
			return PARSED_NOT_IP;
		if (icmp_is_error(proto, icmp->type))
			return parse_icmp_error(f, icmp + 1, data_end);
	}
	if (l4_ports(f, l4, data_end, proto, 0) < 0)
		return PARSED_UNSUPPORTED;
	return PARSED_FLOW;
}

static __always_inline struct weir_endpoint_info *endpoint(__u32 *addr, __u8 family)
{
	struct weir_endpoint_key k = {};

	k.family = family;
	__builtin_memcpy(k.ip, addr, 16);
	return bpf_map_lookup_elem(&weir_endpoints, &k);
}

/* The identity of a peer that is not a local endpoint: its longest ipcache
 * prefix (CIDRs, the node's own addresses), else world. */
static __always_inline __u32 outside_identity(__u32 *addr, __u8 family)
{
	struct weir_ipcache_key k = {};
	struct weir_ipcache_value *v;

	k.family = family;
	k.prefixlen = 32 + (family == 4 ? 32 : 128);
	__builtin_memcpy(k.ip, addr, 16);
	v = bpf_map_lookup_elem(&weir_ipcache, &k);
	return v ? v->identity : IDENTITY_WORLD;
}

static __always_inline __u32 identity_of(struct weir_endpoint_info *ep, __u32 *addr, __u8 family)
{
	return ep ? ep->identity : outside_identity(addr, family);
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

/* Decides a new flow (or an old one again): the source endpoint's egress policy
 * (when the flow comes from one), then the destination endpoint's ingress policy.
 * `src_ep` is the sending endpoint, already checked against its interface. */
static __always_inline void decide(struct flow *f, struct weir_endpoint_info *src_ep, __u8 origin,
				   struct weir_config *cfg, struct decision *d)
{
	struct weir_endpoint_info *dst_ep = endpoint(f->key.daddr, f->key.family);
	__u32 v;

	d->verdict = WEIR_ALLOW;
	d->reason = WEIR_REASON_NONE;
	d->rule_id = WEIR_NO_RULE;
	d->src_id = origin == WEIR_ORIGIN_HOST ? IDENTITY_HOST :
						identity_of(src_ep, f->key.saddr, f->key.family);
	d->dst_id = identity_of(dst_ep, f->key.daddr, f->key.family);
	if (src_ep && (src_ep->flags & WEIR_EP_EGRESS_ENFORCED)) {
		v = policy(src_ep->endpoint_id, DIR_EGRESS, f->key.protocol, d->dst_id,
			   f->key.dport, &d->rule_id);
		if (v == WEIR_DROP) {
			d->verdict = WEIR_DROP;
			d->reason = WEIR_REASON_POLICY_EGRESS;
			return;
		}
		if (v == WEIR_REDIRECT)
			d->verdict = WEIR_REDIRECT;
	}
	if (!dst_ep || !(dst_ep->flags & WEIR_EP_INGRESS_ENFORCED))
		return;
	if (origin == WEIR_ORIGIN_HOST && (cfg->flags & WEIR_CFG_ALLOW_LOCALHOST))
		return;
	v = policy(dst_ep->endpoint_id, DIR_INGRESS, f->key.protocol, d->src_id, f->key.dport,
		   &d->rule_id);
	if (v == WEIR_DROP) {
		d->verdict = WEIR_DROP;
		d->reason = WEIR_REASON_POLICY_INGRESS;
	} else if (v == WEIR_REDIRECT) {
		d->verdict = WEIR_REDIRECT;
	}
}

static __always_inline void event(struct flow *f, __u8 kind, __u8 reason, __u32 src_id,
				  __u32 dst_id, __u32 rule_id, __u32 ifindex)
{
	struct weir_event *e = bpf_ringbuf_reserve(&weir_events, sizeof(*e), 0);

	if (!e) {
		__u32 idx = WEIR_COUNTER_EVENTS_LOST;
		struct weir_counter *c = bpf_map_lookup_elem(&weir_counters, &idx);

		if (c)
			c->packets += 1;
		return;
	}
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

static __always_inline int drop(struct __sk_buff *skb, struct flow *f, __u8 reason, __u32 src_id,
				__u32 dst_id, __u32 rule_id)
{
	count(WEIR_COUNTER_DROPPED, skb);
	event(f, WEIR_EVENT_DROPPED, reason, src_id, dst_id, rule_id, skb->ifindex);
	return TC_ACT_SHOT;
}

/* drop() for a packet that went its flow's reply way (reported as such). */
static __always_inline int drop_reply(struct __sk_buff *skb, struct flow *f, __u8 reason,
				      __u32 src_id, __u32 dst_id, __u32 rule_id)
{
	count(WEIR_COUNTER_DROPPED, skb);
	event(f, WEIR_EVENT_DROPPED | WEIR_EVENT_F_REPLY, reason, src_id, dst_id, rule_id,
	      skb->ifindex);
	return TC_ACT_SHOT;
}

static __always_inline int pass(struct __sk_buff *skb)
{
	count(WEIR_COUNTER_ALLOWED, skb);
	return NOT_OURS;
}

/* ---- conntrack ---------------------------------------------------------- */

static __always_inline __u64 lifetime_ns(struct weir_ct_value *ct, __u8 proto)
{
	if (ct->verdict == WEIR_DROP && !(ct->flags & WEIR_CT_REVOKED))
		return WEIR_CT_DROP_LIFETIME * NSEC;
	if (ct->flags & WEIR_CT_CLOSING)
		return WEIR_CT_CLOSING_LIFETIME * NSEC;
	if (proto != IPPROTO_TCP)
		return WEIR_CT_OTHER_LIFETIME * NSEC;
	if (!(ct->flags & WEIR_CT_SEEN_REPLY))
		return WEIR_CT_TCP_SYN_LIFETIME * NSEC;
	return WEIR_CT_TCP_LIFETIME * NSEC;
}

/* The live entry for `key` on `leg`, or NULL (an expired one is removed). */
static __always_inline struct weir_ct_value *ct_lookup(struct weir_ct_key *key, __u8 leg, __u64 now)
{
	struct weir_ct_value *ct;

	key->leg = leg;
	ct = bpf_map_lookup_elem(&weir_ct, key);
	if (!ct)
		return 0;
	if (now - ct->last_seen_ns > lifetime_ns(ct, key->protocol)) {
		bpf_map_delete_elem(&weir_ct, key);
		return 0;
	}
	return ct;
}

/* Records a packet of a tracked flow: time, and for TCP how far the connection got. */
static __always_inline void ct_touch(struct weir_ct_value *ct, struct flow *f, int reply, __u64 now)
{
	__u8 flags = ct->flags;

	/* Lifetimes are in seconds: refresh at most once a second, so the packets of
	 * a busy flow on several CPUs do not all write the same cache line. */
	if (now - ct->last_seen_ns >= NSEC)
		ct->last_seen_ns = now;
	if (f->key.protocol != IPPROTO_TCP)
		return;
	if (reply)
		flags |= WEIR_CT_SEEN_REPLY;
	if (f->tcp_flags & TCP_F_RST)
		flags |= WEIR_CT_CLOSING;
	if (f->tcp_flags & TCP_F_FIN)
		flags |= reply ? WEIR_CT_FIN_REV : WEIR_CT_FIN_FWD;
	if ((flags & (WEIR_CT_FIN_FWD | WEIR_CT_FIN_REV)) == (WEIR_CT_FIN_FWD | WEIR_CT_FIN_REV))
		flags |= WEIR_CT_CLOSING;
	/* A new connection on the tuple of a closed one starts afresh. */
	if ((f->tcp_flags & (TCP_F_SYN | TCP_F_ACK)) == TCP_F_SYN && !reply &&
	    (flags & WEIR_CT_CLOSING))
		flags &= WEIR_CT_REVOKED;
	if (flags != ct->flags)
		ct->flags = flags;
}

static __always_inline void ct_create(struct weir_ct_key *key, __u8 leg, struct decision *d,
				      __u8 origin, struct weir_config *cfg, __u64 now)
{
	struct weir_ct_value v = {};

	key->leg = leg;
	v.verdict = d->verdict;
	v.src_identity = d->src_id;
	v.dst_identity = d->dst_id;
	v.policy_generation = cfg->policy_generation;
	v.last_seen_ns = now;
	v.rule_id = d->rule_id;
	v.origin = origin;
	v.reason = d->reason;
	bpf_map_update_elem(&weir_ct, key, &v, BPF_ANY);
}

/* The sending endpoint of a tracked flow's forward direction, for re-deciding it:
 * only flows that came from an endpoint's own interface had one. */
static __always_inline struct weir_endpoint_info *origin_endpoint(struct flow *fwd, __u8 origin)
{
	return origin == WEIR_ORIGIN_ENDPOINT ? endpoint(fwd->key.saddr, fwd->key.family) : 0;
}

/* Brings a tracked flow up to the current policy generation: decides its forward
 * direction `fwd` again. An unchanged verdict keeps the entry; a changed one is
 * written into it (a flow allowed before and dropped now stays as a revoked
 * entry, so that neither side can start it again as a new flow). Returns 1 when
 * the verdict changed (the new decision is in `d`). */
static __always_inline int ct_revalidate(struct weir_ct_value *ct, struct flow *fwd,
					 struct weir_config *cfg, struct decision *d)
{
	__u32 verdict;

	if (ct->policy_generation == cfg->policy_generation)
		return 0;
	decide(fwd, origin_endpoint(fwd, ct->origin), ct->origin, cfg, d);
	verdict = d->verdict;
	/* The proxy leg stands while its client's flow still goes to the proxy (or
	 * is allowed outright). */
	if (ct->verdict == WEIR_PROXY_LEG && verdict != WEIR_DROP)
		verdict = WEIR_PROXY_LEG;
	ct->policy_generation = cfg->policy_generation;
	ct->rule_id = d->rule_id;
	if (verdict == ct->verdict)
		return 0;
	if (verdict == WEIR_DROP)
		ct->flags |= WEIR_CT_REVOKED;
	ct->verdict = verdict;
	ct->reason = d->reason;
	return 1;
}

static __always_inline void reverse(struct flow *fwd, struct flow *rev)
{
	__builtin_memcpy(rev->key.saddr, fwd->key.daddr, 16);
	__builtin_memcpy(rev->key.daddr, fwd->key.saddr, 16);
	rev->key.sport = fwd->key.dport;
	rev->key.dport = fwd->key.sport;
	rev->key.protocol = fwd->key.protocol;
	rev->key.family = fwd->key.family;
	rev->key.leg = 0;
	rev->key.pad = 0;
	rev->tcp_flags = fwd->tcp_flags;
}

/* ---- sockets ------------------------------------------------------------ */

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

static __always_inline void first_fragment(struct flow *f, int allowed, __u32 mark, __u8 leg);

/* Hands the packet to `sk` (releasing it) and marks it for local delivery; 0 on
 * success. The rest of a fragmented datagram is marked the same way; `leg` says
 * whose socket it is (the client's flow, or the proxy's upstream leg). */
static __always_inline int assign(struct __sk_buff *skb, struct bpf_sock *sk, struct flow *f,
				  struct weir_config *cfg, __u8 leg)
{
	long err = bpf_sk_assign(skb, sk, 0);

	bpf_sk_release(sk);
	if (err)
		return -1;
	skb->mark = cfg->mark;
	first_fragment(f, 1, cfg->mark, leg);
	return 0;
}

/* Whether a UDP socket is connected to exactly the packet's source. The lookup
 * and the reads of the socket's peer here are not atomic with a session
 * socket's connect() running on another CPU (bound to the server's address
 * first, connected to its client just after), so a socket the lookup found
 * may by now belong to another client port: only one connected to this very
 * address and port is the flow's session, or one client port's query would be
 * answered on another's (seen, rarely, in the race test; the exact interleaving
 * is inferred, not traced). */
static __always_inline int connected_to_source(struct bpf_sock *sk, struct flow *f)
{
	/* Each field read on its own (volatile): the verifier refuses pointer
	 * arithmetic on a socket, which a merged compare would need. */
	__u32 port = *(volatile __u16 *)&sk->dst_port;
	__u32 a0, a1, a2, a3;

	if (port != f->key.sport)
		return 0;
	if (f->key.family == 4) {
		a0 = *(volatile __u32 *)&sk->dst_ip4;
		return a0 == f->key.saddr[0];
	}
	a0 = *(volatile __u32 *)&sk->dst_ip6[0];
	a1 = *(volatile __u32 *)&sk->dst_ip6[1];
	a2 = *(volatile __u32 *)&sk->dst_ip6[2];
	a3 = *(volatile __u32 *)&sk->dst_ip6[3];
	return a0 == f->key.saddr[0] && a1 == f->key.saddr[1] && a2 == f->key.saddr[2] &&
	       a3 == f->key.saddr[3];
}

/* The proxy's socket for a client's packet: the flow's own (an accepted TCP
 * connection, a UDP session connected to the client) or the listener.
 * Acquired (the caller releases it), or 0. */
static __always_inline struct bpf_sock *proxy_socket(struct __sk_buff *skb, struct flow *f,
						     struct weir_config *cfg)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk = 0;
	__u32 len;

	len = sock_tuple(f, &t);
	if (f->key.protocol == IPPROTO_TCP) {
		/* The packet's own connection, if the proxy already accepted it. A new
		 * SYN on the tuple of one in TIME_WAIT goes to that socket too: the
		 * kernel ends it and asks for a listener, which weir_sk_lookup gives
		 * (the listener itself would drop the SYN as a duplicate tuple). */
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
				return 0;
			}
		}
	} else if (f->key.protocol == IPPROTO_UDP) {
		/* The proxy's session for this flow (connected to the client); an
		 * unconnected socket on the destination port is someone else's, and
		 * so is one connected to another client port. */
		sk = bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
		if (sk && !connected_to_source(sk, f)) {
			bpf_sk_release(sk);
			sk = 0;
		}
		if (!sk) {
			to_proxy_port(f, &t, cfg);
			sk = bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
		}
	}
	return sk;
}

/* Steers the packet to the proxy's socket; 0 on success. */
static __always_inline int to_proxy(struct __sk_buff *skb, struct flow *f, struct weir_config *cfg)
{
	struct bpf_sock *sk = proxy_socket(skb, f, cfg);

	if (!sk)
		return -1;
	return assign(skb, sk, f, cfg, WEIR_LEG_CLIENT);
}

/* The proxy's transparent upstream socket a server's reply is for (its local
 * address is the client's). Acquired (the caller releases it), or 0. */
static __always_inline struct bpf_sock *upstream_socket(struct __sk_buff *skb, struct flow *f)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk = 0;
	__u32 len;

	len = sock_tuple(f, &t);
	if (f->key.protocol == IPPROTO_UDP) {
		/* The proxy's UDP session socket: bound to the client's address and
		 * port, connected to this server. Several sessions may share that
		 * address and port (one client port talking to two servers, e.g. a
		 * stub resolver retrying at its second nameserver with the same ID
		 * and question); the lookup may return another server's socket
		 * while it is not yet connected, and the kernel delivers an
		 * assigned datagram without comparing its source to the socket's
		 * peer. Only the socket connected to this very server is its
		 * session. */
		sk = bpf_sk_lookup_udp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
		if (sk && !connected_to_source(sk, f)) {
			bpf_sk_release(sk);
			return 0;
		}
	} else if (f->key.protocol == IPPROTO_TCP) {
		sk = bpf_skc_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
		if (sk && sk->state == BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
			return 0;
		}
	}
	return sk;
}

/* Delivers a server's reply to the proxy's upstream socket; 0 on success. */
static __always_inline int to_upstream_socket(struct __sk_buff *skb, struct flow *f,
					      struct weir_config *cfg)
{
	struct bpf_sock *sk = upstream_socket(skb, f);

	if (!sk)
		return -1;
	return assign(skb, sk, f, cfg, WEIR_LEG_PROXY);
}

static __always_inline int redirect_or_drop(struct __sk_buff *skb, struct flow *f,
					    struct weir_config *cfg, __u32 src_id, __u32 dst_id)
{
	if (to_proxy(skb, f, cfg) == 0) {
		count(WEIR_COUNTER_REDIRECTED, skb);
		return TC_ACT_OK;
	}
	first_fragment(f, 0, 0, 0);
	return drop(skb, f, WEIR_REASON_NO_PROXY, src_id, dst_id, WEIR_NO_RULE);
}

/* ---- what every hook shares -------------------------------------------- */

/* An IP packet policy cannot decide: dropped when either end enforces policy. */
static __always_inline int unsupported(struct __sk_buff *skb, struct flow *f,
				       struct weir_endpoint_info *src_ep, __u8 reason)
{
	struct weir_endpoint_info *dst = endpoint(f->key.daddr, f->key.family);

	if ((src_ep && (src_ep->flags & WEIR_EP_EGRESS_ENFORCED)) ||
	    (dst && (dst->flags & WEIR_EP_INGRESS_ENFORCED)))
		return drop(skb, f, reason, identity_of(src_ep, f->key.saddr, f->key.family),
			    identity_of(dst, f->key.daddr, f->key.family), WEIR_NO_RULE);
	return pass(skb);
}

static __always_inline void frag_key(struct flow *f, struct weir_frag_key *k)
{
	__builtin_memcpy(k->saddr, f->key.saddr, 16);
	__builtin_memcpy(k->daddr, f->key.daddr, 16);
	k->id = f->frag_id;
	k->protocol = f->key.protocol;
	k->family = f->key.family;
	k->pad = 0;
}

/* A non-first fragment passes only behind an allowed first fragment, and goes
 * where it went: a redirected datagram's rest is delivered on the node, where
 * the kernel reassembles it (dropping the head's socket assignment) and looks
 * the socket up by the datagram's ports — the proxy's session socket bound to
 * this very address pair, or the listener (weir_sk_lookup). Passed unmarked, it
 * would be routed on to the datagram's destination without its head, and the
 * node would wait in vain for it: a DNS answer larger than the MTU was lost
 * that way. The reassembled datagram is looked up like any other: with the
 * proxy's socket gone, or a client's flow no longer redirected, a node socket
 * bound to the port on every address would take it — so the rest is delivered
 * only while that socket is there (and weir_sk_lookup refuses a UDP datagram
 * for a pod's address that no proxied flow claims). */
static __always_inline int fragment(struct __sk_buff *skb, struct flow *f,
				    struct weir_endpoint_info *src_ep, struct weir_config *cfg)
{
	struct weir_frag_key k = {};
	struct weir_frag_value *v;
	struct weir_ct_value *ct;
	struct bpf_sock *sk;
	__u64 now = bpf_ktime_get_ns();

	frag_key(f, &k);
	v = bpf_map_lookup_elem(&weir_frags, &k);
	if (!v || now - v->last_seen_ns > WEIR_FRAG_LIFETIME * NSEC)
		return unsupported(skb, f, src_ep, WEIR_REASON_FRAGMENT_WITHOUT_HEAD);
	v->last_seen_ns = now;
	if (!v->mark) {
		/* The proxy's own datagram: only the node sends its rest (a client
		 * could otherwise splice fragments of its own into it). */
		if (v->leg == WEIR_LEG_PROXY && skb->ingress_ifindex)
			return unsupported(skb, f, src_ep, WEIR_REASON_FRAGMENT_WITHOUT_HEAD);
		return pass(skb);
	}
	/* Delivered on the node only while the socket its first fragment went to
	 * is there (weir may have stopped since: its programs stay, its sockets
	 * and weir_sk_lookup do not), and a client's flow still goes to the proxy
	 * under the current policy (decided under another: not revalidated here). */
	f->key.sport = v->sport;
	f->key.dport = v->dport;
	if (v->leg == WEIR_LEG_CLIENT) {
		ct = ct_lookup(&f->key, WEIR_LEG_CLIENT, now);
		sk = 0;
		if (ct && ct->verdict == WEIR_REDIRECT &&
		    ct->policy_generation == cfg->policy_generation)
			sk = proxy_socket(skb, f, cfg);
	} else {
		sk = upstream_socket(skb, f);
	}
	if (!sk)
		return drop(skb, f, WEIR_REASON_NO_PROXY,
			    identity_of(src_ep, f->key.saddr, f->key.family),
			    identity_of(endpoint(f->key.daddr, f->key.family), f->key.daddr,
					f->key.family),
			    WEIR_NO_RULE);
	bpf_sk_release(sk);
	skb->mark = v->mark;
	count(WEIR_COUNTER_REDIRECTED, skb);
	return TC_ACT_OK;
}

/* Remembers (or forgets) a first fragment's datagram once its flow is decided;
 * `mark` is what the rest gets, `leg` whose socket took the first (see
 * fragment()). */
static __always_inline void first_fragment(struct flow *f, int allowed, __u32 mark, __u8 leg)
{
	struct weir_frag_key k = {};
	struct weir_frag_value v = {};

	if (!f->first_frag)
		return;
	frag_key(f, &k);
	if (allowed) {
		v.last_seen_ns = bpf_ktime_get_ns();
		v.mark = mark;
		v.sport = f->key.sport;
		v.dport = f->key.dport;
		v.leg = leg;
		bpf_map_update_elem(&weir_frags, &k, &v, BPF_ANY);
	} else {
		bpf_map_delete_elem(&weir_frags, &k);
	}
}

/* An ICMP error passes only when it is about a tracked flow, in either direction,
 * on either leg, and was sent to that flow's own end. */
static __always_inline int icmp_error(struct __sk_buff *skb, struct flow *f,
				      struct weir_endpoint_info *src_ep)
{
	struct flow rev = {};
	__u64 now = bpf_ktime_get_ns();

	if (f->icmp_outer_dst_ok) {
		if (ct_lookup(&f->key, WEIR_LEG_CLIENT, now) || ct_lookup(&f->key, WEIR_LEG_PROXY, now))
			return pass(skb);
		reverse(f, &rev);
		if (ct_lookup(&rev.key, WEIR_LEG_CLIENT, now) ||
		    ct_lookup(&rev.key, WEIR_LEG_PROXY, now))
			return pass(skb);
	}
	/* Judge and report the error as the ICMP packet it is, not as the flow it
	 * quotes. */
	__builtin_memcpy(f->key.saddr, f->src, 16);
	__builtin_memcpy(f->key.daddr, f->dst, 16);
	f->key.protocol = f->key.family == 4 ? IPPROTO_ICMP : IPPROTO_ICMPV6;
	f->key.sport = 0;
	f->key.dport = 0;
	return unsupported(skb, f, src_ep, WEIR_REASON_ICMP_UNTRACKED);
}

/* The verdict of a tracked entry for this packet after revalidation; a drop is
 * reported only when this packet's revalidation made it one. */
static __always_inline __u32 tracked(struct __sk_buff *skb, struct weir_ct_value *ct,
				     struct flow *fwd, struct flow *pkt, int reply,
				     struct weir_config *cfg, __u64 now)
{
	struct decision d = {};

	if (ct_revalidate(ct, fwd, cfg, &d) && ct->verdict == WEIR_DROP) {
		/* Report it as this packet's flow. */
		if (reply)
			drop_reply(skb, pkt, ct->reason, d.dst_id, d.src_id, d.rule_id);
		else
			drop(skb, pkt, ct->reason, d.src_id, d.dst_id, d.rule_id);
		return WEIR_DROP;
	}
	if (ct->verdict == WEIR_DROP) {
		count(WEIR_COUNTER_DROPPED, skb);
		return WEIR_DROP;
	}
	ct_touch(ct, pkt, reply, now);
	/* Every datagram of a tracked flow may be fragmented, not only its first. */
	first_fragment(pkt, 1, 0, 0);
	return ct->verdict;
}

/* A packet of a flow (PARSED_FLOW) at a hook where it enters the node: `src_ep`
 * is the sending endpoint (already checked against the interface) or NULL, and
 * `origin` says which. Conntrack first; a new flow is decided and tracked. */
static __always_inline int entering(struct __sk_buff *skb, struct flow *f,
				    struct weir_endpoint_info *src_ep, __u8 origin,
				    struct weir_config *cfg)
{
	struct weir_ct_value *ct;
	struct decision d = {};
	struct flow rev = {};
	__u64 now = bpf_ktime_get_ns();
	__u32 v;

	/* The flow's own entry. */
	ct = ct_lookup(&f->key, WEIR_LEG_CLIENT, now);
	if (ct) {
		v = tracked(skb, ct, f, f, 0, cfg, now);
		if (v == WEIR_DROP)
			return TC_ACT_SHOT;
		if (v == WEIR_REDIRECT)
			return redirect_or_drop(skb, f, cfg, ct->src_identity, ct->dst_identity);
		return pass(skb);
	}
	/* A connection's first packet is never a reply: decided as new. */
	if ((f->tcp_flags & (TCP_F_SYN | TCP_F_ACK)) == TCP_F_SYN)
		goto new_flow;
	/* A server's reply to one of the proxy's upstream connections. */
	reverse(f, &rev);
	ct = ct_lookup(&rev.key, WEIR_LEG_PROXY, now);
	if (ct) {
		if (tracked(skb, ct, &rev, f, 1, cfg, now) == WEIR_DROP)
			return TC_ACT_SHOT;
		if (to_upstream_socket(skb, f, cfg) == 0) {
			count(WEIR_COUNTER_REDIRECTED, skb);
			return TC_ACT_OK;
		}
		/* No such socket (any more): maybe a reply on the client's leg. */
	}
	/* A reply to a flow decided when it started (a flow never allowed has no
	 * replies: a packet the other way is a flow of its own). */
	ct = ct_lookup(&rev.key, WEIR_LEG_CLIENT, now);
	if (ct && !(ct->verdict == WEIR_DROP && !(ct->flags & WEIR_CT_REVOKED))) {
		v = tracked(skb, ct, &rev, f, 1, cfg, now);
		if (v == WEIR_DROP)
			return TC_ACT_SHOT;
		/* A direct reply on a flow that now goes to the proxy: not any more. */
		if (v == WEIR_REDIRECT)
			return drop_reply(skb, f, WEIR_REASON_NO_PROXY, ct->dst_identity,
					  ct->src_identity, WEIR_NO_RULE);
		return pass(skb);
	}
new_flow:
	decide(f, src_ep, origin, cfg, &d);
	ct_create(&f->key, WEIR_LEG_CLIENT, &d, origin, cfg, now);
	first_fragment(f, d.verdict != WEIR_DROP, 0, 0);
	if (d.verdict == WEIR_DROP)
		return drop(skb, f, d.reason, d.src_id, d.dst_id, d.rule_id);
	event(f, d.verdict == WEIR_REDIRECT ? WEIR_EVENT_REDIRECTED : WEIR_EVENT_ALLOWED,
	      WEIR_REASON_NONE, d.src_id, d.dst_id, d.rule_id, skb->ifindex);
	if (d.verdict == WEIR_REDIRECT)
		return redirect_or_drop(skb, f, cfg, d.src_id, d.dst_id);
	return pass(skb);
}

/* The proxy's upstream leg leaving the node (marked, from the client's address):
 * tracked so that the server's replies are handed to the proxy's socket. */
static __always_inline int proxy_leg(struct __sk_buff *skb, struct flow *f, struct weir_config *cfg)
{
	struct weir_endpoint_info *client;
	struct weir_ct_value *ct;
	struct decision d = {};
	__u64 now = bpf_ktime_get_ns();

	/* The rest of a fragmented datagram follows (to a local endpoint, whose
	 * hook passes a non-first fragment only behind its first), from the node. */
	first_fragment(f, 1, 0, WEIR_LEG_PROXY);
	ct = ct_lookup(&f->key, WEIR_LEG_PROXY, now);
	if (ct && !((f->tcp_flags & (TCP_F_SYN | TCP_F_ACK)) == TCP_F_SYN)) {
		ct_touch(ct, f, 0, now);
		return NOT_OURS;
	}
	/* Only a new leg needs to know who its client is (every packet of the
	 * leg passes here: the lookup stays off that path). */
	client = endpoint(f->key.saddr, f->key.family);
	d.verdict = WEIR_PROXY_LEG;
	d.rule_id = WEIR_NO_RULE;
	d.src_id = identity_of(client, f->key.saddr, f->key.family);
	d.dst_id = identity_of(endpoint(f->key.daddr, f->key.family), f->key.daddr, f->key.family);
	ct_create(&f->key, WEIR_LEG_PROXY, &d, client ? WEIR_ORIGIN_ENDPOINT : WEIR_ORIGIN_OUTSIDE,
		  cfg, now);
	return NOT_OURS;
}

static __always_inline int is_proxy_leg(struct __sk_buff *skb, struct weir_config *cfg)
{
	return cfg->upstream_mark && skb->mark == cfg->upstream_mark && skb->ingress_ifindex == 0;
}

/* A packet whose source address is not its interface's to claim. */
static __always_inline int spoofed(struct __sk_buff *skb, struct flow *f)
{
	return drop(skb, f, WEIR_REASON_SPOOFED_SOURCE, outside_identity(f->src, f->key.family),
		    identity_of(endpoint(f->key.daddr, f->key.family), f->key.daddr, f->key.family),
		    WEIR_NO_RULE);
}

/* What an ingress hook does with each kind of IP packet, once its sender is known. */
static __always_inline int by_kind(struct __sk_buff *skb, struct flow *f, int parsed,
				   struct weir_endpoint_info *src_ep, __u8 origin,
				   struct weir_config *cfg)
{
	if (parsed == PARSED_UNSUPPORTED)
		return unsupported(skb, f, src_ep, WEIR_REASON_UNSUPPORTED_PROTOCOL);
	if (parsed == PARSED_FRAGMENT)
		return fragment(skb, f, src_ep, cfg);
	if (parsed == PARSED_ICMP_ERROR)
		return icmp_error(skb, f, src_ep);
	return entering(skb, f, src_ep, origin, cfg);
}

/* ---- the programs ------------------------------------------------------- */

SEC("classifier")
int weir_from_endpoint(struct __sk_buff *skb)
{
	struct weir_endpoint_info *src_ep;
	struct weir_config *cfg;
	struct flow f = {};
	__u32 zero = 0;
	int parsed;

	count(WEIR_COUNTER_SEEN, skb);
	cfg = bpf_map_lookup_elem(&weir_config, &zero);
	if (!cfg)
		return NOT_OURS;
	parsed = parse(skb, &f);
	if (parsed == PARSED_NOT_IP)
		return NOT_OURS;
	/* The identity comes from the interface: the source must be the endpoint
	 * whose veth this is. */
	src_ep = endpoint(f.src, f.key.family);
	if (!src_ep || src_ep->ifindex != skb->ifindex)
		return spoofed(skb, &f);
	return by_kind(skb, &f, parsed, src_ep, WEIR_ORIGIN_ENDPOINT, cfg);
}

SEC("classifier")
int weir_from_netdev(struct __sk_buff *skb)
{
	struct weir_endpoint_info *src_ep;
	struct weir_config *cfg;
	struct flow f = {};
	__u32 zero = 0;
	int parsed;

	count(WEIR_COUNTER_SEEN, skb);
	cfg = bpf_map_lookup_elem(&weir_config, &zero);
	if (!cfg)
		return NOT_OURS;
	parsed = parse(skb, &f);
	if (parsed == PARSED_NOT_IP)
		return NOT_OURS;
	src_ep = endpoint(f.src, f.key.family);
	if (src_ep) {
		/* This interface is becoming an endpoint's (its own program decides). */
		if (src_ep->ifindex == skb->ifindex)
			return NOT_OURS;
		/* Endpoint addresses live behind their own veths, never out here. */
		return spoofed(skb, &f);
	}
	/* Only packets for local endpoints are weir's business here. */
	if (!endpoint(f.dst, f.key.family))
		return NOT_OURS;
	return by_kind(skb, &f, parsed, 0, WEIR_ORIGIN_OUTSIDE, cfg);
}

SEC("classifier")
int weir_to_endpoint(struct __sk_buff *skb)
{
	struct weir_endpoint_info *src_ep = 0;
	__u32 ifindex;
	struct weir_ct_value *ct;
	struct weir_config *cfg;
	struct decision d = {};
	struct flow f = {}, rev = {};
	__u32 zero = 0;
	__u64 now;
	__u8 origin;
	int parsed;

	cfg = bpf_map_lookup_elem(&weir_config, &zero);
	if (!cfg)
		return NOT_OURS;
	/* Forwarded from an interface with weir's ingress program: decided there
	 * (allowed and tracked, or it would not be here). */
	ifindex = skb->ingress_ifindex;
	if (ifindex && bpf_map_lookup_elem(&weir_devices, &ifindex))
		return NOT_OURS;
	parsed = parse(skb, &f);
	if (parsed == PARSED_NOT_IP)
		return NOT_OURS;
	if (skb->ingress_ifindex == 0) {
		origin = WEIR_ORIGIN_HOST;
	} else {
		/* Forwarded: an ingress hook decided it, unless it came in where weir
		 * is not attached. */
		src_ep = endpoint(f.src, f.key.family);
		origin = WEIR_ORIGIN_OUTSIDE;
		if (src_ep && src_ep->ifindex == skb->ingress_ifindex)
			origin = WEIR_ORIGIN_ENDPOINT;
		else
			src_ep = 0;
	}
	if (parsed == PARSED_UNSUPPORTED)
		return unsupported(skb, &f, src_ep, WEIR_REASON_UNSUPPORTED_PROTOCOL);
	if (parsed == PARSED_FRAGMENT)
		return fragment(skb, &f, src_ep, cfg);
	if (parsed == PARSED_ICMP_ERROR)
		return icmp_error(skb, &f, src_ep);
	if (origin == WEIR_ORIGIN_HOST && is_proxy_leg(skb, cfg))
		return proxy_leg(skb, &f, cfg);

	now = bpf_ktime_get_ns();
	ct = ct_lookup(&f.key, WEIR_LEG_CLIENT, now);
	if (ct) {
		if (tracked(skb, ct, &f, &f, 0, cfg, now) == WEIR_DROP)
			return TC_ACT_SHOT;
		return NOT_OURS;
	}
	reverse(&f, &rev);
	ct = (f.tcp_flags & (TCP_F_SYN | TCP_F_ACK)) == TCP_F_SYN ?
		     0 :
		     ct_lookup(&rev.key, WEIR_LEG_CLIENT, now);
	if (ct && !(ct->verdict == WEIR_DROP && !(ct->flags & WEIR_CT_REVOKED))) {
		/* A reply (e.g. from the proxy's accepted socket to its client). */
		if (tracked(skb, ct, &rev, &f, 1, cfg, now) == WEIR_DROP)
			return TC_ACT_SHOT;
		return NOT_OURS;
	}
	/* Nothing decided this flow on its way in: the node's own traffic, or a
	 * packet from an interface weir is not attached to. */
	decide(&f, src_ep, origin, cfg, &d);
	if (d.verdict == WEIR_REDIRECT) {
		/* No socket can be assigned on the way out: fail closed. */
		d.verdict = WEIR_DROP;
		d.reason = WEIR_REASON_NO_PROXY;
	}
	ct_create(&f.key, WEIR_LEG_CLIENT, &d, origin, cfg, now);
	first_fragment(&f, d.verdict != WEIR_DROP, 0, 0);
	if (d.verdict == WEIR_DROP)
		return drop(skb, &f, d.reason, d.src_id, d.dst_id, d.rule_id);
	event(&f, WEIR_EVENT_ALLOWED, WEIR_REASON_NONE, d.src_id, d.dst_id, d.rule_id,
	      skb->ifindex);
	return pass(skb);
}

SEC("classifier")
int weir_to_netdev(struct __sk_buff *skb)
{
	struct weir_config *cfg;
	struct flow f = {};
	__u32 zero = 0;

	cfg = bpf_map_lookup_elem(&weir_config, &zero);
	if (!cfg || !is_proxy_leg(skb, cfg))
		return NOT_OURS;
	if (parse(skb, &f) != PARSED_FLOW)
		return NOT_OURS;
	return proxy_leg(skb, &f, cfg);
}

#define AF_INET 2
#define AF_INET6 10

/* A UDP datagram for a local endpoint's address reaches the node's socket
 * lookup only because weir delivered it here: the rest of a datagram whose
 * first fragment went to the proxy's upstream socket (bound to the client's
 * address), reassembled. Whose socket is gone (the session ended between the
 * fragments) has nowhere to go: a node socket bound to that port on every
 * address must not get a datagram meant for a pod. Connected sockets are
 * matched before this program runs; the proxy's own port is not refused (the
 * tc programs' helper lookups look for the listener there). */
static __always_inline int udp_to_endpoint(struct bpf_sk_lookup *ctx, struct weir_ct_key *key)
{
	struct weir_config *cfg;
	__u32 zero = 0;

	if (ctx->protocol != IPPROTO_UDP)
		return 0;
	cfg = bpf_map_lookup_elem(&weir_config, &zero);
	if (!cfg || ctx->local_port == cfg->proxy_port)
		return 0;
	return endpoint(key->daddr, key->family) != 0;
}

SEC("sk_lookup")
int weir_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct weir_ct_key key = {};
	struct weir_ct_value *ct;
	struct bpf_sock *sk;
	__u32 idx;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return SK_PASS;
	if (ctx->family == AF_INET) {
		key.family = 4;
		key.saddr[0] = ctx->remote_ip4;
		key.daddr[0] = ctx->local_ip4;
		idx = 0;
	} else if (ctx->family == AF_INET6) {
		key.family = 6;
		key.saddr[0] = ctx->remote_ip6[0];
		key.saddr[1] = ctx->remote_ip6[1];
		key.saddr[2] = ctx->remote_ip6[2];
		key.saddr[3] = ctx->remote_ip6[3];
		key.daddr[0] = ctx->local_ip6[0];
		key.daddr[1] = ctx->local_ip6[1];
		key.daddr[2] = ctx->local_ip6[2];
		key.daddr[3] = ctx->local_ip6[3];
		idx = 1;
	} else {
		return SK_PASS;
	}
	if (ctx->protocol == IPPROTO_UDP)
		idx += 2;
	key.sport = ctx->remote_port;
	key.dport = bpf_htons(ctx->local_port);
	key.protocol = ctx->protocol;
	key.leg = WEIR_LEG_CLIENT;
	ct = bpf_map_lookup_elem(&weir_ct, &key);
	if (!ct || ct->verdict != WEIR_REDIRECT)
		return udp_to_endpoint(ctx, &key) ? SK_DROP : SK_PASS;
	sk = bpf_map_lookup_elem(&weir_listeners, &idx);
	if (!sk)
		/* (a UDP datagram of a proxied flow: nobody else's either) */
		return ctx->protocol == IPPROTO_UDP ? SK_DROP : SK_PASS;
	bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "GPL";
