"""The agent: ``ausd`` and every module that touches the kernel.

- :mod:`~aus.agent.ausd`: the daemon and its loop.
- :mod:`~aus.agent.loader`: probe, compile with bcc, load and attach;
  :mod:`~aus.agent.pins`: the pin layout, opening pinned maps, uninstall;
  :mod:`~aus.agent.bpfsys`: the bpf(2) syscall; :mod:`~aus.agent.btf`:
  kernel-internal offsets.
- :mod:`~aus.agent.mapsync` applies the core's plans to the maps;
  :mod:`~aus.agent.mapview` decodes them for reading.
- :mod:`~aus.agent.sessions`, :mod:`~aus.agent.identity`: who is logged
  in, with which groups.
- :mod:`~aus.agent.policysource`: the policy server client.
- :mod:`~aus.agent.control`: the control socket; :mod:`~aus.agent.report`
  answers its read commands.
"""
