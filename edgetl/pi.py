"""``make test-pi``: the device runners on Linux aarch64 (Raspberry Pi OS 64-bit), under qemu.

An arm64 Debian bookworm root filesystem (debootstrap ``--foreign``, second stage under
qemu-user-static; Python 3.11 from Debian; a venv holding only the device requirements) is
built once and cached as a compressed tarball outside the repository
(``$EDGETL_PI_CACHE``, default ``$EDGETL_CACHE/pi``). The driver then

1. trains a small real HAR student (HAPT, a few epochs) and exports the four bundles
   ``{onnx,tflite}-{fp32,int8}``, plus one held-out user's first session (adapt) and later
   sessions (infer) as device data — or takes existing bundles (``--bundles``);
2. runs ``selftest``, ``adapt`` and ``infer`` of ``device_runners/run.py`` on this x86_64
   host and, with the same files copied into the chroot, on emulated aarch64
   (``QEMU_CPU=cortex-a72``, a Pi 4), every runner process asserting its
   ``platform.machine()``;
3. compares the two runs within ``edgetl.tolerances.PI_TOLERANCE`` and keeps every report
   under ``--out`` (``summary.json``, ``summary.md``, ``x86_64/``, ``aarch64/``).

Run as root (debootstrap, chroot, mount). ``python -m edgetl.pi --preflight`` says whether
this machine can run it (exit 0) or why not (exit 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.tolerances import PI_TOLERANCE, PiTolerance

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ROOT / "device_runners"
#: Bump when the rootfs recipe changes: the cache key includes it.
ROOTFS_VERSION = 1
SUITE = "bookworm"
#: No ca-certificates package: the host's CA bundle is copied in (its emulated postinst alone
#: takes minutes).
DEBIAN_PACKAGES = ("python3", "python3-venv")
HOST_PACKAGES = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap",
                 "update-binfmts": "binfmt-support"}
#: Device requirement files installed in the chroot venv (Pillow: image bundles).
REQUIREMENTS = ("requirements.txt", "requirements-litert.txt")
EXTRA_DEVICE_PACKAGES = ("pillow",)
VENV = "/opt/edgetl"
WORK = "/work"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_CPU = "cortex-a72"
BUNDLE_NAMES = ("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8")
SKIP = 3  # --preflight exit code: this machine cannot run the emulated check

# Runs the runner with an assertion on the machine it runs on (argv: machine, run.py, args).
_WRAP = ("import platform, runpy, sys\n"
         "m = platform.machine()\n"
         "if m != sys.argv[1]: sys.exit(f'error: expected {sys.argv[1]}, running on {m}')\n"
         "sys.argv = sys.argv[2:]\n"
         "runpy.run_path(sys.argv[0], run_name='__main__')\n")
_PROBE = ("import importlib.metadata as md, json, os, platform, sys\n"
          "import numpy, onnxruntime, ai_edge_litert.interpreter\n"
          "v = {p: md.version(p) for p in ('numpy', 'onnxruntime', 'ai-edge-litert')}\n"
          "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),"
          " 'libc': ' '.join(platform.libc_ver()), 'qemu_cpu': os.environ.get('QEMU_CPU'),"
          " 'versions': v}))\n")


class PiError(EdgetlError):
    """The emulated aarch64 check could not be set up or run; the message says what to do."""


# ---------------------------------------------------------------- host configuration (pure)

@dataclasses.dataclass(frozen=True)
class AptSource:
    """One ``deb`` entry of the host's apt configuration."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


def parse_apt_sources(text: str, *, deb822: bool) -> list[AptSource]:
    """``deb`` entries of a one-line ``sources.list`` or a deb822 ``.sources`` file.

    ``deb-src`` entries, disabled stanzas (``Enabled: no``) and options are skipped.
    """
    out = []
    if not deb822:
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) >= 3 and words[0] == "deb":
                if words[1].startswith("["):  # [arch=amd64 signed-by=...] options
                    while words and not words[0].endswith("]"):
                        words.pop(0)
                    words.pop(0)
                    words.insert(0, "deb")
                out.append(AptSource(words[1], (words[2],), tuple(words[3:])))
        return out
    for stanza in text.split("\n\n"):
        f = {}
        for line in stanza.splitlines():
            if line.strip() and not line.startswith(("#", " ", "\t")) and ":" in line:
                k, v = line.split(":", 1)
                f[k.strip().lower()] = v.strip()
        if "deb" in f.get("types", "").split() and f.get("enabled", "yes").lower() != "no":
            for uri in f.get("uris", "").split():
                out.append(AptSource(uri, tuple(f.get("suites", "").split()),
                                     tuple(f.get("components", "").split())))
    return out


