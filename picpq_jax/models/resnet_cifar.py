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

Parameterless coupling between groups: the option-A shortcut of the first block of
stage ``s + 1`` copies channel ``j`` of the ``stage{s}`` stream to channel
``j + pad_left`` of ``stage{s+1}`` (``pad_left = (C_{s+1} - C_s) // 2``); the other
channels of ``stage{s+1}`` get zeros. No layer declares this (it has no weights, so
it costs no MACs), but a pruned ``stage{s}`` channel zeroes what its target channel
receives. :meth:`CifarResNet.shortcut_couplings` returns these maps as
:class:`ShortcutCoupling` index tuples (static; no tracing), and the
``shortcut_maps`` field overrides them, which is how a compacted model (see
:func:`picpq_jax.compress.compact`) routes each kept channel to its new position.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from picpq_jax.models.layers import (GroupSizes, QConv, QDense, Span, batch_norm, channel_mask,
                                     check_group_sizes, group_width, in_span)
from picpq_jax.models.quantizer import FullPrecision, Quantizer

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ShortcutCoupling:
  """A parameterless shortcut from group ``source`` into group ``target``.

  ``index[j]`` is the ``source`` channel that the shortcut adds to ``target``
  channel ``j``, or -1 where it adds zeros; ``len(index)`` is the target's width.
  """

  source: str
  target: str
  index: tuple[int, ...]


def option_a_index(in_features: int, features: int) -> tuple[int, ...]:
  """Option A as an index map: target ``j`` reads source ``j - pad_left``, else -1.

  ``pad_left = (features - in_features) // 2``, as :func:`option_a_shortcut` pads.
  """
  if features < in_features:
    raise ValueError(f"an option-A shortcut cannot narrow {in_features} channels to "
                     f"{features}; give the model shortcut_maps")
  left = (features - in_features) // 2
  return tuple(j - left if 0 <= j - left < in_features else -1 for j in range(features))


def option_a_shortcut(x: Array, features: int, stride: int) -> Array:
  """Subsample ``[N, H, W, C]`` by ``stride`` and zero-pad channels evenly to ``features``."""
  if stride != 1:
    x = x[:, ::stride, ::stride, :]
  pad = features - x.shape[-1]
  if pad < 0:
    raise ValueError(f"an option-A shortcut cannot narrow {x.shape[-1]} channels to "
                     f"{features}; give the model shortcut_maps")
  if pad:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
  return x


def index_shortcut(x: Array, index: tuple[int, ...] | Array, stride: int) -> Array:
  """Subsample ``[N, H, W, C]`` by ``stride``; channel ``j`` of the output is
  ``x[..., index[j]]``, or zeros where ``index[j] == -1``: ``[N, H', W', len(index)]``.

  ``index`` is a static tuple (checked here) or an int32 array, which may be
  traced (checked by whoever built it; see ``CifarResNet.shortcut_maps``).
  """
  if stride != 1:
    x = x[:, ::stride, ::stride, :]
  if isinstance(index, tuple):
    idx = np.asarray(index, np.int64).reshape(-1)
    if idx.size and (idx.min() < -1 or idx.max() >= x.shape[-1]):
      raise ValueError(f"shortcut index entries must lie in [-1, {x.shape[-1]}), got "
                       f"[{idx.min()}, {idx.max()}]")
    taken = jnp.take(x, np.maximum(idx, 0), axis=-1)
  else:
    idx = jnp.asarray(index)
    taken = jnp.take(x, jnp.maximum(idx, 0), axis=-1, mode="clip")
  return jnp.where(idx >= 0, taken, jnp.zeros((), x.dtype))


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, plus a shortcut, then ReLU.

  ``[N, H, W, C_in] -> [N, H/stride, W/stride, features]``. When the stride or the
  width changes, the shortcut is option A (subsample and zero-pad channels; CIFAR
  ResNets) or option B (1x1 conv with stride, then BN, writing ``out_group``;
  ImageNet ResNets).

  Attributes:
    mid_features: width of ``conv1`` (``None``: ``features``).
    shortcut_index: option A only: the shortcut as an index map, static or an
      int32 array (see :func:`index_shortcut`); ``None`` zero-pads evenly
      (:func:`option_a_shortcut`).
  """

  features: int
  stride: int
  in_group: str
  mid_group: str
  out_group: str
  shortcut: str = "A"
  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"
  mid_features: int | None = None
  shortcut_index: tuple[int, ...] | Array | None = None

  @nn.compact
  def __call__(self, x: Array, mid_mask: Array, out_mask: Array, train: bool) -> Array:
    s = (self.stride, self.stride)
    mid = self.features if self.mid_features is None else self.mid_features
    y = QConv(mid, strides=s, in_group=self.in_group, out_group=self.mid_group,
              quantizer=self.quantizer, dtype=self.dtype, name="conv1")(x)
    y = nn.relu(batch_norm(train, "bn1")(y)) * mid_mask
    y = QConv(self.features, in_group=self.mid_group, out_group=self.out_group,
              quantizer=self.quantizer, dtype=self.dtype, name="conv2")(y)
    y = batch_norm(train, "bn2")(y)
    if self.shortcut == "A" and self.shortcut_index is not None:
      x = index_shortcut(x, self.shortcut_index, self.stride)
    elif self.shortcut == "A":
      x = option_a_shortcut(x, self.features, self.stride)
    elif self.stride != 1 or x.shape[-1] != self.features:
      x = QConv(self.features, kernel_size=(1, 1), strides=s, in_group=self.in_group,
                out_group=self.out_group, quantizer=self.quantizer,
                dtype=self.dtype, name="downsample_conv")(x)
      x = batch_norm(train, "downsample_bn")(x)
    return nn.relu(y + x) * out_mask


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 images; ``[N, 32, 32, 3] -> [N, num_classes]`` logits.

  Attributes:
    depth: 6n+2.
    num_classes: classes of the head.
    widths: channels of the three stages.
    quantizer: static quantizer of every conv and dense layer.
    dtype: computation dtype of the conv and dense products, ``"float32"`` or
      ``"bfloat16"`` (mixed precision); parameters, batch norm and the logits'
      bias stay float32.
    group_sizes: static width overrides per channel group (a compacted model);
      ``None`` keeps ``widths``.
    shortcut_maps: static index map of each stage's first shortcut, one per stage
      transition (``len(widths) - 1``); ``None`` is option A on the stage widths.
      See :meth:`shortcut_couplings`. The maps may also be int32 arrays, traced
      inside a jitted function (the search's compact fitness evaluation reuses one
      program for every map of the same widths); they are then not checked.
    span: run only these of :meth:`pieces` (split learning); the stage masks are
      created whatever the span, a block's ``_mid`` mask only where it runs.
  """

  depth: int = 56
  num_classes: int = 10
  widths: tuple[int, int, int] = (16, 32, 64)
  quantizer: Quantizer = FullPrecision()
  dtype: str = "float32"
  group_sizes: GroupSizes = None
  shortcut_maps: tuple[tuple[int, ...], ...] | None = None
  span: Span = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {self.depth}")
    blocks = (self.depth - 2) // 6
    check_group_sizes(self.group_sizes, self.group_names())
    widths = self.stage_widths()
    maps = self.shortcut_maps
    if maps is not None and all(isinstance(m, tuple) for m in maps):
      maps = [c.index for c in self.shortcut_couplings()]  # checks the static maps
    stream = [channel_mask(self, f"stage{s + 1}", w) for s, w in enumerate(widths)]

    if in_span(self.span, 0):
      x = QConv(widths[0], out_group="stage1", quantizer=self.quantizer,
                dtype=self.dtype, name="stem_conv")(x)
      x = nn.relu(batch_norm(train, "stem_bn")(x)) * stream[0]
    in_group = "stage1"
    for s, width in enumerate(widths):
      for b in range(blocks):
        name = f"stage{s + 1}_block{b}"
        mid = group_width(self.group_sizes, f"{name}_mid", self.widths[s])
        if in_span(self.span, s + 1):
          x = BasicBlock(
              width, stride=2 if (s > 0 and b == 0) else 1, in_group=in_group,
              mid_group=f"{name}_mid", out_group=f"stage{s + 1}", quantizer=self.quantizer,
              dtype=self.dtype, mid_features=mid,
              shortcut_index=maps[s - 1] if (maps and s > 0 and b == 0) else None,
              name=name)(x, channel_mask(self, f"{name}_mid", mid), stream[s], train)
        in_group = f"stage{s + 1}"
    if not in_span(self.span, len(widths) + 1):
      return x
    x = jnp.mean(x, axis=(1, 2))
    return QDense(self.num_classes, in_group=in_group, quantizer=self.quantizer,
                  dtype=self.dtype, name="head")(x)

  def pieces(self) -> tuple[str, ...]:
    """The model's pieces in order (see :data:`~picpq_jax.models.layers.Span`): the stem
    (conv-BN-ReLU), each stage's blocks, and the head (global average pool and dense)."""
    return ("stem", *(f"stage{s + 1}" for s in range(len(self.widths))), "head")

  def group_names(self) -> tuple[str, ...]:
    """Names of the channel groups (the ``masks`` entries)."""
    blocks = (self.depth - 2) // 6
    streams = tuple(f"stage{s + 1}" for s in range(len(self.widths)))
    mids = tuple(f"stage{s + 1}_block{b}_mid" for s in range(len(self.widths))
                 for b in range(blocks))
    return streams + mids

  def stage_widths(self) -> tuple[int, ...]:
    """Channels of each stage's stream, after ``group_sizes``."""
    return tuple(group_width(self.group_sizes, f"stage{s + 1}", w)
                 for s, w in enumerate(self.widths))

  def shortcut_couplings(self) -> tuple[ShortcutCoupling, ...]:
    """The option-A shortcut of each stage transition, ``stage{s}`` -> ``stage{s+1}``.

    Static (reads only the module's fields): callable on an unbound model, e.g. by
    a cost model or pruner that needs to know that pruning ``stage{s}`` channel
    ``index[j]`` zeroes the shortcut into ``stage{s+1}`` channel ``j``.
    """
    widths = self.stage_widths()
    maps = self.shortcut_maps
    if maps is None:
      maps = tuple(option_a_index(widths[s], widths[s + 1]) for s in range(len(widths) - 1))
    if len(maps) != len(widths) - 1:
      raise ValueError(f"shortcut_maps needs {len(widths) - 1} index maps (one per stage "
                       f"transition), got {len(maps)}")
    couplings = []
    for s, index in enumerate(maps):
      if len(index) != widths[s + 1] or any(not -1 <= i < widths[s] for i in index):
        raise ValueError(f"shortcut_maps[{s}] must hold {widths[s + 1]} entries in "
                         f"[-1, {widths[s]})")
      couplings.append(ShortcutCoupling(f"stage{s + 1}", f"stage{s + 2}", tuple(index)))
    return tuple(couplings)
