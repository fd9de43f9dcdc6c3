"""The runner suite on both machines: bundles and device data, the commands, the whole check."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgetl.tolerances import PI_TOLERANCE
from tools.pi.common import QEMU_CPU, ROOT, RUNNERS, SUITE, PiError, run_cmd, say
from tools.pi.compare import compare_bundle, load_side, summary_markdown
from tools.pi.host import (
    AptSource,
    debian_mirror,
    debian_sources,
    device_constraints,
    ensure_binfmt,
    ensure_host_tools,
    host_apt_sources,
    host_cpus,
    preflight,
)
from tools.pi.rootfs import (
    EXTRA_DEVICE_PACKAGES,
    REQUIREMENTS,
    VENV,
    build_rootfs,
    cached_tarball,
    chroot_env,
    make_fake_sys,
    mounted,
    probe,
    remove_tree,
    restore_tarball,
    rootfs_key,
    save_tarball,
)

WORK = "/work"
BUNDLE_NAMES = ("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8")
# Runs the runner with an assertion on the machine it runs on (argv: machine, run.py, args).
_WRAP = ("import platform, runpy, sys\n"
         "m = platform.machine()\n"
         "if m != sys.argv[1]: sys.exit(f'error: expected {sys.argv[1]}, running on {m}')\n"
         "sys.argv = sys.argv[2:]\n"
         "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def make_bundles(out: Path, *, user: int = 21, epochs: int = 2) -> tuple[Path, Path, Path]:
    """A small real run: a HAR student trained briefly on HAPT, its four bundles, device data.

    The recipe is ``models/har/recipe.toml`` with ``epochs`` of teacher and student training
    (~20 s on 2 cores); every export runs its own parity and accuracy checks. Device data is
    held-out ``user``'s first session (``adapt.npz``) and later sessions (``eval.npz``).
    """
    from edgetl import stages
    from edgetl.config import TrainConfig, load_recipe
    from edgetl.kinds.timeseries import write_device_files

    r = load_recipe(ROOT / "models/har/recipe.toml")
    quick = TrainConfig(epochs=epochs, batch_size=128, lr=0.005)
    r = dataclasses.replace(r, pretrain=dataclasses.replace(quick, epochs=1),
                            student_train=quick)
    sd = stages.server_data(r)
    teacher = stages.pretrain(r, out / "server", data=sd, show=False)
    student = stages.distill_student(r, teacher.path, out / "server", data=sd, baseline=False,
                                     show=False)["student"]
    bundles = out / "bundles"
    for name in BUNDLE_NAMES:
        target, precision = name.split("-")
        stages.export(student.path, bundles / name, r, target=target, precision=precision,
                      data=sd)
    adapt, ev = write_device_files(sd.source, user, out / "data")
    return bundles, adapt, ev


def suite_commands(bundle: str, *, epochs: int, seed: int) -> list[tuple[str, list[str]]]:
    """The runner commands run on both machines for one bundle, paths relative to the work dir.

    One thread, so that both runs sum in the same order as far as the runtimes allow.
    """
    b, o = f"bundles/{bundle}", f"out/{bundle}"
    return [("selftest", ["selftest", b, "--threads", "1", "--json", "--quiet"]),
            ("adapt", ["adapt", b, "--data", "data/adapt.npz", "--out", f"{o}/state",
                       "--epochs", str(epochs), "--seed", str(seed), "--threads", "1",
                       "--json", "--quiet"]),
            ("infer", ["infer", b, "--data", "data/eval.npz", "--head", f"{o}/state/head.npz",
                       "--out", f"{o}/infer", "--threads", "1", "--json", "--quiet"])]


def stage_work(work: Path, bundles: list[Path], adapt: Path, ev: Path) -> None:
    """Lay out runner, bundles and data in ``work`` (the same on both machines)."""
    shutil.copytree(RUNNERS, work / "device_runners",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for b in bundles:
        shutil.copytree(b, work / "bundles" / b.name)
    (work / "data").mkdir(parents=True)
    shutil.copy2(adapt, work / "data/adapt.npz")
    shutil.copy2(ev, work / "data/eval.npz")


def run_suite(prefix: list[str], cwd_arg: str, host_work: Path, bundles: list[str], *,
              machine: str, env: dict | None, epochs: int, seed: int, log: Path) -> dict:
    """Run every command of :func:`suite_commands` for every bundle; return seconds per step.

    ``prefix`` starts the Python of the machine under test; ``cwd_arg`` is the work dir as
    that Python sees it (the runner runs there), ``host_work`` the same dir seen from here.
    """
    seconds = {}
    for name in bundles:
        (host_work / "out" / name).mkdir(parents=True, exist_ok=True)
        for step, args in suite_commands(name, epochs=epochs, seed=seed):
            code = f"import os; os.chdir({cwd_arg!r})\n" + _WRAP
            cmd = [*prefix, "-c", code, machine, "device_runners/run.py", *args]
            t0 = time.perf_counter()
            p = run_cmd(cmd, env=env, capture=True, check=False)
            seconds[f"{name}/{step}"] = round(time.perf_counter() - t0, 2)
            with log.open("a") as f:
                f.write(f"\n$ [{machine}] run.py {shlex.join(args)}\n{p.stderr}")
            if p.returncode != 0:
                raise PiError(f"{machine}: run.py {shlex.join(args)} exited {p.returncode}: "
                              f"{p.stderr.strip()[-800:]}")
            if step == "selftest":
                (host_work / "out" / name / "selftest.json").write_text(p.stdout)
        say(f"{machine}: {name} selftest, adapt, infer ok")
    return seconds


@dataclasses.dataclass(frozen=True)
class PiConfig:
    """Options of :func:`run_pi_check`."""

    out: Path
    cache: Path
    bundles: Path | None = None
    mirror: str | None = None
    cpu: str = QEMU_CPU
    epochs: int = 30
    seed: int = 0
    rebuild: bool = False

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")


def _find_bundles(folder: Path) -> list[Path]:
    found = [folder / n for n in BUNDLE_NAMES if (folder / n / "manifest.json").is_file()]
    found = found or sorted(p.parent for p in folder.glob("*/manifest.json"))
    if not found:
        raise PiError(f"no bundles in {folder}: pass a folder of bundle folders, such as "
                      "runs/har/bundles (written by `make demo`)")
    return found


def run_pi_check(cfg: PiConfig) -> dict:
    """Build or reuse the arm64 rootfs, run both suites, compare; write the summary."""
    t_start = time.perf_counter()
    why = preflight()
    if why:
        raise PiError(f"cannot run the emulated aarch64 check here: {why}")
    out, cache = cfg.out.resolve(), cfg.cache.expanduser().resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cache.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    ensure_host_tools(log)
    binfmt_flags = ensure_binfmt(log)
    sources = debian_sources(host_apt_sources())
    mirror = cfg.mirror or debian_mirror(sources)
    if cfg.mirror:
        sources = [AptSource(cfg.mirror, (SUITE,), ("main",))]
    req_text = "".join((RUNNERS / r).read_text() for r in REQUIREMENTS) + "\n".join(
        EXTRA_DEVICE_PACKAGES)
    constraints = device_constraints((ROOT / "constraints.txt").read_text(), np.__version__)
    key = rootfs_key(mirror, req_text, constraints)
    timings["host_setup_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if cfg.bundles:
        bundles = _find_bundles(cfg.bundles)
        data_dir = out / "data"
        from edgetl.data import hapt
        from edgetl.kinds.timeseries import write_device_files
        adapt, ev = write_device_files(hapt.load_hapt(), 21, data_dir)
        source = f"existing bundles in {cfg.bundles}"
    else:
        say("training a small HAR student on HAPT and exporting four bundles")
        bdir, adapt, ev = make_bundles(out / "build")
        bundles = _find_bundles(bdir)
        source = "HAR student, 2 epochs on HAPT users 1-16 (teacher 1 epoch), models/har recipe"
    names = [b.name for b in bundles]
    timings["bundles_s"] = time.perf_counter() - t0

    x86 = out / "x86_64"
    stage_work(x86, bundles, adapt, ev)
    t0 = time.perf_counter()
    host_probe = probe(None, cfg.cpu, log)
    host_secs = run_suite([sys.executable], str(x86), x86, names, machine="x86_64",
                          env={**os.environ, "PYTHONPATH": ""}, epochs=cfg.epochs,
                          seed=cfg.seed, log=log)
    timings["x86_64_suite_s"] = time.perf_counter() - t0

    tmp = Path(tempfile.mkdtemp(prefix="edgetl-pi-", dir=cache))
    root, fake_sys = tmp / "rootfs", make_fake_sys(tmp / "sys", host_cpus())
    try:
        t0 = time.perf_counter()
        tarball = None if cfg.rebuild else cached_tarball(cache, key)
        if tarball:
            say(f"reusing {tarball} ({tarball.stat().st_size / 2**20:.0f} MiB)")
            restore_tarball(tarball, root, log)
            timings["rootfs_restore_s"] = time.perf_counter() - t0
            rootfs = {"built": False}
        else:
            say(f"building the arm64 {SUITE} rootfs (first time: ~5-7 min)")
            build_rootfs(root, mirror=mirror, sources=sources, constraints=constraints,
                         log=log, cpu=cfg.cpu, fake_sys=fake_sys)
            timings["rootfs_build_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            tarball = save_tarball(root, cache, key, log)
            timings["rootfs_compress_s"] = time.perf_counter() - t1
            rootfs = {"built": True}
        rootfs.update(tarball=str(tarball), tarball_mib=round(tarball.stat().st_size / 2**20),
                      key=key, mirror=mirror, suite=SUITE, binfmt=binfmt_flags)

        arm_work = root / WORK.lstrip("/")
        stage_work(arm_work, bundles, adapt, ev)
        t0 = time.perf_counter()
        with mounted(root, fake_sys, log):
            arm_probe = probe(root, cfg.cpu, log)
            if arm_probe["machine"] != "aarch64":
                raise PiError(f"the chroot runs on {arm_probe['machine']}, not aarch64")
            arm_secs = run_suite(["chroot", str(root), f"{VENV}/bin/python"], WORK, arm_work,
                                 names, machine="aarch64", env=chroot_env(cfg.cpu),
                                 epochs=cfg.epochs, seed=cfg.seed, log=log)
        timings["aarch64_suite_s"] = time.perf_counter() - t0
        shutil.copytree(arm_work / "out", out / "aarch64" / "out")
    finally:
        remove_tree(tmp)
    shutil.rmtree(x86 / "device_runners")

    checks, rows = [], []
    for name, b in zip(names, bundles, strict=True):
        prec = json.loads((b / "manifest.json").read_text())["precision"]
        ref, arm = load_side(x86 / "out" / name), load_side(out / "aarch64" / "out" / name)
        cs = compare_bundle(name, PI_TOLERANCE[prec], ref, arm)
        checks += cs
        rows.append({"bundle": name, "precision": prec, "backend": arm["adapt"]["backend"],
                     "backend_version": arm["adapt"]["backend_version"],
                     "ok": all(c.ok for c in cs),
                     "selftest_err": {"x86_64": ref["selftest"]["max_abs_err"],
                                      "aarch64": arm["selftest"]["max_abs_err"]},
                     "accuracy": {"x86_64": ref["infer"].get("accuracy"),
                                  "aarch64": arm["infer"].get("accuracy")},
                     "emulated_adapt_s": arm["adapt"]["total_seconds"],
                     "x86_64_adapt_s": ref["adapt"]["total_seconds"]})
    timings["total_s"] = time.perf_counter() - t_start
    summary = {"ok": all(c.ok for c in checks), "bundles_from": source,
               "host": host_probe, "aarch64": arm_probe, "qemu_cpu": cfg.cpu, "rootfs": rootfs,
               "epochs": cfg.epochs, "seed": cfg.seed,
               "tolerances": {k: dataclasses.asdict(v) for k, v in PI_TOLERANCE.items()},
               "rows": rows, "checks": [dataclasses.asdict(c) for c in checks],
               "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "command_s": {"x86_64": host_secs, "aarch64": arm_secs}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary
