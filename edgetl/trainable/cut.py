"""The cut: the frozen prefix of a backbone (cached on the device) and its trainable tail.

The backbone is traced with ``torch.fx``; the first graph node that reads a trainable
parameter starts the tail. The cut is the latest node before it whose value is the *only*
one the rest of the graph needs from the prefix (a single tensor: a skip connection that
jumps over the first trainable layer moves the cut before the skip's source). The prefix
returns that tensor flattened to ``(N, D)`` (so the runner caches ``(N, D)`` features as
today) and the tail starts by reshaping it back to ``(N, *shape)``.

When that single tensor is not floating point (token ids: the tail would start from the
integer input, or a later layer also reads a mask derived from the ids), the cut is instead
the latest position whose *crossing set* (the prefix nodes the rest of the graph reads) is
one or more tensors with the batch as dim 0 (checked at two batch sizes), the
parts (:class:`Part`): the prefix returns ``cat([p.flatten(1).to(float32) for p in parts], 1)``
and the tail splits the ``(N, D)`` features by the parts' widths, reshapes each and casts it
back to its dtype (int64 ids, bool masks). Crossing nodes that do not depend on the input
(position ids from a buffer or an ``arange``) are recomputed in the tail, not cached. An
integer part is exact in float32 only below :data:`EXACT_INT` (2**24): :func:`split` refuses
a part whose sample values, or whose embedding table's rows, reach it. The device runners
see ``(N, D)`` float32 features either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from edgetl.errors import ConfigError

#: Integers of magnitude below this are exact in a float32 feature column (24-bit significand).
EXACT_INT = 1 << 24


@dataclass(frozen=True)
class Part:
    """One tensor the cached features hold: fx node name, per-sample shape, dtype."""

    node: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def width(self) -> int:
        """Its columns in the ``(N, D)`` features."""
        return math.prod(self.shape)

    def block(self) -> dict:
        """The manifest's ``trainable.cut.parts`` entry."""
        return {"node": self.node, "shape": list(self.shape),
                "dtype": str(self.dtype).removeprefix("torch.")}


@dataclass
class Cut:
    """``prefix``: x -> (N, dim) flattened cut tensor; ``tail``: (N, dim) -> backbone features.

    ``node`` names the cut (the fx node whose output is cached, ``x`` for the input itself;
    the parts' names joined by `` + `` for a multi-part cut), ``shape`` its per-sample shape
    (``(dim,)`` for a multi-part cut). ``parts``: empty for a single float tensor (cached as
    is); else the tensors the features hold, in column order, each cast to float32 by the
    prefix and back to its dtype by the tail (module docstring).
    """

    prefix: nn.Module
    tail: fx.GraphModule
    node: str
    shape: tuple[int, ...]
    unread: tuple[str, ...] = ()  # trainable names the forward never reads (allow_unread)
    parts: tuple[Part, ...] = ()

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
        ConfigError: the backbone cannot be traced, a trainable parameter is never read, or
            an integer tensor at the cut may not be exact in float32.
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
    if nodes[cut].meta["tensor_meta"].dtype.is_floating_point:
        return Cut(_prefix(gm, nodes, cut), _tail(gm, nodes, cut), _name(nodes[cut]),
                   tuple(int(s) for s in nodes[cut].meta["tensor_meta"].shape[1:]), allowed)
    return _multi(gm, nodes, first, sample, allowed)


def _name(n: fx.Node) -> str:
    return "x" if n.op == "placeholder" else n.name


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


def _depends(nodes: list) -> set:
    """The nodes whose value depends on the input placeholder."""
    dep: set = set()
    for n in nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def _shapes(gm: fx.GraphModule, nodes: list, x: torch.Tensor) -> dict:
    """Node -> (shape, dtype) of its tensor value for input ``x`` (non-tensors left out)."""
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(x)
    return {n: (tuple(int(s) for s in m.shape), m.dtype) for n in nodes
            if hasattr(m := n.meta.get("tensor_meta"), "shape")}


