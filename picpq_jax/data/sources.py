"""One entry point that picks a data source from a short text spec."""

from __future__ import annotations

import os
from pathlib import Path

from picpq_jax.data.cifar_pickle import is_cifar_pickle_dir
from picpq_jax.data.cifar_pickle import load_cifar_pickle
from picpq_jax.data.dataset import ImageDataset
from picpq_jax.data.embedded import load_embedded
from picpq_jax.data.image_folder import load_image_folder
from picpq_jax.data.tfds_source import load_tfds
from picpq_jax.errors import UserError

_TFDS_PREFIX = "tfds:"
ACCEPTED_SPECS = (
    "'embedded' (the bundled CIFAR-10 subset), 'tfds:NAME' (a prepared "
    "tensorflow-datasets dataset, e.g. tfds:cifar10), a CIFAR python-pickle "
    "directory (cifar-10-batches-py/ or cifar-100-python/), or an image "
    "folder as a directory or .zip laid out as <split>/<class>/<file>")


def load_dataset(spec: str,
                 split: str = "train",
                 cache_dir: str | os.PathLike | None = None,
                 image_size: int | None = None,
                 center_crop: float = 1.0,
                 lazy: bool | None = None) -> ImageDataset:
  """Loads the dataset that ``spec`` names.

  Args:
    spec: one of

      - ``"embedded"``: the bundled 5,000-image CIFAR-10 subset (``train``
        split only);
      - ``"tfds:NAME"``: tensorflow-datasets ``NAME``, already prepared (the
        data dir comes from ``$TFDS_DATA_DIR``; call :func:`load_tfds` for
        more options);
      - a directory holding ``data_batch_1`` or ``train`` and ``meta``: CIFAR
        python pickles;
      - any other directory or a ``.zip``: an image folder
        ``<split>/<class>/<file>``.
    split: the split to load.
    cache_dir: where image folders keep decoded arrays (see
      :func:`load_image_folder`) and lazy tfds datasets their labels.
    image_size: for ``tfds:`` specs only, resize and center-crop to this
      square size (needed for ``tfds:imagenet2012``; see :func:`load_tfds`).
    center_crop: with ``image_size``, the fraction of the resized shorter
      side kept by the center crop (0.875: ImageNet's resize 256, crop 224).
    lazy: for ``tfds:`` specs, decode images on demand (True), now (False) or
      by size (None; see :func:`load_tfds`). Other sources are in memory.

  Returns:
    ImageDataset: images uint8 [N, H, W, 3] (a numpy array, or
    :class:`~picpq_jax.data.lazy.LazyImages` for large tfds datasets), labels
    int32 [N].

  Raises:
    UserError: a spec of none of these forms, or the source's own errors.
  """
  spec = os.fspath(spec)
  if spec == "embedded":
    if image_size is not None:
      raise UserError("image_size applies to 'tfds:NAME' specs only; drop it "
                      "for 'embedded'")
    if split != "train":
      raise UserError(f"the embedded dataset has only a 'train' split, got "
                      f"{split!r}; carve validation data out of it with "
                      "train_val_split")
    return load_embedded(cache_dir=cache_dir)
  if spec.startswith(_TFDS_PREFIX):
    name = spec[len(_TFDS_PREFIX):]
    if not name:
      raise UserError("'tfds:' needs a dataset name, e.g. 'tfds:cifar10'")
    return load_tfds(name, split=split, image_size=image_size,
                     center_crop=center_crop, lazy=lazy, cache_dir=cache_dir)
  if image_size is not None:
    raise UserError(f"image_size applies to 'tfds:NAME' specs only, not "
                    f"{spec!r}; resize the images beforehand or drop "
                    "image_size")
  path = Path(spec).expanduser()
  if path.is_dir():
    if is_cifar_pickle_dir(path):
      return load_cifar_pickle(path, split=split)
    return load_image_folder(path, split=split, cache_dir=cache_dir)
  if path.is_file() and path.suffix.lower() == ".zip":
    return load_image_folder(path, split=split, cache_dir=cache_dir)
  problem = "does not exist" if not path.exists() else "is not a .zip"
  raise UserError(f"dataset {spec!r} {problem}; pass {ACCEPTED_SPECS}")
