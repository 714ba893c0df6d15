/* SPDX-License-Identifier: Apache-2.0 */
/*
 * aus.bpf.c - egress enforcement by audit login UID, compiled by bcc.
 *
 * The policy, in plain words:
 *
 *   The identity of traffic is the audit login UID of the task that created
 *   the socket, stamped into socket storage at socket() and inherited by
 *   accepted sockets. A socket that predates these programs is judged by the
 *   login UID of the task that calls connect()/sendmsg() on it, and its
 *   other packets by the socket owner's UID when that UID is a logged-in
 *   managed user (otherwise they pass: the owner may be a service).
 *
 *   Traffic passes when
 *     - the login UID is unset (system services) or marked unmanaged, or
 *     - it is a TCP reply on a connection a stream socket accepted, or
 *     - the destination address, protocol and port match the user's
 *       ruleset: the longest prefix for the address in aus_dst names a
 *       portset, and aus_svc holds an entry covering the protocol and port.
 *       A managed user not yet in aus_users gets the baseline ruleset.
 *     - or, failing that, a DNS answer the daemon's forwarder released to
 *       this login UID gave the address for a name a rule of the user
 *       allows (aus_dns), the entry has not expired, and its portset covers
 *       the protocol and port. A socket already allowed that way keeps its
 *       allow after the entry expires, while the user's ruleset stays.
 *   A managed user's packet carrying a source route (IPv4 LSRR/SSRR, an IPv6
 *   routing header) is denied whatever the rules: it does not go where its
 *   destination says. Raw sockets are judged packet by packet by the
 *   headers they wrote.
 *   Otherwise it is denied: connect()/sendmsg() fail with EPERM and packets
 *   are dropped, or, in visibility mode, it passes and is only reported.
 *
 *   DNS: a managed user's TCP or UDP to port 53 that the rules allow is
 *   sent to the daemon's forwarder instead (127.0.0.1 or ::1, port
 *   aus_dns_conf.port) when the forwarder listens in the socket's network
 *   namespace. The socket keeps the resolver it chose: its packets are
 *   judged as going there, each records its client address for the
 *   forwarder (aus_dns_origin), and getpeername() and recvfrom() show the
 *   resolver, not the forwarder. A resolver the rules deny stays denied;
 *   with no forwarder listening DNS goes where it was sent.
 *
 * Every decision costs the same few map lookups (users, then two LPM
 * tries), whatever the number of users and rules; a socket that keeps its
 * destination reuses its last decision while the user's ruleset id is
 * unchanged. Every verdict leaves through aus_finish(), which counts it
 * under a reason and emits the flow event. A DNS-derived allow costs one
 * more hash lookup, only where the rules gave none.
 *
 * Built with: -DAUS_LOGINUID_OFFSET=<offset of task_struct.loginuid in the
 * running kernel, from BTF> -DAUS_PIN_MAPS="<pin dir of the maps>" and the
 * AUS_MAX_* sizes. See daemon/aus/loader.py.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include "aus.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

#ifndef AUS_LOGINUID_OFFSET
#error "AUS_LOGINUID_OFFSET must be given (offset of task_struct.loginuid from BTF)"
#endif
#ifndef AUS_PIN_MAPS
#error "AUS_PIN_MAPS must be given (the directory the maps are pinned in)"
#endif

#define AUS_PINNED(type, name) type ":" AUS_PIN_MAPS "/" name

/* Maps. Keys and values are documented in aus.h. */
BPF_TABLE_PINNED("array", u32, struct aus_config, aus_config, 1,
		 AUS_PIN_MAPS "/" AUS_MAP_CONFIG);
BPF_TABLE_PINNED("hash", u32, struct aus_user, aus_users, AUS_MAX_USERS,
		 AUS_PIN_MAPS "/" AUS_MAP_USERS);
BPF_F_TABLE(AUS_PINNED("lpm_trie", AUS_MAP_DST), struct aus_dst_key,
	    struct aus_dst_val, aus_dst, AUS_MAX_DESTINATIONS, BPF_F_NO_PREALLOC);
BPF_F_TABLE(AUS_PINNED("lpm_trie", AUS_MAP_SVC), struct aus_svc_key,
	    struct aus_svc_val, aus_svc, AUS_MAX_SERVICES, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_array", u32, struct aus_counters, aus_user_stats,
		 AUS_MAX_USERS, AUS_PIN_MAPS "/" AUS_MAP_USER_STATS);
BPF_TABLE_PINNED("percpu_array", u32, struct aus_counters, aus_rule_stats,
		 AUS_MAX_RULES, AUS_PIN_MAPS "/" AUS_MAP_RULE_STATS);
BPF_TABLE_PINNED("percpu_array", u32, u64, aus_reasons, AUS_REASON_SLOTS,
		 AUS_PIN_MAPS "/" AUS_MAP_REASONS);
BPF_TABLE_PINNED("percpu_array", u32, u64, aus_stats, AUS_STAT_MAX,
		 AUS_PIN_MAPS "/" AUS_MAP_STATS);
BPF_TABLE_PINNED("hash", u32, struct aus_rule_info, aus_rules, AUS_MAX_RULES,
		 AUS_PIN_MAPS "/" AUS_MAP_RULES);
BPF_TABLE_PINNED("percpu_array", u32, struct aus_bucket, aus_ratelimit, 1,
		 AUS_PIN_MAPS "/" AUS_MAP_RATELIMIT);
BPF_TABLE_PINNED("array", u32, struct aus_dns_conf, aus_dns_conf, 1,
		 AUS_PIN_MAPS "/" AUS_MAP_DNS_CONF);
