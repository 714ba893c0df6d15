"""What each login UID on the host gets, in words, for ausd's log.

At start and at each policy reload ausd logs one line per login UID that
has processes (or an open session) now, so that an operator sees before
switching to enforce whether their own login UID (``sudo`` keeps it) is
managed and what it would be allowed::

    login UID 1000 (alice): managed, groups DEV,OPS, 3 rules (dns, dev-web, ops-admin)
    login UID 1001 (bob): managed, no policy group, baseline only
    login UID 0 (root): not managed (unmanaged_login_uids): never filtered

Plain data in, lines out; the daemon hands over what it computed the
users' rules with, so nothing here asks the directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .flowrecords import policy_groups
from .report import Identity

MAX_LINES = 50        # a terminal server's thousands of users: the first ones
MAX_RULE_NAMES = 5    # past it, a count only


def _name(name: str | None) -> str:
    return name if name is not None else "unknown to NSS"


def _rules(names: list[str]) -> str:
    if not names:
        return "baseline only"
    count = f"{len(names)} rule{'s' if len(names) != 1 else ''}"
    if len(names) > MAX_RULE_NAMES:
        return count
    return f"{count} ({', '.join(names)})"


def managed_line(uid: int, ident: Identity, declared: Iterable[tuple[str, str | None]],
                 rule_names: Mapping[int, str]) -> str:
    info, extra, rule_ids = ident
    groups = policy_groups(declared, info.groups + extra, info.sids)
    said = f"groups {','.join(groups)}" if groups else "no policy group"
    names = [rule_names[r] for r in sorted(rule_ids) if r in rule_names]
    line = f"login UID {uid} ({_name(info.name)}): managed, {said}, {_rules(names)}"
    if info.stale:
        line += f" (last known groups kept: {info.stale})"
    elif info.partial:
        line += " (the directory answered in part)"
    return line


def lines(processes: Mapping[int, int], unmanaged: Iterable[int],
          identities: Mapping[int, Identity], unmanaged_names: Mapping[int, str | None],
          declared: Iterable[tuple[str, str | None]], rule_names: Mapping[int, str],
          mode: str) -> list[str]:
    """The report: a header naming the mode, then one line per login UID
    that has processes or rules now, by UID. ``declared`` is the policy's
    user groups as (name, SID); ``rule_names`` maps rule IDs to names."""
    unmanaged = set(unmanaged)
    declared = list(declared)
    uids = sorted({u for u, n in processes.items() if n > 0} | set(identities))
    effect = ("traffic no rule allows is denied" if mode == "enforce" else
              "nothing is blocked; what would be denied is reported")
    out = [f"login UIDs with processes now: {len(uids)} (mode {mode}: {effect})"]
    for uid in uids[:MAX_LINES]:
        if uid in unmanaged:
            out.append(f"login UID {uid} ({_name(unmanaged_names.get(uid))}): not managed "
                       "(unmanaged_login_uids): never filtered")
        elif uid in identities:
            out.append(managed_line(uid, identities[uid], declared, rule_names))
        else:   # no rules computed (yet): the kernel has no entry, the baseline applies
            out.append(f"login UID {uid}: managed, baseline only (not looked up yet)")
    if len(uids) > MAX_LINES:
        out.append(f"... and {len(uids) - MAX_LINES} more login UIDs (ausctl users lists "
                   "the managed ones)")
    return out
