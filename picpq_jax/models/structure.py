"""The static pruning graph of a model: its layers and channel groups.

Every :class:`~picpq_jax.models.layers.QConv` / ``QDense`` declares the channel
group it reads and the group it writes. :func:`model_structure` collects those
declarations, with each layer's shapes, by abstract evaluation of ``model.init``
(``jax.eval_shape``: no FLOPs, no memory), into a frozen, hashable
:class:`ModelStructure` that can be a static argument of ``jit``.

A group is the unit of pruning: one 0/1 mask vector in the ``masks`` collection.

* Its *writers* are the layers whose output channels are the group's channels.
  More than one non-depthwise writer means the writers are summed by a residual
  addition: they are *coupled* and must be pruned together.
* Its *readers* are the layers that take the group's channels as input; pruning a
  channel removes one input channel (one slice of the kernel) from each reader.
* A depthwise conv reads and writes the same group: it follows its producer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from picpq_jax.models.layers import QConv, QDense


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One conv or dense layer, as seen on the model's reference input.

  ``in_hw``/``out_hw`` are the spatial sizes (``(1, 1)`` for a dense layer).
  """

  name: str  # path of the layer's params, '/'-joined, e.g. "stage1_block0/conv1"
  kind: str  # "conv" or "dense"
  in_group: str | None
  out_group: str | None
  in_features: int
  out_features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  feature_group_count: int
  use_bias: bool
  in_hw: tuple[int, int]
  out_hw: tuple[int, int]

  @property
  def depthwise(self) -> bool:
    return self.feature_group_count > 1 and self.feature_group_count == self.in_features

  @property
  def num_weights(self) -> int:
    """Kernel (and bias) entries."""
    kh, kw = self.kernel_size
    n = kh * kw * (self.in_features // self.feature_group_count) * self.out_features
    return n + (self.out_features if self.use_bias else 0)

  @property
  def macs(self) -> int:
    """Multiply-accumulates per example: ``h_out * w_out * c_in * c_out * k * k / groups``."""
    kh, kw = self.kernel_size
    oh, ow = self.out_hw
    return oh * ow * kh * kw * (self.in_features // self.feature_group_count) * self.out_features


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """A set of channels pruned together; ``size`` entries in its mask."""

  name: str
  size: int
  writers: tuple[str, ...]
  readers: tuple[str, ...]
  depthwise: tuple[str, ...]  # depthwise layers that both read and write the group

  @property
  def coupled(self) -> bool:
    """True when a residual addition sums the outputs of several writers."""
    return len(self.writers) - len(self.depthwise) > 1


@dataclasses.dataclass(frozen=True)
class ModelStructure:
  """Layers (in call order) and channel groups of a model; hashable."""

  input_shape: tuple[int, ...]  # one example, e.g. (32, 32, 3)
  layers: tuple[LayerInfo, ...]
  groups: tuple[ChannelGroup, ...]

  def layer(self, name: str) -> LayerInfo:
    for info in self.layers:
      if info.name == name:
        return info
    raise KeyError(f"no layer {name!r}; layers: {[l.name for l in self.layers]}")

  def group(self, name: str) -> ChannelGroup:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(f"no group {name!r}; groups: {[g.name for g in self.groups]}")

  @property
  def macs(self) -> int:
    """Unpruned multiply-accumulates per example, conv and dense layers."""
    return sum(l.macs for l in self.layers)

  @property
  def num_weights(self) -> int:
    """Kernel and bias entries of all conv and dense layers (no BN)."""
    return sum(l.num_weights for l in self.layers)


def _layer_info(module: nn.Module, x: jax.ShapeDtypeStruct, y: jax.ShapeDtypeStruct) -> LayerInfo:
  name = "/".join(module.path)
  if isinstance(module, QConv):
    return LayerInfo(
        name=name, kind="conv", in_group=module.in_group, out_group=module.out_group,
        in_features=x.shape[-1], out_features=y.shape[-1],
        kernel_size=tuple(module.kernel_size), strides=tuple(module.strides),
        feature_group_count=module.feature_group_count, use_bias=module.use_bias,
        in_hw=tuple(x.shape[1:3]), out_hw=tuple(y.shape[1:3]))
  return LayerInfo(
      name=name, kind="dense", in_group=module.in_group, out_group=module.out_group,
      in_features=x.shape[-1], out_features=y.shape[-1], kernel_size=(1, 1),
      strides=(1, 1), feature_group_count=1, use_bias=module.use_bias,
      in_hw=(1, 1), out_hw=(1, 1))


def _groups(layers: tuple[LayerInfo, ...], mask_sizes: dict[str, int]) -> tuple[ChannelGroup, ...]:
  groups = []
  for name, size in mask_sizes.items():
    writers = tuple(l.name for l in layers if l.out_group == name)
    readers = tuple(l.name for l in layers if l.in_group == name)
    depthwise = tuple(l.name for l in layers
                      if l.depthwise and l.in_group == name and l.out_group == name)
    for w in writers:
      if layers[[l.name for l in layers].index(w)].out_features != size:
        raise ValueError(f"layer {w} writes {name} but its width differs from the mask ({size})")
    if not writers:
      raise ValueError(f"channel group {name!r} has a mask but no layer writes it")
    groups.append(ChannelGroup(name, size, writers, readers, depthwise))
  declared = {l.out_group for l in layers} | {l.in_group for l in layers}
  missing = declared - set(mask_sizes) - {None}
  if missing:
    raise ValueError(f"groups {sorted(missing)} are declared by layers but have no mask")
  return tuple(groups)


def model_structure(model: nn.Module, input_shape: tuple[int, ...]) -> ModelStructure:
  """Reads the declared pruning graph of ``model`` on one input of ``input_shape``.

  Args:
    model: a library model (its conv/dense layers are ``QConv``/``QDense``).
    input_shape: one example's shape, ``(H, W, C)``.

  Returns:
    The model's :class:`ModelStructure`; nothing is computed or allocated.
  """
  records: list[LayerInfo] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, (QConv, QDense)):
      records.append(_layer_info(context.module, args[0], out))
    return out

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  with nn.intercept_methods(record):
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
  layers = tuple(records)
  mask_sizes = {k: v.shape[0] for k, v in variables.get("masks", {}).items()}
  return ModelStructure(tuple(input_shape), layers, _groups(layers, mask_sizes))


def param_count(params: Any) -> int:
  """Number of scalars in a ``params`` pytree (kernels, biases, BN scale and shift)."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