BPF_F_TABLE(AUS_PINNED("hash", AUS_MAP_DNS), struct aus_dns_key,
	    struct aus_dns_val, aus_dns, AUS_MAX_DNS_ENTRIES, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct aus_dns_client, struct aus_dns_origin,
		 aus_dns_origin, AUS_MAX_DNS_ORIGINS,
		 AUS_PIN_MAPS "/" AUS_MAP_DNS_ORIGIN);
/* BPF_F_CLONE: accepted sockets inherit the listener's identity. */
BPF_F_TABLE(AUS_PINNED("sk_storage", AUS_MAP_SOCK), int, struct aus_sock,
	    aus_sock, 0, BPF_F_NO_PREALLOC | BPF_F_CLONE);

/* bcc's BPF_RINGBUF_OUTPUT cannot pin; this is the same table, pinned, so
 * a restarted daemon keeps reading the ring the running programs fill. */
struct aus_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/" AUS_PINNED("ringbuf", AUS_MAP_EVENTS))))
struct aus_events_table_t aus_events = { .max_entries = AUS_EVENTS_BYTES };

/* One flow as the hooks see it. Addresses are IPv6 or v4-mapped. */
struct aus_flow {
	u8 family;   /* 4 or 6 */
	u8 proto;
	u16 sport;   /* network byte order */
	u16 dport;   /* network byte order; 0 for ICMP */
	u8 saddr[16];
	u8 daddr[16];
};

struct aus_decision {
	u32 loginuid;
	u32 uid;
	u32 tgid;
	u32 ruleset;
	u32 slot;    /* aus_user_stats index */
	u32 rule;
	u8 reason;
	u8 allowed;
	u8 fresh;    /* not a repeat of the socket's last decision */
	u8 managed;
	u8 by_owner; /* no stamp: judged by the socket owner's UID */
	char comm[AUS_COMM_LEN];
};

static __always_inline void aus_v4_mapped(u8 addr[16], u32 ip4_be)
{
	__builtin_memset(addr, 0, 10);
	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(&addr[12], &ip4_be, 4);
}

/* task_struct.loginuid read in place: bpf_get_current_task_btf() gives a
 * pointer the verifier checks against the running kernel's BTF, at the
 * offset the loader took from that same BTF. */
static __always_inline u32 aus_current_loginuid(void)
{
	return *(u32 *)((char *)bpf_get_current_task_btf() + AUS_LOGINUID_OFFSET);
}

static __always_inline void aus_stamp(struct aus_sock *st, u32 flags)
{
	st->loginuid = aus_current_loginuid();
	st->uid = (u32)bpf_get_current_uid_gid();
	st->tgid = bpf_get_current_pid_tgid() >> 32;
	st->flags = flags;
	bpf_get_current_comm(st->comm, sizeof(st->comm));
}

static __always_inline void aus_identity_from(struct aus_decision *d,
					      const struct aus_sock *st)
{
	d->loginuid = st->loginuid;
	d->uid = st->uid;
	d->tgid = st->tgid;
	__builtin_memcpy(d->comm, st->comm, AUS_COMM_LEN);
}

