"""Bit-width assignment from pruning sparsity (DESIGN.md section 5).

Each prunable conv (a conv that writes a channel group, in ``structure.layers``
order) gets

    bits_l = max_bits_l - ceil(penalty / sparsity_l)   if the layer lost channels,
    bits_l = max_bits_l                                 otherwise,

where ``sparsity_l = sum |W_pruned| / sum |W_original|`` over the layer's kernel
(bias excluded), and ``W_pruned`` zeroes the removed output channels (its
``out_group``) AND the removed input channels (its ``in_group``): what is left of the
layer once its producer's pruning is applied too. A layer "lost channels" when any
entry of either mask is 0. So ``sparsity_l`` is the kept fraction of the layer's
weight mass: the more of it pruning removed, the more bits the layer loses.

* Bits never fall below ``min_bits`` (default 2: DoReFa rounds weights to
  ``bits - 1`` bits, so 2 is the least that keeps a weight level), nor below
  ``max_bits_l`` when that is smaller.
* Full-precision layers stay full precision: a conv with ``max_bits_l >= 32`` (the
  first conv) keeps it even when pruned, and dense layers (the classifier) and convs
  that write no group are always 32 bits.
* Weights and activations share the bit-width: ``w_bits == a_bits``.

Structure, ``max_bits`` and ``min_bits`` are static; params, masks and ``penalty``
may be traced, so the result (int32 scalars) never recompiles for new masks.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from picpq_jax.compress.cost_model import check_masks
from picpq_jax.errors import UserError
from picpq_jax.models.quantizer import FULL_PRECISION_BITS
from picpq_jax.models.structure import LayerInfo, ModelStructure

Array = jax.Array

REFERENCE_PENALTY = 1.0 / 6.0

# Published max_bits lists, one entry per prunable conv (stem first).
REFERENCE_MAX_BITS: dict[str, tuple[int, ...]] = {
    "resnet56": (32,) + (8,) * 18 + (6,) * 18 + (4,) * 18,
    "vgg16": (32,) + (8,) * 3 + (6,) * 3 + (4,) * 6,
}


def prunable_convs(structure: ModelStructure) -> tuple[LayerInfo, ...]:
  """Convs that write a channel group, in call order: one ``max_bits`` entry each."""
  return tuple(l for l in structure.layers if l.kind == "conv" and l.out_group is not None)


def depth_thirds_max_bits(num_convs: int, first: int = FULL_PRECISION_BITS,
                          thirds: tuple[int, int, int] = (8, 6, 4)) -> tuple[int, ...]:
  """``first`` for the first conv, then ``thirds`` over the rest split by depth.

  Conv ``i`` of the ``n`` after the first gets ``thirds[3 * i // n]``. For the CIFAR
  ResNets the thirds are the three stages: ResNet-20 is ``[32] + [8]*6 + [6]*6 +
  [4]*6``, ResNet-56 the published ``[32] + [8]*18 + [6]*18 + [4]*18``.
  """
  if num_convs <= 0:
    return ()
  rest = num_convs - 1
  return (first,) + tuple(thirds[3 * i // rest] for i in range(rest))


def reference_max_bits(arch_name: str, structure: ModelStructure) -> tuple[int, ...]:
  """The reference ``max_bits`` of a model: published lists, else :func:`depth_thirds_max_bits`.

  Published: ``resnet56`` and ``vgg16`` (:data:`REFERENCE_MAX_BITS`). Every other
  model follows the depth-thirds rule (first conv 32, then 8/6/4).
  """
  n = len(prunable_convs(structure))
  if arch_name in REFERENCE_MAX_BITS:
    bits = REFERENCE_MAX_BITS[arch_name]
    if len(bits) != n:
      raise UserError(f"the published max_bits of {arch_name} has {len(bits)} entries but this "
                      f"model has {n} prunable convs: pass max_bits explicitly")
    return bits
  return depth_thirds_max_bits(n)


def _kernel(flat_params: Mapping[str, Array], layer: LayerInfo) -> Array:
  key = f"{layer.name}/kernel"
  if key not in flat_params:
    raise UserError(f"params lack {key!r}: pass variables['params'] of the same model")
  kernel = jnp.asarray(flat_params[key], jnp.float32)
  kh, kw = layer.kernel_size
  chex.assert_shape(kernel, (kh, kw, layer.in_features // layer.feature_group_count,
                             layer.out_features))
  return kernel


def _kernel_input_mask(layer: LayerInfo, in_mask: Array) -> Array:
  """The input mask as seen by kernel entry ``[., ., j, o]``: ``[C_in / groups, C_out]``.

  A plain conv's entry ``j`` reads input channel ``j``; a depthwise conv's output
  ``o`` reads channel ``o // multiplier``; in general ``o``'s group's ``j``-th channel.
  """
  groups = layer.feature_group_count
  if groups == 1:
    return in_mask[:, None]
  if layer.out_features == layer.in_features == groups:  # depthwise, multiplier 1
    return in_mask[None, :]
  per_group_in, per_group_out = layer.in_features // groups, layer.out_features // groups
  j = np.arange(per_group_in)[:, None]
  o = np.arange(layer.out_features)[None, :]
  return in_mask[(o // per_group_out) * per_group_in + j]


def layer_sparsity(structure: ModelStructure, params: Any,
                   masks: Mapping[str, Array]) -> tuple[Array, Array]:
  """Kept weight mass and whether channels were lost, per prunable conv.

  Args:
    structure: the model's static structure.
    params: the ORIGINAL (unpruned) ``params`` collection; kernels are HWIO.
    masks: ``{group: float32 [C]}`` of 0/1.

  Returns:
    ``(sparsity, lost)``: float32 ``[P]`` = ``sum |W * in_mask * out_mask| / sum |W|``
    (1 where ``sum |W| == 0``) and bool ``[P]``, any input or output channel removed;
    ``P = len(prunable_convs(structure))``.
  """
  check_masks(structure, masks)
  flat = traverse_util.flatten_dict(params, sep="/")
  ratios, lost = [], []
  for layer in prunable_convs(structure):
    w = jnp.abs(_kernel(flat, layer))
    out_mask = jnp.asarray(masks[layer.out_group], jnp.float32)
    keep = jnp.broadcast_to(out_mask, w.shape[2:])
    gone = jnp.min(out_mask) < 0.5
    if layer.in_group is not None:
      in_mask = jnp.asarray(masks[layer.in_group], jnp.float32)
      keep = keep * _kernel_input_mask(layer, in_mask)
      gone = gone | (jnp.min(in_mask) < 0.5)
    original = jnp.sum(w)
    safe = jnp.where(original > 0, original, 1.0)
    ratios.append(jnp.where(original > 0, jnp.sum(w * keep) / safe, 1.0))
    lost.append(gone)
  if not ratios:
    return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), bool)
  return jnp.stack(ratios), jnp.stack(lost)


def _check_bits_args(structure: ModelStructure, max_bits: Sequence[int], penalty: Any,
                     min_bits: int) -> np.ndarray:
  n = len(prunable_convs(structure))
  if len(max_bits) != n:
    raise UserError(f"max_bits has {len(max_bits)} entries but the model has {n} prunable convs "
                    f"(one per conv that writes a channel group, stem first): see "
                    f"reference_max_bits(arch_name, structure)")
  bits = np.asarray(max_bits)
  if bits.ndim != 1 or not np.all(bits == np.round(bits)) or np.any(bits < 1):
    raise UserError(f"max_bits must be integers >= 1, got {list(max_bits)}")
  if int(min_bits) != min_bits or min_bits < 1:
    raise UserError(f"min_bits={min_bits} must be an integer >= 1 (default 2)")
  try:
    value = float(penalty)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    value = None  # traced
  if value is not None and not value > 0:
    raise UserError(f"penalty={value} must be > 0 (reference 1/6)")
  return bits.astype(np.int32)


def assign_bits(structure: ModelStructure, params_original: Any, masks: Mapping[str, Array],
                max_bits: Sequence[int], penalty: Any = REFERENCE_PENALTY, *,
                min_bits: int = 2) -> dict:
  """Per-layer bit-widths from the pruning sparsity (DESIGN 5; rules in the module doc).

  Args:
    structure: the model's static structure.
    params_original: the unpruned model's ``params`` (kernels HWIO).
    masks: ``{group: float32 [C]}`` of 0/1; traced.
    max_bits: one int per prunable conv in :func:`prunable_convs` order (static),
      e.g. :func:`reference_max_bits`.
    penalty: the ``penalty`` of the formula (reference 1/6); may be traced.
    min_bits: the least a quantized layer gets.

  Returns:
    A ``quant`` collection for every conv and dense layer, nested by module path:
    ``{..: {"w_bits": int32 [], "a_bits": int32 []}}`` (equal), ready to replace
    ``variables["quant"]``.
  """
  maxb = _check_bits_args(structure, max_bits, penalty, min_bits)
  bits = {l.name: jnp.int32(FULL_PRECISION_BITS) for l in structure.layers}
  convs = prunable_convs(structure)
  if convs:
    sparsity, lost = layer_sparsity(structure, params_original, masks)
    drop = jnp.ceil(jnp.asarray(penalty, jnp.float32) / jnp.maximum(sparsity, 1e-30))
    drop = jnp.minimum(drop, maxb).astype(jnp.int32)  # finite before the int cast
    reduced = jnp.maximum(maxb - drop, np.minimum(min_bits, maxb))
    quantized = lost & (maxb < FULL_PRECISION_BITS)
    assigned = jnp.where(quantized, reduced, maxb).astype(jnp.int32)
    bits.update({l.name: assigned[i] for i, l in enumerate(convs)})
  return _quant_collection(bits)


def _quant_collection(bits: Mapping[str, Array]) -> dict:
  """``{layer name: bits}`` -> the nested ``quant`` collection (``w_bits == a_bits``)."""
  flat = {}
  for name, b in bits.items():
    flat[f"{name}/w_bits"] = b
    flat[f"{name}/a_bits"] = b
  return traverse_util.unflatten_dict(flat, sep="/")


def uniform_bits(structure: ModelStructure, bits: int, max_bits: Sequence[int]) -> dict:
  """The same bit-width for every quantized conv: the uniform baseline's ``quant``.

  Convs whose ``max_bits`` entry is below 32 get ``bits`` whether pruned or not;
  the rest (the first conv, dense layers, convs that write no group) stay at 32, as
  in :func:`assign_bits`, so the two differ only in how the quantized convs' bits
  are chosen.

  Returns:
    The ``quant`` collection (int32 scalars), as :func:`assign_bits` returns it.
  """
  maxb = _check_bits_args(structure, max_bits, REFERENCE_PENALTY, 1)
  if int(bits) != bits or not 1 <= bits < FULL_PRECISION_BITS:
    raise UserError(f"uniform bits={bits} must be an integer in 1..{FULL_PRECISION_BITS - 1}")
  out = {l.name: jnp.int32(FULL_PRECISION_BITS) for l in structure.layers}
  for layer, b in zip(prunable_convs(structure), maxb):
    if b < FULL_PRECISION_BITS:
      out[layer.name] = jnp.int32(bits)
  return _quant_collection(out)


def inner_block_inputs(structure: ModelStructure) -> dict[str, str]:
  """``{reader: writer}`` of every layer whose input is a block's *inner* activation.

  A layer's input is inner when the group it reads has a single writer in the same
  module (``stage1_block0/conv1`` -> ``stage1_block0/conv2``): the map after a
  basic block's ``bn1``/ReLU. Residual streams (several writers, or a writer in
  another block) and the image are not.
  """
  groups = {g.name: g for g in structure.groups}
  parent = lambda name: name.rpartition("/")[0]
  out = {}
  for layer in structure.layers:
    group = groups.get(layer.in_group)
    if group is None or len(group.writers) != 1 or group.depthwise:
      continue
    (writer,) = group.writers
    if parent(writer) and parent(writer) == parent(layer.name):
      out[layer.name] = writer
  return out


def inner_activation_quant(structure: ModelStructure, quant: Mapping[str, Any]) -> dict:
  """The reference's activation placement applied to a ``quant`` collection.

  PIC-PQ's ResNet (``resnet_cifar_qt2.py``) quantizes only each basic block's inner
  activation, with the bits of the conv that wrote it; every other layer's input
  (the image, block inputs, the residual stream, the classifier's input) stays full
  precision. Weights keep their bits.

  Args:
    structure: the model's static structure.
    quant: a ``quant`` collection (``{..: {"w_bits", "a_bits"}}``), e.g. from
      :func:`assign_bits`.

  Returns:
    The collection with ``a_bits`` = 32 except for :func:`inner_block_inputs`, which
    get their writer's ``w_bits``.
  """
  flat = traverse_util.flatten_dict(dict(quant), sep="/")
  inner = inner_block_inputs(structure)
  for layer in structure.layers:
    writer = inner.get(layer.name)
    flat[f"{layer.name}/a_bits"] = (flat[f"{writer}/w_bits"] if writer
                                    else jnp.int32(FULL_PRECISION_BITS))
  return traverse_util.unflatten_dict(flat, sep="/")
