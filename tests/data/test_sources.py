"""Tests for load_dataset's dispatch on the spec."""

import pickle

import numpy as np
import pytest

from picpq_jax.data import load_dataset
from picpq_jax.errors import UserError

tfds = pytest.importorskip("tensorflow_datasets")


def test_embedded(tmp_path):
  ds = load_dataset("embedded", cache_dir=tmp_path)
  assert len(ds) == 5_000 and ds.num_classes == 10
  with pytest.raises(UserError, match="only a 'train' split"):
    load_dataset("embedded", split="test")


def test_tfds():
  with tfds.testing.mock_data(num_examples=4):
    ds = load_dataset("tfds:cifar10", split="test")
  assert ds.images.shape == (4, 32, 32, 3)
  with pytest.raises(UserError, match="needs a dataset name"):
    load_dataset("tfds:")
  with tfds.testing.mock_data(num_examples=2):
    ds = load_dataset("tfds:imagenet2012", split="validation", image_size=16)
  assert ds.images.shape == (2, 16, 16, 3)


def test_image_size_only_for_tfds(folder):
  root, _ = folder
  for spec in ("embedded", str(root)):
    with pytest.raises(UserError, match="image_size applies to 'tfds:NAME'"):
      load_dataset(spec, image_size=8)


def test_tfds_not_prepared(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(UserError, match="not prepared"):
    load_dataset("tfds:cifar100")


def test_image_folder_directory_and_zip(folder, zipped, tmp_path):
  root, expected = folder
  ds = load_dataset(str(root), cache_dir=tmp_path / "c")
  np.testing.assert_array_equal(ds.images, expected["images"])
  path, _ = zipped
  ds = load_dataset(str(path), cache_dir=tmp_path / "c")
  np.testing.assert_array_equal(ds.labels, expected["labels"])


def test_cifar_pickle_directory(tmp_path):
  root = tmp_path / "cifar-10-batches-py"
  root.mkdir()
  rows = np.zeros((1, 3072), np.uint8)
  with open(root / "batches.meta", "wb") as f:
    pickle.dump({b"label_names": [b"a", b"b"]}, f, protocol=2)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    with open(root / name, "wb") as f:
      pickle.dump({b"data": rows, b"labels": [1]}, f, protocol=2)
  ds = load_dataset(str(root), split="test")
  assert ds.class_names == ("a", "b") and len(ds) == 1


@pytest.mark.parametrize("spec", ["nope", "/no/such/dir", "cifar10"])
def test_unknown_spec_lists_the_forms(spec):
  with pytest.raises(UserError, match=r"does not exist; pass 'embedded'.*"
                     r"tfds:NAME.*pickle.*image folder"):
    load_dataset(spec)


def test_existing_file_that_is_not_a_zip(tmp_path):
  path = tmp_path / "data.csv"
  path.write_text("a,b\n")
  with pytest.raises(UserError, match="is not a .zip"):
    load_dataset(str(path))
