"""Issue 21 item 7, the remaining traceback cases: each ends in one ``error:`` line, exit 1.

Damaged nested manifest fields, bundle ``.npz`` files that match their sha256 but were written
wrong, heads of another shape, NUL bytes in paths, deeply nested JSON, CSV encodings, a damaged
training state under ``--resume``, and bad flag values. Most run ``run.main`` in-process (the
same code path as the command line, without a process start per case); a few run the runner
as a device does.
"""

import hashlib
import json
import shutil
import sys

import numpy as np
import pytest

from .conftest import RUNNER, SHIFT, run_runner, write_device_npz

sys.path.insert(0, str(RUNNER.parent))
import run  # noqa: E402


def main(capsys, *argv) -> tuple[int, str]:
    """``run.main(argv)`` in-process: (exit code, stderr); SystemExit is an exit code."""
    try:
        rc = run.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def refused(rc_err, match: str) -> str:
    """Exit 1 and exactly one ``error:`` line containing ``match``; return the line."""
    rc, err = rc_err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("INFO:")]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert match in lines[0], lines[0]
    return lines[0]


def edit(bundle, path: str, value=..., delete: bool = False) -> None:
    """Set (or delete) the nested manifest field ``a.b.0.c`` of ``bundle``."""
    m = json.loads((bundle / "manifest.json").read_text())
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = m
    for k in parents:
        node = node[k]
    if delete:
        del node[last]
    else:
        node[last] = value
    (bundle / "manifest.json").write_text(json.dumps(m))


def rehash(bundle, role: str) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    body = (bundle / m["files"][role]["path"]).read_bytes()
    m["files"][role].update(sha256=hashlib.sha256(body).hexdigest(), bytes=len(body))
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_device_npz(tmp_path_factory.mktemp("d") / "ok.npz", 120, seed=2, **SHIFT)


# Each edit ended in a traceback before (KeyError, TypeError, IndexError, MemoryError or the
# runtime's "missing input"); now the manifest check or the graph check names the field.
EDITS = [
    ("input.preprocess.normalize.mean", {"a": 1}, "normalize.mean"),
    ("input.preprocess.normalize.std", ["x", 1, 2], "normalize.std"),
    ("input.preprocess.normalize.std", None, "normalize.std"),
    ("input.preprocess.normalize", 3, "normalize"),
    ("input.channels", ..., "channels"),
    ("train_step.hparam_inputs.0", "x", "hparam_inputs"),
    ("train_step.hparam_inputs.2", ..., "train_step.inputs"),
    ("train_step.inputs.0", "x", "train_step.inputs"),
    ("train_step.loss_output", "x", "train_step"),
    ("optimizer.state.0.like", "x", "optimizer.state[0].like"),
    ("optimizer.state.1", ..., "train_step.inputs"),
    ("optimizer.state.0", {"name": "momentum.weight", "like": None, "shape": [10**7, 10**7]},
     "optimizer.state[0].shape"),
    ("optimizer.hparams.lr", ..., "hparam_inputs"),
    ("infer.inputs", [], "infer.inputs"),
    ("infer.inputs.1", "x", "infer.inputs"),
    ("infer.inputs.0", "x", "infer.inputs"),
    ("infer.file", "x", "infer.file"),
    ("files.backbone", ..., "files"),
    ("head.class_params", ["weight"], "class_params"),
    ("head.params.0.name", "x", "head"),
    ("head.params.0.shape", [-1, 8], "head.params[0].shape[0]"),
]


@pytest.mark.parametrize("path,value,match", EDITS, ids=[e[0] + ("-del" if e[1] is ... else "")
                                                          for e in EDITS])
def test_nested_manifest_edits_are_one_error_line(bundle, data, capsys, path, value, match):
    edit(bundle, path, value, delete=value is ...)
    for cmd in (["selftest", bundle], ["infer", bundle, "--data", data]):
        line = refused(main(capsys, *cmd), match)
        assert "re-export" in line


