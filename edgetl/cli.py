"""The ``edgetl`` command line: thin Typer wrappers over the stage functions.

Heavy libraries (torch, onnx, onnxruntime, matplotlib) are imported inside the commands, so
``edgetl --help`` is instant. Any :class:`~edgetl.errors.EdgetlError` exits 1 with one line.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer

from edgetl import __version__
from edgetl.errors import ConfigError, EdgetlError

app = typer.Typer(name="edgetl", no_args_is_help=True, add_completion=False,
                  help="On-device transfer learning: pretrain and distill on the server, export "
                       "a frozen backbone + trainable head, personalise it on the device.")

DEFAULT_RECIPE = Path("models/har/recipe.toml")
RecipeArg = Annotated[Path, typer.Argument(help="recipe TOML (or its folder)")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="output directory")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]


def _err(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)


def user_errors(fn):
    """Turn :class:`EdgetlError` into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgetlError as e:
            _err(str(e))
            raise typer.Exit(code=1) from None

    return wrapper


def _setup(threads: int = 2) -> None:
    import torch

    torch.set_num_threads(threads)


def _recipe(path: Path):
    from edgetl.config import load_recipe

    return load_recipe(path)


def _int_list(text: str, option: str, example: str) -> tuple[int, ...]:
    """``"1,2"`` -> ``(1, 2)``; anything else is a clear error naming the option."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated integers like {example}; got "
                          f"{text!r}") from None


def _console():
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=120)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgetl {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_version,
                                               is_eager=True, help="print the version")] = False):
    """Run the edgetl command line."""


@app.command()
@user_errors
def pretrain(recipe: RecipeArg = DEFAULT_RECIPE, out: OutOpt = Path("runs/har"),
             quiet: QuietOpt = False,
             threads: Annotated[int, typer.Option(min=1, help="torch threads (under torchrun: "
                                                  "shared by a machine's processes)")] = 2):
    """Train the teacher on the recipe's server-training data; writes OUT/teacher.pt."""
    _setup(threads)
    from edgetl import stages
    from edgetl.distributed import session

    with session() as dist:  # torchrun --nproc-per-node N: DDP (edgetl.distributed)
        r = stages.pretrain(_recipe(recipe), out, show=not quiet)
    if dist.is_main:
        typer.echo(f"teacher: {r.params:,} params, held-out accuracy {r.heldout_accuracy:.3f} "
                   f"-> {r.path}" + (f" ({dist.world_size} processes)" if dist.enabled else ""))


@app.command()
@user_errors
def distill(recipe: RecipeArg = DEFAULT_RECIPE, out: OutOpt = Path("runs/har"),
            teacher: Annotated[Path | None, typer.Option(help="teacher checkpoint "
                                                         "(default OUT/teacher.pt)")] = None,
            baseline: Annotated[bool, typer.Option(help="also train the student from scratch "
                                                   "to measure what distillation buys")] = True,
            quiet: QuietOpt = False):
    """Distill the teacher into the small student; writes OUT/student.pt.

    With --baseline (the default) the same student is also trained from scratch, and the
    better of the two on the server-validation data ships as OUT/student.pt (ties: the
    distilled one); the output says which and why.
    """
    _setup()
    from edgetl import stages
    from edgetl.distributed import session

    with session() as dist:  # torchrun --nproc-per-node N: DDP (edgetl.distributed)
        res = stages.distill_student(_recipe(recipe), teacher or out / "teacher.pt", out,
                                     baseline=baseline, show=not quiet)
    for name, r in res.items() if dist.is_main else ():
        typer.echo(f"{name}: {r.params:,} params, held-out accuracy {r.heldout_accuracy:.3f} "
                   f"-> {r.path}")
    why = res["student"].extra.get("why") if dist.is_main else None
    if why:
        typer.echo(f"shipped student ({res['student'].extra['shipped']}): {why}")


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated numbers like 0.5,0.5,0.5; got "
                          f"{text!r}") from None


def _npz(path: Path | None, option: str, need_y: bool):
    """``x`` (and ``y``) of an ``.npz`` given to ``--calibration`` / ``--heldout``."""
    if path is None:
        return None
    import numpy as np

    if not path.is_file():
        raise ConfigError(f"{option} {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{option} {path} is not a readable .npz without pickled objects "
                          f"({e}); write it with np.savez(path, x=..., y=...)") from None
    if "x" not in arrays or (need_y and "y" not in arrays):
        raise ConfigError(f"{option} {path} needs array 'x'{' and labels y' if need_y else ''}; "
                          f"found {sorted(arrays)}")
    return (arrays["x"], arrays["y"]) if need_y else arrays["x"]