static __always_inline int aus_cache_hit(const struct aus_sock *st,
					 const struct aus_flow *f)
{
	/* Compared as words: clang turns memcmp() into a library call. */
	const u32 *a = (const u32 *)st->cache_addr;
	const u32 *b = (const u32 *)f->daddr;
	return st->cache_proto == f->proto && st->cache_port == f->dport &&
	       a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline struct aus_dns_conf *aus_get_dns_conf(void)
{
	u32 zero = 0;
	return aus_dns_conf.lookup(&zero);
}

/* The entry of a portset covering the flow's protocol and port. */
static __always_inline struct aus_svc_val *aus_service(u32 portset,
							 const struct aus_flow *f)
{
	struct aus_svc_key sk = {
		.prefixlen = AUS_SVC_FULL_PREFIX,
		.portset = portset,
		.proto = f->proto,
		.port = f->dport,
	};
	return aus_svc.lookup(&sk);
}

/* The rule lookup: fills everything in d but the identity. */
static __always_inline void aus_lookup(struct aus_decision *d,
				       const struct aus_config *cfg,
				       const struct aus_flow *f)
{
	if (d->loginuid == AUS_LOGINUID_UNSET) {
		d->reason = AUS_REASON_UNMANAGED;
		d->allowed = 1;
		return;
	}
	struct aus_user *user = aus_users.lookup(&d->loginuid);
	/* A socket older than these programs is judged by its owner's UID
	 * only when that UID is a logged-in managed user: the owner of a
	 * service's socket is no login. */
	if ((user && (user->flags & AUS_USER_UNMANAGED)) || (!user && d->by_owner)) {
		d->reason = AUS_REASON_UNMANAGED;
		d->allowed = 1;
		return;
	}
	d->managed = 1;
	d->ruleset = user ? user->ruleset : cfg->baseline_ruleset;
	d->slot = user ? user->slot : 0;
	d->reason = user ? AUS_REASON_NO_RULE : AUS_REASON_PENDING;
	d->allowed = 0;

	struct aus_dst_key dk = {
		.prefixlen = AUS_DST_FULL_PREFIX,
		.ruleset = d->ruleset,
		.family = f->family,
	};
	__builtin_memcpy(dk.addr, f->daddr, 16);
	struct aus_dst_val *dv = aus_dst.lookup(&dk);
	struct aus_svc_val *sv = dv ? aus_service(dv->portset, f) : 0;
	if (sv) {
		d->rule = sv->rule;
		d->reason = AUS_REASON_RULE;
		d->allowed = 1;
		return;
	}

	/* No rule allows the address itself: a name it answered for may. */
	struct aus_dns_key nk = {
		.loginuid = d->loginuid,
		.family = f->family,
	};
	__builtin_memcpy(nk.addr, f->daddr, 16);
	struct aus_dns_val *nv = aus_dns.lookup(&nk);
	if (!nv || nv->expires_ns <= bpf_ktime_get_ns())
		return;
	sv = aus_service(nv->portset, f);
	if (sv) {
		d->rule = sv->rule;
		d->reason = AUS_REASON_DNS;
		d->allowed = 1;
	}
}

/* Judge a flow, reusing the socket's last decision while its destination
 * and every user's entry are unchanged (rulesets are immutable, and
 * users_gen moves whenever an aus_users entry does). A cached deny is
 * also dropped when DNS entries were written (aus_dns_conf.gen): a new
 * entry can only allow. */
static __always_inline void aus_judge(struct aus_decision *d,
				      const struct aus_config *cfg,
				      struct aus_sock *st,
				      const struct aus_flow *f)
{
	u32 gen = cfg->users_gen;
	struct aus_dns_conf *dc = aus_get_dns_conf();
	u32 dns_gen = dc ? dc->gen : 0;
	int same_dst = st && aus_cache_hit(st, f);

	if (same_dst && st->cache_gen == gen &&
	    (st->cache_allowed || st->cache_dns_gen == dns_gen)) {
		d->ruleset = st->cache_ruleset;
		d->slot = st->cache_slot;
		d->rule = st->cache_rule;
		d->allowed = st->cache_allowed;
		d->reason = st->cache_reason;
		d->managed = st->cache_managed;
		d->fresh = 0;
		return;
	}
	aus_lookup(d, cfg, f);
	/* A flow a DNS answer allowed stays allowed once its entry expired
	 * (or another user changed): an open connection lives until it
	 * closes. Only a new ruleset (a policy change for this user) ends it. */
	if (same_dst && !d->allowed && d->managed && st->cache_allowed &&
	    st->cache_reason == AUS_REASON_DNS && st->cache_ruleset == d->ruleset) {
		d->allowed = 1;
		d->reason = AUS_REASON_DNS;
		d->rule = st->cache_rule;
	}
	/* News is a new destination, or a verdict or rule that changed. */
	d->fresh = !(same_dst && st->cache_allowed == d->allowed &&
		     st->cache_rule == d->rule);
	if (st) {
		st->cache_gen = gen;
		st->cache_dns_gen = dns_gen;
		st->cache_ruleset = d->ruleset;
		st->cache_slot = d->slot;
		st->cache_rule = d->rule;
		st->cache_allowed = d->allowed;
		st->cache_reason = d->reason;
		st->cache_managed = d->managed;
		st->cache_proto = f->proto;
		st->cache_port = f->dport;
		__builtin_memcpy(st->cache_addr, f->daddr, 16);
	}
}

static __always_inline void aus_add(struct aus_counters *c, int allowed,
				    u32 packets, u32 bytes)
{
	if (!c)
		return;
	if (allowed) {
		c->allowed_packets += packets;
		c->allowed_bytes += bytes;
	} else {
		c->denied_packets += packets;
		c->denied_bytes += bytes;
	}
}

/* Token bucket per CPU: a flood of denials cannot starve the daemon. */
static __always_inline int aus_event_allowed(const struct aus_config *cfg)
{
	u32 zero = 0;
	struct aus_bucket *b = aus_ratelimit.lookup(&zero);
	if (!b)
		return 0;
	u64 now = bpf_ktime_get_coarse_ns();   /* ms matter here, not ns */
	u64 cap = (u64)cfg->events_burst * 1000;
	u64 elapsed = now - b->last_ns;
	/* tokens_milli grows by events_per_sec per millisecond... per ms:
	 * rate/1000 tokens = rate milli-tokens. Cap elapsed to avoid overflow. */
	if (elapsed > 10000000000ULL)
		elapsed = 10000000000ULL;
	u64 tokens = b->tokens_milli + (elapsed / 1000000) * cfg->events_per_sec;
	if (tokens > cap)
		tokens = cap;
	if (elapsed >= 1000000)
		b->last_ns = now - (elapsed % 1000000);
	if (tokens < 1000) {
		b->tokens_milli = tokens;
		return 0;
	}
	b->tokens_milli = tokens - 1000;
	return 1;
}

static __always_inline void aus_stat(u32 idx)
{
	u64 *v = aus_stats.lookup(&idx);
	if (v)
		*v += 1;
}

static __always_inline void aus_emit(const struct aus_config *cfg,
				     const struct aus_decision *d,
				     const struct aus_flow *f, u8 hook,
				     u8 verdict, u32 bytes)
{
	if (!aus_event_allowed(cfg)) {
		aus_stat(AUS_STAT_EVENTS_RATE_LIMITED);
		return;
	}
	struct aus_event *ev = aus_events.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		aus_stat(AUS_STAT_EVENTS_LOST);
		return;
	}
	ev->ts_ns = bpf_ktime_get_ns();
	ev->loginuid = d->loginuid;
	ev->uid = d->uid;
	ev->pid = d->tgid;
	ev->rule = d->rule;
	ev->bytes = bytes;
	ev->verdict = verdict;
	ev->reason = d->reason;
	ev->hook = hook;
	ev->family = f->family;
	ev->proto = f->proto;
	ev->pad[0] = 0;
	ev->pad[1] = 0;
	ev->pad[2] = 0;
	ev->sport = bpf_ntohs(f->sport);
	ev->dport = bpf_ntohs(f->dport);
	__builtin_memcpy(ev->saddr, f->saddr, 16);
	__builtin_memcpy(ev->daddr, f->daddr, 16);
	__builtin_memcpy(ev->comm, d->comm, AUS_COMM_LEN);
	aus_events.ringbuf_submit(ev, 0);
	aus_stat(AUS_STAT_EVENTS_SENT);
}

