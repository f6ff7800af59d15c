"""Tests for load_cifar_pickle on tiny batches in the exact original format."""

import pickle

import numpy as np
import pytest

from picpq_jax.data import load_cifar_pickle
from picpq_jax.data.cifar_pickle import is_cifar_pickle_dir
from picpq_jax.errors import UserError


def _rows(count, offset):
  """uint8 [count, 3072] rows with known, distinct pixel values."""
  rng = np.random.default_rng(offset)
  return rng.integers(0, 256, (count, 3072), dtype=np.uint8)


def _dump(path, record):
  """Pickles like the originals: protocol 2, bytes keys, numpy.core names."""
  data = pickle.dumps(record, protocol=2)
  data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  path.write_bytes(data)


def _cifar10_dir(root, per_batch=2):
  root.mkdir()
  names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
           b"frog", b"horse", b"ship", b"truck"]
  _dump(root / "batches.meta", {b"label_names": names,
                                b"num_cases_per_batch": per_batch,
                                b"num_vis": 3072})
  batches = {}
  for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)]
                           + ["test_batch"]):
    rows = _rows(per_batch, i)
    labels = [(i + j) % 10 for j in range(per_batch)]
    _dump(root / name, {b"batch_label": name.encode(), b"labels": labels,
                        b"data": rows,
                        b"filenames": [b"x.png"] * per_batch})
    batches[name] = (rows, labels)
  return batches


def test_cifar10_train_and_test(tmp_path):
  batches = _cifar10_dir(tmp_path / "cifar-10-batches-py")
  ds = load_cifar_pickle(tmp_path / "cifar-10-batches-py", split="train")
  assert ds.images.shape == (10, 32, 32, 3) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32
  assert ds.class_names[0] == "airplane" and ds.num_classes == 10
  expected = [y for k in range(1, 6) for y in batches[f"data_batch_{k}"][1]]
  np.testing.assert_array_equal(ds.labels, expected)
  test = load_cifar_pickle(tmp_path / "cifar-10-batches-py", split="test")
  assert len(test) == 2
  np.testing.assert_array_equal(test.labels, batches["test_batch"][1])


def test_rows_are_channel_major(tmp_path):
  """Pixel (y, x) channel c of an image is row[c * 1024 + y * 32 + x]."""
  batches = _cifar10_dir(tmp_path / "c10")
  ds = load_cifar_pickle(tmp_path / "c10", split="test")
  row = batches["test_batch"][0][1]
  for y, x, c in [(0, 0, 0), (0, 1, 0), (1, 0, 0), (5, 7, 1), (31, 31, 2)]:
    assert ds.images[1, y, x, c] == row[c * 1024 + y * 32 + x]
  # A hand-made image: red plane all 10, green 20, blue a ramp over x.
  plane = np.arange(32, dtype=np.uint8)[None, :].repeat(32, 0)
  rows = np.concatenate([np.full(1024, 10), np.full(1024, 20),
                         plane.reshape(-1)]).astype(np.uint8)[None]
  _dump(tmp_path / "c10/test_batch", {b"labels": [3], b"data": rows})
  image = load_cifar_pickle(tmp_path / "c10", split="test").images[0]
  np.testing.assert_array_equal(image[..., 0], 10)
  np.testing.assert_array_equal(image[..., 1], 20)
  np.testing.assert_array_equal(image[..., 2], plane)


def test_cifar100_fine_labels(tmp_path):
  root = tmp_path / "cifar-100-python"
  root.mkdir()
  fine = [f"class{i:02d}".encode() for i in range(100)]
  _dump(root / "meta", {b"fine_label_names": fine,
                        b"coarse_label_names": [b"c"] * 20})
  rows = _rows(3, 7)
  for split in ("train", "test"):
    _dump(root / split, {b"filenames": [b"f"] * 3, b"batch_label": b"x",
                         b"fine_labels": [99, 0, 42],
                         b"coarse_labels": [1, 2, 3], b"data": rows})
  assert is_cifar_pickle_dir(root)
  ds = load_cifar_pickle(root, split="train")
  assert ds.num_classes == 100 and ds.class_names[42] == "class42"
  np.testing.assert_array_equal(ds.labels, [99, 0, 42])
  np.testing.assert_array_equal(
      ds.images, rows.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))


def test_str_keys_from_python3_repickling(tmp_path):
  root = tmp_path / "c10"
  _cifar10_dir(root)
  _dump(root / "batches.meta", {"label_names": [str(i) for i in range(10)]})
  assert load_cifar_pickle(root).class_names[3] == "3"


def test_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    load_cifar_pickle(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="not a CIFAR pickle directory"):
    load_cifar_pickle(tmp_path / "empty")
  root = tmp_path / "c10"
  _cifar10_dir(root)
  with pytest.raises(UserError, match="unknown CIFAR split 'val'"):
    load_cifar_pickle(root, split="val")
  (root / "data_batch_3").unlink()
  with pytest.raises(UserError, match="data_batch_3 is missing"):
    load_cifar_pickle(root)
  _dump(root / "data_batch_3", {b"labels": [1], b"data": np.zeros((1, 100),
                                                                  np.uint8)})
  with pytest.raises(UserError, match=r"expected \[M, 3072\]"):
    load_cifar_pickle(root)
  (root / "data_batch_3").write_bytes(b"not a pickle")
  with pytest.raises(UserError, match="cannot read CIFAR file"):
    load_cifar_pickle(root)


def test_refuses_code_in_pickles(tmp_path):
  root = tmp_path / "c10"
  _cifar10_dir(root)

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))

  (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": Evil()}))
  with pytest.raises(UserError, match="refusing to load global builtins.print"):
    load_cifar_pickle(root)
