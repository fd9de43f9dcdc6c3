"""HAPT loading through the restricted unpickler, windowing, recipes."""

import gzip
import pickle

import numpy as np
import pytest

from edgetl.config import Recipe, load_recipe
from edgetl.data import hapt
from edgetl.errors import ConfigError


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@pytest.mark.unit
def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump({1: [_Evil()]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|not on the allow"):
        hapt.read_hapt_pickle(path)


@pytest.mark.unit
def test_window_recording_stays_inside_one_activity():
    sig = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    lab = np.array([1] * 20 + [-1] * 4 + [4] * 16, np.int16)
    x, y, s = hapt.window_recording(hapt.Recording(1, 0, sig, lab), window=8, stride=4)
    assert x.shape == (4 + 3, 8, 6)  # starts 0,4,8,12 in the first bout; 0,4,8 in the second
    assert list(y) == [0] * 4 + [3] * 3
    for xi, si in zip(x, s):
        assert lab[si] == lab[si + 7]  # never straddles a label change
        np.testing.assert_array_equal(xi, sig[si : si + 8])


@pytest.mark.data
def test_real_hapt_windows(tmp_path):
    w = hapt.load_hapt(128, 64, cache=tmp_path)
    assert w.x.shape[1:] == (128, 6) and w.x.dtype == np.float32
    assert len(w) > 10_000 and set(np.unique(w.user)) == set(range(1, 31))
    assert set(np.unique(w.y)) == set(range(6))
    assert np.isfinite(w.x).all()
    again = hapt.load_hapt(128, 64, cache=tmp_path)  # from the .npz cache
    np.testing.assert_array_equal(again.x, w.x)
    assert len(list(tmp_path.glob("hapt_*.npz"))) == 1


@pytest.mark.unit
def test_default_recipe_loads_and_splits_are_user_disjoint():
    r = load_recipe("models/har/recipe.toml")
    assert isinstance(r, Recipe)
    assert not set(r.data.server_users) & set(r.data.device_users)


@pytest.mark.unit
def test_recipe_errors_name_the_key(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[head]\nkind = 'transformer'\n")
    with pytest.raises(ConfigError,
                       match=r"head.kind: expected one of \('linear', 'mlp', 'cosine'\)"):
        load_recipe(p)
    p.write_text("[data]\nserver_users = [1, 2]\ndevice_users = [2, 3]\nserver_val_users = [1]\n")
    with pytest.raises(ConfigError, match=r"users \[2\] are both server and device users"):
        load_recipe(p)
