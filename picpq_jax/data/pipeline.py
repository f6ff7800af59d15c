"""The input pipeline: deterministic split and shuffle, per-host batches,
jitted augmentation and normalization.

Batch order is a pure function of ``(seed, step)``: step ``k`` is batch
``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``, and an epoch's
order depends only on ``(seed, epoch)``. A run resumed at step ``k`` sees the
batches an uninterrupted run would have seen, on every host.

Host-side work (indices, gathering uint8 batches) is numpy; per-pixel work
(:func:`augment`, :func:`normalize`) is jitted JAX, meant to run on device
inside or beside the train step. The exception is ImageNet's random-resized
crop (:func:`augmentation` ``"imagenet"``): it draws its box on the original,
variable-sized image, so it runs on the host as the images are decoded
(:class:`~picpq_jax.data.lazy.LazyImages`), and :func:`iterate_batches` gives
it the epoch so its draws are a function of ``(seed, epoch, example)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax.data.dataset import ImageDataset
from picpq_jax.data.lazy import as_lazy, LazyImages, RandomResizedCrop
from picpq_jax.errors import UserError

# Per-channel (R, G, B) mean and standard deviation of the CIFAR-10 training
# images, in [0, 1] units (pixel / 255), over all 50,000 x 32 x 32 pixels.
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)

Batch = dict[str, np.ndarray]

# Training augmentations (:func:`augmentation`) and the center-crop fraction of
# the evaluation transform each goes with (``load_dataset(center_crop=...)``):
# ImageNet evaluates on the central 224 of images resized to 256.
AUGMENTATIONS = ("cifar", "imagenet")
EVAL_CENTER_CROP = {"cifar": 1.0, "imagenet": 0.875}
# Lazy images: channel_stats samples at most this many, evenly spaced.
STATS_MAX_LAZY_IMAGES = 10_000


def _check_seed(seed: int) -> None:
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise UserError(f"seed must be a non-negative int, got {seed!r}; pass "
                    "e.g. seed=0")


def train_val_split(ds: ImageDataset, val_size: int, seed: int
                   ) -> tuple[ImageDataset, ImageDataset]:
  """Splits ``ds`` into disjoint train and validation sets, covering it.

  A permutation of ``range(len(ds))`` is drawn from ``seed``
  (``np.random.default_rng(seed)``); its last ``val_size`` indices are the
  validation set, the rest the training set, each kept in ``ds``'s order.

  Args:
    ds: N examples.
    val_size: number of validation examples, ``0 <= val_size < N``.
    seed: a non-negative int.

  Returns:
    ``(train, val)`` with ``N - val_size`` and ``val_size`` examples.
  """
  _check_seed(seed)
  if not 0 <= val_size < len(ds):
    raise UserError(f"val_size must lie in [0, {len(ds)}) for a dataset of "
                    f"{len(ds)} examples, got {val_size}; pass a smaller "
                    "val_size")
  order = np.random.default_rng(seed).permutation(len(ds))
  cut = len(ds) - val_size
  return ds.subset(np.sort(order[:cut])), ds.subset(np.sort(order[cut:]))


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation, in [0, 1] units.

  Exact: computed from each channel's histogram of the 256 pixel values. For
  :class:`~picpq_jax.data.lazy.LazyImages`, over an evenly spaced sample of at
  most :data:`STATS_MAX_LAZY_IMAGES` images (decoding ImageNet's 1.28M to
  estimate 6 numbers would take longer than an epoch's worth of startup).

  Args:
    images: uint8 [N, H, W, C], an array or LazyImages.

  Returns:
    ``(mean, std)``, each float32 [C], of ``images / 255`` over N, H and W
    (population std).
  """
  if isinstance(images, LazyImages):
    if len(images) == 0:
      raise UserError("channel_stats needs at least one image, got 0")
    # Decoding all of ImageNet for 6 numbers is not worth it: a sample.
    picks = np.unique(np.linspace(0, len(images) - 1, min(
        len(images), STATS_MAX_LAZY_IMAGES)).round().astype(np.int64))
    counts = sum(_histogram(images[chunk])
                 for chunk in np.array_split(picks, -(-len(picks) // 256)))
  else:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
      raise UserError(f"channel_stats needs uint8 images [N, H, W, C] with "
                      f"N > 0, got {images.dtype} {images.shape}")
    counts = _histogram(images)
  total = counts[0].sum()
  values = np.arange(256, dtype=np.float64) / 255
  mean = counts @ values / total  # [C]
  var = (counts * np.square(values - mean[:, None])).sum(1) / total
  return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def _histogram(images: np.ndarray) -> np.ndarray:
  """float64 [C, 256]: how many pixels of each channel take each value."""
  pixels = images.reshape(-1, images.shape[-1])
  return np.stack([np.bincount(pixels[:, c], minlength=256)
                   for c in range(pixels.shape[1])]).astype(np.float64)


@jax.jit
def normalize(images: jax.Array, mean, std) -> jax.Array:
  """``(images / 255 - mean) / std``, per channel.

  Args:
    images: uint8 (or float in [0, 255]) [..., H, W, C].
    mean: float [C], in [0, 1] units (e.g. :data:`CIFAR10_MEAN`).
    std: float [C], in [0, 1] units (e.g. :data:`CIFAR10_STD`).

  Returns:
    float32 [..., H, W, C].
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std


@functools.partial(jax.jit, static_argnames=("padding",))
def augment(key: jax.Array, images: jax.Array, padding: int = 4) -> jax.Array:
  """Random crop after zero padding, then random horizontal flip, per image.

  Each image is zero-padded by ``padding`` pixels on every side and cropped
  back to H x W at offsets ``(dy, dx)`` drawn uniformly from
  ``[0, 2 * padding]``, then mirrored left-right with probability 1/2. With
  ``k_y, k_x, k_flip = jax.random.split(key, 3)``: ``dy =
  jax.random.randint(k_y, (N,), 0, 2 * padding + 1)``, likewise ``dx`` from
  ``k_x``, ``flip = jax.random.bernoulli(k_flip, 0.5, (N,))``. Output pixel
  ``[n, i, j]`` is ``padded[n, dy + i, dx + j]``, or ``padded[n, dy + i, dx +
  W - 1 - j]`` when flipped. One gather, no Python loop; compiled once per
  batch shape and dtype.

  Args:
    key: a ``jax.random`` key.
    images: [N, H, W, C], any dtype (uint8 or float).
    padding: pixels of zero padding per side (static).

  Returns:
    [N, H, W, C], the dtype of ``images``.
  """
  if images.ndim != 4:
    raise UserError(f"augment needs images [N, H, W, C], got shape "
                    f"{images.shape}; add a batch axis")
  n, h, w, _ = images.shape
  k_y, k_x, k_flip = jax.random.split(key, 3)
  dy = jax.random.randint(k_y, (n,), 0, 2 * padding + 1)
  dx = jax.random.randint(k_x, (n,), 0, 2 * padding + 1)
  flip = jax.random.bernoulli(k_flip, 0.5, (n,))
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding),
                            (0, 0)))
  rows = dy[:, None] + jnp.arange(h)  # [N, H]
  cols = jnp.where(flip[:, None], w - 1 - jnp.arange(w), jnp.arange(w))
  cols = dx[:, None] + cols  # [N, W]
  return padded[jnp.arange(n)[:, None, None], rows[:, :, None],
                cols[:, None, :]]


def steps_per_epoch(num_examples: int, batch_size: int,
                    drop_remainder: bool = True) -> int:
  """Global batches per epoch: ``N // B``, or ``ceil(N / B)`` when the last,
  partial batch is kept."""
  if batch_size < 1:
    raise UserError(f"batch_size must be positive, got {batch_size}")
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def batch_indices(num_examples: int, batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True, drop_remainder: bool = True
                 ) -> np.ndarray:
  """The example indices of every global batch of one epoch.

  The order is ``np.random.default_rng([seed, epoch]).permutation(N)`` (or
  ``arange(N)`` without shuffling), a function of ``(seed, epoch)`` only, cut
  into consecutive batches.

  Args:
    num_examples: N, the dataset size.
    batch_size: B, the global batch size.
    seed: a non-negative int.
    epoch: a non-negative int.
    shuffle: whether to permute the examples.
    drop_remainder: drop the last ``N % B`` examples of the order; otherwise
      keep them in a last batch padded with ``-1``.

  Returns:
    int64 [num_batches, B]; ``-1`` marks padding (only if not
    ``drop_remainder``).
  """
  _check_seed(seed)
  if epoch < 0:
    raise UserError(f"epoch must be non-negative, got {epoch}")
  num_batches = steps_per_epoch(num_examples, batch_size, drop_remainder)
  if num_batches == 0:
    raise UserError(f"batch_size {batch_size} exceeds the {num_examples} "
                    "examples, so an epoch has no full batch; lower "
                    "batch_size or pass drop_remainder=False")
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  else:
    order = np.arange(num_examples)
  padded = np.full(num_batches * batch_size, -1, np.int64)
  kept = min(num_examples, padded.size)
  padded[:kept] = order[:kept]
  return padded.reshape(num_batches, batch_size)


def _host_slice(batch_size: int, process_index: int | None,
                process_count: int | None) -> slice:
  """This process's contiguous slice of a global batch."""
  count = jax.process_count() if process_count is None else process_count
  index = jax.process_index() if process_index is None else process_index
  if count < 1 or not 0 <= index < count:
    raise UserError(f"process_index must lie in [0, process_count), got "
                    f"{index} of {count}")
  if batch_size < 1 or batch_size % count:
    raise UserError(f"batch_size {batch_size} must be a positive multiple of "
                    f"the {count} processes; pass a batch_size divisible by "
                    f"{count}")
  local = batch_size // count
  return slice(index * local, (index + 1) * local)


def _gather(ds: ImageDataset, indices: np.ndarray, with_mask: bool,
            draw: tuple[int, int] | None = None) -> Batch:
  """Examples at ``indices`` int [B] (``-1``: padding, zeros, mask False);
  ``draw=(seed, epoch)`` lets LazyImages apply their training augmentation."""
  valid = indices >= 0
  safe = np.where(valid, indices, 0)
  if draw is not None and isinstance(ds.images, LazyImages):
    images = ds.images.draw(safe, *draw)
  else:
    images = ds.images[safe]
  batch = {"image": images, "label": ds.labels[safe]}
  if with_mask:
    batch["image"][~valid] = 0
    batch["label"][~valid] = 0
    batch["mask"] = valid
  return batch


def iterate_batches(ds: ImageDataset, batch_size: int, seed: int,
                    start_step: int = 0, shuffle: bool = True,
                    drop_remainder: bool = True,
                    process_index: int | None = None,
                    process_count: int | None = None) -> Iterator[Batch]:
  """Endless training batches, this process's share, from ``start_step`` on.

  Step ``k`` is batch ``k % S`` of epoch ``k // S`` (``S`` =
  :func:`steps_per_epoch`), indices from :func:`batch_indices`. The global
  batch is cut into ``process_count`` contiguous slices and this process gets
  slice ``process_index``. Images that are :class:`LazyImages` with an
  ``augment`` come out augmented (:meth:`LazyImages.draw` with ``(seed,
  epoch)``).

  Args:
    ds: the training set.
    batch_size: B, the global batch size, a multiple of ``process_count``.
    seed: a non-negative int; the same seed gives the same batches.
    start_step: the first step to yield (resume from a checkpoint's step).
    shuffle: permute examples each epoch.
    drop_remainder: drop each epoch's last partial batch; otherwise it is
      padded and every batch carries a ``mask``.
    process_index: this process, default ``jax.process_index()``.
    process_count: processes, default ``jax.process_count()``.

  Returns:
    An endless iterator of ``{"image": uint8 [B / P, H, W, 3], "label": int32
    [B / P]}`` (plus ``"mask": bool [B / P]`` if not ``drop_remainder``).
  """
  local = _host_slice(batch_size, process_index, process_count)
  if start_step < 0:
    raise UserError(f"start_step must be non-negative, got {start_step}")
  steps = steps_per_epoch(len(ds), batch_size, drop_remainder)
  batch_indices(len(ds), batch_size, seed, 0, shuffle,
                drop_remainder)  # Validates now, not at the first next().
  return _endless(ds, batch_size, seed, start_step, shuffle, drop_remainder,
                  local, steps)


def _endless(ds: ImageDataset, batch_size: int, seed: int, step: int,
             shuffle: bool, drop_remainder: bool, local: slice, steps: int
            ) -> Iterator[Batch]:
  epoch, order = -1, None
  while True:
    if step // steps != epoch:
      epoch = step // steps
      order = batch_indices(len(ds), batch_size, seed, epoch, shuffle,
                            drop_remainder)
    yield _gather(ds, order[step % steps, local], with_mask=not drop_remainder,
                  draw=(seed, epoch))
    step += 1


def eval_batches(ds: ImageDataset, batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Batch]:
  """One pass over ``ds`` in order, each example exactly once across hosts.

  The last global batch is padded to ``batch_size`` with zero images whose
  ``mask`` is False, so every batch has one shape (one compilation) and
  ``sum(metric * mask)`` counts each example once. Hosts split each global
  batch as in :func:`iterate_batches`.

  Args:
    ds: the evaluation set.
    batch_size: B, the global batch size, a multiple of ``process_count``.
    process_index: this process, default ``jax.process_index()``.
    process_count: processes, default ``jax.process_count()``.

  Returns:
    An iterator of ``ceil(N / B)`` dicts ``{"image": uint8 [B / P, H, W, 3],
    "label": int32 [B / P], "mask": bool [B / P]}``.
  """
  local = _host_slice(batch_size, process_index, process_count)
  if len(ds) == 0:
    return iter(())
  order = batch_indices(len(ds), batch_size, 0, 0, shuffle=False,
                        drop_remainder=False)
  return (_gather(ds, row[local], with_mask=True) for row in order)


def augmentation(name: str, train: ImageDataset
                ) -> tuple[ImageDataset, Callable[[jax.Array, jax.Array], jax.Array]]:
  """The training set to batch and the on-device augmentation, for ``name``.

  - ``"cifar"``: ``(train, augment)``: pad-4 random crop and flip on device
    (:func:`augment`).
  - ``"imagenet"``: ``(train', identity)``, where ``train'`` holds the same
    examples with images that :func:`iterate_batches` draws as random-resized
    crops (scale 0.08-1, aspect 3/4-4/3) plus flips, at the images' size, on
    the host (:class:`~picpq_jax.data.lazy.RandomResizedCrop`); plain
    indexing and :func:`eval_batches` still give the evaluation images. In
    memory images are wrapped (the crop is drawn on them); LazyImages draw it
    on the original decoded image.

  Args:
    name: one of :data:`AUGMENTATIONS`.
    train: the training set, images [N, S, S, 3].

  Returns:
    ``(dataset, fn)`` with ``fn(key, uint8 [B, S, S, 3]) -> [B, S, S, 3]``,
    jittable.
  """
  if name == "cifar":
    return train, augment
  if name != "imagenet":
    raise UserError(f"unknown augmentation {name!r}; pick one of "
                    f"{', '.join(AUGMENTATIONS)}")
  height, width = train.image_shape[:2]
  if height != width:
    raise UserError(f"the imagenet augmentation makes square crops, but the "
                    f"images are {width}x{height}; pass image_size to load "
                    "square images")
  images = as_lazy(train.images).with_augment(RandomResizedCrop(size=height))
  return ImageDataset(images, train.labels, train.class_names), _identity


def _identity(key: jax.Array, images: jax.Array) -> jax.Array:
  del key
  return images
