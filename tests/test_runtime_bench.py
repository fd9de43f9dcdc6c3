"""``tools.runtime_bench`` (``make bench-web``): the runtimes' bench runs end to end on a tiny
bundle for one round, and its summary takes ratios within a round.

The end-to-end tests run the Python runner, onnxruntime-node and onnxruntime-web in headless
Chromium (plus the web page's load) on the tiny ONNX bundle, and LiteRT.js in Node and in
Chromium on the tiny TFLite bundle (~10 s each, the bundles' export aside); they skip, saying
why, where Chromium, node or the built TypeScript runner (``make js-install``) is missing.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_device_npz


def rows_two_rounds() -> list[dict]:
    base = {"steps": 10, "epochs": 5, "rolled_back": False, "load_s": 0.1, "adapt_s": 0.1,
            "selftest_s": 0.1, "backend": "x 1.0"}
    return [
        {**base, "round": 0, "bundle": "b", "runtime": "python"},
        {**base, "round": 0, "bundle": "b", "runtime": "node", "adapt_s": 0.3},
        {**base, "round": 1, "bundle": "b", "runtime": "node", "adapt_s": 0.1},
        {**base, "round": 1, "bundle": "b", "runtime": "python", "adapt_s": 0.05},
        {"round": 1, "bundle": "b", "runtime": "chromium-wasm-1t", "error": "boom"},
    ]


@pytest.mark.unit
def test_summary_takes_ratios_within_a_round_and_keeps_failures():
    from tools.runtime_bench.report import markdown, summarise

    s = summarise(rows_two_rounds())["b"]
    # node ÷ python per round: 0.3/0.1 = 3 and 0.1/0.05 = 2 (not the ratio of the medians)
    assert s["node"]["vs_python"]["adapt_s"] == pytest.approx(
        {"median": 2.5, "min": 2.0, "max": 3.0, "n": 2})
    assert s["node"]["adapt_s"]["median"] == pytest.approx(0.2)
    assert "vs_python" not in s["python"]
    assert s["chromium-wasm-1t"]["failed"] == ["boom"]
    md = markdown(summarise(rows_two_rounds()), {
        "data_desc": "d", "seed": 0, "epochs": 5, "rounds": 2, "machine": "m",
        "versions": {"Node": "v20"}})
    assert "| b | onnxruntime-node | 100 (100–100) | 100 (100–100) | 200 (100–300) |" in md
    assert "2.5× (2–3)" in md and "**failed** 1×: boom" in md


def test_runtime_bench_runs_end_to_end(tiny_bundle, tmp_path):
    """One round, 2 epochs: every cell measured, the same work in every runtime, the outputs."""
    import tools.runtime_bench as rb
    from tools.runtime_bench.__main__ import main

    why = rb.unavailable("browser")
    if why:
        pytest.skip(f"skipping the runtime bench: {why}")
    data = write_device_npz(tmp_path / "device.npz", 60, seed=12, gain=1.2)
    out = main([str(tiny_bundle), "--data", str(data), "--rounds", "1", "--epochs", "2",
                "--runtimes", "python,node,chromium-wasm-1t", "--out", str(tmp_path / "o")])
    rows = out["rows"]
    assert [r["runtime"] for r in rows] == ["python", "node", "chromium-wasm-1t"]
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    for r in rows:
        assert r["load_s"] > 0 and r["selftest_s"] > 0 and r["adapt_s"] > 0, r
        assert r["selftest_err"] < 1e-4 and r["epochs"] == 2, r
    assert len({(r["steps"], r["rolled_back"]) for r in rows}) == 1, rows  # the same work
    assert rows[0]["cmd_adapt_s"] > 0 and rows[1]["cmd_selftest_s"] > 0
    assert rows[2]["page_load_s"] > 0 and rows[2]["threads"] == 1
    saved = json.loads((tmp_path / "o" / "runtimes.json").read_text())
    assert saved["summary"]["bundle"]["node"]["vs_python"]["adapt_s"]["n"] == 1
    md = (tmp_path / "o" / "runtimes.md").read_text()
    assert "onnxruntime-web WASM in Chromium, 1 thread" in md and "Chromium" in md
    assert (tmp_path / "o" / "runtimes.png").stat().st_size > 10_000


def test_runtime_bench_runs_tflite_on_litert_js(tiny_tflite_bundle, tmp_path):
    """A TFLite bundle: LiteRT.js in Node and in Chromium (with the web page's load)."""
    import tools.runtime_bench as rb
    from tools.runtime_bench.__main__ import main

    why = rb.unavailable("browser")
    if why:
        pytest.skip(f"skipping the runtime bench: {why}")
    data = write_device_npz(tmp_path / "device.npz", 60, seed=12, gain=1.2)
    out = main([str(tiny_tflite_bundle), "--data", str(data), "--rounds", "1", "--epochs", "2",
                "--runtimes", "node-litert,chromium-litert,node", "--no-commands",
                "--out", str(tmp_path / "o")])
    rows = out["rows"]
    # onnxruntime-node does not run TFLite bundles: not planned
    assert [r["runtime"] for r in rows] == ["node-litert", "chromium-litert"]
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    assert all(r["backend"].startswith("litert.js") and r["epochs"] == 2 for r in rows), rows
    assert rows[0]["steps"] == rows[1]["steps"] and rows[1]["page_load_s"] > 0
    assert "cmd_adapt_s" not in rows[0]
