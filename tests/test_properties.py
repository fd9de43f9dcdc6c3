"""Property-based tests: the manifest parser and the data loaders never crash on garbage.

Whatever bytes or arrays arrive, the runner either accepts them or raises ``RunnerError``
(one clear line on the command line) — never another exception.
"""

import json
import shutil
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from .conftest import RUNNER, WINDOW

sys.path.insert(0, str(RUNNER.parent))
from edgerun import RunnerError  # noqa: E402
from edgerun import data as dataio  # noqa: E402
from edgerun.bundle import Bundle  # noqa: E402

pytestmark = pytest.mark.unit

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                        max_size=4),
                    max_leaves=20)


@pytest.fixture(scope="module")
def manifest(tiny_bundle):
    return json.loads((tiny_bundle / "manifest.json").read_text())


@SETTINGS
@given(raw=st.binary(max_size=300))
def test_arbitrary_manifest_bytes(raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    (root / "manifest.json").write_bytes(raw)
    with pytest.raises(RunnerError):
        Bundle(str(root))


@SETTINGS
@given(key=st.sampled_from(["schema_version", "target", "files", "input", "labels", "head",
                            "optimizer", "train_step", "test_vectors"]), value=JSON)
def test_manifest_fields_replaced_by_garbage(key, value, manifest, tiny_bundle,
                                             tmp_path_factory):
    root = tmp_path_factory.mktemp("b")
    shutil.copytree(tiny_bundle, root, dirs_exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({**manifest, key: value}))
    try:
        b = Bundle(str(root))
        b.path("backbone")
        Bundle(str(root)).labels  # noqa: B018
    except RunnerError:
        pass


@SETTINGS
@given(x=hnp.arrays(st.sampled_from([np.float32, np.float64, np.int16, np.uint8, np.bool_]),
                    st.sampled_from([(5,), (3, WINDOW), (4, WINDOW, 3), (2, WINDOW, 4),
                                     (6, 16, 3), (0, WINDOW, 3), (2, WINDOW, 3, 1)])),
       y=st.one_of(st.none(), st.lists(st.text(min_size=0, max_size=4), max_size=50)))
def test_npz_loader_accepts_or_refuses_cleanly(x, y, manifest, tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "d.npz"
    arrays = {"x": x} if y is None else {"x": x, "y": np.array(y, dtype=str)}
    np.savez(path, **arrays)
    try:
        ds = dataio.load(str(path), manifest, need_labels=False)
    except RunnerError:
        return
    assert ds.x.shape[1:] == (WINDOW, 3) and np.isfinite(ds.x).all()
    assert ds.y is None or len(ds.y) == len(ds.x)


@SETTINGS
@given(text=st.text(max_size=400))
def test_csv_loader_accepts_or_refuses_cleanly(text, manifest, tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "log.csv"
    path.write_text(text)
    try:
        ds = dataio.load(str(path), manifest, need_labels=False)
    except RunnerError:
        return
    assert ds.x.ndim == 3 and np.isfinite(ds.x).all()


def test_no_unsafe_deserialisation_anywhere():
    """No pickle on the device; weights-only torch loads and no bare pickle on the server."""
    import ast
    from pathlib import Path

    root = RUNNER.parents[1]
    for path in [*root.joinpath("device_runners").rglob("*.py"),
                 *root.joinpath("edgetl").rglob("*.py"), *root.joinpath("tools").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                assert isinstance(node.value, ast.Constant) and node.value.value is False, path
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" and \
                    getattr(node.func.value, "id", "") == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                assert getattr(kw.get("weights_only"), "value", None) is True, path
            if isinstance(node, ast.Attribute) and node.attr in ("load", "loads") and \
                    getattr(node.value, "id", "") == "pickle":
                raise AssertionError(f"{path}: bare pickle.{node.attr}")
        if "device_runners" in path.parts:
            assert "import pickle" not in path.read_text(), path
    assert Path(root / "edgetl" / "data" / "hapt.py").read_text().count("Unpickler") >= 1
