"""Daemon configuration: defaults, validation messages, cgroup2 discovery."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from pydantic import ValidationError

from aus.agent.config import DaemonConfig, cgroup2_root, load_config
from aus.core.errors import ConfigError

HYBRID_MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
"""

V1_ONLY_MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ausd.yaml"
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    head, *lines = message.split("\n")
    assert head == f"{path}: invalid configuration:"
    return [line.strip() for line in lines]


# --------------------------------------------------------------------------
# Defaults


def test_defaults():
    cfg = DaemonConfig()
    assert cfg.policy == Path("/etc/aus/policy.yaml")
    assert cfg.cgroup is None
    assert cfg.pin_dir == Path("/sys/fs/bpf/aus")
    assert cfg.socket == Path("/run/aus/ausd.sock")
    assert cfg.mode == "enforce"
    assert cfg.unmanaged_login_uids == [0]
    assert cfg.baseline == ["127.0.0.0/8", "::1/128"]
    assert cfg.baseline_networks == [ipaddress.ip_network("127.0.0.0/8"),
                                     ipaddress.ip_network("::1/128")]
    assert cfg.scan_interval == 1.0
    assert cfg.events_per_second == 1000
    assert cfg.events_burst == 2000
    assert (cfg.max_users, cfg.max_destinations, cfg.max_services, cfg.max_rules) == (
        65536, 262144, 262144, 4096)
    assert cfg.log_level == "info"
    assert cfg.bpf_dir is None


def test_frozen():
    with pytest.raises(ValidationError):
        DaemonConfig().mode = "visibility"  # type: ignore[misc]


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == DaemonConfig()
    assert load_config(write(tmp_path, "# all defaults\n")) == DaemonConfig()


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value)
    assert "not found" in str(info.value)
    assert load_config(missing, required=False) == DaemonConfig()


def test_unreadable_is_an_error_even_when_optional(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, required=False)  # a directory
    assert str(tmp_path) in str(info.value)


def test_values_loaded(tmp_path):
    cfg = load_config(write(tmp_path, """\
policy: /srv/aus/policy.yaml
cgroup: /sys/fs/cgroup/user.slice
mode: Visibility
unmanaged_login_uids: [0, 1000]
baseline: ["127.0.0.0/8", "::1/128", "10.0.0.53", "127.0.0.0/8"]
scan_interval: 0.25
events_per_second: 10
events_burst: 20
max_rules: 16
log_level: debug
"""))
    assert cfg.policy == Path("/srv/aus/policy.yaml")
    assert cfg.cgroup_path == Path("/sys/fs/cgroup/user.slice")
    assert cfg.mode == "visibility"
    assert cfg.unmanaged_login_uids == [0, 1000]
    assert cfg.baseline_networks == [ipaddress.ip_network(n) for n in (
        "127.0.0.0/8", "::1/128", "10.0.0.53/32")]
    assert cfg.scan_interval == 0.25
    assert (cfg.events_per_second, cfg.events_burst, cfg.max_rules) == (10, 20, 16)
    assert cfg.log_level == "debug"


def test_relative_policy_is_relative_to_the_file(tmp_path):
    cfg = load_config(write(tmp_path, "policy: policy.yaml\nbpf_dir: ../bpf\n"))
    assert cfg.policy == tmp_path / "policy.yaml"
    assert cfg.bpf_dir == tmp_path / "../bpf"


def test_cgroup_path_defaults_to_cgroup2_root():
    cfg = DaemonConfig()
    try:
        expected = cgroup2_root()
    except ConfigError:
        with pytest.raises(ConfigError):
            cfg.cgroup_path
    else:
        assert cfg.cgroup_path == expected


# --------------------------------------------------------------------------
# Errors: file, line, key, reason


def test_errors_name_line_key_reason(tmp_path):
    problems = problems_of(tmp_path, """\
mode: enforce
scan_interval: 5
unmanaged_login_uids:
  - 0
  - 4294967295
  - -3
pin_dir: relative/pins
scan_intervall: 1
""")
    assert problems[0] == "line 2: scan_interval: must be between 0.05 and 2 seconds, got 5"
    assert problems[1].startswith("line 5: unmanaged_login_uids[1]: 4294967295 is the unset login UID")
    assert "never filtered" in problems[1]
    assert problems[2] == "line 6: unmanaged_login_uids[2]: -3 is not a login UID (0..4294967294)"
    assert problems[3] == "line 7: pin_dir: must be an absolute path, got 'relative/pins'"
    assert problems[4].startswith("line 8: scan_intervall: unknown key 'scan_intervall'; "
                                  "did you mean 'scan_interval'?")
    assert len(problems) == 5


