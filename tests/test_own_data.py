"""Your own data: recipes over CSV logs, image folders and text CSVs, end to end.

The tests make small data themselves, write a recipe and run the real pipeline (tiny nets,
few epochs), plus every bad-file error the loaders promise.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from edgetl.config import ImageFiles, TextFiles, TimeseriesFiles, load_recipe
from edgetl.data import files
from edgetl.errors import ConfigError, DataError

from .conftest import run_snippet

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("rest", "walk", "run")


def write_log(path: Path, users=("u0", "u1", "u2", "u3", "u4", "u5"), sessions=2, n=320,
              header=("user", "session", "label", "ax", "ay", "az"), seed=0) -> Path:
    """A 50 Hz three-axis log: each label oscillates at its own frequency."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for u in users:
            for s in range(sessions):
                for k, label in enumerate(LABELS):
                    t = np.arange(n)[:, None] / 50.0
                    x = np.sin(2 * np.pi * (2 * k + 1) * t + rng.uniform(0, 6, 3))
                    x += 0.3 * rng.standard_normal(x.shape)
                    row = {"user": u, "session": s, "label": label}
                    for r in x.round(4):
                        vals = dict(zip(("ax", "ay", "az"), r))
                        w.writerow([{**row, **vals}[h] for h in header])
    return path


