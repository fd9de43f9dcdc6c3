"""``--trainable SPEC``: which parameters a bundle's train step updates.

SPEC is one of

- ``head`` (the default): the head only, with today's hand-written graphs;
- ``bias``: every backbone bias (``bias``, and recurrent layers' ``bias_ih_l0`` ...), every
  normalisation layer's affine weight and bias (BatchNorm, LayerNorm, GroupNorm,
  InstanceNorm), and the head (TinyTL-style);
- ``last:N``: the parameters of the backbone's last N *blocks*, and the head. A block is
  what the backbone declares with ``block_params()`` (the 1-D/2-D CNN students: one
  conv + BN + ReLU [+ pool] group per block); any other backbone: its parameterised child
  modules, descending through a container that holds all of them (a ``Sequential`` of
  layers gives one block per layer with parameters);
- ``all``: every backbone parameter and the head;
- comma-separated globs (``fnmatch``) over backbone parameter names, with or without the
  ``backbone.`` prefix (``blocks.1.*,blocks.4.weight``), plus the head.

The head always trains (imprinting and the gate need its class rows). Parameters are named
``backbone.<name>`` in the bundle (graph inputs, ``new.`` outputs, the head checkpoint); the
head's keep their device names (``weight``, ``bias``...). This module imports no torch.
"""

from __future__ import annotations

import fnmatch

from edgetl.errors import ConfigError

KINDS = ("head", "bias", "last:N", "all", "glob[,glob...]")
NORM_TYPES = ("BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm")


def check_spec(spec: str) -> str:
    """``spec`` stripped, if it is syntactically valid; else :class:`ConfigError`."""
    s = str(spec).strip()
    if s in ("head", "bias", "all"):
        return s
    if s.startswith("last:"):
        n = s.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--trainable {spec!r}: last:N needs a whole number N >= 1")
        return s
    globs = [g.strip() for g in s.split(",")]
    if not s or any(not g for g in globs) or ":" in s:
        raise ConfigError(f"--trainable {spec!r} is not a SPEC; expected one of {KINDS}")
    return ",".join(globs)


def _blocks(backbone) -> list[list[str]]:
    """Parameter names of each block of ``backbone``, first to last (see module docstring)."""
    if hasattr(backbone, "block_params"):
        return [list(b) for b in backbone.block_params()]
    prefix, mod = "", backbone
    while True:
        kids = [(n, c) for n, c in mod.named_children() if any(True for _ in c.parameters())]
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        if len(kids) == 1 and not own and any(True for _ in kids[0][1].children()):
            prefix, mod = f"{prefix}{kids[0][0]}.", kids[0][1]
            continue
        blocks = [[f"{prefix}{n}.{p}" for p, _ in c.named_parameters()] for n, c in kids]
        return ([[f"{prefix}{p}" for p in own]] if own else []) + blocks


def _norm_affine(backbone) -> set[str]:
    out = set()
    for mname, mod in backbone.named_modules():
        if any(t in type(mod).__name__ for t in NORM_TYPES):
            out |= {f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(
                recurse=False)}
    return out


def select(backbone, spec: str) -> list[str]:
    """Backbone parameter names (without ``backbone.``) that ``spec`` trains, in model order.

    Raises:
        ConfigError: an unknown SPEC, ``last:N`` beyond the backbone's blocks, or a glob that
            matches no parameter (the message lists the parameter names).
    """
    s = check_spec(spec)
    names = [n for n, p in backbone.named_parameters()]
    if s == "head":
        return []
    if s == "all":
        chosen = set(names)
    elif s == "bias":
        # ``bias_ih_l0`` / ``bias_hh_l0`` (nn.LSTM, GRU, RNN), ``bias_k`` (MultiheadAttention)
        chosen = {n for n in names if n.rsplit(".", 1)[-1].split("_")[0] == "bias"} | (
            _norm_affine(backbone))
    elif s.startswith("last:"):
        n = int(s.split(":", 1)[1])
        blocks = _blocks(backbone)
        if n > len(blocks):
            raise ConfigError(f"--trainable {s}: the backbone has {len(blocks)} block(s) "
                              f"({_show([b[0] for b in blocks])}); use last:{len(blocks)} "
                              "or all")
        chosen = {p for b in blocks[-n:] for p in b}
    else:
        chosen = set()
        for g in s.split(","):
            g2 = g.removeprefix("backbone.")
            hit = {n for n in names if fnmatch.fnmatchcase(n, g2)}
            if not hit:
                raise ConfigError(f"--trainable: the glob {g!r} matches no backbone parameter; "
                                  f"they are: {_show(names)}")
            chosen |= hit
    if not chosen and s != "head":
        raise ConfigError(f"--trainable {s}: no backbone parameter qualifies; they are: "
                          f"{_show(names)}; use head")
    return [n for n in names if n in chosen]


def _show(names: list[str], k: int = 40) -> str:
    return ", ".join(names[:k]) + (f" … ({len(names)} in all)" if len(names) > k else "")
