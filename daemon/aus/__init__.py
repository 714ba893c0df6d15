"""aus: adaptive user segmentation for Linux.

One package per role; the walls between them are checked by
tests/unit/test_layout.py:

- :mod:`aus.core`: pure and shared by both sides: the policy model and its
  YAML loading, the compiler, the planner, the kernel/user contract mirror,
  the error tree and the bundle document. No syscalls, no bcc.
- :mod:`aus.agent`: ``ausd`` and everything that touches the kernel (bcc,
  bpf(2), pins, /proc), identity, sessions, the control socket and the
  policy server client.
- :mod:`aus.cli`: ``ausctl``.
- :mod:`aus.server`: ``aus-server``, the policy server (SCIM 2.0, the
  management API, bundles, the web console). It never touches the kernel.
- :mod:`aus.manual`: the three commands' man pages and shell completions,
  made from their parsers when the packages are built; in neither package.
"""

__version__ = "0.1.0"
