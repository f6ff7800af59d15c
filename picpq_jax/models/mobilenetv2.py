"""MobileNetV2 (Sandler et al. 2018), the common CIFAR variant.

A 3x3 stride-1 stem conv to 32 channels, seven stages of inverted residual blocks
given by :data:`CIFAR_CFG` ``(t, c, n, s)`` (expansion, width, blocks, stride of the
first block; the second stage has stride 1 instead of ImageNet's 2, so a 32x32 image
ends at 4x4), a 1x1 conv to 1280 channels, global average pooling and a linear head.
ReLU6 throughout; the projection of a block is linear (no activation). A block adds
its input when it keeps both the stride (1) and the width. Widths follow
torchvision's ``width_mult`` rounding to multiples of 8. At width 1.0 with 10
classes: 2.24M parameters, 88.0M MACs per 32x32 image (the widespread kuangliu
``pytorch-cifar`` variant adds a 1x1 expand conv to the ``t = 1`` block and 1x1
shortcut convs where the width changes at stride 1: +3.2M MACs).

Channel groups (the model's ``masks``):

* ``stem``: the stem's output, written by ``stem_conv``; the first stage (``t = 1``,
  no expansion) filters it with its depthwise conv, which reads and writes ``stem``.
* ``stage{s}``: the stream of stage ``s``, written by the projection conv of the
  stage's first block and, through the residual addition, by the projection of every
  later block (a coupled group). Read by every block of the stage and the first
  block of the next stage (or ``last_conv``). A stage whose first block keeps the
  width and stride (only at some ``width_mult``) continues its input's group.
* ``stage{s}_block{b}_expand``: the expanded channels of a block, written by its
  1x1 ``expand_conv``, read and written by its depthwise ``dw_conv``
  (``feature_group_count`` = channels), read by its ``project_conv``.
* ``last``: the 1280 outputs of ``last_conv``, read by the classifier ``head``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax.models.layers import (GroupSizes, QConv, QDense, Span, batch_norm, channel_mask,
                                     check_group_sizes, group_width, in_span)
from picpq_jax.models.quantizer import FullPrecision, Quantizer

Array = jax.Array

# (expansion t, output width c, blocks n, first stride s) per stage, for 32x32 inputs.
CIFAR_CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
  """``value`` rounded to the nearest multiple of ``divisor``, never below 90% of it.

  torchvision's ``_make_divisible``, used to scale widths by ``width_mult``.
  """
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


class InvertedResidual(nn.Module):
  """[1x1 expand-BN-ReLU6] -> 3x3 depthwise-BN-ReLU6 -> 1x1 project-BN [+ input].

  ``[N, H, W, C_in] -> [N, H/stride, W/stride, features]``. Without expansion
  (``expansion == 1``) the depthwise conv filters the input group itself.

  Attributes:
    features: output channels.
    stride: stride of the depthwise conv.
    expansion: hidden width is ``expansion * C_in``.
    in_group: the group of the input.
    expand_group: the group of the expanded channels (unused when ``expansion == 1``).
    out_group: the group the projection writes (``in_group`` for a residual block).
    hidden_features: width of the expansion (``None``: ``expansion * C_in``).
    add_input: whether to add the input (``None``: decided by :meth:`residual`);
      a compacted block keeps its original decision even where pruning made the
      widths equal or different.
  """

  features: int
  stride: int
  expansion: int
  in_group: str
  expand_group: str
  out_group: str
  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"
  hidden_features: int | None = None
  add_input: bool | None = None

  @nn.compact
  def __call__(self, x: Array, hidden_mask: Array, out_mask: Array, train: bool) -> Array:
    """``hidden_mask``: mask of the expansion group, or of ``in_group`` if ``expansion == 1``."""
    hidden_group = self.in_group
    y = x
    if self.expansion != 1:
      hidden_group = self.expand_group
      hidden = self.hidden_features or x.shape[-1] * self.expansion
      y = QConv(hidden, kernel_size=(1, 1), in_group=self.in_group,
                out_group=hidden_group, quantizer=self.quantizer,
                dtype=self.dtype, name="expand_conv")(y)
      y = nn.relu6(batch_norm(train, "expand_bn")(y)) * hidden_mask
    hidden = y.shape[-1]
    y = QConv(hidden, strides=(self.stride, self.stride), feature_group_count=hidden,
              in_group=hidden_group, out_group=hidden_group, quantizer=self.quantizer,
              dtype=self.dtype, name="dw_conv")(y)
    y = nn.relu6(batch_norm(train, "dw_bn")(y)) * hidden_mask
    y = QConv(self.features, kernel_size=(1, 1), in_group=hidden_group,
              out_group=self.out_group, quantizer=self.quantizer,
              dtype=self.dtype, name="project_conv")(y)
    y = batch_norm(train, "project_bn")(y)
    add_input = self.residual(x.shape[-1]) if self.add_input is None else self.add_input
    if add_input:
      y = y + x
    return y * out_mask

  def residual(self, in_features: int) -> bool:
    """Whether the block adds its input: stride 1 and unchanged width."""
    return self.stride == 1 and in_features == self.features


class MobileNetV2(nn.Module):
  """MobileNetV2 for 32x32 images; ``[N, 32, 32, 3] -> [N, num_classes]`` logits.

  Attributes:
    num_classes: classes of the head.
    width_mult: scales every width (rounded to multiples of 8); the last conv keeps
      at least 1280 channels.
    cfg: ``(t, c, n, s)`` per stage.
    stem_features, last_features: widths of the stem and last conv at ``width_mult`` 1.
    quantizer: static quantizer of every conv and dense layer.
    dtype: computation dtype of the conv and dense products, ``"float32"`` or
      ``"bfloat16"`` (mixed precision); parameters, batch norm and the logits'
      bias stay float32.
    group_sizes: static width overrides per channel group (a compacted model);
      ``None`` keeps the widths above. Which blocks add their input is decided on
      the widths above, never on the overrides.
    span: run only these of :meth:`pieces` (split learning); the masks of the stem
      and the stages are created whatever the span, ``last`` only with the head.
  """

  num_classes: int = 10
  width_mult: float = 1.0
  cfg: Sequence[tuple[int, int, int, int]] = CIFAR_CFG
  stem_features: int = 32
  last_features: int = 1280
  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"
  group_sizes: GroupSizes = None
  span: Span = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    width = make_divisible(self.stem_features * self.width_mult)  # before group_sizes
    group = "stem"
    masks = {group: channel_mask(self, group, self._width(group, width))}
    if in_span(self.span, 0):
      x = QConv(masks[group].shape[0], out_group=group, quantizer=self.quantizer, dtype=self.dtype,
                name="stem_conv")(x)
      x = nn.relu6(batch_norm(train, "stem_bn")(x)) * masks[group]
    for s, (t, c, n, first_stride) in enumerate(self.cfg):
      features = make_divisible(c * self.width_mult)
      for b in range(n):
        stride = first_stride if b == 0 else 1
        in_group = group
        add_input = stride == 1 and width == features
        if not add_input:  # no residual: a new stream starts
          group = f"stage{s + 1}"
          masks[group] = channel_mask(self, group, self._width(group, features))
        name = f"stage{s + 1}_block{b}"
        expand = f"{name}_expand"
        if t != 1:
          masks[expand] = channel_mask(self, expand, self._width(expand, width * t))
        hidden_mask = masks[expand] if t != 1 else masks[in_group]
        if in_span(self.span, s + 1):
          x = InvertedResidual(
              masks[group].shape[0], stride, t, in_group=in_group, expand_group=expand,
              out_group=group, quantizer=self.quantizer,
              dtype=self.dtype, hidden_features=hidden_mask.shape[0],
              add_input=add_input, name=name)(x, hidden_mask, masks[group], train)
        width = features
    check_group_sizes(self.group_sizes, [*masks, "last"])
    if not in_span(self.span, len(self.cfg) + 1):
      return x
    return self._classifier(x, group, train)

  def pieces(self) -> tuple[str, ...]:
    """The model's pieces in order (see :data:`~picpq_jax.models.layers.Span`): the stem
    (conv-BN-ReLU6), the inverted-residual blocks of each stage of ``cfg``, and the
    head (``last_conv``, pool and dense)."""
    return ("stem", *(f"stage{s + 1}" for s in range(len(self.cfg))), "head")

  def _width(self, group: str, default: int) -> int:
    """Channels of ``group``: ``group_sizes``' entry, else ``default``."""
    return group_width(self.group_sizes, group, default)

  def _classifier(self, x: Array, in_group: str, train: bool) -> Array:
    """1x1 conv to ``last`` -> BN -> ReLU6 -> mask -> global average pool -> head."""
    features = self._width("last", make_divisible(self.last_features * max(1.0, self.width_mult)))
    x = QConv(features, kernel_size=(1, 1), in_group=in_group, out_group="last",
              quantizer=self.quantizer, dtype=self.dtype, name="last_conv")(x)
    x = nn.relu6(batch_norm(train, "last_bn")(x)) * channel_mask(self, "last", features)
    x = jnp.mean(x, axis=(1, 2))
    return QDense(self.num_classes, in_group="last", quantizer=self.quantizer,
                  dtype=self.dtype, name="head")(x)
