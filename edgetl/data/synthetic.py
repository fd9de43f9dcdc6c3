"""Synthetic IMU-like windows for tests and quick checks: class = dominant frequency.

A *device shift* (per-channel gain and offset, as from a differently worn or calibrated
sensor) moves the features so that the server head degrades while a retrained head recovers:
the easy shift the end-to-end test adapts to.
"""

from __future__ import annotations

import numpy as np


def make_windows(n: int, *, window: int = 32, channels: int = 3, classes: int = 3,
                 seed: int = 0, gain: float | np.ndarray = 1.0,
                 offset: float | np.ndarray = 0.0, noise: float = 0.3):
    """``(x, y)``: x (n, window, channels) float32 sinusoids, y (n,) int64 class ids.

    Class ``k`` oscillates at ``k + 1`` cycles per window with a random phase on each channel.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    t = np.arange(window) / window
    phase = rng.uniform(0, 2 * np.pi, (n, 1, channels))
    x = np.sin(2 * np.pi * (y[:, None, None] + 1) * t[None, :, None] + phase)
    x = x * np.asarray(gain) + np.asarray(offset)
    x = x + noise * rng.standard_normal(x.shape)
    return x.astype(np.float32), y.astype(np.int64)
