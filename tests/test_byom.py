"""Bring your own model: models written outside edgetl, exported through the CLI contract.

``edgetl export MODEL --target onnx|tflite`` on (a) a user-written token-id classifier
(int64 input, ``tests/user_models/nets.py:token_classifier`` + safetensors weights) and (b) a
Hugging Face MobileNetV2 image classifier folder; each bundle must pass ``edgetl check`` and
personalise through the torch-free runner.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import ROOT, adapt_json, run_runner
from tests.user_models import nets

EDGETL = [sys.executable, "-m", "edgetl.cli"]
FACTORY = str(ROOT / "tests" / "user_models" / "nets.py")


def edgetl(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGETL, *map(str, args)], capture_output=True, text=True, cwd=cwd)


def token_data(n: int, seed: int, classes=("a", "b", "c")):
    """Class c draws most of its tokens from its own id range: learnable from pooled features."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(classes), n)
    span = nets.VOCAB // len(classes)
    own = rng.integers(0, span, (n, nets.LENGTH)) + (y * span)[:, None]
    noise = rng.integers(0, nets.VOCAB, (n, nets.LENGTH))
    x = np.where(rng.random((n, nets.LENGTH)) < 0.7, own, noise).astype(np.int64)
    return x, np.asarray(classes)[y]


# -- head detection ---------------------------------------------------------------------------

@pytest.mark.unit
def test_head_is_detected_split_and_ambiguity_lists_candidates():
    from edgetl.errors import ConfigError
    from edgetl.export.model import as_edge_model, find_head

    assert find_head(nets.TokenClassifier()) == "head"
    assert find_head(nets.SeparableCNN()) == "classifier"
    with pytest.raises(ConfigError, match=r"ambiguous: fc \(3 outputs\), head \(3 outputs\)"):
        find_head(nets.TwoHeads())
    with pytest.raises(ConfigError, match="found no head"):
        find_head(nn.Sequential(nn.Linear(4, 2)))
    with pytest.raises(ConfigError, match="has 4 outputs but 3 labels"):
        as_edge_model(nets.SeparableCNN(), head="classifier", labels=["a", "b", "c"])
    # Flatten + Dropout before the Linear go into the backbone; the logits are unchanged
    m = nets.separable_cnn().eval()
    edge, cfg, path = as_edge_model(m, head=None, labels=list("abcd"))
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(edge(x), m(x), atol=1e-6)
    assert (cfg.kind, path, edge.backbone.out_features) == ("linear", "classifier", 32)
    # an MLP head (Linear -> ReLU -> Linear) trains as edgetl's mlp head
    mlp = nn.Sequential()
    mlp.body = nn.Linear(6, 8)
    mlp.head = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Dropout(0.1), nn.Linear(5, 2))
    edge, cfg, _ = as_edge_model(mlp.eval(), head="head", labels=["x", "y"])
    assert (cfg.kind, cfg.hidden) == ("mlp", 5)
    with torch.no_grad():
        z = torch.randn(3, 6)
        assert torch.allclose(edge(z), mlp(z), atol=1e-6)


@pytest.mark.unit
def test_unsupported_head_and_missing_head_call_are_clear():
    from edgetl.errors import ConfigError
    from edgetl.export.model import as_edge_model

    m = nn.Sequential()
    m.fc = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"\['Linear', 'Tanh', 'Linear'\].*fc\.<name>"):
        as_edge_model(m, head="fc", labels=["a", "b"])
    with pytest.raises(ConfigError, match="no submodule 'nope'"):
        as_edge_model(m, head="nope", labels=["a", "b"])


# -- a user-written token-id model, through the CLI, both targets -----------------------------

