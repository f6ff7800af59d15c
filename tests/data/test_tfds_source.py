"""Tests for load_tfds, offline: tfds mock data and an empty data_dir."""

import time

import numpy as np
import pytest

from picpq_jax.data import load_tfds
from picpq_jax.data.tfds_source import center_crop_resize
from picpq_jax.errors import UserError

tfds = pytest.importorskip("tensorflow_datasets")


def test_cifar10_from_mock_data():
  with tfds.testing.mock_data(num_examples=5):
    ds = load_tfds("cifar10", split="train")
    expected = tfds.data_source("cifar10", split="train")
    assert ds.images.shape == (5, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32 and ds.num_classes == 10
    for i in range(5):
      np.testing.assert_array_equal(ds.images[i], expected[i]["image"])
      assert ds.labels[i] == expected[i]["label"]


def test_cifar100_and_grayscale_mnist():
  with tfds.testing.mock_data(num_examples=3):
    assert load_tfds("cifar100", split="test").num_classes == 100
    mnist = load_tfds("mnist", split="train")
  assert mnist.images.shape == (3, 28, 28, 3)
  np.testing.assert_array_equal(mnist.images[..., 0], mnist.images[..., 2])


def test_imagenet_needs_image_size():
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(UserError, match="vary in size; pass image_size"):
      load_tfds("imagenet2012", split="validation")
    ds = load_tfds("imagenet2012", split="validation", image_size=24)
  assert ds.images.shape == (4, 24, 24, 3)
  assert ds.num_classes == 1000 and ds.class_names[0] == "n01440764"


def test_not_prepared_fails_fast_with_the_fix(tmp_path):
  start = time.perf_counter()
  with pytest.raises(UserError, match=r"not prepared.*tfds build cifar10"):
    load_tfds("cifar10", split="train", data_dir=tmp_path)
  assert time.perf_counter() - start < 10


def test_unknown_dataset(tmp_path):
  with pytest.raises(UserError, match="unknown tfds dataset 'no_such_data'"):
    load_tfds("no_such_data", data_dir=tmp_path)


def test_bad_image_size():
  with pytest.raises(UserError, match="image_size must be a positive int"):
    load_tfds("cifar10", image_size=0)


def test_center_crop_resize():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 20:60] = 200  # The center square, half the width.
  out = center_crop_resize(image, 20)
  assert out.shape == (20, 20, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[:, 1:-1], 200)  # Edges blend a little.
  assert out.min() > 150