@pytest.mark.parametrize("text, expected", [
    ("mode: block\n", "line 1: mode: input should be 'enforce' or 'visibility' (got 'block')"),
    ("log_level: trace\n", "line 1: log_level: input should be 'debug', 'info', 'warning' or 'error' (got 'trace')"),
    ("cgroup: sys/fs/cgroup\n", "line 1: cgroup: must be an absolute path, got 'sys/fs/cgroup'"),
    ("socket: ausd.sock\n", "line 1: socket: must be an absolute path, got 'ausd.sock'"),
    ("policy: ''\n", "line 1: policy: expected a path or an https:// URL, got an empty string"),
    ("baseline: [127.0.0.1/8]\n", "line 1: baseline[0]: '127.0.0.1/8' has host bits set: "
     "the network is 127.0.0.0/8; write 127.0.0.0/8, or 127.0.0.1/32 for the single address"),
    ("baseline: [localhost]\n", "line 1: baseline[0]: 'localhost' is not a valid IP address or CIDR"),
    ("scan_interval: 0.01\n", "line 1: scan_interval: must be between 0.05 and 2 seconds, got 0.01"),
    ("scan_interval: true\n", "line 1: scan_interval: expected a number, got the boolean true"),
    ("scan_interval: '1'\n", "line 1: scan_interval: expected a number, got the string '1'"),
    ("events_per_second: 0\n", "line 1: events_per_second: must be between 1 and 1000000, got 0"),
    ("events_per_second: 1000001\n", "line 1: events_per_second: must be between 1 and 1000000, got 1000001"),
    ("events_burst: 0\n", "line 1: events_burst: must be at least 1, got 0"),
    ("max_users: 15\n", "line 1: max_users: must be between 16 and 16777216 entries, got 15"),
    ("max_destinations: 16777217\n",
     "line 1: max_destinations: must be between 16 and 16777216 entries, got 16777217"),
    ("max_services: 1.5\n", "line 1: max_services: expected an integer, got the number 1.5"),
    ("max_rules: '64'\n", "line 1: max_rules: expected an integer, got the string '64'"),
    ("unmanaged_login_uids: 0\n", "line 1: unmanaged_login_uids: expected a list, got the integer 0"),
])
def test_single_errors(tmp_path, text, expected):
    assert problems_of(tmp_path, text) == [expected]


def test_yaml_syntax_error(tmp_path):
    problems = problems_of(tmp_path, "mode: enforce\nbaseline: [127.0.0.0/8\nlog_level: info\n")
    assert len(problems) == 1
    assert problems[0].startswith("line 3, column ")


def test_top_level_must_be_mapping(tmp_path):
    problems = problems_of(tmp_path, "- mode\n")
    assert problems == ["line 1: the configuration must be a mapping of keys to values"]


def test_duplicate_key(tmp_path):
    problems = problems_of(tmp_path, "mode: enforce\nmode: visibility\n")
    assert problems == ["line 2, column 1: duplicate key 'mode' (first given on line 1)"]


# --------------------------------------------------------------------------
# cgroup2_root


def test_cgroup2_root_hybrid():
    assert cgroup2_root(HYBRID_MOUNTS) == Path("/sys/fs/cgroup/unified")


def test_cgroup2_root_unified():
    assert cgroup2_root("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n") == Path("/sys/fs/cgroup")


def test_cgroup2_root_first_wins_and_unescapes():
    text = ("cgroup2 /mnt/my\\040cgroup cgroup2 rw 0 0\n"
            "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n")
    assert cgroup2_root(text) == Path("/mnt/my cgroup")


def test_cgroup2_root_none():
    for text in (V1_ONLY_MOUNTS, ""):
        with pytest.raises(ConfigError) as info:
            cgroup2_root(text)
        assert str(info.value) == (
            "no cgroup v2 hierarchy is mounted; mount one with: "
            "mount -t cgroup2 none /sys/fs/cgroup")


def test_cgroup2_root_reads_proc_mounts():
    if not Path("/proc/mounts").exists():
        pytest.skip("no /proc/mounts")
    text = Path("/proc/mounts").read_text()
    if " cgroup2 " not in text:
        with pytest.raises(ConfigError):
            cgroup2_root()
    else:
        assert cgroup2_root() == cgroup2_root(text)


