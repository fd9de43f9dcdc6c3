"""The adaptation gate: an adapted head replaces the current one only on evidence.

The evidence is the paired predictions of both heads on the device's held-out validation
windows. Windows both heads get right (or both wrong) say nothing about which is better; the
discordant ones do: ``fixed`` (the adapted head is right, the current one wrong) and ``broke``
(the reverse). Under "the adapted head is no better", each discordant window is a fair coin,
so the one-sided exact McNemar test's p-value is ``P(X >= fixed)`` for ``X ~ Bin(fixed +
broke, 1/2)``. The adapted head is kept when ``fixed > broke`` and ``p <= alpha``: a tie, or a
gain of a window or two on a small validation split, keeps the current head.

Caveat, stated rather than hidden: overlapping sensor windows are not independent trials, so
the nominal level is optimistic; the bundle's ``alpha`` is chosen on the server-validation
users, where the whole procedure (selection included) is measured against later data.

Standard library + numpy only: this file runs on the device.
"""

from __future__ import annotations

import math

import numpy as np

#: The rules :func:`decide` knows (the manifest's ``adapt.gate.rule``).
RULES = ("mcnemar", "none")


def binomial_tail(k: int, n: int) -> float:
    """``P(X >= k)`` for ``X ~ Bin(n, 1/2)``, exact (summed in log space)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2)
            for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def decide(current_ok, adapted_ok, *, alpha: float, rule: str = "mcnemar") -> dict:
    """Whether the adapted head replaces the current one, and why.

    Args:
        current_ok: (N,) bool, the current head's validation predictions were right.
        adapted_ok: (N,) bool, the same for the adapted head (same windows, same order).
        alpha: the test's level; ``rule="none"`` keeps the adapted head whatever it scored.

    Returns:
        ``{"rule", "alpha", "n", "fixed", "broke", "p_value", "keep": bool, "reason"}``.
    """
    if rule not in RULES:
        raise ValueError(f"unknown gate rule {rule!r}; known: {', '.join(RULES)}")
    cur = np.asarray(current_ok, bool)
    new = np.asarray(adapted_ok, bool)
    if cur.shape != new.shape or cur.ndim != 1:
        raise ValueError(f"paired predictions must be two 1-D arrays of one length, got "
                         f"{cur.shape} and {new.shape}")
    fixed = int(np.sum(new & ~cur))
    broke = int(np.sum(cur & ~new))
    p = binomial_tail(fixed, fixed + broke)
    out = {"rule": rule, "alpha": float(alpha), "n": int(cur.size), "fixed": fixed,
           "broke": broke, "p_value": p}
    if rule == "none":
        return {**out, "keep": True, "reason": "gate disabled: the adapted head is kept"}
    if fixed + broke == 0:
        return {**out, "keep": False, "reason": f"tie: both heads agree on all {cur.size} "
                "validation windows; nothing to gain, the current head stays"}
    if fixed <= broke:
        return {**out, "keep": False, "reason": f"no better: the adapted head fixes {fixed} and "
                f"breaks {broke} validation windows; the current head stays"}
    if p > alpha:
        return {**out, "keep": False, "reason": f"not significant: fixes {fixed}, breaks "
                f"{broke} (one-sided exact McNemar p = {p:.3g} > alpha {alpha:g}); "
                "the current head stays"}
    return {**out, "keep": True, "reason": f"better: fixes {fixed}, breaks {broke} "
            f"(one-sided exact McNemar p = {p:.3g} <= alpha {alpha:g})"}


def forgetting(verdict: dict, before: float, after: float, max_forget: float | None) -> dict:
    """``verdict`` with the replay check: a head that forgets the server's data is refused.

    ``before``/``after``: accuracy of the current and the adapted head on the bundle's replay
    windows (server-training data, :mod:`edgerun.replay`). A head the test kept is refused when
    it loses more than ``max_forget`` points there: it has specialised to labelled data the
    device may not see again (``None``: no check).
    """
    drop = 100.0 * (before - after)
    out = {**verdict, "replay_before": float(before), "replay_after": float(after),
           "max_forget": max_forget}
    if max_forget is None or not verdict["keep"] or verdict["rule"] == "none":
        return out
    if drop > max_forget:
        return {**out, "keep": False, "reason": f"forgets the server's data: {verdict['reason']}"
                f", but replay accuracy {before:.3f} -> {after:.3f} ({-drop:+.1f} pt, more than "
                f"the {max_forget:g} pt allowed); the current head stays"}
    return out


def softmax_xent(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of ``logits`` (N, K) against class ids ``y`` (N,); numpy only."""
    # the ufuncs' reductions called directly: ndarray.max/sum/mean's arithmetic (a pairwise
    # sum, divided in the sum's dtype) without their Python wrappers; the runner scores every
    # epoch, so this runs 20+ times per adaptation
    z = logits - _MAX(logits, axis=1, keepdims=True)
    lse = np.log(_ADD(np.exp(z), axis=1))
    lse -= z[np.arange(len(y)), y]
    s = _ADD(lse)
    return float(s.dtype.type(s / len(lse)))


def softmax_xent_epochs(logits: np.ndarray, y: np.ndarray) -> list[float]:
    """:func:`softmax_xent` of every ``logits[e]`` (E, N, K), in one pass; the same values.

    The same arithmetic along the same axes (each row's pairwise sum is the 1-D one).
    """
    z = logits - _MAX(logits, axis=2, keepdims=True)
    lse = np.log(_ADD(np.exp(z), axis=2))
    lse -= z[:, np.arange(len(y)), y]
    s = _ADD(lse, axis=1)
    return (s / s.dtype.type(len(y))).tolist()


_MAX, _ADD = np.maximum.reduce, np.add.reduce


def mix(start: dict, adapted: dict, weight: float) -> dict:
    """Weight-space interpolation ``start + weight * (adapted - start)`` (WiSE-FT)."""
    return {k: (start[k] + np.float32(weight) * (adapted[k] - start[k])).astype(np.float32)
            for k in start}
