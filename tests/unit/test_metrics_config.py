"""metrics_listen, metrics_remote, metrics_textfile and metrics_interval in
ausd.yaml: accepted forms, and each bad value refused with its line."""

from __future__ import annotations

import pytest

from aus.agent.config import config_from_text
from aus.core.errors import ConfigError


@pytest.mark.parametrize("text, want", [
    ("", None),
    ("metrics_listen: off\n", None),
    ("metrics_listen: null\n", None),
    ("metrics_listen: 127.0.0.1:9477\n", ("127.0.0.1", 9477)),
    ("metrics_listen: localhost:9477\n", ("127.0.0.1", 9477)),
    ("metrics_listen: '[::1]:9477'\n", ("::1", 9477)),
    ("metrics_remote: true\nmetrics_listen: 0.0.0.0:9477\n", ("0.0.0.0", 9477)),
    ("metrics_remote: true\nmetrics_listen: '[2001:db8::1]:9477'\n", ("2001:db8::1", 9477)),
])
def test_listen_accepted(text, want):
    assert config_from_text(text).metrics_listen == want


@pytest.mark.parametrize("text, problem", [
    ("log_level: info\nmetrics_listen: 0.0.0.0:9477\n",
     "line 2: metrics_listen: 0.0.0.0 is not a loopback address"),
    ("metrics_listen: 192.0.2.1:9477\nmetrics_remote: false\n",
     "line 1: metrics_listen: 192.0.2.1 is not a loopback address"),
    ("metrics_listen: prometheus.example:9477\n",
     "line 1: metrics_listen: 'prometheus.example:9477': 'prometheus.example' is not an IP"),
    ("metrics_listen: 127.0.0.1:65536\n", "line 1: metrics_listen: '127.0.0.1:65536': the port"),
    ("metrics_listen: 127.0.0.1\n", "line 1: metrics_listen: '127.0.0.1': expected HOST:PORT"),
    ("metrics_listen: 9477\n", "line 1: metrics_listen: expected HOST:PORT"),
    ("metrics_remote: yes please\n", "line 1: metrics_remote: "),
    ("metrics_textfile: ausd.prom\n", "line 1: metrics_textfile: must be an absolute path"),
    ("metrics_interval: 0.5\n", "line 1: metrics_interval: must be between 1 and 3600 seconds"),
    ("metrics_interval: '15'\n", "line 1: metrics_interval: "),
])
def test_bad_values_name_their_line(text, problem):
    with pytest.raises(ConfigError) as err:
        config_from_text(text, "ausd.yaml")
    assert str(err.value).startswith("ausd.yaml: invalid configuration:")
    assert any(line.strip().startswith(problem) for line in str(err.value).splitlines()), \
        str(err.value)


def test_textfile_and_interval():
    cfg = config_from_text("metrics_textfile: /var/lib/prometheus/node-exporter/ausd.prom\n"
                           "metrics_interval: 30\n")
    assert str(cfg.metrics_textfile) == "/var/lib/prometheus/node-exporter/ausd.prom"
    assert cfg.metrics_interval == 30 and cfg.metrics_listen is None
