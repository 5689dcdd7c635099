/* Every map key/value struct of the sockmap program family. */
#ifndef WEIR_SOCKMAP_H
#define WEIR_SOCKMAP_H

#include <linux/types.h>

/* A TCP connection as the sockhash keys it (IPv4 and IPv6 alike). */
struct weir_sock_key {
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u32 family;
	__u32 local_port;  /* host byte order */
	__u32 remote_port; /* network byte order, as in bpf_sock_ops */
};

#endif
