/* Every map key/value struct and every enum the redirect program family shares
 * with user space. The Rust mirror of each struct and enum lives in
 * agent-glue/src/datapath/maps.rs and is checked against this object's BTF in a
 * test, so the two sides cannot drift.
 *
 * Addresses are stored as four 32-bit words in network byte order; an IPv4
 * address sits in word 0 with the rest zero and family 4.
 */
#ifndef WEIR_REDIRECT_H
#define WEIR_REDIRECT_H

#include <linux/types.h>

/* Bumped whenever a struct below changes; pinned maps of another version are replaced. */
#define WEIR_LAYOUT_VERSION 5

enum weir_counter_index {
	WEIR_COUNTER_SEEN = 0,
	WEIR_COUNTER_ALLOWED = 1,
	WEIR_COUNTER_DROPPED = 2,
	WEIR_COUNTER_REDIRECTED = 3,
	/* verdict events the ring buffer had no room for (packets: events) */
	WEIR_COUNTER_EVENTS_LOST = 4,
	WEIR_COUNTER_MAX = 5,
};

struct weir_counter {
	__u64 packets;
	__u64 bytes;
};

/* weir_endpoints: a local endpoint by address. */
struct weir_endpoint_key {
	__u32 ip[4];
	__u32 family; /* 4 or 6 */
};

#define WEIR_EP_INGRESS_ENFORCED 1 /* some policy selects it for ingress */
#define WEIR_EP_EGRESS_ENFORCED 2

struct weir_endpoint_info {
	__u32 identity;
	__u32 endpoint_id;
	__u32 flags;
	/* The endpoint's host-side interface: its packets must arrive there, and a
	 * packet claiming its address anywhere else is spoofed. */
	__u32 ifindex;
};

/* weir_devices: the interfaces weir's ingress programs are attached to (ifindex →
 * WEIR_DEVICE_*). A packet forwarded from one of them was decided there. */
#define WEIR_DEVICE_ENDPOINT 1
#define WEIR_DEVICE_NETDEV 2

/* weir_ipcache: LPM over addresses that are not local endpoints (CIDR, FQDN, and
 * the node's own addresses with the host identity). */
struct weir_ipcache_key {
	__u32 prefixlen; /* counts bits after this field: 32 (family) + address bits */
	__u32 family;
	__u32 ip[4];
};

struct weir_ipcache_value {
	__u32 identity;
	__u32 pad;
};

/* weir_policy: LPM over (endpoint, direction, protocol, remote identity, port).
 * User space turns every rule set into disjoint port intervals (deny beats
 * redirect beats allow) and those into prefixes, so the longest match is exact.
 * Identity 0 is "any peer"; user space folds it into every specific identity's
 * intervals, so a hit for the specific identity never needs the wildcard. */
struct weir_policy_key {
	__u32 prefixlen; /* 32+8+8+16+32 = 96 fixed bits, then 0-16 port bits */
	__u32 endpoint_id; /* network byte order */
	__u8 direction;    /* 0 ingress, 1 egress */
	__u8 protocol;     /* IPPROTO_TCP / IPPROTO_UDP */
	__u16 pad;
	__u32 identity; /* network byte order */
	__u16 dport;    /* network byte order */
	__u16 pad2;
};

enum weir_verdict {
	WEIR_DROP = 0,
	WEIR_ALLOW = 1,
	WEIR_REDIRECT = 2,
	/* conntrack only: the proxy's upstream leg, sent from the client's address;
	 * the server's replies go to the proxy's socket, not to the client. */
	WEIR_PROXY_LEG = 3,
};

struct weir_policy_value {
	__u32 verdict;   /* enum weir_verdict */
	__u32 rule_id;   /* index into the agent's rule table, for events */
};

/* rule_id of an event that no policy entry decided (default deny). */
#define WEIR_NO_RULE 0xffffffffu

/* Which conntrack leg a key is: the client's own flow, or the proxy's upstream
 * connection made from the client's address. The two can have the same 4-tuple
 * and must never share an entry. */
enum weir_ct_leg {
	WEIR_LEG_CLIENT = 0,
	WEIR_LEG_PROXY = 1,
};

/* weir_ct: connection tracking, keyed by the flow's forward 5-tuple and leg. */
struct weir_ct_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 protocol;
	__u8 family;
	__u8 leg; /* enum weir_ct_leg */
	__u8 pad;
};

/* Where a flow's first packet came from: decides how it is judged again after a
 * policy change. */
enum weir_origin {
	WEIR_ORIGIN_ENDPOINT = 0, /* a local endpoint's own interface */
	WEIR_ORIGIN_OUTSIDE = 1,  /* any other interface: world, CIDRs, other nodes */
	WEIR_ORIGIN_HOST = 2,     /* this node's own stack */
};

/* weir_ct_value.flags */
#define WEIR_CT_SEEN_REPLY 1 /* TCP: the other side answered (established) */
#define WEIR_CT_FIN_FWD 2
#define WEIR_CT_FIN_REV 4
#define WEIR_CT_CLOSING 8 /* RST, or FIN both ways */
#define WEIR_CT_REVOKED 16 /* allowed once, dropped since a policy change */