def test_packaged_config_is_the_defaults_in_visibility_mode():
    path = Path(__file__).resolve().parents[2] / "packaging" / "ausd.yaml"
    cfg = load_config(path)
    # Set, not defaulted: it wins over any server, so a first start blocks nothing.
    assert cfg.mode == "visibility" and cfg.mode_explicit
    assert cfg.model_dump() == {**DaemonConfig().model_dump(), "mode": "visibility"}


# --------------------------------------------------------------------------
# The policy as a URL of the policy server


def test_policy_url_defaults_and_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, """\
policy: https://aus.example.com/v1/orgs/1/bundle
policy_credentials: credentials
policy_ca: ca.pem
"""))
    assert cfg.policy == cfg.policy_url == "https://aus.example.com/v1/orgs/1/bundle"
    assert cfg.policy_credentials == tmp_path / "credentials"
    assert cfg.policy_ca == tmp_path / "ca.pem"
    assert cfg.policy_cache == Path("/var/lib/aus/bundle.json")
    assert cfg.bundle_user_match == "exact"
    assert cfg.bundle_wait == 30


def test_policy_file_has_no_url():
    cfg = DaemonConfig()
    assert cfg.policy_url is None and cfg.policy_credentials is None
    assert cfg.policy_cache == Path("/var/lib/aus/bundle.json")
    assert (cfg.policy_ca, cfg.bundle_user_match, cfg.bundle_wait) == (None, "exact", 30)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/v1/orgs/1/bundle",
    "http://127.3.4.5/bundle",
    "http://[::1]:9000/bundle",
    "http://localhost:8080/bundle",
    "HTTPS://aus.example.com/bundle?tenant=x",
    "https://10.1.2.3:8443/bundle",
])
def test_accepted_urls(tmp_path, url):
    cfg = load_config(write(tmp_path, f"policy: '{url}'\npolicy_credentials: /etc/aus/key\n"))
    assert cfg.policy_url == url


@pytest.mark.parametrize("url, reason", [
    ("http://10.0.0.1/bundle", "plain http is allowed only to a loopback address (for tests); "
     "the API key and the policy would cross the network in clear: use https://10.0.0.1/bundle"),
    ("http://aus.example.com/bundle", "plain http is allowed only to a loopback address"),
    ("http://[2001:db8::1]/bundle", "plain http is allowed only to a loopback address"),
    ("ftp://aus.example.com/bundle", "unsupported scheme 'ftp'; the policy is a file path or "
     "an https:// URL of the policy server"),
    ("https:///bundle", "the URL has no host"),
    ("https://key:secret@aus.example.com/b", "credentials do not go in the URL; put them in "
     "the file named by policy_credentials"),
    ("https://aus.example.com:99999/b", "is not a valid URL"),
    ("https://aus.example.com/b#x", "a policy URL has no #fragment"),
])
def test_refused_urls(tmp_path, url, reason):
    problems = problems_of(tmp_path, f"policy: '{url}'\npolicy_credentials: /etc/aus/key\n")
    assert len(problems) == 1
    assert problems[0].startswith(f"line 1: policy: '{url}'"), problems
    assert reason in problems[0]


def test_url_needs_credentials(tmp_path):
    problems = problems_of(tmp_path, "policy: https://aus.example.com/v1/orgs/1/bundle\n")
    assert problems == ["line 1: policy_credentials: required when policy is a URL: the path "
                        "of a file holding one line <api_key>:<secret>, readable by root only"]


@pytest.mark.parametrize("text, expected", [
    ("bundle_user_match: upn\n",
     "line 1: bundle_user_match: input should be 'exact' or 'local-part' (got 'upn')"),
    ("bundle_wait: 0\n", "line 1: bundle_wait: must be between 1 and 60 seconds, got 0"),
    ("bundle_wait: 61\n", "line 1: bundle_wait: must be between 1 and 60 seconds, got 61"),
    ("bundle_wait: 2.5\n", "line 1: bundle_wait: expected an integer, got the number 2.5"),
    ("policy_cache: bundle.json\n",
     "line 1: policy_cache: must be an absolute path, got 'bundle.json'"),
    ("policy: 5\n", "line 1: policy: expected a path or an https:// URL, got the integer 5"),
])
def test_policy_server_key_errors(tmp_path, text, expected):
    assert problems_of(tmp_path, text) == [expected]


def test_user_match_any_case(tmp_path):
    assert load_config(write(tmp_path, "bundle_user_match: Local-Part\n")).bundle_user_match \
        == "local-part"
