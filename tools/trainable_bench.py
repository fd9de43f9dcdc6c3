"""``python -m tools.trainable_bench``: ``--trainable`` bundles vs the PyTorch eager loop.

Given bundles of one checkpoint exported with different ``--trainable`` SPECs
(``--bundle head=DIR --bundle bias=DIR --bundle last:1=DIR``) and one device's local data
(``--run``: a run folder's first device, as ``edgetl bench``; or ``--data``/``--eval``),
fresh processes run, interleaved round by round (per SPEC: A, B, B', C, then the next SPEC,
then the next round):

- A: the device runner's ``adapt`` (feature pass + ``--epochs`` epochs, batch 32,
  ``--patience 0``; the bundle's other adaptation settings: mixing, gate);
- B: the PyTorch eager loop training the same parameter subset on the runner's own training
  split (:func:`edgetl.baselines.torch_eager`), the whole backbone recomputed every step
  (the tutorial loop the issue names);
- B': the same loop with the frozen prefix (up to the bundle's cut) computed once under
  ``no_grad`` and only the tail recomputed per step (the fair loop);
- C: the runner's ``infer`` over the same local data (one backbone pass + the head).

Printed (not asserted), per SPEC: the median per-round ratios with their spread
(min–max over rounds): adaptation ÷ inference (A/C), loop ÷ runner time (B/A, B'/A), runner
peak RSS ÷ loop peak RSS (A/B, A/B'); the train graph's size (bytes, nodes) and the
trainable parameter count. The machine's speed drifts, so every ratio pairs cells of one
round.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tools.kstep_bench import spread

LOOPS = (("B", False, "loop, prefix recomputed"), ("Bc", True, "loop, prefix cached"))


def graph_size(bundle: Path) -> dict:
    """The one-step train graph's file, bytes and node count (Scan bodies included)."""
    import onnx

    m = json.loads((bundle / "manifest.json").read_text())
    path = bundle / m["files"][m["train_step"]["file"]]["path"]
    g = onnx.load(str(path), load_external_data=False).graph
    nodes, stack = 0, [g]
    while stack:
        g = stack.pop()
        nodes += len(g.node)
        stack += [a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return {"file": path.name, "bytes": path.stat().st_size, "nodes": nodes}


def cells(bundles: dict[str, Path], ck: Path, data: Path, prep: Path, work: Path, *,
          epochs: int, rounds: int, threads: int) -> dict[str, dict[str, list[dict]]]:
    """Run the interleaved rounds; ``{spec: {cell: [result per round]}}``."""
    from edgetl.adapt import run_json, run_runner

    ref = bundles.get("head") or next(iter(bundles.values()))
    opt = json.loads((ref / "manifest.json").read_text())["optimizer"]
    rows = {s: {c: [] for c in ("A", "B", "Bc", "C")} for s in bundles}
    for r in range(rounds):
        for spec, b in bundles.items():
            tag = spec.replace(":", "")
            rows[spec]["A"].append(run_runner(
                "adapt", b, "--data", str(data), "--out", str(work / f"{tag}_{r}"), "--epochs",
                str(epochs), "--batch-size", "32", "--patience", "0", "--seed", "0",
                "--threads", str(threads)))
            for cell, cache, _ in LOOPS:
                rows[spec][cell].append(run_json(
                    [sys.executable, "-m", "edgetl.baselines", "torch", "--checkpoint", str(ck),
                     "--data", str(prep), "--epochs", str(epochs), "--batch", "32",
                     "--threads", str(threads), "--optimizer", opt["name"], "--hparams",
                     json.dumps(opt["hparams"]), "--trainable", spec,
                     *(["--cache-prefix"] if cache else [])], "PyTorch eager loop"))
            rows[spec]["C"].append(run_runner("infer", b, "--data", str(data), "--threads",
                                              str(threads)))
    return rows


def summarise(rows: dict[str, list[dict]]) -> dict:
    """Per-round ratios of one SPEC's cells (see the module docstring)."""
    a = [r["feature_seconds"] + r["train_seconds"] for r in rows["A"]]
    c = [r["seconds"] for r in rows["C"]]
    out = {"adapt_seconds": a, "infer_seconds": c,
           "adapt_vs_inference": [x / y for x, y in zip(a, c, strict=True)],
           "runner_rss_mb": [r["peak_rss_mb"] for r in rows["A"]],
           "steps": rows["A"][0]["steps"], "n_train": rows["A"][0]["n_train"]}
    for cell, _, _ in LOOPS:
        t = [r["train_seconds"] for r in rows[cell]]
        out[f"{cell}.train_seconds"] = t
        out[f"{cell}.rss_mb"] = [r["peak_rss_mb"] for r in rows[cell]]
        out[f"{cell}.speedup"] = [x / y for x, y in zip(t, a, strict=True)]
        out[f"{cell}.rss_ratio"] = [x / y for x, y in zip(out["runner_rss_mb"],
                                                          out[f"{cell}.rss_mb"], strict=True)]
        out[f"{cell}.steps"] = rows[cell][0]["steps"]
        out["n_trainable"] = rows[cell][0]["n_trainable"]
    return out


def markdown(res: dict) -> str:
    """The table: one row per SPEC."""
    a = res["args"]
    L = [f"{a['epochs']} epochs, batch 32, {a['threads']} thread(s), {a['rounds']} interleaved "
         f"rounds of fresh processes; median (min–max over rounds)", "",
         "| SPEC | trainable params | train graph | adaptation ÷ inference "
         "| loop (prefix recomputed) ÷ runner | loop (prefix cached) ÷ runner "
         "| runner RSS ÷ loop RSS (recomputed / cached) | runner adapt s | runner RSS MiB |",
         "|" + "---|" * 9]
    for spec, s in res["specs"].items():
        g = s["graph"]
        L.append(f"| `{spec}` | {s['n_trainable']:,} | {g['file']}: {g['bytes'] / 1024:,.0f} KiB, "
                 f"{g['nodes']} nodes | {spread(s['adapt_vs_inference'])}× | "
                 f"{spread(s['B.speedup'])}× | {spread(s['Bc.speedup'])}× | "
                 f"{spread(s['B.rss_ratio'])} / {spread(s['Bc.rss_ratio'])} | "
                 f"{spread(s['adapt_seconds'])} | {spread(s['runner_rss_mb'])} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Parse, run, print the Markdown table; return the raw numbers."""
    from edgetl.bench import find_device_data, prepare_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", required=True, metavar="SPEC=DIR",
                    help="a bundle and the --trainable SPEC it was exported with (repeat)")
    ap.add_argument("--checkpoint", type=Path, help="default: the head bundle's provenance")
    ap.add_argument("--run", type=Path, help="run folder: its first device's data")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--eval", type=Path)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    a = ap.parse_args(argv)
    bundles = {s: Path(d) for s, d in (b.split("=", 1) for b in a.bundle)}
    data, ev = (a.data, a.eval) if a.data and a.eval else find_device_data([a.run])
    ref = bundles.get("head") or next(iter(bundles.values()))
    ck = a.checkpoint or Path(json.loads((ref / "manifest.json").read_text())
                              ["provenance"]["checkpoint"])
    with tempfile.TemporaryDirectory(prefix="trainable-bench-") as tmp:
        work = Path(tmp)
        prep = work / "prep.npz"
        info = prepare_data(ref, data, ev, prep, val_fraction=0.25, seed=0)
        rows = cells(bundles, ck, data, prep, work, epochs=a.epochs, rounds=a.rounds,
                     threads=a.threads)
    res = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
           "checkpoint": str(ck), "data": str(data), "n_train": info["n_train"], "specs": {}}
    for spec, b in bundles.items():
        res["specs"][spec] = {**summarise(rows[spec]), "graph": graph_size(b)}
    print(f"{ck}: {info['n_train']} training windows of {data}")
    print(markdown(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
