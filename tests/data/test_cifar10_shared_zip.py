"""The real CIFAR-10 training zip in ../shared (skipped where it is absent).

Decoding all 50,000 images happens once, in a module-scoped fixture.
"""

import time
from pathlib import Path

import numpy as np
import pytest

from picpq_jax.data import CIFAR10_MEAN
from picpq_jax.data import CIFAR10_STD
from picpq_jax.data import channel_stats
from picpq_jax.data import load_image_folder
from picpq_jax.data import train_val_split

SHARED_ZIP = (Path(__file__).resolve().parents[2].parent
              / "shared/data/cifar10/train.zip")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
           "horse", "ship", "truck")


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
  """(dataset, cache dir, seconds to decode) from one cold load."""
  if not SHARED_ZIP.is_file():
    pytest.skip(f"shared CIFAR-10 zip not found at {SHARED_ZIP}")
  cache = tmp_path_factory.mktemp("cifar_cache")
  start = time.perf_counter()
  ds = load_image_folder(SHARED_ZIP, split="train", cache_dir=cache)
  return ds, cache, time.perf_counter() - start


def test_shape_classes_and_counts(decoded):
  ds, _, seconds = decoded
  assert len(ds) == 50_000
  assert ds.images.shape == (50_000, 32, 32, 3)
  assert ds.images.dtype == np.uint8
  assert ds.class_names == CLASSES
  np.testing.assert_array_equal(np.bincount(ds.labels), [5_000] * 10)
  assert np.all(np.diff(ds.labels) >= 0)  # Class by class.
  assert seconds < 60


def test_second_call_is_cached_and_identical(decoded):
  ds, cache, _ = decoded
  start = time.perf_counter()
  again = load_image_folder(SHARED_ZIP, split="train", cache_dir=cache)
  seconds = time.perf_counter() - start
  assert again.images is not ds.images
  assert np.array_equal(again.images, ds.images)  # Bit for bit.
  assert np.array_equal(again.labels, ds.labels)
  assert again.class_names == ds.class_names
  assert seconds < 10


def test_channel_stats_match_the_constants(decoded):
  ds, _, _ = decoded
  mean, std = channel_stats(ds.images)
  # The zip holds JPEG re-encodings, so stats differ a little from the
  # original pixels the constants were computed on.
  np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=5e-3)
  np.testing.assert_allclose(std, CIFAR10_STD, atol=5e-3)


def test_validation_split_of_5000(decoded):
  ds, _, _ = decoded
  train, val = train_val_split(ds, 5_000, seed=0)
  assert (len(train), len(val)) == (45_000, 5_000)
  counts = np.bincount(val.labels, minlength=10)
  assert counts.min() > 400 and counts.max() < 600