@pytest.mark.parametrize("path,value,match", [
    ("quantization.input", ..., "quantization.input"),
    ("quantization.output", ..., "quantization.output"),
    ("input.name", "x", "input.name"),
    ("features.name", "x", "features.name"),
    ("input.dtype", "x", "input.dtype"),
])
def test_tflite_manifest_edits_are_one_error_line(tiny_tflite_int8_bundle, tmp_path, capsys,
                                                  path, value, match):
    b = tmp_path / "b"
    shutil.copytree(tiny_tflite_int8_bundle, b)
    edit(b, path, value, delete=value is ...)
    refused(main(capsys, "selftest", b), match)


@pytest.mark.parametrize("role", ["head_init", "test_vectors"])
@pytest.mark.parametrize("damage,match", [
    ("renamed", "lacks the arrays"), ("wrong_shape", ""), ("text", "is not numeric"),
    ("object", "holds Python objects"), ("truncated", "not a readable .npz"),
])
def test_bundle_npz_with_a_matching_hash_is_checked(bundle, data, tmp_path, capsys, role,
                                                    damage, match):
    path = bundle / f"{role}.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    first = sorted(arrays)[0]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        arrays = {"renamed": {"zz" + k: v for k, v in arrays.items()},
                  "wrong_shape": {k: v.reshape(-1)[:1] for k, v in arrays.items()},
                  "text": {k: np.array(["a"] * v.size) for k, v in arrays.items()},
                  "object": {**arrays, first: np.array([1, "a"], dtype=object)},
                  }[damage]
        np.savez(path, **arrays)
    rehash(bundle, role)
    refused(main(capsys, "selftest", bundle), match)
    refused(main(capsys, "adapt", bundle, "--data", data, "--out", tmp_path / "s"), match)


