"""The manifest schema (edgerun.manifest) is the one contract: both sides, page, refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from edgerun import RunnerError
from edgerun import manifest as schema

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit


def test_bundle_format_page_is_what_the_schema_generates():
    page = (ROOT / "docs" / "bundle-format.md").read_text()
    assert page == schema.markdown() + "\n", "run `make docs` and commit docs/bundle-format.md"


def test_server_and_device_share_one_schema():
    from edgetl import manifest as server

    assert server.SCHEMA_VERSION == schema.SCHEMA_VERSION
    assert server.sha256_file is schema.sha256_file
    # every field of the server's writer is a key of the device's schema, and back
    import dataclasses

    fields = {f.name for f in dataclasses.fields(server.Manifest)}
    assert fields == set(schema.Manifest.__annotations__)


def test_every_manifest_an_export_writes_passes_the_device_schema(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert schema.check(m) is m


@pytest.mark.parametrize("path, value, message", [
    (("schema_version",), 1, "schema_version 1 is not supported"),
    (("schema_version",), "2", "schema_version '2' is not supported"),
    (("labels",), "abc", "manifest.labels must be a list"),
    (("labels",), ["a", "a", "b"], "labels must be distinct"),
    (("head", "params", 0, "shape"), [3, "8"], r"manifest.head.params\[0\].shape\[1\] must be an"
                                               " integer"),
    (("files", "backbone", "sha256"), 5, r"files\['backbone'\].sha256 must be a str"),
    (("input", "batch_size"), 1.5, "manifest.input.batch_size must be an integer"),
    (("optimizer", "hparams", "lr"), "fast", r"hparams\['lr'\] must be a number"),
    (("train_step", "dynamic_classes"), "yes", "dynamic_classes must be a bool"),
    (("adapt",), None, "manifest.adapt must be an object"),
    (("test_vectors", "atol"), True, "atol must be a number"),
])
def test_wrong_types_are_refused_with_the_field_path(tiny_bundle, path, value, message):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    bad = copy.deepcopy(m)
    node = bad
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(RunnerError, match=message):
        schema.check(bad)


def test_missing_keys_are_named(tiny_bundle):
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    del m["train_step"]["hparam_inputs"], m["features"]
    with pytest.raises(RunnerError, match=r"manifest lacks \['features'\]"):
        schema.check(m)
    m["features"] = {"name": "f", "dim": 8}
    with pytest.raises(RunnerError, match=r"manifest.train_step lacks \['hparam_inputs'\]"):
        schema.check(m)


def test_path_guard_refuses_escapes(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ok.bin").write_bytes(b"x")
    (tmp_path / "outside").write_bytes(b"y")
    (tmp_path / "b" / "link").symlink_to(tmp_path / "outside")
    assert schema.safe_path(str(tmp_path / "b"), "ok.bin").endswith("ok.bin")
    for rel in ("../outside", "/etc/passwd", "link", "sub/../../outside", "ok.bin\x00"):
        with pytest.raises(RunnerError, match="points outside the bundle"):
            schema.safe_path(str(tmp_path / "b"), rel)
