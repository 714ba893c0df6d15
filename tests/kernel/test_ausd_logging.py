"""The real ausd's log under systemd and without: with JOURNAL_STREAM naming
its stderr, every line carries its syslog priority as a ``<N>`` prefix
(this host runs no journald, so the native socket takes nothing and the
stream form is what journald would parse); without it, plain lines.
tests/unit/test_logsetup.py checks the native entries and their fields."""

from __future__ import annotations

import os
import re

import pytest

from tests.support import lab

from .conftest import lab_policy

pytestmark = pytest.mark.kernel

LINE = re.compile(r"<([0-7])>([\w.]+): ")


def test_priorities_under_systemd_plain_otherwise(cg, peer, people):
    users, groups = people
    assert not os.path.exists("/run/systemd/journal/socket"), \
        "this test expects a host without journald (the CI container)"
    for under_systemd in (True, False):
        with lab.ausd(cg, lab_policy(peer, groups), log_level="info") as d:
            env = {}
            if under_systemd:
                logf = d.workdir / "ausd.log"
                logf.touch()
                st = logf.stat()
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            d.start(env=env)
            with lab.session(d, users["alice"].uid):
                pass
            d.write_policy("rules: [")
            assert d.ctl("reload", check=False).returncode != 0
            d.stop()
            lines = [ln for ln in d.read_log().splitlines() if ln.strip()]
        if under_systemd:
            bad = [ln for ln in lines if not LINE.match(ln)]
            assert not bad, bad
            pri = [(int(LINE.match(ln)[1]), ln) for ln in lines]
            assert any(p == 6 and "ready: mode enforce" in ln for p, ln in pri)
            assert any(p == 6 and "session opened: login UID" in ln for p, ln in pri)
            # The refused policy: an error with each line of its text at priority 3.
            refused = [ln for p, ln in pri if "policy refused" in ln]
            assert refused and all(ln.startswith("<3>") for ln in refused)
            assert {p for p, _ in pri} <= {3, 4, 6}
        else:
            assert not any(LINE.match(ln) for ln in lines), lines
            assert any(ln.startswith("INFO ") and "ready: mode enforce" in ln
                       for ln in lines), lines
            assert any(ln.startswith("ERROR ") and "policy refused" in ln for ln in lines), lines
