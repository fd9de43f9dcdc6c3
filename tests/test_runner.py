"""The device runner, run as a device runs it: a subprocess with numpy + one runtime only."""

import ast
import json
import shutil
import sys

import numpy as np
import pytest

from .conftest import LABELS, ROOT, RUNNER, SHIFT, WINDOW, adapt_json, run_runner, write_device_npz


def _adapt(bundle, data, out, *extra):
    return adapt_json(bundle, data, out, "--epochs", "40", *extra)


def test_end_to_end_adaptation_on_an_easy_shift(bundle, tmp_path):
    """Given a bundle and shifted device data, the head changes, the backbone doesn't, and
    accuracy on unseen shifted data goes up."""
    before_hash = json.loads((bundle / "manifest.json").read_text())["files"]["backbone"]["sha256"]
    train = write_device_npz(tmp_path / "local.npz", 240, seed=5, **SHIFT)
    test = write_device_npz(tmp_path / "later.npz", 200, seed=6, **SHIFT)
    p = _adapt(bundle, train, tmp_path / "state")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    for key in ("accuracy_before", "accuracy_after", "rolled_back", "n_train", "n_val", "epochs",
                "feature_seconds", "train_seconds", "peak_rss_mb", "backend", "precision"):
        assert key in rep, key
    assert rep["accuracy_after"] > rep["accuracy_before"] and not rep["rolled_back"]
    assert rep["backend"] == "onnxruntime" and rep["precision"] == "fp32"
    assert rep["n_train"] + rep["n_val"] < 240  # one purge window per class between them
    assert rep["features_cached"] is False
    again = json.loads(_adapt(bundle, train, tmp_path / "state2", "--head",
                              tmp_path / "state" / "head.npz").stdout)
    assert again["features_cached"] is False  # other out dir, other cache
    rerun = _adapt(bundle, train, tmp_path / "state")
    assert json.loads(rerun.stdout)["features_cached"] is True

    with np.load(tmp_path / "state" / "head.npz") as new, np.load(bundle / "head_init.npz") as old:
        assert not np.allclose(new["weight"], old["weight"])
    from edgetl.manifest import Manifest, sha256_file

    Manifest.read(bundle).verify(bundle)  # every bundle file, the backbone included, unchanged
    assert sha256_file(bundle / "backbone.onnx") == before_hash

    general = json.loads(run_runner("infer", bundle, "--data", test, "--json", "--quiet",
                                    check=True).stdout)
    personal = json.loads(run_runner("infer", bundle, "--data", test, "--head",
                                     tmp_path / "state" / "head.npz", "--json", "--quiet",
                                     check=True).stdout)
    assert personal["accuracy"] > general["accuracy"] + 0.1


@pytest.mark.parametrize("which", ["onnx", "tflite", "tflite-int8"])
def test_runner_process_never_imports_torch_or_edgetl(which, request, tmp_path):
    """Only the bundle's own runtime is loaded: never torch, edgetl, TensorFlow or the other."""
    fixture = {"onnx": "tiny_bundle", "tflite": "tiny_tflite_bundle",
               "tflite-int8": "tiny_tflite_int8_bundle"}[which]
    bundle = request.getfixturevalue(fixture)
    other = "ai_edge_litert" if which == "onnx" else "onnxruntime"
    data = write_device_npz(tmp_path / "d.npz", 60, seed=1)
    code = (
        "import sys, json; sys.path.insert(0, %r); import run; "
        "rc = run.main(['adapt', %r, '--data', %r, '--out', %r, '--quiet', '--epochs', '2']); "
        "print(json.dumps({'rc': rc, 'mods': sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'edgetl', 'tensorflow', 'onnx', 'jax', %r})}))"
    ) % (str(RUNNER.parent), str(bundle), str(data), str(tmp_path / "s"), other)
    import subprocess

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res == {"rc": 0, "mods": []}


