"""Images decoded on demand: a drop-in for uint8 image arrays too large for
host memory, and the ImageNet transforms (random-resized crop, center crop).

ImageNet's 1.28M training images take ~190 GB as uint8 at 224 x 224, so
:class:`LazyImages` keeps only a way to read each image's record (its encoded
bytes, or an array already decoded) and decodes, resizes and crops just the
images a batch asks for, in a small thread pool (Pillow releases the GIL while
it decodes and resamples, so threads scale with the cores). It behaves like
the uint8 ``[N, S, S, 3]`` array it stands for: ``shape``, ``dtype``,
``len``, and numpy indexing (an int, a slice, int or bool arrays) that returns
decoded numpy arrays. Subsets compose their indices without decoding
(:meth:`LazyImages.view`, used by :meth:`ImageDataset.subset`), so
``train_val_split``, ``iterate_batches``, ``eval_batches`` and
``dataset.images[idx]`` work on it unchanged.

Two transforms of a decoded image (uint8 RGB ``[H, W, 3]`` of any size):

- :class:`CenterCrop` (what indexing returns): resize so the shorter side is
  ``round(size / fraction)`` (bilinear), then crop the central ``size x
  size``. ``fraction=0.875`` is the standard ImageNet evaluation transform
  (resize 256, center-crop 224); ``fraction=1`` keeps the whole shorter side.
- :class:`RandomResizedCrop` (what training batches get, see
  :meth:`LazyImages.with_augment` and :meth:`LazyImages.draw`): torchvision's
  ``RandomResizedCrop`` box (area ``scale``, aspect ``ratio``, 10 tries, then
  a center crop) resampled to ``size x size`` (bilinear, antialiased), then a
  horizontal flip with probability 1/2.

Why on the host: the crop box must be drawn on the original, variable-sized
image, which only exists on the host (device arrays need one shape), and the
resample is cheap next to the JPEG decode every image needs anyway (measured in
``experiments/data/bench_lazy.py``). A device-side crop would need a
fixed-size intermediate that drops the borders of non-square images.

JPEG records are decoded at a reduced scale (Pillow's ``draft``: 1/2, 1/4 or
1/8 in the DCT) when the output still has at least the pixels the resample
needs; only images more than twice the needed size are affected.

Draws are deterministic: example ``i`` (its position in the source) in epoch
``e`` of a run seeded ``s`` uses ``np.random.default_rng([s, e, i])``, so a
batch's augmentation depends neither on the batch size, the host count, the
thread count nor on when a run was resumed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import math
import os
from typing import Any, Callable

import numpy as np
from PIL import Image

from picpq_jax.errors import UserError

# What a record reader returns: encoded image bytes, or a decoded uint8 array
# [H, W], [H, W, 1] or [H, W, 3].
Record = Any


@dataclasses.dataclass(frozen=True)
class CenterCrop:
  """Resize the shorter side to ``round(size / fraction)``, crop the central
  ``size x size`` (the evaluation transform)."""

  size: int
  fraction: float = 1.0

  def __post_init__(self):
    if not isinstance(self.size, (int, np.integer)) or self.size < 1:
      raise UserError(f"image_size must be a positive int, got {self.size!r}; "
                      "pass e.g. image_size=224")
    if not 0.0 < self.fraction <= 1.0:
      raise UserError(f"center_crop must lie in (0, 1], got {self.fraction!r};"
                      " pass 1.0 (whole shorter side) or 0.875 (ImageNet)")


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
  """A random box of ``scale`` x the image area and aspect (w / h) in
  ``ratio``, resampled to ``size x size``, flipped left-right with
  probability 1/2 if ``flip``."""

  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True

  def __post_init__(self):
    if not isinstance(self.size, (int, np.integer)) or self.size < 1:
      raise UserError(f"RandomResizedCrop.size must be a positive int, got "
                      f"{self.size!r}")
    if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
      raise UserError(f"RandomResizedCrop.scale must satisfy 0 < lo <= hi <= "
                      f"1, got {self.scale}")
    if not 0.0 < self.ratio[0] <= self.ratio[1]:
      raise UserError(f"RandomResizedCrop.ratio must satisfy 0 < lo <= hi, "
                      f"got {self.ratio}")


# --- Decoding and transforms of one image.

def open_image(record: Record) -> Image.Image:
  """A Pillow image of ``record``: encoded bytes (not yet decoded: call
  ``draft`` before touching pixels) or a uint8 array [H, W], [H, W, 1|3]."""
  if isinstance(record, np.ndarray) and record.dtype == object:
    record = record.item()
  if isinstance(record, (bytes, bytearray, memoryview, np.bytes_)):
    try:
      return Image.open(io.BytesIO(bytes(record)))
    except (OSError, ValueError) as e:
      raise UserError(f"cannot decode an image record ({e}); the dataset "
                      "files may be damaged: rebuild them") from None
  return Image.fromarray(to_rgb(np.asarray(record)))


def to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W] or [H, W, 1|3] to uint8 [H, W, 3] (gray repeated)."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise UserError(f"an image record has shape {image.shape}, not [H, W], "
                    "[H, W, 1] or [H, W, 3]; pick an RGB or grayscale dataset")
  return image.astype(np.uint8, copy=False)


def _rgb(image: Image.Image) -> Image.Image:
  return image if image.mode == "RGB" else image.convert("RGB")


def center_crop(record: Record, size: int, fraction: float = 1.0) -> np.ndarray:
  """The evaluation transform of :class:`CenterCrop`.

  The image (``W x H``) is resized (Pillow bilinear) to ``max(R, round(W *
  R / min(W, H)))`` by ``max(R, round(H * R / min(W, H)))`` with ``R =
  round(size / fraction)``, then cropped at ``top = (new_h - size) // 2``,
  ``left = (new_w - size) // 2``.

  Args:
    record: encoded bytes or a uint8 array [H, W(, C)].
    size: the output side.
    fraction: the kept fraction of the resized shorter side, in (0, 1].

  Returns:
    uint8 [size, size, 3].
  """
  image = open_image(record)
  short = round(size / fraction)
  width, height = image.size
  scale = short / min(width, height)
  new_w = max(short, round(width * scale))
  new_h = max(short, round(height * scale))
  image.draft("RGB", (new_w, new_h))  # JPEG only; never below (new_w, new_h)
  resized = np.asarray(_rgb(image).resize((new_w, new_h),
                                          Image.Resampling.BILINEAR))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.ascontiguousarray(resized[top:top + size, left:left + size])


def random_resized_crop_box(rng, height: int, width: int,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                           ) -> tuple[int, int, int, int]:
  """torchvision's ``RandomResizedCrop.get_params``, drawing from ``rng``.

  Up to 10 tries: ``area = H * W * rng.uniform(*scale)``, ``aspect =
  exp(rng.uniform(log(ratio[0]), log(ratio[1])))``, ``w = round(sqrt(area *
  aspect))``, ``h = round(sqrt(area / aspect))``; the first try with ``0 < w
  <= W`` and ``0 < h <= H`` places the box at ``top = rng.integers(0, H - h
  + 1)``, ``left = rng.integers(0, W - w + 1)``. If none fits: the largest
  central box with aspect clamped to ``ratio``.

  Args:
    rng: a ``np.random.Generator`` (anything with its ``uniform`` and
      ``integers``).
    height, width: the image size.
    scale: the box area as a fraction of the image's, ``(lo, hi)``.
    ratio: the box aspect ``w / h``, ``(lo, hi)``.

  Returns:
    ``(top, left, h, w)`` ints, the box inside the image.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(record: Record, rng, augment: RandomResizedCrop
                       ) -> np.ndarray:
  """The training transform of :class:`RandomResizedCrop`.

  Draws the box with :func:`random_resized_crop_box` on the image's full
  size, then ``flip = rng.random() < 0.5`` (if ``augment.flip``), resamples
  the box to ``size x size`` (Pillow bilinear with ``box=``, so edge pixels
  blend with their true neighbours), and mirrors it left-right if ``flip``.

  Args:
    record: encoded bytes or a uint8 array [H, W(, C)].
    rng: a ``np.random.Generator``.
    augment: the crop's size, scale and ratio ranges and flip.

  Returns:
    uint8 [size, size, 3].
  """
  image = open_image(record)
  width, height = image.size
  top, left, h, w = random_resized_crop_box(rng, height, width, augment.scale,
                                            augment.ratio)
  flip = bool(augment.flip and rng.random() < 0.5)
  size = augment.size
  # Decode no smaller than the box needs: box side x (decoded / full) >= size.
  image.draft("RGB", (math.ceil(width * size / w), math.ceil(height * size / h)))
  image = _rgb(image)
  sx, sy = image.size[0] / width, image.size[1] / height
  out = np.asarray(image.resize(
      (size, size), Image.Resampling.BILINEAR,
      box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy)))
  return np.ascontiguousarray(out[:, ::-1] if flip else out)


