"""A labelled image dataset, the type every data source returns.

Images are a uint8 numpy array in host memory, or a :class:`LazyImages` (same
shape, dtype and indexing, decoded on demand) for datasets too large for it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from picpq_jax.data.lazy import LazyImages
from picpq_jax.errors import UserError


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
  """Images and integer labels, channels last.

  Attributes:
    images: uint8 [N, H, W, 3], RGB pixels in [0, 255]: a numpy array, or a
      :class:`LazyImages` that decodes the images an index asks for.
    labels: int32 [N], each in ``[0, len(class_names))``.
    class_names: the name of each label index, ``class_names[label]``.
  """

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]

  def __post_init__(self):
    images, labels = self.images, self.labels
    lazy = isinstance(images, LazyImages)
    if not lazy and (not isinstance(images, np.ndarray)
                     or images.dtype != np.uint8):
      raise UserError(
          f"ImageDataset.images must be a uint8 numpy array, got "
          f"{type(images).__name__} {getattr(images, 'dtype', '')}; convert "
          "with np.asarray(images, np.uint8)")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise UserError(
          f"ImageDataset.images must have shape [N, H, W, 3], got "
          f"{images.shape}; convert images to RGB, channels last")
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int32:
      raise UserError(
          f"ImageDataset.labels must be an int32 numpy array, got "
          f"{type(labels).__name__} {getattr(labels, 'dtype', '')}; convert "
          "with np.asarray(labels, np.int32)")
    if labels.shape != (images.shape[0],):
      raise UserError(
          f"ImageDataset.labels must have shape [{images.shape[0]}] (one per "
          f"image), got {labels.shape}; pass one label per image")
    object.__setattr__(self, "class_names", tuple(self.class_names))
    if not self.class_names:
      raise UserError("ImageDataset.class_names is empty; pass one name per "
                      "class")
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise UserError(
          f"ImageDataset.labels must lie in [0, {self.num_classes}), got "
          f"[{labels.min()}, {labels.max()}]; pass one class name per label")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def num_classes(self) -> int:
    """The number of classes, ``len(class_names)``."""
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """The shape of one image, ``(H, W, 3)``."""
    return tuple(self.images.shape[1:])

  def subset(self, indices) -> ImageDataset:
    """The examples at ``indices`` (int [M] or bool [N]), in that order.

    Returns a new dataset with images uint8 [M, H, W, 3] and labels int32 [M]
    (copies, not views; for :class:`LazyImages`, a lazy view that decodes
    nothing) and the same class names.
    """
    indices = np.asarray(indices)
    if indices.dtype != np.bool_ and not np.issubdtype(indices.dtype,
                                                       np.integer):
      if indices.size:
        raise UserError(
            f"ImageDataset.subset needs integer or boolean indices, got "
            f"{indices.dtype}; pass e.g. np.arange(10)")
      indices = indices.astype(np.int64)
    try:
      labels = self.labels[indices]
      if isinstance(self.images, LazyImages):
        images = self.images.view(indices)
      else:
        images = self.images[indices]
    except IndexError as e:
      raise UserError(
          f"ImageDataset.subset: {e}; indices must lie in [0, {len(self)})"
      ) from None
    return ImageDataset(images, labels, self.class_names)
