"""Checkpoints that are damaged or incomplete are refused by name before anything uses them."""

from __future__ import annotations

import pytest
import torch

from edgetl.checkpoint import load_checkpoint, save_checkpoint
from edgetl.errors import EdgetlError

pytestmark = pytest.mark.unit


def _edit(src, dst, fn):
    p = torch.load(src, weights_only=True)
    fn(p)
    torch.save(p, dst)
    return dst


def test_non_finite_or_incomplete_checkpoints_are_refused(tiny_ck, tmp_path):
    good = save_checkpoint(tiny_ck, tmp_path / "good.pt")
    assert load_checkpoint(good).labels == tiny_ck.labels

    def nan_weight(p):
        k = next(k for k, v in p["state_dict"].items() if v.is_floating_point())
        p["state_dict"][k].view(-1)[0] = float("nan")

    with pytest.raises(EdgetlError, match="hold NaN or infinite values"):
        load_checkpoint(_edit(good, tmp_path / "nan.pt", nan_weight))
    with pytest.raises(EdgetlError, match=r"mean.*NaN or infinite"):
        load_checkpoint(_edit(good, tmp_path / "inf.pt",
                              lambda p: p["mean"].fill_(float("inf"))))
    for name, fn in (("no_head", lambda p: p.pop("head")),
                     ("bad_net", lambda p: p["net"].update(nonsense=1)),
                     ("bad_shape", lambda p: p.update(labels=[*p["labels"], "extra"]))):
        with pytest.raises(EdgetlError, match="not a complete edgetl.checkpoint/1 checkpoint"):
            load_checkpoint(_edit(good, tmp_path / f"{name}.pt", fn))
