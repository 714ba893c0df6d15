"""The daemon's configuration, ``/etc/aus/ausd.yaml`` by default.

One frozen pydantic model, :class:`DaemonConfig`; unknown keys are refused.
:func:`load_config` reads it and reports every problem at once as a
:class:`~aus.core.errors.ConfigError` naming the file, line, key and reason.
See packaging/ausd.yaml for a commented file with every default.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..core import journal
from ..core.contract import LOGINUID_UNSET
from ..core.errors import ConfigError
from ..core.policy import parse_network
from ..core.yamlsource import (
    YamlSourceError,
    describe_validation_errors,
    describe_value,
    load_yaml_with_lines,
    sorted_problems,
)

DEFAULT_CONFIG_PATH = Path("/etc/aus/ausd.yaml")
JOURNAL_SOCKET = journal.SOCKET

MAP_SIZE_MIN = 16
MAP_SIZE_MAX = 16_777_216

_CGROUP2_HINT = (
    "no cgroup v2 hierarchy is mounted; mount one with: "
    "mount -t cgroup2 none /sys/fs/cgroup"
)

# Context key: directory relative ``policy``, ``bpf_dir``,
# ``policy_credentials`` and ``policy_ca`` are resolved against (the
# configuration file's directory, set by load_config).
_BASE_DIR = "aus.agent.config.base_dir"

_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _unescape_mount_field(field: str) -> str:
    r"""/proc/mounts escapes space, tab, newline and backslash as \ooo."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        chunk = field[i + 1 : i + 4]
        if field[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup2_root(mounts_text: str | None = None) -> Path:
    """The mount point of the first cgroup v2 hierarchy in ``mounts_text``
    (``/proc/mounts`` format; read from /proc/mounts when None).

    Raises ConfigError when none is mounted or /proc/mounts is unreadable.
    """
    if mounts_text is None:
        try:
            with open("/proc/mounts", encoding="utf-8", errors="replace") as fh:
                mounts_text = fh.read()
        except OSError as exc:
            raise ConfigError(
                f"cannot read /proc/mounts to find the cgroup v2 hierarchy: "
                f"{exc.strerror or exc}"
            ) from exc
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(_unescape_mount_field(fields[1]))
    raise ConfigError(_CGROUP2_HINT)


# --------------------------------------------------------------------------
# Field types


def _plain_number(value: Any) -> Any:
    # YAML's true/false and quoted numbers would otherwise be coerced.
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    if isinstance(value, str):
        raise ValueError(f"expected a number, got the string {value!r}")
    return value


def _no_empty_path(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("expected a path, got an empty string")
    return value


def _absolute(value: Path | None) -> Path | None:
    if value is not None and not value.is_absolute():
        raise ValueError(f"must be an absolute path, got {str(value)!r}")
    return value


def check_policy_url(url: str) -> str:
    """Check a policy server URL: https://, or http:// to a loopback
    address only (plain http elsewhere would hand the policy and the API
    key to anyone on the path). Raises ValueError naming the problem."""
    if any(c.isspace() for c in url):
        raise ValueError(f"{url!r}: a URL must not contain spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(
            f"{url!r}: unsupported scheme {parts.scheme!r}; the policy is a file "
            "path or an https:// URL of the policy server")
    host = parts.hostname
    if not host:
        raise ValueError(f"{url!r}: the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"{url!r}: credentials do not go in the URL; put them in the file "
            "named by policy_credentials")
    if parts.fragment:
        raise ValueError(f"{url!r}: a policy URL has no #fragment")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 is not a port")
    if scheme == "http" and not _is_loopback(host):
        raise ValueError(
            f"{url!r}: plain http is allowed only to a loopback address (for "
            f"tests); the API key and the policy would cross the network in "
            f"clear: use https://{url.split('://', 1)[1]}")
    return url


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _policy_source(value: Any) -> Any:
    """``policy`` is a URL (kept as a checked string) or a file path."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("expected a path or an https:// URL, got an empty string")
        if _URL_RE.match(value.strip()):
            return check_policy_url(value.strip())
        return Path(value)
    if isinstance(value, Path):
        return value
    raise ValueError(f"expected a path or an https:// URL, got {describe_value(value)}")


def _login_uid(value: int) -> int:
    if value == LOGINUID_UNSET:
        raise ValueError(
            "4294967295 is the unset login UID (processes not started from a "
            "login, such as system services); they are never filtered, so it "
            "cannot and need not be listed"
        )
    if not 0 <= value < LOGINUID_UNSET:
        raise ValueError(f"{value} is not a login UID (0..4294967294)")
    return value


def _network(value: str) -> str:
    parse_network(value)
    return value


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.10g}"


def _between(lo: float, hi: float | None, unit: str = "") -> Any:
    def check(value: Any) -> Any:
        if hi is None and value < lo:
            raise ValueError(f"must be at least {_num(lo)}{unit}, got {_num(value)}")
        if hi is not None and not lo <= value <= hi:
            raise ValueError(
                f"must be between {_num(lo)} and {_num(hi)}{unit}, got {_num(value)}"
            )
        return value

    return AfterValidator(check)


StrictNumber = BeforeValidator(_plain_number)
PathIn = BeforeValidator(_no_empty_path)
AbsPath = Annotated[Path, PathIn, AfterValidator(_absolute)]
LoginUid = Annotated[int, Field(strict=True), AfterValidator(_login_uid)]
MapSize = Annotated[
    int, Field(strict=True), _between(MAP_SIZE_MIN, MAP_SIZE_MAX, " entries")
]


class FlowLog(BaseModel):
    """``flow_log``: flow records exported for SIEMs, to the journal or to a
    size-rotated JSON-lines file (see aus.agent.flowlog)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    journal: AbsPath | None = None      # the journal's native socket
    path: AbsPath | None = None
    max_bytes: Annotated[int, Field(strict=True), _between(4096, 1 << 40, " bytes")] = 10 << 20
    keep: Annotated[int, Field(strict=True), _between(0, 100, " files")] = 5

    @model_validator(mode="after")
    def _one(self) -> FlowLog:
        if (self.journal is None) == (self.path is None):
            raise ValueError("give either path (a JSON-lines file) or journal (the "
                             "journal's socket), not both or neither")
        return self


def _flow_log(value: Any) -> Any:
    """``off`` (YAML reads it as false) or null: none; ``journal``: the
    system journal; a mapping: see FlowLog."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    if isinstance(value, str) and value.strip().lower() == "journal":
        return {"journal": str(JOURNAL_SOCKET)}
    if isinstance(value, dict):
        return value
    raise ValueError(f"expected off, journal, or a mapping with path (and max_bytes, keep) "
                     f"or journal, got {describe_value(value)}")


def _metrics_listen(value: Any) -> Any:
    """``metrics_listen``: off/null, or HOST:PORT with HOST an IP address
    (IPv6 in brackets) or localhost; kept as (address, port)."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:9477, or off, got "
                         f"{describe_value(value)}")
    text = value.strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected HOST:PORT such as 127.0.0.1:9477 or [::1]:9477")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address (nor localhost); "
                         "ausd does not resolve names to listen on") from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be 1..65535")
    return (str(addr), int(port))


