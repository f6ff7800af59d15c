"""Image classification datasets from tensorflow-datasets, without TensorFlow.

Reads prepared data through ``tfds.data_source`` (random access to
ArrayRecord files; TensorFlow is not needed) and never downloads: data must
already be prepared on disk, e.g. on a machine with network::

  tfds build cifar10 --file_format=array_record --data_dir=DIR

then copy ``DIR`` over and pass ``data_dir=DIR`` (or set ``TFDS_DATA_DIR``).
``imagenet2012`` needs its archives placed by hand in ``DIR/downloads/manual``
before ``tfds build``.

The whole split is decoded into host memory (uint8), so for ImageNet load a
slice, e.g. ``split="train[:5%]"``.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
import tqdm

from picpq_jax.data.dataset import ImageDataset
from picpq_jax.errors import UserError


def load_tfds(name: str,
              split: str = "train",
              data_dir: str | os.PathLike | None = None,
              image_size: int | None = None) -> ImageDataset:
  """Loads a prepared tfds image dataset with ``image`` and ``label`` features.

  Args:
    name: a tfds name, e.g. ``"cifar10"``, ``"cifar100"``, ``"imagenet2012"``
      (``"name:version"`` and ``"name/config"`` work too).
    split: a tfds split, slices included (``"train[:10%]"``).
    data_dir: where the prepared data lies; default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``.
    image_size: if given, every image is resized (bilinear) so its shorter
      side is ``image_size``, then center-cropped to ``image_size`` square.
      Required when the dataset's images vary in size (``imagenet2012``).

  Returns:
    ImageDataset: images uint8 [N, H, W, 3] (grayscale repeated to RGB),
    labels int32 [N], class names from the ``label`` feature.

  Raises:
    UserError: an unknown name, data that is not prepared (with the command
      that prepares it), an unknown split, a dataset without ``image`` and
      ``label`` features, or images of varying size without ``image_size``.
  """
  import tensorflow_datasets as tfds  # Imported here: it takes ~1 s.

  if image_size is not None and (not isinstance(image_size, int)
                                 or image_size < 1):
    raise UserError(f"image_size must be a positive int, got {image_size!r}; "
                    "pass e.g. image_size=224")
  source = _data_source(tfds, name, split, data_dir)
  features = source.dataset_info.features
  if "image" not in features or "label" not in features:
    raise UserError(f"tfds dataset {name!r} has features {sorted(features)}, "
                    "not 'image' and 'label'; pick an image classification "
                    "dataset")
  height, width = features["image"].shape[:2]
  if image_size is None and (height is None or width is None):
    raise UserError(f"images of tfds dataset {name!r} vary in size; pass "
                    "image_size (e.g. 224) to resize and center-crop them")
  if len(source) == 0:
    raise UserError(f"split {split!r} of tfds dataset {name!r} is empty; "
                    "pick a non-empty split")
  images, labels = _read_all(source, name, image_size)
  return ImageDataset(images, labels, _class_names(features["label"]))


def _data_source(tfds, name: str, split: str, data_dir):
  """``tfds.data_source`` without download, its failures as UserErrors."""
  data_dir = None if data_dir is None else os.fspath(data_dir)
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"unknown tfds dataset {name!r}; see "
                    "https://www.tensorflow.org/datasets/catalog (e.g. "
                    "cifar10, cifar100, imagenet2012)") from None
  except Exception as e:  # tfds raises many types for "not on disk".
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      prepared = builder.is_prepared()
    except Exception:  # An unreadable data_dir is as good as none.
      prepared = False
    if not prepared:
      raise UserError(
          f"tfds dataset {name!r} is not prepared in {where}; on a machine "
          f"with network run `tfds build {name} --file_format=array_record "
          "--data_dir=DIR`, copy DIR here and pass data_dir=DIR (or set "
          "TFDS_DATA_DIR)") from e
    splits = sorted(builder.info.splits)
    if isinstance(e, NotImplementedError) or not splits:
      raise UserError(
          f"tfds dataset {name!r} in {where} is not in array_record format; "
          f"rebuild it with `tfds build {name} --file_format=array_record` or "
          "convert it with `tfds convert_format --out_file_format="
          "array_record`") from e
    raise UserError(f"cannot read split {split!r} of tfds dataset {name!r} "
                    f"({e}); splits prepared: {', '.join(splits)}") from e


def _read_all(source, name: str, image_size: int | None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Every example of ``source`` as images uint8 [N, H, W, 3], labels int32
  [N]."""
  first = _to_rgb(np.asarray(source[0]["image"]), image_size)
  images = np.empty((len(source),) + first.shape, np.uint8)
  labels = np.empty((len(source),), np.int32)
  for i in tqdm.trange(len(source), desc=f"reading {name}", unit="img",
                       disable=None, leave=False):
    example = source[i]
    image = _to_rgb(np.asarray(example["image"]), image_size)
    if image.shape != first.shape:
      raise UserError(f"example {i} of tfds dataset {name!r} is "
                      f"{image.shape[1]}x{image.shape[0]}, example 0 is "
                      f"{first.shape[1]}x{first.shape[0]}; pass image_size "
                      "to resize them to one size")
    images[i], labels[i] = image, int(example["label"])
  return images, labels


def _to_rgb(image: np.ndarray, image_size: int | None) -> np.ndarray:
  """uint8 [H, W] or [H, W, 1|3] to uint8 [H, W, 3], resized if asked."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  image = image.astype(np.uint8, copy=False)
  return image if image_size is None else center_crop_resize(image,
                                                             image_size)


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes uint8 [H, W, 3] so the shorter side is ``size`` (bilinear), then
  center-crops it to uint8 [size, size, 3]."""
  height, width = image.shape[:2]
  scale = size / min(height, width)
  new_w = max(size, round(width * scale))
  new_h = max(size, round(height * scale))
  resized = np.asarray(Image.fromarray(image).resize(
      (new_w, new_h), Image.Resampling.BILINEAR))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.ascontiguousarray(resized[top:top + size, left:left + size])


def _class_names(label_feature) -> tuple[str, ...]:
  """The names of a ClassLabel feature (its indices as text if unnamed)."""
  names = getattr(label_feature, "names", None)
  if names:
    return tuple(names)
  return tuple(str(i) for i in range(label_feature.num_classes))
