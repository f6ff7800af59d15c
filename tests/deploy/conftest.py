"""Fixtures of the deploy tests."""

import numpy as np
import pytest

from picpq_jax.data import channel_stats, load_embedded


@pytest.fixture(scope="module")
def images(cache_dir):
  """16 real CIFAR-10 images (uint8 [16, 32, 32, 3]) and the subset's mean and std."""
  data = load_embedded(cache_dir)
  mean, std = channel_stats(data.images)
  return data.images[::311][:16], np.asarray(mean), np.asarray(std)
