"""The test tiers: every collected test is in exactly one of `unit` and `integration`."""

import tomllib

import pytest

from . import conftest
from .conftest import NEEDS, ROOT, TIERS, tier_of

pytestmark = pytest.mark.unit


def test_an_untagged_test_is_integration_and_unit_needs_nothing():
    assert tier_of(set()) == "integration"
    assert tier_of({"parametrize", "skipif"}) == "integration"
    assert tier_of({"unit"}) == "unit"
    assert tier_of({"integration", "data", "env_ort"}) == "integration"
    assert tier_of({"slow", "data"}) == "integration"
    with pytest.raises(ValueError, match="both tiers"):
        tier_of({"unit", "integration"})
    for need in NEEDS:
        with pytest.raises(ValueError, match=f"marked unit but needs \\['{need}'\\]"):
            tier_of({"unit", need})


class _Mark:
    def __init__(self, name):
        self.name = name


class _Item:
    def __init__(self, nodeid, *marks):
        self.nodeid, self.marks = nodeid, [_Mark(m) for m in marks]

    def iter_markers(self):
        return iter(self.marks)

    def add_marker(self, name):
        self.marks.append(_Mark(name))


def test_collection_hook_adds_the_tier_and_refuses_contradictions():
    items = [_Item("t.py::a"), _Item("t.py::b", "unit"), _Item("t.py::c", "data")]
    conftest.pytest_collection_modifyitems(None, items)
    assert [[m.name for m in i.marks] for i in items] == [
        ["integration"], ["unit"], ["data", "integration"]]
    with pytest.raises(pytest.UsageError, match=r"t.py::d: marked unit but needs \['env_fleet'\]"):
        conftest.pytest_collection_modifyitems(None, [_Item("t.py::d", "unit", "env_fleet")])


def test_every_collected_test_is_in_exactly_one_tier(request):
    items = request.session.items
    assert request.node in items
    for item in items:
        names = {m.name for m in item.iter_markers()}
        assert len(names & set(TIERS)) == 1, (item.nodeid, sorted(names))
        if "unit" in names:
            assert not names & set(NEEDS), (item.nodeid, sorted(names))


def test_pyproject_registers_the_tiers_and_the_needs():
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert {line.split(":", 1)[0] for line in ini["markers"]} == set(TIERS) | set(NEEDS)
    assert "--strict-markers" in ini["addopts"].split()  # a misspelt marker is an error
