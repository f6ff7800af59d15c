"""ImageNet ResNets with basic blocks (He et al. 2016), as torchvision builds them.

A 7x7 stride-2 stem conv to 64 channels, BN, ReLU and a 3x3 stride-2 max-pool, four
stages of basic blocks (widths 64/128/256/512, the first block of stages 2-4 with
stride 2), global average pooling and a linear head with bias. A block that changes
the stride or width has an option-B shortcut (1x1 conv with the block's stride, then
BN). ResNet-18 (``stage_sizes=(2, 2, 2, 2)``): 11,689,512 parameters and 1.814G MACs
per 224x224 image.

Channel groups (the model's ``masks``):

* ``stage{s}``: the residual stream of stage ``s``, written by the stem (s=1) or the
  first block's ``downsample_conv`` (s>1) and by ``conv2`` of every block of the
  stage (a coupled group); read by every block's ``conv1``, the next stage's first
  block (``conv1`` and ``downsample_conv``) and the classifier (s=4).
* ``stage{s}_block{b}_mid``: the inner channels of a block, written by its ``conv1``
  and read by its ``conv2``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax.models.layers import (GroupSizes, QConv, QDense, Span, batch_norm, channel_mask,
                                     check_group_sizes, group_width, in_span)
from picpq_jax.models.quantizer import FullPrecision, Quantizer
from picpq_jax.models.resnet_cifar import BasicBlock

Array = jax.Array


class ImageNetResNet(nn.Module):
  """Basic-block ResNet for 224x224 images; ``[N, H, W, 3] -> [N, num_classes]`` logits.

  Fully convolutional up to the global pool, so smaller inputs (e.g. 64x64) work.

  Attributes:
    stage_sizes: blocks per stage; ``(2, 2, 2, 2)`` is ResNet-18, ``(3, 4, 6, 3)``
      ResNet-34.
    num_classes: classes of the head.
    widths: channels per stage.
    quantizer: static quantizer of every conv and dense layer.
    dtype: computation dtype of the conv and dense products, ``"float32"`` or
      ``"bfloat16"`` (mixed precision); parameters, batch norm and the logits'
      bias stay float32.
    group_sizes: static width overrides per channel group (a compacted model);
      ``None`` keeps ``widths``.
    span: run only these of :meth:`pieces` (split learning); the stage masks are
      created whatever the span, a block's ``_mid`` mask only where it runs.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 1000
  widths: Sequence[int] = (64, 128, 256, 512)
  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"
  group_sizes: GroupSizes = None
  span: Span = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and widths "
                       f"{tuple(self.widths)} must have one entry per stage")
    check_group_sizes(self.group_sizes, self.group_names())
    widths = [group_width(self.group_sizes, f"stage{s + 1}", w) for s, w in enumerate(self.widths)]
    stream = [channel_mask(self, f"stage{s + 1}", w) for s, w in enumerate(widths)]
    if in_span(self.span, 0):
      x = QConv(widths[0], kernel_size=(7, 7), strides=(2, 2), out_group="stage1",
                quantizer=self.quantizer, dtype=self.dtype, name="stem_conv")(x)
      x = nn.relu(batch_norm(train, "stem_bn")(x)) * stream[0]
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_group = "stage1"
    for s, (width, blocks) in enumerate(zip(widths, self.stage_sizes)):
      for b in range(blocks):
        name = f"stage{s + 1}_block{b}"
        mid = group_width(self.group_sizes, f"{name}_mid", self.widths[s])
        if in_span(self.span, s + 1):
          x = BasicBlock(
              width, stride=2 if (s > 0 and b == 0) else 1, in_group=in_group,
              mid_group=f"{name}_mid", out_group=f"stage{s + 1}", shortcut="B",
              quantizer=self.quantizer, dtype=self.dtype, mid_features=mid,
              name=name)(x, channel_mask(self, f"{name}_mid", mid), stream[s], train)
        in_group = f"stage{s + 1}"
    if not in_span(self.span, len(widths) + 1):
      return x
    x = jnp.mean(x, axis=(1, 2))
    return QDense(self.num_classes, in_group=in_group, quantizer=self.quantizer,
                  dtype=self.dtype, name="head")(x)

  def pieces(self) -> tuple[str, ...]:
    """The model's pieces in order (see :data:`~picpq_jax.models.layers.Span`): the stem
    (conv-BN-ReLU and max-pool), each stage's blocks, and the head (pool and dense)."""
    return ("stem", *(f"stage{s + 1}" for s in range(len(self.widths))), "head")

  def group_names(self) -> tuple[str, ...]:
    """Names of the channel groups (the ``masks`` entries)."""
    streams = tuple(f"stage{s + 1}" for s in range(len(self.widths)))
    mids = tuple(f"stage{s + 1}_block{b}_mid" for s, blocks in enumerate(self.stage_sizes)
                 for b in range(blocks))
    return streams + mids
