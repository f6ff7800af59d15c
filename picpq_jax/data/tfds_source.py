"""Image classification datasets from tensorflow-datasets, without TensorFlow.

Reads prepared data through ``tfds.data_source`` (random access to
ArrayRecord files; TensorFlow is not needed) and never downloads: data must
already be prepared on disk, e.g. on a machine with network::

  tfds build cifar10 --file_format=array_record --data_dir=DIR

then copy ``DIR`` over and pass ``data_dir=DIR`` (or set ``TFDS_DATA_DIR``).
``imagenet2012`` needs its archives placed by hand in ``DIR/downloads/manual``
before ``tfds build``.

Small datasets are decoded whole into host memory (uint8). Datasets whose
decoded images would exceed :data:`LAZY_BYTES` (2 GiB: ImageNet, not CIFAR)
come back lazy: their images are a :class:`~picpq_jax.data.lazy.LazyImages`
that decodes only the indices a batch asks for (``lazy=True/False`` forces
either). Records are read as raw bytes (``tfds.decode.SkipDecoding``) and
decoded with Pillow here, which lets JPEGs decode at reduced scale; sources that
cannot give raw bytes (tfds mock data without TensorFlow) are read decoded.
Labels are read once, in one pass over the records, and for lazy datasets
cached under ``cache_dir`` (ImageNet's pass reads every record, ~140 GB).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import tqdm

from picpq_jax.data.dataset import ImageDataset
from picpq_jax.data.image_folder import default_cache_dir
from picpq_jax.data import lazy as lazy_lib
from picpq_jax.errors import UserError

# Decoded sizes above this load lazily when ``lazy`` is None.
LAZY_BYTES = 2 * 1024**3
_CHUNK = 1024  # records per read when scanning labels or decoding eagerly


def load_tfds(name: str,
              split: str = "train",
              data_dir: str | os.PathLike | None = None,
              image_size: int | None = None,
              center_crop: float = 1.0,
              lazy: bool | None = None,
              cache_dir: str | os.PathLike | None = None) -> ImageDataset:
  """Loads a prepared tfds image dataset with ``image`` and ``label`` features.

  Args:
    name: a tfds name, e.g. ``"cifar10"``, ``"cifar100"``, ``"imagenet2012"``
      (``"name:version"`` and ``"name/config"`` work too).
    split: a tfds split, slices included (``"train[:10%]"``).
    data_dir: where the prepared data lies; default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``.
    image_size: if given, every image is resized (bilinear) so its shorter
      side is ``round(image_size / center_crop)``, then center-cropped to
      ``image_size`` square. Required when the dataset's images vary in size
      (``imagenet2012``).
    center_crop: the fraction of the resized shorter side kept, in (0, 1]:
      1.0 keeps it whole, 0.875 is ImageNet's evaluation transform (resize
      256, crop 224). Used only with ``image_size``.
    lazy: decode on demand (True), everything now (False), or decide by size
      (None: lazy above :data:`LAZY_BYTES` of decoded images).
    cache_dir: where lazy datasets cache their labels; default
      :func:`~picpq_jax.data.default_cache_dir`.

  Returns:
    ImageDataset: images uint8 [N, H, W, 3] (grayscale repeated to RGB; a
    numpy array or LazyImages), labels int32 [N], class names from the
    ``label`` feature.

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
  crop = lazy_lib.CenterCrop(image_size or 1, center_crop)  # validates both
  resize = None if image_size is None else crop
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
  raw = _raw_source(tfds, name, split, data_dir)
  records = source if raw is None else raw
  images = lazy_lib.LazyImages(
      lambda i: records[i]["image"], len(source),
      image_shape=None if resize else (height, width, 3), resize=resize)
  if lazy is None:
    lazy = int(np.prod(images.shape, dtype=np.int64)) > LAZY_BYTES
  if lazy:
    cache = Path(cache_dir or default_cache_dir()).expanduser()
    labels = _cached_labels(records, source, name, split, cache)
  else:
    labels = _read_labels(records, name)
    images = _decode_all(images, name)
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


def _raw_source(tfds, name: str, split: str, data_dir):
  """The split with undecoded images (bytes), or None where the source
  cannot skip decoding (tfds mock data encodes with TensorFlow)."""
  try:
    raw = tfds.data_source(
        name, split=split, data_dir=None if data_dir is None else
        os.fspath(data_dir), download=False, try_gcs=False,
        decoders={"image": tfds.decode.SkipDecoding()})
    image = raw[0]["image"]
  except Exception:  # Any failure: read decoded images instead.
    return None
  return raw if isinstance(image, (bytes, np.bytes_)) else None


def _read_labels(records, name: str) -> np.ndarray:
  """int32 [N]: the label of every record, read in chunks by the decode
  threads."""
  labels = np.empty(len(records), np.int32)
  for start in tqdm.trange(0, len(records), _CHUNK, desc=f"labels of {name}",
                           unit_scale=_CHUNK, disable=None, leave=False):
    stop = min(start + _CHUNK, len(records))
    labels[start:stop] = lazy_lib.parallel_map(
        lambda i: int(records[i]["label"]), range(start, stop))
  return labels


def _cached_labels(records, source, name: str, split: str, cache: Path
                  ) -> np.ndarray:
  """:func:`_read_labels`, kept in ``cache`` keyed by the data's location,
  version, split and size."""
  info = source.dataset_info
  key = "|".join(str(part) for part in (
      os.path.abspath(os.fspath(info.data_dir)), info.full_name, split,
      len(records)))
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  safe = "".join(c if c.isalnum() else "_" for c in f"{name}-{split}")
  path = cache / "tfds_labels" / f"{safe}-{digest}.npy"
  if path.exists():
    labels = np.load(path)
    if labels.shape == (len(records),) and labels.dtype == np.int32:
      return labels
  labels = _read_labels(records, name)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npy")
  np.save(tmp, labels)
  os.replace(tmp, path)
  return labels


def _decode_all(images: lazy_lib.LazyImages, name: str) -> np.ndarray:
  """Every image of ``images`` in host memory, uint8 [N, H, W, 3]."""
  out = np.empty(images.shape, np.uint8)
  for start in tqdm.trange(0, len(images), _CHUNK, desc=f"reading {name}",
                           unit_scale=_CHUNK, disable=None, leave=False):
    out[start:start + _CHUNK] = images[start:start + _CHUNK]
  return out


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes uint8 [H, W, 3] so the shorter side is ``size`` (bilinear), then
  center-crops it to uint8 [size, size, 3] (:func:`~picpq_jax.data.lazy.
  center_crop` with fraction 1)."""
  return lazy_lib.center_crop(lazy_lib.to_rgb(image), size, 1.0)


def _class_names(label_feature) -> tuple[str, ...]:
  """The names of a ClassLabel feature (its indices as text if unnamed)."""
  names = getattr(label_feature, "names", None)
  if names:
    return tuple(names)
  return tuple(str(i) for i in range(label_feature.num_classes))
