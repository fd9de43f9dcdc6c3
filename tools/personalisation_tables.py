"""``python -m tools.personalisation_tables RUN``: the Markdown tables of docs/personalisation.md.

Reads ``RUN/summary.json`` of ``edgetl run`` / ``edgetl personalise`` and prints, per protocol
and bundle, the general model, the adapted head without the gate and what the gate kept
(mean gain, users more than 1 pt worse, worst user, error cut on users below 95 %, heads
kept, and the oracle that keeps the better head per device knowing its evaluation data: the
most any gate could get), then the per-user rows of one bundle's ``sessions`` protocol with
the gate's evidence (fixed / broken validation windows, p-value, replay accuracy of the
current and the proposed head, the decision). Nothing is computed that the summary does not hold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f} %"


def _oracle(d: dict) -> str:
    """The oracle's cells (summaries written before it was recorded: dashes)."""
    if "oracle_mean_gain" not in d:
        return "– | – |"
    return f"{100 * d['oracle_mean_gain']:+.2f} pt | {_pct(d['oracle_error_cut_below_95'])} |"


def protocol_rows(s: dict) -> list[str]:
    """One Markdown row per (protocol, bundle)."""
    lines = ["| protocol | bundle | general | no gate: mean gain | users > 1 pt worse | "
             "error cut (< 95 %) | gate: mean gain | users > 1 pt worse | worst user | "
             "error cut (< 95 %) | heads kept | oracle: mean gain | oracle: error cut |",
             "|---|---|" + "---:|" * 11]
    by = {"sessions": s["totals"]["by_bundle"], **s["totals"].get("by_protocol", {})}
    for protocol, bundles in by.items():
        for name, d in bundles.items():
            kept = (f"{d['kept']}/{d['kept'] + d['rolled_back']}" if "kept" in d
                    else f"{d['n'] - d['rolled_back']}/{d['n']}")
            lines.append(
                f"| {protocol} | {name} | {d['mean_before_accuracy']:.3f} | "
                f"{100 * d['ungated_mean_gain']:+.2f} pt | {d['ungated_users_worse_1pt']} | "
                f"{_pct(d['ungated_error_cut_below_95'])} | {100 * d['mean_gain']:+.2f} pt | "
                f"{d['users_worse_1pt']} | {100 * d['worst_gain']:+.1f} pt | "
                f"{_pct(d['error_cut_below_95'])} | {kept} | {_oracle(d)}")
    return lines


def user_rows(s: dict, bundle: str) -> list[str]:
    """The ``sessions`` rows of ``bundle``, one per user, with the gate's evidence."""
    lines = ["| user | general | adapted | kept | fixed | broke | p | replay: current → proposed "
             "| gate |", "|---:|" + "---:|" * 7 + "---|"]
    for r in s["devices"]:
        if r["bundle"] != bundle:
            continue
        g = r["gate"]
        rp = (f"{g['replay_before']:.3f} → {g['replay_after']:.3f}" if "replay_before" in g
              else "–")
        why = "kept" if g["keep"] else ("forgets" if "forgets" in g["reason"] else
                                        g["reason"].split(":")[0])
        lines.append(f"| {r['user']} | {r['before_accuracy']:.3f} | "
                     f"{r['adapted_accuracy']:.3f} | {r['after_accuracy']:.3f} | {g['fixed']} | "
                     f"{g['broke']} | {g['p_value']:.3g} | {rp} | {why} |")
    return lines


def main(argv=None) -> None:
    """Print the tables of RUN/summary.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="folder with summary.json")
    ap.add_argument("--bundle", default="onnx-fp32", help="bundle of the per-user table")
    a = ap.parse_args(argv)
    s = json.loads((a.run / "summary.json").read_text())
    print("\n".join(protocol_rows(s)))
    print()
    print("\n".join(user_rows(s, a.bundle)))


if __name__ == "__main__":
    main()
