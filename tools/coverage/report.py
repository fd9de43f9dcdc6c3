"""``docs/coverage.md`` from the coverage run's JSON (``docs/coverage.json``)."""

from __future__ import annotations

from tools.coverage.cell import STEPS


def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _pair(a, b, fmt: str) -> str:
    return "–" if a is None and b is None else f"{_num(a, fmt)} → {_num(b, fmt)}"


def failure_keys(rows: list[dict], steps=STEPS) -> dict[tuple[str, str], list[dict]]:
    """(step, reason) -> the rows that failed that way, in row order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        for s in steps:
            if r["steps"][s] in ("failed", "timeout", "crashed"):
                why = r["errors"].get(s, r["steps"][s])
                out.setdefault((s, f"{r['steps'][s]}: {why}"), []).append(r)
    return out


def failure_lines(fails: dict, ref: dict, cell) -> list[str]:
    """Markdown items for the failures of :func:`failure_keys`, or "None.".

    Each: its ``ref`` label, the step, the cells (named by ``cell(row)``) and the reason.
    """
    if not fails:
        return ["None."]
    return [f"- **{ref[key]}** {key[0]}, {len(rs)} cell(s) "
            f"({', '.join(cell(r) for r in rs)}): {key[1].replace('|', '/')}"
            for key, rs in fails.items()]


def render(data: dict) -> str:
    """The markdown page."""
    rows = data["rows"]
    fails = failure_keys(rows)
    ref = {key: f"F{i}" for i, key in enumerate(fails, 1)}

    def status(r: dict, s: str) -> str:
        v = r["steps"][s]
        if v in ("failed", "timeout", "crashed"):
            why = r["errors"].get(s, v)
            return f"**{v}** [{ref[(s, f'{v}: {why}')]}]"
        return {"not run": "–", "skipped": "skipped"}.get(v, v)

    n_pass = sum(r["pass"] for r in rows)
    lines = [
        "# Model coverage",
        "",
        f"Generated (do not edit by hand; `make coverage`) by `{data['command']}` on "
        f"{data['date']} at commit `{data['commit']}`"
        f"{' (uncommitted changes)' if data.get('dirty') else ''}; "
        f"{data['machine']}; total {data['total_s'] / 60:.1f} min "
        f"({data['jobs']} job(s), {data['timeout_s']:g} s per cell).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".",
        "",
        *[f"Rows of {', '.join(u['cases'])} re-run by `{u['command']}` on {u['date']} at commit "
          f"`{u.get('commit', '?')}` ({u['seconds'] / 60:.1f} min).\n"
          for u in data.get("partial_updates", [])],
        f"**{n_pass} of {len(rows)} cells pass end to end** (every step ok: built, loaded "
        "from a saved Hugging Face folder where it applies, exported with parity checks, "
        "self-tested, adapted and benchmarked by the device runner).",
        "",
    ]
    for t in data["targets"]:
        for p in data["precisions"]:
            sub = [r for r in rows if r["target"] == t and r["precision"] == p]
            lines.append(f"- {t} {p}: {sum(r['pass'] for r in sub)} of {len(sub)}")
    lines += [
        "",
        "Each cell runs in a process of its own (forked from a server that only imported the "
        "libraries), with a time limit; a cell that crashes or hangs is recorded as such. Steps:"
        " **build** (the case's factory; its head is fitted on frozen features of synthetic "
        "server data, so the int8 held-out gate has a real decision to keep), **load** "
        "(transformers cases: `save_pretrained`, then edgetl's `load_model(folder)` must give "
        "the same labels, input dtype, image shape/normalisation and logits), **export** "
        "(`edgetl.export_model` with 64 calibration and 256 held-out samples: parity of the "
        "backbone features, head inference and 20 train steps against torch, and the held-out "
        "accuracy gate), **selftest**, **adapt** (20 epochs on 90 noisier device samples with "
        "three new label names; accuracy on the runner's validation split: after imprinting "
        "→ after training) and **bench** (`run.py bench --threads 1`: batch-1 backbone "
        f"latency p50 over {data.get('bench_repeats', '?')} calls, bundle size).",
        "",
        "| case | target | precision | load | export | selftest | adapt | bench "
        "| backbone err abs / rel | train-step err | held-out torch → bundle | MiB | p50 ms "
        "| adapt before → after | export s | end to end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        err = ("–" if m.get("backbone_max_abs_err") is None else
               f"{m['backbone_max_abs_err']:.2g} / {m.get('backbone_rel_err', 0):.2g}")
        size = None if m.get("bundle_bytes") is None else m["bundle_bytes"] / 2**20
        build = "" if r["steps"]["build"] == "ok" else f" (build {status(r, 'build')})"
        lines.append(
            f"| {r['case']}{build} | {r['target']} | {r['precision']} | {status(r, 'load')} "
            f"| {status(r, 'export')} | {status(r, 'selftest')} | {status(r, 'adapt')} "
            f"| {status(r, 'bench')} | {err} | {_num(m.get('train_step_max_abs_err'), '.2g')} "
            f"| {_pair(m.get('heldout_torch'), m.get('heldout_bundle'), '.3f')} "
            f"| {_num(size, '.2f')} | {_num(m.get('latency_ms_p50'), '.3f')} "
            f"| {_pair(m.get('adapt_before'), m.get('adapt_after'), '.2f')}"
            f"{' (rolled back)' if m.get('adapt_rolled_back') else ''} "
            f"| {_num(m.get('export_s'), '.1f')} | {'**pass**' if r['pass'] else 'fail'} |")
    lines += ["", "## Failures", ""]
    lines += failure_lines(fails, ref, lambda r: f"{r['case']} {r['target']} {r['precision']}")
    lines += ["", "## Cases", "", "| case | source | input | parameters | notes |",
              "|---|---|---|---|---|"]
    for name, c in data["cases"].items():
        notes = "; ".join(c.get("notes", [])) or "–"
        params = c.get("params")
        lines.append(f"| {name} | {c.get('source', '?')} | {c.get('spec', '?')} "
                     f"| {'?' if params is None else f'{params:,}'} | {notes} |")
    if data.get("trainable"):
        lines += ["", *render_trainable(data["trainable"])]
    return "\n".join(lines) + "\n"


def _sci(v) -> str:
    return "–" if v is None else f"{v:.2g}"


def render_trainable(tr: dict) -> list[str]:
    """The ``--trainable`` section: per case x target x SPEC, then the failures."""
    rows, steps = tr["rows"], tuple(tr["steps"])
    fails = failure_keys(rows, steps)
    ref = {key: f"T{i}" for i, key in enumerate(fails, 1)}

    def status(r: dict, s: str) -> str:
        v = r["steps"][s]
        if v in ("failed", "timeout", "crashed"):
            return f"**{v}** [{ref[(s, f'{v}: ' + r['errors'].get(s, v))]}]"
        return {"not run": "–", "skipped": "skipped"}.get(v, v)

    s = tr["summary"]
    out = ["## Training more than the head (`--trainable`)", ""]
    out += [f"Generated by `{u['command']}` on {u['date']} at commit `{u['commit']}` "
            f"({u['cells']} cells, {u['seconds'] / 60:.1f} min)." for u in tr["runs"]]
    out += ["", f"**{s['pass']} of {s['cells']} trainable cells pass** (export with its "
            f"checks, device self-test, {tr['parity_steps']}-step parity), "
            f"{tr['precision']}, {tr['timeout_s']:g} s per cell:", ""]
    for t in tr["targets"]:
        for spec in tr["specs"]:
            sub = [r for r in rows if r["target"] == t and r["spec"] == spec]
            out.append(f"- {t} `{spec}`: {sum(r['pass'] for r in sub)} of {len(sub)}")
    every = list(dict.fromkeys(r["case"] for r in rows))
    for t in tr["targets"]:
        missing = [c for c in every if not any(r["case"] == c and r["target"] == t
                                               for r in rows)]
        if missing:
            out.append(f"- not run for {t} (yet): {', '.join(missing)}")
    out += [
        "",
        "Each cell: **export** (`edgetl.export_model(..., ExportConfig(trainable=SPEC))`: the "
        "cut, the autodiff train step, its lowering and the export's own checks, which compare "
        "the train graph with the float64 torch step — *check err*), **selftest** (the device "
        f"runner replays the shipped reference steps) and **parity**: {tr['parity_steps']} "
        "steps of the case's labelled data (batch = the bundle's train batch, 3 padded rows) "
        "through the device runner's own backend on features from the bundle's backbone graph, "
        "against `torch.optim` on the whole PyTorch model (eval mode; only the SPEC's tensors "
        "and the head require grad), in float32 and float64. *vs torch.optim*: max |runner − "
        "torch float32| over the 20 losses and every final trainable tensor (class rows in "
        "use); *vs float64*: the same against the float64 loop, with torch float32's own "
        "distance to it in brackets; the cell passes when every tensor is within "
        "`max(1e-4 · max(1, |v|), 4 × that distance)` (`edgetl.tolerances.train_step_bound`).",
        "",
        "| case | target | SPEC | export | selftest | parity | trainable tensors / values "
        "| cut (features) | train graph | check err | vs torch.optim (loss / all) "
        "| vs float64 (torch32) | export s | pass |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        graph = ("–" if m.get("train_graph_bytes") is None else
                 f"{m.get('train_graph')} {m['train_graph_bytes'] / 1024:,.0f} KiB"
                 + (f", {m['train_graph_nodes']} nodes" if m.get("train_graph_nodes") else ""))
        tens = ("–" if m.get("trainable_tensors") is None else
                f"{m['trainable_tensors']} / {m.get('trainable_params', 0):,}")
        cut = "–" if m.get("cut") is None else f"`{m['cut']}` ({m.get('cut_dim', 0):,})"
        vs32 = ("–" if m.get("parity_err32") is None else
                f"{_sci(m.get('parity_loss_err32'))} / {_sci(m['parity_err32'])}")
        vs64 = ("–" if m.get("parity_err64") is None else
                f"{_sci(m['parity_err64'])} ({_sci(m.get('parity_noise32'))})")
        out.append(
            f"| {r['case']} | {r['target']} | `{r['spec']}` | {status(r, 'export')} "
            f"| {status(r, 'selftest')} | {status(r, 'parity')} | {tens} | {cut} | {graph} "
            f"| {_sci(m.get('train_step_max_abs_err'))} | {vs32} | {vs64} "
            f"| {_num(m.get('export_s'), '.1f')} | {'**pass**' if r['pass'] else 'fail'} |")
    out += ["", "### Trainable failures", ""]
    out += failure_lines(fails, ref, lambda r: f"{r['case']} {r['target']} `{r['spec']}`")
    return out
