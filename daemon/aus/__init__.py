"""aus: adaptive user segmentation for Linux.

Public surface: the ``ausd`` daemon (:mod:`aus.ausd`), the ``ausctl`` CLI
(:mod:`aus.ausctl`), the policy model (:mod:`aus.policy`) and compiler
(:mod:`aus.compiler`). Everything else is an implementation module.
"""

__version__ = "0.1.0"
