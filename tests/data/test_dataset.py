"""Tests for ImageDataset."""

import numpy as np
import pytest

from picpq_jax.data import ImageDataset
from picpq_jax.errors import UserError


def _dataset(n=6):
  images = np.arange(n * 2 * 2 * 3, dtype=np.uint8).reshape(n, 2, 2, 3)
  return ImageDataset(images, np.arange(n, dtype=np.int32) % 3, ("a", "b", "c"))


def test_len_num_classes_and_shape():
  ds = _dataset()
  assert len(ds) == 6
  assert ds.num_classes == 3
  assert ds.image_shape == (2, 2, 3)


def test_subset_takes_examples_in_order():
  ds = _dataset()
  sub = ds.subset([4, 1])
  np.testing.assert_array_equal(sub.images, ds.images[[4, 1]])
  np.testing.assert_array_equal(sub.labels, [1, 1])
  assert sub.class_names == ds.class_names
  assert len(ds.subset(np.array([], np.int64))) == 0
  assert len(ds.subset([])) == 0
  assert len(ds.subset(ds.labels == 0)) == 2


def test_frozen():
  ds = _dataset()
  with pytest.raises(AttributeError):
    ds.labels = ds.labels  # type: ignore[misc]


@pytest.mark.parametrize("images, labels, names, match", [
    (np.zeros((2, 2, 2, 3), np.float32), np.zeros(2, np.int32), ("a",),
     "uint8"),
    (np.zeros((2, 2, 2), np.uint8), np.zeros(2, np.int32), ("a",), r"\[N, H"),
    (np.zeros((2, 2, 2, 3), np.uint8), np.zeros(2, np.int64), ("a",), "int32"),
    (np.zeros((2, 2, 2, 3), np.uint8), np.zeros(3, np.int32), ("a",),
     "one per image"),
    (np.zeros((2, 2, 2, 3), np.uint8), np.array([0, 1], np.int32), ("a",),
     r"\[0, 1\)"),
    (np.zeros((2, 2, 2, 3), np.uint8), np.zeros(2, np.int32), (), "empty"),
])
def test_bad_fields_raise(images, labels, names, match):
  with pytest.raises(UserError, match=match):
    ImageDataset(images, labels, names)


def test_subset_out_of_range_raises():
  with pytest.raises(UserError, match="indices must lie"):
    _dataset().subset([6])
  with pytest.raises(UserError, match="integer or boolean"):
    _dataset().subset([0.5])