@pytest.mark.unit
def test_runner_sources_import_only_numpy_stdlib_and_one_runtime():
    runtimes = {"onnxruntime", "ai_edge_litert",  # each imported only by its own backend
                "cryptography"}  # only with --trust-key
    allowed = ({"numpy", "edgerun", "run", "PIL"} | runtimes  # PIL: image bundles, lazily
               | set(sys.stdlib_module_names))
    for path in RUNNER.parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for n in names:
                # Flower only in the fleet client (its own environment, make venv-fleet);
                # tokenizers only in text.py, optional (a pure-Python WordPiece otherwise).
                ok = allowed | {"fleet_client.py": {"flwr"}, "text.py": {"tokenizers"}}.get(
                    path.name, set())
                assert n.split(".")[0] in ok, f"{path.name} imports {n}"


def _good_state(bundle, tmp_path):
    state = tmp_path / "state"
    assert _adapt(bundle, write_device_npz(tmp_path / "ok.npz", 120, seed=2, **SHIFT),
                  state).returncode == 0
    return state, (state / "head.npz").read_bytes()


@pytest.mark.parametrize("case,match", [
    ("window", r"windows have shape \(20, 16, 3\), the bundle expects \(N, 32, 3\)"),
    ("nan", r"window\(s\) contain NaN or inf"),
    ("format", r"unknown data format '\.parquet'"),
    ("int_labels", r"'y' must hold label names"),
    ("tampered", r"backbone.onnx \(backbone\) fails its hash check"),
    ("inf", r"window\(s\) contain NaN or inf"),
    ("empty", r"holds no windows"),
    ("single_class", r"every window is labelled 'slow'; adapting a classifier needs"),
    ("text_dtype", r"'x' must be numeric, found dtype <U1"),
    ("huge", r"above the 0.001 MiB limit for one data file"),
    ("truncated_model", r"cannot load backbone.onnx"),
])
def test_bad_input_is_refused_and_keeps_the_checkpoint(bundle, tmp_path, case, match):
    state, good = _good_state(bundle, tmp_path)
    data = tmp_path / "bad.npz"
    x = np.zeros((20, WINDOW, 3), np.float32)
    y = np.array(["slow"] * 20, dtype=str)
    if case == "window":
        np.savez(data, x=x[:, :16], y=y)
    elif case == "nan":
        x[3, 5, 1] = np.nan
        np.savez(data, x=x, y=y)
    elif case == "format":
        data = tmp_path / "bad.parquet"
        data.write_bytes(b"PAR1")
    elif case == "int_labels":
        np.savez(data, x=x, y=np.zeros(20, np.int64))
    elif case == "inf":
        x[0, 0, 0] = np.inf
        np.savez(data, x=x, y=y)
    elif case == "empty":
        np.savez(data, x=x[:0], y=y[:0])
    elif case == "single_class":
        np.savez(data, x=x, y=y)  # all "slow"
    elif case == "text_dtype":
        np.savez(data, x=np.full(x.shape, "a"), y=y)
    elif case == "huge":
        write_device_npz(data, 60, seed=3)
    elif case == "truncated_model":  # a broken model whose manifest hash still matches
        import hashlib

        write_device_npz(data, 60, seed=3)
        body = (bundle / "backbone.onnx").read_bytes()[:300]
        (bundle / "backbone.onnx").write_bytes(body)
        man = json.loads((bundle / "manifest.json").read_text())
        man["files"]["backbone"]["sha256"] = hashlib.sha256(body).hexdigest()
        (bundle / "manifest.json").write_text(json.dumps(man))
    elif case == "tampered":
        write_device_npz(data, 60, seed=3)
        with open(bundle / "backbone.onnx", "r+b") as f:
            f.seek(200)
            b = f.read(1)
            f.seek(200)
            f.write(bytes([b[0] ^ 0xFF]))
    p = _adapt(bundle, data, state, *(["--max-data-mb", "0.001"] if case == "huge" else []))
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), p.stderr
    assert __import__("re").search(match, err[0]), err[0]
    assert "Traceback" not in p.stderr
    assert (state / "head.npz").read_bytes() == good


