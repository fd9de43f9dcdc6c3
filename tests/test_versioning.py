"""Bundle versions: manifest version/parent, a new head version, and the device's update."""

import json

import numpy as np
import pytest

from edgetl.errors import ConfigError
from edgetl.manifest import MANIFEST, Manifest, sha256_file
from edgetl.versioning import publish_head

from .conftest import SHIFT, export_tiny, run_runner, tiny_checkpoint, write_device_npz


def _head(bundle):
    m = Manifest.read(bundle)
    with np.load(bundle / m.files["head_init"].path) as z:
        return {p["name"]: z[p["name"]] for p in m.head["params"]}


@pytest.fixture(scope="module")
def versions(tiny_bundle, tmp_path_factory):
    """v1 (the export) and v2: the same backbone, a different head."""
    params = {k: v + 0.05 * np.sign(v) for k, v in _head(tiny_bundle).items()}
    v2 = tmp_path_factory.mktemp("v2") / "bundle"
    publish_head(tiny_bundle, v2, params, note={"why": "test"})
    return tiny_bundle, v2, params


@pytest.mark.unit
def test_an_export_is_version_1_and_schema_1_manifests_are_refused(tiny_bundle):
    from edgetl.errors import BundleError

    raw = json.loads((tiny_bundle / MANIFEST).read_text())
    assert raw["version"] == 1 and raw["parent"] is None  # an export is version 1
    del raw["version"], raw["parent"]
    with pytest.raises(BundleError, match=r"lacks \['parent', 'version'\]"):
        Manifest.from_json(json.dumps(raw))
    raw["schema_version"] = 1  # schema 1 (before the typed schema): refused, not guessed at
    with pytest.raises(BundleError, match="schema_version 1 is not supported.*re-export"):
        Manifest.from_json(json.dumps(raw))


def test_publish_head_writes_version_2_with_its_parent(versions):
    v1, v2, params = versions
    m1, m2 = Manifest.read(v1), Manifest.read(v2)
    assert m2.version == 2
    assert m2.parent["version"] == 1
    assert m2.parent["manifest_sha256"] == sha256_file(v1 / MANIFEST)
    assert m2.files["backbone"].sha256 == m1.files["backbone"].sha256
    assert m2.files["head_init"].sha256 != m1.files["head_init"].sha256
    got = _head(v2)
    assert all(np.array_equal(got[k], params[k].astype(np.float32)) for k in params)
    m2.verify(v2)
    # The recomputed reference logits and train steps pass the device self-test.
    p = run_runner("selftest", v2, "--json", check=True)
    assert json.loads(p.stdout)["ok"]
    with pytest.raises(ConfigError, match="do not match"):
        publish_head(v1, v2.parent / "bad", {"weight": np.zeros((2, 2))})


@pytest.mark.unit
def test_publish_head_refuses_a_signed_parent_without_a_key(tiny_bundle, tmp_path):
    from edgetl.signing import keygen, verify_bundle

    priv, pub = keygen(tmp_path / "keys")
    signed = export_tiny(tiny_checkpoint(), tmp_path / "signed", sign_key=priv)
    with pytest.raises(ConfigError, match="signed"):
        publish_head(signed, tmp_path / "v2", _head(signed))
    publish_head(signed, tmp_path / "v2", _head(signed), sign_key=priv)
    verify_bundle(tmp_path / "v2", pub)


def _update(bundle, state, *extra):
    p = run_runner("update", bundle, "--state", state, "--json", "--quiet", *extra, check=True)
    return json.loads(p.stdout)


def test_device_keeps_its_personal_head_when_the_backbone_is_unchanged(versions, tmp_path):
    v1, v2, _ = versions
    state = tmp_path / "state"
    data = write_device_npz(tmp_path / "d.npz", 120, seed=2, **SHIFT)
    run_runner("adapt", v1, "--data", data, "--out", state, "--epochs", "5", "--quiet",
               check=True)
    before = (state / "head.npz").read_bytes()
    res = _update(v2, state)
    assert res["action"] == "kept" and res["to"]["version"] == 2
    assert (state / "head.npz").read_bytes() == before
    assert json.loads((state / "bundle.json").read_text())["version"] == 2
    # The kept head runs with the new bundle.
    run_runner("infer", v2, "--data", data, "--head", state / "head.npz", "--quiet", check=True)


def test_device_readapts_or_resets_when_the_backbone_changed(tiny_bundle, tmp_path):
    other = export_tiny(tiny_checkpoint(epochs=6), tmp_path / "other")  # new backbone weights
    assert (Manifest.read(other).files["backbone"].sha256
            != Manifest.read(tiny_bundle).files["backbone"].sha256)
    data = write_device_npz(tmp_path / "d.npz", 120, seed=2, **SHIFT)
    for mode in ("readapted", "reset"):
        state = tmp_path / mode
        run_runner("adapt", tiny_bundle, "--data", data, "--out", state, "--epochs", "5",
                   "--quiet", check=True)
        res = _update(other, state, *(["--data", data, "--epochs", "5"]
                                      if mode == "readapted" else []))
        assert res["action"] == mode, res
        assert "backbone changed" in res["message"]
        with np.load(state / "head.npz") as z:  # the head now belongs to the new backbone
            meta = json.loads(str(z["__meta__"]))
        assert meta["backbone_sha256"] == Manifest.read(other).files["backbone"].sha256
        assert (tmp_path / mode / res["stale_head"].split("/")[-1]).is_file()
        # The old head is refused by the new bundle, the current one is accepted.
        run_runner("infer", other, "--data", data, "--head", state / "head.npz", "--quiet",
                   check=True)
        bad = run_runner("infer", other, "--data", data, "--head", res["stale_head"])
        assert bad.returncode == 1 and "another backbone" in bad.stderr


def test_an_older_bundle_version_is_refused_after_a_newer_one_unless_allowed(versions,
                                                                             tmp_path):
    """Replay / downgrade (TUF's rule): v2 accepted, then v1 is refused by update and adapt."""
    v1, v2, _ = versions
    state = tmp_path / "state"
    data = write_device_npz(tmp_path / "d.npz", 120, seed=2, **SHIFT)
    run_runner("adapt", v2, "--data", data, "--out", state, "--epochs", "2", "--quiet",
               check=True)
    assert json.loads((state / "versions.json").read_text()) == {
        Manifest.read(v2).name: 2}
    head, report = (state / "head.npz").read_bytes(), (state / "report.json").read_bytes()
    for cmd in (["update", v1, "--state", state], ["adapt", v1, "--data", data, "--out", state]):
        p = run_runner(*cmd, "--quiet")
        assert p.returncode == 1 and "is version 1, but this device already accepted " \
            "version 2" in p.stderr and "--allow-downgrade" in p.stderr, p.stderr
        assert p.stderr.count("error:") == 1 and "Traceback" not in p.stderr
        assert (state / "head.npz").read_bytes() == head  # nothing was written
        assert (state / "report.json").read_bytes() == report
    # a deliberate rollback is accepted, and becomes the version later runs are held to
    run_runner("adapt", v1, "--data", data, "--out", state, "--epochs", "1", "--quiet",
               "--allow-downgrade", check=True)
    assert json.loads((state / "versions.json").read_text()) == {Manifest.read(v1).name: 1}
    run_runner("adapt", v1, "--data", data, "--out", state, "--epochs", "1", "--quiet",
               check=True)
    (state / "versions.json").write_text("{not json")
    p = run_runner("adapt", v1, "--data", data, "--out", state, "--quiet")
    assert p.returncode == 1 and "version record" in p.stderr and "delete it" in p.stderr
