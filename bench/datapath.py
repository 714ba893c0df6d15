"""Data-path benchmark: what enforcement costs a managed user's traffic.

Every configuration gets its own network namespace (destination on its
loopback, so nftables rules stay inside it) and its own cgroup (so aus
programs judge only its clients). Configurations:

* ``none``: no filter;
* ``aus NxM``: the real programs and maps, filled by the real compiler and
  planner for N users with M rules each, every user with rules of its own
  (N*M distinct destinations), the measured user among them and its
  allowed rule the last one compiled;
* ``aus-dns NxM``: the same, but the measured user reaches the destination
  through a DNS-derived entry (aus_dns, as the forwarder writes it after an
  answer) instead of an address rule: every connection misses the user's
  ruleset and is allowed by the DNS lookup behind it;
* ``nft-linear NxM``: one ``meta skuid`` rule per (user, rule, service),
  the measured user's last, then a drop per managed user;
* ``nft-set NxM``: what an nftables expert writes: conntrack for
  established flows, the managed users in a set, one lookup in an interval
  set keyed by uid . protocol . address . port, reject otherwise.

Rounds interleave the baseline with every configuration (A B A C A ...),
and every figure is a ratio to the baseline measured just before it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path

from aus.agent import dnsmaps, loader, mapsync, pins
from aus.agent.config import DaemonConfig
from aus.core import compiler, state
from aus.core import contract as C
from tests.support.names import unique

from . import common

DEST = "198.18.0.1"
PORT_TCP, PORT_UDP, PORT_BULK = 80, 53, 5001
PORT_TCP_DENIED, PORT_UDP_DENIED = 81, 54
UID_BASE = 60000

WORKLOADS = [
    # (name, client mode, port, unit)
    ("connect allowed", "connect", PORT_TCP, "conn/s"),
    ("connect denied", "connect", PORT_TCP_DENIED, "conn/s"),
    ("udp allowed", "udp", PORT_UDP, "dgram/s"),
    ("udp denied", "udp", PORT_UDP_DENIED, "dgram/s"),
    ("bulk tcp", "bulk", PORT_BULK, "bytes/s"),
]


@dataclass
class Config:
    kind: str            # none | aus | nft-linear | nft-set
    users: int = 0
    rules: int = 0
    ns: str = ""
    cg: Path | None = None
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kind if self.kind == "none" else f"{self.kind} {self.users}x{self.rules}"

    @property
    def uid(self) -> int:
        """The measured user: the last of the N."""
        return UID_BASE + max(self.users, 1) - 1


def rule_dest(n: int) -> str:
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def measured_services() -> list[str]:
    return [f"{PORT_TCP}/tcp", f"{PORT_UDP}/udp", f"{PORT_BULK}/tcp"]


def grants_of(users: int, rules: int, by_name: bool = False):
    """(uid, [(rule id, destination, [services])]) for every user; with
    ``by_name`` the measured rule's destination is not DEST (a DNS entry
    gives DEST)."""
    for i in range(users):
        out = []
        for j in range(rules):
            rid = C.RULE_BASELINE + 1 + i * rules + j
            last = i == users - 1 and j == rules - 1
            dest = DEST if last and not by_name else rule_dest(i * rules + j)
            out.append((rid, dest, measured_services() if last else [f"{PORT_TCP}/tcp"]))
        yield UID_BASE + i, out


# ---- aus ------------------------------------------------------------------

def setup_aus(cfg: Config, pin_dir: Path) -> loader.Loaded:
    """Load the programs for this cgroup and fill the maps through the
    compiler and planner, exactly as ausd does."""
    from aus.core.policy import parse_service

    total = cfg.users * cfg.rules
    dcfg = DaemonConfig(cgroup=cfg.cg, pin_dir=pin_dir, baseline=["127.0.0.0/8"],
                        max_users=max(1024, 2 * cfg.users),
                        max_destinations=max(1024, 2 * total + 16),
                        max_services=max(1024, 2 * total + 16), max_rules=total + 16)
    offset = loader.probe(dcfg)
    loaded = loader.compile_and_load(dcfg, offset)
    rules, users = [], {}
    by_name = cfg.kind == "aus-dns"
    named: compiler.Portset = frozenset()
    for uid, grants in grants_of(cfg.users, cfg.rules, by_name):
        ids = []
        for rid, dest, services in grants:
            entries = tuple(e for s in services for e in compiler.service_entries(parse_service(s), rid))
            grant = compiler.Grant(ipaddress.ip_network(dest), entries)
            rules.append(compiler.CompiledRule(rid, f"r{rid}", (f"g{uid}",), (grant,)))
            ids.append(rid)
        users[uid] = frozenset(ids)
    if by_name:
        # the measured rule's services, as a DNS grant carries them
        last = max(users[cfg.uid])
        named = compiler.union_portset([frozenset(
            e for s in measured_services() for e in compiler.service_entries(parse_service(s), last))])
    cp = compiler.CompiledPolicy(tuple(rules), tuple(dcfg.baseline_networks), version=1)
    desired = state.Desired(
        users={uid: cp.ruleset(ids) for uid, ids in users.items()},
        baseline=cp.baseline_ruleset(), rules=cp.rule_names, mode=C.MODE_ENFORCE,
        events_per_sec=dcfg.events_per_second, events_burst=dcfg.events_burst,
        policy_version=1, dns_portsets=frozenset([named]) if by_name else frozenset())
    p, new = state.plan(mapsync.read_state(loaded.maps), desired)
    mapsync.apply(p, loaded.maps)
    if by_name:
        # What the forwarder writes after an answer naming DEST, valid for
        # the whole run.
        dnsmaps.DnsMaps(loaded.maps).put({dnsmaps.DnsKey(cfg.uid, 4, C.addr16(
            ipaddress.ip_address(DEST))): dnsmaps.DnsValue(
                time.monotonic_ns() + 3600 * 10**9, new.portset_index()[named], last)})
    loader.attach(loaded, cfg.cg)
    cfg.info = {"rulesets": len(new.rulesets), "destinations": len(p.dst_put),
                "services": len(p.svc_put)}
    return loaded


# ---- nftables ---------------------------------------------------------------

def nft_linear(cfg: Config) -> str:
    lines = ["table inet ausbench {", " chain out {",
             "  type filter hook output priority 0; policy accept;",
             "  ip daddr 127.0.0.0/8 accept"]
    uids = []
    for uid, grants in grants_of(cfg.users, cfg.rules):
        uids.append(uid)
        for _rid, dest, services in grants:
            for s in services:
                port, proto = s.split("/")
                lines.append(f"  meta skuid {uid} ip daddr {dest} {proto} dport {port} accept")
    for uid in uids:
        lines.append(f"  meta skuid {uid} meta l4proto tcp reject with tcp reset")
        lines.append(f"  meta skuid {uid} drop")
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def nft_set(cfg: Config) -> str:
    elements = []
    uids = []
    for uid, grants in grants_of(cfg.users, cfg.rules):
        uids.append(str(uid))
        for _rid, dest, services in grants:
            for s in services:
                port, proto = s.split("/")
                elements.append(f"{uid} . {proto} . {dest} . {port}")
    return (
        "table inet ausbench {\n"
        f" set managed {{ type uid; elements = {{ {', '.join(uids)} }} }}\n"
        " set allow { type uid . inet_proto . ipv4_addr . inet_service; flags interval;\n"
        f"  elements = {{ {', '.join(elements)} }} }}\n"
        " chain out {\n"
        "  type filter hook output priority 0; policy accept;\n"
        "  ct state established,related accept\n"
        "  ip daddr 127.0.0.0/8 accept\n"
        "  meta skuid != @managed accept\n"
        "  meta skuid . meta l4proto . ip daddr . th dport @allow accept\n"
        "  meta l4proto tcp reject with tcp reset\n"
        "  drop\n"
        " }\n}\n")


def setup_nft(cfg: Config, workdir: Path) -> None:
    text = nft_linear(cfg) if cfg.kind == "nft-linear" else nft_set(cfg)
    path = workdir / f"{cfg.ns}.nft"
    path.write_text(text)
    common.run("nft", "-f", str(path), preexec_fn=common.enter(ns=cfg.ns))
    cfg.info = {"nft_rules": text.count("\n")}


# ---- the run ----------------------------------------------------------------

def default_configs(sizes_users, sizes_rules, linear_max: int) -> list[Config]:
    configs = [Config("none")]
    for n in sizes_users:
        for m in sizes_rules:
            configs.append(Config("aus", n, m))
    for n in sizes_users:
        for m in sizes_rules:
            configs.append(Config("nft-set", n, m))
    for n in sizes_users:
        for m in sizes_rules:
            if n * m <= linear_max:
                configs.append(Config("nft-linear", n, m))
    return configs


def run(configs: list[Config], *, rounds: int, seconds: float, workdir: Path,
        log=print, workloads=WORKLOADS) -> dict:
    """Set everything up, measure, tear everything down; the raw figures.
    ``workloads``: the rows of WORKLOADS to measure (all by default)."""
    binary = common.build_workload(workdir / "build")
    results: dict = {"rounds": rounds, "seconds": seconds, "configs": [],
                     "samples": {}, "baseline_pairs": {}}
    with contextlib.ExitStack() as stack:
        for cfg in configs:
            cfg.ns = stack.enter_context(common.netns(DEST))
            cfg.cg = stack.enter_context(common.cgroup())
            stack.enter_context(common.server(binary, cfg.ns, DEST, cpu=0))
            if cfg.kind in ("aus", "aus-dns"):
                pin_dir = Path("/sys/fs/bpf") / unique("aus-bench-")
                stack.callback(pins.uninstall, pin_dir)
                log(f"setting up {cfg.name} ...")
                loaded = setup_aus(cfg, pin_dir)
                stack.callback(loaded.close)
            elif cfg.kind.startswith("nft"):
                log(f"setting up {cfg.name} ...")
                setup_nft(cfg, workdir)
            results["configs"].append({"name": cfg.name, **cfg.info})
        base = configs[0]
        assert base.kind == "none"
        for r in range(rounds):
            log(f"round {r + 1}/{rounds}")
            for wname, mode, port, _unit in workloads:
                prev_base = None
                for cfg in configs[1:]:
                    b = common.client(binary, mode, base.ns, base.cg, base.uid, DEST, port,
                                      seconds, cpu=1)
                    c = common.client(binary, mode, cfg.ns, cfg.cg, cfg.uid, DEST, port,
                                      seconds, cpu=1)
                    results["samples"].setdefault(wname, {}).setdefault(cfg.name, []).append(
                        {"rate": c["rate"], "base": b["rate"], "ok": c["ok"], "fail": c["fail"]})
                    results["samples"][wname].setdefault("none", []).append(
                        {"rate": b["rate"], "base": b["rate"], "ok": b["ok"], "fail": b["fail"]})
                    if prev_base is not None:
                        results["baseline_pairs"].setdefault(wname, []).append(b["rate"] / prev_base)
                    prev_base = b["rate"]
    return results