/* The single exit of every decision: count it, report it, and turn it
 * into what the kernel expects. `packet` is 0 for connect()/sendmsg(),
 * whose allowed calls are counted by the packets that follow. */
static __always_inline int aus_finish(const struct aus_config *cfg,
				      const struct aus_decision *d,
				      const struct aus_flow *f, u8 hook,
				      int packet, u32 bytes)
{
	u32 slot = (u32)hook * AUS_REASON_MAX + d->reason;
	u64 *n = aus_reasons.lookup(&slot);
	if (n)
		*n += 1;

	int enforce = cfg->mode == AUS_MODE_ENFORCE;
	if (d->managed && (packet || (!d->allowed && enforce))) {
		u32 pkts = 1;
		u32 len = packet ? bytes : 0;
		u32 slot = d->slot;
		aus_add(aus_user_stats.lookup(&slot), d->allowed, pkts, len);
		u32 rule = d->rule;
		aus_add(aus_rule_stats.lookup(&rule), d->allowed, pkts, len);
	}

	u8 verdict = d->allowed ? AUS_EV_ALLOW :
		     (enforce ? AUS_EV_DENY : AUS_EV_AUDIT);
	/* Reported: every refused call, the first denied packet of a flow,
	 * and the first allowed decision of a flow (repeats hit the cache). */
	if (d->managed && (d->fresh || (!d->allowed && hook != AUS_HOOK_EGRESS)))
		aus_emit(cfg, d, f, hook, verdict, bytes);

	return verdict == AUS_EV_DENY ? AUS_DROP : AUS_PASS;
}

static __always_inline struct aus_config *aus_get_config(void)
{
	u32 zero = 0;
	return aus_config.lookup(&zero);
}

/* ---- cgroup/sock_create: stamp the creator's identity. Never denies. */
int aus_sock_create(struct bpf_sock *sk)
{
	struct aus_sock *st = aus_sock.sk_storage_get(sk, 0,
					BPF_SK_STORAGE_GET_F_CREATE);
	if (st)
		aus_stamp(st, 0);
	return AUS_PASS;
}

/* ---- DNS redirected to the forwarder. */

#define AUS_LOOPBACK4 0x7f000001   /* 127.0.0.1, host order */

/* 1 when addr:port (16-byte form, port in network order) is the
 * forwarder: 127.0.0.1 (v4-mapped) or ::1 on aus_dns_conf.port. */
static __always_inline int aus_is_forwarder(const u8 addr[16], u16 port,
					    const struct aus_dns_conf *dc)
{
	const u32 *a = (const u32 *)addr;
	if (a[0] != 0 || a[1] != 0)
		return 0;
	if (!((a[2] == bpf_htonl(0xffff) && a[3] == bpf_htonl(AUS_LOOPBACK4)) ||
	      (a[2] == 0 && a[3] == bpf_htonl(1))))
		return 0;
	return dc && dc->port && port == bpf_htons(dc->port);
}

/* Send an allowed DNS flow of a managed user to the forwarder, when it
 * listens: 127.0.0.1 for an IPv4 (or v4-mapped) resolver, ::1 for an IPv6
 * one, in the socket's own namespace. The socket keeps the resolver. */
static __always_inline void aus_redirect(struct bpf_sock_addr *ctx,
					 struct aus_sock *st,
					 const struct aus_flow *f,
					 u16 port, int v6)
{
	struct bpf_sock_tuple t = {};
	u32 len;
	if (f->family == 4) {
		t.ipv4.saddr = bpf_htonl(AUS_LOOPBACK4);
		t.ipv4.daddr = bpf_htonl(AUS_LOOPBACK4);
		t.ipv4.dport = bpf_htons(port);
		len = sizeof(t.ipv4);
	} else {
		t.ipv6.saddr[3] = bpf_htonl(1);
		t.ipv6.daddr[3] = bpf_htonl(1);
		t.ipv6.dport = bpf_htons(port);
		len = sizeof(t.ipv6);
	}
	struct bpf_sock *fwd;
	if (f->proto == IPPROTO_TCP)
		fwd = bpf_sk_lookup_tcp(ctx, &t, len, BPF_F_CURRENT_NETNS, 0);
	else
		fwd = bpf_sk_lookup_udp(ctx, &t, len, BPF_F_CURRENT_NETNS, 0);
	if (!fwd)
		return;   /* not listening: DNS goes where it was sent */
	bpf_sk_release(fwd);

	st->dns_family = f->family;
	__builtin_memcpy(st->dns_addr, f->daddr, 16);
	st->dns_port = f->dport;
	if (v6) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		if (f->family == 4) {
			ctx->user_ip6[2] = bpf_htonl(0xffff);
			ctx->user_ip6[3] = bpf_htonl(AUS_LOOPBACK4);
		} else {
			ctx->user_ip6[2] = 0;
			ctx->user_ip6[3] = bpf_htonl(1);
		}
	} else {
		ctx->user_ip4 = bpf_htonl(AUS_LOOPBACK4);
	}
	ctx->user_port = bpf_htons(port);
}

