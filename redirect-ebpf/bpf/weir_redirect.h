/* Every map key/value struct of the redirect program family. The Rust mirror of
 * each struct lives in agent-glue and is checked against this object's BTF. */
#ifndef WEIR_REDIRECT_H
#define WEIR_REDIRECT_H

#include <linux/types.h>

/* Per-CPU packet and byte counters, indexed by enum weir_counter_index. */
enum weir_counter_index {
	WEIR_COUNTER_SEEN = 0,
	WEIR_COUNTER_MAX = 4,
};

struct weir_counter {
	__u64 packets;
	__u64 bytes;
};

#endif
