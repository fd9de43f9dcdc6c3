"""The arm64 root filesystem: debootstrap under qemu, the device venv, mounts, cached tarball."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from tools.pi.common import QEMU_CPU, RUNNERS, SUITE, PiError, run_cmd, say
from tools.pi.host import AptSource, chroot_pip_env, host_ca_bundle, host_pip_config, sources_deb822

#: Bump when the rootfs recipe changes: the cache key includes it.
ROOTFS_VERSION = 1
#: No ca-certificates package: the host's CA bundle is copied in (its emulated postinst alone
#: takes minutes).
DEBIAN_PACKAGES = ("python3", "python3-venv")
#: Device requirement files installed in the chroot venv (Pillow: image bundles).
REQUIREMENTS = ("requirements.txt", "requirements-litert.txt")
EXTRA_DEVICE_PACKAGES = ("pillow",)
VENV = "/opt/edgetl"
_PROBE = ("import importlib.metadata as md, json, os, platform, sys\n"
          "import numpy, onnxruntime, ai_edge_litert.interpreter\n"
          "v = {p: md.version(p) for p in ('numpy', 'onnxruntime', 'ai-edge-litert')}\n"
          "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),"
          " 'libc': ' '.join(platform.libc_ver()), 'qemu_cpu': os.environ.get('QEMU_CPU'),"
          " 'versions': v}))\n")


def make_fake_sys(dest: Path, cpus: str) -> Path:
    """A minimal ``/sys`` with only ``devices/system/cpu/{possible,present,online}``.

    Under qemu-user 7.2, onnxruntime (>= 1.29) crashes at import when it can scan the host's
    ``/sys/devices``; this is all it needs to size its thread pool.
    """
    if not cpus or not all(c.isdigit() or c in ",-" for c in cpus):
        raise ValueError(f"cpus must be a Linux cpu list such as '0-3', got {cpus!r}")
    cpu = dest / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpu / name).write_text(cpus + "\n")
    return dest


def rootfs_key(mirror: str, requirements: str, constraints: str) -> str:
    """Cache key of a rootfs: recipe version, mirror and exactly what the venv installs."""
    h = hashlib.sha256(json.dumps([ROOTFS_VERSION, SUITE, QEMU_CPU, DEBIAN_PACKAGES, mirror,
                                   requirements, constraints]).encode())
    return h.hexdigest()[:12]


def _mounts_under(root: Path) -> list[str]:
    base = str(root.resolve())
    points = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()]
    return [p for p in points if p == base or p.startswith(base + "/")]


def remove_tree(root: Path) -> None:
    """``rm -rf root``, refused while anything is still mounted under it (/dev!)."""
    if not root.exists():
        return
    left = _mounts_under(root)
    if left:
        raise PiError(f"not deleting {root}: still mounted: {', '.join(left)}; unmount them "
                      "(umount -l) and delete it by hand")
    shutil.rmtree(root)


@contextmanager
def mounted(root: Path, fake_sys: Path, log: Path):
    """``/proc``, ``/dev`` (bind) and the fake ``/sys`` mounted in ``root``; unmounted after."""
    done = []
    try:
        for args, point in ((["-t", "proc", "proc"], "proc"), (["--bind", "/dev"], "dev"),
                            (["--bind", str(fake_sys)], "sys")):
            target = root / point
            target.mkdir(exist_ok=True)
            run_cmd(["mount", *args, str(target)], log=log)
            done.append(target)
        yield root
    finally:
        for target in reversed(done):
            if subprocess.run(["umount", str(target)], check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(target)], check=False)


def chroot_env(cpu: str, extra: dict | None = None) -> dict[str, str]:
    """A clean environment for processes in the chroot (nothing of the host's leaks in)."""
    return {"PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": "/root", "LANG": "C.UTF-8", "QEMU_CPU": cpu,
            "PYTHONDONTWRITEBYTECODE": "1", **(extra or {})}


def build_rootfs(root: Path, *, mirror: str, sources: list[AptSource], constraints: str,
                 log: Path, cpu: str, fake_sys: Path) -> None:
    """Run debootstrap --foreign, its second stage under qemu, add host CA certs and the venv."""
    say(f"debootstrap --foreign arm64 {SUITE} from {mirror}")
    run_cmd(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase",
          f"--include={','.join(DEBIAN_PACKAGES)}", SUITE, str(root), mirror], log=log)
    qemu = shutil.which("qemu-aarch64-static")
    if qemu:  # for binfmt entries without the F (fix-binary) flag
        shutil.copy2(qemu, root / "usr/bin/qemu-aarch64-static")
    say("debootstrap second stage (emulated; the slow part)")
    run_cmd(["chroot", str(root), "/debootstrap/debootstrap", "--second-stage"], log=log,
         env=chroot_env(cpu))
    (root / "etc/apt/sources.list").write_text(
        "# see /etc/apt/sources.list.d/debian.sources (the host's mirrors)\n")
    (root / "etc/apt/sources.list.d/debian.sources").write_text(sources_deb822(sources))
    pip_cfg = host_pip_config()
    (root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
    shutil.copy2(host_ca_bundle(pip_cfg, dict(os.environ)),
                 root / "etc/ssl/certs/ca-certificates.crt")
    for f in ("/etc/resolv.conf", "/etc/hosts"):
        if Path(f).is_file():
            (root / f[1:]).unlink(missing_ok=True)
            shutil.copy2(f, root / f[1:])
    tmp = root / "tmp/edgetl-req"
    tmp.mkdir(parents=True, exist_ok=True)
    for r in REQUIREMENTS:
        shutil.copy2(RUNNERS / r, tmp / r)
    (tmp / "extra.txt").write_text("\n".join(EXTRA_DEVICE_PACKAGES) + "\n")
    (tmp / "constraints.txt").write_text(constraints)
    reqs = [a for r in (*REQUIREMENTS, "extra.txt") for a in ("-r", f"/tmp/edgetl-req/{r}")]
    env = chroot_env(cpu, chroot_pip_env(pip_cfg, dict(os.environ)))
    say(f"venv {VENV} with the device requirements (pip, emulated)")
    run_cmd(["chroot", str(root), "/usr/bin/python3", "-m", "venv", VENV], log=log, env=env)
    run_cmd(["chroot", str(root), f"{VENV}/bin/pip", "install", "--no-cache-dir",
          "--only-binary=:all:", "-c", "/tmp/edgetl-req/constraints.txt", *reqs], log=log,
         env=env)
    shutil.rmtree(tmp)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / junk).glob("*"):
            if p.is_file():
                p.unlink()
    with mounted(root, fake_sys, log):
        probe(root, cpu, log)  # fails the build, not a later run, when the runtimes cannot load


