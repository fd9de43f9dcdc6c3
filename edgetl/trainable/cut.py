"""The cut: the frozen prefix of a backbone (cached on the device) and its trainable tail.

The backbone is traced with ``torch.fx``; the first graph node that reads a trainable
parameter starts the tail. The cut is the latest node before it whose value is the *only*
one the rest of the graph needs from the prefix (a single tensor: a skip connection that
jumps over the first trainable layer moves the cut before the skip's source). The prefix
returns that tensor flattened to ``(N, D)`` (so the runner caches ``(N, D)`` features as
today) and the tail starts by reshaping it back to ``(N, *shape)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from edgetl.errors import ConfigError


@dataclass
class Cut:
    """``prefix``: x -> (N, dim) flattened cut tensor; ``tail``: (N, dim) -> backbone features.

    ``node`` names the cut (the fx node whose output is cached, ``x`` for the input itself),
    ``shape`` its per-sample shape.
    """

    prefix: nn.Module
    tail: fx.GraphModule
    node: str
    shape: tuple[int, ...]
    unread: tuple[str, ...] = ()  # trainable names the forward never reads (allow_unread)

    @property
    def dim(self) -> int:
        """Width of the flattened cut tensor (the manifest's ``features.dim``)."""
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


def _reads(node: fx.Node, gm: fx.GraphModule, trainable: set[str]) -> bool:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return any(f"{node.target}.{p}" in trainable for p, _ in mod.named_parameters())
    if node.op == "get_attr":
        return any(t == node.target or t.startswith(node.target + ".") for t in trainable)
    return False


def trace(backbone: nn.Module, sample: torch.Tensor | None = None) -> fx.GraphModule:
    """``backbone`` as an fx graph; :class:`ConfigError` if it cannot be traced.

    A backbone with its own ``fx_graph(sample)`` (a user model's ``HeadInput``) gives it.
    """
    try:
        if hasattr(backbone, "fx_graph"):
            return backbone.eval().fx_graph(sample)
        return fx.symbolic_trace(backbone.eval())
    except Exception as e:  # noqa: BLE001 - fx raises many types on dynamic Python
        raise ConfigError(f"--trainable: the backbone {type(backbone).__name__} cannot be "
                          f"traced by torch.fx ({type(e).__name__}: {str(e)[:200]}); only "
                          "--trainable head works for it") from None


def split(backbone: nn.Module, trainable: list[str], sample: torch.Tensor, *,
          allow_unread: bool = False) -> Cut:
    """Cut ``backbone`` before the first node reading a parameter in ``trainable``.

    ``allow_unread``: parameters the forward never reads (no gradient can reach them, e.g.
    wav2vec2's training-only ``masked_spec_embed``) are listed in ``Cut.unread`` instead of
    refused; the caller leaves them out of the train step and says so.

    Raises:
        ConfigError: the backbone cannot be traced, or a trainable parameter is never read.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    gm = trace(backbone, sample)
    want = set(trainable)
    nodes = list(gm.graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        raise ConfigError("--trainable: the backbone must take exactly one input")
    first = next((i for i, n in enumerate(nodes) if _reads(n, gm, want)), None)
    read = {f"{n.target}.{p}" for n in nodes if n.op == "call_module"
            for p, _ in gm.get_submodule(n.target).named_parameters()}
    read |= {n.target for n in nodes if n.op == "get_attr"}
    unread = [t for t in trainable if t not in read
              and not any(t.startswith(r + ".") for r in read)]
    if allow_unread and first is not None:
        unread, allowed = [], tuple(unread)
    else:
        allowed = ()
    if first is None or unread:
        raise ConfigError(f"--trainable: parameters {unread or trainable} are never read by "
                          "the backbone's forward; they cannot train")
    ShapeProp(gm).propagate(sample)
    index = {n: i for i, n in enumerate(nodes)}
    cut = None
    for i in range(first - 1, -1, -1):
        n = nodes[i]
        meta = n.meta.get("tensor_meta")
        if n.op == "get_attr" or not hasattr(meta, "shape"):
            continue
        crossing = {m for m in nodes[: i + 1] if m.op != "get_attr"
                    and any(index[u] > i for u in m.users)}
        if crossing == {n}:
            cut = i
            break
    assert cut is not None, "the input node always qualifies"  # noqa: S101
    return Cut(_prefix(gm, nodes, cut), _tail(gm, nodes, cut),
               "x" if nodes[cut].op == "placeholder" else nodes[cut].name,
               tuple(int(s) for s in nodes[cut].meta["tensor_meta"].shape[1:]), allowed)


def _prefix(gm: fx.GraphModule, nodes: list, cut: int) -> fx.GraphModule:
    g, env = fx.Graph(), {}
    for n in nodes[: cut + 1]:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(g.call_function(torch.flatten, (env[nodes[cut]], 1)))
    return _module(gm, g)


def _tail(gm: fx.GraphModule, nodes: list, cut: int) -> fx.GraphModule:
    g, env = fx.Graph(), {}
    shape = tuple(int(s) for s in nodes[cut].meta["tensor_meta"].shape[1:])
    x = g.placeholder("features")
    env[nodes[cut]] = g.call_function(torch.reshape, (x, (-1, *shape)))
    for n in nodes[:cut]:
        if n.op == "get_attr":
            env[n] = g.node_copy(n, lambda a: env[a])
    for n in nodes[cut + 1 :]:
        env[n] = g.node_copy(n, lambda a: env[a])
    return _module(gm, g)


def _module(root: fx.GraphModule, g: fx.Graph) -> fx.GraphModule:
    out = fx.GraphModule(root, g)
    out.graph.eliminate_dead_code()
    out.recompile()
    return out.eval()
