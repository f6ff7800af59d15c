"""The small real dataset shipped inside the package (no download needed)."""

from __future__ import annotations

import importlib.resources
import os
import pathlib

from picpq_jax.data.dataset import ImageDataset
from picpq_jax.data.image_folder import load_image_folder
from picpq_jax.errors import UserError

EMBEDDED_ASSET = "cifar10_mini.zip"
EMBEDDED_TEXT = "text_mini"  # sst2/{train,dev}.tsv and text/tinyshakespeare.txt


def embedded_text_dir() -> pathlib.Path:
  """The bundled text folder (``assets/text_mini``): ``sst2/train.tsv`` (256 sentences
  per label), ``sst2/dev.tsv`` (200 per label) and ``text/tinyshakespeare.txt`` (its
  first 100,000 characters); see ``assets/README.md``."""
  folder = pathlib.Path(__file__).parent / "assets" / EMBEDDED_TEXT
  if not folder.is_dir():
    raise UserError(f"the bundled text data {folder} is missing; reinstall picpq-jax (the "
                    "wheel must include picpq_jax/data/assets)")
  return folder


def load_embedded(cache_dir: str | os.PathLike | None = None) -> ImageDataset:
  """Loads the bundled CIFAR-10 subset (``assets/cifar10_mini.zip``).

  5,000 training images of CIFAR-10 (Krizhevsky, 2009), 500 per class; see
  ``assets/README.md`` for how they were chosen. Decoded once and cached like
  any image folder (see :func:`load_image_folder`).

  Returns:
    ImageDataset: images uint8 [5000, 32, 32, 3], labels int32 [5000] (class
    by class), the 10 CIFAR-10 class names sorted.
  """
  asset = importlib.resources.files("picpq_jax.data") / "assets" / (
      EMBEDDED_ASSET)
  if not asset.is_file():
    raise UserError(f"the bundled dataset {asset} is missing; reinstall "
                    "picpq-jax (the wheel must include picpq_jax/data/assets)")
  with importlib.resources.as_file(asset) as path:
    return load_image_folder(path, split="train", cache_dir=cache_dir)
