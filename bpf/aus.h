/* SPDX-License-Identifier: Apache-2.0 */
/*
 * aus.h - the whole contract between the kernel programs (aus.bpf.c) and
 * user space. Every map name, key, value, verdict, reason and size the two
 * sides share is defined here and nowhere else. daemon/aus/core/contract.py
 * is its Python mirror; tests/kernel/test_contract.py checks the mirror against
 * what bcc compiled, field by field.
 *
 * Plain types only (no kernel headers), so user-space tools can include it.
 * Maps sized by the daemon's configuration use AUS_MAX_* macros that the
 * loader passes as -D cflags; the defaults below apply when it does not.
 */
#ifndef AUS_H
#define AUS_H

/* Bumped on any change to a key or value layout below: maps are pinned
 * under <pin_dir>/v<AUS_ABI_VERSION>, so a new layout gets new maps and the
 * programs are swapped to them atomically. */
#define AUS_ABI_VERSION 3

#define AUS_LOGINUID_UNSET 0xffffffffU

/* What a cgroup program returns to the kernel: 1 lets the socket call or
 * packet through, 0 makes connect()/sendmsg() fail with EPERM or drops the
 * packet. */
#define AUS_DROP 0
#define AUS_PASS 1

/* Modes (aus_config.mode). */
#define AUS_MODE_ENFORCE    0
#define AUS_MODE_VISIBILITY 1

/* Why a decision was taken; every verdict is counted under one reason. */
enum aus_reason {
	AUS_REASON_NONE = 0,
	AUS_REASON_RULE = 1,       /* allowed by a rule (or the baseline) */
	AUS_REASON_UNMANAGED = 2,  /* login UID unset or listed as unmanaged */
	AUS_REASON_NO_RULE = 3,    /* managed user, no rule matches: deny */
	AUS_REASON_PENDING = 4,    /* managed user not in the maps yet: baseline only */
	AUS_REASON_INBOUND = 5,    /* reply on a connection the socket accepted */
	AUS_REASON_NO_SOCKET = 6,  /* no full socket (kernel reply, timewait) */
	AUS_REASON_NOT_IP = 7,     /* neither IPv4 nor IPv6 */
	AUS_REASON_SOURCE_ROUTE = 8, /* managed packet carrying a source route
				      * (IPv4 LSRR/SSRR, IPv6 routing header)
				      * or options that cannot be walked: its
				      * destination is not where it goes */
	AUS_REASON_DNS = 9,        /* allowed by an address a DNS answer gave
				    * for a name a rule allows (aus_dns) */
	AUS_REASON_MAX = 10,
};

/* Where a decision was taken (events, counters). */
enum aus_hook {
	AUS_HOOK_EGRESS = 0,
	AUS_HOOK_CONNECT4 = 1,
	AUS_HOOK_CONNECT6 = 2,
	AUS_HOOK_SENDMSG4 = 3,
	AUS_HOOK_SENDMSG6 = 4,
	AUS_HOOK_MAX = 5,
};

/* Verdict as reported in events and counters. */
enum aus_event_verdict {
	AUS_EV_ALLOW = 0,
	AUS_EV_DENY = 1,   /* denied and enforced */
	AUS_EV_AUDIT = 2,  /* would be denied; visibility mode let it pass */
};

/* Rule ids: 0 means "no rule", 1 is the baseline from ausd.yaml, policy
 * rules are numbered from 2 by the daemon and keep their id across
 * reloads while their name stays. */
#define AUS_RULE_NONE 0
#define AUS_RULE_BASELINE 1

/* Ruleset ids: 0 is never used. Rulesets are immutable; the daemon gives
 * each new content a new, never reused id (aus_config.ruleset_seq). */
#define AUS_RULESET_NONE 0

/* Protocol numbers as on the wire; AUS_PROTO_ANY never appears in a
 * packet and marks "every protocol" entries. */
