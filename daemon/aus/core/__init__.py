"""The pure core, shared by the agent and the server.

Plain data in, plain data out: no syscalls, no sockets, no bcc. The agent
and the server import it; it imports neither.

- :mod:`~aus.core.errors`: the project's error tree.
- :mod:`~aus.core.contract`: the Python mirror of ``bpf/aus.h``.
- :mod:`~aus.core.policy`: the policy model, its validation and loading
  (:mod:`~aus.core.yamlsource` gives YAML errors their lines).
- :mod:`~aus.core.compiler`: a policy and a user's groups to rulesets.
- :mod:`~aus.core.state`: the planner, actual against desired map state.
- :mod:`~aus.core.bundle`: the bundle document the server publishes and
  the agent follows.
- :mod:`~aus.core.flowrecord`: the flow records a workload uploads.
- :mod:`~aus.core.verdict`: what a policy decides for one flow, as the
  kernel's lookups decide it.
"""