@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tok")
    torch.manual_seed(1)
    model = nets.TokenClassifier()
    x, y = token_data(600, seed=0)
    ids = torch.from_numpy(x)
    yt = torch.from_numpy(np.searchsorted(["a", "b", "c"], y))
    opt = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(60):  # a quick server-side training: the held-out gate has a real model
        opt.zero_grad()
        nn.functional.cross_entropy(model(ids), yt).backward()
        opt.step()
    save_file(model.state_dict(), str(d / "w.safetensors"))
    xv, yv = token_data(200, seed=1)
    np.savez(d / "val.npz", x=xv, y=yv)
    np.savez(d / "calib.npz", x=token_data(128, seed=2)[0])
    # the device's task: the same tokens, its own label names (new classes to learn)
    xd, yd = token_data(90, seed=3, classes=("red", "green", "blue"))
    np.savez(d / "device.npz", x=xd, y=yd)
    return d


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_token_model_exports_checks_and_personalises(token_files, target, tmp_path):
    d = token_files
    out = tmp_path / "bundle"
    p = edgetl("export", f"{FACTORY}:token_classifier", "--weights", d / "w.safetensors",
               "--input-shape", nets.LENGTH, "--input-dtype", "int64", "--labels", "a,b,c",
               "--heldout", d / "val.npz", "--calibration", d / "calib.npz",
               "--target", target, "--class-capacity", 8, "--out", out)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["input"]["modality"] == "tensor" and m["input"]["data_dtype"] == "int64"
    assert m["input"]["shape"][1:] == [nets.LENGTH]
    assert m["labels"] == ["a", "b", "c"]
    assert m["provenance"]["head_path"] == "head"
    assert m["checks"]["backbone_max_abs_err"] <= 1e-4  # fp32 parity vs torch, in export
    acc = m["checks"]["accuracy"]
    assert acc["reference_accuracy"] > 0.8 and acc["drop_points"] <= 1.0

    p = edgetl("check", out, "--heldout", d / "val.npz", "--json")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    checks = {c["name"]: c for c in json.loads(p.stdout)["checks"]}
    assert set(checks) == {"integrity", "selftest", "smoke", "accuracy"}
    assert abs(checks["accuracy"]["value"] - acc["bundle"]) < 1e-9

    state = tmp_path / "state"
    r = run_runner("adapt", out, "--data", d / "device.npz", "--out", state, "--epochs", 30,
                   "--quiet")
    assert r.returncode == 0, r.stderr
    rep = json.loads((state / "report.json").read_text())
    # three new labels: imprinted, then trained; the trained head must beat the imprinted one
    assert sorted(rep["new_labels"]) == ["blue", "green", "red"]
    assert not rep["rolled_back"] and rep["accuracy_after"] > 0.8


@pytest.mark.parametrize("target,spec", [  # the other two in make test-slow (~20 s each)
    ("onnx", "bias"), pytest.param("tflite", "bias", marks=pytest.mark.slow),
    pytest.param("onnx", "all", marks=pytest.mark.slow), ("tflite", "all")])
def test_token_model_trains_past_its_embeddings_through_a_multi_part_cut(token_files, target,
                                                                         spec, tmp_path):
    """``--trainable bias`` of a token model whose trained layers also read the padding mask
    (``ids != 0``): the cut caches the mask and the token embeddings side by side (the
    manifest's ``trainable.cut.parts``); ``all`` trains the embedding table itself from the
    cached ids (its gradient: ScatterND add in ONNX, a one-hot matmul in TFLite). The export
    checks 20 train steps against the float64 torch step; the runner's selftest replays the
    shipped steps and ``adapt`` trains the backbone tensors on the opaque (N, D) features."""
    d = token_files
    out = tmp_path / "b"
    p = edgetl("export", f"{FACTORY}:masked_tokens", "--input-shape", nets.LENGTH,
               "--input-dtype", "int64", "--labels", "a,b,c", "--calibration", d / "calib.npz",
               "--target", target, "--trainable", spec, "--out", out)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    cut, n = m["trainable"]["cut"], nets.LENGTH
    if spec == "bias":
        assert cut["parts"] == [{"node": "ne", "shape": [n], "dtype": "bool"},
                                {"node": "model_embed", "shape": [n, 16], "dtype": "float32"}]
        assert cut["node"] == "ne + model_embed" and cut["shape"] == [n + n * 16]
    else:
        assert cut["parts"] == [{"node": "long", "shape": [n], "dtype": "int64"}]
        assert cut["node"] == "long" and cut["shape"] == [n]
    assert m["features"]["dim"] == cut["shape"][0]
    trained = [q["name"] for q in m["trainable"]["params"]]
    assert ("backbone.model.embed.weight" in trained) == (spec == "all")
    assert "backbone.model.norm.weight" in trained
    assert m["checks"]["train_step_max_abs_err"] < 1e-4
    r = run_runner("selftest", out)
    assert r.returncode == 0, r.stderr[-2000:]
    xd, yd = token_data(60, seed=3)  # the bundle's own labels: its class rows are fixed
    np.savez(tmp_path / "device.npz", x=xd, y=yd)
    r = adapt_json(out, tmp_path / "device.npz", tmp_path / "s", "--epochs", 3, "--no-gate")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["steps"] > 0
    with np.load(out / "head_init.npz") as a, np.load(tmp_path / "s" / "head.npz") as b:
        tensors = [k for k in a.files if k.startswith("backbone.")]
        assert sorted(tensors) == sorted(trained)
        assert all(np.abs(a[k] - b[k]).max() > 0 for k in tensors)
        if spec == "all":  # the padding row gets no gradient; rows of ids the data has do
            w0, w1 = a["backbone.model.embed.weight"], b["backbone.model.embed.weight"]
            assert np.array_equal(w0[0], w1[0]) and np.abs(w0[1:] - w1[1:]).max() > 0


