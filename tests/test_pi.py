"""`make test-pi` logic that needs no qemu: host configuration, fake /sys, comparison, and the
runner suite run on this host.

The emulated aarch64 run itself is `make test-pi` (root, binfmt_misc, ~1-7 min).
"""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from edgetl.tolerances import PI_TOLERANCE
from tools.pi import __main__ as cli
from tools.pi import compare, host, rootfs, suite
from tools.pi.common import PiError

from .conftest import ROOT, SHIFT, write_device_npz

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main contrib

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main

Types: deb
Enabled: no
URIs: http://elsewhere.example/debian
Suites: bookworm
Components: main
"""


@pytest.mark.unit
def test_apt_sources_pick_the_hosts_debian_mirrors():
    src = host.parse_apt_sources(DEB822, deb822=True)
    assert [s.uri for s in src] == ["http://deb.debian.org/debian",
                                    "http://deb.debian.org/debian-security"]
    one_line = host.parse_apt_sources(
        "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.local/debian bookworm main\n"
        "deb-src http://mirror.local/debian bookworm main\n"
        "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n", deb822=False)
    assert one_line[0] == host.AptSource("http://mirror.local/debian", ("bookworm",), ("main",))
    deb = host.debian_sources(src + one_line)
    assert [s.suites for s in deb] == [("bookworm", "bookworm-updates"), ("bookworm-security",),
                                       ("bookworm",)]  # cloud-sdk-bookworm is not Debian's
    assert host.debian_mirror(deb) == "http://deb.debian.org/debian"
    text = host.sources_deb822(deb)
    assert "Suites: bookworm-security\nComponents: main\n" in text and "amd64" not in text
    with pytest.raises(PiError, match="--mirror"):
        host.debian_mirror(host.debian_sources(one_line[1:]))


@pytest.mark.unit
def test_chroot_pip_reaches_the_hosts_index_not_its_local_paths():
    cfg = host.parse_pip_config(
        ":env:.cert='/etc/ssl/certs/ca-certificates.crt'\n:env:.default-timeout='180'\n"
        "global.find-links='/opt/wheels'\nglobal.index-url='https://mirror.corp/simple'\n"
        "global.extra-index-url='file:///opt/pypi/simple https://extra.corp/simple'\n"
        "global.default-timeout='10'\n")
    assert cfg["default-timeout"] == "180"  # the environment wins, as in pip
    env = host.chroot_pip_env(cfg, {"https_proxy": "http://proxy:3128", "HOME": "/root"})
    assert env == {"PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
                   "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                   "PIP_INDEX_URL": "https://mirror.corp/simple",
                   "PIP_EXTRA_INDEX_URL": "https://extra.corp/simple",
                   "PIP_DEFAULT_TIMEOUT": "180", "https_proxy": "http://proxy:3128"}


@pytest.mark.unit
def test_fake_sys_holds_only_the_cpu_lists(tmp_path):
    root = rootfs.make_fake_sys(tmp_path / "sys", "0-3")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["devices/system/cpu/online", "devices/system/cpu/possible",
                     "devices/system/cpu/present"]
    assert (root / "devices/system/cpu/online").read_text() == "0-3\n"
    with pytest.raises(ValueError, match="cpu list"):
        rootfs.make_fake_sys(tmp_path / "bad", "../../etc")


@pytest.mark.unit
def test_rootfs_key_and_constraints():
    c = host.device_constraints("torch==2.13.0\nnumpy==1.0\nonnxruntime==1.31.1\n", "2.4.6")
    assert "numpy==2.4.6" in c and "numpy==1.0" not in c and "onnxruntime==1.31.1" in c
    k = rootfs.rootfs_key("http://deb.debian.org/debian", "numpy\nonnxruntime\n", c)
    assert k == rootfs.rootfs_key("http://deb.debian.org/debian", "numpy\nonnxruntime\n", c)
    assert k != rootfs.rootfs_key("http://other/debian", "numpy\nonnxruntime\n", c)
    assert k != rootfs.rootfs_key("http://deb.debian.org/debian", "numpy\nonnxruntime\n", c + "x")


def _side(w, losses, preds, acc=(0.9, 0.95), rolled_back=False):
    return {"selftest": {"ok": True, "max_abs_err": 1e-6},
            "adapt": {"accuracy_before": acc[0], "accuracy_after": acc[1],
                      "rolled_back": rolled_back, "history": [{"loss": x} for x in losses]},
            "head": {"weight": np.asarray(w, np.float32), "bias": np.zeros(2, np.float32),
                     "__meta__": np.array("{}")},
            "infer": {"predictions": preds, "accuracy": sum(p == "a" for p in preds) / len(preds)}}


@pytest.mark.unit
def test_compare_passes_parity_and_fails_each_kind_of_drift():
    w, preds = np.full((2, 3), 5.0), ["a"] * 99 + ["b"]
    ref = _side(w, [0.7, 0.5], preds)
    fp32, int8 = PI_TOLERANCE["fp32"], PI_TOLERANCE["int8"]
    same = compare.compare_bundle("onnx-fp32", fp32, ref,
                                  _side(w + 1e-5, [0.7 + 1e-6, 0.5], preds))
    assert all(c.ok for c in same), [c for c in same if not c.ok]
    head = {c.name: c for c in same}["adapted head, max |Δ| / max(1, |w|)"]
    assert head.value == pytest.approx(2e-6, rel=1e-2) and head.detail == "weight"

    def failed(tol, arm):
        return {c.name for c in compare.compare_bundle("b", tol, ref, arm) if not c.ok}

    assert failed(fp32, _side(w + 1e-2, [0.7, 0.5], preds)) == {
        "adapted head, max |Δ| / max(1, |w|)"}
    assert failed(fp32, _side(w, [0.7, 0.6], preds)) == {"train loss per epoch, max |Δ|"}
    assert failed(fp32, _side(w, [0.7], preds)) == {"train loss per epoch, max |Δ|"}
    flipped = ["b"] + preds[1:]
    assert failed(fp32, _side(w, [0.7, 0.5], flipped)) == {
        "infer predictions identical, fraction (min)", "infer accuracy, |Δ| points"}
    assert not failed(int8, _side(w, [0.7, 0.5], flipped))  # 1 % of windows: within int8
    assert failed(fp32, _side(w, [0.7, 0.5], preds, rolled_back=True)) == {
        "same keep/roll-back decision"}
    broken = _side(w, [0.7, 0.5], preds)
    broken["selftest"]["ok"] = False
    assert failed(int8, broken) == {"selftest passes on aarch64"}
    del broken["head"]["bias"]
    assert "adapted head, max |Δ| / max(1, |w|)" in failed(int8, broken)


@pytest.mark.unit
def test_summary_markdown_names_every_check():
    ref = _side(np.ones((2, 3)), [0.5], ["a", "b"])
    checks = compare.compare_bundle("onnx-int8", PI_TOLERANCE["int8"], ref, ref)
    probe = {"python": "3.11.2", "libc": "glibc 2.36", "versions": {"onnxruntime": "1.31.1"}}
    s = {"ok": True, "aarch64": probe, "host": probe, "qemu_cpu": "cortex-a72",
         "bundles_from": "tiny", "epochs": 30, "seed": 0,
         "rootfs": {"built": False, "tarball": "/c/rootfs.tar.zst", "tarball_mib": 150},
         "timings_s": {"total_s": 60.0}, "checks": [c.__dict__ for c in checks]}
    md = compare.summary_markdown(s)
    assert md.startswith("# make test-pi: PASS") and md.count("| onnx-int8 |") == len(checks)
    assert "say nothing about a real Pi's speed" in md


@pytest.mark.unit
def test_preflight_says_why_it_skips(monkeypatch):
    monkeypatch.setenv("EDGETL_SKIP_PI", "1")
    assert host.preflight() == "EDGETL_SKIP_PI is set"
    assert cli.main(["--preflight"]) == cli.SKIP
    monkeypatch.delenv("EDGETL_SKIP_PI")
    monkeypatch.setattr(host.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(host.platform, "machine", lambda: "x86_64")
    assert "needs root" in host.preflight()


@pytest.mark.unit
def test_preflight_runs_as_a_module_from_the_repository_root():
    env = {**os.environ, "EDGETL_SKIP_PI": "1"}
    p = subprocess.run([sys.executable, "-m", "tools.pi", "--preflight"], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=False)
    assert p.returncode == cli.SKIP, p.stderr
    assert p.stdout.strip() == "cannot run: EDGETL_SKIP_PI is set"


@pytest.mark.unit
def test_remove_tree_refuses_a_tree_with_mounts(tmp_path, monkeypatch):
    (tmp_path / "root" / "dev").mkdir(parents=True)
    monkeypatch.setattr(rootfs, "_mounts_under", lambda root: [str(root / "dev")])
    with pytest.raises(PiError, match="still mounted"):
        rootfs.remove_tree(tmp_path / "root")
    assert (tmp_path / "root" / "dev").is_dir()
    monkeypatch.setattr(rootfs, "_mounts_under", lambda root: [])
    rootfs.remove_tree(tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_suite_runs_the_runner_on_this_host_and_asserts_the_machine(tiny_bundle, tmp_path):
    adapt = write_device_npz(tmp_path / "adapt.npz", 120, seed=3, **SHIFT)
    ev = write_device_npz(tmp_path / "eval.npz", 60, seed=4, **SHIFT)
    work = tmp_path / "host"
    suite.stage_work(work, [tiny_bundle], adapt, ev)
    env = {**os.environ, "PYTHONPATH": ""}
    secs = suite.run_suite([sys.executable], str(work), work, [tiny_bundle.name],
                           machine=platform.machine(), env=env, epochs=2, seed=0,
                           log=tmp_path / "log.txt")
    assert set(secs) == {f"{tiny_bundle.name}/{s}" for s in ("selftest", "adapt", "infer")}
    side = compare.load_side(work / "out" / tiny_bundle.name)
    checks = compare.compare_bundle(tiny_bundle.name, PI_TOLERANCE["fp32"], side, side)
    assert len(checks) == 8 and all(c.ok for c in checks), [c for c in checks if not c.ok]
    other = "aarch64" if platform.machine() != "aarch64" else "x86_64"
    with pytest.raises(PiError, match=f"expected {other}, running on {platform.machine()}"):
        suite.run_suite([sys.executable], str(work), work, [tiny_bundle.name], machine=other,
                        env=env, epochs=2, seed=0, log=tmp_path / "log.txt")
