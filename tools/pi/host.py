"""The host: its apt and pip configuration translated for the chroot, its tools and binfmt_misc.

The parsing and translation functions are pure (``tests/test_pi.py``); :func:`preflight` says
whether this machine can run the check at all.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from tools.pi.common import SUITE, PiError, default_cache, run_cmd, say

HOST_PACKAGES = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap",
                 "update-binfmts": "binfmt-support"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")


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


def host_cpus() -> str:
    """The host's online cpu list (what the emulated runner really has)."""
    p = Path("/sys/devices/system/cpu/online")
    return p.read_text().strip() if p.is_file() else f"0-{(os.cpu_count() or 1) - 1}"


def device_constraints(constraints: str, numpy_version: str) -> str:
    """The repository's pins plus numpy at the host's version, so both runs share numpy."""
    lines = [ln for ln in constraints.splitlines() if not ln.strip().startswith("numpy")]
    return "\n".join(lines + [f"numpy=={numpy_version}", ""])


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
    say(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_cmd(["apt-get", "update", "-qq"], log=log, env=env)
    run_cmd(["apt-get", "install", "-y", "-qq", *missing], log=log, env=env)


def ensure_binfmt(log: Path) -> str:
    """Mount binfmt_misc and register qemu-aarch64 if needed; return its flags line."""
    if not (BINFMT / "register").exists():
        run_cmd(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], log=log)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists():
        say("enabling qemu-aarch64 in binfmt_misc")
        run_cmd(["update-binfmts", "--enable", "qemu-aarch64"], log=log)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise PiError(f"qemu-aarch64 is not enabled in binfmt_misc ({entry}); as root run: "
                      "update-binfmts --enable qemu-aarch64")
    return next((ln for ln in entry.read_text().splitlines() if ln.startswith("flags")), "")
