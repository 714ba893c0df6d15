#!/bin/bash
# Set up everything (scripts/setup.sh) and run ausd in the foreground with
# the shipped example policy, in VISIBILITY mode only: it attaches to this
# machine's cgroup2 root (every process on the host), so nothing may be
# blocked. What enforcement would deny is reported (`ausctl flows`), and
# ausd logs what each logged-in user would get. Ctrl-C stops the daemon;
# the programs stay attached, still in visibility mode; remove them with
#   .venv/bin/ausctl --config /etc/aus/ausd.yaml uninstall --yes
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "run-example.sh: ausd needs root; run it as root (or prefix it with sudo)" >&2
    exit 2
fi
bash scripts/setup.sh
CONFIG=/etc/aus/ausd.yaml
mkdir -p /etc/aus
[ -e /etc/aus/policy.yaml ] || cp packaging/policy.example.yaml /etc/aus/policy.yaml
[ -e "$CONFIG" ] || cp packaging/ausd.yaml "$CONFIG"

# The mode ausd would apply must be visibility, set in the file: a file
# without `mode:` enforces (or takes the policy server's mode), and enforcing
# on the cgroup2 root limits the operator's own login UID too (sudo keeps it).
if ! cgroup=$(.venv/bin/python - "$CONFIG" <<'PY'
import sys
from aus.agent.config import load_config
from aus.core.errors import AusError
try:
    cfg = load_config(sys.argv[1])
except AusError as exc:
    sys.exit(f"run-example: {exc}")
if not (cfg.mode_explicit and cfg.mode == "visibility"):
    said = f"mode: {cfg.mode}" if cfg.mode_explicit else "no mode: (enforce, or the server's)"
    sys.exit(f"run-example: {sys.argv[1]} has {said}; run-example runs in visibility mode "
             f"only. Put `mode: visibility` in it, or to enforce, run ausd yourself:\n"
             f"  .venv/bin/ausd --config {sys.argv[1]}")
print(cfg.cgroup_path)   # where ausd attaches
PY
); then
    exit 1
fi

me=$(cat /proc/self/loginuid 2>/dev/null || echo 4294967295)
if [ "$me" = 4294967295 ]; then
    who="this shell has no login UID (it is never filtered)"
else
    who="your login UID is $me ($(getent passwd "$me" | cut -d: -f1 || true)); ausd's log says below whether it is managed and what it gets"
fi
cat <<EOF
run-example: VISIBILITY mode: nothing is blocked; traffic the policy would deny
  passes and is reported (.venv/bin/ausctl flows, .venv/bin/ausctl users).
  config $CONFIG, cgroup $cgroup (every process in it and below);
  $who.
To switch to enforce: check with .venv/bin/ausctl users that every login UID
  gets what it needs (your own too: sudo keeps it), stop this with Ctrl-C, set
      mode: enforce
  in $CONFIG, and run ausd yourself:
      .venv/bin/ausd --config $CONFIG
  (or install the package and: systemctl restart ausd). Back to visibility:
  set mode: visibility and restart ausd; remove everything:
      .venv/bin/ausctl --config $CONFIG uninstall --yes
EOF
exec .venv/bin/ausd --config "$CONFIG"
