"""TFLite bundles in LiteRT.js (``@litertjs/core``, WASM CPU build) in headless Chromium.

The page ``tests/web/litert/`` runs signature calls with LiteRT.js loaded from node_modules
(served beside it on 127.0.0.1; no CDN) and returns the outputs; ``tests/web/litert_drive.mjs``
drives Debian's Chromium with playwright-core. Per bundle (fp32, int8 with float32 graph
I/O) the page replays the device self-test: backbone features of the shipped test vectors,
the head's ``infer`` on the shipped features, and the 3 reference train steps chained (the
new parameters and momentum fed back). Each is compared with the shipped vectors within the
bundle's tolerances and with the Python runner (``edgerun.backends``, ai-edge-litert) on the
same inputs. An int8 backbone with int8 graph I/O is still refused by LiteRT.js 2.5.3
(``Element type INT8 is not supported``): the reason ``export.int8_io`` defaults to float32.

``tests/web/litert/runner.html`` runs the TypeScript runner (``device_runners/js/dist``) with
its ``LiteRtBackend``: self-test, ``infer``, ``adapt`` and ``infer`` with the kept head, compared
with ``run.py adapt`` / ``run.py infer`` on the same bundle, data and seed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, SHIFT, run_runner, write_device_npz
from tests.jsrunner import HEAD_ATOL, JS, compare_reports, csv_log, head_diff

PAGE = ROOT / "tests" / "web" / "litert"
DRIVER = ROOT / "tests" / "web" / "litert_drive.mjs"
SERVE = ROOT / "device_runners" / "web" / "serve.mjs"
CHROMIUM = os.environ.get("EDGETL_CHROMIUM", "/usr/bin/chromium")
LITERT = JS / "node_modules" / "@litertjs"


def _t(a) -> dict:
    a = np.asarray(a, np.float32)
    return {"data": a.ravel().tolist(), "dims": list(a.shape)}


def _plan(bundle: Path, key: str):
    """Calls replaying ``bundle``'s self-test, and what the Python runner gives for them."""
    from edgerun import data as dataio
    from edgerun.backends import make_backend
    from edgerun.bundle import Bundle

    b = Bundle(str(bundle))
    m = b.manifest
    sess = make_backend(b, 1)
    ts = m["train_step"]
    z = dict(np.load(bundle / m["files"]["test_vectors"]["path"]))
    init = dict(np.load(bundle / m["files"]["head_init"]["path"]))
    x = dataio.preprocess(z["x"], m).astype(np.float32)
    calls = [{"model": f"{key}/backbone", "signature": m["input"]["signature"],
              "feeds": {m["input"]["name"]: _t(x[i : i + 1])}} for i in range(len(x))]
    want = {"features": sess.features(x)}
    batch = int(ts["batch_size"])
    f = np.zeros((batch, z["features"].shape[1]), np.float32)
    f[: len(z["features"])] = z["features"].astype(np.float32)
    calls.append({"model": f"{key}/head", "signature": m["infer"]["signature"],
                  "feeds": {"features": _t(f), **{k: _t(v) for k, v in init.items()}}})
    want["infer"] = sess.infer({"features": f, **init})
    hp_dims = ts.get("hparam_shape", [])
    hp = {k: np.full(hp_dims, m["optimizer"]["hparams"][k], np.float32)
          for k in ts["hparam_inputs"]}
    params = dict(init)
    state = {s["name"]: np.zeros(s["shape"], np.float32) for s in m["optimizer"]["state"]}
    k = init["weight"].shape[0]
    want["train"] = []
    for i in range(len(z["train_loss"])):
        feeds = {"features": z["train_features"][i].astype(np.float32),  # stored as float16
                 "targets": np.eye(k, dtype=np.float32)[z["train_labels"][i]],
                 "sample_weight": z["train_weights"][i].astype(np.float32), **hp}
        carried = {**params, **state}
        call = {"model": f"{key}/head", "signature": ts["signature"],
                "feeds": {n: _t(v) for n, v in feeds.items()}}
        if i == 0:
            call["feeds"].update({n: _t(v) for n, v in carried.items()})
        else:
            call["carry"] = {n: f"new.{n}" for n in carried}
        calls.append(call)
        out = sess.train_step({**feeds, **carried})
        want["train"].append(out)
        params = {n: out[f"new.{n}"] for n in params}
        state = {n: out[f"new.{n}"] for n in state}
    return calls, want, z, m


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
    """A folder served on 127.0.0.1: the page, LiteRT.js from node_modules, bundles."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"skipping LiteRT.js tests: {CHROMIUM} not found (Debian: apt-get install "
                    "chromium; EDGETL_CHROMIUM=PATH for another)")
    node = request.getfixturevalue("node")
    if not (LITERT / "core" / "wasm").is_dir():
        pytest.skip("skipping LiteRT.js tests: device_runners/js/node_modules/@litertjs/core "
                    "is missing (make js-install)")
    root = tmp_path_factory.mktemp("litert") / "root"
    shutil.copytree(PAGE, root)
    (root / "core").symlink_to(LITERT / "core")
    (root / "wasm-utils").symlink_to(LITERT / "wasm-utils")
    (root / "edgerun").symlink_to(JS / "dist")  # the TypeScript runner (runner.html)
    server = subprocess.Popen([node, str(SERVE), "--port", "0", "--root", str(root)],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), line
        yield node, root, line.split()[1]
    finally:
        server.terminate()
        server.wait(10)


def _run_page(served, bundles: dict, calls: list | None, tmp: Path,
              runner: dict | None = None) -> dict:
    """The signature-call page on ``calls``, or with ``runner`` (runner-plan.json) the
    TypeScript runner's page (``runner.html``)."""
    node, root, url = served
    for key, b in bundles.items():
        shutil.rmtree(root / key, ignore_errors=True)
        shutil.copytree(b, root / key)
    if runner is None:
        models = {f"{k}/{role}": f"./{k}/{role}.tflite" for k in bundles
                  for role in ("backbone", "head")}
        (root / "plan.json").write_text(json.dumps({"models": models, "calls": calls}))
    else:
        (root / "runner-plan.json").write_text(json.dumps(runner))
        url += "runner.html"
    p = subprocess.run([node, str(DRIVER), url, str(tmp / "profile")], capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, f"the browser driver failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
    out = json.loads(p.stdout)
    assert out["foreign_requests"] == [], "the page requested files from elsewhere"
    assert "error" not in out, out["error"]
    return out


def _arr(o: dict) -> np.ndarray:
    return np.asarray(o["data"], np.float32).reshape(o["dims"])


@pytest.mark.parametrize("which", ["fp32", "int8f"])
def test_litert_js_runs_the_selftest_and_train_steps(which, served, tiny_tflite_bundle,
                                                     tiny_tflite_int8f_bundle, tmp_path):
    b = tiny_tflite_bundle if which == "fp32" else tiny_tflite_int8f_bundle
    calls, want, z, m = _plan(b, which)
    out = _run_page(served, {which: b}, calls, tmp_path)
    assert out["loaded"] == {f"{which}/backbone": True, f"{which}/head": True}, out["loaded"]
    errs = [c["error"] for c in out["calls"] if "error" in c]
    assert not errs, errs
    res = iter(out["calls"])
    tv = m["test_vectors"]
    n = len(z["x"])
    feats = np.concatenate([_arr(next(res)["outputs"][m["features"]["name"]])
                            for _ in range(n)])
    assert np.abs(feats - z["features"]).max() <= tv["atol"]  # the device self-test
    assert np.abs(feats - want["features"]).max() <= tv["atol"]  # the Python runner
    inf = next(res)["outputs"]
    logits = _arr(inf["logits"])
    atol_l = tv.get("logits_atol", tv["atol"])
    assert np.abs(logits[:n] - z["logits"]).max() <= atol_l
    assert np.abs(logits - want["infer"]["logits"]).max() <= atol_l
    # the embedding imprinting reads is the features (an aliased output gave garbage logits)
    np.testing.assert_array_equal(_arr(inf["embedding"]), want["infer"]["embedding"])
    for i, ref in enumerate(want["train"]):
        got = next(res)["outputs"]
        assert abs(float(_arr(got["loss"])) - float(z["train_loss"][i])) <= tv["train_atol"]
        for k, v in ref.items():
            assert np.abs(_arr(got[k]).reshape(np.shape(v)) - v).max() <= tv["train_atol"], k
    for k in ("weight", "bias"):
        assert np.abs(_arr(got[f"new.{k}"]) - z[f"train_final.{k}"]).max() <= tv["train_atol"]


def test_litert_js_refuses_int8_graph_io(served, tiny_tflite_int8_bundle, tmp_path):
    """Why export.int8_io defaults to float32: LiteRT.js 2.5.3 binds no int8 tensors."""
    out = _run_page(served, {"int8": tiny_tflite_int8_bundle}, [], tmp_path)
    assert out["loaded"]["int8/head"] is True
    assert "INT8 is not supported" in str(out["loaded"]["int8/backbone"]), out["loaded"]


@pytest.fixture(scope="module")
def tflite_spare_bundle(tiny_ck, tmp_path_factory) -> Path:
    """The tiny model's fp32 TFLite bundle with 5 class rows (2 spare, bias -1e4)."""
    from tests.conftest import export_tiny

    return export_tiny(tiny_ck, tmp_path_factory.mktemp("tfls") / "bundle", "tflite",
                       class_capacity=5)


@pytest.mark.parametrize("which", ["fp32", "int8f", "spare", "rollback"])
def test_ts_runner_on_litert_js_as_the_python_runner(which, served, tiny_tflite_bundle,
                                                     tiny_tflite_int8f_bundle,
                                                     tflite_spare_bundle, tmp_path):
    """The TypeScript runner's ``LiteRtBackend`` in headless Chromium: self-test, ``infer``
    with the bundle's head, ``adapt`` (fixed train batch padded with weight 0, fixed infer
    batch, (1,) hyper-parameters) and ``infer`` with the kept head; the same head within 1e-5,
    gate, report and predictions as ``run.py adapt`` / ``run.py infer`` (ai-edge-litert) on
    the same bundle, data and seed. ``spare``: a label new to the head imprinted into a spare
    class row (``Head.add_classes`` grow=False) and one missing; ``rollback``: an unshifted
    device, where the gate keeps the shipped head."""
    b = {"fp32": tiny_tflite_bundle, "int8f": tiny_tflite_int8f_bundle,
         "spare": tflite_spare_bundle, "rollback": tiny_tflite_bundle}[which]
    if which == "rollback":
        data = csv_log(tmp_path / "plain.csv", 15)
        settings = {"seed": 9, "epochs": 6}
    elif which == "spare":
        data = write_device_npz(tmp_path / "device.npz", 90, seed=12, gain=1.2,
                                labels=("slow", "medium", "sprint"))
        settings = {"seed": 5}
    else:
        data = csv_log(tmp_path / "shifted.csv", 15, runs=100, **SHIFT)
        settings = {"seed": 9, "epochs": 15}
    _, root, _ = served
    shutil.copy(data, root / data.name)
    version = json.loads((LITERT / "core" / "package.json").read_text())["version"]
    out = _run_page(served, {which: b}, None, tmp_path, runner={
        "bundle": which, "files": sorted(f.name for f in b.iterdir()),
        "data": f"./{data.name}", "adapt": settings, "version": version})
    flags = [f"--{k}={v}" for k, v in settings.items()]
    py = tmp_path / "py"
    p = run_runner("adapt", b, "--data", data, "--out", py, "--quiet", *flags)
    assert p.returncode == 0, p.stderr
    P = json.loads((py / "report.json").read_text())
    J = out["report"]
    assert J["backend"] == "litert.js" and J["backend_version"] == version
    assert J["selftest_max_abs_err"] <= m_tol(b)
    compare_reports(P, J)  # counts, labels, gate fields and decision, history
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "head.npz").write_bytes(base64.b64decode(out["head"]))
    err = head_diff(py / "head.npz", tmp_path / "js" / "head.npz")
    assert err <= HEAD_ATOL, f"heads differ by {err:.3g} (> {HEAD_ATOL})"
    for key, head in (("infer_bundle", []), ("infer_kept", ["--head", py / "head.npz"])):
        q = run_runner("infer", b, "--data", data, "--out", tmp_path / key, *head)
        assert q.returncode == 0, q.stderr
        want = json.loads((tmp_path / key / "predictions.json").read_text())
        got = out[key]
        assert got["predictions"] == want["predictions"], key
        assert got["accuracy"] == want["accuracy"], key
    if which == "spare":
        assert J["new_labels"] == ["sprint"] and J["missing_labels"] == ["fast"]
    assert J["rolled_back"] == (which == "rollback"), J["gate"]
    print(f"\nLiteRT.js runner {which}: rolled back {J['rolled_back']}, head max abs diff "
          f"{err:.3g}, self-test err {J['selftest_max_abs_err']:.3g}, accuracy "
          f"{out['infer_bundle']['accuracy']:.3f} -> {out['infer_kept']['accuracy']:.3f}")


def m_tol(bundle: Path) -> float:
    tv = json.loads((bundle / "manifest.json").read_text())["test_vectors"]
    return max(tv["atol"], tv.get("logits_atol", tv["atol"]))