def test_a_head_of_the_wrong_shape_is_refused(bundle, data, tmp_path, capsys):
    assert main(capsys, "adapt", bundle, "--data", data, "--out", tmp_path / "s",
                "--epochs", "1")[0] == 0
    with np.load(tmp_path / "s" / "head.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["weight"] = arrays["weight"][:, :4]
    np.savez(tmp_path / "bad.npz", **arrays)
    for cmd in (["infer", bundle, "--data", data],
                ["adapt", bundle, "--data", data, "--out", tmp_path / "s2"]):
        refused(main(capsys, *cmd, "--head", tmp_path / "bad.npz"),
                "head parameter 'weight' has shape (3, 4), the bundle's head needs (3, 8)")


def test_nul_bytes_in_paths_are_one_error_line(bundle, data, tmp_path, capsys):
    for argv in (["infer", bundle, "--data", "a\x00b.npz"],
                 ["infer", bundle, "--data", data, "--head", "h\x00.npz"],
                 ["adapt", bundle, "--data", data, "--out", f"{tmp_path}/o\x00"],
                 ["selftest", bundle, "--trust-key", "k\x00"]):
        refused(main(capsys, *argv), "contains a NUL byte")
    edit(bundle, "files.backbone.path", "back\x00bone.onnx")
    refused(main(capsys, "selftest", bundle), "points outside the bundle")


def test_json_nested_100k_levels_is_one_error_line_or_a_warning(bundle, data, tmp_path,
                                                                 capsys):
    deep = "[" * 100_000 + "]" * 100_000
    state = tmp_path / "s"
    assert main(capsys, "adapt", bundle, "--data", data, "--out", state, "--epochs", "1")[0] == 0
    good = (state / "head.npz").read_bytes()
    for name in ("bundle.json", "report.json"):  # records: rewritten, the head kept
        (state / name).write_text(deep)
        rc, err = main(capsys, "update", bundle, "--state", state)
        assert rc == 0 and "Traceback" not in err, err
        assert (state / "head.npz").read_bytes() == good
    (state / "versions.json").write_text(deep)
    refused(main(capsys, "adapt", bundle, "--data", data, "--out", state), "versions.json")
    assert (state / "head.npz").read_bytes() == good
    (bundle / "manifest.json").write_text(deep)
    refused(main(capsys, "selftest", bundle), "not valid JSON")


def _csv(n: int = 12 * 16 + 16, label: str = "slow") -> str:
    rng = np.random.default_rng(0)
    rows = [f"{i / 50:.3f},{a:.4f},{b:.4f},{c:.4f},{label if i < n // 2 else 'fast'}"
            for i, (a, b, c) in enumerate(rng.normal(size=(n, 3)))]
    return "\n".join(["t,ax,ay,az,label", *rows]) + "\n"


def test_csv_encodings(bundle, tmp_path, capsys):
    """UTF-16 with a BOM is read; Latin-1, BOM-less UTF-16 and a 200 KiB field are refused."""
    (tmp_path / "u16.csv").write_bytes(_csv().encode("utf-16"))
    rc, err = main(capsys, "infer", bundle, "--data", tmp_path / "u16.csv")
    assert rc == 0, err
    (tmp_path / "l1.csv").write_bytes(_csv(label="slów").encode("latin-1"))
    refused(main(capsys, "infer", bundle, "--data", tmp_path / "l1.csv"),
            "CSV files must be UTF-8 (or UTF-16 with a byte-order mark)")
    (tmp_path / "u16le.csv").write_bytes(_csv().encode("utf-16-le"))
    refused(main(capsys, "infer", bundle, "--data", tmp_path / "u16le.csv"),
            "UTF-16 text without a byte-order mark")
    (tmp_path / "big.csv").write_text(_csv(label="s" * (200 << 10)))
    refused(main(capsys, "infer", bundle, "--data", tmp_path / "big.csv"),
            "field larger than field limit")


@pytest.mark.unit
def test_text_csv_encodings_and_a_huge_field(tmp_path):
    from edgerun import RunnerError
    from edgerun.text import read_text_table

    (tmp_path / "u16.csv").write_bytes("text,label\nhello,a\n".encode("utf-16"))
    assert read_text_table(str(tmp_path / "u16.csv"), ("label",))[0] == ["hello"]
    (tmp_path / "big.csv").write_text("text,label\n" + "x" * (200 << 10) + ",a\n")
    with pytest.raises(RunnerError, match="field larger than field limit"):
        read_text_table(str(tmp_path / "big.csv"), ("label",))


@pytest.mark.parametrize("damage", ["garbage", "missing_arrays", "bad_rng"])
def test_a_damaged_training_state_is_a_warning_and_a_fresh_run(bundle, data, tmp_path, capsys,
                                                               monkeypatch, damage):
    import os

    state = tmp_path / "s"
    ts = state / "train_state.npz"
    args = ["adapt", bundle, "--data", data, "--out", state, "--epochs", "3",
            "--checkpoint-every", "0", "--quiet"]
    if damage == "garbage":
        state.mkdir()
        ts.write_bytes(b"PK\x03\x04garbage")
    else:  # the state of this very run (kept: as if killed at the end), damaged inside
        with monkeypatch.context() as mp:
            mp.setattr(os, "unlink", lambda path: None)
            assert main(capsys, *args)[0] == 0 and ts.exists()
        # as if killed mid-training: no finished commit (its journal) or report to recover
        for name in ("commit.journal", "report.json"):
            (state / name).unlink(missing_ok=True)
        with np.load(ts) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays["__meta__"]))
        if damage == "missing_arrays":
            arrays = {k: v for k, v in arrays.items() if not k.startswith("p.")}
        else:
            meta["rng"] = {"bit_generator": "nope"}
        arrays["__meta__"] = np.array(json.dumps(meta))
        np.savez(ts, **arrays)
    p = run_runner(*args[:-1], "--resume", "--json")
    assert p.returncode == 0, p.stderr
    assert "warning: damaged training state train_state.npz" in p.stderr
    assert "starting over" in p.stderr and "Traceback" not in p.stderr
    assert any("damaged training state" in w for w in json.loads(p.stdout)["warnings"])
    assert not ts.exists()


