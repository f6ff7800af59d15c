"""CIFAR-10 and CIFAR-100 in their original python-pickle formats.

``cifar-10-batches-py/``: ``data_batch_1`` ... ``data_batch_5`` (train),
``test_batch`` (test) and ``batches.meta`` (``label_names``).
``cifar-100-python/``: ``train``, ``test`` and ``meta`` (``fine_label_names``);
the 100 fine labels are used.

Each batch is a pickled dict with bytes keys: ``data`` uint8 [M, 3072], one row
per image, channel-major (1024 red, then 1024 green, then 1024 blue values,
each plane row by row), and ``labels`` (``fine_labels`` for CIFAR-100), a list
of M ints. Unpickling is restricted to numpy arrays and plain containers, so a
tampered file cannot run code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from picpq_jax.data.dataset import ImageDataset
from picpq_jax.errors import UserError

_CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
_CIFAR100_FILES = {"train": ("train",), "test": ("test",)}
_SIDE = 32
_ROW = 3 * _SIDE * _SIDE

# The globals a CIFAR pickle needs: numpy's array reconstruction, nothing else.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def is_cifar_pickle_dir(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a directory in one of the CIFAR pickle formats."""
  path = Path(path)
  return (path / "data_batch_1").is_file() or (
      (path / "train").is_file() and (path / "meta").is_file())


def load_cifar_pickle(path: str | os.PathLike, split: str = "train"
                     ) -> ImageDataset:
  """Loads a CIFAR-10 or CIFAR-100 python-pickle directory.

  Args:
    path: ``cifar-10-batches-py/`` or ``cifar-100-python/`` (the format is
      told by its files).
    split: ``"train"`` or ``"test"``.

  Returns:
    ImageDataset: images uint8 [N, 32, 32, 3] (NHWC), labels int32 [N] in the
    files' order (batch by batch), class names from the meta file.

  Raises:
    UserError: a missing or unrecognised directory, an unknown split, or a
      missing or malformed batch.
  """
  path = Path(path).expanduser()
  if not path.is_dir():
    raise UserError(f"CIFAR directory {path} does not exist; pass the "
                    "extracted cifar-10-batches-py/ or cifar-100-python/")
  if (path / "data_batch_1").is_file():
    files, meta_file = _CIFAR10_FILES, "batches.meta"
    names_key, labels_key = b"label_names", b"labels"
  elif (path / "train").is_file() and (path / "meta").is_file():
    files, meta_file = _CIFAR100_FILES, "meta"
    names_key, labels_key = b"fine_label_names", b"fine_labels"
  else:
    raise UserError(f"{path} is not a CIFAR pickle directory (no data_batch_1, "
                    "nor train and meta); pass the extracted "
                    "cifar-10-batches-py/ or cifar-100-python/")
  if split not in files:
    raise UserError(f"unknown CIFAR split {split!r}; use one of: "
                    f"{', '.join(files)}")
  meta = _read_pickle(path / meta_file)
  class_names = tuple(_text(n) for n in _field(meta, names_key,
                                               path / meta_file))
  batches = [_read_batch(path / name, labels_key) for name in files[split]]
  images = np.concatenate([b[0] for b in batches])
  labels = np.concatenate([b[1] for b in batches])
  return ImageDataset(images, labels, class_names)


def _read_batch(file: Path, labels_key: bytes
               ) -> tuple[np.ndarray, np.ndarray]:
  """One batch as images uint8 [M, 32, 32, 3] and labels int32 [M]."""
  batch = _read_pickle(file)
  data = np.asarray(_field(batch, b"data", file))
  labels = np.asarray(_field(batch, labels_key, file))
  if data.ndim != 2 or data.shape[1] != _ROW or labels.shape != (
      data.shape[0],):
    raise UserError(f"{file} holds data {data.shape} and labels "
                    f"{labels.shape}, expected [M, {_ROW}] and [M]; "
                    "re-download the CIFAR archive")
  return rows_to_nhwc(data), labels.astype(np.int32)


def rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
  """CIFAR rows uint8 [M, 3072] (R, G, B planes) to images uint8 [M, 32, 32, 3].
  """
  images = rows.astype(np.uint8).reshape(-1, 3, _SIDE, _SIDE)
  return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


class _RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that only rebuilds numpy arrays and builtin containers."""

  def find_class(self, module, name):
    if (module, name) in _ALLOWED_GLOBALS:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_pickle(file: Path) -> dict:
  if not file.is_file():
    raise UserError(f"CIFAR file {file} is missing; re-extract the CIFAR "
                    "archive")
  try:
    with open(file, "rb") as f:
      value = _RestrictedUnpickler(f, encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, ImportError, IndexError) as e:
    raise UserError(f"cannot read CIFAR file {file} ({e}); re-download the "
                    "CIFAR archive") from None
  if not isinstance(value, dict):
    raise UserError(f"CIFAR file {file} holds a {type(value).__name__}, not a "
                    "dict; re-download the CIFAR archive")
  return value


def _field(record: dict, key: bytes, file: Path):
  """``record[key]``, accepting str keys too (files re-pickled in Python 3)."""
  for k in (key, key.decode()):
    if k in record:
      return record[k]
  raise UserError(f"CIFAR file {file} has no {key.decode()!r} field; "
                  "re-download the CIFAR archive")


def _text(name) -> str:
  return name.decode() if isinstance(name, bytes) else str(name)