/* ---- cgroup/recvmsg4, recvmsg6, getpeername4, getpeername6: a
 * redirected socket sees the resolver it chose where the forwarder is
 * (resolvers drop answers "not from the server"). Never denies. */
static __always_inline int aus_restore(struct bpf_sock_addr *ctx, int v6)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return AUS_PASS;
	struct aus_sock *st = aus_sock.sk_storage_get(sk, 0, 0);
	if (!st || !st->dns_family)
		return AUS_PASS;
	u8 peer[16];
	if (v6) {
		u32 a[4];
		a[0] = ctx->user_ip6[0];
		a[1] = ctx->user_ip6[1];
		a[2] = ctx->user_ip6[2];
		a[3] = ctx->user_ip6[3];
		__builtin_memcpy(peer, a, 16);
	} else {
		aus_v4_mapped(peer, ctx->user_ip4);
	}
	if (!aus_is_forwarder(peer, (u16)ctx->user_port, aus_get_dns_conf()))
		return AUS_PASS;
	const u32 *r = (const u32 *)st->dns_addr;
	if (v6) {
		ctx->user_ip6[0] = r[0];
		ctx->user_ip6[1] = r[1];
		ctx->user_ip6[2] = r[2];
		ctx->user_ip6[3] = r[3];
	} else {
		ctx->user_ip4 = r[3];
	}
	ctx->user_port = st->dns_port;
	return AUS_PASS;
}

int aus_recvmsg4(struct bpf_sock_addr *ctx)
{
	return aus_restore(ctx, 0);
}

int aus_recvmsg6(struct bpf_sock_addr *ctx)
{
	return aus_restore(ctx, 1);
}

int aus_getpeername4(struct bpf_sock_addr *ctx)
{
	return aus_restore(ctx, 0);
}

int aus_getpeername6(struct bpf_sock_addr *ctx)
{
	return aus_restore(ctx, 1);
}

/* ---- cgroup/connect4, connect6, sendmsg4, sendmsg6. */
static __always_inline int aus_sock_addr(struct bpf_sock_addr *ctx, u8 hook,
					 int v6)
{
	struct aus_config *cfg = aus_get_config();
	if (!cfg)
		return AUS_PASS;

	struct aus_flow f = {};
	f.family = v6 ? 6 : 4;
	f.proto = ctx->protocol;
	if (f.proto == IPPROTO_TCP || f.proto == IPPROTO_UDP)
		f.dport = (u16)ctx->user_port;
	if (v6) {
		u32 a[4];
		a[0] = ctx->user_ip6[0];
		a[1] = ctx->user_ip6[1];
		a[2] = ctx->user_ip6[2];
		a[3] = ctx->user_ip6[3];
		/* A v4-mapped destination is judged as the IPv4 one. */
		__builtin_memcpy(f.daddr, a, 16);
		if (a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff))
			f.family = 4;
	} else {
		aus_v4_mapped(f.daddr, ctx->user_ip4);
	}

	struct aus_decision d = {};
	struct bpf_sock *sk = ctx->sk;
	struct aus_sock *st = 0;
	if (sk) {
		st = aus_sock.sk_storage_get(sk, 0, 0);
		if (!st) {
			/* The socket predates us: the caller is its user now. */
			st = aus_sock.sk_storage_get(sk, 0,
					BPF_SK_STORAGE_GET_F_CREATE);
			if (st)
				aus_stamp(st, AUS_SOCK_LATE);
		}
	}
	int is_connect = hook == AUS_HOOK_CONNECT4 || hook == AUS_HOOK_CONNECT6;
	if (is_connect && st)
		st->dns_family = 0;   /* a new peer: redirected anew or not at all */
	/* DNS may go to the forwarder: decided here, once per connect() or
	 * datagram, in the forwarder's namespace only. */
	struct aus_dns_conf *dc = 0;
	if ((f.proto == IPPROTO_TCP || f.proto == IPPROTO_UDP) &&
	    f.dport == bpf_htons(AUS_DNS_PORT)) {
		dc = aus_get_dns_conf();
		if (dc && (!dc->port || bpf_get_netns_cookie(ctx) != dc->netns_cookie))
			dc = 0;
	}
	if (is_connect && f.proto != IPPROTO_TCP && !dc) {
		/* connect() on a UDP or ICMP socket sends nothing (ping and
		 * getaddrinfo() use it to pick a source address); the datagrams
		 * are judged when they leave, by the egress program. Connected
		 * DNS is judged here: whether it is redirected is decided once. */
		return AUS_PASS;
	}
	if (st) {
		aus_identity_from(&d, st);
		if (is_connect)
			st->flags |= AUS_SOCK_OUTBOUND;
	} else {
		d.loginuid = aus_current_loginuid();
		d.uid = (u32)bpf_get_current_uid_gid();
		d.tgid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(d.comm, sizeof(d.comm));
	}

	aus_judge(&d, cfg, st, &f);
	int verdict = aus_finish(cfg, &d, &f, hook, 0, 0);
	/* Only what the rules allow: a denied resolver is never redirected. */
	if (dc && st && d.managed && d.allowed)
		aus_redirect(ctx, st, &f, dc->port, v6);
	return verdict;
}

int aus_connect4(struct bpf_sock_addr *ctx)
{
	return aus_sock_addr(ctx, AUS_HOOK_CONNECT4, 0);
}

