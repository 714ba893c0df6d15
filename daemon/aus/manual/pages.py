"""What each command's manual says that its parser cannot: the section,
the one-line summary, the description, files, environment, exit status and
references. Options and subcommands come from the parser alone
(:mod:`aus.manual.roff`), so nothing here lists them.

Text is plain: paragraphs are separated by a blank line, and a paragraph
whose lines all start with two spaces is shown as typed (an example).
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass

# Manual sections: 1 for commands any user runs, 8 for daemons and
# commands for the administrator (man-pages(7)).
USER_COMMANDS, ADMIN_COMMANDS = 1, 8


@dataclass(frozen=True)
class Page:
    command: str                  # the program's name, as typed
    section: int
    parser: str                   # "module:function" returning its ArgumentParser
    package: str                  # the Debian package that ships it
    summary: str                  # the NAME line after "command -"
    description: str
    files: tuple[tuple[str, str], ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    signals: tuple[tuple[str, str], ...] = ()
    exit_status: tuple[tuple[str, str], ...] = ()
    examples: tuple[tuple[str, str], ...] = ()   # (what it does, the command)
    see_also: tuple[str, ...] = ()               # "ausctl(1)"

    @property
    def filename(self) -> str:
        return f"{self.command}.{self.section}"

    def load_parser(self) -> argparse.ArgumentParser:
        module, _, function = self.parser.partition(":")
        return getattr(importlib.import_module(module), function)()


AUSD = Page(
    command="ausd",
    section=ADMIN_COMMANDS,
    parser="aus.agent.ausd:parser",
    package="aus",
    summary="per-user egress filtering for Linux, enforced in the kernel by eBPF",
    description="""\
ausd attaches eBPF programs to the cgroup v2 hierarchy and keeps their maps
filled with the rules of whoever is logged in: each connection a process
makes is allowed or denied by the rules of the directory groups of the user
who logged in (the audit login UID, which su and sudo do not change).

The rules come from a policy file (policy: in the configuration, by default
/etc/aus/policy.yaml) or from the policy server, aus-server(8), whose
bundle ausd long-polls and keeps a copy of. In enforce mode traffic that no
rule allows is denied; in visibility mode nothing is blocked and what would
be denied is reported. Users ausd does not manage (root by default, and
processes with no login UID) are never filtered.

ausd runs in the foreground and tells systemd when it is ready. Stopping it
leaves the programs and maps pinned and attached: enforcement does not
depend on the process. ausctl uninstall --yes removes them.""",
    files=(
        ("/etc/aus/ausd.yaml", "the configuration; every key is optional and shown at its "
         "default in the packaged file"),
        ("/etc/aus/policy.yaml", "the policy file, by default"),
        ("/usr/share/doc/aus/policy.example.yaml", "an example policy"),
        ("/run/aus/ausd.sock", "the control socket ausctl(1) talks to"),
        ("/sys/fs/bpf/aus", "the pinned programs and maps"),
        ("/var/lib/aus/bundle.json", "the last good policy bundle, with a policy URL"),
        ("/var/lib/aus/flows", "flow records waiting for upload to the policy server"),
        ("/usr/share/aus/bpf", "the eBPF C sources, compiled at start"),
    ),
    signals=(
        ("SIGHUP", "re-read the policy file, or fetch the bundle now"),
        ("SIGTERM, SIGINT", "exit, leaving enforcement in place"),
    ),
    exit_status=(
        ("0", "stopped by a signal"),
        ("1", "could not start (the error is logged)"),
        ("2", "the configuration is unreadable or invalid"),
    ),
    examples=(
        ("Run it under systemd, the usual way:", "systemctl enable --now ausd"),
        ("Re-read the policy:", "systemctl reload ausd"),
        ("Follow its log:", "journalctl -u ausd -f"),
    ),
    see_also=("ausctl(1)", "aus-server(8)", "systemctl(1)", "journalctl(1)"),
)

AUSCTL = Page(
    command="ausctl",
    section=USER_COMMANDS,
    parser="aus.cli.ausctl:parser",
    package="aus",
    summary="inspect and steer ausd",
    description="""\
