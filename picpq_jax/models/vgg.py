"""VGG-16-BN for CIFAR, as in the HRank and PIC-PQ reference code.

Thirteen 3x3 convs (with bias, PyTorch's ``nn.Conv2d`` default) each followed by BN
and ReLU, a 2x2 max-pool at every ``'M'`` of :data:`VGG16_CFG`, a final 2x2 average
pool (2x2 -> 1x1 for 32x32 inputs), then the classifier
``Linear(512, 512) -> BN1d -> ReLU -> Linear(512, num_classes)``. 14.99M parameters,
313.5M MACs per 32x32 image (313.2M in the convs).

Channel groups (the model's ``masks``):

* ``conv{i}`` (``i`` = 1..13): the output channels of the ``i``-th conv (module
  ``layer{i}``), read by the next conv, or by ``linear1`` for ``conv13``.

The 512 outputs of ``linear1`` are not a group: the reference prunes only the
convolutions (its bit-width list has one entry per conv), and a rank-based filter
property is undefined on a 1x1 map. The classifier is named ``head``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from picpq_jax.models.layers import (GroupSizes, QConv, QDense, Span, batch_norm, channel_mask,
                                     check_group_sizes, group_width, in_span)
from picpq_jax.models.quantizer import FullPrecision, Quantizer

Array = jax.Array

# Output widths of the 3x3 convs; 'M' is a 2x2, stride-2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class ConvBNReLU(nn.Module):
  """3x3 conv (bias) -> BN -> ReLU -> channel mask; ``[N, H, W, C] -> [N, H, W, features]``."""

  features: int
  in_group: str | None
  out_group: str
  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, mask: Array, train: bool) -> Array:
    x = QConv(self.features, use_bias=True, in_group=self.in_group, out_group=self.out_group,
              quantizer=self.quantizer, dtype=self.dtype, name="conv")(x)
    return nn.relu(batch_norm(train, "bn")(x)) * mask


class CifarVGG(nn.Module):
  """VGG-BN for 32x32 images; ``[N, 32, 32, 3] -> [N, num_classes]`` logits.

  Attributes:
    cfg: conv widths and ``'M'`` pools (default VGG-16).
    hidden: width of the classifier's hidden layer.
    num_classes: classes of the head.
    quantizer: static quantizer of every conv and dense layer.
    dtype: computation dtype of the conv and dense products, ``"float32"`` or
      ``"bfloat16"`` (mixed precision); parameters, batch norm and the logits'
      bias stay float32.
    group_sizes: static width overrides of the ``conv{i}`` groups (a compacted
      model); ``None`` keeps ``cfg``.
    span: run only these of :meth:`pieces` (split learning); a ``conv{i}`` mask
      is created only where its conv runs.
  """

  cfg: Sequence[int | str] = VGG16_CFG
  hidden: int = 512
  num_classes: int = 10
  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"
  group_sizes: GroupSizes = None
  span: Span = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    convs = sum(1 for v in self.cfg if v != "M")
    check_group_sizes(self.group_sizes, [f"conv{i + 1}" for i in range(convs)])
    group = None
    convs = piece = 0
    for v in self.cfg:
      if v == "M":
        if in_span(self.span, piece):
          x = nn.max_pool(x, (2, 2), strides=(2, 2))
        piece += 1
        continue
      convs += 1
      name = f"conv{convs}"
      width = group_width(self.group_sizes, name, v)
      if in_span(self.span, piece):
        x = ConvBNReLU(width, in_group=group, out_group=name, quantizer=self.quantizer,
                       dtype=self.dtype, name=f"layer{convs}")(x, channel_mask(self, name, width), train)
      group = name
    if in_span(self.span, piece):
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    if not in_span(self.span, piece + 1):
      return x
    x = x.reshape(x.shape[0], -1)
    x = QDense(self.hidden, in_group=group, quantizer=self.quantizer,
               dtype=self.dtype, name="linear1")(x)
    x = nn.relu(batch_norm(train, "norm1")(x))
    return QDense(self.num_classes, quantizer=self.quantizer, dtype=self.dtype, name="head")(x)

  def pieces(self) -> tuple[str, ...]:
    """The model's pieces in order (see :data:`~picpq_jax.models.layers.Span`):
    ``group{k}``, the convs before the ``k``-th pool and that pool (a 2x2 max-pool at
    each ``'M'``, the final 2x2 average pool after the last group), then the head
    (flatten and classifier). VGG-16: ``group1`` = conv1-2, ``group2`` = conv3-4,
    ``group3`` = conv5-7, ``group4`` = conv8-10, ``group5`` = conv11-13."""
    groups = sum(1 for v in self.cfg if v == "M") + 1
    return (*(f"group{k + 1}" for k in range(groups)), "head")