def write_images(root: Path, users=("a", "b", "c", "d", "e"), per=10, seed=0) -> Path:
    """``root/<user>/<label>/*.png``: horizontal stripes, vertical stripes or dots."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for u in users:
        for k, label in enumerate(("hstripes", "vstripes", "dots")):
            d = root / u / label
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per):
                a = rng.integers(0, 60, (24, 24, 3))
                if k == 0:
                    a[::4] += 180
                elif k == 1:
                    a[:, ::4] += 180
                else:
                    a[::5, ::5] += 190
                Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


# ------------------------------------------------------------------------ recipes and splits

def test_data_section_is_a_tagged_union(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[data]\nkind = "timeseries"\npath = "x.csv"\nwindow = 32\n')
    r = load_recipe(p)
    assert isinstance(r.data, TimeseriesFiles) and r.data.kind == "timeseries"
    assert r.data.window == 32 and r.data.is_files
    p.write_text('[data]\nkind = "image"\npath = "imgs"\n[teacher]\narch = "cnn2d"\n'
                 '[student]\narch = "cnn2d"\n')
    assert isinstance(load_recipe(p).data, ImageFiles)
    assert load_recipe(ROOT / "models/har/recipe.toml").data.kind == "timeseries"
    assert load_recipe(ROOT / "models/vision/recipe.toml").data.kind == "image"
    for text, msg in (('kind = "timeseries"\npath = "x"\ndataset = "hapt"', "not both"),
                      ('kind = "audio"\npath = "x"', "data.kind: expected one of"),
                      ('kind = "text"', "data.path: required"),
                      ('kind = "text"\npath = "x"\nimage_size = 32', "unknown key"),
                      ('kind = "timeseries"\npath = "x"\ndevice_users = ["a"]\n'
                       'server_users = ["a", "b"]', "both server and device users")):
        p.write_text(f"[data]\n{text}\n")
        with pytest.raises(ConfigError, match=msg):
            load_recipe(p)
    p.write_text('[data]\nkind = "image"\npath = "imgs"\n')  # default teacher is cnn1d
    with pytest.raises(ConfigError, match="teacher.arch: image data need one of"):
        load_recipe(p)


def test_user_column_drives_a_user_disjoint_split(tmp_path):
    log = write_log(tmp_path / "log.csv")
    cfg = TimeseriesFiles(kind="timeseries", path=str(log), window=64, stride=32)
    sd = files.load_timeseries(cfg)
    assert sd.what == "users" and sd.channels == ("ax", "ay", "az") and sd.labels == (
        "rest", "run", "walk")
    assert sd.x.shape[1:] == (64, 3) and len(sd.x) == 6 * 2 * 3 * 9  # 9 windows per run
    g = files.groups_of(cfg, sd.owners, sd.what, sd.y, sd.labels, in_order=True)
    assert len(g.device) == 2 and len(g.val) == 1 and len(g.train) == 3  # 25 % / 20 % of 6
    assert not (set(g.train) | set(g.val)) & set(g.device)
    again = files.groups_of(cfg, sd.owners, sd.what, sd.y, sd.labels, in_order=True)
    assert again.device == g.device  # seeded
    named = TimeseriesFiles(kind="timeseries", path=str(log), window=64, stride=32,
                            device_users=("u5",), server_val_users=("u0",))
    g = files.groups_of(named, sd.owners, sd.what, sd.y, sd.labels, in_order=True)
    assert [g.name(i) for i in g.device] == ["u5"] and [g.name(i) for i in g.val] == ["u0"]
    assert sorted(g.name(i) for i in g.train) == ["u1", "u2", "u3", "u4"]


def test_without_users_every_label_is_split_by_fractions_in_file_order(tmp_path):
    log = write_log(tmp_path / "log.csv", users=("solo",), sessions=1, n=1200,
                    header=("label", "ax", "ay", "az"))
    cfg = TimeseriesFiles(kind="timeseries", path=str(log), window=64, stride=32,
                          device_count=2)
    sd = files.load_timeseries(cfg)
    assert sd.owners is None and sd.gap == 1
    g = files.groups_of(cfg, sd.owners, sd.what, sd.y, sd.labels, in_order=True, gap=sd.gap)
    assert "no user column" in g.note and g.names[:2] == ("train", "val")
    for c in range(3):  # per label: train block, gap, val block, gap, device blocks
        seq = g.group[sd.y == c]
        assert list(seq[:3]) == [0, 0, 0] and seq[-1] == 3
        blocks = [int(v) for i, v in enumerate(seq) if i == 0 or v != seq[i - 1]]
        assert blocks == [0, -1, 1, -1, 2, 3]


def test_text_csv_loads_and_splits_by_user(tmp_path):
    from edgetl.kinds.text import text_splits, write_own_devices

    p = tmp_path / "texts.csv"
    rows = [(f"{w} number {i}", lab, f"user{u}") for u in range(5) for i in range(6)
            for w, lab in (("pasta and bread", "food"), ("the match was won", "sport"))]
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows([("text", "label", "user"), *rows])
    (tmp_path / "r.toml").write_text(
        f'[data]\nkind = "text"\npath = "{p}"\nmax_length = 16\ndevice_users = ["user4"]\n'
        '[teacher]\narch = "minilm"\n[student]\narch = "minilm"\nlayers = 1\n')
    r = load_recipe(tmp_path / "r.toml")
    assert isinstance(r.data, TextFiles)
    sp = text_splits(r)
    assert {k: len(v) for k, v in sp.y.items()} == {"train": 36, "val": 12, "test": 12}
    assert sp.labels == ("food", "sport") and sp.tokens["train"].shape == (36, 2, 16)
    assert all(t.endswith(tuple(f"number {i}" for i in range(6))) for t in sp.texts["test"])
    devs = write_own_devices(tmp_path / "out", sp.own, r.data.seed)
    assert [d.user for d in devs] == ["user4"] and devs[0].labels == ("food", "sport")
    with open(devs[0].adapt) as f:
        adapt = list(csv.DictReader(f))
    assert len(adapt) == 6 and {a["label"] for a in adapt} == {"food", "sport"}


# ------------------------------------------------------------------------- bad-file errors

def _ts(path, **kw):
    return TimeseriesFiles(kind="timeseries", path=str(path), window=64, stride=32, **kw)


def test_bad_sensor_files_say_file_row_and_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; expected an .npz"):
        files.load_timeseries(_ts(tmp_path / "nope.csv"))
    log = write_log(tmp_path / "log.csv", header=("user", "session", "ax", "ay", "az"))
    with pytest.raises(DataError, match=r"header lacks a 'label' column"):
        files.load_timeseries(_ts(log))
    log = write_log(tmp_path / "log.csv")
    with pytest.raises(DataError, match=r"header lacks channel column\(s\) \['gx'\]"):
        files.load_timeseries(_ts(log, channels=("ax", "gx")))
    lines = log.read_text().splitlines()
    lines[41] = "u0,0,rest,0.1,oops,0.3"
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"log\.csv:42: expected 3 numeric channel values"):
        files.load_timeseries(_ts(log))
    few = write_log(tmp_path / "few.csv", users=("a", "b"))
    sd = files.load_timeseries(_ts(few))
    with pytest.raises(DataError, match=r"found 2 users \(\['a', 'b'\]\); the splits need at "
                                        r"least 3"):
        files.groups_of(_ts(few), sd.owners, sd.what, sd.y, sd.labels, in_order=True)
    with pytest.raises(ConfigError, match=r"data.device_users: users \['zed'\] are not in"):
        files.groups_of(_ts(few, device_users=("zed",)), sd.owners, sd.what, sd.y,
                        sd.labels, in_order=True)
    tiny = write_log(tmp_path / "tiny.csv", users=("solo",), sessions=1, n=200,
                     header=("label", "ax", "ay", "az"))
    sd = files.load_timeseries(_ts(tiny))
    with pytest.raises(DataError, match=r"label 'rest' has 5 samples; the splits need at least"):
        files.groups_of(_ts(tiny), sd.owners, sd.what, sd.y, sd.labels, in_order=True, gap=1)
    np.savez(tmp_path / "w.npz", x=np.zeros((4, 32, 3), np.float32), y=np.array(["a"] * 4))
    with pytest.raises(DataError, match=r"windows have 32 samples.*set data.window = 32"):
        files.load_timeseries(_ts(tmp_path / "w.npz"))


def test_bad_image_folders_name_the_folder(tmp_path):
    root = write_images(tmp_path / "imgs", users=("a",), per=2)
    cfg = ImageFiles(kind="image", path=str(root / "a"), image_size=32)
    im = files.load_images(cfg)
    assert im.x.shape == (6, 32, 32, 3) and im.x.dtype == np.uint8 and im.owners is None
    (root / "a" / "empty").mkdir()
    (root / "a" / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"label folder .*empty has no readable image \(1 "
                                        r"file\(s\) skipped, e\.g\. .*broken\.png"):
        files.load_images(cfg)
    with pytest.raises(DataError, match="does not exist"):
        files.load_images(ImageFiles(kind="image", path=str(tmp_path / "none")))


def test_cli_turns_a_bad_file_into_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from edgetl.cli import app

    log = write_log(tmp_path / "log.csv")
    lines = log.read_text().splitlines()
    lines[7] = "u0,0,rest,1e400x,0,0"
    log.write_text("\n".join(lines) + "\n")
    (tmp_path / "r.toml").write_text(f'[data]\nkind = "timeseries"\npath = "{log}"\n')
    res = CliRunner().invoke(app, ["run", str(tmp_path / "r.toml"), "--out",
                                   str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1
    assert "error:" in res.output and "log.csv:8: expected 3 numeric channel values" in \
        res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------ end to end

def _quick_start() -> str:
    text = (ROOT / "docs" / "own-data.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 15
    return block


def test_quick_start_csv_recipe_runs_end_to_end(tmp_path):
    """The docs' quick start, verbatim: a CSV log with users -> `edgetl run` -> devices."""
    (tmp_path / "models" / "own-csv").mkdir(parents=True)
    (tmp_path / "models/own-csv/recipe.toml").write_text(
        (ROOT / "models/own-csv/recipe.toml").read_text())
    p = run_snippet(_quick_start().replace(" --out", " -q --out"), tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "runs/own-csv/summary.json").read_text())
    assert s["server"]["teacher"]["heldout_accuracy"] > 0.6  # chance: 1/3
    assert s["server"]["student"]["heldout_accuracy"] > 0.6
    users = sorted({r["user"] for r in s["devices"]})
    assert len(users) == 2 and all(u.startswith("u") for u in users)  # held-out users
    gate = {c["name"]: c["ok"] for c in s["bundles"][0]["gate"]}
    assert gate.get("adaptation") and all(gate.values())
    for u in users:
        folder = tmp_path / "runs/own-csv/devices" / f"user_{u}"
        with np.load(folder / "adapt.npz") as a, np.load(folder / "eval.npz") as e:
            assert a["x"].shape[1:] == (64, 3) and len(a["x"]) == len(e["x"]) == 27
    assert "split of my-data/log.csv: users: server" in p.stdout + p.stderr