def _multi(gm: fx.GraphModule, nodes: list, first: int, sample: torch.Tensor,
           allowed: tuple) -> Cut:
    """The latest cut before ``first`` whose crossing tensors are all batch-leading."""
    dep, index = _depends(nodes), {n: i for i, n in enumerate(nodes)}
    b = len(sample)
    try:  # dim 0 must follow the batch: a second batch size tells it from a fixed size
        other = _shapes(gm, nodes, torch.cat([sample, sample[:1]]))
    except Exception:  # noqa: BLE001 - a graph fixed to one batch: judge on one size only
        other = None
    at = _shapes(gm, nodes, sample)  # last: leaves the sample's metadata on the graph

    def leading(n) -> bool:
        if n not in at or not at[n][0] or at[n][0][0] != b:
            return False
        return other is None or (n in other and other[n][0] == (b + 1, *at[n][0][1:]))

    for i in range(first - 1, -1, -1):
        crossing = [m for m in nodes[: i + 1] if m.op != "get_attr" and m in dep
                    and any(index[u] > i for u in m.users)]
        if crossing and all(leading(m) for m in crossing):
            break
    else:  # the input itself qualifies unless it has no batch dim
        raise ConfigError("--trainable: no tensor at the cut has the batch as its first "
                          "dimension; only --trainable head works for this backbone")
    parts = tuple(Part(_name(m), at[m][0][1:], at[m][1]) for m in crossing)
    _exact(gm, nodes, i, crossing, parts, sample)
    node = " + ".join(p.node for p in parts)
    shape = parts[0].shape if len(parts) == 1 else (sum(p.width for p in parts),)
    return Cut(_prefix_parts(gm, nodes, i, crossing), _tail_parts(gm, nodes, i, crossing,
                                                                   parts, dep),
               node, shape, allowed, parts)


def _exact(gm: fx.GraphModule, nodes: list, cut: int, crossing: list, parts: tuple,
           sample: torch.Tensor) -> None:
    """Refuse an integer part that float32 may round: sample values or embedding rows."""
    g, env = fx.Graph(), {}
    for n in nodes[: cut + 1]:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[m] for m in crossing))
    with torch.no_grad():
        values = _module(gm, g)(sample)
    for m, p, v in zip(crossing, parts, values, strict=True):
        if p.dtype.is_floating_point or p.dtype == torch.bool:
            continue
        rows = [gm.get_submodule(u.target).num_embeddings for u in m.users
                if u.op == "call_module" and isinstance(gm.get_submodule(u.target),
                                                        nn.Embedding)]
        top = max([int(v.abs().max()) if v.numel() else 0, *(r - 1 for r in rows)])
        if top >= EXACT_INT:
            raise ConfigError(f"--trainable: the cut caches the integer tensor {p.node} as "
                              f"float32 features, exact only below 2**24, but it reaches "
                              f"{top}; choose a SPEC that leaves more layers frozen (e.g. "
                              "last:1)")


def _prefix_parts(gm: fx.GraphModule, nodes: list, cut: int, crossing: list) -> fx.GraphModule:
    g, env = fx.Graph(), {}
    for n in nodes[: cut + 1]:
        env[n] = g.node_copy(n, lambda a: env[a])
    flat = [g.call_method("to", (g.call_function(torch.flatten, (env[m], 1)), torch.float32))
            for m in crossing]
    g.output(g.call_function(torch.cat, (flat, 1)) if len(flat) > 1 else flat[0])
    return _module(gm, g)


def _tail_parts(gm: fx.GraphModule, nodes: list, cut: int, crossing: list, parts: tuple,
                dep: set) -> fx.GraphModule:
    g, env = fx.Graph(), {}
    x = g.placeholder("features")
    off = 0
    for m, p in zip(crossing, parts, strict=True):
        t = x if len(parts) == 1 else g.call_function(torch.narrow, (x, 1, off, p.width))
        t = g.call_function(torch.reshape, (t, (-1, *p.shape)))
        env[m] = t if p.dtype == torch.float32 else g.call_method("to", (t, p.dtype))
        off += p.width
    for n in nodes[: cut + 1]:  # constants (buffers, position ids): recomputed, not cached
        if n not in dep:
            env[n] = g.node_copy(n, lambda a: env[a])
    for n in nodes[cut + 1 :]:
        env[n] = g.node_copy(n, lambda a: env[a])
    return _module(gm, g)