def decode(record: Record, shape: tuple[int, int, int]) -> np.ndarray:
  """``record`` decoded as is, uint8 [H, W, 3], checked against ``shape``."""
  image = np.asarray(_rgb(open_image(record)))
  if image.shape != tuple(shape):
    raise UserError(f"an image is {image.shape[1]}x{image.shape[0]}, the "
                    f"dataset's are {shape[1]}x{shape[0]}; pass image_size "
                    "to resize them to one size")
  return image


# --- The array-like.

def default_workers() -> int:
  """Decode threads: ``$PICPQ_DECODE_THREADS``, else the CPU count (at most
  32)."""
  text = os.environ.get("PICPQ_DECODE_THREADS", "")
  if text:
    try:
      value = int(text)
    except ValueError:
      value = 0
    if value < 1:
      raise UserError(f"PICPQ_DECODE_THREADS={text!r} is not a positive int;"
                      " set it to e.g. 8 or unset it")
    return value
  return max(1, min(32, os.cpu_count() or 1))


@functools.lru_cache(maxsize=4)
def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(
      workers, thread_name_prefix="picpq-decode")


def parallel_map(fn: Callable[[int], Any], items, workers: int | None = None
                ) -> list:
  """``[fn(x) for x in items]``, computed in the decode thread pool."""
  workers = default_workers() if workers is None else workers
  if workers == 1:
    return [fn(x) for x in items]
  return list(_pool(workers).map(fn, items))


