"""Image bundles in the TypeScript runner (``device_runners/js/src/image.ts``, ``imagedata.ts``).

Pillow is the oracle: ``convert`` and ``resize`` must give Pillow's bytes exactly, for the six
filters, up and down, odd sizes, L / RGB / RGBA sources; then ``cli.js adapt`` on an image
``.npz`` must give the Python runner's head (1e-5) and gate. The browser (a folder of photos on
the web page) is ``tests/test_web.py``.
"""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
from PIL import Image

from tests.jsrunner import JS, adapt_both, compare, run_js, split_of

FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
#: (source w, h) -> (target w, h): up, down, one axis, both, odd, height shrinking more than
#: twice the width (Pillow 13 runs its vertical pass first there), 1-pixel sources
SIZES = [((12, 12), (16, 16)), ((7, 13), (16, 16)), ((40, 30), (16, 16)), ((33, 17), (5, 9)),
         ((16, 16), (3, 40)), ((9, 50), (31, 7)), ((100, 80), (23, 29)), ((5, 5), (64, 64)),
         ((64, 48), (64, 11)), ((20, 64), (20, 5)), ((1, 7), (4, 3)), ((7, 1), (2, 5)),
         ((300, 200), (32, 32)), ((16, 16), (16, 16))]

RESIZE_JS = """
import { readFileSync, writeFileSync } from "node:fs";
const d = process.argv[1];
const cases = JSON.parse(readFileSync(`${d}/cases.json`, "utf8"));
const inb = readFileSync(`${d}/in.bin`);
const parts = cases.map((k) => {
  const data = new Uint8Array(inb.buffer, inb.byteOffset + k.at, k.w * k.h * k.c);
  const img = E.convert({ width: k.w, height: k.h, channels: k.c, data }, k.mode);
  return Buffer.from(E.resize(img, k.ow, k.oh, k.filter).data);
});
writeFileSync(`${d}/got.bin`, Buffer.concat(parts));
console.log("[]");
"""


def node_script(node: str, code: str, *args) -> subprocess.CompletedProcess:
    src = f"import * as E from {json.dumps((JS / 'dist' / 'index.js').as_uri())};\n{code}"
    p = subprocess.run([node, "--input-type=module", "-e", src, *map(str, args)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _image(rng, w, h, c, smooth):
    shape = (h, w) if c == 1 else (h, w, c)
    if smooth:  # gradients: mostly in range, few clipped values
        return (np.add.outer(np.arange(h) * 7, np.arange(w) * 3) % 256).astype(np.uint8).reshape(
            h, w, *(() if c == 1 else (1,))).repeat(1 if c == 1 else c, -1).reshape(shape)
    return rng.integers(0, 256, shape, dtype=np.uint8)  # noise: ringing filters clip a lot


def test_convert_and_resize_equal_pillow_bytes(node, tmp_path):
    """Every filter x size pair x (L, RGB, RGBA) -> (L, RGB), noise and gradients: Pillow's
    bytes exactly (max difference 0)."""
    rng = np.random.default_rng(0)
    cases, ins, want = [], [], []
    at = 0
    for f in FILTERS:
        for (w, h), (ow, oh) in SIZES:
            for src, c in (("L", 1), ("RGB", 3), ("RGBA", 4)):
                for mode in ("L", "RGB"):
                    a = _image(rng, w, h, c, smooth=len(cases) % 3 == 0)
                    img = Image.fromarray(a).convert(mode)
                    if img.size != (ow, oh):
                        img = img.resize((ow, oh), getattr(Image.Resampling, f.upper()))
                    cases.append({"w": w, "h": h, "c": c, "ow": ow, "oh": oh, "filter": f,
                                  "mode": mode, "src": src, "at": at})
                    ins.append(a.tobytes())
                    want.append(np.asarray(img, np.uint8).reshape(-1))
                    at += a.size
    (tmp_path / "in.bin").write_bytes(b"".join(ins))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    t0 = time.perf_counter()
    node_script(node, RESIZE_JS, tmp_path)
    seconds = time.perf_counter() - t0
    got = np.frombuffer((tmp_path / "got.bin").read_bytes(), np.uint8)
    assert got.size == sum(w.size for w in want)
    worst = dict.fromkeys(FILTERS, 0)
    bad = []
    off = 0
    for k, w in zip(cases, want, strict=True):
        d = int(np.abs(got[off:off + w.size].astype(int) - w).max())
        off += w.size
        worst[k["filter"]] = max(worst[k["filter"]], d)
        if d:
            bad.append((d, k))
    print(f"{len(cases)} resizes in {seconds:.2f} s; max byte difference per filter: {worst}")
    assert not bad, f"{len(bad)} of {len(cases)} differ from Pillow, e.g. {bad[:3]}"


def test_npz_preprocessing_equals_the_python_runner(node, tmp_path):
    """``loadImageNpz`` (gray, RGB, RGBA; other sizes and the bundle's own) gives the Python
    runner's float32 model input exactly, for an RGB and an L bundle."""
    import sys

    from tests.conftest import ROOT
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun import images as dev

    rng = np.random.default_rng(3)
    for mode, resample in (("RGB", "bicubic"), ("L", "lanczos")):
        c = len(mode)
        spec = {"height": 9, "width": 11, "mode": mode, "resample": resample,
                "mean": [0.485, 0.456, 0.406][:c], "std": [0.229, 0.224, 0.225][:c]}
        m = {"input": {"modality": "image", "image": spec, "shape": [1, c, 9, 11]}}
        for shape in ((4, 13, 7), (4, 13, 7, 3), (4, 13, 7, 4), (4, 9, 11, 3), (4, 9, 11)):
            x = rng.integers(0, 256, shape, dtype=np.uint8)
            np.savez(tmp_path / "d.npz", x=x, y=np.array(["a", "b"] * 2))
            want, _, _ = dev.load_image_npz(str(tmp_path / "d.npz"), m)
            p = node_script(node, """
import { readFileSync } from "node:fs";
const m = JSON.parse(process.argv[2]);
const ds = await E.loadImageNpz(new Uint8Array(readFileSync(process.argv[1])), m, "d.npz");
console.log(JSON.stringify({ x: Array.from(ds.x), inner: ds.inner, y: ds.y }));
""", tmp_path / "d.npz", json.dumps(m))
            got = json.loads(p.stdout)
            assert got["inner"] == [c, 9, 11] and got["y"] == ["a", "b"] * 2
            np.testing.assert_array_equal(np.float32(got["x"]).reshape(want.shape), want)


def test_image_spec_and_npz_refusals(node, tmp_path):
    """Bad specs and bad ``.npz`` files are refused saying what was expected and found."""
    spec = {"height": 8, "width": 8, "mode": "RGB", "resample": "bilinear",
            "mean": [0.5] * 3, "std": [0.5] * 3}
    bad = [({"mode": "CMYK"}, "not supported; expected 'RGB' or 'L'"),
           ({"std": [1, 0, 1]}, "std > 0"), ({"mean": [0.5]}, "needs 3 mean"),
           ({"resample": "fancy"}, "unknown; expected one of"),
           ({"height": None}, "must hold height, width, mode, mean, std")]
    out = json.loads(node_script(node, """
const cases = JSON.parse(process.argv[1]);
console.log(JSON.stringify(cases.map((s) => { try { E.imageSpec(s); return "ok"; }
  catch (e) { return e.message; } })));
""", json.dumps([{**spec, **b} for b, _ in bad])).stdout)
    for (_, want), msg in zip(bad, out, strict=True):
        assert want in msg, msg
    m = {"input": {"modality": "image", "image": spec, "shape": [1, 3, 8, 8]}}
    cases = {"float": ({"x": np.zeros((2, 8, 8), np.float32)}, "must be uint8 images"),
             "chan": ({"x": np.zeros((2, 8, 8, 2), np.uint8)}, "(N, H, W, 3|4)"),
             "nox": ({"images": np.zeros((2, 8, 8), np.uint8)}, "expected an array 'x'"),
             "numy": ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([0, 1])}, "label names"),
             "leny": ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array(["a"])},
                      "2 images but 1 labels"),
             "empty": ({"x": np.zeros((0, 8, 8), np.uint8)}, "holds no images")}
    for name, (arrays, want) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        p = node_script(node, """
import { readFileSync } from "node:fs";
const bytes = new Uint8Array(readFileSync(process.argv[1]));
try { await E.loadImageNpz(bytes, JSON.parse(process.argv[2]), "f.npz"); console.log("ok"); }
catch (e) { console.log(e.message); }
""", tmp_path / f"{name}.npz", json.dumps(m))
        assert want in p.stdout, (name, p.stdout)