def host_apt_sources(etc: Path = Path("/etc/apt")) -> list[AptSource]:
    """Every enabled ``deb`` entry of the host (``sources.list`` and ``sources.list.d``)."""
    found = []
    if (etc / "sources.list").is_file():
        found += parse_apt_sources((etc / "sources.list").read_text(), deb822=False)
    for p in sorted((etc / "sources.list.d").glob("*")):
        if p.suffix in (".list", ".sources"):
            found += parse_apt_sources(p.read_text(), deb822=p.suffix == ".sources")
    return found


def debian_sources(sources: list[AptSource], suite: str = SUITE) -> list[AptSource]:
    """The entries serving ``suite`` and its ``-updates`` / ``-security`` pockets."""
    keep = []
    for s in sources:
        suites = tuple(x for x in s.suites if x == suite or x.startswith(f"{suite}-"))
        if suites and "main" in s.components:
            keep.append(AptSource(s.uri, suites, ("main",)))
    return keep


def debian_mirror(sources: list[AptSource], suite: str = SUITE) -> str:
    """The mirror debootstrap fetches ``suite`` from: the host's entry for it."""
    for s in debian_sources(sources, suite):
        if suite in s.suites:
            return s.uri
    raise PiError(f"no apt source of the host serves Debian {suite} main (looked in "
                  "/etc/apt/sources.list and /etc/apt/sources.list.d); pass --mirror URL, "
                  "e.g. --mirror http://deb.debian.org/debian")


def sources_deb822(sources: list[AptSource]) -> str:
    """A deb822 ``debian.sources`` for the chroot (architecture-free, arm64 on this mirror)."""
    return "\n".join(f"Types: deb\nURIs: {s.uri}\nSuites: {' '.join(s.suites)}\n"
                     f"Components: {' '.join(s.components)}\n"
                     "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
                     for s in sources)


def parse_pip_config(text: str) -> dict[str, str]:
    """``pip config list`` lines (``section.key='value'``) → ``{key: value}``.

    Environment values (section ``:env:``) override ``global`` ones, as they do in pip.
    """
    found: dict[str, tuple[int, str]] = {}
    rank = {":env:": 2, "global": 1, "install": 1, "download": 0}
    for line in text.splitlines():
        if "=" not in line or "." not in line.split("=", 1)[0]:
            continue
        key, value = line.split("=", 1)
        section, name = key.split(".", 1)
        r = rank.get(section, 0)
        if name not in found or r >= found[name][0]:
            found[name] = (r, value.strip().strip("'\""))
    return {k: v for k, (_, v) in found.items()}


def chroot_pip_env(config: dict[str, str], environ: dict[str, str]) -> dict[str, str]:
    """What pip in the chroot needs to reach the index the host's pip reaches.

    Network indexes, trusted hosts, timeouts and proxies are forwarded; local paths and
    ``file://`` indexes (which the chroot does not have) are dropped. The certificate bundle
    is always the host's, copied to the chroot's system path.
    """
    env = {"PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for name in ("index-url", "extra-index-url"):
        urls = [u for u in config.get(name, "").split() if u.startswith(("http://", "https://"))]
        if urls:
            env["PIP_" + name.upper().replace("-", "_")] = " ".join(urls)
    for name in ("trusted-host", "default-timeout", "timeout", "proxy", "retries"):
        if config.get(name):
            env["PIP_" + name.upper().replace("-", "_")] = config[name]
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "NO_PROXY"):
        if environ.get(name):
            env[name] = environ[name]
    return env


def host_pip_config() -> dict[str, str]:
    """The host pip's effective settings (``pip config list``, environment included)."""
    p = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                       text=True, check=False)
    return parse_pip_config(p.stdout or "")