#define AUS_PROTO_ANY 0
#define AUS_PROTO_ICMP 1
#define AUS_PROTO_TCP 6
#define AUS_PROTO_UDP 17
#define AUS_PROTO_ICMPV6 58

/* DNS is what the programs redirect to the daemon's forwarder. */
#define AUS_DNS_PORT 53

#ifndef AUS_MAX_USERS
#define AUS_MAX_USERS 65536
#endif
#ifndef AUS_MAX_DESTINATIONS
#define AUS_MAX_DESTINATIONS 262144
#endif
#ifndef AUS_MAX_SERVICES
#define AUS_MAX_SERVICES 262144
#endif
#ifndef AUS_MAX_RULES
#define AUS_MAX_RULES 4096
#endif
#ifndef AUS_MAX_DNS_ENTRIES
#define AUS_MAX_DNS_ENTRIES 262144
#endif
/* Redirected DNS clients remembered at once (LRU: the oldest go first). */
#define AUS_MAX_DNS_ORIGINS 65536
/* Flow events in flight; the daemon drains them continuously. */
#define AUS_EVENTS_BYTES (1 << 20)
#define AUS_COMM_LEN 16
#define AUS_RULE_NAME_LEN 64

/* ---- aus_config: ARRAY[1]. Written by the daemon, read by every
 * program on every decision. */
#define AUS_MAP_CONFIG "aus_config"
struct aus_config {
	__u32 mode;              /* AUS_MODE_* */
	__u32 baseline_ruleset;  /* ruleset of managed users not in aus_users */
	__u32 events_per_sec;    /* flow-event rate limit per CPU */
	__u32 events_burst;
	__u32 ruleset_seq;       /* next ruleset id (daemon bookkeeping) */
	__u32 portset_seq;       /* next portset id (daemon bookkeeping) */
	__u64 policy_version;    /* daemon bookkeeping, shown by ausctl */
	__u32 users_gen;         /* bumped after any aus_users change: a
				  * socket's cached decision is reused only
				  * while this is unchanged */
	__u32 pad;
};

/* ---- aus_users: HASH login UID -> user. Written by the daemon when a
 * login UID becomes active, changes rules or goes; read per decision.
 * Replacing one value is atomic: that is how a user's rule set changes. */
#define AUS_MAP_USERS "aus_users"
#define AUS_USER_UNMANAGED 0x1
struct aus_user {
	__u32 ruleset;  /* id of the user's immutable ruleset */
	__u32 flags;    /* AUS_USER_* */
	__u32 slot;     /* index in aus_user_stats; 0 is for users not in
			 * this map yet */
};

/* ---- aus_dst: LPM_TRIE (ruleset, family, address) -> portset. IPv4
 * addresses are stored v4-mapped (::ffff:a.b.c.d) under family 4, so a
 * v4-mapped connect() on an IPv6 socket is judged as IPv4, and an IPv6
 * prefix such as ::/0 never covers IPv4. The daemon flattens rules so that
 * the longest matching prefix carries every service allowed there. */
#define AUS_MAP_DST "aus_dst"
#define AUS_DST_ID_BITS 64      /* ruleset + family: always matched whole */
#define AUS_DST_FULL_PREFIX (AUS_DST_ID_BITS + 128)  /* a lookup of one address */
struct aus_dst_key {
	__u32 prefixlen;  /* 64 (ruleset, family) + 128-bit address prefix */
	__u32 ruleset;
	__u32 family;     /* 4 or 6 */
	__u8 addr[16];
};
struct aus_dst_val {
	__u32 portset;
};

/* ---- aus_svc: LPM_TRIE (portset, protocol, port) -> rule. Prefix 32
 * matches every protocol, 48 every port of one protocol, 48 + k a block
 * of 2^(16-k) ports: a port range is a handful of aligned blocks. */