def test_image_folder_recipe_runs_end_to_end(tmp_path):
    from edgetl.pipeline import run_recipe

    root = write_images(tmp_path / "imgs")
    (tmp_path / "r.toml").write_text(f"""
name = "own-images"
[data]
kind = "image"
path = "{root}"
by_user = true
image_size = 32
device_users = ["e"]
[teacher]
arch = "cnn2d"
channels = [16, 32]
kernels = [3, 3]
pools = [2, 2]
[student]
arch = "cnn2d"
channels = [8, 16]
kernels = [3, 3]
pools = [2, 2]
[pretrain]
epochs = 6
batch_size = 16
[student_train]
epochs = 6
batch_size = 16
[export]
calibration_windows = 32
max_accuracy_drop = 5.0
[adapt]
epochs = 5
""")
    s = run_recipe(load_recipe(tmp_path / "r.toml"), tmp_path / "out", show=False)
    assert s.server["student"]["heldout_accuracy"] > 0.6 and s.server["own_data"] == str(root)
    assert [b["name"] for b in s.bundles] == ["student-onnx-fp32", "teacher-onnx-fp32"]
    assert {r["user"] for r in s.devices} == {"e"} and len(s.devices) == 2
    assert all(r["after_accuracy"] > 0.6 and r["start"] == "shipped" for r in s.devices)
    adapt = tmp_path / "out/devices/device_1/adapt"
    assert sorted(p.name for p in adapt.iterdir()) == ["dots", "hstripes", "vstripes"]
    assert all(len(list((adapt / d).glob("*.png"))) == 5 for d in ("dots", "hstripes"))