def host_ca_bundle(config: dict[str, str], environ: dict[str, str]) -> Path:
    """The CA bundle the host's pip trusts (``cert`` in its config, else the system one)."""
    for c in (config.get("cert"), environ.get("SSL_CERT_FILE"),
              "/etc/ssl/certs/ca-certificates.crt"):
        if c and Path(c).is_file():
            return Path(c)
    raise PiError("no CA certificate bundle found on the host (pip's `cert`, $SSL_CERT_FILE, "
                  "/etc/ssl/certs/ca-certificates.crt): install ca-certificates")


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


def host_cpus() -> str:
    """The host's online cpu list (what the emulated runner really has)."""
    p = Path("/sys/devices/system/cpu/online")
    return p.read_text().strip() if p.is_file() else f"0-{(os.cpu_count() or 1) - 1}"


def device_constraints(constraints: str, numpy_version: str) -> str:
    """The repository's pins plus numpy at the host's version, so both runs share numpy."""
    lines = [ln for ln in constraints.splitlines() if not ln.strip().startswith("numpy")]
    return "\n".join(lines + [f"numpy=={numpy_version}", ""])


def rootfs_key(mirror: str, requirements: str, constraints: str) -> str:
    """Cache key of a rootfs: recipe version, mirror and exactly what the venv installs."""
    h = hashlib.sha256(json.dumps([ROOTFS_VERSION, SUITE, QEMU_CPU, DEBIAN_PACKAGES, mirror,
                                   requirements, constraints]).encode())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------- comparing the two runs (pure)

@dataclasses.dataclass(frozen=True)
class Check:
    """One x86_64-vs-aarch64 comparison: a measured value against its limit."""

    bundle: str
    name: str
    value: float
    limit: float
    ok: bool
    detail: str = ""
    measured: bool = True  # False: a yes/no check (value and limit mean nothing)


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def compare_bundle(bundle: str, tol: PiTolerance, ref: dict, arm: dict) -> list[Check]:
    """Compare one bundle's aarch64 results with the x86_64 ones.

    ``ref`` / ``arm`` hold ``selftest`` (the runner's JSON), ``adapt`` (report.json),
    ``head`` (``{name: array}`` of head.npz) and ``infer`` (predictions.json).
    """
    checks = []

    def add(name, value, limit, ok=None, detail="", measured=None):
        measured = ok is None if measured is None else measured
        ok = value <= limit * (1 + 1e-9) if ok is None else ok  # 100 * (0.99 - 0.98) > 1
        checks.append(Check(bundle, name, float(value), float(limit), bool(ok), detail,
                            measured))

    ra, aa = ref["adapt"], arm["adapt"]
    add("selftest passes on aarch64", 0, 0, bool(arm["selftest"].get("ok")),
        f"max abs err {arm['selftest'].get('max_abs_err', float('nan')):.2g} "
        f"(x86_64 {ref['selftest'].get('max_abs_err', float('nan')):.2g})")
    names = sorted(set(ref["head"]) | set(arm["head"]))
    worst, where = 0.0, ""
    for n in names:
        if n not in ref["head"] or n not in arm["head"]:
            worst, where = float("inf"), f"{n} missing on one side"
            break
        r = np.asarray(ref["head"][n])
        if not np.issubdtype(r.dtype, np.number):
            continue
        scale = max(1.0, float(np.max(np.abs(r)))) if r.size else 1.0
        d = _max_abs(r, arm["head"][n]) / scale
        if d > worst:
            worst, where = d, n
    add("adapted head, max |Δ| / max(1, |w|)", worst, tol.head_atol, detail=where)
    lr = [h["loss"] for h in ra.get("history", [])]
    la = [h["loss"] for h in aa.get("history", [])]
    add("train loss per epoch, max |Δ|", _max_abs(lr, la) if len(lr) == len(la) else np.inf,
        tol.loss_atol, detail=f"{len(la)} epochs (x86_64 {len(lr)})")
    for key in ("accuracy_before", "accuracy_after"):
        add(f"validation {key.split('_')[1]}, |Δ| points",
            100 * abs(ra[key] - aa[key]), tol.accuracy_points,
            detail=f"{aa[key]:.4f} (x86_64 {ra[key]:.4f})")
    add("same keep/roll-back decision", 0, 0, ra["rolled_back"] == aa["rolled_back"],
        f"rolled back: {aa['rolled_back']} (x86_64 {ra['rolled_back']})")
    pr, pa = ref["infer"]["predictions"], arm["infer"]["predictions"]
    same = len(pr) == len(pa) and len(pr) > 0
    agree = sum(a == b for a, b in zip(pr, pa, strict=True)) / len(pr) if same else 0.0
    add("infer predictions identical, fraction (min)", agree, tol.min_agreement,
        agree >= tol.min_agreement, f"{len(pa)} windows", measured=True)
    if "accuracy" in ref["infer"]:
        ir, ia = ref["infer"]["accuracy"], arm["infer"].get("accuracy", float("nan"))
        add("infer accuracy, |Δ| points", 100 * abs(ir - ia), tol.accuracy_points,
            detail=f"{ia:.4f} (x86_64 {ir:.4f})")
    return checks


