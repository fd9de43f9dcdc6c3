"""Choosing the device gate's level on the server-validation users.

Every device row of ``edgetl run`` / ``edgetl personalise`` holds both heads' accuracy on the
device's later data (``before_accuracy``: the starting head; ``adapted_accuracy``: the head
adaptation proposed) and the gate's evidence on the validation windows (``fixed``, ``broke``,
``p_value``). The gate's decision at any level is a function of that evidence alone, so one
personalisation pass over the server-validation users scores every level:
:func:`sweep`, then :func:`choose` (the recipe's ``adapt.gate_alpha`` records the result;
``docs/personalisation.md`` the run).
"""

from __future__ import annotations

import numpy as np

#: Levels tried; 1.0 keeps every strictly better head (no test).
LEVELS = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
#: A user is hurt when personalisation costs more than this (accuracy, not points).
HURT = 0.01


#: Replay-check bounds tried (points an adapted head may lose on the replay set; None: no check).
FORGET = (None, 20.0, 10.0, 5.0, 2.0, 1.0)


def kept(row: dict, alpha: float, max_forget: float | None = None) -> bool:
    """Whether the gate at ``alpha`` (and replay bound ``max_forget``) keeps the adapted head.

    Rows without replay evidence pass the replay check.
    """
    from edgerun.gate import forgetting  # the device's own replay rule

    g = row["gate"]
    ok = g["fixed"] > g["broke"] and g["p_value"] <= alpha
    if ok and "replay_before" in g:
        verdict = {"keep": True, "rule": "mcnemar", "reason": "kept by the test"}
        ok = forgetting(verdict, g["replay_before"], g["replay_after"], max_forget)["keep"]
    return ok


def _judged(rows: list[dict]) -> list[dict]:
    """Rows with one gate decision and a known start (``gate`` present).

    Not the ``stream`` protocol: its later decisions depend on earlier ones.
    """
    return [r for r in rows if isinstance(r.get("gate"), dict) and "p_value" in r["gate"]]


def _score(rows: list[dict], keep) -> dict:
    gains = np.array([r["adapted_gain"] if keep(r) else 0.0 for r in rows])
    return {"n": len(rows), "mean_gain": float(gains.mean()) if len(rows) else 0.0,
            "worst_gain": float(gains.min()) if len(rows) else 0.0,
            "users_hurt": int((gains < -HURT).sum()), "kept": int(sum(map(keep, rows)))}


def sweep(rows: list[dict], levels=LEVELS, max_forget: float | None = None) -> list[dict]:
    """Per level: mean gain, worst gain, users hurt (> 1 pt), heads kept; plus no gate."""
    rows = _judged(rows)
    return [{"alpha": alpha, **_score(rows, lambda r, a=alpha: a is None
                                      or kept(r, a, max_forget))}
            for alpha in (*levels, None)]


def sweep_forget(rows: list[dict], alpha: float, bounds=FORGET) -> list[dict]:
    """Per replay bound at level ``alpha``: the same scores as :func:`sweep`.

    Rows without replay evidence are judged by the test alone.
    """
    rows = _judged(rows)
    return [{"max_forget": b, **_score(rows, lambda r, b=b: kept(r, alpha, b))} for b in bounds]


def has_replay(rows: list[dict]) -> bool:
    """Whether any row carries replay evidence (its bundle ships a replay set)."""
    return any("replay_before" in r["gate"] for r in _judged(rows))


def choose(table: list[dict]) -> float:
    """The level of largest mean gain that hurts no user; ties: the stricter level."""
    ok = [t for t in table if t["alpha"] is not None and t["users_hurt"] == 0]
    if not ok:
        return min(t["alpha"] for t in table if t["alpha"] is not None)
    best = max(t["mean_gain"] for t in ok)
    return min(t["alpha"] for t in ok if t["mean_gain"] >= best - 1e-12)


def markdown(table: list[dict]) -> str:
    """The sweep as a Markdown table (points); :func:`sweep` or :func:`sweep_forget` rows."""
    forget = bool(table) and "max_forget" in table[0]
    first = "replay bound (pt)" if forget else "gate level"
    lines = [f"| {first} | heads kept | mean gain (pt) | worst user (pt) | users hurt > 1 pt |",
             "|---|---|---|---|---|"]
    for t in table:
        if forget:
            a = "no check" if t["max_forget"] is None else f"{t['max_forget']:g}"
        else:
            a = "no gate" if t["alpha"] is None else f"{t['alpha']:g}"
        lines.append(f"| {a} | {t['kept']}/{t['n']} | {100 * t['mean_gain']:+.2f} | "
                     f"{100 * t['worst_gain']:+.1f} | {t['users_hurt']} |")
    return "\n".join(lines)


def choose_pair(rows: list[dict], levels=LEVELS) -> tuple[float, float | None]:
    """The (level, replay bound) of largest mean gain that hurts no user, jointly.

    Ties: the stricter level, then the stricter bound. Rows without replay evidence: the
    bound is None (no check). If every pair hurts a user: the strictest pair.
    """
    bounds = sorted(b for b in FORGET if b is not None) + [None] if has_replay(rows) else [None]
    judged = _judged(rows)
    pairs = [(a, b, _score(judged, lambda r, a=a, b=b: kept(r, a, b)))
             for a in sorted(levels) for b in bounds]
    ok = [p for p in pairs if p[2]["users_hurt"] == 0] or pairs[:1]
    best = max(p[2]["mean_gain"] for p in ok)
    a, b, _ = next(p for p in ok if p[2]["mean_gain"] >= best - 1e-12)
    return a, b


def calibrate(rows: list[dict]) -> dict:
    """The pair :func:`choose_pair` picks and the sweeps behind it.

    ``{"alpha", "max_forget", "decisions", "levels": sweep at the chosen bound, "bounds":
    sweep_forget at the chosen level ([] without replay evidence)}``.
    """
    alpha, bound = choose_pair(rows)
    return {"alpha": alpha, "max_forget": bound, "decisions": len(_judged(rows)),
            "levels": sweep(rows, max_forget=bound),
            "bounds": sweep_forget(rows, alpha) if has_replay(rows) else []}

