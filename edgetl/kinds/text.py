"""Texts: WordNet glosses on the server and fortune topics on devices, or your text CSV.

Built-in scenario. Server: all-MiniLM-L6-v2 (frozen, its packaged weights) with a linear head
learns the lexicographer category of WordNet noun glosses (``noun.animal``, ``noun.food``,
...): the teacher. A student keeps fewer of MiniLM's transformer layers (same tokenizer, same
width) and is distilled on the glosses: cosine loss to the teacher's sentence embeddings plus
Hinton KD on the teacher head's logits. Both become device bundles (ONNX through optimum, int8
through optimum's ORTQuantizer, TFLite through litert-torch, its int8 with litert-torch's
dynamic-range recipe), so MiniLM against its student is measured, not assumed.

Devices learn topics the server never saw — the ``fortunes`` package's topic files — from a
few texts per topic written as a ``.csv``: imprinting adds the topics, head training refines
them; scored on fortunes no device trained on. Your text CSV (``kind = "text"``): the server
users' texts train and validate, each device user personalises on half of each label's texts.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgetl.check import REPLAY_POOL, CheckData, per_class
from edgetl.checkpoint import Checkpoint, load_checkpoint
from edgetl.export.bundle import torch_features
from edgetl.kinds.base import Device, RecipeKind, ServerData
from edgetl.nets import build_model
from edgetl.progress import progress_bar
from edgetl.text import data as tdata
from edgetl.text.encoder import Tokens, trim
from edgetl.train import Split, kd_loss


def _proportional(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """About ``n`` indices with every class in proportion (at least 1 each)."""
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(n * len(idx) / len(y))))
        keep.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(keep))


@dataclass
class TextSplits:
    """Glosses split for the server: raw texts, their tokens and category ids."""

    texts: dict[str, np.ndarray]       # train / val / test -> (N,) str
    tokens: dict[str, np.ndarray]      # -> (N, 2, L) int64
    y: dict[str, np.ndarray]           # -> (N,) int64
    labels: tuple[str, ...]
    truncated: dict[str, int] = field(default_factory=dict)
    own: Any = None  # your text CSV: (TextData, Groups), the loaded file and its user split


def own_texts(recipe):
    """Your text CSV (``kind = "text"``) and its split: ``(TextData, Groups)``."""
    from edgetl.data import files

    td = files.load_texts(recipe.data)
    return td, files.groups_of(recipe.data, td.owners, "users", td.y, td.labels,
                               in_order=False)


def text_splits(recipe) -> TextSplits:
    """Seeded, class-stratified splits of the glosses: subset -> train / val; test disjoint.

    Your text CSV: the server users' texts train and validate, the device users' are the test
    set.
    """
    d = recipe.data
    if d.is_files:
        td, g = own_texts(recipe)
        texts, y, labels = td.texts, td.y, td.labels
        parts = {k: np.flatnonzero(np.isin(g.group, ids))
                 for k, ids in (("train", g.train), ("val", g.val), ("test", g.device))}
    else:
        texts, y, labels = tdata.load_glosses()
        texts = np.asarray(texts, dtype=str)
        rng = np.random.default_rng(recipe.pretrain.seed)
        test = _proportional(y, d.test_subset, rng)
        rest = np.setdiff1d(np.arange(len(y)), test)
        if d.source_subset:
            rest = rest[_proportional(y[rest], d.source_subset, rng)]
        rest = rng.permutation(rest)
        n_val = int(round(d.val_fraction * len(rest)))
        parts = {"train": np.sort(rest[n_val:]), "val": np.sort(rest[:n_val]), "test": test}
    tok = Tokens(d.max_length)
    out = TextSplits({}, {}, {}, labels, own=(td, g) if d.is_files else None)
    for name, idx in parts.items():
        out.texts[name], out.y[name] = texts[idx], y[idx].astype(np.int64)
        out.tokens[name], out.truncated[name] = tok.encode(out.texts[name])
    return out


def _batches(tokens: np.ndarray, batch: int, gen: np.random.Generator | None):
    """Index batches of texts of similar length (fewer padding columns), shuffled if ``gen``."""
    order = np.argsort(tokens[:, 1].sum(1), kind="stable")
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    if gen is not None:
        chunks = [chunks[i] for i in gen.permutation(len(chunks))]
    return chunks


def _embed(backbone, tokens: np.ndarray, desc: str, show: bool) -> np.ndarray:
    """Eval-mode sentence embeddings, length-bucketed, with a progress bar."""
    backbone.eval()
    out = np.zeros((len(tokens), backbone.out_features), np.float32)
    chunks = _batches(tokens, 128, None)
    with progress_bar(show) as prog:
        task = prog.add_task(desc, total=len(tokens), info="")
        for idx in chunks:
            out[idx] = torch_features(backbone, tokens[idx], batch=len(idx))
            prog.advance(task, len(idx))
    return out


def _fit_head(head, feats: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, np.ndarray],
              cfg, show: bool) -> dict:
    """Train ``head`` on frozen embeddings: AdamW, cosine schedule, best-on-val kept."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, t = torch.from_numpy(feats), torch.from_numpy(y)
    xv, yv = torch.from_numpy(val[0]), val[1]
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(t) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best, best_state, t0 = -1.0, None, time.perf_counter()
    with progress_bar(show) as prog:
        task = prog.add_task("teacher head on MiniLM embeddings", total=cfg.epochs, info="")
        for _ in range(cfg.epochs):
            head.train()
            for b in torch.randperm(len(t), generator=gen).split(cfg.batch_size):
                loss = F.cross_entropy(head(x[b]), t[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            head.eval()
            with torch.no_grad():
                acc = float((head(xv).argmax(1).numpy() == yv).mean())
            if acc > best:
                best, best_state = acc, {k: v.clone() for k, v in head.state_dict().items()}
            prog.update(task, advance=1, info=f"val {acc:.3f}")
    head.load_state_dict(best_state)
    return {"val_accuracy": best, "seconds": time.perf_counter() - t0}


def _accuracy(model, tokens: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        logits = model.head(torch.from_numpy(torch_features(model.backbone, tokens)))
    return float((logits.argmax(1).numpy() == y).mean())


def distill_student(teacher, student, sp: TextSplits, t_emb: np.ndarray, recipe, *,
                    show: bool = True) -> dict:
    """Train the student encoder + head on the glosses against the frozen teacher.

    Loss per batch: ``embedding_weight * (1 - cos(s_emb, t_emb)) + KD(s_logits, t_logits)``
    (Hinton, ``distill.temperature`` / ``alpha``). The student head starts as the teacher's.
    """
    cfg, kd = recipe.student_train, recipe.distill
    student.head.load_state_dict(teacher.head.state_dict())
    with torch.no_grad():
        t_logits = teacher.head(torch.from_numpy(t_emb))
    tok, y = sp.tokens["train"], torch.from_numpy(sp.y["train"])
    te = torch.from_numpy(t_emb)
    torch.manual_seed(cfg.seed)
    gen = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_steps = cfg.epochs * math.ceil(len(y) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, pct_start=0.1,
                                                total_steps=n_steps)
    history, t0 = [], time.perf_counter()
    with progress_bar(show) as prog:
        task = prog.add_task(f"distil {student.backbone.layers}-layer student", total=n_steps,
                             info="")
        for epoch in range(cfg.epochs):
            student.train()
            total = 0.0
            for idx in _batches(tok, cfg.batch_size, gen):
                emb = student.backbone(torch.from_numpy(trim(tok[idx])))
                loss = kd_loss(student.head(emb), t_logits[idx], y[idx], kd)
                if kd.embedding_weight:
                    cos = F.cosine_similarity(emb, te[idx], dim=1)
                    loss = loss + kd.embedding_weight * (1 - cos).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                prog.advance(task)
            student.eval()
            acc = _accuracy(student, sp.tokens["val"], sp.y["val"])
            history.append({"epoch": epoch + 1, "loss": total / len(y), "val_accuracy": acc})
            prog.update(task, info=f"loss {total / len(y):.3f} val {acc:.3f}")
    return {"history": history, "val_accuracy": history[-1]["val_accuracy"],
            "seconds": time.perf_counter() - t0}


def write_devices(recipe, out: Path) -> list[Device]:
    """Fortunes split into ``device_count`` devices' ``adapt.csv`` plus one shared eval set.

    Each device gets ``device_shots`` texts per topic (disjoint across devices); the eval set
    is the rest, at most 60 per topic so large topics do not dominate the score.
    """
    d = recipe.data
    topics = tdata.load_fortunes(d.device_topics)
    rng = np.random.default_rng(d.device_count * 1000 + d.device_shots)
    need = d.device_count * d.device_shots + 1
    short = {t: len(v) for t, v in topics.items() if len(v) < need}
    if short:
        from edgetl.errors import ConfigError

        raise ConfigError(f"fortunes topics {short} have too few texts for {d.device_count} "
                          f"devices x {d.device_shots} shots (+ evaluation); lower "
                          "data.device_shots or pick other topics")
    pools = {t: [v[i] for i in rng.permutation(len(v))] for t, v in topics.items()}
    root = Path(out) / "devices"
    if root.exists():
        shutil.rmtree(root)
    devs = []
    for k in range(d.device_count):
        rows = [(pools[t].pop(), t) for t in d.device_topics for _ in range(d.device_shots)]
        path = root / f"device_{k + 1}" / "adapt.csv"
        _write_csv(path, rows)
        devs.append((path, len(rows)))
    ev = [(s, t) for t in d.device_topics for s in pools[t][:60]]
    ev_path = root / "eval.csv"
    _write_csv(ev_path, ev)
    return [Device(f"device_{k + 1}", path, ev_path, n, len(ev), tuple(d.device_topics))
            for k, (path, n) in enumerate(devs)]


def write_own_devices(out: Path, own, seed: int) -> list[Device]:
    """Each device user's texts as ``adapt.csv`` (first half of every label) + ``eval.csv``.

    ``own``: :attr:`TextSplits.own`, the loaded CSV and its user split.
    """
    from edgetl.data.files import write_device_halves

    td, g = own

    def write_texts(folder: Path, part: str, sel: np.ndarray) -> Path:
        path = folder / f"{part}.csv"
        _write_csv(path, [(str(td.texts[i]), td.labels[td.y[i]]) for i in sel])
        return path

    return write_device_halves(out, g, td.y, td.labels, seed, write_texts)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("text", "label"), *rows])


class Texts(RecipeKind):
    """Strings, tokenised with the bundle's tokenizer into (N, 2, L) ids + attention mask.

    The teacher's encoder is frozen (MiniLM): pretraining fits its head on sentence
    embeddings; distillation trains the student encoder against them (no from-scratch twin:
    a transformer student from random weights is not a baseline worth its hours).
    """

    name = "text"

    def load(self, recipe) -> ServerData:
        if not recipe.data.is_files:
            tdata.ensure_packages()
        sp = text_splits(recipe)
        rng = np.random.default_rng(0)
        ref = sp.texts["val"][np.sort(rng.permutation(len(sp.y["val"]))[:32])]
        rp = per_class(sp.y["train"], REPLAY_POOL)
        check = CheckData(ref, sp.texts["train"][: recipe.export.calibration_windows],
                          sp.texts["test"], sp.y["test"], sp.labels, sp.texts["train"][rp],
                          sp.y["train"][rp])
        d = recipe.data
        what = f"texts of {d.path}" if d.is_files else "WordNet noun glosses"
        describe = (f"{len(sp.y['train'])} train / {len(sp.y['val'])} val / "
                    f"{len(sp.y['test'])} test {what}, {len(sp.labels)} categories; "
                    f"truncated at {d.max_length} word pieces: {sp.truncated}")
        split = {k: Split(sp.tokens[k], sp.y[k]) for k in ("train", "val", "test")}
        info = {"truncated": sp.truncated,
                "mean_word_pieces": {k: float(v[:, 1].sum(1).mean())
                                     for k, v in sp.tokens.items()}}
        return ServerData(self.name, split["train"], split["val"], split["test"], sp.labels, 2,
                          check, describe, source=sp, split=sp.own[1] if sp.own else None,
                          heldout_name=f"device users of {d.path}" if d.is_files else
                          "test glosses", info=info)

    def checkpoint(self, model, recipe, net, sd: ServerData, meta: dict) -> Checkpoint:
        tok = Tokens(recipe.data.max_length)
        return Checkpoint(model, net, recipe.head, sd.labels, ("input_ids", "attention_mask"),
                          recipe.data.max_length, 0, 0.0, np.zeros(2, np.float32),
                          np.ones(2, np.float32), {"recipe": recipe.name, **meta},
                          text=tok.spec())

    def roles(self, recipe) -> dict[str, str]:
        return {"student": "student", "teacher": "minilm"}

    def model_name(self, role: str, recipe) -> str:
        return {"teacher": "all-MiniLM-L6-v2 (frozen) + head",
                "student": "student (distilled)"}.get(role, role)

    def _embeddings(self, teacher, sd: ServerData, show: bool) -> dict:
        if "teacher_embeddings" not in sd.cache:
            sd.cache["teacher_embeddings"] = {
                s: _embed(teacher.backbone, sd.source.tokens[s], f"MiniLM embeddings ({s})",
                          show) for s in ("train", "val")}
        return sd.cache["teacher_embeddings"]

    def pretrain(self, recipe, out: Path, sd: ServerData, *, show: bool = True):
        """The frozen encoder's head, trained on its sentence embeddings."""
        from edgetl.kinds.base import record

        sp = sd.source
        torch.manual_seed(recipe.pretrain.seed)
        teacher = build_model(2, len(sp.labels), recipe.teacher, recipe.head).eval()
        emb = self._embeddings(teacher, sd, show)
        r = _fit_head(teacher.head, emb["train"], sp.y["train"], (emb["val"], sp.y["val"]),
                      recipe.pretrain, show)
        return record(self, teacher, recipe, recipe.teacher, sd, Path(out) / "teacher.pt",
                      {"role": "teacher", "pretrained": True, "frozen_backbone": True},
                      r["val_accuracy"], r["seconds"], [],
                      heldout=_accuracy(teacher, sp.tokens["test"], sp.y["test"]),
                      extra={"layers": teacher.backbone.layers})

    def distill(self, recipe, teacher_path: Path, out: Path, sd: ServerData, *,
                baseline: bool = True, show: bool = True):
        from edgetl.kinds.base import record

        sp = sd.source
        teacher = load_checkpoint(teacher_path).model.eval()
        emb = self._embeddings(teacher, sd, show)
        torch.manual_seed(recipe.student_train.seed)
        student = build_model(2, len(sp.labels), recipe.student, recipe.head)
        r = distill_student(teacher, student, sp, emb["train"], recipe, show=show)
        student.eval()
        return {"student": record(
            self, student, recipe, recipe.student, sd, Path(out) / "student.pt",
            {"role": "student", "distilled": True,
             "layers_from_teacher": student.backbone.kept},
            r["val_accuracy"], r["seconds"], r["history"],
            heldout=_accuracy(student, sp.tokens["test"], sp.y["test"]),
            extra={"layers": student.backbone.layers})}

    def devices(self, recipe, out: Path, sd: ServerData, *, users: tuple | None = None,
                protocol: str = "sessions") -> list[Device]:
        if users:
            from edgetl.errors import ConfigError

            raise ConfigError("text recipes personalise every device user; --users is for "
                              "time-series recipes")
        own = sd.source.own
        return write_own_devices(out, own, recipe.data.seed) if own else \
            write_devices(recipe, out)