def test_collect_images_orders_and_skips_as_the_python_runner(node, tmp_path):
    """A folder's relative paths -> the Python runner's file order, labels and skipped list."""
    import sys

    from tests.conftest import ROOT
    sys.path.insert(0, str(ROOT / "device_runners"))
    from edgerun.images import collect_images

    names = ["photos/cat/b.png", "photos/cat/a.PNG", "photos/cat/Z.jpg", "photos/cat/sub/c.jpeg",
             "photos/cat/a/d.png", "photos/cat/.hidden.png", "photos/cat/.git/x.png",
             "photos/dog/notes.txt", "photos/dog/é.png", "photos/dog/e.png", "photos/stray.png",
             "photos/.DS_Store", "photos/Ant/x/y/z.jpg"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        files, skipped = collect_images("photos")
    finally:
        os.chdir(cwd)
    got = json.loads(node_script(node, "console.log(JSON.stringify(E.collectImages("
                                       "JSON.parse(process.argv[1]))));",
                                 json.dumps(names[::-1])).stdout)
    assert got[0] == [list(f) for f in files]
    assert got[1] == skipped


def test_node_cli_adapts_an_image_npz_as_the_python_runner(node, onnx_image_bundle, tmp_path):
    """``cli.js adapt`` on uint8 images of another size (12x12 gray -> 16x16 RGB): the same
    split, gate and history, heads within 1e-5; ``infer`` predicts the same labels."""
    from tests.test_vision import LABELS, make_images

    image_bundle = onnx_image_bundle
    x, y = make_images(60, seed=3)
    np.savez(tmp_path / "imgs.npz", x=x, y=np.array(LABELS)[y])
    py, js = adapt_both(node, image_bundle, tmp_path / "imgs.npz", tmp_path,
                        ["--seed", "4", "--epochs", "8"])
    diffs = compare(py, js, split_of(image_bundle, tmp_path / "imgs.npz", py, seed=4))
    print(f"image npz: {diffs}")
    r = run_js(node, "selftest", image_bundle, "--json")
    assert json.loads(r.stdout)["ok"] is True
    p = run_js(node, "adapt", image_bundle, "--data", tmp_path, "--out", tmp_path / "x",
               check=False)
    assert p.returncode == 1 and "decodes no image files in Node" in p.stderr, p.stderr
