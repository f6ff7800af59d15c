"""Shared fixtures for the data tests: synthetic image folders (Pillow)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
  """Points the default cache at a temporary folder, never at ~/.cache."""
  monkeypatch.setenv("PICPQ_CACHE", str(tmp_path_factory.mktemp("default")))


def pixel_value(label: int, index: int) -> np.ndarray:
  """The known uint8 [4, 5, 3] image number ``index`` of class ``label``."""
  base = np.arange(4 * 5 * 3, dtype=np.int64).reshape(4, 5, 3)
  return ((base * 3 + 40 * label + 7 * index) % 256).astype(np.uint8)


def write_folder(root: Path, split: str = "train",
                 classes: tuple[str, ...] = ("cat", "ant", "bee"),
                 per_class: int = 3) -> dict[str, np.ndarray]:
  """Writes ``root/split/<class>/<i>.png`` images of :func:`pixel_value`.

  Class ``c`` (in the given, unsorted order) gets label ``sorted.index(c)``.
  Files are written in reverse order so sorting is what puts them in order.

  Returns:
    the expected images uint8 [N, 4, 5, 3] and labels int32 [N] (classes
    sorted, files sorted), under keys "images" and "labels".
  """
  images, labels = [], []
  for label, cls in enumerate(sorted(classes)):
    folder = root / split / cls
    folder.mkdir(parents=True, exist_ok=True)
    for i in reversed(range(per_class)):
      Image.fromarray(pixel_value(label, i)).save(folder / f"{i:03d}.png")
    images += [pixel_value(label, i) for i in range(per_class)]
    labels += [label] * per_class
  return {"images": np.stack(images), "labels": np.array(labels, np.int32)}


def zip_folder(root: Path, out: Path) -> Path:
  """Zips every file under ``root`` as ``<relative path>``, stored, shuffled
  member order."""
  files = sorted(p for p in root.rglob("*") if p.is_file())
  order = np.random.default_rng(0).permutation(len(files))
  with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
    for i in order:
      zf.write(files[i], files[i].relative_to(root).as_posix())
  return out


@pytest.fixture
def make_folder():
  """:func:`write_folder`, for tests that need their own layout."""
  return write_folder


@pytest.fixture
def make_zip():
  """:func:`zip_folder`, for tests that need their own zip."""
  return zip_folder


@pytest.fixture
def folder(tmp_path):
  """A synthetic image folder: (root, expected) with 3 classes x 3 PNGs."""
  root = tmp_path / "folder"
  return root, write_folder(root)


@pytest.fixture
def zipped(tmp_path, folder):
  """The same folder as a zip: (zip path, expected)."""
  root, expected = folder
  return zip_folder(root, tmp_path / "folder.zip"), expected