def _labels(labels: str | None, labels_file: Path | None) -> tuple[str, ...] | None:
    if labels is not None and labels_file is not None:
        raise ConfigError("give --labels or --labels-file, not both")
    if labels_file is not None:
        if not labels_file.is_file():
            raise ConfigError(f"--labels-file {labels_file} does not exist")
        names = [v.strip() for v in labels_file.read_text(encoding="utf-8").splitlines()]
        return tuple(v for v in names if v)
    return tuple(v.strip() for v in labels.split(",")) if labels is not None else None


@app.command()
@user_errors
def export(model: Annotated[str, typer.Argument(
               help="edgetl checkpoint (.pt), package.module:factory (or file.py:factory), "
                    "or a Hugging Face model folder")] = "runs/har/student.pt",
           target: Annotated[str, typer.Option(help="runtime: onnx (onnxruntime) or tflite "
                                                    "(LiteRT)")] = "onnx",
           precision: Annotated[str, typer.Option(help="backbone precision: fp32 or int8 "
                                                       "(static, calibrated)")] = "fp32",
           out: Annotated[Path | None, typer.Option("--out", "-o", help="bundle directory "
                                                    "(default runs/har/bundles/TARGET-PRECISION)")]
           = None,
           head: Annotated[str | None, typer.Option(
               help="attribute path of the trainable head (default: the Linear named "
                    "classifier, fc or head)")] = None,
           input_shape: Annotated[str | None, typer.Option(
               help="input dims without the batch axis, e.g. 3,96,96")] = None,
           input_dtype: Annotated[str | None, typer.Option(
               help="float32, or int64 (token ids)")] = None,
           labels: Annotated[str | None, typer.Option(help="class names, comma-separated, in "
                                                      "logit order")] = None,
           labels_file: Annotated[Path | None, typer.Option(help="class names, one per line")]
           = None,
           calibration: Annotated[Path | None, typer.Option(
               help=".npz with x: inputs that calibrate int8 (and serve as reference)")] = None,
           heldout: Annotated[Path | None, typer.Option(
               help=".npz with x and y (label names or ids): the accuracy gate")] = None,
           weights: Annotated[Path | None, typer.Option(
               help="factory models: safetensors or torch state dict")] = None,
           mean: Annotated[str | None, typer.Option(
               help="normalisation the model expects, per channel: (x - mean) / std")] = None,
           std: Annotated[str | None, typer.Option(help="see --mean")] = None,
           layout: Annotated[str | None, typer.Option(help="a note for people, e.g. NCHW")]
           = None,
           class_capacity: Annotated[int, typer.Option(
               min=0, max=1024, help="tflite: class rows of the head, spare ones for labels "
                                     "a device adds (0: just the model's)")] = 0,
           int8_io: Annotated[str | None, typer.Option(
               help="tflite int8: graph input/output type, float32 (quantised inside the "
                    "graph; LiteRT.js needs it) or int8. Default: the recipe's export.int8_io "
                    "(float32)")] = None,
           trainer: Annotated[str, typer.Option(
               help="stateless (train step graph, any runtime) or ort-training (also ONNX "
                    "Runtime training artifacts; deprecated upstream, x86_64)")] = "stateless",
           trainable: Annotated[str | None, typer.Option(
               help="what the device trains: head (default), bias, last:N, all, or "
                    "parameter-name globs (docs/bundle.md)")]
           = None,
           backbone_lr_scale: Annotated[float | None, typer.Option(
               help="--trainable beyond head: the backbone tensors' lr as a multiple of the "
                    "head's (default: the recipe's export.backbone_lr_scale, 0.1; the device "
                    "runner can override it)")] = None,
           recipe: Annotated[Path, typer.Option(help="edgetl checkpoints: recipe (export "
                                                     "options, data)")] = DEFAULT_RECIPE,
           sign_key: Annotated[Path | None, typer.Option(
               help="Ed25519 private key (edgetl keygen): sign manifest.json")] = None):
    """Export a model as a device bundle (frozen backbone + trainable head + manifest.json).

    MODEL is an edgetl student checkpoint (data from --recipe), or your own classifier: a
    factory `package.module:make_model` (with --weights) or a Hugging Face folder.
    """
    _setup()
    from edgetl.report import bundle_line

    out = out or Path("runs/har/bundles") / f"{target}-{precision}"
    if model.endswith(".pt") and ":" not in model:
        from edgetl import stages

        man = stages.export(Path(model), out, _recipe(recipe), target=target,
                            precision=precision, trainer=trainer, sign_key=sign_key,
                            trainable=trainable, int8_io=int8_io,
                            backbone_lr_scale=backbone_lr_scale)
    else:
        man = _export_user_model(model, out, target=target, precision=precision, head=head,
                                 input_shape=input_shape, input_dtype=input_dtype,
                                 labels=_labels(labels, labels_file),
                                 calibration=_npz(calibration, "--calibration", False),
                                 heldout=_npz(heldout, "--heldout", True), weights=weights,
                                 mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                                 layout=layout, trainer=trainer, sign_key=sign_key,
                                 class_capacity=class_capacity, int8_io=int8_io,
                                 trainable=trainable, backbone_lr_scale=backbone_lr_scale)
    typer.echo(bundle_line(out, man) + ("; signed" if sign_key else ""))


