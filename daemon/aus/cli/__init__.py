"""``ausctl``: inspect and steer ausd; reads the pinned maps through
:mod:`aus.agent.pins` when the daemon is down."""