def test_rollback_keeps_the_previous_head(bundle, tmp_path):
    """Training that hurts validation accuracy (absurd lr) is rolled back, file untouched."""
    state, good = _good_state(bundle, tmp_path)
    p = _adapt(bundle, write_device_npz(tmp_path / "d.npz", 120, seed=4, **SHIFT), state,
               "--lr", "1e4", "--head", state / "head.npz")
    rep = json.loads(p.stdout) if p.returncode == 0 else None
    if rep is None:  # diverged to inf/nan: refused with a clear message, still no overwrite
        assert "diverged" in p.stderr
    else:
        assert rep["rolled_back"] and not rep["checkpoint_written"]
    assert (state / "head.npz").read_bytes() == good


def test_new_labels_are_imprinted_and_missing_ones_warned(bundle, tmp_path):
    names = ("slow", "medium", "jumping")  # 'fast' absent, 'jumping' new
    data = write_device_npz(tmp_path / "d.npz", 150, seed=7, labels=names)
    p = _adapt(bundle, data, tmp_path / "s")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["new_labels"] == ["jumping"] and rep["missing_labels"] == ["fast"]
    assert rep["labels"] == [*LABELS, "jumping"]
    assert any("weight imprinting" in w for w in rep["warnings"])
    with np.load(tmp_path / "s" / "head.npz") as z:
        assert z["weight"].shape == (4, 8)
    # the grown head serves inference with the same infer graph
    inf = json.loads(run_runner("infer", bundle, "--data", data, "--head", tmp_path / "s" /
                                "head.npz", "--json", "--quiet", check=True).stdout)
    assert inf["accuracy"] > 0.8 and "jumping" in inf["predictions"]


def test_csv_sensor_log_is_windowed_by_the_manifest(bundle, tmp_path):
    from edgetl.data.synthetic import make_windows

    x, y = make_windows(12, window=WINDOW, seed=8, **SHIFT)
    path = tmp_path / "log.csv"
    with open(path, "w") as f:
        f.write("timestamp,az,ay,ax,label\n")  # channel order differs from the manifest's
        for i, (w, lab) in enumerate(zip(x, y)):
            for t, row in enumerate(w):
                f.write(f"{i * WINDOW + t},{row[2]},{row[1]},{row[0]},{LABELS[lab]}\n")
    p = run_runner("infer", bundle, "--data", path, "--json", "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["n_windows"] >= 12
    bad = tmp_path / "bad.csv"
    bad.write_text("ax,ay,label\n1,2,slow\n")
    p = run_runner("infer", bundle, "--data", bad)
    assert p.returncode == 1 and "header lacks channel column(s) ['az']" in p.stderr


def test_selftest_passes_and_head_from_another_backbone_is_refused(bundle, tmp_path):
    assert run_runner("selftest", bundle).returncode == 0
    state, _ = _good_state(bundle, tmp_path)
    with np.load(state / "head.npz") as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["__meta__"]))
    meta["backbone_sha256"] = "0" * 64  # as if trained on an older bundle's backbone
    arrays["__meta__"] = np.array(json.dumps(meta))
    foreign = tmp_path / "foreign_head.npz"
    np.savez(foreign, **arrays)
    p = run_runner("infer", bundle, "--data", tmp_path / "ok.npz", "--head", foreign)
    assert p.returncode == 1
    assert "was trained on another backbone (sha256 000000000000" in p.stderr
    assert "drop --head" in p.stderr