def _export_user_model(spec: str, out: Path, *, target, precision, head, input_shape,
                       input_dtype, labels, calibration, heldout, weights, mean, std, layout,
                       trainer, sign_key, class_capacity, int8_io, trainable=None,
                       backbone_lr_scale=None):
    import dataclasses

    import torch

    from edgetl.config import ExportConfig
    from edgetl.export.load import load_model
    from edgetl.export.model import export_model

    um = load_model(spec, weights)
    shape = _int_list(input_shape, "--input-shape", "3,96,96") if input_shape else um.shape
    if shape is None:
        raise ConfigError(f"{spec}: pass --input-shape (dims without the batch axis, e.g. "
                          "3,96,96 or 128 for token ids)")
    dtype = input_dtype or um.dtype or "float32"
    if dtype not in ("float32", "int64"):
        raise ConfigError(f"--input-dtype must be float32 or int64, got {dtype!r}")
    labels = labels or um.labels
    if labels is None:
        raise ConfigError(f"{spec}: pass --labels a,b,c or --labels-file (one class name per "
                          "head output)")
    example = (torch.zeros((1, *shape)) if dtype == "float32"
               else torch.ones((1, *shape), dtype=torch.int64))
    if calibration is not None:
        example = torch.from_numpy(calibration[:1].astype(dtype))
    d = ExportConfig()
    cfg = dataclasses.replace(d, trainer=trainer, class_capacity=class_capacity,
                              int8_io=int8_io or d.int8_io, trainable=trainable or d.trainable,
                              backbone_lr_scale=d.backbone_lr_scale if backbone_lr_scale is None
                              else backbone_lr_scale)
    return export_model(um.module, example=example, labels=labels, out=out, head=head,
                        target=target, precision=precision, calibration=calibration,
                        heldout=heldout, mean=mean if mean is not None else um.mean,
                        std=std if std is not None else um.std,
                        layout=layout if layout is not None else um.layout, name=um.name,
                        export=cfg, call=um.call, sign_key=sign_key,
                        provenance=um.provenance)


@app.command()
@user_errors
def keygen(out: Annotated[Path, typer.Option("--out", "-o", help="folder for the key pair")] =
           Path("keys"),
           name: Annotated[str, typer.Option(help="file name stem")] = "edgetl"):
    """Make an Ed25519 key pair: NAME.key (private, 0600) signs, NAME.pub goes to devices."""
    from edgetl.signing import keygen as make

    priv, pub = make(out, name)
    typer.echo(f"private key {priv} (keep it on the build server), public key {pub} "
               "(give it to devices: run.py ... --trust-key)")


@app.command()
@user_errors
def sign(bundle: Annotated[Path, typer.Argument(help="bundle directory")],
         key: Annotated[Path, typer.Option(help="Ed25519 private key (edgetl keygen)")]):
    """Sign an existing bundle: verify it, then write manifest.sig over manifest.json."""
    from edgetl.manifest import Manifest
    from edgetl.signing import sign_bundle

    Manifest.read(bundle).verify(bundle)  # never sign a damaged or tampered bundle
    typer.echo(f"signed {bundle}: {sign_bundle(bundle, key)}")


