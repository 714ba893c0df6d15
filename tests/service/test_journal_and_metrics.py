"""ausd under a real systemd and journald, from the package: its records
are native journal entries, so `journalctl -p warning -u ausd` shows its
warnings and none of its info lines, with the priority, identifier and
code fields set; and the metrics listener works with the Python packages
the .deb depends on (Debian's python3-prometheus-client). The policy
server ausd is pointed at does not exist, which is what makes it warn
(and count bundle fetch errors)."""

from __future__ import annotations

import json

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.polling import wait_until

from .ausd_unit import cursor, ensure_running

CREDENTIALS = "/etc/aus/credentials"
METRICS = "127.0.0.1:9477"
SCRAPE = ("import urllib.request; print(urllib.request.urlopen("
          f"'http://{METRICS}/metrics', timeout=10).read().decode())")


def entries(m, since: str, *args: str) -> list[dict]:
    out = m.run("journalctl", "--no-pager", "-o", "json", "-u", "ausd",
                f"--after-cursor={since}", *args).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_priorities_fields_and_metrics_from_the_package(box):
    m = box.m
    ensure_running(box)
    config = yaml.safe_load(m.run("cat", "/etc/aus/ausd.yaml").stdout)
    unreachable = dict(config, policy="http://127.0.0.1:9/api/orgs/1/bundle",
                       policy_credentials=CREDENTIALS,
                       policy_cache="/var/lib/aus/test-bundle.json",
                       metrics_listen=METRICS)
    m.write(CREDENTIALS, "key:secret\n")
    m.run("chmod", "600", CREDENTIALS)
    since = cursor(m)
    m.write("/etc/aus/ausd.yaml", yaml.safe_dump(unreachable))
    try:
        m.systemctl("restart", "ausd")

        def warned():
            got = entries(m, since, "-p", "warning")
            return got if any("no bundle from" in e["MESSAGE"] for e in got) else None
        warnings = wait_until(warned, 30, interval=0.5, what="ausd's warning in the journal")
        everything = entries(m, since)

        # -p warning: warnings (and worse), never an info line.
        assert {e["PRIORITY"] for e in warnings} <= {"0", "1", "2", "3", "4"}
        w = next(e for e in warnings if "no bundle from" in e["MESSAGE"])
        assert w["PRIORITY"] == "4" and w["SYSLOG_IDENTIFIER"] == "ausd"
        assert w["CODE_FILE"].endswith("/aus/agent/follower.py") and int(w["CODE_LINE"]) > 0
        assert w["LOGGER"] == "aus.agent.follower"
        assert w["_SYSTEMD_UNIT"] == "ausd.service"
        # Without the filter the info lines are there, at priority 6.
        ready = [e for e in everything if "ready: mode" in e["MESSAGE"]]
        assert ready and all(e["PRIORITY"] == "6" for e in ready)
        assert not any("ready: mode" in e["MESSAGE"] for e in warnings)
        # No line came through the stream: each entry was sent whole.
        assert not any(e.get("_TRANSPORT") == "stdout" for e in everything), \
            [e["MESSAGE"] for e in everything if e.get("_TRANSPORT") == "stdout"]

        def scraped():
            out = m.run("python3", "-c", SCRAPE, check=False).stdout
            samples = {s.name: s.value for f in text_string_to_metric_families(out)
                       for s in f.samples if not s.labels}
            return samples if samples.get("ausd_bundle_fetch_errors_total", 0) >= 1 else None
        samples = wait_until(scraped, 30, interval=0.5, what="bundle fetch errors counted")
        assert samples["ausd_policy_version"] == 0
        assert samples["ausd_bundle_fetch_failing"] >= 1
    finally:
        m.write("/etc/aus/ausd.yaml", yaml.safe_dump(config))
        m.run("rm", "-f", CREDENTIALS, "/var/lib/aus/test-bundle.json")
        m.systemctl("reset-failed", "ausd", check=False)
        m.systemctl("restart", "ausd")