def probe(root: Path | None, cpu: str, log: Path) -> dict:
    """Import numpy and both runtimes; report machine, libc and versions (JSON)."""
    cmd = ([sys.executable] if root is None
           else ["chroot", str(root), f"{VENV}/bin/python"]) + ["-c", _PROBE]
    p = run_cmd(cmd, env=None if root is None else chroot_env(cpu), capture=True, check=False)
    with log.open("a") as f:
        f.write(f"\n$ probe ({'host' if root is None else 'chroot'})\n{p.stdout}{p.stderr}")
    if p.returncode != 0:
        raise PiError(f"importing numpy / onnxruntime / ai-edge-litert failed "
                      f"({'host' if root is None else 'aarch64 chroot'}, exit {p.returncode}): "
                      f"{(p.stderr or '').strip()[-800:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _compressor() -> tuple[list[str], str]:
    if shutil.which("zstd"):
        return ["--use-compress-program", "zstd -T0 -6"], ".tar.zst"
    return ["-z"], ".tar.gz"


def cached_tarball(cache: Path, key: str) -> Path | None:
    """The cached rootfs of ``key``, if present."""
    for ext in (".tar.zst", ".tar.gz"):
        p = cache / f"rootfs-{SUITE}-arm64-{key}{ext}"
        if p.is_file():
            return p
    return None


def save_tarball(root: Path, cache: Path, key: str, log: Path) -> Path:
    """Compress ``root`` into the cache (atomically) and drop rootfs tarballs of other keys."""
    flags, ext = _compressor()
    final = cache / f"rootfs-{SUITE}-arm64-{key}{ext}"
    tmp = final.with_name(final.name + ".part")
    run_cmd(["tar", "-C", str(root), *flags, "--numeric-owner", "--exclude=./proc/*",
          "--exclude=./sys/*", "--exclude=./dev/*", "-cf", str(tmp), "."], log=log)
    os.replace(tmp, final)
    for old in cache.glob(f"rootfs-{SUITE}-arm64-*"):
        if old != final:
            old.unlink()
    return final


def restore_tarball(tarball: Path, root: Path, log: Path) -> None:
    """Unpack a cached rootfs into ``root``."""
    flags = ["--use-compress-program", "zstd -d"] if tarball.suffix == ".zst" else ["-z"]
    root.mkdir(parents=True)
    run_cmd(["tar", "-C", str(root), *flags, "--numeric-owner", "-xpf", str(tarball)], log=log)