def _positions(key, length: int) -> np.ndarray:
  """Positions in ``[0, length)`` selected by ``key`` (an int array, a bool
  mask of ``length``, a slice or a list), int64 of ``key``'s shape."""
  if isinstance(key, slice):
    return np.arange(*key.indices(length), dtype=np.int64)
  key = np.asarray(key)
  if key.dtype == np.bool_:
    if key.shape != (length,):
      raise IndexError(f"boolean index of shape {key.shape} does not match "
                       f"{length} images")
    return np.flatnonzero(key).astype(np.int64)
  if key.size == 0:
    return np.zeros(key.shape, np.int64)
  if not np.issubdtype(key.dtype, np.integer):
    raise IndexError(f"images can be indexed by ints, slices or int/bool "
                     f"arrays, not {key.dtype}")
  if key.min() < -length or key.max() >= length:
    raise IndexError(f"index {int(key.max() if key.max() >= length else key.min())}"
                     f" is out of bounds for {length} images")
  return np.where(key < 0, key + length, key).astype(np.int64)


class LazyImages:
  """uint8 images ``[N, H, W, 3]`` that exist as records until indexed.

  Args:
    read: ``read(i)`` -> the record of source example ``i`` (encoded bytes or
      a uint8 array); called from several threads at once.
    num_records: examples in the source.
    image_shape: ``(H, W, 3)`` of the source's images; used when
      ``resize`` is None (every record must decode to this shape).
    resize: the transform that indexing applies (:class:`CenterCrop`), or
      None to return images as decoded.
    augment: the transform that :meth:`draw` applies, or None (then
      :meth:`draw` is plain indexing).
    indices: the source examples this array holds, int [N]; default all.
    workers: decode threads; default :func:`default_workers`.
  """

  def __init__(self, read: Callable[[int], Record], num_records: int,
               image_shape: tuple[int, int, int] | None = None,
               resize: CenterCrop | None = None,
               augment: RandomResizedCrop | None = None,
               indices: np.ndarray | None = None, workers: int | None = None):
    if resize is not None:
      image_shape = (resize.size, resize.size, 3)
    if image_shape is None or len(image_shape) != 3 or image_shape[-1] != 3:
      raise UserError(f"LazyImages needs image_shape (H, W, 3) or resize, got "
                      f"{image_shape}")
    if augment is not None and tuple(image_shape[:2]) != (augment.size,) * 2:
      raise UserError(f"a {augment.size}x{augment.size} random crop does not "
                      f"match images of {image_shape[1]}x{image_shape[0]}; "
                      "crop to the images' size")
    self._read = read
    self._num_records = int(num_records)
    self._image_shape = tuple(int(d) for d in image_shape)
    self._resize = resize
    self._augment = augment
    self._indices = (np.arange(self._num_records, dtype=np.int64)
                     if indices is None else np.asarray(indices, np.int64))
    self._workers = default_workers() if workers is None else int(workers)

  # -- numpy-like attributes
  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self._indices),) + self._image_shape

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.uint8)

  @property
  def ndim(self) -> int:
    return 4

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def __len__(self) -> int:
    return len(self._indices)

  def __repr__(self) -> str:
    return (f"LazyImages(shape={self.shape}, resize={self._resize}, "
            f"augment={self._augment})")

  @property
  def source_indices(self) -> np.ndarray:
    """int64 [N]: the source example behind each image (a copy)."""
    return self._indices.copy()

  @property
  def augment(self) -> RandomResizedCrop | None:
    """The transform :meth:`draw` applies (None: plain indexing)."""
    return self._augment

  # -- views (no decoding)
  def _replace(self, **changes) -> LazyImages:
    fields = dict(read=self._read, num_records=self._num_records,
                  image_shape=self._image_shape, resize=self._resize,
                  augment=self._augment, indices=self._indices,
                  workers=self._workers)
    return LazyImages(**{**fields, **changes})

  def view(self, indices) -> LazyImages:
    """The images at ``indices`` (int [M], bool [N] or a slice), as a
    LazyImages; nothing is decoded. Raises IndexError out of bounds."""
    positions = _positions(indices, len(self))
    return self._replace(indices=self._indices[positions.reshape(-1)])

  def with_augment(self, augment: RandomResizedCrop | None) -> LazyImages:
    """The same images, with :meth:`draw` applying ``augment``."""
    return self._replace(augment=augment)

  # -- decoding
  def _decode_many(self, sources: np.ndarray, one: Callable[[int, int], np.ndarray]
                  ) -> np.ndarray:
    out = np.empty((len(sources),) + self.shape[1:], np.uint8)

    def fill(k: int) -> None:
      out[k] = one(k, int(sources[k]))

    parallel_map(fill, range(len(sources)),
                 1 if len(sources) <= 1 else self._workers)
    return out

  def _plain(self, source: int) -> np.ndarray:
    record = self._read(source)
    if self._resize is None:
      return decode(record, self._image_shape)
    return center_crop(record, self._resize.size, self._resize.fraction)

  def __getitem__(self, key) -> np.ndarray:
    """Decoded images, numpy semantics: an int gives uint8 [H, W, 3]; a slice,
    int array [...] or bool mask gives uint8 [..., H, W, 3]; a tuple applies
    its rest to that."""
    if isinstance(key, tuple):
      first, rest = (key[0], key[1:]) if key else (slice(None), ())
      if first is Ellipsis:
        return np.asarray(self)[key]
      out = self[first]
      scalar = isinstance(first, (int, np.integer))
      return out[rest] if scalar else out[(slice(None),) + rest]
    if isinstance(key, (int, np.integer)):
      position = _positions(np.asarray([key]), len(self))[0]
      return self._plain(int(self._indices[position]))
    positions = _positions(key, len(self))
    sources = self._indices[positions.reshape(-1)]
    out = self._decode_many(sources, lambda k, s: self._plain(s))
    return out.reshape(positions.shape + self.shape[1:])

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy  # always a new array
    out = self[:]
    return out if dtype is None else out.astype(dtype)

  def __iter__(self):
    for i in range(len(self)):
      yield self[i]

  def draw(self, indices, seed: int, epoch: int) -> np.ndarray:
    """Training images at ``indices`` (int [M]): :attr:`augment` applied with
    ``np.random.default_rng([seed, epoch, source index])`` per image, or plain
    indexing when :attr:`augment` is None.

    Returns:
      uint8 [M, H, W, 3].
    """
    if self._augment is None:
      return self[indices]
    positions = _positions(indices, len(self)).reshape(-1)
    augment = self._augment

    def one(k: int, source: int) -> np.ndarray:
      del k
      rng = np.random.default_rng([int(seed), int(epoch), source])
      return random_resized_crop(self._read(source), rng, augment)

    return self._decode_many(self._indices[positions], one)


def array_reader(images: np.ndarray) -> Callable[[int], np.ndarray]:
  """A record reader over an in-memory uint8 array [N, H, W, 3]."""
  return images.__getitem__


def as_lazy(images: np.ndarray | LazyImages) -> LazyImages:
  """``images`` as a LazyImages (an in-memory array is wrapped, not copied)."""
  if isinstance(images, LazyImages):
    return images
  images = np.asarray(images)
  return LazyImages(array_reader(images), len(images), images.shape[1:])
