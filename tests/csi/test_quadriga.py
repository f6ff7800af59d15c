"""The quadriga-lib CSI generator on a tiny size: shape, range, determinism, cache."""

import numpy as np
import pytest

pytest.importorskip("quadriga_lib")

from picpq_jax.csi import domain, quadriga  # noqa: E402
from picpq_jax.errors import UserError  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  cache = tmp_path_factory.mktemp("csi_cache")
  x, scenarios = quadriga.generate(2, 3, seed=5, cache_dir=cache, workers=1, progress=False)
  return x, scenarios, cache


def test_shape_range_and_scaling(tiny):
  x, scenarios, _ = tiny
  assert x.shape == (2, 3, 32, 32, 2) and x.dtype == np.float32
  assert x.min() >= 0.0 and x.max() <= 1.0
  # "sample" scaling: each sample's largest |Re| or |Im| maps to 0 or 1.
  np.testing.assert_allclose(np.abs(x - 0.5).max(axis=(2, 3, 4)), 0.5, atol=1e-6)
  assert [s.model for s in scenarios] == ["B", "C"]  # each UE its own TGn model


def test_same_seed_same_data_and_worker_count_does_not_matter(tiny, tmp_path):
  x, _, _ = tiny
  again, _ = quadriga.generate(2, 3, seed=5, cache_dir=tmp_path, workers=2, progress=False)
  np.testing.assert_array_equal(again, x)
  other, _ = quadriga.generate(2, 3, seed=6, cache_dir=tmp_path, workers=1, progress=False)
  assert not np.array_equal(other, x)


def test_second_call_reads_the_cache(tiny, monkeypatch):
  x, _, cache = tiny
  monkeypatch.setattr(quadriga, "_generate", lambda *a: pytest.fail("regenerated"))
  cached, _ = quadriga.generate(2, 3, seed=5, cache_dir=cache, workers=1, progress=False)
  np.testing.assert_array_equal(cached, x)
  assert len(list((cache / "csi").glob("quadriga-*.npy"))) == 1


def test_angular_delay_keeps_most_energy_in_the_first_32_taps():
  h = quadriga._chunk(quadriga.UeScenario("D", 10.0, 0.0), 2, seed=1)
  full = np.abs(np.fft.ifft(np.fft.fft(h, axis=1, norm="ortho"), axis=2, norm="ortho")) ** 2
  kept = np.abs(domain.angular_delay(h)) ** 2
  assert kept.shape == (2, 32, 32) and kept.sum() / full.sum() > 0.9


def test_direction_moves_the_angular_peak():
  peaks = []
  for azimuth in (-40.0, 40.0):
    h = quadriga._chunk(quadriga.UeScenario("B", 10.0, azimuth), 4, seed=2)
    power = (np.abs(domain.angular_delay(h)) ** 2).sum(axis=(0, 2))
    peaks.append(int(np.argmax(power)))
  assert peaks[0] != peaks[1]


def test_dataset_scaling_and_bad_settings(tmp_path):
  x, _ = quadriga.generate(1, 2, seed=1, normalize="dataset", cache_dir=tmp_path, workers=1,
                           progress=False)
  assert np.abs(x - 0.5).max() == pytest.approx(0.5, abs=1e-6)
  with pytest.raises(UserError, match="unknown CSI normalization"):
    quadriga.generate(1, 2, normalize="global", cache_dir=tmp_path)
  with pytest.raises(UserError, match="at least one UE"):
    quadriga.generate(0, 2, cache_dir=tmp_path)
