"""``edgetl methods RECIPE``: every transfer method against the source-only baseline.

Two scenarios, picked by the recipe's data:

* **HAR cross-user** (``hapt``): the source model (the recipe's student net) trains on the
  server's training users; each device user is a target. As on the phones
  (:func:`edgetl.pipeline.personalise`), a user's first recording session is the
  adaptation data — labelled for fine-tuning, L2-SP and EWC, *unlabelled* for AdaBN, DANN,
  MMD and CORAL — and the later sessions are scored. Source accuracy is measured on the
  server-validation users (never trained on), so forgetting shows. Mean ± std over users.
* **Vision** (``fashion_mnist``): Fashion-MNIST source, handwritten digits target — new
  classes, so every method ends in a digit head trained on ``shots`` labelled digits per
  class: source-only and the alignment methods fit it on their frozen features (a linear
  probe), the supervised methods fine-tune the whole network from that probe. Unlabelled
  digits (a disjoint pool) feed the alignment methods; the rest are scored. Source accuracy
  is the source head on the Fashion-MNIST test subset. Mean ± std over seeds.

Knowledge distillation is reported as the fraction of the teacher–student gap it recovers,
``(acc_kd - acc_scratch) / (acc_teacher - acc_scratch)``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetl.config import Recipe, TrainConfig, TransferConfig
from edgetl.methods import get_method
from edgetl.methods.common import TransferData
from edgetl.nets import EdgeModel, LinearHead, build_model
from edgetl.progress import console, progress_bar
from edgetl.train import Split, accuracy, distill, train_classifier


def transfer(name: str, model: nn.Module, data: TransferData, cfg: TransferConfig) -> nn.Module:
    """Apply the method ``name`` to a copy of ``model``; the one entry point of every method."""
    return get_method(name).fit(copy.deepcopy(model), data, cfg)


def kd_gap_recovered(acc_teacher: float, acc_scratch: float, acc_kd: float) -> float | None:
    """``(acc_kd - acc_scratch) / (acc_teacher - acc_scratch)``; None if the gap is ~0.

    1 = distillation closed the gap to the teacher, 0 = no better than training from
    scratch, < 0 = worse; a teacher no better than the scratch student leaves no gap.
    """
    gap = acc_teacher - acc_scratch
    if abs(gap) < 1e-9:
        return None
    return (acc_kd - acc_scratch) / gap


def _train_cfg(recipe: Recipe, cfg: TransferConfig) -> TrainConfig:
    st = recipe.student_train
    return TrainConfig(epochs=cfg.source_epochs, batch_size=st.batch_size, lr=st.lr,
                       weight_decay=st.weight_decay, seed=cfg.seed)


@torch.no_grad()
def _features(backbone: nn.Module, x: np.ndarray) -> torch.Tensor:
    backbone.eval()
    return torch.cat([backbone(torch.from_numpy(x[i : i + 512])) for i in range(0, len(x), 512)])


def probe_head(backbone: nn.Module, shots: Split, n_classes: int, seed: int,
               steps: int = 300) -> LinearHead:
    """A linear head on frozen features of the labelled shots (Adam, full batch)."""
    torch.manual_seed(seed)
    f = _features(backbone, shots.x)
    head = LinearHead(f.shape[1], n_classes)
    opt = torch.optim.Adam(head.parameters(), lr=0.01, weight_decay=1e-4)
    y = torch.from_numpy(shots.y)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(f), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


def _summarise(name: str, runs: list[dict]) -> dict:
    m = get_method(name)
    t = np.array([r["target"] for r in runs])
    s = np.array([r["source"] for r in runs])
    sec = np.array([r["seconds"] for r in runs])
    return {"method": name, "title": m.title, "kind": m.kind, "n": len(runs),
            "target_mean": float(t.mean()), "target_std": float(t.std()),
            "source_mean": float(s.mean()), "source_std": float(s.std()),
            "seconds_mean": float(sec.mean()), "runs": runs}


def _finish_rows(rows: list[dict]) -> list[dict]:
    base = next((r for r in rows if r["method"] == "source_only"), None)
    for r in rows:
        if base is not None:
            per = [a["target"] - b["target"] for a, b in zip(r["runs"], base["runs"], strict=True)]
            r["delta_mean"] = float(np.mean(per))
            r["better_runs"] = int(sum(d > 0 for d in per))
            r["worse_runs"] = int(sum(d < 0 for d in per))
    return rows


# ---------------------------------------------------------------------------------------- HAR

def har_scenario(recipe: Recipe, cfg: TransferConfig, *, kd: bool = False,
                 kd_summary: Path | None = None, show: bool = True) -> dict:
    """Cross-user HAR: source = server training users, targets = device users."""
    from edgetl import stages

    sd = stages.server_data(recipe)
    w = sd.source
    mean, std = sd.cache["mean_std"]
    users = tuple(cfg.users or recipe.data.device_users)
    seen = set(recipe.data.server_users)
    if set(users) & seen:
        raise ValueError(f"transfer.users {sorted(set(users) & seen)} are server users")
    n_cls, c = len(w.labels), sd.train.x.shape[2]

    def norm(s) -> Split:
        return Split(((s.x - mean) / std).astype(np.float32), s.y)

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    source = build_model(c, n_cls, recipe.student, recipe.head)
    train_classifier(source, sd.train, None, _train_cfg(recipe, cfg), desc="source model",
                     show=show, augment=sd.augment)
    source_seconds = time.perf_counter() - t0
    console.log(f"source model: {len(sd.train.y)} windows of users "
                f"{sorted(set(recipe.data.server_users) - set(recipe.data.server_val_users))}, "
                f"{source_seconds:.1f} s; source-val acc {accuracy(source, sd.val):.3f}")
    targets = {}
    for u in users:
        uw = w.users([u])
        first = uw.session.min()
        targets[u] = (norm(uw.select(uw.session == first)), norm(uw.select(uw.session != first)))
    per: dict[str, list] = {m: [] for m in cfg.methods}
    cache: dict = {}
    with progress_bar(show) as prog:
        task = prog.add_task("methods x users", total=len(cfg.methods) * len(users), info="")
        for name in cfg.methods:
            kind = get_method(name).kind
            for u, (adapt, ev) in targets.items():
                data = TransferData(source=sd.train,
                                    target=adapt if kind == "supervised" else None,
                                    unlabeled=adapt.x if kind == "unsupervised" else None,
                                    shared=("",), source_model=source, cache=cache)
                t = time.perf_counter()
                model = transfer(name, source, data, cfg)
                sec = time.perf_counter() - t
                per[name].append({"user": u, "target": accuracy(model, ev),
                                  "source": accuracy(model, sd.val), "seconds": sec,
                                  "n_adapt": len(adapt.y), "n_eval": len(ev.y)})
                prog.update(task, advance=1, info=f"{name} user {u}")
    rows = _finish_rows([_summarise(m, per[m]) for m in cfg.methods])
    res = {"scenario": "har", "recipe": recipe.name,
           "description": (f"HAR cross-user: source users "
                           f"{_span(seen - set(recipe.data.server_val_users))}, targets = "
                           f"device users {_span(users)} (adapt on the first session, score "
                           f"the later ones); source accuracy on "
                           f"server-validation users {_span(recipe.data.server_val_users)}"),
           "over": "users", "source_seconds": source_seconds, "rows": rows}
    res["kd"] = _har_kd(recipe, cfg, sd, source, show) if kd else _summary_kd(kd_summary)
    return res


def _span(users) -> str:
    u = sorted(users)
    if u == list(range(u[0], u[-1] + 1)):
        return f"{u[0]}–{u[-1]}"
    return ", ".join(map(str, u))


def _har_kd(recipe: Recipe, cfg: TransferConfig, sd, scratch: nn.Module, show: bool) -> dict:
    """Teacher and distilled student with the same epochs as the source model."""
    c, n_cls = sd.in_channels, len(sd.labels)
    tc = _train_cfg(recipe, cfg)
    t = time.perf_counter()
    torch.manual_seed(cfg.seed)
    teacher = build_model(c, n_cls, recipe.teacher, recipe.head)
    train_classifier(teacher, sd.train, None, tc, desc="KD: teacher", show=show,
                     augment=sd.augment)
    torch.manual_seed(cfg.seed)
    student = build_model(c, n_cls, recipe.student, recipe.head)
    distill(teacher, student, sd.train, None, tc, recipe.distill, show=show,
            augment=sd.augment)
    accs = {k: accuracy(m, sd.heldout) for k, m in
            (("teacher", teacher), ("scratch", scratch), ("kd", student))}
    return {**accs, "gap_recovered": kd_gap_recovered(accs["teacher"], accs["scratch"],
                                                      accs["kd"]),
            "evaluated_on": f"all windows of device users {_span(recipe.data.device_users)}",
            "epochs": cfg.source_epochs, "temperature": recipe.distill.temperature,
            "alpha": recipe.distill.alpha, "seconds": time.perf_counter() - t}


# ------------------------------------------------------------------------------------- vision

def vision_scenario(recipe: Recipe, cfg: TransferConfig, *, kd_summary: Path | None = None,
                    show: bool = True) -> dict:
    """Fashion-MNIST -> digits: new classes from ``cfg.shots`` labelled digits per class."""
    from edgetl.data import images as imdata
    from edgetl.kinds.image import Images

    size = cfg.image_size or recipe.data.image_size
    r = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, image_size=size))
    vd = Images().load(r)
    spec = vd.cache["image"]
    c = vd.in_channels
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    source = build_model(c, len(vd.labels), recipe.student, recipe.head)
    train_classifier(source, vd.train, None, _train_cfg(recipe, cfg), desc="source model",
                     show=show, augment=vd.augment)
    source_seconds = time.perf_counter() - t0
    console.log(f"source model: {len(vd.train.y)} Fashion-MNIST images at {size} px, "
                f"{source_seconds:.1f} s; test acc {accuracy(source, vd.heldout):.3f}")
    xd, yd, dlabels = imdata.load_digits_images()
    xd = imdata.to_model_input(xd, (spec["height"], spec["width"]), spec["mode"], spec["mean"],
                               spec["std"])
    yd = yd.astype(np.int64)
    n_cls = len(dlabels)
    per: dict[str, list] = {m: [] for m in cfg.methods}
    cache: dict = {}
    with progress_bar(show) as prog:
        task = prog.add_task("methods x seeds", total=len(cfg.methods) * len(cfg.seeds), info="")
        for seed in cfg.seeds:
            rng = np.random.default_rng(seed)
            shot_idx = np.concatenate([rng.permutation(np.flatnonzero(yd == k))[: cfg.shots]
                                       for k in range(n_cls)])
            rest = rng.permutation(np.setdiff1d(np.arange(len(yd)), shot_idx))
            pool, ev_idx = rest[: len(rest) // 2], rest[len(rest) // 2 :]
            shots, ev = Split(xd[shot_idx], yd[shot_idx]), Split(xd[ev_idx], yd[ev_idx])
            cfg_s = dataclasses.replace(cfg, seed=seed)
            for name in cfg.methods:
                kind = get_method(name).kind
                t = time.perf_counter()
                if kind == "supervised":
                    start = EdgeModel(copy.deepcopy(source.backbone),
                                      probe_head(source.backbone, shots, n_cls, seed))
                    data = TransferData(source=vd.train, target=shots, shared=("backbone.",),
                                        source_model=source, cache=cache)
                    model = transfer(name, start, data, cfg_s)
                    src_model = EdgeModel(model.backbone, copy.deepcopy(source.head))
                else:
                    data = TransferData(source=vd.train, unlabeled=xd[pool],
                                        shared=("",), source_model=source)
                    src_model = transfer(name, source, data, cfg_s)
                    model = EdgeModel(src_model.backbone,
                                      probe_head(src_model.backbone, shots, n_cls, seed))
                sec = time.perf_counter() - t
                per[name].append({"seed": seed, "target": accuracy(model, ev),
                                  "source": accuracy(src_model, vd.heldout), "seconds": sec,
                                  "n_shots": len(shots.y), "n_unlabeled": len(pool),
                                  "n_eval": len(ev.y)})
                prog.update(task, advance=1, info=f"{name} seed {seed}")
    rows = _finish_rows([_summarise(m, per[m]) for m in cfg.methods])
    res = {"scenario": "vision", "recipe": recipe.name,
           "description": (f"Fashion-MNIST ({len(vd.train.y)} images, {size} px {spec['mode']}) "
                           f"-> handwritten digits (10 new classes, {cfg.shots} labelled per "
                           f"class; unlabelled pool and scored digits disjoint); source "
                           f"accuracy on {len(vd.heldout.y)} Fashion-MNIST test images"),
           "over": "seeds", "source_seconds": source_seconds, "rows": rows}
    res["kd"] = _summary_kd(kd_summary)
    return res


def _summary_kd(path: Path | None) -> dict | None:
    """KD gap recovered from an ``edgetl run`` summary (teacher, student, student_scratch)."""
    if path is None or not Path(path).is_file():
        return None
    s = json.loads(Path(path).read_text()).get("server", {})
    try:
        accs = {"teacher": s["teacher"]["heldout_accuracy"],
                "scratch": s["student_scratch"]["heldout_accuracy"],
                "kd": s["student"]["heldout_accuracy"]}
    except KeyError:
        return None
    return {**accs, "gap_recovered": kd_gap_recovered(accs["teacher"], accs["scratch"],
                                                      accs["kd"]),
            "evaluated_on": f"held-out test data of {path}", "from": str(path)}


# -------------------------------------------------------------------------------------- report

def run_methods(recipe: Recipe, *, seeds: tuple[int, ...] | None = None, kd: bool = False,
                kd_summary: Path | None = None, show: bool = True) -> dict:
    """The scenario of ``recipe`` with every method of ``recipe.transfer.methods``."""
    cfg = recipe.transfer
    if seeds:
        cfg = dataclasses.replace(cfg, seeds=tuple(seeds), seed=seeds[0])
    if recipe.data.is_files or recipe.data.is_text:
        from edgetl.errors import ConfigError

        raise ConfigError(f"edgetl methods compares transfer methods on the built-in hapt and "
                          f"fashion_mnist scenarios, not on {recipe.data.kind} "
                          f"{'files' if recipe.data.is_files else 'data'}; run your own files "
                          "with `edgetl run`")
    t = time.perf_counter()
    if recipe.data.is_image:
        res = vision_scenario(recipe, cfg, kd_summary=kd_summary, show=show)
    else:
        res = har_scenario(recipe, cfg, kd=kd, kd_summary=kd_summary, show=show)
    res["config"] = dataclasses.asdict(cfg)
    res["torch_threads"] = torch.get_num_threads()
    res["wall_seconds"] = time.perf_counter() - t
    return res


def markdown(results: list[dict]) -> str:
    """The methods table(s) as Markdown, one section per scenario."""
    out = []
    for res in results:
        over = res["over"]
        n = res["rows"][0]["n"] if res["rows"] else 0
        out += [f"### {res['recipe']}: {res['description']}", "",
                f"| method | target data | target acc (mean ± std over {n} {over}) | "
                f"Δ vs source-only | better / worse {over} | source acc | s / run |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            data = {"none": "—", "supervised": "labelled",
                    "unsupervised": "unlabelled"}[r["kind"]]
            if res["scenario"] == "vision" and r["kind"] != "supervised":
                data = "probe on shots" if r["kind"] == "none" else data + " + probe on shots"
            delta = ("—" if r["method"] == "source_only" or "delta_mean" not in r
                     else f"{100 * r['delta_mean']:+.1f} pt")
            bw = ("—" if r["method"] == "source_only" or "better_runs" not in r
                  else f"{r['better_runs']} / {r['worse_runs']}")
            out.append(f"| {r['title']} | {data} | {r['target_mean']:.3f} ± "
                       f"{r['target_std']:.3f} | {delta} | {bw} | {r['source_mean']:.3f} | "
                       f"{r['seconds_mean']:.2f} |")
        kd = res.get("kd")
        out.append("")
        if kd:
            g = kd["gap_recovered"]
            frac = "n/a (teacher no better than scratch)" if g is None else f"{g:.2f}"
            out.append(f"Knowledge distillation ({kd['evaluated_on']}): teacher "
                       f"{kd['teacher']:.3f}, student from scratch {kd['scratch']:.3f}, "
                       f"distilled {kd['kd']:.3f} → fraction of the teacher–student gap "
                       f"recovered: **{frac}**.")
        else:
            out.append("Knowledge distillation: not measured in this run (HAR: `--kd`; "
                       "otherwise read from `runs/<recipe>/summary.json`, which `edgetl run` "
                       "writes).")
        out += ["", f"Source model {res['source_seconds']:.1f} s; whole scenario "
                    f"{res['wall_seconds']:.0f} s on {res['torch_threads']} torch thread(s).", ""]
    return "\n".join(out)


def write_report(results: list[dict], out: Path) -> tuple[Path, Path]:
    """Write ``methods.json`` and ``methods.md`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pj, pm = out / "methods.json", out / "methods.md"
    pj.write_text(json.dumps({"scenarios": results}, indent=2, default=str))
    pm.write_text(markdown(results))
    return pj, pm