@pytest.mark.parametrize("argv,match", [
    (["bench", "B", "--threads", "nan"], "argument --threads: invalid int value: 'nan'"),
    (["adapt", "B", "--data", "d", "--out", "o", "--epochs", "x"], "invalid int value: 'x'"),
    (["selftest", "B", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required"),
])
def test_bad_flags_are_one_error_line_and_exit_1(argv, match):
    p = run_runner(*argv)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert match in lines[0] and "usage:" not in p.stderr


@pytest.mark.parametrize("argv,match", [
    (["infer", "B", "--data", "D", "--out", "/dev/null"], "output folder /dev/null is a file"),
    (["update", "B", "--state", ""], "--state is empty"),
    (["adapt", "B", "--data", "D", "--out", ""], "--out is empty"),
    (["bench", "B", "--batch", "1000000000"], "--batch must be a finite number >= 1 and <= "),
])
def test_cases_the_fuzz_test_found(bundle, data, capsys, argv, match):
    """Found by tests/test_fuzz.py: FileExistsError, FileNotFoundError (or the current folder
    taken as the state folder), MemoryError (a 358 GiB throughput batch)."""
    argv = [{"B": bundle, "D": data}.get(a, a) for a in argv]
    refused(main(capsys, *argv), match)


@pytest.mark.unit
@pytest.mark.parametrize("line,match", [
    ('server_users = ["a", 2]', "server_users: expected a list of int, found ['a']"),
    ("device_users = [1.5]", "device_users: expected a list of int, found [1.5]"),
    ("server_val_users = [true]", "expected a list of int, found [True]"),
])
def test_recipe_lists_of_user_ids_hold_integers(tmp_path, line, match):
    """Server side (issue 21 item 14): was a misleading "must be a subset" or no data."""
    from edgetl.config import load_recipe
    from edgetl.errors import EdgetlError

    (tmp_path / "r.toml").write_text(f"[data]\n{line}\n")
    with pytest.raises(EdgetlError, match=match.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(tmp_path / "r.toml")


# -- "Also seen": the int8 self-test tolerance, from the quantisation scale ----------------


def _old_rule_error(bundle_dir) -> float:
    """The self-test error as the runner measured it before: max of the feature error and
    the error of logits computed from the *device's* features (which carry the backbone's)."""
    from edgerun import data as dataio
    from edgerun.adapt import _infer, test_vectors
    from edgerun.backends import make_backend
    from edgerun.bundle import Bundle
    from edgerun.head import Head

    b = Bundle(str(bundle_dir))
    be, tv = make_backend(b), test_vectors(b)
    f = be.features(dataio.preprocess(tv["x"], b.manifest))
    lg = _infer(be, b, Head.from_bundle(b), f)["logits"]
    return max(float(np.abs(f - tv["features"]).max()), float(np.abs(lg - tv["logits"]).max()))


def test_int8_selftest_tolerance_is_a_few_quantisation_steps(tiny_ck, tiny_tflite_int8_bundle,
                                                             tmp_path, capsys):
    """A byte-flipped int8 backbone (manifest re-hashed) that moves features by a few steps
    passed the old rule (2 % of the largest logit: wide when logits are large, as in the
    issue's 0.18 < 0.26); now features must be within 2 output steps and fail.

    The checkpoint's class biases are raised by 10 (softmax and argmax are unchanged) so the
    logits are large, like the issue's model; the old tolerance becomes ~0.2.
    """
    import copy

    import torch

    from .conftest import export_tiny

    ck = copy.deepcopy(tiny_ck)
    with torch.no_grad():
        ck.model.head.fc.bias.add_(10.0)
    good = export_tiny(ck, tmp_path / "good", "tflite", "int8")
    m = json.loads((good / "manifest.json").read_text())
    tv, step = m["test_vectors"], m["quantization"]["output"]["scale"]
    assert tv["atol"] == pytest.approx(2.5 * step) and "logits_atol" in tv
    assert "steps of the backbone's output quantisation scale" in m["checks"][
        "selftest_tolerance"]
    with np.load(good / "test_vectors.npz") as z:
        old_atol = 0.02 * max(np.abs(z["features"]).max(), np.abs(z["logits"][:, :3]).max())
    assert old_atol > 5 * tv["atol"]
    for b in (good, tiny_tflite_int8_bundle):  # genuine bundles pass
        assert main(capsys, "selftest", b)[0] == 0
    # flip one bit in the weights until the features move by 3+ steps but less than old_atol
    flipped = tmp_path / "flipped"
    shutil.copytree(good, flipped)
    body0 = (good / "backbone.tflite").read_bytes()
    for off in range(len(body0) // 4, len(body0)):
        body = bytearray(body0)
        body[off] ^= 0x10
        (flipped / "backbone.tflite").write_bytes(bytes(body))
        rehash(flipped, "backbone")
        rc, err = main(capsys, "selftest", flipped)
        if rc == 1 and "backbone features differ" in err:
            got = float(err.split(" by ")[1].split(" ")[0])
            if got <= old_atol and _old_rule_error(flipped) <= old_atol:
                break
    else:
        pytest.fail("no bit flip moved the int8 features by a few steps")
    refused((rc, err), f"by {got:.3g} (> {tv['atol']:.3g})")


def test_a_tflite_model_that_fails_in_the_interpreter_is_one_error_line(
        tiny_tflite_int8_bundle, tmp_path, capsys):
    """A bit flip (sha256 re-hashed) that still loads but makes LiteRT fail to prepare or
    invoke ("unsupported scale value (-nan) … failed to prepare") was a RuntimeError traceback;
    now one line naming the runtime and the file. Every flip ends in success or one line."""
    b = tmp_path / "b"
    shutil.copytree(tiny_tflite_int8_bundle, b)
    body0 = (b / "backbone.tflite").read_bytes()
    for off in range(len(body0) // 4, len(body0)):
        body = bytearray(body0)
        body[off] ^= 0x40
        (b / "backbone.tflite").write_bytes(bytes(body))
        rehash(b, "backbone")
        rc, err = main(capsys, "selftest", b)
        assert rc == 0 or len(err.strip().splitlines()) == 1, err
        if "failed to run" in err:
            break
    else:
        pytest.fail("no bit flip made the interpreter fail")
    refused((rc, err), "ai-edge-litert")
    assert "backbone.tflite" in err and "re-download the bundle" in err


@pytest.mark.parametrize("start,stop,xor,found", [
    (200, 800, 0xFF, "failed to run"),  # the tensor table: names, indices
    (3150, 3300, 0x01, "returned features of shape"),  # the output tensor's shape
])
def test_every_flipped_byte_in_parts_of_the_int8_backbone_is_success_or_one_line(
        tiny_tflite_int8_bundle, tmp_path, capsys, start, stop, xor, found):
    """Every byte of a stretch of the int8 backbone, damaged in turn with the manifest
    re-hashed: the self-test passes or ends in one error line. Found (tracebacks before): a
    damaged tensor name (UnicodeDecodeError) or an index beyond int32 (TypeError from the
    C++ wrapper) when reading tensor details; a damaged output shape, so the backbone
    returned (4, 8, 32) features (a numpy broadcast ValueError in the self-test)."""
    b = tmp_path / "b"
    shutil.copytree(tiny_tflite_int8_bundle, b)
    body0 = (b / "backbone.tflite").read_bytes()
    seen = 0
    for off in range(start, min(stop, len(body0))):
        body = bytearray(body0)
        body[off] ^= xor
        (b / "backbone.tflite").write_bytes(bytes(body))
        rehash(b, "backbone")
        rc, err = main(capsys, "selftest", b)
        if rc != 0:
            refused((rc, err), "error")
            seen += found in err
    assert seen, f"no damage in bytes {start}-{stop} led to {found!r}"


def test_flipped_bits_in_the_onnx_backbone_are_success_or_one_line(bundle, capsys):
    """Two stretches of the ONNX backbone, one bit flipped at a time (manifest re-hashed):
    the self-test passes or ends in one error line. Found: graphs that load but fail in
    ``run`` ("Fail", "InvalidArgument" from a kernel), tracebacks before."""
    body0 = (bundle / "backbone.onnx").read_bytes()
    seen = 0
    for off in [*range(220, 260), *range(1070, min(1100, len(body0)))]:
        body = bytearray(body0)
        body[off] ^= 0x01
        (bundle / "backbone.onnx").write_bytes(bytes(body))
        rehash(bundle, "backbone")
        rc, err = main(capsys, "selftest", bundle)
        if rc != 0:
            refused((rc, err), "error")
            seen += "failed to run" in err
    assert seen, "no flip reached onnxruntime's run-time checks"
