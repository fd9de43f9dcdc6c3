"""A user model's backbone (:class:`edgetl.export.model.HeadInput`) as a ``torch.fx`` graph.

``HeadInput`` runs the whole model with the head swapped for a probe that *records* its input
(a side effect, and a dtype branch for token ids), which ``fx.symbolic_trace`` cannot follow.
:func:`trace_head_input` traces the model itself instead, with the probe as a leaf module,
and makes the probe's input (after its parameter-free ``pre`` modules) the graph's output:
the same function as ``HeadInput.forward``, with parameter names ``model.<path>`` as
``HeadInput.named_parameters()`` gives them, so ``--trainable`` cuts it like a checkpoint's
backbone. torch.nn modules stay leaves (fx's default: an ``nn.LSTM`` or
``nn.TransformerEncoder`` is one node whose parameters the cut sees). A transformers model,
whose forward branches on tensor metadata that plain fx cannot follow, is traced with
transformers' own ``HFTracer`` (concrete shapes from the sample) when plain fx fails.
"""

from __future__ import annotations

import torch
from torch import fx, nn


class _Root(nn.Module):
    """``forward(x) = call(model, x)``, ids cast to int64 first (as ``HeadInput`` does)."""

    def __init__(self, model: nn.Module, call, ids: bool):
        super().__init__()
        self.model, self._call, self._ids = model, call, ids

    def forward(self, x):
        if self._ids:
            x = x.long()
        return self._call(self.model, x)


class _ProbeTracer(fx.Tracer):
    def __init__(self, probe: nn.Module):
        super().__init__()
        self.probe = probe

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m is self.probe or super().is_leaf_module(m, qualname)


def _graph(root: nn.Module, probe: nn.Module, sample: torch.Tensor | None) -> fx.Graph:
    """Plain fx first; a transformers model that plain fx cannot trace: ``HFTracer``."""
    try:
        return _ProbeTracer(probe).trace(root)
    except Exception:
        if sample is None or not type(root.model).__module__.startswith("transformers."):
            raise
    from transformers.utils.fx import HFTracer

    class _HFProbeTracer(HFTracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return m is probe or super().is_leaf_module(m, qualname)

    return _HFProbeTracer().trace(root, dummy_inputs={"x": sample})


def trace_head_input(head_input: nn.Module, sample: torch.Tensor | None) -> fx.GraphModule:
    """``head_input`` (a ``HeadInput``) as an fx graph: x -> what the head receives.

    Raises:
        ValueError: the model calls its head other than exactly once.
        Exception: whatever fx raises on a model it cannot trace (the caller names it).
    """
    ids = sample is not None and not sample.is_floating_point()
    root = _Root(head_input.model, head_input._call, ids)
    probe = head_input._probe
    graph = _graph(root, probe, sample)
    calls = [n for n in graph.nodes if n.op == "call_module"
             and root.get_submodule(n.target) is probe]
    if len(calls) != 1:
        raise ValueError(f"the model calls its head {len(calls)} times; --trainable needs "
                         "exactly one call")
    node = calls[0]
    f = node.args[0]
    if len(probe.pre):
        with graph.inserting_after(node):
            f = graph.call_module(f"{node.target}.pre", (f,))
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = (f,)
    gm = fx.GraphModule(root, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm.eval()