#define AUS_MAP_SVC "aus_svc"
#define AUS_SVC_ANY_PREFIX 32   /* every protocol */
#define AUS_SVC_PROTO_PREFIX 48 /* every port of one protocol (proto + pad) */
#define AUS_SVC_FULL_PREFIX 64  /* a lookup of one port */
struct aus_svc_key {
	__u32 prefixlen;
	__u32 portset;
	__u8 proto;
	__u8 pad;       /* always 0 */
	__u16 port;     /* network byte order */
};
struct aus_svc_val {
	__u32 rule;     /* rule id, for counters and events */
};

/* Counters: packets and bytes allowed and denied. Denied connect() and
 * sendmsg() calls count as one packet of zero bytes (the packet never
 * existed). */
struct aus_counters {
	__u64 allowed_packets;
	__u64 allowed_bytes;
	__u64 denied_packets;
	__u64 denied_bytes;
};

/* ---- aus_user_stats: PERCPU_ARRAY user slot -> counters. Written by the
 * programs, read by ausctl through aus_users; the daemon zeroes a slot
 * before giving it to a user. An array, not a hash keyed by login UID:
 * the slot travels in the socket's cached decision, so counting a packet
 * costs no hash lookup. */
#define AUS_MAP_USER_STATS "aus_user_stats"

/* ---- aus_rule_stats: PERCPU_ARRAY rule id -> counters. */
#define AUS_MAP_RULE_STATS "aus_rule_stats"

/* ---- aus_reasons: PERCPU_ARRAY (hook * AUS_REASON_MAX + reason) ->
 * decisions. */
#define AUS_MAP_REASONS "aus_reasons"
#define AUS_REASON_SLOTS (AUS_HOOK_MAX * AUS_REASON_MAX)

/* ---- aus_stats: PERCPU_ARRAY of event-path counters. */
#define AUS_MAP_STATS "aus_stats"
enum aus_stat {
	AUS_STAT_EVENTS_SENT = 0,
	AUS_STAT_EVENTS_RATE_LIMITED = 1,
	AUS_STAT_EVENTS_LOST = 2,  /* ring buffer full */
	AUS_STAT_MAX = 3,
};

/* ---- aus_rules: HASH rule id -> name. Written by the daemon, read only
 * by ausctl to name rules while the daemon is down. */
#define AUS_MAP_RULES "aus_rules"
struct aus_rule_info {
	char name[AUS_RULE_NAME_LEN];
};

/* ---- aus_ratelimit: PERCPU_ARRAY[1] token bucket for flow events. */
#define AUS_MAP_RATELIMIT "aus_ratelimit"
struct aus_bucket {
	__u64 tokens_milli;  /* tokens * 1000 */
	__u64 last_ns;
};

/* ---- aus_dns_conf: ARRAY[1]. The forwarder's place and the DNS
 * generation; written only by the daemon's DNS layer (aus.agent.dnsmaps),
 * never with aus_config, whose whole value the policy sync rewrites. */
#define AUS_MAP_DNS_CONF "aus_dns_conf"
struct aus_dns_conf {
	__u16 port;           /* forwarder port, host order; 0 = no forwarder:
			       * nothing is redirected */
	__u16 pad;
	__u32 gen;            /* bumped after aus_dns entries are written: a
			       * socket's cached *deny* is reused only while
			       * this is unchanged (a new entry can only allow) */
	__u64 netns_cookie;   /* the forwarder's network namespace: only
			       * sockets in it are redirected
			       * (SO_NETNS_COOKIE in user space) */
};

/* ---- aus_dns: HASH (login UID, family, address) -> services. Written by
 * the daemon from the DNS answers its forwarder released to that user,
 * for the addresses of names a rule of the user allows; read by
 * aus_lookup() when the user's ruleset has no allow for a destination.
 * After writing, the daemon bumps aus_dns_conf.gen. An entry past
 * expires_ns allows no new flow; a socket whose cached decision is a DNS
 * allow for the same destination and ruleset keeps it (open connections
 * survive expiry). */