def test_int8_backbone_refuses_a_cut_that_passes_token_ids(token_files, tmp_path):
    """An int8 prefix would quantise the ids / mask a multi-part cut hands to the trained
    layers: refused before anything is written, saying what to do."""
    out = tmp_path / "b"
    p = edgetl("export", f"{FACTORY}:masked_tokens", "--input-shape", nets.LENGTH,
               "--input-dtype", "int64", "--labels", "a,b,c", "--calibration",
               token_files / "calib.npz", "--target", "onnx", "--precision", "int8",
               "--trainable", "bias", "--out", out)
    assert p.returncode == 1
    assert "integer or boolean tensors (ne: token ids, masks)" in p.stderr
    assert "--precision fp32" in p.stderr and not out.exists()


def test_runner_refuses_token_data_of_the_wrong_shape_or_kind(token_files, tmp_path):
    out = tmp_path / "b"
    p = edgetl("export", f"{FACTORY}:token_classifier", "--input-shape", nets.LENGTH,
               "--input-dtype", "int64", "--labels", "a,b,c", "--out", out)
    assert p.returncode == 0, p.stderr[-2000:]
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, nets.LENGTH + 1), np.int64), y=np.array(["a"] * 10))
    r = run_runner("adapt", out, "--data", bad, "--out", tmp_path / "s")
    assert r.returncode == 1 and "the bundle takes (N, 12)" in r.stderr
    np.savez(bad, x=np.zeros((10, nets.LENGTH), np.float32), y=np.array(["a"] * 10))
    r = run_runner("adapt", out, "--data", bad, "--out", tmp_path / "s")
    assert r.returncode == 1 and "integer ids" in r.stderr


# -- a Hugging Face image classifier folder, both targets --------------------------------------

@pytest.fixture(scope="module")
def hf_image(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.MobileNetV2Config(
        image_size=32, depth_multiplier=0.35, num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2})
    model = transformers.MobileNetV2ForImageClassification(cfg)
    for mod in model.modules():  # HF's std-0.02 init makes near-zero features in 17 blocks
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight)
    model.save_pretrained(d / "model")
    (d / "model" / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    def images(n, seed, classes):
        r = np.random.default_rng(seed)
        y = r.integers(0, len(classes), n)
        x = r.normal(60, 25, (n, 3, 32, 32))
        for c in range(len(classes)):  # each class is mostly its own colour
            x[y == c, c % 3] += 140
        return np.clip(x, 0, 255).astype(np.float32), np.asarray(classes)[y]

    x, _ = images(64, 1, ("cat", "dog", "bird"))
    np.savez(d / "calib.npz", x=x)
    xd, yd = images(90, 2, ("red", "green", "blue"))
    np.savez(d / "device.npz", x=xd, y=yd)
    return d


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_hf_image_classifier_exports_checks_and_personalises(hf_image, target, tmp_path):
    out = tmp_path / "bundle"
    p = edgetl("export", hf_image / "model", "--calibration", hf_image / "calib.npz",
               "--target", target, "--class-capacity", 8, "--out", out)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["labels"] == ["cat", "dog", "bird"]  # from config.json's id2label
    assert m["input"]["shape"][1:] == [3, 32, 32] and m["input"]["layout"] == "NCHW"
    # preprocessor_config's rescale + normalise, in pixel units: (x - 127.5) / 127.5
    assert m["input"]["preprocess"]["normalize"]["mean"] == pytest.approx([127.5] * 3)
    assert m["provenance"]["head_path"] == "classifier"
    assert m["checks"]["backbone_rel_err"] <= 1e-4
    p = edgetl("check", out, "--json")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    state = tmp_path / "state"
    r = run_runner("adapt", out, "--data", hf_image / "device.npz", "--out", state,
                   "--epochs", 30, "--quiet")
    assert r.returncode == 0, r.stderr
    rep = json.loads((state / "report.json").read_text())
    # new labels, imprinted from mean features, then trained: the trained head must beat
    # imprinting on the validation windows; the gate keeps it only if that is significant
    g = rep["gate"]
    assert g["fixed"] > g["broke"] and g["accuracy_after"] > g["accuracy_before"], g
    assert g["accuracy_after"] > 0.7
    assert g["keep"] == (g["p_value"] <= g["alpha"]) and rep["rolled_back"] == (not g["keep"])


# -- failures ---------------------------------------------------------------------------------

class _FFTNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(9, 2)

    def forward(self, x):
        return self.head(torch.fft.rfft(x).abs())


def test_unexportable_model_names_the_operator_and_keeps_the_old_bundle(token_files, tmp_path):
    import edgetl
    from edgetl.export.model import ExportError

    out = tmp_path / "bundle"
    edgetl.export_model(nets.token_classifier(), example=torch.zeros(1, nets.LENGTH,
                                                                     dtype=torch.int64),
                        labels=["a", "b", "c"], out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match=r"fft_rfft.*nothing was written"):
        edgetl.export_model(_FFTNet(), example=torch.zeros(1, 16), labels=["a", "b"], out=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.tmp")]


def test_cli_errors_are_one_line(tmp_path):
    p = edgetl("export", f"{FACTORY}:token_classifier", "--out", tmp_path / "b",
               "--labels", "a,b,c")
    assert p.returncode == 1 and "pass --input-shape" in p.stderr
    assert "Traceback" not in p.stderr
    p = edgetl("export", f"{FACTORY}:nope", "--out", tmp_path / "b")
    assert p.returncode == 1 and "no callable 'nope'" in p.stderr
    p = edgetl("export", f"{FACTORY}:token_classifier", "--input-shape", nets.LENGTH,
               "--input-dtype", "int64", "--labels", "a,b", "--out", tmp_path / "b")
    assert p.returncode == 1 and "3 outputs but 2 labels" in p.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.unit
def test_audio_models_named_for_sequence_classification_load_as_audio(tmp_path):
    """Wav2Vec2ForSequenceClassification is an audio model (found by `make coverage`)."""
    transformers = pytest.importorskip("transformers")
    from edgetl.export.load import load_model

    cfg = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 4),
                                      conv_kernel=(10, 8), num_feat_extract_layers=2,
                                      num_labels=2, classifier_proj_size=8)
    transformers.Wav2Vec2ForSequenceClassification(cfg).save_pretrained(tmp_path / "w2v")
    um = load_model(str(tmp_path / "w2v"))
    assert (um.dtype, um.layout, um.call.name) == ("float32", "NS", "input_values")