@app.command()
@user_errors
def quantize(bundle: Annotated[Path, typer.Argument(help="fp32 ONNX bundle")] = Path(
                 "runs/har/bundles/onnx-fp32"),
             recipe: Annotated[Path, typer.Option(help="recipe (calibration and held-out "
                                                       "data, accuracy threshold)")] =
             DEFAULT_RECIPE,
             out: Annotated[Path | None, typer.Option("--out", "-o", help="int8 bundle "
                                                      "(default: BUNDLE with -int8)")] = None):
    """int8 copy of an fp32 ONNX bundle (static QDQ backbone), gated on held-out accuracy."""
    from edgetl import stages
    from edgetl.report import bundle_line

    out = out or bundle.with_name(bundle.name.removesuffix("-fp32") + "-int8")
    man = stages.quantize(bundle, out, _recipe(recipe))
    typer.echo(bundle_line(out, man))


@app.command()
@user_errors
def check(bundle: Annotated[Path, typer.Argument(help="bundle directory")],
          checkpoint: Annotated[Path | None, typer.Option(
              help="PyTorch student: enables parity, and is the accuracy reference")] = None,
          recipe: Annotated[Path | None, typer.Option(
              help="recipe: enables the held-out accuracy and adaptation checks")] = None,
          reference: Annotated[Path | None, typer.Option(
              help="fp32 bundle as the accuracy reference (without --checkpoint)")] = None,
          heldout: Annotated[Path | None, typer.Option(
              help=".npz with x and y: held-out accuracy through the runner (without a "
                   "recipe)")] = None,
          trust_key: Annotated[Path | None, typer.Option(
              help="Ed25519 public key: manifest.sig must verify (as on a --trust-key "
                   "device)")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="machine-readable result on "
                                                "stdout")] = False):
    """Release gate: integrity, self-test, smoke train step, parity, accuracy, adaptation.

    Exits 0 only if every check holds, else 1 with a table of what failed and by how much.
    """
    import json

    from edgetl.check import check_bundle, failures
    from edgetl.report import check_table

    if checkpoint is not None:
        _setup()
    kw = {}
    if recipe is not None:  # the recipe's data: held-out users, adaptation users
        from edgetl.pipeline import check_inputs

        kw = check_inputs(_recipe(recipe))
    if heldout is not None:
        kw["heldout"] = _npz(heldout, "--heldout", True)
    res = check_bundle(bundle, checkpoint=checkpoint, reference_bundle=reference,
                       trust_key=trust_key, **kw)
    bad = failures(res)
    if as_json:
        typer.echo(json.dumps({"bundle": str(bundle), "ok": not bad,
                               "checks": [c.to_dict() for c in res]}, indent=2))
    else:
        _console().print(check_table(bundle, res))
        if bad:
            _err(f"{len(bad)} of {len(res)} checks failed: {', '.join(c.name for c in bad)}")
    if bad:
        raise typer.Exit(code=1)


@app.command()
@user_errors
def adapt(bundle: Annotated[Path, typer.Argument(help="bundle directory")],
          data: Annotated[Path, typer.Option(help=".npz (x, y) or .csv with the device's "
                                             "labelled data")],
          out: OutOpt = Path("runs/device"),
          epochs: Annotated[int, typer.Option(min=0, help="0: only imprint new labels")] = 30,
          batch_size: Annotated[int, typer.Option(min=1)] = 32,
          val_fraction: Annotated[float, typer.Option(min=0.01, max=0.99)] = 0.25,
          lr: Annotated[float | None, typer.Option(help="override the bundle's lr")] = None,
          head: Annotated[Path | None, typer.Option(help="continue from this head")] = None,
          class_balanced: Annotated[bool, typer.Option(
              help="weight windows n / (K * n_label): rare labels count as much as common")]
          = False,
          l2sp: Annotated[float | None, typer.Option(
              help="L2-SP pull toward the starting head (bundles exported with head.l2sp)")]
          = None,
          seed: int = 0):
    """Personalise a bundle's head on local data with the device runner (a subprocess)."""
    from edgetl import adapt as device

    rep = device.adapt(bundle, data, out, epochs=epochs, batch_size=batch_size,
                       val_fraction=val_fraction, lr=lr, seed=seed, head=head,
                       class_balanced=class_balanced, l2sp=l2sp, quiet=False)
    typer.echo(json.dumps({k: rep[k] for k in (
        "accuracy_before", "accuracy_after", "rolled_back", "n_train", "n_val",
        "feature_seconds", "train_seconds", "peak_rss_mb", "checkpoint")}, indent=2))