int aus_connect6(struct bpf_sock_addr *ctx)
{
	return aus_sock_addr(ctx, AUS_HOOK_CONNECT6, 1);
}

int aus_sendmsg4(struct bpf_sock_addr *ctx)
{
	return aus_sock_addr(ctx, AUS_HOOK_SENDMSG4, 0);
}

int aus_sendmsg6(struct bpf_sock_addr *ctx)
{
	return aus_sock_addr(ctx, AUS_HOOK_SENDMSG6, 1);
}

/* ---- cgroup_skb/egress: the per-packet backstop, IPv4 and IPv6. */

/* What aus_parse found besides the flow. */
#define AUS_PKT_ROUTED 0x1   /* a source route, or headers that cannot be
			      * walked: the destination is not where the
			      * packet goes */

#define AUS_IPOPT_END  0
#define AUS_IPOPT_NOOP 1
#define AUS_IPOPT_LSRR 0x83
#define AUS_IPOPT_SSRR 0x89
#define AUS_IPV4_OPTS_MAX 40

/* The walks below must leave the verifier one path per step: a branch per
 * header kind would multiply the paths at every step (k^n states). So
 * their choices are arithmetic: AUS_IS() is 1 when a byte equals v, else
 * 0, and the barrier keeps clang from turning it back into a branch. */
#define AUS_IS(x, v) (((((u32)(x)) ^ (u32)(v)) - 1) >> 31)
#define AUS_OPAQUE(x) asm volatile("" : "+r"(x))

/* IPv4 options: 1 when they carry a loose or strict source route, or are
 * malformed (a length that overruns them). Bytes after an END option are
 * walked too: padding is zeros, and anything else there is refused as if
 * it counted. */
static __always_inline int aus_ip4_routed(struct __sk_buff *skb, u32 optlen)
{
	if (optlen > AUS_IPV4_OPTS_MAX)
		return 1;
	u32 i = 0;
	for (int n = 0; n < AUS_IPV4_OPTS_MAX; n++) {
		if (i >= optlen)
			return 0;
		u8 opt[2] = {};
		/* Two bytes always exist: a transport header follows. */
		if (bpf_skb_load_bytes(skb, sizeof(struct iphdr) + (i & 63),
				       opt, 2) < 0)
			return 1;
		u32 type = opt[0], olen = opt[1];
		u32 single = AUS_IS(type, AUS_IPOPT_END) | AUS_IS(type, AUS_IPOPT_NOOP);
		u32 routed = AUS_IS(type, AUS_IPOPT_LSRR) | AUS_IS(type, AUS_IPOPT_SSRR);
		AUS_OPAQUE(single);
		AUS_OPAQUE(routed);
		/* END and NOOP are one byte; any other option gives its length. */
		u32 len = olen ^ ((olen ^ 1) & -single);
		AUS_OPAQUE(len);
		if (routed || len < 2 - single || i + len > optlen)
			return 1;
		i += len;
	}
	return i < optlen;
}

#define AUS_NEXTHDR_HOP      0
#define AUS_NEXTHDR_ROUTING  43
#define AUS_NEXTHDR_FRAGMENT 44
#define AUS_NEXTHDR_AUTH     51
#define AUS_NEXTHDR_DEST     60
#define AUS_NEXTHDR_MOBILITY 135
#define AUS_IPV6_EXT_MAX     8

/* Walk the IPv6 extension headers from `*l4` on, leaving the upper-layer
 * protocol in f->proto and its offset in *l4. A routing header (of any
 * type), a chain longer than AUS_IPV6_EXT_MAX (a routing header could hide
 * past it) or a header that cannot be read marks the packet routed. */
static __always_inline int aus_ip6_walk(struct __sk_buff *skb,
					struct aus_flow *f, u32 *l4,
					int *fragment)
{
	u32 next = f->proto;
	u32 off = *l4;
	u32 frag_bits = 0;
	for (int n = 0; n <= AUS_IPV6_EXT_MAX; n++) {
		u32 frag = AUS_IS(next, AUS_NEXTHDR_FRAGMENT);
		u32 auth = AUS_IS(next, AUS_NEXTHDR_AUTH);
		u32 ext = AUS_IS(next, AUS_NEXTHDR_HOP) | AUS_IS(next, AUS_NEXTHDR_DEST) |
			  AUS_IS(next, AUS_NEXTHDR_MOBILITY) | frag | auth;
		u32 routing = AUS_IS(next, AUS_NEXTHDR_ROUTING);
		AUS_OPAQUE(frag);
		AUS_OPAQUE(auth);
		AUS_OPAQUE(ext);
		AUS_OPAQUE(routing);
		if (routing)
			return AUS_PKT_ROUTED;
		if (!ext) {
			f->proto = next;
			*l4 = off;
			*fragment = frag_bits != 0;
			return 0;
		}
		if (n == AUS_IPV6_EXT_MAX)
			return AUS_PKT_ROUTED;
		u8 h[4];
		if (bpf_skb_load_bytes(skb, off & 0xffff, h, 4) < 0)
			return AUS_PKT_ROUTED;
		u32 hlen = h[1];
		/* Fragment: 8 bytes, its offset in the upper 13 bits of bytes
		 * 2-3; AH: (len + 2) * 4; the others: (len + 1) * 8. */
		u32 len = ((hlen + 1) << 3) & -(1 - frag - auth);
		len |= 8 & -frag;
		len |= ((hlen + 2) << 2) & -auth;
		AUS_OPAQUE(len);
		frag_bits |= (((u32)h[2] << 8) | h[3]) & 0xfff8 & -frag;
		off += len;
		next = h[0];
	}
	return AUS_PKT_ROUTED;
}

