"""CIFAR ResNets (He et al. 2016, section 4.2): depth 6n+2 with option-A shortcuts.

Three stages of ``n`` basic blocks, widths 16/32/64, a stride-2 first block in
stages 2 and 3 whose shortcut subsamples by 2 and zero-pads the new channels
(option A, no parameters). ResNet-56: 0.85M parameters, 125M MACs per 32x32 image.

Channel groups (the model's ``masks``):

* ``stage{s}``: the residual stream of stage ``s``, written by the stem (s=1) and by
  ``conv2`` of every block of the stage (a coupled group), read by every block's
  ``conv1``, the next stage's first block, and the classifier (s=3).
* ``stage{s}_block{b}_mid``: the inner channels of a block, written by its ``conv1`` and
  read by its ``conv2``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax.models.layers import QConv, QDense, batch_norm, channel_mask
from picpq_jax.models.quantizer import FullPrecision, Quantizer

Array = jax.Array


def option_a_shortcut(x: Array, features: int, stride: int) -> Array:
  """Subsample ``[N, H, W, C]`` by ``stride`` and zero-pad channels evenly to ``features``."""
  if stride != 1:
    x = x[:, ::stride, ::stride, :]
  pad = features - x.shape[-1]
  if pad:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
  return x


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, plus a shortcut, then ReLU.

  ``[N, H, W, C_in] -> [N, H/stride, W/stride, features]``. When the stride or the
  width changes, the shortcut is option A (subsample and zero-pad channels; CIFAR
  ResNets) or option B (1x1 conv with stride, then BN, writing ``out_group``;
  ImageNet ResNets).
  """

  features: int
  stride: int
  in_group: str
  mid_group: str
  out_group: str
  shortcut: str = "A"
  quantizer: Quantizer = FullPrecision()

  @nn.compact
  def __call__(self, x: Array, mid_mask: Array, out_mask: Array, train: bool) -> Array:
    s = (self.stride, self.stride)
    y = QConv(self.features, strides=s, in_group=self.in_group, out_group=self.mid_group,
              quantizer=self.quantizer, name="conv1")(x)
    y = nn.relu(batch_norm(train, "bn1")(y)) * mid_mask
    y = QConv(self.features, in_group=self.mid_group, out_group=self.out_group,
              quantizer=self.quantizer, name="conv2")(y)
    y = batch_norm(train, "bn2")(y)
    if self.shortcut == "A":
      x = option_a_shortcut(x, self.features, self.stride)
    elif self.stride != 1 or x.shape[-1] != self.features:
      x = QConv(self.features, kernel_size=(1, 1), strides=s, in_group=self.in_group,
                out_group=self.out_group, quantizer=self.quantizer, name="downsample_conv")(x)
      x = batch_norm(train, "downsample_bn")(x)
    return nn.relu(y + x) * out_mask


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 images; ``[N, 32, 32, 3] -> [N, num_classes]`` logits."""

  depth: int = 56
  num_classes: int = 10
  widths: tuple[int, int, int] = (16, 32, 64)
  quantizer: Quantizer = FullPrecision()

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {self.depth}")
    blocks = (self.depth - 2) // 6
    stream = [channel_mask(self, f"stage{s + 1}", w) for s, w in enumerate(self.widths)]

    x = QConv(self.widths[0], out_group="stage1", quantizer=self.quantizer, name="stem_conv")(x)
    x = nn.relu(batch_norm(train, "stem_bn")(x)) * stream[0]
    in_group = "stage1"
    for s, width in enumerate(self.widths):
      for b in range(blocks):
        name = f"stage{s + 1}_block{b}"
        x = BasicBlock(
            width, stride=2 if (s > 0 and b == 0) else 1, in_group=in_group,
            mid_group=f"{name}_mid", out_group=f"stage{s + 1}", quantizer=self.quantizer,
            name=name)(x, channel_mask(self, f"{name}_mid", width), stream[s], train)
        in_group = f"stage{s + 1}"
    x = jnp.mean(x, axis=(1, 2))
    return QDense(self.num_classes, in_group=in_group, quantizer=self.quantizer, name="head")(x)
