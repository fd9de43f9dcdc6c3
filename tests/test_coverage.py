"""The model-coverage table (``make coverage`` -> docs/coverage.{md,json}) covers everything.

(a) every registered exporter, input kind and precision has coverage: rows of the coverage
    run, or, for the scenario input kinds the run does not use, the scenario tests named in
    :data:`COVERED_ELSEWHERE`;
(b) every case of the coverage tool's registry has a row for every target x precision (the
    committed table drops nothing);
(c) one small case runs end to end through the tool's own cell function (the harness works).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration  # (c) runs a real export and the runner

COVERAGE_JSON = ROOT / "docs" / "coverage.json"
#: Input kinds the coverage run does not export (``export_model`` bundles take the model's
#: own ``tensor``), and the scenario tests (file::function) that export and adapt them
#: instead. A new kind must appear in the coverage rows or be added here with its tests.
COVERED_ELSEWHERE = {
    "timeseries": ("tests/test_export.py::test_int8_bundles_record_quantization_and_keep_accuracy",
                   "tests/test_tflite.py::test_runner_adapts_a_tflite_bundle"),
    "image": ("tests/test_vision.py::test_new_class_by_imprinting_then_training",),
    "text": ("tests/test_text.py::test_runner_learns_new_topics_from_a_csv",
             "tests/test_text.py::test_int8_tflite_text_is_dynamic_range_builtin_and_close_to_fp32"),
}

@pytest.fixture(scope="module")
def coverage() -> dict:
    assert COVERAGE_JSON.is_file(), "docs/coverage.json is missing: run `make coverage`"
    return json.loads(COVERAGE_JSON.read_text())


def _row_kinds(rows: list[dict]) -> set[str]:
    return {r["metrics"]["input_kind"] for r in rows if r["metrics"].get("input_kind")}


def test_every_exporter_input_kind_and_precision_has_coverage(coverage):
    from edgetl.config import PRECISIONS
    from edgetl.export.registry import EXPORTERS, get_exporter
    from edgetl.inputs import INPUT_KINDS

    get_exporter("onnx")  # loads the built-in exporters
    rows = coverage["rows"]
    assert set(EXPORTERS) <= {r["target"] for r in rows}, (
        f"exporters without coverage rows: {sorted(set(EXPORTERS) - {r['target'] for r in rows})}"
        "; run `make coverage`")
    assert set(PRECISIONS) <= {r["precision"] for r in rows}
    for target in EXPORTERS:  # each exporter at each precision, not just somewhere
        assert {r["precision"] for r in rows if r["target"] == target} >= set(PRECISIONS)
    in_rows = _row_kinds(rows)
    for kind in INPUT_KINDS:
        if kind in in_rows:
            continue
        where = COVERED_ELSEWHERE.get(kind)
        assert where, (f"input kind {kind!r} has no coverage row and no entry in "
                       "COVERED_ELSEWHERE (the scenario tests that cover it)")
        for ref in where:
            file, _, func = ref.partition("::")
            assert f"def {func}(" in (ROOT / file).read_text(), (
                f"{ref} (coverage of the {kind!r} input kind) does not exist")
    assert not set(COVERED_ELSEWHERE) - set(INPUT_KINDS), "COVERED_ELSEWHERE names a stale kind"


def test_every_case_has_every_target_and_precision(coverage):
    from tools.coverage.__main__ import targets_and_precisions
    from tools.coverage.cases import CASES
    from tools.coverage.cell import STEPS

    targets, precisions = targets_and_precisions()
    have = {(r["case"], r["target"], r["precision"]) for r in coverage["rows"]}
    want = {(c, t, p) for c in CASES for t in targets for p in precisions}
    assert not want - have, f"cells without a row (run `make coverage`): {sorted(want - have)}"
    assert not {c for c, _, _ in have} - set(CASES), "rows of cases no longer registered"
    assert len(coverage["rows"]) == len(have), "duplicate rows"
    for r in coverage["rows"]:  # a failure keeps its reason
        assert set(r["steps"]) == set(STEPS)
        for s, v in r["steps"].items():
            assert v in ("ok", "n/a", "failed", "timeout", "crashed", "skipped"), (r["case"], s)
            if v in ("failed", "timeout", "crashed"):
                assert r["errors"].get(s), (r["case"], r["target"], r["precision"], s)
        assert r["pass"] == all(v in ("ok", "n/a") for v in r["steps"].values())
    assert coverage["summary"] == {"pass": sum(r["pass"] for r in coverage["rows"]),
                                   "cells": len(coverage["rows"])}
    md = (ROOT / "docs" / "coverage.md").read_text()
    assert (f"{coverage['summary']['pass']} of {coverage['summary']['cells']} cells pass end to "
            "end") in md


def test_every_case_has_every_trainable_spec(coverage):
    """(b) for ``--trainable``: a row per case x SPEC of the tool's registry for ONNX, and
    for any other target every SPEC of each case it has (the table lists the cases a target
    has not run); a cell that fails keeps its reason, and a failed export says what to do (a
    smaller SPEC, ``--trainable head``, another target when the model itself does not convert,
    a smaller lr when the torch reference diverges), never silently trains less."""
    from tools.coverage import trainable
    from tools.coverage.cases import CASES

    tr = coverage.get("trainable")
    assert tr, "docs/coverage.json has no trainable block: run `make coverage`"
    assert set(tr["specs"]) >= set(trainable.SPECS) and "onnx" in tr["targets"]
    have = {(r["case"], r["target"], r["spec"]) for r in tr["rows"]}
    want = {(c, "onnx", s) for c in CASES for s in trainable.SPECS}
    want |= {(c, t, s) for c, t, _ in have for s in trainable.SPECS}
    assert not want - have, f"trainable cells without a row: {sorted(want - have)}"
    assert len(tr["rows"]) == len(have), "duplicate rows"
    for r in tr["rows"]:
        assert set(r["steps"]) == set(trainable.STEPS)
        assert r["pass"] == all(v == "ok" for v in r["steps"].values())
        for s, v in r["steps"].items():
            if v in ("failed", "timeout", "crashed"):
                assert r["errors"].get(s), (r["case"], r["target"], r["spec"], s)
        why = r["errors"].get("export", "")
        if r["steps"]["export"] == "failed":
            assert any(s in why for s in ("SPEC", "--trainable head", "--target", "head.lr")), (
                r["case"], r["spec"], why)
        if r["pass"]:  # the SPEC's tensors are in the train step, checked against torch
            m = r["metrics"]
            assert m["trainable_tensors"] > 0 and m["parity_err32"] is not None
    assert tr["summary"] == {"pass": sum(r["pass"] for r in tr["rows"]),
                             "cells": len(tr["rows"])}
    md = (ROOT / "docs" / "coverage.md").read_text()
    assert f"**{tr['summary']['pass']} of {tr['summary']['cells']} trainable cells pass**" in md


def test_trainable_rows_merge_by_cell():
    from tools.coverage.report import render_trainable
    from tools.coverage.trainable import STEPS, merge

    def row(case, spec, ok):
        return {"case": case, "target": "onnx", "precision": "fp32", "spec": spec,
                "steps": {s: "ok" if ok else "failed" for s in STEPS}, "metrics": {},
                "errors": {} if ok else {s: "why" for s in STEPS}, "pass": ok}

    kw = {"command": "c", "date": "d", "commit": "x", "seconds": 60.0, "timeout": 300}
    a = merge(None, [row("vit", "bias", False), row("bert", "all", True)], ["vit", "bert"], **kw)
    b = merge(a, [row("vit", "bias", True)], ["vit", "bert"], **kw)
    assert [(r["case"], r["spec"], r["pass"]) for r in b["rows"]] == [
        ("vit", "bias", True), ("bert", "all", True)]
    assert b["summary"] == {"pass": 2, "cells": 2} and len(b["runs"]) == 2
    text = "\n".join(render_trainable(a))
    assert "1 of 2 trainable cells pass" in text and "**T1** build" in text


def test_one_cell_runs_end_to_end(tmp_path):
    from tools.coverage.cell import run_cell

    row = run_cell("user_gru_tokens", "onnx", "fp32", tmp_path / "cell", timeout=120)
    assert row["pass"], (row["steps"], row["errors"])
    m = row["metrics"]
    assert m["backbone_max_abs_err"] <= 1e-4 and m["train_step_max_abs_err"] <= 1e-4
    assert m["heldout_torch"] is not None and m["latency_ms_p50"] > 0
    assert m["adapt_after"] is not None and m["bundle_bytes"] > 0
    assert (tmp_path / "cell" / "bundle" / "manifest.json").is_file()


def test_a_hanging_cell_is_recorded_as_timeout(tmp_path):
    from tools.coverage.cell import run_cell

    row = run_cell("user_gru_tokens", "onnx", "fp32", tmp_path / "cell", timeout=0.5)
    assert not row["pass"]
    timed_out = [s for s, v in row["steps"].items() if v == "timeout"]
    assert len(timed_out) == 1 and "exceeded" in row["errors"][timed_out[0]]


def test_one_trainable_cell_runs_end_to_end(tmp_path):
    """A --trainable cell (export with its checks, device self-test, 20 steps through the
    runner's backend against torch.optim) passes on a small user CNN."""
    from tools.coverage.trainable import cell_main, passed

    (tmp_path / "cell").mkdir()
    cell_main("user_dwsep_cnn", "onnx", "bias", str(tmp_path / "cell"))
    row = json.loads((tmp_path / "cell" / "result.json").read_text())
    assert set(row["steps"].values()) == {"ok"}, row
    assert passed(row) and row["metrics"]["parity_err32"] <= 1e-5, row["metrics"]