@app.command()
@user_errors
def run(recipe: RecipeArg = DEFAULT_RECIPE, out: OutOpt = Path("runs/har"),
        quiet: QuietOpt = False):
    """Run every stage of a recipe, then personalise each held-out user; print a summary."""
    _setup()

    from edgetl.pipeline import run_recipe
    from edgetl.report import run_tables

    s = run_recipe(_recipe(recipe), out, show=not quiet)
    con = _console()
    for t in run_tables(s):
        con.print(t)
    con.print(f"summary: {out / 'summary.json'}  plot: {out / s.plot}  "
              f"({s.totals['wall_seconds']:.0f} s)")


@app.command()
@user_errors
def personalise(recipe: RecipeArg = DEFAULT_RECIPE,
                bundle: Annotated[list[Path] | None, typer.Option(
                    help="bundle directory (repeat for several; default "
                         "runs/har/bundles/onnx-fp32)")] = None,
                users: Annotated[str | None, typer.Option(
                    help="comma-separated user ids (default: the recipe's device users; the "
                         "server-validation users tune adaptation without touching them)")] = None,
                stress: Annotated[bool, typer.Option(
                    help="also the stress protocols (time series: 'odd', the adaptation "
                         "session recorded with the phone turned, scored on the later "
                         "sessions), to choose defaults that survive unrepresentative "
                         "labelled data")] = False,
                out: OutOpt = Path("runs/har-devices"), quiet: QuietOpt = False):
    """Only the device stage: every held-out device personalises BUNDLE through the runner.

    Prints the per-device table, each protocol's totals, and the gate-level sweep (what each
    level of the device gate would have kept, and what it would have bought or cost): run it
    on the server-validation users to choose ``adapt.gate_alpha`` (and, for bundles with a
    replay set, ``adapt.gate_max_forget``).
    """
    from edgetl import gatelevel
    from edgetl.pipeline import personalise_bundle
    from edgetl.report import device_table, protocol_table

    ids = _int_list(users, "--users", "17,18") if users else None
    bundles = bundle or [Path("runs/har/bundles/onnx-fp32")]
    s = personalise_bundle(_recipe(recipe), bundles, out, users=ids, show=not quiet,
                           stress=stress)
    con = _console()
    con.print(device_table(s))
    if s.protocols:
        con.print(protocol_table(s))
    rows = s.devices + [r for rs in s.protocols.values() for r in rs]
    cal = gatelevel.calibrate(rows)
    alpha, bound = cal["alpha"], cal["max_forget"]
    bound_txt = "no replay check" if bound is None else f"replay bound {bound:g} pt"
    judged = "sessions, within and stress" if stress else "sessions and within"
    con.print(f"gate levels on these devices ({judged} protocols; {bound_txt}):")
    con.print(gatelevel.markdown(cal["levels"]))
    if cal["bounds"]:  # the replay check's bound, at the chosen level
        con.print(f"replay check at level {alpha:g} (points of accuracy on the bundle's replay "
                  "set an adapted head may lose):")
        con.print(gatelevel.markdown(cal["bounds"]))
    con.print(f"largest mean gain that hurts no device: level {alpha:g}, {bound_txt}")
    con.print(f"summary: {out / 'summary.json'}  plot: {out / s.plot}")


@app.command()
@user_errors
def bench(paths: Annotated[list[Path] | None, typer.Argument(
              help="run folders of `edgetl run` (their bundles/* and device data), or bundle "
                   "folders with --data/--eval")] = None,
          threads: Annotated[str, typer.Option(help="comma-separated thread counts")] = "1,2",
          repeats: Annotated[int, typer.Option(min=10, help="timed batch-1 calls per cell")]
          = 1000,
          epochs: Annotated[int, typer.Option(min=1, help="adaptation epochs (all methods)")]
          = 20,
          adapt_repeats: Annotated[int, typer.Option(
              min=1, help="runner processes per adaptation cell (the median is reported)")] = 3,
          data: Annotated[Path | None, typer.Option(
              help="local data to adapt on (default: the run's first device)")] = None,
          eval_data: Annotated[Path | None, typer.Option(
              "--eval", help="data to score before/after adaptation (default: the run's)")]
          = None,
          baselines: Annotated[bool, typer.Option(
              help="also run the PyTorch eager and ORT-training baselines")] = True,
          out: Annotated[Path | None, typer.Option("--out", "-o", help="where bench.json, "
                                                   "bench.md and tradeoff.png go (default: "
                                                   "the first path)")] = None):
    """Latency, throughput, adaptation cost, memory, size and accuracy of every bundle.

    In device-runner processes, against the PyTorch eager loop, ONNX Runtime training on the
    merged model and the machine's measured matmul peak.
    """
    from edgetl.bench import bench_bundles, markdown, write

    paths = paths or [Path("runs/har")]
    ts = _int_list(threads, "--threads", "1,2")
    res = bench_bundles(paths, threads=ts, repeats=repeats, epochs=epochs,
                        adapt_repeats=adapt_repeats, data=data, eval_data=eval_data,
                        baselines=baselines)
    j, m, png = write(res, out or paths[0])
    typer.echo(markdown(res))
    typer.echo(f"wrote {j}, {m} and {png}")


