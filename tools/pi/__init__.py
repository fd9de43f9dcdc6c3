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

Run as root (debootstrap, chroot, mount). ``python -m tools.pi --preflight`` (from the repository
root) says whether this machine can run it (exit 0) or why not (exit 3).

Modules: ``host`` (the host's apt/pip configuration, tools, binfmt_misc, preflight), ``rootfs``
(debootstrap, the device venv, mounts, the cached tarball), ``suite`` (bundles, device data,
the runner commands on both machines, the whole check), ``compare`` (the two runs side by side,
the report) and ``__main__`` (the command line). CI test infrastructure, not part of ``edgetl``.
"""