/* Read the headers in place when they are in the linear part of the
 * packet (nearly always on egress), else copy them out. Returns -1 when
 * the packet is not IP, else AUS_PKT_* flags. */
static __always_inline int aus_parse(struct __sk_buff *skb,
				     struct aus_flow *f, u8 *tcp_flags)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	u32 l4 = 0;
	int fragment = 0;
	int pkt = 0;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr copy, *ip = data;
		if ((void *)(ip + 1) > end) {
			if (bpf_skb_load_bytes(skb, 0, &copy, sizeof(copy)) < 0)
				return -1;
			ip = &copy;
		}
		f->family = 4;
		f->proto = ip->protocol;
		aus_v4_mapped(f->saddr, ip->saddr);
		aus_v4_mapped(f->daddr, ip->daddr);
		l4 = (u32)ip->ihl * 4;
		fragment = (ip->frag_off & bpf_htons(0x1fff)) != 0;
		/* Options are copied into every fragment that needs them,
		 * source routes included: checked on all of them. */
		if (l4 < sizeof(struct iphdr) ||
		    aus_ip4_routed(skb, l4 - sizeof(struct iphdr)))
			return AUS_PKT_ROUTED;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr copy, *ip6 = data;
		if ((void *)(ip6 + 1) > end) {
			if (bpf_skb_load_bytes(skb, 0, &copy, sizeof(copy)) < 0)
				return -1;
			ip6 = &copy;
		}
		f->family = 6;
		f->proto = ip6->nexthdr;
		__builtin_memcpy(f->saddr, &ip6->saddr, 16);
		__builtin_memcpy(f->daddr, &ip6->daddr, 16);
		l4 = sizeof(*ip6);
		pkt = aus_ip6_walk(skb, f, &l4, &fragment);
		if (pkt)
			return pkt;
	} else {
		return -1;
	}

	if (fragment || (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP))
		return pkt;
	/* Ports, and for TCP the flags byte: the first 14 bytes, in place
	 * behind a fixed-size network header, else copied out. */
	u8 copy4[14], *th = data;
	u32 need = f->proto == IPPROTO_TCP ? 14 : 4;
	if (l4 <= 60 && f->family == 4)
		th = data + l4;
	else if (l4 == sizeof(struct ipv6hdr))
		th = data + sizeof(struct ipv6hdr);
	if (th == data || (void *)(th + 14) > end) {
		if (bpf_skb_load_bytes(skb, l4 & 0xffff, copy4, need == 14 ? 14 : 4) < 0)
			return pkt;
		th = copy4;
	}
	__builtin_memcpy(&f->sport, &th[0], 2);
	__builtin_memcpy(&f->dport, &th[2], 2);
	if (need == 14)
		*tcp_flags = th[13];
	return pkt;
}

/* 1 when the packet's network header is the plain one the socket fast
 * path may skip: IPv4 without options, IPv6 with TCP right after it.
 * Anything else is parsed, so a source route is seen. */
static __always_inline int aus_plain_tcp_header(struct __sk_buff *skb)
{
	u8 *data = (u8 *)(long)skb->data;
	u8 *end = (u8 *)(long)skb->data_end;
	if (data + 8 > end)
		return 0;
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return data[0] == 0x45;
	return skb->protocol == bpf_htons(ETH_P_IPV6) && data[6] == IPPROTO_TCP;
}

/* The flow of a connected TCP socket, from the socket itself. A macro,
 * not a function: bcc rewrites field reads through a pointer passed to a
 * function into probe reads, which the verifier refuses on a socket. */
#define AUS_FLOW_OF_SOCK(sk, f, ok)						\
	do {									\
		u32 fam_ = (sk)->family;					\
		u32 dport_ = (sk)->dst_port;					\
		u32 sport_ = (sk)->src_port;					\
		(f)->proto = IPPROTO_TCP;					\
		(f)->dport = (u16)dport_;					\
		(f)->sport = bpf_htons((u16)sport_);				\
		(ok) = 1;							\
		if (fam_ == AF_INET) {						\
			u32 d4_ = (sk)->dst_ip4, s4_ = (sk)->src_ip4;		\
			(f)->family = 4;					\
			aus_v4_mapped((f)->daddr, d4_);				\
			aus_v4_mapped((f)->saddr, s4_);				\
		} else if (fam_ == AF_INET6) {					\
			u32 a_[4], b_[4];					\
			a_[0] = (sk)->dst_ip6[0]; a_[1] = (sk)->dst_ip6[1];	\
			a_[2] = (sk)->dst_ip6[2]; a_[3] = (sk)->dst_ip6[3];	\
			b_[0] = (sk)->src_ip6[0]; b_[1] = (sk)->src_ip6[1];	\
			b_[2] = (sk)->src_ip6[2]; b_[3] = (sk)->src_ip6[3];	\
			__builtin_memcpy((f)->daddr, a_, 16);			\
			__builtin_memcpy((f)->saddr, b_, 16);			\
			(f)->family = (a_[0] == 0 && a_[1] == 0 &&		\
				       a_[2] == bpf_htonl(0xffff)) ? 4 : 6;	\
		} else {							\
			(ok) = 0;						\
		}								\
	} while (0)

/* A packet to the forwarder: one of a redirected socket is judged as going
 * to the resolver its application chose (f is changed to it; returns 1);
 * any other one returns -1, and 0 is a packet to somewhere else. */