@app.command()
@user_errors
def methods(recipes: Annotated[list[Path] | None, typer.Argument(
                help="recipe TOMLs: a HAR recipe (cross-user) and/or the vision recipe "
                     "(Fashion-MNIST -> digits)")] = None,
            out: OutOpt = Path("runs/methods"),
            seeds: Annotated[str | None, typer.Option(
                help="comma-separated seeds (vision: one run per seed; default the recipe's "
                     "transfer.seeds)")] = None,
            kd: Annotated[bool, typer.Option(
                help="HAR: also train a teacher and distill it (same epochs as the source "
                     "model), for the KD gap-recovered line; otherwise it is read from "
                     "runs/<recipe>/summary.json when `edgetl run` wrote one")] = False,
            threads: Annotated[int, typer.Option(min=1, help="torch threads")] = 2,
            quiet: QuietOpt = False):
    """Transfer methods against the source-only baseline; writes methods.json and methods.md.

    L2-SP, EWC, AdaBN, DANN, MMD and CORAL, on the recipe's scenario (HAR cross-user or
    Fashion-MNIST -> digits).
    """
    _setup(threads)
    from edgetl.methods.compare import markdown, run_methods, write_report

    sd = _int_list(seeds, "--seeds", "0,1,2") if seeds else None
    results = []
    for path in recipes or [DEFAULT_RECIPE]:
        rec = _recipe(path)
        summary = Path("runs") / rec.name / "summary.json"
        results.append(run_methods(rec, seeds=sd, kd=kd, kd_summary=summary, show=not quiet))
    j, m = write_report(results, out)
    typer.echo(markdown(results))
    typer.echo(f"wrote {j} and {m}")


@app.command()
@user_errors
def fleet(bundle: Annotated[Path, typer.Argument(help="ONNX bundle whose head the fleet "
                                                 "improves")] = Path("runs/har/bundles/onnx-fp32"),
          recipe: Annotated[Path, typer.Option(help="recipe: its device users become the "
                                                    "fleet")] = DEFAULT_RECIPE,
          clients: Annotated[int, typer.Option(min=2, help="simulated devices (slices of the "
                                                           "held-out users)")] = 100,
          rounds: Annotated[int, typer.Option(min=1)] = 10,
          local_epochs: Annotated[int, typer.Option(min=1, help="head epochs per device and "
                                                                "round")] = 5,
          personal_epochs: Annotated[int, typer.Option(
              min=0, help="epochs of the per-device personalisation baseline")] = 30,
          strategy: Annotated[str, typer.Option(help="fedavg, or fedprox (head.l2sp bundles)")]
          = "fedavg",
          proximal_mu: Annotated[float, typer.Option(help="FedProx's mu")] = 0.0,
          seed: int = 0,
          sign_key: Annotated[Path | None, typer.Option(
              help="Ed25519 private key: sign the new bundle version (needed if the bundle is "
                   "signed)")] = None,
          out: OutOpt = Path("runs/fleet")):
    """Federated head training (Flower) over simulated devices; writes bundle version N+1.

    Devices send only head parameters and sample counts; writes fleet.json, fleet.md,
    fleet.png (accuracy per round: global vs shipped head vs per-device personalisation)
    and OUT/bundle-v<N+1>.
    """
    from edgetl.fleet import hapt_clients, markdown, run_fleet, server_val_windows

    r = _recipe(recipe)
    rep = run_fleet(bundle, hapt_clients(r, clients), out, rounds=rounds,
                    local_epochs=local_epochs, personal_epochs=personal_epochs,
                    strategy=strategy, proximal_mu=proximal_mu, seed=seed, sign_key=sign_key,
                    gate_data=server_val_windows(r, out / "gate" / "server_val.npz"))
    typer.echo(markdown(rep))
    typer.echo(f"wrote {out / 'fleet.json'}, {out / 'fleet.md'}, {out / 'fleet.png'}"
               + (f" and {rep['new_bundle']}" if rep["published"] else
                  " (no new bundle: the aggregated head did not pass the gate)"))


if __name__ == "__main__":  # pragma: no cover
    app()