class DaemonConfig(BaseModel):
    """ausd's settings. Every field has a default; paths are absolute (a
    relative ``policy`` or ``bpf_dir`` in a file is taken relative to the
    file's directory)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Annotated[Path | str, BeforeValidator(_policy_source)] = Path("/etc/aus/policy.yaml")
    cgroup: Annotated[Path | None, PathIn, AfterValidator(_absolute)] = None
    pin_dir: AbsPath = Path("/sys/fs/bpf/aus")
    socket: AbsPath = Path("/run/aus/ausd.sock")
    mode: Literal["enforce", "visibility"] = "enforce"
    unmanaged_login_uids: list[LoginUid] = Field(default_factory=lambda: [0])
    baseline: list[Annotated[str, AfterValidator(_network)]] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"]
    )
    scan_interval: Annotated[float, StrictNumber, _between(0.05, 2.0, " seconds")] = 1.0
    groups_ttl: Annotated[float, StrictNumber, _between(0.0, 3600.0, " seconds")] = 10.0
    events_per_second: Annotated[int, Field(strict=True), _between(1, 1_000_000)] = 1000
    events_burst: Annotated[int, Field(strict=True), _between(1, None)] = 2000
    max_users: MapSize = 65536
    max_destinations: MapSize = 262144
    max_services: MapSize = 262144
    max_rules: MapSize = 4096
    max_dns_entries: MapSize = 262144
    # DNS-name destinations (see docs/dns.md): the forwarder's port on
    # 127.0.0.1 and ::1 (below 1024, so no unprivileged process can take
    # it while ausd is down; 0: any free one), how long an address
    # outlives its answer's TTL, how many addresses answers may allow one
    # user, and how long the forwarder waits for a resolver.
    dns_port: Annotated[int, Field(strict=True), _between(0, 65535)] = 54
    dns_grace: Annotated[float, StrictNumber, _between(0.0, 86400.0, " seconds")] = 30.0
    dns_max_per_user: Annotated[int, Field(strict=True), _between(1, 1_000_000)] = 4096
    dns_timeout: Annotated[float, StrictNumber, _between(0.1, 60.0, " seconds")] = 5.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    bpf_dir: Annotated[Path | None, PathIn] = None
    # With a policy URL (see docs/policy-server-client.md):
    policy_credentials: Annotated[Path | None, PathIn] = Field(
        default=None, validate_default=True)
    policy_cache: AbsPath = Path("/var/lib/aus/bundle.json")
    policy_ca: Annotated[Path | None, PathIn] = None
    bundle_user_match: Literal["exact", "local-part"] = "exact"
    bundle_wait: Annotated[int, Field(strict=True), _between(1, 60, " seconds")] = 30
    # Flow upload, with a policy URL (see docs/flow-upload.md):
    flow_upload: Annotated[bool, Field(strict=True, validate_default=True)] = True
    flow_spool_records: Annotated[int, Field(strict=True),
                                  _between(1000, 10_000_000, " records")] = 100_000
    flow_spool_dir: Annotated[Path | None, PathIn, AfterValidator(_absolute)] = \
        Path("/var/lib/aus/flows")
    flow_spool_bytes: Annotated[int, Field(strict=True),
                                _between(1 << 20, 1 << 40, " bytes")] = 64 << 20
    # Flow records (see docs/flow-records.md):
    flow_window: Annotated[float, StrictNumber, _between(1.0, 3600.0, " seconds")] = 10.0
    flow_window_records: Annotated[int, Field(strict=True), _between(1, 1_000_000)] = 10000
    flow_log: Annotated[FlowLog | None, BeforeValidator(_flow_log)] = None
    # Prometheus metrics (see docs/metrics.md): an HTTP listener, loopback
    # only unless metrics_remote is true, and/or a node-exporter textfile
    # rewritten every metrics_interval seconds.
    metrics_remote: Annotated[bool, Field(strict=True)] = False
    metrics_listen: Annotated[tuple[str, int] | None, BeforeValidator(_metrics_listen)] = None
    metrics_textfile: Annotated[Path | None, PathIn, AfterValidator(_absolute)] = None
    metrics_interval: Annotated[float, StrictNumber, _between(1.0, 3600.0, " seconds")] = 15.0

    @field_validator("mode", "log_level", "bundle_user_match", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("policy", "bpf_dir", "policy_credentials", "policy_ca")
    @classmethod
    def _relative_to_file(cls, value: Path | str | None,
                          info: ValidationInfo) -> Path | str | None:
        base = (info.context or {}).get(_BASE_DIR)
        if isinstance(value, Path) and base is not None and not value.is_absolute():
            return Path(base) / value
        return value

    @field_validator("policy_credentials")
    @classmethod
    def _credentials_with_url(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None and isinstance(info.data.get("policy"), str):
            raise ValueError(
                "required when policy is a URL: the path of a file holding one "
                "line <api_key>:<secret>, readable by root only")
        return value

    @field_validator("flow_upload")
    @classmethod
    def _upload_next_to_bundle(cls, value: bool, info: ValidationInfo) -> bool:
        url = info.data.get("policy")
        if value and isinstance(url, str) and \
                urlsplit(url).path.rstrip("/").rpartition("/")[2] != "bundle":
            raise ValueError(
                f"flow records go to the flows endpoint next to the bundle, but the "
                f"policy URL {url!r} does not end in /bundle; set flow_upload: false "
                "to upload nothing")
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_loopback(cls, value: tuple[str, int] | None,
                          info: ValidationInfo) -> tuple[str, int] | None:
        if value is not None and not ipaddress.ip_address(value[0]).is_loopback \
                and not info.data.get("metrics_remote"):
            raise ValueError(
                f"{value[0]} is not a loopback address: the metrics name rules and count "
                "users, and the listener has no authentication; set metrics_remote: true "
                "to serve them to the network anyway")
        return value

    @property
    def mode_explicit(self) -> bool:
        """Whether ``mode`` was set (it then wins over the policy server's)."""
        return "mode" in self.model_fields_set

    @property
    def policy_url(self) -> str | None:
        """The policy server URL, or None when the policy is a file."""
        return self.policy if isinstance(self.policy, str) else None

    @property
    def policy_missing(self) -> Path | None:
        """The policy file when it does not exist (never with a URL): a
        host installed but not given a policy yet."""
        if self.policy_url is None and not Path(self.policy).exists():
            return Path(self.policy)
        return None

    @property
    def cgroup_path(self) -> Path:
        """The cgroup the programs attach to: ``cgroup``, or the cgroup v2
        mount root when unset (raises ConfigError if there is none)."""
        return self.cgroup if self.cgroup is not None else cgroup2_root()

    @property
    def baseline_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """``baseline`` parsed, duplicates removed, order kept."""
        out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for text in self.baseline:
            net = parse_network(text)
            if net not in out:
                out.append(net)
        return out


def config_from_text(
    text: str, source: str = "<config>", base_dir: str | os.PathLike | None = None
) -> DaemonConfig:
    """Parse and validate configuration text (empty = defaults). Raises
    ConfigError naming ``source`` and listing ``line N: key: reason``."""
    try:
        data, line_of = load_yaml_with_lines(text, source)
    except YamlSourceError as exc:
        raise ConfigError(_message(source, exc.problems)) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(_message(source, [
            f"line {line_of(())}: the configuration must be a mapping of keys to values"
        ]))
    context = {_BASE_DIR: os.fspath(base_dir)} if base_dir is not None else None
    try:
        return DaemonConfig.model_validate(data, context=context)
    except ValidationError as exc:
        items = describe_validation_errors(exc, DaemonConfig, line_of)
        raise ConfigError(_message(source, sorted_problems(items))) from exc


def load_config(
    path: str | os.PathLike | None, *, required: bool = True
) -> DaemonConfig:
    """Read the daemon configuration from ``path`` (None: /etc/aus/ausd.yaml).

    A missing file is an error unless ``required`` is False, in which case
    the defaults are returned. An empty file means the defaults.
    """
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    source = str(file)
    try:
        raw = file.read_bytes()
    except FileNotFoundError as exc:
        if not required:
            return DaemonConfig()
        raise ConfigError(f"{source}: configuration file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(_message(source, [
            f"line {line}: not valid UTF-8 (byte {exc.start})"])) from exc
    return config_from_text(text, source, base_dir=file.absolute().parent)


def _message(source: str, problems: list[str]) -> str:
    return f"{source}: invalid configuration:\n" + "\n".join(f"  {p}" for p in problems)