def load_side(folder: Path) -> dict:
    """The results a suite run left in ``folder`` (one bundle), for :func:`compare_bundle`."""
    with np.load(folder / "state" / "head.npz", allow_pickle=False) as z:
        head = {k: z[k] for k in z.files}
    return {"selftest": json.loads((folder / "selftest.json").read_text()),
            "adapt": json.loads((folder / "state" / "report.json").read_text()),
            "infer": json.loads((folder / "infer" / "predictions.json").read_text()),
            "head": head}


# ---------------------------------------------------------------- running commands

def _say(msg: str) -> None:
    print(f"[test-pi] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], *, log: Path | None = None, env: dict | None = None,
         check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``cmd``; with ``log``, append its output there (and show the tail on failure)."""
    kw: dict = {"env": env, "text": True}
    if capture:
        kw.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elif log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"\n$ {shlex.join(cmd)}\n")
        kw.update(stdout=log.open("a"), stderr=subprocess.STDOUT)
    p = subprocess.run(cmd, check=False, **kw)
    if check and p.returncode != 0:
        tail = (p.stderr or "") if capture else (
            "".join(log.read_text().splitlines(True)[-25:]) if log else "")
        raise PiError(f"`{shlex.join(cmd)}` exited {p.returncode}"
                      + (f"; last output:\n{tail}" if tail else ""))
    return p


# ---------------------------------------------------------------- host preparation

def preflight() -> str | None:
    """Why this machine cannot run the emulated check, or None when it can."""
    if os.environ.get("EDGETL_SKIP_PI"):
        return "EDGETL_SKIP_PI is set"
    if sys.platform != "linux":
        return f"needs Linux (qemu-user binfmt_misc, chroot); this is {sys.platform}"
    if platform.machine() != "x86_64":
        return (f"compares an emulated aarch64 run with an x86_64 one; this host is "
                f"{platform.machine()}")
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot and mount); run it as root or in a root container"
    missing = [pkg for tool, pkg in HOST_PACKAGES.items() if not shutil.which(tool)]
    if missing and not shutil.which("apt-get"):
        return f"needs the Debian packages {' '.join(missing)} and there is no apt-get"
    if not (BINFMT / "register").exists():
        if not BINFMT.is_dir():
            return f"the kernel has no binfmt_misc ({BINFMT} is missing)"
        r = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            return f"binfmt_misc cannot be mounted here ({r.stderr.strip() or r.returncode})"
    if not any(default_cache().glob(f"rootfs-{SUITE}-arm64-*.tar.*")):
        try:
            mirror = debian_mirror(debian_sources(host_apt_sources()))
        except PiError as e:
            return str(e)
        index = chroot_pip_env(host_pip_config(), dict(os.environ)).get(
            "PIP_INDEX_URL", "https://pypi.org/simple/").split()[0]
        for url in (f"{mirror.rstrip('/')}/dists/{SUITE}/Release", index):
            if not reachable(url):
                return (f"no cached rootfs in {default_cache()} and {url} is unreachable "
                        "(the first build needs the Debian mirror and PyPI)")
    return None


def reachable(url: str, timeout: float = 10.0) -> bool:
    """Whether an HTTP(S) HEAD request to ``url`` gets an answer (any status below 500)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=timeout):
            return True
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


