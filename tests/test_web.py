"""The web page (``device_runners/web``) end to end in Debian's headless Chromium.

The page is served on 127.0.0.1 by ``device_runners/web/serve.mjs`` (with the COOP/COEP
headers multi-threaded WASM needs) and driven by ``tests/web/drive.mjs`` (playwright-core,
``executablePath: /usr/bin/chromium``, a fresh user-data dir; never a browser download). It
picks a bundle folder and a CSV sensor log through the page's file inputs, personalises, and
downloads ``head.npz`` and ``report.json``: the head equals the Python runner's for the same
bundle, data and seed within 1e-5, with the same gate decision, on onnxruntime-web's WASM
build at 1 and 2 threads. Bad input (no manifest, a sha256 mismatch, a CSV without the
channels) is refused on the page saying what to do, and the page requests nothing but its own
files.

Skips, saying why, where Chromium (``apt-get install chromium``) or node/npm are missing.
``EDGETL_WEB_SCREENSHOT=PATH`` saves the page after personalising (``make web-screenshot``
writes ``docs/web.png``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SHIFT, export_tiny, run_runner, write_device_npz
from tests.jsrunner import HEAD_ATOL, JS, compare_reports, csv_log, head_diff

WEB = ROOT / "device_runners" / "web"
DRIVER = ROOT / "tests" / "web" / "drive.mjs"
CHROMIUM = os.environ.get("EDGETL_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def page_url(request):
    """The built page served on 127.0.0.1 (a free port), with COOP/COEP headers."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"skipping browser tests: {CHROMIUM} not found (Debian: apt-get install "
                    "chromium; .ci/run installs it as root; EDGETL_CHROMIUM=PATH for another)")
    node = request.getfixturevalue("node")  # npm ci + tsc, once Chromium is known to exist
    if not (JS / "node_modules" / "playwright-core").is_dir():
        pytest.skip("skipping browser tests: device_runners/js/node_modules/playwright-core "
                    "is missing after npm ci (is it still in package-lock.json?)")
    p = subprocess.run([node, str(WEB / "build.mjs")], capture_output=True, text=True)
    assert p.returncode == 0, f"building the page failed:\n{p.stdout}{p.stderr}"
    server = subprocess.Popen([node, str(WEB / "serve.mjs"), "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), line
        yield line.split()[1]
    finally:
        server.terminate()
        server.wait(10)


def drive(node, url: str, steps: list, tmp: Path) -> dict:
    plan = {"url": url, "userDataDir": str(tmp / "profile"), "outDir": str(tmp / "out"),
            "steps": steps}
    (tmp / "plan.json").write_text(json.dumps(plan))
    p = subprocess.run([node, str(DRIVER), str(tmp / "plan.json")], capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, f"the browser driver failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
    out = json.loads(p.stdout)
    assert out["foreign_requests"] == [], "the page requested files from elsewhere"
    return out


def broken_bundles(bundle: Path, tmp: Path) -> tuple[Path, Path]:
    """The bundle without manifest.json, and with a file that fails its sha256."""
    nomanifest, tampered = tmp / "no-manifest", tmp / "tampered"
    shutil.copytree(bundle, nomanifest)
    (nomanifest / "manifest.json").unlink()
    shutil.copytree(bundle, tampered)
    with open(tampered / "head_init.npz", "ab") as f:
        f.write(b"x")
    return nomanifest, tampered


def python_runner(bundle: Path, data: Path, out: Path, flags: list) -> dict:
    p = run_runner("adapt", bundle, "--data", data, "--out", out, "--quiet", *flags)
    assert p.returncode == 0, p.stderr
    return json.loads((out / "report.json").read_text())


def test_web_page_personalises_as_the_python_runner(page_url, node, tiny_bundle, tmp_path):
    """Bundle and CSV through the page's file inputs; head and gate as the Python runner's:
    a shifted device (the gate keeps the new head) at 1 and 2 WASM threads, and an unshifted
    one (the gate keeps the shipped head). Refusals are shown on the page."""
    shifted = csv_log(tmp_path / "shifted.csv", 15, runs=100, **SHIFT)
    plain = csv_log(tmp_path / "plain.csv", 15)
    bad_csv = tmp_path / "wrong-columns.csv"
    bad_csv.write_text("x,y,z,label\n" + "0.1,0.2,0.3,slow\n" * 60)
    nomanifest, tampered = broken_bundles(tiny_bundle, tmp_path)
    shot = os.environ.get("EDGETL_WEB_SCREENSHOT") or str(tmp_path / "web.png")
    runs = {"kept": (shifted, {"epochs": 15, "seed": 9}),
            "rolled_back": (plain, {"epochs": 6, "seed": 9})}
    t0 = time.perf_counter()
    out = drive(node, page_url, [
        {"goto": "?threads=1"}, {"bundle": str(nomanifest)}, {"bundle": str(tampered)},
        {"bundle": str(tiny_bundle)}, {"data": str(bad_csv)},
        {"data": str(plain)}, {"adapt": runs["rolled_back"][1], "save": "rolled_back"},
        {"data": str(shifted)}, {"adapt": runs["kept"][1], "save": "kept1"},
        {"screenshot": shot},
        {"goto": "?threads=2"}, {"bundle": str(tiny_bundle)}, {"data": str(shifted)},
        {"adapt": runs["kept"][1], "save": "kept2"}], tmp_path)
    seconds = time.perf_counter() - t0
    s = out["steps"]
    assert "1 thread" in s[0]["runtime"] and s[0]["isolated"] is True, s[0]
    # refusals: what was expected, what was found, what to do
    assert not s[1]["ok"] and "no manifest.json" in s[1]["error"], s[1]
    assert "pick the bundle folder" in s[1]["error"]
    assert not s[2]["ok"] and "head_init.npz" in s[2]["error"], s[2]
    assert "fails its hash check" in s[2]["error"] and "Re-download" in s[2]["error"]
    assert s[3]["ok"] and "Self-test passed" in s[3]["selftest"], s[3]
    assert "match their sha256" in s[3]["manifest"]
    assert not s[4]["ok"] and "header lacks channel column(s)" in s[4]["error"], s[4]
    assert "expected" in s[4]["error"] and "found" in s[4]["error"]
    assert s[5]["ok"] and "windows" in s[5]["info"], s[5]
    assert "2 threads" in s[10]["runtime"] and s[10]["isolated"] is True, s[10]
    assert s[11]["ok"] and s[12]["ok"]
    for i, run in ((6, "rolled_back"), (8, "kept1"), (13, "kept2")):
        data, settings = runs[run.rstrip("12")]
        P = python_runner(tiny_bundle, data, tmp_path / f"py-{run}",
                          ["--seed", str(settings["seed"]), "--epochs", str(settings["epochs"])])
        assert P["rolled_back"] == (run == "rolled_back"), P["gate"]
        assert s[i]["ok"], s[i]
        assert s[i]["progress"] == [settings["epochs"]] * 2, s[i]  # the bar reached the end
        js = Path(s[i]["saved"])
        J = json.loads((js / "report.json").read_text())
        assert J["backend"] == "onnxruntime-web" and J["selftest_max_abs_err"] <= 1e-4
        compare_reports(P, J)  # the gate's fields and decision, counts, history
        err = head_diff(tmp_path / f"py-{run}" / "head.npz", js / "head.npz")
        assert err <= HEAD_ATOL, f"{run}: heads differ by {err:.3g} (> {HEAD_ATOL})"
        want = "kept the current head" if P["rolled_back"] else "kept the new head"
        assert want in s[i]["decision"], s[i]["decision"]
        print(f"{run}: head max abs diff {err:.3g}, adapt in the page {s[i]['seconds']:.1f} s")
    assert Path(shot).stat().st_size > 10_000
    assert out["console_errors"] == [], out["console_errors"]
    print(f"browser session: {seconds:.1f} s", file=sys.stderr)


def test_web_page_int8_new_label(page_url, node, int8_bundle, tmp_path):
    """An int8 bundle and .npz windows dropped on the page (drag and drop), with a label the
    server never saw (imprinted) and one missing, 2 WASM threads: the Python runner's head,
    labels and gate."""
    data = write_device_npz(tmp_path / "device.npz", 90, seed=12, gain=1.2,
                            labels=("slow", "medium", "sprint"))
    files = sorted(str(f) for f in int8_bundle.iterdir())
    out = drive(node, page_url, [{"goto": "?threads=2"},  # drag and drop this time
                                 {"drop": "#bundle-drop", "files": files},
                                 {"drop": "#data-drop", "files": [str(data)]},
                                 {"adapt": {"seed": 5}, "save": "int8"}], tmp_path)
    s = out["steps"]
    assert s[1]["ok"] and "Self-test passed" in s[1]["status"], s[1]
    assert "sprint: 35 (new label: it will be imprinted)" in s[2]["status"], s[2]
    assert s[3]["ok"], s[3]
    P = python_runner(int8_bundle, data, tmp_path / "py", ["--seed", "5"])
    J = json.loads((tmp_path / "out" / "int8" / "report.json").read_text())
    compare_reports(P, J)
    assert J["new_labels"] == ["sprint"] and J["missing_labels"] == ["fast"]
    err = head_diff(tmp_path / "py" / "head.npz", tmp_path / "out" / "int8" / "head.npz")
    assert err <= HEAD_ATOL, f"heads differ by {err:.3g} (> {HEAD_ATOL})"
    print(f"int8/new label: head max abs diff {err:.3g}")


def test_web_page_checks_the_signature(page_url, node, tiny_bundle, tmp_path):
    """With a trust key the page verifies manifest.sig (Ed25519, the browser's WebCrypto):
    another key is refused, the signing key accepted."""
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    signed = tmp_path / "signed"
    shutil.copytree(tiny_bundle, signed)
    pems = {}
    for name in ("good", "other"):
        k = Ed25519PrivateKey.generate()
        pems[name] = tmp_path / f"{name}.pem"
        pems[name].write_bytes(k.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        if name == "good":
            (signed / "manifest.sig").write_bytes(k.sign((signed / "manifest.json").read_bytes()))
    out = drive(node, page_url, [{"goto": "?threads=1"}, {"bundle": str(signed)},
                                 {"trust": str(pems["other"])}, {"trust": str(pems["good"])}],
                tmp_path)
    s = out["steps"]
    assert s[1]["ok"] and "signature" not in s[1]["manifest"], s[1]  # no key: not checked
    assert not s[2]["ok"] and "signature does not verify" in s[2]["error"], s[2]
    assert s[3]["ok"] and "Ed25519 signature verified" in s[3]["manifest"], s[3]


def test_browser_build_has_no_node_modules(page_url):
    """The page's copy of the runner leaves out the Node-only modules (cli.js, node.js) and
    imports no ``node:`` module statically (bundle.js falls back to node:crypto lazily)."""
    lib = WEB / "dist" / "edgerun"
    assert not (lib / "cli.js").exists() and not (lib / "node.js").exists()
    for f in lib.glob("*.js"):
        for line in f.read_text().splitlines():
            assert not (line.startswith("import ") and "node:" in line), (f.name, line)


@pytest.mark.unit
def test_csp_allows_the_import_map():
    """index.html's Content-Security-Policy names the sha256 of its inline import map (else
    the browser blocks it and the page never loads): edit both together."""
    html = (WEB / "index.html").read_text()
    body = re.search(r'<script type="importmap">(.*?)</script>', html, re.S).group(1)
    want = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    assert f"'sha256-{want}'" in html, (
        f"the import map changed: put 'sha256-{want}' in index.html's script-src")


@pytest.fixture(scope="module")
def tflite_spare_bundle(tiny_ck, tmp_path_factory) -> Path:
    """The tiny model's int8 TFLite bundle (float32 graph I/O) with 5 class rows, 2 spare."""
    return export_tiny(tiny_ck, tmp_path_factory.mktemp("tfl8s") / "bundle", "tflite", "int8",
                       int8_io="float32", class_capacity=5)


def test_web_page_personalises_tflite_bundles(page_url, node, tiny_tflite_bundle,
                                              tflite_spare_bundle, tmp_path):
    """TFLite bundles on the page run on LiteRT.js (picked by the manifest's ``target``):
    fp32 with a shifted CSV log (the gate keeps the new head), int8 (float32 graph I/O) with
    .npz windows holding a label the server never saw (imprinted into a spare class row) and
    one missing: the Python runner's head (ai-edge-litert), labels and gate decision."""
    shifted = csv_log(tmp_path / "shifted.csv", 15, runs=100, **SHIFT)
    npz = write_device_npz(tmp_path / "device.npz", 90, seed=12, gain=1.2,
                           labels=("slow", "medium", "sprint"))
    runs = {"fp32": (tiny_tflite_bundle, shifted, {"epochs": 15, "seed": 9}),
            "int8f": (tflite_spare_bundle, npz, {"seed": 5})}
    steps = [{"goto": "?threads=1"}]
    for name, (b, data, settings) in runs.items():
        steps += [{"bundle": str(b)}, {"data": str(data)}, {"adapt": settings, "save": name}]
    t0 = time.perf_counter()
    out = drive(node, page_url, steps, tmp_path)
    seconds = time.perf_counter() - t0
    s = out["steps"]
    for j, (name, (b, data, settings)) in enumerate(runs.items()):
        sb, sd, sa = s[1 + 3 * j : 4 + 3 * j]
        assert sb["ok"] and "Self-test passed" in sb["selftest"], sb
        assert "(tflite, " in sb["manifest"], sb["manifest"]
        assert sd["ok"], sd
        assert sa["ok"], sa
        flags = [f"--{k}={v}" for k, v in settings.items()]
        P = python_runner(b, data, tmp_path / f"py-{name}", flags)
        J = json.loads((Path(sa["saved"]) / "report.json").read_text())
        assert J["backend"] == "litert.js" and J["target"] == "tflite", J["backend"]
        compare_reports(P, J)  # counts, labels, gate fields and decision, history
        err = head_diff(tmp_path / f"py-{name}" / "head.npz", Path(sa["saved"]) / "head.npz")
        assert err <= HEAD_ATOL, f"{name}: heads differ by {err:.3g} (> {HEAD_ATOL})"
        want = "kept the current head" if P["rolled_back"] else "kept the new head"
        assert want in sa["decision"], sa["decision"]
        print(f"\ntflite {name}: rolled back {P['rolled_back']}, new labels {J['new_labels']}, "
              f"head max abs diff {err:.3g}, adapt in the page {sa['seconds']:.1f} s")
    # LiteRT.js logs its native INFO/WARNING lines ("INFO: [environment.cc:36] ...") to stderr,
    # which the browser shows as console errors; anything else is one
    errors = [e for e in out["console_errors"]
              if not re.match(r"(INFO|WARNING): ", e)]
    assert errors == [], errors
    print(f"browser session (LiteRT.js): {seconds:.1f} s", file=sys.stderr)


def photo_folder(root: Path, n: int = 44) -> Path:
    """``root/<label>/[day2/]*.png``: gray, RGB and opaque RGBA PNGs of 12x12 and 20x14 pixels,
    three known labels and a new one (``vertical``), and files both runners skip."""
    import numpy as np
    from PIL import Image

    from tests.test_vision import LABELS, make_images

    x, y = make_images(n, seed=6, kinds=(0, 1, 2, 3))
    names = [*LABELS, "vertical"]
    for i, (img, k) in enumerate(zip(x, y, strict=True)):
        d = root / names[k] / ("day2" if i % 5 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img)
        if i % 3 == 1:
            im = Image.fromarray(np.stack([img, img, np.minimum(img, 200)], -1))  # RGB
        elif i % 7 == 0:
            im = im.convert("RGBA")  # opaque: the canvas keeps RGB exactly
        if i % 4 == 3:
            im = im.resize((20, 14), Image.Resampling.BICUBIC)  # another size, resized again
        im.save(d / f"{i:03d}.png")
    (root / "notes.txt").write_text("not in a label folder")
    (root / "bright" / "readme.md").write_text("not an image")
    (root / "dark" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "dark" / "empty.png").write_bytes(b"")
    return root


def test_web_page_personalises_on_a_folder_of_photos(page_url, node, onnx_image_bundle,
                                                     tmp_path):
    """An image bundle and a folder of PNGs picked on the page (decoded by Chromium, lossless):
    the same files skipped, the Python runner's head (``run.py adapt BUNDLE --data FOLDER``)
    within 1e-5 and its gate. A JPEG decoded by the page is compared with Pillow's decode
    (measured, not required equal: the decoders differ)."""
    import numpy as np
    from PIL import Image

    from tests.conftest import RUNNER

    image_bundle = onnx_image_bundle
    photos = photo_folder(tmp_path / "photos", 120)
    rng = np.random.default_rng(0)
    grad = np.add.outer(np.arange(30) * 6, np.arange(40) * 4)[..., None] + [0, 40, 90]
    jpg_px = np.clip(grad + rng.integers(-20, 20, (30, 40, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(jpg_px).save(tmp_path / "photo.jpg", quality=90)
    alpha_px = np.dstack([jpg_px, rng.integers(1, 255, (30, 40), dtype=np.uint8)])
    Image.fromarray(alpha_px).save(tmp_path / "alpha.png")  # semi-transparent: not exact
    settings = {"epochs": 8, "seed": 3}
    out = drive(node, page_url, [{"goto": "?threads=1"}, {"bundle": str(image_bundle)},
                                 {"folder": str(photos)}, {"adapt": settings, "save": "img"},
                                 {"decode": str(tmp_path / "photo.jpg")},
                                 {"decode": str(tmp_path / "alpha.png")}], tmp_path)
    s = out["steps"]
    assert s[1]["ok"] and "Self-test passed" in s[1]["selftest"], s[1]
    assert "image input" in s[1]["manifest"], s[1]["manifest"]
    assert s[2]["ok"], s[2]
    assert s[2]["progress"] == [120 + 2, 120 + 2], s[2]  # decoding: every image file
    assert "photos: 120 images" in s[2]["info"], s[2]["info"]
    assert "vertical: " in s[2]["info"] and "(new label: it will be imprinted)" in s[2]["info"]
    assert "Skipped 4 file(s)" in s[2]["info"], s[2]["info"]
    assert s[3]["ok"], s[3]
    p = subprocess.run([sys.executable, str(RUNNER), "adapt", str(image_bundle), "--data",
                        "photos", "--out", str(tmp_path / "py"), "--quiet",
                        *[f"--{k}={v}" for k, v in settings.items()]],
                       cwd=tmp_path, capture_output=True, text=True, env={**os.environ,
                                                                          "PYTHONPATH": ""})
    assert p.returncode == 0, p.stderr
    P = json.loads((tmp_path / "py" / "report.json").read_text())
    J = json.loads((tmp_path / "out" / "img" / "report.json").read_text())
    compare_reports(P, J)  # counts, labels (new: vertical), gate, history, skipped warning
    assert J["new_labels"] == ["vertical"] and J["skipped_files"] == P["skipped_files"] == 4
    assert not P["rolled_back"] and "kept the new head" in s[3]["decision"], P["gate"]
    assert [v["path"] for v in J["skipped"]] == [v["path"] for v in P["skipped"]]
    for a, b in zip(P["skipped"], J["skipped"], strict=True):  # the decoders' own words differ
        assert a["reason"] == b["reason"] or ("unreadable image" in a["reason"]
                                              and "unreadable image" in b["reason"]), (a, b)
    err = head_diff(tmp_path / "py" / "head.npz", tmp_path / "out" / "img" / "head.npz")
    assert err <= HEAD_ATOL, f"heads differ by {err:.3g} (> {HEAD_ATOL})"
    d = s[4]
    rgba = np.frombuffer(base64.b64decode(d["rgba"]), np.uint8).reshape(d["height"], d["width"], 4)
    with Image.open(tmp_path / "photo.jpg") as im:
        pil = np.asarray(im.convert("RGB"), np.int16)
    diff = np.abs(rgba[..., :3].astype(np.int16) - pil)
    print(f"\nphotos: head max abs diff {err:.3g} (rolled back {P['rolled_back']}); JPEG decode "
          f"vs Pillow: max {diff.max()}, mean {diff.mean():.3f} grey levels, "
          f"{(diff > 0).mean():.1%} of values differ")
    assert rgba.shape == (30, 40, 4) and (rgba[..., 3] == 255).all()
    a = np.frombuffer(base64.b64decode(s[5]["rgba"]), np.uint8).reshape(30, 40, 4)
    adiff = np.abs(a[..., :3].astype(np.int16) - alpha_px[..., :3])
    print(f"semi-transparent PNG (alpha 1..254) vs Pillow's RGB: max {adiff.max()}, mean "
          f"{adiff.mean():.3f} grey levels ({(adiff > 0).mean():.1%} of values differ)")
    assert (a[..., 3] == alpha_px[..., 3]).all()
    assert out["console_errors"] == [], out["console_errors"]


@pytest.fixture(scope="module")
def tail_bundles(tiny_ck, tmp_path_factory) -> dict:
    """The tiny model's ``--trainable bias`` bundles, ONNX and TFLite."""
    d = tmp_path_factory.mktemp("tail")
    return {t: export_tiny(tiny_ck, d / t, t, trainable="bias") for t in ("onnx", "tflite")}


def test_web_page_personalises_tail_bundles(page_url, node, tail_bundles, tmp_path):
    """Tail bundles (``--trainable bias``) on onnxruntime-web and LiteRT.js: the page says the
    backbone tensors train, and gives the Python runner's parameters (backbone tensors and
    head), counts and gate decision."""
    shifted = csv_log(tmp_path / "shifted.csv", 15, runs=100, **SHIFT)
    settings = {"epochs": 10, "seed": 9}
    steps = [{"goto": "?threads=1"}]
    for t, b in tail_bundles.items():  # a file input fires no change for the same file again
        data = shutil.copy(shifted, tmp_path / f"shifted-{t}.csv")
        steps += [{"bundle": str(b)}, {"data": str(data)}, {"adapt": settings, "save": t}]
    out = drive(node, page_url, steps, tmp_path)
    s = out["steps"]
    for j, (t, b) in enumerate(tail_bundles.items()):
        sb, sd, sa = s[1 + 3 * j : 4 + 3 * j]
        assert sb["ok"] and "Self-test passed" in sb["selftest"], sb
        assert "Trains: the head and 2 backbone tensor(s) (--trainable bias" in sb["manifest"]
        assert sd["ok"] and sa["ok"], (sd, sa)
        P = python_runner(b, shifted, tmp_path / f"py-{t}",
                          [f"--{k}={v}" for k, v in settings.items()])
        J = json.loads((Path(sa["saved"]) / "report.json").read_text())
        assert J["backend"] == ("onnxruntime-web" if t == "onnx" else "litert.js")
        compare_reports(P, J)
        err = head_diff(tmp_path / f"py-{t}" / "head.npz", Path(sa["saved"]) / "head.npz")
        assert err <= HEAD_ATOL, f"{t}: parameters differ by {err:.3g} (> {HEAD_ATOL})"
        print(f"\ntail {t}: rolled back {P['rolled_back']}, steps {J['steps']} "
              f"(fused {J['steps_fused']}), max abs diff {err:.3g}")
    assert [e for e in out["console_errors"] if not re.match(r"(INFO|WARNING): ", e)] == []