def test_a_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    """Hashes match (the target is a copy), but the file lives outside: refused by name."""
    import os

    outside = tmp_path / "elsewhere.npz"
    shutil.copy(bundle / "head_init.npz", outside)
    os.remove(bundle / "head_init.npz")
    os.symlink(outside, bundle / "head_init.npz")
    p = run_runner("selftest", bundle)
    assert p.returncode == 1 and "head_init.npz" in p.stderr and "outside the bundle" in p.stderr


def test_budgets_stop_cleanly_and_keep_the_best_head(bundle, tmp_path):
    data = write_device_npz(tmp_path / "d.npz", 120, seed=2, **SHIFT)
    p = _adapt(bundle, data, tmp_path / "s", "--max-seconds", "0.000001")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["epochs_run"] == 1 and r["steps"] == 1 and r["history"][0]["complete"] is False
    assert "time budget" in r["stopped_early"] and any("stopped early" in w for w in r["warnings"])
    assert (tmp_path / "s" / "head.npz").exists() and r["budget"]["max_seconds"] == 1e-06
    p = _adapt(bundle, data, tmp_path / "m", "--max-memory-mb", "1")
    assert p.returncode == 1 and "--max-memory-mb 1" in p.stderr
    assert not (tmp_path / "m" / "head.npz").exists()
    full = json.loads(_adapt(bundle, data, tmp_path / "f", "--max-seconds", "3600").stdout)
    assert full["stopped_early"] is None and full["epochs_run"] == 40


def test_signed_bundles_and_trust_keys(tiny_ck, tmp_path):
    """--trust-key refuses unsigned bundles, other keys and modified manifests; files by hash."""
    from edgetl.signing import keygen, verify_bundle

    from .conftest import export_tiny

    priv, pub = keygen(tmp_path / "keys")
    _, other = keygen(tmp_path / "keys", "other")
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    b = export_tiny(tiny_ck, tmp_path / "signed", sign_key=priv)
    verify_bundle(b, pub)
    assert run_runner("selftest", b, "--trust-key", pub).returncode == 0
    p = run_runner("selftest", b, "--trust-key", other)
    assert p.returncode == 1 and "does not verify" in p.stderr
    unsigned = export_tiny(tiny_ck, tmp_path / "unsigned")
    p = run_runner("selftest", unsigned, "--trust-key", pub)
    assert p.returncode == 1 and "not signed" in p.stderr
    assert run_runner("selftest", unsigned).returncode == 0  # no key given: no requirement
    m = json.loads((b / "manifest.json").read_text())
    m["optimizer"]["hparams"]["lr"] = 10.0  # a tampered manifest
    (b / "manifest.json").write_text(json.dumps(m))
    assert "does not verify" in run_runner("selftest", b, "--trust-key", pub).stderr
    b2 = export_tiny(tiny_ck, tmp_path / "signed2", sign_key=priv)
    with open(b2 / "head_init.npz", "ab") as f:
        f.write(b"\0")
    p = run_runner("selftest", b2, "--trust-key", pub)
    assert p.returncode == 1 and "head_init.npz (head_init) fails its hash check" in p.stderr
    with pytest.raises(Exception, match="never overwritten"):
        keygen(tmp_path / "keys")


def test_adapt_hashes_the_data_once(bundle, tmp_path, monkeypatch):
    """The data file's sha256 keys both the feature cache and the run: one hash per run, and
    none before the feature pass when there is no cache folder to look in."""
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun import adapt as adapting

    data = write_device_npz(tmp_path / "local.npz", 120, seed=5, **SHIFT)
    calls = []
    real = adapting.data_digest
    monkeypatch.setattr(adapting, "data_digest", lambda p: calls.append(p) or real(p))
    first = adapting.adapt(str(bundle), str(data), str(tmp_path / "s"), epochs=2, quiet=True)
    assert len(calls) == 1 and first["features_cached"] is False
    again = adapting.adapt(str(bundle), str(data), str(tmp_path / "s"), epochs=2, quiet=True)
    assert len(calls) == 2 and again["features_cached"] is True
    assert again["run_key"] == first["run_key"]
