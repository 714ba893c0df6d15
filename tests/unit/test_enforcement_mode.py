"""The enforcement mode: the bundle's ``enforcement`` key (refused by path
when bad) and which mode ausd applies, from where."""

from __future__ import annotations

import pytest

from aus.agent.config import config_from_text
from aus.agent.enforcement import mode_in_force
from aus.core.bundle import bundle_from_data
from aus.core.errors import PolicyError
from tests.support.bundle_server import bundle


def with_modes(enforcement):
    doc = bundle(3, {"DEV": ["alice"]})
    if enforcement is not ...:
        doc["enforcement"] = enforcement
    return bundle_from_data(doc, "bundle")


@pytest.mark.parametrize("value, problem", [
    ("enforce", "enforcement: expected a mapping with the keys default and workloads, "
                "not the string 'enforce'"),
    ({"default": "on"}, "enforcement.default: expected 'enforce' or 'visibility', "
                        "got the string 'on'"),
    ({"default": "visibility", "workloads": {"web-1": "Enforce"}},
     "enforcement.workloads.web-1: expected 'enforce' or 'visibility', got the string 'Enforce'"),
    ({"workloads": ["web-1"]}, "enforcement.workloads: expected a mapping of workload names "
                               "to modes, got a list"),
    ({"workloads": {"  ": "enforce"}}, "enforcement.workloads: '  ' is not a workload name "
                                       "(1 to 255 characters, not only spaces)"),
    ({"default": "enforce", "mode": "x"}, "enforcement.mode: unknown key 'mode' "
                                          "(allowed keys: default, workloads)"),
])
def test_bad_enforcement_is_refused_with_its_path(value, problem):
    with pytest.raises(PolicyError) as info:
        with_modes(value)
    assert info.value.problems == [problem]


def cfg(text=""):
    return config_from_text(text, "ausd.yaml")


def test_precedence_config_then_workload_then_org_then_default():
    b = with_modes({"default": "visibility", "workloads": {"web-1": "enforce"}})
    assert mode_in_force(cfg("mode: visibility\n"), b, "web-1") == ("visibility", "config")
    # explicit even when it equals the built-in default
    assert mode_in_force(cfg("mode: enforce\n"), b, "web-2") == ("enforce", "config")
    assert mode_in_force(cfg(), b, "web-1") == ("enforce", "server:workload")
    assert mode_in_force(cfg(), b, "web-2") == ("visibility", "server:org")
    assert mode_in_force(cfg(), b, "WEB-1") == ("visibility", "server:org")   # names exact
    only_workloads = with_modes({"workloads": {"web-1": "visibility"}})
    assert mode_in_force(cfg(), only_workloads, "web-2") == ("enforce", "default")
    assert mode_in_force(cfg(), with_modes(...), "web-1") == ("enforce", "default")
    assert mode_in_force(cfg(), None, None) == ("enforce", "default")
    assert cfg().mode_explicit is False and cfg("mode: enforce").mode_explicit is True
