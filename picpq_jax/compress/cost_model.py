"""Cost model: MACs, parameters and BOPs as jnp functions of masks and bit-widths.

DESIGN.md section 7. The model's :class:`~picpq_jax.models.ModelStructure` is static
(hashable: a ``jit`` static argument or a closure); the ``masks`` (``{group: float32
[C]}``, 0/1) and the ``quant`` bit-widths are traced, so one compiled program prices
every candidate and the functions ``vmap`` over batches of masks.

Kept channels of a layer: ``c_in = sum(masks[in_group])`` (``in_features`` when the
layer reads the image, ``in_group is None``) and ``c_out = sum(masks[out_group])``
(``out_features`` when it writes no group). A pruned channel therefore removes an
output channel from every writer of its group and an input channel from every reader.
A parameter-free option-A shortcut costs nothing. A depthwise conv
(``feature_group_count == in_features``) reads and writes one group and follows its
producer: each kept channel costs one ``k x k`` filter.

Per layer (``groups`` = ``feature_group_count``):

* MACs ``= h_out * w_out * kh * kw * (c_in / groups) * c_out``; a depthwise conv uses
  its static ``in_features / groups`` (1) for ``c_in / groups``, so its MACs are
  ``h_out * w_out * kh * kw * c_kept``. A dense layer has ``h_out = w_out = kh = kw =
  1``. Other grouped convs (none in the library) are exact only when pruning removes
  the same number of channels from every group.
* FLOPs: this library follows the paper's tables, where "FLOPs" means MACs
  (:attr:`Cost.flops`); :attr:`Cost.mul_add_flops` is ``2 * MACs`` for those who
  count the multiply and the add separately.
* Parameters: kernel entries ``kh * kw * (c_in / groups) * c_out`` plus the bias of
  the kept output channels. BatchNorm is not counted (it folds into the conv at
  deployment), matching :attr:`~picpq_jax.models.ModelStructure.num_weights`.
* BOPs: a conv's ``MACs * w_bits * a_bits``; a dense layer's ``params * w_bits *
  a_bits``, bias included (DESIGN: "the classifier counts params * 32 * 32"; the
  classifier stays in full precision, so its ``quant`` bits are 32; other bits in
  ``quant`` would be counted as given).

``quant=None`` means every layer at 32 bits.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from picpq_jax.errors import UserError
from picpq_jax.models.quantizer import FULL_PRECISION_BITS
from picpq_jax.models.structure import ModelStructure

Array = jax.Array
Masks = Mapping[str, Array]

# Names of the cost metrics that a budget can be stated in.
METRICS = ("flops", "params", "bops")


class Cost(NamedTuple):
  """Cost of one network per example; float32 scalars (``[B]`` under ``vmap``)."""

  macs: Array  # multiply-accumulates of every conv and dense layer
  params: Array  # kernel and bias entries of the kept channels (no BN)
  bops: Array  # bit operations: MACs (dense: params) * w_bits * a_bits

  @property
  def flops(self) -> Array:
    """FLOPs as the paper counts them: equal to MACs."""
    return self.macs

  @property
  def mul_add_flops(self) -> Array:
    """``2 * MACs``: a multiply and an add counted as two operations."""
    return 2 * self.macs

  def metric(self, name: str) -> Array:
    """The field that budget metric ``name`` (one of :data:`METRICS`) refers to."""
    check_metric(name)
    return {"flops": self.macs, "params": self.params, "bops": self.bops}[name]


class LayerCosts(NamedTuple):
  """Per-layer costs, float32 ``[L]`` in ``structure.layers`` order."""

  c_in: Array  # kept input channels
  c_out: Array  # kept output channels
  macs: Array
  params: Array
  bops: Array
  w_bits: Array
  a_bits: Array


def check_metric(metric: str) -> None:
  """UserError unless ``metric`` is one of :data:`METRICS`."""
  if metric not in METRICS:
    raise UserError(f"unknown cost metric {metric!r}: choose one of {', '.join(METRICS)}")


@functools.lru_cache(maxsize=64)
def _tables(structure: ModelStructure) -> dict[str, np.ndarray]:
  """Static per-layer constants of ``structure`` (numpy, ``[L]``)."""
  index = {g.name: i for i, g in enumerate(structure.groups)}
  layers = structure.layers
  fan = [l.in_features // l.feature_group_count if l.depthwise else 0 for l in layers]
  return {
      "in_idx": np.array([index.get(l.in_group, -1) for l in layers], np.int32),
      "out_idx": np.array([index.get(l.out_group, -1) for l in layers], np.int32),
      "in_full": np.array([l.in_features for l in layers], np.float32),
      "out_full": np.array([l.out_features for l in layers], np.float32),
      "groups": np.array([l.feature_group_count for l in layers], np.float32),
      "depthwise_fan": np.array(fan, np.float32),  # 0: not depthwise
      "kernel": np.array([l.kernel_size[0] * l.kernel_size[1] for l in layers], np.float32),
      "pixels": np.array([l.out_hw[0] * l.out_hw[1] for l in layers], np.float32),
      "bias": np.array([l.use_bias for l in layers], np.float32),
      "dense": np.array([l.kind == "dense" for l in layers], bool),
  }


def check_masks(structure: ModelStructure, masks: Masks) -> None:
  """UserError if a group of ``structure`` has no mask; shape check of each mask."""
  missing = [g.name for g in structure.groups if g.name not in masks]
  if missing:
    raise UserError(f"masks lack channel groups {missing}: pass variables['masks'] "
                    f"of the same model (one float32 [C] vector per group)")
  chex.assert_shape([masks[g.name] for g in structure.groups],
                    [(g.size,) for g in structure.groups])


def kept_channels(structure: ModelStructure, masks: Masks) -> Array:
  """Kept channels per group: float32 ``[G]``, ``sum(masks[g])`` in ``structure.groups`` order."""
  check_masks(structure, masks)
  if not structure.groups:
    return jnp.zeros((0,), jnp.float32)
  return jnp.stack([jnp.sum(jnp.asarray(masks[g.name], jnp.float32)) for g in structure.groups])


def layer_bits(structure: ModelStructure, quant: Any | None) -> tuple[Array, Array]:
  """``(w_bits, a_bits)`` per layer, float32 ``[L]``; 32 everywhere when ``quant`` is None.

  ``quant`` is the model's ``quant`` collection, nested by module path with int32
  scalar leaves ``w_bits`` and ``a_bits``.
  """
  n = len(structure.layers)
  if quant is None:
    full = jnp.full((n,), FULL_PRECISION_BITS, jnp.float32)
    return full, full
  flat = traverse_util.flatten_dict(quant, sep="/")
  out = []
  for kind in ("w_bits", "a_bits"):
    keys = [f"{l.name}/{kind}" for l in structure.layers]
    missing = [k for k in keys if k not in flat]
    if missing:
      raise UserError(f"quant lacks {missing[:3]}{'...' if len(missing) > 3 else ''}: pass "
                      f"variables['quant'] of the same model, or None for 32 bits")
    out.append(jnp.stack([jnp.asarray(flat[k], jnp.float32).reshape(()) for k in keys]))
  return out[0], out[1]


def layer_costs_from_kept(structure: ModelStructure, kept: Array, w_bits: Array,
                          a_bits: Array) -> LayerCosts:
  """Per-layer costs from kept channels per group (``[G]``) and bits (``[L]``).

  The building block of :func:`layer_costs`; the pruner calls it with counts it
  builds without a masks dict.
  """
  t = _tables(structure)
  ext = jnp.concatenate([jnp.asarray(kept, jnp.float32), jnp.zeros((1,), jnp.float32)])
  g = len(structure.groups)
  c_in = jnp.where(t["in_idx"] >= 0, ext[np.where(t["in_idx"] >= 0, t["in_idx"], g)],
                   t["in_full"])
  c_out = jnp.where(t["out_idx"] >= 0, ext[np.where(t["out_idx"] >= 0, t["out_idx"], g)],
                    t["out_full"])
  fan_in = jnp.where(t["depthwise_fan"] > 0, t["depthwise_fan"], c_in / t["groups"])
  weights = t["kernel"] * fan_in * c_out
  macs = t["pixels"] * weights
  params = weights + t["bias"] * c_out
  bops = jnp.where(t["dense"], params, macs) * w_bits * a_bits
  return LayerCosts(c_in, c_out, macs, params, bops, w_bits, a_bits)


def layer_costs(structure: ModelStructure, masks: Masks, quant: Any | None = None) -> LayerCosts:
  """Per-layer kept channels, MACs, parameters and BOPs (DESIGN 7).

  Args:
    structure: the model's static structure.
    masks: ``{group: float32 [C]}`` of 0/1, one entry per group of ``structure``.
    quant: the ``quant`` collection (int32 ``w_bits``/``a_bits`` per layer), or None
      for 32 bits everywhere.

  Returns:
    :class:`LayerCosts`, each field float32 ``[L]`` in ``structure.layers`` order.
  """
  w_bits, a_bits = layer_bits(structure, quant)
  return layer_costs_from_kept(structure, kept_channels(structure, masks), w_bits, a_bits)


def total(costs: LayerCosts) -> Cost:
  """Sums per-layer costs into a :class:`Cost` of float32 scalars."""
  return Cost(jnp.sum(costs.macs), jnp.sum(costs.params), jnp.sum(costs.bops))


def cost(structure: ModelStructure, masks: Masks, quant: Any | None = None) -> Cost:
  """Network MACs (= the paper's FLOPs), parameters and BOPs per example (DESIGN 7).

  Args: as :func:`layer_costs`.

  Returns:
    :class:`Cost` of float32 scalars.
  """
  return total(layer_costs(structure, masks, quant))


def full_masks(structure: ModelStructure) -> dict[str, Array]:
  """All-ones masks (nothing pruned): ``{group: float32 [C]}``."""
  return {g.name: jnp.ones((g.size,), jnp.float32) for g in structure.groups}


def full_cost(structure: ModelStructure, quant: Any | None = None) -> Cost:
  """Cost of the unpruned network; with ``quant=None`` the 32-bit reference of the ratios."""
  return cost(structure, full_masks(structure), quant)


def compression_ratios(structure: ModelStructure, masks: Masks,
                       quant: Any | None = None) -> Cost:
  """Reference / compressed, per metric: the unpruned 32-bit network over this one.

  E.g. ``compression_ratios(...).bops`` is the paper's headline BOPs compression
  ratio (54.96x for its ResNet-56). Float32 scalars in a :class:`Cost`.
  """
  ref, now = full_cost(structure), cost(structure, masks, quant)
  return Cost(*(r / c for r, c in zip(ref, now)))