/* Entry lifetimes since the last packet, in seconds. */
#define WEIR_CT_TCP_SYN_LIFETIME 60
#define WEIR_CT_TCP_LIFETIME 21600
#define WEIR_CT_CLOSING_LIFETIME 10
#define WEIR_CT_OTHER_LIFETIME 60
/* A remembered drop of a flow never allowed (one event per dropped flow, not per
 * retransmission). A revoked flow's entry keeps the lifetime of its protocol, so
 * neither side can restart it as a new flow. */
#define WEIR_CT_DROP_LIFETIME 5

struct weir_ct_value {
	__u32 verdict; /* enum weir_verdict */
	__u32 src_identity;
	__u32 dst_identity;
	__u32 policy_generation;
	__u64 last_seen_ns;
	__u32 rule_id;
	__u8 origin; /* enum weir_origin */
	__u8 flags;  /* WEIR_CT_* */
	__u8 reason; /* enum weir_drop_reason, for remembered drops */
	__u8 pad;
};

/* weir_frags: first fragments that were allowed, so the rest of the datagram may
 * follow (non-first fragments carry no ports), and where: a datagram whose first
 * fragment went to a proxy socket has the rest marked for local delivery too,
 * where the kernel reassembles it and finds the socket by its ports. */
struct weir_frag_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u32 id;
	__u8 protocol;
	__u8 family;
	__u16 pad;
};

struct weir_frag_value {
	__u64 last_seen_ns;
	__u32 mark;  /* set on the rest (0: they pass as they are) */
	__u16 sport; /* the datagram's ports (network order), */
	__u16 dport;
	__u8 leg;    /* and the conntrack leg of the socket its first fragment went to
		      * (with no mark: WEIR_LEG_PROXY is the proxy's own datagram) */
	__u8 pad[7];
};

#define WEIR_FRAG_LIFETIME 30

/* weir_config.flags */
#define WEIR_CFG_ALLOW_LOCALHOST 1 /* the node may reach every local endpoint */

/* weir_config: one entry. */
struct weir_config {
	__u32 proxy_port; /* host byte order */
	__u32 mark;       /* skb->mark for redirected packets (ip rule → local table) */
	__u32 policy_generation;
	__u32 upstream_mark; /* SO_MARK of the proxy's upstream sockets; 0: none */
	__u32 flags;         /* WEIR_CFG_* */
	__u32 pad;
};

/* weir_events ring buffer: one per new flow and one per dropped flow. The reader
 * is woken when this much is waiting, and drains every 20 ms otherwise
 * (DRAIN_INTERVAL in events.rs). */
#define WEIR_EVENTS_WAKEUP_BYTES (64 * sizeof(struct weir_event))
enum weir_event_kind {
	WEIR_EVENT_ALLOWED = 1,
	WEIR_EVENT_DROPPED = 2,
	WEIR_EVENT_REDIRECTED = 3,
};

/* Or'ed into weir_event.kind: the packet went its flow's reply way (a reply
 * dropped after its flow's policy was revoked). */
enum weir_event_flag {
	WEIR_EVENT_F_REPLY = 0x80,
};

enum weir_drop_reason {
	WEIR_REASON_NONE = 0,
	WEIR_REASON_POLICY_EGRESS = 1,
	WEIR_REASON_POLICY_INGRESS = 2,
	/* An L7 flow that could not be handed to the proxy (no listener, or it
	 * entered where no socket can be assigned, e.g. from the host). */
	WEIR_REASON_NO_PROXY = 3,
	/* IP but not TCP/UDP/ICMP (or IPv6 extension headers): policy cannot see its
	 * ports, so an enforced endpoint does not take it. */
	WEIR_REASON_UNSUPPORTED_PROTOCOL = 4,
	/* A source address that is not the sending interface's endpoint's. */
	WEIR_REASON_SPOOFED_SOURCE = 5,
	/* A non-first fragment whose first fragment was not allowed. */
	WEIR_REASON_FRAGMENT_WITHOUT_HEAD = 6,
	/* An ICMP error about no tracked flow. */
	WEIR_REASON_ICMP_UNTRACKED = 7,
};

struct weir_event {
	__u64 timestamp_ns;
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport; /* network byte order */
	__u16 dport;
	__u8 protocol;
	__u8 family;
	__u8 kind;   /* enum weir_event_kind, | WEIR_EVENT_F_REPLY */
	__u8 reason; /* enum weir_drop_reason */
	__u32 src_identity;
	__u32 dst_identity;
	__u32 rule_id;
	__u32 ifindex;
};

/* Never stored anywhere: gives the shared enums a place in BTF, so the Rust
 * constants can be checked against them. */
struct weir_enums {
	enum weir_counter_index counter;
	enum weir_verdict verdict;
	enum weir_ct_leg leg;
	enum weir_origin origin;
	enum weir_event_kind kind;
	enum weir_event_flag kind_flag;
	enum weir_drop_reason reason;
};

#endif
