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


def kept(row: dict, alpha: float) -> bool:
    """Whether the gate at level ``alpha`` keeps ``row``'s adapted head."""
    g = row["gate"]
    return g["fixed"] > g["broke"] and g["p_value"] <= alpha


def sweep(rows: list[dict], levels=LEVELS) -> list[dict]:
    """Per level: mean gain, worst gain, users hurt (> 1 pt), heads kept; plus no gate.

    Only rows with one gate decision (not the ``stream`` protocol, whose later decisions
    depend on earlier ones) and a known start (``gate`` present) take part.
    """
    rows = [r for r in rows if isinstance(r.get("gate"), dict) and "p_value" in r["gate"]]
    out = []
    for alpha in (*levels, None):
        gains = np.array([r["adapted_gain"] if alpha is None or kept(r, alpha) else 0.0
                          for r in rows])
        out.append({"alpha": alpha, "n": len(rows), "mean_gain": float(gains.mean()),
                    "worst_gain": float(gains.min()),
                    "users_hurt": int((gains < -HURT).sum()),
                    "kept": int(sum(alpha is None or kept(r, alpha) for r in rows))})
    return out


def choose(table: list[dict]) -> float:
    """The level of largest mean gain that hurts no user; ties: the stricter level."""
    ok = [t for t in table if t["alpha"] is not None and t["users_hurt"] == 0]
    if not ok:
        return min(t["alpha"] for t in table if t["alpha"] is not None)
    best = max(t["mean_gain"] for t in ok)
    return min(t["alpha"] for t in ok if t["mean_gain"] >= best - 1e-12)


def markdown(table: list[dict]) -> str:
    """The sweep as a Markdown table (points)."""
    lines = ["| gate level | heads kept | mean gain (pt) | worst user (pt) | users hurt > 1 pt |",
             "|---|---|---|---|---|"]
    for t in table:
        a = "no gate" if t["alpha"] is None else f"{t['alpha']:g}"
        lines.append(f"| {a} | {t['kept']}/{t['n']} | {100 * t['mean_gain']:+.2f} | "
                     f"{100 * t['worst_gain']:+.1f} | {t['users_hurt']} |")
    return "\n".join(lines)