def test_a_head_with_large_weights_passes_parity(tmp_path):
    """Train-step parity is relative past 1: logits in the thousands are no rounding failure."""
    import edgetl

    m = nets.token_classifier()
    with torch.no_grad():
        m.head.weight.mul_(3000)
    man = edgetl.export_model(m, example=torch.zeros(1, nets.LENGTH, dtype=torch.int64),
                              labels=["a", "b", "c"], out=tmp_path / "b")
    assert man.test_vectors["train_atol"] > man.checks["atol"]  # scaled with the values
    r = run_runner("selftest", tmp_path / "b")
    assert r.returncode == 0, r.stderr


# -- a user-written image CNN, training more than its head through the CLI ---------------------

def _channel_data(n: int, seed: int):
    """(n, 3, 32, 32) noise images whose label shifts one channel: learnable by a small CNN."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(size=(n, 3, 32, 32)).astype(np.float32)
    x[np.arange(n), y % 3] += (1.0 + (y >= 3))[:, None, None]
    return x, np.asarray(list("abcd"))[y]


def test_user_cnn_exports_its_last_block_trainable_with_its_own_lr(tmp_path):
    """``edgetl export <factory> --trainable last:1 --backbone-lr-scale 0.5``: the user's
    model gets a tail train step (its last block's tensors, the head) whose backbone tensors
    step at half the head's lr; the runner trains them and can override the scale."""
    np.savez(tmp_path / "calib.npz", x=_channel_data(64, 2)[0])
    x, y = _channel_data(120, 3)
    np.savez(tmp_path / "device.npz", x=x, y=y)
    out = tmp_path / "b"
    p = edgetl("export", f"{FACTORY}:separable_cnn", "--input-shape", "3,32,32",
               "--labels", "a,b,c,d", "--calibration", tmp_path / "calib.npz",
               "--trainable", "last:1", "--backbone-lr-scale", 0.5, "--out", out)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["trainable"]["spec"] == "last:1" and m["trainable"]["params"]
    assert m["optimizer"]["hparams"]["backbone_lr_scale"] == 0.5
    assert m["train_step"]["hparam_inputs"][-1] == "backbone_lr_scale"
    r = run_runner("adapt", out, "--data", tmp_path / "device.npz", "--out", tmp_path / "s",
                   "--epochs", 5, "--backbone-lr-scale", 0.25, "--no-gate", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["hparams"]["backbone_lr_scale"] == 0.25 and rep["steps"] > 0
    with np.load(out / "head_init.npz") as a, np.load(tmp_path / "s" / "head.npz") as b:
        tensors = [k for k in a.files if k.startswith("backbone.")]
        assert tensors and all(np.abs(a[k] - b[k]).max() > 0 for k in tensors)
    p = edgetl("export", f"{FACTORY}:separable_cnn", "--input-shape", "3,32,32",
               "--labels", "a,b,c,d", "--trainable", "last:1", "--backbone-lr-scale", 0,
               "--out", tmp_path / "zero")
    assert p.returncode != 0 and "backbone_lr_scale must be in (0, 100], got 0" in p.stderr
    assert not (tmp_path / "zero").exists()