#define AUS_MAP_DNS "aus_dns"
struct aus_dns_key {
	__u32 loginuid;
	__u32 family;         /* 4 or 6 */
	__u8 addr[16];        /* v4-mapped for IPv4 */
};
struct aus_dns_val {
	__u64 expires_ns;     /* CLOCK_MONOTONIC (bpf_ktime_get_ns()) */
	__u32 portset;        /* an aus_svc portset: the union of the services
			       * of every rule that allowed this address */
	__u32 rule;           /* the lowest of those rules, for events */
};

/* ---- aus_dns_origin: LRU_HASH client -> the resolver it chose. Written
 * by the egress program for every managed packet of a redirected socket
 * (so before the forwarder can read the query), read by the forwarder to
 * know whose query it is and where to send it; a client sending to the
 * forwarder without being redirected has its entry removed. */
#define AUS_MAP_DNS_ORIGIN "aus_dns_origin"
struct aus_dns_client {
	__u8 addr[16];        /* the client's source address, v4-mapped for v4 */
	__u16 port;           /* its source port, host order */
	__u8 proto;           /* AUS_PROTO_TCP or AUS_PROTO_UDP */
	__u8 pad;
};
struct aus_dns_origin {
	__u32 loginuid;
	__u8 addr[16];        /* the resolver, v4-mapped for v4 */
	__u16 port;           /* host order */
	__u8 family;          /* 4 or 6 */
	__u8 pad;
};

/* ---- aus_sock: SK_STORAGE, cloned into accepted sockets. Written at
 * socket creation (identity) and at decisions (cache); read by every hook
 * so the identity is the creator's, whoever sends later. */
#define AUS_MAP_SOCK "aus_sock"
#define AUS_SOCK_OUTBOUND 0x1   /* connect() or a SYN was judged */
#define AUS_SOCK_LATE 0x2       /* stamped after creation (socket predates us) */
struct aus_sock {
	__u32 loginuid;
	__u32 uid;
	__u32 tgid;
	__u32 flags;                /* AUS_SOCK_* */
	char comm[AUS_COMM_LEN];
	/* The last decision, reused while the user's ruleset and the
	 * destination stay the same (rulesets are immutable). A flow event
	 * is sent when a decision is not a repeat of this one. */
	__u32 cache_gen;            /* aus_config.users_gen of the decision */
	__u32 cache_ruleset;
	__u32 cache_slot;
	__u32 cache_rule;
	__u8 cache_addr[16];
	__u16 cache_port;           /* network byte order */
	__u8 cache_proto;
	__u8 cache_allowed;
	__u8 cache_reason;
	__u8 cache_managed;
	/* DNS redirected to the forwarder: the resolver the application
	 * chose, which getpeername() and recvfrom() report instead. */
	__u8 dns_family;            /* 0: not redirected; 4 or 6 */
	__u8 pad;
	__u32 cache_dns_gen;        /* aus_dns_conf.gen of the decision */
	__u8 dns_addr[16];          /* v4-mapped for IPv4 */
	__u16 dns_port;             /* network byte order */
	__u8 pad2[2];
};

/* ---- aus_events: RINGBUF of struct aus_event, drained by the daemon. */
#define AUS_MAP_EVENTS "aus_events"
struct aus_event {
	__u64 ts_ns;                /* bpf_ktime_get_ns() */
	__u32 loginuid;
	__u32 uid;
	__u32 pid;                  /* tgid of the socket's creator */
	__u32 rule;
	__u32 bytes;
	__u8 verdict;               /* enum aus_event_verdict */
	__u8 reason;                /* enum aus_reason */
	__u8 hook;                  /* enum aus_hook */
	__u8 family;                /* 4 or 6 */
	__u8 proto;
	__u8 pad[3];
	__u16 sport;                /* host byte order */
	__u16 dport;                /* host byte order */
	__u8 saddr[16];             /* v4 as v4-mapped */
	__u8 daddr[16];
	char comm[AUS_COMM_LEN];
};

#endif /* AUS_H */
