import os

import pytest


def pytest_collection_modifyitems(config, items):
    # The identity tests build slapd + sssd + PAM in a private mount
    # namespace and load the real programs: they need root. CI runs as
    # root, so there they always run; elsewhere they are skipped.
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="identity tests need root")
        for item in items:
            item.add_marker(skip)