def ensure_host_tools(log: Path) -> None:
    """Install qemu-user-static, debootstrap and binfmt-support from the host's apt sources."""
    missing = sorted({pkg for tool, pkg in HOST_PACKAGES.items() if not shutil.which(tool)})
    if not missing:
        return
    _say(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], log=log, env=env)
    _run(["apt-get", "install", "-y", "-qq", *missing], log=log, env=env)


def ensure_binfmt(log: Path) -> str:
    """Mount binfmt_misc and register qemu-aarch64 if needed; return its flags line."""
    if not (BINFMT / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], log=log)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists():
        _say("enabling qemu-aarch64 in binfmt_misc")
        _run(["update-binfmts", "--enable", "qemu-aarch64"], log=log)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise PiError(f"qemu-aarch64 is not enabled in binfmt_misc ({entry}); as root run: "
                      "update-binfmts --enable qemu-aarch64")
    return next((ln for ln in entry.read_text().splitlines() if ln.startswith("flags")), "")


# ---------------------------------------------------------------- the chroot

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
            _run(["mount", *args, str(target)], log=log)
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
    _say(f"debootstrap --foreign arm64 {SUITE} from {mirror}")
    _run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase",
          f"--include={','.join(DEBIAN_PACKAGES)}", SUITE, str(root), mirror], log=log)
    qemu = shutil.which("qemu-aarch64-static")
    if qemu:  # for binfmt entries without the F (fix-binary) flag
        shutil.copy2(qemu, root / "usr/bin/qemu-aarch64-static")
    _say("debootstrap second stage (emulated; the slow part)")
    _run(["chroot", str(root), "/debootstrap/debootstrap", "--second-stage"], log=log,
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
    _say(f"venv {VENV} with the device requirements (pip, emulated)")
    _run(["chroot", str(root), "/usr/bin/python3", "-m", "venv", VENV], log=log, env=env)
    _run(["chroot", str(root), f"{VENV}/bin/pip", "install", "--no-cache-dir",
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
    p = _run(cmd, env=None if root is None else chroot_env(cpu), capture=True, check=False)
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
    _run(["tar", "-C", str(root), *flags, "--numeric-owner", "--exclude=./proc/*",
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
    _run(["tar", "-C", str(root), *flags, "--numeric-owner", "-xpf", str(tarball)], log=log)


# ---------------------------------------------------------------- bundles and data

def make_bundles(out: Path, *, user: int = 21, epochs: int = 2) -> tuple[Path, Path, Path]:
    """A small real run: a HAR student trained briefly on HAPT, its four bundles, device data.

    The recipe is ``models/har/recipe.toml`` with ``epochs`` of teacher and student training
    (~20 s on 2 cores); every export runs its own parity and accuracy checks. Device data is
    held-out ``user``'s first session (``adapt.npz``) and later sessions (``eval.npz``).
    """
    from edgetl import stages
    from edgetl.config import TrainConfig, load_recipe
    from edgetl.pipeline import write_device_files

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
    adapt, ev = write_device_files(sd.windows, user, out / "data")
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
            p = _run(cmd, env=env, capture=True, check=False)
            seconds[f"{name}/{step}"] = round(time.perf_counter() - t0, 2)
            with log.open("a") as f:
                f.write(f"\n$ [{machine}] run.py {shlex.join(args)}\n{p.stderr}")
            if p.returncode != 0:
                raise PiError(f"{machine}: run.py {shlex.join(args)} exited {p.returncode}: "
                              f"{p.stderr.strip()[-800:]}")
            if step == "selftest":
                (host_work / "out" / name / "selftest.json").write_text(p.stdout)
        _say(f"{machine}: {name} selftest, adapt, infer ok")
    return seconds


# ---------------------------------------------------------------- the whole check

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


def default_cache() -> Path:
    """``$EDGETL_PI_CACHE``, else ``$EDGETL_CACHE/pi`` (default ``~/.cache/edgetl/pi``)."""
    from edgetl.data.hapt import cache_dir

    return Path(os.environ.get("EDGETL_PI_CACHE") or cache_dir() / "pi")


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
        from edgetl.pipeline import write_device_files
        adapt, ev = write_device_files(hapt.load_hapt(), 21, data_dir)
        source = f"existing bundles in {cfg.bundles}"
    else:
        _say("training a small HAR student on HAPT and exporting four bundles")
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
            _say(f"reusing {tarball} ({tarball.stat().st_size / 2**20:.0f} MiB)")
            restore_tarball(tarball, root, log)
            timings["rootfs_restore_s"] = time.perf_counter() - t0
            rootfs = {"built": False}
        else:
            _say(f"building the arm64 {SUITE} rootfs (first time: ~5-7 min)")
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


def summary_markdown(s: dict) -> str:
    """The summary as a Markdown report."""
    a, t = s["aarch64"], s["timings_s"]
    lines = [f"# make test-pi: {'PASS' if s['ok'] else 'FAIL'}", "",
             f"aarch64 (qemu-user, QEMU_CPU={s['qemu_cpu']}): Python {a['python']}, "
             f"{a['libc']}, " + ", ".join(f"{k} {v}" for k, v in a["versions"].items()),
             f"x86_64 host: Python {s['host']['python']}, "
             + ", ".join(f"{k} {v}" for k, v in s["host"]["versions"].items()),
             f"bundles: {s['bundles_from']}; adapt {s['epochs']} epochs, seed {s['seed']}",
             f"rootfs: {'built' if s['rootfs']['built'] else 'reused'} "
             f"{s['rootfs']['tarball']} ({s['rootfs']['tarball_mib']} MiB)",
             "timings: " + ", ".join(f"{k} {v}" for k, v in t.items()), "",
             "| bundle | check | aarch64 vs x86_64 | limit | ok | detail |",
             "|---|---|---:|---:|---|---|"]
    for c in s["checks"]:
        v, lim = (f"{c['value']:.3g}", f"{c['limit']:.3g}") if c["measured"] else ("", "")
        lines.append(f"| {c['bundle']} | {c['name']} | {v} | {lim} | "
                     f"{'yes' if c['ok'] else '**NO**'} | {c['detail']} |")
    lines += ["", "Emulated timings say nothing about a real Pi's speed."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m edgetl.pi``: run the check, or ``--preflight`` only."""
    p = argparse.ArgumentParser(prog="python -m edgetl.pi", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/pi"))
    p.add_argument("--cache", type=Path, default=None,
                   help="rootfs cache (default $EDGETL_PI_CACHE or ~/.cache/edgetl/pi)")
    p.add_argument("--bundles", type=Path, default=None,
                   help="test these bundles (e.g. runs/har/bundles) instead of fresh small ones")
    p.add_argument("--mirror", default=None, help="Debian mirror (default: the host's)")
    p.add_argument("--cpu", default=QEMU_CPU,
                   help="QEMU_CPU: cortex-a72 (Pi 4), cortex-a76 (Pi 5)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--rebuild", action="store_true", help="ignore the cached rootfs")
    p.add_argument("--preflight", action="store_true",
                   help=f"only say whether this machine can run it (exit 0) or why not ({SKIP})")
    args = p.parse_args(argv)
    if args.preflight:
        why = preflight()
        print(f"cannot run: {why}" if why else "ok: root, Linux x86_64, binfmt_misc available")
        return SKIP if why else 0
    try:
        s = run_pi_check(PiConfig(out=args.out, cache=args.cache or default_cache(),
                             bundles=args.bundles, mirror=args.mirror, cpu=args.cpu,
                             epochs=args.epochs, rebuild=args.rebuild))
    except EdgetlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print((args.out / "summary.md").read_text())
    bad = [c for c in s["checks"] if not c["ok"]]
    for c in bad:
        print(f"FAIL {c['bundle']}: {c['name']}"
              + (f" = {c['value']:.3g} (limit {c['limit']:.3g})" if c["measured"] else "")
              + f" {c['detail']}", file=sys.stderr)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