ausctl shows what ausd(8) enforces and asks it to act: the daemon's state,
the users it manages, the rules and their counters, recent flows, and the
verdict for a given connection. Without a daemon or root, policy check
validates a policy file as ausd would load it, and explain --policy gives
the verdict and the deciding rule for any user or set of groups.

Tables go to standard output and errors to standard error; --json gives
every command's output in a stable machine-readable shape. maps and check
read the pinned maps directly and work while ausd is down; status falls
back to them. Run by a user other than root, users, rules and flows show
that user's own.""",
    files=(
        ("/etc/aus/ausd.yaml", "ausd's configuration, read for the socket and pin paths"),
        ("/run/aus/ausd.sock", "ausd's control socket"),
        ("/sys/fs/bpf/aus", "the pinned maps read by maps and check"),
    ),
    exit_status=(
        ("0", "success (for check and explain: the connection is allowed)"),
        ("1", "an error (for policy check: the file is refused; for reload: the policy is "
              "refused and the one in force stays)"),
        ("2", "a usage error"),
        ("3", "check, explain: the connection would be denied (or only reported, in "
              "visibility mode)"),
    ),
    examples=(
        ("Who is managed and what they get:", "ausctl users"),
        ("May login UID 1000 reach 10.0.0.5 on TCP port 443?",
         "ausctl check --login-uid 1000 --to 10.0.0.5 --port 443 --proto tcp"),
        ("Denied flows of the last ten minutes:", "ausctl flows --verdict denied --since 10m"),
        ("Check a policy file before deploying it (no root needed):",
         "ausctl policy check policy.yaml"),
        ("What may alice reach on 10.1.2.3, TCP port 443, under the policy in force?",
         "ausctl explain --user alice --to 10.1.2.3 --port 443 --proto tcp"),
    ),
    see_also=("ausd(8)", "aus-server(8)"),
)

AUS_SERVER = Page(
    command="aus-server",
    section=ADMIN_COMMANDS,
    parser="aus.server.cli:parser",
    package="aus-server",
    summary="the aus policy server: SCIM, rules, bundles and the web console",
    description="""\
aus-server keeps an organisation's users and groups, pushed by Microsoft
Entra ID over SCIM 2.0, and its rules, written through the management API
or the web console, and publishes them as versioned bundles that every
workload's ausd(8) long-polls. It never touches the kernel and needs no
agent on its host.

Its database is SQLite for one server, or PostgreSQL for several replicas.
Plain HTTP is served only on a loopback address; any other address needs
--tls-cert and --tls-key. Every request to the API, SCIM and bundles is
authenticated with an API key made by aus-server api-key create.""",
    files=(
        ("/var/lib/aus-server/aus-server.db", "the SQLite database, when no other is given"),
        ("/etc/aus/aus-server.env", "the service's options (AUS_SERVER_OPTS, AUS_SERVER_DB); "
         "aus-server.service starts once it exists"),
        ("/usr/share/doc/aus-server", "the server's documentation: API, SCIM and console"),
    ),
    environment=(
        ("AUS_SERVER_DB", "the database URL, when --db is not given"),
    ),
    signals=(
        ("SIGHUP", "re-read the TLS certificate and key; a bad pair is refused and the old "
         "one stays"),
    ),
    exit_status=(
        ("0", "success"),
        ("1", "an error (the database, an unknown key)"),
        ("2", "a usage error"),
    ),
    examples=(
        ("Make an API key for org 1 (printed once):", "aus-server api-key create --org 1"),
        ("Make the Secret Token for Entra ID, good for SCIM only:",
         "aus-server api-key create --org 1 --scope scim --label 'Entra ID'"),
        ("Serve HTTPS on every address:",
         "aus-server serve --listen 0.0.0.0:8443 --tls-cert cert.pem --tls-key key.pem"),
    ),
    see_also=("ausd(8)", "ausctl(1)"),
)

PAGES = {page.command: page for page in (AUSD, AUSCTL, AUS_SERVER)}