static __always_inline int aus_dns_translate(const struct aus_sock *st,
					     struct aus_flow *f)
{
	const u32 *a = (const u32 *)f->daddr;
	/* Cheap first: most packets are not to a loopback address. */
	if (a[0] != 0 || a[1] != 0 || f->dport == 0)
		return 0;
	if (!aus_is_forwarder(f->daddr, f->dport, aus_get_dns_conf()))
		return 0;
	if (!st || !st->dns_family)
		return -1;
	f->family = st->dns_family;
	__builtin_memcpy(f->daddr, st->dns_addr, 16);
	f->dport = st->dns_port;
	return 1;
}

/* Tell the forwarder whose query this is and where it was going, before
 * the packet reaches it; a packet that reaches it without having been
 * redirected removes what an earlier socket on the same port left. */
static __always_inline void aus_dns_record(int dns,
					   const struct aus_decision *d,
					   const struct aus_flow *f, int verdict)
{
	if (!dns)
		return;
	struct aus_dns_client k = {};
	__builtin_memcpy(k.addr, f->saddr, 16);
	k.port = bpf_ntohs(f->sport);
	k.proto = f->proto;
	if (dns < 0 || verdict != AUS_PASS) {
		aus_dns_origin.delete(&k);
		return;
	}
	struct aus_dns_origin o = {
		.loginuid = d->loginuid,
		.port = bpf_ntohs(f->dport),
		.family = f->family,
	};
	__builtin_memcpy(o.addr, f->daddr, 16);
	aus_dns_origin.update(&k, &o);
}

#define AUS_TCP_SYN 0x02
#define AUS_TCP_ACK 0x10

#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif

int aus_egress(struct __sk_buff *skb)
{
	struct aus_config *cfg = aus_get_config();
	if (!cfg)
		return AUS_PASS;

	struct aus_flow f = {};
	struct aus_decision d = {};
	u8 tcp_flags = 0;
	u32 len = skb->len;

	struct bpf_sock *sk = skb->sk;
	if (sk)
		sk = bpf_sk_fullsock(sk);
	struct aus_sock *st = sk ? aus_sock.sk_storage_get(sk, 0, 0) : 0;
	/* Only the kernel's TCP builds a stream socket's headers from the
	 * socket; a raw socket writes its own, so each of its packets is
	 * judged by what it carries. */
	int stream = 0;
	if (sk)
		stream = sk->type == SOCK_STREAM && sk->protocol == IPPROTO_TCP;

	/* Fast path: a TCP connection whose connect() was judged has its
	 * destination in the socket; no need to parse a plain packet. */
	int from_sock = 0;
	if (st && stream && (st->flags & AUS_SOCK_OUTBOUND) &&
	    aus_plain_tcp_header(skb))
		AUS_FLOW_OF_SOCK(sk, &f, from_sock);
	if (from_sock) {
		aus_identity_from(&d, st);
		int dns = aus_dns_translate(st, &f);
		aus_judge(&d, cfg, st, &f);
		int verdict = aus_finish(cfg, &d, &f, AUS_HOOK_EGRESS, 1, len);
		aus_dns_record(dns, &d, &f, verdict);
		return verdict;
	}

	int pkt = aus_parse(skb, &f, &tcp_flags);
	if (pkt < 0) {
		d.reason = AUS_REASON_NOT_IP;
		d.allowed = 1;
		return aus_finish(cfg, &d, &f, AUS_HOOK_EGRESS, 1, len);
	}
	if (!sk) {
		d.reason = AUS_REASON_NO_SOCKET;
		d.allowed = 1;
		return aus_finish(cfg, &d, &f, AUS_HOOK_EGRESS, 1, len);
	}

	if (st) {
		aus_identity_from(&d, st);
	} else {
		/* The socket predates us: fall back to its owner's UID. */
		d.loginuid = bpf_get_socket_uid(skb);
		d.uid = d.loginuid;
		d.by_owner = 1;
	}

	if (pkt & AUS_PKT_ROUTED) {
		/* Where the packet goes is not its destination: a managed
		 * user's is dropped, whatever the rules or the connection. */
		aus_lookup(&d, cfg, &f);
		if (d.managed) {
			d.allowed = 0;
			d.reason = AUS_REASON_SOURCE_ROUTE;
			d.rule = AUS_RULE_NONE;
			d.fresh = 1;
		}
		return aus_finish(cfg, &d, &f, AUS_HOOK_EGRESS, 1, len);
	}

	if (st && stream && f.proto == IPPROTO_TCP &&
	    !(st->flags & AUS_SOCK_OUTBOUND)) {
		/* A bare SYN opens an outbound connection, even one that
		 * never passed connect() (TCP fast open). Any other segment
		 * of a TCP socket that never connected belongs to a
		 * connection it accepted. */
		if ((tcp_flags & (AUS_TCP_SYN | AUS_TCP_ACK)) == AUS_TCP_SYN) {
			st->flags |= AUS_SOCK_OUTBOUND;
		} else {
			d.reason = AUS_REASON_INBOUND;
			d.allowed = 1;
			return aus_finish(cfg, &d, &f, AUS_HOOK_EGRESS, 1, len);
		}
	}

	int dns = aus_dns_translate(st, &f);
	aus_judge(&d, cfg, st, &f);
	int verdict = aus_finish(cfg, &d, &f, AUS_HOOK_EGRESS, 1, len);
	aus_dns_record(dns, &d, &f, verdict);
	return verdict;
}