@pytest.mark.slow
def test_text_csv_recipe_runs_end_to_end(tmp_path):
    """MiniLM teacher + 1-layer student on a text CSV with users (~80 s of CPU)."""
    from edgetl.pipeline import run_recipe

    p = tmp_path / "texts.csv"
    topics = {"food": "pasta bread soup curry pie rice", "sport": "match goal race tennis "
              "marathon cycling", "tech": "laptop phone chip router code server"}
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("text", "label", "user"))
        for u in range(5):
            for lab, words in topics.items():
                for word in words.split():
                    w.writerow((f"a story about {word} by user {u}", lab, f"user{u}"))
    (tmp_path / "r.toml").write_text(f"""
[data]
kind = "text"
path = "{p}"
max_length = 32
[teacher]
arch = "minilm"
pretrained = true
[student]
arch = "minilm"
layers = 1
pretrained = true
[pretrain]
epochs = 10
batch_size = 32
[student_train]
epochs = 1
batch_size = 16
lr = 0.0001
[export]
opset = 18
calibration_windows = 16
max_accuracy_drop = 5.0
[adapt]
epochs = 5
""")
    s = run_recipe(load_recipe(tmp_path / "r.toml"), tmp_path / "out", show=False)
    assert s.server["teacher"]["heldout_accuracy"] > 0.6
    assert {r["bundle"] for r in s.devices} == {"student-onnx-fp32", "minilm-onnx-fp32"}
